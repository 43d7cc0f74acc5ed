//! Certificates the test CA's own issuing code will not make, for the hostile corpus: crafted
//! SANs and Subject values (XFCC syntax, escapes, bytes that are not UTF-8 inside a UTF8String),
//! multi-valued RDNs, odd string types and OIDs, any EKU and key usage, unknown critical
//! extensions, other issuers (an untrusted CA, self-signed, a leaf used as a CA, a trusted
//! intermediate) and key types the gateway refuses (P-384, RSA-1024, Ed25519).
//!
//! Each certificate is built field by field and signed with the issuer's P-256 key (the test
//! CA's own key, read from [`CertificateAuthority::key_pem`]), so the test decides every byte of
//! the `TBSCertificate`.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use azgate::pki::{AppCertificate, CertificateAuthority};
use p256::ecdsa::signature::Signer;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use rand_core::{OsRng, RngCore};
use serde::Deserialize;
use x509_cert::Certificate;
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::der::asn1::{BitString, GeneralizedTime, Ia5String, OctetString, SetOfVec};
use x509_cert::der::oid::ObjectIdentifier;
use x509_cert::der::{Any, Decode, DecodePem, Encode, EncodePem, Tag};
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages, SubjectAltName,
};
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::time::{Time, Validity};

use crate::pki::PrivateKey;
use crate::raw::ClientKey;

const OID_ECDSA_SHA256: &str = "1.2.840.10045.4.3.2";
const OID_ED25519: &str = "1.3.101.112";
const OID_EXT_BASIC_CONSTRAINTS: &str = "2.5.29.19";
const OID_EXT_KEY_USAGE: &str = "2.5.29.15";
const OID_EXT_EXTENDED_KEY_USAGE: &str = "2.5.29.37";
const OID_EXT_SUBJECT_ALT_NAME: &str = "2.5.29.17";
/// A private-enterprise OID no verifier knows: marked critical it must fail the chain.
const OID_EXT_UNKNOWN: &str = "1.3.6.1.4.1.55555.1.1";

/// Characters of a PEM escaped when it goes into an XFCC-style `Cert="…"` (as Envoy writes it).
const URL_ESCAPED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Who signs a hostile certificate.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Issuer {
    /// The test CA (the gateways' `client_ca`).
    Ca,
    /// Another CA, self-signed and trusted by nobody.
    OtherCa,
    /// The certificate's own key (needs a P-256 key).
    SelfSigned,
    /// A self-signed CA with exactly the test CA's name but its own key.
    CaLookalike,
    /// An intermediate CA signed by the test CA; the chain sent is [leaf, intermediate].
    Intermediate,
    /// A leaf certificate of the test CA (CA:false) used as an issuer; sent as [leaf, issuer].
    Leaf,
    /// `azgate ca server`'s own code (`pki` `issue_server`): subject CN = the first DNS name,
    /// the DNS SANs, the dev CA's extensions. Subject fields of the spec are ignored.
    DevcaServer,
    /// `azgate ca issue`'s own code (`pki` `issue_app`) with the spec's CN, O and identities.
    DevcaApp,
}

/// Key types of hostile certificates: `p256`, `p384`, `rsa1024`, `rsa2048`, `rsa3072`,
/// `rsa4096`, `ed25519`, optionally with a `:label` so two certificates share (or do not share)
/// a key, e.g. `p256:attacker`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq, Hash)]
#[serde(transparent)]
pub struct KeyChoice(pub String);

impl Default for KeyChoice {
    fn default() -> Self {
        Self("p256".into())
    }
}

/// One Subject attribute: `[type, value]` or `[type, value, string type]`. The type is an alias
/// (`cn`, `o`, `ou`, `c`, `identity`, `allowed`) or a dotted OID; the value takes `\xNN`
/// escapes (raw bytes) and the `$…` placeholders of [`HostilePki::expand`]; the string type is
/// one of [`StringType`].
#[derive(Clone, Debug, Deserialize, PartialEq, Eq, Hash)]
pub struct Attr(pub Vec<String>);

/// How a Subject value is encoded.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "snake_case")]
pub enum StringType {
    /// PrintableString where the value allows it, else UTF8String (what Go and the dev CA write).
    #[default]
    Auto,
    /// UTF8String, whatever the bytes (so invalid UTF-8 can be sent).
    Utf8,
    /// PrintableString, whatever the bytes.
    Printable,
    /// IA5String.
    Ia5,
    /// BMPString (UTF-16BE).
    Bmp,
    /// TeletexString (T61String).
    T61,
    /// VisibleString.
    Visible,
    /// NumericString.
    Numeric,
    /// VideotexString.
    Videotex,
    /// OCTET STRING: not a string at all.
    Octet,
    /// INTEGER 7: not a string at all.
    Integer,
}

