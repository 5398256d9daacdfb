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
//! - What `up` builds on the rig (twilld with a service proxy, pods through `twill-cni`, the
//!   sample Service) is [`xtask::cluster::populate`], shared with `cargo xtask demo`. What the
//!   state file does not know (backend, proxy mode, pods, the Service) `up` writes next to the
//!   rig's logs in its temp dir, so it disappears with the rig.
//! - `exec` is `nsenter --net`, not `ip netns exec`: the command keeps the host's `/sys`, bpffs
//!   and cgroup mounts, as twilld does. A command for a node or a pod also runs in the node's
//!   cgroup, as the node's own processes do, so the eBPF socket-level load balancer sees it.

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::Subcommand;
use twill_facts::SubnetFacts;
use twill_tests::rig::{ETCD_ENDPOINT, nsenter_in_cgroup};
use twill_tests::state::{self, RigState};
use twill_tests::{Rig, RigOptions, leftovers, ns};
use xtask::cluster::Backend;
use xtask::cluster::{self, ProxyMode, RigInfo, Spec};

use crate::util::{build_binaries, is_root, say, target_dir};

/// The file `up` writes into the rig's temp dir.
const INFO_FILE: &str = "xtask-rig.json";

/// `cargo xtask rig ...`.
#[derive(Debug, Subcommand)]
pub enum RigCmd {
    /// Build a cluster (etcd, twilld on every node, pods) that stays up after this command.
    Up {
        /// Number of nodes.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=200))]
        nodes: u8,
        /// The overlay backend.
        #[arg(long, value_enum, default_value_t = cluster::DEFAULT_BACKEND)]
        backend: Backend,
        /// Pods on every node.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(0..=100))]
        pods_per_node: u8,
        /// Run twilld with --ip-masq.
        #[arg(long)]
        ip_masq: bool,
        /// Service proxy mode of every twilld (`none`: no proxy and no sample Service).
        #[arg(long, value_enum, default_value_t = ProxyMode::Ebpf)]
        proxy_mode: ProxyMode,
        /// Use a debug build of twilld (quicker to build).
        #[arg(long)]
        debug: bool,
        /// Do not build twilld; use the one already in target/.
        #[arg(long)]
        no_build: bool,
    },
    /// Show the rig(s): processes, nodes, leases, pods, the sample Service.
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
    proxy_mode: ProxyMode,
    debug: bool,
    no_build: bool,
}

fn up(o: &UpOptions) -> Result<()> {
    xtask::bench::cli::install_interrupt_handler()?;
    let profile = if o.debug { "debug" } else { "release" };
    if !o.no_build {
        build_binaries(!o.debug)?;
    }
    let bin_dir = target_dir()?.join(profile);
    // Refuse a mode this twilld does not know before building anything.
    if o.proxy_mode != ProxyMode::None
        && let Err(why) = cluster::check_proxy_mode(&bin_dir.join("twilld"), o.proxy_mode)
    {
        bail!(why);
    }
    let started = Instant::now();
    let rig = Rig::with_options(RigOptions {
        nodes: o.nodes,
        bin_dir: Some(bin_dir),
        detachable: true,
        ..RigOptions::default()
    })?;
    // Any error from here on drops the guard, which removes what was built.
    let spec = Spec {
        nodes: o.nodes,
        backend: o.backend,
        pods_per_node: o.pods_per_node,
        ip_masq: o.ip_masq,
        proxy_mode: o.proxy_mode,
    };
    let info = match cluster::populate(&rig, &spec, &say) {
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
    let peer = info
        .pods
        .iter()
        .find(|p| p.node == o.nodes.min(2) && o.nodes > 1)
        .or(info.pods.first())
        .and_then(|p| p.ip)
        .map_or_else(|| "<pod ip>".to_string(), |ip| ip.to_string());
    say(&format!(
        "try: cargo xtask rig exec n1p1 -- ping -c 3 {peer}   |   cargo xtask rig down"
    ));
    if let Some(svc) = &info.service {
        say(&format!(
            "     cargo xtask rig exec n{}p1 -- busybox wget -qO- http://{}/",
            o.nodes,
            svc.vip()
        ));
    }
    Ok(())
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
        let info = read_info(&state);
        match &info {
            Some(info) => print!("{}", describe(info, Some(&state))),
            None => println!(
                "rig {}: namespaces {}",
                state.id,
                state.namespaces.join(" ")
            ),
        }
        match cluster::leases(&state.id) {
            Ok(leases) => {
                println!("  leases in etcd ({}):", leases.len());
                for l in leases {
                    println!("    {l}");
                }
            }
            Err(e) => println!("  leases in etcd: unavailable ({e:#})"),
        }
        // What the service source holds, as twilld itself reads it.
        if let Some(info) = info.filter(|i| i.service.is_some()) {
            let endpoints = format!("--etcd-endpoints={ETCD_ENDPOINT}");
            match ns::run(
                &format!("{}-u", state.id),
                &[info.twilld.as_str(), "get", "services", &endpoints],
            ) {
                Ok(text) => {
                    println!("  services in etcd (twilld get services):");
                    for l in text.lines() {
                        println!("    {l}");
                    }
                }
                Err(e) => println!("  services in etcd: unavailable ({e:#})"),
            }
        }
    }
    Ok(())
}

