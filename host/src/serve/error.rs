//! Errors of `azgate serve`: start-up failures and the answers a request gets when the gateway
//! (not the filter) cannot serve it.

use std::fmt;

/// What went wrong in the gateway.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServeError {
    /// `azgate.yaml` or a file it names is unusable. Start-up only.
    Config(String),
    /// The filter could not be loaded or started. Start-up: exit; at run time: 503.
    Filter(azgate_wasmhost::HostError),
    /// A socket could not be bound or served. Start-up only.
    Io(std::io::Error),
    /// The request body is larger than `upstream.max_request_body_bytes`. 413 `RequestTooLarge`.
    RequestTooLarge,
    /// The request's framing is unusable: a malformed or incomplete body, or conflicting
    /// `Content-Length`/`Transfer-Encoding`. 400 `BadRequest`.
    BadRequest(String),
    /// `CONNECT` (a tunnel) or `TRACE` (it echoes the request, injected token included), never
    /// forwarded whatever the filter decided. 405 `MethodNotAllowed`, as the filter answers.
    MethodNotAllowed(String),
    /// The request target is not a path (`*`, absolute-form, authority-form). 400
    /// `InvalidRequestTarget`, as the filter answers.
    InvalidRequestTarget,
    /// The header block is over [`MAX_REQUEST_HEADERS_BYTES`] or [`MAX_REQUEST_HEADERS`] fields.
    /// 431 `RequestHeaderFieldsTooLarge`.
    ///
    /// [`MAX_REQUEST_HEADERS_BYTES`]: crate::config::MAX_REQUEST_HEADERS_BYTES
    /// [`MAX_REQUEST_HEADERS`]: super::MAX_REQUEST_HEADERS
    RequestHeaderFieldsTooLarge,
    /// The whole request did not arrive within `listeners[].request_timeout_ms` (or its
    /// header block within `request_headers_timeout_ms`). 408 `RequestTimeout`.
    RequestTimeout,
    /// The filter left the request without a usable `:authority` or `:path`. 500 `InvalidUpstreamRequest`.
    InvalidUpstreamRequest(String),
    /// The filter closed the stream. 503 `StreamClosed`.
    StreamClosed,
    /// No response headers from Azure in time. 504 `UpstreamTimeout`.
    UpstreamTimeout,
    /// Azure could not be reached or reset the stream. 503 `UpstreamUnavailable`.
    UpstreamUnavailable(String),
}

impl ServeError {
    /// HTTP status of the answer.
    pub fn status(&self) -> u16 {
        match self {
            Self::RequestTooLarge => 413,
            Self::BadRequest(_) | Self::InvalidRequestTarget => 400,
            Self::MethodNotAllowed(_) => 405,
            Self::RequestTimeout => 408,
            Self::RequestHeaderFieldsTooLarge => 431,
            Self::InvalidUpstreamRequest(_) | Self::Config(_) | Self::Io(_) => 500,
            Self::Filter(e) => e.status(),
            Self::StreamClosed | Self::UpstreamUnavailable(_) => 503,
            Self::UpstreamTimeout => 504,
        }
    }

    /// Azure-style error code of the answer (also the `x-azgate-error` header).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Config(_) | Self::Io(_) => "InternalError",
            Self::Filter(e) => e.code(),
            Self::RequestTooLarge => "RequestTooLarge",
            Self::BadRequest(_) => "BadRequest",
            Self::MethodNotAllowed(_) => "MethodNotAllowed",
            Self::InvalidRequestTarget => "InvalidRequestTarget",
            Self::RequestHeaderFieldsTooLarge => "RequestHeaderFieldsTooLarge",
            Self::RequestTimeout => "RequestTimeout",
            Self::InvalidUpstreamRequest(_) => "InvalidUpstreamRequest",
            Self::StreamClosed => "StreamClosed",
            Self::UpstreamTimeout => "UpstreamTimeout",
            Self::UpstreamUnavailable(_) => "UpstreamUnavailable",
        }
    }

    /// Whether Azure (not the client or the filter) is at fault.
    pub fn is_upstream(&self) -> bool {
        matches!(self, Self::UpstreamTimeout | Self::UpstreamUnavailable(_))
    }

    /// The Azure-style JSON body.
    pub fn body(&self) -> String {
        let message = match self {
            // The detail of a trap or a config problem goes to the log, not to the client.
            Self::Filter(_) => {
                "the request filter failed; the request was not forwarded".to_string()
            }
            other => other.to_string(),
        };
        azgate_filter::error::azure_error_body(self.code(), &message)
    }
}

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(e) => write!(f, "configuration: {e}"),
            Self::Filter(e) => write!(f, "{e}"),
            Self::Io(e) => write!(f, "{e}"),
            Self::RequestTooLarge => write!(f, "the request body is too large"),
            Self::BadRequest(e) => write!(f, "the request is malformed ({e})"),
            Self::MethodNotAllowed(method) => write!(f, "method {method} is not allowed"),
            Self::InvalidRequestTarget => {
                write!(f, "the request target must be a path starting with /")
            }
            Self::RequestHeaderFieldsTooLarge => write!(
                f,
                "the request header block is too large (at most {} bytes and {} fields)",
                crate::config::MAX_REQUEST_HEADERS_BYTES,
                crate::config::MAX_REQUEST_HEADERS - 1
            ),
            Self::RequestTimeout => write!(f, "the request was not received in time"),
            Self::InvalidUpstreamRequest(e) => write!(f, "cannot forward the request: {e}"),
            Self::StreamClosed => write!(f, "the request filter closed the stream"),
            Self::UpstreamTimeout => write!(f, "Azure did not answer in time"),
            Self::UpstreamUnavailable(e) => write!(f, "Azure could not be reached: {e}"),
        }
    }
}

impl std::error::Error for ServeError {}

impl From<std::io::Error> for ServeError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}
