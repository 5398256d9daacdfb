//! The overlay loop: leases in, kernel entries out. Every node gets a pod subnet leased from the
//! store, and a way to reach every other node's subnet through the backend of the network
//! config.
//!
//! ```text
//!  source/ (etcd, Kubernetes Nodes; LeaseStore + MemStore)     config (net-conf.json)
//!     └─► node/ (acquire and renew our lease, cache and validate peers' leases: lease)
//!            └─► desired ─► plan ◄─ observed ─┐
//!                 ▲           └─► apply ──────┴─ kernel/ (the Kernel seam: netlink, FakeKernel)
//!          backend/{vxlan,hostgw,udp}   (one trait: MTU overhead, devices, lease data, per-peer entries)
//!  masq (--ip-masq: one nft table, over a runner seam)    uplink, check (the node's place in the underlay)
//! ```
//!
//! [`desired`] is a pure function of the config, the node and the leases; [`plan`] the pure diff
//! of that against what the kernel has; [`apply`] the only part that talks to the kernel, through
//! the [`kernel::Kernel`] seam, so all of it is tested on [`kernel::fake::FakeKernel`] without
//! root. The backends differ only in what [`backend::Backend`] answers (flannel's
//! `pkg/backend` shape); the udp backend's user-space data path lives beside its module.
//!
//! Ownership: twill owns the VXLAN devices it creates, every permanent neighbour and FDB entry on
//! them, and the main-table routes it wrote. Every route twill writes carries the routing
//! protocol [`PROTO_TWILL`](kernel::PROTO_TWILL) (`proto 116`), and a route is read as twill's only when it carries
//! that mark, whatever its destination: a route someone added by hand inside the cluster network,
//! the kernel's connected routes (`proto kernel`, never touched) and a route to a subnet a peer
//! lease names but twill never wrote are all left alone. A destination inside the Network is no
//! proof of ownership: a Network that overlaps the underlay would make the node's own routes
//! look like stale peers (so such a Network is also refused, see [`check::check_network`]).
//!
//! Routes written before the mark existed (older twill, or flannel before a node was switched
//! to twill) are adopted only on twill's own devices: a route whose output device is the VXLAN
//! or TUN device twill owns, and which the kernel did not make itself, is twill's; the next
//! reconcile rewrites it with the mark, or deletes it if no lease wants it. An unmarked host-gw
//! route of an older version (via the uplink) is never adopted: it is replaced with a marked one
//! when a lease still names its subnet, and otherwise left for the admin
//! (`ip route show proto boot`).

pub mod apply;
pub mod backend;
pub mod check;
pub mod config;
pub mod counter;
pub mod desired;
pub mod kernel;
pub mod lease;
pub mod masq;
pub mod node;
pub mod plan;
pub mod source;
pub mod uplink;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::overlay::kernel::{Addr, Fdb, Neigh, Route};

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

#[cfg(test)]
pub(crate) mod tests;
