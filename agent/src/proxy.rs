//! The service proxy inside the agent: which dataplane (`--proxy-mode`), opened on which
//! interfaces and cgroup, fed by the standalone etcd source.
//!
//! The overlay loop in [`crate::agent`] and this loop share nothing but the process: the service
//! loop runs on its own task, never blocks the overlay, and keeps the dataplane it has while etcd
//! is away (the source's contract).
//!
//! It also tells the service loop which addresses no frontend may take — the node's own (read
//! again at every resync), every etcd endpoint's, the API server's — and which external IPs it
//! programs (`--allowed-external-ips`; none by default with the etcd source, every one the API
//! server admitted with the Kubernetes source, as kube-proxy).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;

use crate::agent::Options;
use crate::config::BackendType;
use crate::ebpf::service::EbpfLbView;
use crate::ebpf::{EbpfLb, TcIface};
use crate::metrics::Metrics;
use crate::overlay::{Devices, Uplink};
use crate::services::dataplane::{self, AnyLb, Mode};
use crate::services::desired::{NodeIdentity, Reserved};
use crate::services::iptables::{IptBackend, IptLb, detect_backend};
use crate::services::nft::NftLb;
use crate::services::source::{
    EtcdServiceStore, LoopSettings, ServiceMetrics, run_services, url_addresses,
};

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
        None if crate::kube::services_from_kubernetes(opts) => None,
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
    let kube = opts.kube_subnet_mgr || crate::kube::services_from_kubernetes(opts);
    if !opts.kube_subnet_mgr || !crate::kube::services_from_kubernetes(opts) {
        for ip in url_addresses(&opts.etcd.etcd_endpoints).await {
            out.insert(ip, Reserved::Etcd);
        }
    }
    if kube {
        match crate::kube::config(opts.kube_api_url.as_deref(), opts.kubeconfig.as_deref()).await {
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

/// How often interfaces that do not exist yet (the pod bridge, created with the first pod) are
/// looked for.
const PENDING_POLL: Duration = Duration::from_secs(1);

/// Attaches the tc programs to configured interfaces as soon as they appear, then stops.
///
/// The pod bridge appears with the node's first pod, usually just after the agent started; until
/// its hooks exist, pods whose sockets are outside the LB cgroup (and pods' connected UDP) reach
/// no service at all, so waiting for the next full resync (`--resync-interval`) is too late.
/// The node's addresses are refreshed on the tick of the attach and the one after it, so a
/// NodePort on the bridge's gateway address (assigned just after the bridge is created) works
/// at once too.
async fn attach_when_present(lb: Arc<Mutex<EbpfLb>>) {
    let mut tick = tokio::time::interval(PENDING_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refresh_addrs = 0u8;
    loop {
        tick.tick().await;
        let Ok(mut lb) = lb.lock() else {
            return;
        };
        match lb.attach_pending() {
            Ok(names) if !names.is_empty() => {
                tracing::info!(?names, "attached pending interfaces");
                refresh_addrs = 2;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "attach pending interfaces"),
        }
        if refresh_addrs > 0 {
            refresh_addrs -= 1;
            if let Err(e) = lb.sync_local_addrs() {
                tracing::warn!(error = %e, "refresh node addresses");
            }
        }
        if lb.pending_interfaces().is_empty() && refresh_addrs == 0 {
            return;
        }
    }
}

/// Loads and attaches the eBPF service dataplane (`EbpfLb::open`) on the node's interfaces.
async fn open_ebpf(
    opts: &Options,
    up: &Uplink,
    devices: &Devices,
    pin_dir: &std::path::Path,
) -> anyhow::Result<EbpfLb> {
    if dataplane::ebpf_disabled() {
        anyhow::bail!("disabled by {}=1", dataplane::DISABLE_EBPF_ENV);
    }
    let mut ifaces = vec![TcIface::external(&up.name), TcIface::pods("cni0")];
    for dev in [&devices.v4, &devices.v6].into_iter().flatten() {
        ifaces.push(TcIface::external(&dev.name));
    }
    let cgroup = opts.lb_cgroup.clone().unwrap_or_else(default_cgroup);
    tokio::task::spawn_blocking({
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
    })
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
    let (dp, pending) = match mode {
        Mode::Ebpf => {
            let lb = match ebpf {
                Some(lb) => lb,
                None => open_ebpf(opts, up, devices, &pin_dir).await?,
            };
            let pending = !lb.pending_interfaces().is_empty();
            (AnyLb::Ebpf(Arc::new(Mutex::new(lb))), pending)
        }
        Mode::Nftables | Mode::Iptables => {
            drop(ebpf);
            (open_netfilter(mode, &opts.iptables_backend).await?, false)
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
    if let (AnyLb::Ebpf(shared), true) = (&dp, pending) {
        tokio::spawn(attach_when_present(shared.clone()));
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
    };
    tracing::info!(
        reserved = ?node.reserved.keys().collect::<Vec<_>>(),
        allowed_external_ips = ?node.allowed_external_ips,
        "addresses no frontend may take besides the node's own; external IPs programmed"
    );
    if crate::kube::services_from_kubernetes(opts) {
        return crate::kube::services::spawn(opts, node, dp, svc_metrics, metrics)
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
