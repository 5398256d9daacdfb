//! The udp backend: flannel's `udp` wire format, carried by a user-space data path built to run
//! close to kernel VXLAN speed.
//!
//! flannel's udp backend exists for kernels without VXLAN and is "for debugging only" because it
//! moves one packet per syscall through a single thread. This one keeps flannel's framing and
//! device — so a flannel udp node and a twill udp node exchange traffic — and changes how the
//! bytes move:
//!
//! ```text
//!  pod ─ cni0 ─ routing ─ flannel0 (TUN, persistent, multi-queue, vnet hdr + TSO/USO)
//!                            │ read: 64 KiB super-packet        ▲ writev: coalesced super-packet
//!                      [core::encapsulate]                 [core::Gro]
//!                 headers cut, payload left in place            ▲ split by UDP_GRO size
//!                      [core::Batcher]                          │
//!               sendmmsg + UDP_SEGMENT, gathered          recvmmsg + UDP_GRO
//!                            ▼                                  │
//!                      UDP :8285 (one port, a SO_REUSEPORT socket per worker) ── underlay
//! ```
//!
//! - [`core`] does every per-packet decision and does no I/O (boringtun's shape): routing
//!   lookup, segmentation with correct TCP sequence numbers / IP ids / checksums, packing of
//!   packets into GSO sends, validation of datagrams from the wire, receive coalescing. It is
//!   unit-, property- and fuzz-tested (`agent/fuzz/fuzz_targets/udp_decap.rs`).
//! - [`tun`] and [`socket`] are the kernel edge; [`worker`] is the loop between them: per core, a
//!   TUN queue, a socket and one thread that carries both directions in turns, batches, no lock
//!   on the packet path.
//! - Where the bytes are copied: four times, all by the kernel (TUN read, UDP send, UDP receive,
//!   TUN write). User space reads each payload byte once more, for the TCP checksums (computed
//!   per packet when cutting, verified before coalescing), and writes none: a send gathers the
//!   packet headers written by the core and the payload slices of the TUN read, a TUN write
//!   gathers a rewritten head and the received payloads.
//! - Which worker gets a flow: the socket group's BPF program hashes the inner flow into one of
//!   32 buckets and a table names the bucket's worker; the TUN sends a flow's packets to the
//!   queue its replies were last written on, so both directions follow. A thread per node
//!   (`udp-steer`) rewrites the table every 500 ms when two heavy flows share a worker
//!   ([`core::rebalance`]).
//! - The routing table (peer subnet → `PublicIP:Port`, built from lease snapshots) is swapped
//!   whole with `arc-swap`; workers load it once per batch. A lease that goes away is gone from
//!   the next batch on.
//! - The device's address (`<subnet>.0/32`, as flannel does today) and the route of the whole
//!   cluster Network into it are ordinary overlay state: [`Udp`], this backend's side of the
//!   overlay's [`Backend`] trait, names the device and the route, and the overlay reconciler
//!   programs and heals them like any backend's entries.
//!
//! Minimum kernel: 4.18 for UDP GSO, 5.0 for UDP GRO (the socket works without it, one datagram
//! per receive), 6.2 for USO on the TUN (without it the kernel segments UDP itself).
//! IPv4 only, as flannel's udp backend.

pub mod core;
pub mod edge;
pub mod socket;
pub mod tun;
pub mod worker;

use std::io;
use std::net::SocketAddrV4;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use arc_swap::ArcSwap;
use ipnet::{IpNet, Ipv4Net};

use crate::overlay::backend::{Backend, DeviceSpec, PeerFamily};
use crate::overlay::config::NetworkConfig;
use crate::overlay::kernel::{Kernel, KernelError, PROTO_TWILL, Route};
use crate::overlay::lease::Lease;
use crate::overlay::{Desired, Device, Devices, Uplink};
use crate::shared::metrics::UdpCounts;

use self::core::{DropReason, OVERHEAD, RouteTable};
use self::socket::UdpSocket;
use self::tun::{Offloads, TunQueue};
use self::worker::{Shared, Stats};

/// The TUN device's name (flannel's).
pub const TUN_NAME: &str = "flannel0";
/// At most this many workers, whatever the core count.
const MAX_WORKERS: usize = 8;
const _: () = assert!(
    MAX_WORKERS <= socket::MAX_STEERED,
    "the steering table names every worker"
);

/// Errors of the udp backend.
#[derive(Debug, thiserror::Error)]
pub enum UdpError {
    /// A system call failed.
    #[error("{call} {object}: {source}")]
    Syscall {
        /// The call (`ioctl TUNSETIFF`, `bind`, ...).
        call: &'static str,
        /// What it was about (device name, address).
        object: String,
        /// The error, errno kept.
        #[source]
        source: io::Error,
    },
    /// A netlink operation through the kernel seam failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The configuration cannot be served by this backend.
    #[error("{0}")]
    Config(String),
}

