//! Privileged end-to-end tests: the built `twill-cni` binary executed exactly as a runtime
//! executes it (CNI_* environment, config on stdin, result or error JSON on stdout).
//!
//! Each test builds its own little node on twill-tests' namespace guard: a node namespace in
//! which the plugin runs (through `nsenter --net=`, as a runtime on that node would run it), a
//! subnet file and an IPAM directory in the guard's temporary directory, and pod namespaces. All
//! traffic stays inside those namespaces. The guard names them uniquely and deletes everything
//! it made when dropped, pass or fail; deleting the node namespace takes the bridge and the host
//! veths with it.
//!
//! Needs root (netns, veth, bridge). Without root the tests print why and pass as skipped —
//! unless `CI=true`, where a skip is a failure (twill-tests' `require_root`).

use std::collections::HashSet;
use std::fs::File;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use twill_tests::traffic::udp_round_trip;
use twill_tests::{NetnsGuard, require_root, require_tools};

const BIN: &str = env!("CARGO_BIN_EXE_twill-cni");
const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The reference plugins (Debian's containernetworking-plugins) used as delegate and chain peers.
fn reference_plugins() -> bool {
    require_tools(&["/usr/lib/cni/host-local", "/usr/lib/cni/portmap"])
}

/// `args` run in namespace `netns`: stdout, or a panic naming the command, with its stderr.
fn run_in(netns: &str, args: &[&str]) -> String {
    twill_tests::run(netns, args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// `ip ARGS...` in namespace `netns`, stdout.
fn ip_in(netns: &str, args: &[&str]) -> String {
    let ip: Vec<&str> = std::iter::once("ip").chain(args.iter().copied()).collect();
    run_in(netns, &ip)
}

/// What one plugin invocation returned.
#[derive(Debug)]
struct Reply {
    ok: bool,
    json: Value,
    stdout: String,
    stderr: String,
}

impl From<Output> for Reply {
    /// The exit status, stdout (and the JSON in it, or `null`) and stderr of a plugin run.
    fn from(out: Output) -> Self {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        Reply {
            ok: out.status.success(),
            json: serde_json::from_str(&stdout).unwrap_or(Value::Null),
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Reply {
    fn code(&self) -> u64 {
        self.json["code"].as_u64().unwrap_or(0)
    }

    fn msg(&self) -> &str {
        self.json["msg"].as_str().unwrap_or("")
    }

    fn expect_ok(self, what: &str) -> Self {
        assert!(self.ok, "{what} failed: {} {}", self.stdout, self.stderr);
        self
    }

    fn expect_err(self, code: u64, what: &str) -> Self {
        assert!(!self.ok, "{what} unexpectedly succeeded: {}", self.stdout);
        assert_eq!(self.code(), code, "{what}: {}", self.stdout);
        for k in ["cniVersion", "code", "msg"] {
            assert!(
                self.json.get(k).is_some(),
                "{what}: error JSON lacks {k}: {}",
                self.stdout
            );
        }
        self
    }

    fn ip(&self) -> IpAddr {
        let a = self.json["ips"][0]["address"].as_str().expect("no address");
        a.split('/').next().unwrap().parse().unwrap()
    }
}

/// One node with its pods; everything it made is deleted on drop.
struct Rig {
    node: String,
    pods: Vec<String>,
    dir: PathBuf,
    third: usize,
    guard: NetnsGuard,
}

impl Rig {
    fn new() -> Option<Rig> {
        if !require_root() {
            return None;
        }
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let guard = NetnsGuard::new().expect("namespace guard");
        let rig = Rig {
            node: guard.netns("n").expect("node namespace"),
            pods: Vec::new(),
            dir: guard.temp_dir().to_path_buf(),
            third: 10 + n,
            guard,
        };
        rig.write_subnet(&format!(
            "FLANNEL_NETWORK=10.99.0.0/16\nFLANNEL_SUBNET=10.99.{}.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
            rig.third
        ));
        Some(rig)
    }

    /// [`Rig::new`] for a test that also needs the reference plugins (`None`: skip it).
    fn with_reference_plugins() -> Option<Rig> {
        Rig::new().filter(|_| reference_plugins())
    }

    fn write_subnet(&self, text: &str) {
        File::create(self.subnet_file())
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }

    fn subnet_file(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("ipam")
    }

    fn gateway(&self) -> String {
        format!("10.99.{}.1", self.third)
    }

    fn pod(&mut self) -> String {
        let name = self
            .guard
            .netns(&format!("p{}", self.pods.len()))
            .expect("pod namespace");
        self.pods.push(name.clone());
        name
    }

    fn netns_path(name: &str) -> String {
        format!("/run/netns/{name}")
    }

    /// The base config, with `extra` merged in (a `null` value removes a key).
    fn conf(&self, version: &str, extra: &Value) -> Value {
        let mut c = json!({
            "cniVersion": version,
            "name": "twtest",
            "type": "twill-cni",
            "subnetFile": self.subnet_file(),
            "dataDir": self.data_dir(),
            "logFile": self.dir.join("twill-cni.log"),
        });
        if let Value::Object(m) = extra {
            for (k, v) in m {
                if v.is_null() {
                    c.as_object_mut().unwrap().remove(k);
                } else {
                    c[k] = v.clone();
                }
            }
        }
        c
    }

    /// `binary` (a CNI plugin) run inside the node namespace as a runtime runs it: only `env`
    /// and a `PATH` in its environment, stdin, stdout and stderr piped.
    fn plugin_command(&self, binary: &str, env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", Self::netns_path(&self.node)))
            .arg(binary)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs plugin `binary` ([`Rig::plugin_command`]) with `stdin`, and returns its answer.
    fn exec(&self, binary: &str, env: &[(&str, &str)], stdin: &[u8]) -> Reply {
        let mut child = self
            .plugin_command(binary, env)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn nsenter {binary}: {e}"));
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        Reply::from(child.wait_with_output().unwrap())
    }

    /// Runs the plugin inside the node namespace with a runtime's environment.
    fn invoke(&self, env: &[(&str, &str)], stdin: &[u8]) -> Reply {
        self.exec(BIN, env, stdin)
    }

    /// [`Rig::invoke`] for calls that could hang or eat memory if the plugin misbehaved: the
    /// plugin runs with a 512 MiB address-space limit and is killed after `deadline`, which
    /// fails the test instead of hanging it.
    fn invoke_bounded(&self, env: &[(&str, &str)], stdin: &[u8], deadline: Duration) -> Reply {
        use std::os::unix::process::CommandExt as _;
        let mut cmd = self.plugin_command(BIN, env);
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: 512 << 20,
                    rlim_max: 512 << 20,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &raw const limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let mut child = cmd.spawn().expect("spawn nsenter twill-cni");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let Ok(out) = rx.recv_timeout(deadline) else {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            panic!("twill-cni did not answer within {deadline:?}");
        };
        Reply::from(out.unwrap())
    }

    /// Nothing of this network on the node: no bridge, no twill veth, no IPAM state directory.
    fn assert_untouched(&self, what: &str) {
        let links = ip_in(&self.node, &["-o", "link", "show"]);
        assert!(
            !links.contains("cni0"),
            "{what}: a bridge was created: {links}"
        );
        assert!(
            self.host_veths().is_empty(),
            "{what}: {:?}",
            self.host_veths()
        );
        assert!(
            !self.data_dir().exists(),
            "{what}: {} was created",
            self.data_dir().display()
        );
    }

    fn cni(&self, command: &str, id: &str, pod: &str, conf: &Value) -> Reply {
        self.cni_if(command, id, pod, "eth0", conf)
    }

    fn cni_if(&self, command: &str, id: &str, pod: &str, ifname: &str, conf: &Value) -> Reply {
        let netns = if pod.is_empty() {
            String::new()
        } else {
            Self::netns_path(pod)
        };
        self.invoke(
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", id),
                ("CNI_NETNS", &netns),
                ("CNI_IFNAME", ifname),
                ("CNI_PATH", "/usr/lib/cni"),
                (
                    "CNI_ARGS",
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p",
                ),
            ],
            conf.to_string().as_bytes(),
        )
    }

    fn leases(&self) -> Vec<IpAddr> {
        let Ok(rd) = std::fs::read_dir(self.data_dir().join("twtest")) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// The node's NAT rules (`iptables-save -t nat`).
    fn nat_rules(&self) -> String {
        run_in(&self.node, &["iptables-save", "-t", "nat"])
    }

    /// Names of the twill veths in the node namespace.
    fn host_veths(&self) -> Vec<String> {
        ip_in(&self.node, &["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap().to_string())
            .filter(|n| n.starts_with("tw"))
            .collect()
    }
}

/// A UDP round trip from `from` (a pod namespace) to `to_ip` in pod `to`: proves pod-to-pod
/// reachability without depending on `ping`.
fn udp_reachable(from: &str, to: &str, to_ip: IpAddr) -> bool {
    udp_round_trip(from, to, to_ip).unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn version_reports_supported_versions() {
    let Some(rig) = Rig::new() else { return };
    let r = rig
        .invoke(&[("CNI_COMMAND", "VERSION")], br#"{"cniVersion":"0.4.0"}"#)
        .expect_ok("VERSION");
    assert_eq!(r.json["cniVersion"], "1.1.0");
    let got: Vec<&str> = r.json["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(got, VERSIONS);
}

#[test]
fn every_command_in_every_version() {
    let Some(mut rig) = Rig::new() else { return };
    for (i, v) in VERSIONS.iter().enumerate() {
        let pod = rig.pod();
        let id = format!("ver{i}");
        let conf = rig.conf(v, &json!({}));
        let r = rig
            .cni("ADD", &id, &pod, &conf)
            .expect_ok(&format!("ADD {v}"));
        let j = &r.json;
        assert_eq!(j["cniVersion"], *v);
        let ifs = j["interfaces"].as_array().unwrap();
        assert_eq!(ifs.len(), 2, "{j}");
        for i in ifs {
            assert_eq!(
                i["mac"].as_str().unwrap().len(),
                17,
                "every interface has a MAC: {j}"
            );
        }
        assert!(ifs[0].get("sandbox").is_none());
        assert_eq!(ifs[1]["name"], "eth0");
        assert_eq!(ifs[1]["sandbox"], Rig::netns_path(&pod));
        let ip0 = &j["ips"][0];
        assert_eq!(ip0["interface"], 1);
        assert_eq!(ip0["gateway"], rig.gateway());
        assert!(ip0["address"].as_str().unwrap().ends_with("/24"));
        if v.starts_with("0.") {
            assert_eq!(ip0["version"], "4", "{v} results tag IPs: {j}");
            assert!(ifs[1].get("mtu").is_none());
        } else {
            assert!(
                ip0.get("version").is_none(),
                "{v} results have no ips[].version: {j}"
            );
        }
        if *v == "1.1.0" {
            assert_eq!(ifs[1]["mtu"], 1450);
        }
        assert_eq!(j["routes"][0]["dst"], "0.0.0.0/0");
        // The pod end is configured as the result says.
        let addr = ip_in(&pod, &["-o", "addr", "show", "eth0"]);
        assert!(addr.contains(ip0["address"].as_str().unwrap()), "{addr}");
        assert!(ip_in(&pod, &["link", "show", "eth0"]).contains("mtu 1450"));
        let routes = ip_in(&pod, &["route"]);
        assert!(
            routes.contains(&format!("default via {}", rig.gateway())),
            "{routes}"
        );

        let mut check = conf.clone();
        check["prevResult"] = j.clone();
        let c = rig.cni("CHECK", &id, &pod, &check);
        if v.starts_with("0.3") {
            c.expect_err(1, &format!("CHECK {v}"));
        } else {
            c.expect_ok(&format!("CHECK {v}"));
        }
        let st = rig.invoke(&[("CNI_COMMAND", "STATUS")], conf.to_string().as_bytes());
        let mut gc = conf.clone();
        gc["cni.dev/valid-attachments"] = json!([{"containerID": id, "ifname": "eth0"}]);
        let g = rig.invoke(
            &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/usr/lib/cni")],
            gc.to_string().as_bytes(),
        );
        if *v == "1.1.0" {
            st.expect_ok("STATUS 1.1.0");
            g.expect_ok("GC 1.1.0");
            assert_eq!(rig.leases().len(), 1, "GC kept the valid attachment");
        } else {
            st.expect_err(1, &format!("STATUS {v}"));
            g.expect_err(1, &format!("GC {v}"));
        }
        rig.cni("DEL", &id, &pod, &conf)
            .expect_ok(&format!("DEL {v}"));
        rig.cni("DEL", &id, &pod, &conf)
            .expect_ok(&format!("second DEL {v}"));
        assert!(rig.leases().is_empty(), "{v}: {:?}", rig.leases());
        assert!(rig.host_veths().is_empty(), "{v}: {:?}", rig.host_veths());
        assert!(!ip_in(&pod, &["link"]).contains("eth0"));
    }
}

#[test]
fn repeated_add_returns_the_same_address() {
    let Some(mut rig) = Rig::new() else { return };
    let pod = rig.pod();
    let conf = rig.conf("0.4.0", &json!({}));
    let first = rig.cni("ADD", "same", &pod, &conf).expect_ok("ADD");
    let second = rig.cni("ADD", "same", &pod, &conf).expect_ok("second ADD");
    assert_eq!(first.ip(), second.ip());
    assert_eq!(first.json["interfaces"], second.json["interfaces"]);
    assert_eq!(rig.leases(), vec![first.ip()]);
    assert_eq!(rig.host_veths().len(), 1);
    // A requested address (podman --ip: runtimeConfig.ips) for another container.
    let pod2 = rig.pod();
    let want = format!("10.99.{}.77", rig.third);
    let mut asked = conf.clone();
    asked["runtimeConfig"] = json!({"ips": [format!("{want}/24")]});
    let asked_reply = rig
        .cni("ADD", "asked", &pod2, &asked)
        .expect_ok("ADD with runtimeConfig.ips");
    assert_eq!(asked_reply.ip().to_string(), want);
    let taken = rig.cni("ADD", "asked2", &pod2, &asked);
    assert_eq!(
        taken.code(),
        102,
        "an address held by another container: {}",
        taken.stdout
    );
    rig.cni("DEL", "asked", &pod2, &conf).expect_ok("DEL asked");
    // A second interface of the same container gets its own address.
    let net1 = rig
        .cni_if("ADD", "same", &pod, "net1", &conf)
        .expect_ok("ADD net1");
    assert_ne!(net1.ip(), first.ip());
    rig.cni_if("DEL", "same", &pod, "net1", &conf)
        .expect_ok("DEL net1");
    assert_eq!(
        rig.leases(),
        vec![first.ip()],
        "DEL net1 must not release eth0's address"
    );
    rig.cni("DEL", "same", &pod, &conf).expect_ok("DEL");
}

#[test]
fn del_succeeds_when_things_are_gone() {
    let Some(mut rig) = Rig::new() else { return };
    let pod = rig.pod();
    let conf = rig.conf("1.0.0", &json!({}));
    rig.cni("ADD", "gone", &pod, &conf).expect_ok("ADD");
    rig.guard
        .delete_netns(&pod)
        .expect("delete the pod namespace");
    // The netns is gone: with its path, and with CNI_NETNS empty as runtimes may send.
    rig.cni("DEL", "gone", &pod, &conf)
        .expect_ok("DEL after netns removed");
    rig.cni("DEL", "gone", "", &conf)
        .expect_ok("DEL without CNI_NETNS");
    assert!(rig.leases().is_empty());
    assert!(rig.host_veths().is_empty());
    // Never added at all, and no IPAM directory yet.
    rig.cni("DEL", "never", "", &conf)
        .expect_ok("DEL of unknown container");
    // Without a subnet file (twilld down) DEL still works.
    std::fs::remove_file(rig.subnet_file()).unwrap();
    rig.cni("DEL", "never", "", &conf)
        .expect_ok("DEL without subnet file");
}

#[test]
fn hundred_concurrent_adds_get_distinct_addresses() {
    let Some(mut rig) = Rig::new() else { return };
    let pods: Vec<String> = (0..100).map(|_| rig.pod()).collect();
    let conf = rig.conf("0.4.0", &json!({}));
    let rig_ref = &rig;
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let conf = &conf;
                s.spawn(move || rig_ref.cni("ADD", &format!("c{i}"), pod, conf))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ips = HashSet::new();
    for r in replies {
        let r = r.expect_ok("concurrent ADD");
        assert!(ips.insert(r.ip()), "address handed out twice: {}", r.ip());
    }
    assert_eq!(ips.len(), 100);
    assert_eq!(rig.leases().len(), 100);
    assert_eq!(rig.host_veths().len(), 100);
    std::thread::scope(|s| {
        for (i, pod) in pods.iter().enumerate() {
            let conf = &conf;
            s.spawn(move || {
                rig_ref
                    .cni("DEL", &format!("c{i}"), pod, conf)
                    .expect_ok("concurrent DEL")
            });
        }
    });
    assert!(rig.leases().is_empty());
    assert!(rig.host_veths().is_empty());
}

#[test]
fn failed_add_rolls_back_address_and_veth() {
    let Some(mut rig) = Rig::new() else { return };
    let pod = rig.pod();
    // Something else already owns eth0 in the pod.
    ip_in(
        &pod,
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "other0",
        ],
    );
    let conf = rig.conf("1.0.0", &json!({}));
    let r = rig
        .cni("ADD", "taken", &pod, &conf)
        .expect_err(101, "ADD with eth0 taken");
    assert!(r.msg().contains("eth0"), "{}", r.msg());
    assert!(
        rig.leases().is_empty(),
        "address leaked: {:?}",
        rig.leases()
    );
    assert!(
        rig.host_veths().is_empty(),
        "veth leaked: {:?}",
        rig.host_veths()
    );
    // The runtime then calls DEL: it must succeed and leave the foreign eth0 alone.
    rig.cni("DEL", "taken", &pod, &conf)
        .expect_ok("DEL after failed ADD");
    assert!(ip_in(&pod, &["link"]).contains("eth0"));
    // And a real ADD on another name works and gets the address back.
    rig.cni_if("ADD", "taken", &pod, "eth1", &conf)
        .expect_ok("ADD eth1");
}

#[test]
fn pods_on_one_node_reach_each_other_bridge_mode() {
    let Some(mut rig) = Rig::new() else { return };
    let (p1, p2) = (rig.pod(), rig.pod());
    let conf = rig.conf("1.1.0", &json!({}));
    let a = rig.cni("ADD", "a", &p1, &conf).expect_ok("ADD a");
    let b = rig.cni("ADD", "b", &p2, &conf).expect_ok("ADD b");
    assert!(udp_reachable(&p1, &p2, b.ip()), "a cannot reach b");
    assert!(udp_reachable(&p2, &p1, a.ip()), "b cannot reach a");
    // The bridge holds the gateway, is up, hairpin is on for the pod ports.
    let br = ip_in(&rig.node, &["addr", "show", "cni0"]);
    assert!(br.contains(&format!("{}/24", rig.gateway())), "{br}");
    assert!(br.contains("UP"), "{br}");
    let port = a.json["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let d = ip_in(&rig.node, &["-d", "link", "show", &port]);
    assert!(d.contains("master cni0") && d.contains("hairpin on"), "{d}");
    assert!(d.contains("alias twill:twtest:a:eth0"), "{d}");
    // The log file (not a terminal) is plain text.
    let log = std::fs::read_to_string(rig.dir.join("twill-cni.log")).unwrap();
    assert!(log.contains("ok") && !log.contains('\x1b'), "{log}");
}

#[test]
fn pods_on_one_node_reach_each_other_routed_mode() {
    let Some(mut rig) = Rig::new() else { return };
    // Forwarding is twilld's job on a real node; the rig does it here.
    twill_tests::ns::sysctl(&rig.node, "net.ipv4.ip_forward", "1").expect("ip_forward");
    let (p1, p2) = (rig.pod(), rig.pod());
    let conf = rig.conf("1.0.0", &json!({"mode": "routed"}));
    let a = rig.cni("ADD", "a", &p1, &conf).expect_ok("ADD a");
    let b = rig.cni("ADD", "b", &p2, &conf).expect_ok("ADD b");
    assert!(
        a.json["ips"][0]["address"]
            .as_str()
            .unwrap()
            .ends_with("/32")
    );
    assert!(
        ip_in(&rig.node, &["link"])
            .lines()
            .all(|l| !l.contains("cni0")),
        "no bridge"
    );
    let routes = ip_in(&rig.node, &["route"]);
    assert!(routes.contains(&format!("{} dev tw", a.ip())), "{routes}");
    assert!(udp_reachable(&p1, &p2, b.ip()), "a cannot reach b");
    assert!(udp_reachable(&p2, &p1, a.ip()), "b cannot reach a");
    let mut check = conf.clone();
    check["prevResult"] = a.json.clone();
    rig.cni("CHECK", "a", &p1, &check).expect_ok("CHECK routed");
    rig.cni("DEL", "a", &p1, &conf).expect_ok("DEL a");
    assert!(!ip_in(&rig.node, &["route"]).contains(&a.ip().to_string()));
}

#[test]
fn gc_removes_what_is_not_valid() {
    let Some(mut rig) = Rig::new() else { return };
    let conf = rig.conf("1.1.0", &json!({}));
    let pods: Vec<String> = (0..3).map(|_| rig.pod()).collect();
    let mut ips = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        ips.push(
            rig.cni("ADD", &format!("g{i}"), p, &conf)
                .expect_ok("ADD")
                .ip(),
        );
    }
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "g1", "ifname": "eth0"}]);
    rig.invoke(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/usr/lib/cni")],
        gc.to_string().as_bytes(),
    )
    .expect_ok("GC");
    assert_eq!(rig.leases(), vec![ips[1]]);
    assert_eq!(rig.host_veths().len(), 1);
    assert!(ip_in(&pods[1], &["link"]).contains("eth0"));
    assert!(!ip_in(&pods[0], &["link"]).contains("eth0"));
    // The older key, and an empty list: everything goes.
    let mut gc = conf.clone();
    gc["cni.dev/attachments"] = json!([]);
    rig.invoke(&[("CNI_COMMAND", "GC")], gc.to_string().as_bytes())
        .expect_ok("GC with cni.dev/attachments");
    assert!(rig.leases().is_empty());
    assert!(rig.host_veths().is_empty());
}

#[test]
fn gc_cleans_up_after_killed_adds() {
    let Some(mut rig) = Rig::new() else { return };
    let conf = rig.conf("1.1.0", &json!({}));
    // One live pod first, so the bridge exists and there is something GC must keep.
    let live = rig.pod();
    let keep = rig.cni("ADD", "live", &live, &conf).expect_ok("ADD live");
    // kill -9 ADDs at staggered points of their run.
    let pods: Vec<String> = (0..12).map(|_| rig.pod()).collect();
    let mut children = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let env = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", &*format!("k{i}")),
            ("CNI_NETNS", &*Rig::netns_path(pod)),
            ("CNI_IFNAME", "eth0"),
        ];
        let mut child = rig
            .plugin_command(BIN, &env)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        children.push(child);
        std::thread::sleep(Duration::from_micros(300 * i as u64));
    }
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    // What a crash can leave beyond that: a lease file never written to, and a port of the
    // bridge that was never labelled. And another network's veth, which GC must not touch.
    let dir = rig.data_dir().join("twtest");
    File::create(dir.join(format!("10.99.{}.250", rig.third))).unwrap();
    for (veth, peer, setting) in [
        ("tw0000000000000", "xpeer0", ["master", "cni0"]),
        (
            "tw1111111111111",
            "xpeer1",
            ["alias", "twill:othernet:x:eth0"],
        ),
    ] {
        ip_in(
            &rig.node,
            &["link", "add", veth, "type", "veth", "peer", "name", peer],
        );
        ip_in(&rig.node, &["link", "set", veth, setting[0], setting[1]]);
    }

    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "live", "ifname": "eth0"}]);
    rig.invoke(&[("CNI_COMMAND", "GC")], gc.to_string().as_bytes())
        .expect_ok("GC");
    assert_eq!(rig.leases(), vec![keep.ip()], "leaked allocation");
    let mut veths = rig.host_veths();
    veths.sort();
    let kept_port = keep.json["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let mut want = vec![kept_port, "tw1111111111111".to_string()];
    want.sort();
    assert_eq!(veths, want, "leaked veth");
    // The live pod still works: a pod added after GC reaches it.
    let after = rig.pod();
    rig.cni("ADD", "after", &after, &conf)
        .expect_ok("ADD after GC");
    assert!(
        udp_reachable(&after, &live, keep.ip()),
        "GC broke the live pod"
    );
}

#[test]
fn delegated_ipam_host_local() {
    let Some(mut rig) = Rig::with_reference_plugins() else {
        return;
    };
    let pod = rig.pod();
    let hl = rig.dir.join("host-local");
    let conf = rig.conf(
        "1.0.0",
        &json!({"ipam": {
            "type": "host-local",
            "subnet": format!("10.99.{}.0/24", rig.third),
            "rangeStart": format!("10.99.{}.200", rig.third),
            "dataDir": hl,
        }}),
    );
    let r = rig
        .cni("ADD", "hl", &pod, &conf)
        .expect_ok("ADD via host-local");
    assert_eq!(r.ip().to_string(), format!("10.99.{}.200", rig.third));
    assert!(hl.join("twtest").join(r.ip().to_string()).exists());
    assert!(rig.leases().is_empty(), "built-in IPAM must not be used");
    let mut check = conf.clone();
    check["prevResult"] = r.json.clone();
    rig.cni("CHECK", "hl", &pod, &check)
        .expect_ok("CHECK via host-local");
    rig.cni("DEL", "hl", &pod, &conf)
        .expect_ok("DEL via host-local");
    assert!(!hl.join("twtest").join(r.ip().to_string()).exists());
    // GC/STATUS are not passed to a plugin that predates 1.1.0 (host-local 1.1.1 here).
    let mut gc = rig.conf(
        "1.1.0",
        &json!({"ipam": {"type": "host-local", "subnet": "10.99.0.0/24", "dataDir": hl}}),
    );
    gc["cni.dev/valid-attachments"] = json!([]);
    rig.invoke(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/usr/lib/cni")],
        gc.to_string().as_bytes(),
    )
    .expect_ok("GC with host-local");
}

#[test]
fn chained_portmap_accepts_the_result() {
    let Some(mut rig) = Rig::with_reference_plugins() else {
        return;
    };
    let pod = rig.pod();
    let conf = rig.conf("0.4.0", &json!({}));
    let r = rig.cni("ADD", "pm", &pod, &conf).expect_ok("ADD");
    let pm = json!({
        "cniVersion": "0.4.0",
        "name": "twtest",
        "type": "portmap",
        "capabilities": {"portMappings": true},
        "runtimeConfig": {"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]},
        "prevResult": r.json,
    });
    let netns = Rig::netns_path(&pod);
    let env = |cmd| {
        [
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", "pm"),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
        ]
    };
    let portmap = |cmd| rig.exec("/usr/lib/cni/portmap", &env(cmd), pm.to_string().as_bytes());
    let out = portmap("ADD").expect_ok("portmap ADD");
    assert_eq!(out.json["ips"][0]["address"], r.json["ips"][0]["address"]);
    assert!(rig.nat_rules().contains("18080"));
    portmap("DEL").expect_ok("portmap DEL");
    // twill after something else: prevResult is kept and twill's interface indices are shifted.
    let pod2 = rig.pod();
    let mut chained = rig.conf("1.0.0", &json!({}));
    chained["prevResult"] = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "lo", "sandbox": Rig::netns_path(&pod2)}],
        "ips": [{"address": "127.0.0.1/8", "interface": 0}],
        "dns": {"nameservers": ["10.96.0.10"]}
    });
    let c = rig
        .cni("ADD", "ch", &pod2, &chained)
        .expect_ok("chained ADD");
    assert_eq!(c.json["interfaces"].as_array().unwrap().len(), 3);
    assert_eq!(c.json["ips"][1]["interface"], 2);
    assert_eq!(c.json["dns"]["nameservers"][0], "10.96.0.10");
}

#[test]
fn dual_stack_when_the_subnet_file_has_ipv6() {
    let Some(mut rig) = Rig::new() else { return };
    rig.write_subnet(&format!(
        "FLANNEL_NETWORK=10.99.0.0/16\nFLANNEL_SUBNET=10.99.{t}.1/24\nFLANNEL_IPV6_NETWORK=fd99::/56\nFLANNEL_IPV6_SUBNET=fd99:0:0:{t}::1/64\nFLANNEL_MTU=1450\n",
        t = rig.third
    ));
    let (p1, p2) = (rig.pod(), rig.pod());
    let conf = rig.conf("1.0.0", &json!({}));
    let a = rig.cni("ADD", "a", &p1, &conf).expect_ok("ADD a");
    let b = rig.cni("ADD", "b", &p2, &conf).expect_ok("ADD b");
    let ips = b.json["ips"].as_array().unwrap();
    assert_eq!(ips.len(), 2, "{}", b.json);
    let b6: IpAddr = ips[1]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(b6.is_ipv6());
    assert!(udp_reachable(&p1, &p2, b6), "no IPv6 between pods");
    assert_eq!(a.json["routes"].as_array().unwrap().len(), 2);
    rig.cni("DEL", "a", &p1, &conf).expect_ok("DEL a");
    rig.cni("DEL", "b", &p2, &conf).expect_ok("DEL b");
    assert!(rig.leases().is_empty());
}

#[test]
fn every_error_code() {
    let Some(mut rig) = Rig::new() else { return };
    let pod = rig.pod();
    let pod2 = rig.pod();
    let base = rig.conf("1.0.0", &json!({}));
    let add = |conf: &Value| rig.cni("ADD", "e", &pod, conf);

    // 1: incompatible version.
    add(&rig.conf("0.2.0", &json!({}))).expect_err(1, "cniVersion 0.2.0");
    // 2: unknown field, named with its value.
    let r = add(&rig.conf("1.0.0", &json!({"subnetfile": "/x"}))).expect_err(2, "typo");
    assert!(
        r.msg().contains("subnetfile") && r.msg().contains("/x"),
        "{}",
        r.msg()
    );
    // 3: the netns does not exist.
    rig.cni("ADD", "e", "twc-no-such-netns", &base)
        .expect_err(3, "missing netns");
    // 4: a missing variable, named.
    let r = rig
        .invoke(
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_NETNS", "/run/netns/x"),
                ("CNI_IFNAME", "eth0"),
            ],
            base.to_string().as_bytes(),
        )
        .expect_err(4, "no CNI_CONTAINERID");
    assert!(r.msg().contains("CNI_CONTAINERID"), "{}", r.msg());
    let r = rig
        .invoke(&[("CNI_COMMAND", "BOGUS")], base.to_string().as_bytes())
        .expect_err(4, "bad CNI_COMMAND");
    assert!(r.msg().contains("CNI_COMMAND"));
    // 6: not JSON.
    rig.invoke(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "e"),
            ("CNI_NETNS", &Rig::netns_path(&pod)),
            ("CNI_IFNAME", "eth0"),
        ],
        b"{not json",
    )
    .expect_err(6, "undecodable");
    // 7: invalid value, field and value named.
    let r = add(&rig.conf("1.0.0", &json!({"mode": "bridged"}))).expect_err(7, "bad mode");
    assert!(
        r.msg().contains("mode") && r.msg().contains("bridged"),
        "{}",
        r.msg()
    );
    let r = add(&rig.conf("1.0.0", &json!({"mtu": 12}))).expect_err(7, "bad mtu");
    assert!(
        r.msg().contains("mtu") && r.msg().contains("12"),
        "{}",
        r.msg()
    );
    // 11: the IPAM lock is held by someone else past the timeout.
    {
        let dir = rig.data_dir().join("twtest");
        std::fs::create_dir_all(&dir).unwrap();
        let f = File::create(dir.join("lock")).unwrap();
        let _held = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).unwrap();
        let conf = rig.conf("1.0.0", &json!({"ipam": {"lockTimeoutMs": 200}}));
        let r = add(&conf).expect_err(11, "lock timeout");
        assert!(r.msg().contains("lock"), "{}", r.msg());
    }
    assert!(rig.host_veths().is_empty());
    // 11 also while the subnet file is not there yet; 103 when it is garbage.
    let text = std::fs::read_to_string(rig.subnet_file()).unwrap();
    std::fs::remove_file(rig.subnet_file()).unwrap();
    add(&base).expect_err(11, "no subnet file");
    // 50: STATUS while the node network is not ready.
    let status = rig.conf("1.1.0", &json!({}));
    rig.invoke(&[("CNI_COMMAND", "STATUS")], status.to_string().as_bytes())
        .expect_err(50, "STATUS without subnet file");
    rig.write_subnet("FLANNEL_SUBNET=banana\n");
    add(&base).expect_err(103, "garbage subnet file");
    rig.invoke(&[("CNI_COMMAND", "STATUS")], status.to_string().as_bytes())
        .expect_err(50, "STATUS with garbage subnet file");
    rig.write_subnet(&text);
    // 100: the bridge name is taken by a non-bridge.
    let conf = rig.conf("1.0.0", &json!({"bridge": "twcbr0"}));
    ip_in(
        &rig.node,
        &[
            "link", "add", "twcbr0", "type", "veth", "peer", "name", "twcbr0p",
        ],
    );
    let r = add(&conf).expect_err(100, "bridge name taken");
    assert!(r.msg().contains("twcbr0"), "{}", r.msg());
    assert!(rig.leases().is_empty());
    // 101 is covered by failed_add_rolls_back_address_and_veth.
    // 102: range exhausted.
    let one = rig.conf(
        "1.0.0",
        &json!({"ipam": {"rangeStart": format!("10.99.{}.9", rig.third), "rangeEnd": format!("10.99.{}.9", rig.third)}}),
    );
    add(&one).expect_ok("ADD of the only address");
    rig.cni("ADD", "e2", &pod2, &one)
        .expect_err(102, "exhausted");
    // 104: the delegated IPAM plugin does not exist.
    let r = rig
        .cni(
            "ADD",
            "e3",
            &pod2,
            &rig.conf("1.0.0", &json!({"ipam": {"type": "no-such-ipam"}})),
        )
        .expect_err(104, "missing IPAM plugin");
    assert!(r.msg().contains("no-such-ipam"), "{}", r.msg());
    // 105: CHECK finds the address gone.
    let r = add(&one).expect_ok("repeat ADD");
    ip_in(&pod, &["addr", "flush", "dev", "eth0"]);
    let mut check = one.clone();
    check["prevResult"] = r.json.clone();
    rig.cni("CHECK", "e", &pod, &check)
        .expect_err(105, "CHECK after address removed");
    // CHECK without prevResult is an invalid config.
    rig.cni("CHECK", "e", &pod, &one)
        .expect_err(7, "CHECK without prevResult");
}

