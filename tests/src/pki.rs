//! A test CA that mints what the tests need at run time: TLS server certificates for the
//! gateway and the fake Azure upstream, and Teleport-format app certificates (CN = user, one O
//! per role, Subject OIDs 1.3.9999.1.16 and .17) with ECDSA P-256, P-384 or RSA keys.
//!
//! Certificates are built and signed by `azgate::pki` (what `azgate ca` uses); this module adds
//! the test-only key kinds (P-384, which azgate refuses), app certificates with other extended
//! key usages than Teleport's ([`Eku`]) and the offsets-from-now interface.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use azgate::pki::{AppCertificate, CertificateAuthority, EKU_CLIENT_AUTH, EKU_SERVER_AUTH};
use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use rand_core::OsRng;
use x509_cert::der::Decode;
use x509_cert::der::asn1::ObjectIdentifier;
use x509_cert::spki::SubjectPublicKeyInfoOwned;

/// Key types for app certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    /// ECDSA P-256 (tsh's default); JWTs are ES256.
    P256,
    /// ECDSA P-384: not accepted by azgate.
    P384,
    /// RSA 2048; JWTs are RS256.
    Rsa,
}

/// A private key able to sign JWTs.
#[derive(Clone)]
pub enum PrivateKey {
    /// P-256.
    P256(p256::ecdsa::SigningKey),
    /// P-384.
    P384(p384::ecdsa::SigningKey),
    /// RSA.
    Rsa(Box<rsa::RsaPrivateKey>),
}

impl PrivateKey {
    /// A fresh key of `kind`.
    pub fn generate(kind: KeyKind) -> Result<Self> {
        Ok(match kind {
            KeyKind::P256 => Self::P256(p256::ecdsa::SigningKey::random(&mut OsRng)),
            KeyKind::P384 => Self::P384(p384::ecdsa::SigningKey::random(&mut OsRng)),
            KeyKind::Rsa => Self::Rsa(Box::new(rsa::RsaPrivateKey::new(&mut OsRng, 2048)?)),
        })
    }

    /// Reads a P-256 (PKCS#8) or RSA (PKCS#1 or PKCS#8) key, as tsh writes them.
    pub fn from_pem(pem: &str) -> Result<Self> {
        use p256::pkcs8::DecodePrivateKey;
        use rsa::pkcs1::DecodeRsaPrivateKey;
        if pem.contains("BEGIN RSA PRIVATE KEY") {
            return Ok(Self::Rsa(Box::new(rsa::RsaPrivateKey::from_pkcs1_pem(
                pem,
            )?)));
        }
        if let Ok(key) = p256::ecdsa::SigningKey::from_pkcs8_pem(pem) {
            return Ok(Self::P256(key));
        }
        Ok(Self::Rsa(Box::new(rsa::RsaPrivateKey::from_pkcs8_pem(
            pem,
        )?)))
    }

    /// PKCS#8 PEM.
    pub fn to_pem(&self) -> Result<String> {
        let pem = match self {
            Self::P256(k) => k.to_pkcs8_pem(LineEnding::LF)?,
            Self::P384(k) => k.to_pkcs8_pem(LineEnding::LF)?,
            Self::Rsa(k) => k.to_pkcs8_pem(LineEnding::LF)?,
        };
        Ok(pem.to_string())
    }

    fn public_key_info(&self) -> Result<SubjectPublicKeyInfoOwned> {
        let der = match self {
            Self::P256(k) => k.verifying_key().to_public_key_der()?,
            Self::P384(k) => k.verifying_key().to_public_key_der()?,
            Self::Rsa(k) => k.to_public_key().to_public_key_der()?,
        };
        Ok(SubjectPublicKeyInfoOwned::from_der(der.as_bytes())?)
    }
}

/// A certificate and its key, both PEM.
#[derive(Clone)]
pub struct Issued {
    /// Certificate PEM.
    pub cert_pem: String,
    /// PKCS#8 key PEM.
    pub key_pem: String,
    /// The key, for signing JWTs.
    pub key: PrivateKey,
}

/// What goes into a Teleport app certificate.
#[derive(Clone, Debug, Default)]
pub struct AppCertSpec {
    /// CN; `None` leaves it out.
    pub user: Option<String>,
    /// O attributes.
    pub roles: Vec<String>,
    /// OID 1.3.9999.1.16.
    pub selected_identity: Option<String>,
    /// OID 1.3.9999.1.17 attributes.
    pub allowed_identities: Vec<String>,
    /// The user's traits (PostalCode JSON).
    pub traits: azgate::pki::Traits,
    /// NotBefore offset from now (negative = past), seconds.
    pub not_before_offset_s: i64,
    /// NotAfter offset from now, seconds.
    pub not_after_offset_s: i64,
}

