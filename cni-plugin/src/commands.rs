//! ADD, DEL, CHECK, GC and STATUS, written against the [`Dataplane`] seam.
//!
//! ADD is a sequence of steps, each recorded in an undo list as it succeeds (address lease,
//! veth); on the first failure the list is unwound in reverse, so a failed ADD leaves neither an
//! allocation nor a link behind. DEL works from names alone (the host veth name is derived from
//! the attachment, the lease file records the attachment), so it needs neither the pod's netns
//! nor the subnet file and succeeds when everything is already gone. GC is DEL for every
//! attachment twill finds (lease files, veth aliases) that the runtime did not list as valid.

use std::collections::HashSet;
use std::io;
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use serde_json::Map;
use tracing::{debug, info, warn};
use twill_facts::{FactsError, SubnetFacts};

use crate::config::{Attachment, Ipam, Mode, NetConf, add_requested};
use crate::dataplane::{
    BridgeSpec, ContainerSpec, Dataplane, HostPort, Netns, RouteSpec, VethSpec,
};
use crate::delegate;
use crate::env::CniEnv;
use crate::error::{CniError, code};
use crate::ipam::{IpamError, Pool, Store};
use crate::names;
use crate::result::{CniResult, Interface, IpConfig, Route};

/// One invocation: environment, config and the raw stdin (for a delegated plugin).
#[derive(Debug, Clone, Copy)]
pub struct Invocation<'a> {
    /// The CNI environment.
    pub env: &'a CniEnv,
    /// The validated config.
    pub conf: &'a NetConf,
    /// Stdin as received.
    pub stdin: &'a [u8],
}

impl Invocation<'_> {
    fn host_veth(&self) -> String {
        names::host_veth(&self.conf.name, &self.env.container_id, &self.env.ifname)
    }
}

/// Reads the node's subnet facts: 11 while the file does not exist yet (twilld not up), 5 when
/// it cannot be read, 103 when it is not a subnet file (not a regular file, too large, not
/// UTF-8) or does not parse.
pub fn read_facts(path: &Path) -> Result<SubnetFacts, CniError> {
    SubnetFacts::read(path).map_err(|e| match &e {
        FactsError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
            CniError::from_error(code::TRY_AGAIN, &e)
                .context("subnet file not written yet (is twilld running?)")
        }
        FactsError::Io { .. } => CniError::from_error(code::IO_FAILURE, &e),
        // These name the file themselves.
        FactsError::NotRegular { .. }
        | FactsError::TooLarge { .. }
        | FactsError::NotUtf8 { .. } => {
            CniError::from_error(code::BAD_SUBNET_FILE, &e).context("bad subnet file")
        }
        FactsError::BadValue { .. } | FactsError::Malformed { .. } | FactsError::Missing(_) => {
            CniError::from_error(code::BAD_SUBNET_FILE, &e)
                .context(format!("subnet file {}", path.display()))
        }
    })
}

fn open_netns(path: &Path) -> Result<Netns, CniError> {
    Ok(Netns::open(path)?)
}

/// One address as ADD hands it to the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodIp {
    addr: IpNet,
    gateway: Option<IpAddr>,
}

/// The addresses of an ADD and how to give them back.
#[derive(Debug)]
struct Lease {
    ips: Vec<PodIp>,
    /// Extra routes from a delegated IPAM result.
    routes: Vec<Route>,
    dns: crate::result::Dns,
    undo: Undo,
}

#[derive(Debug)]
enum Undo {
    /// Built-in addresses this call reserved.
    Builtin(Vec<IpAddr>),
    /// Run the delegated plugin's DEL.
    Delegate(std::path::PathBuf),
}

fn pools(conf: &NetConf, facts: &SubnetFacts) -> Result<Vec<Pool>, CniError> {
    let Ipam::Builtin(b) = &conf.ipam else {
        return Ok(Vec::new());
    };
    let mut pools = Vec::new();
    for net in [
        facts.subnet.map(IpNet::V4),
        facts.ipv6_subnet.map(IpNet::V6),
    ]
    .into_iter()
    .flatten()
    {
        let v4 = net.addr().is_ipv4();
        let fam = |ip: &Option<IpAddr>| ip.filter(|ip| ip.is_ipv4() == v4);
        pools.push(Pool::new(net, fam(&b.range_start), fam(&b.range_end))?);
    }
    Ok(pools)
}

