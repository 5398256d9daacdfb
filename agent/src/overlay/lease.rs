//! Subnet leases in flannel's etcd schema, and the choice of a free subnet.
//!
//! A lease is a key `<prefix>/subnets/<ip>-<len>` (dual stack: `<v4>-<len>&<v6>-<len>`) whose
//! value is flannel's `LeaseAttrs` JSON. Keeping both byte for byte as flannel writes them is what
//! lets a flannel node and a twill node see each other as peers.
//!
//! The allocator is pure: it takes the taken subnets and a random source, and returns a candidate.
//! The store decides whether the candidate really was free (an etcd transaction), so two nodes
//! racing for one subnet cannot both win.
//!
//! Peer leases are state written by others (any client with etcd access can write one), so they
//! are validated before the overlay uses them ([`validate_peers`], pure): a lease is used only if
//! each subnet lies inside the cluster Network of its family with the configured length, overlaps
//! neither the node's own subnet nor another lease, and its PublicIP is a usable unicast address
//! (and its VtepMAC a unicast MAC, for VXLAN). Without this, a lease naming the underlay
//! (`198.18.0.0-25`) made every node route its etcd into the tunnel, and `0.0.0.0` became an FDB
//! entry. Of two overlapping leases the one created first (lower etcd create revision, then the
//! lower key) wins on every node alike, so all nodes agree on which one is ignored.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::overlay::config::NetworkConfig;

/// Lease TTL (flannel's: 24 h).
pub const LEASE_TTL: Duration = Duration::from_hours(24);

/// The lease TTL in minutes, the bound of `--subnet-lease-renew-margin`.
pub const LEASE_TTL_MINUTES: u64 = LEASE_TTL.as_secs() / 60;

/// Errors about lease keys and values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeaseError {
    /// A key under `subnets/` does not name a subnet.
    #[error("lease key {key:?} is not <ip>-<len> or <ip>-<len>&<ipv6>-<len>")]
    BadKey {
        /// The key's last segment.
        key: String,
    },
    /// A lease value is not flannel's LeaseAttrs JSON.
    #[error("lease value for {key} is invalid: {reason}")]
    BadValue {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// Every subnet of the network is leased.
    #[error("no free {family} subnet left in {range}")]
    Exhausted {
        /// "IPv4" or "IPv6".
        family: &'static str,
        /// The range searched.
        range: String,
    },
}

/// The subnets a lease holds (either or both families).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseSubnets {
    /// The IPv4 subnet.
    pub v4: Option<Ipv4Net>,
    /// The IPv6 subnet.
    pub v6: Option<Ipv6Net>,
}

impl LeaseSubnets {
    /// The key's last segment, flannel's `MakeSubnetKey`: `10.244.1.0-24`,
    /// `10.244.1.0-24&fd00:0:0:1::-64`, or `fd00:0:0:1::-64`.
    pub fn key(&self) -> String {
        match (self.v4, self.v6) {
            (Some(a), Some(b)) => format!(
                "{}-{}&{}-{}",
                a.addr(),
                a.prefix_len(),
                b.addr(),
                b.prefix_len()
            ),
            (Some(a), None) => format!("{}-{}", a.addr(), a.prefix_len()),
            (None, Some(b)) => format!("{}-{}", b.addr(), b.prefix_len()),
            (None, None) => String::new(),
        }
    }

    /// Parses a key's last segment.
    pub fn parse_key(key: &str) -> Result<Self, LeaseError> {
        let bad = || LeaseError::BadKey {
            key: key.to_string(),
        };
        let mut out = LeaseSubnets { v4: None, v6: None };
        for part in key.split('&') {
            let (ip, len) = part.rsplit_once('-').ok_or_else(bad)?;
            let len: u8 = len.parse().map_err(|_| bad())?;
            if let Ok(v4) = ip.parse::<Ipv4Addr>() {
                let net = Ipv4Net::new(v4, len).map_err(|_| bad())?;
                if out.v4.replace(net).is_some() || net != net.trunc() {
                    return Err(bad());
                }
            } else if let Ok(v6) = ip.parse::<Ipv6Addr>() {
                let net = Ipv6Net::new(v6, len).map_err(|_| bad())?;
                if out.v6.replace(net).is_some() || net != net.trunc() {
                    return Err(bad());
                }
            } else {
                return Err(bad());
            }
        }
        if out.v4.is_none() && out.v6.is_none() {
            return Err(bad());
        }
        Ok(out)
    }
}

