//! Keys, a local certificate authority for Teleport-format app certificates (`azgate ca ...`)
//! and Teleport identity selection, for demos, tests and clusters without Teleport.
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
use std::path::PathBuf;
use std::time::Duration;

pub use azgate_filter::template::Traits;
use x509_cert::der::asn1::ObjectIdentifier;

mod ca;
mod files;
mod identity;
mod key;

pub use ca::{AppCertificate, CertificateAuthority};
pub use files::{create_private_dir, parse_duration, write_file};
pub use identity::{allowed_identities, load_roles, select_identity};
pub use key::{AppKey, KeyKind};

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
pub(crate) const BACKDATE: Duration = Duration::from_secs(60);

/// What went wrong in the dev CA.
#[derive(Debug)]
#[non_exhaustive]
pub enum PkiError {
    /// A file could not be read or written.
    Io(PathBuf, std::io::Error),
    /// Bad input: a role file, a flag value, a key or certificate.
    Invalid(String),
    /// Identity selection failed (none allowed, several and none chosen, no match, ambiguous).
    Selection(String),
    /// Building or signing a certificate failed.
    Certificate(String),
}

impl fmt::Display for PkiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(path, error) => write!(f, "{}: {error}", path.display()),
            Self::Invalid(message) | Self::Selection(message) | Self::Certificate(message) => {
                f.write_str(message)
            }
        }
    }
}

impl std::error::Error for PkiError {}

pub(crate) fn cert_error(error: impl fmt::Display) -> PkiError {
    PkiError::Certificate(error.to_string())
}

#[cfg(test)]
mod tests;
