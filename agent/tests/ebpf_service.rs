//! Privileged tests of `twill_agent::services::dataplane::ebpf::EbpfLb`, the eBPF service dataplane: load and verify
//! every program, then drive real traffic through socket-LB and the tc path.
//!
//! Why it is shaped as it is:
//! - Three throw-away network namespaces per test (the node, the backends, a host outside the
//!   cluster) joined by veths, a cgroup under the cgroup2 mount and a pin directory under
//!   `/sys/fs/bpf/twill`, all made by twill-tests' namespace guard (`common::Env`): unique
//!   names, removed on drop, pass or fail; traffic never leaves namespaces the test created.
//! - Socket-LB only affects processes in the cgroup, so clients run as a child process (this test
//!   binary re-executed in "helper" mode through the `helper` test) that joins the cgroup and
//!   the node namespace between fork and exec. Its results come back as `R ...` lines.
//! - The dataplane is driven from threads that `setns` into the node namespace, as `twilld`
//!   runs inside it (interfaces, addresses and the netns cookie are resolved there).
//! - Backends are twill-tests' name servers in the backend namespace, answering with their name
//!   and the peer address they saw, so the tests can tell which backend served a flow and
//!   whether it was source-NATed.
//! - Needs root. Without root it skips loudly, except under `CI=true`, where it fails.

