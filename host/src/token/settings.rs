//! One description of a token service — where tokens come from, which identities it serves,
//! its limits and the App Service secret — shared by `azgate token-service` (its flags convert
//! into [`TokenSettings`]) and `azgate serve` (`token_source:` in `azgate.yaml` *is* a
//! [`TokenSettings`]), and turned into a running service by one function,
//! [`TokenSettings::build`].
//!
//! A setting left out falls back to the standard Azure environment variable (the one the flag
//! of the same name reads: `AZURE_CLIENT_ID` for `client_id`, …), so an AKS pod's injected
//! workload-identity variables need no repeating. Secrets are never written inline in YAML:
//! they are named by a file (`*_file`) or an environment variable (`*_env`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::client::HttpClient;
use super::error::TokenError;
use super::provider::{ProviderConfig, TokenProvider};
use super::service::TokenService;
use super::source::{
    ClientCertificate, DEFAULT_AUTHORITY_HOST, IMDS_ENDPOINT, ManagedIdentity, Secret, Source,
};

/// Environment variable holding the `X-IDENTITY-HEADER` secret that callers of the token
/// service's own App Service endpoint (`/msi/token`) must send.
pub const APP_SERVICE_HEADER_ENV: &str = "AZGATE_IDENTITY_HEADER";

/// Secret files larger than this are refused (a header or client secret is < 1 KiB).
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// Where tokens come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// Detected from the environment in the Azure SDKs' order ([`Source::detect`]).
    #[default]
    Auto,
    /// IMDS (`imds_endpoint`).
    Imds,
    /// App Service (`identity_endpoint` and its header).
    AppService,
    /// AKS workload identity (`tenant_id`, `client_id`, `federated_token_file`).
    WorkloadIdentity,
    /// A service principal with a secret.
    ClientSecret,
    /// A service principal with a certificate.
    ClientCertificate,
}

impl SourceKind {
    /// The `--source` value.
    pub fn flag_value(self) -> &'static str {
        match self {
            SourceKind::Auto => "auto",
            SourceKind::Imds => "imds",
            SourceKind::AppService => "app-service",
            SourceKind::WorkloadIdentity => "workload-identity",
            SourceKind::ClientSecret => "client-secret",
            SourceKind::ClientCertificate => "client-certificate",
        }
    }
}

/// Where one secret is read from. `Debug` never shows a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    /// The value itself (from a command-line flag or its standard environment variable; YAML
    /// cannot give one).
    Value(Secret),
    /// A file holding it; surrounding white space (a trailing newline) is dropped.
    File(PathBuf),
    /// An environment variable holding it.
    Env(String),
}

impl SecretSource {
    /// The secret; `what` names it in errors (which never contain the value).
    fn read(&self, what: &str) -> Result<Secret, TokenError> {
        let configuration =
            |message: String| TokenError::Configuration(format!("{what}: {message}"));
        let value = match self {
            SecretSource::Value(secret) => return Ok(secret.clone()),
            SecretSource::File(path) => {
                let mut text = String::new();
                std::fs::File::open(path)
                    .and_then(|file| {
                        file.take(MAX_SECRET_FILE_BYTES + 1)
                            .read_to_string(&mut text)
                    })
                    .map_err(|e| configuration(format!("reading {}: {e}", path.display())))?;
                if text.len() as u64 > MAX_SECRET_FILE_BYTES {
                    return Err(configuration(format!(
                        "{} is larger than {MAX_SECRET_FILE_BYTES} bytes",
                        path.display()
                    )));
                }
                text.trim().to_owned()
            }
            SecretSource::Env(name) => std::env::var(name)
                .map_err(|_| configuration(format!("environment variable {name} is not set")))?
                .trim()
                .to_owned(),
        };
        if value.is_empty() {
            return Err(configuration("is empty".into()));
        }
        Ok(Secret::new(value))
    }
}

