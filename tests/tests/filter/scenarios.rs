//! The scenarios that need their own topology or several requests: single flight, expiry,
//! claims challenges, unauthenticated forwarding, audit lines, a bad configuration, in-process
//! tokens.

use super::*;

#[derive(Clone, Copy)]
pub(crate) enum Special {
    Audit,
    Cae,
    BadConfig,
    Expiry,
    InProcessTokens,
    SingleFlight,
    Unauthenticated,
}

pub(crate) async fn run_special(kind: Special, shared: &Shared, suite: &Suite) -> Result<()> {
    match kind {
        Special::SingleFlight => single_flight(shared.get().await?, suite).await,
        Special::Expiry => {
            let _one_at_a_time = shared.exclusive.lock().await;
            let topology = shared.get().await?;
            topology.imds.set_token_lifetime(Duration::from_secs(4));
            let result = expiry(topology, suite).await;
            topology
                .imds
                .set_token_lifetime(Duration::from_secs(86_400));
            result
        }
        Special::Unauthenticated => unauthenticated(shared.get().await?, suite).await,
        Special::Audit => audit(shared.get().await?, suite).await,
        Special::Cae => claims_challenge(shared.get().await?, suite).await,
        Special::BadConfig => bad_config(shared.runtime).await,
        Special::InProcessTokens => in_process_tokens(shared.get().await?, suite).await,
    }
}

/// Sends an allowed GET for `resource` with `cert` and returns the status.
async fn allowed_get(
    topology: &Topology,
    cert: &Issued,
    resource: &str,
    path: &str,
) -> Result<u16> {
    let jwt = token(Some(cert), &AuthCase::default(), resource)?;
    let response = topology
        .client(Some(cert))?
        .get(format!("{}{path}", topology.gateway.url()))
        .header("authorization", format!("Bearer {jwt}"))
        .header("x-forwarded-host", "management.azure.com")
        .send()
        .await?;
    Ok(response.status().as_u16())
}

async fn single_flight(topology: &Topology, suite: &Suite) -> Result<()> {
    let resource = "api://azgate-single-flight";
    let cert = issue(topology, suite, &CertCase::default())?;
    // Ten connections of five requests each, so both gateway workers take part.
    let mut tasks = Vec::new();
    for connection in 0..10 {
        let client = topology.client(Some(&cert))?;
        let jwt = token(Some(&cert), &AuthCase::default(), resource)?;
        let url = topology.gateway.url();
        for request in 0..5 {
            let (client, jwt, url) = (client.clone(), jwt.clone(), url.clone());
            tasks.push(tokio::spawn(async move {
                client
                    .get(format!("{url}/single-flight/{connection}/{request}"))
                    .header("authorization", format!("Bearer {jwt}"))
                    .header("x-forwarded-host", "management.azure.com")
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            }));
        }
    }
    for task in tasks {
        let status = task.await??;
        ensure!(status == 200, "a concurrent request got {status}");
    }
    let calls = topology.imds_calls_for(resource);
    ensure!(
        calls == 1,
        "50 concurrent first requests made {calls} IMDS calls"
    );
    let seen = topology.azure.seen_with_path("/single-flight/").len();
    ensure!(seen == 50, "upstream saw {seen} of 50 requests");
    Ok(())
}

async fn expiry(topology: &Topology, suite: &Suite) -> Result<()> {
    let resource = "api://azgate-expiry";
    let cert = issue(topology, suite, &CertCase::default())?;
    ensure!(allowed_get(topology, &cert, resource, "/expiry/1").await? == 200);
    ensure!(allowed_get(topology, &cert, resource, "/expiry/2").await? == 200);
    let calls = topology.imds_calls_for(resource);
    ensure!(
        calls == 1,
        "a fresh cached token was fetched again ({calls} calls)"
    );
    // A 4 s token is served for half its life, then fetched again.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    ensure!(allowed_get(topology, &cert, resource, "/expiry/3").await? == 200);
    let calls = topology.imds_calls_for(resource);
    ensure!(
        calls == 2,
        "an expired cached token was not fetched again ({calls} calls)"
    );
    Ok(())
}

