//! `bench services`: what a connection to a Service VIP costs in each proxy mode as the number
//! of services grows, against the same connection to the backend's pod IP, and how long the
//! agent takes to program all services and one change — with the hand-written kernel rules of
//! ENVIRONMENT.md (an nft verdict map, iptables-legacy chains) measured in the same run.
//!
//! Why it is shaped as it is:
//! - Per proxy mode one rig of its own: node 1 hosts the backends (pods `a` and `b`, made by
//!   twill-cni, each a `twill-probe serve` answering its name on :8080 and :8081), node 2 the
//!   client pod and the only twilld with a service proxy, so every figure is that node's
//!   dataplane, not two agents' share of two cores. `--resync-interval 3600`: no periodic full
//!   resync disturbs a measurement. Extra nodes (one per repetition) exist only to start a
//!   fresh twilld whose first full sync is timed.
//! - The client is `twill-probe rate`: fresh TCP connections one at a time, the server closing
//!   first (the client never runs out of ports), run inside the client pod *and* node 2's cgroup
//!   (the eBPF socket-level load balancer sees it, as it sees a real pod's processes). The VIP
//!   goes to `a:8080`, the direct measurement to `a:8081`: mixing both on one port would make
//!   the server's TIME_WAIT sockets reject SYNs whose timestamps come from another offset (PAWS).
//! - The measured service is the last one matched: at every step a new service is created
//!   *after* the fillers, with the name that sorts last and the highest VIP, so a linear
//!   dataplane (iptables) meets it after all the others whatever order it keeps. Fillers (10
//!   endpoints each, addresses nothing answers on) are written straight into etcd in 128-object
//!   transactions; 30k `twilld apply` calls would take longer than the measurement.
//! - Repetitions interleave VIP and direct (alternating which goes first), and figures are
//!   medians; a VIP/direct ratio is the median of the per-repetition pairs. "Rate at N / rate
//!   at 1" compares medians of different steps of one run (the direct figures show how much
//!   the machine drifted meanwhile).
//! - Sync times come from the agent: `twill_services_sync_duration_seconds` (its histogram's sum
//!   and count, read from /metrics before and after) is the time to plan and apply; the time
//!   from the etcd write until the client's connections land on the new backend (`twill-probe
//!   follow`, timestamped as its lines arrive) is the end-to-end figure.
//! - A mode the twilld in use does not accept (the nftables and iptables dataplanes come from
//!   another branch) is reported "unavailable" with twilld's own words, never as a zero.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Serialize;
use twill_tests::bench_support::{EtcdHttp, LineMonitor, output_within, prometheus_value};
use twill_tests::ns::{http_get, in_netns};
use twill_tests::rig::{ETCD_PREFIX, UNDERLAY_V4};
use twill_tests::{Pod, Rig, RigOptions, run, wait_for};

use super::plot::{Bar, BarChart, BarSeries, CdfChart, Line, LineChart, Plot};
use super::progress::Progress;
use super::report::{Check, Metric, Section, Table, fmt_num};
use super::stats::{Summary, median, sorted};
use super::{Backend, Benchmark, Context};
use crate::cluster::{METRICS_ADDR, ProxyMode, check_proxy_mode, pod_command};

/// The services' namespace (Kubernetes').
const NAMESPACE: &str = "bench";
/// The Service port every VIP listens on.
const PORT: u16 = 80;
/// The backends' port behind the VIPs.
const VIP_TARGET_PORT: u16 = 8080;
/// The backends' port the direct measurement uses.
const DIRECT_PORT: u16 = 8081;
/// Endpoints per filler service.
const ENDPOINTS: usize = 10;
/// A second etcd prefix holding the sync step's services with one endpoint each (kube-proxy's
/// common shape, and that of the hand-written baselines), synced in full by fresh twillds
/// pointed at it.
const ONE_ENDPOINT_PREFIX: &str = "/twill-bench-one-endpoint";
/// How long a connection-rate run may take beyond its length.
const RUN_SLACK: Duration = Duration::from_secs(30);
/// How long the agent gets to program a step's services.
const PROGRAM_TIMEOUT: Duration = Duration::from_mins(10);
/// How long one endpoint change gets to show up before it counts as lost.
const CHANGE_DEADLINE: Duration = Duration::from_secs(5);

/// Targets from issues 4 (eBPF) and 5 (nftables, iptables).
const EBPF_SCALE_TARGET: f64 = 0.97;
const EBPF_VIP_DIRECT_TARGET: f64 = 0.95;
const EBPF_FULL_SYNC_TARGET_S: f64 = 0.5;
const EBPF_CHANGE_P99_TARGET_MS: f64 = 10.0;
const NFT_SCALE_TARGET: f64 = 0.95;
const NFT_CHANGE_P99_TARGET_MS: f64 = 20.0;
const IPT_FULL_SYNC_TARGET_S: f64 = 0.5;

/// The services benchmark.
#[derive(Debug, Clone, Copy)]
pub struct Services;

/// Counts and durations, full or `--quick`.
#[derive(Debug, Clone, Serialize)]
struct Params {
    /// Repetitions of the full syncs.
    reps: usize,
    /// Connection-rate runs per step (twice the repetitions), each taking the VIP and the pod IP
    /// in turn, connection by connection.
    runs: usize,
    /// Services installed at each step (the last is where one-change latency is measured).
    steps: Vec<usize>,
    /// The step whose services a fresh twilld syncs in full.
    sync_step: usize,
    /// Length of one connection-rate run, s.
    rate_secs: f64,
    /// Endpoint changes timed.
    changes: usize,
    /// Services in the hand-written baselines.
    baseline_services: usize,
}

impl Params {
    fn new(quick: bool, reps: usize) -> Self {
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

// ---- the objects --------------------------------------------------------------------------

/// Filler `i`'s name, VIP and endpoints: VIPs from 10.100.0.0 up, endpoints in 100.64.0.0/10
/// (addresses no rig namespace has: nothing is ever sent to them).
fn filler(i: usize) -> (String, Ipv4Addr, Vec<Ipv4Addr>) {
    let i32_ = u32::try_from(i).expect("fewer than 2^32 services");
    let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + i32_ + 1);
    let base = u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i32_ * 16;
    let eps = (0..ENDPOINTS)
        .map(|j| Ipv4Addr::from(base + u32::try_from(j).expect("few endpoints") + 1))
        .collect();
    (format!("f-{i:05}"), vip, eps)
}

/// The measured service of step `k`: the name that sorts after every filler, and the highest
/// VIP of the range — the same VIP at every step (the previous step's service is deleted
/// first). Through a DNAT dataplane, a client reaching one backend through two VIPs from the
/// same source port within the backend's TIME_WAIT (60 s) has its SYN refused by PAWS: Linux
/// derives a connection's TCP timestamp offset from its destination address, the VIP, so the
/// two VIPs' timestamps are unrelated, and each refused SYN costs the client ~10 ms. At
/// thousands of connections a second that is a quarter of the connections; a step that
/// measured a new VIP would measure that, not the dataplane. (Socket-level load balancing is
/// immune: the socket is connected to the backend itself.)
fn measured(k: usize) -> (String, Ipv4Addr) {
    (format!("zz-measured-{k}"), Ipv4Addr::new(10, 111, 255, 200))
}

fn service_key(name: &str) -> String {
    service_key_at(ETCD_PREFIX, name)
}

fn service_key_at(prefix: &str, name: &str) -> String {
    format!("{prefix}/services/services/{NAMESPACE}/{name}")
}

fn slice_key(name: &str) -> String {
    slice_key_at(ETCD_PREFIX, name)
}

fn slice_key_at(prefix: &str, name: &str) -> String {
    format!("{prefix}/services/endpointslices/{NAMESPACE}/{name}-1")
}

/// A ClusterIP Service as stored (Kubernetes JSON).
fn service_json(name: &str, vip: Ipv4Addr) -> String {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": vip.to_string(),
            "ports": [{"name": "http", "protocol": "TCP", "port": PORT, "targetPort": VIP_TARGET_PORT}],
        },
    })
    .to_string()
}

/// Its EndpointSlice: every address ready.
fn slice_json(name: &str, endpoints: &[Ipv4Addr]) -> String {
    let eps: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|a| serde_json::json!({"addresses": [a.to_string()], "conditions": {"ready": true}}))
        .collect();
    serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{name}-1"),
            "namespace": NAMESPACE,
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "http", "protocol": "TCP", "port": VIP_TARGET_PORT}],
    })
    .to_string()
}

