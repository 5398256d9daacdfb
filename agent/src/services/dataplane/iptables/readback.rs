//! Reading back (pure): from `iptables-save` text to the programmed frontends.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use super::render::{dispatch_rule, frontend_chains, same, same_rule, table_of, tokens};
use super::{
    DISPATCH, FILTER, MARK_MASQ, NAT, NODEPORTS, POSTROUTING, PREFIX, SEP_PREFIX, SERVICES,
    SVC_PREFIX,
};
use crate::services::lb::{
    Backend, BackendState, Frontend, FrontendKey, FrontendKind, LbService, Proto,
};

/// One family's `iptables-save` output (`nat` and `filter`), parsed without copying: rules by
/// table and chain, as slices of the text.
#[derive(Debug, Default, Clone)]
pub struct Saved<'a> {
    /// table -> chain -> rules.
    tables: HashMap<&'a str, HashMap<&'a str, Vec<&'a str>>>,
}

impl<'a> Saved<'a> {
    /// Parses `iptables-save` output.
    pub fn parse(text: &'a str) -> Saved<'a> {
        let mut s = Saved::default();
        let mut table = "";
        // Rules come grouped by chain: remember the last chain's list.
        let mut last: Option<(&str, &str)> = None;
        let mut rules: Vec<&str> = Vec::new();
        let flush =
            |s: &mut Saved<'a>, last: Option<(&'a str, &'a str)>, rules: &mut Vec<&'a str>| {
                if let Some((t, c)) = last {
                    s.tables
                        .entry(t)
                        .or_default()
                        .entry(c)
                        .or_default()
                        .append(rules);
                }
            };
        for line in text.lines() {
            if let Some(t) = line.strip_prefix('*') {
                flush(&mut s, last.take(), &mut rules);
                table = t.trim();
            } else if let Some(c) = line.strip_prefix(':') {
                let name = c.split(' ').next().unwrap_or_default();
                s.tables.entry(table).or_default().entry(name).or_default();
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let chain = rest.split(' ').next().unwrap_or_default();
                if last != Some((table, chain)) {
                    flush(&mut s, last.take(), &mut rules);
                    last = Some((table, chain));
                }
                rules.push(line);
            }
        }
        flush(&mut s, last, &mut rules);
        s
    }

    pub(crate) fn rules(&self, table: &str, chain: &str) -> Option<&[&'a str]> {
        self.tables.get(table)?.get(chain).map(Vec::as_slice)
    }

    pub(crate) fn has(&self, table: &str, chain: &str) -> bool {
        self.rules(table, chain).is_some()
    }

    /// Our chains of `table`, sorted.
    pub(crate) fn ours(&self, table: &str) -> Vec<&'a str> {
        let mut out: Vec<&str> = self
            .tables
            .get(table)
            .into_iter()
            .flat_map(HashMap::keys)
            .filter(|c| c.starts_with(PREFIX))
            .copied()
            .collect();
        out.sort_unstable();
        out
    }
}

/// One frontend as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Programmed {
    /// The service, as far as the rules tell (its name without a drift marker).
    pub svc: LbService,
    /// The table of its dispatch rule.
    pub(crate) table: &'static str,
    /// Its dispatch rule as the kernel holds it (`-A ...`): what a `-D` must name.
    pub(crate) dispatch: String,
    /// Chains of ours that belong to it and exist (referenced or expected).
    pub(crate) chains: BTreeSet<String>,
    /// Its rules differ from what [`Programmed::svc`] renders to.
    pub drifted: bool,
}

impl Programmed {
    /// What a successful apply of `svc` leaves in the kernel.
    pub(crate) fn applied(svc: &LbService) -> Self {
        Programmed {
            table: table_of(svc),
            dispatch: dispatch_rule(svc),
            chains: frontend_chains(svc).into_iter().map(|(c, _)| c).collect(),
            svc: svc.clone(),
            drifted: false,
        }
    }

