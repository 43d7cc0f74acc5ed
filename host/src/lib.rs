//! azgate host library: the pieces the `azgate` binary is built from, also used by the
//! integration tests.
//!
//! - [`token`]: managed-identity tokens from every source, cached with refresh-ahead and
//!   single-flight, served over the IMDS protocol by `azgate token-service`.
//! - [`emulator`]: an in-process emulator of IMDS, the App Service identity endpoint and the
//!   Entra token endpoint, with switchable faults, for tests and demos.

pub mod devca;
pub mod emulator;
pub mod envoy_config;
pub mod serve;
pub mod token;
pub mod workstation;

mod civil_time;
mod http_server;
mod imds_rules;
