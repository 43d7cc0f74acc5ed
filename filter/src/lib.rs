//! azgate's proxy-wasm HTTP filter.
//!
//! For each request it reads the caller's Teleport app certificate from
//! `x-forwarded-client-cert`, verifies the `Authorization: Bearer` JWT against that certificate's
//! key, re-checks `azure_identities` RBAC, checks that `X-Forwarded-Host` is an Azure endpoint,
//! obtains a managed-identity token for (identity, resource) through an IMDS-protocol call-out
//! (cached in shared data for every worker), and forwards the request with that token. Every
//! refusal is an Azure-style JSON error; nothing is forwarded on any failure.
//!
//! The decisions live in plain modules with native unit tests. The request path:
//! `context` (wasm32 only: the proxy-wasm root and request contexts) →
//! [`decision`] (identity, JWT, RBAC, endpoint) → [`broker`] (token from the shared cache or a
//! call-out, rewrite, audit line) → the host forwards. Every host call goes through
//! [`host::Host`], so the broker's state machine is tested natively on a fake host.

#![warn(missing_docs, unreachable_pub)]

pub mod audience;
pub mod broker;
pub mod config;
pub mod decision;
pub mod endpoint;
pub mod error;
pub mod headers;
pub mod host;
pub mod identity;
pub mod imds;
pub mod jwt;
pub mod lock;
pub mod policy;
mod resource;
pub mod template;
pub mod token_cache;
pub mod us_date;

#[cfg(target_arch = "wasm32")]
mod context;

/// The exported start function (`_initialize`, written by the SDK's macro): installs the root
/// context factory.
#[cfg(target_arch = "wasm32")]
#[allow(unreachable_pub)] // the function is exported by symbol, not by path
mod start {
    proxy_wasm::main! {{
        crate::context::register();
    }}
}
