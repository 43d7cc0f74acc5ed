//! The local proxy: an HTTP CONNECT forward proxy on loopback. CONNECTs to Azure hosts (and to
//! the local token endpoints) are terminated here with a per-host certificate from an ephemeral
//! local CA (what `REQUESTS_CA_BUNDLE` trusts); token requests are answered locally and every
//! other request goes to the gateway over mTLS with the app certificate and
//! `X-Forwarded-Host: <original host>`. CONNECTs to other hosts are tunnelled untouched, directly
//! or through the user's own proxy.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use azgate_filter::endpoint::EndpointPolicy;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::WorkstationError;
use super::token_endpoint::{EndpointSecret, TokenEndpoint};
use crate::hop_by_hop::strip as strip_hop_by_hop;
use crate::pki::{AppKey, CertificateAuthority, KeyKind};

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Largest token request body (a form with `resource=`).
const MAX_TOKEN_REQUEST_BODY: usize = 16 * 1024;

/// How to start the local proxy.
#[derive(Debug)]
pub struct ProxyConfig {
    /// The gateway, `HOST:PORT`.
    pub gateway: String,
    /// The app certificate, PEM (the mTLS client certificate).
    pub cert_pem: String,
    /// Its key.
    pub key: AppKey,
    /// The CA that issued the gateway's server certificate, PEM.
    pub gateway_ca_pem: String,
    /// Where to listen (loopback; port 0 picks one).
    pub listen: SocketAddr,
    /// The user's own proxy for non-Azure hosts (`http://host:port`), if any.
    pub upstream_proxy: Option<String>,
    /// The user's `NO_PROXY` entries: non-Azure hosts matching them are reached directly.
    pub no_proxy: Vec<String>,
    /// The token endpoint secret.
    pub secret: EndpointSecret,
}

/// A running local proxy. Dropping it stops the listener.
#[derive(Debug)]
pub struct LocalProxy {
    addr: SocketAddr,
    identity: String,
    local_ca_pem: String,
    secret: EndpointSecret,
    not_after: SystemTime,
    shutdown: watch::Sender<bool>,
}

struct Shared {
    endpoint: TokenEndpoint,
    endpoints: EndpointPolicy,
    gateway: String,
    client: Client<HttpsConnector<HttpConnector>, ProxyBody>,
    local_ca: CertificateAuthority,
    leaf_configs: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
    upstream_proxy: Option<String>,
    no_proxy: Vec<String>,
}

impl LocalProxy {
    /// Checks the certificate and key, builds the mTLS client, and starts listening.
    pub async fn start(config: ProxyConfig) -> Result<Self, WorkstationError> {
        let identity = azgate_filter::identity::parse_app_certificate(&config.cert_pem).map_err(
            |refusal| WorkstationError::Config(format!("--cert: {}", refusal.message())),
        )?;
        config
            .key
            .check_matches(&config.cert_pem)
            .map_err(|e| WorkstationError::Config(format!("--key: {e}")))?;
        let now = unix_now();
        if identity.not_after <= now {
            return Err(WorkstationError::Config(format!(
                "--cert: the certificate of {:?} expired; issue a new one",
                identity.user
            )));
        }
        let selected = identity.selected_identity.clone().ok_or_else(|| {
            WorkstationError::Config(
                "--cert: the certificate selects no Azure identity (OID 1.3.9999.1.16); issue it with --azure-identity"
                    .into(),
            )
        })?;
        let not_after =
            SystemTime::UNIX_EPOCH + Duration::from_secs(identity.not_after.max(0).unsigned_abs());
        validate_gateway(&config.gateway)?;
        let client = gateway_client(&config)?;
        // The local CA lives as long as this process and the certificate it serves.
        let lifetime = not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .max(Duration::from_secs(3600));
        let local_ca = CertificateAuthority::generate("azgate local proxy CA", lifetime)
            .map_err(|e| WorkstationError::Tls(format!("local CA: {e}")))?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| WorkstationError::Io(format!("listening on {}", config.listen), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| WorkstationError::Io("local address".into(), e))?;
        let shared = Arc::new(Shared {
            endpoint: TokenEndpoint::new(config.key, selected.clone(), config.secret.clone()),
            endpoints: EndpointPolicy::default(),
            gateway: config.gateway,
            client,
            local_ca: local_ca.clone(),
            leaf_configs: Mutex::new(HashMap::new()),
            upstream_proxy: config.upstream_proxy,
            no_proxy: config.no_proxy,
        });
        let (shutdown, stopped) = watch::channel(false);
        tokio::spawn(accept_loop(listener, shared, stopped));
        Ok(Self {
            addr,
            identity: selected,
            local_ca_pem: local_ca.cert_pem().to_owned(),
            secret: config.secret,
            not_after,
            shutdown,
        })
    }

