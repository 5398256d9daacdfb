//! End-to-end tests of twill in Kubernetes mode (issue 6), against the stand-in API server
//! (`twill_tests::apiserver`) running on the rig's underlay: real twilld on every node with
//! `--kube-subnet-mgr` (subnets from the Nodes' `podCIDRs`, leases as flannel's annotations) and
//! the eBPF service proxy fed by Services and EndpointSlices watched from the API server.
//!
//! Why it is shaped as it is:
//! - No etcd: everything twilld knows comes from the stand-in, so a test that passes shows
//!   both halves (overlay and services) working from Kubernetes alone.
//! - The stand-in serves what a 1.33 API server returns (lists with resourceVersions, watch
//!   streams with bookmarks, `410 Expired`); objects written by the tests are checked against
//!   the k8s-openapi types first. Faults (cut watches, compaction, a 503 outage) come from it.
//! - Clients, backends and cgroups as in `services_ebpf.rs`: backends are threads of this test
//!   in pod namespaces answering `<name> peer=<client>`; clients are threads (the tc path) or a
//!   `busybox nc` moved into the node's cgroup (socket-level load balancing).
//! - Privileged: as root they run; under CI a non-root run fails (see `require_root`).

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use twill_facts::SubnetFacts;
use twill_tests::apiserver::{ApiServer, Resource, api_url, node};
use twill_tests::{NameServer, Pod, Rig, RigOptions, http_get, require_root, wait_until};

const HOST_GW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;
const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const UP: Duration = Duration::from_secs(20);
const VIP: &str = "10.96.0.10";
const NS: &str = "shop";
const FLANNEL: &str = "flannel.alpha.coreos.com";

/// A rig whose nodes run twilld against the stand-in API server.
struct Cluster {
    /// The backends' servers (stopped first).
    servers: Mutex<Vec<NameServer>>,
    /// Stops twilld and removes namespaces, cgroups and pins when dropped.
    rig: Rig,
    api: ApiServer,
    /// The nodes' cgroups, made by the rig.
    cgroups: Vec<PathBuf>,
    facts: Vec<SubnetFacts>,
}

fn pod_cidr(node: usize) -> String {
    format!("10.244.{node}.0/24")
}

impl Cluster {
    /// `n` nodes registered in the API server with podCIDRs `10.244.<i>.0/24`; twilld started
    /// on the nodes in `twill_nodes` (the others are left to the test).
    fn new(n: usize, net_conf: &str, twill_nodes: &[usize], proxy: bool) -> Self {
        let rig = Rig::with_options(RigOptions {
            nodes: n,
            etcd: false,
            ..RigOptions::default()
        })
        .expect("rig");
        let api = ApiServer::start_on_underlay(&rig.underlay_ns()).expect("stand-in API server");
        for i in 1..=n {
            api.apply(node(&format!("n{i}"), Rig::node_ip(i), &[&pod_cidr(i)]))
                .unwrap();
        }
        fs::write(rig.temp_dir().join("net-conf.json"), net_conf).unwrap();
        let cgroups: Vec<PathBuf> = (1..=n)
            .map(|i| rig.node_cgroup(i).expect("node cgroup"))
            .collect();
        let mut c = Cluster {
            servers: Mutex::new(Vec::new()),
            rig,
            api,
            cgroups,
            facts: Vec::new(),
        };
        for &i in twill_nodes {
            let flags = c.flags(i, proxy);
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            c.rig.start_twilld(i, &flags).unwrap();
        }
        for i in 1..=n {
            let f = if twill_nodes.contains(&i) {
                c.rig
                    .wait_subnet_file(i, UP)
                    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.rig.twilld_log(i)))
            } else {
                SubnetFacts {
                    network: Some("10.244.0.0/16".parse().unwrap()),
                    subnet: Some(format!("10.244.{i}.1/24").parse().unwrap()),
                    ipv6_network: None,
                    ipv6_subnet: None,
                    mtu: 1450,
                    ipmasq: false,
                }
            };
            c.facts.push(f);
        }
        c
    }

    /// twilld's flags on node `i`: Kubernetes for subnets and (with `proxy`) services.
    fn flags(&self, i: usize, proxy: bool) -> Vec<String> {
        let mut f: Vec<String> = [
            "--kube-subnet-mgr",
            "--kube-api-url",
            &api_url(),
            "--net-config-path",
            &self
                .rig
                .temp_dir()
                .join("net-conf.json")
                .display()
                .to_string(),
            "--node-name",
            &format!("n{i}"),
            "--metrics-addr",
            "0.0.0.0:9615",
        ]
        .map(String::from)
        .to_vec();
        if proxy {
            f.extend(
                [
                    "--proxy-mode",
                    "ebpf",
                    "--lb-cgroup",
                    &self.cgroups[i - 1].display().to_string(),
                ]
                .map(String::from),
            );
        }
        f
    }

    fn pod(&self, node: usize) -> Pod {
        self.rig.add_pod(node, &self.facts[node - 1]).unwrap()
    }

    fn cgroup(&self, node: usize) -> &Path {
        &self.cgroups[node - 1]
    }

    /// A TCP server in `pod` on port 8080 answering `<name> peer=<client>`.
    fn serve(&self, pod: &Pod, name: &'static str) {
        let ip = IpAddr::V4(pod.ipv4.expect("pod v4"));
        let server = NameServer::start(&pod.ns, name, Some(SocketAddr::new(ip, 8080)), None)
            .unwrap_or_else(|e| panic!("{e:#}"));
        self.servers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(server);
    }

    /// GET `path` on node `node`'s `port` from the underlay.
    fn get(&self, node: usize, port: u16, path: &str) -> Option<(u16, String)> {
        let addr = SocketAddr::new(Rig::node_ip(node).into(), port);
        http_get(&self.rig.underlay_ns(), addr, path)
            .ok()
            .map(|r| (r.status, r.body))
    }

    fn annotations(&self, node: usize) -> serde_json::Map<String, Value> {
        self.api
            .get(Resource::Nodes, "", &format!("n{node}"))
            .and_then(|n| n["metadata"]["annotations"].as_object().cloned())
            .unwrap_or_default()
    }
}

