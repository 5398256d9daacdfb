//! `bench overlay`: pod-to-pod throughput and latency through twill against the same rig built
//! by hand with `ip`/`bridge` (the kernel baseline twill must match), and the time from a lease
//! written in etcd to the node's routes being programmed.
//!
//! Why it is shaped as it is:
//! - Each configuration is a rig of its own with two nodes and a pod on each, all alive for the
//!   whole run: twill's (etcd, twilld on both nodes, the backend under test) and the kernel's
//!   (no etcd, no twilld; flannel's VXLAN recipe from ENVIRONMENT.md, or host-gw's one route per
//!   peer). The kernel rig copies the twill rig's subnets, MTU, addresses and pod layout, so the
//!   only difference a packet meets is who programmed the path.
//! - Repetitions interleave: within a repetition each test runs on every configuration back to
//!   back, twill right next to its baseline (the pair's order alternates, the pairs' order
//!   rotates), so the two are always measured seconds apart under the same background load.
//!   Figures are medians of the repetitions; a ratio is the median of the repetitions' paired
//!   ratios (twill over the baseline measured next to it), which cancels the slow drift of a
//!   shared machine's load better than a ratio of medians.
//! - The udp backend has no kernel twin: its target is a ratio to kernel VXLAN. A twilld that
//!   refuses `udp` (the backend is still being written) makes the run note the skip, not fail.
//! - Lease-to-programmed: fake peers' leases are written one at a time through etcd's HTTP
//!   gateway (no `etcdctl` start-up in the measurement), and `ip monitor` / `bridge monitor` in
//!   node 1's namespace timestamp the kernel's notifications. "Programmed" is the last of the
//!   route, the neighbour and the FDB entry for VXLAN (a packet needs all three), the route for
//!   the others; removal is timed to the route's deletion (what stops traffic).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Serialize;
use twill_facts::SubnetFacts;
use twill_tests::bench_support::{EtcdHttp, LineMonitor, ping_rtts};
use twill_tests::ns::{in_netns, ip_batch};
use twill_tests::rig::{ETCD_PREFIX, UNDERLAY_V4};
use twill_tests::{Pod, Rig, RigOptions, exec_timeout, ping, run, spawn, wait_until};

use super::plot::{Bar, BarChart, BarSeries, CdfChart, Plot};
use super::report::{Check, Metric, Section, Table, fmt_num};
use super::stats::{Summary, median, percentile, sorted};
use super::{Backend, Benchmark, Context};

/// How long a rig gets to converge (subnet files, first ping).
const UP: Duration = Duration::from_secs(30);
/// How long one lease gets to be programmed before it counts as a timeout.
const LEASE_DEADLINE: Duration = Duration::from_secs(5);
/// The gap between pings.
const PING_INTERVAL: Duration = Duration::from_millis(10);

/// Throughput targets (twill / baseline), from the issues.
fn target(backend: Backend) -> f64 {
    match backend {
        Backend::Vxlan => 0.97,
        Backend::HostGw => 0.98,
        Backend::Udp => 0.70,
    }
}

/// The lease-to-programmed p99 target, ms.
const LEASE_P99_TARGET_MS: f64 = 100.0;

/// The overlay benchmark.
#[derive(Debug, Clone, Copy)]
pub struct Overlay;

/// Durations and counts, full or `--quick`.
#[derive(Debug, Clone, Copy, Serialize)]
struct Params {
    reps: usize,
    iperf_secs: u32,
    ping_count: u32,
    ping_interval_ms: u64,
    leases: usize,
}

