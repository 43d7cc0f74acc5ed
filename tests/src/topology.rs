//! A loopback test topology: the IMDS emulator, a fake Azure endpoint over TLS, and a gateway
//! runtime (the real Envoy with the built `.wasm`; `azgate serve` once it exists) between a
//! test client and them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use azgate_emulator::Emulator;
use tokio::process::{Child, Command};

use crate::pki::{Issued, TestCa};
use crate::upstream::FakeAzure;

/// Host names the fake Azure endpoint has certificates for.
pub const AZURE_HOSTS: &[&str] = &[
    "management.azure.com",
    "*.vault.azure.net",
    "*.blob.core.windows.net",
    "graph.microsoft.com",
    "management.usgovcloudapi.net",
    "management.chinacloudapi.cn",
];

/// A host name that reaches the fake Azure endpoint but is not in its certificate, so both
/// gateways fail the upstream TLS connection (Envoy by `auto_san_validation`).
pub const NOT_IN_CERTIFICATE: &str = "not-in-certificate.management.azure.com";

/// Which gateway runs the filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// The real Envoy binary with the V8 runtime.
    Envoy,
    /// `azgate serve`: the filter in wasmtime.
    Serve,
    /// The real Envoy with the production configuration `azgate envoy-config` renders from the
    /// same `azgate.yaml` `azgate serve` runs (dynamic forward proxy, access log, limits), and
    /// `azgate token-service` for `token_service` clusters.
    EnvoyRendered,
}

impl Runtime {
    /// Runtimes selected by `AZGATE_RUNTIMES` (comma-separated; default: all that exist).
    pub fn selected() -> Vec<Runtime> {
        let wanted = std::env::var("AZGATE_RUNTIMES")
            .unwrap_or_else(|_| "envoy,serve,envoy-rendered".into());
        wanted
            .split(',')
            .filter_map(|name| match name.trim() {
                "envoy" => Some(Runtime::Envoy),
                "serve" => Some(Runtime::Serve),
                "envoy-rendered" => Some(Runtime::EnvoyRendered),
                _ => None,
            })
            .collect()
    }

    /// Short name used in test names.
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Envoy => "envoy",
            Runtime::Serve => "serve",
            Runtime::EnvoyRendered => "envoy-rendered",
        }
    }
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A built artifact: `$var`, or `default` under the repository root; an error naming the make
/// target (or command) that builds it when missing.
fn built_artifact(var: &str, default: &str, what: &str, build_with: &str) -> Result<PathBuf> {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(default));
    if !path.exists() {
        bail!(
            "{what} not found at {} (run `{build_with}`)",
            path.display()
        );
    }
    Ok(path)
}

/// The Envoy binary: `$AZGATE_ENVOY`, or the project-local install made by `make envoy`.
pub fn envoy_binary() -> Result<PathBuf> {
    built_artifact(
        "AZGATE_ENVOY",
        ".tools/envoy/envoy/_bin/envoy",
        "Envoy",
        "make envoy",
    )
}

/// The `azgate` binary: `$AZGATE_BIN`, or the debug build (`cargo build -p azgate`).
pub fn azgate_binary() -> Result<PathBuf> {
    built_artifact(
        "AZGATE_BIN",
        "target/debug/azgate",
        "azgate",
        "cargo build -p azgate",
    )
}

/// The filter: `$AZGATE_WASM`, or the release build made by `make wasm`.
pub fn filter_wasm() -> Result<PathBuf> {
    built_artifact(
        "AZGATE_WASM",
        "target/wasm32-wasip1/release/azgate_filter.wasm",
        "the filter",
        "make wasm",
    )
}

