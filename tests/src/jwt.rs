//! Mints the JWTs tsh would send: signed with the app certificate's key, header `typ: JWT`,
//! claims `resource` and `tid` — plus deliberately broken variants for the refusal tests.

use anyhow::Result;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::ecdsa::signature::Signer;
use sha2::{Digest, Sha256};

use crate::pki::PrivateKey;

/// Signs `claims` with `key` under the header's `alg`, whatever it says (so tests can lie).
/// `alg: none` produces an empty signature.
///
/// The JWT tsh would send (the key's own algorithm) is signed by `jsonwebtoken`; the forged
/// ones (`none`, or an algorithm that is not the key's) are assembled here, because
/// `jsonwebtoken` refuses to make them.
pub fn sign(key: &PrivateKey, alg: &str, claims: &serde_json::Value) -> Result<String> {
    if alg == alg_for(key) {
        return sign_honestly(key, claims);
    }
    let header = serde_json::json!({"alg": alg, "typ": "JWT"});
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature: Vec<u8> = if alg == "none" {
        Vec::new()
    } else {
        match key {
            PrivateKey::P256(k) => {
                let sig: p256::ecdsa::Signature = k.sign(signed.as_bytes());
                sig.to_bytes().to_vec()
            }
            PrivateKey::P384(k) => {
                let sig: p384::ecdsa::Signature = k.sign(signed.as_bytes());
                sig.to_bytes().to_vec()
            }
            PrivateKey::Rsa(k) => {
                let digest = Sha256::digest(signed.as_bytes());
                k.sign(rsa::Pkcs1v15Sign::new::<Sha256>(), &digest)?
            }
        }
    };
    Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature)))
}

/// `claims` signed with `key` as tsh signs: `typ: JWT` and the key's own algorithm.
fn sign_honestly(key: &PrivateKey, claims: &serde_json::Value) -> Result<String> {
    use p256::pkcs8::EncodePrivateKey as _;
    use rsa::pkcs1::EncodeRsaPrivateKey as _;
    let (algorithm, encoding) = match key {
        PrivateKey::P256(k) => (
            jsonwebtoken::Algorithm::ES256,
            jsonwebtoken::EncodingKey::from_ec_der(k.to_pkcs8_der()?.as_bytes()),
        ),
        PrivateKey::P384(k) => (
            jsonwebtoken::Algorithm::ES384,
            jsonwebtoken::EncodingKey::from_ec_der(k.to_pkcs8_der()?.as_bytes()),
        ),
        PrivateKey::Rsa(k) => (
            jsonwebtoken::Algorithm::RS256,
            jsonwebtoken::EncodingKey::from_rsa_der(k.to_pkcs1_der()?.as_bytes()),
        ),
    };
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(algorithm),
        claims,
        &encoding,
    )?)
}

/// The algorithm tsh uses for a key.
pub fn alg_for(key: &PrivateKey) -> &'static str {
    match key {
        PrivateKey::P256(_) => "ES256",
        PrivateKey::P384(_) => "ES384",
        PrivateKey::Rsa(_) => "RS256",
    }
}

/// Reads a JWT's payload without verifying it (for asserting what the upstream received).
pub fn payload(token: &str) -> Option<serde_json::Value> {
    let payload = token.split('.').nth(1)?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
}
