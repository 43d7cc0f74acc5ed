//! Test support for azgate's integration tests: a test CA minting Teleport-format certificates,
//! JWT minting, a fake Azure endpoint, and topologies that run the filter in a real gateway.

#![warn(missing_docs, unreachable_pub)]

pub mod hostile_pki;
pub mod jwt;
pub mod pki;
pub mod raw;
pub mod topology;
pub mod upstream;

/// The tokio runtime the harness-less runners (`filter`, `probe`) drive their trials on: two
/// threads, so a trial's client and a gateway's callbacks can progress together.
pub fn runner_runtime() -> std::io::Result<std::sync::Arc<tokio::runtime::Runtime>> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map(std::sync::Arc::new)
}

/// Replaces each `"$name"` in the `azure_identities` (allow and deny) of a suite file's `roles`
/// with the identity `name` maps to in its `identities` object, as the scenario and hostile
/// suites write roles; an unknown name is an error.
pub fn expand_identity_references(suite: &mut serde_json::Value) -> anyhow::Result<()> {
    let identities: std::collections::HashMap<String, String> =
        serde_json::from_value(suite["identities"].clone())?;
    let Some(roles) = suite["roles"].as_array_mut() else {
        return Ok(());
    };
    for role in roles {
        for side in ["allow", "deny"] {
            let Some(ids) = role["spec"][side]["azure_identities"].as_array_mut() else {
                continue;
            };
            for id in ids {
                if let Some(name) = id.as_str().and_then(|s| s.strip_prefix('$')) {
                    *id = identities
                        .get(name)
                        .cloned()
                        .ok_or_else(|| anyhow::anyhow!("unknown identity ${name}"))?
                        .into();
                }
            }
        }
    }
    Ok(())
}
