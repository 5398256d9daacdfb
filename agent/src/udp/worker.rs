//! The data path's threads: per worker, one thread TUN → wire and one wire → TUN.
//!
//! Each thread owns its queue end and its buffers, reads the routing table with one atomic load
//! per batch (`arc-swap`: no lock, and a table swapped in by the control plane is picked up at
//! the next batch), drains what is ready (up to a batch), hands every packet to the core, then
//! makes one `sendmmsg` (or one `writev` per TUN packet), and adds its counts to its own
//! cache-line-aligned counters once per batch. Blocking happens in `poll` only, on the queue and
//! an eventfd that says "stop".

use std::io::{self, IoSlice};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::ArcSwap;

use super::core::{
    DropReason, Encap, Gro, RouteTable, VNET_HDR_LEN, decapsulate, encapsulate, gso_groups,
    split_datagrams,
};
use super::socket::{OutMsg, Receiver, Sender, UdpSocket};
use super::tun::TunQueue;

/// TUN reads per batch.
const TX_BATCH: usize = 32;
/// `recvmmsg` buffers per batch (each up to 64 KiB).
const RX_BATCH: usize = 16;
/// Bytes for the segments of one batch (worst case of one super-packet cut into 48-byte
/// segments is ~230 KiB).
const ARENA: usize = 512 * 1024;
/// One TUN read: the virtio-net header and a 64 KiB super-packet.
const TUN_BUF: usize = VNET_HDR_LEN + 65_536;

/// One thread's counters, on a cache line (pair) of their own.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Stats {
    /// Datagrams sent.
    pub tx_packets: AtomicU64,
    /// UDP payload bytes sent.
    pub tx_bytes: AtomicU64,
    /// Datagrams received.
    pub rx_packets: AtomicU64,
    /// UDP payload bytes received.
    pub rx_bytes: AtomicU64,
    /// Packets (super-packets included) read from the TUN.
    pub tun_reads: AtomicU64,
    /// Packets (super-packets included) written to the TUN.
    pub tun_writes: AtomicU64,
    /// Drops by [`DropReason::index`].
    pub drops: [AtomicU64; DropReason::ALL.len()],
}

/// Counts of one batch, added to [`Stats`] at its end.
#[derive(Debug, Default)]
struct Local {
    tx_packets: u64,
    tx_bytes: u64,
    rx_packets: u64,
    rx_bytes: u64,
    tun_reads: u64,
    tun_writes: u64,
    drops: [u64; DropReason::ALL.len()],
}

fn add(c: &AtomicU64, v: u64) {
    if v != 0 {
        c.fetch_add(v, Ordering::Relaxed);
    }
}

impl Local {
    fn drop(&mut self, r: DropReason) {
        self.drops[r.index()] += 1;
    }

    fn flush(&mut self, s: &Stats) {
        add(&s.tx_packets, self.tx_packets);
        add(&s.tx_bytes, self.tx_bytes);
        add(&s.rx_packets, self.rx_packets);
        add(&s.rx_bytes, self.rx_bytes);
        add(&s.tun_reads, self.tun_reads);
        add(&s.tun_writes, self.tun_writes);
        for (c, v) in s.drops.iter().zip(self.drops) {
            add(c, v);
        }
        *self = Local::default();
    }
}

/// What the threads share with the control plane.
#[derive(Debug)]
pub struct Shared {
    /// The routing table, swapped whole.
    pub table: Arc<ArcSwap<RouteTable>>,
    /// Set to stop the threads (with a write to `wake`).
    pub stop: AtomicBool,
    /// An eventfd every thread polls: readable means stop.
    pub wake: RawFd,
    /// Set by a thread whose TUN queue was detached (the device was deleted).
    pub broken: AtomicBool,
    /// The largest inner packet the underlay carries.
    pub max_packet: usize,
}

/// Waits until `fd` is readable (true) or stop is asked (false).
fn wait_readable(fd: RawFd, shared: &Shared) -> bool {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: shared.wake,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: two valid pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break;
        }
    }
    fds[1].revents == 0 && !shared.stop.load(Ordering::Relaxed)
}

fn device_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EBADFD | libc::ENODEV))
}

/// Where a pending send's bytes are.
#[derive(Debug, Clone, Copy)]
struct Pending {
    dst: std::net::SocketAddrV4,
    /// `Some(i)`: in input buffer `i`; `None`: in the arena.
    input: Option<usize>,
    off: usize,
    len: usize,
    gso: Option<u16>,
    /// Datagrams it makes.
    count: usize,
}

struct Tx<'a> {
    sock: &'a UdpSocket,
    sender: Sender,
    inputs: Vec<Box<[u8]>>,
    arena: Box<[u8]>,
    pending: Vec<Pending>,
    local: Local,
}

impl Tx<'_> {
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let msgs: Vec<OutMsg<'_>> = self
            .pending
            .iter()
            .map(|p| {
                let buf: &[u8] = match p.input {
                    Some(i) => &self.inputs[i],
                    None => &self.arena,
                };
                OutMsg {
                    dst: p.dst,
                    data: &buf[p.off..p.off + p.len],
                    gso: p.gso,
                }
            })
            .collect();
        let pending = &self.pending;
        let local = &mut self.local;
        self.sender.send(self.sock, &msgs, |i, r| {
            let p = pending[i];
            match r {
                Ok(()) => {
                    local.tx_packets += p.count as u64;
                    local.tx_bytes += p.len as u64;
                }
                Err(e) => {
                    let reason = match e.raw_os_error() {
                        Some(libc::EMSGSIZE | libc::EINVAL) => DropReason::TooBig,
                        _ => DropReason::SendError,
                    };
                    tracing::debug!(error = %e, dst = %p.dst, len = p.len, "send failed");
                    for _ in 0..p.count {
                        local.drop(reason);
                    }
                }
            }
        });
        self.pending.clear();
    }
}

