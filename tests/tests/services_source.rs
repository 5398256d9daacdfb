//! End-to-end tests of the standalone service source (issue: service LB on eBPF): the real
//! `twilld apply/delete/get` inside a rig node, against the rig's real etcd. They assert what an
//! operator sees: the keys and values in etcd, all-or-nothing applies with errors that name the
//! file, the document and the field, the `get services` table, and deletes.
//!
//! Privileged: as root they run; under CI a non-root run fails (see `require_root`).

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use twill_facts::SubnetFacts;
use twill_tests::rig::{ETCD_ENDPOINT, ETCD_PREFIX};
use twill_tests::{Rig, ServiceSpec, exec, http_get, nsenter, require_root, wait_for};

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

const HOST_GW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;

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

/// What `apply` or `delete` of [`WEB`] and [`DNS_JSON`] prints: a line per object, in file
/// order, each ending in `verb`.
fn web_and_dns(verb: &str) -> Vec<String> {
    [
        "Service shop/web",
        "EndpointSlice shop/web-x7k2p",
        "Service kube-system/dns",
    ]
    .map(|object| format!("{object} {verb}"))
    .to_vec()
}

/// The stderr of a twilld run that must have failed.
fn refused(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "twilld succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
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

/// Where the tests below ask node 1's twilld to serve `/metrics`.
fn metrics_addr() -> SocketAddr {
    (Rig::node_ip(1), 9615).into()
}

/// A one-node host-gw rig whose twilld runs the service proxy in `mode` (the flags of
/// `Rig::proxy_args`), serves `/metrics` at [`metrics_addr`] and takes the `extra` flags; the
/// node's subnet facts.
fn proxy_node(mode: &str, extra: &[&str]) -> (Rig, SubnetFacts) {
    let rig = Rig::configured(1, HOST_GW);
    let mut args = rig.proxy_args(1, mode).unwrap();
    args.extend(["--metrics-addr".to_string(), metrics_addr().to_string()]);
    args.extend(extra.iter().map(ToString::to_string));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    rig.start_twilld(1, &args).unwrap();
    let facts = rig
        .wait_subnet_file(1, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{mode}: {e:#}\n{}", rig.twilld_log(1)));
    (rig, facts)
}

#[test]
fn apply_get_delete_through_etcd() {
    let Some(rig) = Rig::for_test(1, None) else {
        return;
    };
    let dir = rig.temp_dir().to_path_buf();
    let web = write(&dir, "web.yaml", WEB);
    let dns = write(&dir, "dns.json", DNS_JSON);
    let half_bad = write(&dir, "half-bad.yaml", HALF_BAD);

    // Apply two files (YAML with two documents, JSON): one line per object.
    let out = ok(&twilld(&rig, &["apply", "-f", &web, "-f", &dns], None));
    assert_eq!(out.lines().collect::<Vec<_>>(), web_and_dns("created"));
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
    let err = refused(&twilld(&rig, &["apply", "-f", &half_bad], None));
    assert!(
        err.contains(&format!(
            "{half_bad}: document 2 (Service default/bad): spec.ports[1].port: 70000 is not a valid port (1-65535)"
        )),
        "{err}"
    );
    assert_eq!(keys(&rig).len(), 3, "a refused apply wrote something");

    // A typo that would change behaviour is refused, naming the field.
    let typo = WEB.replace("sessionAffinity: ClientIP", "sesionAffinity: ClientIP");
    let err = refused(&twilld(&rig, &["apply", "-f", "-"], Some(&typo)));
    assert!(
        err.contains("<stdin>: document 1 (Service shop/web): spec.sesionAffinity: unknown field `sesionAffinity`"),
        "{err}"
    );

    // A second service on web's node port is refused whole.
    let clash = ServiceSpec::new("other", "10.96.0.30".parse().unwrap())
        .namespace("shop")
        .tcp("http", 80, 80)
        .node_port(30080)
        .manifest();
    let err = refused(&twilld(&rig, &["apply", "-f", "-"], Some(&clash)));
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
    assert_eq!(out.lines().collect::<Vec<_>>(), web_and_dns("deleted"));
    assert_eq!(
        keys(&rig),
        vec![format!("{ETCD_PREFIX}/services/services/default/good")]
    );
    let out = ok(&twilld(&rig, &["delete", "-f", &web], None));
    assert!(out.contains("Service shop/web not found"), "{out}");
}

#[test]
fn etcd_down_fails_cleanly() {
    let Some(rig) = Rig::for_test(1, None) else {
        return;
    };
    rig.stop_etcd().unwrap();
    let dir = rig.temp_dir().to_path_buf();
    let web = write(&dir, "web.yaml", WEB);
    let err = refused(&twilld(
        &rig,
        &["apply", "-f", &web, "--etcd-deadline", "2"],
        None,
    ));
    assert!(
        err.contains("list stored services: etcd did not answer within --etcd-deadline 2s ("),
        "{err}"
    );
}

/// `n` Services (`svc-0` …) in one file, each with a cluster IP of its own.
fn many_services(n: usize) -> String {
    let mut out = String::new();
    for i in 0..n {
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}}}\nspec:\n  \
             clusterIP: 10.96.{}.{}\n  ports: [{{port: 80}}]\n",
            1 + i / 200,
            1 + i % 200
        );
    }
    out
}

