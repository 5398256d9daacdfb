//! The load-balancer desired state every service dataplane consumes, its diff, and the seam.
//!
//! Why this shape:
//! - One flat record per **frontend** (address, port, protocol), not per Service: that is what a
//!   dataplane looks up on the packet or socket path (a BPF hash map, an nft verdict map, an
//!   iptables `KUBE-SERVICES` rule). A Service with two ports, a NodePort and an external IP becomes
//!   six frontends, each with its own backend set (the target port may differ per port).
//! - Everything Kubernetes-specific is resolved before this layer: named target ports, the
//!   ready / serving-terminating fallback, traffic policies. A dataplane never re-implements
//!   kube-proxy semantics; it only programs `backends` and the Maglev table.
//! - `id` is stable for a frontend across syncs and across agent restarts, because dataplanes key
//!   pinned maps by it. The desired-state builder allocates ids compactly (lowest free, from 1; 0
//!   is never used so a zeroed map value means "none") and re-seeds its allocator from
//!   [`LbDataplane::observed`] at start-up, so a restarted agent derives the same ids. An id never
//!   changes while its frontend exists.
//! - [`plan`] is a pure, minimal diff keyed by [`FrontendKey`]: unchanged services are not
//!   re-programmed, which is what makes one endpoint change cost one service's entries.
//!   It also lists the backends that disappeared ([`LbPlan::stale_backends`]) so dataplanes can
//!   clear UDP conntrack/socket state pointing at them.
//! - [`LbDataplane::apply`] must be idempotent (upsert replaces, deleting an absent frontend is
//!   fine): after a failed apply the caller re-reads [`LbDataplane::observed`] and plans again.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// Size of every Maglev lookup table (a prime; see [`crate::services::maglev`]).
pub const MAGLEV_M: usize = 1021;

/// Transport protocol of a frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// The IP protocol number (6 or 17), as in an IP header or a BPF map key.
    pub fn ip_proto(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }

    /// The Kubernetes spelling (`TCP`, `UDP`).
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a frontend exists; dataplanes attach it to different hooks (socket LB for `ClusterIp`,
/// tc on the uplink for the others).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FrontendKind {
    /// `spec.clusterIP(s)`.
    ClusterIp,
    /// `spec.ports[].nodePort` on every address of this node.
    NodePort,
    /// `spec.externalIPs`.
    ExternalIp,
    /// `status.loadBalancer.ingress[].ip`.
    LoadBalancer,
}

impl FrontendKind {
    /// Short name for logs and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::ExternalIp => "ExternalIP",
            FrontendKind::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Where clients send traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Frontend {
    /// The virtual address. For `NodePort` it is `0.0.0.0` / `::`, meaning "any address of
    /// this node" (the address family still tells v4 from v6).
    pub ip: IpAddr,
    /// The service port (the node port for `NodePort`).
    pub port: u16,
    /// The protocol.
    pub proto: Proto,
    /// Why it exists.
    pub kind: FrontendKind,
}

impl Frontend {
    /// What a dataplane looks a packet up by; two frontends with one key cannot coexist.
    pub fn key(&self) -> FrontendKey {
        FrontendKey {
            ip: self.ip,
            port: self.port,
            proto: self.proto,
        }
    }

    /// The wildcard address of a NodePort frontend of this family.
    pub fn any_addr(v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        }
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.as_str(), self.key())
    }
}

/// The lookup identity of a frontend: address, port, protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FrontendKey {
    /// Address (unspecified for NodePort).
    pub ip: IpAddr,
    /// Port.
    pub port: u16,
    /// Protocol.
    pub proto: Proto,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.proto),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.proto),
        }
    }
}

/// Endpoint condition that made a backend eligible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BackendState {
    /// `conditions.ready`.
    Ready,
    /// `serving` and `terminating`: only used when no ready backend is left.
    ServingTerminating,
}

/// One endpoint address and target port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Backend {
    /// Endpoint address (same family as the frontend).
    pub ip: IpAddr,
    /// Target port (named ports already resolved).
    pub port: u16,
    /// The endpoint's `nodeName` is this node.
    pub node_local: bool,
    /// Why it is eligible.
    pub state: BackendState,
}

