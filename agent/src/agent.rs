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
//! - The service proxy starts beside the overlay loop, not before it: opening the eBPF
//!   dataplane (loading, verifying and attaching its programs) takes a second, several on a busy
//!   node, and the subnet file already lets pods be created here. Had the loop waited, those pods
//!   could neither reach nor be reached from other nodes' pods until then (the peers' routes
//!   missing here, and a peer that started as slowly missing ours), while services through the
//!   node's own backends and NodePorts already answered. A proxy that fails to start still
//!   stops twilld.
//! - An etcd that suddenly holds nothing (every lease gone and the network config key gone too,
//!   as after a wipe or a fresh cluster) is suspect: the lease cache keeps the last snapshot and
//!   acts on the empty listing only once the config key is back.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
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
use crate::lease::{self, IgnoreReason, Ignored, Lease, LeaseAttrs, LeaseSubnets, OwnNode};
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
/// The lease TTL in minutes, the bound of `--subnet-lease-renew-margin`.
pub const LEASE_TTL_MINUTES: u64 = LEASE_TTL.as_secs() / 60;
/// How long a claim on a conflicting lease lives unless renewed (the claimant renews it on every
/// attempt, at most 10 s apart).
pub const CLAIM_TTL: Duration = Duration::from_secs(30);
/// Where the node's identity is kept by default (it must survive a reboot, as the lease does).
pub const DEFAULT_NODE_ID_FILE: &str = "/var/lib/twill/node-id";

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
    /// Renew the lease this many minutes before it expires (1 to 1439: the lease lasts 24 h).
    #[arg(
        long,
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..=LEASE_TTL_MINUTES - 1)
    )]
    pub subnet_lease_renew_margin: u64,
    /// File holding this node's identity (created on first start), published with the lease
    /// (`TwillNodeID`) so that a restarted node can prove a lease is its own.
    #[arg(long, default_value = DEFAULT_NODE_ID_FILE)]
    pub node_id_file: PathBuf,
    /// Address of the /healthz listener (flannel's health check; it serves /healthz only).
    #[arg(long, default_value = "0.0.0.0")]
    pub healthz_ip: IpAddr,
    /// Port of the /healthz listener (0: off).
    #[arg(long, default_value_t = 0)]
    pub healthz_port: u16,
    /// Address for /metrics (and /healthz): IP:PORT, or a bare PORT meaning 127.0.0.1:PORT
    /// (default: off). /metrics is served here only.
    #[arg(long, value_parser = parse_metrics_addr)]
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
    /// Networks (CIDRs or addresses) a Service's `externalIPs` may be in to be programmed;
    /// repeatable or comma-separated. Default with the etcd service source: none (as
    /// Kubernetes' `AllowServiceExternalIPs` is now off by default); with the Kubernetes
    /// source: every one the API server admitted (restrict them there, or with this flag).
    #[arg(long, value_delimiter = ',', value_parser = crate::proxy::parse_allowed_network)]
    pub allowed_external_ips: Option<Vec<ipnet::IpNet>>,
}

/// `--metrics-addr`: `IP:PORT`, or a bare `PORT` on loopback (what a node-local scraper needs,
/// without publishing the node's state on every address).
fn parse_metrics_addr(text: &str) -> Result<SocketAddr, String> {
    let addr = if let Ok(port) = text.parse::<u16>() {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    } else {
        text.parse::<SocketAddr>().map_err(|_| {
            format!("{text:?} is not IP:PORT or a bare PORT (meaning 127.0.0.1:PORT)")
        })?
    };
    if addr.port() == 0 {
        return Err(format!(
            "{text:?} has port 0: give the port to serve /metrics on"
        ));
    }
    Ok(addr)
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

/// The end of the agent: set once SIGTERM or SIGINT arrives; every wait of the agent selects on
/// it, so no loop outlives a signal.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Installs the SIGTERM and SIGINT handlers (from then on the signals no longer kill the
    /// process: this value reports them).
    pub fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!(signal = name, "shutting down");
            let _ = tx.send(true);
            // Keep the sender: a later wait still sees the signal.
            std::future::pending::<()>().await;
        });
        Ok(Shutdown(rx))
    }

    /// A signal fired by hand (tests): send `true` to shut down.
    pub fn manual() -> (watch::Sender<bool>, Self) {
        let (tx, rx) = watch::channel(false);
        (tx, Shutdown(rx))
    }

    /// Returns once the agent is to shut down.
    pub async fn wait(&self) {
        let mut rx = self.0.clone();
        if rx.wait_for(|v| *v).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Whether the agent is to shut down.
    pub fn fired(&self) -> bool {
        *self.0.borrow()
    }
}

