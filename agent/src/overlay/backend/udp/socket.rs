//! The UDP edge: the port's socket(s), batched sends with UDP GSO, batched receives with UDP GRO.
//!
//! Each worker owns one socket of a `SO_REUSEPORT` group bound to the same `address:port`, so
//! there is still exactly one port on the wire (flannel's framing: datagrams from and to
//! `PublicIP:8285`) while no two threads ever contend for a socket. Which socket gets an incoming
//! datagram is decided by a small classic BPF program on the group
//! ([`UdpSocket::steer`]): a hash of the *inner* packet's addresses and ports, so
//! a peer's flows spread over the workers and each flow stays on one worker, in order.
//!
//! - Sends go out with `sendmmsg` (Linux ≥ 3.0), a batch per wake-up, each message carrying a
//!   `UDP_SEGMENT` control message when it is a train of equal-sized packets (UDP GSO,
//!   Linux ≥ 4.18): one message, one skb through the stack, one datagram per packet on the wire.
//! - Receives use `recvmmsg` and `UDP_GRO` (Linux ≥ 5.0): a train from one peer arrives as one
//!   buffer plus the segment size in a control message; over veth the sender's GSO skb is
//!   never even split.
//! - The socket's buffers are raised with `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` (root): bursts of
//!   64 KiB trains otherwise overflow the default receive buffer.

use std::io;
use std::mem::size_of;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::UdpError;
use super::core::SteerTable;

/// Socket buffer size asked for (bytes).
const SOCKET_BUFFER: libc::c_int = 8 << 20;
/// Bytes of one receive buffer: the largest GRO train.
pub const RECV_BUF: usize = 65_536;
/// Control-message space for one `u16`/`int` option, in `u64`s (alignment for `cmsghdr`).
const CTRL_WORDS: usize = 4;

/// One UDP socket of the port.
#[derive(Debug)]
pub struct UdpSocket {
    fd: OwnedFd,
    gro: bool,
}

fn setsockopt(fd: RawFd, level: libc::c_int, opt: libc::c_int, v: libc::c_int) -> io::Result<()> {
    // SAFETY: the option is an int, and `v` lives across the call.
    unsafe { setsockopt_value(fd, level, opt, &v) }
}

/// `setsockopt` with `v` (its size passed along).
///
/// # Safety
/// `v` is the type the option takes, and whatever it points to is alive across the call.
unsafe fn setsockopt_value<T>(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: &T,
) -> io::Result<()> {
    // SAFETY: `v` is a live `T` of the size given; the caller vouches for the rest.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            std::ptr::from_ref(v).cast(),
            libc::socklen_t::try_from(size_of::<T>()).expect("small"),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET fits"),
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn from_sockaddr(s: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr)),
        u16::from_be(s.sin_port),
    )
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "16 bytes; try_from is not const"
)]
const SOCKADDR_LEN: libc::socklen_t = size_of::<libc::sockaddr_in>() as libc::socklen_t;

