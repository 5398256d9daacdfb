//! The data path's threads: one per worker, moving packets both ways between its TUN queue and
//! its socket.
//!
//! One thread carries both directions because a flow's two directions meet on one worker (the
//! TUN sends a flow's packets to the queue its replies were last written on, and the socket group
//! steers by a symmetric hash of the inner flow): the thread that writes a train of TCP data to
//! the TUN finds the ACKs it provoked waiting on the same queue at its next turn, without a
//! wake-up of another thread. Wake-ups are what a data path on few cores pays most for (a
//! cross-CPU wake-up is an IPI, and in a VM an exit), so the loop drains both sides in turns and
//! sleeps in `poll` only when neither has anything.
//!
//! Each thread owns its queue end and its buffers, reads the routing table with one atomic load
//! per turn (`arc-swap`: no lock, and a table swapped in by the control plane is picked up at
//! the next turn), and adds its counts to its own cache-line-aligned counters once per turn.
//!
//! Transmit: super-packets read from the TUN are cut by the core into a train of headers (in a
//! small arena) and payload slices (left in the read buffer); one `sendmmsg` gathers them, so the
//! payload is copied once, by the kernel. A turn stops reading at [`TX_BATCH`] packets or
//! [`TX_BYTES`] bytes, which keeps the buffers a turn touches within the core's L2 cache.
//! Receive: one `recvmmsg` of GRO trains, coalesced by the core into super-packets, one `writev`
//! each.
//!
//! Measured and left out (2-core VM, pod-to-pod iperf3 through two agents; see the bench's CPU
//! cost per GB): spinning before `poll` (50 empty turns) cost more CPU per GB than the wake-ups
//! it saves, with sender, receiver and agents sharing the cores; pinning a node's worker to a
//! core changed nothing measurable; `MSG_ZEROCOPY` on the socket saved no CPU on the UDP leg
//! alone (64 KiB GSO sends between two rig nodes: 0.38–0.43 against 0.34–0.47 CPU-s/GB, at a
//! lower rate): on a veth underlay the kernel copies zero-copy frags before a local socket sees
//! them, so the copy only moves, and the TUN buffers would have to wait for completions; one
//! worker per node instead of one per core made no difference for one flow and puts every flow
//! on one core; a thread per direction (two per worker) carried one flow no faster and two
//! flows slower, at 10–30 % more CPU per GB.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::ArcSwap;

use super::core::{
    Batcher, DropReason, Encap, Flow, Gro, RouteTable, STEER_BUCKETS, VNET_HDR_LEN, bucket,
    decapsulate, default_table, encapsulate, flow_of, rebalance, split_datagrams,
};
use super::edge::{Receive, SocketRx, SocketTx, Transmit, Tun};
use super::socket::{OutMsg, Receiver, Sender, UdpSocket};
use super::tun::TunQueue;

/// At most this many TUN reads per turn (small packets: ACKs, requests).
const TX_BATCH: usize = 32;
/// ... or this many bytes read per turn (super-packets: three of 64 KiB).
const TX_BYTES: usize = 192 * 1024;
/// `recvmmsg` buffers per turn (each up to 64 KiB).
const RX_BATCH: usize = 8;
/// Bytes for the packet headers of one turn's trains (a 64 KiB super-packet cut for a 1500-byte
/// underlay needs 45 × 52 bytes; one cut into 48-byte segments ~140 KiB).
const ARENA: usize = 256 * 1024;
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
    /// Bytes carried (both ways) per steering bucket, for rebalancing.
    pub buckets: [AtomicU64; STEER_BUCKETS],
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
    buckets: [u64; STEER_BUCKETS],
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
        for (c, v) in s.buckets.iter().zip(self.buckets) {
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

/// Waits until one of `fds` is readable (true) or stop is asked (false).
fn wait_readable(fds: &[RawFd; 2], shared: &Shared) -> bool {
    let poll = |fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut p = [poll(fds[0]), poll(fds[1]), poll(shared.wake)];
    loop {
        // SAFETY: three valid pollfds.
        let r = unsafe { libc::poll(p.as_mut_ptr(), 3, -1) };
        if r >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break;
        }
    }
    p[2].revents == 0 && !shared.stop.load(Ordering::Relaxed)
}

fn device_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EBADFD | libc::ENODEV))
}

/// Where the bytes of one gathered slice are.
#[derive(Debug, Clone, Copy)]
struct Piece {
    /// `Some(i)`: in read buffer `i`; `None`: in the header arena.
    input: Option<usize>,
    off: usize,
    len: usize,
}

/// The transmit side's buffers.
struct Tx<S> {
    sender: S,
    inputs: Vec<Box<[u8]>>,
    arena: Box<[u8]>,
    /// Bytes of the arena in use.
    used: usize,
    /// The slices of the turn's packets, in order.
    pieces: Vec<Piece>,
    /// Where each packet's slices start in `pieces`.
    starts: Vec<usize>,
    /// The turn's packets packed into sends.
    batch: Batcher,
    msgs: Vec<OutMsg>,
}

