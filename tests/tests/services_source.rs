//! End-to-end tests of the standalone service source (issue: service LB on eBPF): the real
//! `twilld apply/delete/get` inside a rig node, against the rig's real etcd. They assert what an
//! operator sees: the keys and values in etcd, all-or-nothing applies with errors that name the
//! file, the document and the field, the `get services` table, and deletes.
//!
//! Privileged: as root they run; under CI a non-root run fails (see `require_root`).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use twill_tests::rig::{ETCD_ENDPOINT, ETCD_PREFIX};
use twill_tests::{Rig, exec, http_get, nsenter, require_root, wait_for};

const WEB: &str = r"# what kubectl get -o yaml prints, status and bookkeeping included
apiVersion: v1
kind: Service
metadata:
  creationTimestamp: '2024-05-01T10:00:00Z'
  name: web
  namespace: shop
  resourceVersion: '1234'
  uid: 6f1c2b9e-0000-4000-8000-000000000001
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  externalTrafficPolicy: Cluster
  internalTrafficPolicy: Cluster
  ipFamilies: [IPv4]
  ipFamilyPolicy: SingleStack
  ports:
  - {name: http, nodePort: 30080, port: 80, protocol: TCP, targetPort: 8080}
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
  type: NodePort
status:
  loadBalancer: {}
---
addressType: IPv4
apiVersion: discovery.k8s.io/v1
endpoints:
- addresses: [10.244.1.5]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-1
- addresses: [10.244.2.5]
  conditions: {ready: false, serving: true, terminating: true}
  nodeName: node-2
kind: EndpointSlice
metadata:
  labels:
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
    kubernetes.io/service-name: web
  name: web-x7k2p
  namespace: shop
ports:
- {name: http, port: 8080, protocol: TCP}
";

const DNS_JSON: &str = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"dns","namespace":"kube-system"},
 "spec":{"clusterIP":"10.96.0.53","ports":[{"name":"dns","port":53,"protocol":"UDP"},{"name":"dns-tcp","port":53,"protocol":"TCP"}]}}"#;

/// One valid document, then an invalid one: nothing of the file may be written.
const HALF_BAD: &str = r"apiVersion: v1
kind: Service
metadata: {name: good}
spec: {clusterIP: 10.96.0.20, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: bad}
spec:
  clusterIP: 10.96.0.21
  ports:
  - {name: a, port: 80}
  - {name: b, port: 70000}
";

