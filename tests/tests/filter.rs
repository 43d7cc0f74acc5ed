//! The filter's integration suite: the scenario vectors in `tests/cases/filter.json` plus a few
//! scenarios that need their own topology (single-flight under concurrency, token expiry,
//! unauthenticated forwarding, bad configuration, audit lines), on every selected runtime.
//!
//! Run with `cargo test -p azgate-tests --test filter` after `make wasm envoy`;
//! `AZGATE_RUNTIMES=envoy` picks runtimes, `AZGATE_KEEP_LOGS=1` keeps gateway logs.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};
use azgate_emulator::Fault;
use azgate_tests::jwt;
use azgate_tests::pki::{AppCertSpec, Issued, KeyKind, PrivateKey};
use azgate_tests::topology::{self, Options, Runtime, Topology};
use libtest_mimic::{Arguments, Failed, Trial};
use serde::Deserialize;
use tokio::sync::{Mutex, OnceCell};

#[path = "filter/scenarios.rs"]
mod scenarios;

use scenarios::{Special, run_special};

#[derive(Deserialize)]
struct Suite {
    identities: HashMap<String, String>,
    roles: Vec<serde_json::Value>,
    /// Teleport locks in force for the whole suite.
    #[serde(default)]
    locks: Vec<serde_json::Value>,
    cases: Vec<Case>,
    token_cases: Vec<Case>,
}

#[derive(Clone, Deserialize)]
struct Case {
    name: String,
    #[serde(default)]
    listener: Option<String>,
    #[serde(default = "default_cert")]
    cert: Option<CertCase>,
    #[serde(default = "default_auth")]
    auth: Option<AuthCase>,
    #[serde(default)]
    authorization: Option<Vec<String>>,
    #[serde(default)]
    forwarded_host: Option<Vec<String>>,
    #[serde(default)]
    headers: Vec<(String, String)>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    imds_fault: Option<serde_json::Value>,
    expect: Expect,
}

fn default_cert() -> Option<CertCase> {
    Some(CertCase::default())
}

fn default_auth() -> Option<AuthCase> {
    Some(AuthCase::default())
}

#[derive(Clone, Deserialize)]
struct CertCase {
    #[serde(default = "default_user")]
    user: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    identity: Option<String>,
    #[serde(default)]
    allowed: Vec<String>,
    #[serde(default = "default_key")]
    key: KeyKind,
    #[serde(default = "default_not_before")]
    not_before_s: i64,
    #[serde(default = "default_not_after")]
    not_after_s: i64,
    /// Traits (PostalCode JSON); `$name` values are identities.
    #[serde(default)]
    traits: std::collections::BTreeMap<String, Vec<String>>,
}

impl Default for CertCase {
    fn default() -> Self {
        Self {
            user: default_user(),
            roles: vec!["azure-reader".into()],
            identity: Some("reader".into()),
            allowed: vec!["reader".into()],
            key: default_key(),
            not_before_s: default_not_before(),
            not_after_s: default_not_after(),
            traits: Default::default(),
        }
    }
}

fn default_user() -> Option<String> {
    Some("alice".into())
}
fn default_key() -> KeyKind {
    KeyKind::P256
}
fn default_not_before() -> i64 {
    -60
}
fn default_not_after() -> i64 {
    3600
}

#[derive(Clone, Default, Deserialize)]
struct AuthCase {
    #[serde(default)]
    signer: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default)]
    claims: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    exp_offset_s: Option<i64>,
    #[serde(default)]
    nbf_offset_s: Option<i64>,
}

#[derive(Clone, Deserialize)]
struct Expect {
    status: u16,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    upstream: Option<UpstreamExpect>,
    #[serde(default)]
    imds_calls: Option<usize>,
    /// The `WWW-Authenticate` value of the answer (`null`: none).
    #[serde(default)]
    www_authenticate: Option<String>,
}

#[derive(Clone, Deserialize)]
struct UpstreamExpect {
    identity: String,
    host: String,
}