impl<S: Transmit> Tx<S> {
    fn new(sender: S) -> Tx<S> {
        Tx {
            sender,
            inputs: (0..TX_BATCH)
                .map(|_| vec![0u8; TUN_BUF].into_boxed_slice())
                .collect(),
            arena: vec![0u8; ARENA].into_boxed_slice(),
            used: 0,
            pieces: Vec::with_capacity(TX_BATCH * 2),
            starts: Vec::with_capacity(TX_BATCH * 2),
            batch: Batcher::new(),
            msgs: Vec::with_capacity(TX_BATCH * 2),
        }
    }

    /// Queues one packet of `flow`: its slices (header and payload, or the whole packet) for
    /// `dst`.
    fn packet(&mut self, dst: std::net::SocketAddrV4, flow: Flow, slices: &[Piece]) {
        self.starts.push(self.pieces.len());
        self.pieces.extend_from_slice(slices);
        self.batch
            .push(dst, flow, slices.iter().map(|p| p.len).sum());
    }

    /// Sends everything queued (one `sendmmsg`, more if the kernel takes fewer) and frees the
    /// arena.
    fn flush(&mut self, local: &mut Local) {
        if self.batch.packets() > 0 {
            let (inputs, arena) = (&self.inputs, &self.arena);
            let slices = self.pieces.iter().map(|p| {
                let buf: &[u8] = match p.input {
                    Some(i) => &inputs[i],
                    None => arena,
                };
                &buf[p.off..p.off + p.len]
            });
            let end = |i: usize| self.starts.get(i).copied().unwrap_or(self.pieces.len());
            self.msgs.clear();
            self.msgs.extend(self.batch.sends().iter().map(|s| OutMsg {
                dst: s.dst,
                iov: end(s.first)..end(s.first + s.count),
                gso: s.gso(),
            }));
            let sends = self.batch.sends();
            self.sender.send(&self.msgs, slices, |i, r| {
                let s = &sends[i];
                match r {
                    Ok(()) => {
                        local.tx_packets += s.count as u64;
                        local.tx_bytes += s.bytes as u64;
                    }
                    Err(e) => {
                        let reason = match e.raw_os_error() {
                            Some(libc::EMSGSIZE | libc::EINVAL) => DropReason::TooBig,
                            _ => DropReason::SendError,
                        };
                        tracing::debug!(error = %e, dst = %s.dst, len = s.bytes, "send failed");
                        for _ in 0..s.count {
                            local.drop(reason);
                        }
                    }
                }
            });
        }
        self.batch.clear();
        self.pieces.clear();
        self.starts.clear();
        self.used = 0;
    }

    /// One turn: reads what the TUN queue has (up to a batch), encapsulates, sends. The number
    /// of packets read; `Err` when the queue is detached.
    fn turn(
        &mut self,
        shared: &Shared,
        table: &RouteTable,
        tun: &impl Tun,
        local: &mut Local,
    ) -> Result<usize, Detached> {
        let mut n = 0;
        let mut bytes = 0;
        while n < TX_BATCH && bytes < TX_BYTES {
            let len = match tun.read(&mut self.inputs[n]) {
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.flush(local);
                    if device_gone(&e) {
                        return Err(Detached);
                    }
                    tracing::warn!(error = %e, "TUN read failed");
                    local.drop(DropReason::TunError);
                    break;
                }
            };
            local.tun_reads += 1;
            bytes += len;
            self.encap(shared, table, n, len, local);
            n += 1;
        }
        self.flush(local);
        Ok(n)
    }

    /// Encapsulates read buffer `n` (`len` bytes) into queued sends.
    fn encap(
        &mut self,
        shared: &Shared,
        table: &RouteTable,
        n: usize,
        len: usize,
        local: &mut Local,
    ) {
        loop {
            let used = self.used;
            let out = &mut self.arena[used..];
            match encapsulate(table, shared.max_packet, &mut self.inputs[n][..len], out) {
                Encap::Packet {
                    dst,
                    flow,
                    start,
                    len,
                } => {
                    let whole = Piece {
                        input: Some(n),
                        off: start,
                        len,
                    };
                    local.buckets[bucket(flow)] += len as u64;
                    self.packet(dst, flow, &[whole]);
                }
                Encap::Segments(train) => {
                    for i in 0..train.count {
                        let (h, p) = train.packet(i);
                        let header = Piece {
                            input: None,
                            off: used + h.start,
                            len: h.len(),
                        };
                        let payload = Piece {
                            input: Some(n),
                            off: p.start,
                            len: p.len(),
                        };
                        let slices = [header, payload];
                        let k = if p.is_empty() { 1 } else { 2 };
                        self.packet(train.dst, train.flow, &slices[..k]);
                    }
                    self.used += train.headers_len();
                    local.buckets[bucket(train.flow)] +=
                        (train.headers_len() + train.payload_len) as u64;
                }
                Encap::NeedSpace(need) => {
                    if self.used > 0 && need <= ARENA {
                        // Send what is queued (buffer `n` is not part of it yet), then retry
                        // with the whole arena.
                        self.flush(local);
                        continue;
                    }
                    local.drop(DropReason::TooBig);
                }
                Encap::Drop(r) => local.drop(r),
            }
            return;
        }
    }
}

