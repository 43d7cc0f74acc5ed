//! `azgate token-service`: the token provider behind the IMDS protocol, for Envoy's
//! `azgate_msi` cluster and any IMDS client (`AZURE_POD_IDENTITY_AUTHORITY_HOST=http://ADDR`).
//!
//! - `GET /metadata/identity/oauth2/token?api-version=…&resource=…[&client_id|object_id|msi_res_id=…]`
//!   with `Metadata: true`: an IMDS-shaped answer, every number a JSON string, `expires_in`
//!   being the validity left now. Errors are IMDS-shaped (`{"error","error_description"}`)
//!   with the status from [`TokenError::http_status`] and `Retry-After` when the source sent one.
//! - `GET /msi/token?api-version=2019-08-01&resource=…[&client_id|principal_id|object_id|mi_res_id=…]`
//!   with `X-IDENTITY-HEADER` (when configured, [`TokenService::with_app_service_header`]): the
//!   App Service protocol, `expires_on` an integer; errors `{"statusCode","message","correlationId"}`.
//! - Both take `token_sha256_to_refresh` (CAE): the cached token with that SHA-256 is replaced.
//!   The allow-list, limits and cache are the same for both.
//! - `GET /metrics`: Prometheus text. `GET /healthz`: `ok`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use serde_json::json;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use sha2::{Digest, Sha256};

use super::cae::TokenSha256;
use super::error::TokenError;
use super::provider::{AccessToken, TokenProvider};
use super::source::{ManagedIdentity, Secret, Source};
use azgate_msi::request::{self as imds_rules, Query};
use azgate_msi::server::{self as http_server, json_response};

use azgate_msi::protocol::APP_SERVICE_API_VERSION;
pub use azgate_msi::protocol::{APP_SERVICE_TOKEN_PATH, IMDS_TOKEN_PATH as TOKEN_PATH};
/// The header an App Service caller proves itself with.
const APP_SERVICE_HEADER: &str = "x-identity-header";
/// Longest `resource` or identity selector accepted (ARM ids are a few hundred bytes).
const MAX_PARAMETER_BYTES: usize = 4096;

/// Serves a [`TokenProvider`] over the IMDS protocol.
#[derive(Clone, Debug)]
pub struct TokenService {
    provider: TokenProvider,
    /// `None` serves every identity; otherwise only these.
    allowed: Option<Arc<BTreeSet<ManagedIdentity>>>,
    /// The `X-IDENTITY-HEADER` App Service callers must send; `None` turns that protocol off.
    app_service_header: Option<Secret>,
    /// ARM resource id (lower case) → client id, for sources that select identities by
    /// client id only (workload identity): the filter names identities by resource id.
    client_ids: Arc<BTreeMap<String, String>>,
}

/// A running [`TokenService`]; stops when dropped or on [`RunningTokenService::shutdown`].
#[derive(Debug)]
pub struct RunningTokenService {
    address: ListenAddress,
    stop: watch::Sender<bool>,
}

/// Where a token service listens: a TCP address, or `unix:/path` for a unix socket (which the
/// file system's permissions guard: only the socket's owner and group may connect).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddress {
    /// A TCP address (loopback recommended).
    Tcp(SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(address) => write!(f, "{address}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl std::str::FromStr for ListenAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.strip_prefix("unix:") {
            Some(path) if path.starts_with('/') => Ok(Self::Unix(PathBuf::from(path))),
            Some(_) => Err(format!(
                "{text}: a unix socket needs an absolute path (unix:/run/…)"
            )),
            None => text
                .parse()
                .map(Self::Tcp)
                .map_err(|_| format!("{text}: expected HOST:PORT or unix:/path")),
        }
    }
}

// === impl TokenService ===

impl TokenService {
    /// Serves every identity the source can give.
    pub fn new(provider: TokenProvider) -> TokenService {
        TokenService {
            provider,
            allowed: None,
            app_service_header: None,
            client_ids: Arc::default(),
        }
    }

