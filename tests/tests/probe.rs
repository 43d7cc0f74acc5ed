//! The ABI probe comparison: the probe filter (`tests/probe`) runs on Envoy and on `azgate
//! serve` (those of `AZGATE_RUNTIMES`; `envoy-rendered` is skipped) in the same topology, each scenario's observations are collected, printed side by side, and
//! every difference between Envoy and `azgate serve` must be pinned in `tests/probe/quirks.json`
//! with both values and a reason. A pinned quirk that no longer reproduces exactly also fails,
//! so the pin stays a real test.
//!
//! Run with `make test-probe` (or `cargo test -p azgate-tests --test probe` after `make probe
//! envoy` and `cargo build -p azgate`). `AZGATE_RUNTIMES=serve` runs one runtime (no
//! comparison), `AZGATE_KEEP_LOGS=1` keeps gateway logs, `AZGATE_PROBE_WASM` overrides the
//! probe's path, `AZGATE_PROBE_DUMP=FILE` writes every observation as JSON.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use azgate_emulator::Fault;
use azgate_tests::pki::{AppCertSpec, KeyKind};
use azgate_tests::topology::{self, Options, Runtime, Topology};
use base64::Engine as _;
use libtest_mimic::{Arguments, Failed, Trial};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Digest as _;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

/// Concurrent requests in the contended-CAS scenario.
const CAS_REQUESTS: u64 = 6;

/// Observations: scenario → key → value, per runtime.
type Observations = BTreeMap<String, BTreeMap<String, Value>>;

/// Differences pinned as an Envoy quirk (or an azgate limitation) with their reason: for each
/// listed observation of `scenario`, the exact value each runtime must show.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuirkGroup {
    scenario: String,
    explanation: String,
    observations: BTreeMap<String, Pinned>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pinned {
    envoy: Value,
    serve: Value,
}

/// One pinned observation.
#[derive(Debug)]
struct Quirk {
    scenario: String,
    key: String,
    envoy: Value,
    serve: Value,
}

