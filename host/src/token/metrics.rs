//! Counters of the token provider, rendered in the Prometheus text format by the token
//! service's `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters; cheap to bump from any task.
#[derive(Debug, Default)]
pub(super) struct Metrics {
    pub(crate) upstream_requests: AtomicU64,
    pub(crate) upstream_fetches: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) cache_hits: AtomicU64,
    pub(crate) cache_misses: AtomicU64,
    pub(crate) coalesced: AtomicU64,
    pub(crate) refreshes: AtomicU64,
    pub(crate) refresh_failures: AtomicU64,
    pub(crate) deadline_exceeded: AtomicU64,
    pub(crate) cached_errors_served: AtomicU64,
    pub(crate) cae_refreshes: AtomicU64,
    upstream_errors: Mutex<BTreeMap<String, u64>>,
}

/// A point-in-time copy of [`Metrics`], plus the cache's token ages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// HTTP requests sent to the source (every attempt, retries included).
    pub upstream_requests: u64,
    /// Fetches started (one fetch = one attempt plus its retries).
    pub upstream_fetches: u64,
    /// Retries made.
    pub retries: u64,
    /// Calls answered from the cache.
    pub cache_hits: u64,
    /// Calls that had to wait for a fetch.
    pub cache_misses: u64,
    /// Misses that joined a fetch already in flight (single-flight).
    pub coalesced: u64,
    /// Background refreshes started.
    pub refreshes: u64,
    /// Background refreshes that failed (the old token kept being served).
    pub refresh_failures: u64,
    /// Calls that hit their deadline.
    pub deadline_exceeded: u64,
    /// Calls answered with a recently cached error (short backoff).
    pub cached_errors_served: u64,
    /// Cached tokens evicted because a client named them in `token_sha256_to_refresh` (CAE).
    pub cae_refreshes: u64,
    /// Failed upstream attempts by `"<status or kind> <error code>"`.
    pub upstream_errors: BTreeMap<String, u64>,
    /// Cached tokens: seconds since fetched and seconds until expiry, per cache key label.
    pub token_ages: Vec<(String, u64, u64)>,
}

impl Metrics {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn upstream_error(&self, label: String) {
        let mut errors = self
            .upstream_errors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *errors.entry(label).or_default() += 1;
    }

    pub(crate) fn snapshot(&self, token_ages: Vec<(String, u64, u64)>) -> MetricsSnapshot {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        MetricsSnapshot {
            upstream_requests: load(&self.upstream_requests),
            upstream_fetches: load(&self.upstream_fetches),
            retries: load(&self.retries),
            cache_hits: load(&self.cache_hits),
            cache_misses: load(&self.cache_misses),
            coalesced: load(&self.coalesced),
            refreshes: load(&self.refreshes),
            refresh_failures: load(&self.refresh_failures),
            deadline_exceeded: load(&self.deadline_exceeded),
            cached_errors_served: load(&self.cached_errors_served),
            cae_refreshes: load(&self.cae_refreshes),
            upstream_errors: self
                .upstream_errors
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
            token_ages,
        }
    }
}

impl MetricsSnapshot {
    /// Prometheus text exposition.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        let counters = [
            (
                "azgate_token_upstream_requests_total",
                "HTTP requests sent to the token source",
                self.upstream_requests,
            ),
            (
                "azgate_token_upstream_fetches_total",
                "Token fetches started (attempts plus retries)",
                self.upstream_fetches,
            ),
            (
                "azgate_token_retries_total",
                "Retries toward the token source",
                self.retries,
            ),
            (
                "azgate_token_cache_hits_total",
                "Token requests answered from the cache",
                self.cache_hits,
            ),
            (
                "azgate_token_cache_misses_total",
                "Token requests that waited for a fetch",
                self.cache_misses,
            ),
            (
                "azgate_token_coalesced_total",
                "Misses that joined a fetch in flight",
                self.coalesced,
            ),
            (
                "azgate_token_refreshes_total",
                "Background refreshes started",
                self.refreshes,
            ),
            (
                "azgate_token_refresh_failures_total",
                "Background refreshes that failed",
                self.refresh_failures,
            ),
            (
                "azgate_token_deadline_exceeded_total",
                "Token requests that hit their deadline",
                self.deadline_exceeded,
            ),
            (
                "azgate_token_cached_errors_total",
                "Token requests answered with a cached error",
                self.cached_errors_served,
            ),
            (
                "azgate_token_cae_refreshes_total",
                "Cached tokens evicted and refetched on a CAE token_sha256_to_refresh",
                self.cae_refreshes,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        out.push_str("# HELP azgate_token_upstream_errors_total Failed upstream attempts\n");
        out.push_str("# TYPE azgate_token_upstream_errors_total counter\n");
        for (label, value) in &self.upstream_errors {
            let _ = writeln!(
                out,
                "azgate_token_upstream_errors_total{{error=\"{}\"}} {value}",
                escape(label)
            );
        }
        out.push_str("# HELP azgate_token_age_seconds Age of each cached token\n# TYPE azgate_token_age_seconds gauge\n");
        for (key, age, _) in &self.token_ages {
            let _ = writeln!(
                out,
                "azgate_token_age_seconds{{key=\"{}\"}} {age}",
                escape(key)
            );
        }
        out.push_str(
            "# HELP azgate_token_remaining_seconds Time until each cached token expires\n",
        );
        out.push_str("# TYPE azgate_token_remaining_seconds gauge\n");
        for (key, _, remaining) in &self.token_ages {
            let _ = writeln!(
                out,
                "azgate_token_remaining_seconds{{key=\"{}\"}} {remaining}",
                escape(key)
            );
        }
        out
    }
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
