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
//! - Peer leases are validated before use ([`lease::validate_peers`]); each ignored one is
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

use crate::overlay::backend::udp::{self, UdpBackend};
use crate::overlay::config::{BackendType, NetworkConfig};
use crate::overlay::kernel::Kernel;
use crate::overlay::kernel::netlink::Netlink;
use crate::overlay::lease::{Lease, LeaseAttrs, LeaseSubnets};
use crate::overlay::masq;
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
use crate::overlay::{self, Devices, Uplink};
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

fn masq_spec(cfg: &NetworkConfig, own: &LeaseSubnets) -> masq::MasqSpec {
    masq::MasqSpec {
        v4: cfg.network.zip(own.v4).filter(|_| cfg.enable_ipv4),
        v6: cfg.ipv6_network.zip(own.v6).filter(|_| cfg.enable_ipv6),
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
            match overlay::check_network(&cfg, &up, &routes) {
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
            let spec = udp::Spec::new(&cfg, &up)?;
            let b = UdpBackend::start(&kernel, spec)
                .await
                .context("start the udp backend")?;
            metrics.set_udp_counts(b.counts_fn());
            Some(b)
        } else {
            None
        };
        let devices = overlay::ensure_devices(&kernel, &cfg, &up)
            .await
            .context("set up the VXLAN device")?;
        let mtu = overlay::overlay_mtu(&cfg, &up);
        let attrs = LeaseAttrs {
            node_id: settings.node_id.clone(),
            ..overlay::lease_attrs(&cfg, &up, &devices)
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
            masq::nft_batch(&masq::render(&masq_spec(&node.cfg, &node.held.subnets)))
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

    fn node_attrs(&self) -> LeaseAttrs {
        LeaseAttrs {
            node_id: self.settings.node_id.clone(),
            ..overlay::lease_attrs(&self.cfg, &self.up, &self.devices)
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

    async fn install_masq(&self) {
        if let Err(e) =
            masq::nft_batch(&masq::render(&masq_spec(&self.cfg, &self.held.subnets))).await
        {
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
        match overlay::ensure_devices(&self.kernel, &self.cfg, &self.up).await {
            Ok(d) if d != self.devices => {
                tracing::warn!("overlay device changed; republishing the lease");
                self.devices = d;
                self.attrs = self.node_attrs();
                let again = Some(self.held.subnets);
                let got = acquire_until(
                    &self.store,
                    &self.cfg,
                    &self.attrs,
                    again,
                    &self.metrics,
                    &self.shutdown,
                );
                let Some(h) = got.await else {
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
        if self.settings.ip_masq && !masq::present().await {
            tracing::warn!("masquerade table missing; reinstalling");
            self.install_masq().await;
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
        let got = acquire_until(
            &self.store,
            &self.cfg,
            &self.attrs,
            previous,
            &self.metrics,
            &self.shutdown,
        );
        let Some(h) = got.await else {
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
mod tests {
    use super::*;
    use crate::overlay::lease::LEASE_TTL;
    use crate::overlay::node::acquire::{Acquired, acquire};
    use crate::overlay::node::identity::node_identity;
    use crate::overlay::source::MemStore;

    const CFG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

    /// A node's attributes: its public IP, identity `id-<ip>`.
    fn attrs(ip: &str) -> LeaseAttrs {
        LeaseAttrs {
            public_ip: Some(ip.parse().unwrap()),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: Some(serde_json::json!({"VNI":1,"VtepMAC":"0e:00:00:00:00:01"})),
            backend_v6_data: None,
            node_id: Some(format!("id-{ip}")),
        }
    }

    async fn held(store: &MemStore, cfg: &NetworkConfig, a: &LeaseAttrs) -> HeldLease {
        match acquire(store, cfg, a, None).await.unwrap() {
            Acquired::Held(h) => h,
            Acquired::Conflict(c) => panic!("conflict with {c:?}"),
        }
    }

    #[tokio::test]
    async fn restart_gets_the_same_subnet_back() {
        let store = MemStore::new(CFG);
        let cfg = NetworkConfig::parse(CFG).unwrap();
        let a = held(&store, &cfg, &attrs("198.18.0.11")).await;
        let b = held(&store, &cfg, &attrs("198.18.0.12")).await;
        assert_ne!(a.subnets, b.subnets);
        // Restart of node a (new VTEP MAC even): same subnet, new etcd lease, one key.
        let mut a2_attrs = attrs("198.18.0.11");
        a2_attrs.backend_data = Some(serde_json::json!({"VNI":1,"VtepMAC":"0e:00:00:00:00:09"}));
        let a2 = held(&store, &cfg, &a2_attrs).await;
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
    async fn a_live_holder_with_our_public_ip_is_not_taken_over() {
        let store = MemStore::new(CFG);
        let cfg = NetworkConfig::parse(CFG).unwrap();
        let first = attrs("198.18.0.11");
        let a = held(&store, &cfg, &first).await;
        let before = store.leases();
        // A second node started with the same --public-ip: another identity, no subnet file.
        let mut second = attrs("198.18.0.11");
        second.node_id = Some("id-second".into());
        second.backend_data = Some(serde_json::json!({"VNI":1,"VtepMAC":"0e:00:00:00:00:99"}));
        let elsewhere = LeaseSubnets::parse_key("10.244.250.0-24").unwrap();
        for previous in [None, Some(elsewhere)] {
            match acquire(&store, &cfg, &second, previous).await.unwrap() {
                Acquired::Conflict(c) => {
                    assert_eq!(c.lease.subnets, a.subnets);
                    assert_eq!(c.lease.attrs.node_id, first.node_id);
                }
                Acquired::Held(h) => panic!("took {h:?} over"),
            }
        }
        assert_eq!(store.leases(), before, "the holder's lease was touched");
        // The holder renews as before.
        store.renew(&a).await.unwrap();
    }

    #[tokio::test]
    async fn a_lost_identity_file_is_made_up_for_by_the_previous_subnet_file() {
        let store = MemStore::new(CFG);
        let cfg = NetworkConfig::parse(CFG).unwrap();
        let before = held(&store, &cfg, &attrs("198.18.0.11")).await;
        // Restarted with a new identity (its file was on a disk that did not survive) but with
        // its subnet file: it gets its lease back; without the file it could not prove it.
        let mut reborn = attrs("198.18.0.11");
        reborn.node_id = Some("id-reborn".into());
        assert!(matches!(
            acquire(&store, &cfg, &reborn, None).await.unwrap(),
            Acquired::Conflict(_)
        ));
        match acquire(&store, &cfg, &reborn, Some(before.subnets))
            .await
            .unwrap()
        {
            Acquired::Held(h) => assert_eq!(h.subnets, before.subnets),
            Acquired::Conflict(c) => panic!("{c:?}"),
        }
    }

    #[tokio::test]
    async fn a_lease_without_identity_is_reclaimed_only_with_the_previous_subnet_file() {
        let store = MemStore::new(CFG);
        let cfg = NetworkConfig::parse(CFG).unwrap();
        // Written by flannel (or an older twill) on this node.
        let sn = LeaseSubnets::parse_key("10.244.42.0-24").unwrap();
        let mut old = attrs("198.18.0.11");
        old.node_id = None;
        store.insert(Lease {
            subnets: sn,
            attrs: old,
            expires: None,
        });
        let me = attrs("198.18.0.11");
        assert!(matches!(
            acquire(&store, &cfg, &me, None).await.unwrap(),
            Acquired::Conflict(c) if c.lease.subnets == sn
        ));
        match acquire(&store, &cfg, &me, Some(sn)).await.unwrap() {
            Acquired::Held(h) => assert_eq!(h.subnets, sn),
            Acquired::Conflict(c) => panic!("{c:?}"),
        }
        assert_eq!(store.leases()[0].lease.attrs.node_id, me.node_id);
    }

    #[tokio::test]
    async fn previous_subnet_from_file_is_preferred_when_free() {
        let store = MemStore::new(CFG);
        let cfg = NetworkConfig::parse(CFG).unwrap();
        let prev = LeaseSubnets {
            v4: Some("10.244.77.0/24".parse().unwrap()),
            v6: None,
        };
        let Acquired::Held(a) = acquire(&store, &cfg, &attrs("198.18.0.11"), Some(prev))
            .await
            .unwrap()
        else {
            panic!("conflict")
        };
        assert_eq!(a.subnets, prev);
        // Taken by someone else: another one.
        let Acquired::Held(b) = acquire(&store, &cfg, &attrs("198.18.0.12"), Some(prev))
            .await
            .unwrap()
        else {
            panic!("conflict")
        };
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
                held(&s, &c, &attrs(&format!("198.18.0.{}", 10 + i))).await
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

    /// Waits (real time, bounded) until `f` holds.
    async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "{what}: not within 10 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_signal_ends_the_wait_for_a_free_subnet() {
        let cfg_json = r#"{"Network":"10.244.0.0/22","Backend":{"Type":"vxlan"}}"#;
        let store = MemStore::new(cfg_json);
        let cfg = NetworkConfig::parse(cfg_json).unwrap();
        for ip in ["198.18.0.12", "198.18.0.13", "198.18.0.14"] {
            held(&store, &cfg, &attrs(ip)).await;
        }
        let metrics = Arc::new(Metrics::default());
        let (fire, shutdown) = Shutdown::manual();
        let task = {
            let (store, cfg, metrics) = (store.clone(), cfg.clone(), metrics.clone());
            tokio::spawn(async move {
                acquire_until(
                    &store,
                    &cfg,
                    &attrs("198.18.0.11"),
                    None,
                    &metrics,
                    &shutdown,
                )
                .await
            })
        };
        eventually("not ready for want of a subnet", || {
            metrics.health().0 == 503 && metrics.health().1.contains("no free IPv4 subnet")
        })
        .await;
        let start = Instant::now();
        fire.send(true).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("acquire_until did not end on the signal")
            .unwrap();
        assert!(got.is_none());
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_conflict_is_reported_and_claimed_until_the_holder_goes() {
        let store = MemStore::new(CFG);
        let cfg = NetworkConfig::parse(CFG).unwrap();
        let a = held(&store, &cfg, &attrs("198.18.0.11")).await;
        let mut second = attrs("198.18.0.11");
        second.node_id = Some("id-second".into());
        let metrics = Arc::new(Metrics::default());
        let (_fire, shutdown) = Shutdown::manual();
        let task = {
            let (store, cfg, metrics, second) =
                (store.clone(), cfg.clone(), metrics.clone(), second.clone());
            tokio::spawn(async move {
                acquire_until(&store, &cfg, &second, None, &metrics, &shutdown).await
            })
        };
        eventually("conflict reported", || {
            let (code, text) = metrics.health();
            code == 503
                && text.contains(&a.subnets.key())
                && text.contains("id-198.18.0.11")
                && metrics.render().contains("twill_lease_conflicts 1\n")
        })
        .await;
        // The holder sees the claim.
        let claims = store.claims(&a.subnets).await.unwrap();
        assert_eq!(claims, vec![second.clone()]);
        // The holder's lease goes (it stopped and its TTL ran out): the second gets a lease.
        store.remove(&a.subnets);
        let got = tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(metrics.render().contains("twill_lease_conflicts 0\n"));
        assert_eq!(store.leases()[0].lease.attrs, second);
        assert_eq!(store.leases()[0].lease.subnets, got.subnets);
    }

    #[tokio::test]
    async fn a_lost_or_taken_lease_is_noticed_but_not_from_a_stale_snapshot() {
        let store = MemStore::new(CFG);
        let cfg = NetworkConfig::parse(CFG).unwrap();
        let me = attrs("198.18.0.11");
        let h = held(&store, &cfg, &me).await;
        let snap = |store: &MemStore, revision: i64| Snapshot {
            leases: store.leases(),
            revision,
            epoch: 0,
        };
        assert_eq!(lease_lost(&snap(&store, h.revision), &h, &me, true), None);
        // Deleted: noticed; but a snapshot from before our write proves nothing.
        let empty = Snapshot {
            leases: Vec::new(),
            revision: h.revision - 1,
            epoch: 0,
        };
        assert_eq!(lease_lost(&empty, &h, &me, true), None);
        // Unless the snapshot is of another store (an etcd replaced, its revisions anew).
        assert!(matches!(
            lease_lost(&empty, &h, &me, false),
            Some(Loss::Gone(_))
        ));
        store.remove(&h.subnets);
        let gone = lease_lost(&snap(&store, h.revision + 1), &h, &me, true).unwrap();
        assert!(
            matches!(&gone, Loss::Gone(w) if w.contains("deleted")),
            "{gone:?}"
        );
        // Rewritten by another node (an older twill that "reclaimed" it by public IP).
        let h = held(&store, &cfg, &me).await;
        let mut thief = attrs("198.18.0.11");
        thief.node_id = Some("id-thief".into());
        store.insert(Lease {
            subnets: h.subnets,
            attrs: thief,
            expires: None,
        });
        let taken = lease_lost(&snap(&store, h.revision + 1), &h, &me, true).unwrap();
        assert!(
            matches!(&taken, Loss::Taken(w) if w.contains("taken over") && w.contains("id-thief")),
            "{taken:?}"
        );
        // The renewal says so too.
        let err = store.renew(&h).await.unwrap_err();
        assert!(
            matches!(err, StoreError::LeaseLost { taken: true, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn ignored_leases_are_counted_and_the_peers_kept() {
        let store = MemStore::new(CFG);
        let cfg = NetworkConfig::parse(CFG).unwrap();
        let me = attrs("198.18.0.11");
        let h = held(&store, &cfg, &me).await;
        held(&store, &cfg, &attrs("198.18.0.12")).await;
        let mut bad = attrs("0.0.0.0");
        bad.node_id = None;
        // (10.244.0.0/24 is below SubnetMin: never one the nodes above were given.)
        for key in ["198.18.0.0-25", "8.8.8.0-24", "10.244.0.0-24"] {
            store.insert(Lease {
                subnets: LeaseSubnets::parse_key(key).unwrap(),
                attrs: if key.starts_with("10.") {
                    bad.clone()
                } else {
                    attrs("198.18.0.13")
                },
                expires: None,
            });
        }
        let metrics = Metrics::default();
        let mut report = LeaseReport::default();
        let snap = Snapshot {
            leases: store.leases(),
            revision: i64::MAX,
            epoch: 0,
        };
        for _ in 0..2 {
            let peers = usable_peers(&cfg, &snap, &h, &me, &mut report, &metrics);
            assert_eq!(peers.len(), 1, "{peers:?}");
            assert_eq!(peers[0].attrs.public_ip.unwrap().to_string(), "198.18.0.12");
        }
        let text = metrics.render();
        assert!(
            text.contains("twill_leases_ignored{reason=\"outside_network\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("twill_leases_ignored{reason=\"bad_public_ip\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("twill_leases_ignored{reason=\"wrong_length\"} 0\n"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn an_older_lease_over_ours_is_counted_as_a_conflict() {
        let store = MemStore::new(CFG);
        let cfg = NetworkConfig::parse(CFG).unwrap();
        // Another node's lease, created first, names our subnet in another key (with an IPv6
        // part this IPv4-only cluster ignores); ours comes second.
        let mut other = lease_of("198.18.0.12", 5);
        other.subnets = LeaseSubnets::parse_key("10.244.5.0-24&fd00::-64").unwrap();
        store.insert(other);
        let me = attrs("198.18.0.11");
        let h = store
            .create(
                LeaseSubnets::parse_key("10.244.5.0-24").unwrap(),
                &me,
                LEASE_TTL,
            )
            .await
            .unwrap()
            .unwrap();
        let metrics = Metrics::default();
        let mut report = LeaseReport::default();
        let snap = Snapshot {
            leases: store.leases(),
            revision: h.revision,
            epoch: 0,
        };
        let peers = usable_peers(&cfg, &snap, &h, &me, &mut report, &metrics);
        assert!(peers.is_empty(), "{peers:?}");
        let text = metrics.render();
        assert!(text.contains("twill_lease_conflicts 1\n"), "{text}");
        assert!(
            text.contains("twill_leases_ignored{reason=\"overlaps_own_subnet\"} 1\n"),
            "{text}"
        );
    }

    fn lease_of(ip: &str, n: u8) -> Lease {
        Lease {
            subnets: LeaseSubnets::parse_key(&format!("10.244.{n}.0-24")).unwrap(),
            attrs: attrs(ip),
            expires: None,
        }
    }

    /// The lease cache on `store`: its task and the keys of its latest snapshot.
    fn cache_on(
        store: &MemStore,
    ) -> (
        tokio::task::JoinHandle<()>,
        watch::Receiver<Option<Arc<Snapshot>>>,
    ) {
        let (tx, rx) = watch::channel(None);
        (tokio::spawn(lease_cache(store.clone(), tx)), rx)
    }

    fn keys(rx: &watch::Receiver<Option<Arc<Snapshot>>>) -> Vec<String> {
        rx.borrow()
            .as_ref()
            .map(|s| s.leases.iter().map(|l| l.lease.subnets.key()).collect())
            .unwrap_or_default()
    }

    #[tokio::test(start_paused = true)]
    async fn a_wiped_store_is_not_acted_on_until_the_config_is_back() {
        let store = MemStore::new(CFG);
        store.insert(lease_of("198.18.0.11", 1));
        store.insert(lease_of("198.18.0.12", 2));
        let (task, mut rx) = cache_on(&store);
        rx.wait_for(|s| s.as_ref().is_some_and(|s| s.leases.len() == 2))
            .await
            .unwrap();
        // etcdctl del --prefix: every lease and the config key at once.
        store.wipe();
        // A minute (of paused time: every task runs until idle first) brings no empty snapshot.
        tokio::time::sleep(Duration::from_mins(1)).await;
        assert_eq!(keys(&rx).len(), 2);
        assert!(!rx.has_changed().unwrap());
        // The config key is back: the empty listing is acted on.
        store.set_config(Some(CFG));
        tokio::time::timeout(
            Duration::from_mins(1),
            rx.wait_for(|s| s.as_ref().is_some_and(|s| s.leases.is_empty())),
        )
        .await
        .expect("the empty listing was never published")
        .unwrap();
        // Leases deleted one by one, the config in place, are acted on at once.
        store.insert(lease_of("198.18.0.11", 1));
        rx.wait_for(|s| s.as_ref().is_some_and(|s| s.leases.len() == 1))
            .await
            .unwrap();
        store.remove(&lease_of("198.18.0.11", 1).subnets);
        tokio::time::timeout(
            Duration::from_secs(1),
            rx.wait_for(|s| s.as_ref().is_some_and(|s| s.leases.is_empty())),
        )
        .await
        .expect("a real departure was held back")
        .unwrap();
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_fresh_store_is_acted_on_only_with_its_config() {
        let store = MemStore::new(CFG);
        store.insert(lease_of("198.18.0.11", 1));
        let (task, mut rx) = cache_on(&store);
        rx.wait_for(|s| s.as_ref().is_some_and(|s| s.leases.len() == 1))
            .await
            .unwrap();
        // Another etcd (revision from the start, another cluster id), empty, no config yet.
        store.replace_with_fresh(None);
        tokio::time::sleep(Duration::from_mins(1)).await;
        assert_eq!(keys(&rx).len(), 1);
        assert_eq!(rx.borrow().as_ref().unwrap().epoch, 0);
        store.set_config(Some(CFG));
        tokio::time::timeout(
            Duration::from_mins(1),
            rx.wait_for(|s| s.as_ref().is_some_and(|s| s.leases.is_empty())),
        )
        .await
        .expect("the fresh store was never acted on")
        .unwrap();
        // Its revisions count anew: the snapshot says it is another store.
        assert_eq!(rx.borrow().as_ref().unwrap().epoch, 1);
        // A fresh store that comes with its config is acted on at once.
        store.insert(lease_of("198.18.0.11", 1));
        rx.wait_for(|s| s.as_ref().is_some_and(|s| s.leases.len() == 1))
            .await
            .unwrap();
        store.replace_with_fresh(Some(CFG));
        tokio::time::timeout(
            Duration::from_mins(1),
            rx.wait_for(|s| s.as_ref().is_some_and(|s| s.leases.is_empty())),
        )
        .await
        .expect("the fresh store with its config was not acted on")
        .unwrap();
        task.abort();
    }

    #[test]
    fn renewals_never_come_back_to_back() {
        // Whatever the store answers, renewals never come back to back.
        let soon = SystemTime::now() + Duration::from_secs(30);
        assert_eq!(
            renew_delay(soon, Duration::from_hours(1)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn the_node_identity_is_made_once_and_checked() {
        let dir = std::env::temp_dir().join(format!("twill-node-id-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub").join("node-id");
        let id = node_identity(&path).unwrap();
        assert_eq!(id.len(), 32);
        assert_eq!(node_identity(&path).unwrap(), id);
        std::fs::write(&path, "not an id!").unwrap();
        let err = format!("{:#}", node_identity(&path).unwrap_err());
        assert!(
            err.contains(&path.display().to_string()) && err.contains("not an id!"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
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