/// Everything a dataplane needs to program one frontend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbService {
    /// Stable per frontend across syncs and restarts (dataplanes key maps by it); never 0.
    pub id: u32,
    /// `ns/name:portname` (`ns/name` for an unnamed port), for metrics and logs.
    pub name: String,
    /// The frontend.
    pub frontend: Frontend,
    /// Eligible backends, sorted by (ip, port): ready ones, or serving-terminating ones only if
    /// no ready one is left; traffic-policy Local already applied. Empty: the service has no
    /// endpoints (dataplanes reject/drop, as kube-proxy does).
    /// A dataplane that balances with Maglev derives the table from this list
    /// ([`crate::services::maglev::table`] over [`MAGLEV_M`] entries): being a pure function of
    /// the backends it is not stored, so equal backends mean an equal table and a service costs
    /// its backends, not 4 KiB of table per copy.
    pub backends: Vec<Backend>,
    /// `sessionAffinity: ClientIP` with its timeout (default 10800 s); `None`: no affinity.
    pub affinity_timeout_secs: Option<u32>,
    /// `externalTrafficPolicy: Local` on a NodePort/ExternalIP/LoadBalancer frontend: keep the
    /// client source address (no SNAT); `backends` already holds only local endpoints.
    pub external_local: bool,
    /// `internalTrafficPolicy: Local` on a ClusterIP frontend: `backends` already holds only
    /// local endpoints.
    pub internal_local: bool,
}

/// A backend that was programmed for a frontend and no longer is; dataplanes clear conntrack
/// and socket state pointing at it (UDP flows otherwise stick to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StaleBackend {
    /// The frontend it served.
    pub frontend: FrontendKey,
    /// Its address.
    pub ip: IpAddr,
    /// Its port.
    pub port: u16,
}

/// The minimal set of changes from what is applied to what is desired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LbPlan {
    /// New or changed services (replace the whole entry for the frontend); shared with the
    /// desired state that holds them (a first full sync upserts every service: no copy).
    pub upserts: Vec<Arc<LbService>>,
    /// Frontends to remove.
    pub deletes: Vec<Frontend>,
    /// Backends removed from a frontend (or whose frontend is deleted).
    pub stale_backends: Vec<StaleBackend>,
}

impl LbPlan {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty() && self.stale_backends.is_empty()
    }

    /// Number of operations (upserts + deletes), for metrics.
    pub fn len(&self) -> usize {
        self.upserts.len() + self.deletes.len()
    }
}

/// Diffs `desired` against `applied`, both keyed by [`FrontendKey`]. A service equal to its
/// applied counterpart is left out; a frontend whose kind changed is an upsert (same key). If a
/// list holds a key twice, the last entry wins (the desired-state builder never produces that).
/// The output is sorted by frontend key, so plans are deterministic.
pub fn plan(desired: &[LbService], applied: &[LbService]) -> LbPlan {
    let desired: Vec<Arc<LbService>> = desired.iter().cloned().map(Arc::new).collect();
    plan_refs(&desired, applied)
}

/// [`plan`] over any two collections of services held elsewhere (the service loop's, shared
/// with its desired state): nothing is copied, the upserts are shared.
pub fn plan_refs<'a>(
    desired: impl IntoIterator<Item = &'a Arc<LbService>>,
    applied: impl IntoIterator<Item = &'a LbService>,
) -> LbPlan {
    let desired: BTreeMap<FrontendKey, &Arc<LbService>> =
        desired.into_iter().map(|s| (s.frontend.key(), s)).collect();
    let applied: BTreeMap<FrontendKey, &LbService> =
        applied.into_iter().map(|s| (s.frontend.key(), s)).collect();
    let mut out = LbPlan::default();
    for (key, want) in &desired {
        match applied.get(key) {
            Some(have) if *have == &***want => {}
            Some(have) => {
                out.upserts.push(Arc::clone(want));
                let keep: BTreeSet<(IpAddr, u16)> =
                    want.backends.iter().map(|b| (b.ip, b.port)).collect();
                stale(&mut out, *key, have, &keep);
            }
            None => out.upserts.push(Arc::clone(want)),
        }
    }
    for (key, have) in &applied {
        if !desired.contains_key(key) {
            out.deletes.push(have.frontend);
            stale(&mut out, *key, have, &BTreeSet::new());
        }
    }
    out
}

