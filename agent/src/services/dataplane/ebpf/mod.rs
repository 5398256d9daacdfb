//! The eBPF service dataplane ([`EbpfLb`]): socket-level load balancing on a cgroup, tc (TCX)
//! load balancing with BPF conntrack on the node's interfaces, Maglev backend choice: twill's
//! kube-proxy replacement. The kernel programs are in `ebpf/twill-ebpf/src/lb/`, the map layout
//! (and why) in `twill_common::service`.
//!
//! What lives where in this folder:
//! - `entries` (pure): one service's map values, slot choice, Maglev table, and the inverse
//!   (map entries back to the service); `writes` (pure): the ordered [`MapWrite`]s of an upsert
//!   or a delete over the [`Mirror`] of what is programmed;
//! - `apply`: the seam under the maps ([`LbMaps`]) and the one generic apply
//!   ([`apply_services`]) and read-back ([`read_services`]); `maps`: its aya implementation
//!   ([`AyaMaps`]) and the pinned-map layout checks; `fake`: [`FakeLbMaps`], the recording
//!   (and optionally failing) fake; `golden/` with `golden_tests.rs`: manifests and the exact
//!   map writes they produce, checked without root;
//! - `attach`: loading, the cgroup and tc attachments and their pinned links; `gc`: freeing
//!   per-flow entries (conntrack, affinity, socket-LB) of removed backends; `podif`: finding
//!   pod-facing interfaces; `sockdiag`: aborting sockets tied to removed backends; `view`: the
//!   read-only view of the pinned maps (`twilld get services`, `/metrics`); `error`: the error
//!   enum.
//!
//! Why it is shaped as it is:
//! - **Everything survives the agent.** Maps are pinned under the pin directory (default
//!   `/sys/fs/bpf/twill/`, a parameter because the rig runs several agents on one machine) and
//!   re-used by the next [`EbpfLb::open`] (`EbpfLoader::map_pin_path`); the program *links* are
//!   pinned too (`<pin dir>/links/`). A `kill -9`ed agent leaves the dataplane running unchanged,
//!   so established and new connections keep working while it is down. On start the new agent
//!   attaches its programs first and only then unpins (detaches) the old links: for a moment both
//!   run, which is harmless (the second sees an already-translated address and does nothing),
//!   and there is never a moment with none. Dropping an [`EbpfLb`] therefore leaves the dataplane
//!   in place; [`EbpfLb::uninstall`] removes it.
//! - **Pinned maps are checked before re-use.** A pinned map whose type, key or value size
//!   differs from this build's (an upgrade that changed the layout) is unpinned and recreated,
//!   since a program reading it with another layout would misbehave; a different `max_entries`
//!   is kept (logged), as maps cannot be resized.
//! - **Incremental, ordered updates.** [`LbDataplane::apply`] touches only the entries of the
//!   services in the plan. Per service: write new backend slots, replace the Maglev table (one
//!   atomic hash update), write the service entry, then delete the freed slots. That order is a
//!   pure list ([`Mirror::plan_upsert`], golden-tested) run through the [`LbMaps`] seam; a
//!   failed write stops the apply, and the next read-back sees a service that differs from the
//!   desired one and is rewritten, while what it left under an id no service entry holds (a
//!   delete that failed after removing the service entry) is removed by the resync
//!   ([`remove_orphans`]); tested for a failure at every write with the faulty fake.
//!   The user-space [`Mirror`] of what is programmed (everything but the Maglev tables) makes
//!   unchanged entries cost nothing; it is rebuilt from the maps at open and by
//!   [`LbDataplane::observed`].
//! - **Removed endpoints stop at once.** The kernel validates every conntrack and affinity entry
//!   against the backend slot on each use, so a flow to a removed endpoint is re-balanced at its
//!   next packet (UDP included). `apply` then purges the conntrack and affinity entries of the
//!   plan's stale backends. Unconnected UDP through socket-LB picks its backend per datagram
//!   from the current table; a *connected* UDP socket of the node cannot be moved, so the ones
//!   socket-LB connected to a removed backend (cookies from `TWL_LB_SOCK`) are aborted through
//!   `sock_diag` (the `sockdiag` module) and the application reconnects to a live backend. The
//!   `TWL_LB_SOCK` entries themselves only map a backend back to its VIP; [`EbpfLb::gc`] clears
//!   stale ones on every full resync (`observed`). All of this runs after the new backend set
//!   is written, so it never delays the change itself.
//! - **NodePorts need the node's addresses**, which the kernel side looks up in
//!   `TWL_LB_LADDR`; [`EbpfLb::sync_local_addrs`] fills it from `getifaddrs` in the calling
//!   thread's network namespace (at open, on each `apply` and each full resync). Every call
//!   that may refresh them must run in the node's namespace (true for all of `twilld`).
//! - Pod-facing interfaces (pod bridges of any name, routed pods' veths) come and go with pods:
//!   the [`podif`] module finds them and [`EbpfLb::sync_pod_interfaces`] attaches and detaches
//!   the pod-side programs as they do. Configured interfaces that do not exist yet stay pending
//!   and are attached by [`EbpfLb::attach_pending`], which every full resync calls.
//! - Interfaces and the cgroup are resolved in the calling thread's network namespace and mount
//!   view: `twilld` runs under `nsenter --net=...`; tests call from a thread that did `setns`.
//! - Errors: [`EbpfLbError`] names the operation and the object (map and key, program and
//!   cgroup or interface, path) and keeps aya's error with its errno. It is separate from
//!   [`EbpfError`] (which it wraps for loading) so the shared enum stays the counter's.
//!
//! Needs Linux >= 6.7 (TCX 6.6, `BPF_FIB_LOOKUP_SRC` 6.7, cgroup `getpeername` hooks 5.8,
//! per-map memory in fdinfo 6.4) and `CAP_BPF` + `CAP_NET_ADMIN` + `CAP_SYS_ADMIN` (or root).

