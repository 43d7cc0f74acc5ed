//! azgate host library: the pieces the `azgate` binary is built from, also used by the
//! integration tests.
//!
//! - [`emulator`]: an in-process emulator of IMDS, the App Service identity endpoint and the
//!   Entra token endpoint, with switchable faults, for tests and demos.

pub mod emulator;

mod civil_time;
mod http_server;
