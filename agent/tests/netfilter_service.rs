//! Privileged tests of the netfilter service dataplanes (`NftLb`, `IptLb`) against the real
//! kernel: program services, read them back, restart, drive traffic, leave other owners' rules
//! alone. (The scenarios through `twilld` and etcd are in `tests/tests/services_ebpf.rs`; these
//! exercise the seam directly and faster.)
//!
//! Why it is shaped as it is:
//! - Three throw-away namespaces per test (the node, the backends, a host outside the cluster)
//!   joined by veths, made and removed by twill-tests' namespace guard (`common::Env`), pass or
//!   fail. Traffic never leaves them. The node has a default route (towards the backends'
//!   namespace, as a real node has one somewhere), so a service address without endpoints
//!   reaches the forward hook and is rejected there instead of being unroutable.
//! - The dataplane is driven from a thread that `setns`es into the node namespace, as `twilld`
//!   runs inside it; netfilter state is per namespace, so nothing outside is touched.
//! - Backends answer `<name> peer=<client>`, so a test sees which backend served a flow and
//!   which source it saw.
//! - Timings at scale are `cargo xtask bench services --mode all`'s, not a test's.
//! - Needs root. Without root it skips loudly, except under `CI=true`, where it fails.

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::{
    BE1, BE1_V6, BE2, Env, NODE_PORT, NODE_TO_BE, NODE_TO_OUT, OUTSIDE, VIP, VIP_V6, backend as be,
    ip_batch, run_in, service,
};
use twill_agent::services::dataplane::iptables::{IptBackend, IptLb};
use twill_agent::services::dataplane::nft::NftLb;
use twill_agent::services::lb::{FrontendKind, LbDataplane, LbService, Proto, plan};
use twill_tests::{require_root, server_name as name, tcp_exchange};

mod common;

const VIP_NOEP: &str = "10.96.0.11";
const EXT_IP: &str = "192.0.2.10";
const NODE_PORT_NOEP: u16 = 30081;

/// The test's namespaces, with the node's default route towards the backends.
fn env() -> Env {
    let env = Env::new();
    ip_batch(&env.node, &format!("route add default via {BE1}\n"));
    env
}

/// [`env`] with the backends `b1`, `b2` and `b1v6` serving TCP 8080 and UDP 5353.
fn serving_env() -> Env {
    let env = env();
    env.serve("b1", BE1, 8080, 5353);
    env.serve("b2", BE2, 8080, 5353);
    env.serve("b1v6", BE1_V6, 8080, 5353);
    env
}

/// A dataplane `open`ed on the node, empty at first, programs `want` and reads it back.
fn programs<L: LbDataplane>(env: &Env, want: &[LbService], open: impl FnOnce() -> L + Send) {
    env.on_node(|| {
        let mut lb = open();
        assert!(lb.observed().unwrap().is_empty());
        lb.apply(&plan(want, &[])).expect("apply");
        assert_eq!(lb.observed().unwrap(), want);
    });
}

/// A restarted agent (the dataplane `open`ed again) finds exactly what it would program.
fn reopened_finds<L: LbDataplane>(env: &Env, want: &[LbService], open: impl FnOnce() -> L + Send) {
    env.on_node(|| {
        let mut lb = open();
        let seen = lb.observed().unwrap();
        assert_eq!(seen, want);
        assert!(plan(want, &seen).is_empty());
    });
}

/// One TCP exchange from the outside namespace: the server's line, or the error kind.
fn tcp(env: &Env, addr: SocketAddr) -> Result<String, std::io::ErrorKind> {
    tcp_exchange(&env.outside, addr).map_err(|e| e.kind())
}

/// `nft ARGS` in the node namespace.
fn nft(env: &Env, args: &str) -> String {
    let mut a = vec!["nft"];
    a.extend(args.split_whitespace());
    run_in(&env.node, &a)
}

/// The services of the functional tests: ClusterIP (TCP and UDP, v4 and v6), a NodePort, an
/// external IP with affinity, and two frontends without endpoints.
fn services() -> Vec<LbService> {
    use FrontendKind::{ClusterIp, ExternalIp, NodePort};
    let two = |port| vec![be(BE1, port), be(BE2, port)];
    let mut ext = service(4, ExternalIp, EXT_IP, 80, Proto::Tcp, two(8080));
    ext.affinity_timeout_secs = Some(60);
    let mut out = vec![
        service(1, ClusterIp, VIP, 80, Proto::Tcp, two(8080)),
        service(2, ClusterIp, VIP, 53, Proto::Udp, two(5353)),
        service(3, NodePort, "0.0.0.0", NODE_PORT, Proto::Tcp, two(8080)),
        ext,
        service(5, ClusterIp, VIP_V6, 80, Proto::Tcp, vec![be(BE1_V6, 8080)]),
        service(6, ClusterIp, VIP_NOEP, 80, Proto::Tcp, vec![]),
        service(7, NodePort, "0.0.0.0", NODE_PORT_NOEP, Proto::Tcp, vec![]),
    ];
    out.sort_by_key(|s| s.frontend.key());
    out
}

