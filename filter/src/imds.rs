//! The IMDS protocol as the filter speaks it to the token cluster: the request it sends and how
//! it reads the answer.
//!
//! IMDS writes every number as a JSON string; other MSI endpoints write numbers. Both are read.
//! `expires_on` (absolute) is preferred over `expires_in` (relative, and ambiguous because IMDS
//! serves tokens from its own cache).

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;

use crate::error::Refusal;

/// The IMDS token path.
pub const TOKEN_PATH: &str = "/metadata/identity/oauth2/token";
/// The API version every Azure SDK sends.
pub const API_VERSION: &str = "2018-02-01";

/// Characters left as-is in query values (RFC 3986 unreserved).
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The `:path` of the token request for (identity, resource); `refresh` is the SHA-256 (hex) of
/// a token Azure refused with a claims challenge, which the token service must not serve again.
pub fn token_request_path(identity: &str, resource: &str, refresh: Option<&str>) -> String {
    let mut path = format!(
        "{TOKEN_PATH}?api-version={API_VERSION}&resource={}&msi_res_id={}",
        utf8_percent_encode(resource, QUERY_VALUE),
        utf8_percent_encode(identity, QUERY_VALUE)
    );
    if let Some(hash) = refresh {
        path.push_str("&token_sha256_to_refresh=");
        path.extend(utf8_percent_encode(hash, QUERY_VALUE));
    }
    path
}

/// Does a `WWW-Authenticate` value from Azure carry a claims challenge (continuous access
/// evaluation: the token was revoked or lacks claims)?
pub fn is_claims_challenge(www_authenticate: &[u8]) -> bool {
    let text = String::from_utf8_lossy(www_authenticate).to_ascii_lowercase();
    text.contains("insufficient_claims") || text.contains("claims=")
}

/// A managed-identity access token. Its `Debug` never prints the token.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken {
    /// The bearer token.
    pub secret: String,
    /// Expiry, Unix seconds.
    pub expires_on: i64,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("secret", &"...")
            .field("expires_on", &self.expires_on)
            .finish()
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: Option<serde_json::Value>,
}

/// Why a 200 answer of a token endpoint is not a usable token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenBodyError {
    /// Not a JSON object.
    NotJson,
    /// `access_token` missing, empty, or not printable ASCII (it goes into a header).
    NoAccessToken,
    /// `expires_on` present but neither a non-negative number, a numeric string nor an App
    /// Service date.
    BadExpiresOn,
    /// `expires_in` present (and `expires_on` absent) but not a non-negative number.
    BadExpiresIn,
    /// Neither `expires_on` nor `expires_in`.
    NoExpiry,
}

impl std::fmt::Display for TokenBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NotJson => "the answer is not a JSON object",
            Self::NoAccessToken => "the answer has no usable access_token",
            Self::BadExpiresOn => "the answer has an unreadable expires_on",
            Self::BadExpiresIn => "the answer has an unreadable expires_in",
            Self::NoExpiry => "the answer has neither expires_on nor expires_in",
        })
    }
}

/// Reads the body of a token endpoint's 200 answer, received at `now` (Unix seconds), by the one
/// rule set every reader in azgate uses: the filter reading its call-out, the token service
/// reading IMDS, App Service, Entra or another source.
///
/// `expires_on` (absolute: a JSON number, a numeric string, or App Service's legacy US date)
/// wins over `expires_in` (relative to `now`; IMDS's own cache makes it ambiguous). Numbers
/// must be non-negative; fractions are truncated.
pub fn parse_token_body(body: &[u8], now: i64) -> Result<AccessToken, TokenBodyError> {
    let body: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(|_| TokenBodyError::NotJson)?;
    let secret = body
        .get("access_token")
        .and_then(serde_json::Value::as_str)
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or(TokenBodyError::NoAccessToken)?
        .to_string();
    let present = |name: &str| {
        body.get(name)
            .filter(|v| !v.is_null() && v.as_str() != Some(""))
    };
    let expires_on = if let Some(on) = present("expires_on") {
        seconds(on)
            .or_else(|| on.as_str().and_then(crate::us_date::parse_us_date))
            .ok_or(TokenBodyError::BadExpiresOn)?
    } else if let Some(within) = present("expires_in") {
        now.saturating_add(seconds(within).ok_or(TokenBodyError::BadExpiresIn)?)
    } else {
        return Err(TokenBodyError::NoExpiry);
    };
    Ok(AccessToken { secret, expires_on })
}