/// Reads this node's identity from `path`, creating it (32 random hex digits) on first start.
/// An unreadable file or one that does not hold an identity is an error naming the file.
pub fn node_identity(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let id = text.trim();
            let ok = (8..=64).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                let shown: String = id.chars().take(70).collect();
                bail!(
                    "node identity file {} holds {shown:?}, not an identity (8 to 64 letters, \
                     digits, '-' or '_'); remove it to have a new one made",
                    path.display()
                );
            }
            Ok(id.to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = format!("{:032x}", rand::random::<u128>());
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("create directory {}", dir.display()))?;
            }
            let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
            std::fs::write(&tmp, format!("{id}\n"))
                .with_context(|| format!("write node identity file {}", tmp.display()))?;
            std::fs::rename(&tmp, path)
                .with_context(|| format!("rename {} to {}", tmp.display(), path.display()))?;
            tracing::info!(file = %path.display(), node_id = %id, "new node identity");
            Ok(id)
        }
        Err(e) => Err(e).with_context(|| format!("read node identity file {}", path.display())),
    }
}

/// What [`acquire`] got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// A lease, ours now.
    Held(HeldLease),
    /// A lease carries our public IP but is not provably ours: its holder is another node.
    Conflict(StoredLease),
}

/// Whether `stored` is provably this node's lease: it carries our identity, or it is the subnet
/// of our previous subnet file (a lease flannel or an older twill wrote here, or ours from
/// before our identity file was lost).
fn provably_ours(stored: &StoredLease, attrs: &LeaseAttrs, previous: Option<LeaseSubnets>) -> bool {
    (attrs.node_id.is_some() && stored.lease.attrs.node_id == attrs.node_id)
        || previous == Some(stored.lease.subnets)
}

/// Whether a lease publishes one of our public addresses.
fn same_public_ip(l: &LeaseAttrs, attrs: &LeaseAttrs) -> bool {
    (attrs.public_ip.is_some() && l.public_ip == attrs.public_ip)
        || (attrs.public_ipv6.is_some() && l.public_ipv6 == attrs.public_ipv6)
}

/// Acquires a lease: our previous one (same PublicIP, provably ours) if it is still there, else
/// the subnet we had before (from the subnet file) if free, else a random free subnet. A lease
/// with our public IP that is not provably ours is never taken over ([`Acquired::Conflict`]).
/// Loses races gracefully: a taken candidate means list again and retry.
pub async fn acquire<S: LeaseStore>(
    store: &S,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    previous: Option<LeaseSubnets>,
) -> anyhow::Result<Acquired> {
    // Kubernetes assigns the subnet in kube-subnet-mgr mode: publish our attributes for it.
    if let Some(held) = store.acquire_assigned(cfg, attrs, LEASE_TTL).await? {
        return Ok(Acquired::Held(held));
    }
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_os_rng();
    for attempt in 0..20 {
        let leases = store.list().await.context("list leases")?.leases;
        let mine = leases.iter().find(|l| {
            l.lease.attrs.public_ip == attrs.public_ip
                && l.lease.attrs.public_ipv6 == attrs.public_ipv6
                && lease::in_range(cfg, &l.lease.subnets)
                && provably_ours(l, attrs, previous)
        });
        if let Some(old) = mine {
            if let Some(held) = store.reclaim(old, attrs, LEASE_TTL).await? {
                tracing::info!(subnet = %held.subnets.key(), "reclaimed our lease");
                return Ok(Acquired::Held(held));
            }
            continue;
        }
        if let Some(other) = leases
            .iter()
            .find(|l| same_public_ip(&l.lease.attrs, attrs) && !provably_ours(l, attrs, previous))
        {
            return Ok(Acquired::Conflict(other.clone()));
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
            return Ok(Acquired::Held(held));
        }
        tracing::debug!(subnet = %candidate.key(), "lost a race for a subnet, retrying");
    }
    bail!("could not acquire a lease after 20 attempts (heavy contention?)")
}

