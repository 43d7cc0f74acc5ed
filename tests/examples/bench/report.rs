//! Figures from the rounds: per-run numbers, their spread per configuration, ratios taken
//! within each round, and the files `make bench` writes (`bench/results.json`, `BENCHMARKS.md`,
//! the plot, the README's ratio block).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::extras::Extras;
use crate::load::Window;
use crate::{Args, Config, Mode, procfs};

/// One configuration measured once.
pub(crate) struct Run {
    pub(crate) config: Config,
    pub(crate) mode: Mode,
    /// 1-based; 0 is the untimed warm-up pass.
    pub(crate) round: usize,
    /// Which of the configuration's processes was measured.
    pub(crate) replica: usize,
    pub(crate) requests: usize,
    pub(crate) rps: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    /// CPU time of the configuration's processes per answered request (`None` for `direct`).
    pub(crate) cpu_us_per_req: Option<f64>,
    pub(crate) rss_mb: Option<f64>,
    /// The load generator's (this process's) CPU per request.
    pub(crate) load_cpu_us_per_req: f64,
    pub(crate) upstream_cpu_us_per_req: f64,
    /// The larger steal time of the two cores in the configuration's turns, as a fraction of
    /// its sending time.
    pub(crate) steal: f64,
}

impl Run {
    /// `ticks`: CPU ticks in the window of (the configuration, the load generator, the upstream).
    pub(crate) fn new(
        config: Config,
        mode: Mode,
        round: usize,
        mut window: Window,
        ticks: (u64, u64, u64),
        peak_rss: u64,
        steal: f64,
    ) -> Self {
        window.latencies_us.sort_unstable();
        let requests = window.latencies_us.len();
        let per_request = |ticks: u64| {
            procfs::ticks_to_duration(ticks, procfs::clock_ticks_per_second()).as_secs_f64() * 1e6
                / requests.max(1) as f64
        };
        let quantile = |q: f64| {
            let last = requests.saturating_sub(1);
            window
                .latencies_us
                .get(((requests as f64 * q) as usize).min(last))
                .map_or(0.0, |us| f64::from(*us))
        };
        let gateway = config != Config::Direct;
        Self {
            config,
            mode,
            round,
            replica: 0,
            requests,
            rps: requests as f64 / window.elapsed.as_secs_f64(),
            p50_us: quantile(0.50),
            p99_us: quantile(0.99),
            cpu_us_per_req: gateway.then(|| per_request(ticks.0)),
            rss_mb: gateway.then(|| peak_rss as f64 / (1024.0 * 1024.0)),
            load_cpu_us_per_req: per_request(ticks.1),
            upstream_cpu_us_per_req: per_request(ticks.2),
            steal,
        }
    }

    /// One line for the console.
    pub(crate) fn line(&self) -> String {
        format!(
            "round {} {:<15} {:<5} {:>8.0} req/s  p50 {:>7.0} us  p99 {:>7.0} us  cpu {:>6} us/req  \
             rss {:>6} MB  load {:>5.1} us/req  upstream {:>5.1} us/req  steal {:>4.1} %",
            self.round,
            self.config.key(),
            self.mode.key(),
            self.rps,
            self.p50_us,
            self.p99_us,
            self.cpu_us_per_req
                .map_or("-".into(), |v| format!("{v:.1}")),
            self.rss_mb.map_or("-".into(), |v| format!("{v:.1}")),
            self.load_cpu_us_per_req,
            self.upstream_cpu_us_per_req,
            self.steal * 100.0,
        )
    }

    fn to_json(&self) -> Value {
        json!({
            "configuration": self.config.key(), "mode": self.mode.key(), "round": self.round,
            "replica": self.replica,
            "requests": self.requests, "rps": self.rps, "p50_us": self.p50_us,
            "p99_us": self.p99_us, "cpu_us_per_req": self.cpu_us_per_req,
            "rss_mb": self.rss_mb, "load_cpu_us_per_req": self.load_cpu_us_per_req,
            "upstream_cpu_us_per_req": self.upstream_cpu_us_per_req,
            "steal": self.steal,
        })
    }
}

/// Minimum, median and maximum of some values.
#[derive(Clone, Copy)]
pub(crate) struct Spread {
    pub(crate) min: f64,
    pub(crate) median: f64,
    pub(crate) max: f64,
}

impl Spread {
    pub(crate) fn of(values: impl IntoIterator<Item = f64>) -> Option<Self> {
        let mut values: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Some(Self {
            min: values[0],
            median,
            max: values[n - 1],
        })
    }

