//! End-to-end tests of twill's DNS: the real twilld (its service source reading the rig's real
//! etcd) answers Service names to a pod on its node, at the pod bridge's gateway, and forwards
//! other names to an upstream resolver the test runs inside the rig.
//!
//! The pod's resolver is the test's own: a thread that joined the pod's namespace sends the
//! query bytes (hickory-proto builds and reads them) and applies a Kubernetes pod's search list,
//! so the test sees what a pod's libc would get, and never touches the machine's resolver.
//!
//! Privileged: as root they run; under CI a non-root run fails (see `require_root`).

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use nix::sys::signal::Signal;
use twill_tests::metrics::{sample, scrape};
use twill_tests::ns::join_netns;
use twill_tests::rig::ETCD_ENDPOINT;
use twill_tests::{Rig, exec, http_get, wait_for};

const HOST_GW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;

/// The search list of a pod in namespace `default` (what the kubelet writes).
const SEARCH: [&str; 3] = [
    "default.svc.cluster.local",
    "svc.cluster.local",
    "cluster.local",
];

/// The name the test's upstream answers, and its address.
const OUTSIDE_NAME: &str = "www.example.org.";
const OUTSIDE_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);

/// Where the test's upstream listens: the node's own rig address, another port.
fn upstream_addr() -> SocketAddr {
    (Rig::node_ip(1), 5300).into()
}

/// Where node 1's twilld serves `/metrics`.
fn metrics_addr() -> SocketAddr {
    (Rig::node_ip(1), 9615).into()
}

/// A DNS upstream in a namespace: answers `OUTSIDE_NAME` A with [`OUTSIDE_ADDR`], every other
/// name NXDOMAIN; counts the queries it got; stops when dropped.
struct Upstream {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    fn start(ns: &str, addr: SocketAddr) -> Result<Upstream> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let thread = std::thread::spawn({
            let (ns, stop) = (ns.to_string(), stop.clone());
            move || {
                let sock = (|| -> Result<UdpSocket> {
                    join_netns(&ns)?;
                    let s = UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}"))?;
                    s.set_read_timeout(Some(Duration::from_millis(20)))?;
                    Ok(s)
                })();
                let sock = match sock {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    let Ok(q) = Message::from_vec(&buf[..n]) else {
                        continue;
                    };
                    let mut r = Message::response(q.metadata.id, OpCode::Query);
                    r.metadata.recursion_desired = q.metadata.recursion_desired;
                    r.metadata.recursion_available = true;
                    r.add_queries(q.queries.iter().cloned());
                    match q.queries.first() {
                        Some(first)
                            if first.name().to_ascii().eq_ignore_ascii_case(OUTSIDE_NAME)
                                && first.query_type() == RecordType::A =>
                        {
                            r.add_answer(Record::from_rdata(
                                first.name().clone(),
                                60,
                                RData::A(A(OUTSIDE_ADDR)),
                            ));
                        }
                        _ => r.metadata.response_code = ResponseCode::NXDomain,
                    }
                    if let Ok(bytes) = r.to_vec() {
                        let _ = sock.send_to(&bytes, peer);
                    }
                }
            }
        });
        let up = Upstream {
            stop,
            thread: Some(thread),
        };
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("upstream not bound within 10 s")??;
        Ok(up)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One query from inside namespace `ns` to `server`: the reply (one attempt, 3 s to answer).
fn query(ns: &str, server: SocketAddr, name: &str, qtype: RecordType) -> Result<Message> {
    let name = Name::from_ascii(name).context("query name")?;
    twill_tests::in_netns(ns, || {
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        sock.set_read_timeout(Some(Duration::from_secs(3)))?;
        let id: u16 = rand_id();
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(name.clone(), qtype));
        sock.send_to(&m.to_vec()?, server)?;
        let mut buf = [0u8; 4096];
        loop {
            let (n, from) = sock.recv_from(&mut buf).context("no reply within 3 s")?;
            let r = Message::from_vec(&buf[..n])?;
            if from == server && r.metadata.id == id {
                return Ok(r);
            }
        }
    })
}

/// A query id that differs between calls.
fn rand_id() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    #[expect(clippy::cast_possible_truncation, reason = "any 16 bits will do")]
    let id = (nanos ^ (nanos >> 16)) as u16;
    id
}

