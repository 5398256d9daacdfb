//! The desired load-balancer state: a pure function of the services, their EndpointSlices and
//! this node's identity, applying kube-proxy's semantics once for every dataplane.
//!
//! Why this shape:
//! - kube-proxy's rules live here and nowhere else: a dataplane receives resolved backends.
//!   - Slice ports are matched to a Service port by **name and protocol**, as kube-proxy does (the
//!     EndpointSlice controller writes the Service port's name with the resolved target port).
//!     Hand-written slices may instead name the port after a named `targetPort`; that is the
//!     second lookup. A slice with no matching port contributes nothing for that Service port.
//!   - Only an endpoint's first address counts; an address seen in two slices keeps its readiest
//!     copy (slices overlap while the controller moves endpoints).
//!   - Categorisation is kube-proxy's `CategorizeEndpoints`: cluster backends are the ready
//!     endpoints, else the serving-and-terminating ones; local backends are the ready local ones,
//!     else the serving-terminating local ones. ClusterIP frontends use the local set when
//!     `internalTrafficPolicy: Local`, external frontends (NodePort, ExternalIP, LoadBalancer)
//!     when `externalTrafficPolicy: Local`.
//!   - External IPs and LB IPs of a family the Service has no cluster IP of are ignored (as
//!     kube-proxy filters them by the Service's IP families). NodePort frontends exist for each
//!     family of the Service that this node has an address of.
//! - Two Services claiming one frontend (the same external IP and port, the same node port) can
//!   only happen without an API server; the first by namespace/name keeps it and the clash is
//!   reported ([`Desired::conflicts`]), so `twilld apply` can refuse it and the agent logs it.
//! - A frontend address is a claim on traffic to that address. Two kinds of claim are refused
//!   here, for every dataplane, and reported ([`Refused`]) rather than programmed: an address
//!   this node depends on ([`NodeIdentity::reserved`]: its own addresses, etcd's, the API
//!   server's — a Service with `externalIPs: [<etcd's address>]` and port 2379 would otherwise
//!   send every node's new etcd connections to its endpoints, the CVE-2020-8554 class), and
//!   an external IP outside `--allowed-external-ips` ([`NodeIdentity::allowed_external_ips`];
//!   Kubernetes itself now admits none unless told). The API server's address is allowed for
//!   the ClusterIP of `default/kubernetes` only: in a cluster the agent may reach the API server
//!   through that very VIP.
//! - Ids come from [`IdAllocator`], which keeps an id for as long as its frontend exists, hands
//!   out the lowest free one (compact: dataplanes can size arrays by the number of frontends),
//!   never reuses an id in the same build that freed it, and is re-seeded from what the
//!   dataplane reports ([`crate::services::lb::LbDataplane::observed`]) so a restarted agent
//!   derives the same ids as its predecessor.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::services::lb::{
    Backend, BackendState, Frontend, FrontendKey, FrontendKind, LbService, Proto,
};
use crate::services::model::{
    AddressType, Change, EndpointSlice, Kind, Object, ObjectKey, Protocol, Service, TargetPort,
};

/// What the node is: its name (matched against `nodeName`), addresses (their families decide
/// which NodePort frontends exist; empty means both), the addresses no frontend may take, which
/// external IPs it programs, and the pod subnets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeIdentity {
    /// The node's name, as in EndpointSlices' `nodeName`.
    pub name: String,
    /// The node's addresses.
    pub addresses: Vec<IpAddr>,
    /// Addresses no ClusterIP, ExternalIP or LoadBalancer frontend may take, and whose they are.
    pub reserved: BTreeMap<IpAddr, Reserved>,
    /// `--allowed-external-ips`: an external IP gets a frontend only inside one of these
    /// networks; `None`: every external IP does (what the API server admitted, in a cluster).
    pub allowed_external_ips: Option<Vec<IpNet>>,
    /// The node's pod subnets (its lease): an endpoint address inside one is local whatever
    /// its `nodeName` says, since standalone EndpointSlices often name no node.
    pub pod_subnets: Vec<ipnet::IpNet>,
}

impl NodeIdentity {
    /// Whether an endpoint with this address and `nodeName` runs on this node.
    fn hosts(&self, ip: IpAddr, node_name: Option<&str>) -> bool {
        (!self.name.is_empty() && node_name == Some(self.name.as_str()))
            || self.pod_subnets.iter().any(|net| net.contains(&ip))
    }

    /// Replaces the [`Reserved::Node`] addresses with `own`, keeping the others (an address
    /// that is etcd's and the node's stays etcd's, the more telling name).
    pub fn set_own_addresses(&mut self, own: impl IntoIterator<Item = IpAddr>) {
        self.reserved.retain(|_, r| *r != Reserved::Node);
        for ip in own {
            self.reserved.entry(ip).or_insert(Reserved::Node);
        }
    }
}

/// Whose an address in [`NodeIdentity::reserved`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reserved {
    /// One of this node's own addresses.
    Node,
    /// An etcd endpoint's (`--etcd-endpoints`).
    Etcd,
    /// The Kubernetes API server's.
    ApiServer,
}

impl Reserved {
    /// Whose it is, for messages and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Reserved::Node => "node address",
            Reserved::Etcd => "etcd address",
            Reserved::ApiServer => "API server address",
        }
    }
}

/// Why a frontend a Service asks for is not programmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefuseReason {
    /// Its address is one the node depends on.
    Reserved(Reserved),
    /// An external IP outside `--allowed-external-ips`.
    ExternalIpNotAllowed,
}

impl RefuseReason {
    /// A short label (`etcd address`, `external IP not allowed`), as in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RefuseReason::Reserved(r) => r.as_str(),
            RefuseReason::ExternalIpNotAllowed => "external IP not allowed",
        }
    }
}

/// A frontend a Service asks for and does not get.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Refused {
    /// The frontend.
    pub frontend: Frontend,
    /// Whose (`ns/name:port`).
    pub service: String,
    /// Why.
    pub reason: RefuseReason,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ip = self.frontend.ip;
        write!(f, "{} {}: ", self.service, self.frontend)?;
        match self.reason {
            RefuseReason::Reserved(Reserved::Node) => {
                write!(f, "{ip} is an address of this node")
            }
            RefuseReason::Reserved(Reserved::Etcd) => {
                write!(f, "{ip} is an etcd endpoint's address (--etcd-endpoints)")
            }
            RefuseReason::Reserved(Reserved::ApiServer) => {
                write!(f, "{ip} is the Kubernetes API server's address")
            }
            RefuseReason::ExternalIpNotAllowed => write!(
                f,
                "{ip} is not inside --allowed-external-ips (external IPs are programmed only there)"
            ),
        }
    }
}

