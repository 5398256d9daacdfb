//! The udp backend's packet core: every decision about a packet, and no I/O.
//!
//! Shaped like boringtun's `noise` module: functions from bytes to an *action* (send these bytes
//! to that peer, write these bytes to the TUN, drop for this reason), while the caller owns the
//! sockets, the TUN queues, the buffers and the threads. That keeps the part that can be wrong in
//! interesting ways (segmentation arithmetic, checksums, header parsing of attacker-controlled
//! datagrams) testable without root, property-testable and fuzzable, and keeps the edge a thin
//! loop of syscalls. Nothing here depends on time: the core keeps no timers (coalescing only
//! merges what one receive batch already holds), so no clock is passed in.
//!
//! # Wire format
//! flannel's: the UDP payload is one plain IPv4 packet, sent from the node's port (8285 by
//! default) to the peer's `PublicIP` and the same port. No header of our own, no version byte:
//! a flannel node and a twill node exchange traffic as they are.
//!
//! # Offloads, and why segmentation lives here
//! The TUN device is opened with `IFF_VNET_HDR` and `TUNSETOFFLOAD` (checksum, TSO4, USO), so the
//! kernel hands over TCP (and UDP-GSO) *super-packets* of up to 64 KiB with a virtio-net header
//! saying how to cut them ([`VnetHdr`]), and with the transport checksum left partial. The wire
//! format needs real packets, so [`encapsulate`] cuts a super-packet into a [`Train`] of MTU-sized
//! IPv4 packets with correct sequence numbers, IP ids, lengths and checksums: only the headers
//! are written (to a small buffer), the payloads stay where the TUN read put them, and the edge
//! gathers header, payload, header, payload... into one `sendmsg`. All packets but the last are
//! of one size, which is what UDP GSO (`UDP_SEGMENT`) wants: the kernel makes one datagram per
//! packet. [`Batcher`] packs consecutive packets to a peer into as few such sends as the kernel
//! allows, across super-packets.
//!
//! On the way in, the socket has `UDP_GRO`: one receive returns a train of datagrams of one size.
//! [`Gro`] re-assembles consecutive TCP segments of one flow into one super-packet (headers of
//! the first, payloads of all, a virtio-net header asking the kernel for GSO and a partial
//! checksum), so the TUN sees one write per train instead of one per 1.4 KiB packet. Payloads are
//! never copied to do this: [`Gro::for_each_write`] hands out a small rewritten head and the
//! payload slices, for one `writev`.
//!
//! # What is dropped (never a panic)
//! Every reason is a [`DropReason`], counted by the edge in `twill_udp_drops_total{reason}`:
//! a datagram that is not one well-formed IPv4 packet, a sender that is not a known peer, an
//! inner destination that is not this node's subnet, TTL 0, a destination with no peer, a
//! packet larger than the underlay can carry.

use std::collections::HashMap;
use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddrV4};

use ipnet::Ipv4Net;

use crate::overlay::lease::Lease;

/// Bytes of the virtio-net header in front of every packet on the TUN (`IFF_VNET_HDR`, the
/// 10-byte layout without `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;
/// Encapsulation overhead on an IPv4 underlay: outer IPv4 header (20) + UDP header (8).
pub const OVERHEAD: usize = 28;
/// The largest UDP payload one `sendmsg` may carry, GSO or not (IPv4 total length limit).
pub const MAX_UDP_PAYLOAD: usize = 65_535 - OVERHEAD;
/// Datagrams per UDP GSO send: the kernel's `UDP_MAX_SEGMENTS` (64 before Linux 6.10).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// The largest IPv4 packet.
pub const MAX_IP_LEN: usize = 65_535;
/// The largest head [`Gro::for_each_write`] produces: virtio-net header, IPv4 and TCP headers
/// with options.
pub const MAX_HEAD_LEN: usize = VNET_HDR_LEN + 60 + 60;

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;
/// IPv4 flags/fragment field: "more fragments" and the offset.
const IP_MF_OFFSET: u16 = 0x3fff;

/// Why a packet was dropped. `as_str` is the `reason` label in `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not one well-formed IPv4 packet (short, bad version/IHL/length/checksum, bad virtio-net
    /// header).
    Malformed,
    /// Well formed, but not something this backend carries (IPv6 inner packets, unknown GSO
    /// types).
    Unsupported,
    /// A datagram from an address that is no known peer.
    UnknownPeer,
    /// A packet for a destination no peer owns (its lease is gone, or never was).
    NoRoute,
    /// A datagram whose inner destination is not this node's subnet.
    NotLocal,
    /// A datagram whose inner TTL is 0.
    Ttl,
    /// A packet (or GSO segment) larger than the underlay can carry.
    TooBig,
    /// The kernel refused to send the datagram.
    SendError,
    /// The kernel refused the packet written to the TUN.
    TunError,
}

impl DropReason {
    /// Every reason, in a fixed order (an index per reason for counters).
    pub const ALL: [DropReason; 9] = [
        DropReason::Malformed,
        DropReason::Unsupported,
        DropReason::UnknownPeer,
        DropReason::NoRoute,
        DropReason::NotLocal,
        DropReason::Ttl,
        DropReason::TooBig,
        DropReason::SendError,
        DropReason::TunError,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Unsupported => "unsupported",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::NoRoute => "no_route",
            DropReason::NotLocal => "not_local",
            DropReason::Ttl => "ttl",
            DropReason::TooBig => "too_big",
            DropReason::SendError => "send_error",
            DropReason::TunError => "tun_error",
        }
    }

    /// Position in [`DropReason::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

// ---- checksums ------------------------------------------------------------------------------

