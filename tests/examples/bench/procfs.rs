//! What the kernel says about a process: CPU time (`/proc/<pid>/stat` utime + stime, all
//! threads), resident memory (`/proc/<pid>/status` VmRSS), and which cores it may run on.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`, asked once; 100 on Linux).
pub(crate) fn clock_ticks_per_second() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// User + system CPU time of `pid` (every thread, living or exited) in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count after the last ')'.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("no ')' in /proc/<pid>/stat")?;
    // Fields 3.. start after it; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .context("short /proc/<pid>/stat")?
            .parse()
            .context("field of /proc/<pid>/stat")
    };
    Ok(field(14)? + field(15)?)
}

/// The sum of [`cpu_ticks`] over `pids`.
pub(crate) fn cpu_ticks_of(pids: &[u32]) -> Result<u64> {
    pids.iter().map(|pid| cpu_ticks(*pid)).sum()
}

/// Ticks as a duration.
pub(crate) fn ticks_to_duration(ticks: u64, per_second: u64) -> Duration {
    Duration::from_secs_f64(ticks as f64 / per_second.max(1) as f64)
}

/// Steal time of each CPU in `cpus` (numbers, as `taskset` takes them) in clock ticks: time
/// the hypervisor ran something else while that core had work (`/proc/stat`, 8th value, read
/// once for all of them). 0 for a core the kernel says nothing of.
pub(crate) fn steal_ticks<const N: usize>(cpus: [&str; N]) -> [u64; N] {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    cpus.map(|cpu| {
        let prefix = format!("cpu{cpu} ");
        stat.lines()
            .find(|line| line.starts_with(&prefix))
            .and_then(|line| line.split_whitespace().nth(8))
            .and_then(|steal| steal.parse().ok())
            .unwrap_or(0)
    })
}

/// Resident set size of `pid` in bytes (VmRSS).
pub(crate) fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmRSS without a value")?
        .parse()?;
    Ok(kib * 1024)
}

/// The sum of [`rss_bytes`] over `pids`.
pub(crate) fn rss_bytes_of(pids: &[u32]) -> Result<u64> {
    pids.iter().map(|pid| rss_bytes(*pid)).sum()
}

/// Lets every thread of `pid` run only on `cpus` (a `taskset` list such as `1` or `0-1`);
/// threads it starts later inherit that.
pub(crate) fn pin(pid: u32, cpus: &str) -> Result<()> {
    let status = Command::new("taskset")
        .args(["--all-tasks", "--cpu-list", "--pid", cpus])
        .arg(pid.to_string())
        .stdout(std::process::Stdio::null())
        .status()
        .context("running taskset (util-linux)")?;
    if !status.success() {
        bail!("taskset -a -c -p {cpus} {pid} failed: {status}");
    }
    Ok(())
}

/// The machine's CPUs (`/proc/cpuinfo`; not `available_parallelism`, which shrinks once this
/// process is pinned).
pub(crate) fn online_cpus() -> usize {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|info| {
            info.lines()
                .filter(|line| line.starts_with("processor"))
                .count()
        })
        .unwrap_or(1)
        .max(1)
}

/// The CPU model from `/proc/cpuinfo`.
pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}
