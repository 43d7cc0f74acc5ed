//! The figures beside the rounds: start-up to `/ready` and to the first answered request (with
//! and without the compiled-code cache), resident memory at 1,000 idle mTLS connections, and
//! `azgate token-service` on its own (cache-hit answers per second, and how many upstream
//! calls 1,000 concurrent cold requests cause).

use std::fmt::Write as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use azgate_tests::topology::{self, Runtime};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

use crate::load::{self, Endpoint, Load, RequestShape};
use crate::report::Spread;
use crate::{Args, Bench, Mode, procfs};

/// Starts per start-up figure (the median is reported).
const STARTS: usize = 3;
/// Idle connections for the memory figure.
const IDLE_CONNECTIONS: usize = 1000;
/// Concurrent cold requests for the token service's coalescing figure.
const COLD_REQUESTS: usize = 1000;

pub(crate) struct Extras {
    /// (what, to `/ready` ms, to the first answered request ms).
    starts: Vec<(&'static str, Spread, Spread)>,
    /// (gateway, RSS MB idle after one request, RSS MB with 1,000 idle mTLS connections).
    idle_memory: Vec<(&'static str, f64, f64)>,
    token_service_rps: f64,
    token_service_cpu_us_per_req: f64,
    cold_upstream_calls: u64,
    cold_all_ms: f64,
}

pub(crate) async fn measure(bench: &Bench, args: &Args) -> Result<Extras> {
    // Children inherit this process's core: a start gets every core, as on a real host.
    let every_core = format!("0-{}", procfs::online_cpus() - 1);
    procfs::pin(std::process::id(), &every_core)?;
    let measured = measure_unpinned(bench, args).await;
    procfs::pin(std::process::id(), crate::LOAD_CPU)?;
    measured
}

async fn measure_unpinned(bench: &Bench, args: &Args) -> Result<Extras> {
    let mut starts = Vec::new();
    let cache = bench.dir.join("code-cache");
    // One start fills the cache; the cached starts then reuse it.
    start_once(bench, Runtime::Serve, Some(cache.clone())).await?;
    let mut cached = Vec::new();
    let mut uncached = Vec::new();
    let mut envoy = Vec::new();
    for i in 0..STARTS {
        cached.push(start_once(bench, Runtime::Serve, Some(cache.clone())).await?);
        let fresh = bench.dir.join(format!("empty-cache-{i}"));
        uncached.push(start_once(bench, Runtime::Serve, Some(fresh)).await?);
        envoy.push(start_once(bench, Runtime::EnvoyRendered, None).await?);
    }
    for (what, times) in [
        ("azgate serve, compiled-code cache warm", cached),
        ("azgate serve, no compiled code cached", uncached),
        ("Envoy + filter (rendered config)", envoy),
    ] {
        let ready = Spread::of(times.iter().map(|t| t.0)).context("no starts")?;
        let first = Spread::of(times.iter().map(|t| t.1)).context("no starts")?;
        starts.push((what, ready, first));
    }
    let mut idle_memory = Vec::new();
    for (what, runtime, cache_dir) in [
        (
            "azgate serve + filter, no compiled code cached",
            Runtime::Serve,
            None,
        ),
        (
            "azgate serve + filter, compiled-code cache warm",
            Runtime::Serve,
            Some(cache),
        ),
        (
            "Envoy + filter (rendered config)",
            Runtime::EnvoyRendered,
            None,
        ),
    ] {
        let (idle, loaded) = idle_connections(bench, runtime, cache_dir).await?;
        idle_memory.push((what, idle, loaded));
    }
    let (token_service_rps, token_service_cpu_us_per_req, cold_upstream_calls, cold_all_ms) =
        token_service(bench, args).await?;
    Ok(Extras {
        starts,
        idle_memory,
        token_service_rps,
        token_service_cpu_us_per_req,
        cold_upstream_calls,
        cold_all_ms,
    })
}

/// Starts `runtime` with serve's compiled-code cache at `cache_dir` (`None`: none).
async fn start_with_cache(
    bench: &Bench,
    runtime: Runtime,
    cache_dir: Option<std::path::PathBuf>,
) -> Result<topology::Gateway> {
    let options = topology::Options {
        cache_dir,
        ..bench.gateway_options(None)
    };
    bench.start_gateway(runtime, &options).await
}

/// Starts `runtime` (pinned like the rounds' gateways once it runs); returns ms to `/ready`
/// and ms to the first answered request through it.
async fn start_once(
    bench: &Bench,
    runtime: Runtime,
    cache_dir: Option<std::path::PathBuf>,
) -> Result<(f64, f64)> {
    let started = Instant::now();
    let gateway = start_with_cache(bench, runtime, cache_dir).await?;
    let ready = started.elapsed();
    let endpoint = bench.endpoint(gateway.mtls, Mode::Mtls, "localhost")?;
    load::open_idle(&endpoint, &bench.request(Mode::Mtls)?, 1).await?;
    let first = started.elapsed();
    drop(gateway);
    Ok((ready.as_secs_f64() * 1e3, first.as_secs_f64() * 1e3))
}

/// RSS (MB) of a fresh `runtime` after one request, and with [`IDLE_CONNECTIONS`] mTLS
/// connections open and idle (each has answered one request). `cache_dir`: serve's compiled-code
/// cache (`None`: it compiles the module itself).
async fn idle_connections(
    bench: &Bench,
    runtime: Runtime,
    cache_dir: Option<std::path::PathBuf>,
) -> Result<(f64, f64)> {
    let gateway = start_with_cache(bench, runtime, cache_dir).await?;
    let endpoint = bench.endpoint(gateway.mtls, Mode::Mtls, "localhost")?;
    let shape = bench.request(Mode::Mtls)?;
    let first = load::open_idle(&endpoint, &shape, 1).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mb = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let idle = mb(procfs::rss_bytes_of(&gateway.pids())?);
    let open = load::open_idle(&endpoint, &shape, IDLE_CONNECTIONS).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loaded = mb(procfs::rss_bytes_of(&gateway.pids())?);
    drop((first, open));
    Ok((idle, loaded))
}

/// `azgate token-service` from the emulator: answers/s and CPU/answer with the token cached,
/// then upstream calls (and total time) for [`COLD_REQUESTS`] concurrent cold requests on a
/// fresh service.
async fn token_service(bench: &Bench, args: &Args) -> Result<(f64, f64, u64, f64)> {
    let resource = "https://management.azure.com/";
    let path = azgate_filter::imds::token_request_path(crate::READER, resource, None);
    let shape = RequestShape {
        path,
        headers: vec![("host", "localhost".into()), ("metadata", "true".into())],
    };
    let (service, addr) = start_token_service(bench).await?;
    let pid = service.id().context("token service exited")?;
    procfs::pin(pid, crate::gateway_cpu())?;
    let endpoint = Endpoint {
        addr,
        tls: None,
        server_name: "localhost".into(),
    };
    let load = Load::start(&endpoint, &shape, args.connections).await?;
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    let before = procfs::cpu_ticks(pid)?;
    let opened = load.open_window();
    tokio::time::sleep(Duration::from_secs_f64(args.seconds)).await;
    let after = procfs::cpu_ticks(pid)?;
    let window = load.finish(opened.elapsed()).await;
    if window.errors > 0 {
        bail!("token service: {:?}", window.first_error);
    }
    let answers = window.latencies_us.len() as f64;
    let rps = answers / window.elapsed.as_secs_f64();
    let cpu = procfs::ticks_to_duration(after - before, procfs::clock_ticks_per_second())
        .as_secs_f64()
        * 1e6
        / answers.max(1.0);
    drop(service);

    let (service, addr) = start_token_service(bench).await?;
    let calls_before = bench.imds.token_requests();
    let endpoint = Endpoint {
        addr,
        tls: None,
        server_name: "localhost".into(),
    };
    let all = load::concurrent_once(&endpoint, &shape, COLD_REQUESTS).await?;
    let calls = bench.imds.token_requests() - calls_before;
    drop(service);
    Ok((rps, cpu, calls, all.as_secs_f64() * 1e3))
}

async fn start_token_service(
    bench: &Bench,
) -> Result<(tokio::process::Child, std::net::SocketAddr)> {
    let mut child = tokio::process::Command::new(topology::azgate_binary()?)
        .args([
            "token-service",
            "--listen",
            "127.0.0.1:0",
            "--source",
            "imds",
            "--imds-endpoint",
        ])
        .arg(bench.imds.base_url())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting azgate token-service")?;
    let stdout = child.stdout.take().context("token service stdout")?;
    let mut reader = tokio::io::BufReader::new(stdout);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    // Keep reading, so a later line does not meet a closed pipe.
    tokio::task::spawn_local(
        async move { tokio::io::copy(&mut reader, &mut tokio::io::sink()).await },
    );
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .with_context(|| format!("token service said {line:?}"))?
        .parse()?;
    Ok((child, addr))
}

impl Extras {
    pub(crate) fn markdown(&self) -> String {
        let mut out = String::from(
            "## Start-up (median [min–max] of 3 starts, ms)\n\n\
             | gateway | to `/ready` | to the first answered request |\n|---|---|---|\n",
        );
        for (what, ready, first) in &self.starts {
            let _ = writeln!(out, "| {what} | {} | {} |", show(*ready), show(*first));
        }
        let _ = write!(
            out,
            "\n## Memory at {IDLE_CONNECTIONS} idle mTLS connections\n\n\
             | gateway | RSS after one request, MB | with {IDLE_CONNECTIONS} idle mTLS connections, MB |\n|---|---|---|\n"
        );
        for (what, idle, loaded) in &self.idle_memory {
            let _ = writeln!(out, "| {what} | {idle:.1} | {loaded:.1} |");
        }
        let _ = write!(
            out,
            "\n## `azgate token-service`\n\n\
             - cache hits: {:.0} answers/s, {:.1} CPU µs per answer (one process, pinned like the gateways)\n\
             - {COLD_REQUESTS} concurrent cold requests for one identity and resource (connections \
             open first, then every request sent at once): {} upstream (IMDS) call(s), all answered \
             {:.0} ms after the first was sent\n",
            self.token_service_rps,
            self.token_service_cpu_us_per_req,
            self.cold_upstream_calls,
            self.cold_all_ms
        );
        out
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "starts_ms": self.starts.iter().map(|(what, ready, first)| json!({
                "what": what,
                "ready": {"min": ready.min, "median": ready.median, "max": ready.max},
                "first_answer": {"min": first.min, "median": first.median, "max": first.max},
            })).collect::<Vec<_>>(),
            "idle_connections": IDLE_CONNECTIONS,
            "rss_mb_idle_connections": self.idle_memory.iter().map(|(what, idle, loaded)| json!({
                "what": what, "after_one_request": idle, "with_idle_connections": loaded,
            })).collect::<Vec<_>>(),
            "token_service": {
                "cache_hit_answers_per_s": self.token_service_rps,
                "cpu_us_per_answer": self.token_service_cpu_us_per_req,
                "cold_concurrent_requests": COLD_REQUESTS,
                "cold_upstream_calls": self.cold_upstream_calls,
                "cold_all_answered_ms": self.cold_all_ms,
            },
        })
    }
}

fn show(spread: Spread) -> String {
    format!("{:.0} [{:.0}–{:.0}]", spread.median, spread.min, spread.max)
}