/// The message for a lease conflict.
fn conflict_message(other: &StoredLease) -> String {
    let a = &other.lease.attrs;
    let ip = a
        .public_ip
        .map(|i| i.to_string())
        .or_else(|| a.public_ipv6.map(|i| i.to_string()))
        .unwrap_or_default();
    format!(
        "no subnet lease: lease {} carries this node's public IP {ip} but is held by node {}; \
         not taking it over (does another node run with the same --public-ip? if that node is \
         gone, delete the key or wait for its TTL)",
        other.lease.subnets.key(),
        a.node_id
            .as_deref()
            .unwrap_or("(no identity: flannel or an older twill)")
    )
}

/// Acquires a lease, retrying with backoff until it gets one or `shutdown` fires (`None`).
/// Meanwhile the node is not ready (`/healthz` says why); a conflict is logged once per lease,
/// counted, and claimed so that its holder learns of it.
pub async fn acquire_until<S: LeaseStore>(
    store: &S,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    previous: Option<LeaseSubnets>,
    metrics: &Metrics,
    shutdown: &Shutdown,
) -> Option<HeldLease> {
    let mut backoff = Backoff::new();
    let mut reported: Option<String> = None;
    loop {
        let got = tokio::select! {
            () = shutdown.wait() => return None,
            got = acquire(store, cfg, attrs, previous) => got,
        };
        match got {
            Ok(Acquired::Held(held)) => {
                if reported.is_some() {
                    tracing::info!(subnet = %held.subnets.key(), "lease conflict over: holding a lease");
                }
                metrics.set_lease_conflicts(0);
                return Some(held);
            }
            Ok(Acquired::Conflict(other)) => {
                let msg = conflict_message(&other);
                let key = other.lease.subnets.key();
                if reported.as_deref() != Some(key.as_str()) {
                    tracing::error!(lease = %key, "{msg}");
                    reported = Some(key);
                }
                metrics.set_not_ready(&msg);
                metrics.set_lease_conflicts(1);
                if let Err(e) = store.claim(&other.lease.subnets, attrs, CLAIM_TTL).await {
                    tracing::warn!(error = %e, "leaving a claim on the conflicting lease failed");
                }
            }
            Err(e) => {
                let msg = format!("no subnet lease: acquire a subnet lease: {e:#}");
                tracing::warn!(error = %msg, "retrying");
                metrics.set_not_ready(&msg);
                metrics.set_error(&msg);
            }
        }
        tokio::select! {
            () = shutdown.wait() => return None,
            () = tokio::time::sleep(backoff.next()) => {}
        }
    }
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

/// The lease cache's view of the store: every lease, as of a store revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Every lease (ours included).
    pub leases: Vec<StoredLease>,
    /// The highest store revision the snapshot reflects.
    pub revision: i64,
    /// Which store the revision counts in: bumped whenever the store turns out to be another
    /// one (another etcd cluster id, or its revision went backwards), so a revision is never
    /// compared with one of another store.
    pub epoch: u64,
}

/// What the lease cache remembers of the store it last saw, to tell a store that lost its data
/// (or was replaced by a fresh one) from one where the nodes really left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct StoreSeen {
    revision: i64,
    cluster_id: u64,
    had_leases: bool,
}

/// Whether the network config can be read (the key is there): the proof that an empty listing
/// is a cluster without leases, not a store that lost everything.
async fn config_present<S: LeaseStore>(store: &S) -> bool {
    store.get_config().await.is_ok()
}

/// Waits, polling with backoff, until the network config can be read again.
async fn hold_until_config<S: LeaseStore>(store: &S, why: &str) {
    tracing::warn!(
        "{why}, and the network config key is gone: etcd looks wiped or replaced; keeping the \
         overlay as it is until the config key is back"
    );
    let mut backoff = Backoff::new();
    loop {
        tokio::time::sleep(backoff.next().min(Duration::from_secs(2))).await;
        if config_present(store).await {
            tracing::info!("the network config key is back; acting on the lease listing again");
            return;
        }
    }
}

fn apply_events(
    cache: &mut BTreeMap<String, StoredLease>,
    revision: &mut i64,
    batch: Vec<LeaseEvent>,
) {
    for ev in batch {
        match ev {
            LeaseEvent::Put(l) => {
                *revision = (*revision).max(l.mod_revision);
                cache.insert(l.lease.subnets.key(), l);
            }
            LeaseEvent::Delete(s, rev) => {
                *revision = (*revision).max(rev);
                cache.remove(&s.key());
            }
        }
    }
}