impl Params {
    fn new(quick: bool, reps: usize) -> Self {
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
enum Plane {
    Twill,
    Kernel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Test {
    Tcp1,
    Tcp2,
    Ping,
}

impl Test {
    const ALL: [Test; 3] = [Test::Tcp1, Test::Tcp2, Test::Ping];

    fn label(self) -> &'static str {
        match self {
            Test::Tcp1 => "TCP 1 stream",
            Test::Tcp2 => "TCP -P 2",
            Test::Ping => "ping",
        }
    }
}

/// A pod subnet, `(network address, prefix length)`.
type Subnet = (Ipv4Addr, u8);

/// One configuration under test: a rig, its two pods, an iperf3 server in the second.
struct Setup {
    backend: Backend,
    plane: Plane,
    rig: Rig,
    client: Pod,
    server_ip: Ipv4Addr,
    subnets: [Subnet; 2],
    iperf: Option<Child>,
}

impl Setup {
    fn label(&self) -> String {
        match self.plane {
            Plane::Twill => format!("{} twill", self.backend),
            Plane::Kernel => format!("{} kernel", self.backend),
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(mut c) = self.iperf.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The samples of one configuration, one entry per repetition (RTTs pooled).
#[derive(Debug, Clone, Default, Serialize)]
struct Samples {
    tcp1_gbps: Vec<f64>,
    tcp2_gbps: Vec<f64>,
    /// CPU-seconds per GB moved, per repetition (see [`IperfRun`]).
    #[serde(default)]
    tcp1_cpu_s_per_gb: Vec<f64>,
    #[serde(default)]
    tcp2_cpu_s_per_gb: Vec<f64>,
    ping_avg_ms: Vec<f64>,
    ping_p99_ms: Vec<f64>,
    ping_lost: u32,
    rtts_ms: Vec<f64>,
}

/// Lease-to-programmed samples of one backend.
#[derive(Debug, Clone, Default, Serialize)]
struct LeaseSamples {
    backend: String,
    add_ms: Vec<f64>,
    del_ms: Vec<f64>,
    add_timeouts: usize,
    del_timeouts: usize,
}

impl Benchmark for Overlay {
    fn name(&self) -> &'static str {
        "overlay"
    }

    fn run(&self, ctx: &Context<'_>) -> Result<Section> {
        let p = Params::new(ctx.opts.quick, ctx.opts.reps);
        let progress = ctx.progress;
        let mut backends = ctx.opts.backends.clone();
        backends.sort();
        backends.dedup();
        ensure!(!backends.is_empty(), "no backend selected");
        let mut notes = Vec::new();

        // Twill's rigs first: the kernel's copy their subnets.
        let need_kernel_vxlan =
            backends.contains(&Backend::Vxlan) || backends.contains(&Backend::Udp);
        let need_kernel_hostgw = backends.contains(&Backend::HostGw);
        // The whole plan up front (a skipped udp takes its share back): rigs, measurements,
        // lease runs.
        let rigs =
            backends.len() + usize::from(need_kernel_vxlan) + usize::from(need_kernel_hostgw);
        progress.plan(rigs + p.reps * Test::ALL.len() * rigs + backends.len());
        let mut setups: Vec<Setup> = Vec::new();
        for &b in &backends {
            let what = format!("rig {b} twill");
            progress.working(&what);
            match twill_setup(b, ctx.opts.bin_dir.clone()) {
                Ok(s) => {
                    progress.done(&what, &format!("up ({})", s.rig.id()));
                    setups.push(s);
                }
                Err(e) if b == Backend::Udp && !twill_tests::interrupted() => {
                    let why = skip_reason(&format!("{e:#}"));
                    progress.done(&what, "skipped (twilld refused udp)");
                    progress.unplan(p.reps * Test::ALL.len() + 1);
                    notes.push(format!(
                        "udp: skipped — twilld did not bring the udp backend up: {why}"
                    ));
                }
                Err(e) => return Err(e.context(format!("bring up the {b} twill rig"))),
            }
        }
        let twill_subnets = |b: Backend| {
            setups
                .iter()
                .find(|s| s.backend == b && s.plane == Plane::Twill)
                .map(|s| s.subnets)
        };
        let udp_up = twill_subnets(Backend::Udp).is_some();
        let mut kernels = Vec::new();
        if backends.contains(&Backend::Vxlan) || udp_up {
            let subnets = twill_subnets(Backend::Vxlan)
                .or_else(|| twill_subnets(Backend::Udp))
                .unwrap_or(DEFAULT_SUBNETS);
            kernels.push((Backend::Vxlan, subnets));
        } else if need_kernel_vxlan {
            progress.unplan(1 + p.reps * Test::ALL.len());
        }
        if need_kernel_hostgw {
            let subnets = twill_subnets(Backend::HostGw).unwrap_or(DEFAULT_SUBNETS);
            kernels.push((Backend::HostGw, subnets));
        }
        for (b, subnets) in kernels {
            let what = format!("rig {b} kernel");
            progress.working(&what);
            let s = kernel_setup(b, subnets)
                .with_context(|| format!("bring up the hand-built {b} rig"))?;
            progress.done(&what, &format!("up ({})", s.rig.id()));
            setups.push(s);
        }
        ensure!(
            setups.iter().any(|s| s.plane == Plane::Twill),
            "no twill rig came up"
        );

        let samples = measure(&setups, p, progress, &mut notes)?;

        let mut leases = Vec::new();
        let mut lease_failures = Vec::new();
        let twill: Vec<&Setup> = setups.iter().filter(|s| s.plane == Plane::Twill).collect();
        for s in twill {
            let what = format!("lease→programmed {}", s.backend);
            if s.backend == Backend::Udp {
                progress.done(&what, "not measurable (no per-peer kernel state)");
                notes.push(
                    "udp: lease-to-programmed not measured — the udp backend keeps its peers in \
                     twilld's own routing table (the kernel has one route for the whole Network \
                     into flannel0), so there is no per-peer kernel entry to time"
                        .into(),
                );
                continue;
            }
            let l = match lease_latency(s, p.leases, progress, &what) {
                Ok(l) => l,
                Err(e) if twill_tests::interrupted() => return Err(e),
                Err(e) => {
                    // The throughput figures are still worth a report; the NaN check below
                    // fails the run once it is written.
                    progress.done(&what, &format!("FAILED: {e:#}"));
                    notes.push(format!("{}: lease-to-programmed failed: {e:#}", s.backend));
                    lease_failures.push(s.backend);
                    continue;
                }
            };
            let add = Summary::of(&l.add_ms);
            progress.done(
                &what,
                &format!(
                    "add p50 {} ms p99 {} ms, delete p50 {} ms",
                    fmt_num(add.p50),
                    fmt_num(add.p99),
                    fmt_num(Summary::of(&l.del_ms).p50)
                ),
            );
            leases.push(l);
        }

        let labels: Vec<(String, Backend, Plane)> = setups
            .iter()
            .map(|s| (s.label(), s.backend, s.plane))
            .collect();
        drop(setups);
        let mut section = section(&labels, &samples, &leases, p, notes);
        for b in lease_failures {
            section.checks.push(Check {
                what: format!("{b} lease→programmed p99 (measurement failed)"),
                value: f64::NAN,
                target: format!("<= {LEASE_P99_TARGET_MS} ms"),
                pass: false,
            });
        }
        Ok(section)
    }
}

/// The line of a failed udp bring-up (error chain and twilld's log tail) that says why: the
/// first that mentions udp, else the first.
fn skip_reason(error: &str) -> String {
    let lines: Vec<&str> = error.lines().map(str::trim).collect();
    lines
        .iter()
        .find(|l| l.to_lowercase().contains("udp") && !l.starts_with("===="))
        .or(lines.first())
        .map_or_else(String::new, |l| (*l).to_string())
}

/// Subnets for a kernel rig with no twill rig to copy.
const DEFAULT_SUBNETS: [Subnet; 2] = [
    (Ipv4Addr::new(10, 244, 1, 0), 24),
    (Ipv4Addr::new(10, 244, 2, 0), 24),
];

fn subnet_of(facts: &SubnetFacts) -> Result<Subnet> {
    let net = facts
        .subnet_v4()
        .with_context(|| format!("no IPv4 subnet in {facts:?}"))?;
    Ok((net.network(), net.prefix_len()))
}

/// A twill rig: etcd, the backend's config, twilld on both nodes.
fn twill_setup(backend: Backend, bin_dir: Option<PathBuf>) -> Result<Setup> {
    let rig = Rig::with_options(RigOptions {
        nodes: 2,
        bin_dir,
        ..RigOptions::default()
    })?;
    rig.put_network_config(&backend.network_config())?;
    for node in 1..=2 {
        rig.start_twilld(node, &[])?;
    }
    let facts = [rig.wait_subnet_file(1, UP)?, rig.wait_subnet_file(2, UP)?];
    finish(rig, backend, Plane::Twill, &facts)
}

/// The kernel baseline: the same two nodes and subnets, programmed by hand.
fn kernel_setup(backend: Backend, subnets: [Subnet; 2]) -> Result<Setup> {
    let rig = Rig::with_options(RigOptions {
        nodes: 2,
        etcd: false,
        ..RigOptions::default()
    })?;
    // Uplink MTU 1500; VXLAN's overhead is 50 bytes.
    let mtu = if backend == Backend::Vxlan {
        1450
    } else {
        1500
    };
    let mut facts = Vec::new();
    for (net, len) in subnets {
        let gw = Ipv4Addr::from(u32::from(net) + 1);
        facts.push(SubnetFacts::parse(&format!(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={gw}/{len}\nFLANNEL_MTU={mtu}\n\
             FLANNEL_IPMASQ=false\n"
        ))?);
    }
    match backend {
        Backend::Vxlan => hand_vxlan(&rig, subnets)?,
        Backend::HostGw => hand_host_gw(&rig, subnets)?,
        Backend::Udp => bail!("the udp backend has no kernel twin"),
    }
    finish(rig, backend, Plane::Kernel, &facts)
}

/// flannel's VXLAN, by hand (ENVIRONMENT.md): per node a `flannel.1` VTEP with the subnet's
/// `.0/32`; per peer a route, a permanent neighbour and an FDB entry.
fn hand_vxlan(rig: &Rig, subnets: [Subnet; 2]) -> Result<()> {
    let mut macs = Vec::new();
    for node in 1..=2 {
        let ns = rig.node_ns(node);
        let (net, _) = subnets[node - 1];
        ip_batch(
            Some(&ns),
            &format!(
                "link add flannel.1 type vxlan id 1 local {} dev eth0 dstport 8472 nolearning\n\
                 link set flannel.1 mtu 1450\n\
                 addr add {net}/32 dev flannel.1\n\
                 link set flannel.1 up\n",
                Rig::node_ip(node)
            ),
        )?;
        let link = run(&ns, &["ip", "-o", "link", "show", "dev", "flannel.1"])?;
        let mac = link
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .with_context(|| format!("no MAC in {link:?}"))?
            .to_string();
        macs.push(mac);
    }
    for node in 1..=2 {
        let peer = 3 - node;
        let ns = rig.node_ns(node);
        let (pnet, plen) = subnets[peer - 1];
        let pmac = &macs[peer - 1];
        ip_batch(
            Some(&ns),
            &format!(
                "route add {pnet}/{plen} via {pnet} dev flannel.1 onlink\n\
                 neigh replace {pnet} lladdr {pmac} dev flannel.1 nud permanent\n"
            ),
        )?;
        let dst = Rig::node_ip(peer).to_string();
        run(
            &ns,
            &[
                "bridge",
                "fdb",
                "append",
                pmac,
                "dev",
                "flannel.1",
                "dst",
                &dst,
            ],
        )?;
    }
    Ok(())
}

/// host-gw by hand: `ip route add <peer subnet> via <peer node>`.
fn hand_host_gw(rig: &Rig, subnets: [Subnet; 2]) -> Result<()> {
    for node in 1..=2 {
        let peer = 3 - node;
        let (pnet, plen) = subnets[peer - 1];
        ip_batch(
            Some(&rig.node_ns(node)),
            &format!("route add {pnet}/{plen} via {}\n", Rig::node_ip(peer)),
        )?;
    }
    Ok(())
}

/// Pods on both nodes, a first ping through, an iperf3 server listening.
fn finish(rig: Rig, backend: Backend, plane: Plane, facts: &[SubnetFacts]) -> Result<Setup> {
    let subnets = [subnet_of(&facts[0])?, subnet_of(&facts[1])?];
    let client = rig.add_pod(1, &facts[0])?;
    let server = rig.add_pod(2, &facts[1])?;
    let server_ip = server.ipv4.context("server pod has no IPv4 address")?;
    wait_until(UP, || {
        ping(&client.ns, server_ip, 1).is_ok_and(|s| s.all_received())
    })
    .with_context(|| {
        format!(
            "pod {} does not reach {server_ip}; routes of node 1:\n{}",
            client.ns,
            twill_tests::routes(&rig.node_ns(1)).unwrap_or_default()
        )
    })?;
    let mut setup = Setup {
        backend,
        plane,
        rig,
        client,
        server_ip,
        subnets,
        iperf: None,
    };
    setup.iperf = Some(spawn(&server.ns, &["iperf3", "-s"])?);
    wait_until(Duration::from_secs(10), || {
        run(&server.ns, &["ss", "-Hltn", "sport = :5201"]).is_ok_and(|o| !o.trim().is_empty())
    })
    .context("iperf3 server does not listen")?;
    Ok(setup)
}

/// The repetitions: per repetition, per test, every configuration back to back.
///
/// A failure is an error, except on udp (a backend still being written): that configuration is
/// dropped from the run with a note, and the others go on.
fn measure(
    setups: &[Setup],
    p: Params,
    progress: &super::progress::Progress,
    notes: &mut Vec<String>,
) -> Result<BTreeMap<String, Samples>> {
    let keys: Vec<(Backend, Plane)> = setups.iter().map(|s| (s.backend, s.plane)).collect();
    let mut out: BTreeMap<String, Samples> = BTreeMap::new();
    let mut dropped: Vec<String> = Vec::new();
    for rep in 0..p.reps {
        let order = schedule(&keys, rep);
        for (t, test) in Test::ALL.into_iter().enumerate() {
            for &k in &order {
                let s = &setups[k];
                if dropped.contains(&s.label()) {
                    continue;
                }
                let what = format!("rep {}/{} {} {}", rep + 1, p.reps, s.label(), test.label());
                progress.working(&what);
                let entry = out.entry(s.label()).or_default();
                match measure_one(s, test, p, entry) {
                    Ok(outcome) => progress.done(&what, &outcome),
                    Err(e) if s.backend == Backend::Udp && !twill_tests::interrupted() => {
                        progress.done(&what, &format!("FAILED, udp dropped from the run: {e:#}"));
                        notes.push(format!("udp: dropped — {what} failed: {e:#}"));
                        // This test's other steps and every later repetition of this setup.
                        progress.unplan((p.reps - rep) * Test::ALL.len() - t - 1);
                        dropped.push(s.label());
                        out.remove(&s.label());
                    }
                    Err(e) => return Err(e.context(what)),
                }
            }
        }
    }
    Ok(out)
}

/// The kernel configuration `backend` is compared with (udp has no kernel twin: VXLAN).
fn baseline_of(backend: Backend) -> Backend {
    match backend {
        Backend::Udp => Backend::Vxlan,
        other => other,
    }
}

/// The order of the configurations `keys` in repetition `rep`: grouped by baseline with the
/// kernel one in the middle (`vxlan twill, vxlan kernel, udp twill`), so every twill
/// configuration sits next to its baseline; each group reversed in odd repetitions, the groups
/// rotated. Indices into `keys`.
fn schedule(keys: &[(Backend, Plane)], rep: usize) -> Vec<usize> {
    let mut groups: BTreeMap<Backend, Vec<usize>> = BTreeMap::new();
    for (i, (b, _)) in keys.iter().enumerate() {
        groups.entry(baseline_of(*b)).or_default().push(i);
    }
    let mut groups: Vec<Vec<usize>> = groups
        .into_values()
        .map(|mut g| {
            g.sort_by_key(|&i| match keys[i] {
                (Backend::Udp, _) => 2,
                (_, Plane::Kernel) => 1,
                (_, Plane::Twill) => 0,
            });
            if rep % 2 == 1 {
                g.reverse();
            }
            g
        })
        .collect();
    if !groups.is_empty() {
        let r = rep % groups.len();
        groups.rotate_left(r);
    }
    groups.concat()
}

/// Per repetition, twill's figure over the baseline's measured next to it; the median of those.
fn paired_ratio(twill: &[f64], kernel: &[f64]) -> f64 {
    let ratios: Vec<f64> = twill.iter().zip(kernel).map(|(t, k)| t / k).collect();
    median(&ratios)
}

/// One test on one configuration, recorded into `entry`; the outcome as text.
fn measure_one(s: &Setup, test: Test, p: Params, entry: &mut Samples) -> Result<String> {
    match test {
        Test::Tcp1 | Test::Tcp2 => {
            let streams = if test == Test::Tcp1 { 1 } else { 2 };
            let run = iperf(s, streams, p.iperf_secs)?;
            let (rates, costs) = if streams == 1 {
                (&mut entry.tcp1_gbps, &mut entry.tcp1_cpu_s_per_gb)
            } else {
                (&mut entry.tcp2_gbps, &mut entry.tcp2_cpu_s_per_gb)
            };
            rates.push(run.gbps);
            costs.push(run.cpu_s_per_gb);
            Ok(format!(
                "{} Gbit/s, {} CPU-s/GB",
                fmt_num(run.gbps),
                fmt_num(run.cpu_s_per_gb)
            ))
        }
        Test::Ping => {
            let rtts = ping_rtts(&s.client.ns, s.server_ip, p.ping_count, PING_INTERVAL)?;
            let avg = super::stats::mean(&rtts);
            let p99 = percentile(&rtts, 99.0);
            let got = u32::try_from(rtts.len()).unwrap_or(u32::MAX);
            entry.ping_lost += p.ping_count.saturating_sub(got);
            entry.ping_avg_ms.push(avg);
            entry.ping_p99_ms.push(p99);
            entry.rtts_ms.extend(rtts);
            Ok(format!("avg {} ms, p99 {} ms", fmt_num(avg), fmt_num(p99)))
        }
    }
}

/// What one iperf3 run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
struct IperfRun {
    /// The received rate.
    gbps: f64,
    /// CPU time spent per GB received, in seconds: iperf3's client and server (their own
    /// accounting, user + system) plus every twilld of the rig (from /proc). The kernel's
    /// forwarding work (softirqs) is charged to the process it runs in, so this is the whole
    /// path's cost, wherever it ran: for the hand-built rigs all of it sits in the two iperf3
    /// processes, for twill's udp backend most of it in the agents. Work that lands in an
    /// interrupt of an unrelated process is not counted, for either.
    cpu_s_per_gb: f64,
}

/// A TCP iperf3 run from the client pod to the server pod. One retry: the server can still be
/// wrapping up the previous test.
fn iperf(s: &Setup, streams: u32, secs: u32) -> Result<IperfRun> {
    let addr = s.server_ip.to_string();
    let t = secs.to_string();
    let p = streams.to_string();
    let args = ["iperf3", "-c", &addr, "-t", &t, "-P", &p, "-J"];
    let mut last = None;
    for attempt in 0..2 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        let before = agents_cpu_s(&s.rig);
        let out = exec_timeout(
            &s.client.ns,
            &args,
            Duration::from_secs(u64::from(secs) + 30),
        )?;
        let agents = agents_cpu_s(&s.rig) - before;
        match parse_iperf_run(&out.stdout, agents) {
            Ok(r) => return Ok(r),
            Err(e) => last = Some(e.context(format!("iperf3 exited {}", out.status))),
        }
    }
    Err(last.expect("two attempts"))
}

/// The rate and the CPU cost of an iperf3 run (its JSON), with `agents_s` CPU-seconds spent by
/// the agents meanwhile.
fn parse_iperf_run(stdout: &[u8], agents_s: f64) -> Result<IperfRun> {
    let report: serde_json::Value =
        serde_json::from_slice(stdout).context("iperf3 printed no JSON")?;
    if let Some(err) = report.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {err}");
    }
    let sum = &report["end"]["sum_received"];
    let bps = sum["bits_per_second"]
        .as_f64()
        .context("no end.sum_received.bits_per_second in iperf3's report")?;
    ensure!(bps > 0.0, "iperf3 received nothing");
    let bytes = sum["bytes"].as_f64().unwrap_or(0.0);
    let secs = sum["seconds"].as_f64().unwrap_or(0.0);
    let cpu = &report["end"]["cpu_utilization_percent"];
    let pct =
        cpu["host_total"].as_f64().unwrap_or(0.0) + cpu["remote_total"].as_f64().unwrap_or(0.0);
    let cpu_s = pct / 100.0 * secs + agents_s.max(0.0);
    Ok(IperfRun {
        gbps: bps / 1e9,
        cpu_s_per_gb: if bytes > 0.0 {
            cpu_s / (bytes / 1e9)
        } else {
            f64::NAN
        },
    })
}

/// CPU time (user + system, seconds) of every twilld of `rig` so far: the processes whose
/// command line names twilld and the rig's directory. 0 for the hand-built rigs.
fn agents_cpu_s(rig: &Rig) -> f64 {
    let dir = rig.temp_dir().display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut ticks = 0u64;
    for e in entries.flatten() {
        let path = e.path();
        let Ok(cmdline) = std::fs::read(path.join("cmdline")) else {
            continue;
        };
        let mut args = cmdline.split(|b| *b == 0).map(String::from_utf8_lossy);
        let is_twilld = args
            .next()
            .is_some_and(|a| a.rsplit('/').next() == Some("twilld"));
        if !is_twilld || !args.any(|a| a.contains(&dir)) {
            continue;
        }
        if let Ok(stat) = std::fs::read_to_string(path.join("stat")) {
            ticks += stat_ticks(&stat).unwrap_or(0);
        }
    }
    #[expect(clippy::cast_precision_loss, reason = "clock ticks of a benchmark")]
    let secs = ticks as f64 / clock_ticks_per_s();
    secs
}

/// utime + stime (clock ticks) from a `/proc/<pid>/stat` line.
fn stat_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis,
    // where field 3 (state) is index 0, utime (14) index 11, stime (15) index 12.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// The kernel's clock ticks per second for /proc times (`getconf CLK_TCK`; USER_HZ is 100 on
/// every Linux this runs on, the fallback).
fn clock_ticks_per_s() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// A fake peer's lease.
#[derive(Debug, Clone)]
struct FakeLease {
    key: String,
    value: String,
    /// Line prefixes of the monitors' notifications that mean "programmed".
    added: Vec<String>,
    /// ... and "removed".
    deleted: Vec<String>,
}

impl FakeLease {
    /// Peer `i` (public IP `198.18.0.(30+i)`) holding `10.244.<k>.0/24`.
    fn new(backend: Backend, i: usize, k: u8) -> Self {
        let public = Ipv4Addr::new(
            198,
            18,
            0,
            30 + u8::try_from(i).expect("at most 200 leases"),
        );
        let net = Ipv4Addr::new(10, 244, k, 0);
        let route = format!("{net}/24 ");
        let mut added = vec![route.clone()];
        let value = if backend == Backend::Vxlan {
            let mac = format!("0e:74:77:00:{k:02x}:01");
            added.push(format!("{net} dev flannel.1 "));
            added.push(format!("{mac} dev flannel.1 dst {public} "));
            format!(
                r#"{{"PublicIP":"{public}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
            )
        } else {
            format!(r#"{{"PublicIP":"{public}","BackendType":"{backend}"}}"#)
        };
        FakeLease {
            key: format!("{ETCD_PREFIX}/subnets/{net}-24"),
            value,
            added,
            deleted: vec![format!("Deleted {route}")],
        }
    }
}

/// Strips `ip monitor`'s optional `[ROUTE]`-style labels.
fn unlabel(line: &str) -> &str {
    let mut l = line.trim_start();
    while l.starts_with('[') {
        match l.find(']') {
            Some(i) => l = l[i + 1..].trim_start(),
            None => break,
        }
    }
    l
}

/// Waits until a line starting with each of `prefixes` has been seen; the time of the last one,
/// or `None` at `deadline`.
fn wait_lines(
    monitor: &LineMonitor,
    prefixes: &[String],
    deadline: Instant,
) -> Result<Option<Instant>> {
    let mut missing: Vec<&String> = prefixes.iter().collect();
    let mut last = None;
    while !missing.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let Some((at, line)) = monitor.next_line(left)? else {
            return Ok(None);
        };
        let line = unlabel(&line);
        let before = missing.len();
        missing.retain(|p| !line.starts_with(p.as_str()));
        if missing.len() < before {
            last = Some(at);
        }
    }
    Ok(last)
}

/// Writes `n` fake leases one at a time, each waited for, then deletes them one at a time.
fn lease_latency(
    s: &Setup,
    n: usize,
    progress: &super::progress::Progress,
    what: &str,
) -> Result<LeaseSamples> {
    let taken: Vec<u8> = s.subnets.iter().map(|(net, _)| net.octets()[2]).collect();
    // One warm-up lease first, not counted.
    let ks: Vec<u8> = (1..=254u8)
        .filter(|k| !taken.contains(k))
        .take(n + 1)
        .collect();
    ensure!(ks.len() == n + 1, "not enough free subnets for {n} leases");
    let leases: Vec<FakeLease> = ks
        .iter()
        .enumerate()
        .map(|(i, &k)| FakeLease::new(s.backend, i, k))
        .collect();
    let node_ns = s.rig.node_ns(1);
    let route: &[&str] = &["ip", "-4", "monitor", "route"];
    let neigh: &[&str] = &["ip", "-4", "monitor", "neigh"];
    let fdb: &[&str] = &["bridge", "monitor", "fdb"];
    let commands: Vec<&[&str]> = if s.backend == Backend::Vxlan {
        vec![route, neigh, fdb]
    } else {
        vec![route]
    };
    let monitor = LineMonitor::spawn_many(&node_ns, &commands)?;
    // The monitors subscribe within milliseconds; the warm-up lease proves they did.
    std::thread::sleep(Duration::from_millis(200));
    let etcd = EtcdHttp {
        addr: SocketAddr::from((UNDERLAY_V4, 2379)),
    };
    let backend = s.backend;
    in_netns(&s.rig.underlay_ns(), move || {
        let mut out = LeaseSamples {
            backend: backend.to_string(),
            ..LeaseSamples::default()
        };
        for (i, lease) in leases.iter().enumerate() {
            if i % 10 == 0 {
                progress.working(&format!("{what}: add {i}/{n}"));
            }
            monitor.drain();
            let t0 = Instant::now();
            etcd.put(&lease.key, &lease.value)?;
            let done = wait_lines(&monitor, &lease.added, t0 + LEASE_DEADLINE)?;
            if i == 0 {
                ensure!(
                    done.is_some(),
                    "the warm-up lease {} was not programmed within {LEASE_DEADLINE:?}",
                    lease.key
                );
                continue;
            }
            if let Some(t) = done {
                out.add_ms.push(ms(t - t0));
            } else {
                out.add_timeouts += 1;
                out.add_ms.push(ms(LEASE_DEADLINE));
            }
        }
        for (i, lease) in leases.iter().enumerate() {
            if i % 10 == 0 {
                progress.working(&format!("{what}: delete {i}/{n}"));
            }
            monitor.drain();
            let t0 = Instant::now();
            etcd.delete(&lease.key)?;
            let done = wait_lines(&monitor, &lease.deleted, t0 + LEASE_DEADLINE)?;
            if i == 0 {
                continue;
            }
            if let Some(t) = done {
                out.del_ms.push(ms(t - t0));
            } else {
                out.del_timeouts += 1;
                out.del_ms.push(ms(LEASE_DEADLINE));
            }
        }
        Ok(out)
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// "9.81 [9.5–10.1]": the median and the repetitions' range.
fn med_range(v: &[f64]) -> String {
    let s = sorted(v);
    match (s.first(), s.last()) {
        (Some(lo), Some(hi)) if s.len() > 1 => {
            format!("{} [{}–{}]", fmt_num(median(v)), fmt_num(*lo), fmt_num(*hi))
        }
        _ => fmt_num(median(v)),
    }
}

fn bar(v: &[f64]) -> Option<Bar> {
    let s = sorted(v);
    Some(Bar {
        value: median(v),
        low: *s.first()?,
        high: *s.last()?,
    })
}

/// The report section: tables, targets, plots, raw samples.
fn section(
    setups: &[(String, Backend, Plane)],
    samples: &BTreeMap<String, Samples>,
    leases: &[LeaseSamples],
    p: Params,
    mut notes: Vec<String>,
) -> Section {
    let mut metrics = Vec::new();
    let mut checks = Vec::new();
    let metric = |metrics: &mut Vec<Metric>, name: String, unit: &str, value: f64| {
        metrics.push(Metric {
            name,
            unit: unit.into(),
            value,
        });
    };
    for (label, ..) in setups {
        let Some(s) = samples.get(label) else {
            continue;
        };
        let key = label.replace(' ', ".");
        metric(
            &mut metrics,
            format!("{key}.tcp1.median"),
            "Gbit/s",
            median(&s.tcp1_gbps),
        );
        metric(
            &mut metrics,
            format!("{key}.tcp2.median"),
            "Gbit/s",
            median(&s.tcp2_gbps),
        );
        metric(
            &mut metrics,
            format!("{key}.ping_avg.median"),
            "ms",
            median(&s.ping_avg_ms),
        );
        metric(
            &mut metrics,
            format!("{key}.ping_p99.median"),
            "ms",
            median(&s.ping_p99_ms),
        );
        if s.ping_lost > 0 {
            notes.push(format!("{label}: {} ping(s) lost", s.ping_lost));
        }
    }

    // Pairs: each twill configuration with its kernel baseline (udp's is kernel VXLAN).
    let mut tput = Table {
        title: "Pod-to-pod TCP throughput, Gbit/s (median [min–max] of the repetitions)".into(),
        header: [
            "backend",
            "test",
            "twill",
            "kernel baseline",
            "twill/kernel",
            "target",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    let mut lat = Table {
        title: format!(
            "Pod-to-pod ping RTT, ms ({} pings {} ms apart per repetition; median of the \
             repetitions' mean and p99)",
            p.ping_count, p.ping_interval_ms
        ),
        header: [
            "backend",
            "twill avg",
            "kernel avg",
            "twill p99",
            "kernel p99",
            "avg twill/kernel",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    let mut cpu = Table {
        title: "CPU cost per GB moved, CPU-seconds (iperf3 client + server + twilld on both \
                nodes; the kernel's forwarding work counts where it runs; median [min–max] of \
                the repetitions)"
            .into(),
        header: [
            "backend",
            "test",
            "twill",
            "kernel baseline",
            "twill/kernel",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    let mut reps = Table {
        title: "Per repetition: throughput (Gbit/s) and CPU cost (CPU-s/GB), twill next to its \
                baseline"
            .into(),
        header: [
            "backend",
            "test",
            "rep",
            "twill Gbit/s",
            "kernel Gbit/s",
            "ratio",
            "twill CPU-s/GB",
            "kernel CPU-s/GB",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    let mut groups = Vec::new();
    let mut twill_bars = Vec::new();
    let mut kernel_bars = Vec::new();
    for (label, backend, plane) in setups {
        if *plane != Plane::Twill {
            continue;
        }
        let base_backend = baseline_of(*backend);
        let base_label = format!("{base_backend} kernel");
        let (Some(t), Some(k)) = (samples.get(label), samples.get(&base_label)) else {
            continue;
        };
        let base_name = if *backend == Backend::Udp {
            "kernel VXLAN".to_string()
        } else {
            "kernel".to_string()
        };
        for (test, tv, kv, tc, kc) in [
            (
                Test::Tcp1,
                &t.tcp1_gbps,
                &k.tcp1_gbps,
                &t.tcp1_cpu_s_per_gb,
                &k.tcp1_cpu_s_per_gb,
            ),
            (
                Test::Tcp2,
                &t.tcp2_gbps,
                &k.tcp2_gbps,
                &t.tcp2_cpu_s_per_gb,
                &k.tcp2_cpu_s_per_gb,
            ),
        ] {
            let short = if test == Test::Tcp1 { "tcp1" } else { "tcp2" };
            let tc: Vec<f64> = tc.iter().copied().filter(|v| v.is_finite()).collect();
            let kc: Vec<f64> = kc.iter().copied().filter(|v| v.is_finite()).collect();
            if !tc.is_empty() && !kc.is_empty() {
                let cost = paired_ratio(&tc, &kc);
                metric(
                    &mut metrics,
                    format!("{backend}.{short}.cpu_s_per_gb.twill"),
                    "CPU-s/GB",
                    median(&tc),
                );
                metric(
                    &mut metrics,
                    format!("{backend}.{short}.cpu_s_per_gb.kernel"),
                    "CPU-s/GB",
                    median(&kc),
                );
                metric(
                    &mut metrics,
                    format!("{backend}.ratio.{short}_cpu"),
                    "ratio",
                    cost,
                );
                cpu.rows.push(vec![
                    backend.to_string(),
                    test.label().into(),
                    med_range(&tc),
                    med_range(&kc),
                    format!("{cost:.3}"),
                ]);
            }
            let cell =
                |v: &Vec<f64>, i: usize| v.get(i).map_or_else(|| "-".into(), |x| fmt_num(*x));
            let (tca, kca) = if test == Test::Tcp1 {
                (&t.tcp1_cpu_s_per_gb, &k.tcp1_cpu_s_per_gb)
            } else {
                (&t.tcp2_cpu_s_per_gb, &k.tcp2_cpu_s_per_gb)
            };
            for (i, (a, b)) in tv.iter().zip(kv.iter()).enumerate() {
                reps.rows.push(vec![
                    backend.to_string(),
                    test.label().into(),
                    (i + 1).to_string(),
                    fmt_num(*a),
                    fmt_num(*b),
                    format!("{:.3}", a / b),
                    cell(tca, i),
                    cell(kca, i),
                ]);
            }
            let ratio = paired_ratio(tv, kv);
            let what = format!("{backend} {} twill/{base_name}", test.label());
            metric(
                &mut metrics,
                format!(
                    "{backend}.ratio.{}",
                    if test == Test::Tcp1 { "tcp1" } else { "tcp2" }
                ),
                "ratio",
                ratio,
            );
            checks.push(Check::at_least(what, ratio, target(*backend)));
            tput.rows.push(vec![
                backend.to_string(),
                test.label().into(),
                med_range(tv),
                if *backend == Backend::Udp {
                    format!("{} (VXLAN)", med_range(kv))
                } else {
                    med_range(kv)
                },
                format!("{ratio:.3}"),
                format!(">= {}", target(*backend)),
            ]);
            let streams = if test == Test::Tcp1 { 1 } else { 2 };
            groups.push(format!("{backend} -P{streams}: {ratio:.3}"));
            twill_bars.push(bar(tv));
            kernel_bars.push(bar(kv));
        }
        let ratio = paired_ratio(&t.ping_avg_ms, &k.ping_avg_ms);
        metric(
            &mut metrics,
            format!("{backend}.ratio.ping_avg"),
            "ratio",
            ratio,
        );
        lat.rows.push(vec![
            if *backend == Backend::Udp {
                "udp (kernel: VXLAN)".to_string()
            } else {
                backend.to_string()
            },
            fmt_num(median(&t.ping_avg_ms)),
            fmt_num(median(&k.ping_avg_ms)),
            fmt_num(median(&t.ping_p99_ms)),
            fmt_num(median(&k.ping_p99_ms)),
            format!("{ratio:.3}"),
        ]);
    }

    let mut lease_table = Table {
        title: format!(
            "Lease written in etcd → programmed on node 1, ms ({} leases one at a time)",
            p.leases
        ),
        header: [
            "backend",
            "add p50",
            "add p99",
            "add max",
            "delete p50",
            "delete p99",
            "delete max",
            "timeouts",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    for l in leases {
        let add = Summary::of(&l.add_ms);
        let del = Summary::of(&l.del_ms);
        for (name, v) in [
            ("add.p50", add.p50),
            ("add.p99", add.p99),
            ("add.max", add.max),
            ("delete.p50", del.p50),
            ("delete.p99", del.p99),
        ] {
            metric(&mut metrics, format!("{}.lease.{name}", l.backend), "ms", v);
        }
        checks.push(Check::at_most(
            format!("{} lease→programmed p99", l.backend),
            add.p99,
            LEASE_P99_TARGET_MS,
            "ms",
        ));
        lease_table.rows.push(vec![
            l.backend.clone(),
            fmt_num(add.p50),
            fmt_num(add.p99),
            fmt_num(add.max),
            fmt_num(del.p50),
            fmt_num(del.p99),
            fmt_num(del.max),
            format!("{} / {}", l.add_timeouts, l.del_timeouts),
        ]);
        if l.add_timeouts + l.del_timeouts > 0 {
            notes.push(format!(
                "{}: {} add and {} delete timeouts (> {LEASE_DEADLINE:?}), counted as {} ms",
                l.backend,
                l.add_timeouts,
                l.del_timeouts,
                ms(LEASE_DEADLINE)
            ));
        }
    }

    let mut plots = Vec::new();
    if !groups.is_empty() {
        plots.push(Plot::Bars(BarChart {
            file: "overlay-throughput.svg".into(),
            title: "Pod-to-pod TCP throughput (iperf3 -P1/-P2; labels: twill/kernel ratio)".into(),
            y_label: "Gbit/s (median; whiskers: min–max of repetitions)".into(),
            groups,
            series: vec![
                BarSeries {
                    name: "twill".into(),
                    values: twill_bars,
                },
                BarSeries {
                    name: if setups.iter().any(|(_, b, _)| *b == Backend::Udp) {
                        "kernel baseline (udp: kernel VXLAN)".into()
                    } else {
                        "kernel baseline".into()
                    },
                    values: kernel_bars,
                },
            ],
        }));
    }
    let rtt_series: Vec<(String, Vec<f64>)> = setups
        .iter()
        .filter_map(|(label, ..)| Some((label.clone(), samples.get(label)?.rtts_ms.clone())))
        .collect();
    if !rtt_series.is_empty() {
        plots.push(Plot::Cdf(CdfChart {
            file: "overlay-ping.svg".into(),
            title: "Pod-to-pod ping RTT distribution".into(),
            x_label: "RTT, ms (log scale)".into(),
            series: rtt_series,
        }));
    }
    if !leases.is_empty() {
        let mut series = Vec::new();
        for l in leases {
            series.push((format!("{} add", l.backend), l.add_ms.clone()));
            series.push((format!("{} delete", l.backend), l.del_ms.clone()));
        }
        plots.push(Plot::Cdf(CdfChart {
            file: "overlay-lease.svg".into(),
            title: "Lease written in etcd → node programmed".into(),
            x_label: "latency, ms (log scale)".into(),
            series,
        }));
    }

    let mut about = String::new();
    let _ = write!(
        about,
        "Two nodes with a pod each, per configuration: twill (etcd, `twilld` on both nodes) and \
         the same rig built by hand — flannel's VXLAN recipe (`flannel.1`, a route, a permanent \
         neighbour and an FDB entry per peer) or host-gw's `ip route add <peer subnet> via \
         <peer node>` — with the same subnets, MTU and pod layout. Per repetition ({} in all), \
         each test runs on every configuration back to back: `iperf3 -c <pod> -t {}` with 1 \
         and 2 streams, then `ping -c {} -i 0.{:03}`, twill next to its baseline. Figures are \
         medians of the repetitions; a ratio is the median of the repetitions' paired ratios \
         (twill over the baseline measured right next to it). udp is compared with kernel VXLAN.\n\n\
         Lease-to-programmed: with `twilld` running, {} fake peer leases (flannel's JSON) are \
         written one at a time through etcd's HTTP gateway; the clock stops when `ip monitor` / \
         `bridge monitor` in node 1 has reported the route (and, for VXLAN, the neighbour and \
         FDB entry). Then the leases are deleted one at a time, timed to the route's removal.",
        p.reps, p.iperf_secs, p.ping_count, p.ping_interval_ms, p.leases
    );

    Section {
        name: "overlay".into(),
        title: "Overlay: pod-to-pod throughput and latency, lease-to-programmed".into(),
        about,
        metrics,
        tables: [tput, cpu, reps, lat, lease_table]
            .into_iter()
            .filter(|t| !t.rows.is_empty())
            .collect(),
        checks,
        notes,
        plot_files: Vec::new(),
        plots,
        raw: serde_json::json!({
            "params": p,
            "configurations": samples,
            "leases": leases,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_leases_are_flannel_json_and_know_their_entries() {
        let l = FakeLease::new(Backend::Vxlan, 3, 17);
        assert_eq!(l.key, "/coreos.com/network/subnets/10.244.17.0-24");
        let v: serde_json::Value = serde_json::from_str(&l.value).unwrap();
        assert_eq!(v["PublicIP"], "198.18.0.33");
        assert_eq!(v["BackendData"]["VtepMAC"], "0e:74:77:00:11:01");
        assert_eq!(v["BackendData"]["VNI"], 1);
        assert_eq!(l.added.len(), 3);
        assert!(
            l.added
                .contains(&"0e:74:77:00:11:01 dev flannel.1 dst 198.18.0.33 ".to_string())
        );
        let h = FakeLease::new(Backend::HostGw, 0, 5);
        assert_eq!(
            h.value,
            r#"{"PublicIP":"198.18.0.30","BackendType":"host-gw"}"#
        );
        assert_eq!(h.added, ["10.244.5.0/24 "]);
        assert_eq!(h.deleted, ["Deleted 10.244.5.0/24 "]);
    }

    #[test]
    fn finds_why_udp_was_refused() {
        let e = "no subnet file /x/n1/subnet.env: twilld on node 1 exited (1); \
                 its log ends:\n==== twill-rig: starting twilld\nError: Backend.Type \"udp\" is \
                 not available\n   31: _start";
        assert_eq!(
            skip_reason(e),
            "Error: Backend.Type \"udp\" is not available"
        );
        assert_eq!(skip_reason("boom\nmore"), "boom");
    }

    #[test]
    fn waits_for_monitor_lines() {
        assert_eq!(unlabel("[ROUTE]10.244.5.0/24 via x"), "10.244.5.0/24 via x");
        assert_eq!(
            unlabel("10.244.5.0 dev flannel.1"),
            "10.244.5.0 dev flannel.1"
        );
    }

    #[test]
    fn twill_runs_next_to_its_baseline() {
        use Backend::{HostGw, Udp, Vxlan};
        use Plane::{Kernel, Twill};
        let keys = [
            (Vxlan, Twill),
            (HostGw, Twill),
            (Udp, Twill),
            (Vxlan, Kernel),
            (HostGw, Kernel),
        ];
        assert_eq!(schedule(&keys, 0), [0, 3, 2, 1, 4]);
        assert_eq!(schedule(&keys, 1), [4, 1, 2, 3, 0]);
        assert_eq!(schedule(&keys, 2), [0, 3, 2, 1, 4]);
        assert_eq!(schedule(&keys[..1], 1), [0]);
        assert!((paired_ratio(&[9.0, 5.0, 10.0], &[10.0, 5.0, 8.0]) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn parses_iperf_json() {
        let ok = br#"{"end":{"sum_received":{"bits_per_second":9.5e9}}}"#;
        assert!((parse_iperf_run(ok, 0.0).unwrap().gbps - 9.5).abs() < 1e-9);
        let busy = br#"{"error":"the server is busy running a test. try again later"}"#;
        assert!(
            parse_iperf_run(busy, 0.0)
                .unwrap_err()
                .to_string()
                .contains("busy")
        );
        assert!(parse_iperf_run(b"", 0.0).is_err());
        // 5 GB in 4 s; client 50 % and server 25 % of a CPU (3 CPU-s) and the agents' 2 CPU-s:
        // 1 CPU-s per GB.
        let full = br#"{"end":{"sum_received":{"bits_per_second":1e10,"bytes":5e9,"seconds":4},
            "cpu_utilization_percent":{"host_total":50,"remote_total":25}}}"#;
        let r = parse_iperf_run(full, 2.0).unwrap();
        assert!((r.cpu_s_per_gb - 1.0).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn reads_cpu_ticks_from_proc_stat() {
        let line = "4479 (udp worker) S 1 4479 4479 0 -1 4194560 1 0 0 0 150 27 0 0 20 0 5 0";
        assert_eq!(stat_ticks(line), Some(177));
        assert_eq!(stat_ticks("garbage"), None);
        // Our own process: some CPU time, read the same way.
        let me = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(stat_ticks(&me).is_some());
    }

    #[test]
    fn section_pairs_twill_with_its_baseline() {
        let setups = vec![
            ("vxlan twill".to_string(), Backend::Vxlan, Plane::Twill),
            ("udp twill".to_string(), Backend::Udp, Plane::Twill),
            ("vxlan kernel".to_string(), Backend::Vxlan, Plane::Kernel),
        ];
        let s = |g: f64| Samples {
            tcp1_gbps: vec![g, g * 1.1, g * 0.9],
            tcp2_gbps: vec![g * 2.0; 3],
            tcp1_cpu_s_per_gb: vec![10.0 / g; 3],
            tcp2_cpu_s_per_gb: vec![f64::NAN, 5.0 / g, 5.0 / g],
            ping_avg_ms: vec![0.05; 3],
            ping_p99_ms: vec![0.1; 3],
            ping_lost: 0,
            rtts_ms: vec![0.05, 0.06],
        };
        let samples: BTreeMap<String, Samples> = [
            ("vxlan twill".to_string(), s(9.8)),
            ("udp twill".to_string(), s(7.5)),
            ("vxlan kernel".to_string(), s(10.0)),
        ]
        .into();
        let leases = vec![LeaseSamples {
            backend: "vxlan".into(),
            add_ms: vec![3.0, 4.0, 50.0],
            del_ms: vec![2.0, 2.5],
            add_timeouts: 0,
            del_timeouts: 0,
        }];
        let sec = section(&setups, &samples, &leases, Params::new(true, 3), Vec::new());
        let ratio = |name: &str| sec.metrics.iter().find(|m| m.name == name).unwrap().value;
        assert!((ratio("vxlan.ratio.tcp1") - 0.98).abs() < 1e-9);
        assert!((ratio("udp.ratio.tcp1") - 0.75).abs() < 1e-9);
        assert!(sec.checks.iter().all(|c| c.pass), "{:?}", sec.checks);
        assert!((ratio("udp.ratio.tcp1_cpu") - 10.0 / 7.5 / 1.0).abs() < 1e-9);
        assert!((ratio("udp.tcp2.cpu_s_per_gb.kernel") - 0.5).abs() < 1e-9);
        assert_eq!(sec.tables[1].rows.len(), 4, "CPU cost per pair and test");
        assert_eq!(sec.tables[2].rows.len(), 12, "per repetition");
        assert_eq!(sec.tables[2].rows[0][2], "1");
        assert_eq!(sec.tables[0].rows.len(), 4);
        assert!(sec.tables[0].rows[2][3].ends_with("(VXLAN)"));
        assert_eq!(sec.plots.len(), 3);
        assert!(
            sec.metrics
                .iter()
                .all(|m| m.value.is_finite() && m.value > 0.0)
        );
    }
}