    fn to_json(self) -> Value {
        json!({"min": self.min, "median": self.median, "max": self.max})
    }

    /// `median [min–max]` with `decimals`.
    fn show(self, decimals: usize) -> String {
        format!(
            "{:.d$} [{:.d$}–{:.d$}]",
            self.median,
            self.min,
            self.max,
            d = decimals
        )
    }
}

/// How a ratio is formed from two configurations' runs in the same round.
#[derive(Clone, Copy)]
enum Measure {
    /// `rps(a) / rps(b)`: how many times the throughput.
    Throughput,
    /// `cpu(b) / cpu(a)`: how many times fewer CPU microseconds per request.
    CpuEfficiency,
}

/// The ratios the report gives, with their targets (from the benchmark issue) where there is one.
const RATIOS: &[(Config, Config, Measure, Option<f64>)] = &[
    (
        Config::Serve,
        Config::EnvoyFilter,
        Measure::Throughput,
        Some(2.5),
    ),
    (
        Config::Serve,
        Config::EnvoyFilter,
        Measure::CpuEfficiency,
        None,
    ),
    (
        Config::Serve,
        Config::BareHyper,
        Measure::Throughput,
        Some(0.8),
    ),
    (
        Config::Serve,
        Config::BareHyper,
        Measure::CpuEfficiency,
        None,
    ),
    (
        Config::EnvoyFilter,
        Config::EnvoyRouter,
        Measure::Throughput,
        Some(0.7),
    ),
    (
        Config::EnvoyFilter,
        Config::EnvoyRouter,
        Measure::CpuEfficiency,
        None,
    ),
    (
        Config::Serve,
        Config::EnvoyJwt,
        Measure::CpuEfficiency,
        None,
    ),
];

/// What the filter's logic costs: CPU µs per request, (d) − (c); the target is ≤ 5.
const FILTER_COST_TARGET_US: f64 = 5.0;

struct Ratio {
    a: Config,
    b: Config,
    mode: Mode,
    measure: Measure,
    target: Option<f64>,
    spread: Spread,
}

impl Ratio {
    fn key(&self) -> String {
        let measure = match self.measure {
            Measure::Throughput => "rps",
            Measure::CpuEfficiency => "cpu",
        };
        format!(
            "{}/{} {measure} {}",
            self.a.key(),
            self.b.key(),
            self.mode.key()
        )
    }

    /// `| description | client | median [min–max]× |`, a table row without its target.
    fn row(&self) -> String {
        format!(
            "| {} | {} | {}× |",
            self.describe(),
            self.mode.key(),
            self.spread.show(2)
        )
    }

    fn describe(&self) -> String {
        match self.measure {
            Measure::Throughput => format!("{} ÷ {}, requests/s", self.a.label(), self.b.label()),
            Measure::CpuEfficiency => format!(
                "{} ÷ {}, requests per CPU-second",
                self.a.label(),
                self.b.label()
            ),
        }
    }
}

pub(crate) struct Report {
    runs: Vec<Run>,
    ratios: Vec<Ratio>,
    /// (mode, (d) − (c) spread, (f) − (e) spread) in CPU µs per request.
    filter_costs: Vec<(Mode, Option<Spread>, Option<Spread>)>,
    extras: Option<Extras>,
    rounds: usize,
    settings: Value,
    command_line: String,
}