/// Keeps a cache of every lease, fed by list + watch, and publishes snapshots. Re-lists whenever
/// the watch breaks (compaction, etcd restart), with backoff; never gives up. A listing (or a
/// watch batch) that empties a cache that held leases is published only while the network
/// config key is there; otherwise the cache holds the last snapshot until the key is back.
pub async fn lease_cache<S: LeaseStore + Clone>(
    store: S,
    out: watch::Sender<Option<Arc<Snapshot>>>,
) {
    let mut backoff = Backoff::new();
    let mut seen = StoreSeen::default();
    let mut epoch = 0;
    loop {
        let listing = match store.list().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "listing leases failed; keeping the dataplane as it is");
                tokio::time::sleep(backoff.next()).await;
                continue;
            }
        };
        let other_cluster = seen.cluster_id != 0
            && listing.cluster_id != 0
            && listing.cluster_id != seen.cluster_id;
        if other_cluster || listing.revision < seen.revision {
            epoch += 1;
        }
        if other_cluster {
            tracing::warn!(
                before = format!("{:x}", seen.cluster_id),
                now = format!("{:x}", listing.cluster_id),
                "the lease store is another etcd cluster than before"
            );
        } else if listing.revision < seen.revision {
            tracing::warn!(
                before = seen.revision,
                now = listing.revision,
                "the lease store's revision went backwards (etcd restored or replaced)"
            );
        }
        // Remember the store as it is now (a hold below must not count it as new again).
        seen.revision = listing.revision;
        seen.cluster_id = listing.cluster_id;
        if listing.leases.is_empty() && seen.had_leases && !config_present(&store).await {
            hold_until_config(&store, "every lease is gone from the listing").await;
            continue;
        }
        backoff = Backoff::new();
        seen = StoreSeen {
            revision: listing.revision,
            cluster_id: listing.cluster_id,
            had_leases: !listing.leases.is_empty(),
        };
        let mut revision = listing.revision;
        let mut cache: BTreeMap<String, StoredLease> = listing
            .leases
            .into_iter()
            .map(|l| (l.lease.subnets.key(), l))
            .collect();
        let publish = |cache: &BTreeMap<String, StoredLease>, revision: i64| {
            let _ = out.send(Some(Arc::new(Snapshot {
                leases: cache.values().cloned().collect(),
                revision,
                epoch,
            })));
        };
        publish(&cache, revision);
        let (tx, mut rx) = mpsc::channel(256);
        let w = store.clone();
        let mut watch_task = tokio::spawn(async move { w.watch(listing.revision, tx).await });
        let mut suspect = false;
        loop {
            tokio::select! {
                batch = rx.recv() => {
                    let Some(batch) = batch else { break };
                    let had = !cache.is_empty();
                    apply_events(&mut cache, &mut revision, batch);
                    seen.revision = revision;
                    if had && cache.is_empty() && !config_present(&store).await {
                        suspect = true;
                        break;
                    }
                    seen.had_leases = !cache.is_empty();
                    publish(&cache, revision);
                }
                res = &mut watch_task => {
                    let e = res.unwrap_or_else(|j| StoreError::WatchEnded(j.to_string()));
                    tracing::warn!(error = %e, "lease watch broke; re-listing");
                    // Drain what arrived before the break.
                    let had = !cache.is_empty();
                    while let Ok(batch) = rx.try_recv() {
                        apply_events(&mut cache, &mut revision, batch);
                    }
                    seen.revision = revision;
                    if had && cache.is_empty() && !config_present(&store).await {
                        suspect = true;
                        break;
                    }
                    seen.had_leases = !cache.is_empty();
                    publish(&cache, revision);
                    break;
                }
            }
        }
        watch_task.abort();
        if suspect {
            hold_until_config(&store, "every lease was deleted").await;
            continue;
        }
        tokio::time::sleep(backoff.next()).await;
    }
}

/// Retries `f` with backoff until it succeeds (`Some`) or `shutdown` fires (`None`).
async fn retry<T, F, Fut>(what: &str, metrics: &Metrics, shutdown: &Shutdown, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut backoff = Backoff::new();
    loop {
        let res = tokio::select! {
            () = shutdown.wait() => return None,
            res = f() => res,
        };
        match res {
            Ok(v) => return Some(v),
            Err(e) => {
                let msg = format!("{what}: {e:#}");
                tracing::warn!(error = %msg, "retrying");
                metrics.set_error(&msg);
            }
        }
        tokio::select! {
            () = shutdown.wait() => return None,
            () = tokio::time::sleep(backoff.next()) => {}
        }
    }
}

