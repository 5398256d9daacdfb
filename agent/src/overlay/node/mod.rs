//! The node agent's main loop: config → uplink → devices → lease → subnet file → reconcile, then
//! react to lease events, renew before expiry and resync on a timer.
//!
//! The loop never blocks the dataplane on etcd: when etcd is away, what is programmed stays, the
//! watch re-lists with backoff, and renewal retries until etcd answers again. Exiting leaves the
//! dataplane in place (as flannel does), so a restart moves no packet differently.
//!
//! Why the lease handling is shaped as it is:
//! - Every wait (etcd retries, "no free subnet", a lease conflict) ends on SIGTERM/SIGINT: they
//!   all select on one [`Shutdown`] signal, installed before the first wait.
//! - A lease is reclaimed only with proof that it is this node's: its `TwillNodeID` is ours
//!   (`--node-id-file`, kept across reboots), or our previous subnet file names its subnet (a
//!   lease flannel or an older twill wrote on this node; a node whose identity file was lost).
//!   A lease with our public IP and no such proof belongs to another node, which we must not
//!   take over: we report the conflict (log, `twill_lease_conflicts`, `/healthz` 503), leave a
//!   claim its holder sees (it logs and counts the conflict too), and keep trying without a
//!   lease until the key goes. After a takeover of our lease, our own last subnet is no proof
//!   (it is exactly what the other node now holds).
//! - A node notices that its lease was deleted or rewritten by someone else from the lease watch
//!   (at the latest at its next renewal, which checks the key): it says so, becomes not ready,
//!   removes its subnet file (so `twill-cni` hands out no address of a subnet it no longer holds;
//!   it reports `NOT_AVAILABLE` until the file is back), re-acquires and writes the file anew.
//! - Peer leases are validated before use
//!   ([`validate_peers`](crate::overlay::lease::validate::validate_peers)); each ignored one is
//!   logged once per key and reason and counted in `twill_leases_ignored`.
//! - An etcd that suddenly holds nothing (every lease gone and the network config key gone too,
//!   as after a wipe or a fresh cluster) is suspect: the lease cache keeps the last snapshot and
//!   acts on the empty listing only once the config key is back.

pub mod acquire;
pub mod cache;
pub mod identity;
pub mod report;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use ipnet::{Ipv4Net, Ipv6Net};
use tokio::sync::watch;

use crate::overlay::apply::{ensure_devices, reconcile};
use crate::overlay::backend::udp::{self, UdpBackend};
use crate::overlay::check::check_network;
use crate::overlay::config::{BackendType, NetworkConfig};
use crate::overlay::desired::{lease_attrs, overlay_mtu};
use crate::overlay::kernel::Kernel;
use crate::overlay::kernel::netlink::Netlink;
use crate::overlay::lease::{Lease, LeaseAttrs, LeaseSubnets};
use crate::overlay::masq::{self, MasqSpec, NftCli};
use crate::overlay::node::acquire::acquire_until;
use crate::overlay::node::cache::Snapshot;
use crate::overlay::node::cache::config_present;
use crate::overlay::node::cache::lease_cache;
use crate::overlay::node::report::LeaseReport;
use crate::overlay::node::report::Loss;
use crate::overlay::node::report::lease_lost;
use crate::overlay::node::report::usable_peers;
use crate::overlay::source::{HeldLease, LeaseStore, StoreError};
use crate::overlay::uplink;
use crate::overlay::{Devices, Uplink};
use crate::shared::backoff::Backoff;
use crate::shared::backoff::retry;
use crate::shared::metrics::Metrics;
use crate::shared::shutdown::Shutdown;
use twill_facts::SubnetFacts;

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

/// What the node loop needs besides its store: flannel's per-node flags, resolved.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// Uplink candidates (`--iface`): names or addresses, first match wins.
    pub iface: Vec<String>,
    /// `--public-ip`.
    pub public_ip: Option<Ipv4Addr>,
    /// `--public-ipv6`.
    pub public_ipv6: Option<Ipv6Addr>,
    /// Where the node's facts go for the CNI plugin (`--subnet-file`).
    pub subnet_file: PathBuf,
    /// Masquerade pod traffic leaving the cluster network (`--ip-masq`).
    pub ip_masq: bool,
    /// Renew the lease this long before it expires.
    pub renew_margin: Duration,
    /// Full resyncs that heal drift, this far apart.
    pub resync: Duration,
    /// This node's identity, published with its lease (`None` where the store assigns subnets).
    pub node_id: Option<String>,
    /// Where the network config lives, for messages (`<prefix>/config`, a file).
    pub config_location: String,
}