    /// Serves only `identities` (`ManagedIdentity::SystemAssigned` stands for requests without a
    /// selector); others get 403 `forbidden`.
    pub fn with_allowed_identities(
        mut self,
        identities: impl IntoIterator<Item = ManagedIdentity>,
    ) -> TokenService {
        self.allowed = Some(Arc::new(identities.into_iter().collect()));
        self
    }

    /// Binds `addr` and serves on the current tokio runtime.
    pub async fn start(self, addr: SocketAddr) -> std::io::Result<RunningTokenService> {
        self.start_on(&ListenAddress::Tcp(addr)).await
    }

    /// Binds `address` (TCP, or a unix socket created with mode 0660, replacing a stale socket
    /// file but nothing else) and serves on the current tokio runtime.
    pub async fn start_on(self, address: &ListenAddress) -> std::io::Result<RunningTokenService> {
        let (stop, stopped) = watch::channel(false);
        let address = match address {
            ListenAddress::Tcp(addr) => {
                let listener = TcpListener::bind(addr).await?;
                let bound = ListenAddress::Tcp(listener.local_addr()?);
                tokio::spawn(http_server::serve(listener, Arc::new(self), stopped));
                bound
            }
            ListenAddress::Unix(path) => {
                use std::os::unix::fs::{FileTypeExt, PermissionsExt};
                if let Ok(metadata) = std::fs::symlink_metadata(path) {
                    if !metadata.file_type().is_socket() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::AlreadyExists,
                            format!("{} exists and is not a socket", path.display()),
                        ));
                    }
                    std::fs::remove_file(path)?;
                }
                let listener = UnixListener::bind(path)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
                tokio::spawn(http_server::serve(listener, Arc::new(self), stopped));
                ListenAddress::Unix(path.clone())
            }
        };
        Ok(RunningTokenService { address, stop })
    }

    /// Also serves the App Service protocol (`GET /msi/token`, api-version 2019-08-01) to
    /// callers that send `X-IDENTITY-HEADER: <header>` (compared in constant time). Without
    /// it that path answers 404 saying how to turn it on.
    pub fn with_app_service_header(mut self, header: Secret) -> TokenService {
        self.app_service_header = Some(header);
        self
    }

    /// Asks the source for `msi_res_id=<ARM id>` as `client_id=<client id>` (ARM ids compared
    /// ignoring case): workload identity picks an identity by client id, while the filter and
    /// `az login --identity --resource-id` name it by resource id. The allow-list applies to
    /// the identity as requested.
    pub fn with_client_ids(
        mut self,
        client_ids: impl IntoIterator<Item = (String, String)>,
    ) -> TokenService {
        self.client_ids = Arc::new(
            client_ids
                .into_iter()
                .map(|(resource_id, client_id)| (resource_id.to_ascii_lowercase(), client_id))
                .collect(),
        );
        self
    }

    /// Answers one request (also usable without a socket).
    pub async fn handle(&self, request: Request<Bytes>) -> Response<Bytes> {
        // One trailing slash is the same path, as IMDS has it: msal-node (JavaScript's
        // @azure/identity) asks for `/metadata/identity/oauth2/token/`.
        let path = request.uri().path();
        let token_path = path
            .strip_suffix('/')
            .filter(|p| !p.is_empty())
            .unwrap_or(path);
        match (request.method(), token_path) {
            (_, path) if path.eq_ignore_ascii_case(TOKEN_PATH) => {
                match self.imds_token(&request).await {
                    Ok(response) => response,
                    Err(error) => error_response(&error),
                }
            }
            (_, path) if path.eq_ignore_ascii_case(APP_SERVICE_TOKEN_PATH) => {
                self.app_service_token(&request).await
            }
            (&Method::GET, _) if path == "/metrics" => {
                let mut response =
                    Response::new(Bytes::from(self.provider.metrics().to_prometheus()));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                response
            }
            (&Method::GET, _) if path == "/healthz" => Response::new(Bytes::from_static(b"ok\n")),
            _ => json_response(
                StatusCode::NOT_FOUND,
                json!({"error": "not_found", "error_description": "unknown path"}).to_string(),
            ),
        }
    }

    /// The allow-list, then the provider: the one path both protocols take.
    async fn token(&self, request: &TokenRequest) -> Result<AccessToken, TokenError> {
        if let Some(allowed) = &self.allowed
            && !allowed.contains(&request.identity)
        {
            return Err(TokenError::IdentityNotAllowed(request.identity.to_string()));
        }
        let identity = match &request.identity {
            ManagedIdentity::ResourceId(id) => self
                .client_ids
                .get(&id.to_ascii_lowercase())
                .map(|client_id| ManagedIdentity::ClientId(client_id.clone())),
            _ => None,
        };
        let identity = identity.as_ref().unwrap_or(&request.identity);
        self.provider
            .token_refreshing(identity, &request.resource, request.rejected)
            .await
    }

    async fn imds_token(&self, request: &Request<Bytes>) -> Result<Response<Bytes>, TokenError> {
        let query = imds_rules::check(request).map_err(|refusal| match refusal.status {
            StatusCode::METHOD_NOT_ALLOWED => TokenError::MethodNotAllowed,
            _ => TokenError::BadRequest {
                code: refusal.code,
                description: refusal.description,
            },
        })?;
        if !query.first("api-version").is_some_and(is_api_version) {
            return Err(bad_request(
                "bad_request",
                "api-version is invalid or was not specified in the request",
            ));
        }
        let parsed = TokenRequest::parse(&query, Protocol::Imds)?;
        let token = self.token(&parsed).await?;
        let expires_in = token.expires_in().to_string();
        // `expires_in` is the validity left now (clients such as MSAL compute expiry from it),
        // and the source's `not_before` is not kept, so "now" stands in for it: the token is
        // certainly valid from then on.
        let now = token.expires_on().saturating_sub(token.expires_in());
        let mut body = json!({
            "access_token": token.secret(),
            "refresh_token": "",
            "expires_in": expires_in,
            "expires_on": token.expires_on().to_string(),
            "ext_expires_in": expires_in,
            "not_before": now.to_string(),
            "resource": parsed.resource,
            "token_type": "Bearer",
        });
        if let Some(object) = body.as_object_mut() {
            match &parsed.identity {
                ManagedIdentity::SystemAssigned => {}
                ManagedIdentity::ClientId(id) => {
                    drop(object.insert("client_id".into(), id.clone().into()))
                }
                ManagedIdentity::ObjectId(id) => {
                    drop(object.insert("object_id".into(), id.clone().into()))
                }
                ManagedIdentity::ResourceId(id) => {
                    drop(object.insert("msi_res_id".into(), id.clone().into()))
                }
            }
        }
        Ok(json_response(StatusCode::OK, body.to_string()))
    }

    /// `GET /msi/token?api-version=2019-08-01&resource=…` with `X-IDENTITY-HEADER`: answers
    /// `{"access_token","expires_on":<integer>,"resource","token_type","client_id"}`; errors
    /// are App Service's `{"statusCode","message","correlationId"}`.
    async fn app_service_token(&self, request: &Request<Bytes>) -> Response<Bytes> {
        let Some(expected) = &self.app_service_header else {
            return app_service_error(
                StatusCode::NOT_FOUND,
                "the App Service protocol is off: start azgate token-service with \
                 --app-service-header-file PATH (or AZGATE_IDENTITY_HEADER set) to serve it",
                None,
            );
        };
        if request.method() != Method::GET {
            return app_service_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET is supported",
                None,
            );
        }
        // Any bytes at all are compared (a non-UTF-8 header is simply wrong), and only one
        // header: a repeated one is refused rather than picking either.
        let mut presented = request.headers().get_all(APP_SERVICE_HEADER).iter();
        let authorized = match (presented.next(), presented.next()) {
            (Some(value), None) => secrets_equal(value.as_bytes(), expected.expose().as_bytes()),
            _ => false,
        };
        if !authorized {
            return app_service_error(
                StatusCode::UNAUTHORIZED,
                "X-IDENTITY-HEADER is missing or invalid",
                None,
            );
        }
        let result = async {
            let query = Query::parse(request.uri().query()).map_err(|name| {
                bad_request("bad_request", &format!("Duplicate query parameter {name}"))
            })?;
            if query.first("api-version") != Some(APP_SERVICE_API_VERSION) {
                return Err(bad_request(
                    "bad_request",
                    &format!("api-version must be {APP_SERVICE_API_VERSION}"),
                ));
            }
            let parsed = TokenRequest::parse(&query, Protocol::AppService)?;
            let token = self.token(&parsed).await?;
            Ok::<_, TokenError>((parsed, token))
        }
        .await;
        let (parsed, token) = match result {
            Ok(done) => done,
            Err(error) => {
                return app_service_error(
                    error.http_status(),
                    &error.to_string(),
                    error.retry_after(),
                );
            }
        };
        let mut body = json!({
            "access_token": token.secret(),
            "expires_on": token.expires_on(),
            "resource": parsed.resource,
            "token_type": "Bearer",
        });
        let client_id = match (&parsed.identity, self.provider.source()) {
            (ManagedIdentity::ClientId(id), _) => Some(id.as_str()),
            (
                ManagedIdentity::SystemAssigned,
                Source::WorkloadIdentity { client_id, .. }
                | Source::ClientSecret { client_id, .. }
                | Source::ClientCertificate { client_id, .. },
            ) => Some(client_id.as_str()),
            _ => None,
        };
        if let (Some(object), Some(client_id)) = (body.as_object_mut(), client_id) {
            object.insert("client_id".into(), client_id.into());
        }
        json_response(StatusCode::OK, body.to_string())
    }
}

