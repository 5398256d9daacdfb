//! The service proxy inside the agent: which dataplane (`--proxy-mode`), opened on which
//! interfaces and cgroup, fed by the standalone etcd source.
//!
//! The overlay loop in [`crate::daemon`] and this loop share nothing but the process: the service
//! loop runs on its own task, never blocks the overlay, and keeps the dataplane it has while etcd
//! is away (the source's contract).
//!
//! It also tells the service loop which addresses no frontend may take — the node's own (read
//! again at every resync), every etcd endpoint's, the API server's — and which external IPs it
//! programs (`--allowed-external-ips`; none by default with the etcd source, every one the API
//! server admitted with the Kubernetes source, as kube-proxy).

//!
//! The eBPF dataplane's outside-facing programs go on the uplink and the overlay devices; its
//! pod-side programs on every pod-facing interface, whatever the CNI made
//! ([`crate::services::dataplane::ebpf::podif`], `--pod-interfaces`): found before the dataplane opens (so
//! a restart keeps them attached), then followed by a task of their own on netlink events.
//! Which endpoints are local comes from their `nodeName` and from the node's pod subnet in the
//! subnet file (standalone EndpointSlices often name no node).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;

use crate::daemon::Options;
use crate::overlay::config::BackendType;
use crate::overlay::{Devices, Uplink};
use crate::services::dataplane::ebpf::podif::{Changes, LinkWatch, PodIfacePolicy, pod_facing};
use crate::services::dataplane::ebpf::{EbpfLb, TcIface};
use crate::services::dataplane::ebpf::{EbpfLbView, error_chain};
use crate::services::dataplane::iptables::{IptBackend, IptLb, detect_backend};
use crate::services::dataplane::nft::NftLb;
use crate::services::dataplane::{self, AnyLb, Mode};
use crate::services::desired::{NodeIdentity, Reserved};
use crate::services::source::{
    EtcdServiceStore, LoopSettings, ServiceMetrics, run_services, url_addresses,
};
use crate::shared::metrics::Metrics;

/// The default cgroup for socket-level load balancing: the cgroup2 root, so every process of
/// the node is balanced (mounted at `/sys/fs/cgroup/unified` on hybrid hosts).
pub fn default_cgroup() -> PathBuf {
    let unified = PathBuf::from("/sys/fs/cgroup/unified");
    if unified.join("cgroup.procs").exists() {
        unified
    } else {
        PathBuf::from("/sys/fs/cgroup")
    }
}

/// The node's name for EndpointSlice locality: `--node-name`, else the host name.
pub fn node_name(opts: &Options) -> String {
    opts.node_name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_or_else(|_| "localhost".to_string(), |h| h.trim().to_string())
    })
}

/// Parses one `--allowed-external-ips` value: a network in CIDR notation with no host bits
/// set, or a single address.
pub fn parse_allowed_network(s: &str) -> Result<ipnet::IpNet, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(ipnet::IpNet::from(ip));
    }
    let net: ipnet::IpNet = s
        .parse()
        .map_err(|_| format!("{s:?} is neither a network (CIDR) nor an address"))?;
    if net.trunc() != net {
        return Err(format!(
            "{s:?} has bits set beyond the prefix length (did you mean {}?)",
            net.trunc()
        ));
    }
    Ok(net)
}

/// The external IPs this node programs: `--allowed-external-ips`, else none with the etcd
/// source and every one with the Kubernetes source (the API server admitted them).
pub fn allowed_external_ips(opts: &Options) -> Option<Vec<ipnet::IpNet>> {
    match &opts.allowed_external_ips {
        Some(nets) => Some(nets.clone()),
        None if crate::shared::kube::services_from_kubernetes(opts) => None,
        None => Some(Vec::new()),
    }
}

