//! The overlay: desired state from leases, a pure diff against what the kernel has, and an
//! idempotent apply.
//!
//! Like flannel's VXLAN backend, every remote node gets exactly three entries: a route to its
//! subnet via its VTEP address (`<subnet>.0`, `onlink`), a permanent neighbour entry mapping that
//! address to its VTEP MAC (so the kernel never ARPs across the overlay), and an FDB entry mapping
//! the MAC to the node's public IP (so the kernel knows where to send the encapsulated frame).
//! No learning, no multicast: the control plane (etcd) is the only source of truth, and L2 misses
//! cannot happen for a known peer. host-gw needs only the route, via the peer's public IP.
//!
//! Ownership: twill owns the VXLAN devices it creates, every permanent neighbour and FDB entry on
//! them, and the main-table routes it wrote. Every route twill writes carries the routing
//! protocol [`PROTO_TWILL`] (`proto 116`), and a route is read as twill's only when it carries
//! that mark, whatever its destination: a route someone added by hand inside the cluster network,
//! the kernel's connected routes (`proto kernel`, never touched) and a route to a subnet a peer
//! lease names but twill never wrote are all left alone. A destination inside the Network is no
//! proof of ownership: a Network that overlaps the underlay would make the node's own routes
//! look like stale peers (so such a Network is also refused, see [`check_network`]).
//!
//! Routes written before the mark existed (older twill, or flannel before a node was switched
//! to twill) are adopted only on twill's own devices: a route whose output device is the VXLAN
//! or TUN device twill owns, and which the kernel did not make itself, is twill's; the next
//! reconcile rewrites it with the mark, or deletes it if no lease wants it. An unmarked host-gw
//! route of an older version (via the uplink) is never adopted: it is replaced with a marked one
//! when a lease still names its subnet, and otherwise left for the admin
//! (`ip route show proto boot`).

pub mod backend;
pub mod config;
pub mod counter;
pub mod kernel;
pub mod lease;
pub mod masq;
pub mod node;
pub mod source;
pub mod uplink;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::overlay::config::{BackendType, NetworkConfig};
use crate::overlay::kernel::{
    Addr, Fdb, Kernel, KernelError, LinkInfo, Neigh, PROTO_KERNEL, PROTO_TWILL, Route, VxlanSpec,
};
use crate::overlay::lease::{Lease, LeaseAttrs, LeaseSubnets, VxlanData, format_mac, parse_mac};

/// VXLAN overhead over an IPv4 underlay (outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14).
pub const VXLAN_OVERHEAD_V4: u32 = 50;
/// VXLAN overhead over an IPv6 underlay (outer IPv6 header is 20 bytes larger).
pub const VXLAN_OVERHEAD_V6: u32 = 70;

/// The node's place in the underlay, found once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uplink {
    /// The uplink device.
    pub index: u32,
    /// Its name.
    pub name: String,
    /// Its MTU.
    pub mtu: u32,
    /// Public IPv4 address (VTEP, lease `PublicIP`).
    pub public_v4: Option<Ipv4Addr>,
    /// Public IPv6 address.
    pub public_v6: Option<Ipv6Addr>,
    /// Prefixes on the uplink, to tell which peers share its L2 (host-gw, DirectRouting).
    pub nets: Vec<IpNet>,
}

/// One VXLAN device of the node, as it is in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// ifindex.
    pub index: u32,
    /// Name (`flannel.1`).
    pub name: String,
    /// VTEP MAC (published in the lease).
    pub mac: [u8; 6],
    /// Its MTU.
    pub mtu: u32,
}

/// The node's VXLAN devices (none for host-gw).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Devices {
    /// `flannel.<VNI>` (IPv4 overlay).
    pub v4: Option<Device>,
    /// `flannel-v6.<VNI>` (IPv6 overlay).
    pub v6: Option<Device>,
}

/// Device name for the IPv4 VXLAN device.
pub fn vxlan_name(vni: u32, v6: bool) -> String {
    if v6 {
        format!("flannel-v6.{vni}")
    } else {
        format!("flannel.{vni}")
    }
}

/// The overlay MTU pods must use.
pub fn overlay_mtu(cfg: &NetworkConfig, uplink: &Uplink) -> u32 {
    if let Some(m) = cfg.backend.mtu {
        return m;
    }
    match cfg.backend.kind {
        BackendType::Vxlan => {
            let overhead = if cfg.enable_ipv6 {
                VXLAN_OVERHEAD_V6
            } else {
                VXLAN_OVERHEAD_V4
            };
            uplink.mtu.saturating_sub(overhead)
        }
        BackendType::HostGw => uplink.mtu,
        BackendType::Udp => uplink.mtu.saturating_sub(28),
    }
}