    /// The listening address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The Azure identity the certificate selects.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The local CA's certificate, PEM (what `REQUESTS_CA_BUNDLE` must trust).
    pub fn local_ca_pem(&self) -> &str {
        &self.local_ca_pem
    }

    /// The token endpoint secret.
    pub fn secret(&self) -> &EndpointSecret {
        &self.secret
    }

    /// When the app certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Stops accepting connections.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }
}

impl Drop for LocalProxy {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

fn validate_gateway(gateway: &str) -> Result<(), WorkstationError> {
    let bad = || {
        WorkstationError::Config(format!(
            "--gateway {gateway:?}: expected HOST:PORT, e.g. gateway.example.com:443"
        ))
    };
    let (host, port) = gateway.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() || gateway.contains('/') {
        return Err(bad());
    }
    Ok(())
}

/// The HTTPS client to the gateway: trusts only `--ca`, presents the app certificate.
fn gateway_client(
    config: &ProxyConfig,
) -> Result<Client<HttpsConnector<HttpConnector>, ProxyBody>, WorkstationError> {
    let tls = |what: &str, e: &dyn std::fmt::Display| WorkstationError::Tls(format!("{what}: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    let ca_certs = CertificateDer::pem_slice_iter(config.gateway_ca_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls("--ca", &e))?;
    if ca_certs.is_empty() {
        return Err(WorkstationError::Config(
            "--ca holds no PEM certificate".into(),
        ));
    }
    for cert in ca_certs {
        roots.add(cert).map_err(|e| tls("--ca", &e))?;
    }
    let chain = CertificateDer::pem_slice_iter(config.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls("--cert", &e))?;
    let key_pem = config.key.to_pem().map_err(|e| tls("--key", &e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| tls("--key", &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls("TLS", &e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| tls("client certificate", &e))?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config)
        .https_only()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(https))
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.wait_for(|stop| *stop) => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(proxy_request(shared, request).await) }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await
            {
                tracing::debug!(%error, %peer, "proxy connection ended with an error");
            }
        });
    }
}

/// One request on the proxy port: CONNECT, or a refusal.
async fn proxy_request(shared: Arc<Shared>, mut request: Request<Incoming>) -> Response<ProxyBody> {
    if request.method() != Method::CONNECT {
        return error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "ProxyConnectOnly",
            "this proxy only tunnels HTTPS (CONNECT); set HTTPS_PROXY, not HTTP_PROXY",
        );
    }
    let Some(authority) = request.uri().authority().cloned() else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "InvalidConnect",
            "CONNECT needs host:port",
        );
    };
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    let port = authority.port_u16().unwrap_or(443);
    let intercept = port == 443
        && (TokenEndpoint::is_endpoint_host(&host)
            || shared.endpoints.target(&[authority.as_str()]).is_ok());
    if intercept {
        let tls_config = match shared.leaf_config(&host) {
            Ok(config) => config,
            Err(error) => {
                tracing::error!(%error, %host, "cannot make a certificate for the host");
                return error_response(
                    StatusCode::BAD_GATEWAY,
                    "LocalCertificate",
                    "azgate cannot make a certificate for this host",
                );
            }
        };
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            match upgrade.await {
                Ok(upgraded) => serve_intercepted(shared, host, tls_config, upgraded).await,
                Err(error) => tracing::debug!(%error, "CONNECT upgrade failed"),
            }
        });
        return Response::new(empty());
    }
    // Not Azure: a plain tunnel, through the user's proxy unless NO_PROXY says otherwise.
    let target = format!("{host}:{port}");
    let via = shared
        .upstream_proxy
        .as_deref()
        .filter(|_| !no_proxy_matches(&shared.no_proxy, &host));
    let upstream = match open_tunnel(&target, via, authority.as_str()).await {
        Ok(stream) => stream,
        Err(error) => {
            tracing::info!(%target, %error, "tunnel failed");
            return error_response(
                StatusCode::BAD_GATEWAY,
                "TunnelFailed",
                &format!("cannot reach {target}: {error}"),
            );
        }
    };
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            let mut client = TokioIo::new(upgraded);
            let mut upstream = upstream;
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        }
    });
    Response::new(empty())
}

