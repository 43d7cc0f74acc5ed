//! The production Envoy configuration `azgate envoy-config` renders: the real Envoy accepts it
//! (`envoy --mode validate`) in production shape and in the test topology's shape, and serves
//! an allowed and a denied request through it, with `azgate token-service` behind `azgate_msi`
//! and one JSON access-log line per request that carries no query string or credential; an
//! Azure name without a `resolve` entry goes to the dynamic forward proxy.
//!
//! The whole scenario suite also runs on this configuration (runtime `envoy-rendered` in
//! `tests/filter.rs`).

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "tests fail on purpose"
)]

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Result, ensure};
use azgate_tests::jwt;
use azgate_tests::pki::{AppCertSpec, Issued, KeyKind, TestCa};
use azgate_tests::topology::{self, Options, Runtime, Topology};
use azgate_tests::upstream::msi_token_claims;

const IDENTITY: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader";

fn roles() -> serde_json::Value {
    serde_json::json!([{
        "kind": "role", "version": "v7", "metadata": {"name": "azure-reader"},
        "spec": {"allow": {"azure_identities": [IDENTITY]}},
    }])
}

/// `envoy --mode validate -c config`.
async fn envoy_validate(config: &Path) -> Result<()> {
    let output = tokio::process::Command::new(topology::envoy_binary()?)
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(config)
        .output()
        .await?;
    ensure!(
        output.status.success(),
        "envoy refused {}:\n{}",
        config.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Production shape: TLS listener, token service, no test overrides; Azure only by DNS
/// through the forward proxy with the system roots.
#[tokio::test]
async fn production_shape_validates_in_envoy() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("azgate-envoy-config-prod-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ca = TestCa::new("azgate test CA")?;
    let gateway = ca.server(&["azgate.example.internal"])?;
    std::fs::write(dir.join("client-ca.crt"), &ca.cert_pem)?;
    std::fs::write(dir.join("gateway.crt"), &gateway.cert_pem)?;
    std::fs::write(dir.join("gateway.key"), &gateway.key_pem)?;
    let yaml = serde_json::json!({
        "listeners": [{
            "name": "azgate",
            "address": "0.0.0.0:8443",
            "max_connections": 4096,
            "tls": {"cert": "gateway.crt", "key": "gateway.key", "client_ca": ["client-ca.crt"]},
        }],
        "admin": {"address": "127.0.0.1:9901"},
        "filter": {"path": topology::filter_wasm()?, "config": {"roles": roles()}},
        "clusters": {"azgate_msi": {"token_service": true}},
    });
    let azgate_yaml = dir.join("azgate.yaml");
    std::fs::write(&azgate_yaml, serde_json::to_string_pretty(&yaml)?)?;
    let rendered = topology::render_envoy_config(&azgate_yaml, "127.0.0.1:50342").await?;
    let text = std::fs::read_to_string(&rendered)?;
    ensure!(text.contains("envoy.clusters.dynamic_forward_proxy"));
    ensure!(
        !text.contains("BEGIN CERTIFICATE"),
        "system roots by file name, nothing inline"
    );
    envoy_validate(&rendered).await?;

    // Behind a TLS front that sets XFCC, the plain listener validates too.
    let yaml = serde_json::json!({
        "listeners": [{"address": "127.0.0.1:8080", "plaintext_behind_trusted_front": true}],
        "filter": {"path": topology::filter_wasm()?, "config": {"roles": roles()}},
        "clusters": {"azgate_msi": {"token_service": true}},
    });
    std::fs::write(&azgate_yaml, serde_json::to_string_pretty(&yaml)?)?;
    // And with the token service on a unix socket (an Envoy pipe address).
    let rendered =
        topology::render_envoy_config(&azgate_yaml, "unix:/run/azgate/token.sock").await?;
    ensure!(std::fs::read_to_string(&rendered)?.contains("/run/azgate/token.sock"));
    envoy_validate(&rendered).await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A Teleport app certificate for `user` with one role, selecting [`IDENTITY`].
fn app_cert(topology: &Topology, user: &str, role: &str) -> Result<Issued> {
    topology.ca.app(
        &AppCertSpec {
            user: Some(user.into()),
            roles: vec![role.into()],
            selected_identity: Some(IDENTITY.into()),
            allowed_identities: vec![IDENTITY.into()],
            not_before_offset_s: -60,
            not_after_offset_s: 3600,
            ..Default::default()
        },
        KeyKind::P256,
    )
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

#[tokio::test]
async fn rendered_config_serves_allowed_and_denied_requests_with_a_clean_access_log() -> Result<()>
{
    let options = Options {
        plugin_config: serde_json::json!({"roles": roles()}).to_string(),
        concurrency: 1,
        in_process_token_service: true,
        ..Options::default()
    };
    let topology = Topology::start(Runtime::EnvoyRendered, options).await?;
    // What the test runs is what a user would validate.
    envoy_validate(&topology.gateway.dir().join("envoy.yaml")).await?;

    let allowed = app_cert(&topology, "alice", "azure-reader")?;
    let resource = "https://management.azure.com/";
    let claims = serde_json::json!({"resource": resource, "exp": now() + 300});
    let jwt = jwt::sign(&allowed.key, jwt::alg_for(&allowed.key), &claims)?;
    let sas_like = "sig=SECRETSIGNATURE";
    let response = topology
        .client(Some(&allowed))?
        .get(format!(
            "{}/subscriptions?api-version=2022-12-01&{sas_like}",
            topology.gateway.url()
        ))
        .header("authorization", format!("Bearer {jwt}"))
        .header("x-forwarded-host", "management.azure.com")
        .send()
        .await?;
    ensure!(response.status() == 200, "allowed: {}", response.status());
    let seen = topology.azure.seen();
    let forwarded = seen.last().expect("Azure saw the request");
    let msi = msi_token_claims(forwarded).expect("an MSI token reached Azure");
    ensure!(
        msi["xms_mirid"] == IDENTITY,
        "token for the identity: {msi}"
    );
    ensure!(forwarded.sni.as_deref() == Some("management.azure.com"));

    let denied = app_cert(&topology, "mallory", "nobody")?;
    let jwt_denied = jwt::sign(&denied.key, jwt::alg_for(&denied.key), &claims)?;
    let response = topology
        .client(Some(&denied))?
        .get(format!(
            "{}/subscriptions?api-version=2022-12-01",
            topology.gateway.url()
        ))
        .header("authorization", format!("Bearer {jwt_denied}"))
        .header("x-forwarded-host", "management.azure.com")
        .send()
        .await?;
    ensure!(response.status() == 403, "denied: {}", response.status());
    ensure!(
        topology.azure.seen().len() == seen.len(),
        "nothing more reached Azure"
    );

    // An Azure name without a `resolve` entry goes to the dynamic forward proxy. Tests have no
    // DNS for Azure (and no route out), so it fails there: 503 from Envoy, never a fallback.
    let claims_storage = serde_json::json!({
        "resource": "https://storage.azure.com/", "exp": now() + 300,
    });
    let jwt_storage = jwt::sign(&allowed.key, jwt::alg_for(&allowed.key), &claims_storage)?;
    let response = topology
        .client(Some(&allowed))?
        .get(format!("{}/container?comp=list", topology.gateway.url()))
        .header("authorization", format!("Bearer {jwt_storage}"))
        .header("x-forwarded-host", "azgatetest.blob.core.windows.net")
        .send()
        .await?;
    ensure!(
        response.status() == 503,
        "forward proxy: {}",
        response.status()
    );
    // Envoy's own answer in azgate's shape, as `azgate serve` gives it.
    ensure!(
        response
            .headers()
            .get("x-azgate-error")
            .is_some_and(|v| v == "UpstreamUnavailable"),
        "x-azgate-error: {:?}",
        response.headers()
    );
    let body: serde_json::Value = response.json().await?;
    ensure!(body["error"]["code"] == "UpstreamUnavailable", "{body}");
    ensure!(
        topology.azure.seen().len() == seen.len(),
        "the fake saw nothing"
    );

    // Envoy writes access-log lines when streams end; give it a moment.
    let mut lines: Vec<serde_json::Value> = Vec::new();
    for _ in 0..50 {
        lines = topology
            .gateway
            .stdout()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect();
        if lines.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(lines.len() == 3, "three access-log lines: {lines:?}");
    ensure!(
        lines[0]["status"] == 200 && lines[0]["path"] == "/subscriptions",
        "{}",
        lines[0]
    );
    ensure!(
        lines[0]["authority"] == "management.azure.com",
        "{}",
        lines[0]
    );
    ensure!(
        lines[0]["subject"]
            .as_str()
            .unwrap_or_default()
            .contains("CN=alice"),
        "{}",
        lines[0]
    );
    ensure!(
        lines[1]["status"] == 403 && lines[1]["azgate_error"] == "IdentityNotAllowed",
        "{}",
        lines[1]
    );
    ensure!(
        lines[0]["upstream_cluster"]
            .as_str()
            .is_some_and(|c| c.starts_with("azure_resolve_")),
        "{}",
        lines[0]
    );
    ensure!(
        lines[2]["status"] == 503
            && lines[2]["upstream_cluster"] == "azure"
            && lines[2]["azgate_error"] == "UpstreamUnavailable",
        "{}",
        lines[2]
    );
    let log = topology.gateway.stdout();
    let msi_token = forwarded
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("no token");
    for secret in [
        jwt.as_str(),
        jwt_denied.as_str(),
        msi_token,
        "SECRETSIGNATURE",
    ] {
        ensure!(!log.contains(secret), "a secret reached the access log");
    }
    Ok(())
}
