//! The caller's Teleport app identity, read from the verified client certificate that the host
//! passes in `x-forwarded-client-cert` (Envoy's format, `SANITIZE_SET`).
//!
//! Teleport keeps the identity in the certificate's Subject (`lib/tlsca/ca.go`): CN is the user,
//! each O attribute a role, OID 1.3.9999.1.16 the selected Azure identity and each OID
//! 1.3.9999.1.17 attribute an identity the user may assume. The host has already verified the
//! chain; this module only reads what the certificate says and its validity period.

use der::asn1::{Ia5StringRef, PrintableStringRef, Utf8StringRef};
use der::oid::ObjectIdentifier;
use der::{Decode, DecodePem, Encode, Tag, Tagged};
use rsa::pkcs8::DecodePublicKey;
use rsa::traits::PublicKeyParts;
use sha2::{Digest, Sha256};
use x509_cert::Certificate;

use crate::error::Refusal;

const OID_COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
const OID_ORGANIZATION: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.10");
/// Teleport: the selected Azure identity.
const OID_AZURE_IDENTITY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.9999.1.16");
/// Teleport: one allowed Azure identity per attribute.
const OID_AZURE_IDENTITIES: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.9999.1.17");
const OID_RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const OID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");

/// Smallest RSA modulus accepted for proof-of-possession signatures.
const MIN_RSA_BITS: usize = 2048;
/// Largest XFCC header accepted; a PEM certificate URL-encoded is a few KiB.
pub const MAX_XFCC_BYTES: usize = 32 * 1024;

/// The certificate's public key, which signs the caller's JWTs.
#[derive(Clone, Debug)]
pub enum PublicKey {
    /// ECDSA P-256: JWTs must use ES256.
    P256(p256::ecdsa::VerifyingKey),
    /// RSA: JWTs must use RS256.
    Rsa(rsa::RsaPublicKey),
}

/// What the certificate says about the caller.
#[derive(Clone, Debug)]
pub struct AppIdentity {
    /// CN.
    pub user: String,
    /// O attributes, in order.
    pub roles: Vec<String>,
    /// OID 1.3.9999.1.16, if present.
    pub selected_identity: Option<String>,
    /// OID 1.3.9999.1.17 attributes.
    pub allowed_identities: Vec<String>,
    /// NotBefore, Unix seconds.
    pub not_before: i64,
    /// NotAfter, Unix seconds.
    pub not_after: i64,
    /// The subject public key.
    pub public_key: PublicKey,
    /// SHA-256 of the certificate DER: binds cached JWT verifications to this certificate.
    pub fingerprint: [u8; 32],
}

impl AppIdentity {
    /// Refuses a certificate outside its validity period (with `skew` seconds of tolerance).
    pub fn check_validity(&self, now: i64, skew: i64) -> Result<(), Refusal> {
        if now > self.not_after.saturating_add(skew) {
            return Err(Refusal::ClientCertificateExpired(
                "the client certificate has expired; log in again".into(),
            ));
        }
        if now < self.not_before.saturating_sub(skew) {
            return Err(Refusal::ClientCertificateExpired(
                "the client certificate is not valid yet".into(),
            ));
        }
        Ok(())
    }
}

