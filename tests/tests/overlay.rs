//! End-to-end tests of the overlay (issue: overlay core): real etcd, real kernel, real twilld on
//! every node of a netns rig. Each test asserts what a user would see: packets arrive, subnets are
//! unique, a departed node's entries go, a restart loses nothing, an invalid config is refused.
//!
//! Privileged: as root they run; under CI a non-root run fails (see `require_root`).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use twill_facts::SubnetFacts;
use twill_tests::suite::{UP, assert_full_mesh, cluster, start_nodes, start_with_pods, wait_facts};
use twill_tests::{
    Backend, PingFlood, Pod, Rig, exec, fdb, http_get, ping, require_root, routes, run, wait_until,
};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const DUAL: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd74:10::/56","Backend":{"Type":"vxlan"}}"#;
const DUAL_HOST_GW: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd74:10::/56","Backend":{"Type":"host-gw"}}"#;

fn subnets_unique(facts: &[SubnetFacts]) {
    let set: HashSet<_> = facts.iter().map(SubnetFacts::subnet_v4).collect();
    assert_eq!(set.len(), facts.len(), "subnets shared: {facts:?}");
}

/// Three nodes: unique subnets, the backend's pod MTU, every pod reaches every other, and the
/// backend's own kernel state (flannel's VXLAN device with an FDB entry per peer; a route via
/// each peer's address; the TUN device holding the whole network).
fn three_nodes_full_mesh(backend: Backend) {
    let (rig, facts, pods) = cluster(&backend.network_config(), 3, &[]);
    subnets_unique(&facts);
    for f in &facts {
        assert_eq!(
            f.mtu,
            backend.pod_mtu(),
            "{backend}: the uplink's MTU minus the encapsulation"
        );
        assert_eq!(f.network.unwrap().to_string(), "10.244.0.0/16");
    }
    assert_full_mesh(&rig, &pods, false);
    let ns = rig.node_ns(1);
    match backend {
        Backend::Vxlan => {
            // flannel's device, and one route + neighbour + FDB entry per peer.
            let link = run(&ns, &["ip", "-d", "link", "show", "flannel.1"]).unwrap();
            assert!(
                link.contains("vxlan id 1")
                    && link.contains("dstport 8472")
                    && link.contains("nolearning"),
                "{link}"
            );
            let f = fdb(&ns, "flannel.1").unwrap();
            assert_eq!(f.lines().filter(|l| l.contains(" dst ")).count(), 2, "{f}");
        }
        Backend::HostGw => {
            let r = routes(&ns).unwrap();
            let peer = facts[1].subnet_v4().unwrap();
            assert!(
                r.contains(&format!("{peer} via {} dev eth0", Rig::node_ip(2))),
                "host-gw route via the peer's address: {r}"
            );
        }
        Backend::Udp => {
            let r = routes(&ns).unwrap();
            assert!(r.contains("10.244.0.0/16 dev flannel0"), "{r}");
        }
    }
}

#[test]
fn dual_stack_vxlan_and_host_gw() {
    if !require_root() {
        return;
    }
    for config in [DUAL, DUAL_HOST_GW] {
        let (rig, facts, pods) = cluster(config, 3, &[]);
        for f in &facts {
            assert!(f.ipv6_subnet.is_some(), "{config}: no IPv6 subnet in {f:?}");
        }
        assert_full_mesh(&rig, &pods, false);
        assert_full_mesh(&rig, &pods, true);
        drop(rig);
    }
}

#[test]
fn deleted_lease_disappears_from_peers() {
    if !require_root() {
        return;
    }
    let (rig, facts, _pods) = cluster(VXLAN, 3, &[]);
    let gone = facts[2].subnet_v4().unwrap();
    let key = subnet_key(&facts[2]);
    wait_until(UP, || {
        routes(&rig.node_ns(1)).is_ok_and(|r| r.contains(&gone.to_string()))
    })
    .unwrap();
    // The node goes away (its agent stops), then its lease is deleted.
    rig.kill_twilld(3, Signal::SIGKILL).unwrap();
    rig.etcdctl(&["del", &key]).unwrap();
    let node3_ip = Rig::node_ip(3).to_string();
    for node in [1, 2] {
        let ns = rig.node_ns(node);
        wait_until(Duration::from_secs(5), || {
            routes(&ns).is_ok_and(|r| !r.contains(&gone.to_string()))
                && fdb(&ns, "flannel.1").is_ok_and(|f| !f.contains(&node3_ip))
        })
        .unwrap_or_else(|_| {
            panic!(
                "n{node} still has entries for {gone}:\n{}",
                routes(&ns).unwrap_or_default()
            )
        });
    }
}

/// Configures a namespace by hand exactly as flannel configures a VXLAN node, and writes its
/// lease as flannel writes it.
fn flannel_by_hand(rig: &Rig, node: usize, subnet: &str, mac: &str) {
    let ns = rig.node_ns(node);
    let ip = Rig::node_ip(node).to_string();
    let vtep = subnet.replace(".0/24", ".0/32");
    twill_tests::ns::ip_batch(
        Some(&ns),
        &format!(
            "link add flannel.1 type vxlan id 1 local {ip} dev eth0 dstport 8472 nolearning\n\
             link set flannel.1 address {mac} mtu 1450 up\n\
             addr add {vtep} dev flannel.1\n"
        ),
    )
    .unwrap();
    let key = lease_key(&subnet.replace('/', "-"));
    let value = format!(
        r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    );
    rig.etcdctl(&["put", &key, &value]).unwrap();
}