#[test]
fn invalid_environment_is_4_before_anything_is_created() {
    let Some(mut rig) = Rig::new() else { return };
    let pod = rig.pod();
    let conf = rig.conf("1.0.0", &json!({}));
    let env = |netns: &str, id: &str, ifname: &str, cmd: &'static str| {
        vec![
            ("CNI_COMMAND", cmd.to_string()),
            ("CNI_CONTAINERID", id.to_string()),
            ("CNI_NETNS", netns.to_string()),
            ("CNI_IFNAME", ifname.to_string()),
        ]
    };
    let call = |vars: Vec<(&str, String)>, conf: &Value| {
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        rig.invoke(&vars, conf.to_string().as_bytes())
    };
    // CNI_NETNS that is no network namespace: a plain file, another kind of namespace.
    let file = rig.dir.join("not-a-netns");
    File::create(&file).unwrap();
    let file = file.display().to_string();
    let mut check = conf.clone();
    check["prevResult"] = json!({"cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": file}], "ips": []});
    for (netns, what) in [
        (file.as_str(), "regular file"),
        ("/proc/self/ns/mnt", "mnt namespace"),
    ] {
        for (cmd, c) in [("ADD", &conf), ("CHECK", &check)] {
            let r = call(env(netns, "c1", "eth0", cmd), c)
                .expect_err(4, &format!("{cmd} with CNI_NETNS={netns}"));
            assert!(
                r.msg().contains("CNI_NETNS") && r.msg().contains(netns) && r.msg().contains(what),
                "{}",
                r.msg()
            );
        }
    }
    // An interface name the kernel would take as a template, and one with its whitespace.
    let netns = Rig::netns_path(&pod);
    for ifname in ["eth%d", "et\u{a0}h0"] {
        let r = call(env(&netns, "c1", ifname, "ADD"), &conf)
            .expect_err(4, &format!("ADD with CNI_IFNAME={ifname:?}"));
        assert!(
            r.msg().contains("CNI_IFNAME") && r.msg().contains(&format!("{ifname:?}")),
            "{}",
            r.msg()
        );
    }
    // A container ID the alias cannot hold, and one libcni refuses.
    let long = "a".repeat(10_000);
    let r = call(env(&netns, &long, "eth0", "ADD"), &conf).expect_err(4, "10,000-byte ID");
    assert!(
        r.msg().contains("CNI_CONTAINERID") && r.msg().contains("10000 bytes"),
        "{}",
        r.msg()
    );
    assert!(
        r.stdout.len() < 1000,
        "the whole ID echoed: {} bytes",
        r.stdout.len()
    );
    call(env(&netns, "-c1", "eth0", "ADD"), &conf).expect_err(4, "ID starting with '-'");
    rig.assert_untouched("refused ADDs");
    assert_eq!(
        ip_in(&pod, &["-o", "link", "show"]).lines().count(),
        1,
        "the pod got an interface"
    );
}

