//! The iptables service dataplane ([`IptLb`]): kube-proxy's chain layout, applied with one
//! `iptables-restore --noflush` per family and sync.
//!
//! Layout (table `nat` unless noted; `x` = a hash of the frontend, `y` = of frontend + endpoint):
//! ```text
//! PREROUTING, OUTPUT   -j TWILL-SERVICES ; -m addrtype --dst-type LOCAL -j TWILL-NODEPORTS
//! POSTROUTING          -j TWILL-POSTROUTING
//! TWILL-SERVICES       -d VIP -p tcp --dport 80 -j <to>                  one per frontend
//! TWILL-NODEPORTS      -p tcp --dport 30080 -j <to>                      one per NodePort
//!   <to> = DNAT --to-destination EP:PORT   one endpoint, nothing per endpoint, no masquerade
//!        | TWILL-SEP-y                     one endpoint that needs its own chain, no masquerade
//!        | TWILL-SVC-x                     otherwise
//! TWILL-SVC-x          [-j TWILL-MARK-MASQ]          every endpoint is masqueraded
//!                      [-m recent --rcheck --seconds T --reap --name TWILL-SEP-y -j TWILL-SEP-y]
//!                      -m statistic --mode random --probability 1/(n-k) -j DNAT|TWILL-SEP-y
//! TWILL-SEP-y          [-s EP -j TWILL-MARK-MASQ]    hairpin, endpoint on this node
//!                      [-j TWILL-MARK-MASQ]          masqueraded while a sibling is not
//!                      [-m recent --set --name TWILL-SEP-y]              affinity
//!                      -p tcp -j DNAT --to-destination EP:PORT
//! TWILL-MARK-MASQ      -j MARK --or-mark 0x4000
//! TWILL-POSTROUTING    mark not set: RETURN ; clear the mark ; MASQUERADE --random-fully
//! filter: INPUT, FORWARD, OUTPUT -m conntrack --ctstate NEW -j TWILL-SERVICES
//! filter TWILL-SERVICES  frontends without endpoints: -j REJECT
//! ```
//!
//! Why:
//! - kube-proxy's layout, so operators read it as they read kube-proxy's; statistic splits give
//!   each endpoint 1/n; `recent` gives sessionAffinity its timeout.
//! - **A chain only where something happens per endpoint or per service.** A SEP chain is
//!   needed for an endpoint on this node (the hairpin masquerade: a pod reaching itself through
//!   the VIP), with affinity (`recent --set`), or when its masquerade differs from its siblings'
//!   (external traffic, policy Cluster: remote endpoints are masqueraded, local ones are not).
//!   Any other endpoint is DNATed from the SVC chain, and a service with a single such endpoint
//!   needs no SVC chain either. Packets see the same marks and translations as with a chain per
//!   endpoint, so behaviour is kube-proxy's; what changes is the cost. The legacy backend
//!   rewrites the whole table blob on every commit, and the kernel checks and frees every rule
//!   each time, so a commit costs the table's size: at 10k services x 10 endpoints this layout
//!   has 110k rules and 10k chains where a chain per endpoint had 310k and 110k (measured here:
//!   a one-rule commit 0.37 s instead of 1.9 s; 10k x 1 endpoint: 35 ms).
//! - **One `iptables-restore --noflush` per family per sync, and partial syncs.** Declaring a
//!   chain in a `--noflush` restore flushes it, so a sync declares exactly the chains it rewrites
//!   (the changed frontends' SVC and SEP chains) and edits the dispatch chains rule by rule
//!   (`-D` of the rule as the kernel holds it, `-A` of the new one); nothing else is touched, and
//!   every change of a sync lands in one table commit. Built-in chains only get our jump rules,
//!   inserted once.
//! - **Never mix backends.** The backend (legacy or nft) is chosen once, at open: the one that
//!   already holds `TWILL-` chains (a restart), else the one holding more rules (the node's
//!   other software), else the one `iptables --version` names; v4 and v6 use the same one.
//!   iptables-nft-restore is ~30x slower than legacy at 10k services (measured here), so the
//!   choice shows in the log.
//! - **Read back from `iptables-save`**: the frontend's id, kind, name and flags are the comment
//!   of its dispatch rule, the endpoints are the DNAT targets reached from it; every chain is
//!   compared with what would be rendered (as text first: rules are rendered the way
//!   `iptables-save` prints them; on a difference rule by rule on the fields that matter, so
//!   another iptables version's normalisations do not count), and a difference marks the
//!   frontend drifted so the next plan rewrites it. A restart therefore rewrites nothing that
//!   still matches. Rules in our dispatch chains that belong to no frontend (duplicates, someone
//!   else's) are removed.
//! - **A resync that finds nothing changed reads nothing.** A full read of 110k rules costs
//!   hundreds of milliseconds, so each family remembers a token of the state it last read in
//!   full and found in order: the nf_tables ruleset generation for the nft backend, a digest of
//!   the `nat` and `filter` blobs without their counters for legacy (which has no generation).
//!   The token is taken before the read, so a change during the read only causes another read.
//! - UDP conntrack entries of removed backends are deleted after each apply
//!   ([`super::conntrack`]).
//! - **Pure parts, one seam.** [`render`] writes the chains, [`repair_input`] and
//!   [`render_plan`] the restore inputs, [`readback`] turns `iptables-save` text back into
//!   frontends; every tool run, the change token and the conntrack purge go through
//!   [`IptRunner`] ([`runner`]), whose recording fake keeps the tables as `iptables-restore`
//!   would. Golden files (`services/dataplane/golden/<case>/iptables.txt`) pin the exact
//!   restore text a manifest produces.

