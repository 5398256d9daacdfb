//! End-to-end tests of twilld as a daemon: what it serves where, and how it refuses to start.
//! Real etcd, real twilld in a node namespace of a netns rig; each test asserts what an operator
//! sees: the HTTP answers of its listeners, its exit status and its last log line.
//!
//! - `--healthz-port` serves `/healthz` only (flannel's); `/metrics` only on `--metrics-addr`,
//!   which takes a bare port meaning loopback.
//! - Bad etcd flags and TLS files, and health or metrics addresses that cannot be bound, stop
//!   twilld at once with the reason (not a retry loop, not a node without its endpoints); the
//!   same flags are checked by `twilld apply/get/delete`.
//! - TLS flags that are right work: twilld and `twilld get` talk to an etcd that requires client
//!   certificates.
//! - Its log carries no ANSI colour codes when it is not on a terminal.
//!
//! Privileged: as root they run; under CI a non-root run fails (see `require_root`).

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use twill_tests::bench_support::output_within;
use twill_tests::ns::in_netns;
use twill_tests::{Rig, RigOptions, http_get, nsenter, require_root, wait_until};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const UP: Duration = Duration::from_secs(20);
/// How soon a twilld refusing its flags must be gone (a debug build on a loaded machine; the
/// refusal itself takes milliseconds).
const PROMPT: Duration = Duration::from_secs(10);

/// Starts twilld on `node` with `args`, expects it to exit on its own within [`PROMPT`]; its
/// exit status, how long it ran and what it logged in this run.
fn start_expecting_exit(rig: &Rig, node: usize, args: &[&str]) -> (ExitStatus, Duration, String) {
    let before = rig.twilld_log(node).len();
    let start = Instant::now();
    rig.start_twilld(node, args).unwrap();
    let exited = wait_until(PROMPT, || !rig.twilld_running(node));
    let took = start.elapsed();
    let status = rig.kill_twilld(node, Signal::SIGKILL).unwrap();
    let log = rig.twilld_log(node)[before..].to_string();
    assert!(
        exited.is_ok(),
        "twilld {args:?} still ran after {PROMPT:?}; its log:\n{log}"
    );
    (status, took, log)
}

/// The last line twilld logged (its reason for stopping).
fn last_line(log: &str) -> &str {
    log.lines().last().unwrap_or_default()
}

/// A loopback port taken in `ns`, held for as long as the listener lives.
fn taken_port(ns: &str) -> TcpListener {
    in_netns(ns, || Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?)).unwrap()
}

#[test]
fn healthz_port_serves_healthz_only_and_metrics_stay_on_loopback() {
    let Some(rig) = Rig::for_test(1, None) else {
        return;
    };
    let ns = rig.node_ns(1);
    let node = SocketAddr::from((Rig::node_ip(1), 9616));
    let loopback_metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, 9615));
    // No network config yet: twilld waits for one, not ready.
    rig.start_twilld(1, &["--healthz-port", "9616", "--metrics-addr", "9615"])
        .unwrap();
    let health = twill_tests::wait_for(UP, || http_get(&ns, node, "/healthz").ok())
        .unwrap_or_else(|e| panic!("no /healthz on {node}: {e:#}\n{}", rig.twilld_log(1)));
    assert_eq!(health.status, 503, "{}", health.body);
    assert!(health.body.starts_with("not ready: "), "{}", health.body);
    // The healthz listener (every address of the node) has nothing else.
    for path in ["/metrics", "/livez", "/"] {
        let r = http_get(&ns, node, path).unwrap();
        assert_eq!(r.status, 404, "{path} on the healthz port: {}", r.body);
    }
    // A bare --metrics-addr port is loopback: scraped there, not reachable from the underlay.
    let m = http_get(&ns, loopback_metrics, "/metrics").unwrap();
    assert_eq!(m.status, 200, "{}", m.body);
    assert!(m.body.contains("twill_up 0\n"), "{}", m.body);
    assert!(
        m.body
            .contains("twill_last_error_info{operation=\"overlay\",error=\"read network config: "),
        "{}",
        m.body
    );
    let from_underlay = SocketAddr::from((Rig::node_ip(1), 9615));
    let reached = in_netns(&rig.underlay_ns(), || {
        Ok(TcpStream::connect_timeout(&from_underlay, Duration::from_secs(2)).is_ok())
    })
    .unwrap();
    assert!(!reached, "/metrics answered on {from_underlay}");

    // With a config the node becomes ready; the error that kept it waiting is no longer current.
    rig.put_network_config(VXLAN).unwrap();
    wait_until(UP, || {
        http_get(&ns, node, "/healthz").is_ok_and(|r| r.status == 200)
    })
    .unwrap_or_else(|e| panic!("never ready: {e:#}\n{}", rig.twilld_log(1)));
    assert_eq!(http_get(&ns, node, "/healthz").unwrap().body, "ok\n");
    assert_eq!(http_get(&ns, node, "/metrics").unwrap().status, 404);
    let m = http_get(&ns, loopback_metrics, "/metrics").unwrap();
    assert!(m.body.contains("twill_up 1\n"), "{}", m.body);
    assert!(!m.body.contains("twill_last_error_info{"), "{}", m.body);
    assert!(
        m.body
            .contains("twill_errors_total{operation=\"overlay\"} "),
        "{}",
        m.body
    );
    assert_eq!(
        http_get(&ns, loopback_metrics, "/healthz").unwrap().status,
        200
    );
    // Not on a terminal: no colour codes in the log.
    let log = rig.twilld_log(1);
    assert!(log.contains("serving /healthz"), "{log}");
    assert!(!log.contains('\u{1b}'), "ANSI escapes in the log:\n{log:?}");
}

