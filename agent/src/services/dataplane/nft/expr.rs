//! The nf_tables expressions twill's rules use, as plain data, with their netlink encoding and
//! decoding.
//!
//! Rules are rendered into `Vec<Expr>` (pure, unit-tested), encoded into `NFTA_RULE_EXPRESSIONS`
//! and, when the table is read back, decoded into the same type: comparing what is programmed
//! with what would be rendered is plain `==`. The decoder normalises what the kernel adds on a
//! dump (registers in their 16-byte form where aligned, NAT's implicit `MAP_IPS` flag, default
//! attributes), so a rule round-trips exactly; anything else becomes [`Expr::Other`], which never
//! equals a rendered expression (the rule is then rewritten).
//!
//! Registers: `1` is the 16-byte register 1 (= 32-bit register `NFT_REG32_00`), `9`, `10`, ...
//! are the following 32-bit registers, `2` is 16-byte register 2 (= `NFT_REG32_04`); see
//! [`reg32`]. Integers in registers are host-endian (meta, ct, numgen, fib) or network-endian
//! (packet payload, ports) exactly as the kernel stores them.

use crate::shared::nfnl::{Attr, Attrs, MsgBuf, NfnlError};

// NFTA_LIST / NFTA_EXPR
const LIST_ELEM: u16 = 1;
const EXPR_NAME: u16 = 1;
const EXPR_DATA: u16 = 2;
// NFTA_DATA / NFTA_VERDICT
pub(crate) const DATA_VALUE: u16 = 1;
pub(crate) const DATA_VERDICT: u16 = 2;
pub(crate) const VERDICT_CODE: u16 = 1;
pub(crate) const VERDICT_CHAIN: u16 = 2;

/// `NFT_JUMP`.
pub const VERDICT_JUMP: i32 = -3;
/// `NFT_GOTO`.
pub const VERDICT_GOTO: i32 = -4;

/// `NFT_META_MARK`.
pub const META_MARK: u32 = 3;
/// `NFT_META_NFPROTO`.
pub const META_NFPROTO: u32 = 15;
/// `NFT_META_L4PROTO`.
pub const META_L4PROTO: u32 = 16;
/// `NFT_CT_STATE`.
pub const CT_STATE: u32 = 0;
/// `NFT_CT_STATUS`.
pub const CT_STATUS: u32 = 2;
/// `NFT_PAYLOAD_NETWORK_HEADER`.
pub const BASE_NETWORK: u32 = 1;
/// `NFT_PAYLOAD_TRANSPORT_HEADER`.
pub const BASE_TRANSPORT: u32 = 2;
/// `NFT_CMP_EQ`.
pub const CMP_EQ: u32 = 0;
/// `NFT_CMP_NEQ`.
pub const CMP_NEQ: u32 = 1;
/// `NFT_NAT_DNAT`.
pub const NAT_DNAT: u32 = 1;
/// `NF_NAT_RANGE_MAP_IPS`: set by the kernel whenever an address register is given.
const NAT_F_MAP_IPS: u32 = 0x1;
/// `NF_NAT_RANGE_PROTO_SPECIFIED`.
pub const NAT_F_PROTO_SPECIFIED: u32 = 0x2;
/// `NF_NAT_RANGE_PROTO_RANDOM_FULLY`.
pub const NAT_F_RANDOM_FULLY: u32 = 0x10;
/// `NFT_NG_RANDOM`.
pub const NG_RANDOM: u32 = 1;
/// `NFT_FIB_RESULT_ADDRTYPE`.
pub const FIB_ADDRTYPE: u32 = 3;
/// `NFTA_FIB_F_DADDR`.
pub const FIB_F_DADDR: u32 = 2;
/// `NFT_DYNSET_OP_UPDATE`.
pub const DYNSET_UPDATE: u32 = 1;
/// `NFT_REJECT_ICMPX_UNREACH`.
pub const REJECT_ICMPX: u32 = 2;
/// `NFT_REJECT_ICMPX_PORT_UNREACH`.
pub const ICMPX_PORT_UNREACH: u8 = 1;

