//! `cargo xtask rig up|status|exec|down`: a netns cluster that outlives the command that built
//! it, for poking at twill by hand.
//!
//! Why it is shaped as it is:
//! - It is the test rig (`twill_tests::Rig`), detached: `up` builds it exactly as the tests do
//!   (so what you poke at is what CI tests), then [`Rig::detach`] marks its state file in
//!   `/run/twill-rig` so that sweeps leave it alone, and lets the guard go without tearing down.
//!   etcd and twilld run in process groups of their own, so a Ctrl-C in the terminal later does
//!   not reach them.
//! - `down` removes it from that state file alone (processes by pid and start time, anything
//!   else in its namespaces, namespaces, pins, temp dir), so it works after `up` crashed, after
//!   a `kill -9`, or from another shell; it also sweeps rigs of crashed runs.
//! - What the state file does not know (backend, pods and their addresses) `up` writes next to
//!   the rig's logs in its temp dir, so it disappears with the rig.
//! - `exec` is `nsenter --net`, not `ip netns exec`: the command keeps the host's `/sys`, bpffs
//!   and cgroup mounts, as twilld does.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::{Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use twill_facts::SubnetFacts;
use twill_tests::rig::{ETCD_ENDPOINT, ETCD_PREFIX};
use twill_tests::state::{self, RigState};
use twill_tests::{Rig, RigOptions, leftovers, ns, ping, wait_until};
use xtask::bench::Backend;
use xtask::bench::machine::{now_secs, rfc3339};

use crate::util::{cargo, is_root, say, step, target_dir};

/// The file `up` writes into the rig's temp dir.
const INFO_FILE: &str = "xtask-rig.json";

/// How long the cluster gets to converge.
const UP: Duration = Duration::from_secs(30);

/// Service proxy modes (recorded; the service dataplanes are not in yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyMode {
    /// eBPF socket/tc load balancing.
    Ebpf,
    /// nftables verdict maps.
    Nftables,
    /// iptables (kube-proxy's classic mode).
    Iptables,
}

