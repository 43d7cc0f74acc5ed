//! Token sources: where a token comes from, how one attempt is made, and how each source's
//! answer (success or error) is parsed.

pub(crate) use azgate_filter::audience::resource_for_scope as resource_for;
use azgate_filter::audience::scope_for_resource;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{Method, Request, Response};
use rsa::pkcs1::{DecodeRsaPrivateKey as _, EncodeRsaPrivateKey as _};
use rsa::pkcs8::DecodePrivateKey as _;
use serde_json::Value;

use super::cae::TokenSha256;
use super::client::HttpClient;
use super::error::TokenError;
use azgate_msi::protocol::{APP_SERVICE_API_VERSION, IMDS_API_VERSION, IMDS_TOKEN_PATH};

/// The IMDS address; never proxied, plain HTTP.
pub const IMDS_ENDPOINT: &str = "http://169.254.169.254";
/// The public-cloud Entra authority.
pub const DEFAULT_AUTHORITY_HOST: &str = "https://login.microsoftonline.com";
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Lifetime of the client assertion signed for certificate credentials.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(600);

/// Which managed identity a token is for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ManagedIdentity {
    /// The host's system-assigned identity, or the configured principal for sources that have
    /// exactly one (workload identity, service principals).
    SystemAssigned,
    /// A user-assigned identity by client (application) id.
    ClientId(String),
    /// A user-assigned identity by object (principal) id.
    ObjectId(String),
    /// A user-assigned identity by ARM resource id (`msi_res_id`).
    ResourceId(String),
}

impl fmt::Display for ManagedIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManagedIdentity::SystemAssigned => f.write_str("system"),
            ManagedIdentity::ClientId(id) => write!(f, "client_id={id}"),
            ManagedIdentity::ObjectId(id) => write!(f, "object_id={id}"),
            ManagedIdentity::ResourceId(id) => write!(f, "msi_res_id={id}"),
        }
    }
}

impl std::str::FromStr for ManagedIdentity {
    type Err = String;

    /// Parses `system`, `client_id=…`, `object_id=…` or `msi_res_id=…` (the Display form).
    fn from_str(text: &str) -> Result<Self, String> {
        match text.split_once('=') {
            None if text == "system" => Ok(ManagedIdentity::SystemAssigned),
            Some(("client_id", id)) if !id.is_empty() => {
                Ok(ManagedIdentity::ClientId(id.to_owned()))
            }
            Some(("object_id", id)) if !id.is_empty() => {
                Ok(ManagedIdentity::ObjectId(id.to_owned()))
            }
            Some(("msi_res_id" | "mi_res_id", id)) if !id.is_empty() => {
                Ok(ManagedIdentity::ResourceId(id.to_owned()))
            }
            _ => Err(format!(
                "expected system, client_id=ID, object_id=ID or msi_res_id=ID, got {text:?}"
            )),
        }
    }
}

/// A secret string whose `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<Arc<str>>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for putting on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(Secret::new(value))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("...")
    }
}

/// A client certificate for a service principal: the signing key and the certificate's
/// SHA-1 thumbprint (Entra's `x5t`).
#[derive(Clone)]
pub struct ClientCertificate {
    /// The RSA key, PKCS#1 (`Debug` redacts it).
    key: Arc<jsonwebtoken::EncodingKey>,
    thumbprint_sha1: [u8; 20],
}

impl ClientCertificate {
    /// Loads a PEM bundle holding an RSA private key (PKCS#8 or PKCS#1) and its certificate,
    /// as `AZURE_CLIENT_CERTIFICATE_PATH` names.
    pub fn from_pem(pem: &[u8]) -> Result<ClientCertificate, TokenError> {
        use rustls_pki_types::pem::PemObject as _;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};

