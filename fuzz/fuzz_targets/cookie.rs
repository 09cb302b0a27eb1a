#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chime_fuzz_harness::cookie(data));