impl Shared {
    /// The TLS server configuration presenting a local-CA certificate for `host` (cached).
    fn leaf_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, WorkstationError> {
        if let Some(config) = self
            .leaf_configs
            .lock()
            .ok()
            .and_then(|c| c.get(host).cloned())
        {
            return Ok(config);
        }
        let tls = |e: &dyn std::fmt::Display| WorkstationError::Tls(e.to_string());
        let key = AppKey::generate(KeyKind::P256).map_err(|e| tls(&e))?;
        let now = SystemTime::now();
        let cert_pem = self
            .local_ca
            .issue_server(
                &[host],
                &[],
                key.public_key_info().map_err(|e| tls(&e))?,
                now - Duration::from_secs(60),
                self.local_ca.not_after(),
            )
            .map_err(|e| tls(&e))?;
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| tls(&e))?;
        let key_pem = key.to_pem().map_err(|e| tls(&e))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| tls(&e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| tls(&e))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| tls(&e))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        if let Ok(mut cache) = self.leaf_configs.lock() {
            cache.insert(host.to_owned(), Arc::clone(&config));
        }
        Ok(config)
    }
}

/// Terminates TLS for `host` on the upgraded CONNECT stream and serves its requests.
async fn serve_intercepted(
    shared: Arc<Shared>,
    host: String,
    tls_config: Arc<rustls::ServerConfig>,
    upgraded: hyper::upgrade::Upgraded,
) {
    let tls = match TlsAcceptor::from(tls_config)
        .accept(TokioIo::new(upgraded))
        .await
    {
        Ok(tls) => tls,
        Err(error) => {
            // Typically a client that does not trust the local CA (REQUESTS_CA_BUNDLE unset).
            tracing::warn!(%error, %host, "TLS handshake with the client failed (is REQUESTS_CA_BUNDLE set?)");
            return;
        }
    };
    let service = service_fn(move |request: Request<Incoming>| {
        let shared = Arc::clone(&shared);
        let host = host.clone();
        async move { Ok::<_, Infallible>(azure_request(&shared, &host, request).await) }
    });
    if let Err(error) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tls), service)
        .await
    {
        tracing::debug!(%error, "intercepted connection ended with an error");
    }
}

/// A request inside an intercepted tunnel: a local token request, or one for the gateway.
async fn azure_request(
    shared: &Shared,
    host: &str,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    if TokenEndpoint::is_endpoint_host(host) {
        let path_and_query = request
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        let (parts, body) = request.into_parts();
        let body = match Limited::new(body, MAX_TOKEN_REQUEST_BODY).collect().await {
            Ok(body) => body.to_bytes(),
            Err(_) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "InvalidRequest",
                    "token request body too large or unreadable",
                );
            }
        };
        let answer =
            shared
                .endpoint
                .answer(host, &parts.method, &path_and_query, &parts.headers, &body);
        // Never the query (it names the identity) nor the answer (it holds the token).
        tracing::info!(%method, %host, status = answer.status.as_u16(), "local token request");
        return json_response(answer.status, answer.body);
    }
    match forward(shared, host, request).await {
        Ok(response) => {
            tracing::info!(%method, %host, %path, status = response.status().as_u16(), "forwarded to the gateway");
            response
        }
        Err(error) => {
            tracing::warn!(%method, %host, %path, %error, "gateway unreachable");
            error_response(
                StatusCode::BAD_GATEWAY,
                "GatewayUnreachable",
                &format!("cannot reach the gateway {}: {error}", shared.gateway),
            )
        }
    }
}

