//! The one error type of the token module, and how each error reaches an HTTP client.

use std::fmt;
use std::time::Duration;

use http::StatusCode;

/// Who caused an error: decides whether retrying can help and who gets told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Culprit {
    /// The client of azgate (bad request, identity not allowed).
    Downstream,
    /// The token source (IMDS, App Service, Entra) or the network to it.
    Upstream,
    /// azgate itself or its configuration.
    Internal,
}

/// Everything that can go wrong getting a token.
///
/// Each variant maps to exactly one HTTP status and IMDS-style `error` code
/// ([`TokenError::http_status`], [`TokenError::error_code`]); the token service answers with
/// those, so IMDS clients react to azgate as they would to IMDS.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenError {
    /// The caller's request is malformed: missing `Metadata: true`, an `X-Forwarded-For` header,
    /// no `api-version` or `resource`, duplicate or conflicting query parameters.
    /// → 400, the given IMDS code (`bad_request_102`, `invalid_request`, `bad_request`).
    BadRequest {
        /// IMDS error code.
        code: &'static str,
        /// Human-readable reason.
        description: String,
    },
    /// The caller used a method other than GET on the token path. → 405 `method_not_allowed`.
    MethodNotAllowed,
    /// The request names an identity that the token service's allow-list does not include.
    /// → 403 `forbidden`.
    IdentityNotAllowed(String),
    /// The configured source cannot select identities this way (e.g. an `object_id` for a
    /// workload identity, which is chosen by client id). → 400 `invalid_request`.
    UnsupportedIdentity(String),
    /// The source rejected the request with a status that retrying cannot fix (400, 401,
    /// 403, other 4xx): a design-time error such as an identity not assigned to the VM.
    /// Never retried. → the upstream status, the upstream error code.
    UpstreamRejected {
        /// Upstream HTTP status.
        status: u16,
        /// Upstream `error` code, or `invalid_request` if it gave none.
        code: String,
        /// Upstream `error_description`, or a summary of its body.
        description: String,
    },
    /// The source answered a transient status (404, 408, 410, 429, 5xx) and retries ran out
    /// or its `Retry-After` exceeded what a fetch will wait.
    /// → the upstream status, the upstream error code, `Retry-After` if it sent one.
    UpstreamUnavailable {
        /// Upstream HTTP status.
        status: u16,
        /// Upstream `error` code, or one derived from the status.
        code: String,
        /// Upstream `error_description`, or a summary of its body.
        description: String,
        /// The upstream's `Retry-After`, if any.
        retry_after: Option<Duration>,
    },
    /// The source could not be reached (connect, send or receive failed).
    /// → 503 `service_unavailable`.
    Transport(String),
    /// One attempt took longer than the per-attempt timeout. → 504 `service_unavailable`.
    UpstreamTimeout,
    /// The source answered 200 with a body that is not a token response (not JSON, no
    /// `access_token`, no usable expiry). → 502 `server_error`.
    MalformedResponse(String),
    /// The caller's deadline passed before a token arrived; the fetch goes on and fills the
    /// cache for later callers. → 504 `service_unavailable`.
    DeadlineExceeded,
    /// Every cache slot holds a fetch in flight, so no new key can be admitted.
    /// → 503 `service_unavailable`.
    CacheFull,
    /// The source's configuration is unusable (unreadable token or certificate file, bad key).
    /// → 500 `server_error`.
    Configuration(String),
}

// === impl TokenError ===

