//! The rig's own lifecycle: it comes up (underlay, nodes, etcd, pods), it drives a node agent,
//! and it leaves nothing behind — when dropped, and when its owner is killed with SIGKILL and a
//! later run sweeps it.
//!
//! These tests need root; under CI a non-root run fails rather than skipping. The twilld tests
//! use a stand-in shell script, so the rig is proven before (and independently of) the agent;
//! the CNI and service test runs the real twilld, twill-cni and twill-probe (debug builds in
//! `target/debug/`), since what it proves is that pods, cgroups, responders and a Service made
//! through them are removed too.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use twill_facts::SubnetFacts;
use twill_tests::rig::{UNDERLAY_V4, nsenter_in_cgroup, service_manifest};
use twill_tests::{Rig, RigOptions, http_get, leftovers, ping, require_root, run, sweep_stale};

/// Facts as twilld would publish them for node `node` (dual stack).
fn facts_for(node: u8) -> SubnetFacts {
    SubnetFacts::parse(&format!(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.{node}.1/24\n\
         FLANNEL_IPV6_NETWORK=fd00:10::/56\nFLANNEL_IPV6_SUBNET=fd00:10:0:{node}::1/64\n\
         FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
    ))
    .unwrap()
}

fn assert_nothing_left(id: &str) {
    let left = leftovers(id);
    assert!(
        left.is_empty(),
        "rig {id} left behind:\n{}",
        left.join("\n")
    );
}

#[test]
fn three_node_rig_comes_up_and_leaves_nothing() {
    let Some(rig) = Rig::for_test(3, None) else {
        return;
    };
    let id = rig.id().to_string();

    // etcd answers, from the underlay and from a node.
    rig.etcdctl(&["put", "/twill-test/key", "value"]).unwrap();
    let got = rig
        .etcdctl(&["get", "--print-value-only", "/twill-test/key"])
        .unwrap();
    assert_eq!(got.trim(), "value");
    let health = http_get(
        &rig.node_ns(2),
        SocketAddr::from((UNDERLAY_V4, 2379)),
        "/health",
    )
    .unwrap();
    assert_eq!(health.status, 200, "{}", health.body);

    // Node to node over the underlay, both families.
    for (a, b) in [(1, 2), (2, 3), (3, 1)] {
        let v4 = ping(&rig.node_ns(a), Rig::node_ip(b), 2).unwrap();
        assert!(v4.all_received(), "n{a} -> n{b} v4: {v4}");
        let v6 = ping(&rig.node_ns(a), Rig::node_ip6(b), 2).unwrap();
        assert!(v6.all_received(), "n{a} -> n{b} v6: {v6}");
    }
    // Forwarding is on in the nodes, and no node has a way out of the rig.
    let fwd = run(&rig.node_ns(1), &["cat", "/proc/sys/net/ipv4/ip_forward"]).unwrap();
    assert_eq!(fwd.trim(), "1");
    let routes = twill_tests::routes(&rig.node_ns(1)).unwrap();
    assert!(!routes.contains("default"), "{routes}");

    // A pod on each node reaches its gateway; two pods on one node reach each other.
    let mut pods = Vec::new();
    for node in 1..=3u8 {
        let facts = facts_for(node);
        let pod = rig.add_pod(usize::from(node), &facts).unwrap();
        let v4 = ping(&pod.ns, facts.gateway_v4().unwrap(), 2).unwrap();
        assert!(v4.all_received(), "{} -> gateway v4: {v4}", pod.ns);
        let v6 = ping(&pod.ns, facts.gateway_v6().unwrap(), 2).unwrap();
        assert!(v6.all_received(), "{} -> gateway v6: {v6}", pod.ns);
        // Not /sys/class/net: under nsenter, /sys still shows the root namespace's devices.
        let link = run(&pod.ns, &["ip", "-o", "link", "show", "dev", "eth0"]).unwrap();
        assert!(link.contains(" mtu 1450 "), "{link}");
        pods.push(pod);
    }
    let second = rig.add_pod(1, &facts_for(1)).unwrap();
    assert_eq!(second.ipv4.unwrap().to_string(), "10.244.1.3");
    let p = ping(&second.ns, pods[0].ipv4.unwrap(), 2).unwrap();
    assert!(p.all_received(), "pod to pod on one node: {p}");

    drop(rig);
    assert_nothing_left(&id);
}

