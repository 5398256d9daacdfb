//! Any bytes as a receive from a peer's port (with any UDP GRO segment size): decapsulation and
//! coalescing never panic, every TUN write is a well-formed packet or super-packet, and cutting
//! the super-packets again gives back exactly the packets that were accepted (IP ids and
//! checksums aside, which the kernel rewrites). The same bytes as a TUN read never panic
//! encapsulation either.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use twill_agent::overlay::backend::udp::core::{
    Csum, Encap, Gro, MAX_HEAD_LEN, RouteTable, VNET_HDR_LEN, VnetHdr, decapsulate, encapsulate,
    split_datagrams,
};

const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 12);

/// A packet with the fields the kernel rewrites on segmentation zeroed: IP id, IP checksum,
/// TCP checksum.
fn normalize(p: &[u8]) -> Vec<u8> {
    let mut v = p.to_vec();
    for i in [4, 5, 10, 11] {
        v[i] = 0;
    }
    if v[9] == 6 && v.len() >= 40 {
        v[36] = 0;
        v[37] = 0;
    }
    v
}

/// Sets the IPv4 header checksum and, for TCP, the TCP checksum of `d` where its header allows.
fn fix_checksums(d: &mut [u8]) {
    if d.len() < 20 {
        return;
    }
    let ihl = usize::from(d[0] & 0x0f) * 4;
    if ihl < 20 || ihl > d.len() {
        return;
    }
    d[10] = 0;
    d[11] = 0;
    let c = Csum::default().add_bytes(&d[..ihl]).finish();
    d[10..12].copy_from_slice(&c.to_be_bytes());
    let total = usize::from(u16::from_be_bytes([d[2], d[3]]));
    if d[9] != 6 || total > d.len() || total < ihl + 20 {
        return;
    }
    d[ihl + 16] = 0;
    d[ihl + 17] = 0;
    let src: [u8; 4] = d[12..16].try_into().unwrap();
    let dst: [u8; 4] = d[16..20].try_into().unwrap();
    let len = u16::try_from(total - ihl).unwrap();
    let c = Csum::default()
        .pseudo_v4(src, dst, 6, len)
        .add_bytes(&d[ihl..total])
        .finish();
    d[ihl + 16..ihl + 18].copy_from_slice(&c.to_be_bytes());
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    // Every inner destination is local, every sender a peer: the fuzzer reaches the coalescer.
    let rx = RouteTable::new(
        Some("0.0.0.0/0".parse().unwrap()),
        8285,
        [("198.18.0.0/24".parse().unwrap(), PEER)],
    );
    let gso = (ctl >> 1 != 0).then(|| usize::from(ctl >> 1) * 16);
    // With the low bit set, make the IPv4 and TCP checksums right, so that the fuzzer explores
    // the coalescer rather than the checksum checks.
    let mut rest = rest.to_vec();
    if ctl & 1 == 1 {
        let size = gso.unwrap_or(rest.len()).max(1);
        for d in rest.chunks_mut(size) {
            fix_checksums(d);
        }
    }
    let mut accepted = Vec::new();
    let mut gro = Gro::new();
    for d in split_datagrams(&rest, gso) {
        if let Ok(ip) = decapsulate(&rx, PEER, d) {
            assert_eq!(ip.total, d.len());
            gro.push(d, &ip);
            accepted.push(normalize(d));
        }
    }
    // Re-cut every write as the kernel would: one route for everything, no MTU limit.
    let tx = RouteTable::new(None, 8285, [("0.0.0.0/0".parse().unwrap(), PEER)]);
    let mut again = Vec::new();
    let mut writes = 0;
    gro.for_each_write(|head, body| {
        writes += 1;
        assert!(head.len() >= VNET_HDR_LEN && head.len() <= MAX_HEAD_LEN);
        let h = VnetHdr::parse(head).unwrap();
        let mut input = head.to_vec();
        for b in body {
            input.extend_from_slice(b);
        }
        assert!(input.len() - VNET_HDR_LEN <= 65_535);
        if h.gso_type == VnetHdr::GSO_NONE {
            again.push(normalize(&input[VNET_HDR_LEN..]));
            return;
        }
        let mut out = vec![0u8; 256 * 1024];
        match encapsulate(&tx, 65_535, &mut input, &mut out) {
            Encap::Segments(train) => {
                for (h, p) in train.pieces(&out, &input) {
                    again.push(normalize(&[h, p].concat()));
                }
            }
            other => panic!("a coalesced write does not segment: {other:?}"),
        }
    });
    assert_eq!(writes, gro.len());
    accepted.sort();
    again.sort();
    assert_eq!(accepted, again);

    // The same bytes as a TUN read (virtio-net header first).
    let mut input = data.to_vec();
    let mut out = vec![0u8; 4096];
    let _ = encapsulate(&tx, 1472, &mut input, &mut out);
});
