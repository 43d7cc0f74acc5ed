//! Test support for azgate's integration tests: a test CA minting Teleport-format certificates,
//! JWT minting, a fake Azure endpoint, and topologies that run the filter in a real gateway.

#![warn(missing_docs, unreachable_pub)]

pub mod hostile_pki;
pub mod jwt;
pub mod pki;
pub mod raw;
pub mod topology;
pub mod upstream;

/// The tokio runtime the harness-less runners (`filter`, `probe`) drive their trials on: two
/// threads, so a trial's client and a gateway's callbacks can progress together.
pub fn runner_runtime() -> std::io::Result<std::sync::Arc<tokio::runtime::Runtime>> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map(std::sync::Arc::new)
}
