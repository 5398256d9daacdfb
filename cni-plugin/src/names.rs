//! Deterministic names and MAC addresses.
//!
//! The host end of a pod's veth is named from a stable hash of (network, container ID, ifname), so
//! DEL finds it without the container's netns (which may be gone), a repeated ADD finds the stale
//! one, and GC can tell twill's veths apart. The hash is FNV-1a, written out here, because the
//! name must not change when the binary is rebuilt with another Rust release (std's hasher makes
//! no such promise). MACs are fixed too: `0a:58:<IPv4>` for the pod end (the convention of
//! OVN-Kubernetes and the old reference bridge plugin, so a reused IP keeps its MAC and peers'
//! ARP caches stay right), a hash for the host end, and `0a:58:<gateway>` for the bridge, which
//! is set explicitly so the bridge does not take over its lowest port's MAC as pods come and go.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// Prefix of every host-side veth twill creates.
pub const VETH_PREFIX: &str = "tw";

/// The longest alias the kernel keeps on a link (`IFALIASZ` - 1).
pub const MAX_ALIAS_LEN: usize = 255;

// The longest network name, container ID and interface name twill takes fit in an alias.
const _: () = assert!(
    "twill:".len()
        + crate::config::MAX_NETWORK_NAME_LEN
        + 1
        + crate::env::MAX_CONTAINER_ID_LEN
        + 1
        + 15
        <= MAX_ALIAS_LEN
);

/// The alias twill writes on a host veth: `twill:<network>:<containerID>:<ifname>`.
/// `:` cannot occur in any of the three (network names and container IDs are restricted, and
/// Linux rejects `:` in interface names), so the alias splits back unambiguously.
pub fn alias(network: &str, container_id: &str, ifname: &str) -> String {
    format!("twill:{network}:{container_id}:{ifname}")
}

/// Splits an alias written by [`alias`] for `network` into (container ID, ifname).
pub fn parse_alias<'a>(network: &str, alias: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = alias
        .strip_prefix("twill:")?
        .strip_prefix(network)?
        .strip_prefix(':')?;
    let (id, ifname) = rest.split_once(':')?;
    (!id.is_empty() && !ifname.is_empty() && !ifname.contains(':')).then_some((id, ifname))
}

/// 64-bit FNV-1a over the parts, each followed by a NUL so `("ab","c")` ≠ `("a","bc")`.
pub fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The host-side veth name: `tw` + 13 hex digits (15 bytes, the kernel's limit).
pub fn host_veth(network: &str, container_id: &str, ifname: &str) -> String {
    let h = fnv1a(&[network, container_id, ifname]);
    format!("{VETH_PREFIX}{:013x}", h >> 12)
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(mac: &[u8; 6]) -> String {
    let mut s = String::with_capacity(17);
    for (i, b) in mac.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// `0a:58:` followed by the IPv4 address: locally administered, unicast.
pub fn mac_from_ipv4(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x0a, 0x58, o[0], o[1], o[2], o[3]]
}

/// A locally administered unicast MAC from a hash of `parts` (first octet `0e`).
pub fn mac_from_hash(parts: &[&str]) -> [u8; 6] {
    let h = fnv1a(parts).to_be_bytes();
    [0x0e, h[3], h[4], h[5], h[6], h[7]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_are_stable_and_short() {
        let n = host_veth("twill", "abc", "eth0");
        assert_eq!(n.len(), 15);
        assert!(n.starts_with("tw"));
        // Pinned: changing the hash would orphan veths of running pods across an upgrade.
        assert_eq!(n, "twbf9f49e4bdbb4");
        assert_eq!(fnv1a(&[]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(&["a"]), 0x089b_e207_b544_f1e4);
        assert_ne!(
            host_veth("twill", "abc", "eth0"),
            host_veth("twill", "abc", "eth1")
        );
        assert_ne!(
            host_veth("twill", "ab", "ceth0"),
            host_veth("twill", "abc", "eth0")
        );
        assert_ne!(
            host_veth("other", "abc", "eth0"),
            host_veth("twill", "abc", "eth0")
        );
    }

    #[test]
    fn macs() {
        let m = mac_from_ipv4("10.244.1.5".parse().unwrap());
        assert_eq!(mac_string(&m), "0a:58:0a:f4:01:05");
        let h = mac_from_hash(&["x"]);
        assert_eq!(h[0] & 0x01, 0, "unicast");
        assert_eq!(h[0] & 0x02, 0x02, "locally administered");
    }

    #[test]
    fn alias_round_trips() {
        let a = alias("twill", "abc-1.2_3", "eth0");
        assert_eq!(parse_alias("twill", &a), Some(("abc-1.2_3", "eth0")));
        assert_eq!(parse_alias("twil", &a), None);
        assert_eq!(parse_alias("twill2", &a), None);
        assert_eq!(parse_alias("twill", "something else"), None);
    }
}