#[test]
fn bad_subnet_files_are_103_before_anything_is_created() {
    let Some(mut rig) = Rig::new() else { return };
    let pod = rig.pod();
    let conf = rig.conf("1.0.0", &json!({}));
    let subnet = rig.subnet_file().display().to_string();
    let good = std::fs::read_to_string(rig.subnet_file()).unwrap();
    let t = rig.third;
    for (text, names, why) in [
        (
            [good.as_bytes(), b"# caf\xe9\n"].concat(),
            subnet.clone(),
            "UTF-8",
        ),
        (
            format!(
                "FLANNEL_NETWORK=10.99.0.0/16\nFLANNEL_SUBNET=10.98.{t}.1/24\nFLANNEL_MTU=1450\n"
            )
            .into_bytes(),
            format!("10.98.{t}.1/24"),
            "outside FLANNEL_NETWORK 10.99.0.0/16",
        ),
        (
            b"FLANNEL_SUBNET=0.0.0.1/0\nFLANNEL_MTU=1450\n".to_vec(),
            "0.0.0.1/0".to_string(),
            "FLANNEL_SUBNET",
        ),
    ] {
        std::fs::write(rig.subnet_file(), &text).unwrap();
        let r = rig
            .cni("ADD", "c1", &pod, &conf)
            .expect_err(103, &format!("ADD with {}", String::from_utf8_lossy(&text)));
        assert!(
            r.msg().contains(&names) && r.msg().contains(why),
            "{}",
            r.msg()
        );
        rig.assert_untouched(&names);
    }
    // Not written yet: try again, and the OS error said once (stdout and stderr).
    std::fs::remove_file(rig.subnet_file()).unwrap();
    let r = rig
        .cni("ADD", "c1", &pod, &conf)
        .expect_err(11, "no subnet file");
    assert_eq!(r.stdout.matches("os error 2").count(), 1, "{}", r.stdout);
    assert_eq!(r.stderr.matches("os error 2").count(), 1, "{}", r.stderr);
    rig.assert_untouched("no subnet file");
}