/// The register number for the 32-bit word `word` of the register file (word 0 = register 1).
pub fn reg32(word: u32) -> u32 {
    let internal = 4 + word;
    if internal.is_multiple_of(4) {
        internal / 4
    } else {
        internal - 4 + 8
    }
}

/// Data an immediate loads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Imm {
    /// Bytes.
    Value(Vec<u8>),
    /// A verdict (`NFT_JUMP`/`NFT_GOTO` with a chain, or a plain code).
    Verdict {
        /// `NF_ACCEPT`, `NFT_JUMP`, ...
        code: i32,
        /// The target chain of a jump or goto.
        chain: Option<String>,
    },
}

/// One expression.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Expr {
    /// `meta load KEY => dreg`.
    Meta {
        /// `NFT_META_*`.
        key: u32,
        /// Destination register.
        dreg: u32,
    },
    /// `meta set KEY with sreg`.
    MetaSet {
        /// `NFT_META_*`.
        key: u32,
        /// Source register.
        sreg: u32,
    },
    /// `ct load KEY => dreg` (original direction keys only).
    Ct {
        /// `NFT_CT_*`.
        key: u32,
        /// Destination register.
        dreg: u32,
    },
    /// `payload load len @ base + offset => dreg`.
    Payload {
        /// `NFT_PAYLOAD_*_HEADER`.
        base: u32,
        /// Offset.
        offset: u32,
        /// Length.
        len: u32,
        /// Destination register.
        dreg: u32,
    },
    /// `cmp op sreg data`.
    Cmp {
        /// Source register.
        sreg: u32,
        /// `NFT_CMP_*`.
        op: u32,
        /// Compared bytes.
        data: Vec<u8>,
    },
    /// `dreg = (sreg & mask) ^ xor`.
    Bitwise {
        /// Source register.
        sreg: u32,
        /// Destination register.
        dreg: u32,
        /// Mask.
        mask: Vec<u8>,
        /// Xor.
        xor: Vec<u8>,
    },
    /// `lookup sreg set NAME [dreg]`.
    Lookup {
        /// Set name.
        set: String,
        /// Key register.
        sreg: u32,
        /// Data register of a map (0: verdict).
        dreg: Option<u32>,
    },
    /// `immediate dreg data`.
    Immediate {
        /// Destination register (0: verdict).
        dreg: u32,
        /// Data.
        data: Imm,
    },
    /// `numgen dreg = TYPE mod modulus (+ offset)`.
    Numgen {
        /// Destination register.
        dreg: u32,
        /// Modulus.
        modulus: u32,
        /// `NFT_NG_*`.
        ty: u32,
        /// Offset.
        offset: u32,
    },
    /// `nat TYPE FAMILY addr reg_addr proto reg_proto flags`.
    Nat {
        /// `NFT_NAT_*`.
        ty: u32,
        /// `NFPROTO_IPV4` / `NFPROTO_IPV6`.
        family: u32,
        /// Address register.
        reg_addr: Option<u32>,
        /// Port register.
        reg_proto: Option<u32>,
        /// `NF_NAT_RANGE_*` flags beyond `MAP_IPS`.
        flags: u32,
    },
    /// `masq flags`.
    Masq {
        /// `NF_NAT_RANGE_*` flags.
        flags: u32,
    },
    /// `fib FLAGS RESULT => dreg`.
    Fib {
        /// Destination register.
        dreg: u32,
        /// `NFT_FIB_RESULT_*`.
        result: u32,
        /// `NFTA_FIB_F_*`.
        flags: u32,
    },
    /// `dynset OP reg_key set NAME` (no data, no per-element timeout: the set's default).
    Dynset {
        /// Set name.
        set: String,
        /// `NFT_DYNSET_OP_*`.
        op: u32,
        /// Key register.
        sreg_key: u32,
    },
    /// `reject TYPE code`.
    Reject {
        /// `NFT_REJECT_*`.
        ty: u32,
        /// ICMP(x) code.
        code: u8,
    },
    /// An expression twill does not write (never equal to a rendered one).
    Other(String),
}

