//! The vxlan backend: a kernel VXLAN device per address family, and per peer exactly three
//! entries, as flannel's.
//!
//! A route to the peer's subnet via its VTEP address (`<subnet>.0`, `onlink`), a permanent
//! neighbour entry mapping that address to its VTEP MAC (so the kernel never ARPs across the
//! overlay), and an FDB entry mapping the MAC to the peer's public IP (so the kernel knows where
//! to send the encapsulated frame). No learning, no multicast: the control plane is the only
//! source of truth, and L2 misses cannot happen for a known peer. With `DirectRouting`, a peer on
//! the uplink's L2 network gets host-gw's plain route instead. The node publishes its device's
//! MAC as `VtepMAC` in the lease.

use std::net::IpAddr;

use crate::overlay::backend::{Backend, DeviceSpec, PeerFamily, direct_route, same_l2};
use crate::overlay::config::NetworkConfig;
use crate::overlay::kernel::{Fdb, Neigh, PROTO_TWILL, Route, VxlanSpec};
use crate::overlay::lease::{VxlanData, format_mac, parse_mac};
use crate::overlay::{Desired, Device, Uplink};

/// VXLAN overhead over an IPv4 underlay (outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14).
pub const VXLAN_OVERHEAD_V4: u32 = 50;

/// VXLAN overhead over an IPv6 underlay (outer IPv6 header is 20 bytes larger).
pub const VXLAN_OVERHEAD_V6: u32 = 70;

/// Device name for the IPv4 VXLAN device.
pub fn vxlan_name(vni: u32, v6: bool) -> String {
    if v6 {
        format!("flannel-v6.{vni}")
    } else {
        format!("flannel.{vni}")
    }
}

/// The vxlan backend.
#[derive(Debug, Clone, Copy)]
pub struct Vxlan;

impl Backend for Vxlan {
    fn overhead(&self, cfg: &NetworkConfig) -> u32 {
        if cfg.enable_ipv6 {
            VXLAN_OVERHEAD_V6
        } else {
            VXLAN_OVERHEAD_V4
        }
    }

    fn devices(&self, cfg: &NetworkConfig, uplink: &Uplink, mtu: u32) -> Vec<(bool, DeviceSpec)> {
        let families = [
            (false, cfg.enable_ipv4, uplink.public_v4.map(IpAddr::V4)),
            (true, cfg.enable_ipv6, uplink.public_v6.map(IpAddr::V6)),
        ];
        families
            .into_iter()
            .filter_map(|(v6, enabled, local)| {
                let local = local.filter(|_| enabled)?;
                let spec = VxlanSpec {
                    name: vxlan_name(cfg.backend.vni, v6),
                    vni: cfg.backend.vni,
                    local,
                    uplink: uplink.index,
                    port: cfg.backend.port,
                    mtu,
                };
                Some((v6, DeviceSpec::Vxlan(spec)))
            })
            .collect()
    }

    fn lease_data(&self, cfg: &NetworkConfig, dev: &Device) -> Option<serde_json::Value> {
        let data = VxlanData {
            vni: cfg.backend.vni,
            vtep_mac: format_mac(&dev.mac),
        };
        Some(serde_json::to_value(data).expect("vxlan data serializes"))
    }

    fn peer_entries(
        &self,
        d: &mut Desired,
        cfg: &NetworkConfig,
        uplink: &Uplink,
        peer: &PeerFamily<'_>,
    ) {
        if cfg.backend.direct_routing && same_l2(uplink, peer.public) {
            d.routes.insert(direct_route(uplink, peer));
            return;
        }
        let (Some(dev), Some(data)) = (peer.dev, peer.attrs.vxlan(peer.v6)) else {
            return;
        };
        let Some(mac) = parse_mac(&data.vtep_mac) else {
            tracing::warn!(peer = %peer.subnet, mac = %data.vtep_mac, "peer lease has an invalid VtepMAC");
            return;
        };
        d.fdb.insert(Fdb {
            ifindex: dev.index,
            mac,
            dst: peer.public,
        });
        d.neighs.insert(Neigh {
            ifindex: dev.index,
            ip: peer.vtep_ip,
            mac,
        });
        d.routes.insert(Route {
            dst: peer.subnet,
            gateway: Some(peer.vtep_ip),
            oif: dev.index,
            onlink: true,
            proto: PROTO_TWILL,
        });
    }
}