/// What the rest of the node (the service proxy) needs to know of the overlay once it is up.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    /// The backend in use.
    pub backend: BackendType,
    /// The uplink.
    pub uplink: Uplink,
    /// The overlay devices (none for host-gw).
    pub devices: Devices,
    /// The subnets this node holds.
    pub subnets: LeaseSubnets,
}

/// The overlay loop of one node, between [`Node::start`] (config, uplink, devices, lease, subnet
/// file, masquerade) and the end of [`Node::run`] (on SIGTERM/SIGINT).
pub struct Node<S: LeaseStore + Clone> {
    store: S,
    settings: NodeSettings,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    kernel: Netlink,
    cfg: NetworkConfig,
    cfg_text: String,
    up: Uplink,
    udp: Option<UdpBackend>,
    devices: Devices,
    mtu: u32,
    attrs: LeaseAttrs,
    held: HeldLease,
    _counter: Option<Arc<crate::overlay::counter::PacketCounter>>,
}

impl<S: LeaseStore + Clone> Node<S> {
    /// Brings the overlay up: waits for a network config this node can use (`accept` may refuse
    /// one for reasons of the rest of the node, e.g. a proxy mode the backend cannot carry: that
    /// error ends the agent), finds the uplink, creates the devices, acquires a lease, writes
    /// the subnet file and installs masquerading. `Ok(None)`: a signal came first.
    pub async fn start(
        store: S,
        settings: NodeSettings,
        accept: impl Fn(&NetworkConfig) -> anyhow::Result<()>,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
    ) -> anyhow::Result<Option<Self>> {
        let kernel = Netlink::connect().context("open netlink")?;
        let cfg_at = settings.config_location.clone();

        // The config: refused as a whole when invalid, or when its Network would swallow this
        // node's own underlay; we wait for a valid one and touch nothing.
        let mut backoff = Backoff::new();
        let mut refused: Option<String> = None;
        let (cfg_text, cfg, up) = loop {
            let Some((cfg_text, cfg)) =
                retry("read network config", &metrics, &shutdown, || async {
                    let text = store.get_config().await?;
                    let cfg = NetworkConfig::parse(&text)
                        .with_context(|| format!("refusing network config at {cfg_at}"))?;
                    Ok((text, cfg))
                })
                .await
            else {
                return Ok(None);
            };
            if cfg.backend.kind == BackendType::Udp {
                udp::check_config(&cfg)
                    .with_context(|| format!("refusing network config at {cfg_at}"))?;
            }
            accept(&cfg)?;
            let wish = uplink::Wish {
                ifaces: settings.iface.clone(),
                want_v4: cfg.enable_ipv4,
                want_v6: cfg.enable_ipv6,
                public_v4: settings.public_ip,
                public_v6: settings.public_ipv6,
            };
            let up = uplink::discover(&kernel, &wish)
                .await
                .context("choose the uplink interface")?;
            let mut routes = Vec::new();
            if cfg.enable_ipv4 {
                routes.extend(kernel.routes(false).await.context("read the routes")?);
            }
            if cfg.enable_ipv6 {
                routes.extend(kernel.routes(true).await.context("read the routes")?);
            }
            match check_network(&cfg, &up, &routes) {
                Ok(()) => break (cfg_text, cfg, up),
                Err(e) => {
                    let msg = format!("refusing network config at {cfg_at}: {e}");
                    if refused.as_deref() != Some(msg.as_str()) {
                        tracing::error!(
                            error = %msg,
                            "waiting for a network config this node can use; nothing was changed"
                        );
                        refused = Some(msg.clone());
                    }
                    metrics.set_error(&msg);
                    metrics.set_not_ready(&msg);
                    tokio::select! {
                        () = shutdown.wait() => return Ok(None),
                        () = tokio::time::sleep(backoff.next_delay().max(Duration::from_secs(1))) => {}
                    }
                }
            }
        };
        tracing::info!(?cfg, "network config");
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
        let udp = if cfg.backend.kind == BackendType::Udp {
            let spec = udp::Spec::new(&cfg, &up, overlay_mtu(&cfg, &up))?;
            let b = UdpBackend::start(&kernel, spec)
                .await
                .context("start the udp backend")?;
            metrics.set_udp_counts(b.counts_fn());
            Some(b)
        } else {
            None
        };
        let devices = ensure_devices(&kernel, &cfg, &up)
            .await
            .context("set up the VXLAN device")?;
        let mtu = overlay_mtu(&cfg, &up);
        let attrs = LeaseAttrs {
            node_id: settings.node_id.clone(),
            ..lease_attrs(&cfg, &up, &devices)
        };

        let previous = SubnetFacts::read(&settings.subnet_file)
            .ok()
            .map(|f| LeaseSubnets {
                v4: f.subnet_v4(),
                v6: f.subnet_v6(),
            });
        let Some(held) = acquire_until(&store, &cfg, &attrs, previous, &metrics, &shutdown).await
        else {
            return Ok(None);
        };
        metrics.set_lease_expiry(held.expires);

        // The udp backend counts its own packets; the eBPF counter is for the VXLAN device.
        let counter = if udp.is_none() {
            attach_counter(&devices, &metrics)
        } else {
            None
        };
        let node = Node {
            store,
            settings,
            metrics,
            shutdown,
            kernel,
            cfg,
            cfg_text,
            up,
            udp,
            devices,
            mtu,
            attrs,
            held,
            _counter: counter,
        };
        node.write_facts()?;
        if node.settings.ip_masq {
            masq::install(&NftCli, &MasqSpec::new(&node.cfg, &node.held.subnets))
                .await
                .context("install masquerade rules")?;
        }
        if let Some(u) = &node.udp {
            u.set_table(node.held.subnets.v4, &[]);
        }
        Ok(Some(node))
    }

