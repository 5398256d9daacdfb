//! The overlay backends, one module each behind one trait: what differs from backend to backend,
//! and nothing else.
//!
//! Shaped as flannel's `pkg/backend` (one interface, one package per backend): the loop around
//! them — lease → [`desired`](crate::overlay::desired) → [`plan`](crate::overlay::plan) →
//! [`apply`](crate::overlay::apply) over the [`Kernel`](crate::overlay::kernel::Kernel) seam — is
//! the same for all of them, and a backend only answers four questions, all pure:
//! - how many bytes its encapsulation costs (the overlay MTU is the uplink's minus that);
//! - which devices the node needs ([`DeviceSpec`]: a VXLAN device per family, the udp backend's
//!   TUN, or none for host-gw);
//! - what it publishes in the lease (`BackendData`: the VTEP MAC for vxlan, nothing for the
//!   others, as flannel);
//! - which kernel entries one peer needs ([`Backend::peer_entries`]: route + neighbour + FDB for
//!   vxlan, a route via the peer's public address for host-gw, nothing for udp, whose per-peer
//!   state is its own routing table) and which the node needs whatever the peers
//!   ([`Backend::node_entries`]: the udp backend's one route of the whole Network).
//!
//! So adding a backend is one module and one line in [`for_kind`]; the diff, the ownership rules
//! of the apply and their tests on the fake kernel serve it unchanged. What a backend runs
//! beside the kernel (the udp backend's data path) is started by the node loop.

pub mod hostgw;
pub mod udp;
pub mod vxlan;

use std::net::IpAddr;

use ipnet::IpNet;

use crate::overlay::config::{BackendType, NetworkConfig};
use crate::overlay::kernel::{PROTO_TWILL, Route, VxlanSpec};
use crate::overlay::lease::LeaseAttrs;
use crate::overlay::{Desired, Device, Devices, Uplink};

/// A device the node needs, as the kernel seam knows how to make or find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// A VXLAN device, created (or recreated when incompatible) by the apply.
    Vxlan(VxlanSpec),
    /// A TUN device made by the backend's own data path (it holds the queues): only found,
    /// brought up at `mtu` and handed to the reconciler for its address and routes.
    Tun {
        /// Its name.
        name: String,
        /// The overlay MTU.
        mtu: u32,
    },
}

/// One address family of one peer, as a backend sees it.
#[derive(Debug, Clone, Copy)]
pub struct PeerFamily<'a> {
    /// The peer's subnet.
    pub subnet: IpNet,
    /// Its VTEP address (`<subnet>.0`).
    pub vtep_ip: IpAddr,
    /// Its public (underlay) address.
    pub public: IpAddr,
    /// The whole of its lease's attributes.
    pub attrs: &'a LeaseAttrs,
    /// Whether this is the IPv6 family.
    pub v6: bool,
    /// This node's overlay device of the family, if the backend has one.
    pub dev: Option<&'a Device>,
}

/// What one overlay backend adds to the common loop (see the module notes). Every method is pure.
pub trait Backend: Sync {
    /// Bytes the encapsulation adds to a pod's packet on the underlay.
    fn overhead(&self, cfg: &NetworkConfig) -> u32;

    /// The devices this node needs, with whether each is the IPv6 family's, for an overlay MTU
    /// of `mtu`.
    fn devices(&self, cfg: &NetworkConfig, uplink: &Uplink, mtu: u32) -> Vec<(bool, DeviceSpec)>;

    /// The `BackendData` (or `BackendV6Data`) published for one of the node's devices.
    fn lease_data(&self, cfg: &NetworkConfig, dev: &Device) -> Option<serde_json::Value>;

    /// Entries the node needs whatever the peers (none for most backends).
    fn node_entries(&self, _d: &mut Desired, _cfg: &NetworkConfig, _devices: &Devices) {}

    /// The entries one family of one peer needs.
    fn peer_entries(
        &self,
        d: &mut Desired,
        cfg: &NetworkConfig,
        uplink: &Uplink,
        peer: &PeerFamily<'_>,
    );
}

/// The backend of a network config's `Backend.Type`.
pub fn for_kind(kind: BackendType) -> &'static dyn Backend {
    match kind {
        BackendType::Vxlan => &vxlan::Vxlan,
        BackendType::HostGw => &hostgw::HostGw,
        BackendType::Udp => &udp::Udp,
    }
}

/// Whether `ip` is on the uplink's L2 network (host-gw, `DirectRouting`).
pub fn same_l2(uplink: &Uplink, ip: IpAddr) -> bool {
    uplink.nets.iter().any(|n| n.contains(&ip))
}

/// The route to a peer's subnet via its public address on the uplink (host-gw, and vxlan's
/// `DirectRouting` to a peer on the same L2 network).
pub fn direct_route(uplink: &Uplink, peer: &PeerFamily<'_>) -> Route {
    Route {
        dst: peer.subnet,
        gateway: Some(peer.public),
        oif: uplink.index,
        onlink: false,
        proto: PROTO_TWILL,
    }
}
