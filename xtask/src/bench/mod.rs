//! `cargo xtask bench`: twill measured against the kernel's own baseline, in one run, with a
//! report.
//!
//! Why it is shaped as it is:
//! - Every benchmark is a [`Benchmark`]: it gets a [`Context`] (options, progress display, the
//!   twilld binary) and returns a [`report::Section`]. The runner owns everything around it:
//!   machine facts, the report directory, plots, the terminal table, `results.json` and the
//!   sanity check. A benchmark plugs in as one module and one line in [`benchmark`].
//! - Benchmarks are not timed tests (STYLE.md): a missed target is reported, not a failure. A run
//!   fails only when it could not measure (a rig that does not come up, a tool that errors) or
//!   when its numbers are not sane (zero, NaN) — what the CI smoke run checks.
//! - Twill and its baseline run in the same invocation, interleaved repetition by repetition,
//!   and only their ratio is quoted: on a shared two-core machine absolute figures drift by tens
//!   of percent between runs, a ratio of neighbours in time much less.

pub mod cli;
pub mod cni;
pub mod control_plane;
pub mod machine;
pub mod overlay;
pub mod plot;
pub mod progress;
pub mod report;
pub mod services;
pub mod stats;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use self::progress::Progress;
use self::report::{Report, SCHEMA, Section};
use crate::cluster::ProxyMode;

/// An overlay backend, as in the network config's `Backend.Type`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// Kernel VXLAN (`flannel.1`).
    Vxlan,
    /// Plain routes via the peer node.
    HostGw,
    /// Userspace UDP encapsulation over TUN.
    Udp,
}

impl Backend {
    /// Every backend, in report order.
    pub const ALL: [Backend; 3] = [Backend::Vxlan, Backend::HostGw, Backend::Udp];

    /// The name in the network config (`host-gw`).
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Vxlan => "vxlan",
            Backend::HostGw => "host-gw",
            Backend::Udp => "udp",
        }
    }

    /// The network config twill's rigs use for this backend.
    pub fn network_config(self) -> String {
        format!(
            r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"{}"}}}}"#,
            self.as_str()
        )
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which benchmark(s) to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Which {
    /// Pod-to-pod throughput and latency per backend vs the hand-built kernel baseline, and
    /// lease-to-programmed latency.
    Overlay,
    /// Service connection rate vs number of services per proxy mode and vs direct pod IP, full
    /// and one-change sync latency, hand-written nft/iptables rules as baselines.
    Services,
    /// CNI ADD/DEL vs the reference plugins.
    Cni,
    /// 1000 nodes' leases and 10k services × 10 endpoints into one twilld: time to programmed,
    /// memory.
    ControlPlane,
    /// Everything that exists.
    All,
}

impl Which {
    /// The single benchmarks, in the order `all` runs them.
    pub const EACH: [Which; 4] = [
        Which::Overlay,
        Which::Services,
        Which::Cni,
        Which::ControlPlane,
    ];

    /// The command-line name.
    pub fn as_str(self) -> &'static str {
        match self {
            Which::Overlay => "overlay",
            Which::Services => "services",
            Which::Cni => "cni",
            Which::ControlPlane => "control-plane",
            Which::All => "all",
        }
    }
}

/// What to run and where to put the report.
#[derive(Debug, Clone, Serialize)]
pub struct BenchOptions {
    /// The benchmark(s).
    pub which: Which,
    /// The backends the overlay benchmark measures.
    pub backends: Vec<Backend>,
    /// The proxy modes the services benchmark measures (those twilld does not accept are
    /// reported unavailable).
    pub modes: Vec<ProxyMode>,
    /// Short durations and few samples (CI smoke runs, a quick look).
    pub quick: bool,
    /// Repetitions (default 3; at least 3 give a median worth the name).
    pub reps: usize,
    /// The report directory; default `bench-report/<UTC timestamp>/` in the workspace.
    pub out_dir: Option<PathBuf>,
    /// Where `twilld` is; default the rig's (`TWILL_BIN_DIR`, else next to the running binary).
    pub bin_dir: Option<PathBuf>,
    /// The command line that reproduces the run (for the report).
    pub command: String,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            which: Which::All,
            backends: Backend::ALL.to_vec(),
            modes: ProxyMode::SERVICE_MODES.to_vec(),
            quick: false,
            reps: 3,
            out_dir: None,
            bin_dir: None,
            command: "cargo xtask bench".into(),
        }
    }
}

