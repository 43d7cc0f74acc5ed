//! A local certificate authority for Teleport-format app certificates (`azgate ca ...`), for
//! demos, tests and clusters without Teleport.
//!
//! An app certificate carries the caller's identity in its Subject, as Teleport's
//! `lib/tlsca/ca.go` writes it and Go's `crypto/x509/pkix` encodes it: PostalCode = the user's
//! traits as JSON, the roles as one multi-valued O RDN, the usages (`usage:apps`) as one
//! multi-valued OU RDN, CN = user, then one RDN per Teleport attribute: OID 1.3.9999.1.5 / 1.10
//! = the app's cluster and name, 1.3.9999.1.16 = the selected Azure identity and one
//! 1.3.9999.1.17 per identity the user may assume. The allowed identities are computed from the
//! role files and the traits as Teleport does when it issues the certificate (allow minus deny,
//! templates expanded, [`RoleSet::allowed_identities`]), and the selected one is chosen by
//! [`select_identity`] with `tsh apps login --azure-identity`'s rules.
//!
//! The CA itself is ECDSA P-256 (`ca.crt`, `ca.key` in its directory). It also issues the TLS
//! server certificates of a dev gateway and of the workstation proxy's local TLS terminator.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use azgate_filter::config::parse_roles;
use azgate_filter::policy::RoleSet;
pub use azgate_filter::template::Traits;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rand_core::{OsRng, RngCore};
use rsa::pkcs1::DecodeRsaPrivateKey;
use sha2::{Digest, Sha256};
use x509_cert::builder::{Builder, CertificateBuilder, Profile};
use x509_cert::certificate::{TbsCertificate, Version};
use x509_cert::der::asn1::{
    Ia5String, ObjectIdentifier, OctetString, PrintableStringRef, SetOfVec, Utf8StringRef,
};
use x509_cert::der::{Any, Decode, DecodePem, Encode, EncodePem};
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::time::{Time, Validity};
use x509_cert::{Certificate, attr::AttributeTypeAndValue};

/// Teleport's Subject attribute for the selected Azure identity.
pub const OID_AZURE_IDENTITY: &str = "1.3.9999.1.16";
/// Teleport's Subject attribute for each allowed Azure identity.
pub const OID_AZURE_IDENTITIES: &str = "1.3.9999.1.17";
/// RouteToApp's cluster name.
pub const OID_APP_CLUSTER: &str = "1.3.9999.1.5";
/// RouteToApp's app name.
pub const OID_APP_NAME: &str = "1.3.9999.1.10";
/// The usage Teleport writes in app certificates (OU).
pub const USAGE_APPS: &str = "usage:apps";
/// The CA certificate's file name in the CA directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// The CA key's file name in the CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// Extended key usage serverAuth (RFC 5280).
pub const EKU_SERVER_AUTH: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.1");
/// Extended key usage clientAuth (RFC 5280): what the gateway requires of a client certificate.
pub const EKU_CLIENT_AUTH: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.2");
/// Teleport backdates certificates by a minute for clock skew; so does the dev CA.
const BACKDATE: Duration = Duration::from_secs(60);

/// What went wrong in the dev CA.
#[derive(Debug)]
#[non_exhaustive]
pub enum DevCaError {
    /// A file could not be read or written.
    Io(PathBuf, std::io::Error),
    /// Bad input: a role file, a flag value, a key or certificate.
    Invalid(String),
    /// Identity selection failed (none allowed, several and none chosen, no match, ambiguous).
    Selection(String),
    /// Building or signing a certificate failed.
    Certificate(String),
}

impl fmt::Display for DevCaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(path, error) => write!(f, "{}: {error}", path.display()),
            Self::Invalid(message) | Self::Selection(message) | Self::Certificate(message) => {
                f.write_str(message)
            }
        }
    }
}

impl std::error::Error for DevCaError {}

fn cert_error(error: impl fmt::Display) -> DevCaError {
    DevCaError::Certificate(error.to_string())
}

// === impl KeyKind ===

/// Key types of app certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA P-256 (tsh's default); JWTs are ES256.
    P256,
    /// RSA 2048; JWTs are RS256.
    Rsa,
}

impl FromStr for KeyKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "ecdsa" | "p256" | "ecdsa-p256" => Ok(Self::P256),
            "rsa" | "rsa2048" => Ok(Self::Rsa),
            _ => Err(format!("unknown key type {s:?}: use ecdsa (P-256) or rsa")),
        }
    }
}

// === impl AppKey ===

/// The private key of an app certificate: it signs the JWTs that prove possession.
/// `Debug` never shows key material.
#[derive(Clone)]
pub enum AppKey {
    /// ECDSA P-256.
    P256(p256::ecdsa::SigningKey),
    /// RSA.
    Rsa(Box<rsa::RsaPrivateKey>),
}

impl fmt::Debug for AppKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::P256(_) => f.write_str("AppKey::P256(...)"),
            Self::Rsa(_) => f.write_str("AppKey::Rsa(...)"),
        }
    }
}

