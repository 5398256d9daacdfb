//! Tests of the desired state: kube-proxy semantics, refusals, conflicts, stable ids.

use std::collections::BTreeSet;

use super::*;
use crate::services::lb::{BackendState, LbService, Proto, plan};
use crate::services::model::parse_manifest;
use crate::services::model::{Change, Kind, Object, ObjectKey};

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

/// The first frontend of `kind` `d` wants.
fn first_of(d: &Desired, kind: FrontendKind) -> &LbService {
    d.services
        .iter()
        .find(|s| s.frontend.kind == kind)
        .unwrap_or_else(|| panic!("no {kind:?} frontend"))
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

/// `yaml` (holding [`WEB`]'s Service) with `lines` added to the Service's spec.
fn with_spec(yaml: &str, lines: &str) -> String {
    yaml.replace(
        "  type: LoadBalancer\n",
        &format!("  type: LoadBalancer\n{lines}"),
    )
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
    let y = with_spec(&y, "  externalTrafficPolicy: Local\n");
    let d = desired(&snap(&y), &bare);
    let np = first_of(&d, FrontendKind::NodePort);
    assert_eq!(
        show(std::slice::from_ref(np)),
        vec!["shop/web:http NodePort 0.0.0.0:30080/TCP [10.244.1.5:8080L]"]
    );
}

#[test]
fn traffic_policies_local() {
    let y = with_spec(
        WEB,
        "  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n",
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
    let y3 = with_spec(WEB, "  externalTrafficPolicy: Local\n");
    let d = desired(&snap(&y3), &node());
    let cip = first_of(&d, FrontendKind::ClusterIp);
    assert_eq!(cip.backends.len(), 2);
    let np = first_of(&d, FrontendKind::NodePort);
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