/// A file larger than etcd's transaction limit (128 operations) applies, in transactions of at
/// most the limit, and says so; `get` lists every Service and `delete` takes the same file.
/// An apply started while etcd is down waits for it (within `--etcd-deadline`) instead of
/// failing on its first connection attempt.
#[test]
fn a_file_of_300_services_applies_in_transactions_and_etcd_is_retried() {
    let Some(rig) = Rig::for_test(1, None) else {
        return;
    };
    let file = write(rig.temp_dir(), "many.yaml", &many_services(300));
    let out = twilld(&rig, &["apply", "-f", &file], None);
    let stdout = ok(&out);
    assert_eq!(stdout.lines().count(), 300, "{stdout}");
    assert!(stdout.lines().all(|l| l.ends_with(" created")), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("300 written in 3 transactions of at most 128 operations"),
        "{stderr}"
    );
    assert_eq!(keys(&rig).len(), 300);
    let table = ok(&twilld(&rig, &["get", "services"], None));
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with("default/svc-"))
        .collect();
    assert_eq!(rows.len(), 300, "{table}");
    assert!(table.contains("default/svc-299 "), "{table}");

    // Deleting the same file takes three transactions too.
    let out = twilld(&rig, &["delete", "-f", &file], None);
    assert_eq!(
        ok(&out).lines().filter(|l| l.ends_with(" deleted")).count(),
        300
    );
    assert!(keys(&rig).is_empty());

    // etcd down when the apply starts: it retries, and succeeds once etcd is back.
    rig.stop_etcd().unwrap();
    let bin = rig.twilld_path().unwrap();
    let log = rig.temp_dir().join("apply-retry.log");
    let child = twill_tests::nsenter(
        &rig.node_ns(1),
        &[
            bin.to_str().unwrap(),
            "apply",
            "-f",
            &file,
            "--etcd-deadline",
            "60",
            "--etcd-endpoints",
            ETCD_ENDPOINT,
        ],
    )
    .env("RUST_LOG", "twill_agent=debug")
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&log).unwrap())
    .spawn()
    .expect("spawn twilld apply");
    let mut child = KillOnDrop(child);
    wait_for(Duration::from_secs(20), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|l| l.contains("etcd not answering; retrying"))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "apply gave up while etcd was down"
    );
    rig.start_etcd().unwrap();
    let status =
        wait_for(Duration::from_mins(1), || child.0.try_wait().unwrap()).unwrap_or_else(|e| {
            panic!(
                "{e:#}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "{text}");
    assert!(text.contains("300 written in 3 transactions"), "{text}");
    assert_eq!(keys(&rig).len(), 300);
}

/// A child process killed (and reaped) when dropped, so a failing test leaves none behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The metrics `twilld` on node `node` exports at `addr`, or an empty string.
fn metrics(rig: &Rig, node: usize, addr: SocketAddr) -> String {
    http_get(&rig.node_ns(node), addr, "/metrics")
        .map(|r| r.body)
        .unwrap_or_default()
}

/// The value of the metric line starting with `series` (name and labels), if present.
fn metric_value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// etcd's `/health` over a new connection from node `node`'s namespace.
fn etcd_reachable(rig: &Rig, node: usize) -> bool {
    let etcd: SocketAddr = ETCD_ENDPOINT.trim_start_matches("http://").parse().unwrap();
    http_get(&rig.node_ns(node), etcd, "/health")
        .is_ok_and(|r| r.body.contains("\"health\":\"true\""))
}

/// The same from a process inside the node's LB cgroup (what socket-level load balancing sees).
fn etcd_reachable_from_cgroup(rig: &Rig, node: usize, cgroup: &Path) -> bool {
    let url = format!("{ETCD_ENDPOINT}/health");
    twill_tests::rig::nsenter_in_cgroup(
        &rig.node_ns(node),
        cgroup,
        &["timeout", "5", "busybox", "wget", "-q", "-O-", &url],
    )
    .output()
    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("\"health\":\"true\""))
}

/// A Service whose external IP is etcd's address, on etcd's port, written to etcd by a client
/// that skips `twilld apply`'s check (by hand, here): no node programs that frontend, so every
/// node keeps reaching etcd; the refusal is counted and the Service's other frontends work.
/// `twilld apply` refuses the same Service outright.
#[test]
fn a_service_on_etcds_address_is_never_programmed() {
    if !require_root() {
        return;
    }
    for mode in ["nftables", "iptables", "ebpf"] {
        // Every external IP of the underlay is allowed: only etcd's address is refused.
        let (rig, facts) = proxy_node(mode, &["--allowed-external-ips", "198.18.0.0/16"]);
        let metrics_addr = metrics_addr();
        assert!(
            etcd_reachable(&rig, 1),
            "{mode}: etcd unreachable before the test"
        );
        // The endpoint: an address of the node's pod subnet nobody answers on.
        let dead = std::net::Ipv4Addr::from(u32::from(facts.subnet.unwrap().addr()) + 200);
        let service = |name: &str, cluster_ip: &str| {
            ServiceSpec::new(name, cluster_ip.parse().unwrap())
                .tcp("etcd", 2379, 2379)
                .endpoint(dead.into(), None)
        };
        let evil = service("evil", "10.96.0.66").external_ip("198.18.0.1".parse().unwrap());
        // apply refuses it, naming the frontend and why.
        let out = twilld(&rig, &["apply", "-f", "-"], Some(&evil.manifest()));
        assert!(!out.status.success(), "{mode}: apply took it");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("default/evil:etcd ExternalIP 198.18.0.1:2379/TCP: 198.18.0.1 is an etcd endpoint's address"),
            "{mode}: {err}"
        );
        assert!(keys(&rig).is_empty());
        // Written directly, as a hostile or old client would.
        rig.etcdctl(&[
            "put",
            &format!("{ETCD_PREFIX}/services/endpointslices/default/evil-1"),
            &evil.slice().to_string(),
        ])
        .unwrap();
        rig.etcdctl(&[
            "put",
            &format!("{ETCD_PREFIX}/services/services/default/evil"),
            &evil.service().to_string(),
        ])
        .unwrap();
        // The agent has seen it: its cluster IP is programmed, the external IP refused.
        let wide = || {
            ok(&twilld(
                &rig,
                &[
                    "get",
                    "services",
                    "--node-name",
                    "n1",
                    "-o",
                    "wide",
                    "--bpf-pin-dir",
                    &rig.pin_dir(1).display().to_string(),
                ],
                None,
            ))
        };
        wait_for(Duration::from_secs(15), || {
            let w = wide();
            w.lines()
                .any(|l| l.starts_with("10.96.0.66:2379/TCP") && l.contains("in sync"))
                .then_some(())
        })
        .unwrap_or_else(|e| panic!("{mode}: {e:#}: {}\n{}", wide(), rig.twilld_log(1)));
        let body = metrics(&rig, 1, metrics_addr);
        assert_eq!(
            metric_value(
                &body,
                "twill_services_refused_frontends{reason=\"etcd address\"}"
            ),
            Some(1.0),
            "{mode}: {body}"
        );
        assert!(
            rig.twilld_log(1)
                .contains("198.18.0.1 is an etcd endpoint's address"),
            "{mode}: the refusal is not logged"
        );
        // New connections to etcd from the node keep working.
        for _ in 0..5 {
            assert!(etcd_reachable(&rig, 1), "{mode}: the node lost etcd");
        }
        if mode == "ebpf" {
            let cg = rig.node_cgroup(1).unwrap();
            assert!(
                etcd_reachable_from_cgroup(&rig, 1, &cg),
                "{mode}: a balanced process lost etcd"
            );
        }
        // twilld's own writes and watch still reach etcd: a new Service is programmed.
        let good = service("good", "10.96.0.67").manifest();
        ok(&twilld(&rig, &["apply", "-f", "-"], Some(&good)));
        wait_for(Duration::from_secs(15), || {
            wide()
                .lines()
                .any(|l| l.starts_with("10.96.0.67:2379/TCP") && l.contains("in sync"))
                .then_some(())
        })
        .unwrap_or_else(|e| panic!("{mode}: {e:#}: {}\n{}", wide(), rig.twilld_log(1)));
        assert!(etcd_reachable(&rig, 1), "{mode}: the node lost etcd");
        // An object apply would refuse (a cluster IP of 0.0.0.0), written straight to etcd: the
        // agent treats it as absent, logs it once and counts it.
        let bad = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"zero","namespace":"default"},"spec":{"clusterIP":"0.0.0.0","ports":[{"port":80}]}}"#;
        rig.etcdctl(&[
            "put",
            &format!("{ETCD_PREFIX}/services/services/default/zero"),
            bad,
        ])
        .unwrap();
        wait_for(Duration::from_secs(15), || {
            (metric_value(
                &metrics(&rig, 1, metrics_addr),
                "twill_services_invalid_objects",
            ) == Some(1.0))
            .then_some(())
        })
        .unwrap_or_else(|e| panic!("{mode}: {e:#}\n{}", rig.twilld_log(1)));
        assert!(
            !wide().contains("0.0.0.0:80/TCP"),
            "{mode}: the invalid Service is programmed"
        );
        let log = rig.twilld_log(1);
        assert_eq!(
            log.matches("spec.clusterIP: 0.0.0.0 may not be unspecified")
                .count(),
            1,
            "{mode}: {log}"
        );
    }
}

