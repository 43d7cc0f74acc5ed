//! Live policy reload in `azgate serve` (it re-reads its policy files) and in the real Envoy
//! with the rendered configuration (`azgate envoy-config --watch` rewrites the filter's ECDS
//! resource): a lock, its removal, a role revocation and its undoing apply to the next requests
//! without a restart (each delay is measured and must stay within 2 s), and a broken role file
//! leaves the policy in force (serve also counts it).

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests fail on purpose"
)]

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use azgate_emulator::Fault;
use azgate_tests::pki::{AppCertSpec, Issued, KeyKind};
use azgate_tests::topology::{Options, Runtime, Topology};

const READER: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/azgate-tests/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader";
/// How often serve reads the policy files.
const POLL: Duration = Duration::from_millis(500);
/// Longest a change may take to apply (the bound).
const WITHIN: Duration = Duration::from_secs(2);

fn roles(deny_reader: bool, version: &str) -> String {
    let deny = if deny_reader {
        format!("  deny:\n    azure_identities: ['{READER}']\n")
    } else {
        String::new()
    };
    format!(
        "kind: role\nversion: {version}\nmetadata:\n  name: azure-reader\nspec:\n  allow:\n    \
         azure_identities: ['{READER}']\n{deny}"
    )
}

/// Replaces `path` at once (write and rename), as editors and `tctl get > file` via a
/// temporary file do, so the watcher never reads half a file.
fn replace(path: &Path, text: &str) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

async fn answer(topology: &Topology, alice: &Issued) -> Result<(u16, String)> {
    topology.get_as(alice, "/reload/subscriptions").await
}

/// Waits until requests get `want`; returns how long that took.
async fn until(topology: &Topology, alice: &Issued, want: (u16, &str)) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let got = answer(topology, alice).await?;
        if got.0 == want.0 && got.1 == want.1 {
            return Ok(started.elapsed());
        }
        if started.elapsed() > 5 * WITHIN {
            bail!(
                "still {got:?} after {:?}, expected {want:?}",
                started.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metric(topology: &Topology, line: &str) -> Result<u64> {
    let text = reqwest::get(format!("http://{}/metrics", topology.gateway.admin))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
        .unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_and_role_changes_apply_without_a_restart() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    for runtime in Runtime::selected() {
        if runtime == Runtime::Envoy {
            // The plain test topology has no policy files.
            continue;
        }
        scenario(runtime)
            .await
            .map_err(|e| e.context(runtime.name()))?;
    }
    Ok(())
}

async fn scenario(runtime: Runtime) -> Result<()> {
    let dir = std::env::temp_dir().join(format!(
        "azgate-reload-{}-{}",
        std::process::id(),
        runtime.name()
    ));
    std::fs::create_dir_all(dir.join("locks"))?;
    let role_file = dir.join("roles.yaml");
    replace(&role_file, &roles(false, "v7"));
    let topology = Topology::start(
        runtime,
        Options {
            plugin_config: serde_json::json!({"roles": []}).to_string(),
            concurrency: 2,
            role_files: vec![role_file.clone()],
            lock_files: vec![dir.join("locks")],
            ..Options::default()
        },
    )
    .await?;
    let alice = topology.ca.app(
        &AppCertSpec::user("alice", &["azure-reader"], READER),
        KeyKind::P256,
    )?;
    // A request in flight across a reload finishes under the policy it was decided by: alice's
    // token fetch is slowed; meanwhile locks on alice and carol apply (carol, whom no role
    // allows, is refused before any token, so polling her measures the reload alone), and the
    // paused request is still answered (its fetch survives the reconfiguration).
    let carol = topology.ca.app(
        &AppCertSpec::user("carol", &["nobody"], READER),
        KeyKind::P256,
    )?;
    ensure!(answer(&topology, &carol).await? == (403, "IdentityNotAllowed".into()));
    topology
        .imds
        .set_fault(Fault::Slow(Duration::from_millis(2500)));
    let in_flight = {
        let (topology, alice) = (&topology, &alice);
        async move { answer(topology, alice).await }
    };
    let locking = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        replace(
            &dir.join("locks/alice.yaml"),
            "kind: lock\nversion: v2\nmetadata: {name: alice}\nspec:\n  target: {user: alice}\n\
             ---\nkind: lock\nversion: v2\nmetadata: {name: carol}\nspec:\n  target: {user: carol}\n",
        );
        let locked = until(&topology, &carol, (403, "Locked")).await;
        std::fs::remove_file(dir.join("locks/alice.yaml")).map_err(anyhow::Error::from)?;
        locked
    };
    let (first, locked) = tokio::join!(in_flight, locking);
    ensure!(
        first? == (200, String::new()),
        "the request in flight was answered under its policy"
    );
    let locked = locked?;
    println!(
        "{}: lock applied after {} ms while a request was in flight",
        runtime.name(),
        locked.as_millis()
    );
    ensure!(locked <= WITHIN, "the lock took {locked:?}");
    topology.imds.set_fault(Fault::None);
    until(&topology, &alice, (200, "")).await?;
    ensure!(answer(&topology, &carol).await? == (403, "IdentityNotAllowed".into()));

    let mut delays = Vec::new();
    // A lock on alice.
    replace(
        &dir.join("locks/alice.yaml"),
        "kind: lock\nversion: v2\nmetadata: {name: alice}\nspec:\n  target: {user: alice}\n  message: offboarding\n",
    );
    delays.push(("lock", until(&topology, &alice, (403, "Locked")).await?));
    // The lock removed.
    std::fs::remove_file(dir.join("locks/alice.yaml"))?;
    delays.push(("unlock", until(&topology, &alice, (200, "")).await?));
    // The role revoked (deny wins), then restored.
    replace(&role_file, &roles(true, "v7"));
    delays.push((
        "revoke",
        until(&topology, &alice, (403, "IdentityNotAllowed")).await?,
    ));
    replace(&role_file, &roles(false, "v8"));
    delays.push(("restore", until(&topology, &alice, (200, "")).await?));
    for (what, delay) in &delays {
        println!(
            "{}: {what} in force after {} ms",
            runtime.name(),
            delay.as_millis()
        );
        ensure!(*delay <= WITHIN, "{what} took {delay:?}");
    }
    let serve = runtime == Runtime::Serve;
    if serve {
        // Lock and unlock around the request in flight, then the four steps.
        ensure!(metric(&topology, "azgate_policy_reloads_total{result=\"ok\"}").await? == 6);
    }

    // A broken role file keeps the policy in force (alice still allowed), and is counted.
    replace(&role_file, &roles(true, "v99"));
    tokio::time::sleep(3 * POLL).await;
    ensure!(answer(&topology, &alice).await? == (200, String::new()));
    if serve {
        ensure!(metric(&topology, "azgate_policy_reloads_total{result=\"error\"}").await? == 1);
    }
    // Fixed again: applied.
    replace(&role_file, &roles(true, "v7"));
    until(&topology, &alice, (403, "IdentityNotAllowed")).await?;
    drop(topology);
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