/// Runs `twilld ARGS --etcd-endpoints <rig etcd>` in node 1's namespace (stdin fed if given).
fn twilld(rig: &Rig, args: &[&str], stdin: Option<&str>) -> Output {
    let bin = rig.twilld_path().expect("twilld binary");
    let mut full: Vec<String> = vec![bin.display().to_string()];
    full.extend(args.iter().map(ToString::to_string));
    full.extend(["--etcd-endpoints".to_string(), ETCD_ENDPOINT.to_string()]);
    match stdin {
        None => exec(&rig.node_ns(1), &full).expect("run twilld"),
        Some(input) => {
            let mut child = nsenter(&rig.node_ns(1), &full)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn twilld");
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
            child.wait_with_output().expect("wait for twilld")
        }
    }
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "twilld failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn keys(rig: &Rig) -> Vec<String> {
    let prefix = format!("{ETCD_PREFIX}/services/");
    rig.etcdctl(&["get", "--prefix", "--keys-only", &prefix])
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

fn value(rig: &Rig, key: &str) -> serde_json::Value {
    let v = rig.etcdctl(&["get", "--print-value-only", key]).unwrap();
    serde_json::from_str(v.trim()).unwrap_or_else(|e| panic!("{key}: {e}: {v}"))
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn apply_get_delete_through_etcd() {
    if !require_root() {
        return;
    }
    let rig = Rig::new(1).expect("rig");
    let dir = rig.temp_dir().to_path_buf();
    let web = write(&dir, "web.yaml", WEB);
    let dns = write(&dir, "dns.json", DNS_JSON);
    let half_bad = write(&dir, "half-bad.yaml", HALF_BAD);

    // Apply two files (YAML with two documents, JSON): one line per object.
    let out = ok(&twilld(&rig, &["apply", "-f", &web, "-f", &dns], None));
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec![
            "Service shop/web created",
            "EndpointSlice shop/web-x7k2p created",
            "Service kube-system/dns created"
        ]
    );
    let svc_key = format!("{ETCD_PREFIX}/services/services/shop/web");
    let slice_key = format!("{ETCD_PREFIX}/services/endpointslices/shop/web-x7k2p");
    let dns_key = format!("{ETCD_PREFIX}/services/services/kube-system/dns");
    assert_eq!(
        keys(&rig),
        vec![slice_key.clone(), dns_key, svc_key.clone()]
    );
    // Values are the canonical JSON: what twill uses, bookkeeping dropped.
    let v = value(&rig, &svc_key);
    assert_eq!(v["spec"]["ports"][0]["nodePort"], 30080);
    assert_eq!(
        v["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"],
        600
    );
    assert!(
        v["metadata"].get("uid").is_none() && v["spec"].get("selector").is_none(),
        "{v}"
    );
    let v = value(&rig, &slice_key);
    assert_eq!(v["endpoints"][1]["conditions"]["terminating"], true);
    assert_eq!(v["metadata"]["labels"]["kubernetes.io/service-name"], "web");

    // Re-applying is a no-op, reported as such.
    let out = ok(&twilld(&rig, &["apply", "-f", &web], None));
    assert!(out.contains("Service shop/web unchanged"), "{out}");

    // All or nothing: the valid first document of a bad file is not written either, and the
    // error names the file, the document and the field.
    let out = twilld(&rig, &["apply", "-f", &half_bad], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{half_bad}: document 2 (Service default/bad): spec.ports[1].port: 70000 is not a valid port (1-65535)"
        )),
        "{err}"
    );
    assert_eq!(keys(&rig).len(), 3, "a refused apply wrote something");

    // A typo that would change behaviour is refused, naming the field.
    let typo = WEB.replace("sessionAffinity: ClientIP", "sesionAffinity: ClientIP");
    let out = twilld(&rig, &["apply", "-f", "-"], Some(&typo));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("<stdin>: document 1 (Service shop/web): spec.sesionAffinity: unknown field `sesionAffinity`"),
        "{err}"
    );

    // A second service on web's node port is refused whole.
    let clash = "apiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: shop}\n\
                 spec: {type: NodePort, clusterIP: 10.96.0.30, ports: [{port: 80, nodePort: 30080}]}\n";
    let out = twilld(&rig, &["apply", "-f", "-"], Some(clash));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("frontend 0.0.0.0:30080/TCP is also claimed by shop/web"),
        "{err}"
    );
    assert_eq!(keys(&rig).len(), 3);

    // Stdin works, and get shows every service with its endpoints.
    let good = HALF_BAD.split("---").next().unwrap();
    let out = ok(&twilld(&rig, &["apply", "-f", "-"], Some(good)));
    assert_eq!(out.trim(), "Service default/good created");
    let table = ok(&twilld(&rig, &["get", "services"], None));
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("NAMESPACE/NAME"), "{table}");
    let web_row = lines
        .iter()
        .find(|l| l.starts_with("shop/web "))
        .expect(&table);
    for col in ["NodePort", "10.96.0.10", "80:30080/TCP", "1/2"] {
        assert!(
            web_row.contains(col),
            "{col} missing in {web_row:?}\n{table}"
        );
    }
    let dns_row = lines
        .iter()
        .find(|l| l.starts_with("kube-system/dns"))
        .expect(&table);
    assert!(
        dns_row.contains("53/UDP,53/TCP") && dns_row.contains("0/0"),
        "{dns_row}"
    );
    assert!(table.contains("no service dataplane found"), "{table}");

    // Delete: everything named in the files goes, in one transaction.
    let out = ok(&twilld(&rig, &["delete", "-f", &web, "-f", &dns], None));
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec![
            "Service shop/web deleted",
            "EndpointSlice shop/web-x7k2p deleted",
            "Service kube-system/dns deleted"
        ]
    );
    assert_eq!(
        keys(&rig),
        vec![format!("{ETCD_PREFIX}/services/services/default/good")]
    );
    let out = ok(&twilld(&rig, &["delete", "-f", &web], None));
    assert!(out.contains("Service shop/web not found"), "{out}");
}

#[test]
fn etcd_down_fails_cleanly() {
    if !require_root() {
        return;
    }
    let rig = Rig::new(1).expect("rig");
    rig.stop_etcd().unwrap();
    let dir = rig.temp_dir().to_path_buf();
    let web = write(&dir, "web.yaml", WEB);
    let out = twilld(&rig, &["apply", "-f", &web], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("connect to etcd") || err.contains("list stored services"),
        "{err}"
    );
}

/// A cgroup under the cgroup2 mount for one node's socket-LB, removed on drop (after moving out
/// any process a failed test left in it).
struct Cgroup(PathBuf);

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.0.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(Path::new(CGROUP_ROOT).join("cgroup.procs"), pid);
            }
        }
        if let Err(e) = std::fs::remove_dir(&self.0) {
            eprintln!("cleanup: rmdir {}: {e}", self.0.display());
        }
    }
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";

