#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| voipc::fuzz::sframe_packet(data));
