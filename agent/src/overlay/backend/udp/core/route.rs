//! The routing table: peer subnet → `PublicIP:Port`, built from a lease snapshot.

use std::collections::HashMap;
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::net::SocketAddrV4;

use ipnet::Ipv4Net;

use crate::overlay::lease::Lease;

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

pub(super) fn mask(prefix: u8) -> u32 {
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
