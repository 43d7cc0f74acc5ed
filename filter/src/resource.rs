//! What every Teleport resource file carries, read the same way for roles and locks.

use serde::Deserialize;

/// `metadata` of a Teleport resource (role, lock): only the name is read.
#[derive(Deserialize)]
pub(crate) struct RawMetadata {
    name: Option<String>,
}

impl RawMetadata {
    /// The resource's name, if `metadata` has a non-blank one.
    pub(crate) fn name_of(metadata: Option<Self>) -> Option<String> {
        metadata
            .and_then(|m| m.name)
            .filter(|n| !n.trim().is_empty())
    }
}
