//! What twill's `inet twill` table holds, rendered from [`LbService`]s, and the transaction a
//! plan turns into (pure; every function here runs without root).
//!
//! Layout (`nft list table inet twill` shows it in this shape; `N` = IPv4 `4` / IPv6 `6`):
//! ```text
//! set c<class>   { addr . inet_proto . inet_service }    frontends of one class (see below)
//! map beN        { addr . inet_proto . inet_service . slot : addr . inet_service }
//! map benpN      { inet_proto . inet_service . slot : addr . inet_service }   NodePorts
//! chain pick     per class: daddr . l4proto . dport @c<class> [mark]
//!                           dnat to daddr . l4proto . dport . numgen random mod n map @beN
//! map affN / affnpN { ... : verdict }   frontends with sessionAffinity -> goto s<id>
//! chain s<id>      one per affinity frontend: sticky rules + numgen splits (see below)
//! set noepN / noepnpN                   frontends without endpoints (rejected)
//! set hairpinN { addr . addr }          every backend b as "b . b"
//! set localN   { addr }                 backends on this node
//! chain services   affinity vmaps, then jump pick
//! chain nat_prerouting / nat_output (dstnat): jump services
//! chain nat_postrouting (srcnat): masquerade marked flows to remote backends; hairpin
//! chain filter_input / filter_forward / filter_output: reject new flows to noep*
//! ```
//!
//! Why:
//! - **Service lookup is one hash lookup** keyed on `daddr . l4proto . dport` (kube-proxy's
//!   nftables key): the cost per connection does not grow with the number of services.
//! - **An ordinary frontend is data, not a chain.** The kernel re-validates every chain
//!   reachable from the table's base chains whenever a transaction adds a rule that loads a
//!   register, a `goto` element or a verdict-map lookup — measured here 160 ms per transaction
//!   at 30k services with one chain per service (kube-proxy's layout), whatever the change.
//!   Keeping frontends and backends in plain sets and data maps makes a one-service change a
//!   handful of element updates that trigger no validation, and the chains and rules that
//!   exist are bounded by the number of frontend *classes*, not by the number of services.
//! - **Endpoint choice: `numgen random mod n` into `beN[frontend . slot]`.** `n` must be a
//!   constant in the rule, so frontends are grouped by class (family, NodePort or not,
//!   whether the frontend masquerades, n); each class is one set and one rule in `pick`, which
//!   a connection's first packet walks (a hash lookup per class in use, typically a handful,
//!   independent of the number of services). A change of n moves the frontend to another
//!   class set (two elements); a class seen for the first time adds one rule. The choice is
//!   uniform random per connection, as kube-proxy's; the Maglev table is not used here. Every
//!   rule is plain nft syntax, so `nft list ruleset` shows it (`dnat ip to ip daddr . meta
//!   l4proto . th dport . numgen random mod 3 map @be4`).
//! - **sessionAffinity: ClientIP** frontends (rare) keep a chain of their own, `s<id>`: per
//!   backend a dynamic set of client addresses with the affinity timeout; a known client goes
//!   back to its backend (refreshing its entry), others take sequential `numgen random mod
//!   (n-k)` splits (rule k catches 1/(n-k) of what the earlier rules left), and every choice
//!   records the client in the chosen backend's set (kube-proxy's scheme). A removed backend
//!   takes its set with it, so its clients re-balance at once.
//! - **Masquerade**: frontends that are external (NodePort, ExternalIP, LB IP) with
//!   `externalTrafficPolicy: Cluster` mark their packets (`meta mark | 0x4000`); postrouting
//!   masquerades marked packets whose backend is not in `localN`, so replies from another node
//!   come back through this one, while local backends keep the client's address (Cilium's
//!   NodePort rule, the same as the eBPF dataplane). Hairpin (a pod reaching itself through a
//!   service) is caught by `saddr . daddr @hairpinN` (nft cannot compare two fields).
//! - **No endpoints**: the frontend sits in `noep*`, and new flows to it are rejected (ICMP port
//!   unreachable) in the filter hooks, as kube-proxy does.
//! - **Everything needed to read the table back is in it**: a frontend's id, kind, name and
//!   flags are the comment of its record element, its backends are `beN[id . *]` in slot order,
//!   their locality is `localN`; so a restarted agent re-derives the same [`LbService`]s.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
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
/// The chain holding one rule per class.
pub const PICK: &str = "pick";

const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const RTN_LOCAL: u32 = 2;
/// `IPS_DST_NAT`.
const IPS_DST_NAT: u32 = 0x20;
/// `NF_CT_STATE_BIT(IP_CT_NEW)`.
const CT_STATE_NEW: u32 = 0x8;

// nft's datatype ids, for key and data types (informational for the kernel, used by `nft list`).
const T_IPV4: u32 = 7;
const T_IPV6: u32 = 8;
const T_PROTO: u32 = 12;
const T_SERVICE: u32 = 13;
const T_MARK: u32 = 19;
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

