//! Per-packet load balancing at tc (TCX, Linux >= 6.6; `BPF_FIB_LOOKUP_SRC` needs 6.7), for what
//! socket-LB does not see: NodePort/ExternalIP/LoadBalancer traffic from outside the node, pods
//! whose sockets are outside the attached cgroup, and pods' connected UDP sockets.
//!
//! - Three entry points share one body: `twl_lb_ext_in` (ingress of the uplink and overlay
//!   devices), `twl_lb_pod_in` (ingress of every pod-facing interface: a pod bridge, or each
//!   pod's own veth when pods are routed without a bridge) and `twl_lb_egress` (egress of all of
//!   them). Where a packet comes from decides SNAT, nothing else.
//! - Forward direction (ingress only): a packet to a frontend looks up its flow in [`CT`]; a new
//!   flow gets a Maglev backend (or its affinity one), a forward entry (client → VIP, rewrite to
//!   backend) and a reply entry (backend → client, rewrite back to the VIP). Entries are
//!   validated on every use (idle timeout, slot still holding that backend), so a removed
//!   endpoint gets no more packets and the flow is re-balanced at its next packet, UDP included.
//! - SNAT to the node: from the uplink when the backend is on another node and the service is
//!   `externalTrafficPolicy: Cluster` (else the reply would leave the backend's node directly);
//!   from a pod-facing interface when the FIB sends the backend back out of the very interface
//!   the packet came in on ("hairpin": a pod on the same bridge, whose reply would be bridged
//!   straight back to the client, or the client pod itself behind its own veth; either way the
//!   reply would never cross a hook of ours). A local backend behind *another* pod-facing
//!   interface keeps the client's address: its reply enters that interface, whose hook
//!   translates it. This rests on the FIB, not on the endpoint's `nodeName`, so it holds for
//!   any pod networking and for EndpointSlices that name no node. The address is the one the
//!   FIB would use towards the backend (`BPF_FIB_LOOKUP_SRC`); the port is a random one
//!   of 61000–65535, above the kernel's ephemeral range, claimed with `BPF_NOEXIST` on the reply
//!   key so two flows never share one (another random one when it is taken). A SYN on a flow
//!   an RST closed keeps its backend and port ([`reopen`]): that is the client getting past a
//!   port the backend still holds in TIME_WAIT, which its RST has just ended.
//! - Replies: the reply entry is found at whichever hook the reply crosses (uplink or pod-side
//!   ingress, or egress for host-network backends and for flows the kernel masqueraded itself),
//!   and used only while it is live: an idle one, or a closing one met by a SYN-ACK, belongs to
//!   an earlier flow whose 4-tuple a direct connection now reuses, and is dropped; so is a
//!   closing one whose client sends a SYN to the backend directly ([`retire_closed_reply`]: the
//!   backend may answer it with a bare ACK from TIME_WAIT, which the client must see as is).
//! - After the rewrite, **let the kernel route (`TCX_NEXT`)** unless the stack would drop the
//!   packet: once its source is a node address (an SNATed packet, a reply whose VIP is a node
//!   address, i.e. a NodePort) an ingress packet is a martian and fails the input route's source
//!   validation, and a reply with a VIP source can fail `rp_filter` when the VIP has no route.
//!   Those packets are forwarded with `bpf_fib_lookup` + `bpf_redirect` (neighbour known) or
//!   `bpf_redirect_neigh` (not yet resolved), with the TTL decremented as `ip_forward` would.
//!   Everything else keeps the kernel's routing, netfilter (FORWARD policy, masquerade), MTU and
//!   ICMP handling.
//! - Checksums: `bpf_l3_csum_replace` for the IPv4 header, `bpf_l4_csum_replace` with
//!   `BPF_F_PSEUDO_HDR` for addresses (IPv6: a `bpf_csum_diff` of the 16 bytes), plain for ports;
//!   `BPF_F_MARK_MANGLED_0` keeps an IPv4 UDP checksum of 0 meaning "none".
//! - Not handled (passed unchanged): IP fragments, IPv6 extension headers, VLAN tags, ICMP errors
//!   about translated flows.
//! - Verdicts: `TCX_NEXT` for everything not ours and on any internal error (never drop by
//!   accident), `TC_ACT_SHOT` only for a frontend without backends (kube-proxy rejects those).

//! - Stack: the verifier limits the *sum* of the frames along a call chain to 512 bytes. The
//!   parsed packet, conntrack keys and values and the FIB parameters therefore live in a per-CPU
//!   scratch entry ([`TC_SCRATCH`]); frames keep only small scalars. Per-CPU is safe here: tc
//!   programs run with bottom halves disabled and never nest on a CPU (a redirect happens after
//!   the program returns).

