//! End-to-end tests of the udp backend (issue: UDP backend): real etcd, real kernel, twilld with
//! `Backend.Type = "udp"` on every node of a netns rig. Each test asserts what a user would see:
//! pods reach each other through `flannel0`, a departed node leaves the routing table, the MTU is
//! enforced with ICMP frag-needed, garbage on the port is counted and survived, a crash and a
//! restart recover, and the bytes on the wire are flannel's.
//!
//! Privileged: as root they run; under CI a non-root run fails (see `require_root`).

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use twill_facts::SubnetFacts;
use twill_tests::ns::in_netns;
use twill_tests::suite::{UP, assert_full_mesh, assert_reaches, strip_ansi};
use twill_tests::traffic::tcp_transfer;
use twill_tests::{Pod, Rig, exec, ping, require_root, routes, run, wait_until};

const UDP: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;
const METRICS: &str = "127.0.0.1:9615";

/// Brings up `n` udp nodes with twilld (extra args for every node) and one pod each; every pod
/// reaches every other. `None` when the test cannot run (not root, outside CI).
fn cluster(n: usize, extra: &[&str]) -> Option<(Rig, Vec<SubnetFacts>, Vec<Pod>)> {
    if !require_root() {
        return None;
    }
    let (rig, facts, pods) = twill_tests::suite::cluster(UDP, n, extra);
    assert_full_mesh(&rig, &pods, false);
    Some((rig, facts, pods))
}

/// `/metrics` of node `node` (twilld started with `--metrics-addr 127.0.0.1:9615`).
///
/// The request goes out in one write: twilld answers after the request line and closes, so a
/// client that writes its headers piecewise (the rig's `http_get`) can meet a reset.
fn metrics(rig: &Rig, node: usize) -> String {
    let addr: SocketAddr = METRICS.parse().unwrap();
    in_netns(&rig.node_ns(node), || {
        let t = Duration::from_secs(2);
        let mut s = TcpStream::connect_timeout(&addr, t)?;
        s.set_read_timeout(Some(t))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "metrics: {head}");
        Ok(body.to_string())
    })
    .unwrap()
}

/// The value of the sample whose line starts with `series` (name and labels, exactly).
fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in metrics:\n{text}"))
}

fn drops(text: &str, reason: &str) -> u64 {
    sample(
        text,
        &format!("twill_udp_drops_total{{reason=\"{reason}\"}}"),
    )
}

/// The ifindex of `dev` in `ns` (the number before the name in `ip -o link`).
fn ifindex(ns: &str, dev: &str) -> String {
    let l = run(ns, &["ip", "-o", "link", "show", dev]).unwrap();
    l.split(':').next().unwrap().trim().to_string()
}

// ---- packets by hand -------------------------------------------------------------------------

fn csum(data: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in data.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !u16::try_from(s).unwrap()
}

/// An IPv4 ICMP echo request `src → dst`, checksums valid.
fn echo_request(src: Ipv4Addr, dst: Ipv4Addr, id: u16, ttl: u8) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&1u16.to_be_bytes());
    icmp.extend_from_slice(b"twill-udp-wire-format");
    let c = csum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = u16::try_from(20 + icmp.len()).unwrap();
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x40, 0, ttl, 1, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = csum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&icmp);
    p
}

// ---- tests -----------------------------------------------------------------------------------