/// A ones-complement (RFC 1071) running sum.
///
/// Bytes are added in native-endian 64-bit words with end-around carry (2^64 ≡ 1 mod 2^16-1, so
/// the wide sum folds to the same 16-bit sum); the byte order is fixed once, at [`Csum::fold`].
/// Every piece added must start at an even offset of the checksummed region.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Csum(u64);

fn add_carry(a: u64, b: u64) -> u64 {
    let (s, c) = a.overflowing_add(b);
    s + u64::from(c)
}

impl Csum {
    /// Adds `data` (starting at an even offset of the region).
    ///
    /// Four independent carry chains over 32-byte blocks: the adds of one block do not wait for
    /// each other, which roughly doubles the speed of a single chain (this sum is the one pass
    /// the data path makes over every payload byte it carries).
    #[must_use]
    pub fn add_bytes(self, data: &[u8]) -> Csum {
        let word =
            |c: &[u8], i: usize| u64::from_ne_bytes(c[i..i + 8].try_into().expect("8 bytes"));
        let (mut a, mut b, mut c, mut d) = (self.0, 0u64, 0u64, 0u64);
        let mut blocks = data.chunks_exact(32);
        for k in &mut blocks {
            a = add_carry(a, word(k, 0));
            b = add_carry(b, word(k, 8));
            c = add_carry(c, word(k, 16));
            d = add_carry(d, word(k, 24));
        }
        let rest = blocks.remainder();
        let mut tail = [0u8; 32];
        tail[..rest.len()].copy_from_slice(rest);
        a = add_carry(a, word(&tail, 0));
        b = add_carry(b, word(&tail, 8));
        c = add_carry(c, word(&tail, 16));
        d = add_carry(d, word(&tail, 24));
        Csum(add_carry(add_carry(a, b), add_carry(c, d)))
    }

    /// Adds another sum of a piece that starts at an even offset of the region.
    #[must_use]
    pub fn combine(self, other: Csum) -> Csum {
        Csum(add_carry(self.0, other.0))
    }

    /// The IPv4 pseudo-header of a transport segment of `len` bytes.
    #[must_use]
    pub fn pseudo_v4(self, src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> Csum {
        let l = len.to_be_bytes();
        self.add_bytes(&[
            src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3], 0, proto, l[0], l[1],
        ])
    }

    /// The folded 16-bit sum (not complemented), as a host integer of the big-endian word.
    pub fn fold(self) -> u16 {
        let mut s = self.0;
        s = (s & 0xffff_ffff) + (s >> 32);
        s = (s & 0xffff_ffff) + (s >> 32);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        let native = u16::try_from(s).expect("folded to 16 bits");
        // The words were read native-endian: on little-endian hosts the sum is byte-swapped.
        u16::from_be(native)
    }

    /// The checksum to store: the complemented fold.
    pub fn finish(self) -> u16 {
        !self.fold()
    }
}

/// The IPv4 header checksum of `hdr` (its checksum field included: 0 means valid when the field
/// holds the right value, so this both computes — with the field zeroed — and verifies).
pub fn ipv4_header_checksum(hdr: &[u8]) -> u16 {
    Csum::default().add_bytes(hdr).finish()
}

fn set_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[cfg(test)]
fn set_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn len_u16(n: usize) -> u16 {
    u16::try_from(n).expect("IPv4 lengths fit 16 bits")
}

/// Rewrites the IPv4 header checksum of `hdr` (the whole header, `ihl` bytes).
fn fix_ipv4_checksum(hdr: &mut [u8]) {
    set_u16(hdr, 10, 0);
    let c = ipv4_header_checksum(hdr);
    set_u16(hdr, 10, c);
}

// ---- virtio-net header ----------------------------------------------------------------------

/// The virtio-net header the TUN puts in front of each packet (`struct virtio_net_hdr`,
/// little-endian: the TUN uses the host's order and twill runs on little-endian hosts only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Length of the headers (advisory; the kernel fills it loosely, so it is not relied on).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts (the transport header), from the start of the IP header.
    pub csum_start: u16,
    /// Where, from `csum_start`, the checksum is stored.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// The transport checksum is partial: complete it from `csum_start` to the end.
    pub const F_NEEDS_CSUM: u8 = 1;
    /// Not a GSO packet.
    pub const GSO_NONE: u8 = 0;
    /// TCP over IPv4 super-packet.
    pub const GSO_TCPV4: u8 = 1;
    /// TCP over IPv6 super-packet.
    pub const GSO_TCPV6: u8 = 4;
    /// UDP segmentation (USO) super-packet.
    pub const GSO_UDP_L4: u8 = 5;
    /// Bit set with the TCP types when the super-packet carries CWR.
    pub const GSO_ECN: u8 = 0x80;

    /// Reads the header at the start of `b`.
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let b = b.get(..VNET_HDR_LEN)?;
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        })
    }

    /// Writes the header into the first [`VNET_HDR_LEN`] bytes of `out`.
    pub fn write(&self, out: &mut [u8]) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }
}

// ---- IPv4 -----------------------------------------------------------------------------------

/// The fields of an IPv4 header the core needs, after bounds checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Info {
    /// Header length in bytes.
    pub ihl: usize,
    /// Total length (header + payload) from the header.
    pub total: usize,
    /// Transport protocol.
    pub proto: u8,
    /// TTL.
    pub ttl: u8,
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
}