/// What a map maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetData {
    /// A plain set.
    None,
    /// Verdicts.
    Verdict,
    /// Values of this nft type and length.
    Value(u32, u32),
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
    /// What it maps to.
    pub data: SetData,
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
    /// `c<class>`: a frontend with endpoints, without affinity.
    Class(Class),
    /// `aff4` / `aff6`: an address frontend with affinity.
    Aff(bool),
    /// `affnp4` / `affnp6`: a NodePort with affinity.
    AffNp(bool),
    /// `noep4` / `noep6`: an address frontend without endpoints.
    NoEp(bool),
    /// `noepnp4` / `noepnp6`: a NodePort without endpoints.
    NoEpNp(bool),
}

impl RecordSet {
    /// Every static record set.
    pub const STATIC: [RecordSet; 8] = [
        RecordSet::Aff(false),
        RecordSet::Aff(true),
        RecordSet::AffNp(false),
        RecordSet::AffNp(true),
        RecordSet::NoEp(false),
        RecordSet::NoEp(true),
        RecordSet::NoEpNp(false),
        RecordSet::NoEpNp(true),
    ];

    /// The set's name.
    pub fn name(self) -> String {
        match self {
            RecordSet::Class(c) => c.set(),
            RecordSet::Aff(false) => "aff4".into(),
            RecordSet::Aff(true) => "aff6".into(),
            RecordSet::AffNp(false) => "affnp4".into(),
            RecordSet::AffNp(true) => "affnp6".into(),
            RecordSet::NoEp(false) => "noep4".into(),
            RecordSet::NoEp(true) => "noep6".into(),
            RecordSet::NoEpNp(false) => "noepnp4".into(),
            RecordSet::NoEpNp(true) => "noepnp6".into(),
        }
    }

    /// IPv6.
    pub fn v6(self) -> bool {
        match self {
            RecordSet::Class(c) => c.v6,
            RecordSet::Aff(v) | RecordSet::AffNp(v) | RecordSet::NoEp(v) | RecordSet::NoEpNp(v) => {
                v
            }
        }
    }

    /// Keyed by protocol and port only.
    pub fn node_port(self) -> bool {
        match self {
            RecordSet::Class(c) => c.np,
            RecordSet::AffNp(_) | RecordSet::NoEpNp(_) => true,
            RecordSet::Aff(_) | RecordSet::NoEp(_) => false,
        }
    }

    /// The set's definition.
    pub fn def(self) -> SetDef {
        let (key_type, key_len) = frontend_key_type(self.v6(), self.node_port());
        let data = match self {
            RecordSet::Aff(_) | RecordSet::AffNp(_) => SetData::Verdict,
            _ => SetData::None,
        };
        map_def(&self.name(), key_type, key_len, data)
    }
}

/// nft type and length of a frontend key.
fn frontend_key_type(v6: bool, np: bool) -> (u32, u32) {
    match (np, v6) {
        (true, _) => (concat_type(&[T_PROTO, T_SERVICE]), 8),
        (false, false) => (concat_type(&[T_IPV4, T_PROTO, T_SERVICE]), 12),
        (false, true) => (concat_type(&[T_IPV6, T_PROTO, T_SERVICE]), 24),
    }
}

fn map_def(name: &str, key_type: u32, key_len: u32, data: SetData) -> SetDef {
    SetDef {
        name: name.into(),
        flags: if data == SetData::None { 0 } else { SET_MAP },
        key_type,
        key_len,
        data,
        timeout_ms: None,
        size: None,
    }
}

/// The backend map of a family (NodePorts have their own, keyed without the address).
pub fn backend_map(v6: bool, np: bool) -> &'static str {
    match (v6, np) {
        (false, false) => "be4",
        (true, false) => "be6",
        (false, true) => "benp4",
        (true, true) => "benp6",
    }
}

/// The hairpin set of a family.
pub fn hairpin_set(v6: bool) -> &'static str {
    if v6 { "hairpin6" } else { "hairpin4" }
}

/// The set of local backend addresses of a family.
pub fn local_set(v6: bool) -> &'static str {
    if v6 { "local6" } else { "local4" }
}