fn backend_name(line: &str) -> &str {
    line.split_whitespace().next().unwrap_or_default()
}

/// A Service as `kubectl apply` sends it (the API server fills the rest).
fn service(name: &str, vip: &str, port: u16, labels: &Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {
            "type": "ClusterIP",
            "selector": {"app": name},
            "clusterIP": vip,
            "clusterIPs": [vip],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
            "sessionAffinity": "None",
            "ports": [{"name": "http", "protocol": "TCP", "port": port, "targetPort": 8080}]
        },
        "status": {"loadBalancer": {}}
    })
}

fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    k8s_openapi::jiff::Timestamp::from_second(i64::try_from(secs).unwrap())
        .unwrap()
        .to_string()
}

/// An EndpointSlice as the EndpointSlice controller writes it for `svc`.
fn slice(name: &str, svc: &str, endpoints: &[(&Pod, &str)]) -> Value {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|(p, node)| {
            json!({
                "addresses": [p.ipv4.unwrap().to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": node,
                "targetRef": {"kind": "Pod", "namespace": NS, "name": p.ns}
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": NS,
            "generateName": format!("{svc}-"),
            "labels": {
                "kubernetes.io/service-name": svc,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"
            },
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": now_rfc3339()}
        },
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}]
    })
}

/// Service `web` at [`VIP`]:80 with backends `b1` on n1 and `b2` on n2, applied to the API
/// server; returns once `client` (on n2) reaches it.
fn web_on(c: &Cluster, (b1, b2): (&Pod, &Pod), client: &Pod) {
    c.api
        .apply(service("web", VIP, 80, &json!({"app": "web"})))
        .unwrap();
    c.api
        .apply(slice("web-x7k2p", "web", &[(b1, "n1"), (b2, "n2")]))
        .unwrap();
    wait_until(UP, || twill_tests::tcp_line(&client.ns, vip(80)).is_some())
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.rig.twilld_log(2)));
}

fn vip(port: u16) -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), port)
}