/// Why `node` does not program `frontend` of the Service `key`, if it does not.
fn refusal(node: &NodeIdentity, key: &NsName, frontend: &Frontend) -> Option<RefuseReason> {
    if frontend.kind == FrontendKind::NodePort {
        return None; // any address of the node, by definition
    }
    if let Some(&r) = node.reserved.get(&frontend.ip) {
        let api_vip = r == Reserved::ApiServer
            && frontend.kind == FrontendKind::ClusterIp
            && (&*key.0, &*key.1) == ("default", "kubernetes");
        if !api_vip {
            return Some(RefuseReason::Reserved(r));
        }
    }
    if frontend.kind == FrontendKind::ExternalIp
        && let Some(allowed) = &node.allowed_external_ips
        && !allowed.iter().any(|n| n.contains(&frontend.ip))
    {
        return Some(RefuseReason::ExternalIpNotAllowed);
    }
    None
}

/// (namespace, name) of a Service or an EndpointSlice. The strings are shared (see
/// [`Snapshot`]): every index that names an object holds a pointer, not a copy.
pub type NsName = (Arc<str>, Arc<str>);

/// A Service port, as the desired state reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PortInfo {
    /// `""` when unnamed.
    name: Arc<str>,
    proto: Proto,
    port: u16,
    node_port: Option<u16>,
    /// A named target port (looked up among the slices' ports); `None`: a number.
    target_name: Option<Arc<str>>,
}

/// What of a Service decides its frontends, read once from the validated object: addresses
/// parsed, defaults applied, everything else (metadata, selector, status conditions, the
/// strings as written) dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Cluster IPs; empty for a Service that programs nothing (headless, ExternalName).
    cluster_ips: Box<[IpAddr]>,
    external_ips: Box<[IpAddr]>,
    lb_ingress_ips: Box<[IpAddr]>,
    ports: Box<[PortInfo]>,
    affinity_timeout_secs: Option<u32>,
    internal_local: bool,
    external_local: bool,
}

/// An EndpointSlice port.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SlicePort {
    /// `""` when unnamed.
    name: Arc<str>,
    /// `None`: absent or not a port number (matches, contributes nothing).
    port: Option<u16>,
    /// `None`: a protocol no Service port has (SCTP).
    proto: Option<Proto>,
}

/// An endpoint with an address: its first one (as kube-proxy), its conditions and node.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EndpointInfo {
    ip: IpAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    node: Option<Arc<str>>,
}

/// What of an EndpointSlice the desired state reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceInfo {
    /// The Service it belongs to.
    service: Option<NsName>,
    /// Address family: `Some(true)` IPv6, `Some(false)` IPv4, `None` FQDN (ignored).
    v6: Option<bool>,
    ports: Box<[SlicePort]>,
    /// Endpoints that have an address.
    endpoints: Box<[EndpointInfo]>,
}

/// Strings that repeat across objects (namespaces, Service names in slices' labels, port and
/// node names) are kept once. Entries nobody else points at any more are swept when the set
/// has doubled since the last sweep, so churn (slices with generated names, nodes coming and
/// going) does not accumulate.
#[derive(Debug, Clone, Default)]
struct Strings {
    set: HashSet<Arc<str>>,
    swept_at: usize,
}

impl Strings {
    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.set.get(s) {
            return a.clone();
        }
        if self.set.len() >= 2 * self.swept_at.max(512) {
            self.set.retain(|a| Arc::strong_count(a) > 1);
            self.swept_at = self.set.len();
        }
        let a: Arc<str> = Arc::from(s);
        self.set.insert(a.clone());
        a
    }

    fn ns_name(&mut self, ns: &str, name: &str) -> NsName {
        (self.get(ns), self.get(name))
    }

    fn service_info(&mut self, svc: &Service) -> ServiceInfo {
        let ports = if svc.has_frontends() {
            svc.spec
                .ports
                .iter()
                .map(|sp| PortInfo {
                    name: self.get(sp.name()),
                    proto: sp.proto(),
                    port: sp.port(),
                    node_port: sp.node_port(),
                    target_name: match sp.target() {
                        TargetPort::Name(n) => Some(self.get(&n)),
                        TargetPort::Number(_) => None,
                    },
                })
                .collect()
        } else {
            Box::default()
        };
        ServiceInfo {
            cluster_ips: svc.cluster_ips().into(),
            external_ips: svc.external_ips().into(),
            lb_ingress_ips: svc.lb_ingress_ips().into(),
            ports,
            affinity_timeout_secs: svc.affinity_timeout_secs(),
            internal_local: svc.internal_local(),
            external_local: svc.external_local(),
        }
    }

    fn slice_info(&mut self, slice: &EndpointSlice) -> SliceInfo {
        let service = slice.service().map(|(ns, name)| self.ns_name(&ns, &name));
        let ports = slice
            .ports
            .iter()
            .map(|p| SlicePort {
                name: self.get(p.name.as_deref().unwrap_or_default()),
                port: p.port.and_then(|n| u16::try_from(n).ok()),
                proto: match p.protocol.unwrap_or_default() {
                    Protocol::TCP => Some(Proto::Tcp),
                    Protocol::UDP => Some(Proto::Udp),
                    Protocol::SCTP => None,
                },
            })
            .collect();
        let endpoints = slice
            .endpoints
            .iter()
            .filter_map(|e| {
                Some(EndpointInfo {
                    ip: e.address()?,
                    ready: e.ready(),
                    serving: e.serving(),
                    terminating: e.terminating(),
                    node: e.node_name.as_deref().map(|n| self.get(n)),
                })
            })
            .collect();
        SliceInfo {
            service,
            v6: match slice.address_type {
                AddressType::IPv4 => Some(false),
                AddressType::IPv6 => Some(true),
                AddressType::FQDN => None,
            },
            ports,
            endpoints,
        }
    }
}

/// Every Service and EndpointSlice, keyed by (namespace, name), with slices indexed by the
/// Service they belong to (so one Service's endpoints are found without a scan).
///
/// It keeps what the desired state reads ([`ServiceInfo`], [`SliceInfo`]), not the objects:
/// at 10k Services × 10 endpoints the objects as parsed take ~3 KiB a Service, what is kept
/// here a fraction of it, and an agent keeps this for as long as it runs.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    services: BTreeMap<NsName, ServiceInfo>,
    slices: BTreeMap<NsName, SliceInfo>,
    /// Each Service's slices, sorted (usually one).
    by_service: BTreeMap<NsName, Vec<NsName>>,
    strings: Strings,
}

impl PartialEq for Snapshot {
    fn eq(&self, other: &Self) -> bool {
        self.services == other.services
            && self.slices == other.slices
            && self.by_service == other.by_service
    }
}

impl Snapshot {
    /// Rebuilds the maps with full nodes (after a listing, which inserts in key order).
    fn compact(&mut self) {
        dense(&mut self.services);
        dense(&mut self.slices);
        dense(&mut self.by_service);
    }

    /// A snapshot of `objects` (later ones replace earlier ones with the same key).
    pub fn from_objects(objects: impl IntoIterator<Item = Object>) -> Self {
        let mut s = Snapshot::default();
        for o in objects {
            s.put(o);
        }
        s
    }

    /// Services, by (namespace, name).
    pub fn services(&self) -> &BTreeMap<NsName, ServiceInfo> {
        &self.services
    }

    /// Number of EndpointSlices.
    pub fn slice_count(&self) -> usize {
        self.slices.len()
    }