/// flannel's `LeaseAttrs`: what a node publishes with its subnet.
///
/// twill adds one field of its own, `TwillNodeID`: the identity of the node that holds the
/// lease, so that a restarted node can prove a lease is its own before it reclaims it (a second
/// node with the same public IP has another identity). flannel decodes lease values with Go's
/// `encoding/json`, which ignores fields it does not know, and writes its own leases without it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    /// The node's public (underlay) IPv4 address.
    #[serde(rename = "PublicIP", default, skip_serializing_if = "Option::is_none")]
    pub public_ip: Option<Ipv4Addr>,
    /// The node's public IPv6 address.
    #[serde(
        rename = "PublicIPv6",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub public_ipv6: Option<Ipv6Addr>,
    /// `vxlan`, `host-gw` or `udp`.
    #[serde(
        rename = "BackendType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub backend_type: String,
    /// Backend specifics for IPv4 (VXLAN: `{"VNI":1,"VtepMAC":"..."}`).
    #[serde(
        rename = "BackendData",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_data: Option<serde_json::Value>,
    /// Backend specifics for IPv6.
    #[serde(
        rename = "BackendV6Data",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_v6_data: Option<serde_json::Value>,
    /// twill's node identity (absent in leases flannel or an older twill wrote).
    #[serde(
        rename = "TwillNodeID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub node_id: Option<String>,
}

/// VXLAN's `BackendData`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanData {
    /// The VNI.
    #[serde(rename = "VNI")]
    pub vni: u32,
    /// The VTEP device's MAC, `aa:bb:cc:dd:ee:ff`.
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: String,
}

impl LeaseAttrs {
    /// Parses a lease value, naming the key on error.
    pub fn parse(key: &str, value: &[u8]) -> Result<Self, LeaseError> {
        serde_json::from_slice(value).map_err(|e| LeaseError::BadValue {
            key: key.to_string(),
            reason: e.to_string(),
        })
    }

    /// flannel's compact JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("lease attrs serialize")
    }

    /// The VXLAN data for one family, if the peer is a VXLAN node.
    pub fn vxlan(&self, v6: bool) -> Option<VxlanData> {
        let data = if v6 {
            self.backend_v6_data.as_ref()
        } else {
            self.backend_data.as_ref()
        }?;
        serde_json::from_value(data.clone()).ok()
    }
}

/// One node's lease, as seen by any node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The subnets.
    pub subnets: LeaseSubnets,
    /// What the node published.
    pub attrs: LeaseAttrs,
    /// When the lease expires, if known.
    pub expires: Option<SystemTime>,
}

/// Parses a MAC `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// How many random probes before the allocator walks the range.
const RANDOM_PROBES: usize = 64;
/// Never walk more candidates than this (an IPv6 range can hold 2^64 subnets).
const WALK_LIMIT: u128 = 1 << 20;

/// Chooses a free subnet at random between `min` and `max` (inclusive, both aligned) of size
/// `len`, avoiding `taken`. Works on u128 so one function serves both families.
fn choose(
    min: u128,
    max: u128,
    bits: u8,
    len: u8,
    taken: &HashSet<u128>,
    rng: &mut impl Rng,
) -> Option<u128> {
    let step = 1u128 << (bits - len);
    let count = (max - min) / step + 1;
    for _ in 0..RANDOM_PROBES {
        let cand = min + rng.random_range(0..count) * step;
        if !taken.contains(&cand) {
            return Some(cand);
        }
    }
    // Dense range: walk from a random start so racing nodes still spread out.
    let start = rng.random_range(0..count);
    (0..count.min(WALK_LIMIT))
        .map(|i| min + ((start + i) % count) * step)
        .find(|c| !taken.contains(c))
}

