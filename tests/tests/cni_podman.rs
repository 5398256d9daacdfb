//! twill-cni under a real runtime (issue 3): podman 4.3 with its CNI backend starts busybox
//! containers on a network whose conflist chains `twill-cni` and the reference `portmap`, on the
//! nodes of a netns rig whose twilld runs the VXLAN overlay.
//!
//! Why it is shaped as it is:
//! - podman runs *as a node*: `nsenter --net=/run/netns/<node> podman ...`, so the bridge, the
//!   host ends of the veths and portmap's rules land in the node's namespace, as they would on a
//!   real node, and never in the root one. `ip netns exec` cannot be used: it remounts `/sys`,
//!   which hides the cgroup mounts, and runc then fails to create the container.
//! - Each node's podman is private: its own `--root`/`--runroot` (vfs storage: nothing to mount
//!   or unmount), a `containers.conf` whose `network_config_dir` holds only this test's conflist,
//!   whose `tmp_dir` keeps podman's events and exit files out of `/run/libpod` and whose
//!   `lock_type="file"` keeps its locks there too (instead of the machine-wide
//!   `/dev/shm/libpod_lock`), and a `--cgroup-parent` of its own instead of the shared
//!   `libpod_parent`. The [`Podman`] guard removes every container (`rm -f -t 0 -a`), then its
//!   directory and its cgroups, pass or fail, before the rig's guard removes the namespaces
//!   (the containers live in namespaces of podman's, which the rig's sweep would not find).
//! - No image is pulled: `--rootfs` points at a directory with the static busybox and its applet
//!   links. Every container serves its own name over HTTP (busybox `httpd` on a private tmpfs
//!   `/tmp`), so a reply also proves *which* container answered.
//! - The runtime's view (podman inspect: address, gateway, MAC — parsed from twill-cni's 0.4.0
//!   result) is checked against the kernel's (the container's `eth0`, the node's links, the IPAM
//!   directory, the nat table), and `podman rm` must leave none of it behind.
//!
//! Quirks met here: podman 4.3's `--rootfs` is a flag and the rootfs is the first positional
//! argument (`podman run [options] --rootfs DIR CMD`; `--rootfs DIR --network NET` makes
//! `--network` the command); PID 1 without a SIGTERM handler (sh, httpd) ignores `podman stop`'s
//! SIGTERM for 10 s, hence `rm -t 0`; libcni keeps its result cache in `/var/lib/cni/results`
//! whatever podman is told (entries go on DEL); the container namespaces are bind mounts in
//! `/run/netns/netns-<uuid>`; portmap 1.1.1 sets `route_localnet=1` on the host interface it finds
//! for the container (`cni0`), which is why `127.0.0.1:<host port>` works from the node.
//!
//! Needs root, podman, runc, Debian's containernetworking-plugins and busybox-static; built
//! `twilld` and `twill-cni` (`cargo build -p twill-cni -p twill-agent --bins`).

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use twill_facts::SubnetFacts;
use twill_tests::{Rig, exec_timeout, http_get, require_root, run, wait_until};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
/// The CNI network's name (and its IPAM directory under `dataDir`).
const NET: &str = "twill";
/// How long the overlay gets to converge, and twilld to write its subnet file.
const UP: Duration = Duration::from_secs(15);
/// Bound on any single podman command.
const PODMAN_TIMEOUT: Duration = Duration::from_mins(1);
/// The port every container's httpd listens on.
const HTTP_PORT: u16 = 8080;
/// The host port published for container `a` on node 1.
const HOST_PORT: u16 = 18080;

/// One node's private podman.
struct Podman<'r> {
    rig: &'r Rig,
    node: usize,
    /// Holds `root/`, `runroot/`, `tmp/`, `net.d/`, `ipam/` and `containers.conf`.
    dir: PathBuf,
    rootfs: PathBuf,
}

