//! The nfnetlink transport of the nftables dataplane, behind [`Transport`]: committing one
//! transaction, dumping the table, and the ruleset generation that tells whether anything
//! changed since. [`NetlinkTransport`] is the kernel's (an [`NfSocket`]); [`FakeNft`] keeps
//! the table in memory as the kernel would and records every transaction, so the dataplane's
//! read-back, repairs and golden transactions are tested without root; it can make the Nth
//! transaction go wrong ([`Fault`]: refused, applied with the acknowledgement lost, or
//! preceded by another owner's change), to test what a failed sync leaves and how the next
//! one heals.
//!
//! A transaction is the dataplane's own [`Op`]s plus the two table-level steps (delete and
//! create `inet twill`); the encoding into one batch is [`super::wire`]'s, so both
//! implementations see exactly the same transaction.

use std::sync::{Arc, Mutex, MutexGuard};

use super::diff::Op;
use super::expr::{self, VERDICT_GOTO, decode, decode_verdict};
use super::frontend::ElemData;
use super::render::{Class, Rule, TABLE, static_sets};
use super::wire::{
    CHAIN_NAME, CHAIN_TABLE, DATA_VALUE, ELEM_DATA, ELEM_KEY, ELEM_LIST_ELEMENTS, ELEM_LIST_SET,
    ELEM_LIST_TABLE, ELEM_USERDATA, ENOENT, GEN_ID, LIST_ELEM, MSG_DELTABLE, MSG_GETCHAIN,
    MSG_GETGEN, MSG_GETRULE, MSG_GETSET, MSG_GETSETELEM, MSG_NEWTABLE, NFPROTO_INET, RULE_CHAIN,
    RULE_EXPRESSIONS, RULE_TABLE, RULE_USERDATA, SET_FLAGS, SET_KEY_LEN, SET_NAME, SET_TABLE,
    encode_ops, parse_udata_comment, push_table,
};
use super::{Dump, DumpedSet, Elem, NftError, nl};
use crate::services::dataplane::conntrack;
use crate::services::lb::StaleBackend;
use crate::shared::nfnl::{Attr, Batch, F_CREATE, Msg, NfSocket, NfnlError, SUBSYS_NFTABLES};

/// One nf_tables transaction on `inet twill`: applied in this order, all or nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Commit {
    /// Delete the table (and everything in it) first.
    pub delete_table: bool,
    /// Create the table if it is missing.
    pub create_table: bool,
    /// Then these operations.
    pub ops: Vec<Op>,
}

impl Commit {
    /// Only operations.
    pub fn ops(ops: Vec<Op>) -> Self {
        Commit {
            ops,
            ..Commit::default()
        }
    }

    /// Nothing to send.
    pub fn is_empty(&self) -> bool {
        !self.delete_table && !self.create_table && self.ops.is_empty()
    }

    /// One line per step (rules with one expression a line), as the golden files show it.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        if self.delete_table {
            let _ = writeln!(out, "delete table inet {TABLE}");
        }
        if self.create_table {
            let _ = writeln!(out, "add table inet {TABLE}");
        }
        for op in &self.ops {
            match op {
                Op::AddRule { chain, rule } => {
                    let _ = write!(out, "add rule {chain}");
                    if let Some(c) = &rule.comment {
                        let _ = write!(out, " \"{c}\"");
                    }
                    out.push('\n');
                    for e in &rule.exprs {
                        let _ = writeln!(out, "    {e:?}");
                    }
                }
                _ => {
                    let _ = writeln!(out, "{op}");
                }
            }
        }
        out
    }

    fn encode(&self) -> Batch {
        let mut b = Batch::new();
        if self.delete_table {
            push_table(&mut b, MSG_DELTABLE, 0, "delete");
        }
        if self.create_table {
            push_table(&mut b, MSG_NEWTABLE, F_CREATE, "add");
        }
        b.append(&encode_ops(TABLE, &self.ops));
        b
    }
}

