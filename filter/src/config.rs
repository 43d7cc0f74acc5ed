//! The plugin configuration: JSON, parsed and validated once in `on_configure`.
//!
//! Unknown top-level fields are refused (a typo must not silently turn a check off). Roles use
//! the field names of Teleport role YAML written as JSON; fields other than
//! `metadata.name`, `spec.allow.azure_identities` and `spec.deny.azure_identities` are ignored,
//! so existing role files can be pasted in unchanged.

use std::fmt;

use serde::Deserialize;

use crate::endpoint::{Cloud, EndpointPolicy};
use crate::identity::CertificateRules;
use crate::lock::LockSet;
use crate::policy::{IdentityId, RoleRules, RoleSet};
use crate::resource::RawMetadata;
use crate::template::Template;

/// A configuration error naming the offending field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// JSON path of the field, e.g. `roles[1].spec.allow.azure_identities[0]`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid plugin configuration: {}: {}",
            self.field, self.message
        )
    }
}

impl std::error::Error for ConfigError {}

fn field_error(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.into(),
    }
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Role definitions by name.
    pub roles: RoleSet,
    /// Which Azure clouds' endpoints may be targeted.
    pub endpoints: EndpointPolicy,
    /// Cluster the IMDS-protocol token call-out goes to.
    pub token_cluster: String,
    /// `:authority` of the token call-out.
    pub token_authority: String,
    /// Call-out timeout, milliseconds (> 0).
    pub token_timeout_ms: u64,
    /// Cached tokens are used until `expires_on` minus this many seconds.
    pub token_expiry_margin_s: i64,
    /// Forward requests without `Authorization` (no token injected), as Teleport does.
    pub allow_unauthenticated: bool,
    /// Largest accepted bearer token, bytes.
    pub max_token_bytes: usize,
    /// Tolerance for certificate and JWT time checks, seconds.
    pub clock_skew_s: i64,
    /// Verified (JWT, certificate) pairs remembered per worker.
    pub verified_token_cache_size: usize,
    /// How often a worker waiting for another worker's token fetch looks at shared data, ms.
    pub token_wait_poll_ms: u64,
    /// What a certificate's usage and route must be (`required_usage`, `allowed_apps`,
    /// `allowed_clusters`).
    pub certificate: CertificateRules,
    /// Teleport locks, checked on every request.
    pub locks: LockSet,
    /// The Entra tenant named in the bearer challenges of data planes (Key Vault, Storage).
    /// Managed-identity clients ignore it; `common` unless set.
    pub tenant_id: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            roles: RoleSet::default(),
            endpoints: EndpointPolicy::default(),
            token_cluster: "azgate_msi".into(),
            token_authority: "169.254.169.254".into(),
            token_timeout_ms: 5_000,
            token_expiry_margin_s: 300,
            allow_unauthenticated: false,
            max_token_bytes: 8 * 1024,
            clock_skew_s: 60,
            verified_token_cache_size: 1024,
            token_wait_poll_ms: 10,
            certificate: CertificateRules::default(),
            locks: LockSet::default(),
            tenant_id: "common".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    roles: Option<Vec<serde_json::Value>>,
    clouds: Option<Vec<String>>,
    token_cluster: Option<String>,
    token_authority: Option<String>,
    token_timeout_ms: Option<u64>,
    token_expiry_margin_s: Option<i64>,
    allow_unauthenticated: Option<bool>,
    max_token_bytes: Option<usize>,
    clock_skew_s: Option<i64>,
    verified_token_cache_size: Option<usize>,
    token_wait_poll_ms: Option<u64>,
    required_usage: Option<String>,
    allowed_apps: Option<Vec<String>>,
    allowed_clusters: Option<Vec<String>>,
    locks: Option<Vec<serde_json::Value>>,
    tenant_id: Option<String>,
}

#[derive(Deserialize)]
struct RawRole {
    kind: Option<String>,
    version: Option<String>,
    metadata: Option<RawMetadata>,
    spec: Option<RawSpec>,
}

#[derive(Deserialize)]
struct RawSpec {
    allow: Option<RawConditions>,
    deny: Option<RawConditions>,
}

#[derive(Deserialize)]
struct RawConditions {
    azure_identities: Option<Vec<String>>,
}