/// The addresses of the calling thread's network namespace (the node's, in `twilld`) that a
/// Service could name (loopback and link-local ones, one per veth on a busy node, cannot).
fn own_addresses() -> Vec<IpAddr> {
    match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => addrs
            .filter_map(|a| {
                let a = a.address?;
                a.as_sockaddr_in()
                    .map(|v4| IpAddr::V4(v4.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
            })
            .filter(|ip| crate::services::model::special_ip(*ip).is_none())
            .collect(),
        Err(errno) => {
            tracing::warn!(error = %std::io::Error::from(errno), "getifaddrs: read the node's addresses");
            Vec::new()
        }
    }
}

/// The addresses no frontend may take besides the node's own: every etcd endpoint's when etcd
/// is used (for leases or services), the API server's when Kubernetes is.
async fn control_plane_addresses(opts: &Options) -> BTreeMap<IpAddr, Reserved> {
    let mut out = BTreeMap::new();
    let kube = opts.kube_subnet_mgr || crate::shared::kube::services_from_kubernetes(opts);
    if !opts.kube_subnet_mgr || !crate::shared::kube::services_from_kubernetes(opts) {
        for ip in url_addresses(&opts.etcd.etcd_endpoints).await {
            out.insert(ip, Reserved::Etcd);
        }
    }
    if kube {
        match crate::shared::kube::config(opts.kube_api_url.as_deref(), opts.kubeconfig.as_deref())
            .await
        {
            Ok(cfg) => {
                for ip in url_addresses(&[cfg.cluster_url.to_string()]).await {
                    out.insert(ip, Reserved::ApiServer);
                }
            }
            Err(e) => tracing::warn!(error = %e, "read the API server's address"),
        }
    }
    out
}

/// How often the pod-facing interfaces are re-read without an event (heals events lost to a
/// netlink socket overrun).
const POD_IFACE_HEAL: Duration = Duration::from_secs(30);
/// Wait before a new netlink subscription when the event stream broke.
const RESUBSCRIBE: Duration = Duration::from_secs(1);

/// What follows the pod-facing interfaces of an open eBPF dataplane.
struct PodSide {
    watch: LinkWatch,
    external: BTreeSet<String>,
    policy: PodIfacePolicy,
}

/// Keeps the pod-side programs on exactly the pod-facing interfaces: re-reads the links on
/// every burst of link events (and every [`POD_IFACE_HEAL`]), attaches and detaches, and
/// refreshes the node's addresses on address events (a NodePort on a bridge's gateway address
/// works as soon as it is assigned). Configured interfaces still missing are attached here too.
async fn follow_pod_interfaces(lb: Arc<Mutex<EbpfLb>>, mut side: PodSide) {
    let mut changes = Changes {
        links: true,
        addresses: true,
    };
    loop {
        if changes.links {
            match side.watch.links().await {
                Ok(links) => {
                    let want = pod_facing(&links, &side.external, &side.policy);
                    let Ok(mut lb) = lb.lock() else {
                        return;
                    };
                    let done = lb.sync_pod_interfaces(&want);
                    if !done.attached.is_empty() || !done.detached.is_empty() {
                        tracing::info!(
                            attached = ?done.attached,
                            detached = ?done.detached,
                            "pod-facing interfaces changed"
                        );
                        changes.addresses = true;
                    }
                    for (name, e) in done.failed {
                        let error = error_chain(&e);
                        tracing::warn!(ifname = %name, %error, "pod-facing interface");
                    }
                    match lb.attach_pending() {
                        Ok(names) if !names.is_empty() => {
                            tracing::info!(?names, "attached pending interfaces");
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %error_chain(&e), "attach pending interfaces");
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %error_chain(&e), "read the node's links"),
            }
        }
        if changes.addresses {
            let Ok(mut lb) = lb.lock() else {
                return;
            };
            if let Err(e) = lb.sync_local_addrs() {
                tracing::warn!(error = %e, "refresh node addresses");
            }
        }
        changes = tokio::select! {
            next = side.watch.changed() => match next {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), "link events; subscribing again");
                    tokio::time::sleep(RESUBSCRIBE).await;
                    match LinkWatch::subscribe() {
                        Ok(w) => side.watch = w,
                        Err(e) => {
                            tracing::warn!(error = %error_chain(&e), "subscribe to link events");
                        }
                    }
                    Changes { links: true, addresses: true }
                }
            },
            () = tokio::time::sleep(POD_IFACE_HEAL) => {
                Changes { links: true, addresses: false }
            }
        };
    }
}