fn default_cn() -> Option<String> {
    Some("alice".into())
}
fn default_roles() -> Vec<String> {
    vec!["azure-reader".into()]
}
fn default_identity() -> Option<String> {
    Some("reader".into())
}
fn default_allowed() -> Vec<String> {
    vec!["reader".into()]
}
fn default_eku() -> Option<Vec<String>> {
    Some(vec!["client".into()])
}
fn default_key_usage() -> Option<Vec<String>> {
    Some(vec!["digital_signature".into()])
}
fn default_true() -> bool {
    true
}
fn default_not_before() -> i64 {
    -60
}
fn default_not_after() -> i64 {
    3600
}

/// Everything a hostile certificate may say. Defaults: a good Teleport app certificate for
/// `alice` (role `azure-reader`, identity `reader`) from the test CA, P-256, clientAuth EKU.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct CertSpec {
    /// The signer.
    #[serde(default = "default_issuer")]
    pub issuer: Issuer,
    /// The subject key.
    #[serde(default)]
    pub key: KeyChoice,
    /// CN (`null`: none).
    #[serde(default = "default_cn")]
    pub cn: Option<String>,
    /// One O per role.
    #[serde(default = "default_roles")]
    pub o: Vec<String>,
    /// OID 1.3.9999.1.16: an identity name from the suite, or a literal value.
    #[serde(default = "default_identity")]
    pub identity: Option<String>,
    /// OID 1.3.9999.1.17 values: identity names or literal values.
    #[serde(default = "default_allowed")]
    pub allowed: Vec<String>,
    /// String type of the shorthand attributes above.
    #[serde(default)]
    pub string_type: StringType,
    /// Put every shorthand attribute into one multi-valued RDN.
    #[serde(default)]
    pub multi_valued: bool,
    /// Replaces the whole Subject (shorthands ignored): RDNs, each a list of attributes.
    #[serde(default)]
    pub subject: Option<Vec<Vec<Attr>>>,
    /// RDNs appended after the shorthand attributes.
    #[serde(default)]
    pub extra_rdns: Vec<Vec<Attr>>,
    /// DNS SANs.
    #[serde(default)]
    pub dns: Vec<String>,
    /// URI SANs.
    #[serde(default)]
    pub uri: Vec<String>,
    /// rfc822Name SANs.
    #[serde(default)]
    pub email: Vec<String>,
    /// IP SANs.
    #[serde(default)]
    pub ip: Vec<String>,
    /// Extended key usages (`client`, `server`, `any`, `code`, `email`, `time`, `ocsp` or OIDs);
    /// `null`: no EKU extension; `[]`: an empty one.
    #[serde(default = "default_eku")]
    pub eku: Option<Vec<String>>,
    /// Marks the EKU extension critical.
    #[serde(default)]
    pub eku_critical: bool,
    /// Key usages (`digital_signature`, `key_encipherment`, `key_agreement`, `key_cert_sign`,
    /// `crl_sign`, `non_repudiation`, `data_encipherment`); `null`: no extension.
    #[serde(default = "default_key_usage")]
    pub key_usage: Option<Vec<String>>,
    /// Writes basicConstraints (critical) with this CA flag; `null`: no extension.
    #[serde(default = "default_basic_constraints")]
    pub basic_constraints: Option<bool>,
    /// Adds a critical extension no verifier knows.
    #[serde(default)]
    pub unknown_critical_extension: bool,
    /// Adds a non-critical extension no verifier knows.
    #[serde(default)]
    pub unknown_extension: bool,
    /// Writes the EKU extension twice (RFC 5280 allows each extension once).
    #[serde(default)]
    pub duplicate_extension: bool,
    /// A version 1 certificate: no extensions at all.
    #[serde(default)]
    pub v1: bool,
    /// NotBefore offset from now, seconds.
    #[serde(default = "default_not_before")]
    pub not_before_s: i64,
    /// NotAfter offset from now, seconds.
    #[serde(default = "default_not_after")]
    pub not_after_s: i64,
    /// NotAfter as a GeneralizedTime year (e.g. 9999), overriding `not_after_s`.
    #[serde(default)]
    pub not_after_year: Option<u16>,
    /// Certificates sent after the leaf (and after the issuer's own chain): `test_ca`,
    /// `other_ca`.
    #[serde(default)]
    pub send_extra: Vec<String>,
    /// Include the issuer's chain (intermediate / leaf issuer) in what the client sends.
    #[serde(default = "default_true")]
    pub send_chain: bool,
}

