//! Unit and property tests of the packet core.

use super::csum::{fix_ipv4_checksum, get_u16, get_u32, len_u16, set_u16, set_u32};
use super::route::mask;
use super::*;
use ipnet::Ipv4Net;
use std::net::{Ipv4Addr, SocketAddrV4};

use crate::overlay::lease::Lease;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SRC: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const DST: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 3);
const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 12);
const ME: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);

/// The reference checksum: RFC 1071 word by word.
fn naive_sum(data: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        s += u32::from(w);
        s = (s & 0xffff) + (s >> 16);
    }
    u16::try_from(s).unwrap()
}

fn table() -> RouteTable {
    RouteTable::new(
        Some("10.244.1.0/24".parse().unwrap()),
        8285,
        [
            ("10.244.2.0/24".parse().unwrap(), PEER),
            (
                "10.244.3.0/24".parse().unwrap(),
                Ipv4Addr::new(198, 18, 0, 13),
            ),
        ],
    )
}

/// The receiving node's view: own 10.244.2.0/24, peer ME.
fn rx_table() -> RouteTable {
    RouteTable::new(
        Some("10.244.2.0/24".parse().unwrap()),
        8285,
        [("10.244.1.0/24".parse().unwrap(), ME)],
    )
}

/// `total` zero bytes from SRC to DST behind a valid IPv4 header: protocol `proto`, TTL 64,
/// identification `id`, flags and fragment offset `frag`.
fn ipv4_packet(total: usize, proto: u8, id: u16, frag: u16) -> Vec<u8> {
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    set_u16(&mut p, 2, len_u16(total));
    set_u16(&mut p, 4, id);
    set_u16(&mut p, 6, frag);
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&SRC.octets());
    p[16..20].copy_from_slice(&DST.octets());
    fix_ipv4_checksum(&mut p[..20]);
    p
}

/// An IPv4 header + TCP header (with a 12-byte timestamp option) + payload, checksums valid.
fn tcp_packet(seq: u32, flags: u8, payload: &[u8], id: u16) -> Vec<u8> {
    let thl = 32;
    let total = 20 + thl + payload.len();
    let mut p = ipv4_packet(total, PROTO_TCP, id, 0x4000);
    set_u16(&mut p, 20, 40000);
    set_u16(&mut p, 22, 5201);
    set_u32(&mut p, 24, seq);
    set_u32(&mut p, 28, 777);
    p[32] = (u8::try_from(thl).unwrap() / 4) << 4;
    p[33] = flags;
    set_u16(&mut p, 34, 500);
    p[40..52].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
    p[52..].copy_from_slice(payload);
    let c = Csum::default()
        .pseudo_v4(SRC.octets(), DST.octets(), PROTO_TCP, len_u16(total - 20))
        .add_bytes(&p[20..])
        .finish();
    set_u16(&mut p, 36, c);
    p
}

fn udp_packet(payload: &[u8]) -> Vec<u8> {
    let total = 28 + payload.len();
    let mut p = ipv4_packet(total, PROTO_UDP, 0, 0);
    set_u16(&mut p, 20, 4444);
    set_u16(&mut p, 22, 5555);
    set_u16(&mut p, 24, len_u16(total - 20));
    p[28..].copy_from_slice(payload);
    p
}

/// A super-packet as the TUN hands it over: virtio-net header, partial TCP checksum.
fn tso_input(payload: &[u8], mss: u16, flags: u8) -> Vec<u8> {
    let p = tcp_packet(1000, flags, payload, 7);
    from_tun(p, PROTO_TCP, 16, Some((VnetHdr::GSO_TCPV4, 52, mss)))
}

