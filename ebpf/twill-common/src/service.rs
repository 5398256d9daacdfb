//! Map layout of the eBPF service load balancer (issue 4), shared by the kernel programs
//! (`twill-ebpf`, module `lb`) and user space (`twill_agent::services::dataplane::ebpf`).
//!
//! Why the maps are shaped as they are:
//! - **One hash lookup per question, none per service.** A VIP is found with one lookup in
//!   [`MAP_SVC`] keyed by [`SvcKey`] (address, port, protocol, family); a NodePort is a second
//!   lookup with the unspecified address, done only when the destination is one of the node's
//!   addresses ([`MAP_LOCAL_ADDR`]). Backend choice is one lookup of the service's Maglev table
//!   ([`MAP_MAGLEV`]) and one of the chosen slot ([`MAP_BACKEND`]). Nothing loops over services.
//! - **Slots, not global backend ids.** A service's backends live at `(service id, slot)`;
//!   user space keeps a backend in the same slot while it stays in the service, so a Maglev
//!   table update is: write the new slots, replace the table (one atomic hash-value update), then
//!   delete the slots nobody references any more. A packet never sees a table pointing at a slot
//!   that is missing or holds another backend. Tables hold `u16` slots (not `u32` ids) to halve
//!   their size.
//! - **Memory scales with what is used.** The maps user space writes ([`MAP_SVC`],
//!   [`MAP_BACKEND`], [`MAP_MAGLEV`], [`MAP_REVNAT`], [`MAP_LOCAL_ADDR`]) are created with
//!   `BPF_F_NO_PREALLOC`, so a node with 100 services does not pay for 65 536; it also makes
//!   replacing a value RCU-safe for concurrent readers (a preallocated element can be recycled
//!   under a reader). The maps the kernel writes ([`MAP_CT`], [`MAP_AFFINITY`], [`MAP_SOCK`]) are
//!   LRU hashes (always preallocated): they can never fill up, old flows are evicted.
//! - **Reverse NAT state is carried inline.** Conntrack and socket entries store the VIP they
//!   translate back to, so a reply needs one lookup and stays correct if a service id is reused.
//!   [`MAP_REVNAT`] (id → frontend, kind and name) is therefore only read by user space: it turns
//!   ids back into services for `observed()`, `twilld get services` and the metrics.
//! - **Entries are validated on use.** A conntrack or affinity entry names its backend by
//!   `(service id, slot)` *and* address; the kernel checks the slot still holds that address before
//!   using it, so removing an endpoint stops its flows at their next packet even before user space
//!   has purged the stale entries.
//! - Addresses are 16 bytes plus a family byte (IPv4 in the first 4 bytes, the rest zero), so v4
//!   and v6 share every map; ports are in network byte order (as on the wire and in
//!   `bpf_sock_addr`), everything else in host order. All structs are `#[repr(C)]` with explicit
//!   padding and no `bool`; sizes are pinned by compile-time assertions.
//! - The sizes declared in the object ([`DECLARED_ENTRIES`]) are placeholders: every loader of
//!   the shared object creates all of its maps, and the packet counter (`PacketCounter`) must not
//!   pay for a conntrack table. `EbpfLb` sets the real sizes ([`DEFAULT_MAX_SERVICES`], ...)
//!   before loading.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Size of every Maglev lookup table (a prime). Must equal the desired-state builder's
/// `twill_agent::services::lb::MAGLEV_M` (checked at compile time in the agent).
pub const MAGLEV_M: usize = 1021;

