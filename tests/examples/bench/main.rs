//! `make bench`: what a request costs in each gateway, from interleaved rounds.
//!
//! Seven configurations behind the same load and the same upstream, each once with mTLS and
//! once in plain HTTP behind a trusted front (the client then sends XFCC as the front would):
//!
//! | key | configuration |
//! |---|---|
//! | `direct` | (a) the upstream directly: what the load generator and upstream cost alone |
//! | `hyper` | (b) a bare hyper mTLS pass-through proxy with a fixed token: the ceiling |
//! | `serve-nofilter` | (c) `azgate serve` with a no-op proxy-wasm module (`bench/noop.wat`) |
//! | `serve` | (d) `azgate serve` with the filter |
//! | `envoy-router` | (e) Envoy, router only |
//! | `envoy-filter` | (f) Envoy with the filter (V8), the config `azgate envoy-config` renders |
//! | `envoy-jwt` | (g) Envoy with native `jwt_authn` and a fixed token injected |
//!
//! Every gateway runs at once (idle ones cost nothing) with one worker, pinned with its token
//! service to one core; the load generator (this process, one thread), the upstream and the
//! IMDS emulator share the other. A round runs every configuration once, the two members of
//! each ratio side by side ([`measuring_order`]), each round rotated by one, so slow drift of
//! the shared host lands on all configurations alike; ratios are taken within a round, then
//! the median over rounds.
//!
//! `bench [--rounds 30] [--seconds 1.25] [--warmup 0.25] [--connections 16] [--max-steal 0.02]
//!  [--only serve,envoy-filter] [--out bench] [--no-docs] [--no-extras]`; the Makefile builds the `.wasm`, Envoy and a `host`-profile
//! `azgate` and sets `AZGATE_BIN`.

mod extras;
mod load;
mod procfs;
mod report;
mod roles;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use azgate_emulator::Emulator;
use azgate_tests::pki::{AppCertSpec, Issued, KeyKind, TestCa};
use azgate_tests::topology::{self, Gateway, Options, Runtime};

use crate::load::{Endpoint, Load, RequestShape};
use crate::report::Run;

const READER: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/bench/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader";

/// The configurations, in report order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Config {
    Direct,
    BareHyper,
    ServeNoFilter,
    Serve,
    EnvoyRouter,
    EnvoyFilter,
    EnvoyJwt,
}

impl Config {
    pub(crate) const ALL: [Config; 7] = [
        Config::Direct,
        Config::BareHyper,
        Config::ServeNoFilter,
        Config::Serve,
        Config::EnvoyRouter,
        Config::EnvoyFilter,
        Config::EnvoyJwt,
    ];

    pub(crate) fn key(self) -> &'static str {
        match self {
            Config::Direct => "direct",
            Config::BareHyper => "hyper",
            Config::ServeNoFilter => "serve-nofilter",
            Config::Serve => "serve",
            Config::EnvoyRouter => "envoy-router",
            Config::EnvoyFilter => "envoy-filter",
            Config::EnvoyJwt => "envoy-jwt",
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            Config::Direct => "(a) upstream direct",
            Config::BareHyper => "(b) bare hyper proxy",
            Config::ServeNoFilter => "(c) serve, no-op module",
            Config::Serve => "(d) serve + filter",
            Config::EnvoyRouter => "(e) Envoy router only",
            Config::EnvoyFilter => "(f) Envoy + filter (V8)",
            Config::EnvoyJwt => "(g) Envoy jwt_authn",
        }
    }
}

/// How the client reaches the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Mode {
    /// TLS with the user's certificate (the gateway verifies it).
    Mtls,
    /// Plain HTTP with XFCC, as behind a TLS front the gateway trusts.
    Plain,
}

impl Mode {
    pub(crate) const ALL: [Mode; 2] = [Mode::Mtls, Mode::Plain];

    pub(crate) fn key(self) -> &'static str {
        match self {
            Mode::Mtls => "mtls",
            Mode::Plain => "plain",
        }
    }
}

