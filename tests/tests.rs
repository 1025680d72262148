//! The integration tests, as one binary (as ripgrep does): one link step instead of one
//! per file. Each module is one area; `common` holds the shared rigs and helpers.

mod common;

mod browser;
mod cli;
mod config_corpus;
mod deliver;
mod docs;
mod http;
mod hubs;
mod late_replies;
mod layers;
mod link_processes;
mod links;
mod modbus_tcp;
mod plc;
mod polling;
mod raw_protocols;
mod reload;
mod routes;
mod serial_protocols;
mod server;
mod service;
mod simulator;
mod tunnel;
