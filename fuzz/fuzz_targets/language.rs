#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| koodrive_gateway::fuzzing::language(data));
