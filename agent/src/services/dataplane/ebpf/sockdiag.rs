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
//! The messages are encoded and decoded by `netlink-packet-sock-diag` (`InetRequest`, and
//! `SockDiagDestroy` for the `SOCK_DESTROY` type), the socket is `netlink-sys`'s: both of the
//! rtnetlink family already in the agent. [`request`] and [`parse`] stay pure (unit tested
//! against the kernel's byte layout); [`destroy_udp`] is the thin I/O edge, acting on the
//! calling thread's network namespace.
//!
//! Needs Linux >= 4.5 (`SOCK_DESTROY`) with `CONFIG_INET_DIAG_DESTROY`, and `CAP_NET_ADMIN`.

use std::collections::BTreeSet;
use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable,
};
use netlink_packet_sock_diag::SockDiagDestroy;
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::message::SockDiagMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

/// How long the kernel may take to answer one read.
const RECV_TIMEOUT_S: i64 = 2;

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

/// The kernel compares the cookie as two native-endian u32 halves, low half first.
fn cookie_bytes(cookie: u64) -> [u8; 8] {
    let lo = u32::try_from(cookie & 0xffff_ffff).unwrap_or_default();
    let hi = u32::try_from(cookie >> 32).unwrap_or_default();
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&lo.to_ne_bytes());
    b[4..].copy_from_slice(&hi.to_ne_bytes());
    b
}

fn cookie_of(b: [u8; 8]) -> u64 {
    let lo = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    let hi = u32::from_ne_bytes([b[4], b[5], b[6], b[7]]);
    u64::from(lo) | (u64::from(hi) << 32)
}

/// A wildcard socket id of `family` (a dump's).
fn any_socket(family: u8) -> SocketId {
    if i32::from(family) == libc::AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ask<'a> {
    /// A dump of the family's connected UDP sockets.
    Dump(u8),
    /// The destruction of one socket.
    Destroy(&'a SockId),
}

/// Encodes one request (`seq` is its sequence number).
fn request(ask: Ask<'_>, seq: u32) -> Vec<u8> {
    let (family, states, socket_id, flags) = match ask {
        Ask::Dump(family) => (
            family,
            StateFlags::ESTABLISHED,
            any_socket(family),
            NLM_F_REQUEST | NLM_F_DUMP,
        ),
        Ask::Destroy(id) => (
            id.family,
            StateFlags::empty(),
            SocketId {
                source_port: id.sport,
                destination_port: id.dport,
                source_address: id.src,
                destination_address: id.dst,
                interface_id: id.ifindex,
                cookie: cookie_bytes(id.cookie),
            },
            NLM_F_REQUEST | NLM_F_ACK,
        ),
    };
    let req = SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: u8::try_from(libc::IPPROTO_UDP).unwrap_or(17),
        extensions: ExtensionFlags::empty(),
        states,
        socket_id,
    });
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    match ask {
        Ask::Dump(_) => encode(NetlinkMessage::new(header, NetlinkPayload::from(req))),
        Ask::Destroy(_) => encode(NetlinkMessage::new(
            header,
            NetlinkPayload::from(SockDiagDestroy::new(req)),
        )),
    }
}

fn encode<T: NetlinkSerializable>(mut msg: NetlinkMessage<T>) -> Vec<u8> {
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
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

/// Splits a datagram of replies; a message that does not decode is an error naming why.
fn parse(mut buf: &[u8]) -> io::Result<Vec<Reply>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let msg = NetlinkMessage::<SockDiagMessage>::deserialize(buf).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("decode a sock_diag answer: {e}"),
            )
        })?;
        let len = usize::try_from(msg.header.length).unwrap_or(usize::MAX);
        out.push(match msg.payload {
            NetlinkPayload::Done(_) => Reply::Done,
            NetlinkPayload::Error(e) => Reply::Error(e.raw_code()),
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                let h = &r.header;
                Reply::Sock(SockId {
                    family: h.family,
                    src: h.socket_id.source_address,
                    sport: h.socket_id.source_port,
                    dst: h.socket_id.destination_address,
                    dport: h.socket_id.destination_port,
                    ifindex: h.socket_id.interface_id,
                    cookie: cookie_of(h.socket_id.cookie),
                })
            }
            _ => Reply::Other,
        });
        // Messages are 4-byte aligned.
        let next = len.saturating_add(3) & !3;
        buf = buf.get(next..).unwrap_or_default();
    }
    Ok(out)
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
struct DiagSocket(Socket);