impl Config {
    /// Parses and validates the plugin configuration bytes. Empty input is refused: a gateway
    /// without roles would refuse everything, which is never what the operator meant.
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_slice(bytes).map_err(|e| {
            let message = e.to_string();
            // serde names the unknown field in its message; keep it as the field.
            let field = match message.split('`').nth(1) {
                Some("") if message.starts_with("unknown field") => "(an empty key)",
                Some(name) if message.starts_with("unknown field") => name,
                _ => "(document)",
            }
            .to_string();
            field_error(field, message)
        })?;
        let defaults = Self::default();
        let roles =
            parse_roles(raw.roles.ok_or_else(|| {
                field_error("roles", "required: a list of Teleport roles (JSON)")
            })?)?;
        let endpoints = match raw.clouds {
            None => defaults.endpoints,
            Some(names) => {
                if names.is_empty() {
                    return Err(field_error("clouds", "must name at least one cloud"));
                }
                let mut clouds = Vec::new();
                for (i, name) in names.iter().enumerate() {
                    let cloud = Cloud::from_name(name).ok_or_else(|| {
                        field_error(
                            format!("clouds[{i}]"),
                            format!("unknown cloud {name:?}; use public, usgov or china"),
                        )
                    })?;
                    clouds.push(cloud);
                }
                EndpointPolicy::new(clouds)
            }
        };
        let non_empty = |field: &str, value: Option<String>, default: String| match value {
            Some(v) if v.trim().is_empty() => Err(field_error(field, "must not be empty")),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        let config = Self {
            roles,
            endpoints,
            token_cluster: non_empty("token_cluster", raw.token_cluster, defaults.token_cluster)?,
            token_authority: non_empty(
                "token_authority",
                raw.token_authority,
                defaults.token_authority,
            )?,
            token_timeout_ms: in_range(
                "token_timeout_ms",
                raw.token_timeout_ms,
                defaults.token_timeout_ms,
                1..=600_000,
            )?,
            token_expiry_margin_s: in_range(
                "token_expiry_margin_s",
                raw.token_expiry_margin_s,
                defaults.token_expiry_margin_s,
                0..=3_600,
            )?,
            allow_unauthenticated: raw
                .allow_unauthenticated
                .unwrap_or(defaults.allow_unauthenticated),
            max_token_bytes: in_range(
                "max_token_bytes",
                raw.max_token_bytes,
                defaults.max_token_bytes,
                256..=65_536,
            )?,
            clock_skew_s: in_range(
                "clock_skew_s",
                raw.clock_skew_s,
                defaults.clock_skew_s,
                0..=600,
            )?,
            verified_token_cache_size: in_range(
                "verified_token_cache_size",
                raw.verified_token_cache_size,
                defaults.verified_token_cache_size,
                0..=1_000_000,
            )?,
            token_wait_poll_ms: in_range(
                "token_wait_poll_ms",
                raw.token_wait_poll_ms,
                defaults.token_wait_poll_ms,
                1..=1_000,
            )?,
            certificate: CertificateRules {
                required_usage: raw
                    .required_usage
                    .map(|v| non_empty("required_usage", Some(v), String::new()))
                    .transpose()?,
                allowed_apps: names_list("allowed_apps", raw.allowed_apps)?,
                allowed_clusters: names_list("allowed_clusters", raw.allowed_clusters)?,
            },
            locks: LockSet::parse(raw.locks.unwrap_or_default())
                .map_err(|(field, message)| field_error(field, message))?,
            tenant_id: match raw.tenant_id {
                None => defaults.tenant_id,
                // It is written into a response header: a GUID or a domain name, nothing else.
                Some(t)
                    if !t.is_empty()
                        && t.len() <= 253
                        && t.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') =>
                {
                    t
                }
                Some(_) => {
                    return Err(field_error(
                        "tenant_id",
                        "must be a tenant ID or domain (letters, digits, '.' and '-')",
                    ));
                }
            },
        };
        Ok(config)
    }
}

fn in_range<T: PartialOrd + Copy + fmt::Display>(
    field: &str,
    value: Option<T>,
    default: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError> {
    let value = value.unwrap_or(default);
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(field_error(
            field,
            format!("{value} is outside {}..={}", range.start(), range.end()),
        ))
    }
}

