//! Terminating connected UDP sockets whose backend was removed, through `sock_diag`
//! (`SOCK_DESTROY`, the kernel's `ss -K`).
//!
//! Why: socket-LB translates a connected UDP socket's destination once, at `connect()`; the
//! kernel then keeps sending to that backend, and nothing on the packet path can move the flow
//! (the tc conntrack never sees it). For the node's own sockets (pods' connected UDP takes the tc
//! path instead, see `CFG_UDP_CONNECT_VIA_TC`), the only way to stop traffic to a removed
//! endpoint is to abort the socket: the application gets `ECONNABORTED` on its next call and,
//! like any UDP client that handles errors (resolvers do), opens a new socket, which socket-LB
//! sends to a live backend. Cilium terminates such sockets the same way.
//!
//! Only sockets that socket-LB connected to the removed backend are aborted: the node's
//! connected UDP sockets to that backend are listed, and only those whose cookie and peer have
//! an entry in `TWL_LB_SOCK` are aborted, so a socket that connected to the backend's address
//! directly is never touched. (The map is looked up per candidate, never iterated: it holds an
//! entry per socket-LB TCP connection too, and one endpoint change must stay cheap.) TCP is left alone, as kube-proxy leaves it:
//! the backend's own reset or the application's timeout ends it.
//!
//! The messages are encoded and decoded by pure functions (unit tested); [`destroy_udp`] is the
//! thin I/O edge, acting on the calling thread's network namespace.
//!
//! Needs Linux >= 4.5 (`SOCK_DESTROY`) with `CONFIG_INET_DIAG_DESTROY`, and `CAP_NET_ADMIN`.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

/// `SOCK_DIAG_BY_FAMILY`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `SOCK_DESTROY`.
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_sockid`.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg`.
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;
/// `TCP_ESTABLISHED`: a connected UDP socket's state.
const STATE_ESTABLISHED: u32 = 1;

/// A socket as `sock_diag` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockId {
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// Local address.
    pub src: IpAddr,
    /// Local port.
    pub sport: u16,
    /// Peer address.
    pub dst: IpAddr,
    /// Peer port.
    pub dport: u16,
    /// Bound interface (0: none).
    pub ifindex: u32,
    /// Socket cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
}

fn put_addr(buf: &mut [u8], addr: IpAddr) {
    match addr {
        IpAddr::V4(a) => buf[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => buf[..16].copy_from_slice(&a.octets()),
    }
}

fn get_addr(family: u8, buf: &[u8]) -> IpAddr {
    if i32::from(family) == libc::AF_INET {
        IpAddr::V4(Ipv4Addr::new(buf[0], buf[1], buf[2], buf[3]))
    } else {
        let mut o = [0u8; 16];
        o.copy_from_slice(&buf[..16]);
        IpAddr::V6(Ipv6Addr::from(o))
    }
}

/// Encodes one request: a dump of `family` UDP sockets in `states` (no `id`), or the destruction
/// of socket `id`.
fn request(kind: u16, seq: u32, family: u8, states: u32, id: Option<&SockId>) -> Vec<u8> {
    let len = NLMSG_HDRLEN + REQ_LEN;
    let mut b = vec![0u8; len];
    let flags = if kind == SOCK_DESTROY {
        NLM_F_REQUEST | NLM_F_ACK
    } else {
        NLM_F_REQUEST | NLM_F_DUMP
    };
    b[0..4].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    b[4..6].copy_from_slice(&kind.to_ne_bytes());
    b[6..8].copy_from_slice(&flags.to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    let r = &mut b[NLMSG_HDRLEN..];
    r[0] = family;
    r[1] = u8::try_from(libc::IPPROTO_UDP).unwrap_or(17);
    r[4..8].copy_from_slice(&states.to_ne_bytes());
    if let Some(id) = id {
        let s = &mut r[8..8 + SOCKID_LEN];
        s[0..2].copy_from_slice(&id.sport.to_be_bytes());
        s[2..4].copy_from_slice(&id.dport.to_be_bytes());
        put_addr(&mut s[4..20], id.src);
        put_addr(&mut s[20..36], id.dst);
        s[36..40].copy_from_slice(&id.ifindex.to_ne_bytes());
        // The kernel compares the cookie as two native-endian u32 halves, low half first.
        let cookie = id.cookie.to_le_bytes();
        let (lo, hi) = cookie.split_at(4);
        let half = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]).to_ne_bytes();
        s[40..44].copy_from_slice(&half(lo));
        s[44..48].copy_from_slice(&half(hi));
    }
    b
}

