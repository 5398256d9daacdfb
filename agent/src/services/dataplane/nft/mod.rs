//! The nftables service dataplane ([`NftLb`]): one table, `inet twill`, programmed through
//! nf_tables netlink transactions.
//!
//! Why it is shaped as it is:
//! - The layout and the reasons for it are in [`render`], one frontend's elements and chain
//!   in [`frontend`], the transaction a plan turns into (the diff) in [`diff`], the expressions
//!   in [`expr`], the messages in [`wire`]; commits, dumps and the generation go through
//!   [`transport::Transport`] (the kernel's over `crate::shared::nfnl`, or a recording fake that
//!   keeps the table in memory). This module only moves data between them. Golden files
//!   (`services/dataplane/golden/<case>/nftables.txt`) pin the exact transaction of each step.
//! - **One transaction per sync, the size of the change.** [`LbDataplane::apply`] turns the plan
//!   into operations against a mirror of the table ([`diff::Mirror`]): a changed endpoint set
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

pub mod diff;
pub mod expr;
pub mod frontend;
pub mod render;
pub mod transport;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use tracing::{debug, info, warn};

use self::diff::{Mirror, NewElem, Op, Programmed, counts};
use self::frontend::{
    ElemData, Record, affinity_rules, affinity_set_id, affinity_sets, chain_id, hairpin_key,
    local_key, parse_backend_comment, parse_comment, parse_hairpin_key, parse_key, parse_local_key,
    parse_slot_key, parse_slot_value, record,
};
use self::render::{
    Class, PICK, RecordSet, Rule, TABLE, backend_map, hairpin_set, local_set, static_chains,
    static_sets,
};
use self::transport::{Commit, NetlinkTransport, Transport};
use self::wire::{ENOENT, MSG_DELTABLE, MSG_GETTABLE, NFPROTO_INET};
use crate::services::lb::{
    Backend, BackendState, Frontend, LbDataplane, LbError, LbPlan, LbService,
};
use crate::shared::nfnl::{Batch, NfSocket, NfnlError, SUBSYS_NFTABLES};

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpedSet {
    flags: u32,
    key_len: u32,
}

/// Backend slots of one frontend: slot -> backend.
type Slots = BTreeMap<u32, (IpAddr, u16)>;

/// An element as dumped: key, data, comment.
pub type Elem = (Vec<u8>, ElemData, Option<String>);

/// Everything in the table, as dumped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dump {
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
    nf: Box<dyn Transport>,
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
        Self::with_transport(Box::new(NetlinkTransport::open()?))
    }

    /// [`NftLb::open`] over `nf` (the kernel's, or a fake in tests).
    pub fn with_transport(nf: Box<dyn Transport>) -> Result<Self, NftError> {
        let mut lb = NftLb {
            nf,
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
        let mut nf = NetlinkTransport::open()?;
        Ok(nf.dump()?.map(|d| reconstruct(&d).0))
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
        wire::push_table(&mut b, MSG_DELTABLE, 0, "delete");
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
        self.nf.generation()
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
        self.commit(&Commit {
            create_table: true,
            ..Commit::ops(skeleton_ops())
        })
    }

    fn commit(&mut self, tx: &Commit) -> Result<(), NftError> {
        self.nf
            .commit(tx)
            .map_err(nl("transaction", format!("table inet {TABLE}")))
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
        let dump = match self.nf.dump()? {
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
                self.commit(&Commit {
                    delete_table: found.is_some(),
                    create_table: true,
                    ..Commit::ops(skeleton_ops())
                })?;
                self.mirror = Mirror::default();
                self.genid = None;
                return Ok(Vec::new());
            }
        };
        let (services, mirror, repairs) = reconstruct(&dump);
        if !repairs.is_empty() {
            info!(operations = repairs.len(), "repairing the nftables table");
            debug!(ops = ?repairs.iter().map(ToString::to_string).collect::<Vec<_>>());
            self.nf
                .commit(&Commit::ops(repairs.clone()))
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
            let wanted_sets: BTreeSet<String> =
                affinity_sets(&svc).into_iter().map(|s| s.name).collect();
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
            repairs.push(Op::AddElem(NewElem::member(set(ip.is_ipv6()), key(*ip))));
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
            if let Err(e) = self.nf.commit(&Commit::ops(tx.ops.clone())) {
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
        super::purge_stale_udp(&plan.stale_backends, |s| self.nf.purge_udp(s).map(Some));
        Ok(())
    }

    fn observed(&mut self) -> Result<Vec<LbService>, LbError> {
        self.read_back().map_err(LbError::from)
    }
}

#[cfg(test)]
mod tests;