/// Parses the IPv4 header at the start of `pkt`: version 4 (6 is [`DropReason::Unsupported`]),
/// IHL ≥ 5 and within the buffer, total length between the header length and the buffer length.
pub fn parse_ipv4(pkt: &[u8]) -> Result<Ipv4Info, DropReason> {
    let first = *pkt.first().ok_or(DropReason::Malformed)?;
    match first >> 4 {
        4 => {}
        6 => return Err(DropReason::Unsupported),
        _ => return Err(DropReason::Malformed),
    }
    let ihl = usize::from(first & 0x0f) * 4;
    if ihl < 20 || pkt.len() < ihl {
        return Err(DropReason::Malformed);
    }
    let total = usize::from(get_u16(pkt, 2));
    if total < ihl || total > pkt.len() {
        return Err(DropReason::Malformed);
    }
    Ok(Ipv4Info {
        ihl,
        total,
        proto: pkt[9],
        ttl: pkt[8],
        src: Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]),
        dst: Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]),
    })
}

// ---- routing --------------------------------------------------------------------------------

/// Where packets go: peer subnet → peer `PublicIP:Port`, plus this node's own subnet (inner
/// destinations accepted from the wire) and the set of peer addresses (senders accepted).
///
/// Built whole from a lease snapshot and swapped in atomically by the edge; never mutated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    own: Option<Ipv4Net>,
    /// Per prefix length (longest first): masked network address → peer.
    by_len: Vec<(u8, HashMap<u32, SocketAddrV4>)>,
    peers: HashSet<Ipv4Addr>,
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl RouteTable {
    /// A table of `own` subnet and `(peer subnet, peer public address)` routes, all on `port`.
    /// A subnet listed twice keeps its last address.
    pub fn new(
        own: Option<Ipv4Net>,
        port: u16,
        routes: impl IntoIterator<Item = (Ipv4Net, Ipv4Addr)>,
    ) -> RouteTable {
        let mut t = RouteTable {
            own: own.map(|n| n.trunc()),
            ..RouteTable::default()
        };
        for (net, ip) in routes {
            let net = net.trunc();
            let len = net.prefix_len();
            let key = u32::from(net.network());
            let slot = t
                .by_len
                .iter()
                .position(|(l, _)| *l == len)
                .unwrap_or_else(|| {
                    t.by_len.push((len, HashMap::new()));
                    t.by_len.len() - 1
                });
            t.by_len[slot].1.insert(key, SocketAddrV4::new(ip, port));
            t.peers.insert(ip);
        }
        t.by_len.sort_by_key(|e| std::cmp::Reverse(e.0));
        t
    }

    /// The table for a lease snapshot: every udp lease other than `own` with an IPv4 subnet and a
    /// `PublicIP`; leases of other backends are ignored (as the overlay does).
    pub fn from_leases(own: Option<Ipv4Net>, port: u16, leases: &[Lease]) -> RouteTable {
        let routes = leases.iter().filter_map(|l| {
            let sn = l.subnets.v4?;
            let ip = l.attrs.public_ip?;
            (Some(sn) != own && l.attrs.backend_type == "udp").then_some((sn, ip))
        });
        RouteTable::new(own, port, routes)
    }

    /// The peer owning `dst` (longest prefix first).
    pub fn lookup(&self, dst: Ipv4Addr) -> Option<SocketAddrV4> {
        let d = u32::from(dst);
        self.by_len
            .iter()
            .find_map(|(len, m)| m.get(&(d & mask(*len))).copied())
    }

    /// Whether `ip` is a peer's public address.
    pub fn is_peer(&self, ip: Ipv4Addr) -> bool {
        self.peers.contains(&ip)
    }

    /// Whether `dst` lies in this node's subnet.
    pub fn is_local(&self, dst: Ipv4Addr) -> bool {
        self.own.is_some_and(|n| n.contains(&dst))
    }

    /// This node's subnet.
    pub fn own(&self) -> Option<Ipv4Net> {
        self.own
    }

    /// Number of peer routes.
    pub fn len(&self) -> usize {
        self.by_len.iter().map(|(_, m)| m.len()).sum()
    }

    /// Whether there is no peer route.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// ---- encapsulation (TUN → wire) -------------------------------------------------------------

/// What to do with one packet read from the TUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encap {
    /// Send `input[start..start + len]` (one IPv4 packet, checksums complete) to `dst`.
    Packet {
        /// The peer.
        dst: SocketAddrV4,
        /// Its flow.
        flow: Flow,
        /// Offset of the packet in the input.
        start: usize,
        /// Its length.
        len: usize,
    },
    /// Send the packets of a [`Train`]: their headers are in `out`, their payloads in `input`.
    Segments(Train),
    /// `out` is too small for the segments: send what is pending, then call again with at least
    /// this many bytes of `out`.
    NeedSpace(usize),
    /// Drop the packet.
    Drop(DropReason),
}

/// Turns one read from the TUN (`input`: virtio-net header + packet) into datagrams for a peer.
///
/// `max_packet` is the largest inner packet the underlay carries (uplink MTU − 28). Packets
/// without GSO are fixed in place (a partial checksum is completed) and sent from `input`;
/// super-packets are cut into a [`Train`]: a header per packet written to `out`, the payloads
/// left where they are in `input` (the edge gathers both with one `iovec` list, so the payload
/// bytes are copied once, by the kernel, on their way to the socket).
pub fn encapsulate(
    table: &RouteTable,
    max_packet: usize,
    input: &mut [u8],
    out: &mut [u8],
) -> Encap {
    match encap_inner(table, max_packet, input, out) {
        Ok(e) => e,
        Err(r) => Encap::Drop(r),
    }
}

