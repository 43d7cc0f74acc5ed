//! The dev CA and the Teleport-format app certificates and TLS server certificates it issues.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use azgate_filter::template::Traits;
use p256::pkcs8::LineEnding;
use rand_core::{OsRng, RngCore};
use x509_cert::builder::{Builder, CertificateBuilder, Profile};
use x509_cert::certificate::{TbsCertificate, Version};
use x509_cert::der::asn1::{
    Ia5String, ObjectIdentifier, OctetString, PrintableStringRef, SetOfVec, Utf8StringRef,
};
use x509_cert::der::{Any, DecodePem, Encode, EncodePem};
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::time::{Time, Validity};
use x509_cert::{Certificate, attr::AttributeTypeAndValue};

use super::{AppKey, create_private_dir, write_file};
use super::{
    BACKDATE, CA_CERT_FILE, CA_KEY_FILE, EKU_CLIENT_AUTH, EKU_SERVER_AUTH, OID_APP_CLUSTER,
    OID_APP_NAME, OID_AZURE_IDENTITIES, OID_AZURE_IDENTITY, PkiError, cert_error,
};

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
    pub fn generate(common_name: &str, lifetime: Duration) -> Result<Self, PkiError> {
        let key = p256::ecdsa::SigningKey::random(&mut OsRng);
        let name = Name::from_str(&format!("CN={},O=azgate dev CA", escape_dn(common_name)))
            .map_err(|e| PkiError::Invalid(format!("CA name: {e}")))?;
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
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let AppKey::P256(key) = AppKey::from_pem(key_pem)? else {
            return Err(PkiError::Invalid("the CA key must be ECDSA P-256".into()));
        };
        AppKey::P256(key.clone()).check_matches(cert_pem)?;
        let cert = Certificate::from_pem(cert_pem.as_bytes())
            .map_err(|e| PkiError::Invalid(format!("the CA certificate cannot be parsed ({e})")))?;
        let validity = &cert.tbs_certificate.validity;
        Ok(Self {
            name: cert.tbs_certificate.subject.clone(),
            not_after: validity.not_after.to_system_time(),
            cert_pem: cert_pem.to_owned(),
            key,
        })
    }

    /// Loads `dir/ca.crt` and `dir/ca.key`.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| PkiError::Io(path, e))
        };
        Self::from_pem(&read(CA_CERT_FILE)?, &read(CA_KEY_FILE)?)
    }

    /// Writes `dir/ca.crt` and `dir/ca.key` (mode 0600), creating `dir` (mode 0700). Refuses to
    /// overwrite an existing CA.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        create_private_dir(dir)?;
        for name in [CA_CERT_FILE, CA_KEY_FILE] {
            let path = dir.join(name);
            if path.exists() {
                return Err(PkiError::Invalid(format!(
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
    pub fn key_pem(&self) -> Result<String, PkiError> {
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
    ) -> Result<String, PkiError> {
        self.issue_app_with_eku(spec, spki, Some(&[EKU_SERVER_AUTH, EKU_CLIENT_AUTH]))
    }

    /// [`Self::issue_app`] with other extended key usages: `None` leaves the extension out
    /// (for tests of the gateway's refusals; a Teleport certificate always has it).
    pub fn issue_app_with_eku(
        &self,
        spec: &AppCertificate,
        spki: SubjectPublicKeyInfoOwned,
        eku: Option<&[ObjectIdentifier]>,
    ) -> Result<String, PkiError> {
        // Go's `pkix.Name.ToRDNSequence` order: PostalCode, O, OU, CN, then the extra names.
        let traits = serde_json::to_string(&spec.traits)
            .map_err(|e| PkiError::Invalid(format!("traits: {e}")))?;
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
    ) -> Result<String, PkiError> {
        let common_name = dns_names.first().copied().unwrap_or("localhost");
        let subject = Name::from_str(&format!("CN={}", escape_dn(common_name)))
            .map_err(|e| PkiError::Invalid(format!("server name {common_name:?}: {e}")))?;
        let mut names = Vec::new();
        for dns in dns_names {
            let name = Ia5String::new(dns)
                .map_err(|_| PkiError::Invalid(format!("{dns:?} is not a DNS name")))?;
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
    ) -> Result<String, PkiError> {
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
fn rdn(oid: &str, value: &str) -> Result<RelativeDistinguishedName, PkiError> {
    multi_valued_rdn(oid, &[value.to_string()])
}

/// One RDN holding every value of a standard attribute, as Go's pkix writes them (a SET, in DER
/// order; repeated values once).
fn multi_valued_rdn(oid: &str, values: &[String]) -> Result<RelativeDistinguishedName, PkiError> {
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
fn attribute(oid: &str, value: &str) -> Result<AttributeTypeAndValue, PkiError> {
    let value = match PrintableStringRef::new(value) {
        Ok(printable) => Any::from(printable),
        Err(_) => Any::from(
            Utf8StringRef::new(value)
                .map_err(|e| PkiError::Invalid(format!("subject value {value:?}: {e}")))?,
        ),
    };
    Ok(AttributeTypeAndValue {
        oid: oid
            .parse()
            .map_err(|e| PkiError::Invalid(format!("OID {oid}: {e}")))?,
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

fn validity(not_before: SystemTime, not_after: SystemTime) -> Result<Validity, PkiError> {
    if not_after <= not_before {
        return Err(PkiError::Invalid(
            "the certificate would expire before it becomes valid".into(),
        ));
    }
    let time = |at: SystemTime| Time::try_from(at).map_err(cert_error);
    Ok(Validity {
        not_before: time(not_before)?,
        not_after: time(not_after)?,
    })
}