impl AppCertSpec {
    /// `user` holding `roles`, selecting `identity` (the only one allowed), valid from a minute
    /// ago for an hour: what `tsh apps login --azure-identity` gives a user.
    pub fn user(user: &str, roles: &[&str], identity: &str) -> Self {
        Self {
            user: Some(user.into()),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            selected_identity: Some(identity.into()),
            allowed_identities: vec![identity.into()],
            not_before_offset_s: -60,
            not_after_offset_s: 3600,
            ..Self::default()
        }
    }
}

/// The extended key usages of a test app certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Eku {
    /// serverAuth + clientAuth, as Teleport issues app certificates.
    #[default]
    Teleport,
    /// No extended key usage extension.
    Absent,
    /// serverAuth only (what `azgate ca server` issues).
    ServerAuthOnly,
    /// clientAuth only.
    ClientAuthOnly,
    /// These OIDs, dotted (an empty list writes an empty extension).
    Oids(Vec<String>),
}

impl Eku {
    fn oids(&self) -> Result<Option<Vec<ObjectIdentifier>>> {
        Ok(match self {
            Self::Teleport => Some(vec![EKU_SERVER_AUTH, EKU_CLIENT_AUTH]),
            Self::Absent => None,
            Self::ServerAuthOnly => Some(vec![EKU_SERVER_AUTH]),
            Self::ClientAuthOnly => Some(vec![EKU_CLIENT_AUTH]),
            Self::Oids(oids) => Some(
                oids.iter()
                    .map(|oid| ObjectIdentifier::new(oid))
                    .collect::<Result<_, _>>()
                    .map_err(|e| anyhow::anyhow!("EKU OID: {e}"))?,
            ),
        })
    }
}

/// The test certificate authority: `azgate::pki`'s CA (ECDSA P-256), valid for a day.
pub struct TestCa {
    ca: CertificateAuthority,
    /// The CA certificate, PEM.
    pub cert_pem: String,
}

impl TestCa {
    /// A new self-signed CA valid for a day.
    pub fn new(common_name: &str) -> Result<Self> {
        let ca = CertificateAuthority::generate(common_name, Duration::from_secs(86_400))?;
        Ok(Self {
            cert_pem: ca.cert_pem().to_owned(),
            ca,
        })
    }

    /// The dev CA behind this test CA (to save it where `azgate ca issue` finds it).
    pub fn authority(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// A TLS server certificate for the given DNS names (and 127.0.0.1).
    pub fn server(&self, dns_names: &[&str]) -> Result<Issued> {
        let key = PrivateKey::generate(KeyKind::P256)?;
        let now = SystemTime::now();
        let cert_pem = self.ca.issue_server(
            dns_names,
            &[IpAddr::from([127, 0, 0, 1])],
            key.public_key_info()?,
            now - Duration::from_secs(3600),
            now + Duration::from_secs(86_400),
        )?;
        issued(cert_pem, key)
    }

    /// A Teleport-format app certificate (Teleport's extended key usages).
    pub fn app(&self, spec: &AppCertSpec, kind: KeyKind) -> Result<Issued> {
        self.app_with_eku(spec, kind, &Eku::Teleport)
    }

    /// A Teleport-format app certificate with the extended key usages `eku`.
    pub fn app_with_eku(&self, spec: &AppCertSpec, kind: KeyKind, eku: &Eku) -> Result<Issued> {
        let key = PrivateKey::generate(kind)?;
        let eku = eku.oids()?;
        let cert_pem = self.ca.issue_app_with_eku(
            &AppCertificate {
                user: spec.user.clone(),
                roles: spec.roles.clone(),
                selected_identity: spec.selected_identity.clone(),
                allowed_identities: spec.allowed_identities.clone(),
                traits: spec.traits.clone(),
                usage: vec![azgate::pki::USAGE_APPS.into()],
                app_name: Some("azure-cli".into()),
                app_cluster: Some("azgate-tests".into()),
                not_before: at(spec.not_before_offset_s),
                not_after: at(spec.not_after_offset_s),
            },
            key.public_key_info()?,
            eku.as_deref(),
        )?;
        issued(cert_pem, key)
    }
}

fn issued(cert_pem: String, key: PrivateKey) -> Result<Issued> {
    Ok(Issued {
        cert_pem,
        key_pem: key.to_pem()?,
        key,
    })
}

fn at(offset_s: i64) -> SystemTime {
    let now = SystemTime::now();
    if offset_s >= 0 {
        now + Duration::from_secs(offset_s.unsigned_abs())
    } else {
        now - Duration::from_secs(offset_s.unsigned_abs())
    }
}
