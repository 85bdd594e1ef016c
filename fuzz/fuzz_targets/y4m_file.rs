#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| voipc::fuzz::y4m_file(data));