/// Reads a token-service answer with HTTP `status` and `body`, received at `now`.
pub fn parse_token_response(status: u16, body: &[u8], now: i64) -> Result<AccessToken, Refusal> {
    if status != 200 {
        return Err(token_service_error(status, body));
    }
    let token = parse_token_body(body, now).map_err(|error| {
        Refusal::InvalidTokenServiceResponse(match error {
            TokenBodyError::NotJson => "the token service answered with malformed JSON".into(),
            TokenBodyError::NoAccessToken => {
                "the token service answer has no usable access_token".into()
            }
            TokenBodyError::BadExpiresOn
            | TokenBodyError::BadExpiresIn
            | TokenBodyError::NoExpiry => {
                "the token service answer has no usable expires_on or expires_in".into()
            }
        })
    })?;
    if token.expires_on <= now {
        return Err(Refusal::InvalidTokenServiceResponse(
            "the token service returned an expired token".into(),
        ));
    }
    Ok(token)
}

/// A non-negative whole number of seconds, given as a JSON number or a numeric string.
fn seconds(value: &serde_json::Value) -> Option<i64> {
    let float = |f: f64| (f.is_finite() && f >= 0.0).then_some(f as i64);
    match value {
        serde_json::Value::Number(n) => n
            .as_i64()
            .filter(|s| *s >= 0)
            .or_else(|| n.as_f64().and_then(float)),
        serde_json::Value::String(s) => {
            let s = s.trim();
            s.parse::<i64>()
                .ok()
                .filter(|s| *s >= 0)
                .or_else(|| s.parse::<f64>().ok().and_then(float))
        }
        _ => None,
    }
}

