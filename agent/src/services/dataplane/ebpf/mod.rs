//! The eBPF service dataplane ([`EbpfLb`]): socket-level load balancing on a cgroup, tc (TCX)
//! load balancing with BPF conntrack on the node's interfaces, Maglev backend choice; the
//! kube-proxy replacement of issue 4. The kernel programs are in `ebpf/twill-ebpf/src/lb/`, the
//! map layout (and why) in `twill_common::service`.
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
//!   atomic hash update), write the service entry, then delete the freed slots; slot choice is
//!   in the private `entries` module (pure, unit-tested). A user-space mirror of what is programmed (everything
//!   but the Maglev tables) makes unchanged entries cost nothing; it is rebuilt from the maps at
//!   open and by [`LbDataplane::observed`].
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

mod entries;
pub mod podif;
mod sockdiag;
mod view;

pub use entries::EntryError;
pub use view::{EbpfLbView, ServiceCounters};

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    fs,
    io::{self, BufRead as _},
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, IterableMap as _, MapData, MapError, MapInfo, MapType, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::TcAttachOptions,
    },
    sys::SyscallError,
};
use tracing::{debug, info, instrument, warn};
use twill_common::service::{
    AffinityKey, AffinityValue, BackendKey, BackendValue, CFG_UDP_CONNECT_VIA_TC, CT_DIR_FORWARD,
    CT_DIR_REPLY, CT_TIMEOUT_TCP_NS, CT_TIMEOUT_UDP_NS, CtKey, CtValue, DEFAULT_MAX_AFFINITY,
    DEFAULT_MAX_BACKENDS, DEFAULT_MAX_CT, DEFAULT_MAX_SERVICES, DEFAULT_MAX_SOCK, LbConfig,
    LocalAddrKey, MAP_AFFINITY, MAP_BACKEND, MAP_CONFIG, MAP_COUNT, MAP_CT, MAP_LOCAL_ADDR,
    MAP_MAGLEV, MAP_REVNAT, MAP_SOCK, MAP_SVC, MAPS, MAX_LOCAL_ADDRS, MaglevTable, PROG_CONNECT4,
    PROG_CONNECT6, PROG_GETPEERNAME4, PROG_GETPEERNAME6, PROG_RECVMSG4, PROG_RECVMSG6,
    PROG_SENDMSG4, PROG_SENDMSG6, PROG_TC_EGRESS, PROG_TC_EXT_INGRESS, PROG_TC_POD_INGRESS,
    PROTO_TCP, RevNatValue, SockKey, SockValue, SvcCount, SvcKey, SvcValue, encode_addr,
};

use crate::services::lb::{LbDataplane, LbError, LbPlan, LbService, StaleBackend};
use crate::shared::bpf::{EbpfError, OBJECT_NAME, object};
use entries::BackendId;

/// Upserts from which a plan's Maglev tables are computed on a second thread (full syncs).
const PIPELINE_MIN_UPSERTS: usize = 256;
/// Maglev tables computed ahead of the map writes at most (4 KiB each).
const PIPELINE_DEPTH: usize = 64;

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

/// Errors of the eBPF service dataplane.
#[derive(Debug, thiserror::Error)]
pub enum EbpfLbError {
    /// Loading the object or a program failed (see [`EbpfError`]).
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    /// A file-system operation on the pin directory or the cgroup failed.
    #[error("{operation} {path}")]
    Io {
        /// What was done (`"create pin directory"`, `"open cgroup"`, ...).
        operation: &'static str,
        /// The path.
        path: PathBuf,
        /// The error, with its errno.
        #[source]
        source: io::Error,
    },
    /// Attaching a socket program to the cgroup failed.
    #[error("attach program {program} to cgroup {cgroup}")]
    AttachCgroup {
        /// The program.
        program: &'static str,
        /// The cgroup directory.
        cgroup: PathBuf,
        /// aya's error, with the errno.
        #[source]
        source: Box<ProgramError>,
    },
    /// Pinning or unpinning a link failed.
    #[error("{operation} link {path}")]
    Link {
        /// `"pin"`, `"open pinned"`, `"unpin"` or `"convert"`.
        operation: &'static str,
        /// The pin path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A map operation failed.
    #[error("{operation} map {map} key {key}")]
    Map {
        /// `"update"`, `"delete"`, `"lookup"` or `"iterate"`.
        operation: &'static str,
        /// The map.
        map: &'static str,
        /// The key, for humans.
        key: String,
        /// aya's error, with the errno.
        #[source]
        source: Box<MapError>,
    },
    /// A service cannot be programmed.
    #[error("service {frontend}")]
    Entry {
        /// The frontend.
        frontend: String,
        /// Why.
        #[source]
        source: EntryError,
    },
    /// A system query failed (network-namespace cookie, interface addresses, CPU count).
    #[error("{0}")]
    System(&'static str, #[source] io::Error),
}

fn map_err(
    operation: &'static str,
    map: &'static str,
    key: impl std::fmt::Debug,
) -> impl FnOnce(MapError) -> EbpfLbError {
    move |source| EbpfLbError::Map {
        operation,
        map,
        key: format!("{key:?}"),
        source: Box::new(source),
    }
}

/// Whether a map error means "no such key" (deleting an absent key is fine: apply is
/// idempotent).
fn not_found(err: &MapError) -> bool {
    match err {
        MapError::KeyNotFound | MapError::ElementNotFound => true,
        MapError::SyscallError(SyscallError { io_error, .. }) => {
            io_error.raw_os_error() == Some(libc::ENOENT)
        }
        _ => false,
    }
}

impl From<EbpfLbError> for LbError {
    fn from(err: EbpfLbError) -> Self {
        match err {
            EbpfLbError::Entry { frontend, source } => LbError::Capacity {
                what: frontend,
                reason: source.to_string(),
            },
            EbpfLbError::Map {
                operation,
                map,
                key,
                source,
            } => LbError::Op {
                op: operation,
                object: format!("map {map} key {key}"),
                source,
            },
            other => LbError::Unavailable(error_chain(&other)),
        }
    }
}

/// An error with its sources, `: `-separated (for logs).
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        text.push_str(": ");
        text.push_str(&err.to_string());
        source = err.source();
    }
    text
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

/// What is programmed for one frontend: its service entry and backend slots (the Maglev
/// table and the reverse-NAT entry are derived from the service and rewritten with it). Kept
/// for every frontend for as long as the agent runs, so it is compact: no per-frontend tree.
#[derive(Debug, Clone)]
struct Programmed {
    value: SvcValue,
    backends: Slots,
}

/// A frontend's programmed backends, `(slot, value)` sorted by address and port.
#[derive(Debug, Clone, Default)]
struct Slots(Box<[(u16, BackendValue)]>);

fn backend_id(value: &BackendValue) -> Option<BackendId> {
    Some((value.ip()?, value.port()))
}

impl Slots {
    /// From `(slot, value)` pairs; values without a valid address are left out.
    fn new(pairs: impl IntoIterator<Item = (u16, BackendValue)>) -> Self {
        let mut v: Vec<(BackendId, u16, BackendValue)> = pairs
            .into_iter()
            .filter_map(|(slot, b)| Some((backend_id(&b)?, slot, b)))
            .collect();
        v.sort_unstable_by_key(|e| e.0);
        v.dedup_by_key(|e| e.0);
        Self(v.into_iter().map(|(_, slot, b)| (slot, b)).collect())
    }