use std::{
    collections::BTreeSet,
    fs::{self, File, OpenOptions},
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use common::{
    BE1, BE1_V6, BE2, Env, NODE_PORT, NODE_TO_BE, NODE_TO_OUT, OUTSIDE, VIP, VIP_V6, backend,
    error_chain, ip_batch, service, within,
};
use twill_agent::{
    services::dataplane::ebpf::{EbpfLb, EbpfLbConfig, EbpfLbView, LbLimits, TcIface},
    services::dataplane::sockopt,
    services::lb::{
        FrontendKind::{ClusterIp, NodePort},
        LbDataplane as _, LbService,
        Proto::{Tcp, Udp},
        plan,
    },
};
use twill_tests::{NetnsGuard, in_netns, require_root};

mod common;

const HELPER_ENV: &str = "TWILL_LB_HELPER";

/// A second ClusterIP.
const VIP2: &str = "10.96.0.11";

// ---------------------------------------------------------------------------------------------
// Helper mode: the client side, run in a child process inside the cgroup and a namespace.

/// Not a test: the client half of the tests when `TWILL_LB_HELPER` is set (see module notes).
#[test]
fn helper() {
    let Ok(spec) = std::env::var(HELPER_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split_whitespace().collect();
    let addr: SocketAddr = parts[1].parse().expect("helper address");
    let n: usize = parts[2].parse().expect("helper count");
    let timeout = Duration::from_secs(2);
    let unspecified: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let mut out = std::io::stdout().lock();
    // libtest printed `test helper ... ` without a newline: start result lines on a fresh line.
    writeln!(out).unwrap();
    for i in 0..n {
        let line = match parts[0] {
            "tcp" => match TcpStream::connect_timeout(&addr, timeout) {
                Ok(stream) => {
                    stream.set_read_timeout(Some(timeout)).unwrap();
                    let peer = stream.peer_addr().map(|a| a.to_string());
                    let mut reply = String::new();
                    let _ = BufReader::new(&stream).read_line(&mut reply);
                    format!("peer={} reply={}", peer.unwrap_or_default(), reply.trim())
                }
                Err(err) => format!("error={}", err.kind()),
            },
            "udp" | "udpc" | "udpstream" => {
                // `udpstream` keeps one connected socket; the others use a new socket per message.
                thread_local!(static SOCK: std::cell::RefCell<Option<UdpSocket>> =
                    const { std::cell::RefCell::new(None) });
                let sock = SOCK.with(|s| {
                    let mut s = s.borrow_mut();
                    if parts[0] != "udpstream" || s.is_none() {
                        let sock = UdpSocket::bind(unspecified).unwrap();
                        sock.set_read_timeout(Some(Duration::from_millis(400)))
                            .unwrap();
                        if parts[0] != "udp" {
                            sock.connect(addr).unwrap();
                        }
                        *s = Some(sock);
                    }
                    s.as_ref().unwrap().try_clone().unwrap()
                });
                let sent = if parts[0] == "udp" {
                    sock.send_to(b"hello", addr)
                } else {
                    sock.send(b"hello")
                };
                let mut buf = [0u8; 256];
                match sent.and_then(|_| sock.recv_from(&mut buf)) {
                    Ok((len, from)) => {
                        let peer = sock.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                        format!(
                            "from={from} peer={peer} reply={}",
                            String::from_utf8_lossy(&buf[..len])
                        )
                    }
                    Err(err) => {
                        // As a resolver does: a socket that failed (aborted by the dataplane,
                        // say) is replaced by a new one for the next message.
                        if err.kind() != std::io::ErrorKind::WouldBlock
                            && err.kind() != std::io::ErrorKind::TimedOut
                        {
                            SOCK.with(|s| s.borrow_mut().take());
                        }
                        format!("error={}", err.kind())
                    }
                }
            }
            other => panic!("unknown helper mode {other}"),
        };
        writeln!(out, "R {i} {line}").unwrap();
        out.flush().unwrap();
        if parts[0] == "udpstream" {
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// One result line of the helper.
#[derive(Debug, Clone)]
struct Reply {
    /// What the client saw as its peer (`getpeername`, or `recvfrom`'s source for UDP).
    peer: String,
    /// The source of UDP replies (`recvfrom`).
    from: String,
    /// The backend's name (first word of its answer), empty on error.
    backend: String,
    /// The client address as the backend saw it.
    seen_as: String,
    /// The error kind, if the exchange failed.
    error: Option<String>,
}

fn parse_reply(line: &str) -> Option<Reply> {
    let rest = line.strip_prefix("R ")?;
    let field = |name: &str| {
        rest.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .unwrap_or_default()
            .to_owned()
    };
    let reply = rest.split_once("reply=").map_or("", |(_, r)| r.trim());
    let mut words = reply.split_whitespace();
    Some(Reply {
        peer: field("peer"),
        from: field("from"),
        backend: words.next().unwrap_or_default().to_owned(),
        seen_as: words
            .next()
            .and_then(|w| w.strip_prefix("peer="))
            .unwrap_or_default()
            .to_owned(),
        error: rest
            .split_whitespace()
            .find_map(|w| w.strip_prefix("error="))
            .map(str::to_owned),
    })
}

/// Runs the helper in `ns` (and in `cgroup` if given) and returns its replies.
fn client(ns: &str, cgroup: Option<&Path>, spec: &str) -> Vec<Reply> {
    let output = client_command(ns, cgroup, spec)
        .output()
        .unwrap_or_else(|err| panic!("spawn helper: {err}"));
    assert!(
        output.status.success(),
        "helper {spec} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(parse_reply)
        .collect()
}

fn client_command(ns: &str, cgroup: Option<&Path>, spec: &str) -> Command {
    let exe = std::env::current_exe().expect("current exe");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", "helper", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, spec)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let netns = File::open(format!("/run/netns/{ns}")).expect("open netns");
    let procs = cgroup.map(|cg| {
        OpenOptions::new()
            .write(true)
            .open(cg.join("cgroup.procs"))
            .expect("open cgroup.procs")
    });
    // SAFETY: between fork and exec the closure only makes two raw syscalls on file descriptors
    // opened beforehand (moved into the closure, so they outlive it); no allocation, no locks.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs
                && libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

// ---------------------------------------------------------------------------------------------
// The dataplane's configuration in a test's namespaces, and the services.

/// The dataplane on the test node: the node's cgroup and pin directory, both veths external.
fn config(env: &Env) -> EbpfLbConfig {
    EbpfLbConfig {
        pin_dir: env.pin_dir.clone(),
        cgroup: Some(env.cgroup.clone()),
        ifaces: vec![TcIface::external("nb"), TcIface::external("nc")],
        limits: LbLimits {
            max_ct: 4096,
            max_affinity: 1024,
            max_sock: 4096,
            ..LbLimits::default()
        },
    }
}

fn services(with_be2: bool) -> Vec<LbService> {
    let tcp = |port| {
        let mut v = vec![backend(BE1, port)];
        if with_be2 {
            v.push(backend(BE2, port));
        }
        v
    };
    vec![
        service(1, ClusterIp, VIP, 80, Tcp, tcp(8080)),
        service(2, ClusterIp, VIP, 53, Udp, tcp(5353)),
        service(3, ClusterIp, VIP_V6, 80, Tcp, vec![backend(BE1_V6, 8080)]),
        service(4, NodePort, "0.0.0.0", NODE_PORT, Tcp, tcp(8080)),
        service(5, ClusterIp, "10.96.0.99", 80, Tcp, vec![]),
        service(
            6,
            NodePort,
            "::",
            NODE_PORT,
            Tcp,
            vec![backend(BE1_V6, 8080)],
        ),
    ]
}

/// The test's namespaces (see [`Env`]), or `None` when the test cannot run (not root).
fn root_env() -> Option<Env> {
    require_root().then(Env::new)
}

/// The dataplane opened with `config` in the node namespace, as `twilld` opens it, with
/// `desired` applied.
fn running(env: &Env, config: &EbpfLbConfig, desired: &[LbService]) -> EbpfLb {
    let first = plan(desired, &[]);
    env.on_node(|| {
        let mut lb =
            EbpfLb::open_with(config).unwrap_or_else(|err| panic!("open: {}", error_chain(err)));
        lb.apply(&first).expect("apply");
        lb
    })
}

fn backends_of(replies: &[Reply]) -> BTreeSet<String> {
    replies.iter().map(|r| r.backend.clone()).collect()
}

/// [`client`] at `at`, asserting that all the exchanges `spec` (`<mode> <address> <count>`) asks for
/// succeeded (`what` names the case in a failure).
fn client_ok(what: &str, at: At<'_>, spec: &str) -> Vec<Reply> {
    let n: usize = spec
        .rsplit(' ')
        .next()
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no count in {spec:?}"));
    let replies = client(at.ns, at.cg, spec);
    assert_eq!(replies.len(), n, "{what}: {replies:?}");
    let failed: Vec<&Reply> = replies.iter().filter(|r| r.error.is_some()).collect();
    assert!(failed.is_empty(), "{what}: failures {failed:?}");
    replies
}

/// Where the helper runs: a namespace, in the load-balanced cgroup or not.
#[derive(Clone, Copy)]
struct At<'a> {
    ns: &'a str,
    cg: Option<&'a Path>,
}

impl<'a> At<'a> {
    /// Namespace `ns`, outside the cgroup.
    fn ns(ns: &'a str) -> Self {
        At { ns, cg: None }
    }
}

/// [`client_ok`], asserting too that every reply shows the address `spec` names (what
/// `getpeername` says; for unconnected `udp`, the source `recvfrom` saw): the translation stays
/// hidden from the client.
fn probe(what: &str, at: At<'_>, spec: &str) -> Vec<Reply> {
    let replies = client_ok(what, at, spec);
    let mut words = spec.split(' ');
    let (mode, addr) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
    );
    assert_every(what, &replies, |r| {
        if mode == "udp" {
            r.from == addr
        } else {
            r.peer == addr
        }
    });
    replies
}

/// Asserts that the backends `names`, and only they, served `replies`.
fn assert_served(what: &str, replies: &[Reply], names: &[&str]) {
    let want: BTreeSet<String> = names.iter().map(|&n| n.to_owned()).collect();
    assert_eq!(backends_of(replies), want, "{what}: {replies:?}");
}

/// Asserts that `holds` is true of every reply (`what` names the check in a failure).
fn assert_every(what: &str, replies: &[Reply], holds: impl Fn(&Reply) -> bool) {
    assert!(replies.iter().all(holds), "{what}: {replies:?}");
}

// ---------------------------------------------------------------------------------------------
// Tests.

/// Socket-LB (TCP, UDP, IPv6, getpeername/recvmsg), the tc path (NodePort and ClusterIP from
/// outside, with SNAT), endpoint removal, restart with pinned state, counters, uninstall.
#[test]
fn socket_and_tc_load_balancing() {
    let Some(env) = root_env() else { return };
    env.serve("be1", BE1, 8080, 5353);
    env.serve("be2", BE2, 8080, 5353);
    env.serve("be1v6", BE1_V6, 8080, 5353);

    let config = config(&env);
    let desired = services(true);
    let mut lb = running(&env, &config, &desired);
    let cg = Some(env.cgroup.as_path());
    let node = At { ns: &env.node, cg };
    let outside = At::ns(&env.outside);

    // TCP through socket-LB: every connect works, the peer is the VIP, both backends serve.
    let replies = probe("tcp via socket-LB", node, &format!("tcp {VIP}:80 20"));
    assert_served("tcp via socket-LB", &replies, &["be1", "be2"]);
    // Socket-LB does not NAT: the backend sees the node's own address.
    assert_every("socket-LB does not NAT", &replies, |r| {
        r.seen_as.starts_with(NODE_TO_BE)
    });
    // More through socket-LB from the node, each showing the service's address to the client;
    // `serve` (where named) are the backends that answer.
    for (what, spec, serve) in [
        // Unconnected UDP: recvfrom shows the VIP; sockets spread over both backends.
        (
            "udp via socket-LB",
            format!("udp {VIP}:53 20"),
            &["be1", "be2"][..],
        ),
        // Connected UDP from the node's own namespace: socket-LB at connect().
        (
            "connected udp via socket-LB",
            format!("udpc {VIP}:53 5"),
            &[],
        ),
        // IPv6.
        (
            "tcp6 via socket-LB",
            format!("tcp [{VIP_V6}]:80 5"),
            &["be1v6"],
        ),
        // A dual-stack socket connecting to a v4-mapped VIP is balanced as IPv4.
        (
            "v4-mapped via socket-LB",
            format!("tcp [::ffff:{VIP}]:80 3"),
            &[],
        ),
        // NodePort on the node's own address, from the node.
        (
            "nodeport via socket-LB",
            format!("tcp {NODE_TO_OUT}:{NODE_PORT} 5"),
            &[],
        ),
    ] {
        let replies = probe(what, node, &spec);
        if !serve.is_empty() {
            assert_served(what, &replies, serve);
        }
    }

    // A service without endpoints refuses connections.
    let replies = client(&env.node, cg, "tcp 10.96.0.99:80 1");
    assert!(replies[0].error.is_some(), "no endpoints: {replies:?}");

    // Outside the cgroup nothing is translated by socket-LB: the same connect from the
    // outside namespace goes through the tc path. NodePort from outside: SNAT to the node.
    let nodeport = format!("tcp {NODE_TO_OUT}:{NODE_PORT} 10");
    let replies = probe("nodeport via tc", outside, &nodeport);
    for r in &replies {
        let seen: SocketAddr = r.seen_as.parse().unwrap();
        assert_eq!(seen.ip().to_string(), NODE_TO_BE, "SNAT to the node: {r:?}");
        assert!(seen.port() >= 61_000, "SNAT port range: {r:?}");
    }
    assert_served("nodeport via tc", &replies, &["be1", "be2"]);

    // ClusterIP from outside (routed to the node), TCP and UDP.
    ip_batch(&env.outside, "route add 10.96.0.0/16 via 10.252.0.1\n");
    probe("clusterip via tc", outside, &format!("tcp {VIP}:80 10"));
    probe("udp clusterip via tc", outside, &format!("udp {VIP}:53 10"));

    // IPv6 through the tc path: NodePort and ClusterIP from outside, SNAT to the node.
    let replies = probe(
        "nodeport6 via tc",
        outside,
        &format!("tcp [fd52::1]:{NODE_PORT} 5"),
    );
    assert_every("SNAT6 to the node", &replies, |r| {
        r.seen_as.starts_with("[fd51::1]:")
    });
    ip_batch(&env.outside, "route add fd96::/64 via fd52::1\n");
    let replies = probe(
        "clusterip6 via tc",
        outside,
        &format!("tcp [{VIP_V6}]:80 5"),
    );
    assert_served("clusterip6 via tc", &replies, &["be1v6"]);

    // Counters saw the connections.
    let counters = lb.counters().expect("counters");
    assert!(counters[&1].conns >= 20 + 10, "{counters:?}");
    assert!(counters[&2].packets >= 20, "{counters:?}");
    for usage in lb.occupancy().expect("occupancy") {
        eprintln!("map usage: {usage:?}");
    }
    // The read-only view over the pins (what `twilld get services` and /metrics read) sees the
    // same services and counters as the dataplane that wrote them.
    let view = EbpfLbView::open(&env.pin_dir).expect("open the pinned maps");
    let dumped: Vec<LbService> = view
        .dump()
        .expect("dump")
        .into_iter()
        .map(|s| s.service)
        .collect();
    assert!(plan(&desired, &dumped).is_empty(), "{dumped:#?}");
    let text = view.render_metrics();
    let series = text
        .lines()
        .find(|l| {
            l.starts_with("twill_service_connections_total{")
                && l.contains(&format!("frontend=\"{VIP}:80/TCP\""))
        })
        .unwrap_or_else(|| panic!("no connection counter for {VIP}:80: {text}"));
    assert!(
        series.ends_with(&format!(" {}", counters[&1].conns)),
        "{series} vs {counters:?}"
    );
    assert!(
        text.contains("twill_bpf_map_entries{map=\"TWL_LB_SVC\"}"),
        "{text}"
    );
    assert!(text.contains("twill_services_ebpf_read_errors 0"), "{text}");

    // Remove be2: no new flow reaches it, socket-LB or tc, TCP or UDP.
    let without = services(false);
    let change = plan(&without, &desired);
    assert!(!change.stale_backends.is_empty());
    let start = Instant::now();
    let mut lb = env.on_node(move || {
        lb.apply(&change).expect("apply removal");
        lb
    });
    eprintln!("endpoint removal applied in {:?}", start.elapsed());
    for (at, spec) in [
        (node, format!("tcp {VIP}:80 20")),
        (node, format!("udp {VIP}:53 20")),
        (outside, format!("tcp {NODE_TO_OUT}:{NODE_PORT} 10")),
        (outside, format!("udp {VIP}:53 10")),
    ] {
        let replies = client(at.ns, at.cg, &spec);
        assert_every(&spec, &replies, |r| r.error.is_none());
        assert_served(&format!("{spec} after removing be2"), &replies, &["be1"]);
    }

    // Read-back equals what was applied: a restarted agent plans nothing. (Like every call that
    // may refresh the node addresses, `observed` runs in the node namespace.)
    let (mut lb, observed) = env.on_node(move || {
        let observed = lb.observed().expect("observed");
        (lb, observed)
    });
    assert!(plan(&without, &observed).is_empty(), "{observed:#?}");
    let stats = lb.gc().expect("gc");
    eprintln!("gc after removal: {stats:?}");

    // Restart: drop without uninstall; the pinned links keep serving.
    drop(lb);
    client_ok("tcp while no agent runs", node, &format!("tcp {VIP}:80 5"));
    let nodeport = format!("tcp {NODE_TO_OUT}:{NODE_PORT} 5");
    client_ok("nodeport while no agent runs", outside, &nodeport);
    let (lb, observed) = env.on_node(|| {
        let mut lb =
            EbpfLb::open_with(&config).unwrap_or_else(|err| panic!("reopen: {}", error_chain(err)));
        let observed = lb.observed().expect("observed after restart");
        (lb, observed)
    });
    assert!(
        plan(&without, &observed).is_empty(),
        "restart must re-read the programmed services"
    );
    let links = fs::read_dir(env.pin_dir.join("links")).unwrap().count();
    assert_eq!(links, 8 + 2 * 2, "old links replaced, not added");
    client_ok("tcp after restart", node, &format!("tcp {VIP}:80 5"));

    lb.uninstall().expect("uninstall");
    assert!(!env.pin_dir.exists(), "uninstall removes the pin directory");
}

/// A UDP flow through the tc path (connected socket outside the cgroup) moves off a removed
/// endpoint: after removal plus 1 s, the removed backend gets nothing.
#[test]
fn udp_flow_leaves_removed_endpoint() {
    if require_root() {
        udp_stream_leaves_removed_endpoint(false);
    }
}

/// The node's own connected UDP socket, which socket-LB connected to a backend at `connect()`:
/// when that backend is removed the socket is aborted (sock_diag), the client opens a new one
/// and lands on a live backend; after removal plus 1 s the removed backend gets nothing.
#[test]
fn node_connected_udp_leaves_removed_endpoint() {
    if require_root() {
        udp_stream_leaves_removed_endpoint(true);
    }
}

/// 60 datagrams 100 ms apart on one connected socket, from the node inside the LB cgroup
/// (`via_socket_lb`) or from the outside host through the tc path; the backend serving it is
/// removed mid-stream.
fn udp_stream_leaves_removed_endpoint(via_socket_lb: bool) {
    let env = Env::new();
    env.serve("be1", BE1, 8080, 5353);
    env.serve("be2", BE2, 8080, 5353);
    let desired = services(true);
    let lb = running(&env, &config(&env), &desired);
    ip_batch(&env.outside, "route add 10.96.0.0/16 via 10.252.0.1\n");

    // 60 datagrams 100 ms apart on one connected socket (one flow, one backend).
    let (ns, cg) = if via_socket_lb {
        (&env.node, Some(env.cgroup.as_path()))
    } else {
        (&env.outside, None)
    };
    let mut child = client_command(ns, cg, &format!("udpstream {VIP}:53 60"))
        .spawn()
        .expect("spawn stream");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Reply)>();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(reply) = parse_reply(&line) {
                let _ = tx.send((Instant::now(), reply));
            }
        }
    });
    // Wait for the flow to settle on a backend, then remove that backend.
    let mut first_backend = String::new();
    for _ in 0..10 {
        let (_, reply) = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("stream reply");
        assert!(reply.error.is_none(), "{reply:?}");
        first_backend = reply.backend;
    }
    let keep = if first_backend == "be1" { BE2 } else { BE1 };
    let mut remaining = services(true);
    for svc in &mut remaining {
        svc.backends
            .retain(|b| b.ip.to_string() == keep || b.ip.is_ipv6());
    }
    let change = plan(&remaining, &desired);
    let removed_at = Instant::now();
    let lb = env.on_node(move || {
        let mut lb = lb;
        lb.apply(&change).expect("apply removal");
        lb
    });
    let mut after = Vec::new();
    while let Ok((at, reply)) = rx.recv_timeout(Duration::from_secs(5)) {
        after.push((at.duration_since(removed_at), reply));
    }
    let _ = child.wait();
    reader.join().unwrap();
    let late: Vec<_> = after
        .iter()
        .filter(|(t, _)| *t > Duration::from_secs(1))
        .collect();
    assert!(late.len() > 20, "stream ended early: {after:?}");
    for (t, reply) in &late {
        assert!(reply.error.is_none(), "flow broken at {t:?}: {reply:?}");
        assert_ne!(
            reply.backend, first_backend,
            "removed endpoint still served at {t:?}"
        );
        if via_socket_lb {
            assert_eq!(reply.from, format!("{VIP}:53"), "replies come from the VIP");
        }
    }
    lb.uninstall().expect("uninstall");
}

/// The pod-bridge path (`IfaceRole::Pods`): pods behind a bridge reach a local backend pod
/// through hairpin SNAT, a remote backend without SNAT (the reply comes back through the uplink
/// hook), and pods' connected UDP sockets take the tc path even inside the cgroup.
#[test]
fn pods_behind_a_bridge() {
    let Some(env) = root_env() else { return };
    let [p1, p2] = &env.pods(["p1", "p2"]);

    let mut local = backend("10.253.0.3", 8080);
    local.node_local = true;
    let mut local_udp = backend("10.253.0.3", 5353);
    local_udp.node_local = true;
    let desired = vec![
        service(1, ClusterIp, VIP, 80, Tcp, vec![local]),
        service(2, ClusterIp, VIP, 53, Udp, vec![local_udp]),
        service(3, ClusterIp, VIP2, 80, Tcp, vec![backend(BE1, 8080)]),
    ];
    // The bridge does not exist yet when the dataplane starts (as `cni0` before the first pod).
    let mut config = config(&env);
    config.ifaces.push(TcIface::pods("br0"));
    let mut lb = running(&env, &config, &desired);
    assert_eq!(lb.pending_interfaces(), [TcIface::pods("br0")]);
    ip_batch(
        &env.node,
        &format!(
            "link add br0 type bridge\naddr add 10.253.0.1/24 dev br0\nlink set br0 up\n\
             link add vp1 type veth peer name eth0 netns {p1}\nlink set vp1 master br0 up\n\
             link add vp2 type veth peer name eth0 netns {p2}\nlink set vp2 master br0 up\n"
        ),
    );
    for (ns, ip) in [(p1, "10.253.0.2"), (p2, "10.253.0.3")] {
        ip_batch(
            ns,
            &format!(
                "link set eth0 up\naddr add {ip}/24 dev eth0\n\
                 route add default via 10.253.0.1\n"
            ),
        );
    }
    // The backend namespace routes pod addresses back through the node.
    ip_batch(&env.backends, "route add 10.253.0.0/24 via 10.251.0.1\n");
    env.serve_in(p2, "pod2", "10.253.0.3", 8080, 5353);
    env.serve("be1", BE1, 8080, 5353);
    let lb = env.on_node(move || {
        assert_eq!(lb.attach_pending().expect("attach pending"), ["br0"]);
        assert!(lb.pending_interfaces().is_empty());
        lb
    });
    let cg = Some(env.cgroup.as_path());
    let (tc, socket_lb) = (At::ns(p1), At { ns: p1, cg });
    let (tcp, udpc, udp) = (
        format!("tcp {VIP}:80 5"),
        format!("udpc {VIP}:53 5"),
        format!("udp {VIP}:53 5"),
    );
    let remote = format!("tcp {VIP2}:80 5");
    // Pod 1, each exchange showing the service's address to the client, and how the backend
    // sees it: as the bridge address after hairpin SNAT, or as the pod itself.
    let (snat, pod) = ("10.253.0.1:", "10.253.0.2:");
    for (what, at, spec, seen_as) in [
        // Outside the cgroup → local backend pod: hairpin SNAT to the bridge address.
        ("pod to local pod via tc", tc, &tcp, snat),
        // Outside the cgroup → backend on another node: no SNAT, the reply is translated at
        // the uplink's ingress and forwarded to the bridge.
        ("pod to remote backend via tc", tc, &remote, pod),
        // In the cgroup: TCP by socket-LB (the backend sees the pod itself) ...
        ("pod via socket-LB", socket_lb, &tcp, pod),
        // ... connected UDP by the tc path (hairpin SNAT shows it), unconnected UDP by
        // socket-LB.
        ("pod connected udp via tc", socket_lb, &udpc, snat),
        ("pod unconnected udp", socket_lb, &udp, pod),
    ] {
        let replies = probe(what, at, spec);
        assert_every(&format!("{what}: seen as {seen_as}"), &replies, |r| {
            r.seen_as.starts_with(seen_as)
        });
    }

    lb.uninstall().expect("uninstall");
}

/// Routed pods, as twill-cni's routed mode, `ptp` and Calico plug them in (a veth per pod, no
/// bridge, a /32 route each): discovery finds their veths on the kernel's own link messages (and
/// not the outside-facing veths), and with the pod-side programs on each veth a pod reaches a
/// backend pod behind another veth keeping its address, itself through hairpin SNAT, and a
/// remote backend; a NodePort reaches a local pod even when its endpoint is not marked local
/// (SNAT, the reply caught at the pod's veth). A veth that goes loses its programs and pins.
#[test]
fn routed_pod_veths() {
    use twill_agent::services::dataplane::ebpf::podif::{LinkWatch, PodIfacePolicy, pod_facing};

    let Some(env) = root_env() else { return };
    let [p1, p2] = &env.pods(["r1", "r2"]);
    ip_batch(
        &env.node,
        &format!(
            "link add rp1 address ee:ee:ee:ee:ee:01 type veth peer name eth0 netns {p1}\n\
             link add rp2 address ee:ee:ee:ee:ee:02 type veth peer name eth0 netns {p2}\n\
             link set rp1 up\nlink set rp2 up\n\
             route add 10.253.1.2/32 dev rp1\nroute add 10.253.1.3/32 dev rp2\n"
        ),
    );
    for (ns, ip, mac) in [
        (p1, "10.253.1.2", "ee:ee:ee:ee:ee:01"),
        (p2, "10.253.1.3", "ee:ee:ee:ee:ee:02"),
    ] {
        ip_batch(
            ns,
            &format!(
                "link set eth0 up\naddr add {ip}/32 dev eth0\n\
                 route add 169.254.1.1 dev eth0 scope link\n\
                 neigh add 169.254.1.1 lladdr {mac} dev eth0 nud permanent\n\
                 route add default via 169.254.1.1 dev eth0\n"
            ),
        );
    }
    ip_batch(&env.backends, "route add 10.253.1.0/24 via 10.251.0.1\n");
    env.serve_in(p2, "pod2", "10.253.1.3", 8080, 5353);
    env.serve("be1", BE1, 8080, 5353);

    let external: BTreeSet<String> = ["nb", "nc"].map(String::from).into();
    let find = || {
        env.on_node(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let watch = LinkWatch::subscribe().expect("subscribe");
                let links = watch.links().await.expect("dump links");
                pod_facing(&links, &external, &PodIfacePolicy::default())
            })
        })
    };
    let want = find();
    assert_eq!(
        want.keys().map(String::as_str).collect::<Vec<_>>(),
        ["rp1", "rp2"],
        "the outside-facing veths nb and nc are not pods'"
    );

    let pod2 = || vec![backend("10.253.1.3", 8080)];
    let desired = vec![
        service(1, ClusterIp, VIP, 80, Tcp, pod2()),
        service(2, ClusterIp, VIP2, 80, Tcp, vec![backend(BE1, 8080)]),
        service(3, NodePort, "0.0.0.0", NODE_PORT, Tcp, pod2()),
    ];
    let lb = running(&env, &config(&env), &desired);
    let lb = env.on_node(move || {
        let mut lb = lb;
        let done = lb.sync_pod_interfaces(&want);
        assert!(done.failed.is_empty(), "{:?}", done.failed);
        assert_eq!(done.attached, ["rp1", "rp2"]);
        lb
    });

    let (tcp, remote) = (format!("tcp {VIP}:80 5"), format!("tcp {VIP2}:80 5"));
    let replies = probe("pod to a pod behind another veth", At::ns(p1), &tcp);
    assert_every("no SNAT between two pods' veths", &replies, |r| {
        r.seen_as.starts_with("10.253.1.2:")
    });
    let replies = client_ok("pod to itself", At::ns(p2), &tcp);
    assert_every("hairpin SNAT to a node address", &replies, |r| {
        !r.seen_as.starts_with("10.253.1.3:") && !r.seen_as.is_empty()
    });
    let replies = client_ok("pod to a remote backend", At::ns(p1), &remote);
    assert_every("no SNAT towards another node", &replies, |r| {
        r.seen_as.starts_with("10.253.1.2:")
    });
    let nodeport = format!("tcp {NODE_TO_OUT}:{NODE_PORT} 5");
    let what = "NodePort to a local pod not marked local";
    client_ok(what, At::ns(&env.outside), &nodeport);

    // Pod 1 goes: its veth's programs and pins go with it.
    ip_batch(&env.node, "link del rp1\n");
    let want = find();
    let lb = env.on_node(move || {
        let mut lb = lb;
        let done = lb.sync_pod_interfaces(&want);
        assert!(done.failed.is_empty(), "{:?}", done.failed);
        assert_eq!(done.detached, ["rp1"]);
        assert_eq!(lb.pod_interfaces().collect::<Vec<_>>(), ["rp2"]);
        lb
    });
    let pins: Vec<String> = fs::read_dir(env.pin_dir.join("links"))
        .expect("links dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        pins.iter().all(|p| !p.starts_with("tc_rp1_")) && pins.iter().any(|p| p == "tc_rp2_in"),
        "{pins:?}"
    );
    lb.uninstall().expect("uninstall");
}

