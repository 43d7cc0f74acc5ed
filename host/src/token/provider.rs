//! The token cache: one entry per (source, identity, resource), single-flight fetches,
//! refresh-ahead at half-life, stale-while-revalidate, short error backoff, bounded size.
//!
//! All scheduling runs on tokio's clock (`tokio::time::Instant`): a token's wall-clock
//! `expires_on` is turned into a tokio instant when it arrives, so tests can pause and advance
//! time through a token's whole life.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::time::Instant;

use super::cae::TokenSha256;
use super::client::HttpClient;
use super::error::TokenError;
use super::metrics::{Metrics, MetricsSnapshot};
use super::retry::{RetryPolicy, UpstreamLimiter};
use super::source::{FetchedToken, ManagedIdentity, Secret, Source, resource_for};

/// Tunables of a [`TokenProvider`]; `Default` follows Azure's guidance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderConfig {
    /// How long one `token()` call waits before it gets [`TokenError::DeadlineExceeded`]; the
    /// fetch continues and fills the cache. Default 5 s.
    pub deadline: Duration,
    /// Timeout of one upstream attempt (a timed-out attempt is retried). Default 10 s.
    pub attempt_timeout: Duration,
    /// A token counts as expired this long before `expires_on` (at most a quarter of its
    /// lifetime, so short-lived tokens stay usable). Default 5 min.
    pub expiry_margin: Duration,
    /// After a fetch fails for good, callers without a valid token get the same error for
    /// this long (or the upstream's `Retry-After`, at most 60 s) instead of a new fetch.
    /// Default 5 s.
    pub error_backoff: Duration,
    /// After a background refresh fails, the next one waits this long. Default 30 s.
    pub refresh_retry_interval: Duration,
    /// Cache entries (keys) kept; beyond it expired, then least-recently-used entries go.
    /// Default 1024.
    pub max_entries: usize,
    /// Upstream requests in flight at once. Default 5 (IMDS's per-VM limit).
    pub max_concurrent_requests: usize,
    /// Upstream requests started per second. Default 20 (IMDS's identity-category limit).
    pub max_requests_per_second: u32,
    /// Retry policy.
    pub retry: RetryPolicy,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        ProviderConfig {
            deadline: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(10),
            expiry_margin: Duration::from_secs(300),
            error_backoff: Duration::from_secs(5),
            refresh_retry_interval: Duration::from_secs(30),
            max_entries: 1024,
            max_concurrent_requests: 5,
            max_requests_per_second: 20,
            retry: RetryPolicy::default(),
        }
    }
}

/// Longest time an error is served from the cache, whatever `Retry-After` said.
const MAX_ERROR_BACKOFF: Duration = Duration::from_secs(60);

/// A bearer token and when it stops being usable. `Debug` never shows the token.
#[derive(Clone)]
pub struct AccessToken {
    secret: Secret,
    expires_on: u64,
    fetched_at: Instant,
    expires_at: Instant,
    usable_until: Instant,
    refresh_at: Instant,
}

impl AccessToken {
    fn new(fetched: FetchedToken, config: &ProviderConfig) -> AccessToken {
        let now = Instant::now();
        let lifetime = Duration::from_secs(fetched.expires_on.saturating_sub(unix_now()));
        let expires_at = now + lifetime;
        AccessToken {
            secret: fetched.secret,
            expires_on: fetched.expires_on,
            fetched_at: now,
            expires_at,
            usable_until: expires_at - config.expiry_margin.min(lifetime / 4),
            refresh_at: now + lifetime / 2,
        }
    }

    /// The bearer token, for an `Authorization` header.
    pub fn secret(&self) -> &str {
        self.secret.expose()
    }

    /// Expiry as Unix seconds, as the source reported it.
    pub fn expires_on(&self) -> u64 {
        self.expires_on
    }

    /// Seconds of validity left now (what IMDS clients read from `expires_in`).
    pub fn expires_in(&self) -> u64 {
        self.expires_at
            .saturating_duration_since(Instant::now())
            .as_secs()
    }

    /// When it was fetched (tokio clock).
    pub fn fetched_at(&self) -> Instant {
        self.fetched_at
    }

    /// The SHA-256 of the token, as `token_sha256_to_refresh` names it.
    pub fn sha256(&self) -> TokenSha256 {
        TokenSha256::of(self.secret.expose())
    }

    /// When a background refresh becomes due (half its lifetime).
    pub fn refresh_at(&self) -> Instant {
        self.refresh_at
    }

    /// After this the cache no longer hands it out (`expires_on` minus the margin).
    pub fn usable_until(&self) -> Instant {
        self.usable_until
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("secret", &"...")
            .field("expires_on", &self.expires_on)
            .finish_non_exhaustive()
    }
}