    /// What the service proxy needs to know of the overlay.
    pub fn facts(&self) -> NodeFacts {
        NodeFacts {
            backend: self.cfg.backend.kind,
            uplink: self.up.clone(),
            devices: self.devices.clone(),
            subnets: self.held.subnets,
        }
    }

    fn write_facts(&self) -> anyhow::Result<()> {
        let file = &self.settings.subnet_file;
        facts(
            &self.cfg,
            &self.held.subnets,
            self.mtu,
            self.settings.ip_masq,
        )
        .write_atomic(file)
        .with_context(|| format!("write {}", file.display()))?;
        tracing::info!(subnet = %self.held.subnets.key(), file = %file.display(), "subnet file written");
        Ok(())
    }

    /// Acquires a lease for this node's attributes, `previous` preferred, until one is held
    /// (`None`: a signal came first).
    async fn acquire(&self, previous: Option<LeaseSubnets>) -> Option<HeldLease> {
        acquire_until(
            &self.store,
            &self.cfg,
            &self.attrs,
            previous,
            &self.metrics,
            &self.shutdown,
        )
        .await
    }

    fn node_attrs(&self) -> LeaseAttrs {
        LeaseAttrs {
            node_id: self.settings.node_id.clone(),
            ..lease_attrs(&self.cfg, &self.up, &self.devices)
        }
    }

    async fn reconcile(&self, peers: &[Lease]) {
        reconcile_once(
            &self.kernel,
            &self.cfg,
            &self.up,
            &self.devices,
            &self.held,
            peers,
            &self.metrics,
        )
        .await;
    }

    fn masq_spec(&self) -> MasqSpec {
        MasqSpec::new(&self.cfg, &self.held.subnets)
    }

    async fn install_masq(&self) {
        if let Err(e) = masq::install(&NftCli, &self.masq_spec()).await {
            tracing::warn!(error = %e, "installing the masquerade rules failed");
            self.metrics.set_error(&e.to_string());
        }
    }

    /// Runs the loop until SIGTERM/SIGINT: lease events, renewals, resyncs that heal drift, a
    /// lease lost or taken. The dataplane stays in place when it returns.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let (snap_tx, mut snap_rx) = watch::channel(None);
        let cache = AbortOnDrop(tokio::spawn(lease_cache(self.store.clone(), snap_tx)));

        let mut resync_tick = tokio::time::interval(self.settings.resync);
        resync_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let margin = self.settings.renew_margin;
        let mut renew_at = Instant::now() + renew_delay(self.held.expires, margin);
        let mut snapshot: Arc<Snapshot> = Arc::new(Snapshot::default());
        let mut peers: Vec<Lease> = Vec::new();
        let mut have_snapshot = false;
        // The store epoch (see `Snapshot::epoch`) our lease was last written in.
        let mut held_epoch = 0;
        let mut report = LeaseReport::default();
        let mut config_gone = false;