mod apply;
mod attach;
mod entries;
mod error;
mod fake;
mod gc;
#[cfg(test)]
mod golden_tests;
mod maps;
pub mod podif;
mod sockdiag;
mod view;
mod writes;

pub use apply::{LbMaps, apply_services, read_services, remove_orphans};
pub use entries::EntryError;
pub use error::EbpfLbError;
pub(crate) use error::error_chain;
pub use fake::FakeLbMaps;
pub use maps::AyaMaps;
pub use view::{EbpfLbView, ServiceCounters};
pub use writes::{MapWrite, Mirror, SvcKeyText, Upsert, delete_writes, orphan_writes};

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    path::PathBuf,
};

use aya::{Ebpf, programs::links::PinnedLink};
use tracing::{debug, info, instrument, warn};
use twill_common::service::{
    DEFAULT_MAX_AFFINITY, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_CT, DEFAULT_MAX_SERVICES,
    DEFAULT_MAX_SOCK, LbConfig, MAPS, PROG_CONNECT4, PROG_CONNECT6, PROG_GETPEERNAME4,
    PROG_GETPEERNAME6, PROG_RECVMSG4, PROG_RECVMSG6, PROG_SENDMSG4, PROG_SENDMSG6, PROG_TC_EGRESS,
    PROG_TC_EXT_INGRESS, PROG_TC_POD_INGRESS, SvcCount,
};

use crate::services::lb::{LbDataplane, LbError, LbPlan, LbService};
use attach::remove_stale_links;
use error::{map_err, not_found};

/// Default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/twill";
/// Sub-directory of the pin directory holding the pinned program links.
const LINKS_DIR: &str = "links";

/// The cgroup `sock_addr` programs, all attached to the configured cgroup.
const SOCK_PROGRAMS: [&str; 8] = [
    PROG_CONNECT4,
    PROG_CONNECT6,
    PROG_SENDMSG4,
    PROG_SENDMSG6,
    PROG_RECVMSG4,
    PROG_RECVMSG6,
    PROG_GETPEERNAME4,
    PROG_GETPEERNAME6,
];
/// The tc programs.
const TC_PROGRAMS: [&str; 3] = [PROG_TC_EXT_INGRESS, PROG_TC_POD_INGRESS, PROG_TC_EGRESS];
/// Link pin suffixes of an interface's ingress and egress attachments.
const TC_TAGS: [&str; 2] = ["in", "eg"];

/// What an interface faces; decides the ingress program (and so when flows are SNATed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfaceRole {
    /// The uplink or the overlay device: traffic from outside the node and replies from other
    /// nodes.
    External,
    /// A pod-facing interface: a pod bridge, or a routed pod's veth (see [`podif`]).
    Pods,
}

/// An interface that gets the tc programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcIface {
    /// Interface name, in the calling thread's network namespace.
    pub name: String,
    /// What it faces.
    pub role: IfaceRole,
}

impl TcIface {
    /// An uplink or overlay interface.
    pub fn external(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            role: IfaceRole::External,
        }
    }

    /// A pod-facing interface.
    pub fn pods(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            role: IfaceRole::Pods,
        }
    }
}