use core::{mem::size_of, ptr::null_mut};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SRC, BPF_NOEXIST, TC_ACT_SHOT,
        bpf_fib_lookup as FibParams, tcx_action_base::TCX_NEXT,
    },
    cty::c_long,
    helpers::{
        bpf_csum_diff, bpf_fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect,
        bpf_redirect_neigh,
    },
    macros::{classifier, map},
    maps::PerCpuArray,
    programs::TcContext,
};
use twill_common::service::{
    AFF_CLIENT_ADDR, AffinityKey, BE_F_NODE_LOCAL, BackendValue, CT_DIR_FORWARD, CT_DIR_REPLY,
    CT_F_SNAT, CT_REFRESH_NS, CT_TIMEOUT_TCP_NS, CT_TIMEOUT_UDP_NS, CtKey, CtValue, FAMILY_V4,
    PROTO_TCP, PROTO_UDP, SNAT_PORT_COUNT, SNAT_PORT_MIN, SVC_F_EXTERNAL_LOCAL, SvcKey, SvcValue,
    mix64,
};

use super::{CT, addr_diff, backend_still, count, lookup_service, select_backend};

/// Where the program is attached.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    /// Ingress of an interface facing the outside (uplink, overlay).
    ExtIngress,
    /// Ingress of a pod-facing interface (a pod bridge or a pod's veth).
    PodIngress,
    /// Egress of any attached interface: replies only.
    Egress,
}

#[classifier]
pub fn twl_lb_ext_in(ctx: TcContext) -> i32 {
    try_lb(&ctx, Hook::ExtIngress).unwrap_or(TCX_NEXT)
}

#[classifier]
pub fn twl_lb_pod_in(ctx: TcContext) -> i32 {
    try_lb(&ctx, Hook::PodIngress).unwrap_or(TCX_NEXT)
}

#[classifier]
pub fn twl_lb_egress(ctx: TcContext) -> i32 {
    try_lb(&ctx, Hook::Egress).unwrap_or(TCX_NEXT)
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IP4_TTL: usize = ETH_HLEN + 8;
const IP4_CSUM: usize = ETH_HLEN + 10;
const IP4_SRC: usize = ETH_HLEN + 12;
const IP4_DST: usize = ETH_HLEN + 16;
const IP6_HOP_LIMIT: usize = ETH_HLEN + 7;
const IP6_SRC: usize = ETH_HLEN + 8;
const IP6_DST: usize = ETH_HLEN + 24;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// Idle timeout of a TCP flow after FIN or RST.
const CT_TIMEOUT_CLOSING_NS: u64 = 10_000_000_000;
/// SNAT ports tried per new flow before giving up (the client retries): with half of the ports
/// held by flows of the last [`CT_TIMEOUT_CLOSING_NS`], 32 random tries all fail once in 4
/// billion flows; 8 failed once in 256 (the 3 s connect timeouts of a NodePort stream).
const SNAT_TRIES: u16 = 32;
/// Conntrack flag (kernel-only): a FIN or RST was seen.
const CT_F_CLOSING: u8 = 0x80;
/// Conntrack flag (kernel-only): an RST was seen (with [`CT_F_CLOSING`]).
const CT_F_RESET: u8 = 0x40;
/// Conntrack flag (kernel-only): the flow was reopened once ([`reopen`]); closed by an RST again,
/// its next SYN opens a new flow (a backend that ignores RSTs in TIME_WAIT, `tcp_rfc1337`,
/// would otherwise answer every SYN on the same port with an ACK until its TIME_WAIT ends).
const CT_F_REOPENED: u8 = 0x20;

/// What [`lookup_flow`] found for a packet's forward key.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Found {
    /// No usable entry: the packet opens a new flow.
    Nothing,
    /// A live entry, copied to `Scratch::back`.
    Live,
    /// A SYN on a flow an RST closed (see [`reopen`]), its entry in `Scratch::back`.
    Reset,
}

/// The parsed headers of a TCP or UDP packet.
#[repr(C)]
pub struct Packet {
    src: [u8; 16],
    dst: [u8; 16],
    /// Extra flags for `bpf_l4_csum_replace` (`BPF_F_MARK_MANGLED_0` for IPv4 UDP).
    csum_flags: u64,
    /// Offset of the L4 header.
    l4: u32,
    /// Offset of the L4 checksum.
    csum_off: u32,
    /// Network order.
    sport: u16,
    /// Network order.
    dport: u16,
    family: u8,
    proto: u8,
    /// TCP flags (0 for UDP).
    tcp_flags: u8,
    pad: u8,
}

/// Per-CPU scratch space of the tc programs (see the module notes).
#[repr(C)]
pub struct Scratch {
    pkt: Packet,
    /// The flow's key: forward key in [`forward`], reply key in [`reply`] and [`new_flow`].
    key: CtKey,
    /// The forward entry being created.
    entry: CtValue,
    /// The reply entry being created, or a copy of the entry being applied.
    back: CtValue,
    fib: FibParams,
    affinity: AffinityKey,
    svc_key: SvcKey,
    svc: SvcValue,
    be: BackendValue,
}

