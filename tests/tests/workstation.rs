//! The user's side end to end: the real `az` CLI (from `.venv/`, installed by
//! `tests/clients/run.sh`) runs through `azgate az` → `azgate`'s local proxy → the gateway
//! (each runtime in `AZGATE_RUNTIMES`) → a fake Resource Manager over TLS on loopback that
//! answers only real managed-identity tokens (the IMDS emulator's). Certificates come from the
//! dev CA through the `azgate ca` commands, exactly as a user would make them.
//!
//! Everything listens on 127.0.0.1; az's non-Azure traffic goes to a dead proxy (127.0.0.1:9), so
//! nothing can leave the machine.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use azgate_tests::pki::TestCa;
use azgate_tests::topology::{AZURE_HOSTS, Options, Runtime, Topology, azgate_binary, repo_root};
use azgate_tests::upstream::{ARM_SUBSCRIPTION_ID, FakeAzure, msi_token_claims};

const READER: &str = "/subscriptions/00000000-0000-0000-0000-00000000a2a7/resourceGroups/azgate-demo/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader";
const ADMIN: &str = "/subscriptions/00000000-0000-0000-0000-00000000a2a7/resourceGroups/azgate-demo/providers/Microsoft.ManagedIdentity/userAssignedIdentities/admin";
/// `--trait` granting READER through the `access` role's template.
const TRAIT_READER: &str = "azure_identities=/subscriptions/00000000-0000-0000-0000-00000000a2a7/resourceGroups/azgate-demo/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader";
/// The resource az asks tokens for in the public cloud.
const ARM_RESOURCE: &str = "https://management.core.windows.net/";

/// Variables that would point az or azgate anywhere but where the test does.
const SCRUBBED: &[&str] = &[
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "IDENTITY_SERVER_THUMBPRINT",
    "IMDS_ENDPOINT",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_CONFIG_DIR",
    "REQUESTS_CA_BUNDLE",
    "SSL_CERT_FILE",
    "CURL_CA_BUNDLE",
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
    "AZGATE_GATEWAY",
    "AZGATE_CERT",
    "AZGATE_KEY",
    "AZGATE_CA",
    "AZGATE_CA_DIR",
    "AZGATE_LOG",
];

/// Role files the dev CA issues from.
const CA_ROLES: &str = r#"
kind: role
version: v7
metadata:
  name: azure-reader
spec:
  allow:
    azure_identities:
    - "/subscriptions/00000000-0000-0000-0000-00000000a2a7/resourceGroups/azgate-demo/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader"
---
kind: role
version: v7
metadata:
  name: azure-admin
spec:
  allow:
    azure_identities:
    - "/subscriptions/00000000-0000-0000-0000-00000000a2a7/resourceGroups/azgate-demo/providers/Microsoft.ManagedIdentity/userAssignedIdentities/admin"
    - "/subscriptions/00000000-0000-0000-0000-00000000a2a7/resourceGroups/azgate-demo/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader"
---
kind: role
version: v7
metadata:
  name: contractor
spec:
  allow:
    azure_identities:
    - "/subscriptions/00000000-0000-0000-0000-00000000a2a7/resourceGroups/azgate-demo/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader"
---
# The dynamic grant of Teleport's preset `access` role: every identity in the user's
# azure_identities trait.
kind: role
version: v8
metadata:
  name: access
spec:
  allow:
    app_labels: {'*': '*'}
    azure_identities: ['{{internal.azure_identities}}']
    logins: ['{{internal.logins}}']
"#;

