//! What twill's `inet twill` table holds, rendered from [`LbService`]s, and the transaction a
//! plan turns into (pure; every function here runs without root).
//!
//! Layout (`nft list table inet twill` shows it in this shape):
//! ```text
//! map svc4 { ipv4_addr . inet_proto . inet_service : verdict }   ClusterIP, ExternalIP, LB IPs
//! map svc6 { ipv6_addr . inet_proto . inet_service : verdict }
//! map np4/np6 { inet_proto . inet_service : verdict }            NodePorts
//! set noep4/noep6, noepnp4/noepnp6                               frontends without endpoints
//! set hairpin4/hairpin6 { addr . addr }                          every backend, "x . x"
//! chain services   { ip daddr . meta l4proto . th dport vmap @svc4; ... ;
//!                    fib daddr type local ... meta l4proto . th dport vmap @np4; ... }
//! chain nat_prerouting / nat_output (dstnat): jump services
//! chain nat_postrouting (srcnat): masquerade marked packets; masquerade hairpin
//! chain filter_input / filter_forward / filter_output: reject new flows to noep*
//! chain s<id>     one per frontend with endpoints: the endpoint choice and the DNAT
//! set a<id>-<hex> one per backend of a sessionAffinity frontend (dynamic, timeout)
//! ```
//!
//! Why:
//! - **Service lookup is one hash lookup** in a verdict map keyed on `daddr . l4proto . dport`
//!   (kube-proxy's nftables layout): the cost per packet does not grow with the number of
//!   services, and adding or removing a frontend is one element.
//! - **Endpoint choice by sequential `numgen random mod (n-k)` splits**, one rule per backend:
//!   rule k catches 1/(n-k) of what rules 0..k left, so each backend gets 1/n (iptables'
//!   `statistic` split in nft form). Not a `numgen ... vmap {..}`: every anonymous map costs the
//!   kernel an O(number of sets) name allocation, which made a full sync of 10k services x 10
//!   endpoints take 15 s here; without them it needs no set at all. Each rule carries its own
//!   backend's decisions (masquerade mark, affinity update), so no per-endpoint chain is
//!   needed: one chain and n rules per frontend. The O(n) rule walk happens only for a
//!   connection's first packet (NAT chains see nothing else).
//! - **sessionAffinity: ClientIP** is a dynamic set of client addresses per backend with the
//!   affinity timeout; the frontend chain first sends a known client back to its backend
//!   (refreshing the entry), and every choice adds the client to the chosen backend's set
//!   (kube-proxy's `recent`/affinity-set scheme). A removed backend takes its set with it, so
//!   its clients re-balance at once.
//! - **Masquerade**: a rule marks its packet (`meta mark | 0x4000`) when the frontend is external
//!   (NodePort, ExternalIP, LB IP) with `externalTrafficPolicy: Cluster` and the backend is on
//!   another node, so the reply comes back through this node; local backends keep the client's
//!   address (Cilium's NodePort SNAT rule, the same as the eBPF dataplane). Hairpin (a pod
//!   reaching itself through a service) is caught in postrouting by `saddr . daddr @hairpinN`,
//!   whose elements are `b . b` for every backend address b (nft cannot compare two fields).
//! - **No endpoints**: the frontend sits in `noep*` instead, and new flows to it are rejected
//!   (ICMP port unreachable) in the filter hooks, as kube-proxy does.
//! - **Everything needed to read the table back is in it**: a frontend's id, kind, name and
//!   flags are the comment of its map element; a backend's node locality is its rule's comment;
//!   so a restarted agent re-derives the same [`LbService`]s and plans nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::expr::{
    BASE_NETWORK, BASE_TRANSPORT, CMP_EQ, CMP_NEQ, CT_STATE, CT_STATUS, DYNSET_UPDATE, Expr,
    FIB_ADDRTYPE, FIB_F_DADDR, ICMPX_PORT_UNREACH, Imm, META_L4PROTO, META_MARK, META_NFPROTO,
    NAT_DNAT, NAT_F_PROTO_SPECIFIED, NAT_F_RANDOM_FULLY, NG_RANDOM, REJECT_ICMPX, VERDICT_JUMP,
    reg32,
};
use crate::services::lb::{
    Backend, BackendState, FrontendKey, FrontendKind, LbPlan, LbService, Proto,
};

/// The table twill owns (family `inet`).
pub const TABLE: &str = "twill";
/// The packet mark bit asking `nat_postrouting` to masquerade (kube-proxy's bit).
pub const MASQ_MARK: u32 = 0x4000;
/// Longest comment written (the userdata TLV holds at most 255 bytes).
const MAX_COMMENT: usize = 200;
/// Capacity of each affinity set (clients per backend).
pub const AFFINITY_SET_SIZE: u32 = 65_536;

const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const RTN_LOCAL: u32 = 2;
/// `IPS_DST_NAT`.
const IPS_DST_NAT: u32 = 0x20;
/// `NF_CT_STATE_BIT(IP_CT_NEW)`.
const CT_STATE_NEW: u32 = 0x8;

// nft's datatype ids, for the key type (informational for the kernel, used by `nft list`).
const T_IPV4: u32 = 7;
const T_IPV6: u32 = 8;
const T_PROTO: u32 = 12;
const T_SERVICE: u32 = 13;
/// `NFT_DATA_VERDICT`.
pub const DATA_VERDICT_TYPE: u32 = 0xffff_ff00;
/// `NFT_SET_MAP`.
pub const SET_MAP: u32 = 0x8;
/// `NFT_SET_TIMEOUT`.
pub const SET_TIMEOUT: u32 = 0x10;
/// `NFT_SET_EVAL`.
pub const SET_EVAL: u32 = 0x20;

fn concat_type(types: &[u32]) -> u32 {
    types.iter().fold(0, |acc, t| (acc << 6) | t)
}

