//! Fuzz target `peer`: see `m2m_gateway::fuzz_entry::peer_frames`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| m2m_gateway::fuzz_entry::peer_frames(data));
