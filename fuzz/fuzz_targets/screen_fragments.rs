#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| voipc::fuzz::screen_fragments(data));