fn encap_inner(
    table: &RouteTable,
    max_packet: usize,
    input: &mut [u8],
    out: &mut [u8],
) -> Result<Encap, DropReason> {
    let hdr = VnetHdr::parse(input).ok_or(DropReason::Malformed)?;
    let pkt = &mut input[VNET_HDR_LEN..];
    let ip = parse_ipv4(pkt)?;
    let dst = table.lookup(ip.dst).ok_or(DropReason::NoRoute)?;
    let pkt = &mut pkt[..ip.total];
    match hdr.gso_type & !VnetHdr::GSO_ECN {
        VnetHdr::GSO_NONE => {
            if ip.total > max_packet {
                return Err(DropReason::TooBig);
            }
            if hdr.flags & VnetHdr::F_NEEDS_CSUM != 0 {
                complete_checksum(pkt, &ip, hdr)?;
            }
            Ok(Encap::Packet {
                dst,
                flow: flow_of(pkt, ip.ihl),
                start: VNET_HDR_LEN,
                len: ip.total,
            })
        }
        VnetHdr::GSO_TCPV4 => segment(pkt, VNET_HDR_LEN, &ip, hdr, max_packet, out, dst, true),
        VnetHdr::GSO_UDP_L4 => segment(pkt, VNET_HDR_LEN, &ip, hdr, max_packet, out, dst, false),
        _ => Err(DropReason::Unsupported),
    }
}

/// Completes a partial transport checksum: the field holds the pseudo-header sum; the checksum
/// covers `csum_start..` to the end of the packet.
fn complete_checksum(pkt: &mut [u8], ip: &Ipv4Info, hdr: VnetHdr) -> Result<(), DropReason> {
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if start < ip.ihl || at + 2 > pkt.len() || start % 2 != 0 {
        return Err(DropReason::Malformed);
    }
    let mut c = Csum::default().add_bytes(&pkt[start..]).finish();
    if c == 0 && ip.proto == PROTO_UDP {
        c = 0xffff;
    }
    set_u16(pkt, at, c);
    Ok(())
}

/// The packets cut from one super-packet: `count` packets, each a `hl`-byte header (in the
/// `out` buffer given to [`encapsulate`], back to back) followed by up to `mss` payload bytes
/// (in the input, back to back from `payload`); every packet but the last carries exactly `mss`.
/// That is the layout UDP GSO wants: one send of a group of them, gathered header, payload,
/// header, payload..., gives one datagram per packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Train {
    /// The peer.
    pub dst: SocketAddrV4,
    /// The super-packet's flow.
    pub flow: Flow,
    /// Header bytes per packet (IPv4 + TCP or UDP).
    pub hl: usize,
    /// Payload bytes per packet (the last may carry fewer).
    pub mss: usize,
    /// Packets.
    pub count: usize,
    /// Offset of the first payload byte in the input.
    pub payload: usize,
    /// Payload bytes in all.
    pub payload_len: usize,
}

impl Train {
    /// Bytes of a full packet (every one but the last): the UDP GSO segment size.
    pub fn seg(&self) -> usize {
        self.hl + self.mss
    }

    /// Bytes of `out` holding the headers.
    pub fn headers_len(&self) -> usize {
        self.count * self.hl
    }

    /// Packet `i`: its header's range in `out` and its payload's range in the input.
    pub fn packet(&self, i: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let start = i * self.mss;
        let plen = self.mss.min(self.payload_len - start);
        (
            i * self.hl..(i + 1) * self.hl,
            self.payload + start..self.payload + start + plen,
        )
    }

    /// Every packet as (header, payload) slices of `out` and the input.
    pub fn pieces<'a>(
        &self,
        out: &'a [u8],
        input: &'a [u8],
    ) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + use<'a> {
        let t = *self;
        (0..t.count).map(move |i| {
            let (h, p) = t.packet(i);
            (&out[h], &input[p])
        })
    }
}

