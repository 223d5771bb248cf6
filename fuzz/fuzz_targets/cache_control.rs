#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| koodrive_gateway::fuzzing::cache_control(data));
