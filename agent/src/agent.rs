//! The node agent's main loop: config → uplink → devices → lease → subnet file → reconcile, then
//! react to lease events, renew before expiry and resync on a timer.
//!
//! The loop never blocks the dataplane on etcd: when etcd is away, what is programmed stays, the
//! watch re-lists with backoff, and renewal retries until etcd answers again. Exiting leaves the
//! dataplane in place (as flannel does), so a restart moves no packet differently.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use clap::Parser;
use ipnet::{Ipv4Net, Ipv6Net};
use tokio::sync::{mpsc, watch};

use crate::config::{BackendType, NetworkConfig};
use crate::kernel::Kernel;
use crate::kernel::netlink::Netlink;
use crate::kube::subnet::{AnyLeaseStore, KubeSubnetStore};
use crate::lease::{self, Lease, LeaseAttrs, LeaseSubnets};
use crate::masq;
use crate::metrics::Metrics;
use crate::overlay::{self, Devices, Uplink};
use crate::store::{
    EtcdArgs, EtcdStore, HeldLease, LeaseEvent, LeaseStore, StoreError, StoredLease,
};
use crate::udp::{self, UdpBackend};
use crate::uplink;
use twill_facts::SubnetFacts;

/// Lease TTL (flannel's: 24 h).
pub const LEASE_TTL: Duration = Duration::from_hours(24);

/// twilld's command line: flannel's flags, plus twill's own.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "twilld",
    version,
    about = "twill node agent: subnet leases and the overlay dataplane",
    args_override_self = true
)]
pub struct Options {
    /// etcd flags.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Interface to use (name or address); repeatable, first match wins. Default: the default
    /// route's interface.
    #[arg(long)]
    pub iface: Vec<String>,
    /// IPv4 address published to peers (default: the interface's address).
    #[arg(long)]
    pub public_ip: Option<Ipv4Addr>,
    /// IPv6 address published to peers (default: the interface's global address).
    #[arg(long)]
    pub public_ipv6: Option<Ipv6Addr>,
    /// Where to write the node's network facts for the CNI plugin.
    #[arg(long, default_value = twill_facts::DEFAULT_SUBNET_FILE)]
    pub subnet_file: PathBuf,
    /// Masquerade pod traffic leaving the cluster network.
    #[arg(long)]
    pub ip_masq: bool,
    /// Renew the lease this many minutes before it expires.
    #[arg(long, default_value_t = 60)]
    pub subnet_lease_renew_margin: u64,
    /// Address for /healthz.
    #[arg(long, default_value = "0.0.0.0")]
    pub healthz_ip: IpAddr,
    /// Port for /healthz (0: off).
    #[arg(long, default_value_t = 0)]
    pub healthz_port: u16,
    /// Address for /metrics (and /healthz), e.g. 127.0.0.1:9615.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Seconds between full resyncs that heal drift.
    #[arg(long, default_value_t = 30)]
    pub resync_interval: u64,
    /// Service proxy dataplane: `ebpf` (socket-level LB + tc), `nftables`, `iptables`, `auto`
    /// (eBPF if twill's programs load and attach, else nftables, else iptables) or `none`.
    #[arg(long, default_value = "none", value_parser = ["none", "ebpf", "nftables", "iptables", "auto"])]
    pub proxy_mode: String,
    /// iptables implementation for `--proxy-mode iptables`: `auto` (the one already holding
    /// rules, else what `iptables --version` names), `legacy` or `nft`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "legacy", "nft"])]
    pub iptables_backend: String,
    /// This node's name, matched against EndpointSlices' `nodeName` and, with
    /// `--kube-subnet-mgr`, the Node whose podCIDRs it uses (default: the host name).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// cgroup2 directory the socket-level load balancer attaches to (default: the cgroup2 root).
    #[arg(long)]
    pub lb_cgroup: Option<PathBuf>,
    /// Interfaces facing pods, which get the eBPF proxy's pod-side programs: `auto` (pod
    /// bridges of any name and routed pods' veths, found as they appear) and/or interface
    /// names or globs (`cni0`, `cali*`); comma-separated or repeated.
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    pub pod_interfaces: Vec<String>,
    /// Directory for pinned eBPF objects.
    #[arg(long, default_value = "/sys/fs/bpf/twill")]
    pub bpf_pin_dir: PathBuf,
    /// Kubernetes API server URL; with `--kubeconfig`, replaces its server (default: the
    /// kubeconfig's, else the in-cluster service account's).
    #[arg(long)]
    pub kube_api_url: Option<String>,
    /// kubeconfig file for the Kubernetes API (flannel's `--kubeconfig-file`).
    #[arg(long, alias = "kubeconfig-file")]
    pub kubeconfig: Option<PathBuf>,
    /// Take this node's subnet from its Kubernetes Node (`spec.podCIDRs`) and publish the
    /// lease as flannel's node annotations, instead of leasing from etcd.
    #[arg(long)]
    pub kube_subnet_mgr: bool,
    /// Prefix of the node annotations in kube-subnet-mgr mode.
    #[arg(long, default_value = crate::kube::annotations::DEFAULT_PREFIX)]
    pub kube_annotation_prefix: String,
    /// The network config file in kube-subnet-mgr mode (flannel's net-conf.json).
    #[arg(long, default_value = "/etc/kube-flannel/net-conf.json")]
    pub net_config_path: PathBuf,
    /// Where services come from: `etcd` or `kubernetes` (default: kubernetes when
    /// `--kube-subnet-mgr`, `--kube-api-url` or `--kubeconfig` is given).
    #[arg(long, value_parser = ["etcd", "kubernetes"])]
    pub service_source: Option<String>,
    /// This proxy's name: Services labelled `service.kubernetes.io/service-proxy-name` with it
    /// are programmed, other labelled ones skipped (empty: skip every labelled one).
    #[arg(long, default_value = "")]
    pub service_proxy_name: String,
    /// kube-proxy's health server (`/healthz`, `/livez`) with the Kubernetes service source
    /// (empty: off).
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: String,
}