/// One message of a netlink reply.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// A socket of the dump.
    Sock(SockId),
    /// End of the dump.
    Done,
    /// An error (or, with 0, an acknowledgement): a negative errno.
    Error(i32),
    /// Something else (ignored).
    Other,
}

/// Splits a datagram of replies.
fn parse(mut buf: &[u8]) -> Vec<Reply> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            break;
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let body = &buf[NLMSG_HDRLEN..len];
        out.push(match kind {
            NLMSG_DONE => Reply::Done,
            NLMSG_ERROR if body.len() >= 4 => {
                Reply::Error(i32::from_ne_bytes([body[0], body[1], body[2], body[3]]))
            }
            SOCK_DIAG_BY_FAMILY if body.len() >= MSG_LEN => {
                let family = body[0];
                let s = &body[4..4 + SOCKID_LEN];
                let lo = u32::from_ne_bytes([s[40], s[41], s[42], s[43]]);
                let hi = u32::from_ne_bytes([s[44], s[45], s[46], s[47]]);
                Reply::Sock(SockId {
                    family,
                    sport: u16::from_be_bytes([s[0], s[1]]),
                    dport: u16::from_be_bytes([s[2], s[3]]),
                    src: get_addr(family, &s[4..20]),
                    dst: get_addr(family, &s[20..36]),
                    ifindex: u32::from_ne_bytes([s[36], s[37], s[38], s[39]]),
                    cookie: u64::from(lo) | (u64::from(hi) << 32),
                })
            }
            _ => Reply::Other,
        });
        // Messages are 4-byte aligned.
        let next = (len + 3) & !3;
        buf = &buf[next.min(buf.len())..];
    }
    out
}

/// The peer of `id` as an application sees it: a v4-mapped IPv6 address is the IPv4 address.
fn peer(id: &SockId) -> (IpAddr, u16) {
    let ip = match id.dst {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    };
    (ip, id.dport)
}

/// A `NETLINK_SOCK_DIAG` socket.
struct DiagSocket(OwnedFd);

impl DiagSocket {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: valid option pointer and length.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::from_ref(&timeout).cast(),
                u32::try_from(std::mem::size_of::<libc::timeval>()).unwrap_or(16),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(fd))
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: a zeroed sockaddr_nl addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = u16::try_from(libc::AF_NETLINK).unwrap_or(16);
        // SAFETY: valid buffer and address.
        let rc = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                std::ptr::from_ref(&kernel).cast(),
                u32::try_from(std::mem::size_of::<libc::sockaddr_nl>()).unwrap_or(12),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: valid buffer.
        let rc = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        usize::try_from(rc).map_err(|_| io::Error::last_os_error())
    }

    /// Every connected UDP socket of `family` in the calling thread's network namespace.
    fn dump(&self, family: u8, seq: u32) -> io::Result<Vec<SockId>> {
        self.send(&request(
            SOCK_DIAG_BY_FAMILY,
            seq,
            family,
            1 << STATE_ESTABLISHED,
            None,
        ))?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = self.recv(&mut buf)?;
            for reply in parse(&buf[..n]) {
                match reply {
                    Reply::Sock(id) => out.push(id),
                    Reply::Done => return Ok(out),
                    Reply::Error(0) | Reply::Other => {}
                    Reply::Error(errno) => return Err(io::Error::from_raw_os_error(-errno)),
                }
            }
        }
    }

    fn destroy(&self, id: &SockId, seq: u32) -> io::Result<()> {
        self.send(&request(SOCK_DESTROY, seq, id.family, 0, Some(id)))?;
        let mut buf = [0u8; 512];
        let n = self.recv(&mut buf)?;
        for reply in parse(&buf[..n]) {
            match reply {
                Reply::Error(0) => return Ok(()),
                Reply::Error(errno) => return Err(io::Error::from_raw_os_error(-errno)),
                _ => {}
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "no acknowledgement from sock_diag",
        ))
    }
}

/// What [`destroy_udp`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Destroyed {
    /// Sockets aborted.
    pub sockets: usize,
    /// Sockets that were gone by the time they were destroyed.
    pub gone: usize,
}