    /// The slot and value of a backend.
    fn get(&self, id: &BackendId) -> Option<&(u16, BackendValue)> {
        self.0
            .binary_search_by_key(id, |(_, b)| {
                backend_id(b).unwrap_or((IpAddr::from([0; 4]), 0))
            })
            .ok()
            .map(|i| &self.0[i])
    }

    /// Every backend with its slot.
    fn slots(&self) -> impl Iterator<Item = (BackendId, u16)> + '_ {
        self.0
            .iter()
            .filter_map(|(slot, b)| Some((backend_id(b)?, *slot)))
    }

    /// Every `(slot, value)`.
    fn values(&self) -> impl Iterator<Item = &(u16, BackendValue)> + '_ {
        self.0.iter()
    }
}

/// The typed maps.
struct LbMaps {
    svc: HashMap<MapData, SvcKey, SvcValue>,
    backends: HashMap<MapData, BackendKey, BackendValue>,
    maglev: HashMap<MapData, u32, MaglevTable>,
    ct: HashMap<MapData, CtKey, CtValue>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    sock: HashMap<MapData, SockKey, SockValue>,
    revnat: HashMap<MapData, u32, RevNatValue>,
    count: PerCpuArray<MapData, SvcCount>,
    local_addrs: HashMap<MapData, LocalAddrKey, u32>,
    config: Array<MapData, LbConfig>,
}

type ReadBack = (
    Vec<LbService>,
    StdHashMap<SvcKey, Programmed>,
    StdHashMap<u32, SvcKey>,
);

impl LbMaps {
    /// Opens the maps pinned in `pin_dir` by a running (or stopped) dataplane, without loading
    /// any program: what [`EbpfLbView`] reads.
    fn from_pins(pin_dir: &Path) -> Result<Self, EbpfLbError> {
        use aya::maps::Map;
        fn pinned<T: TryFrom<Map, Error = MapError>>(
            pin_dir: &Path,
            name: &'static str,
            wrap: fn(MapData) -> Map,
        ) -> Result<T, EbpfLbError> {
            let path = pin_dir.join(name);
            let data = MapData::from_pin(&path).map_err(|source| EbpfLbError::Map {
                operation: "open pinned",
                map: name,
                key: path.display().to_string(),
                source: Box::new(source),
            })?;
            T::try_from(wrap(data)).map_err(|source| EbpfLbError::Map {
                operation: "open pinned",
                map: name,
                key: path.display().to_string(),
                source: Box::new(source),
            })
        }
        Ok(Self {
            svc: pinned(pin_dir, MAP_SVC, Map::HashMap)?,
            backends: pinned(pin_dir, MAP_BACKEND, Map::HashMap)?,
            maglev: pinned(pin_dir, MAP_MAGLEV, Map::HashMap)?,
            ct: pinned(pin_dir, MAP_CT, Map::LruHashMap)?,
            affinity: pinned(pin_dir, MAP_AFFINITY, Map::LruHashMap)?,
            sock: pinned(pin_dir, MAP_SOCK, Map::LruHashMap)?,
            revnat: pinned(pin_dir, MAP_REVNAT, Map::HashMap)?,
            count: pinned(pin_dir, MAP_COUNT, Map::PerCpuArray)?,
            local_addrs: pinned(pin_dir, MAP_LOCAL_ADDR, Map::HashMap)?,
            config: pinned(pin_dir, MAP_CONFIG, Map::Array)?,
        })
    }

    /// Every programmed service, rebuilt from the maps, with the mirror of what is programmed
    /// and the id index.
    fn read_services(&self) -> Result<ReadBack, EbpfLbError> {
        let entries: Vec<(SvcKey, SvcValue)> = self
            .svc
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err("iterate", MAP_SVC, ""))?;
        let mut services = Vec::with_capacity(entries.len());
        let mut programmed = StdHashMap::with_capacity(entries.len());
        let mut ids = StdHashMap::with_capacity(entries.len());
        for (key, value) in entries {
            let id = value.id;
            let revnat =
                optional(self.revnat.get(&id, 0)).map_err(map_err("lookup", MAP_REVNAT, id))?;
            let mut backends = Vec::with_capacity(usize::from(value.backends));
            for slot in 0..value.slots {
                let be_key = BackendKey { id, slot, pad: 0 };
                if let Some(b) = optional(self.backends.get(&be_key, 0)).map_err(map_err(
                    "lookup",
                    MAP_BACKEND,
                    be_key,
                ))? {
                    backends.push((slot, b));
                }
            }
            if let Some(svc) = entries::reconstruct(&key, &value, revnat.as_ref(), backends.clone())
            {
                services.push(svc);
            }
            programmed.insert(
                key,
                Programmed {
                    value,
                    backends: Slots::new(backends),
                },
            );
            ids.insert(id, key);
        }
        services.sort_by_key(|s| s.frontend.key());
        Ok((services, programmed, ids))
    }

    /// Counters of the services `ids`, summed over CPUs.
    fn counters(
        &self,
        ids: impl IntoIterator<Item = u32>,
    ) -> Result<BTreeMap<u32, SvcCount>, EbpfLbError> {
        let mut out = BTreeMap::new();
        for id in ids {
            out.insert(id, self.count_of(id)?);
        }
        Ok(out)
    }

    /// One service's counters, summed over CPUs.
    fn count_of(&self, id: u32) -> Result<SvcCount, EbpfLbError> {
        let per_cpu = self
            .count
            .get(&id, 0)
            .map_err(map_err("lookup", MAP_COUNT, id))?;
        Ok(per_cpu
            .iter()
            .fold(SvcCount::default(), |acc, c| acc.wrapping_add(*c)))
    }

    /// Fill level and kernel memory of every map; the user-space-written maps are counted from
    /// the service values (`fill`), the LRU maps by iterating them.
    fn occupancy(
        &self,
        fill: impl IntoIterator<Item = impl std::borrow::Borrow<SvcValue>>,
    ) -> Vec<MapUsage> {
        let (mut n, mut programmed_backends, mut with_table) = (0u64, 0u64, 0u64);
        for value in fill {
            let value = value.borrow();
            n += 1;
            programmed_backends += u64::from(value.backends);
            with_table += u64::from(value.backends > 0);
        }
        let usage = |name: &'static str, map: &MapData, entries: Option<u64>| {
            let info = map.info().ok();
            MapUsage {
                name,
                entries,
                max_entries: info.as_ref().map_or(0, MapInfo::max_entries),
                memlock_bytes: memlock(map),
            }
        };
        vec![
            usage(MAP_SVC, self.svc.map(), Some(n)),
            usage(MAP_BACKEND, self.backends.map(), Some(programmed_backends)),
            usage(MAP_MAGLEV, self.maglev.map(), Some(with_table)),
            usage(MAP_CT, self.ct.map(), Some(count_keys(self.ct.keys()))),
            usage(
                MAP_AFFINITY,
                self.affinity.map(),
                Some(count_keys(self.affinity.keys())),
            ),
            usage(
                MAP_SOCK,
                self.sock.map(),
                Some(count_keys(self.sock.keys())),
            ),
            usage(MAP_REVNAT, self.revnat.map(), Some(n)),
            usage(MAP_COUNT, self.count.map(), None),
            usage(
                MAP_LOCAL_ADDR,
                self.local_addrs.map(),
                Some(count_keys(self.local_addrs.keys())),
            ),
            usage(MAP_CONFIG, self.config.map(), None),
        ]
    }
}