/// What the dataplane needs from nf_tables.
pub trait Transport: Send {
    /// Sends one transaction.
    fn commit(&mut self, tx: &Commit) -> Result<(), NfnlError>;
    /// Everything in `inet twill`; `None` without the table.
    fn dump(&mut self) -> Result<Option<Dump>, NftError>;
    /// The ruleset generation: it changes with every committed transaction of any owner.
    fn generation(&mut self) -> Option<u32>;
    /// Deletes the UDP conntrack entries of removed backends; how many.
    fn purge_udp(&mut self, stale: &[StaleBackend]) -> Result<usize, NfnlError>;
}

/// The kernel's nf_tables, in the calling thread's network namespace.
pub struct NetlinkTransport {
    sock: NfSocket,
}

impl NetlinkTransport {
    /// Opens the netlink socket.
    pub fn open() -> Result<Self, NftError> {
        Ok(NetlinkTransport {
            sock: NfSocket::open().map_err(nl("open", "netlink socket"))?,
        })
    }

    /// Dumps the objects of type `msg` (`NFT_MSG_GET*`) of `inet twill`: the request names the
    /// table in attribute `table_attr`, and only the answers whose `table_attr` names it are
    /// kept.
    fn dump_in_table(&mut self, msg: u16, table_attr: u16) -> Result<Vec<Msg>, NfnlError> {
        let msgs = self
            .sock
            .dump((SUBSYS_NFTABLES << 8) | msg, NFPROTO_INET, |m| {
                m.str(table_attr, TABLE);
            })?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.attrs().get(table_attr).map(|t| t.str()).as_deref() == Some(TABLE))
            .collect())
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
}

impl Transport for NetlinkTransport {
    fn commit(&mut self, tx: &Commit) -> Result<(), NfnlError> {
        self.sock.commit(&tx.encode())
    }

    fn dump(&mut self) -> Result<Option<Dump>, NftError> {
        let mut d = Dump::default();
        let sets = match self.dump_in_table(MSG_GETSET, SET_TABLE) {
            Ok(s) => s,
            Err(e) if e.errno() == Some(ENOENT) => return Ok(None),
            Err(e) => return Err(nl("dump", "sets")(e)),
        };
        for m in &sets {
            let a = m.attrs();
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
        let chains = self
            .dump_in_table(MSG_GETCHAIN, CHAIN_TABLE)
            .map_err(nl("dump", "chains"))?;
        for m in &chains {
            if let Some(n) = m.attrs().get(CHAIN_NAME) {
                d.chains.insert(n.str());
            }
        }
        let rules = self
            .dump_in_table(MSG_GETRULE, RULE_TABLE)
            .map_err(nl("dump", "rules"))?;
        for m in &rules {
            let a = m.attrs();
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

    fn generation(&mut self) -> Option<u32> {
        let msgs = self
            .sock
            .get((SUBSYS_NFTABLES << 8) | MSG_GETGEN, 0, |_| {})
            .ok()?;
        msgs.iter()
            .find_map(|m| m.attrs().get(GEN_ID).and_then(|a| a.u32_be().ok()))
    }

    fn purge_udp(&mut self, stale: &[StaleBackend]) -> Result<usize, NfnlError> {
        conntrack::purge_udp(&mut self.sock, stale)
    }
}

impl Dump {
    /// The table after `op`, as the kernel would hold it.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::AddSet(s) => {
                self.sets.insert(
                    s.name.clone(),
                    DumpedSet {
                        flags: s.flags,
                        key_len: s.key_len,
                    },
                );
            }
            Op::DelSet(s) => {
                self.sets.remove(s);
                self.elems.remove(s);
            }
            Op::AddChain(c) => {
                self.chains.insert(c.name.clone());
            }
            Op::FlushChain(c) => {
                self.rules.remove(c);
            }
            Op::DelChain(c) => {
                self.chains.remove(c);
            }
            Op::AddRule { chain, rule } => {
                self.rules
                    .entry(chain.clone())
                    .or_default()
                    .push(rule.clone());
            }
            Op::AddElem(e) => {
                let elems = self.elems.entry(e.set.clone()).or_default();
                if !elems.iter().any(|(k, _, _)| *k == e.key) {
                    elems.push((e.key.clone(), e.data.clone(), e.comment.clone()));
                }
            }
            Op::DelElem { set, key } => {
                if let Some(elems) = self.elems.get_mut(set) {
                    elems.retain(|(k, _, _)| k != key);
                }
            }
        }
    }
}

