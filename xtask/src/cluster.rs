//! The cluster `cargo xtask rig up` and `cargo xtask demo` build on the rig: twilld on every
//! node (with a service proxy), pods made by the real `twill-cni`, a responder in every pod, and
//! a sample Service (ClusterIP + NodePort) whose endpoints are those pods.
//!
//! Why it is shaped as it is:
//! - One function, [`populate`], builds it for both commands, so the demo shows exactly what a
//!   standing rig is, and the lifecycle tests of `rig up` cover the demo's path too.
//! - Pods are made through `twill-cni` (not by hand) and answer with their own name
//!   (`twill-probe serve`, a tiny HTTP responder), so `wget -qO- http://10.96.0.10/` from any pod
//!   shows which backend the Service picked — the whole path a real node uses.
//! - The proxy mode is checked against the twilld binary before anything is built
//!   (`twilld --proxy-mode MODE --help` fails for a mode it does not know): a mode another
//!   branch adds (`nftables`, `iptables`) works as soon as the twilld in use knows it, and until
//!   then `rig up` says so in one line instead of a twilld log tail.
//! - [`RigInfo`] is what `up` knows that the rig's state file does not (backend, proxy mode,
//!   pods, the Service); `rig up` writes it next to the rig's logs, `rig status` reads it back.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use twill_facts::SubnetFacts;
pub use twill_tests::Backend;
use twill_tests::rig::{nsenter_in_cgroup, service_manifest};
use twill_tests::{Pod, Rig, ns, ping, wait_for, wait_until};

use crate::bench::machine::{now_secs, rfc3339};
use crate::util::arg_name;

/// The overlay backend of `rig up` and `demo` when none is given: VXLAN, flannel's default.
pub const DEFAULT_BACKEND: Backend = Backend::Vxlan;

/// How long the cluster gets to converge (subnet files, first ping, the Service answering).
pub const UP: Duration = Duration::from_secs(30);

/// The sample Service: name, ClusterIP, port, the pods' port, NodePort.
pub const SAMPLE_NAME: &str = "echo";
/// The sample Service's ClusterIP.
pub const SAMPLE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The sample Service's port.
pub const SAMPLE_PORT: u16 = 80;
/// The port every pod's responder listens on (the Service's targetPort).
pub const POD_PORT: u16 = 8080;
/// The sample Service's NodePort.
pub const SAMPLE_NODE_PORT: u16 = 30080;
/// Where each node's twilld serves /metrics (loopback of the node's namespace).
pub const METRICS_ADDR: &str = "127.0.0.1:9615";

/// A service proxy mode of twilld (`--proxy-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyMode {
    /// No service dataplane (and no sample Service).
    None,
    /// eBPF socket-level load balancing + tc.
    Ebpf,
    /// nftables verdict maps.
    Nftables,
    /// iptables (kube-proxy's classic layout).
    Iptables,
}

impl ProxyMode {
    /// The modes with a service dataplane, in report order.
    pub const SERVICE_MODES: [ProxyMode; 3] =
        [ProxyMode::Ebpf, ProxyMode::Nftables, ProxyMode::Iptables];
}

/// The value of `--proxy-mode`, as clap spells it (twilld's `--proxy-mode` takes the same names).
impl std::fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&arg_name(self))
    }
}

/// Whether `twilld` accepts `--proxy-mode MODE`: `Err` with its own words when it does not.
pub fn check_proxy_mode(twilld: &Path, mode: ProxyMode) -> Result<(), String> {
    let out = Command::new(twilld)
        .args(["--proxy-mode", &mode.to_string(), "--help"])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", twilld.display()))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
        .collect();
    Err(format!(
        "{} does not support --proxy-mode {mode}: {}",
        twilld.display(),
        lines.join(" ")
    ))
}

/// What to build.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Nodes.
    pub nodes: usize,
    /// Overlay backend.
    pub backend: Backend,
    /// Pods on every node.
    pub pods_per_node: usize,
    /// twilld `--ip-masq`.
    pub ip_masq: bool,
    /// Service proxy mode (`None`: no proxy, no sample Service).
    pub proxy_mode: ProxyMode,
}

