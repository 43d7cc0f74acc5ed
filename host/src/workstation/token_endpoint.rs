//! The local managed-identity endpoint `az` talks to: it answers token requests with a JWT
//! signed by the app certificate's key (the proof of possession the gateway checks), shaped as
//! tsh shapes it.
//!
//! Two styles, told apart by the request's host (both reached through the proxy's TLS
//! terminator, like any Azure host):
//!
//! - MSI style, `MSI_ENDPOINT=https://azure-msi.azgate.invalid/<secret>`: the secret is the path;
//!   `GET` with the query or `POST` with a form body (azure-identity's Cloud Shell flavour).
//! - App Service style, `IDENTITY_ENDPOINT=https://azure-identity.azgate.invalid` +
//!   `IDENTITY_HEADER=<secret>`: the secret arrives in `X-IDENTITY-HEADER` (az ≥ 2.73 / MSAL).
//!
//! Checks, each a 400 with `{"error":{"code":…,"message":…}}`: the secret, `Metadata: true`, a
//! printable `resource` (query or form), and the identity: `msi_res_id`/`mi_res_id` may be left
//! out or must name the certificate's selected identity (case-insensitively); `client_id`,
//! `object_id` and `principal_id` are refused because a certificate selects by resource ID.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};

use crate::pki::AppKey;

/// Host of the MSI-style endpoint. `.invalid` never resolves, so a request that bypasses the
/// proxy fails instead of leaving the machine.
pub const MSI_HOST: &str = "azure-msi.azgate.invalid";
/// Host of the App Service-style endpoint.
pub const IDENTITY_HOST: &str = "azure-identity.azgate.invalid";
/// What tsh answers for `expires_in`: a year. The JWT is worthless without the certificate's
/// key and the mTLS session, whose lifetime is the certificate's.
const LIFETIME_S: u64 = 365 * 24 * 3600;

/// The endpoint secret (random hex). `Debug` prints `...`.
#[derive(Clone, PartialEq, Eq)]
pub struct EndpointSecret(String);

impl fmt::Debug for EndpointSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EndpointSecret(...)")
    }
}

impl EndpointSecret {
    /// 32 random hex digits.
    pub fn generate() -> Self {
        Self(random_hex(16))
    }

    /// Takes a secret handed down from a parent azgate (as tsh reuses its secret when nested);
    /// it must look like one of ours.
    pub fn from_existing(value: &str) -> Option<Self> {
        (value.len() >= 20 && value.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| Self(value.to_owned()))
    }