#[test]
fn an_address_that_cannot_be_bound_stops_twilld_at_start() {
    let Some(rig) = Rig::for_test(1, Some(VXLAN)) else {
        return;
    };
    let held = taken_port(&rig.node_ns(1));
    let port = held.local_addr().unwrap().port().to_string();
    let taken = format!("127.0.0.1:{port}");
    let cases: [(&[&str], &str); 3] = [
        (
            &["--metrics-addr", &taken],
            "bind /metrics on 127.0.0.1:{port} (--metrics-addr): Address already in use (os error 98)",
        ),
        (
            &["--healthz-ip", "127.0.0.1", "--healthz-port", &port],
            "bind /healthz on 127.0.0.1:{port} (--healthz-ip, --healthz-port): Address already in use (os error 98)",
        ),
        (
            &["--healthz-ip", "203.0.113.9", "--healthz-port", "9616"],
            "bind /healthz on 203.0.113.9:9616 (--healthz-ip, --healthz-port): Cannot assign requested address (os error 99)",
        ),
    ];
    for (args, reason) in cases {
        let reason = reason.replace("{port}", &port);
        let (status, took, log) = start_expecting_exit(&rig, 1, args);
        assert_eq!(status.code(), Some(1), "{args:?}: {status}\n{log}");
        assert!(
            last_line(&log).ends_with(&format!("twilld stopped: {reason}")),
            "{args:?} after {took:?}:\n{log}"
        );
        // Before anything else: no lease taken, no subnet file written.
        assert!(!rig.subnet_file(1).exists(), "{args:?}:\n{log}");
        assert!(!log.contains('\u{1b}'), "ANSI escapes in the log:\n{log:?}");
    }
    assert_eq!(
        rig.etcdctl(&[
            "get",
            "--prefix",
            "--keys-only",
            "/coreos.com/network/subnets/"
        ])
        .unwrap()
        .trim(),
        ""
    );
    drop(held);
}

/// PEM files for the TLS tests: a CA, a server certificate for the rig's etcd address, a client
/// certificate, and some wrong files.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let p = |f: &str| dir.join(f).display().to_string();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["openssl", "req", "-x509"];
        ca.extend(ec);
        let (ca_key, ca_pem) = (p("ca.key"), p("ca.pem"));
        ca.extend([
            "-keyout",
            &ca_key,
            "-out",
            &ca_pem,
            "-days",
            "2",
            "-subj",
            "/CN=twill test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(&ca);
        for (name, cn, ext) in [
            (
                "server",
                "etcd",
                "subjectAltName=IP:198.18.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n",
            ),
            (
                "client",
                "twilld",
                "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n",
            ),
        ] {
            let (key, csr, pem, extfile) = (
                p(&format!("{name}.key")),
                p(&format!("{name}.csr")),
                p(&format!("{name}.pem")),
                p(&format!("{name}.ext")),
            );
            std::fs::write(&extfile, ext).unwrap();
            let subj = format!("/CN={cn}");
            let mut req = vec!["openssl", "req"];
            req.extend(ec);
            req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(&req);
            openssl(&[
                "openssl",
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_pem,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &extfile,
            ]);
        }
        std::fs::write(dir.join("junk.pem"), "this is no PEM file\n").unwrap();
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, f: &str) -> String {
        self.dir.join(f).display().to_string()
    }
}

/// Runs an `openssl` command line; panics with its stderr unless it succeeds.
fn openssl(args: &[&str]) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", args[0]));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A manifest with one Service, for `twilld apply/delete -f`.
const WEB: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
";

