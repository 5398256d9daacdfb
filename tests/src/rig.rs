//! The rig: an underlay "switch" namespace with a real etcd, N node namespaces plugged into it,
//! twilld on the nodes, and pods behind them.
//!
//! ```text
//!   <id>-u   br0 198.18.0.1/24 fd74:7769::1/64, etcd on :2379/:2380
//!    ├─ n1 ── eth0 <id>-n1  198.18.0.11/24 fd74:7769::11/64   cni0 ── eth0 <id>-n1p1 ...
//!    ├─ n2 ── eth0 <id>-n2  198.18.0.12/24 fd74:7769::12/64
//!    └─ ...
//! ```
//!
//! Why it is shaped as it is:
//! - The addresses are from the RFC 2544 benchmark range and a ULA prefix: they never collide
//!   with a real network, and the rig has no link to the root namespace anyway.
//! - DAD is off in every rig namespace (and addresses are added `nodad`), so IPv6 works the moment
//!   a link is up instead of 1-2 s later; forwarding is on in the nodes, as on a real node.
//! - The guard's state sits behind a mutex so that every method takes `&self`: a test can share
//!   the rig with scoped threads (a ping flood in one, a `kill -9` of twilld in another).
//! - Pods come two ways: by hand ([`Rig::add_pod`]: a bridge `cni0` holding the gateway, a veth
//!   per pod), for tests of the overlay that must not depend on the CNI plugin; or through the
//!   real `twill-cni` ([`Rig::add_cni_pod`]), exec'ed exactly as a runtime execs it (CNI
//!   environment, the network config on stdin, inside the node's namespace), for everything that
//!   should look like a real node. Both give the same layout (`cni0`, `eth0`, the subnet file's
//!   gateway and MTU), so tests switch without changing shape. The service proxy must also work
//!   with whatever else plugs pods in: [`Rig::add_shaped_pod`] makes a pod in each
//!   [`PodShape`] (twill-cni bridged or routed, the reference `bridge` plugin on another bridge,
//!   `ptp`, Calico-style routed veths by hand).
//! - Services: [`Rig::node_cgroup`] gives each node a cgroup2 directory of its own (recorded, so
//!   a sweep removes it) for the eBPF socket-level load balancer, [`Rig::proxy_args`] the flags
//!   that turn a node's service proxy on, [`Rig::start_responder`] a `twill-probe serve` in a pod
//!   (the backend a Service points at), [`Rig::apply_manifest`] a `twilld apply -f`.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use twill_facts::SubnetFacts;

use crate::guard::NetnsGuard;
use crate::ns::{self, ip_batch, nsenter};
use crate::state::PIN_ROOT;

/// The underlay bridge's IPv4 address (etcd listens here).
pub const UNDERLAY_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The underlay bridge's IPv6 address.
pub const UNDERLAY_V6: Ipv6Addr = Ipv6Addr::new(0xfd74, 0x7769, 0, 0, 0, 0, 0, 1);
/// etcd's client URL, as seen from every rig namespace.
pub const ETCD_ENDPOINT: &str = "http://198.18.0.1:2379";
/// The etcd key prefix twilld uses by default (flannel's).
pub const ETCD_PREFIX: &str = "/coreos.com/network";

/// The CNI network name of the rig's pods (the conflist's `name`; names the IPAM directory).
pub const CNI_NETWORK: &str = "twill";
/// The CNI version the rig's conflist declares (what twill-cni answers in).
pub const CNI_VERSION: &str = "1.1.0";

/// How long etcd gets to become healthy.
const ETCD_READY: Duration = Duration::from_secs(15);
/// How long a stopped process gets before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Lines of each log printed when a test fails.
const LOG_TAIL_LINES: usize = 60;

/// How to build a rig.
#[derive(Debug, Clone)]
pub struct RigOptions {
    /// Number of node namespaces (1..=200).
    pub nodes: usize,
    /// Where the `twilld` binary is; by default `TWILL_BIN_DIR`, else the `target/<profile>/`
    /// directory of the running test executable.
    pub bin_dir: Option<PathBuf>,
    /// Whether to start etcd right away (default true).
    pub etcd: bool,
    /// `RUST_LOG` for twilld (default `info`).
    pub rust_log: String,
    /// Start etcd and twilld in process groups of their own, so that a rig that will be
    /// [`Rig::detach`]ed survives signals sent to its creator's group (Ctrl-C, a job control
    /// `kill -- -PGID`). Default false: a test's processes die with the test's group.
    pub detachable: bool,
}

impl Default for RigOptions {
    fn default() -> Self {
        RigOptions {
            nodes: 3,
            bin_dir: None,
            etcd: true,
            rust_log: "info".to_string(),
            detachable: false,
        }
    }
}

/// A pod namespace made by [`Rig::add_pod`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// Its namespace (`<id>-n<node>p<j>`); its interface is `eth0`.
    pub ns: String,
    /// The node it sits on (1-based).
    pub node: usize,
    /// Its IPv4 address, if the node has an IPv4 subnet.
    pub ipv4: Option<Ipv4Addr>,
    /// Its IPv6 address, if the node has an IPv6 subnet.
    pub ipv6: Option<Ipv6Addr>,
}

impl Pod {
    /// The pod's name inside its rig, `n<node>p<j>` (its namespace without the rig id).
    pub fn name(&self) -> &str {
        self.ns.split_once('-').map_or(self.ns.as_str(), |(_, n)| n)
    }

    /// Its address: IPv4 if it has one, else IPv6.
    pub fn ip(&self) -> Option<IpAddr> {
        self.ipv4
            .map(IpAddr::from)
            .or_else(|| self.ipv6.map(IpAddr::from))
    }
}

/// Where the reference CNI plugins are (Debian's containernetworking-plugins).
pub const REFERENCE_CNI_DIR: &str = "/usr/lib/cni";
/// The bridge [`PodShape::RefBridge`] puts pods on: any name but flannel's `cni0`.
pub const REF_BRIDGE: &str = "podbr0";