#[test]
fn subnet_file_that_never_ends_is_refused_at_once() {
    let Some(mut rig) = Rig::new() else { return };
    let pod = rig.pod();
    let fifo = rig.dir.join("fifo.env");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let fifo = fifo.display().to_string();
    for (path, what) in [("/dev/zero", "character device"), (fifo.as_str(), "FIFO")] {
        let conf = rig.conf("1.0.0", &json!({"subnetFile": path}));
        let env = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", &*Rig::netns_path(&pod)),
            ("CNI_IFNAME", "eth0"),
        ];
        let r = rig
            .invoke_bounded(&env, conf.to_string().as_bytes(), Duration::from_secs(20))
            .expect_err(103, &format!("subnetFile {path}"));
        assert!(
            r.msg().contains(path) && r.msg().contains(what),
            "{}",
            r.msg()
        );
        let status = rig.conf("1.1.0", &json!({"subnetFile": path}));
        rig.invoke_bounded(
            &[("CNI_COMMAND", "STATUS")],
            status.to_string().as_bytes(),
            Duration::from_secs(20),
        )
        .expect_err(50, &format!("STATUS with subnetFile {path}"));
    }
    rig.assert_untouched("endless subnet files");
}

#[test]
fn del_and_gc_create_no_ipam_directory() {
    let Some(rig) = Rig::new() else { return };
    let conf = rig.conf("1.1.0", &json!({}));
    rig.cni("DEL", "never", "", &conf)
        .expect_ok("DEL of an unknown container");
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    rig.invoke(&[("CNI_COMMAND", "GC")], gc.to_string().as_bytes())
        .expect_ok("GC");
    rig.assert_untouched("DEL and GC");
}

