//! The service proxy inside the agent: which dataplane (`--proxy-mode`), opened on which
//! interfaces and cgroup, fed by the standalone etcd source.
//!
//! The overlay loop in [`crate::agent`] and this loop share nothing but the process: the service
//! loop runs on its own task, never blocks the overlay, and keeps the dataplane it has while etcd
//! is away (the source's contract).

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