/// Logs each ignored peer lease once per key and reason (not on every reconcile), says when one
/// is used again, and keeps `twill_leases_ignored` current; the same for conflicts over our own
/// lease (another node's lease with our public IP or overlapping ours, claims on ours).
#[derive(Debug, Default)]
struct LeaseReport {
    ignored: BTreeSet<(String, IgnoreReason)>,
    /// Older leases that overlap ours (peers use theirs, not ours).
    shadowed_by: BTreeSet<String>,
    /// Claims on our lease, by the claimant's identity.
    claims: BTreeSet<String>,
}

impl LeaseReport {
    fn update_ignored(&mut self, ignored: &[Ignored], metrics: &Metrics) {
        let now: BTreeSet<(String, IgnoreReason)> =
            ignored.iter().map(|i| (i.key.clone(), i.reason)).collect();
        for i in ignored {
            if !self.ignored.contains(&(i.key.clone(), i.reason)) {
                tracing::warn!(lease = %i.key, reason = i.reason.label(), "ignoring peer lease: {}", i.detail);
            }
        }
        for (key, reason) in self.ignored.difference(&now) {
            tracing::info!(lease = %key, reason = reason.label(), "peer lease no longer ignored for this reason");
        }
        self.ignored = now;
        let counts: Vec<(&'static str, usize)> = IgnoreReason::ALL
            .iter()
            .map(|r| {
                (
                    r.label(),
                    self.ignored.iter().filter(|(_, x)| x == r).count(),
                )
            })
            .collect();
        metrics.set_leases_ignored(&counts);
        self.export_conflicts(metrics);
    }

    fn update_shadowed(&mut self, own: &str, older: BTreeSet<String>) {
        for k in older.difference(&self.shadowed_by) {
            tracing::error!(
                lease = %own,
                older = %k,
                "our lease overlaps an older lease: every node uses that one and ignores ours"
            );
        }
        self.shadowed_by = older;
    }

    fn update_claims(
        &mut self,
        own: &str,
        claims: &[LeaseAttrs],
        ours: Option<&str>,
        metrics: &Metrics,
    ) {
        let now: BTreeSet<String> = claims
            .iter()
            .filter_map(|c| c.node_id.clone())
            .filter(|id| Some(id.as_str()) != ours)
            .collect();
        for c in claims {
            let Some(id) = &c.node_id else { continue };
            if Some(id.as_str()) != ours && !self.claims.contains(id) {
                tracing::error!(
                    lease = %own,
                    claimant = %id,
                    public_ip = ?c.public_ip,
                    public_ipv6 = ?c.public_ipv6,
                    "another node with this node's public IP wants our lease (not handed over): \
                     two nodes run with the same --public-ip"
                );
            }
        }
        for id in self.claims.difference(&now) {
            tracing::info!(lease = %own, claimant = %id, "the claim on our lease is gone");
        }
        self.claims = now;
        self.export_conflicts(metrics);
    }

    fn export_conflicts(&self, metrics: &Metrics) {
        let own_ip = self
            .ignored
            .iter()
            .filter(|(_, r)| *r == IgnoreReason::OwnPublicIp)
            .count();
        metrics.set_lease_conflicts(own_ip + self.claims.len() + self.shadowed_by.len());
    }
}

/// How our lease stopped being ours.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Loss {
    /// The key was deleted or expired.
    Gone(String),
    /// Another holder rewrote the key.
    Taken(String),
}

impl Loss {
    fn why(&self) -> &str {
        match self {
            Loss::Gone(w) | Loss::Taken(w) => w,
        }
    }
}

/// Whether our lease is still ours in `snap`: `None` if it is, else what happened to it. A
/// snapshot older than our last write of the key proves nothing and is ignored; `same_store`
/// says whether the snapshot's revisions count in the store we wrote to (else, after an etcd
/// was replaced, only what the snapshot holds counts).
fn lease_lost(
    snap: &Snapshot,
    held: &HeldLease,
    attrs: &LeaseAttrs,
    same_store: bool,
) -> Option<Loss> {
    let held_rev = if same_store { held.revision } else { 0 };
    if snap.revision < held_rev {
        return None;
    }
    let key = held.subnets.key();
    let Some(stored) = snap.leases.iter().find(|l| l.lease.subnets == held.subnets) else {
        return Some(Loss::Gone(format!("lease {key} was deleted or expired")));
    };
    let rewritten = (held_rev == 0 || stored.mod_revision > held_rev)
        && (stored.etcd_lease != held.etcd_lease || stored.lease.attrs.node_id != attrs.node_id);
    let by = &stored.lease.attrs;
    rewritten.then(|| {
        Loss::Taken(format!(
            "lease {key} was taken over: rewritten by node {} (PublicIP {})",
            by.node_id.as_deref().unwrap_or("(no identity)"),
            by.public_ip
                .map_or_else(|| "-".to_string(), |i| i.to_string())
        ))
    })
}

