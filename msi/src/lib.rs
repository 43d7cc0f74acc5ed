//! The managed-identity token protocols as a server speaks them, written once for both servers
//! that speak them: azgate's token service (`azgate token-service`, and in-process in
//! `azgate serve`) and the IMDS emulator the tests and demos run against.
//!
//! - [`protocol`]: paths and api-versions of IMDS and of App Service's identity endpoint;
//! - [`request`]: the request rules IMDS enforces (GET, `Metadata: true`, no
//!   `X-Forwarded-For`, no duplicate parameters);
//! - [`us_date`] (the filter's, re-exported): the US-style `expires_on` dates App Service's
//!   legacy endpoint sends;
//! - [`server`]: the buffered HTTP/1.1 accept loop, shutdown signal and JSON responses.
//!
//! What the filter needs of the same protocol (the call-out path, answer parsing) is
//! [`azgate_filter::imds`], and [`protocol`] takes its constants from there, so the client
//! and the servers cannot drift apart.

#![warn(missing_docs, unreachable_pub)]

pub mod protocol;
pub mod request;
pub mod server;
pub use azgate_filter::us_date;
