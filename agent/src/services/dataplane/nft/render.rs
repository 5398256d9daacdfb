//! What twill's `inet twill` table holds, rendered from [`LbService`]s (pure; every function
//! here runs without root): the static sets and chains, and the frontend classes. One
//! frontend's elements are in [`super::frontend`], the transaction a plan turns into in
//! [`super::diff`].
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

use std::net::Ipv6Addr;

use super::expr::{
    BASE_NETWORK, BASE_TRANSPORT, CMP_EQ, CMP_NEQ, CT_STATE, CT_STATUS, Expr, FIB_ADDRTYPE,
    FIB_F_DADDR, ICMPX_PORT_UNREACH, Imm, META_L4PROTO, META_MARK, META_NFPROTO, NAT_DNAT,
    NAT_F_PROTO_SPECIFIED, NAT_F_RANDOM_FULLY, NG_RANDOM, REJECT_ICMPX, VERDICT_JUMP, reg32,
};
use crate::services::lb::{FrontendKind, LbService};

/// The table twill owns (family `inet`).
pub const TABLE: &str = "twill";
/// The packet mark bit asking `nat_postrouting` to masquerade (kube-proxy's bit).
pub const MASQ_MARK: u32 = 0x4000;
/// Longest comment written (the userdata TLV holds at most 255 bytes).
pub(crate) const MAX_COMMENT: usize = 200;
/// Capacity of each affinity set (clients per backend).
pub const AFFINITY_SET_SIZE: u32 = 65_536;
/// The chain holding one rule per class.
pub const PICK: &str = "pick";

pub(crate) const NFPROTO_IPV4: u8 = 2;
pub(crate) const NFPROTO_IPV6: u8 = 10;
pub(crate) const RTN_LOCAL: u32 = 2;
/// `IPS_DST_NAT`.
pub(crate) const IPS_DST_NAT: u32 = 0x20;
/// `NF_CT_STATE_BIT(IP_CT_NEW)`.
pub(crate) const CT_STATE_NEW: u32 = 0x8;

// nft's datatype ids, for key and data types (informational for the kernel, used by `nft list`).
pub(crate) const T_IPV4: u32 = 7;
pub(crate) const T_IPV6: u32 = 8;
pub(crate) const T_PROTO: u32 = 12;
pub(crate) const T_SERVICE: u32 = 13;
pub(crate) const T_MARK: u32 = 19;
/// `NFT_DATA_VERDICT`.
pub const DATA_VERDICT_TYPE: u32 = 0xffff_ff00;
/// `NFT_SET_MAP`.
pub const SET_MAP: u32 = 0x8;
/// `NFT_SET_TIMEOUT`.
pub const SET_TIMEOUT: u32 = 0x10;
/// `NFT_SET_EVAL`.
pub const SET_EVAL: u32 = 0x20;

pub(crate) fn concat_type(types: &[u32]) -> u32 {
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
pub(crate) fn frontend_key_type(v6: bool, np: bool) -> (u32, u32) {
    match (np, v6) {
        (true, _) => (concat_type(&[T_PROTO, T_SERVICE]), 8),
        (false, false) => (concat_type(&[T_IPV4, T_PROTO, T_SERVICE]), 12),
        (false, true) => (concat_type(&[T_IPV6, T_PROTO, T_SERVICE]), 24),
    }
}

pub(crate) fn map_def(name: &str, key_type: u32, key_len: u32, data: SetData) -> SetDef {
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

pub(crate) fn meta(key: u32, dreg: u32) -> Expr {
    Expr::Meta { key, dreg }
}

pub(crate) fn cmp(sreg: u32, op: u32, data: impl Into<Vec<u8>>) -> Expr {
    Expr::Cmp {
        sreg,
        op,
        data: data.into(),
    }
}

pub(crate) fn payload(base: u32, offset: u32, len: u32, dreg: u32) -> Expr {
    Expr::Payload {
        base,
        offset,
        len,
        dreg,
    }
}

pub(crate) fn nfproto(v6: bool) -> [Expr; 2] {
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
pub(crate) fn daddr(v6: bool) -> (u32, u32) {
    if v6 { (24, 16) } else { (16, 4) }
}

pub(crate) fn saddr(v6: bool) -> (u32, u32) {
    if v6 { (8, 16) } else { (12, 4) }
}

/// `daddr . l4proto . dport` into registers from 1.
pub(crate) fn addr_proto_port(v6: bool) -> Vec<Expr> {
    let (off, len) = daddr(v6);
    let words = len / 4;
    vec![
        payload(BASE_NETWORK, off, len, 1),
        meta(META_L4PROTO, reg32(words)),
        payload(BASE_TRANSPORT, 2, 2, reg32(words + 1)),
    ]
}

/// `l4proto . dport` into registers from 1.
pub(crate) fn proto_port() -> Vec<Expr> {
    vec![
        meta(META_L4PROTO, 1),
        payload(BASE_TRANSPORT, 2, 2, reg32(1)),
    ]
}

pub(crate) fn fib_local() -> [Expr; 2] {
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
pub(crate) fn not_loopback(v6: bool) -> Vec<Expr> {
    if v6 {
        vec![
            payload(BASE_NETWORK, 24, 16, 1),
            cmp(1, CMP_NEQ, Ipv6Addr::LOCALHOST.octets()),
        ]
    } else {
        vec![payload(BASE_NETWORK, 16, 1, 1), cmp(1, CMP_NEQ, vec![127])]
    }
}

pub(crate) fn ct_bit(key: u32, bit: u32) -> [Expr; 3] {
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

pub(crate) fn lookup(set: &str, dreg: Option<u32>) -> Expr {
    Expr::Lookup {
        set: set.into(),
        sreg: 1,
        dreg,
    }
}

pub(crate) fn jump(chain: &str) -> Expr {
    Expr::Immediate {
        dreg: 0,
        data: Imm::Verdict {
            code: VERDICT_JUMP,
            chain: Some(chain.into()),
        },
    }
}

pub(crate) fn reject() -> Expr {
    Expr::Reject {
        ty: REJECT_ICMPX,
        code: ICMPX_PORT_UNREACH,
    }
}

pub(crate) fn masquerade() -> Expr {
    Expr::Masq {
        flags: NAT_F_RANDOM_FULLY,
    }
}

/// `meta mark set meta mark | MASQ_MARK`, through register `r`.
pub(crate) fn set_masq_mark(r: u32) -> [Expr; 3] {
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

pub(crate) fn rule(exprs: Vec<Expr>) -> Rule {
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

#[cfg(test)]
#[path = "render_tests.rs"]
mod tests;