/// What the backend is started with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// TUN device name.
    pub name: String,
    /// The TUN's MTU (the overlay MTU).
    pub mtu: u32,
    /// The largest inner packet the underlay carries (uplink MTU − 28).
    pub max_packet: usize,
    /// Where the port is bound: public IPv4 address and `Backend.Port`.
    pub bind: SocketAddrV4,
    /// Worker count (TUN queues, sockets; two threads each).
    pub workers: usize,
}

impl Spec {
    /// The spec for a config, an uplink and the overlay MTU: one worker per core (at most 8).
    pub fn new(cfg: &NetworkConfig, up: &Uplink, mtu: u32) -> Result<Spec, UdpError> {
        let ip = up.public_v4.ok_or_else(|| {
            UdpError::Config(format!(
                "the udp backend needs an IPv4 public address, and {} has none",
                up.name
            ))
        })?;
        let max = usize::try_from(up.mtu).unwrap_or(usize::MAX);
        Ok(Spec {
            name: TUN_NAME.to_string(),
            mtu,
            max_packet: max.saturating_sub(OVERHEAD),
            bind: SocketAddrV4::new(ip, cfg.backend.port),
            workers: std::thread::available_parallelism()
                .map_or(1, NonZeroUsize::get)
                .min(MAX_WORKERS),
        })
    }
}

/// Checks a network config against what this backend carries: IPv4 only, as flannel's.
pub fn check_config(cfg: &NetworkConfig) -> Result<(), UdpError> {
    if cfg.enable_ipv6 || !cfg.enable_ipv4 {
        return Err(UdpError::Config(
            "Backend.Type \"udp\" carries IPv4 only (as flannel's): set EnableIPv4 true and \
             EnableIPv6 false, or use vxlan for IPv6"
                .to_string(),
        ));
    }
    Ok(())
}

/// Checks the agent's service proxy against this backend: the eBPF dataplane (`ebpf`) is refused.
///
/// Its tc programs parse Ethernet frames, and `flannel0` is an L3 TUN device whose packets start
/// at the IP header: attached there, they would see no IPv4 or IPv6 packet at all, and replies of
/// NodePort flows SNATed to a backend on another node (they come back through `flannel0`) would
/// reach the node's stack untranslated and be reset. Refused at start, before anything is
/// created, rather than half-working.
pub fn check_proxy_mode(ebpf: bool) -> Result<(), UdpError> {
    if ebpf {
        return Err(UdpError::Config(
            "--proxy-mode ebpf does not work with Backend.Type \"udp\" yet: its tc programs \
             parse Ethernet frames and the udp backend's flannel0 is an L3 TUN device without \
             one, so NodePort replies from backends on other nodes would not be translated; use \
             Backend.Type vxlan or host-gw with --proxy-mode ebpf, or --proxy-mode none"
                .to_string(),
        ));
    }
    Ok(())
}

/// The udp backend as the overlay loop sees it: its TUN device, and one route of the whole
/// cluster Network into it (the data path picks the peer from its own routing table, so no
/// kernel entry is per peer). flannel publishes no `BackendData` for udp, nor does twill.
#[derive(Debug, Clone, Copy)]
pub struct Udp;

impl Backend for Udp {
    fn overhead(&self, _cfg: &NetworkConfig) -> u32 {
        u32::try_from(OVERHEAD).expect("28 bytes")
    }

    fn devices(&self, _cfg: &NetworkConfig, _up: &Uplink, mtu: u32) -> Vec<(bool, DeviceSpec)> {
        // Made by [`UdpBackend::start`] (it needs the queues' descriptors); the apply only finds
        // it and keeps it up at the overlay MTU.
        vec![(
            false,
            DeviceSpec::Tun {
                name: TUN_NAME.to_string(),
                mtu,
            },
        )]
    }

    fn lease_data(&self, _cfg: &NetworkConfig, _dev: &Device) -> Option<serde_json::Value> {
        None
    }

    fn node_entries(&self, d: &mut Desired, cfg: &NetworkConfig, devices: &Devices) {
        if let (Some(dev), Some(net)) = (&devices.v4, cfg.network) {
            d.routes.insert(Route {
                dst: IpNet::V4(net),
                gateway: None,
                oif: dev.index,
                onlink: false,
                proto: PROTO_TWILL,
            });
        }
    }

    fn peer_entries(&self, _d: &mut Desired, _c: &NetworkConfig, _u: &Uplink, _p: &PeerFamily<'_>) {
    }
}