fn main() -> std::process::ExitCode {
    let args = Arguments::from_args();
    let runtime = match azgate_tests::runner_runtime() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("cannot start tokio: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let quirks = match load_quirks() {
        Ok(quirks) => quirks,
        Err(err) => {
            eprintln!("cannot load tests/probe/quirks.json: {err:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let results: Arc<Mutex<BTreeMap<&'static str, Observations>>> = Arc::default();
    let mut trials = Vec::new();
    // The probe compares the two hosts; `envoy-rendered` is Envoy again with the production
    // configuration, whose differences are configuration, not host behaviour.
    let runtimes: Vec<Runtime> = Runtime::selected()
        .into_iter()
        .filter(|r| matches!(r, Runtime::Envoy | Runtime::Serve))
        .collect();
    for gateway in runtimes {
        for (suffix, run) in [
            ("scenarios", Suite::Main),
            (
                "trap: a panicking filter and the requests after it",
                Suite::Trap,
            ),
            ("workers: contended CAS across two workers", Suite::Workers),
        ] {
            let (rt, results) = (runtime.clone(), results.clone());
            trials.push(Trial::test(
                format!("{}::{suffix}", gateway.name()),
                move || {
                    let observed = rt.block_on(run_suite(gateway, run)).map_err(failed)?;
                    if let Ok(mut results) = results.lock() {
                        results.entry(gateway.name()).or_default().extend(observed);
                    }
                    Ok(())
                },
            ));
        }
    }
    let conclusion = libtest_mimic::run(&args, trials);
    let Ok(results) = results.lock() else {
        return std::process::ExitCode::FAILURE;
    };
    if let Some(path) = std::env::var_os("AZGATE_PROBE_DUMP")
        && let Err(err) = std::fs::write(
            &path,
            serde_json::to_string_pretty(&*results).unwrap_or_default(),
        )
    {
        eprintln!("cannot write {}: {err}", PathBuf::from(&path).display());
    }
    let problems = compare(&results, &quirks);
    if !problems.is_empty() {
        eprintln!("\nprobe comparison failed:");
        for problem in &problems {
            eprintln!("  {problem}");
        }
        return std::process::ExitCode::FAILURE;
    }
    conclusion.exit_code()
}

fn failed(err: anyhow::Error) -> Failed {
    format!("{err:#}").into()
}

fn load_quirks() -> Result<Vec<Quirk>> {
    let path = topology::repo_root().join("tests/probe/quirks.json");
    let text = std::fs::read_to_string(&path)?;
    let groups: Vec<QuirkGroup> = serde_json::from_str(&text)?;
    let mut quirks = Vec::new();
    for group in groups {
        if group.explanation.trim().is_empty() || group.observations.is_empty() {
            bail!(
                "quirk group {} needs an explanation and observations",
                group.scenario
            );
        }
        for (key, pinned) in group.observations {
            if pinned.envoy == pinned.serve {
                bail!("quirk {}.{key} pins no difference", group.scenario);
            }
            quirks.push(Quirk {
                scenario: group.scenario.clone(),
                key,
                envoy: pinned.envoy,
                serve: pinned.serve,
            });
        }
    }
    Ok(quirks)
}

/// The probe: `$AZGATE_PROBE_WASM`, or the release build made by `make probe`.
fn probe_wasm() -> Result<PathBuf> {
    let path = std::env::var_os("AZGATE_PROBE_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            topology::repo_root().join("target/wasm32-wasip1/release/azgate_probe.wasm")
        });
    if !path.exists() {
        bail!(
            "the probe not found at {} (run `make probe`)",
            path.display()
        );
    }
    Ok(path)
}

#[derive(Clone, Copy)]
enum Suite {
    Main,
    Trap,
    Workers,
}

/// A listener that accepts connections, reads a little and closes them without answering: the
/// `probe_reset` cluster.
async fn start_resetter() -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = tokio::time::timeout(Duration::from_secs(1), socket.read(&mut buf)).await;
                drop(socket);
            });
        }
    });
    Ok((addr, task))
}

async fn run_suite(runtime: Runtime, suite: Suite) -> Result<Observations> {
    let (reset_addr, resetter) = start_resetter().await?;
    // Nothing listens there once the probe runs.
    let refused_addr = topology::free_port()?;
    let options = Options {
        plugin_config: r#"{"probe":"config"}"#.into(),
        // One worker (one VM) keeps ticks, queues and the trap deterministic; the workers suite
        // has two, so CAS contention can also cross VMs.
        concurrency: if matches!(suite, Suite::Workers) {
            2
        } else {
            1
        },
        wasm: Some(probe_wasm()?),
        extra_clusters: vec![
            ("probe_reset".into(), reset_addr),
            ("probe_refused".into(), refused_addr),
        ],
        ..Options::default()
    };
    let topology = Topology::start(runtime, options)
        .await
        .with_context(|| format!("starting {}", runtime.name()))?;
    let probe = Probe::new(&topology)?;
    let result = match suite {
        Suite::Main => main_scenarios(&topology, &probe).await,
        Suite::Trap => trap_scenario(&topology, &probe, runtime).await,
        Suite::Workers => {
            let mut out = Observations::new();
            probe
                .send(
                    Request::new("shared_write")
                        .header("x-probe-key", "probe.cas.workers")
                        .header("x-probe-value", "0"),
                )
                .await;
            record(
                &mut out,
                "cas_two_workers",
                contended_cas(&topology, &probe, "probe.cas.workers").await,
            );
            Ok(out)
        }
    };
    resetter.abort();
    if result.is_err() && std::env::var_os("AZGATE_KEEP_LOGS").is_some() {
        eprintln!("{}", topology.gateway.log());
    }
    result
}

