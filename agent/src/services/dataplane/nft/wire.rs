//! The nf_tables wire format twill writes and reads (pure): message and attribute numbers,
//! comments as rule and element userdata, and the encoding of [`Op`]s into one netlink batch.
//! Kept apart from the dataplane so the bytes a transaction sends are unit-tested without a
//! socket; the expressions' own encoding is in [`super::expr`].

use super::diff::{NewElem, Op};
use super::expr::{self, VERDICT_GOTO, data_verdict};
use super::frontend::{ElemData, clip};
use super::render::{ChainDef, DATA_VERDICT_TYPE, SetData, SetDef, TABLE};
use crate::shared::nfnl::{Batch, F_APPEND, F_CREATE, MsgBuf};

pub(crate) const NF_ACCEPT: u32 = 1;
pub(crate) const ENOENT: i32 = 2;
pub(crate) const MSG_NEWTABLE: u16 = 0;
pub(crate) const MSG_GETTABLE: u16 = 1;
pub(crate) const MSG_DELTABLE: u16 = 2;
pub(crate) const MSG_NEWCHAIN: u16 = 3;
pub(crate) const MSG_GETCHAIN: u16 = 4;
pub(crate) const MSG_DELCHAIN: u16 = 5;
pub(crate) const MSG_NEWRULE: u16 = 6;
pub(crate) const MSG_GETRULE: u16 = 7;
pub(crate) const MSG_DELRULE: u16 = 8;
pub(crate) const MSG_NEWSET: u16 = 9;
pub(crate) const MSG_GETSET: u16 = 10;
pub(crate) const MSG_DELSET: u16 = 11;
pub(crate) const MSG_NEWSETELEM: u16 = 12;
pub(crate) const MSG_GETSETELEM: u16 = 13;
pub(crate) const MSG_DELSETELEM: u16 = 14;
pub(crate) const MSG_GETGEN: u16 = 16;
pub(crate) const GEN_ID: u16 = 1;
pub(crate) const TABLE_NAME: u16 = 1;
pub(crate) const CHAIN_TABLE: u16 = 1;
pub(crate) const CHAIN_NAME: u16 = 3;
pub(crate) const CHAIN_HOOK: u16 = 4;
pub(crate) const CHAIN_POLICY: u16 = 5;
pub(crate) const CHAIN_TYPE: u16 = 7;
pub(crate) const HOOK_HOOKNUM: u16 = 1;
pub(crate) const HOOK_PRIORITY: u16 = 2;
pub(crate) const RULE_TABLE: u16 = 1;
pub(crate) const RULE_CHAIN: u16 = 2;
pub(crate) const RULE_EXPRESSIONS: u16 = 4;
pub(crate) const RULE_USERDATA: u16 = 7;
pub(crate) const SET_TABLE: u16 = 1;
pub(crate) const SET_NAME: u16 = 2;
pub(crate) const SET_FLAGS: u16 = 3;
pub(crate) const SET_KEY_TYPE: u16 = 4;
pub(crate) const SET_KEY_LEN: u16 = 5;
pub(crate) const SET_DATA_TYPE: u16 = 6;
pub(crate) const SET_DATA_LEN: u16 = 7;
pub(crate) const SET_DESC: u16 = 9;
pub(crate) const SET_ID: u16 = 10;
pub(crate) const SET_TIMEOUT: u16 = 11;
pub(crate) const SET_DESC_SIZE: u16 = 1;
pub(crate) const ELEM_LIST_TABLE: u16 = 1;
pub(crate) const ELEM_LIST_SET: u16 = 2;
pub(crate) const ELEM_LIST_ELEMENTS: u16 = 3;
pub(crate) const LIST_ELEM: u16 = 1;
pub(crate) const ELEM_KEY: u16 = 1;
pub(crate) const ELEM_DATA: u16 = 2;
pub(crate) const ELEM_USERDATA: u16 = 6;
pub(crate) const DATA_VALUE: u16 = 1;

