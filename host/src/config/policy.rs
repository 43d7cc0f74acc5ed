//! Which policy is in force: the plugin configuration with the role and lock files merged,
//! offered again only when it changed and the filter's own parser accepts it.

use std::time::Duration;

use super::ServeConfig;

/// How often the policy files are read (a change applies within about this long).
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

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
