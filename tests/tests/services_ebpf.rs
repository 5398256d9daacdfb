//! End-to-end tests of the service dataplanes (issues 4 and 5) in the netns rig: real etcd, real
//! twilld on every node, services written with `twilld apply -f`. Every scenario is one body run
//! for each proxy mode (`ebpf`, `nftables`, `iptables`): the `modes!` macro at the end makes a
//! module per mode, so `cargo test --test services_ebpf nftables::` runs one mode, and the modes
//! run in parallel test threads.
//!
//! Why it is shaped as it is:
//! - Every node gets a cgroup2 directory of its own (`<cgroup2>/twill-<rig id>-n<node>`), passed
//!   to its twilld for socket-LB; "in-cluster" clients that must go through socket-LB run as
//!   processes moved into that cgroup (`busybox nc` under `nsenter` into a pod), clients that
//!   must take the tc path run as threads of this test (outside any node cgroup). In the
//!   netfilter modes there is no socket-LB: both kinds of client take the netfilter path, and
//!   the scenarios assert the same user-visible behaviour.
//! - Backends are threads of this test inside pod namespaces answering `<name> peer=<client>`,
//!   so a test can tell which backend served a flow and which source address it saw.
//! - The restart scenario needs more than "did it answer": its clients are `twill-probe stream`
//!   processes (one per path, each in a pod of its own: one client address never reaches one
//!   backend both directly and translated, whose reused 4-tuples the backend's TIME_WAIT would
//!   refuse) that print every connection's start, duration and outcome, so a failure comes with
//!   its reason and is lined up with the agent's log and the kills.
//! - The flags that turn a proxy mode on are in one place, [`proxy_flags`].
//! - Privileged: as root they run; under CI a non-root run fails (see `require_root`).

use std::fmt::Write as _;
use std::fs;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use twill_facts::SubnetFacts;
use twill_tests::manifest::manifests;
use twill_tests::suite::{strip_ansi, wait_facts};
use twill_tests::{NameServer, Pod, PodShape, Rig, ServiceSpec, require_root, wait_until};

const HOST_GW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;
const UP: Duration = Duration::from_secs(20);
const VIP: &str = "10.96.0.10";
const NODE_PORT: u16 = 30080;
/// The ClusterIP and NodePort of the pod-shape scenario's Service whose EndpointSlice has no
/// `nodeName`.
const BARE_VIP: &str = "10.96.0.11";
const BARE_NODE_PORT: u16 = 30081;
/// Requests per client and path in the pod-shape scenario.
const SHAPE_REQUESTS: usize = 20;
/// An external IP of the test service: an address of the rig's underlay range that no
/// interface holds; the underlay (the "outside") routes it to node 1.
const EXTERNAL_IP: &str = "198.18.200.10";

/// The agent flags enabling proxy `mode` on `node` (for eBPF, with socket-LB on `cgroup`).
///
/// `--node-name` is what makes an endpoint local (EndpointSlices' `nodeName`, as kube-proxy
/// matches it): the rig's nodes share the host's UTS namespace, so without it every node would
/// be named after the host, no endpoint would be local, `externalTrafficPolicy: Local` would
/// have no endpoints and a pod reaching a backend on its own node through tc would get no
/// hairpin SNAT. `--allowed-external-ips` lets the nodes program the test's external IP (none
/// is programmed by default).
fn proxy_flags(mode: &str, node: usize, cgroup: &Path) -> Vec<String> {
    let mut flags = vec![
        "--proxy-mode".into(),
        mode.into(),
        "--node-name".into(),
        format!("n{node}"),
        "--allowed-external-ips".into(),
        EXTERNAL_IP.into(),
    ];
    if mode == "ebpf" || mode == "auto" {
        flags.extend(["--lb-cgroup".into(), cgroup.display().to_string()]);
    }
    flags
}