#[derive(Clone)]
pub(crate) struct Args {
    pub(crate) rounds: usize,
    pub(crate) seconds: f64,
    pub(crate) warmup: f64,
    pub(crate) connections: usize,
    pub(crate) only: Option<Vec<Config>>,
    pub(crate) out: PathBuf,
    pub(crate) docs: bool,
    pub(crate) extras: bool,
    /// Steal time (a fraction of one core) above which a window is measured again.
    pub(crate) max_steal: f64,
    pub(crate) command_line: String,
}

fn parse_args(argv: &[String]) -> Result<Args> {
    let mut args = Args {
        rounds: 30,
        seconds: 1.25,
        warmup: 0.25,
        connections: 16,
        only: None,
        out: topology::repo_root().join("bench"),
        docs: true,
        extras: true,
        max_steal: 0.02,
        command_line: format!("bench {}", argv.join(" ")).trim().to_string(),
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--no-docs" => args.docs = false,
            "--no-extras" => args.extras = false,
            _ => {
                let value = it.next().with_context(|| format!("{flag} needs a value"))?;
                match flag.as_str() {
                    "--rounds" => args.rounds = value.parse()?,
                    "--seconds" => args.seconds = value.parse()?,
                    "--warmup" => args.warmup = value.parse()?,
                    "--connections" => args.connections = value.parse()?,
                    "--max-steal" => args.max_steal = value.parse()?,
                    "--out" => args.out = value.into(),
                    "--only" => {
                        let wanted = value
                            .split(',')
                            .map(|key| {
                                Config::ALL
                                    .into_iter()
                                    .find(|c| c.key() == key.trim())
                                    .with_context(|| format!("unknown configuration {key}"))
                            })
                            .collect::<Result<Vec<_>>>()?;
                        args.only = Some(wanted);
                    }
                    other => bail!("unknown flag {other}"),
                }
            }
        }
    }
    if args.rounds == 0 || args.connections == 0 {
        bail!("--rounds and --connections must be at least 1");
    }
    Ok(args)
}

/// The core the gateways (and their token services) run on; the load, the upstream and the
/// emulator run on [`LOAD_CPU`]. On a machine with one core both are 0.
fn gateway_cpu() -> &'static str {
    static CPU: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    CPU.get_or_init(|| if procfs::online_cpus() >= 2 { "1" } else { "0" })
}
const LOAD_CPU: &str = "0";

/// Windows per measurement at most (see [`Bench::measure`]).
const ATTEMPTS: usize = 4;

fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, role, rest @ ..] = argv.as_slice()
        && flag == "--role"
    {
        return roles::run(role, rest);
    }
    let args = parse_args(&argv)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    tokio::task::LocalSet::new().block_on(&runtime, until_interrupted(conduct(args)))
}

/// Runs `work` unless SIGINT or SIGTERM comes first; then `work` is dropped, and with it every
/// child process (they are killed on drop), so an interrupted bench leaves no gateway behind.
async fn until_interrupted(work: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        done = work => done,
        _ = interrupt.recv() => bail!("interrupted"),
        _ = terminate.recv() => bail!("terminated"),
    }
}

/// Everything the rounds need, started once.
pub(crate) struct Bench {
    pub(crate) dir: PathBuf,
    pub(crate) ca: TestCa,
    pub(crate) user: Issued,
    pub(crate) gateway_cert: Issued,
    pub(crate) imds: Emulator,
    pub(crate) upstream: roles::RoleChild,
    pub(crate) plugin_config: String,
}

/// A configuration, listening.
struct Running {
    config: Config,
    mtls: SocketAddr,
    plain: SocketAddr,
    /// The processes whose CPU time is the configuration's (empty for `direct`).
    pids: Vec<u32>,
    _keep: Keep,
}

