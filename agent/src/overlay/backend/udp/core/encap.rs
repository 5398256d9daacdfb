//! Encapsulation (TUN → wire): a packet or a super-packet cut into a train of MTU-sized IPv4 packets.

use std::net::SocketAddrV4;

use super::csum::{get_u16, get_u32, len_u16, set_u16};
use super::{
    Csum, DropReason, Flow, IP_MF_OFFSET, Ipv4Info, PROTO_TCP, PROTO_UDP, RouteTable, TCP_CWR,
    TCP_FIN, TCP_PSH, VNET_HDR_LEN, VnetHdr, flow_of, parse_ipv4,
};

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

pub(super) fn encap_inner(
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
pub(super) fn complete_checksum(
    pkt: &mut [u8],
    ip: &Ipv4Info,
    hdr: VnetHdr,
) -> Result<(), DropReason> {
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
pub(super) fn segment(
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
