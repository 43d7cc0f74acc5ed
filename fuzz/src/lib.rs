//! What the fuzz targets share: real fixtures (two Teleport-format app certificates with their
//! keys, a plugin configuration, JWTs signed by the certificate keys, a clock inside the
//! certificates' validity), the XFCC model that structured targets render, and the contract
//! checks (oracles) that turn a wrong answer into a crash.

pub mod api;
pub mod xfcc;

use std::collections::HashMap;
use std::sync::OnceLock;

use azgate_filter::config::Config;
use azgate_filter::identity::{AppIdentity, PublicKey};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use p256::pkcs8::DecodePrivateKey;
use serde::de::{Deserializer, MapAccess, Visitor};
use sha2::{Digest, Sha256};

/// The P-256 app certificate (PEM) and its key.
pub const P256_CERT_PEM: &str = include_str!("../fixtures/p256-cert.pem");
const P256_KEY_PEM: &str = include_str!("../fixtures/p256-key.pem");
/// The RSA-2048 app certificate (PEM) and its key.
pub const RSA_CERT_PEM: &str = include_str!("../fixtures/rsa-cert.pem");
const RSA_KEY_PEM: &str = include_str!("../fixtures/rsa-key.pem");
/// The CA that issued both (not an app certificate: no Teleport subject).
pub const CA_CERT_PEM: &str = include_str!("../fixtures/ca.pem");

/// The identity both certificates select and allow.
pub const IDENTITY: &str = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader";
/// The resource claim of the fixture tokens.
pub const RESOURCE: &str = "https://management.azure.com/";

/// Which fixture certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, arbitrary::Arbitrary)]
pub enum Which {
    /// ECDSA P-256 (ES256 tokens).
    P256,
    /// RSA-2048 (RS256 tokens).
    Rsa,
}

/// A fixture certificate: PEM, DER, parsed identity.
pub struct Cert {
    /// PEM text.
    pub pem: &'static str,
    /// DER bytes.
    pub der: Vec<u8>,
    /// Lower-case hex SHA-256 of the DER (XFCC `Hash=`).
    pub hash_hex: String,
    /// What the filter reads from it.
    pub identity: AppIdentity,
}

/// Everything the targets use, built once per process.
pub struct Fixtures {
    /// The P-256 certificate.
    pub p256: Cert,
    /// The RSA certificate.
    pub rsa: Cert,
    p256_key: p256::ecdsa::SigningKey,
    rsa_key: rsa::RsaPrivateKey,
    /// A fixed clock: one hour after the certificates' NotBefore.
    pub now: i64,
    /// Plugin configurations: [strict, allow_unauthenticated with every cloud].
    pub configs: Vec<Config>,
    /// The JSON of `configs`.
    pub config_json: Vec<String>,
    /// Tokens signed by a fixture key, with the certificate they belong to.
    pub tokens: Vec<(Which, String)>,
    /// The `header.payload` of every fixture token: a verified token whose signing input is
    /// neither here nor signed by the target itself is a forgery.
    signed: HashMap<String, Which>,
}

impl Fixtures {
    /// The fixture certificate `which`.
    pub fn cert(&self, which: Which) -> &Cert {
        match which {
            Which::P256 => &self.p256,
            Which::Rsa => &self.rsa,
        }
    }

    /// The public key of `which`.
    pub fn key(&self, which: Which) -> &PublicKey {
        &self.cert(which).identity.public_key
    }

    /// A compact JWS over the raw header and payload bytes, signed by `which`'s key (ES256 or
    /// RS256 by the key), whatever the header says.
    pub fn sign(&self, which: Which, header: &[u8], payload: &[u8]) -> String {
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let signature = match which {
            Which::P256 => {
                use p256::ecdsa::signature::Signer;
                let sig: p256::ecdsa::Signature = self.p256_key.sign(signed.as_bytes());
                sig.to_bytes().to_vec()
            }
            Which::Rsa => {
                let digest = Sha256::digest(signed.as_bytes());
                self.rsa_key
                    .sign(rsa::Pkcs1v15Sign::new::<Sha256>(), &digest)
                    .expect("PKCS#1 v1.5 signing with a 2048-bit key and a SHA-256 digest fits")
            }
        };
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    /// Which fixture key signed this fixture token's `header.payload`, if one did.
    pub fn signer(&self, token: &str) -> Option<Which> {
        self.signed.get(signing_input(token)?).copied()
    }

    /// An XFCC value as `azgate serve` writes it: `Hash=<hex>;Cert="<url-encoded PEM>"`.
    pub fn xfcc(&self, which: Which) -> String {
        let cert = self.cert(which);
        format!("Hash={};Cert=\"{}\"", cert.hash_hex, url_encode(cert.pem))
    }
}

/// The fixtures (built on first use; a failure here is a broken fixture, not a finding).
pub fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(build_fixtures)
}

fn cert(pem: &'static str) -> Cert {
    let der = pem_body(pem);
    let identity = api::parse_certificate(pem)
        .unwrap_or_else(|e| panic!("fixture certificate refused: {} {}", e.code(), e.message()));
    Cert {
        pem,
        hash_hex: hex(&Sha256::digest(&der)),
        der,
        identity,
    }
}