/// Sends the request to the gateway over mTLS with `X-Forwarded-Host: host`, streaming both ways.
async fn forward(
    shared: &Shared,
    host: &str,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, String> {
    let (mut parts, body) = request.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    parts.uri = format!("https://{}{path_and_query}", shared.gateway)
        .parse()
        .map_err(|e| format!("request URI: {e}"))?;
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(http::header::HOST);
    parts.headers.remove("x-forwarded-host");
    parts.headers.insert(
        "x-forwarded-host",
        HeaderValue::from_str(host).map_err(|e| e.to_string())?,
    );
    parts.version = http::Version::HTTP_11;
    let outgoing = Request::from_parts(parts, body.boxed());
    let response = shared
        .client
        .request(outgoing)
        .await
        .map_err(|e| error_chain(&e))?;
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, body.boxed()))
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// Opens a TCP stream to `target`, directly or through an HTTP proxy (`http://host:port`).
async fn open_tunnel(
    target: &str,
    via: Option<&str>,
    authority: &str,
) -> Result<TcpStream, String> {
    let connect = |addr: String| async move {
        tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr.as_str()))
            .await
            .map_err(|_| format!("connecting to {addr} timed out"))?
            .map_err(|e| format!("connecting to {addr}: {e}"))
    };
    let Some(proxy) = via else {
        return connect(target.to_owned()).await;
    };
    let proxy_addr = proxy
        .strip_prefix("http://")
        .unwrap_or(proxy)
        .trim_end_matches('/')
        .to_owned();
    let mut stream = connect(proxy_addr.clone()).await?;
    let hello = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    stream
        .write_all(hello.as_bytes())
        .await
        .map_err(|e| format!("proxy {proxy_addr}: {e}"))?;
    // Read the proxy's answer head byte by byte (it is short), so no tunnel byte is consumed.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8 * 1024 {
            return Err(format!("proxy {proxy_addr}: answer head too long"));
        }
        let byte = stream
            .read_u8()
            .await
            .map_err(|e| format!("proxy {proxy_addr}: {e}"))?;
        head.push(byte);
    }
    let status_line = String::from_utf8_lossy(&head);
    let status_line = status_line.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(format!(
            "proxy {proxy_addr} refused the tunnel: {status_line}"
        ));
    }
    Ok(stream)
}

/// Whether `host` matches a `NO_PROXY` entry (`*`, a host, or a domain with or without a
/// leading dot).
pub fn no_proxy_matches(entries: &[String], host: &str) -> bool {
    entries.iter().any(|entry| {
        let entry = entry
            .trim()
            .trim_start_matches("*.")
            .trim_start_matches('.');
        let entry = entry
            .split(':')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        entry == "*"
            || (!entry.is_empty() && (host == entry || host.ends_with(&format!(".{entry}"))))
    })
}

fn empty() -> ProxyBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

fn json_response(status: StatusCode, body: Bytes) -> Response<ProxyBody> {
    let mut response = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// An Azure-style error answered by the proxy itself.
fn error_response(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    let body = azgate_filter::error::azure_error_body(code, message);
    json_response(status, Bytes::from(body))
}

/// The loopback address the proxy listens on by default.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_proxy_entries_match_hosts_and_domains() {
        let entries: Vec<String> = ["localhost", ".example.com", "*.corp.net", "10.0.0.1:8080"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(no_proxy_matches(&entries, "localhost"));
        assert!(no_proxy_matches(&entries, "api.example.com"));
        assert!(no_proxy_matches(&entries, "example.com"));
        assert!(no_proxy_matches(&entries, "a.corp.net"));
        assert!(no_proxy_matches(&entries, "10.0.0.1"));
        assert!(!no_proxy_matches(&entries, "notexample.com"));
        assert!(no_proxy_matches(&["*".to_string()], "anything"));
        assert!(!no_proxy_matches(&[], "anything"));
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        headers.insert("authorization", HeaderValue::from_static("Bearer t"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("authorization"));
    }

    #[test]
    fn gateway_addresses_are_host_and_port() {
        assert!(validate_gateway("localhost:8443").is_ok());
        assert!(validate_gateway("[::1]:8443").is_ok());
        for bad in ["localhost", "https://gw:443", ":443", "gw:port"] {
            assert!(validate_gateway(bad).is_err(), "{bad}");
        }
    }
}