/// Pods made by the real twill-cni get addresses from their node's lease and reach each other
/// across nodes; responders answer with their pod's name; a Service (eBPF proxy, socket-LB in
/// the node's cgroup) answers from a pod with one of its endpoints; and the rig's teardown
/// removes all of it, cgroups included.
#[test]
fn cni_pods_responders_and_a_service_leave_nothing() {
    let Some(rig) = Rig::for_test(
        2,
        Some(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#),
    ) else {
        return;
    };
    let id = rig.id().to_string();
    for node in 1..=2 {
        let mut args = rig.proxy_args(node, "ebpf").unwrap();
        args.extend(["--resync-interval".to_string(), "3600".to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        rig.start_twilld(node, &args).unwrap();
    }
    let facts: Vec<SubnetFacts> = (1..=2)
        .map(|n| {
            rig.wait_subnet_file(n, Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("{e:#}"))
        })
        .collect();
    let cgroup = rig.node_cgroup(2).unwrap();
    assert!(cgroup.join("cgroup.procs").exists());
    assert!(
        cgroup
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(&format!("twill-{id}-")),
        "{}",
        cgroup.display()
    );

    let a = rig.add_cni_pod(1).unwrap();
    let b = rig.add_cni_pod(2).unwrap();
    let c = rig.add_cni_pod(2).unwrap();
    for (pod, f) in [(&a, &facts[0]), (&b, &facts[1]), (&c, &facts[1])] {
        let ip = pod.ipv4.unwrap();
        assert!(f.subnet_v4().unwrap().contains(&ip), "{ip} not in {f:?}");
        let link = run(&pod.ns, &["ip", "-o", "link", "show", "dev", "eth0"]).unwrap();
        assert!(link.contains(&format!(" mtu {} ", f.mtu)), "{link}");
    }
    assert_ne!(b.ipv4, c.ipv4, "two pods of a node got one address");
    assert_eq!(b.name(), "n2p1");
    assert!(rig.cni_conflist_path(1).is_file());
    // Each twilld programs the other's lease as it learns of it.
    twill_tests::wait_until(Duration::from_secs(20), || {
        ping(&c.ns, a.ipv4.unwrap(), 1).is_ok_and(|p| p.all_received())
    })
    .unwrap_or_else(|e| panic!("pod to pod across nodes: {e}"));

    rig.start_responder(&a, "a", &[8080]).unwrap();
    rig.start_responder(&b, "b", &[8080]).unwrap();
    let probe = rig.binary("twill-probe").unwrap();
    let probe = probe.to_str().unwrap();
    let direct = format!("{}:8080", a.ipv4.unwrap());
    let got = run(&c.ns, &[probe, "get", &direct]).unwrap();
    assert_eq!(got.trim(), "a");

    rig.apply_manifest(&service_manifest(
        "echo",
        "10.96.0.10".parse().unwrap(),
        80,
        8080,
        Some(30080),
        &[(a.ipv4.unwrap().into(), 1), (b.ipv4.unwrap().into(), 2)],
    ))
    .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while seen.len() < 2 && std::time::Instant::now() < deadline {
        let out = nsenter_in_cgroup(&c.ns, &cgroup, &[probe, "get", "10.96.0.10:80"])
            .output()
            .unwrap();
        if out.status.success() {
            seen.insert(String::from_utf8_lossy(&out.stdout).trim().to_string());
        }
    }
    assert_eq!(
        seen,
        ["a", "b"].map(String::from).into(),
        "the Service did not reach both endpoints:\n{}",
        rig.twilld_log(2)
    );
    // The client processes ran in the node's cgroup and are gone from it.
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap();
    assert!(procs.trim().is_empty(), "{procs}");

    drop(rig);
    assert_nothing_left(&id);
    assert!(!cgroup.exists(), "{} left", cgroup.display());
}

/// A stand-in for twilld: logs where it runs, publishes a subnet file, then waits.
const STUB_TWILLD: &str = r#"#!/bin/sh
echo "stub twilld $*"
ip -o -4 addr show dev eth0
stat -f -c 'bpffs=%T' /sys/fs/bpf
while [ $# -gt 0 ]; do
  case "$1" in --subnet-file) f="$2"; shift ;; esac
  shift
done
printf 'FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.9.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n' > "$f.tmp"
mv "$f.tmp" "$f"
exec sleep 1000
"#;

#[test]
fn twilld_control_with_a_stand_in() {
    if !require_root() {
        return;
    }
    let stub_dir = StubDir::new();
    let bin_dir = stub_dir.0.clone();
    let stub = bin_dir.join("twilld");
    std::fs::write(&stub, STUB_TWILLD).unwrap();
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();

    let rig = Rig::with_options(RigOptions {
        nodes: 2,
        bin_dir: Some(bin_dir.clone()),
        ..RigOptions::default()
    })
    .unwrap();
    let id = rig.id().to_string();
    rig.put_network_config(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#)
        .unwrap();
    let config = rig
        .etcdctl(&["get", "--print-value-only", "/coreos.com/network/config"])
        .unwrap();
    assert!(config.contains("vxlan"), "{config}");

    rig.start_twilld(2, &["--ip-masq"]).unwrap();
    let facts = rig.wait_subnet_file(2, Duration::from_secs(10)).unwrap();
    assert_eq!(facts.subnet.unwrap().to_string(), "10.244.9.1/24");
    assert!(rig.twilld_running(2));
    assert!(
        rig.start_twilld(2, &[]).is_err(),
        "second twilld on one node"
    );
    let log = rig.twilld_log(2);
    assert!(
        log.contains("--etcd-endpoints http://198.18.0.1:2379"),
        "{log}"
    );
    assert!(log.contains("--ip-masq"), "{log}");
    assert!(
        log.contains("198.18.0.12/24"),
        "runs in node 2's netns:\n{log}"
    );
    assert!(log.contains("bpffs=bpf_fs"), "bpffs visible:\n{log}");
    assert!(rig.pin_dir(2).is_dir());

    // kill -9, restart: the log keeps both runs.
    let status = rig.kill_twilld(2, Signal::SIGKILL).unwrap();
    assert!(!status.success());
    assert!(!rig.twilld_running(2));
    rig.start_twilld(2, &[]).unwrap();
    twill_tests::wait_until(Duration::from_secs(10), || {
        rig.twilld_log(2).matches("stub twilld").count() == 2
    })
    .unwrap_or_else(|e| panic!("second run of twilld: {e}:\n{}", rig.twilld_log(2)));

    // A node whose agent never starts reports it instead of waiting out the timeout.
    let err = rig
        .wait_subnet_file(1, Duration::from_secs(30))
        .unwrap_err();
    assert!(err.to_string().contains("never started"), "{err:#}");

    // etcd down and back, same data.
    rig.stop_etcd().unwrap();
    assert!(rig.etcdctl(&["get", "/coreos.com/network/config"]).is_err());
    rig.start_etcd().unwrap();
    let config = rig
        .etcdctl(&["get", "--print-value-only", "/coreos.com/network/config"])
        .unwrap();
    assert!(config.contains("vxlan"), "{config}");

    drop(rig);
    assert_nothing_left(&id);
}

/// A directory for the stand-in twilld, removed on drop.
struct StubDir(std::path::PathBuf);

impl StubDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("twill-stub-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        StubDir(dir)
    }
}

impl Drop for StubDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Set in the child process of [`sweep_cleans_up_after_a_crash`].
const CRASH_CHILD: &str = "TWILL_RIG_CRASH_CHILD";

#[test]
fn sweep_cleans_up_after_a_crash() {
    if std::env::var_os(CRASH_CHILD).is_some() {
        crash_child();
    }
    if !require_root() {
        return;
    }
    // Re-run this very test in a child process, which builds a rig and then hangs.
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sweep_cleans_up_after_a_crash",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_CHILD, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest may have printed `test NAME ... ` on the same line.
            if let Some((_, rest)) = line.split_once("CRASH_CHILD_READY ") {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    let ready = rx.recv_timeout(Duration::from_mins(1));
    let ready = ready.unwrap_or_else(|e| {
        let _ = child.kill();
        panic!("crash child never got its rig up: {e}");
    });
    let (id, stray_pid) = ready.split_once(' ').unwrap();
    let stray_pid: i32 = stray_pid.parse().unwrap();

    let before = leftovers(id);
    assert!(before.iter().any(|l| l.starts_with("netns")), "{before:?}");
    assert!(
        before.iter().any(|l| l.starts_with("process")),
        "{before:?}"
    );
    assert!(
        before.iter().any(|l| l.starts_with("state file")),
        "{before:?}"
    );
    assert!(before.iter().any(|l| l.starts_with("cgroup")), "{before:?}");

    kill(
        Pid::from_raw(i32::try_from(child.id()).unwrap()),
        Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();

    sweep_stale().unwrap();
    assert_nothing_left(id);
    // The process the child started inside a rig namespace without telling the rig is gone too.
    let stat = std::fs::read_to_string(format!("/proc/{stray_pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "stray process still alive: {stat}"
    );
}

/// The child's side: a rig with etcd, a pod, a node cgroup and a stray process, then a hang until
/// SIGKILL.
fn crash_child() -> ! {
    let rig = Rig::new(2).unwrap();
    rig.add_pod(1, &facts_for(1)).unwrap();
    rig.node_cgroup(2).unwrap();
    #[expect(
        clippy::zombie_processes,
        reason = "left running on purpose: the parent kills this process and sweeps"
    )]
    let stray = twill_tests::spawn(&rig.node_ns(2), &["sleep", "1000"]).unwrap();
    println!("CRASH_CHILD_READY {} {}", rig.id(), stray.id());
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}