/// What `up` knows that the rig's state file does not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RigInfo {
    /// The rig id.
    pub id: String,
    /// When it came up (RFC 3339, UTC).
    pub created_utc: String,
    /// The overlay backend.
    pub backend: Backend,
    /// The service proxy mode.
    pub proxy_mode: ProxyMode,
    /// Whether twilld masquerades.
    pub ip_masq: bool,
    /// The twilld binary.
    pub twilld: String,
    /// Nodes.
    pub nodes: Vec<NodeInfo>,
    /// Pods.
    pub pods: Vec<PodInfo>,
    /// The sample Service, if one was made.
    #[serde(default)]
    pub service: Option<ServiceInfo>,
}

/// A node of [`RigInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeInfo {
    /// 1-based.
    pub node: usize,
    /// Its namespace.
    pub ns: String,
    /// Its underlay address.
    pub ip: Ipv4Addr,
    /// Its pod subnet when it came up.
    pub subnet: String,
}

/// A pod of [`RigInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodInfo {
    /// Short name, `n<node>p<j>`.
    pub name: String,
    /// Its namespace.
    pub ns: String,
    /// The node it is on.
    pub node: usize,
    /// Its address.
    pub ip: Option<Ipv4Addr>,
}

/// The sample Service of [`RigInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceInfo {
    /// `default/<name>`.
    pub name: String,
    /// ClusterIP.
    pub cluster_ip: Ipv4Addr,
    /// Port.
    pub port: u16,
    /// NodePort.
    pub node_port: u16,
    /// Endpoints: pod name and `address:port`.
    pub endpoints: Vec<(String, String)>,
}

impl ServiceInfo {
    /// The ClusterIP address and port.
    pub fn vip(&self) -> SocketAddr {
        SocketAddr::from((self.cluster_ip, self.port))
    }
}