#[test]
fn udp_three_nodes_full_mesh() {
    let Some((rig, facts, pods)) = cluster(3, &["--metrics-addr", METRICS]) else {
        return;
    };
    for f in &facts {
        assert_eq!(f.mtu, 1472, "udp MTU is the uplink's minus 28");
        assert_eq!(f.network.unwrap().to_string(), "10.244.0.0/16");
    }
    // flannel's device: a TUN, multi-queue with virtio-net headers, persistent; the node's
    // subnet address on it and the whole Network routed into it.
    let ns = rig.node_ns(1);
    let link = run(&ns, &["ip", "-d", "link", "show", "flannel0"]).unwrap();
    assert!(
        link.contains("tun type tun")
            && link.contains("vnet_hdr on")
            && link.contains("multi_queue")
            && link.contains("persist on")
            && link.contains("mtu 1472"),
        "{link}"
    );
    let sn = facts[0].subnet_v4().unwrap();
    let addr = run(&ns, &["ip", "-4", "-o", "addr", "show", "dev", "flannel0"]).unwrap();
    assert!(addr.contains(&format!("{}/32", sn.network())), "{addr}");
    let r = routes(&ns).unwrap();
    assert!(r.contains("10.244.0.0/16 dev flannel0"), "{r}");
    // The lease as flannel writes it for udp: no BackendData.
    let key = format!("/coreos.com/network/subnets/{}-24", sn.network());
    let value = rig.etcdctl(&["get", "--print-value-only", &key]).unwrap();
    let lease: serde_json::Value = serde_json::from_str(value.trim()).unwrap();
    assert_eq!(lease["BackendType"], "udp", "{value}");
    assert_eq!(lease["PublicIP"], Rig::node_ip(1).to_string(), "{value}");
    assert!(lease.get("BackendData").is_none(), "{value}");
    // Bulk TCP crosses too, every byte intact: big writes make the pod's TCP hand 64 KiB
    // super-packets to flannel0 (segmented by the backend) and the receiver gets coalesced
    // writes (GRO).
    let data: Vec<u8> = (0..32usize << 20)
        .map(|i| u8::try_from((i * 7 + i / 4099) & 0xff).unwrap())
        .collect();
    let dst = SocketAddr::from((pods[1].ipv4.unwrap(), 5202));
    let got = tcp_transfer(&pods[0].ns, &pods[1].ns, dst, &data, UP).unwrap();
    assert!(got == data, "{} bytes back, or different ones", got.len());
    // Node 1 reads super-packets from its TUN, node 2 writes coalesced ones: each TUN packet
    // stands for several datagrams.
    for (node, tun_op, udp_dir, what) in [
        (1, "read", "tx", "no TSO super-packets from the TUN"),
        (2, "write", "rx", "no coalesced writes to the TUN"),
    ] {
        let m = metrics(&rig, node);
        let tun = sample(
            &m,
            &format!("twill_udp_tun_packets_total{{direction=\"{tun_op}\"}}"),
        );
        let datagrams = sample(
            &m,
            &format!("twill_udp_packets_total{{direction=\"{udp_dir}\"}}"),
        );
        assert!(
            tun * 4 < datagrams,
            "{what} ({tun} {tun_op}s, {datagrams} datagrams):\n{m}"
        );
    }
}

#[test]
fn udp_deleted_lease_leaves_the_routing_table() {
    let Some((rig, facts, pods)) = cluster(3, &["--metrics-addr", METRICS]) else {
        return;
    };
    assert_eq!(sample(&metrics(&rig, 1), "twill_udp_peers"), 2);
    let gone = facts[2].subnet_v4().unwrap();
    let key = format!("/coreos.com/network/subnets/{}-24", gone.network());
    // The node goes away (its agent stops), then its lease is deleted.
    rig.kill_twilld(3, Signal::SIGKILL).unwrap();
    rig.etcdctl(&["del", &key]).unwrap();
    wait_until(Duration::from_secs(5), || {
        sample(&metrics(&rig, 1), "twill_udp_peers") == 1
    })
    .unwrap_or_else(|_| panic!("node 1 still routes to {gone}:\n{}", metrics(&rig, 1)));
    // Packets for it are now dropped as no_route on node 1; the others still flow.
    let before = drops(&metrics(&rig, 1), "no_route");
    let s = ping(&pods[0].ns, pods[2].ipv4.unwrap(), 3).unwrap();
    assert_eq!(s.received, 0, "{s}");
    assert!(drops(&metrics(&rig, 1), "no_route") >= before + 3);
    assert_reaches(&rig, &pods[0], &pods[1], false);
}

