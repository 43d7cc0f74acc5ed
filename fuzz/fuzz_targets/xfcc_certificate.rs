//! XFCC parsing and certificate parsing on arbitrary bytes: the input is split on NUL into
//! header values (a header value cannot hold NUL, so every split is a real header list).
//! Checks: no panic; only certificate refusals; PEM and DER parsing of the same bytes agree.
#![no_main]

use azgate_fuzz::{api, pem_of};
use libfuzzer_sys::fuzz_target;

const CERT_CODES: [&str; 2] = ["MissingClientCertificate", "InvalidClientCertificate"];

fuzz_target!(|data: &[u8]| {
    let values: Vec<&[u8]> = if data.is_empty() {
        Vec::new()
    } else {
        data.split(|b| *b == 0).collect()
    };
    if let Some(Err(refusal)) = api::xfcc_identity(&values) {
        assert!(
            CERT_CODES.contains(&refusal.code()),
            "XFCC refused as {}",
            refusal.code()
        );
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Err(refusal) = api::parse_certificate(text)
    {
        assert_eq!(refusal.code(), "InvalidClientCertificate");
    }
    let from_der = api::parse_certificate_der(data);
    let from_pem = api::parse_certificate(&pem_of(data));
    match (&from_der, &from_pem) {
        (Ok(d), Ok(p)) => {
            assert_eq!(
                d.fingerprint, p.fingerprint,
                "PEM and DER fingerprints differ"
            );
            assert_eq!(d.user, p.user);
            assert_eq!(d.roles, p.roles);
            assert_eq!(d.selected_identity, p.selected_identity);
        }
        (Err(_), Err(_)) => {}
        _ => panic!(
            "DER and PEM of the same bytes disagree: der ok={} pem ok={}",
            from_der.is_ok(),
            from_pem.is_ok()
        ),
    }
});