impl UdpSocket {
    /// A socket of the port's `SO_REUSEPORT` group bound to `addr` (or to `0.0.0.0` and its port
    /// when `addr`'s address is not on this node, as with a NAT `--public-ip`), with large
    /// buffers and `UDP_GRO` where the kernel has it.
    pub fn bind(addr: SocketAddrV4) -> Result<UdpSocket, UdpError> {
        let what = addr.to_string();
        let err = |call: &'static str| UdpError::Syscall {
            call,
            object: what.clone(),
            source: io::Error::last_os_error(),
        };
        // SAFETY: plain socket(2); the result is checked.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(err("socket"));
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let opt = |level, name, v, call: &'static str| {
            setsockopt(fd.as_raw_fd(), level, name, v).map_err(|source| UdpError::Syscall {
                call,
                object: what.clone(),
                source,
            })
        };
        opt(
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            1,
            "setsockopt SO_REUSEPORT",
        )?;
        for (name, call) in [
            (libc::SO_RCVBUFFORCE, "setsockopt SO_RCVBUFFORCE"),
            (libc::SO_SNDBUFFORCE, "setsockopt SO_SNDBUFFORCE"),
        ] {
            if let Err(e) = opt(libc::SOL_SOCKET, name, SOCKET_BUFFER, call) {
                tracing::debug!(error = %e, "keeping the default socket buffer");
            }
        }
        let gro = setsockopt(fd.as_raw_fd(), libc::SOL_UDP, libc::UDP_GRO, 1).is_ok();
        let bind = |a: SocketAddrV4| {
            let sa = sockaddr(a);
            // SAFETY: a sockaddr_in of the length given.
            unsafe { libc::bind(fd.as_raw_fd(), (&raw const sa).cast(), SOCKADDR_LEN) }
        };
        if bind(addr) < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EADDRNOTAVAIL) {
                return Err(UdpError::Syscall {
                    call: "bind",
                    object: what,
                    source: e,
                });
            }
            let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, addr.port());
            tracing::info!(%addr, %any, "public address is not on this node; binding the port on every address");
            if bind(any) < 0 {
                return Err(err("bind"));
            }
        }
        Ok(UdpSocket { fd, gro })
    }

    /// Makes the kernel pick the socket of an incoming datagram in this socket's `SO_REUSEPORT`
    /// group by the *inner* packet's flow, through a steering table: the flow's
    /// [`steer_hash`](super::core::steer_hash) picks one of
    /// [`STEER_BUCKETS`](super::core::STEER_BUCKETS) buckets, `table`
    /// the socket (worker) of each bucket. A classic BPF program does it
    /// (`SO_ATTACH_REUSEPORT_CBPF`, Linux ≥ 4.5); attaching another table replaces it at once.
    ///
    /// flannel's framing has no entropy of its own: everything from one peer comes from the same
    /// `PublicIP:8285` to the same port, so the default 4-tuple hash sends all of it to one
    /// socket and one worker. Hashing the inner flow spreads a peer's flows over the workers
    /// while every flow stays on one worker (no reordering); the table lets the agent move a
    /// bucket when two heavy flows share a worker ([`super::core::rebalance`]), as a NIC's RSS
    /// indirection table does. The program sees the datagram from the end of the UDP header; a
    /// GRO train is steered by its first packet.
    ///
    /// A limit: on a NIC, the kernel's UDP GRO may coalesce back-to-back datagrams of two inner
    /// flows from one peer (same outer addresses and ports, same size) into one train, which
    /// goes to the worker of its first packet; the second flow's packets at that boundary then
    /// pass another worker than the rest of their flow and can be reordered against them. Over
    /// veth a train is exactly one send, and twill's sends never mix flows
    /// ([`super::core::Batcher`]). Handing such packets to their own worker would need a
    /// lock-free queue per pair of workers.
    pub fn steer(&self, table: &SteerTable) -> io::Result<()> {
        let mut prog = steer_program(table);
        let fprog = libc::sock_fprog {
            len: u16::try_from(prog.len()).expect("short program"),
            filter: prog.as_mut_ptr(),
        };
        // SAFETY: a sock_fprog pointing at `prog`, both alive across the call.
        unsafe {
            setsockopt_value(
                self.raw(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_REUSEPORT_CBPF,
                &fprog,
            )
        }
    }

    /// Whether `UDP_GRO` is on.
    pub fn gro(&self) -> bool {
        self.gro
    }

    /// The descriptor (for poll).
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The classic BPF program of [`UdpSocket::steer`]: the socket index of `table` for the bucket of
/// the inner flow's steering hash.
///
/// The table travels in the program as four 32-bit constants of eight 4-bit entries (a worker
/// index below 16; more workers than that never get a bucket of their own, [`MAX_STEERED`]).
fn steer_program(table: &SteerTable) -> Vec<libc::sock_filter> {
    // Classic BPF encodings (linux/filter.h).
    const LDX_B_MSH: u16 = 0xb1; // X = 4 * (P[k] & 0xf)
    const LD_W_IND: u16 = 0x40; // A = P[X + k] (32 bits)
    const LD_W_ABS: u16 = 0x20; // A = P[k] (32 bits)
    const LD_IMM: u16 = 0x00; // A = k
    const ST: u16 = 0x02; // M[k] = A
    const LD_MEM: u16 = 0x60; // A = M[k]
    const TAX: u16 = 0x07; // X = A
    const XOR_X: u16 = 0xac; // A ^= X
    const AND_K: u16 = 0x54; // A &= k
    const MUL_K: u16 = 0x24; // A *= k
    const RSH_K: u16 = 0x74; // A >>= k
    const RSH_X: u16 = 0x7c; // A >>= X
    const LSH_K: u16 = 0x64; // A <<= k
    const JEQ_K: u16 = 0x15; // if A == k: skip jt, else skip jf
    const JA: u16 = 0x05; // skip k
    const RET_A: u16 = 0x16; // return A
    let op = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8| libc::sock_filter {
        code: JEQ_K,
        jt,
        jf: 0,
        k,
    };
    let word = |w: usize| -> u32 {
        (0..8).fold(0, |acc, i| {
            acc | (u32::from(table[8 * w + i].min(15)) << (4 * i))
        })
    };
    vec![
        op(LDX_B_MSH, 0), // 0: X = inner IHL in bytes
        op(LD_W_IND, 0),  // 1: A = inner source and destination ports
        op(ST, 0),
        op(LD_W_ABS, 12), // 3: A = inner source address
        op(TAX, 0),
        op(LD_W_ABS, 16), // 5: A = inner destination address
        op(XOR_X, 0),
        op(TAX, 0),
        op(LD_MEM, 0),
        op(XOR_X, 0), // 9: A = addresses ^ ports
        op(TAX, 0),
        op(RSH_K, 16),
        op(XOR_X, 0),           // 12: A ^= A >> 16: the low half is symmetric
        op(AND_K, 0xffff),      // 13: keep it
        op(MUL_K, 0x9e37_79b1), // 14: mix (Fibonacci hashing)
        op(RSH_K, 16),          // 15: the well-mixed high half: the steering hash
        op(AND_K, 31),          // 16: the bucket (STEER_BUCKETS = 32)
        op(ST, 1),
        op(RSH_K, 3),        // 18: which word of the table
        jeq(0, 4),           // 19: → 24
        jeq(1, 5),           // 20: → 26
        jeq(2, 6),           // 21: → 28
        op(LD_IMM, word(3)), // 22
        op(JA, 5),           // 23: → 29
        op(LD_IMM, word(0)), // 24
        op(JA, 3),           // 25: → 29
        op(LD_IMM, word(1)), // 26
        op(JA, 1),           // 27: → 29
        op(LD_IMM, word(2)), // 28
        op(ST, 2),           // 29: M2 = the word
        op(LD_MEM, 1),
        op(AND_K, 7),
        op(LSH_K, 2),
        op(TAX, 0), // 33: X = 4 * (bucket % 8)
        op(LD_MEM, 2),
        op(RSH_X, 0),
        op(AND_K, 15), // 36: the bucket's worker
        op(RET_A, 0),
    ]
}

/// Workers a steering table can name.
pub const MAX_STEERED: usize = 16;

/// One datagram (or GSO train) to send: its bytes are the slices `iov` of the slices given to
/// [`Sender::send`], gathered in order (a train's headers and payloads need not be contiguous).
#[derive(Debug, Clone)]
pub struct OutMsg {
    /// The peer.
    pub dst: SocketAddrV4,
    /// Its slices, by index in the send's slices.
    pub iov: std::ops::Range<usize>,
    /// Segment size when the bytes are a train of packets (`UDP_SEGMENT`).
    pub gso: Option<u16>,
}

/// Reusable `sendmmsg` arrays.
#[derive(Default)]
pub struct Sender {
    iovs: Vec<libc::iovec>,
    names: Vec<libc::sockaddr_in>,
    ctrl: Vec<[u64; CTRL_WORDS]>,
    hdrs: Vec<libc::mmsghdr>,
}

impl Sender {
    /// Sends `msgs`, whose bytes are among `slices`, with as few `sendmmsg` calls as the kernel
    /// allows; `done(i, result)` for each message, in order. A message the kernel refuses is
    /// reported and skipped; the rest go on.
    pub fn send<'a>(
        &mut self,
        sock: &UdpSocket,
        msgs: &[OutMsg],
        slices: impl IntoIterator<Item = &'a [u8]>,
        mut done: impl FnMut(usize, io::Result<()>),
    ) {
        let n = msgs.len();
        self.iovs.clear();
        self.iovs.extend(slices.into_iter().map(|b| libc::iovec {
            iov_base: b.as_ptr().cast_mut().cast(),
            iov_len: b.len(),
        }));
        self.names.clear();
        self.ctrl.clear();
        self.hdrs.clear();
        for m in msgs {
            self.names.push(sockaddr(m.dst));
            self.ctrl.push([0; CTRL_WORDS]);
        }
        for (i, m) in msgs.iter().enumerate() {
            let iov = &mut self.iovs[m.iov.clone()];
            // SAFETY: mmsghdr is plain old data; all-zero is valid.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = (&raw mut self.names[i]).cast();
            h.msg_hdr.msg_namelen = SOCKADDR_LEN;
            h.msg_hdr.msg_iovlen = iov.len();
            h.msg_hdr.msg_iov = iov.as_mut_ptr();
            if let Some(seg) = m.gso {
                let ctrl = &mut self.ctrl[i];
                h.msg_hdr.msg_control = ctrl.as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE is arithmetic.
                h.msg_hdr.msg_controllen =
                    unsafe { libc::CMSG_SPACE(u32::try_from(size_of::<u16>()).expect("2")) }
                        as usize;
                // SAFETY: the control buffer is large enough and aligned for one cmsghdr with a
                // u16 (CTRL_WORDS u64s), and msg_control/msg_controllen describe it.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(&raw const h.msg_hdr);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len =
                        libc::CMSG_LEN(u32::try_from(size_of::<u16>()).expect("2")) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
                }
            }
            self.hdrs.push(h);
        }
        let mut i = 0;
        while i < n {
            let left = libc::c_uint::try_from(n - i).expect("batch fits");
            // SAFETY: hdrs[i..] are valid mmsghdrs whose pointers target live arrays of self,
            // whose iovecs point into the caller's slices, borrowed for this call.
            let r = unsafe { libc::sendmmsg(sock.raw(), self.hdrs[i..].as_mut_ptr(), left, 0) };
            match usize::try_from(r) {
                Ok(sent) if sent > 0 => {
                    for j in i..i + sent {
                        done(j, Ok(()));
                    }
                    i += sent;
                }
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    done(i, Err(e));
                    i += 1;
                }
            }
        }
    }
}