fn default_issuer() -> Issuer {
    Issuer::Ca
}
fn default_basic_constraints() -> Option<bool> {
    Some(false)
}

impl Default for CertSpec {
    fn default() -> Self {
        serde_json::from_str("{}").unwrap_or_else(|_| unreachable!("every field has a default"))
    }
}

/// A key a hostile certificate can carry.
#[derive(Clone)]
pub enum HostileKey {
    /// ECDSA P-256.
    P256(p256::ecdsa::SigningKey),
    /// ECDSA P-384.
    P384(p384::ecdsa::SigningKey),
    /// RSA of any size.
    Rsa(Arc<rsa::RsaPrivateKey>),
    /// Ed25519: PKCS#8 v2 document and public key.
    Ed25519 {
        /// PKCS#8 document (what ring generates).
        pkcs8: Vec<u8>,
        /// The 32-byte public key.
        public: Vec<u8>,
    },
}

impl HostileKey {
    fn generate(kind: &str) -> Result<Self> {
        Ok(match kind {
            "p256" => Self::P256(p256::ecdsa::SigningKey::random(&mut OsRng)),
            "p384" => Self::P384(p384::ecdsa::SigningKey::random(&mut OsRng)),
            "ed25519" => {
                use ring::signature::KeyPair;
                let rng = ring::rand::SystemRandom::new();
                let document = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
                    .map_err(|_| anyhow!("Ed25519 key generation failed"))?;
                let pair = ring::signature::Ed25519KeyPair::from_pkcs8(document.as_ref())
                    .map_err(|_| anyhow!("Ed25519 key unreadable"))?;
                Self::Ed25519 {
                    pkcs8: document.as_ref().to_vec(),
                    public: pair.public_key().as_ref().to_vec(),
                }
            }
            rsa if rsa.starts_with("rsa") => {
                let bits: usize = rsa["rsa".len()..]
                    .parse()
                    .with_context(|| format!("key kind {kind}"))?;
                Self::Rsa(Arc::new(rsa::RsaPrivateKey::new(&mut OsRng, bits)?))
            }
            other => bail!("unknown key kind {other:?}"),
        })
    }

    /// SubjectPublicKeyInfo, DER.
    pub fn spki_der(&self) -> Result<Vec<u8>> {
        Ok(match self {
            Self::P256(k) => k.verifying_key().to_public_key_der()?.into_vec(),
            Self::P384(k) => k.verifying_key().to_public_key_der()?.into_vec(),
            Self::Rsa(k) => k.to_public_key().to_public_key_der()?.into_vec(),
            Self::Ed25519 { public, .. } => {
                let spki = SubjectPublicKeyInfoOwned {
                    algorithm: AlgorithmIdentifierOwned {
                        oid: ObjectIdentifier::from_str(OID_ED25519)?,
                        parameters: None,
                    },
                    subject_public_key: BitString::from_bytes(public)?,
                };
                spki.to_der()?
            }
        })
    }

    /// The key for the TLS client.
    pub fn client_key(&self) -> Result<ClientKey> {
        Ok(match self {
            Self::P256(k) => ClientKey::Pkcs8(k.to_pkcs8_der()?.as_bytes().to_vec()),
            Self::P384(k) => ClientKey::Pkcs8(k.to_pkcs8_der()?.as_bytes().to_vec()),
            Self::Rsa(k) => ClientKey::Rsa(k.clone()),
            Self::Ed25519 { pkcs8, .. } => ClientKey::Pkcs8(pkcs8.clone()),
        })
    }

    /// The key as the JWT minting code knows it (`None` for Ed25519: see [`Self::sign_eddsa`]).
    pub fn jwt_key(&self) -> Option<PrivateKey> {
        match self {
            Self::P256(k) => Some(PrivateKey::P256(k.clone())),
            Self::P384(k) => Some(PrivateKey::P384(k.clone())),
            Self::Rsa(k) => Some(PrivateKey::Rsa(Box::new((**k).clone()))),
            Self::Ed25519 { .. } => None,
        }
    }

    /// An Ed25519 signature (for EdDSA JWTs).
    pub fn sign_eddsa(&self, message: &[u8]) -> Option<Vec<u8>> {
        match self {
            Self::Ed25519 { pkcs8, .. } => {
                let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8).ok()?;
                Some(pair.sign(message).as_ref().to_vec())
            }
            _ => None,
        }
    }
}