impl Report {
    pub(crate) fn new(args: &Args, runs: Vec<Run>, extras: Option<Extras>) -> Self {
        let find = |config: Config, mode: Mode, round: usize| {
            runs.iter()
                .find(|r| r.config == config && r.mode == mode && r.round == round)
        };
        let mut ratios = Vec::new();
        for mode in Mode::ALL {
            for &(a, b, measure, target) in RATIOS {
                let per_round = (1..=args.rounds).filter_map(|round| {
                    let (ra, rb) = (find(a, mode, round)?, find(b, mode, round)?);
                    match measure {
                        Measure::Throughput => Some(ra.rps / rb.rps),
                        Measure::CpuEfficiency => Some(rb.cpu_us_per_req? / ra.cpu_us_per_req?),
                    }
                });
                if let Some(spread) = Spread::of(per_round) {
                    ratios.push(Ratio {
                        a,
                        b,
                        mode,
                        measure,
                        target: target.filter(|_| mode == Mode::Mtls),
                        spread,
                    });
                }
            }
        }
        let difference = |a: Config, b: Config, mode: Mode| {
            Spread::of((1..=args.rounds).filter_map(|round| {
                Some(find(a, mode, round)?.cpu_us_per_req? - find(b, mode, round)?.cpu_us_per_req?)
            }))
        };
        let filter_costs = Mode::ALL
            .into_iter()
            .map(|mode| {
                (
                    mode,
                    difference(Config::Serve, Config::ServeNoFilter, mode),
                    difference(Config::EnvoyFilter, Config::EnvoyRouter, mode),
                )
            })
            .collect();
        Self {
            runs,
            ratios,
            filter_costs,
            extras,
            rounds: args.rounds,
            settings: json!({
                "rounds": args.rounds, "seconds": args.seconds, "warmup_seconds": args.warmup,
                "connections": args.connections,
                "gateway_cpu": crate::gateway_cpu(), "load_cpu": crate::LOAD_CPU,
                "gateway_workers": 1, "slice_seconds": args.slice,
                "replicas": args.replicas,
            }),
            command_line: args.command_line.clone(),
        }
    }

    /// The spread of `field` over the rounds of (config, mode).
    fn spread(
        &self,
        config: Config,
        mode: Mode,
        field: impl Fn(&Run) -> Option<f64>,
    ) -> Option<Spread> {
        Spread::of(
            self.runs
                .iter()
                .filter(|r| r.config == config && r.mode == mode && r.round > 0)
                .filter_map(field),
        )
    }

    fn cells(&self) -> Vec<(Config, Mode)> {
        let mut cells: Vec<(Config, Mode)> = self
            .runs
            .iter()
            .map(|r| (r.config, r.mode))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        cells.sort_by_key(|(config, mode)| (*mode, *config));
        cells
    }

    pub(crate) fn print(&self) {
        println!("\n{}", self.table());
        println!("{}", self.ratio_table());
        if let Some(extras) = &self.extras {
            println!("{}", extras.markdown());
        }
    }

    fn table(&self) -> String {
        let mut out = String::from(
            "| configuration | client | req/s | p50 µs | p99 µs | CPU µs/req | peak RSS MB | load gen. µs/req | upstream µs/req |\n|---|---|---|---|---|---|---|---|---|\n",
        );
        for (config, mode) in self.cells() {
            let show = |field: &dyn Fn(&Run) -> Option<f64>, decimals| {
                self.spread(config, mode, field)
                    .map_or("–".into(), |s| s.show(decimals))
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                config.label(),
                mode.key(),
                show(&|r| Some(r.rps), 0),
                show(&|r| Some(r.p50_us), 0),
                show(&|r| Some(r.p99_us), 0),
                show(&|r| r.cpu_us_per_req, 1),
                show(&|r| r.rss_mb, 1),
                show(&|r| Some(r.load_cpu_us_per_req), 1),
                show(&|r| Some(r.upstream_cpu_us_per_req), 1),
            );
        }
        out
    }

    fn ratio_table(&self) -> String {
        let mut out = String::from(
            "| ratio (within a round) | client | median [min–max] over rounds | target |\n|---|---|---|---|\n",
        );
        for ratio in &self.ratios {
            let target = ratio.target.map_or(String::new(), |t| {
                let met = if ratio.spread.median >= t {
                    "met"
                } else {
                    "not met"
                };
                format!("≥ {t}× ({met})")
            });
            let _ = writeln!(out, "{} {target} |", ratio.row());
        }
        for (mode, serve, envoy) in &self.filter_costs {
            if let Some(serve) = serve {
                let met = if serve.median <= FILTER_COST_TARGET_US {
                    "met"
                } else {
                    "not met"
                };
                let target = if *mode == Mode::Mtls {
                    format!("≤ {FILTER_COST_TARGET_US} µs ({met})")
                } else {
                    String::new()
                };
                let _ = writeln!(
                    out,
                    "| the filter in serve, (d) − (c), CPU µs/req | {} | {} µs | {target} |",
                    mode.key(),
                    serve.show(1)
                );
            }
            if let Some(envoy) = envoy {
                let _ = writeln!(
                    out,
                    "| the filter in Envoy, (f) − (e), CPU µs/req | {} | {} µs | |",
                    mode.key(),
                    envoy.show(1)
                );
            }
        }
        out
    }

