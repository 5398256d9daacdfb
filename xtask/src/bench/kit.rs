//! What every benchmark shares: which ones exist, the run's options, the context a benchmark
//! gets, and the trait it implements.

use std::path::PathBuf;

use anyhow::{Result, ensure};
use clap::ValueEnum;
use serde::Serialize;

use super::progress::Progress;
use super::report::Section;
use crate::cluster::{Backend, ProxyMode};

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
    /// twilld's DNS server vs dnsmasq on the same names: queries/s and p99 latency.
    Dns,
    /// Everything that exists.
    All,
}

impl Which {
    /// The single benchmarks, in the order `all` runs them.
    pub const EACH: [Which; 5] = [
        Which::Overlay,
        Which::Services,
        Which::Cni,
        Which::ControlPlane,
        Which::Dns,
    ];

    /// Whether it reads `--backend` (the control-plane benchmark runs one of them too).
    pub fn uses_backend(self) -> bool {
        matches!(self, Which::Overlay | Which::ControlPlane | Which::All)
    }

    /// Whether it reads `--mode`.
    pub fn uses_mode(self) -> bool {
        matches!(self, Which::Services | Which::All)
    }

    /// The command-line name.
    pub fn as_str(self) -> &'static str {
        match self {
            Which::Overlay => "overlay",
            Which::Services => "services",
            Which::Cni => "cni",
            Which::ControlPlane => "control-plane",
            Which::Dns => "dns",
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

/// One benchmark (its name is that of its [`Which`]).
pub trait Benchmark {
    /// Measures; a section for the report. Errors only when it could not measure.
    fn run(&self, ctx: &Context<'_>) -> Result<Section>;
}

/// `chosen` in order and without repeats; an error naming `what` when that leaves nothing.
pub(crate) fn selection<T: Ord + Copy>(
    chosen: impl IntoIterator<Item = T>,
    what: &str,
) -> Result<Vec<T>> {
    let mut all: Vec<T> = chosen.into_iter().collect();
    all.sort();
    all.dedup();
    ensure!(!all.is_empty(), "no {what} selected");
    Ok(all)
}