/// Exponential backoff between 100 ms and 10 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_millis(100))
    }
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(10));
        d
    }
}

/// Acquires a lease: our previous one (same PublicIP) if it is still there, else the subnet we had
/// before (from the subnet file) if free, else a random free subnet. Loses races gracefully: a
/// taken candidate means list again and retry.
pub async fn acquire<S: LeaseStore>(
    store: &S,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    previous: Option<LeaseSubnets>,
) -> anyhow::Result<HeldLease> {
    // Kubernetes assigns the subnet in kube-subnet-mgr mode: publish our attributes for it.
    if let Some(held) = store.acquire_assigned(cfg, attrs, LEASE_TTL).await? {
        return Ok(held);
    }
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_os_rng();
    for attempt in 0..20 {
        let (leases, _) = store.list().await.context("list leases")?;
        let mine = leases.iter().find(|l| {
            l.lease.attrs.public_ip == attrs.public_ip
                && l.lease.attrs.public_ipv6 == attrs.public_ipv6
                && lease::in_range(cfg, &l.lease.subnets)
        });
        if let Some(old) = mine {
            if let Some(held) = store.reclaim(old, attrs, LEASE_TTL).await? {
                tracing::info!(subnet = %held.subnets.key(), "reclaimed our lease");
                return Ok(held);
            }
            continue;
        }
        let taken: Vec<&LeaseSubnets> = leases.iter().map(|l| &l.lease.subnets).collect();
        let candidate = match previous {
            Some(p)
                if attempt == 0
                    && lease::in_range(cfg, &p)
                    && !taken.iter().any(|t| {
                        (p.v4.is_some() && t.v4 == p.v4) || (p.v6.is_some() && t.v6 == p.v6)
                    }) =>
            {
                p
            }
            _ => {
                let v4s: Vec<Ipv4Net> = taken.iter().filter_map(|t| t.v4).collect();
                let v6s: Vec<Ipv6Net> = taken.iter().filter_map(|t| t.v6).collect();
                LeaseSubnets {
                    v4: if cfg.enable_ipv4 {
                        Some(lease::choose_v4(cfg, &v4s, &mut rng)?)
                    } else {
                        None
                    },
                    v6: if cfg.enable_ipv6 {
                        Some(lease::choose_v6(cfg, &v6s, &mut rng)?)
                    } else {
                        None
                    },
                }
            }
        };
        if let Some(held) = store.create(candidate, attrs, LEASE_TTL).await? {
            tracing::info!(subnet = %held.subnets.key(), "acquired a new lease");
            return Ok(held);
        }
        tracing::debug!(subnet = %candidate.key(), "lost a race for a subnet, retrying");
    }
    bail!("could not acquire a lease after 20 attempts (heavy contention?)")
}

