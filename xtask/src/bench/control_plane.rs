//! `bench control-plane`: control-plane scale by simulation — 1000 nodes' leases and 10k
//! services × 10 endpoints in etcd, one real twilld (VXLAN overlay, eBPF service proxy)
//! starting up against them: how long until its node is fully programmed, and how much memory
//! it takes. Then, with the 999 peers in place, the lease-to-programmed latency of one more.
//!
//! Why it is shaped as it is:
//! - The 999 other nodes are leases only (flannel's JSON, written straight into etcd in
//!   128-key transactions), with public addresses in 198.19.0.0/16 that no namespace has: twilld
//!   programs a route, a permanent neighbour and an FDB entry for each, and nothing is ever sent
//!   to them. The services are the services benchmark's fillers.
//! - "Fully programmed" is read from the kernel and from the agent: the node's `flannel.1`
//!   routes, permanent neighbours and FDB entries each number 999 (polled every 25 ms with `ip`
//!   / `bridge`), and twilld's `/metrics` report every frontend and backend programmed into the
//!   eBPF maps. The clock starts just before twilld is spawned, so it includes the process
//!   start, the etcd lists and both syncs.
//! - Memory is twilld's peak resident set (`VmHWM` of `/proc/PID/status`) once programmed and
//!   settled; the eBPF maps live in kernel memory, not in the agent's RSS, and are reported
//!   separately (`bytes_memlock` of the pinned maps, from `bpftool`).
//! - The backend is VXLAN (`--backend vxlan`, the default). host-gw works too for small runs
//!   (`--backend host-gw --quick`: its peers' public addresses must sit on the rig's underlay
//!   /24, so at most 150 of them), which is what the CI smoke run uses until twilld can run the
//!   eBPF proxy on a VXLAN node (it pins a tc link named after `flannel.1`, and bpffs refuses
//!   dots in names).
//! - One repetition per rig node: each starts a fresh twilld on a node that has never run one;
//!   the previous repetition's twilld is stopped and its lease removed first, so every run sees
//!   exactly 999 peers.
//! - The anchor the issue compares with: the Cilium agent averages 438 MiB of memory at 1000
//!   nodes / 50k pods.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Serialize;
use twill_tests::bench_support::EtcdHttp;
use twill_tests::metrics::sample;
use twill_tests::ns::{http_get, in_netns};
use twill_tests::rig::{ETCD_PREFIX, UNDERLAY_V4};
use twill_tests::state::RigState;
use twill_tests::{Rig, RigOptions, run};

use super::kit::{Benchmark, Context};
use super::overlay::peer_monitor;
use super::plot::{CdfChart, Chart, Plot};
use super::progress::Progress;
use super::report::{Check, Metric, Section, Table, fmt_num};
use super::services::filler_entries;
use super::stats::{Summary, median};
use crate::cluster::Backend;
use crate::cluster::{METRICS_ADDR, ProxyMode, check_proxy_mode};

