//! A worker's turns driven through the fake edge: what a packet read from the TUN becomes on
//! the socket, what a datagram received becomes on the TUN, and what is dropped and counted.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;

use super::super::core::{DropReason, RouteTable, VNET_HDR_LEN, ipv4_header_checksum};
use super::super::edge::fake::{FakeSocket, FakeTun, Sent};
use super::{Local, Rx, Shared, Stats, Totals, Tx, sum};

const PORT: u16 = 8285;
/// This node's pod and one of the peer's.
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const PEER_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 3);
/// The peer's public address.
const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 12);

/// This node: own 10.244.1.0/24, one peer owning 10.244.2.0/24.
fn shared() -> Shared {
    let table = RouteTable::new(
        Some("10.244.1.0/24".parse().unwrap()),
        PORT,
        [("10.244.2.0/24".parse().unwrap(), PEER)],
    );
    Shared {
        table: Arc::new(ArcSwap::from_pointee(table)),
        stop: AtomicBool::new(false),
        wake: -1,
        broken: AtomicBool::new(false),
        max_packet: 1472,
    }
}

/// An IPv4 UDP packet `src` → `dst` with `payload`, header checksum valid (UDP checksum 0).
fn udp(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 28 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&u16::try_from(total).unwrap().to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = ipv4_header_checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    assert_eq!(ipv4_header_checksum(&p[..20]), 0, "header checksum");
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5201u16.to_be_bytes());
    p[24..26].copy_from_slice(&u16::try_from(8 + payload.len()).unwrap().to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

/// `pkt` as the TUN hands it over: behind a virtio-net header without offloads.
fn from_tun(pkt: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; VNET_HDR_LEN];
    v.extend_from_slice(pkt);
    v
}

/// What `local` counted, flushed and summed.
fn totals(local: &mut Local) -> Totals {
    let stats = Stats::default();
    local.flush(&stats);
    sum(std::slice::from_ref(&stats))
}

/// Drop counts of one drop, for `reason`.
fn only_drop(reason: DropReason) -> [u64; DropReason::ALL.len()] {
    let mut drops = [0; DropReason::ALL.len()];
    drops[reason.index()] = 1;
    drops
}

#[test]
fn tx_turn_sends_to_the_owning_peer_and_counts_a_packet_without_route() {
    let shared = shared();
    let table = shared.table.load();
    let to_peer = udp(POD, PEER_POD, b"hello peer");
    let unrouted = udp(POD, Ipv4Addr::new(10, 244, 9, 9), b"nobody owns this");
    let tun = FakeTun::default();
    tun.input
        .borrow_mut()
        .extend([from_tun(&to_peer), from_tun(&unrouted)]);
    let mut tx = Tx::new(FakeSocket::default());
    let mut local = Local::default();

    let read = tx.turn(&shared, &table, &tun, &mut local);

    assert!(matches!(read, Ok(2)), "both packets read");
    assert!(tun.input.borrow().is_empty());
    assert_eq!(
        tx.sender.sent,
        [Sent {
            dst: SocketAddrV4::new(PEER, PORT),
            bytes: to_peer.clone(),
            gso: None,
        }],
        "one datagram, to the peer owning the destination, carrying the packet whole"
    );
    let t = totals(&mut local);
    assert_eq!(t.tun_reads, 2);
    assert_eq!(t.tx_packets, 1);
    assert_eq!(t.tx_bytes, to_peer.len() as u64);
    assert_eq!(
        t.drops,
        only_drop(DropReason::NoRoute),
        "the unrouted packet dropped as NoRoute, nothing else"
    );

    // A turn with nothing queued reads nothing and sends nothing.
    assert!(matches!(tx.turn(&shared, &table, &tun, &mut local), Ok(0)));
    assert_eq!(tx.sender.sent.len(), 1);
}

#[test]
fn rx_turn_writes_a_peers_datagram_to_the_tun_and_counts_an_unknown_sender() {
    let shared = shared();
    let table = shared.table.load();
    let from_peer = udp(PEER_POD, POD, b"hello pod");
    let stranger = udp(PEER_POD, POD, b"not from a peer");
    let mut sock = FakeSocket::default();
    sock.input.extend([
        (SocketAddrV4::new(PEER, PORT), from_peer.clone()),
        (
            SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 99), PORT),
            stranger,
        ),
    ]);
    let mut rx = Rx {
        recv: sock,
        iovs: Vec::new(),
    };
    let tun = FakeTun::default();
    let mut local = Local::default();

    let got = rx.turn(&table, &tun, &mut local);

    assert!(matches!(got, Ok(2)), "both datagrams received");
    let written = tun.written.borrow();
    assert_eq!(written.len(), 1, "only the peer's datagram reaches the TUN");
    assert_eq!(
        &written[0][VNET_HDR_LEN..],
        &from_peer[..],
        "the inner packet, whole, behind a virtio-net header"
    );
    let t = totals(&mut local);
    assert_eq!(t.rx_packets, 2);
    assert_eq!(t.tun_writes, 1);
    assert_eq!(
        t.drops,
        only_drop(DropReason::UnknownPeer),
        "the stranger's datagram dropped as UnknownPeer"
    );
    assert!(!shared.broken.load(Ordering::Relaxed));
}