/// How to build a topology.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The plugin configuration JSON text (passed to the filter as-is).
    pub plugin_config: String,
    /// Gateway worker threads.
    pub concurrency: u32,
    /// Answer `azgate_msi` with the token module (which then asks the emulator) instead of the
    /// emulator itself: in-process for `azgate serve`, `azgate token-service` on loopback for
    /// the rendered Envoy configuration; the plain test Envoy ignores it.
    pub in_process_token_service: bool,
    /// The `.wasm` the gateway loads; `None`: the filter ([`filter_wasm`]).
    pub wasm: Option<PathBuf>,
    /// More plain-HTTP clusters the filter may call: (name, address).
    pub extra_clusters: Vec<(String, SocketAddr)>,
    /// The listeners' `request_timeout_ms` (Envoy's `request_timeout`); `None`: the default
    /// (60 s). The hostile corpus shortens it to see requests that never end answered 408.
    pub request_timeout_ms: Option<u64>,
    /// `filter.role_files` of `azgate.yaml` (serve and the rendered Envoy config; the plain
    /// test Envoy ignores them).
    pub role_files: Vec<PathBuf>,
    /// `filter.lock_files` of `azgate.yaml`, likewise.
    pub lock_files: Vec<PathBuf>,
    /// Also a plain-HTTP listener with `plaintext_behind_trusted_front` (serve and the rendered
    /// Envoy config; the plain test Envoy ignores it): the client sends XFCC as a TLS front
    /// would.
    pub plaintext_listener: bool,
    /// `filter.cache_dir` of `azgate.yaml` (compiled code kept across starts); `None`: none.
    pub cache_dir: Option<PathBuf>,
}

impl Options {
    /// The `.wasm` to load.
    fn wasm_path(&self) -> Result<PathBuf> {
        match &self.wasm {
            Some(path) => Ok(path.clone()),
            None => filter_wasm(),
        }
    }
}

/// A running topology. Dropping it stops the gateway and removes its files.
pub struct Topology {
    /// The CA that issued every certificate.
    pub ca: TestCa,
    /// The IMDS emulator behind the `azgate_msi` cluster.
    pub imds: Emulator,
    /// The fake Azure endpoint.
    pub azure: FakeAzure,
    /// The gateway.
    pub gateway: Gateway,
}

/// A running gateway process.
pub struct Gateway {
    /// Listener requiring client certificates.
    pub mtls: SocketAddr,
    /// Test-only listener: client certificate optional, expired ones accepted, so the filter's
    /// own checks can be exercised.
    pub lenient: SocketAddr,
    /// The admin endpoint: Envoy's admin interface, or serve's `/ready` and `/metrics`.
    pub admin: SocketAddr,
    /// The plain-HTTP trusted-front listener, when [`Options::plaintext_listener`] asked for it
    /// and the runtime has one.
    pub plain: Option<SocketAddr>,
    child: Child,
    /// `azgate token-service`, for the rendered Envoy configuration.
    token_service: Option<Child>,
    /// `azgate envoy-config --watch`, for the rendered Envoy configuration with policy files.
    policy_watcher: Option<Child>,
    dir: PathBuf,
    log: PathBuf,
}

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

impl Topology {
    /// Starts everything for `runtime`.
    pub async fn start(runtime: Runtime, options: Options) -> Result<Self> {
        let ca = TestCa::new("azgate test CA")?;
        let azure = FakeAzure::start(&ca.server(AZURE_HOSTS)?).await?;
        Self::start_with(runtime, options, ca, azure).await
    }

    /// Starts a gateway for `runtime` trusting `ca`, in front of `azure` (which should serve a
    /// certificate from `ca` for [`AZURE_HOSTS`]).
    pub async fn start_with(
        runtime: Runtime,
        options: Options,
        ca: TestCa,
        azure: FakeAzure,
    ) -> Result<Self> {
        let imds = Emulator::start("127.0.0.1:0".parse()?).await?;
        let gateway_cert = ca.server(&["localhost"])?;
        let gateway =
            Gateway::start(runtime, &ca, &gateway_cert, &imds, azure.addr(), &options).await?;
        Ok(Self {
            ca,
            imds,
            azure,
            gateway,
        })
    }