/// What a token service is: the source, the identities it serves, its limits and whether it
/// also speaks the App Service protocol. `token_source:` in `azgate.yaml`; the flags of
/// `azgate token-service` convert into it. Every field is optional.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSettings {
    /// `auto` (default), `imds`, `app-service`, `workload-identity`, `client-secret`,
    /// `client-certificate`.
    #[serde(default)]
    pub source: SourceKind,
    /// IMDS scheme and host (env `AZURE_POD_IDENTITY_AUTHORITY_HOST`, default
    /// `http://169.254.169.254`).
    #[serde(default)]
    pub imds_endpoint: Option<String>,
    /// App Service source: the token URL (env `IDENTITY_ENDPOINT`).
    #[serde(default)]
    pub identity_endpoint: Option<String>,
    /// App Service source: the `X-IDENTITY-HEADER` sent to it (env `IDENTITY_HEADER`).
    #[serde(skip)]
    pub identity_header: Option<SecretSource>,
    /// … read from this file.
    #[serde(default)]
    pub identity_header_file: Option<PathBuf>,
    /// … read from this environment variable.
    #[serde(default)]
    pub identity_header_env: Option<String>,
    /// Entra authority (env `AZURE_AUTHORITY_HOST`, default `https://login.microsoftonline.com`).
    #[serde(default)]
    pub authority_host: Option<String>,
    /// Tenant of a workload identity or service principal (env `AZURE_TENANT_ID`).
    #[serde(default)]
    pub tenant_id: Option<String>,
    /// Client id of a workload identity (its default identity) or service principal (env
    /// `AZURE_CLIENT_ID`).
    #[serde(default)]
    pub client_id: Option<String>,
    /// Service principal secret (env `AZURE_CLIENT_SECRET`).
    #[serde(skip)]
    pub client_secret: Option<SecretSource>,
    /// … read from this file.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// … read from this environment variable.
    #[serde(default)]
    pub client_secret_env: Option<String>,
    /// PEM with the service principal's RSA key and certificate (env
    /// `AZURE_CLIENT_CERTIFICATE_PATH`).
    #[serde(default)]
    pub client_certificate_path: Option<PathBuf>,
    /// Projected service-account token of AKS workload identity (env
    /// `AZURE_FEDERATED_TOKEN_FILE`), re-read on every fetch.
    #[serde(default)]
    pub federated_token_file: Option<PathBuf>,
    /// Serve only these identities (`system`, `client_id=ID`, `object_id=ID`,
    /// `msi_res_id=ARM_ID`); empty serves every identity.
    #[serde(default, deserialize_with = "identities")]
    pub allow_identities: Vec<ManagedIdentity>,
    /// ARM resource id → client id of user-assigned identities, for workload identity (which
    /// selects by client id) behind the filter (which names identities by resource id).
    #[serde(default)]
    pub identity_client_ids: BTreeMap<String, String>,
    /// Per-request deadline, ms (default 5000).
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// Upstream requests in flight at once (default 5).
    #[serde(default)]
    pub max_concurrent_requests: Option<usize>,
    /// Upstream requests started per second (default 20).
    #[serde(default)]
    pub max_requests_per_second: Option<u32>,
    /// Cached (identity, resource) keys (default 1024).
    #[serde(default)]
    pub max_entries: Option<usize>,
    /// Serve the App Service protocol (`/msi/token`) to callers sending this secret as
    /// `X-IDENTITY-HEADER` (env `AZGATE_IDENTITY_HEADER`); off without one.
    #[serde(skip)]
    pub app_service_header: Option<SecretSource>,
    /// … read from this file.
    #[serde(default)]
    pub app_service_header_file: Option<PathBuf>,
    /// … read from this environment variable.
    #[serde(default)]
    pub app_service_header_env: Option<String>,
}

/// What [`TokenSettings::build`] makes of the settings.
#[derive(Debug)]
pub struct BuiltTokenService {
    /// Where tokens come from.
    pub source: Source,
    /// The provider's limits.
    pub config: ProviderConfig,
    /// `None` serves every identity.
    pub allowed: Option<Vec<ManagedIdentity>>,
    /// The App Service protocol's secret, if it is on.
    pub app_service_header: Option<Secret>,
    /// ARM resource id → client id.
    pub client_ids: BTreeMap<String, String>,
}