impl AppKey {
    /// A fresh key.
    pub fn generate(kind: KeyKind) -> Result<Self, DevCaError> {
        Ok(match kind {
            KeyKind::P256 => Self::P256(p256::ecdsa::SigningKey::random(&mut OsRng)),
            KeyKind::Rsa => Self::Rsa(Box::new(
                rsa::RsaPrivateKey::new(&mut OsRng, 2048).map_err(cert_error)?,
            )),
        })
    }

    /// Reads a PEM key: PKCS#8 (`PRIVATE KEY`), SEC1 (`EC PRIVATE KEY`, P-256) or PKCS#1
    /// (`RSA PRIVATE KEY`), the forms tsh and openssl write.
    pub fn from_pem(pem: &str) -> Result<Self, DevCaError> {
        let unsupported = || {
            DevCaError::Invalid("the key is not an ECDSA P-256 or RSA private key in PEM".into())
        };
        if pem.contains("-----BEGIN EC PRIVATE KEY-----") {
            let secret = p256::SecretKey::from_sec1_pem(pem).map_err(|_| unsupported())?;
            return Ok(Self::P256(secret.into()));
        }
        if pem.contains("-----BEGIN RSA PRIVATE KEY-----") {
            let key = rsa::RsaPrivateKey::from_pkcs1_pem(pem).map_err(|_| unsupported())?;
            return Self::rsa(key);
        }
        if let Ok(key) = p256::ecdsa::SigningKey::from_pkcs8_pem(pem) {
            return Ok(Self::P256(key));
        }
        match rsa::RsaPrivateKey::from_pkcs8_pem(pem) {
            Ok(key) => Self::rsa(key),
            Err(_) => Err(unsupported()),
        }
    }

    fn rsa(key: rsa::RsaPrivateKey) -> Result<Self, DevCaError> {
        use rsa::traits::PublicKeyParts;
        if key.size() * 8 < 2048 {
            return Err(DevCaError::Invalid(
                "RSA keys must have at least 2048 bits".into(),
            ));
        }
        Ok(Self::Rsa(Box::new(key)))
    }

    /// PKCS#8 PEM.
    pub fn to_pem(&self) -> Result<String, DevCaError> {
        let pem = match self {
            Self::P256(key) => key.to_pkcs8_pem(LineEnding::LF),
            Self::Rsa(key) => key.to_pkcs8_pem(LineEnding::LF),
        }
        .map_err(cert_error)?;
        Ok(pem.to_string())
    }

    /// The SubjectPublicKeyInfo, DER.
    pub fn public_key_der(&self) -> Result<Vec<u8>, DevCaError> {
        let der = match self {
            Self::P256(key) => key.verifying_key().to_public_key_der(),
            Self::Rsa(key) => key.to_public_key().to_public_key_der(),
        }
        .map_err(cert_error)?;
        Ok(der.into_vec())
    }

    /// The SubjectPublicKeyInfo, for a certificate builder.
    pub fn public_key_info(&self) -> Result<SubjectPublicKeyInfoOwned, DevCaError> {
        SubjectPublicKeyInfoOwned::from_der(&self.public_key_der()?).map_err(cert_error)
    }

    /// The JWS algorithm of this key: ES256 or RS256.
    pub fn jwt_alg(&self) -> &'static str {
        match self {
            Self::P256(_) => "ES256",
            Self::Rsa(_) => "RS256",
        }
    }

    /// The JWS signature over `message`: r‖s for ES256, PKCS#1 v1.5 SHA-256 for RS256.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, DevCaError> {
        match self {
            Self::P256(key) => {
                use p256::ecdsa::signature::Signer;
                let signature: p256::ecdsa::Signature = key.sign(message);
                Ok(signature.to_bytes().to_vec())
            }
            Self::Rsa(key) => key
                .sign(rsa::Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(message))
                .map_err(cert_error),
        }
    }

    /// Fails unless `cert_pem`'s public key is this key's.
    pub fn check_matches(&self, cert_pem: &str) -> Result<(), DevCaError> {
        let cert = Certificate::from_pem(cert_pem.as_bytes())
            .map_err(|e| DevCaError::Invalid(format!("the certificate cannot be parsed ({e})")))?;
        let spki = cert
            .tbs_certificate
            .subject_public_key_info
            .to_der()
            .map_err(cert_error)?;
        if spki != self.public_key_der()? {
            return Err(DevCaError::Invalid(
                "the key does not belong to the certificate".into(),
            ));
        }
        Ok(())
    }
}

// === impl AppCertificate ===

