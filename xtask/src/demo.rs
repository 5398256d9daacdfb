//! `cargo xtask demo`: the README's main job — the rig of `cargo xtask rig up` (3 nodes in
//! network namespaces, a real etcd, `twilld` with the eBPF service proxy on every node, 2 pods
//! per node made by `twill-cni`, a sample Service), then what it does: its leases, its pods, a
//! cross-node ping, an iperf3 figure between two pods, requests to the Service's ClusterIP from a
//! pod on another node — and a complete teardown.
//!
//! It runs `cargo xtask setup` first, so it works on a fresh machine on its own. The cluster is
//! [`xtask::cluster::populate`], the very code behind `rig up`, on a rig owned by this process:
//! every way out of [`demo`] (success, error, Ctrl-C) drops the rig, which tears it down.
//! SIGINT/SIGTERM only raise the rig's interrupt flag, which makes its waits and commands stop
//! early; a second signal exits at once, leaving the next rig (or `cargo xtask sweep`) to remove
//! what is left.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use twill_tests::{Pod, Rig, RigOptions};
use xtask::cluster::{self, ProxyMode, Spec};

use crate::util::{is_root, say, target_dir};

const NODES: usize = 3;
const PODS_PER_NODE: usize = 2;
/// Requests to the Service's ClusterIP.
const REQUESTS: usize = 12;

/// Runs the demo; with `hold`, keeps the cluster up until Ctrl-C; with `debug`, uses a debug
/// build of twilld.
pub fn demo(hold: bool, debug: bool) -> Result<()> {
    if !is_root() {
        bail!("the demo builds network namespaces and needs root");
    }
    xtask::bench::cli::install_interrupt_handler()?;

    crate::setup::setup()?;
    check_interrupt()?;
    crate::util::build_binaries(!debug)?;
    check_interrupt()?;

    let bin_dir = target_dir()?.join(if debug { "debug" } else { "release" });
    say(&format!(
        "bringing up {NODES} nodes ({} overlay, eBPF service proxy) and etcd",
        cluster::DEFAULT_BACKEND
    ));
    let rig = Rig::with_options(RigOptions {
        nodes: NODES,
        bin_dir: Some(bin_dir),
        ..RigOptions::default()
    })?;
    say(&format!(
        "rig {} up: underlay {}, nodes {}",
        rig.id(),
        rig.underlay_ns(),
        (1..=NODES)
            .map(|n| rig.node_ns(n))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    let result = run(&rig, hold);
    if let Err(e) = &result
        && !twill_tests::interrupted()
    {
        eprintln!("xtask: demo failed: {e:#}");
        rig.print_logs();
    }
    say("tearing down");
    drop(rig);
    say("torn down");
    result
}

fn check_interrupt() -> Result<()> {
    if twill_tests::interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

fn run(rig: &Rig, hold: bool) -> Result<()> {
    let spec = Spec {
        nodes: NODES,
        backend: cluster::DEFAULT_BACKEND,
        pods_per_node: PODS_PER_NODE,
        ip_masq: false,
        proxy_mode: ProxyMode::Ebpf,
    };
    say(&format!(
        "network config: {}",
        spec.backend.network_config()
    ));
    let info = cluster::populate(rig, &spec, &say)?;

    say("leases in etcd:");
    for l in cluster::leases(rig.id())? {
        println!("  {l}");
    }
    say("pods (made by twill-cni, each answering its name on :8080):");
    for p in &info.pods {
        println!(
            "  {:<5} node n{}  {}  {}",
            p.name,
            p.node,
            p.ip.map_or_else(|| "-".into(), |ip| ip.to_string()),
            p.ns
        );
    }

    let pod = |name: &str| -> Result<Pod> {
        let p = info
            .pods
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no pod {name}"))?;
        Ok(Pod {
            ns: p.ns.clone(),
            node: p.node,
            ipv4: p.ip,
            ipv6: None,
        })
    };
    let pod_a = pod("n1p1")?;
    let pod_b = pod(&format!("n{NODES}p1"))?;
    let target = pod_addr(&pod_b)?;

    let stats = twill_tests::ping(&pod_a.ns, target, 5)?;
    say(&format!("ping n1p1 -> n{NODES}p1 ({target}): {stats}"));
    if stats.received == 0 {
        bail!("no ping reply across nodes");
    }

    let gbits = iperf3(&pod_a, &pod_b)?;
    say(&format!(
        "iperf3 n1p1 -> n{NODES}p1: {gbits:.2} Gbit/s (TCP, 5 s)"
    ));

    let svc = info.service.as_ref().context("no sample Service")?;
    let client = pod(&format!("n{NODES}p2"))?;
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..REQUESTS {
        let who = cluster::request(rig, &client, spec.proxy_mode, svc.vip())?;
        *answers.entry(who).or_default() += 1;
    }
    say(&format!(
        "{REQUESTS} requests from n{NODES}p2 to service {} at {} answered by: {}",
        svc.name,
        svc.vip(),
        answers
            .iter()
            .map(|(who, n)| format!("{who} ×{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    if answers
        .keys()
        .all(|who| who.starts_with(&format!("n{NODES}")))
    {
        say("(all from the client's own node this time: Maglev picks per connection)");
    }

    if hold {
        say(&format!(
            "holding the cluster up; press Ctrl-C to tear down. Enter a pod with \
             `nsenter --net=/run/netns/{}` (logs in {})",
            pod_a.ns,
            rig.temp_dir().display()
        ));
        while !twill_tests::interrupted() {
            std::thread::sleep(Duration::from_millis(200));
        }
        return Ok(());
    }
    Ok(())
}

/// The address to reach `pod` at (IPv4 if it has one).
fn pod_addr(pod: &Pod) -> Result<IpAddr> {
    pod.ipv4
        .map(IpAddr::from)
        .or(pod.ipv6.map(IpAddr::from))
        .with_context(|| format!("pod {} has no address", pod.ns))
}

/// A 5-second TCP iperf3 from `client` to `server`; the received rate in Gbit/s.
fn iperf3(client: &Pod, server: &Pod) -> Result<f64> {
    let mut srv = twill_tests::spawn(&server.ns, &["iperf3", "-s", "-1"])?;
    let listening = twill_tests::wait_until(Duration::from_secs(5), || {
        twill_tests::run(&server.ns, &["ss", "-Hltn", "sport = :5201"])
            .is_ok_and(|out| !out.trim().is_empty())
    });
    let result = listening
        .context("iperf3 server did not listen")
        .and_then(|()| {
            let addr = pod_addr(server)?.to_string();
            let out = twill_tests::exec_timeout(
                &client.ns,
                &["iperf3", "-c", &addr, "-t", "5", "-J"],
                Duration::from_secs(30),
            )?;
            let report: serde_json::Value = serde_json::from_slice(&out.stdout)
                .with_context(|| format!("iperf3 printed no JSON ({})", out.status))?;
            if let Some(err) = report.get("error").and_then(|e| e.as_str()) {
                bail!("iperf3: {err}");
            }
            report["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .map(|bps| bps / 1e9)
                .context("no end.sum_received.bits_per_second in iperf3's report")
        });
    let _ = srv.kill();
    let _ = srv.wait();
    result
}
