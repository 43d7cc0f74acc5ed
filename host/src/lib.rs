//! azgate host library: the pieces the `azgate` binary is built from, also used by the
//! integration tests.
//!
//! - [`token`]: managed-identity tokens from every source, cached with refresh-ahead and
//!   single-flight, served over the IMDS protocol by `azgate token-service`.

#![warn(missing_docs, unreachable_pub)]

pub mod config;
pub mod envoy_config;
mod hop_by_hop;
pub mod log_line;
pub mod log_sink;
pub mod pki;
pub mod serve;
pub mod token;
pub mod workstation;