fn build_fixtures() -> Fixtures {
    let p256 = cert(P256_CERT_PEM);
    let rsa = cert(RSA_CERT_PEM);
    let now = p256.identity.not_before + 3600;
    let role = |name: &str, allow: &[&str], deny: &[&str]| {
        serde_json::json!({"kind": "role", "version": "v7", "metadata": {"name": name},
            "spec": {"allow": {"azure_identities": allow}, "deny": {"azure_identities": deny}}})
    };
    let roles = vec![
        role("azure-reader", &[IDENTITY], &[]),
        role("blocked", &[], &["*"]),
    ];
    let config_json = vec![
        serde_json::json!({"roles": roles, "clouds": ["public"]}).to_string(),
        serde_json::json!({"roles": roles, "allow_unauthenticated": true,
            "max_token_bytes": 1024, "verified_token_cache_size": 2})
        .to_string(),
    ];
    let configs = config_json
        .iter()
        .map(|json| {
            api::parse_config(json.as_bytes())
                .unwrap_or_else(|e| panic!("fixture configuration refused: {e}"))
        })
        .collect();
    let mut fixtures = Fixtures {
        p256,
        rsa,
        p256_key: p256::ecdsa::SigningKey::from_pkcs8_pem(P256_KEY_PEM)
            .expect("fixtures/p256-key.pem is a PKCS#8 P-256 key"),
        rsa_key: rsa::RsaPrivateKey::from_pkcs8_pem(RSA_KEY_PEM)
            .expect("fixtures/rsa-key.pem is a PKCS#8 RSA key"),
        now,
        configs,
        config_json,
        tokens: Vec::new(),
        signed: HashMap::new(),
    };
    let header = |alg: &str| serde_json::json!({"alg": alg, "typ": "JWT"}).to_string();
    let claims = [
        serde_json::json!({"resource": RESOURCE, "tid": "tenant"}),
        serde_json::json!({"resource": "https://vault.azure.net", "exp": now + 600, "nbf": now - 10}),
        serde_json::json!({"resource": RESOURCE, "exp": now - 3600}),
    ];
    let mut tokens = Vec::new();
    for claim in &claims {
        let payload = claim.to_string();
        tokens.push((
            Which::P256,
            fixtures.sign(Which::P256, header("ES256").as_bytes(), payload.as_bytes()),
        ));
    }
    tokens.push((
        Which::Rsa,
        fixtures.sign(
            Which::Rsa,
            header("RS256").as_bytes(),
            claims[0].to_string().as_bytes(),
        ),
    ));
    fixtures.signed = tokens
        .iter()
        .filter_map(|(which, t)| Some((signing_input(t)?.to_string(), *which)))
        .collect();
    fixtures.tokens = tokens;
    fixtures
}

/// A token's `header.payload`.
pub fn signing_input(token: &str) -> Option<&str> {
    Some(&token[..token.rfind('.')?])
}

/// The DER inside a one-certificate PEM.
pub fn pem_body(pem: &str) -> Vec<u8> {
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    STANDARD
        .decode(body.trim())
        .expect("fixture PEM bodies are base64")
}

/// A PEM certificate for DER bytes.
pub fn pem_of(der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// URL-encodes as Envoy does for XFCC `Cert=` (everything but unreserved characters).
pub fn url_encode(text: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(text, SET).to_string()
}

/// The top level of a JSON object whose keys are all distinct, or `None` (not JSON, not an
/// object, or a duplicate key): the contract's reading of a JWS header or payload.
pub fn strict_object(bytes: &[u8]) -> Option<serde_json::Map<String, serde_json::Value>> {
    struct Strict(serde_json::Map<String, serde_json::Value>);
    impl<'de> serde::Deserialize<'de> for Strict {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Strict;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a JSON object without duplicate keys")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
                    let mut out = serde_json::Map::new();
                    while let Some(key) = map.next_key::<String>()? {
                        let value: serde_json::Value = map.next_value()?;
                        if out.insert(key, value).is_some() {
                            return Err(serde::de::Error::custom("duplicate key"));
                        }
                    }
                    Ok(Strict(out))
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_slice::<Strict>(bytes).ok().map(|s| s.0)
}

/// Panics unless a verified token meets the contract: header and payload JSON objects without
/// duplicate keys, `alg` the key's, no `crit`, `typ` absent or `JWT`, a non-empty string
/// `resource`.
pub fn assert_verified_token_meets_contract(token: &str, which: Which) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(
        parts.len(),
        3,
        "verified a token that is not three segments"
    );
    let header = URL_SAFE_NO_PAD
        .decode(parts[0])
        .ok()
        .and_then(|h| strict_object(&h))
        .unwrap_or_else(|| panic!("verified a token whose header is not a strict JSON object"));
    let alg = match which {
        Which::P256 => "ES256",
        Which::Rsa => "RS256",
    };
    assert_eq!(
        header.get("alg").and_then(|a| a.as_str()),
        Some(alg),
        "verified a token whose alg is not the key's"
    );
    assert!(
        !header.contains_key("crit"),
        "verified a token with a crit header"
    );
    if let Some(typ) = header.get("typ") {
        assert_eq!(
            typ.as_str(),
            Some("JWT"),
            "verified a token whose typ is not JWT"
        );
    }
    let payload = URL_SAFE_NO_PAD
        .decode(parts[1])
        .ok()
        .and_then(|p| strict_object(&p))
        .unwrap_or_else(|| panic!("verified a token whose payload is not a strict JSON object"));
    assert!(
        matches!(payload.get("resource"), Some(serde_json::Value::String(r)) if !r.is_empty()),
        "verified a token without a string resource"
    );
}
