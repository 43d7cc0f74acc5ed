//! The outbound HTTP client toward token sources, behind a trait so tests can drive the
//! emulator (`azgate-emulator`, a dev-dependency) in memory, deterministic under tokio's paused
//! clock.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::error::TokenError;

/// Token responses are a few KiB; anything much larger is not one.
const MAX_RESPONSE_BODY: usize = 256 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The future [`HttpClient::send`] returns.
pub type SendFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Response<Bytes>, TokenError>> + Send + 'a>>;

/// Sends one buffered request and buffers the response. Timeouts are the caller's business.
pub trait HttpClient: Send + Sync + 'static {
    /// Sends `request` (absolute URI).
    fn send(&self, request: Request<Bytes>) -> SendFuture<'_>;
}

/// hyper + rustls (webpki roots, ring). Never uses a proxy: IMDS must not be proxied, and the
/// other sources are reached directly too.
#[derive(Clone, Debug)]
pub struct HyperClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

// === impl HyperClient ===

impl HyperClient {
    /// A client that speaks HTTP to IMDS-style endpoints and HTTPS to Entra.
    pub fn new() -> Result<HyperClient, TokenError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|error| TokenError::Configuration(format!("TLS setup: {error}")))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        Ok(HyperClient { client })
    }
}

impl HttpClient for HyperClient {
    fn send(&self, request: Request<Bytes>) -> SendFuture<'_> {
        Box::pin(async move {
            let response = self
                .client
                .request(request.map(Full::new))
                .await
                .map_err(|error| TokenError::Transport(transport_reason(&error)))?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BODY)
                .collect()
                .await
                .map_err(|error| TokenError::Transport(format!("reading the response: {error}")))?
                .to_bytes();
            Ok(Response::from_parts(parts, body))
        })
    }
}

/// The innermost cause of a hyper client error: "connection refused" says more than
/// "client error (Connect)".
fn transport_reason(error: &(dyn std::error::Error + 'static)) -> String {
    let mut reason = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        reason = format!("{reason}: {cause}");
        source = cause.source();
    }
    reason
}

/// The emulator answers in memory, exactly as over a socket (unit tests only).
#[cfg(test)]
impl HttpClient for azgate_emulator::Emulator {
    fn send(&self, request: Request<Bytes>) -> SendFuture<'_> {
        Box::pin(async move { Ok(self.handle(request).await) })
    }
}