/// The scratch entry (one per CPU).
#[map(name = "TWL_LB_SCRATCH")]
static TC_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Which address/port of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Src,
    Dst,
}

#[inline(always)]
fn try_lb(ctx: &TcContext, hook: Hook) -> Result<i32, c_long> {
    let scratch = TC_SCRATCH.get_ptr_mut(0).ok_or(0)?;
    // SAFETY: this CPU's scratch entry; tc programs do not nest on a CPU (module notes), so
    // nothing else uses it while this program runs.
    let s = unsafe { &mut *scratch };
    if !parse(ctx, &mut s.pkt)? {
        return Ok(TCX_NEXT);
    }
    if hook != Hook::Egress {
        s.svc_key = SvcKey {
            addr: s.pkt.dst,
            port: s.pkt.dport,
            proto: s.pkt.proto,
            family: s.pkt.family,
        };
        if lookup_service(&mut s.svc_key, false, &mut s.svc) {
            return forward(ctx, hook, s);
        }
    }
    reply(ctx, hook, s)
}

/// Parses a TCP or UDP packet over IPv4 or IPv6 into `pkt`; `false` for anything else.
#[inline(always)]
fn parse(ctx: &TcContext, pkt: &mut Packet) -> Result<bool, c_long> {
    let ethertype = u16::from_be(ctx.load::<u16>(12)?);
    let l4 = if ethertype == ETH_P_IP {
        let ver_ihl: u8 = ctx.load(ETH_HLEN)?;
        let ihl = usize::from(ver_ihl & 0x0f) * 4;
        if ver_ihl >> 4 != 4 || ihl < 20 {
            return Ok(false);
        }
        // More-fragments flag or a fragment offset: not translatable (no ports in later
        // fragments), left alone.
        let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6)?);
        if frag & 0x3fff != 0 {
            return Ok(false);
        }
        pkt.proto = ctx.load(ETH_HLEN + 9)?;
        pkt.family = FAMILY_V4;
        pkt.src = [0; 16];
        pkt.dst = [0; 16];
        let src: [u8; 4] = ctx.load(IP4_SRC)?;
        let dst: [u8; 4] = ctx.load(IP4_DST)?;
        pkt.src[..4].copy_from_slice(&src);
        pkt.dst[..4].copy_from_slice(&dst);
        ETH_HLEN + ihl
    } else if ethertype == ETH_P_IPV6 {
        pkt.proto = ctx.load(ETH_HLEN + 6)?;
        pkt.family = twill_common::service::FAMILY_V6;
        pkt.src = ctx.load(IP6_SRC)?;
        pkt.dst = ctx.load(IP6_DST)?;
        ETH_HLEN + 40
    } else {
        return Ok(false);
    };
    let (csum_off, csum_flags, tcp_flags) = match pkt.proto {
        PROTO_TCP => (l4 + 16, 0, ctx.load::<u8>(l4 + 13)?),
        PROTO_UDP if pkt.family == FAMILY_V4 => (l4 + 6, u64::from(BPF_F_MARK_MANGLED_0), 0),
        PROTO_UDP => (l4 + 6, 0, 0),
        _ => return Ok(false),
    };
    pkt.sport = ctx.load(l4)?;
    pkt.dport = ctx.load(l4 + 2)?;
    // Offsets are below 14 + 60 + 16.
    pkt.l4 = l4 as u32;
    pkt.csum_off = csum_off as u32;
    pkt.csum_flags = csum_flags;
    pkt.tcp_flags = tcp_flags;
    Ok(true)
}

/// A packet to a frontend (`s.svc`): translate it to its flow's backend.
#[inline(never)]
fn forward(ctx: &TcContext, hook: Hook, s: &mut Scratch) -> Result<i32, c_long> {
    // SAFETY: no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    packet_key(&mut s.key, &s.pkt, CT_DIR_FORWARD);
    let mut found = lookup_flow(s, now);
    if found == Found::Reset && !reopen(s, now) {
        found = Found::Nothing;
    }
    if found == Found::Nothing && (s.svc.backends == 0 || !new_flow(ctx, hook, s, now)?) {
        return Ok(TC_ACT_SHOT);
    }
    // `s.back` now holds the flow's forward entry.
    rewrite_addr(ctx, &s.pkt, Field::Dst, &s.back.nat_addr)?;
    rewrite_port(ctx, &s.pkt, Field::Dst, s.pkt.dport, s.back.nat_port)?;
    count(s.back.svc_id, 0, 1);
    if s.back.flags & CT_F_SNAT == 0 {
        return Ok(TCX_NEXT);
    }
    rewrite_addr(ctx, &s.pkt, Field::Src, &s.back.alt_addr)?;
    rewrite_port(ctx, &s.pkt, Field::Src, s.pkt.sport, s.back.alt_port)?;
    s.pkt.src = s.back.alt_addr;
    s.pkt.dst = s.back.nat_addr;
    redirect(ctx, s)
}