/// [`SvcKey::family`] / [`BackendValue::family`] value for IPv4.
pub const FAMILY_V4: u8 = 4;
/// ... for IPv6.
pub const FAMILY_V6: u8 = 6;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// A map or program name, checked at compile time to fit the kernel's object names
/// (`BPF_OBJ_NAME_LEN`, 16 bytes with the terminating NUL).
const fn obj_name(name: &'static str) -> &'static str {
    assert!(name.len() < 16, "BPF_OBJ_NAME_LEN");
    name
}

/// Services (frontends): [`SvcKey`] → [`SvcValue`]. `BPF_MAP_TYPE_HASH`, `BPF_F_NO_PREALLOC`.
pub const MAP_SVC: &str = obj_name("TWL_LB_SVC");
/// Backends: [`BackendKey`] `(service id, slot)` → [`BackendValue`]. Hash, no prealloc.
pub const MAP_BACKEND: &str = obj_name("TWL_LB_BE");
/// Maglev tables: service id (`u32`) → [`MaglevTable`]. Hash, no prealloc.
pub const MAP_MAGLEV: &str = obj_name("TWL_LB_MAGLEV");
/// BPF conntrack of the tc path: [`CtKey`] → [`CtValue`]. `BPF_MAP_TYPE_LRU_HASH`.
pub const MAP_CT: &str = obj_name("TWL_LB_CT");
/// Session affinity: [`AffinityKey`] → [`AffinityValue`]. LRU hash.
pub const MAP_AFFINITY: &str = obj_name("TWL_LB_AFF");
/// Socket-LB reverse translation (getpeername, recvmsg): [`SockKey`] → [`SockValue`]. LRU hash.
pub const MAP_SOCK: &str = obj_name("TWL_LB_SOCK");
/// Reverse NAT / service info: service id (`u32`) → [`RevNatValue`]. Hash, no prealloc; read by
/// user space only (see the module notes).
pub const MAP_REVNAT: &str = obj_name("TWL_LB_REVNAT");
/// Per-service counters: `BPF_MAP_TYPE_PERCPU_ARRAY` of [`SvcCount`] indexed by service id.
pub const MAP_COUNT: &str = obj_name("TWL_LB_COUNT");
/// The node's own addresses (what a NodePort answers on): [`LocalAddrKey`] → `u32` (unused).
pub const MAP_LOCAL_ADDR: &str = obj_name("TWL_LB_LADDR");
/// One [`LbConfig`] at index 0 (`BPF_MAP_TYPE_ARRAY`).
pub const MAP_CONFIG: &str = obj_name("TWL_LB_CONFIG");

/// Every map of the service load balancer, in a stable order (pinning, occupancy).
pub const MAPS: [&str; 10] = [
    MAP_SVC,
    MAP_BACKEND,
    MAP_MAGLEV,
    MAP_CT,
    MAP_AFFINITY,
    MAP_SOCK,
    MAP_REVNAT,
    MAP_COUNT,
    MAP_LOCAL_ADDR,
    MAP_CONFIG,
];

/// `max_entries` declared in the object for every map (see the module notes).
pub const DECLARED_ENTRIES: u32 = 16;
/// Default capacity of [`MAP_SVC`], [`MAP_MAGLEV`], [`MAP_REVNAT`] and [`MAP_COUNT`] (frontends;
/// service ids must be below it).
pub const DEFAULT_MAX_SERVICES: u32 = 65_536;
/// Default capacity of [`MAP_BACKEND`] (sum of backends over all frontends: 30 000 services ×
/// 10 endpoints fit). A hash map allocates 16 bytes of buckets per possible entry up front.
pub const DEFAULT_MAX_BACKENDS: u32 = 1 << 19;
/// Default capacity of [`MAP_CT`] (two entries per tc-path flow).
pub const DEFAULT_MAX_CT: u32 = 131_072;
/// Default capacity of [`MAP_AFFINITY`].
pub const DEFAULT_MAX_AFFINITY: u32 = 65_536;
/// Default capacity of [`MAP_SOCK`] (one entry per socket-LB connection or UDP peer).
pub const DEFAULT_MAX_SOCK: u32 = 65_536;
/// Capacity of [`MAP_LOCAL_ADDR`].
pub const MAX_LOCAL_ADDRS: u32 = 1024;

/// `BPF_F_NO_PREALLOC`.
pub const BPF_F_NO_PREALLOC: u32 = 1;

/// Socket program: `cgroup/connect4`, TCP and connected UDP.
pub const PROG_CONNECT4: &str = obj_name("twl_lb_conn4");
/// `cgroup/connect6`.
pub const PROG_CONNECT6: &str = obj_name("twl_lb_conn6");
/// `cgroup/sendmsg4`: unconnected UDP.
pub const PROG_SENDMSG4: &str = obj_name("twl_lb_send4");
/// `cgroup/sendmsg6`.
pub const PROG_SENDMSG6: &str = obj_name("twl_lb_send6");
/// `cgroup/recvmsg4`: shows the VIP as the source of UDP replies.
pub const PROG_RECVMSG4: &str = obj_name("twl_lb_recv4");
/// `cgroup/recvmsg6`.
pub const PROG_RECVMSG6: &str = obj_name("twl_lb_recv6");
/// `cgroup/getpeername4`: shows the VIP as the peer.
pub const PROG_GETPEERNAME4: &str = obj_name("twl_lb_peer4");
/// `cgroup/getpeername6`.
pub const PROG_GETPEERNAME6: &str = obj_name("twl_lb_peer6");
/// tc (TCX) ingress of interfaces facing the outside (uplink, overlay).
pub const PROG_TC_EXT_INGRESS: &str = obj_name("twl_lb_ext_in");
/// tc (TCX) ingress of a pod-facing interface (a pod bridge or a pod's own veth).
pub const PROG_TC_POD_INGRESS: &str = obj_name("twl_lb_pod_in");
/// tc (TCX) egress of every attached interface (replies of host-network backends).
pub const PROG_TC_EGRESS: &str = obj_name("twl_lb_egress");

/// [`SvcValue::flags`]: `sessionAffinity: ClientIP`.
pub const SVC_F_AFFINITY: u16 = 1;
/// [`SvcValue::flags`]: `externalTrafficPolicy: Local` (keep the client address, no SNAT).
pub const SVC_F_EXTERNAL_LOCAL: u16 = 2;
/// [`SvcValue::flags`]: `internalTrafficPolicy: Local`.
pub const SVC_F_INTERNAL_LOCAL: u16 = 4;

/// [`BackendValue::flags`]: the endpoint runs on this node (its EndpointSlice names this node,
/// or its address lies in the node's pod subnet). Decides SNAT of traffic from outside the node
/// only; traffic from pods is SNATed by what the FIB says (see the tc program's notes).
pub const BE_F_NODE_LOCAL: u8 = 1;
/// [`BackendValue::flags`]: the endpoint is serving but terminating.
pub const BE_F_TERMINATING: u8 = 2;

/// [`RevNatValue::kind`] values (`FrontendKind`).
pub const KIND_CLUSTER_IP: u8 = 0;
/// NodePort (wildcard address).
pub const KIND_NODE_PORT: u8 = 1;
/// `spec.externalIPs`.
pub const KIND_EXTERNAL_IP: u8 = 2;
/// `status.loadBalancer.ingress[].ip`.
pub const KIND_LOAD_BALANCER: u8 = 3;

/// [`CtKey::dir`]: the client → VIP direction (the key is the packet as the client sent it).
pub const CT_DIR_FORWARD: u8 = 0;
/// [`CtKey::dir`]: the backend → client direction (the key is the reply as the backend sent it).
pub const CT_DIR_REPLY: u8 = 1;
/// [`CtValue::flags`]: the flow is source-NATed to the node (`alt_*` holds the SNAT address on
/// a forward entry, the client's address on a reply entry).
pub const CT_F_SNAT: u8 = 1;
/// Idle time after which a TCP conntrack entry is ignored (and the flow re-balanced).
pub const CT_TIMEOUT_TCP_NS: u64 = 6 * 3600 * 1_000_000_000;
/// Idle time after which a UDP conntrack entry is ignored.
pub const CT_TIMEOUT_UDP_NS: u64 = 120 * 1_000_000_000;
/// `last_seen` is refreshed at most this often (saves a cache-line write per packet).
pub const CT_REFRESH_NS: u64 = 1_000_000_000;
/// First source port used for SNAT to the node address: above Linux's default ephemeral range
/// (32768–60999), so SNAT never collides with the node's own sockets.
pub const SNAT_PORT_MIN: u16 = 61_000;
/// Number of SNAT ports (61000–65535).
pub const SNAT_PORT_COUNT: u16 = 4536;

/// [`AffinityKey::kind`]: the client is identified by its source address (tc path).
pub const AFF_CLIENT_ADDR: u8 = 0;
/// [`AffinityKey::kind`]: the client is identified by its network-namespace cookie (socket path,
/// where the source address is not known yet at `connect()`).
pub const AFF_CLIENT_NETNS: u8 = 1;

/// [`LbConfig::flags`]: a pod-facing interface has the tc programs, so connected UDP sockets of
/// pods (not of the host namespace) are left to the tc path, whose conntrack can move a flow
/// off a removed backend; a socket connected by `connect4` could not be moved.
pub const CFG_UDP_CONNECT_VIA_TC: u32 = 1;

/// Lookup key of a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcKey {
    /// The VIP (IPv4 in the first 4 bytes); all zero for a NodePort.
    pub addr: [u8; 16],
    /// Port, network byte order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
}