#[test]
fn udp_mtu_sized_df_passes_and_larger_gets_frag_needed() {
    let Some((rig, _facts, pods)) = cluster(2, &[]) else {
        return;
    };
    // Give the pod a 1500-byte path to its node, so the node has to forward into flannel0
    // (MTU 1472) and it is the TUN's MTU that decides.
    let (pod, node_ns) = (&pods[0], rig.node_ns(1));
    run(&node_ns, &["ip", "link", "set", "vp1", "mtu", "1500"]).unwrap();
    run(&pod.ns, &["ip", "link", "set", "eth0", "mtu", "1500"]).unwrap();
    let dst = pods[1].ipv4.unwrap().to_string();
    // 1444 + 8 (ICMP) + 20 (IP) = 1472: fits, DF set, crosses the overlay whole.
    let ok = exec(
        &pod.ns,
        &[
            "ping", "-n", "-c", "3", "-i", "0.2", "-W", "1", "-M", "do", "-s", "1444", &dst,
        ],
    )
    .unwrap();
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success() && text.contains(" 0% packet loss"),
        "{text}"
    );
    // One byte more: the node answers with ICMP frag-needed, MTU 1472.
    let big = exec(
        &pod.ns,
        &[
            "ping", "-n", "-c", "2", "-i", "0.2", "-W", "1", "-M", "do", "-s", "1445", &dst,
        ],
    )
    .unwrap();
    let text =
        String::from_utf8_lossy(&big.stdout).to_string() + &String::from_utf8_lossy(&big.stderr);
    assert!(
        text.contains("Frag needed") && text.contains("mtu = 1472"),
        "no ICMP frag-needed: {text}"
    );
}

#[test]
fn udp_garbage_on_the_port_is_counted_and_survived() {
    let Some((rig, facts, pods)) = cluster(2, &["--metrics-addr", METRICS]) else {
        return;
    };
    let before = metrics(&rig, 1);
    let target = SocketAddr::from((Rig::node_ip(1), 8285));
    let peer_subnet = facts[1].subnet_v4().unwrap();
    let pod1 = pods[0].ipv4.unwrap();
    // From node 2 (a known peer): noise, a truncated header, a packet for someone else's subnet,
    // a packet with TTL 0.
    in_netns(&rig.node_ns(2), || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        for i in 0..20u8 {
            s.send_to(&[0x01, i, 0xde, 0xad, 0xbe, 0xef], target)?;
        }
        s.send_to(&[0x45, 0, 0, 60, 0, 0], target)?;
        let src = Ipv4Addr::from(u32::from(peer_subnet.network()) + 5);
        s.send_to(
            &echo_request(src, Ipv4Addr::new(10, 244, 250, 1), 1, 64),
            target,
        )?;
        s.send_to(&echo_request(src, pod1, 2, 0), target)?;
        Ok(())
    })
    .unwrap();
    // From the underlay namespace: no peer at all.
    in_netns(&rig.underlay_ns(), || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        for _ in 0..5 {
            s.send_to(
                &echo_request(Ipv4Addr::new(10, 244, 99, 1), pod1, 3, 64),
                target,
            )?;
        }
        Ok(())
    })
    .unwrap();
    let want = [
        ("malformed", 21),
        ("not_local", 1),
        ("ttl", 1),
        ("unknown_peer", 5),
    ];
    let ok = wait_until(Duration::from_secs(5), || {
        let now = metrics(&rig, 1);
        want.iter()
            .all(|(r, n)| drops(&now, r) >= drops(&before, r) + n)
    });
    let now = metrics(&rig, 1);
    assert!(
        ok.is_ok(),
        "drops not counted: before\n{before}\nafter\n{now}"
    );
    assert!(rig.twilld_running(1), "twilld died on garbage");
    assert_full_mesh(&rig, &pods, false);
}