/// What [`tcp_from`] saw of one TCP exchange, closed on both sides.
struct Exchange {
    /// The line the server sent.
    line: String,
    /// How long `connect` took.
    connect: Duration,
    /// Segments retransmitted by the time the connection was up (SYNs: it had sent nothing
    /// else).
    syn_retrans: u32,
}

/// One TCP exchange from `src` (address and port, bound first, as a client reusing a port does)
/// to `dst`, inside namespace `ns`: what it saw, or the error.
fn tcp_from(ns: &str, src: SocketAddr, dst: SocketAddr) -> Result<Exchange, String> {
    in_netns(ns, || Ok(tcp_from_here(src, dst))).unwrap_or_else(|e| panic!("{e:#}"))
}

fn tcp_from_here(src: SocketAddr, dst: SocketAddr) -> Result<Exchange, String> {
    let (stream, connect_took) = connect_from(src, dst)?;
    let syn_retrans = total_retrans(&stream)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    let mut reader = BufReader::new(&stream);
    reader
        .read_line(&mut line)
        .map_err(|e| format!("read from {dst}: {e}"))?;
    // A closed flow, as the caller means it: the server has closed (EOF) and our FIN is
    // acknowledged (a lingering close returns then), so the server's socket is in TIME_WAIT.
    // Without this a server thread preempted between its write and its close still holds the
    // connection open when the next SYN from this port arrives.
    let mut rest = Vec::new();
    reader
        .read_to_end(&mut rest)
        .map_err(|e| format!("read to the end from {dst}: {e}"))?;
    nix::sys::socket::setsockopt(
        &stream,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 2,
        },
    )
    .map_err(|e| format!("SO_LINGER: {e}"))?;
    drop(stream);
    Ok(Exchange {
        line: line.trim().to_owned(),
        connect: connect_took,
        syn_retrans,
    })
}

