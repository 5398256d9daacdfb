//! The nftables service dataplane ([`NftLb`]): one table, `inet twill`, programmed through
//! nf_tables netlink transactions.
//!
//! Why it is shaped as it is:
//! - The layout and the reasons for it are in [`render`]; the expressions in [`expr`]; the
//!   netlink plumbing in [`super::nfnl`]. This module only moves data between them and the
//!   kernel.
//! - **One transaction per sync, the size of the change.** [`LbDataplane::apply`] turns the plan
//!   into operations against a mirror of the table ([`render::Mirror`]): a changed endpoint set
//!   is a flush of one chain and its new rules; a new frontend is a chain, its rules and one map
//!   element. All of it goes to the kernel as one nf_tables batch, so packets see the old or the
//!   new state, never a mix, and nothing outside `inet twill` is read or written (other tables,
//!   iptables-nft's `ip nat`, ... stay as they are).
//! - **The kernel is the state.** [`LbDataplane::observed`] dumps the table and rebuilds
//!   [`LbService`]s from it: the record comments carry ids, kinds and names, rule comments the
//!   backends' locality, and every chain is compared expression by expression with what would
//!   be rendered for the service it claims to be. A rule someone changed makes the service
//!   differ (its name gets a ` (drifted)` suffix no Kubernetes name can have), so the next plan
//!   rewrites it; a damaged static chain, a stray chain or set, or a wrong hairpin element is
//!   repaired on the spot. A restarted agent therefore finds exactly what it would program and
//!   changes nothing.
//! - The mirror keeps no Maglev tables (this dataplane does not use them); `observed`
//!   recomputes them so the services it returns compare equal to the desired ones.
//! - A restart never flushes: the skeleton (static sets and chains) is created idempotently and
//!   the static chains are rewritten in the same transaction as their flush.
//! - UDP conntrack entries of removed backends are deleted after each apply
//!   ([`super::conntrack`]).
//!
//! Needs Linux >= 5.10 (inet NAT chains 5.2, `fib` in inet, userdata on elements) and
//! `CAP_NET_ADMIN`. Everything happens in the calling thread's network namespace.

pub mod expr;
pub mod render;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use tracing::{debug, info, warn};

use self::expr::{VERDICT_GOTO, data_verdict, decode, decode_verdict};
use self::render::{
    ChainDef, Class, ElemData, Mirror, Op, PICK, Programmed, Record, RecordSet, Rule, SetData,
    SetDef, TABLE, affinity_rules, affinity_set_id, backend_map, chain_id, counts, hairpin_key,
    hairpin_set, local_key, local_set, parse_backend_comment, parse_comment, parse_hairpin_key,
    parse_key, parse_local_key, parse_slot_key, parse_slot_value, record, static_chains,
    static_sets,
};
use super::conntrack;
use crate::services::lb::{
    Backend, BackendState, Frontend, LbDataplane, LbError, LbPlan, LbService,
};
use crate::shared::nfnl::{
    Attr, Batch, F_APPEND, F_CREATE, Msg, MsgBuf, NfSocket, NfnlError, SUBSYS_NFTABLES,
};

const NFPROTO_INET: u8 = 1;
const NF_ACCEPT: u32 = 1;
const ENOENT: i32 = 2;

// Message types.
const MSG_NEWTABLE: u16 = 0;
const MSG_GETTABLE: u16 = 1;
const MSG_DELTABLE: u16 = 2;
const MSG_NEWCHAIN: u16 = 3;
const MSG_GETCHAIN: u16 = 4;
const MSG_DELCHAIN: u16 = 5;
const MSG_NEWRULE: u16 = 6;
const MSG_GETRULE: u16 = 7;
const MSG_DELRULE: u16 = 8;
const MSG_NEWSET: u16 = 9;
const MSG_GETSET: u16 = 10;
const MSG_DELSET: u16 = 11;
const MSG_NEWSETELEM: u16 = 12;
const MSG_GETSETELEM: u16 = 13;
const MSG_DELSETELEM: u16 = 14;
const MSG_GETGEN: u16 = 16;
const GEN_ID: u16 = 1;

// Attributes.
const TABLE_NAME: u16 = 1;
const CHAIN_TABLE: u16 = 1;
const CHAIN_NAME: u16 = 3;
const CHAIN_HOOK: u16 = 4;
const CHAIN_POLICY: u16 = 5;
const CHAIN_TYPE: u16 = 7;
const HOOK_HOOKNUM: u16 = 1;
const HOOK_PRIORITY: u16 = 2;
const RULE_TABLE: u16 = 1;
const RULE_CHAIN: u16 = 2;
const RULE_EXPRESSIONS: u16 = 4;
const RULE_USERDATA: u16 = 7;
const SET_TABLE: u16 = 1;
const SET_NAME: u16 = 2;
const SET_FLAGS: u16 = 3;
const SET_KEY_TYPE: u16 = 4;
const SET_KEY_LEN: u16 = 5;
const SET_DATA_TYPE: u16 = 6;
const SET_DATA_LEN: u16 = 7;
const SET_DESC: u16 = 9;
const SET_ID: u16 = 10;
const SET_TIMEOUT: u16 = 11;
const SET_DESC_SIZE: u16 = 1;
const ELEM_LIST_TABLE: u16 = 1;
const ELEM_LIST_SET: u16 = 2;
const ELEM_LIST_ELEMENTS: u16 = 3;
const LIST_ELEM: u16 = 1;
const ELEM_KEY: u16 = 1;
const ELEM_DATA: u16 = 2;
const ELEM_USERDATA: u16 = 6;
const DATA_VALUE: u16 = 1;
/// `NFTNL_UDATA_*_COMMENT`: the comment TLV type for rules, chains and elements alike.
const UDATA_COMMENT: u8 = 0;