/// The key for `choice`, made once per process: keys are expensive (RSA-4096) and need not
/// differ between topologies.
pub fn shared_key(choice: &KeyChoice) -> Result<HostileKey> {
    static KEYS: OnceLock<Mutex<HashMap<String, HostileKey>>> = OnceLock::new();
    let keys = KEYS.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(found) = keys.lock().ok().and_then(|k| k.get(&choice.0).cloned()) {
        return Ok(found);
    }
    let kind = choice.0.split(':').next().unwrap_or_default();
    let made = HostileKey::generate(kind)?;
    if let Ok(mut keys) = keys.lock() {
        return Ok(keys.entry(choice.0.clone()).or_insert(made).clone());
    }
    Ok(made)
}

/// A minted certificate: what the client sends and the key it holds.
#[derive(Clone)]
pub struct Minted {
    /// The leaf first, then whatever else the client sends.
    pub chain_der: Vec<Vec<u8>>,
    /// The leaf, PEM.
    pub cert_pem: String,
    /// The leaf's key.
    pub key: HostileKey,
}

/// A P-256 issuer: name, key and certificate.
#[derive(Clone)]
struct Signer256 {
    name: Name,
    key: p256::ecdsa::SigningKey,
    der: Vec<u8>,
}

/// Mints hostile certificates under one topology's test CA.
pub struct HostilePki {
    authority: CertificateAuthority,
    ca: Signer256,
    identities: HashMap<String, String>,
    other_ca: Signer256,
    lookalike_ca: Signer256,
    intermediate: Signer256,
    leaf_issuer: Signer256,
    minted: Mutex<HashMap<String, Arc<Minted>>>,
    attacker_pem: String,
}

impl HostilePki {
    /// Mints under `authority` (the topology's test CA); identity names resolve through
    /// `identities`.
    pub fn new(
        authority: &CertificateAuthority,
        identities: HashMap<String, String>,
    ) -> Result<Self> {
        let key_pem = authority.key_pem().map_err(|e| anyhow!("CA key: {e}"))?;
        let key = p256::ecdsa::SigningKey::from_pkcs8_pem(&key_pem)
            .map_err(|e| anyhow!("CA key: {e}"))?;
        let cert = Certificate::from_pem(authority.cert_pem().as_bytes())?;
        let ca = Signer256 {
            name: cert.tbs_certificate.subject.clone(),
            key,
            der: cert.to_der()?,
        };
        let other_ca = self_signed_ca("CN=hostile other CA,O=not trusted")?;
        let lookalike_ca = {
            let key = p256::ecdsa::SigningKey::random(&mut OsRng);
            let der = ca_certificate(&ca.name, &ca.name, &key, &key)?;
            Signer256 {
                name: ca.name.clone(),
                key,
                der,
            }
        };
        let intermediate = {
            let key = p256::ecdsa::SigningKey::random(&mut OsRng);
            let name = Name::from_str("CN=hostile intermediate,O=azgate tests")?;
            let der = ca_certificate(&name, &ca.name, &key, &ca.key)?;
            Signer256 { name, key, der }
        };
        let mut pki = Self {
            authority: authority.clone(),
            ca,
            identities,
            other_ca,
            lookalike_ca,
            intermediate,
            leaf_issuer: self_signed_ca("CN=placeholder")?,
            minted: Mutex::new(HashMap::new()),
            attacker_pem: String::new(),
        };
        // A leaf of the test CA (CA:false, clientAuth) whose key then signs other leaves.
        let leaf_key = p256::ecdsa::SigningKey::random(&mut OsRng);
        let leaf_name = Name::from_str("CN=hostile leaf issuer")?;
        let leaf_spec = CertSpec {
            cn: Some("hostile leaf issuer".into()),
            o: vec![],
            identity: None,
            allowed: vec![],
            ..CertSpec::default()
        };
        let leaf_der = pki.tbs_and_sign(
            &leaf_spec,
            leaf_name.clone(),
            &HostileKey::P256(leaf_key.clone()).spki_der()?,
            &pki.ca.clone(),
        )?;
        pki.leaf_issuer = Signer256 {
            name: leaf_name,
            key: leaf_key,
            der: leaf_der,
        };
        pki.attacker_pem = pki.attacker()?.cert_pem.clone();
        Ok(pki)
    }

    /// The attacker's self-signed "admin" certificate, whose PEM the SAN-injection cases
    /// smuggle into XFCC and whose key signs the attacker's JWTs (minted once, then cached).
    pub fn attacker(&self) -> Result<Arc<Minted>> {
        self.mint(&CertSpec {
            issuer: Issuer::SelfSigned,
            key: KeyChoice("p256:attacker".into()),
            cn: Some("mallory".into()),
            o: vec!["azure-admin".into()],
            identity: Some("admin".into()),
            allowed: vec!["admin".into()],
            ..CertSpec::default()
        })
    }