/// The facts written for the CNI plugin.
pub fn facts(cfg: &NetworkConfig, held: &LeaseSubnets, mtu: u32, ipmasq: bool) -> SubnetFacts {
    let gw4 = held.v4.map(|n| {
        Ipv4Net::new(Ipv4Addr::from(u32::from(n.network()) + 1), n.prefix_len()).expect("len")
    });
    let gw6 = held.v6.map(|n| {
        Ipv6Net::new(Ipv6Addr::from(u128::from(n.network()) + 1), n.prefix_len()).expect("len")
    });
    SubnetFacts {
        network: cfg.network.filter(|_| cfg.enable_ipv4),
        subnet: gw4,
        ipv6_network: cfg.ipv6_network.filter(|_| cfg.enable_ipv6),
        ipv6_subnet: gw6,
        mtu,
        ipmasq,
    }
}

fn masq_spec(cfg: &NetworkConfig, own: &LeaseSubnets) -> masq::MasqSpec {
    masq::MasqSpec {
        v4: cfg.network.zip(own.v4).filter(|_| cfg.enable_ipv4),
        v6: cfg.ipv6_network.zip(own.v6).filter(|_| cfg.enable_ipv6),
    }
}

/// Keeps a cache of every lease, fed by list + watch, and publishes snapshots. Re-lists whenever
/// the watch breaks (compaction, etcd restart), with backoff; never gives up.
async fn lease_cache<S: LeaseStore + Clone>(store: S, out: watch::Sender<Option<Arc<Vec<Lease>>>>) {
    let mut backoff = Backoff::new();
    loop {
        let (leases, rev) = match store.list().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "listing leases failed; keeping the dataplane as it is");
                tokio::time::sleep(backoff.next()).await;
                continue;
            }
        };
        backoff = Backoff::new();
        let mut cache: BTreeMap<String, Lease> = leases
            .into_iter()
            .map(|l: StoredLease| (l.lease.subnets.key(), l.lease))
            .collect();
        let _ = out.send(Some(Arc::new(cache.values().cloned().collect())));
        let (tx, mut rx) = mpsc::channel(256);
        let w = store.clone();
        let mut watch_task = tokio::spawn(async move { w.watch(rev, tx).await });
        loop {
            tokio::select! {
                batch = rx.recv() => {
                    let Some(batch) = batch else { break };
                    for ev in batch {
                        match ev {
                            LeaseEvent::Put(l) => { cache.insert(l.lease.subnets.key(), l.lease); }
                            LeaseEvent::Delete(s) => { cache.remove(&s.key()); }
                        }
                    }
                    let _ = out.send(Some(Arc::new(cache.values().cloned().collect())));
                }
                res = &mut watch_task => {
                    let e = res.unwrap_or_else(|j| StoreError::WatchEnded(j.to_string()));
                    tracing::warn!(error = %e, "lease watch broke; re-listing");
                    // Drain what arrived before the break.
                    while let Ok(batch) = rx.try_recv() {
                        for ev in batch {
                            match ev {
                                LeaseEvent::Put(l) => { cache.insert(l.lease.subnets.key(), l.lease); }
                                LeaseEvent::Delete(s) => { cache.remove(&s.key()); }
                            }
                        }
                    }
                    break;
                }
            }
        }
        watch_task.abort();
        tokio::time::sleep(backoff.next()).await;
    }
}