    /// The slices of a service.
    fn slices_of<'a>(&'a self, svc: &NsName) -> impl Iterator<Item = &'a SliceInfo> + 'a {
        self.by_service
            .get(svc)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k))
    }

    /// Adds or replaces an object; returns the Services whose frontends may change.
    pub fn put(&mut self, o: Object) -> Vec<NsName> {
        match o {
            Object::Service(svc) => {
                let (ns, name) = svc.key();
                let key = self.strings.ns_name(&ns, &name);
                let info = self.strings.service_info(&svc);
                self.services.insert(key.clone(), info);
                vec![key]
            }
            Object::EndpointSlice(slice) => {
                let (ns, name) = slice.key();
                let key = self.strings.ns_name(&ns, &name);
                let info = self.strings.slice_info(&slice);
                let mut touched = self.remove_slice(&key);
                if let Some(svc) = &info.service {
                    insert_sorted(self.by_service.entry(svc.clone()).or_default(), &key);
                    touched.push(svc.clone());
                }
                self.slices.insert(key, info);
                touched
            }
        }
    }

    /// Removes an object; returns the Services whose frontends may change.
    pub fn remove(&mut self, key: &ObjectKey) -> Vec<NsName> {
        let k = self.strings.ns_name(&key.namespace, &key.name);
        match key.kind {
            Kind::Service => {
                self.services.remove(&k);
                vec![k]
            }
            Kind::EndpointSlice => self.remove_slice(&k),
        }
    }

    fn remove_slice(&mut self, key: &NsName) -> Vec<NsName> {
        let Some(old) = self.slices.remove(key) else {
            return Vec::new();
        };
        let Some(svc) = old.service else {
            return Vec::new();
        };
        if let Some(set) = self.by_service.get_mut(&svc) {
            set.retain(|k| k != key);
            if set.is_empty() {
                self.by_service.remove(&svc);
            }
        }
        vec![svc]
    }
}

/// Rebuilds `map` with full nodes. Inserting keys in ascending order (a listing, a full
/// recompute) leaves every node but the last one just over half full, because a full node
/// splits in the middle; a map built from a sorted sequence fills its nodes. At 10k Services
/// the maps of the snapshot and of the desired state hold 1-2 MiB less.
fn dense<K: Ord, V>(map: &mut BTreeMap<K, V>) {
    *map = std::mem::take(map).into_iter().collect();
}

/// Inserts `key` into the sorted `set` unless present. Such sets usually hold one or two names:
/// they grow one at a time up to four, where a `Vec` would reserve room for four at once.
fn insert_sorted(set: &mut Vec<NsName>, key: &NsName) {
    if let Err(at) = set.binary_search(key) {
        if set.len() == set.capacity() && set.len() < 4 {
            set.reserve_exact(1);
        }
        set.insert(at, key.clone());
    }
}

/// Two services wanted one frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The frontend.
    pub frontend: FrontendKey,
    /// Who has it (`ns/name:port`).
    pub kept: String,
    /// Who was refused it.
    pub refused: String,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} wants {}, already used by {}",
            self.refused, self.frontend, self.kept
        )
    }
}

/// The desired state, ids not yet assigned (all 0) until [`IdAllocator::assign`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    /// One entry per frontend, sorted by frontend key.
    pub services: Vec<LbService>,
    /// Frontends claimed twice, sorted by frontend key.
    pub conflicts: Vec<Conflict>,
    /// Frontends asked for and refused, sorted.
    pub refused: Vec<Refused>,
}

/// An endpoint address and port, with what decides its eligibility.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "mirrors the EndpointSlice conditions one to one"
)]
struct Ep {
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
}

/// The endpoint port a slice gives a Service port: by the Service port's name, else by a named
/// target port; `None` when the slice has no such port.
fn slice_port(slice: &SliceInfo, sp: &PortInfo) -> Option<u16> {
    let by_name = |name: &str| {
        slice
            .ports
            .iter()
            .find(|p| &*p.name == name && p.proto == Some(sp.proto))
            .and_then(|p| p.port)
    };
    by_name(&sp.name).or_else(|| sp.target_name.as_deref().and_then(by_name))
}

/// Endpoints of one family for one Service port, deduplicated by address and port.
fn endpoints(
    snap: &Snapshot,
    key: &NsName,
    sp: &PortInfo,
    v6: bool,
    node: &NodeIdentity,
) -> BTreeMap<(IpAddr, u16), Ep> {
    let mut out: BTreeMap<(IpAddr, u16), Ep> = BTreeMap::new();
    for slice in snap.slices_of(key).filter(|s| s.v6 == Some(v6)) {
        let Some(port) = slice_port(slice, sp) else {
            continue;
        };
        for e in &slice.endpoints {
            let ep = Ep {
                ready: e.ready,
                serving: e.serving,
                terminating: e.terminating,
                local: node.hosts(e.ip, e.node.as_deref()),
            };
            out.entry((e.ip, port))
                .and_modify(|old| {
                    if ep.ready && !old.ready {
                        *old = ep;
                    }
                })
                .or_insert(ep);
        }
    }
    out
}

fn backends(eps: &BTreeMap<(IpAddr, u16), Ep>, pick: impl Fn(&Ep) -> bool) -> Vec<Backend> {
    eps.iter()
        .filter(|(_, e)| pick(e))
        .map(|(&(ip, port), e)| Backend {
            ip,
            port,
            node_local: e.local,
            state: if e.ready {
                BackendState::Ready
            } else {
                BackendState::ServingTerminating
            },
        })
        .collect()
}

/// kube-proxy's categorisation: (cluster backends, local backends).
fn categorize(eps: &BTreeMap<(IpAddr, u16), Ep>) -> (Vec<Backend>, Vec<Backend>) {
    let mut cluster = backends(eps, |e| e.ready);
    if cluster.is_empty() {
        cluster = backends(eps, |e| e.serving && e.terminating);
    }
    let mut local = backends(eps, |e| e.ready && e.local);
    if local.is_empty() {
        local = backends(eps, |e| e.serving && e.terminating && e.local);
    }
    (cluster, local)
}