    fn to_json(&self) -> Value {
        let mut configurations = BTreeMap::new();
        for (config, mode) in self.cells() {
            let field =
                |f: &dyn Fn(&Run) -> Option<f64>| self.spread(config, mode, f).map(Spread::to_json);
            configurations.insert(
                format!("{}/{}", config.key(), mode.key()),
                json!({
                    "label": config.label(), "configuration": config.key(), "mode": mode.key(),
                    "rps": field(&|r| Some(r.rps)),
                    "p50_us": field(&|r| Some(r.p50_us)),
                    "p99_us": field(&|r| Some(r.p99_us)),
                    "cpu_us_per_req": field(&|r| r.cpu_us_per_req),
                    "rss_mb": field(&|r| r.rss_mb),
                    "load_cpu_us_per_req": field(&|r| Some(r.load_cpu_us_per_req)),
                    "upstream_cpu_us_per_req": field(&|r| Some(r.upstream_cpu_us_per_req)),
                }),
            );
        }
        let ratios: BTreeMap<String, Value> = self
            .ratios
            .iter()
            .map(|r| {
                let mut value = r.spread.to_json();
                value["description"] = r.describe().into();
                value["target"] = r.target.into();
                (r.key(), value)
            })
            .collect();
        let filter_cost: BTreeMap<String, Value> = self
            .filter_costs
            .iter()
            .flat_map(|(mode, serve, envoy)| {
                [
                    (format!("serve {}", mode.key()), serve.map(Spread::to_json)),
                    (format!("envoy {}", mode.key()), envoy.map(Spread::to_json)),
                ]
            })
            .map(|(k, v)| (k, v.unwrap_or(Value::Null)))
            .collect();
        json!({
            "machine": machine(),
            "command": self.command_line,
            "git_commit": git_commit(),
            "generated_unix": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            "settings": self.settings,
            "configurations": configurations,
            "ratios": ratios,
            "filter_cpu_us_per_req": filter_cost,
            "extras": self.extras.as_ref().map(Extras::to_json),
            "runs": self.runs.iter().filter(|r| r.round > 0).map(Run::to_json).collect::<Vec<_>>(),
        })
    }

    /// Writes `results.json` and the plot under `args.out`; with docs, `BENCHMARKS.md` and the
    /// README's ratio block.
    pub(crate) fn write(&self, args: &Args) -> Result<()> {
        std::fs::create_dir_all(&args.out)?;
        let json_path = args.out.join("results.json");
        std::fs::write(&json_path, serde_json::to_string_pretty(&self.to_json())?)?;
        let plot = args.out.join("results.png");
        let status = std::process::Command::new(plot_python())
            .arg(crate::topology::repo_root().join("bench/plot.py"))
            .arg(&json_path)
            .arg(&plot)
            .status()
            .context("running bench/plot.py")?;
        if !status.success() {
            bail!("bench/plot.py failed: {status}");
        }
        println!("wrote {} and {}", json_path.display(), plot.display());
        if args.docs {
            let root = crate::topology::repo_root();
            std::fs::write(root.join("BENCHMARKS.md"), self.markdown())?;
            update_readme(&root.join("README.md"), &self.readme_block())?;
            println!("wrote BENCHMARKS.md and the README's ratio block");
        }
        Ok(())
    }