impl Expr {
    fn name(&self) -> &str {
        match self {
            Expr::Meta { .. } | Expr::MetaSet { .. } => "meta",
            Expr::Ct { .. } => "ct",
            Expr::Payload { .. } => "payload",
            Expr::Cmp { .. } => "cmp",
            Expr::Bitwise { .. } => "bitwise",
            Expr::Lookup { .. } => "lookup",
            Expr::Immediate { .. } => "immediate",
            Expr::Numgen { .. } => "numgen",
            Expr::Nat { .. } => "nat",
            Expr::Masq { .. } => "masq",
            Expr::Fib { .. } => "fib",
            Expr::Dynset { .. } => "dynset",
            Expr::Reject { .. } => "reject",
            Expr::Other(n) => n,
        }
    }
}

/// Writes nested `NFTA_DATA_VALUE`.
fn data_value(m: &mut MsgBuf, ty: u16, bytes: &[u8]) {
    m.nest(ty);
    m.attr(DATA_VALUE, bytes);
    m.nest_end();
}

/// Writes a verdict as nested `NFTA_DATA_VERDICT` inside attribute `ty`.
pub fn data_verdict(m: &mut MsgBuf, ty: u16, code: i32, chain: Option<&str>) {
    m.nest(ty);
    m.nest(DATA_VERDICT);
    m.attr(VERDICT_CODE, &code.to_be_bytes());
    if let Some(c) = chain {
        m.str(VERDICT_CHAIN, c);
    }
    m.nest_end();
    m.nest_end();
}

/// Encodes one expression as an `NFTA_LIST_ELEM`.
#[expect(clippy::too_many_lines, reason = "one arm per expression, flat")]
fn encode_one(m: &mut MsgBuf, e: &Expr) {
    m.nest(LIST_ELEM);
    m.str(EXPR_NAME, e.name());
    m.nest(EXPR_DATA);
    match e {
        Expr::Meta { key, dreg } => {
            m.u32_be(1, *dreg); // NFTA_META_DREG
            m.u32_be(2, *key); // NFTA_META_KEY
        }
        Expr::MetaSet { key, sreg } => {
            m.u32_be(2, *key);
            m.u32_be(3, *sreg); // NFTA_META_SREG
        }
        Expr::Ct { key, dreg } => {
            m.u32_be(1, *dreg); // NFTA_CT_DREG
            m.u32_be(2, *key); // NFTA_CT_KEY
        }
        Expr::Payload {
            base,
            offset,
            len,
            dreg,
        } => {
            m.u32_be(1, *dreg);
            m.u32_be(2, *base);
            m.u32_be(3, *offset);
            m.u32_be(4, *len);
        }
        Expr::Cmp { sreg, op, data } => {
            m.u32_be(1, *sreg);
            m.u32_be(2, *op);
            data_value(m, 3, data);
        }
        Expr::Bitwise {
            sreg,
            dreg,
            mask,
            xor,
        } => {
            m.u32_be(1, *sreg);
            m.u32_be(2, *dreg);
            m.u32_be(3, u32::try_from(mask.len()).expect("small"));
            data_value(m, 4, mask);
            data_value(m, 5, xor);
        }
        Expr::Lookup { set, sreg, dreg } => {
            m.str(1, set); // NFTA_LOOKUP_SET
            m.u32_be(2, *sreg);
            if let Some(d) = dreg {
                m.u32_be(3, *d);
            }
        }
        Expr::Immediate { dreg, data } => {
            m.u32_be(1, *dreg);
            match data {
                Imm::Value(v) => data_value(m, 2, v),
                Imm::Verdict { code, chain } => data_verdict(m, 2, *code, chain.as_deref()),
            }
        }
        Expr::Numgen {
            dreg,
            modulus,
            ty,
            offset,
        } => {
            m.u32_be(1, *dreg);
            m.u32_be(2, *modulus);
            m.u32_be(3, *ty);
            m.u32_be(4, *offset);
        }
        Expr::Nat {
            ty,
            family,
            reg_addr,
            reg_proto,
            flags,
        } => {
            m.u32_be(1, *ty);
            m.u32_be(2, *family);
            if let Some(r) = reg_addr {
                m.u32_be(3, *r);
            }
            if let Some(r) = reg_proto {
                m.u32_be(5, *r);
            }
            if *flags != 0 {
                m.u32_be(7, *flags);
            }
        }
        Expr::Masq { flags } => {
            if *flags != 0 {
                m.u32_be(1, *flags);
            }
        }
        Expr::Fib {
            dreg,
            result,
            flags,
        } => {
            m.u32_be(1, *dreg);
            m.u32_be(2, *result);
            m.u32_be(3, *flags);
        }
        Expr::Dynset { set, op, sreg_key } => {
            m.str(1, set); // NFTA_DYNSET_SET_NAME
            m.u32_be(3, *op);
            m.u32_be(4, *sreg_key);
        }
        Expr::Reject { ty, code } => {
            m.u32_be(1, *ty);
            m.attr(2, &[*code]);
        }
        Expr::Other(_) => {}
    }
    m.nest_end();
    m.nest_end();
}

