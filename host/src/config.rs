//! `azgate.yaml`, the one configuration of every product: what `azgate serve` runs, what
//! `azgate envoy-config` renders, the role files the dev CA issues from. Parsed strictly
//! (unknown fields are errors) and validated up front; every error names the field.
//!
//! - [`teleport`]: Teleport role and lock files as `tctl` writes them, checked by the filter's
//!   own rules (one rule set for inline roles and files);
//! - [`policy`]: the rule both policy watchers follow (`azgate serve`, `envoy-config --watch`).

pub mod policy;
pub mod teleport;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::token::TokenSettings;

/// A configuration error naming the field.
#[derive(Debug)]
pub struct ConfigError {
    /// Dotted path of the field (or the file).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// An error about `field`.
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

fn error(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::new(field, message)
}

/// Largest request header block accepted, bytes (Envoy's `max_request_headers_kb` default), in
/// HTTP/1.1 and HTTP/2 alike; both runtimes answer 431 beyond it.
pub const MAX_REQUEST_HEADERS_BYTES: u32 = 60 * 1024;

/// Most header fields a request may carry (Envoy's `max_headers_count` default); 431 beyond.
pub const MAX_REQUEST_HEADERS: usize = 100;

/// Whether a request with `fields` header fields, Host not counted, is over
/// [`MAX_REQUEST_HEADERS`] as Envoy counts: with the four pseudo-headers (`:method`, `:scheme`,
/// `:authority` — HTTP/1.1's Host —, `:path`), refusing the 100th.
pub(crate) fn too_many_header_fields(fields: usize) -> bool {
    fields + 4 >= MAX_REQUEST_HEADERS
}

/// Default `upstream.connect_timeout_ms`.
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT_MS: u64 = 5_000;

/// Default `upstream.request_timeout_ms`.
pub const DEFAULT_UPSTREAM_REQUEST_TIMEOUT_MS: u64 = 60_000;

/// Default `upstream.max_request_body_bytes`.
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: u64 = 32 << 20;

/// Default `listeners[].request_headers_timeout_ms`.
pub const DEFAULT_REQUEST_HEADERS_TIMEOUT_MS: u64 = 10_000;

/// Default `listeners[].request_timeout_ms`.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 60_000;

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Listeners (at least one).
    pub listeners: Vec<ListenerConfig>,
    /// Admin listener (readiness and Prometheus metrics); loopback recommended.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// The filter.
    pub filter: FilterConfig,
    /// Worker threads, each with its own VM; default: one per CPU.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Clusters the filter may call with `proxy_http_call`.
    #[serde(default)]
    pub clusters: BTreeMap<String, ClusterConfig>,
    /// The in-process token service (for `token_service` clusters): what `azgate
    /// token-service` takes, as its flags' names in snake case ([`TokenSettings`]).
    #[serde(default)]
    pub token_source: Option<TokenSettings>,
    /// Forwarding to Azure.
    #[serde(default)]
    pub upstream: UpstreamConfig,
}

/// One listener.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Name used in logs and metrics.
    #[serde(default = "default_listener_name")]
    pub name: String,
    /// Address; port 0 picks a free port (printed at start).
    pub address: SocketAddr,
    /// TLS; required unless `plaintext_behind_trusted_front` is set.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Accept plain HTTP because a trusted TLS front (which sets XFCC) terminates TLS.
    /// Off by default: client-supplied XFCC is then trusted as is.
    #[serde(default)]
    pub plaintext_behind_trusted_front: bool,
    /// Open connections at once; beyond it new connections are closed at once (default 10000).
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Time a client has to send a request's whole header block, ms (default 10000); a slower
    /// (or idle) HTTP/1.1 connection is closed.
    #[serde(default = "default_request_headers_timeout_ms")]
    pub request_headers_timeout_ms: u64,
    /// Time a client has to send a whole request, headers and body, ms (default 60000); the
    /// request is answered 408 `RequestTimeout` after it. The body is received in full before
    /// anything goes upstream, so this bounds a request that never ends.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
}

fn default_request_headers_timeout_ms() -> u64 {
    DEFAULT_REQUEST_HEADERS_TIMEOUT_MS
}

fn default_request_timeout_ms() -> u64 {
    DEFAULT_REQUEST_TIMEOUT_MS
}

fn default_max_connections() -> u32 {
    10_000
}

