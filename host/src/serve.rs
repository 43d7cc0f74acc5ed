//! `azgate serve`: the filter inside wasmtime as an mTLS gateway.
//!
//! One compiled plugin; one worker thread per CPU, each with its own current-thread runtime and
//! VM (as Envoy runs one VM per worker); every listener socket is shared by the workers, which
//! accept on it in turn. Call-outs to `token_service` clusters are answered in-process by the
//! token module. SIGTERM/SIGINT stop accepting and drain in-flight requests.

mod compiled_code;
mod connection;
mod error;
mod http1_guard;
mod listener;
mod policy;
mod proxy;
mod stats;
mod tls;
mod upstream;
mod worker;

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use azgate_wasmhost::{Plugin, PluginOptions, SharedStores};
use bytes::Bytes;
use http::{Request, Response};
use tokio::sync::watch;

pub use compiled_code::Compiler;
pub use error::ServeError;
pub use stats::WorkerStats;

use crate::config::{self, ServeConfig};
use crate::token::{HyperClient, TokenService};
use azgate_msi::server::shutdown_signal;

/// How long in-flight requests may take to finish after a stop signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the gateway until SIGTERM or SIGINT.
pub async fn run(config: ServeConfig) -> Result<(), ServeError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    // This binary compiles the filter in a child of itself (see `compiled_code`).
    let compiler = match std::env::current_exe() {
        Ok(program) => Compiler::ChildProcess(program),
        Err(error) => {
            tracing::warn!(%error, "own executable not found; compiling the filter in this process");
            Compiler::InProcess
        }
    };
    let running = start_with(config, stop_rx, compiler).await?;
    shutdown_signal().await;
    tracing::info!("stopping: no new connections; draining in-flight requests");
    let _ = stop_tx.send(true);
    running.join().await;
    Ok(())
}

/// A started gateway.
pub struct Running {
    threads: Vec<std::thread::JoinHandle<()>>,
    compiled_by: compiled_code::CodeSource,
}

