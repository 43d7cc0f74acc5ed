//! A steady load of allowed requests through a gateway, shared by `tests/faults.rs` and
//! `examples/soak.rs` (which includes this file by path).
//!
//! Clients come in pairs: both clients of a pair present their own certificate and key but select
//! the same identity and ask for the same resource, so the two gateway workers race for the same
//! token. Even pairs use the reader identity, odd pairs the ops identity. With `rotate_every`,
//! the second half of the pairs moves to a new resource each period, so their tokens miss
//! every cache (gateway and token service) regularly; the first half keeps one resource, so
//! its tokens expire and are refreshed in place.
//!
//! A request's path names its key (`/load/p<pair>/g<generation>/c<client>/<n>`), so whatever
//! reached the fake Azure endpoint can be checked against the token it carried
//! ([`check_forwarded`]).

#![allow(dead_code, reason = "each includer uses a different part")]

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use azgate_tests::jwt;
use azgate_tests::pki::{AppCertSpec, KeyKind};
use azgate_tests::topology::Topology;
use azgate_tests::upstream::{Seen, msi_token_claims};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The identity even pairs select.
pub const READER: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/azgate-load/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader";
/// The identity odd pairs select.
pub const OPS: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/azgate-load/providers/Microsoft.ManagedIdentity/userAssignedIdentities/ops";
const ROLE: &str = "azure-load";

/// The refusals a token-service failure may produce (README, "Errors"): status and code.
pub const TOKEN_REFUSALS: &[(u16, &str)] = &[
    (502, "InvalidTokenServiceResponse"),
    (503, "TokenUnavailable"),
    (504, "TokenServiceTimeout"),
];

/// The plugin configuration: one role allowing both identities, plus `extra` fields.
pub fn plugin_config(extra: serde_json::Value) -> String {
    let mut config = serde_json::json!({
        "roles": [{"kind": "role", "version": "v7", "metadata": {"name": ROLE},
                   "spec": {"allow": {"azure_identities": [READER, OPS]}}}],
    });
    if let (Some(config), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
        config.extend(extra.clone());
    }
    config.to_string()
}

/// The shape of the load.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// Clients (rounded up to pairs).
    pub clients: usize,
    /// Pause after each answer, per client.
    pub pause: Duration,
    /// Move the second half of the pairs to a new resource this often.
    pub rotate_every: Option<Duration>,
    /// A request unanswered after this counts as [`Answer::Failed`].
    pub request_timeout: Duration,
}

/// What a request got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// 200 from the fake Azure endpoint.
    Forwarded,
    /// A well-formed azgate refusal: `x-azgate-error` equal to the JSON body's code.
    Refused {
        /// HTTP status.
        status: u16,
        /// `x-azgate-error`.
        code: String,
    },
    /// Anything else that came back (described).
    Malformed(String),
    /// No answer: transport error or timeout (described).
    Failed(String),
}

/// One request.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Which client sent it.
    pub client: usize,
    /// When it was sent.
    pub started: Instant,
    /// Until the whole answer was read.
    pub latency: Duration,
    /// What came back.
    pub answer: Answer,
}

impl Outcome {
    /// When the answer was complete.
    pub fn ended(&self) -> Instant {
        self.started + self.latency
    }

    /// `200`, `503 TokenUnavailable`, `malformed: …`, `failed: …`.
    pub fn label(&self) -> String {
        match &self.answer {
            Answer::Forwarded => "200".into(),
            Answer::Refused { status, code } => format!("{status} {code}"),
            Answer::Malformed(what) => format!("malformed: {what}"),
            Answer::Failed(what) => format!("failed: {what}"),
        }
    }
}

/// A running load.
pub struct Load {
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    /// When it started (generations count from here).
    pub started: Instant,
}

