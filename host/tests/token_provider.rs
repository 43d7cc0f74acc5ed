//! The token provider against the IMDS emulator: cache, refresh-ahead, single-flight, retries
//! and rate limits.
//!
//! Timing tests run on tokio's paused clock with the emulator in memory (no sockets), so a
//! 70-second retry budget takes milliseconds and every instant is exact.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::sync::Arc;
use std::time::Duration;

use azgate::token::{
    AccessToken, HttpClient, ManagedIdentity, ProviderConfig, Source, TokenError, TokenProvider,
};
use azgate_emulator::{Emulator, Fault};
use bytes::Bytes;
use http::Request;
use tokio::time::Instant;

const ARM: &str = "https://management.azure.com/";
const MIRID: &str = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader";

fn identity() -> ManagedIdentity {
    ManagedIdentity::ResourceId(MIRID.to_owned())
}

/// The emulator answering in memory, exactly as over a socket.
struct InMemory(Emulator);

impl HttpClient for InMemory {
    fn send(&self, request: Request<Bytes>) -> azgate::token::SendFuture<'_> {
        Box::pin(async move { Ok(self.0.handle(request).await) })
    }
}

fn in_memory_provider(emulator: &Emulator, config: ProviderConfig) -> TokenProvider {
    TokenProvider::new(
        Source::Imds {
            endpoint: emulator.base_url(),
        },
        Arc::new(InMemory(emulator.clone())),
        config,
    )
}

/// Asks for each identity's token from its own task, all at once; the answers in order.
async fn concurrently(
    provider: &TokenProvider,
    identities: impl IntoIterator<Item = ManagedIdentity>,
) -> Vec<Result<AccessToken, TokenError>> {
    let callers: Vec<_> = identities
        .into_iter()
        .map(|identity| {
            let provider = provider.clone();
            tokio::spawn(async move { provider.token(&identity, ARM).await })
        })
        .collect();
    let mut answers = Vec::new();
    for caller in callers {
        answers.push(caller.await.expect("caller task panicked"));
    }
    answers
}

fn clients(count: u32) -> impl Iterator<Item = ManagedIdentity> {
    (0..count).map(|n| ManagedIdentity::ClientId(format!("client-{n}")))
}

/// Token lifetimes are computed from wall-clock epoch seconds, so they may be off by the one
/// second that can tick between the emulator issuing a token and the provider reading it.
#[track_caller]
fn assert_near(actual: Duration, expected: Duration) {
    assert!(
        actual.abs_diff(expected) <= Duration::from_secs(1),
        "{actual:?} is not about {expected:?}"
    );
}

/// Gaps between consecutive token requests the emulator received.
fn request_gaps(emulator: &Emulator) -> Vec<Duration> {
    let times: Vec<Instant> = emulator
        .requests()
        .iter()
        .map(|request| request.received_at)
        .collect();
    times.windows(2).map(|pair| pair[1] - pair[0]).collect()
}

#[tokio::test(start_paused = true)]
async fn a_thousand_concurrent_cold_requests_make_one_upstream_call() {
    let emulator = Emulator::in_memory();
    // Slow upstream, so all thousand callers arrive while the one fetch is in flight.
    emulator.set_fault(Fault::Slow(Duration::from_millis(500)));
    let provider = in_memory_provider(&emulator, ProviderConfig::default());

    let secrets: Vec<String> = concurrently(&provider, std::iter::repeat_n(identity(), 1000))
        .await
        .into_iter()
        .map(|answer| {
            answer
                .expect("every caller gets the token")
                .secret()
                .to_owned()
        })
        .collect();

    assert_eq!(
        emulator.token_requests(),
        1,
        "one upstream call for one key"
    );
    assert!(
        secrets.iter().all(|secret| *secret == secrets[0]),
        "everyone got the same token"
    );
    let metrics = provider.metrics();
    assert_eq!(metrics.upstream_requests, 1);
    assert_eq!(metrics.cache_misses, 1000);
    assert_eq!(metrics.coalesced, 999);

    // And the next thousand are cache hits.
    for _ in 0..1000 {
        provider.token(&identity(), ARM).await.unwrap();
    }
    assert_eq!(emulator.token_requests(), 1);
    assert_eq!(provider.metrics().cache_hits, 1000);
}

