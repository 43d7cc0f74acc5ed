//! Every reason the filter refuses a request, with its HTTP status and stable error code.
//!
//! A refusal is always answered locally with an Azure-style JSON body
//! `{"error":{"code":"<Code>","message":"<text>"}}` and an `x-azgate-error: <Code>` header, so
//! Azure clients (az, the SDKs) print the code and message as they would for Azure's own errors.
//! Messages never contain tokens, JWTs or key material.

use std::fmt;

/// Why a request was refused. Each variant maps to exactly one status and code
/// ([`Refusal::status`], [`Refusal::code`]); the `String` carries human detail for the message.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The client certificate has expired or is not valid yet. 401 `ClientCertificateExpired`.
    ClientCertificateExpired(String),
    /// The `Authorization` header is present but not `Bearer <token>`. 400 `InvalidAuthorizationHeader`.
    InvalidAuthorizationHeader(String),
    /// A header the filter reads is not UTF-8 or carries control characters. 400 `InvalidHeader`.
    InvalidHeader(String),
    /// The XFCC header carried a certificate that could not be parsed, or one that is not a
    /// usable Teleport app certificate (no user, unsupported key). 401 `InvalidClientCertificate`.
    InvalidClientCertificate(String),
    /// `X-Forwarded-Host` names the same header more than once. 400 `InvalidForwardedHost`.
    InvalidForwardedHost(String),
    /// The request target is not origin-form (`OPTIONS *`, an authority). 400 `InvalidRequestTarget`.
    InvalidRequestTarget(String),
    /// The `resource` claim is not an acceptable token audience. 400 `InvalidResource`.
    InvalidResource(String),
    /// The JWT is malformed, badly signed, uses a refused algorithm, or lacks `resource`.
    /// 401 `InvalidToken`.
    InvalidToken(String),
    /// The token service answered with something that is not a usable token. 502 `InvalidTokenServiceResponse`.
    InvalidTokenServiceResponse(String),
    /// The selected identity is not among the certificate's allowed identities. 403 `IdentityNotInCertificate`.
    IdentityNotInCertificate(String),
    /// No role of the user allows the selected identity, or one denies it. 403 `IdentityNotAllowed`.
    IdentityNotAllowed(String),
    /// A host call failed where it cannot fail in a healthy proxy. 500 `InternalError`.
    Internal(String),
    /// `CONNECT` (a tunnel azgate cannot inspect) or `TRACE` (it would echo the injected token).
    /// 405 `MethodNotAllowed`.
    MethodNotAllowed(String),
    /// No verified client certificate reached the filter. 401 `MissingClientCertificate`.
    MissingClientCertificate(String),
    /// No `X-Forwarded-Host` header. 400 `MissingForwardedHost`.
    MissingForwardedHost(String),
    /// No `Authorization` header, and unauthenticated forwarding is off. 401 `MissingToken`.
    MissingToken(String),
    /// No `Authorization` header on a request to a data plane whose clients wait for a bearer
    /// challenge (Key Vault, Storage): 401 `Unauthorized`, as the service answers, with the
    /// service's `WWW-Authenticate` challenge. The request is not forwarded.
    BearerChallenge {
        /// The human detail.
        message: String,
        /// The `WWW-Authenticate` value.
        challenge: String,
    },
    /// The certificate is not for this gateway: its usage (OU), app name or cluster is not one
    /// the configuration accepts (`required_usage`, `allowed_apps`, `allowed_clusters`).
    /// 403 `CertificateNotForThisApp`.
    CertificateNotForThisApp(String),
    /// A Teleport lock targeting the caller's user or one of their roles is in force.
    /// 403 `Locked`.
    Locked(String),
    /// The certificate selects no Azure identity (OID 1.3.9999.1.16). 403 `NoIdentitySelected`.
    NoIdentitySelected(String),
    /// The target host is not an enabled Azure endpoint. 403 `NotAnAzureEndpoint`.
    NotAnAzureEndpoint(String),
    /// The JWT has expired (`exp`). 401 `TokenExpired`.
    TokenExpired(String),
    /// The JWT is not valid yet (`nbf`). 401 `TokenNotYetValid`.
    TokenNotYetValid(String),
    /// The bearer token is larger than the configured bound. 400 `TokenTooLarge`.
    TokenTooLarge(String),
    /// The token service call timed out. 504 `TokenServiceTimeout`.
    TokenServiceTimeout(String),
    /// The token service refused, failed or could not be reached. 503 `TokenUnavailable`.
    TokenUnavailable(String),
}

impl Refusal {
    /// The HTTP status of the local response.
    pub fn status(&self) -> u32 {
        match self {
            Self::InvalidAuthorizationHeader(_)
            | Self::InvalidForwardedHost(_)
            | Self::InvalidHeader(_)
            | Self::InvalidRequestTarget(_)
            | Self::InvalidResource(_)
            | Self::MissingForwardedHost(_)
            | Self::TokenTooLarge(_) => 400,
            Self::ClientCertificateExpired(_)
            | Self::InvalidClientCertificate(_)
            | Self::InvalidToken(_)
            | Self::MissingClientCertificate(_)
            | Self::MissingToken(_)
            | Self::BearerChallenge { .. }
            | Self::TokenExpired(_)
            | Self::TokenNotYetValid(_) => 401,
            Self::CertificateNotForThisApp(_)
            | Self::IdentityNotAllowed(_)
            | Self::IdentityNotInCertificate(_)
            | Self::Locked(_)
            | Self::NoIdentitySelected(_)
            | Self::NotAnAzureEndpoint(_) => 403,
            Self::MethodNotAllowed(_) => 405,
            Self::Internal(_) => 500,
            Self::InvalidTokenServiceResponse(_) => 502,
            Self::TokenUnavailable(_) => 503,
            Self::TokenServiceTimeout(_) => 504,
        }
    }

