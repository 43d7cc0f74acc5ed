//! Token-service faults under load: while eight clients keep requests flowing through a gateway,
//! the IMDS emulator behind the token path fails in each way Azure documents, then recovers.
//!
//! Runtimes (`AZGATE_RUNTIMES`, all three by default, run at the same time):
//! - `serve`: `azgate serve` with the token module in-process behind `azgate_msi`;
//! - `envoy-rendered`: the Envoy config `azgate envoy-config` renders, with `azgate token-service`
//!   (on a unix socket) behind `azgate_msi`;
//! - `envoy`: the test Envoy, whose `azgate_msi` is the emulator itself (the filter's own
//!   handling, with no token service in between).
//!
//! The load ([`load`]): 8 clients in 4 pairs (two identities; a pair shares a key so both
//! workers race for it), each sending one request, then pausing 40 ms. Two pairs keep their
//! resource, whose 8 s tokens expire and are refreshed in place; two move to a new resource
//! every 3 s, so they miss every cache. The filter's call-out timeout is 1 s.
//!
//! Faults, one after the other, each set by the emulator's schedule and lifted by it:
//!
//! | fault | for | IMDS meaning |
//! |---|---|---|
//! | 429 with `Retry-After: 2` | 8 s | throttled |
//! | 410 | 20 s (`AZGATE_FAULTS_GONE_SECONDS`; IMDS says up to 70 s) | identity not ready / IMDS updating |
//! | 500 | 6 s | server error |
//! | hang | 6 s | never answers (stuck connections stay stuck) |
//! | malformed JSON | 6 s | 200 with a truncated body |
//!
//! The 410 window is shortened from the 60 s of a real IMDS update so the suite stays under
//! three minutes; it keeps the shape that matters: longer than the token service's 10 s 410
//! retry interval (so retries happen during the outage) and within its 70 s 410 budget (so the
//! fetch in flight is what recovers). `AZGATE_FAULTS_GONE_SECONDS=60` runs the real length.
//!
//! Asserted for every request from the fault's start to the end of recovery:
//! - answered, within the filter's longest pause (settle + a stale claim taken over + a
//!   call-out: 2 × (1 s + 1 s) + 10 ms) plus 1.5 s of margin;
//! - 200 from the upstream, or a documented token refusal (502 `InvalidTokenServiceResponse`,
//!   503 `TokenUnavailable`, 504 `TokenServiceTimeout`) in azgate's JSON error shape; nothing
//!   else, no 500;
//! - the fault was seen (some request was refused), and the gateway recovered: within N s of
//!   the fault clearing every request is a 200 again, for 3 s on end (N = 5 s for `envoy`:
//!   the next request fetches again; N = 15 s with a token service: its fetch in flight has to
//!   reach its next retry, at most 10 s for 410 and for a hang (the attempt timeout));
//! - with a token service, IMDS saw at most the token service's documented traffic: per
//!   key, no more attempts in the fault window than one fetch's retry schedule allows (one
//!   fetch per key: single-flight; `Retry-After` and the backoff honoured), at most 20
//!   requests in any 950 ms (its 20/s limit spaces starts by 50 ms; 50 ms are left for
//!   loopback jitter) and at most 5 at once (6 while hung attempts are abandoned: the emulator
//!   sees an abandoned connection close a moment after the token service starts the next
//!   attempt); without one (`envoy`), at most one IMDS call per
//!   request (the filter does not retry or amplify);
//! - every request the fake Azure saw carried a token for exactly its own identity and resource,
//!   and it saw exactly the requests answered 200 (nothing refused was forwarded).
//!
//! Run: `make wasm envoy && cargo build -p azgate && cargo test -p azgate-tests --test faults -- --nocapture`.

mod load;

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use azgate::token::{ProviderConfig, RetryPolicy};
use azgate_emulator::{Fault, busiest_window};
use azgate_tests::topology::{Options, Runtime, Topology};
use load::{Answer, Load, LoadSpec, Outcome};
use tokio::time::Instant;