/// One received datagram (or GRO train).
#[derive(Debug, Clone, Copy, Default)]
pub struct Received {
    /// Bytes in the buffer.
    pub len: usize,
    /// The sender.
    pub src: Option<SocketAddrV4>,
    /// The datagram size when the buffer holds a train (`UDP_GRO`).
    pub gso: Option<usize>,
    /// The datagram did not fit the buffer.
    pub truncated: bool,
}

/// Reusable `recvmmsg` buffers and arrays.
pub struct Receiver {
    bufs: Vec<Box<[u8]>>,
    names: Vec<libc::sockaddr_in>,
    iovs: Vec<libc::iovec>,
    ctrl: Vec<[u64; CTRL_WORDS]>,
    hdrs: Vec<libc::mmsghdr>,
    got: Vec<Received>,
}

impl Receiver {
    /// Room for `batch` receives per call.
    pub fn new(batch: usize) -> Receiver {
        let mut r = Receiver {
            bufs: (0..batch)
                .map(|_| vec![0u8; RECV_BUF].into_boxed_slice())
                .collect(),
            // SAFETY: sockaddr_in is plain old data; all-zero is valid.
            names: vec![unsafe { std::mem::zeroed() }; batch],
            iovs: Vec::with_capacity(batch),
            ctrl: vec![[0; CTRL_WORDS]; batch],
            hdrs: Vec::with_capacity(batch),
            got: vec![Received::default(); batch],
        };
        for b in &mut r.bufs {
            r.iovs.push(libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            });
        }
        for i in 0..batch {
            // SAFETY: mmsghdr is plain old data; all-zero is valid.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = (&raw mut r.names[i]).cast();
            h.msg_hdr.msg_iov = &raw mut r.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = r.ctrl[i].as_mut_ptr().cast();
            r.hdrs.push(h);
        }
        r
    }

    /// Receives what is queued without blocking (`recvmmsg`, `MSG_DONTWAIT`): how many; 0 when
    /// nothing was waiting.
    pub fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        for h in &mut self.hdrs {
            h.msg_hdr.msg_namelen = SOCKADDR_LEN;
            h.msg_hdr.msg_controllen = CTRL_WORDS * size_of::<u64>();
            h.msg_hdr.msg_flags = 0;
        }
        let vlen = libc::c_uint::try_from(self.hdrs.len()).expect("batch fits");
        let r = loop {
            // SAFETY: every mmsghdr points at live buffers of self, sized as declared.
            let r = unsafe {
                libc::recvmmsg(
                    sock.raw(),
                    self.hdrs.as_mut_ptr(),
                    vlen,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if r >= 0 {
                break usize::try_from(r).expect("non-negative");
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(e),
            }
        };
        for i in 0..r {
            let h = &self.hdrs[i];
            let mut gso = None;
            // SAFETY: the kernel filled msg_control/msg_controllen; CMSG_* walk within them.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&raw const h.msg_hdr);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                        let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                        gso = usize::try_from(v).ok().filter(|g| *g > 0);
                    }
                    c = libc::CMSG_NXTHDR(&raw const h.msg_hdr, c);
                }
            }
            let src = (usize::try_from(h.msg_hdr.msg_namelen).ok()
                == Some(size_of::<libc::sockaddr_in>()))
            .then(|| from_sockaddr(&self.names[i]));
            self.got[i] = Received {
                len: h.msg_len as usize,
                src,
                gso,
                truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            };
        }
        Ok(r)
    }

    /// The `i`-th receive of the last call: its bytes and facts.
    pub fn get(&self, i: usize) -> (&[u8], Received) {
        let g = self.got[i];
        (&self.bufs[i][..g.len.min(RECV_BUF)], g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::backend::udp::core::{bucket, default_table};

    /// An inner IPv4 header (IHL 5) and the first 4 bytes of a TCP header: all the program reads.
    fn inner(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> [u8; 24] {
        let mut p = [0u8; 24];
        p[0] = 0x45;
        p[9] = 6;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }

    fn port_of(s: &UdpSocket) -> u16 {
        // SAFETY: sockaddr_in is plain old data; getsockname fills at most `len` bytes.
        let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = SOCKADDR_LEN;
        // SAFETY: a valid socket and a sockaddr_in of the length given.
        let r = unsafe { libc::getsockname(s.raw(), (&raw mut sa).cast(), &raw mut len) };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        from_sockaddr(&sa).port()
    }

    /// Which socket of `socks` got the one datagram sent.
    fn receiver(socks: &[UdpSocket]) -> usize {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            for (i, s) in socks.iter().enumerate() {
                let mut buf = [0u8; 64];
                // SAFETY: `buf` is valid for its length.
                let n = unsafe {
                    libc::recv(
                        s.raw(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n > 0 {
                    return i;
                }
            }
            assert!(std::time::Instant::now() < deadline, "datagram lost");
            std::thread::yield_now();
        }
    }

    /// The kernel runs the steering program: each flow goes to the socket the table names for
    /// its bucket (the core's hash), a flow's replies to the same one, two connections of one
    /// client (source ports 2 apart) spread over the sockets, and a new table takes effect at
    /// once.
    #[test]
    fn inner_flow_steering_on_loopback() {
        let first = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = port_of(&first);
        let socks = [
            first,
            UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).unwrap(),
        ];
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (pod1, pod2) = ([10, 244, 1, 2], [10, 244, 2, 3]);
        let flow = |s: [u8; 4], d: [u8; 4], sp: u16, dp: u16| {
            (
                u32::from_be_bytes(s),
                u32::from_be_bytes(d),
                u32::from(sp) << 16 | u32::from(dp),
            )
        };
        let mut inverted = default_table(2);
        for w in &mut inverted {
            *w = 1 - *w;
        }
        for table in [default_table(2), inverted] {
            socks[0].steer(&table).unwrap();
            let mut apart = 0;
            for sport in (40_000..40_200).step_by(2) {
                let mut got = [0; 2];
                for (i, (s, d, sp, dp)) in [
                    (pod1, pod2, sport, 5201),
                    (pod2, pod1, 5201, sport),
                    (pod1, pod2, sport + 2, 5201),
                ]
                .into_iter()
                .enumerate()
                {
                    tx.send_to(&inner(s, d, sp, dp), ("127.0.0.1", port))
                        .unwrap();
                    let r = receiver(&socks);
                    let want = usize::from(table[bucket(flow(s, d, sp, dp))]);
                    assert_eq!(r, want, "{s:?}:{sp} → {d:?}:{dp}");
                    if i < 2 {
                        got[i] = r;
                    } else if r != got[0] {
                        apart += 1;
                    }
                }
                assert_eq!(got[0], got[1], "a flow and its replies on one socket");
            }
            assert!(
                apart >= 30,
                "neighbouring connections spread: {apart} of 100 apart"
            );
        }
    }

    #[test]
    fn steering_table_rides_in_the_program() {
        let table: SteerTable = std::array::from_fn(|b| u8::try_from(b % 7).unwrap());
        let prog = steer_program(&table);
        let consts: Vec<u32> = prog.iter().filter(|i| i.code == 0).map(|i| i.k).collect();
        // Words 3, 0, 1, 2 in program order; bucket 8w + i at bits 4i.
        for (w, k) in [3, 0, 1, 2].into_iter().zip(consts) {
            for i in 0..8 {
                assert_eq!((k >> (4 * i)) & 15, u32::from(table[8 * w + i]));
            }
        }
    }
}
