//! Privileged tests of the netfilter service dataplanes (`NftLb`, `IptLb`) against the real
//! kernel: program services, read them back, restart, drive traffic, leave other owners' rules
//! alone. (The scenarios through `twilld` and etcd are in `tests/tests/services_ebpf.rs`; these
//! exercise the seam directly and faster.)
//!
//! Why it is shaped as it is:
//! - Three throw-away namespaces per test (`twn<pid><tag>n` the node, `...b` the backends,
//!   `...c` a host outside the cluster) joined by veths, removed by a guard on drop, pass or
//!   fail. Traffic never leaves them.
//! - The dataplane is driven from a thread that `setns`es into the node namespace, as `twilld`
//!   runs inside it; netfilter state is per namespace, so nothing outside is touched.
//! - Backends answer `<name> peer=<client>`, so a test sees which backend served a flow and
//!   which source it saw.
//! - Timings at scale are `cargo xtask bench services --mode all`'s, not a test's.
//! - Needs root. Without root it skips loudly, except under `CI=true`, where it fails.

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use common::{add_netns, ip_batch, join_netns, require_root, run};
use twill_agent::services::dataplane::iptables::{IptBackend, IptLb};
use twill_agent::services::dataplane::nft::NftLb;
use twill_agent::services::lb::{
    Backend, BackendState, Frontend, FrontendKind, LbDataplane, LbService, Proto, plan,
};

mod common;

const NODE_TO_BE: &str = "10.253.0.1";
const BE1: &str = "10.253.0.2";
const BE2: &str = "10.253.0.3";
const NODE_TO_OUT: &str = "10.254.0.1";
const OUTSIDE: &str = "10.254.0.2";
const BE1_V6: &str = "fd53::2";
const VIP: &str = "10.96.0.10";
const VIP_NOEP: &str = "10.96.0.11";
const EXT_IP: &str = "192.0.2.10";
const VIP_V6: &str = "fd96::10";
const NODE_PORT: u16 = 30080;
const NODE_PORT_NOEP: u16 = 30081;

/// The namespaces of one test; removed on drop. The node has a default route (towards the
/// backends' namespace, as a real node has one somewhere), so a service address without
/// endpoints reaches the forward hook and is rejected there instead of being unroutable.
struct Env {
    node: String,
    backends: String,
    outside: String,
    stop: Arc<AtomicBool>,
}

impl Env {
    fn new(tag: &str) -> Self {
        let pid = std::process::id();
        let env = Self {
            node: format!("twn{pid}{tag}n"),
            backends: format!("twn{pid}{tag}b"),
            outside: format!("twn{pid}{tag}c"),
            stop: Arc::new(AtomicBool::new(false)),
        };
        for ns in [&env.node, &env.backends, &env.outside] {
            add_netns(ns);
        }
        let (n, b, c) = (&env.node, &env.backends, &env.outside);
        ip_batch(
            n,
            &format!(
                "link add nb type veth peer name bn netns {b}\n\
                 link add nc type veth peer name cn netns {c}\n\
                 link set lo up\nlink set nb up\nlink set nc up\n\
                 addr add {NODE_TO_BE}/24 dev nb\naddr add fd53::1/64 dev nb nodad\n\
                 addr add {NODE_TO_OUT}/24 dev nc\naddr add fd54::1/64 dev nc nodad\n\
                 route add default via {BE1}\n"
            ),
        );
        ip_batch(
            b,
            &format!(
                "link set lo up\nlink set bn up\naddr add {BE1}/24 dev bn\n\
                 addr add {BE2}/24 dev bn\naddr add {BE1_V6}/64 dev bn nodad\n\
                 route add default via {NODE_TO_BE}\nroute add default via fd53::1\n"
            ),
        );
        ip_batch(
            c,
            &format!(
                "link set lo up\nlink set cn up\naddr add {OUTSIDE}/24 dev cn\n\
                 addr add fd54::2/64 dev cn nodad\n\
                 route add default via {NODE_TO_OUT}\nroute add default via fd54::1\n"
            ),
        );
        env.on_node(|| {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("ip_forward");
            std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").expect("forwarding6");
        });
        env
    }