/// The gateway's roles: the same, except that `contractor` was revoked after its certificates
/// were issued (deny wins).
fn gateway_roles() -> serde_json::Value {
    let role = |name: &str, allow: &[&str], deny: &[&str]| {
        serde_json::json!({"kind": "role", "version": "v7", "metadata": {"name": name},
            "spec": {"allow": {"azure_identities": allow}, "deny": {"azure_identities": deny}}})
    };
    serde_json::json!([
        role("azure-reader", &[READER], &[]),
        role("azure-admin", &[ADMIN, READER], &[]),
        role("contractor", &[READER], &[READER]),
        role("access", &["{{internal.azure_identities}}"], &[]),
    ])
}

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Output {
    fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.stdout).with_context(|| {
            format!(
                "stdout is not JSON:\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    fn ok(self, what: &str) -> Result<Self> {
        ensure!(
            self.code == Some(0),
            "{what} failed ({:?}):\nstdout:\n{}\nstderr:\n{}",
            self.code,
            self.stdout,
            self.stderr
        );
        Ok(self)
    }
}

/// Paths and environment of one run.
struct Workstation {
    dir: PathBuf,
    azgate: PathBuf,
    az: PathBuf,
}

impl Workstation {
    fn new(runtime: Runtime) -> Result<Self> {
        let ws = Self::new_plain(runtime.name())?;
        ensure!(
            ws.az.exists(),
            "the Azure CLI is not at {} (run tests/clients/venv.sh, or set AZGATE_AZ)",
            ws.az.display()
        );
        Ok(ws)
    }

    /// A workstation for the azgate commands alone (az may be missing).
    fn new_plain(name: &str) -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("azgate-workstation-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let az = std::env::var_os("AZGATE_AZ")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join(".venv/bin/az"));
        Ok(Self {
            dir,
            azgate: azgate_binary()?,
            az,
        })
    }

    async fn azgate(&self, args: &[&str]) -> Result<Output> {
        let mut command = tokio::process::Command::new(&self.azgate);
        command.args(args);
        for name in SCRUBBED {
            command.env_remove(name);
        }
        command
            .env("AZGATE_HOME", self.dir.join("home"))
            .env("AZGATE_AZ", &self.az)
            .env("AZURE_CORE_COLLECT_TELEMETRY", "false")
            .env("AZURE_CORE_NO_COLOR", "true")
            .env("AZURE_CORE_ONLY_SHOW_ERRORS", "true")
            // The user's own proxy: dead, so any non-Azure request az makes fails on loopback.
            .env("HTTPS_PROXY", "http://127.0.0.1:9")
            .env("NO_PROXY", "127.0.0.1,localhost")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let started = Instant::now();
        let output = tokio::time::timeout(Duration::from_secs(180), command.output())
            .await
            .context("azgate timed out")??;
        Ok(Output {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            elapsed: started.elapsed(),
        })
    }

    /// `azgate az <args> --output json` as `user`.
    async fn az(&self, topology: &Topology, user: &str, args: &[&str]) -> Result<Output> {
        let cert = self.dir.join(format!("{user}.crt"));
        let key = self.dir.join(format!("{user}.key"));
        let ca = self.dir.join("ca/ca.crt");
        let gateway = format!("localhost:{}", topology.gateway.mtls.port());
        let mut full = vec![
            "az",
            "--gateway",
            &gateway,
            "--cert",
            path(&cert),
            "--key",
            path(&key),
            "--ca",
            path(&ca),
        ];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--output", "json"]);
        self.azgate(&full).await
    }
}

impl Workstation {
    /// Starts `azgate proxy azure` for `user` and reads the variables it exports.
    async fn proxy_azure(
        &self,
        topology: &Topology,
        user: &str,
    ) -> Result<(Vec<(String, String)>, tokio::process::Child)> {
        use tokio::io::AsyncBufReadExt;
        let mut command = tokio::process::Command::new(&self.azgate);
        for name in SCRUBBED {
            command.env_remove(name);
        }
        command
            .args(["proxy", "azure", "--gateway"])
            .arg(format!("localhost:{}", topology.gateway.mtls.port()))
            .arg("--cert")
            .arg(self.dir.join(format!("{user}.crt")))
            .arg("--key")
            .arg(self.dir.join(format!("{user}.key")))
            .arg("--ca")
            .arg(self.dir.join("ca/ca.crt"))
            .env("AZGATE_HOME", self.dir.join("home"))
            .env("HTTPS_PROXY", "http://127.0.0.1:9")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut child = command.spawn()?;
        let stdout = child.stdout.take().context("proxy stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut exports = Vec::new();
        loop {
            let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .context("azgate proxy azure printed nothing")??
                .context("azgate proxy azure exited")?;
            if line.starts_with("unset ") {
                break;
            }
            if let Some((name, value)) =
                line.strip_prefix("export ").and_then(|l| l.split_once('='))
            {
                exports.push((name.to_owned(), value.trim_matches('\'').to_owned()));
            }
        }
        Ok((exports, child))
    }
}

impl Drop for Workstation {
    fn drop(&mut self) {
        if std::env::var_os("AZGATE_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn az_cli_through_azgate_az_and_each_gateway() -> Result<()> {
    let runtimes = Runtime::selected();
    ensure!(!runtimes.is_empty(), "AZGATE_RUNTIMES selects no runtime");
    for runtime in runtimes {
        run(runtime)
            .await
            .with_context(|| format!("runtime {}", runtime.name()))?;
    }
    Ok(())
}

async fn run(runtime: Runtime) -> Result<()> {
    let ws = Workstation::new(runtime)?;
    let ca = TestCa::new("azgate dev CA (test)")?;
    ca.authority().save(&ws.dir.join("ca"))?;
    // What `azgate ca init` lays out: ca.crt, ca.key and roles/ with the role files.
    std::fs::create_dir_all(ws.dir.join("ca/roles"))?;
    std::fs::write(ws.dir.join("ca/roles/roles.yaml"), CA_ROLES)?;
    let ca_dir = ws.dir.join("ca");
    let issue = |user: &'static str, roles: &'static str, extra: Vec<&'static str>| {
        let out = ws.dir.join(user);
        let ca_dir = ca_dir.clone();
        let ws = &ws;
        async move {
            let mut args = vec![
                "ca",
                "issue",
                "--dir",
                path(&ca_dir),
                "--user",
                user,
                "--roles",
                roles,
                "--out",
                path(&out),
            ];
            args.extend(extra);
            ws.azgate(&args).await
        }
    };

    // --- the dev CA: identity selection as tsh does it -------------------------------------
    // alice: one allowed identity, none asked for → that one; ECDSA P-256 by default.
    issue("alice", "azure-reader", vec![])
        .await?
        .ok("ca issue alice")?;
    // bob: two allowed, none asked for → an error listing both.
    let refused = issue("bob", "azure-admin", vec![]).await?;
    ensure!(
        refused.code != Some(0),
        "bob's certificate needed --azure-identity"
    );
    ensure!(
        refused.stderr.contains("multiple Azure identities")
            && refused.stderr.contains(ADMIN)
            && refused.stderr.contains(READER),
        "the error lists the choices: {}",
        refused.stderr
    );
    // ... by bare name, with an RSA key.
    issue(
        "bob",
        "azure-admin",
        vec!["--azure-identity", "admin", "--key-type", "rsa"],
    )
    .await?
    .ok("ca issue bob")?;
    issue("mallory", "contractor", vec![])
        .await?
        .ok("ca issue mallory")?;
    // dana holds only `access`: her identities come from her trait, as with
    // `tctl users update dana --set-azure-identities <reader>`; without it she has none.
    let none = issue("dana", "access", vec![]).await?;
    ensure!(
        none.code != Some(0),
        "access without the trait allows nothing"
    );
    issue("dana", "access", vec!["--trait", TRAIT_READER])
        .await?
        .ok("ca issue dana --trait")?;
    let listed = ws
        .azgate(&[
            "identities",
            "--cert",
            path(&ws.dir.join("bob.crt")),
            "--json",
        ])
        .await?
        .ok("identities")?
        .json()?;
    ensure!(listed["user"] == "bob" && listed["roles"] == serde_json::json!(["azure-admin"]));
    ensure!(listed["selected_identity"] == ADMIN, "{listed}");
    ensure!(
        listed["allowed_identities"] == serde_json::json!([ADMIN, READER]),
        "{listed}"
    );

    // --- the gateway, in front of the fake Resource Manager ---------------------------------
    let azure = FakeAzure::start_arm(&ca.server(AZURE_HOSTS)?).await?;
    let plugin_config = serde_json::json!({"roles": gateway_roles()}).to_string();
    let topology = Topology::start_with(
        runtime,
        Options {
            plugin_config,
            concurrency: 1,
            // azgate serve as deployed: tokens from its in-process token service.
            in_process_token_service: runtime != Runtime::Envoy,
            ..Options::default()
        },
        ca,
        azure.clone(),
    )
    .await?;

    // alice logs in explicitly, then lists VMs and groups, and asks for a token.
    let login = ws
        .az(
            &topology,
            "alice",
            &["login", "--identity", "--resource-id", READER],
        )
        .await?
        .ok("az login --identity")?;
    let subscriptions = login.json()?;
    ensure!(
        subscriptions[0]["id"] == ARM_SUBSCRIPTION_ID,
        "az login listed the fake's subscription: {subscriptions}"
    );
    ensure!(subscriptions[0]["user"]["assignedIdentityInfo"] == format!("MSIResource-{READER}"));
    let vm_list = ws
        .az(&topology, "alice", &["vm", "list"])
        .await?
        .ok("az vm list")?;
    let vms = vm_list.json()?;
    ensure!(vms[0]["name"] == "demo-vm", "{vms}");
    ensure!(
        vms[0]["tags"]["listed-for"] == READER,
        "ARM saw alice's identity's token: {vms}"
    );
    let group_list = ws
        .az(&topology, "alice", &["group", "list"])
        .await?
        .ok("az group list")?;
    ensure!(group_list.json()?[0]["name"] == "azgate-demo");
    let token = ws
        .az(&topology, "alice", &["account", "get-access-token"])
        .await?
        .ok("az account get-access-token")?
        .json()?;
    // The token az holds is the local proof of possession, signed by alice's key: never the
    // managed-identity token, which only the gateway ever sees.
    let access_token = token["accessToken"].as_str().context("accessToken")?;
    let alice = azgate_filter::identity::parse_app_certificate(&std::fs::read_to_string(
        ws.dir.join("alice.crt"),
    )?)
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let claims = azgate_filter::jwt::verify(access_token, &alice.public_key)
        .map_err(|e| anyhow::anyhow!("the local token does not verify: {e}"))?;
    ensure!(claims.resource == ARM_RESOURCE, "{}", claims.resource);
    ensure!(token["subscription"] == ARM_SUBSCRIPTION_ID, "{token}");

    // Key Vault with the defaults: the SDK's first request carries no token, on purpose; the
    // gateway answers it with Key Vault's challenge (after RBAC), and the SDK then asks for a
    // vault token and lists the secrets with it.
    let secrets = ws
        .az(
            &topology,
            "alice",
            &["keyvault", "secret", "list", "--vault-name", "demo-vault"],
        )
        .await?
        .ok("az keyvault secret list")?
        .json()?;
    ensure!(secrets[0]["name"] == "demo-secret", "{secrets}");
    ensure!(
        secrets[0]["tags"]["listed-for"] == READER,
        "Key Vault saw alice's identity's vault token: {secrets}"
    );
    // Storage with --auth-mode login: a storage token, swapped for the managed identity's.
    let blobs = ws
        .az(
            &topology,
            "alice",
            &[
                "storage",
                "blob",
                "list",
                "--account-name",
                "demoacct",
                "--container-name",
                "demo",
                "--auth-mode",
                "login",
            ],
        )
        .await?
        .ok("az storage blob list --auth-mode login")?
        .json()?;
    ensure!(blobs[0]["name"] == "listed-for-reader.txt", "{blobs}");

    // dana's identity is granted by the `{{internal.azure_identities}}` template, expanded by
    // the gateway from the traits in her certificate.
    let dana_vms = ws
        .az(&topology, "dana", &["vm", "list"])
        .await?
        .ok("dana: az vm list")?;
    ensure!(
        dana_vms.json()?[0]["tags"]["listed-for"] == READER,
        "ARM saw dana's trait-granted identity"
    );

    // `azgate proxy azure` prints the exports; the plain az in that environment works too, and
    // shares the login state `azgate az` left (same AZURE_CONFIG_DIR for the same identity).
    let (exports, proxy) = ws.proxy_azure(&topology, "alice").await?;
    for name in [
        "AZURE_CONFIG_DIR",
        "REQUESTS_CA_BUNDLE",
        "HTTPS_PROXY",
        "IDENTITY_ENDPOINT",
        "IDENTITY_HEADER",
        "MSI_ENDPOINT",
    ] {
        ensure!(
            exports.iter().any(|(k, _)| k == name),
            "{name} not exported: {exports:?}"
        );
    }
    let mut plain_az = tokio::process::Command::new(&ws.az);
    for name in SCRUBBED {
        plain_az.env_remove(name);
    }
    plain_az
        .args(["vm", "list", "--output", "json"])
        .env("AZURE_CORE_COLLECT_TELEMETRY", "false")
        .envs(exports.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null());
    let plain = tokio::time::timeout(Duration::from_secs(120), plain_az.output()).await??;
    ensure!(
        plain.status.success(),
        "az vm list with the exports: {}",
        String::from_utf8_lossy(&plain.stderr)
    );
    let plain_vms: serde_json::Value = serde_json::from_slice(&plain.stdout)?;
    ensure!(plain_vms[0]["tags"]["listed-for"] == READER, "{plain_vms}");
    drop(proxy);

    // bob (RSA key) has never logged in: azgate az logs in with his identity first.
    let bob_vms = ws
        .az(&topology, "bob", &["vm", "list"])
        .await?
        .ok("bob: az vm list")?;
    ensure!(
        bob_vms.json()?[0]["tags"]["listed-for"] == ADMIN,
        "bob's token is admin's"
    );

    // What reached "Azure": only managed-identity tokens, for the right identity, resource and
    // host; never a local JWT, the certificate, or the forwarding header.
    let all_seen = azure.seen();
    // The data planes saw only managed-identity tokens of their own audience: the token-less
    // first request of the Key Vault SDK never left the gateway.
    let planes = [
        ("demo-vault.vault.azure.net", "https://vault.azure.net"),
        (
            "demoacct.blob.core.windows.net",
            "https://storage.azure.com",
        ),
    ];
    for (host, audience) in planes {
        let requests: Vec<_> = all_seen
            .iter()
            .filter(|r| r.sni.as_deref() == Some(host))
            .collect();
        ensure!(!requests.is_empty(), "nothing reached {host}");
        for request in requests {
            let claims = msi_token_claims(request)
                .with_context(|| format!("{host} got no MSI token: {}", request.path))?;
            ensure!(
                claims["aud"].as_str().map(|a| a.trim_end_matches('/')) == Some(audience),
                "{host}: {claims}"
            );
            ensure!(request.header("x-forwarded-client-cert").is_none());
        }
    }
    let seen: Vec<_> = all_seen
        .into_iter()
        .filter(|r| {
            !planes
                .iter()
                .any(|(host, _)| r.sni.as_deref() == Some(*host))
        })
        .collect();
    ensure!(!seen.is_empty(), "nothing reached the fake ARM");
    for request in &seen {
        let claims = msi_token_claims(request)
            .with_context(|| format!("not an MSI token: {} {}", request.method, request.path))?;
        ensure!(claims["aud"] == ARM_RESOURCE, "{claims}");
        let mirid = claims["xms_mirid"].as_str().unwrap_or_default();
        ensure!(
            mirid.eq_ignore_ascii_case(READER) || mirid.eq_ignore_ascii_case(ADMIN),
            "{claims}"
        );
        ensure!(
            request.sni.as_deref() == Some("management.azure.com"),
            "{:?}",
            request.sni
        );
        ensure!(request.header("x-forwarded-host").is_none());
        ensure!(request.header("x-forwarded-client-cert").is_none());
    }
    let paths: Vec<String> = seen.iter().map(|s| s.path.to_ascii_lowercase()).collect();
    let count = |prefix: &str| paths.iter().filter(|p| p.starts_with(prefix)).count();
    ensure!(
        count("/subscriptions?") == 2,
        "alice's and bob's logins listed subscriptions: {paths:?}"
    );
    ensure!(
        count(&format!(
            "/subscriptions/{ARM_SUBSCRIPTION_ID}/providers/microsoft.compute/virtualmachines"
        )) == 4,
        "alice twice (azgate az, plain az), dana and bob once: {paths:?}"
    );
    ensure!(
        count(&format!(
            "/subscriptions/{ARM_SUBSCRIPTION_ID}/resourcegroups"
        )) == 1,
        "{paths:?}"
    );

    // mallory's role was revoked at the gateway: az shows azgate's code and message, and
    // nothing reaches ARM.
    let before = azure.seen().len();
    let denied = ws
        .az(
            &topology,
            "mallory",
            &["login", "--identity", "--resource-id", READER],
        )
        .await?;
    ensure!(
        denied.code != Some(0),
        "mallory's login must fail:\n{}",
        denied.stdout
    );
    let shown = format!("{}{}", denied.stdout, denied.stderr);
    ensure!(
        shown.contains("IdentityNotAllowed")
            && shown.contains("azgate: Azure identity \"reader\" is denied by role \"contractor\""),
        "az shows azgate's error:\n{shown}"
    );
    ensure!(azure.seen().len() == before, "a denied request reached ARM");
    eprintln!(
        "[{}] what a denied user sees:\n{}",
        runtime.name(),
        denied.stderr.trim()
    );
    let denied_vms = ws
        .az(
            &topology,
            "mallory",
            &["vm", "list", "--subscription", ARM_SUBSCRIPTION_ID],
        )
        .await?;
    ensure!(denied_vms.code != Some(0));
    ensure!(azure.seen().len() == before, "a denied request reached ARM");

    // Nothing secret in azgate's own output.
    for output in [&login, &vm_list, &group_list, &denied] {
        ensure!(
            !output.stderr.contains(access_token),
            "a token in azgate's log"
        );
        ensure!(!output.stderr.contains("PRIVATE KEY"));
    }
    eprintln!(
        "[{}] timings: az login {:.1}s, az vm list {:.1}s, az group list {:.1}s, denied login {:.1}s",
        runtime.name(),
        login.elapsed.as_secs_f64(),
        vm_list.elapsed.as_secs_f64(),
        group_list.elapsed.as_secs_f64(),
        denied.elapsed.as_secs_f64()
    );
    if !topology.gateway.log().is_empty() && std::env::var_os("AZGATE_KEEP_LOGS").is_some() {
        eprintln!("gateway log kept");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_ca_commands_from_init_to_issue() -> Result<()> {
    let ws = Workstation::new_plain("devca")?;
    let ca_dir = ws.dir.join("home/ca");
    // `ca init` with the default directory ($AZGATE_HOME/ca), then refuses to overwrite it.
    let init = ws.azgate(&["ca", "init"]).await?.ok("ca init")?;
    ensure!(
        init.stdout.contains("ca.crt") && ca_dir.join("ca.key").exists(),
        "{}",
        init.stdout
    );
    let again = ws.azgate(&["ca", "init"]).await?;
    ensure!(
        again.code != Some(0) && again.stderr.contains("already initialised"),
        "{}",
        again.stderr
    );
    std::fs::write(ca_dir.join("roles/roles.yaml"), CA_ROLES)?;

    // Role files come from the CA's roles/ by default; unknown roles and a TTL past the CA's
    // expiry are refused with the reason.
    let out = ws.dir.join("carol");
    let issued = ws
        .azgate(&[
            "ca",
            "issue",
            "--user",
            "carol",
            "--roles",
            "azure-admin",
            "--azure-identity",
            READER,
            "--ttl",
            "1h",
            "--out",
            path(&out),
        ])
        .await?
        .ok("ca issue carol")?;
    ensure!(issued.stdout.contains(READER), "{}", issued.stdout);
    // Refusals: an undefined role, a lifetime beyond the CA's, an identity no role allows.
    for (extra, expected) in [
        (&["--roles", "ghost"][..], "\"ghost\" is not defined"),
        (
            &["--roles", "azure-reader", "--ttl", "400d"][..],
            "CA's own expiry",
        ),
        (
            &["--roles", "azure-admin", "--azure-identity", "writer"][..],
            "failed to find",
        ),
    ] {
        let mut args = vec!["ca", "issue", "--user", "x"];
        args.extend_from_slice(extra);
        let refused = ws.azgate(&args).await?;
        ensure!(
            refused.code != Some(0) && refused.stderr.contains(expected),
            "{args:?}: {}",
            refused.stderr
        );
    }

    // The text listing marks the selected identity.
    let listed = ws
        .azgate(&["identities", "--cert", path(&ws.dir.join("carol.crt"))])
        .await?
        .ok("identities")?;
    ensure!(
        listed.stdout.contains("user:     carol"),
        "{}",
        listed.stdout
    );
    ensure!(
        listed.stdout.contains(&format!("* {READER}"))
            && listed.stdout.contains(&format!("  {ADMIN}")),
        "{}",
        listed.stdout
    );

    // The key is private to its owner; a server certificate for a dev gateway.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(ws.dir.join("carol.key"))?
        .permissions()
        .mode();
    ensure!(mode & 0o777 == 0o600, "key mode {mode:o}");
    let server = ws.dir.join("gateway");
    ws.azgate(&[
        "ca",
        "server",
        "--dns",
        "localhost",
        "--ip",
        "127.0.0.1",
        "--out",
        path(&server),
    ])
    .await?
    .ok("ca server")?;
    ensure!(std::fs::read_to_string(ws.dir.join("gateway.crt"))?.contains("BEGIN CERTIFICATE"));
    Ok(())
}