/// The TUN queue was detached (the device was deleted).
struct Detached;

/// The receive side's buffers.
struct Rx<R> {
    recv: R,
    /// The `iovec` array of TUN writes.
    iovs: Vec<libc::iovec>,
}

impl<R: Receive> Rx<R> {
    /// One turn: one `recvmmsg`, decapsulation, coalescing, a `writev` per super-packet. The
    /// number of receives; `Err` when the TUN queue is detached.
    fn turn(
        &mut self,
        table: &RouteTable,
        tun: &impl Tun,
        local: &mut Local,
    ) -> Result<usize, Detached> {
        let n = match self.recv.recv() {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "UDP receive failed");
                0
            }
        };
        if n == 0 {
            return Ok(0);
        }
        let mut gro = Gro::new();
        for i in 0..n {
            let (data, meta) = self.recv.get(i);
            let Some(src) = meta.src.filter(|_| !meta.truncated) else {
                local.drop(DropReason::Malformed);
                continue;
            };
            for d in split_datagrams(data, meta.gso) {
                local.rx_packets += 1;
                local.rx_bytes += d.len() as u64;
                match decapsulate(table, *src.ip(), d) {
                    Ok(ip) => {
                        local.buckets[bucket(flow_of(d, ip.ihl))] += d.len() as u64;
                        gro.push(d, &ip);
                    }
                    Err(r) => local.drop(r),
                }
            }
        }
        let mut gone = false;
        let iovs = &mut self.iovs;
        gro.for_each_write(|head, body| match tun.writev(head, body, iovs) {
            Ok(_) => local.tun_writes += 1,
            Err(e) => {
                gone |= device_gone(&e);
                tracing::debug!(error = %e, "TUN write failed");
                local.drop(DropReason::TunError);
            }
        });
        if gone { Err(Detached) } else { Ok(n) }
    }
}

/// Moves packets both ways between `tun` and `sock` until stopped or the device goes away.
pub fn run(shared: &Shared, tun: &TunQueue, sock: &UdpSocket, stats: &Stats) {
    let mut tx = Tx::new(SocketTx {
        sock,
        sender: Sender::default(),
    });
    let mut rx = Rx {
        recv: SocketRx {
            sock,
            receiver: Receiver::new(RX_BATCH),
        },
        iovs: Vec::new(),
    };
    let mut local = Local::default();
    loop {
        let table = shared.table.load();
        let sent = tx.turn(shared, &table, tun, &mut local);
        let got = match sent {
            Ok(_) => rx.turn(&table, tun, &mut local),
            Err(Detached) => Err(Detached),
        };
        local.flush(stats);
        // A table guard is for a turn, never for a sleep.
        drop(table);
        let (Ok(sent), Ok(got)) = (sent, got) else {
            tracing::warn!("TUN queue detached (device deleted?); stopping this worker");
            shared.broken.store(true, Ordering::Relaxed);
            return;
        };
        if sent == 0 && got == 0 && !wait_readable(&[tun.raw(), sock.raw()], shared) {
            return;
        }
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
    }
}

/// How often the steering table is reconsidered.
const REBALANCE_PERIOD_MS: i32 = 500;

/// Rebalances the steering table of the socket group `sock` belongs to, every
/// [`REBALANCE_PERIOD_MS`], from the bytes each bucket carried meanwhile
/// ([`rebalance`]), until stopped.
pub fn balance(shared: &Shared, sock: &UdpSocket, stats: &[Stats]) {
    let workers = stats.len();
    let mut table = default_table(workers);
    let mut last = bucket_bytes(stats);
    loop {
        let mut p = libc::pollfd {
            fd: shared.wake,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&raw mut p, 1, REBALANCE_PERIOD_MS) };
        if r > 0 || shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let now = bucket_bytes(stats);
        let load: [u64; STEER_BUCKETS] = std::array::from_fn(|b| now[b].saturating_sub(last[b]));
        last = now;
        let Some(next) = rebalance(&load, &table, workers) else {
            continue;
        };
        let moved: Vec<String> = (0..STEER_BUCKETS)
            .filter(|&b| next[b] != table[b])
            .map(|b| format!("{b}:{}→{} ({} KiB)", table[b], next[b], load[b] >> 10))
            .collect();
        match sock.steer(&next) {
            Ok(()) => {
                tracing::info!(moved = %moved.join(", "), "udp steering table rebalanced");
                table = next;
            }
            Err(e) => tracing::warn!(error = %e, "udp steering table not replaced"),
        }
    }
}

/// Bytes per steering bucket so far, over every worker.
pub fn bucket_bytes(stats: &[Stats]) -> [u64; STEER_BUCKETS] {
    let mut b = [0u64; STEER_BUCKETS];
    for s in stats {
        for (t, c) in b.iter_mut().zip(&s.buckets) {
            *t += c.load(Ordering::Relaxed);
        }
    }
    b
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

#[cfg(test)]
#[path = "worker_tests.rs"]
mod tests;