        let bad = |what: &str| TokenError::Configuration(format!("client certificate: {what}"));
        let certificate = CertificateDer::pem_slice_iter(pem)
            .next()
            .ok_or_else(|| bad("no CERTIFICATE block"))?
            .map_err(|error| bad(&error.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(pem)
            .map_err(|error| bad(&format!("private key: {error}")))?;
        let key = match &key {
            PrivateKeyDer::Pkcs8(der) => rsa::RsaPrivateKey::from_pkcs8_der(der.secret_pkcs8_der())
                .map_err(|e| e.to_string()),
            PrivateKeyDer::Pkcs1(der) => rsa::RsaPrivateKey::from_pkcs1_der(der.secret_pkcs1_der())
                .map_err(|e| e.to_string()),
            _ => return Err(bad("only RSA keys are supported (Entra signs with RS256)")),
        }
        .and_then(|key| {
            key.validate().map_err(|e| e.to_string())?;
            key.to_pkcs1_der().map_err(|e| e.to_string())
        })
        .map_err(|error| bad(&format!("RSA key rejected: {error}")))?;
        let key = jsonwebtoken::EncodingKey::from_rsa_der(key.as_bytes());
        let digest = ring::digest::digest(
            &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
            certificate.as_ref(),
        );
        let mut thumbprint_sha1 = [0; 20];
        thumbprint_sha1.copy_from_slice(digest.as_ref());
        Ok(ClientCertificate {
            key: Arc::new(key),
            thumbprint_sha1,
        })
    }

    /// A signed RS256 client assertion for `audience` (the token endpoint URL).
    fn assertion(&self, client_id: &str, audience: &str) -> Result<String, TokenError> {
        let now = unix_now();
        let header = jsonwebtoken::Header {
            x5t: Some(URL_SAFE_NO_PAD.encode(self.thumbprint_sha1)),
            ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256)
        };
        let claims = serde_json::json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
            "nbf": now,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME.as_secs(),
        });
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|error| TokenError::Configuration(format!("RSA signing failed ({error})")))
    }
}

impl fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCertificate")
            .field("key", &"...")
            .finish()
    }
}

/// Where tokens come from.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Source {
    /// Azure Instance Metadata Service (VM, VMSS, AKS node), or anything speaking its protocol
    /// (`AZURE_POD_IDENTITY_AUTHORITY_HOST`).
    Imds {
        /// Scheme and host, e.g. `http://169.254.169.254`; the token path is appended.
        endpoint: String,
    },
    /// App Service, Functions, Container Apps: `IDENTITY_ENDPOINT` + `IDENTITY_HEADER`,
    /// api-version 2019-08-01.
    AppService {
        /// The full token URL (`IDENTITY_ENDPOINT`).
        endpoint: String,
        /// `IDENTITY_HEADER`, sent as `X-IDENTITY-HEADER`.
        header: Secret,
    },
    /// AKS workload identity: the projected service-account token in `token_file` is exchanged
    /// at the Entra authority. The identity is chosen by client id (default `client_id`).
    WorkloadIdentity {
        /// `AZURE_AUTHORITY_HOST`.
        authority_host: String,
        /// `AZURE_TENANT_ID`.
        tenant_id: String,
        /// `AZURE_CLIENT_ID`, used when the request names no client id.
        client_id: String,
        /// `AZURE_FEDERATED_TOKEN_FILE`, re-read on every fetch because the kubelet rotates it.
        token_file: PathBuf,
    },
    /// A service principal with a client secret.
    ClientSecret {
        /// `AZURE_AUTHORITY_HOST`.
        authority_host: String,
        /// `AZURE_TENANT_ID`.
        tenant_id: String,
        /// `AZURE_CLIENT_ID`.
        client_id: String,
        /// `AZURE_CLIENT_SECRET`.
        secret: Secret,
    },
    /// A service principal with a certificate (RS256 client assertion).
    ClientCertificate {
        /// `AZURE_AUTHORITY_HOST`.
        authority_host: String,
        /// `AZURE_TENANT_ID`.
        tenant_id: String,
        /// `AZURE_CLIENT_ID`.
        client_id: String,
        /// Loaded from `AZURE_CLIENT_CERTIFICATE_PATH`.
        certificate: ClientCertificate,
    },
}