/// `p` (SRC to DST, protocol `proto`) as the TUN hands it over: the pseudo-header sum in its
/// checksum field (`csum_offset` into the transport header), behind a virtio-net header asking
/// for the checksum and for `gso` (type, header length, segment size; `None`: one packet).
fn from_tun(mut p: Vec<u8>, proto: u8, csum_offset: u16, gso: Option<(u8, u16, u16)>) -> Vec<u8> {
    let partial = Csum::default()
        .pseudo_v4(SRC.octets(), DST.octets(), proto, len_u16(p.len() - 20))
        .fold();
    set_u16(&mut p, 20 + usize::from(csum_offset), partial);
    let (gso_type, hdr_len, gso_size) = gso.unwrap_or_default();
    let mut input = vec![0u8; VNET_HDR_LEN];
    VnetHdr {
        flags: VnetHdr::F_NEEDS_CSUM,
        gso_type,
        hdr_len,
        gso_size,
        csum_start: 20,
        csum_offset,
    }
    .write(&mut input);
    input.extend_from_slice(&p);
    input
}

fn valid_tcp(p: &[u8]) -> bool {
    let ip = parse_ipv4(p).unwrap();
    ip.total == p.len()
        && ipv4_header_checksum(&p[..20]) == 0
        && Csum::default()
            .pseudo_v4(
                ip.src.octets(),
                ip.dst.octets(),
                PROTO_TCP,
                len_u16(p.len() - 20),
            )
            .add_bytes(&p[20..])
            .finish()
            == 0
}

#[test]
fn checksum_matches_rfc1071_reference() {
    let mut rng = StdRng::seed_from_u64(1);
    for len in 0..300 {
        let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        assert_eq!(
            Csum::default().add_bytes(&data).fold(),
            naive_sum(&data),
            "{len}"
        );
    }
    // Split at even offsets, the sum is the same.
    let data: Vec<u8> = (0..999).map(|_| rng.random()).collect();
    for cut in (0..data.len()).step_by(2) {
        let s = Csum::default()
            .add_bytes(&data[..cut])
            .add_bytes(&data[cut..]);
        assert_eq!(s.fold(), naive_sum(&data));
    }
    // RFC 1071's example.
    let ex = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
    assert_eq!(Csum::default().add_bytes(&ex).fold(), 0xddf2);
}

#[test]
fn routing_lookup_longest_prefix_and_from_leases() {
    let t = RouteTable::new(
        Some("10.244.1.0/24".parse().unwrap()),
        8285,
        [
            ("10.244.0.0/16".parse().unwrap(), Ipv4Addr::new(1, 1, 1, 1)),
            ("10.244.2.0/24".parse().unwrap(), PEER),
            (
                "10.244.2.128/25".parse().unwrap(),
                Ipv4Addr::new(2, 2, 2, 2),
            ),
        ],
    );
    assert_eq!(
        t.lookup("10.244.2.3".parse().unwrap()),
        Some(SocketAddrV4::new(PEER, 8285))
    );
    assert_eq!(
        t.lookup("10.244.2.200".parse().unwrap()).unwrap().ip(),
        &Ipv4Addr::new(2, 2, 2, 2)
    );
    assert_eq!(
        t.lookup("10.244.9.9".parse().unwrap()).unwrap().ip(),
        &Ipv4Addr::new(1, 1, 1, 1)
    );
    assert_eq!(t.lookup("10.245.0.1".parse().unwrap()), None);
    assert!(t.is_local("10.244.1.77".parse().unwrap()));
    assert!(!t.is_local("10.244.2.77".parse().unwrap()));
    assert!(t.is_peer(PEER) && !t.is_peer(ME));

    let lease = |sn: &str, ip: &str, kind: &str| Lease {
        subnets: crate::overlay::lease::LeaseSubnets {
            v4: Some(sn.parse().unwrap()),
            v6: None,
        },
        attrs: crate::overlay::lease::LeaseAttrs {
            public_ip: Some(ip.parse().unwrap()),
            public_ipv6: None,
            backend_type: kind.into(),
            backend_data: None,
            backend_v6_data: None,
            node_id: None,
        },
        expires: None,
    };
    let own: Ipv4Net = "10.244.1.0/24".parse().unwrap();
    let t = RouteTable::from_leases(
        Some(own),
        9999,
        &[
            lease("10.244.1.0/24", "198.18.0.11", "udp"),
            lease("10.244.2.0/24", "198.18.0.12", "udp"),
            lease("10.244.3.0/24", "198.18.0.13", "vxlan"),
        ],
    );
    assert_eq!(t.len(), 1);
    assert_eq!(
        t.lookup("10.244.2.1".parse().unwrap()),
        Some("198.18.0.12:9999".parse().unwrap())
    );
    assert_eq!(t.lookup("10.244.1.1".parse().unwrap()), None, "own subnet");
    assert_eq!(
        t.lookup("10.244.3.1".parse().unwrap()),
        None,
        "other backend"
    );
}

