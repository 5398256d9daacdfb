//! Validation of peer leases, before the overlay uses them.
//!
//! Peer leases are state written by others (any client with etcd access can write one), so they
//! are validated before the overlay uses them ([`validate_peers`], pure): a lease is used only if
//! each subnet lies inside the cluster Network of its family with the configured length, overlaps
//! neither the node's own subnet nor another lease, and its PublicIP is a usable unicast address
//! (and its VtepMAC a unicast MAC, for VXLAN). Without this, a lease naming the underlay
//! (`198.18.0.0-25`) made every node route its etcd into the tunnel, and `0.0.0.0` became an FDB
//! entry. Of two overlapping leases the one created first (lower etcd create revision, then the
//! lower key) wins on every node alike, so all nodes agree on which one is ignored.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::overlay::config::NetworkConfig;
use crate::overlay::lease::{Lease, LeaseSubnets, parse_mac};

/// Why a peer lease is not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IgnoreReason {
    /// A subnet lies outside the cluster Network of its family.
    OutsideNetwork,
    /// A subnet is not of the configured length (`SubnetLen`, `IPv6SubnetLen`).
    WrongLength,
    /// A subnet overlaps this node's own subnet.
    OverlapsOwnSubnet,
    /// A subnet overlaps an older lease.
    OverlapsLease,
    /// The PublicIP is absent or not a usable unicast address of the underlay.
    BadPublicIp,
    /// The PublicIP is this node's own: another node claims to be this one.
    OwnPublicIp,
    /// The VTEP MAC is absent or not a unicast MAC (VXLAN).
    BadVtepMac,
}

impl IgnoreReason {
    /// Every reason, in the order `/metrics` lists them.
    pub const ALL: [IgnoreReason; 7] = [
        IgnoreReason::OutsideNetwork,
        IgnoreReason::WrongLength,
        IgnoreReason::OverlapsOwnSubnet,
        IgnoreReason::OverlapsLease,
        IgnoreReason::BadPublicIp,
        IgnoreReason::OwnPublicIp,
        IgnoreReason::BadVtepMac,
    ];

    /// The `reason` label in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            IgnoreReason::OutsideNetwork => "outside_network",
            IgnoreReason::WrongLength => "wrong_length",
            IgnoreReason::OverlapsOwnSubnet => "overlaps_own_subnet",
            IgnoreReason::OverlapsLease => "overlaps_lease",
            IgnoreReason::BadPublicIp => "bad_public_ip",
            IgnoreReason::OwnPublicIp => "own_public_ip",
            IgnoreReason::BadVtepMac => "bad_vtep_mac",
        }
    }
}

/// A peer lease the overlay does not use, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    /// The lease's key (`10.244.3.0-24`).
    pub key: String,
    /// Why.
    pub reason: IgnoreReason,
    /// The offending value, in words.
    pub detail: String,
}

/// This node, as lease validation sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OwnNode {
    /// The subnets this node holds.
    pub subnets: Option<LeaseSubnets>,
    /// Its public IPv4 address.
    pub public_v4: Option<Ipv4Addr>,
    /// Its public IPv6 address.
    pub public_v6: Option<Ipv6Addr>,
}

/// The outcome of [`validate_peers`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validated {
    /// The leases the overlay uses (the node's own excluded).
    pub peers: Vec<Lease>,
    /// The leases it ignores.
    pub ignored: Vec<Ignored>,
}

/// A peer's subnet of one family: inside the cluster network `net` and a `/len` (`fields` name
/// the network and length settings).
fn check_subnet(
    sn: IpNet,
    net: IpNet,
    len: u8,
    (net_field, len_field): (&str, &str),
) -> Result<(), (IgnoreReason, String)> {
    if !net.contains(&sn) {
        return Err((
            IgnoreReason::OutsideNetwork,
            format!("subnet {sn} is outside {net_field} {net}"),
        ));
    }
    if sn.prefix_len() != len {
        return Err((
            IgnoreReason::WrongLength,
            format!("subnet {sn} is not a /{len} ({len_field})"),
        ));
    }
    Ok(())
}