impl Load {
    /// Starts the clients against `topology`'s mTLS listener.
    pub fn start(topology: &Topology, spec: &LoadSpec) -> Result<Load> {
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let pairs = spec.clients.div_ceil(2).max(1);
        let mut tasks = Vec::new();
        for client in 0..pairs * 2 {
            let pair = client / 2;
            let identity = identity_of(pair);
            let cert = topology.ca.app(
                &AppCertSpec {
                    user: Some(format!("load-{client}")),
                    roles: vec![ROLE.into()],
                    selected_identity: Some(identity.into()),
                    allowed_identities: vec![identity.into()],
                    not_before_offset_s: -60,
                    not_after_offset_s: 86_400,
                    ..Default::default()
                },
                KeyKind::P256,
            )?;
            let rotate = spec.rotate_every.filter(|_| pair >= pairs / 2);
            let worker = Client {
                client,
                pair,
                rotate,
                http: topology.client(Some(&cert))?,
                key: cert.key.clone(),
                url: topology.gateway.url(),
                spec: spec.clone(),
                started,
            };
            let (outcomes, stop) = (outcomes.clone(), stop.clone());
            tasks.push(tokio::spawn(worker.run(outcomes, stop)));
        }
        Ok(Load {
            outcomes,
            stop,
            tasks,
            started,
        })
    }

    /// How many outcomes have been recorded (a cursor for [`Load::outcomes_from`]).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Outcomes recorded after the first `index`, in the order they completed.
    pub fn outcomes_from(&self, index: usize) -> Vec<Outcome> {
        self.lock()
            .get(index..)
            .map(<[Outcome]>::to_vec)
            .unwrap_or_default()
    }

    /// Outcomes of requests sent at or after `since`.
    pub fn outcomes_since(&self, since: Instant) -> Vec<Outcome> {
        self.lock()
            .iter()
            .filter(|o| o.started >= since)
            .cloned()
            .collect()
    }

    /// Takes every outcome recorded so far.
    pub fn drain(&self) -> Vec<Outcome> {
        std::mem::take(&mut *self.lock())
    }

    /// Stops the clients after their current request and returns what they have not drained.
    pub async fn stop(mut self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::SeqCst);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
        self.drain()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Outcome>> {
        self.outcomes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

struct Client {
    client: usize,
    pair: usize,
    rotate: Option<Duration>,
    http: reqwest::Client,
    key: azgate_tests::pki::PrivateKey,
    url: String,
    spec: LoadSpec,
    started: Instant,
}

impl Client {
    async fn run(self, outcomes: Arc<Mutex<Vec<Outcome>>>, stop: Arc<AtomicBool>) {
        let mut signed: Option<(u64, String)> = None;
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let generation = self.rotate.map_or(0, |every| {
                (self.started.elapsed().as_millis() / every.as_millis().max(1)) as u64
            });
            let jwt = match &signed {
                Some((g, jwt)) if *g == generation => jwt.clone(),
                _ => {
                    let claims = serde_json::json!({
                        "resource": resource(self.pair, generation),
                        "tid": "00000000-0000-0000-0000-00000000beef",
                    });
                    match jwt::sign(&self.key, jwt::alg_for(&self.key), &claims) {
                        Ok(jwt) => {
                            signed = Some((generation, jwt.clone()));
                            jwt
                        }
                        Err(error) => {
                            record(&outcomes, self.client, Instant::now(), failed(error));
                            return;
                        }
                    }
                }
            };
            let path = format!("/load/p{}/g{generation}/c{}/{n}", self.pair, self.client);
            n += 1;
            let started = Instant::now();
            let answer = tokio::time::timeout(self.spec.request_timeout, self.send(&path, &jwt))
                .await
                .unwrap_or_else(|_| {
                    Answer::Failed(format!("no answer within {:?}", self.spec.request_timeout))
                });
            record(&outcomes, self.client, started, answer);
            tokio::time::sleep(self.spec.pause).await;
        }
    }

    async fn send(&self, path: &str, jwt: &str) -> Answer {
        let response = match self
            .http
            .get(format!("{}{path}", self.url))
            .header("authorization", format!("Bearer {jwt}"))
            .header("x-forwarded-host", "management.azure.com")
            .send()
            .await
        {
            Ok(response) => response,
            Err(error) => return Answer::Failed(format!("{error:#}")),
        };
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (error, fake, content_type) = (
            header("x-azgate-error"),
            header("x-fake-azure"),
            header("content-type").unwrap_or_default(),
        );
        let body = match response.text().await {
            Ok(body) => body,
            Err(error) => return Answer::Failed(format!("reading the body: {error:#}")),
        };
        classify(status, error, fake.is_some(), &content_type, &body)
    }
}

fn record(outcomes: &Mutex<Vec<Outcome>>, client: usize, started: Instant, answer: Answer) {
    let outcome = Outcome {
        client,
        started,
        latency: started.elapsed(),
        answer,
    };
    outcomes
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push(outcome);
}

fn failed(error: anyhow::Error) -> Answer {
    Answer::Failed(format!("{error:#}"))
}

/// A response as [`Answer`]: a 200 must come from the fake Azure endpoint and carry no azgate
/// error; a refusal must be azgate's JSON error shape with the header and body codes equal.
fn classify(
    status: u16,
    error: Option<String>,
    from_upstream: bool,
    content_type: &str,
    body: &str,
) -> Answer {
    if status == 200 {
        return if from_upstream && error.is_none() && body.contains("\"fake\":\"azure\"") {
            Answer::Forwarded
        } else {
            Answer::Malformed(format!("200 not from the upstream: {body}"))
        };
    }
    let Some(code) = error else {
        return Answer::Malformed(format!("{status} without x-azgate-error: {body}"));
    };
    let json: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let body_code = json.as_ref().and_then(|j| j["error"]["code"].as_str());
    let message = json.as_ref().and_then(|j| j["error"]["message"].as_str());
    if !content_type.starts_with("application/json")
        || body_code != Some(code.as_str())
        || message.is_none_or(str::is_empty)
    {
        return Answer::Malformed(format!("{status} {code}: {content_type} {body}"));
    }
    Answer::Refused { status, code }
}

/// The identity pair `pair` selects.
pub fn identity_of(pair: usize) -> &'static str {
    if pair.is_multiple_of(2) { READER } else { OPS }
}

