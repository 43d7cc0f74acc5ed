//! XFCC values built around the real fixture certificates (keys, quotes, hashes, a second
//! `Cert` injected through a SAN, mutated DER), checked against the contract: exactly one
//! element, one `Cert`, every key at most once, no unknown key, `Hash` = SHA-256 of the DER.
#![no_main]

use azgate_fuzz::xfcc::{Expect, Xfcc};
use azgate_fuzz::{api, fixtures};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|spec: Xfcc| {
    let fx = fixtures();
    let (text, expect) = spec.render(fx);
    let Some(result) = api::xfcc_identity(&[text.as_bytes()]) else {
        return;
    };
    match (expect, &result) {
        (Expect::Refuse, Ok(identity)) => panic!(
            "accepted an XFCC the contract refuses (user {:?}): {text:?}",
            identity.user
        ),
        (Expect::Accept(which), Err(refusal)) => panic!(
            "refused a well-formed XFCC for the {which:?} certificate as {}: {} -- {text:?}",
            refusal.code(),
            refusal.message()
        ),
        (Expect::Accept(which), Ok(identity)) => {
            assert_eq!(
                identity.fingerprint,
                fx.cert(which).identity.fingerprint,
                "accepted another certificate than the one in Cert="
            );
        }
        _ => {}
    }
    if let Err(refusal) = &result {
        assert!(
            ["MissingClientCertificate", "InvalidClientCertificate"].contains(&refusal.code()),
            "XFCC refused as {}",
            refusal.code()
        );
    }
});