/// A cluster of `n` host-gw nodes running twilld with one proxy mode, and its cgroups.
struct Cluster {
    mode: &'static str,
    /// The backends' servers (stopped first).
    servers: Mutex<Vec<NameServer>>,
    /// Stops twilld and removes namespaces, cgroups and pins when dropped.
    rig: Rig,
    /// The nodes' cgroups, made by the rig.
    cgroups: Vec<PathBuf>,
    facts: Vec<SubnetFacts>,
    stop: Arc<AtomicBool>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Cluster {
    fn new(mode: &'static str, n: usize) -> Self {
        Self::with(mode, n, |_| {})
    }

    /// A cluster whose node namespaces get `prepare(rig)` before twilld starts.
    fn with(mode: &'static str, n: usize, prepare: impl FnOnce(&Rig)) -> Self {
        let rig = Rig::configured(n, HOST_GW);
        let cgroups: Vec<PathBuf> = (1..=n)
            .map(|node| rig.node_cgroup(node).expect("node cgroup"))
            .collect();
        prepare(&rig);
        for node in 1..=n {
            let flags = proxy_flags(mode, node, &cgroups[node - 1]);
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            rig.start_twilld(node, &flags).unwrap();
        }
        let facts = wait_facts(&rig, 1..=n, UP);
        // Pods made from here on must reach each other across nodes at once: a scenario's
        // readiness checks can pass through a local backend or a NodePort while another node
        // still has no route back to this node's pods.
        rig.wait_peer_routes(&facts, UP)
            .unwrap_or_else(|e| panic!("{e:#}"));
        Cluster {
            mode,
            servers: Mutex::new(Vec::new()),
            rig,
            cgroups,
            facts,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    fn pod(&self, node: usize) -> Pod {
        self.rig.add_pod(node, &self.facts[node - 1]).unwrap()
    }

    /// A pod on `node` plugged in as `shape`.
    fn shaped_pod(&self, node: usize, shape: PodShape) -> Pod {
        self.rig
            .add_shaped_pod(node, shape, &self.facts[node - 1])
            .unwrap_or_else(|e| panic!("{shape:?} pod on node {node}: {e:#}"))
    }

    fn cgroup(&self, node: usize) -> &Path {
        &self.cgroups[node - 1]
    }

    /// `twilld apply -f` of a manifest of `specs`.
    fn apply(&self, specs: &[ServiceSpec]) {
        let file = self.rig.temp_dir().join(format!(
            "manifest-{}.yaml",
            Instant::now().elapsed().as_nanos()
        ));
        fs::write(&file, manifests(specs)).unwrap();
        let bin = self.rig.twilld_path().unwrap();
        let out = twill_tests::exec(
            &self.rig.node_ns(1),
            &[
                bin.to_str().unwrap(),
                "apply",
                "-f",
                file.to_str().unwrap(),
                "--etcd-endpoints",
                twill_tests::rig::ETCD_ENDPOINT,
            ],
        )
        .unwrap();
        assert!(
            out.status.success(),
            "twilld apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A TCP and a UDP server in `pod` answering `<name> peer=<client>`.
    fn serve(&self, pod: &Pod, name: &'static str) {
        let ip = IpAddr::V4(pod.ipv4.expect("pod v4"));
        let server = NameServer::start(
            &pod.ns,
            name,
            Some(SocketAddr::new(ip, 8080)),
            Some(SocketAddr::new(ip, 5353)),
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        self.servers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(server);
    }
}

fn backend_name(line: &str) -> &str {
    line.split_whitespace().next().unwrap_or_default()
}

/// The pod's IPv4 address, as an endpoint address.
fn pod_ip(pod: &Pod) -> IpAddr {
    IpAddr::V4(pod.ipv4.expect("pod v4"))
}

/// Service `test/web` at [`VIP`]: `http` 80 → 8080 on NodePort [`NODE_PORT`] and `dns` 53 →
/// 5353/UDP on NodePort 30053, its endpoints the pods of `endpoints` on the nodes named there.
fn web(endpoints: &[(&Pod, &str)]) -> ServiceSpec {
    let endpoints: Vec<(IpAddr, Option<&str>)> = endpoints
        .iter()
        .map(|(pod, node)| (pod_ip(pod), Some(*node)))
        .collect();
    ServiceSpec::new("web", VIP.parse().unwrap())
        .namespace("test")
        .tcp("http", 80, 8080)
        .node_port(NODE_PORT)
        .udp("dns", 53, 5353)
        .node_port(30053)
        .endpoints(&endpoints)
}

/// ClusterIP from a pod on another node (socket-LB and tc path) reaches every backend and never
/// a removed one; NodePort and an ExternalIP from outside the cluster (the underlay) work too.
fn clusterip_and_nodeport_reach_all_and_never_a_removed_backend(mode: &'static str) {
    let c = Cluster::new(mode, 2);
    let (b1, b2, client) = (c.pod(1), c.pod(2), c.pod(2));
    c.serve(&b1, "b1");
    c.serve(&b2, "b2");
    let external: IpAddr = EXTERNAL_IP.parse().unwrap();
    c.apply(&[web(&[(&b1, "n1"), (&b2, "n2")]).external_ip(external)]);
    // The outside host routes the external IP to node 1, as a router in front of a cluster
    // would (the address lives only inside the rig).
    twill_tests::ns::ip_batch(
        Some(&c.rig.underlay_ns()),
        &format!("route add {EXTERNAL_IP}/32 via {}\n", Rig::node_ip(1)),
    )
    .unwrap();
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    wait_until(UP, || twill_tests::tcp_line(&client.ns, vip).is_some())
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.rig.twilld_log(2)));

    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let a = twill_tests::tcp_line_in_cgroup(&client.ns, c.cgroup(2), vip)
            .expect("socket-LB connect");
        let b = twill_tests::tcp_line(&client.ns, vip).expect("tc-path connect");
        seen.insert(backend_name(&a).to_owned());
        seen.insert(backend_name(&b).to_owned());
    }
    assert_eq!(seen, ["b1", "b2"].map(String::from).into());

    let node_port: SocketAddr = SocketAddr::new(Rig::node_ip(1).into(), NODE_PORT);
    let outside = c.rig.underlay_ns();
    // `externalTrafficPolicy: Cluster` SNATs to the node only when the backend is on another
    // node (Cilium's NodePort, as documented in the tc program): b2's reply must come back
    // through node 1, while b1's reply leaves node 1 anyway and b1 keeps the client's address.
    // Kubernetes promises source preservation only for `Local`; for `Cluster` either is allowed.
    for _ in 0..10 {
        let line = twill_tests::tcp_line(&outside, node_port).expect("NodePort from outside");
        let peer = match backend_name(&line) {
            "b1" => "peer=198.18.0.1:",
            _ => "peer=198.18.0.11:",
        };
        assert!(line.contains(peer), "NodePort source: {line}");
    }
    let external_ip: SocketAddr = format!("{EXTERNAL_IP}:80").parse().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let line = twill_tests::tcp_line(&outside, external_ip).expect("ExternalIP from outside");
        seen.insert(backend_name(&line).to_owned());
    }
    assert_eq!(seen, ["b1", "b2"].map(String::from).into(), "ExternalIP");

    // Remove b1: within a second no new flow reaches it.
    c.apply(&[web(&[(&b2, "n2")]).external_ip(external)]);
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..20 {
        let lines = [
            twill_tests::tcp_line_in_cgroup(&client.ns, c.cgroup(2), vip)
                .expect("socket-LB connect"),
            twill_tests::tcp_line(&client.ns, vip).expect("tc-path connect"),
            twill_tests::tcp_line(&outside, node_port).expect("NodePort connect"),
            twill_tests::tcp_line(&outside, external_ip).expect("ExternalIP connect"),
        ];
        for line in &lines {
            assert_eq!(backend_name(line), "b2", "removed backend served: {line}");
        }
    }
}

/// Two Services in front of the same two backends (one per node): `web` with `nodeName` in its
/// EndpointSlice, `web-bare` without (as standalone users write them).
fn shaped_services(b1: &Pod, b2: &Pod) -> [ServiceSpec; 2] {
    let service = |name: &str, vip: &str, node_port: u16| {
        ServiceSpec::new(name, vip.parse().unwrap())
            .namespace("test")
            .tcp("http", 80, 8080)
            .node_port(node_port)
    };
    [
        service("web", VIP, NODE_PORT)
            .endpoint(pod_ip(b1), Some("n1"))
            .endpoint(pod_ip(b2), Some("n2")),
        service("web-bare", BARE_VIP, BARE_NODE_PORT)
            .endpoint(pod_ip(b1), None)
            .endpoint(pod_ip(b2), None),
    ]
}

/// Whatever plugs the pods in (`shape`), with and without `nodeName` in the EndpointSlice:
/// every NodePort request from outside the cluster to node 1 succeeds (the backends are b1 on
/// node 1 and b2 on node 2), and so does every ClusterIP request from a pod on node 1, from a
/// pod on node 2 and from b1 itself, through socket-LB and through the tc path.
fn pods_shaped_as(mode: &'static str, shape: PodShape) {
    let c = Cluster::new(mode, 2);
    let (b1, b2) = (c.shaped_pod(1, shape), c.shaped_pod(2, shape));
    let (c1, c2) = (c.shaped_pod(1, shape), c.shaped_pod(2, shape));
    c.serve(&b1, "b1");
    c.serve(&b2, "b2");
    c.apply(&shaped_services(&b1, &b2));
    let outside = c.rig.underlay_ns();
    let variants = [
        ("with nodeName", VIP, NODE_PORT),
        ("without nodeName", BARE_VIP, BARE_NODE_PORT),
    ];
    let node_port = |port| SocketAddr::new(Rig::node_ip(1).into(), port);
    // Programmed: each NodePort has answered once.
    wait_until(UP, || {
        variants
            .iter()
            .all(|(_, _, port)| twill_tests::tcp_line(&outside, node_port(*port)).is_some())
    })
    .unwrap_or_else(|e| panic!("{shape:?}: {e:#}\n{}", c.rig.twilld_log(1)));

    let mut failures = Vec::new();
    for (variant, vip, port) in variants {
        let mut tally = |what: &str, attempt: &dyn Fn() -> Option<String>| {
            let (seen, failed) = tally(attempt);
            if failed > 0 {
                failures.push(format!(
                    "{variant}: {what}: {failed} of {SHAPE_REQUESTS} failed (answered: {seen:?})"
                ));
            }
            seen
        };
        let from_outside = tally("NodePort from outside", &|| {
            twill_tests::tcp_line(&outside, node_port(port))
        });
        let vip: SocketAddr = format!("{vip}:80").parse().unwrap();
        let mut from_pods = std::collections::BTreeSet::new();
        for (client, who) in [
            (&c1, "a pod on node 1"),
            (&c2, "a pod on node 2"),
            (&b1, "b1"),
        ] {
            let cgroup = c.cgroup(client.node);
            from_pods.extend(tally(&format!("ClusterIP from {who} via tc"), &|| {
                twill_tests::tcp_line(&client.ns, vip)
            }));
            from_pods.extend(tally(
                &format!("ClusterIP from {who} via socket-LB"),
                &|| twill_tests::tcp_line_in_cgroup(&client.ns, cgroup, vip),
            ));
        }
        for (what, seen) in [("NodePort", from_outside), ("ClusterIP", from_pods)] {
            if seen.len() == 1 {
                failures.push(format!("{variant}: {what}: only {seen:?} answered"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{shape:?} pods, {mode} proxy:\n{}\n{}",
        failures.join("\n"),
        c.rig.twilld_log(1)
    );
}

/// [`SHAPE_REQUESTS`] attempts: the backends that answered and the number of failures.
fn tally(attempt: &dyn Fn() -> Option<String>) -> (std::collections::BTreeSet<String>, usize) {
    let mut seen = std::collections::BTreeSet::new();
    let mut failed = 0;
    for _ in 0..SHAPE_REQUESTS {
        match attempt() {
            Some(line) => {
                seen.insert(backend_name(&line).to_owned());
            }
            None => failed += 1,
        }
    }
    (seen, failed)
}

/// A UDP flow (a pod's connected socket) to a removed endpoint moves within 1 s.
fn udp_flow_moves_off_a_removed_endpoint_within_a_second(mode: &'static str) {
    let c = Cluster::new(mode, 2);
    let (b1, b2, client) = (c.pod(1), c.pod(2), c.pod(2));
    c.serve(&b1, "b1");
    c.serve(&b2, "b2");
    c.apply(&[web(&[(&b1, "n1"), (&b2, "n2")])]);
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, String)>();
    let ns = client.ns.clone();
    let stop = c.stop.clone();
    std::thread::spawn(move || {
        twill_tests::ns::join_netns(&ns).expect("join the client's namespace");
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        sock.connect(format!("{VIP}:53")).unwrap();
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            let _ = sock.send(b"ping");
            let reply = match sock.recv(&mut buf) {
                Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
                Err(_) => "timeout".into(),
            };
            if tx.send((Instant::now(), reply)).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let first = wait_first_reply(&rx);
    let (gone_name, keep) = if backend_name(&first) == "b1" {
        ("b1", (&b2, "n2"))
    } else {
        ("b2", (&b1, "n1"))
    };
    let removed = Instant::now();
    c.apply(&[web(&[keep])]);
    let mut late = 0;
    while removed.elapsed() < Duration::from_secs(4) {
        let (at, reply) = rx.recv_timeout(Duration::from_secs(2)).expect("stream");
        if at.duration_since(removed) > Duration::from_secs(1) {
            late += 1;
            assert_ne!(
                backend_name(&reply),
                gone_name,
                "removed endpoint still served"
            );
            assert_ne!(reply, "timeout", "flow broken after the removal");
        }
    }
    assert!(late > 10, "too few datagrams after the removal: {late}");
}

fn wait_first_reply(rx: &std::sync::mpsc::Receiver<(Instant, String)>) -> String {
    let deadline = Instant::now() + UP;
    while Instant::now() < deadline {
        if let Ok((_, reply)) = rx.recv_timeout(Duration::from_secs(1))
            && reply != "timeout"
        {
            return reply;
        }
    }
    panic!("no UDP reply through the VIP");
}

/// `externalTrafficPolicy: Local` keeps the client's address (no SNAT); `sessionAffinity:
/// ClientIP` keeps one client on one backend.
fn external_local_keeps_source_and_affinity_sticks(mode: &'static str) {
    let c = Cluster::new(mode, 2);
    let (b1, b2, b3) = (c.pod(1), c.pod(1), c.pod(2));
    c.serve(&b1, "b1");
    c.serve(&b2, "b2");
    c.serve(&b3, "b3");
    let node_names = [(&b1, "n1"), (&b2, "n1"), (&b3, "n2")];
    c.apply(&[web(&node_names)
        .external_traffic_local()
        .client_ip_affinity()]);
    let node_port: SocketAddr = SocketAddr::new(Rig::node_ip(1).into(), NODE_PORT);
    let outside = c.rig.underlay_ns();
    wait_until(UP, || twill_tests::tcp_line(&outside, node_port).is_some())
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.rig.twilld_log(1)));
    let mut backends = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let line = twill_tests::tcp_line(&outside, node_port).expect("NodePort");
        assert!(
            line.contains("peer=198.18.0.1:"),
            "Local policy must keep the client address: {line}"
        );
        backends.insert(backend_name(&line).to_owned());
    }
    assert_eq!(backends.len(), 1, "affinity: one backend, got {backends:?}");
    assert!(
        !backends.contains("b3"),
        "Local policy: only node 1's endpoints"
    );
}

/// Times the restart scenario kills and restarts twilld.
const RESTARTS: usize = 6;
/// How long a restarted twilld may take to its first sync: on a loaded machine (the scenario's
/// own load, the other modes' runs in parallel) loading and verifying the eBPF programs alone
/// took 10 s.
const RESTART_UP: Duration = Duration::from_secs(90);
/// Connections every client stream makes between two steps of the restart scenario (before a
/// kill, while the agent is down, after its first sync).
const STEP_CONNS: usize = 25;
/// A client stream starts a connection at most this often (µs): ~400 a second each. Faster, the
/// streams that the eBPF tc path source-NATs (a NodePort to another node's backend, a pod to a
/// backend beside it) would hold most of its 4536 SNAT ports in their 10 s closing time, and a
/// SYN finding no free one is dropped: a capacity limit, not the restart this test is about.
const STREAM_INTERVAL_US: u32 = 2_500;

/// Busy loops on every core while it lives: the restart scenario runs on a loaded machine, as
/// under the full suite, where the agent starts slowly and every window of its start-up widens.
struct CpuLoad {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl CpuLoad {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        let threads = (0..cores)
            .map(|i| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = i as u64 + 1;
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..10_000 {
                            x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005) + 1);
                        }
                    }
                    x
                })
            })
            .collect();
        CpuLoad { stop, threads }
    }
}

