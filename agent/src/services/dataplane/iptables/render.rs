//! Rendering (pure): the chains and rules of a frontend, written as `iptables-save` prints them.
//! The `iptables-restore` inputs of a sync and a repair are built from these in the module
//! above.
//!
//! Rules are written the way `iptables-save` prints them (option order, `--set-xmark`,
//! probabilities to 11 places), so a faithful read-back compares as text.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use super::{
    FILTER, MARK_MASQ, MASQ_MARK, NAT, NODEPORTS, POSTROUTING, SEP_PREFIX, SERVICES, SVC_PREFIX,
};
use crate::services::dataplane::record_meta;
use crate::services::lb::{Backend, FrontendKey, FrontendKind, LbService, Proto};

pub(crate) fn fnv(data: &str) -> u64 {
    data.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The SVC chain of a frontend.
pub fn svc_chain(key: &FrontendKey) -> String {
    format!("{SVC_PREFIX}{:016X}", fnv(&key.to_string()))
}

/// The SEP chain of one endpoint of a frontend.
pub fn sep_chain(key: &FrontendKey, ip: IpAddr, port: u16) -> String {
    format!("{SEP_PREFIX}{:016X}", fnv(&format!("{key} {ip} {port}")))
}

/// `ip` as a single-host prefix (`/32`, `/128`).
pub(crate) fn host(ip: IpAddr) -> String {
    format!("{ip}/{}", if ip.is_ipv6() { 128 } else { 32 })
}

pub(crate) fn proto(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

/// `ip:port`, a v6 address in brackets.
pub(crate) fn dest(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

pub(crate) fn mask(v6: bool) -> &'static str {
    if v6 {
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    } else {
        "255.255.255.255"
    }
}

/// The metadata comment of a frontend's dispatch rule ([`record_meta`], at most 240 bytes).
pub fn comment(svc: &LbService) -> String {
    let mut c = record_meta(svc);
    c.truncate(240);
    c
}

/// `iptables-save`'s probability text for 1/n (the kernel keeps `round(p * 2^31)`).
pub fn probability(n: usize) -> String {
    let n = f64::from(u32::try_from(n).unwrap_or(u32::MAX));
    let q = (f64::from(0x8000_0000u32) / n).round();
    format!("{:.11}", q / f64::from(0x8000_0000u32))
}

/// Whether traffic to `b` is masqueraded: external frontends with policy Cluster, towards an
/// endpoint on another node (the reply must come back through this node).
pub(crate) fn masquerades(svc: &LbService, b: &Backend) -> bool {
    svc.frontend.kind != FrontendKind::ClusterIp && !svc.external_local && !b.node_local
}

/// Every endpoint is masqueraded: the SVC chain marks once, before the split.
pub(crate) fn masquerade_all(svc: &LbService) -> bool {
    !svc.backends.is_empty() && svc.backends.iter().all(|b| masquerades(svc, b))
}

/// Whether endpoint `b` needs a SEP chain: hairpin (on this node), affinity, or a masquerade
/// its siblings do not share.
pub(crate) fn needs_sep(svc: &LbService, b: &Backend, all_masq: bool) -> bool {
    b.node_local || svc.affinity_timeout_secs.is_some() || (masquerades(svc, b) && !all_masq)
}

/// Where a frontend's dispatch rule sends packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target<'a> {
    /// No endpoints: REJECT (filter table).
    Reject,
    /// The only endpoint, DNATed directly.
    Dnat(&'a Backend),
    /// The only endpoint, through its SEP chain.
    Sep(&'a Backend),
    /// The SVC chain.
    Svc,
}

pub(crate) fn target(svc: &LbService) -> Target<'_> {
    match svc.backends.as_slice() {
        [] => Target::Reject,
        [b] if svc.affinity_timeout_secs.is_none() && !masquerade_all(svc) => {
            if needs_sep(svc, b, false) {
                Target::Sep(b)
            } else {
                Target::Dnat(b)
            }
        }
        _ => Target::Svc,
    }
}

/// The table of a frontend's dispatch rule: `filter` (REJECT) without endpoints, else `nat`.
pub(crate) fn table_of(svc: &LbService) -> &'static str {
    if svc.backends.is_empty() { FILTER } else { NAT }
}

pub(crate) fn dnat_to(p: Proto, b: &Backend) -> String {
    format!(
        "-p {} -j DNAT --to-destination {}",
        proto(p),
        dest(b.ip, b.port)
    )
}

/// The dispatch rule of a frontend (nat `TWILL-SERVICES`/`TWILL-NODEPORTS`, or filter
/// `TWILL-SERVICES` with REJECT when it has no endpoints), as an `-A ...` line.
pub fn dispatch_rule(svc: &LbService) -> String {
    let k = svc.frontend.key();
    let np = svc.frontend.kind == FrontendKind::NodePort;
    let to = target(svc);
    let mut r = String::from("-A ");
    r.push_str(if np && to != Target::Reject {
        NODEPORTS
    } else {
        SERVICES
    });
    if !np {
        let _ = write!(r, " -d {}", host(k.ip));
    }
    let _ = write!(
        r,
        " -p {p} -m comment --comment \"{}\"",
        comment(svc),
        p = proto(k.proto)
    );
    if np && to == Target::Reject {
        r.push_str(" -m addrtype --dst-type LOCAL");
    }
    let _ = write!(r, " -m {p} --dport {} -j ", k.port, p = proto(k.proto));
    match to {
        Target::Reject => {
            let _ = write!(
                r,
                "REJECT --reject-with {}",
                if k.ip.is_ipv6() {
                    "icmp6-port-unreachable"
                } else {
                    "icmp-port-unreachable"
                }
            );
        }
        Target::Dnat(b) => {
            let _ = write!(r, "DNAT --to-destination {}", dest(b.ip, b.port));
        }
        Target::Sep(b) => r.push_str(&sep_chain(&k, b.ip, b.port)),
        Target::Svc => r.push_str(&svc_chain(&k)),
    }
    r
}

pub(crate) fn sep_rules(svc: &LbService, b: &Backend, all_masq: bool) -> (String, Vec<String>) {
    let k = svc.frontend.key();
    let sep = sep_chain(&k, b.ip, b.port);
    let mut rules = Vec::with_capacity(4);
    if b.node_local {
        rules.push(format!("-A {sep} -s {} -j {MARK_MASQ}", host(b.ip)));
    }
    if masquerades(svc, b) && !all_masq {
        rules.push(format!("-A {sep} -j {MARK_MASQ}"));
    }
    if svc.affinity_timeout_secs.is_some() {
        rules.push(format!(
            "-A {sep} -m recent --set --name {sep} --mask {} --rsource",
            mask(k.ip.is_ipv6())
        ));
    }
    rules.push(format!("-A {sep} {}", dnat_to(k.proto, b)));
    (sep, rules)
}

/// The chains of a frontend and their rules, SVC chain first: (chain, `-A` lines). Empty when
/// the dispatch rule does it all (no endpoints, or one DNATed directly).
pub fn frontend_chains(svc: &LbService) -> Vec<(String, Vec<String>)> {
    match target(svc) {
        Target::Reject | Target::Dnat(_) => Vec::new(),
        Target::Sep(b) => vec![sep_rules(svc, b, false)],
        Target::Svc => {
            let k = svc.frontend.key();
            let n = svc.backends.len();
            let all_masq = masquerade_all(svc);
            let svc_name = svc_chain(&k);
            let mut rules = Vec::with_capacity(n * 2 + 1);
            let mut seps = Vec::new();
            if all_masq {
                rules.push(format!("-A {svc_name} -j {MARK_MASQ}"));
            }
            if let Some(secs) = svc.affinity_timeout_secs {
                for b in &svc.backends {
                    let sep = sep_chain(&k, b.ip, b.port);
                    rules.push(format!(
                        "-A {svc_name} -m recent --rcheck --seconds {secs} --reap --name {sep} \
                         --mask {} --rsource -j {sep}",
                        mask(k.ip.is_ipv6())
                    ));
                }
            }
            for (i, b) in svc.backends.iter().enumerate() {
                let stat = if i + 1 < n {
                    format!(
                        " -m statistic --mode random --probability {}",
                        probability(n - i)
                    )
                } else {
                    String::new()
                };
                if needs_sep(svc, b, all_masq) {
                    let (sep, sep_rules) = sep_rules(svc, b, all_masq);
                    rules.push(format!("-A {svc_name}{stat} -j {sep}"));
                    seps.push((sep, sep_rules));
                } else {
                    rules.push(format!(
                        "-A {svc_name} -p {}{stat} -j DNAT --to-destination {}",
                        proto(k.proto),
                        dest(b.ip, b.port)
                    ));
                }
            }
            let mut out = Vec::with_capacity(seps.len() + 1);
            out.push((svc_name, rules));
            out.extend(seps);
            out
        }
    }
}

/// The static chains of `nat`: (chain, rules).
pub(crate) fn static_nat() -> Vec<(String, Vec<String>)> {
    vec![
        (
            MARK_MASQ.into(),
            vec![format!(
                "-A {MARK_MASQ} -j MARK --set-xmark {MASQ_MARK:#x}/{MASQ_MARK:#x}"
            )],
        ),
        (
            POSTROUTING.into(),
            vec![
                format!(
                    "-A {POSTROUTING} -m mark ! --mark {MASQ_MARK:#x}/{MASQ_MARK:#x} -j RETURN"
                ),
                format!("-A {POSTROUTING} -j MARK --set-xmark {MASQ_MARK:#x}/0x0"),
                format!("-A {POSTROUTING} -j MASQUERADE --random-fully"),
            ],
        ),
    ]
}

/// Jump rules: (table, built-in chain, rule arguments after `-A CHAIN`).
pub(crate) fn jumps() -> Vec<(&'static str, &'static str, String)> {
    let mut out = Vec::new();
    for chain in ["PREROUTING", "OUTPUT"] {
        out.push((
            NAT,
            chain,
            format!("-m comment --comment \"twill service portals\" -j {SERVICES}"),
        ));
        out.push((
            NAT,
            chain,
            format!(
                "-m comment --comment \"twill node ports\" -m addrtype --dst-type LOCAL -j {NODEPORTS}"
            ),
        ));
    }
    out.push((
        NAT,
        "POSTROUTING",
        format!("-m comment --comment \"twill masquerade\" -j {POSTROUTING}"),
    ));
    for chain in ["INPUT", "FORWARD", "OUTPUT"] {
        out.push((
            FILTER,
            chain,
            format!(
                "-m comment --comment \"twill services without endpoints\" -m conntrack --ctstate NEW -j {SERVICES}"
            ),
        ));
    }
    out
}

/// Tokens of a rule line, quotes removed.
pub(crate) fn tokens(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            ' ' if !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            _ => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// What matters in a rule, independent of how `iptables-save` formats it: sorted
/// (option, value) pairs with numbers and marks normalised.
pub fn signature(line: &str) -> Vec<(String, String)> {
    let is_opt = |s: &str| {
        s.len() > 1
            && s.starts_with('-')
            && s[1..]
                .chars()
                .next()
                .is_some_and(|c| c == '-' || c.is_ascii_alphabetic())
    };
    let t = tokens(line);
    let mut out: Vec<(String, String)> = Vec::new();
    let mut i = 0;
    while i < t.len() {
        let tok = t[i].as_str();
        let next = t.get(i + 1).filter(|n| !is_opt(n)).cloned();
        match (tok, next) {
            ("-m", _) => i += 2,
            ("--probability", Some(v)) => {
                let p: f64 = v.parse().unwrap_or(-1.0);
                out.push((tok.into(), format!("{p:.6}")));
                i += 2;
            }
            ("--or-mark", Some(v)) => {
                out.push(("mark".into(), format!("{v}/{v}")));
                i += 2;
            }
            ("--xor-mark", Some(v)) => {
                out.push(("mark".into(), format!("{v}/0x0")));
                i += 2;
            }
            ("--set-xmark", Some(v)) => {
                out.push(("mark".into(), v));
                i += 2;
            }
            (t, Some(v)) if is_opt(t) => {
                out.push((t.into(), v));
                i += 2;
            }
            (t, _) => {
                out.push((t.into(), String::new()));
                i += 1;
            }
        }
    }
    out.sort();
    out
}

/// One rule as the kernel holds it (`have`, from `iptables-save`) equals one we render.
pub(crate) fn same_rule(have: &str, want: &str) -> bool {
    have == want || signature(have) == signature(want)
}

pub(crate) fn same(have: &[&str], want: &[String]) -> bool {
    have.len() == want.len() && have.iter().zip(want).all(|(h, w)| same_rule(h, w))
}
