//! Live policy reload: the role and lock files (`filter.role_files`, `filter.lock_files`) are
//! read again every [`POLL_INTERVAL`]; a changed policy the filter accepts is handed to every
//! worker's VM (`proxy_on_configure` again, in place, so requests in flight finish and the
//! token cache carries over) and to VMs started later. A policy the filter refuses, or a file
//! that cannot be read, keeps the one in force, is logged and counted — never an open gateway.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use azgate_wasmhost::Plugin;
use tokio::sync::watch;

use super::config::ServeConfig;

/// How often the policy files are read (a change applies within about this long).
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Reload counters for `/metrics`.
#[derive(Debug, Default)]
pub struct PolicyStats {
    applied: AtomicU64,
    refused: AtomicU64,
}

impl PolicyStats {
    /// Prometheus text.
    pub(crate) fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP azgate_policy_reloads_total Policy changes applied (ok) or refused, keeping the policy in force (error)."
        );
        let _ = writeln!(out, "# TYPE azgate_policy_reloads_total counter");
        for (result, counter) in [("ok", &self.applied), ("error", &self.refused)] {
            let _ = writeln!(
                out,
                "azgate_policy_reloads_total{{result=\"{result}\"}} {}",
                counter.load(Ordering::Relaxed)
            );
        }
    }
}

/// Watches the policy files of `config` until `stop`; `current` is the plugin configuration in
/// force. Each applied change bumps `generation`, which tells the workers to reconfigure.
pub(crate) async fn watch(
    config: ServeConfig,
    plugin: Arc<Plugin>,
    mut current: Vec<u8>,
    generation: watch::Sender<u64>,
    stats: Arc<PolicyStats>,
    mut stop: watch::Receiver<bool>,
) {
    // The last refused configuration, so one bad edit is logged once.
    let mut refused: Option<Vec<u8>> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
            _ = stop.changed() => return,
        }
        let candidate = match config.plugin_config() {
            Ok(bytes) => bytes,
            Err(error) => {
                let marker = error.to_string().into_bytes();
                if refused.as_ref() != Some(&marker) {
                    tracing::error!(%error, "policy files not reloaded; the policy in force stays");
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                    refused = Some(marker);
                }
                continue;
            }
        };
        if candidate == current || refused.as_ref() == Some(&candidate) {
            continue;
        }
        if let Err(error) = azgate_filter::config::Config::parse(&candidate) {
            tracing::error!(%error, "the changed policy is refused; the policy in force stays");
            stats.refused.fetch_add(1, Ordering::Relaxed);
            refused = Some(candidate);
            continue;
        }
        plugin.set_plugin_config(candidate.clone());
        current = candidate;
        refused = None;
        stats.applied.fetch_add(1, Ordering::Relaxed);
        generation.send_modify(|g| *g += 1);
        tracing::info!("policy files changed: the new policy is in force");
    }
}