#[test]
fn routing_property_matches_linear_scan() {
    let mut rng = StdRng::seed_from_u64(2);
    for _ in 0..200 {
        let routes: Vec<(Ipv4Net, Ipv4Addr)> = (0..rng.random_range(0..20))
            .map(|_| {
                let len = rng.random_range(8..=30);
                let net = Ipv4Net::new(Ipv4Addr::from(rng.random::<u32>() | 0x0a00_0000), len)
                    .unwrap()
                    .trunc();
                (net, Ipv4Addr::from(rng.random::<u32>()))
            })
            .collect();
        let t = RouteTable::new(None, 1, routes.clone());
        for _ in 0..50 {
            let ip = if let Some((n, _)) = routes.first()
                && rng.random_bool(0.5)
            {
                Ipv4Addr::from(
                    u32::from(n.network()) | (rng.random::<u32>() & !mask(n.prefix_len())),
                )
            } else {
                Ipv4Addr::from(rng.random::<u32>())
            };
            // Reference: longest matching prefix, the last inserted on ties.
            let want = routes
                .iter()
                .enumerate()
                .filter(|(_, (n, _))| n.contains(&ip))
                .max_by_key(|(i, (n, _))| (n.prefix_len(), *i))
                .map(|(_, (_, a))| SocketAddrV4::new(*a, 1));
            assert_eq!(t.lookup(ip), want, "{ip} in {routes:?}");
        }
    }
}

#[test]
fn plain_packet_is_sent_as_is_with_checksum_completed() {
    let t = table();
    let pkt = udp_packet(b"hello");
    let mut input = from_tun(pkt.clone(), PROTO_UDP, 6, None);
    let mut out = [0u8; 16];
    let e = encapsulate(&t, 1472, &mut input, &mut out);
    assert_eq!(
        e,
        Encap::Packet {
            dst: SocketAddrV4::new(PEER, 8285),
            flow: flow_of(&pkt, 20),
            start: VNET_HDR_LEN,
            len: pkt.len()
        }
    );
    let sent = &input[VNET_HDR_LEN..];
    let sum = Csum::default()
        .pseudo_v4(SRC.octets(), DST.octets(), PROTO_UDP, 13)
        .add_bytes(&sent[20..])
        .fold();
    assert_eq!(sum, 0xffff, "UDP checksum verifies");

    // Without NEEDS_CSUM the bytes go untouched.
    let mut input = vec![0u8; VNET_HDR_LEN];
    input.extend_from_slice(&pkt);
    assert!(matches!(
        encapsulate(&t, 1472, &mut input, &mut out),
        Encap::Packet { .. }
    ));
    assert_eq!(&input[VNET_HDR_LEN..], &pkt[..]);
}

#[test]
fn drops_by_reason_on_encap() {
    let t = table();
    let mut out = [0u8; 16];
    let mut short = vec![0u8; 5];
    assert_eq!(
        encapsulate(&t, 1472, &mut short, &mut out),
        Encap::Drop(DropReason::Malformed)
    );
    let mut v6 = vec![0u8; VNET_HDR_LEN + 40];
    v6[VNET_HDR_LEN] = 0x60;
    assert_eq!(
        encapsulate(&t, 1472, &mut v6, &mut out),
        Encap::Drop(DropReason::Unsupported)
    );
    let mut input = vec![0u8; VNET_HDR_LEN];
    let mut p = udp_packet(b"x");
    p[16..20].copy_from_slice(&[10, 244, 9, 9]);
    input.extend_from_slice(&p);
    assert_eq!(
        encapsulate(&t, 1472, &mut input, &mut out),
        Encap::Drop(DropReason::NoRoute)
    );
    let mut input = vec![0u8; VNET_HDR_LEN];
    input.extend_from_slice(&udp_packet(&[0; 1500]));
    assert_eq!(
        encapsulate(&t, 1472, &mut input, &mut out),
        Encap::Drop(DropReason::TooBig)
    );
    let mut input = tso_input(&[0; 3000], 1420, TCP_ACK);
    assert_eq!(
        encapsulate(&t, 1400, &mut input, &mut [0u8; 8000]),
        Encap::Drop(DropReason::TooBig)
    );
    let mut input = tso_input(&[0; 3000], 1420, TCP_ACK);
    input[1] = 42; // an unknown GSO type
    assert_eq!(
        encapsulate(&t, 1472, &mut input, &mut [0u8; 8000]),
        Encap::Drop(DropReason::Unsupported)
    );
}

