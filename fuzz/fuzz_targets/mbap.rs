//! Fuzz target `mbap`: see `m2m_gateway::fuzz_entry::mbap_requests`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| m2m_gateway::fuzz_entry::mbap_requests(data));