/// Looks up the forward entry of `s.key` and copies it to `s.back`: [`Found::Live`] (its
/// timestamp refreshed) for a flow in use; [`Found::Nothing`] when there is none, it expired,
/// its backend is gone, or it was closed by FINs and the packet opens a new connection on the
/// same tuple (a SYN: a new flow, as conntrack reopens one, with fresh entries both ways);
/// [`Found::Reset`] for such a SYN on a flow an RST closed (once: see [`CT_F_REOPENED`]).
#[inline(always)]
fn lookup_flow(s: &mut Scratch, now: u64) -> Found {
    let Some(ptr) = CT.get_ptr_mut(&s.key) else {
        return Found::Nothing;
    };
    // SAFETY: pointer from a successful LRU lookup, copied out at once; a torn read can only fail
    // the validation below, which then re-balances the flow.
    s.back = unsafe { *ptr };
    if expired(&s.back, s.pkt.proto, now) {
        return Found::Nothing;
    }
    let reopens =
        s.pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && s.back.flags & CT_F_CLOSING != 0;
    if reopens && s.back.flags & (CT_F_RESET | CT_F_REOPENED) != CT_F_RESET {
        return Found::Nothing;
    }
    if !backend_still(
        s.back.svc_id,
        s.back.slot,
        &s.back.nat_addr,
        s.back.nat_port,
    ) {
        return Found::Nothing;
    }
    if reopens {
        return Found::Reset;
    }
    touch(ptr, &s.back, &s.pkt, now);
    Found::Live
}

/// Reopens the flow in `s.back` (key `s.key`), closed by an RST, for a SYN on the same client
/// tuple: the same backend and SNAT port, both entries live again. This is how a client gets
/// past a SNAT tuple the backend still holds in TIME_WAIT (for 60 s; a closed flow's port is
/// taken again after [`CT_TIMEOUT_CLOSING_NS`]): the backend answers the SYN with an ACK, the
/// client resets the tuple, which ends that TIME_WAIT, and sends its SYN again at once. Given a
/// new random port, that SYN could meet another TIME_WAIT, and the client then waited a whole
/// retransmission timeout. An RST leaves no TIME_WAIT behind, so the tuple is safe to reuse.
/// `false` (a new flow then) when the reply key is another flow's by now.
#[inline(never)]
fn reopen(s: &mut Scratch, now: u64) -> bool {
    s.key.src = s.back.nat_addr;
    s.key.sport = s.back.nat_port;
    if s.back.flags & CT_F_SNAT != 0 {
        s.key.dst = s.back.alt_addr;
        s.key.dport = s.back.alt_port;
    } else {
        s.key.dst = s.pkt.src;
        s.key.dport = s.pkt.sport;
    }
    s.key.dir = CT_DIR_REPLY;
    // An evicted reply entry is written only if no new flow claimed its key meanwhile.
    let (ours, insert_flags) = match CT.get_ptr(&s.key) {
        // SAFETY: pointer from a successful LRU lookup; three fields are read. Compared without
        // branches (each one multiplies the verifier's paths through the forward hook).
        Some(old) => unsafe {
            let diff = addr_diff(&(*old).alt_addr, &s.pkt.src)
                | u64::from((*old).alt_port ^ s.pkt.sport)
                | u64::from((*old).svc_id ^ s.back.svc_id);
            (diff == 0, 0)
        },
        None => (true, u64::from(BPF_NOEXIST)),
    };
    set_entry(
        &mut s.entry,
        (&s.pkt.dst, s.pkt.dport),
        (&s.pkt.src, s.pkt.sport),
        s.back.flags & CT_F_SNAT,
        s.back.slot,
        s.back.svc_id,
        now,
    );
    let written = ours && CT.insert(&s.key, &s.entry, insert_flags).is_ok();
    packet_key(&mut s.key, &s.pkt, CT_DIR_FORWARD);
    if !written {
        return false;
    }
    s.back.flags = (s.back.flags & !(CT_F_CLOSING | CT_F_RESET)) | CT_F_REOPENED;
    s.back.created_ns = now;
    s.back.last_seen_ns = now;
    CT.insert(&s.key, &s.back, 0).is_ok()
}

/// Whether a reply entry is not this packet's: idle past its timeout, or closing while the
/// packet opens a connection (a SYN-ACK). The 4-tuple is then reused by a connection that never
/// crossed our forward path (a client talking to the backend directly, by socket-LB or by its
/// address, from a port a closed flow of the VIP used): translating its packets would break it.
/// A flow of ours reopened on the same tuple has fresh entries (see [`lookup_flow`]).
#[inline(always)]
fn stale_reply(entry: &CtValue, pkt: &Packet, now: u64) -> bool {
    expired(entry, pkt.proto, now)
        || (pkt.tcp_flags & TCP_SYN != 0 && entry.flags & CT_F_CLOSING != 0)
}