fn default_listener_name() -> String {
    "azgate".into()
}

/// Server TLS and client-certificate verification.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA certificates client certificates must chain to (PEM files).
    pub client_ca: Vec<PathBuf>,
    /// `required` (default) or `optional` (then the filter answers MissingClientCertificate).
    #[serde(default)]
    pub client_certificate: ClientCertificateMode,
    /// Accept expired or not-yet-valid client certificates so the filter's own check answers.
    /// For tests of the filter only.
    #[serde(default)]
    pub accept_expired_client_certificates: bool,
}

/// Whether clients must present a certificate.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientCertificateMode {
    /// The TLS handshake fails without one.
    #[default]
    Required,
    /// Verified if presented.
    Optional,
}

/// The admin listener.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address (loopback recommended).
    pub address: SocketAddr,
}

/// The proxy-wasm filter.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// The `.wasm` file.
    pub path: PathBuf,
    /// `plugin_name` (default `azgate`).
    #[serde(default = "default_filter_name")]
    pub name: String,
    /// `plugin_root_id` (default `azgate`).
    #[serde(default = "default_filter_name")]
    pub root_id: String,
    /// `vm_id` (default `azgate`).
    #[serde(default = "default_filter_name")]
    pub vm_id: String,
    /// The plugin configuration (for azgate's filter: its JSON configuration, as YAML or JSON).
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    /// Teleport role files appended to `config.roles`, as `tctl get roles` writes them (YAML
    /// or JSON; kind: role, v3–v8).
    #[serde(default)]
    pub role_files: Vec<PathBuf>,
    /// Teleport lock files, or directories of them (every `*.yaml`, `*.yml`, `*.json`), as
    /// `tctl get locks` writes them, appended to `config.locks`; checked on every request.
    #[serde(default)]
    pub lock_files: Vec<PathBuf>,
    /// Directory for compiled code, so restarts skip compilation; none disables.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
}

fn default_filter_name() -> String {
    "azgate".into()
}

/// A cluster.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Served in-process by the token module (no network hop).
    #[serde(default)]
    pub token_service: bool,
    /// Otherwise: a plain-HTTP endpoint.
    #[serde(default)]
    pub address: Option<SocketAddr>,
}

/// Forwarding to Azure.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Extra CA certificates trusted for upstreams, besides the system roots (PEM files).
    #[serde(default)]
    pub extra_ca: Vec<PathBuf>,
    /// Host name → address, like `curl --resolve`: tests send Azure names to a loopback fake.
    #[serde(default)]
    pub resolve: BTreeMap<String, SocketAddr>,
    /// Connect timeout, ms (default 5000).
    #[serde(default)]
    pub connect_timeout_ms: Option<u64>,
    /// Time to the response headers, ms (default 60000).
    #[serde(default)]
    pub request_timeout_ms: Option<u64>,
    /// Largest request body forwarded, bytes (default 32 MiB); 413 `RequestTooLarge` beyond.
    /// Bodies are received in full before anything goes upstream, so this is also what one
    /// request may hold in memory.
    #[serde(default)]
    pub max_request_body_bytes: Option<u64>,
}

impl UpstreamConfig {
    /// `connect_timeout_ms` or its default.
    pub fn connect_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.connect_timeout_ms
                .unwrap_or(DEFAULT_UPSTREAM_CONNECT_TIMEOUT_MS),
        )
    }

    /// `request_timeout_ms` or its default.
    pub fn request_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.request_timeout_ms
                .unwrap_or(DEFAULT_UPSTREAM_REQUEST_TIMEOUT_MS),
        )
    }

    /// `max_request_body_bytes` or its default.
    pub fn max_request_body_bytes(&self) -> u64 {
        self.max_request_body_bytes
            .unwrap_or(DEFAULT_MAX_REQUEST_BODY_BYTES)
    }
}