/// Map capacities (used when a map is created; a re-used pinned map keeps its size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LbLimits {
    /// Frontends; service ids must be below it.
    pub max_services: u32,
    /// Backends over all frontends.
    pub max_backends: u32,
    /// Conntrack entries (two per tc-path flow).
    pub max_ct: u32,
    /// Affinity entries.
    pub max_affinity: u32,
    /// Socket-LB reverse entries.
    pub max_sock: u32,
}

impl Default for LbLimits {
    fn default() -> Self {
        Self {
            max_services: DEFAULT_MAX_SERVICES,
            max_backends: DEFAULT_MAX_BACKENDS,
            max_ct: DEFAULT_MAX_CT,
            max_affinity: DEFAULT_MAX_AFFINITY,
            max_sock: DEFAULT_MAX_SOCK,
        }
    }
}

/// Everything [`EbpfLb::open_with`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EbpfLbConfig {
    /// bpffs directory for the pinned maps and links (created if missing).
    pub pin_dir: PathBuf,
    /// cgroup v2 directory for the socket programs; `None`: no socket-LB.
    pub cgroup: Option<PathBuf>,
    /// Interfaces for the tc programs.
    pub ifaces: Vec<TcIface>,
    /// Map sizes.
    pub limits: LbLimits,
}

/// One service's counters summed over CPUs, with its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceState {
    /// The programmed service, as read back from the maps.
    pub service: LbService,
    /// Its counters.
    pub counts: SvcCount,
}

/// Fill level and memory of one map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapUsage {
    /// Map name.
    pub name: &'static str,
    /// Entries in use (arrays: `None`, they are always full).
    pub entries: Option<u64>,
    /// Capacity.
    pub max_entries: u32,
    /// Kernel memory charged to the map (`memlock` in fdinfo).
    pub memlock_bytes: Option<u64>,
}

/// What [`EbpfLb::sync_pod_interfaces`] did.
#[derive(Debug, Default)]
pub struct PodIfaceChanges {
    /// Interfaces that got the pod-side programs.
    pub attached: Vec<String>,
    /// Interfaces whose programs were removed.
    pub detached: Vec<String>,
    /// Interfaces that could not be changed, with the reason.
    pub failed: Vec<(String, EbpfLbError)>,
}

/// What [`EbpfLb::gc`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Conntrack entries.
    pub ct: usize,
    /// Affinity entries.
    pub affinity: usize,
    /// Socket-LB entries.
    pub sock: usize,
}

/// The eBPF service dataplane of one node. See the module notes.
pub struct EbpfLb {
    pin_dir: PathBuf,
    limits: LbLimits,
    /// Owns the loaded programs (their links are pinned, see `links`).
    ebpf: Ebpf,
    maps: AyaMaps,
    /// Pinned links with their pin paths.
    links: Vec<(PathBuf, PinnedLink)>,
    /// Configured interfaces that did not exist yet (see [`EbpfLb::attach_pending`]).
    pending: Vec<TcIface>,
    /// Pod-facing interfaces with the pod-side programs: name → ifindex when attached.
    pod_ifaces: BTreeMap<String, u32>,
    /// The global settings last written.
    settings: LbConfig,
    /// What the maps hold (see [`Mirror`]).
    mirror: Mirror,
}

impl std::fmt::Debug for EbpfLb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfLb")
            .field("pin_dir", &self.pin_dir)
            .field("links", &self.links.len())
            .field("services", &self.mirror.len())
            .finish_non_exhaustive()
    }
}

impl EbpfLb {
    /// Reads every programmed service back from the maps and rebuilds the mirror.
    fn read_back(&mut self) -> Result<Vec<LbService>, EbpfLbError> {
        let (services, mirror) = read_services(&self.maps)?;
        self.mirror = mirror;
        Ok(services)
    }

    /// Per-service counters summed over CPUs, by service id.
    pub fn counters(&self) -> Result<BTreeMap<u32, SvcCount>, EbpfLbError> {
        self.maps.counters(self.mirror.ids.keys().copied())
    }

    /// Fill level and kernel memory of every map (LRU maps are counted by iterating them).
    pub fn occupancy(&self) -> Result<Vec<MapUsage>, EbpfLbError> {
        Ok(self.maps.occupancy(self.mirror.values()))
    }

