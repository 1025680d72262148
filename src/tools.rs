//! Operator tools built on the library: commissioning reads (`poll`, [`commission`]) and
//! the no-hardware demo ([`demo`]); what `check` tells about register maps ([`maps`]).

pub mod commission;
pub mod demo;
pub mod maps;