/// A one-node rig without its etcd (the test starts its own, or none), and a PKI in its
/// temporary directory.
fn rig_without_etcd() -> (Rig, Pki) {
    let rig = Rig::with_options(RigOptions {
        nodes: 1,
        etcd: false,
        ..RigOptions::default()
    })
    .expect("rig");
    let pki = Pki::new(&rig.temp_dir().join("pki"));
    (rig, pki)
}

#[test]
fn bad_etcd_flags_stop_twilld_and_the_service_commands_at_once() {
    if !require_root() {
        return;
    }
    let (rig, pki) = rig_without_etcd();
    let (ca, cert, key, junk) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key"),
        pki.path("junk.pem"),
    );
    let missing = pki.path("missing.pem");
    let https = "https://198.18.0.1:2379";
    let http = "http://198.18.0.1:2379";
    let (dir, both) = (pki.dir.display().to_string(), format!("{http},{https}"));
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["--etcd-endpoints", https, "--etcd-keyfile", &key],
            "--etcd-keyfile is given without --etcd-certfile".into(),
        ),
        (
            vec!["--etcd-endpoints", https, "--etcd-certfile", &cert],
            "--etcd-certfile is given without --etcd-keyfile".into(),
        ),
        (
            vec!["--etcd-endpoints", https, "--etcd-cafile", &missing],
            format!("read --etcd-cafile {missing}: No such file or directory (os error 2)"),
        ),
        (
            vec![
                "--etcd-endpoints",
                https,
                "--etcd-certfile",
                &cert,
                "--etcd-keyfile",
                &dir,
            ],
            format!(
                "read --etcd-keyfile {}: Is a directory (os error 21)",
                pki.dir.display()
            ),
        ),
        (
            vec!["--etcd-endpoints", https, "--etcd-cafile", &junk],
            format!("--etcd-cafile {junk}: no PEM certificate in it"),
        ),
        (
            vec!["--etcd-endpoints", "198.18.0.1:2379"],
            "etcd endpoint \"198.18.0.1:2379\" is not an http:// or https:// URL: no scheme".into(),
        ),
        (
            vec!["--etcd-endpoints", "http://198.18.0.1:23790000"],
            "etcd endpoint \"http://198.18.0.1:23790000\" is not an http:// or https:// URL".into(),
        ),
        (
            vec!["--etcd-endpoints", http, "--etcd-cafile", &ca],
            format!("--etcd-cafile given, but etcd endpoint {http} is plain http"),
        ),
        (
            vec!["--etcd-endpoints", &both],
            format!("etcd endpoints mix http ({http}) and https ({https})"),
        ),
    ];
    let manifest = pki.dir.join("web.yaml");
    std::fs::write(&manifest, WEB).unwrap();
    let manifest = manifest.display().to_string();
    let pins = rig.pin_dir(1).display().to_string();
    let twilld = rig.twilld_path().unwrap().display().to_string();
    for (args, reason) in &cases {
        // The agent.
        let (status, took, log) = start_expecting_exit(&rig, 1, args);
        assert_eq!(status.code(), Some(1), "{args:?}: {status}\n{log}");
        assert!(
            last_line(&log).contains(&format!(
                "twilld stopped: refusing the etcd flags: {reason}"
            )),
            "{args:?} after {took:?}:\n{log}"
        );
        assert!(!log.contains("retrying"), "{args:?}:\n{log}");
        // The service commands.
        for sub in [
            ["get", "services", "--bpf-pin-dir", pins.as_str()],
            [
                "delete",
                "-f",
                manifest.as_str(),
                "--etcd-prefix=/coreos.com/network",
            ],
        ] {
            let mut argv = vec![twilld.as_str()];
            argv.extend(sub);
            argv.extend(args);
            let out = output_within(nsenter(&rig.node_ns(1), &argv), PROMPT, "twilld").unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{argv:?}: {stderr}");
            assert!(
                stderr.starts_with(&format!("error: refusing the etcd flags: {reason}")),
                "{argv:?}: {stderr}"
            );
        }
    }
}

/// An etcd in the rig's underlay that speaks TLS only and requires client certificates; killed
/// on drop (and by the rig's teardown, as everything in its namespaces).
struct TlsEtcd {
    child: Child,
    ns: String,
}

impl TlsEtcd {
    const ENDPOINT: &str = "https://198.18.0.1:2391";