/// The eBPF service dataplane of one node. See the module notes.
pub struct EbpfLb {
    pin_dir: PathBuf,
    limits: LbLimits,
    /// Owns the loaded programs (their links are pinned, see `links`).
    ebpf: Ebpf,
    maps: LbMaps,
    /// Pinned links with their pin paths.
    links: Vec<(PathBuf, PinnedLink)>,
    /// Configured interfaces that did not exist yet (see [`EbpfLb::attach_pending`]).
    pending: Vec<TcIface>,
    /// Pod-facing interfaces with the pod-side programs: name → ifindex when attached.
    pod_ifaces: BTreeMap<String, u32>,
    /// The global settings last written.
    settings: LbConfig,
    programmed: StdHashMap<SvcKey, Programmed>,
    ids: StdHashMap<u32, SvcKey>,
}

impl std::fmt::Debug for EbpfLb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfLb")
            .field("pin_dir", &self.pin_dir)
            .field("links", &self.links.len())
            .field("services", &self.programmed.len())
            .finish_non_exhaustive()
    }
}

/// Expected kernel layout of each map: type, key size, value size, `BPF_F_NO_PREALLOC`, size.
fn map_specs(limits: &LbLimits) -> [(&'static str, MapType, usize, usize, bool, u32); 10] {
    use std::mem::size_of;
    [
        (
            MAP_SVC,
            MapType::Hash,
            size_of::<SvcKey>(),
            size_of::<SvcValue>(),
            true,
            limits.max_services,
        ),
        (
            MAP_BACKEND,
            MapType::Hash,
            size_of::<BackendKey>(),
            size_of::<BackendValue>(),
            true,
            limits.max_backends,
        ),
        (
            MAP_MAGLEV,
            MapType::Hash,
            4,
            size_of::<MaglevTable>(),
            true,
            limits.max_services,
        ),
        (
            MAP_CT,
            MapType::LruHash,
            size_of::<CtKey>(),
            size_of::<CtValue>(),
            false,
            limits.max_ct,
        ),
        (
            MAP_AFFINITY,
            MapType::LruHash,
            size_of::<AffinityKey>(),
            size_of::<AffinityValue>(),
            false,
            limits.max_affinity,
        ),
        (
            MAP_SOCK,
            MapType::LruHash,
            size_of::<SockKey>(),
            size_of::<SockValue>(),
            false,
            limits.max_sock,
        ),
        (
            MAP_REVNAT,
            MapType::Hash,
            4,
            size_of::<RevNatValue>(),
            true,
            limits.max_services,
        ),
        (
            MAP_COUNT,
            MapType::PerCpuArray,
            4,
            size_of::<SvcCount>(),
            false,
            limits.max_services,
        ),
        (
            MAP_LOCAL_ADDR,
            MapType::Hash,
            size_of::<LocalAddrKey>(),
            4,
            true,
            MAX_LOCAL_ADDRS,
        ),
        (
            MAP_CONFIG,
            MapType::Array,
            4,
            size_of::<LbConfig>(),
            false,
            1,
        ),
    ]
}

impl EbpfLb {
    /// Loads (or re-uses) the dataplane: maps pinned in `pin_dir`, socket programs on the cgroup
    /// v2 directory `cgroup`, tc programs on `ifaces`, default map sizes. See
    /// [`open_with`](Self::open_with).
    pub fn open(
        pin_dir: impl AsRef<Path>,
        cgroup: impl AsRef<Path>,
        ifaces: &[TcIface],
    ) -> Result<Self, EbpfLbError> {
        Self::open_with(&EbpfLbConfig {
            pin_dir: pin_dir.as_ref().to_owned(),
            cgroup: Some(cgroup.as_ref().to_owned()),
            ifaces: ifaces.to_vec(),
            limits: LbLimits::default(),
        })
    }

    /// Loads the embedded object with its maps pinned in `config.pin_dir` (re-using pinned maps
    /// of a previous run), loads and attaches the programs, replaces the links of a previous run,
    /// writes the global settings and the node addresses, and reads back what is programmed.
    ///
    /// A configured interface that does not exist yet is left pending (logged), not an error:
    /// call [`attach_pending`](Self::attach_pending) later. A missing cgroup is an error.
    #[instrument(level = "info", skip_all, fields(pin_dir = %config.pin_dir.display()), err)]
    pub fn open_with(config: &EbpfLbConfig) -> Result<Self, EbpfLbError> {
        let bytes = object();
        if bytes.is_empty() {
            return Err(EbpfError::NotBuilt {
                object: OBJECT_NAME,
            }
            .into());
        }
        let pin_dir = config.pin_dir.clone();
        let links_dir = pin_dir.join(LINKS_DIR);
        fs::create_dir_all(&links_dir).map_err(|source| EbpfLbError::Io {
            operation: "create pin directory",
            path: links_dir.clone(),
            source,
        })?;
        let specs = map_specs(&config.limits);
        check_pinned_maps(&pin_dir, &specs)?;

        let mut loader = crate::shared::bpf::loader();
        for (name, _, _, _, _, max_entries) in specs {
            loader.map_max_entries(name, max_entries);
            loader.map_pin_path(name, pin_dir.join(name));
        }
        let mut ebpf = loader.load(bytes).map_err(|source| EbpfError::Load {
            object: OBJECT_NAME,
            source: Box::new(source),
        })?;
        for program in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = program_mut(&mut ebpf, program)?;
            prog.load().map_err(|source| EbpfError::Program {
                operation: "load",
                program,
                source: Box::new(source),
            })?;
        }
        for program in TC_PROGRAMS {
            let prog: &mut SchedClassifier = program_mut(&mut ebpf, program)?;
            prog.load().map_err(|source| EbpfError::Program {
                operation: "load",
                program,
                source: Box::new(source),
            })?;
        }

        let maps = LbMaps {
            svc: take_map(&mut ebpf, MAP_SVC)?,
            backends: take_map(&mut ebpf, MAP_BACKEND)?,
            maglev: take_map(&mut ebpf, MAP_MAGLEV)?,
            ct: take_map(&mut ebpf, MAP_CT)?,
            affinity: take_map(&mut ebpf, MAP_AFFINITY)?,
            sock: take_map(&mut ebpf, MAP_SOCK)?,
            revnat: take_map(&mut ebpf, MAP_REVNAT)?,
            count: take_map(&mut ebpf, MAP_COUNT)?,
            local_addrs: take_map(&mut ebpf, MAP_LOCAL_ADDR)?,
            config: take_map(&mut ebpf, MAP_CONFIG)?,
        };
        // The flags a previous run set stay until this run's attachments change them: writing
        // them cleared would hand pods' connected UDP to socket-LB (which cannot move it off a
        // removed endpoint) until the pod-facing interface is attached again below.
        let host_netns_cookie = netns_cookie()?;
        let pinned = maps.config.get(&0, 0).ok();
        let settings = LbConfig {
            host_netns_cookie,
            flags: pinned
                .filter(|c| c.host_netns_cookie == host_netns_cookie)
                .map_or(0, |c| c.flags),
            pad: 0,
        };
        let mut lb = Self {
            pin_dir,
            limits: config.limits,
            ebpf,
            maps,
            links: Vec::new(),
            pending: Vec::new(),
            pod_ifaces: BTreeMap::new(),
            settings,
            programmed: StdHashMap::new(),
            ids: StdHashMap::new(),
        };
        if pinned != Some(settings) {
            lb.write_settings()?;
        }
        lb.sync_local_addrs()?;
        lb.read_back()?;

        // Pins of every configured interface are kept, attached now or not: a missing
        // interface's old link is defunct anyway, and `attach_pending` replaces it.
        let mut pins: BTreeSet<PathBuf> = config
            .ifaces
            .iter()
            .flat_map(|iface| TC_TAGS.map(|tag| lb.tc_pin(iface, tag)))
            .collect();
        if let Some(cgroup) = &config.cgroup {
            lb.attach_cgroup(cgroup, &mut pins)?;
        }
        lb.pending.clone_from(&config.ifaces);
        lb.attach_pending()?;
        remove_stale_links(&links_dir, &pins);
        info!(
            services = lb.programmed.len(),
            links = lb.links.len(),
            pending = ?lb.pending.iter().map(|i| &i.name).collect::<Vec<_>>(),
            "eBPF service dataplane ready"
        );
        Ok(lb)
    }

    /// Attaches the tc programs to the configured interfaces that did not exist until now
    /// (the pod bridge appears with the first pod); returns the names attached by this call.
    /// Cheap when nothing is pending: call it on every resync.
    pub fn attach_pending(&mut self) -> Result<Vec<String>, EbpfLbError> {
        let mut attached = Vec::new();
        for iface in std::mem::take(&mut self.pending) {
            if nix::net::if_::if_nametoindex(iface.name.as_str()).is_err() {
                self.pending.push(iface);
                continue;
            }
            self.attach_tc(&iface)?;
            if iface.role == IfaceRole::Pods {
                self.set_udp_via_tc(true)?;
            }
            attached.push(iface.name);
        }
        Ok(attached)
    }

    /// Pods' connected UDP is left to the tc path only while a pod-facing hook exists; written
    /// only when it changes.
    fn set_udp_via_tc(&mut self, on: bool) -> Result<(), EbpfLbError> {
        let flags = if on {
            self.settings.flags | CFG_UDP_CONNECT_VIA_TC
        } else {
            self.settings.flags & !CFG_UDP_CONNECT_VIA_TC
        };
        if flags != self.settings.flags {
            self.settings.flags = flags;
            self.write_settings()?;
        }
        Ok(())
    }

    /// Makes the pod-side programs sit exactly on `want` (name → ifindex, as
    /// [`podif::pod_facing`] finds them): attaches the new ones (and ones whose device was
    /// re-created under the same name), detaches the ones that went. An interface that fails
    /// (it vanished meanwhile) is reported in [`PodIfaceChanges::failed`] and the others are
    /// still done; the next call retries it.
    pub fn sync_pod_interfaces(&mut self, want: &BTreeMap<String, u32>) -> PodIfaceChanges {
        let mut changes = PodIfaceChanges::default();
        // Pod interfaces are this call's from now on, configured or not.
        self.pending.retain(|i| i.role != IfaceRole::Pods);
        let gone: Vec<String> = self
            .pod_ifaces
            .keys()
            .filter(|name| !want.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            self.pod_ifaces.remove(&name);
            match self.detach_tc(&name) {
                Ok(()) => changes.detached.push(name),
                Err(err) => changes.failed.push((name, err)),
            }
        }
        for (name, &index) in want {
            if self.pod_ifaces.get(name) == Some(&index) {
                continue;
            }
            // A device re-created under the same name: its old links are defunct; they are
            // dropped once the new ones are pinned in their place, and kept if that fails.
            let old = self.take_links(name);
            match self.attach_tc(&TcIface::pods(name.clone())) {
                Ok(()) => changes.attached.push(name.clone()),
                Err(err) => {
                    self.links.extend(old);
                    changes.failed.push((name.clone(), err));
                }
            }
        }
        if let Err(err) = self.set_udp_via_tc(!self.pod_ifaces.is_empty()) {
            changes.failed.push((MAP_CONFIG.to_string(), err));
        }
        changes
    }

    /// The pod-facing interfaces with the pod-side programs.
    pub fn pod_interfaces(&self) -> impl Iterator<Item = &str> {
        self.pod_ifaces.keys().map(String::as_str)
    }

    /// Removes the links of interface `name` from `self.links` (still pinned).
    fn take_links(&mut self, name: &str) -> Vec<(PathBuf, PinnedLink)> {
        let paths: Vec<PathBuf> = TC_TAGS
            .iter()
            .map(|tag| self.tc_pin(&TcIface::pods(name), tag))
            .collect();
        let (taken, kept) = std::mem::take(&mut self.links)
            .into_iter()
            .partition(|(path, _)| paths.contains(path));
        self.links = kept;
        taken
    }

    /// Detaches the tc programs of interface `name` and removes their pins.
    fn detach_tc(&mut self, name: &str) -> Result<(), EbpfLbError> {
        let mut first_err = None;
        for (path, link) in self.take_links(name) {
            // Dropping the unpinned link's last reference detaches it.
            if let Err(source) = link.unpin() {
                first_err.get_or_insert(EbpfLbError::Link {
                    operation: "unpin",
                    path,
                    source: Box::new(source),
                });
            }
        }
        info!(ifname = name, "tc programs detached");
        first_err.map_or(Ok(()), Err)
    }

    /// Configured interfaces still waiting for [`attach_pending`](Self::attach_pending).
    pub fn pending_interfaces(&self) -> &[TcIface] {
        &self.pending
    }

    fn write_settings(&mut self) -> Result<(), EbpfLbError> {
        self.maps
            .config
            .set(0, self.settings, 0)
            .map_err(map_err("update", MAP_CONFIG, 0))
    }

    /// Where the link of `iface`'s `tag` attachment is pinned. bpffs refuses names with a dot
    /// (`flannel.1`), so dots become underscores.
    fn tc_pin(&self, iface: &TcIface, tag: &str) -> PathBuf {
        self.pin_dir
            .join(LINKS_DIR)
            .join(format!("tc_{}_{tag}", iface.name.replace('.', "_")))
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Attaches the socket programs to `cgroup`, replacing the links of a previous run.
    fn attach_cgroup(
        &mut self,
        cgroup: &Path,
        pins: &mut BTreeSet<PathBuf>,
    ) -> Result<(), EbpfLbError> {
        let dir = fs::File::open(cgroup).map_err(|source| EbpfLbError::Io {
            operation: "open cgroup",
            path: cgroup.to_owned(),
            source,
        })?;
        for program in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = program_mut(&mut self.ebpf, program)?;
            let attach_err = |source| EbpfLbError::AttachCgroup {
                program,
                cgroup: cgroup.to_owned(),
                source: Box::new(source),
            };
            // A BPF link (Linux >= 5.7): links on one cgroup always coexist, and
            // `bpf_link_create` wants no attach flags, hence `Single` (0), not `AllowMultiple`.
            let id = prog
                .attach(dir.as_fd(), CgroupAttachMode::Single)
                .map_err(attach_err)?;
            let link = prog.take_link(id).map_err(attach_err)?;
            let path = self.pin_dir.join(LINKS_DIR).join(format!("cg_{program}"));
            let link = FdLink::try_from(link).map_err(|source| EbpfLbError::Link {
                operation: "convert",
                path: path.clone(),
                source: Box::new(source),
            })?;
            let pinned = replace_pin(&path, link)?;
            self.links.push((path.clone(), pinned));
            pins.insert(path);
        }
        debug!(cgroup = %cgroup.display(), "socket programs attached");
        Ok(())
    }

    /// Attaches the tc programs of `iface`'s role at its ingress and egress (TCX, after the
    /// programs already there), replacing the links of a previous run.
    fn attach_tc(&mut self, iface: &TcIface) -> Result<(), EbpfLbError> {
        let ingress = match iface.role {
            IfaceRole::External => PROG_TC_EXT_INGRESS,
            IfaceRole::Pods => PROG_TC_POD_INGRESS,
        };
        for (program, attach_type, direction, tag) in [
            (ingress, TcAttachType::Ingress, "ingress", TC_TAGS[0]),
            (PROG_TC_EGRESS, TcAttachType::Egress, "egress", TC_TAGS[1]),
        ] {
            let prog: &mut SchedClassifier = program_mut(&mut self.ebpf, program)?;
            let attach_err = |source| EbpfError::Attach {
                program,
                ifname: iface.name.clone(),
                direction,
                source: Box::new(source),
            };
            let id = prog
                .attach_with_options(
                    &iface.name,
                    attach_type,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(attach_err)?;
            let link = prog.take_link(id).map_err(attach_err)?;
            let path = self.tc_pin(iface, tag);
            let link = FdLink::try_from(link).map_err(|source| EbpfLbError::Link {
                operation: "convert",
                path: path.clone(),
                source: Box::new(source),
            })?;
            let pinned = replace_pin(&path, link)?;
            self.links.push((path, pinned));
        }
        if iface.role == IfaceRole::Pods {
            let index = nix::net::if_::if_nametoindex(iface.name.as_str()).unwrap_or(0);
            self.pod_ifaces.insert(iface.name.clone(), index);
        }
        info!(ifname = %iface.name, role = ?iface.role, "tc programs attached");
        Ok(())
    }

    /// Writes the addresses of the calling thread's network namespace to `TWL_LB_LADDR` (what
    /// a NodePort answers on), removing the ones that are gone. Returns the number of addresses.
    pub fn sync_local_addrs(&mut self) -> Result<usize, EbpfLbError> {
        let want: BTreeSet<LocalAddrKey> =
            local_addrs()?.into_iter().map(LocalAddrKey::new).collect();
        let have: BTreeSet<LocalAddrKey> = self
            .maps
            .local_addrs
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err("iterate", MAP_LOCAL_ADDR, ""))?;
        for key in want.difference(&have) {
            self.maps.local_addrs.insert(key, 1, 0).map_err(map_err(
                "update",
                MAP_LOCAL_ADDR,
                key,
            ))?;
        }
        for key in have.difference(&want) {
            remove(&mut self.maps.local_addrs, MAP_LOCAL_ADDR, key)?;
        }
        Ok(want.len())
    }

    /// Applies a plan (see [`LbDataplane::apply`]).
    #[instrument(level = "debug", skip_all, fields(upserts = plan.upserts.len(),
        deletes = plan.deletes.len(), stale = plan.stale_backends.len()), err)]
    ///
    /// A service the maps cannot hold (id out of range, malformed table) is skipped and
    /// reported after the rest of the plan is applied, so one bad service does not hold back
    /// the others; a failing map operation stops at once (the caller re-reads and re-plans).
    pub fn apply_plan(&mut self, plan: &LbPlan) -> Result<(), EbpfLbError> {
        for frontend in &plan.deletes {
            self.delete_key(&entries::frontend_key(frontend))?;
        }
        let mut rejected = None;
        let mut one = |this: &mut Self, svc: &LbService, indices: Option<Vec<u32>>| match this
            .upsert(svc, indices)
        {
            Ok(()) => Ok(()),
            Err(err @ EbpfLbError::Entry { .. }) => {
                warn!(error = %error_chain(&err), "service not programmed");
                rejected.get_or_insert(err);
                Ok(())
            }
            Err(err) => Err(err),
        };
        let upserts = &plan.upserts;
        if upserts.len() < PIPELINE_MIN_UPSERTS
            || std::thread::available_parallelism().map_or(1, std::num::NonZero::get) < 2
        {
            for svc in upserts {
                one(self, svc, None)?;
            }
        } else {
            // A second thread computes the Maglev tables (pure, ~10 µs each: a good part of a
            // full sync) a few services ahead of the map writes, which are syscalls.
            std::thread::scope(|scope| -> Result<(), EbpfLbError> {
                let (tx, rx) = std::sync::mpsc::sync_channel(PIPELINE_DEPTH);
                scope.spawn(move || {
                    for svc in upserts {
                        let indices = (!svc.backends.is_empty())
                            .then(|| entries::maglev_indices(&svc.backends));
                        // The writer stopped early (a failed map operation).
                        if tx.send(indices).is_err() {
                            return;
                        }
                    }
                });
                for svc in upserts {
                    one(self, svc, rx.recv().ok().flatten())?;
                }
                Ok(())
            })?;
        }
        if !plan.stale_backends.is_empty() {
            self.purge(&plan.stale_backends)?;
        }
        self.sync_local_addrs()?;
        rejected.map_or(Ok(()), Err)
    }

    /// Writes `svc`; `indices` is its Maglev table of backend indices if already computed.
    fn upsert(&mut self, svc: &LbService, indices: Option<Vec<u32>>) -> Result<(), EbpfLbError> {
        let entry_err = |source| EbpfLbError::Entry {
            frontend: svc.frontend.to_string(),
            source,
        };
        entries::validate(svc, self.limits.max_services).map_err(entry_err)?;
        let key = entries::frontend_key(&svc.frontend);
        let id = svc.id;
        // An id is unique among frontends; one still held by another frontend is stale.
        if let Some(other) = self.ids.get(&id).copied()
            && other != key
        {
            self.delete_key(&other)?;
        }
        let mut old = self.programmed.get(&key).cloned();
        if old.as_ref().is_some_and(|p| p.value.id != id) {
            self.delete_key(&key)?;
            old = None;
        }
        let old_slots: BTreeMap<BackendId, u16> = old
            .as_ref()
            .map(|p| p.backends.slots().collect())
            .unwrap_or_default();
        let slots = entries::assign_slots(&old_slots, &svc.backends).map_err(entry_err)?;

        // 1. New and changed backends, in slots the installed table does not reference.
        let mut backends = Vec::with_capacity(svc.backends.len());
        for (backend, slot) in svc.backends.iter().zip(&slots.slots) {
            let value = entries::backend_value(backend);
            let unchanged = old
                .as_ref()
                .and_then(|p| p.backends.get(&(backend.ip, backend.port)))
                .is_some_and(|(s, v)| s == slot && *v == value);
            if !unchanged {
                let be_key = BackendKey {
                    id,
                    slot: *slot,
                    pad: 0,
                };
                self.maps
                    .backends
                    .insert(be_key, value, 0)
                    .map_err(map_err("update", MAP_BACKEND, be_key))?;
            }
            backends.push((*slot, value));
        }
        // 2. The Maglev table, switched in one update.
        if svc.backends.is_empty() {
            remove(&mut self.maps.maglev, MAP_MAGLEV, &id)?;
        } else {
            let table = match indices {
                Some(indices) => entries::maglev_slots(&indices, &slots.slots),
                None => entries::maglev_table(&svc.backends, &slots.slots),
            }
            .map_err(entry_err)?;
            self.maps
                .maglev
                .insert(id, *table, 0)
                .map_err(map_err("update", MAP_MAGLEV, id))?;
        }
        // 3. Reverse NAT / info and the service entry. The reverse-NAT entry is written with
        // every upsert (one update) rather than mirrored (168 bytes a frontend).
        let revnat = entries::revnat_value(svc);
        self.maps
            .revnat
            .insert(id, revnat, 0)
            .map_err(map_err("update", MAP_REVNAT, id))?;
        let value = entries::svc_value(svc, slots.high);
        if old.as_ref().is_none_or(|p| p.value != value) {
            self.maps.svc.insert(key, value, 0).map_err(map_err(
                "update",
                MAP_SVC,
                svc.frontend.to_string(),
            ))?;
        }
        // 4. Slots nobody references any more.
        for slot in slots.freed {
            let be_key = BackendKey { id, slot, pad: 0 };
            remove(&mut self.maps.backends, MAP_BACKEND, &be_key)?;
        }
        if old.is_none() {
            self.reset_counts(id)?;
        }
        self.programmed.insert(
            key,
            Programmed {
                value,
                backends: Slots::new(backends),
            },
        );
        self.ids.insert(id, key);
        Ok(())
    }

    /// Removes a frontend and everything keyed by its id; absent is fine.
    fn delete_key(&mut self, key: &SvcKey) -> Result<(), EbpfLbError> {
        let value = match self.programmed.remove(key) {
            Some(p) => p.value,
            None => match self.maps.svc.get(key, 0) {
                Ok(value) => value,
                Err(err) if not_found(&err) => return Ok(()),
                Err(err) => return Err(map_err("lookup", MAP_SVC, key)(err)),
            },
        };
        let id = value.id;
        // The service entry first: no new lookup reaches what follows.
        remove(&mut self.maps.svc, MAP_SVC, key)?;
        remove(&mut self.maps.maglev, MAP_MAGLEV, &id)?;
        remove(&mut self.maps.revnat, MAP_REVNAT, &id)?;
        for slot in 0..value.slots {
            let be_key = BackendKey { id, slot, pad: 0 };
            remove(&mut self.maps.backends, MAP_BACKEND, &be_key)?;
        }
        if self.ids.get(&id) == Some(key) {
            self.ids.remove(&id);
        }
        Ok(())
    }

    fn reset_counts(&mut self, id: u32) -> Result<(), EbpfLbError> {
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, err)| EbpfLbError::System("count possible CPUs", err))?;
        let zero = aya::maps::PerCpuValues::try_from(vec![SvcCount::default(); cpus])
            .map_err(|err| EbpfLbError::System("build per-CPU counters", err))?;
        self.maps
            .count
            .set(id, zero, 0)
            .map_err(map_err("update", MAP_COUNT, id))
    }

    /// Removes the conntrack and affinity entries that point at `stale` backends. (The kernel
    /// already ignores them; this frees the entries.)
    fn purge(&mut self, stale: &[StaleBackend]) -> Result<(), EbpfLbError> {
        let gone: BTreeSet<([u8; 16], u8, u16)> = stale
            .iter()
            .map(|s| {
                let (addr, family) = encode_addr(s.ip);
                (addr, family, s.port.to_be())
            })
            .collect();
        let ct: Vec<CtKey> = self
            .maps
            .ct
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| match k.dir {
                CT_DIR_FORWARD => gone.contains(&(v.nat_addr, k.family, v.nat_port)),
                CT_DIR_REPLY => gone.contains(&(k.src, k.family, k.sport)),
                _ => false,
            })
            .map(|(k, _)| k)
            .collect();
        for key in &ct {
            remove(&mut self.maps.ct, MAP_CT, key)?;
        }
        let affinity: Vec<AffinityKey> = self
            .maps
            .affinity
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| {
                let family = if k.family == 0 {
                    // Socket-path entries do not record the family; match on address and port.
                    gone.iter()
                        .find(|(a, _, p)| *a == v.addr && *p == v.port)
                        .map_or(0, |(_, f, _)| *f)
                } else {
                    k.family
                };
                gone.contains(&(v.addr, family, v.port))
            })
            .map(|(k, _)| k)
            .collect();
        for key in &affinity {
            remove(&mut self.maps.affinity, MAP_AFFINITY, key)?;
        }
        // Sockets socket-LB connected to a removed backend (see `sockdiag`): the node's own
        // connected UDP would keep sending there. The node's connected UDP sockets are few, the
        // socket map may hold an entry per TCP connection too: list the sockets and look each
        // candidate up, never iterate the map. Failing to abort them is logged, not fatal: the
        // maps are already right.
        let peers: BTreeSet<(IpAddr, u16)> = stale.iter().map(|s| (s.ip, s.port)).collect();
        let sock_map = &self.maps.sock;
        let balanced = |cookie: u64, (ip, port): (IpAddr, u16)| {
            let (addr, family) = encode_addr(ip);
            let key = SockKey {
                cookie,
                addr,
                port: port.to_be(),
                family,
                pad: [0; 5],
            };
            sock_map.get(&key, 0).is_ok()
        };
        let sockets = match sockdiag::destroy_udp(&peers, balanced) {
            Ok(done) => done.sockets,
            Err(err) => {
                warn!(error = %err, "abort UDP sockets connected to removed backends (sock_diag SOCK_DESTROY)");
                0
            }
        };
        debug!(
            ct = ct.len(),
            affinity = affinity.len(),
            sockets,
            "purged entries of removed backends"
        );
        Ok(())
    }

    /// Removes conntrack, affinity and socket-LB entries that are idle past their timeout or
    /// point at a backend no longer programmed. Call it periodically (e.g. on the resync
    /// timer); the kernel already ignores such entries, this frees them.
    #[instrument(level = "debug", skip(self), err)]
    pub fn gc(&mut self) -> Result<GcStats, EbpfLbError> {
        let now = monotonic_ns();
        let backend_at = |id: u32, slot: u16| -> Option<BackendValue> {
            let key = self.ids.get(&id)?;
            let p = self.programmed.get(key)?;
            p.backends
                .values()
                .find(|(s, _)| *s == slot)
                .map(|(_, v)| *v)
        };
        let live = |id: u32, slot: u16, addr: &[u8; 16], port: u16| {
            backend_at(id, slot).is_some_and(|b| b.addr == *addr && b.port == port)
        };
        let ct: Vec<CtKey> = self
            .maps
            .ct
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| {
                let timeout = if k.proto == PROTO_TCP {
                    CT_TIMEOUT_TCP_NS
                } else {
                    CT_TIMEOUT_UDP_NS
                };
                let idle = now.saturating_sub(v.last_seen_ns) > timeout;
                let stale = match k.dir {
                    CT_DIR_FORWARD => !live(v.svc_id, v.slot, &v.nat_addr, v.nat_port),
                    _ => !live(v.svc_id, v.slot, &k.src, k.sport),
                };
                idle || stale
            })
            .map(|(k, _)| k)
            .collect();
        let affinity: Vec<AffinityKey> = self
            .maps
            .affinity
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| {
                let timeout = self
                    .ids
                    .get(&k.svc_id)
                    .and_then(|key| self.programmed.get(key))
                    .map_or(0, |p| {
                        u64::from(p.value.affinity_timeout_secs) * 1_000_000_000
                    });
                now.saturating_sub(v.last_seen_ns) > timeout
                    || !live(k.svc_id, v.slot, &v.addr, v.port)
            })
            .map(|(k, _)| k)
            .collect();
        let sock: Vec<SockKey> = self
            .maps
            .sock
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| {
                let Some(key) = self.ids.get(&v.svc_id) else {
                    return true;
                };
                self.programmed.get(key).is_none_or(|p| {
                    !p.backends
                        .values()
                        .any(|(_, b)| b.addr == k.addr && b.port == k.port)
                })
            })
            .map(|(k, _)| k)
            .collect();
        for key in &ct {
            remove(&mut self.maps.ct, MAP_CT, key)?;
        }
        for key in &affinity {
            remove(&mut self.maps.affinity, MAP_AFFINITY, key)?;
        }
        for key in &sock {
            remove(&mut self.maps.sock, MAP_SOCK, key)?;
        }
        Ok(GcStats {
            ct: ct.len(),
            affinity: affinity.len(),
            sock: sock.len(),
        })
    }

    /// Reads every programmed service back from the maps and rebuilds the mirror.
    fn read_back(&mut self) -> Result<Vec<LbService>, EbpfLbError> {
        let (services, programmed, ids) = self.maps.read_services()?;
        self.programmed = programmed;
        self.ids = ids;
        Ok(services)
    }

    /// Per-service counters summed over CPUs, by service id.
    pub fn counters(&self) -> Result<BTreeMap<u32, SvcCount>, EbpfLbError> {
        self.maps.counters(self.ids.keys().copied())
    }

    /// Fill level and kernel memory of every map (LRU maps are counted by iterating them).
    pub fn occupancy(&self) -> Result<Vec<MapUsage>, EbpfLbError> {
        Ok(self
            .maps
            .occupancy(self.programmed.values().map(|p| &p.value)))
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
    /// appeared, refresh the node addresses, read back, and free stale conntrack/affinity/socket
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

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, program: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(program)
        .ok_or(EbpfError::Missing {
            object: OBJECT_NAME,
            kind: "program",
            name: program,
        })?
        .try_into()
        .map_err(|source| EbpfError::Program {
            operation: "convert",
            program,
            source: Box::new(source),
        })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(EbpfError::Missing {
        object: OBJECT_NAME,
        kind: "map",
        name,
    })?;
    T::try_from(map).map_err(|source| EbpfError::OpenMap {
        map: name,
        source: Box::new(source),
    })
}