/// Chooses a free IPv4 subnet of the config, avoiding `taken`.
pub fn choose_v4(
    cfg: &NetworkConfig,
    taken: &[Ipv4Net],
    rng: &mut impl Rng,
) -> Result<Ipv4Net, LeaseError> {
    let (min, max) = (cfg.subnet_min.expect("v4"), cfg.subnet_max.expect("v4"));
    let taken: HashSet<u128> = taken
        .iter()
        .map(|n| u128::from(u32::from(n.network())))
        .collect();
    choose(
        u128::from(u32::from(min)),
        u128::from(u32::from(max)),
        32,
        cfg.subnet_len,
        &taken,
        rng,
    )
    .map(|a| {
        Ipv4Net::new(
            Ipv4Addr::from(u32::try_from(a).expect("v4")),
            cfg.subnet_len,
        )
        .expect("len")
    })
    .ok_or(LeaseError::Exhausted {
        family: "IPv4",
        range: format!("{min}-{max}/{}", cfg.subnet_len),
    })
}

/// Chooses a free IPv6 subnet of the config, avoiding `taken`.
pub fn choose_v6(
    cfg: &NetworkConfig,
    taken: &[Ipv6Net],
    rng: &mut impl Rng,
) -> Result<Ipv6Net, LeaseError> {
    let (min, max) = (
        cfg.ipv6_subnet_min.expect("v6"),
        cfg.ipv6_subnet_max.expect("v6"),
    );
    let taken: HashSet<u128> = taken.iter().map(|n| u128::from(n.network())).collect();
    choose(
        u128::from(min),
        u128::from(max),
        128,
        cfg.ipv6_subnet_len,
        &taken,
        rng,
    )
    .map(|a| Ipv6Net::new(Ipv6Addr::from(a), cfg.ipv6_subnet_len).expect("len"))
    .ok_or(LeaseError::Exhausted {
        family: "IPv6",
        range: format!("{min}-{max}/{}", cfg.ipv6_subnet_len),
    })
}

/// Whether a subnet lies inside the config's range (a lease left over from an older config
/// outside the range is not reused).
pub fn in_range(cfg: &NetworkConfig, subnets: &LeaseSubnets) -> bool {
    let v4_ok = match (cfg.enable_ipv4, subnets.v4) {
        (true, Some(n)) => {
            n.prefix_len() == cfg.subnet_len
                && Some(n.network()) >= cfg.subnet_min
                && Some(n.network()) <= cfg.subnet_max
        }
        (false, None) => true,
        _ => false,
    };
    let v6_ok = match (cfg.enable_ipv6, subnets.v6) {
        (true, Some(n)) => {
            n.prefix_len() == cfg.ipv6_subnet_len
                && Some(n.network()) >= cfg.ipv6_subnet_min
                && Some(n.network()) <= cfg.ipv6_subnet_max
        }
        (false, None) => true,
        _ => false,
    };
    v4_ok && v6_ok
}

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

fn overlaps(a: &LeaseSubnets, b: &LeaseSubnets) -> bool {
    let v4 = matches!((a.v4, b.v4), (Some(x), Some(y)) if x.contains(&y) || y.contains(&x));
    let v6 = matches!((a.v6, b.v6), (Some(x), Some(y)) if x.contains(&y) || y.contains(&x));
    v4 || v6
}

