//! The service proxy inside the agent: which dataplane (`--proxy-mode`), opened on which
//! interfaces and cgroup, fed by the standalone etcd source.
//!
//! The overlay loop and this loop share nothing but the process: the daemon starts the service
//! loop on its own task once the overlay is up (it needs the uplink's and the overlay devices'
//! names, which [`OverlayView`] carries), it never blocks the overlay, and it keeps the
//! dataplane it has while its source is away (the source's contract).
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
//! Which endpoints are local comes from their `nodeName` and from the node's pod subnets
//! (standalone EndpointSlices often name no node).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;

use crate::services::dataplane::ebpf::podif::{Changes, LinkWatch, PodIfacePolicy, pod_facing};
use crate::services::dataplane::ebpf::{EbpfLb, EbpfLbView, TcIface, error_chain};
use crate::services::dataplane::iptables::{IptBackendChoice, IptLb};
use crate::services::dataplane::nft::NftLb;
use crate::services::dataplane::{self, AnyLb, Mode, ProxyMode};
use crate::services::desired::{NodeIdentity, Reserved};
use crate::services::metrics::ServiceMetrics;
use crate::services::source::etcd::EtcdServiceStore;
use crate::services::source::kube::KubeSource;
use crate::services::source::url_addresses;
use crate::services::sync::{LoopSettings, run_services};
use crate::shared::etcd::EtcdTls;
use crate::shared::kube::KubeApi;
use crate::shared::metrics::Metrics;

/// The service proxy's settings (the daemon builds them from the command line).
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// `--proxy-mode`.
    pub mode: ProxyMode,
    /// `--iptables-backend`.
    pub iptables_backend: IptBackendChoice,
    /// This node's name, matched against EndpointSlices' `nodeName`.
    pub node_name: String,
    /// The cgroup2 directory socket-level load balancing attaches to.
    pub lb_cgroup: PathBuf,
    /// Pinned eBPF objects go under `<dir>/lb`.
    pub bpf_pin_dir: PathBuf,
    /// `--pod-interfaces`.
    pub pod_interfaces: Vec<String>,
    /// External IPs are programmed only inside these (`None`: every one).
    pub allowed_external_ips: Option<Vec<ipnet::IpNet>>,
    /// Full resyncs this far apart.
    pub resync: Duration,
    /// Where services come from.
    pub source: SourceConfig,
    /// etcd endpoints the node depends on (for leases or services): no frontend takes their
    /// addresses.
    pub etcd_endpoints: Vec<String>,
    /// The API server the node depends on, if any: no frontend takes its address.
    pub kube_api: Option<KubeApi>,
}

/// Where services come from.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// Manifests kept in etcd under `<prefix>/services/`.
    Etcd {
        /// The endpoints.
        endpoints: Vec<String>,
        /// The prefix.
        prefix: String,
        /// (m)TLS.
        tls: EtcdTls,
    },
    /// The Kubernetes API.
    Kubernetes(KubeSource),
}

/// What the proxy needs to know of the overlay, once it is up.
#[derive(Debug, Clone, Default)]
pub struct OverlayView {
    /// The uplink's name.
    pub uplink: String,
    /// The overlay devices' names (none for host-gw).
    pub devices: Vec<String>,
    /// Whether the overlay devices carry no Ethernet header (the udp backend's TUN device):
    /// the eBPF tc programs cannot parse their packets.
    pub l3_devices: bool,
    /// The uplink's addresses.
    pub node_addresses: Vec<IpAddr>,
    /// The node's pod subnets (its lease).
    pub pod_subnets: Vec<ipnet::IpNet>,
}

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