/// Extracts the URL-decoded PEM of the `Cert` element from an XFCC header value.
///
/// The host sanitises XFCC and sets exactly one element for the verified peer, so a value with
/// several elements (a forwarded chain of proxies) is refused rather than guessed at.
pub fn cert_pem_from_xfcc(values: &[&str]) -> Result<String, Refusal> {
    let value = match values {
        [] => {
            return Err(Refusal::MissingClientCertificate(
                "no verified client certificate: connect with your Teleport app certificate".into(),
            ));
        }
        [one] => *one,
        _ => {
            return Err(Refusal::InvalidClientCertificate(
                "more than one x-forwarded-client-cert header".into(),
            ));
        }
    };
    if value.len() > MAX_XFCC_BYTES {
        return Err(Refusal::InvalidClientCertificate(
            "x-forwarded-client-cert is too large".into(),
        ));
    }
    let elements = split_unquoted(value, ',');
    if elements.len() != 1 {
        return Err(Refusal::InvalidClientCertificate(
            "x-forwarded-client-cert must describe exactly one client".into(),
        ));
    }
    let mut cert = None;
    for pair in split_unquoted(elements[0], ';') {
        let Some((key, raw)) = pair.split_once('=') else {
            continue;
        };
        if key.trim().eq_ignore_ascii_case("Cert") {
            let raw = raw.trim();
            let unquoted = raw
                .strip_prefix('"')
                .and_then(|r| r.strip_suffix('"'))
                .unwrap_or(raw);
            cert = Some(unquoted);
        }
    }
    let Some(encoded) = cert.filter(|c| !c.is_empty()) else {
        return Err(Refusal::MissingClientCertificate(
            "x-forwarded-client-cert carries no certificate (Cert=)".into(),
        ));
    };
    percent_encoding::percent_decode_str(encoded)
        .decode_utf8()
        .map(|pem| pem.into_owned())
        .map_err(|_| {
            Refusal::InvalidClientCertificate("the forwarded certificate is not valid UTF-8".into())
        })
}