/// The etcd entries of fillers `from..to`.
pub(crate) fn filler_entries(from: usize, to: usize) -> Vec<(String, String)> {
    let mut kvs = Vec::with_capacity(2 * (to - from));
    for i in from..to {
        let (name, vip, eps) = filler(i);
        kvs.push((service_key(&name), service_json(&name, vip)));
        kvs.push((slice_key(&name), slice_json(&name, &eps)));
    }
    kvs
}

/// Fillers `0..n` with their first endpoint only, under `prefix`.
fn one_endpoint_entries(prefix: &str, n: usize) -> Vec<(String, String)> {
    (0..n)
        .flat_map(|i| {
            let (name, vip, eps) = filler(i);
            [
                (service_key_at(prefix, &name), service_json(&name, vip)),
                (slice_key_at(prefix, &name), slice_json(&name, &eps[..1])),
            ]
        })
        .collect()
}

fn etcd() -> EtcdHttp {
    EtcdHttp {
        addr: SocketAddr::from((UNDERLAY_V4, 2379)),
    }
}

// ---- samples ------------------------------------------------------------------------------

/// What `twill-probe rate` prints.
#[derive(Debug, Clone, serde::Deserialize)]
struct RateRun {
    targets: Vec<TargetRun>,
}

/// One address's share of a `twill-probe rate` run.
#[derive(Debug, Clone, serde::Deserialize)]
struct TargetRun {
    addr: SocketAddr,
    ok: u64,
    failed: u64,
    /// Connections over the time spent on them.
    rate: f64,
    first_error: Option<String>,
    lat_us: Vec<f64>,
}

/// One step (a number of services) of one mode.
#[derive(Debug, Clone, Default, Serialize)]
struct Step {
    services: usize,
    /// Fresh connections/s per run at the run's median connection latency (1 / p50): the rate
    /// the path sustains while the CPU is available. Scheduler stalls of tens of milliseconds on
    /// this shared machine land on random connections and dominate a mean, not a median.
    vip: Vec<f64>,
    direct: Vec<f64>,
    /// Fresh connections/s per run as measured: connections over the time spent on them,
    /// stalls included.
    vip_measured: Vec<f64>,
    direct_measured: Vec<f64>,
    /// Connection latencies, µs (sampled).
    vip_lat_us: Vec<f64>,
    direct_lat_us: Vec<f64>,
    failed: u64,
    /// From the first filler write to every frontend programmed, s (through the watch).
    programmed_s: Option<f64>,
}

/// Everything measured for one mode.
#[derive(Debug, Clone, Default, Serialize)]
struct ModeResult {
    mode: String,
    steps: Vec<Step>,
    /// The last step again after deleting the fillers (only the measured services remain):
    /// what state left behind by the run, rather than the number of services, does.
    after: Option<Step>,
    /// First full sync of a fresh twilld (agent's histogram), s.
    full_sync_s: Vec<f64>,
    /// Fresh twilld started → every frontend programmed, s.
    start_to_programmed_s: Vec<f64>,
    /// Why the full sync could not be measured, if it could not.
    full_sync_error: Option<String>,
    /// Frontends and backends the full syncs programmed.
    full_sync_frontends: f64,
    full_sync_backends: f64,
    /// The same with one endpoint per service (agent's histogram), s.
    full_sync_one_s: Vec<f64>,
    /// Fresh twilld started → every frontend programmed, one endpoint per service, s.
    start_to_programmed_one_s: Vec<f64>,
    /// One endpoint change: the agent's plan + apply, ms.
    change_agent_ms: Vec<f64>,
    /// ... etcd write → the client's connections reach the new backend, ms.
    change_e2e_ms: Vec<f64>,
    /// Changes not seen within the deadline.
    change_lost: usize,
    /// Failed connections of the follower while endpoints changed.
    change_glitches: usize,
}

