//! The configurations under test: twill's rig per backend, and the same pods wired by hand as
//! flannel wires them (the kernel baseline).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use twill_facts::SubnetFacts;
use twill_tests::ns::ip_batch;
use twill_tests::{Pod, Rig, RigOptions, ping, run, spawn, wait_until};

use super::params::{Plane, Subnet, UP};
use crate::cluster::Backend;

/// One configuration under test: a rig, its two pods, an iperf3 server in the second.
pub(crate) struct Setup {
    pub(crate) backend: Backend,
    pub(crate) plane: Plane,
    pub(crate) rig: Rig,
    pub(crate) client: Pod,
    pub(crate) server_ip: Ipv4Addr,
    pub(crate) subnets: [Subnet; 2],
    pub(crate) iperf: Option<Child>,
}

impl Setup {
    pub(crate) fn label(&self) -> String {
        match self.plane {
            Plane::Twill => format!("{} twill", self.backend),
            Plane::Kernel => format!("{} kernel", self.backend),
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(mut c) = self.iperf.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The line of a failed udp bring-up (error chain and twilld's log tail) that says why: the
/// first that mentions udp, else the first.
pub(crate) fn skip_reason(error: &str) -> String {
    let lines: Vec<&str> = error.lines().map(str::trim).collect();
    lines
        .iter()
        .find(|l| l.to_lowercase().contains("udp") && !l.starts_with("===="))
        .or(lines.first())
        .map_or_else(String::new, |l| (*l).to_string())
}

/// Subnets for a kernel rig with no twill rig to copy.
pub(crate) const DEFAULT_SUBNETS: [Subnet; 2] = [
    (Ipv4Addr::new(10, 244, 1, 0), 24),
    (Ipv4Addr::new(10, 244, 2, 0), 24),
];

pub(crate) fn subnet_of(facts: &SubnetFacts) -> Result<Subnet> {
    let net = facts
        .subnet_v4()
        .with_context(|| format!("no IPv4 subnet in {facts:?}"))?;
    Ok((net.network(), net.prefix_len()))
}

/// A twill rig: etcd, the backend's config, twilld on both nodes.
pub(crate) fn twill_setup(backend: Backend, bin_dir: Option<PathBuf>) -> Result<Setup> {
    let rig = Rig::with_options(RigOptions {
        nodes: 2,
        bin_dir,
        ..RigOptions::default()
    })?;
    rig.put_network_config(&backend.network_config())?;
    for node in 1..=2 {
        rig.start_twilld(node, &[])?;
    }
    let facts = [rig.wait_subnet_file(1, UP)?, rig.wait_subnet_file(2, UP)?];
    finish(rig, backend, Plane::Twill, &facts)
}

/// The kernel baseline: the same two nodes and subnets, programmed by hand.
pub(crate) fn kernel_setup(backend: Backend, subnets: [Subnet; 2]) -> Result<Setup> {
    let rig = Rig::with_options(RigOptions {
        nodes: 2,
        etcd: false,
        ..RigOptions::default()
    })?;
    // Uplink MTU 1500; VXLAN's overhead is 50 bytes.
    let mtu = if backend == Backend::Vxlan {
        1450
    } else {
        1500
    };
    let mut facts = Vec::new();
    for (net, len) in subnets {
        let gw = Ipv4Addr::from(u32::from(net) + 1);
        facts.push(SubnetFacts::parse(&format!(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={gw}/{len}\nFLANNEL_MTU={mtu}\n\
             FLANNEL_IPMASQ=false\n"
        ))?);
    }
    match backend {
        Backend::Vxlan => hand_vxlan(&rig, subnets)?,
        Backend::HostGw => hand_host_gw(&rig, subnets)?,
        Backend::Udp => bail!("the udp backend has no kernel twin"),
    }
    finish(rig, backend, Plane::Kernel, &facts)
}

/// flannel's VXLAN, by hand (ENVIRONMENT.md): per node a `flannel.1` VTEP with the subnet's
/// `.0/32`; per peer a route, a permanent neighbour and an FDB entry.
pub(crate) fn hand_vxlan(rig: &Rig, subnets: [Subnet; 2]) -> Result<()> {
    let mut macs = Vec::new();
    for node in 1..=2 {
        let ns = rig.node_ns(node);
        let (net, _) = subnets[node - 1];
        ip_batch(
            Some(&ns),
            &format!(
                "link add flannel.1 type vxlan id 1 local {} dev eth0 dstport 8472 nolearning\n\
                 link set flannel.1 mtu 1450\n\
                 addr add {net}/32 dev flannel.1\n\
                 link set flannel.1 up\n",
                Rig::node_ip(node)
            ),
        )?;
        let link = run(&ns, &["ip", "-o", "link", "show", "dev", "flannel.1"])?;
        let mac = link
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .with_context(|| format!("no MAC in {link:?}"))?
            .to_string();
        macs.push(mac);
    }
    for node in 1..=2 {
        let peer = 3 - node;
        let ns = rig.node_ns(node);
        let (pnet, plen) = subnets[peer - 1];
        let pmac = &macs[peer - 1];
        ip_batch(
            Some(&ns),
            &format!(
                "route add {pnet}/{plen} via {pnet} dev flannel.1 onlink\n\
                 neigh replace {pnet} lladdr {pmac} dev flannel.1 nud permanent\n"
            ),
        )?;
        let dst = Rig::node_ip(peer).to_string();
        run(
            &ns,
            &[
                "bridge",
                "fdb",
                "append",
                pmac,
                "dev",
                "flannel.1",
                "dst",
                &dst,
            ],
        )?;
    }
    Ok(())
}

/// host-gw by hand: `ip route add <peer subnet> via <peer node>`.
pub(crate) fn hand_host_gw(rig: &Rig, subnets: [Subnet; 2]) -> Result<()> {
    for node in 1..=2 {
        let peer = 3 - node;
        let (pnet, plen) = subnets[peer - 1];
        ip_batch(
            Some(&rig.node_ns(node)),
            &format!("route add {pnet}/{plen} via {}\n", Rig::node_ip(peer)),
        )?;
    }
    Ok(())
}

/// Pods on both nodes, a first ping through, an iperf3 server listening.
pub(crate) fn finish(
    rig: Rig,
    backend: Backend,
    plane: Plane,
    facts: &[SubnetFacts],
) -> Result<Setup> {
    let subnets = [subnet_of(&facts[0])?, subnet_of(&facts[1])?];
    let client = rig.add_pod(1, &facts[0])?;
    let server = rig.add_pod(2, &facts[1])?;
    let server_ip = server.ipv4.context("server pod has no IPv4 address")?;
    wait_until(UP, || {
        ping(&client.ns, server_ip, 1).is_ok_and(|s| s.all_received())
    })
    .with_context(|| {
        format!(
            "pod {} does not reach {server_ip}; routes of node 1:\n{}",
            client.ns,
            twill_tests::routes(&rig.node_ns(1)).unwrap_or_default()
        )
    })?;
    let mut setup = Setup {
        backend,
        plane,
        rig,
        client,
        server_ip,
        subnets,
        iperf: None,
    };
    setup.iperf = Some(spawn(&server.ns, &["iperf3", "-s"])?);
    wait_until(Duration::from_secs(10), || {
        run(&server.ns, &["ss", "-Hltn", "sport = :5201"]).is_ok_and(|o| !o.trim().is_empty())
    })
    .context("iperf3 server does not listen")?;
    Ok(setup)
}