#[inline(always)]
fn expired(entry: &CtValue, proto: u8, now: u64) -> bool {
    let timeout = if entry.flags & CT_F_CLOSING != 0 {
        CT_TIMEOUT_CLOSING_NS
    } else if proto == PROTO_TCP {
        CT_TIMEOUT_TCP_NS
    } else {
        CT_TIMEOUT_UDP_NS
    };
    now.wrapping_sub(entry.last_seen_ns) > timeout
}

/// Refreshes `last_seen_ns` (at most every [`CT_REFRESH_NS`]) and marks a closing TCP flow
/// (and one an RST closed).
#[inline(always)]
fn touch(ptr: *mut CtValue, entry: &CtValue, pkt: &Packet, now: u64) {
    let mark = if pkt.tcp_flags & TCP_RST != 0 {
        CT_F_CLOSING | CT_F_RESET
    } else if pkt.tcp_flags & TCP_FIN != 0 {
        CT_F_CLOSING
    } else {
        0
    };
    let closing = entry.flags & mark != mark;
    // SAFETY: pointer from a successful LRU lookup; racing writers can only lose a refresh.
    unsafe {
        if closing {
            (*ptr).flags = entry.flags | mark;
        }
        if closing || now.wrapping_sub(entry.last_seen_ns) > CT_REFRESH_NS {
            (*ptr).last_seen_ns = now;
        }
    }
}

/// Balances a new flow of `s.svc`: chooses the backend, decides SNAT, writes the reply and the
/// forward conntrack entries, and leaves the forward entry in `s.back`. `false`: drop the packet
/// (no backend, or no free SNAT port; the client retries).
#[inline(never)]
fn new_flow(ctx: &TcContext, hook: Hook, s: &mut Scratch, now: u64) -> Result<bool, c_long> {
    let hash = flow_hash(&s.pkt);
    s.affinity = AffinityKey {
        client: s.pkt.src,
        svc_id: s.svc.id,
        family: s.pkt.family,
        kind: AFF_CLIENT_ADDR,
        pad: 0,
    };
    let Some(slot) = select_backend(&s.svc, hash, Some(&s.affinity), now, &mut s.be) else {
        return Ok(false);
    };
    if s.be.family != s.pkt.family {
        return Ok(false);
    }
    let local = s.be.flags & BE_F_NODE_LOCAL != 0;
    // From a pod-facing interface the FIB decides (hairpin only, see the module notes).
    let want_snat = match hook {
        Hook::PodIngress => true,
        Hook::ExtIngress => !local && s.svc.flags & SVC_F_EXTERNAL_LOCAL == 0,
        Hook::Egress => false,
    };

    set_entry(
        &mut s.entry,
        (&s.be.addr, s.be.port),
        (&[0; 16], 0),
        0,
        slot,
        s.svc.id,
        now,
    );
    set_entry(
        &mut s.back,
        (&s.pkt.dst, s.pkt.dport),
        (&s.pkt.src, s.pkt.sport),
        0,
        slot,
        s.svc.id,
        now,
    );
    s.key.src = s.be.addr;
    s.key.sport = s.be.port;
    s.key.dir = CT_DIR_REPLY;
    if want_snat && source_towards(ctx, s, hook == Hook::PodIngress) {
        // `source_towards` left the node's address in `s.entry.alt_addr`.
        s.entry.flags = CT_F_SNAT;
        s.back.flags = CT_F_SNAT;
        s.key.dst = s.entry.alt_addr;
        // A random port per try, not one derived from the flow: a SYN that found its ports
        // taken is retransmitted with the same 5-tuple, and ports derived from it made every
        // retransmission probe the same taken ports until the client gave up.
        let mut tries = 0;
        loop {
            if tries == SNAT_TRIES {
                return Ok(false);
            }
            // SAFETY: no arguments.
            let random = unsafe { bpf_get_prandom_u32() };
            #[expect(clippy::cast_possible_truncation, reason = "below SNAT_PORT_COUNT")]
            let port = SNAT_PORT_MIN + (random % u32::from(SNAT_PORT_COUNT)) as u16;
            s.key.dport = port.to_be();
            if claim(s, now) {
                s.entry.alt_port = port.to_be();
                break;
            }
            tries += 1;
        }
    } else {
        s.key.dst = s.pkt.src;
        s.key.dport = s.pkt.sport;
        CT.insert(&s.key, &s.back, 0).map_err(c_long::from)?;
    }
    packet_key(&mut s.key, &s.pkt, CT_DIR_FORWARD);
    CT.insert(&s.key, &s.entry, 0).map_err(c_long::from)?;
    count(s.svc.id, 1, 0);
    s.back = s.entry;
    Ok(true)
}