/// The frontends (ids 0) one Service gets, before conflicts between Services are resolved, and
/// the ones it asks for and does not get ([`refusal`]).
pub fn service_frontends(
    snap: &Snapshot,
    key: &NsName,
    svc: &ServiceInfo,
    node: &NodeIdentity,
) -> (Vec<LbService>, Vec<Refused>) {
    let mut out = Vec::new();
    let mut refused = Vec::new();
    let node_v4 = node.addresses.is_empty() || node.addresses.iter().any(IpAddr::is_ipv4);
    let node_v6 = node.addresses.is_empty() || node.addresses.iter().any(IpAddr::is_ipv6);
    let families: BTreeSet<bool> = svc.cluster_ips.iter().map(IpAddr::is_ipv6).collect();
    for sp in &svc.ports {
        let name = if sp.name.is_empty() {
            format!("{}/{}", key.0, key.1)
        } else {
            format!("{}/{}:{}", key.0, key.1, sp.name)
        };
        for &v6 in &families {
            let eps = endpoints(snap, key, sp, v6, node);
            let (cluster, local) = categorize(&eps);
            let mut frontends: Vec<Frontend> = Vec::new();
            let fe = |ip: IpAddr, port: u16, kind: FrontendKind| Frontend {
                ip,
                port,
                proto: sp.proto,
                kind,
            };
            for ip in svc.cluster_ips.iter().filter(|ip| ip.is_ipv6() == v6) {
                frontends.push(fe(*ip, sp.port, FrontendKind::ClusterIp));
            }
            if let Some(np) = sp.node_port
                && ((v6 && node_v6) || (!v6 && node_v4))
            {
                frontends.push(fe(Frontend::any_addr(v6), np, FrontendKind::NodePort));
            }
            for ip in svc.external_ips.iter().filter(|ip| ip.is_ipv6() == v6) {
                frontends.push(fe(*ip, sp.port, FrontendKind::ExternalIp));
            }
            for ip in svc.lb_ingress_ips.iter().filter(|ip| ip.is_ipv6() == v6) {
                frontends.push(fe(*ip, sp.port, FrontendKind::LoadBalancer));
            }
            for frontend in frontends {
                if let Some(reason) = refusal(node, key, &frontend) {
                    refused.push(Refused {
                        frontend,
                        service: name.clone(),
                        reason,
                    });
                    continue;
                }
                let internal = frontend.kind == FrontendKind::ClusterIp;
                let (internal_local, external_local) = if internal {
                    (svc.internal_local, false)
                } else {
                    (false, svc.external_local)
                };
                let chosen = if internal_local || external_local {
                    local.clone()
                } else {
                    cluster.clone()
                };
                out.push(LbService {
                    id: 0,
                    name: name.clone(),
                    frontend,
                    backends: chosen,
                    affinity_timeout_secs: svc.affinity_timeout_secs,
                    external_local,
                    internal_local,
                });
            }
        }
    }
    (out, refused)
}

/// Computes the desired frontends (ids 0) for every Service: the first Service by
/// (namespace, name) claiming a frontend keeps it. Sorted by frontend key.
pub fn desired(snap: &Snapshot, node: &NodeIdentity) -> Desired {
    let mut out: BTreeMap<FrontendKey, LbService> = BTreeMap::new();
    let mut conflicts = Vec::new();
    let mut refused = Vec::new();
    for (key, svc) in &snap.services {
        let (frontends, r) = service_frontends(snap, key, svc, node);
        refused.extend(r);
        for lb in frontends {
            let k = lb.frontend.key();
            match out.get(&k) {
                Some(kept) => conflicts.push(Conflict {
                    frontend: k,
                    kept: kept.name.clone(),
                    refused: lb.name.clone(),
                }),
                None => {
                    out.insert(k, lb);
                }
            }
        }
    }
    conflicts.sort_by(|a, b| (a.frontend, &a.refused).cmp(&(b.frontend, &b.refused)));
    refused.sort();
    Desired {
        services: out.into_values().collect(),
        conflicts,
        refused,
    }
}

/// Stable ids per frontend: see the module notes.
#[derive(Debug, Clone)]
pub struct IdAllocator {
    by_key: BTreeMap<FrontendKey, u32>,
    used: BTreeSet<u32>,
    /// Freed, not reusable until [`IdAllocator::commit`] (the dataplane may still hold them).
    pending: Vec<u32>,
    /// No id below this is free.
    hint: u32,
}

impl Default for IdAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl IdAllocator {
    /// An empty allocator.
    pub fn new() -> Self {
        IdAllocator {
            by_key: BTreeMap::new(),
            used: BTreeSet::new(),
            pending: Vec::new(),
            hint: 1,
        }
    }

    /// Adopts the ids a dataplane reports (after a restart or a failed apply): each frontend
    /// keeps the id the dataplane has for it, unless another frontend already holds that id here
    /// (a corrupt read-back), in which case it keeps or gets another one.
    pub fn seed(&mut self, observed: &[LbService]) {
        for s in observed {
            let key = s.frontend.key();
            if s.id == 0 || self.by_key.get(&key) == Some(&s.id) || self.used.contains(&s.id) {
                continue;
            }
            if let Some(old) = self.by_key.insert(key, s.id) {
                self.pending.push(old);
            }
            self.used.insert(s.id);
        }
    }

    /// The id of a frontend, if it has one.
    pub fn get(&self, key: &FrontendKey) -> Option<u32> {
        self.by_key.get(key).copied()
    }

    /// The id of a frontend, allocating the lowest free one if it has none.
    pub fn id_for(&mut self, key: FrontendKey) -> u32 {
        if let Some(&id) = self.by_key.get(&key) {
            return id;
        }
        let mut id = self.hint.max(1);
        while self.used.contains(&id) {
            id += 1;
        }
        self.hint = id + 1;
        self.by_key.insert(key, id);
        self.used.insert(id);
        id
    }

    /// Frees a frontend's id; it becomes reusable after the next [`IdAllocator::commit`].
    pub fn free(&mut self, key: &FrontendKey) {
        if let Some(id) = self.by_key.remove(key) {
            self.pending.push(id);
        }
    }

    /// Makes freed ids reusable: call once the dataplane no longer holds them (after a
    /// successful apply of the plan that deleted their frontends).
    pub fn commit(&mut self) {
        for id in std::mem::take(&mut self.pending) {
            if !self.by_key.values().any(|v| *v == id) {
                self.used.remove(&id);
                self.hint = self.hint.min(id);
            }
        }
    }

    /// Sets the id of every service (keeping existing ones) and frees the ids of frontends not
    /// in `services` (reusable after [`IdAllocator::commit`]).
    pub fn assign(&mut self, services: &mut [LbService]) {
        let keep: BTreeSet<FrontendKey> = services.iter().map(|s| s.frontend.key()).collect();
        let gone: Vec<FrontendKey> = self
            .by_key
            .keys()
            .filter(|k| !keep.contains(*k))
            .copied()
            .collect();
        for s in services.iter_mut() {
            s.id = self.id_for(s.frontend.key());
        }
        for k in gone {
            self.free(&k);
        }
    }
}

/// [`desired`] with ids assigned by `ids`.
pub fn build(snap: &Snapshot, node: &NodeIdentity, ids: &mut IdAllocator) -> Desired {
    let mut d = desired(snap, node);
    ids.assign(&mut d.services);
    d
}

/// The incremental form of [`build`]: keeps the objects, each Service's candidate frontends,
/// who claims which frontend and the ids, so a change recomputes only the Services it touches
/// (one endpoint change costs one Service's backends, not 10k). Same result as [`build`]
/// at every step (checked by a property test): the first claimant by (namespace, name) owns a
/// frontend.
///
/// Each candidate is kept once, behind an [`Arc`], with its id set: [`LbState::get_shared`]
/// and [`LbState::desired_shared`] hand out pointers, so the service loop's record of what it
/// applied shares them instead of holding a second copy of every frontend.
#[derive(Debug, Clone)]
pub struct LbState {
    node: NodeIdentity,
    snap: Snapshot,
    /// Each Service's candidate frontends, sorted by frontend key.
    per_service: BTreeMap<NsName, Box<[Arc<LbService>]>>,
    /// Who claims each frontend, sorted by (namespace, name): the first owns it. Almost always
    /// one.
    claims: BTreeMap<FrontendKey, Vec<NsName>>,
    /// The frontends each Service asks for and does not get (almost always none).
    refused: BTreeMap<NsName, Box<[Refused]>>,
    ids: IdAllocator,
}

