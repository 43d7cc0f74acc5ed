//! `make soak`: a bounded soak of `azgate serve` and of the rendered Envoy configuration (with
//! `azgate token-service` behind `azgate_msi`), side by side, with short-lived tokens so both
//! the filter's cache and the token service refresh under load.
//!
//! Each gateway gets the steady load of `tests/tests/load` (clients in pairs sharing a key, two
//! identities, fixed resources, a pause after each answer) for `--seconds`. The IMDS emulator
//! issues tokens living `--token-lifetime` seconds, so every key is refreshed several times.
//! Every few seconds the run drains what the clients got and what the fake Azure saw (every
//! forwarded request must carry a token for exactly its own identity and resource) and samples
//! `VmRSS` of each gateway process (`/proc/<pid>/status`; for the rendered config, Envoy and the
//! token service).
//!
//! Reports per gateway: requests, unexpected answers (anything but a 200 from upstream: must be
//! 0), p50/p99/max latency, IMDS token requests, and RSS: the first sample, the sample at the end
//! of the warm-up, the last sample, the largest, and the least-squares slope after the warm-up.
//! RSS is flat when the last sample is within `--rss-tolerance-percent` of the post-warm-up one.
//! Exits non-zero on any unexpected answer, any wrong token upstream, or RSS that is not flat.
//!
//! `cargo run -p azgate-tests --example soak -- [--seconds 300] [--runtimes serve,envoy-rendered]
//! [--clients 8] [--pause-ms 10] [--token-lifetime 90] [--sample-seconds 5] [--warmup-seconds 30]
//! [--rss-tolerance-percent 10]` after `make wasm envoy` and `cargo build -p azgate`
//! (`AZGATE_BIN=target/host/azgate` for the optimised build).

#[path = "../tests/load/mod.rs"]
mod load;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use azgate_tests::topology::{Options, Runtime, Topology};
use load::{Answer, Load, LoadSpec};
use tokio::time::Instant;

struct Args {
    seconds: u64,
    runtimes: Vec<Runtime>,
    clients: usize,
    pause: Duration,
    token_lifetime: Duration,
    sample: Duration,
    warmup: Duration,
    rss_tolerance_percent: f64,
}