/// The value of an unlabelled Prometheus sample.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Services created, changed and deleted in the API server appear, change and disappear in the
/// dataplane of both nodes; the nodes reach each other's pods through the routes their
/// podCIDRs and annotations give; healthz and metrics answer as kube-proxy's.
#[test]
fn services_follow_the_api_server() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(2, HOST_GW, &[1, 2], true);
    let (b1, b2, client) = (c.pod(1), c.pod(2), c.pod(2));
    c.serve(&b1, "b1");
    c.serve(&b2, "b2");

    // The leases as annotations, flannel's names and values.
    wait_until(UP, || {
        c.annotations(1)
            .contains_key(&format!("{FLANNEL}/public-ip"))
    })
    .unwrap();
    let a = c.annotations(1);
    for (k, v) in [
        ("backend-type", "host-gw"),
        ("backend-data", "null"),
        ("public-ip", "198.18.0.11"),
        ("kube-subnet-manager", "true"),
    ] {
        assert_eq!(
            a[&format!("{FLANNEL}/{k}")],
            json!(v),
            "annotation {k}: {a:?}"
        );
    }
    assert_eq!(
        a["node.alpha.kubernetes.io/ttl"],
        json!("0"),
        "other annotations kept"
    );

    web_on(&c, (&b1, &b2), &client);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..16 {
        let a = twill_tests::tcp_line_in_cgroup(&client.ns, c.cgroup(2), vip(80))
            .expect("socket-LB connect");
        let b = twill_tests::tcp_line(&client.ns, vip(80)).expect("tc-path connect");
        seen.insert(backend_name(&a).to_owned());
        seen.insert(backend_name(&b).to_owned());
    }
    assert_eq!(
        seen,
        ["b1", "b2"].map(String::from).into(),
        "both backends, one across nodes"
    );

    // A Service labelled for another proxy is not programmed; one endpoint goes; the port
    // changes. Applied in this order, so once the last change shows, the others were handled.
    // (A second later: trigger times have a second's precision, and twilld, like kube-proxy,
    // reports programming latency only for changes made after it started.)
    std::thread::sleep(Duration::from_millis(1100));
    c.api
        .apply(service(
            "other",
            "10.96.0.20",
            80,
            &json!({"service.kubernetes.io/service-proxy-name": "another-proxy"}),
        ))
        .unwrap();
    c.api
        .apply(slice("web-x7k2p", "web", &[(&b2, "n2")]))
        .unwrap();
    c.api
        .apply(service("web", VIP, 8000, &json!({"app": "web"})))
        .unwrap();
    wait_until(UP, || {
        twill_tests::tcp_line(&client.ns, vip(8000)).is_some()
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.rig.twilld_log(2)));
    for _ in 0..10 {
        let a = twill_tests::tcp_line_in_cgroup(&client.ns, c.cgroup(2), vip(8000))
            .expect("socket-LB connect");
        let b = twill_tests::tcp_line(&client.ns, vip(8000)).expect("tc-path connect");
        for line in [&a, &b] {
            assert_eq!(backend_name(line), "b2", "removed endpoint served: {line}");
        }
    }
    assert_eq!(
        twill_tests::tcp_line(&client.ns, vip(80)),
        None,
        "old port still served"
    );
    let other: SocketAddr = "10.96.0.20:80".parse().unwrap();
    assert_eq!(
        twill_tests::tcp_line(&client.ns, other),
        None,
        "a service for another proxy was programmed"
    );

    // kube-proxy's surfaces.
    let (code, body) = c.get(1, 10256, "/healthz").expect("healthz");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.starts_with("{\"lastUpdated\": \"") && body.ends_with(", \"nodeEligible\": true}"),
        "{body}"
    );
    let (_, metrics) = c.get(2, 9615, "/metrics").expect("metrics");
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        "kubeproxy_network_programming_duration_seconds_count",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
    ] {
        let v = metric(&metrics, name).unwrap_or_else(|| panic!("{name} missing:\n{metrics}"));
        assert!(v > 0.0, "{name} = {v}");
    }
    // The autoscaler marks node 1 for deletion: /healthz 503 (drain it), /livez still 200.
    let mut n1 = c.api.get(Resource::Nodes, "", "n1").unwrap();
    n1["spec"]["taints"] = json!([{"key": "ToBeDeletedByClusterAutoscaler", "value": "1746177247", "effect": "NoSchedule"}]);
    c.api.apply(n1).unwrap();
    wait_until(UP, || {
        c.get(1, 10256, "/healthz")
            .is_some_and(|(code, _)| code == 503)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.rig.twilld_log(1)));
    let (_, body) = c.get(1, 10256, "/healthz").unwrap();
    assert!(body.ends_with(", \"nodeEligible\": false}"), "{body}");
    assert_eq!(c.get(1, 10256, "/livez").unwrap().0, 200);

    // Deleted: the VIP stops answering.
    assert!(c.api.delete(Resource::Services, NS, "web"));
    wait_until(UP, || {
        twill_tests::tcp_line(&client.ns, vip(8000)).is_none()
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", c.rig.twilld_log(2)));

    // Everything twilld asked of the API server, the ClusterRole in deploy/ grants.
    let requests = c.api.requests();
    assert!(requests.len() > 10, "{requests:?}");
    for r in &requests {
        assert!(
            granted(r),
            "deploy/kube-twill.yml's ClusterRole does not grant {r}"
        );
    }
}

/// Whether the ClusterRole of deploy/kube-twill.yml grants a request line of the stand-in.
fn granted(request: &str) -> bool {
    use serde::Deserialize as _;
    let manifest = include_str!("../../deploy/kube-twill.yml");
    let role = serde_yaml_ng::Deserializer::from_str(manifest)
        .map(|d| Value::deserialize(d).unwrap())
        .find(|v| v["kind"] == "ClusterRole")
        .expect("a ClusterRole");
    let (method, target) = request.split_once(' ').unwrap();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", g, "v1", rest @ ..] => (*g, rest),
        _ => return false,
    };
    let rest = match rest {
        ["namespaces", _, rest @ ..] => rest,
        r => r,
    };
    let (resource, named) = match rest {
        [r] => ((*r).to_string(), false),
        [r, _] => ((*r).to_string(), true),
        [r, _, sub] => (format!("{r}/{sub}"), true),
        _ => return false,
    };
    let verb = match (method, named) {
        ("GET", true) => "get",
        ("GET", false) if query.contains("watch=") => "watch",
        ("GET", false) => "list",
        ("PATCH", _) => "patch",
        _ => return false,
    };
    let has = |v: &Value, x: &str| v.as_array().is_some_and(|a| a.iter().any(|e| e == x));
    role["rules"].as_array().unwrap().iter().any(|rule| {
        has(&rule["apiGroups"], group)
            && has(&rule["resources"], &resource)
            && has(&rule["verbs"], verb)
    })
}

