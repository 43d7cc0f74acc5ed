//! The caller's Teleport app identity, read from the verified client certificate that the host
//! passes in `x-forwarded-client-cert` (Envoy's format, `SANITIZE_SET`).
//!
//! Teleport keeps the identity in the certificate's Subject (`lib/tlsca/ca.go`): CN is the user,
//! each O attribute a role, OID 1.3.9999.1.16 the selected Azure identity and each OID
//! 1.3.9999.1.17 attribute an identity the user may assume. The host has already verified the
//! chain; this module only reads what the certificate says and its validity period.

use std::collections::BTreeMap;

use der::asn1::{Ia5StringRef, PrintableStringRef, Utf8StringRef};
use der::oid::ObjectIdentifier;
use der::{Decode, Encode, Tag, Tagged};
use rsa::pkcs8::DecodePublicKey;
use rsa::traits::PublicKeyParts;
use sha2::{Digest, Sha256};
use x509_cert::Certificate;
use x509_cert::ext::pkix::{BasicConstraints, ExtendedKeyUsage};

use crate::error::Refusal;
use crate::template::Traits;

const OID_COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
const OID_ORGANIZATION: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.10");
/// Teleport: the selected Azure identity.
const OID_ORGANIZATIONAL_UNIT: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.11");
/// RouteToApp's cluster name (the cluster the app is in).
const OID_APP_CLUSTER: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.9999.1.5");
/// RouteToApp's app name.
const OID_APP_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.9999.1.10");
/// Teleport writes every user trait, as JSON, in the Subject's PostalCode.
const OID_POSTAL_CODE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.17");
const OID_AZURE_IDENTITY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.9999.1.16");
/// Teleport: one allowed Azure identity per attribute.
const OID_AZURE_IDENTITIES: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.9999.1.17");
const OID_RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const OID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const OID_EXTENDED_KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.37");
const OID_BASIC_CONSTRAINTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.19");
const OID_CLIENT_AUTH: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.2");

/// Smallest RSA modulus accepted for proof-of-possession signatures.
const MIN_RSA_BITS: usize = 2048;
/// Largest XFCC header accepted; a PEM certificate URL-encoded is a few KiB.
pub const MAX_XFCC_BYTES: usize = 32 * 1024;

/// The certificate's public key, which signs the caller's JWTs, ready for `jsonwebtoken`. The
/// algorithm is fixed by the key, never taken from a token.
#[derive(Clone, Debug)]
pub struct PublicKey {
    algorithm: jsonwebtoken::Algorithm,
    key: jsonwebtoken::DecodingKey,
}

impl PublicKey {
    /// An ECDSA P-256 key: JWTs must use ES256.
    pub fn p256(key: &p256::ecdsa::VerifyingKey) -> Self {
        let point = key.to_encoded_point(false);
        Self {
            algorithm: jsonwebtoken::Algorithm::ES256,
            key: jsonwebtoken::DecodingKey::from_ec_der(point.as_bytes()),
        }
    }

    /// An RSA key of at least [`MIN_RSA_BITS`]: JWTs must use RS256.
    pub fn rsa(key: &rsa::RsaPublicKey) -> Result<Self, Refusal> {
        if key.size() * 8 < MIN_RSA_BITS {
            return Err(Refusal::InvalidClientCertificate(format!(
                "RSA keys must have at least {MIN_RSA_BITS} bits"
            )));
        }
        Ok(Self {
            algorithm: jsonwebtoken::Algorithm::RS256,
            key: jsonwebtoken::DecodingKey::from_rsa_raw_components(
                &key.n().to_bytes_be(),
                &key.e().to_bytes_be(),
            ),
        })
    }

    /// The one JWS algorithm this key verifies.
    pub fn algorithm(&self) -> jsonwebtoken::Algorithm {
        self.algorithm
    }