/// The resource pair `pair` asks for in `generation` (0 = a pair that does not rotate).
pub fn resource(pair: usize, generation: u64) -> String {
    if generation == 0 {
        format!("api://azgate-load/p{pair}")
    } else {
        format!("api://azgate-load/p{pair}/g{generation}")
    }
}

/// The (identity, resource) a load path stands for.
pub fn key_of_path(path: &str) -> Option<(&'static str, String)> {
    let mut parts = path.strip_prefix("/load/")?.split('/');
    let pair: usize = parts.next()?.strip_prefix('p')?.parse().ok()?;
    let generation: u64 = parts.next()?.strip_prefix('g')?.parse().ok()?;
    let identity = identity_of(pair);
    Some((identity, resource(pair, generation)))
}

/// Checks that every load request the upstream saw carries a managed-identity token for
/// exactly its own identity and resource, with the caller's credentials stripped; returns how
/// many it checked.
pub fn check_forwarded(seen: &[Seen]) -> Result<usize> {
    let mut checked = 0;
    for request in seen.iter().filter(|s| s.path.starts_with("/load/")) {
        let (identity, resource) =
            key_of_path(&request.path).ok_or_else(|| anyhow!("odd path {}", request.path))?;
        let claims = msi_token_claims(request)
            .ok_or_else(|| anyhow!("{} reached the upstream without an MSI token", request.path))?;
        ensure!(
            claims["aud"] == resource.as_str(),
            "{} carried a token for {} (expected {resource})",
            request.path,
            claims["aud"]
        );
        ensure!(
            claims["xms_mirid"]
                .as_str()
                .is_some_and(|m| m.eq_ignore_ascii_case(identity)),
            "{} carried a token of {} (expected {identity})",
            request.path,
            claims["xms_mirid"]
        );
        for stripped in ["x-forwarded-client-cert", "x-forwarded-host"] {
            ensure!(
                request.header(stripped).is_none(),
                "{} reached the upstream with {stripped}",
                request.path
            );
        }
        checked += 1;
    }
    Ok(checked)
}

/// The `p`-th percentile (0–100) of `values`, nearest rank; zero when empty.
pub fn percentile(values: &mut [Duration], p: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort_unstable();
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

/// Processes whose command line mentions `dir` (a gateway's own directory: its config, its
/// token-service socket), as (pid, `program subcommand`).
pub fn processes_under(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found: Vec<(u32, String)> = entries
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            args.iter().skip(1).any(|a| a.contains(&needle)).then(|| {
                let program = Path::new(&args[0])
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let sub = args
                    .get(1)
                    .filter(|a| !a.starts_with('-'))
                    .map(|a| format!(" {a}"))
                    .unwrap_or_default();
                (pid, format!("{program}{sub}"))
            })
        })
        .collect();
    found.sort();
    found
}

/// `VmRSS` of `pid` in KiB, from `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