    /// The attacker's self-signed admin certificate, PEM.
    pub fn attacker_pem(&self) -> &str {
        &self.attacker_pem
    }

    /// Replaces the placeholders certificate texts may use: `$attacker_pem_urlenc` (the
    /// attacker's PEM URL-encoded as in XFCC), `$attacker_pem`, `$id:<name>` (a suite identity),
    /// `$repeat:<n>:<char>`.
    pub fn expand(&self, text: &str) -> String {
        let mut out = text
            .replace(
                "$attacker_pem_urlenc",
                &utf8_percent_encode(&self.attacker_pem, URL_ESCAPED).to_string(),
            )
            .replace("$attacker_pem", &self.attacker_pem);
        for (name, id) in &self.identities {
            out = out.replace(&format!("$id:{name}"), id);
        }
        while let Some(start) = out.find("$repeat:") {
            let rest = &out[start + "$repeat:".len()..];
            let Some((count, tail)) = rest.split_once(':') else {
                break;
            };
            let (Ok(count), Some(c)) = (count.parse::<usize>(), tail.chars().next()) else {
                break;
            };
            let end = start + "$repeat:".len() + count.to_string().len() + 1 + c.len_utf8();
            out.replace_range(start..end, &c.to_string().repeat(count));
        }
        out
    }

    /// The certificate `spec` describes, minted once per topology.
    pub fn mint(&self, spec: &CertSpec) -> Result<Arc<Minted>> {
        let cache_key = format!("{spec:?}");
        if let Some(found) = self
            .minted
            .lock()
            .ok()
            .and_then(|m| m.get(&cache_key).cloned())
        {
            return Ok(found);
        }
        let made = Arc::new(self.mint_uncached(spec)?);
        if let Ok(mut minted) = self.minted.lock() {
            minted.insert(cache_key, made.clone());
        }
        Ok(made)
    }

    fn mint_uncached(&self, spec: &CertSpec) -> Result<Minted> {
        let key = shared_key(&spec.key)?;
        let spki_der = key.spki_der()?;
        let mut chain = Vec::new();
        let leaf_der = match spec.issuer {
            Issuer::DevcaServer => {
                let dns: Vec<String> = spec.dns.iter().map(|d| self.expand(d)).collect();
                let names: Vec<&str> = dns.iter().map(String::as_str).collect();
                let pem = self
                    .authority
                    .issue_server(
                        &names,
                        &[],
                        SubjectPublicKeyInfoOwned::from_der(&spki_der)?,
                        at(spec.not_before_s),
                        at(spec.not_after_s),
                    )
                    .map_err(|e| anyhow!("dev CA server certificate: {e}"))?;
                Certificate::from_pem(pem.as_bytes())?.to_der()?
            }
            Issuer::DevcaApp => {
                let pem = self
                    .authority
                    .issue_app(
                        &AppCertificate {
                            user: spec.cn.as_ref().map(|c| self.expand(c)),
                            roles: spec.o.iter().map(|o| self.expand(o)).collect(),
                            selected_identity: spec.identity.as_ref().map(|i| self.identity(i)),
                            allowed_identities: spec
                                .allowed
                                .iter()
                                .map(|i| self.identity(i))
                                .collect(),
                            traits: Default::default(),
                            usage: vec![azgate::pki::USAGE_APPS.into()],
                            app_name: Some("azure-cli".into()),
                            app_cluster: Some("azgate-tests".into()),
                            not_before: at(spec.not_before_s),
                            not_after: at(spec.not_after_s),
                        },
                        SubjectPublicKeyInfoOwned::from_der(&spki_der)?,
                    )
                    .map_err(|e| anyhow!("dev CA app certificate: {e}"))?;
                Certificate::from_pem(pem.as_bytes())?.to_der()?
            }
            issuer => {
                let subject = self.subject(spec)?;
                let signer = match issuer {
                    Issuer::Ca => self.ca.clone(),
                    Issuer::OtherCa => self.other_ca.clone(),
                    Issuer::CaLookalike => self.lookalike_ca.clone(),
                    Issuer::Intermediate => self.intermediate.clone(),
                    Issuer::Leaf => self.leaf_issuer.clone(),
                    Issuer::SelfSigned => {
                        let HostileKey::P256(own) = &key else {
                            bail!("self-signed hostile certificates need a P-256 key");
                        };
                        Signer256 {
                            name: subject.clone(),
                            key: own.clone(),
                            der: Vec::new(),
                        }
                    }
                    Issuer::DevcaServer | Issuer::DevcaApp => {
                        unreachable!("handled above")
                    }
                };
                let der = self.tbs_and_sign(spec, subject, &spki_der, &signer)?;
                if spec.send_chain {
                    match issuer {
                        Issuer::Intermediate => chain.push(self.intermediate.der.clone()),
                        Issuer::Leaf => chain.push(self.leaf_issuer.der.clone()),
                        _ => {}
                    }
                }
                der
            }
        };
        for extra in &spec.send_extra {
            chain.push(match extra.as_str() {
                "test_ca" => self.ca.der.clone(),
                "other_ca" => self.other_ca.der.clone(),
                other => bail!("unknown extra certificate {other:?}"),
            });
        }
        let cert = Certificate::from_der(&leaf_der)?;
        let cert_pem = cert.to_pem(p256::pkcs8::LineEnding::LF)?;
        chain.insert(0, leaf_der);
        Ok(Minted {
            chain_der: chain,
            cert_pem,
            key,
        })
    }