/// A set or map of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetDef {
    /// Name.
    pub name: String,
    /// `NFT_SET_*` flags.
    pub flags: u32,
    /// nft datatype of the key.
    pub key_type: u32,
    /// Key length in bytes.
    pub key_len: u32,
    /// Whether it maps to verdicts.
    pub verdict_map: bool,
    /// Default element timeout.
    pub timeout_ms: Option<u64>,
    /// Maximum number of elements.
    pub size: Option<u32>,
}

/// A base chain's hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hook {
    /// `NF_INET_*`.
    pub hooknum: u32,
    /// Priority.
    pub priority: i32,
    /// `nat` or `filter`.
    pub ty: &'static str,
}

/// A chain of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainDef {
    /// Name.
    pub name: String,
    /// Hook, for base chains.
    pub hook: Option<Hook>,
}

/// A rule: expressions and an optional comment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Expressions.
    pub exprs: Vec<Expr>,
    /// Comment (userdata).
    pub comment: Option<String>,
}

/// The map or set a frontend's record lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RecordSet {
    /// `svc4` / `svc6`: an address frontend with endpoints.
    Svc(bool),
    /// `np4` / `np6`: a NodePort with endpoints.
    NodePort(bool),
    /// `noep4` / `noep6`: an address frontend without endpoints.
    NoEp(bool),
    /// `noepnp4` / `noepnp6`: a NodePort without endpoints.
    NoEpNodePort(bool),
}

impl RecordSet {
    /// Every record set.
    pub const ALL: [RecordSet; 8] = [
        RecordSet::Svc(false),
        RecordSet::Svc(true),
        RecordSet::NodePort(false),
        RecordSet::NodePort(true),
        RecordSet::NoEp(false),
        RecordSet::NoEp(true),
        RecordSet::NoEpNodePort(false),
        RecordSet::NoEpNodePort(true),
    ];

    /// The set's name.
    pub fn name(self) -> &'static str {
        match self {
            RecordSet::Svc(false) => "svc4",
            RecordSet::Svc(true) => "svc6",
            RecordSet::NodePort(false) => "np4",
            RecordSet::NodePort(true) => "np6",
            RecordSet::NoEp(false) => "noep4",
            RecordSet::NoEp(true) => "noep6",
            RecordSet::NoEpNodePort(false) => "noepnp4",
            RecordSet::NoEpNodePort(true) => "noepnp6",
        }
    }

    fn v6(self) -> bool {
        match self {
            RecordSet::Svc(v)
            | RecordSet::NodePort(v)
            | RecordSet::NoEp(v)
            | RecordSet::NoEpNodePort(v) => v,
        }
    }

    fn node_port(self) -> bool {
        matches!(self, RecordSet::NodePort(_) | RecordSet::NoEpNodePort(_))
    }

    fn verdict_map(self) -> bool {
        matches!(self, RecordSet::Svc(_) | RecordSet::NodePort(_))
    }

    fn def(self) -> SetDef {
        let (key_type, key_len) = match (self.node_port(), self.v6()) {
            (true, _) => (concat_type(&[T_PROTO, T_SERVICE]), 8),
            (false, false) => (concat_type(&[T_IPV4, T_PROTO, T_SERVICE]), 12),
            (false, true) => (concat_type(&[T_IPV6, T_PROTO, T_SERVICE]), 24),
        };
        SetDef {
            name: self.name().into(),
            flags: if self.verdict_map() { SET_MAP } else { 0 },
            key_type,
            key_len,
            verdict_map: self.verdict_map(),
            timeout_ms: None,
            size: None,
        }
    }
}

/// The hairpin set of a family.
pub fn hairpin_set(v6: bool) -> &'static str {
    if v6 { "hairpin6" } else { "hairpin4" }
}

/// A frontend's element: where, its key, the chain it jumps to, its comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The map or set.
    pub set: RecordSet,
    /// The element key.
    pub key: Vec<u8>,
    /// `goto` target (verdict maps).
    pub chain: Option<String>,
    /// The comment: `<id> <kind> <flags> <affinity secs|-> <name>`.
    pub comment: String,
}

