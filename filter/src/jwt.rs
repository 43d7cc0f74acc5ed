//! Proof of possession: the request's `Authorization: Bearer <JWT>` must be signed by the private
//! key of the client certificate.
//!
//! tsh signs `{"resource": ..., "tid": ...}` with the app certificate's key (RS256 for RSA keys,
//! ES256 for P-256) and sends no `exp`. The algorithm is taken from the key, never from the token:
//! the header's `alg` must equal the key's, so `none`, HS* and RS/ES confusion are refused.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;

use crate::error::Refusal;
use crate::identity::PublicKey;

/// Largest accepted `resource` claim.
pub const MAX_RESOURCE_BYTES: usize = 512;

/// The verified claims azgate uses.
#[derive(Clone, Debug, PartialEq)]
pub struct Claims {
    /// The audience the caller wants a token for (`resource`).
    pub resource: String,
    /// Tenant id, informational.
    pub tid: Option<String>,
    /// `exp`, Unix seconds, if present.
    pub exp: Option<f64>,
    /// `nbf`, Unix seconds, if present.
    pub nbf: Option<f64>,
}

impl Claims {
    /// Enforces `exp` and `nbf` when present, with `skew` seconds of tolerance.
    pub fn check_time(&self, now: i64, skew: i64) -> Result<(), Refusal> {
        let now = now as f64;
        if let Some(exp) = self.exp
            && now > exp + skew as f64
        {
            return Err(Refusal::TokenExpired("the bearer token has expired".into()));
        }
        if let Some(nbf) = self.nbf
            && now < nbf - skew as f64
        {
            return Err(Refusal::TokenNotYetValid(
                "the bearer token is not valid yet".into(),
            ));
        }
        Ok(())
    }
}

/// Extracts the token from an `Authorization` header value.
pub fn bearer_token(authorization: &str, max_bytes: usize) -> Result<&str, Refusal> {
    let (scheme, token) = crate::headers::trim_ows(authorization)
        .split_once(' ')
        .ok_or_else(|| {
            Refusal::InvalidAuthorizationHeader("Authorization must be \"Bearer <token>\"".into())
        })?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Refusal::InvalidAuthorizationHeader(
            "Authorization must use the Bearer scheme".into(),
        ));
    }
    let token = crate::headers::trim_ows(token);
    if token.is_empty() {
        return Err(Refusal::InvalidAuthorizationHeader(
            "the bearer token is empty".into(),
        ));
    }
    // Envoy joins repeated Authorization headers with ", "; a JWT never contains either.
    if token.contains(',') || token.contains(char::is_whitespace) {
        return Err(Refusal::InvalidAuthorizationHeader(
            "Authorization must carry exactly one bearer token".into(),
        ));
    }
    if token.len() > max_bytes {
        return Err(Refusal::TokenTooLarge(format!(
            "the bearer token is larger than {max_bytes} bytes"
        )));
    }
    Ok(token)
}

/// Header parameters that name or carry a key, or change how the token is processed. The key is
/// the client certificate's and nothing else, so a token that points elsewhere is not from tsh.
const REFUSED_HEADER_PARAMETERS: [&str; 5] = ["crit", "jku", "jwk", "x5u", "x5c"];