/// Encodes a rule's expressions as the contents of `NFTA_RULE_EXPRESSIONS` (attribute `ty`).
pub fn encode(m: &mut MsgBuf, ty: u16, exprs: &[Expr]) {
    m.nest(ty);
    for e in exprs {
        encode_one(m, e);
    }
    m.nest_end();
}

fn u32_of(a: Attrs<'_>, ty: u16) -> Result<Option<u32>, NfnlError> {
    a.get(ty).map(|x| x.u32_be()).transpose()
}

fn need(a: Attrs<'_>, ty: u16, what: &str) -> Result<u32, NfnlError> {
    u32_of(a, ty)?.ok_or_else(|| NfnlError::Malformed(format!("{what}: attribute {ty} missing")))
}

fn value_of(a: Option<Attr<'_>>) -> Vec<u8> {
    a.and_then(|d| d.nested().get(DATA_VALUE))
        .map(|v| v.data.to_vec())
        .unwrap_or_default()
}

/// Decodes a nested `NFTA_DATA` holding a verdict: (code, chain).
pub fn decode_verdict(a: Attr<'_>) -> Result<(i32, Option<String>), NfnlError> {
    let v = a
        .nested()
        .get(DATA_VERDICT)
        .ok_or_else(|| NfnlError::Malformed("data without a verdict".into()))?;
    let code = v
        .nested()
        .get(VERDICT_CODE)
        .ok_or_else(|| NfnlError::Malformed("verdict without a code".into()))?
        .u32_be()?
        .cast_signed();
    let chain = v.nested().get(VERDICT_CHAIN).map(|c| c.str());
    Ok((code, chain))
}