/// Errors of the nftables dataplane.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// A netlink operation failed.
    #[error("nftables {op} {object}: {source}")]
    Netlink {
        /// The operation (`transaction`, `dump rules`, ...).
        op: &'static str,
        /// The object (table, set, the failing message).
        object: String,
        /// The netlink error, with the errno.
        #[source]
        source: NfnlError,
    },
}

impl From<NftError> for LbError {
    fn from(e: NftError) -> Self {
        match e {
            NftError::Netlink { op, object, source } => LbError::Op {
                op,
                object,
                source: Box::new(source),
            },
        }
    }
}

fn nl(op: &'static str, object: impl Into<String>) -> impl FnOnce(NfnlError) -> NftError {
    let object = object.into();
    move |source| NftError::Netlink { op, object, source }
}

fn comment_udata(c: &str) -> Vec<u8> {
    let c = render::clip(c);
    let mut v = vec![UDATA_COMMENT, u8::try_from(c.len() + 1).expect("clipped")];
    v.extend_from_slice(c.as_bytes());
    v.push(0);
    v
}

fn parse_udata_comment(data: &[u8]) -> Option<String> {
    let mut rest = data;
    while rest.len() >= 2 {
        let (ty, len) = (rest[0], usize::from(rest[1]));
        let value = rest.get(2..2 + len)?;
        if ty == UDATA_COMMENT {
            let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
            return Some(String::from_utf8_lossy(&value[..end]).into_owned());
        }
        rest = &rest[2 + len..];
    }
    None
}

/// Encodes operations into one nf_tables batch on `table`.
pub fn encode_ops(table: &str, ops: &[Op]) -> Batch {
    let mut b = Batch::new();
    let mut set_id = 0u32;
    for op in ops {
        match op {
            Op::AddSet(s) => {
                set_id += 1;
                encode_set(&mut b, table, s, set_id);
            }
            Op::DelSet(name) => {
                b.push(
                    MSG_DELSET,
                    0,
                    NFPROTO_INET,
                    format!("delete set {name}"),
                    |m| {
                        m.str(SET_TABLE, table);
                        m.str(SET_NAME, name);
                    },
                );
            }
            Op::AddChain(c) => encode_chain(&mut b, table, c),
            Op::FlushChain(c) => {
                b.push(
                    MSG_DELRULE,
                    0,
                    NFPROTO_INET,
                    format!("flush chain {c}"),
                    |m| {
                        m.str(RULE_TABLE, table);
                        m.str(RULE_CHAIN, c);
                    },
                );
            }
            Op::DelChain(c) => {
                b.push(
                    MSG_DELCHAIN,
                    0,
                    NFPROTO_INET,
                    format!("delete chain {c}"),
                    |m| {
                        m.str(CHAIN_TABLE, table);
                        m.str(CHAIN_NAME, c);
                    },
                );
            }
            Op::AddRule { chain, rule } => b.push(
                MSG_NEWRULE,
                F_CREATE | F_APPEND,
                NFPROTO_INET,
                format!("add rule to chain {chain}"),
                |m| {
                    m.str(RULE_TABLE, table);
                    m.str(RULE_CHAIN, chain);
                    expr::encode(m, RULE_EXPRESSIONS, &rule.exprs);
                    if let Some(c) = &rule.comment {
                        m.attr(RULE_USERDATA, &comment_udata(c));
                    }
                },
            ),
            Op::AddElem {
                set,
                key,
                data,
                comment,
            } => b.push(
                MSG_NEWSETELEM,
                F_CREATE,
                NFPROTO_INET,
                format!("add element to {set}"),
                |m| {
                    elem_list(m, table, set, key, |m| {
                        match data {
                            ElemData::None => {}
                            ElemData::Goto(c) => data_verdict(m, ELEM_DATA, VERDICT_GOTO, Some(c)),
                            ElemData::Value(v) => {
                                m.nest(ELEM_DATA);
                                m.attr(DATA_VALUE, v);
                                m.nest_end();
                            }
                        }
                        if let Some(c) = comment {
                            m.attr(ELEM_USERDATA, &comment_udata(c));
                        }
                    });
                },
            ),
            Op::DelElem { set, key } => b.push(
                MSG_DELSETELEM,
                0,
                NFPROTO_INET,
                format!("delete element from {set}"),
                |m| elem_list(m, table, set, key, |_| {}),
            ),
        }
    }
    b
}

fn elem_list(m: &mut MsgBuf, table: &str, set: &str, key: &[u8], extra: impl FnOnce(&mut MsgBuf)) {
    m.str(ELEM_LIST_TABLE, table);
    m.str(ELEM_LIST_SET, set);
    m.nest(ELEM_LIST_ELEMENTS);
    m.nest(LIST_ELEM);
    m.nest(ELEM_KEY);
    m.attr(DATA_VALUE, key);
    m.nest_end();
    extra(m);
    m.nest_end();
    m.nest_end();
}

