//! The desired-state function: a snapshot and this node to frontends with resolved backends
//! (kube-proxy semantics), with the conflicts and refusals it found.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::snapshot::{NsName, PortInfo, ServiceInfo, SliceInfo, Snapshot};
use super::{NodeIdentity, Refused, refusal};
use crate::services::lb::{Backend, BackendState, Frontend, FrontendKey, FrontendKind, LbService};

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
pub(super) struct Ep {
    /// What its conditions make it (see [`super::snapshot::EndpointInfo::state`]).
    pub(super) state: Option<BackendState>,
    /// On this node.
    pub(super) local: bool,
}

/// The endpoint port a slice gives a Service port: by the Service port's name, else by a named
/// target port; `None` when the slice has no such port.
pub(super) fn slice_port(slice: &SliceInfo, sp: &PortInfo) -> Option<u16> {
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
pub(super) fn endpoints(
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
                state: e.state,
                local: node.hosts(e.ip, e.node.as_deref()),
            };
            let ready = |e: &Ep| e.state == Some(BackendState::Ready);
            out.entry((e.ip, port))
                .and_modify(|old| {
                    if ready(&ep) && !ready(old) {
                        *old = ep;
                    }
                })
                .or_insert(ep);
        }
    }
    out
}

/// The endpoints in `state` (only the local ones when `local_only`), as backends.
pub(super) fn backends(
    eps: &BTreeMap<(IpAddr, u16), Ep>,
    state: BackendState,
    local_only: bool,
) -> Vec<Backend> {
    eps.iter()
        .filter(|(_, e)| e.state == Some(state) && (e.local || !local_only))
        .map(|(&(ip, port), e)| Backend {
            ip,
            port,
            node_local: e.local,
            state,
        })
        .collect()
}

/// kube-proxy's categorisation: (cluster backends, local backends), each the ready endpoints
/// or, when there is none, the serving-terminating ones.
pub(super) fn categorize(eps: &BTreeMap<(IpAddr, u16), Ep>) -> (Vec<Backend>, Vec<Backend>) {
    let pick = |local_only| {
        let ready = backends(eps, BackendState::Ready, local_only);
        if ready.is_empty() {
            backends(eps, BackendState::ServingTerminating, local_only)
        } else {
            ready
        }
    };
    (pick(false), pick(true))
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