/// Every static set and map.
pub fn static_sets() -> Vec<SetDef> {
    let mut out: Vec<SetDef> = RecordSet::ALL.iter().map(|s| s.def()).collect();
    for v6 in [false, true] {
        let (t, l) = if v6 { (T_IPV6, 32) } else { (T_IPV4, 8) };
        out.push(SetDef {
            name: hairpin_set(v6).into(),
            flags: 0,
            key_type: concat_type(&[t, t]),
            key_len: l,
            verdict_map: false,
            timeout_ms: None,
            size: None,
        });
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Expression helpers.

fn meta(key: u32, dreg: u32) -> Expr {
    Expr::Meta { key, dreg }
}

fn cmp(sreg: u32, op: u32, data: impl Into<Vec<u8>>) -> Expr {
    Expr::Cmp {
        sreg,
        op,
        data: data.into(),
    }
}

fn payload(base: u32, offset: u32, len: u32, dreg: u32) -> Expr {
    Expr::Payload {
        base,
        offset,
        len,
        dreg,
    }
}

fn nfproto(v6: bool) -> [Expr; 2] {
    [
        meta(META_NFPROTO, 1),
        cmp(
            1,
            CMP_EQ,
            vec![if v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 }],
        ),
    ]
}

/// `(daddr offset, length)` in the network header.
fn daddr(v6: bool) -> (u32, u32) {
    if v6 { (24, 16) } else { (16, 4) }
}

fn saddr(v6: bool) -> (u32, u32) {
    if v6 { (8, 16) } else { (12, 4) }
}

/// `daddr . l4proto . dport` into registers from 1.
fn addr_proto_port(v6: bool) -> Vec<Expr> {
    let (off, len) = daddr(v6);
    let words = len / 4;
    vec![
        payload(BASE_NETWORK, off, len, 1),
        meta(META_L4PROTO, reg32(words)),
        payload(BASE_TRANSPORT, 2, 2, reg32(words + 1)),
    ]
}

/// `l4proto . dport` into registers from 1.
fn proto_port() -> Vec<Expr> {
    vec![
        meta(META_L4PROTO, 1),
        payload(BASE_TRANSPORT, 2, 2, reg32(1)),
    ]
}

fn fib_local() -> [Expr; 2] {
    [
        Expr::Fib {
            dreg: 1,
            result: FIB_ADDRTYPE,
            flags: FIB_F_DADDR,
        },
        cmp(1, CMP_EQ, RTN_LOCAL.to_ne_bytes()),
    ]
}

/// `ip daddr != 127.0.0.0/8` / `ip6 daddr != ::1` (NodePorts are not served on loopback).
fn not_loopback(v6: bool) -> Vec<Expr> {
    if v6 {
        vec![
            payload(BASE_NETWORK, 24, 16, 1),
            cmp(1, CMP_NEQ, Ipv6Addr::LOCALHOST.octets()),
        ]
    } else {
        vec![payload(BASE_NETWORK, 16, 1, 1), cmp(1, CMP_NEQ, vec![127])]
    }
}

fn ct_bit(key: u32, bit: u32) -> [Expr; 3] {
    [
        Expr::Ct { key, dreg: 1 },
        Expr::Bitwise {
            sreg: 1,
            dreg: 1,
            mask: bit.to_ne_bytes().to_vec(),
            xor: vec![0; 4],
        },
        cmp(1, CMP_NEQ, vec![0; 4]),
    ]
}

fn lookup(set: &str, dreg: Option<u32>) -> Expr {
    Expr::Lookup {
        set: set.into(),
        sreg: 1,
        dreg,
    }
}

fn jump(chain: &str) -> Expr {
    Expr::Immediate {
        dreg: 0,
        data: Imm::Verdict {
            code: VERDICT_JUMP,
            chain: Some(chain.into()),
        },
    }
}

fn reject() -> Expr {
    Expr::Reject {
        ty: REJECT_ICMPX,
        code: ICMPX_PORT_UNREACH,
    }
}

fn masquerade() -> Expr {
    Expr::Masq {
        flags: NAT_F_RANDOM_FULLY,
    }
}

/// `meta mark set meta mark | MASQ_MARK`.
fn set_masq_mark() -> [Expr; 3] {
    [
        meta(META_MARK, 1),
        Expr::Bitwise {
            sreg: 1,
            dreg: 1,
            mask: (!MASQ_MARK).to_ne_bytes().to_vec(),
            xor: MASQ_MARK.to_ne_bytes().to_vec(),
        },
        Expr::MetaSet {
            key: META_MARK,
            sreg: 1,
        },
    ]
}

fn rule(exprs: Vec<Expr>) -> Rule {
    Rule {
        exprs,
        comment: None,
    }
}

// ---------------------------------------------------------------------------------------------
// The static chains.

/// `services`: the dispatch chain both dstnat hooks jump to.
pub const SERVICES: &str = "services";

/// Every static chain with its rules, in creation order (`services` first: the base chains
/// jump to it).
pub fn static_chains() -> Vec<(ChainDef, Vec<Rule>)> {
    let chain = |name: &str, hook: Option<Hook>| ChainDef {
        name: name.into(),
        hook,
    };
    let nat = |hooknum, priority| {
        Some(Hook {
            hooknum,
            priority,
            ty: "nat",
        })
    };
    let filter = |hooknum| {
        Some(Hook {
            hooknum,
            priority: -10,
            ty: "filter",
        })
    };
    let mut services = Vec::new();
    for v6 in [false, true] {
        let mut e = nfproto(v6).to_vec();
        e.extend(addr_proto_port(v6));
        e.push(lookup(RecordSet::Svc(v6).name(), Some(0)));
        services.push(rule(e));
    }
    for v6 in [false, true] {
        let mut e = fib_local().to_vec();
        e.extend(nfproto(v6));
        e.extend(not_loopback(v6));
        e.extend(proto_port());
        e.push(lookup(RecordSet::NodePort(v6).name(), Some(0)));
        services.push(rule(e));
    }
    let mut post = Vec::new();
    {
        let mut e = vec![
            meta(META_MARK, 1),
            Expr::Bitwise {
                sreg: 1,
                dreg: 1,
                mask: MASQ_MARK.to_ne_bytes().to_vec(),
                xor: vec![0; 4],
            },
            cmp(1, CMP_EQ, MASQ_MARK.to_ne_bytes()),
            meta(META_MARK, 1),
            Expr::Bitwise {
                sreg: 1,
                dreg: 1,
                mask: (!MASQ_MARK).to_ne_bytes().to_vec(),
                xor: vec![0; 4],
            },
            Expr::MetaSet {
                key: META_MARK,
                sreg: 1,
            },
        ];
        e.push(masquerade());
        post.push(rule(e));
    }
    for v6 in [false, true] {
        let mut e = ct_bit(CT_STATUS, IPS_DST_NAT).to_vec();
        e.extend(nfproto(v6));
        let (so, len) = saddr(v6);
        let (dof, _) = daddr(v6);
        e.push(payload(BASE_NETWORK, so, len, 1));
        e.push(payload(BASE_NETWORK, dof, len, reg32(len / 4)));
        e.push(lookup(hairpin_set(v6), None));
        e.push(masquerade());
        post.push(rule(e));
    }
    let noep = |node_ports: bool| {
        let mut rules = Vec::new();
        for v6 in [false, true] {
            let mut e = ct_bit(CT_STATE, CT_STATE_NEW).to_vec();
            e.extend(nfproto(v6));
            e.extend(addr_proto_port(v6));
            e.push(lookup(RecordSet::NoEp(v6).name(), None));
            e.push(reject());
            rules.push(rule(e));
        }
        if node_ports {
            for v6 in [false, true] {
                let mut e = ct_bit(CT_STATE, CT_STATE_NEW).to_vec();
                e.extend(fib_local());
                e.extend(nfproto(v6));
                e.extend(not_loopback(v6));
                e.extend(proto_port());
                e.push(lookup(RecordSet::NoEpNodePort(v6).name(), None));
                e.push(reject());
                rules.push(rule(e));
            }
        }
        rules
    };
    vec![
        (chain(SERVICES, None), services),
        (
            chain("nat_prerouting", nat(0, -100)),
            vec![rule(vec![jump(SERVICES)])],
        ),
        (
            chain("nat_output", nat(3, -100)),
            vec![rule(vec![jump(SERVICES)])],
        ),
        (chain("nat_postrouting", nat(4, 100)), post),
        (chain("filter_input", filter(1)), noep(true)),
        (chain("filter_forward", filter(2)), noep(false)),
        (chain("filter_output", filter(3)), noep(true)),
    ]
}

// ---------------------------------------------------------------------------------------------
// Frontends.

/// The chain of a frontend with endpoints.
pub fn chain_name(id: u32) -> String {
    format!("s{id}")
}

/// The affinity set of one backend of frontend `id`.
pub fn affinity_set(id: u32, b: &Backend) -> String {
    let mut s = format!("a{id}-");
    match b.ip {
        IpAddr::V4(a) => s.extend(a.octets().iter().map(|o| format!("{o:02x}"))),
        IpAddr::V6(a) => s.extend(a.octets().iter().map(|o| format!("{o:02x}"))),
    }
    s.push_str(&format!("{:04x}", b.port));
    s
}

/// Whether a set name is an affinity set, and of which frontend id.
pub fn affinity_set_id(name: &str) -> Option<u32> {
    name.strip_prefix('a')?.split('-').next()?.parse().ok()
}

/// Whether a chain name is a frontend chain, and its id.
pub fn chain_id(name: &str) -> Option<u32> {
    name.strip_prefix('s')?.parse().ok()
}

/// The affinity sets of a frontend (empty without affinity).
pub fn affinity_sets(svc: &LbService) -> Vec<SetDef> {
    let Some(secs) = svc.affinity_timeout_secs else {
        return Vec::new();
    };
    let v6 = svc.frontend.ip.is_ipv6();
    svc.backends
        .iter()
        .map(|b| SetDef {
            name: affinity_set(svc.id, b),
            flags: SET_TIMEOUT | SET_EVAL,
            key_type: if v6 { T_IPV6 } else { T_IPV4 },
            key_len: if v6 { 16 } else { 4 },
            verdict_map: false,
            timeout_ms: Some(u64::from(secs) * 1000),
            size: Some(AFFINITY_SET_SIZE),
        })
        .collect()
}

/// Whether packets to `b` through `svc` are masqueraded: external frontends with
/// `externalTrafficPolicy: Cluster` whose backend is on another node.
pub fn masquerades(svc: &LbService, b: &Backend) -> bool {
    svc.frontend.kind != FrontendKind::ClusterIp && !svc.external_local && !b.node_local
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn backend_comment(tag: char, b: &Backend) -> String {
    format!(
        "{tag} {} {} {}",
        b.ip,
        b.port,
        if b.node_local { 'l' } else { 'r' }
    )
}

/// The rules of a frontend's chain (empty without backends).
pub fn frontend_rules(svc: &LbService) -> Vec<Rule> {
    let v6 = svc.frontend.ip.is_ipv6();
    let n = svc.backends.len();
    let (so, slen) = saddr(v6);
    let dnat = |b: &Backend| {
        [
            Expr::Immediate {
                dreg: 1,
                data: Imm::Value(ip_bytes(b.ip)),
            },
            Expr::Immediate {
                dreg: 2,
                data: Imm::Value(b.port.to_be_bytes().to_vec()),
            },
            Expr::Nat {
                ty: NAT_DNAT,
                family: u32::from(if v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 }),
                reg_addr: Some(1),
                reg_proto: Some(2),
                flags: NAT_F_PROTO_SPECIFIED,
            },
        ]
    };
    let update = |set: String| {
        [
            payload(BASE_NETWORK, so, slen, 1),
            Expr::Dynset {
                set,
                op: DYNSET_UPDATE,
                sreg_key: 1,
            },
        ]
    };
    let mut out = Vec::with_capacity(n * 2);
    if svc.affinity_timeout_secs.is_some() {
        for b in &svc.backends {
            let set = affinity_set(svc.id, b);
            let mut e = vec![
                payload(BASE_NETWORK, so, slen, 1),
                lookup(&set, None),
            ];
            e.extend(update(set));
            if masquerades(svc, b) {
                e.extend(set_masq_mark());
            }
            e.extend(dnat(b));
            out.push(Rule {
                exprs: e,
                comment: Some(backend_comment('a', b)),
            });
        }
    }
    for (k, b) in svc.backends.iter().enumerate() {
        let mut e = Vec::new();
        if k + 1 < n {
            e.push(Expr::Numgen {
                dreg: 1,
                modulus: u32::try_from(n - k).expect("fewer than 4G backends"),
                ty: NG_RANDOM,
                offset: 0,
            });
            e.push(cmp(1, CMP_EQ, vec![0; 4]));
        }
        if masquerades(svc, b) {
            e.extend(set_masq_mark());
        }
        if svc.affinity_timeout_secs.is_some() {
            e.extend(update(affinity_set(svc.id, b)));
        }
        e.extend(dnat(b));
        out.push(Rule {
            exprs: e,
            comment: Some(backend_comment('b', b)),
        });
    }
    out
}

fn key_bytes(key: &FrontendKey, node_port: bool) -> Vec<u8> {
    let mut k = Vec::with_capacity(24);
    if !node_port {
        k.extend(ip_bytes(key.ip));
    }
    k.extend([key.proto.ip_proto(), 0, 0, 0]);
    k.extend(key.port.to_be_bytes());
    k.extend([0, 0]);
    k
}

/// Parses a record key back into a frontend key.
pub fn parse_key(set: RecordSet, key: &[u8]) -> Option<FrontendKey> {
    let v6 = set.v6();
    let (ip, rest) = if set.node_port() {
        (
            if v6 {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            } else {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            },
            key,
        )
    } else if v6 {
        let a: [u8; 16] = key.get(..16)?.try_into().ok()?;
        (IpAddr::V6(a.into()), &key[16..])
    } else {
        let a: [u8; 4] = key.get(..4)?.try_into().ok()?;
        (IpAddr::V4(a.into()), &key[4..])
    };
    if rest.len() != 8 {
        return None;
    }
    let proto = match rest[0] {
        6 => Proto::Tcp,
        17 => Proto::Udp,
        _ => return None,
    };
    Some(FrontendKey {
        ip,
        port: u16::from_be_bytes([rest[4], rest[5]]),
        proto,
    })
}

fn kind_code(kind: FrontendKind) -> &'static str {
    kind.as_str()
}

