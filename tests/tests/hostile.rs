//! The hostile corpus: every case in `tests/cases/hostile/*.json` sent with raw bytes (HTTP/1.1
//! written verbatim, HTTP/2 frames built by hand) through each selected runtime, one topology per
//! runtime, cases in parallel.
//!
//! A case fails on any answer other than the one it states (or its runtime's pin), and whatever
//! it states on: a 5xx, no answer in time, the upstream seeing its marker when it was refused,
//! an IMDS call for a refused request, an upstream request that is not exactly what the filter
//! grants. After the cases, each runtime must show no trap (the gateway log, serve's VM restarts,
//! Envoy's wasm failure counters) and still serve allowed requests on fresh connections; the
//! counts per runtime are printed.
//!
//! Run with `cargo test -p azgate-tests --test hostile` after `make wasm envoy` and
//! `cargo build -p azgate`; `AZGATE_RUNTIMES=serve` picks runtimes, a name filter picks cases
//! (`-- serve::jws`), `AZGATE_KEEP_LOGS=1` keeps gateway logs.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};
use azgate_tests::hostile_pki::{CertSpec, HostileKey, HostilePki, KeyChoice, Minted};
use azgate_tests::raw::{self, Answer, ClientIdentity, H1Conn, H2Conn, H2Request, Response};
use azgate_tests::topology::{Options, Runtime, Topology};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use libtest_mimic::{Arguments, Failed, Trial};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

/// Longest a case may take to be answered before it counts as a hang.
const CASE_DEADLINE: Duration = Duration::from_secs(15);
/// The path every case's request starts with; the marker follows.
const PATH_PREFIX: &str = "/hostile/";
/// Cases in flight at once per process (the gateways have two workers each).
const PARALLEL_CASES: usize = 12;

#[path = "hostile/cases.rs"]
mod cases;
#[path = "hostile/run.rs"]
mod run;
#[path = "hostile/tokens.rs"]
mod tokens;

use cases::*;
use run::*;
use tokens::*;

// === after the cases ===

/// The gateway's admin address, read from the configuration the topology wrote.
fn admin_address(topology: &Topology, runtime: Runtime) -> Option<String> {
    let dir = topology.gateway.dir();
    if runtime == Runtime::Envoy {
        let text = std::fs::read_to_string(dir.join("envoy.yaml")).ok()?;
        let admin = &text[text.find("admin:")?..];
        let port_at = admin.find("port_value:")? + "port_value:".len();
        let port: String = admin[port_at..]
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        return Some(format!("127.0.0.1:{port}"));
    }
    let text = std::fs::read_to_string(dir.join("azgate.yaml")).ok()?;
    let config: serde_json::Value = serde_json::from_str(&text).ok()?;
    config["admin"]["address"].as_str().map(str::to_string)
}

/// What a runtime shows of trapped or failed VMs.
struct Traps {
    /// Traps counted: serve's VM restarts, or Envoy's failed wasm calls in its log.
    count: u64,
    /// A few log lines saying so.
    examples: Vec<String>,
    /// Envoy's non-zero wasm statistics (VMs created and active), for the record.
    stats: Vec<String>,
}

/// Reads `runtime`'s trap evidence: serve counts VM restarts in `/metrics` and logs "filter VM
/// failed"; Envoy logs "Function: proxy_on_… failed" for every failed wasm call (its stats only
/// count VMs, which a FAIL_RELOAD replacement also raises).
async fn traps(topology: &Topology, runtime: Runtime) -> Result<Traps> {
    let log = topology.gateway.log();
    let marker = match runtime {
        Runtime::Serve => "filter VM failed",
        Runtime::Envoy | Runtime::EnvoyRendered => "wasm_vm.cc",
    };
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(marker) && (runtime == Runtime::Serve || l.contains(" failed")))
        .collect();
    let mut traps = Traps {
        count: failed.len() as u64,
        examples: failed
            .iter()
            .take(3)
            .map(|l| l.chars().take(240).collect())
            .collect(),
        stats: Vec::new(),
    };
    let admin = admin_address(topology, runtime)
        .ok_or_else(|| anyhow!("the gateway's admin address is not in its configuration"))?;
    let client = reqwest::Client::builder().no_proxy().build()?;
    match runtime {
        Runtime::Serve => {
            let metrics = client
                .get(format!("http://{admin}/metrics"))
                .send()
                .await?
                .text()
                .await?;
            let restarts = metrics
                .lines()
                .find_map(|l| l.strip_prefix("azgate_vm_restarts_total "))
                .and_then(|n| n.trim().parse::<u64>().ok())
                .ok_or_else(|| anyhow!("no azgate_vm_restarts_total in /metrics"))?;
            traps.count = traps.count.max(restarts);
        }
        Runtime::Envoy | Runtime::EnvoyRendered => {
            let stats = client
                .get(format!("http://{admin}/stats"))
                .send()
                .await?
                .text()
                .await?;
            for line in stats.lines() {
                if let Some((name, value)) = line.split_once(": ")
                    && name.contains("wasm")
                    && value.trim().parse::<u64>().is_ok_and(|v| v > 0)
                {
                    traps.stats.push(format!("{name}={}", value.trim()));
                    // FAIL_RELOAD replaces a failed VM; each success is one trap survived.
                    if name.ends_with("vm_reload_success") {
                        let reloads = value.trim().parse::<u64>().unwrap_or_default();
                        traps.count = traps.count.max(reloads);
                    }
                }
            }
        }
    }
    Ok(traps)
}