    fn identity(&self, name: &str) -> String {
        self.identities
            .get(name)
            .cloned()
            .unwrap_or_else(|| self.expand(name))
    }

    fn subject(&self, spec: &CertSpec) -> Result<Name> {
        if let Some(rdns) = &spec.subject {
            return rdns
                .iter()
                .map(|rdn| self.rdn(rdn, spec.string_type))
                .collect::<Result<Vec<_>>>()
                .map(RdnSequence);
        }
        let mut attrs: Vec<Attr> = Vec::new();
        let attr = |kind: &str, value: &str| Attr(vec![kind.into(), value.into()]);
        if let Some(cn) = &spec.cn {
            attrs.push(attr("cn", cn));
        }
        for o in &spec.o {
            attrs.push(attr("o", o));
        }
        if let Some(id) = &spec.identity {
            attrs.push(attr("identity", &self.identity(id)));
        }
        for id in &spec.allowed {
            attrs.push(attr("allowed", &self.identity(id)));
        }
        let mut rdns = if spec.multi_valued {
            if attrs.is_empty() {
                Vec::new()
            } else {
                vec![self.rdn(&attrs, spec.string_type)?]
            }
        } else {
            attrs
                .iter()
                .map(|a| self.rdn(std::slice::from_ref(a), spec.string_type))
                .collect::<Result<Vec<_>>>()?
        };
        for extra in &spec.extra_rdns {
            rdns.push(self.rdn(extra, StringType::Auto)?);
        }
        Ok(RdnSequence(rdns))
    }

    fn rdn(&self, attrs: &[Attr], default_type: StringType) -> Result<RelativeDistinguishedName> {
        let mut set = Vec::new();
        for Attr(parts) in attrs {
            let (kind, value) = match parts.as_slice() {
                [kind, value] | [kind, value, _] => (kind, value),
                other => bail!("a subject attribute is [type, value, string type?], not {other:?}"),
            };
            let string_type = match parts.get(2) {
                Some(t) => serde_json::from_value(serde_json::Value::String(t.clone()))
                    .with_context(|| format!("string type {t:?}"))?,
                None => default_type,
            };
            let oid = match kind.as_str() {
                "cn" => "2.5.4.3",
                "o" => "2.5.4.10",
                "ou" => "2.5.4.11",
                "c" => "2.5.4.6",
                "identity" => "1.3.9999.1.16",
                "allowed" => "1.3.9999.1.17",
                dotted => dotted,
            };
            let bytes = crate::raw::unescape(&self.expand(value));
            set.push(AttributeTypeAndValue {
                oid: ObjectIdentifier::from_str(oid).with_context(|| format!("OID {oid}"))?,
                value: encode_string(&bytes, string_type)?,
            });
        }
        Ok(RelativeDistinguishedName(SetOfVec::try_from(set)?))
    }