fn lease(inv: Invocation<'_>, facts: &SubnetFacts) -> Result<Lease, CniError> {
    let (env, conf) = (inv.env, inv.conf);
    match &conf.ipam {
        Ipam::Builtin(b) => {
            let pools = pools(conf, facts)?;
            let mut requested = conf.requested_ips.clone();
            if let Some(ip) = env.arg("IP") {
                for part in ip.split(',') {
                    let bad = |why: &str| {
                        CniError::new(
                            code::INVALID_ENV,
                            format!("invalid CNI_ARGS IP={part:?}: {why}"),
                        )
                    };
                    let ip = part.parse().map_err(|_| bad("not an IP address"))?;
                    add_requested(&mut requested, ip).map_err(|why| bad(&why))?;
                }
            }
            // An address of a family the node has no subnet for would be silently dropped.
            if let Some(ip) = requested
                .iter()
                .find(|ip| !pools.iter().any(|p| p.start.is_ipv4() == ip.is_ipv4()))
            {
                return Err(IpamError::Unavailable {
                    ip: *ip,
                    reason: format!(
                        "the node has no IPv{} subnet (subnet file {})",
                        if ip.is_ipv4() { 4 } else { 6 },
                        conf.subnet_file.display()
                    ),
                }
                .into());
            }
            let store = Store::open(&conf.data_dir, &conf.name, b.lock_timeout)?;
            let got = store.allocate(
                &conf.name,
                &pools,
                &env.container_id,
                &env.ifname,
                &requested,
            )?;
            drop(store);
            let ips = got
                .iter()
                .zip(&pools)
                .map(|((ip, _), pool)| PodIp {
                    addr: match conf.mode {
                        Mode::Bridge => pool.with_prefix(*ip),
                        Mode::Routed => IpNet::from(*ip),
                    },
                    gateway: Some(pool.gateway),
                })
                .collect();
            let fresh = got.iter().filter(|(_, f)| *f).map(|(ip, _)| *ip).collect();
            Ok(Lease {
                ips,
                routes: Vec::new(),
                dns: crate::result::Dns::default(),
                undo: Undo::Builtin(fresh),
            })
        }
        Ipam::Delegate { plugin } => {
            let path = delegate::find(plugin, &env.path)?;
            let out = delegate::exec(&path, "ADD", &env.raw, inv.stdin)?;
            let undo = Undo::Delegate(path.clone());
            let parsed = out.map(CniResult::from_value).transpose().map_err(|e| {
                CniError::new(
                    code::DELEGATE,
                    format!(
                        "IPAM plugin {} ADD: undecodable result: {e}",
                        path.display()
                    ),
                )
            });
            let result = match parsed {
                Ok(Some(r)) if !r.ips.is_empty() => r,
                other => {
                    // Give the addresses back before failing.
                    let _ = delegate::exec(&path, "DEL", &env.raw, inv.stdin);
                    return Err(other.err().unwrap_or_else(|| {
                        CniError::new(
                            code::DELEGATE,
                            format!("IPAM plugin {} ADD returned no address", path.display()),
                        )
                    }));
                }
            };
            let ips = result
                .ips
                .iter()
                .map(|ip| {
                    let v4 = ip.address.addr().is_ipv4();
                    let facts_gw = if v4 {
                        facts.gateway_v4().map(IpAddr::V4)
                    } else {
                        facts.gateway_v6().map(IpAddr::V6)
                    };
                    PodIp {
                        addr: match conf.mode {
                            Mode::Bridge => ip.address,
                            Mode::Routed => IpNet::from(ip.address.addr()),
                        },
                        gateway: ip.gateway.or(facts_gw),
                    }
                })
                .collect();
            Ok(Lease {
                ips,
                routes: result.routes,
                dns: result.dns,
                undo,
            })
        }
    }
}

