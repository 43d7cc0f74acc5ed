//! Live policy reload: the role and lock files (`filter.role_files`, `filter.lock_files`) are
//! read again every [`POLL_INTERVAL`]; a changed policy the filter accepts is handed to every
//! worker's VM (`proxy_on_configure` again, in place, so requests in flight finish and the
//! token cache carries over) and to VMs started later. A policy the filter refuses, or a file
//! that cannot be read, keeps the one in force, is logged and counted — never an open gateway.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use azgate_wasmhost::Plugin;
use tokio::sync::watch;

use crate::config::ServeConfig;
use crate::config::policy::{POLL_INTERVAL, PolicyChange, PolicyWatch};

/// Reload counters for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct PolicyStats {
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
    current: Vec<u8>,
    generation: watch::Sender<u64>,
    stats: Arc<PolicyStats>,
    mut stop: watch::Receiver<bool>,
) {
    let mut policy = PolicyWatch::new(current);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
            _ = stop.changed() => return,
        }
        match policy.poll(&config) {
            PolicyChange::Unchanged => {}
            PolicyChange::Refused => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
            }
            PolicyChange::Changed(candidate) => {
                plugin.set_plugin_config(candidate.clone());
                policy.accept(candidate);
                stats.applied.fetch_add(1, Ordering::Relaxed);
                generation.send_modify(|g| *g += 1);
                tracing::info!("policy files changed: the new policy is in force");
            }
        }
    }
}