/// Every static set and map.
pub fn static_sets() -> Vec<SetDef> {
    let mut out: Vec<SetDef> = RecordSet::STATIC.iter().map(|s| s.def()).collect();
    for v6 in [false, true] {
        let (t, l) = if v6 { (T_IPV6, 16) } else { (T_IPV4, 4) };
        for np in [false, true] {
            let (kt, kl) = frontend_key_type(v6, np);
            out.push(map_def(
                backend_map(v6, np),
                (kt << 6) | T_MARK,
                kl + 4,
                SetData::Value(concat_type(&[t, T_SERVICE]), l + 4),
            ));
        }
        out.push(map_def(
            hairpin_set(v6),
            concat_type(&[t, t]),
            2 * l,
            SetData::None,
        ));
        out.push(map_def(local_set(v6), t, l, SetData::None));
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

/// `meta mark set meta mark | MASQ_MARK`, through register `r`.
fn set_masq_mark(r: u32) -> [Expr; 3] {
    [
        meta(META_MARK, r),
        Expr::Bitwise {
            sreg: r,
            dreg: r,
            mask: (!MASQ_MARK).to_ne_bytes().to_vec(),
            xor: MASQ_MARK.to_ne_bytes().to_vec(),
        },
        Expr::MetaSet {
            key: META_MARK,
            sreg: r,
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
// Classes and the static chains.

/// A group of frontends sharing one pick chain: family, NodePort or not, whether they mark
/// for masquerade, and their backend count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Class {
    /// IPv6.
    pub v6: bool,
    /// NodePort (keyed by protocol and port).
    pub np: bool,
    /// Marks for masquerade (external, `externalTrafficPolicy: Cluster`).
    pub masq: bool,
    /// Number of backends.
    pub n: u32,
}

impl Class {
    /// Its membership set: `c<family>[np][m]-<n>`.
    pub fn set(self) -> String {
        format!(
            "c{}{}{}-{}",
            if self.v6 { 6 } else { 4 },
            if self.np { "np" } else { "" },
            if self.masq { "m" } else { "" },
            self.n
        )
    }

    /// Parses a membership set name.
    pub fn from_set(name: &str) -> Option<Class> {
        let rest = name.strip_prefix('c')?;
        let (head, n) = rest.split_once('-')?;
        let (v6, flags) = if let Some(f) = head.strip_prefix('4') {
            (false, f)
        } else {
            (true, head.strip_prefix('6')?)
        };
        let (np, flags) = match flags.strip_prefix("np") {
            Some(f) => (true, f),
            None => (false, flags),
        };
        let masq = match flags {
            "m" => true,
            "" => false,
            _ => return None,
        };
        let n: u32 = n.parse().ok()?;
        (n > 0).then_some(Class { v6, np, masq, n })
    }

    /// Its rule in `pick`: membership, mark, DNAT to `beN[key . numgen random mod n]`.
    pub fn rule(self) -> Rule {
        let mut e = Vec::new();
        if self.np {
            e.extend(fib_local());
            e.extend(nfproto(self.v6));
            e.extend(not_loopback(self.v6));
            e.extend(proto_port());
        } else {
            e.extend(nfproto(self.v6));
            e.extend(addr_proto_port(self.v6));
        }
        let key_words = frontend_key_type(self.v6, self.np).1 / 4;
        e.push(lookup(&self.set(), None));
        if self.masq {
            e.extend(set_masq_mark(reg32(key_words + 1)));
        }
        e.push(Expr::Numgen {
            dreg: reg32(key_words),
            modulus: self.n,
            ty: NG_RANDOM,
            offset: 0,
        });
        e.push(lookup(backend_map(self.v6, self.np), Some(1)));
        e.push(Expr::Nat {
            ty: NAT_DNAT,
            family: u32::from(if self.v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 }),
            reg_addr: Some(1),
            reg_proto: Some(if self.v6 { reg32(4) } else { reg32(1) }),
            flags: NAT_F_PROTO_SPECIFIED,
        });
        Rule {
            exprs: e,
            comment: Some(self.set()),
        }
    }
}

/// Whether a frontend's packets are marked for masquerade: external frontends with
/// `externalTrafficPolicy: Cluster` (postrouting then spares local backends).
pub fn masquerades(svc: &LbService) -> bool {
    svc.frontend.kind != FrontendKind::ClusterIp && !svc.external_local
}

/// The class of a frontend without affinity, with backends.
pub fn class_of(svc: &LbService) -> Class {
    Class {
        v6: svc.frontend.ip.is_ipv6(),
        np: svc.frontend.kind == FrontendKind::NodePort,
        masq: masquerades(svc),
        n: u32::try_from(svc.backends.len()).expect("fewer than 4G backends"),
    }
}

/// `services`: the dispatch chain both dstnat hooks jump to.
pub const SERVICES: &str = "services";

/// Every static chain with its rules, in creation order (a jump's target first). `pick` is
/// created empty; its rules are the classes' ([`class_ops`]).
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
    for np in [false, true] {
        for v6 in [false, true] {
            let mut e = Vec::new();
            if np {
                e.extend(fib_local());
                e.extend(nfproto(v6));
                e.extend(not_loopback(v6));
                e.extend(proto_port());
            } else {
                e.extend(nfproto(v6));
                e.extend(addr_proto_port(v6));
            }
            let aff = if np {
                RecordSet::AffNp(v6)
            } else {
                RecordSet::Aff(v6)
            };
            e.push(lookup(&aff.name(), Some(0)));
            services.push(rule(e));
        }
    }
    services.push(rule(vec![jump(PICK)]));
    let masq_bit = || {
        vec![
            meta(META_MARK, 1),
            Expr::Bitwise {
                sreg: 1,
                dreg: 1,
                mask: MASQ_MARK.to_ne_bytes().to_vec(),
                xor: vec![0; 4],
            },
            cmp(1, CMP_EQ, MASQ_MARK.to_ne_bytes()),
        ]
    };
    let clear_mark = || {
        vec![
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
        ]
    };
    let mut post = Vec::new();
    for v6 in [false, true] {
        // A marked flow whose backend is on this node keeps the client's address.
        let mut e = masq_bit();
        e.extend(nfproto(v6));
        let (dof, len) = daddr(v6);
        e.push(payload(BASE_NETWORK, dof, len, 1));
        e.push(lookup(local_set(v6), None));
        e.extend(clear_mark());
        post.push(rule(e));
    }
    {
        let mut e = masq_bit();
        e.extend(clear_mark());
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
            e.push(lookup(&RecordSet::NoEp(v6).name(), None));
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
                e.push(lookup(&RecordSet::NoEpNp(v6).name(), None));
                e.push(reject());
                rules.push(rule(e));
            }
        }
        rules
    };
    vec![
        (chain(PICK, None), Vec::new()),
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

/// The chain of an affinity frontend.
pub fn chain_name(id: u32) -> String {
    format!("s{id}")
}

/// The affinity set of one backend of frontend `id`.
pub fn affinity_set(id: u32, b: &Backend) -> String {
    format!("a{id}-{}{:04x}", hex(&ip_bytes(b.ip)), b.port)
}

/// Whether a set name is an affinity set, and of which frontend id.
pub fn affinity_set_id(name: &str) -> Option<u32> {
    name.strip_prefix('a')?.split('-').next()?.parse().ok()
}

/// Whether a chain name is an affinity frontend chain, and its id.
pub fn chain_id(name: &str) -> Option<u32> {
    name.strip_prefix('s')?.parse().ok()
}

/// The affinity sets of a frontend (empty without affinity or backends).
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
            data: SetData::None,
            timeout_ms: Some(u64::from(secs) * 1000),
            size: Some(AFFINITY_SET_SIZE),
        })
        .collect()
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn backend_comment(tag: char, b: &Backend) -> String {
    format!("{tag} {} {}", b.ip, b.port)
}