impl http_server::Handler for TokenService {
    async fn handle(&self, request: Request<Bytes>) -> Response<Bytes> {
        TokenService::handle(self, request).await
    }
}

// === impl RunningTokenService ===

impl RunningTokenService {
    /// The address it listens on (the port chosen when asked for port 0).
    pub fn local_addr(&self) -> &ListenAddress {
        &self.address
    }

    /// Stops accepting and closes open connections.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }
}

/// Which protocol a token request came in on: they name the same selectors differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Imds,
    AppService,
}

#[derive(Clone, Copy)]
enum Selector {
    Client,
    Object,
    Resource,
}

impl Protocol {
    /// The identity-selector parameters (aliases of one kind count as separate selectors, so
    /// giving two of them is refused like any two selectors).
    fn selectors(self) -> &'static [(&'static str, Selector)] {
        match self {
            Protocol::Imds => &[
                ("client_id", Selector::Client),
                ("object_id", Selector::Object),
                ("msi_res_id", Selector::Resource),
                ("mi_res_id", Selector::Resource),
            ],
            // MSAL Python sends object_id, Go principal_id; App Service documents mi_res_id.
            Protocol::AppService => &[
                ("client_id", Selector::Client),
                ("object_id", Selector::Object),
                ("principal_id", Selector::Object),
                ("mi_res_id", Selector::Resource),
                ("msi_res_id", Selector::Resource),
            ],
        }
    }
}

