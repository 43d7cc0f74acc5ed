//! Test support for azgate's integration tests: a test CA minting Teleport-format certificates,
//! JWT minting, a fake Azure endpoint, and topologies that run the filter in a real gateway.

pub mod jwt;
pub mod pki;
pub mod topology;
pub mod upstream;