/// Cuts a TCP (`tcp`) or UDP super-packet into a [`Train`] of packets of `hl + gso_size` bytes:
/// headers into `out`, payloads left in `pkt` (at `base` in the caller's input).
///
/// Per packet only the fields that change are written (IP total length, id and checksum; TCP
/// sequence number, flags and checksum; UDP length and checksum), and the checksums are summed
/// incrementally: the headers' constant words once, the changing words per packet, the payload
/// once (the one pass over the payload bytes the sender makes).
#[expect(
    clippy::too_many_arguments,
    reason = "one call site; the facts of one super-packet"
)]
fn segment(
    pkt: &[u8],
    base: usize,
    ip: &Ipv4Info,
    hdr: VnetHdr,
    max_packet: usize,
    out: &mut [u8],
    dst: SocketAddrV4,
    tcp: bool,
) -> Result<Encap, DropReason> {
    let ihl = ip.ihl;
    let want_proto = if tcp { PROTO_TCP } else { PROTO_UDP };
    if ip.proto != want_proto || usize::from(hdr.csum_start) != ihl {
        return Err(DropReason::Malformed);
    }
    // The kernel never hands over a fragment as a super-packet.
    if get_u16(pkt, 6) & IP_MF_OFFSET != 0 {
        return Err(DropReason::Malformed);
    }
    let thl = if tcp {
        let b = *pkt.get(ihl + 12).ok_or(DropReason::Malformed)?;
        usize::from(b >> 4) * 4
    } else {
        8
    };
    let hl = ihl + thl;
    if thl < 8 || hl > ip.total || (tcp && thl < 20) {
        return Err(DropReason::Malformed);
    }
    let mss = usize::from(hdr.gso_size);
    if mss == 0 {
        return Err(DropReason::Malformed);
    }
    if hl + mss > max_packet {
        return Err(DropReason::TooBig);
    }
    let payload = ip.total - hl;
    let count = payload.div_ceil(mss).max(1);
    let need = count * hl;
    if need > out.len() {
        return Ok(Encap::NeedSpace(need));
    }
    // The header template: the first packet's headers with every changing field zeroed, and
    // the sums of its constant words.
    let mut tmpl = [0u8; 120];
    let tmpl = &mut tmpl[..hl];
    tmpl.copy_from_slice(&pkt[..hl]);
    for at in [2, 3, 4, 5, 10, 11] {
        tmpl[at] = 0; // total length, id, checksum
    }
    let id0 = get_u16(pkt, 4);
    let (seq0, flags0) = if tcp {
        (get_u32(pkt, ihl + 4), pkt[ihl + 13])
    } else {
        (0, 0)
    };
    let t = &mut tmpl[ihl..];
    if tcp {
        t[4..8].fill(0); // sequence number
        t[13] = 0; // flags
        t[16..18].fill(0); // checksum
    } else {
        t[4..8].fill(0); // length, checksum
    }
    let ip_sum = Csum::default().add_bytes(&tmpl[..ihl]);
    let l4_sum = Csum::default()
        .pseudo_v4(ip.src.octets(), ip.dst.octets(), want_proto, 0)
        .add_bytes(&tmpl[ihl..]);
    for i in 0..count {
        let start = i * mss;
        let plen = mss.min(payload - start);
        let data = &pkt[hl + start..hl + start + plen];
        let o = &mut out[i * hl..(i + 1) * hl];
        o.copy_from_slice(tmpl);
        let total = len_u16(hl + plen).to_be_bytes();
        let id = id0
            .wrapping_add(u16::try_from(i & 0xffff).expect("masked"))
            .to_be_bytes();
        o[2..4].copy_from_slice(&total);
        o[4..6].copy_from_slice(&id);
        let c = ip_sum
            .add_bytes(&[total[0], total[1], id[0], id[1]])
            .finish();
        set_u16(o, 10, c);
        let l4 = len_u16(thl + plen).to_be_bytes();
        let sum = if tcp {
            let seq = seq0
                .wrapping_add(u32::try_from(start).expect("below 64 KiB"))
                .to_be_bytes();
            let mut flags = flags0;
            if i + 1 != count {
                flags &= !(TCP_FIN | TCP_PSH);
            }
            if i != 0 {
                flags &= !TCP_CWR;
            }
            o[ihl + 4..ihl + 8].copy_from_slice(&seq);
            o[ihl + 13] = flags;
            // The pseudo-header's length, the sequence number, the flags (the low byte of the
            // data offset's word; the offset itself is in the template's sum).
            l4_sum.add_bytes(&[l4[0], l4[1], seq[0], seq[1], seq[2], seq[3], 0, flags])
        } else {
            o[ihl + 4..ihl + 6].copy_from_slice(&l4);
            // The length twice: in the pseudo-header and in the UDP header.
            l4_sum.add_bytes(&[l4[0], l4[1], l4[0], l4[1]])
        };
        let mut c = sum.combine(Csum::default().add_bytes(data)).finish();
        if c == 0 && !tcp {
            c = 0xffff;
        }
        set_u16(o, ihl + if tcp { 16 } else { 6 }, c);
    }
    Ok(Encap::Segments(Train {
        dst,
        flow: flow_of(pkt, ihl),
        hl,
        mss,
        count,
        payload: base + hl,
        payload_len: payload,
    }))
}

// ---- steering flows to workers -------------------------------------------------------------

/// Buckets of the steering table (an RSS indirection table): a flow's hash picks a bucket, the
/// table a worker.
pub const STEER_BUCKETS: usize = 32;
/// The steering table: worker index per bucket.
pub type SteerTable = [u8; STEER_BUCKETS];
/// A rebalance moves buckets only when the busiest worker's load drops to this fraction or less.
const REBALANCE_GAIN: f64 = 0.9;
/// ... and only when that worker moved at least this many bytes in the period (idle nodes are
/// left alone).
const REBALANCE_MIN_BYTES: u64 = 1 << 20;

/// The steering hash of a flow: addresses and ports folded to 16 bits (symmetric: a flow and its
/// replies hash alike), then mixed by a multiplication (Fibonacci hashing), 16 bits. The socket
/// group's classic BPF program computes the same ([`super::socket::UdpSocket::steer`]).
pub fn steer_hash(flow: Flow) -> u32 {
    let (src, dst, ports) = flow;
    let a = src ^ dst ^ ports;
    let a = (a ^ (a >> 16)) & 0xffff;
    a.wrapping_mul(0x9e37_79b1) >> 16
}

/// The bucket of a flow.
pub fn bucket(flow: Flow) -> usize {
    steer_hash(flow) as usize % STEER_BUCKETS
}

/// The table a node starts with: buckets dealt round-robin over `workers`.
pub fn default_table(workers: usize) -> SteerTable {
    let n = workers.clamp(1, usize::from(u8::MAX));
    std::array::from_fn(|b| u8::try_from(b % n).expect("fewer than 256 workers"))
}

/// Rebalances the steering table from the bytes each bucket moved in the last period: moves
/// buckets from the busiest worker to the idlest while that lowers the busier of the two to at
/// most [`REBALANCE_GAIN`] of what the busiest carried. `None` when nothing is worth moving.
///
/// A bucket is moved whole, so one heavy flow is never split, and a move never just swaps which
/// worker is the busiest (that would gain nothing and move the flow back and forth). A moved
/// flow can see its packets reordered once, at the switch; that is the price of spreading, paid
/// only when it gains at least 10 %, as a NIC pays it when its RSS table is rewritten.
pub fn rebalance(
    load: &[u64; STEER_BUCKETS],
    table: &SteerTable,
    workers: usize,
) -> Option<SteerTable> {
    if workers < 2 {
        return None;
    }
    let mut t = *table;
    let mut changed = false;
    for _ in 0..STEER_BUCKETS {
        let mut per = vec![0u64; workers];
        for (b, w) in t.iter().enumerate() {
            if let Some(p) = per.get_mut(usize::from(*w)) {
                *p += load[b];
            }
        }
        let (busy, &max) = per
            .iter()
            .enumerate()
            .max_by_key(|(_, l)| **l)
            .expect("workers");
        let (idle, &min) = per
            .iter()
            .enumerate()
            .min_by_key(|(_, l)| **l)
            .expect("workers");
        if max < REBALANCE_MIN_BYTES {
            break;
        }
        // The bucket of the busiest worker whose move leaves the pair most even.
        let best = (0..STEER_BUCKETS)
            .filter(|&b| usize::from(t[b]) == busy && load[b] > 0)
            .min_by_key(|&b| (max - load[b]).abs_diff(min + load[b]));
        let Some(b) = best else { break };
        let after = (max - load[b]).max(min + load[b]);
        #[expect(clippy::cast_precision_loss, reason = "a ratio of byte counts")]
        let gain = after as f64 / max as f64;
        if gain > REBALANCE_GAIN {
            break;
        }
        t[b] = u8::try_from(idle).expect("fewer than 256 workers");
        changed = true;
    }
    changed.then_some(t)
}