/// The specs of the VXLAN devices this node needs.
pub fn vxlan_specs(cfg: &NetworkConfig, uplink: &Uplink) -> Vec<(bool, VxlanSpec)> {
    if cfg.backend.kind != BackendType::Vxlan {
        return Vec::new();
    }
    let mtu = overlay_mtu(cfg, uplink);
    let mut out = Vec::new();
    if cfg.enable_ipv4
        && let Some(ip) = uplink.public_v4
    {
        out.push((
            false,
            VxlanSpec {
                name: vxlan_name(cfg.backend.vni, false),
                vni: cfg.backend.vni,
                local: IpAddr::V4(ip),
                uplink: uplink.index,
                port: cfg.backend.port,
                mtu,
            },
        ));
    }
    if cfg.enable_ipv6
        && let Some(ip) = uplink.public_v6
    {
        out.push((
            true,
            VxlanSpec {
                name: vxlan_name(cfg.backend.vni, true),
                vni: cfg.backend.vni,
                local: IpAddr::V6(ip),
                uplink: uplink.index,
                port: cfg.backend.port,
                mtu,
            },
        ));
    }
    out
}

/// Makes sure each VXLAN device exists with compatible attributes, is up and has the right MTU.
/// An incompatible device (other VNI, local address or port) is deleted and created anew.
pub async fn ensure_devices<K: Kernel>(
    k: &K,
    cfg: &NetworkConfig,
    uplink: &Uplink,
) -> Result<Devices, KernelError> {
    if cfg.backend.kind == BackendType::Udp {
        // The udp backend made the TUN device (it holds its queues); here it is only found,
        // kept up at the overlay MTU, and handed to the reconciler for its address and route.
        let tun = crate::overlay::backend::udp::ensure_device(k, overlay_mtu(cfg, uplink)).await?;
        return Ok(Devices {
            v4: Some(tun),
            v6: None,
        });
    }
    let mut devices = Devices::default();
    for (v6, spec) in vxlan_specs(cfg, uplink) {
        let links = k.links().await?;
        let mut link = links.iter().find(|l| l.name == spec.name).cloned();
        if let Some(l) = &link
            && !spec.compatible(l)
        {
            tracing::warn!(device = %spec.name, existing = ?l.vxlan, "incompatible VXLAN device, recreating");
            k.delete_link(l.index).await?;
            link = None;
        }
        let link = if let Some(l) = link {
            l
        } else {
            k.create_vxlan(&spec).await?;
            find_link(k, &spec.name).await?
        };
        if !link.up || link.mtu != spec.mtu {
            k.set_up(link.index, spec.mtu).await?;
        }
        let dev = Device {
            index: link.index,
            name: spec.name.clone(),
            mac: link
                .mac
                .ok_or_else(|| KernelError::NotFound(format!("MAC of {}", spec.name)))?,
            mtu: spec.mtu,
        };
        if v6 {
            devices.v6 = Some(dev);
        } else {
            devices.v4 = Some(dev);
        }
    }
    Ok(devices)
}

async fn find_link<K: Kernel>(k: &K, name: &str) -> Result<LinkInfo, KernelError> {
    k.links()
        .await?
        .into_iter()
        .find(|l| l.name == name)
        .ok_or_else(|| KernelError::NotFound(format!("link {name}")))
}

/// What this node publishes in its lease.
pub fn lease_attrs(cfg: &NetworkConfig, uplink: &Uplink, devices: &Devices) -> LeaseAttrs {
    let data = |d: &Option<Device>| {
        // Only VXLAN publishes BackendData (flannel writes none for udp).
        d.as_ref()
            .filter(|_| cfg.backend.kind == BackendType::Vxlan)
            .map(|d| {
                serde_json::to_value(VxlanData {
                    vni: cfg.backend.vni,
                    vtep_mac: format_mac(&d.mac),
                })
                .expect("vxlan data serializes")
            })
    };
    LeaseAttrs {
        public_ip: uplink.public_v4,
        public_ipv6: if cfg.enable_ipv6 {
            uplink.public_v6
        } else {
            None
        },
        backend_type: cfg.backend.kind.as_str().to_string(),
        backend_data: data(&devices.v4),
        backend_v6_data: data(&devices.v6),
        node_id: None,
    }
}

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

/// Everything the overlay wants in the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Addresses on the VXLAN devices.
    pub addrs: Vec<Addr>,
    /// Routes to peer subnets.
    pub routes: BTreeSet<Route>,
    /// Neighbours for peer VTEPs.
    pub neighs: BTreeSet<Neigh>,
    /// FDB entries for peer VTEPs.
    pub fdb: BTreeSet<Fdb>,
}

fn same_l2(uplink: &Uplink, ip: IpAddr) -> bool {
    uplink.nets.iter().any(|n| n.contains(&ip))
}