/// The rules of an affinity frontend's chain.
pub fn affinity_rules(svc: &LbService) -> Vec<Rule> {
    let v6 = svc.frontend.ip.is_ipv6();
    let n = svc.backends.len();
    let (so, slen) = saddr(v6);
    let masq = masquerades(svc);
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
    for b in &svc.backends {
        let set = affinity_set(svc.id, b);
        let mut e = vec![payload(BASE_NETWORK, so, slen, 1), lookup(&set, None)];
        e.extend(update(set));
        if masq {
            e.extend(set_masq_mark(1));
        }
        e.extend(dnat(b));
        out.push(Rule {
            exprs: e,
            comment: Some(backend_comment('a', b)),
        });
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
        if masq {
            e.extend(set_masq_mark(1));
        }
        e.extend(update(affinity_set(svc.id, b)));
        e.extend(dnat(b));
        out.push(Rule {
            exprs: e,
            comment: Some(backend_comment('b', b)),
        });
    }
    out
}

/// Parses a choice rule comment of an affinity chain (`b <ip> <port>`).
pub fn parse_backend_comment(c: &str) -> Option<(IpAddr, u16)> {
    let mut it = c.split(' ');
    if it.next()? != "b" {
        return None;
    }
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
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

/// The key of backend `slot` of a frontend in its backend map.
pub fn slot_key(frontend: &FrontendKey, slot: u32) -> Vec<u8> {
    let np = frontend.ip.is_unspecified();
    let mut k = key_bytes(frontend, np);
    k.extend(slot.to_ne_bytes());
    k
}

/// Parses a backend map key: the frontend key bytes and the slot.
pub fn parse_slot_key(k: &[u8]) -> Option<(&[u8], u32)> {
    let at = k.len().checked_sub(4)?;
    Some((&k[..at], u32::from_ne_bytes(k[at..].try_into().ok()?)))
}

/// The value of a `beN` element: address and port.
pub fn slot_value(ip: IpAddr, port: u16) -> Vec<u8> {
    let mut v = ip_bytes(ip);
    v.extend(port.to_be_bytes());
    v.extend([0, 0]);
    v
}

/// Parses a `beN` value.
pub fn parse_slot_value(v: &[u8]) -> Option<(IpAddr, u16)> {
    let (ip, rest) = match v.len() {
        8 => (
            IpAddr::V4(<[u8; 4]>::try_from(&v[..4]).ok()?.into()),
            &v[4..],
        ),
        20 => (
            IpAddr::V6(<[u8; 16]>::try_from(&v[..16]).ok()?.into()),
            &v[16..],
        ),
        _ => return None,
    };
    Some((ip, u16::from_be_bytes([rest[0], rest[1]])))
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

/// What an element maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElemData {
    /// Nothing (a set).
    None,
    /// `goto` a chain.
    Goto(String),
    /// Bytes.
    Value(Vec<u8>),
}

/// A frontend's element: where, its key, what it maps to, its comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The map or set.
    pub set: RecordSet,
    /// The element key.
    pub key: Vec<u8>,
    /// What it maps to.
    pub data: ElemData,
    /// The comment: `<id> <kind> <flags> <affinity secs|-> <name>`.
    pub comment: String,
}