#[test]
fn udp_kill_and_restart_recovers() {
    let Some((rig, facts, pods)) = cluster(2, &[]) else {
        return;
    };
    let index_before = ifindex(&rig.node_ns(1), "flannel0");
    // 600 pings 10 ms apart (~6 s) span a kill -9 and a restart of node 1's agent.
    let dst = pods[1].ipv4.unwrap().to_string();
    let flood = twill_tests::nsenter(
        &pods[0].ns,
        &["ping", "-q", "-c", "600", "-i", "0.01", "-W", "1", &dst],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    rig.kill_twilld(1, Signal::SIGKILL).unwrap();
    // The device survives its agent (persistent): address and route stay, nothing leaks out of
    // the node unencapsulated.
    let r = routes(&rig.node_ns(1)).unwrap();
    assert!(r.contains("10.244.0.0/16 dev flannel0"), "{r}");
    std::thread::sleep(Duration::from_millis(500));
    rig.start_twilld(1, &[]).unwrap();
    let out = flood.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let stats = twill_tests::PingStats::parse(&text).unwrap();
    let lost = stats.transmitted - stats.received;
    eprintln!(
        "ping flood across kill -9 + restart: {stats}; {lost} lost, about {} ms without forwarding",
        lost * 10
    );
    // Lost: at most the 0.5 s without agent and the restart (etcd round trips), not more.
    assert!(lost < 250, "{lost} of 600 lost across a restart: {text}");
    assert_reaches(&rig, &pods[0], &pods[1], false);
    assert_reaches(&rig, &pods[1], &pods[0], false);
    let again = rig.wait_subnet_file(1, UP).unwrap();
    assert_eq!(again.subnet, facts[0].subnet);
    assert_eq!(
        ifindex(&rig.node_ns(1), "flannel0"),
        index_before,
        "the device was recreated"
    );
}

#[test]
fn udp_device_deleted_by_hand_is_healed() {
    let Some((rig, _facts, pods)) = cluster(2, &["--resync-interval", "1"]) else {
        return;
    };
    run(&rig.node_ns(1), &["ip", "link", "del", "flannel0"]).unwrap();
    assert_full_mesh(&rig, &pods, false);
    let r = routes(&rig.node_ns(1)).unwrap();
    assert!(r.contains("10.244.0.0/16 dev flannel0"), "{r}");
}

#[test]
fn udp_speaks_flannels_wire_format() {
    let Some(rig) = Rig::for_test(2, Some(UDP)) else {
        return;
    };
    // Node 2 is "flannel": its lease written as flanneld writes it for udp, its port a plain
    // socket of this test.
    let key = "/coreos.com/network/subnets/10.244.200.0-24";
    let value = format!(
        r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"udp"}}"#,
        Rig::node_ip(2)
    );
    rig.etcdctl(&["put", key, &value]).unwrap();
    rig.start_twilld(1, &[]).unwrap();
    let facts = rig.wait_subnet_file(1, UP).unwrap();
    let pod = rig.add_pod(1, &facts).unwrap();
    let pod_ip = pod.ipv4.unwrap();
    let flannel_pod = Ipv4Addr::new(10, 244, 200, 7);
    // An echo request in a bare datagram to node 1's port; the reply comes back as a bare
    // datagram to ours, from node 1's port.
    let (from, reply) = in_netns(&rig.node_ns(2), || {
        let s = UdpSocket::bind(SocketAddr::from((Rig::node_ip(2), 8285)))?;
        s.set_read_timeout(Some(Duration::from_millis(300)))?;
        let deadline = Instant::now() + UP;
        let mut buf = [0u8; 2048];
        loop {
            s.send_to(
                &echo_request(flannel_pod, pod_ip, 42, 64),
                (Rig::node_ip(1), 8285),
            )?;
            if let Ok((n, from)) = s.recv_from(&mut buf)
                && n >= 28
                && buf[9] == 1
                && buf[20] == 0
            {
                return Ok((from, buf[..n].to_vec()));
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "no echo reply from the twill pod"
            );
        }
    })
    .unwrap_or_else(|e| {
        rig.print_logs();
        panic!("{e:#}")
    });
    assert_eq!(from, SocketAddr::from((Rig::node_ip(1), 8285)));
    assert_eq!(reply[0], 0x45, "a plain IPv4 packet, no header of ours");
    assert_eq!(
        usize::from(u16::from_be_bytes([reply[2], reply[3]])),
        reply.len()
    );
    assert_eq!(&reply[12..16], &pod_ip.octets());
    assert_eq!(&reply[16..20], &flannel_pod.octets());
    assert_eq!(csum(&reply[..20]), 0, "IPv4 header checksum");
    assert_eq!(csum(&reply[20..]), 0, "ICMP checksum");
    assert_eq!(&reply[24..26], &42u16.to_be_bytes(), "our echo id");
}