/// An optional list of names: absent is empty (accept any); present must name at least one,
/// none empty.
fn names_list(field: &str, value: Option<Vec<String>>) -> Result<Vec<String>, ConfigError> {
    let Some(names) = value else {
        return Ok(Vec::new());
    };
    if names.is_empty() {
        return Err(field_error(
            field,
            "must name at least one (leave it out to accept any)",
        ));
    }
    if let Some(i) = names.iter().position(|n| n.trim().is_empty()) {
        return Err(field_error(format!("{field}[{i}]"), "must not be empty"));
    }
    Ok(names)
}

/// Parses and validates a list of Teleport roles (JSON values, as in the `roles` field), with the
/// gateway's rules: full resource IDs or Teleport templates, no `*` in allow, no duplicate names. The
/// dev CA (`azgate ca issue`) reads role files with this too, so both sides agree on a role.
pub fn parse_roles(values: Vec<serde_json::Value>) -> Result<RoleSet, ConfigError> {
    let mut set = RoleSet::default();
    for (i, value) in values.into_iter().enumerate() {
        let at = |rest: &str| format!("roles[{i}]{rest}");
        let raw: RawRole =
            serde_json::from_value(value).map_err(|e| field_error(at(""), e.to_string()))?;
        if let Some(kind) = &raw.kind
            && kind != "role"
        {
            return Err(field_error(
                at(".kind"),
                format!("expected \"role\", got {kind:?}"),
            ));
        }
        if let Some(version) = &raw.version
            && !matches!(version.as_str(), "v3" | "v4" | "v5" | "v6" | "v7" | "v8")
        {
            return Err(field_error(
                at(".version"),
                format!("unsupported role version {version:?} (v3 to v8)"),
            ));
        }
        let name = RawMetadata::name_of(raw.metadata)
            .ok_or_else(|| field_error(at(".metadata.name"), "required"))?;
        let (allow, deny) = match raw.spec {
            Some(spec) => (
                spec.allow
                    .and_then(|c| c.azure_identities)
                    .unwrap_or_default(),
                spec.deny
                    .and_then(|c| c.azure_identities)
                    .unwrap_or_default(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        let mut rules = RoleRules::default();
        for (j, value) in allow.iter().enumerate() {
            let field = at(&format!(".spec.allow.azure_identities[{j}]"));
            if value == "*" {
                return Err(field_error(
                    field,
                    "\"*\" is not allowed in allow rules (Teleport refuses it too); list identities",
                ));
            }
            rules.allow.push(role_value(&field, value)?);
        }
        for (j, value) in deny.iter().enumerate() {
            let field = at(&format!(".spec.deny.azure_identities[{j}]"));
            if value == "*" {
                rules.deny_all = true;
                continue;
            }
            rules.deny.push(role_value(&field, value)?);
        }
        if !set.insert(name.clone(), rules) {
            return Err(field_error(
                at(".metadata.name"),
                format!("role {name:?} is defined twice"),
            ));
        }
    }
    Ok(set)
}

/// One `azure_identities` value: a template (expanded per request from the caller's traits), or
/// a literal that must be a full managed-identity resource ID.
fn role_value(field: &str, value: &str) -> Result<Template, ConfigError> {
    let template = Template::parse(value).map_err(|e| field_error(field, e))?;
    if template.is_literal() {
        let id = IdentityId::parse(value).map_err(|e| field_error(field, e))?;
        return Ok(Template::Literal(id.as_str().to_string()));
    }
    Ok(template)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "/subscriptions/00/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader";

    fn role(name: &str, allow: &[&str], deny: &[&str]) -> serde_json::Value {
        serde_json::json!({
            "kind": "role", "version": "v7", "metadata": {"name": name},
            "spec": {"allow": {"azure_identities": allow, "app_labels": {"*": "*"}},
                     "deny": {"azure_identities": deny}}
        })
    }

    fn parse(v: serde_json::Value) -> Result<Config, ConfigError> {
        Config::parse(v.to_string().as_bytes())
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = parse(serde_json::json!({"roles": [role("r", &[ID], &[])]})).unwrap();
        assert_eq!(config.roles.len(), 1);
        assert_eq!(config.token_cluster, "azgate_msi");
        assert_eq!(config.token_timeout_ms, 5_000);
        assert!(!config.allow_unauthenticated);
    }

    #[test]
    fn unknown_fields_are_named() {
        let err =
            parse(serde_json::json!({"roles": [], "allow_unauthenticted": true})).unwrap_err();
        assert_eq!(err.field, "allow_unauthenticted");
    }

    #[test]
    fn bad_identities_name_their_field() {
        let err =
            parse(serde_json::json!({"roles": [role("a", &[ID], &[]), role("b", &["nope"], &[])]}))
                .unwrap_err();
        assert_eq!(err.field, "roles[1].spec.allow.azure_identities[0]");
    }

    #[test]
    fn wildcard_allowed_only_in_deny() {
        let err = parse(serde_json::json!({"roles": [role("a", &["*"], &[])]})).unwrap_err();
        assert_eq!(err.field, "roles[0].spec.allow.azure_identities[0]");
        assert!(parse(serde_json::json!({"roles": [role("a", &[ID], &["*"])]})).is_ok());
    }

    #[test]
    fn templates_load_unless_malformed_and_duplicates_and_missing_names_are_refused() {
        // The preset `access` role's value, and a deny template.
        let config = parse(serde_json::json!({"roles": [role(
            "access",
            &["{{internal.azure_identities}}"],
            &["{{external.denied_identities}}"],
        )]}))
        .unwrap();
        assert!(config.roles.role("access").is_some());
        let err =
            parse(serde_json::json!({"roles": [role("a", &[ID], &["{{internal.nonsense}}"])]}))
                .unwrap_err();
        assert_eq!(err.field, "roles[0].spec.deny.azure_identities[0]");
        assert!(err.message.contains("internal trait"), "{}", err.message);
        let err =
            parse(serde_json::json!({"roles": [role("a", &[ID], &[]), role("a", &[ID], &[])]}))
                .unwrap_err();
        assert_eq!(err.field, "roles[1].metadata.name");
        let err = parse(serde_json::json!({"roles": [{"spec": {}}]})).unwrap_err();
        assert_eq!(err.field, "roles[0].metadata.name");
    }

    #[test]
    fn certificate_rules_are_optional_and_never_empty() {
        let config = parse(serde_json::json!({"roles": []})).unwrap();
        assert_eq!(config.certificate, CertificateRules::default());
        let config = parse(
            serde_json::json!({"roles": [], "required_usage": "usage:apps",
            "allowed_apps": ["azure-cli"], "allowed_clusters": ["teleport.example.com"]}),
        )
        .unwrap();
        assert_eq!(
            config.certificate.required_usage.as_deref(),
            Some("usage:apps")
        );
        assert_eq!(config.certificate.allowed_apps, ["azure-cli"]);
        for (bad, field) in [
            (
                serde_json::json!({"roles": [], "allowed_apps": []}),
                "allowed_apps",
            ),
            (
                serde_json::json!({"roles": [], "allowed_clusters": [" "]}),
                "allowed_clusters[0]",
            ),
            (
                serde_json::json!({"roles": [], "required_usage": ""}),
                "required_usage",
            ),
        ] {
            assert_eq!(parse(bad).unwrap_err().field, field);
        }
    }

    #[test]
    fn ranges_and_clouds_are_checked() {
        let err = parse(serde_json::json!({"roles": [], "token_timeout_ms": 0})).unwrap_err();
        assert_eq!(err.field, "token_timeout_ms");
        let err =
            parse(serde_json::json!({"roles": [], "clouds": ["public", "mars"]})).unwrap_err();
        assert_eq!(err.field, "clouds[1]");
        let err = parse(serde_json::json!({"roles": [], "token_cluster": " "})).unwrap_err();
        assert_eq!(err.field, "token_cluster");
    }

    #[test]
    fn missing_roles_and_bad_json_are_refused() {
        assert_eq!(parse(serde_json::json!({})).unwrap_err().field, "roles");
        assert!(Config::parse(b"").is_err());
        // A fuzz finding (fuzz/regressions/plugin_config): an empty unknown key still names a field.
        assert_eq!(
            Config::parse(br#"{"":0}"#).unwrap_err().field,
            "(an empty key)"
        );
        assert!(Config::parse(b"{").is_err());
    }
}