fn payload(rng: &mut StdRng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.random()).collect()
}

/// The packets of a train as whole datagrams, as the kernel gathers them.
fn joined(t: &Train, out: &[u8], input: &[u8]) -> Vec<Vec<u8>> {
    t.pieces(out, input).map(|(h, p)| [h, p].concat()).collect()
}

#[test]
fn tso_segmentation_property() {
    let t = table();
    let mut rng = StdRng::seed_from_u64(3);
    let mut out = vec![0u8; 256 * 1024];
    for round in 0..300 {
        let mss: u16 = if round % 3 == 0 {
            1420
        } else {
            rng.random_range(48..=1420)
        };
        let n = rng.random_range(1..=65_535 - 52);
        let data = payload(&mut rng, n);
        let flags = [
            TCP_ACK | TCP_PSH,
            TCP_ACK | TCP_PSH | TCP_FIN,
            TCP_ACK | TCP_CWR,
        ][round % 3];
        let mut input = tso_input(&data, mss, flags);
        let e = encapsulate(&t, 1472, &mut input, &mut out);
        let Encap::Segments(train) = e else {
            panic!("{e:?}");
        };
        let count = train.count;
        assert_eq!(train.dst, SocketAddrV4::new(PEER, 8285));
        assert_eq!(train.seg(), 52 + usize::from(mss));
        assert_eq!(count, n.div_ceil(usize::from(mss)));
        assert_eq!(train.headers_len(), count * 52);
        let pkts = joined(&train, &out, &input);
        let mut all = Vec::new();
        for (i, p) in pkts.iter().enumerate() {
            let want = if i + 1 == count {
                52 + n - i * usize::from(mss)
            } else {
                train.seg()
            };
            assert_eq!(p.len(), want);
            assert!(valid_tcp(p), "segment {i} of {count}");
            assert_eq!(get_u16(p, 4), 7u16.wrapping_add(u16::try_from(i).unwrap()));
            assert_eq!(
                get_u32(p, 24),
                1000 + u32::try_from(i * usize::from(mss)).unwrap()
            );
            let last = i + 1 == count;
            assert_eq!(p[33] & TCP_PSH != 0, last && flags & TCP_PSH != 0);
            assert_eq!(p[33] & TCP_FIN != 0, last && flags & TCP_FIN != 0);
            assert_eq!(p[33] & TCP_CWR != 0, i == 0 && flags & TCP_CWR != 0);
            assert_eq!(&p[40..52], &[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
            all.extend_from_slice(&p[52..]);
        }
        assert_eq!(all, data);
        // Batched, the train is cut only where the kernel's limits say.
        let mut b = Batcher::new();
        for p in &pkts {
            b.push(train.dst, train.flow, p.len());
        }
        let lens: Vec<_> = pkts
            .iter()
            .map(|p| (train.dst, train.flow, p.len()))
            .collect();
        check_sends(&b, &lens);
    }
}

/// A packet as the batcher sees it: peer, flow, length.
type Out = (SocketAddrV4, Flow, usize);

/// Checks the sends of a batch against the packets pushed: in order, each within the
/// kernel's limits, all but its last packet of its segment size, one peer and flow each, and
/// greedy (the packet after a send could not have joined it).
fn check_sends(b: &Batcher, packets: &[Out]) {
    let mut next = 0;
    for s in b.sends() {
        assert_eq!(s.first, next, "in order, none skipped");
        let ps = &packets[s.first..s.first + s.count];
        assert!(s.count >= 1 && s.count <= GSO_MAX_SEGMENTS);
        assert!(s.bytes <= MAX_UDP_PAYLOAD.max(s.seg));
        assert_eq!(s.bytes, ps.iter().map(|p| p.2).sum::<usize>());
        assert!(ps.iter().all(|p| p.0 == s.dst && p.1 == s.flow));
        assert!(ps[..s.count - 1].iter().all(|p| p.2 == s.seg));
        assert!(ps[s.count - 1].2 <= s.seg);
        assert_eq!(s.gso().is_some(), s.count > 1);
        next += s.count;
        if let Some(&(dst, flow, len)) = packets.get(next) {
            assert!(
                dst != s.dst
                    || flow != s.flow
                    || len > s.seg
                    || s.bytes != s.count * s.seg
                    || s.count == GSO_MAX_SEGMENTS
                    || s.bytes + len > MAX_UDP_PAYLOAD,
                "{s:?} could take {len} more bytes"
            );
        }
    }
    assert_eq!(next, packets.len());
    assert_eq!(b.packets(), packets.len());
}

fn push_all(b: &mut Batcher, pkts: &[Out]) {
    for p in pkts {
        b.push(p.0, p.1, p.2);
    }
}

#[test]
fn batcher_packs_trains_across_super_packets_and_acks() {
    let a = SocketAddrV4::new(PEER, 8285);
    let c = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 13), 8285);
    let (one, two) = ((1, 2, 3), (1, 2, 4));
    // Three super-packets of 46 full segments: 138 packets in sends of 44.
    let mut b = Batcher::new();
    let pkts: Vec<Out> = (0..138).map(|_| (a, one, 1472)).collect();
    push_all(&mut b, &pkts);
    check_sends(&b, &pkts);
    let counts: Vec<usize> = b.sends().iter().map(|s| s.count).collect();
    assert_eq!(counts, [44, 44, 44, 6]);
    // ACKs of one flow to one peer: one send; a short packet closes a send; another peer or
    // another flow starts one.
    b.clear();
    let pkts = [
        (a, one, 52),
        (a, one, 52),
        (a, one, 52),
        (a, one, 40),
        (a, one, 52),
        (a, two, 52),
        (c, two, 52),
        (c, two, 1472),
        (a, one, 60),
    ];
    push_all(&mut b, &pkts);
    check_sends(&b, &pkts);
    let counts: Vec<usize> = b.sends().iter().map(|s| s.count).collect();
    assert_eq!(counts, [4, 1, 1, 1, 1, 1]);
}