fn encode_set(b: &mut Batch, table: &str, s: &SetDef, id: u32) {
    b.push(
        MSG_NEWSET,
        F_CREATE,
        NFPROTO_INET,
        format!("add set {}", s.name),
        |m| {
            m.str(SET_TABLE, table);
            m.str(SET_NAME, &s.name);
            m.u32_be(SET_FLAGS, s.flags);
            m.u32_be(SET_KEY_TYPE, s.key_type);
            m.u32_be(SET_KEY_LEN, s.key_len);
            match s.data {
                SetData::None => {}
                SetData::Verdict => m.u32_be(SET_DATA_TYPE, render::DATA_VERDICT_TYPE),
                SetData::Value(ty, len) => {
                    m.u32_be(SET_DATA_TYPE, ty);
                    m.u32_be(SET_DATA_LEN, len);
                }
            }
            m.u32_be(SET_ID, id);
            if let Some(t) = s.timeout_ms {
                m.u64_be(SET_TIMEOUT, t);
            }
            if let Some(size) = s.size {
                m.nest(SET_DESC);
                m.u32_be(SET_DESC_SIZE, size);
                m.nest_end();
            }
        },
    );
}

fn encode_chain(b: &mut Batch, table: &str, c: &ChainDef) {
    b.push(
        MSG_NEWCHAIN,
        F_CREATE,
        NFPROTO_INET,
        format!("add chain {}", c.name),
        |m| {
            m.str(CHAIN_TABLE, table);
            m.str(CHAIN_NAME, &c.name);
            if let Some(h) = c.hook {
                m.nest(CHAIN_HOOK);
                m.u32_be(HOOK_HOOKNUM, h.hooknum);
                m.u32_be(HOOK_PRIORITY, h.priority.cast_unsigned());
                m.nest_end();
                m.u32_be(CHAIN_POLICY, NF_ACCEPT);
                m.str(CHAIN_TYPE, h.ty);
            }
        },
    );
}

/// The operations that create the skeleton (idempotently) and rewrite the static chains.
///
/// `pick` is created but never flushed here: its rules (one per frontend class) are the
/// services', written by the plans and checked by the read-back. Flushing it on open left
/// every frontend of a class untranslated, from this commit until the read-back's repair
/// re-added the rules: a restart refused or dropped the connections of those milliseconds.
fn skeleton_ops() -> Vec<Op> {
    let mut ops: Vec<Op> = static_sets().into_iter().map(Op::AddSet).collect();
    for (chain, rules) in static_chains() {
        let name = chain.name.clone();
        ops.push(Op::AddChain(chain));
        if name == PICK {
            continue;
        }
        ops.push(Op::FlushChain(name.clone()));
        ops.extend(rules.into_iter().map(|rule| Op::AddRule {
            chain: name.clone(),
            rule,
        }));
    }
    ops
}

/// A set as dumped.
#[derive(Debug, Clone)]
struct DumpedSet {
    flags: u32,
    key_len: u32,
}

/// Backend slots of one frontend: slot -> backend.
type Slots = BTreeMap<u32, (IpAddr, u16)>;

/// An element as dumped: key, data, comment.
type Elem = (Vec<u8>, ElemData, Option<String>);

/// Everything in the table, as dumped.
#[derive(Debug, Default)]
struct Dump {
    sets: BTreeMap<String, DumpedSet>,
    chains: BTreeSet<String>,
    rules: BTreeMap<String, Vec<Rule>>,
    /// Elements of every static set, by set name.
    elems: BTreeMap<String, Vec<Elem>>,
}

impl Dump {
    fn elems(&self, set: &str) -> &[Elem] {
        self.elems.get(set).map_or(&[][..], Vec::as_slice)
    }
}

/// The nftables service dataplane.
pub struct NftLb {
    sock: NfSocket,
    mirror: Mirror,
    /// The ruleset generation after our last transaction or read-back: while the kernel
    /// reports the same, nothing changed since and the mirror is the table.
    genid: Option<u32>,
}

impl std::fmt::Debug for NftLb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NftLb")
            .field("frontends", &self.mirror.frontends.len())
            .finish_non_exhaustive()
    }
}

impl NftLb {
    /// Opens the dataplane in the calling thread's network namespace: creates the table's
    /// skeleton if missing (never flushing what is there) and reads the table back.
    pub fn open() -> Result<Self, NftError> {
        let sock = NfSocket::open().map_err(nl("open", "netlink socket"))?;
        let mut lb = NftLb {
            sock,
            mirror: Mirror::default(),
            genid: None,
        };
        lb.ensure_skeleton()?;
        lb.read_back()?;
        Ok(lb)
    }

    /// What the table `inet twill` of the calling thread's namespace holds, read without
    /// creating or repairing anything (for `twilld get services`); `None` without the table.
    pub fn peek() -> Result<Option<Vec<LbService>>, NftError> {
        let mut lb = NftLb {
            sock: NfSocket::open().map_err(nl("open", "netlink socket"))?,
            mirror: Mirror::default(),
            genid: None,
        };
        Ok(lb.dump_table()?.map(|d| reconstruct(&d).0))
    }

    /// Whether nf_tables answers in this namespace (the kernel has it and we may use it).
    pub fn probe() -> Result<(), NftError> {
        let mut sock = NfSocket::open().map_err(nl("open", "netlink socket"))?;
        sock.dump((SUBSYS_NFTABLES << 8) | MSG_GETTABLE, NFPROTO_INET, |_| {})
            .map_err(nl("dump", "tables"))?;
        Ok(())
    }

