#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| voipc::fuzz::client_messages(data));