    /// The secret itself, for the exported environment.
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn matches(&self, offered: &[u8]) -> bool {
        let mine = self.0.as_bytes();
        // Length is public (fixed); compare every byte so timing does not leak a prefix.
        mine.len() == offered.len()
            && mine
                .iter()
                .zip(offered)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

/// Answers local token requests for one certificate.
#[derive(Debug)]
pub struct TokenEndpoint {
    key: AppKey,
    identity: String,
    secret: EndpointSecret,
}

/// A local answer: status and JSON body.
#[derive(Debug)]
pub struct LocalAnswer {
    /// HTTP status.
    pub status: StatusCode,
    /// JSON text.
    pub body: Bytes,
}

impl TokenEndpoint {
    /// An endpoint signing with `key` for the selected `identity`.
    pub fn new(key: AppKey, identity: String, secret: EndpointSecret) -> Self {
        Self {
            key,
            identity,
            secret,
        }
    }

    /// The secret clients must present.
    pub fn secret(&self) -> &EndpointSecret {
        &self.secret
    }

    /// Whether `host` (no port) is one of the local endpoints.
    pub fn is_endpoint_host(host: &str) -> bool {
        host.eq_ignore_ascii_case(MSI_HOST) || host.eq_ignore_ascii_case(IDENTITY_HOST)
    }

    /// Answers one request to `host`.
    pub fn answer(
        &self,
        host: &str,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> LocalAnswer {
        match self.token(host, method, path_and_query, headers, body) {
            Ok(json) => LocalAnswer {
                status: StatusCode::OK,
                body: Bytes::from(json.to_string()),
            },
            Err((status, code, message)) => LocalAnswer {
                status,
                body: Bytes::from(azgate_filter::error::azure_error_body(code, &message)),
            },
        }
    }

    fn token(
        &self,
        host: &str,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<serde_json::Value, (StatusCode, &'static str, String)> {
        let bad = |code, message: &str| Err((StatusCode::BAD_REQUEST, code, message.to_owned()));
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let secret_ok = if host.eq_ignore_ascii_case(MSI_HOST) {
            self.secret.matches(
                path.trim_start_matches('/')
                    .trim_end_matches('/')
                    .as_bytes(),
            )
        } else if host.eq_ignore_ascii_case(IDENTITY_HOST) {
            headers
                .get("x-identity-header")
                .is_some_and(|value| self.secret.matches(value.as_bytes()))
        } else {
            return Err((
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{host} is not a local token endpoint"),
            ));
        };
        if !secret_ok {
            return bad(
                "InvalidSecret",
                "the token endpoint secret does not match (is the environment from another azgate proxy?)",
            );
        }
        if *method != Method::GET && *method != Method::POST {
            return Err((
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "token requests are GET (or POST with a form)".into(),
            ));
        }
        if !headers
            .get("metadata")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        {
            return bad(
                "MissingMetadataHeader",
                "the header Metadata: true is required",
            );
        }
        let mut params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        if *method == Method::POST {
            params.extend(
                form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), v.into_owned())),
            );
        }
        let value = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let Some(resource) = value("resource").filter(|r| !r.is_empty()) else {
            return bad("MissingResource", "the request names no resource");
        };
        if azgate_filter::jwt::check_resource(resource).is_err() {
            return bad(
                "InvalidResource",
                "the resource must be printable ASCII of at most 512 bytes",
            );
        }
        for selector in ["client_id", "clientid", "object_id", "principal_id"] {
            if value(selector).is_some() {
                return bad(
                    "UnsupportedIdentitySelector",
                    &format!(
                        "{selector} is not supported: the certificate selects {}; use --resource-id",
                        self.identity
                    ),
                );
            }
        }
        for selector in ["msi_res_id", "mi_res_id"] {
            if let Some(asked) = value(selector)
                && !asked.eq_ignore_ascii_case(&self.identity)
            {
                return bad(
                    "IdentityNotSelected",
                    &format!(
                        "{selector} {asked:?} is not the identity the certificate selects ({}); issue a certificate for it",
                        self.identity
                    ),
                );
            }
        }
        let token = self.jwt(resource).map_err(|error| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "SigningFailed",
                format!("cannot sign the token ({error})"),
            )
        })?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        Ok(serde_json::json!({
            "access_token": token,
            "client_id": random_uuid(),
            "expires_in": LIFETIME_S,
            "ext_expires_in": LIFETIME_S,
            "expires_on": now + LIFETIME_S,
            "not_before": now.saturating_sub(10),
            "resource": resource,
            "token_type": "Bearer",
        }))
    }

    /// `{"alg": ES256|RS256, "typ": "JWT"}` . `{"resource", "tid"}`, signed with the key.
    fn jwt(&self, resource: &str) -> Result<String, crate::pki::PkiError> {
        self.key
            .sign_jwt(&serde_json::json!({"resource": resource, "tid": random_uuid()}))
    }
}

