//! Gateway metrics. Each worker owns its counters (only it and the scraper touch them), so the
//! request path shares no lock with other workers.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// One worker's counters.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Requests by decision, then code.
    requests: Mutex<BTreeMap<String, BTreeMap<String, u64>>>,
    filter_nanos: AtomicU64,
    filter_calls: AtomicU64,
    vm_restarts: AtomicU64,
    upstream_errors: AtomicU64,
    in_flight: AtomicU64,
    connections_refused: AtomicU64,
}

impl WorkerStats {
    /// Counts a finished request.
    pub fn request(&self, decision: &str, code: &str) {
        let Ok(mut requests) = self.requests.lock() else {
            return;
        };
        // Allocate only the first time a (decision, code) pair is seen.
        if let Some(count) = requests
            .get_mut(decision)
            .and_then(|codes| codes.get_mut(code))
        {
            *count += 1;
            return;
        }
        *requests
            .entry(decision.to_string())
            .or_default()
            .entry(code.to_string())
            .or_default() += 1;
    }

    /// Adds time spent in `proxy_on_request_headers`.
    pub fn record_filter_time(&self, elapsed: Duration) {
        self.filter_nanos
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
        self.filter_calls.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a VM replacement.
    pub fn vm_restart(&self) {
        self.vm_restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an upstream failure.
    pub fn upstream_error(&self) {
        self.upstream_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection closed because its listener was at `max_connections`.
    pub fn connection_refused(&self) {
        self.connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// A request started (`true`) or ended (`false`).
    pub fn in_flight(&self, started: bool) {
        if started {
            self.in_flight.fetch_add(1, Ordering::Relaxed);
        } else {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Requests being served.
    pub fn current(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Prometheus text for all workers.
pub(super) fn render(workers: &[std::sync::Arc<WorkerStats>]) -> String {
    let mut requests: BTreeMap<(String, String), u64> = BTreeMap::new();
    let (mut nanos, mut calls, mut restarts, mut upstream, mut in_flight, mut refused) =
        (0, 0, 0, 0, 0, 0);
    for w in workers {
        if let Ok(r) = w.requests.lock() {
            for (decision, codes) in r.iter() {
                for (code, n) in codes {
                    *requests
                        .entry((decision.clone(), code.clone()))
                        .or_default() += n;
                }
            }
        }
        nanos += w.filter_nanos.load(Ordering::Relaxed);
        calls += w.filter_calls.load(Ordering::Relaxed);
        restarts += w.vm_restarts.load(Ordering::Relaxed);
        upstream += w.upstream_errors.load(Ordering::Relaxed);
        in_flight += w.in_flight.load(Ordering::Relaxed);
        refused += w.connections_refused.load(Ordering::Relaxed);
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP azgate_requests_total Requests by decision and code."
    );
    let _ = writeln!(out, "# TYPE azgate_requests_total counter");
    for ((decision, code), n) in &requests {
        let _ = writeln!(
            out,
            "azgate_requests_total{{decision=\"{decision}\",code=\"{code}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP azgate_filter_seconds Time in proxy_on_request_headers."
    );
    let _ = writeln!(out, "# TYPE azgate_filter_seconds summary");
    let _ = writeln!(out, "azgate_filter_seconds_sum {}", nanos as f64 / 1e9);
    let _ = writeln!(out, "azgate_filter_seconds_count {calls}");
    let _ = writeln!(out, "# TYPE azgate_vm_restarts_total counter");
    let _ = writeln!(out, "azgate_vm_restarts_total {restarts}");
    let _ = writeln!(out, "# TYPE azgate_upstream_errors_total counter");
    let _ = writeln!(out, "azgate_upstream_errors_total {upstream}");
    let _ = writeln!(out, "# TYPE azgate_requests_in_flight gauge");
    let _ = writeln!(out, "azgate_requests_in_flight {in_flight}");
    let _ = writeln!(out, "# TYPE azgate_connections_refused_total counter");
    let _ = writeln!(out, "azgate_connections_refused_total {refused}");
    out
}