/// The candidate for `key` among one Service's sorted frontends.
fn find<'a>(list: &'a [Arc<LbService>], key: &FrontendKey) -> Option<&'a Arc<LbService>> {
    list.binary_search_by_key(key, |s| s.frontend.key())
        .ok()
        .map(|i| &list[i])
}

impl LbState {
    /// Empty state for this node.
    pub fn new(node: NodeIdentity) -> Self {
        LbState {
            node,
            snap: Snapshot::default(),
            per_service: BTreeMap::new(),
            claims: BTreeMap::new(),
            refused: BTreeMap::new(),
            ids: IdAllocator::new(),
        }
    }

    /// The node this state is computed for.
    pub fn node(&self) -> &NodeIdentity {
        &self.node
    }

    /// Replaces the node's identity (its own addresses changed); recomputes every Service if it
    /// differs and returns the frontends that may have changed.
    pub fn set_node(&mut self, node: NodeIdentity) -> BTreeSet<FrontendKey> {
        if node == self.node {
            return BTreeSet::new();
        }
        self.node = node;
        let all: BTreeSet<NsName> = self.snap.services.keys().cloned().collect();
        self.recompute(all)
    }

    /// Every frontend asked for and refused, by Service.
    pub fn refused(&self) -> impl Iterator<Item = &Refused> {
        self.refused.values().flat_map(|r| r.iter())
    }

