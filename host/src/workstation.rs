//! The user's side, as `tsh proxy azure` / `tsh az` provide it: a local proxy that lets the real
//! `az` CLI reach Azure through an azgate gateway with a Teleport-format app certificate.
//!
//! ```text
//! az ──HTTPS_PROXY──► azgate proxy (CONNECT, loopback)
//!      ├─ token endpoint hosts → answered locally: a JWT signed by the certificate's key
//!      ├─ Azure hosts → TLS ends here (local CA) → mTLS + X-Forwarded-Host → gateway → Azure
//!      └─ other hosts → tunnelled (directly or through the user's own proxy)
//! ```
//!
//! - [`proxy`]: the CONNECT proxy, TLS terminator and forwarder ([`LocalProxy`]).
//! - [`token_endpoint`]: the local MSI / App Service-style token endpoint.
//! - [`az`]: the environment `az` runs with, and `az login --identity` when needed.

pub mod az;
pub mod proxy;
pub mod token_endpoint;

use std::fmt;

pub use proxy::{LocalProxy, ProxyConfig};
pub use token_endpoint::{EndpointSecret, TokenEndpoint};

/// What can go wrong on the workstation side.
#[derive(Debug)]
#[non_exhaustive]
pub enum WorkstationError {
    /// A flag, certificate or key is unusable; the message says which and why.
    Config(String),
    /// A file or socket operation failed.
    Io(String, std::io::Error),
    /// Building a TLS configuration or a local certificate failed.
    Tls(String),
    /// Running `az` failed.
    Az(String),
}

impl fmt::Display for WorkstationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(message) | Self::Tls(message) | Self::Az(message) => f.write_str(message),
            Self::Io(what, error) => write!(f, "{what}: {error}"),
        }
    }
}

impl std::error::Error for WorkstationError {}