/// A token as parsed from one source response, before the cache dates it.
#[derive(Debug)]
pub(crate) struct FetchedToken {
    pub(crate) secret: Secret,
    /// Unix seconds.
    pub(crate) expires_on: u64,
}

// === impl Source ===

impl Source {
    /// [`Source::detect`] over the process environment.
    pub fn from_environment() -> Result<Source, TokenError> {
        Source::detect(|name| std::env::var(name).ok())
    }

    /// Detects the source from environment variables, in the Azure SDKs' order
    /// (DefaultAzureCredential's: environment service principal, workload identity, then
    /// managed identity: App Service, IMDS). `lookup` reads one variable; tests pass a map.
    pub fn detect(lookup: impl Fn(&str) -> Option<String>) -> Result<Source, TokenError> {
        let var = |name: &str| lookup(name).filter(|value| !value.is_empty());
        let authority_host =
            var("AZURE_AUTHORITY_HOST").unwrap_or_else(|| DEFAULT_AUTHORITY_HOST.to_owned());
        if let (Some(tenant_id), Some(client_id)) = (var("AZURE_TENANT_ID"), var("AZURE_CLIENT_ID"))
        {
            if let Some(secret) = var("AZURE_CLIENT_SECRET") {
                return Ok(Source::ClientSecret {
                    authority_host,
                    tenant_id,
                    client_id,
                    secret: Secret::new(secret),
                });
            }
            if let Some(path) = var("AZURE_CLIENT_CERTIFICATE_PATH") {
                let pem = std::fs::read(&path).map_err(|error| {
                    TokenError::Configuration(format!("reading {path}: {error}"))
                })?;
                let certificate = ClientCertificate::from_pem(&pem)?;
                return Ok(Source::ClientCertificate {
                    authority_host,
                    tenant_id,
                    client_id,
                    certificate,
                });
            }
            if let Some(token_file) = var("AZURE_FEDERATED_TOKEN_FILE") {
                return Ok(Source::WorkloadIdentity {
                    authority_host,
                    tenant_id,
                    client_id,
                    token_file: token_file.into(),
                });
            }
        }
        if let Some(endpoint) = var("IDENTITY_ENDPOINT") {
            if var("IDENTITY_SERVER_THUMBPRINT").is_some() {
                return Err(TokenError::Configuration(
                    "Service Fabric managed identity is not supported".into(),
                ));
            }
            if var("IMDS_ENDPOINT").is_some() {
                return Err(TokenError::Configuration(
                    "Azure Arc managed identity is not supported".into(),
                ));
            }
            if let Some(header) = var("IDENTITY_HEADER") {
                return Ok(Source::AppService {
                    endpoint,
                    header: Secret::new(header),
                });
            }
        }
        let endpoint =
            var("AZURE_POD_IDENTITY_AUTHORITY_HOST").unwrap_or_else(|| IMDS_ENDPOINT.to_owned());
        Ok(Source::Imds { endpoint })
    }