/// What each runtime answered per case: `status code` (or `error: …` if no answer).
#[derive(Default)]
struct Table {
    rows: std::sync::Mutex<BTreeMap<String, BTreeMap<&'static str, String>>>,
}

impl Table {
    fn record(&self, case: &str, runtime: &'static str, observed: String) {
        if let Ok(mut rows) = self.rows.lock() {
            rows.entry(case.to_string())
                .or_default()
                .insert(runtime, observed);
        }
    }

    /// Prints the table; returns the cases whose answers differ between runtimes.
    fn print(&self, runtimes: &[&'static str]) -> Vec<String> {
        let Ok(rows) = self.rows.lock() else {
            return vec!["results table poisoned".into()];
        };
        let mut differing = Vec::new();
        println!("\nscenario results per runtime (status and error code):");
        print!("{:<72}", "case");
        for runtime in runtimes {
            print!(" {runtime:<32}");
        }
        println!();
        for (case, answers) in rows.iter() {
            let mut name: String = case.chars().take(70).collect();
            if case.chars().count() > 70 {
                name.push('…');
            }
            print!("{name:<72}");
            for runtime in runtimes {
                print!(
                    " {:<32}",
                    answers.get(runtime).map(String::as_str).unwrap_or("-")
                );
            }
            let mut values = answers.values();
            let first = values.next();
            if values.any(|v| Some(v) != first) {
                print!("  DIFFERENT");
                differing.push(case.clone());
            }
            println!();
        }
        differing
    }
}

/// A topology started on first use and shared by the trials that need it.
struct Shared {
    runtime: Runtime,
    options: Options,
    cell: OnceCell<Topology>,
    /// Trials that change the emulator's behaviour run one at a time.
    exclusive: Mutex<()>,
}

impl Shared {
    fn new(runtime: Runtime, options: Options) -> Arc<Self> {
        Arc::new(Self {
            runtime,
            options,
            cell: OnceCell::new(),
            exclusive: Mutex::new(()),
        })
    }

