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

mod compute;
mod ids;
mod snapshot;

pub use self::compute::{Conflict, Desired, desired, service_frontends};
pub use self::ids::{IdAllocator, LbState, build};
pub use self::snapshot::{NsName, ServiceInfo, SliceInfo, Snapshot};

use crate::services::lb::{Frontend, FrontendKind};
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

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

#[cfg(test)]
mod tests;