#[test]
fn interoperates_with_a_flannel_node() {
    let Some(rig) = Rig::for_test(3, Some(VXLAN)) else {
        return;
    };
    // Node 3 is "flannel": configured by hand, its lease in etcd before the twill nodes start.
    flannel_by_hand(&rig, 3, "10.244.200.0/24", "0e:fa:00:00:00:03");
    let (facts, pods) = start_with_pods(&rig, &[1, 2], &[]);
    // The flannel node programs its peers the way flanneld would, from their twill leases.
    let ns3 = rig.node_ns(3);
    for (i, f) in facts.iter().enumerate() {
        let sn = f.subnet_v4().unwrap();
        let key = subnet_key(f);
        let value = rig.etcdctl(&["get", "--print-value-only", &key]).unwrap();
        let lease: serde_json::Value = serde_json::from_str(value.trim()).unwrap();
        assert_eq!(lease["BackendType"], "vxlan", "{value}");
        assert_eq!(
            lease["PublicIP"],
            Rig::node_ip(i + 1).to_string(),
            "{value}"
        );
        let mac = lease["BackendData"]["VtepMAC"].as_str().unwrap();
        let (vtep, peer_ip) = (sn.addr(), Rig::node_ip(i + 1));
        twill_tests::ns::ip_batch(
            Some(&ns3),
            &format!(
                "route add {sn} via {vtep} dev flannel.1 onlink\n\
                 neigh replace {vtep} lladdr {mac} dev flannel.1 nud permanent\n"
            ),
        )
        .unwrap();
        let peer_ip = peer_ip.to_string();
        run(
            &ns3,
            &[
                "bridge",
                "fdb",
                "append",
                mac,
                "dev",
                "flannel.1",
                "dst",
                &peer_ip,
            ],
        )
        .unwrap();
    }
    // Traffic both ways between the flannel node's VTEP address and twill pods.
    let flannel_vtep: IpAddr = "10.244.200.0".parse().unwrap();
    for pod in &pods {
        let ok = wait_until(UP, || {
            ping(&pod.ns, flannel_vtep, 1).is_ok_and(|s| s.all_received())
        });
        if ok.is_err() {
            rig.print_logs();
            panic!("twill pod on n{} cannot reach the flannel node", pod.node);
        }
        let back = ping(&ns3, pod.ipv4.unwrap(), 2).unwrap();
        assert!(
            back.all_received(),
            "flannel node cannot reach twill pod: {back}"
        );
    }
}

/// A ping flood between two nodes' pods crosses a kill -9 of one agent and its restart
/// without losing a packet; the node keeps its subnet and its device.
fn kill_and_restart_during_ping_flood_loses_nothing(backend: Backend) {
    let (rig, facts, pods) = cluster(&backend.network_config(), 2, &[]);
    assert_full_mesh(&rig, &pods, false);
    let device = |rig: &Rig| {
        backend.device().map(|dev| {
            let link = run(&rig.node_ns(1), &["ip", "-o", "link", "show", dev]).unwrap();
            link.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string()
        })
    };
    let device_before = device(&rig);
    let routes_before = routes(&rig.node_ns(1)).unwrap();
    // 600 pings 10 ms apart (~6 s) span a kill -9 and a restart of node 1's agent: the kill
    // comes once 100 have crossed, the restart once 100 more have crossed the dead agent.
    let mut flood = PingFlood::start(
        &pods[0].ns,
        pods[1].ipv4.unwrap().into(),
        600,
        Duration::from_millis(10),
    )
    .unwrap();
    flood.wait_past(0, 100, UP).unwrap();
    rig.kill_twilld(1, Signal::SIGKILL).unwrap();
    let at_kill = flood.sent();
    flood.wait_past(at_kill, 100, UP).unwrap();
    rig.start_twilld(1, &[]).unwrap();
    let (stats, text) = flood.finish().unwrap();
    assert_eq!(stats.transmitted, 600, "{text}");
    assert_eq!(
        stats.received, stats.transmitted,
        "{backend}: packets lost across a restart: {text}"
    );
    // Same subnet, same device and same routes after the restart.
    wait_until(UP, || rig.twilld_log(1).contains("reclaimed our lease"))
        .unwrap_or_else(|_| panic!("{}", rig.twilld_log(1)));
    let again = rig.wait_subnet_file(1, UP).unwrap();
    assert_eq!(again.subnet, facts[0].subnet);
    assert_eq!(device(&rig), device_before, "the device was recreated");
    assert_eq!(routes(&rig.node_ns(1)).unwrap(), routes_before);
}

