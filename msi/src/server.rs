//! The small HTTP/1.1 server loop of azgate's buffered endpoints: the token service, the IMDS
//! emulator and `azgate serve`'s admin listener (`/ready`, `/metrics`).
//!
//! Handlers see a fully buffered `Request<Bytes>` and return a `Response<Bytes>`: every body
//! these endpoints exchange is a few hundred bytes of JSON, so streaming would only add code.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

/// Request bodies larger than this are refused; token requests are GETs with empty bodies and
/// the emulator's admin requests are tiny JSON documents.
const MAX_REQUEST_BODY: usize = 64 * 1024;

/// Something that answers one buffered request.
pub trait Handler: Send + Sync + 'static {
    /// The answer to `request`, whose body is already read.
    fn handle(&self, request: Request<Bytes>) -> impl Future<Output = Response<Bytes>> + Send;
}

/// A listening socket: TCP or a unix socket.
pub trait Listener: Send + 'static {
    /// An accepted connection.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection and a description of its peer for logs.
    fn accept(&self) -> impl Future<Output = std::io::Result<(Self::Stream, String)>> + Send;
}

impl Listener for TcpListener {
    type Stream = tokio::net::TcpStream;

    async fn accept(&self) -> std::io::Result<(Self::Stream, String)> {
        let (stream, peer) = TcpListener::accept(self).await?;
        Ok((stream, peer.to_string()))
    }
}

impl Listener for UnixListener {
    type Stream = tokio::net::UnixStream;

    async fn accept(&self) -> std::io::Result<(Self::Stream, String)> {
        let (stream, _) = UnixListener::accept(self).await?;
        // Unix peers are unnamed; the file system permissions of the socket chose them.
        Ok((stream, "unix".to_owned()))
    }
}

/// Accepts connections on `listener` until `shutdown` flips to `true` or its sender is dropped.
/// Connections in progress are dropped at that point too, so a hanging handler cannot keep a
/// stopped server alive.
pub async fn serve<L: Listener, H: Handler>(
    listener: L,
    handler: Arc<H>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped(&mut shutdown) => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Usually EMFILE or a connection reset before accept; neither is fatal.
                tracing::warn!(%error, "accept failed");
                continue;
            }
        };
        let handler = Arc::clone(&handler);
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let handler = Arc::clone(&handler);
                async move { Ok::<_, Infallible>(dispatch(&*handler, request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                result = connection => {
                    if let Err(error) = result {
                        tracing::debug!(%error, %peer, "connection ended with an error");
                    }
                }
                _ = stopped(&mut shutdown) => {}
            }
        });
    }
}

/// Resolves once the server should stop: the flag was set or every sender is gone.
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // `wait_for` errs only when the sender is dropped, which also means "stop".
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn dispatch<H: Handler>(handler: &H, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, MAX_REQUEST_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            let mut response = Response::new(Full::new(Bytes::from_static(
                br#"{"error":"invalid_request","error_description":"request body too large or unreadable"}"#,
            )));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            return response;
        }
    };
    let response = handler.handle(Request::from_parts(parts, body)).await;
    response.map(Full::new)
}

/// A JSON response with the given status.
pub fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Bytes> {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

/// Resolves on SIGINT or SIGTERM: how every long-running azgate process learns to stop.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}