/// What a pod's resolver does with `name` of fewer than 5 dots: each search domain in turn,
/// then the name as given; the first reply that is not NXDOMAIN.
fn resolve(ns: &str, server: SocketAddr, name: &str, qtype: RecordType) -> Result<Message> {
    let candidates = SEARCH
        .iter()
        .map(|d| format!("{name}.{d}."))
        .chain(std::iter::once(format!("{name}.")));
    let mut last = None;
    for c in candidates {
        let r = query(ns, server, &c, qtype)?;
        if r.metadata.response_code != ResponseCode::NXDomain {
            return Ok(r);
        }
        last = Some(r);
    }
    last.context("no candidate")
}

fn addresses(m: &Message) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

/// Runs `twilld ARGS --etcd-endpoints <rig etcd>` in node 1's namespace.
fn twilld(rig: &Rig, args: &[&str]) -> Output {
    let bin = rig.twilld_path().expect("twilld binary");
    let mut full: Vec<String> = vec![bin.display().to_string()];
    full.extend(args.iter().map(ToString::to_string));
    full.extend(["--etcd-endpoints".to_string(), ETCD_ENDPOINT.to_string()]);
    let out = exec(&rig.node_ns(1), &full).expect("run twilld");
    assert!(
        out.status.success(),
        "twilld {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn write(rig: &Rig, name: &str, text: &str) -> String {
    let p = rig.temp_dir().join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    p.display().to_string()
}

/// The pod bridge's gateway of node 1, whatever lease twilld got: started once without DNS to
/// learn it, then restarted (same node id, same lease) with `--dns-listen <gateway>`, before
/// any pod (and so before the address exists on the node).
fn rig_with_dns() -> Option<(Rig, twill_facts::SubnetFacts, SocketAddr)> {
    let rig = Rig::for_test(1, Some(HOST_GW))?;
    let mut args = rig.proxy_args(1, "nftables").unwrap();
    let argv = |extra: &[String]| -> Vec<String> { args.iter().chain(extra).cloned().collect() };
    let first = argv(&[]);
    rig.start_twilld(1, &first.iter().map(String::as_str).collect::<Vec<_>>())
        .unwrap();
    let facts = rig
        .wait_subnet_file(1, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", rig.twilld_log(1)));
    rig.kill_twilld(1, Signal::SIGTERM).unwrap();
    let gw = facts.subnet.expect("an IPv4 subnet").addr();
    let dns: SocketAddr = (gw, 53).into();
    args = argv(&[
        "--dns-listen".into(),
        gw.to_string(),
        "--dns-upstream".into(),
        upstream_addr().to_string(),
        "--metrics-addr".into(),
        metrics_addr().to_string(),
    ]);
    rig.start_twilld(1, &args.iter().map(String::as_str).collect::<Vec<_>>())
        .unwrap();
    let again = rig
        .wait_subnet_file(1, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", rig.twilld_log(1)));
    assert_eq!(again.subnet, facts.subnet, "the restart changed the lease");
    Some((rig, facts, dns))
}

/// A pod resolves a Service by its full name and by its short name through the search list,
/// reaches the VIP of the answer, reads the SRV record of the named port, gets the ready
/// endpoints of a headless Service, has other names forwarded to the upstream, and sees a
/// deleted Service's name gone within a second; `/metrics` counts each kind of answer.
#[test]
fn a_pod_resolves_services_at_its_node() {
    let Some((rig, facts, dns)) = rig_with_dns() else {
        return;
    };
    let _upstream = Upstream::start(&rig.node_ns(1), upstream_addr()).unwrap();
    let backend = rig.add_pod(1, &facts).unwrap();
    let client = rig.add_pod(1, &facts).unwrap();
    let other = rig.add_pod(1, &facts).unwrap();
    rig.start_responder(&backend, "b1", &[8080]).unwrap();
    let backend_ip = backend.ip().unwrap();
    let vip: IpAddr = "10.96.0.10".parse().unwrap();
    let web = twill_tests::rig::service_manifest("web", vip, 80, 8080, None, &[(backend_ip, 1)]);
    let web_file = write(&rig, "web.yaml", &web);
    let headless = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: db}}\nspec: {{clusterIP: None, ports: [{{name: pg, port: 5432}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: db-1, labels: {{kubernetes.io/service-name: db}}}}\naddressType: IPv4\n\
         endpoints:\n- addresses: [{backend_ip}]\n- addresses: [{}]\n- addresses: [10.244.250.9]\n  conditions: {{ready: false}}\n\
         ports: [{{name: pg, port: 5432}}]\n",
        other.ip().unwrap()
    );
    let db_file = write(&rig, "db.yaml", &headless);
    twilld(&rig, &["apply", "-f", &web_file]);
    twilld(&rig, &["apply", "-f", &db_file]);

    // The full name, once the zone has it (the server answers as soon as the pod bridge's
    // address exists, and the Service as soon as etcd's watch brings it).
    let full = "web.default.svc.cluster.local.";
    let m = wait_for(Duration::from_secs(20), || {
        query(&client.ns, dns, full, RecordType::A)
            .ok()
            .filter(|m| !m.answers.is_empty())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", rig.twilld_log(1)));
    assert_eq!(addresses(&m), [vip]);
    assert!(m.metadata.authoritative);
    assert!(m.answers.iter().all(|r| r.ttl <= 5), "{m:?}");
    // The short name, through the search list.
    let m = resolve(&client.ns, dns, "web", RecordType::A).unwrap();
    assert_eq!(addresses(&m), [vip]);
    // The answer leads to the service.
    let addr = SocketAddr::new(addresses(&m)[0], 80);
    let body = wait_for(Duration::from_secs(15), || {
        http_get(&client.ns, addr, "/").ok().map(|r| r.body)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", rig.twilld_log(1)));
    assert_eq!(body.trim(), "b1");

    // SRV of the named port.
    let m = query(
        &client.ns,
        dns,
        "_http._tcp.web.default.svc.cluster.local.",
        RecordType::SRV,
    )
    .unwrap();
    let srvs: Vec<(u16, String)> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some((s.port, s.target.to_ascii())),
            _ => None,
        })
        .collect();
    assert_eq!(srvs, [(80, full.to_string())]);

    // Headless: the ready endpoints' own addresses, not the not-ready one.
    let m = wait_for(Duration::from_secs(10), || {
        resolve(&client.ns, dns, "db", RecordType::A)
            .ok()
            .filter(|m| !m.answers.is_empty())
    })
    .unwrap();
    let mut want = vec![backend_ip, other.ip().unwrap()];
    want.sort();
    assert_eq!(addresses(&m), want);

    // Outside the cluster domain: forwarded to the upstream, its answer relayed.
    let m = query(&client.ns, dns, OUTSIDE_NAME, RecordType::A).unwrap();
    assert_eq!(addresses(&m), [IpAddr::V4(OUTSIDE_ADDR)]);
    let m = query(&client.ns, dns, "nope.example.org.", RecordType::A).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    // A deleted Service is gone within a second of the delete.
    twilld(&rig, &["delete", "-f", &web_file]);
    let deleted = Instant::now();
    wait_for(Duration::from_secs(1), || {
        query(&client.ns, dns, full, RecordType::A)
            .ok()
            .filter(|m| m.metadata.response_code == ResponseCode::NXDomain)
    })
    .unwrap_or_else(|e| {
        panic!(
            "still resolves {:?} after the delete: {e:#}\n{}",
            deleted.elapsed(),
            rig.twilld_log(1)
        )
    });
    eprintln!("NXDOMAIN {:?} after the delete returned", deleted.elapsed());
    // The short name falls through every search domain and the upstream: NXDOMAIN.
    let m = resolve(&client.ns, dns, "web", RecordType::A).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    let text = scrape(&rig.node_ns(1), metrics_addr());
    for result in ["answered", "nxdomain", "forwarded"] {
        let n = sample(
            &text,
            &format!("twill_dns_queries_total{{result=\"{result}\"}}"),
        );
        assert!(n.is_some_and(|n| n >= 1.0), "{result}: {n:?}\n{text}");
    }
    assert_eq!(
        sample(&text, "twill_dns_queries_total{result=\"failed\"}"),
        Some(0.0),
        "{text}"
    );
}

/// An upstream that does not answer gives the pod a SERVFAIL (not a hang), counted as failed;
/// names of the cluster domain are still answered.
#[test]
fn a_silent_upstream_is_a_servfail() {
    let Some((rig, facts, dns)) = rig_with_dns() else {
        return;
    };
    // No upstream runs at upstream_addr().
    let client = rig.add_pod(1, &facts).unwrap();
    let m = wait_for(Duration::from_secs(20), || {
        query(&client.ns, dns, "cluster.local.", RecordType::SOA).ok()
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", rig.twilld_log(1)));
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    // The upstream port is closed: an ICMP error ends the attempt at once, or the timeout does.
    let started = Instant::now();
    let m = wait_for(Duration::from_secs(10), || {
        query(&client.ns, dns, OUTSIDE_NAME, RecordType::A).ok()
    })
    .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(started.elapsed() < Duration::from_secs(5));
    let text = scrape(&rig.node_ns(1), metrics_addr());
    let failed = sample(&text, "twill_dns_queries_total{result=\"failed\"}");
    assert!(failed.is_some_and(|n| n >= 1.0), "{text}");
}
