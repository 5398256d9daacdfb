//! The service proxy inside the agent: which dataplane (`--proxy-mode`), opened on which
//! interfaces and cgroup, fed by the standalone etcd source.
//!
//! The overlay loop in [`crate::agent`] and this loop share nothing but the process: the service
//! loop runs on its own task, never blocks the overlay, and keeps the dataplane it has while etcd
//! is away (the source's contract).
//!
//! The eBPF dataplane's outside-facing programs go on the uplink and the overlay devices; its
//! pod-side programs on every pod-facing interface, whatever the CNI made
//! ([`crate::ebpf::service::podif`], `--pod-interfaces`): found before the dataplane opens (so
//! a restart keeps them attached), then followed by a task of their own on netlink events.
//! Which endpoints are local comes from their `nodeName` and from the node's pod subnet in the
//! subnet file (standalone EndpointSlices often name no node).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;

use crate::agent::Options;
use crate::config::BackendType;
use crate::ebpf::service::podif::{Changes, LinkWatch, PodIfacePolicy, pod_facing};
use crate::ebpf::service::{EbpfLbView, error_chain};
use crate::ebpf::{EbpfLb, TcIface};
use crate::metrics::Metrics;
use crate::overlay::{Devices, Uplink};
use crate::services::dataplane::{self, AnyLb, Mode};
use crate::services::desired::NodeIdentity;
use crate::services::iptables::{IptBackend, IptLb, detect_backend};
use crate::services::nft::NftLb;
use crate::services::source::{EtcdServiceStore, ServiceMetrics, run_services};

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
        pod_subnets: pod_subnets(opts),
    };
    if crate::kube::services_from_kubernetes(opts) {
        return crate::kube::services::spawn(opts, node, dp, svc_metrics, metrics)
            .await
            .map(Some);
    }
    let tls = opts.etcd.tls();
    let store = EtcdServiceStore::connect(&opts.etcd.etcd_endpoints, &opts.etcd.etcd_prefix, &tls)
        .await
        .context("connect the service source to etcd")?;
    let resync = Duration::from_secs(opts.resync_interval.max(1));
    Ok(Some(tokio::spawn(async move {
        if let Err(e) = run_services(store, node, dp, resync, svc_metrics).await {
            tracing::error!(error = format!("{e:#}"), "service loop stopped");
        }
    })))
}
