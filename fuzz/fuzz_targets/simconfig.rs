//! Fuzz target `simconfig`: see `m2m_gateway::fuzz_entry::simulation_toml`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| m2m_gateway::fuzz_entry::simulation_toml(data));
