//! Where requests go after the filter: Azure over TLS (connection pooling, HTTP/1.1 and HTTP/2
//! by ALPN, SNI from the `:authority` the filter set) and the clusters of call-outs (the
//! in-process token service, or plain-HTTP endpoints).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use azgate_wasmhost::{CallResponse, HttpCall};

use super::error::ServeError;
use super::tls::read_certs;
use crate::token::TokenService;

/// Body of requests sent to Azure.
pub(crate) type UpstreamBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;
/// Boxed body errors.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An HTTP connector that sends configured host names to fixed addresses (like
/// `curl --resolve`) and everything else through DNS.
#[derive(Clone)]
pub(crate) struct ResolvingConnector {
    overrides: Arc<BTreeMap<String, SocketAddr>>,
    inner: HttpConnector,
}

impl tower_service::Service<Uri> for ResolvingConnector {
    type Response = <HttpConnector as tower_service::Service<Uri>>::Response;
    type Error = <HttpConnector as tower_service::Service<Uri>>::Error;
    type Future = <HttpConnector as tower_service::Service<Uri>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let target = uri
            .host()
            .and_then(|host| self.overrides.get(host))
            .and_then(|addr| format!("http://{addr}/").parse::<Uri>().ok());
        self.inner.call(target.unwrap_or(uri))
    }
}

/// The client for Azure.
pub(crate) type AzureClient =
    Client<hyper_rustls::HttpsConnector<ResolvingConnector>, UpstreamBody>;

/// Builds the Azure client: system roots plus `extra_ca`, HTTP/1.1 and HTTP/2.
pub(crate) fn azure_client(
    extra_ca: &[std::path::PathBuf],
    resolve: &BTreeMap<String, SocketAddr>,
    connect_timeout: Duration,
) -> Result<AzureClient, ServeError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for file in extra_ca {
        for cert in read_certs(file)? {
            roots
                .add(cert)
                .map_err(|e| ServeError::Config(format!("{}: {e}", file.display())))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ServeError::Config(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(ResolvingConnector {
            overrides: Arc::new(resolve.clone()),
            inner: http,
        });
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(connector))
}

/// The clusters call-outs may name.
pub(crate) struct Clusters {
    token_service: Option<Arc<TokenService>>,
    token_clusters: Vec<String>,
    addresses: HashMap<String, SocketAddr>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Clusters {
    pub(crate) fn new(
        token_service: Option<Arc<TokenService>>,
        token_clusters: Vec<String>,
        addresses: HashMap<String, SocketAddr>,
    ) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(2)));
        Self {
            token_service,
            token_clusters,
            addresses,
            client: Client::builder(TokioExecutor::new()).build(http),
        }
    }

    /// Names the filter may dispatch to.
    pub(crate) fn names(&self) -> Vec<String> {
        self.token_clusters
            .iter()
            .chain(self.addresses.keys())
            .cloned()
            .collect()
    }

    /// Performs a call-out; failures are reported as Envoy 1.40 reports them (a connect
    /// failure or a reset before the headers is a 503 answer, a timeout a 504 answer, a failure
    /// while reading the body has no headers).
    pub(crate) fn call(
        self: &Arc<Self>,
        call: HttpCall,
    ) -> impl Future<Output = CallResponse> + Send + 'static {
        let clusters = self.clone();
        async move {
            let work = clusters.call_inner(&call);
            match call.timeout {
                Some(limit) => tokio::time::timeout(limit, work)
                    .await
                    .unwrap_or_else(|_| CallResponse::timed_out()),
                None => work.await,
            }
        }
    }

    async fn call_inner(&self, call: &HttpCall) -> CallResponse {
        let header = |name: &str| {
            call.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        let mut builder = Request::builder().method(header(":method").as_str());
        for (name, value) in call.headers.iter().filter(|(k, _)| !k.starts_with(':')) {
            builder = builder.header(name.as_str(), value.as_slice());
        }
        builder = builder.header("host", header(":authority"));
        if self.token_clusters.contains(&call.cluster) {
            let Some(service) = &self.token_service else {
                return CallResponse::failed();
            };
            let Ok(request) = builder
                .uri(header(":path"))
                .body(Bytes::from(call.body.clone()))
            else {
                return CallResponse::failed();
            };
            let response = service.handle(request).await;
            return call_response(response.map(Full::new)).await;
        }
        let Some(addr) = self.addresses.get(&call.cluster) else {
            return CallResponse::failed();
        };
        let uri = format!("http://{addr}{}", header(":path"));
        let Ok(request) = builder
            .uri(uri)
            .body(Full::new(Bytes::from(call.body.clone())))
        else {
            return CallResponse::failed();
        };
        match self.client.request(request).await {
            Ok(response) => call_response(response).await,
            Err(error) if error.is_connect() => {
                CallResponse::upstream_reset("remote connection failure")
            }
            Err(_) => CallResponse::upstream_reset("connection termination"),
        }
    }
}

/// Reads a whole answer into the ABI's shape (`:status` first).
async fn call_response<B>(response: Response<B>) -> CallResponse
where
    B: hyper::body::Body,
{
    let (parts, body) = response.into_parts();
    let Ok(collected) = body.collect().await else {
        return CallResponse::failed();
    };
    let mut headers = vec![(
        ":status".to_string(),
        parts.status.as_str().as_bytes().to_vec(),
    )];
    headers.extend(
        parts
            .headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec())),
    );
    let trailers = collected
        .trailers()
        .map(|t| {
            t.iter()
                .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
                .collect()
        })
        .unwrap_or_default();
    CallResponse {
        headers,
        body: collected.to_bytes().to_vec(),
        trailers,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, reason = "test setup fails the test on purpose")]

    use super::*;

    fn call(cluster: &str) -> HttpCall {
        HttpCall {
            token: 1,
            cluster: cluster.into(),
            headers: vec![
                (":method".into(), b"GET".to_vec()),
                (":path".into(), b"/".to_vec()),
                (":authority".into(), b"probe".to_vec()),
            ],
            body: Vec::new(),
            trailers: Vec::new(),
            timeout: Some(Duration::from_secs(5)),
        }
    }

    fn header<'a>(response: &'a CallResponse, name: &str) -> Option<&'a [u8]> {
        response
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    #[tokio::test]
    async fn failures_before_the_headers_are_answered_with_envoys_503() {
        // A listener that closes every connection without answering.
        let closer = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let closer_addr = closer.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((socket, _)) = closer.accept().await {
                drop(socket);
            }
        });
        // A port nothing listens on.
        let refused_addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let clusters = Arc::new(Clusters::new(
            None,
            Vec::new(),
            [
                ("closer".to_string(), closer_addr),
                ("refused".to_string(), refused_addr),
            ]
            .into_iter()
            .collect(),
        ));
        for (cluster, reason) in [
            ("closer", "connection termination"),
            ("refused", "remote connection failure"),
        ] {
            let response = clusters.call(call(cluster)).await;
            assert_eq!(header(&response, ":status"), Some(&b"503"[..]), "{cluster}");
            assert_eq!(header(&response, "content-type"), Some(&b"text/plain"[..]));
            let body = String::from_utf8_lossy(&response.body).into_owned();
            assert_eq!(
                body,
                format!(
                    "upstream connect error or disconnect/reset before headers. reset reason: {reason}"
                )
            );
        }
    }
}