impl Running {
    /// Waits for every worker to drain and stop.
    pub async fn join(self) {
        for thread in self.threads {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    /// Where the filter's code was compiled: `child process`, `compiled-code cache` (found
    /// there, marked) or `this process`.
    pub fn compiled_by(&self) -> &'static str {
        self.compiled_by.name()
    }
}

/// Starts listeners, workers and the admin listener, compiling the filter in this process;
/// stops when `stop` becomes true.
pub async fn start(
    config: ServeConfig,
    stop: watch::Receiver<bool>,
) -> Result<Running, ServeError> {
    start_with(config, stop, Compiler::InProcess).await
}

/// [`start`], with the filter compiled by `compiler`.
pub async fn start_with(
    config: ServeConfig,
    stop: watch::Receiver<bool>,
    compiler: Compiler,
) -> Result<Running, ServeError> {
    let wasm = std::fs::read(&config.filter.path).map_err(|e| {
        ServeError::Config(format!("filter.path {}: {e}", config.filter.path.display()))
    })?;
    let plugin_config = config
        .plugin_config()
        .map_err(|e| ServeError::Config(e.to_string()))?;
    let initial_policy = plugin_config.clone();
    let token_clusters: Vec<String> = config
        .clusters
        .iter()
        .filter(|(_, c)| c.token_service)
        .map(|(name, _)| name.clone())
        .collect();
    let addresses: HashMap<String, std::net::SocketAddr> = config
        .clusters
        .iter()
        .filter_map(|(name, c)| c.address.map(|a| (name.clone(), a)))
        .collect();
    let token_service = if token_clusters.is_empty() {
        None
    } else {
        let built = config
            .token_source
            .clone()
            .unwrap_or_default()
            .build_from_environment()
            .map_err(|e| ServeError::Config(format!("token_source: {e}")))?;
        tracing::info!(
            source = built.source.kind(),
            allow_list = built.allowed.is_some(),
            "token source"
        );
        let client = HyperClient::new().map_err(|e| ServeError::Config(e.to_string()))?;
        Some(Arc::new(built.into_service(Arc::new(client))))
    };
    let clusters = Arc::new(upstream::Clusters::new(
        token_service.clone(),
        token_clusters,
        addresses,
    ));
    let compile_started = Instant::now();
    let code_cache =
        compiled_code::prepare(&compiler, config.filter.cache_dir.as_deref(), &wasm).await;
    let options = PluginOptions {
        name: config.filter.name.clone(),
        root_id: config.filter.root_id.clone(),
        vm_id: config.filter.vm_id.clone(),
        plugin_config,
        vm_config: Vec::new(),
        clusters: clusters.names(),
        log_level: 2,
        cache_dir: code_cache.dir.clone(),
    };
    let plugin = Arc::new(
        Plugin::load(&wasm, options, SharedStores::default()).map_err(ServeError::Filter)?,
    );
    // Refuse to start on a configuration the filter refuses, before binding anything.
    drop(plugin.start_vm().map_err(ServeError::Filter)?);
    // The code is in memory now and nothing reads a private cache again: removed at once, so
    // a gateway that is killed leaves nothing behind.
    drop(code_cache.private);
    tracing::info!(
        elapsed_ms = compile_started.elapsed().as_millis() as u64,
        compiled_by = code_cache.source.name(),
        "filter loaded"
    );

    let workers = config.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let mut listeners = Vec::new();
    for listener in &config.listeners {
        let sockets = bind_per_worker(listener.address, workers)?;
        let local_subject = listener
            .tls
            .as_ref()
            .and_then(|tls_config| tls::certificate_subject(&tls_config.cert));
        let tls = match &listener.tls {
            Some(tls_config) => Some(tls::server_config(tls_config)?),
            None => {
                tracing::warn!(listener = %listener.name, "plaintext listener: trusting the client-supplied XFCC of the TLS front");
                None
            }
        };
        println!("listener {} on {}", listener.name, sockets[0].local_addr()?);
        let connections = Arc::new(listener::ConnectionLimit::new(listener.max_connections));
        let timeouts = connection::Timeouts {
            headers: Duration::from_millis(listener.request_headers_timeout_ms),
            request: Duration::from_millis(listener.request_timeout_ms),
        };
        listeners.push((sockets, tls, connections, local_subject, timeouts));
    }

    // Policy files are watched only when there are some; workers reconfigure on each change.
    let (generation_tx, generation) = watch::channel(0u64);
    let policy_stats = Arc::new(policy::PolicyStats::default());
    if !config.policy_sources().is_empty() {
        tokio::spawn(policy::watch(
            config.clone(),
            plugin.clone(),
            initial_policy,
            generation_tx,
            policy_stats.clone(),
            stop.clone(),
        ));
    }

    let ready = Arc::new(AtomicUsize::new(0));
    let mut all_stats = Vec::new();
    let mut threads = Vec::new();
    for index in 0..workers {
        let stats = Arc::new(WorkerStats::default());
        all_stats.push(stats.clone());
        let mut specs = Vec::new();
        for (sockets, tls, connections, local_subject, timeouts) in &mut listeners {
            specs.push(listener::ListenerSpec {
                listener: sockets.pop().ok_or_else(|| {
                    ServeError::Config("one listening socket per worker was bound".into())
                })?,
                tls: tls.clone(),
                connections: connections.clone(),
                local_subject: local_subject.clone(),
                timeouts: *timeouts,
            });
        }
        let (plugin, clusters) = (plugin.clone(), clusters.clone());
        let signals = WorkerSignals {
            stop: stop.clone(),
            ready: ready.clone(),
            policy: generation.clone(),
        };
        let upstream = config.upstream.clone();
        let thread = std::thread::Builder::new()
            .name(format!("azgate-worker-{index}"))
            .spawn(move || {
                if let Err(error) = run_worker(plugin, clusters, stats, specs, upstream, signals) {
                    tracing::error!(%error, worker = index, "worker stopped");
                }
            })?;
        threads.push(thread);
    }
    if let Some(admin) = &config.admin {
        let listener = tokio::net::TcpListener::bind(admin.address).await?;
        println!("admin on {}", listener.local_addr()?);
        let endpoints = AdminEndpoints {
            stats: all_stats,
            ready,
            workers,
            token_service,
            policy: policy_stats,
        };
        tokio::spawn(azgate_msi::server::serve(
            listener,
            Arc::new(endpoints),
            stop.clone(),
        ));
    }
    Ok(Running {
        threads,
        compiled_by: code_cache.source,
    })
}

/// One listening socket per worker on `address`, all with `SO_REUSEPORT`, so the kernel spreads
/// new connections across the workers (as Envoy's per-worker listeners do); a single shared
/// socket lets whichever worker wakes first take them all.
fn bind_per_worker(
    address: std::net::SocketAddr,
    workers: usize,
) -> Result<Vec<std::net::TcpListener>, ServeError> {
    let mut sockets: Vec<std::net::TcpListener> = Vec::with_capacity(workers);
    for _ in 0..workers {
        // Port 0 picks a port once; the other workers join that one.
        let address = match sockets.first() {
            Some(first) => first.local_addr()?,
            None => address,
        };
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(address),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&address.into())?;
        socket.listen(1024)?;
        sockets.push(socket.into());
    }
    Ok(sockets)
}