    /// The key in `jsonwebtoken`'s form.
    pub fn decoding_key(&self) -> &jsonwebtoken::DecodingKey {
        &self.key
    }
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
    /// The user's traits (PostalCode JSON); empty when the certificate has none.
    pub traits: Traits,
    /// OU attributes: what the certificate may be used for (`usage:apps`).
    pub usage: Vec<String>,
    /// OID 1.3.9999.1.10: the app the certificate routes to.
    pub app_name: Option<String>,
    /// OID 1.3.9999.1.5: the cluster of that app.
    pub app_cluster: Option<String>,
    /// NotBefore, Unix seconds.
    pub not_before: i64,
    /// NotAfter, Unix seconds.
    pub not_after: i64,
    /// The subject public key.
    pub public_key: PublicKey,
    /// SHA-256 of the certificate DER: binds cached JWT verifications to this certificate.
    pub fingerprint: [u8; 32],
}

/// What the plugin configuration requires of a certificate's route, as the Teleport App Service
/// checks its own certificates: unset fields accept anything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertificateRules {
    /// An OU value the certificate must carry (Teleport app certificates: `usage:apps`).
    pub required_usage: Option<String>,
    /// App names (OID 1.3.9999.1.10) accepted; empty: any.
    pub allowed_apps: Vec<String>,
    /// App cluster names (OID 1.3.9999.1.5) accepted; empty: any.
    pub allowed_clusters: Vec<String>,
}

impl AppIdentity {
    /// Refuses a certificate whose usage, app or cluster `rules` do not accept.
    pub fn check_route(&self, rules: &CertificateRules) -> Result<(), Refusal> {
        if let Some(usage) = &rules.required_usage
            && !self.usage.iter().any(|u| u == usage)
        {
            return Err(Refusal::CertificateNotForThisApp(format!(
                "the certificate is not issued for {usage}; log in to the app with tsh apps login"
            )));
        }
        let accepted = |allowed: &[String], value: &Option<String>| {
            allowed.is_empty() || value.as_ref().is_some_and(|v| allowed.contains(v))
        };
        if !accepted(&rules.allowed_apps, &self.app_name) {
            return Err(Refusal::CertificateNotForThisApp(format!(
                "the certificate is for app {:?}, not one this gateway serves",
                self.app_name.as_deref().unwrap_or("")
            )));
        }
        if !accepted(&rules.allowed_clusters, &self.app_cluster) {
            return Err(Refusal::CertificateNotForThisApp(format!(
                "the certificate is for an app in cluster {:?}, not one this gateway serves",
                self.app_cluster.as_deref().unwrap_or("")
            )));
        }
        Ok(())
    }

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

/// The keys Envoy writes in an XFCC element (`forward_client_cert_details`).
const XFCC_KEYS: [&str; 7] = ["By", "Hash", "Cert", "Chain", "Subject", "URI", "DNS"];

/// What the host's XFCC header says about the verified peer: the PEM of its certificate and, if
/// the host sets it, the SHA-256 of its DER.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardedCertificate {
    /// The URL-decoded PEM of `Cert=`.
    pub pem: String,
    /// `Hash=`, decoded from hex.
    pub hash: Option<[u8; 32]>,
}