/// What the kernel needs to balance one frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcValue {
    /// Service id (`LbService::id`): key of [`MAP_MAGLEV`], [`MAP_REVNAT`], [`MAP_COUNT`] and the
    /// first half of [`BackendKey`]. Never 0.
    pub id: u32,
    /// Backends in use; 0 means "no endpoints": connections are refused.
    pub backends: u16,
    /// Slots `0..slots` may hold a backend (high-water mark, for user space).
    pub slots: u16,
    /// `SVC_F_*`.
    pub flags: u16,
    /// Explicit padding.
    pub pad: u16,
    /// Session affinity timeout in seconds (with [`SVC_F_AFFINITY`]).
    pub affinity_timeout_secs: u32,
}

/// Key of [`MAP_BACKEND`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    /// Service id.
    pub id: u32,
    /// Slot, referenced by the service's Maglev table.
    pub slot: u16,
    /// Explicit padding.
    pub pad: u16,
}

/// One backend (endpoint address and target port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendValue {
    /// Address.
    pub addr: [u8; 16],
    /// Target port, network byte order.
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// `BE_F_*`.
    pub flags: u8,
}

/// A service's Maglev table: [`MAGLEV_M`] slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    /// Backend slot per Maglev entry.
    pub slots: [u16; MAGLEV_M],
    /// Explicit padding (to a multiple of 4 bytes).
    pub pad: u16,
}

