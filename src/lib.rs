//! m2m-gateway: a point-to-point machine-to-machine gateway.
//!
//! It polls field machines on serial lines, keeps their latest values in a register
//! image, and forwards them to peer machines over closed, mutually authenticated links.
//!
//! ```text
//! serial port ─▶ bus ─▶ poller ─▶ image ─┬─▶ server   (local Modbus-TCP masters)
//!                                         ├─▶ spool ─▶ link ─▶ peer gateway (TLS, seq + ack)
//!                                         └─▶ spool ─▶ plc  ─▶ peer PLC
//! peer link ─▶ grants check ─▶ image (peer namespace) ─▶ bus writes (only what config grants)
//! config (raw TOML) ─validate─▶ model ─▶ gateway: spawns every task under one shutdown token
//! ```
//!
//! Modules are listed in the order data flows through them.

pub mod ascii;
pub mod bus;
pub mod checksum;
pub mod codec;
pub mod commission;
pub mod config;
pub mod demo;
pub mod extract;
pub mod forward;
pub mod framing;
pub mod gateway;
pub mod image;
pub mod link;
pub mod listener;
pub mod mbap;
pub mod model;
pub mod pdu;
pub mod plan;
pub mod plc;
pub mod poller;
pub mod proto;
pub mod raw;
pub mod rawpoll;
pub mod rawstream;
pub mod relay;
pub mod rtu;
pub mod server;
mod simconfig;
mod simmap;
mod simport;
mod simraw;
pub mod simulate;
pub mod spool;
pub mod spooler;
pub mod tls;
pub mod tunnel;
pub mod value;
pub mod writeback;
pub mod writer;