/// Clients of the load (four pairs).
const CLIENTS: usize = 8;
/// The filter's call-out timeout.
const TOKEN_TIMEOUT_MS: u64 = 1000;
/// The filter's tick while a request waits (its default).
const TOKEN_WAIT_POLL_MS: u64 = 10;
/// Lifetime of emulated tokens: short, so cached tokens expire during every fault.
const TOKEN_LIFETIME: Duration = Duration::from_secs(8);
/// A healthy stretch before the first fault.
const BASELINE: Duration = Duration::from_secs(3);
/// Recovered means this long with nothing but 200s (and every client answered).
const STEADY: Duration = Duration::from_secs(3);
/// Latency allowance beyond the filter's own bound, for a loaded two-core machine.
const LATENCY_MARGIN: Duration = Duration::from_millis(1500);
/// The token service's starts per second toward IMDS ([`ProviderConfig`]'s default) and the
/// window they are counted in (1 s less loopback jitter).
const RATE_WINDOW: Duration = Duration::from_millis(950);

struct Phase {
    name: &'static str,
    fault: Fault,
    duration: Duration,
}

fn phases() -> Result<Vec<Phase>> {
    let gone = match std::env::var("AZGATE_FAULTS_GONE_SECONDS") {
        Ok(seconds) => seconds
            .parse()
            .context("AZGATE_FAULTS_GONE_SECONDS must be whole seconds")?,
        Err(_) => 20,
    };
    Ok(vec![
        Phase {
            name: "429 storm, Retry-After: 2",
            fault: Fault::StatusRetryAfter(429, 2),
            duration: Duration::from_secs(8),
        },
        Phase {
            name: "410 identity not ready",
            fault: Fault::Status(410),
            duration: Duration::from_secs(gone),
        },
        Phase {
            name: "500 server error",
            fault: Fault::Status(500),
            duration: Duration::from_secs(6),
        },
        Phase {
            name: "hang",
            fault: Fault::Hang,
            duration: Duration::from_secs(6),
        },
        Phase {
            name: "malformed JSON",
            fault: Fault::MalformedJson,
            duration: Duration::from_secs(6),
        },
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_faults_under_load() -> Result<()> {
    let runtimes = Runtime::selected();
    ensure!(!runtimes.is_empty(), "AZGATE_RUNTIMES selects no runtime");
    let results = futures_join_all(runtimes.iter().map(|&runtime| async move {
        let result = run(runtime).await;
        (runtime, result)
    }))
    .await;
    let mut failures = Vec::new();
    for (runtime, result) in results {
        match result {
            Ok(report) => println!("{report}"),
            Err(error) => failures.push(format!("{}: {error:#}", runtime.name())),
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("\n\n"));
    }
    Ok(())
}

/// Runs the futures concurrently on this runtime (each runtime's gateway is a separate
/// process; the clients are tasks).
async fn futures_join_all<F, T>(futures: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut results = Vec::new();
    for handle in handles {
        match handle.await {
            Ok(result) => results.push(result),
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }
    results
}

fn has_token_service(runtime: Runtime) -> bool {
    runtime != Runtime::Envoy
}

/// The longest a request may stay paused for its token (the filter's waiter budget).
fn filter_bound() -> Duration {
    Duration::from_millis(2 * (TOKEN_TIMEOUT_MS + 1000) + TOKEN_WAIT_POLL_MS)
}

fn recovery_bound(runtime: Runtime) -> Duration {
    if has_token_service(runtime) {
        Duration::from_secs(15)
    } else {
        Duration::from_secs(5)
    }
}

/// The most IMDS attempts one token-service fetch can make within `window` of `fault`: the
/// retry schedule of [`RetryPolicy::default`] with every delay at its shortest (the policy's
/// jitter is ±20 %), each hanging attempt lasting the attempt timeout.
fn max_attempts(fault: &Fault, window: Duration) -> usize {
    let policy = RetryPolicy::default();
    let config = ProviderConfig::default();
    let shortest_backoff = |retries: u32| {
        policy
            .initial_backoff
            .saturating_mul(1 << retries)
            .mul_f64(0.8)
    };
    let mut at = Duration::ZERO;
    let mut attempts = 0;
    let mut retries = 0;
    while at < window {
        attempts += 1;
        let (lasts, delay) = match fault {
            Fault::Status(410) | Fault::StatusRetryAfter(410, _) => {
                (Duration::ZERO, policy.gone_interval)
            }
            _ if retries >= policy.max_retries => break,
            Fault::Hang => (config.attempt_timeout, shortest_backoff(retries)),
            Fault::StatusRetryAfter(_, seconds) => (
                Duration::ZERO,
                shortest_backoff(retries).max(Duration::from_secs(*seconds)),
            ),
            _ => (Duration::ZERO, shortest_backoff(retries)),
        };
        at += lasts + delay;
        retries += 1;
    }
    attempts
}

async fn run(runtime: Runtime) -> Result<String> {
    let options = Options {
        plugin_config: load::plugin_config(serde_json::json!({
            "token_timeout_ms": TOKEN_TIMEOUT_MS,
            "token_wait_poll_ms": TOKEN_WAIT_POLL_MS,
        })),
        concurrency: 2,
        in_process_token_service: has_token_service(runtime),
        ..Options::default()
    };
    let topology = Topology::start(runtime, options)
        .await
        .with_context(|| format!("starting {}", runtime.name()))?;
    topology.imds.set_token_lifetime(TOKEN_LIFETIME);
    let spec = LoadSpec {
        clients: CLIENTS,
        pause: Duration::from_millis(40),
        rotate_every: Some(Duration::from_secs(3)),
        request_timeout: filter_bound() + Duration::from_secs(10),
    };
    let load = Load::start(&topology, &spec)?;
    let mut report = String::new();
    let result = drive(runtime, &topology, &load, &mut report).await;
    let checked = load.len();
    let outcomes = load.stop().await;
    result.map_err(|error| {
        anyhow::anyhow!(
            "{error:#}\n{report}--- gateway log tail ---\n{}",
            log_tail(&topology)
        )
    })?;
    check_answers(outcomes.get(checked..).unwrap_or_default())
        .context("requests answered after the last phase")?;

    // What reached "Azure": a token for exactly the request's key, and only the 200s.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = topology.azure.seen();
    let forwarded = load::check_forwarded(&seen)?;
    let answered_200 = outcomes
        .iter()
        .filter(|o| o.answer == Answer::Forwarded)
        .count();
    ensure!(
        forwarded == answered_200,
        "the upstream saw {forwarded} requests but {answered_200} were answered 200"
    );

    // The token service's limits toward IMDS, over the whole run.
    let arrivals = topology.imds.token_request_times();
    let busiest = busiest_window(&arrivals, RATE_WINDOW);
    let busiest_second = busiest_window(&arrivals, Duration::from_secs(1));
    let limits = ProviderConfig::default();
    report.push_str(&format!(
        "{}: {} requests, {answered_200} forwarded (each with its own key's token); IMDS: {} \
         requests, busiest 1 s {busiest_second}, busiest {RATE_WINDOW:?} {busiest}\n",
        runtime.name(),
        outcomes.len(),
        arrivals.len(),
    ));
    if has_token_service(runtime) {
        ensure!(
            busiest <= limits.max_requests_per_second as usize,
            "{busiest} IMDS requests within {RATE_WINDOW:?} (limit {}/s)\n{report}",
            limits.max_requests_per_second
        );
    }
    Ok(report)
}

fn log_tail(topology: &Topology) -> String {
    let log = topology.gateway.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The baseline, then each fault and its recovery, writing the per-phase table to `table`.
async fn drive(
    runtime: Runtime,
    topology: &Topology,
    load: &Load,
    table: &mut String,
) -> Result<()> {
    let name = runtime.name();
    table.push_str(&format!(
        "{name}: {:<28} {:>5} {:>5} {:>5} {:>5} {:>5} {:>8} {:>8} {:>9} {:>6} {:>8} {:>7}\n",
        "phase",
        "reqs",
        "200",
        "502",
        "503",
        "504",
        "p50",
        "max",
        "recovery",
        "imds",
        "per key",
        "at once"
    ));
    tokio::time::sleep(BASELINE).await;
    // Phases check outcomes by completion, so each request is checked exactly once.
    let mut cursor = load.len();
    let baseline = load
        .outcomes_from(0)
        .get(..cursor)
        .unwrap_or_default()
        .to_vec();
    ensure!(
        !baseline.is_empty(),
        "no request was answered in the baseline"
    );
    if let Some(bad) = baseline.iter().find(|o| o.answer != Answer::Forwarded) {
        bail!("the baseline (no fault) had {}", bad.label());
    }
    table.push_str(&row(name, "baseline", &baseline, None, None));

    let limits = ProviderConfig::default();
    for phase in phases()? {
        topology.imds.reset_peak_in_flight();
        let start = Instant::now();
        let clear = topology
            .imds
            .schedule_faults([(phase.duration, phase.fault.clone())]);
        tokio::time::sleep_until(clear).await;
        let recovered_after = wait_recovered(runtime, load, clear)
            .await
            .with_context(|| format!("{}: not recovered", phase.name))?;
        let outcomes = load.outcomes_from(cursor);
        cursor += outcomes.len();

        // IMDS traffic during the fault window.
        let window: Vec<_> = topology
            .imds
            .requests()
            .into_iter()
            .filter(|r| r.received_at >= start && r.received_at < clear)
            .filter(|r| r.path() == azgate_emulator::IMDS_TOKEN_PATH)
            .collect();
        let mut per_key: HashMap<(String, String), usize> = HashMap::new();
        for request in &window {
            let key = (
                request
                    .query_param("msi_res_id")
                    .unwrap_or_default()
                    .to_ascii_lowercase(),
                request.query_param("resource").unwrap_or_default(),
            );
            *per_key.entry(key).or_default() += 1;
        }
        let busiest_key = per_key.values().copied().max().unwrap_or(0);
        let at_once = topology.imds.peak_in_flight_token_requests();
        table.push_str(&row(
            name,
            phase.name,
            &outcomes,
            Some(recovered_after),
            Some((window.len(), busiest_key, at_once)),
        ));

        check_answers(&outcomes).with_context(|| phase.name)?;
        ensure!(
            outcomes
                .iter()
                .any(|o| o.started < clear && o.answer != Answer::Forwarded),
            "{}: no request was refused during the fault, so it never reached the clients",
            phase.name
        );
        if has_token_service(runtime) {
            let allowed = max_attempts(&phase.fault, phase.duration);
            ensure!(
                busiest_key <= allowed,
                "{}: one key got {busiest_key} IMDS requests in {:?} (one fetch retries at most \
                 {allowed} times in that window): {per_key:?}",
                phase.name,
                phase.duration
            );
            // A hung attempt the token service gives up on frees its slot at once, but the
            // emulator counts it until it reads the connection's close, which can arrive a
            // moment after the next attempt (measured: 6 in about one run of three). Abandoned
            // attempts end 50 ms apart (their starts were spaced by the rate limit), so at
            // most one overlaps.
            let abandoned_overlap = usize::from(phase.fault == Fault::Hang);
            ensure!(
                at_once <= limits.max_concurrent_requests + abandoned_overlap,
                "{}: {at_once} IMDS requests at once (limit {}, +{abandoned_overlap} for an \
                 abandoned attempt still closing)",
                phase.name,
                limits.max_concurrent_requests
            );
        } else {
            let sent = outcomes
                .iter()
                .filter(|o| o.started + filter_bound() >= start && o.started < clear)
                .count();
            ensure!(
                window.len() <= sent,
                "{}: {} IMDS calls for {sent} requests",
                phase.name,
                window.len()
            );
        }
    }
    Ok(())
}

/// Waits until, after the last refusal, every request has been a 200 for [`STEADY`]: every
/// client has sent a request after that stretch, so (clients being sequential) all requests of
/// the stretch are answered. Returns how long after `clear` the last refusal ended; fails once
/// that exceeds the runtime's recovery bound.
async fn wait_recovered(runtime: Runtime, load: &Load, clear: Instant) -> Result<Duration> {
    let bound = recovery_bound(runtime);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = Instant::now();
        let since_clear = load.outcomes_since(clear);
        let last_refusal = since_clear
            .iter()
            .filter(|o| o.answer != Answer::Forwarded)
            .map(Outcome::ended)
            .max();
        let good_since = last_refusal.unwrap_or(clear).max(clear);
        let recovered_after = good_since - clear;
        ensure!(
            recovered_after <= bound,
            "requests still refused {recovered_after:?} after the fault cleared (bound {bound:?}); last: {}",
            since_clear
                .iter()
                .rev()
                .find(|o| o.answer != Answer::Forwarded)
                .map(Outcome::label)
                .unwrap_or_default()
        );
        let past_steady: std::collections::BTreeSet<usize> = since_clear
            .iter()
            .filter(|o| o.started >= good_since + STEADY)
            .map(|o| o.client)
            .collect();
        if past_steady.len() == CLIENTS {
            return Ok(recovered_after);
        }
        ensure!(
            now - clear <= bound + STEADY + filter_bound(),
            "not every client was answered within {bound:?} + {STEADY:?} of the fault clearing"
        );
    }
}

/// Every request answered in time, with a 200 from upstream or a documented token refusal.
fn check_answers(outcomes: &[Outcome]) -> Result<()> {
    let limit = filter_bound() + LATENCY_MARGIN;
    for outcome in outcomes {
        match &outcome.answer {
            Answer::Forwarded => {}
            Answer::Refused { status, code } => ensure!(
                load::TOKEN_REFUSALS
                    .iter()
                    .any(|(s, c)| s == status && c == code),
                "undocumented answer {status} {code}"
            ),
            other => bail!("client {}: {other:?}", outcome.client),
        }
        ensure!(
            outcome.latency <= limit,
            "client {} waited {:?} for {} (bound {limit:?})",
            outcome.client,
            outcome.latency,
            outcome.label()
        );
    }
    Ok(())
}

fn row(
    runtime: &str,
    phase: &str,
    outcomes: &[Outcome],
    recovered_after: Option<Duration>,
    imds: Option<(usize, usize, usize)>,
) -> String {
    let count = |status: u16| {
        outcomes
            .iter()
            .filter(|o| match &o.answer {
                Answer::Forwarded => status == 200,
                Answer::Refused { status: s, .. } => *s == status,
                _ => false,
            })
            .count()
    };
    let mut latencies: Vec<Duration> = outcomes.iter().map(|o| o.latency).collect();
    let p50 = load::percentile(&mut latencies, 50.0);
    let max = latencies.last().copied().unwrap_or_default();
    let (calls, per_key, at_once) = imds.map_or(
        ("-".into(), "-".into(), "-".into()),
        |(calls, per_key, at_once)| (calls.to_string(), per_key.to_string(), at_once.to_string()),
    );
    format!(
        "{runtime}: {phase:<28} {:>5} {:>5} {:>5} {:>5} {:>5} {:>6}ms {:>6}ms {:>9} {calls:>6} {per_key:>8} {at_once:>7}\n",
        outcomes.len(),
        count(200),
        count(502),
        count(503),
        count(504),
        p50.as_millis(),
        max.as_millis(),
        recovered_after.map_or("-".into(), |d| format!("{:.1}s", d.as_secs_f64())),
    )
}

#[test]
fn retry_schedule_bounds_match_the_policy() {
    // 429 + Retry-After 2 over 8 s: 0, 2, 4, 7.2 → 4 attempts.
    assert_eq!(
        max_attempts(&Fault::StatusRetryAfter(429, 2), Duration::from_secs(8)),
        4
    );
    // 410 every 10 s: 0, 10 within 20 s; 0..60 in 70 s.
    assert_eq!(
        max_attempts(&Fault::Status(410), Duration::from_secs(20)),
        2
    );
    assert_eq!(
        max_attempts(&Fault::Status(410), Duration::from_secs(61)),
        7
    );
    // 500: 0, 0.8, 2.4, 5.6 within 6 s.
    assert_eq!(max_attempts(&Fault::Status(500), Duration::from_secs(6)), 4);
    // A hanging attempt lasts 10 s.
    assert_eq!(max_attempts(&Fault::Hang, Duration::from_secs(6)), 1);
    // Never more than 1 + max_retries outside 410.
    assert_eq!(
        max_attempts(&Fault::Status(500), Duration::from_secs(3600)),
        6
    );
}