impl Default for MaglevTable {
    fn default() -> Self {
        Self {
            slots: [0; MAGLEV_M],
            pad: 0,
        }
    }
}

/// Conntrack key: the packet's 5-tuple as it is on the wire, plus the direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    /// Source address.
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Source port, network order.
    pub sport: u16,
    /// Destination port, network order.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// Family.
    pub family: u8,
    /// [`CT_DIR_FORWARD`] or [`CT_DIR_REPLY`].
    pub dir: u8,
    /// Explicit padding.
    pub pad: u8,
}

/// Conntrack value: how to rewrite a packet of the flow.
///
/// Forward entry: destination → `nat_*` (the backend); with [`CT_F_SNAT`], source → `alt_*`
/// (node address, SNAT port). Reply entry: source → `nat_*` (the VIP); with [`CT_F_SNAT`],
/// destination → `alt_*` (the client).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// New destination (forward) or source (reply) address.
    pub nat_addr: [u8; 16],
    /// SNAT address (forward) or client address (reply).
    pub alt_addr: [u8; 16],
    /// New destination (forward) or source (reply) port.
    pub nat_port: u16,
    /// SNAT port (forward) or client port (reply).
    pub alt_port: u16,
    /// `CT_F_*`.
    pub flags: u8,
    /// Explicit padding.
    pub pad: u8,
    /// Backend slot (forward entries; validated against [`MAP_BACKEND`]).
    pub slot: u16,
    /// Service id.
    pub svc_id: u32,
    /// Explicit padding.
    pub pad2: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the entry was created.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns()` of the last packet (refreshed at most every [`CT_REFRESH_NS`]).
    pub last_seen_ns: u64,
}

/// Session-affinity key: a client of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// Client address, or (socket path) the netns cookie in the first 8 bytes.
    pub client: [u8; 16],
    /// Service id.
    pub svc_id: u32,
    /// Family of `client` (0 for a netns cookie).
    pub family: u8,
    /// [`AFF_CLIENT_ADDR`] or [`AFF_CLIENT_NETNS`].
    pub kind: u8,
    /// Explicit padding.
    pub pad: u16,
}

/// Session-affinity value: the backend last used by the client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    /// `bpf_ktime_get_ns()` of the last new flow.
    pub last_seen_ns: u64,
    /// Backend address (validated against [`MAP_BACKEND`]).
    pub addr: [u8; 16],
    /// Backend port, network order.
    pub port: u16,
    /// Backend slot.
    pub slot: u16,
    /// Explicit padding.
    pub pad: u32,
}

/// Socket-LB reverse key: a socket and the backend it talks to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// `bpf_get_socket_cookie()`.
    pub cookie: u64,
    /// Backend address.
    pub addr: [u8; 16],
    /// Backend port, network order.
    pub port: u16,
    /// Family.
    pub family: u8,
    /// Explicit padding.
    pub pad: [u8; 5],
}

/// Socket-LB reverse value: the VIP the application asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockValue {
    /// VIP address (for a NodePort: the node address the application used).
    pub vip: [u8; 16],
    /// VIP port, network order.
    pub vip_port: u16,
    /// Family.
    pub family: u8,
    /// Explicit padding.
    pub pad: u8,
    /// Service id.
    pub svc_id: u32,
}

/// Longest service name kept in [`RevNatValue`] (`ns/name:port`: 63 + 1 + 63 + 1 + 15).
pub const NAME_MAX: usize = 143;

/// Reverse NAT / service info: what user space needs to turn a service id back into a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevNatValue {
    /// The frontend.
    pub frontend: SvcKey,
    /// `KIND_*`.
    pub kind: u8,
    /// Bytes used in `name`.
    pub name_len: u8,
    /// `ns/name:port`, UTF-8, truncated to [`NAME_MAX`] bytes.
    pub name: [u8; NAME_MAX],
    /// Explicit padding.
    pub pad: [u8; 3],
}

impl Default for RevNatValue {
    fn default() -> Self {
        Self {
            frontend: SvcKey::default(),
            kind: 0,
            name_len: 0,
            name: [0; NAME_MAX],
            pad: [0; 3],
        }
    }
}

/// Per-service, per-CPU counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcCount {
    /// New connections (socket `connect`, first packet of a tc flow).
    pub conns: u64,
    /// Packets (tc path) and datagrams (socket `sendmsg`).
    pub packets: u64,
}

impl SvcCount {
    /// Sums two counters, wrapping like the kernel side.
    #[must_use]
    pub const fn wrapping_add(self, other: Self) -> Self {
        Self {
            conns: self.conns.wrapping_add(other.conns),
            packets: self.packets.wrapping_add(other.packets),
        }
    }
}

/// Key of [`MAP_LOCAL_ADDR`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalAddrKey {
    /// Address.
    pub addr: [u8; 16],
    /// Family.
    pub family: u8,
    /// Explicit padding.
    pub pad: [u8; 3],
}

/// Global settings written by user space at start-up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbConfig {
    /// Network-namespace cookie of the node (the agent's namespace).
    pub host_netns_cookie: u64,
    /// `CFG_*`.
    pub flags: u32,
    /// Explicit padding.
    pub pad: u32,
}

const _: () = {
    use core::mem::{align_of, size_of};
    assert!(size_of::<SvcKey>() == 20 && align_of::<SvcKey>() == 2);
    assert!(size_of::<SvcValue>() == 16);
    assert!(size_of::<BackendKey>() == 8);
    assert!(size_of::<BackendValue>() == 20);
    assert!(size_of::<MaglevTable>() == 2044);
    assert!(size_of::<CtKey>() == 40);
    assert!(size_of::<CtValue>() == 64);
    assert!(size_of::<AffinityKey>() == 24);
    assert!(size_of::<AffinityValue>() == 32);
    assert!(size_of::<SockKey>() == 32);
    assert!(size_of::<SockValue>() == 24);
    assert!(size_of::<RevNatValue>() == 168);
    assert!(size_of::<SvcCount>() == 16);
    assert!(size_of::<LocalAddrKey>() == 20);
    assert!(size_of::<LbConfig>() == 16);
};

// SAFETY (all impls below): the types are `#[repr(C)]`, `Copy`, made only of integers and
// integer arrays, with every padding byte an explicit field (checked by the size assertions
// above), so every bit pattern is a valid value.
#[cfg(feature = "user")]
mod pod {
    use super::{
        AffinityKey, AffinityValue, BackendKey, BackendValue, CtKey, CtValue, LbConfig,
        LocalAddrKey, MaglevTable, RevNatValue, SockKey, SockValue, SvcCount, SvcKey, SvcValue,
    };
    unsafe impl aya::Pod for SvcKey {}
    unsafe impl aya::Pod for SvcValue {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for MaglevTable {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for SockValue {}
    unsafe impl aya::Pod for RevNatValue {}
    unsafe impl aya::Pod for SvcCount {}
    unsafe impl aya::Pod for LocalAddrKey {}
    unsafe impl aya::Pod for LbConfig {}
}

/// Encodes an address as the maps store it: 16 bytes (IPv4 in the first 4) and a family.
pub const fn encode_addr(ip: IpAddr) -> ([u8; 16], u8) {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            let mut out = [0; 16];
            out[0] = o[0];
            out[1] = o[1];
            out[2] = o[2];
            out[3] = o[3];
            (out, FAMILY_V4)
        }
        IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
    }
}