fn random_hex(bytes: usize) -> String {
    use rand_core::RngCore;
    let mut buf = vec![0u8; bytes];
    rand_core::OsRng.fill_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A random (version 4) UUID.
pub fn random_uuid() -> String {
    let hex = random_hex(16);
    let mut chars: Vec<char> = hex.chars().collect();
    chars[12] = '4';
    chars[16] = ['8', '9', 'a', 'b'][usize::from(hex.as_bytes()[16] % 4)];
    let s: String = chars.into_iter().collect();
    format!(
        "{}-{}-{}-{}-{}",
        &s[0..8],
        &s[8..12],
        &s[12..16],
        &s[16..20],
        &s[20..32]
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use crate::pki::KeyKind;

    const ID: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader";

    fn endpoint(kind: KeyKind) -> (TokenEndpoint, azgate_filter::identity::PublicKey) {
        let key = AppKey::generate(kind).unwrap();
        let public = match &key {
            AppKey::P256(k) => azgate_filter::identity::PublicKey::p256(k.verifying_key()),
            AppKey::Rsa(k) => azgate_filter::identity::PublicKey::rsa(&k.to_public_key()).unwrap(),
        };
        (
            TokenEndpoint::new(key, ID.into(), EndpointSecret::generate()),
            public,
        )
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, v.parse().unwrap());
        }
        map
    }

    fn json(answer: &LocalAnswer) -> serde_json::Value {
        serde_json::from_slice(&answer.body).unwrap()
    }

    #[test]
    fn app_service_style_answers_a_jwt_the_gateway_verifies() {
        for kind in [KeyKind::P256, KeyKind::Rsa] {
            let (endpoint, public) = endpoint(kind);
            let secret = endpoint.secret().expose().to_owned();
            let answer = endpoint.answer(
                IDENTITY_HOST,
                &Method::GET,
                &format!(
                    "/?api-version=2019-08-01&resource=https%3A%2F%2Fmanagement.core.windows.net%2F&mi_res_id={}",
                    ID.to_uppercase()
                ),
                &headers(&[("x-identity-header", &secret), ("metadata", "true")]),
                b"",
            );
            assert_eq!(answer.status, StatusCode::OK);
            let body = json(&answer);
            assert_eq!(body["token_type"], "Bearer");
            assert_eq!(body["resource"], "https://management.core.windows.net/");
            assert_eq!(body["expires_in"], LIFETIME_S);
            assert!(body["expires_on"].as_u64().unwrap() > LIFETIME_S);
            // The filter's own verifier accepts it, with the claims tsh sends.
            let claims =
                azgate_filter::jwt::verify(body["access_token"].as_str().unwrap(), &public)
                    .unwrap();
            assert_eq!(claims.resource, "https://management.core.windows.net/");
            assert_eq!(claims.tid.unwrap().len(), 36);
            assert!(claims.exp.is_none());
        }
    }

    #[test]
    fn msi_style_takes_the_secret_in_the_path_and_a_form_body() {
        let (endpoint, _) = endpoint(KeyKind::P256);
        let path = format!("/{}", endpoint.secret().expose());
        let meta = headers(&[("metadata", "true")]);
        let get = endpoint.answer(
            MSI_HOST,
            &Method::GET,
            &format!("{path}?resource=https://vault.azure.net&msi_res_id={ID}"),
            &meta,
            b"",
        );
        assert_eq!(get.status, StatusCode::OK, "{:?}", get.body);
        let post = endpoint.answer(
            MSI_HOST,
            &Method::POST,
            &path,
            &meta,
            b"resource=https%3A%2F%2Fvault.azure.net",
        );
        assert_eq!(json(&post)["resource"], "https://vault.azure.net");
    }

    #[test]
    fn refusals_are_400s_with_a_code() {
        let (endpoint, _) = endpoint(KeyKind::P256);
        let secret = endpoint.secret().expose().to_owned();
        let good = headers(&[("x-identity-header", &secret), ("metadata", "true")]);
        let cases: Vec<(HeaderMap, String, &str)> = vec![
            (
                headers(&[
                    ("x-identity-header", "0000000000000000000000"),
                    ("metadata", "true"),
                ]),
                "/?resource=r".into(),
                "InvalidSecret",
            ),
            (
                headers(&[("metadata", "true")]),
                "/?resource=r".into(),
                "InvalidSecret",
            ),
            (
                headers(&[("x-identity-header", &secret)]),
                "/?resource=r".into(),
                "MissingMetadataHeader",
            ),
            (
                good.clone(),
                "/?api-version=2019-08-01".into(),
                "MissingResource",
            ),
            (good.clone(), "/?resource=%01".into(), "InvalidResource"),
            (
                good.clone(),
                "/?resource=r&client_id=abc".into(),
                "UnsupportedIdentitySelector",
            ),
            (
                good.clone(),
                format!("/?resource=r&mi_res_id={}x", ID),
                "IdentityNotSelected",
            ),
        ];
        for (headers, path, code) in cases {
            let answer = endpoint.answer(IDENTITY_HOST, &Method::GET, &path, &headers, b"");
            assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{path}");
            let body = json(&answer);
            assert_eq!(body["error"]["code"], code, "{path}: {body}");
            assert!(
                !body.to_string().contains(&secret),
                "the secret is never echoed"
            );
        }
        // The MSI style with a wrong path.
        let answer = endpoint.answer(
            MSI_HOST,
            &Method::GET,
            "/wrong?resource=r",
            &headers(&[("metadata", "true")]),
            b"",
        );
        assert_eq!(json(&answer)["error"]["code"], "InvalidSecret");
        assert!(!format!("{endpoint:?}").contains(&secret));
    }

    #[test]
    fn uuids_are_version_4() {
        let id = random_uuid();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(id, random_uuid());
    }
}
