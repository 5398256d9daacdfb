//! Decapsulation (wire → TUN) and receive coalescing of a GRO train into super-packets.

use std::net::Ipv4Addr;

use super::csum::{fix_ipv4_checksum, get_u16, get_u32, len_u16, set_u16};
use super::{
    Csum, DropReason, IP_MF_OFFSET, Ipv4Info, MAX_HEAD_LEN, MAX_IP_LEN, PROTO_TCP, RouteTable,
    TCP_ACK, TCP_PSH, VNET_HDR_LEN, VnetHdr, ipv4_header_checksum, parse_ipv4,
};

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
pub(super) struct Item<'a> {
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
pub(super) fn coalescable(pkt: &[u8], ip: &Ipv4Info) -> Option<usize> {
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
pub(super) fn render_head(it: &Item<'_>, head: &mut [u8; MAX_HEAD_LEN]) -> usize {
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
