//! Listener TLS (rustls, client certificates verified against the configured CAs) and the
//! `x-forwarded-client-cert` value built from the verified peer certificate, in the format
//! Envoy's `SANITIZE_SET` writes with only `cert` set (`Hash` and `Cert`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use base64::Engine;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use x509_cert::der::Decode;

use super::error::ServeError;
use crate::config::{ClientCertificateMode, TlsConfig};

/// Reads every certificate of a PEM file.
pub(crate) fn read_certs(
    path: &std::path::Path,
) -> Result<Vec<CertificateDer<'static>>, ServeError> {
    CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ServeError::Config(format!("{}: {e}", path.display())))
}

/// The rustls server configuration of a listener.
pub(crate) fn server_config(tls: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for file in &tls.client_ca {
        for cert in read_certs(file)? {
            roots
                .add(cert)
                .map_err(|e| ServeError::Config(format!("{}: {e}", file.display())))?;
        }
    }
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    if tls.client_certificate == ClientCertificateMode::Optional {
        builder = builder.allow_unauthenticated();
    }
    let webpki = builder
        .build()
        .map_err(|e| ServeError::Config(format!("client CA: {e}")))?;
    let verifier: Arc<dyn ClientCertVerifier> = if tls.accept_expired_client_certificates {
        Arc::new(ExpiryTolerant { inner: webpki })
    } else {
        webpki
    };
    let certs = read_certs(&tls.cert)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| ServeError::Config(format!("{}: {e}", tls.key.display())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServeError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| ServeError::Config(format!("{}: {e}", tls.cert.display())))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Verifies chains as webpki does but at a time inside the certificate's validity, so an
/// expired or not-yet-valid certificate reaches the filter (which then refuses it itself).
/// Test listeners only (`accept_expired_client_certificates`).
#[derive(Debug)]
struct ExpiryTolerant {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for ExpiryTolerant {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. },
            )) => {
                let cert = x509_cert::Certificate::from_der(end_entity).map_err(|_| {
                    rustls::Error::InvalidCertificate(CertificateError::BadEncoding)
                })?;
                let inside = cert.tbs_certificate.validity.not_before.to_unix_duration()
                    + std::time::Duration::from_secs(1);
                self.inner.verify_client_cert(
                    end_entity,
                    intermediates,
                    UnixTime::since_unix_epoch(inside),
                )
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What the filter and properties learn about a verified client certificate.
#[derive(Clone, Debug)]
pub(crate) struct PeerCertificate {
    /// The XFCC value.
    pub(crate) xfcc: String,
    /// Subject, RFC 4514.
    pub(crate) subject: String,
    /// SHA-256 of the DER, lower-case hex.
    pub(crate) sha256: String,
}

/// The subject (RFC 4514) of the first certificate in a PEM file.
pub(crate) fn certificate_subject(path: &std::path::Path) -> Option<String> {
    let first = read_certs(path).ok()?.into_iter().next()?;
    let cert = x509_cert::Certificate::from_der(first.as_ref()).ok()?;
    Some(rfc2253(&cert.tbs_certificate.subject))
}

/// OpenSSL's short names, as Envoy (BoringSSL's `X509_NAME_print_ex` with `XN_FLAG_RFC2253`)
/// prints them in `connection.subject_*`; other attributes print as the dotted OID.
const SHORT_NAMES: &[(&str, &str)] = &[
    ("2.5.4.3", "CN"),
    ("2.5.4.6", "C"),
    ("2.5.4.7", "L"),
    ("2.5.4.8", "ST"),
    ("2.5.4.9", "street"),
    ("2.5.4.10", "O"),
    ("2.5.4.11", "OU"),
    ("2.5.4.17", "postalCode"),
    ("2.5.4.5", "serialNumber"),
    ("0.9.2342.19200300.100.1.25", "DC"),
    ("0.9.2342.19200300.100.1.1", "UID"),
    ("1.2.840.113549.1.9.1", "emailAddress"),
];

/// A Subject as Envoy prints it: RDNs last first, a multi-valued RDN's attributes joined by
/// `+`; known attributes as text (RFC 2253 escapes, control and non-ASCII bytes as `\XX`),
/// others as `#` and their DER in upper-case hex.
fn rfc2253(name: &x509_cert::name::Name) -> String {
    use x509_cert::der::Encode;
    let mut rdns = Vec::new();
    for rdn in name.0.iter().rev() {
        let mut attributes = Vec::new();
        for attribute in rdn.0.iter() {
            let oid = attribute.oid.to_string();
            let known = SHORT_NAMES.iter().find(|(o, _)| *o == oid);
            let text = std::str::from_utf8(attribute.value.value()).ok();
            let rendered = match (known, text) {
                (Some((_, short)), Some(text)) => format!("{short}={}", escape_2253(text)),
                _ => {
                    let der = attribute.value.to_der().unwrap_or_default();
                    let hex: String = der.iter().map(|b| format!("{b:02X}")).collect();
                    format!("{}=#{hex}", known.map_or(oid.as_str(), |(_, s)| s))
                }
            };
            attributes.push(rendered);
        }
        rdns.push(attributes.join("+"));
    }
    rdns.join(",")
}

/// RFC 2253 escaping as BoringSSL does it for `XN_FLAG_RFC2253`.
fn escape_2253(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::new();
    for (i, &b) in bytes.iter().enumerate() {
        let edge = (i == 0 && (b == b'#' || b == b' ')) || (i + 1 == bytes.len() && b == b' ');
        match b {
            _ if edge || b",+\"\\<>;".contains(&b) => {
                out.push('\\');
                out.push(char::from(b));
            }
            0x00..=0x1f | 0x7f..=0xff => out.push_str(&format!("\\{b:02X}")),
            _ => out.push(char::from(b)),
        }
    }
    out
}

/// Envoy's name of a TLS version (`connection.tls_version`).
pub(crate) fn version_name(version: rustls::ProtocolVersion) -> String {
    match version {
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".into(),
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".into(),
        other => format!("{other:?}"),
    }
}

/// Characters of the PEM escaped in XFCC's `Cert=` (everything but RFC 3986 unreserved).
const XFCC_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Describes the certificate `der` whose SHA-256 is `sha256`. Its XFCC value is
/// `Hash=<sha256>;Cert="<url-encoded PEM>"`, the only keys the filter reads. Subject, URI and
/// DNS are left out on purpose: they are text the certificate's holder chose, and a SAN such as
/// `x;Cert="..."` written unescaped would add a second `Cert` key.
fn describe(der: &[u8], sha256: &[u8]) -> PeerCertificate {
    let hash: String = sha256.iter().map(|b| format!("{b:02x}")).collect();
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    let subject = x509_cert::Certificate::from_der(der)
        .map(|cert| rfc2253(&cert.tbs_certificate.subject))
        .unwrap_or_default();
    PeerCertificate {
        xfcc: format!(
            "Hash={hash};Cert=\"{}\"",
            utf8_percent_encode(&pem, XFCC_VALUE)
        ),
        subject,
        sha256: hash,
    }
}

/// The client certificates of one listener's open connections on one worker, by SHA-256 of
/// their DER: a user's connections (az and the SDKs open several) share one description, with
/// its ~3 KB XFCC value, instead of each holding a copy, and a reconnecting client's is not
/// built again. An entry lives as long as a connection holds it.
#[derive(Default)]
pub(crate) struct PeerCertificates {
    known: RefCell<HashMap<[u8; 32], Weak<PeerCertificate>>>,
    /// Size at which entries whose connections all closed are dropped.
    prune_at: Cell<usize>,
}

impl PeerCertificates {
    /// Entries kept before the first pruning.
    const FIRST_PRUNE: usize = 64;

    /// The description of the certificate `der`, shared with the connections that have it.
    pub(crate) fn get(&self, der: &[u8]) -> Rc<PeerCertificate> {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let Ok(key) = <[u8; 32]>::try_from(digest.as_ref()) else {
            // SHA-256 is 32 bytes; were it not, the certificate is just not shared.
            return Rc::new(describe(der, digest.as_ref()));
        };
        let mut known = self.known.borrow_mut();
        if let Some(shared) = known.get(&key).and_then(Weak::upgrade) {
            return shared;
        }
        let described = Rc::new(describe(der, &key));
        known.insert(key, Rc::downgrade(&described));
        if known.len() >= self.prune_at.get().max(Self::FIRST_PRUNE) {
            known.retain(|_, held| held.strong_count() > 0);
            self.prune_at.set(2 * known.len());
        }
        described
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.known.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    fn peer_certificate(der: &[u8]) -> PeerCertificate {
        describe(
            der,
            ring::digest::digest(&ring::digest::SHA256, der).as_ref(),
        )
    }

    use std::time::{Duration, SystemTime};

    use percent_encoding::percent_decode_str;
    use x509_cert::der::{DecodePem, Encode};

    use super::*;
    use crate::pki::{AppKey, CertificateAuthority, KeyKind};

    /// A certificate whose SANs carry XFCC syntax writes only `Hash` and `Cert`: one `Cert`
    /// key, the hash of this certificate, and the PEM of this certificate.
    #[test]
    fn xfcc_carries_only_hash_and_cert_whatever_the_sans_say() {
        let ca = CertificateAuthority::generate("xfcc test", Duration::from_secs(3600)).unwrap();
        let key = AppKey::generate(KeyKind::P256).unwrap();
        let forged = r#"x;Cert="-----BEGIN%20CERTIFICATE-----%0AAAAA%0A-----END%20CERTIFICATE-----%0A";Subject="CN=admin""#;
        let now = SystemTime::now();
        let pem = ca
            .issue_server(
                &["gateway.test", forged],
                &[],
                key.public_key_info().unwrap(),
                now - Duration::from_secs(60),
                now + Duration::from_secs(600),
            )
            .unwrap();
        let der = x509_cert::Certificate::from_pem(pem.as_bytes())
            .unwrap()
            .to_der()
            .unwrap();
        let peer = peer_certificate(&der);

        let hash: String = ring::digest::digest(&ring::digest::SHA256, &der)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(peer.sha256, hash);
        assert_eq!(peer.subject, "CN=gateway.test");
        let encoded = peer
            .xfcc
            .strip_prefix(&format!("Hash={hash};Cert=\""))
            .and_then(|rest| rest.strip_suffix('"'))
            .unwrap_or_else(|| panic!("unexpected XFCC shape: {}", peer.xfcc));
        // Nothing of the SAN text survives: no quote, separator or key inside the value.
        assert!(
            encoded
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'%' || b"-._~".contains(&b)),
            "{encoded}"
        );
        assert_eq!(peer.xfcc.matches("Cert=").count(), 1);
        assert!(!peer.xfcc.contains("Subject") && !peer.xfcc.contains("DNS"));
        let decoded = percent_decode_str(encoded).decode_utf8().unwrap();
        let round_trip = x509_cert::Certificate::from_pem(decoded.as_bytes())
            .unwrap()
            .to_der()
            .unwrap();
        assert_eq!(round_trip, der);
    }

    fn server_der(ca: &CertificateAuthority, name: &str) -> Vec<u8> {
        let key = AppKey::generate(KeyKind::P256).unwrap();
        let now = SystemTime::now();
        let pem = ca
            .issue_server(
                &[name],
                &[],
                key.public_key_info().unwrap(),
                now - Duration::from_secs(60),
                now + Duration::from_secs(600),
            )
            .unwrap();
        x509_cert::Certificate::from_pem(pem.as_bytes())
            .unwrap()
            .to_der()
            .unwrap()
    }

    #[test]
    fn connections_with_one_certificate_share_its_description_while_any_is_open() {
        let ca = CertificateAuthority::generate("share test", Duration::from_secs(3600)).unwrap();
        let (alice, bob) = (server_der(&ca, "alice.test"), server_der(&ca, "bob.test"));
        let table = PeerCertificates::default();
        let first = table.get(&alice);
        let second = table.get(&alice);
        assert!(Rc::ptr_eq(&first, &second));
        assert_eq!(first.xfcc, peer_certificate(&alice).xfcc);
        let other = table.get(&bob);
        assert!(!Rc::ptr_eq(&first, &other));
        assert_eq!(other.subject, "CN=bob.test");
        // Once every connection with it closed, a new one gets a fresh (equal) description.
        drop((first, second));
        let again = table.get(&alice);
        assert_eq!(again.sha256, peer_certificate(&alice).sha256);
        // Closed connections' entries are dropped as the table grows: it stays bounded by
        // about twice the certificates in use.
        for i in 0..3 * PeerCertificates::FIRST_PRUNE {
            drop(table.get(&server_der(&ca, &format!("c{i}.test"))));
        }
        assert!(
            table.len() <= PeerCertificates::FIRST_PRUNE,
            "{}",
            table.len()
        );
        assert!(Rc::ptr_eq(&again, &table.get(&alice)));
        drop(other);
    }
}