    /// Removes `inet twill` (a no-op if it does not exist): the node has no nftables service
    /// dataplane afterwards.
    pub fn uninstall() -> Result<bool, NftError> {
        let mut sock = NfSocket::open().map_err(nl("open", "netlink socket"))?;
        let mut b = Batch::new();
        b.push(
            MSG_DELTABLE,
            0,
            NFPROTO_INET,
            format!("delete table inet {TABLE}"),
            |m| {
                m.str(TABLE_NAME, TABLE);
            },
        );
        match sock.commit(&b) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(ENOENT) => Ok(false),
            Err(e) => Err(nl("delete", format!("table inet {TABLE}"))(e)),
        }
    }

    /// Number of frontends programmed.
    pub fn len(&self) -> usize {
        self.mirror.frontends.len()
    }

    /// No frontend programmed.
    pub fn is_empty(&self) -> bool {
        self.mirror.frontends.is_empty()
    }

    /// The ruleset generation (`NFT_MSG_GETGEN`); it changes with every committed
    /// transaction of any owner in this namespace.
    fn generation(&mut self) -> Option<u32> {
        let msgs = self
            .sock
            .get((SUBSYS_NFTABLES << 8) | MSG_GETGEN, 0, |_| {})
            .ok()?;
        msgs.iter()
            .find_map(|m| m.attrs().get(GEN_ID).and_then(|a| a.u32_be().ok()))
    }

    /// The services the mirror holds (after a read-back or our own transactions).
    fn mirrored(&self) -> Vec<LbService> {
        self.mirror
            .frontends
            .values()
            .map(|p| p.svc.clone())
            .collect()
    }

    fn ensure_skeleton(&mut self) -> Result<(), NftError> {
        let mut ops = vec![];
        let mut b = Batch::new();
        b.push(
            MSG_NEWTABLE,
            F_CREATE,
            NFPROTO_INET,
            format!("add table inet {TABLE}"),
            |m| {
                m.str(TABLE_NAME, TABLE);
            },
        );
        ops.extend(skeleton_ops());
        let rest = encode_ops(TABLE, &ops);
        self.commit_two(b, &rest)
    }

    fn commit_two(&mut self, mut first: Batch, rest: &Batch) -> Result<(), NftError> {
        first.append(rest);
        self.sock
            .commit(&first)
            .map_err(nl("transaction", format!("table inet {TABLE}")))
    }

    fn dump_table(&mut self) -> Result<Option<Dump>, NftError> {
        let mut d = Dump::default();
        let sets = match self
            .sock
            .dump((SUBSYS_NFTABLES << 8) | MSG_GETSET, NFPROTO_INET, |m| {
                m.str(SET_TABLE, TABLE);
            }) {
            Ok(s) => s,
            Err(e) if e.errno() == Some(ENOENT) => return Ok(None),
            Err(e) => return Err(nl("dump", "sets")(e)),
        };
        for m in &sets {
            let a = m.attrs();
            if a.get(SET_TABLE).map(|t| t.str()).as_deref() != Some(TABLE) {
                continue;
            }
            let Some(name) = a.get(SET_NAME).map(|n| n.str()) else {
                continue;
            };
            let u = |ty| {
                a.get(ty)
                    .and_then(|x: Attr<'_>| x.u32_be().ok())
                    .unwrap_or(0)
            };
            d.sets.insert(
                name,
                DumpedSet {
                    flags: u(SET_FLAGS),
                    key_len: u(SET_KEY_LEN),
                },
            );
        }
        for m in self
            .sock
            .dump((SUBSYS_NFTABLES << 8) | MSG_GETCHAIN, NFPROTO_INET, |m| {
                m.str(CHAIN_TABLE, TABLE);
            })
            .map_err(nl("dump", "chains"))?
        {
            let a = m.attrs();
            if a.get(CHAIN_TABLE).map(|t| t.str()).as_deref() == Some(TABLE)
                && let Some(n) = a.get(CHAIN_NAME)
            {
                d.chains.insert(n.str());
            }
        }
        for m in self
            .sock
            .dump((SUBSYS_NFTABLES << 8) | MSG_GETRULE, NFPROTO_INET, |m| {
                m.str(RULE_TABLE, TABLE);
            })
            .map_err(nl("dump", "rules"))?
        {
            let a = m.attrs();
            if a.get(RULE_TABLE).map(|t| t.str()).as_deref() != Some(TABLE) {
                continue;
            }
            let Some(chain) = a.get(RULE_CHAIN).map(|c| c.str()) else {
                continue;
            };
            let exprs = match a.get(RULE_EXPRESSIONS) {
                Some(list) => decode(list).map_err(nl("decode", format!("rule in {chain}")))?,
                None => Vec::new(),
            };
            let comment = a
                .get(RULE_USERDATA)
                .and_then(|u| parse_udata_comment(u.data));
            d.rules
                .entry(chain)
                .or_default()
                .push(Rule { exprs, comment });
        }
        let names: Vec<String> = static_sets()
            .into_iter()
            .map(|s| s.name)
            .filter(|n| d.sets.contains_key(n))
            .chain(
                d.sets
                    .keys()
                    .filter(|n| Class::from_set(n).is_some())
                    .cloned(),
            )
            .collect();
        for name in names {
            let elems = self.dump_elems(&name)?;
            d.elems.insert(name, elems);
        }
        Ok(Some(d))
    }

    fn dump_elems(&mut self, set: &str) -> Result<Vec<Elem>, NftError> {
        let msgs: Vec<Msg> = self
            .sock
            .dump((SUBSYS_NFTABLES << 8) | MSG_GETSETELEM, NFPROTO_INET, |m| {
                m.str(ELEM_LIST_TABLE, TABLE);
                m.str(ELEM_LIST_SET, set);
            })
            .map_err(nl("dump", format!("elements of {set}")))?;
        let mut out = Vec::new();
        for m in &msgs {
            let Some(list) = m.attrs().get(ELEM_LIST_ELEMENTS) else {
                continue;
            };
            for e in list.nested().filter(|e| e.ty == LIST_ELEM) {
                let e = e.nested();
                let Some(key) = e
                    .get(ELEM_KEY)
                    .and_then(|k| k.nested().get(DATA_VALUE))
                    .map(|v| v.data.to_vec())
                else {
                    continue;
                };
                let data = match e.get(ELEM_DATA) {
                    Some(d) if d.nested().get(expr::DATA_VERDICT).is_some() => {
                        match decode_verdict(d) {
                            Ok((VERDICT_GOTO, Some(c))) => ElemData::Goto(c),
                            _ => ElemData::Value(Vec::new()),
                        }
                    }
                    Some(d) => ElemData::Value(
                        d.nested()
                            .get(DATA_VALUE)
                            .map(|v| v.data.to_vec())
                            .unwrap_or_default(),
                    ),
                    None => ElemData::None,
                };
                let comment = e
                    .get(ELEM_USERDATA)
                    .and_then(|u| parse_udata_comment(u.data));
                out.push((key, data, comment));
            }
        }
        Ok(out)
    }

    /// Reads the table, repairs what is not twill's doing, rebuilds the mirror, and returns
    /// the services it holds.
    fn read_back(&mut self) -> Result<Vec<LbService>, NftError> {
        self.read_back_raw()
    }

    fn read_back_raw(&mut self) -> Result<Vec<LbService>, NftError> {
        let before = self.generation();
        if before.is_some() && before == self.genid {
            return Ok(self.mirrored());
        }
        let dump = match self.dump_table()? {
            Some(d) if layout_ok(&d) => d,
            found => {
                // No table, or one with another layout (an older twill): start over in one
                // transaction. The plan that follows re-adds every service.
                if found.is_some() {
                    warn!(
                        table = TABLE,
                        "nftables table has an unexpected layout; recreating it"
                    );
                }
                let mut b = Batch::new();
                if found.is_some() {
                    b.push(MSG_DELTABLE, 0, NFPROTO_INET, "delete table", |m| {
                        m.str(TABLE_NAME, TABLE);
                    });
                }
                b.push(MSG_NEWTABLE, F_CREATE, NFPROTO_INET, "add table", |m| {
                    m.str(TABLE_NAME, TABLE);
                });
                let rest = encode_ops(TABLE, &skeleton_ops());
                self.commit_two(b, &rest)?;
                self.mirror = Mirror::default();
                self.genid = None;
                return Ok(Vec::new());
            }
        };
        let (services, mirror, repairs) = reconstruct(&dump);
        if !repairs.is_empty() {
            info!(operations = repairs.len(), "repairing the nftables table");
            debug!(ops = ?repairs.iter().map(ToString::to_string).collect::<Vec<_>>());
            self.sock
                .commit(&encode_ops(TABLE, &repairs))
                .map_err(nl("repair", format!("table inet {TABLE}")))?;
        }
        self.mirror = mirror;
        // Only trust the shortcut next time if nobody changed anything while we read.
        let after = self.generation();
        let repaired = u32::from(!repairs.is_empty());
        self.genid = match (before, after) {
            (Some(b), Some(a)) if a == b.wrapping_add(repaired) => Some(a),
            _ => None,
        };
        Ok(services)
    }
}

