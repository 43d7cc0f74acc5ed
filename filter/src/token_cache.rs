//! Token cache rules, shared by every worker through proxy-wasm shared data.
//!
//! One shared-data entry per (identity, resource) holds a [`Record`]:
//! - `Ready`: a token, used until `expires_on` minus the margin;
//! - `Fetching`: a worker has claimed the fetch (by compare-and-swap) at `since_ms`; others wait
//!   and poll. A claim older than the lock TTL is abandoned and may be taken over;
//! - `Failed`: the last fetch failed at `at_ms`. Only requests that were already waiting for that
//!   fetch get the error; later requests fetch again (errors are not cached);
//! - `Revoked`: Azure refused the cached token with a claims challenge (CAE,
//!   `error="insufficient_claims"`): a miss for every worker, and the next fetch carries the
//!   refused token's SHA-256 (`token_sha256_to_refresh`) so the token service replaces the token
//!   it caches too.
//!
//! Updates of an existing entry are compare-and-swaps, so of many workers racing for an expired
//! token exactly one fetches. Shared data has no "create if absent" (a CAS on a missing key always
//! succeeds), so the very first claim of a key is settled instead: each racer writes a claim with
//! its own nonce and, one poll interval later, only the worker whose nonce survived fetches. The
//! racers' writes all land within microseconds of their reads of the empty key, so after the
//! interval the entry is stable. The cost is one poll interval on the first fetch of a key.
//! The store is abstracted by [`SharedStore`] so these rules run natively in tests.

use serde::{Deserialize, Serialize};

use crate::error::Refusal;
use crate::imds::AccessToken;

/// Prefix of the shared-data keys; bump the version when [`Record`] changes shape.
const KEY_PREFIX: &str = "azgate.token.v2";
/// How many times a compare-and-swap is retried before giving up on a contended key.
const MAX_CAS_ATTEMPTS: usize = 16;

/// The shared-data key for (identity, resource). Identities compare case-insensitively, so the
/// folded ID is used; resources are exact strings, as IMDS treats them. The identity is
/// length-prefixed so no pair of strings can produce another pair's key.
pub fn cache_key(folded_identity: &str, resource: &str) -> String {
    format!(
        "{KEY_PREFIX}|{}|{folded_identity}|{resource}",
        folded_identity.len()
    )
}

/// What a shared-data entry holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Record {
    /// The last fetch failed.
    Failed {
        /// When, Unix milliseconds.
        at_ms: i64,
        /// The refusal code the waiters get.
        code: String,
        /// Its message.
        message: String,
    },
    /// A worker is fetching.
    Fetching {
        /// Claimed at, Unix milliseconds.
        since_ms: i64,
        /// The claimant's nonce.
        nonce: u64,
        /// SHA-256 (hex) of a revoked token this fetch replaces.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        refresh: Option<String>,
    },
    /// Azure refused this token with a claims challenge: fetch a new one.
    Revoked {
        /// SHA-256 (hex) of the refused token.
        token_sha256: String,
    },
    /// A usable token.
    Ready {
        /// The bearer token.
        token: String,
        /// Expiry, Unix seconds.
        expires_on: i64,
        /// Use until, Unix seconds (expiry minus margin).
        use_until: i64,
    },
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        // Serialising this enum of strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.is_empty() {
            return None;
        }
        serde_json::from_slice(bytes).ok()
    }
}

/// A compare-and-swap key-value store: proxy-wasm shared data, or a map in tests.
pub trait SharedStore {
    /// The value and its CAS version, if the key exists.
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Writes if `cas` is `None` or still current; `Ok(false)` on a CAS mismatch.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, Refusal>;
}

/// The answer to "I need a token for this key".
#[derive(Debug, PartialEq, Eq)]
pub enum Acquire {
    /// Use this token now.
    Hit(AccessToken),
    /// This worker claimed the fetch: dispatch the call-out.
    Fetch,
    /// This worker wrote the first claim of a new key: after one poll interval, call
    /// [`Rules::confirm`] to learn whether the claim survived.
    Settle,
    /// Another worker is fetching: wait and poll.
    Wait,
}

/// The answer to "is the fetch I am waiting for done?".
#[derive(Debug, PartialEq, Eq)]
pub enum Poll {
    /// The token arrived.
    Ready(AccessToken),
    /// The fetch failed after the waiter started waiting.
    Failed(Refusal),
    /// Still fetching.
    Pending,
    /// The fetching worker vanished (its claim went stale) and this worker took it over:
    /// dispatch the call-out.
    Fetch,
    /// The entry had vanished and this worker wrote a first claim: confirm after an interval.
    Settle,
}

/// Timing rules of the cache.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    /// Tokens are used until `expires_on` minus this many seconds.
    pub expiry_margin_s: i64,
    /// A `Fetching` claim older than this is considered abandoned, ms.
    pub lock_ttl_ms: i64,
}