/// Retries `f` with backoff until it succeeds or `stop` fires.
async fn retry<T, F, Fut>(what: &str, metrics: &Metrics, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut backoff = Backoff::new();
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                let msg = format!("{what}: {e:#}");
                tracing::warn!(error = %msg, "retrying");
                metrics.set_error(&msg);
                tokio::time::sleep(backoff.next()).await;
            }
        }
    }
}

/// Runs the agent until SIGINT/SIGTERM.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let mut servers = Vec::new();
    if opts.healthz_port != 0 {
        let addr = SocketAddr::new(opts.healthz_ip, opts.healthz_port);
        let m = metrics.clone();
        servers.push(tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, m).await {
                tracing::error!(error = %e, %addr, "healthz server failed");
            }
        }));
    }
    if let Some(addr) = opts.metrics_addr {
        let m = metrics.clone();
        servers.push(tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, m).await {
                tracing::error!(error = %e, %addr, "metrics server failed");
            }
        }));
    }

    let kernel = Netlink::connect().context("open netlink")?;
    let tls = opts.etcd.tls();
    let store = if opts.kube_subnet_mgr {
        AnyLeaseStore::Kube(
            retry("start the kube subnet manager", &metrics, || async {
                Ok(KubeSubnetStore::connect(&opts).await?)
            })
            .await,
        )
    } else {
        AnyLeaseStore::Etcd(
            retry("connect to etcd", &metrics, || async {
                Ok(
                    EtcdStore::connect(&opts.etcd.etcd_endpoints, &opts.etcd.etcd_prefix, &tls)
                        .await?,
                )
            })
            .await,
        )
    };
    let cfg_at = store.config_location(&opts.etcd.etcd_prefix);

    // The config: refused as a whole when invalid; we wait for a valid one and touch nothing.
    let (cfg_text, cfg) = retry("read network config", &metrics, || async {
        let text = store.get_config().await?;
        let cfg = NetworkConfig::parse(&text)
            .with_context(|| format!("refusing network config at {cfg_at}"))?;
        Ok((text, cfg))
    })
    .await;
    if cfg.backend.kind == BackendType::Udp {
        udp::check_config(&cfg).with_context(|| format!("refusing network config at {cfg_at}"))?;
        udp::check_proxy_mode(&opts.proxy_mode).with_context(|| {
            format!(
                "refusing --proxy-mode {} with the network config at {cfg_at}",
                opts.proxy_mode
            )
        })?;
    }
    tracing::info!(?cfg, "network config");

    let wish = uplink::Wish {
        ifaces: opts.iface.clone(),
        want_v4: cfg.enable_ipv4,
        want_v6: cfg.enable_ipv6,
        public_v4: opts.public_ip,
        public_v6: opts.public_ipv6,
    };
    let up = uplink::discover(&kernel, &wish)
        .await
        .context("choose the uplink interface")?;
    tracing::info!(iface = %up.name, public_ip = ?up.public_v4, public_ipv6 = ?up.public_v6, mtu = up.mtu, "uplink");

    if cfg.enable_ipv4 {
        kernel.set_sysctl("net/ipv4/ip_forward", "1").await?;
    }
    if cfg.enable_ipv6 {
        kernel
            .set_sysctl("net/ipv6/conf/all/forwarding", "1")
            .await?;
    }
    // udp: the data path (TUN device, port, workers) comes first, so the device exists for
    // ensure_devices; it drops everything until the routing table arrives with the leases.
    let mut udp = if cfg.backend.kind == BackendType::Udp {
        let spec = udp::Spec::new(&cfg, &up)?;
        let b = UdpBackend::start(&kernel, spec)
            .await
            .context("start the udp backend")?;
        metrics.set_udp_counts(b.counts_fn());
        Some(b)
    } else {
        None
    };
    let mut devices = overlay::ensure_devices(&kernel, &cfg, &up)
        .await
        .context("set up the VXLAN device")?;
    let mtu = overlay::overlay_mtu(&cfg, &up);
    let mut attrs = overlay::lease_attrs(&cfg, &up, &devices);

    let previous = SubnetFacts::read(&opts.subnet_file)
        .ok()
        .map(|f| LeaseSubnets {
            v4: f.subnet_v4(),
            v6: f.subnet_v6(),
        });
    let mut held = retry("acquire a subnet lease", &metrics, || {
        acquire(&store, &cfg, &attrs, previous)
    })
    .await;
    metrics.set_lease_expiry(held.expires);

    let write_facts = |held: &HeldLease| {
        facts(&cfg, &held.subnets, mtu, opts.ip_masq)
            .write_atomic(&opts.subnet_file)
            .with_context(|| format!("write {}", opts.subnet_file.display()))
    };
    write_facts(&held)?;
    tracing::info!(subnet = %held.subnets.key(), file = %opts.subnet_file.display(), "subnet file written");

    if opts.ip_masq {
        masq::nft_batch(&masq::render(&masq_spec(&cfg, &held.subnets)))
            .await
            .context("install masquerade rules")?;
    }

    // The udp backend counts its own packets; the eBPF counter is for the VXLAN device.
    let _counter = if udp.is_none() {
        attach_counter(&devices, &metrics)
    } else {
        None
    };

    // Services: a task of its own; the overlay loop below never waits on it.
    let services = crate::proxy::start(&opts, cfg.backend.kind, &up, &devices, &metrics)
        .await
        .context("start the service proxy")?;
    if let Some(u) = &udp {
        u.set_table(held.subnets.v4, &[]);
    }

    let (snap_tx, mut snap_rx) = watch::channel(None);
    let cache = tokio::spawn(lease_cache(store.clone(), snap_tx));

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let resync = Duration::from_secs(opts.resync_interval.max(1));
    let mut resync_tick = tokio::time::interval(resync);
    resync_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let margin = Duration::from_secs(opts.subnet_lease_renew_margin * 60);
    let mut renew_at = Instant::now() + renew_delay(held.expires, margin);
    let mut peers: Arc<Vec<Lease>> = Arc::new(Vec::new());
    let mut have_snapshot = false;

    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            changed = snap_rx.changed() => {
                if changed.is_err() { bail!("lease cache stopped"); }
                let Some(snap) = snap_rx.borrow_and_update().clone() else { continue };
                peers = snap;
                have_snapshot = true;
                if let Some(u) = &udp {
                    u.set_table(held.subnets.v4, &peers);
                }
                if !peers.iter().any(|l| l.subnets == held.subnets) {
                    tracing::warn!(subnet = %held.subnets.key(), "our lease is gone (deleted or expired); re-acquiring");
                    held = retry("re-acquire a subnet lease", &metrics, || acquire(&store, &cfg, &attrs, Some(held.subnets))).await;
                    metrics.set_lease_expiry(held.expires);
                    write_facts(&held)?;
                    renew_at = Instant::now() + renew_delay(held.expires, margin);
                    if let Some(u) = &udp {
                        u.set_table(held.subnets.v4, &peers);
                    }
                    continue;
                }
                reconcile_once(&kernel, &cfg, &up, &devices, &held, &peers, &metrics).await;
            }
            _ = resync_tick.tick() => {
                // Heal: devices someone deleted, entries someone removed, masq table, config drift.
                if let Some(u) = &mut udp {
                    match u.heal(&kernel).await {
                        Ok(false) => {}
                        Ok(true) => tracing::warn!("udp data path restarted"),
                        Err(e) => { tracing::warn!(error = %e, "healing the udp data path failed"); metrics.set_error(&e.to_string()); }
                    }
                }
                match overlay::ensure_devices(&kernel, &cfg, &up).await {
                    Ok(d) if d != devices => {
                        tracing::warn!("overlay device changed; republishing the lease");
                        devices = d;
                        attrs = overlay::lease_attrs(&cfg, &up, &devices);
                        held = retry("republish the lease", &metrics, || acquire(&store, &cfg, &attrs, Some(held.subnets))).await;
                        metrics.set_lease_expiry(held.expires);
                    }
                    Ok(_) => {}
                    Err(e) => { tracing::warn!(error = %e, "ensuring devices failed"); metrics.set_error(&e.to_string()); }
                }
                if have_snapshot {
                    reconcile_once(&kernel, &cfg, &up, &devices, &held, &peers, &metrics).await;
                }
                if opts.ip_masq && !masq::present().await {
                    tracing::warn!("masquerade table missing; reinstalling");
                    if let Err(e) = masq::nft_batch(&masq::render(&masq_spec(&cfg, &held.subnets))).await {
                        metrics.set_error(&e.to_string());
                    }
                }
                if !opts.subnet_file.exists() {
                    write_facts(&held)?;
                }
                check_config(&store, &cfg_text, &cfg_at, &metrics).await;
            }
            () = tokio::time::sleep_until(renew_at.into()) => {
                match store.renew(&held).await {
                    Ok(exp) => {
                        held.expires = exp;
                        metrics.set_lease_expiry(exp);
                        tracing::info!(subnet = %held.subnets.key(), "lease renewed");
                        renew_at = Instant::now() + renew_delay(exp, margin);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "lease renewal failed; retrying");
                        metrics.set_error(&e.to_string());
                        renew_at = Instant::now() + Duration::from_secs(5);
                    }
                }
            }
        }
    }
    tracing::info!("shutting down; the dataplane stays in place");
    cache.abort();
    if let Some(s) = services {
        s.abort();
    }
    for s in servers {
        s.abort();
    }
    Ok(())
}