/// A wiped etcd (the whole prefix deleted at once, the network config key with it) does not
/// flush the node's services: they keep answering across resyncs and re-lists. Once the config
/// key is written again, the empty store is a real deletion and the services go. With the
/// config key present, deleting services works as always.
#[test]
fn a_wiped_etcd_keeps_the_services_until_its_config_is_back() {
    if !require_root() {
        return;
    }
    let (rig, facts) = proxy_node("nftables", &["--resync-interval", "1"]);
    let metrics_addr = metrics_addr();
    let backend = rig.add_pod(1, &facts).unwrap();
    let client = rig.add_pod(1, &facts).unwrap();
    rig.start_responder(&backend, "b1", &[8080]).unwrap();
    let manifest = twill_tests::rig::service_manifest(
        "web",
        "10.96.0.10".parse().unwrap(),
        80,
        8080,
        None,
        &[(backend.ip().unwrap(), 1)],
    );
    let file = write(rig.temp_dir(), "web.yaml", &manifest);
    ok(&twilld(&rig, &["apply", "-f", &file], None));
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let answers = || http_get(&client.ns, vip, "/").is_ok_and(|r| r.body.trim() == "b1");
    wait_for(Duration::from_secs(15), || answers().then_some(()))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", rig.twilld_log(1)));
    let full_syncs = || {
        metric_value(
            &metrics(&rig, 1, metrics_addr),
            "twill_services_syncs_total{kind=\"full\",result=\"ok\"}",
        )
        .unwrap_or_default()
    };

    // The whole prefix goes in one deletion.
    rig.etcdctl(&["del", "--prefix", ETCD_PREFIX]).unwrap();
    // Two full resyncs later (the agent has seen the wipe and re-listed), the service answers.
    let before = full_syncs();
    wait_for(Duration::from_secs(15), || {
        (full_syncs() >= before + 2.0).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", rig.twilld_log(1)));
    for _ in 0..5 {
        assert!(
            answers(),
            "the service stopped answering after the wipe\n{}",
            rig.twilld_log(1)
        );
    }
    let body = metrics(&rig, 1, metrics_addr);
    assert_eq!(
        metric_value(&body, "twill_services_store_suspect"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        metric_value(&body, "twill_services_suspect_listings_total"),
        Some(1.0),
        "{body}"
    );
    assert!(
        rig.twilld_log(1)
            .contains("the network config key is absent"),
        "the held listing is not logged with its reason"
    );

    // The config key is back: the empty store is a deletion, acted on.
    rig.put_network_config(HOST_GW).unwrap();
    wait_for(Duration::from_secs(15), || {
        let body = metrics(&rig, 1, metrics_addr);
        (metric_value(&body, "twill_services_frontends") == Some(0.0)
            && metric_value(&body, "twill_services_store_suspect") == Some(0.0))
        .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", rig.twilld_log(1)));
    assert!(!answers(), "the deleted service still answers");

    // With the config key present, services come and go as applied and deleted.
    ok(&twilld(&rig, &["apply", "-f", &file], None));
    wait_for(Duration::from_secs(15), || answers().then_some(()))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", rig.twilld_log(1)));
    ok(&twilld(&rig, &["delete", "-f", &file], None));
    wait_for(Duration::from_secs(15), || {
        (metric_value(&metrics(&rig, 1, metrics_addr), "twill_services_frontends") == Some(0.0))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", rig.twilld_log(1)));
    assert!(!answers(), "the deleted service still answers");
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
    let Some(rig) = Rig::for_test(1, Some(HOST_GW)) else {
        return;
    };
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
        let rig = Rig::configured(1, HOST_GW);
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