fn parse_kind(s: &str) -> Option<FrontendKind> {
    [
        FrontendKind::ClusterIp,
        FrontendKind::NodePort,
        FrontendKind::ExternalIp,
        FrontendKind::LoadBalancer,
    ]
    .into_iter()
    .find(|k| k.as_str() == s)
}

/// Clips a comment to what the userdata TLV holds (on a character boundary).
pub fn clip(s: &str) -> String {
    if s.len() <= MAX_COMMENT {
        return s.to_string();
    }
    let mut end = MAX_COMMENT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The record of a frontend.
pub fn record(svc: &LbService) -> Record {
    let v6 = svc.frontend.ip.is_ipv6();
    let node_port = svc.frontend.kind == FrontendKind::NodePort;
    let has = !svc.backends.is_empty();
    let set = match (node_port, has) {
        (false, true) => RecordSet::Svc(v6),
        (true, true) => RecordSet::NodePort(v6),
        (false, false) => RecordSet::NoEp(v6),
        (true, false) => RecordSet::NoEpNodePort(v6),
    };
    let mut flags = String::new();
    if svc.external_local {
        flags.push('e');
    }
    if svc.internal_local {
        flags.push('i');
    }
    if svc
        .backends
        .first()
        .is_some_and(|b| b.state == BackendState::ServingTerminating)
    {
        flags.push('t');
    }
    if flags.is_empty() {
        flags.push('-');
    }
    let aff = svc
        .affinity_timeout_secs
        .map_or_else(|| "-".to_string(), |s| s.to_string());
    Record {
        set,
        key: key_bytes(&svc.frontend.key(), node_port),
        chain: has.then(|| chain_name(svc.id)),
        comment: clip(&format!(
            "{} {} {flags} {aff} {}",
            svc.id,
            kind_code(svc.frontend.kind),
            svc.name
        )),
    }
}

/// What a record's comment says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMeta {
    /// Frontend id.
    pub id: u32,
    /// Kind.
    pub kind: FrontendKind,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// Backends are serving-terminating ones.
    pub terminating: bool,
    /// Affinity timeout.
    pub affinity_timeout_secs: Option<u32>,
    /// Service name.
    pub name: String,
}