#[test]
fn batcher_property() {
    let mut rng = StdRng::seed_from_u64(6);
    let peers = [
        SocketAddrV4::new(PEER, 8285),
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 13), 8285),
    ];
    for _ in 0..500 {
        let mut b = Batcher::new();
        let n = rng.random_range(0..300);
        let pkts: Vec<Out> = (0..n)
            .map(|_| {
                let len = match rng.random_range(0..4) {
                    0 => 1472,
                    1 => 52,
                    2 => rng.random_range(1..=1472),
                    _ => rng.random_range(1..=MAX_UDP_PAYLOAD),
                };
                let flow = (1, 2, u32::from(rng.random_bool(0.2)));
                (peers[usize::from(rng.random_bool(0.1))], flow, len)
            })
            .collect();
        push_all(&mut b, &pkts);
        check_sends(&b, &pkts);
    }
}

#[test]
fn steering_moves_a_heavy_bucket_off_a_shared_worker_and_nothing_else() {
    let t = default_table(2);
    assert_eq!(&t[..4], &[0, 1, 0, 1]);
    assert_eq!(default_table(1), [0; STEER_BUCKETS]);
    // Two heavy flows in buckets 2 and 4, both on worker 0; a little elsewhere.
    let mut load = [0u64; STEER_BUCKETS];
    load[2] = 600 << 20;
    load[4] = 500 << 20;
    load[7] = 3 << 20;
    let moved = rebalance(&load, &t, 2).expect("a move pays off");
    let on = |tb: &SteerTable, w: u8| -> u64 {
        (0..STEER_BUCKETS)
            .filter(|&b| tb[b] == w)
            .map(|b| load[b])
            .sum()
    };
    assert_ne!(moved[2], moved[4], "the two heavy flows split");
    assert!(on(&moved, 0).max(on(&moved, 1)) <= 603 << 20);
    // Balanced now: nothing more to do, and the result is stable.
    assert_eq!(rebalance(&load, &moved, 2), None);
    // One elephant alone: moving it would only move the problem.
    let mut one = [0u64; STEER_BUCKETS];
    one[2] = 900 << 20;
    assert_eq!(rebalance(&one, &t, 2), None);
    // An idle node is left alone; a single worker has nothing to balance.
    let mut idle = [0u64; STEER_BUCKETS];
    idle[2] = 1000;
    idle[4] = 1000;
    assert_eq!(rebalance(&idle, &t, 2), None);
    assert_eq!(rebalance(&load, &default_table(1), 1), None);
}

