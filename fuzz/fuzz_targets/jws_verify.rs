//! JWS verification and `Authorization` parsing on arbitrary text, against the fixture P-256
//! and RSA keys. Seeds are fixture tokens, so mutations reach past the signature check only when
//! the signing input is unchanged. Checks: no panic; only `InvalidToken`; a token that verifies
//! was signed by that key (no forgery) and meets the JWS contract.
#![no_main]

use azgate_fuzz::{Which, api, assert_verified_token_meets_contract, fixtures};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let fx = fixtures();
    check_token(text);
    for max in [256, 8192] {
        match api::bearer_token(text, max) {
            Ok(token) => {
                assert!(!token.is_empty() && token.len() <= max);
                assert!(!token.contains(',') && !token.contains(char::is_whitespace));
                assert!(text.contains(token));
                check_token(token);
            }
            Err(refusal) => assert!(
                ["InvalidAuthorizationHeader", "TokenTooLarge"].contains(&refusal.code()),
                "Authorization refused as {}",
                refusal.code()
            ),
        }
    }
    let _ = fx;
});

fn check_token(token: &str) {
    let fx = fixtures();
    for which in [Which::P256, Which::Rsa] {
        match api::verify(token, fx.key(which)) {
            Ok(claims) => {
                assert_eq!(
                    fx.signer(token),
                    Some(which),
                    "a token verified under the {which:?} key that it did not sign"
                );
                assert_verified_token_meets_contract(token, which);
                assert!(!claims.resource.is_empty());
            }
            Err(refusal) => assert_eq!(refusal.code(), "InvalidToken"),
        }
    }
}