/// Traffic between two nodes' pods keeps flowing for 30 s without etcd and no agent dies; once
/// etcd is back, a node joining is programmed on the others.
fn etcd_outage_disturbs_nothing(backend: Backend) {
    let rig = Rig::configured(3, &backend.network_config());
    let (_facts, pods) = start_with_pods(&rig, &[1, 2], &["--resync-interval", "2"]);
    assert_full_mesh(&rig, &pods, false);

    rig.stop_etcd().unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        let s = ping(&pods[0].ns, pods[1].ipv4.unwrap(), 3).unwrap();
        assert!(
            s.all_received(),
            "{backend}: traffic broke while etcd was down: {s}"
        );
        assert!(
            rig.twilld_running(1) && rig.twilld_running(2),
            "an agent died while etcd was down"
        );
    }
    rig.start_etcd().unwrap();
    // The agents are back on etcd: a node joining now is programmed on the others.
    let (_, p3) = start_with_pods(&rig, &[3], &[]);
    assert_full_mesh(&rig, &[&pods[..], &p3[..]].concat(), false);
}

#[test]
fn twenty_agents_at_once_never_share_a_subnet() {
    // A small range makes collisions likely if creation were not atomic: 30 subnets, 20 nodes.
    let config = r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.30.0","Backend":{"Type":"host-gw"}}"#;
    let Some(rig) = Rig::for_test(20, Some(config)) else {
        return;
    };
    let nodes: Vec<usize> = (1..=20).collect();
    let facts = start_nodes(&rig, &nodes, &[]);
    subnets_unique(&facts);
    let keys = lease_keys(&rig).unwrap();
    assert_eq!(keys.len(), 20, "{keys:?}");
}