/// TUN queue → peers, until stopped or the device goes away.
pub fn tx_loop(shared: &Shared, tun: &TunQueue, sock: &UdpSocket, stats: &Stats) {
    let mut tx = Tx {
        sock,
        sender: Sender::default(),
        inputs: (0..TX_BATCH)
            .map(|_| vec![0u8; TUN_BUF].into_boxed_slice())
            .collect(),
        arena: vec![0u8; ARENA].into_boxed_slice(),
        pending: Vec::with_capacity(TX_BATCH * 2),
        local: Local::default(),
    };
    loop {
        let table = shared.table.load();
        let mut used = 0;
        let mut n = 0;
        while n < TX_BATCH {
            let len = match tun.read(&mut tx.inputs[n]) {
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tx.flush();
                    tx.local.flush(stats);
                    if device_gone(&e) {
                        tracing::warn!(error = %e, "TUN queue detached (device deleted?); stopping this worker");
                        shared.broken.store(true, Ordering::Relaxed);
                        return;
                    }
                    tracing::warn!(error = %e, "TUN read failed");
                    tx.local.drop(DropReason::TunError);
                    break;
                }
            };
            tx.local.tun_reads += 1;
            loop {
                let out = &mut tx.arena[used..];
                match encapsulate(&table, shared.max_packet, &mut tx.inputs[n][..len], out) {
                    Encap::Packet { dst, start, len } => tx.pending.push(Pending {
                        dst,
                        input: Some(n),
                        off: start,
                        len,
                        gso: None,
                        count: 1,
                    }),
                    Encap::Segments { dst, seg, len, .. } => {
                        for (off, bytes) in gso_groups(seg, len) {
                            let count = bytes.div_ceil(seg);
                            tx.pending.push(Pending {
                                dst,
                                input: None,
                                off: used + off,
                                len: bytes,
                                gso: (count > 1)
                                    .then(|| u16::try_from(seg).expect("segments below 64 KiB")),
                                count,
                            });
                        }
                        used += len;
                    }
                    Encap::NeedSpace(need) => {
                        if used > 0 && need <= ARENA {
                            tx.flush();
                            used = 0;
                            continue;
                        }
                        tx.local.drop(DropReason::TooBig);
                    }
                    Encap::Drop(r) => tx.local.drop(r),
                }
                break;
            }
            n += 1;
        }
        tx.flush();
        tx.local.flush(stats);
        // A table guard is for a batch, never for a sleep.
        drop(table);
        if n == 0 && !wait_readable(tun.raw(), shared) {
            return;
        }
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
    }
}

/// Peers → TUN queue, until stopped or the device goes away.
pub fn rx_loop(shared: &Shared, tun: &TunQueue, sock: &UdpSocket, stats: &Stats) {
    let mut recv = Receiver::new(RX_BATCH);
    let mut local = Local::default();
    loop {
        let n = match recv.recv(sock) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "UDP receive failed");
                0
            }
        };
        if n == 0 {
            if !wait_readable(sock.raw(), shared) {
                return;
            }
            continue;
        }
        let table = shared.table.load();
        let mut gro = Gro::new();
        for i in 0..n {
            let (data, meta) = recv.get(i);
            let Some(src) = meta.src.filter(|_| !meta.truncated) else {
                local.drop(DropReason::Malformed);
                continue;
            };
            for d in split_datagrams(data, meta.gso) {
                local.rx_packets += 1;
                local.rx_bytes += d.len() as u64;
                match decapsulate(&table, *src.ip(), d) {
                    Ok(ip) => gro.push(d, &ip),
                    Err(r) => local.drop(r),
                }
            }
        }
        let mut gone = false;
        gro.for_each_write(|head, body| {
            let mut iov = Vec::with_capacity(body.len() + 1);
            iov.push(IoSlice::new(head));
            iov.extend(body.iter().map(|b| IoSlice::new(b)));
            match tun.writev(&iov) {
                Ok(_) => local.tun_writes += 1,
                Err(e) => {
                    gone |= device_gone(&e);
                    tracing::debug!(error = %e, "TUN write failed");
                    local.drop(DropReason::TunError);
                }
            }
        });
        local.flush(stats);
        if gone {
            tracing::warn!("TUN queue detached (device deleted?); stopping this worker");
            shared.broken.store(true, Ordering::Relaxed);
            return;
        }
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
    }
}

/// The counters of every thread, summed.
pub fn sum(stats: &[Stats]) -> Totals {
    let mut t = Totals::default();
    for s in stats {
        t.tx_packets += s.tx_packets.load(Ordering::Relaxed);
        t.tx_bytes += s.tx_bytes.load(Ordering::Relaxed);
        t.rx_packets += s.rx_packets.load(Ordering::Relaxed);
        t.rx_bytes += s.rx_bytes.load(Ordering::Relaxed);
        t.tun_reads += s.tun_reads.load(Ordering::Relaxed);
        t.tun_writes += s.tun_writes.load(Ordering::Relaxed);
        for (d, c) in t.drops.iter_mut().zip(&s.drops) {
            *d += c.load(Ordering::Relaxed);
        }
    }
    t
}

/// Summed counters (see [`Stats`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Datagrams sent.
    pub tx_packets: u64,
    /// UDP payload bytes sent.
    pub tx_bytes: u64,
    /// Datagrams received.
    pub rx_packets: u64,
    /// UDP payload bytes received.
    pub rx_bytes: u64,
    /// TUN reads.
    pub tun_reads: u64,
    /// TUN writes.
    pub tun_writes: u64,
    /// Drops by reason index.
    pub drops: [u64; DropReason::ALL.len()],
}