/// A running container, as podman and the kernel see it.
#[derive(Debug, Clone)]
struct Container {
    name: String,
    id: String,
    ip: Ipv4Addr,
    /// The container's netns bind mount (`/run/netns/netns-<uuid>`).
    sandbox: String,
    /// The host end of its veth, in the node's namespace.
    host_veth: String,
}

impl<'r> Podman<'r> {
    /// Writes node `node`'s containers.conf and a 0.4.0 conflist (twill-cni reading this node's
    /// subnet file, IPAM state under the podman dir; then portmap).
    fn new(rig: &'r Rig, node: usize, cni_dir: &Path, rootfs: &Path) -> Result<Self> {
        let dir = rig.temp_dir().join(format!("podman-n{node}"));
        for sub in ["root", "runroot", "tmp", "net.d", "ipam"] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("create {}", dir.join(sub).display()))?;
        }
        let podman = Podman {
            rig,
            node,
            dir,
            rootfs: rootfs.to_path_buf(),
        };
        let conf = format!(
            "[containers]\n\
             cgroupns=\"host\"\n\
             default_ulimits=[\"nofile=1024:1024\",\"nproc=4096:4096\"]\n\
             [engine]\n\
             cgroup_manager=\"cgroupfs\"\n\
             events_logger=\"file\"\n\
             runtime=\"runc\"\n\
             tmp_dir=\"{tmp}\"\n\
             lock_type=\"file\"\n\
             [network]\n\
             network_backend=\"cni\"\n\
             cni_plugin_dirs=[\"{cni}\",\"/usr/lib/cni\"]\n\
             network_config_dir=\"{netd}\"\n",
            tmp = podman.dir.join("tmp").display(),
            cni = cni_dir.display(),
            netd = podman.dir.join("net.d").display(),
        );
        write(&podman.dir.join("containers.conf"), &conf)?;
        let conflist = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": NET,
            "plugins": [
                {
                    "type": "twill-cni",
                    "subnetFile": rig.subnet_file(node),
                    "dataDir": podman.ipam_dir(),
                    "logFile": podman.dir.join("twill-cni.log"),
                    "capabilities": {"ips": true},
                },
                {"type": "portmap", "capabilities": {"portMappings": true}},
            ],
        });
        write(
            &podman.dir.join("net.d").join(format!("{NET}.conflist")),
            &serde_json::to_string_pretty(&conflist)?,
        )?;
        Ok(podman)
    }

    /// The cgroup (in every v1 hierarchy) holding this node's containers and their conmon,
    /// instead of podman's shared `libpod_parent`; removed by the guard.
    fn cgroup_parent(&self) -> String {
        format!("/{}-n{}-podman", self.rig.id(), self.node)
    }

    fn ns(&self) -> String {
        self.rig.node_ns(self.node)
    }

    /// twill-cni's `dataDir`; the leases are in `<it>/twill/`.
    fn ipam_dir(&self) -> PathBuf {
        self.dir.join("ipam")
    }

    /// `podman <args>` inside the node's namespace, whatever its exit status.
    fn exec(&self, args: &[&str]) -> Result<Output> {
        let conf = format!(
            "CONTAINERS_CONF={}",
            self.dir.join("containers.conf").display()
        );
        let root = self.dir.join("root").display().to_string();
        let runroot = self.dir.join("runroot").display().to_string();
        let mut full = vec![
            "env",
            &conf,
            "podman",
            "--root",
            &root,
            "--runroot",
            &runroot,
            "--storage-driver",
            "vfs",
        ];
        full.extend_from_slice(args);
        exec_timeout(&self.ns(), &full, PODMAN_TIMEOUT)
    }

    /// `podman <args>`; its stdout, or an error with its stderr.
    fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.exec(args)?;
        if !out.status.success() {
            bail!(
                "podman {} on node {} failed ({}): {}\ntwill-cni log:\n{}",
                args.join(" "),
                self.node,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                self.cni_log_tail()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn cni_log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("twill-cni.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// `podman run -d` of a busybox container named `name` serving its name on
    /// `:8080/index.html`, with `extra` options (e.g. `-p`).
    fn start(&self, name: &str, extra: &[&str]) -> Result<Container> {
        let env = format!("NAME={name}");
        let rootfs = self.rootfs.display().to_string();
        let parent = self.cgroup_parent();
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--network",
            NET,
            "--cgroup-parent",
            &parent,
            "--tmpfs",
            "/tmp",
            "-e",
            &env,
        ];
        args.extend_from_slice(extra);
        // `--rootfs` is a flag: the rootfs is the first positional argument.
        let serve = format!("echo $NAME > /tmp/index.html && exec httpd -f -p {HTTP_PORT} -h /tmp");
        args.extend_from_slice(&["--rootfs", &rootfs, "/bin/sh", "-c", &serve]);
        let id = self.run(&args)?.trim().to_string();
        self.inspect(name, &id)
    }

    /// The container as podman reports it, checked against its `eth0` and the node's links.
    fn inspect(&self, name: &str, id: &str) -> Result<Container> {
        let raw = self.run(&["inspect", "--format", "{{json .NetworkSettings}}", name])?;
        let settings: Value =
            serde_json::from_str(raw.trim()).with_context(|| format!("parse inspect: {raw}"))?;
        let net = &settings["Networks"][NET];
        let field = |k: &str| net[k].as_str().unwrap_or_default().to_string();
        let ip: Ipv4Addr = field("IPAddress")
            .parse()
            .with_context(|| format!("no IPAddress in {net}"))?;
        let mac = field("MacAddress");
        let gateway = field("Gateway");
        let sandbox = settings["SandboxKey"]
            .as_str()
            .unwrap_or_default()
            .to_string();

        // The kernel agrees with what podman parsed from the result.
        let eth0 = self.run(&["exec", name, "ip", "-o", "addr", "show", "dev", "eth0"])?;
        ensure!(
            eth0.contains(&format!("inet {ip}/")),
            "podman says {name} has {ip}, its eth0 says: {eth0}"
        );
        let link = self.run(&["exec", name, "cat", "/sys/class/net/eth0/address"])?;
        ensure!(
            !mac.is_empty() && link.trim() == mac,
            "podman says {name}'s MAC is {mac:?}, its eth0 says {}",
            link.trim()
        );
        let route = self.run(&["exec", name, "ip", "route", "show", "default"])?;
        ensure!(
            route.contains(&format!("via {gateway} dev eth0")),
            "default route of {name} is not via the gateway {gateway}: {route}"
        );
        let iflink = self.run(&["exec", name, "cat", "/sys/class/net/eth0/iflink"])?;
        let host_veth = link_name(&self.ns(), iflink.trim())?;
        Ok(Container {
            name: name.to_string(),
            id: id.to_string(),
            ip,
            sandbox,
            host_veth,
        })
    }

    /// `timeout 5 wget -qO- http://<ip>:8080/` from inside container `from`: the body, or `None`.
    fn fetch(&self, from: &str, ip: Ipv4Addr) -> Option<String> {
        let url = format!("http://{ip}:{HTTP_PORT}/");
        let out = self
            .exec(&["exec", from, "timeout", "5", "wget", "-qO-", &url])
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `podman rm -f -t 0 <name>`.
    fn remove(&self, name: &str) -> Result<()> {
        self.run(&["rm", "-f", "-t", "0", name]).map(|_| ())
    }

    /// The lease files in the network's IPAM directory (every entry but the lock and the
    /// round-robin cursors).
    fn leases(&self) -> Vec<String> {
        let dir = self.ipam_dir().join(NET);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "lock" && !n.starts_with("last_reserved_ip"))
            .collect();
        names.sort();
        names
    }
}

impl Drop for Podman<'_> {
    fn drop(&mut self) {
        match self.exec(&["rm", "-f", "-t", "0", "-a"]) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "cni_podman: podman rm -a on node {} failed ({}): {}",
                self.node,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("cni_podman: podman rm -a on node {}: {e:#}", self.node),
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("cni_podman: remove {}: {e}", self.dir.display());
        }
        let parent = self.cgroup_parent();
        let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for h in hierarchies.flatten() {
            let dir = h.path().join(parent.trim_start_matches('/'));
            if dir.is_dir()
                && let Err(e) = remove_cgroup(&dir)
            {
                eprintln!("cni_podman: {e:#}");
            }
        }
    }
}