/// Verifies `token` against `key` and returns its claims. Time claims are not checked here (see
/// [`Claims::check_time`]), so a verification can be cached and re-checked on reuse.
///
/// The signature is `jsonwebtoken`'s, with the algorithm pinned to the key. The JSON is read
/// here, strictly, because serde reads a struct from a JSON array as readily as from an object
/// and keeps the last of duplicate keys: header and payload must be objects without duplicate
/// keys, `typ` (if present) `JWT`, and none of [`REFUSED_HEADER_PARAMETERS`].
pub fn verify(token: &str, key: &PublicKey) -> Result<Claims, Refusal> {
    let invalid = |why: &str| Refusal::InvalidToken(format!("the bearer token {why}"));
    let mut parts = token.split('.');
    let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid("is not a compact JWS (header.payload.signature)"));
    };
    let header = decode_object(header_b64).ok_or_else(|| invalid("has an unreadable header"))?;
    if let Some(name) = REFUSED_HEADER_PARAMETERS
        .iter()
        .find(|name| header.contains_key(**name))
    {
        return Err(invalid(&format!(
            "uses header parameter {name:?}, which azgate does not accept"
        )));
    }
    match header.get("typ") {
        None => {}
        Some(serde_json::Value::String(typ)) if typ == "JWT" => {}
        Some(_) => return Err(invalid("has a \"typ\" other than \"JWT\"")),
    }
    let expected = key.algorithm();
    let alg = match header.get("alg") {
        Some(serde_json::Value::String(alg)) => alg.as_str(),
        _ => return Err(invalid("has no \"alg\"")),
    };
    if alg != algorithm_name(expected) {
        return Err(invalid(&format!(
            "uses algorithm {:?}; the certificate's key requires {}",
            crate::endpoint::printable(alg),
            algorithm_name(expected)
        )));
    }
    let signed = &token[..header_b64.len() + 1 + payload_b64.len()];
    let valid = jsonwebtoken::crypto::verify(
        signature_b64,
        signed.as_bytes(),
        key.decoding_key(),
        expected,
    )
    .map_err(|_| invalid("has a malformed signature"))?;
    if !valid {
        return Err(invalid("signature does not match the client certificate"));
    }
    let payload = decode_object(payload_b64).ok_or_else(|| invalid("has an unreadable payload"))?;
    let resource = match payload.get("resource") {
        Some(serde_json::Value::String(r)) if !r.is_empty() => r.clone(),
        _ => return Err(invalid("has no \"resource\" claim")),
    };
    let tid = match payload.get("tid") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(t)) => Some(t.clone()),
        Some(_) => return Err(invalid("has a non-string \"tid\" claim")),
    };
    Ok(Claims {
        resource,
        tid,
        exp: numeric_date(payload.get("exp")).map_err(|_| invalid("has a non-numeric \"exp\""))?,
        nbf: numeric_date(payload.get("nbf")).map_err(|_| invalid("has a non-numeric \"nbf\""))?,
    })
}

/// The JWS name of the algorithms azgate verifies.
fn algorithm_name(algorithm: jsonwebtoken::Algorithm) -> &'static str {
    match algorithm {
        jsonwebtoken::Algorithm::ES256 => "ES256",
        jsonwebtoken::Algorithm::RS256 => "RS256",
        // PublicKey builds only the two above.
        _ => "an unsupported algorithm",
    }
}

/// A base64url (unpadded, canonical) JSON object without duplicate keys at any depth.
fn decode_object(b64: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let bytes = URL_SAFE_NO_PAD.decode(b64).ok()?;
    match serde_json::from_slice::<StrictJson>(&bytes).ok()?.0 {
        serde_json::Value::Object(object) => Some(object),
        _ => None,
    }
}

fn numeric_date(value: Option<&serde_json::Value>) -> Result<Option<f64>, ()> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => {
            n.as_f64().filter(|f| f.is_finite()).map(Some).ok_or(())
        }
        Some(_) => Err(()),
    }
}

/// A JSON value read by a visitor that refuses duplicate object keys (serde_json keeps the last).
struct StrictJson(serde_json::Value);

impl<'de> Deserialize<'de> for StrictJson {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictJson)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON without duplicate keys")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictJson(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(items.into())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let StrictJson(value) = map.next_value()?;
            if object.insert(key, value).is_some() {
                return Err(serde::de::Error::custom("duplicate key"));
            }
        }
        Ok(object.into())
    }
}

