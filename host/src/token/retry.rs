//! Azure's retry guidance for managed-identity endpoints, and the concurrency and rate limit
//! that keeps azgate inside IMDS's budget (20 requests/s and 5 concurrent per VM).

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

use super::error::TokenError;

/// When to try a failed fetch again.
///
/// - 400 and other non-transient statuses: never.
/// - 410 ("IMDS is updating, back within 70 s"): every `gone_interval` until `gone_budget`
///   has passed since the first attempt.
/// - 404, 408, 429, 5xx, timeouts, transport errors: up to `max_retries` times, exponential
///   backoff `initial_backoff · 2ⁿ` with ±20 % jitter, capped at `max_backoff`.
/// - A `Retry-After` longer than the computed delay wins; one longer than `max_backoff` ends
///   the fetch (the caller gets the error with the `Retry-After`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt, for everything but 410.
    pub max_retries: u32,
    /// Delay before the first retry, before jitter.
    pub initial_backoff: Duration,
    /// Upper bound of one delay, including `Retry-After`.
    pub max_backoff: Duration,
    /// Spacing of retries on 410.
    pub gone_interval: Duration,
    /// How long 410s are retried, from the first attempt.
    pub gone_budget: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 5,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            gone_interval: Duration::from_secs(10),
            gone_budget: Duration::from_secs(70),
        }
    }
}

// === impl RetryPolicy ===

impl RetryPolicy {
    /// The delay before the next attempt, or `None` to give up. `retries` counts the retries
    /// already made; `elapsed` is the time since the first attempt started.
    pub fn next_delay(
        &self,
        error: &TokenError,
        retries: u32,
        elapsed: Duration,
    ) -> Option<Duration> {
        if !error.is_transient() {
            return None;
        }
        if error.upstream_status() == Some(410) {
            return (elapsed < self.gone_budget).then(|| {
                let remaining = self.gone_budget - elapsed;
                self.gone_interval
                    .min(remaining)
                    .max(Duration::from_millis(100))
            });
        }
        if retries >= self.max_retries {
            return None;
        }
        let exponential = self.initial_backoff.saturating_mul(1 << retries.min(16));
        let jittered = exponential
            .mul_f64(0.8 + fastrand::f64() * 0.4)
            .min(self.max_backoff);
        match error.retry_after() {
            Some(retry_after) if retry_after > self.max_backoff => None,
            Some(retry_after) => Some(jittered.max(retry_after)),
            None => Some(jittered),
        }
    }
}

/// At most `concurrency` requests in flight, and starts spaced at least `1 s / rate` apart, so
/// no one-second window ever sees more than `rate` starts. (A burst allowance would let a
/// cold start exceed IMDS's per-second budget; 50 ms of spacing costs nothing.)
#[derive(Debug)]
pub(crate) struct UpstreamLimiter {
    in_flight: Semaphore,
    interval: Duration,
    /// The theoretical arrival time of the next request.
    next_slot: Mutex<Option<Instant>>,
}

impl UpstreamLimiter {
    pub(crate) fn new(concurrency: usize, rate_per_second: u32) -> UpstreamLimiter {
        let concurrency = concurrency.max(1);
        UpstreamLimiter {
            in_flight: Semaphore::new(concurrency),
            interval: Duration::from_secs(1) / rate_per_second.max(1),
            next_slot: Mutex::new(None),
        }
    }

    /// Waits for a rate slot, then for a concurrency permit; the permit is held for the
    /// duration of one upstream request.
    pub(crate) async fn acquire(&self) -> Option<SemaphorePermit<'_>> {
        let wait_until = {
            // Only plain arithmetic happens under this lock, so it cannot be poisoned
            // half-way; recover the value if it ever is.
            let mut next_slot = self
                .next_slot
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let now = Instant::now();
            let start = next_slot.map_or(now, |slot| slot.max(now));
            *next_slot = Some(start + self.interval);
            (start > now).then_some(start)
        };
        if let Some(start) = wait_until {
            tokio::time::sleep_until(start).await;
        }
        // The semaphore is never closed, so this only fails if that changes.
        self.in_flight.acquire().await.ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    fn unavailable(status: u16, retry_after: Option<u64>) -> TokenError {
        TokenError::from_upstream_status(
            status,
            None,
            String::new(),
            retry_after.map(Duration::from_secs),
        )
    }

    #[test]
    fn bad_request_is_never_retried() {
        let policy = RetryPolicy::default();
        for status in [400, 401, 403] {
            assert_eq!(
                policy.next_delay(&unavailable(status, None), 0, Duration::ZERO),
                None
            );
        }
    }

    #[test]
    fn transient_statuses_back_off_exponentially_with_jitter_then_stop() {
        let policy = RetryPolicy::default();
        for status in [404, 408, 429, 500, 503] {
            for retries in 0..5 {
                let delay = policy
                    .next_delay(&unavailable(status, None), retries, Duration::ZERO)
                    .unwrap();
                let nominal = Duration::from_secs(1 << retries);
                assert!(
                    delay >= nominal.mul_f64(0.8) && delay <= nominal.mul_f64(1.2),
                    "{status} {retries} {delay:?}"
                );
            }
            assert_eq!(
                policy.next_delay(&unavailable(status, None), 5, Duration::ZERO),
                None
            );
        }
    }

    #[test]
    fn retry_after_wins_when_longer_and_ends_the_fetch_when_too_long() {
        let policy = RetryPolicy::default();
        let delay = policy
            .next_delay(&unavailable(429, Some(7)), 0, Duration::ZERO)
            .unwrap();
        assert_eq!(delay, Duration::from_secs(7));
        assert_eq!(
            policy.next_delay(&unavailable(429, Some(3600)), 0, Duration::ZERO),
            None
        );
    }

    #[test]
    fn gone_is_retried_for_seventy_seconds() {
        let policy = RetryPolicy::default();
        let gone = unavailable(410, None);
        assert_eq!(
            policy.next_delay(&gone, 20, Duration::from_secs(60)),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            policy.next_delay(&gone, 20, Duration::from_secs(65)),
            Some(Duration::from_secs(5))
        );
        assert_eq!(policy.next_delay(&gone, 0, Duration::from_secs(70)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn limiter_spaces_request_starts_at_the_rate() {
        let limiter = UpstreamLimiter::new(5, 20);
        let start = Instant::now();
        let mut started = Vec::new();
        for _ in 0..25 {
            drop(limiter.acquire().await.unwrap());
            started.push(start.elapsed());
        }
        for (index, at) in started.iter().enumerate() {
            assert_eq!(
                *at,
                Duration::from_millis(50) * u32::try_from(index).unwrap()
            );
        }
        let in_first_second = started
            .iter()
            .filter(|at| **at < Duration::from_secs(1))
            .count();
        assert_eq!(in_first_second, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn limiter_caps_concurrency() {
        let limiter = UpstreamLimiter::new(2, 1000);
        let first = limiter.acquire().await.unwrap();
        let _second = limiter.acquire().await.unwrap();
        let third = tokio::time::timeout(Duration::from_secs(1), limiter.acquire()).await;
        assert!(third.is_err(), "a third concurrent request must wait");
        drop(first);
        assert!(limiter.acquire().await.is_some());
    }
}