async fn claims_challenge(topology: &Topology, suite: &Suite) -> Result<()> {
    let cert = issue(topology, suite, &CertCase::default())?;
    let resource = "api://azgate-cae";
    let msi_of = |path: &str| {
        topology
            .azure
            .seen_with_path(path)
            .first()
            .and_then(|s| s.header("authorization").map(str::to_string))
    };
    ensure!(allowed_get(topology, &cert, resource, "/cae/first").await? == 200);
    ensure!(allowed_get(topology, &cert, resource, "/cae/cached").await? == 200);
    ensure!(
        topology.imds_calls_for(resource) == 1,
        "one fetch, then the cache"
    );
    let first = msi_of("/cae/first").context("upstream saw /cae/first")?;
    ensure!(msi_of("/cae/cached").as_ref() == Some(&first));
    // Azure revokes the token: the client gets Azure's 401 and challenge unchanged.
    let jwt = token(Some(&cert), &AuthCase::default(), resource)?;
    let response = topology
        .client(Some(&cert))?
        .get(format!("{}/cae/revoke", topology.gateway.url()))
        .header("authorization", format!("Bearer {jwt}"))
        .header("x-forwarded-host", "management.azure.com")
        .send()
        .await?;
    ensure!(response.status() == 401, "status {}", response.status());
    let challenge = response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    ensure!(
        challenge.contains("insufficient_claims")
            && response.headers().get("x-azgate-error").is_none(),
        "the challenge reaches the client as Azure sent it: {challenge:?}"
    );
    // The next request, on any worker, gets a fresh token: one new fetch, which names the
    // refused token's hash so a caching token service replaces it too.
    for n in 0..4 {
        let path = format!("/cae/after-{n}");
        ensure!(
            allowed_get(topology, &cert, resource, &path).await? == 200,
            "{path}"
        );
        let msi = msi_of(&path).context("upstream saw the request")?;
        ensure!(msi != first, "{path} carried the revoked token");
    }
    ensure!(
        topology.imds_calls_for(resource) == 2,
        "one fetch after the revocation"
    );
    let refetch = topology
        .imds
        .requests()
        .into_iter()
        .filter(|r| r.query_param("resource").as_deref() == Some(resource))
        .nth(1)
        .context("the second fetch")?;
    let hash = refetch
        .query_param("token_sha256_to_refresh")
        .context("the refetch names the refused token")?;
    let refused = first.trim_start_matches("Bearer ");
    ensure!(
        hash == azgate_filter::token_cache::token_sha256(refused),
        "{hash}"
    );
    Ok(())
}

async fn unauthenticated(topology: &Topology, suite: &Suite) -> Result<()> {
    let cert = issue(topology, suite, &CertCase::default())?;
    let response = topology
        .client(Some(&cert))?
        .get(format!("{}/unauthenticated/1", topology.gateway.url()))
        .header("x-forwarded-host", "management.azure.com")
        .send()
        .await?;
    ensure!(response.status() == 200, "status {}", response.status());
    let seen = topology.azure.seen_with_path("/unauthenticated/");
    ensure!(seen.len() == 1, "upstream saw {} requests", seen.len());
    ensure!(
        seen[0].header("authorization").is_none(),
        "a token was injected"
    );
    ensure!(
        seen[0].header("x-forwarded-client-cert").is_none(),
        "XFCC reached upstream"
    );
    ensure!(topology.imds.token_requests() == 0, "IMDS was called");
    // RBAC still applies to unauthenticated requests.
    let denied = issue(
        topology,
        suite,
        &CertCase {
            roles: vec!["lockdown".into()],
            ..CertCase::default()
        },
    )?;
    let response = topology
        .client(Some(&denied))?
        .get(format!("{}/unauthenticated/2", topology.gateway.url()))
        .header("x-forwarded-host", "management.azure.com")
        .send()
        .await?;
    ensure!(response.status() == 403, "status {}", response.status());
    Ok(())
}