/// The conflist of the README's containerd section, as the runtime reads it.
fn readme_conflist() -> Value {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read cni-plugin/README.md");
    let section = readme
        .split("\n### ")
        .find(|s| s.starts_with("containerd"))
        .expect("README has a containerd section");
    let block = section
        .split("```json\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("containerd section has a json block");
    serde_json::from_str(block).unwrap_or_else(|e| panic!("README conflist: {e}\n{block}"))
}

/// The CNI versions libcni 1.1.x (containerd 1.6 and 1.7, podman 4) parses results of.
const LIBCNI_1_1_RESULTS: [&str; 6] = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// The README's containerd conflist run the way libcni runs a list (ADD in order, each plugin
/// given the previous result; DEL in reverse order with the cached result), with twill-cni and
/// the reference portmap installed here: every plugin supports the list's version, every
/// command succeeds, the results are in a version containerd 1.6/1.7 parses, and DEL leaves
/// nothing behind.
#[test]
fn readme_containerd_conflist_runs_with_the_reference_portmap() {
    let Some(mut rig) = Rig::with_reference_plugins() else {
        return;
    };
    let list = readme_conflist();
    let version = list["cniVersion"].as_str().expect("cniVersion").to_string();
    let plugins = list["plugins"].as_array().expect("plugins").clone();
    assert_eq!(plugins[0]["type"], "twill-cni");
    let binary = |plugin: &Value| -> String {
        match plugin["type"].as_str().unwrap() {
            "twill-cni" => BIN.to_string(),
            other => format!("/usr/lib/cni/{other}"),
        }
    };
    let pod = rig.pod();
    let netns = Rig::netns_path(&pod);
    let exec = |plugin: &Value, command: &str, conf: &Value| -> Reply {
        let env = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "readme"),
            ("CNI_NETNS", &netns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
        ];
        rig.exec(&binary(plugin), &env, conf.to_string().as_bytes())
    };
    // What libcni hands each plugin: its object with the list's version and name, runtimeConfig
    // for the capabilities it declares, the previous result. (The node's paths are the test's.)
    let netconf = |plugin: &Value, prev: Option<&Value>| -> Value {
        let mut c = plugin.clone();
        c["cniVersion"] = json!(version);
        c["name"] = list["name"].clone();
        if c["type"] == "twill-cni" {
            c["subnetFile"] = json!(rig.subnet_file());
            c["dataDir"] = json!(rig.data_dir());
        }
        if c["capabilities"]["portMappings"] == true {
            c["runtimeConfig"] = json!({"portMappings": [
                {"hostPort": 18081, "containerPort": 80, "protocol": "tcp"}]});
        }
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        c
    };
    for plugin in &plugins {
        let v = exec(plugin, "VERSION", &json!({"cniVersion": version}))
            .expect_ok(&format!("VERSION of {}", plugin["type"]));
        assert!(
            v.json["supportedVersions"]
                .as_array()
                .unwrap()
                .contains(&json!(version)),
            "{} does not support the README's cniVersion {version}: {}",
            plugin["type"],
            v.stdout
        );
    }
    let mut prev: Option<Value> = None;
    for plugin in &plugins {
        let r = exec(plugin, "ADD", &netconf(plugin, prev.as_ref()))
            .expect_ok(&format!("ADD {}", plugin["type"]));
        assert_eq!(r.json["cniVersion"], json!(version), "{}", r.stdout);
        prev = Some(r.json);
    }
    assert!(
        LIBCNI_1_1_RESULTS.contains(&version.as_str()),
        "containerd 1.6/1.7 cannot parse a {version} result"
    );
    let result = prev.unwrap();
    assert!(
        result["ips"][0]["address"]
            .as_str()
            .unwrap()
            .starts_with(&format!("10.99.{}.", rig.third))
    );
    let nat = || rig.nat_rules();
    assert!(
        nat().contains("18081"),
        "portmap's hostPort rule is missing"
    );
    // CHECK of twill-cni with the list's result (portmap 1.1.1's own CHECK looks for its IPv6
    // chain even for an IPv4-only pod, and fails whatever came before it).
    exec(&plugins[0], "CHECK", &netconf(&plugins[0], Some(&result))).expect_ok("CHECK twill-cni");
    for plugin in plugins.iter().rev() {
        exec(plugin, "DEL", &netconf(plugin, Some(&result)))
            .expect_ok(&format!("DEL {}", plugin["type"]));
    }
    assert!(rig.leases().is_empty(), "{:?}", rig.leases());
    assert!(rig.host_veths().is_empty(), "{:?}", rig.host_veths());
    assert!(!nat().contains("18081"), "portmap's hostPort rule stayed");
}