/// Validates the snapshot's peer leases for this node (see [`lease::validate_peers`]), reports
/// the ignored ones and the conflicts over our own lease, and returns the peers to program.
fn usable_peers(
    cfg: &NetworkConfig,
    snap: &Snapshot,
    held: &HeldLease,
    attrs: &LeaseAttrs,
    report: &mut LeaseReport,
    metrics: &Metrics,
) -> Vec<Lease> {
    let own = OwnNode {
        subnets: Some(held.subnets),
        public_v4: attrs.public_ip,
        public_v6: attrs.public_ipv6,
    };
    let v = lease::validate_peers(
        cfg,
        &own,
        snap.leases.iter().map(|l| (&l.lease, l.create_revision)),
    );
    if let Some(mine) = snap.leases.iter().find(|l| l.lease.subnets == held.subnets) {
        // Leases the other nodes use rather than ours: valid but for the overlap, and older.
        let overlapping: BTreeSet<&str> = v
            .ignored
            .iter()
            .filter(|i| i.reason == IgnoreReason::OverlapsOwnSubnet)
            .map(|i| i.key.as_str())
            .collect();
        let mine_at = (mine.create_revision, mine.lease.subnets.key());
        let older: BTreeSet<String> = snap
            .leases
            .iter()
            .map(|l| (l.create_revision, l.lease.subnets.key()))
            .filter(|(rev, key)| {
                overlapping.contains(key.as_str()) && (*rev, key.clone()) < mine_at
            })
            .map(|(_, key)| key)
            .collect();
        report.update_shadowed(&held.subnets.key(), older);
    }
    report.update_ignored(&v.ignored, metrics);
    v.peers
}