/// Sets `key` to the packet's own tuple, in direction `dir`.
#[inline(always)]
fn packet_key(key: &mut CtKey, pkt: &Packet, dir: u8) {
    key.src = pkt.src;
    key.dst = pkt.dst;
    key.sport = pkt.sport;
    key.dport = pkt.dport;
    key.proto = pkt.proto;
    key.family = pkt.family;
    key.dir = dir;
    key.pad = 0;
}

/// Writes a new conntrack entry of backend `slot` of service `svc_id`, created `now`: rewrite to
/// `nat` and remember `alt` (address, port each). Field by field: a struct literal would be built
/// on the stack first.
#[inline(always)]
fn set_entry(
    e: &mut CtValue,
    nat: (&[u8; 16], u16),
    alt: (&[u8; 16], u16),
    flags: u8,
    slot: u16,
    svc_id: u32,
    now: u64,
) {
    e.nat_addr = *nat.0;
    e.alt_addr = *alt.0;
    e.nat_port = nat.1;
    e.alt_port = alt.1;
    e.flags = flags;
    e.pad = 0;
    e.slot = slot;
    e.svc_id = svc_id;
    e.pad2 = 0;
    e.created_ns = now;
    e.last_seen_ns = now;
}

/// Claims the SNAT reply key `s.key` for `s.back`: free, or held by an idle (expired) flow.
#[inline(never)]
fn claim(s: &mut Scratch, now: u64) -> bool {
    if CT.insert(&s.key, &s.back, u64::from(BPF_NOEXIST)).is_ok() {
        return true;
    }
    match CT.get_ptr(&s.key) {
        // SAFETY: pointer from a successful LRU lookup; only two fields are read.
        Some(old) if expired(unsafe { &*old }, s.key.proto, now) => {
            CT.insert(&s.key, &s.back, 0).is_ok()
        }
        _ => false,
    }
}

/// A packet from a backend: translate it back if it belongs to one of our flows.
#[inline(never)]
fn reply(ctx: &TcContext, hook: Hook, s: &mut Scratch) -> Result<i32, c_long> {
    packet_key(&mut s.key, &s.pkt, CT_DIR_REPLY);
    let Some(ptr) = CT.get_ptr_mut(&s.key) else {
        if s.pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            retire_closed_reply(s);
        }
        return Ok(TCX_NEXT);
    };
    // SAFETY: pointer from a successful LRU lookup, copied out at once.
    s.back = unsafe { *ptr };
    // SAFETY: no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if stale_reply(&s.back, &s.pkt, now) {
        // Best effort: the LRU would evict it anyway.
        let _ = CT.remove(&s.key);
        return Ok(TCX_NEXT);
    }
    touch(ptr, &s.back, &s.pkt, now);

    rewrite_addr(ctx, &s.pkt, Field::Src, &s.back.nat_addr)?;
    rewrite_port(ctx, &s.pkt, Field::Src, s.pkt.sport, s.back.nat_port)?;
    if s.back.flags & CT_F_SNAT != 0 {
        rewrite_addr(ctx, &s.pkt, Field::Dst, &s.back.alt_addr)?;
        rewrite_port(ctx, &s.pkt, Field::Dst, s.pkt.dport, s.back.alt_port)?;
        s.pkt.dst = s.back.alt_addr;
    }
    if hook == Hook::Egress {
        return Ok(TCX_NEXT);
    }
    s.pkt.src = s.back.nat_addr;
    redirect(ctx, s)
}

/// A SYN that is no packet of ours (no frontend, no reply entry) towards the backend end of a
/// closing flow's reply entry, from that flow's client tuple: a direct connection (socket-LB, or
/// the backend's address) reusing the tuple of a closed flow of ours. The entry is removed, so
/// the backend's answer reaches the client untranslated. A SYN-ACK would find the entry stale
/// ([`stale_reply`]), but a backend holding the tuple in TIME_WAIT answers an older SYN with a
/// bare ACK: translated to come from the frontend, it never reached the connecting socket, which
/// would have reset the tuple (ending that TIME_WAIT) and sent its SYN again at once; the client
/// waited a whole retransmission timeout (1 s) instead. A live entry is left alone. Our own SYNs
/// (the forward path's, seen again at egress) find their flow's entries fresh (see
/// [`lookup_flow`]).
#[inline(never)]
fn retire_closed_reply(s: &mut Scratch) {
    s.key.src = s.pkt.dst;
    s.key.dst = s.pkt.src;
    s.key.sport = s.pkt.dport;
    s.key.dport = s.pkt.sport;
    let closing = match CT.get_ptr(&s.key) {
        // SAFETY: pointer from a successful LRU lookup; one field is read.
        Some(entry) => unsafe { (*entry).flags & CT_F_CLOSING != 0 },
        None => false,
    };
    if closing {
        // Best effort: the LRU would evict it anyway.
        let _ = CT.remove(&s.key);
    }
}