/// The API server goes away (watches cut, 503s, history compacted) while a change is made:
/// traffic keeps flowing through the break and the re-list (no connection fails, so nothing
/// was dropped even for a moment), and the change lands.
#[test]
fn a_broken_watch_relists_without_dropping_state() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(2, HOST_GW, &[1, 2], true);
    let (b1, b2, b3, client) = (c.pod(1), c.pod(2), c.pod(1), c.pod(2));
    c.serve(&b1, "b1");
    c.serve(&b2, "b2");
    c.serve(&b3, "b3");
    web_on(&c, (&b1, &b2), &client);
    let lists_before = c.api.lists(Resource::EndpointSlices);

    let (failures, after) = std::thread::scope(|s| {
        let stream = s.spawn(|| {
            let (mut failures, mut tries) = (Vec::new(), 0);
            let mut after = Vec::new();
            let start = Instant::now();
            let mut landed_at = None;
            while start.elapsed() < Duration::from_secs(40) {
                tries += 1;
                match twill_tests::tcp_line(&client.ns, vip(80)) {
                    None => failures.push(start.elapsed()),
                    Some(line) if start.elapsed() > Duration::from_secs(4) => {
                        after.push(backend_name(&line).to_owned());
                        // Done once the change has shown for 10 connections in a row.
                        if backend_name(&line) == "b3" && landed_at.is_none() {
                            landed_at = Some(after.len());
                        }
                        if landed_at.is_some_and(|i| after.len() >= i + 10) {
                            break;
                        }
                    }
                    Some(_) => {}
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(tries > 20, "too few connections: {tries}");
            let tail = landed_at.map_or_else(Vec::new, |i| after[i - 1..].to_vec());
            (failures, tail)
        });
        std::thread::sleep(Duration::from_millis(500));
        // The outage: watches cut, every request 503; meanwhile the EndpointSlice controller
        // adds b3, and the history is compacted past that change, so the watches cannot
        // resume (410) and must re-list. (An endpoint is added, not removed: a flow in flight
        // to a removed endpoint is cut by design, which would blur what this test measures.)
        c.api.set_down(true);
        c.api
            .apply(slice(
                "web-x7k2p",
                "web",
                &[(&b1, "n1"), (&b2, "n2"), (&b3, "n1")],
            ))
            .unwrap();
        c.api.compact();
        std::thread::sleep(Duration::from_secs(3));
        c.api.set_down(false);
        stream.join().unwrap()
    });
    assert!(
        failures.is_empty(),
        "connections failed across the API server outage, at {failures:?} (outage from 0.5 s to 3.5 s)"
    );
    assert!(
        !after.is_empty(),
        "the change made during the outage never landed\n{}",
        c.rig.twilld_log(2)
    );
    assert!(
        after
            .iter()
            .all(|b| ["b1", "b2", "b3"].contains(&b.as_str())),
        "unexpected backend after the re-list: {after:?}"
    );
    assert!(
        c.api.lists(Resource::EndpointSlices) > lists_before,
        "no re-list after the outage: {:?}",
        c.api.requests()
    );
    let log = c.rig.twilld_log(2);
    assert!(
        log.contains("watching EndpointSlices; retrying"),
        "the break went unnoticed:\n{log}"
    );
}

/// A twilld node and a node set up as flannel does it (VXLAN by hand, annotations as flannel
/// writes them) exchange pod traffic in kube-subnet-mgr mode: each reads the other's lease from
/// its Node.
#[test]
fn kube_subnet_mgr_interoperates_with_a_flannel_node() {
    if !require_root() {
        return;
    }
    // Node 2 is "flannel": its VTEP first, then its Node annotated as flannel does.
    let c = Cluster::new(2, VXLAN, &[1], false);
    let n2 = c.rig.node_ns(2);
    let mac2 = "6e:2c:9a:41:0b:7e";
    twill_tests::ns::ip_batch(
        Some(&n2),
        &format!(
            "link add flannel.1 address {mac2} type vxlan id 1 local 198.18.0.12 dev eth0 dstport 8472 nolearning\n\
             link set flannel.1 mtu 1450 up\n\
             addr add 10.244.2.0/32 dev flannel.1\n"
        ),
    )
    .unwrap();
    let mut node2 = c.api.get(Resource::Nodes, "", "n2").unwrap();
    let ann = node2["metadata"]["annotations"].as_object_mut().unwrap();
    for (k, v) in [
        (
            "backend-data",
            format!("{{\"VNI\":1,\"VtepMAC\":\"{mac2}\"}}"),
        ),
        ("backend-type", "vxlan".into()),
        ("kube-subnet-manager", "true".into()),
        ("public-ip", "198.18.0.12".into()),
    ] {
        ann.insert(format!("{FLANNEL}/{k}"), json!(v));
    }
    c.api.apply(node2).unwrap();

    // twilld's lease, read as flannel reads it, programmed on node 2 as flannel would.
    let key = format!("{FLANNEL}/backend-data");
    wait_until(UP, || c.annotations(1).contains_key(&key))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.rig.twilld_log(1)));
    let a1 = c.annotations(1);
    assert_eq!(a1[&format!("{FLANNEL}/backend-type")], json!("vxlan"));
    assert_eq!(a1[&format!("{FLANNEL}/public-ip")], json!("198.18.0.11"));
    let data: Value = serde_json::from_str(a1[&key].as_str().unwrap()).unwrap();
    assert_eq!(data["VNI"], json!(1));
    let mac1 = data["VtepMAC"].as_str().unwrap().to_owned();
    twill_tests::ns::ip_batch(
        Some(&n2),
        &format!(
            "route add 10.244.1.0/24 via 10.244.1.0 dev flannel.1 onlink\n\
             neigh replace 10.244.1.0 lladdr {mac1} dev flannel.1 nud permanent\n"
        ),
    )
    .unwrap();
    twill_tests::run(
        &n2,
        &[
            "bridge",
            "fdb",
            "append",
            &mac1,
            "dev",
            "flannel.1",
            "dst",
            "198.18.0.11",
        ],
    )
    .unwrap();

    let (p1, p2) = (c.pod(1), c.pod(2));
    let to2 = IpAddr::V4(p2.ipv4.unwrap());
    wait_until(UP, || {
        twill_tests::ping(&p1.ns, to2, 1).is_ok_and(|s| s.all_received())
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\nfdb on n1: {:?}\n{}",
            twill_tests::fdb(&c.rig.node_ns(1), "flannel.1"),
            c.rig.twilld_log(1)
        )
    });
    let stats = twill_tests::ping(&p2.ns, IpAddr::V4(p1.ipv4.unwrap()), 5).unwrap();
    assert!(stats.all_received(), "{stats:?}");
    let fdb = twill_tests::fdb(&c.rig.node_ns(1), "flannel.1").unwrap();
    assert!(
        fdb.contains(mac2) && fdb.contains("dst 198.18.0.12"),
        "twilld did not program the flannel node's VTEP: {fdb}"
    );
}