    /// A short name for logs, metrics and cache keys.
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Imds { .. } => "imds",
            Source::AppService { .. } => "app_service",
            Source::WorkloadIdentity { .. } => "workload_identity",
            Source::ClientSecret { .. } => "client_secret",
            Source::ClientCertificate { .. } => "client_certificate",
        }
    }

    /// Makes one request to the source; no retries here.
    #[cfg(test)]
    pub(crate) async fn fetch_once(
        &self,
        client: &dyn HttpClient,
        identity: &ManagedIdentity,
        resource: &str,
    ) -> Result<FetchedToken, TokenError> {
        self.fetch_refreshing(client, identity, resource, None)
            .await
    }

    /// Makes one request to the source; no retries here. `rejected` is the hash of a token a
    /// resource refused (CAE), passed on to the sources that take it (App Service's
    /// `token_sha256_to_refresh`); the others fetch anew anyway.
    pub(crate) async fn fetch_refreshing(
        &self,
        client: &dyn HttpClient,
        identity: &ManagedIdentity,
        resource: &str,
        rejected: Option<TokenSha256>,
    ) -> Result<FetchedToken, TokenError> {
        let request = self.request(identity, resource, rejected)?;
        let response = client.send(request).await?;
        parse_response(&response)
    }

    fn request(
        &self,
        identity: &ManagedIdentity,
        resource: &str,
        rejected: Option<TokenSha256>,
    ) -> Result<Request<Bytes>, TokenError> {
        let built = match self {
            Source::Imds { endpoint } => {
                let mut query = form_urlencoded::Serializer::new(String::new());
                query
                    .append_pair("api-version", IMDS_API_VERSION)
                    .append_pair("resource", resource);
                match identity {
                    ManagedIdentity::SystemAssigned => {}
                    ManagedIdentity::ClientId(id) => drop(query.append_pair("client_id", id)),
                    ManagedIdentity::ObjectId(id) => drop(query.append_pair("object_id", id)),
                    ManagedIdentity::ResourceId(id) => drop(query.append_pair("msi_res_id", id)),
                }
                let url = format!(
                    "{}{IMDS_TOKEN_PATH}?{}",
                    endpoint.trim_end_matches('/'),
                    query.finish()
                );
                Request::get(url)
                    .header("Metadata", "true")
                    .body(Bytes::new())
            }
            Source::AppService { endpoint, header } => {
                let mut query = form_urlencoded::Serializer::new(String::new());
                query
                    .append_pair("api-version", APP_SERVICE_API_VERSION)
                    .append_pair("resource", resource);
                match identity {
                    ManagedIdentity::SystemAssigned => {}
                    ManagedIdentity::ClientId(id) => drop(query.append_pair("client_id", id)),
                    ManagedIdentity::ObjectId(id) => drop(query.append_pair("principal_id", id)),
                    ManagedIdentity::ResourceId(id) => drop(query.append_pair("mi_res_id", id)),
                }
                if let Some(hash) = rejected {
                    query.append_pair(TokenSha256::PARAMETER, &hash.to_string());
                }
                let separator = if endpoint.contains('?') { '&' } else { '?' };
                Request::get(format!("{endpoint}{separator}{}", query.finish()))
                    .header("X-IDENTITY-HEADER", header.expose())
                    .header("Metadata", "true")
                    .body(Bytes::new())
            }
            Source::WorkloadIdentity {
                authority_host,
                tenant_id,
                client_id,
                token_file,
            } => {
                let client_id = entra_client_id(client_id, identity, true)?;
                let assertion = std::fs::read_to_string(token_file).map_err(|error| {
                    TokenError::Configuration(format!("reading {}: {error}", token_file.display()))
                })?;
                let form = form_urlencoded::Serializer::new(String::new())
                    .append_pair("grant_type", "client_credentials")
                    .append_pair("client_id", client_id)
                    .append_pair("scope", &scope_for_resource(resource))
                    .append_pair("client_assertion_type", JWT_BEARER)
                    .append_pair("client_assertion", assertion.trim())
                    .finish();
                entra_post(&token_url(authority_host, tenant_id), form)
            }
            Source::ClientSecret {
                authority_host,
                tenant_id,
                client_id,
                secret,
            } => {
                let client_id = entra_client_id(client_id, identity, false)?;
                let form = form_urlencoded::Serializer::new(String::new())
                    .append_pair("grant_type", "client_credentials")
                    .append_pair("client_id", client_id)
                    .append_pair("scope", &scope_for_resource(resource))
                    .append_pair("client_secret", secret.expose())
                    .finish();
                entra_post(&token_url(authority_host, tenant_id), form)
            }
            Source::ClientCertificate {
                authority_host,
                tenant_id,
                client_id,
                certificate,
            } => {
                let client_id = entra_client_id(client_id, identity, false)?;
                let url = token_url(authority_host, tenant_id);
                let form = form_urlencoded::Serializer::new(String::new())
                    .append_pair("grant_type", "client_credentials")
                    .append_pair("client_id", client_id)
                    .append_pair("scope", &scope_for_resource(resource))
                    .append_pair("client_assertion_type", JWT_BEARER)
                    .append_pair("client_assertion", &certificate.assertion(client_id, &url)?)
                    .finish();
                entra_post(&url, form)
            }
        };
        built.map_err(|error| {
            TokenError::Configuration(format!("cannot build the token request: {error}"))
        })
    }
}