/// Loads and attaches the eBPF service dataplane (`EbpfLb::open`) on the node's interfaces:
/// the uplink and overlay devices, and the pod-facing interfaces there are now (subscribed to
/// link events first, so none that appears meanwhile is missed).
async fn open_ebpf(
    opts: &Options,
    up: &Uplink,
    devices: &Devices,
    pin_dir: &std::path::Path,
) -> anyhow::Result<(EbpfLb, PodSide)> {
    if dataplane::ebpf_disabled() {
        anyhow::bail!("disabled by {}=1", dataplane::DISABLE_EBPF_ENV);
    }
    let policy = PodIfacePolicy::parse(&opts.pod_interfaces)?;
    let mut external = BTreeSet::from([up.name.clone()]);
    for dev in [&devices.v4, &devices.v6].into_iter().flatten() {
        external.insert(dev.name.clone());
    }
    let watch = LinkWatch::subscribe()?;
    let links = watch.links().await?;
    let pods = pod_facing(&links, &external, &policy);
    tracing::info!(pods = ?pods.keys().collect::<Vec<_>>(), ?policy, "pod-facing interfaces");
    let ifaces: Vec<TcIface> = external
        .iter()
        .map(TcIface::external)
        .chain(pods.into_keys().map(TcIface::pods))
        .collect();
    let cgroup = opts.lb_cgroup.clone().unwrap_or_else(default_cgroup);
    let lb = tokio::task::spawn_blocking({
        let (pin_dir, cgroup) = (pin_dir.to_path_buf(), cgroup.clone());
        move || EbpfLb::open(&pin_dir, &cgroup, &ifaces)
    })
    .await?
    .with_context(|| {
        format!(
            "open the eBPF service dataplane (pins {}, cgroup {})",
            pin_dir.display(),
            cgroup.display()
        )
    })?;
    Ok((
        lb,
        PodSide {
            watch,
            external,
            policy,
        },
    ))
}

/// The node's pod subnets, from the subnet file the agent wrote before the proxy starts: an
/// endpoint inside them is on this node whatever its EndpointSlice says (or does not say).
fn pod_subnets(opts: &Options) -> Vec<ipnet::IpNet> {
    match twill_facts::SubnetFacts::read(&opts.subnet_file) {
        Ok(facts) => facts
            .subnet_v4()
            .map(ipnet::IpNet::V4)
            .into_iter()
            .chain(facts.subnet_v6().map(ipnet::IpNet::V6))
            .collect(),
        Err(e) => {
            tracing::warn!(
                file = %opts.subnet_file.display(),
                error = %e,
                "no pod subnet for endpoint locality; nodeName alone decides"
            );
            Vec::new()
        }
    }
}

/// Opens the netfilter dataplane of `mode` (nftables or iptables).
async fn open_netfilter(mode: Mode, iptables_backend: &str) -> anyhow::Result<AnyLb> {
    let backend = iptables_backend.to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<AnyLb> {
        dataplane::ensure_bridge_nf();
        if mode == Mode::Nftables {
            return Ok(AnyLb::Nft(NftLb::open().context(
                "open the nftables service dataplane (table inet twill)",
            )?));
        }
        let (b, why) = match backend.as_str() {
            "legacy" => (IptBackend::Legacy, "requested".to_string()),
            "nft" => (IptBackend::Nft, "requested".to_string()),
            _ => detect_backend(),
        };
        tracing::info!(backend = b.as_str(), reason = %why, "iptables backend");
        Ok(AnyLb::Ipt(IptLb::open(b).with_context(|| {
            format!(
                "open the iptables service dataplane ({} backend)",
                b.as_str()
            )
        })?))
    })
    .await?
}