/// Removes an (empty) cgroup and its child cgroups, deepest first: their files cannot be
/// unlinked, only the directories removed.
fn remove_cgroup(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            remove_cgroup(&path)?;
        }
    }
    std::fs::remove_dir(dir).with_context(|| format!("rmdir {}", dir.display()))
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

/// The name of the link with index `index` in namespace `ns`.
fn link_name(ns: &str, index: &str) -> Result<String> {
    let links = run(ns, &["ip", "-o", "link", "show"])?;
    links
        .lines()
        .find_map(|l| {
            let (idx, rest) = l.split_once(": ")?;
            (idx == index).then(|| {
                rest.split(['@', ':'])
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
        })
        .with_context(|| format!("no link with index {index} in {ns}:\n{links}"))
}

/// The names of all links in namespace `ns`.
fn links(ns: &str) -> Vec<String> {
    run(ns, &["ip", "-o", "link", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let rest = l.split_once(": ")?.1;
            Some(rest.split(['@', ':']).next()?.to_string())
        })
        .collect()
}

/// `iptables -t nat -S` in namespace `ns` (the same `iptables` portmap runs).
fn nat_rules(ns: &str) -> String {
    run(ns, &["iptables", "-w", "5", "-t", "nat", "-S"]).unwrap_or_else(|e| format!("{e:#}"))
}

/// A directory with the static busybox, its applet links, `/etc/passwd` and `/etc/group`.
fn busybox_rootfs(dir: &Path) -> Result<()> {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::create_dir_all(dir.join("etc"))?;
    std::fs::copy("/bin/busybox", bin.join("busybox")).context("copy /bin/busybox")?;
    let list = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .context("busybox --list")?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet))
                .with_context(|| format!("link applet {applet}"))?;
        }
    }
    write(&dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    write(&dir.join("etc/group"), "root:x:0:\n")
}