impl TokenError {
    /// The HTTP status the token service answers with.
    pub fn http_status(&self) -> StatusCode {
        let upstream =
            |status: u16| StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
        match self {
            TokenError::BadRequest { .. } | TokenError::UnsupportedIdentity(_) => {
                StatusCode::BAD_REQUEST
            }
            TokenError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            TokenError::IdentityNotAllowed(_) => StatusCode::FORBIDDEN,
            TokenError::UpstreamRejected { status, .. } => upstream(*status),
            TokenError::UpstreamUnavailable { status, .. } => upstream(*status),
            TokenError::Transport(_) | TokenError::CacheFull => StatusCode::SERVICE_UNAVAILABLE,
            TokenError::UpstreamTimeout | TokenError::DeadlineExceeded => {
                StatusCode::GATEWAY_TIMEOUT
            }
            TokenError::MalformedResponse(_) => StatusCode::BAD_GATEWAY,
            TokenError::Configuration(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The IMDS-style `error` code the token service answers with (also the metrics label).
    pub fn error_code(&self) -> &str {
        match self {
            TokenError::BadRequest { code, .. } => code,
            TokenError::MethodNotAllowed => "method_not_allowed",
            TokenError::IdentityNotAllowed(_) => "forbidden",
            TokenError::UnsupportedIdentity(_) => "invalid_request",
            TokenError::UpstreamRejected { code, .. }
            | TokenError::UpstreamUnavailable { code, .. } => code,
            TokenError::Transport(_)
            | TokenError::UpstreamTimeout
            | TokenError::DeadlineExceeded
            | TokenError::CacheFull => "service_unavailable",
            TokenError::MalformedResponse(_) | TokenError::Configuration(_) => "server_error",
        }
    }

    /// Who caused it.
    pub fn culprit(&self) -> Culprit {
        match self {
            TokenError::BadRequest { .. }
            | TokenError::MethodNotAllowed
            | TokenError::IdentityNotAllowed(_)
            | TokenError::UnsupportedIdentity(_) => Culprit::Downstream,
            TokenError::UpstreamRejected { .. }
            | TokenError::UpstreamUnavailable { .. }
            | TokenError::Transport(_)
            | TokenError::UpstreamTimeout
            | TokenError::MalformedResponse(_)
            | TokenError::DeadlineExceeded => Culprit::Upstream,
            TokenError::CacheFull | TokenError::Configuration(_) => Culprit::Internal,
        }
    }

    /// Whether another attempt at the source may succeed (Azure's guidance: 404, 408, 410,
    /// 429, 5xx and timeouts yes; 400 and other 4xx never).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            TokenError::UpstreamUnavailable { .. }
                | TokenError::Transport(_)
                | TokenError::UpstreamTimeout
                | TokenError::MalformedResponse(_)
        )
    }

    /// The upstream status, for errors that came with one.
    pub fn upstream_status(&self) -> Option<u16> {
        match self {
            TokenError::UpstreamRejected { status, .. }
            | TokenError::UpstreamUnavailable { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// How long the upstream asked callers to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            TokenError::UpstreamUnavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Classifies an upstream non-200 answer by Azure's retry guidance.
    pub(crate) fn from_upstream_status(
        status: u16,
        code: Option<String>,
        description: String,
        retry_after: Option<Duration>,
    ) -> TokenError {
        let transient = matches!(status, 404 | 408 | 410 | 429) || (500..=599).contains(&status);
        if transient {
            let code = code.unwrap_or_else(|| {
                match status {
                    404 => "not_found",
                    429 => "too_many_requests",
                    500 => "server_error",
                    _ => "service_unavailable",
                }
                .to_owned()
            });
            TokenError::UpstreamUnavailable {
                status,
                code,
                description,
                retry_after,
            }
        } else {
            let code = code.unwrap_or_else(|| "invalid_request".to_owned());
            TokenError::UpstreamRejected {
                status,
                code,
                description,
            }
        }
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::BadRequest { code, description } => {
                write!(f, "bad request ({code}): {description}")
            }
            TokenError::MethodNotAllowed => f.write_str("only GET is supported"),
            TokenError::IdentityNotAllowed(identity) => {
                write!(f, "identity {identity} is not on the allow-list")
            }
            TokenError::UnsupportedIdentity(reason) => {
                write!(f, "unsupported identity selector: {reason}")
            }
            TokenError::UpstreamRejected {
                status,
                code,
                description,
            } => {
                write!(
                    f,
                    "token source rejected the request: {status} {code}: {description}"
                )
            }
            TokenError::UpstreamUnavailable {
                status,
                code,
                description,
                ..
            } => {
                write!(
                    f,
                    "token source unavailable: {status} {code}: {description}"
                )
            }
            TokenError::Transport(reason) => write!(f, "cannot reach the token source: {reason}"),
            TokenError::UpstreamTimeout => f.write_str("the token source did not answer in time"),
            TokenError::MalformedResponse(reason) => {
                write!(f, "malformed token response: {reason}")
            }
            TokenError::DeadlineExceeded => f.write_str(
                "no token within the request deadline; the fetch continues in the background",
            ),
            TokenError::CacheFull => f.write_str("token cache is full of fetches in flight"),
            TokenError::Configuration(reason) => write!(f, "token source configuration: {reason}"),
        }
    }
}

impl std::error::Error for TokenError {}