async fn audit(topology: &Topology, suite: &Suite) -> Result<()> {
    let cert = issue(topology, suite, &CertCase::default())?;
    let resource = "api://azgate-audit";
    let jwt = token(Some(&cert), &AuthCase::default(), resource)?;
    let response = topology
        .client(Some(&cert))?
        .get(format!(
            "{}/audit/allowed?secret=s3cr3t",
            topology.gateway.url()
        ))
        .header("authorization", format!("Bearer {jwt}"))
        .header("x-forwarded-host", "management.azure.com")
        .header("x-ms-correlation-request-id", "corr-audit-1")
        .send()
        .await?;
    ensure!(response.status() == 200);
    // Again: the token now comes from the cache.
    ensure!(allowed_get(topology, &cert, resource, "/audit/allowed-again").await? == 200);
    let response = topology
        .client(Some(&cert))?
        .get(format!("{}/audit/denied", topology.gateway.url()))
        .header("authorization", format!("Bearer {jwt}"))
        .header("x-forwarded-host", "example.com")
        .send()
        .await?;
    ensure!(response.status() == 403);
    let msi = topology
        .azure
        .seen_with_path("/audit/")
        .first()
        .and_then(|s| s.header("authorization").map(str::to_string))
        .ok_or_else(|| anyhow!("upstream saw nothing"))?;
    // The log is written asynchronously by the gateway.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = topology.gateway.log();
    // The JSON object is embedded in each runtime's own log line format.
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| l.find("{\"").map(|i| &l[i..]))
        .filter_map(|json| {
            serde_json::Deserializer::from_str(json)
                .into_iter::<serde_json::Value>()
                .next()?
                .ok()
        })
        .filter(|v: &serde_json::Value| v["event"] == "azgate.request")
        .collect();
    let allowed = lines
        .iter()
        .find(|l| l["path"] == "/audit/allowed")
        .ok_or_else(|| anyhow!("no audit line for the allowed request:\n{log}"))?;
    ensure!(
        allowed["decision"] == "allow" && allowed["user"] == "alice",
        "{allowed}"
    );
    ensure!(
        allowed["identity"] == identity(suite, "reader").as_str(),
        "{allowed}"
    );
    ensure!(allowed["target"] == "management.azure.com", "{allowed}");
    ensure!(
        allowed["method"] == "GET" && allowed["resource"] == resource,
        "{allowed}"
    );
    // Written when Azure's answer is known, with what ties it to Azure's own logs.
    ensure!(
        allowed["upstream_status"] == 200 && allowed["status"] == 200,
        "{allowed}"
    );
    ensure!(
        allowed["x_ms_request_id"] == azgate_tests::upstream::FAKE_REQUEST_ID
            && allowed["x_ms_correlation_request_id"] == "corr-audit-1",
        "{allowed}"
    );
    ensure!(
        allowed["duration_ms"].as_i64().is_some_and(|d| d >= 0),
        "{allowed}"
    );
    ensure!(allowed["token_cached"] == false, "{allowed}");
    let again = lines
        .iter()
        .find(|l| l["path"] == "/audit/allowed-again")
        .ok_or_else(|| anyhow!("no audit line for the second request:\n{log}"))?;
    ensure!(again["token_cached"] == true, "{again}");
    let denied = lines
        .iter()
        .find(|l| l["path"] == "/audit/denied")
        .ok_or_else(|| anyhow!("no audit line for the denied request"))?;
    ensure!(
        denied["decision"] == "deny" && denied["code"] == "NotAnAzureEndpoint",
        "{denied}"
    );
    let msi = msi.trim_start_matches("Bearer ");
    let key_body: String = cert
        .key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    for (what, secret) in [
        ("MSI token", msi),
        ("caller JWT", jwt.as_str()),
        ("JWT signature", jwt.rsplit('.').next().unwrap_or_default()),
        ("query string", "s3cr3t"),
        ("private key", &key_body[..40.min(key_body.len())]),
    ] {
        ensure!(!log.contains(secret), "the gateway log contains the {what}");
    }
    Ok(())
}

async fn bad_config(runtime: Runtime) -> Result<()> {
    for (config, field) in [
        (
            r#"{"roles": [], "token_timeout_ms": 0}"#,
            "token_timeout_ms",
        ),
        (
            r#"{"roles": [{"metadata": {"name": "r"}, "spec": {"allow": {"azure_identities": ["*"]}}}]}"#,
            "roles[0].spec.allow.azure_identities[0]",
        ),
        (
            r#"{"roles": [], "allow_unauthenticted": true}"#,
            "allow_unauthenticted",
        ),
        ("not json", "(document)"),
    ] {
        let failure = topology::start_expecting_failure(runtime, config).await?;
        ensure!(
            failure.contains(&format!("invalid plugin configuration: {field}")),
            "the start failure does not name {field}:\n{failure}"
        );
    }
    Ok(())
}

async fn in_process_tokens(topology: &Topology, suite: &Suite) -> Result<()> {
    let resource = "api://azgate-in-process";
    let cert = issue(topology, suite, &CertCase::default())?;
    for n in 0..3 {
        let status = allowed_get(topology, &cert, resource, &format!("/in-process/{n}")).await?;
        ensure!(status == 200, "status {status}");
    }
    let calls = topology.imds_calls_for(resource);
    ensure!(calls == 1, "{calls} IMDS calls for three requests");
    let seen = topology.azure.seen_with_path("/in-process/");
    let token = seen
        .first()
        .and_then(|s| s.header("authorization"))
        .and_then(|a| a.strip_prefix("Bearer "))
        .ok_or_else(|| anyhow!("no token upstream"))?;
    let claims = jwt::payload(token).ok_or_else(|| anyhow!("not a JWT"))?;
    ensure!(claims["aud"] == resource, "aud {}", claims["aud"]);
    ensure!(
        claims["xms_mirid"]
            .as_str()
            .is_some_and(|m| m.eq_ignore_ascii_case(&identity(suite, "reader"))),
        "xms_mirid {}",
        claims["xms_mirid"]
    );
    Ok(())
}