pub mod readback;
pub mod render;
pub mod runner;
#[cfg(test)]
mod sim_tests;
mod token;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use tracing::{debug, info};

use self::readback::{Found, Programmed, Saved, reconstruct};
use self::render::{dispatch_rule, frontend_chains, jumps, same, same_rule, static_nat, table_of};
pub use self::runner::{FakeIptables, IptRunner, ToolRunner, detect_backend};
use crate::services::lb::{Frontend, FrontendKey, LbDataplane, LbError, LbPlan, LbService};

/// The packet mark bit asking `TWILL-POSTROUTING` to masquerade (kube-proxy's bit).
pub const MASQ_MARK: u32 = 0x4000;
pub(crate) const SERVICES: &str = "TWILL-SERVICES";
pub(crate) const NODEPORTS: &str = "TWILL-NODEPORTS";
pub(crate) const POSTROUTING: &str = "TWILL-POSTROUTING";
pub(crate) const MARK_MASQ: &str = "TWILL-MARK-MASQ";
pub(crate) const PREFIX: &str = "TWILL-";
pub(crate) const SVC_PREFIX: &str = "TWILL-SVC-";
pub(crate) const SEP_PREFIX: &str = "TWILL-SEP-";
pub(crate) const NAT: &str = "nat";
pub(crate) const FILTER: &str = "filter";
/// The chains a frontend's dispatch rule can live in: (table, chain).
pub(crate) const DISPATCH: [(&str, &str); 3] =
    [(NAT, SERVICES), (NAT, NODEPORTS), (FILTER, SERVICES)];

/// The iptables implementation asked for (`--iptables-backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IptBackendChoice {
    /// The one already holding rules, else what `iptables --version` names.
    Auto,
    /// `iptables-legacy`.
    Legacy,
    /// `iptables-nft`.
    Nft,
}

impl IptBackendChoice {
    /// The backend to use and why.
    pub fn resolve(self) -> (IptBackend, String) {
        match self {
            IptBackendChoice::Legacy => (IptBackend::Legacy, "requested".to_string()),
            IptBackendChoice::Nft => (IptBackend::Nft, "requested".to_string()),
            IptBackendChoice::Auto => detect_backend(),
        }
    }
}