/// Runs the agent until SIGINT/SIGTERM.
///
/// Bad input ends it at once, before anything is retried or changed: the etcd flags and TLS
/// files are checked as a whole, then the health and metrics addresses are bound (a port taken
/// or an address not on the node would otherwise leave a node without the endpoint that shows
/// whether it is alive).
pub async fn run(opts: Options) -> anyhow::Result<()> {
    opts.etcd.check().await.context("refusing the etcd flags")?;
    let shutdown = Shutdown::install().context("install the SIGTERM/SIGINT handlers")?;
    let metrics = Arc::new(Metrics::default());
    let mut listeners = Vec::new();
    if opts.healthz_port != 0 {
        let addr = SocketAddr::new(opts.healthz_ip, opts.healthz_port);
        let l = crate::http::bind(addr)
            .await
            .with_context(|| format!("bind /healthz on {addr} (--healthz-ip, --healthz-port)"))?;
        listeners.push((l, crate::metrics::Endpoints::Health));
    }
    if let Some(addr) = opts.metrics_addr {
        let l = crate::http::bind(addr)
            .await
            .with_context(|| format!("bind /metrics on {addr} (--metrics-addr)"))?;
        listeners.push((l, crate::metrics::Endpoints::MetricsAndHealth));
    }
    let servers: Vec<_> = listeners
        .into_iter()
        .map(|(l, endpoints)| tokio::spawn(crate::metrics::serve_on(l, endpoints, metrics.clone())))
        .collect();
    let stop = |servers: Vec<tokio::task::JoinHandle<()>>| -> anyhow::Result<()> {
        tracing::info!("shutting down; the dataplane stays in place");
        for s in servers {
            s.abort();
        }
        Ok(())
    };

    let kernel = Netlink::connect().context("open netlink")?;
    let tls = opts.etcd.tls();
    let store = if opts.kube_subnet_mgr {
        let Some(s) = retry(
            "start the kube subnet manager",
            &metrics,
            &shutdown,
            || async { Ok(KubeSubnetStore::connect(&opts).await?) },
        )
        .await
        else {
            return stop(servers);
        };
        AnyLeaseStore::Kube(s)
    } else {
        let Some(s) = retry("connect to etcd", &metrics, &shutdown, || async {
            Ok(EtcdStore::connect(&opts.etcd.etcd_endpoints, &opts.etcd.etcd_prefix, &tls).await?)
        })
        .await
        else {
            return stop(servers);
        };
        AnyLeaseStore::Etcd(s)
    };
    let cfg_at = store.config_location(&opts.etcd.etcd_prefix);
    let node_id = if opts.kube_subnet_mgr {
        None
    } else {
        Some(node_identity(&opts.node_id_file)?)
    };

    // The config: refused as a whole when invalid, or when its Network would swallow this
    // node's own underlay; we wait for a valid one and touch nothing.
    let mut backoff = Backoff::new();
    let mut refused: Option<String> = None;
    let (cfg_text, cfg, up) = loop {
        let Some((cfg_text, cfg)) = retry("read network config", &metrics, &shutdown, || async {
            let text = store.get_config().await?;
            let cfg = NetworkConfig::parse(&text)
                .with_context(|| format!("refusing network config at {cfg_at}"))?;
            Ok((text, cfg))
        })
        .await
        else {
            return stop(servers);
        };
        if cfg.backend.kind == BackendType::Udp {
            udp::check_config(&cfg)
                .with_context(|| format!("refusing network config at {cfg_at}"))?;
            udp::check_proxy_mode(&opts.proxy_mode).with_context(|| {
                format!(
                    "refusing --proxy-mode {} with the network config at {cfg_at}",
                    opts.proxy_mode
                )
            })?;
        }
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
                    () = shutdown.wait() => return stop(servers),
                    () = tokio::time::sleep(backoff.next().max(Duration::from_secs(1))) => {}
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
    let node_attrs = |devices: &Devices| LeaseAttrs {
        node_id: node_id.clone(),
        ..overlay::lease_attrs(&cfg, &up, devices)
    };
    let mut attrs = node_attrs(&devices);

    let previous = SubnetFacts::read(&opts.subnet_file)
        .ok()
        .map(|f| LeaseSubnets {
            v4: f.subnet_v4(),
            v6: f.subnet_v6(),
        });
    let Some(mut held) = acquire_until(&store, &cfg, &attrs, previous, &metrics, &shutdown).await
    else {
        return stop(servers);
    };
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

    // Services: a task of their own, started beside the overlay loop below, which never waits
    // on them (see the module notes).
    let mut proxy_start = tokio::spawn({
        let (opts, up, devices, metrics) =
            (opts.clone(), up.clone(), devices.clone(), metrics.clone());
        let backend = cfg.backend.kind;
        async move { crate::proxy::start(&opts, backend, &up, &devices, &metrics).await }
    });
    let mut proxy_starting = true;
    let mut services: Option<tokio::task::JoinHandle<()>> = None;
    if let Some(u) = &udp {
        u.set_table(held.subnets.v4, &[]);
    }

    let (snap_tx, mut snap_rx) = watch::channel(None);
    let cache = tokio::spawn(lease_cache(store.clone(), snap_tx));

    let resync = Duration::from_secs(opts.resync_interval.max(1));
    let mut resync_tick = tokio::time::interval(resync);
    resync_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let margin = Duration::from_secs(opts.subnet_lease_renew_margin * 60);
    let mut renew_at = Instant::now() + renew_delay(held.expires, margin);
    let mut snapshot: Arc<Snapshot> = Arc::new(Snapshot::default());
    let mut peers: Vec<Lease> = Vec::new();
    let mut have_snapshot = false;
    // The store epoch (see `Snapshot::epoch`) our lease was last written in.
    let mut held_epoch = 0;
    let mut report = LeaseReport::default();
    let mut config_gone = false;

    'main: loop {
        // Why our lease is no longer ours, when it is not.
        let mut lost: Option<Loss> = None;
        tokio::select! {
            () = shutdown.wait() => break 'main,
            started = &mut proxy_start, if proxy_starting => {
                proxy_starting = false;
                services = started
                    .context("start the service proxy")?
                    .context("start the service proxy")?;
            }
            changed = snap_rx.changed() => {
                if changed.is_err() { bail!("lease cache stopped"); }
                let Some(snap) = snap_rx.borrow_and_update().clone() else { continue };
                snapshot = snap;
                have_snapshot = true;
                lost = lease_lost(&snapshot, &held, &attrs, snapshot.epoch == held_epoch);
                if lost.is_none() {
                    peers = usable_peers(&cfg, &snapshot, &held, &attrs, &mut report, &metrics);
                    if let Some(u) = &udp {
                        u.set_table(held.subnets.v4, &peers);
                    }
                    reconcile_once(&kernel, &cfg, &up, &devices, &held, &peers, &metrics).await;
                }
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
                        attrs = node_attrs(&devices);
                        let again = Some(held.subnets);
                        let got = acquire_until(&store, &cfg, &attrs, again, &metrics, &shutdown);
                        let Some(h) = got.await else { break 'main };
                        if h.subnets != held.subnets {
                            write_facts(&h)?;
                        }
                        held = h;
                        held_epoch = snapshot.epoch;
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
                check_config(&store, &cfg_text, &cfg_at, &metrics, &mut config_gone).await;
                match store.claims(&held.subnets).await {
                    Ok(claims) => {
                        let own = held.subnets.key();
                        report.update_claims(&own, &claims, attrs.node_id.as_deref(), &metrics);
                    }
                    Err(e) => tracing::debug!(error = %e, "reading claims on our lease failed"),
                }
            }
            () = tokio::time::sleep_until(renew_at.into()) => {
                match store.renew(&held).await {
                    Ok(exp) => {
                        held.expires = exp;
                        metrics.set_lease_expiry(exp);
                        tracing::info!(subnet = %held.subnets.key(), "lease renewed");
                        renew_at = Instant::now() + renew_delay(exp, margin);
                    }
                    Err(StoreError::LeaseLost { key, reason, taken }) => {
                        if config_present(&store).await {
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
                        metrics.set_error(&e.to_string());
                        renew_at = Instant::now() + Duration::from_secs(5);
                    }
                }
            }
        }
        let Some(loss) = lost else { continue };
        // Our lease is gone or someone else's now: say so, stop handing out its addresses,
        // get a lease again (the same subnet if it is free) and write the facts anew.
        let why = loss.why();
        tracing::error!(subnet = %held.subnets.key(), "our lease is no longer ours ({why}); re-acquiring");
        metrics.set_not_ready(&format!("no subnet lease: {why}"));
        // Taken: our last subnet is what the other node holds now, no proof of anything.
        let previous = match loss {
            Loss::Gone(_) => Some(held.subnets),
            Loss::Taken(_) => None,
        };
        match std::fs::remove_file(&opts.subnet_file) {
            Ok(()) => {
                tracing::warn!(file = %opts.subnet_file.display(), "subnet file removed until this node holds a lease again");
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(error = %e, file = %opts.subnet_file.display(), "removing the subnet file failed");
            }
        }
        let Some(h) = acquire_until(&store, &cfg, &attrs, previous, &metrics, &shutdown).await
        else {
            break 'main;
        };
        held = h;
        held_epoch = snapshot.epoch;
        metrics.set_lease_expiry(held.expires);
        write_facts(&held)?;
        tracing::info!(subnet = %held.subnets.key(), file = %opts.subnet_file.display(), "subnet file written");
        renew_at = Instant::now() + renew_delay(held.expires, margin);
        if opts.ip_masq
            && let Err(e) = masq::nft_batch(&masq::render(&masq_spec(&cfg, &held.subnets))).await
        {
            tracing::warn!(error = %e, "reinstalling the masquerade rules failed");
            metrics.set_error(&e.to_string());
        }
        peers = usable_peers(&cfg, &snapshot, &held, &attrs, &mut report, &metrics);
        if let Some(u) = &udp {
            u.set_table(held.subnets.v4, &peers);
        }
        reconcile_once(&kernel, &cfg, &up, &devices, &held, &peers, &metrics).await;
    }
    cache.abort();
    proxy_start.abort();
    if let Some(s) = services {
        s.abort();
    }
    stop(servers)
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
    fn renew_margin_must_be_shorter_than_the_lease() {
        for bad in ["1440", "5000", "0"] {
            let err = Options::try_parse_from(["twilld", "--subnet-lease-renew-margin", bad])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(bad) && err.contains("1..=1439"),
                "{bad}: {err}"
            );
        }
        let ok =
            Options::try_parse_from(["twilld", "--subnet-lease-renew-margin", "1439"]).unwrap();
        assert_eq!(ok.subnet_lease_renew_margin, 1439);
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
