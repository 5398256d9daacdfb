//! Subnet leases in flannel's etcd schema, and the choice of a free subnet.
//!
//! A lease is a key `<prefix>/subnets/<ip>-<len>` (dual stack: `<v4>-<len>&<v6>-<len>`) whose
//! value is flannel's `LeaseAttrs` JSON. Keeping both byte for byte as flannel writes them is what
//! lets a flannel node and a twill node see each other as peers.
//!
//! The allocator is pure: it takes the taken subnets and a random source, and returns a candidate.
//! The store decides whether the candidate really was free (an etcd transaction), so two nodes
//! racing for one subnet cannot both win.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::SystemTime;

use ipnet::{Ipv4Net, Ipv6Net};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::config::NetworkConfig;

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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

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

    #[test]
    fn macs() {
        assert_eq!(format_mac(&[2, 0, 0xab, 0, 0, 1]), "02:00:ab:00:00:01");
        assert_eq!(parse_mac("02:00:ab:00:00:01"), Some([2, 0, 0xab, 0, 0, 1]));
        assert_eq!(parse_mac("02:00:ab:00:00"), None);
        assert_eq!(parse_mac("02:00:ab:00:00:01:02"), None);
    }
}