fn renew_delay(expires: SystemTime, margin: Duration) -> Duration {
    expires
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .saturating_sub(margin)
}

async fn reconcile_once<K: Kernel>(
    k: &K,
    cfg: &NetworkConfig,
    up: &Uplink,
    devices: &Devices,
    held: &HeldLease,
    peers: &[Lease],
    metrics: &Metrics,
) {
    let start = Instant::now();
    let res = overlay::reconcile(k, cfg, up, devices, &held.subnets, peers).await;
    let took = start.elapsed();
    let n_peers = peers.iter().filter(|l| l.subnets != held.subnets).count();
    match res {
        Ok(ops) => {
            if !ops.is_empty() {
                tracing::info!(
                    ops = ops.len(),
                    peers = n_peers,
                    ?took,
                    "overlay reconciled"
                );
            }
            metrics.observe_reconcile(took, n_peers, ops.len(), true);
            metrics.set_ready();
        }
        Err(e) => {
            tracing::warn!(error = %e, "reconcile failed; will retry at the next resync");
            metrics.observe_reconcile(took, n_peers, 0, false);
            metrics.set_error(&e.to_string());
        }
    }
}

async fn check_config<S: LeaseStore>(store: &S, running: &str, at: &str, metrics: &Metrics) {
    match store.get_config().await {
        Ok(text) if text != running => match NetworkConfig::parse(&text) {
            Ok(_) => tracing::warn!(
                config = %at,
                "network config changed; restart twilld to apply it (running on the previous one)"
            ),
            Err(e) => {
                let msg = format!("refusing network config at {at}: {e}");
                tracing::error!(error = %msg, "keeping the running config and dataplane");
                metrics.set_error(&msg);
            }
        },
        _ => {}
    }
}