/// Reads the one element of an XFCC header value.
///
/// The certificate's own text (Subject, URI and DNS SANs) is copied into XFCC by the host and
/// can carry `;`, `,`, `=` and `"`, so a lenient reader can be made to see a second `Cert=`. The
/// rules are therefore strict: exactly one header and one element, only the keys Envoy writes,
/// each at most once, exactly one `Cert`, balanced quotes. `Hash` (which Envoy writes before any
/// client-controlled text) binds the element to the certificate: see [`certificate_from_xfcc`].
pub fn parse_xfcc(values: &[&str]) -> Result<ForwardedCertificate, Refusal> {
    let invalid =
        |why: &str| Refusal::InvalidClientCertificate(format!("x-forwarded-client-cert {why}"));
    let value = match values {
        [] => {
            return Err(Refusal::MissingClientCertificate(
                "no verified client certificate: connect with your Teleport app certificate".into(),
            ));
        }
        [one] => *one,
        _ => return Err(invalid("is given more than once")),
    };
    if value.len() > MAX_XFCC_BYTES {
        return Err(invalid("is too large"));
    }
    let elements =
        split_unquoted(value, ',').ok_or_else(|| invalid("has an unterminated quote"))?;
    let [element] = elements.as_slice() else {
        return Err(invalid("must describe exactly one client"));
    };
    let mut seen = [None::<&str>; XFCC_KEYS.len()];
    for pair in split_unquoted(element, ';').ok_or_else(|| invalid("has an unterminated quote"))? {
        let Some((key, raw)) = pair.split_once('=') else {
            return Err(invalid("has an element without '='"));
        };
        let Some(slot) = XFCC_KEYS
            .iter()
            .position(|k| k.eq_ignore_ascii_case(crate::headers::trim_ows(key)))
        else {
            return Err(invalid("has an unknown key"));
        };
        if seen[slot].replace(crate::headers::trim_ows(raw)).is_some() {
            return Err(invalid(&format!(
                "names {} more than once",
                XFCC_KEYS[slot]
            )));
        }
    }
    let [_, hash, cert, ..] = seen;
    let Some(cert) = cert.map(unquote).filter(|c| !c.is_empty()) else {
        return Err(Refusal::MissingClientCertificate(
            "x-forwarded-client-cert carries no certificate (Cert=)".into(),
        ));
    };
    // URL-encoded PEM has no quotes or escapes; one here was not written by the host.
    if cert.contains(['"', '\\']) {
        return Err(invalid("has a malformed Cert value"));
    }
    let pem = percent_encoding::percent_decode_str(cert)
        .decode_utf8()
        .map_err(|_| invalid("carries a certificate that is not valid UTF-8"))?
        .into_owned();
    let hash = match hash.map(unquote) {
        None => None,
        Some(hex) => Some(decode_sha256_hex(hex).ok_or_else(|| invalid("has a malformed Hash"))?),
    };
    Ok(ForwardedCertificate { pem, hash })
}

/// The caller's identity from the XFCC header: the certificate parsed, its `Hash` (when set)
/// checked against its DER.
pub fn certificate_from_xfcc(values: &[&str]) -> Result<AppIdentity, Refusal> {
    let forwarded = parse_xfcc(values)?;
    let identity = parse_app_certificate(&forwarded.pem)?;
    if forwarded
        .hash
        .is_some_and(|hash| hash != identity.fingerprint)
    {
        return Err(Refusal::InvalidClientCertificate(
            "x-forwarded-client-cert: Hash does not match the certificate".into(),
        ));
    }
    Ok(identity)
}

fn unquote(raw: &str) -> &str {
    raw.strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(raw)
}

fn decode_sha256_hex(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        let digit = |c: u8| (c as char).to_digit(16);
        *byte = u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()?;
    }
    Some(out)
}

/// Splits on `sep` outside double quotes; `None` if a quote is left open. Inside quotes a
/// backslash escapes the next character (XFCC's rule for quoted values).
fn split_unquoted(value: &str, sep: char) -> Option<Vec<&str>> {
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
    if in_quotes {
        return None;
    }
    parts.push(&value[start..]);
    Some(parts)
}

/// Parses a PEM Teleport app certificate.
pub fn parse_app_certificate(pem: &str) -> Result<AppIdentity, Refusal> {
    let (label, der) = der::pem::decode_vec(pem.as_bytes()).map_err(|e| {
        Refusal::InvalidClientCertificate(format!("the client certificate is not PEM ({e})"))
    })?;
    if label != "CERTIFICATE" {
        return Err(Refusal::InvalidClientCertificate(
            "the forwarded PEM is not a CERTIFICATE".into(),
        ));
    }
    parse_app_certificate_der(&der)
}

/// Parses a DER Teleport app certificate.
pub fn parse_app_certificate_der(der: &[u8]) -> Result<AppIdentity, Refusal> {
    let cert = Certificate::from_der(der).map_err(|e| {
        Refusal::InvalidClientCertificate(format!("the client certificate cannot be parsed ({e})"))
    })?;
    check_extensions(&cert)?;
    identity_from_certificate(&cert, der)
}