/// What goes into a Teleport app certificate.
#[derive(Clone, Debug)]
pub struct AppCertificate {
    /// CN; `None` leaves it out (tests of the gateway's refusals only).
    pub user: Option<String>,
    /// One O attribute each.
    pub roles: Vec<String>,
    /// OID 1.3.9999.1.16.
    pub selected_identity: Option<String>,
    /// One OID 1.3.9999.1.17 attribute each.
    pub allowed_identities: Vec<String>,
    /// The user's traits: PostalCode, as JSON (Teleport always writes it, `{}` when empty).
    pub traits: Traits,
    /// OU values; Teleport app certificates carry `usage:apps`.
    pub usage: Vec<String>,
    /// OID 1.3.9999.1.10: the app the certificate routes to.
    pub app_name: Option<String>,
    /// OID 1.3.9999.1.5: the cluster of that app.
    pub app_cluster: Option<String>,
    /// NotBefore.
    pub not_before: SystemTime,
    /// NotAfter.
    pub not_after: SystemTime,
}

// === impl CertificateAuthority ===

/// The dev CA: an ECDSA P-256 key and its self-signed certificate. `Debug` hides the key.
#[derive(Clone)]
pub struct CertificateAuthority {
    key: p256::ecdsa::SigningKey,
    name: Name,
    cert_pem: String,
    not_after: SystemTime,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("name", &self.name.to_string())
            .field("key", &"...")
            .finish()
    }
}

impl CertificateAuthority {
    /// A new self-signed CA named `CN=<common_name>`, valid from now (less a minute) for
    /// `lifetime`.
    pub fn generate(common_name: &str, lifetime: Duration) -> Result<Self, DevCaError> {
        let key = p256::ecdsa::SigningKey::random(&mut OsRng);
        let name = Name::from_str(&format!("CN={},O=azgate dev CA", escape_dn(common_name)))
            .map_err(|e| DevCaError::Invalid(format!("CA name: {e}")))?;
        let spki = AppKey::P256(key.clone()).public_key_info()?;
        let now = SystemTime::now();
        let not_after = now + lifetime;
        let builder = CertificateBuilder::new(
            Profile::Root,
            serial(),
            validity(now - BACKDATE, not_after)?,
            name.clone(),
            spki,
            &key,
        )
        .map_err(cert_error)?;
        let cert = builder
            .build::<p256::ecdsa::DerSignature>()
            .map_err(cert_error)?;
        Ok(Self {
            cert_pem: cert.to_pem(LineEnding::LF).map_err(cert_error)?,
            key,
            name,
            not_after,
        })
    }