/// What a token request asks for, whichever protocol it came in on.
#[derive(Debug)]
struct TokenRequest {
    identity: ManagedIdentity,
    resource: String,
    /// `token_sha256_to_refresh`: the hash of a token a resource rejected (CAE).
    rejected: Option<TokenSha256>,
}

impl TokenRequest {
    /// `resource`, at most one identity selector and `token_sha256_to_refresh`; other
    /// parameters (`api-version`, `xms_cc`, …) are the caller's business.
    fn parse(query: &Query, protocol: Protocol) -> Result<TokenRequest, TokenError> {
        let resource = query
            .first("resource")
            .filter(|resource| !resource.is_empty())
            .ok_or_else(|| {
                bad_request(
                    "invalid_request",
                    "Required query variable 'resource' is missing",
                )
            })?;
        let mut selected = Vec::new();
        for (name, selector) in protocol.selectors() {
            let Some(id) = query.first(name) else {
                continue;
            };
            if id.is_empty() || id.len() > MAX_PARAMETER_BYTES {
                return Err(bad_request(
                    "invalid_request",
                    &format!("{name} must be 1 to {MAX_PARAMETER_BYTES} bytes"),
                ));
            }
            let id = id.to_owned();
            selected.push((
                *name,
                match selector {
                    Selector::Client => ManagedIdentity::ClientId(id),
                    Selector::Object => ManagedIdentity::ObjectId(id),
                    Selector::Resource => ManagedIdentity::ResourceId(id),
                },
            ));
        }
        let identity = match selected.as_slice() {
            [] => ManagedIdentity::SystemAssigned,
            [(_, one)] => one.clone(),
            _ => {
                let names: Vec<&str> = protocol.selectors().iter().map(|(n, _)| *n).collect();
                return Err(bad_request(
                    "invalid_request",
                    &format!("Only one of {} may be specified", names.join(", ")),
                ));
            }
        };
        if resource.len() > MAX_PARAMETER_BYTES {
            return Err(bad_request(
                "invalid_request",
                &format!("resource must be at most {MAX_PARAMETER_BYTES} bytes"),
            ));
        }
        let rejected = query
            .first(TokenSha256::PARAMETER)
            .map(|hash| {
                hash.parse::<TokenSha256>()
                    .map_err(|message| bad_request("invalid_request", &message))
            })
            .transpose()?;
        Ok(TokenRequest {
            identity,
            resource: resource.to_owned(),
            rejected,
        })
    }
}

