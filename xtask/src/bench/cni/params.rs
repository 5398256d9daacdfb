//! The benchmark's targets, counts, the plugins compared and the shapes of the samples.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// Debian's containernetworking-plugins.
pub(crate) const REFERENCE_DIR: &str = "/usr/lib/cni";
/// What podman 4.3 writes, and what the reference plugins 1.1.1 answer.
pub(crate) const CNI_VERSION: &str = "0.4.0";
/// A plugin still running after this is killed and the run fails.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Pods started at once in the concurrent phase.
pub(crate) const CONCURRENCY: usize = 100;
/// Target: twill's ADD p50 at most this fraction of the reference's.
pub(crate) const ADD_RATIO_TARGET: f64 = 0.5;
/// Target: p99 of 100 concurrent twill ADDs, ms.
pub(crate) const CONCURRENT_P99_TARGET_MS: f64 = 20.0;

/// Counts, full or `--quick`.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Params {
    pub(crate) reps: usize,
    /// Pods per repetition in the one-at-a-time phase.
    pub(crate) pods: usize,
    /// Pods in each concurrent batch.
    pub(crate) concurrency: usize,
    /// CPUs this process may run on (what the concurrent batches share).
    pub(crate) cpus: usize,
}

impl Params {
    pub(crate) fn new(quick: bool, reps: usize) -> Self {
        Params {
            reps,
            pods: if quick { 10 } else { 50 },
            concurrency: CONCURRENCY,
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
        }
    }
}

/// What is exec'ed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Plugin {
    /// twill-cni, bridge mode (the default).
    Twill,
    /// twill-cni, routed mode.
    Routed,
    /// `bridge` + `host-local`.
    Reference,
    /// `/bin/true`: process start and nothing else.
    Floor,
}

impl Plugin {
    /// The one-at-a-time phase, in rotation order.
    pub(crate) const SEQUENTIAL: [Plugin; 4] = [
        Plugin::Twill,
        Plugin::Routed,
        Plugin::Reference,
        Plugin::Floor,
    ];
    /// The concurrent phase.
    pub(crate) const CONCURRENT: [Plugin; 3] = [Plugin::Twill, Plugin::Reference, Plugin::Floor];

    /// Metric name component.
    pub(crate) fn key(self) -> &'static str {
        match self {
            Plugin::Twill => "twill",
            Plugin::Routed => "twill_routed",
            Plugin::Reference => "reference",
            Plugin::Floor => "exec_floor",
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            Plugin::Twill => "twill-cni (bridge)",
            Plugin::Routed => "twill-cni (routed)",
            Plugin::Reference => "reference bridge + host-local",
            Plugin::Floor => "exec of /bin/true (floor)",
        }
    }

    pub(crate) fn ifname(self) -> &'static str {
        match self {
            Plugin::Twill => "eth1",
            Plugin::Routed => "eth2",
            Plugin::Reference | Plugin::Floor => "eth3",
        }
    }

    /// Whether it does CNI (and its results are checked).
    pub(crate) fn is_cni(self) -> bool {
        self != Plugin::Floor
    }
}

/// A CNI command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cmd {
    Add,
    Del,
}

impl Cmd {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Cmd::Add => "ADD",
            Cmd::Del => "DEL",
        }
    }
}

/// Latencies of one plugin, and the CPU time each call used, ms.
#[derive(Debug, Clone, Default, Serialize)]
#[expect(
    clippy::struct_field_names,
    reason = "the unit belongs in every name: they are the keys in results.json"
)]
pub(crate) struct Samples {
    pub(crate) add_ms: Vec<f64>,
    pub(crate) del_ms: Vec<f64>,
    /// Per call, in 10 ms ticks (see [`children_cpu_ms`]): only means over many calls count.
    pub(crate) add_cpu_ms: Vec<f64>,
    pub(crate) del_cpu_ms: Vec<f64>,
}

/// Concurrent batches: per-call latencies, and per batch the makespan (first spawn to last
/// exit) and the CPU time all its processes used together, ms.
#[derive(Debug, Clone, Default, Serialize)]
#[expect(
    clippy::struct_field_names,
    reason = "the unit belongs in every name: they are the keys in results.json"
)]
pub(crate) struct Batches {
    pub(crate) add_ms: Vec<f64>,
    pub(crate) del_ms: Vec<f64>,
    pub(crate) add_makespan_ms: Vec<f64>,
    pub(crate) del_makespan_ms: Vec<f64>,
    pub(crate) add_cpu_ms: Vec<f64>,
    pub(crate) del_cpu_ms: Vec<f64>,
}

/// Everything measured.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Results {
    pub(crate) sequential: BTreeMap<Plugin, Samples>,
    pub(crate) concurrent: BTreeMap<Plugin, Batches>,
}