/// Splits on `sep` outside double quotes (XFCC quotes values that contain `,` `;` or `=`).
fn split_unquoted(value: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut in_quotes = false;
    let mut escaped = false;
    let mut start = 0;
    for (i, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            c if c == sep && !in_quotes => {
                parts.push(&value[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&value[start..]);
    parts
}

/// Parses a PEM Teleport app certificate.
pub fn parse_app_certificate(pem: &str) -> Result<AppIdentity, Refusal> {
    let cert = Certificate::from_pem(pem.as_bytes()).map_err(|e| {
        Refusal::InvalidClientCertificate(format!("the client certificate cannot be parsed ({e})"))
    })?;
    let der = cert.to_der().map_err(|e| {
        Refusal::InvalidClientCertificate(format!("the client certificate cannot be encoded ({e})"))
    })?;
    identity_from_certificate(&cert, &der)
}

/// Parses a DER Teleport app certificate.
pub fn parse_app_certificate_der(der: &[u8]) -> Result<AppIdentity, Refusal> {
    let cert = Certificate::from_der(der).map_err(|e| {
        Refusal::InvalidClientCertificate(format!("the client certificate cannot be parsed ({e})"))
    })?;
    identity_from_certificate(&cert, der)
}

fn identity_from_certificate(cert: &Certificate, der: &[u8]) -> Result<AppIdentity, Refusal> {
    let tbs = &cert.tbs_certificate;
    let mut user = None;
    let mut roles = Vec::new();
    let mut selected_identity = None;
    let mut allowed_identities = Vec::new();
    for rdn in tbs.subject.0.iter() {
        for attr in rdn.0.iter() {
            let wanted = [
                OID_COMMON_NAME,
                OID_ORGANIZATION,
                OID_AZURE_IDENTITY,
                OID_AZURE_IDENTITIES,
            ];
            if !wanted.contains(&attr.oid) {
                continue;
            }
            let value = attribute_string(&attr.value).ok_or_else(|| {
                Refusal::InvalidClientCertificate(format!(
                    "subject attribute {} is not a string",
                    attr.oid
                ))
            })?;
            match attr.oid {
                OID_COMMON_NAME => user = Some(value),
                OID_ORGANIZATION => roles.push(value),
                OID_AZURE_IDENTITY => {
                    if selected_identity.replace(value).is_some() {
                        return Err(Refusal::InvalidClientCertificate(
                            "the certificate selects more than one Azure identity".into(),
                        ));
                    }
                }
                _ => allowed_identities.push(value),
            }
        }
    }
    let user = user.filter(|u| !u.is_empty()).ok_or_else(|| {
        Refusal::InvalidClientCertificate("the certificate names no user (CN)".into())
    })?;
    let seconds = |t: &x509_cert::time::Time| {
        i64::try_from(t.to_unix_duration().as_secs()).unwrap_or(i64::MAX)
    };
    Ok(AppIdentity {
        user,
        roles,
        selected_identity: selected_identity.filter(|s| !s.is_empty()),
        allowed_identities,
        not_before: seconds(&tbs.validity.not_before),
        not_after: seconds(&tbs.validity.not_after),
        public_key: public_key(&tbs.subject_public_key_info)?,
        fingerprint: Sha256::digest(der).into(),
    })
}

/// Reads a directory-string attribute value (Go writes PrintableString or UTF8String).
fn attribute_string(value: &der::Any) -> Option<String> {
    let s = match value.tag() {
        Tag::Utf8String => Utf8StringRef::try_from(value).ok()?.as_str().to_string(),
        Tag::PrintableString => PrintableStringRef::try_from(value)
            .ok()?
            .as_str()
            .to_string(),
        Tag::Ia5String => Ia5StringRef::try_from(value).ok()?.as_str().to_string(),
        _ => return None,
    };
    Some(s)
}

fn public_key(spki: &x509_cert::spki::SubjectPublicKeyInfoOwned) -> Result<PublicKey, Refusal> {
    let der = spki
        .to_der()
        .map_err(|e| Refusal::InvalidClientCertificate(format!("unreadable public key ({e})")))?;
    let algorithm = spki.algorithm.oid;
    if algorithm == OID_RSA_ENCRYPTION {
        let key = rsa::RsaPublicKey::from_public_key_der(&der).map_err(|e| {
            Refusal::InvalidClientCertificate(format!("unreadable RSA public key ({e})"))
        })?;
        if key.size() * 8 < MIN_RSA_BITS {
            return Err(Refusal::InvalidClientCertificate(format!(
                "RSA keys must have at least {MIN_RSA_BITS} bits"
            )));
        }
        return Ok(PublicKey::Rsa(key));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
    if algorithm == OID_EC_PUBLIC_KEY && curve == Some(OID_P256) {
        let key = p256::ecdsa::VerifyingKey::from_public_key_der(&der).map_err(|e| {
            Refusal::InvalidClientCertificate(format!("unreadable P-256 public key ({e})"))
        })?;
        return Ok(PublicKey::P256(key));
    }
    Err(Refusal::InvalidClientCertificate(
        "unsupported certificate key type: use ECDSA P-256 or RSA".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xfcc_cert_element_is_extracted_and_url_decoded() {
        let xfcc = r#"By=spiffe://x;Hash=abc;Cert="-----BEGIN%20CERTIFICATE-----%0AAAA%0A-----END%20CERTIFICATE-----%0A";Subject="CN=alice,O=dev";URI=;DNS=a"#;
        let pem = cert_pem_from_xfcc(&[xfcc]).unwrap();
        assert_eq!(
            pem,
            "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n"
        );
    }

    #[test]
    fn xfcc_quoted_subject_with_commas_is_one_element() {
        let xfcc = r#"Subject="CN=a,O=b,O=c";Cert="x""#;
        assert_eq!(cert_pem_from_xfcc(&[xfcc]).unwrap(), "x");
    }

    #[test]
    fn xfcc_without_cert_or_header_is_missing_certificate() {
        assert_eq!(
            cert_pem_from_xfcc(&[]).unwrap_err().code(),
            "MissingClientCertificate"
        );
        assert_eq!(
            cert_pem_from_xfcc(&["Hash=abc;Subject=\"CN=a\""])
                .unwrap_err()
                .code(),
            "MissingClientCertificate"
        );
    }

    #[test]
    fn xfcc_with_several_clients_is_refused() {
        let err = cert_pem_from_xfcc(&["Cert=\"a\",Cert=\"b\""]).unwrap_err();
        assert_eq!(err.code(), "InvalidClientCertificate");
        let err = cert_pem_from_xfcc(&["Cert=a", "Cert=b"]).unwrap_err();
        assert_eq!(err.code(), "InvalidClientCertificate");
    }

    #[test]
    fn garbage_certificate_is_invalid() {
        let err =
            parse_app_certificate("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
                .unwrap_err();
        assert_eq!(err.code(), "InvalidClientCertificate");
        assert_eq!(
            parse_app_certificate("").unwrap_err().code(),
            "InvalidClientCertificate"
        );
    }
}
