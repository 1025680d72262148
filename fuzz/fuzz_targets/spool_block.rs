//! Fuzz target `spool_block`: see `m2m_gateway::fuzz_entry::spool_block`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| m2m_gateway::fuzz_entry::spool_block(data));
