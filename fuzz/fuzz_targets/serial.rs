//! Fuzz target `serial`: see `m2m_gateway::fuzz_entry::serial_frames`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| m2m_gateway::fuzz_entry::serial_frames(data));