fn args() -> Result<Args> {
    let mut args = Args {
        seconds: 300,
        runtimes: vec![Runtime::Serve, Runtime::EnvoyRendered],
        clients: 8,
        pause: Duration::from_millis(10),
        token_lifetime: Duration::from_secs(90),
        sample: Duration::from_secs(5),
        warmup: Duration::from_secs(30),
        rss_tolerance_percent: 10.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--seconds" => args.seconds = value.parse()?,
            "--runtimes" => {
                args.runtimes = value
                    .split(',')
                    .map(|name| match name.trim() {
                        "serve" => Ok(Runtime::Serve),
                        "envoy-rendered" => Ok(Runtime::EnvoyRendered),
                        "envoy" => Ok(Runtime::Envoy),
                        other => bail!("unknown runtime {other:?}"),
                    })
                    .collect::<Result<_>>()?;
            }
            "--clients" => args.clients = value.parse()?,
            "--pause-ms" => args.pause = Duration::from_millis(value.parse()?),
            "--token-lifetime" => args.token_lifetime = Duration::from_secs(value.parse()?),
            "--sample-seconds" => args.sample = Duration::from_secs(value.parse()?),
            "--warmup-seconds" => args.warmup = Duration::from_secs(value.parse()?),
            "--rss-tolerance-percent" => args.rss_tolerance_percent = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    ensure!(args.seconds > 0, "--seconds must be positive");
    ensure!(!args.sample.is_zero(), "--sample-seconds must be positive");
    Ok(args)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = std::sync::Arc::new(args()?);
    println!(
        "soak: {} s, {} clients per gateway ({} ms pause), tokens live {} s, RSS every {} s \
         (flat: last within {} % of the sample after a {} s warm-up)",
        args.seconds,
        args.clients,
        args.pause.as_millis(),
        args.token_lifetime.as_secs(),
        args.sample.as_secs(),
        args.rss_tolerance_percent,
        args.warmup.as_secs(),
    );
    let handles: Vec<_> = args
        .runtimes
        .iter()
        .map(|&runtime| {
            let args = args.clone();
            tokio::spawn(async move { (runtime, soak(runtime, &args).await) })
        })
        .collect();
    let mut failed = Vec::new();
    for handle in handles {
        let (runtime, result) = handle.await?;
        match result {
            Ok(report) => {
                print!("{}", report.text);
                if !report.problems.is_empty() {
                    failed.push(format!(
                        "{}: {}",
                        runtime.name(),
                        report.problems.join("; ")
                    ));
                }
            }
            Err(error) => failed.push(format!("{}: {error:#}", runtime.name())),
        }
    }
    if !failed.is_empty() {
        bail!("soak failed:\n{}", failed.join("\n"));
    }
    println!("soak passed");
    Ok(())
}

struct Report {
    text: String,
    problems: Vec<String>,
}

/// RSS samples of one process: (seconds since start, KiB).
struct Series {
    name: String,
    pid: u32,
    samples: Vec<(f64, u64)>,
}

async fn soak(runtime: Runtime, args: &Args) -> Result<Report> {
    let topology = Topology::start(
        runtime,
        Options {
            plugin_config: load::plugin_config(serde_json::json!({})),
            concurrency: 2,
            in_process_token_service: true,
            ..Options::default()
        },
    )
    .await
    .with_context(|| format!("starting {}", runtime.name()))?;
    topology.imds.set_token_lifetime(args.token_lifetime);
    let mut series: Vec<Series> = load::processes_under(topology.gateway.dir())
        .into_iter()
        .map(|(pid, name)| Series {
            name,
            pid,
            samples: Vec::new(),
        })
        .collect();
    ensure!(
        !series.is_empty(),
        "no gateway process found for {}",
        topology.gateway.dir().display()
    );
    let load = Load::start(
        &topology,
        &LoadSpec {
            clients: args.clients,
            pause: args.pause,
            rotate_every: None,
            request_timeout: Duration::from_secs(30),
        },
    )?;
    let start = Instant::now();
    let end = start + Duration::from_secs(args.seconds);
    let mut totals = Totals::default();
    let mut next = start;
    loop {
        for process in &mut series {
            if let Some(kib) = load::rss_kib(process.pid) {
                process.samples.push((start.elapsed().as_secs_f64(), kib));
            }
        }
        totals.absorb(load.drain());
        totals.forwarded_checked += load::check_forwarded(&topology.azure.take_seen())?;
        if Instant::now() >= end {
            break;
        }
        next += args.sample;
        tokio::time::sleep_until(next.min(end)).await;
    }
    totals.absorb(load.stop().await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    totals.forwarded_checked += load::check_forwarded(&topology.azure.take_seen())?;

    let mut problems = Vec::new();
    let mut text = String::new();
    let name = runtime.name();
    let mut latencies = std::mem::take(&mut totals.latencies);
    let p50 = load::percentile(&mut latencies, 50.0);
    let p99 = load::percentile(&mut latencies, 99.0);
    let max = latencies.last().copied().unwrap_or_default();
    let seconds = start.elapsed().as_secs_f64();
    writeln!(
        text,
        "{name}: {} requests in {seconds:.0} s ({:.0}/s), {} unexpected, latency p50 {:.2} ms, \
         p99 {:.2} ms, max {:.1} ms",
        totals.requests,
        totals.requests as f64 / seconds,
        totals.unexpected_count(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3,
    )?;
    writeln!(
        text,
        "{name}: upstream saw {} requests, each with its own key's MSI token; IMDS: {} token \
         requests ({} tokens issued; busiest second {})",
        totals.forwarded_checked,
        topology.imds.token_requests(),
        topology.imds.issued_tokens(),
        topology.imds.peak_token_requests(Duration::from_secs(1)),
    )?;
    if totals.unexpected_count() > 0 {
        problems.push(format!("unexpected answers: {:?}", totals.unexpected));
    }
    if totals.forwarded_checked != totals.forwarded {
        problems.push(format!(
            "the upstream saw {} requests but {} were answered 200",
            totals.forwarded_checked, totals.forwarded
        ));
    }
    for process in &series {
        let (summary, flat) = rss_summary(process, args);
        writeln!(
            text,
            "{name}: RSS {} (pid {}): {summary}",
            process.name, process.pid
        )?;
        if !flat {
            problems.push(format!("RSS of {} is not flat: {summary}", process.name));
        }
        writeln!(text, "{name}:   {}", rss_series(process, args))?;
    }
    Ok(Report { text, problems })
}

#[derive(Default)]
struct Totals {
    requests: u64,
    forwarded: usize,
    forwarded_checked: usize,
    unexpected: BTreeMap<String, u64>,
    latencies: Vec<Duration>,
}

impl Totals {
    fn absorb(&mut self, outcomes: Vec<load::Outcome>) {
        for outcome in outcomes {
            self.requests += 1;
            self.latencies.push(outcome.latency);
            if outcome.answer == Answer::Forwarded {
                self.forwarded += 1;
            } else {
                *self.unexpected.entry(outcome.label()).or_default() += 1;
            }
        }
    }

    fn unexpected_count(&self) -> u64 {
        self.unexpected.values().sum()
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// First, post-warm-up, last and largest sample, the slope after the warm-up, and whether the
/// last is within the tolerance of the post-warm-up sample.
fn rss_summary(process: &Series, args: &Args) -> (String, bool) {
    let samples = &process.samples;
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return ("no samples".into(), false);
    };
    let warm = samples
        .iter()
        .find(|(t, _)| *t >= args.warmup.as_secs_f64())
        .unwrap_or(first);
    let largest = samples.iter().map(|(_, kib)| *kib).max().unwrap_or(0);
    let after: Vec<(f64, f64)> = samples
        .iter()
        .filter(|(t, _)| *t >= warm.0)
        .map(|(t, kib)| (*t, *kib as f64))
        .collect();
    let slope_kib_per_min = least_squares_slope(&after) * 60.0;
    let growth = (last.1 as f64 - warm.1 as f64) / warm.1 as f64 * 100.0;
    let flat = growth <= args.rss_tolerance_percent;
    (
        format!(
            "first {:.1} MiB (t={:.0} s), after warm-up {:.1} MiB (t={:.0} s), last {:.1} MiB \
             (t={:.0} s), max {:.1} MiB; last vs after warm-up {growth:+.1} % (tolerance {} %), \
             slope {slope_kib_per_min:+.0} KiB/min -> {}",
            mib(first.1),
            first.0,
            mib(warm.1),
            warm.0,
            mib(last.1),
            last.0,
            mib(largest),
            args.rss_tolerance_percent,
            if flat { "flat" } else { "GROWING" },
        ),
        flat,
    )
}

/// One sample every ~30 s, compactly.
fn rss_series(process: &Series, args: &Args) -> String {
    let every = (30 / args.sample.as_secs().max(1)).max(1) as usize;
    let mut points: Vec<String> = process
        .samples
        .iter()
        .step_by(every)
        .map(|(t, kib)| format!("{t:.0}s {:.1}", mib(*kib)))
        .collect();
    if let Some((t, kib)) = process.samples.last()
        && process.samples.len() % every != 1
    {
        points.push(format!("{t:.0}s {:.1}", mib(*kib)));
    }
    format!("RSS MiB: {}", points.join(", "))
}

fn least_squares_slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mean_x = points.iter().map(|(x, _)| x).sum::<f64>() / n;
    let mean_y = points.iter().map(|(_, y)| y).sum::<f64>() / n;
    let covariance: f64 = points
        .iter()
        .map(|(x, y)| (x - mean_x) * (y - mean_y))
        .sum();
    let variance: f64 = points.iter().map(|(x, _)| (x - mean_x).powi(2)).sum();
    if variance == 0.0 {
        0.0
    } else {
        covariance / variance
    }
}