    /// Detaches every program and removes the pinned links and maps (and the pin directory if
    /// that leaves it empty): the node has no service dataplane afterwards.
    #[instrument(level = "info", skip_all, fields(pin_dir = %self.pin_dir.display()), err)]
    pub fn uninstall(mut self) -> Result<(), EbpfLbError> {
        let mut first_err = None;
        for (path, link) in self.links.drain(..) {
            if let Err(source) = link.unpin() {
                first_err.get_or_insert(EbpfLbError::Link {
                    operation: "unpin",
                    path,
                    source: Box::new(source),
                });
            }
        }
        let links_dir = self.pin_dir.join(LINKS_DIR);
        remove_stale_links(&links_dir, &BTreeSet::new());
        for name in MAPS {
            let path = self.pin_dir.join(name);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    first_err.get_or_insert(EbpfLbError::Io {
                        operation: "unpin map",
                        path,
                        source,
                    });
                }
            }
        }
        let _ = fs::remove_dir(&links_dir);
        let _ = fs::remove_dir(&self.pin_dir);
        first_err.map_or(Ok(()), Err)
    }
}

impl EbpfLb {
    /// The periodic chores, run on every full resync (`observed`): attach interfaces that have
    /// appeared, refresh the node addresses, read back, remove the entries under service ids no
    /// service holds (left by a failed apply), and free stale conntrack/affinity/socket
    /// entries. Only the read-back can fail the call; the chores log their errors.
    fn resync(&mut self) -> Result<Vec<LbService>, EbpfLbError> {
        match self.attach_pending() {
            Ok(names) if !names.is_empty() => info!(?names, "attached pending interfaces"),
            Ok(_) => {}
            Err(err) => warn!(error = %error_chain(&err), "attach pending interfaces"),
        }
        if let Err(err) = self.sync_local_addrs() {
            warn!(error = %error_chain(&err), "refresh node addresses");
        }
        let services = self.read_back()?;
        match remove_orphans(&mut self.maps) {
            Ok(0) => {}
            Ok(writes) => info!(writes, "removed entries under service ids no service holds"),
            Err(err) => warn!(error = %error_chain(&err), "remove entries of unheld service ids"),
        }
        match self.gc() {
            Ok(stats) if stats != GcStats::default() => debug!(?stats, "freed stale entries"),
            Ok(_) => {}
            Err(err) => warn!(error = %error_chain(&err), "free stale entries"),
        }
        Ok(services)
    }
}

impl LbDataplane for EbpfLb {
    fn mode(&self) -> &'static str {
        "ebpf"
    }

    fn apply(&mut self, plan: &LbPlan) -> Result<(), LbError> {
        self.apply_plan(plan).map_err(LbError::from)
    }

    /// Reads back what is programmed; also runs the periodic chores (see `resync`).
    fn observed(&mut self) -> Result<Vec<LbService>, LbError> {
        self.resync().map_err(LbError::from)
    }
}

/// A dataplane shared between the service loop (which owns one clone) and the agent's metrics
/// or `dump` (which lock another).
impl LbDataplane for std::sync::Arc<std::sync::Mutex<EbpfLb>> {
    fn mode(&self) -> &'static str {
        "ebpf"
    }

    fn apply(&mut self, plan: &LbPlan) -> Result<(), LbError> {
        self.lock()
            .map_err(|_| LbError::Unavailable("eBPF dataplane lock poisoned".into()))?
            .apply(plan)
    }

    fn observed(&mut self) -> Result<Vec<LbService>, LbError> {
        self.lock()
            .map_err(|_| LbError::Unavailable("eBPF dataplane lock poisoned".into()))?
            .observed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::bpf::object;

    #[test]
    fn dataplane_is_send() {
        fn assert_dataplane<T: LbDataplane>() {}
        assert_dataplane::<EbpfLb>();
        assert_dataplane::<std::sync::Arc<std::sync::Mutex<EbpfLb>>>();
    }

    /// The embedded object defines every program and map `EbpfLb` looks up (no root needed).
    #[test]
    fn object_has_every_lb_program_and_map() {
        let object = object();
        if object.is_empty() {
            return; // AYA_BUILD_SKIP; `ebpf::tests` checks that this is deliberate.
        }
        let has = |name: &str| object.windows(name.len()).any(|w| w == name.as_bytes());
        for name in SOCK_PROGRAMS.iter().chain(&TC_PROGRAMS).chain(&MAPS) {
            assert!(has(name), "{name} not in the object");
        }
    }

    #[test]
    fn tc_iface_constructors() {
        assert_eq!(TcIface::external("eth0").role, IfaceRole::External);
        assert_eq!(TcIface::pods("cni0").name, "cni0");
    }
}
