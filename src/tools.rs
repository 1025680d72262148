//! Operator tools built on the library: commissioning reads (`poll`, [`commission`]) and
//! the no-hardware demo ([`demo`]).

pub mod commission;
pub mod demo;