/// A TCP connection to `dst` from `src` (bound first, with SO_REUSEADDR, as a client reusing a
/// port does), and how long `connect` took; `connect` gives up after 2 s (SO_SNDTIMEO).
fn connect_from(src: SocketAddr, dst: SocketAddr) -> Result<(TcpStream, Duration), String> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, setsockopt, socket,
        sockopt,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| format!("SO_REUSEADDR: {e}"))?;
    let timeout = nix::sys::time::TimeVal::new(2, 0);
    setsockopt(&fd, sockopt::SendTimeout, &timeout).map_err(|e| format!("SO_SNDTIMEO: {e}"))?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(src)).map_err(|e| format!("bind {src}: {e}"))?;
    let t0 = Instant::now();
    connect(fd.as_raw_fd(), &SockaddrStorage::from(dst))
        .map_err(|e| format!("connect {src} -> {dst}: {e} after {:?}", t0.elapsed()))?;
    Ok((TcpStream::from(fd), t0.elapsed()))
}

/// Segments the connection on `fd` has retransmitted so far (`tcpi_total_retrans`; right after
/// `connect`, its SYNs).
fn total_retrans(fd: &impl std::os::fd::AsFd) -> Result<u32, String> {
    let mut info = [0u8; std::mem::size_of::<libc::tcp_info>()];
    sockopt::get(fd.as_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, &mut info)
        .map_err(|e| format!("TCP_INFO: {e}"))?;
    let at = std::mem::offset_of!(libc::tcp_info, tcpi_total_retrans);
    Ok(u32::from_ne_bytes(
        info[at..at + 4].try_into().expect("4 bytes"),
    ))
}