impl Drop for CpuLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Microseconds since the Unix epoch: the clock of `twill-probe stream` and of twilld's log.
fn unix_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

/// The time stamp of one of twilld's log lines (`2026-12-04T15:44:15.123456Z ...`, without
/// colours), in µs since the Unix epoch.
fn log_time_us(line: &str) -> Option<u128> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut ymd = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut hms = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (hour, min, sec) = (hms.next()??, hms.next()??, hms.next()??);
    // Days from the civil date (Howard Hinnant's algorithm).
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let micros = format!("{frac:0<6}")[..6].parse::<i64>().ok()?;
    let us = ((days * 86_400 + hour * 3600 + min * 60 + sec) * 1_000_000) + micros;
    u128::try_from(us).ok()
}

/// One connection of a client stream: a line of `twill-probe stream`.
#[derive(Debug, Clone)]
struct Attempt {
    at_us: u128,
    took_us: u128,
    /// `ok <backend>`, or the reason it failed (`refused ...`, `timeout ...`, `retrans <backend>`
    /// when a SYN had to be sent again, ...).
    outcome: String,
}

/// A `twill-probe stream` client (fresh connections one after the other) and what it reported.
struct ClientStream {
    name: &'static str,
    child: std::process::Child,
    seen: Arc<std::sync::Mutex<Vec<Attempt>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl ClientStream {
    fn start(name: &'static str, mut cmd: std::process::Command) -> Self {
        use std::io::BufRead as _;
        use std::process::Stdio;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start the {name} client stream: {e}"));
        let out = child.stdout.take().expect("stdout is piped");
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let reader = std::thread::spawn({
            let seen = seen.clone();
            move || {
                for line in std::io::BufReader::new(out).lines() {
                    let Ok(line) = line else { return };
                    let mut f = line.splitn(3, ' ');
                    let (Some(at), Some(took), Some(outcome)) = (f.next(), f.next(), f.next())
                    else {
                        continue;
                    };
                    let (Ok(at_us), Ok(took_us)) = (at.parse(), took.parse()) else {
                        continue;
                    };
                    seen.lock().unwrap().push(Attempt {
                        at_us,
                        took_us,
                        outcome: outcome.to_owned(),
                    });
                }
            }
        });
        ClientStream {
            name,
            child,
            seen,
            reader: Some(reader),
        }
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Ends the stream (its stdin closes; the connection in flight finishes) and returns every
    /// attempt.
    fn finish(&mut self) -> Vec<Attempt> {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The kernel's initial retransmission timeout of a SYN: a connection that needed a retransmitted
/// SYN and took at least this long had a SYN (or its SYN-ACK) dropped on the way.
const SYN_RTO_US: u128 = 1_000_000;

/// Whether an attempt is a success: answered by one of `backends`, with no packet lost.
///
/// A SYN retransmitted well before [`SYN_RTO_US`] was not lost: the backend still held the
/// 4-tuple in TIME_WAIT (the port translation of an earlier connection reused it) and answered
/// with an ACK, the client reset it and sent its SYN again at once. That happens with every
/// proxy that translates ports, kube-proxy's too (timestamps are offset per 4-tuple, so the
/// backend's PAWS check rejects the reused tuple's SYN), and costs a few milliseconds.
fn served(a: &Attempt, backends: &[&str]) -> bool {
    let answered = |rest: Option<&str>| rest.is_some_and(|b| backends.contains(&b));
    answered(a.outcome.strip_prefix("ok "))
        || (a.took_us < SYN_RTO_US && answered(a.outcome.strip_prefix("retrans ")))
}

/// Whether an attempt is a success after a quick SYN retransmission (see [`served`]).
fn quick_retrans(a: &Attempt) -> bool {
    a.outcome.starts_with("retrans ") && a.took_us < SYN_RTO_US
}

/// What happened around `at`: the scenario's events, the attempts of every stream (runs of
/// successes collapsed) and node 2's log lines, within `window` µs, times relative to `origin`.
fn timeline(
    at: u128,
    window: u128,
    origin: u128,
    events: &[(u128, String)],
    streams: &[(&str, Vec<Attempt>)],
    log: &str,
    backends: &[&str],
) -> String {
    let rel = |t: u128| {
        #[expect(
            clippy::cast_precision_loss,
            reason = "test times are far below 2^52 µs"
        )]
        let ms = (t as f64 - origin as f64) / 1000.0;
        format!("{ms:+10.1} ms")
    };
    let near = |t: u128| t + window >= at && t <= at + window;
    let mut rows: Vec<(u128, String)> = events
        .iter()
        .filter(|(t, _)| near(*t))
        .map(|(t, e)| (*t, format!("EVENT   {e}")))
        .collect();
    for (name, attempts) in streams {
        let mut run: Option<(u128, u128, usize)> = None;
        for a in attempts.iter().filter(|a| near(a.at_us)) {
            if served(a, backends) {
                let r = run.get_or_insert((a.at_us, a.at_us, 0));
                r.1 = a.at_us;
                r.2 += 1;
                continue;
            }
            if let Some((from, to, n)) = run.take() {
                rows.push((from, format!("{name:<9} {n} ok until {}", rel(to))));
            }
            rows.push((
                a.at_us,
                format!("{name:<9} FAILED after {} µs: {}", a.took_us, a.outcome),
            ));
        }
        if let Some((from, to, n)) = run {
            rows.push((from, format!("{name:<9} {n} ok until {}", rel(to))));
        }
    }
    for line in log.lines().map(strip_ansi) {
        if let Some(t) = log_time_us(&line)
            && near(t)
        {
            rows.push((t, format!("twilld  {}", line.trim())));
        }
    }
    rows.sort_by_key(|r| r.0);
    rows.iter().fold(String::new(), |mut o, (t, r)| {
        let _ = writeln!(o, "  {} {r}", rel(*t));
        o
    })
}

/// Lines of node `node`'s log that say the service loop finished its first sync since start.
fn first_syncs(c: &Cluster, node: usize) -> Vec<String> {
    c.rig
        .twilld_log(node)
        .lines()
        .map(strip_ansi)
        .filter(|l| l.contains("first service sync since start"))
        .collect()
}

/// `kill -9` and restart of twilld, several times, on a loaded machine, while fresh connections
/// stream to the node's services through every path (socket-LB, the tc or netfilter path of a
/// pod, a NodePort from outside): none fails, none is answered by anything but a backend, no
/// SYN is lost (a retransmitted SYN is a packet the dataplane dropped), and the first sync of
/// every restarted agent rewrites nothing (the dataplane it finds is already right). Failures
/// are reported with their reason and the timeline around them.
fn restart_under_fresh_connections_loses_none(mode: &'static str) {
    let c = Cluster::new(mode, 2);
    let (b1, b2) = (c.pod(1), c.pod(2));
    // Two client pods on the restarted node: one balanced at connect() (socket-LB in the eBPF
    // mode), one translated per packet. Separate, so that a backend never sees one client
    // address both directly and translated, whose TIME_WAIT/PAWS checks would drop SYNs (an
    // artefact of the test, not a loss).
    let (lb_client, tc_client) = (c.pod(2), c.pod(2));
    for (pod, name) in [(&b1, "b1"), (&b2, "b2")] {
        c.rig.start_responder(pod, name, &[8080]).unwrap();
    }
    let backends = ["b1", "b2"];
    c.apply(&[web(&[(&b1, "n1"), (&b2, "n2")])]);
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let node_port = SocketAddr::new(Rig::node_ip(2).into(), NODE_PORT);
    let outside = c.rig.underlay_ns();
    wait_until(UP, || {
        twill_tests::tcp_line_in_cgroup(&lb_client.ns, c.cgroup(2), vip).is_some()
            && twill_tests::tcp_line(&tc_client.ns, vip).is_some()
            && twill_tests::tcp_line(&outside, node_port).is_some()
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.rig.twilld_log(2)));
    wait_until(UP, || first_syncs(&c, 2).len() == 1)
        .unwrap_or_else(|e| panic!("first sync: {e:#}\n{}", c.rig.twilld_log(2)));

    let load = CpuLoad::start();
    let probe = c.rig.binary("twill-probe").unwrap();
    let args = |addr: SocketAddr| {
        vec![
            probe.display().to_string(),
            "stream".into(),
            format!("--interval-us={STREAM_INTERVAL_US}"),
            addr.to_string(),
        ]
    };
    let mut streams = [
        ClientStream::start(
            "socket-LB",
            twill_tests::rig::nsenter_in_cgroup(&lb_client.ns, c.cgroup(2), &args(vip)),
        ),
        ClientStream::start("pod", twill_tests::nsenter(&tc_client.ns, &args(vip))),
        ClientStream::start("NodePort", twill_tests::nsenter(&outside, &args(node_port))),
    ];
    let origin = unix_us();
    let mut events: Vec<(u128, String)> = vec![(origin, "client streams started".into())];
    // Every stream makes `n` more connections (bounded in time).
    let advance = |streams: &[ClientStream], n: usize, what: &str| {
        let base: Vec<usize> = streams.iter().map(ClientStream::count).collect();
        wait_until(UP, || {
            streams.iter().zip(&base).all(|(s, b)| s.count() >= b + n)
        })
        .unwrap_or_else(|e| {
            let counts: Vec<_> = streams.iter().map(|s| (s.name, s.count())).collect();
            panic!("{what}: {e:#} (connections so far {counts:?})")
        });
    };
    let flags = proxy_flags(c.mode, 2, c.cgroup(2));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    for round in 1..=RESTARTS {
        advance(&streams, STEP_CONNS, "traffic before the kill");
        c.rig.kill_twilld(2, Signal::SIGKILL).unwrap();
        events.push((
            unix_us(),
            format!("restart {round}: twilld killed (SIGKILL)"),
        ));
        advance(&streams, STEP_CONNS, "traffic while twilld is down");
        let syncs = first_syncs(&c, 2).len();
        events.push((unix_us(), format!("restart {round}: twilld started")));
        c.rig.start_twilld(2, &flags).unwrap();
        wait_until(RESTART_UP, || first_syncs(&c, 2).len() > syncs).unwrap_or_else(|e| {
            panic!(
                "restart {round}: no first sync: {e:#}\n{}",
                c.rig.twilld_log(2)
            )
        });
        events.push((unix_us(), format!("restart {round}: first sync logged")));
    }
    advance(&streams, STEP_CONNS, "traffic after the last restart");
    let results: Vec<(&str, Vec<Attempt>)> =
        streams.iter_mut().map(|s| (s.name, s.finish())).collect();
    events.push((unix_us(), "client streams stopped".into()));
    drop(load);

    let log = c.rig.twilld_log(2);
    let mut summary = String::new();
    let mut failures: Vec<(&str, &Attempt)> = Vec::new();
    for (name, attempts) in &results {
        let mut reasons = std::collections::BTreeMap::<&str, usize>::new();
        for a in attempts.iter().filter(|a| !served(a, &backends)) {
            let reason = if a.outcome.starts_with("ok ") {
                "wrong backend"
            } else if a.outcome.starts_with("retrans ") && a.took_us >= SYN_RTO_US {
                "SYN lost"
            } else {
                a.outcome.split_whitespace().next().unwrap_or_default()
            };
            *reasons.entry(reason).or_default() += 1;
            failures.push((name, a));
        }
        let _ = writeln!(
            summary,
            "{name}: {} connections, {} failed {reasons:?}, {} answered after a quick SYN \
             retransmission (a reused 4-tuple in TIME_WAIT)",
            attempts.len(),
            reasons.values().sum::<usize>(),
            attempts.iter().filter(|a| quick_retrans(a)).count()
        );
    }
    let total: usize = results.iter().map(|(_, a)| a.len()).sum();
    let mut report = format!(
        "{mode}: {total} fresh connections across {RESTARTS} restarts under load\n{summary}"
    );
    failures.sort_by_key(|(_, a)| a.at_us);
    let mut shown_until = 0;
    for (name, a) in &failures {
        if a.at_us <= shown_until {
            continue;
        }
        shown_until = a.at_us + 300_000;
        let _ = write!(
            report,
            "\ntimeline around the {name} failure \"{}\":\n{}",
            a.outcome,
            timeline(a.at_us, 300_000, origin, &events, &results, &log, &backends)
        );
    }
    eprintln!("{report}");
    assert!(
        failures.is_empty(),
        "connections failed across the restarts:\n{report}"
    );
    // After a kill -9 the dataplane is exactly what the agent would program: a restarted agent
    // repairs nothing, recreates nothing, and its first sync has nothing to do.
    let syncs = first_syncs(&c, 2);
    assert_eq!(syncs.len(), RESTARTS + 1, "{syncs:#?}");
    for line in &syncs[1..] {
        assert!(
            line.contains(" ops=0 "),
            "a restarted agent rewrote its dataplane: {line}\n{report}"
        );
    }
    // The log of every run but the first (the rig marks each start).
    let restarted = log
        .splitn(3, "twill-rig: starting")
        .nth(2)
        .unwrap_or_default();
    let rewrites: Vec<String> = restarted
        .lines()
        .map(strip_ansi)
        .filter(|l| l.contains("repairing") || l.contains("recreating"))
        .collect();
    assert!(
        rewrites.is_empty(),
        "a restarted agent rewrote its dataplane:\n{}",
        rewrites.join("\n")
    );
}

/// Rules of another owner in the same tables (an `inet filter` table, a chain of its own in the
/// iptables `nat` table with a jump from PREROUTING) are left exactly as they were, through
/// syncs and a restart; twill's services work beside them.
fn other_owners_rules_are_left_alone(mode: &'static str) {
    const FOREIGN_NFT: &str = "table inet filter {\n chain input {\n  type filter hook input priority 0; policy accept;\n  tcp dport 22 counter accept\n }\n}\n";
    let foreign = |rig: &Rig, node: usize| -> (String, String) {
        let ns = rig.node_ns(node);
        let nft = twill_tests::run(&ns, &["nft", "list", "table", "inet", "filter"]).unwrap();
        let ipt = twill_tests::run(&ns, &["iptables-save", "-t", "nat"]).unwrap();
        let ipt: Vec<&str> = ipt.lines().filter(|l| l.contains("FOREIGN")).collect();
        (nft, ipt.join("\n"))
    };
    let c = Cluster::with(mode, 2, |rig| {
        for node in 1..=2 {
            let ns = rig.node_ns(node);
            let file = rig.temp_dir().join(format!("foreign-{node}.nft"));
            fs::write(&file, FOREIGN_NFT).unwrap();
            twill_tests::run(&ns, &["nft", "-f", file.to_str().unwrap()]).unwrap();
            for args in [
                &["-t", "nat", "-N", "FOREIGN-CHAIN"][..],
                &[
                    "-t",
                    "nat",
                    "-A",
                    "FOREIGN-CHAIN",
                    "-p",
                    "tcp",
                    "--dport",
                    "9999",
                    "-j",
                    "RETURN",
                ],
                &["-t", "nat", "-A", "PREROUTING", "-j", "FOREIGN-CHAIN"],
            ] {
                let mut a = vec!["iptables"];
                a.extend_from_slice(args);
                twill_tests::run(&ns, &a).unwrap();
            }
        }
    });
    let before = foreign(&c.rig, 2);
    assert!(before.1.contains("--dport 9999"), "{}", before.1);
    let (b1, client) = (c.pod(1), c.pod(2));
    c.serve(&b1, "b1");
    c.apply(&[web(&[(&b1, "n1")])]);
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    wait_until(UP, || twill_tests::tcp_line(&client.ns, vip).is_some())
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.rig.twilld_log(2)));
    c.rig.kill_twilld(2, Signal::SIGKILL).unwrap();
    let flags = proxy_flags(mode, 2, c.cgroup(2));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    c.rig.start_twilld(2, &flags).unwrap();
    c.apply(&[web(&[(&b1, "n1")]).client_ip_affinity()]);
    wait_until(UP, || twill_tests::tcp_line(&client.ns, vip).is_some()).unwrap();
    assert_eq!(foreign(&c.rig, 2), before, "another owner's rules changed");
}