/// Computes the desired overlay state: a pure function of the config, the node and the leases.
pub fn desired(
    cfg: &NetworkConfig,
    uplink: &Uplink,
    devices: &Devices,
    own: &LeaseSubnets,
    peers: &[Lease],
) -> Desired {
    let mut d = Desired::default();
    if let (Some(dev), Some(sn)) = (&devices.v4, own.v4) {
        d.addrs.push(Addr {
            ifindex: dev.index,
            net: IpNet::V4(Ipv4Net::new(sn.network(), 32).expect("/32")),
        });
    }
    if let (Some(dev), Some(sn)) = (&devices.v6, own.v6) {
        d.addrs.push(Addr {
            ifindex: dev.index,
            net: IpNet::V6(Ipv6Net::new(sn.network(), 128).expect("/128")),
        });
    }
    // udp: the whole cluster Network routes into the TUN; the backend picks the peer.
    if cfg.backend.kind == BackendType::Udp
        && let (Some(dev), Some(net)) = (&devices.v4, cfg.network)
    {
        d.routes.insert(Route {
            dst: IpNet::V4(net),
            gateway: None,
            oif: dev.index,
            onlink: false,
            proto: PROTO_TWILL,
        });
    }
    for peer in peers {
        if peer.subnets == *own {
            continue;
        }
        if peer.attrs.backend_type != cfg.backend.kind.as_str() {
            tracing::debug!(peer = %peer.subnets.key(), backend = %peer.attrs.backend_type, "ignoring peer of another backend");
            continue;
        }
        if cfg.enable_ipv4
            && let (Some(sn), Some(pip)) = (peer.subnets.v4, peer.attrs.public_ip)
        {
            peer_entries(
                &mut d,
                cfg,
                uplink,
                devices.v4.as_ref(),
                IpNet::V4(sn),
                IpAddr::V4(sn.network()),
                IpAddr::V4(pip),
                &peer.attrs,
                false,
            );
        }
        if cfg.enable_ipv6
            && let (Some(sn), Some(pip)) = (peer.subnets.v6, peer.attrs.public_ipv6)
        {
            peer_entries(
                &mut d,
                cfg,
                uplink,
                devices.v6.as_ref(),
                IpNet::V6(sn),
                IpAddr::V6(sn.network()),
                IpAddr::V6(pip),
                &peer.attrs,
                true,
            );
        }
    }
    d
}

#[expect(
    clippy::too_many_arguments,
    reason = "one call per family, all plain values"
)]
fn peer_entries(
    d: &mut Desired,
    cfg: &NetworkConfig,
    uplink: &Uplink,
    dev: Option<&Device>,
    subnet: IpNet,
    vtep_ip: IpAddr,
    public: IpAddr,
    attrs: &LeaseAttrs,
    v6: bool,
) {
    let direct = Route {
        dst: subnet,
        gateway: Some(public),
        oif: uplink.index,
        onlink: false,
        proto: PROTO_TWILL,
    };
    match cfg.backend.kind {
        BackendType::HostGw => {
            if same_l2(uplink, public) {
                d.routes.insert(direct);
            } else {
                tracing::warn!(peer = %subnet, %public, "host-gw peer is not on this node's L2 network; no route");
            }
        }
        BackendType::Vxlan => {
            if cfg.backend.direct_routing && same_l2(uplink, public) {
                d.routes.insert(direct);
                return;
            }
            let (Some(dev), Some(data)) = (dev, attrs.vxlan(v6)) else {
                return;
            };
            let Some(mac) = parse_mac(&data.vtep_mac) else {
                tracing::warn!(peer = %subnet, mac = %data.vtep_mac, "peer lease has an invalid VtepMAC");
                return;
            };
            d.fdb.insert(Fdb {
                ifindex: dev.index,
                mac,
                dst: public,
            });
            d.neighs.insert(Neigh {
                ifindex: dev.index,
                ip: vtep_ip,
                mac,
            });
            d.routes.insert(Route {
                dst: subnet,
                gateway: Some(vtep_ip),
                oif: dev.index,
                onlink: true,
                proto: PROTO_TWILL,
            });
        }
        // Per-peer state lives in the udp backend's routing table, not in the kernel.
        BackendType::Udp => {}
    }
}

/// What the kernel has that the overlay owns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Addresses on the VXLAN devices.
    pub addrs: Vec<Addr>,
    /// Main-table routes twill owns (see the module notes).
    pub routes: Vec<Route>,
    /// Permanent neighbours on the VXLAN devices.
    pub neighs: Vec<Neigh>,
    /// FDB entries on the VXLAN devices.
    pub fdb: Vec<Fdb>,
}

