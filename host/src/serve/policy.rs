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
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

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

/// What one look at the policy files found.
#[derive(Debug)]
pub enum PolicyChange {
    /// The policy in force, or a refusal already reported.
    Unchanged,
    /// A changed plugin configuration the filter accepts; [`PolicyWatch::accept`] it once it
    /// is applied.
    Changed(Vec<u8>),
    /// A change the filter refuses, or files that cannot be read: logged once; the policy in
    /// force stays.
    Refused,
}

/// The rule both policy watchers follow (`azgate serve` and `azgate envoy-config --watch`):
/// read the plugin configuration with the role and lock files merged, and offer it only when
/// it differs from the one in force and the filter's own parser accepts it.
#[derive(Debug)]
pub struct PolicyWatch {
    current: Vec<u8>,
    /// The last refused configuration (or read error), so one bad edit is reported once.
    refused: Option<Vec<u8>>,
}

impl PolicyWatch {
    /// Starts from `current`, the plugin configuration in force.
    pub fn new(current: Vec<u8>) -> Self {
        Self {
            current,
            refused: None,
        }
    }

    /// Reads `config`'s policy files once.
    pub fn poll(&mut self, config: &ServeConfig) -> PolicyChange {
        let candidate = match config.plugin_config() {
            Ok(bytes) => bytes,
            Err(error) => {
                let marker = error.to_string().into_bytes();
                if self.refused.as_ref() == Some(&marker) {
                    return PolicyChange::Unchanged;
                }
                tracing::error!(%error, "policy files not reloaded; the policy in force stays");
                self.refused = Some(marker);
                return PolicyChange::Refused;
            }
        };
        if candidate == self.current || self.refused.as_ref() == Some(&candidate) {
            return PolicyChange::Unchanged;
        }
        if let Err(error) = azgate_filter::config::Config::parse(&candidate) {
            tracing::error!(%error, "the changed policy is refused; the policy in force stays");
            self.refused = Some(candidate);
            return PolicyChange::Refused;
        }
        PolicyChange::Changed(candidate)
    }

    /// `applied` is now in force.
    pub fn accept(&mut self, applied: Vec<u8>) {
        self.current = applied;
        self.refused = None;
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