/// Attaches the eBPF packet counter to the IPv4 (else IPv6) VXLAN device and exports its counts.
fn attach_counter(devices: &Devices, metrics: &Metrics) -> Option<Arc<crate::ebpf::PacketCounter>> {
    let dev = devices.v4.as_ref().or(devices.v6.as_ref())?;
    match crate::ebpf::PacketCounter::attach(&dev.name) {
        Ok(c) => {
            let c = Arc::new(c);
            let reader = c.clone();
            metrics.set_counts(
                &dev.name,
                Box::new(move || {
                    reader.read().ok().map(|c| crate::metrics::DeviceCounts {
                        rx_packets: c.rx_packets,
                        rx_bytes: c.rx_bytes,
                        tx_packets: c.tx_packets,
                        tx_bytes: c.tx_bytes,
                    })
                }),
            );
            tracing::info!(device = %dev.name, "eBPF packet counter attached");
            Some(c)
        }
        Err(e) => {
            tracing::warn!(error = %e, device = %dev.name, "eBPF packet counter not attached");
            metrics.set_error(&e.to_string());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;

    const CFG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

    fn attrs(ip: &str) -> LeaseAttrs {
        LeaseAttrs {
            public_ip: Some(ip.parse().unwrap()),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: Some(serde_json::json!({"VNI":1,"VtepMAC":"0e:00:00:00:00:01"})),
            backend_v6_data: None,
        }
    }

    #[tokio::test]
    async fn restart_gets_the_same_subnet_back() {
        let store = MemStore::new(CFG);
        let cfg = NetworkConfig::parse(CFG).unwrap();
        let a = acquire(&store, &cfg, &attrs("198.18.0.11"), None)
            .await
            .unwrap();
        let b = acquire(&store, &cfg, &attrs("198.18.0.12"), None)
            .await
            .unwrap();
        assert_ne!(a.subnets, b.subnets);
        // Restart of node a (new VTEP MAC even): same subnet, new etcd lease, one key.
        let mut a2_attrs = attrs("198.18.0.11");
        a2_attrs.backend_data = Some(serde_json::json!({"VNI":1,"VtepMAC":"0e:00:00:00:00:09"}));
        let a2 = acquire(&store, &cfg, &a2_attrs, None).await.unwrap();
        assert_eq!(a2.subnets, a.subnets);
        assert_ne!(a2.etcd_lease, a.etcd_lease);
        assert_eq!(store.leases().len(), 2);
        let stored = store
            .leases()
            .into_iter()
            .find(|l| l.lease.subnets == a.subnets)
            .unwrap();
        assert_eq!(stored.lease.attrs, a2_attrs);
    }

    #[tokio::test]
    async fn previous_subnet_from_file_is_preferred_when_free() {
        let store = MemStore::new(CFG);
        let cfg = NetworkConfig::parse(CFG).unwrap();
        let prev = LeaseSubnets {
            v4: Some("10.244.77.0/24".parse().unwrap()),
            v6: None,
        };
        let a = acquire(&store, &cfg, &attrs("198.18.0.11"), Some(prev))
            .await
            .unwrap();
        assert_eq!(a.subnets, prev);
        // Taken by someone else: another one.
        let b = acquire(&store, &cfg, &attrs("198.18.0.12"), Some(prev))
            .await
            .unwrap();
        assert_ne!(b.subnets, prev);
    }

    #[tokio::test]
    async fn many_nodes_never_share_a_subnet() {
        let store = MemStore::new(r#"{"Network":"10.244.0.0/20","Backend":{"Type":"vxlan"}}"#);
        let cfg = NetworkConfig::parse(r#"{"Network":"10.244.0.0/20","Backend":{"Type":"vxlan"}}"#)
            .unwrap();
        let mut tasks = Vec::new();
        for i in 0..15 {
            let s = store.clone();
            let c = cfg.clone();
            tasks.push(tokio::spawn(async move {
                acquire(&s, &c, &attrs(&format!("198.18.0.{}", 10 + i)), None)
                    .await
                    .unwrap()
            }));
        }
        let mut got = std::collections::HashSet::new();
        for t in tasks {
            assert!(got.insert(t.await.unwrap().subnets));
        }
        // 15 subnets between .1 and .15 of a /20 split in /24s: the range is now full.
        let err = acquire(&store, &cfg, &attrs("198.18.0.99"), None)
            .await
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("no free IPv4 subnet"),
            "{err:#}"
        );
    }

    #[test]
    fn facts_carry_gateway_and_mtu() {
        let cfg = NetworkConfig::parse(CFG).unwrap();
        let f = facts(
            &cfg,
            &LeaseSubnets {
                v4: Some("10.244.5.0/24".parse().unwrap()),
                v6: None,
            },
            1450,
            true,
        );
        assert_eq!(
            f.render(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
    }
}