// ---- batching sends (UDP GSO) --------------------------------------------------------------

/// One send: `count` consecutive packets (from [`Batcher::push`] index `first` on) to one peer;
/// every packet but the last is `seg` bytes. Two or more go as one UDP GSO message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Send {
    /// The peer.
    pub dst: SocketAddrV4,
    /// The flow of its packets.
    pub flow: Flow,
    /// Index of the first packet.
    pub first: usize,
    /// Packets.
    pub count: usize,
    /// Bytes of every packet but the last (the `UDP_SEGMENT` size).
    pub seg: usize,
    /// Bytes in all.
    pub bytes: usize,
}

impl Send {
    /// The `UDP_SEGMENT` size to give the kernel: `None` for a single datagram.
    pub fn gso(&self) -> Option<u16> {
        (self.count > 1).then(|| u16::try_from(self.seg).expect("datagrams below 64 KiB"))
    }
}

/// Packs a turn's packets, in order, into as few sends as UDP GSO allows.
///
/// A packet joins the send before it when it goes to the same peer, belongs to the same flow, is
/// no longer than that
/// send's segment size, the send's last packet was full-sized, and the send stays within
/// [`GSO_MAX_SEGMENTS`] packets and [`MAX_UDP_PAYLOAD`] bytes. So a train of full-sized TCP
/// segments continues across super-packets (a 64 KiB super-packet is 46 segments of 1472 bytes,
/// a send holds 44: cut per super-packet that is two sends, the second of two packets, where
/// packed it is one send per 44), and a burst of equal-sized ACKs to one peer is one send. Every
/// send is one skb through the underlay and one receive at the peer: what costs there is per
/// skb, not per byte. Flows are never mixed in a send: the peer's socket group steers a whole
/// train to one worker by its first packet, and a flow must stay on one worker to stay in order.
#[derive(Debug, Default)]
pub struct Batcher {
    sends: Vec<Send>,
    packets: usize,
}

impl Batcher {
    /// An empty batch.
    pub fn new() -> Batcher {
        Batcher::default()
    }

    /// Adds the next packet (`len` bytes of `flow`, for `dst`); its index.
    pub fn push(&mut self, dst: SocketAddrV4, flow: Flow, len: usize) -> usize {
        let i = self.packets;
        self.packets += 1;
        if let Some(s) = self.sends.last_mut()
            && s.dst == dst
            && s.flow == flow
            && len <= s.seg
            && s.bytes == s.count * s.seg
            && s.count < GSO_MAX_SEGMENTS
            && s.bytes + len <= MAX_UDP_PAYLOAD
        {
            s.count += 1;
            s.bytes += len;
            return i;
        }
        self.sends.push(Send {
            dst,
            flow,
            first: i,
            count: 1,
            seg: len,
            bytes: len,
        });
        i
    }

    /// The sends so far, in order.
    pub fn sends(&self) -> &[Send] {
        &self.sends
    }

    /// Packets pushed.
    pub fn packets(&self) -> usize {
        self.packets
    }

    /// Empties the batch.
    pub fn clear(&mut self) {
        self.sends.clear();
        self.packets = 0;
    }
}

// ---- decapsulation (wire → TUN) -------------------------------------------------------------

/// Checks one received datagram from `src`: a whole, well-formed IPv4 packet (valid header
/// checksum, total length equal to the datagram's), from a known peer, for this node's subnet,
/// with a TTL left. Returns the packet's header facts.
pub fn decapsulate(
    table: &RouteTable,
    src: Ipv4Addr,
    dgram: &[u8],
) -> Result<Ipv4Info, DropReason> {
    if !table.is_peer(src) {
        return Err(DropReason::UnknownPeer);
    }
    let ip = parse_ipv4(dgram)?;
    if ip.total != dgram.len() || ipv4_header_checksum(&dgram[..ip.ihl]) != 0 {
        return Err(DropReason::Malformed);
    }
    if !table.is_local(ip.dst) {
        return Err(DropReason::NotLocal);
    }
    if ip.ttl == 0 {
        return Err(DropReason::Ttl);
    }
    Ok(ip)
}

/// The datagrams of one receive: `gso` bytes each but the last (`UDP_GRO`), or one datagram.
pub fn split_datagrams(data: &[u8], gso: Option<usize>) -> std::slice::Chunks<'_, u8> {
    let size = gso.filter(|g| *g > 0).unwrap_or(data.len()).max(1);
    data.chunks(size)
}

// ---- receive coalescing ---------------------------------------------------------------------

/// A flow: source and destination address, and the first 4 bytes of the transport header (the
/// ports of TCP and UDP).
pub type Flow = (u32, u32, u32);