/// A client that reached a backend through a VIP (tc path, no SNAT: the backend is local) and
/// then connects to that backend directly from the same port, as a pod does when socket-LB or
/// its own code picks the backend's address and the kernel hands out a port a closed VIP flow
/// used: the closed flow's reply entry must not translate the new connection's replies. It
/// turned the backend's SYN-ACK into one from the VIP, and the connection never came up; and
/// it turned the ACK the backend answers an older SYN with from its TIME_WAIT (the server
/// closes first) into one from the VIP, so the client never reset that tuple and waited a
/// whole SYN retransmission timeout (1 s). A SYN meets that TIME_WAIT about one time in two
/// (timestamps are offset per tuple): ports are tried until three did.
#[test]
fn direct_connection_reusing_a_closed_flows_tuple() {
    let Some(env) = root_env() else { return };
    env.serve("be1", BE1, 8080, 5353);
    let mut local = backend(BE1, 8080);
    local.node_local = true;
    let desired = vec![service(1, ClusterIp, VIP, 80, Tcp, vec![local])];
    let lb = running(&env, &config(&env), &desired);
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let direct: SocketAddr = format!("{BE1}:8080").parse().unwrap();
    let mut met_time_wait = 0;
    let mut slow = Vec::new();
    for port in 40_001..=40_032 {
        let src: SocketAddr = format!("{OUTSIDE}:{port}").parse().unwrap();
        let got = tcp_from(&env.outside, src, vip).expect("through the VIP");
        assert_eq!(
            got.line,
            format!("be1 peer={src}"),
            "no SNAT to a local backend"
        );
        let got = tcp_from(&env.outside, src, direct).unwrap_or_else(|e| {
            panic!("direct connection from a port a closed VIP flow used: {e}")
        });
        assert_eq!(
            got.line,
            format!("be1 peer={src}"),
            "direct connection from a port a closed VIP flow used"
        );
        // The initial retransmission timeout is 1 s: a connection that took 900 ms waited for it.
        if got.connect >= Duration::from_millis(900) {
            slow.push((port, got.connect));
        }
        if got.syn_retrans > 0 {
            met_time_wait += 1;
            if met_time_wait == 3 {
                break;
            }
        }
    }
    assert!(
        met_time_wait > 0,
        "no direct connection met the backend's TIME_WAIT"
    );
    assert!(
        slow.is_empty(),
        "direct connections that waited for a SYN retransmission timeout: {slow:?}"
    );
    lb.uninstall().expect("uninstall");
}