/// What keeps a configuration's processes alive (they stop on drop).
enum Keep {
    Nothing,
    Role(#[expect(dead_code, reason = "held for its Drop")] roles::RoleChild),
    Gateway(#[expect(dead_code, reason = "held for its Drop")] Box<Gateway>),
    Envoy(#[expect(dead_code, reason = "held for its Drop")] tokio::process::Child),
}

async fn conduct(args: Args) -> Result<()> {
    let bench = Bench::prepare().await?;
    procfs::pin(std::process::id(), LOAD_CPU)?;
    procfs::pin(bench.upstream.pid()?, LOAD_CPU)?;
    let configs: Vec<Config> = args.only.clone().unwrap_or_else(|| Config::ALL.to_vec());
    let mut running = Vec::new();
    for config in &configs {
        let started = Instant::now();
        let target = bench.start(*config).await?;
        for pid in &target.pids {
            procfs::pin(*pid, gateway_cpu())?;
        }
        eprintln!(
            "started {:<16} in {:>6.0} ms (pids {:?})",
            config.key(),
            started.elapsed().as_secs_f64() * 1000.0,
            target.pids
        );
        running.push(target);
    }
    println!(
        "{} rounds x {} configurations, {} s measured after {} s warm-up each, {} connections; \
         gateways on CPU {}, load + upstream on CPU {LOAD_CPU}",
        args.rounds,
        running.len() * Mode::ALL.len(),
        args.seconds,
        args.warmup,
        args.connections,
        gateway_cpu(),
    );
    let cases = measuring_order(&running);
    // Untimed first pass: tokens fetched and cached, code warm, every path proven to answer 200.
    let quick = Args {
        seconds: 0.5,
        warmup: 0.5,
        ..args.clone()
    };
    for &(i, mode) in &cases {
        bench.measure(&running[i], mode, 0, &quick).await?;
    }
    let mut runs = Vec::new();
    for round in 0..args.rounds {
        for step in 0..cases.len() {
            let (i, mode) = cases[(step + round) % cases.len()];
            let run = bench.measure(&running[i], mode, round + 1, &args).await?;
            println!("{}", run.line());
            runs.push(run);
        }
    }
    let extras = if args.extras {
        Some(extras::measure(&bench, &args).await?)
    } else {
        None
    };
    let report = report::Report::new(&args, runs, extras);
    report.print();
    report.write(&args)?;
    drop(running);
    Ok(())
}

impl Bench {
    async fn prepare() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("azgate-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let ca = TestCa::new("azgate bench CA")?;
        let gateway_cert = ca.server(&["localhost"])?;
        let upstream_cert = ca.server(topology::AZURE_HOSTS)?;
        for (name, contents) in [
            ("ca.crt", &ca.cert_pem),
            ("gateway.crt", &gateway_cert.cert_pem),
            ("gateway.key", &gateway_cert.key_pem),
            ("upstream.crt", &upstream_cert.cert_pem),
            ("upstream.key", &upstream_cert.key_pem),
        ] {
            std::fs::write(dir.join(name), contents)?;
        }
        let user = ca.app(
            &AppCertSpec {
                user: Some("bench".into()),
                roles: vec!["azure-reader".into()],
                selected_identity: Some(READER.into()),
                allowed_identities: vec![READER.into()],
                not_before_offset_s: -60,
                not_after_offset_s: 24 * 3600,
                ..Default::default()
            },
            KeyKind::P256,
        )?;
        let upstream = roles::spawn("upstream", &dir, None).await?;
        let imds = Emulator::start("127.0.0.1:0".parse()?).await?;
        let plugin_config = serde_json::json!({
            "roles": [{"kind": "role", "version": "v7", "metadata": {"name": "azure-reader"},
                       "spec": {"allow": {"azure_identities": [READER]}}}]
        })
        .to_string();
        Ok(Self {
            dir,
            ca,
            user,
            gateway_cert,
            imds,
            upstream,
            plugin_config,
        })
    }

    /// Options for an `azgate` gateway (serve or the rendered Envoy config) loading `wasm`.
    pub(crate) fn gateway_options(&self, wasm: Option<PathBuf>) -> Options {
        Options {
            plugin_config: self.plugin_config.clone(),
            concurrency: 1,
            in_process_token_service: true,
            wasm,
            plaintext_listener: true,
            ..Options::default()
        }
    }

    /// A `runtime` gateway with `options` in front of the bench upstream.
    pub(crate) async fn start_gateway(
        &self,
        runtime: Runtime,
        options: &Options,
    ) -> Result<Gateway> {
        Gateway::start(
            runtime,
            &self.ca,
            &self.gateway_cert,
            &self.imds,
            self.upstream.first,
            options,
        )
        .await
    }

    async fn start(&self, config: Config) -> Result<Running> {
        let upstream_tls = self.upstream.first;
        let gateway = |runtime, wasm| async move {
            let gateway = self
                .start_gateway(runtime, &self.gateway_options(wasm))
                .await?;
            let plain = gateway.plain.context("the gateway has no plain listener")?;
            Ok::<_, anyhow::Error>(Running {
                config,
                mtls: gateway.mtls,
                plain,
                pids: gateway.pids(),
                _keep: Keep::Gateway(Box::new(gateway)),
            })
        };
        match config {
            Config::Direct => Ok(Running {
                config,
                mtls: self.upstream.first,
                plain: self.upstream.second,
                pids: Vec::new(),
                _keep: Keep::Nothing,
            }),
            Config::BareHyper => {
                let proxy = roles::spawn("bare-proxy", &self.dir, Some(upstream_tls)).await?;
                Ok(Running {
                    config,
                    mtls: proxy.first,
                    plain: proxy.second,
                    pids: vec![proxy.pid()?],
                    _keep: Keep::Role(proxy),
                })
            }
            Config::ServeNoFilter => gateway(Runtime::Serve, Some(self.noop_wasm()?)).await,
            Config::Serve => gateway(Runtime::Serve, None).await,
            Config::EnvoyFilter => gateway(Runtime::EnvoyRendered, None).await,
            Config::EnvoyRouter => self.native_envoy(config, false).await,
            Config::EnvoyJwt => self.native_envoy(config, true).await,
        }
    }

    /// `bench/noop.wat`, assembled to `.wasm` in the bench directory.
    pub(crate) fn noop_wasm(&self) -> Result<PathBuf> {
        let source = topology::repo_root().join("bench/noop.wat");
        let binary = wat::parse_file(&source).with_context(|| format!("{}", source.display()))?;
        let path = self.dir.join("noop.wasm");
        std::fs::write(&path, binary)?;
        Ok(path)
    }

    /// Envoy from `bench/envoy-native.yaml`: router only, or with `jwt_authn` and a fixed token.
    async fn native_envoy(&self, config: Config, jwt: bool) -> Result<Running> {
        let template =
            std::fs::read_to_string(topology::repo_root().join("bench/envoy-native.yaml"))?;
        let (mtls, plain, admin) = (
            topology::free_port()?,
            topology::free_port()?,
            topology::free_port()?,
        );
        let (filters, route_headers) = if jwt {
            (
                format!(
                    "          - name: envoy.filters.http.jwt_authn\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication\n              providers:\n                teleport_app_key:\n                  local_jwks: {{inline_string: '{}'}}\n                  forward: false\n                  from_headers: [{{name: authorization, value_prefix: \"Bearer \"}}]\n              rules:\n              - match: {{prefix: \"/\"}}\n                requires: {{provider_name: teleport_app_key}}\n",
                    jwks(&self.user)?
                ),
                format!(
                    "                request_headers_to_add: [{{header: {{key: authorization, value: \"{}\"}}, append_action: OVERWRITE_IF_EXISTS_OR_ADD}}]\n                request_headers_to_remove: [x-forwarded-host, x-forwarded-client-cert]\n",
                    roles::FIXED_TOKEN
                ),
            )
        } else {
            (String::new(), String::new())
        };
        let rendered = template
            .replace("${EXTRA_HTTP_FILTERS}\n", &filters)
            .replace("${ROUTE_HEADERS}\n", &route_headers)
            .replace("${MTLS_PORT}", &mtls.port().to_string())
            .replace("${PLAIN_PORT}", &plain.port().to_string())
            .replace("${ADMIN_PORT}", &admin.port().to_string())
            .replace("${UPSTREAM_PORT}", &self.upstream.first.port().to_string())
            .replace("${CERT_DIR}", &self.dir.display().to_string());
        let path = self.dir.join(format!("{}.yaml", config.key()));
        std::fs::write(&path, rendered)?;
        let log = std::fs::File::create(self.dir.join(format!("{}.log", config.key())))?;
        let mut child = tokio::process::Command::new(topology::envoy_binary()?)
            .arg("-c")
            .arg(&path)
            .args([
                "--disable-hot-restart",
                "--log-level",
                "warn",
                "--concurrency",
                "1",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        wait_ready(
            &mut child,
            admin,
            &self.dir.join(format!("{}.log", config.key())),
        )
        .await?;
        Ok(Running {
            config,
            mtls,
            plain,
            pids: vec![child.id().context("envoy exited")?],
            _keep: Keep::Envoy(child),
        })
    }

    /// The load's request: what `azgate proxy azure` sends for `az` (the user's JWT; the
    /// endpoint in `Host` and `X-Forwarded-Host`), plus XFCC in plain mode as a front would.
    pub(crate) fn request(&self, mode: Mode) -> Result<RequestShape> {
        let token = azgate_tests::jwt::sign(
            &self.user.key,
            azgate_tests::jwt::alg_for(&self.user.key),
            &serde_json::json!({"resource": "https://management.azure.com/", "tid": "t"}),
        )?;
        let mut headers = vec![
            ("host", "management.azure.com".to_string()),
            ("x-forwarded-host", "management.azure.com".to_string()),
            ("authorization", format!("Bearer {token}")),
        ];
        if mode == Mode::Plain {
            headers.push(("x-forwarded-client-cert", xfcc(&self.user)?));
        }
        Ok(RequestShape {
            path: "/subscriptions?api-version=2022-12-01".into(),
            headers,
        })
    }

    /// The client side of `mode` towards `addr` (server name `localhost`, or the upstream's).
    pub(crate) fn endpoint(
        &self,
        addr: SocketAddr,
        mode: Mode,
        server_name: &str,
    ) -> Result<Endpoint> {
        Ok(Endpoint {
            addr,
            tls: match mode {
                Mode::Mtls => Some(client_tls(&self.ca, &self.user)?),
                Mode::Plain => None,
            },
            server_name: server_name.to_string(),
        })
    }

    /// Measures `target` once, again (up to [`ATTEMPTS`] in all) while the hypervisor took more
    /// than `--max-steal` of either core during the window: the shared host's noise shows up
    /// as steal time, and a window with much of it measures the neighbours, not the gateway.
    async fn measure(
        &self,
        target: &Running,
        mode: Mode,
        round: usize,
        args: &Args,
    ) -> Result<Run> {
        let mut attempt = 1;
        loop {
            let mut run = self.measure_once(target, mode, round, args).await?;
            run.attempts = attempt;
            // The untimed warm-up pass (round 0) is not measured again.
            if run.steal <= args.max_steal || attempt == ATTEMPTS || round == 0 {
                return Ok(run);
            }
            eprintln!(
                "round {round} {} {}: {:.1} % steal in the window; measuring again",
                target.config.key(),
                mode.key(),
                run.steal * 100.0
            );
            attempt += 1;
        }
    }

    async fn measure_once(
        &self,
        target: &Running,
        mode: Mode,
        round: usize,
        args: &Args,
    ) -> Result<Run> {
        let (addr, server_name) = match (target.config, mode) {
            (Config::Direct, Mode::Mtls) => (target.mtls, "management.azure.com"),
            (_, Mode::Mtls) => (target.mtls, "localhost"),
            (_, Mode::Plain) => (target.plain, "localhost"),
        };
        let endpoint = self.endpoint(addr, mode, server_name)?;
        let load = Load::start(&endpoint, &self.request(mode)?, args.connections)
            .await
            .with_context(|| format!("{} {}", target.config.key(), mode.key()))?;
        tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
        let own = std::process::id();
        let upstream = self.upstream.pid()?;
        let before = (
            procfs::cpu_ticks_of(&target.pids)?,
            procfs::cpu_ticks(own)?,
            procfs::cpu_ticks(upstream)?,
        );
        let cores = [gateway_cpu(), LOAD_CPU];
        let steal_before = cores.map(procfs::steal_ticks);
        let opened = load.open_window();
        let mut peak_rss = procfs::rss_bytes_of(&target.pids)?;
        let window = Duration::from_secs_f64(args.seconds);
        while opened.elapsed() < window {
            let left = window.saturating_sub(opened.elapsed());
            tokio::time::sleep(left.min(Duration::from_millis(100))).await;
            peak_rss = peak_rss.max(procfs::rss_bytes_of(&target.pids)?);
        }
        let after = (
            procfs::cpu_ticks_of(&target.pids)?,
            procfs::cpu_ticks(own)?,
            procfs::cpu_ticks(upstream)?,
        );
        let steal_after = cores.map(procfs::steal_ticks);
        let seen = load.finish(opened).await;
        let window_ticks = seen.elapsed.as_secs_f64() * procfs::clock_ticks_per_second() as f64;
        let steal = (0..cores.len())
            .map(|i| (steal_after[i] - steal_before[i]) as f64 / window_ticks.max(1.0))
            .fold(0.0, f64::max);
        if seen.errors > 0 {
            bail!(
                "{} {}: {} failed requests; first: {}",
                target.config.key(),
                mode.key(),
                seen.errors,
                seen.first_error.unwrap_or_default()
            );
        }
        Ok(Run::new(
            target.config,
            mode,
            round,
            seen,
            (after.0 - before.0, after.1 - before.1, after.2 - before.2),
            peak_rss,
            steal,
        ))
    }
}

/// The order of one round: every configuration of one mode, then of the other, each with the
/// partners of its ratios beside it (c–d, d–f, f–e; b two steps from d), so the two members
/// of a ratio are measured seconds apart and the host's drift between them stays small.
/// Rounds rotate this cycle, which keeps neighbours neighbours.
fn measuring_order(running: &[Running]) -> Vec<(usize, Mode)> {
    const CYCLE: [Config; 7] = [
        Config::Direct,
        Config::BareHyper,
        Config::ServeNoFilter,
        Config::Serve,
        Config::EnvoyFilter,
        Config::EnvoyRouter,
        Config::EnvoyJwt,
    ];
    Mode::ALL
        .into_iter()
        .flat_map(|mode| {
            CYCLE.into_iter().filter_map(move |config| {
                running
                    .iter()
                    .position(|r| r.config == config)
                    .map(|i| (i, mode))
            })
        })
        .collect()
}

/// Waits for Envoy's admin `/ready`.
pub(crate) async fn wait_ready(
    child: &mut tokio::process::Child,
    admin: SocketAddr,
    log: &Path,
) -> Result<()> {
    let client = reqwest::Client::builder().no_proxy().build()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            bail!(
                "exited ({status}) during start:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if let Ok(response) = client.get(format!("http://{admin}/ready")).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("not ready after 60 s")
}

/// The user's public key as the JWKS `jwt_authn` checks the JWT against.
fn jwks(user: &Issued) -> Result<String> {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let azgate_tests::pki::PrivateKey::P256(key) = &user.key else {
        bail!("the bench user has a P-256 key");
    };
    let point = key.verifying_key().to_encoded_point(false);
    let (Some(x), Some(y)) = (point.x(), point.y()) else {
        bail!("uncompressed point without coordinates");
    };
    Ok(serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "alg": "ES256",
        "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
    }]})
    .to_string())
}

/// XFCC as Envoy's `SANITIZE_SET` with `cert: true` writes it for `user`.
fn xfcc(user: &Issued) -> Result<String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use sha2::Digest;
    let der = CertificateDer::from_pem_slice(user.cert_pem.as_bytes())?;
    let hash: String = sha2::Sha256::digest(der.as_ref())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    const ESCAPED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    let cert = percent_encoding::utf8_percent_encode(&user.cert_pem, ESCAPED);
    Ok(format!("Hash={hash};Cert=\"{cert}\""))
}

fn client_tls(ca: &TestCa, cert: &Issued) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.cert_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let chain =
        CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
