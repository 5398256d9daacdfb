//! Subnet leases in flannel's etcd schema: the keys, the values, the MACs in them.
//!
//! A lease is a key `<prefix>/subnets/<ip>-<len>` (dual stack: `<v4>-<len>&<v6>-<len>`) whose
//! value is flannel's `LeaseAttrs` JSON. Keeping both byte for byte as flannel writes them is what
//! lets a flannel node and a twill node see each other as peers.
//!
//! Beside the schema: [`alloc`], the pure choice of a free subnet, and [`validate`], the checks a
//! peer's lease passes before the overlay uses it.

pub mod alloc;
pub mod validate;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

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

#[cfg(test)]
mod tests;