/// Parses a record comment.
pub fn parse_comment(c: &str) -> Option<RecordMeta> {
    let mut it = c.splitn(5, ' ');
    let id = it.next()?.parse().ok()?;
    let kind = parse_kind(it.next()?)?;
    let flags = it.next()?;
    let aff = it.next()?;
    let name = it.next()?.to_string();
    Some(RecordMeta {
        id,
        kind,
        external_local: flags.contains('e'),
        internal_local: flags.contains('i'),
        terminating: flags.contains('t'),
        affinity_timeout_secs: if aff == "-" {
            None
        } else {
            Some(aff.parse().ok()?)
        },
        name,
    })
}

/// Parses a backend rule comment (`b <ip> <port> l|r`): the backend, if it is a choice rule.
pub fn parse_backend_comment(c: &str, state: BackendState) -> Option<Backend> {
    let mut it = c.split(' ');
    if it.next()? != "b" {
        return None;
    }
    let ip = it.next()?.parse().ok()?;
    let port = it.next()?.parse().ok()?;
    let node_local = match it.next()? {
        "l" => true,
        "r" => false,
        _ => return None,
    };
    Some(Backend {
        ip,
        port,
        node_local,
        state,
    })
}

/// The key of a hairpin element for backend address `ip` (`ip . ip`).
pub fn hairpin_key(ip: IpAddr) -> Vec<u8> {
    let mut k = ip_bytes(ip);
    k.extend(ip_bytes(ip));
    k
}

/// Parses a hairpin element key.
pub fn parse_hairpin_key(k: &[u8]) -> Option<IpAddr> {
    match k.len() {
        8 if k[..4] == k[4..] => Some(IpAddr::V4(<[u8; 4]>::try_from(&k[..4]).ok()?.into())),
        32 if k[..16] == k[16..] => Some(IpAddr::V6(<[u8; 16]>::try_from(&k[..16]).ok()?.into())),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The transaction.

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create a set (no-op if it exists with the same definition).
    AddSet(SetDef),
    /// Delete a set.
    DelSet(String),
    /// Create a chain (no-op if it exists).
    AddChain(ChainDef),
    /// Delete every rule of a chain.
    FlushChain(String),
    /// Delete an empty, unreferenced chain.
    DelChain(String),
    /// Append a rule.
    AddRule {
        /// Chain.
        chain: String,
        /// Rule.
        rule: Rule,
    },
    /// Add an element (a record, or a hairpin element).
    AddElem {
        /// Set.
        set: String,
        /// Key.
        key: Vec<u8>,
        /// `goto` target.
        chain: Option<String>,
        /// Comment.
        comment: Option<String>,
    },
    /// Delete an element.
    DelElem {
        /// Set.
        set: String,
        /// Key.
        key: Vec<u8>,
    },
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::AddSet(s) => write!(f, "add set {}", s.name),
            Op::DelSet(s) => write!(f, "delete set {s}"),
            Op::AddChain(c) => write!(f, "add chain {}", c.name),
            Op::FlushChain(c) => write!(f, "flush chain {c}"),
            Op::DelChain(c) => write!(f, "delete chain {c}"),
            Op::AddRule { chain, rule } => write!(
                f,
                "add rule {chain} ({} exprs) {}",
                rule.exprs.len(),
                rule.comment.as_deref().unwrap_or("")
            ),
            Op::AddElem {
                set,
                key,
                chain,
                comment,
            } => {
                write!(f, "add element {set} {}", hex(key))?;
                if let Some(c) = chain {
                    write!(f, " : goto {c}")?;
                }
                if let Some(c) = comment {
                    write!(f, " \"{c}\"")?;
                }
                Ok(())
            }
            Op::DelElem { set, key } => write!(f, "delete element {set} {}", hex(key)),
        }
    }
}