#[test]
fn steering_property() {
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..300 {
        let workers = rng.random_range(1..=8);
        let mut load = [0u64; STEER_BUCKETS];
        for l in &mut load {
            if rng.random_bool(0.3) {
                *l = rng.random_range(0..1u64 << 32);
            }
        }
        let mut t = default_table(workers);
        for _ in 0..3 {
            let per = |tb: &SteerTable| {
                let mut v = vec![0u64; workers];
                for b in 0..STEER_BUCKETS {
                    v[usize::from(tb[b])] += load[b];
                }
                v
            };
            let before = per(&t).into_iter().max().unwrap();
            match rebalance(&load, &t, workers) {
                Some(next) => {
                    assert!(next.iter().all(|w| usize::from(*w) < workers));
                    let after = per(&next).into_iter().max().unwrap();
                    assert!(after < before, "a rebalance lowers the busiest load");
                    t = next;
                }
                None => break,
            }
        }
    }
    // The hash is symmetric: a flow and its replies share a bucket.
    for _ in 0..1000 {
        let (a, b, p, q): (u32, u32, u16, u16) = rng.random();
        let fwd = (a, b, u32::from(p) << 16 | u32::from(q));
        let rev = (b, a, u32::from(q) << 16 | u32::from(p));
        assert_eq!(bucket(fwd), bucket(rev));
    }
}

#[test]
fn tso_needs_space_then_fits() {
    let t = table();
    let mut input = tso_input(&[7; 10_000], 1000, TCP_ACK);
    let mut small = [0u8; 500];
    let Encap::NeedSpace(n) = encapsulate(&t, 1472, &mut input, &mut small) else {
        panic!()
    };
    assert_eq!(n, 10 * 52, "headers only: payloads stay in the input");
    let mut big = vec![0u8; n];
    assert!(matches!(
        encapsulate(&t, 1472, &mut input, &mut big),
        Encap::Segments(Train { count: 10, .. })
    ));
}

#[test]
fn uso_segmentation() {
    let t = table();
    let mut rng = StdRng::seed_from_u64(4);
    let data = payload(&mut rng, 5000);
    let gso = Some((VnetHdr::GSO_UDP_L4, 28, 1200));
    let mut input = from_tun(udp_packet(&data), PROTO_UDP, 6, gso);
    let mut out = vec![0u8; 16_384];
    let Encap::Segments(train) = encapsulate(&t, 1472, &mut input, &mut out) else {
        panic!()
    };
    assert_eq!((train.seg(), train.count), (1228, 5));
    let mut all = Vec::new();
    for s in joined(&train, &out, &input) {
        assert_eq!(ipv4_header_checksum(&s[..20]), 0);
        assert_eq!(usize::from(get_u16(&s, 24)), s.len() - 20);
        let sum = Csum::default()
            .pseudo_v4(SRC.octets(), DST.octets(), PROTO_UDP, len_u16(s.len() - 20))
            .add_bytes(&s[20..])
            .fold();
        assert_eq!(sum, 0xffff);
        all.extend_from_slice(&s[28..]);
    }
    assert_eq!(all, data);
}