#[tokio::test]
async fn a_thousand_concurrent_cold_requests_over_real_sockets_make_one_upstream_call() {
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    emulator.set_fault(Fault::Slow(Duration::from_millis(200)));
    let provider = TokenProvider::new(
        Source::Imds {
            endpoint: emulator.base_url(),
        },
        Arc::new(azgate::token::HyperClient::new().unwrap()),
        ProviderConfig::default(),
    );
    for answer in concurrently(&provider, std::iter::repeat_n(identity(), 1000)).await {
        answer.expect("every caller gets the token");
    }
    assert_eq!(emulator.token_requests(), 1);
    let request = &emulator.requests()[0];
    assert_eq!(request.header("metadata"), Some("true"));
    assert_eq!(request.header("x-forwarded-for"), None);
    assert_eq!(request.query_param("msi_res_id").as_deref(), Some(MIRID));
    assert_eq!(request.query_param("resource").as_deref(), Some(ARM));
    assert_eq!(
        request.query_param("api-version").as_deref(),
        Some("2018-02-01")
    );
}

#[tokio::test(start_paused = true)]
async fn refresh_ahead_replaces_the_token_before_expiry_with_no_client_visible_miss() {
    let emulator = Emulator::in_memory();
    emulator.set_token_lifetime(Duration::from_secs(3600));
    let provider = in_memory_provider(&emulator, ProviderConfig::default());
    let start = Instant::now();

    let first = provider.token(&identity(), ARM).await.unwrap();
    // Refresh at half-life; usable until expiry minus 5 minutes.
    assert_near(first.refresh_at() - start, Duration::from_secs(1800));
    assert_near(first.usable_until() - start, Duration::from_secs(3300));

    // A client asking every 10 s for almost 3 hours, spanning three token lifetimes.
    let mut distinct = vec![first.secret().to_owned()];
    for _ in 0..1070 {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let called_at = Instant::now();
        let token = provider.token(&identity(), ARM).await.unwrap();
        assert_eq!(Instant::now(), called_at, "answered without waiting");
        assert!(
            token.usable_until() > Instant::now(),
            "never handed an expiring token"
        );
        if distinct.last().map(String::as_str) != Some(token.secret()) {
            distinct.push(token.secret().to_owned());
        }
    }

    let metrics = provider.metrics();
    assert_eq!(metrics.cache_misses, 1, "only the very first call waited");
    assert_eq!(metrics.cache_hits, 1070);
    // Refreshed at 30, 60, 90, … minutes: one upstream call per half-life.
    assert_eq!(
        emulator.token_requests(),
        6,
        "{:?}",
        request_gaps(&emulator)
    );
    for gap in request_gaps(&emulator) {
        assert_near(gap, Duration::from_secs(1800));
    }
    assert_eq!(distinct.len(), 6);
    assert_eq!(metrics.refreshes, 5);
}