fn layout_ok(d: &Dump) -> bool {
    static_sets().iter().all(|s| {
        d.sets
            .get(&s.name)
            .is_some_and(|x| x.flags == s.flags && x.key_len == s.key_len)
    })
}

/// Rebuilds services and the mirror from a dump; lists the operations that repair what twill
/// did not write (stray chains, sets and elements, damaged static or pick chains, wrong
/// hairpin/local elements, records that do not parse). Pure.
#[expect(clippy::too_many_lines, reason = "one pass over the dump, in order")]
fn reconstruct(d: &Dump) -> (Vec<LbService>, Mirror, Vec<Op>) {
    let mut repairs = Vec::new();
    for (chain, rules) in static_chains() {
        let dynamic = chain.name == PICK;
        if !d.chains.contains(&chain.name)
            || (!dynamic
                && d.rules.get(&chain.name).map_or(&[][..], Vec::as_slice) != rules.as_slice())
        {
            let name = chain.name.clone();
            repairs.push(Op::AddChain(chain));
            if !dynamic {
                repairs.push(Op::FlushChain(name.clone()));
                repairs.extend(rules.into_iter().map(|rule| Op::AddRule {
                    chain: name.clone(),
                    rule,
                }));
            }
        }
    }
    let mut mirror = Mirror::default();
    // Classes: a set each, and one rule each in `pick`.
    let classes: BTreeSet<Class> = d.sets.keys().filter_map(|n| Class::from_set(n)).collect();
    let mut want: Vec<Rule> = classes.iter().map(|c| c.rule()).collect();
    let mut have: Vec<Rule> = d.rules.get(PICK).cloned().unwrap_or_default();
    want.sort_by(|a, b| a.comment.cmp(&b.comment));
    have.sort_by(|a, b| a.comment.cmp(&b.comment));
    if want != have {
        repairs.push(Op::FlushChain(PICK.into()));
        repairs.extend(classes.iter().map(|c| Op::AddRule {
            chain: PICK.into(),
            rule: c.rule(),
        }));
    }
    mirror.classes.clone_from(&classes);
    // Backend slots, by backend map and frontend key.
    let mut slots: BTreeMap<(&'static str, Vec<u8>), Slots> = BTreeMap::new();
    for v6 in [false, true] {
        for np in [false, true] {
            let map = backend_map(v6, np);
            for (key, data, _) in d.elems(map) {
                let parsed = match data {
                    ElemData::Value(v) => parse_slot_key(key).zip(parse_slot_value(v)),
                    _ => None,
                };
                match parsed {
                    Some(((fk, slot), be)) => {
                        slots
                            .entry((map, fk.to_vec()))
                            .or_default()
                            .insert(slot, be);
                    }
                    None => repairs.push(Op::DelElem {
                        set: map.into(),
                        key: key.clone(),
                    }),
                }
            }
        }
    }
    let local: BTreeSet<IpAddr> = [false, true]
        .into_iter()
        .flat_map(|v6| d.elems(local_set(v6)).iter())
        .filter_map(|(k, _, _)| parse_local_key(k))
        .collect();
    let mut services = Vec::new();
    let mut used_chains = BTreeSet::new();
    let record_sets: Vec<RecordSet> = RecordSet::STATIC
        .into_iter()
        .chain(classes.iter().map(|c| RecordSet::Class(*c)))
        .collect();
    for rs in record_sets {
        for (key, data, comment) in d.elems(&rs.name()) {
            let fk = parse_key(rs, key);
            let meta = comment.as_deref().and_then(parse_comment);
            let (Some(fk), Some(meta)) = (fk, meta) else {
                repairs.push(Op::DelElem {
                    set: rs.name(),
                    key: key.clone(),
                });
                continue;
            };
            if mirror.frontends.contains_key(&fk) {
                repairs.push(Op::DelElem {
                    set: rs.name(),
                    key: key.clone(),
                });
                continue;
            }
            let state = if meta.terminating {
                BackendState::ServingTerminating
            } else {
                BackendState::Ready
            };
            let v6 = fk.ip.is_ipv6();
            let chain = match data {
                ElemData::Goto(c) => Some(c.clone()),
                _ => None,
            };
            let chain_exists = chain.as_ref().filter(|c| d.chains.contains(*c)).cloned();
            let actual_rules = chain_exists
                .as_ref()
                .and_then(|c| d.rules.get(c))
                .map_or(&[][..], Vec::as_slice);
            let my_slots = slots
                .remove(&(backend_map(v6, rs.node_port()), key.clone()))
                .unwrap_or_default();
            let addrs: Vec<(IpAddr, u16)> = match rs {
                RecordSet::Class(_) => my_slots.values().copied().collect(),
                RecordSet::Aff(_) | RecordSet::AffNp(_) => actual_rules
                    .iter()
                    .filter_map(|r| r.comment.as_deref())
                    .filter_map(parse_backend_comment)
                    .collect(),
                RecordSet::NoEp(_) | RecordSet::NoEpNp(_) => Vec::new(),
            };
            let backends = addrs
                .into_iter()
                .map(|(ip, port)| Backend {
                    ip,
                    port,
                    node_local: local.contains(&ip),
                    state,
                })
                .collect();
            let mut svc = LbService {
                id: meta.id,
                name: meta.name,
                frontend: Frontend {
                    ip: fk.ip,
                    port: fk.port,
                    proto: fk.proto,
                    kind: meta.kind,
                },
                backends,
                affinity_timeout_secs: meta.affinity_timeout_secs,
                external_local: meta.external_local,
                internal_local: meta.internal_local,
            };
            let actual = Record {
                set: rs,
                key: key.clone(),
                data: data.clone(),
                comment: comment.clone().unwrap_or_default(),
            };
            let aff_sets: BTreeSet<String> = d
                .sets
                .keys()
                .filter(|n| affinity_set_id(n) == Some(svc.id))
                .cloned()
                .collect();
            let wanted = record(&svc);
            let wanted_sets: BTreeSet<String> = render::affinity_sets(&svc)
                .into_iter()
                .map(|s| s.name)
                .collect();
            let slots_ok = match rs {
                RecordSet::Class(_) => {
                    let n = u32::try_from(my_slots.len()).unwrap_or(u32::MAX);
                    my_slots.keys().copied().eq(0..n)
                }
                _ => my_slots.is_empty(),
            };
            let rules_ok = match rs {
                RecordSet::Aff(_) | RecordSet::AffNp(_) => {
                    chain_exists.is_some() && affinity_rules(&svc).as_slice() == actual_rules
                }
                _ => true,
            };
            if !(wanted == actual && slots_ok && rules_ok && wanted_sets == aff_sets) {
                svc.name.push_str(" (drifted)");
            }
            if let Some(c) = &chain_exists {
                used_chains.insert(c.clone());
            }
            mirror.frontends.insert(
                fk,
                Programmed {
                    svc: svc.clone(),
                    record: actual,
                    chain: chain_exists,
                    aff_sets,
                    slots: my_slots,
                },
            );
            services.push(svc);
        }
    }
    // Slots of no frontend.
    for ((map, fk), stray) in slots {
        for slot in stray.keys() {
            let mut key = fk.clone();
            key.extend(slot.to_ne_bytes());
            repairs.push(Op::DelElem {
                set: map.into(),
                key,
            });
        }
    }
    // Stray affinity chains, then stray affinity sets (a chain's rules may reference them).
    for c in &d.chains {
        if chain_id(c).is_some() && !used_chains.contains(c) {
            repairs.push(Op::FlushChain(c.clone()));
            repairs.push(Op::DelChain(c.clone()));
        }
    }
    let owned_sets: BTreeSet<&String> = mirror
        .frontends
        .values()
        .flat_map(|p| p.aff_sets.iter())
        .collect();
    for s in d.sets.keys() {
        if affinity_set_id(s).is_some() && !owned_sets.contains(s) {
            repairs.push(Op::DelSet(s.clone()));
        }
    }
    let (hairpin, local_counts) = counts(mirror.frontends.values().map(|p| &p.svc));
    for (want, set, key, parse) in [
        (
            &hairpin,
            hairpin_set as fn(bool) -> &'static str,
            hairpin_key as fn(IpAddr) -> Vec<u8>,
            parse_hairpin_key as fn(&[u8]) -> Option<IpAddr>,
        ),
        (&local_counts, local_set, local_key, parse_local_key),
    ] {
        let have: BTreeSet<IpAddr> = [false, true]
            .into_iter()
            .flat_map(|v6| d.elems(set(v6)).iter())
            .filter_map(|(k, _, _)| parse(k))
            .collect();
        for ip in want.keys().filter(|ip| !have.contains(*ip)) {
            repairs.push(Op::AddElem {
                set: set(ip.is_ipv6()).into(),
                key: key(*ip),
                data: ElemData::None,
                comment: None,
            });
        }
        for ip in have.iter().filter(|ip| !want.contains_key(*ip)) {
            repairs.push(Op::DelElem {
                set: set(ip.is_ipv6()).into(),
                key: key(*ip),
            });
        }
    }
    mirror.hairpin = hairpin;
    mirror.local = local_counts;
    services.sort_by_key(|s| s.frontend.key());
    (services, mirror, repairs)
}

impl LbDataplane for NftLb {
    fn mode(&self) -> &'static str {
        "nftables"
    }

    fn apply(&mut self, plan: &LbPlan) -> Result<(), LbError> {
        let tx = self.mirror.transaction(plan);
        if !tx.ops.is_empty() {
            let batch = encode_ops(TABLE, &tx.ops);
            if let Err(e) = self.sock.commit(&batch) {
                self.genid = None;
                return Err(nl("transaction", format!("table inet {TABLE}"))(e).into());
            }
            // Our commit advanced the generation by one; anything more is someone else's.
            let now = self.generation();
            self.genid = match (self.genid, now) {
                (Some(g), Some(n)) if n == g.wrapping_add(1) => Some(n),
                _ => None,
            };
        }
        self.mirror.commit(tx);
        if !plan.stale_backends.is_empty() {
            match conntrack::purge_udp(&mut self.sock, &plan.stale_backends) {
                Ok(n) if n > 0 => debug!(
                    deleted = n,
                    "deleted UDP conntrack entries of removed backends"
                ),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "delete UDP conntrack entries of removed backends"),
            }
        }
        Ok(())
    }

    fn observed(&mut self) -> Result<Vec<LbService>, LbError> {
        self.read_back().map_err(LbError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::lb::{FrontendKind, Proto, plan};
    use render::slot_key;

    fn svc(id: u32, ip: &str, backends: &[&str], affinity: bool) -> LbService {
        LbService {
            id,
            name: format!("default/s{id}"),
            frontend: Frontend {
                ip: ip.parse().unwrap(),
                port: 80,
                proto: Proto::Tcp,
                kind: FrontendKind::ClusterIp,
            },
            backends: backends
                .iter()
                .enumerate()
                .map(|(k, b)| Backend {
                    ip: b.parse().unwrap(),
                    port: 8080,
                    node_local: k == 0,
                    state: BackendState::Ready,
                })
                .collect(),
            affinity_timeout_secs: affinity.then_some(100),
            external_local: false,
            internal_local: false,
        }
    }

    /// Builds the dump a kernel holding exactly `ops` would return.
    fn dump_of(ops: &[Op]) -> Dump {
        let mut d = Dump::default();
        for s in static_sets() {
            d.sets.insert(
                s.name.clone(),
                DumpedSet {
                    flags: s.flags,
                    key_len: s.key_len,
                },
            );
        }
        for op in ops {
            match op {
                Op::AddSet(s) => {
                    d.sets.insert(
                        s.name.clone(),
                        DumpedSet {
                            flags: s.flags,
                            key_len: s.key_len,
                        },
                    );
                }
                Op::DelSet(s) => {
                    d.sets.remove(s);
                }
                Op::AddChain(c) => {
                    d.chains.insert(c.name.clone());
                }
                Op::FlushChain(c) => {
                    d.rules.remove(c);
                }
                Op::DelChain(c) => {
                    d.chains.remove(c);
                }
                Op::AddRule { chain, rule } => {
                    d.rules.entry(chain.clone()).or_default().push(rule.clone());
                }
                Op::AddElem {
                    set,
                    key,
                    data,
                    comment,
                } => d.elems.entry(set.clone()).or_default().push((
                    key.clone(),
                    data.clone(),
                    comment.clone(),
                )),
                Op::DelElem { set, key } => {
                    d.elems
                        .entry(set.clone())
                        .or_default()
                        .retain(|(k, _, _)| k != key);
                }
            }
        }
        d
    }

    /// What a restarted agent does first (`ensure_skeleton` over the table its predecessor
    /// programmed) leaves every service translated: nothing for the read-back to repair, so no
    /// moment without the services' rules.
    #[test]
    fn the_skeleton_over_a_programmed_table_keeps_every_service() {
        let a = svc(1, "10.96.0.1", &["10.0.1.2", "10.0.2.2"], false);
        let b = svc(2, "fd00::2", &[], false);
        let c = svc(3, "10.96.0.3", &["10.0.1.2", "10.0.3.2"], true);
        let mut ops = skeleton_ops();
        let tx = Mirror::default().transaction(&plan(&[a.clone(), b.clone(), c.clone()], &[]));
        ops.extend(tx.ops);
        ops.extend(skeleton_ops());
        let (services, _, repairs) = reconstruct(&dump_of(&ops));
        assert!(
            repairs.is_empty(),
            "{:?}",
            repairs.iter().map(ToString::to_string).collect::<Vec<_>>()
        );
        assert_eq!(services, vec![a, c, b]);
    }

    #[test]
    fn a_table_read_back_yields_the_same_services_and_no_repairs() {
        let a = svc(1, "10.96.0.1", &["10.0.1.2", "10.0.2.2"], false);
        let b = svc(2, "fd00::2", &[], false);
        let c = svc(3, "10.96.0.3", &["10.0.1.2", "10.0.3.2"], true);
        let mut ops = skeleton_ops();
        let tx = Mirror::default().transaction(&plan(&[a.clone(), b.clone(), c.clone()], &[]));
        ops.extend(tx.ops.clone());
        let (services, mirror, repairs) = reconstruct(&dump_of(&ops));
        assert!(repairs.is_empty(), "{repairs:?}");
        assert_eq!(services, vec![a.clone(), c.clone(), b.clone()]);
        let mut m = Mirror::default();
        m.commit(tx);
        assert_eq!(mirror, m);
    }

    #[test]
    fn drift_is_detected_and_strays_are_removed() {
        let a = svc(1, "10.96.0.1", &["10.0.1.2", "10.0.2.2"], false);
        let c = svc(3, "10.96.0.3", &["10.0.1.2"], true);
        let mut ops = skeleton_ops();
        ops.extend(
            Mirror::default()
                .transaction(&plan(&[a.clone(), c.clone()], &[]))
                .ops,
        );
        let mut d = dump_of(&ops);
        // Someone removed a backend slot, changed an affinity rule, left a chain, a set and a
        // slot behind, and flushed a static chain.
        d.elems
            .get_mut("be4")
            .unwrap()
            .retain(|(k, _, _)| *k != slot_key(&a.frontend.key(), 1));
        d.rules.get_mut("s3").unwrap()[0].exprs.pop();
        d.chains.insert("s99".into());
        d.sets.insert(
            "a99-0a0000010050".into(),
            DumpedSet {
                flags: 0x30,
                key_len: 4,
            },
        );
        d.elems.get_mut("be4").unwrap().push((
            slot_key(&svc(42, "10.96.0.42", &[], false).frontend.key(), 0),
            ElemData::Value(render::slot_value("10.9.9.9".parse().unwrap(), 1)),
            None,
        ));
        d.rules.remove("nat_output");
        d.elems.get_mut("hairpin4").unwrap().push((
            hairpin_key("10.9.9.9".parse().unwrap()),
            ElemData::None,
            None,
        ));
        let (services, _, repairs) = reconstruct(&d);
        let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, vec!["default/s1 (drifted)", "default/s3 (drifted)"]);
        let text: Vec<String> = repairs.iter().map(ToString::to_string).collect();
        for want in [
            "add chain nat_output",
            "flush chain nat_output",
            "flush chain s99",
            "delete chain s99",
            "delete set a99-0a0000010050",
            "delete element hairpin4 0a0909090a090909",
        ] {
            assert!(
                text.contains(&want.to_string()),
                "{want} missing in {text:?}"
            );
        }
        assert!(
            text.iter()
                .any(|t| t.starts_with("delete element be4 0a60002a"))
        );
        // Drifted services differ from the desired ones, so the plan rewrites them, and the
        // rewrite restores the missing slot.
        let p = plan(&[a.clone(), c.clone()], &services);
        assert_eq!(p.upserts.len(), 2);
        let (_, mirror, _) = reconstruct(&d);
        let tx = mirror.transaction(&p);
        assert!(
            tx.ops
                .iter()
                .any(|o| matches!(o, Op::AddElem { set, key, .. } if set == "be4" && *key == slot_key(&a.frontend.key(), 1)))
        );
    }

    #[test]
    fn udata_comments_round_trip() {
        let u = comment_udata("b 10.0.0.1 80");
        assert_eq!(parse_udata_comment(&u).as_deref(), Some("b 10.0.0.1 80"));
        assert_eq!(parse_udata_comment(&[1, 1, 0]), None);
    }

    #[test]
    fn encoded_batches_describe_their_messages() {
        let a = svc(1, "10.96.0.1", &["10.0.1.2"], false);
        let tx = Mirror::default().transaction(&plan(std::slice::from_ref(&a), &[]));
        let b = encode_ops(TABLE, &tx.ops);
        assert_eq!(b.len(), tx.ops.len());
        assert_eq!(b.descriptions()[0], "add set c4-1");
    }
}