        loop {
            // Why our lease is no longer ours, when it is not.
            let mut lost: Option<Loss> = None;
            tokio::select! {
                () = self.shutdown.wait() => break,
                changed = snap_rx.changed() => {
                    if changed.is_err() { bail!("lease cache stopped"); }
                    let Some(snap) = snap_rx.borrow_and_update().clone() else { continue };
                    snapshot = snap;
                    have_snapshot = true;
                    lost = lease_lost(&snapshot, &self.held, &self.attrs, snapshot.epoch == held_epoch);
                    if lost.is_none() {
                        peers = usable_peers(&self.cfg, &snapshot, &self.held, &self.attrs, &mut report, &self.metrics);
                        if let Some(u) = &self.udp {
                            u.set_table(self.held.subnets.v4, &peers);
                        }
                        self.reconcile(&peers).await;
                    }
                }
                _ = resync_tick.tick() => {
                    if !self.resync(have_snapshot, &peers, &snapshot, &mut held_epoch, &mut report, &mut config_gone).await? {
                        break;
                    }
                }
                () = tokio::time::sleep_until(renew_at.into()) => {
                    match self.store.renew(&self.held).await {
                        Ok(exp) => {
                            self.held.expires = exp;
                            self.metrics.set_lease_expiry(exp);
                            tracing::info!(subnet = %self.held.subnets.key(), "lease renewed");
                            renew_at = Instant::now() + renew_delay(exp, margin);
                        }
                        Err(StoreError::LeaseLost { key, reason, taken }) => {
                            if config_present(&self.store).await {
                                let why = format!("lease {key} is no longer ours: {reason}");
                                lost = Some(if taken { Loss::Taken(why) } else { Loss::Gone(why) });
                            } else {
                                tracing::warn!(
                                    lease = %key,
                                    %reason,
                                    "our lease is gone and so is the network config key: etcd \
                                     looks wiped; keeping everything until the config key is back"
                                );
                                renew_at = Instant::now() + Duration::from_secs(10);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "lease renewal failed; retrying");
                            self.metrics.set_error(&e.to_string());
                            renew_at = Instant::now() + Duration::from_secs(5);
                        }
                    }
                }
            }
            let Some(loss) = lost else { continue };
            if !self.reacquire(loss).await? {
                break;
            }
            held_epoch = snapshot.epoch;
            renew_at = Instant::now() + renew_delay(self.held.expires, margin);
            peers = usable_peers(
                &self.cfg,
                &snapshot,
                &self.held,
                &self.attrs,
                &mut report,
                &self.metrics,
            );
            if let Some(u) = &self.udp {
                u.set_table(self.held.subnets.v4, &peers);
            }
            self.reconcile(&peers).await;
        }
        drop(cache);
        Ok(())
    }

    /// A full resync: heals devices someone deleted, entries someone removed, the masquerade
    /// table and the subnet file; reports config drift and claims on our lease. `false`: a
    /// signal came while the lease had to be republished.
    async fn resync(
        &mut self,
        have_snapshot: bool,
        peers: &[Lease],
        snapshot: &Snapshot,
        held_epoch: &mut u64,
        report: &mut LeaseReport,
        config_gone: &mut bool,
    ) -> anyhow::Result<bool> {
        if let Some(u) = &mut self.udp {
            match u.heal(&self.kernel).await {
                Ok(false) => {}
                Ok(true) => tracing::warn!("udp data path restarted"),
                Err(e) => {
                    tracing::warn!(error = %e, "healing the udp data path failed");
                    self.metrics.set_error(&e.to_string());
                }
            }
        }
        match ensure_devices(&self.kernel, &self.cfg, &self.up).await {
            Ok(d) if d != self.devices => {
                tracing::warn!("overlay device changed; republishing the lease");
                self.devices = d;
                self.attrs = self.node_attrs();
                let again = Some(self.held.subnets);
                let Some(h) = self.acquire(again).await else {
                    return Ok(false);
                };
                let moved = h.subnets != self.held.subnets;
                self.held = h;
                if moved {
                    self.write_facts()?;
                }
                *held_epoch = snapshot.epoch;
                self.metrics.set_lease_expiry(self.held.expires);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "ensuring devices failed");
                self.metrics.set_error(&e.to_string());
            }
        }
        if have_snapshot {
            self.reconcile(peers).await;
        }
        if self.settings.ip_masq
            && let Err(e) = masq::heal(&NftCli, &self.masq_spec()).await
        {
            tracing::warn!(error = %e, "installing the masquerade rules failed");
            self.metrics.set_error(&e.to_string());
        }
        if !self.settings.subnet_file.exists() {
            self.write_facts()?;
        }
        check_config(
            &self.store,
            &self.cfg_text,
            &self.settings.config_location,
            &self.metrics,
            config_gone,
        )
        .await;
        match self.store.claims(&self.held.subnets).await {
            Ok(claims) => {
                let own = self.held.subnets.key();
                report.update_claims(&own, &claims, self.attrs.node_id.as_deref(), &self.metrics);
            }
            Err(e) => tracing::debug!(error = %e, "reading claims on our lease failed"),
        }
        Ok(true)
    }

    /// Our lease is gone or someone else's now: say so, stop handing out its addresses, get a
    /// lease again (the same subnet if it is free) and write the facts anew. `false`: a signal
    /// came first.
    async fn reacquire(&mut self, loss: Loss) -> anyhow::Result<bool> {
        let why = loss.why();
        tracing::error!(subnet = %self.held.subnets.key(), "our lease is no longer ours ({why}); re-acquiring");
        self.metrics
            .set_not_ready(&format!("no subnet lease: {why}"));
        // Taken: our last subnet is what the other node holds now, no proof of anything.
        let previous = match loss {
            Loss::Gone(_) => Some(self.held.subnets),
            Loss::Taken(_) => None,
        };
        let file = &self.settings.subnet_file;
        match std::fs::remove_file(file) {
            Ok(()) => {
                tracing::warn!(file = %file.display(), "subnet file removed until this node holds a lease again");
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(error = %e, file = %file.display(), "removing the subnet file failed");
            }
        }
        let Some(h) = self.acquire(previous).await else {
            return Ok(false);
        };
        self.held = h;
        self.metrics.set_lease_expiry(self.held.expires);
        self.write_facts()?;
        if self.settings.ip_masq {
            self.install_masq().await;
        }
        Ok(true)
    }
}