    /// The service as `observed` reports it: a drifted one gets a ` (drifted)` name suffix,
    /// so it differs from any desired service and the next plan rewrites it.
    pub(crate) fn observed(&self) -> LbService {
        let mut s = self.svc.clone();
        if self.drifted {
            s.name.push_str(" (drifted)");
        }
        s
    }
}

/// What one family's rules hold.
#[derive(Debug, Default, Clone)]
pub struct Found {
    /// The frontends, by key.
    pub frontends: BTreeMap<FrontendKey, Programmed>,
    /// Chains of ours that belong to nothing: (table, chain).
    pub stray: Vec<(&'static str, String)>,
    /// Dispatch chains holding rules that belong to no frontend (duplicates, foreign rules).
    pub junk: Vec<(&'static str, &'static str)>,
}

impl Found {
    /// The services, drifted ones marked (see [`Programmed`]).
    pub fn services(&self) -> Vec<LbService> {
        self.frontends.values().map(Programmed::observed).collect()
    }
}

pub(crate) type Meta = (u32, FrontendKind, bool, bool, bool, Option<u32>, String);

pub(crate) fn parse_comment(c: &str) -> Option<Meta> {
    let mut it = c.splitn(5, ' ');
    let id = it.next()?.parse().ok()?;
    let kind_s = it.next()?;
    let kind = [
        FrontendKind::ClusterIp,
        FrontendKind::NodePort,
        FrontendKind::ExternalIp,
        FrontendKind::LoadBalancer,
    ]
    .into_iter()
    .find(|k| k.as_str() == kind_s)?;
    let flags = it.next()?;
    let aff = it.next()?;
    let name = it.next()?.to_string();
    Some((
        id,
        kind,
        flags.contains('e'),
        flags.contains('i'),
        flags.contains('t'),
        if aff == "-" { None } else { aff.parse().ok() },
        name,
    ))
}

pub(crate) fn value_of<'t, S: AsRef<str>>(t: &'t [S], opt: &str) -> Option<&'t str> {
    t.iter()
        .position(|x| x.as_ref() == opt)
        .and_then(|i| t.get(i + 1))
        .map(AsRef::as_ref)
}

pub(crate) fn parse_dest(d: &str) -> Option<(IpAddr, u16)> {
    let (ip, port) = d.rsplit_once(':')?;
    let ip = ip.trim_start_matches('[').trim_end_matches(']');
    Some((ip.parse().ok()?, port.parse().ok()?))
}

/// The frontend a dispatch rule names, and its jump target: (key, metadata, `-j` target,
/// DNAT destination).
pub(crate) fn parse_dispatch(
    line: &str,
    v6: bool,
) -> Option<(FrontendKey, Meta, String, Option<String>)> {
    let t = tokens(line);
    let meta = parse_comment(value_of(&t, "--comment")?)?;
    let port = value_of(&t, "--dport")?.parse().ok()?;
    let proto = match value_of(&t, "-p")? {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        _ => return None,
    };
    let ip = match value_of(&t, "-d") {
        Some(d) => d.split('/').next()?.parse().ok()?,
        None => Frontend::any_addr(v6),
    };
    if ip.is_ipv6() != v6 {
        return None;
    }
    let to = value_of(&t, "-j")?.to_string();
    let dnat = value_of(&t, "--to-destination").map(String::from);
    Some((FrontendKey { ip, port, proto }, meta, to, dnat))
}

/// The endpoint a SEP chain DNATs to, and whether it is on this node (the hairpin rule).
pub(crate) fn follow_sep(saved: &Saved<'_>, sep: &str) -> Option<(IpAddr, u16, bool)> {
    let rules = saved.rules(NAT, sep)?;
    let hairpin = format!("-A {sep} -s ");
    let local = rules.iter().any(|r| r.starts_with(&hairpin));
    rules.iter().find_map(|r| {
        let t: Vec<&str> = r.split(' ').collect();
        (value_of(&t, "-j") == Some("DNAT"))
            .then(|| value_of(&t, "--to-destination").and_then(parse_dest))
            .flatten()
            .map(|(ip, port)| (ip, port, local))
    })
}