    /// The stable error code: the JSON `error.code` and the `x-azgate-error` header.
    pub fn code(&self) -> &'static str {
        match self {
            Self::CertificateNotForThisApp(_) => "CertificateNotForThisApp",
            Self::ClientCertificateExpired(_) => "ClientCertificateExpired",
            Self::InvalidAuthorizationHeader(_) => "InvalidAuthorizationHeader",
            Self::InvalidClientCertificate(_) => "InvalidClientCertificate",
            Self::InvalidForwardedHost(_) => "InvalidForwardedHost",
            Self::InvalidHeader(_) => "InvalidHeader",
            Self::InvalidRequestTarget(_) => "InvalidRequestTarget",
            Self::InvalidResource(_) => "InvalidResource",
            Self::InvalidToken(_) => "InvalidToken",
            Self::InvalidTokenServiceResponse(_) => "InvalidTokenServiceResponse",
            Self::IdentityNotInCertificate(_) => "IdentityNotInCertificate",
            Self::IdentityNotAllowed(_) => "IdentityNotAllowed",
            Self::Internal(_) => "InternalError",
            Self::Locked(_) => "Locked",
            Self::MethodNotAllowed(_) => "MethodNotAllowed",
            Self::MissingClientCertificate(_) => "MissingClientCertificate",
            Self::MissingForwardedHost(_) => "MissingForwardedHost",
            Self::MissingToken(_) => "MissingToken",
            Self::BearerChallenge { .. } => "Unauthorized",
            Self::NoIdentitySelected(_) => "NoIdentitySelected",
            Self::NotAnAzureEndpoint(_) => "NotAnAzureEndpoint",
            Self::TokenExpired(_) => "TokenExpired",
            Self::TokenNotYetValid(_) => "TokenNotYetValid",
            Self::TokenTooLarge(_) => "TokenTooLarge",
            Self::TokenServiceTimeout(_) => "TokenServiceTimeout",
            Self::TokenUnavailable(_) => "TokenUnavailable",
        }
    }

    /// The human-readable detail.
    pub fn message(&self) -> &str {
        match self {
            Self::CertificateNotForThisApp(m)
            | Self::ClientCertificateExpired(m)
            | Self::InvalidAuthorizationHeader(m)
            | Self::InvalidClientCertificate(m)
            | Self::InvalidForwardedHost(m)
            | Self::InvalidHeader(m)
            | Self::InvalidRequestTarget(m)
            | Self::InvalidResource(m)
            | Self::InvalidToken(m)
            | Self::InvalidTokenServiceResponse(m)
            | Self::IdentityNotInCertificate(m)
            | Self::IdentityNotAllowed(m)
            | Self::Internal(m)
            | Self::Locked(m)
            | Self::MethodNotAllowed(m)
            | Self::MissingClientCertificate(m)
            | Self::MissingForwardedHost(m)
            | Self::MissingToken(m)
            | Self::NoIdentitySelected(m)
            | Self::NotAnAzureEndpoint(m)
            | Self::TokenExpired(m)
            | Self::TokenNotYetValid(m)
            | Self::TokenTooLarge(m)
            | Self::TokenServiceTimeout(m)
            | Self::TokenUnavailable(m)
            | Self::BearerChallenge { message: m, .. } => m,
        }
    }

    /// The `WWW-Authenticate` value the local response carries, if any.
    pub fn challenge(&self) -> Option<&str> {
        match self {
            Self::BearerChallenge { challenge, .. } => Some(challenge),
            _ => None,
        }
    }

    /// The Azure-style JSON body of the local response.
    pub fn body(&self) -> String {
        azure_error_body(self.code(), self.message())
    }
}

/// The body of every error azgate answers itself, in the filter and in the host alike:
/// Azure's `{"error": {"code", "message"}}`, the message prefixed `azgate: ` so a user can tell
/// azgate's answers from Azure's.
pub fn azure_error_body(code: &str, message: &str) -> String {
    serde_json::json!({"error": {"code": code, "message": format!("azgate: {message}")}})
        .to_string()
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code(), self.message())
    }
}

impl std::error::Error for Refusal {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_azure_style_json_with_code_and_message() {
        let refusal = Refusal::NotAnAzureEndpoint("example.com is not an Azure endpoint".into());
        let body: serde_json::Value = serde_json::from_str(&refusal.body()).unwrap();
        assert_eq!(body["error"]["code"], "NotAnAzureEndpoint");
        assert_eq!(
            body["error"]["message"],
            "azgate: example.com is not an Azure endpoint"
        );
        assert_eq!(refusal.status(), 403);
    }

    #[test]
    fn token_service_failures_have_gateway_statuses() {
        assert_eq!(Refusal::TokenUnavailable(String::new()).status(), 503);
        assert_eq!(Refusal::TokenServiceTimeout(String::new()).status(), 504);
        assert_eq!(
            Refusal::InvalidTokenServiceResponse(String::new()).status(),
            502
        );
    }
}