/// Threads of one generation of the data path.
struct Running {
    shared: Arc<Shared>,
    _wake: OwnedFd,
    threads: Vec<JoinHandle<()>>,
}

impl Running {
    fn stop(self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let one: u64 = 1;
        // SAFETY: an eventfd write of 8 bytes from a live u64.
        let _ = unsafe { libc::write(self.shared.wake, (&raw const one).cast(), 8) };
        for t in self.threads {
            let _ = t.join();
        }
    }

    fn healthy(&self) -> bool {
        !self.shared.broken.load(Ordering::Relaxed)
            && !self.threads.iter().any(JoinHandle::is_finished)
    }
}

/// The running udp backend: the TUN device's queues, the port's sockets, the worker threads and
/// the routing table they read.
pub struct UdpBackend {
    spec: Spec,
    table: Arc<ArcSwap<RouteTable>>,
    stats: Arc<[Stats]>,
    running: Option<Running>,
    offloads: Offloads,
    gro: bool,
}

impl std::fmt::Debug for UdpBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpBackend")
            .field("spec", &self.spec)
            .field("peers", &self.table.load().len())
            .field("offloads", &self.offloads)
            .field("gro", &self.gro)
            .finish_non_exhaustive()
    }
}

/// Opens `spec.workers` queues of the device, creating it (persistent) if needed. A device of
/// that name that cannot take our queues (another kind, or a TUN without multi-queue, such as
/// flannel's) is deleted and made anew.
async fn open_queues<K: Kernel>(k: &K, spec: &Spec) -> Result<(Vec<TunQueue>, Offloads), UdpError> {
    let first = match TunQueue::open(&spec.name) {
        Ok(q) => q,
        Err(UdpError::Syscall { source, .. })
            if matches!(source.raw_os_error(), Some(libc::EINVAL | libc::EBUSY)) =>
        {
            let links = k.links().await?;
            let Some(old) = links.iter().find(|l| l.name == spec.name) else {
                return Err(UdpError::Syscall {
                    call: "ioctl TUNSETIFF",
                    object: spec.name.clone(),
                    source,
                });
            };
            tracing::warn!(device = %spec.name, error = %source, "existing device cannot take twill's TUN queues; recreating it");
            k.delete_link(old.index).await?;
            TunQueue::open(&spec.name)?
        }
        Err(e) => return Err(e),
    };
    first.set_persist(&spec.name)?;
    let offloads = first.set_offloads();
    let mut queues = vec![first];
    for _ in 1..spec.workers {
        queues.push(TunQueue::open(&spec.name)?);
    }
    Ok((queues, offloads))
}

impl UdpBackend {
    /// Opens (or re-attaches to) the TUN device, binds the port and starts the workers with an
    /// empty routing table (everything is dropped as `no_route`/`unknown_peer` until
    /// [`UdpBackend::set_table`]).
    pub async fn start<K: Kernel>(k: &K, spec: Spec) -> Result<UdpBackend, UdpError> {
        let mut b = UdpBackend {
            stats: (0..spec.workers).map(|_| Stats::default()).collect(),
            spec,
            table: Arc::new(ArcSwap::from_pointee(RouteTable::default())),
            running: None,
            offloads: Offloads::default(),
            gro: false,
        };
        b.launch(k).await?;
        tracing::info!(
            device = %b.spec.name,
            port = %b.spec.bind,
            workers = b.spec.workers,
            tso = b.offloads.tso,
            uso = b.offloads.uso,
            udp_gro = b.gro,
            "udp backend data path running"
        );
        Ok(b)
    }