#[derive(Debug)]
struct Item<'a> {
    /// The first packet, whole (headers come from it).
    first: &'a [u8],
    /// Header bytes (IPv4 + TCP) of the first packet; 0 for an item that is not coalescable.
    hl: usize,
    /// Payload of every merged packet after the first.
    more: Vec<&'a [u8]>,
    /// Payload bytes per segment (the first packet's).
    mss: usize,
    /// Payload bytes in all.
    payload: usize,
    /// The sequence number the next segment must have.
    next_seq: u32,
    /// Whether PSH was seen (on the last merged packet).
    psh: bool,
    /// No more merging.
    closed: bool,
}

/// Coalesces the TCP segments of one receive batch into super-packets for the TUN (software GRO).
///
/// Rules (Linux's `tcp_gro_receive`, stricter where it is cheap): same flow, IPv4 without
/// options or fragments, same TOS/TTL/DF, same TCP header length, options, ACK number and
/// window; flags exactly ACK (PSH allowed on the last merged segment, which closes the item);
/// sequence numbers contiguous; every segment but the last exactly the first one's size; each
/// segment's TCP checksum verified before it is merged (a bad one passes through alone, for the
/// receiver to drop); at most 64 KiB in all. A packet that cannot be merged closes its flow's
/// item and starts a new one, so a flow's packets keep their order.
#[derive(Debug, Default)]
pub struct Gro<'a> {
    items: Vec<Item<'a>>,
    open: Vec<(Flow, usize)>,
}

/// Why a TCP segment can start a merge item: the header length, or `None` (pass it alone).
fn coalescable(pkt: &[u8], ip: &Ipv4Info) -> Option<usize> {
    if ip.proto != PROTO_TCP || ip.ihl != 20 || get_u16(pkt, 6) & IP_MF_OFFSET != 0 {
        return None;
    }
    let thl = usize::from(*pkt.get(ip.ihl + 12)? >> 4) * 4;
    let hl = ip.ihl + thl;
    if thl < 20 || hl >= ip.total {
        return None; // bad header, or no payload (a pure ACK): nothing to merge
    }
    let flags = pkt[ip.ihl + 13];
    if flags != TCP_ACK && flags != TCP_ACK | TCP_PSH {
        return None;
    }
    let l4 = len_u16(ip.total - ip.ihl);
    let ok = Csum::default()
        .pseudo_v4(ip.src.octets(), ip.dst.octets(), PROTO_TCP, l4)
        .add_bytes(&pkt[ip.ihl..ip.total])
        .finish()
        == 0;
    ok.then_some(hl)
}

/// The [`Flow`] of an IPv4 packet whose header is `ihl` bytes.
pub fn flow_of(pkt: &[u8], ihl: usize) -> Flow {
    let ports = if pkt.len() >= ihl + 4 {
        get_u32(pkt, ihl)
    } else {
        0
    };
    (get_u32(pkt, 12), get_u32(pkt, 16), ports)
}

