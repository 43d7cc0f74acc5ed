//! A test CA that mints what the tests need at run time: TLS server certificates for the
//! gateway and the fake Azure upstream, and Teleport-format app certificates (CN = user, one O
//! per role, Subject OIDs 1.3.9999.1.16 and .17) with ECDSA P-256, P-384 or RSA keys.

use std::str::FromStr;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use der::asn1::{Ia5String, OctetString, PrintableStringRef, SetOfVec, Utf8StringRef};
use der::{Any, EncodePem};
use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use rand_core::OsRng;
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::builder::{Builder, CertificateBuilder, Profile};
use x509_cert::der;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::time::{Time, Validity};

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
        Ok(SubjectPublicKeyInfoOwned::try_from(der.as_bytes())?)
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
    /// NotBefore offset from now (negative = past), seconds.
    pub not_before_offset_s: i64,
    /// NotAfter offset from now, seconds.
    pub not_after_offset_s: i64,
}

/// The test certificate authority (ECDSA P-256).
pub struct TestCa {
    key: p256::ecdsa::SigningKey,
    name: Name,
    /// The CA certificate, PEM.
    pub cert_pem: String,
}

const OID_AZURE_IDENTITY: &str = "1.3.9999.1.16";
const OID_AZURE_IDENTITIES: &str = "1.3.9999.1.17";

impl TestCa {
    /// A new self-signed CA valid for a day.
    pub fn new(common_name: &str) -> Result<Self> {
        let key = p256::ecdsa::SigningKey::random(&mut OsRng);
        let name = Name::from_str(&format!("CN={common_name},O=azgate tests"))?;
        let spki = PrivateKey::P256(key.clone()).public_key_info()?;
        let builder = CertificateBuilder::new(
            Profile::Root,
            serial(),
            validity(-3600, 86_400)?,
            name.clone(),
            spki,
            &key,
        )?;
        let cert = builder.build::<p256::ecdsa::DerSignature>()?;
        Ok(Self {
            key,
            name,
            cert_pem: cert.to_pem(LineEnding::LF)?,
        })
    }

    /// A TLS server certificate for the given DNS names (and 127.0.0.1).
    pub fn server(&self, dns_names: &[&str]) -> Result<Issued> {
        let key = PrivateKey::generate(KeyKind::P256)?;
        let subject = Name::from_str(&format!("CN={}", dns_names.first().unwrap_or(&"localhost")))?;
        let mut builder = CertificateBuilder::new(
            Profile::Leaf {
                issuer: self.name.clone(),
                enable_key_agreement: false,
                enable_key_encipherment: false,
            },
            serial(),
            validity(-3600, 86_400)?,
            subject,
            key.public_key_info()?,
            &self.key,
        )?;
        let mut names = Vec::new();
        for dns in dns_names {
            names.push(GeneralName::DnsName(Ia5String::new(dns)?));
        }
        names.push(GeneralName::IpAddress(OctetString::new([127u8, 0, 0, 1])?));
        builder.add_extension(&SubjectAltName(names))?;
        self.finish(builder, key)
    }

    /// A Teleport-format app certificate.
    pub fn app(&self, spec: &AppCertSpec, kind: KeyKind) -> Result<Issued> {
        let key = PrivateKey::generate(kind)?;
        let mut rdns = Vec::new();
        if let Some(user) = &spec.user {
            rdns.push(rdn("2.5.4.3", user)?);
        }
        for role in &spec.roles {
            rdns.push(rdn("2.5.4.10", role)?);
        }
        if let Some(id) = &spec.selected_identity {
            rdns.push(rdn(OID_AZURE_IDENTITY, id)?);
        }
        for id in &spec.allowed_identities {
            rdns.push(rdn(OID_AZURE_IDENTITIES, id)?);
        }
        let builder = CertificateBuilder::new(
            Profile::Leaf {
                issuer: self.name.clone(),
                enable_key_agreement: false,
                enable_key_encipherment: false,
            },
            serial(),
            validity(spec.not_before_offset_s, spec.not_after_offset_s)?,
            RdnSequence(rdns),
            key.public_key_info()?,
            &self.key,
        )?;
        self.finish(builder, key)
    }

    fn finish(
        &self,
        builder: CertificateBuilder<'_, p256::ecdsa::SigningKey>,
        key: PrivateKey,
    ) -> Result<Issued> {
        let cert = builder.build::<p256::ecdsa::DerSignature>()?;
        Ok(Issued {
            cert_pem: cert.to_pem(LineEnding::LF)?,
            key_pem: key.to_pem()?,
            key,
        })
    }
}

/// One attribute per RDN, as Go's pkix writes repeated attributes. PrintableString where the
/// value allows it (as Go does), UTF8String otherwise.
fn rdn(oid: &str, value: &str) -> Result<RelativeDistinguishedName> {
    let value = match PrintableStringRef::new(value) {
        Ok(printable) => Any::from(printable),
        Err(_) => Any::from(Utf8StringRef::new(value)?),
    };
    let attr = AttributeTypeAndValue {
        oid: oid.parse().context("attribute OID")?,
        value,
    };
    Ok(RelativeDistinguishedName(SetOfVec::try_from(vec![attr])?))
}

fn serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut OsRng, &mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::new(&bytes).unwrap_or_else(|_| SerialNumber::from(1u32))
}

fn validity(not_before_offset_s: i64, not_after_offset_s: i64) -> Result<Validity> {
    let at = |offset: i64| -> Result<Time> {
        let now = SystemTime::now();
        let t = if offset >= 0 {
            now + Duration::from_secs(offset as u64)
        } else {
            now - Duration::from_secs(offset.unsigned_abs())
        };
        Ok(Time::try_from(t)?)
    };
    Ok(Validity {
        not_before: at(not_before_offset_s)?,
        not_after: at(not_after_offset_s)?,
    })
}