    async fn launch<K: Kernel>(&mut self, k: &K) -> Result<(), UdpError> {
        let (queues, offloads) = open_queues(k, &self.spec).await?;
        let socks = (0..self.spec.workers)
            .map(|_| UdpSocket::bind(self.spec.bind).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        self.offloads = offloads;
        self.gro = socks.iter().all(|s| s.gro());
        let mut steered = false;
        if socks.len() > 1 {
            match socks[0].steer(&core::default_table(socks.len())) {
                Ok(()) => steered = true,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot steer datagrams by inner flow; a peer's traffic stays on one worker");
                }
            }
        }
        // SAFETY: plain eventfd(2); the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(UdpError::Syscall {
                call: "eventfd",
                object: "udp workers".into(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: a fresh descriptor we own.
        let wake = unsafe { OwnedFd::from_raw_fd(raw) };
        let shared = Arc::new(Shared {
            table: self.table.clone(),
            stop: AtomicBool::new(false),
            wake: wake.as_raw_fd(),
            broken: AtomicBool::new(false),
            max_packet: self.spec.max_packet,
        });
        let mut threads = Vec::new();
        let mut spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.clone())
                .spawn(f)
                .map(|t| threads.push(t))
                .map_err(|source| UdpError::Syscall {
                    call: "spawn thread",
                    object: name,
                    source,
                })
        };
        let mut spawned = Ok(());
        if steered {
            let (sh, sock, stats) = (shared.clone(), socks[0].clone(), self.stats.clone());
            spawned = spawn(
                "udp-steer".into(),
                Box::new(move || worker::balance(&sh, &sock, &stats)),
            );
        }
        for (i, (tun, sock)) in queues.into_iter().zip(socks).enumerate() {
            if spawned.is_err() {
                break;
            }
            let (sh, stats) = (shared.clone(), self.stats.clone());
            spawned = spawn(
                format!("udp-{i}"),
                Box::new(move || worker::run(&sh, &tun, &sock, &stats[i])),
            );
        }
        if let Err(e) = spawned {
            Running {
                shared,
                _wake: wake,
                threads,
            }
            .stop();
            return Err(e);
        }
        self.running = Some(Running {
            shared,
            _wake: wake,
            threads,
        });
        Ok(())
    }

    /// Swaps in the routing table for this node's subnet `own` and a lease snapshot. The data
    /// path picks it up at its next batch; nothing stops.
    pub fn set_table(&self, own: Option<Ipv4Net>, leases: &[Lease]) {
        let t = RouteTable::from_leases(own, self.spec.bind.port(), leases);
        if *self.table.load_full() != t {
            tracing::info!(peers = t.len(), "udp routing table updated");
            self.table.store(Arc::new(t));
        }
    }

    /// The routing table in use.
    pub fn table(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// The offloads the TUN accepted, and whether the sockets have UDP GRO.
    pub fn offloads(&self) -> (Offloads, bool) {
        (self.offloads, self.gro)
    }

    /// Heals the data path: when the device was deleted under us (a queue detached) or a worker
    /// ended, stops the workers and starts them again on a new device. Whether it did.
    pub async fn heal<K: Kernel>(&mut self, k: &K) -> Result<bool, UdpError> {
        let present = k.links().await?.iter().any(|l| l.name == self.spec.name);
        if present && self.running.as_ref().is_some_and(Running::healthy) {
            return Ok(false);
        }
        tracing::warn!(device = %self.spec.name, present, "udp data path broken; restarting it");
        if let Some(r) = self.running.take() {
            r.stop();
        }
        self.launch(k).await?;
        Ok(true)
    }

    /// The data path's counters, for `/metrics`.
    pub fn counts(&self) -> UdpCounts {
        counts(&self.table, &self.stats)
    }

    /// A closure reading the counters at scrape time (they outlive restarts of the data path).
    pub fn counts_fn(&self) -> crate::shared::metrics::UdpCountsFn {
        let (table, stats) = (self.table.clone(), self.stats.clone());
        Box::new(move || counts(&table, &stats))
    }
}

fn counts(table: &ArcSwap<RouteTable>, stats: &[Stats]) -> UdpCounts {
    let t = worker::sum(stats);
    UdpCounts {
        peers: table.load().len() as u64,
        tx_packets: t.tx_packets,
        tx_bytes: t.tx_bytes,
        rx_packets: t.rx_packets,
        rx_bytes: t.rx_bytes,
        tun_reads: t.tun_reads,
        tun_writes: t.tun_writes,
        drops: DropReason::ALL
            .iter()
            .map(|r| (r.as_str(), t.drops[r.index()]))
            .collect(),
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::tests::udp_uplink;

    const CFG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;

    #[test]
    fn spec_and_config_checks() {
        let cfg = NetworkConfig::parse(CFG).unwrap();
        let spec = Spec::new(&cfg, &udp_uplink(), 1472).unwrap();
        assert_eq!(spec.name, "flannel0");
        assert_eq!(spec.mtu, 1472);
        assert_eq!(spec.max_packet, 1472);
        assert_eq!(spec.bind.to_string(), "198.18.0.11:8285");
        assert!(spec.workers >= 1);
        assert!(check_config(&cfg).is_ok());
        let dual = NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd74:10::/56","Backend":{"Type":"udp","Port":9999}}"#,
        )
        .unwrap();
        let err = check_config(&dual).unwrap_err().to_string();
        assert!(
            err.contains("IPv4 only") && err.contains("EnableIPv6"),
            "{err}"
        );
        let mut up = udp_uplink();
        up.public_v4 = None;
        assert!(Spec::new(&cfg, &up, 1472).is_err());
        assert!(check_proxy_mode(false).is_ok());
        let err = check_proxy_mode(true).unwrap_err().to_string();
        assert!(
            err.contains("--proxy-mode ebpf") && err.contains("L3 TUN"),
            "{err}"
        );
    }
}
