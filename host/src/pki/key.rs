//! Private keys of app certificates: P-256, P-384 or RSA, as `tsh` keeps them.

use std::fmt;
use std::str::FromStr;

use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rand_core::OsRng;
use rsa::pkcs1::DecodeRsaPrivateKey;
use x509_cert::Certificate;
use x509_cert::der::{Decode, DecodePem, Encode};
use x509_cert::spki::SubjectPublicKeyInfoOwned;

use super::{PkiError, cert_error};

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
    pub fn generate(kind: KeyKind) -> Result<Self, PkiError> {
        Ok(match kind {
            KeyKind::P256 => Self::P256(p256::ecdsa::SigningKey::random(&mut OsRng)),
            KeyKind::Rsa => Self::Rsa(Box::new(
                rsa::RsaPrivateKey::new(&mut OsRng, 2048).map_err(cert_error)?,
            )),
        })
    }

    /// Reads a PEM key: PKCS#8 (`PRIVATE KEY`), SEC1 (`EC PRIVATE KEY`, P-256) or PKCS#1
    /// (`RSA PRIVATE KEY`), the forms tsh and openssl write.
    pub fn from_pem(pem: &str) -> Result<Self, PkiError> {
        let unsupported =
            || PkiError::Invalid("the key is not an ECDSA P-256 or RSA private key in PEM".into());
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

    fn rsa(key: rsa::RsaPrivateKey) -> Result<Self, PkiError> {
        use rsa::traits::PublicKeyParts;
        if key.size() * 8 < 2048 {
            return Err(PkiError::Invalid(
                "RSA keys must have at least 2048 bits".into(),
            ));
        }
        Ok(Self::Rsa(Box::new(key)))
    }

    /// PKCS#8 PEM.
    pub fn to_pem(&self) -> Result<String, PkiError> {
        let pem = match self {
            Self::P256(key) => key.to_pkcs8_pem(LineEnding::LF),
            Self::Rsa(key) => key.to_pkcs8_pem(LineEnding::LF),
        }
        .map_err(cert_error)?;
        Ok(pem.to_string())
    }

    /// The SubjectPublicKeyInfo, DER.
    pub fn public_key_der(&self) -> Result<Vec<u8>, PkiError> {
        let der = match self {
            Self::P256(key) => key.verifying_key().to_public_key_der(),
            Self::Rsa(key) => key.to_public_key().to_public_key_der(),
        }
        .map_err(cert_error)?;
        Ok(der.into_vec())
    }

    /// The SubjectPublicKeyInfo, for a certificate builder.
    pub fn public_key_info(&self) -> Result<SubjectPublicKeyInfoOwned, PkiError> {
        SubjectPublicKeyInfoOwned::from_der(&self.public_key_der()?).map_err(cert_error)
    }

    /// `claims` as a JWT signed with this key (`typ: JWT`; ES256 for P-256, RS256 for RSA, as
    /// tsh signs), through `jsonwebtoken`.
    pub fn sign_jwt(&self, claims: &serde_json::Value) -> Result<String, PkiError> {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        let (algorithm, key) = match self {
            Self::P256(key) => (
                jsonwebtoken::Algorithm::ES256,
                jsonwebtoken::EncodingKey::from_ec_der(
                    key.to_pkcs8_der().map_err(cert_error)?.as_bytes(),
                ),
            ),
            Self::Rsa(key) => (
                jsonwebtoken::Algorithm::RS256,
                jsonwebtoken::EncodingKey::from_rsa_der(
                    key.to_pkcs1_der().map_err(cert_error)?.as_bytes(),
                ),
            ),
        };
        jsonwebtoken::encode(&jsonwebtoken::Header::new(algorithm), claims, &key)
            .map_err(cert_error)
    }

    /// Fails unless `cert_pem`'s public key is this key's.
    pub fn check_matches(&self, cert_pem: &str) -> Result<(), PkiError> {
        let cert = Certificate::from_pem(cert_pem.as_bytes())
            .map_err(|e| PkiError::Invalid(format!("the certificate cannot be parsed ({e})")))?;
        let spki = cert
            .tbs_certificate
            .subject_public_key_info
            .to_der()
            .map_err(cert_error)?;
        if spki != self.public_key_der()? {
            return Err(PkiError::Invalid(
                "the key does not belong to the certificate".into(),
            ));
        }
        Ok(())
    }
}