/// A client certificate must be an end-entity certificate issued for client authentication, as
/// Teleport's are (EKU serverAuth + clientAuth, CA:FALSE). The TLS stacks of both hosts accept a
/// certificate without EKU for either purpose, so a server certificate from the same CA would
/// otherwise pass as a client certificate.
fn check_extensions(cert: &Certificate) -> Result<(), Refusal> {
    let invalid =
        |why: &str| Refusal::InvalidClientCertificate(format!("the client certificate {why}"));
    let extensions = cert
        .tbs_certificate
        .extensions
        .as_deref()
        .unwrap_or_default();
    let mut client_auth = false;
    for (i, extension) in extensions.iter().enumerate() {
        if extensions[..i]
            .iter()
            .any(|e| e.extn_id == extension.extn_id)
        {
            return Err(invalid(&format!("repeats extension {}", extension.extn_id)));
        }
        match extension.extn_id {
            OID_EXTENDED_KEY_USAGE => {
                let usage = ExtendedKeyUsage::from_der(extension.extn_value.as_bytes())
                    .map_err(|_| invalid("has an unreadable extended key usage"))?;
                client_auth = usage.0.contains(&OID_CLIENT_AUTH);
            }
            OID_BASIC_CONSTRAINTS => {
                let constraints = BasicConstraints::from_der(extension.extn_value.as_bytes())
                    .map_err(|_| invalid("has unreadable basic constraints"))?;
                if constraints.ca {
                    return Err(invalid("is a CA certificate"));
                }
            }
            _ => {}
        }
    }
    if !client_auth {
        return Err(invalid(
            "is not issued for client authentication (no clientAuth extended key usage)",
        ));
    }
    Ok(())
}

