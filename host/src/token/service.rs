//! `azgate token-service`: the token provider behind the IMDS protocol, for Envoy's
//! `azgate_msi` cluster and any IMDS client (`AZURE_POD_IDENTITY_AUTHORITY_HOST=http://ADDR`).
//!
//! - `GET /metadata/identity/oauth2/token?api-version=…&resource=…[&client_id|object_id|msi_res_id=…]`
//!   with `Metadata: true`: an IMDS-shaped answer, every number a JSON string, `expires_in`
//!   being the validity left now. Errors are IMDS-shaped (`{"error","error_description"}`)
//!   with the status from [`TokenError::http_status`] and `Retry-After` when the source sent one.
//! - `GET /metrics`: Prometheus text. `GET /healthz`: `ok`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use serde_json::json;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use super::error::TokenError;
use super::provider::TokenProvider;
use super::source::ManagedIdentity;
use crate::http_server::{self, json_response};
use crate::imds_rules;

/// The IMDS token path.
pub const TOKEN_PATH: &str = "/metadata/identity/oauth2/token";

/// Serves a [`TokenProvider`] over the IMDS protocol.
#[derive(Clone, Debug)]
pub struct TokenService {
    provider: TokenProvider,
    /// `None` serves every identity; otherwise only these.
    allowed: Option<Arc<BTreeSet<ManagedIdentity>>>,
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

    /// Answers one request (also usable without a socket).
    pub async fn handle(&self, request: Request<Bytes>) -> Response<Bytes> {
        match (request.method(), request.uri().path()) {
            (_, path) if path.eq_ignore_ascii_case(TOKEN_PATH) => {
                match self.token(&request).await {
                    Ok(response) => response,
                    Err(error) => error_response(&error),
                }
            }
            (&Method::GET, "/metrics") => {
                let mut response =
                    Response::new(Bytes::from(self.provider.metrics().to_prometheus()));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                response
            }
            (&Method::GET, "/healthz") => Response::new(Bytes::from_static(b"ok\n")),
            _ => json_response(
                StatusCode::NOT_FOUND,
                json!({"error": "not_found", "error_description": "unknown path"}).to_string(),
            ),
        }
    }

    async fn token(&self, request: &Request<Bytes>) -> Result<Response<Bytes>, TokenError> {
        let (identity, resource) = parse_token_request(request)?;
        if let Some(allowed) = &self.allowed
            && !allowed.contains(&identity)
        {
            return Err(TokenError::IdentityNotAllowed(identity.to_string()));
        }
        let token = self.provider.token(&identity, &resource).await?;
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
            "resource": resource,
            "token_type": "Bearer",
        });
        if let Some(object) = body.as_object_mut() {
            match &identity {
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

/// Applies IMDS's request rules and extracts (identity, resource).
fn parse_token_request(request: &Request<Bytes>) -> Result<(ManagedIdentity, String), TokenError> {
    let bad = |code: &'static str, description: &str| TokenError::BadRequest {
        code,
        description: description.to_owned(),
    };
    let query = imds_rules::check(request).map_err(|refusal| match refusal.status {
        StatusCode::METHOD_NOT_ALLOWED => TokenError::MethodNotAllowed,
        _ => TokenError::BadRequest {
            code: refusal.code,
            description: refusal.description,
        },
    })?;
    let param = |name: &str| query.first(name);
    let api_version_ok = param("api-version").is_some_and(|version| {
        let bytes = version.as_bytes();
        bytes.len() >= 10
            && bytes[..10].iter().enumerate().all(|(i, b)| {
                if i == 4 || i == 7 {
                    *b == b'-'
                } else {
                    b.is_ascii_digit()
                }
            })
    });
    if !api_version_ok {
        return Err(bad(
            "bad_request",
            "api-version is invalid or was not specified in the request",
        ));
    }
    let resource = param("resource")
        .filter(|resource| !resource.is_empty())
        .ok_or_else(|| {
            bad(
                "invalid_request",
                "Required query variable 'resource' is missing",
            )
        })?;
    let selectors: Vec<ManagedIdentity> = [
        param("client_id").map(|id| ManagedIdentity::ClientId(id.to_owned())),
        param("object_id").map(|id| ManagedIdentity::ObjectId(id.to_owned())),
        param("msi_res_id")
            .or(param("mi_res_id"))
            .map(|id| ManagedIdentity::ResourceId(id.to_owned())),
    ]
    .into_iter()
    .flatten()
    .collect();
    let identity = match selectors.as_slice() {
        [] => ManagedIdentity::SystemAssigned,
        [one] => one.clone(),
        _ => {
            return Err(bad(
                "invalid_request",
                "Only one of client_id, object_id and msi_res_id may be specified",
            ));
        }
    };
    Ok((identity, resource.to_owned()))
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