impl<'a> Gro<'a> {
    /// An empty batch.
    pub fn new() -> Gro<'a> {
        Gro::default()
    }

    /// Adds a packet that passed [`decapsulate`] (with its header facts).
    pub fn push(&mut self, pkt: &'a [u8], ip: &Ipv4Info) {
        let pkt = &pkt[..ip.total];
        let hl = coalescable(pkt, ip);
        let key = flow_of(pkt, ip.ihl);
        let open = self
            .open
            .iter()
            .position(|(k, _)| ip.proto == PROTO_TCP && *k == key);
        if let (Some(pos), Some(hl)) = (open, hl) {
            let idx = self.open[pos].1;
            if self.try_merge(idx, pkt, hl) {
                if self.items[idx].closed {
                    self.open.swap_remove(pos);
                }
                return;
            }
        }
        if let Some(pos) = open {
            self.items[self.open[pos].1].closed = true;
            self.open.swap_remove(pos);
        }
        let Some(hl) = hl else {
            self.items.push(Item {
                first: pkt,
                hl: 0,
                more: Vec::new(),
                mss: 0,
                payload: 0,
                next_seq: 0,
                psh: false,
                closed: true,
            });
            return;
        };
        let payload = pkt.len() - hl;
        let flags = pkt[ip.ihl + 13];
        let closed = flags & TCP_PSH != 0;
        self.items.push(Item {
            first: pkt,
            hl,
            more: Vec::new(),
            mss: payload,
            payload,
            next_seq: get_u32(pkt, ip.ihl + 4)
                .wrapping_add(u32::try_from(payload).expect("below 64 KiB")),
            psh: closed,
            closed,
        });
        if !closed {
            self.open.push((key, self.items.len() - 1));
        }
    }

    fn try_merge(&mut self, idx: usize, pkt: &'a [u8], hl: usize) -> bool {
        let it = &mut self.items[idx];
        let f = it.first;
        let plen = pkt.len() - hl;
        let last_len = it.more.last().map_or(it.mss, |p| p.len());
        let same = hl == it.hl
            && f[1] == pkt[1] // TOS
            && f[8] == pkt[8] // TTL
            && get_u16(f, 6) == get_u16(pkt, 6) // DF
            && get_u32(f, 28) == get_u32(pkt, 28) // ACK number
            && f[32] == pkt[32] // data offset, reserved bits, AE
            && get_u16(f, 34) == get_u16(pkt, 34) // window
            && get_u16(f, 38) == get_u16(pkt, 38) // urgent pointer
            && f[40..hl] == pkt[40..hl]; // options
        if !same
            || get_u32(pkt, 24) != it.next_seq
            || plen > it.mss
            || last_len != it.mss
            || it.hl + it.payload + plen > MAX_IP_LEN
        {
            return false;
        }
        it.more.push(&pkt[hl..]);
        it.payload += plen;
        it.next_seq = it
            .next_seq
            .wrapping_add(u32::try_from(plen).expect("below 64 KiB"));
        if pkt[33] & TCP_PSH != 0 {
            it.psh = true;
            it.closed = true;
        }
        if plen < it.mss {
            it.closed = true;
        }
        true
    }

    /// Number of TUN writes this batch makes.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Calls `f(head, body)` for each TUN write, in order: write `head` then every slice of
    /// `body` (one `writev`). `head` starts with the virtio-net header; for a merged item it also
    /// holds the rewritten IPv4 and TCP headers, and `body` the payloads.
    pub fn for_each_write(&self, mut f: impl FnMut(&[u8], &[&'a [u8]])) {
        let mut head = [0u8; MAX_HEAD_LEN];
        let mut body: Vec<&'a [u8]> = Vec::new();
        for it in &self.items {
            body.clear();
            if it.more.is_empty() {
                VnetHdr::default().write(&mut head);
                body.push(it.first);
                f(&head[..VNET_HDR_LEN], &body);
                continue;
            }
            let n = render_head(it, &mut head);
            body.push(&it.first[it.hl..]);
            body.extend_from_slice(&it.more);
            f(&head[..n], &body);
        }
    }
}

/// Writes the virtio-net header and the rewritten IPv4/TCP headers of a merged item; its length.
fn render_head(it: &Item<'_>, head: &mut [u8; MAX_HEAD_LEN]) -> usize {
    let hl = it.hl;
    let ihl = 20;
    let total = hl + it.payload;
    VnetHdr {
        flags: VnetHdr::F_NEEDS_CSUM,
        gso_type: VnetHdr::GSO_TCPV4,
        hdr_len: len_u16(hl),
        gso_size: len_u16(it.mss),
        csum_start: len_u16(ihl),
        csum_offset: 16,
    }
    .write(head);
    let h = &mut head[VNET_HDR_LEN..VNET_HDR_LEN + hl];
    h.copy_from_slice(&it.first[..hl]);
    set_u16(h, 2, len_u16(total));
    fix_ipv4_checksum(&mut h[..ihl]);
    if it.psh {
        h[ihl + 13] |= TCP_PSH;
    }
    // A partial checksum: the pseudo-header sum, not complemented; the kernel (or the receiving
    // stack, which trusts CHECKSUM_PARTIAL) finishes it.
    let src: [u8; 4] = h[12..16].try_into().expect("4 bytes");
    let dst: [u8; 4] = h[16..20].try_into().expect("4 bytes");
    let pseudo = Csum::default()
        .pseudo_v4(src, dst, PROTO_TCP, len_u16(total - ihl))
        .fold();
    set_u16(h, ihl + 16, pseudo);
    VNET_HDR_LEN + hl
}

#[cfg(test)]
mod tests {
    use super::*;
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

    /// An IPv4 header + TCP header (with a 12-byte timestamp option) + payload, checksums valid.
    fn tcp_packet(seq: u32, flags: u8, payload: &[u8], id: u16) -> Vec<u8> {
        let thl = 32;
        let total = 20 + thl + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        set_u16(&mut p, 2, len_u16(total));
        set_u16(&mut p, 4, id);
        set_u16(&mut p, 6, 0x4000);
        p[8] = 64;
        p[9] = PROTO_TCP;
        p[12..16].copy_from_slice(&SRC.octets());
        p[16..20].copy_from_slice(&DST.octets());
        fix_ipv4_checksum(&mut p[..20]);
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
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        set_u16(&mut p, 2, len_u16(total));
        p[8] = 64;
        p[9] = PROTO_UDP;
        p[12..16].copy_from_slice(&SRC.octets());
        p[16..20].copy_from_slice(&DST.octets());
        fix_ipv4_checksum(&mut p[..20]);
        set_u16(&mut p, 20, 4444);
        set_u16(&mut p, 22, 5555);
        set_u16(&mut p, 24, len_u16(total - 20));
        p[28..].copy_from_slice(payload);
        p
    }

    /// A super-packet as the TUN hands it over: virtio-net header, partial TCP checksum.
    fn tso_input(payload: &[u8], mss: u16, flags: u8) -> Vec<u8> {
        let mut p = tcp_packet(1000, flags, payload, 7);
        let total = len_u16(p.len());
        // The TUN gives the pseudo-header sum in the checksum field.
        let partial = Csum::default()
            .pseudo_v4(SRC.octets(), DST.octets(), PROTO_TCP, total - 20)
            .fold();
        set_u16(&mut p, 36, partial);
        let mut input = vec![0u8; VNET_HDR_LEN];
        VnetHdr {
            flags: VnetHdr::F_NEEDS_CSUM,
            gso_type: VnetHdr::GSO_TCPV4,
            hdr_len: 52,
            gso_size: mss,
            csum_start: 20,
            csum_offset: 16,
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
        let mut input = vec![0u8; VNET_HDR_LEN];
        VnetHdr {
            flags: VnetHdr::F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 6,
            ..VnetHdr::default()
        }
        .write(&mut input);
        let mut partial = pkt.clone();
        let p = Csum::default()
            .pseudo_v4(SRC.octets(), DST.octets(), PROTO_UDP, 13)
            .fold();
        set_u16(&mut partial, 26, p);
        input.extend_from_slice(&partial);
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
        let mut p = udp_packet(&data);
        let partial = Csum::default()
            .pseudo_v4(SRC.octets(), DST.octets(), PROTO_UDP, len_u16(p.len() - 20))
            .fold();
        set_u16(&mut p, 26, partial);
        let mut input = vec![0u8; VNET_HDR_LEN];
        VnetHdr {
            flags: VnetHdr::F_NEEDS_CSUM,
            gso_type: VnetHdr::GSO_UDP_L4,
            hdr_len: 28,
            gso_size: 1200,
            csum_start: 20,
            csum_offset: 6,
        }
        .write(&mut input);
        input.extend_from_slice(&p);
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
}