/// The cluster network (room for 32768 /24 node subnets) for `backend`.
fn network_config(backend: Backend) -> String {
    format!(r#"{{"Network":"10.128.0.0/9","SubnetLen":24,"Backend":{{"Type":"{backend}"}}}}"#)
}

/// host-gw peers' public addresses: `198.18.0.(HOST_GW_BASE + k)`, on the rig's underlay.
const HOST_GW_BASE: usize = 100;
/// ... so at most this many fake host-gw nodes (and extra leases) fit.
const HOST_GW_MAX: usize = 150;
/// The VXLAN device twilld makes (VNI 1).
const VXLAN_DEV: &str = "flannel.1";
/// Targets (issue 7).
const PROGRAMMED_TARGET_S: f64 = 2.0;
const RSS_TARGET_MIB: f64 = 50.0;
/// The anchor: Cilium agent memory at 1000 nodes / 50k pods.
const CILIUM_ANCHOR_MIB: f64 = 438.0;
/// How long one twilld gets to program everything before the run fails.
const PROGRAM_TIMEOUT: Duration = Duration::from_mins(2);
/// Lease-to-programmed deadline for one lease.
const LEASE_DEADLINE: Duration = Duration::from_secs(5);

/// The control-plane benchmark.
#[derive(Debug, Clone, Copy)]
pub struct ControlPlane;

#[derive(Debug, Clone, Copy, Serialize)]
struct Params {
    backend: Backend,
    reps: usize,
    /// Nodes in the simulated cluster (twilld's own included).
    nodes: usize,
    /// Services (× 10 endpoints).
    services: usize,
    /// Extra leases timed one at a time per repetition, with the cluster in place.
    leases: usize,
}

impl Params {
    fn new(backend: Backend, quick: bool, reps: usize) -> Self {
        Params {
            backend,
            reps,
            nodes: if quick { 50 } else { 1000 },
            services: if quick { 100 } else { 10_000 },
            leases: if quick { 5 } else { 20 },
        }
    }
}

/// Fake peer `k` (1-based): its subnet, key, public address, VTEP MAC and lease JSON.
struct FakeNode {
    key: String,
    value: String,
    /// Line prefixes of `ip monitor` / `bridge monitor` that mean "programmed".
    programmed: Vec<String>,
}

impl FakeNode {
    fn new(backend: Backend, k: usize) -> Self {
        let k16 = u16::try_from(k).expect("fewer than 65536 fake nodes");
        let [hi, lo] = k16.to_be_bytes();
        // 10.128.0.0/9 in /24s: subnet number k (k < 32768).
        let net = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (u32::from(k16) << 8));
        let mac = format!("0e:74:77:01:{hi:02x}:{lo:02x}");
        let (value, programmed) = if backend == Backend::Vxlan {
            let public = Ipv4Addr::new(198, 19, hi, lo);
            (
                format!(
                    r#"{{"PublicIP":"{public}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
                ),
                vec![
                    format!("{net}/24 "),
                    format!("{net} dev {VXLAN_DEV} "),
                    format!("{mac} dev {VXLAN_DEV} dst {public} "),
                ],
            )
        } else {
            assert!(
                k <= HOST_GW_MAX,
                "host-gw peer {k} does not fit the underlay"
            );
            let last = u8::try_from(HOST_GW_BASE + k).expect("checked above");
            let public = Ipv4Addr::new(198, 18, 0, last);
            (
                format!(r#"{{"PublicIP":"{public}","BackendType":"{backend}"}}"#),
                vec![format!("{net}/24 via {public} ")],
            )
        };
        FakeNode {
            key: format!("{ETCD_PREFIX}/subnets/{net}-24"),
            value,
            programmed,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
struct Rep {
    /// twilld spawned → routes, neighbours and FDB entries for every peer, s.
    overlay_s: f64,
    /// twilld spawned → every frontend and backend programmed, s.
    services_s: f64,
    /// The later of the two.
    programmed_s: f64,
    /// Peak RSS once programmed and settled, MiB.
    vm_hwm_mib: f64,
    /// RSS then, MiB.
    vm_rss_mib: f64,
    /// Kernel memory of the pinned service maps, MiB.
    maps_mib: f64,
    /// Entries counted when done.
    routes: usize,
    neighbours: usize,
    fdb: usize,
    frontends: f64,
    backends: f64,
    /// One more lease → its route, neighbour and FDB entry, ms.
    lease_ms: Vec<f64>,
    lease_timeouts: usize,
}

impl Benchmark for ControlPlane {
    fn run(&self, ctx: &Context<'_>) -> Result<Section> {
        let backend = if ctx.opts.backends.contains(&Backend::Vxlan) {
            Backend::Vxlan
        } else if ctx.opts.backends.contains(&Backend::HostGw) {
            Backend::HostGw
        } else {
            bail!("the control-plane benchmark runs the vxlan or the host-gw backend");
        };
        let p = Params::new(backend, ctx.opts.quick, ctx.opts.reps);
        if backend == Backend::HostGw {
            let need = p.nodes + p.reps * (p.leases + 1);
            ensure!(
                need <= HOST_GW_MAX,
                "host-gw peers must sit on the rig's underlay: {need} addresses needed, {HOST_GW_MAX} \
                 available (use --quick, or the vxlan backend)"
            );
        }
        let progress = ctx.progress;
        let twilld = super::twilld_path(ctx.opts.bin_dir.as_deref())?;
        if let Err(why) = check_proxy_mode(&twilld, ProxyMode::Ebpf) {
            bail!(why);
        }
        progress.plan(2 + 2 * p.reps);
        let what = format!(
            "control plane: {} nodes' leases and {} services × 10 in etcd",
            p.nodes, p.services
        );
        progress.working(&what);
        let rig = Rig::with_options(RigOptions {
            nodes: p.reps,
            bin_dir: ctx.opts.bin_dir.clone(),
            ..RigOptions::default()
        })?;
        rig.put_network_config(&network_config(backend))?;
        let etcd = EtcdHttp {
            addr: SocketAddr::from((UNDERLAY_V4, 2379)),
        };
        let t0 = Instant::now();
        let mut kvs: Vec<(String, String)> = (1..p.nodes)
            .map(|k| {
                let f = FakeNode::new(backend, k);
                (f.key, f.value)
            })
            .collect();
        kvs.extend(filler_entries(0, p.services));
        in_netns(&rig.underlay_ns(), || {
            etcd.put_many(&kvs, 128, |done| {
                if done % 2048 < 128 {
                    progress.working(&format!("{what}: {done}/{}", kvs.len()));
                }
            })
        })?;
        progress.done(
            &what,
            &format!(
                "{} keys written in {:.1} s ({})",
                kvs.len(),
                t0.elapsed().as_secs_f64(),
                rig.id()
            ),
        );
        let mut reps = Vec::new();
        for r in 0..p.reps {
            let node = r + 1;
            if r > 0 {
                retire(&rig, node - 1)?;
            }
            let rep = measure(&rig, node, &p, &etcd, progress)
                .with_context(|| format!("repetition {}", r + 1))?;
            reps.push(rep);
        }
        drop(rig);
        Ok(section(&p, &reps))
    }
}

/// Stops node `node`'s twilld and removes its lease, so the next repetition sees the same
/// number of peers.
fn retire(rig: &Rig, node: usize) -> Result<()> {
    rig.kill_twilld(node, nix::sys::signal::Signal::SIGTERM)
        .with_context(|| format!("stop twilld on node {node}"))?;
    let prefix = format!("{ETCD_PREFIX}/subnets/");
    let listing = rig.etcdctl(&["get", "--prefix", &prefix])?;
    let lines: Vec<&str> = listing.lines().collect();
    let ip = format!("\"PublicIP\":\"{}\"", Rig::node_ip(node));
    for pair in lines.chunks(2) {
        if pair.get(1).is_some_and(|v| v.contains(&ip)) {
            rig.etcdctl(&["del", pair[0]])?;
        }
    }
    Ok(())
}

/// twilld's pid on `node` (from the rig's record).
fn twilld_pid(rig: &Rig, node: usize) -> Result<i32> {
    let what = format!("twilld n{node}");
    RigState::load(rig.id())?
        .pids
        .iter()
        .rev()
        .find(|p| p.what == what)
        .map(|p| p.pid)
        .with_context(|| format!("no {what} in the rig's record"))
}

/// A `VmXxx:` field of `/proc/PID/status`, MiB.
fn vm_mib(pid: i32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(kib / 1024.0)
}

/// Routes, permanent neighbours and FDB entries on the VXLAN device in `ns` (host-gw: routes
/// via another node, and the other two counts equal to it).
fn overlay_counts(ns: &str, backend: Backend) -> Result<(usize, usize, usize)> {
    if backend != Backend::Vxlan {
        let routes = run(ns, &["ip", "-4", "route", "show"])?;
        let n = routes.lines().filter(|l| l.contains(" via ")).count();
        return Ok((n, n, n));
    }
    let script = format!(
        "ip -4 route show dev {VXLAN_DEV} 2>/dev/null | grep -c . ; \
         ip -4 neigh show dev {VXLAN_DEV} nud permanent 2>/dev/null | grep -c . ; \
         bridge fdb show dev {VXLAN_DEV} 2>/dev/null | grep -c ' dst '; true"
    );
    let out = run(ns, &["sh", "-c", &script])?;
    let n: Vec<usize> = out
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    ensure!(n.len() == 3, "unexpected counts {out:?}");
    Ok((n[0], n[1], n[2]))
}

/// Kernel memory of the maps pinned in `dir`, MiB (bpftool's `bytes_memlock`).
fn maps_mib(dir: &std::path::Path) -> f64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return f64::NAN;
    };
    let mut bytes = 0.0;
    for e in entries.flatten() {
        if !e.path().is_file() {
            continue;
        }
        let path = e.path().display().to_string();
        if let Some(out) = crate::util::probe("bpftool", &["-j", "map", "show", "pinned", &path])
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&out)
        {
            bytes += v["bytes_memlock"].as_f64().unwrap_or(0.0);
        }
    }
    bytes / (1024.0 * 1024.0)
}

fn measure(
    rig: &Rig,
    node: usize,
    p: &Params,
    etcd: &EtcdHttp,
    progress: &Progress,
) -> Result<Rep> {
    let what = format!(
        "rep {node}/{}: twilld on n{node} programs {} peers and {} services",
        p.reps,
        p.nodes - 1,
        p.services
    );
    progress.working(&what);
    let ns = rig.node_ns(node);
    let mut args = vec![
        "--metrics-addr".to_string(),
        METRICS_ADDR.to_string(),
        "--resync-interval".to_string(),
        "3600".to_string(),
    ];
    args.extend(rig.proxy_args(node, &ProxyMode::Ebpf.to_string())?);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let peers = p.nodes - 1;
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let (want_fe, want_be) = (p.services as f64, (p.services * 10) as f64);
    let metrics_addr: SocketAddr = METRICS_ADDR.parse().expect("a socket address");
    let t0 = Instant::now();
    rig.start_twilld(node, &args)?;
    let pid = twilld_pid(rig, node)?;
    let mut overlay = None;
    let mut services = None;
    let mut rep = Rep::default();
    let mut last_shown = Instant::now();
    while overlay.is_none() || services.is_none() {
        if !rig.twilld_running(node) {
            bail!(
                "twilld on node {node} exited; its log ends:\n{}",
                tail(&rig.twilld_log(node), 25)
            );
        }
        if twill_tests::interrupted() {
            bail!("interrupted");
        }
        if let Some(why) = crate::util::service_failure(&rig.twilld_log(node)) {
            bail!(
                "twilld on node {node} cannot program its services ({} frontends so far): {why}",
                rep.frontends
            );
        }
        if t0.elapsed() > PROGRAM_TIMEOUT {
            bail!(
                "not programmed after {PROGRAM_TIMEOUT:?}: {} routes, {} neighbours, {} FDB \
                 entries (of {peers}), {} frontends, {} backends",
                rep.routes,
                rep.neighbours,
                rep.fdb,
                rep.frontends,
                rep.backends
            );
        }
        if overlay.is_none() {
            let (r, n, f) = overlay_counts(&ns, p.backend).unwrap_or_default();
            (rep.routes, rep.neighbours, rep.fdb) = (r, n, f);
            if r >= peers && n >= peers && f >= peers {
                overlay = Some(t0.elapsed());
            }
        }
        if services.is_none()
            && let Ok(resp) = http_get(&ns, metrics_addr, "/metrics")
        {
            rep.frontends = sample(&resp.body, "twill_services_frontends").unwrap_or(0.0);
            rep.backends = sample(&resp.body, "twill_services_backends").unwrap_or(0.0);
            if rep.frontends >= want_fe && rep.backends >= want_be {
                services = Some(t0.elapsed());
            }
        }
        if last_shown.elapsed() > Duration::from_millis(500) {
            progress.working(&format!(
                "{what}: {}/{}/{} routes/neighbours/FDB, {} frontends",
                rep.routes, rep.neighbours, rep.fdb, rep.frontends
            ));
            last_shown = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    rep.overlay_s = overlay.expect("loop ends when set").as_secs_f64();
    rep.services_s = services.expect("loop ends when set").as_secs_f64();
    rep.programmed_s = rep.overlay_s.max(rep.services_s);
    // Settle: whatever twilld does right after (freeing its lists) belongs to its peak too.
    std::thread::sleep(Duration::from_secs(2));
    rep.vm_hwm_mib = vm_mib(pid, "VmHWM:")?;
    rep.vm_rss_mib = vm_mib(pid, "VmRSS:")?;
    rep.maps_mib = maps_mib(&rig.pin_dir(node).join("lb"));
    progress.done(
        &what,
        &format!(
            "programmed in {} s (overlay {} s, services {} s), VmHWM {} MiB",
            fmt_num(rep.programmed_s),
            fmt_num(rep.overlay_s),
            fmt_num(rep.services_s),
            fmt_num(rep.vm_hwm_mib)
        ),
    );

    let what = format!(
        "rep {node}/{}: {} more leases one at a time, {} peers in place",
        p.reps, p.leases, peers
    );
    progress.working(&what);
    lease_latency(rig, node, p, etcd, &mut rep)?;
    let s = Summary::of(&rep.lease_ms);
    progress.done(
        &what,
        &format!(
            "p50 {} ms, p99 {} ms, {} timeouts",
            fmt_num(s.p50),
            fmt_num(s.p99),
            rep.lease_timeouts
        ),
    );
    Ok(rep)
}

fn tail(text: &str, n: usize) -> String {
    crate::util::log_tail(text, n)
}

/// Strips `ip monitor`'s optional `[LABEL]` prefixes.
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

/// Writes `p.leases` more fake leases one at a time and times each to its route, neighbour and
/// FDB entry on `node`; removes them afterwards.
fn lease_latency(rig: &Rig, node: usize, p: &Params, etcd: &EtcdHttp, rep: &mut Rep) -> Result<()> {
    let monitor = peer_monitor(&rig.node_ns(node), p.backend)?;
    std::thread::sleep(Duration::from_millis(200));
    // Subnet numbers above the cluster's, different per repetition.
    let first = p.nodes + node * (p.leases + 1);
    let extra: Vec<FakeNode> = (first..=first + p.leases)
        .map(|k| FakeNode::new(p.backend, k))
        .collect();
    let (lease_ms, timeouts) = in_netns(&rig.underlay_ns(), move || {
        let mut lease_ms = Vec::new();
        let mut timeouts = 0;
        for (i, f) in extra.iter().enumerate() {
            let want = &f.programmed;
            monitor.drain();
            let t0 = Instant::now();
            etcd.put(&f.key, &f.value)?;
            let deadline = t0 + LEASE_DEADLINE;
            let mut missing: Vec<&String> = want.iter().collect();
            let mut last = None;
            while !missing.is_empty() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let Some((at, line)) = monitor.next_line(left)? else {
                    break;
                };
                let line = unlabel(&line);
                let before = missing.len();
                missing.retain(|w| !line.starts_with(w.as_str()));
                if missing.len() < before {
                    last = Some(at);
                }
            }
            // The first is a warm-up (the monitors proved subscribed), not counted.
            if i == 0 {
                ensure!(
                    missing.is_empty(),
                    "the warm-up lease {} was not programmed",
                    f.key
                );
                continue;
            }
            match (missing.is_empty(), last) {
                (true, Some(at)) => lease_ms.push((at - t0).as_secs_f64() * 1000.0),
                _ => timeouts += 1,
            }
        }
        drop(monitor);
        for f in &extra {
            etcd.delete(&f.key)?;
        }
        Ok((lease_ms, timeouts))
    })?;
    rep.lease_ms.extend(lease_ms);
    rep.lease_timeouts += timeouts;
    Ok(())
}

fn section(p: &Params, reps: &[Rep]) -> Section {
    let col = |f: fn(&Rep) -> f64| -> Vec<f64> { reps.iter().map(f).collect() };
    let programmed = col(|r| r.programmed_s);
    let overlay = col(|r| r.overlay_s);
    let services = col(|r| r.services_s);
    let hwm = col(|r| r.vm_hwm_mib);
    let rss = col(|r| r.vm_rss_mib);
    let maps = col(|r| r.maps_mib);
    let leases: Vec<f64> = reps.iter().flat_map(|r| r.lease_ms.clone()).collect();
    let timeouts: usize = reps.iter().map(|r| r.lease_timeouts).sum();
    let lease = Summary::of(&leases);
    let mut metrics = Vec::new();
    let mut metric = |name: &str, unit: &str, value: f64| {
        metrics.push(Metric {
            name: format!("control_plane.{name}"),
            unit: unit.into(),
            value,
        });
    };
    metric("programmed", "s", median(&programmed));
    metric("overlay_programmed", "s", median(&overlay));
    metric("services_programmed", "s", median(&services));
    metric("vm_hwm", "MiB", median(&hwm));
    metric("vm_rss", "MiB", median(&rss));
    let maps_median = median(&maps);
    if maps_median.is_finite() && maps_median > 0.0 {
        metric("bpf_maps", "MiB", maps_median);
    }
    metric("lease.add.p50", "ms", lease.p50);
    metric("lease.add.p99", "ms", lease.p99);

    let mut table = Table {
        title: format!(
            "One twilld ({} + eBPF proxy) starting against {} nodes' leases and {} services × \
             10 endpoints, per repetition",
            p.backend, p.nodes, p.services
        ),
        header: [
            "rep",
            "programmed",
            "overlay (routes/neigh/FDB)",
            "services (maps)",
            "VmHWM",
            "VmRSS",
            "eBPF maps (kernel)",
            "entries",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    for (i, r) in reps.iter().enumerate() {
        table.rows.push(vec![
            format!("{}", i + 1),
            format!("{} s", fmt_num(r.programmed_s)),
            format!("{} s", fmt_num(r.overlay_s)),
            format!("{} s", fmt_num(r.services_s)),
            format!("{} MiB", fmt_num(r.vm_hwm_mib)),
            format!("{} MiB", fmt_num(r.vm_rss_mib)),
            format!("{} MiB", fmt_num(r.maps_mib)),
            format!(
                "{}/{}/{} peers, {} frontends, {} backends",
                r.routes, r.neighbours, r.fdb, r.frontends, r.backends
            ),
        ]);
    }
    let lease_table = Table {
        title: format!(
            "One more lease with {} peers in place → programmed ({}), ms",
            p.nodes - 1,
            if p.backend == Backend::Vxlan {
                "route, neighbour and FDB entry"
            } else {
                "route"
            }
        ),
        header: ["samples", "p50", "p99", "max", "timeouts"]
            .map(String::from)
            .to_vec(),
        rows: vec![vec![
            lease.n.to_string(),
            fmt_num(lease.p50),
            fmt_num(lease.p99),
            fmt_num(lease.max),
            timeouts.to_string(),
        ]],
    };
    let checks = vec![
        Check::at_most(
            format!(
                "time to fully programmed, {} nodes + {} services × 10",
                p.nodes, p.services
            ),
            median(&programmed),
            PROGRAMMED_TARGET_S,
            "s",
        ),
        Check::at_most(
            format!(
                "twilld peak RSS (VmHWM), same load (Cilium agent: {CILIUM_ANCHOR_MIB} MiB at 1000 nodes / 50k pods)"
            ),
            median(&hwm),
            RSS_TARGET_MIB,
            "MiB",
        ),
    ];
    let mut notes = Vec::new();
    if p.nodes != 1000 || p.services != 10_000 {
        notes.push(format!(
            "quick run: {} nodes and {} services instead of 1000 and 10k — the targets are for \
             the full figures",
            p.nodes, p.services
        ));
    }
    if timeouts > 0 {
        notes.push(format!(
            "{timeouts} lease(s) not programmed within {LEASE_DEADLINE:?} (left out)"
        ));
    }
    let mut about = String::new();
    let _ = write!(
        about,
        "{} fake nodes' leases (flannel's JSON; VXLAN: VNI 1, public addresses in 198.19.0.0/16 \
         that nothing has; host-gw: addresses on the rig's underlay no namespace has) and {} \
         ClusterIP services × 10 endpoints are written into etcd (128 keys per transaction). \
         Then one real twilld starts on a fresh rig node with the {} backend and the eBPF \
         service proxy. The clock runs from just before its spawn until the node has every \
         peer programmed (VXLAN: a route, a permanent neighbour and an FDB entry on \
         `{VXLAN_DEV}`; host-gw: a route; counted with `ip`/`bridge` every 25 ms) and its \
         `/metrics` report every frontend and backend programmed. Memory: `VmHWM` (peak resident set) of twilld 2 s after that; the \
         eBPF maps are kernel memory (`bytes_memlock` of the pinned maps) and not part of it. \
         With the cluster in place, {} more leases are written one at a time and timed to their \
         entries (`ip monitor`, `bridge monitor`). {} repetition(s), each \
         on a node that never ran twilld, with the previous twilld stopped and its lease removed. \
         The anchor: the Cilium agent averages {CILIUM_ANCHOR_MIB} MiB at 1000 nodes / 50k pods.",
        p.nodes - 1,
        p.services,
        p.backend,
        p.leases,
        p.reps
    );
    Section {
        name: "control-plane".into(),
        title: "Control plane: 1000 nodes and 10k services into one twilld".into(),
        about,
        metrics,
        tables: vec![table, lease_table],
        checks,
        notes,
        plot_files: Vec::new(),
        plots: if leases.is_empty() {
            Vec::new()
        } else {
            vec![Plot::new(
                "control-plane-lease.svg",
                format!(
                    "One more lease with {} peers in place → programmed",
                    p.nodes - 1
                ),
                Chart::Cdf(CdfChart {
                    x_label: "ms (log scale)".into(),
                    series: vec![(
                        if p.backend == Backend::Vxlan {
                            "vxlan: route + neighbour + FDB".into()
                        } else {
                            format!("{}: route", p.backend)
                        },
                        leases,
                    )],
                }),
            )]
        },
        raw: serde_json::json!({"params": p, "repetitions": reps}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_nodes_are_flannel_leases_outside_the_rig() {
        let f = FakeNode::new(Backend::Vxlan, 999);
        assert_eq!(f.key, "/coreos.com/network/subnets/10.131.231.0-24");
        let v: serde_json::Value = serde_json::from_str(&f.value).unwrap();
        assert_eq!(v["PublicIP"], "198.19.3.231");
        assert_eq!(v["BackendData"]["VtepMAC"], "0e:74:77:01:03:e7");
        assert_eq!(v["BackendType"], "vxlan");
        assert_eq!(
            f.programmed,
            [
                "10.131.231.0/24 ",
                "10.131.231.0 dev flannel.1 ",
                "0e:74:77:01:03:e7 dev flannel.1 dst 198.19.3.231 "
            ]
        );
        // Distinct subnets for every node of a 1000-node cluster, inside the Network.
        let keys: std::collections::BTreeSet<String> = (1..1000)
            .map(|k| FakeNode::new(Backend::Vxlan, k).key)
            .collect();
        assert_eq!(keys.len(), 999);
        assert!(keys.iter().all(|k| k.contains("/subnets/10.1")));
        // host-gw peers sit on the rig's underlay, above its nodes.
        let h = FakeNode::new(Backend::HostGw, 7);
        assert_eq!(h.programmed, ["10.128.7.0/24 via 198.18.0.107 "]);
        assert_eq!(
            h.value,
            r#"{"PublicIP":"198.18.0.107","BackendType":"host-gw"}"#
        );
    }

    #[test]
    fn report_checks_the_targets() {
        let rep = Rep {
            overlay_s: 0.8,
            services_s: 1.2,
            programmed_s: 1.2,
            vm_hwm_mib: 40.0,
            vm_rss_mib: 35.0,
            maps_mib: 85.0,
            routes: 999,
            neighbours: 999,
            fdb: 999,
            frontends: 10_000.0,
            backends: 100_000.0,
            lease_ms: vec![3.0, 4.0],
            lease_timeouts: 0,
        };
        let s = section(&Params::new(Backend::Vxlan, false, 1), &[rep]);
        assert!(s.checks.iter().all(|c| c.pass), "{:?}", s.checks);
        assert!(
            s.metrics
                .iter()
                .all(|m| m.value.is_finite() && m.value > 0.0)
        );
        assert_eq!(s.plots.len(), 1);
        assert!(s.notes.is_empty());
    }
}
