//! Managed-identity tokens: every source, one cache.
//!
//! A [`TokenProvider`] fetches tokens from one [`Source`] (IMDS, App Service, AKS workload
//! identity, a service principal with a secret or certificate — configured, or detected from
//! the environment in the Azure SDKs' order) and caches them per (source, identity, resource):
//!
//! - a token is served until `expires_on` minus 5 minutes and refreshed in the background at
//!   half its lifetime; a failed refresh keeps the still-valid token in service;
//! - one fetch per key at a time (single-flight), whatever the number of callers;
//! - failures are retried per Azure's guidance ([`RetryPolicy`]) within a concurrency and rate
//!   limit toward the source (default 5 concurrent, 20/s, IMDS's per-VM budget), and a caller
//!   waits at most a deadline (default 5 s) while the fetch goes on to fill the cache;
//! - errors are cached only for a short backoff.
//!
//! [`TokenService`] serves a provider over the IMDS protocol and, with a configured secret, the
//! App Service protocol (`azgate token-service`); both take CAE's `token_sha256_to_refresh`.
//!
//! In-process use, as `azgate serve` does:
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use azgate::token::{HyperClient, ManagedIdentity, ProviderConfig, Source, TokenProvider};
//!
//! let provider = TokenProvider::new(
//!     Source::from_environment()?,
//!     Arc::new(HyperClient::new()?),
//!     ProviderConfig::default(),
//! );
//! let reader = ManagedIdentity::ResourceId(
//!     "/subscriptions/…/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader".into(),
//! );
//! let token = provider.token(&reader, "https://management.azure.com/").await?;
//! let authorization = format!("Bearer {}", token.secret());
//! # drop(authorization);
//! # Ok(())
//! # }
//! ```

mod cae;
mod client;
mod error;
mod metrics;
mod provider;
mod retry;
mod service;
mod settings;
mod source;

// The public interface is:
pub use cae::TokenSha256;
pub use client::{HttpClient, HyperClient, SendFuture};
pub use error::{Culprit, TokenError};
pub use metrics::MetricsSnapshot;
pub use provider::{AccessToken, ProviderConfig, TokenProvider};
pub use retry::RetryPolicy;
pub use service::{
    APP_SERVICE_TOKEN_PATH, ListenAddress, RunningTokenService, TOKEN_PATH, TokenService,
};
pub use settings::{
    APP_SERVICE_HEADER_ENV, BuiltTokenService, SecretSource, SourceKind, TokenSettings,
};
pub use source::{
    ClientCertificate, DEFAULT_AUTHORITY_HOST, IMDS_ENDPOINT, ManagedIdentity, Secret, Source,
};