fn stale(out: &mut LbPlan, key: FrontendKey, have: &LbService, keep: &BTreeSet<(IpAddr, u16)>) {
    let gone: BTreeSet<(IpAddr, u16)> = have
        .backends
        .iter()
        .map(|b| (b.ip, b.port))
        .filter(|b| !keep.contains(b))
        .collect();
    out.stale_backends
        .extend(gone.into_iter().map(|(ip, port)| StaleBackend {
            frontend: key,
            ip,
            port,
        }));
}

/// Errors from a service dataplane.
#[derive(Debug, thiserror::Error)]
pub enum LbError {
    /// A kernel or tool operation failed.
    #[error("{op} {object}: {source}")]
    Op {
        /// The operation (`bpf map update`, `nft -f`, `iptables-restore`, ...).
        op: &'static str,
        /// The object (map name and key, chain, frontend, ...).
        object: String,
        /// The underlying error (keep the errno).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// The dataplane cannot hold the plan (map full, id out of range, ...).
    #[error("{what}: {reason}")]
    Capacity {
        /// What overflowed.
        what: String,
        /// Details.
        reason: String,
    },
    /// The dataplane is not usable (programs not loaded, tool missing, ...).
    #[error("dataplane unavailable: {0}")]
    Unavailable(String),
}

/// A service dataplane: the seam every kernel effect of service load balancing crosses.
///
/// Implementations: eBPF maps, nftables, iptables, and [`FakeLbDataplane`] for tests. Calls are
/// synchronous (map updates are syscalls; nft/iptables-restore are short child processes); the
/// caller runs them off the async executor.
pub trait LbDataplane: Send + 'static {
    /// The proxy mode, for logs and metrics (`ebpf`, `nftables`, `iptables`, `fake`).
    fn mode(&self) -> &'static str;

    /// Applies a plan. Idempotent: an upsert replaces whatever the frontend had (its `id` does
    /// not change while the frontend exists), deleting an absent frontend succeeds, and stale
    /// backends that have no state are ignored.
    fn apply(&mut self, plan: &LbPlan) -> Result<(), LbError>;

    /// What is programmed now, read back from the kernel (pinned maps, nft sets, ...). Used at
    /// start-up (to re-seed ids, so a restart derives the same ones, and to diff against real
    /// state instead of flushing), after a failed apply, and by `twilld get services`.
    /// A service whose fields cannot all be reconstructed may differ from what was applied; the
    /// next plan then simply re-upserts it.
    fn observed(&mut self) -> Result<Vec<LbService>, LbError>;
}

/// State of the [`FakeLbDataplane`], shared between clones.
#[derive(Debug, Default, Clone)]
pub struct FakeLbState {
    /// Programmed services by frontend key.
    pub services: BTreeMap<FrontendKey, LbService>,
    /// Every plan applied successfully, in order.
    pub plans: Vec<LbPlan>,
    /// Stale backends reported, in order.
    pub flushed: Vec<StaleBackend>,
    /// When set, the next `apply` fails with this message (and applies nothing).
    pub fail_next_apply: Option<String>,
    /// Number of `apply` calls, failed ones included.
    pub apply_calls: usize,
}

/// A recording in-memory dataplane; clones share state, so a test keeps one clone and hands the
/// other to the code under test.
#[derive(Debug, Default, Clone)]
pub struct FakeLbDataplane {
    state: Arc<Mutex<FakeLbState>>,
}

impl FakeLbDataplane {
    /// An empty dataplane.
    pub fn new() -> Self {
        Self::default()
    }

    /// A dataplane that already holds `services` (as after an agent restart).
    pub fn with_services(services: Vec<LbService>) -> Self {
        let fake = Self::new();
        fake.tamper(|s| {
            s.services = services
                .into_iter()
                .map(|s| (s.frontend.key(), s))
                .collect();
        });
        fake
    }

    /// A copy of the state.
    pub fn state(&self) -> FakeLbState {
        self.state.lock().expect("fake dataplane lock").clone()
    }

    /// Programmed services, sorted by frontend key.
    pub fn services(&self) -> Vec<LbService> {
        self.state().services.into_values().collect()
    }

