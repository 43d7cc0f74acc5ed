//! `make bench`: requests per second through three gateways, side by side, on this machine:
//! `azgate serve` (the real filter in wasmtime), Envoy (the same `.wasm` in V8) and a bare hyper
//! mTLS pass-through proxy (no filter: the ceiling). Every request is an allowed `az`-style call
//! (mTLS + proof-of-possession JWT + X-Forwarded-Host) to the fake Azure endpoint, with the MSI
//! token cached, so this measures the steady state.
//!
//! `cargo run --release -p azgate-tests --example bench -- [--seconds 10] [--connections 32]`
//! (the Makefile builds the filter and a release `azgate` first and sets `AZGATE_BIN`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use azgate_tests::jwt;
use azgate_tests::pki::{AppCertSpec, Issued, KeyKind, TestCa};
use azgate_tests::topology::{Options, Runtime, Topology};
use azgate_tests::upstream::FakeAzure;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};

const READER: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/bench/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader";

struct Args {
    seconds: u64,
    connections: usize,
}

fn args() -> Result<Args> {
    let mut args = Args {
        seconds: 10,
        connections: 32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().context("flag without value")?;
        match flag.as_str() {
            "--seconds" => args.seconds = value.parse()?,
            "--connections" => args.connections = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(args)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = args()?;
    let plugin_config = serde_json::json!({
        "roles": [{"kind": "role", "version": "v7", "metadata": {"name": "azure-reader"},
                   "spec": {"allow": {"azure_identities": [READER]}}}]
    })
    .to_string();
    println!(
        "loopback, HTTP/1.1 keep-alive, {} connections, {} s per gateway, 2 gateway workers",
        args.connections, args.seconds
    );
    let mut results = Vec::new();
    for runtime in [Runtime::Serve, Runtime::Envoy] {
        let topology = Topology::start(
            runtime,
            Options {
                plugin_config: plugin_config.clone(),
                concurrency: 2,
                in_process_token_service: false,
                ..Options::default()
            },
        )
        .await?;
        let cert = user(&topology.ca)?;
        let rate = load(&topology.ca, &cert, topology.gateway.mtls, &args).await?;
        println!(
            "{:<28} {:>9.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms",
            runtime.name(),
            rate.per_second,
            rate.p50_ms,
            rate.p99_ms
        );
        results.push((runtime.name().to_string(), rate));
    }
    let ca = TestCa::new("bench CA")?;
    let azure = FakeAzure::start(&ca.server(azgate_tests::topology::AZURE_HOSTS)?).await?;
    let baseline = bare_proxy::start(&ca, azure.addr()).await?;
    let cert = user(&ca)?;
    let rate = load(&ca, &cert, baseline, &args).await?;
    println!(
        "{:<28} {:>9.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms",
        "hyper pass-through (no filter)", rate.per_second, rate.p50_ms, rate.p99_ms
    );
    let serve = results[0].1.per_second;
    let envoy = results[1].1.per_second;
    println!(
        "\nazgate serve / Envoy = {:.2}x   azgate serve / bare hyper = {:.2}x",
        serve / envoy,
        serve / rate.per_second
    );
    Ok(())
}

fn user(ca: &TestCa) -> Result<Issued> {
    ca.app(
        &AppCertSpec {
            user: Some("bench".into()),
            roles: vec!["azure-reader".into()],
            selected_identity: Some(READER.into()),
            allowed_identities: vec![READER.into()],
            not_before_offset_s: -60,
            not_after_offset_s: 3600,
            ..Default::default()
        },
        KeyKind::P256,
    )
}

struct Rate {
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Runs `connections` keep-alive HTTP/1.1 clients for the configured time (after a 1 s warm-up).
async fn load(ca: &TestCa, cert: &Issued, target: SocketAddr, args: &Args) -> Result<Rate> {
    let token = jwt::sign(
        &cert.key,
        jwt::alg_for(&cert.key),
        &serde_json::json!({"resource": "https://management.azure.com/", "tid": "t"}),
    )?;
    let tls = client_tls(ca, cert)?;
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    for _ in 0..args.connections {
        let (tls, token, stop, measuring, count) = (
            tls.clone(),
            token.clone(),
            stop.clone(),
            measuring.clone(),
            count.clone(),
        );
        tasks.push(runtime.spawn(async move {
            let mut latencies = Vec::new();
            let tcp = tokio::net::TcpStream::connect(target).await?;
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::try_from("localhost")?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                    .await?;
            tokio::spawn(connection);
            while !stop.load(Ordering::Relaxed) {
                let request = http::Request::get("/subscriptions?api-version=2022-12-01")
                    .header("host", "localhost")
                    .header("x-forwarded-host", "management.azure.com")
                    .header("authorization", format!("Bearer {token}"))
                    .body(Empty::new())?;
                let started = Instant::now();
                let response = sender.send_request(request).await?;
                let status = response.status();
                response.into_body().collect().await?;
                if status != 200 {
                    bail!("status {status}");
                }
                if measuring.load(Ordering::Relaxed) {
                    count.fetch_add(1, Ordering::Relaxed);
                    latencies.push(started.elapsed());
                }
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    runtime.shutdown_background();
    latencies.sort();
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or_default()
    };
    Ok(Rate {
        per_second: count.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64(),
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
    })
}

fn client_tls(ca: &TestCa, cert: &Issued) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.cert_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let chain =
        CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// The ceiling: an mTLS hyper proxy that forwards every request to the upstream over TLS with a
/// fixed token, on its own 2-thread runtime (like the gateways' 2 workers).
mod bare_proxy {
    use super::*;
    use http_body_util::combinators::BoxBody;
    use hyper::body::Incoming;
    use hyper_util::client::legacy::Client;

    type Body = BoxBody<Bytes, hyper::Error>;

    pub(super) async fn start(ca: &TestCa, upstream: SocketAddr) -> Result<SocketAddr> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let server = ca.server(&["localhost"])?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca.cert_pem.as_bytes()) {
            roots.add(c?)?;
        }
        let roots = Arc::new(roots);
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()?;
        let chain = CertificateDer::pem_slice_iter(server.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes())?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let client_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates((*roots).clone())
            .with_no_client_auth();
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        std::thread::spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
                http.enforce_http(false);
                let connector = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(client_tls)
                    .https_only()
                    .enable_http1()
                    .wrap_connector(Fixed(http, upstream));
                let client: Client<_, Body> =
                    Client::builder(TokioExecutor::new()).build(connector);
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    let (acceptor, client) = (acceptor.clone(), client.clone());
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let service =
                            hyper::service::service_fn(move |request: http::Request<Incoming>| {
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
                                        "host",
                                        http::HeaderValue::from_static("management.azure.com"),
                                    );
                                    parts.headers.insert(
                                        "authorization",
                                        http::HeaderValue::from_static("Bearer fixed"),
                                    );
                                    parts.headers.remove("x-forwarded-host");
                                    let response = client
                                        .request(http::Request::from_parts(parts, body.boxed()))
                                        .await;
                                    Ok::<_, std::convert::Infallible>(match response {
                                        Ok(r) => r.map(|b| b.boxed()),
                                        Err(_) => {
                                            let mut r = http::Response::new(
                                                Empty::new()
                                                    .map_err(|never| match never {})
                                                    .boxed(),
                                            );
                                            *r.status_mut() = http::StatusCode::BAD_GATEWAY;
                                            r
                                        }
                                    })
                                }
                            });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), service)
                            .await;
                    });
                }
            });
        });
        Ok(addr)
    }

    /// Connects every URI to the upstream's address (the host stays for SNI).
    #[derive(Clone)]
    struct Fixed(
        hyper_util::client::legacy::connect::HttpConnector,
        SocketAddr,
    );

    impl tower_service::Service<http::Uri> for Fixed {
        type Response =
            <hyper_util::client::legacy::connect::HttpConnector as tower_service::Service<
                http::Uri,
            >>::Response;
        type Error =
            <hyper_util::client::legacy::connect::HttpConnector as tower_service::Service<
                http::Uri,
            >>::Error;
        type Future =
            <hyper_util::client::legacy::connect::HttpConnector as tower_service::Service<
                http::Uri,
            >>::Future;
        fn poll_ready(
            &mut self,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            self.0.poll_ready(cx)
        }
        fn call(&mut self, _: http::Uri) -> Self::Future {
            let uri = format!("http://{}/", self.1).parse().unwrap_or_default();
            self.0.call(uri)
        }
    }
}