impl Rules {
    /// When a token expiring at `expires_on`, received at `now`, stops being served. A token
    /// with less life left than twice the margin is served for half of what is left, so
    /// short-lived tokens are still cached and never served expired.
    pub fn use_until(&self, expires_on: i64, now: i64) -> i64 {
        let left = expires_on - now;
        if left > 2 * self.expiry_margin_s {
            expires_on - self.expiry_margin_s
        } else {
            now + left / 2
        }
    }

    /// Looks the key up; on a miss tries to claim the fetch with `nonce`.
    pub fn acquire(
        &self,
        store: &dyn SharedStore,
        key: &str,
        now_ms: i64,
        nonce: u64,
    ) -> Result<Acquire, Refusal> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (value, cas) = store.get(key);
            let record = value.as_deref().and_then(Record::decode);
            // A claim that replaces a revoked token carries its hash on.
            let refresh = match &record {
                Some(Record::Revoked { token_sha256 }) => Some(token_sha256.clone()),
                Some(Record::Fetching { refresh, .. }) => refresh.clone(),
                _ => None,
            };
            let claim = Record::Fetching {
                since_ms: now_ms,
                nonce,
                refresh,
            };
            match (record, cas) {
                (
                    Some(Record::Ready {
                        token,
                        expires_on,
                        use_until,
                    }),
                    _,
                ) if now_ms < use_until * 1000 => {
                    return Ok(Acquire::Hit(AccessToken {
                        secret: token,
                        expires_on,
                    }));
                }
                (Some(Record::Fetching { since_ms, .. }), _)
                    if now_ms - since_ms < self.lock_ttl_ms =>
                {
                    return Ok(Acquire::Wait);
                }
                // Never written: no CAS can protect the first write; settle instead.
                (_, None) => {
                    store.set(key, &claim.encode(), None)?;
                    return Ok(Acquire::Settle);
                }
                // Expired, failed, stale or unreadable: claim it by compare-and-swap.
                (_, Some(cas)) => {
                    if store.set(key, &claim.encode(), Some(cas))? {
                        return Ok(Acquire::Fetch);
                    }
                }
            }
        }
        Err(Refusal::TokenUnavailable(
            "the token cache is too contended; try again".into(),
        ))
    }

    /// After [`Acquire::Settle`]: did this worker's first claim (with `nonce`) survive?
    pub fn confirm(
        &self,
        store: &dyn SharedStore,
        key: &str,
        nonce: u64,
        now_ms: i64,
    ) -> Result<Poll, Refusal> {
        let (value, _) = store.get(key);
        match value.as_deref().and_then(Record::decode) {
            Some(Record::Fetching { nonce: n, .. }) if n == nonce => Ok(Poll::Fetch),
            _ => self.poll(store, key, now_ms, now_ms, nonce),
        }
    }

    /// Re-reads the key for a request waiting since `waiting_since_ms`.
    pub fn poll(
        &self,
        store: &dyn SharedStore,
        key: &str,
        waiting_since_ms: i64,
        now_ms: i64,
        nonce: u64,
    ) -> Result<Poll, Refusal> {
        let (value, _) = store.get(key);
        match value.as_deref().and_then(Record::decode) {
            Some(Record::Ready {
                token,
                expires_on,
                use_until,
            }) if now_ms < use_until * 1000 => Ok(Poll::Ready(AccessToken {
                secret: token,
                expires_on,
            })),
            Some(Record::Failed {
                at_ms,
                code,
                message,
            }) if at_ms >= waiting_since_ms => Ok(Poll::Failed(refusal_from_code(&code, message))),
            Some(Record::Fetching { since_ms, .. }) if now_ms - since_ms < self.lock_ttl_ms => {
                Ok(Poll::Pending)
            }
            _ => match self.acquire(store, key, now_ms, nonce)? {
                Acquire::Hit(token) => Ok(Poll::Ready(token)),
                Acquire::Fetch => Ok(Poll::Fetch),
                Acquire::Settle => Ok(Poll::Settle),
                Acquire::Wait => Ok(Poll::Pending),
            },
        }
    }

    /// Azure refused `token` (a claims challenge): if the key still holds it, mark it revoked,
    /// so no worker injects it again and the next fetch asks for a fresh one. `Ok(true)` if
    /// this call revoked it; a key already holding another token is left alone.
    pub fn revoke(&self, store: &dyn SharedStore, key: &str, token: &str) -> Result<bool, Refusal> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (value, cas) = store.get(key);
            match (value.as_deref().and_then(Record::decode), cas) {
                (Some(Record::Ready { token: cached, .. }), Some(cas)) if cached == token => {
                    let revoked = Record::Revoked {
                        token_sha256: token_sha256(token),
                    };
                    if store.set(key, &revoked.encode(), Some(cas))? {
                        return Ok(true);
                    }
                }
                _ => return Ok(false),
            }
        }
        Err(Refusal::TokenUnavailable(
            "the token cache is too contended; try again".into(),
        ))
    }

    /// The hash of the revoked token the fetch this worker claimed replaces, if any: sent to the
    /// token service as `token_sha256_to_refresh`.
    pub fn refresh_hash(&self, store: &dyn SharedStore, key: &str) -> Option<String> {
        match store.get(key).0.as_deref().and_then(Record::decode) {
            Some(Record::Fetching { refresh, .. }) => refresh,
            _ => None,
        }
    }

    /// Publishes the outcome of this worker's fetch.
    pub fn complete(
        &self,
        store: &dyn SharedStore,
        key: &str,
        outcome: &Result<AccessToken, Refusal>,
        now_ms: i64,
    ) -> Result<(), Refusal> {
        let record = match outcome {
            Ok(token) => Record::Ready {
                token: token.secret.clone(),
                expires_on: token.expires_on,
                use_until: self.use_until(token.expires_on, now_ms / 1000),
            },
            Err(refusal) => Record::Failed {
                at_ms: now_ms,
                code: refusal.code().to_string(),
                message: refusal.message().to_string(),
            },
        };
        // Unconditional: this worker holds the claim, and a newer token is never worse.
        store.set(key, &record.encode(), None).map(|_| ())
    }
}