fn decode_one(elem: Attr<'_>) -> Result<Expr, NfnlError> {
    let attrs = elem.nested();
    let name = attrs
        .get(EXPR_NAME)
        .ok_or_else(|| NfnlError::Malformed("expression without a name".into()))?
        .str();
    let d = attrs.get(EXPR_DATA).map_or(Attrs(&[]), |a| a.nested());
    let e = match name.as_str() {
        "meta" => match u32_of(d, 1)? {
            Some(dreg) => Expr::Meta {
                key: need(d, 2, "meta")?,
                dreg,
            },
            None => Expr::MetaSet {
                key: need(d, 2, "meta")?,
                sreg: need(d, 3, "meta")?,
            },
        },
        "ct" if d.get(3).is_none() && d.get(4).is_none() => Expr::Ct {
            key: need(d, 2, "ct")?,
            dreg: need(d, 1, "ct")?,
        },
        "payload" if d.get(5).is_none() => Expr::Payload {
            dreg: need(d, 1, "payload")?,
            base: need(d, 2, "payload")?,
            offset: need(d, 3, "payload")?,
            len: need(d, 4, "payload")?,
        },
        "cmp" => Expr::Cmp {
            sreg: need(d, 1, "cmp")?,
            op: need(d, 2, "cmp")?,
            data: value_of(d.get(3)),
        },
        "bitwise" if u32_of(d, 6)?.unwrap_or(0) == 0 => Expr::Bitwise {
            sreg: need(d, 1, "bitwise")?,
            dreg: need(d, 2, "bitwise")?,
            mask: value_of(d.get(4)),
            xor: value_of(d.get(5)),
        },
        "lookup" if u32_of(d, 5)?.unwrap_or(0) == 0 => Expr::Lookup {
            set: d
                .get(1)
                .map(|a| a.str())
                .ok_or_else(|| NfnlError::Malformed("lookup without a set".into()))?,
            sreg: need(d, 2, "lookup")?,
            dreg: u32_of(d, 3)?,
        },
        "immediate" => {
            let dreg = need(d, 1, "immediate")?;
            let data = d
                .get(2)
                .ok_or_else(|| NfnlError::Malformed("immediate without data".into()))?;
            let data = if data.nested().get(DATA_VERDICT).is_some() {
                let (code, chain) = decode_verdict(data)?;
                Imm::Verdict { code, chain }
            } else {
                Imm::Value(value_of(Some(data)))
            };
            Expr::Immediate { dreg, data }
        }
        "numgen" => Expr::Numgen {
            dreg: need(d, 1, "numgen")?,
            modulus: need(d, 2, "numgen")?,
            ty: need(d, 3, "numgen")?,
            offset: u32_of(d, 4)?.unwrap_or(0),
        },
        "nat" => Expr::Nat {
            ty: need(d, 1, "nat")?,
            family: need(d, 2, "nat")?,
            reg_addr: u32_of(d, 3)?,
            reg_proto: u32_of(d, 5)?,
            flags: u32_of(d, 7)?.unwrap_or(0) & !NAT_F_MAP_IPS,
        },
        "masq" if d.get(2).is_none() => Expr::Masq {
            flags: u32_of(d, 1)?.unwrap_or(0),
        },
        "fib" => Expr::Fib {
            dreg: need(d, 1, "fib")?,
            result: need(d, 2, "fib")?,
            flags: need(d, 3, "fib")?,
        },
        "dynset"
            if d.get(5).is_none()
                && d.get(6).is_none_or(|t| t.u64_be().is_ok_and(|v| v == 0))
                && d.get(7).is_none()
                && d.get(10).is_none() =>
        {
            Expr::Dynset {
                set: d
                    .get(1)
                    .map(|a| a.str())
                    .ok_or_else(|| NfnlError::Malformed("dynset without a set".into()))?,
                op: need(d, 3, "dynset")?,
                sreg_key: need(d, 4, "dynset")?,
            }
        }
        "reject" => Expr::Reject {
            ty: need(d, 1, "reject")?,
            code: d.get(2).and_then(|a| a.data.first().copied()).unwrap_or(0),
        },
        _ => Expr::Other(name),
    };
    Ok(e)
}

