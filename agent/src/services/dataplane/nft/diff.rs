//! The diff (pure): the transaction that takes the table from what the mirror says it holds
//! ([`Mirror`]) to what a plan asks for, as [`Op`]s, and the mirror it leads to. A changed
//! endpoint set is a handful of element updates; a frontend class seen for the first time adds
//! its set and one `pick` rule; nothing else is touched.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use super::frontend::{
    ElemData, Record, affinity_rules, affinity_sets, hairpin_key, hex, local_key, record, slot_key,
    slot_value,
};
use super::render::{
    ChainDef, Class, PICK, RecordSet, Rule, SetDef, backend_map, hairpin_set, local_set,
};
use crate::services::lb::{FrontendKey, LbPlan, LbService};

/// An element to add to a set or map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewElem {
    /// Set.
    pub set: String,
    /// Key.
    pub key: Vec<u8>,
    /// What it maps to.
    pub data: ElemData,
    /// Comment.
    pub comment: Option<String>,
}

impl NewElem {
    /// A bare member of the set `set`: no data, no comment.
    pub fn member(set: impl Into<String>, key: Vec<u8>) -> Self {
        NewElem {
            set: set.into(),
            key,
            data: ElemData::None,
            comment: None,
        }
    }
}

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
    AddElem(NewElem),
    /// Delete an element.
    DelElem {
        /// Set.
        set: String,
        /// Key.
        key: Vec<u8>,
    },
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
            Op::AddElem(NewElem {
                set,
                key,
                data,
                comment,
            }) => {
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

pub(crate) fn slots_of(svc: &LbService) -> BTreeMap<u32, (IpAddr, u16)> {
    if svc.affinity_timeout_secs.is_some() {
        return BTreeMap::new();
    }
    svc.backends
        .iter()
        .enumerate()
        .map(|(k, b)| (u32::try_from(k).expect("small"), (b.ip, b.port)))
        .collect()
}

pub(crate) fn programmed(svc: &LbService) -> Programmed {
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

pub(crate) fn add_record(ops: &mut Vec<Op>, rec: &Record) {
    ops.push(Op::AddElem(NewElem {
        set: rec.set.name(),
        key: rec.key.clone(),
        data: rec.data.clone(),
        comment: Some(rec.comment.clone()),
    }));
}

pub(crate) fn del_record(ops: &mut Vec<Op>, rec: &Record) {
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
pub(crate) fn counted(
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
            ops.push(Op::AddElem(NewElem::member(set(ip.is_ipv6()), key(ip))));
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
                ops.push(Op::AddElem(NewElem {
                    set: backend_map(v6, np).into(),
                    key: slot_key(&fk, k),
                    data: ElemData::Value(slot_value(*ip, *port)),
                    comment: None,
                }));
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