/// Decodes a map address; `None` for an unknown family.
pub const fn decode_addr(addr: [u8; 16], family: u8) -> Option<IpAddr> {
    match family {
        FAMILY_V4 => Some(IpAddr::V4(Ipv4Addr::new(
            addr[0], addr[1], addr[2], addr[3],
        ))),
        FAMILY_V6 => Some(IpAddr::V6(Ipv6Addr::from_bits(u128::from_be_bytes(addr)))),
        _ => None,
    }
}

/// `ip()` and `port()` of a map type that keeps an endpoint as `addr` + `family` (see
/// [`encode_addr`]) and a network-order `port`; `$what` names the endpoint in the docs.
macro_rules! endpoint_accessors {
    ($what:literal) => {
        #[doc = concat!("The ", $what, " address.")]
        pub const fn ip(&self) -> Option<IpAddr> {
            decode_addr(self.addr, self.family)
        }

        /// The port in host order.
        pub const fn port(&self) -> u16 {
            u16::from_be(self.port)
        }
    };
}

impl SvcKey {
    /// The key of frontend `ip:port/proto` (`port` in host order).
    pub const fn new(ip: IpAddr, port: u16, proto: u8) -> Self {
        let (addr, family) = encode_addr(ip);
        Self {
            addr,
            port: port.to_be(),
            proto,
            family,
        }
    }