#[tokio::test(start_paused = true)]
async fn an_idle_key_is_not_refreshed() {
    let emulator = Emulator::in_memory();
    let provider = in_memory_provider(&emulator, ProviderConfig::default());
    provider.token(&identity(), ARM).await.unwrap();
    tokio::time::sleep(Duration::from_secs(48 * 3600)).await;
    assert_eq!(
        emulator.token_requests(),
        1,
        "nobody used the token, so nobody refreshed it"
    );
    provider.token(&identity(), ARM).await.unwrap();
    assert_eq!(emulator.token_requests(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_429_storm_is_backed_off_with_retry_after_honoured() {
    let emulator = Emulator::in_memory();
    emulator.push_faults(std::iter::repeat_n(Fault::StatusRetryAfter(429, 7), 4));
    let config = ProviderConfig {
        deadline: Duration::from_secs(120),
        ..ProviderConfig::default()
    };
    let provider = in_memory_provider(&emulator, config);
    let start = Instant::now();

    // A hundred callers during the storm: still one fetch, one request per backoff step.
    for answer in concurrently(&provider, std::iter::repeat_n(identity(), 100)).await {
        answer.expect("the storm passes and the token arrives");
    }

    assert_eq!(emulator.token_requests(), 5, "four 429s, then success");
    for gap in request_gaps(&emulator) {
        // Exponential backoff is 1, 2, 4, 8 s ± 20 %; Retry-After: 7 wins until it is shorter.
        assert!(
            gap >= Duration::from_secs(7),
            "Retry-After honoured: {gap:?}"
        );
        assert!(
            gap <= Duration::from_millis(9600),
            "backoff bounded: {gap:?}"
        );
    }
    assert!(start.elapsed() >= Duration::from_secs(28));
    assert_eq!(provider.metrics().retries, 4);
    assert_eq!(
        provider
            .metrics()
            .upstream_errors
            .get("429 invalid_request"),
        Some(&4)
    );
}

#[tokio::test(start_paused = true)]
async fn throttling_without_retry_after_backs_off_exponentially_then_gives_up() {
    let emulator = Emulator::in_memory();
    emulator.set_fault(Fault::Status(503));
    let config = ProviderConfig {
        deadline: Duration::from_secs(120),
        ..ProviderConfig::default()
    };
    let provider = in_memory_provider(&emulator, config);

    let error = provider.token(&identity(), ARM).await.unwrap_err();
    assert!(
        matches!(error, TokenError::UpstreamUnavailable { status: 503, .. }),
        "{error:?}"
    );
    assert_eq!(
        emulator.token_requests(),
        6,
        "first attempt plus five retries"
    );
    for (retry, gap) in request_gaps(&emulator).into_iter().enumerate() {
        let nominal = Duration::from_secs(1 << retry);
        assert!(
            gap >= nominal.mul_f64(0.8) && gap <= nominal.mul_f64(1.2),
            "retry {retry}: {gap:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn bad_request_is_never_retried_and_its_error_is_cached_only_briefly() {
    let emulator = Emulator::in_memory();
    emulator.set_fault(Fault::Status(400));
    let provider = in_memory_provider(&emulator, ProviderConfig::default());

    let error = provider.token(&identity(), ARM).await.unwrap_err();
    assert!(
        matches!(error, TokenError::UpstreamRejected { status: 400, .. }),
        "{error:?}"
    );
    assert_eq!(error.http_status(), 400);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(emulator.token_requests(), 1, "400 is never retried");

    // Within the error backoff a caller gets the cached error without an upstream call…
    emulator.set_fault(Fault::None);
    let provider = in_memory_provider(&emulator, ProviderConfig::default());
    emulator.set_fault(Fault::Status(400));
    provider.token(&identity(), ARM).await.unwrap_err();
    emulator.set_fault(Fault::None);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(provider.token(&identity(), ARM).await.is_err());
    assert_eq!(emulator.token_requests(), 2);
    assert_eq!(provider.metrics().cached_errors_served, 1);
    // …and after it, a new fetch.
    tokio::time::sleep(Duration::from_secs(2)).await;
    provider
        .token(&identity(), ARM)
        .await
        .expect("error backoff is over");
    assert_eq!(emulator.token_requests(), 3);
}

#[tokio::test(start_paused = true)]
async fn gone_is_retried_for_seventy_seconds() {
    let emulator = Emulator::in_memory();
    let config = ProviderConfig {
        deadline: Duration::from_secs(120),
        ..ProviderConfig::default()
    };

    // IMDS back after 70 s: the eighth attempt, at 70 s, succeeds.
    emulator.push_faults(std::iter::repeat_n(Fault::Status(410), 7));
    let provider = in_memory_provider(&emulator, config.clone());
    let start = Instant::now();
    provider
        .token(&identity(), ARM)
        .await
        .expect("IMDS came back within 70 s");
    assert_eq!(start.elapsed(), Duration::from_secs(70));
    assert_eq!(emulator.token_requests(), 8);
    assert!(
        request_gaps(&emulator)
            .iter()
            .all(|gap| *gap == Duration::from_secs(10))
    );

    // IMDS gone for longer: given up after 70 s, and not before.
    let emulator = Emulator::in_memory();
    emulator.set_fault(Fault::Status(410));
    let provider = in_memory_provider(&emulator, config);
    let start = Instant::now();
    let error = provider.token(&identity(), ARM).await.unwrap_err();
    assert!(
        matches!(error, TokenError::UpstreamUnavailable { status: 410, .. }),
        "{error:?}"
    );
    assert_eq!(start.elapsed(), Duration::from_secs(70));
    assert_eq!(emulator.token_requests(), 8);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_holds_and_the_fetch_goes_on_to_fill_the_cache() {
    let emulator = Emulator::in_memory();
    emulator.push_faults([Fault::Slow(Duration::from_secs(8))]);
    let provider = in_memory_provider(&emulator, ProviderConfig::default());

    let start = Instant::now();
    let error = provider.token(&identity(), ARM).await.unwrap_err();
    assert_eq!(error, TokenError::DeadlineExceeded);
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(5),
        "the caller waited exactly the deadline"
    );
    assert_eq!(error.http_status(), 504);

    tokio::time::sleep(Duration::from_secs(4)).await;
    let called_at = Instant::now();
    provider
        .token(&identity(), ARM)
        .await
        .expect("the fetch finished and filled the cache");
    assert_eq!(Instant::now(), called_at, "a cache hit");
    assert_eq!(emulator.token_requests(), 1);
    assert_eq!(provider.metrics().deadline_exceeded, 1);
}

#[tokio::test(start_paused = true)]
async fn a_hanging_upstream_times_out_per_attempt_and_is_retried() {
    let emulator = Emulator::in_memory();
    emulator.push_faults([Fault::Hang]);
    let provider = in_memory_provider(&emulator, ProviderConfig::default());

    assert_eq!(
        provider.token(&identity(), ARM).await.unwrap_err(),
        TokenError::DeadlineExceeded
    );
    // Attempt timeout 10 s, then a retry after about 1 s.
    tokio::time::sleep(Duration::from_secs(10)).await;
    provider
        .token(&identity(), ARM)
        .await
        .expect("the retry succeeded");
    assert_eq!(emulator.token_requests(), 2);
    assert_eq!(
        provider
            .metrics()
            .upstream_errors
            .get("timeout service_unavailable"),
        Some(&1)
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_refresh_still_serves_the_valid_token() {
    let emulator = Emulator::in_memory();
    emulator.set_token_lifetime(Duration::from_secs(3600));
    let provider = in_memory_provider(&emulator, ProviderConfig::default());
    let first = provider.token(&identity(), ARM).await.unwrap();

    // IMDS fails from just before the refresh is due until 50 minutes in.
    tokio::time::sleep(Duration::from_secs(1790)).await;
    emulator.set_fault(Fault::Status(500));
    for _ in 0..120 {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let token = provider
            .token(&identity(), ARM)
            .await
            .expect("the valid token is still served");
        assert_eq!(token.secret(), first.secret());
    }
    let failing_requests = emulator.token_requests();
    assert!(
        failing_requests > 6,
        "refreshes were attempted: {failing_requests}"
    );
    assert!(provider.metrics().refresh_failures >= 2);

    // IMDS recovers before the old token's usable life (55 min) ends: the next refresh
    // attempt replaces it, still without a miss.
    emulator.set_fault(Fault::None);
    let mut replaced = false;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let token = provider.token(&identity(), ARM).await.unwrap();
        replaced |= token.secret() != first.secret();
    }
    assert!(replaced, "the recovered refresh replaced the token");
    assert_eq!(provider.metrics().cache_misses, 1);
}

#[tokio::test(start_paused = true)]
async fn upstream_requests_stay_within_the_concurrency_and_rate_limits() {
    let emulator = Emulator::in_memory();
    // Each request takes 1 s, so requests received within less than 1 s overlapped.
    emulator.set_fault(Fault::Slow(Duration::from_secs(1)));
    let config = ProviderConfig {
        deadline: Duration::from_secs(60),
        ..ProviderConfig::default()
    };
    let provider = in_memory_provider(&emulator, config);

    for answer in concurrently(&provider, clients(40)).await {
        answer.expect("every key gets its token");
    }
    let times: Vec<Instant> = emulator
        .requests()
        .iter()
        .map(|request| request.received_at)
        .collect();
    assert_eq!(times.len(), 40);
    for (index, at) in times.iter().enumerate() {
        let overlapping = times[..index]
            .iter()
            .filter(|earlier| *at - **earlier < Duration::from_secs(1))
            .count();
        assert!(
            overlapping < 5,
            "at most 5 in flight: request {index} overlapped {overlapping}"
        );
    }

    // Fast upstream: starts are spaced so no second sees more than 20.
    let emulator = Emulator::in_memory();
    let provider = in_memory_provider(&emulator, ProviderConfig::default());
    for answer in concurrently(&provider, clients(60)).await {
        answer.expect("every key gets its token");
    }
    let times: Vec<Instant> = emulator
        .requests()
        .iter()
        .map(|request| request.received_at)
        .collect();
    for at in &times {
        let in_window = times
            .iter()
            .filter(|other| **other >= *at && **other - *at < Duration::from_secs(1))
            .count();
        assert!(in_window <= 20, "at most 20 per second: {in_window}");
    }
}

#[tokio::test(start_paused = true)]
async fn expiry_formats_and_short_lived_tokens() {
    let emulator = Emulator::in_memory();
    emulator.set_fault(Fault::DateStringExpiry);
    emulator.set_token_lifetime(Duration::from_secs(7200));
    let provider = in_memory_provider(&emulator, ProviderConfig::default());
    let start = Instant::now();
    let token = provider.token(&identity(), ARM).await.unwrap();
    assert_near(
        token.usable_until() - start,
        Duration::from_secs(7200 - 300),
    );

    // A 2-minute token stays usable for most of its life rather than being "expired" at once.
    emulator.set_fault(Fault::None);
    emulator.set_token_lifetime(Duration::from_secs(120));
    let short = provider
        .token(&ManagedIdentity::SystemAssigned, ARM)
        .await
        .unwrap();
    assert_near(
        short.usable_until() - Instant::now(),
        Duration::from_secs(90),
    );
    assert_near(short.refresh_at() - Instant::now(), Duration::from_secs(60));

    // A truncated body is treated as transient: retried, then reported as malformed.
    emulator.set_fault(Fault::MalformedJson);
    let config = ProviderConfig {
        deadline: Duration::from_secs(120),
        ..ProviderConfig::default()
    };
    let provider = in_memory_provider(&emulator, config);
    let before = emulator.token_requests();
    let error = provider.token(&identity(), ARM).await.unwrap_err();
    assert!(
        matches!(error, TokenError::MalformedResponse(_)),
        "{error:?}"
    );
    assert_eq!(error.http_status(), 502);
    assert_eq!(emulator.token_requests() - before, 6);
}

#[tokio::test(start_paused = true)]
async fn the_cache_is_bounded_and_evicts_the_least_recently_used_key() {
    let emulator = Emulator::in_memory();
    let config = ProviderConfig {
        max_entries: 2,
        ..ProviderConfig::default()
    };
    let provider = in_memory_provider(&emulator, config);
    let key = |n: u32| ManagedIdentity::ClientId(format!("client-{n}"));

    provider.token(&key(1), ARM).await.unwrap();
    provider.token(&key(2), ARM).await.unwrap();
    provider.token(&key(1), ARM).await.unwrap(); // 2 is now the least recently used
    provider.token(&key(3), ARM).await.unwrap(); // evicts 2
    assert_eq!(emulator.token_requests(), 3);
    assert_eq!(provider.metrics().token_ages.len(), 2);
    provider.token(&key(1), ARM).await.unwrap();
    assert_eq!(emulator.token_requests(), 3, "1 stayed cached");
    provider.token(&key(2), ARM).await.unwrap();
    assert_eq!(
        emulator.token_requests(),
        4,
        "2 was evicted and fetched again"
    );

    // When every slot has a fetch in flight, a new key is refused rather than evicting one.
    let emulator = Emulator::in_memory();
    emulator.set_fault(Fault::Hang);
    let config = ProviderConfig {
        max_entries: 1,
        ..ProviderConfig::default()
    };
    let provider = in_memory_provider(&emulator, config);
    assert_eq!(
        provider.token(&key(1), ARM).await.unwrap_err(),
        TokenError::DeadlineExceeded
    );
    assert_eq!(
        provider.token(&key(2), ARM).await.unwrap_err(),
        TokenError::CacheFull
    );
}