fn give_back(inv: Invocation<'_>, undo: &Undo) {
    let (env, conf) = (inv.env, inv.conf);
    match undo {
        Undo::Builtin(ips) if ips.is_empty() => {}
        Undo::Builtin(ips) => {
            let timeout = match &conf.ipam {
                Ipam::Builtin(b) => b.lock_timeout,
                Ipam::Delegate { .. } => crate::config::DEFAULT_LOCK_TIMEOUT,
            };
            match Store::open_existing(&conf.data_dir, &conf.name, timeout) {
                Ok(Some(s)) => {
                    for ip in ips {
                        if let Err(e) = s.release(*ip) {
                            warn!(error = %e, "rollback: release address");
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => warn!(error = %e, "rollback: open IPAM store"),
            }
        }
        Undo::Delegate(path) => {
            if let Err(e) = delegate::exec(path, "DEL", &env.raw, inv.stdin) {
                warn!(error = %e, "rollback: IPAM plugin DEL");
            }
        }
    }
}

fn default_dst(v4: bool) -> IpNet {
    if v4 {
        IpNet::V4(ipnet::Ipv4Net::default())
    } else {
        IpNet::V6(ipnet::Ipv6Net::default())
    }
}

/// ADD: lease, bridge, veth, pod configuration; rolls back on failure. Returns the result, merged
/// after `prevResult` when there is one.
pub fn add(dp: &mut dyn Dataplane, inv: Invocation<'_>) -> Result<CniResult, CniError> {
    let (env, conf) = (inv.env, inv.conf);
    let netns_path = env
        .netns
        .as_deref()
        .ok_or_else(|| CniError::new(code::INVALID_ENV, "invalid CNI_NETNS: not set"))?;
    let facts = read_facts(&conf.subnet_file)?;
    let mtu = conf.mtu.unwrap_or(facts.mtu);
    let netns = open_netns(netns_path)?;
    let lease = lease(inv, &facts)?;
    debug!(ips = ?lease.ips, "leased");
    let host = inv.host_veth();
    let mut veth_created = false;
    let outcome = attach(dp, inv, &netns, &lease, &host, mtu, &mut veth_created);
    match outcome {
        Ok(r) => Ok(match &conf.prev_result {
            Some(prev) => prev.clone().merged(r),
            None => r,
        }),
        Err(e) => {
            warn!(error = %e, "ADD failed, rolling back");
            if veth_created && let Err(d) = dp.delete_link(&host) {
                warn!(error = %d, "rollback: delete veth");
            }
            give_back(inv, &lease.undo);
            Err(e)
        }
    }
}

fn attach(
    dp: &mut dyn Dataplane,
    inv: Invocation<'_>,
    netns: &Netns,
    lease: &Lease,
    host: &str,
    mtu: u32,
    veth_created: &mut bool,
) -> Result<CniResult, CniError> {
    let (env, conf) = (inv.env, inv.conf);
    let v4 = lease.ips.iter().find_map(|ip| match ip.addr.addr() {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    });
    let peer_mac = match v4 {
        Some(a) => names::mac_from_ipv4(a),
        None => names::mac_from_hash(&[&conf.name, &env.container_id, &env.ifname, "pod"]),
    };
    let host_mac = names::mac_from_hash(&[&conf.name, &env.container_id, &env.ifname, "host"]);

    let master = match conf.mode {
        Mode::Bridge => {
            let addrs: Vec<IpNet> = lease
                .ips
                .iter()
                .filter_map(|ip| {
                    ip.gateway
                        .and_then(|gw| IpNet::new(gw, ip.addr.prefix_len()).ok())
                })
                .collect();
            let mac = match addrs.iter().find_map(|a| match a.addr() {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            }) {
                Some(gw) => names::mac_from_ipv4(gw),
                None => names::mac_from_hash(&[&conf.bridge, "bridge"]),
            };
            Some(dp.ensure_bridge(&BridgeSpec {
                name: conf.bridge.clone(),
                mtu,
                mac,
                addrs,
            })?)
        }
        Mode::Routed => None,
    };

    let veth = VethSpec {
        host: host.to_string(),
        host_mac,
        peer: env.ifname.clone(),
        peer_mac,
        mtu,
        master,
    };
    match dp.create_veth(netns, &veth) {
        Ok(()) => {}
        Err(e) if e.is_exists() => {
            // Either our own host end from an earlier ADD of this attachment (retried ADD,
            // crash): delete it, which takes its pod end along, and create again. Or CNI_IFNAME
            // is taken inside the pod by something else: not ours to touch.
            if dp.delete_link(host)? {
                info!(host, "replaced a stale veth of this attachment");
                dp.create_veth(netns, &veth)
                    .map_err(|e| taken_or(e, env, netns))?;
            } else {
                return Err(taken_or(e, env, netns));
            }
        }
        Err(e) => return Err(e.into()),
    }
    *veth_created = true;

    let routed = conf.mode == Mode::Routed;
    dp.setup_host_port(&HostPort {
        name: host.to_string(),
        alias: names::alias(&conf.name, &env.container_id, &env.ifname),
        hairpin: !routed,
        routes: if routed {
            lease
                .ips
                .iter()
                .map(|ip| IpNet::from(ip.addr.addr()))
                .collect()
        } else {
            Vec::new()
        },
    })?;

    let mut routes = Vec::new();
    let mut neighbours = Vec::new();
    let mut result_routes = Vec::new();
    for ip in &lease.ips {
        let Some(gw) = ip.gateway else { continue };
        let v4 = ip.addr.addr().is_ipv4();
        if routed {
            neighbours.push((gw, host_mac));
            routes.push(RouteSpec {
                dst: IpNet::from(gw),
                gw: None,
                onlink: false,
            });
        }
        // A delegated IPAM that returned its own routes decides them.
        if lease.routes.is_empty() {
            routes.push(RouteSpec {
                dst: default_dst(v4),
                gw: Some(gw),
                onlink: routed,
            });
            result_routes.push(Route {
                dst: default_dst(v4),
                gw: Some(gw),
                extra: Map::new(),
            });
        }
    }
    for r in &lease.routes {
        let gw = r.gw.or_else(|| {
            lease
                .ips
                .iter()
                .find(|ip| ip.addr.addr().is_ipv4() == r.dst.addr().is_ipv4())
                .and_then(|ip| ip.gateway)
        });
        routes.push(RouteSpec {
            dst: r.dst,
            gw,
            onlink: routed,
        });
        result_routes.push(r.clone());
    }
    dp.configure_container(
        netns,
        &ContainerSpec {
            ifname: env.ifname.clone(),
            addrs: lease.ips.iter().map(|ip| ip.addr).collect(),
            neighbours,
            routes,
        },
    )?;

    let dns = if conf.dns.is_empty() {
        lease.dns.clone()
    } else {
        conf.dns.clone()
    };
    Ok(CniResult {
        interfaces: vec![
            Interface {
                name: host.to_string(),
                mac: names::mac_string(&host_mac),
                mtu: Some(mtu),
                ..Interface::default()
            },
            Interface {
                name: env.ifname.clone(),
                mac: names::mac_string(&peer_mac),
                mtu: Some(mtu),
                sandbox: Some(netns.path.display().to_string()),
                ..Interface::default()
            },
        ],
        ips: lease
            .ips
            .iter()
            .map(|ip| IpConfig {
                address: ip.addr,
                gateway: ip.gateway,
                interface: Some(1),
                extra: Map::new(),
            })
            .collect(),
        routes: result_routes,
        dns,
    })
}

fn taken_or(e: crate::dataplane::NetError, env: &CniEnv, netns: &Netns) -> CniError {
    if e.is_exists() {
        CniError::from_error(code::IFNAME_TAKEN, &e).context(format!(
            "interface name {} is already taken in {}",
            env.ifname,
            netns.path.display()
        ))
    } else {
        e.into()
    }
}

/// DEL: delete the host veth (the pod end goes with it), release the addresses. Succeeds when
/// any of it is already gone.
pub fn del(dp: &mut dyn Dataplane, inv: Invocation<'_>) -> Result<(), CniError> {
    let (env, conf) = (inv.env, inv.conf);
    let host = inv.host_veth();
    let existed = dp.delete_link(&host)?;
    debug!(host, existed, "deleted veth");
    match &conf.ipam {
        Ipam::Builtin(b) => {
            // No state directory: nothing was ever allocated, and DEL creates nothing.
            if let Some(store) = Store::open_existing(&conf.data_dir, &conf.name, b.lock_timeout)? {
                let released = store.release_owner(&env.container_id, &env.ifname)?;
                debug!(?released, "released");
            }
        }
        Ipam::Delegate { plugin } => {
            let path = delegate::find(plugin, &env.path)?;
            delegate::exec(&path, "DEL", &env.raw, inv.stdin)?;
        }
    }
    Ok(())
}

fn check_failed(msg: impl Into<String>) -> CniError {
    CniError::new(code::CHECK_FAILED, msg)
}

/// The error for a config field a command needs (`why`) and was not given.
fn missing_field(field: &str, why: &str) -> CniError {
    CniError::new(
        code::INVALID_CONFIG,
        format!("missing field {field}: {why}"),
    )
}

/// CHECK: the pod end, its addresses and default routes, the host end, and the lease are as the
/// `prevResult` of ADD says.
pub fn check(dp: &mut dyn Dataplane, inv: Invocation<'_>) -> Result<(), CniError> {
    let (env, conf) = (inv.env, inv.conf);
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| missing_field("prevResult", "CHECK needs ADD's result"))?;
    let netns_path = env
        .netns
        .as_deref()
        .ok_or_else(|| CniError::new(code::INVALID_ENV, "invalid CNI_NETNS: not set"))?;
    let netns = open_netns(netns_path)?;
    let ours = prev
        .interfaces
        .iter()
        .position(|i| i.name == env.ifname && i.sandbox.is_some())
        .ok_or_else(|| {
            check_failed(format!(
                "prevResult has no interface {} in a sandbox",
                env.ifname
            ))
        })?;
    let want_ips: Vec<&IpConfig> = prev
        .ips
        .iter()
        .filter(|ip| ip.interface == Some(ours))
        .collect();

    let state = dp.inspect_container(&netns, &env.ifname)?.ok_or_else(|| {
        check_failed(format!(
            "interface {} not found in {}",
            env.ifname,
            netns.path.display()
        ))
    })?;
    let want_mac = &prev.interfaces[ours].mac;
    if let Some(mac) = state.link.mac
        && !want_mac.is_empty()
        && !names::mac_string(&mac).eq_ignore_ascii_case(want_mac)
    {
        return Err(check_failed(format!(
            "interface {} has MAC {}, expected {want_mac}",
            env.ifname,
            names::mac_string(&mac)
        )));
    }
    for ip in &want_ips {
        if !state.addrs.contains(&ip.address) {
            return Err(check_failed(format!(
                "address {} missing on {} (has {:?})",
                ip.address, env.ifname, state.addrs
            )));
        }
    }
    let gateways: HashSet<IpAddr> = want_ips.iter().filter_map(|ip| ip.gateway).collect();
    for r in &prev.routes {
        if r.gw.is_some_and(|g| gateways.contains(&g))
            && !state.routes.iter().any(|(d, g)| *d == r.dst && *g == r.gw)
        {
            return Err(check_failed(format!(
                "route {} via {:?} missing in {}",
                r.dst,
                r.gw,
                netns.path.display()
            )));
        }
    }

    let host = inv.host_veth();
    let link = dp
        .link(&host)?
        .ok_or_else(|| check_failed(format!("host veth {host} not found")))?;
    if !link.up {
        return Err(check_failed(format!("host veth {host} is down")));
    }
    if conf.mode == Mode::Bridge {
        let bridge = dp
            .link(&conf.bridge)?
            .ok_or_else(|| check_failed(format!("bridge {} not found", conf.bridge)))?;
        if link.master != Some(bridge.index) {
            return Err(check_failed(format!(
                "host veth {host} is not attached to bridge {}",
                conf.bridge
            )));
        }
    }

    match &conf.ipam {
        Ipam::Builtin(b) => {
            let held = match Store::open_existing(&conf.data_dir, &conf.name, b.lock_timeout)? {
                Some(store) => store.by_owner(&env.container_id, &env.ifname)?,
                None => Vec::new(),
            };
            for ip in &want_ips {
                if !held.contains(&ip.address.addr()) {
                    return Err(check_failed(format!(
                        "address {} is not allocated to {}/{} in {}",
                        ip.address.addr(),
                        env.container_id,
                        env.ifname,
                        conf.data_dir.join(&conf.name).display()
                    )));
                }
            }
        }
        Ipam::Delegate { plugin } => {
            let path = delegate::find(plugin, &env.path)?;
            delegate::exec(&path, "CHECK", &env.raw, inv.stdin)?;
        }
    }
    Ok(())
}

fn is_valid(valid: &HashSet<Attachment>, id: &str, ifname: Option<&str>) -> bool {
    match ifname {
        Some(i) => valid.contains(&Attachment {
            container_id: id.to_string(),
            ifname: i.to_string(),
        }),
        None => valid.iter().any(|a| a.container_id == id),
    }
}

/// GC: release leases and delete veths of this network whose attachment is not in
/// `cni.dev/valid-attachments`.
pub fn gc(dp: &mut dyn Dataplane, inv: Invocation<'_>) -> Result<(), CniError> {
    let (env, conf) = (inv.env, inv.conf);
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        missing_field(
            "cni.dev/valid-attachments",
            "GC needs the list of live attachments",
        )
    })?;
    match &conf.ipam {
        Ipam::Builtin(b) => {
            if let Some(store) = Store::open_existing(&conf.data_dir, &conf.name, b.lock_timeout)? {
                for (ip, owner) in store.all()? {
                    if !is_valid(valid, &owner.container_id, owner.ifname.as_deref()) {
                        info!(%ip, container = owner.container_id, "GC: releasing address");
                        store.release(ip)?;
                    }
                }
            }
        }
        Ipam::Delegate { plugin } => {
            let path = delegate::find(plugin, &env.path)?;
            if delegate::supports(&path, &env.raw, "1.1.0") {
                delegate::exec(&path, "GC", &env.raw, inv.stdin)?;
            } else {
                info!(plugin = %path.display(), "GC: IPAM plugin predates 1.1.0, not passed on");
            }
        }
    }
    let expected: HashSet<String> = valid
        .iter()
        .map(|a| names::host_veth(&conf.name, &a.container_id, &a.ifname))
        .collect();
    let bridge_index = match conf.mode {
        Mode::Bridge => dp.link(&conf.bridge)?.map(|l| l.index),
        Mode::Routed => None,
    };
    for link in dp.links()? {
        if !link.name.starts_with(names::VETH_PREFIX) || expected.contains(&link.name) {
            continue;
        }
        let stale = match link
            .alias
            .as_deref()
            .map(|a| names::parse_alias(&conf.name, a))
        {
            Some(Some((id, ifname))) => !is_valid(valid, id, Some(ifname)),
            // Another network's veth, or not twill's.
            Some(None) => false,
            // No alias: killed between creating the veth and labelling it. Only ports of our
            // own bridge can be claimed.
            None => {
                link.kind.as_deref() == Some("veth")
                    && bridge_index.is_some()
                    && link.master == bridge_index
            }
        };
        if stale {
            info!(link = link.name, "GC: deleting veth");
            dp.delete_link(&link.name)?;
        }
    }
    Ok(())
}

