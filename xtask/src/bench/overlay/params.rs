//! The benchmark's targets, durations and the shapes of its samples.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde::Serialize;

use crate::cluster::Backend;

/// How long a rig gets to converge (subnet files, first ping).
pub(crate) const UP: Duration = Duration::from_secs(30);
/// How long one lease gets to be programmed before it counts as a timeout.
pub(crate) const LEASE_DEADLINE: Duration = Duration::from_secs(5);
/// The gap between pings.
pub(crate) const PING_INTERVAL: Duration = Duration::from_millis(10);

/// Throughput targets (twill / its kernel baseline) per backend.
pub(crate) fn target(backend: Backend) -> f64 {
    match backend {
        Backend::Vxlan => 0.97,
        Backend::HostGw => 0.98,
        Backend::Udp => 0.70,
    }
}

/// The lease-to-programmed p99 target, ms.
pub(crate) const LEASE_P99_TARGET_MS: f64 = 100.0;

/// Durations and counts, full or `--quick`.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Params {
    pub(crate) reps: usize,
    pub(crate) iperf_secs: u32,
    pub(crate) ping_count: u32,
    pub(crate) ping_interval_ms: u64,
    pub(crate) leases: usize,
}

impl Params {
    pub(crate) fn new(quick: bool, reps: usize) -> Self {
        Params {
            reps,
            iperf_secs: if quick { 1 } else { 5 },
            ping_count: if quick { 50 } else { 500 },
            ping_interval_ms: u64::try_from(PING_INTERVAL.as_millis()).expect("small"),
            leases: if quick { 20 } else { 200 },
        }
    }
}

/// Who programmed the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Plane {
    Twill,
    Kernel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Test {
    Tcp1,
    Tcp2,
    Ping,
}

impl Test {
    pub(crate) const ALL: [Test; 3] = [Test::Tcp1, Test::Tcp2, Test::Ping];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Test::Tcp1 => "TCP 1 stream",
            Test::Tcp2 => "TCP -P 2",
            Test::Ping => "ping",
        }
    }
}

/// A pod subnet, `(network address, prefix length)`.
pub(crate) type Subnet = (Ipv4Addr, u8);

/// The samples of one configuration, one entry per repetition (RTTs pooled).
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Samples {
    pub(crate) tcp1_gbps: Vec<f64>,
    pub(crate) tcp2_gbps: Vec<f64>,
    /// CPU-seconds per GB moved, per repetition (see [`IperfRun`]).
    #[serde(default)]
    pub(crate) tcp1_cpu_s_per_gb: Vec<f64>,
    #[serde(default)]
    pub(crate) tcp2_cpu_s_per_gb: Vec<f64>,
    pub(crate) ping_avg_ms: Vec<f64>,
    pub(crate) ping_p99_ms: Vec<f64>,
    pub(crate) ping_lost: u32,
    pub(crate) rtts_ms: Vec<f64>,
}

/// Lease-to-programmed samples of one backend.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct LeaseSamples {
    pub(crate) backend: String,
    pub(crate) add_ms: Vec<f64>,
    pub(crate) del_ms: Vec<f64>,
    pub(crate) add_timeouts: usize,
    pub(crate) del_timeouts: usize,
}