/// The addresses no frontend may take besides the node's own: every etcd endpoint's the node
/// uses (for leases or services), the API server's when it uses Kubernetes.
async fn control_plane_addresses(cfg: &ProxyConfig) -> BTreeMap<IpAddr, Reserved> {
    let mut out = BTreeMap::new();
    for ip in url_addresses(&cfg.etcd_endpoints).await {
        out.insert(ip, Reserved::Etcd);
    }
    if let Some(api) = &cfg.kube_api {
        match api.config().await {
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
    cfg: &ProxyConfig,
    overlay: &OverlayView,
    pin_dir: &std::path::Path,
) -> anyhow::Result<(EbpfLb, PodSide)> {
    if dataplane::ebpf_disabled() {
        anyhow::bail!("disabled by {}=1", dataplane::DISABLE_EBPF_ENV);
    }
    let policy = PodIfacePolicy::parse(&cfg.pod_interfaces)?;
    let mut external = BTreeSet::from([overlay.uplink.clone()]);
    external.extend(overlay.devices.iter().cloned());
    let watch = LinkWatch::subscribe()?;
    let links = watch.links().await?;
    let pods = pod_facing(&links, &external, &policy);
    tracing::info!(pods = ?pods.keys().collect::<Vec<_>>(), ?policy, "pod-facing interfaces");
    let ifaces: Vec<TcIface> = external
        .iter()
        .map(TcIface::external)
        .chain(pods.into_keys().map(TcIface::pods))
        .collect();
    let cgroup = cfg.lb_cgroup.clone();
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

/// Opens the netfilter dataplane of `mode` (nftables or iptables).
async fn open_netfilter(mode: Mode, iptables_backend: IptBackendChoice) -> anyhow::Result<AnyLb> {
    tokio::task::spawn_blocking(move || -> anyhow::Result<AnyLb> {
        dataplane::ensure_bridge_nf();
        if mode == Mode::Nftables {
            return Ok(AnyLb::Nft(NftLb::open().context(
                "open the nftables service dataplane (table inet twill)",
            )?));
        }
        let (b, why) = iptables_backend.resolve();
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

/// The service loop's settings: the resync period, and the node's own addresses read from its
/// network namespace.
pub fn loop_settings(resync: Duration) -> LoopSettings {
    LoopSettings {
        resync,
        own_addresses: Some(Arc::new(own_addresses)),
    }
}

/// Opens the dataplane `--proxy-mode` names and spawns the service loop; `None` when the mode is
/// `none`. `auto` tries eBPF, then nftables, then iptables; the choice and the reason are
/// logged and exported. The other modes' state is removed.
pub async fn start(
    cfg: &ProxyConfig,
    overlay: &OverlayView,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Option<JoinHandle<()>>> {
    if cfg.mode == ProxyMode::None {
        return Ok(None);
    }
    // Refused before anything is opened, whatever the mode (`auto` may end up in eBPF).
    PodIfacePolicy::parse(&cfg.pod_interfaces)?;
    let pin_dir = cfg.bpf_pin_dir.join("lb");
    let mut probe = dataplane::Probe::default();
    let mut ebpf = None;
    if cfg.mode == ProxyMode::Auto {
        if overlay.l3_devices {
            // The tc programs need an Ethernet header (see the udp backend's `check_proxy_mode`).
            probe.ebpf = Err(
                "the udp backend's flannel0 is an L3 device the tc programs cannot parse".into(),
            );
        } else {
            match open_ebpf(cfg, overlay, &pin_dir).await {
                Ok(lb) => ebpf = Some(lb),
                Err(e) => probe.ebpf = Err(format!("{e:#}")),
            }
        }
        if probe.ebpf.is_err() {
            probe.nftables =
                tokio::task::spawn_blocking(|| NftLb::probe().map_err(|e| e.to_string())).await?;
        }
    }
    let Some((mode, reason)) = dataplane::choose(cfg.mode, &probe) else {
        return Ok(None);
    };
    tracing::info!(mode = mode.as_str(), reason = %reason, "service proxy mode");
    let (dp, pod_side) = match mode {
        Mode::Ebpf => {
            let (lb, side) = match ebpf {
                Some(opened) => opened,
                None => open_ebpf(cfg, overlay, &pin_dir).await?,
            };
            (AnyLb::Ebpf(Arc::new(Mutex::new(lb))), Some(side))
        }
        Mode::Nftables | Mode::Iptables => {
            drop(ebpf);
            (open_netfilter(mode, cfg.iptables_backend).await?, None)
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
    let name = cfg.node_name.clone();
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
        addresses: overlay.node_addresses.clone(),
        reserved: control_plane_addresses(cfg).await,
        allowed_external_ips: cfg.allowed_external_ips.clone(),
        pod_subnets: overlay.pod_subnets.clone(),
    };
    tracing::info!(
        reserved = ?node.reserved.keys().collect::<Vec<_>>(),
        allowed_external_ips = ?node.allowed_external_ips,
        "addresses no frontend may take besides the node's own; external IPs programmed"
    );
    let settings = loop_settings(cfg.resync);
    let (endpoints, prefix, tls) = match &cfg.source {
        SourceConfig::Kubernetes(source) => {
            return crate::services::source::kube::spawn(
                source,
                node,
                dp,
                settings,
                svc_metrics,
                metrics,
            )
            .await
            .map(Some);
        }
        SourceConfig::Etcd {
            endpoints,
            prefix,
            tls,
        } => (endpoints, prefix, tls),
    };
    let store = EtcdServiceStore::connect(endpoints, prefix, tls)
        .await
        .context("connect the service source to etcd")?;
    Ok(Some(tokio::spawn(async move {
        if let Err(e) = run_services(store, node, dp, settings, svc_metrics).await {
            tracing::error!(error = format!("{e:#}"), "service loop stopped");
        }
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_external_ips_values() {
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
    }

    #[tokio::test]
    async fn control_plane_addresses_are_reserved() {
        let cfg = |etcd: &[&str], api: Option<&str>| ProxyConfig {
            mode: ProxyMode::Ebpf,
            iptables_backend: IptBackendChoice::Auto,
            node_name: "n1".into(),
            lb_cgroup: PathBuf::from("/sys/fs/cgroup"),
            bpf_pin_dir: PathBuf::from("/sys/fs/bpf/twill"),
            pod_interfaces: vec!["auto".into()],
            allowed_external_ips: None,
            resync: Duration::from_secs(30),
            source: SourceConfig::Etcd {
                endpoints: Vec::new(),
                prefix: String::new(),
                tls: EtcdTls::default(),
            },
            etcd_endpoints: etcd.iter().map(ToString::to_string).collect(),
            kube_api: api.map(|u| KubeApi {
                url: Some(u.into()),
                kubeconfig: None,
            }),
        };
        let got = control_plane_addresses(&cfg(
            &[
                "http://198.18.0.1:2379",
                "https://[fd00::1]:2379",
                "http://user@198.18.0.2",
            ],
            None,
        ))
        .await;
        let want: BTreeMap<IpAddr, Reserved> = [
            ("198.18.0.1", Reserved::Etcd),
            ("198.18.0.2", Reserved::Etcd),
            ("fd00::1", Reserved::Etcd),
        ]
        .into_iter()
        .map(|(ip, r)| (ip.parse().unwrap(), r))
        .collect();
        assert_eq!(got, want);
        let got = control_plane_addresses(&cfg(&[], Some("https://198.18.0.9:6443"))).await;
        assert_eq!(
            got,
            BTreeMap::from([("198.18.0.9".parse().unwrap(), Reserved::ApiServer)])
        );
    }
}