/// Aborts the task when dropped (the lease cache ends with the loop, whichever way it ends).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// When to renew: `margin` before expiry, but never sooner than a second from now (no tight
/// loop, whatever the store answers).
fn renew_delay(expires: SystemTime, margin: Duration) -> Duration {
    expires
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .saturating_sub(margin)
        .max(Duration::from_secs(1))
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
    let res = reconcile(k, cfg, up, devices, &held.subnets, peers).await;
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

/// Re-reads the network config: a change is reported (restart to apply), an invalid one refused,
/// a deleted key logged once (and its return).
async fn check_config<S: LeaseStore>(
    store: &S,
    running: &str,
    at: &str,
    metrics: &Metrics,
    gone: &mut bool,
) {
    match store.get_config().await {
        Ok(text) => {
            if std::mem::take(gone) {
                tracing::info!(config = %at, "the network config key is back");
            }
            if text != running {
                match NetworkConfig::parse(&text) {
                    Ok(_) => tracing::warn!(
                        config = %at,
                        "network config changed; restart twilld to apply it (running on the previous one)"
                    ),
                    Err(e) => {
                        let msg = format!("refusing network config at {at}: {e}");
                        tracing::error!(error = %msg, "keeping the running config and dataplane");
                        metrics.set_error(&msg);
                    }
                }
            }
        }
        Err(StoreError::NoConfig(_)) => {
            if !*gone {
                *gone = true;
                let msg = format!("network config key {at} was deleted");
                tracing::error!(
                    error = %msg,
                    "running on the config read at start; an empty lease listing is not acted on until the key is back"
                );
                metrics.set_error(&msg);
            }
        }
        Err(e) => tracing::debug!(error = %e, "re-reading the network config failed"),
    }
}

/// Attaches the eBPF packet counter to the IPv4 (else IPv6) VXLAN device and exports its counts.
fn attach_counter(
    devices: &Devices,
    metrics: &Metrics,
) -> Option<Arc<crate::overlay::counter::PacketCounter>> {
    let dev = devices.v4.as_ref().or(devices.v6.as_ref())?;
    match crate::overlay::counter::PacketCounter::attach(&dev.name) {
        Ok(c) => {
            let c = Arc::new(c);
            let reader = c.clone();
            metrics.set_counts(
                &dev.name,
                Box::new(move || {
                    reader
                        .read()
                        .ok()
                        .map(|c| crate::shared::metrics::DeviceCounts {
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
mod tests;