    /// A client presenting `cert` (or none), trusting the test CA.
    pub fn client(&self, cert: Option<&Issued>) -> Result<reqwest::Client> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca.cert_pem.as_bytes())?)
            .no_proxy()
            .timeout(Duration::from_secs(30));
        if let Some(cert) = cert {
            let pem = format!("{}{}", cert.cert_pem, cert.key_pem);
            builder = builder.identity(reqwest::Identity::from_pem(pem.as_bytes())?);
        }
        Ok(builder.build()?)
    }

    /// Token requests the IMDS emulator received for `resource`.
    pub fn imds_calls_for(&self, resource: &str) -> usize {
        self.imds
            .requests()
            .iter()
            .filter(|r| r.query_param("resource").as_deref() == Some(resource))
            .count()
    }

    /// What tsh would send for `caller`: `GET <path>` to Resource Manager through the gateway,
    /// with a proof-of-possession token for it signed by the caller's key. Returns the status
    /// and the `x-azgate-error` code (empty when there is none).
    pub async fn get_as(&self, caller: &Issued, path: &str) -> Result<(u16, String)> {
        let token = crate::jwt::sign(
            &caller.key,
            crate::jwt::alg_for(&caller.key),
            &serde_json::json!({"resource": "https://management.azure.com/"}),
        )?;
        let response = self
            .client(Some(caller))?
            .get(format!("{}{path}", self.gateway.url()))
            .header("x-forwarded-host", "management.azure.com")
            .header("authorization", format!("Bearer {token}"))
            .send()
            .await?;
        let code = response
            .headers()
            .get("x-azgate-error")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        Ok((response.status().as_u16(), code))
    }
}

impl Gateway {
    /// Starts the gateway in front of `upstream` (which serves a certificate from `ca` for
    /// [`AZURE_HOSTS`]); again (with new ports) if a port picked free was taken by another
    /// process before the gateway bound it, which loopback tests running in parallel can cause.
    pub async fn start(
        runtime: Runtime,
        ca: &TestCa,
        gateway_cert: &Issued,
        imds: &Emulator,
        upstream: SocketAddr,
        options: &Options,
    ) -> Result<Self> {
        let mut attempt = 1;
        loop {
            match Self::start_once(runtime, ca, gateway_cert, imds, upstream, options).await {
                Err(error)
                    if attempt < 3 && format!("{error:#}").contains("Address already in use") =>
                {
                    eprintln!("gateway start raced for a port (attempt {attempt}); starting again");
                    attempt += 1;
                }
                outcome => return outcome,
            }
        }
    }

    async fn start_once(
        runtime: Runtime,
        ca: &TestCa,
        gateway_cert: &Issued,
        imds: &Emulator,
        upstream: SocketAddr,
        options: &Options,
    ) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "azgate-{}-{}-{}",
            runtime.name(),
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        tokio::fs::create_dir_all(&dir).await?;
        for (name, contents) in [
            ("ca.crt", &ca.cert_pem),
            ("gateway.crt", &gateway_cert.cert_pem),
            ("gateway.key", &gateway_cert.key_pem),
        ] {
            tokio::fs::write(dir.join(name), contents).await?;
        }
        let mtls = free_port()?;
        let lenient = free_port()?;
        let admin = free_port()?;
        let plain = match (runtime, options.plaintext_listener) {
            (Runtime::Serve | Runtime::EnvoyRendered, true) => Some(free_port()?),
            _ => None,
        };
        let ports = Ports {
            mtls,
            lenient,
            admin,
            plain,
        };
        let mut token_service = None;
        let mut policy_watcher = None;
        let mut command = match runtime {
            Runtime::Envoy => envoy_command(&dir, &ports, imds, upstream, options).await?,
            Runtime::Serve => serve_command(&dir, &ports, imds, upstream, options).await?,
            Runtime::EnvoyRendered => {
                let token_service_address = if options.in_process_token_service {
                    let (child, address) = start_token_service(&dir, imds).await?;
                    token_service = Some(child);
                    address
                } else {
                    // Not used: every cluster has an address.
                    free_port()?.to_string()
                };
                let command = rendered_envoy_command(
                    &dir,
                    &ports,
                    imds,
                    upstream,
                    options,
                    &token_service_address,
                )
                .await?;
                if !options.role_files.is_empty() || !options.lock_files.is_empty() {
                    policy_watcher = Some(start_policy_watcher(&dir, &token_service_address)?);
                }
                command
            }
        };
        let log = dir.join("gateway.log");
        let log_file = std::fs::File::create(&log)?;
        let stdout_file = std::fs::File::create(dir.join("gateway.stdout"))?;
        let child = command
            .stdout(stdout_file)
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", runtime.name()))?;
        let mut gateway = Self {
            mtls,
            lenient,
            admin,
            plain,
            child,
            token_service,
            policy_watcher,
            dir,
            log,
        };
        gateway.wait_ready(admin).await?;
        Ok(gateway)
    }
}