    /// A CA from its certificate and PKCS#8 (or SEC1) P-256 key, both PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, DevCaError> {
        let AppKey::P256(key) = AppKey::from_pem(key_pem)? else {
            return Err(DevCaError::Invalid("the CA key must be ECDSA P-256".into()));
        };
        AppKey::P256(key.clone()).check_matches(cert_pem)?;
        let cert = Certificate::from_pem(cert_pem.as_bytes()).map_err(|e| {
            DevCaError::Invalid(format!("the CA certificate cannot be parsed ({e})"))
        })?;
        let validity = &cert.tbs_certificate.validity;
        Ok(Self {
            name: cert.tbs_certificate.subject.clone(),
            not_after: validity.not_after.to_system_time(),
            cert_pem: cert_pem.to_owned(),
            key,
        })
    }

    /// Loads `dir/ca.crt` and `dir/ca.key`.
    pub fn load(dir: &Path) -> Result<Self, DevCaError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| DevCaError::Io(path, e))
        };
        Self::from_pem(&read(CA_CERT_FILE)?, &read(CA_KEY_FILE)?)
    }

    /// Writes `dir/ca.crt` and `dir/ca.key` (mode 0600), creating `dir` (mode 0700). Refuses to
    /// overwrite an existing CA.
    pub fn save(&self, dir: &Path) -> Result<(), DevCaError> {
        create_private_dir(dir)?;
        for name in [CA_CERT_FILE, CA_KEY_FILE] {
            let path = dir.join(name);
            if path.exists() {
                return Err(DevCaError::Invalid(format!(
                    "{} exists: a CA is already initialised there",
                    path.display()
                )));
            }
        }
        write_file(&dir.join(CA_CERT_FILE), &self.cert_pem, false)?;
        write_file(&dir.join(CA_KEY_FILE), &self.key_pem()?, true)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA key, PKCS#8 PEM.
    pub fn key_pem(&self) -> Result<String, DevCaError> {
        AppKey::P256(self.key.clone()).to_pem()
    }

    /// When the CA certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Issues a Teleport-format app certificate for the public key `spki`; returns its PEM.
    /// Its extensions are Teleport's: EKU serverAuth + clientAuth, key usage
    /// digitalSignature|keyEncipherment (critical), CA:FALSE, no SAN.
    pub fn issue_app(
        &self,
        spec: &AppCertificate,
        spki: SubjectPublicKeyInfoOwned,
    ) -> Result<String, DevCaError> {
        self.issue_app_with_eku(spec, spki, Some(&[EKU_SERVER_AUTH, EKU_CLIENT_AUTH]))
    }

    /// [`Self::issue_app`] with other extended key usages: `None` leaves the extension out
    /// (for tests of the gateway's refusals; a Teleport certificate always has it).
    pub fn issue_app_with_eku(
        &self,
        spec: &AppCertificate,
        spki: SubjectPublicKeyInfoOwned,
        eku: Option<&[ObjectIdentifier]>,
    ) -> Result<String, DevCaError> {
        // Go's `pkix.Name.ToRDNSequence` order: PostalCode, O, OU, CN, then the extra names.
        let traits = serde_json::to_string(&spec.traits)
            .map_err(|e| DevCaError::Invalid(format!("traits: {e}")))?;
        let mut rdns = vec![multi_valued_rdn("2.5.4.17", &[traits])?];
        if !spec.roles.is_empty() {
            rdns.push(multi_valued_rdn("2.5.4.10", &spec.roles)?);
        }
        if !spec.usage.is_empty() {
            rdns.push(multi_valued_rdn("2.5.4.11", &spec.usage)?);
        }
        if let Some(user) = &spec.user {
            rdns.push(rdn("2.5.4.3", user)?);
        }
        if let Some(cluster) = &spec.app_cluster {
            rdns.push(rdn(OID_APP_CLUSTER, cluster)?);
        }
        if let Some(app) = &spec.app_name {
            rdns.push(rdn(OID_APP_NAME, app)?);
        }
        if let Some(id) = &spec.selected_identity {
            rdns.push(rdn(OID_AZURE_IDENTITY, id)?);
        }
        for id in &spec.allowed_identities {
            rdns.push(rdn(OID_AZURE_IDENTITIES, id)?);
        }
        self.issue_leaf(
            RdnSequence(rdns),
            spki,
            validity(spec.not_before, spec.not_after)?,
            eku,
            None,
        )
    }

    /// Issues a TLS server certificate for `dns_names` (the first is also the CN) and
    /// `ip_addresses`, valid between `not_before` and `not_after`. Its only EKU is serverAuth,
    /// so it is no client certificate for the gateway (which requires clientAuth).
    pub fn issue_server(
        &self,
        dns_names: &[&str],
        ip_addresses: &[std::net::IpAddr],
        spki: SubjectPublicKeyInfoOwned,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<String, DevCaError> {
        let common_name = dns_names.first().copied().unwrap_or("localhost");
        let subject = Name::from_str(&format!("CN={}", escape_dn(common_name)))
            .map_err(|e| DevCaError::Invalid(format!("server name {common_name:?}: {e}")))?;
        let mut names = Vec::new();
        for dns in dns_names {
            let name = Ia5String::new(dns)
                .map_err(|_| DevCaError::Invalid(format!("{dns:?} is not a DNS name")))?;
            names.push(GeneralName::DnsName(name));
        }
        for ip in ip_addresses {
            let octets = match ip {
                std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
                std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
            };
            names.push(GeneralName::IpAddress(
                OctetString::new(octets).map_err(cert_error)?,
            ));
        }
        self.issue_leaf(
            subject,
            spki,
            validity(not_before, not_after)?,
            Some(&[EKU_SERVER_AUTH]),
            Some(SubjectAltName(names)),
        )
    }

    /// Builds and signs an end-entity certificate with the extensions Go's `x509` writes for
    /// Teleport: authority key id, CA:FALSE and key usage digitalSignature|keyEncipherment
    /// (both critical), the EKU (when given, non-critical) and the SAN (when given). The TBS is
    /// assembled here rather than with `CertificateBuilder`, whose leaf profile always adds
    /// nonRepudiation.
    fn issue_leaf(
        &self,
        subject: Name,
        spki: SubjectPublicKeyInfoOwned,
        validity: Validity,
        eku: Option<&[ObjectIdentifier]>,
        san: Option<SubjectAltName>,
    ) -> Result<String, DevCaError> {
        use p256::ecdsa::signature::Signer;
        use x509_cert::der::oid::AssociatedOid;
        use x509_cert::der::referenced::OwnedToRef;
        use x509_cert::ext::pkix::{
            AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages,
        };
        use x509_cert::ext::{AsExtension, Extension};
        use x509_cert::spki::{DynSignatureAlgorithmIdentifier, SignatureBitStringEncoding};

        let issuer_spki = AppKey::P256(self.key.clone()).public_key_info()?;
        let mut extensions = Vec::new();
        extensions.push(
            AuthorityKeyIdentifier::try_from(issuer_spki.owned_to_ref())
                .map_err(cert_error)?
                .to_extension(&subject, &extensions)
                .map_err(cert_error)?,
        );
        extensions.push(
            BasicConstraints {
                ca: false,
                path_len_constraint: None,
            }
            .to_extension(&subject, &extensions)
            .map_err(cert_error)?,
        );
        extensions.push(
            KeyUsage(KeyUsages::DigitalSignature | KeyUsages::KeyEncipherment)
                .to_extension(&subject, &extensions)
                .map_err(cert_error)?,
        );
        if let Some(eku) = eku {
            // Non-critical as Go writes it (x509-cert would mark it critical).
            extensions.push(Extension {
                extn_id: ExtendedKeyUsage::OID,
                critical: false,
                extn_value: OctetString::new(
                    ExtendedKeyUsage(eku.to_vec())
                        .to_der()
                        .map_err(cert_error)?,
                )
                .map_err(cert_error)?,
            });
        }
        if let Some(san) = san {
            extensions.push(
                san.to_extension(&subject, &extensions)
                    .map_err(cert_error)?,
            );
        }
        let signature_algorithm = self
            .key
            .signature_algorithm_identifier()
            .map_err(cert_error)?;
        let tbs_certificate = TbsCertificate {
            version: Version::V3,
            serial_number: serial(),
            signature: signature_algorithm.clone(),
            issuer: self.name.clone(),
            validity,
            subject,
            subject_public_key_info: spki,
            issuer_unique_id: None,
            subject_unique_id: None,
            extensions: Some(extensions),
        };
        let tbs_der = tbs_certificate.to_der().map_err(cert_error)?;
        let signature: p256::ecdsa::DerSignature =
            self.key.try_sign(&tbs_der).map_err(cert_error)?;
        let cert = Certificate {
            tbs_certificate,
            signature_algorithm,
            signature: signature.to_bitstring().map_err(cert_error)?,
        };
        cert.to_pem(LineEnding::LF).map_err(cert_error)
    }
}

/// Escapes the characters RFC 4514 gives meaning to, so a name is one RDN value.
fn escape_dn(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=' | '#') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// An RDN of one attribute, as Go writes each extra name.
fn rdn(oid: &str, value: &str) -> Result<RelativeDistinguishedName, DevCaError> {
    multi_valued_rdn(oid, &[value.to_string()])
}

/// One RDN holding every value of a standard attribute, as Go's pkix writes them (a SET, in DER
/// order; repeated values once).
fn multi_valued_rdn(oid: &str, values: &[String]) -> Result<RelativeDistinguishedName, DevCaError> {
    let mut attributes = Vec::new();
    for value in values {
        let attribute = attribute(oid, value)?;
        if !attributes.contains(&attribute) {
            attributes.push(attribute);
        }
    }
    Ok(RelativeDistinguishedName(
        SetOfVec::try_from(attributes).map_err(cert_error)?,
    ))
}

/// PrintableString where the value allows it (as Go does), UTF8String otherwise.
fn attribute(oid: &str, value: &str) -> Result<AttributeTypeAndValue, DevCaError> {
    let value = match PrintableStringRef::new(value) {
        Ok(printable) => Any::from(printable),
        Err(_) => Any::from(
            Utf8StringRef::new(value)
                .map_err(|e| DevCaError::Invalid(format!("subject value {value:?}: {e}")))?,
        ),
    };
    Ok(AttributeTypeAndValue {
        oid: oid
            .parse()
            .map_err(|e| DevCaError::Invalid(format!("OID {oid}: {e}")))?,
        value,
    })
}

fn serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    OsRng.fill_bytes(&mut bytes);
    // Positive and without a leading zero byte.
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::new(&bytes).unwrap_or_else(|_| SerialNumber::from(1u32))
}

fn validity(not_before: SystemTime, not_after: SystemTime) -> Result<Validity, DevCaError> {
    if not_after <= not_before {
        return Err(DevCaError::Invalid(
            "the certificate would expire before it becomes valid".into(),
        ));
    }
    let time = |at: SystemTime| Time::try_from(at).map_err(cert_error);
    Ok(Validity {
        not_before: time(not_before)?,
        not_after: time(not_after)?,
    })
}

// === roles and identity selection ===

/// Reads Teleport role files the way `azgate serve` reads its `filter.role_files`
/// ([`crate::config::teleport::read_role_file`], which validates each file with the filter's own rules and
/// names it in errors), then the roles of all files together (a name defined in two files), so
/// the dev CA and the gateway agree on every role.
pub fn load_roles(paths: &[PathBuf]) -> Result<RoleSet, DevCaError> {
    let mut all = Vec::new();
    for path in paths {
        let roles = crate::config::teleport::read_role_file(path)
            .map_err(|e| DevCaError::Invalid(e.to_string()))?;
        if roles.is_empty() {
            return Err(DevCaError::Invalid(format!(
                "{}: no roles in the file",
                path.display()
            )));
        }
        all.extend(roles);
    }
    parse_roles(all).map_err(|e| DevCaError::Invalid(format!("role files: {e}")))
}

/// The identities `user_roles` allow a user with `traits` (templates expanded), refusing role
/// names the role files do not define (Teleport refuses to issue for a role that does not exist).
pub fn allowed_identities(
    roles: &RoleSet,
    user_roles: &[String],
    traits: &Traits,
) -> Result<Vec<String>, DevCaError> {
    if user_roles.is_empty() {
        return Err(DevCaError::Invalid("--roles names no role".into()));
    }
    if let Some(unknown) = user_roles.iter().find(|name| roles.role(name).is_none()) {
        return Err(DevCaError::Invalid(format!(
            "role {unknown:?} is not defined in the role files"
        )));
    }
    Ok(roles.allowed_identities(user_roles, traits))
}

/// Chooses the identity for the certificate as `tsh apps login --azure-identity` does: with no
/// choice, the only allowed identity; otherwise a case-insensitive match on the full resource
/// ID, else on the name after `/Microsoft.ManagedIdentity/userAssignedIdentities/`.
pub fn select_identity(allowed: &[String], wanted: Option<&str>) -> Result<String, DevCaError> {
    let listing = |ids: &[String]| ids.iter().map(|id| format!("\n  {id}")).collect::<String>();
    if allowed.is_empty() {
        return Err(DevCaError::Selection(
            "no Azure identities available: the roles allow none (or deny them all)".into(),
        ));
    }
    let Some(wanted) = wanted.map(str::trim).filter(|w| !w.is_empty()) else {
        return match allowed {
            [only] => Ok(only.clone()),
            _ => Err(DevCaError::Selection(format!(
                "multiple Azure identities available, choose one with --azure-identity:{}",
                listing(allowed)
            ))),
        };
    };
    if let Some(exact) = allowed.iter().find(|id| id.eq_ignore_ascii_case(wanted)) {
        return Ok(exact.clone());
    }
    let suffix =
        format!("/Microsoft.ManagedIdentity/userAssignedIdentities/{wanted}").to_ascii_lowercase();
    let matches: Vec<String> = allowed
        .iter()
        .filter(|id| id.to_ascii_lowercase().ends_with(&suffix))
        .cloned()
        .collect();
    match matches.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(DevCaError::Selection(format!(
            "failed to find the Azure identity matching {wanted:?}; allowed identities:{}",
            listing(allowed)
        ))),
        _ => Err(DevCaError::Selection(format!(
            "Azure identity {wanted:?} is ambiguous, give the full resource ID; matches:{}",
            listing(&matches)
        ))),
    }
}