#[test]
fn udp_refuses_the_ebpf_proxy_and_creates_nothing() {
    let Some(rig) = Rig::for_test(1, Some(UDP)) else {
        return;
    };
    rig.start_twilld(1, &["--proxy-mode", "ebpf"]).unwrap();
    wait_until(UP, || !rig.twilld_running(1)).unwrap_or_else(|_| {
        panic!(
            "twilld still runs with --proxy-mode ebpf on udp:\n{}",
            rig.twilld_log(1)
        )
    });
    let log = rig.twilld_log(1);
    assert!(
        log.contains("--proxy-mode ebpf") && log.contains("Backend.Type \"udp\""),
        "the error names the flag and the backend: {log}"
    );
    assert!(!rig.subnet_file(1).exists(), "a subnet file was written");
    assert!(
        run(&rig.node_ns(1), &["ip", "link", "show", "flannel0"]).is_err(),
        "a device was created"
    );
}

/// A flannel udp node made by hand in a rig namespace: a plain TUN (`flannel0`, no virtio-net
/// header, no offloads: the kernel hands over and takes whole MTU-sized packets and checks every
/// checksum) and a relay of one packet per datagram between it and `PublicIP:8285`, as flanneld
/// does.
struct FlannelNode {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl FlannelNode {
    /// On `node` of `rig`, owning `ip`/24, relaying to the twill node `peer` (its public IP).
    fn start(rig: &Rig, node: usize, ip: Ipv4Addr, peer: Ipv4Addr) -> FlannelNode {
        use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
        let ns = rig.node_ns(node);
        let me = Rig::node_ip(node);
        let (tun, sock) = in_netns(&ns, || {
            // SAFETY: plain open(2); the result is checked.
            let raw =
                unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
            anyhow::ensure!(
                raw >= 0,
                "open /dev/net/tun: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: a fresh descriptor we own.
            let tun = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: ifreq is plain old data; all-zero is valid.
            let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
            for (d, s) in ifr.ifr_name.iter_mut().zip(b"flannel0") {
                *d = libc::c_char::from_ne_bytes([*s]);
            }
            ifr.ifr_ifru.ifru_flags = libc::c_short::try_from(libc::IFF_TUN | libc::IFF_NO_PI)?;
            // SAFETY: TUNSETIFF reads an ifreq that lives across the call.
            let r = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &raw const ifr) };
            anyhow::ensure!(r == 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
            let sock = UdpSocket::bind(SocketAddr::from((me, 8285)))?;
            sock.set_read_timeout(Some(Duration::from_millis(100)))?;
            Ok((tun, sock))
        })
        .unwrap();
        twill_tests::ns::ip_batch(
            Some(&ns),
            &format!(
                "link set flannel0 mtu 1472 up\naddr add {ip}/32 dev flannel0\n\
                 route add 10.244.0.0/16 dev flannel0\n"
            ),
        )
        .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tun = std::sync::Arc::new(tun);
        let sock = std::sync::Arc::new(sock);
        let to_wire = {
            let (stop, tun, sock) = (stop.clone(), tun.clone(), sock.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut pfd = libc::pollfd {
                        fd: tun.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    if unsafe { libc::poll(&raw mut pfd, 1, 100) } <= 0 {
                        continue;
                    }
                    // SAFETY: `buf` is valid for its length.
                    let n =
                        unsafe { libc::read(tun.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                    if let Ok(n) = usize::try_from(n) {
                        let _ = sock.send_to(&buf[..n], (peer, 8285));
                    }
                }
            })
        };
        let from_wire = {
            let (stop, tun, sock) = (stop.clone(), tun.clone(), sock.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok((n, from)) = sock.recv_from(&mut buf)
                        && from.ip() == IpAddr::from(peer)
                    {
                        // SAFETY: `buf[..n]` is valid for reads.
                        let _ = unsafe { libc::write(tun.as_raw_fd(), buf.as_ptr().cast(), n) };
                    }
                }
            })
        };
        FlannelNode {
            stop,
            threads: vec![to_wire, from_wire],
        }
    }
}

