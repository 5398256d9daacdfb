//! Socket-level load balancing: cgroup v2 `sock_addr` programs (Linux >= 5.8 for all eight
//! hooks; `getpeername4/6` and `recvmsg4/6` need 5.8 and 4.20 respectively).
//!
//! - `connect4/6` rewrite the destination of `connect()` from a VIP to a backend before the
//!   kernel routes it, so a TCP connection (or a connected UDP socket) talks to the backend
//!   directly: no per-packet NAT, no conntrack. `sendmsg4/6` do the same per datagram for
//!   unconnected UDP.
//! - The backend is the Maglev entry of a hash of the socket cookie: stable for a socket (all the
//!   datagrams of one unconnected UDP socket reach one backend while the table is unchanged) and
//!   spread across sockets. After a backend is removed, the next `sendmsg` already uses the new
//!   table: unconnected UDP has no state to clear.
//! - Each translation leaves a [`SOCK`] entry (socket cookie, backend → VIP); `getpeername4/6`
//!   and `recvmsg4/6` use it so the application sees the VIP as its peer and as the source of
//!   replies.
//! - Connected UDP of *pods* is left to the tc path when a pod-facing interface has the tc
//!   programs ([`CFG_UDP_CONNECT_VIA_TC`]): the kernel fixes a connected socket's destination at
//!   `connect()`, so socket-LB could not move the flow off a removed endpoint, while tc conntrack
//!   re-balances it at the next packet. The node's own connected UDP sockets (host network
//!   namespace) never cross a tc hook of ours, so they keep socket-LB.
//! - Ports arrive in network byte order in the low 16 bits of `user_port`. Context fields are
//!   read and written with volatile 4-byte accesses: the verifier rejects the wider loads LLVM
//!   likes to merge `user_ip6[]` reads into.
//! - Verdicts: 1 lets the call proceed, 0 fails it with `EPERM`; a frontend without backends
//!   refuses `connect`/`sendmsg`, as kube-proxy rejects. `recvmsg`/`getpeername` must return 1.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use twill_common::service::{
    AFF_CLIENT_NETNS, AffinityKey, BackendValue, CFG_UDP_CONNECT_VIA_TC, FAMILY_V4, FAMILY_V6,
    PROTO_TCP, PROTO_UDP, SockKey, SockValue, SvcKey, SvcValue, mix64,
};

use super::{SOCK, addr_eq, config, count, lookup_service, select_backend};

/// Let the call proceed.
const ALLOW: i32 = 1;
/// Fail the call with `EPERM`.
const REJECT: i32 = 0;

/// Which hook runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Connect,
    Sendmsg,
}

/// The user address of the call, as a map address.
struct UserAddr {
    addr: [u8; 16],
    family: u8,
    /// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) on a dual-stack socket: looked up as IPv4,
    /// written back mapped.
    mapped: bool,
}

/// Defines the entry point `$name` of the `sock_addr` hook `$hook`: `forward` (VIP → backend,
/// for `$op`) or `reverse` (backend → VIP), of the IPv6 variant when `$v6`.
macro_rules! hook {
    (forward $hook:ident, $name:ident, $v6:literal, $op:expr) => {
        #[cgroup_sock_addr($hook)]
        pub fn $name(ctx: SockAddrContext) -> i32 {
            try_forward(&ctx, $v6, $op).unwrap_or(ALLOW)
        }
    };
    (reverse $hook:ident, $name:ident, $v6:literal) => {
        #[cgroup_sock_addr($hook)]
        pub fn $name(ctx: SockAddrContext) -> i32 {
            let _ = try_reverse(&ctx, $v6);
            ALLOW
        }
    };
}

hook!(forward connect4, twl_lb_conn4, false, Op::Connect);
hook!(forward connect6, twl_lb_conn6, true, Op::Connect);
hook!(forward sendmsg4, twl_lb_send4, false, Op::Sendmsg);
hook!(forward sendmsg6, twl_lb_send6, true, Op::Sendmsg);
hook!(reverse recvmsg4, twl_lb_recv4, false);
hook!(reverse recvmsg6, twl_lb_recv6, true);
hook!(reverse getpeername4, twl_lb_peer4, false);
hook!(reverse getpeername6, twl_lb_peer6, true);