/// Sends probe requests over HTTP/1.1 (so header names keep their case on the wire).
struct Probe {
    client: reqwest::Client,
    client_h2: reqwest::Client,
    url: String,
    /// SHA-256 of the client certificate's DER, lower-case hex.
    cert_sha256: String,
    /// The client certificate, DER.
    cert_der: Vec<u8>,
}

/// A probe request.
#[derive(Default)]
struct Request<'a> {
    scenario: &'a str,
    path: &'a str,
    headers: Vec<(&'a str, String)>,
    body: Option<&'static str>,
    /// Over HTTP/2 instead of HTTP/1.1.
    h2: bool,
    /// A shorter client timeout (the client gives up).
    timeout: Option<Duration>,
}

impl<'a> Request<'a> {
    fn new(scenario: &'a str) -> Self {
        Self {
            scenario,
            path: "/probe",
            ..Self::default()
        }
    }

    fn header(mut self, name: &'a str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

impl Probe {
    fn new(topology: &Topology) -> Result<Self> {
        let spec = AppCertSpec {
            user: Some("probe".into()),
            roles: vec!["probe-role".into()],
            not_before_offset_s: -60,
            not_after_offset_s: 3600,
            ..AppCertSpec::default()
        };
        // A certificate whose base64 has every character XFCC escapes ('+', '/' and the '='
        // padding, which depends on the DER length), so both runtimes' escapes compare.
        let mut cert = topology.ca.app(&spec, KeyKind::P256)?;
        for _ in 0..64 {
            if ['+', '/', '='].iter().all(|c| cert.cert_pem.contains(*c)) {
                break;
            }
            cert = topology.ca.app(&spec, KeyKind::P256)?;
        }
        let pem = format!("{}{}", cert.cert_pem, cert.key_pem);
        let builder = || -> Result<reqwest::ClientBuilder> {
            Ok(reqwest::Client::builder()
                .use_rustls_tls()
                .tls_built_in_root_certs(false)
                .add_root_certificate(reqwest::Certificate::from_pem(
                    topology.ca.cert_pem.as_bytes(),
                )?)
                .identity(reqwest::Identity::from_pem(pem.as_bytes())?)
                .no_proxy()
                .timeout(Duration::from_secs(8)))
        };
        let client = builder()?.http1_only().build()?;
        // HTTP/2 by ALPN (both gateways offer h2).
        let client_h2 = builder()?.build()?;
        let der_base64: String = cert
            .cert_pem
            .lines()
            .filter(|line| !line.starts_with("-----"))
            .collect();
        let der = base64::engine::general_purpose::STANDARD.decode(der_base64)?;
        let cert_sha256 = sha2::Sha256::digest(&der)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Self {
            client,
            client_h2,
            url: topology.gateway.url(),
            cert_sha256,
            cert_der: der,
        })
    }

    /// Sends `request`; the observations are the probe's JSON answer plus `http_status` (or
    /// `http_error` when nothing came back).
    async fn send(&self, request: Request<'_>) -> Value {
        let method = if request.body.is_some() {
            reqwest::Method::POST
        } else {
            reqwest::Method::GET
        };
        let client = if request.h2 {
            &self.client_h2
        } else {
            &self.client
        };
        let mut builder = client
            .request(method, format!("{}{}", self.url, request.path))
            .header("x-probe", request.scenario);
        for (name, value) in &request.headers {
            builder = builder.header(*name, value);
        }
        if let Some(timeout) = request.timeout {
            builder = builder.timeout(timeout);
        }
        if let Some(body) = request.body {
            builder = builder.body(body);
        }
        match builder.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let headers = response.headers().clone();
                let body = response.text().await.unwrap_or_default();
                let mut observed = match serde_json::from_str::<Value>(&body) {
                    Ok(Value::Object(map)) if status == 200 => Value::Object(map),
                    _ => json!({"body": body.chars().take(120).collect::<String>()}),
                };
                observed["http_status"] = json!(status);
                observed["response_headers"] = json!(
                    ["x-probe-response", "x-fake-azure", "x-azgate-error"]
                        .iter()
                        .filter_map(|name| headers
                            .get(*name)
                            .map(|v| format!("{name}: {}", v.to_str().unwrap_or("?"))))
                        .collect::<Vec<_>>()
                );
                if request.scenario.starts_with("local_response")
                    || request.scenario == "upstream_error"
                {
                    for name in [
                        "x-a",
                        "x-upper",
                        "x-empty",
                        "content-type",
                        "content-length",
                        "x-probe-encoded",
                    ] {
                        let values: Vec<&str> = headers
                            .get_all(name)
                            .iter()
                            .map(|v| v.to_str().unwrap_or("?"))
                            .collect();
                        observed[format!("client_sees_{name}")] = json!(values);
                    }
                }
                observed
            }
            Err(err) => {
                json!({"http_error": if err.is_timeout() { "timeout".to_string() } else { format!("{err}") }})
            }
        }
    }
}