/// A peer's public address for its subnet of one family (`field` and `family` name them): there,
/// a usable unicast underlay address outside the cluster (`in_cluster`), and not `own`.
fn check_public_ip(
    (field, family): (&str, &str),
    ip: Option<IpAddr>,
    own: Option<IpAddr>,
    in_cluster: impl Fn(IpAddr) -> bool,
) -> Result<(), (IgnoreReason, String)> {
    let ip = ip.ok_or_else(|| {
        (
            IgnoreReason::BadPublicIp,
            format!("no {field} for its {family} subnet"),
        )
    })?;
    let usable = match ip {
        IpAddr::V4(a) => usable_v4(a),
        IpAddr::V6(a) => usable_v6(a),
    };
    if !usable || in_cluster(ip) {
        return Err((
            IgnoreReason::BadPublicIp,
            format!("{field} {ip} is not a usable unicast underlay address"),
        ));
    }
    if own == Some(ip) {
        return Err((
            IgnoreReason::OwnPublicIp,
            format!("{field} {ip} is this node's own"),
        ));
    }
    Ok(())
}

/// Whether an IPv4 address can be a node's underlay address: unicast, not unspecified, not
/// "this network" (0/8), loopback, link-local, multicast or reserved (240/4, broadcast).
pub fn usable_v4(a: Ipv4Addr) -> bool {
    let first = a.octets()[0];
    !(first == 0 || a.is_loopback() || a.is_link_local() || a.is_multicast() || first >= 240)
}

/// Whether an IPv6 address can be a node's underlay address: not unspecified, loopback,
/// multicast, link-local or IPv4-mapped.
pub fn usable_v6(a: Ipv6Addr) -> bool {
    !(a.is_unspecified()
        || a.is_loopback()
        || a.is_multicast()
        || a.is_unicast_link_local()
        || a.to_ipv4_mapped().is_some())
}

/// Whether a MAC can be a VTEP's: not all zeros, not multicast/broadcast.
pub fn unicast_mac(mac: &[u8; 6]) -> bool {
    mac != &[0; 6] && mac[0] & 1 == 0
}

pub(crate) fn overlaps(a: &LeaseSubnets, b: &LeaseSubnets) -> bool {
    let v4 = matches!((a.v4, b.v4), (Some(x), Some(y)) if x.contains(&y) || y.contains(&x));
    let v6 = matches!((a.v6, b.v6), (Some(x), Some(y)) if x.contains(&y) || y.contains(&x));
    v4 || v6
}

