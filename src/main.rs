//! The m2m-gateway command line.
fn main() {}