/// `twilld get services` reads the node's dataplane (the pinned eBPF maps) next to etcd, and
/// `/metrics` exports per-service counters and map occupancy: what an operator checks to see
/// whether the node does what the objects say.
#[test]
fn get_services_and_metrics_show_the_dataplane() {
    if !require_root() {
        return;
    }
    let rig = Rig::new(1).expect("rig");
    rig.put_network_config(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#)
        .unwrap();
    let cg = Cgroup(Path::new(CGROUP_ROOT).join(format!("twill-{}-n1", rig.id())));
    std::fs::create_dir(&cg.0).expect("create node cgroup");
    // Fields drop in order: the rig (and its twilld) before the cgroup.
    let node = NodeWithCgroup { rig, cg };
    let (rig, cg) = (&node.rig, &node.cg);
    let metrics: SocketAddr = (Rig::node_ip(1), 9615).into();
    let cg_arg = cg.0.display().to_string();
    let metrics_arg = metrics.to_string();
    rig.start_twilld(
        1,
        &[
            "--proxy-mode",
            "ebpf",
            "--lb-cgroup",
            &cg_arg,
            "--node-name",
            "node-1",
            "--metrics-addr",
            &metrics_arg,
        ],
    )
    .unwrap();
    rig.wait_subnet_file(1, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", rig.twilld_log(1)));
    let web = write(rig.temp_dir(), "web.yaml", WEB);
    ok(&twilld(rig, &["apply", "-f", &web], None));

    let pins = rig.pin_dir(1).display().to_string();
    let get = |wide: bool| {
        let mut args = vec!["get", "services", "--node-name", "node-1", "--bpf-pin-dir"];
        args.push(&pins);
        if wide {
            args.extend(["-o", "wide"]);
        }
        ok(&twilld(rig, &args, None))
    };
    // ClusterIP and NodePort of shop/web's one port: both programmed with the ready endpoint.
    let table = wait_for(Duration::from_secs(10), || {
        let t = get(false);
        t.lines()
            .any(|l| l.starts_with("shop/web ") && l.contains(" 2/2 "))
            .then_some(t)
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}\n{}", get(false), rig.twilld_log(1)));
    assert!(
        table.contains("dataplane: ebpf (pinned maps in")
            && table.contains("2/2 frontends in sync, 0 not desired"),
        "{table}"
    );

    // A connection from a process of the node's LB cgroup is counted on the ClusterIP
    // frontend (the backend need not answer: socket-LB counts at connect()).
    let script = format!(
        "echo $$ > {}/cgroup.procs; exec timeout 3 busybox nc -w 1 10.96.0.10 80 </dev/null",
        cg.0.display()
    );
    let _ = exec(&rig.node_ns(1), &["sh", "-c", &script]);
    let wide = get(true);
    let row = wide
        .lines()
        .find(|l| l.starts_with("10.96.0.10:80/TCP"))
        .unwrap_or_else(|| panic!("{wide}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cols[..5],
        [
            "10.96.0.10:80/TCP",
            "ClusterIP",
            "shop/web:http",
            "10.244.1.5:8080",
            "in"
        ],
        "{wide}"
    );
    assert!(cols[6].parse::<u64>().unwrap() >= 1, "CONNS: {wide}");

    let body = http_get(&rig.node_ns(1), metrics, "/metrics").unwrap().body;
    let conns: u64 = body
        .lines()
        .find(|l| {
            l.starts_with(
                "twill_service_connections_total{service=\"shop/web:http\",frontend=\"10.96.0.10:80/TCP\"",
            )
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no counter for shop/web:http in\n{body}"));
    assert!(conns >= 1, "{body}");
    assert!(
        body.contains("twill_bpf_map_entries{map=\"TWL_LB_SVC\"} 2"),
        "{body}"
    );
    assert!(
        body.contains("twill_service_backends{service=\"shop/web:http\",frontend=\"0.0.0.0:30080/TCP\",kind=\"NodePort\"} 1"),
        "{body}"
    );

    // Deleted objects leave the dataplane, and get says so.
    ok(&twilld(rig, &["delete", "-f", &web], None));
    wait_for(Duration::from_secs(10), || {
        get(false)
            .contains("0/0 frontends in sync, 0 not desired")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", get(true)));
}

/// A rig node and its LB cgroup, dropped in that order.
struct NodeWithCgroup {
    rig: Rig,
    cg: Cgroup,
}

/// The netfilter modes have no pinned maps: `get services`, run in the node's namespace, reads
/// the nftables table or the iptables chains instead.
#[test]
fn get_services_reads_the_netfilter_dataplanes() {
    if !require_root() {
        return;
    }
    for (mode, location) in [
        ("nftables", "nftables (table inet twill)"),
        ("iptables", "iptables (TWILL-* chains, iptables-"),
    ] {
        let rig = Rig::new(1).expect("rig");
        rig.put_network_config(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#)
            .unwrap();
        rig.start_twilld(1, &["--proxy-mode", mode, "--node-name", "node-1"])
            .unwrap();
        rig.wait_subnet_file(1, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{e:#}\n{}", rig.twilld_log(1)));
        let web = write(rig.temp_dir(), "web.yaml", WEB);
        ok(&twilld(&rig, &["apply", "-f", &web], None));
        let get = || {
            ok(&twilld(
                &rig,
                &["get", "services", "--node-name", "node-1", "-o", "wide"],
                None,
            ))
        };
        let table = wait_for(Duration::from_secs(10), || {
            let t = get();
            t.contains("2/2 frontends in sync, 0 not desired")
                .then_some(t)
        })
        .unwrap_or_else(|e| panic!("{mode}: {e:#}: {}\n{}", get(), rig.twilld_log(1)));
        assert!(table.contains(&format!("dataplane: {location}")), "{table}");
        let row = table
            .lines()
            .find(|l| l.starts_with("0.0.0.0:30080/TCP"))
            .unwrap_or_else(|| panic!("{table}"));
        assert!(
            row.contains("10.244.1.5:8080") && row.contains("in sync"),
            "{row}"
        );
    }
}