/// What a worker thread is told: stop, and a new policy; and what it reports: ready.
struct WorkerSignals {
    stop: watch::Receiver<bool>,
    /// Workers that have their VM and accept connections.
    ready: Arc<AtomicUsize>,
    /// Bumped for each policy change to apply.
    policy: watch::Receiver<u64>,
}

fn run_worker(
    plugin: Arc<Plugin>,
    clusters: Arc<upstream::Clusters>,
    stats: Arc<WorkerStats>,
    specs: Vec<listener::ListenerSpec>,
    upstream_config: config::UpstreamConfig,
    signals: WorkerSignals,
) -> Result<(), ServeError> {
    let WorkerSignals {
        stop,
        ready,
        policy: mut generation,
    } = signals;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let vm = plugin.start_vm().map_err(ServeError::Filter)?;
        let client = upstream::azure_client(
            &upstream_config.extra_ca,
            &upstream_config.resolve,
            upstream_config.connect_timeout(),
        )?;
        let forwarding = Rc::new(proxy::Forwarding {
            client,
            request_timeout: upstream_config.request_timeout(),
            max_request_body_bytes: usize::try_from(upstream_config.max_request_body_bytes())
                .unwrap_or(usize::MAX),
        });
        let worker = worker::Worker::new(plugin, vm, clusters, stats.clone());
        let reconfiguring = worker.clone();
        tokio::task::spawn_local(async move {
            while generation.changed().await.is_ok() {
                reconfiguring.reconfigure();
            }
        });
        let mut accepting = Vec::new();
        for spec in specs {
            accepting.push(tokio::task::spawn_local(listener::serve_listener(
                worker.clone(),
                forwarding.clone(),
                spec,
                stop.clone(),
            )));
        }
        ready.fetch_add(1, Ordering::SeqCst);
        for task in accepting {
            let _ = task.await;
        }
        // Stopped accepting: let in-flight requests finish.
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while stats.current() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    })
}

/// The admin listener: `/ready` and `/metrics` (the gateway's, the policy reloads', and the
/// in-process token service's).
struct AdminEndpoints {
    stats: Vec<Arc<WorkerStats>>,
    ready: Arc<AtomicUsize>,
    workers: usize,
    token_service: Option<Arc<TokenService>>,
    policy: Arc<policy::PolicyStats>,
}

impl azgate_msi::server::Handler for AdminEndpoints {
    async fn handle(&self, request: Request<Bytes>) -> Response<Bytes> {
        match request.uri().path() {
            "/ready" if self.ready.load(Ordering::SeqCst) >= self.workers => {
                text(200, "LIVE\n".into())
            }
            "/ready" => text(503, "STARTING\n".into()),
            "/metrics" => {
                let mut body = stats::render(&self.stats);
                self.policy.render(&mut body);
                if let Some(service) = &self.token_service
                    && let Ok(request) = Request::get("/metrics").body(Bytes::new())
                {
                    let metrics = service.handle(request).await;
                    body.push_str(&String::from_utf8_lossy(metrics.body()));
                }
                text(200, body)
            }
            _ => text(404, "not found\n".into()),
        }
    }
}

fn text(status: u16, body: String) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(body));
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    response.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}
