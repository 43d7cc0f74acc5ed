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
//! IMDS emulator share the other. A round is one window per client mode in which every
//! configuration keeps its connections open and they take turns of `--slice` seconds, the two
//! members of each ratio side by side ([`measuring_order`]), forward then back
//! ([`Bench::measure_window`]), so the shared host's drift lands on all configurations alike;
//! ratios are taken within a round, then the median over rounds.
//!
//! `bench [--rounds 30] [--seconds 1.25] [--slice 0.125] [--replicas 5] [--warmup 0.25]
//!  [--connections 16] [--only serve,envoy-filter] [--out bench] [--no-docs] [--no-extras]`;
//! the Makefile builds the `.wasm`, Envoy and a `host`-profile `azgate` and sets `AZGATE_BIN`.

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
    /// Seconds of one turn in a window (see `Bench::measure_window`).
    pub(crate) slice: f64,
    /// Processes per configuration, measured in turn round by round (see `conduct`).
    pub(crate) replicas: usize,
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
        slice: 0.125,
        replicas: 5,
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
                    "--slice" => args.slice = value.parse()?,
                    "--replicas" => args.replicas = value.parse()?,
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
    if args.rounds == 0 || args.connections == 0 || args.replicas == 0 {
        bail!("--rounds, --connections and --replicas must be at least 1");
    }
    if !(args.slice > 0.0 && args.seconds > 0.0) {
        bail!("--slice and --seconds must be positive");
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
    /// Which of the configuration's `--replicas` processes this is.
    replica: usize,
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
    // Each configuration runs as `--replicas` processes, measured in turn round by round: a
    // process has a lasting speed of its own (how its code and heap landed in memory; for V8
    // also what it tiered up), a few per cent for Envoy with the filter, which rounds within
    // one process cannot average out.
    let mut running = Vec::new();
    for replica in 0..args.replicas {
        for config in &configs {
            let started = Instant::now();
            let mut target = bench.start(*config).await?;
            target.replica = replica;
            for pid in &target.pids {
                procfs::pin(*pid, gateway_cpu())?;
            }
            eprintln!(
                "started {:<16} #{replica} in {:>6.0} ms (pids {:?})",
                config.key(),
                started.elapsed().as_secs_f64() * 1000.0,
                target.pids
            );
            running.push(target);
        }
    }
    println!(
        "{} rounds x {} configurations, {} s measured after {} s warm-up each, {} connections; \
         gateways on CPU {}, load + upstream on CPU {LOAD_CPU}",
        args.rounds,
        configs.len() * Mode::ALL.len(),
        args.seconds,
        args.warmup,
        args.connections,
        gateway_cpu(),
    );
    // Untimed first windows: tokens fetched and cached, code warm, every path proven to answer
    // 200, in every replica.
    let quick = Args {
        seconds: 0.5,
        warmup: 0.5,
        ..args.clone()
    };
    for replica in 0..args.replicas {
        for mode in Mode::ALL {
            let order = measuring_order(&running, replica);
            bench.measure_window(&order, mode, 0, &quick).await?;
        }
    }
    let mut runs = Vec::new();
    for round in 0..args.rounds {
        let mut rotated = measuring_order(&running, round % args.replicas);
        let by = round % rotated.len().max(1);
        rotated.rotate_left(by);
        // Alternate which mode goes first, so neither always follows the other.
        let modes = if round % 2 == 0 {
            Mode::ALL
        } else {
            [Mode::ALL[1], Mode::ALL[0]]
        };
        for mode in modes {
            for run in bench
                .measure_window(&rotated, mode, round + 1, &args)
                .await?
            {
                println!("{}", run.line());
                runs.push(run);
            }
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
                replica: 0,
                mtls: gateway.mtls,
                plain,
                pids: gateway.pids(),
                _keep: Keep::Gateway(Box::new(gateway)),
            })
        };
        match config {
            Config::Direct => Ok(Running {
                config,
                replica: 0,
                mtls: self.upstream.first,
                plain: self.upstream.second,
                pids: Vec::new(),
                _keep: Keep::Nothing,
            }),
            Config::BareHyper => {
                let proxy = roles::spawn("bare-proxy", &self.dir, Some(upstream_tls)).await?;
                Ok(Running {
                    config,
                    replica: 0,
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
            replica: 0,
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

    /// Measures every configuration in `targets` in one window of `mode`. Each has its
    /// connections open throughout and gets `--seconds` of load in slices of about `--slice`,
    /// taking turns: forward through `targets`, then backward, and so on, so every
    /// configuration's mean position in the window is the same. Neighbours are measured a slice
    /// apart, and the shared host's drift (which moves absolute figures by 2× within minutes)
    /// lands on all of them alike.
    ///
    /// A configuration's CPU time is read before and after the whole window: it does nothing
    /// while the others take their turns (its idle cost is in its figure), and requests still
    /// in flight when its slice ends are answered, by it, in the next one and counted as its own.
    /// The load generator's and the upstream's CPU time and the steal time are read at every
    /// turn and charged to the configuration whose turn it was.
    async fn measure_window(
        &self,
        targets: &[&Running],
        mode: Mode,
        round: usize,
        args: &Args,
    ) -> Result<Vec<Run>> {
        let shape = self.request(mode)?;
        let mut loads = Vec::with_capacity(targets.len());
        for target in targets {
            let (addr, server_name) = match (target.config, mode) {
                (Config::Direct, Mode::Mtls) => (target.mtls, "management.azure.com"),
                (_, Mode::Mtls) => (target.mtls, "localhost"),
                (_, Mode::Plain) => (target.plain, "localhost"),
            };
            let endpoint = self.endpoint(addr, mode, server_name)?;
            let load = Load::connect_paused(&endpoint, &shape, args.connections)
                .await
                .with_context(|| format!("{} {}", target.config.key(), mode.key()))?;
            loads.push(load);
        }
        for load in &loads {
            load.resume();
            tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
            load.pause();
        }
        tokio::time::sleep(DRAIN).await;

        let own = std::process::id();
        let upstream = self.upstream.pid()?;
        // Read at every turn's end, and charged to that turn.
        let mark = || -> Result<(u64, u64, [u64; 2])> {
            Ok((
                procfs::cpu_ticks(own)?,
                procfs::cpu_ticks(upstream)?,
                procfs::steal_ticks([gateway_cpu(), LOAD_CPU]),
            ))
        };
        let mut turns: Vec<Turns> = targets
            .iter()
            .map(|target| Ok(Turns::new(procfs::rss_bytes_of(&target.pids)?)))
            .collect::<Result<_>>()?;
        let gateway_before = targets
            .iter()
            .map(|target| procfs::cpu_ticks_of(&target.pids))
            .collect::<Result<Vec<_>>>()?;
        for load in &loads {
            load.open_window();
        }
        let mut last = mark()?;
        let slices = (args.seconds / args.slice).round().max(1.0) as usize;
        let slice = Duration::from_secs_f64(args.seconds / slices as f64);
        for cycle in 0..slices {
            for step in 0..targets.len() {
                let i = if cycle % 2 == 0 {
                    step
                } else {
                    targets.len() - 1 - step
                };
                let started = Instant::now();
                loads[i].resume();
                tokio::time::sleep(slice).await;
                let rss = procfs::rss_bytes_of(&targets[i].pids)?;
                loads[i].pause();
                let turn = &mut turns[i];
                turn.sending += started.elapsed();
                turn.peak_rss = turn.peak_rss.max(rss);
                let now = mark()?;
                turn.load_ticks += now.0 - last.0;
                turn.upstream_ticks += now.1 - last.1;
                turn.steal_ticks += (0..now.2.len())
                    .map(|core| now.2[core].saturating_sub(last.2[core]))
                    .max()
                    .unwrap_or(0);
                last = now;
            }
        }
        tokio::time::sleep(DRAIN).await;
        let gateway_after = targets
            .iter()
            .map(|target| procfs::cpu_ticks_of(&target.pids))
            .collect::<Result<Vec<_>>>()?;

        let mut runs = Vec::with_capacity(targets.len());
        for (i, load) in loads.into_iter().enumerate() {
            let (target, turn) = (targets[i], &turns[i]);
            let seen = load.finish(turn.sending).await;
            if seen.errors > 0 {
                bail!(
                    "{} {}: {} failed requests; first: {}",
                    target.config.key(),
                    mode.key(),
                    seen.errors,
                    seen.first_error.unwrap_or_default()
                );
            }
            let sending_ticks =
                turn.sending.as_secs_f64() * procfs::clock_ticks_per_second() as f64;
            let mut run = Run::new(
                target.config,
                mode,
                round,
                seen,
                (
                    gateway_after[i] - gateway_before[i],
                    turn.load_ticks,
                    turn.upstream_ticks,
                ),
                turn.peak_rss,
                turn.steal_ticks as f64 / sending_ticks.max(1.0),
            );
            run.replica = target.replica;
            runs.push(run);
        }
        Ok(runs)
    }
}

/// Long enough for requests in flight when a load pauses to be answered (p99 is a few ms).
const DRAIN: Duration = Duration::from_millis(50);

/// What one configuration's turns in a window added up to.
struct Turns {
    sending: Duration,
    peak_rss: u64,
    load_ticks: u64,
    upstream_ticks: u64,
    steal_ticks: u64,
}

impl Turns {
    fn new(rss: u64) -> Self {
        Self {
            sending: Duration::ZERO,
            peak_rss: rss,
            load_ticks: 0,
            upstream_ticks: 0,
            steal_ticks: 0,
        }
    }
}

/// The order of a window, from the `replica`-th process of each configuration: the partners
/// of each ratio side by side (c–d, d–f, f–e; b two steps from d). Rounds rotate it by one.
fn measuring_order(running: &[Running], replica: usize) -> Vec<&Running> {
    const CYCLE: [Config; 7] = [
        Config::Direct,
        Config::BareHyper,
        Config::ServeNoFilter,
        Config::Serve,
        Config::EnvoyFilter,
        Config::EnvoyRouter,
        Config::EnvoyJwt,
    ];
    CYCLE
        .into_iter()
        .filter_map(|config| running.iter().filter(|r| r.config == config).nth(replica))
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
