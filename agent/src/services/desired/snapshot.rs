//! The snapshot: every valid Service and EndpointSlice, indexed for the desired-state function
//! (by Service, by frontend), with the strings shared between indexes.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use crate::services::lb::{BackendState, Proto};
use crate::services::model::{
    AddressType, Endpoint, EndpointSlice, Kind, Object, ObjectKey, Protocol, Service, TargetPort,
};

/// (namespace, name) of a Service or an EndpointSlice. The strings are shared (see
/// [`Snapshot`]): every index that names an object holds a pointer, not a copy.
pub type NsName = (Arc<str>, Arc<str>);

/// A Service port, as the desired state reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PortInfo {
    /// `""` when unnamed.
    pub(super) name: Arc<str>,
    pub(super) proto: Proto,
    pub(super) port: u16,
    pub(super) node_port: Option<u16>,
    /// A named target port (looked up among the slices' ports); `None`: a number.
    pub(super) target_name: Option<Arc<str>>,
}

/// What of a Service decides its frontends, read once from the validated object: addresses
/// parsed, defaults applied, everything else (metadata, selector, status conditions, the
/// strings as written) dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Cluster IPs; empty for a Service that programs nothing (headless, ExternalName).
    pub(super) cluster_ips: Box<[IpAddr]>,
    pub(super) external_ips: Box<[IpAddr]>,
    pub(super) lb_ingress_ips: Box<[IpAddr]>,
    pub(super) ports: Box<[PortInfo]>,
    pub(super) affinity_timeout_secs: Option<u32>,
    pub(super) internal_local: bool,
    pub(super) external_local: bool,
}

/// An EndpointSlice port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SlicePort {
    /// `""` when unnamed.
    pub(super) name: Arc<str>,
    /// `None`: absent or not a port number (matches, contributes nothing).
    pub(super) port: Option<u16>,
    /// `None`: a protocol no Service port has (SCTP).
    pub(super) proto: Option<Proto>,
}

/// An endpoint with an address: its first one (as kube-proxy), what its conditions make it
/// and its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct EndpointInfo {
    pub(super) ip: IpAddr,
    /// `Ready` when ready; `ServingTerminating` when serving and terminating but not ready
    /// (used only when no ready endpoint is left); `None`: neither, never a backend.
    pub(super) state: Option<BackendState>,
    pub(super) node: Option<Arc<str>>,
}

/// [`EndpointInfo::state`] from an endpoint's conditions.
fn state_of(e: &Endpoint) -> Option<BackendState> {
    if e.ready() {
        Some(BackendState::Ready)
    } else if e.serving() && e.terminating() {
        Some(BackendState::ServingTerminating)
    } else {
        None
    }
}

/// What of an EndpointSlice the desired state reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceInfo {
    /// The Service it belongs to.
    pub(super) service: Option<NsName>,
    /// Address family: `Some(true)` IPv6, `Some(false)` IPv4, `None` FQDN (ignored).
    pub(super) v6: Option<bool>,
    pub(super) ports: Box<[SlicePort]>,
    /// Endpoints that have an address.
    pub(super) endpoints: Box<[EndpointInfo]>,
}

/// Strings that repeat across objects (namespaces, Service names in slices' labels, port and
/// node names) are kept once. Entries nobody else points at any more are swept when the set
/// has doubled since the last sweep, so churn (slices with generated names, nodes coming and
/// going) does not accumulate.
#[derive(Debug, Clone, Default)]
pub(super) struct Strings {
    pub(super) set: HashSet<Arc<str>>,
    pub(super) swept_at: usize,
}

impl Strings {
    pub(super) fn get(&mut self, s: &str) -> Arc<str> {
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

    pub(super) fn ns_name(&mut self, ns: &str, name: &str) -> NsName {
        (self.get(ns), self.get(name))
    }

    pub(super) fn service_info(&mut self, svc: &Service) -> ServiceInfo {
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

    pub(super) fn slice_info(&mut self, slice: &EndpointSlice) -> SliceInfo {
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
                    state: state_of(e),
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
    pub(super) services: BTreeMap<NsName, ServiceInfo>,
    pub(super) slices: BTreeMap<NsName, SliceInfo>,
    /// Each Service's slices, sorted (usually one).
    pub(super) by_service: BTreeMap<NsName, Vec<NsName>>,
    pub(super) strings: Strings,
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
    pub(super) fn compact(&mut self) {
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
    pub(super) fn slices_of<'a>(
        &'a self,
        svc: &NsName,
    ) -> impl Iterator<Item = &'a SliceInfo> + 'a {
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

    pub(super) fn remove_slice(&mut self, key: &NsName) -> Vec<NsName> {
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
pub(super) fn dense<K: Ord, V>(map: &mut BTreeMap<K, V>) {
    *map = std::mem::take(map).into_iter().collect();
}

/// Inserts `key` into the sorted `set` unless present. Such sets usually hold one or two names:
/// they grow one at a time up to four, where a `Vec` would reserve room for four at once.
pub(super) fn insert_sorted(set: &mut Vec<NsName>, key: &NsName) {
    if let Err(at) = set.binary_search(key) {
        if set.len() == set.capacity() && set.len() < 4 {
            set.reserve_exact(1);
        }
        set.insert(at, key.clone());
    }
}
