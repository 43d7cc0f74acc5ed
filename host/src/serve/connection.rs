//! What the gateway knows about one client connection, for the filter's properties and the
//! request's time limits.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use super::http1_guard::Verdicts;
use super::tls::PeerCertificate;

/// How long a client may take to send a request (`listeners[].request_headers_timeout_ms`,
/// `request_timeout_ms`; Envoy's `request_headers_timeout`, `request_timeout`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timeouts {
    /// The header block; an HTTP/1.1 connection that takes longer (or idles longer) is closed.
    pub(crate) headers: Duration,
    /// The whole request, body included; 408 after it.
    pub(crate) request: Duration,
}

/// What the gateway knows about a connection.
pub(crate) struct Connection {
    pub(crate) peer: SocketAddr,
    pub(crate) local: SocketAddr,
    pub(crate) certificate: Option<Rc<PeerCertificate>>,
    pub(crate) tls: bool,
    /// Process-unique (`connection.id`).
    pub(crate) id: u64,
    pub(crate) tls_version: Option<String>,
    pub(crate) local_subject: Option<String>,
    pub(crate) timeouts: Timeouts,
    /// The HTTP/1.1 guard's decision per request head; `None` on HTTP/2 connections.
    pub(crate) verdicts: Option<Rc<Verdicts>>,
}

/// The next `connection.id`.
pub(crate) static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);