#[test]
fn decap_checks_peer_destination_and_framing() {
    let t = rx_table();
    let p = tcp_packet(1, TCP_ACK, b"abc", 1);
    assert!(decapsulate(&t, ME, &p).is_ok());
    assert_eq!(decapsulate(&t, PEER, &p), Err(DropReason::UnknownPeer));
    assert_eq!(decapsulate(&t, ME, &p[..10]), Err(DropReason::Malformed));
    let mut padded = p.clone();
    padded.push(0);
    assert_eq!(decapsulate(&t, ME, &padded), Err(DropReason::Malformed));
    let mut badsum = p.clone();
    badsum[10] ^= 1;
    assert_eq!(decapsulate(&t, ME, &badsum), Err(DropReason::Malformed));
    let mut elsewhere = p.clone();
    elsewhere[18] = 9;
    fix_ipv4_checksum(&mut elsewhere[..20]);
    assert_eq!(decapsulate(&t, ME, &elsewhere), Err(DropReason::NotLocal));
    let mut dead = p.clone();
    dead[8] = 0;
    fix_ipv4_checksum(&mut dead[..20]);
    assert_eq!(decapsulate(&t, ME, &dead), Err(DropReason::Ttl));
    assert_eq!(
        decapsulate(&t, ME, b"\x01garbage garbage garbage"),
        Err(DropReason::Malformed)
    );
    // An IPv6 packet (or anything starting with 0x6_): not carried.
    assert_eq!(
        decapsulate(&t, ME, b"garbage garbage garbage"),
        Err(DropReason::Unsupported)
    );
    assert_eq!(split_datagrams(&[0; 10], Some(4)).count(), 3);
    assert_eq!(split_datagrams(&[0; 10], None).count(), 1);
    assert_eq!(split_datagrams(&[], None).count(), 0);
}

/// Everything written for a batch, as whole packets: (virtio-net header, packet bytes).
fn writes(g: &Gro<'_>) -> Vec<(VnetHdr, Vec<u8>)> {
    let mut v = Vec::new();
    g.for_each_write(|head, body| {
        let h = VnetHdr::parse(head).unwrap();
        let mut p = head[VNET_HDR_LEN..].to_vec();
        for b in body {
            p.extend_from_slice(b);
        }
        v.push((h, p));
    });
    v
}

/// What the kernel does with a GSO write: cut it into segments with full checksums.
fn kernel_segment(h: VnetHdr, p: &[u8]) -> Vec<Vec<u8>> {
    if h.gso_type == VnetHdr::GSO_NONE {
        return vec![p.to_vec()];
    }
    let mut input = vec![0u8; VNET_HDR_LEN];
    h.write(&mut input);
    input.extend_from_slice(p);
    let mut out = vec![0u8; 256 * 1024];
    let t = table();
    let Encap::Segments(train) = encapsulate(&t, 65_535, &mut input, &mut out) else {
        panic!()
    };
    joined(&train, &out, &input)
}

#[test]
fn gro_round_trip_property() {
    // Segment a super-packet, coalesce the segments, segment again: the same packets.
    let tx = table();
    let rx = rx_table();
    let mut rng = StdRng::seed_from_u64(5);
    let mut out = vec![0u8; 256 * 1024];
    for _ in 0..200 {
        let mss: u16 = rng.random_range(100..=1420);
        let size = rng.random_range(1..=60_000);
        let data = payload(&mut rng, size);
        let mut input = tso_input(&data, mss, TCP_ACK | TCP_PSH);
        let Encap::Segments(train) = encapsulate(&tx, 1472, &mut input, &mut out) else {
            panic!()
        };
        let count = train.count;
        let segs = joined(&train, &out, &input);
        let mut gro = Gro::new();
        for one in &segs {
            let ip = decapsulate(&rx, ME, one).unwrap();
            gro.push(one, &ip);
        }
        assert_eq!(gro.len(), 1, "one train, one write");
        let written = writes(&gro);
        let (hdr, pkt) = &written[0];
        if count == 1 {
            assert_eq!(hdr.gso_type, VnetHdr::GSO_NONE);
        } else {
            assert_eq!(hdr.gso_type, VnetHdr::GSO_TCPV4);
            assert_eq!(hdr.gso_size, mss);
            assert_eq!(pkt.len(), 52 + size);
        }
        let again = kernel_segment(*hdr, pkt);
        assert_eq!(again.len(), segs.len());
        assert_eq!(again, segs);
    }
}

