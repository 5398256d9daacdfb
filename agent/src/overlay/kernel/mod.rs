//! The `Kernel` seam: every link, address, route, neighbour, FDB and sysctl change the overlay
//! makes crosses this trait.
//!
//! One real implementation talks rtnetlink ([`netlink::Netlink`]); one recording fake
//! ([`fake::FakeKernel`]) keeps the same state in memory so the reconciler's plans can be checked
//! without root. The types here are plain data: what the overlay wants, in the kernel's terms.
//!
//! Routes carry their routing protocol (`rtm_protocol`, `proto` in `ip route`): twill writes its
//! own, [`PROTO_TWILL`], and that mark is how the overlay tells its routes from everyone
//! else's. The protocol is a local attribute of the node's routing table: peers (flannel nodes
//! included) never see it.

pub mod fake;
pub mod netlink;

use std::net::IpAddr;

use ipnet::IpNet;

/// Errors from the kernel seam.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A netlink request failed.
    #[error("netlink {op} {object}: {source}")]
    Netlink {
        /// The request (`add route`, `dump links`, ...).
        op: &'static str,
        /// The object (route, device name, neighbour).
        object: String,
        /// The error, errno kept.
        #[source]
        source: rtnetlink::Error,
    },
    /// A sysctl or other file write failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The path.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The netlink connection could not be set up.
    #[error("open netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    /// Something that should exist does not.
    #[error("{0} not found")]
    NotFound(String),
}

/// What the kernel says about a VXLAN device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanAttrs {
    /// VNI.
    pub vni: u32,
    /// Local VTEP address.
    pub local: Option<IpAddr>,
    /// Underlay device index.
    pub uplink: Option<u32>,
    /// UDP destination port.
    pub port: u16,
    /// Whether the device learns remote MACs.
    pub learning: bool,
}

/// A network device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// ifindex.
    pub index: u32,
    /// Name.
    pub name: String,
    /// Hardware address, if it has one of 6 bytes.
    pub mac: Option<[u8; 6]>,
    /// MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// Set when the device is a VXLAN device.
    pub vxlan: Option<VxlanAttrs>,
}

/// A VXLAN device to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    /// Device name (`flannel.1`).
    pub name: String,
    /// VNI.
    pub vni: u32,
    /// Local VTEP address (the node's public IP).
    pub local: IpAddr,
    /// Underlay device index.
    pub uplink: u32,
    /// UDP port.
    pub port: u16,
    /// MTU.
    pub mtu: u32,
}

impl VxlanSpec {
    /// Whether an existing device can be kept as it is for this spec (MTU and addresses are
    /// fixed in place; these attributes need a new device).
    pub fn compatible(&self, link: &LinkInfo) -> bool {
        link.vxlan.as_ref().is_some_and(|v| {
            v.vni == self.vni
                && v.local == Some(self.local)
                && v.port == self.port
                && !v.learning
                && v.uplink.is_none_or(|u| u == self.uplink)
        })
    }
}

/// The routing protocol twill's routes carry (`ip route show proto 116`; 116 is ASCII `t`).
/// Not one of the numbers `/etc/iproute2/rt_protos` reserves, nor one a well-known routing
/// daemon or CNI uses (Calico: 80, BIRD: 12, kernel: 2, boot: 3).
pub const PROTO_TWILL: u8 = 116;
/// Routes the kernel made itself (connected prefixes of addresses): never twill's.
pub const PROTO_KERNEL: u8 = 2;
/// The protocol `ip route add` and most tools write by default (and older twill versions did).
pub const PROTO_BOOT: u8 = 3;

/// A route in the main table.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    /// Destination prefix.
    pub dst: IpNet,
    /// Next hop.
    pub gateway: Option<IpAddr>,
    /// Output device.
    pub oif: u32,
    /// `onlink`: the gateway is reachable on the device without a covering prefix.
    pub onlink: bool,
    /// The routing protocol: [`PROTO_TWILL`] on every route twill writes; what the kernel
    /// reports on routes read back.
    pub proto: u8,
}

/// A permanent neighbour entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Neigh {
    /// Device.
    pub ifindex: u32,
    /// Address.
    pub ip: IpAddr,
    /// Link-layer address.
    pub mac: [u8; 6],
}

/// A forwarding-database entry of a VXLAN device (MAC → remote VTEP).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fdb {
    /// Device.
    pub ifindex: u32,
    /// Remote VTEP MAC.
    pub mac: [u8; 6],
    /// Remote VTEP address.
    pub dst: IpAddr,
}

/// An address on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Addr {
    /// Device.
    pub ifindex: u32,
    /// Address with prefix.
    pub net: IpNet,
}

/// The kernel seam. Methods are idempotent where the kernel allows: `replace_*` overwrite,
/// `del_*` of something absent succeeds, `add_address` of a present address succeeds.
#[expect(async_fn_in_trait, reason = "used with generics only, never as dyn")]
pub trait Kernel {
    /// Every device.
    async fn links(&self) -> Result<Vec<LinkInfo>, KernelError>;
    /// Every address (both families).
    async fn addresses(&self) -> Result<Vec<Addr>, KernelError>;
    /// Every route of the main table of one family (excluding local/broadcast ones).
    async fn routes(&self, v6: bool) -> Result<Vec<Route>, KernelError>;
    /// Permanent neighbours of a device (both families).
    async fn neighbours(&self, ifindex: u32) -> Result<Vec<Neigh>, KernelError>;
    /// FDB entries of a device that point at a remote VTEP.
    async fn fdb(&self, ifindex: u32) -> Result<Vec<Fdb>, KernelError>;

    /// Creates a VXLAN device (down).
    async fn create_vxlan(&self, spec: &VxlanSpec) -> Result<(), KernelError>;
    /// Deletes a device.
    async fn delete_link(&self, ifindex: u32) -> Result<(), KernelError>;
    /// Sets MTU and brings the device up.
    async fn set_up(&self, ifindex: u32, mtu: u32) -> Result<(), KernelError>;
    /// Adds an address (present: no error).
    async fn add_address(&self, addr: Addr) -> Result<(), KernelError>;
    /// Removes an address (absent: no error).
    async fn del_address(&self, addr: Addr) -> Result<(), KernelError>;
    /// Adds or replaces a route.
    async fn replace_route(&self, route: &Route) -> Result<(), KernelError>;
    /// Removes a route (absent: no error).
    async fn del_route(&self, route: &Route) -> Result<(), KernelError>;
    /// Adds or replaces a permanent neighbour.
    async fn replace_neigh(&self, neigh: &Neigh) -> Result<(), KernelError>;
    /// Removes a neighbour (absent: no error).
    async fn del_neigh(&self, neigh: &Neigh) -> Result<(), KernelError>;
    /// Adds or replaces an FDB entry.
    async fn replace_fdb(&self, fdb: &Fdb) -> Result<(), KernelError>;
    /// Removes an FDB entry (absent: no error).
    async fn del_fdb(&self, fdb: &Fdb) -> Result<(), KernelError>;
    /// Writes a sysctl under /proc/sys (`net/ipv4/ip_forward`).
    async fn set_sysctl(&self, key: &str, value: &str) -> Result<(), KernelError>;
}