    async fn get(&self) -> Result<&Topology> {
        self.cell
            .get_or_try_init(|| Topology::start(self.runtime, self.options.clone()))
            .await
    }
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
    let suite = match load_suite() {
        Ok(suite) => Arc::new(suite),
        Err(err) => {
            eprintln!("cannot load tests/cases/filter.json: {err:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut trials = Vec::new();
    let mut topologies = Vec::new();
    let table = Arc::new(Table::default());
    for gateway in Runtime::selected() {
        let name = gateway.name();
        let main = Shared::new(gateway, options(&suite, serde_json::json!({}), 2));
        let faults = Shared::new(
            gateway,
            options(&suite, serde_json::json!({"token_timeout_ms": 1000}), 2),
        );
        let unauthenticated = Shared::new(
            gateway,
            options(
                &suite,
                serde_json::json!({"allow_unauthenticated": true}),
                1,
            ),
        );
        topologies.extend([main.clone(), faults.clone(), unauthenticated.clone()]);

        for (index, case) in suite.cases.iter().enumerate() {
            let (rt, suite, topo, case, table) = (
                runtime.clone(),
                suite.clone(),
                main.clone(),
                case.clone(),
                table.clone(),
            );
            trials.push(Trial::test(
                format!("{name}::case_{index:02}: {}", case.name),
                move || {
                    let mut observed = None;
                    let result = rt.block_on(async {
                        let topology = topo.get().await?;
                        let resource = format!("api://azgate-case-{index}");
                        let path = format!("/case-{index}");
                        run_case(topology, &suite, &path, &resource, &case, &mut observed).await
                    });
                    let row = format!("case_{index:02}: {}", case.name);
                    table.record(&row, name, observed.unwrap_or_else(|| "no answer".into()));
                    result.map_err(failed)
                },
            ));
        }
        for (index, case) in suite.token_cases.iter().enumerate() {
            let (rt, suite, topo, case, table) = (
                runtime.clone(),
                suite.clone(),
                faults.clone(),
                case.clone(),
                table.clone(),
            );
            trials.push(Trial::test(
                format!("{name}::token_case_{index:02}: {}", case.name),
                move || {
                    let mut observed = None;
                    let result = rt.block_on(async {
                        let _one_at_a_time = topo.exclusive.lock().await;
                        let topology = topo.get().await?;
                        topology.imds.set_fault(fault(case.imds_fault.as_ref())?);
                        let result = run_case(
                            topology,
                            &suite,
                            &format!("/token-case-{index}"),
                            "api://azgate-token-faults",
                            &case,
                            &mut observed,
                        )
                        .await;
                        topology.imds.set_fault(Fault::None);
                        result
                    });
                    let row = format!("token_case_{index:02}: {}", case.name);
                    table.record(&row, name, observed.unwrap_or_else(|| "no answer".into()));
                    result.map_err(failed)
                },
            ));
        }
        let mut special: Vec<(&str, Arc<Shared>, Special)> = vec![
            (
                "single_flight: 50 concurrent first requests make one IMDS call",
                Shared::new(gateway, options(&suite, serde_json::json!({}), 2)),
                Special::SingleFlight,
            ),
            (
                "token_expiry: an expired cached token is fetched again",
                faults.clone(),
                Special::Expiry,
            ),
            (
                "unauthenticated: forwarded without any token when allowed",
                unauthenticated.clone(),
                Special::Unauthenticated,
            ),
            (
                "audit: one JSON line per decision, no secrets in the log",
                Shared::new(gateway, options(&suite, serde_json::json!({}), 1)),
                Special::Audit,
            ),
            (
                "cae: a claims challenge revokes the cached token for every worker; the 401 reaches the client",
                Shared::new(gateway, options(&suite, serde_json::json!({}), 2)),
                Special::Cae,
            ),
            (
                "bad_configuration: the gateway refuses to start and names the field",
                main.clone(),
                Special::BadConfig,
            ),
        ];
        if gateway != Runtime::Envoy {
            let mut in_process = options(&suite, serde_json::json!({}), 2);
            in_process.in_process_token_service = true;
            special.push((
                "token_service: azgate_msi answered by the token module (in-process or azgate token-service)",
                Shared::new(gateway, in_process),
                Special::InProcessTokens,
            ));
        }
        for (title, topo, kind) in special {
            topologies.push(topo.clone());
            let (rt, suite) = (runtime.clone(), suite.clone());
            trials.push(Trial::test(format!("{name}::{title}"), move || {
                rt.block_on(run_special(kind, &topo, &suite))
                    .map_err(failed)
            }));
        }
    }
    let runtimes: Vec<&'static str> = Runtime::selected().iter().map(|r| r.name()).collect();
    let conclusion = libtest_mimic::run(&args, trials);
    // Stop every gateway before exiting.
    drop(topologies);
    let differing = table.print(&runtimes);
    if !differing.is_empty() {
        eprintln!(
            "runtimes disagree on {} case(s): {differing:?}",
            differing.len()
        );
        return std::process::ExitCode::FAILURE;
    }
    conclusion.exit_code()
}

fn failed(err: anyhow::Error) -> Failed {
    format!("{err:#}").into()
}

fn load_suite() -> Result<Suite> {
    let path = topology::repo_root().join("tests/cases/filter.json");
    let text = std::fs::read_to_string(&path)?;
    let mut value: serde_json::Value = serde_json::from_str(&text)?;
    azgate_tests::expand_identity_references(&mut value)?;
    Ok(serde_json::from_value(value)?)
}

fn options(suite: &Suite, extra: serde_json::Value, concurrency: u32) -> Options {
    let mut config = serde_json::json!({ "roles": suite.roles, "locks": suite.locks });
    if let (Some(config), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
        config.extend(extra.clone());
    }
    Options {
        plugin_config: config.to_string(),
        concurrency,
        in_process_token_service: false,
        ..Options::default()
    }
}

fn fault(spec: Option<&serde_json::Value>) -> Result<Fault> {
    Ok(match spec {
        None | Some(serde_json::Value::Null) => Fault::None,
        Some(serde_json::Value::String(s)) if s == "hang" => Fault::Hang,
        Some(serde_json::Value::String(s)) if s == "malformed_json" => Fault::MalformedJson,
        Some(v) if v["status"].is_u64() => {
            Fault::Status(v["status"].as_u64().unwrap_or(500) as u16)
        }
        Some(other) => bail!("unknown imds_fault {other}"),
    })
}

fn identity(suite: &Suite, name: &str) -> String {
    suite
        .identities
        .get(name)
        .cloned()
        .unwrap_or_else(|| name.to_string())
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// The certificate a case asks for.
fn issue(topology: &Topology, suite: &Suite, spec: &CertCase) -> Result<Issued> {
    let app = AppCertSpec {
        user: spec.user.clone(),
        roles: spec.roles.clone(),
        selected_identity: spec.identity.as_deref().map(|n| identity(suite, n)),
        allowed_identities: spec.allowed.iter().map(|n| identity(suite, n)).collect(),
        not_before_offset_s: spec.not_before_s,
        not_after_offset_s: spec.not_after_s,
        traits: spec
            .traits
            .iter()
            .map(|(name, values)| {
                let values = values
                    .iter()
                    .map(|v| {
                        v.strip_prefix('$')
                            .map_or(v.clone(), |n| identity(suite, n))
                    })
                    .collect();
                (name.clone(), values)
            })
            .collect(),
    };
    topology.ca.app(&app, spec.key)
}

/// The JWT a case asks for: tsh's shape unless the case says otherwise.
fn token(cert: Option<&Issued>, auth: &AuthCase, resource: &str) -> Result<String> {
    let key = match (auth.signer.as_deref(), cert) {
        (Some("other"), _) | (_, None) => PrivateKey::generate(KeyKind::P256)?,
        (_, Some(cert)) => cert.key.clone(),
    };
    let mut claims = serde_json::json!({
        "resource": resource,
        "tid": "00000000-0000-0000-0000-00000000beef",
    });
    if let Some(map) = claims.as_object_mut() {
        for (k, v) in &auth.claims {
            match v {
                serde_json::Value::Null => {
                    map.remove(k);
                }
                serde_json::Value::String(s) if s.starts_with("$pad:") => {
                    let n: usize = s["$pad:".len()..].parse()?;
                    map.insert(k.clone(), "x".repeat(n).into());
                }
                other => {
                    map.insert(k.clone(), other.clone());
                }
            }
        }
        if let Some(offset) = auth.exp_offset_s {
            map.insert("exp".into(), (now() + offset).into());
        }
        if let Some(offset) = auth.nbf_offset_s {
            map.insert("nbf".into(), (now() + offset).into());
        }
    }
    let alg = auth
        .alg
        .clone()
        .unwrap_or_else(|| jwt::alg_for(&key).to_string());
    jwt::sign(&key, &alg, &claims)
}

/// Sends one case's request and checks everything the case expects.
async fn run_case(
    topology: &Topology,
    suite: &Suite,
    path_prefix: &str,
    default_resource: &str,
    case: &Case,
    observed: &mut Option<String>,
) -> Result<()> {
    let cert = match &case.cert {
        Some(spec) => Some(issue(topology, suite, spec)?),
        None => None,
    };
    let resource = case
        .auth
        .as_ref()
        .and_then(|a| a.claims.get("resource"))
        .and_then(|r| r.as_str())
        .unwrap_or(default_resource)
        .to_string();
    let jwt = match &case.auth {
        Some(auth) => Some(token(cert.as_ref(), auth, default_resource)?),
        None => None,
    };
    let client = topology.client(cert.as_ref())?;
    let base = match case.listener.as_deref() {
        Some("lenient") => topology.gateway.lenient_url(),
        _ => topology.gateway.url(),
    };
    let path = format!(
        "{path_prefix}{}",
        case.path
            .as_deref()
            .unwrap_or("/subscriptions?api-version=2022-12-01")
    );
    let method: reqwest::Method = case.method.as_deref().unwrap_or("GET").parse()?;
    let mut request = client.request(method.clone(), format!("{base}{path}"));
    let mut headers = reqwest::header::HeaderMap::new();
    match (&case.authorization, &jwt) {
        (Some(values), _) => {
            for value in values {
                // "$jwt" stands for the case's signed token.
                let value = match &jwt {
                    Some(jwt) => value.replace("$jwt", jwt),
                    None => value.clone(),
                };
                headers.append("authorization", value.parse()?);
            }
        }
        (None, Some(jwt)) => {
            headers.append("authorization", format!("Bearer {jwt}").parse()?);
        }
        (None, None) => {}
    }
    let forwarded = case
        .forwarded_host
        .clone()
        .unwrap_or_else(|| vec!["management.azure.com".into()]);
    for host in &forwarded {
        headers.append("x-forwarded-host", host.parse()?);
    }
    for (name, value) in &case.headers {
        headers.append(
            reqwest::header::HeaderName::from_bytes(name.as_bytes())?,
            value.parse()?,
        );
    }
    request = request.headers(headers);
    if let Some(body) = &case.body {
        request = request.body(body.clone());
    }
    let imds_before = topology.imds_calls_for(&resource);
    let response = request.send().await.context("request failed")?;
    let status = response.status().as_u16();
    let error_header = response
        .headers()
        .get("x-azgate-error")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = response.text().await?;
    ensure!(
        challenge == case.expect.www_authenticate,
        "www-authenticate {challenge:?}, expected {:?}",
        case.expect.www_authenticate
    );
    *observed = Some(format!(
        "{status} {}",
        error_header.as_deref().unwrap_or("(forwarded)")
    ));
    ensure!(
        status == case.expect.status,
        "status {status}, expected {}; body: {body}",
        case.expect.status
    );
    let seen = topology.azure.seen_with_path(&format!("{path_prefix}/"));
    if let Some(code) = &case.expect.code {
        ensure!(
            error_header.as_deref() == Some(code.as_str()),
            "x-azgate-error {error_header:?}, expected {code}; body: {body}"
        );
        ensure!(
            content_type.starts_with("application/json"),
            "content-type {content_type:?}"
        );
        let json: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("error body is not JSON: {body}"))?;
        ensure!(json["error"]["code"] == code.as_str(), "error body {json}");
        ensure!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| m.len() > 10),
            "error message missing: {json}"
        );
        ensure!(
            seen.is_empty(),
            "the upstream saw a refused request: {seen:?}"
        );
    }
    if let Some(expected) = &case.expect.upstream {
        ensure!(
            seen.len() == 1,
            "upstream saw {} requests, expected 1",
            seen.len()
        );
        let got = &seen[0];
        ensure!(
            body.contains("\"fake\":\"azure\""),
            "the answer did not come from upstream: {body}"
        );
        ensure!(
            got.method == method.as_str(),
            "upstream method {}",
            got.method
        );
        ensure!(
            got.path == path,
            "upstream path {:?}, expected {path:?}",
            got.path
        );
        got.check_granted(
            &expected.host,
            &resource,
            &identity(suite, &expected.identity),
            jwt.as_deref(),
        )?;
        if let Some(sent) = &case.body {
            ensure!(got.body == sent.as_bytes(), "upstream body differs");
        }
    }
    if let Some(calls) = case.expect.imds_calls {
        let made = topology.imds_calls_for(&resource) - imds_before;
        ensure!(made == calls, "{made} IMDS calls, expected {calls}");
    } else {
        let made = topology.imds_calls_for(&resource) - imds_before;
        ensure!(made == 0, "a refused request made {made} IMDS calls");
    }
    Ok(())
}