/// IMDS's shape of `api-version`: it starts with `YYYY-MM-DD`.
fn is_api_version(version: &str) -> bool {
    let bytes = version.as_bytes();
    bytes.len() >= 10
        && bytes[..10].iter().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                *b == b'-'
            } else {
                b.is_ascii_digit()
            }
        })
}

fn bad_request(code: &'static str, description: &str) -> TokenError {
    TokenError::BadRequest {
        code,
        description: description.to_owned(),
    }
}

/// Equal secrets, in time that depends on neither's content nor length: both are hashed
/// first, and the digests compared without an early exit.
fn secrets_equal(presented: &[u8], expected: &[u8]) -> bool {
    let (a, b) = (Sha256::digest(presented), Sha256::digest(expected));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// App Service's error shape, with a fresh correlation id (and `Retry-After` when the source
/// sent one).
fn app_service_error(
    status: StatusCode,
    message: &str,
    retry_after: Option<std::time::Duration>,
) -> Response<Bytes> {
    let body = json!({
        "statusCode": status.as_u16(),
        "message": message,
        "correlationId": correlation_id(),
    });
    let mut response = json_response(status, body.to_string());
    if let Some(retry_after) = retry_after {
        response.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from(retry_after.as_secs().max(1)),
        );
    }
    response
}

/// A random UUID-shaped id (version 4 layout) for App Service error bodies.
fn correlation_id() -> String {
    let (high, low) = (fastrand::u64(..), fastrand::u64(..));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        high >> 32,
        (high >> 16) & 0xffff,
        high & 0x0fff,
        ((low >> 48) & 0x3fff) | 0x8000,
        low & 0xffff_ffff_ffff
    )
}

fn error_response(error: &TokenError) -> Response<Bytes> {
    let body = json!({"error": error.error_code(), "error_description": error.to_string()});
    let mut response = json_response(error.http_status(), body.to_string());
    if let Some(retry_after) = error.retry_after() {
        response.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from(retry_after.as_secs().max(1)),
        );
    }
    response
}

#[cfg(test)]
mod tests;
