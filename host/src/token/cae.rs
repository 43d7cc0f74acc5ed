//! Continuous access evaluation: `token_sha256_to_refresh`, the parameter MSAL sends after a
//! resource answered 401 `insufficient_claims` to say "this token was rejected, get another".
//!
//! A provider evicts its cached token for (identity, resource) only when the hash is that
//! token's, so a client cannot force fetches at will: a hash of anything else (an older token,
//! garbage of the right shape) is answered from the cache as usual.

use std::fmt;

use sha2::{Digest, Sha256};

/// The SHA-256 of an access token's bytes, as `token_sha256_to_refresh` carries it (64 lower-case
/// hex digits).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenSha256([u8; 32]);

impl TokenSha256 {
    /// The query parameter that carries it.
    pub const PARAMETER: &'static str = "token_sha256_to_refresh";

    /// The hash of `token`.
    pub fn of(token: &str) -> TokenSha256 {
        TokenSha256(Sha256::digest(token.as_bytes()).into())
    }
}

impl std::str::FromStr for TokenSha256 {
    type Err = String;

    /// Exactly 64 lower-case hex digits (what MSAL's `hashlib.sha256(...).hexdigest()` and
    /// msal-node send).
    fn from_str(text: &str) -> Result<Self, String> {
        let bytes = text.as_bytes();
        let malformed = || format!("{} must be 64 lower-case hex digits", Self::PARAMETER);
        if bytes.len() != 64 {
            return Err(malformed());
        }
        let digit = |b: u8| match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            _ => None,
        };
        let mut hash = [0u8; 32];
        for (out, pair) in hash.iter_mut().zip(bytes.chunks_exact(2)) {
            let (Some(high), Some(low)) = (digit(pair[0]), digit(pair[1])) else {
                return Err(malformed());
            };
            *out = (high << 4) | low;
        }
        Ok(TokenSha256(hash))
    }
}

impl fmt::Display for TokenSha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

impl fmt::Debug for TokenSha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenSha256({self})")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    #[test]
    fn hashes_round_trip_through_their_hex_form() {
        // echo -n abc | sha256sum
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(TokenSha256::of("abc").to_string(), abc);
        assert_eq!(abc.parse::<TokenSha256>().unwrap(), TokenSha256::of("abc"));
    }

    #[test]
    fn anything_but_64_lower_case_hex_digits_is_refused() {
        let good = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        for bad in [
            "",
            &good[..63],
            &format!("{good}0"),
            &good.to_uppercase(),
            &format!("{}g", &good[..63]),
            &format!("{}é", &good[..62]),
            &"0".repeat(100_000),
        ] {
            assert!(bad.parse::<TokenSha256>().is_err(), "{bad:?}");
        }
    }
}