/// Nothing to do (not a service, or not ours to translate); the call proceeds unchanged.
struct Skip;

/// `connect`/`sendmsg`: VIP → backend. Returns the verdict.
#[inline(always)]
fn try_forward(ctx: &SockAddrContext, v6: bool, op: Op) -> Result<i32, Skip> {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the context pointer the kernel passed; the fields read are readable by
    // every sock_addr attach type.
    let proto = unsafe { read_volatile(addr_of!((*sa).protocol)) };
    let proto = match proto {
        6 => PROTO_TCP,
        17 => PROTO_UDP,
        _ => return Err(Skip),
    };
    let user = read_user_addr(sa, v6);
    let port = read_user_port(sa);
    let mut key = SvcKey {
        addr: user.addr,
        port,
        proto,
        family: user.family,
    };
    let mut svc = SvcValue::default();
    if !lookup_service(&mut key, true, &mut svc) {
        return Err(Skip);
    }

    // SAFETY: the helpers take the context pointer of this program type.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if op == Op::Connect && proto == PROTO_UDP {
        let cfg = config();
        if cfg.flags & CFG_UDP_CONNECT_VIA_TC != 0 && netns != cfg.host_netns_cookie {
            return Err(Skip);
        }
    }
    if svc.backends == 0 {
        return Ok(REJECT);
    }

    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut client = [0u8; 16];
    client[..8].copy_from_slice(&netns.to_ne_bytes());
    let affinity = AffinityKey {
        client,
        svc_id: svc.id,
        family: 0,
        kind: AFF_CLIENT_NETNS,
        pad: 0,
    };
    let mut be = BackendValue::default();
    if select_backend(&svc, mix64(cookie), Some(&affinity), now, &mut be).is_none() {
        return Ok(REJECT);
    }
    if be.family != user.family {
        return Ok(REJECT);
    }

    write_user_addr(sa, v6, user.mapped, &be.addr);
    write_user_port(sa, be.port);

    remember(cookie, &be, &user, port, svc.id);
    match op {
        Op::Connect => count(svc.id, 1, 0),
        Op::Sendmsg => count(svc.id, 0, 1),
    }
    Ok(ALLOW)
}

/// Records socket `cookie` talking to `be` for the VIP `user:port`, for getpeername/recvmsg.
/// A datagram socket sends many messages to one backend: the entry is written only when it
/// changes (one lookup instead of one update per datagram). Best effort: without it the
/// application sees the backend instead of the VIP. Not inlined (stack, see `lookup_service`).
#[inline(never)]
fn remember(cookie: u64, be: &BackendValue, user: &UserAddr, port: u16, svc_id: u32) {
    let key = SockKey {
        cookie,
        addr: be.addr,
        port: be.port,
        family: be.family,
        pad: [0; 5],
    };
    if let Some(old) = SOCK.get_ptr(&key) {
        // SAFETY: pointer from a successful LRU lookup; a torn read only causes a rewrite.
        let same = unsafe {
            (*old).vip_port == port
                && (*old).svc_id == svc_id
                && (*old).family == user.family
                && addr_eq(&(*old).vip, &user.addr)
        };
        if same {
            return;
        }
    }
    let value = SockValue {
        vip: user.addr,
        vip_port: port,
        family: user.family,
        pad: 0,
        svc_id,
    };
    let _ = SOCK.insert(&key, &value, 0);
}