/// Loads 10 000 services × 10 backends, prints the map memory and the sync time.
#[test]
fn ten_thousand_services() {
    if !require_root() {
        return;
    }
    let guard = NetnsGuard::new().expect("namespace guard");
    let pin_dir = guard.pin_dir("10k").expect("pin directory");
    let mut lb = EbpfLb::open_with(&EbpfLbConfig {
        pin_dir: pin_dir.clone(),
        cgroup: None,
        ifaces: Vec::new(),
        limits: LbLimits::default(),
    })
    .unwrap_or_else(|err| panic!("open: {}", error_chain(err)));
    let empty = lb.counters().expect("counters");
    assert!(empty.is_empty());
    let services: Vec<LbService> = (1..=10_000u32)
        .map(|id| {
            let vip = format!("10.{}.{}.{}", 96 + id / 65_536, (id / 256) % 256, id % 256);
            let backends = (0..10)
                .map(|i| {
                    backend(
                        &format!("10.244.{}.{}", id % 200, i + 2 + (id / 200) % 50),
                        8080,
                    )
                })
                .collect();
            service(id, ClusterIp, &vip, 80, Tcp, backends)
        })
        .collect();
    let full = plan(&services, &[]);
    let start = Instant::now();
    lb.apply(&full).expect("apply 10k");
    let sync = start.elapsed();
    let mut total = 0;
    for usage in lb.occupancy().expect("occupancy") {
        total += usage.memlock_bytes.unwrap_or(0);
        eprintln!(
            "{:<14} entries {:>8?} max {:>8} memlock {:>10?}",
            usage.name, usage.entries, usage.max_entries, usage.memlock_bytes
        );
    }
    eprintln!("10k services x 10 backends: full sync {sync:?}, total memlock {total} bytes");
    check_maglev_tables(&pin_dir, &services);

    // One endpoint change touches one service.
    let mut changed = services.clone();
    changed[4_999].backends.pop();
    let one = plan(&changed, &services);
    assert_eq!(one.upserts.len(), 1);
    let start = Instant::now();
    lb.apply(&one).expect("apply one change");
    eprintln!("one endpoint change applied in {:?}", start.elapsed());

    let start = Instant::now();
    let observed = lb.observed().expect("observed");
    eprintln!("read back 10k services in {:?}", start.elapsed());
    assert!(plan(&changed, &observed).is_empty());
    lb.uninstall().expect("uninstall");
}

