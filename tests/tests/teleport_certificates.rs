//! Certificates made by Go's `crypto/x509` with Teleport's Subject layout
//! (`tests/fixtures/teleport-go/`, from `gen.go`) through every runtime: an RSA-2048 and a
//! P-256 app certificate whose only grant is the `access` role's `{{internal.azure_identities}}`
//! template, expanded from the traits Go wrote in PostalCode, with the App Service's usage, app
//! and cluster checks on.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests fail on purpose"
)]

use anyhow::{Context, Result, ensure};
use azgate_tests::pki::{Issued, PrivateKey, TestCa};
use azgate_tests::topology::{AZURE_HOSTS, Options, Runtime, Topology, repo_root};
use azgate_tests::upstream::{FakeAzure, msi_token_claims};

const READER: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/azgate-tests/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader";

fn fixture(name: &str) -> Result<String> {
    let path = repo_root().join("tests/fixtures/teleport-go").join(name);
    std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))
}

fn plugin_config(app: &str) -> String {
    serde_json::json!({
        "roles": [{"kind": "role", "version": "v8", "metadata": {"name": "access"},
                   "spec": {"allow": {"azure_identities": ["{{internal.azure_identities}}"]}}}],
        "required_usage": "usage:apps",
        "allowed_apps": [app],
        "allowed_clusters": ["teleport.example.com"],
    })
    .to_string()
}

async fn run(runtime: Runtime, app: &str) -> Result<Vec<(u16, String)>> {
    let mut ca = TestCa::new("azgate test CA")?;
    // The gateways trust the Go-made user CA too, as they would trust
    // `tctl auth export --type=tls-user`.
    ca.cert_pem.push_str(&fixture("ca.pem")?);
    let azure = FakeAzure::start(&ca.server(AZURE_HOSTS)?).await?;
    let topology = Topology::start_with(
        runtime,
        Options {
            plugin_config: plugin_config(app),
            concurrency: 1,
            ..Options::default()
        },
        ca,
        azure,
    )
    .await?;
    let mut answers = Vec::new();
    for name in ["app-p256", "app-rsa"] {
        let issued = Issued {
            cert_pem: fixture(&format!("{name}.pem"))?,
            key_pem: fixture(&format!("{name}.key"))?,
            key: PrivateKey::from_pem(&fixture(&format!("{name}.key"))?)?,
        };
        answers.push(
            topology
                .get_as(&issued, "/go-fixture/subscriptions?api-version=2022-12-01")
                .await
                .context(name)?,
        );
    }
    let seen = topology.azure.seen_with_path("/go-fixture/");
    for request in &seen {
        let claims = msi_token_claims(request).context("an MSI token upstream")?;
        ensure!(
            claims["xms_mirid"].as_str() == Some(READER),
            "the trait-granted identity: {claims}"
        );
    }
    ensure!(
        seen.len() == answers.iter().filter(|(s, _)| *s == 200).count(),
        "one upstream request per allowed one"
    );
    Ok(answers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_made_teleport_certificates_work_in_every_runtime() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    for runtime in Runtime::selected() {
        let name = runtime.name();
        let allowed = run(runtime, "azure-cli").await.context(name)?;
        ensure!(
            allowed == [(200, String::new()), (200, String::new())],
            "{name}: both Go certificates are accepted: {allowed:?}"
        );
        // The same certificates for a gateway that serves another app.
        let refused = run(runtime, "other-app").await.context(name)?;
        ensure!(
            refused
                .iter()
                .all(|(s, c)| *s == 403 && c == "CertificateNotForThisApp"),
            "{name}: {refused:?}"
        );
        println!(
            "{name}: Go-made P-256 and RSA-2048 certificates: allowed, and refused for another app"
        );
    }
    Ok(())
}

/// The fixture reads as Teleport wrote it (natively, without a gateway).
#[test]
fn the_go_fixture_has_teleports_layout() {
    let pem = fixture("app-p256.pem").unwrap();
    let identity = azgate_filter::identity::parse_app_certificate(&pem).unwrap();
    assert_eq!(identity.user, "alice@example.com");
    // One multi-valued O RDN in DER order (shorter values first).
    assert_eq!(identity.roles, ["access", "editor", "auditor"]);
    assert_eq!(identity.usage, ["usage:apps"]);
    assert_eq!(identity.app_name.as_deref(), Some("azure-cli"));
    assert_eq!(
        identity.app_cluster.as_deref(),
        Some("teleport.example.com")
    );
    assert_eq!(identity.selected_identity.as_deref(), Some(READER));
    assert_eq!(identity.allowed_identities.len(), 2);
    assert_eq!(identity.traits["azure_identities"], [READER]);
    assert_eq!(identity.traits["groups"], ["team-red", "dev, \"ops\"; x"]);
    assert!(identity.traits["kubernetes_groups"].is_empty());
}
