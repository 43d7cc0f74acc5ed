//! The bench's own servers, each run as a child process of the bench binary
//! (`bench --role <name> <dir> [<upstream>]`) so the kernel accounts its CPU time apart from
//! the load generator's: the upstream standing in for Azure, and the bare hyper pass-through
//! proxy (the ceiling). Each prints `ready <addr> <addr>` when it listens.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

/// The token the bare proxy and the native Envoy check inject (the gateways inject the MSI
/// token the emulator issued; the upstream does not look).
pub(crate) const FIXED_TOKEN: &str = "Bearer bench-msi-token";

/// A role child: its process and the two addresses it printed.
pub(crate) struct RoleChild {
    pub(crate) child: Child,
    pub(crate) first: SocketAddr,
    pub(crate) second: SocketAddr,
}

impl RoleChild {
    /// The child's pid.
    pub(crate) fn pid(&self) -> Result<u32> {
        self.child.id().context("role child exited")
    }
}

/// Starts `bench --role <role> <dir> [<extra>]` and waits for its `ready` line.
pub(crate) async fn spawn(role: &str, dir: &Path, extra: Option<SocketAddr>) -> Result<RoleChild> {
    let mut command = Command::new(std::env::current_exe()?);
    command.args(["--role", role]).arg(dir);
    if let Some(extra) = extra {
        command.arg(extra.to_string());
    }
    let mut child = command
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting the {role} role"))?;
    let stdout = child.stdout.take().context("role stdout")?;
    let mut reader = tokio::io::BufReader::new(stdout);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    // Keep reading, so a later line does not meet a closed pipe.
    tokio::task::spawn_local(
        async move { tokio::io::copy(&mut reader, &mut tokio::io::sink()).await },
    );
    let mut words = line.split_whitespace();
    let (Some("ready"), Some(first), Some(second)) = (words.next(), words.next(), words.next())
    else {
        bail!("the {role} role did not start: {line:?}");
    };
    Ok(RoleChild {
        child,
        first: first.parse()?,
        second: second.parse()?,
    })
}

/// Runs a role in this process (never returns on success).
pub(crate) fn run(role: &str, args: &[String]) -> Result<()> {
    let dir = PathBuf::from(args.first().context("role without a directory")?);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match role {
        "upstream" => runtime.block_on(upstream(&dir)),
        "bare-proxy" => {
            let upstream: SocketAddr = args
                .get(1)
                .context("bare-proxy without upstream")?
                .parse()?;
            runtime.block_on(bare_proxy(&dir, upstream))
        }
        other => bail!("unknown role {other}"),
    }
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", path.display()))
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).with_context(|| format!("reading {}", path.display()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(dir: &Path) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_chain(&dir.join("ca.crt"))? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// Binds two loopback listeners and says so on stdout.
async fn listen_pair() -> Result<(tokio::net::TcpListener, tokio::net::TcpListener)> {
    let first = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let second = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("ready {} {}", first.local_addr()?, second.local_addr()?);
    Ok((first, second))
}

/// Accepts on `listener` forever, handing each connection (after TLS, if any) to `serve`.
async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    serve: F,
) where
    F: Fn(Box<dyn Io>) -> Fut + Clone + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (tls, serve) = (tls.clone(), serve.clone());
        tokio::task::spawn_local(async move {
            match tls {
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(tcp).await {
                        serve(Box::new(stream)).await;
                    }
                }
                None => serve(Box::new(tcp)).await,
            }
        });
    }
}

/// A connection, TLS or not.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Io for T {}

