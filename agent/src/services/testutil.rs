//! Builders shared by the services loop's unit tests: a small manifest ([`WEB`]), a node, the
//! frontends' backends as the recording dataplane holds them, and a wait on an observable
//! condition with a deadline.

use crate::services::desired::NodeIdentity;
use crate::services::lb::{
    Backend, BackendState, FakeLbDataplane, Frontend, FrontendKind, LbService, Proto,
};
use crate::services::model::{Object, parse_manifest};

pub(crate) const WEB: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: api}
spec:
  clusterIP: 10.96.0.11
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.5]}, {addresses: [10.244.2.5]}]
ports: [{port: 8080}]
";

pub(crate) fn objs(y: &str) -> Vec<Object> {
    parse_manifest(y).unwrap()
}

pub(crate) fn node() -> NodeIdentity {
    NodeIdentity {
        name: "node-1".into(),
        ..NodeIdentity::default()
    }
}

pub(crate) fn backends_of(dp: &FakeLbDataplane, port: u16) -> Vec<String> {
    dp.services()
        .iter()
        .find(|s| s.frontend.port == port)
        .map(|s| s.backends.iter().map(|b| b.ip.to_string()).collect())
        .unwrap_or_default()
}

/// A ready backend `ip:port`, local to this node or not.
pub(crate) fn backend(ip: &str, port: u16, node_local: bool) -> Backend {
    Backend {
        ip: ip.parse().unwrap(),
        port,
        node_local,
        state: BackendState::Ready,
    }
}

/// A ready backend of a cluster-wide frontend.
pub(crate) fn be(ip: &str, port: u16) -> Backend {
    backend(ip, port, false)
}

/// A TCP frontend `ip:port` of `kind`, named `name`, without affinity or local traffic
/// policies.
pub(crate) fn service(
    id: u32,
    name: String,
    (ip, port, kind): (&str, u16, FrontendKind),
    backends: Vec<Backend>,
) -> LbService {
    LbService {
        id,
        name,
        frontend: Frontend {
            ip: ip.parse().unwrap(),
            port,
            proto: Proto::Tcp,
            kind,
        },
        backends,
        affinity_timeout_secs: None,
        external_local: false,
        internal_local: false,
    }
}

/// A TCP ClusterIP frontend `ip:port` named `default/s<id>`.
pub(crate) fn svc(id: u32, ip: &str, port: u16, backends: Vec<Backend>) -> LbService {
    service(
        id,
        format!("default/s{id}"),
        (ip, port, FrontendKind::ClusterIp),
        backends,
    )
}

/// A TCP frontend of `kind` at `ip` on the usual port of its kind (30080 for a NodePort, 80
/// otherwise), named `default/s<id>:http`.
pub(crate) fn svc_at(id: u32, ip: &str, kind: FrontendKind, backends: Vec<Backend>) -> LbService {
    let port = if kind == FrontendKind::NodePort {
        30080
    } else {
        80
    };
    service(
        id,
        format!("default/s{id}:http"),
        (ip, port, kind),
        backends,
    )
}

/// [`svc_at`] of the ClusterIP `10.96.0.<id>`.
pub(crate) fn cluster_ip(id: u32, backends: Vec<Backend>) -> LbService {
    svc_at(
        id,
        &format!("10.96.0.{id}"),
        FrontendKind::ClusterIp,
        backends,
    )
}