/// Every Maglev entry the kernel holds for `services` (written while a second thread computed
/// the tables ahead, at this size) names the backend the Maglev permutation puts there.
fn check_maglev_tables(pin_dir: &Path, services: &[LbService]) {
    use aya::maps::{HashMap as BpfHash, Map, MapData};
    use twill_common::service::{
        BackendKey, BackendValue, MAGLEV_M, MAP_BACKEND, MAP_MAGLEV, MaglevTable,
    };
    let open = |name: &str| MapData::from_pin(pin_dir.join(name)).expect("open pinned map");
    let tables: BpfHash<_, u32, MaglevTable> =
        BpfHash::try_from(Map::HashMap(open(MAP_MAGLEV))).expect("maglev map");
    let backends: BpfHash<_, BackendKey, BackendValue> =
        BpfHash::try_from(Map::HashMap(open(MAP_BACKEND))).expect("backend map");
    for svc in services.iter().step_by(997) {
        let table = tables.get(&svc.id, 0).expect("maglev table");
        let want = twill_agent::services::maglev::table(&svc.backends, MAGLEV_M);
        for (slot, index) in table.slots.iter().zip(&want) {
            let key = BackendKey {
                id: svc.id,
                slot: *slot,
                pad: 0,
            };
            let got = backends.get(&key, 0).expect("backend of a table entry");
            let b = &svc.backends[usize::try_from(*index).unwrap()];
            let IpAddr::V4(ip) = b.ip else {
                panic!("v4 services only here")
            };
            assert_eq!(
                (&got.addr[..4], u16::from_be(got.port)),
                (&ip.octets()[..], b.port),
                "service {} slot {slot}",
                svc.id
            );
        }
    }
}

/// Re-opening the dataplane over its pinned state (what a restarted agent does) never clears,
/// not even for a moment, the setting that leaves pods' connected UDP to the tc path: a pod
/// socket connected meanwhile would be balanced at `connect()` by socket-LB and keep that
/// backend for its whole life, out of reach of the tc path that moves flows off removed
/// endpoints. The setting is read, as the programs read it, from the pinned map while the
/// dataplane re-opens again and again.
#[test]
fn reopening_never_clears_the_pods_udp_setting() {
    use aya::maps::{Array, Map, MapData};
    use twill_common::service::{CFG_UDP_CONNECT_VIA_TC, LbConfig, MAP_CONFIG};

    let Some(env) = root_env() else { return };
    ip_batch(
        &env.node,
        "link add br0 type bridge
addr add 10.253.0.1/24 dev br0
link set br0 up
",
    );
    let mut config = config(&env);
    config.ifaces.push(TcIface::pods("br0"));
    env.on_node(|| drop(EbpfLb::open_with(&config).expect("open")));
    let settings = |path: &Path| -> Array<MapData, LbConfig> {
        let map = MapData::from_pin(path).expect("open the pinned settings");
        Array::try_from(Map::Array(map)).expect("an array")
    };
    let pinned = env.pin_dir.join(MAP_CONFIG);
    let now = settings(&pinned).get(&0, 0).expect("read the settings");
    assert_ne!(now.flags & CFG_UDP_CONNECT_VIA_TC, 0, "{now:?}");
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = thread::spawn({
        let (map, stop) = (settings(&pinned), stop.clone());
        move || {
            let (mut reads, mut cleared) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let value = map.get(&0, 0).expect("read the settings");
                reads += 1;
                cleared += u64::from(value.flags & CFG_UDP_CONNECT_VIA_TC == 0);
            }
            (reads, cleared)
        }
    });
    for _ in 0..6 {
        env.on_node(|| drop(EbpfLb::open_with(&config).expect("re-open")));
    }
    stop.store(true, Ordering::Relaxed);
    let (reads, cleared) = watcher.join().expect("watcher");
    assert!(reads > 0);
    assert_eq!(
        cleared, 0,
        "{cleared} of {reads} reads during 6 re-opens found the setting cleared"
    );
    env.on_node(|| EbpfLb::open_with(&config).expect("open"))
        .uninstall()
        .expect("uninstall");
}