/// The stand-in for Azure: TLS (a certificate for the Azure host names, from the test CA) on
/// the first address, plain HTTP on the second; every request gets 200 and a small ARM-style
/// JSON list.
async fn upstream(dir: &Path) -> Result<()> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            read_chain(&dir.join("upstream.crt"))?,
            read_key(&dir.join("upstream.key"))?,
        )?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (tls, plain) = listen_pair().await?;
    let serve = |io: Box<dyn Io>| async move {
        let service = hyper::service::service_fn(|request: http::Request<Incoming>| async move {
            // Read the body (there is none) so the connection stays reusable.
            let _ = request.into_body().collect().await;
            let mut response =
                http::Response::new(Full::new(Bytes::from_static(br#"{"value":[]}"#)));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            Ok::<_, std::convert::Infallible>(response)
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(io), service)
            .await;
    };
    let local = tokio::task::LocalSet::new();
    local.spawn_local(accept_loop(tls, Some(acceptor), serve));
    local.spawn_local(accept_loop(plain, None, serve));
    local.await;
    Ok(())
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// The ceiling: a hyper proxy on one thread that forwards every request to the upstream over
/// TLS (SNI `management.azure.com`, verified against the test CA) with a fixed token. First
/// address: mTLS (client certificate from the test CA required); second: plain HTTP.
async fn bare_proxy(dir: &Path, upstream: SocketAddr) -> Result<()> {
    let roots = Arc::new(roots(dir)?);
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            read_chain(&dir.join("gateway.crt"))?,
            read_key(&dir.join("gateway.key"))?,
        )?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let client_tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates((*roots).clone())
        .with_no_client_auth();
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_tls)
        .https_only()
        .enable_http1()
        .wrap_connector(Fixed(http, upstream));
    let client: Client<_, ProxyBody> = Client::builder(TokioExecutor::new()).build(connector);
    let (mtls, plain) = listen_pair().await?;
    let serve = move |io: Box<dyn Io>| {
        let client = client.clone();
        async move {
            let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
                let client = client.clone();
                async move {
                    let (mut parts, body) = request.into_parts();
                    let path = parts
                        .uri
                        .path_and_query()
                        .map(|p| p.as_str().to_string())
                        .unwrap_or_default();
                    parts.uri = format!("https://management.azure.com{path}")
                        .parse()
                        .unwrap_or_default();
                    parts.headers.insert(
                        http::header::HOST,
                        http::HeaderValue::from_static("management.azure.com"),
                    );
                    parts.headers.insert(
                        http::header::AUTHORIZATION,
                        http::HeaderValue::from_static(FIXED_TOKEN),
                    );
                    parts.headers.remove("x-forwarded-host");
                    parts.headers.remove("x-forwarded-client-cert");
                    let response = client
                        .request(http::Request::from_parts(parts, body.boxed()))
                        .await;
                    Ok::<_, std::convert::Infallible>(match response {
                        Ok(response) => response.map(BodyExt::boxed),
                        Err(_) => {
                            let mut response = http::Response::new(
                                Empty::new().map_err(|never| match never {}).boxed(),
                            );
                            *response.status_mut() = http::StatusCode::BAD_GATEWAY;
                            response
                        }
                    })
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(io), service)
                .await;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.spawn_local(accept_loop(mtls, Some(acceptor), serve.clone()));
    local.spawn_local(accept_loop(plain, None, serve));
    local.await;
    Ok(())
}

/// Connects every URI to the upstream's address (the host stays for SNI).
#[derive(Clone)]
struct Fixed(
    hyper_util::client::legacy::connect::HttpConnector,
    SocketAddr,
);

type Connector = hyper_util::client::legacy::connect::HttpConnector;

impl tower_service::Service<http::Uri> for Fixed {
    type Response = <Connector as tower_service::Service<http::Uri>>::Response;
    type Error = <Connector as tower_service::Service<http::Uri>>::Error;
    type Future = <Connector as tower_service::Service<http::Uri>>::Future;
    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }
    fn call(&mut self, _: http::Uri) -> Self::Future {
        let uri = format!("http://{}/", self.1)
            .parse()
            .unwrap_or_else(|_| http::Uri::from_static("http://127.0.0.1/"));
        self.0.call(uri)
    }
}