/// The ports a gateway listens on.
struct Ports {
    mtls: SocketAddr,
    lenient: SocketAddr,
    admin: SocketAddr,
    plain: Option<SocketAddr>,
}

/// Envoy with `envoy/test-topology.yaml`.
async fn envoy_command(
    dir: &Path,
    ports: &Ports,
    imds: &Emulator,
    upstream: SocketAddr,
    options: &Options,
) -> Result<Command> {
    let (mtls, lenient, admin) = (ports.mtls, ports.lenient, ports.admin);
    let template = std::fs::read_to_string(repo_root().join("envoy/test-topology.yaml"))
        .context("envoy/test-topology.yaml")?;
    let plugin_config = &options.plugin_config;
    let config = template
        .replace("${MTLS_PORT}", &mtls.port().to_string())
        .replace("${LENIENT_PORT}", &lenient.port().to_string())
        .replace("${ADMIN_PORT}", &admin.port().to_string())
        .replace("${IMDS_PORT}", &imds.local_addr().port().to_string())
        .replace("${UPSTREAM_PORT}", &upstream.port().to_string())
        .replace("${CERT_DIR}", &dir.display().to_string())
        .replace("${WASM_PATH}", &options.wasm_path()?.display().to_string())
        .replace("${PLUGIN_CONFIG}", &serde_json::to_string(plugin_config)?)
        .replace(
            "${REQUEST_TIMEOUT}",
            // A protobuf Duration: seconds, with a fraction.
            &{
                let ms = options.request_timeout_ms.unwrap_or(60_000);
                format!("{}.{:03}s", ms / 1000, ms % 1000)
            },
        );
    let extra: String = options
        .extra_clusters
        .iter()
        .map(|(name, addr)| {
            format!(
                "  - name: {name}\n    type: STATIC\n    connect_timeout: 1s\n    \
                 load_assignment:\n      cluster_name: {name}\n      endpoints:\n      \
                 - lb_endpoints:\n        - endpoint: {{address: {{socket_address: \
                 {{address: {}, port_value: {}}}}}}}\n",
                addr.ip(),
                addr.port()
            )
        })
        .collect();
    let config = config.replacen("\n  clusters:\n", &format!("\n  clusters:\n{extra}"), 1);
    let config_path = dir.join("envoy.yaml");
    tokio::fs::write(&config_path, config).await?;
    let mut command = Command::new(envoy_binary()?);
    command
        .arg("-c")
        .arg(&config_path)
        .args(["--disable-hot-restart", "--log-level", "info"])
        .arg("--concurrency")
        .arg(options.concurrency.to_string());
    Ok(command)
}

/// `azgate serve` with the same topology written as `azgate.yaml`.
async fn serve_command(
    dir: &Path,
    ports: &Ports,
    imds: &Emulator,
    upstream: SocketAddr,
    options: &Options,
) -> Result<Command> {
    let config_path = write_azgate_yaml(dir, ports, imds, upstream, options).await?;
    let mut command = Command::new(azgate_binary()?);
    command
        .arg("serve")
        .arg("--config")
        .arg(&config_path)
        .env("AZGATE_LOG", "info");
    Ok(command)
}

/// Envoy with the configuration `azgate envoy-config` renders from the topology's `azgate.yaml`.
async fn rendered_envoy_command(
    dir: &Path,
    ports: &Ports,
    imds: &Emulator,
    upstream: SocketAddr,
    options: &Options,
    token_service_address: &str,
) -> Result<Command> {
    let config_path = write_azgate_yaml(dir, ports, imds, upstream, options).await?;
    let envoy_config = render_envoy_config(&config_path, token_service_address).await?;
    let mut command = Command::new(envoy_binary()?);
    command
        .arg("-c")
        .arg(&envoy_config)
        .args(["--disable-hot-restart", "--log-level", "info"])
        // Access-log lines reach stdout within 100 ms (Envoy's default flush interval is 10 s).
        .args(["--file-flush-interval-msec", "100"])
        .arg("--concurrency")
        .arg(options.concurrency.to_string());
    Ok(command)
}

/// Runs `azgate envoy-config` on `azgate_yaml`, writing `envoy.yaml` beside it.
pub async fn render_envoy_config(
    azgate_yaml: &Path,
    token_service_address: &str,
) -> Result<PathBuf> {
    let (mut command, output) = envoy_config_command(azgate_yaml, token_service_address)?;
    let result = command.output().await?;
    if !result.status.success() {
        bail!(
            "azgate envoy-config failed: {}",
            String::from_utf8_lossy(&result.stderr)
        );
    }
    Ok(output)
}