/// What a benchmark gets to work with.
#[derive(Debug)]
pub struct Context<'a> {
    /// The run's options.
    pub opts: &'a BenchOptions,
    /// The progress display.
    pub progress: &'a Progress,
}

/// One benchmark.
pub trait Benchmark {
    /// The command-line name.
    fn name(&self) -> &'static str;
    /// Measures; a section for the report. Errors only when it could not measure.
    fn run(&self, ctx: &Context<'_>) -> Result<Section>;
}

/// The benchmark behind `which`, or why it does not exist yet.
pub fn benchmark(which: Which) -> Result<Box<dyn Benchmark>, &'static str> {
    match which {
        Which::Overlay => Ok(Box::new(overlay::Overlay)),
        Which::Services => Ok(Box::new(services::Services)),
        Which::Cni => Ok(Box::new(cni::Cni)),
        Which::ControlPlane => Ok(Box::new(control_plane::ControlPlane)),
        Which::All => Err("`all` is not a single benchmark"),
    }
}

/// The outcome of [`run`].
#[derive(Debug)]
pub struct Outcome {
    /// The report directory.
    pub dir: PathBuf,
    /// The report.
    pub report: Report,
}

/// Runs the benchmark(s), writes the report directory (`report.md`, SVG plots, `results.json`)
/// and prints the tables. An error if nothing could be measured, a benchmark failed, or the
/// numbers are not sane; the report is written first whenever there is one.
pub fn run(opts: &BenchOptions) -> Result<Outcome> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the benchmarks build network namespaces and need root");
    }
    if opts.reps == 0 {
        bail!("--reps must be at least 1");
    }
    if opts.which != Which::All
        && let Err(why) = benchmark(opts.which)
    {
        bail!(
            "`bench {}` is not available yet: {why}",
            opts.which.as_str()
        );
    }
    let started = machine::now_secs();
    let clock = Instant::now();
    let dir = opts.out_dir.clone().unwrap_or_else(|| {
        crate::util::workspace_root()
            .join("bench-report")
            .join(machine::compact(started))
    });
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;

    let twilld = twilld_path(opts.bin_dir.as_deref())?;
    let machine = machine::facts(&twilld);
    let progress = Progress::new();
    let ctx = Context {
        opts,
        progress: &progress,
    };

    let wanted: Vec<Which> = if opts.which == Which::All {
        Which::EACH.to_vec()
    } else {
        vec![opts.which]
    };
    let mut sections = Vec::new();
    let mut failures = Vec::new();
    for which in wanted {
        let bench = match benchmark(which) {
            Ok(b) => b,
            Err(why) if opts.which == Which::All => {
                progress.note(&format!("bench {}: skipped: {why}", which.as_str()));
                sections.push(Section {
                    name: which.as_str().into(),
                    title: format!("{} (not measured)", which.as_str()),
                    notes: vec![format!("skipped: {why}")],
                    ..Section::default()
                });
                continue;
            }
            Err(why) => bail!("`bench {}` is not available yet: {why}", which.as_str()),
        };
        match bench.run(&ctx) {
            Ok(section) => sections.push(section),
            Err(e) if twill_tests::interrupted() => return Err(e),
            Err(e) => {
                progress.note(&format!("bench {} failed: {e:#}", bench.name()));
                failures.push(format!("{}: {e:#}", bench.name()));
            }
        }
    }

    for section in &mut sections {
        for plot in &section.plots {
            plot::render(plot, &dir)?;
            section.plot_files.push(plot.file().to_string());
        }
    }
    let report = Report {
        schema: SCHEMA,
        started_utc: machine::rfc3339(started),
        duration_s: clock.elapsed().as_secs_f64(),
        command: opts.command.clone(),
        options: serde_json::to_value(opts)?,
        machine,
        sections,
    };
    write_report(&report, &dir)?;
    print!("\n{}", report.to_terminal());
    println!("report: {}", dir.join("report.md").display());

    if !failures.is_empty() {
        bail!("benchmark(s) failed:\n{}", failures.join("\n"));
    }
    let insane = report.sanity_errors();
    if !insane.is_empty() {
        bail!("the figures are not sane:\n{}", insane.join("\n"));
    }
    Ok(Outcome { dir, report })
}