/// Replaces the `xfcc` the probe read by its shape when it is exactly
/// `Hash=<SHA-256 of this client certificate>;Cert="<this certificate's PEM, percent-encoded>"`
/// (each runtime has its own certificate, so the values themselves never compare), and adds
/// `xfcc_cert_escapes`, the escapes used in `Cert=`, so both runtimes must encode alike.
fn describe_xfcc(observed: &mut Value, probe: &Probe) {
    let Some(xfcc) = observed["xfcc"].as_str().map(str::to_owned) else {
        return;
    };
    let encoded = xfcc
        .strip_prefix(&format!("Hash={};Cert=\"", probe.cert_sha256))
        .and_then(|rest| rest.strip_suffix('"'));
    let Some(encoded) = encoded else {
        return;
    };
    let der: Option<Vec<u8>> = percent_decode(encoded).and_then(|pem| {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD.decode(body).ok()
    });
    if der.as_deref() != Some(probe.cert_der.as_slice()) {
        return;
    }
    let mut escapes: Vec<&str> = encoded
        .match_indices('%')
        .filter_map(|(at, _)| encoded.get(at..at + 3))
        .collect();
    escapes.sort_unstable();
    escapes.dedup();
    observed["xfcc"] = json!(
        "Hash=<SHA-256 of the client certificate>;Cert=\"<the client certificate, PEM, percent-encoded>\""
    );
    observed["xfcc_cert_escapes"] = json!(escapes);
}

/// `%XX` decoding; `None` on a malformed escape or non-UTF-8 result.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Records one scenario's observations.
fn record(out: &mut Observations, scenario: &str, observed: Value) {
    let entry = out.entry(scenario.to_string()).or_default();
    match observed {
        Value::Object(map) => entry.extend(map),
        other => {
            entry.insert("value".into(), other);
        }
    }
}