/// What twill programmed for one frontend, as far as it knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Programmed {
    /// The service (without its Maglev table, which this dataplane does not use).
    pub svc: LbService,
    /// Its record as in the kernel.
    pub record: Record,
    /// Its chain, if one exists.
    pub chain: Option<String>,
    /// Its affinity sets.
    pub aff_sets: BTreeSet<String>,
}

/// What the table holds, as far as twill knows: the frontends and the hairpin reference counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mirror {
    /// Programmed frontends.
    pub frontends: BTreeMap<FrontendKey, Programmed>,
    /// Hairpin elements and how many (frontend, backend) pairs want each.
    pub hairpin: BTreeMap<IpAddr, usize>,
}

/// A transaction and the mirror it leads to.
#[derive(Debug, Default)]
pub struct Tx {
    /// The operations, in order.
    pub ops: Vec<Op>,
    /// Frontends replaced (`Some`) or removed (`None`) by the transaction.
    pub changes: Vec<(FrontendKey, Option<Programmed>)>,
    /// Hairpin counts after the transaction (only changed ones).
    pub hairpin: BTreeMap<IpAddr, usize>,
}

fn programmed(svc: &LbService) -> Programmed {
    let mut s = svc.clone();
    s.maglev = Vec::new();
    let rec = record(svc);
    Programmed {
        chain: rec.chain.clone(),
        aff_sets: affinity_sets(svc).into_iter().map(|d| d.name).collect(),
        record: rec,
        svc: s,
    }
}

fn add_record(ops: &mut Vec<Op>, rec: &Record) {
    ops.push(Op::AddElem {
        set: rec.set.name().into(),
        key: rec.key.clone(),
        chain: rec.chain.clone(),
        comment: Some(rec.comment.clone()),
    });
}

fn del_record(ops: &mut Vec<Op>, rec: &Record) {
    ops.push(Op::DelElem {
        set: rec.set.name().into(),
        key: rec.key.clone(),
    });
}

impl Mirror {
    /// The transaction that takes the table from this mirror to `plan` applied.
    pub fn transaction(&self, plan: &LbPlan) -> Tx {
        let mut tx = Tx::default();
        let mut hp: BTreeMap<IpAddr, isize> = BTreeMap::new();
        let mut count = |svc: &LbService, d: isize| {
            for b in &svc.backends {
                *hp.entry(b.ip).or_default() += d;
            }
        };
        for f in &plan.deletes {
            let Some(old) = self.frontends.get(&f.key()) else {
                continue;
            };
            del_record(&mut tx.ops, &old.record);
            if let Some(c) = &old.chain {
                tx.ops.push(Op::FlushChain(c.clone()));
                tx.ops.push(Op::DelChain(c.clone()));
            }
            tx.ops
                .extend(old.aff_sets.iter().map(|s| Op::DelSet(s.clone())));
            count(&old.svc, -1);
            tx.changes.push((f.key(), None));
        }
        for svc in &plan.upserts {
            let new = programmed(svc);
            let old = self.frontends.get(&svc.frontend.key());
            if let Some(old) = old
                && old.record != new.record
            {
                del_record(&mut tx.ops, &old.record);
            }
            let old_chain = old.and_then(|o| o.chain.clone());
            let old_sets = old.map(|o| o.aff_sets.clone()).unwrap_or_default();
            if let Some(chain) = &new.chain {
                if old_chain.as_ref() == Some(chain) {
                    tx.ops.push(Op::FlushChain(chain.clone()));
                } else {
                    tx.ops.push(Op::AddChain(ChainDef {
                        name: chain.clone(),
                        hook: None,
                    }));
                }
                tx.ops.extend(
                    affinity_sets(svc)
                        .into_iter()
                        .filter(|d| !old_sets.contains(&d.name))
                        .map(Op::AddSet),
                );
                tx.ops.extend(frontend_rules(svc).into_iter().map(|rule| {
                    Op::AddRule {
                        chain: chain.clone(),
                        rule,
                    }
                }));
            }
            if let Some(c) = &old_chain
                && new.chain.as_ref() != Some(c)
            {
                tx.ops.push(Op::FlushChain(c.clone()));
                tx.ops.push(Op::DelChain(c.clone()));
            }
            tx.ops.extend(
                old_sets
                    .iter()
                    .filter(|s| !new.aff_sets.contains(*s))
                    .map(|s| Op::DelSet(s.clone())),
            );
            if old.is_none_or(|o| o.record != new.record) {
                add_record(&mut tx.ops, &new.record);
            }
            if let Some(old) = old {
                count(&old.svc, -1);
            }
            count(svc, 1);
            tx.changes.push((svc.frontend.key(), Some(new)));
        }
        for (ip, d) in hp {
            if d == 0 {
                continue;
            }
            let before = self.hairpin.get(&ip).copied().unwrap_or(0);
            let after = before.saturating_add_signed(d);
            let set = hairpin_set(ip.is_ipv6()).to_string();
            if before == 0 && after > 0 {
                tx.ops.push(Op::AddElem {
                    set,
                    key: hairpin_key(ip),
                    chain: None,
                    comment: None,
                });
            } else if before > 0 && after == 0 {
                tx.ops.push(Op::DelElem {
                    set,
                    key: hairpin_key(ip),
                });
            }
            tx.hairpin.insert(ip, after);
        }
        tx
    }