/// Parses a duration such as `12h`, `90m`, `1h30m`, `45s` or `7d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {text:?}: use e.g. 12h, 30m, 1h30m, 7d");
    let mut total: u64 = 0;
    let mut number = String::new();
    let mut any = false;
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3_600,
            'd' => 86_400,
            _ => return Err(bad()),
        };
        let value: u64 = number.parse().map_err(|_| bad())?;
        total = value
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        number.clear();
        any = true;
    }
    if !number.is_empty() || !any {
        return Err(bad());
    }
    if total == 0 {
        return Err(format!("duration {text:?} must be longer than zero"));
    }
    Ok(Duration::from_secs(total))
}

/// Creates `dir` (and parents) and makes it owner-only.
pub fn create_private_dir(dir: &Path) -> Result<(), DevCaError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| DevCaError::Io(dir.to_owned(), e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| DevCaError::Io(dir.to_owned(), e))
}

/// Writes `contents` to `path`, mode 0600 when `private` (created so from the start).
pub fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), DevCaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    options.mode(if private { 0o600 } else { 0o644 });
    let mut file = options
        .open(path)
        .map_err(|e| DevCaError::Io(path.to_owned(), e))?;
    file.write_all(contents.as_bytes())
        .map_err(|e| DevCaError::Io(path.to_owned(), e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    const READER: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader";
    const ADMIN: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/admin";
    const OTHER_READER: &str = "/subscriptions/00000000-0000-0000-0000-000000000002/resourceGroups/rg2/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader";

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn selection_follows_tsh() {
        // One allowed and none asked for: that one.
        assert_eq!(select_identity(&ids(&[READER]), None).unwrap(), READER);
        // Several and none asked for: an error listing them.
        let err = select_identity(&ids(&[READER, ADMIN]), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("multiple Azure identities") && err.contains(ADMIN),
            "{err}"
        );
        // Full ID, any case.
        assert_eq!(
            select_identity(&ids(&[READER, ADMIN]), Some(&ADMIN.to_uppercase())).unwrap(),
            ADMIN
        );
        // Bare name, any case.
        assert_eq!(
            select_identity(&ids(&[READER, ADMIN]), Some("Admin")).unwrap(),
            ADMIN
        );
        // Bare name matching two identities: ambiguous, listing both.
        let err = select_identity(&ids(&[READER, OTHER_READER, ADMIN]), Some("reader"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ambiguous") && err.contains(OTHER_READER) && !err.contains(ADMIN),
            "{err}"
        );
        // No match: not found, listing what is allowed.
        let err = select_identity(&ids(&[READER]), Some("writer"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("failed to find") && err.contains(READER),
            "{err}"
        );
        // A name is not a substring match.
        assert!(select_identity(&ids(&[READER]), Some("ader")).is_err());
        // Nothing allowed.
        assert!(
            select_identity(&[], None)
                .unwrap_err()
                .to_string()
                .contains("no Azure identities")
        );
    }

    #[test]
    fn roles_from_yaml_and_json_files() {
        let dir = std::env::temp_dir().join(format!("azgate-devca-roles-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let yaml = dir.join("roles.yaml");
        std::fs::write(
            &yaml,
            format!(
                "kind: role\nversion: v7\nmetadata:\n  name: azure-admin\nspec:\n  allow:\n    azure_identities:\n    - {ADMIN}\n    - {READER}\n  deny: {{}}\n---\nkind: role\nversion: v7\nmetadata:\n  name: no-admin\nspec:\n  deny:\n    azure_identities: ['{ADMIN}']\n"
            ),
        )
        .unwrap();
        // JSON is YAML: a role exported as JSON reads too.
        let json = dir.join("more.json");
        std::fs::write(
            &json,
            serde_json::json!({"kind": "role", "version": "v7", "metadata": {"name": "lockdown"},
                "spec": {"deny": {"azure_identities": ["*"]}}})
            .to_string(),
        )
        .unwrap();
        let roles = load_roles(&[yaml.clone(), json.clone()]).unwrap();
        assert_eq!(
            allowed_identities(&roles, &ids(&["azure-admin"]), &Traits::new()).unwrap(),
            [ADMIN, READER]
        );
        assert_eq!(
            allowed_identities(&roles, &ids(&["azure-admin", "no-admin"]), &Traits::new()).unwrap(),
            [READER]
        );
        assert!(
            allowed_identities(&roles, &ids(&["azure-admin", "lockdown"]), &Traits::new())
                .unwrap()
                .is_empty()
        );
        let err = allowed_identities(&roles, &ids(&["ghost"]), &Traits::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"ghost\" is not defined"), "{err}");
        // A bad file is named in the error, with the field.
        let bad = dir.join("bad.yaml");
        std::fs::write(
            &bad,
            "kind: role\nversion: v7\nmetadata: {name: x}\nspec:\n  allow:\n    azure_identities: ['*']\n",
        )
        .unwrap();
        let err = load_roles(&[bad]).unwrap_err().to_string();
        assert!(
            err.contains("bad.yaml") && err.contains("allow.azure_identities[0]"),
            "{err}"
        );
        // The same role twice across files.
        let err = load_roles(&[yaml.clone(), yaml]).unwrap_err().to_string();
        assert!(err.contains("defined twice"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn app_certificates_carry_teleports_subject() {
        let ca =
            CertificateAuthority::generate("azgate dev CA", Duration::from_secs(3600)).unwrap();
        for kind in [KeyKind::P256, KeyKind::Rsa] {
            let key = AppKey::generate(kind).unwrap();
            let now = SystemTime::now();
            let pem = ca
                .issue_app(
                    &AppCertificate {
                        user: Some("alice".into()),
                        roles: ids(&["azure-reader", "dev"]),
                        selected_identity: Some(READER.into()),
                        allowed_identities: ids(&[READER, ADMIN]),
                        traits: [("azure_identities".to_string(), ids(&[READER]))].into(),
                        usage: ids(&[USAGE_APPS]),
                        app_name: Some("azure-cli".into()),
                        app_cluster: Some("tele.example".into()),
                        not_before: now - BACKDATE,
                        not_after: now + Duration::from_secs(600),
                    },
                    key.public_key_info().unwrap(),
                )
                .unwrap();
            let identity = azgate_filter::identity::parse_app_certificate(&pem).unwrap();
            assert_eq!(identity.user, "alice");
            // One O RDN, its values in DER order as Go writes them (shorter first).
            assert_eq!(identity.roles, ["dev", "azure-reader"]);
            assert_eq!(identity.selected_identity.as_deref(), Some(READER));
            assert_eq!(identity.allowed_identities, [READER, ADMIN]);
            assert_eq!(identity.traits["azure_identities"], [READER]);
            assert_eq!(identity.usage, [USAGE_APPS]);
            assert_eq!(identity.app_name.as_deref(), Some("azure-cli"));
            assert_eq!(identity.app_cluster.as_deref(), Some("tele.example"));
            let subject = &Certificate::from_pem(pem.as_bytes())
                .unwrap()
                .tbs_certificate
                .subject;
            let sizes: Vec<usize> = subject.0.iter().map(|rdn| rdn.0.len()).collect();
            // PostalCode, O (2 values), OU, CN, 1.5, 1.10, 1.16, 1.17 x2.
            assert_eq!(sizes, [1, 2, 1, 1, 1, 1, 1, 1, 1]);
            key.check_matches(&pem).unwrap();
            assert!(
                AppKey::generate(KeyKind::P256)
                    .unwrap()
                    .check_matches(&pem)
                    .is_err()
            );
            // The key survives a PEM round trip and signs what the filter verifies.
            let key = AppKey::from_pem(&key.to_pem().unwrap()).unwrap();
            let signed = "eyJhbGciOiJFUzI1NiJ9.e30";
            assert!(!key.sign(signed.as_bytes()).unwrap().is_empty());
            assert!(!format!("{key:?}").contains("PRIVATE"));
        }
    }

    /// The extensions of a certificate, parsed back from its PEM.
    fn extensions(pem: &str) -> Vec<x509_cert::ext::Extension> {
        Certificate::from_pem(pem.as_bytes())
            .unwrap()
            .tbs_certificate
            .extensions
            .unwrap_or_default()
    }

    fn decoded<T: AssociatedOid + for<'a> Decode<'a>>(
        extensions: &[x509_cert::ext::Extension],
    ) -> Option<(bool, T)> {
        extensions
            .iter()
            .find(|e| e.extn_id == T::OID)
            .map(|e| (e.critical, T::from_der(e.extn_value.as_bytes()).unwrap()))
    }

    use x509_cert::der::oid::AssociatedOid;
    use x509_cert::ext::pkix::{
        AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages,
        SubjectKeyIdentifier,
    };

    #[test]
    fn leaf_certificates_carry_teleports_extensions() {
        let ca = CertificateAuthority::generate("extensions", Duration::from_secs(3600)).unwrap();
        let key = AppKey::generate(KeyKind::P256).unwrap();
        let now = SystemTime::now();
        let spec = AppCertificate {
            user: Some("alice".into()),
            roles: ids(&["dev"]),
            selected_identity: None,
            allowed_identities: Vec::new(),
            traits: Traits::new(),
            usage: Vec::new(),
            app_name: None,
            app_cluster: None,
            not_before: now - BACKDATE,
            not_after: now + Duration::from_secs(600),
        };
        let app = ca.issue_app(&spec, key.public_key_info().unwrap()).unwrap();
        let server = ca
            .issue_server(
                &["gateway.test"],
                &[std::net::IpAddr::from([127, 0, 0, 1])],
                key.public_key_info().unwrap(),
                now - BACKDATE,
                now + Duration::from_secs(600),
            )
            .unwrap();
        let ca_ski = decoded::<SubjectKeyIdentifier>(&extensions(ca.cert_pem()))
            .unwrap()
            .1;
        for (pem, eku) in [
            (&app, vec![EKU_SERVER_AUTH, EKU_CLIENT_AUTH]),
            (&server, vec![EKU_SERVER_AUTH]),
        ] {
            let exts = extensions(pem);
            assert_eq!(
                decoded::<ExtendedKeyUsage>(&exts).unwrap(),
                (false, ExtendedKeyUsage(eku))
            );
            let (critical, usage) = decoded::<KeyUsage>(&exts).unwrap();
            assert!(critical);
            assert_eq!(
                usage.0,
                KeyUsages::DigitalSignature | KeyUsages::KeyEncipherment
            );
            let (critical, basic) = decoded::<BasicConstraints>(&exts).unwrap();
            assert!(critical && !basic.ca && basic.path_len_constraint.is_none());
            let (_, aki) = decoded::<AuthorityKeyIdentifier>(&exts).unwrap();
            assert_eq!(aki.key_identifier, Some(ca_ski.0.clone()));
        }
        assert!(decoded::<SubjectAltName>(&extensions(&app)).is_none());
        assert!(decoded::<SubjectAltName>(&extensions(&server)).is_some());
        // Without EKU (refusal tests only): the extension is absent, the rest unchanged.
        let bare = ca
            .issue_app_with_eku(&spec, key.public_key_info().unwrap(), None)
            .unwrap();
        assert!(decoded::<ExtendedKeyUsage>(&extensions(&bare)).is_none());
        assert!(decoded::<KeyUsage>(&extensions(&bare)).is_some());

        // What a TLS client-certificate verifier (webpki, as in `azgate serve`) makes of them:
        // the app certificate is a client certificate, the server certificate is not.
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, UnixTime};
        let der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der(ca.cert_pem())).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let at = UnixTime::now();
        verifier.verify_client_cert(&der(&app), &[], at).unwrap();
        verifier.verify_client_cert(&der(&bare), &[], at).unwrap();
        let err = verifier
            .verify_client_cert(&der(&server), &[], at)
            .unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::InvalidPurpose
                        | rustls::CertificateError::InvalidPurposeContext { .. }
                )
            ),
            "{err:?}"
        );
    }

    #[test]
    fn ca_round_trips_through_its_directory() {
        let dir = std::env::temp_dir().join(format!("azgate-devca-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = CertificateAuthority::generate("round trip", Duration::from_secs(3600)).unwrap();
        ca.save(&dir).unwrap();
        let loaded = CertificateAuthority::load(&dir).unwrap();
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        assert!(
            ca.save(&dir)
                .unwrap_err()
                .to_string()
                .contains("already initialised")
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!format!("{loaded:?}").contains("PRIVATE"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("12h").unwrap(), Duration::from_secs(43_200));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5_400));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        for bad in ["", "12", "h", "1x", "0s", "-1h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
