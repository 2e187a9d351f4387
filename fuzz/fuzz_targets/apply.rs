#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| syncline_core::fuzzing::apply(data));