/// Config, twilld on every node, pods through twill-cni with a responder each, a ping across
/// nodes, and (with a proxy) the sample Service answering from a pod on the last node.
pub fn populate(rig: &Rig, spec: &Spec, say: &dyn Fn(&str)) -> Result<RigInfo> {
    let twilld = rig.twilld_path()?;
    if spec.proxy_mode != ProxyMode::None
        && let Err(why) = check_proxy_mode(&twilld, spec.proxy_mode)
    {
        bail!(why);
    }
    rig.put_network_config(&spec.backend.network_config())?;
    for node in 1..=spec.nodes {
        let mut args: Vec<String> = vec!["--metrics-addr".into(), METRICS_ADDR.into()];
        if spec.ip_masq {
            args.push("--ip-masq".into());
        }
        if spec.proxy_mode != ProxyMode::None {
            args.extend(rig.proxy_args(node, &spec.proxy_mode.to_string())?);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        rig.start_twilld(node, &args)?;
    }
    let mut facts: Vec<SubnetFacts> = Vec::new();
    for node in 1..=spec.nodes {
        facts.push(rig.wait_subnet_file(node, UP)?);
    }
    say(&format!(
        "twilld up on {} node(s): leases {}",
        spec.nodes,
        facts
            .iter()
            .map(|f| f
                .subnet_v4()
                .map_or_else(|| "-".to_string(), |s| s.to_string()))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    let mut info = RigInfo {
        id: rig.id().to_string(),
        created_utc: rfc3339(now_secs()),
        backend: spec.backend,
        proxy_mode: spec.proxy_mode,
        ip_masq: spec.ip_masq,
        twilld: twilld.display().to_string(),
        nodes: Vec::new(),
        pods: Vec::new(),
        service: None,
    };
    let mut pods: Vec<Pod> = Vec::new();
    for (i, f) in facts.iter().enumerate() {
        let node = i + 1;
        info.nodes.push(NodeInfo {
            node,
            ns: rig.node_ns(node),
            ip: Rig::node_ip(node),
            subnet: f
                .subnet_v4()
                .map_or_else(|| "-".to_string(), |s| s.to_string()),
        });
        for _ in 0..spec.pods_per_node {
            let pod = rig.add_cni_pod(node)?;
            rig.start_responder(&pod, pod.name(), &[POD_PORT])?;
            info.pods.push(PodInfo {
                name: pod.name().to_string(),
                ns: pod.ns.clone(),
                node,
                ip: pod.ipv4,
            });
            pods.push(pod);
        }
    }
    if !pods.is_empty() {
        say(&format!(
            "{} pod(s) made by twill-cni: {}",
            pods.len(),
            info.pods
                .iter()
                .map(|p| format!(
                    "{} {}",
                    p.name,
                    p.ip.map_or_else(|| "-".into(), |ip| ip.to_string())
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    // The first pod of node 1 reaches the first pod of every other node.
    if let Some(from) = pods.iter().find(|p| p.node == 1) {
        for node in 2..=spec.nodes {
            let Some(to) = pods.iter().find(|p| p.node == node) else {
                continue;
            };
            let ip = to.ip().context("pod without an address")?;
            wait_until(UP, || ping(&from.ns, ip, 1).is_ok_and(|s| s.all_received()))
                .with_context(|| format!("{} does not reach {} at {ip}", from.name(), to.name()))?;
        }
    }
    if spec.proxy_mode != ProxyMode::None && !pods.is_empty() {
        let endpoints: Vec<(IpAddr, usize)> = pods
            .iter()
            .filter_map(|p| Some((IpAddr::V4(p.ipv4?), p.node)))
            .collect();
        rig.apply_manifest(&service_manifest(
            SAMPLE_NAME,
            IpAddr::V4(SAMPLE_VIP),
            SAMPLE_PORT,
            POD_PORT,
            Some(SAMPLE_NODE_PORT),
            &endpoints,
        ))?;
        let service = ServiceInfo {
            name: format!("default/{SAMPLE_NAME}"),
            cluster_ip: SAMPLE_VIP,
            port: SAMPLE_PORT,
            node_port: SAMPLE_NODE_PORT,
            endpoints: pods
                .iter()
                .filter_map(|p| Some((p.name().to_string(), format!("{}:{POD_PORT}", p.ipv4?))))
                .collect(),
        };
        // From a pod on the last node (another node than most endpoints), as its processes run.
        let client = pods
            .iter()
            .rev()
            .find(|p| p.node == spec.nodes)
            .unwrap_or(&pods[0]);
        // A twilld that died (it cannot start its proxy) ends the wait at once, with its reason.
        let outcome = wait_for(UP, || {
            if let Ok(a) = request(rig, client, spec.proxy_mode, service.vip()) {
                return Some(Ok(a));
            }
            let stopped = stopped_twilld(rig, spec.nodes);
            (!stopped.is_empty()).then_some(Err(stopped))
        });
        let answer = match outcome {
            Ok(Ok(a)) => a,
            Ok(Err(stopped)) => bail!(
                "the sample Service {} does not answer from {}{stopped}",
                service.vip(),
                client.name()
            ),
            Err(e) => bail!(
                "the sample Service {} does not answer from {}: {e}",
                service.vip(),
                client.name()
            ),
        };
        ensure!(
            service.endpoints.iter().any(|(name, _)| *name == answer),
            "the sample Service answered {answer:?}, which is none of its endpoints"
        );
        say(&format!(
            "service {} {}:{} (NodePort {}) → {} endpoint(s); {} → {answer}",
            service.name,
            service.cluster_ip,
            service.port,
            service.node_port,
            service.endpoints.len(),
            client.name()
        ));
        info.service = Some(service);
    }
    Ok(info)
}

/// Why the cluster may not work: the first twilld that is no longer running and the end of its
/// log (without backtrace), as text to append to an error; empty when all run.
fn stopped_twilld(rig: &Rig, nodes: usize) -> String {
    (1..=nodes)
        .find(|&n| !rig.twilld_running(n))
        .map(|n| {
            format!(
                ": twilld on node {n} is not running; its log ends:\n{}",
                crate::util::log_tail(&rig.twilld_log(n), 12)
            )
        })
        .unwrap_or_default()
}

/// A command run by a process of `pod`: inside the pod's namespace and, with the eBPF proxy, its
/// node's cgroup (where the socket-level load balancer sees it, as it sees a real pod's).
pub fn pod_command(rig: &Rig, pod: &Pod, mode: ProxyMode, args: &[&str]) -> Result<Command> {
    if mode == ProxyMode::Ebpf {
        Ok(nsenter_in_cgroup(
            &pod.ns,
            &rig.node_cgroup(pod.node)?,
            args,
        ))
    } else {
        Ok(ns::nsenter(&pod.ns, args))
    }
}

/// One request from `pod` to `addr` with `twill-probe get`; the answering backend's name.
pub fn request(rig: &Rig, pod: &Pod, mode: ProxyMode, addr: SocketAddr) -> Result<String> {
    let probe = rig.binary("twill-probe")?;
    let probe = probe.to_str().context("twill-probe path is not UTF-8")?;
    let target = addr.to_string();
    let out = pod_command(
        rig,
        pod,
        mode,
        &[probe, "get", &target, "--timeout-ms", "1000"],
    )?
    .output()
    .with_context(|| format!("run twill-probe get {target} in {}", pod.ns))?;
    if !out.status.success() {
        bail!(
            "twill-probe get {target} from {}: {}",
            pod.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The leases in etcd as `<subnet> → <public ip> (<backend>)`, one per line; read through
/// `etcdctl` in the underlay namespace of rig `id`.
pub fn leases(id: &str) -> Result<Vec<String>> {
    let underlay = format!("{id}-u");
    let endpoints = format!("--endpoints={}", twill_tests::rig::ETCD_ENDPOINT);
    let prefix = format!("{}/subnets/", twill_tests::rig::ETCD_PREFIX);
    let out = ns::run(
        &underlay,
        &[
            "etcdctl",
            &endpoints,
            "--dial-timeout=2s",
            "get",
            "--prefix",
            &prefix,
        ],
    )?;
    let lines: Vec<&str> = out.lines().collect();
    let mut leases = Vec::new();
    for pair in lines.chunks(2) {
        let subnet = pair[0].strip_prefix(&prefix).unwrap_or(pair[0]);
        let value: serde_json::Value =
            serde_json::from_str(pair.get(1).copied().unwrap_or("{}")).unwrap_or_default();
        let mut line = format!("{subnet} → {}", value["PublicIP"].as_str().unwrap_or("?"));
        if let Some(b) = value["BackendType"].as_str() {
            let _ = write!(line, " ({b})");
        }
        leases.push(line);
    }
    Ok(leases)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_modes_have_their_flag_names() {
        let names: Vec<String> = ProxyMode::SERVICE_MODES
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(names, ["ebpf", "nftables", "iptables"]);
        assert_eq!(ProxyMode::None.to_string(), "none");
        assert_eq!(
            serde_json::to_string(&ProxyMode::Nftables).unwrap(),
            "\"nftables\""
        );
    }

    #[test]
    fn a_twilld_that_does_not_know_a_mode_says_so() {
        let dir = std::env::temp_dir().join(format!("xtask-proxy-mode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("twilld");
        std::fs::write(
            &fake,
            "#!/bin/sh\n[ \"$2\" = ebpf ] && exit 0\n\
             echo \"error: invalid value '$2' for '--proxy-mode <PROXY_MODE>'\" >&2\n\
             echo '  [possible values: none, ebpf]' >&2\necho >&2\n\
             echo \"For more information, try '--help'.\" >&2\nexit 2\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        assert!(check_proxy_mode(&fake, ProxyMode::Ebpf).is_ok());
        let why = check_proxy_mode(&fake, ProxyMode::Nftables).unwrap_err();
        assert!(
            why.contains("does not support --proxy-mode nftables")
                && why.contains("[possible values: none, ebpf]")
                && !why.contains("For more information"),
            "{why}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
