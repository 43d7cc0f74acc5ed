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

    /// Performs a call-out; failures are reported as Envoy reports them (a reset has no
    /// headers; a timeout is a 504 answer).
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
            Err(_) => CallResponse::failed(),
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
