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
use azgate_tests::jwt;
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

// === the case files ===

#[derive(Deserialize)]
struct SuiteFile {
    identities: HashMap<String, String>,
    roles: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    #[allow(dead_code, reason = "documentation in the file")]
    about: String,
    #[serde(default)]
    defaults: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    certificates: HashMap<String, serde_json::Value>,
    cases: Vec<serde_json::Value>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Protocol {
    H1,
    H2,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::H1 => "h1",
            Protocol::H2 => "h2",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Listener {
    #[default]
    Mtls,
    Lenient,
}

/// How an HTTP/1.1 body is framed.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Framing {
    /// `content-length` with the body's length (HTTP/2: DATA frames).
    #[default]
    ContentLength,
    /// `transfer-encoding: chunked`, one chunk.
    Chunked,
    /// No framing header: the case's headers say what they say.
    None,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    #[allow(dead_code, reason = "documentation in the file")]
    note: Option<String>,
    #[serde(default = "default_protocols")]
    protocols: Vec<Protocol>,
    #[serde(default)]
    listener: Listener,
    /// A certificate name (of the file's `certificates`, or `reader`), an inline spec, or null.
    #[serde(default = "default_cert")]
    cert: serde_json::Value,
    #[serde(default = "default_jwt")]
    jwt: Option<JwtSpec>,
    /// `Authorization` values (raw, `$jwt` = the case's token).
    #[serde(default = "default_authorization")]
    authorization: Vec<String>,
    /// `X-Forwarded-Host` values (raw).
    #[serde(default = "default_forwarded_host")]
    forwarded_host: Vec<String>,
    /// More header fields (raw name, raw value), after the ones above.
    #[serde(default)]
    headers: Vec<(String, String)>,
    #[serde(default = "default_method")]
    method: String,
    /// What follows `/hostile/<marker>` in the request target.
    #[serde(default = "default_target")]
    target: String,
    /// The whole request target instead (`$path` = the marked path).
    #[serde(default)]
    target_raw: Option<String>,
    /// HTTP/1.1 only: the whole request, verbatim after placeholders (`$path`, `$jwt`,
    /// `$marker`, `$authority`, `$xfh`).
    #[serde(default)]
    h1_raw: Option<String>,
    /// HTTP/1.1: the version in the request line.
    #[serde(default = "default_version")]
    h1_version: String,
    /// Leave out `Host` (HTTP/1.1) / `:authority` (HTTP/2).
    #[serde(default)]
    no_host: bool,
    /// HTTP/2 only: the pseudo-header fields, verbatim and in this order.
    #[serde(default)]
    pseudo: Option<Vec<(String, String)>>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    framing: Framing,
    /// Send the headers (and body) but never end the request.
    #[serde(default)]
    leave_open: bool,
    /// HTTP/1.1: half-close the connection after the request bytes.
    #[serde(default)]
    half_close: bool,
    /// `[name, value, count]`: that many more header fields (`{n}` in the name = 0, 1, …).
    #[serde(default)]
    flood: Option<(String, String, usize)>,
    /// Stated outcome(s): see [`Expect::parse`].
    expect: ExpectText,
    #[serde(default)]
    upstream: Option<UpstreamExpect>,
    /// Per-runtime expectations (`envoy`, `serve`, `envoy-rendered`, comma-joined), each with
    /// its reason; a pinned runtime must answer as pinned.
    #[serde(default)]
    pin: BTreeMap<String, Pin>,
    /// After the case, the same runtime serves an allowed request (same connection if it is
    /// still open, else a new one).
    #[serde(default)]
    then_served: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum ExpectText {
    One(String),
    Any(Vec<String>),
}

impl ExpectText {
    fn alternatives(&self) -> Vec<String> {
        match self {
            ExpectText::One(text) => text.split('|').map(|s| s.trim().to_string()).collect(),
            ExpectText::Any(list) => list.clone(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pin {
    expect: ExpectText,
    reason: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamExpect {
    #[serde(default = "default_identity")]
    identity: String,
    #[serde(default = "default_host")]
    host: String,
    #[serde(default)]
    method: Option<String>,
    /// The path the upstream must see (`$path` = the marked path); default the marked path.
    #[serde(default)]
    path: Option<String>,
}

impl Default for UpstreamExpect {
    fn default() -> Self {
        Self {
            identity: default_identity(),
            host: default_host(),
            method: None,
            path: None,
        }
    }
}

/// How the case's JWT is made. Defaults: what tsh sends (signed by the certificate's key,
/// `{"alg": <key's>, "typ": "JWT"}`, claims `resource` and `tid`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct JwtSpec {
    /// `cert` (the client certificate's key), `attacker` (the attacker's P-256 key, whose
    /// self-signed admin certificate the injection cases smuggle), `other` (an unrelated
    /// P-256 key), `other_rsa`.
    #[serde(default)]
    signer: Option<String>,
    /// The header's `alg`.
    #[serde(default)]
    alg: Option<String>,
    /// Header members merged in (`null` removes one). String values `$attacker_jwk`,
    /// `$attacker_x5c`, `$cert_x5c` become those JSON values.
    #[serde(default)]
    header: serde_json::Map<String, serde_json::Value>,
    /// The header's exact text (escapes allowed; `$alg` = the key's algorithm).
    #[serde(default)]
    header_raw: Option<String>,
    /// Claims merged in (`null` removes one; `"$pad:N"` = N × "x").
    #[serde(default)]
    claims: serde_json::Map<String, serde_json::Value>,
    /// Claims as JSON text appended to the payload object (`$now`, `$now_plus:N`,
    /// `$now_minus:N`).
    #[serde(default)]
    claims_json: BTreeMap<String, String>,
    /// The payload's exact text (`$resource`, `$now…`).
    #[serde(default)]
    claims_raw: Option<String>,
    #[serde(default)]
    exp_offset_s: Option<i64>,
    #[serde(default)]
    nbf_offset_s: Option<i64>,
    /// How the signature is made: see [`signature`].
    #[serde(default)]
    signature: Option<String>,
    /// The token's shape: `$h`, `$p`, `$s` (base64url, no padding), `$h_pad`, `$p_pad`,
    /// `$s_pad` (padded), `$s_std` (standard alphabet, padded). Default `$h.$p.$s`.
    #[serde(default)]
    token: Option<String>,
}

fn default_protocols() -> Vec<Protocol> {
    vec![Protocol::H1, Protocol::H2]
}
fn default_cert() -> serde_json::Value {
    "reader".into()
}
fn default_jwt() -> Option<JwtSpec> {
    Some(JwtSpec::default())
}
fn default_authorization() -> Vec<String> {
    vec!["Bearer $jwt".into()]
}
fn default_forwarded_host() -> Vec<String> {
    vec!["management.azure.com".into()]
}
fn default_method() -> String {
    "GET".into()
}
fn default_target() -> String {
    "/subscriptions?api-version=2022-12-01".into()
}
fn default_version() -> String {
    "HTTP/1.1".into()
}
fn default_identity() -> String {
    "reader".into()
}
fn default_host() -> String {
    "management.azure.com".into()
}

/// The gateways' own refusals of a body that is malformed, incomplete, too large or too slow
/// (`ServeError`, the rendered Envoy config's local replies): they come after the filter's
/// decision, which may have fetched a token.
const GATEWAY_BODY_REFUSALS: [&str; 3] = ["BadRequest", "RequestTimeout", "RequestTooLarge"];

/// One outcome a case may state.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Expect {
    /// Forwarded upstream with the managed-identity token (`200`).
    Forwarded,
    /// A refusal by azgate: this status and `x-azgate-error` code, Azure-style JSON.
    Refused { status: u16, code: String },
    /// An answer without an azgate code (a codec's own): `400 -`, or a class `4xx -`.
    Plain { status: u16, class: bool },
    /// No answer: connection closed or stream reset.
    Closed,
    /// TLS refused the client.
    TlsRefused,
}

impl Expect {
    /// `200`, `<status> <Code>`, `<status> -`, `4xx -`, `closed`, `tls_refused`.
    fn parse(text: &str) -> Result<Self> {
        let text = text.trim();
        Ok(match text {
            "200" => Self::Forwarded,
            "closed" => Self::Closed,
            "tls_refused" => Self::TlsRefused,
            _ => {
                let (status, code) = text
                    .split_once(' ')
                    .ok_or_else(|| anyhow!("unreadable expectation {text:?}"))?;
                let (status, class) = match status.strip_suffix("xx") {
                    Some(class) => (class.parse::<u16>()? * 100, true),
                    None => (status.parse::<u16>()?, false),
                };
                ensure!(
                    (400..500).contains(&status),
                    "expectation {text:?}: the corpus never expects a non-4xx refusal (no 5xx)"
                );
                match code.trim() {
                    "-" => Self::Plain { status, class },
                    code if !class => Self::Refused {
                        status,
                        code: code.to_string(),
                    },
                    _ => bail!("a status class takes no code: {text:?}"),
                }
            }
        })
    }

    fn refused(&self) -> bool {
        *self != Expect::Forwarded
    }
}

/// A case ready to run: one protocol, expectations parsed.
#[derive(Clone)]
struct Concrete {
    id: String,
    category: String,
    marker: String,
    case: Case,
    protocol: Protocol,
    cert: Option<CertSpec>,
    expect: Vec<Expect>,
    pins: Vec<(Vec<String>, Vec<Expect>, String)>,
}

impl Concrete {
    /// What `runtime` must answer, and whether a pin says so.
    fn expected(&self, runtime: &str) -> (Vec<Expect>, Option<&str>) {
        for (runtimes, expect, reason) in &self.pins {
            if runtimes.iter().any(|r| r == runtime) {
                return (expect.clone(), Some(reason.as_str()));
            }
        }
        (self.expect.clone(), None)
    }

    fn all_refused(&self, runtime: &str) -> bool {
        self.expected(runtime).0.iter().all(Expect::refused)
    }
}

struct Suite {
    identities: HashMap<String, String>,
    roles: Vec<serde_json::Value>,
    cases: Vec<Concrete>,
}

fn load_suite() -> Result<Suite> {
    let dir = azgate_tests::topology::repo_root().join("tests/cases/hostile");
    let suite_text = std::fs::read_to_string(dir.join("suite.json")).context("suite.json")?;
    let mut suite_value: serde_json::Value = serde_json::from_str(&suite_text)?;
    let identities: HashMap<String, String> =
        serde_json::from_value(suite_value["identities"].clone())?;
    if let Some(roles) = suite_value["roles"].as_array_mut() {
        for role in roles {
            for side in ["allow", "deny"] {
                if let Some(ids) = role["spec"][side]["azure_identities"].as_array_mut() {
                    for id in ids {
                        if let Some(name) = id.as_str().and_then(|s| s.strip_prefix('$')) {
                            *id = identities
                                .get(name)
                                .cloned()
                                .ok_or_else(|| anyhow!("unknown identity ${name}"))?
                                .into();
                        }
                    }
                }
            }
        }
    }
    let suite_file: SuiteFile = serde_json::from_value(suite_value)?;
    let mut names: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json") && n != "suite.json")
        .collect();
    names.sort();
    let mut cases = Vec::new();
    let mut seen_ids = std::collections::HashSet::new();
    for name in names {
        let category = name.trim_end_matches(".json").to_string();
        let text = std::fs::read_to_string(dir.join(&name))?;
        let file: CaseFile =
            serde_json::from_str(&text).with_context(|| format!("tests/cases/hostile/{name}"))?;
        let mut expanded = Vec::new();
        for entry in &file.cases {
            expanded.extend(
                expand_entry(entry, &file.defaults)
                    .with_context(|| format!("{name}: {}", short(entry)))?,
            );
        }
        for value in expanded {
            let case: Case = serde_json::from_value(value.clone())
                .with_context(|| format!("{name}: case {}", short(&value)))?;
            let cert = resolve_cert(&case.cert, &file.certificates)
                .with_context(|| format!("{name}: {}: certificate", case.name))?;
            let expect =
                parse_expect(&case.expect).with_context(|| format!("{name}: {}", case.name))?;
            let mut pins = Vec::new();
            for (runtimes, pin) in &case.pin {
                ensure!(
                    !pin.reason.trim().is_empty(),
                    "{}: a pin needs a reason",
                    case.name
                );
                let runtimes: Vec<String> =
                    runtimes.split(',').map(|r| r.trim().to_string()).collect();
                for runtime in &runtimes {
                    ensure!(
                        ["envoy", "serve", "envoy-rendered"].contains(&runtime.as_str()),
                        "{}: pin for unknown runtime {runtime:?}",
                        case.name
                    );
                }
                pins.push((runtimes, parse_expect(&pin.expect)?, pin.reason.clone()));
            }
            for protocol in &case.protocols {
                let id = format!("{category}::{} [{}]", case.name, protocol.name());
                ensure!(seen_ids.insert(id.clone()), "duplicate case {id}");
                let marker = format!("hx{:05}", cases.len());
                // `$marker` anywhere in the case (a claim, a header) names this case.
                let marked: Case = serde_json::from_value(substitute(
                    &value,
                    &[("marker".to_string(), marker.clone())],
                    "$",
                ))?;
                cases.push(Concrete {
                    id,
                    category: category.clone(),
                    marker,
                    case: marked,
                    protocol: *protocol,
                    cert: cert.clone(),
                    expect: expect.clone(),
                    pins: pins.clone(),
                });
            }
        }
    }
    Ok(Suite {
        identities: suite_file.identities,
        roles: suite_file.roles,
        cases,
    })
}

fn short(value: &serde_json::Value) -> String {
    let text = value
        .get("name")
        .or_else(|| value.get("family"))
        .map(|v| v.to_string())
        .unwrap_or_else(|| value.to_string());
    text.chars().take(120).collect()
}

fn parse_expect(text: &ExpectText) -> Result<Vec<Expect>> {
    text.alternatives()
        .iter()
        .map(|t| Expect::parse(t))
        .collect()
}

fn resolve_cert(
    value: &serde_json::Value,
    named: &HashMap<String, serde_json::Value>,
) -> Result<Option<CertSpec>> {
    Ok(match value {
        serde_json::Value::Null => None,
        serde_json::Value::String(name) if name == "reader" => Some(CertSpec::default()),
        serde_json::Value::String(name) => {
            let spec = named
                .get(name)
                .ok_or_else(|| anyhow!("no certificate named {name:?}"))?;
            Some(serde_json::from_value(spec.clone())?)
        }
        spec @ serde_json::Value::Object(_) => Some(serde_json::from_value(spec.clone())?),
        other => bail!("a certificate is a name, a spec or null, not {other}"),
    })
}

/// Field names of [`Case`]: in a family row, these override the template; anything else is a
/// variable substituted as `{name}` into the template's strings.
const CASE_FIELDS: &[&str] = &[
    "name",
    "note",
    "protocols",
    "listener",
    "cert",
    "jwt",
    "authorization",
    "forwarded_host",
    "headers",
    "method",
    "target",
    "target_raw",
    "h1_raw",
    "h1_version",
    "no_host",
    "pseudo",
    "body",
    "framing",
    "leave_open",
    "half_close",
    "flood",
    "expect",
    "upstream",
    "pin",
    "then_served",
];

/// A case, or a family `{"family": …, "template": {…}, "rows": [{…}], "each": {var: [values]}}`
/// expanded into one case per row × combination of `each`.
fn expand_entry(
    entry: &serde_json::Value,
    defaults: &serde_json::Map<String, serde_json::Value>,
) -> Result<Vec<serde_json::Value>> {
    let with_defaults = |case: serde_json::Value| -> serde_json::Value {
        let mut merged = defaults.clone();
        if let serde_json::Value::Object(fields) = case {
            merged.extend(fields);
        }
        serde_json::Value::Object(merged)
    };
    let Some(family) = entry.get("family").and_then(|f| f.as_str()) else {
        return Ok(vec![with_defaults(entry.clone())]);
    };
    for key in entry.as_object().map(|o| o.keys()).into_iter().flatten() {
        ensure!(
            ["family", "template", "rows", "each", "note"].contains(&key.as_str()),
            "family {family}: unknown key {key:?}"
        );
    }
    let template = entry
        .get("template")
        .cloned()
        .unwrap_or_else(|| serde_json::json!({}));
    let rows: Vec<serde_json::Value> = match entry.get("rows") {
        Some(serde_json::Value::Array(rows)) => rows.clone(),
        None => vec![serde_json::json!({})],
        Some(other) => bail!("family {family}: rows must be a list, not {other}"),
    };
    // Each combination: variables, and case fields set by `each` objects.
    type Combination = (
        Vec<(String, String)>,
        serde_json::Map<String, serde_json::Value>,
    );
    let mut combinations: Vec<Combination> = vec![(Vec::new(), serde_json::Map::new())];
    if let Some(each) = entry.get("each").and_then(|e| e.as_object()) {
        for (var, values) in each {
            let values = values
                .as_array()
                .ok_or_else(|| anyhow!("family {family}: each.{var} must be a list"))?;
            let mut next = Vec::new();
            for (vars, fields) in &combinations {
                for value in values {
                    let (mut vars, mut fields) = (vars.clone(), fields.clone());
                    match value {
                        serde_json::Value::String(text) => vars.push((var.clone(), text.clone())),
                        serde_json::Value::Object(object) => {
                            for (key, field) in object {
                                if CASE_FIELDS.contains(&key.as_str()) {
                                    fields.insert(key.clone(), field.clone());
                                } else {
                                    let text = field
                                        .as_str()
                                        .map(str::to_string)
                                        .unwrap_or_else(|| field.to_string());
                                    vars.push((key.clone(), text));
                                }
                            }
                        }
                        other => bail!("family {family}: each.{var} holds {other}"),
                    }
                    next.push((vars, fields));
                }
            }
            combinations = next;
        }
    }
    let mut out = Vec::new();
    for row in &rows {
        let row = row
            .as_object()
            .ok_or_else(|| anyhow!("family {family}: a row is an object"))?;
        for (combination, each_fields) in &combinations {
            let mut vars = combination.clone();
            let mut overrides = serde_json::Map::new();
            for (key, value) in row {
                if CASE_FIELDS.contains(&key.as_str()) {
                    // A case field with a string value is also a variable (`{method}`).
                    if let Some(text) = value.as_str() {
                        vars.push((key.clone(), text.to_string()));
                    }
                    overrides.insert(key.clone(), value.clone());
                } else {
                    let text = value
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| value.to_string());
                    vars.push((key.clone(), text));
                }
            }
            overrides.extend(each_fields.clone());
            let mut case = substitute(&template, &vars, "{}");
            let overrides = substitute(&serde_json::Value::Object(overrides), &vars, "{}");
            if let (Some(case), Some(overrides)) = (case.as_object_mut(), overrides.as_object()) {
                case.extend(overrides.clone());
            }
            if case.get("name").is_none() {
                let label: Vec<String> = vars.iter().map(|(k, v)| format!("{k}={v}")).collect();
                case["name"] = format!("{family}: {}", label.join(", ")).into();
            }
            out.push(with_defaults(case));
        }
    }
    Ok(out)
}

fn substitute(
    value: &serde_json::Value,
    vars: &[(String, String)],
    style: &str,
) -> serde_json::Value {
    match value {
        serde_json::Value::String(text) => {
            let mut text = text.clone();
            for (var, replacement) in vars {
                let pattern = if style == "$" {
                    format!("${var}")
                } else {
                    format!("{{{var}}}")
                };
                text = text.replace(&pattern, replacement);
            }
            serde_json::Value::String(text)
        }
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.iter().map(|v| substitute(v, vars, style)).collect())
        }
        serde_json::Value::Object(fields) => serde_json::Value::Object(
            fields
                .iter()
                .map(|(k, v)| {
                    let key = substitute(&serde_json::Value::String(k.clone()), vars, style);
                    (
                        key.as_str().unwrap_or(k).to_string(),
                        substitute(v, vars, style),
                    )
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

// === tokens ===

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// `$now`, `$now_plus:N`, `$now_minus:N` and `$resource` in JSON text.
fn time_placeholders(text: &str, resource: &str) -> String {
    let mut out = text.replace("$resource", resource);
    for (tag, sign) in [("$now_plus:", 1i64), ("$now_minus:", -1i64)] {
        while let Some(start) = out.find(tag) {
            let digits: String = out[start + tag.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            let offset: i64 = digits.parse().unwrap_or_default();
            out.replace_range(
                start..start + tag.len() + digits.len(),
                &(now() + sign * offset).to_string(),
            );
        }
    }
    out.replace("$now", &now().to_string())
}

fn natural_alg(key: &HostileKey) -> &'static str {
    match key {
        HostileKey::P256(_) => "ES256",
        HostileKey::P384(_) => "ES384",
        HostileKey::Rsa(_) => "RS256",
        HostileKey::Ed25519 { .. } => "EdDSA",
    }
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut block = if key.len() > 64 {
        Sha256::digest(key).to_vec()
    } else {
        key.to_vec()
    };
    block.resize(64, 0);
    let inner: Vec<u8> = block.iter().map(|b| b ^ 0x36).collect();
    let outer: Vec<u8> = block.iter().map(|b| b ^ 0x5c).collect();
    let mut hasher = Sha256::new();
    hasher.update(&inner);
    hasher.update(message);
    let inner_hash = hasher.finalize();
    let mut hasher = Sha256::new();
    hasher.update(&outer);
    hasher.update(inner_hash);
    hasher.finalize().to_vec()
}

/// The P-256 curve order n, big-endian.
const P256_ORDER: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];

/// The signature a case asks for over `input`:
/// `valid` (the key's own algorithm), `high_s` / `low_s` (ES256 with s above / below n/2),
/// `der` (ES256 as DER instead of r‖s), `ps256` (RSA-PSS), `hs256:<secret>` (HMAC with the
/// certificate's `spki_pem`, `spki_der`, `cert_pem`, `cert_der` or `empty` as the secret),
/// `empty`, `zeros:N`, `flip`, `truncate`, `extend`, `swap_rs`, `r_zero`, `s_zero`, `r_n`,
/// `other_input`.
fn signature(kind: &str, key: &HostileKey, cert: Option<&Minted>, input: &[u8]) -> Result<Vec<u8>> {
    use p256::ecdsa::signature::Signer;
    let valid = |message: &[u8]| -> Result<Vec<u8>> {
        if let Some(sig) = key.sign_eddsa(message) {
            return Ok(sig);
        }
        let jwt_key = key
            .jwt_key()
            .ok_or_else(|| anyhow!("no JWT signing for this key"))?;
        Ok(match jwt_key {
            azgate_tests::pki::PrivateKey::P256(k) => {
                let sig: p256::ecdsa::Signature = k.sign(message);
                sig.to_bytes().to_vec()
            }
            azgate_tests::pki::PrivateKey::P384(k) => {
                let sig: p384::ecdsa::Signature = k.sign(message);
                sig.to_bytes().to_vec()
            }
            azgate_tests::pki::PrivateKey::Rsa(k) => {
                k.sign(rsa::Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(message))?
            }
        })
    };
    let p256_key = || match key {
        HostileKey::P256(k) => Ok(k.clone()),
        _ => Err(anyhow!("signature {kind} needs a P-256 key")),
    };
    Ok(match kind {
        "valid" => valid(input)?,
        "high_s" | "low_s" => {
            let sig: p256::ecdsa::Signature = p256_key()?.sign(input);
            let low = sig.normalize_s().unwrap_or(sig);
            if kind == "low_s" {
                low.to_bytes().to_vec()
            } else {
                let (r, s) = low.split_scalars();
                let high_s = -*s.as_ref();
                p256::ecdsa::Signature::from_scalars(r.to_bytes(), high_s.to_bytes())?
                    .to_bytes()
                    .to_vec()
            }
        }
        "der" => {
            let sig: p256::ecdsa::Signature = p256_key()?.sign(input);
            sig.to_der().as_bytes().to_vec()
        }
        "ps256" => {
            use rsa::signature::{RandomizedSigner, SignatureEncoding};
            let HostileKey::Rsa(k) = key else {
                bail!("ps256 needs an RSA key");
            };
            rsa::pss::BlindedSigningKey::<Sha256>::new((**k).clone())
                .try_sign_with_rng(&mut rand_core::OsRng, input)?
                .to_vec()
        }
        secret if secret.starts_with("hs256:") => {
            let cert = cert.ok_or_else(|| anyhow!("{kind} needs a certificate"))?;
            let spki = cert.key.spki_der()?;
            let der = cert
                .chain_der
                .first()
                .cloned()
                .ok_or_else(|| anyhow!("empty chain"))?;
            let pem = |label: &str, der: &[u8]| {
                let body = STANDARD.encode(der);
                let lines: Vec<&str> = body
                    .as_bytes()
                    .chunks(64)
                    .filter_map(|c| std::str::from_utf8(c).ok())
                    .collect();
                format!(
                    "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
                    lines.join("\n")
                )
            };
            let secret = match &secret["hs256:".len()..] {
                "spki_pem" => pem("PUBLIC KEY", &spki).into_bytes(),
                "spki_der" => spki,
                "cert_pem" => cert.cert_pem.clone().into_bytes(),
                "cert_der" => der,
                "empty" => Vec::new(),
                other => bail!("unknown HMAC secret {other:?}"),
            };
            hmac_sha256(&secret, input)
        }
        "empty" => Vec::new(),
        zeros if zeros.starts_with("zeros:") => vec![0; zeros["zeros:".len()..].parse()?],
        "flip" => {
            let mut sig = valid(input)?;
            if let Some(last) = sig.last_mut() {
                *last ^= 0x01;
            }
            sig
        }
        "truncate" => {
            let mut sig = valid(input)?;
            sig.pop();
            sig
        }
        "extend" => {
            let mut sig = valid(input)?;
            sig.push(0);
            sig
        }
        "swap_rs" => {
            let sig = valid(input)?;
            let (r, s) = sig.split_at(sig.len() / 2);
            [s, r].concat()
        }
        "r_zero" | "s_zero" | "r_n" => {
            let sig = valid(input)?;
            let (r, s) = sig.split_at(32);
            match kind {
                "r_zero" => [&[0u8; 32][..], s].concat(),
                "s_zero" => [r, &[0u8; 32][..]].concat(),
                _ => [&P256_ORDER[..], s].concat(),
            }
        }
        "other_input" => valid(b"eyJhbGciOiJFUzI1NiJ9.e30")?,
        other => bail!("unknown signature kind {other:?}"),
    })
}

fn attacker_jwk(key: &HostileKey) -> Result<serde_json::Value> {
    let HostileKey::P256(k) = key else {
        bail!("the attacker key is P-256");
    };
    let point = k.verifying_key().to_encoded_point(false);
    let x = point.x().ok_or_else(|| anyhow!("no x"))?;
    let y = point.y().ok_or_else(|| anyhow!("no y"))?;
    Ok(serde_json::json!({
        "kty": "EC", "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
    }))
}

/// The case's bearer token.
fn make_token(
    spec: &JwtSpec,
    pki: &HostilePki,
    cert: Option<&Minted>,
    resource: &str,
) -> Result<String> {
    let key = match (spec.signer.as_deref(), cert) {
        (None | Some("cert"), Some(cert)) => cert.key.clone(),
        (None | Some("cert") | Some("other"), None) | (Some("other"), _) => key_for("p256:other")?,
        (Some("attacker"), _) => key_for("p256:attacker")?,
        (Some("other_rsa"), _) => key_for("rsa2048:other")?,
        (Some(other), _) => bail!("unknown signer {other:?}"),
    };
    let attacker_cert = pki.mint(&CertSpec {
        issuer: azgate_tests::hostile_pki::Issuer::SelfSigned,
        key: KeyChoice("p256:attacker".into()),
        cn: Some("mallory".into()),
        o: vec!["azure-admin".into()],
        identity: Some("admin".into()),
        allowed: vec!["admin".into()],
        ..CertSpec::default()
    })?;
    let alg = spec
        .alg
        .clone()
        .unwrap_or_else(|| natural_alg(&key).to_string());
    let header_bytes = match &spec.header_raw {
        Some(raw_text) => raw::unescape(&pki.expand(&raw_text.replace("$alg", natural_alg(&key)))),
        None => {
            let mut header = serde_json::Map::new();
            header.insert("alg".into(), alg.clone().into());
            header.insert("typ".into(), "JWT".into());
            for (name, value) in &spec.header {
                let value = match value.as_str() {
                    Some("$attacker_jwk") => attacker_jwk(&attacker_cert.key)?,
                    Some("$attacker_x5c") => {
                        serde_json::json!([STANDARD.encode(&attacker_cert.chain_der[0])])
                    }
                    Some("$cert_x5c") => serde_json::json!([STANDARD.encode(
                        cert.and_then(|c| c.chain_der.first())
                            .ok_or_else(|| anyhow!("$cert_x5c needs a certificate"))?
                    )]),
                    _ => value.clone(),
                };
                if value.is_null() {
                    header.remove(name);
                } else {
                    header.insert(name.clone(), value);
                }
            }
            serde_json::Value::Object(header).to_string().into_bytes()
        }
    };
    let payload_bytes = match &spec.claims_raw {
        Some(raw_text) => raw::unescape(&pki.expand(&time_placeholders(raw_text, resource))),
        None => {
            let mut claims = serde_json::Map::new();
            claims.insert("resource".into(), resource.into());
            claims.insert("tid".into(), "00000000-0000-0000-0000-00000000beef".into());
            for (name, value) in &spec.claims {
                match value {
                    serde_json::Value::Null => {
                        claims.remove(name);
                    }
                    serde_json::Value::String(s) if s.starts_with("$pad:") => {
                        let n: usize = s["$pad:".len()..].parse()?;
                        claims.insert(name.clone(), "x".repeat(n).into());
                    }
                    other => {
                        claims.insert(name.clone(), other.clone());
                    }
                }
            }
            if let Some(offset) = spec.exp_offset_s {
                claims.insert("exp".into(), (now() + offset).into());
            }
            if let Some(offset) = spec.nbf_offset_s {
                claims.insert("nbf".into(), (now() + offset).into());
            }
            let mut text = serde_json::Value::Object(claims).to_string();
            for (name, json) in &spec.claims_json {
                text.pop();
                text.push_str(&format!(
                    ",{}:{}}}",
                    serde_json::Value::String(name.clone()),
                    time_placeholders(json, resource)
                ));
            }
            text.into_bytes()
        }
    };
    let h = URL_SAFE_NO_PAD.encode(&header_bytes);
    let p = URL_SAFE_NO_PAD.encode(&payload_bytes);
    let input = format!("{h}.{p}");
    let sig = signature(
        spec.signature.as_deref().unwrap_or("valid"),
        &key,
        cert,
        input.as_bytes(),
    )?;
    let template = spec.token.as_deref().unwrap_or("$h.$p.$s");
    // A padded variant that needs no padding would be the valid token under another name.
    for (placeholder, len) in [
        ("$h_pad", header_bytes.len()),
        ("$p_pad", payload_bytes.len()),
        ("$s_pad", sig.len()),
    ] {
        ensure!(
            !template.contains(placeholder) || len % 3 != 0,
            "{placeholder}: {len} bytes need no base64 padding; make the case's part longer"
        );
    }
    Ok(template
        .replace("$h_pad", &URL_SAFE.encode(&header_bytes))
        .replace("$p_pad", &URL_SAFE.encode(&payload_bytes))
        .replace("$s_pad", &URL_SAFE.encode(&sig))
        .replace("$s_std", &STANDARD.encode(&sig))
        .replace("$h", &h)
        .replace("$p", &p)
        .replace("$s", &URL_SAFE_NO_PAD.encode(&sig)))
}

fn key_for(choice: &str) -> Result<HostileKey> {
    azgate_tests::hostile_pki::shared_key(&KeyChoice(choice.into()))
}

// === running a case ===

/// What a runtime did with a case.
#[derive(Clone, Debug)]
enum Observed {
    Answer {
        status: u16,
        code: Option<String>,
        from_upstream: bool,
    },
    Closed(String),
    TlsRefused(String),
    TimedOut,
}

impl Observed {
    fn describe(&self) -> String {
        match self {
            Observed::Answer {
                status,
                code,
                from_upstream,
            } => match (code, from_upstream) {
                (Some(code), _) => format!("{status} {code}"),
                (None, true) => format!("{status} (forwarded)"),
                (None, false) => format!("{status} -"),
            },
            Observed::Closed(why) => format!("closed ({why})"),
            Observed::TlsRefused(why) => format!("tls_refused ({why})"),
            Observed::TimedOut => "no answer (hang)".into(),
        }
    }
}

/// One topology per runtime, started on first use, and its certificate minter.
struct Shared {
    runtime: Runtime,
    options: Options,
    identities: HashMap<String, String>,
    cell: OnceCell<(Topology, HostilePki)>,
}

impl Shared {
    async fn get(&self) -> Result<&(Topology, HostilePki)> {
        self.cell
            .get_or_try_init(|| async {
                let topology = Topology::start(self.runtime, self.options.clone()).await?;
                let pki = HostilePki::new(topology.ca.authority(), self.identities.clone())?;
                Ok::<_, anyhow::Error>((topology, pki))
            })
            .await
    }
}

/// Per runtime: what each case observed and whether it passed.
#[derive(Default)]
struct Results {
    rows: Mutex<BTreeMap<(&'static str, String), Row>>,
}

#[derive(Clone)]
struct Row {
    marker: String,
    category: String,
    observed: Option<Observed>,
    passed: bool,
    refused_expected: bool,
}

impl Results {
    fn record(&self, runtime: &'static str, case: &Concrete, row: Row) {
        if let Ok(mut rows) = self.rows.lock() {
            rows.insert((runtime, case.id.clone()), row);
        }
    }
}

struct Request {
    /// The bytes (HTTP/1.1) or frames (HTTP/2) to send.
    h1: Vec<u8>,
    h2: H2Request,
    head: bool,
    half_close: bool,
    /// The method as sent (for comparing with what the upstream saw).
    method: String,
}

fn build_request(
    case: &Concrete,
    topology: &Topology,
    pki: &HostilePki,
    jwt_token: Option<&str>,
    resource: &str,
) -> Result<Request> {
    let c = &case.case;
    let port = match c.listener {
        Listener::Mtls => topology.gateway.mtls.port(),
        Listener::Lenient => topology.gateway.lenient.port(),
    };
    let authority = format!("localhost:{port}");
    let path = format!("{PATH_PREFIX}{}{}", case.marker, c.target);
    let fill = |text: &str| -> Vec<u8> {
        let text = text
            .replace("$jwt", jwt_token.unwrap_or("no-token"))
            .replace("$path", &path)
            .replace("$marker", &case.marker)
            .replace("$authority", &authority)
            .replace("$resource", resource)
            .replace(
                "$xfh",
                c.forwarded_host.first().map(String::as_str).unwrap_or(""),
            );
        raw::unescape(&pki.expand(&text))
    };
    let target = match &c.target_raw {
        Some(t) => fill(t),
        None => fill(&path),
    };
    let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    fields.push((b"x-hostile-case".to_vec(), case.marker.clone().into_bytes()));
    if jwt_token.is_some() {
        for value in &c.authorization {
            fields.push((b"authorization".to_vec(), fill(value)));
        }
    }
    for value in &c.forwarded_host {
        fields.push((b"x-forwarded-host".to_vec(), fill(value)));
    }
    for (name, value) in &c.headers {
        fields.push((fill(name), fill(value)));
    }
    if let Some((name, value, count)) = &c.flood {
        let value = fill(value);
        for n in 0..*count {
            fields.push((fill(&name.replace("{n}", &n.to_string())), value.clone()));
        }
    }
    let body = c.body.as_deref().map(fill);
    let sent_method = match (case.protocol, &c.h1_raw, &c.pseudo) {
        (Protocol::H1, Some(raw_text), _) => {
            let raw_bytes = fill(raw_text);
            let start = raw_bytes
                .iter()
                .position(|b| !b"\r\n".contains(b))
                .unwrap_or(0);
            let line = &raw_bytes[start..];
            let end = line
                .iter()
                .position(|b| b.is_ascii_whitespace())
                .unwrap_or(0);
            String::from_utf8_lossy(&line[..end]).into_owned()
        }
        (Protocol::H2, _, Some(pseudo)) => pseudo
            .iter()
            .find(|(k, _)| k == ":method")
            .map(|(_, v)| String::from_utf8_lossy(&fill(v)).into_owned())
            .unwrap_or_default(),
        _ => String::from_utf8_lossy(&fill(&c.method)).into_owned(),
    };
    // HTTP/1.1
    let h1 = match &c.h1_raw {
        Some(raw_text) => fill(raw_text),
        None => {
            let mut out = Vec::new();
            out.extend(fill(&c.method));
            out.push(b' ');
            out.extend(&target);
            out.push(b' ');
            out.extend(c.h1_version.as_bytes());
            out.extend(b"\r\n");
            if !c.no_host {
                out.extend(format!("host: {authority}\r\n").as_bytes());
            }
            for (name, value) in &fields {
                out.extend(name);
                out.extend(b": ");
                out.extend(value);
                out.extend(b"\r\n");
            }
            match (&body, c.framing) {
                (Some(body), Framing::ContentLength) => {
                    out.extend(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
                    out.extend(body);
                }
                (Some(body), Framing::Chunked) => {
                    out.extend(b"transfer-encoding: chunked\r\n\r\n");
                    out.extend(format!("{:x}\r\n", body.len()).as_bytes());
                    out.extend(body);
                    out.extend(b"\r\n0\r\n\r\n");
                }
                (Some(body), Framing::None) => {
                    out.extend(b"\r\n");
                    out.extend(body);
                }
                (None, _) => out.extend(b"\r\n"),
            }
            out
        }
    };
    // HTTP/2: pseudo-headers, then the same fields with names lower-cased as HTTP/2 requires
    // (a case that wants an upper-case name says so in `pseudo`-free raw names: kept as given).
    let mut h2_fields: Vec<(Vec<u8>, Vec<u8>)> = match &c.pseudo {
        Some(pseudo) => pseudo.iter().map(|(k, v)| (fill(k), fill(v))).collect(),
        None => {
            let mut p = vec![
                (b":method".to_vec(), fill(&c.method)),
                (b":scheme".to_vec(), b"https".to_vec()),
            ];
            if !c.no_host {
                p.push((b":authority".to_vec(), authority.clone().into_bytes()));
            }
            p.push((b":path".to_vec(), target.clone()));
            p
        }
    };
    h2_fields.extend(fields);
    let h2_body = match (&body, c.framing) {
        (Some(body), _) => Some(body.clone()),
        (None, _) => None,
    };
    if let Some(body) = &h2_body
        && c.framing == Framing::ContentLength
        && !c
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        h2_fields.push((
            b"content-length".to_vec(),
            body.len().to_string().into_bytes(),
        ));
    }
    Ok(Request {
        h1,
        h2: H2Request {
            fields: h2_fields,
            body: h2_body,
            leave_open: c.leave_open,
        },
        head: c.method.eq_ignore_ascii_case("HEAD"),
        half_close: c.half_close,
        method: sent_method,
    })
}

/// A connection of either protocol, kept for a follow-up request.
enum Conn {
    H1(H1Conn),
    H2(H2Conn),
}

async fn open(
    topology: &Topology,
    listener: Listener,
    protocol: Protocol,
    identity: Option<&ClientIdentity>,
) -> Result<std::result::Result<Conn, Answer>> {
    let addr = match listener {
        Listener::Mtls => topology.gateway.mtls,
        Listener::Lenient => topology.gateway.lenient,
    };
    let alpn: &[&[u8]] = match protocol {
        Protocol::H1 => &[b"http/1.1"],
        Protocol::H2 => &[b"h2"],
    };
    let config = raw::tls_config(&topology.ca.cert_pem, identity, alpn)?;
    let stream = match raw::connect(addr, config).await? {
        Ok(stream) => stream,
        Err(answer) => return Ok(Err(answer)),
    };
    Ok(match protocol {
        Protocol::H1 => Ok(Conn::H1(H1Conn::new(stream))),
        Protocol::H2 => H2Conn::handshake(stream).await.map(Conn::H2),
    })
}

async fn exchange(conn: &mut Conn, request: &Request) -> Answer {
    match conn {
        Conn::H1(h1) => {
            let sent = h1.send(&request.h1).await;
            if request.half_close {
                h1.shutdown_write().await;
            }
            if let Err(answer) = sent {
                // The server may have answered and closed before reading everything.
                if let Answer::Response(r) = h1.read_response(request.head).await {
                    return Answer::Response(r);
                }
                return answer;
            }
            h1.read_response(request.head).await
        }
        Conn::H2(h2) => match h2.send(&request.h2).await {
            Ok(stream) => h2.read_response(stream).await,
            Err(answer) => answer,
        },
    }
}

fn observe(answer: &Answer) -> Observed {
    match answer {
        Answer::Response(r) => Observed::Answer {
            status: r.status,
            code: r.header("x-azgate-error"),
            from_upstream: r.header("x-fake-azure").is_some(),
        },
        Answer::Closed(why) => Observed::Closed(why.clone()),
        Answer::TlsRefused(why) => Observed::TlsRefused(why.clone()),
        Answer::TimedOut => Observed::TimedOut,
    }
}

/// Checks an azgate refusal's shape: JSON body with the code and a message.
fn check_refusal_body(response: &Response, code: &str) -> Result<()> {
    let content_type = response.header("content-type").unwrap_or_default();
    ensure!(
        content_type.starts_with("application/json"),
        "content-type {content_type:?} for {code}"
    );
    let json: serde_json::Value = serde_json::from_slice(&response.body).with_context(|| {
        format!(
            "error body is not JSON: {}",
            String::from_utf8_lossy(&response.body)
        )
    })?;
    ensure!(json["error"]["code"] == code, "error body {json}");
    ensure!(
        json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("azgate: ")),
        "error message missing: {json}"
    );
    Ok(())
}

fn matches(expect: &Expect, answer: &Answer) -> bool {
    match (expect, answer) {
        (Expect::Forwarded, Answer::Response(r)) => {
            r.status == 200 && r.header("x-fake-azure").is_some()
        }
        (Expect::Refused { status, code }, Answer::Response(r)) => {
            r.status == *status
                && r.header("x-azgate-error").as_deref() == Some(code.as_str())
                && check_refusal_body(r, code).is_ok()
        }
        (Expect::Plain { status, class }, Answer::Response(r)) => {
            let status_ok = if *class {
                r.status / 100 == status / 100
            } else {
                r.status == *status
            };
            status_ok && r.header("x-azgate-error").is_none() && r.header("x-fake-azure").is_none()
        }
        (Expect::Closed, Answer::Closed(_)) => true,
        (Expect::TlsRefused, Answer::TlsRefused(_)) => true,
        _ => false,
    }
}

fn seen_for(topology: &Topology, marker: &str) -> Vec<azgate_tests::upstream::Seen> {
    let needle = format!("{PATH_PREFIX}{marker}");
    topology
        .azure
        .seen()
        .into_iter()
        .filter(|s| {
            s.path.contains(&needle)
                || s.headers
                    .iter()
                    .any(|(k, v)| k == "x-hostile-case" && v.as_str() == marker)
        })
        .collect()
}

fn imds_calls_for(topology: &Topology, resource: &str) -> usize {
    topology
        .imds
        .requests()
        .iter()
        .filter(|r| r.query_param("resource").as_deref() == Some(resource))
        .count()
}

fn check_forwarded(
    topology: &Topology,
    suite: &Suite,
    case: &Concrete,
    marker: &str,
    jwt_token: Option<&str>,
    resource: &str,
    sent_method: &str,
) -> Result<()> {
    let seen = seen_for(topology, marker);
    ensure!(
        seen.len() == 1,
        "upstream saw {} requests for this case, expected 1",
        seen.len()
    );
    let got = &seen[0];
    let expected = case.case.upstream.clone().unwrap_or_default();
    let method = expected
        .method
        .clone()
        .unwrap_or_else(|| sent_method.to_string());
    ensure!(got.method == method, "upstream method {:?}", got.method);
    let marked_path = format!("{PATH_PREFIX}{marker}{}", case.case.target);
    let path = expected
        .path
        .as_deref()
        .map(|p| p.replace("$path", &marked_path))
        .unwrap_or(marked_path);
    ensure!(
        got.path == path,
        "upstream path {:?}, expected {path:?}",
        got.path
    );
    ensure!(
        got.header("host") == Some(expected.host.as_str()),
        "upstream host {:?}, expected {}",
        got.header("host"),
        expected.host
    );
    ensure!(
        got.sni.as_deref() == Some(expected.host.as_str()),
        "upstream SNI {:?}",
        got.sni
    );
    for stripped in ["x-forwarded-client-cert", "x-forwarded-host"] {
        ensure!(got.header(stripped).is_none(), "upstream saw {stripped}");
    }
    let authorization = got.header_values("authorization");
    ensure!(
        authorization.len() == 1,
        "upstream authorization {authorization:?}"
    );
    let msi = authorization[0]
        .strip_prefix("Bearer ")
        .ok_or_else(|| anyhow!("upstream authorization is not Bearer"))?;
    ensure!(Some(msi) != jwt_token, "the caller's JWT was forwarded");
    let claims = jwt::payload(msi).ok_or_else(|| anyhow!("upstream token is not a JWT"))?;
    ensure!(claims["aud"] == resource, "MSI token aud {}", claims["aud"]);
    let want = suite
        .identities
        .get(&expected.identity)
        .cloned()
        .unwrap_or(expected.identity.clone());
    ensure!(
        claims["xms_mirid"]
            .as_str()
            .is_some_and(|m| m.eq_ignore_ascii_case(&want)),
        "MSI token for {}, expected {want}",
        claims["xms_mirid"]
    );
    Ok(())
}

fn client_identity(minted: &Minted) -> Result<ClientIdentity> {
    Ok(ClientIdentity {
        chain: minted.chain_der.clone(),
        key: minted.key.client_key()?,
    })
}

/// An allowed request (the corpus' reference shape) on `conn`, or a new connection.
async fn follow_up(
    topology: &Topology,
    pki: &HostilePki,
    suite: &Suite,
    case: &Concrete,
    conn: Option<Conn>,
) -> Result<()> {
    let minted = pki.mint(&CertSpec::default())?;
    let marker = format!("{}-next", case.marker);
    let resource = format!("api://hostile-{marker}");
    let token = make_token(&JwtSpec::default(), pki, Some(&minted), &resource)?;
    let reference = Concrete {
        marker: marker.clone(),
        case: serde_json::from_value(serde_json::json!({
            "name": "follow-up", "expect": "200",
        }))?,
        ..case.clone()
    };
    let request = build_request(&reference, topology, pki, Some(&token), &resource)?;
    let mut conn = match conn {
        Some(conn) => conn,
        None => match open(
            topology,
            Listener::Mtls,
            case.protocol,
            Some(&client_identity(&minted)?),
        )
        .await?
        {
            Ok(conn) => conn,
            Err(answer) => bail!("the follow-up could not connect: {answer:?}"),
        },
    };
    let answer = raw::with_deadline(CASE_DEADLINE, exchange(&mut conn, &request)).await;
    ensure!(
        matches(&Expect::Forwarded, &answer),
        "the next request was not served: {}",
        observe(&answer).describe()
    );
    check_forwarded(
        topology,
        suite,
        &reference,
        &marker,
        Some(&token),
        &resource,
        "GET",
    )
}

async fn run_case(
    shared: &Shared,
    suite: &Suite,
    case: &Concrete,
    observed: &mut Option<Observed>,
) -> Result<()> {
    let (topology, pki) = shared.get().await?;
    let runtime = shared.runtime.name();
    let minted = match &case.cert {
        Some(spec) => Some(pki.mint(spec)?),
        None => None,
    };
    let resource = case
        .case
        .jwt
        .as_ref()
        .and_then(|j| j.claims.get("resource"))
        .and_then(|r| r.as_str())
        .map(|r| {
            match r
                .strip_prefix("$pad:")
                .and_then(|n| n.parse::<usize>().ok())
            {
                Some(n) => "x".repeat(n),
                None => r.to_string(),
            }
        })
        .unwrap_or_else(|| format!("api://hostile-{}", case.marker));
    let token = match &case.case.jwt {
        Some(spec) => Some(make_token(spec, pki, minted.as_deref(), &resource)?),
        None => None,
    };
    let request = build_request(case, topology, pki, token.as_deref(), &resource)?;
    let identity = minted.as_deref().map(client_identity).transpose()?;
    let imds_before = imds_calls_for(topology, &resource);
    let attempt = tokio::time::timeout(CASE_DEADLINE, async {
        match open(
            topology,
            case.case.listener,
            case.protocol,
            identity.as_ref(),
        )
        .await
        {
            Ok(Ok(mut conn)) => {
                let answer = exchange(&mut conn, &request).await;
                (answer, Some(conn))
            }
            Ok(Err(answer)) => (answer, None),
            Err(error) => (Answer::Closed(format!("client error: {error:#}")), None),
        }
    })
    .await;
    let (answer, conn) = attempt.unwrap_or((Answer::TimedOut, None));
    *observed = Some(observe(&answer));
    let described = observe(&answer).describe();
    if let Answer::Response(r) = &answer {
        ensure!(
            r.status < 500,
            "a 5xx: {described}; body: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    ensure!(
        !matches!(answer, Answer::TimedOut),
        "no answer within {CASE_DEADLINE:?} (a hang)"
    );
    let (expected, pin) = case.expected(runtime);
    let hit = expected.iter().find(|e| matches(e, &answer));
    let Some(hit) = hit else {
        let mut body = match &answer {
            Answer::Response(r) => String::from_utf8_lossy(&r.body).into_owned(),
            _ => String::new(),
        };
        let seen = seen_for(topology, &case.marker);
        if !seen.is_empty() {
            let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
            body.push_str(&format!("; the upstream saw {paths:?}"));
        }
        match pin {
            Some(reason) => bail!(
                "the pin ({reason}) no longer reproduces: expected {}, got {described}; body: {body}",
                case_expect_text(&expected)
            ),
            None => bail!(
                "expected {}, got {described}; body: {body}",
                case_expect_text(&expected)
            ),
        }
    };
    if *hit == Expect::Forwarded {
        check_forwarded(
            topology,
            suite,
            case,
            &case.marker,
            token.as_deref(),
            &resource,
            &request.method,
        )?;
    } else {
        // The upstream answers only after recording, but a gateway could send a request
        // upstream and still answer the client itself: give it a moment.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let seen = seen_for(topology, &case.marker);
        ensure!(
            seen.is_empty(),
            "refused ({described}) but the upstream saw it: {:?}",
            seen.iter()
                .map(|s| (
                    s.method.clone(),
                    s.path.clone(),
                    s.header("authorization")
                        .map(|a| a.chars().take(24).collect::<String>())
                ))
                .collect::<Vec<_>>()
        );
        // A refusal by the filter comes before any token fetch. A codec or the gateway that
        // fails on the body after the filter allowed the headers (the body is read after the
        // decision, so a refused caller's body is never buffered) may leave a fetched, never
        // forwarded, token.
        if matches!(hit, Expect::Refused { code, .. } if !GATEWAY_BODY_REFUSALS.contains(&code.as_str()))
        {
            let made = imds_calls_for(topology, &resource) - imds_before;
            ensure!(
                made == 0,
                "refused ({described}) but made {made} IMDS calls"
            );
        }
    }
    if case.case.then_served {
        // The same connection (so the same gateway worker) when it is still open and carries
        // the reference certificate; a new one otherwise.
        // Raw HTTP/1.1 may leave unread bytes behind (a smuggled tail): then a new connection.
        let reference_cert = case.cert.as_ref() == Some(&CertSpec::default())
            && case.case.listener == Listener::Mtls
            && !(case.protocol == Protocol::H1 && case.case.h1_raw.is_some());
        let reusable = match conn.filter(|_| reference_cert) {
            Some(Conn::H1(mut h1)) => match &answer {
                Answer::Response(r) if r.keep_alive && !h1.closed().await => Some(Conn::H1(h1)),
                _ => None,
            },
            Some(Conn::H2(h2)) if h2.usable() => Some(Conn::H2(h2)),
            _ => None,
        };
        follow_up(topology, pki, suite, case, reusable).await?;
    }
    Ok(())
}

fn case_expect_text(expected: &[Expect]) -> String {
    expected
        .iter()
        .map(|e| match e {
            Expect::Forwarded => "200 (forwarded)".to_string(),
            Expect::Refused { status, code } => format!("{status} {code}"),
            Expect::Plain {
                status,
                class: false,
            } => format!("{status} -"),
            Expect::Plain {
                status,
                class: true,
            } => format!("{}xx -", status / 100),
            Expect::Closed => "closed".into(),
            Expect::TlsRefused => "tls_refused".into(),
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

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
