//! The sockets: UDP and TCP on every `--dns-listen` address, answers from the current zone,
//! other names forwarded to the upstreams.
//!
//! Why this shape:
//! - The sockets are bound with `IP_FREEBIND`: the typical address, the pod bridge's gateway,
//!   appears only with the node's first pod (the CNI plugin creates the bridge), and twilld
//!   starts before that. Bound early, the server answers as soon as the address exists, and a
//!   port already taken still fails twilld's start with the address in the error.
//! - A query answered from memory is answered on the receiving task, without a spawn or a lock
//!   (the zone is an `ArcSwap`); two tasks receive on each UDP socket, so one busy sending
//!   never leaves the socket unread.
//! - A forwarded query goes on a task of its own, over a fresh socket per query and per
//!   upstream (the kernel picks the source port, so answers cannot be confused or spoofed by
//!   port guessing), bounded in number ([`MAX_FORWARDS`]) and in time (each upstream in turn,
//!   [`DnsConfig::upstream_timeout`] each). An upstream reply is relayed as it came; none is a
//!   SERVFAIL. A forwarded TCP query goes to the upstreams over TCP.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt, socket,
    sockopt,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::dns::DnsMetrics;
use crate::dns::answer::{EDNS_UDP_SIZE, Outcome, Reply, answer, servfail};
use crate::dns::config::DnsConfig;
use crate::dns::zone::Zone;

/// Forwarded queries in flight at most; beyond, a query gets SERVFAIL at once.
pub const MAX_FORWARDS: usize = 1024;
/// TCP connections served at once at most; beyond, new ones wait in the backlog.
pub const MAX_TCP: usize = 256;
/// A TCP connection idle this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Binding a listen address failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} for DNS on {proto} {addr}: {source}")]
pub struct BindError {
    /// The call that failed.
    pub op: &'static str,
    /// `udp` or `tcp`.
    pub proto: &'static str,
    /// The address.
    pub addr: SocketAddr,
    /// The errno.
    #[source]
    pub source: std::io::Error,
}

/// The sockets of every listen address.
#[derive(Debug)]
pub struct Sockets {
    udp: Vec<Arc<UdpSocket>>,
    tcp: Vec<TcpListener>,
}

impl Sockets {
    /// Binds UDP and TCP on every address of `listen` (with `IP_FREEBIND`). Needs a tokio
    /// runtime.
    pub fn bind(addrs: &[SocketAddr]) -> Result<Sockets, BindError> {
        let mut out = Sockets {
            udp: Vec::new(),
            tcp: Vec::new(),
        };
        for &addr in addrs {
            let failed = |op, proto| {
                move |source| BindError {
                    op,
                    proto,
                    addr,
                    source,
                }
            };
            let fd = freebind(addr, SockType::Datagram, "udp")?;
            let sock = UdpSocket::from_std(std::net::UdpSocket::from(fd))
                .map_err(failed("register", "udp"))?;
            out.udp.push(Arc::new(sock));
            let fd = freebind(addr, SockType::Stream, "tcp")?;
            listen(&fd, Backlog::MAXCONN)
                .map_err(std::io::Error::from)
                .map_err(failed("listen", "tcp"))?;
            let l = TcpListener::from_std(std::net::TcpListener::from(fd))
                .map_err(failed("register", "tcp"))?;
            out.tcp.push(l);
        }
        Ok(out)
    }

    /// The bound UDP addresses (the ports chosen for port 0, in tests).
    pub fn udp_addrs(&self) -> Vec<SocketAddr> {
        self.udp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }
}