    fn start(rig: &Rig, pki: &Pki) -> TlsEtcd {
        let data = rig.temp_dir().join("etcd-tls");
        let log = std::fs::File::create(rig.temp_dir().join("etcd-tls.log")).unwrap();
        let peer = "http://198.18.0.1:2392";
        let args = [
            "etcd".to_string(),
            "--name=tls".into(),
            format!("--data-dir={}", data.display()),
            format!("--listen-client-urls={}", Self::ENDPOINT),
            format!("--advertise-client-urls={}", Self::ENDPOINT),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=tls={peer}"),
            format!("--initial-cluster-token={}-tls", rig.id()),
            format!("--cert-file={}", pki.path("server.pem")),
            format!("--key-file={}", pki.path("server.key")),
            format!("--trusted-ca-file={}", pki.path("ca.pem")),
            "--client-cert-auth".into(),
        ];
        let mut cmd = nsenter(&rig.underlay_ns(), &args);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCD") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        let etcd = TlsEtcd {
            child,
            ns: rig.underlay_ns(),
        };
        wait_until(UP, || etcd.ctl(pki, &["endpoint", "health"]).is_some()).unwrap_or_else(|e| {
            panic!(
                "TLS etcd not healthy: {e:#}\n{}",
                std::fs::read_to_string(rig.temp_dir().join("etcd-tls.log")).unwrap_or_default()
            )
        });
        etcd
    }

    /// `etcdctl` against it with the client certificate, in the underlay; stdout on success.
    fn ctl(&self, pki: &Pki, args: &[&str]) -> Option<String> {
        let flags = [
            format!("--endpoints={}", Self::ENDPOINT),
            format!("--cacert={}", pki.path("ca.pem")),
            format!("--cert={}", pki.path("client.pem")),
            format!("--key={}", pki.path("client.key")),
            "--dial-timeout=2s".to_string(),
        ];
        let mut argv: Vec<&str> = vec!["etcdctl"];
        argv.extend(flags.iter().map(String::as_str));
        argv.extend(args);
        let mut cmd = nsenter(&self.ns, &argv);
        cmd.env("ETCDCTL_API", "3");
        let out = output_within(cmd, Duration::from_secs(10), "etcdctl").ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for TlsEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn twilld_and_the_service_commands_speak_mtls_to_etcd() {
    if !require_root() {
        return;
    }
    let (rig, pki) = rig_without_etcd();
    let etcd = TlsEtcd::start(&rig, &pki);
    etcd.ctl(&pki, &["put", "/coreos.com/network/config", VXLAN])
        .expect("put the network config over TLS");
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key"),
    );
    let tls = [
        "--etcd-endpoints",
        TlsEtcd::ENDPOINT,
        "--etcd-cafile",
        &ca,
        "--etcd-certfile",
        &cert,
        "--etcd-keyfile",
        &key,
    ];
    // The agent leases a subnet over mTLS.
    rig.start_twilld(1, &tls).unwrap();
    let facts = rig
        .wait_subnet_file(1, UP)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", rig.twilld_log(1)));
    let subnet = facts.subnet_v4().expect("an IPv4 subnet");
    let keys = etcd
        .ctl(
            &pki,
            &[
                "get",
                "--prefix",
                "--keys-only",
                "/coreos.com/network/subnets/",
            ],
        )
        .unwrap();
    let key_of = format!("{}-{}", subnet.network(), subnet.prefix_len());
    assert!(keys.contains(&key_of), "{key_of} not in {keys}");

    // The service commands too.
    let manifest = pki.dir.join("web.yaml");
    std::fs::write(&manifest, WEB).unwrap();
    let (twilld, manifest, pins) = (
        rig.twilld_path().unwrap().display().to_string(),
        manifest.display().to_string(),
        rig.pin_dir(1).display().to_string(),
    );
    let cli = |sub: &[&str]| {
        let mut argv = vec![twilld.as_str()];
        argv.extend(sub);
        argv.extend(tls);
        let out = output_within(nsenter(&rig.node_ns(1), &argv), UP, "twilld").unwrap();
        assert!(
            out.status.success(),
            "{argv:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    cli(&["apply", "-f", &manifest]);
    let listing = cli(&["get", "services", "--bpf-pin-dir", &pins]);
    assert!(
        listing.contains("shop") && listing.contains("web"),
        "{listing}"
    );
    assert!(
        etcd.ctl(
            &pki,
            &[
                "get",
                "--keys-only",
                "--prefix",
                "/coreos.com/network/services/"
            ]
        )
        .unwrap()
        .contains("/services/services/shop/web"),
    );
    cli(&["delete", "-f", &manifest]);
    assert!(rig.twilld_running(1), "{}", rig.twilld_log(1));
}
