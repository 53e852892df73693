#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kafboy_fuzz::record(data));
