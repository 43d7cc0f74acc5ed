//! The filter and host entry points the targets call, in one place: when an API changes (strings
//! to bytes, a new argument), only this file changes.

use azgate_filter::config::Config;
use azgate_filter::decision::{self, AuditFields, Grant, VerificationCache};
use azgate_filter::error::Refusal;
use azgate_filter::identity::{self, AppIdentity, PublicKey};
use azgate_filter::jwt::{self, Claims};

/// The URL-decoded PEM of the XFCC values, or `None` when the API cannot take these bytes (the
/// filter's header layer refuses non-UTF-8 before the XFCC parser sees it).
pub fn xfcc_pem(values: &[&[u8]]) -> Option<Result<String, Refusal>> {
    let text: Vec<&str> = values
        .iter()
        .map(|v| std::str::from_utf8(v).ok())
        .collect::<Option<_>>()?;
    Some(identity::parse_xfcc(&text).map(|forwarded| forwarded.pem))
}

/// Parses a PEM certificate.
pub fn parse_certificate(pem: &str) -> Result<AppIdentity, Refusal> {
    identity::parse_app_certificate(pem)
}

/// Parses a DER certificate.
pub fn parse_certificate_der(der: &[u8]) -> Result<AppIdentity, Refusal> {
    identity::parse_app_certificate_der(der)
}

/// XFCC values to the caller's identity, the way the decision does it (`Hash` checked).
pub fn xfcc_identity(values: &[&[u8]]) -> Option<Result<AppIdentity, Refusal>> {
    let text: Vec<&str> = values
        .iter()
        .map(|v| std::str::from_utf8(v).ok())
        .collect::<Option<_>>()?;
    Some(identity::certificate_from_xfcc(&text))
}

/// Verifies a compact JWS against a certificate key.
pub fn verify(token: &str, key: &PublicKey) -> Result<Claims, Refusal> {
    jwt::verify(token, key)
}

/// The bearer token of an `Authorization` value.
pub fn bearer_token(authorization: &str, max_bytes: usize) -> Result<&str, Refusal> {
    jwt::bearer_token(authorization, max_bytes)
}

/// The whole decision on the host's header pairs.
pub fn decide(
    pairs: &[(String, Vec<u8>)],
    config: &Config,
    now: i64,
    cache: &mut VerificationCache,
) -> (AuditFields, Result<Grant, Refusal>) {
    decision::decide_header_map(pairs, config, now, cache)
}

/// The plugin configuration parser.
pub fn parse_config(bytes: &[u8]) -> Result<Config, String> {
    Config::parse(bytes).map_err(|e| e.to_string())
}