/// Allowed requests on fresh connections, both protocols: every one must be served.
async fn still_serves(topology: &Topology, pki: &HostilePki, suite: &Suite) -> Result<()> {
    let template = suite
        .cases
        .first()
        .cloned()
        .ok_or_else(|| anyhow!("no cases"))?;
    for n in 0..6 {
        let protocol = if n % 2 == 0 {
            Protocol::H1
        } else {
            Protocol::H2
        };
        let probe = Concrete {
            marker: format!("health{n}"),
            protocol,
            ..template.clone()
        };
        follow_up(topology, pki, suite, &probe, None)
            .await
            .with_context(|| format!("health request {n} ({})", protocol.name()))?;
    }
    Ok(())
}

fn failed(error: anyhow::Error) -> Failed {
    format!("{error:#}").into()
}

fn main() -> std::process::ExitCode {
    let mut args = Arguments::from_args();
    if args.test_threads.is_none() {
        args.test_threads = Some(PARALLEL_CASES);
    }
    let rt = match azgate_tests::runner_runtime() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("cannot start tokio: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let suite = match load_suite() {
        Ok(suite) => Arc::new(suite),
        Err(err) => {
            eprintln!("cannot load tests/cases/hostile: {err:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let results = Arc::new(Results::default());
    let mut trials = Vec::new();
    let mut topologies = Vec::new();
    for gateway in Runtime::selected() {
        let name = gateway.name();
        let config = serde_json::json!({ "roles": suite.roles });
        let shared = Arc::new(Shared {
            runtime: gateway,
            options: Options {
                plugin_config: config.to_string(),
                concurrency: 2,
                // Short enough that a request which never ends is answered before the
                // runner calls it a hang (15 s).
                request_timeout_ms: Some(8_000),
                ..Options::default()
            },
            identities: suite.identities.clone(),
            cell: OnceCell::new(),
        });
        topologies.push(shared.clone());
        for case in &suite.cases {
            let (rt, suite, shared, case, results) = (
                rt.clone(),
                suite.clone(),
                shared.clone(),
                case.clone(),
                results.clone(),
            );
            trials.push(Trial::test(format!("{name}::{}", case.id), move || {
                let mut observed = None;
                let result = rt.block_on(run_case(&shared, &suite, &case, &mut observed));
                results.record(
                    name,
                    &case,
                    Row {
                        marker: case.marker.clone(),
                        category: case.category.clone(),
                        observed,
                        passed: result.is_ok(),
                        refused_expected: case.all_refused(name),
                    },
                );
                result.map_err(failed)
            }));
        }
    }
    println!(
        "hostile corpus: {} cases per runtime, runtimes {:?}",
        suite.cases.len(),
        Runtime::selected()
            .iter()
            .map(|r| r.name())
            .collect::<Vec<_>>()
    );
    let conclusion = libtest_mimic::run(&args, trials);
    let after = rt.block_on(summarise(&topologies, &suite, &results));
    drop(topologies);
    match after {
        Ok(true) => conclusion.exit_code(),
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(error) => {
            eprintln!("hostile corpus: the checks after the cases failed: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Prints the counts per runtime, checks every runtime for traps and that it still serves.
/// `Ok(false)` if any runtime fails a check.
async fn summarise(topologies: &[Arc<Shared>], suite: &Suite, results: &Results) -> Result<bool> {
    let rows = results
        .rows
        .lock()
        .map_err(|_| anyhow!("results poisoned"))?
        .clone();
    let mut healthy = true;
    println!(
        "\nhostile corpus per runtime:\n{:<16} {:>6} {:>7} {:>7} {:>8} {:>10} {:>16} {:>5} {:>6} {:>6}",
        "runtime",
        "cases",
        "passed",
        "failed",
        "refused",
        "forwarded",
        "forwarded-bad",
        "5xx",
        "hangs",
        "traps"
    );
    for shared in topologies {
        let name = shared.runtime.name();
        let mine: Vec<&Row> = rows
            .iter()
            .filter(|((runtime, _), _)| *runtime == name)
            .map(|(_, row)| row)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let Some((topology, pki)) = shared.cell.get() else {
            println!("{name:<16} topology never started");
            healthy = false;
            continue;
        };
        let count = |f: &dyn Fn(&Row) -> bool| mine.iter().filter(|r| f(r)).count();
        let refused = count(&|r| {
            matches!(
                r.observed,
                Some(Observed::Answer { from_upstream: false, status, .. }) if status < 500
            ) || matches!(
                r.observed,
                Some(Observed::Closed(_) | Observed::TlsRefused(_))
            )
        });
        let forwarded = count(&|r| {
            matches!(
                r.observed,
                Some(Observed::Answer {
                    from_upstream: true,
                    ..
                })
            )
        });
        let server_errors = count(
            &|r| matches!(r.observed, Some(Observed::Answer { status, .. }) if status >= 500),
        );
        let hangs = count(&|r| matches!(r.observed, Some(Observed::TimedOut)));
        // Everything the upstream saw, against the cases that were to be refused.
        let seen = topology.azure.seen();
        let forwarded_bad = mine
            .iter()
            .filter(|r| r.refused_expected)
            .filter(|r| {
                let needle = format!("{PATH_PREFIX}{}", r.marker);
                seen.iter().any(|s| {
                    s.path.contains(&needle) && !s.path.contains(&format!("{needle}-next"))
                })
            })
            .count();
        let trap_evidence = traps(topology, shared.runtime).await?;
        println!(
            "{name:<16} {:>6} {:>7} {:>7} {:>8} {:>10} {:>16} {:>5} {:>6} {:>6}",
            mine.len(),
            count(&|r| r.passed),
            count(&|r| !r.passed),
            refused,
            forwarded,
            forwarded_bad,
            server_errors,
            hangs,
            trap_evidence.count
        );
        let mut by_category: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for row in &mine {
            let entry = by_category.entry(row.category.as_str()).or_default();
            entry.0 += 1;
            if row.passed {
                entry.1 += 1;
            }
        }
        let categories: Vec<String> = by_category
            .iter()
            .map(|(c, (n, ok))| format!("{c} {ok}/{n}"))
            .collect();
        println!("{:<16} passed per category: {}", "", categories.join(", "));
        for line in &trap_evidence.examples {
            println!("{:<16} TRAP {line}", "");
        }
        if !trap_evidence.stats.is_empty() {
            println!("{:<16} wasm stats: {}", "", trap_evidence.stats.join(" "));
        }
        if forwarded_bad > 0 || server_errors > 0 || hangs > 0 || trap_evidence.count > 0 {
            healthy = false;
        }
        if let Err(error) = still_serves(topology, pki, suite).await {
            println!("{name:<16} NO LONGER SERVES: {error:#}");
            healthy = false;
        }
    }
    print_differences(&rows);
    Ok(healthy)
}

/// What an observation comes to, without details that vary from run to run.
fn outcome(observed: &Option<Observed>) -> String {
    match observed {
        Some(Observed::Answer {
            status,
            code,
            from_upstream,
        }) => match (code, from_upstream) {
            (Some(code), _) => format!("{status} {code}"),
            (None, true) => format!("{status} forwarded"),
            (None, false) => format!("{status} -"),
        },
        Some(Observed::Closed(_)) => "closed".into(),
        Some(Observed::TlsRefused(_)) => "tls_refused".into(),
        Some(Observed::TimedOut) => "hang".into(),
        None => "not run".into(),
    }
}

/// Lists the cases the runtimes answered differently (each answer is within what the case
/// allows when the case passed; this shows where alternatives and pins are used).
fn print_differences(rows: &BTreeMap<(&'static str, String), Row>) {
    let mut by_case: BTreeMap<&str, Vec<(&str, String)>> = BTreeMap::new();
    for ((runtime, case), row) in rows {
        by_case
            .entry(case.as_str())
            .or_default()
            .push((runtime, outcome(&row.observed)));
    }
    let differing: Vec<_> = by_case
        .iter()
        .filter(|(_, answers)| answers.iter().any(|(_, a)| *a != answers[0].1))
        .collect();
    if differing.is_empty() {
        return;
    }
    println!(
        "\ncases the runtimes answered differently ({}):",
        differing.len()
    );
    for (case, answers) in differing {
        let answers: Vec<String> = answers.iter().map(|(r, a)| format!("{r}: {a}")).collect();
        println!("  {case}: {}", answers.join(", "));
    }
}