/// A starting node programs its overlay without waiting for its eBPF service proxy, whose
/// programs take a second to load, verify and attach (several on a busy machine): its route to
/// the other node's pods is in place, and logged, before the proxy says it is ready. Had the
/// overlay waited, pods placed on the node as soon as its subnet file existed could not reach
/// the other node's pods (nor be reached from them) for that long, while its services already
/// answered through local backends and NodePorts.
#[test]
fn the_overlay_does_not_wait_for_the_ebpf_proxy() {
    if !require_root() {
        return;
    }
    let c = Cluster::new("ebpf", 2);
    let proxy_ready = |l: &str| {
        l.contains("twill_agent::services::proxy") && l.contains("service dataplane ready")
    };
    wait_until(UP, || c.rig.twilld_log(2).lines().any(proxy_ready))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.rig.twilld_log(2)));
    let log: Vec<String> = c.rig.twilld_log(2).lines().map(strip_ansi).collect();
    let overlay = log.iter().position(|l| l.contains("overlay reconciled"));
    let proxy = log.iter().position(|l| proxy_ready(l));
    assert!(
        matches!((overlay, proxy), (Some(o), Some(p)) if o < p),
        "node 2's overlay waited for its service proxy:\n{}",
        log.join("\n")
    );
}

/// `--proxy-mode auto` picks eBPF here; with eBPF made unavailable it falls back to nftables;
/// switching to another mode removes the previous one's state, and services keep working in
/// each.
#[test]
fn auto_mode_picks_ebpf_falls_back_and_mode_switches_clean_up() {
    if !require_root() {
        return;
    }
    let c = Cluster::new("auto", 2);
    let (b1, client) = (c.pod(1), c.pod(2));
    c.serve(&b1, "b1");
    c.apply(&[web(&[(&b1, "n1")])]);
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let ns = c.rig.node_ns(2);
    let pins = c.rig.pin_dir(2).join("lb");
    let has_table = || {
        twill_tests::run(&ns, &["nft", "list", "tables"])
            .unwrap()
            .contains("inet twill")
    };
    let has_chains = || {
        twill_tests::run(&ns, &["iptables-save", "-t", "nat"])
            .unwrap()
            .contains(":TWILL-SERVICES")
    };
    let has_pins = || fs::read_dir(&pins).is_ok_and(|mut d| d.next().is_some());
    // Cleanup of the other modes happens before the proxy logs "service dataplane ready".
    let ready = || {
        c.rig
            .twilld_log(2)
            .lines()
            .filter(|l| {
                l.contains("twill_agent::services::proxy") && l.contains("service dataplane ready")
            })
            .count()
    };
    let restart = |mode: &str, env: &[(&str, &str)]| {
        let before = ready();
        c.rig.kill_twilld(2, Signal::SIGTERM).unwrap();
        let flags = proxy_flags(mode, 2, c.cgroup(2));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        c.rig.start_twilld_env(2, &flags, env).unwrap();
        wait_until(UP, || ready() > before)
            .unwrap_or_else(|e| panic!("{mode}: {e:#}\n{}", c.rig.twilld_log(2)));
        wait_until(UP, || twill_tests::tcp_line(&client.ns, vip).is_some())
            .unwrap_or_else(|e| panic!("{mode}: {e:#}\n{}", c.rig.twilld_log(2)));
    };
    wait_until(UP, || {
        ready() > 0 && twill_tests::tcp_line(&client.ns, vip).is_some()
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.rig.twilld_log(2)));
    let log = c.rig.twilld_log(2);
    assert!(
        log.lines()
            .any(|l| l.contains("service proxy mode") && l.contains("ebpf")),
        "auto did not pick eBPF:\n{log}"
    );
    assert!(has_pins() && !has_table() && !has_chains());

    restart("auto", &[("TWILL_TEST_DISABLE_EBPF", "1")]);
    let log = c.rig.twilld_log(2);
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("service proxy mode"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        line.contains("nftables") && line.contains("disabled by TWILL_TEST_DISABLE_EBPF"),
        "no fallback to nftables: {line}"
    );
    assert!(
        has_table() && !has_pins(),
        "eBPF pins left after the switch"
    );

    restart("iptables", &[]);
    assert!(
        has_chains() && !has_table(),
        "nftables table left after the switch"
    );
    restart("ebpf", &[]);
    assert!(
        has_pins() && !has_chains(),
        "iptables chains left after the switch:\n{}",
        twill_tests::run(&ns, &["iptables-save", "-t", "nat"]).unwrap()
    );
}