/// Deletes `key`, tolerating its absence.
fn remove<K: aya::Pod + std::fmt::Debug, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    key: &K,
) -> Result<(), EbpfLbError> {
    match map.remove(key) {
        Ok(()) => Ok(()),
        Err(err) if not_found(&err) => Ok(()),
        Err(err) => Err(map_err("delete", name, key)(err)),
    }
}

/// Number of keys a map iteration yields.
fn count_keys<K: aya::Pod>(keys: aya::maps::MapKeys<'_, K>) -> u64 {
    keys.flatten().count() as u64
}

/// `Ok(None)` for a missing key.
fn optional<V>(result: Result<V, MapError>) -> Result<Option<V>, MapError> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(err) if not_found(&err) => Ok(None),
        Err(err) => Err(err),
    }
}

/// Unpins (drops) pinned maps whose layout differs from this build's, before the loader would
/// re-use them.
fn check_pinned_maps(
    pin_dir: &Path,
    specs: &[(&'static str, MapType, usize, usize, bool, u32)],
) -> Result<(), EbpfLbError> {
    for &(name, map_type, key_size, value_size, no_prealloc, max_entries) in specs {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let compatible = match MapInfo::from_pin(&path) {
            Ok(info) => {
                let same = info.map_type().ok() == Some(map_type)
                    && info.key_size() as usize == key_size
                    && info.value_size() as usize == value_size
                    && (info.map_flags() & twill_common::service::BPF_F_NO_PREALLOC != 0)
                        == no_prealloc;
                if same && info.max_entries() != max_entries {
                    warn!(
                        map = name,
                        pinned = info.max_entries(),
                        wanted = max_entries,
                        "pinned map keeps its size"
                    );
                }
                same
            }
            Err(err) => {
                warn!(map = name, error = %err, "cannot inspect pinned map");
                false
            }
        };
        if !compatible {
            warn!(map = name, path = %path.display(), "pinned map has another layout; recreating");
            fs::remove_file(&path).map_err(|source| EbpfLbError::Io {
                operation: "unpin incompatible map",
                path: path.clone(),
                source,
            })?;
        }
    }
    Ok(())
}

/// Pins `link` at `path`, replacing (and so detaching) a link pinned there by a previous run.
/// The new link is attached before the old one goes, so the hook is never empty.
fn replace_pin(path: &Path, link: FdLink) -> Result<PinnedLink, EbpfLbError> {
    let link_err =
        |operation, source: Box<dyn std::error::Error + Send + Sync>| EbpfLbError::Link {
            operation,
            path: path.to_owned(),
            source,
        };
    let old = if path.exists() {
        let pinned =
            PinnedLink::from_pin(path).map_err(|err| link_err("open pinned", Box::new(err)))?;
        Some(
            pinned
                .unpin()
                .map_err(|err| link_err("unpin", Box::new(err)))?,
        )
    } else {
        None
    };
    let pinned = link
        .pin(path)
        .map_err(|err| link_err("pin", Box::new(err)))?;
    // Dropping the old link's last reference detaches it.
    drop(old);
    Ok(pinned)
}

/// Removes link pins in `dir` not in `keep` (interfaces dropped from the configuration).
fn remove_stale_links(dir: &Path, keep: &BTreeSet<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !keep.contains(&path) {
            match fs::remove_file(&path) {
                Ok(()) => info!(path = %path.display(), "removed stale link"),
                Err(err) => warn!(path = %path.display(), error = %err, "remove stale link"),
            }
        }
    }
}

/// The calling thread's network-namespace cookie (`SO_NETNS_COOKIE`, Linux >= 5.14), which the
/// socket programs compare with `bpf_get_netns_cookie` to tell the node's sockets from pods'.
fn netns_cookie() -> Result<u64, EbpfLbError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|errno| EbpfLbError::System("create socket", io::Error::from(errno)))?;
    let mut cookie: u64 = 0;
    let mut len: libc::socklen_t = 8;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given; the fd is open.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(EbpfLbError::System(
            "getsockopt SO_NETNS_COOKIE",
            io::Error::last_os_error(),
        ));
    }
    Ok(cookie)
}