fn identity_from_certificate(cert: &Certificate, der: &[u8]) -> Result<AppIdentity, Refusal> {
    let tbs = &cert.tbs_certificate;
    let mut user = None;
    let mut roles = Vec::new();
    let mut selected_identity = None;
    let mut allowed_identities = Vec::new();
    let mut traits = None;
    let mut usage = Vec::new();
    let (mut app_name, mut app_cluster) = (None, None);
    for rdn in tbs.subject.0.iter() {
        for attr in rdn.0.iter() {
            let wanted = [
                OID_COMMON_NAME,
                OID_ORGANIZATION,
                OID_AZURE_IDENTITY,
                OID_AZURE_IDENTITIES,
                OID_POSTAL_CODE,
                OID_ORGANIZATIONAL_UNIT,
                OID_APP_NAME,
                OID_APP_CLUSTER,
            ];
            if !wanted.contains(&attr.oid) {
                continue;
            }
            let Some(value) = attribute_string(&attr.value) else {
                // An OU azgate cannot read is no usage it could require; other attributes it
                // reads must be text.
                if attr.oid == OID_ORGANIZATIONAL_UNIT {
                    continue;
                }
                return Err(Refusal::InvalidClientCertificate(format!(
                    "subject attribute {} is not a string",
                    attr.oid
                )));
            };
            match attr.oid {
                OID_COMMON_NAME => set_once(&mut user, value, "names more than one user (CN)")?,
                OID_ORGANIZATION => roles.push(value),
                OID_AZURE_IDENTITY => set_once(
                    &mut selected_identity,
                    value,
                    "selects more than one Azure identity",
                )?,
                OID_POSTAL_CODE => set_once(
                    &mut traits,
                    parse_traits(&value)?,
                    "carries more than one set of traits (PostalCode)",
                )?,
                OID_ORGANIZATIONAL_UNIT => usage.push(value),
                OID_APP_NAME => set_once(&mut app_name, value, "names more than one app")?,
                OID_APP_CLUSTER => {
                    set_once(&mut app_cluster, value, "names more than one app cluster")?
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
        traits: traits.unwrap_or_default(),
        usage,
        app_name,
        app_cluster,
        not_before: seconds(&tbs.validity.not_before),
        not_after: seconds(&tbs.validity.not_after),
        public_key: public_key(&tbs.subject_public_key_info)?,
        fingerprint: Sha256::digest(der).into(),
    })
}

/// Fills a single-valued attribute's `slot`; a second value refuses the certificate (it
/// "`what`").
fn set_once<T>(slot: &mut Option<T>, value: T, what: &str) -> Result<(), Refusal> {
    if slot.replace(value).is_some() {
        return Err(Refusal::InvalidClientCertificate(format!(
            "the certificate {what}"
        )));
    }
    Ok(())
}

/// Teleport's traits JSON: an object of string lists (Go writes a missing list as `null`).
/// Anything else means the certificate was not written by Teleport's encoder.
fn parse_traits(json: &str) -> Result<Traits, Refusal> {
    let raw: BTreeMap<String, Option<Vec<String>>> = serde_json::from_str(json).map_err(|_| {
        Refusal::InvalidClientCertificate(
            "the certificate's traits (PostalCode) are not a JSON object of string lists".into(),
        )
    })?;
    Ok(raw
        .into_iter()
        .map(|(name, values)| (name, values.unwrap_or_default()))
        .collect())
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
        return PublicKey::rsa(&key);
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
        return Ok(PublicKey::p256(&key));
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
        let hash = "ab".repeat(32);
        let xfcc = format!(
            r#"By=spiffe://x;Hash={hash};Cert="-----BEGIN%20CERTIFICATE-----%0AAAA%0A-----END%20CERTIFICATE-----%0A";Subject="CN=alice,O=dev";URI=;DNS=a"#
        );
        let forwarded = parse_xfcc(&[&xfcc]).unwrap();
        assert_eq!(
            forwarded.pem,
            "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n"
        );
        assert_eq!(forwarded.hash, Some([0xab; 32]));
    }

    #[test]
    fn xfcc_quoted_subject_with_commas_is_one_element() {
        let xfcc = r#"Subject="CN=a,O=b,O=c";Cert="x""#;
        assert_eq!(parse_xfcc(&[xfcc]).unwrap().pem, "x");
    }

    #[test]
    fn xfcc_without_cert_or_header_is_missing_certificate() {
        assert_eq!(
            parse_xfcc(&[]).unwrap_err().code(),
            "MissingClientCertificate"
        );
        assert_eq!(
            parse_xfcc(&["Hash=abc;Subject=\"CN=a\""])
                .unwrap_err()
                .code(),
            "MissingClientCertificate"
        );
        assert_eq!(
            parse_xfcc(&["Subject=\"CN=a\""]).unwrap_err().code(),
            "MissingClientCertificate"
        );
    }

    #[test]
    fn xfcc_with_several_clients_is_refused() {
        let err = parse_xfcc(&["Cert=\"a\",Cert=\"b\""]).unwrap_err();
        assert_eq!(err.code(), "InvalidClientCertificate");
        let err = parse_xfcc(&["Cert=a", "Cert=b"]).unwrap_err();
        assert_eq!(err.code(), "InvalidClientCertificate");
    }

    #[test]
    fn xfcc_injected_through_certificate_text_is_refused() {
        for xfcc in [
            // A DNS SAN carrying a second Cert (the forgery), in either position.
            r#"Hash=00;Cert="real";DNS=x;Cert="forged""#,
            r#"Cert="real";Subject="CN=x";URI=;DNS=x;Cert="forged""#,
            // Repeated keys of any kind, unknown keys, bare words.
            r#"Cert="a";DNS=x;DNS=y"#,
            r#"Cert="a";Hash=1;Hash=2"#,
            r#"Cert="a";Evil=1"#,
            r#"Cert="a";justaword"#,
            // A quote left open by certificate text.
            r#"Cert="a";Subject="CN=x"#,
            // Quotes or escapes inside the URL-encoded certificate.
            r#"Cert="a\"b""#,
        ] {
            assert_eq!(
                parse_xfcc(&[xfcc]).unwrap_err().code(),
                "InvalidClientCertificate",
                "{xfcc}"
            );
        }
    }

    #[test]
    fn xfcc_hash_must_be_sha256_hex() {
        for hash in ["", "abc", &"zz".repeat(32), &"a".repeat(65)] {
            let xfcc = format!("Hash={hash};Cert=\"x\"");
            assert_eq!(
                parse_xfcc(&[&xfcc]).unwrap_err().code(),
                "InvalidClientCertificate",
                "{hash}"
            );
        }
        let upper = format!("Hash={};Cert=\"x\"", "AB".repeat(32));
        assert_eq!(parse_xfcc(&[&upper]).unwrap().hash, Some([0xab; 32]));
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
        let key = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert_eq!(
            parse_app_certificate(key).unwrap_err().code(),
            "InvalidClientCertificate"
        );
    }

    mod certificates {
        use std::str::FromStr;
        use std::time::Duration;

        use der::EncodePem;
        use p256::pkcs8::EncodePublicKey;
        use x509_cert::builder::{Builder, CertificateBuilder, Profile};
        use x509_cert::ext::pkix::ExtendedKeyUsage;
        use x509_cert::name::Name;
        use x509_cert::serial_number::SerialNumber;
        use x509_cert::spki::SubjectPublicKeyInfoOwned;
        use x509_cert::time::Validity;

        use super::super::*;

        const SERVER_AUTH: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.1");

        /// A certificate for CN=alice, signed by a fixed key, with `usages` as its EKU
        /// extensions (one extension per list; none for an empty slice).
        fn certificate(profile: Profile, usages: &[&[ObjectIdentifier]]) -> String {
            certificate_for("CN=alice,O=dev", profile, usages)
        }

        fn certificate_for(
            subject: &str,
            profile: Profile,
            usages: &[&[ObjectIdentifier]],
        ) -> String {
            let key = p256::ecdsa::SigningKey::from_slice(&[5u8; 32]).unwrap();
            let spki = SubjectPublicKeyInfoOwned::from_der(
                key.verifying_key().to_public_key_der().unwrap().as_bytes(),
            )
            .unwrap();
            let mut builder = CertificateBuilder::new(
                profile,
                SerialNumber::from(7u32),
                Validity::from_now(Duration::from_secs(600)).unwrap(),
                Name::from_str(subject).unwrap(),
                spki,
                &key,
            )
            .unwrap();
            for usage in usages {
                builder
                    .add_extension(&ExtendedKeyUsage(usage.to_vec()))
                    .unwrap();
            }
            let cert = builder.build::<p256::ecdsa::DerSignature>().unwrap();
            cert.to_pem(der::pem::LineEnding::LF).unwrap()
        }

        fn leaf() -> Profile {
            Profile::Leaf {
                issuer: Name::from_str("CN=alice,O=dev").unwrap(),
                enable_key_agreement: false,
                enable_key_encipherment: true,
            }
        }

        fn xfcc(pem: &str, hash: Option<String>) -> String {
            let encoded =
                percent_encoding::utf8_percent_encode(pem, percent_encoding::NON_ALPHANUMERIC);
            match hash {
                Some(hash) => format!("Hash={hash};Cert=\"{encoded}\""),
                None => format!("Cert=\"{encoded}\""),
            }
        }

        fn hex(bytes: &[u8]) -> String {
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        }

        #[test]
        fn traits_are_read_from_the_postal_code_json() {
            let with = |postal: &str| {
                certificate_for(
                    &format!("CN=alice,O=access,2.5.4.17={postal}"),
                    leaf(),
                    &[&[OID_CLIENT_AUTH]],
                )
            };
            // RFC 4514 escapes for `"` and `,` in the JSON.
            let pem = with(r#"{\"azure_identities\":[\"/a\"\,\"/b\"]\,\"logins\":null}"#);
            let identity = parse_app_certificate(&pem).unwrap();
            assert_eq!(identity.traits["azure_identities"], ["/a", "/b"]);
            assert!(identity.traits["logins"].is_empty());
            // No PostalCode: no traits.
            let pem = certificate(leaf(), &[&[OID_CLIENT_AUTH]]);
            assert!(parse_app_certificate(&pem).unwrap().traits.is_empty());
            for bad in [
                "not json",
                r#"[\"a\"]"#,
                r#"{\"x\":\"a\"}"#,
                r#"{\"x\":[1]}"#,
            ] {
                let err = parse_app_certificate(&with(bad)).unwrap_err();
                assert_eq!(err.code(), "InvalidClientCertificate", "{bad}");
            }
            let twice = certificate_for(
                "CN=alice,2.5.4.17={},2.5.4.17={}",
                leaf(),
                &[&[OID_CLIENT_AUTH]],
            );
            assert!(parse_app_certificate(&twice).is_err());
        }

        #[test]
        fn usage_app_and_cluster_are_checked_when_configured() {
            let pem = certificate_for(
                "CN=alice,O=access,OU=usage:apps,1.3.9999.1.10=azure-cli,1.3.9999.1.5=tele.example",
                leaf(),
                &[&[OID_CLIENT_AUTH]],
            );
            let identity = parse_app_certificate(&pem).unwrap();
            assert_eq!(identity.usage, ["usage:apps"]);
            let rules = |usage: Option<&str>, apps: &[&str], clusters: &[&str]| CertificateRules {
                required_usage: usage.map(String::from),
                allowed_apps: apps.iter().map(|s| s.to_string()).collect(),
                allowed_clusters: clusters.iter().map(|s| s.to_string()).collect(),
            };
            identity.check_route(&CertificateRules::default()).unwrap();
            identity
                .check_route(&rules(
                    Some("usage:apps"),
                    &["azure-cli"],
                    &["tele.example"],
                ))
                .unwrap();
            for refused in [
                rules(Some("usage:db"), &[], &[]),
                rules(None, &["other-app"], &[]),
                rules(None, &[], &["other.example"]),
            ] {
                let err = identity.check_route(&refused).unwrap_err();
                assert_eq!(err.code(), "CertificateNotForThisApp");
            }
            // A certificate without a route is refused by any list, accepted without one.
            let bare = parse_app_certificate(&certificate(leaf(), &[&[OID_CLIENT_AUTH]])).unwrap();
            bare.check_route(&CertificateRules::default()).unwrap();
            assert!(bare.check_route(&rules(None, &["azure-cli"], &[])).is_err());
            assert!(
                bare.check_route(&rules(Some("usage:apps"), &[], &[]))
                    .is_err()
            );
            let two_apps = certificate_for(
                "CN=alice,1.3.9999.1.10=a,1.3.9999.1.10=b",
                leaf(),
                &[&[OID_CLIENT_AUTH]],
            );
            assert!(parse_app_certificate(&two_apps).is_err());
        }

        #[test]
        fn a_client_certificate_needs_the_client_auth_usage() {
            let good = certificate(leaf(), &[&[SERVER_AUTH, OID_CLIENT_AUTH]]);
            assert_eq!(parse_app_certificate(&good).unwrap().user, "alice");
            for (pem, why) in [
                (certificate(leaf(), &[]), "no EKU"),
                (certificate(leaf(), &[&[SERVER_AUTH]]), "server only"),
                (
                    certificate(leaf(), &[&[OID_CLIENT_AUTH], &[OID_CLIENT_AUTH]]),
                    "repeated extension",
                ),
                (certificate(Profile::Root, &[&[OID_CLIENT_AUTH]]), "a CA"),
            ] {
                let err = parse_app_certificate(&pem).unwrap_err();
                assert_eq!(err.code(), "InvalidClientCertificate", "{why}");
            }
        }

        #[test]
        fn the_xfcc_hash_binds_the_certificate() {
            let pem = certificate(leaf(), &[&[OID_CLIENT_AUTH]]);
            let fingerprint = parse_app_certificate(&pem).unwrap().fingerprint;
            let good = xfcc(&pem, Some(hex(&fingerprint)));
            assert!(certificate_from_xfcc(&[&good]).is_ok());
            assert!(certificate_from_xfcc(&[&xfcc(&pem, None)]).is_ok());
            let mut other = fingerprint;
            other[0] ^= 1;
            let forged = xfcc(&pem, Some(hex(&other)));
            assert_eq!(
                certificate_from_xfcc(&[&forged]).unwrap_err().message(),
                "x-forwarded-client-cert: Hash does not match the certificate"
            );
        }
    }
}