/// The last `n` lines of a twilld log worth reading in an error: ANSI colours removed, and
/// without the lines of a backtrace (with `RUST_BACKTRACE` set, an agent that fails to start
/// ends its log with dozens of frames that would push the error itself out of the tail).
pub fn log_tail(text: &str, n: usize) -> String {
    let mut lines: Vec<String> = Vec::new();
    let mut in_backtrace = false;
    for line in text.lines() {
        let plain = strip_ansi(line);
        let t = plain.trim_start();
        if t.starts_with("Stack backtrace:") {
            in_backtrace = true;
            continue;
        }
        if t.starts_with("====") {
            in_backtrace = false;
        }
        let frame = t
            .split_once(": ")
            .is_some_and(|(num, _)| !num.is_empty() && num.bytes().all(|b| b.is_ascii_digit()))
            || t.starts_with("at ");
        if in_backtrace && (frame || t.is_empty()) {
            continue;
        }
        in_backtrace = false;
        lines.push(plain);
    }
    while lines.last().is_some_and(|l| l.trim().is_empty()) {
        lines.pop();
    }
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The last line of a twilld log saying its service loop cannot program (a failed list of the
/// store, a failed apply, the loop stopped), without colours; `None` when there is none. A
/// benchmark waiting for services to be programmed stops at such a line instead of waiting out
/// its timeout: twilld retries forever, so the wait could never end well.
pub fn service_failure(log: &str) -> Option<String> {
    const SIGNS: [&str; 3] = [
        "listing services failed",
        "service dataplane sync failed",
        "service loop stopped",
    ];
    log.lines()
        .rev()
        .find(|l| SIGNS.iter().any(|s| l.contains(s)))
        .map(strip_ansi)
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Writes `report.md` and `results.json` into `dir`.
pub fn write_report(report: &Report, dir: &Path) -> Result<()> {
    let md = dir.join("report.md");
    std::fs::write(&md, report.to_markdown()).with_context(|| format!("write {}", md.display()))?;
    let json = dir.join("results.json");
    let text = serde_json::to_string_pretty(report)?;
    std::fs::write(&json, text + "\n").with_context(|| format!("write {}", json.display()))
}

/// The twilld binary the rigs will run (checked to exist, so a missing build fails up front).
pub(crate) fn twilld_path(bin_dir: Option<&Path>) -> Result<PathBuf> {
    let dir = match (bin_dir, std::env::var_os("TWILL_BIN_DIR")) {
        (Some(d), _) => d.to_path_buf(),
        (None, Some(d)) => PathBuf::from(d),
        (None, None) => {
            let exe = std::env::current_exe().context("locate the running executable")?;
            let dir = exe.parent().context("executable has no directory")?;
            if dir.file_name().is_some_and(|n| n == "deps") {
                dir.parent().context("deps has no parent")?.to_path_buf()
            } else {
                dir.to_path_buf()
            }
        }
    };
    let path = dir.join("twilld");
    if !path.is_file() {
        bail!(
            "twilld not found at {}: build it (cargo build --release -p twill-agent --bin twilld)",
            path.display()
        );
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_tails_skip_backtraces_and_colours() {
        let log = "==== twill-rig: starting twilld\n\
                   \u{1b}[2m2026\u{1b}[0m \u{1b}[31mERROR\u{1b}[0m pin link /x/tc_flannel.1_in\n\
                   Error: start the service proxy\n\nCaused by:\n    pin link: EPERM\n\n\
                   Stack backtrace:\n   0: anyhow::error\n             at /src/x.rs:1:1\n\
                   \n  32: _start\n";
        let t = super::log_tail(log, 4);
        assert_eq!(
            t,
            "Error: start the service proxy\n\nCaused by:\n    pin link: EPERM"
        );
        assert!(super::log_tail(log, 10).contains("2026 ERROR pin link"));
    }

    #[test]
    fn spots_a_service_loop_that_cannot_program() {
        let log = "x INFO service dataplane read back frontends=0\n\
                   \u{1b}[33m WARN\u{1b}[0m listing services failed; keeping the dataplane as it \
                   is error=etcd get /p/services/: decoded message length too large\n";
        let why = super::service_failure(log).unwrap();
        assert!(why.starts_with(" WARN listing services failed"), "{why}");
        assert!(why.contains("too large"));
        assert_eq!(super::service_failure("x INFO all good\n"), None);
    }
}