fn freebind(addr: SocketAddr, ty: SockType, proto: &'static str) -> Result<OwnedFd, BindError> {
    let err = |op| {
        move |e: nix::Error| BindError {
            op,
            proto,
            addr,
            source: e.into(),
        }
    };
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(
        family,
        ty,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(err("socket"))?;
    setsockopt(&fd, sockopt::IpFreebind, &true).map_err(err("setsockopt(IP_FREEBIND)"))?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(err("setsockopt(IPV6_V6ONLY)"))?;
    }
    if ty == SockType::Stream {
        setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(err("setsockopt(SO_REUSEADDR)"))?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(err("bind"))?;
    Ok(fd)
}

/// What every serving task shares.
struct Shared {
    zone: Arc<ArcSwap<Zone>>,
    config: DnsConfig,
    metrics: Arc<DnsMetrics>,
    forwards: Semaphore,
    tcp_conns: Arc<Semaphore>,
    turn: AtomicUsize,
}

/// Serves `sockets` from `zone` until the task is aborted.
pub async fn serve(
    sockets: Sockets,
    zone: Arc<ArcSwap<Zone>>,
    config: DnsConfig,
    metrics: Arc<DnsMetrics>,
) {
    let shared = Arc::new(Shared {
        zone,
        config,
        metrics,
        forwards: Semaphore::new(MAX_FORWARDS),
        tcp_conns: Arc::new(Semaphore::new(MAX_TCP)),
        turn: AtomicUsize::new(0),
    });
    let mut tasks = JoinSet::new();
    for sock in sockets.udp {
        for _ in 0..2 {
            tasks.spawn(serve_udp(sock.clone(), shared.clone()));
        }
    }
    for l in sockets.tcp {
        tasks.spawn(serve_tcp(l, shared.clone()));
    }
    while tasks.join_next().await.is_some() {}
}

async fn serve_udp(sock: Arc<UdpSocket>, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "dns: udp receive failed");
                continue;
            }
        };
        let query = &buf[..n];
        let turn = shared.turn.fetch_add(1, Ordering::Relaxed);
        let reply = answer(
            &shared.zone.load(),
            query,
            shared.config.ttl,
            Some(usize::from(EDNS_UDP_SIZE)),
            turn,
        );
        match reply {
            Reply::Send(bytes, outcome) => {
                shared.metrics.count(outcome);
                let _ = sock.send_to(&bytes, peer).await;
            }
            Reply::Forward => {
                let query = query.to_vec();
                let (sock, shared) = (sock.clone(), shared.clone());
                tokio::spawn(async move {
                    if let Some(reply) = shared.forward(&query, false).await {
                        let _ = sock.send_to(&reply, peer).await;
                    }
                });
            }
            Reply::Drop => {}
        }
    }
}

async fn serve_tcp(l: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok(permit) = shared.tcp_conns.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = match l.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "dns: tcp accept failed");
                // EMFILE and the like: give the node a moment rather than spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = shared.serve_conn(stream).await;
        });
    }
}

impl Shared {
    /// Answers the length-prefixed queries of one TCP connection until it closes or idles.
    async fn serve_conn(&self, mut stream: TcpStream) -> std::io::Result<()> {
        loop {
            let Ok(len) = tokio::time::timeout(TCP_IDLE, stream.read_u16()).await else {
                return Ok(());
            };
            let mut query = vec![0u8; usize::from(len?)];
            tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query))
                .await
                .map_err(|_| std::io::ErrorKind::TimedOut)??;
            let turn = self.turn.fetch_add(1, Ordering::Relaxed);
            let reply = match answer(&self.zone.load(), &query, self.config.ttl, None, turn) {
                Reply::Send(bytes, outcome) => {
                    self.metrics.count(outcome);
                    Some(bytes)
                }
                Reply::Forward => self.forward(&query, true).await,
                Reply::Drop => None,
            };
            let Some(reply) = reply else {
                return Ok(());
            };
            let Ok(len) = u16::try_from(reply.len()) else {
                return Ok(());
            };
            let mut out = Vec::with_capacity(reply.len() + 2);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&reply);
            stream.write_all(&out).await?;
        }
    }

    /// The upstreams' reply to `query`, else a SERVFAIL; counted.
    async fn forward(&self, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let Ok(_permit) = self.forwards.try_acquire() else {
            self.metrics.count(Outcome::Failed);
            return servfail(query);
        };
        for &up in &self.config.upstreams {
            let attempt = async {
                if tcp {
                    forward_tcp(up, query).await
                } else {
                    forward_udp(up, query).await
                }
            };
            match tokio::time::timeout(self.config.upstream_timeout, attempt).await {
                Ok(Ok(reply)) => {
                    self.metrics.count(Outcome::Forwarded);
                    return Some(reply);
                }
                Ok(Err(e)) => tracing::debug!(upstream = %up, error = %e, "dns: forwarding failed"),
                Err(_) => tracing::debug!(upstream = %up, "dns: upstream timed out"),
            }
        }
        self.metrics.count(Outcome::Failed);
        servfail(query)
    }
}

/// Sends `query` to `up` over UDP from a fresh socket; the first reply with the query's id.
async fn forward_udp(up: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = if up.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(up).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65_535];
    loop {
        let n = sock.recv(&mut buf).await?;
        if n >= 12 && buf[..2] == query[..2] && buf[2] & 0x80 != 0 {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

/// Sends `query` to `up` over TCP; its reply.
async fn forward_tcp(up: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(up).await?;
    let len = u16::try_from(query.len()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let mut out = Vec::with_capacity(query.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(query);
    s.write_all(&out).await?;
    let n = s.read_u16().await?;
    let mut reply = vec![0u8; usize::from(n)];
    s.read_exact(&mut reply).await?;
    Ok(reply)
}