/// Checks that a `resource` claim is an audience worth asking the token service for: bounded,
/// printable, no whitespace. IMDS itself decides whether the audience exists.
pub fn check_resource(resource: &str) -> Result<(), Refusal> {
    if resource.len() > MAX_RESOURCE_BYTES {
        return Err(Refusal::InvalidResource(format!(
            "the resource claim is longer than {MAX_RESOURCE_BYTES} bytes"
        )));
    }
    if !resource.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Refusal::InvalidResource(
            "the resource claim must be printable ASCII without spaces".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;
    use p256::ecdsa::signature::Signer;

    fn b64(v: &serde_json::Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    /// A compact JWS signed with `key` (tests elsewhere in the crate use it too).
    pub(crate) fn es256(
        key: &SigningKey,
        header: serde_json::Value,
        claims: serde_json::Value,
    ) -> String {
        let signed = format!("{}.{}", b64(&header), b64(&claims));
        let sig: p256::ecdsa::Signature = key.sign(signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }

    fn key() -> SigningKey {
        SigningKey::from_slice(&[7u8; 32]).unwrap()
    }

    pub(crate) fn public(key: &SigningKey) -> PublicKey {
        PublicKey::p256(key.verifying_key())
    }

    #[test]
    fn es256_token_signed_by_the_certificate_key_verifies() {
        let k = key();
        let token = es256(
            &k,
            serde_json::json!({"alg":"ES256","typ":"JWT"}),
            serde_json::json!({"resource":"https://management.azure.com/","tid":"t"}),
        );
        let claims = verify(&token, &public(&k)).unwrap();
        assert_eq!(claims.resource, "https://management.azure.com/");
        assert_eq!(claims.tid.as_deref(), Some("t"));
    }

    #[test]
    fn high_s_signatures_verify_as_gos_ecdsa_makes_them() {
        // Go's crypto/ecdsa (tsh) does not normalise S, so half of real tokens are high-S.
        let k = key();
        let token = es256(
            &k,
            serde_json::json!({"alg":"ES256","typ":"JWT"}),
            serde_json::json!({"resource":"r"}),
        );
        let (signed, signature) = token.rsplit_once('.').unwrap();
        let sig = p256::ecdsa::Signature::from_slice(&URL_SAFE_NO_PAD.decode(signature).unwrap())
            .unwrap();
        let (r, s) = sig.split_scalars();
        let flipped = p256::ecdsa::Signature::from_scalars(r, -*s).unwrap();
        assert!(flipped.normalize_s().is_some() || sig.normalize_s().is_some());
        let other = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(flipped.to_bytes()));
        assert_eq!(verify(&other, &public(&k)).unwrap().resource, "r");
        assert_eq!(verify(&token, &public(&k)).unwrap().resource, "r");
    }

    #[test]
    fn header_and_payload_must_be_strict_json_objects() {
        let k = key();
        let sign = |header: &str, payload: &str| {
            let signed = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header),
                URL_SAFE_NO_PAD.encode(payload)
            );
            let sig: p256::ecdsa::Signature = k.sign(signed.as_bytes());
            format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
        };
        let good = r#"{"resource":"r"}"#;
        assert!(verify(&sign(r#"{"alg":"ES256"}"#, good), &public(&k)).is_ok());
        for (header, payload) in [
            (r#"["ES256"]"#, good),
            (r#"{"alg":"ES256","alg":"ES256"}"#, good),
            (r#"{"alg":"ES256","typ":"JWS"}"#, good),
            (r#"{"alg":"ES256","typ":5}"#, good),
            (r#"{"alg":"ES256","crit":["exp"]}"#, good),
            (r#"{"alg":"ES256","jku":"https://evil"}"#, good),
            (r#"{"alg":"ES256","jwk":{}}"#, good),
            (r#"{"alg":"ES256","x5u":"https://evil"}"#, good),
            (r#"{"alg":"ES256","x5c":[]}"#, good),
            (r#"{"alg":"ES256"}"#, r#"["r"]"#),
            (r#"{"alg":"ES256"}"#, r#""r""#),
            (r#"{"alg":"ES256"}"#, r#"{"resource":"a","resource":"b"}"#),
            (
                r#"{"alg":"ES256"}"#,
                r#"{"resource":"a","x":{"k":1,"k":2}}"#,
            ),
            (r#"{"alg":"ES256"}"#, r#"{"resource":"a","exp":1e400}"#),
            (r#"{"alg":"ES256"}"#, r#"{"resource":"a","exp":"1"}"#),
            (r#"{"alg":"ES256"}"#, r#"{"resource":"a"} trailing"#),
        ] {
            let err = verify(&sign(header, payload), &public(&k)).unwrap_err();
            assert_eq!(err.code(), "InvalidToken", "{header} {payload}");
        }
        assert!(
            verify(
                &sign(r#"{"alg":"ES256","kid":"k","typ":"JWT"}"#, good),
                &public(&k)
            )
            .is_ok()
        );
    }

    #[test]
    fn token_signed_by_another_key_is_refused() {
        let other = SigningKey::from_slice(&[9u8; 32]).unwrap();
        let token = es256(
            &other,
            serde_json::json!({"alg":"ES256"}),
            serde_json::json!({"resource":"r"}),
        );
        assert_eq!(
            verify(&token, &public(&key())).unwrap_err().code(),
            "InvalidToken"
        );
    }

    #[test]
    fn alg_none_hs256_and_rs256_on_an_ec_key_are_refused() {
        let k = key();
        for alg in ["none", "HS256", "RS256", "ES384", "es256"] {
            let token = es256(
                &k,
                serde_json::json!({"alg":alg}),
                serde_json::json!({"resource":"r"}),
            );
            let err = verify(&token, &public(&k)).unwrap_err();
            assert_eq!(err.code(), "InvalidToken", "{alg}");
        }
        let unsigned = format!(
            "{}.{}.",
            b64(&serde_json::json!({"alg":"none"})),
            b64(&serde_json::json!({"resource":"r"}))
        );
        assert_eq!(
            verify(&unsigned, &public(&k)).unwrap_err().code(),
            "InvalidToken"
        );
    }

    #[test]
    fn tampered_payload_is_refused() {
        let k = key();
        let token = es256(
            &k,
            serde_json::json!({"alg":"ES256"}),
            serde_json::json!({"resource":"a"}),
        );
        let parts: Vec<&str> = token.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64(&serde_json::json!({"resource":"b"})),
            parts[2]
        );
        assert_eq!(
            verify(&forged, &public(&k)).unwrap_err().code(),
            "InvalidToken"
        );
    }

    #[test]
    fn resource_claim_is_required() {
        let k = key();
        for claims in [
            serde_json::json!({}),
            serde_json::json!({"resource":""}),
            serde_json::json!({"resource":5}),
        ] {
            let token = es256(&k, serde_json::json!({"alg":"ES256"}), claims);
            assert_eq!(
                verify(&token, &public(&k)).unwrap_err().code(),
                "InvalidToken"
            );
        }
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for token in ["", "a", "a.b", "a.b.c.d", "!!.??.**", "e30.e30.e30"] {
            assert_eq!(
                verify(token, &public(&key())).unwrap_err().code(),
                "InvalidToken",
                "{token}"
            );
        }
    }

    #[test]
    fn exp_and_nbf_are_enforced_with_skew() {
        let claims = Claims {
            resource: "r".into(),
            tid: None,
            exp: Some(1000.0),
            nbf: Some(900.0),
        };
        assert!(claims.check_time(950, 0).is_ok());
        assert!(claims.check_time(1030, 60).is_ok());
        assert_eq!(
            claims.check_time(1100, 60).unwrap_err().code(),
            "TokenExpired"
        );
        assert_eq!(
            claims.check_time(800, 60).unwrap_err().code(),
            "TokenNotYetValid"
        );
    }

    #[test]
    fn bearer_scheme_and_size_are_checked() {
        assert_eq!(bearer_token("Bearer abc", 10).unwrap(), "abc");
        assert_eq!(bearer_token("bearer abc", 10).unwrap(), "abc");
        assert_eq!(
            bearer_token("Basic abc", 10).unwrap_err().code(),
            "InvalidAuthorizationHeader"
        );
        assert_eq!(
            bearer_token("Bearer", 10).unwrap_err().code(),
            "InvalidAuthorizationHeader"
        );
        assert_eq!(
            bearer_token("Bearer ", 10).unwrap_err().code(),
            "InvalidAuthorizationHeader"
        );
        assert_eq!(
            bearer_token("Bearer 12345678901", 10).unwrap_err().code(),
            "TokenTooLarge"
        );
        // What Envoy makes of two Authorization headers.
        assert_eq!(
            bearer_token("Bearer a.b.c, Bearer a.b.c", 100)
                .unwrap_err()
                .code(),
            "InvalidAuthorizationHeader"
        );
    }

    #[test]
    fn resource_must_be_printable_and_bounded() {
        assert!(check_resource("https://management.azure.com/").is_ok());
        assert_eq!(check_resource("a b").unwrap_err().code(), "InvalidResource");
        assert_eq!(
            check_resource(&"a".repeat(600)).unwrap_err().code(),
            "InvalidResource"
        );
    }
}