/// The hand-written rules.
#[derive(Debug, Clone, Default, Serialize)]
struct BaselineResult {
    services: usize,
    /// `nft -f` of the whole table, s.
    nft_load_s: f64,
    /// `nft -f` adding one service to it, ms.
    nft_add_one_ms: Vec<f64>,
    nft: Step,
    /// `iptables-legacy-restore` of the nat table, s.
    ipt_load_s: f64,
    ipt: Step,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
enum ModeOutcome {
    Measured(Box<ModeResult>),
    Unavailable { mode: String, reason: String },
}

// ---- the rig ------------------------------------------------------------------------------

/// twilld's proxy flags for `mode` on `node`. iptables runs on the legacy backend, the one its
/// target is for (`--iptables-backend auto` would take iptables-nft here, what
/// `iptables --version` names on Debian).
fn proxy_args(rig: &Rig, node: usize, mode: ProxyMode) -> Result<Vec<String>> {
    let mut args = rig.proxy_args(node, mode.as_str())?;
    if mode == ProxyMode::Iptables {
        args.extend(["--iptables-backend".to_string(), "legacy".to_string()]);
    }
    Ok(args)
}

/// A mode's rig: backends on node 1, the client and the proxy on node 2.
struct Bench {
    rig: Rig,
    mode: ProxyMode,
    client: Pod,
    a: Pod,
    b: Pod,
    probe: String,
    rate_secs: f64,
}

impl Bench {
    /// `mode` = `None` builds the baselines' rig: no service proxy anywhere.
    fn new(
        mode: ProxyMode,
        extra_nodes: usize,
        rate_secs: f64,
        bin_dir: Option<PathBuf>,
    ) -> Result<Self> {
        let rig = Rig::with_options(RigOptions {
            nodes: 2 + extra_nodes,
            bin_dir,
            ..RigOptions::default()
        })?;
        rig.put_network_config(&Backend::HostGw.network_config())?;
        let start = |node: usize| -> Result<()> {
            let mut args = vec![
                "--metrics-addr".to_string(),
                METRICS_ADDR.to_string(),
                "--resync-interval".to_string(),
                "3600".to_string(),
            ];
            if node == 2 && mode != ProxyMode::None {
                args.extend(proxy_args(&rig, node, mode)?);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            rig.start_twilld(node, &args)
        };
        start(1)?;
        start(2)?;
        rig.wait_subnet_file(1, Duration::from_secs(30))?;
        rig.wait_subnet_file(2, Duration::from_secs(30))?;
        // Connection-tracking entries of closed connections linger 120 s by default: at
        // thousands of connections a second that fills the (machine-wide) table. The nodes'
        // own timeout, for every mode and baseline alike.
        for node in 1..=2 {
            let _ = twill_tests::ns::sysctl(
                &rig.node_ns(node),
                "net.netfilter.nf_conntrack_tcp_timeout_time_wait",
                "10",
            );
        }
        let a = rig.add_cni_pod(1)?;
        let b = rig.add_cni_pod(1)?;
        let client = rig.add_cni_pod(2)?;
        twill_tests::ns::sysctl(&client.ns, "net.ipv4.ip_local_port_range", "1024 65535")?;
        rig.start_responder(&a, "a", &[VIP_TARGET_PORT, DIRECT_PORT])?;
        rig.start_responder(&b, "b", &[VIP_TARGET_PORT, DIRECT_PORT])?;
        let probe = rig.binary("twill-probe")?.display().to_string();
        let bench = Bench {
            rig,
            mode,
            client,
            a,
            b,
            probe,
            rate_secs,
        };
        let direct = bench.direct();
        wait_for(Duration::from_secs(30), || bench.rate(&[direct], 0.05).ok())
            .with_context(|| format!("the client does not reach {direct}"))?;
        Ok(bench)
    }

    fn a_ip(&self) -> Ipv4Addr {
        self.a.ipv4.expect("CNI pods have IPv4")
    }

    fn b_ip(&self) -> Ipv4Addr {
        self.b.ipv4.expect("CNI pods have IPv4")
    }

    fn direct(&self) -> SocketAddr {
        SocketAddr::from((self.a_ip(), DIRECT_PORT))
    }

    /// One `twill-probe rate` run from the client (in node 2's cgroup with eBPF).
    fn rate(&self, addrs: &[SocketAddr], secs: f64) -> Result<Vec<TargetRun>> {
        let targets: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        let secs_arg = format!("{secs}");
        let mut args: Vec<&str> = vec![&self.probe, "rate"];
        args.extend(targets.iter().map(String::as_str));
        args.extend(["--secs", &secs_arg, "--expect", "a"]);
        let cmd = pod_command(&self.rig, &self.client, self.mode, &args)?;
        let what = format!(
            "twill-probe rate {} in {}",
            targets.join(" "),
            self.client.ns
        );
        let out = output_within(cmd, Duration::from_secs_f64(secs) + RUN_SLACK, &what)?;
        ensure!(
            out.status.success(),
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let run: RateRun = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("{what}: unreadable output"))?;
        for t in &run.targets {
            ensure!(
                t.ok > 0,
                "{what}: no connection to {} succeeded ({} failed: {})",
                t.addr,
                t.failed,
                t.first_error.as_deref().unwrap_or("?")
            );
        }
        Ok(run.targets)
    }

    /// Runs of connections to the VIP and the pod IP taken in turn, into `step` (after a short
    /// warm-up, not counted: the first connections after a change pay for cold caches).
    fn rates(
        &self,
        vip: SocketAddr,
        step: &mut Step,
        runs: usize,
        progress: &Progress,
        label: &str,
    ) -> Result<()> {
        self.rate(&[vip, self.direct()], self.rate_secs.min(0.5))?;
        for run in 0..runs {
            // Which goes first alternates too.
            let (addrs, vip_at) = if run % 2 == 0 {
                ([vip, self.direct()], 0)
            } else {
                ([self.direct(), vip], 1)
            };
            let what = format!("{label} run {}/{runs}", run + 1);
            progress.working(&what);
            let r = self.rate(&addrs, self.rate_secs)?;
            let (v, d) = (&r[vip_at], &r[1 - vip_at]);
            let (v_p50, d_p50) = (1e6 / median(&v.lat_us), 1e6 / median(&d.lat_us));
            progress.done(
                &what,
                &format!(
                    "VIP {} conn/s ({} at p50 latency), direct {} ({}) ({} failed)",
                    fmt_num(v.rate),
                    fmt_num(v_p50),
                    fmt_num(d.rate),
                    fmt_num(d_p50),
                    v.failed + d.failed
                ),
            );
            step.failed += v.failed + d.failed;
            step.vip.push(v_p50);
            step.direct.push(d_p50);
            step.vip_measured.push(v.rate);
            step.direct_measured.push(d.rate);
            step.vip_lat_us.extend(&v.lat_us);
            step.direct_lat_us.extend(&d.lat_us);
        }
        Ok(())
    }

    /// Node `node`'s twilld metrics.
    fn metrics(&self, node: usize) -> Result<String> {
        let addr: SocketAddr = METRICS_ADDR.parse().expect("a socket address");
        let resp = http_get(&self.rig.node_ns(node), addr, "/metrics")?;
        ensure!(
            resp.status == 200,
            "/metrics of node {node}: HTTP {}",
            resp.status
        );
        Ok(resp.body)
    }

    /// Waits until node `node` has at most `frontends` frontends programmed (after deletions).
    fn wait_programmed_at_most(
        &self,
        node: usize,
        frontends: usize,
        progress: &Progress,
        what: &str,
    ) -> Result<()> {
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let want = frontends as f64;
        let start = Instant::now();
        loop {
            let now = self
                .metrics(node)
                .ok()
                .and_then(|m| prometheus_value(&m, "twill_services_frontends"))
                .unwrap_or(f64::INFINITY);
            if now <= want {
                return Ok(());
            }
            if twill_tests::interrupted() {
                bail!("interrupted");
            }
            if start.elapsed() > PROGRAM_TIMEOUT {
                bail!("node {node} still has {now} frontends, not {frontends}");
            }
            progress.working(&format!("{what}: {now} frontends"));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until node `node` has programmed at least `frontends` frontends.
    fn wait_programmed(
        &self,
        node: usize,
        frontends: usize,
        progress: &Progress,
        what: &str,
    ) -> Result<Instant> {
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let want = frontends as f64;
        let start = Instant::now();
        let mut last_shown = Instant::now();
        let mut last_checked = Instant::now();
        loop {
            let now = self
                .metrics(node)
                .ok()
                .and_then(|m| prometheus_value(&m, "twill_services_frontends"))
                .unwrap_or(0.0);
            if now >= want {
                return Ok(Instant::now());
            }
            if twill_tests::interrupted() {
                bail!("interrupted");
            }
            if start.elapsed() > PROGRAM_TIMEOUT {
                bail!(
                    "node {node} programmed {now} of {frontends} frontends in {PROGRAM_TIMEOUT:?}; \
                     twilld's log ends:\n{}",
                    tail(&self.rig.twilld_log(node), 20)
                );
            }
            if last_shown.elapsed() > Duration::from_millis(500) {
                progress.working(&format!("{what}: {now}/{frontends} frontends"));
                last_shown = Instant::now();
            }
            if last_checked.elapsed() > Duration::from_secs(1) {
                last_checked = Instant::now();
                if !self.rig.twilld_running(node) {
                    bail!(
                        "twilld on node {node} exited; its log ends:\n{}",
                        tail(&self.rig.twilld_log(node), 20)
                    );
                }
                if let Some(why) = super::service_failure(&self.rig.twilld_log(node)) {
                    bail!("node {node} programmed {now} of {frontends} frontends; twilld: {why}");
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn tail(text: &str, n: usize) -> String {
    super::log_tail(text, n)
}

// ---- one mode -----------------------------------------------------------------------------

fn measure_mode(
    mode: ProxyMode,
    p: &Params,
    bin_dir: Option<PathBuf>,
    progress: &Progress,
) -> Result<ModeResult> {
    let what = format!("{mode}: rig");
    progress.working(&what);
    // A fresh node per full sync: two shapes per repetition.
    let b = Bench::new(mode, 2 * p.reps, p.rate_secs, bin_dir)?;
    progress.done(&what, &format!("up ({})", b.rig.id()));
    let mut res = ModeResult {
        mode: mode.to_string(),
        ..ModeResult::default()
    };
    let etcd = etcd();
    let underlay = b.rig.underlay_ns();
    let mut fillers = 0;
    let mut last_vip: Option<(String, SocketAddr)> = None;
    for (k, &n) in p.steps.iter().enumerate() {
        let label = format!("{mode} {n} svc");
        let what = format!("{label}: install");
        progress.working(&what);
        let want_fillers = n.saturating_sub(1);
        let (mname, mvip) = measured(k);
        let t0 = Instant::now();
        let kvs = filler_entries(fillers, want_fillers.max(fillers));
        let a_ip = b.a_ip();
        in_netns(&underlay, || {
            etcd.put_many(&kvs, 128, |done| {
                if done % 2048 < 128 {
                    progress.working(&format!("{what}: {done}/{} objects written", kvs.len()));
                }
            })?;
            // The measured service last (its VIP freed first), its endpoint the backend `a`.
            if let Some((previous, _)) = &last_vip {
                etcd.delete_prefix(&service_key(previous))?;
                etcd.delete_prefix(&slice_key(previous))?;
            }
            etcd.txn_put(&[
                (service_key(&mname), service_json(&mname, mvip)),
                (slice_key(&mname), slice_json(&mname, &[a_ip])),
            ])
        })?;
        fillers = want_fillers.max(fillers);
        let done = b.wait_programmed(2, n, progress, &what)?;
        let vip = SocketAddr::from((mvip, PORT));
        wait_for(Duration::from_secs(30), || b.rate(&[vip], 0.05).ok())
            .with_context(|| format!("the measured service {vip} does not answer"))?;
        progress.done(
            &what,
            &format!(
                "{n} services programmed {:.2} s after the first write",
                (done - t0).as_secs_f64()
            ),
        );
        let mut step = Step {
            services: n,
            programmed_s: (k > 0).then(|| (done - t0).as_secs_f64()),
            ..Step::default()
        };
        if n == p.sync_step
            && let Err(e) = full_syncs(&b, n, p.reps, &mut res, progress)
                .and_then(|()| one_endpoint_full_syncs(&b, n, p.reps, &mut res, progress))
        {
            if twill_tests::interrupted() {
                return Err(e);
            }
            progress.note(&format!("{mode}: full sync not measured: {e:#}"));
            res.full_sync_error = Some(format!("{e:#}"));
        }
        b.rates(vip, &mut step, p.runs, progress, &label)?;
        res.steps.push(step);
        last_vip = Some((mname, vip));
    }
    let (mname, vip) = last_vip.context("no step")?;
    one_change(&b, &mname, vip, p.changes, &mut res, progress)?;

    // Back to the measured service alone.
    let left = 1;
    let what = format!("{mode}: delete the fillers");
    progress.working(&what);
    in_netns(&underlay, || {
        // Every filler's Service and EndpointSlice ("f-<n>", "f-<n>-1").
        etcd.delete_prefix(&service_key("f-"))?;
        etcd.delete_prefix(&format!(
            "{ETCD_PREFIX}/services/endpointslices/{NAMESPACE}/f-"
        ))
    })?;
    b.wait_programmed_at_most(2, left, progress, &what)?;
    progress.done(&what, &format!("{left} services left"));
    let mut after = Step {
        services: left,
        ..Step::default()
    };
    b.rates(
        vip,
        &mut after,
        p.runs,
        progress,
        &format!("{mode} {left} svc (fillers deleted)"),
    )?;
    res.after = Some(after);
    Ok(res)
}

/// Starts a fresh twilld on each extra node in turn and times its first full sync.
fn full_syncs(
    b: &Bench,
    n: usize,
    reps: usize,
    res: &mut ModeResult,
    progress: &Progress,
) -> Result<()> {
    for r in 0..reps {
        let what = format!("{} full sync of {n} services, rep {}/{reps}", b.mode, r + 1);
        let (sum, start, m) = fresh_full_sync(b, 3 + r, n, &[], progress, &what)?;
        res.full_sync_s.push(sum);
        res.start_to_programmed_s.push(start);
        res.full_sync_frontends =
            prometheus_value(&m, "twill_services_frontends").unwrap_or(f64::NAN);
        res.full_sync_backends =
            prometheus_value(&m, "twill_services_backends").unwrap_or(f64::NAN);
    }
    Ok(())
}

/// The same `n` services with one endpoint each, under [`ONE_ENDPOINT_PREFIX`] (with a copy of
/// the network config, so the fresh twilld is a node of that prefix's cluster of one).
fn one_endpoint_full_syncs(
    b: &Bench,
    n: usize,
    reps: usize,
    res: &mut ModeResult,
    progress: &Progress,
) -> Result<()> {
    let what = format!("{}: write {n} services × 1 endpoint", b.mode);
    progress.working(&what);
    let mut kvs = one_endpoint_entries(ONE_ENDPOINT_PREFIX, n);
    kvs.push((
        format!("{ONE_ENDPOINT_PREFIX}/config"),
        Backend::HostGw.network_config(),
    ));
    let etcd = etcd();
    in_netns(&b.rig.underlay_ns(), || etcd.put_many(&kvs, 128, |_| {}))?;
    progress.done(&what, &format!("{} objects", kvs.len()));
    for r in 0..reps {
        let what = format!(
            "{} full sync of {n} services × 1 endpoint, rep {}/{reps}",
            b.mode,
            r + 1
        );
        let (sum, start, _) = fresh_full_sync(
            b,
            3 + reps + r,
            n,
            &["--etcd-prefix", ONE_ENDPOINT_PREFIX],
            progress,
            &what,
        )?;
        res.full_sync_one_s.push(sum);
        res.start_to_programmed_one_s.push(start);
    }
    Ok(())
}

/// Starts a fresh twilld on `node` (with `extra` flags), waits until it has programmed `n`
/// frontends, stops it. Its first sync (agent's histogram), s; start → programmed, s; its last
/// metrics.
fn fresh_full_sync(
    b: &Bench,
    node: usize,
    n: usize,
    extra: &[&str],
    progress: &Progress,
    what: &str,
) -> Result<(f64, f64, String)> {
    progress.working(what);
    let mut args = vec![
        "--metrics-addr".to_string(),
        METRICS_ADDR.to_string(),
        "--resync-interval".to_string(),
        "3600".to_string(),
    ];
    args.extend(proxy_args(&b.rig, node, b.mode)?);
    args.extend(extra.iter().map(ToString::to_string));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let t0 = Instant::now();
    b.rig.start_twilld(node, &args)?;
    let done = b.wait_programmed(node, n, progress, what)?;
    let m = wait_for(Duration::from_secs(10), || {
        let m = b.metrics(node).ok()?;
        let full = prometheus_value(&m, r#"twill_services_syncs_total{kind="full",result="ok"}"#)?;
        (full >= 1.0).then_some(m)
    })
    .context("no full sync in the metrics")?;
    let count = prometheus_value(&m, "twill_services_sync_duration_seconds_count")
        .context("no sync histogram")?;
    let sum = prometheus_value(&m, "twill_services_sync_duration_seconds_sum")
        .context("no sync histogram")?;
    ensure!(
        (count - 1.0).abs() < f64::EPSILON,
        "expected the fresh twilld's first sync alone, found {count} syncs"
    );
    let start = (done - t0).as_secs_f64();
    progress.done(
        what,
        &format!(
            "{} ms (agent), {} s from start to programmed",
            fmt_num(sum * 1000.0),
            fmt_num(start)
        ),
    );
    // Its CPU and memory are not part of the rest of the run.
    b.rig
        .kill_twilld(node, nix::sys::signal::Signal::SIGTERM)
        .with_context(|| format!("stop twilld on node {node}"))?;
    Ok((sum, start, m))
}

/// Swaps the measured service's endpoint between `a` and `b`, timing each change at the agent
/// and end to end.
fn one_change(
    b: &Bench,
    name: &str,
    vip: SocketAddr,
    changes: usize,
    res: &mut ModeResult,
    progress: &Progress,
) -> Result<()> {
    let what = format!(
        "{} one endpoint change with {} services",
        b.mode,
        res.steps.last().map_or(0, |s| s.services)
    );
    progress.working(&what);
    let target = vip.to_string();
    let cmd = pod_command(
        &b.rig,
        &b.client,
        b.mode,
        &[
            &b.probe,
            "follow",
            &target,
            "--interval-us",
            "200",
            "--secs",
            "600",
        ],
    )?;
    let follow = LineMonitor::from_command(cmd, &format!("twill-probe follow {target}"))?;
    let first = wait_for(Duration::from_secs(10), || {
        follow.next_line(Duration::from_millis(100)).ok().flatten()
    })
    .context("twill-probe follow printed nothing")?;
    ensure!(
        first.1 == "a",
        "the follower's first answer is {:?}, not a",
        first.1
    );
    let etcd = etcd();
    let key = slice_key(name);
    let (a_ip, b_ip) = (b.a_ip(), b.b_ip());
    for i in 0..changes {
        if twill_tests::interrupted() {
            bail!("interrupted");
        }
        let (to_name, to_ip) = if i % 2 == 0 { ("b", b_ip) } else { ("a", a_ip) };
        let before = b.metrics(2)?;
        let count0 = prometheus_value(&before, "twill_services_sync_duration_seconds_count")
            .context("no sync histogram")?;
        let sum0 = prometheus_value(&before, "twill_services_sync_duration_seconds_sum")
            .context("no sync histogram")?;
        follow.drain();
        let value = slice_json(name, &[to_ip]);
        let t0 = Instant::now();
        in_netns(&b.rig.underlay_ns(), || etcd.put(&key, &value))?;
        let deadline = t0 + CHANGE_DEADLINE;
        let mut seen = None;
        while seen.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match follow.next_line(left)? {
                Some((at, line)) if line == to_name => seen = Some(at),
                Some((_, line)) if line.starts_with('!') => res.change_glitches += 1,
                Some(_) => {}
                None => break,
            }
        }
        match seen {
            Some(at) => res.change_e2e_ms.push(ms(at - t0)),
            None => res.change_lost += 1,
        }
        // The agent's own account of the change: the one sync it caused.
        let after = wait_for(Duration::from_secs(2), || {
            let m = b.metrics(2).ok()?;
            let c = prometheus_value(&m, "twill_services_sync_duration_seconds_count")?;
            (c > count0).then_some(m)
        });
        if let Ok(m) = after {
            let count = prometheus_value(&m, "twill_services_sync_duration_seconds_count")
                .unwrap_or(f64::NAN);
            let sum = prometheus_value(&m, "twill_services_sync_duration_seconds_sum")
                .unwrap_or(f64::NAN);
            if (count - count0 - 1.0).abs() < f64::EPSILON {
                res.change_agent_ms.push((sum - sum0) * 1000.0);
            }
        }
        if i % 5 == 0 {
            progress.working(&format!("{what}: {}/{changes}", i + 1));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(follow);
    ensure!(
        !res.change_e2e_ms.is_empty(),
        "no endpoint change reached the client within {CHANGE_DEADLINE:?}"
    );
    let e2e = Summary::of(&res.change_e2e_ms);
    let agent = Summary::of(&res.change_agent_ms);
    progress.done(
        &what,
        &format!(
            "agent p50 {} ms p99 {} ms; end to end p50 {} ms p99 {} ms; {} lost",
            fmt_num(agent.p50),
            fmt_num(agent.p99),
            fmt_num(e2e.p50),
            fmt_num(e2e.p99),
            res.change_lost
        ),
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---- the hand-written baselines ------------------------------------------------------------

/// The measured VIP of the baselines (after every filler, in every order).
const BASELINE_VIP: Ipv4Addr = Ipv4Addr::new(10, 111, 255, 254);

/// An nft table in the shape issue 5 asks of twill: one verdict map keyed on address .
/// protocol . port, a chain per service. Fillers DNAT to their first endpoint.
fn nft_ruleset(n: usize, a: Ipv4Addr) -> String {
    let mut elements = String::new();
    let mut chains = String::new();
    for i in 0..n.saturating_sub(1) {
        let (_, vip, eps) = filler(i);
        let _ = write!(elements, "{vip} . tcp . {PORT} : goto s{i}, ");
        let _ = writeln!(
            chains,
            "  chain s{i} {{\n    meta l4proto tcp dnat to {}:{VIP_TARGET_PORT}\n  }}",
            eps[0]
        );
    }
    let _ = write!(elements, "{BASELINE_VIP} . tcp . {PORT} : goto measured");
    let _ = writeln!(
        chains,
        "  chain measured {{\n    meta l4proto tcp dnat to {a}:{VIP_TARGET_PORT}\n  }}"
    );
    format!(
        "table ip twbench {{\n  map svc {{\n    type ipv4_addr . inet_proto . inet_service : \
         verdict\n    elements = {{ {elements} }}\n  }}\n\
         {chains}  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         ip daddr . meta l4proto . th dport vmap @svc\n  }}\n}}\n"
    )
}

/// kube-proxy's iptables layout, by hand: a services chain with one rule per service (the
/// measured one last) jumping to a per-service chain that DNATs.
fn iptables_ruleset(n: usize, a: Ipv4Addr) -> String {
    let mut out = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :POSTROUTING ACCEPT [0:0]\n:TWB-SERVICES - [0:0]\n",
    );
    let count = n.saturating_sub(1);
    for i in 0..=count {
        let _ = writeln!(out, ":TWB-SVC-{i} - [0:0]");
    }
    out.push_str("-A PREROUTING -j TWB-SERVICES\n");
    for i in 0..count {
        let (_, vip, eps) = filler(i);
        let _ = writeln!(
            out,
            "-A TWB-SERVICES -d {vip}/32 -p tcp -m tcp --dport {PORT} -j TWB-SVC-{i}\n\
             -A TWB-SVC-{i} -p tcp -j DNAT --to-destination {}:{VIP_TARGET_PORT}",
            eps[0]
        );
    }
    let _ = writeln!(
        out,
        "-A TWB-SERVICES -d {BASELINE_VIP}/32 -p tcp -m tcp --dport {PORT} -j TWB-SVC-{count}\n\
         -A TWB-SVC-{count} -p tcp -j DNAT --to-destination {a}:{VIP_TARGET_PORT}"
    );
    out.push_str("COMMIT\n");
    out
}

/// Runs `args` in `ns` with `input` on stdin; the wall time, or an error with stderr.
fn timed_stdin(ns: &str, args: &[&str], input: &str) -> Result<Duration> {
    use std::io::Write as _;
    let what = format!("{} in netns {ns}", args.join(" "));
    let mut child = twill_tests::ns::nsenter(ns, args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {what}"))?;
    let t0 = Instant::now();
    {
        let mut stdin = child.stdin.take().expect("stdin is piped");
        stdin
            .write_all(input.as_bytes())
            .with_context(|| format!("feed {what}"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("wait for {what}"))?;
    let took = t0.elapsed();
    if !out.status.success() {
        // nft quotes every offending line of a 10k-line input: the first few say it all.
        let err = String::from_utf8_lossy(&out.stderr);
        let head: Vec<&str> = err.lines().take(6).collect();
        bail!("{what} failed ({}): {}", out.status, head.join("\n"));
    }
    Ok(took)
}

fn measure_baselines(
    p: &Params,
    bin_dir: Option<PathBuf>,
    progress: &Progress,
) -> Result<BaselineResult> {
    let what = "hand-written rules: rig".to_string();
    progress.working(&what);
    let b = Bench::new(ProxyMode::None, 0, p.rate_secs, bin_dir)?;
    progress.done(&what, &format!("up ({})", b.rig.id()));
    let node = b.rig.node_ns(2);
    let n = p.baseline_services;
    let vip = SocketAddr::from((BASELINE_VIP, PORT));
    let mut res = BaselineResult {
        services: n,
        ..BaselineResult::default()
    };

    let what = format!("nft verdict map, {n} services: load");
    progress.working(&what);
    let took = timed_stdin(&node, &["nft", "-f", "-"], &nft_ruleset(n, b.a_ip()))?;
    res.nft_load_s = took.as_secs_f64();
    progress.done(&what, &format!("nft -f took {} s", fmt_num(res.nft_load_s)));
    for i in 0..5 {
        let one = format!(
            "add chain ip twbench extra{i}\n\
             add rule ip twbench extra{i} meta l4proto tcp dnat to {}:{VIP_TARGET_PORT}\n\
             add element ip twbench svc {{ 10.111.254.{} . tcp . {PORT} : goto extra{i} }}\n",
            b.a_ip(),
            i + 1
        );
        let took = timed_stdin(&node, &["nft", "-f", "-"], &one)?;
        res.nft_add_one_ms.push(ms(took));
    }
    res.nft.services = n;
    b.rates(vip, &mut res.nft, p.runs, progress, "nft by hand")?;
    run(&node, &["nft", "delete", "table", "ip", "twbench"])?;

    let what = format!("iptables-legacy, {n} services: load");
    progress.working(&what);
    let took = timed_stdin(
        &node,
        &["iptables-legacy-restore"],
        &iptables_ruleset(n, b.a_ip()),
    )?;
    res.ipt_load_s = took.as_secs_f64();
    progress.done(
        &what,
        &format!("iptables-legacy-restore took {} s", fmt_num(res.ipt_load_s)),
    );
    res.ipt.services = n;
    b.rates(
        vip,
        &mut res.ipt,
        p.runs,
        progress,
        "iptables-legacy by hand",
    )?;
    run(&node, &["iptables-legacy", "-t", "nat", "-F"])?;
    run(&node, &["iptables-legacy", "-t", "nat", "-X"])?;
    Ok(res)
}

// ---- the benchmark ------------------------------------------------------------------------

impl Benchmark for Services {
    fn name(&self) -> &'static str {
        "services"
    }

    fn run(&self, ctx: &Context<'_>) -> Result<Section> {
        let p = Params::new(ctx.opts.quick, ctx.opts.reps);
        let progress = ctx.progress;
        let mut modes = ctx.opts.modes.clone();
        modes.sort();
        modes.dedup();
        modes.retain(|m| *m != ProxyMode::None);
        ensure!(!modes.is_empty(), "no proxy mode selected");
        let twilld = super::twilld_path(ctx.opts.bin_dir.as_deref())?;
        let per_mode = 1 + p.steps.len() * (1 + p.runs) + p.reps + 1 + 1 + p.runs;
        // Which modes this twilld knows, before planning: the progress total stays honest.
        let availability: Vec<(ProxyMode, Result<(), String>)> = modes
            .iter()
            .map(|&m| (m, check_proxy_mode(&twilld, m)))
            .collect();
        let measurable = availability.iter().filter(|(_, a)| a.is_ok()).count();
        progress.plan(measurable * per_mode + 3 + 2 * p.runs);
        let mut outcomes = Vec::new();
        let mut notes = Vec::new();
        for (mode, available) in availability {
            if let Err(reason) = available {
                progress.note(&format!("services {mode}: unavailable — {reason}"));
                outcomes.push(ModeOutcome::Unavailable {
                    mode: mode.to_string(),
                    reason,
                });
                continue;
            }
            let r = measure_mode(mode, &p, ctx.opts.bin_dir.clone(), progress)
                .with_context(|| format!("services, proxy mode {mode}"))?;
            if r.steps.iter().any(|s| s.failed > 0) {
                notes.push(format!(
                    "{mode}: {} connection(s) failed during the rate runs (not counted in the \
                     rates)",
                    r.steps.iter().map(|s| s.failed).sum::<u64>()
                ));
            }
            outcomes.push(ModeOutcome::Measured(Box::new(r)));
        }
        let baseline = match measure_baselines(&p, ctx.opts.bin_dir.clone(), progress) {
            Ok(b) => Some(b),
            Err(e) if twill_tests::interrupted() => return Err(e),
            Err(e) => {
                progress.note(&format!("hand-written baselines failed: {e:#}"));
                notes.push(format!("hand-written baselines not measured: {e:#}"));
                None
            }
        };
        Ok(section(&p, &outcomes, baseline.as_ref(), notes))
    }
}

// ---- the report ---------------------------------------------------------------------------

fn bar(v: &[f64]) -> Option<Bar> {
    let s = sorted(v);
    Some(Bar {
        value: median(v),
        low: *s.first()?,
        high: *s.last()?,
    })
}

/// The "as measured" cell: median VIP and pod-IP rates, stalls included.
fn measured_cell(step: &Step) -> String {
    format!(
        "{} / {}",
        fmt_num(median(&step.vip_measured)),
        fmt_num(median(&step.direct_measured))
    )
}

/// Median of the per-repetition VIP/direct ratios.
fn paired(step: &Step) -> f64 {
    let r: Vec<f64> = step
        .vip
        .iter()
        .zip(&step.direct)
        .map(|(v, d)| v / d)
        .collect();
    median(&r)
}

#[expect(clippy::cast_precision_loss, reason = "service counts far below 2^52")]
fn section(
    p: &Params,
    outcomes: &[ModeOutcome],
    baseline: Option<&BaselineResult>,
    mut notes: Vec<String>,
) -> Section {
    let mut metrics = Vec::new();
    let mut checks = Vec::new();
    let mut metric = |name: String, unit: &str, value: f64| {
        metrics.push(Metric {
            name,
            unit: unit.into(),
            value,
        });
    };
    let mut rates = Table {
        title: format!(
            "Fresh TCP connections/s, one at a time from a pod on another node ({} runs of {} s \
             per step, VIP and pod IP taken in turn; rates at the median connection latency, \
             medians of the runs)",
            p.runs, p.rate_secs
        ),
        header: [
            "mode",
            "services",
            "VIP conn/s",
            "pod IP conn/s",
            "VIP/pod IP",
            "VIP/pod IP vs 1 service",
            "as measured, stalls included: VIP / pod IP conn/s",
            "written → programmed",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    let mut syncs = Table {
        title: format!(
            "Programming: full sync of {} services × {ENDPOINTS} endpoints (and × 1) by a fresh \
             twilld, one endpoint change with {} services installed",
            p.sync_step,
            p.steps.last().copied().unwrap_or(0)
        ),
        header: [
            "mode",
            "full sync (agent)",
            "start → programmed",
            "full sync × 1 endpoint (agent)",
            "start → programmed × 1",
            "one change p50 / p99 (agent)",
            "one change p50 / p99 (etcd write → traffic)",
            "lost",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    let mut lines = Vec::new();
    let mut lat_series = Vec::new();
    let mut change_series = Vec::new();
    let mut sync_groups = Vec::new();
    let mut sync_bars = Vec::new();
    let first_step = p.steps.first().copied().unwrap_or(1);
    let last_step = p.steps.last().copied().unwrap_or(1);
    for o in outcomes {
        let r = match o {
            ModeOutcome::Unavailable { mode, reason } => {
                rates.rows.push(vec![
                    mode.clone(),
                    "-".into(),
                    "unavailable".into(),
                    "unavailable".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ]);
                syncs.rows.push(vec![
                    mode.clone(),
                    "unavailable".into(),
                    "unavailable".into(),
                    "unavailable".into(),
                    "unavailable".into(),
                    "-".into(),
                ]);
                notes.push(format!("{mode}: unavailable (not measured) — {reason}"));
                continue;
            }
            ModeOutcome::Measured(r) => r,
        };
        let mode = r.mode.as_str();
        let base_rate = r.steps.first().map_or(f64::NAN, |s| median(&s.vip));
        let base_ratio = r.steps.first().map_or(f64::NAN, paired);
        let mut vip_line = Vec::new();
        let mut direct_line = Vec::new();
        for s in &r.steps {
            let vip = median(&s.vip);
            let direct = median(&s.direct);
            let ratio = paired(s);
            let scale_rel = ratio / base_ratio;
            metric(
                format!("services.{mode}.vip_rate.{}", s.services),
                "conn/s",
                vip,
            );
            metric(
                format!("services.{mode}.direct_rate.{}", s.services),
                "conn/s",
                direct,
            );
            metric(
                format!("services.{mode}.vip_rate_measured.{}", s.services),
                "conn/s",
                median(&s.vip_measured),
            );
            metric(
                format!("services.{mode}.vip_over_direct.{}", s.services),
                "ratio",
                ratio,
            );
            rates.rows.push(vec![
                mode.to_string(),
                s.services.to_string(),
                fmt_num(vip),
                fmt_num(direct),
                format!("{ratio:.3}"),
                format!("{scale_rel:.3}"),
                measured_cell(s),
                s.programmed_s
                    .map_or_else(|| "-".into(), |t| format!("{} s", fmt_num(t))),
            ]);
            vip_line.extend(bar(&s.vip).map(|b| (s.services as f64, b)));
            direct_line.extend(bar(&s.direct).map(|b| (s.services as f64, b)));
            if s.services == last_step {
                lat_series.push((
                    format!("{mode} VIP, {} svc", s.services),
                    s.vip_lat_us.clone(),
                ));
                lat_series.push((format!("{mode} direct"), s.direct_lat_us.clone()));
            }
        }
        if let Some(a) = &r.after {
            let ratio = paired(a);
            metric(
                format!("services.{mode}.vip_over_direct.fillers_deleted"),
                "ratio",
                ratio,
            );
            rates.rows.push(vec![
                mode.to_string(),
                format!("{} (fillers deleted)", a.services),
                fmt_num(median(&a.vip)),
                fmt_num(median(&a.direct)),
                format!("{ratio:.3}"),
                format!("{:.3}", ratio / base_ratio),
                measured_cell(a),
                "-".into(),
            ]);
        }
        lines.push(Line {
            name: format!("{mode}: VIP"),
            points: vip_line,
        });
        lines.push(Line {
            name: format!("{mode}: direct pod IP"),
            points: direct_line,
        });
        let last = r.steps.last();
        // The VIP's rate at the last step over its rate at the first, each taken relative to the
        // pod IP's measured alongside: steps are minutes apart, and this machine's load moves
        // more than that in minutes. (The raw ratio is in the table and the metrics.)
        let vip_direct = last.map_or(f64::NAN, paired);
        let scale = vip_direct / base_ratio;
        let scale_raw = last.map_or(f64::NAN, |s| median(&s.vip)) / base_rate;
        metric(format!("services.{mode}.scale_ratio"), "ratio", scale);
        metric(
            format!("services.{mode}.scale_ratio_raw"),
            "ratio",
            scale_raw,
        );
        let full = median(&r.full_sync_s);
        let start = median(&r.start_to_programmed_s);
        let full_one = median(&r.full_sync_one_s);
        let start_one = median(&r.start_to_programmed_one_s);
        if let Some(e) = &r.full_sync_error {
            notes.push(format!(
                "{mode}: full sync of {} services not measured: {e}",
                p.sync_step
            ));
        } else {
            metric(format!("services.{mode}.full_sync"), "s", full);
            metric(format!("services.{mode}.start_to_programmed"), "s", start);
            metric(
                format!("services.{mode}.full_sync_one_endpoint"),
                "s",
                full_one,
            );
            metric(
                format!("services.{mode}.start_to_programmed_one_endpoint"),
                "s",
                start_one,
            );
        }
        let agent = Summary::of(&r.change_agent_ms);
        let e2e = Summary::of(&r.change_e2e_ms);
        metric(format!("services.{mode}.change.agent.p50"), "ms", agent.p50);
        metric(format!("services.{mode}.change.agent.p99"), "ms", agent.p99);
        metric(format!("services.{mode}.change.e2e.p50"), "ms", e2e.p50);
        metric(format!("services.{mode}.change.e2e.p99"), "ms", e2e.p99);
        let failed = |v: f64, text: String| {
            if v.is_finite() {
                text
            } else {
                "FAILED (see notes)".to_string()
            }
        };
        syncs.rows.push(vec![
            mode.to_string(),
            failed(full, format!("{} ms", fmt_num(full * 1000.0))),
            failed(start, format!("{} s", fmt_num(start))),
            failed(full_one, format!("{} ms", fmt_num(full_one * 1000.0))),
            failed(start_one, format!("{} s", fmt_num(start_one))),
            format!("{} / {} ms", fmt_num(agent.p50), fmt_num(agent.p99)),
            format!("{} / {} ms", fmt_num(e2e.p50), fmt_num(e2e.p99)),
            format!("{}", r.change_lost),
        ]);
        if r.change_lost > 0 || r.change_glitches > 0 {
            notes.push(format!(
                "{mode}: {} endpoint change(s) not seen by the client within {CHANGE_DEADLINE:?}, \
                 {} failed connection(s) of the follower while endpoints changed",
                r.change_lost, r.change_glitches
            ));
        }
        if r.change_agent_ms.len() < r.change_e2e_ms.len() {
            notes.push(format!(
                "{mode}: {} of {} changes had no single matching sync in the agent's histogram \
                 (two changes coalesced, or a sync came from elsewhere): left out of the agent \
                 figures",
                r.change_e2e_ms.len() - r.change_agent_ms.len(),
                r.change_e2e_ms.len()
            ));
        }
        change_series.push((format!("{mode} agent"), r.change_agent_ms.clone()));
        change_series.push((format!("{mode} etcd → traffic"), r.change_e2e_ms.clone()));
        if !r.full_sync_s.is_empty() {
            sync_groups.push(format!("twill {mode}"));
            sync_bars.push(bar(&r.full_sync_s));
        }
        let scale_what = format!(
            "{mode}: VIP rate at {last_step} / at {first_step} services (each relative to the pod \
             IP's alongside)"
        );
        let change_what = format!("{mode}: one endpoint change p99 (agent), {last_step} services");
        match mode {
            "ebpf" => {
                checks.push(Check::at_least(scale_what, scale, EBPF_SCALE_TARGET));
                checks.push(Check::at_least(
                    format!("ebpf: VIP / direct pod IP rate, {last_step} services"),
                    vip_direct,
                    EBPF_VIP_DIRECT_TARGET,
                ));
                checks.push(Check::at_most(
                    format!("ebpf: full sync of {} services × {ENDPOINTS}", p.sync_step),
                    full,
                    EBPF_FULL_SYNC_TARGET_S,
                    "s",
                ));
                checks.push(Check::at_most(
                    change_what,
                    agent.p99,
                    EBPF_CHANGE_P99_TARGET_MS,
                    "ms",
                ));
            }
            "nftables" => {
                checks.push(Check::at_least(scale_what, scale, NFT_SCALE_TARGET));
                checks.push(Check::at_most(
                    change_what,
                    agent.p99,
                    NFT_CHANGE_P99_TARGET_MS,
                    "ms",
                ));
            }
            // The shape of the hand-written iptables-legacy-restore baseline: one endpoint.
            "iptables" => checks.push(Check::at_most(
                format!(
                    "iptables: full sync of {} services × 1 endpoint (target is for the legacy \
                     backend)",
                    p.sync_step
                ),
                full_one,
                IPT_FULL_SYNC_TARGET_S,
                "s",
            )),
            _ => {}
        }
    }
    if let Some(bl) = baseline {
        for (label, key, step, load) in [
            (
                "nft verdict map (by hand)",
                "nft_by_hand",
                &bl.nft,
                bl.nft_load_s,
            ),
            (
                "iptables-legacy (by hand)",
                "iptables_legacy_by_hand",
                &bl.ipt,
                bl.ipt_load_s,
            ),
        ] {
            let vip = median(&step.vip);
            let direct = median(&step.direct);
            metric(
                format!("services.{key}.vip_rate.{}", bl.services),
                "conn/s",
                vip,
            );
            metric(
                format!("services.{key}.direct_rate.{}", bl.services),
                "conn/s",
                direct,
            );
            metric(format!("services.{key}.load"), "s", load);
            rates.rows.push(vec![
                label.into(),
                bl.services.to_string(),
                fmt_num(vip),
                fmt_num(direct),
                format!("{:.3}", paired(step)),
                "-".into(),
                measured_cell(step),
                format!("{} s (load)", fmt_num(load)),
            ]);
            lines.push(Line {
                name: format!("{label}: VIP"),
                points: bar(&step.vip)
                    .map(|b| (bl.services as f64, b))
                    .into_iter()
                    .collect(),
            });
            lat_series.push((
                format!("{label} VIP, {} svc", bl.services),
                step.vip_lat_us.clone(),
            ));
        }
        notes.push(format!(
            "iptables (by hand, and twill's iptables mode): the first packet of *every* new \
             connection through node 2 walks the nat table's services chain, direct ones \
             included, so a VIP/direct ratio near 1 there does not mean the {} rules are free — \
             compare its direct rate with the other rows' instead",
            bl.services
        ));
        let add_one = Summary::of(&bl.nft_add_one_ms);
        metric("services.nft_by_hand.add_one.p50".into(), "ms", add_one.p50);
        syncs.rows.push(vec![
            format!("nft -f by hand ({} services × 1 endpoint)", bl.services),
            format!("{} ms", fmt_num(bl.nft_load_s * 1000.0)),
            "-".into(),
            format!("{} ms (nft -f adding one)", fmt_num(add_one.p50)),
            "-".into(),
            "-".into(),
        ]);
        syncs.rows.push(vec![
            format!(
                "iptables-legacy-restore by hand ({} services × 1 endpoint)",
                bl.services
            ),
            format!("{} ms", fmt_num(bl.ipt_load_s * 1000.0)),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
        ]);
        sync_groups.push(format!("nft -f by hand ({}×1)", bl.services));
        sync_bars.push(Some(Bar {
            value: bl.nft_load_s,
            low: bl.nft_load_s,
            high: bl.nft_load_s,
        }));
        sync_groups.push(format!("iptables-legacy-restore ({}×1)", bl.services));
        sync_bars.push(Some(Bar {
            value: bl.ipt_load_s,
            low: bl.ipt_load_s,
            high: bl.ipt_load_s,
        }));
    }

    let mut plots = Vec::new();
    if lines.iter().any(|l| !l.points.is_empty()) {
        plots.push(Plot::Lines(LineChart {
            file: "services-rate.svg".into(),
            title: "Fresh connections/s vs services installed (median; whiskers: min–max)".into(),
            x_label: "services installed (log scale)".into(),
            y_label: "connections/s".into(),
            series: lines,
        }));
    }
    if !lat_series.is_empty() {
        plots.push(Plot::Cdf(CdfChart {
            file: "services-connect-latency.svg".into(),
            title: "Connection latency (connect to the server's close), largest step".into(),
            x_label: "µs (log scale)".into(),
            series: lat_series,
        }));
    }
    if change_series.iter().any(|(_, v)| !v.is_empty()) {
        plots.push(Plot::Cdf(CdfChart {
            file: "services-one-change.svg".into(),
            title: format!("One endpoint change with {last_step} services"),
            x_label: "ms (log scale)".into(),
            series: change_series,
        }));
    }
    if sync_bars.iter().any(Option::is_some) {
        plots.push(Plot::Bars(BarChart {
            file: "services-full-sync.svg".into(),
            title: format!("Full sync: twill ({} services × {ENDPOINTS} endpoints) and hand-written rule loads", p.sync_step),
            y_label: "seconds".into(),
            groups: sync_groups,
            series: vec![BarSeries {
                name: "full sync / load".into(),
                values: sync_bars,
            }],
        }));
    }

    let about = format!(
        "Per proxy mode a rig of its own: node 1 hosts two backend pods (`a`, `b`, made by \
         twill-cni, each a `twill-probe serve` answering its name on :8080 and :8081), node 2 the \
         client pod and the only twilld with a service proxy (`--resync-interval 3600`; iptables \
         on its legacy backend, `--iptables-backend legacy`). Services \
         are ClusterIP, port {PORT} → 8080; fillers have {ENDPOINTS} endpoints each (addresses \
         nothing answers on) and are written straight into etcd in 128-object transactions; at \
         each step a new measured service (endpoint `a`) is created last, with the name that \
         sorts last and the highest VIP, so even a linear dataplane meets it after all others; \
         the previous step's measured service is deleted first and the new one takes its VIP \
         (through DNAT, one backend reached through two VIPs from reused source ports has SYNs \
         refused by PAWS on the backend's TIME_WAIT sockets, ~10 ms each: Linux derives TCP \
         timestamp offsets from the destination address). \
         The client is `twill-probe rate`: fresh TCP connections one at a time (the server \
         closes first), run in the client pod and — for eBPF — in node 2's cgroup, where the \
         socket-level load balancer is attached. It takes the VIP (→ a:8080) and the pod IP \
         (→ a:8081; another port, so the server's TIME_WAIT sockets never see both) in turn, \
         connection by connection, so both meet the same background load. An address's rate in \
         a run is taken at the run's median connection latency (1 / p50): on this shared \
         two-core machine, scheduler stalls of tens of milliseconds land on random connections \
         and swing a mean by 2× from one run to the next, a median barely; the rates as \
         measured (connections over the time spent on them, stalls included) are in the last \
         column. {} runs of {} s per step after a short warm-up; figures are medians of the \
         runs, VIP/pod IP the median of the runs' ratios. \
         \"VIP/direct vs 1 service\" (the ratio the scale targets are checked on) is that \
         ratio at a step over the same at 1 service: the steps are minutes apart, and on this \
         machine the load moves the absolute rates by tens of percent in minutes, while the pod \
         IP's path does not depend on the number of services (except with iptables, see the \
         notes). The raw \"VIP rate vs 1 service\" is given too.\n\n\
         Full sync: at {} services a fresh twilld starts on an extra node (one per repetition); \
         its first sync's duration is read from its own `twill_services_sync_duration_seconds` \
         (plan + apply), and the time from its start until `/metrics` reports every frontend \
         programmed is given too; then again on other fresh nodes with the same services at one \
         endpoint each (a second etcd prefix), the shape of the hand-written baselines. One \
         change: with {} services installed, the measured service's \
         only endpoint is swapped between `a` and `b` {} times through etcd; the agent figure is \
         the one sync it caused (histogram sum before and after), the end-to-end figure runs \
         from just before the etcd write until `twill-probe follow` (a connection every 200 µs \
         from the client) is answered by the new backend.\n\n\
         Hand-written baselines (ENVIRONMENT.md), in a rig without any twill proxy: {} services \
         as an nft verdict map (`ip daddr . meta l4proto . th dport vmap`, a chain per service) \
         and as iptables-legacy chains (one rule per service in a services chain, the measured \
         one last), each loaded with one `nft -f` / `iptables-legacy-restore` into node 2 and \
         measured like the modes. Node namespaces set `nf_conntrack_tcp_timeout_time_wait` to \
         10 s, for every mode and baseline alike (at thousands of connections a second the \
         default 120 s fills the machine-wide table).",
        p.runs, p.rate_secs, p.sync_step, last_step, p.changes, p.baseline_services
    );
    Section {
        name: "services".into(),
        title: "Services: connection rate vs number of services, sync and one-change latency"
            .into(),
        about,
        metrics,
        tables: vec![rates, syncs],
        checks,
        notes,
        plot_files: Vec::new(),
        plots,
        raw: serde_json::json!({
            "params": p,
            "modes": outcomes,
            "baseline": baseline,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_parse_as_kubernetes_json() {
        let (name, vip, eps) = filler(29_999);
        assert_eq!(name, "f-29999");
        assert_eq!(vip, Ipv4Addr::new(10, 100, 117, 48));
        assert_eq!(eps.len(), ENDPOINTS);
        assert_eq!(eps[0], Ipv4Addr::new(100, 71, 82, 241));
        let svc: serde_json::Value = serde_json::from_str(&service_json(&name, vip)).unwrap();
        assert_eq!(svc["spec"]["clusterIP"], "10.100.117.48");
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], 8080);
        let slice: serde_json::Value = serde_json::from_str(&slice_json(&name, &eps)).unwrap();
        assert_eq!(
            slice["metadata"]["labels"]["kubernetes.io/service-name"],
            "f-29999"
        );
        assert_eq!(slice["endpoints"].as_array().unwrap().len(), ENDPOINTS);
        assert_eq!(
            service_key(&name),
            "/coreos.com/network/services/services/bench/f-29999"
        );
        assert_eq!(
            slice_key(&name),
            "/coreos.com/network/services/endpointslices/bench/f-29999-1"
        );
        // The measured services sort after every filler and have the highest VIPs.
        let (m, mvip) = measured(2);
        assert!(m.as_str() > "f-99999");
        assert!(mvip > filler(65_000).1);
        assert_eq!(filler_entries(3, 5).len(), 4);
    }

    #[test]
    fn baseline_rulesets_put_the_measured_service_last() {
        let a = Ipv4Addr::new(10, 244, 1, 2);
        let nft = nft_ruleset(3, a);
        assert!(nft.contains("10.100.0.1 . tcp . 80 : goto s0, 10.100.0.2 . tcp . 80 : goto s1, 10.111.255.254 . tcp . 80 : goto measured"), "{nft}");
        assert!(
            nft.contains("chain measured {\n    meta l4proto tcp dnat to 10.244.1.2:8080\n  }"),
            "{nft}"
        );
        let ipt = iptables_ruleset(3, a);
        let last_rule = ipt
            .lines()
            .rfind(|l| l.starts_with("-A TWB-SERVICES"))
            .unwrap();
        assert!(last_rule.contains("10.111.255.254/32"), "{ipt}");
        assert!(ipt.ends_with("COMMIT\n"));
        assert_eq!(ipt.matches(":TWB-SVC-").count(), 3);
    }

    #[test]
    fn unavailable_modes_are_notes_not_zeros() {
        let p = Params::new(true, 1);
        let step = |services: usize, vip: f64| Step {
            services,
            vip: vec![vip],
            direct: vec![1000.0],
            vip_measured: vec![vip * 0.9],
            direct_measured: vec![900.0],
            vip_lat_us: vec![100.0, 120.0],
            direct_lat_us: vec![90.0],
            failed: 0,
            programmed_s: None,
        };
        let ebpf = ModeResult {
            mode: "ebpf".into(),
            steps: vec![step(1, 1000.0), step(30, 990.0), step(100, 980.0)],
            after: Some(step(3, 1000.0)),
            full_sync_s: vec![0.01],
            start_to_programmed_s: vec![0.2],
            full_sync_frontends: 30.0,
            full_sync_error: None,
            full_sync_backends: 300.0,
            full_sync_one_s: vec![0.005],
            start_to_programmed_one_s: vec![0.1],
            change_agent_ms: vec![0.3, 0.4],
            change_e2e_ms: vec![2.0, 3.0],
            change_lost: 0,
            change_glitches: 0,
        };
        let outcomes = vec![
            ModeOutcome::Measured(Box::new(ebpf)),
            ModeOutcome::Unavailable {
                mode: "nftables".into(),
                reason: "twilld does not support --proxy-mode nftables".into(),
            },
        ];
        let s = section(&p, &outcomes, None, Vec::new());
        assert!(
            s.metrics
                .iter()
                .all(|m| m.value.is_finite() && m.value > 0.0),
            "{:?}",
            s.metrics
        );
        assert!(!s.metrics.iter().any(|m| m.name.contains("nftables")));
        assert!(
            s.notes
                .iter()
                .any(|n| n.starts_with("nftables: unavailable"))
        );
        assert!(
            s.tables[0]
                .rows
                .iter()
                .any(|r| r[0] == "nftables" && r[2] == "unavailable")
        );
        let scale = s
            .metrics
            .iter()
            .find(|m| m.name == "services.ebpf.scale_ratio")
            .unwrap();
        assert!((scale.value - 0.98).abs() < 1e-9);
        assert!(s.checks.iter().all(|c| c.pass), "{:?}", s.checks);
        assert_eq!(s.plots.len(), 4);
    }
}