impl Drop for FlannelNode {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// TCP both ways between a twill pod and a flannel-style node: twill's segmentation of 64 KiB
/// super-packets (sequence numbers, IP ids, checksums computed per packet) is accepted by a
/// kernel that verifies every checksum, and single packets from flannel are coalesced and
/// delivered intact.
#[test]
fn udp_tcp_both_ways_with_a_flannel_style_node() {
    let Some(rig) = Rig::for_test(2, Some(UDP)) else {
        return;
    };
    let flannel_ip = Ipv4Addr::new(10, 244, 200, 1);
    let value = format!(
        r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"udp"}}"#,
        Rig::node_ip(2)
    );
    rig.etcdctl(&["put", "/coreos.com/network/subnets/10.244.200.0-24", &value])
        .unwrap();
    rig.start_twilld(1, &["--metrics-addr", METRICS]).unwrap();
    let facts = rig.wait_subnet_file(1, UP).unwrap();
    let pod = rig.add_pod(1, &facts).unwrap();
    let _flannel = FlannelNode::start(&rig, 2, flannel_ip, Rig::node_ip(1));
    let flannel_ns = rig.node_ns(2);
    wait_until(UP, || {
        ping(&pod.ns, flannel_ip, 1).is_ok_and(|s| s.all_received())
    })
    .unwrap_or_else(|e| {
        rig.print_logs();
        panic!("the twill pod does not reach the flannel node: {e:#}")
    });
    // Not a multiple of any MSS; a pattern that shows a misplaced or repeated segment.
    let data: Vec<u8> = (0..6_000_001u32).map(|i| (i % 251) as u8).collect();
    let to_flannel = SocketAddr::from((flannel_ip, 5203));
    let got = tcp_transfer(&pod.ns, &flannel_ns, to_flannel, &data, UP).unwrap();
    assert!(
        got == data,
        "twill → flannel: {} of {} bytes, or different",
        got.len(),
        data.len()
    );
    let to_pod = SocketAddr::from((pod.ipv4.unwrap(), 5204));
    let got = tcp_transfer(&flannel_ns, &pod.ns, to_pod, &data, UP).unwrap();
    assert!(
        got == data,
        "flannel → twill: {} of {} bytes, or different",
        got.len(),
        data.len()
    );
    let m = metrics(&rig, 1);
    assert_eq!(drops(&m, "malformed"), 0, "{m}");
    assert_eq!(drops(&m, "send_error"), 0, "{m}");
}