/// Which iptables implementation the node uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IptBackend {
    /// `iptables-legacy` (x_tables).
    Legacy,
    /// `iptables-nft` (nf_tables behind the iptables syntax).
    Nft,
}

impl IptBackend {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            IptBackend::Legacy => "legacy",
            IptBackend::Nft => "nft",
        }
    }

    pub(crate) fn tool(self, v6: bool, what: &str) -> String {
        format!(
            "{}tables-{}{}",
            if v6 { "ip6" } else { "ip" },
            self.as_str(),
            if what.is_empty() {
                String::new()
            } else {
                format!("-{what}")
            }
        )
    }
}

/// Errors of the iptables dataplane.
#[derive(Debug, thiserror::Error)]
pub enum IptError {
    /// A tool could not be run.
    #[error("run {tool}: {source}")]
    Spawn {
        /// The tool.
        tool: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A tool failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Failed {
        /// The tool.
        tool: String,
        /// Its exit status.
        status: String,
        /// Its standard error.
        stderr: String,
    },
}

impl From<IptError> for LbError {
    fn from(e: IptError) -> Self {
        LbError::Op {
            op: "iptables",
            object: "nat/filter".into(),
            source: Box::new(e),
        }
    }
}

/// The pure part of [`detect_backend`].
pub fn choose_backend(
    legacy: (bool, usize),
    nft: (bool, usize),
    version: &str,
) -> (IptBackend, String) {
    match (legacy, nft) {
        ((true, _), (false, _)) => (
            IptBackend::Legacy,
            "TWILL- chains found in iptables-legacy".into(),
        ),
        ((false, _), (true, _)) => (
            IptBackend::Nft,
            "TWILL- chains found in iptables-nft".into(),
        ),
        ((_, l), (_, n)) if l > n => (
            IptBackend::Legacy,
            format!("iptables-legacy holds more rules ({l} vs {n})"),
        ),
        ((_, l), (_, n)) if n > l => (
            IptBackend::Nft,
            format!("iptables-nft holds more rules ({n} vs {l})"),
        ),
        _ if version.contains("nf_tables") => (
            IptBackend::Nft,
            "no rules yet; iptables --version names nf_tables".into(),
        ),
        _ => (
            IptBackend::Legacy,
            "no rules yet; iptables --version names legacy".into(),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// The dataplane.

/// What one family holds, as far as twill knows.
#[derive(Debug, Default, Clone)]
struct Family {
    /// Programmed frontends (as read back or applied).
    frontends: BTreeMap<FrontendKey, Programmed>,
    /// The change token taken before the last full read that found everything in order (see
    /// [`IptRunner::change_token`]); cleared by any write of ours. While the kernel reports the same
    /// token, `frontends` is what the kernel holds.
    token: Option<u64>,
}

/// The iptables service dataplane.
#[derive(Debug)]
pub struct IptLb {
    families: [Family; 2],
    runner: Box<dyn IptRunner>,
}

impl IptLb {
    /// Opens the dataplane with `backend` (see [`detect_backend`]) in the calling thread's
    /// network namespace: installs the static chains and the jump rules if missing, and reads
    /// the rules back. Never flushes a chain it does not own.
    pub fn open(backend: IptBackend) -> Result<Self, IptError> {
        Self::with_runner(Box::new(ToolRunner::new(backend)))
    }

    /// Opens the dataplane over `runner` (the real tools, or a fake).
    pub fn with_runner(runner: Box<dyn IptRunner>) -> Result<Self, IptError> {
        let mut lb = IptLb {
            families: [Family::default(), Family::default()],
            runner,
        };
        lb.read_back()?;
        Ok(lb)
    }

    /// What twill's chains of the calling thread's namespace hold (both families), read
    /// without changing anything (for `twilld get services`); `None` when no backend has
    /// twill's chains.
    pub fn peek() -> Result<Option<(IptBackend, Vec<LbService>)>, IptError> {
        let (backend, _) = detect_backend();
        Ok(Self::peek_with(&mut ToolRunner::tools_only(backend))?.map(|s| (backend, s)))
    }

    /// [`IptLb::peek`] over `runner`.
    pub fn peek_with(runner: &mut dyn IptRunner) -> Result<Option<Vec<LbService>>, IptError> {
        let mut all = Vec::new();
        let mut found = false;
        for v6 in [false, true] {
            let text = save_family(runner, v6)?;
            let saved = Saved::parse(&text);
            found |= saved.has(NAT, SERVICES);
            all.extend(reconstruct(&saved, v6).services());
        }
        Ok(found.then_some(all))
    }

    /// The backend in use.
    pub fn backend(&self) -> IptBackend {
        self.runner.backend()
    }

    fn restore(&mut self, v6: bool, input: &str) -> Result<(), IptError> {
        debug!(v6, bytes = input.len(), "iptables-restore");
        // Whatever happens, what we knew of the kernel is no proof any more.
        self.families[usize::from(v6)].token = None;
        self.runner.restore(v6, input)
    }

    /// Reads both families back (unless a family's token says nothing changed since its last
    /// full read); repairs static chains, jump rules, dispatch chains and strays. The token
    /// ([`IptRunner::change_token`]) is the nf_tables ruleset generation (nft backend; any
    /// commit in the namespace advances it), or a digest of the two tables' rules without
    /// counters (legacy).
    fn read_back(&mut self) -> Result<Vec<LbService>, IptError> {
        let mut all = Vec::new();
        for v6 in [false, true] {
            let token = self.runner.change_token(v6);
            let fam = &self.families[usize::from(v6)];
            if token.is_some() && token == fam.token {
                all.extend(fam.frontends.values().map(Programmed::observed));
                continue;
            }
            let text = save_family(&mut *self.runner, v6)?;
            let saved = Saved::parse(&text);
            let found = reconstruct(&saved, v6);
            let input = repair_input(&saved, &found);
            if !input.is_empty() {
                info!(
                    v6,
                    stray = found.stray.len(),
                    junk = found.junk.len(),
                    "repairing iptables chains"
                );
                self.restore(v6, &input)?;
            }
            all.extend(found.services());
            let fam = &mut self.families[usize::from(v6)];
            fam.frontends = found.frontends;
            fam.token = if input.is_empty() { token } else { None };
        }
        all.sort_by_key(|s| s.frontend.key());
        Ok(all)
    }

    /// Removes every `TWILL-` chain and jump rule of both families with `backend` (a no-op
    /// where there are none).
    pub fn uninstall(backend: IptBackend) -> Result<usize, IptError> {
        Self::uninstall_with(&mut ToolRunner::tools_only(backend))
    }

    /// [`IptLb::uninstall`] over `runner`.
    pub fn uninstall_with(runner: &mut dyn IptRunner) -> Result<usize, IptError> {
        let mut removed = 0;
        for v6 in [false, true] {
            let text = save_family(runner, v6)?;
            let saved = Saved::parse(&text);
            let mut input = String::new();
            for table in [NAT, FILTER] {
                let ours = saved.ours(table);
                if ours.is_empty() {
                    continue;
                }
                let _ = writeln!(input, "*{table}");
                for (t, chain, rule) in jumps() {
                    if t == table
                        && saved.rules(t, chain).is_some_and(|have| {
                            have.iter()
                                .any(|h| same_rule(h, &format!("-A {chain} {rule}")))
                        })
                    {
                        let _ = writeln!(input, "-D {chain} {rule}");
                    }
                }
                for c in &ours {
                    let _ = writeln!(input, ":{c} - [0:0]");
                }
                for c in &ours {
                    let _ = writeln!(input, "-X {c}");
                }
                input.push_str("COMMIT\n");
                removed += ours.len();
            }
            if !input.is_empty() {
                runner.restore(v6, &input)?;
            }
        }
        Ok(removed)
    }
}

/// One family's `iptables-save` of `nat` and `filter`.
fn save_family(runner: &mut dyn IptRunner, v6: bool) -> Result<String, IptError> {
    let mut text = runner.save(v6, NAT)?;
    text.push('\n');
    text.push_str(&runner.save(v6, FILTER)?);
    Ok(text)
}

/// The `iptables-restore` input that repairs what a read found: static chains that differ,
/// missing dispatch chains, jump rules (all of a built-in chain's again, first, in order, if
/// one is missing), dispatch chains with rules of nobody's (rewritten with the frontends'
/// rules as they are), stray chains (removed). Empty when all is in order. Pure.
pub fn repair_input(saved: &Saved<'_>, found: &Found) -> String {
    let mut nat = String::new();
    let mut filter = String::new();
    let mut decl: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut body: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (chain, rules) in static_nat() {
        if saved
            .rules(NAT, &chain)
            .is_none_or(|have| !same(have, &rules))
        {
            decl.entry(NAT).or_default().push(chain);
            body.entry(NAT).or_default().extend(rules);
        }
    }
    for (table, chain) in DISPATCH {
        if !saved.has(table, chain) {
            decl.entry(table).or_default().push(chain.to_string());
        }
    }
    for &(table, chain) in &found.junk {
        decl.entry(table).or_default().push(chain.to_string());
        let prefix = format!("-A {chain} ");
        body.entry(table).or_default().extend(
            found
                .frontends
                .values()
                .filter(|p| p.table == table && p.dispatch.starts_with(&prefix))
                .map(|p| p.dispatch.clone()),
        );
    }
    // Our jumps go first in each built-in chain, in order; if one is missing, the present ones
    // are removed and all are inserted again (one commit, no gap).
    let mut groups: BTreeMap<(&str, &str), Vec<String>> = BTreeMap::new();
    for (table, chain, rule) in jumps() {
        groups.entry((table, chain)).or_default().push(rule);
    }
    for ((table, chain), rules) in groups {
        let present = |rule: &str| {
            let want = format!("-A {chain} {rule}");
            saved
                .rules(table, chain)
                .is_some_and(|have| have.iter().any(|h| same_rule(h, &want)))
        };
        if rules.iter().all(|r| present(r)) {
            continue;
        }
        let out = body.entry(table).or_default();
        for r in rules.iter().filter(|r| present(r)) {
            out.push(format!("-D {chain} {r}"));
        }
        for (i, r) in rules.iter().enumerate() {
            out.push(format!("-I {chain} {} {r}", i + 1));
        }
    }
    let mut remove: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (table, c) in &found.stray {
        decl.entry(table).or_default().push(c.clone());
        remove.entry(table).or_default().push(c);
    }
    for table in [NAT, FILTER] {
        let out = if table == NAT { &mut nat } else { &mut filter };
        for c in decl.get(table).into_iter().flatten() {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        for r in body.get(table).into_iter().flatten() {
            let _ = writeln!(out, "{r}");
        }
        for c in remove.get(table).into_iter().flatten() {
            let _ = writeln!(out, "-X {c}");
        }
    }
    let mut input = String::new();
    for (table, text) in [(NAT, &nat), (FILTER, &filter)] {
        if !text.is_empty() {
            let _ = write!(input, "*{table}\n{text}COMMIT\n");
        }
    }
    input
}

/// The `iptables-restore` input for one family that applies a plan's part of that family.
/// Pure. Per table: chain declarations (a declared chain is flushed), removals of dispatch
/// rules (named as the kernel holds them), the rewritten chains' rules, new dispatch rules,
/// removals of chains.
pub fn render_plan(
    have: &BTreeMap<FrontendKey, Programmed>,
    upserts: &[&LbService],
    deletes: &[FrontendKey],
) -> String {
    #[derive(Default)]
    struct Table {
        decl: Vec<String>,
        del: Vec<String>,
        rules: Vec<String>,
        add: Vec<String>,
        remove: Vec<String>,
    }
    fn pick<'t>(table: &str, nat: &'t mut Table, filter: &'t mut Table) -> &'t mut Table {
        if table == NAT { nat } else { filter }
    }
    let mut nat = Table::default();
    let mut filter = Table::default();
    for key in deletes {
        let Some(old) = have.get(key) else {
            continue;
        };
        pick(old.table, &mut nat, &mut filter)
            .del
            .push(old.dispatch.replacen("-A ", "-D ", 1));
        for c in &old.chains {
            nat.decl.push(c.clone());
            nat.remove.push(c.clone());
        }
    }
    for new in upserts {
        let old = have.get(&new.frontend.key());
        let line = dispatch_rule(new);
        let table = table_of(new);
        match old {
            Some(o) if o.table == table && o.dispatch == line => {}
            _ => {
                if let Some(o) = old {
                    pick(o.table, &mut nat, &mut filter)
                        .del
                        .push(o.dispatch.replacen("-A ", "-D ", 1));
                }
                pick(table, &mut nat, &mut filter).add.push(line);
            }
        }
        // A drifted frontend's chains are rewritten whole.
        let old_chains: HashMap<String, Vec<String>> = match old {
            Some(o) if !o.drifted => frontend_chains(&o.svc).into_iter().collect(),
            _ => HashMap::new(),
        };
        let new_chains = frontend_chains(new);
        for (c, rules) in &new_chains {
            if old_chains.get(c) != Some(rules) {
                nat.decl.push(c.clone());
                nat.rules.extend(rules.iter().cloned());
            }
        }
        for c in old.into_iter().flat_map(|o| &o.chains) {
            if !new_chains.iter().any(|(n, _)| n == c) {
                nat.decl.push(c.clone());
                nat.remove.push(c.clone());
            }
        }
    }
    let mut out = String::new();
    for (name, t) in [(NAT, &nat), (FILTER, &filter)] {
        if t.decl.is_empty() && t.del.is_empty() && t.add.is_empty() {
            continue;
        }
        let _ = writeln!(out, "*{name}");
        for c in &t.decl {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        for r in t.del.iter().chain(&t.rules).chain(&t.add) {
            out.push_str(r);
            out.push('\n');
        }
        for c in &t.remove {
            let _ = writeln!(out, "-X {c}");
        }
        out.push_str("COMMIT\n");
    }
    out
}

impl LbDataplane for IptLb {
    fn mode(&self) -> &'static str {
        "iptables"
    }

    fn apply(&mut self, plan: &LbPlan) -> Result<(), LbError> {
        for v6 in [false, true] {
            let upserts: Vec<&LbService> = plan
                .upserts
                .iter()
                .filter(|s| s.frontend.ip.is_ipv6() == v6)
                .map(|s| &**s)
                .collect();
            let deletes: Vec<FrontendKey> = plan
                .deletes
                .iter()
                .filter(|f| f.ip.is_ipv6() == v6)
                .map(Frontend::key)
                .collect();
            if upserts.is_empty() && deletes.is_empty() {
                continue;
            }
            let fam = &self.families[usize::from(v6)];
            let input = render_plan(&fam.frontends, &upserts, &deletes);
            if !input.is_empty() {
                self.restore(v6, &input)?;
            }
            let fam = &mut self.families[usize::from(v6)];
            for k in &deletes {
                fam.frontends.remove(k);
            }
            for s in upserts {
                fam.frontends
                    .insert(s.frontend.key(), Programmed::applied(s));
            }
        }
        super::purge_stale_udp(&plan.stale_backends, |s| self.runner.purge_udp(s));
        Ok(())
    }

    fn observed(&mut self) -> Result<Vec<LbService>, LbError> {
        Ok(self.read_back()?)
    }
}

#[cfg(test)]
mod tests;
