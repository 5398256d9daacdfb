//! twill's node agent, `twilld`, as a library.
//!
//! Two loops share one pattern: **sources → model → desired state → diff against observed →
//! plan → apply through a seam**, with a periodic resync that heals drift.
//! - [`overlay`]: the node's lease (etcd or the Node's podCIDR), the peers' leases, and the
//!   routes, neighbours, FDB entries and devices of one backend (vxlan, host-gw, udp) behind the
//!   [`overlay::kernel::Kernel`] seam; masquerade.
//! - [`services`]: Services and EndpointSlices (etcd manifests or the Kubernetes API), the load
//!   balancing plan, and one dataplane (eBPF, nftables, iptables) behind its own seam.
//! - [`dns`]: Service names answered on the node (`--dns-listen`), from a zone that follows the
//!   service source; other names forwarded.
//! - [`daemon`]: the command line and the wiring; the only module that knows [`daemon::Options`].
//! - [`shared`]: what both use (etcd and Kubernetes clients, netfilter's netlink, the HTTP
//!   server, the metrics registry, backoff, shutdown).
//!
//! Sources never touch the kernel; the model is plain data; desired state and plans are pure
//! functions unit-tested without root. docs/ARCHITECTURE.md draws both loops.
#![deny(missing_docs)]

pub mod daemon;
pub mod dns;
pub mod overlay;
pub mod services;
pub mod shared;