#[test]
fn nft_programs_reads_back_restarts_and_balances() {
    if !require_root() {
        return;
    }
    let env = serving_env();
    let want = services();
    programs(&env, &want, || NftLb::open().expect("open"));
    // `nft` decodes what we wrote (a wrong encoding shows as an error or garbage here).
    let listing = nft(&env, "list table inet twill");
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
    reopened_finds(&env, &want, || NftLb::open().expect("reopen"));

    balances(&env);

    // A UDP flow moves off a removed endpoint at the next datagram.
    let ns = env.outside.clone();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let client = std::thread::spawn(move || {
        twill_tests::ns::join_netns(&ns).unwrap();
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
    assert!(!nft(&env, "list tables").contains("twill"));
}

/// What a client outside sees of [`services`] programmed: ClusterIP keeping its address,
/// NodePort masqueraded, both spread over the two backends; affinity, IPv6, and refusals
/// where there are no endpoints.
fn balances(env: &Env) {
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let np: SocketAddr = format!("{NODE_TO_OUT}:{NODE_PORT}").parse().unwrap();
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let line = tcp(env, vip).expect("ClusterIP from outside");
        // ClusterIP keeps the client's address.
        assert!(line.contains(&format!("peer={OUTSIDE}:")), "{line}");
        seen.insert(name(&line).to_owned());
        let line = tcp(env, np).expect("NodePort");
        // External traffic to a backend on another node is masqueraded to the node.
        assert!(line.contains(&format!("peer={NODE_TO_BE}:")), "{line}");
        seen.insert(name(&line).to_owned());
    }
    assert_eq!(seen, BTreeSet::from(["b1".to_owned(), "b2".to_owned()]));
    // Affinity: one backend for one client.
    let ext: SocketAddr = format!("{EXT_IP}:80").parse().unwrap();
    let sticky: BTreeSet<String> = (0..8)
        .map(|_| name(&tcp(env, ext).expect("external IP")).to_owned())
        .collect();
    assert_eq!(sticky.len(), 1, "{sticky:?}");
    // IPv6.
    let v6: SocketAddr = format!("[{VIP_V6}]:80").parse().unwrap();
    assert_eq!(name(&tcp(env, v6).expect("v6 ClusterIP")), "b1v6");
    // No endpoints: refused (not a timeout).
    let noep: SocketAddr = format!("{NODE_TO_OUT}:{NODE_PORT_NOEP}").parse().unwrap();
    assert_eq!(tcp(env, noep), Err(std::io::ErrorKind::ConnectionRefused));
    let noep: SocketAddr = format!("{VIP_NOEP}:80").parse().unwrap();
    assert_eq!(tcp(env, noep), Err(std::io::ErrorKind::ConnectionRefused));
}

fn ipt_save(env: &Env, backend: IptBackend) -> String {
    let mut out = String::new();
    for v6 in ["", "6"] {
        let tool = format!("ip{v6}tables-{}-save", backend.as_str());
        out.push_str(&run_in(&env.node, &[tool.as_str()]));
    }
    out
}

fn iptables_programs_reads_back_restarts_and_balances(backend: IptBackend) {
    if !require_root() {
        return;
    }
    let env = serving_env();
    let want = services();
    programs(&env, &want, || IptLb::open(backend).expect("open"));
    reopened_finds(&env, &want, || IptLb::open(backend).expect("reopen"));
    balances(&env);
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
    iptables_programs_reads_back_restarts_and_balances(IptBackend::Legacy);
}

#[test]
fn iptables_nft_programs_reads_back_restarts_and_balances() {
    iptables_programs_reads_back_restarts_and_balances(IptBackend::Nft);
}

#[test]
fn nft_leaves_other_tables_alone() {
    if !require_root() {
        return;
    }
    let env = env();
    let foreign = "table inet filter {\n chain input {\n  type filter hook input priority 0; policy accept;\n  tcp dport 22 counter accept\n }\n}\ntable ip nat {\n chain POSTROUTING {\n  type nat hook postrouting priority 100; policy accept;\n  oifname \"nc\" masquerade\n }\n}\n";
    let path = env.guard.temp_dir().join("foreign.nft");
    std::fs::write(&path, foreign).unwrap();
    run_in(&env.node, &["nft", "-f", path.to_str().unwrap()]);
    let before_filter = nft(&env, "list table inet filter");
    let before_nat = nft(&env, "list table ip nat");
    let want = services();
    env.on_node(|| {
        let mut lb = NftLb::open().expect("open");
        lb.apply(&plan(&want, &[])).expect("apply");
        lb.apply(&plan(&[], &want)).expect("delete all");
        assert!(lb.observed().unwrap().is_empty());
        NftLb::uninstall().expect("uninstall");
    });
    assert_eq!(nft(&env, "list table inet filter"), before_filter);
    assert_eq!(nft(&env, "list table ip nat"), before_nat);
}