/// A flow that must be source-NATed (a NodePort from outside to a backend on another node) gets
/// a port while 85 % of the node's SNAT ports towards that backend are held by live
/// flows: a SYN that finds its first tries taken is not dropped for good, nor its
/// retransmissions (every try is a random port; ports derived from the flow made every
/// retransmission of one SYN probe the same taken ports until the client gave up).
#[test]
fn snat_finds_a_free_port_when_most_are_taken() {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData};
    use twill_common::service::{
        CT_DIR_REPLY, CT_F_SNAT, CtKey, CtValue, FAMILY_V4, MAP_CT, PROTO_TCP, SNAT_PORT_COUNT,
        SNAT_PORT_MIN,
    };

    let Some(env) = root_env() else { return };
    env.serve("be1", BE1, 8080, 5353);
    let mut config = config(&env);
    config.limits.max_ct = 65_536;
    let be1 = vec![backend(BE1, 8080)];
    let desired = [service(4, NodePort, "0.0.0.0", NODE_PORT, Tcp, be1)];
    let lb = running(&env, &config, &desired);
    // Live reply entries of other flows on 85 % of the SNAT ports (spread by a hash, so no
    // stride of tries can step around them), as busy NodePort traffic leaves them.
    let map = MapData::from_pin(env.pin_dir.join(MAP_CT)).expect("open the pinned conntrack");
    let mut ct: BpfHashMap<MapData, CtKey, CtValue> =
        BpfHashMap::try_from(Map::LruHashMap(map)).expect("a hash map");
    let addr = |ip: &str| {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&ip.parse::<std::net::Ipv4Addr>().unwrap().octets());
        a
    };
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is valid for writes.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    let now =
        u64::try_from(ts.tv_sec).unwrap() * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap();
    let mut taken = 0;
    for i in 0..SNAT_PORT_COUNT {
        if (u32::from(i).wrapping_mul(2_654_435_761) >> 16) % 20 < 3 {
            continue;
        }
        let key = CtKey {
            src: addr(BE1),
            dst: addr(NODE_TO_BE),
            sport: 8080u16.to_be(),
            dport: (SNAT_PORT_MIN + i).to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            dir: CT_DIR_REPLY,
            pad: 0,
        };
        let value = CtValue {
            nat_addr: addr(NODE_TO_OUT),
            alt_addr: addr(OUTSIDE),
            nat_port: NODE_PORT.to_be(),
            alt_port: 1,
            flags: CT_F_SNAT,
            svc_id: 4,
            created_ns: now,
            last_seen_ns: now,
            ..CtValue::default()
        };
        ct.insert(key, value, 0).expect("insert a conntrack entry");
        taken += 1;
    }
    assert!(taken * 100 > u32::from(SNAT_PORT_COUNT) * 80, "{taken}");
    let nodeport = format!("tcp {NODE_TO_OUT}:{NODE_PORT} 40");
    let replies = client_ok(
        "NodePort with most SNAT ports taken",
        At::ns(&env.outside),
        &nodeport,
    );
    assert_every("SNAT to the node", &replies, |r| {
        r.seen_as.starts_with(&format!("{NODE_TO_BE}:"))
    });
    lb.uninstall().expect("uninstall");
}

/// A NodePort flow's SNAT port that the backend still holds in TIME_WAIT from an earlier
/// connection (the kernel keeps it 60 s; the port of a closed flow is taken again after 10 s)
/// gets the SYN answered with an ACK when the new SYN's timestamp is older; the client resets
/// the tuple, which ends that TIME_WAIT, and sends its SYN again at once. That SYN must keep the
/// flow's backend and port: given a new random port it met another TIME_WAIT now and then, and
/// the client waited a whole retransmission timeout (1 s). Here every SNAT port towards the
/// backend is in TIME_WAIT: connections are answered after a quick retransmission at worst.
#[test]
fn snat_retry_after_a_time_wait_collision_keeps_its_port() {
    use twill_common::service::{SNAT_PORT_COUNT, SNAT_PORT_MIN};

    let Some(env) = root_env() else { return };
    // A backend that answers and closes first, so TIME_WAIT lands on its side.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let server = thread::spawn({
        let (ns, stop) = (env.backends.clone(), stop.clone());
        move || {
            twill_tests::ns::join_netns(&ns).expect("enter the backends' namespace");
            let tcp =
                std::net::TcpListener::bind((BE1.parse::<IpAddr>().unwrap(), 8080)).expect("bind");
            tcp.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            while !stop.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((mut stream, peer)) => {
                        let _ = writeln!(stream, "be1 peer={peer}");
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_micros(200));
                    }
                    Err(err) => panic!("accept: {err}"),
                }
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("server ready");
    let be1 = vec![backend(BE1, 8080)];
    let desired = [service(5, NodePort, "0.0.0.0", NODE_PORT, Tcp, be1)];
    let lb = running(&env, &config(&env), &desired);
    // Every SNAT tuple (the node's address towards the backend, one of the SNAT ports) left in
    // TIME_WAIT on the backend by a connection of the node's own, read to its end so that the
    // backend closes first.
    let be: SocketAddr = format!("{BE1}:8080").parse().unwrap();
    within(&env.node, || {
        for i in 0..SNAT_PORT_COUNT {
            let src: SocketAddr = format!("{NODE_TO_BE}:{}", SNAT_PORT_MIN + i)
                .parse()
                .unwrap();
            let (mut stream, _) = connect_from(src, be).unwrap_or_else(|e| panic!("{e}"));
            stream
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let mut line = String::new();
            std::io::Read::read_to_string(&mut stream, &mut line)
                .unwrap_or_else(|e| panic!("read from {be} at {src}: {e}"));
            assert!(line.starts_with("be1 "), "from {src}: {line:?}");
        }
    });
    let time_wait = within(&env.backends, || {
        // This thread's namespace (`/proc/net` is the main thread's).
        let table = fs::read_to_string("/proc/thread-self/net/tcp").expect("read tcp sockets");
        // `local rem st`: the backend's 8080 (1F90) in state 06 (TIME_WAIT).
        table
            .lines()
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[1].ends_with(":1F90") && f[3] == "06"
            })
            .count()
    });
    assert!(
        time_wait * 10 >= usize::from(SNAT_PORT_COUNT) * 9,
        "only {time_wait} tuples in TIME_WAIT on the backend"
    );

    let nodeport: SocketAddr = format!("{NODE_TO_OUT}:{NODE_PORT}").parse().unwrap();
    let mut slow = Vec::new();
    let mut quick = 0;
    for i in 0..40 {
        let got = within(&env.outside, || {
            let t0 = Instant::now();
            let mut s = TcpStream::connect_timeout(&nodeport, Duration::from_secs(5))
                .map_err(|e| format!("{e} after {:?}", t0.elapsed()))?;
            let took = t0.elapsed();
            let retrans = total_retrans(&s)?;
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut line = String::new();
            let _ = std::io::Read::read_to_string(&mut s, &mut line);
            Ok::<_, String>((took, retrans, line.trim().to_owned()))
        });
        let (took, retrans, line) = match got {
            Ok(got) => got,
            Err(e) => {
                slow.push((i, e));
                continue;
            }
        };
        assert!(
            line.starts_with(&format!("be1 peer={NODE_TO_BE}:")),
            "connection {i}: {line:?}"
        );
        if took >= Duration::from_millis(900) {
            slow.push((i, format!("connected after {took:?}")));
        } else if retrans > 0 {
            quick += 1;
        }
    }
    // A SYN older than the tuple's TIME_WAIT (timestamps are offset per tuple: about one in
    // two) is answered with an ACK: without any, the test would prove nothing.
    assert!(
        quick + slow.len() > 0,
        "no connection met a TIME_WAIT tuple"
    );
    assert!(
        slow.is_empty(),
        "connections that waited for a SYN retransmission timeout: {slow:?} ({quick} quick \
         retransmissions)"
    );
    lb.uninstall().expect("uninstall");
    stop.store(true, Ordering::Relaxed);
    server.join().expect("backend server");
}