/// How a pod is plugged into its node: the pod networking shapes a service proxy meets in
/// clusters (every one gives the pod an address of the node's subnet, so the other nodes'
/// host-gw or VXLAN routes reach it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodShape {
    /// twill-cni in its default bridge mode: a veth per pod on the bridge `cni0`, which holds
    /// the gateway (flannel's layout).
    TwillBridge,
    /// twill-cni in routed mode: a veth per pod, no bridge, a /32 route per pod.
    TwillRouted,
    /// The reference `bridge` plugin on a bridge named [`REF_BRIDGE`] holding the gateway,
    /// host-local IPAM (podman's and many hand-written configs' layout).
    RefBridge,
    /// The reference `ptp` plugin: a veth per pod whose host end holds the gateway as a /32,
    /// a /32 route per pod, host-local IPAM.
    Ptp,
    /// Calico's layout, made by hand: a veth per pod whose host end has no address and answers
    /// ARP by `proxy_arp`, a /32 route per pod, the pod routing via 169.254.1.1 on-link.
    RoutedVeth,
}

/// A netns cluster; dropping it removes everything it made, pass or fail.
///
/// Nodes are numbered from 1. Methods take `&self`, so scoped threads can share a rig.
#[derive(Debug)]
pub struct Rig {
    nodes: usize,
    bin_dir: Option<PathBuf>,
    rust_log: String,
    detachable: bool,
    /// Set by [`Rig::detach`]: the drop leaves everything in place.
    detached: bool,
    inner: Mutex<Inner>,
    /// Dropped after the processes in `inner` are killed: removes namespaces, pins, cgroups and
    /// the temporary directory.
    guard: NetnsGuard,
}

#[derive(Debug)]
struct Inner {
    etcd: Option<Child>,
    twilld: BTreeMap<usize, Child>,
    pods: BTreeMap<usize, u32>,
    /// Responders and other helpers started in pods; killed on drop.
    helpers: Vec<Child>,
}

impl Rig {
    /// A rig of `nodes` nodes with etcd running, see [`Rig::with_options`].
    pub fn new(nodes: usize) -> Result<Rig> {
        Rig::with_options(RigOptions {
            nodes,
            ..RigOptions::default()
        })
    }

    /// Sweeps rigs left by killed runs, then builds the underlay, the nodes and (by default)
    /// etcd, healthy. Needs root. On error everything built so far is removed.
    pub fn with_options(opts: RigOptions) -> Result<Rig> {
        ensure!(
            (1..=200).contains(&opts.nodes),
            "a rig has 1 to 200 nodes, not {}",
            opts.nodes
        );
        let guard = NetnsGuard::new().context("the netns rig")?;
        if let Err(e) = ensure_bpffs() {
            eprintln!("twill-rig: {e:#}");
        }
        // From here on the guard exists: an error below drops it, which removes what was built.
        let rig = Rig {
            nodes: opts.nodes,
            bin_dir: opts.bin_dir,
            rust_log: opts.rust_log,
            detachable: opts.detachable,
            detached: false,
            inner: Mutex::new(Inner {
                etcd: None,
                twilld: BTreeMap::new(),
                pods: BTreeMap::new(),
                helpers: Vec::new(),
            }),
            guard,
        };
        rig.build_network().context("build the rig network")?;
        if opts.etcd {
            rig.start_etcd()?;
        }
        Ok(rig)
    }

    /// Lets the rig outlive this guard and this process (`cargo xtask rig up`): marks its state
    /// file detached, so [`crate::state::sweep_stale`] leaves it alone, and drops the guard
    /// without tearing anything down. etcd and twilld keep running (build the rig with
    /// [`RigOptions::detachable`] so they also survive signals to this process's group).
    /// Returns the id for [`Rig::attach`] or [`crate::state::remove`].
    pub fn detach(mut self) -> Result<String> {
        self.guard.detach()?;
        self.detached = true;
        Ok(self.id().to_string())
    }

    /// A guard for detached rig `id`, owned by this process from now on: dropping it tears the
    /// rig down (call [`Rig::detach`] again to leave it up). The guard knows the rig's nodes and
    /// pods from the namespaces; it has no handles on the processes an earlier owner started, so
    /// [`Rig::kill_twilld`] and [`Rig::twilld_running`] do not see those (teardown does).
    pub fn attach(id: &str) -> Result<Rig> {
        let guard = NetnsGuard::attach(id)?;
        let node_prefix = format!("{id}-n");
        let mut nodes = 0;
        let mut pods: BTreeMap<usize, u32> = BTreeMap::new();
        for name in &guard.namespaces() {
            let Some(rest) = name.strip_prefix(&node_prefix) else {
                continue;
            };
            let (node, pod) = rest.split_once('p').unwrap_or((rest, ""));
            let Ok(node) = node.parse::<usize>() else {
                continue;
            };
            nodes = nodes.max(node);
            if let Ok(j) = pod.parse::<u32>() {
                let e = pods.entry(node).or_insert(0);
                *e = (*e).max(j);
            }
        }
        ensure!(nodes > 0, "rig {id} has no node namespaces");
        Ok(Rig {
            nodes,
            bin_dir: None,
            rust_log: "info".to_string(),
            detachable: true,
            detached: false,
            inner: Mutex::new(Inner {
                etcd: None,
                twilld: BTreeMap::new(),
                pods,
                helpers: Vec::new(),
            }),
            guard,
        })
    }

    /// The rig id: the prefix of every namespace, directory and pin path it uses.
    pub fn id(&self) -> &str {
        self.guard.id()
    }

    /// The number of nodes.
    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// The rig's temporary directory (etcd data, logs, subnet files).
    pub fn temp_dir(&self) -> &Path {
        self.guard.temp_dir()
    }

    /// The guard holding the rig's namespaces, cgroups and pins: a test that needs more of
    /// them (a namespace outside the rig's network) takes them from here.
    pub fn guard(&self) -> &NetnsGuard {
        &self.guard
    }

    /// The underlay namespace (the bridge `br0` and etcd).
    pub fn underlay_ns(&self) -> String {
        self.guard.name("u")
    }

    /// Node `node`'s namespace (`<id>-n<node>`).
    pub fn node_ns(&self, node: usize) -> String {
        self.check_node(node);
        self.guard.name(&format!("n{node}"))
    }

    /// Node `node`'s underlay IPv4 address, `198.18.0.(10+node)`.
    pub fn node_ip(node: usize) -> Ipv4Addr {
        let last = u8::try_from(10 + node).expect("node number below 246");
        Ipv4Addr::new(198, 18, 0, last)
    }

    /// Node `node`'s underlay IPv6 address, `fd74:7769::(10+node)` (the same digits as the
    /// last IPv4 octet, read as hex).
    pub fn node_ip6(node: usize) -> Ipv6Addr {
        format!("fd74:7769::{}", 10 + node)
            .parse()
            .expect("node number below 246")
    }

    /// Node `node`'s directory in the temp dir (subnet file, twilld log).
    pub fn node_dir(&self, node: usize) -> PathBuf {
        self.check_node(node);
        self.temp_dir().join(format!("n{node}"))
    }