/// `NFTNL_UDATA_*_COMMENT`: the comment TLV type for rules, chains and elements alike.
pub(crate) const UDATA_COMMENT: u8 = 0;

pub(crate) fn comment_udata(c: &str) -> Vec<u8> {
    let c = clip(c);
    let mut v = vec![UDATA_COMMENT, u8::try_from(c.len() + 1).expect("clipped")];
    v.extend_from_slice(c.as_bytes());
    v.push(0);
    v
}

pub(crate) fn parse_udata_comment(data: &[u8]) -> Option<String> {
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

/// Adds one message of type `msg` (`NFT_MSG_*`) to `b`, for the `inet` family every object of
/// the table lives in; `build` writes its attributes, `what` describes it for errors.
pub(crate) fn push(
    b: &mut Batch,
    msg: u16,
    flags: u16,
    what: impl Into<String>,
    build: impl FnOnce(&mut MsgBuf),
) {
    b.push(msg, flags, NFPROTO_INET, what, build);
}

/// The message that deletes (`MSG_DELTABLE`, flags 0) or creates (`MSG_NEWTABLE`,
/// `F_CREATE`) the table `inet twill`; `verb` (`delete`, `add`) describes it.
pub(crate) fn push_table(b: &mut Batch, msg: u16, flags: u16, verb: &str) {
    push(b, msg, flags, format!("{verb} table inet {TABLE}"), |m| {
        m.str(TABLE_NAME, TABLE);
    });
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
                push(&mut b, MSG_DELSET, 0, format!("delete set {name}"), |m| {
                    m.str(SET_TABLE, table);
                    m.str(SET_NAME, name);
                });
            }
            Op::AddChain(c) => encode_chain(&mut b, table, c),
            Op::FlushChain(c) => {
                push(&mut b, MSG_DELRULE, 0, format!("flush chain {c}"), |m| {
                    m.str(RULE_TABLE, table);
                    m.str(RULE_CHAIN, c);
                });
            }
            Op::DelChain(c) => {
                push(&mut b, MSG_DELCHAIN, 0, format!("delete chain {c}"), |m| {
                    m.str(CHAIN_TABLE, table);
                    m.str(CHAIN_NAME, c);
                });
            }
            Op::AddRule { chain, rule } => push(
                &mut b,
                MSG_NEWRULE,
                F_CREATE | F_APPEND,
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
            Op::AddElem(NewElem {
                set,
                key,
                data,
                comment,
            }) => push(
                &mut b,
                MSG_NEWSETELEM,
                F_CREATE,
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
            Op::DelElem { set, key } => push(
                &mut b,
                MSG_DELSETELEM,
                0,
                format!("delete element from {set}"),
                |m| elem_list(m, table, set, key, |_| {}),
            ),
        }
    }
    b
}

pub(crate) fn elem_list(
    m: &mut MsgBuf,
    table: &str,
    set: &str,
    key: &[u8],
    extra: impl FnOnce(&mut MsgBuf),
) {
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

pub(crate) fn encode_set(b: &mut Batch, table: &str, s: &SetDef, id: u32) {
    push(
        b,
        MSG_NEWSET,
        F_CREATE,
        format!("add set {}", s.name),
        |m| {
            m.str(SET_TABLE, table);
            m.str(SET_NAME, &s.name);
            m.u32_be(SET_FLAGS, s.flags);
            m.u32_be(SET_KEY_TYPE, s.key_type);
            m.u32_be(SET_KEY_LEN, s.key_len);
            match s.data {
                SetData::None => {}
                SetData::Verdict => m.u32_be(SET_DATA_TYPE, DATA_VERDICT_TYPE),
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

pub(crate) fn encode_chain(b: &mut Batch, table: &str, c: &ChainDef) {
    push(
        b,
        MSG_NEWCHAIN,
        F_CREATE,
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

pub(crate) const NFPROTO_INET: u8 = 1;