/// The service loop's settings: `--resync-interval`, and the node's own addresses read from
/// its network namespace.
pub fn loop_settings(opts: &Options) -> LoopSettings {
    LoopSettings {
        resync: Duration::from_secs(opts.resync_interval.max(1)),
        own_addresses: Some(Arc::new(own_addresses)),
    }
}

/// Opens the dataplane `--proxy-mode` names and spawns the service loop; `None` when the mode is
/// `none`. `auto` tries eBPF, then nftables, then iptables; the choice and the reason are
/// logged and exported. The other modes' state is removed.
pub async fn start(
    opts: &Options,
    backend: BackendType,
    up: &Uplink,
    devices: &Devices,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Option<JoinHandle<()>>> {
    if opts.proxy_mode == "none" {
        return Ok(None);
    }
    // Refused before anything is opened, whatever the mode (`auto` may end up in eBPF).
    PodIfacePolicy::parse(&opts.pod_interfaces)?;
    let pin_dir = opts.bpf_pin_dir.join("lb");
    let mut probe = dataplane::Probe::default();
    let mut ebpf = None;
    if opts.proxy_mode == "auto" {
        if backend == BackendType::Udp {
            // See `udp::check_proxy_mode`: the tc programs need an Ethernet header.
            probe.ebpf = Err(
                "the udp backend's flannel0 is an L3 device the tc programs cannot parse".into(),
            );
        } else {
            match open_ebpf(opts, up, devices, &pin_dir).await {
                Ok(lb) => ebpf = Some(lb),
                Err(e) => probe.ebpf = Err(format!("{e:#}")),
            }
        }
        if probe.ebpf.is_err() {
            probe.nftables =
                tokio::task::spawn_blocking(|| NftLb::probe().map_err(|e| e.to_string())).await?;
        }
    }
    let (mode, reason) = dataplane::choose(&opts.proxy_mode, &probe).map_err(anyhow::Error::msg)?;
    tracing::info!(mode = mode.as_str(), reason = %reason, "service proxy mode");
    let (dp, pod_side) = match mode {
        Mode::Ebpf => {
            let (lb, side) = match ebpf {
                Some(opened) => opened,
                None => open_ebpf(opts, up, devices, &pin_dir).await?,
            };
            (AnyLb::Ebpf(Arc::new(Mutex::new(lb))), Some(side))
        }
        Mode::Nftables | Mode::Iptables => {
            drop(ebpf);
            (open_netfilter(mode, &opts.iptables_backend).await?, None)
        }
    };
    tokio::task::spawn_blocking({
        let pin_dir = pin_dir.clone();
        move || dataplane::cleanup_except(mode, &pin_dir)
    })
    .await?;
    // The node name decides which endpoints are local (`externalTrafficPolicy: Local`, hairpin
    // SNAT): logged, since a wrong one (the host name where EndpointSlices say otherwise) only
    // shows as failing connections.
    let name = node_name(opts);
    tracing::info!(mode = mode.as_str(), node = %name, "service dataplane ready");
    if let (AnyLb::Ebpf(shared), Some(side)) = (&dp, pod_side) {
        tokio::spawn(follow_pod_interfaces(shared.clone(), side));
    }
    // Per-service counters and map occupancy, read through handles of its own (see
    // `EbpfLbView`): a scrape never waits for, or delays, a sync.
    if mode == Mode::Ebpf {
        match EbpfLbView::open(&pin_dir) {
            Ok(view) => metrics.add_writer(Box::new(move |o| view.write_metrics(o))),
            Err(e) => tracing::warn!(error = %e, "open the pinned service maps for /metrics"),
        }
    }
    let svc_metrics = Arc::new(ServiceMetrics::default());
    svc_metrics.set_dataplane_reason(&reason);
    let render = svc_metrics.clone();
    metrics.add_renderer(Box::new(move || render.render()));
    let node = NodeIdentity {
        name,
        addresses: up.nets.iter().map(ipnet::IpNet::addr).collect(),
        reserved: control_plane_addresses(opts).await,
        allowed_external_ips: allowed_external_ips(opts),
        pod_subnets: pod_subnets(opts),
    };
    tracing::info!(
        reserved = ?node.reserved.keys().collect::<Vec<_>>(),
        allowed_external_ips = ?node.allowed_external_ips,
        "addresses no frontend may take besides the node's own; external IPs programmed"
    );
    if crate::shared::kube::services_from_kubernetes(opts) {
        return crate::services::source::kube::spawn(opts, node, dp, svc_metrics, metrics)
            .await
            .map(Some);
    }
    let tls = opts.etcd.tls();
    let store = EtcdServiceStore::connect(&opts.etcd.etcd_endpoints, &opts.etcd.etcd_prefix, &tls)
        .await
        .context("connect the service source to etcd")?;
    let settings = loop_settings(opts);
    Ok(Some(tokio::spawn(async move {
        if let Err(e) = run_services(store, node, dp, settings, svc_metrics).await {
            tracing::error!(error = format!("{e:#}"), "service loop stopped");
        }
    })))
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn opts(args: &[&str]) -> Options {
        Options::try_parse_from(std::iter::once("twilld").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn allowed_external_ips_flag_and_defaults() {
        assert_eq!(
            parse_allowed_network("198.18.0.0/16").unwrap().to_string(),
            "198.18.0.0/16"
        );
        assert_eq!(
            parse_allowed_network("192.0.2.7").unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(
            parse_allowed_network("2001:db8::/64").unwrap().to_string(),
            "2001:db8::/64"
        );
        assert_eq!(
            parse_allowed_network("198.18.0.1/16").unwrap_err(),
            "\"198.18.0.1/16\" has bits set beyond the prefix length (did you mean 198.18.0.0/16?)"
        );
        assert_eq!(
            parse_allowed_network("eth0").unwrap_err(),
            "\"eth0\" is neither a network (CIDR) nor an address"
        );
        let e = Options::try_parse_from(["twilld", "--allowed-external-ips", "10.0.0.1/8"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--allowed-external-ips") && e.contains("10.0.0.0/8"),
            "{e}"
        );
        // Repeatable and comma-separated.
        let o = opts(&[
            "--allowed-external-ips",
            "198.18.200.0/24,192.0.2.7",
            "--allowed-external-ips=2001:db8::/64",
        ]);
        let got: Vec<String> = allowed_external_ips(&o)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, ["198.18.200.0/24", "192.0.2.7/32", "2001:db8::/64"]);
        // Defaults: none with the etcd source, all (the API server's choice) with Kubernetes.
        assert_eq!(allowed_external_ips(&opts(&[])), Some(Vec::new()));
        assert_eq!(
            allowed_external_ips(&opts(&["--kube-api-url", "https://10.0.0.1:6443"])),
            None
        );
        assert_eq!(
            allowed_external_ips(&opts(&[
                "--kube-api-url",
                "https://10.0.0.1:6443",
                "--allowed-external-ips",
                "192.0.2.0/24"
            ]))
            .map(|v| v.len()),
            Some(1)
        );
    }

    #[tokio::test]
    async fn control_plane_addresses_are_reserved() {
        let o = opts(&[
            "--etcd-endpoints",
            "http://198.18.0.1:2379,https://[fd00::1]:2379,http://user@198.18.0.2",
        ]);
        let got = control_plane_addresses(&o).await;
        let want: BTreeMap<IpAddr, Reserved> = [
            ("198.18.0.1", Reserved::Etcd),
            ("198.18.0.2", Reserved::Etcd),
            ("fd00::1", Reserved::Etcd),
        ]
        .into_iter()
        .map(|(ip, r)| (ip.parse().unwrap(), r))
        .collect();
        assert_eq!(got, want);
        // Kubernetes for leases and services: the API server's address, not etcd's.
        let o = opts(&[
            "--kube-subnet-mgr",
            "--kube-api-url",
            "https://198.18.0.9:6443",
        ]);
        let got = control_plane_addresses(&o).await;
        assert_eq!(
            got,
            BTreeMap::from([("198.18.0.9".parse().unwrap(), Reserved::ApiServer)])
        );
    }
}