/// Rebuilds the frontends one family's rules hold, marks the drifted ones, and lists chains of
/// ours that belong to nothing and dispatch chains with rules of nobody's.
pub fn reconstruct(saved: &Saved<'_>, v6: bool) -> Found {
    let mut found = Found::default();
    let mut used: HashSet<String> = HashSet::new();
    for (table, chain) in DISPATCH {
        let mut junk = false;
        for line in saved.rules(table, chain).into_iter().flatten() {
            let Some((key, meta, to, dnat)) = parse_dispatch(line, v6) else {
                junk = true;
                continue;
            };
            if found.frontends.contains_key(&key) {
                junk = true;
                continue;
            }
            let (id, kind, el, il, term, aff, name) = meta;
            let state = if term {
                BackendState::ServingTerminating
            } else {
                BackendState::Ready
            };
            let backend = |ip, port, node_local| Backend {
                ip,
                port,
                node_local,
                state,
            };
            let mut backends = Vec::new();
            let mut referenced = BTreeSet::new();
            if to == "DNAT" {
                if let Some((ip, port)) = dnat.as_deref().and_then(parse_dest) {
                    backends.push(backend(ip, port, false));
                }
            } else if to.starts_with(SEP_PREFIX) {
                if let Some((ip, port, local)) = follow_sep(saved, &to) {
                    backends.push(backend(ip, port, local));
                }
                referenced.insert(to);
            } else if to.starts_with(SVC_PREFIX) {
                for r in saved.rules(NAT, &to).into_iter().flatten() {
                    let t: Vec<&str> = r.split(' ').collect();
                    let Some(j) = value_of(&t, "-j") else {
                        continue;
                    };
                    if t.contains(&"--rcheck") {
                        referenced.insert(j.to_string());
                    } else if j == "DNAT" {
                        if let Some((ip, port)) =
                            value_of(&t, "--to-destination").and_then(parse_dest)
                        {
                            backends.push(backend(ip, port, false));
                        }
                    } else if j.starts_with(SEP_PREFIX) {
                        if let Some((ip, port, local)) = follow_sep(saved, j) {
                            backends.push(backend(ip, port, local));
                        }
                        referenced.insert(j.to_string());
                    }
                }
                referenced.insert(to);
            }
            let svc = LbService {
                id,
                name,
                frontend: Frontend {
                    ip: key.ip,
                    port: key.port,
                    proto: key.proto,
                    kind,
                },
                backends,
                affinity_timeout_secs: aff,
                external_local: el,
                internal_local: il,
            };
            let want = frontend_chains(&svc);
            let faithful = table == table_of(&svc)
                && same_rule(line, &dispatch_rule(&svc))
                && want
                    .iter()
                    .all(|(c, rules)| saved.rules(NAT, c).is_some_and(|have| same(have, rules)));
            let chains: BTreeSet<String> = referenced
                .into_iter()
                .chain(want.into_iter().map(|(c, _)| c))
                .filter(|c| saved.has(NAT, c))
                .collect();
            used.extend(chains.iter().cloned());
            found.frontends.insert(
                key,
                Programmed {
                    svc,
                    table,
                    dispatch: (*line).to_string(),
                    chains,
                    drifted: !faithful,
                },
            );
        }
        if junk {
            found.junk.push((table, chain));
        }
    }
    for table in [NAT, FILTER] {
        // A chain of ours someone else jumps to cannot be removed; it is left alone.
        let foreign: HashSet<&str> = saved
            .tables
            .get(table)
            .into_iter()
            .flatten()
            .filter(|(c, _)| !c.starts_with(PREFIX))
            .flat_map(|(_, rules)| rules.iter())
            .filter_map(|r| {
                let at = r.find(" -j TWILL-").or_else(|| r.find(" -g TWILL-"))?;
                r[at + 4..].split(' ').next()
            })
            .collect();
        for c in saved.ours(table) {
            let fixed = if table == NAT {
                [SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ].contains(&c)
            } else {
                c == SERVICES
            };
            if !fixed && !foreign.contains(c) && (table == FILTER || !used.contains(c)) {
                found.stray.push((table, c.to_string()));
            }
        }
    }
    found
}
