//! Finding the node's uplink and public addresses, flannel's way: `--iface` (names or addresses,
//! first match wins), else the device of the default route; `--public-ip` overrides the address
//! published to peers.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::overlay::Uplink;
use crate::overlay::kernel::{Addr, Kernel, KernelError, LinkInfo, Route};

/// Why no uplink could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// Reading links/addresses/routes failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// No `--iface` matched.
    #[error("no interface matches --iface {0:?} (give a device name or one of its addresses)")]
    NoMatch(Vec<String>),
    /// No default route to pick an interface from.
    #[error("no --iface given and no default route to pick an interface from")]
    NoDefaultRoute,
    /// The chosen interface has no usable address of a needed family.
    #[error("interface {iface} has no {family} address (needed for the {family} overlay)")]
    NoAddress {
        /// The interface.
        iface: String,
        /// "IPv4" or "IPv6".
        family: &'static str,
    },
}

fn global_v6(a: &Ipv6Addr) -> bool {
    !a.is_loopback() && !a.is_unicast_link_local() && !a.is_multicast()
}

/// What the command line asks for.
#[derive(Debug, Clone, Default)]
pub struct Wish {
    /// `--iface` values (names or addresses), first match wins; empty: the default route's.
    pub ifaces: Vec<String>,
    /// The IPv4 overlay is enabled (an IPv4 address is needed).
    pub want_v4: bool,
    /// The IPv6 overlay is enabled (a global IPv6 address is needed).
    pub want_v6: bool,
    /// `--public-ip`.
    pub public_v4: Option<Ipv4Addr>,
    /// `--public-ipv6`.
    pub public_v6: Option<Ipv6Addr>,
}

/// Picks the uplink from pure inputs (links, addresses, default routes).
pub fn choose(
    links: &[LinkInfo],
    addrs: &[Addr],
    defaults: &[Route],
    wish: &Wish,
) -> Result<Uplink, UplinkError> {
    let (ifaces, want_v4, want_v6) = (&wish.ifaces, wish.want_v4, wish.want_v6);
    let link = if ifaces.is_empty() {
        let idx = defaults
            .iter()
            .find(|r| r.dst.prefix_len() == 0 && r.oif != 0)
            .map(|r| r.oif)
            .ok_or(UplinkError::NoDefaultRoute)?;
        links.iter().find(|l| l.index == idx)
    } else {
        ifaces.iter().find_map(|want| {
            if let Ok(ip) = want.parse::<IpAddr>() {
                let idx = addrs.iter().find(|a| a.net.addr() == ip)?.ifindex;
                links.iter().find(|l| l.index == idx)
            } else {
                links.iter().find(|l| &l.name == want)
            }
        })
    }
    .ok_or_else(|| UplinkError::NoMatch(ifaces.clone()))?;

    let nets: Vec<IpNet> = addrs
        .iter()
        .filter(|a| a.ifindex == link.index)
        .map(|a| a.net)
        .collect();
    let first_v4 = nets.iter().find_map(|n| match n.addr() {
        IpAddr::V4(a) if !a.is_loopback() => Some(a),
        _ => None,
    });
    let first_v6 = nets.iter().find_map(|n| match n.addr() {
        IpAddr::V6(a) if global_v6(&a) => Some(a),
        _ => None,
    });
    let public_v4 = wish.public_v4.or(first_v4);
    let public_v6 = wish.public_v6.or(first_v6);
    if want_v4 && public_v4.is_none() {
        return Err(UplinkError::NoAddress {
            iface: link.name.clone(),
            family: "IPv4",
        });
    }
    if want_v6 && public_v6.is_none() {
        return Err(UplinkError::NoAddress {
            iface: link.name.clone(),
            family: "IPv6",
        });
    }
    Ok(Uplink {
        index: link.index,
        name: link.name.clone(),
        mtu: link.mtu,
        public_v4: public_v4.filter(|_| want_v4),
        public_v6: public_v6.filter(|_| want_v6),
        nets,
    })
}

/// Reads the kernel and picks the uplink.
pub async fn discover<K: Kernel>(k: &K, wish: &Wish) -> Result<Uplink, UplinkError> {
    let links = k.links().await?;
    let addrs = k.addresses().await?;
    let mut defaults = Vec::new();
    if wish.ifaces.is_empty() {
        if wish.want_v4 {
            defaults.extend(k.routes(false).await?);
        }
        defaults.extend(k.routes(true).await?);
    }
    choose(&links, &addrs, &defaults, wish)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str) -> LinkInfo {
        LinkInfo {
            index,
            name: name.into(),
            mac: None,
            mtu: 1500,
            up: true,
            vxlan: None,
        }
    }

    /// `--iface` values `ifaces`, the families wanted, no `--public-ip`.
    fn wish(ifaces: &[&str], want_v4: bool, want_v6: bool) -> Wish {
        Wish {
            ifaces: ifaces.iter().map(ToString::to_string).collect(),
            want_v4,
            want_v6,
            ..Wish::default()
        }
    }

    fn addr(ifindex: u32, net: &str) -> Addr {
        Addr {
            ifindex,
            net: net.parse().unwrap(),
        }
    }

    #[test]
    fn by_name_address_and_default_route() {
        let links = [link(1, "lo"), link(2, "eth0"), link(3, "eth1")];
        let addrs = [
            addr(1, "127.0.0.1/8"),
            addr(2, "198.18.0.11/24"),
            addr(2, "fe80::1/64"),
            addr(2, "fd74::11/64"),
            addr(3, "10.9.0.5/16"),
        ];
        let pick = |routes: &[Route], w: &Wish| choose(&links, &addrs, routes, w);
        let up = pick(&[], &wish(&["eth9", "eth1"], true, false)).unwrap();
        assert_eq!(up.name, "eth1");
        assert_eq!(up.public_v4.unwrap().to_string(), "10.9.0.5");
        let up = pick(&[], &wish(&["198.18.0.11"], true, true)).unwrap();
        assert_eq!(up.name, "eth0");
        assert_eq!(up.public_v6.unwrap().to_string(), "fd74::11");
        let default = Route {
            dst: "0.0.0.0/0".parse().unwrap(),
            gateway: None,
            oif: 3,
            onlink: false,
            proto: crate::overlay::kernel::PROTO_BOOT,
        };
        let public = Wish {
            public_v4: Some("203.0.113.1".parse().unwrap()),
            ..wish(&[], true, false)
        };
        let up = pick(&[default], &public).unwrap();
        assert_eq!(up.name, "eth1");
        assert_eq!(up.public_v4.unwrap().to_string(), "203.0.113.1");
        let err = pick(&[], &wish(&["eth7"], true, false)).unwrap_err();
        assert!(err.to_string().contains("eth7"));
        let err = pick(&[], &wish(&["eth1"], true, true)).unwrap_err();
        assert!(err.to_string().contains("IPv6") && err.to_string().contains("eth1"));
        assert!(matches!(
            pick(&[], &wish(&[], true, false)),
            Err(UplinkError::NoDefaultRoute)
        ));
    }
}
