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

mod batch;
mod csum;
mod decap;
mod encap;
mod headers;
mod route;
mod steer;
#[cfg(test)]
mod tests;

pub use self::batch::{Batcher, Send};
pub use self::csum::{Csum, ipv4_header_checksum};
pub use self::decap::{Flow, Gro, decapsulate, flow_of, split_datagrams};
pub use self::encap::{Encap, Train, encapsulate};
pub use self::headers::{Ipv4Info, VnetHdr, parse_ipv4};
pub use self::route::RouteTable;
pub use self::steer::{STEER_BUCKETS, SteerTable, bucket, default_table, rebalance, steer_hash};