    endpoint_accessors!("frontend");
}

impl BackendValue {
    /// A backend `ip:port` (`port` in host order).
    pub const fn new(ip: IpAddr, port: u16, flags: u8) -> Self {
        let (addr, family) = encode_addr(ip);
        Self {
            addr,
            port: port.to_be(),
            family,
            flags,
        }
    }

    endpoint_accessors!("backend");
}

impl LocalAddrKey {
    /// The key of a node address.
    pub const fn new(ip: IpAddr) -> Self {
        let (addr, family) = encode_addr(ip);
        Self {
            addr,
            family,
            pad: [0; 3],
        }
    }
}

impl RevNatValue {
    /// The info of a frontend; `name` is truncated to [`NAME_MAX`] bytes on a char boundary.
    pub fn new(frontend: SvcKey, kind: u8, name: &str) -> Self {
        let mut len = name.len().min(NAME_MAX);
        while !name.is_char_boundary(len) {
            len -= 1;
        }
        let mut value = Self {
            frontend,
            kind,
            // `len <= NAME_MAX < 256`.
            name_len: u8::try_from(len).unwrap_or(u8::MAX),
            ..Self::default()
        };
        value.name[..len].copy_from_slice(&name.as_bytes()[..len]);
        value
    }

    /// The stored name (lossy: a corrupt entry gives an empty name).
    pub fn name(&self) -> &str {
        let len = usize::from(self.name_len).min(NAME_MAX);
        core::str::from_utf8(&self.name[..len]).unwrap_or("")
    }
}

