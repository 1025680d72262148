//! Operator tools built on the library: commissioning reads (`poll`, [`commission`]) and
//! the no-hardware demo ([`demo`]), what `check` tells about register maps ([`maps`]), and
//! the commands that ask a running gateway through its HTTP API ([`remote`]: `status`,
//! `read`, `write`).

pub mod commission;
pub mod demo;
pub mod maps;
pub mod remote;