/// `getpeername`/`recvmsg`: backend → VIP, for sockets we translated.
#[inline(always)]
fn try_reverse(ctx: &SockAddrContext, v6: bool) -> Result<(), Skip> {
    let sa = ctx.sock_addr;
    let user = read_user_addr(sa, v6);
    let port = read_user_port(sa);
    // SAFETY: the helper takes the context pointer of this program type.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockKey {
        cookie,
        addr: user.addr,
        port,
        family: user.family,
        pad: [0; 5],
    };
    // SAFETY: pointer from a successful LRU lookup, copied out at once.
    let value = unsafe { *SOCK.get_ptr(&key).ok_or(Skip)? };
    if value.family != user.family {
        return Err(Skip);
    }
    write_user_addr(sa, v6, user.mapped, &value.vip);
    write_user_port(sa, value.vip_port);
    Ok(())
}

#[inline(always)]
fn read_user_port(sa: *mut bpf_sock_addr) -> u16 {
    // SAFETY: context field; the port is in network order in the low 16 bits (on little-endian,
    // the truncation keeps the first two bytes of the field, i.e. the port as on the wire).
    #[expect(clippy::cast_possible_truncation, reason = "port in the low 16 bits")]
    let port = unsafe { read_volatile(addr_of!((*sa).user_port)) } as u16;
    port
}

#[inline(always)]
fn write_user_port(sa: *mut bpf_sock_addr, port: u16) {
    // SAFETY: context field writable by connect/sendmsg/recvmsg/getpeername; a 4-byte store.
    unsafe { write_volatile(addr_of_mut!((*sa).user_port), u32::from(port)) };
}

#[inline(always)]
fn read_user_addr(sa: *mut bpf_sock_addr, v6: bool) -> UserAddr {
    let mut addr = [0u8; 16];
    if !v6 {
        // SAFETY: context field, 4-byte load.
        let ip = unsafe { read_volatile(addr_of!((*sa).user_ip4)) };
        addr[..4].copy_from_slice(&ip.to_ne_bytes());
        return UserAddr {
            addr,
            family: FAMILY_V4,
            mapped: false,
        };
    }
    // SAFETY: context fields, one 4-byte load each.
    let w = unsafe {
        [
            read_volatile(addr_of!((*sa).user_ip6[0])),
            read_volatile(addr_of!((*sa).user_ip6[1])),
            read_volatile(addr_of!((*sa).user_ip6[2])),
            read_volatile(addr_of!((*sa).user_ip6[3])),
        ]
    };
    // `::ffff:a.b.c.d`: words 0 and 1 zero, word 2 is the bytes 00 00 ff ff.
    if w[0] == 0 && w[1] == 0 && w[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]) {
        addr[..4].copy_from_slice(&w[3].to_ne_bytes());
        return UserAddr {
            addr,
            family: FAMILY_V4,
            mapped: true,
        };
    }
    addr[..4].copy_from_slice(&w[0].to_ne_bytes());
    addr[4..8].copy_from_slice(&w[1].to_ne_bytes());
    addr[8..12].copy_from_slice(&w[2].to_ne_bytes());
    addr[12..].copy_from_slice(&w[3].to_ne_bytes());
    UserAddr {
        addr,
        family: FAMILY_V6,
        mapped: false,
    }
}

#[inline(always)]
fn write_user_addr(sa: *mut bpf_sock_addr, v6: bool, mapped: bool, addr: &[u8; 16]) {
    let word = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    // SAFETY (all blocks): context fields writable by this program type, 4-byte stores.
    if !v6 {
        unsafe { write_volatile(addr_of_mut!((*sa).user_ip4), word(0)) };
        return;
    }
    if mapped {
        unsafe {
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), 0);
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), 0);
            write_volatile(
                addr_of_mut!((*sa).user_ip6[2]),
                u32::from_ne_bytes([0, 0, 0xff, 0xff]),
            );
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), word(0));
        }
        return;
    }
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip6[0]), word(0));
        write_volatile(addr_of_mut!((*sa).user_ip6[1]), word(4));
        write_volatile(addr_of_mut!((*sa).user_ip6[2]), word(8));
        write_volatile(addr_of_mut!((*sa).user_ip6[3]), word(12));
    }
}