#[test]
fn gro_keeps_order_and_refuses_what_does_not_fit() {
    let rx = rx_table();
    let first = tcp_packet(100, TCP_ACK, &[1; 100], 1);
    let second = tcp_packet(200, TCP_ACK, &[2; 100], 2);
    let gap = tcp_packet(400, TCP_ACK, &[3; 100], 3);
    let pure_ack = tcp_packet(500, TCP_ACK, &[], 4);
    let short1 = tcp_packet(500, TCP_ACK, &[4; 50], 5);
    let short2 = tcp_packet(550, TCP_ACK, &[5; 50], 6); // merges: short1 set the segment size
    let mut bad = tcp_packet(600, TCP_ACK, &[6; 50], 7);
    bad[60] ^= 0xff; // payload corrupted: checksum fails
    let syn = tcp_packet(650, 0x02, &[], 8);
    let pkts = [
        &first, &second, &gap, &pure_ack, &short1, &short2, &bad, &syn,
    ];
    let mut gro = Gro::new();
    for pkt in pkts {
        let ip = decapsulate(&rx, ME, pkt).unwrap();
        gro.push(pkt, &ip);
    }
    let written = writes(&gro);
    let seqs: Vec<(u32, usize, u8)> = written
        .iter()
        .map(|(hdr, pkt)| (get_u32(pkt, 24), pkt.len() - 52, hdr.gso_type))
        .collect();
    assert_eq!(
        seqs,
        vec![
            (100, 200, VnetHdr::GSO_TCPV4),
            (400, 100, VnetHdr::GSO_NONE),
            (500, 0, VnetHdr::GSO_NONE),
            (500, 100, VnetHdr::GSO_TCPV4),
            (600, 50, VnetHdr::GSO_NONE),
            (650, 0, VnetHdr::GSO_NONE),
        ]
    );
    // The merged head is a valid IPv4 header with a partial TCP checksum.
    let (hdr, pkt) = &written[0];
    assert_eq!(ipv4_header_checksum(&pkt[..20]), 0);
    assert_eq!(usize::from(get_u16(pkt, 2)), pkt.len());
    assert_eq!(
        (hdr.csum_start, hdr.csum_offset, hdr.gso_size),
        (20, 16, 100)
    );
    let fixed = kernel_segment(*hdr, pkt);
    assert_eq!(fixed, vec![first.clone(), second.clone()]);
}

#[test]
fn gro_interleaved_flows_and_other_protocols() {
    let rt = rx_table();
    let a1 = tcp_packet(0, TCP_ACK, &[1; 64], 1);
    let mut b1 = tcp_packet(0, TCP_ACK, &[2; 64], 1);
    // Flow b: another source port.
    set_u16(&mut b1, 20, 40001);
    set_u16(&mut b1, 36, 0);
    let c = Csum::default()
        .pseudo_v4(
            SRC.octets(),
            DST.octets(),
            PROTO_TCP,
            len_u16(b1.len() - 20),
        )
        .add_bytes(&b1[20..])
        .finish();
    set_u16(&mut b1, 36, c);
    let a2 = tcp_packet(64, TCP_ACK | TCP_PSH, &[3; 64], 2);
    let mut u = udp_packet(b"dns");
    u[16..20].copy_from_slice(&DST.octets());
    let mut g = Gro::new();
    for p in [&a1, &b1, &u, &a2] {
        let ip = decapsulate(&rt, ME, p).unwrap();
        g.push(p, &ip);
    }
    let w = writes(&g);
    assert_eq!(w.len(), 3);
    assert_eq!(w[0].1.len(), 52 + 128);
    assert!(
        w[0].1[33] & TCP_PSH != 0,
        "PSH of the last merged segment kept"
    );
    assert_eq!(w[1].1, b1);
    assert_eq!(w[2].1, u);
}