    /// The objects.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snap
    }

    /// The id allocator (seed it from the dataplane's read-back; commit after applies).
    pub fn ids_mut(&mut self) -> &mut IdAllocator {
        &mut self.ids
    }

    /// Replaces every object (after a re-list); returns the frontends that may have changed.
    pub fn reset(&mut self, objects: Vec<Object>) -> BTreeSet<FrontendKey> {
        self.replace(Snapshot::from_objects(objects))
    }

    /// Replaces every object with `snap` (a listing built page by page); returns the frontends
    /// that may have changed.
    pub fn replace(&mut self, mut snap: Snapshot) -> BTreeSet<FrontendKey> {
        let mut touched: BTreeSet<NsName> = self.snap.services.keys().cloned().collect();
        snap.compact();
        self.snap = snap;
        touched.extend(self.snap.services.keys().cloned());
        let dirty = self.recompute(touched);
        // Every service was just recomputed, in key order: the maps are as sparse as they get.
        dense(&mut self.per_service);
        dense(&mut self.claims);
        dirty
    }

    /// Applies changes; returns the frontends that may have changed.
    pub fn change(&mut self, changes: Vec<Change>) -> BTreeSet<FrontendKey> {
        let mut touched = BTreeSet::new();
        for c in changes {
            match c {
                Change::Put(o) => touched.extend(self.snap.put(o)),
                Change::Delete(k) => touched.extend(self.snap.remove(&k)),
            }
        }
        self.recompute(touched)
    }

    fn recompute(&mut self, services: BTreeSet<NsName>) -> BTreeSet<FrontendKey> {
        let mut dirty = BTreeSet::new();
        for key in services {
            let (frontends, refused) = match self.snap.services.get(&key) {
                Some(svc) => service_frontends(&self.snap, &key, svc, &self.node),
                None => (Vec::new(), Vec::new()),
            };
            if refused.is_empty() {
                self.refused.remove(&key);
            } else {
                self.refused.insert(key.clone(), refused.into());
            }
            let new: Box<[Arc<LbService>]> = frontends
                .into_iter()
                .map(|s| (s.frontend.key(), s))
                .collect::<BTreeMap<_, _>>()
                .into_values()
                .map(Arc::new)
                .collect();
            let old = self.per_service.remove(&key).unwrap_or_default();
            for s in &old {
                let k = s.frontend.key();
                if find(&new, &k).is_none()
                    && let Some(set) = self.claims.get_mut(&k)
                {
                    set.retain(|o| *o != key);
                    if set.is_empty() {
                        self.claims.remove(&k);
                    }
                }
                dirty.insert(k);
            }
            for s in &new {
                let k = s.frontend.key();
                insert_sorted(self.claims.entry(k).or_default(), &key);
                dirty.insert(k);
            }
            if !new.is_empty() {
                self.per_service.insert(key, new);
            }
        }
        for k in &dirty {
            if self.claims.contains_key(k) {
                let id = self.ids.id_for(*k);
                self.set_id(k, id);
            } else {
                self.ids.free(k);
            }
        }
        dirty
    }

    /// Writes `id` into every candidate for `key`.
    fn set_id(&mut self, key: &FrontendKey, id: u32) {
        let Some(owners) = self.claims.get(key) else {
            return;
        };
        for owner in owners {
            if let Some(list) = self.per_service.get_mut(owner)
                && let Ok(i) = list.binary_search_by_key(key, |s| s.frontend.key())
                && list[i].id != id
            {
                Arc::make_mut(&mut list[i]).id = id;
            }
        }
    }

    /// Adopts the ids a dataplane reports ([`IdAllocator::seed`]) and writes them into the
    /// candidates.
    pub fn seed(&mut self, observed: &[LbService]) {
        self.ids.seed(observed);
        for s in observed {
            let k = s.frontend.key();
            if let Some(id) = self.ids.get(&k) {
                self.set_id(&k, id);
            }
        }
    }

    /// The desired service for a frontend, with its id, shared.
    pub fn get_shared(&self, key: &FrontendKey) -> Option<Arc<LbService>> {
        let owner = self.claims.get(key)?.first()?;
        let s = find(self.per_service.get(owner)?, key)?;
        let id = self.ids.get(key)?;
        if s.id == id {
            Some(s.clone())
        } else {
            // Only if the allocator was seeded behind this state's back (`ids_mut`).
            let mut copy = LbService::clone(s);
            copy.id = id;
            Some(Arc::new(copy))
        }
    }

    /// The desired service for a frontend, with its id.
    pub fn get(&self, key: &FrontendKey) -> Option<LbService> {
        self.get_shared(key).map(Arc::unwrap_or_clone)
    }

    /// Every desired service, sorted by frontend key, shared.
    pub fn desired_shared(&self) -> Vec<Arc<LbService>> {
        self.claims
            .keys()
            .filter_map(|k| self.get_shared(k))
            .collect()
    }

    /// Every desired service, sorted by frontend key.
    pub fn desired(&self) -> Vec<LbService> {
        self.claims.keys().filter_map(|k| self.get(k)).collect()
    }

    /// Number of desired frontends.
    pub fn len(&self) -> usize {
        self.claims.len()
    }

    /// No desired frontend.
    pub fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }

    /// Frontends claimed by more than one Service.
    pub fn conflicts(&self) -> Vec<Conflict> {
        let mut out = Vec::new();
        for (k, owners) in &self.claims {
            let mut it = owners.iter();
            let Some(first) = it.next() else { continue };
            let name = |o: &NsName| {
                self.per_service
                    .get(o)
                    .and_then(|m| find(m, k))
                    .map_or_else(|| format!("{}/{}", o.0, o.1), |s| s.name.clone())
            };
            for other in it {
                out.push(Conflict {
                    frontend: *k,
                    kept: name(first),
                    refused: name(other),
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::lb::{Proto, plan};
    use crate::services::model::parse_manifest;

    fn snap(yaml: &str) -> Snapshot {
        Snapshot::from_objects(parse_manifest(yaml).unwrap())
    }

    fn node() -> NodeIdentity {
        NodeIdentity {
            name: "node-1".into(),
            addresses: vec!["198.18.0.11".parse().unwrap()],
            ..NodeIdentity::default()
        }
    }

    fn show(services: &[LbService]) -> Vec<String> {
        services
            .iter()
            .map(|s| {
                let b: Vec<String> = s
                    .backends
                    .iter()
                    .map(|b| {
                        format!(
                            "{}:{}{}{}",
                            b.ip,
                            b.port,
                            if b.node_local { "L" } else { "" },
                            if b.state == BackendState::Ready {
                                ""
                            } else {
                                "T"
                            }
                        )
                    })
                    .collect();
                format!("{} {} [{}]", s.name, s.frontend, b.join(" "))
            })
            .collect()
    }

    const WEB: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalIPs: [192.0.2.10, 2001:db8::10]
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP, targetPort: dns}
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.10}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-a
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints:
- {addresses: [10.244.1.5], nodeName: node-1}
- {addresses: [10.244.2.5], nodeName: node-2, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.244.2.6], nodeName: node-2}
- {addresses: [10.244.2.7], nodeName: node-2, conditions: {ready: false, serving: false}}
ports:
- {name: http, port: 8080}
- {name: dns, port: 5353, protocol: UDP}
";

    #[test]
    fn frontends_and_backends_follow_kube_proxy() {
        let d = desired(&snap(WEB), &node());
        assert!(d.conflicts.is_empty());
        assert_eq!(
            show(&d.services),
            vec![
                "shop/web:http NodePort 0.0.0.0:30080/TCP [10.244.1.5:8080L 10.244.2.6:8080]",
                "shop/web:dns ClusterIP 10.96.0.10:53/UDP [10.244.1.5:5353L 10.244.2.6:5353]",
                "shop/web:http ClusterIP 10.96.0.10:80/TCP [10.244.1.5:8080L 10.244.2.6:8080]",
                "shop/web:dns ExternalIP 192.0.2.10:53/UDP [10.244.1.5:5353L 10.244.2.6:5353]",
                "shop/web:http ExternalIP 192.0.2.10:80/TCP [10.244.1.5:8080L 10.244.2.6:8080]",
                "shop/web:dns LoadBalancer 203.0.113.10:53/UDP [10.244.1.5:5353L 10.244.2.6:5353]",
                "shop/web:http LoadBalancer 203.0.113.10:80/TCP [10.244.1.5:8080L 10.244.2.6:8080]",
            ]
        );
        // The v6 external IP is ignored: the service has no IPv6 cluster IP.
        for s in &d.services {
            assert_eq!(s.affinity_timeout_secs, None);
        }
    }

    #[test]
    fn terminating_endpoints_only_when_no_ready_one() {
        let y = WEB
            .replace("- {addresses: [10.244.1.5], nodeName: node-1}\n", "")
            .replace("- {addresses: [10.244.2.6], nodeName: node-2}\n", "");
        let d = desired(&snap(&y), &node());
        assert_eq!(
            show(&d.services[2..3]),
            vec!["shop/web:http ClusterIP 10.96.0.10:80/TCP [10.244.2.5:8080T]"]
        );
        assert_eq!(
            d.services[2].backends[0].state,
            BackendState::ServingTerminating
        );
        // Nothing serving at all: no backends, no table.
        let y = y.replace("serving: true, ", "");
        let y = y.replace(
            "ready: false, terminating: true",
            "ready: false, serving: false, terminating: true",
        );
        let d = desired(&snap(&y), &node());
        assert!(d.services.iter().all(|s| s.backends.is_empty()));
    }

    #[test]
    fn endpoints_in_the_node_pod_subnet_are_local_without_node_name() {
        // Standalone EndpointSlices often name no node.
        let y = WEB
            .replace(", nodeName: node-1}", "}")
            .replace(", nodeName: node-2", "");
        let bare = NodeIdentity {
            pod_subnets: vec!["10.244.1.0/24".parse().unwrap()],
            ..node()
        };
        let d = desired(&snap(&y), &bare);
        assert_eq!(
            show(&d.services[..1]),
            vec!["shop/web:http NodePort 0.0.0.0:30080/TCP [10.244.1.5:8080L 10.244.2.6:8080]"]
        );
        // Without the subnet nothing is local; `nodeName` alone still counts.
        let d = desired(&snap(&y), &node());
        assert!(
            d.services
                .iter()
                .flat_map(|s| &s.backends)
                .all(|b| !b.node_local)
        );
        let d = desired(&snap(WEB), &bare);
        assert_eq!(
            show(&d.services[..1]),
            vec!["shop/web:http NodePort 0.0.0.0:30080/TCP [10.244.1.5:8080L 10.244.2.6:8080]"]
        );
        // And `externalTrafficPolicy: Local` finds the endpoint by its subnet.
        let y = y.replace(
            "  type: LoadBalancer\n",
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n",
        );
        let d = desired(&snap(&y), &bare);
        let np = d
            .services
            .iter()
            .find(|s| s.frontend.kind == FrontendKind::NodePort)
            .unwrap();
        assert_eq!(
            show(std::slice::from_ref(np)),
            vec!["shop/web:http NodePort 0.0.0.0:30080/TCP [10.244.1.5:8080L]"]
        );
    }

    #[test]
    fn traffic_policies_local() {
        let y = WEB.replace(
            "  type: LoadBalancer\n",
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n",
        );
        let d = desired(&snap(&y), &node());
        for s in &d.services {
            assert_eq!(s.backends.len(), 1, "{}", s.frontend);
            assert!(s.backends[0].node_local);
            assert_eq!(s.affinity_timeout_secs, Some(60));
            let cip = s.frontend.kind == FrontendKind::ClusterIp;
            assert_eq!((s.internal_local, s.external_local), (cip, !cip));
        }
        // On another node with only a terminating local endpoint: that one is used.
        let other = NodeIdentity {
            name: "node-2".into(),
            ..NodeIdentity::default()
        };
        let y2 = y.replace("- {addresses: [10.244.2.6], nodeName: node-2}\n", "");
        let d = desired(&snap(&y2), &other);
        assert_eq!(
            show(&d.services[..1]),
            vec!["shop/web:http NodePort 0.0.0.0:30080/TCP [10.244.2.5:8080LT]"]
        );
        // External Local only: ClusterIP keeps cluster-wide backends.
        let y3 = WEB.replace(
            "  type: LoadBalancer\n",
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n",
        );
        let d = desired(&snap(&y3), &node());
        let cip = d
            .services
            .iter()
            .find(|s| s.frontend.kind == FrontendKind::ClusterIp)
            .unwrap();
        assert_eq!(cip.backends.len(), 2);
        let np = d
            .services
            .iter()
            .find(|s| s.frontend.kind == FrontendKind::NodePort)
            .unwrap();
        assert_eq!(np.backends.len(), 1);
    }

    #[test]
    fn named_target_port_and_dual_stack() {
        let y = r"
apiVersion: v1
kind: Service
metadata: {name: ds}
spec:
  type: NodePort
  clusterIPs: [10.96.0.20, fd00::20]
  ports:
  - {port: 80, targetPort: web, nodePort: 30090}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ds-4, labels: {kubernetes.io/service-name: ds}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.9]}]