    fn check_node(&self, node: usize) {
        assert!(
            (1..=self.nodes).contains(&node),
            "node {node} out of range 1..={}",
            self.nodes
        );
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn build_network(&self) -> Result<()> {
        let mut shorts = vec!["u".to_string()];
        shorts.extend((1..=self.nodes).map(|i| format!("n{i}")));
        let shorts: Vec<&str> = shorts.iter().map(String::as_str).collect();
        let mut nodes = self.guard.netns_all(&shorts)?;
        let underlay = nodes.remove(0);

        let mut script = format!(
            "link add br0 type bridge mcast_snooping 0\n\
             addr add {UNDERLAY_V4}/24 dev br0\n\
             addr add {UNDERLAY_V6}/64 dev br0 nodad\n\
             link set br0 up\n"
        );
        for (i, node_ns) in nodes.iter().enumerate() {
            let n = i + 1;
            let _ = write!(
                script,
                "link add n{n} type veth peer name eth0 netns {node_ns}\n\
                 link set n{n} master br0 up\n"
            );
        }
        ip_batch(Some(&underlay), &script)?;

        for (i, node_ns) in nodes.iter().enumerate() {
            let n = i + 1;
            ns::sysctl(node_ns, "net.ipv4.ip_forward", "1")?;
            ns::sysctl(node_ns, "net.ipv6.conf.default.forwarding", "1")?;
            ns::sysctl(node_ns, "net.ipv6.conf.all.forwarding", "1")?;
            ip_batch(
                Some(node_ns),
                &format!(
                    "addr add {}/24 dev eth0\n\
                     addr add {}/64 dev eth0 nodad\n\
                     link set eth0 up\n",
                    Rig::node_ip(n),
                    Rig::node_ip6(n)
                ),
            )?;
        }
        Ok(())
    }

    // ---- etcd ----------------------------------------------------------------------------

    /// Starts etcd in the underlay namespace (data dir `<temp>/etcd`, so a restart brings back the
    /// same member and data) and waits until it reports healthy.
    pub fn start_etcd(&self) -> Result<()> {
        let mut inner = self.lock();
        if let Some(child) = inner.etcd.as_mut()
            && child.try_wait()?.is_none()
        {
            bail!("etcd is already running");
        }
        let data_dir = self.temp_dir().join("etcd");
        let log_path = self.temp_dir().join("etcd.log");
        let id = self.id().to_string();
        let log = append_log(&log_path, "starting etcd")?;
        let peer = "http://198.18.0.1:2380";
        let args: Vec<String> = vec![
            "etcd".into(),
            "--name".into(),
            id.clone(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--listen-client-urls".into(),
            ETCD_ENDPOINT.into(),
            "--advertise-client-urls".into(),
            ETCD_ENDPOINT.into(),
            "--listen-peer-urls".into(),
            peer.into(),
            "--initial-advertise-peer-urls".into(),
            peer.into(),
            "--initial-cluster".into(),
            format!("{id}={peer}"),
            "--initial-cluster-token".into(),
            id,
            "--initial-cluster-state".into(),
            "new".into(),
            "--logger".into(),
            "zap".into(),
            "--log-outputs".into(),
            "stderr".into(),
        ];
        let mut cmd = nsenter(&self.underlay_ns(), &args);
        if self.detachable {
            cmd.process_group(0);
        }
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD") {
                cmd.env_remove(key);
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn etcd (is etcd-server installed? run cargo xtask setup)")?;
        self.guard.record_process(&child, "etcd")?;
        inner.etcd = Some(child);

        let addr = SocketAddr::from((UNDERLAY_V4, 2379));
        let deadline = Instant::now() + ETCD_READY;
        loop {
            if let Ok(resp) = ns::http_get(&self.underlay_ns(), addr, "/health")
                && resp.body.contains("\"health\":\"true\"")
            {
                return Ok(());
            }
            if let Some(status) = inner
                .etcd
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "etcd exited ({status}) before becoming healthy:\n{}",
                    tail(&log_path, 20)
                );
            }
            if crate::interrupted() {
                bail!("interrupted");
            }
            if Instant::now() >= deadline {
                bail!(
                    "etcd not healthy after {ETCD_READY:?}:\n{}",
                    tail(&log_path, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops etcd (SIGTERM, SIGKILL after 10 s) and waits for it to exit.
    pub fn stop_etcd(&self) -> Result<()> {
        let mut inner = self.lock();
        let mut child = inner
            .etcd
            .take()
            .ok_or_else(|| anyhow!("etcd is not running"))?;
        let _ = kill(Pid::from_raw(child_pid(&child)), Signal::SIGTERM);
        let status = ns::wait_uninterruptible(&mut child, STOP_GRACE).context("stop etcd");
        self.guard.forget_process(child.id())?;
        status.map(|_| ())
    }

    /// Runs `etcdctl` (API v3, against the rig's etcd) inside the underlay namespace; its stdout,
    /// or an error with its stderr.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let endpoints = format!("--endpoints={ETCD_ENDPOINT}");
        let mut full = vec!["etcdctl", &endpoints, "--dial-timeout=2s"];
        full.extend_from_slice(args);
        let mut cmd = nsenter(&self.underlay_ns(), &full);
        cmd.env("ETCDCTL_API", "3");
        let what = format!(
            "{} in netns {}",
            ns::display_args(&full),
            self.underlay_ns()
        );
        let out = ns::output_bounded(cmd, None, Duration::from_secs(30), true, &what)?;
        ns::check_output(&out, &what)
    }

    /// Writes the network config twilld reads (`<prefix>/config`, default prefix).
    pub fn put_network_config(&self, json: &str) -> Result<()> {
        let key = format!("{ETCD_PREFIX}/config");
        self.etcdctl(&["put", &key, json])
            .map(|_| ())
            .with_context(|| format!("put {key}"))
    }

    // ---- twilld --------------------------------------------------------------------------

    /// Where `twilld` is expected:
    /// [`RigOptions::bin_dir`], else `TWILL_BIN_DIR`, else the `target/<profile>/` directory of
    /// the running executable (test binaries live in `target/<profile>/deps/`).
    pub fn twilld_path(&self) -> Result<PathBuf> {
        self.binary("twilld")
    }

    /// The directory the rig takes twill's binaries from (see [`Rig::twilld_path`]).
    pub fn bin_dir(&self) -> Result<PathBuf> {
        match (&self.bin_dir, std::env::var_os("TWILL_BIN_DIR")) {
            (Some(dir), _) => Ok(dir.clone()),
            (None, Some(dir)) => Ok(PathBuf::from(dir)),
            (None, None) => {
                let exe = std::env::current_exe().context("locate the running executable")?;
                let dir = exe.parent().context("executable has no directory")?;
                if dir.file_name().is_some_and(|n| n == "deps") {
                    Ok(dir.parent().context("deps has no parent")?.to_path_buf())
                } else {
                    Ok(dir.to_path_buf())
                }
            }
        }
    }

    /// twill's binary `name` (`twilld`, `twill-cni`, `twill-probe`) in [`Rig::bin_dir`]; an
    /// error saying how to build it if it is not there.
    pub fn binary(&self, name: &str) -> Result<PathBuf> {
        let path = self.bin_dir()?.join(name);
        ensure!(
            path.is_file(),
            "{name} not found at {}: build it with cargo build --workspace --bins \
             (or point TWILL_BIN_DIR at its directory)",
            path.display()
        );
        Ok(path)
    }

    /// The subnet file node `node`'s twilld writes.
    pub fn subnet_file(&self, node: usize) -> PathBuf {
        self.node_dir(node).join("subnet.env")
    }

    /// The bpf pin directory the rig gives node `node`'s twilld (`/sys/fs/bpf/twill/<id>-n<node>`).
    pub fn pin_dir(&self, node: usize) -> PathBuf {
        self.check_node(node);
        Path::new(PIN_ROOT).join(self.guard.name(&format!("n{node}")))
    }

    /// The log of node `node`'s twilld (all its runs, appended).
    pub fn twilld_log_path(&self, node: usize) -> PathBuf {
        self.node_dir(node).join("twilld.log")
    }

    /// The identity file node `node`'s twilld keeps (`<temp>/n<node>/node-id`): the rig's nodes
    /// share the host's file system, so each gets its own instead of the default path.
    pub fn node_id_file(&self, node: usize) -> PathBuf {
        self.node_dir(node).join("node-id")
    }

    /// Starts twilld on node `node`:
    /// `twilld --etcd-endpoints http://198.18.0.1:2379 --iface eth0 --subnet-file
    /// <temp>/n<node>/subnet.env --healthz-port 0 --bpf-pin-dir <pin dir> --node-id-file
    /// <temp>/n<node>/node-id <extra_args>`, with `RUST_LOG` and its output appended to
    /// [`Rig::twilld_log_path`].
    pub fn start_twilld(&self, node: usize, extra_args: &[&str]) -> Result<()> {
        self.start_twilld_env(node, extra_args, &[])
    }

    /// [`Rig::start_twilld`] with extra environment variables (test hooks such as
    /// `TWILL_TEST_DISABLE_EBPF=1`).
    pub fn start_twilld_env(
        &self,
        node: usize,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<()> {
        let bin = self.twilld_path()?;
        let node_ns = self.node_ns(node);
        let mut inner = self.lock();
        if let Some(child) = inner.twilld.get_mut(&node)
            && child.try_wait()?.is_none()
        {
            bail!("twilld already runs on node {node}");
        }
        let dir = self.node_dir(node);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mut args: Vec<String> = vec![
            bin.display().to_string(),
            "--etcd-endpoints".into(),
            ETCD_ENDPOINT.into(),
            "--iface".into(),
            "eth0".into(),
            "--subnet-file".into(),
            self.subnet_file(node).display().to_string(),
            "--healthz-port".into(),
            "0".into(),
        ];
        if !extra_args.contains(&"--bpf-pin-dir") {
            let pin = self.pin_dir(node);
            if let Err(e) = self.guard.pin_dir(&format!("n{node}")) {
                eprintln!("twill-rig: {e:#}");
            }
            args.extend(["--bpf-pin-dir".into(), pin.display().to_string()]);
        }
        if !extra_args.contains(&"--node-id-file") {
            args.extend([
                "--node-id-file".into(),
                self.node_id_file(node).display().to_string(),
            ]);
        }
        args.extend(extra_args.iter().map(|s| (*s).to_string()));
        let log_path = self.twilld_log_path(node);
        let log = append_log(&log_path, &format!("starting {}", args.join(" ")))?;
        let mut cmd = nsenter(&node_ns, &args);
        if self.detachable {
            cmd.process_group(0);
        }
        let child = cmd
            .env("RUST_LOG", &self.rust_log)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn twilld on node {node}"))?;
        self.guard
            .record_process(&child, &format!("twilld n{node}"))?;
        inner.twilld.insert(node, child);
        Ok(())
    }

    /// Sends `signal` to node `node`'s twilld and waits (up to 10 s, then SIGKILL) for it to
    /// exit; its exit status. Use [`Rig::signal_twilld`] for signals that do not end it.
    pub fn kill_twilld(&self, node: usize, signal: Signal) -> Result<ExitStatus> {
        let mut inner = self.lock();
        let mut child = inner
            .twilld
            .remove(&node)
            .ok_or_else(|| anyhow!("twilld was not started on node {node}"))?;
        let _ = kill(Pid::from_raw(child_pid(&child)), signal);
        let status = ns::wait_uninterruptible(&mut child, STOP_GRACE)
            .with_context(|| format!("stop twilld on node {node} with {signal}"));
        self.guard.forget_process(child.id())?;
        status
    }

    /// Sends `signal` to node `node`'s twilld without waiting.
    pub fn signal_twilld(&self, node: usize, signal: Signal) -> Result<()> {
        let inner = self.lock();
        let child = inner
            .twilld
            .get(&node)
            .ok_or_else(|| anyhow!("twilld was not started on node {node}"))?;
        kill(Pid::from_raw(child_pid(child)), signal)
            .with_context(|| format!("kill({signal}) twilld on node {node}"))
    }

    /// Whether node `node`'s twilld is running.
    pub fn twilld_running(&self, node: usize) -> bool {
        let mut inner = self.lock();
        inner
            .twilld
            .get_mut(&node)
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits until node `node`'s subnet file exists and parses; an error (with the log's tail)
    /// on timeout or if twilld exits first.
    pub fn wait_subnet_file(&self, node: usize, timeout: Duration) -> Result<SubnetFacts> {
        let path = self.subnet_file(node);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(facts) = SubnetFacts::read(&path) {
                return Ok(facts);
            }
            let exited = {
                let mut inner = self.lock();
                match inner.twilld.get_mut(&node) {
                    None => Some("was never started".to_string()),
                    Some(c) => c.try_wait()?.map(|s| format!("exited ({s})")),
                }
            };
            if let Some(why) = exited {
                bail!(
                    "no subnet file {}: twilld on node {node} {why}; its log ends:\n{}",
                    path.display(),
                    tail(&self.twilld_log_path(node), 30)
                );
            }
            if crate::interrupted() {
                bail!("interrupted");
            }
            if Instant::now() >= deadline {
                bail!(
                    "no subnet file {} after {timeout:?}; twilld's log on node {node} ends:\n{}",
                    path.display(),
                    tail(&self.twilld_log_path(node), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the overlay has converged: every node routes the pod subnet(s) of every other
    /// node, `facts[i]` being node `i + 1`'s subnet file (one route per peer subnet, as the
    /// vxlan and host-gw backends write them; not for the udp backend, whose routing table
    /// lives in twilld). A node learns a peer's lease from its lease watch, some time after the
    /// peer wrote its subnet file: until then a pod on one node reaches another node's pods one
    /// way only (the replies have no route), while everything else already answers. An error
    /// naming the missing routes and the nodes' logs on timeout.
    pub fn wait_peer_routes(&self, facts: &[SubnetFacts], timeout: Duration) -> Result<()> {
        let missing = || -> Result<Vec<String>> {
            let mut missing = Vec::new();
            for node in 1..=facts.len() {
                let table = crate::net::routes(&self.node_ns(node))?;
                let peers = facts
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| i + 1 != node)
                    .flat_map(|(_, f)| {
                        let v4 = f.subnet_v4().map(|n| n.to_string());
                        v4.into_iter().chain(f.subnet_v6().map(|n| n.to_string()))
                    });
                for net in peers {
                    let routed = table
                        .lines()
                        .any(|l| l.split_whitespace().next() == Some(net.as_str()));
                    if !routed {
                        missing.push(format!("node {node} has no route to {net}"));
                    }
                }
            }
            Ok(missing)
        };
        let deadline = Instant::now() + timeout;
        loop {
            let now_missing = missing()?;
            if now_missing.is_empty() {
                return Ok(());
            }
            if crate::interrupted() {
                bail!("interrupted");
            }
            if Instant::now() >= deadline {
                let mut logs = String::new();
                for n in 1..=facts.len() {
                    let _ = writeln!(
                        logs,
                        "twilld's log on node {n} ends:\n{}",
                        tail(&self.twilld_log_path(n), 20)
                    );
                }
                bail!(
                    "the overlay did not converge within {timeout:?}: {}\n{logs}",
                    now_missing.join(", ")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Node `node`'s twilld log so far (empty if it never ran).
    pub fn twilld_log(&self, node: usize) -> String {
        std::fs::read_to_string(self.twilld_log_path(node)).unwrap_or_default()
    }

    // ---- pods ----------------------------------------------------------------------------

    /// Creates a pod on node `node` without CNI: the bridge `cni0` holding the gateway address(es)
    /// of `facts` (made once per node), and a pod namespace `<id>-n<node>p<j>` whose `eth0` gets
    /// the next free address(es) of the subnet, default routes via the gateway, MTU from `facts`.
    pub fn add_pod(&self, node: usize, facts: &SubnetFacts) -> Result<Pod> {
        let node_ns = self.node_ns(node);
        let j = self.next_pod_number(node);
        let pod_short = format!("n{node}p{j}");
        let host_if = format!("vp{j}");
        let mtu = facts.mtu;

        let ipv4 = match (facts.subnet, facts.subnet_v4()) {
            (Some(gw), Some(net)) => {
                let ip = Ipv4Addr::from(u32::from(gw.addr()) + j);
                ensure!(
                    net.contains(&ip) && ip != net.broadcast(),
                    "subnet {net} is full"
                );
                Some((ip, gw))
            }
            _ => None,
        };
        let ipv6 = match (facts.ipv6_subnet, facts.subnet_v6()) {
            (Some(gw), Some(net)) => {
                let ip = Ipv6Addr::from(u128::from(gw.addr()) + u128::from(j));
                ensure!(net.contains(&ip), "subnet {net} is full");
                Some((ip, gw))
            }
            _ => None,
        };
        ensure!(
            ipv4.is_some() || ipv6.is_some(),
            "facts carry no subnet: {facts:?}"
        );

        let pod_ns = self.guard.netns(&pod_short)?;

        let has_bridge = ns::output_bounded(
            {
                let mut c = std::process::Command::new("ip");
                c.args(["-n", &node_ns, "link", "show", "dev", "cni0"]);
                c
            },
            None,
            ns::DEFAULT_TIMEOUT,
            false,
            "ip link show cni0",
        )?
        .status
        .success();
        let mut node_script = String::new();
        if !has_bridge {
            let _ = writeln!(node_script, "link add cni0 mtu {mtu} type bridge");
            if let Some((_, gw)) = ipv4 {
                let _ = writeln!(node_script, "addr add {gw} dev cni0");
            }
            if let Some((_, gw)) = ipv6 {
                let _ = writeln!(node_script, "addr add {gw} dev cni0 nodad");
            }
            node_script.push_str("link set cni0 up\n");
        }
        let _ = write!(
            node_script,
            "link add {host_if} mtu {mtu} type veth peer name eth0 netns {pod_ns}\n\
             link set {host_if} master cni0 up\n"
        );
        ip_batch(Some(&node_ns), &node_script)?;

        let mut pod_script = format!("link set eth0 mtu {mtu} up\n");
        if let Some((ip, gw)) = ipv4 {
            let _ = write!(
                pod_script,
                "addr add {ip}/{} dev eth0\nroute add default via {}\n",
                gw.prefix_len(),
                gw.addr()
            );
        }
        if let Some((ip, gw)) = ipv6 {
            let _ = write!(
                pod_script,
                "addr add {ip}/{} dev eth0 nodad\nroute add ::/0 via {}\n",
                gw.prefix_len(),
                gw.addr()
            );
        }
        ip_batch(Some(&pod_ns), &pod_script)?;
        Ok(Pod {
            ns: pod_ns,
            node,
            ipv4: ipv4.map(|(ip, _)| ip),
            ipv6: ipv6.map(|(ip, _)| ip),
        })
    }

    /// The network configuration list node `node`'s pods are made with (`twill.conflist` in the
    /// node's directory: twill-cni reading the node's subnet file, its IPAM state in the node's
    /// directory). Written by the first [`Rig::add_cni_pod`]; usable with podman or `cnitool`.
    pub fn cni_conflist_path(&self, node: usize) -> PathBuf {
        self.node_dir(node).join("twill.conflist")
    }

    /// Creates a pod on node `node` through the real `twill-cni`: a pod namespace
    /// `<id>-n<node>p<j>`, then `CNI_COMMAND=ADD` exec'ed inside the node's namespace with the
    /// CNI environment (`CNI_NETNS=/run/netns/<pod>`, `CNI_IFNAME=eth0`, ...) and the plugin's
    /// network config on stdin, as a runtime does it. The node's twilld must have written its
    /// subnet file. The pod's addresses are the ones in the plugin's result.
    pub fn add_cni_pod(&self, node: usize) -> Result<Pod> {
        let cni = self.binary("twill-cni")?;
        let conflist = self.cni_conflist_path(node);
        if !conflist.exists() {
            let list = serde_json::json!({
                "cniVersion": CNI_VERSION,
                "name": CNI_NETWORK,
                "plugins": [{
                    "type": "twill-cni",
                    "subnetFile": self.subnet_file(node),
                    "dataDir": self.node_dir(node).join("cni"),
                }],
            });
            std::fs::write(&conflist, serde_json::to_vec_pretty(&list)?)
                .with_context(|| format!("write {}", conflist.display()))?;
        }
        let list: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&conflist).with_context(|| format!("read {}", conflist.display()))?,
        )
        .with_context(|| format!("parse {}", conflist.display()))?;
        // What a runtime sends each plugin of a list: the list's version and name, the plugin's
        // own object.
        let mut netconf = list["plugins"][0].clone();
        netconf["cniVersion"] = list["cniVersion"].clone();
        netconf["name"] = list["name"].clone();
        self.cni_add(node, &cni, &netconf)
    }

    /// Creates a pod on node `node` shaped as `shape` (see [`PodShape`]); `facts` is the node's
    /// subnet file (the plugins and the hand-made shapes take the pod's address from its
    /// subnet, so the other nodes' routes reach it).
    pub fn add_shaped_pod(&self, node: usize, shape: PodShape, facts: &SubnetFacts) -> Result<Pod> {
        let subnet = facts
            .subnet_v4()
            .with_context(|| format!("node {node}'s facts carry no IPv4 subnet: {facts:?}"))?;
        // The reference plugins speak CNI 1.0.0 (containernetworking-plugins 1.1.1); host-local
        // keeps its state in the node's directory, so rigs never share it.
        let host_local = serde_json::json!({
            "type": "host-local",
            "ranges": [[{"subnet": subnet.to_string()}]],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": self.node_dir(node).join("host-local"),
        });
        let reference = |plugin: serde_json::Value| -> Result<Pod> {
            let mut netconf = serde_json::json!({"cniVersion": "1.0.0", "name": CNI_NETWORK});
            for (k, v) in plugin.as_object().into_iter().flatten() {
                netconf[k] = v.clone();
            }
            let bin = Path::new(REFERENCE_CNI_DIR).join(netconf["type"].as_str().unwrap_or(""));
            ensure!(
                bin.is_file(),
                "{} not found: install the reference CNI plugins (cargo xtask setup)",
                bin.display()
            );
            self.cni_add(node, &bin, &netconf)
        };
        match shape {
            PodShape::TwillBridge => self.add_cni_pod(node),
            PodShape::TwillRouted => {
                let netconf = serde_json::json!({
                    "cniVersion": CNI_VERSION,
                    "name": CNI_NETWORK,
                    "type": "twill-cni",
                    "subnetFile": self.subnet_file(node),
                    "dataDir": self.node_dir(node).join("cni"),
                    "mode": "routed",
                });
                self.cni_add(node, &self.binary("twill-cni")?, &netconf)
            }
            PodShape::RefBridge => reference(serde_json::json!({
                "type": "bridge",
                "bridge": REF_BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": host_local,
            })),
            PodShape::Ptp => reference(serde_json::json!({
                "type": "ptp",
                "ipMasq": false,
                "ipam": host_local,
            })),
            PodShape::RoutedVeth => self.add_routed_veth_pod(node, facts),
        }
    }

    /// A pod shaped as Calico makes them, by hand: a veth `cali<j>` whose host end has no
    /// address, answers ARP for everything (`proxy_arp`) and carries a /32 route to the pod; the
    /// pod has its address as a /32 and a default route via 169.254.1.1 on-link. Proxy ARP
    /// answers only for addresses the node routes elsewhere, as a real node does through its
    /// default route: the node gets one, towards the underlay bridge (inside the rig).
    fn add_routed_veth_pod(&self, node: usize, facts: &SubnetFacts) -> Result<Pod> {
        let node_ns = self.node_ns(node);
        let gw = facts
            .subnet
            .with_context(|| format!("node {node}'s facts carry no IPv4 subnet: {facts:?}"))?;
        let j = self.next_pod_number(node);
        let ip = Ipv4Addr::from(u32::from(gw.addr()) + j);
        ensure!(
            gw.contains(&ip) && ip != gw.broadcast(),
            "subnet {gw} is full"
        );
        let pod_short = format!("n{node}p{j}");
        let host_if = format!("cali{j}");
        let mtu = facts.mtu;
        let pod_ns = self.guard.netns(&pod_short)?;
        ip_batch(
            Some(&node_ns),
            &format!("link add {host_if} mtu {mtu} type veth peer name eth0 netns {pod_ns}\n"),
        )?;
        ns::sysctl(&node_ns, &format!("net.ipv4.conf.{host_if}.proxy_arp"), "1")?;
        ns::sysctl(
            &node_ns,
            &format!("net.ipv4.neigh.{host_if}.proxy_delay"),
            "0",
        )?;
        ip_batch(
            Some(&node_ns),
            &format!(
                "link set {host_if} up\nroute add {ip}/32 dev {host_if} scope link\n\
                 route replace default via {UNDERLAY_V4} dev eth0\n"
            ),
        )?;
        ip_batch(
            Some(&pod_ns),
            &format!(
                "link set eth0 mtu {mtu} up\naddr add {ip}/32 dev eth0\n\
                 route add 169.254.1.1 dev eth0 scope link\n\
                 route add default via 169.254.1.1 dev eth0\n"
            ),
        )?;
        Ok(Pod {
            ns: pod_ns,
            node,
            ipv4: Some(ip),
            ipv6: None,
        })
    }

    /// The next pod number of node `node` (pod namespaces are `<node ns>p<j>`).
    fn next_pod_number(&self, node: usize) -> u32 {
        let mut inner = self.lock();
        let j = inner.pods.entry(node).or_insert(0);
        *j += 1;
        *j
    }

    /// Runs CNI `ADD` of the plugin `plugin` with `netconf` for a new pod namespace of node
    /// `node`, exec'ed inside the node's namespace with the CNI environment, as a runtime does
    /// it; the pod's addresses are the ones in the plugin's result.
    fn cni_add(&self, node: usize, plugin: &Path, netconf: &serde_json::Value) -> Result<Pod> {
        let node_ns = self.node_ns(node);
        let j = self.next_pod_number(node);
        let pod_short = format!("n{node}p{j}");
        let pod_ns = self.guard.netns(&pod_short)?;

        let twill_dir = self.bin_dir()?;
        let mut cmd = nsenter(&node_ns, &[plugin]);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", &pod_ns)
            .env("CNI_NETNS", ns::netns_path(&pod_ns))
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_PATH",
                format!("{}:{REFERENCE_CNI_DIR}", twill_dir.display()),
            );
        let what = format!("{} ADD {pod_ns} in netns {node_ns}", plugin.display());
        let out = ns::output_bounded(
            cmd,
            Some(&serde_json::to_vec(netconf)?),
            Duration::from_secs(30),
            true,
            &what,
        )?;
        ensure!(
            out.status.success(),
            "{what} failed ({}): {} {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let result: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("{what}: the result is not JSON"))?;
        let (ipv4, ipv6) = cni_result_addresses(&result);
        ensure!(
            ipv4.is_some() || ipv6.is_some(),
            "{what}: the result has no address: {result}"
        );
        Ok(Pod {
            ns: pod_ns,
            node,
            ipv4,
            ipv6,
        })
    }

    /// Node `node`'s cgroup2 directory (`<cgroup2>/twill-<id>-n<node>`), created on first use
    /// and recorded first, so teardown and sweeps remove it. The eBPF service proxy's socket-level
    /// load balancer attaches here ([`Rig::proxy_args`]); processes of the node's "pods" that
    /// should be balanced at connect() run inside it ([`nsenter_in_cgroup`]).
    pub fn node_cgroup(&self, node: usize) -> Result<PathBuf> {
        self.check_node(node);
        self.guard.cgroup(&format!("n{node}"))
    }

    /// The twilld flags that turn node `node`'s service proxy on in `mode` (`ebpf`, `nftables`,
    /// `iptables`): `--proxy-mode MODE --node-name n<node>`, and for `ebpf` `--lb-cgroup` with
    /// the node's own cgroup (never the cgroup2 root, which other users of the machine share).
    /// `--node-name` is what makes an EndpointSlice's `nodeName: n<node>` local: the rig's nodes
    /// share the host's UTS namespace, so without it every node would carry the host's name.
    pub fn proxy_args(&self, node: usize, mode: &str) -> Result<Vec<String>> {
        let mut args = vec![
            "--proxy-mode".to_string(),
            mode.to_string(),
            "--node-name".to_string(),
            format!("n{node}"),
        ];
        if mode == "ebpf" {
            args.push("--lb-cgroup".into());
            args.push(self.node_cgroup(node)?.display().to_string());
        }
        Ok(args)
    }

    /// Starts `twill-probe serve` in `pod`, answering every TCP connection on each of `ports`
    /// (on the pod's address) with `name`, and waits until it accepts. Recorded with the rig's
    /// processes (and in a process group of its own when the rig is detachable); its output
    /// goes to `<temp>/responders.log`.
    pub fn start_responder(&self, pod: &Pod, name: &str, ports: &[u16]) -> Result<()> {
        let probe = self.binary("twill-probe")?;
        let ip = pod
            .ip()
            .with_context(|| format!("pod {} has no address", pod.ns))?;
        ensure!(!ports.is_empty(), "a responder needs a port");
        let mut args: Vec<String> = vec![probe.display().to_string(), "serve".into()];
        for port in ports {
            args.push("--listen".into());
            args.push(SocketAddr::new(ip, *port).to_string());
        }
        args.push("--name".into());
        args.push(name.to_string());
        let log = append_log(
            &self.temp_dir().join("responders.log"),
            &format!("starting {}", args.join(" ")),
        )?;
        let mut cmd = nsenter(&pod.ns, &args);
        if self.detachable {
            cmd.process_group(0);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn the responder in {}", pod.ns))?;
        self.guard
            .record_process(&child, &format!("responder {name}"))?;
        self.lock().helpers.push(child);
        let addr = SocketAddr::new(ip, ports[0]);
        crate::wait_until(Duration::from_secs(10), || {
            ns::in_netns(&pod.ns, || {
                Ok(TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
            })
            .unwrap_or(false)
        })
        .with_context(|| {
            format!(
                "the responder in {} does not accept on {addr}:\n{}",
                pod.ns,
                tail(&self.temp_dir().join("responders.log"), 10)
            )
        })
    }

    /// `twilld apply -f` of `manifest` (YAML or JSON, several documents allowed), run in the
    /// underlay namespace against the rig's etcd.
    pub fn apply_manifest(&self, manifest: &str) -> Result<()> {
        let dir = self.temp_dir().join("manifests");
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let n = std::fs::read_dir(&dir).map_or(0, Iterator::count);
        let file = dir.join(format!("{n:04}.yaml"));
        std::fs::write(&file, manifest).with_context(|| format!("write {}", file.display()))?;
        let bin = self.twilld_path()?;
        let file_arg = file.display().to_string();
        let args = [
            bin.to_str().context("twilld path is not UTF-8")?,
            "apply",
            "-f",
            &file_arg,
            "--etcd-endpoints",
            ETCD_ENDPOINT,
        ];
        let what = format!("twilld apply -f {file_arg}");
        let out = ns::output_bounded(
            nsenter(&self.underlay_ns(), &args),
            None,
            Duration::from_secs(30),
            true,
            &what,
        )?;
        ns::check_output(&out, &what).map(|_| ())
    }

    // ---- teardown ------------------------------------------------------------------------

    /// Prints the tail of etcd's log and of every node's twilld log to stderr. The guard does
    /// this by itself when dropped during a panic (a failing test) or when `TWILL_RIG_LOGS` is set.
    pub fn print_logs(&self) {
        let mut out = String::new();
        let etcd = self.temp_dir().join("etcd.log");
        if etcd.exists() {
            let _ = write!(
                out,
                "---- rig {}: etcd log (last 20 lines) ----\n{}\n",
                self.id(),
                tail(&etcd, 20)
            );
        }
        for node in 1..=self.nodes {
            let path = self.twilld_log_path(node);
            if path.exists() {
                let _ = write!(
                    out,
                    "---- rig {}: twilld log of node {node} (last {LOG_TAIL_LINES} lines) ----\n{}\n",
                    self.id(),
                    tail(&path, LOG_TAIL_LINES)
                );
            }
        }
        eprint!("{out}");
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if std::thread::panicking() || std::env::var_os("TWILL_RIG_LOGS").is_some() {
            self.print_logs();
        }
        let inner = self.inner.get_mut().unwrap_or_else(PoisonError::into_inner);
        let children = inner
            .twilld
            .values_mut()
            .chain(inner.etcd.as_mut())
            .chain(inner.helpers.iter_mut());
        for child in children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The guard, dropped next, removes namespaces, pins, cgroups and files.
    }
}

/// The pod addresses in a CNI result (any version from 0.3.0 on): the first IPv4 and the first
/// IPv6 address of `ips[]`, without their prefix length.
pub fn cni_result_addresses(result: &serde_json::Value) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
    let mut v4 = None;
    let mut v6 = None;
    for ip in result["ips"].as_array().into_iter().flatten() {
        let Some(addr) = ip["address"].as_str() else {
            continue;
        };
        match addr
            .split('/')
            .next()
            .and_then(|a| a.parse::<IpAddr>().ok())
        {
            Some(IpAddr::V4(a)) if v4.is_none() => v4 = Some(a),
            Some(IpAddr::V6(a)) if v6.is_none() => v6 = Some(a),
            _ => {}
        }
    }
    (v4, v6)
}

/// A `Command` that runs `args` inside namespace `ns` *and* cgroup `cgroup`: the child moves
/// itself into the cgroup (writes `0` to its `cgroup.procs`) before exec'ing `nsenter`. A
/// process of a node's pod started this way is balanced by the node's eBPF socket-level load
/// balancer at `connect()`, as a real pod's processes are.
pub fn nsenter_in_cgroup<S: AsRef<OsStr>>(ns: &str, cgroup: &Path, args: &[S]) -> Command {
    let mut cmd = nsenter(ns, args);
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())
        .expect("a cgroup path has no NUL byte");
    // SAFETY: between fork and exec only async-signal-safe calls (open, write, close) on memory
    // allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if written != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
    cmd
}

/// A Service and its EndpointSlice as `twilld apply -f` takes them: `name` in namespace
/// `default`, ClusterIP `cluster_ip`, TCP `port` → `target_port`, type NodePort when
/// `node_port` is given, one ready endpoint per `(address, node)` with `nodeName: n<node>`.
pub fn service_manifest(
    name: &str,
    cluster_ip: IpAddr,
    port: u16,
    target_port: u16,
    node_port: Option<u16>,
    endpoints: &[(IpAddr, usize)],
) -> String {
    let mut spec = crate::ServiceSpec::new(name, cluster_ip).tcp("http", port, target_port);
    if let Some(p) = node_port {
        spec = spec.node_port(p);
    }
    for (addr, node) in endpoints {
        spec = spec.endpoint(*addr, Some(&format!("n{node}")));
    }
    spec.manifest()
}

/// Mounts bpffs at `/sys/fs/bpf` unless it is there already; whether it mounted it.
pub fn ensure_bpffs() -> Result<bool> {
    let target = Path::new("/sys/fs/bpf");
    let st =
        nix::sys::statfs::statfs(target).with_context(|| format!("statfs {}", target.display()))?;
    if st.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC {
        return Ok(false);
    }
    nix::mount::mount(
        Some("bpffs"),
        target,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mount bpffs at {}", target.display()))?;
    Ok(true)
}

fn child_pid(child: &Child) -> i32 {
    i32::try_from(child.id()).expect("pid fits i32")
}

/// Opens `path` for appending and writes a header line.
fn append_log(path: &Path, header: &str) -> Result<std::fs::File> {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    writeln!(f, "==== twill-rig: {header}")?;
    Ok(f)
}

/// The last `n` lines of the file at `path` (a note if it cannot be read).
pub(crate) fn tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_results_give_the_pod_addresses() {
        let r: serde_json::Value = serde_json::from_str(
            r#"{"cniVersion":"1.1.0","ips":[{"address":"10.244.3.2/24","gateway":"10.244.3.1"},
                {"address":"fd00:10:0:3::2/64"},{"address":"10.244.3.9/24"}]}"#,
        )
        .unwrap();
        let (v4, v6) = cni_result_addresses(&r);
        assert_eq!(v4, Some(Ipv4Addr::new(10, 244, 3, 2)));
        assert_eq!(v6, Some("fd00:10:0:3::2".parse().unwrap()));
        assert_eq!(
            cni_result_addresses(&serde_json::json!({"ips": []})),
            (None, None)
        );
    }

    #[test]
    fn service_manifests_name_every_endpoint_and_its_node() {
        use serde::Deserialize as _;
        let m = service_manifest(
            "echo",
            "10.96.0.10".parse().unwrap(),
            80,
            8080,
            Some(30080),
            &[
                ("10.244.1.2".parse().unwrap(), 1),
                ("10.244.2.2".parse().unwrap(), 2),
            ],
        );
        let docs: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&m)
            .map(|d| serde_json::Value::deserialize(d).unwrap())
            .collect();
        let (svc, slice) = (&docs[0], &docs[1]);
        assert_eq!(svc["kind"], "Service");
        assert_eq!(svc["spec"]["type"], "NodePort");
        assert_eq!(svc["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(
            svc["spec"]["ports"][0],
            serde_json::json!({"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080, "nodePort": 30080})
        );
        assert_eq!(slice["kind"], "EndpointSlice");
        assert_eq!(
            slice["metadata"]["labels"]["kubernetes.io/service-name"],
            "echo"
        );
        assert_eq!(slice["endpoints"][1]["addresses"][0], "10.244.2.2");
        assert_eq!(slice["endpoints"][1]["nodeName"], "n2");
        assert_eq!(slice["addressType"], "IPv4");
        let empty = service_manifest("x", "10.96.0.11".parse().unwrap(), 80, 80, None, &[]);
        assert!(empty.contains("\"ClusterIP\"") && empty.contains("\"endpoints\": []"));
    }

    #[test]
    fn node_addresses() {
        assert_eq!(Rig::node_ip(1).to_string(), "198.18.0.11");
        assert_eq!(Rig::node_ip6(3).to_string(), "fd74:7769::13");
    }
}