/// The steering bucket of a TCP flow, as twilld computes it (`core::bucket`): addresses and
/// ports folded to 16 bits, mixed, 32 buckets.
fn steer_bucket(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> u32 {
    let a = u32::from(src) ^ u32::from(dst) ^ (u32::from(sport) << 16 | u32::from(dport));
    let a = (a ^ (a >> 16)) & 0xffff;
    (a.wrapping_mul(0x9e37_79b1) >> 16) % 32
}

/// A TCP connection from `src` (bound: the source port is chosen) to `dst`.
fn connect_from(src: SocketAddr, dst: SocketAddr) -> anyhow::Result<TcpStream> {
    use std::os::fd::FromRawFd as _;
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (src, dst) else {
        anyhow::bail!("IPv4 only");
    };
    let sa = |a: std::net::SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap(),
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_in>())?;
    // SAFETY: plain socket(2); the result is checked and owned by the stream below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor we own.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let (s, d) = (sa(s), sa(d));
    // SAFETY: sockaddr_in values of the length given.
    anyhow::ensure!(
        unsafe { libc::bind(fd, (&raw const s).cast(), len) } == 0,
        "bind {src}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: as above.
    anyhow::ensure!(
        unsafe { libc::connect(fd, (&raw const d).cast(), len) } == 0,
        "connect {dst}: {}",
        std::io::Error::last_os_error()
    );
    Ok(stream)
}

/// Two heavy flows that hash to one worker are spread: each node's agent moves one of them to
/// the other worker (its steering table is rewritten), and both transfers arrive whole.
#[test]
fn udp_two_heavy_flows_on_one_worker_are_spread() {
    let Some((rig, _facts, pods)) = cluster(2, &[]) else {
        return;
    };
    let workers: u32 = strip_ansi(&rig.twilld_log(1))
        .split("workers=")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .expect("twilld logs its worker count");
    let (client_ip, server_ip) = (pods[0].ipv4.unwrap(), pods[1].ipv4.unwrap());
    // Two flows whose buckets differ but start on one worker (buckets are dealt round-robin).
    let mut flows: Vec<(u16, u32)> = Vec::new();
    for sport in 41_000u16..42_000 {
        let bk = steer_bucket(
            client_ip,
            server_ip,
            sport,
            5300 + u16::try_from(flows.len()).unwrap(),
        );
        if flows.is_empty() || (bk != flows[0].1 && bk % workers == flows[0].1 % workers) {
            flows.push((sport, bk));
            if flows.len() == 2 {
                break;
            }
        }
    }
    assert_eq!(flows.len(), 2, "two flows found");
    let secs = Duration::from_secs(4);
    let results: Vec<(u64, u64)> = std::thread::scope(|sc| {
        let handles: Vec<_> = flows
            .iter()
            .enumerate()
            .map(|(i, &(sport, _))| {
                let dport = 5300 + u16::try_from(i).unwrap();
                let (from, to) = (pods[0].ns.clone(), pods[1].ns.clone());
                sc.spawn(move || {
                    let (tx, rx) = std::sync::mpsc::channel();
                    let server = std::thread::spawn(move || {
                        in_netns(&to, || {
                            let listener = TcpListener::bind((server_ip, dport))?;
                            let _ = tx.send(());
                            let (mut conn, _) = listener.accept()?;
                            conn.set_read_timeout(Some(UP))?;
                            let mut buf = vec![0u8; 1 << 16];
                            let mut got = 0u64;
                            loop {
                                let n = conn.read(&mut buf)?;
                                if n == 0 {
                                    return Ok(got);
                                }
                                got += n as u64;
                            }
                        })
                    });
                    rx.recv_timeout(UP).expect("server listening");
                    let sent = in_netns(&from, || {
                        let mut s = connect_from(
                            SocketAddr::from((client_ip, sport)),
                            SocketAddr::from((server_ip, dport)),
                        )?;
                        s.set_write_timeout(Some(UP))?;
                        let buf = vec![7u8; 1 << 16];
                        let end = Instant::now() + secs;
                        let mut sent = 0u64;
                        while Instant::now() < end {
                            s.write_all(&buf)?;
                            sent += buf.len() as u64;
                        }
                        s.shutdown(std::net::Shutdown::Write)?;
                        Ok(sent)
                    })
                    .unwrap();
                    (sent, server.join().expect("server thread").unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (sent, got) in &results {
        assert_eq!(sent, got, "a transfer arrived whole");
        assert!(*sent > 10 << 20, "a heavy flow: {sent} bytes");
    }
    if workers < 2 {
        eprintln!("one worker per node here: nothing to spread (buckets {flows:?})");
        return;
    }
    for node in [1, 2] {
        let log = rig.twilld_log(node);
        assert!(
            log.contains("udp steering table rebalanced"),
            "node {node} did not spread flows {flows:?}:\n{log}"
        );
    }
}