/// Forwards a translated ingress packet (now `s.pkt.src` → `s.pkt.dst`) itself (see the
/// module notes): FIB lookup, then `bpf_redirect` with the neighbour's MAC or
/// `bpf_redirect_neigh`. Anything the FIB does not forward (a local destination, forwarding
/// disabled, no route) goes to the stack.
#[inline(never)]
fn redirect(ctx: &TcContext, s: &mut Scratch) -> Result<i32, c_long> {
    fib_params(ctx, &mut s.fib, &s.pkt);
    // SAFETY: `s.fib` is a properly sized, initialised `bpf_fib_lookup` in map memory.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &raw mut s.fib,
            size_of::<FibParams>() as i32,
            0,
        )
    };
    #[expect(
        clippy::cast_sign_loss,
        reason = "compared with the helper's return codes"
    )]
    let rc = rc as u32;
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return Ok(TCX_NEXT);
    }
    if !decrement_ttl(ctx, s.pkt.family)? {
        // TTL exhausted: the stack sends the ICMP error.
        return Ok(TCX_NEXT);
    }
    let verdict = if rc == BPF_FIB_LKUP_RET_SUCCESS {
        ctx.store(0, &s.fib.dmac, 0)?;
        ctx.store(6, &s.fib.smac, 0)?;
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(s.fib.ifindex, 0) }
    } else {
        // SAFETY: a null `params` asks the kernel to resolve the next hop itself.
        unsafe { bpf_redirect_neigh(s.fib.ifindex, null_mut(), 0, 0) }
    };
    #[expect(clippy::cast_possible_truncation, reason = "TC verdicts are small")]
    Ok(verdict as i32)
}

/// Puts the address the node would use towards the chosen backend (`s.be`) in
/// `s.entry.alt_addr` (`BPF_FIB_LOOKUP_SRC`, Linux >= 6.7); `false` when the FIB has no
/// forwarding route, or, with `hairpin_only`, when that route leaves through another interface
/// than the packet's own (the reply then crosses a hook of ours without SNAT).
#[inline(never)]
fn source_towards(ctx: &TcContext, s: &mut Scratch, hairpin_only: bool) -> bool {
    let real_dst = s.pkt.dst;
    s.pkt.dst = s.be.addr;
    fib_params(ctx, &mut s.fib, &s.pkt);
    s.pkt.dst = real_dst;
    let in_ifindex = s.fib.ifindex;
    // SAFETY: as in `redirect`.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &raw mut s.fib,
            size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_SRC,
        )
    };
    #[expect(
        clippy::cast_sign_loss,
        reason = "compared with the helper's return codes"
    )]
    let rc = rc as u32;
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return false;
    }
    // The helper wrote the egress interface over the ingress one.
    if hairpin_only && s.fib.ifindex != in_ifindex {
        return false;
    }
    let out = &mut s.entry.alt_addr;
    // SAFETY: the helper filled the union member of the family we asked for.
    unsafe {
        if s.pkt.family == FAMILY_V4 {
            out[..4].copy_from_slice(&s.fib.__bindgen_anon_3.ipv4_src.to_ne_bytes());
        } else {
            let words = s.fib.__bindgen_anon_3.ipv6_src;
            out[..4].copy_from_slice(&words[0].to_ne_bytes());
            out[4..8].copy_from_slice(&words[1].to_ne_bytes());
            out[8..12].copy_from_slice(&words[2].to_ne_bytes());
            out[12..].copy_from_slice(&words[3].to_ne_bytes());
        }
    }
    true
}

/// FIB lookup parameters for `pkt.src` → `pkt.dst` arriving on the packet's interface.
#[inline(always)]
fn fib_params(ctx: &TcContext, fib: &mut FibParams, pkt: &Packet) {
    // SAFETY: `bpf_fib_lookup` is plain data; all zero is its "no options" value.
    *fib = unsafe { core::mem::zeroed() };
    fib.l4_protocol = pkt.proto;
    fib.sport = pkt.sport;
    fib.dport = pkt.dport;
    // SAFETY: the context pointer is the program's `__sk_buff`.
    fib.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let word = |a: &[u8; 16], i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    if pkt.family == FAMILY_V4 {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = word(&pkt.src, 0);
        fib.__bindgen_anon_4.ipv4_dst = word(&pkt.dst, 0);
    } else {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = [
            word(&pkt.src, 0),
            word(&pkt.src, 4),
            word(&pkt.src, 8),
            word(&pkt.src, 12),
        ];
        fib.__bindgen_anon_4.ipv6_dst = [
            word(&pkt.dst, 0),
            word(&pkt.dst, 4),
            word(&pkt.dst, 8),
            word(&pkt.dst, 12),
        ];
    }
}

