//! The case files: their JSON shapes, defaults, and their expansion into concrete cases.

use super::*;

#[derive(Deserialize)]
pub(crate) struct SuiteFile {
    pub(crate) identities: HashMap<String, String>,
    pub(crate) roles: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CaseFile {
    #[allow(dead_code, reason = "documentation in the file")]
    pub(crate) about: String,
    #[serde(default)]
    pub(crate) defaults: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub(crate) certificates: HashMap<String, serde_json::Value>,
    pub(crate) cases: Vec<serde_json::Value>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Protocol {
    H1,
    H2,
}

impl Protocol {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Protocol::H1 => "h1",
            Protocol::H2 => "h2",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Listener {
    #[default]
    Mtls,
    Lenient,
}

/// How an HTTP/1.1 body is framed.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Framing {
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
pub(crate) struct Case {
    pub(crate) name: String,
    #[serde(default)]
    #[allow(dead_code, reason = "documentation in the file")]
    pub(crate) note: Option<String>,
    #[serde(default = "default_protocols")]
    pub(crate) protocols: Vec<Protocol>,
    #[serde(default)]
    pub(crate) listener: Listener,
    /// A certificate name (of the file's `certificates`, or `reader`), an inline spec, or null.
    #[serde(default = "default_cert")]
    pub(crate) cert: serde_json::Value,
    #[serde(default = "default_jwt")]
    pub(crate) jwt: Option<JwtSpec>,
    /// `Authorization` values (raw, `$jwt` = the case's token).
    #[serde(default = "default_authorization")]
    pub(crate) authorization: Vec<String>,
    /// `X-Forwarded-Host` values (raw).
    #[serde(default = "default_forwarded_host")]
    pub(crate) forwarded_host: Vec<String>,
    /// More header fields (raw name, raw value), after the ones above.
    #[serde(default)]
    pub(crate) headers: Vec<(String, String)>,
    #[serde(default = "default_method")]
    pub(crate) method: String,
    /// What follows `/hostile/<marker>` in the request target.
    #[serde(default = "default_target")]
    pub(crate) target: String,
    /// The whole request target instead (`$path` = the marked path).
    #[serde(default)]
    pub(crate) target_raw: Option<String>,
    /// HTTP/1.1 only: the whole request, verbatim after placeholders (`$path`, `$jwt`,
    /// `$marker`, `$authority`, `$xfh`).
    #[serde(default)]
    pub(crate) h1_raw: Option<String>,
    /// HTTP/1.1: the version in the request line.
    #[serde(default = "default_version")]
    pub(crate) h1_version: String,
    /// Leave out `Host` (HTTP/1.1) / `:authority` (HTTP/2).
    #[serde(default)]
    pub(crate) no_host: bool,
    /// HTTP/2 only: the pseudo-header fields, verbatim and in this order.
    #[serde(default)]
    pub(crate) pseudo: Option<Vec<(String, String)>>,
    #[serde(default)]
    pub(crate) body: Option<String>,
    #[serde(default)]
    pub(crate) framing: Framing,
    /// Send the headers (and body) but never end the request.
    #[serde(default)]
    pub(crate) leave_open: bool,
    /// HTTP/1.1: half-close the connection after the request bytes.
    #[serde(default)]
    pub(crate) half_close: bool,
    /// `[name, value, count]`: that many more header fields (`{n}` in the name = 0, 1, …).
    #[serde(default)]
    pub(crate) flood: Option<(String, String, usize)>,
    /// Stated outcome(s): see [`Expect::parse`].
    pub(crate) expect: ExpectText,
    #[serde(default)]
    pub(crate) upstream: Option<UpstreamExpect>,
    /// Per-runtime expectations (`envoy`, `serve`, `envoy-rendered`, comma-joined), each with
    /// its reason; a pinned runtime must answer as pinned.
    #[serde(default)]
    pub(crate) pin: BTreeMap<String, Pin>,
    /// After the case, the same runtime serves an allowed request (same connection if it is
    /// still open, else a new one).
    #[serde(default)]
    pub(crate) then_served: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum ExpectText {
    One(String),
    Any(Vec<String>),
}

impl ExpectText {
    pub(crate) fn alternatives(&self) -> Vec<String> {
        match self {
            ExpectText::One(text) => text.split('|').map(|s| s.trim().to_string()).collect(),
            ExpectText::Any(list) => list.clone(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Pin {
    pub(crate) expect: ExpectText,
    pub(crate) reason: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpstreamExpect {
    #[serde(default = "default_identity")]
    pub(crate) identity: String,
    #[serde(default = "default_host")]
    pub(crate) host: String,
    #[serde(default)]
    pub(crate) method: Option<String>,
    /// The path the upstream must see (`$path` = the marked path); default the marked path.
    #[serde(default)]
    pub(crate) path: Option<String>,
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
pub(crate) struct JwtSpec {
    /// `cert` (the client certificate's key), `attacker` (the attacker's P-256 key, whose
    /// self-signed admin certificate the injection cases smuggle), `other` (an unrelated
    /// P-256 key), `other_rsa`.
    #[serde(default)]
    pub(crate) signer: Option<String>,
    /// The header's `alg`.
    #[serde(default)]
    pub(crate) alg: Option<String>,
    /// Header members merged in (`null` removes one). String values `$attacker_jwk`,
    /// `$attacker_x5c`, `$cert_x5c` become those JSON values.
    #[serde(default)]
    pub(crate) header: serde_json::Map<String, serde_json::Value>,
    /// The header's exact text (escapes allowed; `$alg` = the key's algorithm).
    #[serde(default)]
    pub(crate) header_raw: Option<String>,
    /// Claims merged in (`null` removes one; `"$pad:N"` = N × "x").
    #[serde(default)]
    pub(crate) claims: serde_json::Map<String, serde_json::Value>,
    /// Claims as JSON text appended to the payload object (`$now`, `$now_plus:N`,
    /// `$now_minus:N`).
    #[serde(default)]
    pub(crate) claims_json: BTreeMap<String, String>,
    /// The payload's exact text (`$resource`, `$now…`).
    #[serde(default)]
    pub(crate) claims_raw: Option<String>,
    #[serde(default)]
    pub(crate) exp_offset_s: Option<i64>,
    #[serde(default)]
    pub(crate) nbf_offset_s: Option<i64>,
    /// How the signature is made: see [`signature`].
    #[serde(default)]
    pub(crate) signature: Option<String>,
    /// The token's shape: `$h`, `$p`, `$s` (base64url, no padding), `$h_pad`, `$p_pad`,
    /// `$s_pad` (padded), `$s_std` (standard alphabet, padded). Default `$h.$p.$s`.
    #[serde(default)]
    pub(crate) token: Option<String>,
}

pub(crate) fn default_protocols() -> Vec<Protocol> {
    vec![Protocol::H1, Protocol::H2]
}
pub(crate) fn default_cert() -> serde_json::Value {
    "reader".into()
}
pub(crate) fn default_jwt() -> Option<JwtSpec> {
    Some(JwtSpec::default())
}
pub(crate) fn default_authorization() -> Vec<String> {
    vec!["Bearer $jwt".into()]
}
pub(crate) fn default_forwarded_host() -> Vec<String> {
    vec!["management.azure.com".into()]
}
pub(crate) fn default_method() -> String {
    "GET".into()
}
pub(crate) fn default_target() -> String {
    "/subscriptions?api-version=2022-12-01".into()
}
pub(crate) fn default_version() -> String {
    "HTTP/1.1".into()
}
pub(crate) fn default_identity() -> String {
    "reader".into()
}
pub(crate) fn default_host() -> String {
    "management.azure.com".into()
}

/// The gateways' own refusals of a body that is malformed, incomplete, too large or too slow
/// (`ServeError`, the rendered Envoy config's local replies): they come after the filter's
/// decision, which may have fetched a token.
pub(crate) const GATEWAY_BODY_REFUSALS: [&str; 3] =
    ["BadRequest", "RequestTimeout", "RequestTooLarge"];

/// One outcome a case may state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Expect {
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
    pub(crate) fn parse(text: &str) -> Result<Self> {
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

    pub(crate) fn refused(&self) -> bool {
        *self != Expect::Forwarded
    }
}

/// A case ready to run: one protocol, expectations parsed.
#[derive(Clone)]
pub(crate) struct Concrete {
    pub(crate) id: String,
    pub(crate) category: String,
    pub(crate) marker: String,
    pub(crate) case: Case,
    pub(crate) protocol: Protocol,
    pub(crate) cert: Option<CertSpec>,
    pub(crate) expect: Vec<Expect>,
    pub(crate) pins: Vec<(Vec<String>, Vec<Expect>, String)>,
}

impl Concrete {
    /// What `runtime` must answer, and whether a pin says so.
    pub(crate) fn expected(&self, runtime: &str) -> (Vec<Expect>, Option<&str>) {
        for (runtimes, expect, reason) in &self.pins {
            if runtimes.iter().any(|r| r == runtime) {
                return (expect.clone(), Some(reason.as_str()));
            }
        }
        (self.expect.clone(), None)
    }

    pub(crate) fn all_refused(&self, runtime: &str) -> bool {
        self.expected(runtime).0.iter().all(Expect::refused)
    }
}

pub(crate) struct Suite {
    pub(crate) identities: HashMap<String, String>,
    pub(crate) roles: Vec<serde_json::Value>,
    pub(crate) cases: Vec<Concrete>,
}

pub(crate) fn load_suite() -> Result<Suite> {
    let dir = azgate_tests::topology::repo_root().join("tests/cases/hostile");
    let suite_text = std::fs::read_to_string(dir.join("suite.json")).context("suite.json")?;
    let mut suite_value: serde_json::Value = serde_json::from_str(&suite_text)?;
    azgate_tests::expand_identity_references(&mut suite_value)?;
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

pub(crate) fn short(value: &serde_json::Value) -> String {
    let text = value
        .get("name")
        .or_else(|| value.get("family"))
        .map(|v| v.to_string())
        .unwrap_or_else(|| value.to_string());
    text.chars().take(120).collect()
}

pub(crate) fn parse_expect(text: &ExpectText) -> Result<Vec<Expect>> {
    text.alternatives()
        .iter()
        .map(|t| Expect::parse(t))
        .collect()
}

pub(crate) fn resolve_cert(
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
pub(crate) const CASE_FIELDS: &[&str] = &[
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
pub(crate) fn expand_entry(
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

pub(crate) fn substitute(
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