/// The record of a frontend.
pub fn record(svc: &LbService) -> Record {
    let v6 = svc.frontend.ip.is_ipv6();
    let np = svc.frontend.kind == FrontendKind::NodePort;
    let (set, data) = if svc.backends.is_empty() {
        (
            if np {
                RecordSet::NoEpNp(v6)
            } else {
                RecordSet::NoEp(v6)
            },
            ElemData::None,
        )
    } else if svc.affinity_timeout_secs.is_some() {
        (
            if np {
                RecordSet::AffNp(v6)
            } else {
                RecordSet::Aff(v6)
            },
            ElemData::Goto(chain_name(svc.id)),
        )
    } else {
        (RecordSet::Class(class_of(svc)), ElemData::None)
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
        key: key_bytes(&svc.frontend.key(), np),
        data,
        comment: clip(&format!(
            "{} {} {flags} {aff} {}",
            svc.id,
            svc.frontend.kind.as_str(),
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

/// The key of a `localN` element.
pub fn local_key(ip: IpAddr) -> Vec<u8> {
    ip_bytes(ip)
}

/// Parses a `localN` key.
pub fn parse_local_key(k: &[u8]) -> Option<IpAddr> {
    match k.len() {
        4 => Some(IpAddr::V4(<[u8; 4]>::try_from(k).ok()?.into())),
        16 => Some(IpAddr::V6(<[u8; 16]>::try_from(k).ok()?.into())),
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
    /// Add an element.
    AddElem {
        /// Set.
        set: String,
        /// Key.
        key: Vec<u8>,
        /// What it maps to.
        data: ElemData,
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
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
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
                "add rule {chain} ({} exprs){}",
                rule.exprs.len(),
                rule.comment
                    .as_deref()
                    .map(|c| format!(" {c}"))
                    .unwrap_or_default()
            ),
            Op::AddElem {
                set,
                key,
                data,
                comment,
            } => {
                write!(f, "add element {set} {}", hex(key))?;
                match data {
                    ElemData::None => {}
                    ElemData::Goto(c) => write!(f, " : goto {c}")?,
                    ElemData::Value(v) => write!(f, " : {}", hex(v))?,
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
    /// Its affinity chain, if one exists.
    pub chain: Option<String>,
    /// Its affinity sets.
    pub aff_sets: BTreeSet<String>,
    /// Its backend map elements: slot -> backend.
    pub slots: BTreeMap<u32, (IpAddr, u16)>,
}

/// What the table holds, as far as twill knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mirror {
    /// Programmed frontends.
    pub frontends: BTreeMap<FrontendKey, Programmed>,
    /// Hairpin elements and how many (frontend, backend) pairs want each.
    pub hairpin: BTreeMap<IpAddr, usize>,
    /// `localN` elements and how many (frontend, local backend) pairs want each.
    pub local: BTreeMap<IpAddr, usize>,
    /// Classes whose set and `pick` rule exist.
    pub classes: BTreeSet<Class>,
}

/// A transaction and the mirror it leads to.
#[derive(Debug, Default)]
pub struct Tx {
    /// The operations, in order.
    pub ops: Vec<Op>,
    /// Frontends replaced (`Some`) or removed (`None`) by the transaction.
    pub changes: Vec<(FrontendKey, Option<Programmed>)>,
    /// Counts after the transaction (only changed ones).
    pub hairpin: BTreeMap<IpAddr, usize>,
    /// Counts after the transaction (only changed ones).
    pub local: BTreeMap<IpAddr, usize>,
    /// Classes created.
    pub classes: Vec<Class>,
}

fn slots_of(svc: &LbService) -> BTreeMap<u32, (IpAddr, u16)> {
    if svc.affinity_timeout_secs.is_some() {
        return BTreeMap::new();
    }
    svc.backends
        .iter()
        .enumerate()
        .map(|(k, b)| (u32::try_from(k).expect("small"), (b.ip, b.port)))
        .collect()
}

fn programmed(svc: &LbService) -> Programmed {
    let s = svc.clone();
    let rec = record(svc);
    Programmed {
        chain: match &rec.data {
            ElemData::Goto(c) => Some(c.clone()),
            _ => None,
        },
        aff_sets: affinity_sets(svc).into_iter().map(|d| d.name).collect(),
        slots: slots_of(svc),
        record: rec,
        svc: s,
    }
}

fn add_record(ops: &mut Vec<Op>, rec: &Record) {
    ops.push(Op::AddElem {
        set: rec.set.name(),
        key: rec.key.clone(),
        data: rec.data.clone(),
        comment: Some(rec.comment.clone()),
    });
}

fn del_record(ops: &mut Vec<Op>, rec: &Record) {
    ops.push(Op::DelElem {
        set: rec.set.name(),
        key: rec.key.clone(),
    });
}

/// The operations creating a class: its set and its rule in `pick`.
pub fn class_ops(c: Class) -> Vec<Op> {
    vec![
        Op::AddSet(RecordSet::Class(c).def()),
        Op::AddRule {
            chain: PICK.into(),
            rule: c.rule(),
        },
    ]
}

/// Element operations that move a counted set from `before` to `before + delta`.
fn counted(
    ops: &mut Vec<Op>,
    out: &mut BTreeMap<IpAddr, usize>,
    before: &BTreeMap<IpAddr, usize>,
    delta: BTreeMap<IpAddr, isize>,
    set: fn(bool) -> &'static str,
    key: fn(IpAddr) -> Vec<u8>,
) {
    for (ip, d) in delta {
        if d == 0 {
            continue;
        }
        let had = before.get(&ip).copied().unwrap_or(0);
        let now = had.saturating_add_signed(d);
        if had == 0 && now > 0 {
            ops.push(Op::AddElem {
                set: set(ip.is_ipv6()).into(),
                key: key(ip),
                data: ElemData::None,
                comment: None,
            });
        } else if had > 0 && now == 0 {
            ops.push(Op::DelElem {
                set: set(ip.is_ipv6()).into(),
                key: key(ip),
            });
        }
        out.insert(ip, now);
    }
}

impl Mirror {
    /// The transaction that takes the table from this mirror to `plan` applied.
    pub fn transaction(&self, plan: &LbPlan) -> Tx {
        let mut tx = Tx::default();
        let mut hp: BTreeMap<IpAddr, isize> = BTreeMap::new();
        let mut lo: BTreeMap<IpAddr, isize> = BTreeMap::new();
        let mut count = |svc: &LbService, d: isize| {
            for b in &svc.backends {
                *hp.entry(b.ip).or_default() += d;
                if b.node_local {
                    *lo.entry(b.ip).or_default() += d;
                }
            }
        };
        let mut new_classes = BTreeSet::new();
        for f in &plan.deletes {
            let Some(old) = self.frontends.get(&f.key()) else {
                continue;
            };
            del_record(&mut tx.ops, &old.record);
            Self::slot_ops(&mut tx.ops, old, &BTreeMap::new());
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
            if let RecordSet::Class(c) = new.record.set
                && !self.classes.contains(&c)
                && new_classes.insert(c)
            {
                tx.ops.extend(class_ops(c));
                tx.classes.push(c);
            }
            let old_slots = old.map(|o| o.slots.clone()).unwrap_or_default();
            let empty = Programmed {
                slots: old_slots,
                ..new.clone()
            };
            Self::slot_ops(&mut tx.ops, &empty, &new.slots);
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
                tx.ops
                    .extend(affinity_rules(svc).into_iter().map(|rule| Op::AddRule {
                        chain: chain.clone(),
                        rule,
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
        let (mut hairpin, mut local) = (BTreeMap::new(), BTreeMap::new());
        counted(
            &mut tx.ops,
            &mut hairpin,
            &self.hairpin,
            hp,
            hairpin_set,
            hairpin_key,
        );
        counted(
            &mut tx.ops,
            &mut local,
            &self.local,
            lo,
            local_set,
            local_key,
        );
        tx.hairpin = hairpin;
        tx.local = local;
        tx
    }

    /// Element operations taking `old`'s `beN` slots to `new`.
    fn slot_ops(ops: &mut Vec<Op>, old: &Programmed, new: &BTreeMap<u32, (IpAddr, u16)>) {
        let fk = old.svc.frontend.key();
        let v6 = fk.ip.is_ipv6();
        let np = fk.ip.is_unspecified();
        let keys: BTreeSet<u32> = old.slots.keys().chain(new.keys()).copied().collect();
        for k in keys {
            let (had, want) = (old.slots.get(&k), new.get(&k));
            if had == want {
                continue;
            }
            if had.is_some() {
                ops.push(Op::DelElem {
                    set: backend_map(v6, np).into(),
                    key: slot_key(&fk, k),
                });
            }
            if let Some((ip, port)) = want {
                ops.push(Op::AddElem {
                    set: backend_map(v6, np).into(),
                    key: slot_key(&fk, k),
                    data: ElemData::Value(slot_value(*ip, *port)),
                    comment: None,
                });
            }
        }
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
        for (map, upd) in [(&mut self.hairpin, tx.hairpin), (&mut self.local, tx.local)] {
            for (ip, n) in upd {
                if n == 0 {
                    map.remove(&ip);
                } else {
                    map.insert(ip, n);
                }
            }
        }
        self.classes.extend(tx.classes);
    }
}

/// The hairpin and local counts a set of services implies.
pub fn counts<'a>(
    svcs: impl IntoIterator<Item = &'a LbService>,
) -> (BTreeMap<IpAddr, usize>, BTreeMap<IpAddr, usize>) {
    let (mut hp, mut lo) = (BTreeMap::new(), BTreeMap::new());
    for s in svcs {
        for b in &s.backends {
            *hp.entry(b.ip).or_default() += 1;
            if b.node_local {
                *lo.entry(b.ip).or_default() += 1;
            }
        }
    }
    (hp, lo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::lb::{Frontend, plan};

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
            affinity_timeout_secs: None,
            external_local: false,
            internal_local: false,
        }
    }

    fn text(ops: &[Op]) -> Vec<String> {
        ops.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn records_and_classes_round_trip() {
        for (ip, kind) in [
            ("10.96.0.10", FrontendKind::ClusterIp),
            ("fd00::10", FrontendKind::ExternalIp),
            ("0.0.0.0", FrontendKind::NodePort),
            ("::", FrontendKind::NodePort),
        ] {
            for aff in [None, Some(30)] {
                let mut s = svc(7, ip, kind, vec![be("10.0.1.2", 8080, true)]);
                s.affinity_timeout_secs = aff;
                s.external_local = kind != FrontendKind::ClusterIp;
                let r = record(&s);
                assert_eq!(parse_key(r.set, &r.key), Some(s.frontend.key()), "{ip}");
                let m = parse_comment(&r.comment).unwrap();
                assert_eq!(
                    (m.id, m.kind, m.name.as_str(), m.affinity_timeout_secs),
                    (7, kind, "default/s7:http", aff)
                );
                assert_eq!(m.external_local, s.external_local);
                if aff.is_some() {
                    assert_eq!(r.data, ElemData::Goto("s7".into()));
                } else {
                    assert_eq!(r.set, RecordSet::Class(class_of(&s)));
                    assert_eq!(r.data, ElemData::None);
                }
            }
        }
        let empty = svc(8, "10.96.0.11", FrontendKind::ClusterIp, vec![]);
        assert_eq!(
            (record(&empty).set, record(&empty).data),
            (RecordSet::NoEp(false), ElemData::None)
        );
        assert!(parse_key(RecordSet::NoEp(false), &[1, 2, 3]).is_none());
        let c = Class {
            v6: true,
            np: true,
            masq: true,
            n: 12,
        };
        assert_eq!(Class::from_set(&c.set()), Some(c));
        assert_eq!(c.set(), "c6npm-12");
        assert!(Class::from_set("c4-0").is_none() && Class::from_set("cx-1").is_none());
        assert_eq!(
            parse_slot_value(&slot_value("fd00::1".parse().unwrap(), 8080)),
            Some(("fd00::1".parse().unwrap(), 8080))
        );
        let fk = svc(5, "10.96.0.5", FrontendKind::ClusterIp, vec![])
            .frontend
            .key();
        let k = slot_key(&fk, 2);
        assert_eq!(parse_slot_key(&k), Some((&k[..12], 2)));
    }

    #[test]
    fn one_endpoint_change_is_element_updates_only() {
        let a = svc(
            1,
            "10.96.0.1",
            FrontendKind::ClusterIp,
            vec![be("10.0.1.2", 80, true), be("10.0.2.2", 80, false)],
        );
        let mut m = Mirror::default();
        let tx = m.transaction(&plan(std::slice::from_ref(&a), &[]));
        let t = text(&tx.ops);
        assert_eq!(
            t[..4],
            [
                "add set c4-2",
                "add rule pick (9 exprs) c4-2",
                "add element be4 0a600001060000000050000000000000 : 0a00010200500000",
                "add element be4 0a600001060000000050000001000000 : 0a00020200500000",
            ]
        );
        m.commit(tx);
        // A second frontend of the same class needs no chain.
        let b = svc(
            2,
            "10.96.0.2",
            FrontendKind::ClusterIp,
            vec![be("10.0.1.3", 80, true), be("10.0.2.3", 80, false)],
        );
        let tx = m.transaction(&plan(std::slice::from_ref(&b), &[]));
        assert!(
            !text(&tx.ops)
                .iter()
                .any(|o| o.contains("rule") || o.contains("set"))
        );
        m.commit(tx);
        // Replacing one endpoint: one slot, one hairpin element; no rule, no chain.
        let mut a2 = a.clone();
        a2.backends[1] = be("10.0.3.2", 80, false);
        let tx = m.transaction(&plan(&[a2.clone(), b.clone()], &[a.clone(), b.clone()]));
        assert_eq!(
            text(&tx.ops),
            vec![
                "delete element be4 0a600001060000000050000001000000",
                "add element be4 0a600001060000000050000001000000 : 0a00030200500000",
                "delete element hairpin4 0a0002020a000202",
                "add element hairpin4 0a0003020a000302",
            ]
        );
        m.commit(tx);
        // Adding one moves the frontend to another class (a new, small chain once).
        let mut a3 = a2.clone();
        a3.backends.push(be("10.0.4.2", 80, true));
        let tx = m.transaction(&plan(std::slice::from_ref(&a3), std::slice::from_ref(&a2)));
        let t = text(&tx.ops);
        assert_eq!(t[0], "delete element c4-2 0a6000010600000000500000");
        assert!(t.contains(&"add set c4-3".to_string()));
        assert!(t.contains(
            &"add element be4 0a600001060000000050000002000000 : 0a00040200500000".to_string()
        ));
        assert!(t.contains(&"add element local4 0a000402".to_string()));
        m.commit(tx);
        assert_eq!(m.classes.len(), 2);
        assert_eq!(m.local.get(&"10.0.1.2".parse().unwrap()), Some(&1));
    }

    #[test]
    fn affinity_frontends_get_a_chain_sets_and_sticky_rules() {
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
        let rules = affinity_rules(&s);
        assert_eq!(rules.len(), 4);
        assert_eq!(rules[0].comment.as_deref(), Some("a 10.0.1.2 8080"));
        assert_eq!(
            rules
                .iter()
                .filter_map(|r| r.comment.as_deref().and_then(parse_backend_comment))
                .collect::<Vec<_>>(),
            vec![
                ("10.0.1.2".parse().unwrap(), 8080),
                ("10.0.2.2".parse().unwrap(), 8080)
            ]
        );
        let moduli: Vec<Option<u32>> = rules
            .iter()
            .map(|r| {
                r.exprs.iter().find_map(|e| match e {
                    Expr::Numgen { modulus, .. } => Some(*modulus),
                    _ => None,
                })
            })
            .collect();
        assert_eq!(moduli, vec![None, None, Some(2), None]);
        let tx = Mirror::default().transaction(&plan(std::slice::from_ref(&s), &[]));
        let t = text(&tx.ops);
        assert_eq!(t[0], "add chain s4");
        assert!(t.contains(&"add set a4-0a0002021f90".to_string()));
        assert!(!t.iter().any(|o| o.contains("be4")));
    }

    #[test]
    fn losing_all_endpoints_moves_the_record_and_frees_slots() {
        let a = svc(
            1,
            "10.96.0.1",
            FrontendKind::ClusterIp,
            vec![be("10.0.1.2", 80, true)],
        );
        let mut m = Mirror::default();
        let tx = m.transaction(&plan(std::slice::from_ref(&a), &[]));
        m.commit(tx);
        let mut empty = a.clone();
        empty.backends.clear();
        let tx = m.transaction(&plan(
            std::slice::from_ref(&empty),
            std::slice::from_ref(&a),
        ));
        assert_eq!(
            text(&tx.ops),
            vec![
                "delete element c4-1 0a6000010600000000500000",
                "delete element be4 0a600001060000000050000000000000",
                "add element noep4 0a6000010600000000500000 \"1 ClusterIP - - default/s1:http\"",
                "delete element hairpin4 0a0001020a000102",
                "delete element local4 0a000102",
            ]
        );
        m.commit(tx);
        let tx = m.transaction(&plan(&[], std::slice::from_ref(&empty)));
        assert_eq!(
            text(&tx.ops),
            vec!["delete element noep4 0a6000010600000000500000"]
        );
        m.commit(tx);
        assert!(m.frontends.is_empty() && m.hairpin.is_empty() && m.local.is_empty());
    }

    #[test]
    fn shared_backends_keep_their_elements_until_the_last_user_goes() {
        let a = svc(
            1,
            "10.96.0.1",
            FrontendKind::ClusterIp,
            vec![be("10.0.1.2", 80, true)],
        );
        let n = svc(
            2,
            "0.0.0.0",
            FrontendKind::NodePort,
            vec![be("10.0.1.2", 80, true)],
        );
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
        assert_eq!(
            counts(std::slice::from_ref(&n)),
            (m.hairpin.clone(), m.local.clone())
        );
    }

    #[test]
    fn static_layout_is_complete() {
        let mut sets = static_sets();
        let mut rules: Vec<Rule> = static_chains().into_iter().flat_map(|(_, r)| r).collect();
        for v6 in [false, true] {
            for np in [false, true] {
                let c = Class {
                    v6,
                    np,
                    masq: true,
                    n: 3,
                };
                for op in class_ops(c) {
                    match op {
                        Op::AddSet(d) => sets.push(d),
                        Op::AddRule { rule, .. } => rules.push(rule),
                        _ => {}
                    }
                }
            }
        }
        // Every set a rule looks up exists, with a key as long as the registers loaded.
        for r in &rules {
            for e in &r.exprs {
                if let Expr::Lookup { set, .. } = e {
                    assert!(sets.iter().any(|s| &s.name == set), "{set}");
                }
            }
        }
        assert_eq!(static_chains()[0].0.name, PICK);
        assert_eq!(
            parse_hairpin_key(&hairpin_key("fd00::1".parse().unwrap())),
            Some("fd00::1".parse().unwrap())
        );
        assert_eq!(clip(&"é".repeat(150)).len(), 200);
    }
}
