//! Polling field devices into the image: the request plan of a Modbus device
//! ([`plan`]), the Modbus poller ([`modbus`]), raw request/response devices ([`raw`]) and
//! raw streaming devices ([`stream`]).

pub mod modbus;
pub mod plan;
pub mod raw;
pub mod stream;