/// Lower-case hex SHA-256 of a token, as MSAL's `token_sha256_to_refresh` spells it.
pub fn token_sha256(token: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Rebuilds a token-service refusal published by another worker.
fn refusal_from_code(code: &str, message: String) -> Refusal {
    match code {
        "TokenServiceTimeout" => Refusal::TokenServiceTimeout(message),
        "InvalidTokenServiceResponse" => Refusal::InvalidTokenServiceResponse(message),
        _ => Refusal::TokenUnavailable(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// Envoy's shared data semantics: every write gets a new non-zero cas; a cas only guards a
    /// key that exists.
    #[derive(Default)]
    struct MapStore {
        entries: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        next_cas: RefCell<u32>,
    }

    impl SharedStore for MapStore {
        fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            match self.entries.borrow().get(key) {
                Some((v, cas)) => (Some(v.clone()), Some(*cas)),
                None => (None, None),
            }
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, Refusal> {
            let mut entries = self.entries.borrow_mut();
            if let Some(expected) = cas.filter(|c| *c != 0)
                && entries.get(key).is_some_and(|(_, c)| *c != expected)
            {
                return Ok(false);
            }
            *self.next_cas.borrow_mut() += 1;
            entries.insert(key.to_string(), (value.to_vec(), *self.next_cas.borrow()));
            Ok(true)
        }
    }

    const RULES: Rules = Rules {
        expiry_margin_s: 300,
        lock_ttl_ms: 6_000,
    };

    fn token(expires_on: i64) -> AccessToken {
        AccessToken {
            secret: "t".into(),
            expires_on,
        }
    }

    /// Claims a cold key for worker `nonce` the way the filter does: settle, then confirm.
    fn claim(store: &MapStore, nonce: u64, now_ms: i64) {
        assert_eq!(
            RULES.acquire(store, "k", now_ms, nonce).unwrap(),
            Acquire::Settle
        );
        assert_eq!(
            RULES.confirm(store, "k", nonce, now_ms + 10).unwrap(),
            Poll::Fetch
        );
    }

    #[test]
    fn racing_first_claims_settle_on_exactly_one_fetcher() {
        let store = MapStore::default();
        // Two workers both saw the empty key and both wrote a claim.
        assert_eq!(RULES.acquire(&store, "k", 0, 1).unwrap(), Acquire::Settle);
        store.entries.borrow_mut().remove("k");
        assert_eq!(RULES.acquire(&store, "k", 0, 2).unwrap(), Acquire::Settle);
        // Worker 2's write landed last: it fetches, worker 1 waits.
        assert_eq!(RULES.confirm(&store, "k", 1, 10).unwrap(), Poll::Pending);
        assert_eq!(RULES.confirm(&store, "k", 2, 10).unwrap(), Poll::Fetch);
    }

    #[test]
    fn first_caller_fetches_and_everyone_else_waits() {
        let store = MapStore::default();
        claim(&store, 1, 1_000);
        for n in 2..50 {
            assert_eq!(RULES.acquire(&store, "k", 1_011, n).unwrap(), Acquire::Wait);
        }
    }

    #[test]
    fn completed_token_is_a_hit_until_the_margin() {
        let store = MapStore::default();
        claim(&store, 1, 0);
        RULES.complete(&store, "k", &Ok(token(3_600)), 0).unwrap();
        assert_eq!(
            RULES.acquire(&store, "k", 1_000, 2).unwrap(),
            Acquire::Hit(token(3_600))
        );
        assert_eq!(
            RULES.acquire(&store, "k", 3_299_999, 2).unwrap(),
            Acquire::Hit(token(3_600))
        );
        // Expired: an existing key is claimed by compare-and-swap, no settling needed.
        assert_eq!(
            RULES.acquire(&store, "k", 3_300_000, 2).unwrap(),
            Acquire::Fetch
        );
        assert_eq!(
            RULES.acquire(&store, "k", 3_300_001, 3).unwrap(),
            Acquire::Wait
        );
    }

    #[test]
    fn short_lived_tokens_are_cached_for_half_their_life() {
        assert_eq!(RULES.use_until(1_010, 1_000), 1_005);
        assert_eq!(RULES.use_until(5_000, 1_000), 4_700);
    }

    #[test]
    fn waiters_see_the_token_or_the_failure_of_their_fetch() {
        let store = MapStore::default();
        claim(&store, 1, 0);
        assert_eq!(RULES.poll(&store, "k", 10, 20, 2).unwrap(), Poll::Pending);
        RULES
            .complete(
                &store,
                "k",
                &Err(Refusal::TokenServiceTimeout("slow".into())),
                30,
            )
            .unwrap();
        match RULES.poll(&store, "k", 10, 40, 2).unwrap() {
            Poll::Failed(r) => assert_eq!(r.code(), "TokenServiceTimeout"),
            other => panic!("{other:?}"),
        }
        // A request that arrives after the failure does not inherit it: it fetches again.
        assert_eq!(RULES.acquire(&store, "k", 50, 3).unwrap(), Acquire::Fetch);
    }

    #[test]
    fn stale_claims_are_taken_over() {
        let store = MapStore::default();
        claim(&store, 1, 0);
        assert_eq!(RULES.poll(&store, "k", 0, 5_999, 2).unwrap(), Poll::Pending);
        assert_eq!(RULES.poll(&store, "k", 0, 6_000, 2).unwrap(), Poll::Fetch);
        assert_eq!(RULES.acquire(&store, "k", 6_001, 3).unwrap(), Acquire::Wait);
    }

    #[test]
    fn a_revoked_token_is_a_miss_and_its_hash_goes_with_the_next_fetch() {
        let store = MapStore::default();
        claim(&store, 1, 0);
        RULES.complete(&store, "k", &Ok(token(10_000)), 0).unwrap();
        let cached = token(10_000).secret;
        // Another token than the cached one: nothing happens.
        assert!(!RULES.revoke(&store, "k", "other").unwrap());
        assert!(matches!(
            RULES.acquire(&store, "k", 1_000, 2),
            Ok(Acquire::Hit(_))
        ));
        assert!(RULES.revoke(&store, "k", &cached).unwrap());
        // Revoked once; a second challenge for the same token finds nothing to revoke.
        assert!(!RULES.revoke(&store, "k", &cached).unwrap());
        assert_eq!(
            RULES.acquire(&store, "k", 2_000, 2).unwrap(),
            Acquire::Fetch
        );
        let hash = RULES.refresh_hash(&store, "k").unwrap();
        assert_eq!(hash, token_sha256(&cached));
        assert_eq!(hash.len(), 64);
        // A stale claim taken over keeps the hash.
        assert_eq!(
            RULES
                .acquire(&store, "k", 2_000 + RULES.lock_ttl_ms, 3)
                .unwrap(),
            Acquire::Fetch
        );
        assert_eq!(RULES.refresh_hash(&store, "k"), Some(hash));
        // The new token clears it.
        RULES
            .complete(&store, "k", &Ok(token(20_000)), 3_000)
            .unwrap();
        assert_eq!(RULES.refresh_hash(&store, "k"), None);
    }

    #[test]
    fn cas_mismatch_means_someone_else_claimed() {
        let store = MapStore::default();
        claim(&store, 1, 0);
        RULES.complete(&store, "k", &Ok(token(10)), 0).unwrap();
        struct Racy<'a>(&'a MapStore);
        impl SharedStore for Racy<'_> {
            fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
                self.0.get(key)
            }
            fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, Refusal> {
                // Another worker claims between our get and our set.
                let claim = Record::Fetching {
                    since_ms: 20_000,
                    nonce: 9,
                    refresh: None,
                };
                self.0.set(key, &claim.encode(), None)?;
                self.0.set(key, value, cas)
            }
        }
        assert_eq!(
            RULES.acquire(&Racy(&store), "k", 20_000, 2).unwrap(),
            Acquire::Wait
        );
    }

    #[test]
    fn keys_separate_identity_and_resource() {
        assert_ne!(cache_key("a", "b\nc"), cache_key("a\nb", "c"));
    }
}