#[test]
fn invalid_config_is_refused_and_the_dataplane_stays() {
    // A node that starts on a bad config does nothing but say why.
    let config = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":99999999}}"#;
    let Some(rig) = Rig::for_test(2, Some(config)) else {
        return;
    };
    rig.start_twilld(1, &[]).unwrap();
    wait_until(UP, || rig.twilld_log(1).contains("Backend.VNI"))
        .unwrap_or_else(|_| panic!("{}", rig.twilld_log(1)));
    let log = rig.twilld_log(1);
    assert!(log.contains("99999999"), "the error names the value: {log}");
    assert!(!rig.subnet_file(1).exists());
    assert!(
        run(&rig.node_ns(1), &["ip", "link", "show", "flannel.1"]).is_err(),
        "a device was created"
    );
    rig.kill_twilld(1, Signal::SIGTERM).unwrap();

    // Running nodes keep their dataplane when the config turns bad under them.
    rig.put_network_config(VXLAN).unwrap();
    let (_facts, pods) = start_with_pods(&rig, &[1, 2], &["--resync-interval", "1"]);
    assert_full_mesh(&rig, &pods, false);
    rig.put_network_config(r#"{"Network":"10.244.0.0/33","Backend":{"Type":"vxlan"}}"#)
        .unwrap();
    wait_until(UP, || rig.twilld_log(1).contains("10.244.0.0/33"))
        .unwrap_or_else(|_| panic!("{}", rig.twilld_log(1)));
    assert_full_mesh(&rig, &pods, false);
}

#[test]
fn ip_masq_masquerades_egress_but_not_pod_to_pod() {
    if !require_root() {
        return;
    }
    let (rig, _facts, pods) = cluster(VXLAN, 2, &["--ip-masq"]);
    assert_full_mesh(&rig, &pods, false);
    // The underlay namespace stands for "outside the cluster": it has no route to pods, so a
    // reply only comes back if the pod's traffic was masqueraded to the node's address.
    let s = ping(&pods[0].ns, twill_tests::rig::UNDERLAY_V4, 2).unwrap();
    assert!(s.all_received(), "egress not masqueraded: {s}");
    // Pod to pod keeps the pod's source address: the server sees the client pod's IP.
    let server = twill_tests::nsenter(&pods[1].ns, &["timeout", "30", "iperf3", "-s", "-1", "-J"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let dst = pods[1].ipv4.unwrap().to_string();
    wait_until(UP, || {
        // iperf3 3.12 exits 0 with -J even when it cannot connect: look at the JSON.
        exec(&pods[0].ns, &["iperf3", "-c", &dst, "-t", "1", "-J"]).is_ok_and(|o| {
            o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("\"error\"")
        })
    })
    .unwrap();
    let out = server.wait_with_output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let seen = &json["start"]["connected"][0]["remote_host"];
    assert_eq!(
        seen.as_str(),
        Some(pods[0].ipv4.unwrap().to_string().as_str()),
        "pod-to-pod traffic was masqueraded: the server saw {seen}"
    );
    // The rules live in twill's own table, in the node.
    let t = run(
        &rig.node_ns(1),
        &["nft", "list", "table", "inet", "twill-masq"],
    )
    .unwrap();
    assert!(t.contains("masquerade"), "{t}");
}

#[test]
fn metrics_and_healthz_report_the_node() {
    if !require_root() {
        return;
    }
    let (rig, _facts, pods) = cluster(
        VXLAN,
        2,
        &["--metrics-addr", "127.0.0.1:9615", "--healthz-port", "9616"],
    );
    assert_full_mesh(&rig, &pods, false);
    let ns = rig.node_ns(1);
    let health = http_get(&ns, SocketAddr::from(([127, 0, 0, 1], 9616)), "/healthz").unwrap();
    assert_eq!(health.status, 200, "{}", health.body);
    let m = http_get(&ns, SocketAddr::from(([127, 0, 0, 1], 9615)), "/metrics").unwrap();
    assert_eq!(m.status, 200);
    assert!(m.body.contains("twill_peers 1\n"), "{}", m.body);
    assert!(
        m.body.contains("twill_lease_expiry_timestamp_seconds"),
        "{}",
        m.body
    );
    assert!(
        m.body.contains("twill_reconcile_duration_seconds_count"),
        "{}",
        m.body
    );
    // The eBPF counter on flannel.1 saw the pings.
    let tx: u64 = m
        .body
        .lines()
        .find(|l| l.starts_with("twill_vxlan_packets_total{") && l.contains("direction=\"tx\""))
        .unwrap_or_else(|| panic!("no eBPF counter in metrics:\n{}", m.body))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(tx >= 1, "{}", m.body);
}

// ---- leases and routes written by others --------------------------------------------------

/// Where the tests below ask twilld to serve /metrics, inside each node's namespace.
const METRICS: &str = "127.0.0.1:9615";
/// Where they ask it to serve /healthz.
const HEALTHZ: &str = "127.0.0.1:9616";

/// Node `node`'s /metrics text (empty while it cannot be read).
fn scrape(rig: &Rig, node: usize) -> String {
    http_get(&rig.node_ns(node), METRICS.parse().unwrap(), "/metrics")
        .map(|r| r.body)
        .unwrap_or_default()
}

/// The value of the series `series` (name and labels, as printed) in node `node`'s /metrics.
fn metric(rig: &Rig, node: usize, series: &str) -> Option<f64> {
    scrape(rig, node).lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Node `node`'s /healthz: status and body.
fn healthz(rig: &Rig, node: usize) -> Option<(u16, String)> {
    http_get(&rig.node_ns(node), HEALTHZ.parse().unwrap(), "/healthz")
        .ok()
        .map(|r| (r.status, r.body))
}

/// Waits until node `node`'s twilld has reconciled `n` more times (resyncs included): "several
/// reconciles have run since", without a fixed sleep.
fn wait_reconciles(rig: &Rig, node: usize, n: f64) {
    let series = "twill_reconcile_duration_seconds_count";
    let start = wait_for_metric(rig, node, series);
    wait_until(UP, || {
        metric(rig, node, series).is_some_and(|v| v >= start + n)
    })
    .unwrap_or_else(|_| panic!("n{node} did not reconcile {n} more times"));
}

fn wait_for_metric(rig: &Rig, node: usize, series: &str) -> f64 {
    twill_tests::wait_for(UP, || metric(rig, node, series))
        .unwrap_or_else(|_| panic!("no {series} on n{node}:\n{}", scrape(rig, node)))
}

/// The keys of every subnet lease in etcd.
fn lease_keys(rig: &Rig) -> anyhow::Result<Vec<String>> {
    let keys = rig.etcdctl(&["get", "--prefix", "--keys-only", &lease_key("")])?;
    Ok(keys
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect())
}

/// The etcd key of a lease.
fn lease_key(short: &str) -> String {
    format!("/coreos.com/network/subnets/{short}")
}

/// The etcd key of the lease of a node's IPv4 subnet (`<address>-<length>`).
fn subnet_key(facts: &SubnetFacts) -> String {
    let subnet = facts.subnet_v4().expect("an IPv4 subnet");
    lease_key(&format!("{}-{}", subnet.addr(), subnet.prefix_len()))
}

/// A VXLAN lease value as flannel writes it.
fn vxlan_lease(public_ip: &str, mac: &str) -> String {
    format!(
        r#"{{"PublicIP":"{public_ip}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    )
}

/// How many log lines of node `node` contain every one of `needles`.
fn log_lines(rig: &Rig, node: usize, needles: &[&str]) -> usize {
    rig.twilld_log(node)
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

#[test]
fn bad_peer_leases_are_ignored_and_traffic_keeps_flowing() {
    let Some((rig, facts, pods)) = watched_cluster(3) else {
        return;
    };
    let n1 = facts[0].subnet_v4().unwrap();
    let base = n1.addr().to_string();
    let inside_n1 = format!("{}.128-25", base.trim_end_matches(".0"));
    let half_n1 = format!("{base}-25");
    // Written by a careless tool: the underlay (where etcd lives), a foreign network, node 1's
    // own subnet split in halves, and a lease whose PublicIP would become an FDB entry to 0.0.0.0.
    let bad = [
        (
            "198.18.0.0-25",
            vxlan_lease("198.18.0.13", "0e:99:00:00:00:01"),
        ),
        (
            "8.8.8.0-24",
            vxlan_lease("198.18.0.13", "0e:99:00:00:00:02"),
        ),
        (
            inside_n1.as_str(),
            vxlan_lease("198.18.0.13", "0e:99:00:00:00:03"),
        ),
        (
            half_n1.as_str(),
            vxlan_lease("198.18.0.13", "0e:99:00:00:00:04"),
        ),
        ("10.244.0.0-24", vxlan_lease("0.0.0.0", "0e:99:00:00:00:05")),
    ];
    for (key, value) in &bad {
        rig.etcdctl(&["put", &lease_key(key), value]).unwrap();
    }
    for node in 1..=3 {
        // Several resyncs later: nothing of them in the kernel.
        wait_reconciles(&rig, node, 3.0);
        let ns = rig.node_ns(node);
        let r = routes(&ns).unwrap();
        let own = facts[node - 1].subnet_v4().unwrap();
        for line in r.lines() {
            let dst = line.split_whitespace().next().unwrap_or_default();
            assert!(
                !["198.18.0.0/25", "8.8.8.0/24", "10.244.0.0/24"].contains(&dst),
                "n{node} routes {dst}:\n{r}"
            );
            if let Some((addr, len)) = dst.split_once('/')
                && let (Ok(addr), Ok(len)) = (addr.parse::<std::net::Ipv4Addr>(), len.parse::<u8>())
            {
                assert!(
                    !(own.contains(&addr) && len > own.prefix_len()),
                    "n{node} routes part of its own subnet {own}: {line}\n{r}"
                );
            }
        }
        let f = fdb(&ns, "flannel.1").unwrap();
        assert!(
            !f.contains("dst 0.0.0.0"),
            "n{node} has an FDB entry to 0.0.0.0:\n{f}"
        );
        // Counted by reason, and logged once each (not on every reconcile).
        for (reason, n) in [
            ("outside_network", 2.0),
            ("wrong_length", 2.0),
            ("bad_public_ip", 1.0),
        ] {
            let series = format!("twill_leases_ignored{{reason=\"{reason}\"}}");
            wait_until(UP, || metric(&rig, node, &series) == Some(n)).unwrap_or_else(|_| {
                panic!("n{node}: {series} is not {n}:\n{}", scrape(&rig, node))
            });
        }
        for (key, _) in &bad {
            assert_eq!(
                log_lines(&rig, node, &["ignoring peer lease", key]),
                1,
                "n{node} did not log {key} exactly once:\n{}",
                rig.twilld_log(node)
            );
        }
    }
    assert_full_mesh(&rig, &pods, false);
    // etcd stays reachable from every node: the deletion of a bad lease reaches them all.
    rig.etcdctl(&["del", &lease_key("8.8.8.0-24")]).unwrap();
    for node in 1..=3 {
        let series = "twill_leases_ignored{reason=\"outside_network\"}";
        wait_until(UP, || metric(&rig, node, series) == Some(1.0))
            .unwrap_or_else(|_| panic!("n{node} never saw the deletion:\n{}", scrape(&rig, node)));
    }
}

#[test]
fn a_network_over_the_underlay_is_refused_and_the_node_keeps_its_routes() {
    let Some(rig) = Rig::for_test(1, None) else {
        return;
    };
    let ns = rig.node_ns(1);
    // The node's way out: a default route via the underlay bridge (it leads nowhere else).
    run(&ns, &["ip", "route", "add", "default", "via", "198.18.0.1"]).unwrap();
    let before = routes(&ns).unwrap();
    assert!(
        before.contains("198.18.0.0/24 dev eth0 proto kernel"),
        "{before}"
    );
    rig.put_network_config(r#"{"Network":"198.18.0.0/16","Backend":{"Type":"vxlan"}}"#)
        .unwrap();
    rig.start_twilld(1, &["--resync-interval", "1"]).unwrap();
    wait_until(UP, || {
        log_lines(
            &rig,
            1,
            &["refusing network config", "198.18.0.0/16", "198.18.0.11/24"],
        ) > 0
    })
    .unwrap_or_else(|_| panic!("{}", rig.twilld_log(1)));
    // A Network holding everything: refused too, naming it.
    rig.put_network_config(r#"{"Network":"0.0.0.0/0","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#)
        .unwrap();
    wait_until(UP, || {
        log_lines(&rig, 1, &["refusing network config", "0.0.0.0/0"]) > 0
    })
    .unwrap_or_else(|_| panic!("{}", rig.twilld_log(1)));
    assert!(
        rig.twilld_running(1),
        "twilld gave up instead of waiting for a usable config"
    );
    assert_eq!(routes(&ns).unwrap(), before, "the node's routes changed");
    assert!(!rig.subnet_file(1).exists());
    assert!(
        run(&ns, &["ip", "link", "show", "flannel.1"]).is_err(),
        "a device was created"
    );
    // A usable config: the node comes up, its own routes still in place.
    rig.put_network_config(VXLAN).unwrap();
    wait_facts(&rig, [1], UP);
    let after = routes(&ns).unwrap();
    for line in before.lines() {
        assert!(after.contains(line), "{line:?} went:\n{after}");
    }
}

#[test]
fn a_foreign_route_inside_the_network_survives_reconciles() {
    let Some((rig, facts, pods)) = watched_cluster(2) else {
        return;
    };
    let ns = rig.node_ns(1);
    // An admin's route inside the cluster Network, via the uplink (no mark: `proto boot`).
    run(
        &ns,
        &[
            "ip",
            "route",
            "add",
            "10.244.250.0/24",
            "via",
            "198.18.0.1",
            "dev",
            "eth0",
        ],
    )
    .unwrap();
    wait_reconciles(&rig, 1, 3.0);
    let r = routes(&ns).unwrap();
    assert!(
        r.contains("10.244.250.0/24 via 198.18.0.1 dev eth0"),
        "the admin's route went:\n{r}"
    );
    // twill's own routes carry its mark.
    let peer = facts[1].subnet_v4().unwrap().to_string();
    let marked = run(&ns, &["ip", "route", "show", "proto", "116"]).unwrap();
    assert!(marked.contains(&peer), "{marked}");
    assert!(!marked.contains("10.244.250.0/24"), "{marked}");
    assert_full_mesh(&rig, &pods, false);
}

#[test]
fn two_agents_on_one_public_ip_do_not_take_each_others_lease() {
    let Some(rig) = Rig::for_test(3, Some(VXLAN)) else {
        return;
    };
    let watch_args = ["--resync-interval", "1", "--metrics-addr", METRICS];
    let (facts, pods) = start_with_pods(&rig, &[1, 3], &watch_args);
    assert_full_mesh(&rig, &pods, false);
    let sn1 = facts[0].subnet_v4().unwrap();
    let key1 = subnet_key(&facts[0]);
    let value_before = rig.etcdctl(&["get", "--print-value-only", &key1]).unwrap();

    // Node 2 is started with node 1's public IP by mistake.
    let n1_ip = Rig::node_ip(1).to_string();
    rig.start_twilld(
        2,
        &[
            "--public-ip",
            &n1_ip,
            "--healthz-ip",
            "127.0.0.1",
            "--healthz-port",
            "9616",
        ],
    )
    .unwrap();
    // Several attempts of node 2 later, node 1's lease is untouched and node 2 has none.
    wait_until(UP, || log_lines(&rig, 2, &["uplink"]) > 0).unwrap();
    wait_reconciles(&rig, 1, 3.0);
    assert_eq!(
        rig.etcdctl(&["get", "--print-value-only", &key1]).unwrap(),
        value_before,
        "node 1's lease was taken over:\n{}",
        rig.twilld_log(2)
    );
    assert!(!rig.subnet_file(2).exists(), "n2 wrote a subnet file");
    assert!(value_before.contains("TwillNodeID"), "{value_before}");
    wait_until(UP, || {
        healthz(&rig, 2).is_some_and(|(code, body)| {
            code == 503 && body.contains(&format!("{}-{}", sn1.addr(), sn1.prefix_len()))
        })
    })
    .unwrap_or_else(|_| panic!("n2 does not report the conflict:\n{}", rig.twilld_log(2)));
    assert!(
        log_lines(&rig, 2, &["carries this node's public IP", &n1_ip]) > 0,
        "{}",
        rig.twilld_log(2)
    );
    // The holder learns of it too.
    wait_until(UP, || log_lines(&rig, 1, &["wants our lease"]) > 0)
        .unwrap_or_else(|_| panic!("n1 never heard of the conflict:\n{}", rig.twilld_log(1)));
    wait_until(UP, || metric(&rig, 1, "twill_lease_conflicts") == Some(1.0))
        .unwrap_or_else(|_| panic!("{}", scrape(&rig, 1)));
    // Nothing was taken: node 1's lease is as it was, node 2 has no subnet, traffic flows.
    let value_now = rig.etcdctl(&["get", "--print-value-only", &key1]).unwrap();
    assert_eq!(value_now, value_before, "node 1's lease was rewritten");
    assert!(!rig.subnet_file(2).exists(), "n2 wrote a subnet file");
    assert_full_mesh(&rig, &pods, false);
    // Node 2 goes (promptly, on SIGTERM); node 1 keeps its lease and its traffic.
    let start = Instant::now();
    let status = rig.kill_twilld(2, Signal::SIGTERM).unwrap();
    assert!(
        status.success() && start.elapsed() < Duration::from_secs(3),
        "{status}"
    );
    assert_eq!(
        rig.etcdctl(&["get", "--print-value-only", &key1]).unwrap(),
        value_before
    );
    assert_full_mesh(&rig, &pods, false);
}

#[test]
fn a_node_whose_lease_was_taken_notices_and_reacquires() {
    let Some(rig) = Rig::for_test(2, Some(VXLAN)) else {
        return;
    };
    let facts = start_nodes(&rig, &[1, 2], &["--resync-interval", "1"]);
    let old = facts[0].subnet_v4().unwrap();
    let key = subnet_key(&facts[0]);
    // Another tool (or an older twill elsewhere) rewrites node 1's key as its own.
    rig.etcdctl(&[
        "put",
        &key,
        &vxlan_lease("198.18.0.99", "0e:99:00:00:00:09"),
    ])
    .unwrap();
    wait_until(UP, || {
        log_lines(&rig, 1, &["no longer ours", "taken over"]) > 0
    })
    .unwrap_or_else(|_| panic!("n1 did not notice:\n{}", rig.twilld_log(1)));
    // A new lease, and the subnet file names it.
    let again = twill_tests::wait_for(UP, || {
        SubnetFacts::read(&rig.subnet_file(1))
            .ok()
            .filter(|f| f.subnet_v4() != Some(old))
    })
    .unwrap_or_else(|_| panic!("n1 did not re-acquire:\n{}", rig.twilld_log(1)));
    let value = rig
        .etcdctl(&["get", "--print-value-only", &subnet_key(&again)])
        .unwrap();
    assert!(value.contains(&Rig::node_ip(1).to_string()), "{value}");
    // The peer routes to node 1's new subnet; pods there are reachable (made now: the rig's
    // hand-made pods do not follow a subnet change, twill-cni's would be made in the new one).
    let p1 = rig.add_pod(1, &again).unwrap();
    let p2 = rig.add_pod(2, &facts[1]).unwrap();
    assert_full_mesh(&rig, &[p1, p2], false);
}

/// SIGTERM ends node 1's twilld cleanly within 3 s (`when` names the moment, for the messages).
fn sigterm_ends_twilld_promptly(rig: &Rig, when: &str) {
    let start = Instant::now();
    let status = rig.kill_twilld(1, Signal::SIGTERM).unwrap();
    eprintln!("SIGTERM {when}: {status} after {:?}", start.elapsed());
    assert!(
        status.success() && start.elapsed() < Duration::from_secs(3),
        "SIGTERM {when}: {status} after {:?}\n{}",
        start.elapsed(),
        rig.twilld_log(1)
    );
}

#[test]
fn sigterm_while_no_subnet_is_free_ends_twilld_promptly() {
    // Three subnets (10.244.1-3.0/24), all leased by other nodes.
    let config = r#"{"Network":"10.244.0.0/22","Backend":{"Type":"vxlan"}}"#;
    let Some(rig) = Rig::for_test(1, Some(config)) else {
        return;
    };
    for n in 1..=3 {
        rig.etcdctl(&[
            "put",
            &lease_key(&format!("10.244.{n}.0-24")),
            &vxlan_lease(
                &format!("198.18.0.{}", 20 + n),
                &format!("0e:99:00:00:00:0{n}"),
            ),
        ])
        .unwrap();
    }
    let health = ["--healthz-ip", "127.0.0.1", "--healthz-port", "9616"];
    rig.start_twilld(1, &health).unwrap();
    wait_until(UP, || {
        healthz(&rig, 1)
            .is_some_and(|(code, body)| code == 503 && body.contains("no free IPv4 subnet"))
    })
    .unwrap_or_else(|_| panic!("{}", rig.twilld_log(1)));
    sigterm_ends_twilld_promptly(&rig, "during exhaustion");

    // The same once the node held a lease and lost it: not ready, no subnet file, and a
    // SIGTERM still ends it.
    rig.etcdctl(&["del", &lease_key("10.244.2.0-24")]).unwrap();
    rig.start_twilld(1, &health).unwrap();
    let f = wait_facts(&rig, [1], UP).remove(0);
    assert_eq!(f.subnet_v4().unwrap().to_string(), "10.244.2.0/24");
    wait_until(UP, || healthz(&rig, 1).is_some_and(|(code, _)| code == 200))
        .unwrap_or_else(|_| panic!("{}", rig.twilld_log(1)));
    rig.etcdctl(&[
        "put",
        &lease_key("10.244.2.0-24"),
        &vxlan_lease("198.18.0.29", "0e:99:00:00:00:29"),
    ])
    .unwrap();
    wait_until(UP, || {
        healthz(&rig, 1)
            .is_some_and(|(code, body)| code == 503 && body.contains("no free IPv4 subnet"))
    })
    .unwrap_or_else(|_| panic!("{}", rig.twilld_log(1)));
    assert!(
        !rig.subnet_file(1).exists(),
        "the subnet file still names a lost subnet"
    );
    sigterm_ends_twilld_promptly(&rig, "while re-acquiring");
}

#[test]
fn a_renew_margin_as_long_as_the_lease_is_refused() {
    let Some(rig) = Rig::for_test(1, Some(VXLAN)) else {
        return;
    };
    rig.start_twilld(1, &["--subnet-lease-renew-margin", "1440"])
        .unwrap();
    wait_until(UP, || !rig.twilld_running(1)).unwrap_or_else(|_| panic!("twilld runs on"));
    let log = rig.twilld_log(1);
    assert!(log.contains("1440") && log.contains("1..=1439"), "{log}");
    assert!(!rig.subnet_file(1).exists());
}

/// The overlay routes (twill's, proto 116) of node `node`.
fn node_routes(rig: &Rig, node: usize) -> String {
    run(&rig.node_ns(node), &["ip", "route", "show", "proto", "116"]).unwrap()
}

/// The overlay routes of both nodes of a two-node cluster.
fn overlay_routes(rig: &Rig) -> Vec<String> {
    (1..=2).map(|n| node_routes(rig, n)).collect()
}

/// A VXLAN cluster of `n` nodes resyncing every second and serving /metrics at [`METRICS`], its
/// pods in a full mesh; `None` when the test cannot run (not root, outside CI).
fn watched_cluster(n: usize) -> Option<(Rig, Vec<SubnetFacts>, Vec<Pod>)> {
    if !require_root() {
        return None;
    }
    let (rig, facts, pods) = cluster(
        VXLAN,
        n,
        &["--resync-interval", "1", "--metrics-addr", METRICS],
    );
    assert_full_mesh(&rig, &pods, false);
    Some((rig, facts, pods))
}

/// What [`meshed_pair`] gives: the rig, the nodes' subnet facts, their pods, the overlay routes.
type MeshedPair = (Rig, Vec<SubnetFacts>, Vec<Pod>, Vec<String>);

/// A two-node VXLAN cluster resyncing every second, its pods in a full mesh, and the overlay
/// routes of its nodes (`None` as [`watched_cluster`]).
fn meshed_pair() -> Option<MeshedPair> {
    let (rig, facts, pods) = watched_cluster(2)?;
    let routes_before = overlay_routes(&rig);
    Some((rig, facts, pods, routes_before))
}

/// The network config written again into an etcd that lost it: both nodes of the cluster
/// lease their subnets again, the same ones, and the overlay is whole.
fn config_written_again(rig: &Rig, facts: &[SubnetFacts], pods: &[Pod]) {
    rig.put_network_config(VXLAN).unwrap();
    wait_until(UP, || lease_keys(rig).is_ok_and(|k| k.len() == 2))
        .unwrap_or_else(|_| panic!("{}\n{}", rig.twilld_log(1), rig.twilld_log(2)));
    for node in 1..=2 {
        let f = rig.wait_subnet_file(node, UP).unwrap();
        assert_eq!(f.subnet, facts[node - 1].subnet, "n{node} changed subnet");
    }
    assert_full_mesh(rig, pods, false);
}

#[test]
fn a_wiped_etcd_keeps_the_overlay_until_its_config_is_back() {
    let Some((rig, facts, pods, routes_before)) = meshed_pair() else {
        return;
    };
    // Everything under the prefix goes: config and leases.
    rig.etcdctl(&["del", "--prefix", "/coreos.com/network"])
        .unwrap();
    for node in 1..=2 {
        wait_reconciles(&rig, node, 3.0);
    }
    // Nobody wrote a lease into an etcd without a config; the overlay is as it was.
    let keys = rig
        .etcdctl(&["get", "--prefix", "--keys-only", "/coreos.com/network/"])
        .unwrap();
    assert!(
        keys.trim().is_empty(),
        "leases re-created in a wiped etcd: {keys}"
    );
    for node in 1..=2 {
        wait_until(UP, || log_lines(&rig, node, &["etcd looks wiped"]) > 0)
            .unwrap_or_else(|_| panic!("n{node}:\n{}", rig.twilld_log(node)));
        wait_until(UP, || {
            log_lines(&rig, node, &["network config key", "was deleted"]) > 0
        })
        .unwrap_or_else(|_| panic!("n{node}:\n{}", rig.twilld_log(node)));
    }
    for node in 1..=2 {
        assert_eq!(
            node_routes(&rig, node),
            routes_before[node - 1],
            "n{node}'s routes changed"
        );
        assert_eq!(
            SubnetFacts::read(&rig.subnet_file(node)).unwrap().subnet,
            facts[node - 1].subnet
        );
    }
    assert_full_mesh(&rig, &pods, false);
    // The config is back: the nodes lease their subnets again and the overlay is whole.
    config_written_again(&rig, &facts, &pods);
}

#[test]
fn a_fresh_empty_etcd_keeps_the_overlay_until_its_config_is_written() {
    let Some((rig, facts, pods, routes_before)) = meshed_pair() else {
        return;
    };
    // etcd is replaced by an empty one (its data gone): revisions start again from 1.
    rig.stop_etcd().unwrap();
    std::fs::remove_dir_all(rig.temp_dir().join("etcd")).unwrap();
    rig.start_etcd().unwrap();
    let keys = || {
        rig.etcdctl(&["get", "--prefix", "--keys-only", "/coreos.com/network/"])
            .unwrap_or_default()
    };
    // Until both nodes have listed the new etcd (they say so), or one wrote a lease into it.
    wait_until(UP, || {
        (1..=2).all(|n| log_lines(&rig, n, &["etcd looks wiped"]) > 0) || !keys().trim().is_empty()
    })
    .unwrap_or_else(|_| panic!("{}\n{}", rig.twilld_log(1), rig.twilld_log(2)));
    for node in 1..=2 {
        wait_reconciles(&rig, node, 3.0);
    }
    let now = keys();
    assert!(
        now.trim().is_empty(),
        "leases written into an etcd without a config: {now}"
    );
    for node in 1..=2 {
        assert_eq!(
            node_routes(&rig, node),
            routes_before[node - 1],
            "n{node}'s routes changed"
        );
    }
    assert_full_mesh(&rig, &pods, false);
    // The admin writes the config: every node notices its lease is not in this etcd and leases
    // its subnet again.
    config_written_again(&rig, &facts, &pods);
}

/// The scenarios above, once per backend: `cargo test --test overlay udp::` runs one backend,
/// and the backends run in parallel test threads. A scenario that does not apply to a backend
/// is listed with the reason.
macro_rules! backends {
    ($($backend:ident: $variant:ident [$($scenario:ident),*]);* $(;)?) => {$(
        mod $backend {
            $(
                #[test]
                fn $scenario() {
                    if twill_tests::require_root() {
                        super::$scenario(twill_tests::Backend::$variant);
                    }
                }
            )*
        }
    )*};
}

backends! {
    vxlan: Vxlan [
        three_nodes_full_mesh,
        kill_and_restart_during_ping_flood_loses_nothing,
        etcd_outage_disturbs_nothing
    ];
    host_gw: HostGw [
        three_nodes_full_mesh,
        kill_and_restart_during_ping_flood_loses_nothing,
        etcd_outage_disturbs_nothing
    ];
    // Not kill_and_restart_during_ping_flood_loses_nothing: udp's data path is twilld itself, so
    // a kill -9 stops forwarding until the restart (udp.rs: udp_kill_and_restart_recovers).
    udp: Udp [three_nodes_full_mesh, etcd_outage_disturbs_nothing];
}