impl BuiltTokenService {
    /// The token service (provider, allow-list, App Service secret) sending through `client`.
    pub fn into_service(self, client: Arc<dyn HttpClient>) -> TokenService {
        let provider = TokenProvider::new(self.source, client, self.config);
        let mut service = TokenService::new(provider);
        if let Some(allowed) = self.allowed {
            service = service.with_allowed_identities(allowed);
        }
        if let Some(header) = self.app_service_header {
            service = service.with_app_service_header(header);
        }
        service.with_client_ids(self.client_ids)
    }
}

fn identities<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<ManagedIdentity>, D::Error> {
    Vec::<String>::deserialize(deserializer)?
        .iter()
        .map(|text| text.parse().map_err(serde::de::Error::custom))
        .collect()
}

// === impl TokenSettings ===

impl TokenSettings {
    /// Makes relative paths relative to `base` (the directory of `azgate.yaml`).
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |path: &mut Option<PathBuf>| {
            if let Some(path) = path
                && path.is_relative()
            {
                *path = base.join(&*path);
            }
        };
        fix(&mut self.identity_header_file);
        fix(&mut self.client_secret_file);
        fix(&mut self.client_certificate_path);
        fix(&mut self.federated_token_file);
        fix(&mut self.app_service_header_file);
    }

    /// [`TokenSettings::build`] over the process environment.
    pub fn build_from_environment(&self) -> Result<BuiltTokenService, TokenError> {
        self.build(|name| std::env::var(name).ok())
    }

    /// Turns the settings into a source, provider limits, an allow-list and the App Service
    /// secret. `lookup` reads the standard environment variables the settings fall back to
    /// (tests pass a map). Reads the secret and certificate files now, so a missing one fails
    /// at start rather than on the first request.
    pub fn build(
        &self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<BuiltTokenService, TokenError> {
        let env = |name: &str| lookup(name).filter(|value| !value.is_empty());
        let or_env = |value: &Option<String>, name: &str| value.clone().or_else(|| env(name));
        let path_or_env = |value: &Option<PathBuf>, name: &str| {
            value.clone().or_else(|| env(name).map(PathBuf::from))
        };
        let imds_endpoint = or_env(&self.imds_endpoint, "AZURE_POD_IDENTITY_AUTHORITY_HOST");
        let identity_endpoint = or_env(&self.identity_endpoint, "IDENTITY_ENDPOINT");
        let authority_host = or_env(&self.authority_host, "AZURE_AUTHORITY_HOST");
        let tenant_id = or_env(&self.tenant_id, "AZURE_TENANT_ID");
        let client_id = or_env(&self.client_id, "AZURE_CLIENT_ID");
        let certificate_path = path_or_env(
            &self.client_certificate_path,
            "AZURE_CLIENT_CERTIFICATE_PATH",
        );
        let token_file = path_or_env(&self.federated_token_file, "AZURE_FEDERATED_TOKEN_FILE");
        let secret = |name: &str,
                      value: &Option<SecretSource>,
                      file: &Option<PathBuf>,
                      var: &Option<String>,
                      standard: &str|
         -> Result<Option<Secret>, TokenError> {
            let given = [
                value.clone(),
                file.clone().map(SecretSource::File),
                var.clone().map(SecretSource::Env),
            ];
            match given.into_iter().flatten().collect::<Vec<_>>().as_slice() {
                [] => Ok(env(standard).map(Secret::new)),
                [one] => one.read(name).map(Some),
                _ => Err(TokenError::Configuration(format!(
                    "{name}: give one of the value, {name}_file and {name}_env"
                ))),
            }
        };
        let identity_header = secret(
            "identity_header",
            &self.identity_header,
            &self.identity_header_file,
            &self.identity_header_env,
            "IDENTITY_HEADER",
        )?;
        let client_secret = secret(
            "client_secret",
            &self.client_secret,
            &self.client_secret_file,
            &self.client_secret_env,
            "AZURE_CLIENT_SECRET",
        )?;
        let app_service_header = secret(
            "app_service_header",
            &self.app_service_header,
            &self.app_service_header_file,
            &self.app_service_header_env,
            APP_SERVICE_HEADER_ENV,
        )?;

        let required = |value: Option<String>, setting: &str| {
            value.ok_or_else(|| {
                TokenError::Configuration(format!(
                    "source {} needs {setting}",
                    self.source.flag_value()
                ))
            })
        };
        let authority = || {
            authority_host
                .clone()
                .unwrap_or_else(|| DEFAULT_AUTHORITY_HOST.to_owned())
        };
        let source = match self.source {
            SourceKind::Auto => {
                // Detection sees the resolved settings under the variable names it reads.
                let display =
                    |path: &Option<PathBuf>| path.as_ref().map(|p| p.display().to_string());
                let expose =
                    |secret: &Option<Secret>| secret.as_ref().map(|s| s.expose().to_owned());
                let resolved = [
                    ("AZURE_POD_IDENTITY_AUTHORITY_HOST", imds_endpoint.clone()),
                    ("IDENTITY_ENDPOINT", identity_endpoint.clone()),
                    ("IDENTITY_HEADER", expose(&identity_header)),
                    ("AZURE_AUTHORITY_HOST", authority_host.clone()),
                    ("AZURE_TENANT_ID", tenant_id.clone()),
                    ("AZURE_CLIENT_ID", client_id.clone()),
                    ("AZURE_CLIENT_SECRET", expose(&client_secret)),
                    ("AZURE_CLIENT_CERTIFICATE_PATH", display(&certificate_path)),
                    ("AZURE_FEDERATED_TOKEN_FILE", display(&token_file)),
                ];
                Source::detect(|name| {
                    match resolved.iter().find(|(known, _)| *known == name) {
                        Some((_, value)) => value.clone(),
                        // IDENTITY_SERVER_THUMBPRINT, IMDS_ENDPOINT: only to refuse them.
                        None => lookup(name),
                    }
                })?
            }
            SourceKind::Imds => Source::Imds {
                endpoint: imds_endpoint.unwrap_or_else(|| IMDS_ENDPOINT.to_owned()),
            },
            SourceKind::AppService => Source::AppService {
                endpoint: required(identity_endpoint, "identity_endpoint (--identity-endpoint)")?,
                header: identity_header.ok_or_else(|| {
                    TokenError::Configuration(
                        "source app-service needs identity_header_file or identity_header_env \
                         (--identity-header-file, IDENTITY_HEADER)"
                            .into(),
                    )
                })?,
            },
            SourceKind::WorkloadIdentity => Source::WorkloadIdentity {
                authority_host: authority(),
                tenant_id: required(tenant_id, "tenant_id (--tenant-id)")?,
                client_id: required(client_id, "client_id (--client-id)")?,
                token_file: required(
                    token_file.map(|p| p.display().to_string()),
                    "federated_token_file (--federated-token-file)",
                )?
                .into(),
            },
            SourceKind::ClientSecret => Source::ClientSecret {
                authority_host: authority(),
                tenant_id: required(tenant_id, "tenant_id (--tenant-id)")?,
                client_id: required(client_id, "client_id (--client-id)")?,
                secret: client_secret.ok_or_else(|| {
                    TokenError::Configuration(
                        "source client-secret needs client_secret_file or client_secret_env \
                         (--client-secret-file, AZURE_CLIENT_SECRET)"
                            .into(),
                    )
                })?,
            },
            SourceKind::ClientCertificate => {
                let path = required(
                    certificate_path.map(|p| p.display().to_string()),
                    "client_certificate_path (--client-certificate-path)",
                )?;
                let pem = std::fs::read(&path)
                    .map_err(|e| TokenError::Configuration(format!("reading {path}: {e}")))?;
                Source::ClientCertificate {
                    authority_host: authority(),
                    tenant_id: required(tenant_id, "tenant_id (--tenant-id)")?,
                    client_id: required(client_id, "client_id (--client-id)")?,
                    certificate: ClientCertificate::from_pem(&pem)?,
                }
            }
        };
        Ok(BuiltTokenService {
            source,
            config: self.provider_config()?,
            allowed: (!self.allow_identities.is_empty()).then(|| self.allow_identities.clone()),
            app_service_header,
            client_ids: self.identity_client_ids.clone(),
        })
    }

    fn provider_config(&self) -> Result<ProviderConfig, TokenError> {
        let defaults = ProviderConfig::default();
        let config = ProviderConfig {
            deadline: self
                .deadline_ms
                .map_or(defaults.deadline, Duration::from_millis),
            max_concurrent_requests: self
                .max_concurrent_requests
                .unwrap_or(defaults.max_concurrent_requests),
            max_requests_per_second: self
                .max_requests_per_second
                .unwrap_or(defaults.max_requests_per_second),
            max_entries: self.max_entries.unwrap_or(defaults.max_entries),
            ..defaults
        };
        for (name, zero) in [
            ("deadline_ms", config.deadline.is_zero()),
            (
                "max_concurrent_requests",
                config.max_concurrent_requests == 0,
            ),
            (
                "max_requests_per_second",
                config.max_requests_per_second == 0,
            ),
            ("max_entries", config.max_entries == 0),
        ] {
            if zero {
                return Err(TokenError::Configuration(format!(
                    "{name} must be positive"
                )));
            }
        }
        Ok(config)
    }

    /// The `azgate token-service` command line with these settings: environment assignments
    /// for secrets named by a variable other than the flag's own, then the command. Secret
    /// values never appear (a value given inline is named by its standard variable).
    pub fn command_line(&self, listen: &str) -> String {
        let mut line = String::new();
        let mut env_prefix = |standard: &str, var: &Option<String>| {
            if let Some(var) = var
                && var != standard
            {
                let _ = write!(line, "{standard}=\"${var}\" ");
            }
        };
        env_prefix("IDENTITY_HEADER", &self.identity_header_env);
        env_prefix("AZURE_CLIENT_SECRET", &self.client_secret_env);
        env_prefix(APP_SERVICE_HEADER_ENV, &self.app_service_header_env);
        line.push_str("azgate token-service --listen ");
        line.push_str(&shell_quote(listen));
        let mut flag = |name: &str, value: Option<String>| {
            if let Some(value) = value {
                let _ = write!(line, " --{name} {}", shell_quote(&value));
            }
        };
        let path = |path: &Option<PathBuf>| path.as_ref().map(|p| p.display().to_string());
        let file = |source: &Option<SecretSource>, file: &Option<PathBuf>| match source {
            Some(SecretSource::File(path)) => Some(path.display().to_string()),
            _ => file.as_ref().map(|p| p.display().to_string()),
        };
        if self.source != SourceKind::Auto {
            flag("source", Some(self.source.flag_value().to_owned()));
        }
        flag("imds-endpoint", self.imds_endpoint.clone());
        flag("identity-endpoint", self.identity_endpoint.clone());
        flag(
            "identity-header-file",
            file(&self.identity_header, &self.identity_header_file),
        );
        flag("authority-host", self.authority_host.clone());
        flag("tenant-id", self.tenant_id.clone());
        flag("client-id", self.client_id.clone());
        flag(
            "client-secret-file",
            file(&self.client_secret, &self.client_secret_file),
        );
        flag(
            "client-certificate-path",
            path(&self.client_certificate_path),
        );
        flag("federated-token-file", path(&self.federated_token_file));
        for identity in &self.allow_identities {
            flag("allow-identity", Some(identity.to_string()));
        }
        for (resource_id, client_id) in &self.identity_client_ids {
            flag(
                "identity-client-id",
                Some(format!("{resource_id}={client_id}")),
            );
        }
        flag("deadline-ms", self.deadline_ms.map(|v| v.to_string()));
        flag(
            "max-concurrent-requests",
            self.max_concurrent_requests.map(|v| v.to_string()),
        );
        flag(
            "max-requests-per-second",
            self.max_requests_per_second.map(|v| v.to_string()),
        );
        flag("max-entries", self.max_entries.map(|v| v.to_string()));
        flag(
            "app-service-header-file",
            file(&self.app_service_header, &self.app_service_header_file),
        );
        line
    }
}

/// `text` as one shell word: bare when it is only safe characters, else single-quoted.
fn shell_quote(text: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c);
    if !text.is_empty() && text.chars().all(safe) {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests;
