//! The check a network config passes before the node changes anything: its `Network` (and
//! `IPv6Network`) must not hold the node's own place in the underlay.
//!
//! A Network that contains the uplink's address, the public address or the default route (or
//! its gateway) would make routes to "peer subnets" shadow the underlay itself, and the node's
//! own routes look like stale peers; the node waits for a config it can use instead, touching
//! nothing (see [`crate::overlay::node`]).

use std::net::IpAddr;

use ipnet::IpNet;

use crate::overlay::Uplink;
use crate::overlay::config::NetworkConfig;
use crate::overlay::kernel::Route;

/// Why a network config cannot be used on this node: its Network would swallow the node's own
/// place in the underlay, so routes to "peer subnets" would shadow the underlay itself.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum NetworkClash {
    /// The Network contains an address of the uplink (or the public address given).
    #[error(
        "network config {field} {network} contains {what} {addr} of the uplink {iface}: the \
         overlay would route the node's own underlay into the tunnel; choose a {field} that \
         does not hold the node's addresses"
    )]
    UplinkAddress {
        /// `Network` or `IPv6Network`.
        field: &'static str,
        /// Its value.
        network: IpNet,
        /// "the address" or "the public address".
        what: &'static str,
        /// The address (with its prefix when it is on the uplink).
        addr: String,
        /// The uplink's name.
        iface: String,
    },
    /// The Network contains the node's default route (or its gateway).
    #[error(
        "network config {field} {network} contains the node's default route ({route}): the \
         overlay would route the node's way out into the tunnel; choose a {field} that does not \
         hold the default route or its gateway"
    )]
    DefaultRoute {
        /// `Network` or `IPv6Network`.
        field: &'static str,
        /// Its value.
        network: IpNet,
        /// The default route, as `ip route` prints it.
        route: String,
    },
}

/// Refuses a Network (or IPv6Network) that contains the uplink's addresses, the public address,
/// the default route (a `/0` Network) or the default route's gateway. `routes` are the node's
/// main-table routes (only the default ones matter). Pure; run before anything is changed.
pub fn check_network(
    cfg: &NetworkConfig,
    uplink: &Uplink,
    routes: &[Route],
) -> Result<(), NetworkClash> {
    let nets: [(&'static str, Option<IpNet>); 2] = [
        (
            "Network",
            cfg.network.filter(|_| cfg.enable_ipv4).map(IpNet::V4),
        ),
        (
            "IPv6Network",
            cfg.ipv6_network.filter(|_| cfg.enable_ipv6).map(IpNet::V6),
        ),
    ];
    for (field, network) in nets {
        let Some(network) = network else { continue };
        let publics = [
            uplink.public_v4.map(IpAddr::V4),
            uplink.public_v6.map(IpAddr::V6),
        ];
        let on_uplink = uplink
            .nets
            .iter()
            .filter(|n| !matches!(n.addr(), IpAddr::V6(a) if a.is_unicast_link_local()))
            .map(|n| ("the address", n.addr(), n.to_string()));
        let public = publics
            .into_iter()
            .flatten()
            .map(|a| ("the public address", a, a.to_string()));
        if let Some((what, _, addr)) = on_uplink
            .chain(public)
            .find(|(_, a, _)| network.contains(a))
        {
            return Err(NetworkClash::UplinkAddress {
                field,
                network,
                what,
                addr,
                iface: uplink.name.clone(),
            });
        }
        for r in routes.iter().filter(|r| {
            r.dst.prefix_len() == 0 && r.dst.addr().is_ipv4() == network.addr().is_ipv4()
        }) {
            if network.prefix_len() == 0 || r.gateway.is_some_and(|g| network.contains(&g)) {
                let via = r.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
                let dev = if r.oif == uplink.index {
                    format!(" dev {}", uplink.name)
                } else {
                    format!(" dev #{}", r.oif)
                };
                return Err(NetworkClash::DefaultRoute {
                    field,
                    network,
                    route: format!("default{via}{dev}"),
                });
            }
        }
        if network.prefix_len() == 0 {
            return Err(NetworkClash::DefaultRoute {
                field,
                network,
                route: "default".into(),
            });
        }
    }
    Ok(())
}