    fn tbs_and_sign(
        &self,
        spec: &CertSpec,
        subject: Name,
        spki_der: &[u8],
        signer: &Signer256,
    ) -> Result<Vec<u8>> {
        let not_after = match spec.not_after_year {
            Some(year) => Time::GeneralTime(GeneralizedTime::from_date_time(
                x509_cert::der::DateTime::new(year, 12, 31, 23, 59, 59)?,
            )),
            None => time(at(spec.not_after_s))?,
        };
        let mut extensions = Vec::new();
        if let Some(ca) = spec.basic_constraints {
            extensions.push(extension(
                OID_EXT_BASIC_CONSTRAINTS,
                true,
                BasicConstraints {
                    ca,
                    path_len_constraint: None,
                }
                .to_der()?,
            )?);
        }
        if let Some(usages) = &spec.key_usage {
            let mut flags = x509_cert::der::flagset::FlagSet::<KeyUsages>::default();
            for usage in usages {
                flags |= match usage.as_str() {
                    "digital_signature" => KeyUsages::DigitalSignature,
                    "non_repudiation" => KeyUsages::NonRepudiation,
                    "key_encipherment" => KeyUsages::KeyEncipherment,
                    "data_encipherment" => KeyUsages::DataEncipherment,
                    "key_agreement" => KeyUsages::KeyAgreement,
                    "key_cert_sign" => KeyUsages::KeyCertSign,
                    "crl_sign" => KeyUsages::CRLSign,
                    other => bail!("unknown key usage {other:?}"),
                };
            }
            extensions.push(extension(
                OID_EXT_KEY_USAGE,
                true,
                KeyUsage(flags).to_der()?,
            )?);
        }
        if let Some(ekus) = &spec.eku {
            let oids = ekus
                .iter()
                .map(|e| {
                    let oid = match e.as_str() {
                        "server" => "1.3.6.1.5.5.7.3.1",
                        "client" => "1.3.6.1.5.5.7.3.2",
                        "code" => "1.3.6.1.5.5.7.3.3",
                        "email" => "1.3.6.1.5.5.7.3.4",
                        "time" => "1.3.6.1.5.5.7.3.8",
                        "ocsp" => "1.3.6.1.5.5.7.3.9",
                        "any" => "2.5.29.37.0",
                        dotted => dotted,
                    };
                    ObjectIdentifier::from_str(oid).with_context(|| format!("EKU {oid}"))
                })
                .collect::<Result<Vec<_>>>()?;
            let eku = extension(
                OID_EXT_EXTENDED_KEY_USAGE,
                spec.eku_critical,
                ExtendedKeyUsage(oids).to_der()?,
            )?;
            if spec.duplicate_extension {
                extensions.push(eku.clone());
            }
            extensions.push(eku);
        }
        let mut names = Vec::new();
        for dns in &spec.dns {
            names.push(GeneralName::DnsName(ia5(&self.expand(dns))?));
        }
        for uri in &spec.uri {
            names.push(GeneralName::UniformResourceIdentifier(ia5(
                &self.expand(uri)
            )?));
        }
        for email in &spec.email {
            names.push(GeneralName::Rfc822Name(ia5(&self.expand(email))?));
        }
        for ip in &spec.ip {
            let ip: std::net::IpAddr = ip.parse().with_context(|| format!("IP SAN {ip}"))?;
            names.push(GeneralName::from(ip));
        }
        if !names.is_empty() {
            extensions.push(extension(
                OID_EXT_SUBJECT_ALT_NAME,
                false,
                SubjectAltName(names).to_der()?,
            )?);
        }
        if spec.unknown_critical_extension {
            extensions.push(extension(OID_EXT_UNKNOWN, true, vec![0x05, 0x00])?);
        }
        if spec.unknown_extension {
            extensions.push(extension(OID_EXT_UNKNOWN, false, vec![0x05, 0x00])?);
        }
        let tbs = x509_cert::TbsCertificate {
            version: if spec.v1 {
                x509_cert::Version::V1
            } else {
                x509_cert::Version::V3
            },
            serial_number: serial(),
            signature: ecdsa_sha256()?,
            issuer: signer.name.clone(),
            validity: Validity {
                not_before: time(at(spec.not_before_s))?,
                not_after,
            },
            subject,
            subject_public_key_info: SubjectPublicKeyInfoOwned::from_der(spki_der)?,
            issuer_unique_id: None,
            subject_unique_id: None,
            extensions: (!spec.v1 && !extensions.is_empty()).then_some(extensions),
        };
        sign(tbs, &signer.key)
    }
}

fn self_signed_ca(name: &str) -> Result<Signer256> {
    let key = p256::ecdsa::SigningKey::random(&mut OsRng);
    let name = Name::from_str(name)?;
    let der = ca_certificate(&name, &name, &key, &key)?;
    Ok(Signer256 { name, key, der })
}