/// 64-bit mixer (splitmix64's finaliser): spreads socket cookies and 5-tuple sums over the
/// Maglev table. Shared so user space and tests can predict the kernel's choice.
#[expect(
    clippy::inline_always,
    reason = "called from BPF programs, where calls are costly"
)]
#[inline(always)]
pub const fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Maglev entry for a hash: the low 32 bits scaled to `0..MAGLEV_M` (multiply and shift, as in
/// Lemire's range reduction). Not `hash % M`: the verifier loses the bounds of a 64-bit modulo
/// and then rejects the table access, while it tracks a multiply by a constant and a shift.
#[expect(
    clippy::inline_always,
    reason = "called from BPF programs, where calls are costly"
)]
#[inline(always)]
pub const fn maglev_index(hash: u64) -> usize {
    (((hash & 0xffff_ffff) * MAGLEV_M as u64) >> 32) as usize
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::string::String;

    #[test]
    fn keys_encode_addresses_ports_and_families() {
        let k = SvcKey::new("10.96.0.10".parse().unwrap(), 53, PROTO_UDP);
        assert_eq!(&k.addr[..4], &[10, 96, 0, 10]);
        assert!(k.addr[4..].iter().all(|b| *b == 0));
        assert_eq!(k.family, FAMILY_V4);
        assert_eq!(k.port.to_ne_bytes(), [0, 53], "port in network order");
        assert_eq!(k.port(), 53);
        assert_eq!(k.ip(), Some("10.96.0.10".parse().unwrap()));

        let k6 = SvcKey::new("fd00::a".parse().unwrap(), 443, PROTO_TCP);
        assert_eq!(k6.family, FAMILY_V6);
        assert_eq!(k6.addr[0], 0xfd);
        assert_eq!(k6.addr[15], 0x0a);
        assert_eq!(k6.ip(), Some("fd00::a".parse().unwrap()));

        let any = SvcKey::new("0.0.0.0".parse().unwrap(), 30080, PROTO_TCP);
        assert_eq!(any.addr, [0; 16]);
        assert_ne!(any, SvcKey::new("::".parse().unwrap(), 30080, PROTO_TCP));
    }

    #[test]
    fn decode_rejects_unknown_family() {
        assert_eq!(decode_addr([0; 16], 0), None);
        assert_eq!(decode_addr([0; 16], 5), None);
    }

    #[test]
    fn revnat_name_truncates_on_char_boundary() {
        let long: String = core::iter::repeat_n('é', 100).collect(); // 200 bytes
        let v = RevNatValue::new(SvcKey::default(), KIND_CLUSTER_IP, &long);
        assert!(v.name().len() <= NAME_MAX);
        assert_eq!(v.name().len() % 2, 0);
        assert!(long.starts_with(v.name()));
        let v = RevNatValue::new(SvcKey::default(), KIND_NODE_PORT, "default/web:http");
        assert_eq!(v.name(), "default/web:http");
        assert_eq!(v.kind, KIND_NODE_PORT);
    }

    #[test]
    fn maglev_index_in_range_and_spread() {
        let mut hits = [0u32; MAGLEV_M];
        for cookie in 0..(MAGLEV_M as u64 * 20) {
            hits[maglev_index(mix64(cookie))] += 1;
        }
        let (min, max) = (hits.iter().min().unwrap(), hits.iter().max().unwrap());
        assert!(*min > 2 && *max < 60, "poor spread: min {min} max {max}");
    }
}