/// STATUS: ready when the subnet facts are readable (and a 1.1.0 IPAM plugin says so too).
pub fn status(inv: Invocation<'_>) -> Result<(), CniError> {
    let (env, conf) = (inv.env, inv.conf);
    read_facts(&conf.subnet_file).map_err(|e| CniError {
        code: code::NOT_AVAILABLE,
        msg: format!("node network not ready: {}", e.msg),
        details: e.details,
    })?;
    if let Ipam::Delegate { plugin } = &conf.ipam {
        let path = delegate::find(plugin, &env.path)?;
        if delegate::supports(&path, &env.raw, "1.1.0") {
            delegate::exec(&path, "STATUS", &env.raw, inv.stdin)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::Write as _;

    use super::*;
    use crate::config::load_conf;
    use crate::dataplane::fake::FakeDataplane;

    struct Fixture {
        dir: tempfile::TempDir,
    }

    /// A real network namespace file (the test's own; the fake dataplane never enters it).
    const OWN_NETNS: &str = "/proc/self/ns/net";

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let mut f = std::fs::File::create(dir.path().join("subnet.env")).unwrap();
            f.write_all(
                b"FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\n",
            )
            .unwrap();
            Fixture { dir }
        }

        fn conf(&self, extra: &str) -> NetConf {
            let d = self.dir.path().display();
            load_conf(
                format!(
                    r#"{{"cniVersion":"1.0.0","name":"net","type":"twill-cni",
                    "subnetFile":"{d}/subnet.env","dataDir":"{d}/data"{extra}}}"#
                )
                .as_bytes(),
            )
            .unwrap()
        }

        /// ADD of container `c1` on `dp`, with the config `extra` adds to the base one.
        fn add_c1(&self, dp: &mut FakeDataplane, extra: &str) -> Result<CniResult, CniError> {
            add(dp, inv(&Self::env("ADD", "c1"), &self.conf(extra)))
        }

        fn env(cmd: &str, id: &str) -> CniEnv {
            Self::env_with(cmd, id, &[])
        }

        /// [`Fixture::env`] with more (or other) variables.
        fn env_with(cmd: &str, id: &str, more: &[(&str, &str)]) -> CniEnv {
            let mut vars: HashMap<String, String> = [
                ("CNI_COMMAND", cmd),
                ("CNI_CONTAINERID", id),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", OWN_NETNS),
            ]
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
            vars.extend(
                more.iter()
                    .map(|(k, v)| ((*k).to_string(), (*v).to_string())),
            );
            CniEnv::from_map(vars).unwrap()
        }

        fn subnet_file(&self) -> std::path::PathBuf {
            self.dir.path().join("subnet.env")
        }

        fn data_dir(&self) -> std::path::PathBuf {
            self.dir.path().join("data")
        }

        fn leases(&self) -> usize {
            std::fs::read_dir(self.dir.path().join("data/net")).map_or(0, |rd| {
                rd.filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_str()
                        .unwrap()
                        .parse::<IpAddr>()
                        .is_ok()
                })
                .count()
            })
        }
    }

    fn inv<'a>(env: &'a CniEnv, conf: &'a NetConf) -> Invocation<'a> {
        Invocation {
            env,
            conf,
            stdin: b"{}",
        }
    }

    #[test]
    fn add_builds_bridge_veth_pod_in_order() {
        let fx = Fixture::new();
        let mut dp = FakeDataplane::default();
        let r = fx.add_c1(&mut dp, "").unwrap();
        let host = names::host_veth("net", "c1", "eth0");
        assert_eq!(
            dp.calls,
            vec![
                "ensure_bridge cni0".to_string(),
                format!("create_veth {host} eth0"),
                format!("setup_host_port {host}"),
                "configure_container eth0".to_string(),
            ]
        );
        assert_eq!(r.ips[0].address.to_string(), "10.244.1.2/24");
        assert_eq!(r.ips[0].gateway.unwrap().to_string(), "10.244.1.1");
        assert_eq!(r.interfaces[1].mac, "0a:58:0a:f4:01:02");
        assert_eq!(r.routes[0].dst.to_string(), "0.0.0.0/0");
        assert_eq!(fx.leases(), 1);
    }

    #[test]
    fn failed_pod_configuration_rolls_back_veth_and_address() {
        let fx = Fixture::new();
        let mut dp = FakeDataplane::default();
        dp.fail.insert("configure_container", libc::EPERM);
        let e = fx.add_c1(&mut dp, "").unwrap_err();
        assert_eq!(e.code, code::NETLINK);
        assert!(
            e.details.contains("os error 1") || e.msg.contains("os error 1"),
            "{e}"
        );
        let host = names::host_veth("net", "c1", "eth0");
        assert_eq!(dp.calls.last().unwrap(), &format!("delete_link {host}"));
        assert!(!dp.links.contains_key(&host));
        assert_eq!(fx.leases(), 0, "address not released");
    }

    #[test]
    fn taken_ifname_is_101_and_releases_the_address() {
        let fx = Fixture::new();
        let mut dp = FakeDataplane::default();
        dp.pod_taken.push("eth0".into());
        let e = fx.add_c1(&mut dp, "").unwrap_err();
        assert_eq!(e.code, code::IFNAME_TAKEN, "{e}");
        assert_eq!(fx.leases(), 0);
        assert!(
            !dp.calls
                .iter()
                .any(|c| c.starts_with("configure_container"))
        );
    }

    #[test]
    fn repeated_add_replaces_the_veth_and_keeps_the_address() {
        let fx = Fixture::new();
        let mut dp = FakeDataplane::default();
        let a = fx.add_c1(&mut dp, "").unwrap();
        let b = fx.add_c1(&mut dp, "").unwrap();
        assert_eq!(a.ips, b.ips);
        assert_eq!(fx.leases(), 1);
        let host = names::host_veth("net", "c1", "eth0");
        assert!(dp.calls.contains(&format!("delete_link {host}")));
        // A failing repeated ADD must not release the address the first ADD gave.
        dp.fail.insert("configure_container", libc::EPERM);
        fx.add_c1(&mut dp, "").unwrap_err();
        assert_eq!(fx.leases(), 1);
    }

    #[test]
    fn routed_mode_uses_host_routes_and_a_static_neighbour() {
        let fx = Fixture::new();
        let mut dp = FakeDataplane::default();
        let r = fx.add_c1(&mut dp, r#","mode":"routed""#).unwrap();
        assert!(!dp.calls.iter().any(|c| c.starts_with("ensure_bridge")));
        assert_eq!(r.ips[0].address.to_string(), "10.244.1.2/32");
    }

    #[test]
    fn missing_subnet_file_is_11_and_garbage_is_103() {
        let fx = Fixture::new();
        let (env, conf) = (Fixture::env("ADD", "c1"), fx.conf(""));
        std::fs::remove_file(fx.dir.path().join("subnet.env")).unwrap();
        let mut dp = FakeDataplane::default();
        let e = add(&mut dp, inv(&env, &conf)).unwrap_err();
        assert_eq!(e.code, code::TRY_AGAIN, "{e}");
        assert!(e.msg.contains("subnet.env"));
        let s = status(inv(&env, &conf)).unwrap_err();
        assert_eq!(s.code, code::NOT_AVAILABLE);
        std::fs::write(fx.dir.path().join("subnet.env"), "garbage\n").unwrap();
        assert_eq!(
            add(&mut dp, inv(&env, &conf)).unwrap_err().code,
            code::BAD_SUBNET_FILE
        );
        assert_eq!(
            status(inv(&env, &conf)).unwrap_err().code,
            code::NOT_AVAILABLE
        );
        assert!(dp.calls.is_empty());
    }

    #[test]
    fn cni_netns_must_be_a_network_namespace() {
        let fx = Fixture::new();
        let conf = fx.conf("");
        let file = fx.dir.path().join("not-a-netns");
        std::fs::write(&file, "").unwrap();
        let file = file.to_str().unwrap().to_string();
        for (path, what) in [
            (file.as_str(), "regular file"),
            ("/dev/null", "character device"),
            ("/proc/self/ns/mnt", "mnt namespace"),
            ("/proc/self", "directory"),
        ] {
            for cmd in ["ADD", "CHECK"] {
                let env = Fixture::env_with(cmd, "c1", &[("CNI_NETNS", path)]);
                let mut dp = FakeDataplane::default();
                let e = if cmd == "ADD" {
                    add(&mut dp, inv(&env, &conf)).unwrap_err()
                } else {
                    let with_prev = fx.conf(r#","prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/x"}]}"#);
                    check(&mut dp, inv(&env, &with_prev)).unwrap_err()
                };
                assert_eq!(e.code, code::INVALID_ENV, "{cmd} {path}: {e}");
                assert!(
                    e.msg.contains("CNI_NETNS") && e.msg.contains(path) && e.msg.contains(what),
                    "{cmd} {path}: {}",
                    e.msg
                );
                assert!(dp.calls.is_empty(), "{cmd} {path}: {:?}", dp.calls);
            }
        }
        assert!(!fx.data_dir().exists(), "an IPAM directory was created");
        // A path that does not exist is an unknown container (3).
        let env = Fixture::env_with("ADD", "c1", &[("CNI_NETNS", "/run/netns/twill-no-such")]);
        let e = add(&mut FakeDataplane::default(), inv(&env, &conf)).unwrap_err();
        assert_eq!(e.code, code::UNKNOWN_CONTAINER, "{e}");
    }

    #[test]
    fn subnet_file_problems_are_103_and_touch_nothing() {
        let fx = Fixture::new();
        let good = std::fs::read_to_string(fx.subnet_file()).unwrap();
        let mut padded = good.clone();
        while padded.len() <= 64 * 1024 {
            padded.push_str("# padding padding padding padding padding padding padding\n");
        }
        let fifo = fx.dir.path().join("fifo.env");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let subnet = fx.subnet_file().display().to_string();
        let fifo = fifo.display().to_string();
        // Control: a harmless addition (a UTF-8 comment) is still accepted.
        std::fs::write(fx.subnet_file(), format!("{good}# café\n")).unwrap();
        let mut dp = FakeDataplane::default();
        add(&mut dp, inv(&Fixture::env("ADD", "ok"), &fx.conf(""))).unwrap();
        del(&mut dp, inv(&Fixture::env("DEL", "ok"), &fx.conf(""))).unwrap();
        dp.calls.clear();
        std::fs::remove_dir_all(fx.data_dir()).unwrap();
        for (text, name, why) in [
            (
                [good.as_bytes(), b"# caf\xe9\n"].concat(),
                subnet.as_str(),
                "UTF-8",
            ),
            (padded.into_bytes(), subnet.as_str(), "larger than"),
            (
                b"FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.245.1.1/24\nFLANNEL_MTU=1450\n"
                    .to_vec(),
                "10.245.1.1/24",
                "outside FLANNEL_NETWORK",
            ),
            (
                b"FLANNEL_SUBNET=0.0.0.1/0\nFLANNEL_MTU=1450\n".to_vec(),
                "0.0.0.1/0",
                "FLANNEL_SUBNET",
            ),
        ] {
            std::fs::write(fx.subnet_file(), &text).unwrap();
            let e = add(&mut dp, inv(&Fixture::env("ADD", "c1"), &fx.conf(""))).unwrap_err();
            assert_eq!(e.code, code::BAD_SUBNET_FILE, "{name}: {e}");
            assert!(
                e.msg.contains(name) && e.msg.contains(why),
                "{name}: {}",
                e.msg
            );
        }
        // Paths that are not a subnet file at all; /dev/zero last (it must not be read to its end).
        for (path, why) in [
            (fifo.as_str(), "FIFO"),
            ("/tmp", "directory"),
            ("/dev/zero", "character device"),
        ] {
            let conf = fx.conf(&format!(r#","subnetFile":"{path}""#));
            let e = add(&mut dp, inv(&Fixture::env("ADD", "c1"), &conf)).unwrap_err();
            assert_eq!(e.code, code::BAD_SUBNET_FILE, "{path}: {e}");
            assert!(
                e.msg.contains(path) && e.msg.contains(why),
                "{path}: {}",
                e.msg
            );
            let s = status(inv(&Fixture::env("ADD", "c1"), &conf)).unwrap_err();
            assert_eq!(s.code, code::NOT_AVAILABLE, "{path}: {s}");
        }
        assert!(dp.calls.is_empty(), "{:?}", dp.calls);
        assert!(!fx.data_dir().exists(), "an IPAM directory was created");
    }

    #[test]
    fn missing_subnet_file_says_the_os_error_once() {
        let fx = Fixture::new();
        std::fs::remove_file(fx.subnet_file()).unwrap();
        let e = add(
            &mut FakeDataplane::default(),
            inv(&Fixture::env("ADD", "c1"), &fx.conf("")),
        )
        .unwrap_err();
        assert_eq!(e.code, code::TRY_AGAIN);
        let shown = format!("{}; {}", e.msg, e.details);
        assert_eq!(shown.matches("os error 2").count(), 1, "{shown}");
        assert_eq!(shown.matches("subnet.env").count(), 1, "{shown}");
        assert!(shown.contains("twilld"), "{shown}");
    }

    #[test]
    fn del_and_gc_never_create_the_ipam_directory() {
        let fx = Fixture::new();
        let mut dp = FakeDataplane::default();
        del(&mut dp, inv(&Fixture::env("DEL", "c1"), &fx.conf(""))).unwrap();
        let gc_conf = fx.conf(r#","cniVersion":"1.1.0","cni.dev/valid-attachments":[]"#);
        let env = CniEnv::from_map([("CNI_COMMAND".to_string(), "GC".to_string())].into()).unwrap();
        gc(&mut dp, inv(&env, &gc_conf)).unwrap();
        assert!(
            !fx.data_dir().exists(),
            "DEL or GC created {}",
            fx.data_dir().display()
        );
        // Once ADD made it, DEL releases in it as before.
        add(&mut dp, inv(&Fixture::env("ADD", "c1"), &fx.conf(""))).unwrap();
        assert_eq!(fx.leases(), 1);
        del(&mut dp, inv(&Fixture::env("DEL", "c1"), &fx.conf(""))).unwrap();
        assert_eq!(fx.leases(), 0);
    }

    #[test]
    fn requested_addresses_are_never_dropped() {
        let fx = Fixture::new();
        let mut dp = FakeDataplane::default();
        // runtimeConfig.ips and CNI_ARGS IP= asking for two IPv4 addresses.
        let conf = fx.conf(r#","runtimeConfig":{"ips":["10.244.1.7/24"]}"#);
        let env = Fixture::env_with(
            "ADD",
            "c1",
            &[("CNI_ARGS", "IgnoreUnknown=1;IP=10.244.1.8")],
        );
        let e = add(&mut dp, inv(&env, &conf)).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV, "{e}");
        assert!(
            e.msg.contains("10.244.1.8") && e.msg.contains("10.244.1.7"),
            "{}",
            e.msg
        );
        let env = Fixture::env_with("ADD", "c1", &[("CNI_ARGS", "IP=10.244.1.8,10.244.1.9")]);
        let e = add(&mut dp, inv(&env, &fx.conf(""))).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV, "{e}");
        assert!(e.msg.contains("10.244.1.9"), "{}", e.msg);
        // An IPv6 address while the node has no IPv6 subnet.
        let conf = fx.conf(r#","runtimeConfig":{"ips":["10.244.1.7/24","fd00::7"]}"#);
        let e = add(&mut dp, inv(&Fixture::env("ADD", "c1"), &conf)).unwrap_err();
        assert_eq!(e.code, code::ADDRESS_EXHAUSTED, "{e}");
        assert!(
            e.msg.contains("fd00::7") && e.msg.contains("IPv6"),
            "{}",
            e.msg
        );
        assert_eq!(fx.leases(), 0);
        assert!(dp.calls.is_empty(), "{:?}", dp.calls);
        // The same address through both is one request.
        let conf = fx.conf(r#","runtimeConfig":{"ips":["10.244.1.7/24"]}"#);
        let env = Fixture::env_with("ADD", "c1", &[("CNI_ARGS", "IP=10.244.1.7")]);
        let r = add(&mut dp, inv(&env, &conf)).unwrap();
        assert_eq!(r.ips[0].address.to_string(), "10.244.1.7/24");
    }

    #[test]
    fn del_is_idempotent() {
        let fx = Fixture::new();
        let conf = fx.conf("");
        let (add_env, del_env) = (Fixture::env("ADD", "c1"), Fixture::env("DEL", "c1"));
        let mut dp = FakeDataplane::default();
        add(&mut dp, inv(&add_env, &conf)).unwrap();
        del(&mut dp, inv(&del_env, &conf)).unwrap();
        del(&mut dp, inv(&del_env, &conf)).unwrap();
        assert_eq!(fx.leases(), 0);
        assert!(dp.links.keys().all(|k| !k.starts_with("tw")));
    }

    #[test]
    fn gc_keeps_valid_and_removes_the_rest() {
        let fx = Fixture::new();
        let conf = fx.conf("");
        let mut dp = FakeDataplane::default();
        for id in ["a", "b", "c"] {
            add(&mut dp, inv(&Fixture::env("ADD", id), &conf)).unwrap();
        }
        // An unlabelled port of our bridge (killed mid-ADD) and a foreign veth.
        let veth = |name: &str, index| crate::dataplane::LinkState {
            name: name.into(),
            index,
            kind: Some("veth".into()),
            ..Default::default()
        };
        let port = crate::dataplane::LinkState {
            master: Some(dp.links["cni0"].index),
            ..veth("tw0000000000000", 99)
        };
        let foreign = crate::dataplane::LinkState {
            alias: Some("twill:othernet:x:eth0".into()),
            ..veth("tw1111111111111", 98)
        };
        for link in [port, foreign] {
            dp.links.insert(link.name.clone(), link);
        }
        let gc_conf = fx.conf(r#","cniVersion":"1.1.0","cni.dev/valid-attachments":[{"containerID":"b","ifname":"eth0"}]"#);
        let env = CniEnv::from_map([("CNI_COMMAND".to_string(), "GC".to_string())].into()).unwrap();
        gc(&mut dp, inv(&env, &gc_conf)).unwrap();
        assert_eq!(fx.leases(), 1);
        let mut left: Vec<_> = dp.links.keys().cloned().collect();
        left.sort();
        let mut want = vec![
            "cni0".to_string(),
            names::host_veth("net", "b", "eth0"),
            "tw1111111111111".to_string(),
        ];
        want.sort();
        assert_eq!(left, want);
        // Without the list GC refuses rather than deleting everything.
        let e = gc(&mut dp, inv(&env, &conf)).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
    }
}