/// Whether a route read from the kernel is twill's: it carries twill's mark, or (adopted from
/// an older version, see the module notes) it leaves through one of twill's own devices and the
/// kernel did not make it.
pub fn owned_route(route: &Route, devices: &Devices) -> bool {
    route.proto == PROTO_TWILL
        || (route.proto != PROTO_KERNEL
            && [&devices.v4, &devices.v6]
                .into_iter()
                .flatten()
                .any(|d| d.index == route.oif))
}

/// Reads the part of the kernel state the overlay owns.
pub async fn observe<K: Kernel>(
    k: &K,
    cfg: &NetworkConfig,
    devices: &Devices,
) -> Result<Observed, KernelError> {
    let mut o = Observed::default();
    let dev_indices: Vec<u32> = [&devices.v4, &devices.v6]
        .into_iter()
        .flatten()
        .map(|d| d.index)
        .collect();
    if !dev_indices.is_empty() {
        o.addrs = k
            .addresses()
            .await?
            .into_iter()
            .filter(|a| dev_indices.contains(&a.ifindex))
            .filter(|a| !matches!(a.net.addr(), IpAddr::V6(v6) if v6.is_unicast_link_local()))
            .collect();
    }
    if cfg.enable_ipv4 {
        o.routes.extend(
            k.routes(false)
                .await?
                .into_iter()
                .filter(|r| owned_route(r, devices)),
        );
    }
    if cfg.enable_ipv6 {
        o.routes.extend(
            k.routes(true)
                .await?
                .into_iter()
                .filter(|r| owned_route(r, devices)),
        );
    }
    for i in dev_indices {
        o.neighs.extend(k.neighbours(i).await?);
        o.fdb.extend(k.fdb(i).await?);
    }
    Ok(o)
}

/// One kernel operation of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Add an address to a VXLAN device.
    AddAddr(Addr),
    /// Remove a stale address.
    DelAddr(Addr),
    /// Add or fix an FDB entry.
    ReplaceFdb(Fdb),
    /// Add or fix a neighbour.
    ReplaceNeigh(Neigh),
    /// Add or fix a route.
    ReplaceRoute(Route),
    /// Remove a route.
    DelRoute(Route),
    /// Remove a neighbour.
    DelNeigh(Neigh),
    /// Remove an FDB entry.
    DelFdb(Fdb),
}

/// The minimal list of operations that turns `observed` into `desired`. Additions come in the
/// order a packet needs them (FDB, neighbour, then route); removals in the reverse order, so no
/// packet is routed into an entry that is not there.
pub fn plan(desired: &Desired, observed: &Observed) -> Vec<Op> {
    let mut ops = Vec::new();
    for a in &desired.addrs {
        if !observed.addrs.contains(a) {
            ops.push(Op::AddAddr(*a));
        }
    }
    let observed_fdb: BTreeSet<&Fdb> = observed.fdb.iter().collect();
    ops.extend(
        desired
            .fdb
            .iter()
            .filter(|f| !observed_fdb.contains(f))
            .cloned()
            .map(Op::ReplaceFdb),
    );
    let observed_neigh: BTreeSet<&Neigh> = observed.neighs.iter().collect();
    ops.extend(
        desired
            .neighs
            .iter()
            .filter(|n| !observed_neigh.contains(n))
            .cloned()
            .map(Op::ReplaceNeigh),
    );
    // Routes are keyed by destination: one route per peer subnet.
    let mut observed_routes: BTreeMap<IpNet, Vec<&Route>> = BTreeMap::new();
    for r in &observed.routes {
        observed_routes.entry(r.dst).or_default().push(r);
    }
    let desired_dsts: BTreeSet<IpNet> = desired.routes.iter().map(|r| r.dst).collect();
    for r in &desired.routes {
        let present = observed_routes
            .get(&r.dst)
            .is_some_and(|v| v.len() == 1 && v[0] == r);
        if !present {
            ops.push(Op::ReplaceRoute(r.clone()));
        }
    }
    for r in &observed.routes {
        if !desired_dsts.contains(&r.dst) {
            ops.push(Op::DelRoute(r.clone()));
        }
    }
    let desired_neigh_keys: BTreeSet<(u32, IpAddr)> =
        desired.neighs.iter().map(|n| (n.ifindex, n.ip)).collect();
    for n in &observed.neighs {
        if !desired_neigh_keys.contains(&(n.ifindex, n.ip)) {
            ops.push(Op::DelNeigh(n.clone()));
        }
    }
    for f in &observed.fdb {
        if !desired.fdb.contains(f) {
            ops.push(Op::DelFdb(f.clone()));
        }
    }
    for a in &observed.addrs {
        if !desired.addrs.contains(a) {
            ops.push(Op::DelAddr(*a));
        }
    }
    ops
}