/// What goes wrong with the transaction [`FakeNft::fail_commit`] picks. The kernel applies a
/// transaction all or nothing, and so does the fake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The kernel refuses it (`EIO`): nothing of it is applied.
    Refused,
    /// It is applied, but its acknowledgement is lost (`ENOBUFS` on the socket): the caller
    /// sees an error.
    LostAck,
    /// Another owner's transaction (this one) is committed just before it: the table changed
    /// underneath, and the generation moved once more than the caller's own commit explains.
    Underneath(Commit),
}

/// What [`FakeNft`] holds and was given.
#[derive(Debug, Default)]
pub struct FakeState {
    /// The table; `None` without it.
    pub table: Option<Dump>,
    /// The ruleset generation.
    pub genid: u32,
    /// Every transaction committed, in order (drained by the tests); another owner's
    /// ([`Fault::Underneath`]) is not listed.
    pub commits: Vec<Commit>,
    /// How many table dumps were made.
    pub dumps: usize,
    /// The stale backends handed to the conntrack purge.
    pub purged: usize,
    /// Transactions attempted so far (failed ones included).
    attempts: usize,
    /// The 1-based attempt that goes wrong, and how.
    fault: Option<(usize, Fault)>,
}

impl FakeState {
    /// Applies `tx` as the kernel would (all of it) and moves the generation.
    fn apply(&mut self, tx: &Commit) {
        let mut table = if tx.delete_table {
            None
        } else {
            self.table.take()
        };
        if tx.create_table && table.is_none() {
            table = Some(Dump::default());
        }
        if let Some(t) = table.as_mut() {
            for op in &tx.ops {
                t.apply(op);
            }
        }
        self.table = table;
        self.genid = self.genid.wrapping_add(1);
    }
}

/// An in-memory nf_tables that records transactions; clones share it.
#[derive(Debug, Clone, Default)]
pub struct FakeNft(Arc<Mutex<FakeState>>);

impl FakeNft {
    /// An empty ruleset.
    pub fn new() -> Self {
        FakeNft::default()
    }

    /// The shared state.
    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.0.lock().expect("fake nft lock")
    }

    /// Makes the `n`th transaction from now (1-based) go wrong as `fault` says; the ones after
    /// it succeed.
    pub fn fail_commit(&self, n: usize, fault: Fault) {
        let mut s = self.state();
        s.fault = Some((s.attempts + n, fault));
    }
}

impl Transport for FakeNft {
    fn commit(&mut self, tx: &Commit) -> Result<(), NfnlError> {
        if tx.is_empty() {
            return Ok(());
        }
        let mut s = self.state();
        s.attempts += 1;
        let fault = match s.fault.take() {
            Some((at, fault)) if at == s.attempts => Some(fault),
            other => {
                s.fault = other;
                None
            }
        };
        match &fault {
            Some(Fault::Refused) => {
                return Err(NfnlError::Kernel {
                    what: format!("transaction on table inet {TABLE}"),
                    message: String::new(),
                    errno: libc::EIO,
                });
            }
            Some(Fault::Underneath(other)) => s.apply(other),
            Some(Fault::LostAck) | None => {}
        }
        s.apply(tx);
        s.commits.push(tx.clone());
        if fault == Some(Fault::LostAck) {
            return Err(NfnlError::Io {
                op: "receive acknowledgement",
                source: std::io::Error::from_raw_os_error(libc::ENOBUFS),
            });
        }
        Ok(())
    }

    fn dump(&mut self) -> Result<Option<Dump>, NftError> {
        let mut s = self.state();
        s.dumps += 1;
        Ok(s.table.clone())
    }

    fn generation(&mut self) -> Option<u32> {
        Some(self.state().genid)
    }

    fn purge_udp(&mut self, stale: &[StaleBackend]) -> Result<usize, NfnlError> {
        self.state().purged += stale.len();
        Ok(0)
    }
}