impl ServeConfig {
    /// Reads and validates `path`; relative paths in it are relative to its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| error(path.display().to_string(), e.to_string()))?;
        let mut config: Self = serde_yaml::from_str(&text).map_err(|e| {
            let field = e
                .location()
                .map(|l| format!("{} line {}", path.display(), l.line()))
                .unwrap_or_else(|| path.display().to_string());
            error(field, e.to_string())
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for listener in &mut self.listeners {
            if let Some(tls) = &mut listener.tls {
                fix(&mut tls.cert);
                fix(&mut tls.key);
                tls.client_ca.iter_mut().for_each(fix);
            }
        }
        fix(&mut self.filter.path);
        self.filter.role_files.iter_mut().for_each(fix);
        self.filter.lock_files.iter_mut().for_each(fix);
        if let Some(dir) = &mut self.filter.cache_dir {
            fix(dir);
        }
        self.upstream.extra_ca.iter_mut().for_each(fix);
        if let Some(token_source) = &mut self.token_source {
            token_source.resolve_paths(base);
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.listeners.is_empty() {
            return Err(error("listeners", "at least one listener is required"));
        }
        for (i, listener) in self.listeners.iter().enumerate() {
            match (&listener.tls, listener.plaintext_behind_trusted_front) {
                (None, false) => {
                    return Err(error(
                        format!("listeners[{i}].tls"),
                        "required (or set plaintext_behind_trusted_front behind a TLS front that sets XFCC)",
                    ));
                }
                (Some(_), true) => {
                    return Err(error(
                        format!("listeners[{i}].plaintext_behind_trusted_front"),
                        "cannot be combined with tls",
                    ));
                }
                (Some(tls), false) if tls.client_ca.is_empty() => {
                    return Err(error(
                        format!("listeners[{i}].tls.client_ca"),
                        "at least one CA file is required",
                    ));
                }
                _ => {}
            }
        }
        for (i, listener) in self.listeners.iter().enumerate() {
            if listener.max_connections == 0 {
                return Err(error(
                    format!("listeners[{i}].max_connections"),
                    "must be at least 1",
                ));
            }
            for (name, value) in [
                (
                    "request_headers_timeout_ms",
                    listener.request_headers_timeout_ms,
                ),
                ("request_timeout_ms", listener.request_timeout_ms),
            ] {
                if value == 0 {
                    return Err(error(format!("listeners[{i}].{name}"), "must be positive"));
                }
            }
        }
        if self.workers == Some(0) {
            return Err(error("workers", "must be at least 1"));
        }
        for (name, cluster) in &self.clusters {
            match (cluster.token_service, cluster.address) {
                (true, Some(_)) => {
                    return Err(error(
                        format!("clusters.{name}"),
                        "set token_service or address, not both",
                    ));
                }
                (false, None) => {
                    return Err(error(
                        format!("clusters.{name}"),
                        "needs token_service: true or an address",
                    ));
                }
                _ => {}
            }
        }
        match self.upstream.max_request_body_bytes {
            Some(0) => return Err(error("upstream.max_request_body_bytes", "must be positive")),
            // Envoy's buffer filter takes a 32-bit limit, and one request should not hold more.
            Some(n) if n > u64::from(u32::MAX) => {
                return Err(error(
                    "upstream.max_request_body_bytes",
                    format!("at most {} (4 GiB)", u32::MAX),
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// The plugin configuration bytes: `filter.config` with the roles of `filter.role_files`
    /// appended to its `roles` and the locks of `filter.lock_files` to its `locks`.
    pub fn plugin_config(&self) -> Result<Vec<u8>, ConfigError> {
        let mut config = self
            .filter
            .config
            .clone()
            .unwrap_or_else(|| serde_json::json!({}));
        let mut append = |key: &str, values: Vec<serde_json::Value>| {
            let Some(object) = config.as_object_mut() else {
                return Err(error(
                    "filter.config",
                    "must be a mapping to add role or lock files",
                ));
            };
            let list = object
                .entry(key)
                .or_insert_with(|| serde_json::Value::Array(Vec::new()));
            let Some(list) = list.as_array_mut() else {
                return Err(error(format!("filter.config.{key}"), "must be a list"));
            };
            list.extend(values);
            Ok(())
        };
        for file in &self.filter.role_files {
            append("roles", teleport::read_role_file(file)?)?;
        }
        for source in &self.filter.lock_files {
            append("locks", teleport::read_lock_source(source)?)?;
        }
        serde_json::to_vec(&config).map_err(|e| error("filter.config", e.to_string()))
    }

    /// The files whose change changes the policy (role and lock sources), for reloading.
    pub fn policy_sources(&self) -> Vec<PathBuf> {
        let mut sources = self.filter.role_files.clone();
        sources.extend(self.filter.lock_files.iter().cloned());
        sources
    }
}