/// Decodes the contents of `NFTA_RULE_EXPRESSIONS`.
pub fn decode(list: Attr<'_>) -> Result<Vec<Expr>, NfnlError> {
    list.nested()
        .filter(|a| a.ty == LIST_ELEM)
        .map(decode_one)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(exprs: &[Expr]) -> Vec<Expr> {
        let mut m = MsgBuf::new();
        encode(&mut m, 4, exprs);
        let attr = Attrs(m.bytes()).next().unwrap();
        decode(attr).unwrap()
    }

    #[test]
    fn every_expression_round_trips() {
        let exprs = vec![
            Expr::Meta {
                key: META_NFPROTO,
                dreg: 1,
            },
            Expr::Cmp {
                sreg: 1,
                op: CMP_EQ,
                data: vec![2],
            },
            Expr::Payload {
                base: BASE_NETWORK,
                offset: 16,
                len: 4,
                dreg: 1,
            },
            Expr::Lookup {
                set: "svc4".into(),
                sreg: 1,
                dreg: Some(0),
            },
            Expr::Lookup {
                set: "hairpin4".into(),
                sreg: 1,
                dreg: None,
            },
            Expr::Bitwise {
                sreg: 1,
                dreg: 1,
                mask: 0xffff_bfffu32.to_ne_bytes().to_vec(),
                xor: 0x4000u32.to_ne_bytes().to_vec(),
            },
            Expr::MetaSet {
                key: META_MARK,
                sreg: 1,
            },
            Expr::Ct {
                key: CT_STATUS,
                dreg: 1,
            },
            Expr::Numgen {
                dreg: 1,
                modulus: 3,
                ty: NG_RANDOM,
                offset: 0,
            },
            Expr::Immediate {
                dreg: 1,
                data: Imm::Value(vec![10, 0, 0, 1]),
            },
            Expr::Immediate {
                dreg: 0,
                data: Imm::Verdict {
                    code: VERDICT_JUMP,
                    chain: Some("services".into()),
                },
            },
            Expr::Nat {
                ty: NAT_DNAT,
                family: 2,
                reg_addr: Some(1),
                reg_proto: Some(2),
                flags: NAT_F_PROTO_SPECIFIED,
            },
            Expr::Masq {
                flags: NAT_F_RANDOM_FULLY,
            },
            Expr::Fib {
                dreg: 1,
                result: FIB_ADDRTYPE,
                flags: FIB_F_DADDR,
            },
            Expr::Dynset {
                set: "a1-0a000001".into(),
                op: DYNSET_UPDATE,
                sreg_key: 1,
            },
            Expr::Reject {
                ty: REJECT_ICMPX,
                code: ICMPX_PORT_UNREACH,
            },
        ];
        assert_eq!(round_trip(&exprs), exprs);
    }

    #[test]
    fn kernel_normalisations_are_undone() {
        // The kernel reports NAT with MAP_IPS set; the decoder drops it.
        let mut m = MsgBuf::new();
        m.nest(4);
        m.nest(LIST_ELEM);
        m.str(EXPR_NAME, "nat");
        m.nest(EXPR_DATA);
        m.u32_be(1, NAT_DNAT);
        m.u32_be(2, 2);
        m.u32_be(3, 1);
        m.u32_be(4, 1);
        m.u32_be(5, 2);
        m.u32_be(6, 2);
        m.u32_be(7, NAT_F_MAP_IPS | NAT_F_PROTO_SPECIFIED);
        m.nest_end();
        m.nest_end();
        m.nest(LIST_ELEM);
        m.str(EXPR_NAME, "counter");
        m.nest_end();
        m.nest_end();
        let got = decode(Attrs(m.bytes()).next().unwrap()).unwrap();
        assert_eq!(
            got,
            vec![
                Expr::Nat {
                    ty: NAT_DNAT,
                    family: 2,
                    reg_addr: Some(1),
                    reg_proto: Some(2),
                    flags: NAT_F_PROTO_SPECIFIED,
                },
                Expr::Other("counter".into()),
            ]
        );
    }

    #[test]
    fn registers_follow_the_kernels_numbering() {
        assert_eq!(
            (0..6).map(reg32).collect::<Vec<_>>(),
            vec![1, 9, 10, 11, 2, 13]
        );
    }
}
