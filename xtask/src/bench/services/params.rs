//! The benchmark's targets, counts and the shapes of its samples.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

/// The services' namespace (Kubernetes').
pub(crate) const NAMESPACE: &str = "bench";
/// The Service port every VIP listens on.
pub(crate) const PORT: u16 = 80;
/// The backends' port behind the VIPs.
pub(crate) const VIP_TARGET_PORT: u16 = 8080;
/// The backends' port the direct measurement uses.
pub(crate) const DIRECT_PORT: u16 = 8081;
/// Endpoints per filler service.
pub(crate) const ENDPOINTS: usize = 10;
/// A second etcd prefix holding the sync step's services with one endpoint each (kube-proxy's
/// common shape, and that of the hand-written baselines), synced in full by fresh twillds
/// pointed at it.
pub(crate) const ONE_ENDPOINT_PREFIX: &str = "/twill-bench-one-endpoint";
/// How long a connection-rate run may take beyond its length.
pub(crate) const RUN_SLACK: Duration = Duration::from_secs(30);
/// How long the agent gets to program a step's services.
pub(crate) const PROGRAM_TIMEOUT: Duration = Duration::from_mins(10);
/// How long one endpoint change gets to show up before it counts as lost.
pub(crate) const CHANGE_DEADLINE: Duration = Duration::from_secs(5);

/// Targets of the eBPF and nftables modes (the iptables one is [`IPT_FULL_SYNC_TARGET_S`]).
pub(crate) const EBPF_SCALE_TARGET: f64 = 0.97;
pub(crate) const EBPF_VIP_DIRECT_TARGET: f64 = 0.95;
pub(crate) const EBPF_FULL_SYNC_TARGET_S: f64 = 0.5;
pub(crate) const EBPF_CHANGE_P99_TARGET_MS: f64 = 10.0;
pub(crate) const NFT_SCALE_TARGET: f64 = 0.95;
pub(crate) const NFT_CHANGE_P99_TARGET_MS: f64 = 20.0;
pub(crate) const IPT_FULL_SYNC_TARGET_S: f64 = 0.5;

/// Counts and durations, full or `--quick`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Params {
    /// Repetitions of the full syncs.
    pub(crate) reps: usize,
    /// Connection-rate runs per step (twice the repetitions), each taking the VIP and the pod IP
    /// in turn, connection by connection.
    pub(crate) runs: usize,
    /// Services installed at each step (the last is where one-change latency is measured).
    pub(crate) steps: Vec<usize>,
    /// The step whose services a fresh twilld syncs in full.
    pub(crate) sync_step: usize,
    /// Length of one connection-rate run, s.
    pub(crate) rate_secs: f64,
    /// Endpoint changes timed.
    pub(crate) changes: usize,
    /// Services in the hand-written baselines.
    pub(crate) baseline_services: usize,
}

impl Params {
    pub(crate) fn new(quick: bool, reps: usize) -> Self {
        if quick {
            Params {
                reps,
                runs: 2 * reps,
                steps: vec![1, 30, 100],
                sync_step: 30,
                rate_secs: 0.4,
                changes: 6,
                baseline_services: 100,
            }
        } else {
            Params {
                reps,
                runs: 2 * reps,
                steps: vec![1, 10_000, 30_000],
                sync_step: 10_000,
                rate_secs: 2.0,
                changes: 200,
                baseline_services: 10_000,
            }
        }
    }
}

// ---- samples ------------------------------------------------------------------------------

/// What `twill-probe rate` prints.
#[derive(Debug, Clone, serde::Deserialize)]
pub(crate) struct RateRun {
    pub(crate) targets: Vec<TargetRun>,
}

/// One address's share of a `twill-probe rate` run.
#[derive(Debug, Clone, serde::Deserialize)]
pub(crate) struct TargetRun {
    pub(crate) addr: SocketAddr,
    pub(crate) ok: u64,
    pub(crate) failed: u64,
    /// Connections over the time spent on them.
    pub(crate) rate: f64,
    pub(crate) first_error: Option<String>,
    pub(crate) lat_us: Vec<f64>,
}

/// One step (a number of services) of one mode.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Step {
    pub(crate) services: usize,
    /// Fresh connections/s per run at the run's median connection latency (1 / p50): the rate
    /// the path sustains while the CPU is available. Scheduler stalls of tens of milliseconds on
    /// this shared machine land on random connections and dominate a mean, not a median.
    pub(crate) vip: Vec<f64>,
    pub(crate) direct: Vec<f64>,
    /// Fresh connections/s per run as measured: connections over the time spent on them,
    /// stalls included.
    pub(crate) vip_measured: Vec<f64>,
    pub(crate) direct_measured: Vec<f64>,
    /// Connection latencies, µs (sampled).
    pub(crate) vip_lat_us: Vec<f64>,
    pub(crate) direct_lat_us: Vec<f64>,
    pub(crate) failed: u64,
    /// From the first filler write to every frontend programmed, s (through the watch).
    pub(crate) programmed_s: Option<f64>,
}

/// Everything measured for one mode.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct ModeResult {
    pub(crate) mode: String,
    pub(crate) steps: Vec<Step>,
    /// The last step again after deleting the fillers (only the measured services remain):
    /// what state left behind by the run, rather than the number of services, does.
    pub(crate) after: Option<Step>,
    /// First full sync of a fresh twilld (agent's histogram), s.
    pub(crate) full_sync_s: Vec<f64>,
    /// Fresh twilld started → every frontend programmed, s.
    pub(crate) start_to_programmed_s: Vec<f64>,
    /// Why the full sync could not be measured, if it could not.
    pub(crate) full_sync_error: Option<String>,
    /// Frontends and backends the full syncs programmed.
    pub(crate) full_sync_frontends: f64,
    pub(crate) full_sync_backends: f64,
    /// The same with one endpoint per service (agent's histogram), s.
    pub(crate) full_sync_one_s: Vec<f64>,
    /// Fresh twilld started → every frontend programmed, one endpoint per service, s.
    pub(crate) start_to_programmed_one_s: Vec<f64>,
    /// One endpoint change: the agent's plan + apply, ms.
    pub(crate) change_agent_ms: Vec<f64>,
    /// ... etcd write → the client's connections reach the new backend, ms.
    pub(crate) change_e2e_ms: Vec<f64>,
    /// Changes not seen within the deadline.
    pub(crate) change_lost: usize,
    /// Failed connections of the follower while endpoints changed.
    pub(crate) change_glitches: usize,
}

/// The hand-written rules.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct BaselineResult {
    pub(crate) services: usize,
    /// `nft -f` of the whole table, s.
    pub(crate) nft_load_s: f64,
    /// `nft -f` adding one service to it, ms.
    pub(crate) nft_add_one_ms: Vec<f64>,
    pub(crate) nft: Step,
    /// `iptables-legacy-restore` of the nat table, s.
    pub(crate) ipt_load_s: f64,
    pub(crate) ipt: Step,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub(crate) enum ModeOutcome {
    Measured(Box<ModeResult>),
    Unavailable { mode: String, reason: String },
}