/// Maps a non-200 token-service answer to a refusal, keeping IMDS's error code (not its
/// description, which Microsoft says may change and may echo input).
fn token_service_error(status: u16, body: &[u8]) -> Refusal {
    let code = serde_json::from_slice::<ErrorBody>(body)
        .ok()
        .and_then(|b| b.error)
        .and_then(|e| match e {
            serde_json::Value::String(s) => Some(s),
            // Service Fabric / ARM style: {"error":{"code":...}}
            serde_json::Value::Object(o) => {
                o.get("code").and_then(|c| c.as_str()).map(String::from)
            }
            _ => None,
        })
        .map(|c| crate::endpoint::printable(&c))
        .unwrap_or_else(|| "unknown".into());
    let detail = format!("the token service answered {status} ({code})");
    match status {
        504 => Refusal::TokenServiceTimeout(detail),
        _ => Refusal::TokenUnavailable(detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_path_percent_encodes_resource_and_identity() {
        let path = token_request_path(
            "/subscriptions/1/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/x",
            "https://management.azure.com/",
            None,
        );
        assert_eq!(
            path,
            "/metadata/identity/oauth2/token?api-version=2018-02-01\
             &resource=https%3A%2F%2Fmanagement.azure.com%2F\
             &msi_res_id=%2Fsubscriptions%2F1%2FresourceGroups%2Frg%2Fproviders%2FMicrosoft.ManagedIdentity%2FuserAssignedIdentities%2Fx"
        );
    }

    #[test]
    fn a_refresh_hash_is_sent_and_claims_challenges_are_recognised() {
        let path = token_request_path("/x", "r", Some("ab12"));
        assert!(path.ends_with("&token_sha256_to_refresh=ab12"), "{path}");
        assert!(is_claims_challenge(
            b"Bearer realm=\"\", authorization_uri=\"https://login.microsoftonline.com/common/oauth2/authorize\", error=\"insufficient_claims\", claims=\"eyJh\""
        ));
        assert!(!is_claims_challenge(
            b"Bearer authorization=\"x\", resource=\"y\""
        ));
        assert!(!is_claims_challenge(b"\xff\xfe"));
    }

    #[test]
    fn imds_string_numbers_are_read_and_expires_on_preferred() {
        let body = br#"{"access_token":"tok","expires_in":"10","expires_on":"5000","token_type":"Bearer"}"#;
        let token = parse_token_response(200, body, 1000).unwrap();
        assert_eq!(token.secret, "tok");
        assert_eq!(token.expires_on, 5000);
    }

    #[test]
    fn json_numbers_and_expires_in_fallback_are_read() {
        let token =
            parse_token_response(200, br#"{"access_token":"t","expires_on":5000}"#, 1000).unwrap();
        assert_eq!(token.expires_on, 5000);
        let token =
            parse_token_response(200, br#"{"access_token":"t","expires_in":3599}"#, 1000).unwrap();
        assert_eq!(token.expires_on, 4599);
    }

    #[test]
    fn unusable_answers_are_invalid_responses() {
        for body in [
            &b"not json"[..],
            br#"{"expires_on":"5000"}"#,
            br#"{"access_token":"","expires_on":"5000"}"#,
            br#"{"access_token":"t"}"#,
            br#"{"access_token":"t","expires_on":"soon"}"#,
            br#"{"access_token":"t","expires_on":"999"}"#,
            br#"{"access_token":"a b","expires_on":"5000"}"#,
        ] {
            let err = parse_token_response(200, body, 1000).unwrap_err();
            assert_eq!(
                err.code(),
                "InvalidTokenServiceResponse",
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn imds_errors_keep_the_code_and_map_status() {
        let err = parse_token_response(
            400,
            br#"{"error":"invalid_resource","error_description":"AADSTS50001: secret stuff"}"#,
            0,
        )
        .unwrap_err();
        assert_eq!(err.code(), "TokenUnavailable");
        assert!(err.message().contains("400 (invalid_resource)"));
        assert!(!err.message().contains("AADSTS"));
        assert_eq!(
            parse_token_response(504, b"upstream request timeout", 0)
                .unwrap_err()
                .code(),
            "TokenServiceTimeout"
        );
        assert_eq!(
            parse_token_response(429, b"", 0).unwrap_err().code(),
            "TokenUnavailable"
        );
    }

    #[test]
    fn debug_never_prints_the_token() {
        let token = AccessToken {
            secret: "eyJsecret".into(),
            expires_on: 1,
        };
        assert!(!format!("{token:?}").contains("eyJsecret"));
    }

    #[test]
    fn token_bodies_follow_one_rule_set() {
        let now = 1_000;
        let ok = |body: &str| parse_token_body(body.as_bytes(), now);
        let expires = |body: &str| ok(body).map(|t| t.expires_on);
        assert_eq!(
            expires(r#"{"access_token":"t","expires_on":5000}"#),
            Ok(5000)
        );
        assert_eq!(
            expires(r#"{"access_token":"t","expires_on":"5000"}"#),
            Ok(5000)
        );
        assert_eq!(
            expires(r#"{"access_token":"t","expires_on":"5000.7"}"#),
            Ok(5000)
        );
        // expires_on wins; a blank one falls back to expires_in.
        assert_eq!(
            expires(r#"{"access_token":"t","expires_on":"5000","expires_in":9}"#),
            Ok(5000)
        );
        assert_eq!(
            expires(r#"{"access_token":"t","expires_on":"","expires_in":"60"}"#),
            Ok(1060)
        );
        // App Service's legacy date.
        assert_eq!(
            expires(r#"{"access_token":"t","expires_on":"1/1/2030 12:00:00 AM +00:00"}"#),
            Ok(1_893_456_000)
        );
        for (body, error) in [
            ("[1]", TokenBodyError::NotJson),
            ("{", TokenBodyError::NotJson),
            (r#"{"expires_in":60}"#, TokenBodyError::NoAccessToken),
            (
                r#"{"access_token":"","expires_in":60}"#,
                TokenBodyError::NoAccessToken,
            ),
            (
                r#"{"access_token":"a\r\nb","expires_in":60}"#,
                TokenBodyError::NoAccessToken,
            ),
            (
                r#"{"access_token":"a b","expires_in":60}"#,
                TokenBodyError::NoAccessToken,
            ),
            (
                r#"{"access_token":7,"expires_in":60}"#,
                TokenBodyError::NoAccessToken,
            ),
            (
                r#"{"access_token":"t","expires_on":-5}"#,
                TokenBodyError::BadExpiresOn,
            ),
            (
                r#"{"access_token":"t","expires_on":"soon"}"#,
                TokenBodyError::BadExpiresOn,
            ),
            (
                r#"{"access_token":"t","expires_in":"-1"}"#,
                TokenBodyError::BadExpiresIn,
            ),
            (r#"{"access_token":"t"}"#, TokenBodyError::NoExpiry),
        ] {
            assert_eq!(ok(body).map(|_| ()), Err(error), "{body}");
        }
    }
}