async fn main_scenarios(topology: &Topology, probe: &Probe) -> Result<Observations> {
    let mut out = Observations::new();
    let headered = |scenario| {
        Request::new(scenario)
            .header("X-Probe-Case", "MiXed")
            .header("x-rep", "a")
            .header("x-rep", "b")
            .header("x-empty", "")
    };
    record(&mut out, "ping", probe.send(Request::new("ping")).await);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    record(
        &mut out,
        "misc",
        probe
            .send(Request::new("misc").header("x-probe-now", now.to_string()))
            .await,
    );
    for scenario in ["headers", "headers_mutate", "headers_set_map"] {
        let mut observed = probe.send(headered(scenario)).await;
        if scenario == "headers" {
            describe_xfcc(&mut observed, probe);
        }
        record(&mut out, scenario, observed);
    }
    let mut h2 = headered("headers");
    h2.h2 = true;
    let mut observed = probe.send(h2).await;
    describe_xfcc(&mut observed, probe);
    record(&mut out, "headers_h2", observed);
    let mut body = Request::new("body");
    body.body = Some("hello probe world");
    record(&mut out, "body", probe.send(body).await);
    for scenario in ["local_response", "local_response_empty"] {
        record(&mut out, scenario, probe.send(Request::new(scenario)).await);
    }
    for scenario in [
        "call_ok",
        "call_unknown_cluster",
        "call_no_authority",
        "call_reset",
        "call_refused",
    ] {
        record(&mut out, scenario, probe.send(Request::new(scenario)).await);
    }
    topology.imds.set_fault(Fault::Hang);
    let timeout = probe.send(Request::new("call_timeout")).await;
    topology.imds.set_fault(Fault::None);
    record(&mut out, "call_timeout", timeout);

    // A paused request changed and resumed after its call-out answered.
    let mut resume = Request::new("call_resume");
    resume.path = "/probe-resume";
    let mut observed = probe.send(resume).await;
    let seen = topology.azure.seen_with_path("/probe-resume");
    observed["upstream_saw"] = json!(
        seen.iter()
            .map(|s| json!({
                "x-probe-resumed": s.header("x-probe-resumed"),
                "x-probe-after-resume": s.header("x-probe-after-resume"),
                "x-probe": s.header("x-probe"),
            }))
            .collect::<Vec<_>>()
    );
    let statuses = probe
        .send(Request::new("shared_read").header("x-probe-key", "probe.resume"))
        .await;
    observed["statuses"] = statuses["value"].clone();
    record(&mut out, "call_resume", observed);

    // Which maps and properties each callback can reach.
    let mut phases = Request::new("phases");
    phases.path = "/probe-phases";
    let answer = probe.send(phases).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let read = probe
        .send(Request::new("shared_read").header("x-probe-key", "probe.phases"))
        .await;
    let mut observed: Value = read["value"]
        .as_str()
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or(Value::Null);
    observed["http_status"] = answer["http_status"].clone();
    record(&mut out, "phases", observed);

    // The client gives up while its request waits for a call-out.
    topology.imds.set_fault(Fault::Hang);
    let mut abort = Request::new("call_abort").header("x-probe-life", "abort");
    abort.timeout = Some(Duration::from_millis(300));
    let aborted = probe.send(abort).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    topology.imds.set_fault(Fault::None);
    let events = probe
        .send(Request::new("lifecycle_read").header("x-probe-target", "abort"))
        .await;
    let after = probe.send(Request::new("ping")).await;
    record(
        &mut out,
        "call_abort",
        json!({
            "client": aborted["http_error"],
            "callbacks": events["events"],
            "next_request": after["http_status"],
        }),
    );

    record(&mut out, "shared", probe.send(Request::new("shared")).await);
    record(
        &mut out,
        "cas_missing_key",
        contended_cas(topology, probe, "probe.cas.fresh").await,
    );
    // The same with a key that exists: every stale cas must now be refused.
    probe
        .send(
            Request::new("shared_write")
                .header("x-probe-key", "probe.cas.counter")
                .header("x-probe-value", "0"),
        )
        .await;
    record(
        &mut out,
        "cas_existing_key",
        contended_cas(topology, probe, "probe.cas.counter").await,
    );

    record(&mut out, "queue", probe.send(Request::new("queue")).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    record(
        &mut out,
        "queue_delivery",
        probe.send(Request::new("queue_read")).await,
    );

    record(
        &mut out,
        "tick",
        probe.send(Request::new("tick_start")).await,
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let first = probe.send(Request::new("tick_read")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = probe.send(Request::new("tick_read")).await;
    record(
        &mut out,
        "tick",
        json!({
            "ticks_after_800ms": first["ticks"],
            "stop_status": first["stop"],
            "no_ticks_after_period_0": first["ticks"] == second["ticks"],
        }),
    );

    record(
        &mut out,
        "metrics",
        probe.send(Request::new("metrics")).await,
    );
    let mut properties = headered("properties");
    properties.path = "/probe/props?q=1";
    let mut observed = probe.send(properties).await;
    let digest = &mut observed["connection.sha256_peer_certificate_digest"];
    if digest.as_str() == Some(probe.cert_sha256.as_str()) {
        *digest = json!("<sha256 of the client certificate, hex>");
    }
    record(&mut out, "properties", observed);

    for (scenario, life) in [
        ("lifecycle_local", "local"),
        ("lifecycle_call", "call"),
        ("lifecycle_forward", "forward"),
    ] {
        record(
            &mut out,
            scenario,
            probe
                .send(Request::new(scenario).header("x-probe-life", life))
                .await,
        );
    }
    record(
        &mut out,
        "upstream_error",
        probe
            .send(Request::new("upstream_error").header("x-probe-life", "upstream_error"))
            .await,
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    for life in ["local", "call", "forward", "upstream_error"] {
        let events = probe
            .send(Request::new("lifecycle_read").header("x-probe-target", life))
            .await;
        record(
            &mut out,
            &format!("lifecycle_{life}"),
            json!({"callbacks": events["events"]}),
        );
    }
    Ok(out)
}

/// `CAS_REQUESTS` concurrent requests each read a shared counter, wait for a slowed call-out
/// (so all of them hold a stale cas), then increment it with CAS retries.
async fn contended_cas(topology: &Topology, probe: &Probe, key: &str) -> Value {
    topology
        .imds
        .set_fault(Fault::Slow(Duration::from_millis(400)));
    let answers = futures_join(
        (0..CAS_REQUESTS)
            .map(|_| probe.send(Request::new("cas").header("x-probe-key", key)))
            .collect(),
    )
    .await;
    topology.imds.set_fault(Fault::None);
    let read = probe
        .send(Request::new("shared_read").header("x-probe-key", key))
        .await;
    let mut written: Vec<u64> = answers
        .iter()
        .filter_map(|a| a["cas_written"].as_u64())
        .collect();
    written.sort_unstable();
    let mismatches: u64 = answers
        .iter()
        .filter_map(|a| a["cas_mismatches"].as_u64())
        .sum();
    let other_errors: Vec<Value> = answers
        .iter()
        .flat_map(|a| {
            a["cas_other_errors"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    json!({
        "statuses": answers.iter().map(|a| a["http_status"].clone()).collect::<Vec<_>>(),
        "final_value": read["value"],
        "each_increment_written_once": written == (1..=CAS_REQUESTS).collect::<Vec<_>>(),
        "cas_mismatch_seen": mismatches > 0,
        "errors_other_than_cas_mismatch": other_errors,
    })
}

/// Runs `futures` concurrently on the current task (a join without the futures crate: they
/// borrow the probe, so they cannot be spawned) and returns their outputs in order.
async fn futures_join<F: std::future::Future<Output = Value>>(futures: Vec<F>) -> Vec<Value> {
    let mut pending: Vec<_> = futures.into_iter().map(|f| Some(Box::pin(f))).collect();
    let mut outputs: Vec<Value> = vec![Value::Null; pending.len()];
    std::future::poll_fn(|cx| {
        let mut all_done = true;
        for (slot, output) in pending.iter_mut().zip(outputs.iter_mut()) {
            if let Some(future) = slot {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => {
                        *output = value;
                        *slot = None;
                    }
                    std::task::Poll::Pending => all_done = false,
                }
            }
        }
        if all_done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    outputs
}

/// Longest reload backoff of the test topology's Envoy: `reload_config.backoff.base_interval`
/// (0.2 s) with Envoy's jitter (up to 1.5 times the base).
const RELOAD_BACKOFF_MAX: Duration = Duration::from_millis(300);

/// How long a runtime may take to serve again after a trap before the test fails.
const RECOVERY_LIMIT: Duration = Duration::from_secs(5);

/// A filter panic, then what the next requests get. The trap must fail only its own request
/// (503, nothing forwarded) and the worker must serve the next one with a new VM: serve
/// replaces a trapped VM at once; Envoy (`FAIL_RELOAD`) reloads it when the next request
/// arrives, unless that worker's VM was (re)loaded less than the backoff ago. The first trap
/// comes after the backoff of the start-up load; the second right after the first reload, so
/// it shows the backoff, and the time until the worker serves again is measured.
async fn trap_scenario(
    topology: &Topology,
    probe: &Probe,
    runtime: Runtime,
) -> Result<Observations> {
    let mut out = Observations::new();
    let brief = |v: &Value| {
        json!({
            "http_status": v["http_status"],
            "http_error": v["http_error"],
            "body": v["body"],
            "response_headers": v["response_headers"],
        })
    };
    let trap = |path: &'static str| {
        let mut request = Request::new("trap");
        request.path = path;
        request
    };
    let vm_starts = || async {
        probe
            .send(Request::new("shared_read").header("x-probe-key", "probe.vm_starts"))
            .await["value"]
            .clone()
    };
    let name = runtime.name();
    let before = probe.send(Request::new("ping")).await;
    let mut observed = brief(&before);
    observed["vm_starts"] = vm_starts().await;
    record(&mut out, "trap_1_before", observed);
    tokio::time::sleep(RELOAD_BACKOFF_MAX).await;

    let panic = probe.send(trap("/probe-trap-1")).await;
    let next = probe.send(Request::new("ping")).await;
    let mut observed = brief(&panic);
    observed["forwarded"] = json!(topology.azure.seen_with_path("/probe-trap-1").len());
    record(&mut out, "trap_2_panic", observed);
    record(&mut out, "trap_3_next", brief(&next));
    // The property the gateway must have, whatever the comparison says.
    if panic["http_status"] != json!(503) || next["http_status"] != json!(200) {
        bail!(
            "{name}: a trap must fail only its own request (503) and the next request must be \
             served (200); got {} then {}",
            panic["http_status"],
            next["http_status"]
        );
    }
    if !topology.azure.seen_with_path("/probe-trap-1").is_empty() {
        bail!("{name}: the trapping request was forwarded upstream");
    }

    let second = probe.send(trap("/probe-trap-2")).await;
    let trapped_at = std::time::Instant::now();
    let within_backoff = probe.send(Request::new("ping")).await;
    let mut observed = brief(&second);
    observed["forwarded"] = json!(topology.azure.seen_with_path("/probe-trap-2").len());
    record(&mut out, "trap_4_second_panic", observed);
    record(&mut out, "trap_5_next_at_once", brief(&within_backoff));
    // Poll until the worker serves again.
    let mut failed_in_between = 0u32;
    let recovered = loop {
        let answer = probe.send(Request::new("ping")).await;
        if answer["http_status"] == json!(200) {
            break Some(answer);
        }
        failed_in_between += 1;
        if trapped_at.elapsed() > RECOVERY_LIMIT {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let Some(recovered) = recovered else {
        bail!("{name}: still not serving {RECOVERY_LIMIT:?} after a trap");
    };
    let recovery = trapped_at.elapsed();
    println!(
        "{name}: served again {} ms after a trap that came right after a VM reload ({} requests \
         failed in between)",
        recovery.as_millis(),
        failed_in_between + u32::from(within_backoff["http_status"] != json!(200))
    );
    record(
        &mut out,
        "trap_6_served_again",
        json!({
            "http_status": recovered["http_status"],
            "within_1s": recovery <= Duration::from_secs(1),
        }),
    );
    record(
        &mut out,
        "trap_7_vm_starts",
        json!({"value": vm_starts().await}),
    );
    // Each runtime's own count of replaced VMs: Envoy's reload statistics, serve's metric.
    let (path, counter) = match runtime {
        Runtime::Serve => ("/metrics", "azgate_vm_restarts_total"),
        _ => ("/stats?filter=wasm.azgate", "wasm.azgate.vm_reload_success"),
    };
    let counters = reqwest::Client::builder()
        .no_proxy()
        .build()?
        .get(format!("http://{}{path}", topology.gateway.admin))
        .send()
        .await?
        .text()
        .await?;
    let count = |name: &str| {
        counters.lines().find_map(|line| {
            let value = line.strip_prefix(name)?;
            value.trim_start_matches(':').trim().parse::<u64>().ok()
        })
    };
    record(
        &mut out,
        "trap_7_vm_starts",
        json!({"vms_replaced": count(counter)}),
    );
    if let Some(backoff) = count("wasm.azgate.vm_reload_backoff") {
        println!(
            "{name}: wasm.azgate.vm_reload_backoff = {backoff} (requests failed in the backoff)"
        );
    }
    Ok(out)
}

/// Prints both runtimes' observations and returns the problems: unpinned differences and
/// pinned quirks that no longer reproduce.
fn compare(results: &BTreeMap<&'static str, Observations>, quirks: &[Quirk]) -> Vec<String> {
    let empty = Observations::new();
    let envoy = results.get("envoy").unwrap_or(&empty);
    let serve = results.get("serve").unwrap_or(&empty);
    let both = results.contains_key("envoy") && results.contains_key("serve");
    let mut problems = Vec::new();
    let mut used = vec![false; quirks.len()];
    let short = |v: Option<&Value>| -> String {
        let text = v.map(Value::to_string).unwrap_or_else(|| "-".into());
        if text.chars().count() > 44 {
            text.chars().take(43).collect::<String>() + "…"
        } else {
            text
        }
    };
    println!("\nABI probe observations per runtime:");
    println!(
        "{:<52} {:<46} {:<46} verdict",
        "scenario.key", "envoy", "serve"
    );
    let scenarios: std::collections::BTreeSet<&String> = envoy.keys().chain(serve.keys()).collect();
    for scenario in scenarios {
        let (e, s) = (envoy.get(scenario), serve.get(scenario));
        let keys: std::collections::BTreeSet<&String> = e
            .into_iter()
            .flat_map(|m| m.keys())
            .chain(s.into_iter().flat_map(|m| m.keys()))
            .collect();
        for key in keys {
            let ev = e.and_then(|m| m.get(key));
            let sv = s.and_then(|m| m.get(key));
            let quirk = quirks
                .iter()
                .position(|q| &q.scenario == scenario && &q.key == key);
            let verdict = if !both {
                "-".to_string()
            } else {
                let (ev_or_null, sv_or_null) = (
                    ev.cloned().unwrap_or(Value::Null),
                    sv.cloned().unwrap_or(Value::Null),
                );
                match quirk {
                    Some(index) => {
                        used[index] = true;
                        let q = &quirks[index];
                        if q.envoy == ev_or_null && q.serve == sv_or_null {
                            "quirk (pinned)".to_string()
                        } else {
                            problems.push(format!(
                                "{scenario}.{key}: pinned quirk no longer reproduces: pinned envoy={} serve={}, observed envoy={} serve={}",
                                q.envoy, q.serve, ev_or_null, sv_or_null
                            ));
                            "STALE QUIRK".to_string()
                        }
                    }
                    None if ev_or_null == sv_or_null => "same".to_string(),
                    None => {
                        problems.push(format!(
                            "{scenario}.{key}: envoy={ev_or_null} serve={sv_or_null} (not a pinned quirk)"
                        ));
                        "DIFFERENT".to_string()
                    }
                }
            };
            println!(
                "{:<52} {:<46} {:<46} {verdict}",
                format!("{scenario}.{key}"),
                short(ev),
                short(sv)
            );
        }
    }
    if both {
        for (quirk, used) in quirks.iter().zip(used) {
            if !used {
                problems.push(format!(
                    "{}.{}: pinned quirk was not observed at all",
                    quirk.scenario, quirk.key
                ));
            }
        }
    }
    problems
}
