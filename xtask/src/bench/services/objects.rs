//! The Services and EndpointSlices the benchmark writes: fillers, the measured one.

use std::net::{Ipv4Addr, SocketAddr};

use twill_tests::bench_support::EtcdHttp;
use twill_tests::rig::{ETCD_PREFIX, UNDERLAY_V4};

use super::params::{ENDPOINTS, NAMESPACE, PORT, VIP_TARGET_PORT};

/// Filler `i`'s name, VIP and endpoints: VIPs from 10.100.0.0 up, endpoints in 100.64.0.0/10
/// (addresses no rig namespace has: nothing is ever sent to them).
pub(crate) fn filler(i: usize) -> (String, Ipv4Addr, Vec<Ipv4Addr>) {
    let i32_ = u32::try_from(i).expect("fewer than 2^32 services");
    let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + i32_ + 1);
    let base = u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i32_ * 16;
    let eps = (0..ENDPOINTS)
        .map(|j| Ipv4Addr::from(base + u32::try_from(j).expect("few endpoints") + 1))
        .collect();
    (format!("f-{i:05}"), vip, eps)
}

/// The measured service of step `k`: the name that sorts after every filler, and the highest
/// VIP of the range — the same VIP at every step (the previous step's service is deleted
/// first). Through a DNAT dataplane, a client reaching one backend through two VIPs from the
/// same source port within the backend's TIME_WAIT (60 s) has its SYN refused by PAWS: Linux
/// derives a connection's TCP timestamp offset from its destination address, the VIP, so the
/// two VIPs' timestamps are unrelated, and each refused SYN costs the client ~10 ms. At
/// thousands of connections a second that is a quarter of the connections; a step that
/// measured a new VIP would measure that, not the dataplane. (Socket-level load balancing is
/// immune: the socket is connected to the backend itself.)
pub(crate) fn measured(k: usize) -> (String, Ipv4Addr) {
    (format!("zz-measured-{k}"), Ipv4Addr::new(10, 111, 255, 200))
}

pub(crate) fn service_key(name: &str) -> String {
    service_key_at(ETCD_PREFIX, name)
}

pub(crate) fn service_key_at(prefix: &str, name: &str) -> String {
    format!("{prefix}/services/services/{NAMESPACE}/{name}")
}

pub(crate) fn slice_key(name: &str) -> String {
    slice_key_at(ETCD_PREFIX, name)
}

pub(crate) fn slice_key_at(prefix: &str, name: &str) -> String {
    format!("{prefix}/services/endpointslices/{NAMESPACE}/{name}-1")
}

/// A ClusterIP Service as stored (Kubernetes JSON).
pub(crate) fn service_json(name: &str, vip: Ipv4Addr) -> String {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": vip.to_string(),
            "ports": [{"name": "http", "protocol": "TCP", "port": PORT, "targetPort": VIP_TARGET_PORT}],
        },
    })
    .to_string()
}

/// Its EndpointSlice: every address ready.
pub(crate) fn slice_json(name: &str, endpoints: &[Ipv4Addr]) -> String {
    let eps: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|a| serde_json::json!({"addresses": [a.to_string()], "conditions": {"ready": true}}))
        .collect();
    serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{name}-1"),
            "namespace": NAMESPACE,
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "http", "protocol": "TCP", "port": VIP_TARGET_PORT}],
    })
    .to_string()
}

/// The etcd entries of fillers `from..to`.
pub(crate) fn filler_entries(from: usize, to: usize) -> Vec<(String, String)> {
    let mut kvs = Vec::with_capacity(2 * (to - from));
    for i in from..to {
        let (name, vip, eps) = filler(i);
        kvs.push((service_key(&name), service_json(&name, vip)));
        kvs.push((slice_key(&name), slice_json(&name, &eps)));
    }
    kvs
}

/// Fillers `0..n` with their first endpoint only, under `prefix`.
pub(crate) fn one_endpoint_entries(prefix: &str, n: usize) -> Vec<(String, String)> {
    (0..n)
        .flat_map(|i| {
            let (name, vip, eps) = filler(i);
            [
                (service_key_at(prefix, &name), service_json(&name, vip)),
                (slice_key_at(prefix, &name), slice_json(&name, &eps[..1])),
            ]
        })
        .collect()
}

pub(crate) fn etcd() -> EtcdHttp {
    EtcdHttp {
        addr: SocketAddr::from((UNDERLAY_V4, 2379)),
    }
}