/// One module per proxy mode, each running the shared scenarios (and the mode's extras): a
/// test per scenario, and one per pod shape running [`pods_shaped_as`].
macro_rules! modes {
    ($($mode:ident: [$($extra:ident),*]);* $(;)?) => {$(
        mod $mode {
            fn run(scenario: fn(&'static str)) {
                if twill_tests::require_root() {
                    scenario(stringify!($mode));
                }
            }

            mode_tests! {
                scenarios: [
                    clusterip_and_nodeport_reach_all_and_never_a_removed_backend,
                    udp_flow_moves_off_a_removed_endpoint_within_a_second,
                    external_local_keeps_source_and_affinity_sticks,
                    restart_under_fresh_connections_loses_none
                    $(, $extra)*
                ],
                shapes: [
                    pods_of_twill_cni_bridge_mode: TwillBridge,
                    pods_of_twill_cni_routed_mode: TwillRouted,
                    pods_of_the_reference_bridge_plugin_on_another_bridge: RefBridge,
                    pods_of_the_reference_ptp_plugin: Ptp,
                    pods_on_calico_style_routed_veths: RoutedVeth
                ],
            }
        }
    )*};
}

/// The tests of one mode's module (see [`modes`]), each calling the module's `run`.
macro_rules! mode_tests {
    (scenarios: [$($scenario:ident),*], shapes: [$($test:ident: $shape:ident),*] $(,)?) => {
        $(
            #[test]
            fn $scenario() {
                run(super::$scenario);
            }
        )*
        $(
            #[test]
            fn $test() {
                run(|mode| super::pods_shaped_as(mode, twill_tests::PodShape::$shape));
            }
        )*
    };
}

modes! {
    ebpf: [];
    nftables: [other_owners_rules_are_left_alone];
    iptables: [other_owners_rules_are_left_alone];
}
