//! `cargo xtask demo`: the README's main job — a 3-node cluster in network namespaces with a
//! real etcd and `twilld` on every node, its leases, a cross-node ping and an iperf3 figure
//! between two pods, then a complete teardown.
//!
//! Teardown is the rig's guard: every way out of [`demo`] (success, error, Ctrl-C) drops the rig.
//! SIGINT/SIGTERM only raise the rig's interrupt flag, which makes its waits and commands stop
//! early; a second signal exits at once, leaving the next rig (or `cargo xtask sweep`) to remove
//! what is left.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use twill_tests::rig::ETCD_PREFIX;
use twill_tests::{Pod, Rig, RigOptions};

use crate::util::{cargo, is_root, say, step, target_dir};

const NODES: usize = 3;
const NETWORK_CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

/// Runs the demo; with `hold`, keeps the cluster up until Ctrl-C; with `debug`, uses a debug
/// build of twilld.
pub fn demo(hold: bool, debug: bool) -> Result<()> {
    if !is_root() {
        bail!("the demo builds network namespaces and needs root");
    }
    ctrlc::set_handler(|| {
        if twill_tests::interrupted() {
            eprintln!(
                "xtask: second interrupt, exiting without teardown (cargo xtask sweep cleans up)"
            );
            std::process::exit(130);
        }
        eprintln!("xtask: interrupted, tearing down");
        twill_tests::interrupt();
    })
    .context("install the Ctrl-C handler")?;

    crate::setup::setup()?;
    check_interrupt()?;
    let mut build = cargo();
    build.args(["build", "-p", "twill-agent", "--bins"]);
    if !debug {
        build.arg("--release");
    }
    step(&mut build)?;
    check_interrupt()?;

    let bin_dir = target_dir()?.join(if debug { "debug" } else { "release" });
    say(&format!("bringing up {NODES} nodes and etcd"));
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
    rig.put_network_config(NETWORK_CONFIG)?;
    say(&format!("network config: {NETWORK_CONFIG}"));
    for node in 1..=NODES {
        rig.start_twilld(node, &[])?;
    }
    say("twilld started on every node; waiting for subnet leases");
    let mut facts = Vec::new();
    for node in 1..=NODES {
        facts.push(rig.wait_subnet_file(node, Duration::from_mins(1))?);
    }

    say("leases:");
    let leases = rig.etcdctl(&["get", "--prefix", &format!("{ETCD_PREFIX}/subnets")])?;
    let lines: Vec<&str> = leases.lines().collect();
    for pair in lines.chunks(2) {
        println!("  {}  {}", pair[0], pair.get(1).unwrap_or(&""));
    }

    let pod_a = rig.add_pod(1, &facts[0])?;
    let pod_b = rig.add_pod(NODES, &facts[NODES - 1])?;
    let target = pod_addr(&pod_b)?;
    say(&format!(
        "pods: {} {} on node 1, {} {} on node {NODES}",
        pod_a.ns,
        pod_addr(&pod_a)?,
        pod_b.ns,
        target
    ));

    let stats = twill_tests::ping(&pod_a.ns, target, 5)?;
    say(&format!("ping {} -> {target}: {stats}", pod_a.ns));
    if stats.received == 0 {
        bail!("no ping reply across nodes");
    }

    let gbits = iperf3(&pod_a, &pod_b)?;
    say(&format!(
        "iperf3 {} -> {}: {gbits:.2} Gbit/s (TCP, 5 s)",
        pod_a.ns, pod_b.ns
    ));

    if hold {
        say(&format!(
            "holding the cluster up; press Ctrl-C to tear down. Enter a namespace with \
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