    fn markdown(&self) -> String {
        let machine = machine();
        let settings = &self.settings;
        let mut out = String::new();
        let _ = write!(
            out,
            "# Benchmarks\n\n\
             Written by `make bench` ({command}); do not edit by hand. Commit {commit}.\n\n\
             **Machine:** {cpus} × {model}, Linux {kernel}; the host is shared with other work, so \
             absolute figures drift within minutes — compare ratios, which are taken within a round.\n\n\
             **Method.** {rounds} interleaved rounds. A round is one window per client mode (the \
             mode that goes first alternates). In a window every configuration holds its \
             connections open and gets {seconds} s of load (after {warmup} s of warm-up) in turns of \
             {slice} s: through the configurations in an order that puts the two members of each \
             ratio side by side, then back, and so on, so they are measured a turn apart and every \
             configuration's mean position in the window is the same; the order is rotated by one \
             each round. Each configuration runs as {replicas} processes, started before the \
             rounds and measured in turn round by round, because a process keeps a speed of its \
             own for its life (a few per cent for Envoy with the filter). The host's drift, which moves absolute figures by up to 2× within \
             minutes, thus lands on both members of a ratio alike. The load is \
             {connections} closed-loop HTTP/1.1 keep-alive connections from one thread of the bench \
             process; every request is an allowed `az`-style call (the user's proof-of-possession \
             JWT, `X-Forwarded-Host: management.azure.com`; with mTLS the Teleport app certificate, \
             in `plain` mode the same certificate in XFCC as a trusted TLS front would send it) and \
             the MSI token is cached: the steady state. Each gateway has one worker and is pinned \
             with its token service to CPU {gateway_cpu}; the load generator, the upstream (a \
             hyper TLS server answering `{{\"value\":[]}}`) and the IMDS emulator are pinned to \
             CPU {load_cpu}. *CPU µs/req* is utime + stime of the configuration's processes \
             (`/proc/<pid>/stat`, every thread; for (f) also `azgate token-service`) from the start \
             to the end of the window (idle while the others take their turns) divided by the \
             requests it answered; *rps* is those requests over its sending time; *peak RSS* is \
             the largest VmRSS sampled at the end of each of its turns (gateway + token service). \
             The load generator's and the upstream's own CPU per request (read at every turn) are \
             in the last two columns: they bound what the load core can drive. *Steal* (in \
             `bench/results.json`) is the hypervisor's steal time on either core during the configuration's turns.\n\n\
             Configurations: (a) the upstream directly; (b) a bare hyper proxy (mTLS or plain in, \
             TLS out, a fixed token: the ceiling); (c) `azgate serve` with a no-op proxy-wasm \
             module (`bench/noop.wat`: the VM runs, no filter logic); (d) `azgate serve` with the \
             filter; (e) Envoy with the router only; (f) Envoy with the filter in V8, the \
             configuration `azgate envoy-config` renders (token service as a separate process); (g) \
             Envoy with native `jwt_authn` checking the JWT against the user's key and a fixed \
             token injected by the route (`bench/envoy-native.yaml`).\n\n\
             ## Results (median [min–max] over the rounds)\n\n{table}\n\
             ## Ratios\n\nEach ratio is formed within a round and the median taken over rounds.\n\n\
             {ratios}\n\
             ![CPU µs per request and p99 latency per configuration](bench/results.png)\n\n",
            command = self.command_line,
            commit = git_commit(),
            cpus = machine["cpus"],
            model = machine["cpu_model"].as_str().unwrap_or("?"),
            kernel = machine["kernel"].as_str().unwrap_or("?"),
            rounds = self.rounds,
            seconds = settings["seconds"],
            warmup = settings["warmup_seconds"],
            connections = settings["connections"],
            gateway_cpu = settings["gateway_cpu"].as_str().unwrap_or("?"),
            load_cpu = settings["load_cpu"].as_str().unwrap_or("?"),
            slice = settings["slice_seconds"],
            replicas = settings["replicas"],
            table = self.table(),
            ratios = self.ratio_table(),
        );
        if let Some(extras) = &self.extras {
            out.push_str(&extras.markdown());
        }
        out
    }

    fn readme_block(&self) -> String {
        let mut out = String::from(
            "Ratios from the latest `make bench` (interleaved rounds; median [min–max] over rounds; \
             the method, absolute figures and the plot are in [BENCHMARKS.md](BENCHMARKS.md)):\n\n\
             | ratio | client | value |\n|---|---|---|\n",
        );
        for ratio in &self.ratios {
            let _ = writeln!(out, "{}", ratio.row());
        }
        out
    }
}

const README_START: &str = "<!-- bench-ratios:start (written by make bench) -->";
const README_END: &str = "<!-- bench-ratios:end -->";

fn update_readme(path: &std::path::Path, block: &str) -> Result<()> {
    let readme = std::fs::read_to_string(path)?;
    let (Some(start), Some(end)) = (readme.find(README_START), readme.find(README_END)) else {
        bail!("README.md has no {README_START} … {README_END} block");
    };
    let updated = format!(
        "{}{README_START}\n{block}{}",
        &readme[..start],
        &readme[end..]
    );
    std::fs::write(path, updated)?;
    Ok(())
}

/// The Python with matplotlib that `make bench` installs (`$AZGATE_BENCH_PYTHON`).
fn plot_python() -> String {
    std::env::var("AZGATE_BENCH_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn machine() -> Value {
    json!({
        "cpus": procfs::online_cpus(),
        "cpu_model": procfs::cpu_model(),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|k| k.trim().to_string()).unwrap_or_default(),
    })
}

fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(crate::topology::repo_root())
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
