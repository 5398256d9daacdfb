//! Pods on the rig's nodes: by hand, through the real `twill-cni`, or in each [`PodShape`]
//! (the reference plugins, Calico-style routed veths).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use twill_facts::SubnetFacts;

use super::{
    CNI_NETWORK, CNI_VERSION, Pod, PodShape, REF_BRIDGE, REFERENCE_CNI_DIR, Rig, UNDERLAY_V4,
};
use crate::ns::{self, ip_batch, nsenter};

impl Rig {
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
        // Per family: the pod's address, the gateway, its prefix length, the default route's
        // destination and the `addr add` flags (no DAD for IPv6).
        let families: Vec<(IpAddr, IpAddr, u8, &str, &str)> = [
            ipv4.map(|(ip, gw)| (ip.into(), gw.addr().into(), gw.prefix_len(), "default", "")),
            ipv6.map(|(ip, gw)| {
                (
                    ip.into(),
                    gw.addr().into(),
                    gw.prefix_len(),
                    "::/0",
                    " nodad",
                )
            }),
        ]
        .into_iter()
        .flatten()
        .collect();

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
            for (_, gw, len, _, flags) in &families {
                let _ = writeln!(node_script, "addr add {gw}/{len} dev cni0{flags}");
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
        for (ip, gw, len, default, flags) in &families {
            let _ = write!(
                pod_script,
                "addr add {ip}/{len} dev eth0{flags}\nroute add {default} via {gw}\n"
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
