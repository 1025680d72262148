//! m2m-gateway: a point-to-point machine-to-machine gateway.
//!
//! It polls field machines on serial lines, keeps their latest values in a register
//! image, and forwards them to peer machines over closed, mutually authenticated links.
//!
//! ```text
//! serial port ─▶ bus ─▶ poll ─▶ image ─┬─▶ server   (local Modbus-TCP masters)
//!                                       ├─▶ spool ─▶ link ─▶ peer gateway (TLS, seq + ack)
//!                                       └─▶ spool ─▶ plc  ─▶ peer PLC
//! peer link ─▶ grants check ─▶ image (peer namespace) ─▶ writer ─▶ bus writes (only what config grants)
//! config (raw TOML) ─validate─▶ model ─▶ gateway: spawns every task under one shutdown token
//! ```
//!
//! Each box of the diagram is a module, and a box with parts is a folder. Modules sit in
//! layers and import only from layers below their own (`tests/layers.rs` keeps this true):
//!
//! | layer | modules | what they own |
//! |---|---|---|
//! | 1 | [`point`], [`backoff`], [`health`], [`loglimit`], [`sockets`] | typed values, their register encodings, fields of raw replies; reconnect back-off; liveness beats of the core tasks; rate limits for log lines others can cause; listening sockets, bound here or handed over (systemd socket activation) |
//! | 2 | [`serial`], [`image`] | bytes on a line (framings, PDUs, checksums); the live point values |
//! | 3 | [`model`] | the validated configuration every task runs from |
//! | 4 | [`config`], [`bus`], [`spool`] | TOML to model; one task per line; the on-disk spool per peer |
//! | 5 | [`poll`], [`server`], [`plc`], [`sim`] | polling devices; Modbus-TCP masters; PLC sinks; the simulator |
//! | 6 | [`writer`] | a typed write into a local point through its bus |
//! | 7 | [`link`] | peer links: TLS, the protocol, grants, write-back, serial tunnels |
//! | 8 | [`http`] | observers: status page, Prometheus metrics, JSON API, operator writes |
//! | 9 | [`gateway`], [`service`] | starts every task of a model under one shutdown token, reloads it; the systemd notify protocol and watchdog |
//! | 10 | [`tools`], `fuzz_entry` | commissioning reads and the demo; the fuzz targets' entry points |
//!
//! The binary (`src/main.rs`, with `src/main/cli.rs` for what the command line accepts
//! and `src/main/tools.rs` for the one-shot commands) sits above them all.

// Every public item is documented, and `pub` means reachable from outside the crate
// (an item only the crate uses is `pub(crate)`). Tests and examples are their own crates.
#![warn(missing_docs, unreachable_pub)]
#![forbid(unsafe_code)]

pub mod backoff;
pub mod health;
pub mod loglimit;
pub mod point;
pub mod sockets;

pub mod image;
pub mod serial;

pub mod model;

pub mod bus;
pub mod config;
pub mod spool;

pub mod plc;
pub mod poll;
pub mod server;
pub mod sim;

pub mod writer;

pub mod link;

pub mod http;

pub mod gateway;
pub mod service;

#[doc(hidden)]
pub mod fuzz_entry;
pub mod tools;