    /// Changes the state behind the code's back (drift, injected failures).
    pub fn tamper(&self, f: impl FnOnce(&mut FakeLbState)) {
        f(&mut self.state.lock().expect("fake dataplane lock"));
    }

    /// Takes the recorded plans.
    pub fn take_plans(&self) -> Vec<LbPlan> {
        std::mem::take(&mut self.state.lock().expect("fake dataplane lock").plans)
    }
}

impl LbDataplane for FakeLbDataplane {
    fn mode(&self) -> &'static str {
        "fake"
    }

    fn apply(&mut self, plan: &LbPlan) -> Result<(), LbError> {
        let mut s = self.state.lock().expect("fake dataplane lock");
        s.apply_calls += 1;
        if let Some(msg) = s.fail_next_apply.take() {
            return Err(LbError::Unavailable(msg));
        }
        for f in &plan.deletes {
            s.services.remove(&f.key());
        }
        for svc in &plan.upserts {
            s.services.insert(svc.frontend.key(), (**svc).clone());
        }
        s.flushed.extend(plan.stale_backends.iter().copied());
        s.plans.push(plan.clone());
        Ok(())
    }

    fn observed(&mut self) -> Result<Vec<LbService>, LbError> {
        Ok(self
            .state
            .lock()
            .expect("fake dataplane lock")
            .services
            .values()
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::testutil::{be, svc};

    #[test]
    fn unchanged_services_are_not_replanned() {
        let a = svc(1, "10.96.0.1", 80, vec![be("10.0.1.2", 8080)]);
        let b = svc(2, "10.96.0.2", 80, vec![be("10.0.1.3", 8080)]);
        let p = plan(&[a.clone(), b.clone()], &[b, a]);
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn new_changed_and_removed() {
        let a = svc(
            1,
            "10.96.0.1",
            80,
            vec![be("10.0.1.2", 8080), be("10.0.2.2", 8080)],
        );
        let b = svc(2, "10.96.0.2", 80, vec![be("10.0.1.3", 8080)]);
        let c = svc(3, "10.96.0.3", 53, vec![]);
        let a2 = svc(
            1,
            "10.96.0.1",
            80,
            vec![be("10.0.1.2", 8080), be("10.0.3.2", 8080)],
        );
        let p = plan(&[a2.clone(), c.clone()], &[a, b.clone()]);
        assert_eq!(p.upserts, vec![Arc::new(a2), Arc::new(c)]);
        assert_eq!(p.deletes, vec![b.frontend]);
        let stale: Vec<String> = p
            .stale_backends
            .iter()
            .map(|s| format!("{} {}:{}", s.frontend, s.ip, s.port))
            .collect();
        assert_eq!(
            stale,
            vec![
                "10.96.0.1:80/TCP 10.0.2.2:8080",
                "10.96.0.2:80/TCP 10.0.1.3:8080"
            ]
        );
        assert_eq!(p.len(), 3);
    }

    #[test]
    fn kind_change_is_an_upsert_not_a_delete() {
        let a = svc(1, "192.0.2.10", 80, vec![be("10.0.1.2", 8080)]);
        let mut b = a.clone();
        b.frontend.kind = FrontendKind::ExternalIp;
        let p = plan(&[b.clone()], &[a]);
        assert_eq!(p.upserts, vec![Arc::new(b)]);
        assert!(p.deletes.is_empty());
        assert!(p.stale_backends.is_empty());
    }

    #[test]
    fn fake_applies_and_records() {
        let mut dp = FakeLbDataplane::new();
        let probe = dp.clone();
        let a = svc(1, "10.96.0.1", 80, vec![be("10.0.1.2", 8080)]);
        dp.apply(&plan(std::slice::from_ref(&a), &[])).unwrap();
        assert_eq!(probe.services(), vec![a.clone()]);
        probe.tamper(|s| s.fail_next_apply = Some("boom".into()));
        let err = dp.apply(&plan(&[], std::slice::from_ref(&a))).unwrap_err();
        assert_eq!(err.to_string(), "dataplane unavailable: boom");
        assert_eq!(dp.observed().unwrap(), vec![a.clone()]);
        dp.apply(&plan(&[], &[a])).unwrap();
        assert!(probe.services().is_empty());
        assert_eq!(probe.take_plans().len(), 2);
        assert_eq!(probe.state().apply_calls, 3);
    }
}