/// Fetches, caches and refreshes tokens from one [`Source`]. Cheap to clone; clones share the
/// cache. `azgate token-service` serves it over HTTP; `azgate serve` calls it in-process.
#[derive(Clone)]
pub struct TokenProvider {
    inner: Arc<Inner>,
}

struct Inner {
    source: Source,
    client: Arc<dyn HttpClient>,
    config: ProviderConfig,
    limiter: UpstreamLimiter,
    metrics: Metrics,
    cache: Mutex<HashMap<CacheKey, Entry>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct CacheKey {
    source: &'static str,
    identity: ManagedIdentity,
    resource: String,
}

/// `None` until the fetch finishes.
type FetchOutcome = Option<Result<AccessToken, TokenError>>;

struct Entry {
    /// The newest good token, kept (and served) while usable even if a refresh fails.
    token: Option<AccessToken>,
    /// Whether anyone was handed `token` from the cache; idle keys are not refreshed.
    used_since_fetch: bool,
    /// The fetch in flight; every caller waiting for this key subscribes here.
    in_flight: Option<watch::Receiver<FetchOutcome>>,
    /// The last failure and until when callers without a token get it back.
    failure: Option<(TokenError, Instant)>,
    /// Background refreshes are not started before this (set after a failed one).
    refresh_not_before: Instant,
    last_used: Instant,
}

enum Lookup {
    Hit(AccessToken),
    Wait(watch::Receiver<FetchOutcome>),
}

// === impl TokenProvider ===

impl TokenProvider {
    /// A provider for `source`, sending through `client`.
    pub fn new(
        source: Source,
        client: Arc<dyn HttpClient>,
        config: ProviderConfig,
    ) -> TokenProvider {
        TokenProvider {
            inner: Arc::new(Inner {
                limiter: UpstreamLimiter::new(
                    config.max_concurrent_requests,
                    config.max_requests_per_second,
                ),
                source,
                client,
                config,
                metrics: Metrics::default(),
                cache: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A token for `identity` and `resource` (a v1 resource such as
    /// `https://management.azure.com/`, or a v2 scope ending in `/.default`).
    ///
    /// Answers from the cache while the token is usable; otherwise joins or starts the one
    /// fetch for this key and waits at most [`ProviderConfig::deadline`].
    pub async fn token(
        &self,
        identity: &ManagedIdentity,
        resource: &str,
    ) -> Result<AccessToken, TokenError> {
        self.token_refreshing(identity, resource, None).await
    }

    /// [`TokenProvider::token`], after a continuous-access-evaluation challenge: when the cached
    /// token for this key has the SHA-256 `rejected` (the client's `token_sha256_to_refresh`),
    /// it is evicted and a new one fetched (the App Service source is sent the hash, so it does
    /// not answer from its own cache). Any other hash changes nothing: the cache answers as
    /// usual, so a caller cannot force fetches with made-up hashes.
    pub async fn token_refreshing(
        &self,
        identity: &ManagedIdentity,
        resource: &str,
        rejected: Option<TokenSha256>,
    ) -> Result<AccessToken, TokenError> {
        let resource = resource_for(resource);
        if resource.is_empty() {
            return Err(TokenError::BadRequest {
                code: "invalid_request",
                description: "resource is required".into(),
            });
        }
        let deadline = Instant::now() + self.inner.config.deadline;
        let key = CacheKey {
            source: self.inner.source.kind(),
            identity: identity.clone(),
            resource: resource.to_owned(),
        };
        let mut outcome = match self.inner.lookup(&key, rejected)? {
            Lookup::Hit(token) => return Ok(token),
            Lookup::Wait(outcome) => outcome,
        };
        match tokio::time::timeout_at(deadline, outcome.wait_for(Option::is_some)).await {
            Ok(Ok(finished)) => match &*finished {
                Some(result) => result.clone(),
                None => Err(TokenError::Transport(
                    "token fetch finished without a result".into(),
                )),
            },
            Ok(Err(_)) => Err(TokenError::Transport("token fetch was abandoned".into())),
            Err(_) => {
                Metrics::bump(&self.inner.metrics.deadline_exceeded);
                tracing::info!(identity = %key.identity, resource = %key.resource, "token deadline exceeded; fetch continues");
                Err(TokenError::DeadlineExceeded)
            }
        }
    }

    /// Counters and the age of every cached token.
    pub fn metrics(&self) -> MetricsSnapshot {
        let now = Instant::now();
        let ages = self
            .inner
            .lock_cache()
            .iter()
            .filter_map(|(key, entry)| {
                let token = entry.token.as_ref()?;
                Some((
                    format!("{} {} {}", key.source, key.identity, key.resource),
                    now.saturating_duration_since(token.fetched_at).as_secs(),
                    token.expires_at.saturating_duration_since(now).as_secs(),
                ))
            })
            .collect();
        self.inner.metrics.snapshot(ages)
    }

    /// The source tokens come from.
    pub fn source(&self) -> &Source {
        &self.inner.source
    }
}

impl fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenProvider")
            .field("source", &self.inner.source)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

// === impl Inner ===

impl Inner {
    fn lock_cache(&self) -> MutexGuard<'_, HashMap<CacheKey, Entry>> {
        // Nothing under this lock can panic half-way through an update that matters: the
        // worst a poisoned map holds is an entry that a later fetch overwrites.
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Decides, under the cache lock, between a hit, joining a fetch and starting one.
    fn lookup(
        self: &Arc<Self>,
        key: &CacheKey,
        rejected: Option<TokenSha256>,
    ) -> Result<Lookup, TokenError> {
        let now = Instant::now();
        let mut cache = self.lock_cache();
        if !cache.contains_key(key) {
            self.make_room(&mut cache, now)?;
        }
        let entry = cache.entry(key.clone()).or_insert_with(|| Entry {
            token: None,
            used_since_fetch: false,
            in_flight: None,
            failure: None,
            refresh_not_before: now,
            last_used: now,
        });
        entry.last_used = now;

        // A CAE refresh for the cached token evicts it (and a failure remembered from a
        // refresh, which would otherwise answer instead of a new fetch).
        let rejected = rejected.filter(|hash| {
            entry
                .token
                .as_ref()
                .is_some_and(|token| token.sha256() == *hash)
        });
        if rejected.is_some() {
            entry.token = None;
            entry.failure = None;
            Metrics::bump(&self.metrics.cae_refreshes);
            tracing::info!(identity = %key.identity, resource = %key.resource, "cached token rejected by the resource (CAE); fetching a new one");
        }

        if let Some(token) = entry.token.clone().filter(|token| token.usable_until > now) {
            Metrics::bump(&self.metrics.cache_hits);
            entry.used_since_fetch = true;
            if now >= token.refresh_at
                && now >= entry.refresh_not_before
                && entry.in_flight.is_none()
            {
                Metrics::bump(&self.metrics.refreshes);
                tracing::debug!(identity = %key.identity, resource = %key.resource, "refreshing on access");
                self.start_fetch(key, entry, None);
            }
            return Ok(Lookup::Hit(token));
        }
        if let Some((error, until)) = &entry.failure
            && *until > now
        {
            Metrics::bump(&self.metrics.cached_errors_served);
            return Err(error.clone());
        }
        Metrics::bump(&self.metrics.cache_misses);
        if let Some(outcome) = &entry.in_flight {
            // A fetch started since the token was fetched gets a new token too (without the
            // hash, which only the App Service source takes).
            Metrics::bump(&self.metrics.coalesced);
            return Ok(Lookup::Wait(outcome.clone()));
        }
        Ok(Lookup::Wait(self.start_fetch(key, entry, rejected)))
    }

    /// Makes room for one more key, or fails if every entry has a fetch in flight.
    fn make_room(
        &self,
        cache: &mut HashMap<CacheKey, Entry>,
        now: Instant,
    ) -> Result<(), TokenError> {
        if cache.len() < self.config.max_entries.max(1) {
            return Ok(());
        }
        cache.retain(|_, entry| {
            entry.in_flight.is_some() || entry.token.as_ref().is_some_and(|t| t.expires_at > now)
        });
        if cache.len() < self.config.max_entries.max(1) {
            return Ok(());
        }
        let least_recently_used = cache
            .iter()
            .filter(|(_, entry)| entry.in_flight.is_none())
            .min_by_key(|(_, entry)| entry.last_used)
            .map(|(key, _)| key.clone());
        match least_recently_used {
            Some(key) => {
                cache.remove(&key);
                Ok(())
            }
            None => Err(TokenError::CacheFull),
        }
    }

    /// Spawns the one fetch for `key`; it runs to completion even if every caller gives up.
    fn start_fetch(
        self: &Arc<Self>,
        key: &CacheKey,
        entry: &mut Entry,
        rejected: Option<TokenSha256>,
    ) -> watch::Receiver<FetchOutcome> {
        let (sender, receiver) = watch::channel(None);
        entry.in_flight = Some(receiver.clone());
        Metrics::bump(&self.metrics.upstream_fetches);
        let inner = Arc::clone(self);
        let key = key.clone();
        tokio::spawn(async move {
            let result = inner.fetch_with_retries(&key, rejected).await;
            inner.finish_fetch(&key, &result);
            sender.send_replace(Some(result));
        });
        receiver
    }

    async fn fetch_with_retries(
        &self,
        key: &CacheKey,
        rejected: Option<TokenSha256>,
    ) -> Result<AccessToken, TokenError> {
        let started = Instant::now();
        let mut retries = 0;
        loop {
            let result = {
                let _permit = self.limiter.acquire().await;
                Metrics::bump(&self.metrics.upstream_requests);
                let attempt = self.source.fetch_refreshing(
                    &*self.client,
                    &key.identity,
                    &key.resource,
                    rejected,
                );
                tokio::time::timeout(self.config.attempt_timeout, attempt)
                    .await
                    .unwrap_or(Err(TokenError::UpstreamTimeout))
            };
            let error = match result {
                Ok(fetched) => {
                    let token = AccessToken::new(fetched, &self.config);
                    tracing::info!(
                        source = key.source,
                        identity = %key.identity,
                        resource = %key.resource,
                        expires_in = token.expires_in(),
                        retries,
                        "token fetched"
                    );
                    return Ok(token);
                }
                Err(error) => error,
            };
            self.metrics.upstream_error(error_label(&error));
            match self
                .config
                .retry
                .next_delay(&error, retries, started.elapsed())
            {
                Some(delay) => {
                    retries += 1;
                    Metrics::bump(&self.metrics.retries);
                    tracing::info!(identity = %key.identity, resource = %key.resource, %error, ?delay, retries, "token fetch failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                None => {
                    tracing::warn!(identity = %key.identity, resource = %key.resource, %error, retries, "token fetch failed");
                    return Err(error);
                }
            }
        }
    }

    /// Stores a fetch's outcome and schedules the next refresh.
    fn finish_fetch(self: &Arc<Self>, key: &CacheKey, result: &Result<AccessToken, TokenError>) {
        let now = Instant::now();
        let mut cache = self.lock_cache();
        // Entries with a fetch in flight are never evicted, so the entry is there and its
        // `in_flight` is this fetch; the `else` only guards that invariant.
        let Some(entry) = cache.get_mut(key) else {
            return;
        };
        entry.in_flight = None;
        match result {
            Ok(token) => {
                entry.token = Some(token.clone());
                entry.used_since_fetch = false;
                entry.failure = None;
                entry.refresh_not_before = now;
                self.schedule_refresh(key, token.refresh_at);
            }
            Err(error) => {
                let backoff = self
                    .config
                    .error_backoff
                    .max(error.retry_after().unwrap_or_default())
                    .min(MAX_ERROR_BACKOFF);
                entry.failure = Some((error.clone(), now + backoff));
                entry.refresh_not_before = now + self.config.refresh_retry_interval;
                if let Some(token) = entry
                    .token
                    .as_ref()
                    .filter(|token| token.usable_until > now)
                {
                    Metrics::bump(&self.metrics.refresh_failures);
                    tracing::warn!(identity = %key.identity, resource = %key.resource, %error, "refresh failed; still serving the valid token");
                    if entry.refresh_not_before < token.usable_until {
                        self.schedule_refresh(key, entry.refresh_not_before);
                    }
                }
            }
        }
    }

    fn schedule_refresh(self: &Arc<Self>, key: &CacheKey, at: Instant) {
        let inner: Weak<Inner> = Arc::downgrade(self);
        let key = key.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            if let Some(inner) = inner.upgrade() {
                inner.refresh_if_due(&key);
            }
        });
    }

    /// The refresh timer fired: refresh if the token is still cached, in use and due.
    fn refresh_if_due(self: &Arc<Self>, key: &CacheKey) {
        let now = Instant::now();
        let mut cache = self.lock_cache();
        let Some(entry) = cache.get_mut(key) else {
            return;
        };
        let Some(token) = &entry.token else { return };
        let due =
            now >= token.refresh_at && now >= entry.refresh_not_before && token.usable_until > now;
        if !due || entry.in_flight.is_some() {
            return;
        }
        if !entry.used_since_fetch {
            tracing::debug!(identity = %key.identity, resource = %key.resource, "idle token not refreshed");
            return;
        }
        Metrics::bump(&self.metrics.refreshes);
        tracing::debug!(identity = %key.identity, resource = %key.resource, "refreshing ahead of expiry");
        self.start_fetch(key, entry, None);
    }
}

/// `"<upstream status or failure kind> <error code>"`, the metrics label of a failed attempt.
fn error_label(error: &TokenError) -> String {
    let kind = match error {
        TokenError::Transport(_) => "transport".to_owned(),
        TokenError::UpstreamTimeout => "timeout".to_owned(),
        TokenError::MalformedResponse(_) => "malformed".to_owned(),
        TokenError::Configuration(_) => "configuration".to_owned(),
        TokenError::UnsupportedIdentity(_) => "unsupported_identity".to_owned(),
        other => other
            .upstream_status()
            .map_or_else(|| "other".to_owned(), |status| status.to_string()),
    };
    format!("{kind} {}", error.error_code())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}