/// One lease's own faults (everything but overlaps with other leases).
pub(crate) fn check_one(
    cfg: &NetworkConfig,
    own: &OwnNode,
    lease: &Lease,
) -> Result<(), (IgnoreReason, String)> {
    let subnets = &lease.subnets;
    let mut usable_family = false;
    if cfg.enable_ipv4
        && let (Some(sn), Some(net)) = (subnets.v4, cfg.network)
    {
        check_subnet(
            sn.into(),
            net.into(),
            cfg.subnet_len,
            ("Network", "SubnetLen"),
        )?;
        usable_family = true;
    }
    if cfg.enable_ipv6
        && let (Some(sn), Some(net)) = (subnets.v6, cfg.ipv6_network)
    {
        check_subnet(
            sn.into(),
            net.into(),
            cfg.ipv6_subnet_len,
            ("IPv6Network", "IPv6SubnetLen"),
        )?;
        usable_family = true;
    }
    if !usable_family {
        return Err((
            IgnoreReason::OutsideNetwork,
            format!("no subnet of an enabled family in {}", subnets.key()),
        ));
    }
    let in_cluster = |ip: IpAddr| {
        cfg.network.is_some_and(|n| IpNet::V4(n).contains(&ip))
            || cfg.ipv6_network.is_some_and(|n| IpNet::V6(n).contains(&ip))
    };
    let attrs = &lease.attrs;
    if cfg.enable_ipv4 && subnets.v4.is_some() {
        check_public_ip(
            ("PublicIP", "IPv4"),
            attrs.public_ip.map(IpAddr::V4),
            own.public_v4.map(IpAddr::V4),
            in_cluster,
        )?;
    }
    if cfg.enable_ipv6 && subnets.v6.is_some() {
        check_public_ip(
            ("PublicIPv6", "IPv6"),
            attrs.public_ipv6.map(IpAddr::V6),
            own.public_v6.map(IpAddr::V6),
            in_cluster,
        )?;
    }
    if attrs.backend_type == "vxlan"
        && cfg.backend.kind == crate::overlay::config::BackendType::Vxlan
    {
        for (v6, has) in [
            (false, cfg.enable_ipv4 && subnets.v4.is_some()),
            (true, cfg.enable_ipv6 && subnets.v6.is_some()),
        ] {
            if !has {
                continue;
            }
            let field = if v6 { "BackendV6Data" } else { "BackendData" };
            let data = attrs.vxlan(v6).ok_or_else(|| {
                (
                    IgnoreReason::BadVtepMac,
                    format!("no {field} with a VtepMAC"),
                )
            })?;
            if !parse_mac(&data.vtep_mac).is_some_and(|m| unicast_mac(&m)) {
                return Err((
                    IgnoreReason::BadVtepMac,
                    format!("{field}.VtepMAC {:?} is not a unicast MAC", data.vtep_mac),
                ));
            }
        }
    }
    // Last: a lease overlapping ours for this reason alone is one the other nodes use.
    if let Some(mine) = &own.subnets
        && overlaps(subnets, mine)
    {
        return Err((
            IgnoreReason::OverlapsOwnSubnet,
            format!("overlaps this node's subnet {}", mine.key()),
        ));
    }
    Ok(())
}

/// Splits the leases into the peers the overlay uses and the ones it ignores (see the module
/// notes). Each lease comes with its creation order (etcd's create revision): of overlapping
/// leases the first created wins. The node's own lease (same subnets) is neither. Every subnet
/// checked for overlaps has the configured length by then, so overlapping means equal: the
/// check is a lookup, and thousands of leases cost no more than a sort.
pub fn validate_peers<'a>(
    cfg: &NetworkConfig,
    own: &OwnNode,
    leases: impl IntoIterator<Item = (&'a Lease, i64)>,
) -> Validated {
    let mut ordered: Vec<(&Lease, i64, String)> = leases
        .into_iter()
        .filter(|(l, _)| Some(l.subnets) != own.subnets)
        .map(|(l, rank)| (l, rank, l.subnets.key()))
        .collect();
    ordered.sort_by(|a, b| (a.1, &a.2).cmp(&(b.1, &b.2)));
    let mut out = Validated::default();
    let mut taken_v4: HashMap<Ipv4Net, usize> = HashMap::new();
    let mut taken_v6: HashMap<Ipv6Net, usize> = HashMap::new();
    for (i, (lease, _, key)) in ordered.iter().enumerate() {
        let v4 = lease.subnets.v4.filter(|_| cfg.enable_ipv4);
        let v6 = lease.subnets.v6.filter(|_| cfg.enable_ipv6);
        let verdict = check_one(cfg, own, lease).and_then(|()| {
            let winner = v4
                .and_then(|n| taken_v4.get(&n))
                .or_else(|| v6.and_then(|n| taken_v6.get(&n)));
            match winner {
                Some(&w) => Err((
                    IgnoreReason::OverlapsLease,
                    format!("overlaps the older lease {}", ordered[w].2),
                )),
                None => Ok(()),
            }
        });
        match verdict {
            Ok(()) => {
                if let Some(n) = v4 {
                    taken_v4.insert(n, i);
                }
                if let Some(n) = v6 {
                    taken_v6.insert(n, i);
                }
                out.peers.push((*lease).clone());
            }
            Err((reason, detail)) => out.ignored.push(Ignored {
                key: key.clone(),
                reason,
                detail,
            }),
        }
    }
    out
}
