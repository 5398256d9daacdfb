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
//!
//! Where things are: this module owns the rig's shape (options, [`Pod`], [`PodShape`], the
//! [`Rig`] guard, its network and teardown); the methods of [`Rig`] live by concern in `etcd`,
//! `twilld`, `pods` and `services`, each a plain `impl Rig` block.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::guard::NetnsGuard;
use crate::ns::{self, ip_batch};

mod etcd;
mod pods;
mod services;
#[cfg(test)]
mod tests;
mod twilld;

pub use pods::cni_result_addresses;
pub use services::{nsenter_in_cgroup, service_manifest};

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

    /// The opening of a privileged test: `None` when [`require_root`](crate::require_root)
    /// skips (not root, outside CI), else a rig of `nodes` nodes with etcd running and, when
    /// given, `network_config` written as the network config.
    ///
    /// # Panics
    ///
    /// When the rig cannot be built or the config cannot be written: the test fails there.
    pub fn for_test(nodes: usize, network_config: Option<&str>) -> Option<Rig> {
        if !crate::require_root() {
            return None;
        }
        Some(match network_config {
            Some(config) => Rig::configured(nodes, config),
            None => Rig::new(nodes).unwrap_or_else(|e| panic!("rig of {nodes} nodes: {e:#}")),
        })
    }

    /// A rig of `nodes` nodes with `config` in etcd as the network config, no twilld started
    /// yet; panics with the error if either cannot be done (for tests that checked root).
    pub fn configured(nodes: usize, config: &str) -> Rig {
        let rig = Rig::new(nodes).unwrap_or_else(|e| panic!("rig of {nodes} nodes: {e:#}"));
        rig.put_network_config(config)
            .unwrap_or_else(|e| panic!("network config {config}: {e:#}"));
        rig
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