/// The client id an Entra-based source uses for `identity`. Workload identity picks the
/// identity by client id (one federated credential per identity); a service principal is one
/// fixed identity.
fn entra_client_id<'a>(
    configured: &'a str,
    identity: &'a ManagedIdentity,
    per_identity_client_id: bool,
) -> Result<&'a str, TokenError> {
    match identity {
        ManagedIdentity::SystemAssigned => Ok(configured),
        ManagedIdentity::ClientId(id) if id == configured || per_identity_client_id => Ok(id),
        other => Err(TokenError::UnsupportedIdentity(format!(
            "this source serves {} only; {other} cannot be selected",
            if per_identity_client_id {
                "identities selected by client_id"
            } else {
                "its configured client id"
            }
        ))),
    }
}

fn token_url(authority_host: &str, tenant_id: &str) -> String {
    format!(
        "{}/{tenant_id}/oauth2/v2.0/token",
        authority_host.trim_end_matches('/')
    )
}

fn entra_post(url: &str, form: String) -> http::Result<Request<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri(url)
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(Bytes::from(form))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// Parses any source's answer: the token on 200, the source's error shape otherwise.
pub(crate) fn parse_response(response: &Response<Bytes>) -> Result<FetchedToken, TokenError> {
    let status = response.status().as_u16();
    if status != 200 {
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let (code, description) = parse_error_body(response.body());
        return Err(TokenError::from_upstream_status(
            status,
            code,
            description,
            retry_after,
        ));
    }
    // The one rule set for token answers, shared with the filter.
    let token = azgate_filter::imds::parse_token_body(
        response.body(),
        i64::try_from(unix_now()).unwrap_or(i64::MAX),
    )
    .map_err(|error| TokenError::MalformedResponse(error.to_string()))?;
    Ok(FetchedToken {
        secret: Secret::new(token.secret),
        expires_on: u64::try_from(token.expires_on).unwrap_or_default(),
    })
}

/// `(error code, description)` from IMDS (`error`/`error_description`), Entra (same plus
/// `error_codes`), Service Fabric (`error.code`/`error.message`) and App Service
/// (`statusCode`/`message`) bodies; otherwise the body text, shortened.
fn parse_error_body(body: &[u8]) -> (Option<String>, String) {
    let shortened = || {
        let text = String::from_utf8_lossy(body);
        let text: String = text.chars().take(200).collect();
        if text.is_empty() {
            "(empty body)".to_owned()
        } else {
            text
        }
    };
    let Ok(json) = serde_json::from_slice::<Value>(body) else {
        return (None, shortened());
    };
    let text = |value: Option<&Value>| value.and_then(Value::as_str).map(str::to_owned);
    match json.get("error") {
        Some(Value::String(code)) => {
            let description = text(json.get("error_description")).unwrap_or_else(shortened);
            (Some(code.clone()), description)
        }
        Some(nested @ Value::Object(_)) => {
            let description = text(nested.get("message")).unwrap_or_else(shortened);
            (text(nested.get("code")), description)
        }
        _ => (
            None,
            text(json.get("message").or(json.get("Message"))).unwrap_or_else(shortened),
        ),
    }
}

#[cfg(test)]
mod tests;