/// One lease's own faults (everything but overlaps with other leases).
fn check_one(
    cfg: &NetworkConfig,
    own: &OwnNode,
    lease: &Lease,
) -> Result<(), (IgnoreReason, String)> {
    let subnets = &lease.subnets;
    let mut usable_family = false;
    if cfg.enable_ipv4
        && let (Some(sn), Some(net)) = (subnets.v4, cfg.network)
    {
        if !net.contains(&sn) {
            return Err((
                IgnoreReason::OutsideNetwork,
                format!("subnet {sn} is outside Network {net}"),
            ));
        }
        if sn.prefix_len() != cfg.subnet_len {
            return Err((
                IgnoreReason::WrongLength,
                format!("subnet {sn} is not a /{} (SubnetLen)", cfg.subnet_len),
            ));
        }
        usable_family = true;
    }
    if cfg.enable_ipv6
        && let (Some(sn), Some(net)) = (subnets.v6, cfg.ipv6_network)
    {
        if !net.contains(&sn) {
            return Err((
                IgnoreReason::OutsideNetwork,
                format!("subnet {sn} is outside IPv6Network {net}"),
            ));
        }
        if sn.prefix_len() != cfg.ipv6_subnet_len {
            return Err((
                IgnoreReason::WrongLength,
                format!(
                    "subnet {sn} is not a /{} (IPv6SubnetLen)",
                    cfg.ipv6_subnet_len
                ),
            ));
        }
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
        let ip = attrs.public_ip.ok_or((
            IgnoreReason::BadPublicIp,
            "no PublicIP for its IPv4 subnet".to_string(),
        ))?;
        if !usable_v4(ip) || in_cluster(IpAddr::V4(ip)) {
            return Err((
                IgnoreReason::BadPublicIp,
                format!("PublicIP {ip} is not a usable unicast underlay address"),
            ));
        }
        if own.public_v4 == Some(ip) {
            return Err((
                IgnoreReason::OwnPublicIp,
                format!("PublicIP {ip} is this node's own"),
            ));
        }
    }
    if cfg.enable_ipv6 && subnets.v6.is_some() {
        let ip = attrs.public_ipv6.ok_or((
            IgnoreReason::BadPublicIp,
            "no PublicIPv6 for its IPv6 subnet".to_string(),
        ))?;
        if !usable_v6(ip) || in_cluster(IpAddr::V6(ip)) {
            return Err((
                IgnoreReason::BadPublicIp,
                format!("PublicIPv6 {ip} is not a usable unicast underlay address"),
            ));
        }
        if own.public_v6 == Some(ip) {
            return Err((
                IgnoreReason::OwnPublicIp,
                format!("PublicIPv6 {ip} is this node's own"),
            ));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use std::collections::BTreeSet;

    fn cfg(json: &str) -> NetworkConfig {
        NetworkConfig::parse(json).unwrap()
    }

    #[test]
    fn keys_round_trip_as_flannel_writes_them() {
        for key in [
            "10.244.1.0-24",
            "10.244.1.0-24&fd74:10:0:1::-64",
            "fd74:10:0:1::-64",
        ] {
            assert_eq!(LeaseSubnets::parse_key(key).unwrap().key(), key);
        }
        for bad in [
            "10.244.1.0",
            "10.244.1.5-24",
            "x-24",
            "10.244.1.0-24&10.244.2.0-24",
            "",
            "10.244.1.0-33",
        ] {
            assert!(LeaseSubnets::parse_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lease_json_matches_flannel() {
        // As flannel v0.26 writes it.
        let text = r#"{"PublicIP":"198.18.0.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"de:ad:be:ef:00:01"}}"#;
        let attrs = LeaseAttrs::parse("k", text.as_bytes()).unwrap();
        assert_eq!(attrs.public_ip.unwrap().to_string(), "198.18.0.11");
        let vx = attrs.vxlan(false).unwrap();
        assert_eq!(vx.vni, 1);
        assert_eq!(
            parse_mac(&vx.vtep_mac),
            Some([0xde, 0xad, 0xbe, 0xef, 0, 1])
        );
        let ours = LeaseAttrs {
            public_ip: Some("198.18.0.12".parse().unwrap()),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: Some(serde_json::json!({"VNI": 1, "VtepMAC": "02:00:00:00:00:01"})),
            backend_v6_data: None,
            node_id: None,
        };
        assert_eq!(
            ours.to_json(),
            r#"{"PublicIP":"198.18.0.12","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}}"#
        );
        assert!(
            LeaseAttrs::parse("k", b"{\"PublicIP\":\"nope\"}")
                .unwrap_err()
                .to_string()
                .contains('k')
        );
    }

    #[test]
    fn chooses_only_free_aligned_subnets_in_range() {
        let c = cfg(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.10.0","SubnetMax":"10.244.20.0"}"#,
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut taken = Vec::new();
        for _ in 0..11 {
            let n = choose_v4(&c, &taken, &mut rng).unwrap();
            assert!(!taken.contains(&n));
            assert!(
                in_range(
                    &c,
                    &LeaseSubnets {
                        v4: Some(n),
                        v6: None
                    }
                ),
                "{n}"
            );
            assert_eq!(n, n.trunc());
            taken.push(n);
        }
        assert!(matches!(
            choose_v4(&c, &taken, &mut rng),
            Err(LeaseError::Exhausted { .. })
        ));
    }

    #[test]
    fn ipv6_huge_range_still_fast() {
        let c = cfg(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/32","IPv6SubnetLen":64}"#,
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let n = choose_v6(&c, &[], &mut rng).unwrap();
        assert!(c.ipv6_network.unwrap().contains(&n));
        assert_eq!(n.prefix_len(), 64);
    }

    fn lease(key: &str, public: &str, mac: &str) -> Lease {
        Lease {
            subnets: LeaseSubnets::parse_key(key).unwrap(),
            attrs: LeaseAttrs {
                public_ip: Some(public.parse().unwrap()),
                backend_type: "vxlan".into(),
                backend_data: Some(serde_json::json!({"VNI": 1, "VtepMAC": mac})),
                ..LeaseAttrs::default()
            },
            expires: None,
        }
    }

    #[test]
    fn peer_leases_are_validated_before_use() {
        let c = cfg(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#);
        let own = OwnNode {
            subnets: Some(LeaseSubnets::parse_key("10.244.1.0-24").unwrap()),
            public_v4: Some("198.18.0.11".parse().unwrap()),
            public_v6: None,
        };
        let good = lease("10.244.2.0-24", "198.18.0.12", "0e:00:00:00:00:02");
        let mut no_mac = lease("10.244.10.0-24", "198.18.0.20", "x");
        no_mac.attrs.backend_data = None;
        let cases = [
            (
                lease("198.18.0.0-25", "198.18.0.13", "0e:00:00:00:00:03"),
                IgnoreReason::OutsideNetwork,
                "198.18.0.0/25",
            ),
            (
                lease("8.8.8.0-24", "198.18.0.14", "0e:00:00:00:00:04"),
                IgnoreReason::OutsideNetwork,
                "8.8.8.0/24",
            ),
            (
                lease("10.244.1.128-25", "198.18.0.15", "0e:00:00:00:00:05"),
                IgnoreReason::WrongLength,
                "/24",
            ),
            (
                lease("10.244.1.0-25", "198.18.0.15", "0e:00:00:00:00:05"),
                IgnoreReason::WrongLength,
                "10.244.1.0/25",
            ),
            (
                lease("10.244.3.0-24", "0.0.0.0", "0e:00:00:00:00:06"),
                IgnoreReason::BadPublicIp,
                "0.0.0.0",
            ),
            (
                lease("10.244.4.0-24", "127.0.0.1", "0e:00:00:00:00:07"),
                IgnoreReason::BadPublicIp,
                "127.0.0.1",
            ),
            (
                lease("10.244.5.0-24", "224.0.0.1", "0e:00:00:00:00:08"),
                IgnoreReason::BadPublicIp,
                "224.0.0.1",
            ),
            (
                lease("10.244.6.0-24", "255.255.255.255", "0e:00:00:00:00:09"),
                IgnoreReason::BadPublicIp,
                "255.255.255.255",
            ),
            (
                lease("10.244.7.0-24", "169.254.1.1", "0e:00:00:00:00:0a"),
                IgnoreReason::BadPublicIp,
                "169.254.1.1",
            ),
            (
                lease("10.244.8.0-24", "10.244.9.9", "0e:00:00:00:00:0b"),
                IgnoreReason::BadPublicIp,
                "10.244.9.9",
            ),
            (
                lease("10.244.9.0-24", "198.18.0.11", "0e:00:00:00:00:0c"),
                IgnoreReason::OwnPublicIp,
                "198.18.0.11",
            ),
            (no_mac, IgnoreReason::BadVtepMac, "BackendData"),
            (
                lease("10.244.11.0-24", "198.18.0.21", "ff:ff:ff:ff:ff:ff"),
                IgnoreReason::BadVtepMac,
                "ff:ff:ff:ff:ff:ff",
            ),
            (
                lease("10.244.12.0-24", "198.18.0.22", "01:00:5e:00:00:01"),
                IgnoreReason::BadVtepMac,
                "01:00:5e",
            ),
            (
                lease("10.244.13.0-24", "198.18.0.23", "00:00:00:00:00:00"),
                IgnoreReason::BadVtepMac,
                "00:00:00",
            ),
        ];
        for (bad, reason, needle) in &cases {
            let v = validate_peers(&c, &own, [(&good, 1), (bad, 2)]);
            assert_eq!(v.peers, vec![good.clone()], "{}", bad.subnets.key());
            assert_eq!(v.ignored.len(), 1, "{v:?}");
            let i = &v.ignored[0];
            assert_eq!(
                (i.key.as_str(), i.reason),
                (bad.subnets.key().as_str(), *reason)
            );
            assert!(
                i.detail.contains(needle),
                "{}: {needle:?} not in {:?}",
                i.key,
                i.detail
            );
        }
        // Our own lease is neither a peer nor ignored; a valid /24 identical to ours is.
        let mine = lease("10.244.1.0-24", "198.18.0.11", "0e:00:00:00:00:01");
        let v = validate_peers(&c, &own, [(&mine, 1), (&good, 2)]);
        assert_eq!((v.peers.len(), v.ignored.len()), (1, 0));
        let mut twin = mine.clone();
        twin.subnets = LeaseSubnets::parse_key("10.244.1.0-24&fd00::-64").unwrap();
        twin.attrs.public_ip = Some("198.18.0.30".parse().unwrap());
        let v = validate_peers(&c, &own, [(&twin, 0)]);
        assert_eq!(
            v.ignored[0].reason,
            IgnoreReason::OverlapsOwnSubnet,
            "{v:?}"
        );
    }

    #[test]
    fn of_overlapping_leases_the_older_wins_on_every_node() {
        let c = cfg(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd74:10::/56","Backend":{"Type":"host-gw"}}"#,
        );
        let mut a = lease("10.244.2.0-24&fd74:10:0:2::-64", "198.18.0.12", "-");
        a.attrs.public_ipv6 = Some("fd74:7769::12".parse().unwrap());
        a.attrs.backend_type = "host-gw".into();
        // Same IPv4 subnet, another IPv6 one: overlaps.
        let mut b = a.clone();
        b.subnets = LeaseSubnets::parse_key("10.244.2.0-24&fd74:10:0:3::-64").unwrap();
        b.attrs.public_ip = Some("198.18.0.13".parse().unwrap());
        b.attrs.public_ipv6 = Some("fd74:7769::13".parse().unwrap());
        for own in [
            OwnNode::default(),
            OwnNode {
                public_v4: Some("198.18.0.99".parse().unwrap()),
                ..OwnNode::default()
            },
        ] {
            for order in [[(&a, 5), (&b, 9)], [(&b, 9), (&a, 5)]] {
                let v = validate_peers(&c, &own, order);
                assert_eq!(v.peers, vec![a.clone()]);
                assert_eq!(v.ignored[0].key, b.subnets.key());
                assert_eq!(v.ignored[0].reason, IgnoreReason::OverlapsLease);
                assert!(v.ignored[0].detail.contains(&a.subnets.key()), "{v:?}");
            }
        }
        // Same revision (another store): the lower key wins.
        let v = validate_peers(&c, &OwnNode::default(), [(&b, 1), (&a, 1)]);
        assert_eq!(v.peers, vec![a.clone()]);
        // An IPv6 subnet outside IPv6Network, or without PublicIPv6.
        let mut c6 = a.clone();
        c6.subnets = LeaseSubnets::parse_key("10.244.4.0-24&fd00::-64").unwrap();
        let mut n6 = a.clone();
        n6.subnets = LeaseSubnets::parse_key("10.244.5.0-24&fd74:10:0:5::-64").unwrap();
        n6.attrs.public_ipv6 = None;
        let v = validate_peers(&c, &OwnNode::default(), [(&c6, 1), (&n6, 2)]);
        let reasons: Vec<IgnoreReason> = v.ignored.iter().map(|i| i.reason).collect();
        assert_eq!(
            reasons,
            [IgnoreReason::OutsideNetwork, IgnoreReason::BadPublicIp]
        );
    }

    #[test]
    fn validation_property_every_node_agrees_and_keeps_only_disjoint_valid_peers() {
        use rand::seq::SliceRandom;
        let c = cfg(
            r#"{"Network":"10.244.0.0/20","EnableIPv6":true,"IPv6Network":"fd74:10::/60","Backend":{"Type":"vxlan"}}"#,
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(15);
        let own = OwnNode {
            subnets: Some(LeaseSubnets::parse_key("10.244.1.0-24&fd74:10:0:1::-64").unwrap()),
            public_v4: Some("198.18.0.11".parse().unwrap()),
            public_v6: Some("fd74:7769::11".parse().unwrap()),
        };
        let publics = [
            "198.18.0.12",
            "198.18.0.11",
            "0.0.0.0",
            "224.0.0.5",
            "10.244.3.3",
        ];
        let macs = ["0e:00:00:00:00:02", "ff:ff:ff:ff:ff:ff", "bad"];
        for _ in 0..300 {
            let n = rng.random_range(0..40);
            let leases: Vec<(Lease, i64)> = (0..n)
                .map(|_| {
                    let len = [24u8, 24, 24, 23, 25][rng.random_range(0..5)];
                    let third = rng.random_range(0u8..20);
                    let v4 = Ipv4Net::new(Ipv4Addr::new(10, 244, third, 0), len)
                        .unwrap()
                        .trunc();
                    let v6 = Ipv6Net::new(
                        Ipv6Addr::new(0xfd74, 0x10, 0, rng.random_range(0..20), 0, 0, 0, 0),
                        64,
                    )
                    .unwrap();
                    let subnets = LeaseSubnets {
                        v4: Some(v4),
                        v6: rng.random_bool(0.8).then_some(v6),
                    };
                    let mac = macs[rng.random_range(0..macs.len())];
                    let mut l = lease(
                        &subnets.key(),
                        publics[rng.random_range(0..publics.len())],
                        mac,
                    );
                    l.attrs.public_ipv6 = Some("fd74:7769::12".parse().unwrap());
                    l.attrs.backend_v6_data = Some(serde_json::json!({"VNI": 1, "VtepMAC": mac}));
                    (l.subnets.key(), (l, rng.random_range(0..50)))
                })
                .collect::<std::collections::BTreeMap<_, _>>() // keys are unique in a store
                .into_values()
                .collect();
            let v = validate_peers(&c, &own, leases.iter().map(|(l, r)| (l, *r)));
            // Every lease but ours is used or ignored, once.
            let others = leases
                .iter()
                .filter(|(l, _)| Some(l.subnets) != own.subnets)
                .count();
            assert_eq!(v.peers.len() + v.ignored.len(), others);
            // What is used is valid and disjoint, from ours and from each other.
            for (i, p) in v.peers.iter().enumerate() {
                assert!(check_one(&c, &own, p).is_ok(), "{p:?}");
                for q in &v.peers[i + 1..] {
                    assert!(!overlaps(&p.subnets, &q.subnets), "{p:?} / {q:?}");
                }
            }
            // Every node sees the leases in its own order and decides alike.
            let mut shuffled = leases.clone();
            shuffled.shuffle(&mut rng);
            let w = validate_peers(&c, &own, shuffled.iter().map(|(l, r)| (l, *r)));
            let keys =
                |ls: &[Lease]| -> BTreeSet<String> { ls.iter().map(|l| l.subnets.key()).collect() };
            assert_eq!(keys(&v.peers), keys(&w.peers));
            let ignored = |x: &Validated| -> BTreeSet<(String, IgnoreReason)> {
                x.ignored
                    .iter()
                    .map(|i| (i.key.clone(), i.reason))
                    .collect()
            };
            assert_eq!(ignored(&v), ignored(&w));
        }
    }

    #[test]
    fn lease_json_keeps_the_node_identity_and_reads_flannels() {
        let ours = LeaseAttrs {
            public_ip: Some("198.18.0.12".parse().unwrap()),
            backend_type: "host-gw".into(),
            node_id: Some("0123456789abcdef".into()),
            ..LeaseAttrs::default()
        };
        let json = ours.to_json();
        assert_eq!(
            json,
            r#"{"PublicIP":"198.18.0.12","BackendType":"host-gw","TwillNodeID":"0123456789abcdef"}"#
        );
        assert_eq!(LeaseAttrs::parse("k", json.as_bytes()).unwrap(), ours);
        // flannel's own leases have no identity.
        let flannel = LeaseAttrs::parse(
            "k",
            br#"{"PublicIP":"198.18.0.12","BackendType":"host-gw"}"#,
        )
        .unwrap();
        assert_eq!(flannel.node_id, None);
    }

    #[test]
    fn macs() {
        assert_eq!(format_mac(&[2, 0, 0xab, 0, 0, 1]), "02:00:ab:00:00:01");
        assert_eq!(parse_mac("02:00:ab:00:00:01"), Some([2, 0, 0xab, 0, 0, 1]));
        assert_eq!(parse_mac("02:00:ab:00:00"), None);
        assert_eq!(parse_mac("02:00:ab:00:00:01:02"), None);
    }
}