/// `azgate envoy-config` rendering `azgate_yaml` to `envoy.yaml` beside it (the path returned).
fn envoy_config_command(
    azgate_yaml: &Path,
    token_service_address: &str,
) -> Result<(Command, PathBuf)> {
    let output = azgate_yaml.with_file_name("envoy.yaml");
    let mut command = Command::new(azgate_binary()?);
    command
        .arg("envoy-config")
        .arg("--config")
        .arg(azgate_yaml)
        .arg("--output")
        .arg(&output)
        .arg("--token-service-address")
        .arg(token_service_address);
    Ok((command, output))
}

/// `azgate envoy-config --watch` on the topology's `azgate.yaml`: re-renders the filter's ECDS
/// resource beside `envoy.yaml` when the policy files change.
fn start_policy_watcher(dir: &Path, token_service_address: &str) -> Result<Child> {
    let log = std::fs::File::create(dir.join("policy-watcher.log"))?;
    let (mut command, _) = envoy_config_command(&dir.join("azgate.yaml"), token_service_address)?;
    Ok(command
        .arg("--watch")
        .env("AZGATE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?)
}

/// `azgate token-service` on a unix socket in `dir` (as the production units may run it),
/// getting tokens from `imds`; returns the child and the `unix:` address.
async fn start_token_service(dir: &Path, imds: &Emulator) -> Result<(Child, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let socket = dir.join("token.sock");
    let address = format!("unix:{}", socket.display());
    let log = std::fs::File::create(dir.join("token-service.log"))?;
    let child = Command::new(azgate_binary()?)
        .arg("token-service")
        .arg("--listen")
        .arg(&address)
        .args(["--source", "imds", "--imds-endpoint"])
        .arg(format!("http://{}", imds.local_addr()))
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting azgate token-service")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(mut stream) = tokio::net::UnixStream::connect(&socket).await {
            let request = b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n";
            let mut answer = Vec::new();
            if stream.write_all(request).await.is_ok()
                && stream.read_to_end(&mut answer).await.is_ok()
                && answer.starts_with(b"HTTP/1.1 200")
            {
                return Ok((child, address));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("azgate token-service not ready on {address}")
}

/// The topology as `azgate.yaml` (what `azgate serve` runs and `azgate envoy-config` renders).
async fn write_azgate_yaml(
    dir: &Path,
    ports: &Ports,
    imds: &Emulator,
    upstream: SocketAddr,
    options: &Options,
) -> Result<PathBuf> {
    let resolve: serde_json::Map<String, serde_json::Value> = [
        "management.azure.com",
        "myvault.vault.azure.net",
        // The workstation test's data planes.
        "demo-vault.vault.azure.net",
        "demoacct.blob.core.windows.net",
        "graph.microsoft.com",
        "management.usgovcloudapi.net",
        "management.chinacloudapi.cn",
        // Not in the fake's certificate: the upstream TLS check fails (as in Envoy).
        NOT_IN_CERTIFICATE,
    ]
    .iter()
    .map(|host| (host.to_string(), upstream.to_string().into()))
    .collect();
    // The plugin configuration goes in as YAML data; text that is not JSON is passed as a
    // string, which the filter refuses just as Envoy's copy would.
    let plugin: serde_json::Value = serde_json::from_str(&options.plugin_config)
        .unwrap_or_else(|_| serde_json::Value::String(options.plugin_config.clone()));
    let tls = |lenient: bool| {
        let mut tls = serde_json::json!({
            "cert": dir.join("gateway.crt"),
            "key": dir.join("gateway.key"),
            "client_ca": [dir.join("ca.crt")],
        });
        if lenient {
            tls["client_certificate"] = "optional".into();
            tls["accept_expired_client_certificates"] = true.into();
        }
        tls
    };
    let mut clusters = serde_json::Map::new();
    clusters.insert(
        "azgate_msi".into(),
        if options.in_process_token_service {
            serde_json::json!({"token_service": true})
        } else {
            serde_json::json!({"address": imds.local_addr().to_string()})
        },
    );
    for (name, addr) in &options.extra_clusters {
        clusters.insert(
            name.clone(),
            serde_json::json!({"address": addr.to_string()}),
        );
    }
    let mut listeners = serde_json::json!([
        {"name": "azgate_mtls", "address": ports.mtls.to_string(), "tls": tls(false)},
        {"name": "azgate_lenient", "address": ports.lenient.to_string(), "tls": tls(true)},
    ]);
    if let (Some(plain), Some(listeners)) = (ports.plain, listeners.as_array_mut()) {
        listeners.push(serde_json::json!({
            "name": "azgate_plain",
            "address": plain.to_string(),
            "plaintext_behind_trusted_front": true,
        }));
    }
    if let (Some(timeout), Some(listeners)) = (options.request_timeout_ms, listeners.as_array_mut())
    {
        for listener in listeners {
            listener["request_timeout_ms"] = timeout.into();
        }
    }
    let config = serde_json::json!({
        "workers": options.concurrency,
        "listeners": listeners,
        "admin": {"address": ports.admin.to_string()},
        "filter": {
            "path": options.wasm_path()?,
            "config": plugin,
            "role_files": options.role_files,
            "lock_files": options.lock_files,
            "cache_dir": options.cache_dir,
        },
        "clusters": clusters,
        "token_source": {"source": "imds", "imds_endpoint": format!("http://{}", imds.local_addr())},
        "upstream": {"extra_ca": [dir.join("ca.crt")], "resolve": resolve},
    });
    // JSON is YAML.
    let config_path = dir.join("azgate.yaml");
    tokio::fs::write(&config_path, serde_json::to_string_pretty(&config)?).await?;
    Ok(config_path)
}

impl Gateway {
    /// Waits until the admin endpoint says LIVE, or fails with the gateway's log.
    async fn wait_ready(&mut self, admin: SocketAddr) -> Result<()> {
        let client = reqwest::Client::builder().no_proxy().build()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "gateway exited ({status}) during start:\n{}",
                    self.log_tail()
                );
            }
            if let Ok(resp) = client.get(format!("http://{admin}/ready")).send().await
                && resp.status().is_success()
            {
                return Ok(());
            }
            // Often enough that a start's duration can be read off it (the bench's cold start).
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        bail!("gateway not ready after 60 s:\n{}", self.log_tail())
    }

    /// The operating-system processes that do the gateway's work: the gateway, and the token
    /// service when it is a separate process.
    pub fn pids(&self) -> Vec<u32> {
        [Some(&self.child), self.token_service.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(Child::id)
            .collect()
    }

    /// The gateway's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What the gateway wrote to standard output so far (Envoy's access log in the rendered
    /// configuration).
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join("gateway.stdout")).unwrap_or_default()
    }

    /// The directory holding the gateway's files (`azgate.yaml`, `envoy.yaml`, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// `https://localhost:<port>` of the mTLS listener.
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.mtls.port())
    }

    /// `https://localhost:<port>` of the lenient listener.
    pub fn lenient_url(&self) -> String {
        format!("https://localhost:{}", self.lenient.port())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        for helper in [&mut self.token_service, &mut self.policy_watcher]
            .into_iter()
            .flatten()
        {
            let _ = helper.start_kill();
        }
        if std::env::var_os("AZGATE_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A free loopback port (bound and released; good enough for tests on one machine).
pub fn free_port() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// Starts a gateway with `plugin_config` expecting it to refuse to start; returns the error,
/// which includes the gateway's log.
pub async fn start_expecting_failure(runtime: Runtime, plugin_config: &str) -> Result<String> {
    let ca = TestCa::new("azgate test CA")?;
    let imds = Emulator::start("127.0.0.1:0".parse()?).await?;
    let azure = FakeAzure::start(&ca.server(AZURE_HOSTS)?).await?;
    let options = Options {
        plugin_config: plugin_config.to_string(),
        concurrency: 1,
        ..Options::default()
    };
    match Gateway::start(
        runtime,
        &ca,
        &ca.server(&["localhost"])?,
        &imds,
        azure.addr(),
        &options,
    )
    .await
    {
        Ok(gateway) => bail!(
            "gateway started with a bad configuration:\n{}",
            gateway.log_tail()
        ),
        Err(err) => Ok(format!("{err:#}")),
    }
}