    /// Starts a TCP and a UDP server answering `<name> peer=<client>` in the backend namespace.
    fn serve(&self, name: &'static str, ip: &str, tcp_port: u16, udp_port: u16) {
        let ip: IpAddr = ip.parse().unwrap();
        let stop = self.stop.clone();
        let ns = self.backends.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            join_netns(&ns);
            let tcp = TcpListener::bind((ip, tcp_port)).expect("bind tcp");
            tcp.set_nonblocking(true).unwrap();
            let udp = UdpSocket::bind((ip, udp_port)).expect("bind udp");
            udp.set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 256];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((mut stream, peer)) = tcp.accept() {
                    let _ = writeln!(stream, "{name} peer={peer}");
                }
                if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(format!("{name} peer={peer}").as_bytes(), peer);
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("server ready");
    }

    /// Runs `f` on a thread inside the node namespace.
    fn on_node<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = self.node.clone();
        thread::scope(|s| {
            s.spawn(move || {
                join_netns(&ns);
                f()
            })
            .join()
            .expect("node thread panicked")
        })
    }

    /// One TCP exchange from the outside namespace: the server's line, or the error kind.
    fn tcp(&self, addr: SocketAddr) -> Result<String, std::io::ErrorKind> {
        let ns = self.outside.clone();
        thread::spawn(move || {
            join_netns(&ns);
            let s =
                TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.kind())?;
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut line = String::new();
            BufReader::new(s)
                .read_line(&mut line)
                .map_err(|e| e.kind())?;
            Ok(line.trim().to_owned())
        })
        .join()
        .unwrap()
    }

    fn nft(&self, args: &str) -> String {
        let mut a = vec!["netns", "exec", self.node.as_str(), "nft"];
        a.extend(args.split_whitespace());
        String::from_utf8_lossy(&run("ip", &a).stdout).into_owned()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for ns in [&self.node, &self.backends, &self.outside] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn be(ip: &str, port: u16) -> Backend {
    Backend {
        ip: ip.parse().unwrap(),
        port,
        node_local: false,
        state: BackendState::Ready,
    }
}

fn svc(
    id: u32,
    ip: &str,
    port: u16,
    proto: Proto,
    kind: FrontendKind,
    backends: Vec<Backend>,
) -> LbService {
    LbService {
        id,
        name: format!("test/s{id}:p"),
        frontend: Frontend {
            ip: ip.parse().unwrap(),
            port,
            proto,
            kind,
        },
        backends,
        affinity_timeout_secs: None,
        external_local: false,
        internal_local: false,
    }
}

/// The services of the functional tests: ClusterIP (TCP and UDP, v4 and v6), a NodePort, an
/// external IP with affinity, and two frontends without endpoints.
fn services() -> Vec<LbService> {
    let two = || vec![be(BE1, 8080), be(BE2, 8080)];
    let mut ext = svc(4, EXT_IP, 80, Proto::Tcp, FrontendKind::ExternalIp, two());
    ext.affinity_timeout_secs = Some(60);
    let mut out = vec![
        svc(1, VIP, 80, Proto::Tcp, FrontendKind::ClusterIp, two()),
        svc(
            2,
            VIP,
            53,
            Proto::Udp,
            FrontendKind::ClusterIp,
            vec![be(BE1, 5353), be(BE2, 5353)],
        ),
        svc(
            3,
            "0.0.0.0",
            NODE_PORT,
            Proto::Tcp,
            FrontendKind::NodePort,
            two(),
        ),
        ext,
        svc(
            5,
            VIP_V6,
            80,
            Proto::Tcp,
            FrontendKind::ClusterIp,
            vec![be(BE1_V6, 8080)],
        ),
        svc(6, VIP_NOEP, 80, Proto::Tcp, FrontendKind::ClusterIp, vec![]),
        svc(
            7,
            "0.0.0.0",
            NODE_PORT_NOEP,
            Proto::Tcp,
            FrontendKind::NodePort,
            vec![],
        ),
    ];
    out.sort_by_key(|s| s.frontend.key());
    out
}

fn name(line: &str) -> &str {
    line.split_whitespace().next().unwrap_or_default()
}

#[test]
fn nft_programs_reads_back_restarts_and_balances() {
    if !require_root("nft_programs_reads_back_restarts_and_balances") {
        return;
    }
    let env = Env::new("a");
    env.serve("b1", BE1, 8080, 5353);
    env.serve("b2", BE2, 8080, 5353);
    env.serve("b1v6", BE1_V6, 8080, 5353);
    let want = services();
    env.on_node(|| {
        let mut lb = NftLb::open().expect("open");
        assert!(lb.observed().unwrap().is_empty());
        lb.apply(&plan(&want, &[])).expect("apply");
        assert_eq!(lb.observed().unwrap(), want);
    });
    // `nft` decodes what we wrote (a wrong encoding shows as an error or garbage here).
    let listing = env.nft("list table inet twill");
    for needle in [
        "numgen random mod 2 map @be4",
        "jump pick",
        "fib daddr type local",
        "masquerade",
        "@local4",
    ] {
        assert!(listing.contains(needle), "{needle} missing:\n{listing}");
    }
    // A restarted agent finds exactly what it would program.
    env.on_node(|| {
        let mut lb = NftLb::open().expect("reopen");
        let seen = lb.observed().unwrap();
        assert_eq!(seen, want);
        assert!(plan(&want, &seen).is_empty());
    });

    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let np: SocketAddr = format!("{NODE_TO_OUT}:{NODE_PORT}").parse().unwrap();
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let line = env.tcp(vip).expect("ClusterIP from outside");
        // ClusterIP keeps the client's address.
        assert!(line.contains(&format!("peer={OUTSIDE}:")), "{line}");
        seen.insert(name(&line).to_owned());
        let line = env.tcp(np).expect("NodePort");
        // External traffic to a backend on another node is masqueraded to the node.
        assert!(line.contains(&format!("peer={NODE_TO_BE}:")), "{line}");
        seen.insert(name(&line).to_owned());
    }
    assert_eq!(seen, BTreeSet::from(["b1".to_owned(), "b2".to_owned()]));
    // Affinity: one backend for one client.
    let ext: SocketAddr = format!("{EXT_IP}:80").parse().unwrap();
    let sticky: BTreeSet<String> = (0..8)
        .map(|_| name(&env.tcp(ext).expect("external IP")).to_owned())
        .collect();
    assert_eq!(sticky.len(), 1, "{sticky:?}");
    // IPv6.
    let v6: SocketAddr = format!("[{VIP_V6}]:80").parse().unwrap();
    assert_eq!(name(&env.tcp(v6).expect("v6 ClusterIP")), "b1v6");
    // No endpoints: refused (not a timeout).
    let noep: SocketAddr = format!("{NODE_TO_OUT}:{NODE_PORT_NOEP}").parse().unwrap();
    assert_eq!(env.tcp(noep), Err(std::io::ErrorKind::ConnectionRefused));
    let noep: SocketAddr = format!("{VIP_NOEP}:80").parse().unwrap();
    assert_eq!(env.tcp(noep), Err(std::io::ErrorKind::ConnectionRefused));

    // A UDP flow moves off a removed endpoint at the next datagram.
    let ns = env.outside.clone();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let client = thread::spawn(move || {
        join_netns(&ns);
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        sock.connect(format!("{VIP}:53")).unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..2 {
            sock.send(b"x").unwrap();
            let n = sock.recv(&mut buf).expect("UDP reply");
            tx.send(String::from_utf8_lossy(&buf[..n]).into_owned())
                .unwrap();
            let _ = go_rx.recv();
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let keep = if name(&first) == "b1" { BE2 } else { BE1 };
    let mut after = want.clone();
    let udp = after
        .iter_mut()
        .find(|s| s.frontend.proto == Proto::Udp)
        .unwrap();
    udp.backends = vec![be(keep, 5353)];
    env.on_node(|| {
        let mut lb = NftLb::open().expect("reopen");
        let p = plan(&after, &lb.observed().unwrap());
        assert_eq!(p.upserts.len(), 1);
        assert_eq!(p.stale_backends.len(), 1);
        lb.apply(&p).expect("apply");
    });
    go_tx.send(()).unwrap();
    let second = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_ne!(
        name(&second),
        name(&first),
        "UDP flow stuck on a removed endpoint"
    );
    go_tx.send(()).unwrap();
    client.join().unwrap();

    // Uninstall removes the table.
    env.on_node(|| assert!(NftLb::uninstall().unwrap()));
    assert!(!env.nft("list tables").contains("twill"));
}

fn ipt_save(env: &Env, backend: IptBackend) -> String {
    let mut out = String::new();
    for v6 in ["", "6"] {
        let tool = format!("ip{v6}tables-{}-save", backend.as_str());
        out.push_str(&String::from_utf8_lossy(
            &run("ip", &["netns", "exec", &env.node, &tool]).stdout,
        ));
    }
    out
}

fn iptables_programs_reads_back_restarts_and_balances(backend: IptBackend, tag: &str) {
    if !require_root("iptables_programs_reads_back_restarts_and_balances") {
        return;
    }
    let env = Env::new(tag);
    env.serve("b1", BE1, 8080, 5353);
    env.serve("b2", BE2, 8080, 5353);
    env.serve("b1v6", BE1_V6, 8080, 5353);
    let want = services();
    env.on_node(|| {
        let mut lb = IptLb::open(backend).expect("open");
        assert!(lb.observed().unwrap().is_empty());
        lb.apply(&plan(&want, &[])).expect("apply");
        assert_eq!(lb.observed().unwrap(), want);
    });
    env.on_node(|| {
        let mut lb = IptLb::open(backend).expect("reopen");
        let seen = lb.observed().unwrap();
        assert_eq!(seen, want);
        assert!(plan(&want, &seen).is_empty());
    });
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let np: SocketAddr = format!("{NODE_TO_OUT}:{NODE_PORT}").parse().unwrap();
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let line = env.tcp(vip).expect("ClusterIP from outside");
        assert!(line.contains(&format!("peer={OUTSIDE}:")), "{line}");
        seen.insert(name(&line).to_owned());
        let line = env.tcp(np).expect("NodePort");
        assert!(line.contains(&format!("peer={NODE_TO_BE}:")), "{line}");
        seen.insert(name(&line).to_owned());
    }
    assert_eq!(seen, BTreeSet::from(["b1".to_owned(), "b2".to_owned()]));
    let ext: SocketAddr = format!("{EXT_IP}:80").parse().unwrap();
    let sticky: BTreeSet<String> = (0..8)
        .map(|_| name(&env.tcp(ext).expect("external IP")).to_owned())
        .collect();
    assert_eq!(sticky.len(), 1, "{sticky:?}");
    let v6: SocketAddr = format!("[{VIP_V6}]:80").parse().unwrap();
    assert_eq!(name(&env.tcp(v6).expect("v6 ClusterIP")), "b1v6");
    let noep: SocketAddr = format!("{NODE_TO_OUT}:{NODE_PORT_NOEP}").parse().unwrap();
    assert_eq!(env.tcp(noep), Err(std::io::ErrorKind::ConnectionRefused));
    let noep: SocketAddr = format!("{VIP_NOEP}:80").parse().unwrap();
    assert_eq!(env.tcp(noep), Err(std::io::ErrorKind::ConnectionRefused));
    // Uninstalling (services still programmed) leaves no TWILL- chain and no jump; so does
    // removing everything first.
    env.on_node(|| {
        assert!(IptLb::uninstall(backend).unwrap() > 0);
    });
    let left = ipt_save(&env, backend);
    assert!(!left.contains("TWILL") && !left.contains("twill"), "{left}");
    env.on_node(|| {
        let mut lb = IptLb::open(backend).expect("reopen");
        lb.apply(&plan(&want, &[])).expect("apply");
        lb.apply(&plan(&[], &want)).expect("delete all");
        assert!(lb.observed().unwrap().is_empty());
        assert!(IptLb::uninstall(backend).unwrap() > 0);
    });
    let left = ipt_save(&env, backend);
    assert!(!left.contains("TWILL") && !left.contains("twill"), "{left}");
}

#[test]
fn iptables_legacy_programs_reads_back_restarts_and_balances() {
    iptables_programs_reads_back_restarts_and_balances(IptBackend::Legacy, "l");
}

#[test]
fn iptables_nft_programs_reads_back_restarts_and_balances() {
    iptables_programs_reads_back_restarts_and_balances(IptBackend::Nft, "i");
}

#[test]
fn nft_leaves_other_tables_alone() {
    if !require_root("nft_leaves_other_tables_alone") {
        return;
    }
    let env = Env::new("f");
    let foreign = "table inet filter {\n chain input {\n  type filter hook input priority 0; policy accept;\n  tcp dport 22 counter accept\n }\n}\ntable ip nat {\n chain POSTROUTING {\n  type nat hook postrouting priority 100; policy accept;\n  oifname \"nc\" masquerade\n }\n}\n";
    let path = std::env::temp_dir().join(format!("twill-foreign-{}.nft", std::process::id()));
    std::fs::write(&path, foreign).unwrap();
    run(
        "ip",
        &[
            "netns",
            "exec",
            &env.node,
            "nft",
            "-f",
            path.to_str().unwrap(),
        ],
    );
    let _ = std::fs::remove_file(&path);
    let before_filter = env.nft("list table inet filter");
    let before_nat = env.nft("list table ip nat");
    let want = services();
    env.on_node(|| {
        let mut lb = NftLb::open().expect("open");
        lb.apply(&plan(&want, &[])).expect("apply");
        lb.apply(&plan(&[], &want)).expect("delete all");
        assert!(lb.observed().unwrap().is_empty());
        NftLb::uninstall().expect("uninstall");
    });
    assert_eq!(env.nft("list table inet filter"), before_filter);
    assert_eq!(env.nft("list table ip nat"), before_nat);
}