/// Aborts every connected UDP socket of the calling thread's network namespace whose peer is in
/// `peers` and for which `balanced(cookie, peer)` holds (socket-LB connected it there). A socket
/// closed in the meantime is not an error.
pub fn destroy_udp(
    peers: &BTreeSet<(IpAddr, u16)>,
    balanced: impl Fn(u64, (IpAddr, u16)) -> bool,
) -> io::Result<Destroyed> {
    let mut done = Destroyed::default();
    if peers.is_empty() {
        return Ok(done);
    }
    let sock = DiagSocket::open()?;
    let mut seq = 1;
    for family in [libc::AF_INET, libc::AF_INET6] {
        let family = u8::try_from(family).unwrap_or(2);
        let victims: Vec<SockId> = sock
            .dump(family, seq)?
            .into_iter()
            .filter(|id| {
                let p = peer(id);
                peers.contains(&p) && balanced(id.cookie, p)
            })
            .collect();
        for id in victims {
            seq += 1;
            match sock.destroy(&id, seq) {
                Ok(()) => done.sockets += 1,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => done.gone += 1,
                Err(e) => return Err(e),
            }
        }
        seq += 1;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(src: &str, dst: &str) -> SockId {
        let src: IpAddr = src.parse().unwrap();
        SockId {
            family: if src.is_ipv4() { 2 } else { 10 },
            src,
            sport: 40_000,
            dst: dst.parse().unwrap(),
            dport: 53,
            ifindex: 3,
            cookie: 0x1234_5678_9abc_def0,
        }
    }

    /// Wraps `req`'s socket id in an `inet_diag_msg` reply, as the kernel sends it.
    fn reply_for(req: &[u8]) -> Vec<u8> {
        let r = &req[NLMSG_HDRLEN..];
        let mut body = vec![0u8; MSG_LEN];
        body[0] = r[0];
        body[1] = 1;
        body[4..4 + SOCKID_LEN].copy_from_slice(&r[8..8 + SOCKID_LEN]);
        let len = NLMSG_HDRLEN + MSG_LEN;
        let mut msg = vec![0u8; NLMSG_HDRLEN];
        msg[0..4].copy_from_slice(&u32::try_from(len).unwrap().to_ne_bytes());
        msg[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        msg.extend(body);
        msg
    }

    #[test]
    fn destroy_request_round_trips_through_a_reply() {
        for (src, dst) in [("10.0.0.1", "10.244.1.5"), ("fd00::1", "fd00:244::5")] {
            let want = id(src, dst);
            let req = request(SOCK_DESTROY, 7, want.family, 0, Some(&want));
            assert_eq!(req.len(), 72);
            assert_eq!(u16::from_ne_bytes([req[4], req[5]]), SOCK_DESTROY);
            assert_eq!(
                u16::from_ne_bytes([req[6], req[7]]),
                NLM_F_REQUEST | NLM_F_ACK
            );
            assert_eq!(req[NLMSG_HDRLEN + 1], 17, "protocol UDP");
            let mut datagram = reply_for(&req);
            let done = [16u32.to_ne_bytes(), [3, 0, 0, 0], [0; 4], [0; 4]].concat();
            datagram.extend(done);
            assert_eq!(parse(&datagram), vec![Reply::Sock(want), Reply::Done]);
        }
    }

    #[test]
    fn dump_asks_for_connected_sockets_of_one_family() {
        let req = request(SOCK_DIAG_BY_FAMILY, 1, 10, 1 << STATE_ESTABLISHED, None);
        assert_eq!(
            u16::from_ne_bytes([req[6], req[7]]),
            NLM_F_REQUEST | NLM_F_DUMP
        );
        assert_eq!(req[NLMSG_HDRLEN], 10);
        assert_eq!(
            u32::from_ne_bytes(req[NLMSG_HDRLEN + 4..NLMSG_HDRLEN + 8].try_into().unwrap()),
            2
        );
        assert!(req[NLMSG_HDRLEN + 8..].iter().all(|b| *b == 0));
    }

    #[test]
    fn errors_and_truncation() {
        let mut err = vec![0u8; NLMSG_HDRLEN + 4];
        err[0..4].copy_from_slice(&20u32.to_ne_bytes());
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[16..20].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        assert_eq!(parse(&err), vec![Reply::Error(-libc::ENOENT)]);
        // A length past the buffer ends parsing instead of reading garbage.
        err[0..4].copy_from_slice(&200u32.to_ne_bytes());
        assert!(parse(&err).is_empty());
        assert!(parse(&[1, 2, 3]).is_empty());
    }

    #[test]
    fn v4_mapped_peers_match_their_ipv4_backend() {
        let s = id("::ffff:10.0.0.1", "::ffff:10.244.1.5");
        assert_eq!(peer(&s), ("10.244.1.5".parse().unwrap(), 53));
        let s = id("fd00::1", "fd00:244::5");
        assert_eq!(peer(&s), ("fd00:244::5".parse().unwrap(), 53));
    }
}