    /// Takes in a committed transaction.
    pub fn commit(&mut self, tx: Tx) {
        for (k, p) in tx.changes {
            match p {
                Some(p) => {
                    self.frontends.insert(k, p);
                }
                None => {
                    self.frontends.remove(&k);
                }
            }
        }
        for (ip, n) in tx.hairpin {
            if n == 0 {
                self.hairpin.remove(&ip);
            } else {
                self.hairpin.insert(ip, n);
            }
        }
    }
}

/// The hairpin counts a set of services implies.
pub fn hairpin_counts<'a>(svcs: impl IntoIterator<Item = &'a LbService>) -> BTreeMap<IpAddr, usize> {
    let mut out = BTreeMap::new();
    for s in svcs {
        for b in &s.backends {
            *out.entry(b.ip).or_default() += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::lb::{Frontend, StaleBackend, plan};

    fn be(ip: &str, port: u16, local: bool) -> Backend {
        Backend {
            ip: ip.parse().unwrap(),
            port,
            node_local: local,
            state: BackendState::Ready,
        }
    }

    fn svc(id: u32, ip: &str, kind: FrontendKind, backends: Vec<Backend>) -> LbService {
        LbService {
            id,
            name: format!("default/s{id}:http"),
            frontend: Frontend {
                ip: ip.parse().unwrap(),
                port: if kind == FrontendKind::NodePort {
                    30080
                } else {
                    80
                },
                proto: Proto::Tcp,
                kind,
            },
            backends,
            maglev: Vec::new(),
            affinity_timeout_secs: None,
            external_local: false,
            internal_local: false,
        }
    }

    fn text(ops: &[Op]) -> Vec<String> {
        ops.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn records_round_trip_through_their_keys_and_comments() {
        for (ip, kind) in [
            ("10.96.0.10", FrontendKind::ClusterIp),
            ("fd00::10", FrontendKind::ExternalIp),
            ("0.0.0.0", FrontendKind::NodePort),
            ("::", FrontendKind::NodePort),
        ] {
            let mut s = svc(7, ip, kind, vec![be("10.0.1.2", 8080, true)]);
            s.affinity_timeout_secs = Some(30);
            s.external_local = kind != FrontendKind::ClusterIp;
            let r = record(&s);
            assert_eq!(parse_key(r.set, &r.key), Some(s.frontend.key()), "{ip}");
            let m = parse_comment(&r.comment).unwrap();
            assert_eq!(
                (m.id, m.kind, m.name.as_str(), m.affinity_timeout_secs),
                (7, kind, "default/s7:http", Some(30))
            );
            assert_eq!(m.external_local, s.external_local);
            assert_eq!(r.chain.as_deref(), Some("s7"));
        }
        let empty = svc(8, "10.96.0.11", FrontendKind::ClusterIp, vec![]);
        let r = record(&empty);
        assert_eq!((r.set, r.chain), (RecordSet::NoEp(false), None));
        assert!(parse_key(RecordSet::Svc(false), &[1, 2, 3]).is_none());
    }

    #[test]
    fn choice_rules_split_evenly_and_mark_only_remote_external_backends() {
        let s = svc(
            3,
            "0.0.0.0",
            FrontendKind::NodePort,
            vec![
                be("10.0.1.2", 8080, true),
                be("10.0.2.2", 8080, false),
                be("10.0.3.2", 8080, false),
            ],
        );
        let rules = frontend_rules(&s);
        assert_eq!(rules.len(), 3);
        let moduli: Vec<Option<u32>> = rules
            .iter()
            .map(|r| {
                r.exprs.iter().find_map(|e| match e {
                    Expr::Numgen { modulus, .. } => Some(*modulus),
                    _ => None,
                })
            })
            .collect();
        assert_eq!(moduli, vec![Some(3), Some(2), None]);
        let marks: Vec<bool> = rules
            .iter()
            .map(|r| r.exprs.contains(&Expr::MetaSet { key: META_MARK, sreg: 1 }))
            .collect();
        assert_eq!(marks, vec![false, true, true]);
        let comments: Vec<_> = rules.iter().map(|r| r.comment.clone().unwrap()).collect();
        assert_eq!(comments[0], "b 10.0.1.2 8080 l");
        let back: Vec<Backend> = comments
            .iter()
            .filter_map(|c| parse_backend_comment(c, BackendState::Ready))
            .collect();
        assert_eq!(back, s.backends);
        // ClusterIP and Local never mark.
        let mut c = s.clone();
        c.frontend.kind = FrontendKind::ClusterIp;
        assert!(c.backends.iter().all(|b| !masquerades(&c, b)));
        let mut l = s.clone();
        l.external_local = true;
        assert!(l.backends.iter().all(|b| !masquerades(&l, b)));
    }

    #[test]
    fn affinity_adds_a_set_and_a_sticky_rule_per_backend() {
        let mut s = svc(
            4,
            "10.96.0.4",
            FrontendKind::ClusterIp,
            vec![be("10.0.1.2", 8080, true), be("10.0.2.2", 8080, false)],
        );
        s.affinity_timeout_secs = Some(60);
        let sets = affinity_sets(&s);
        assert_eq!(
            sets.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
            vec!["a4-0a0001021f90", "a4-0a0002021f90"]
        );
        assert_eq!(sets[0].timeout_ms, Some(60_000));
        assert_eq!(affinity_set_id(&sets[1].name), Some(4));
        let rules = frontend_rules(&s);
        assert_eq!(rules.len(), 4);
        assert!(rules[0].comment.as_deref().unwrap().starts_with("a "));
        assert!(rules[0].exprs.contains(&Expr::Lookup {
            set: "a4-0a0001021f90".into(),
            sreg: 1,
            dreg: None
        }));
        assert!(rules[3].exprs.contains(&Expr::Dynset {
            set: "a4-0a0002021f90".into(),
            op: DYNSET_UPDATE,
            sreg_key: 1
        }));
    }

    #[test]
    fn one_endpoint_change_rewrites_one_chain_and_nothing_else() {
        let a = svc(1, "10.96.0.1", FrontendKind::ClusterIp, vec![be("10.0.1.2", 80, true)]);
        let b = svc(2, "10.96.0.2", FrontendKind::ClusterIp, vec![be("10.0.1.3", 80, true)]);
        let mut m = Mirror::default();
        let tx = m.transaction(&plan(&[a.clone(), b.clone()], &[]));
        assert_eq!(
            text(&tx.ops),
            vec![
                "add chain s1",
                "add rule s1 (3 exprs) b 10.0.1.2 80 l",
                "add element svc4 0a6000010600000000500000 : goto s1 \"1 ClusterIP - - default/s1:http\"",
                "add chain s2",
                "add rule s2 (3 exprs) b 10.0.1.3 80 l",
                "add element svc4 0a6000020600000000500000 : goto s2 \"2 ClusterIP - - default/s2:http\"",
                "add element hairpin4 0a0001020a000102",
                "add element hairpin4 0a0001030a000103",
            ]
        );
        m.commit(tx);
        assert_eq!(m.hairpin.len(), 2);
        let mut a2 = a.clone();
        a2.backends.push(be("10.0.2.2", 80, false));
        let p = plan(&[a2.clone(), b.clone()], &[a.clone(), b.clone()]);
        let tx = m.transaction(&p);
        assert_eq!(
            text(&tx.ops),
            vec![
                "flush chain s1",
                "add rule s1 (5 exprs) b 10.0.1.2 80 l",
                "add rule s1 (3 exprs) b 10.0.2.2 80 r",
                "add element hairpin4 0a0002020a000202",
            ]
        );
        m.commit(tx);
        // Removing the backend again: the element stays, the hairpin entry goes.
        let p = plan(&[a.clone(), b.clone()], &[a2, b.clone()]);
        assert_eq!(
            p.stale_backends,
            vec![StaleBackend {
                frontend: a.frontend.key(),
                ip: "10.0.2.2".parse().unwrap(),
                port: 80
            }]
        );
        let tx = m.transaction(&p);
        assert_eq!(
            text(&tx.ops),
            vec![
                "flush chain s1",
                "add rule s1 (3 exprs) b 10.0.1.2 80 l",
                "delete element hairpin4 0a0002020a000202",
            ]
        );
        m.commit(tx);
    }

    #[test]
    fn losing_all_endpoints_moves_the_record_and_drops_the_chain() {
        let mut a = svc(1, "10.96.0.1", FrontendKind::ClusterIp, vec![be("10.0.1.2", 80, true)]);
        a.affinity_timeout_secs = Some(10);
        let mut m = Mirror::default();
        let tx = m.transaction(&plan(std::slice::from_ref(&a), &[]));
        assert!(text(&tx.ops).contains(&"add set a1-0a0001020050".to_string()));
        m.commit(tx);
        let mut empty = a.clone();
        empty.backends.clear();
        let tx = m.transaction(&plan(std::slice::from_ref(&empty), std::slice::from_ref(&a)));
        let t = text(&tx.ops);
        assert_eq!(t[0], "delete element svc4 0a6000010600000000500000");
        assert_eq!(
            t[1..5],
            [
                "flush chain s1",
                "delete chain s1",
                "delete set a1-0a0001020050",
                "add element noep4 0a6000010600000000500000 \"1 ClusterIP - 10 default/s1:http\""
            ]
        );
        assert_eq!(t[5], "delete element hairpin4 0a0001020a000102");
        m.commit(tx);
        // And deleting the frontend removes its record only.
        let tx = m.transaction(&plan(&[], std::slice::from_ref(&empty)));
        assert_eq!(
            text(&tx.ops),
            vec!["delete element noep4 0a6000010600000000500000"]
        );
        m.commit(tx);
        assert!(m.frontends.is_empty() && m.hairpin.is_empty());
    }

    #[test]
    fn shared_backends_keep_their_hairpin_element_until_the_last_user_goes() {
        let a = svc(1, "10.96.0.1", FrontendKind::ClusterIp, vec![be("10.0.1.2", 80, true)]);
        let n = svc(2, "0.0.0.0", FrontendKind::NodePort, vec![be("10.0.1.2", 80, true)]);
        let mut m = Mirror::default();
        let tx = m.transaction(&plan(&[a.clone(), n.clone()], &[]));
        assert_eq!(
            text(&tx.ops)
                .iter()
                .filter(|o| o.contains("hairpin"))
                .count(),
            1
        );
        m.commit(tx);
        let tx = m.transaction(&plan(std::slice::from_ref(&n), &[a.clone(), n.clone()]));
        assert!(!text(&tx.ops).iter().any(|o| o.contains("hairpin")));
        m.commit(tx);
        assert_eq!(m.hairpin.values().copied().collect::<Vec<_>>(), vec![1]);
        assert_eq!(hairpin_counts(std::slice::from_ref(&n)), m.hairpin);
    }

    #[test]
    fn static_layout_is_complete() {
        let sets = static_sets();
        assert_eq!(sets.len(), 10);
        let chains = static_chains();
        let names: Vec<&str> = chains.iter().map(|(c, _)| c.name.as_str()).collect();
        assert_eq!(names[0], SERVICES);
        // Every set a static rule looks up exists.
        for (_, rules) in &chains {
            for r in rules {
                for e in &r.exprs {
                    if let Expr::Lookup { set, .. } = e {
                        assert!(sets.iter().any(|s| &s.name == set), "{set}");
                    }
                }
            }
        }
        assert_eq!(
            parse_hairpin_key(&hairpin_key("fd00::1".parse().unwrap())),
            Some("fd00::1".parse().unwrap())
        );
        assert_eq!(clip(&"é".repeat(150)).len(), 200);
    }
}
