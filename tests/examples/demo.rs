//! `make run`: azgate serve on an embedded default — a dev CA, the IMDS emulator and a fake
//! Azure endpoint on loopback — showing an allowed and a denied request, then waiting so you
//! can send your own (the commands are printed). Ctrl-C stops everything.
//!
//! You can execute this example with `make run` (which builds the filter and `azgate` first).

use std::time::Duration;

use anyhow::{Context, Result};
use azgate_tests::jwt;
use azgate_tests::pki::{AppCertSpec, Issued, KeyKind};
use azgate_tests::topology::{self, Options, Runtime, Topology};

const READER: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/demo/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader";

#[tokio::main]
async fn main() -> Result<()> {
    // The roles, as a Teleport admin would write them (here as the filter's JSON).
    let plugin_config = serde_json::json!({
        "roles": [
            {"kind": "role", "version": "v7", "metadata": {"name": "azure-reader"},
             "spec": {"allow": {"azure_identities": [READER]}}},
            {"kind": "role", "version": "v7", "metadata": {"name": "contractor"},
             "spec": {"deny": {"azure_identities": ["*"]}}}
        ]
    });
    println!("starting azgate serve with a dev CA, an IMDS emulator and a fake Azure endpoint...");
    let topology = Topology::start(
        Runtime::Serve,
        Options {
            plugin_config: plugin_config.to_string(),
            concurrency: 2,
            in_process_token_service: true,
            ..Options::default()
        },
    )
    .await?;
    let dir = topology::repo_root().join(".tmp/demo");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("ca.crt"), &topology.ca.cert_pem)?;

    // Alice may use the reader identity; Bob is a contractor (denied every identity).
    let alice = user(&topology, "alice", "azure-reader")?;
    let bob = user(&topology, "bob", "contractor")?;
    for (name, issued) in [("alice", &alice), ("bob", &bob)] {
        std::fs::write(dir.join(format!("{name}.crt")), &issued.cert_pem)?;
        std::fs::write(dir.join(format!("{name}.key")), &issued.key_pem)?;
        // tsh's proof-of-possession token: {resource, tid}, signed by the certificate's key.
        let token = jwt::sign(
            &issued.key,
            jwt::alg_for(&issued.key),
            &serde_json::json!({"resource": "https://management.azure.com/", "tid": "00000000-0000-0000-0000-00000000d3e0"}),
        )?;
        std::fs::write(dir.join(format!("{name}.jwt")), token)?;
    }

    let url = format!(
        "{}/subscriptions?api-version=2022-12-01",
        topology.gateway.url()
    );
    for (name, issued) in [("alice", &alice), ("bob", &bob)] {
        let token = std::fs::read_to_string(dir.join(format!("{name}.jwt")))?;
        let response = topology
            .client(Some(issued))?
            .get(&url)
            .header("x-forwarded-host", "management.azure.com")
            .header("authorization", format!("Bearer {token}"))
            .send()
            .await
            .context("request through the gateway")?;
        let status = response.status();
        let body = response.text().await?;
        println!("\n{name}: GET management.azure.com/subscriptions -> {status}\n  {body}");
    }
    if let Some(seen) = topology.azure.seen().first() {
        let token = seen
            .header("authorization")
            .unwrap_or_default()
            .trim_start_matches("Bearer ");
        let claims = jwt::payload(token).unwrap_or_default();
        println!(
            "\nthe fake Azure endpoint received alice's request with an MSI token for {} (aud {})",
            claims["xms_mirid"], claims["aud"]
        );
    }

    let d = dir.display();
    println!(
        "\nSend your own (files in {d}):\n\n  curl --cacert {d}/ca.crt --cert {d}/alice.crt --key {d}/alice.key \\\n    \
         -H 'X-Forwarded-Host: management.azure.com' -H \"Authorization: Bearer $(cat {d}/alice.jwt)\" \\\n    \
         '{url}'\n\nTry bob's files, another X-Forwarded-Host (example.com), or no Authorization header.\n\
         The gateway's log: AZGATE_KEEP_LOGS=1 keeps it under /tmp. Ctrl-C stops everything."
    );
    tokio::signal::ctrl_c().await?;
    // Let in-flight output settle before the topology (and its gateway) is dropped.
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}

fn user(topology: &Topology, name: &str, role: &str) -> Result<Issued> {
    topology.ca.app(
        &AppCertSpec {
            user: Some(name.into()),
            roles: vec![role.into()],
            selected_identity: Some(READER.into()),
            allowed_identities: vec![READER.into()],
            not_before_offset_s: -60,
            not_after_offset_s: 12 * 3600,
            ..Default::default()
        },
        KeyKind::P256,
    )
}