/// Decrements the IPv4 TTL / IPv6 hop limit of a packet we forward ourselves; `false` when it
/// would reach 0.
#[inline(always)]
fn decrement_ttl(ctx: &TcContext, family: u8) -> Result<bool, c_long> {
    if family == FAMILY_V4 {
        let old: [u8; 2] = ctx.load(IP4_TTL)?;
        if old[0] <= 1 {
            return Ok(false);
        }
        let new = [old[0] - 1, old[1]];
        ctx.l3_csum_replace(
            IP4_CSUM,
            u64::from(u16::from_ne_bytes(old)),
            u64::from(u16::from_ne_bytes(new)),
            2,
        )?;
        ctx.store(IP4_TTL, &new[0], 0)?;
    } else {
        let hops: u8 = ctx.load(IP6_HOP_LIMIT)?;
        if hops <= 1 {
            return Ok(false);
        }
        ctx.store(IP6_HOP_LIMIT, &(hops - 1), 0)?;
    }
    Ok(true)
}

/// Rewrites the source or destination address (from its value in `pkt`), fixing the IPv4 header
/// and L4 checksums.
#[inline(always)]
fn rewrite_addr(ctx: &TcContext, pkt: &Packet, field: Field, new: &[u8; 16]) -> Result<(), c_long> {
    match rewrite_addr_raw(ctx, pkt, field, new) {
        0 => Ok(()),
        err => Err(err),
    }
}

/// [`rewrite_addr`] returning the helpers' error code (0: done): not inlined (its IPv6 buffers
/// stay in its own frame), and the code comes back in a register (no `Result` out-pointer into
/// the caller's frame).
#[inline(never)]
fn rewrite_addr_raw(ctx: &TcContext, pkt: &Packet, field: Field, new: &[u8; 16]) -> c_long {
    let done = |r: Result<(), c_long>| r.err().unwrap_or(0);
    let csum_off = pkt.csum_off as usize;
    let (old, off4, off6) = if field == Field::Dst {
        (&pkt.dst, IP4_DST, IP6_DST)
    } else {
        (&pkt.src, IP4_SRC, IP6_SRC)
    };
    if pkt.family == FAMILY_V4 {
        let from = u32::from_ne_bytes([old[0], old[1], old[2], old[3]]);
        let to = u32::from_ne_bytes([new[0], new[1], new[2], new[3]]);
        done(
            ctx.l4_csum_replace(
                csum_off,
                u64::from(from),
                u64::from(to),
                u64::from(BPF_F_PSEUDO_HDR) | 4 | pkt.csum_flags,
            )
            .and_then(|()| ctx.l3_csum_replace(IP4_CSUM, u64::from(from), u64::from(to), 4))
            .and_then(|()| ctx.store(off4, &to, 0)),
        )
    } else {
        let mut from = *old;
        let mut to = *new;
        // SAFETY: both buffers are 16 initialised bytes on our stack.
        let diff =
            unsafe { bpf_csum_diff(from.as_mut_ptr().cast(), 16, to.as_mut_ptr().cast(), 16, 0) };
        if diff < 0 {
            return diff;
        }
        #[expect(clippy::cast_sign_loss, reason = "checked non-negative")]
        let diff = diff as u64;
        done(
            ctx.l4_csum_replace(
                csum_off,
                0,
                diff,
                u64::from(BPF_F_PSEUDO_HDR) | pkt.csum_flags,
            )
            .and_then(|()| ctx.store(off6, &to, 0)),
        )
    }
}

/// Rewrites the source or destination port (network order values), fixing the L4 checksum.
#[inline(always)]
fn rewrite_port(
    ctx: &TcContext,
    pkt: &Packet,
    field: Field,
    old: u16,
    new: u16,
) -> Result<(), c_long> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(
        pkt.csum_off as usize,
        u64::from(old),
        u64::from(new),
        2 | pkt.csum_flags,
    )?;
    let l4 = pkt.l4 as usize;
    let off = if field == Field::Dst { l4 + 2 } else { l4 };
    ctx.store(off, &new, 0)
}

/// Hash of the 5-tuple, for Maglev (one choice per flow; connections of one client spread).
#[inline(always)]
fn flow_hash(pkt: &Packet) -> u64 {
    let fold = |a: &[u8; 16]| {
        let mut x = 0u64;
        let mut i = 0;
        while i < 16 {
            x = x.rotate_left(8) ^ u64::from(a[i]);
            i += 1;
        }
        x
    };
    mix64(
        fold(&pkt.src)
            ^ fold(&pkt.dst).rotate_left(17)
            ^ (u64::from(pkt.sport) << 32)
            ^ (u64::from(pkt.dport) << 16)
            ^ u64::from(pkt.proto),
    )
}