ports: [{name: web, port: 9000}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ds-6, labels: {kubernetes.io/service-name: ds}}
addressType: IPv6
endpoints: [{addresses: ['fd00:244::9']}, {addresses: ['fd00:244::9']}]
ports: [{port: 9001}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: other, labels: {kubernetes.io/service-name: nope}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.99]}]
ports: [{port: 9000}]
";
        let both = NodeIdentity {
            name: "node-1".into(),
            addresses: vec![
                "198.18.0.11".parse().unwrap(),
                "fd00:18::11".parse().unwrap(),
            ],
            ..NodeIdentity::default()
        };
        let d = desired(&snap(y), &both);
        assert_eq!(
            show(&d.services),
            vec![
                "default/ds NodePort 0.0.0.0:30090/TCP [10.244.1.9:9000]",
                "default/ds ClusterIP 10.96.0.20:80/TCP [10.244.1.9:9000]",
                "default/ds NodePort [::]:30090/TCP [fd00:244::9:9001]",
                "default/ds ClusterIP [fd00::20]:80/TCP [fd00:244::9:9001]",
            ]
        );
        // A v4-only node gets no v6 node port.
        let d = desired(&snap(y), &node());
        assert_eq!(d.services.len(), 3);
    }

    #[test]
    fn conflicts_keep_the_first() {
        let y = r"
apiVersion: v1
kind: Service
metadata: {name: a}
spec: {type: NodePort, clusterIP: 10.96.0.1, ports: [{port: 80, nodePort: 30000}]}
---
apiVersion: v1
kind: Service
metadata: {name: b}
spec: {type: NodePort, clusterIP: 10.96.0.2, ports: [{port: 80, nodePort: 30000}]}
";
        let d = desired(&snap(y), &node());
        assert_eq!(d.services.len(), 3);
        assert_eq!(
            d.conflicts
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            vec!["default/b wants 0.0.0.0:30000/TCP, already used by default/a"]
        );
    }

    #[test]
    fn ids_are_stable_compact_and_survive_restart() {
        let s = snap(WEB);
        let mut ids = IdAllocator::new();
        let d1 = build(&s, &node(), &mut ids);
        let got: BTreeSet<u32> = d1.services.iter().map(|s| s.id).collect();
        assert_eq!(got, (1..=7).collect());
        // Same input: same ids, empty plan.
        let d2 = build(&s, &node(), &mut ids);
        assert!(plan(&d2.services, &d1.services).is_empty());
        // Remove the external IP: its ids are freed, only after this build.
        let s2 = snap(&WEB.replace("  externalIPs: [192.0.2.10, 2001:db8::10]\n", ""));
        let d3 = build(&s2, &node(), &mut ids);
        assert_eq!(d3.services.len(), 5);
        for x in &d3.services {
            let before = d1
                .services
                .iter()
                .find(|y| y.frontend == x.frontend)
                .unwrap();
            assert_eq!(x.id, before.id);
        }
        let p = plan(&d3.services, &d2.services);
        assert!(p.upserts.is_empty());
        assert_eq!(p.deletes.len(), 2);
        // Back again before the delete was applied: fresh ids (the dataplane may still hold
        // the old ones).
        let mut uncommitted = ids.clone();
        let early = build(&s, &node(), &mut uncommitted);
        assert_eq!(early.services.iter().map(|s| s.id).max(), Some(9));
        // After the apply: the freed ids are reused (compact).
        ids.commit();
        let d4 = build(&s, &node(), &mut ids);
        let got: BTreeSet<u32> = d4.services.iter().map(|s| s.id).collect();
        assert_eq!(got, (1..=7).collect());
        // A restarted agent seeded from the dataplane derives the same ids.
        let mut fresh = IdAllocator::new();
        fresh.seed(&d4.services);
        let d5 = build(&s, &node(), &mut fresh);
        assert!(plan(&d5.services, &d4.services).is_empty());
        // Even when the services arrive in a different order than the ids were given.
        let mut fresh = IdAllocator::new();
        let mut reversed = d1.services.clone();
        reversed.reverse();
        fresh.seed(&reversed);
        assert!(plan(&build(&s, &node(), &mut fresh).services, &d1.services).is_empty());
    }

    #[test]
    fn seeding_tolerates_duplicate_ids() {
        let d = desired(&snap(WEB), &node());
        let mut obs = d.services.clone();
        for s in &mut obs {
            s.id = 5;
        }
        let mut ids = IdAllocator::new();
        ids.seed(&obs);
        let mut services = d.services.clone();
        ids.assign(&mut services);
        let unique: BTreeSet<u32> = services.iter().map(|s| s.id).collect();
        assert_eq!(unique.len(), services.len());
        assert!(services.iter().any(|s| s.id == 5));
    }

    #[test]
    fn one_endpoint_change_touches_only_its_service() {
        let two = format!(
            "{WEB}---\n{}",
            WEB.replace("name: web", "name: api")
                .replace("web-a", "api-a")
                .replace("service-name: web", "service-name: api")
                .replace("10.96.0.10", "10.96.0.11")
                .replace("192.0.2.10", "192.0.2.11")
                .replace("203.0.113.10", "203.0.113.11")
                .replace("30080", "30081")
        );
        let mut ids = IdAllocator::new();
        let before = build(&snap(&two), &node(), &mut ids);
        let changed = two.replacen("10.244.2.6", "10.244.3.6", 1);
        let after = build(&snap(&changed), &node(), &mut ids);
        let p = plan(&after.services, &before.services);
        assert_eq!(p.upserts.len(), 7);
        assert!(p.upserts.iter().all(|s| s.name.starts_with("shop/web")));
        assert!(p.deletes.is_empty());
        assert_eq!(p.stale_backends.len(), 7);
        assert!(
            p.upserts
                .iter()
                .all(|s| s.frontend.proto == Proto::Tcp || s.backends[1].port == 5353)
        );
    }

    /// Frontends on an address the node depends on, or external IPs outside the allowed
    /// networks, are refused and reported; NodePorts and the API server's own VIP are not.
    #[test]
    fn reserved_addresses_and_unallowed_external_ips_are_refused() {
        let y = r"
apiVersion: v1
kind: Service
metadata: {name: evil}
spec:
  type: LoadBalancer
  clusterIP: 198.18.0.11
  externalIPs: [198.18.0.1, 192.0.2.10, 198.51.100.7]
  ports: [{name: etcd, port: 2379, nodePort: 32379}]
status:
  loadBalancer: {ingress: [{ip: 203.0.113.1}]}
---
apiVersion: v1
kind: Service
metadata: {name: kubernetes, namespace: default}
spec:
  clusterIP: 10.96.0.1
  ports: [{name: https, port: 443}]
---
apiVersion: v1
kind: Service
metadata: {name: fake-api, namespace: default}
spec:
  clusterIP: 10.96.0.2
  externalIPs: [10.96.0.1]
  ports: [{name: https, port: 443}]
";
        let mut node = node();
        node.set_own_addresses([
            "198.18.0.11".parse().unwrap(),
            "203.0.113.1".parse().unwrap(),
        ]);
        node.reserved
            .insert("198.18.0.1".parse().unwrap(), Reserved::Etcd);
        node.reserved
            .insert("10.96.0.1".parse().unwrap(), Reserved::ApiServer);
        node.allowed_external_ips = Some(vec![
            "192.0.2.0/24".parse().unwrap(),
            "10.96.0.0/12".parse().unwrap(),
        ]);
        let d = desired(&snap(y), &node);
        let got: Vec<String> = d
            .services
            .iter()
            .map(|s| format!("{} {}", s.name, s.frontend))
            .collect();
        assert_eq!(
            got,
            vec![
                "default/evil:etcd NodePort 0.0.0.0:32379/TCP",
                "default/kubernetes:https ClusterIP 10.96.0.1:443/TCP",
                "default/fake-api:https ClusterIP 10.96.0.2:443/TCP",
                "default/evil:etcd ExternalIP 192.0.2.10:2379/TCP",
            ]
        );
        let refused: Vec<String> = d.refused.iter().map(ToString::to_string).collect();
        assert_eq!(
            refused,
            vec![
                "default/fake-api:https ExternalIP 10.96.0.1:443/TCP: 10.96.0.1 is the Kubernetes API server's address",
                "default/evil:etcd ExternalIP 198.18.0.1:2379/TCP: 198.18.0.1 is an etcd endpoint's address (--etcd-endpoints)",
                "default/evil:etcd ClusterIP 198.18.0.11:2379/TCP: 198.18.0.11 is an address of this node",
                "default/evil:etcd ExternalIP 198.51.100.7:2379/TCP: 198.51.100.7 is not inside --allowed-external-ips (external IPs are programmed only there)",
                "default/evil:etcd LoadBalancer 203.0.113.1:2379/TCP: 203.0.113.1 is an address of this node",
            ]
        );
        // No list of allowed networks: every external IP (a cluster's default); none: none.
        node.allowed_external_ips = None;
        assert_eq!(desired(&snap(y), &node).refused.len(), 4);
        node.allowed_external_ips = Some(Vec::new());
        assert_eq!(desired(&snap(y), &node).refused.len(), 6);
        // Incrementally: the node's addresses change and the refusals follow.
        let mut state = LbState::new(node.clone());
        state.reset(parse_manifest(y).unwrap());
        assert_eq!(state.refused().count(), 6);
        let mut moved = node.clone();
        moved.set_own_addresses(["198.18.0.12".parse().unwrap()]);
        assert_eq!(
            moved.reserved.get(&"198.18.0.1".parse().unwrap()),
            Some(&Reserved::Etcd)
        );
        let dirty = state.set_node(moved.clone());
        assert!(dirty.iter().any(|k| k.ip.to_string() == "198.18.0.11"));
        assert_eq!(state.refused().count(), 4);
        assert!(
            state.set_node(moved).is_empty(),
            "same node: nothing recomputed"
        );
        assert!(
            state
                .desired()
                .iter()
                .any(|s| s.frontend.ip.to_string() == "198.18.0.11")
        );
    }

    /// The incremental state equals the batch computation after every step of random changes
    /// (services appearing, disappearing, clashing; slices moving between services).
    #[test]
    fn property_incremental_equals_batch() {
        let mut seed = 0x1234_5678_u64;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let svc = |i: u64, ip: u64, np: u64, ext: u64| {
            let ext = match ext {
                0 => "\n  externalIPs: [192.0.2.1]",
                1 => "\n  externalIPs: [198.51.100.1]",
                _ => "",
            };
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.{ip}{ext}\n  ports: [{{port: 80, nodePort: {}}}]\n",
                30000 + np
            )
        };
        let slice = |i: u64, owner: u64, ep: u64, local: bool| {
            let node = if local { "node-1" } else { "node-2" };
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: e{i}, labels: {{kubernetes.io/service-name: s{owner}}}}}\naddressType: IPv4\nendpoints: [{{addresses: [10.244.0.{ep}], nodeName: {node}}}]\nports: [{{port: 8080}}]\n"
            )
        };
        // 10.96.0.3 is etcd's; external IPs only in 192.0.2.0/24.
        let mut node = node();
        node.reserved
            .insert("10.96.0.3".parse().unwrap(), Reserved::Etcd);
        node.allowed_external_ips = Some(vec!["192.0.2.0/24".parse().unwrap()]);
        let node = || node.clone();
        let mut state = LbState::new(node());
        let mut batch_ids = IdAllocator::new();
        let mut objects: BTreeMap<ObjectKey, Object> = BTreeMap::new();
        for step in 0..400 {
            let mut changes = Vec::new();
            for _ in 0..=rnd(3) {
                let i = rnd(8);
                let text = match rnd(5) {
                    0 | 1 => svc(i, rnd(6) + 1, rnd(4), rnd(6)),
                    2 | 3 => slice(i, rnd(8), rnd(20) + 1, rnd(2) == 0),
                    _ => {
                        let kind = if rnd(2) == 0 {
                            Kind::Service
                        } else {
                            Kind::EndpointSlice
                        };
                        let name = format!("{}{i}", if kind == Kind::Service { "s" } else { "e" });
                        let key = ObjectKey {
                            kind,
                            namespace: "default".into(),
                            name,
                        };
                        objects.remove(&key);
                        changes.push(Change::Delete(key));
                        continue;
                    }
                };
                let o = parse_manifest(&text).unwrap().remove(0);
                objects.insert(o.key(), o.clone());
                changes.push(Change::Put(o));
            }
            if step % 50 == 0 {
                state.reset(objects.values().cloned().collect());
            } else {
                state.change(changes);
            }
            let snap = Snapshot::from_objects(objects.values().cloned());
            let want = desired(&snap, &node());
            let got = state.desired();
            let strip = |v: &[LbService]| {
                v.iter()
                    .map(|s| LbService { id: 0, ..s.clone() })
                    .collect::<Vec<_>>()
            };
            assert_eq!(strip(&got), strip(&want.services), "step {step}");
            assert_eq!(state.conflicts(), want.conflicts, "step {step}");
            let mut refused: Vec<Refused> = state.refused().cloned().collect();
            refused.sort();
            assert_eq!(refused, want.refused, "step {step}");
            // Ids: unique, non-zero.
            let ids: BTreeSet<u32> = got.iter().map(|s| s.id).collect();
            assert_eq!(ids.len(), got.len());
            assert!(!ids.contains(&0));
            state.ids_mut().commit();
            let _ = build(&snap, &node(), &mut batch_ids);
        }
    }
}