/// The rig as text: processes (alive or not), nodes with their subnet and twilld, pods, the
/// sample Service.
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
        info.proxy_mode,
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
                "    {:<7} {}  {}  responder {}",
                p.name,
                p.ns,
                p.ip.map_or_else(|| "-".to_string(), |ip| ip.to_string()),
                proc_status(&format!("responder {}", p.name))
            );
        }
    }
    if let Some(svc) = &info.service {
        let _ = writeln!(
            out,
            "  service {}  ClusterIP {}  NodePort {}  endpoints {}",
            svc.name,
            svc.vip(),
            svc.node_port,
            svc.endpoints
                .iter()
                .map(|(pod, addr)| format!("{pod}={addr}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    if let Some(s) = state {
        let _ = writeln!(
            out,
            "  logs: {}  metrics: rig exec n<N> -- busybox wget -qO- http://{}/metrics",
            s.temp_dir.display(),
            cluster::METRICS_ADDR
        );
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
    // A node's (or its pods') command runs in the node's cgroup, if the rig made one.
    let node_cgroup = netns
        .strip_prefix(&format!("{}-", state.id))
        .and_then(|rest| rest.strip_prefix('n'))
        .map(|rest| rest.split('p').next().unwrap_or(rest))
        .and_then(|node| {
            let name = format!("{}{}-n{node}", state::CGROUP_PREFIX, state.id);
            state
                .cgroups
                .iter()
                .find(|c| c.file_name().is_some_and(|n| *n == *name))
                .filter(|c| c.is_dir())
        });
    let mut cmd = match node_cgroup {
        Some(cg) => nsenter_in_cgroup(&netns, cg, command),
        None => ns::nsenter(&netns, command),
    };
    let status = cmd
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
        if !s.detached && s.owner.alive() {
            failed.push(format!(
                "{}: owned by running process {} (not a `rig up` rig)",
                s.id, s.owner.pid
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
    use std::net::Ipv4Addr;

    use xtask::cluster::{NodeInfo, PodInfo};

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
            proxy_mode: ProxyMode::Nftables,
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
            service: Some(cluster::ServiceInfo {
                name: "default/echo".into(),
                cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
                port: 80,
                node_port: 30080,
                endpoints: vec![("n1p1".into(), "10.244.7.2:8080".into())],
            }),
        };
        let text = describe(&info, None);
        for needle in [
            "backend host-gw",
            "proxy mode nftables",
            "subnet 10.244.7.0/24",
            "n1p1    tw00abc0-n1p1  10.244.7.2",
            "service default/echo  ClusterIP 10.96.0.10:80  NodePort 30080  endpoints \
             n1p1=10.244.7.2:8080",
        ] {
            assert!(text.contains(needle), "no {needle:?} in:\n{text}");
        }
        let json = serde_json::to_string(&info).unwrap();
        assert_eq!(serde_json::from_str::<RigInfo>(&json).unwrap(), info);
    }
}