impl DiagSocket {
    fn open() -> io::Result<Self> {
        let sock = Socket::new(NETLINK_SOCK_DIAG)?;
        let timeout = nix::sys::time::TimeVal::new(RECV_TIMEOUT_S, 0);
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)?;
        Ok(Self(sock))
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        self.0.send_to(msg, &SocketAddr::new(0, 0), 0).map(drop)
    }

    /// Reads one datagram into `buf` (cleared first).
    fn recv(&self, buf: &mut Vec<u8>) -> io::Result<()> {
        buf.clear();
        self.0.recv(buf, 0).map(drop)
    }

    /// Every connected UDP socket of `family` in the calling thread's network namespace.
    fn dump(&self, family: u8, seq: u32) -> io::Result<Vec<SockId>> {
        self.send(&request(Ask::Dump(family), seq))?;
        let mut out = Vec::new();
        let mut buf = Vec::with_capacity(32 * 1024);
        loop {
            self.recv(&mut buf)?;
            for reply in parse(&buf)? {
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
        self.send(&request(Ask::Destroy(id), seq))?;
        let mut buf = Vec::with_capacity(512);
        self.recv(&mut buf)?;
        for reply in parse(&buf)? {
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

    /// Netlink header, then `struct inet_diag_req_v2` (8 bytes, then the 48-byte socket id).
    const HDR: usize = 16;
    const SOCKID_LEN: usize = 48;
    /// `struct inet_diag_msg`: 4 bytes, the socket id, 20 more.
    const MSG_LEN: usize = 4 + SOCKID_LEN + 20;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const SOCK_DESTROY: u16 = 21;

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

    /// Wraps `req`'s socket id in an `inet_diag_msg` reply, byte by byte as the kernel sends it.
    fn reply_for(req: &[u8]) -> Vec<u8> {
        let r = &req[HDR..];
        let mut body = vec![0u8; MSG_LEN];
        body[0] = r[0];
        body[1] = 1;
        body[4..4 + SOCKID_LEN].copy_from_slice(&r[8..8 + SOCKID_LEN]);
        let len = HDR + MSG_LEN;
        let mut msg = vec![0u8; HDR];
        msg[0..4].copy_from_slice(&u32::try_from(len).unwrap().to_ne_bytes());
        msg[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        msg.extend(body);
        msg
    }

    #[test]
    fn destroy_request_has_the_kernels_layout_and_round_trips_through_a_reply() {
        for (src, dst) in [("10.0.0.1", "10.244.1.5"), ("fd00::1", "fd00:244::5")] {
            let want = id(src, dst);
            let req = request(Ask::Destroy(&want), 7);
            assert_eq!(req.len(), 72);
            assert_eq!(u32::from_ne_bytes(req[0..4].try_into().unwrap()), 72);
            assert_eq!(u16::from_ne_bytes([req[4], req[5]]), SOCK_DESTROY);
            assert_eq!(
                u16::from_ne_bytes([req[6], req[7]]),
                NLM_F_REQUEST | NLM_F_ACK
            );
            assert_eq!(u32::from_ne_bytes(req[8..12].try_into().unwrap()), 7);
            assert_eq!(req[HDR], want.family);
            assert_eq!(req[HDR + 1], 17, "protocol UDP");
            let s = &req[HDR + 8..];
            assert_eq!(&s[0..2], &40_000u16.to_be_bytes(), "ports in network order");
            assert_eq!(&s[2..4], &53u16.to_be_bytes());
            assert_eq!(u32::from_ne_bytes(s[36..40].try_into().unwrap()), 3);
            // The cookie as two native-endian halves, low half first.
            assert_eq!(
                u32::from_ne_bytes(s[40..44].try_into().unwrap()),
                0x9abc_def0
            );
            assert_eq!(
                u32::from_ne_bytes(s[44..48].try_into().unwrap()),
                0x1234_5678
            );
            let mut datagram = reply_for(&req);
            let done = [20u32.to_ne_bytes(), [3, 0, 2, 0], [0; 4], [0; 4], [0; 4]].concat();
            datagram.extend(done);
            assert_eq!(
                parse(&datagram).unwrap(),
                vec![Reply::Sock(want), Reply::Done]
            );
        }
    }

    #[test]
    fn dump_asks_for_connected_sockets_of_one_family() {
        for family in [2, 10] {
            let req = request(Ask::Dump(family), 1);
            assert_eq!(req.len(), 72);
            assert_eq!(u16::from_ne_bytes([req[4], req[5]]), SOCK_DIAG_BY_FAMILY);
            assert_eq!(
                u16::from_ne_bytes([req[6], req[7]]),
                NLM_F_REQUEST | NLM_F_DUMP
            );
            assert_eq!(req[HDR], family);
            assert_eq!(req[HDR + 1], 17, "protocol UDP");
            assert_eq!(
                u32::from_ne_bytes(req[HDR + 4..HDR + 8].try_into().unwrap()),
                2,
                "TCP_ESTABLISHED only"
            );
            assert!(req[HDR + 8..].iter().all(|b| *b == 0), "a wildcard id");
        }
    }

    #[test]
    fn errors_acks_and_malformed_answers() {
        let mut err = vec![0u8; HDR + 4 + HDR];
        err[0..4].copy_from_slice(&36u32.to_ne_bytes());
        err[4..6].copy_from_slice(&2u16.to_ne_bytes());
        err[16..20].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        assert_eq!(parse(&err).unwrap(), vec![Reply::Error(-libc::ENOENT)]);
        err[16..20].copy_from_slice(&0i32.to_ne_bytes());
        assert_eq!(parse(&err).unwrap(), vec![Reply::Error(0)]);
        // A length past the buffer is an error naming the answer, never garbage.
        err[0..4].copy_from_slice(&200u32.to_ne_bytes());
        let e = parse(&err).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(
            e.to_string().starts_with("decode a sock_diag answer"),
            "{e}"
        );
        assert!(parse(&[1, 2, 3]).is_err());
        assert!(parse(&[]).unwrap().is_empty());
    }

    #[test]
    fn v4_mapped_peers_match_their_ipv4_backend() {
        let s = id("::ffff:10.0.0.1", "::ffff:10.244.1.5");
        assert_eq!(peer(&s), ("10.244.1.5".parse().unwrap(), 53));
        let s = id("fd00::1", "fd00:244::5");
        assert_eq!(peer(&s), ("fd00:244::5".parse().unwrap(), 53));
    }

    #[test]
    fn cookies_round_trip() {
        for c in [0, 1, 0x1234_5678_9abc_def0, u64::MAX] {
            assert_eq!(cookie_of(cookie_bytes(c)), c);
        }
    }
}