/// Applies a plan. Every operation is attempted; the first error is returned after the rest ran,
/// so one bad peer does not keep the others from being programmed.
pub async fn apply<K: Kernel>(k: &K, ops: &[Op]) -> Result<(), KernelError> {
    let mut first_err = None;
    for op in ops {
        tracing::debug!(?op, "apply");
        let r = match op {
            Op::AddAddr(a) => k.add_address(*a).await,
            Op::DelAddr(a) => k.del_address(*a).await,
            Op::ReplaceFdb(f) => k.replace_fdb(f).await,
            Op::ReplaceNeigh(n) => k.replace_neigh(n).await,
            Op::ReplaceRoute(r) => k.replace_route(r).await,
            Op::DelRoute(r) => k.del_route(r).await,
            Op::DelNeigh(n) => k.del_neigh(n).await,
            Op::DelFdb(f) => k.del_fdb(f).await,
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, ?op, "kernel operation failed");
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Observes, plans and applies; returns the operations applied.
pub async fn reconcile<K: Kernel>(
    k: &K,
    cfg: &NetworkConfig,
    uplink: &Uplink,
    devices: &Devices,
    own: &LeaseSubnets,
    peers: &[Lease],
) -> Result<Vec<Op>, KernelError> {
    let want = desired(cfg, uplink, devices, own, peers);
    let have = observe(k, cfg, devices).await?;
    let ops = plan(&want, &have);
    apply(k, &ops).await?;
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::kernel::PROTO_BOOT;
    use crate::overlay::kernel::fake::FakeKernel;

    fn cfg(backend: &str) -> NetworkConfig {
        NetworkConfig::parse(&format!(
            r#"{{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd74:10::/56","Backend":{backend}}}"#
        ))
        .unwrap()
    }

    fn uplink() -> Uplink {
        Uplink {
            index: 2,
            name: "eth0".into(),
            mtu: 1500,
            public_v4: Some("198.18.0.11".parse().unwrap()),
            public_v6: Some("fd74:7769::11".parse().unwrap()),
            nets: vec![
                "198.18.0.11/24".parse().unwrap(),
                "fd74:7769::11/64".parse().unwrap(),
            ],
        }
    }

    fn own() -> LeaseSubnets {
        LeaseSubnets {
            v4: Some("10.244.1.0/24".parse().unwrap()),
            v6: Some("fd74:10:0:1::/64".parse().unwrap()),
        }
    }

    fn peer(n: u8, public: &str, mac_last: u8) -> Lease {
        Lease {
            subnets: LeaseSubnets {
                v4: Some(format!("10.244.{n}.0/24").parse().unwrap()),
                v6: Some(format!("fd74:10:0:{n}::/64").parse().unwrap()),
            },
            attrs: LeaseAttrs {
                public_ip: Some(public.parse().unwrap()),
                public_ipv6: Some(format!("fd74:7769::{n}").parse().unwrap()),
                backend_type: "vxlan".into(),
                backend_data: Some(
                    serde_json::json!({"VNI":1,"VtepMAC":format!("0e:00:00:00:00:{mac_last:02x}")}),
                ),
                backend_v6_data: Some(
                    serde_json::json!({"VNI":1,"VtepMAC":format!("0e:00:00:00:01:{mac_last:02x}")}),
                ),
                node_id: None,
            },
            expires: None,
        }
    }

    #[test]
    fn mtu_maths() {
        let mut c = cfg(r#"{"Type":"vxlan"}"#);
        let up = uplink();
        assert_eq!(overlay_mtu(&c, &up), 1430); // dual stack: v6 underlay overhead
        c.enable_ipv6 = false;
        assert_eq!(overlay_mtu(&c, &up), 1450);
        c.backend.mtu = Some(1400);
        assert_eq!(overlay_mtu(&c, &up), 1400);
        let hg = cfg(r#"{"Type":"host-gw"}"#);
        assert_eq!(overlay_mtu(&hg, &up), 1500);
    }

    #[tokio::test]
    async fn vxlan_three_entries_per_peer_then_nothing_to_do() {
        let kernel = FakeKernel::with_uplink("198.18.0.11/24", 1500);
        let conf = cfg(r#"{"Type":"vxlan"}"#);
        let up = uplink();
        let devs = ensure_devices(&kernel, &conf, &up).await.unwrap();
        assert!(devs.v4.is_some() && devs.v6.is_some());
        let peers = vec![
            peer(1, "198.18.0.11", 1),
            peer(2, "198.18.0.12", 2),
            peer(3, "198.18.0.13", 3),
        ];
        // peer(1) is ourselves (same subnets): skipped.
        let peers: Vec<Lease> = peers
            .into_iter()
            .map(|mut p| {
                if p.subnets.v4 == own().v4 {
                    p.subnets = own();
                }
                p
            })
            .collect();
        let ops = reconcile(&kernel, &conf, &up, &devs, &own(), &peers)
            .await
            .unwrap();
        let state = kernel.state();
        assert_eq!(state.routes.len(), 4, "{:?}", state.routes); // 2 peers × 2 families
        assert_eq!(state.neighs.len(), 4);
        assert_eq!(state.fdb.len(), 4);
        let route = state
            .routes
            .iter()
            .find(|r| r.dst.to_string() == "10.244.2.0/24")
            .unwrap();
        assert_eq!(route.gateway.unwrap().to_string(), "10.244.2.0");
        assert!(route.onlink);
        assert!(
            state
                .fdb
                .iter()
                .any(|f| f.dst.to_string() == "198.18.0.12" && f.mac == [0x0e, 0, 0, 0, 0, 2])
        );
        // FDB and neighbour before the route of the same peer.
        let pos = |pred: &dyn Fn(&Op) -> bool| ops.iter().position(pred).unwrap();
        assert!(
            pos(&|o| matches!(o, Op::ReplaceFdb(f) if f.dst.to_string() == "198.18.0.12"))
                < pos(
                    &|o| matches!(o, Op::ReplaceRoute(r) if r.dst.to_string() == "10.244.2.0/24")
                )
        );
        kernel.take_calls();
        let ops = reconcile(&kernel, &conf, &up, &devs, &own(), &peers)
            .await
            .unwrap();
        assert!(ops.is_empty(), "{ops:?}");
        assert!(kernel.take_calls().is_empty());
    }

    #[tokio::test]
    async fn heals_drift_and_removes_departed_peers_only() {
        let k = FakeKernel::with_uplink("198.18.0.11/24", 1500);
        let mut c = cfg(r#"{"Type":"vxlan"}"#);
        c.enable_ipv6 = false;
        let up = uplink();
        let devs = ensure_devices(&k, &c, &up).await.unwrap();
        let peers = vec![peer(2, "198.18.0.12", 2), peer(3, "198.18.0.13", 3)];
        reconcile(&k, &c, &up, &devs, &own(), &peers).await.unwrap();
        // Someone deletes a route by hand, and adds one of their own outside the network.
        k.tamper(|s| {
            s.routes.retain(|r| r.dst.to_string() != "10.244.3.0/24");
            s.routes.insert(Route {
                dst: "192.168.7.0/24".parse().unwrap(),
                gateway: None,
                oif: 2,
                onlink: false,
                proto: PROTO_BOOT,
            });
        });
        k.take_calls();
        let ops = reconcile(&k, &c, &up, &devs, &own(), &peers).await.unwrap();
        assert_eq!(ops.len(), 1, "{ops:?}");
        // Peer 3 leaves: its three entries go, the foreign route stays.
        let ops = reconcile(&k, &c, &up, &devs, &own(), &peers[..1])
            .await
            .unwrap();
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert!(matches!(ops[0], Op::DelRoute(_)));
        let s = k.state();
        assert!(
            s.routes
                .iter()
                .any(|r| r.dst.to_string() == "192.168.7.0/24")
        );
        assert!(
            !s.routes
                .iter()
                .any(|r| r.dst.to_string() == "10.244.3.0/24")
        );
        assert_eq!(s.fdb.len(), 1);
    }

    #[tokio::test]
    async fn restart_keeps_device_and_entries() {
        let k = FakeKernel::with_uplink("198.18.0.11/24", 1500);
        let c = cfg(r#"{"Type":"vxlan"}"#);
        let up = uplink();
        let devs = ensure_devices(&k, &c, &up).await.unwrap();
        reconcile(&k, &c, &up, &devs, &own(), &[peer(2, "198.18.0.12", 2)])
            .await
            .unwrap();
        k.take_calls();
        // A new agent process: same device (same MAC), nothing re-created, nothing flushed.
        let devs2 = ensure_devices(&k, &c, &up).await.unwrap();
        assert_eq!(devs, devs2);
        let ops = reconcile(&k, &c, &up, &devs2, &own(), &[peer(2, "198.18.0.12", 2)])
            .await
            .unwrap();
        assert!(ops.is_empty());
        assert!(k.take_calls().is_empty());
        // A VNI change needs a new device.
        let mut c2 = c.clone();
        c2.backend.vni = 7;
        let devs3 = ensure_devices(&k, &c2, &up).await.unwrap();
        assert!(
            k.take_calls()
                .iter()
                .any(|c| c.starts_with("create_vxlan flannel.7"))
        );
        assert_ne!(devs3.v4.unwrap().index, devs.v4.unwrap().index);
    }

    #[tokio::test]
    async fn host_gw_and_direct_routing() {
        let k = FakeKernel::with_uplink("198.18.0.11/24", 1500);
        let mut c = cfg(r#"{"Type":"host-gw"}"#);
        c.enable_ipv6 = false;
        let up = uplink();
        let devs = ensure_devices(&k, &c, &up).await.unwrap();
        assert_eq!(devs, Devices::default());
        let mut p2 = peer(2, "198.18.0.12", 2);
        p2.attrs.backend_type = "host-gw".into();
        let mut far = peer(3, "203.0.113.9", 3);
        far.attrs.backend_type = "host-gw".into();
        reconcile(&k, &c, &up, &devs, &own(), &[p2, far])
            .await
            .unwrap();
        let s = k.state();
        assert_eq!(s.routes.len(), 1);
        let r = s.routes.iter().next().unwrap();
        assert_eq!(r.gateway.unwrap().to_string(), "198.18.0.12");
        assert_eq!(r.oif, 2);

        let mut c = cfg(r#"{"Type":"vxlan","DirectRouting":true}"#);
        c.enable_ipv6 = false;
        let desired = desired(
            &c,
            &up,
            &Devices {
                v4: Some(Device {
                    index: 9,
                    name: "flannel.1".into(),
                    mac: [0; 6],
                    mtu: 1450,
                }),
                v6: None,
            },
            &own(),
            &[peer(2, "198.18.0.12", 2), peer(3, "203.0.113.9", 3)],
        );
        let via: Vec<_> = desired
            .routes
            .iter()
            .map(|r| (r.dst.to_string(), r.oif))
            .collect();
        assert!(via.contains(&("10.244.2.0/24".into(), 2)), "{via:?}");
        assert!(via.contains(&("10.244.3.0/24".into(), 9)), "{via:?}");
        assert_eq!(desired.fdb.len(), 1);
    }

    fn route(dst: &str, gateway: Option<&str>, oif: u32, proto: u8) -> Route {
        Route {
            dst: dst.parse().unwrap(),
            gateway: gateway.map(|g| g.parse().unwrap()),
            oif,
            onlink: false,
            proto,
        }
    }

    #[tokio::test]
    async fn only_marked_routes_and_unmarked_ones_on_our_device_are_ours() {
        let k = FakeKernel::with_uplink("198.18.0.11/24", 1500);
        let mut c = cfg(r#"{"Type":"vxlan"}"#);
        c.enable_ipv6 = false;
        let up = uplink();
        let devs = ensure_devices(&k, &c, &up).await.unwrap();
        let vx = devs.v4.as_ref().unwrap().index;
        let peers = vec![peer(2, "198.18.0.12", 2)];
        reconcile(&k, &c, &up, &devs, &own(), &peers).await.unwrap();
        assert!(k.state().routes.iter().all(|r| r.proto == PROTO_TWILL));
        // Routes that are not twill's, inside the Network and out: by hand via the uplink (no
        // mark), the kernel's connected routes (on the uplink, on the cluster's own subnet and
        // even on our device). And routes twill wrote: one with the mark to a subnet no lease
        // names any more (outside the Network, as a bad lease once made), one without the mark
        // on our device (an older twill's).
        let foreign = [
            route("10.244.250.0/24", Some("198.18.0.1"), 2, PROTO_BOOT),
            route("198.18.0.0/24", None, 2, PROTO_KERNEL),
            route("10.244.1.0/24", None, 7, PROTO_KERNEL),
            route("10.244.9.0/24", None, vx, PROTO_KERNEL),
        ];
        k.tamper(|s| {
            s.routes.extend(foreign.iter().cloned());
            s.routes
                .insert(route("8.8.8.0/24", Some("8.8.8.0"), vx, PROTO_TWILL));
            s.routes
                .insert(route("10.244.7.0/24", Some("10.244.7.0"), vx, PROTO_BOOT));
        });
        for _ in 0..3 {
            reconcile(&k, &c, &up, &devs, &own(), &peers).await.unwrap();
        }
        let s = k.state();
        for f in &foreign {
            assert!(s.routes.contains(f), "{f:?} was touched: {:?}", s.routes);
        }
        let dsts: Vec<String> = s.routes.iter().map(|r| r.dst.to_string()).collect();
        assert!(!dsts.contains(&"8.8.8.0/24".to_string()), "{dsts:?}");
        assert!(!dsts.contains(&"10.244.7.0/24".to_string()), "{dsts:?}");
        // An older twill's route to a peer that is still there is adopted: rewritten with the mark.
        k.tamper(|s| {
            s.routes.retain(|r| r.dst.to_string() != "10.244.2.0/24");
            s.routes
                .insert(route("10.244.2.0/24", Some("10.244.2.0"), vx, PROTO_BOOT));
        });
        reconcile(&k, &c, &up, &devs, &own(), &peers).await.unwrap();
        let r = k
            .state()
            .routes
            .into_iter()
            .find(|r| r.dst.to_string() == "10.244.2.0/24")
            .unwrap();
        assert_eq!((r.proto, r.onlink, r.oif), (PROTO_TWILL, true, vx));
    }

    #[tokio::test]
    async fn a_network_over_the_underlay_takes_no_route_of_the_node() {
        // What a Network of 198.18.0.0/16 did before it was refused: every route of the node
        // inside it looked like a stale peer. With ownership by mark, none is touched.
        let k = FakeKernel::with_uplink("198.18.0.11/24", 1500);
        let c = NetworkConfig::parse(r#"{"Network":"198.18.0.0/16","Backend":{"Type":"vxlan"}}"#)
            .unwrap();
        let up = uplink();
        let devs = ensure_devices(&k, &c, &up).await.unwrap();
        let kernel_route = route("198.18.0.0/24", None, 2, PROTO_KERNEL);
        let by_hand = route("198.18.7.0/24", Some("198.18.0.1"), 2, PROTO_BOOT);
        k.tamper(|s| {
            s.routes.insert(kernel_route.clone());
            s.routes.insert(by_hand.clone());
        });
        let own = LeaseSubnets {
            v4: Some("198.18.1.0/24".parse().unwrap()),
            v6: None,
        };
        let ops = reconcile(&k, &c, &up, &devs, &own, &[]).await.unwrap();
        assert!(!ops.iter().any(|o| matches!(o, Op::DelRoute(_))), "{ops:?}");
        let s = k.state();
        assert!(s.routes.contains(&kernel_route) && s.routes.contains(&by_hand));
        // And the config itself is refused for this node, naming the Network and the address.
        let err = check_network(&c, &up, &[]).unwrap_err().to_string();
        assert!(
            err.contains("Network 198.18.0.0/16")
                && err.contains("198.18.0.11/24")
                && err.contains("eth0"),
            "{err}"
        );
    }

    #[test]
    fn networks_holding_the_uplink_or_the_default_route_are_refused() {
        let up = uplink();
        let parse = |j: &str| NetworkConfig::parse(j).unwrap();
        let default = route("0.0.0.0/0", Some("198.18.0.1"), 2, PROTO_BOOT);
        let default6 = route("::/0", Some("fe80::1"), 2, PROTO_BOOT);
        // The usual: fine.
        let ok = cfg(r#"{"Type":"vxlan"}"#);
        check_network(&ok, &up, &[default.clone(), default6.clone()]).unwrap();
        for (json, needles) in [
            (
                r#"{"Network":"0.0.0.0/0","SubnetLen":24}"#,
                vec!["Network 0.0.0.0/0", "198.18.0.11/24"],
            ),
            (
                r#"{"Network":"198.18.0.0/16"}"#,
                vec!["Network 198.18.0.0/16", "198.18.0.11/24", "eth0"],
            ),
            (
                r#"{"Network":"10.0.0.0/8","EnableIPv6":true,"IPv6Network":"fd74::/16"}"#,
                vec!["IPv6Network fd74::/16", "fd74:7769::11/64"],
            ),
        ] {
            let err = check_network(&parse(json), &up, std::slice::from_ref(&default))
                .unwrap_err()
                .to_string();
            for n in needles {
                assert!(err.contains(n), "{json}: {n:?} not in {err}");
            }
        }
        // The default route's gateway inside the Network (the uplink elsewhere).
        let mut far = up.clone();
        far.nets = vec!["203.0.113.5/24".parse().unwrap()];
        far.public_v4 = Some("203.0.113.5".parse().unwrap());
        far.public_v6 = None;
        let err = check_network(
            &parse(r#"{"Network":"198.18.0.0/16"}"#),
            &far,
            std::slice::from_ref(&default),
        )
        .unwrap_err();
        assert!(
            matches!(&err, NetworkClash::DefaultRoute { route, .. } if route == "default via 198.18.0.1 dev eth0"),
            "{err}"
        );
        // --public-ip inside the Network, though the uplink's address is not.
        let mut lying = far.clone();
        lying.public_v4 = Some("10.244.3.3".parse().unwrap());
        let err = check_network(&ok, &lying, &[]).unwrap_err().to_string();
        assert!(err.contains("public address 10.244.3.3"), "{err}");
    }

    #[test]
    fn lease_attrs_publish_vtep_macs() {
        let mut c = cfg(r#"{"Type":"vxlan"}"#);
        c.enable_ipv6 = false;
        let devs = Devices {
            v4: Some(Device {
                index: 9,
                name: "flannel.1".into(),
                mac: [0x0e, 1, 2, 3, 4, 5],
                mtu: 1450,
            }),
            v6: None,
        };
        let a = lease_attrs(&c, &uplink(), &devs);
        assert_eq!(
            a.to_json(),
            r#"{"PublicIP":"198.18.0.11","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:01:02:03:04:05"}}"#
        );
    }
}