/// `cargo xtask rig ...`.
#[derive(Debug, Subcommand)]
pub enum RigCmd {
    /// Build a cluster (etcd, twilld on every node, pods) that stays up after this command.
    Up {
        /// Number of nodes.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=200))]
        nodes: u8,
        /// The overlay backend.
        #[arg(long, value_enum, default_value_t = Backend::Vxlan)]
        backend: Backend,
        /// Pods on every node.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(0..=100))]
        pods_per_node: u8,
        /// Run twilld with --ip-masq.
        #[arg(long)]
        ip_masq: bool,
        /// Service proxy mode (recorded for now: the service dataplanes are not in yet).
        #[arg(long, value_enum)]
        proxy_mode: Option<ProxyMode>,
        /// Use a debug build of twilld (quicker to build).
        #[arg(long)]
        debug: bool,
        /// Do not build twilld; use the one already in target/.
        #[arg(long)]
        no_build: bool,
    },
    /// Show the rig(s): processes, nodes, subnets, pods.
    Status {
        /// The rig (default: every rig that is up).
        #[arg(long)]
        id: Option<String>,
    },
    /// Run a command in a node (`n1`, `1`), a pod (`n1p2`) or the underlay (`u`).
    Exec {
        /// The rig (default: the only one that is up).
        #[arg(long)]
        id: Option<String>,
        /// `n<node>`, `<node>`, `n<node>p<pod>`, `u`/`underlay`, or a full namespace name.
        target: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Tear the rig down (and sweep rigs left by crashed runs).
    Down {
        /// The rig (default: the only one that is up; see --all).
        #[arg(long)]
        id: Option<String>,
        /// Every rig that is up.
        #[arg(long)]
        all: bool,
    },
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
    /// The proxy mode asked for, if any.
    pub proxy_mode: Option<ProxyMode>,
    /// Whether twilld masquerades.
    pub ip_masq: bool,
    /// The twilld binary.
    pub twilld: String,
    /// Nodes.
    pub nodes: Vec<NodeInfo>,
    /// Pods.
    pub pods: Vec<PodInfo>,
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

/// Runs a `rig` subcommand.
pub fn rig(cmd: RigCmd) -> Result<()> {
    if !is_root() {
        bail!("the rig builds network namespaces and needs root");
    }
    match cmd {
        RigCmd::Up {
            nodes,
            backend,
            pods_per_node,
            ip_masq,
            proxy_mode,
            debug,
            no_build,
        } => up(&UpOptions {
            nodes: usize::from(nodes),
            backend,
            pods_per_node: usize::from(pods_per_node),
            ip_masq,
            proxy_mode,
            debug,
            no_build,
        }),
        RigCmd::Status { id } => status(id.as_deref()),
        RigCmd::Exec {
            id,
            target,
            command,
        } => {
            let code = exec(id.as_deref(), &target, &command)?;
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
        RigCmd::Down { id, all } => down(id.as_deref(), all),
    }
}

struct UpOptions {
    nodes: usize,
    backend: Backend,
    pods_per_node: usize,
    ip_masq: bool,
    proxy_mode: Option<ProxyMode>,
    debug: bool,
    no_build: bool,
}

fn up(o: &UpOptions) -> Result<()> {
    xtask::bench::cli::install_interrupt_handler()?;
    let profile = if o.debug { "debug" } else { "release" };
    if !o.no_build {
        let mut build = cargo();
        build.args(["build", "-p", "twill-agent", "--bin", "twilld"]);
        if !o.debug {
            build.arg("--release");
        }
        step(&mut build)?;
    }
    let bin_dir = target_dir()?.join(profile);
    let started = Instant::now();
    let rig = Rig::with_options(RigOptions {
        nodes: o.nodes,
        bin_dir: Some(bin_dir),
        detachable: true,
        ..RigOptions::default()
    })?;
    // Any error from here on drops the guard, which removes what was built.
    let info = match populate(&rig, o) {
        Ok(info) => info,
        Err(e) => {
            if !twill_tests::interrupted() {
                rig.print_logs();
            }
            return Err(e);
        }
    };
    let path = rig.temp_dir().join(INFO_FILE);
    std::fs::write(&path, serde_json::to_vec_pretty(&info)?)
        .with_context(|| format!("write {}", path.display()))?;
    let id = rig.detach()?;
    say(&format!(
        "rig {id} up in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    print!("{}", describe(&info, Some(&state_of(&id)?)));
    if let Some(mode) = o.proxy_mode {
        say(&format!(
            "proxy mode {mode:?} recorded; the service dataplanes are not in yet, so no Service \
             was created"
        ));
    }
    say(&format!(
        "try: cargo xtask rig exec n1p1 -- ping -c 3 {}   |   cargo xtask rig down",
        info.pods
            .iter()
            .find(|p| p.node == o.nodes.min(2) && o.nodes > 1)
            .or(info.pods.first())
            .and_then(|p| p.ip)
            .map_or_else(|| "<pod ip>".to_string(), |ip| ip.to_string())
    ));
    Ok(())
}

/// Config, twilld on every node, subnet files, pods, a ping across.
fn populate(rig: &Rig, o: &UpOptions) -> Result<RigInfo> {
    rig.put_network_config(&o.backend.network_config())?;
    let extra: &[&str] = if o.ip_masq { &["--ip-masq"] } else { &[] };
    for node in 1..=o.nodes {
        rig.start_twilld(node, extra)?;
    }
    let mut facts: Vec<SubnetFacts> = Vec::new();
    for node in 1..=o.nodes {
        facts.push(rig.wait_subnet_file(node, UP)?);
    }
    let mut info = RigInfo {
        id: rig.id().to_string(),
        created_utc: rfc3339(now_secs()),
        backend: o.backend,
        proxy_mode: o.proxy_mode,
        ip_masq: o.ip_masq,
        twilld: rig.twilld_path()?.display().to_string(),
        nodes: Vec::new(),
        pods: Vec::new(),
    };
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
        for j in 1..=o.pods_per_node {
            let pod = rig.add_pod(node, f)?;
            info.pods.push(PodInfo {
                name: format!("n{node}p{j}"),
                ns: pod.ns,
                node,
                ip: pod.ipv4,
            });
        }
    }
    // The first pod of node 1 reaches the first pod of every other node.
    if let Some(from) = info.pods.iter().find(|p| p.node == 1) {
        for to in info.pods.iter().filter(|p| p.node != 1) {
            if info.pods.iter().find(|p| p.node == to.node) != Some(to) {
                continue;
            }
            let Some(ip) = to.ip else { continue };
            wait_until(UP, || ping(&from.ns, ip, 1).is_ok_and(|s| s.all_received()))
                .with_context(|| format!("{} does not reach {} at {ip}", from.name, to.name))?;
        }
    }
    Ok(info)
}

/// The state of rig `id`.
fn state_of(id: &str) -> Result<RigState> {
    RigState::load(id).with_context(|| format!("no rig {id} (see cargo xtask rig status)"))
}

/// Rigs that `up` left up.
fn detached_rigs() -> Result<Vec<RigState>> {
    Ok(RigState::list()?
        .into_iter()
        .filter(|s| s.detached)
        .collect())
}

/// The rig meant by `--id`, or the only one up.
fn pick(id: Option<&str>) -> Result<RigState> {
    if let Some(id) = id {
        return state_of(id);
    }
    let mut rigs = detached_rigs()?;
    match rigs.len() {
        0 => bail!("no rig is up (cargo xtask rig up)"),
        1 => Ok(rigs.remove(0)),
        _ => bail!(
            "several rigs are up ({}): pick one with --id",
            rigs.iter()
                .map(|r| r.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn read_info(state: &RigState) -> Option<RigInfo> {
    let bytes = std::fs::read(state.temp_dir.join(INFO_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn status(id: Option<&str>) -> Result<()> {
    let rigs = match id {
        Some(id) => vec![state_of(id)?],
        None => detached_rigs()?,
    };
    if rigs.is_empty() {
        say("no rig is up (cargo xtask rig up)");
    }
    for state in rigs {
        match read_info(&state) {
            Some(info) => print!("{}", describe(&info, Some(&state))),
            None => println!(
                "rig {}: namespaces {}",
                state.id,
                state.namespaces.join(" ")
            ),
        }
        let underlay = format!("{}-u", state.id);
        let endpoints = format!("--endpoints={ETCD_ENDPOINT}");
        let prefix = format!("{ETCD_PREFIX}/subnets/");
        match ns::run(
            &underlay,
            &[
                "etcdctl",
                &endpoints,
                "--dial-timeout=2s",
                "get",
                "--prefix",
                "--keys-only",
                &prefix,
            ],
        ) {
            Ok(keys) => {
                let leases: Vec<&str> = keys
                    .lines()
                    .filter_map(|l| l.strip_prefix(&prefix))
                    .collect();
                println!("  leases in etcd: {}", leases.join(" "));
            }
            Err(e) => println!("  leases in etcd: unavailable ({e:#})"),
        }
    }
    Ok(())
}

/// The rig as text: processes (alive or not), nodes with their subnet and twilld, pods.
fn describe(info: &RigInfo, state: Option<&RigState>) -> String {
    let proc_status = |what: &str| -> String {
        let Some(rec) = state.and_then(|s| s.pids.iter().rev().find(|p| p.what == what)) else {
            return "not started".into();
        };
        if rec.alive() {
            format!("running (pid {})", rec.pid)
        } else {
            format!("NOT RUNNING (was pid {})", rec.pid)
        }
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "rig {}: backend {}, {} node(s), {} pod(s), ip-masq {}, proxy mode {}, up since {}",
        info.id,
        info.backend,
        info.nodes.len(),
        info.pods.len(),
        if info.ip_masq { "on" } else { "off" },
        info.proxy_mode
            .map_or_else(|| "-".to_string(), |m| format!("{m:?}").to_lowercase()),
        info.created_utc
    );
    let _ = writeln!(
        out,
        "  etcd   {}-u  {ETCD_ENDPOINT}  {}",
        info.id,
        proc_status("etcd")
    );
    for n in &info.nodes {
        let facts = state
            .map(|s| s.temp_dir.join(format!("n{}", n.node)).join("subnet.env"))
            .and_then(|p| SubnetFacts::read(&p).ok());
        let subnet = facts
            .and_then(|f| f.subnet_v4())
            .map_or_else(|| n.subnet.clone(), |s| s.to_string());
        let _ = writeln!(
            out,
            "  n{:<3}  {}  {}  subnet {subnet}  twilld {}",
            n.node,
            n.ns,
            n.ip,
            proc_status(&format!("twilld n{}", n.node))
        );
        for p in info.pods.iter().filter(|p| p.node == n.node) {
            let _ = writeln!(
                out,
                "    {:<7} {}  {}",
                p.name,
                p.ns,
                p.ip.map_or_else(|| "-".to_string(), |ip| ip.to_string())
            );
        }
    }
    if let Some(s) = state {
        let _ = writeln!(out, "  logs: {}", s.temp_dir.display());
    }
    out
}

/// The namespace `target` names in rig `id`.
fn resolve_target(id: &str, target: &str) -> Result<String> {
    let t = target.trim();
    if t.starts_with(&format!("{id}-")) {
        return Ok(t.to_string());
    }
    if matches!(t, "u" | "underlay" | "etcd") {
        return Ok(format!("{id}-u"));
    }
    let t = t.strip_prefix("node").unwrap_or(t);
    let t = t.strip_prefix('n').unwrap_or(t);
    let (node, pod) = t.split_once('p').unwrap_or((t, ""));
    ensure!(
        !node.is_empty() && node.bytes().all(|b| b.is_ascii_digit()),
        "cannot read {target:?}: use n<node>, <node>, n<node>p<pod>, u, or a namespace name"
    );
    if pod.is_empty() {
        Ok(format!("{id}-n{node}"))
    } else {
        ensure!(
            pod.bytes().all(|b| b.is_ascii_digit()),
            "cannot read {target:?}: pods are n<node>p<pod>"
        );
        Ok(format!("{id}-n{node}p{pod}"))
    }
}

/// Runs `command` inside the target's namespace with this terminal's stdio; its exit code.
fn exec(id: Option<&str>, target: &str, command: &[String]) -> Result<i32> {
    let state = pick(id)?;
    let netns = resolve_target(&state.id, target)?;
    ensure!(
        ns::netns_exists(&netns),
        "rig {} has no namespace {netns} (namespaces: {})",
        state.id,
        state.namespaces.join(" ")
    );
    let status = ns::nsenter(&netns, command)
        .status()
        .with_context(|| format!("run {} in netns {netns}", command.join(" ")))?;
    Ok(status.code().unwrap_or(128 + 9))
}

fn down(id: Option<&str>, all: bool) -> Result<()> {
    let rigs: Vec<RigState> = match (id, all) {
        (Some(id), _) => vec![state_of(id)?],
        (None, true) => detached_rigs()?,
        (None, false) => {
            let rigs = detached_rigs()?;
            if rigs.len() > 1 {
                bail!(
                    "several rigs are up ({}): pick one with --id, or --all",
                    rigs.iter()
                        .map(|r| r.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            rigs
        }
    };
    if rigs.is_empty() {
        say("no rig is up");
    }
    let mut failed = Vec::new();
    for s in &rigs {
        if !s.detached && s.owner_alive() {
            failed.push(format!(
                "{}: owned by running process {} (not a `rig up` rig)",
                s.id, s.owner_pid
            ));
            continue;
        }
        let result = state::remove(&s.id);
        let left = leftovers(&s.id);
        match (result, left.is_empty()) {
            (Ok(()), true) => say(&format!("rig {} down", s.id)),
            (Err(e), _) => failed.push(format!("{e:#}")),
            (Ok(()), false) => failed.push(format!("{} left: {}", s.id, left.join("; "))),
        }
    }
    match twill_tests::sweep_stale() {
        Ok(ids) if !ids.is_empty() => say(&format!("swept stale rig(s) {ids:?}")),
        Ok(_) => {}
        Err(e) => failed.push(format!("sweep: {e:#}")),
    }
    if !failed.is_empty() {
        bail!("teardown incomplete:\n{}", failed.join("\n"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_resolve_to_namespaces() {
        let id = "tw00abc0";
        assert_eq!(resolve_target(id, "n1").unwrap(), "tw00abc0-n1");
        assert_eq!(resolve_target(id, "2").unwrap(), "tw00abc0-n2");
        assert_eq!(resolve_target(id, "node3").unwrap(), "tw00abc0-n3");
        assert_eq!(resolve_target(id, "n1p2").unwrap(), "tw00abc0-n1p2");
        assert_eq!(resolve_target(id, "u").unwrap(), "tw00abc0-u");
        assert_eq!(
            resolve_target(id, "tw00abc0-n1p1").unwrap(),
            "tw00abc0-n1p1"
        );
        assert!(resolve_target(id, "pod").is_err());
        assert!(resolve_target(id, "n1px").is_err());
    }

    #[test]
    fn describes_a_rig() {
        let info = RigInfo {
            id: "tw00abc0".into(),
            created_utc: "2026-01-01T00:00:00Z".into(),
            backend: Backend::HostGw,
            proxy_mode: Some(ProxyMode::Nftables),
            ip_masq: true,
            twilld: "/x/twilld".into(),
            nodes: vec![NodeInfo {
                node: 1,
                ns: "tw00abc0-n1".into(),
                ip: Ipv4Addr::new(198, 18, 0, 11),
                subnet: "10.244.7.0/24".into(),
            }],
            pods: vec![PodInfo {
                name: "n1p1".into(),
                ns: "tw00abc0-n1p1".into(),
                node: 1,
                ip: Some(Ipv4Addr::new(10, 244, 7, 2)),
            }],
        };
        let text = describe(&info, None);
        assert!(text.contains("backend host-gw"), "{text}");
        assert!(text.contains("proxy mode nftables"), "{text}");
        assert!(text.contains("subnet 10.244.7.0/24"), "{text}");
        assert!(text.contains("n1p1    tw00abc0-n1p1  10.244.7.2"), "{text}");
        let json = serde_json::to_string(&info).unwrap();
        assert_eq!(serde_json::from_str::<RigInfo>(&json).unwrap(), info);
    }
}
