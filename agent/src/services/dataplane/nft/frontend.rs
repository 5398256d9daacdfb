//! One frontend in the `inet twill` table (pure): its record element and the comment that
//! carries its id, kind, name and flags, its backend slots in `beN`/`benpN`, its affinity chain
//! and sets, and the parsers that read each back. The layout and why it is shaped so are in
//! [`super::render`].

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::expr::{
    BASE_NETWORK, CMP_EQ, DYNSET_UPDATE, Expr, Imm, NAT_DNAT, NAT_F_PROTO_SPECIFIED, NG_RANDOM,
};
use super::render::{
    AFFINITY_SET_SIZE, MAX_COMMENT, NFPROTO_IPV4, NFPROTO_IPV6, RecordSet, Rule, SET_EVAL,
    SET_TIMEOUT, SetData, SetDef, T_IPV4, T_IPV6, class_of, cmp, lookup, masquerades, payload,
    saddr, set_masq_mark,
};
use crate::services::dataplane::record_meta;
use crate::services::lb::{Backend, FrontendKey, FrontendKind, LbService, Proto};

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

pub(crate) fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

pub(crate) fn backend_comment(tag: char, b: &Backend) -> String {
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

pub(crate) fn key_bytes(key: &FrontendKey, node_port: bool) -> Vec<u8> {
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

pub(crate) fn parse_kind(s: &str) -> Option<FrontendKind> {
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
    Record {
        set,
        key: key_bytes(&svc.frontend.key(), np),
        data,
        comment: clip(&record_meta(svc)),
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

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}