/// A CA certificate for `subject_key`, issued by `issuer` (signed with `issuer_key`).
fn ca_certificate(
    subject: &Name,
    issuer: &Name,
    subject_key: &p256::ecdsa::SigningKey,
    issuer_key: &p256::ecdsa::SigningKey,
) -> Result<Vec<u8>> {
    let mut usages = x509_cert::der::flagset::FlagSet::<KeyUsages>::default();
    usages |= KeyUsages::KeyCertSign;
    usages |= KeyUsages::CRLSign;
    usages |= KeyUsages::DigitalSignature;
    let tbs = x509_cert::TbsCertificate {
        version: x509_cert::Version::V3,
        serial_number: serial(),
        signature: ecdsa_sha256()?,
        issuer: issuer.clone(),
        validity: Validity {
            not_before: time(at(-3600))?,
            not_after: time(at(86_400))?,
        },
        subject: subject.clone(),
        subject_public_key_info: SubjectPublicKeyInfoOwned::from_der(
            subject_key.verifying_key().to_public_key_der()?.as_bytes(),
        )?,
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: Some(vec![
            extension(
                OID_EXT_BASIC_CONSTRAINTS,
                true,
                BasicConstraints {
                    ca: true,
                    path_len_constraint: None,
                }
                .to_der()?,
            )?,
            extension(OID_EXT_KEY_USAGE, true, KeyUsage(usages).to_der()?)?,
        ]),
    };
    sign(tbs, issuer_key)
}

fn sign(tbs: x509_cert::TbsCertificate, key: &p256::ecdsa::SigningKey) -> Result<Vec<u8>> {
    let tbs_der = tbs.to_der()?;
    let signature: p256::ecdsa::DerSignature = key.sign(&tbs_der);
    let cert = Certificate {
        tbs_certificate: tbs,
        signature_algorithm: ecdsa_sha256()?,
        signature: BitString::from_bytes(signature.as_bytes())?,
    };
    Ok(cert.to_der()?)
}

fn ecdsa_sha256() -> Result<AlgorithmIdentifierOwned> {
    Ok(AlgorithmIdentifierOwned {
        oid: ObjectIdentifier::from_str(OID_ECDSA_SHA256)?,
        parameters: None,
    })
}

fn extension(oid: &str, critical: bool, value: Vec<u8>) -> Result<Extension> {
    Ok(Extension {
        extn_id: ObjectIdentifier::from_str(oid)?,
        critical,
        extn_value: OctetString::new(value)?,
    })
}

fn ia5(text: &str) -> Result<Ia5String> {
    Ia5String::new(text).map_err(|e| anyhow!("{text:?} is not IA5: {e}"))
}

fn encode_string(bytes: &[u8], string_type: StringType) -> Result<Any> {
    let printable = |b: &u8| b.is_ascii_alphanumeric() || b" '()+,-./:=?".contains(b);
    Ok(match string_type {
        StringType::Auto if bytes.iter().all(printable) => Any::new(Tag::PrintableString, bytes)?,
        StringType::Auto | StringType::Utf8 => Any::new(Tag::Utf8String, bytes)?,
        StringType::Printable => Any::new(Tag::PrintableString, bytes)?,
        StringType::Ia5 => Any::new(Tag::Ia5String, bytes)?,
        StringType::T61 => Any::new(Tag::TeletexString, bytes)?,
        StringType::Visible => Any::new(Tag::VisibleString, bytes)?,
        StringType::Numeric => Any::new(Tag::NumericString, bytes)?,
        StringType::Videotex => Any::new(Tag::VideotexString, bytes)?,
        StringType::Octet => Any::new(Tag::OctetString, bytes)?,
        StringType::Integer => Any::new(Tag::Integer, [7u8].as_slice())?,
        StringType::Bmp => {
            let text = String::from_utf8_lossy(bytes);
            let utf16: Vec<u8> = text.encode_utf16().flat_map(u16::to_be_bytes).collect();
            Any::new(Tag::BmpString, utf16)?
        }
    })
}

fn serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    OsRng.fill_bytes(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::new(&bytes).unwrap_or_else(|_| SerialNumber::from(1u32))
}

fn at(offset_s: i64) -> SystemTime {
    let now = SystemTime::now();
    if offset_s >= 0 {
        now + Duration::from_secs(offset_s.unsigned_abs())
    } else {
        now.checked_sub(Duration::from_secs(offset_s.unsigned_abs()))
            .unwrap_or(UNIX_EPOCH)
    }
}

/// UTCTime through 2049 and GeneralizedTime after, as RFC 5280 4.1.2.5 requires.
fn time(at: SystemTime) -> Result<Time> {
    let seconds = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let whole = UNIX_EPOCH + Duration::from_secs(seconds);
    let date = x509_cert::der::DateTime::from_system_time(whole)
        .map_err(|e| anyhow!("certificate time: {e}"))?;
    Ok(if date.year() < 2050 {
        Time::UtcTime(
            x509_cert::der::asn1::UtcTime::from_date_time(date)
                .map_err(|e| anyhow!("certificate time: {e}"))?,
        )
    } else {
        Time::GeneralTime(GeneralizedTime::from_date_time(date))
    })
}
