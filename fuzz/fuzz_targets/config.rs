//! Fuzz target `config`: see `m2m_gateway::fuzz_entry::config_toml`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| m2m_gateway::fuzz_entry::config_toml(data));
