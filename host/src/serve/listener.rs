//! A worker's listeners: accept (within the listener's connection limit), TLS with client
//! certificates, the HTTP/1.1 guard, and hyper serving each request through [`super::proxy`].

use std::convert::Infallible;
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::http1_guard::{Http1Guard, Verdicts};
use super::tls::{self};
use super::worker::Worker;
use crate::config::MAX_REQUEST_HEADERS_BYTES;

use super::connection::{Connection, NEXT_CONNECTION, Timeouts};
use super::proxy::{Forwarding, handle};

/// A listener as a worker serves it.
pub(crate) struct ListenerSpec {
    pub(crate) listener: std::net::TcpListener,
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    /// Shared by every worker accepting on this listener.
    pub(crate) connections: Arc<ConnectionLimit>,
    /// Subject of the listener's own certificate (`connection.subject_local_certificate`).
    pub(crate) local_subject: Option<String>,
    pub(crate) timeouts: Timeouts,
}

/// TLS handshakes that take longer are dropped (Envoy's `transport_socket_connect_timeout`
/// in the rendered config), so idle sockets cannot hold connection slots.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Open connections of one listener, across workers; like Envoy's `connection_limit` filter,
/// connections beyond the limit are closed as soon as they are accepted.
#[derive(Debug)]
pub(crate) struct ConnectionLimit {
    open: std::sync::atomic::AtomicU32,
    max: u32,
}

impl ConnectionLimit {
    pub(crate) fn new(max: u32) -> Self {
        Self {
            open: std::sync::atomic::AtomicU32::new(0),
            max,
        }
    }

    /// A slot, or `None` when the listener is full.
    fn acquire(self: &Arc<Self>) -> Option<ConnectionSlot> {
        use std::sync::atomic::Ordering;
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.max).then_some(open + 1)
            })
            .ok()
            .map(|_| ConnectionSlot(self.clone()))
    }
}

/// Frees its slot when the connection ends.
struct ConnectionSlot(Arc<ConnectionLimit>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Runs hyper's HTTP/2 tasks on the worker's thread (the service is not `Send`).
#[derive(Clone, Copy)]
struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
{
    fn execute(&self, future: F) {
        tokio::task::spawn_local(future);
    }
}

/// Accepts connections until `stop` flips.
pub(crate) async fn serve_listener(
    worker: Rc<Worker>,
    forwarding: Rc<Forwarding>,
    spec: ListenerSpec,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = TcpListener::from_std(spec.listener)?;
    let acceptor = spec.tls.map(TlsAcceptor::from);
    let local_subject = spec.local_subject;
    let timeouts = spec.timeouts;
    let certificates = Rc::new(tls::PeerCertificates::default());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, peer)) = accepted else { continue };
                let Some(slot) = spec.connections.acquire() else {
                    worker.stats.connection_refused();
                    tracing::debug!(%peer, "listener at max_connections: connection closed");
                    drop(tcp);
                    continue;
                };
                let local = tcp.local_addr().unwrap_or(peer);
                let _ = tcp.set_nodelay(true);
                let (worker, forwarding, acceptor) = (worker.clone(), forwarding.clone(), acceptor.clone());
                let certificates = certificates.clone();
                let local_subject = local_subject.clone();
                tokio::task::spawn_local(async move {
                    let _slot = slot;
                    match acceptor {
                        Some(acceptor) => {
                            let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                            let Ok(Ok(stream)) = handshake.await else { return };
                            let certificate = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|chain| chain.first())
                                .map(|der| certificates.get(der));
                            let tls_version = stream.get_ref().1.protocol_version().map(tls::version_name);
                            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                            let verdicts = (!h2).then(|| Rc::new(Verdicts::default()));
                            let connection = Rc::new(Connection {
                                peer,
                                local,
                                certificate,
                                tls: true,
                                id: NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed),
                                tls_version,
                                local_subject,
                                timeouts,
                                verdicts: verdicts.clone(),
                            });
                            match verdicts {
                                Some(verdicts) => {
                                    let guarded = Http1Guard::new(stream, verdicts, timeouts.headers);
                                    serve_http(worker, forwarding, connection, TokioIo::new(guarded)).await;
                                }
                                None => serve_http(worker, forwarding, connection, TokioIo::new(stream)).await,
                            }
                        }
                        None => {
                            // Passed through if it opens with HTTP/2's preface.
                            let verdicts = Rc::new(Verdicts::default());
                            let connection = Rc::new(Connection {
                                peer,
                                local,
                                certificate: None,
                                tls: false,
                                id: NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed),
                                tls_version: None,
                                local_subject: None,
                                timeouts,
                                verdicts: Some(verdicts.clone()),
                            });
                            let guarded = Http1Guard::new(tcp, verdicts, timeouts.headers);
                            serve_http(worker, forwarding, connection, TokioIo::new(guarded)).await;
                        }
                    }
                });
            }
            _ = stop.changed() => return Ok(()),
        }
    }
}

async fn serve_http<I>(
    worker: Rc<Worker>,
    forwarding: Rc<Forwarding>,
    connection: Rc<Connection>,
    io: I,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
{
    let headers_timeout = connection.timeouts.headers;
    let service = service_fn(move |request: Request<Incoming>| {
        let (worker, forwarding, connection) =
            (worker.clone(), forwarding.clone(), connection.clone());
        async move { Ok::<_, Infallible>(handle(worker, forwarding, connection, request).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(LocalExec);
    // HTTP/2 decodes up to twice the limit, so a block over it reaches `refuse_early` and gets
    // an Azure-style 431 rather than the codec's bare one.
    builder
        .http2()
        .max_header_list_size(2 * MAX_REQUEST_HEADERS_BYTES);
    // The HTTP/1.1 guard refuses heads over the limits and times heads out before hyper's own
    // limits and timer (which also closes idle connections) would.
    builder
        .http1()
        .max_buf_size(MAX_REQUEST_HEADERS_BYTES as usize + 4096)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(2 * headers_timeout);
    let _ = builder.serve_connection(io, service).await;
}