/// Whether the tools this test drives are installed; outside CI, says loudly what is missing.
fn tools_present() -> bool {
    let missing: Vec<&str> = [
        "/usr/bin/podman",
        "/usr/sbin/runc",
        "/usr/lib/cni/portmap",
        "/bin/busybox",
    ]
    .into_iter()
    .filter(|p| !Path::new(p).exists())
    .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        !twill_tests::in_ci(),
        "missing {missing:?} (apt-get install podman runc containernetworking-plugins \
         busybox-static); CI=true, so not skipping"
    );
    eprintln!("SKIPPED cni_podman: missing {missing:?}");
    false
}

#[test]
fn podman_containers_on_twill_cni_with_portmap() {
    if !require_root() || !tools_present() {
        return;
    }
    let clock = Instant::now();
    // Progress as it happens: libtest shows it for a failing test, `--nocapture` always.
    let step = |what: &str| eprintln!("[{:5.1} s] {what}", clock.elapsed().as_secs_f64());

    let rig = Rig::new(2).expect("rig");
    rig.put_network_config(VXLAN).unwrap();
    for node in 1..=2 {
        rig.start_twilld(node, &[]).unwrap();
    }
    let facts: Vec<SubnetFacts> = (1..=2)
        .map(|node| {
            rig.wait_subnet_file(node, UP)
                .unwrap_or_else(|e| panic!("{e:#}"))
        })
        .collect();
    let subnet = |node: usize| facts[node - 1].subnet_v4().expect("IPv4 subnet");
    step(&format!(
        "rig {} up: node 1 has {}, node 2 has {}",
        rig.id(),
        subnet(1),
        subnet(2)
    ));

    let cni_bin = rig.twilld_path().unwrap().with_file_name("twill-cni");
    assert!(
        cni_bin.is_file(),
        "{} missing: cargo build -p twill-cni",
        cni_bin.display()
    );
    let rootfs = rig.temp_dir().join("rootfs");
    busybox_rootfs(&rootfs).unwrap();
    let cni_dir = cni_bin.parent().unwrap();
    // Declared after the rig, so dropped (containers removed) before it.
    let p1 = Podman::new(&rig, 1, cni_dir, &rootfs).unwrap();
    let p2 = Podman::new(&rig, 2, cni_dir, &rootfs).unwrap();
    let version = p1.run(&["--version"]).unwrap();
    step(&format!("{} on runc, CNI backend", version.trim()));

    // Two containers on node 1 (one with a published port), one on node 2.
    let published = format!("{HOST_PORT}:{HTTP_PORT}");
    let a = p1.start("a", &["-p", &published]).unwrap();
    let b = p1.start("b", &[]).unwrap();
    let c = p2.start("c", &[]).unwrap();
    step(&format!(
        "started a={} b={} on node 1 (host veths {} {}), c={} on node 2",
        a.ip, b.ip, a.host_veth, b.host_veth, c.ip
    ));

    // Unique addresses from the node's subnet, and leases for exactly these.
    let ips: HashSet<Ipv4Addr> = [a.ip, b.ip, c.ip].into();
    assert_eq!(ips.len(), 3, "addresses not unique: {a:?} {b:?} {c:?}");
    for (ctr, node) in [(&a, 1), (&b, 1), (&c, 2)] {
        assert!(
            subnet(node).contains(&ctr.ip) && Some(ctr.ip) != facts[node - 1].gateway_v4(),
            "{} has {}, outside node {node}'s subnet {}",
            ctr.name,
            ctr.ip,
            subnet(node)
        );
        assert!(
            ctr.host_veth.starts_with("tw"),
            "{}'s host veth: {}",
            ctr.name,
            ctr.host_veth
        );
    }
    assert_eq!(p1.leases(), sorted([a.ip, b.ip]), "node 1's leases");
    assert_eq!(p2.leases(), sorted([c.ip]), "node 2's leases");

    // Same node, both ways.
    assert_eq!(
        p1.fetch("b", a.ip).as_deref(),
        Some("a"),
        "b -> a on node 1"
    );
    assert_eq!(
        p1.fetch("a", b.ip).as_deref(),
        Some("b"),
        "a -> b on node 1"
    );
    step("a <-> b on node 1 over cni0");

    // Across nodes, through twilld's VXLAN (bounded wait for the overlay to converge).
    let converge = wait_until(UP, || p1.fetch("a", c.ip).as_deref() == Some("c"));
    assert!(
        converge.is_ok(),
        "a (node 1) cannot reach c (node 2) at {}\nroutes of node 1:\n{}",
        c.ip,
        twill_tests::routes(&rig.node_ns(1)).unwrap_or_default()
    );
    assert_eq!(p2.fetch("c", a.ip).as_deref(), Some("a"), "c -> a");
    let via = run(&rig.node_ns(1), &["ip", "route", "get", &c.ip.to_string()]).unwrap();
    assert!(
        via.contains("dev flannel.1"),
        "node 1 -> c not via the VXLAN device: {via}"
    );
    step("a (node 1) <-> c (node 2) through the VXLAN overlay");

    // The published port, every way portmap supports: from node 2 to node 1's address
    // (PREROUTING DNAT); from node 1 itself to its own address and to 127.0.0.1 (OUTPUT DNAT;
    // loopback works because portmap sets route_localnet on cni0, the host interface it finds
    // for a's address); from containers: b on the same node, a itself (hairpin: twill-cni turns
    // hairpin mode on for its bridge ports), c on node 2 (through the overlay).
    let target = SocketAddr::from((Rig::node_ip(1), HOST_PORT));
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, HOST_PORT));
    for (from, addr) in [(2, target), (1, target), (1, loopback)] {
        let resp = http_get(&rig.node_ns(from), addr, "/")
            .unwrap_or_else(|e| panic!("GET {addr} from node {from}: {e:#}"));
        assert_eq!(
            (resp.status, resp.body.trim()),
            (200, "a"),
            "GET {addr} from node {from}"
        );
    }
    let url = format!("http://{target}/");
    for (p, from) in [(&p1, "b"), (&p1, "a"), (&p2, "c")] {
        let out = p
            .run(&["exec", from, "timeout", "5", "wget", "-qO-", &url])
            .unwrap_or_else(|e| panic!("{from} -> {url}: {e:#}"));
        assert_eq!(out.trim(), "a", "{from} -> {url}");
    }
    step(&format!(
        "published {HOST_PORT}->a:{HTTP_PORT}: {target} from node 2, node 1 and containers \
         b, a (hairpin), c (node 2); {loopback} from node 1"
    ));

    // portmap's rules for a are there (so their absence below means something).
    let ns1 = rig.node_ns(1);
    let before = nat_rules(&ns1);
    assert!(
        before.contains(&a.id) && before.contains("CNI-DN-"),
        "no portmap rules for a:\n{before}"
    );

    // podman rm of a: no veth, no lease, no rule, no netns left.
    p1.remove("a").unwrap();
    let left = links(&ns1);
    assert!(
        !left.contains(&a.host_veth),
        "a's veth {} is still on node 1: {left:?}",
        a.host_veth
    );
    assert_eq!(p1.leases(), sorted([b.ip]), "a's lease was not released");
    let after = nat_rules(&ns1);
    assert!(
        !after.contains(&a.id) && !after.contains("CNI-DN-"),
        "portmap rules for a left after podman rm:\n{after}"
    );
    assert!(
        a.sandbox.is_empty() || !Path::new(&a.sandbox).exists(),
        "a's netns {} is left",
        a.sandbox
    );
    let refused = http_get(&rig.node_ns(2), target, "/");
    assert!(refused.is_err(), "{target} still answers: {refused:?}");
    // b is untouched by a's removal.
    assert_eq!(
        p1.fetch("b", b.ip).as_deref(),
        Some("b"),
        "b after a's removal"
    );
    step("podman rm a: veth, lease, portmap rules and netns gone; b unaffected");

    p1.remove("b").unwrap();
    p2.remove("c").unwrap();
    for (node, p) in [(1, &p1), (2, &p2)] {
        let ns = rig.node_ns(node);
        let tw: Vec<String> = links(&ns)
            .into_iter()
            .filter(|l| l.starts_with("tw"))
            .collect();
        assert!(tw.is_empty(), "veths left on node {node}: {tw:?}");
        assert!(
            p.leases().is_empty(),
            "leases left on node {node}: {:?}",
            p.leases()
        );
        let rules = nat_rules(&ns);
        assert!(
            !rules.contains("CNI-DN-"),
            "portmap rules left on node {node}:\n{rules}"
        );
    }
    step("podman rm b, c: no tw* veth, no lease, no CNI-DN- chain on either node");

    drop(p2);
    drop(p1);
    step("podman state removed");
}

/// Addresses as [`Podman::leases`] lists them (file names, sorted as strings).
fn sorted<const N: usize>(ips: [Ipv4Addr; N]) -> Vec<String> {
    let mut names: Vec<String> = ips.iter().map(ToString::to_string).collect();
    names.sort();
    names
}