/// The addresses of the calling thread's network namespace.
fn local_addrs() -> Result<Vec<IpAddr>, EbpfLbError> {
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(|errno| EbpfLbError::System("getifaddrs", io::Error::from(errno)))?;
    let mut out: Vec<IpAddr> = addrs
        .filter_map(|ifa| {
            let addr = ifa.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// `CLOCK_MONOTONIC` in nanoseconds, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is valid for writes; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// The `memlock` line of the map's fdinfo: the kernel's count of its memory (Linux >= 6.4 counts
/// the elements actually allocated).
fn memlock(map: &MapData) -> Option<u64> {
    let fd = map.fd().as_fd().as_raw_fd();
    let file = fs::File::open(format!("/proc/self/fdinfo/{fd}")).ok()?;
    io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| line.strip_prefix("memlock:").map(|v| v.trim().parse().ok()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_specs_cover_every_map_once() {
        let specs = map_specs(&LbLimits::default());
        let names: BTreeSet<&str> = specs.iter().map(|s| s.0).collect();
        assert_eq!(names, MAPS.into_iter().collect());
        assert_eq!(specs.len(), MAPS.len());
    }

    #[test]
    fn not_found_recognises_enoent() {
        assert!(not_found(&MapError::KeyNotFound));
        assert!(not_found(&MapError::SyscallError(SyscallError {
            call: "bpf_map_delete_elem",
            io_error: io::Error::from_raw_os_error(libc::ENOENT),
        })));
        assert!(!not_found(&MapError::SyscallError(SyscallError {
            call: "bpf_map_update_elem",
            io_error: io::Error::from_raw_os_error(libc::E2BIG),
        })));
    }

    #[test]
    fn errors_convert_for_the_seam() {
        let err = EbpfLbError::Map {
            operation: "update",
            map: MAP_SVC,
            key: "10.96.0.1:80/TCP".into(),
            source: Box::new(MapError::KeyNotFound),
        };
        assert_eq!(
            err.to_string(),
            "update map TWL_LB_SVC key 10.96.0.1:80/TCP"
        );
        let lb: LbError = err.into();
        assert_eq!(
            lb.to_string(),
            "update map TWL_LB_SVC key 10.96.0.1:80/TCP: key not found"
        );
        let lb: LbError = EbpfLbError::Entry {
            frontend: "ClusterIP 10.96.0.1:80/TCP".into(),
            source: EntryError::IdOutOfRange { id: 0, max: 5 },
        }
        .into();
        assert!(matches!(lb, LbError::Capacity { .. }), "{lb}");
    }

    #[test]
    fn local_addrs_include_loopback_family() {
        // Every namespace has `lo`; its address may be missing while it is down, so only check
        // that the call works and returns no duplicates.
        let addrs = local_addrs().unwrap();
        let unique: BTreeSet<_> = addrs.iter().collect();
        assert_eq!(unique.len(), addrs.len());
    }

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
