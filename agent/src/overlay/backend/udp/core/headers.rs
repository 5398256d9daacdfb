//! The virtio-net header in front of every TUN packet, and the IPv4 header.

use std::net::Ipv4Addr;

use super::csum::get_u16;
use super::{DropReason, VNET_HDR_LEN};

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
