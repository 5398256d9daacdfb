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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::hash::Hasher as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};

use tracing::{debug, info, warn};

use super::conntrack;
use crate::services::lb::{
    Backend, BackendState, Frontend, FrontendKey, FrontendKind, LbDataplane, LbError, LbPlan,
    LbService, Proto,
};
use crate::shared::nfnl::{NfSocket, SUBSYS_NFTABLES};

/// The packet mark bit asking `TWILL-POSTROUTING` to masquerade (kube-proxy's bit).
pub const MASQ_MARK: u32 = 0x4000;
const SERVICES: &str = "TWILL-SERVICES";
const NODEPORTS: &str = "TWILL-NODEPORTS";
const POSTROUTING: &str = "TWILL-POSTROUTING";
const MARK_MASQ: &str = "TWILL-MARK-MASQ";
const PREFIX: &str = "TWILL-";
const SVC_PREFIX: &str = "TWILL-SVC-";
const SEP_PREFIX: &str = "TWILL-SEP-";
const NAT: &str = "nat";
const FILTER: &str = "filter";
/// The chains a frontend's dispatch rule can live in: (table, chain).
const DISPATCH: [(&str, &str); 3] = [(NAT, SERVICES), (NAT, NODEPORTS), (FILTER, SERVICES)];

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

    fn tool(self, v6: bool, what: &str) -> String {
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

fn run(tool: &str, args: &[&str], input: Option<&str>) -> Result<String, IptError> {
    let mut cmd = Command::new(tool);
    // A restore still running when twilld dies must not land after its successor's cleanup:
    // the child dies with the thread that waits for it (a killed restore commits nothing).
    // SAFETY: prctl is async-signal-safe and touches only the child's own state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = cmd.spawn().map_err(|source| IptError::Spawn {
        tool: tool.into(),
        source,
    })?;
    let mut write_error = None;
    if let Some(text) = input {
        let mut stdin = child.stdin.take().expect("piped");
        // A restore that rejects a line exits without reading the rest: its status and
        // stderr say why, the broken pipe does not.
        if let Err(e) = stdin.write_all(text.as_bytes())
            && e.kind() != std::io::ErrorKind::BrokenPipe
        {
            write_error = Some(e);
        }
    }
    let out = child.wait_with_output().map_err(|source| IptError::Spawn {
        tool: tool.into(),
        source,
    })?;
    if !out.status.success() {
        return Err(IptError::Failed {
            tool: tool.into(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    if let Some(source) = write_error {
        return Err(IptError::Spawn {
            tool: tool.into(),
            source,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Picks the backend: where `TWILL-` chains are, else where more rules are, else what
/// `iptables --version` says. Returns the backend and why.
pub fn detect_backend() -> (IptBackend, String) {
    let save = |b: IptBackend| -> String {
        [false, true]
            .iter()
            .filter_map(|v6| run(&b.tool(*v6, "save"), &[], None).ok())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (legacy, nft) = (save(IptBackend::Legacy), save(IptBackend::Nft));
    let ours = |s: &str| s.lines().any(|l| l.starts_with(":TWILL-"));
    let rules = |s: &str| s.lines().filter(|l| l.starts_with("-A")).count();
    let default = run("iptables", &["--version"], None).unwrap_or_default();
    choose_backend(
        (ours(&legacy), rules(&legacy)),
        (ours(&nft), rules(&nft)),
        &default,
    )
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
// Rendering (pure). Rules are written the way `iptables-save` prints them (option order,
// `--set-xmark`, probabilities to 11 places), so a faithful read-back compares as text.

fn fnv(data: &str) -> u64 {
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

fn host(ip: IpAddr) -> String {
    if ip.is_ipv6() {
        format!("{ip}/128")
    } else {
        format!("{ip}/32")
    }
}

fn proto(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

fn dest(ip: IpAddr, port: u16) -> String {
    if ip.is_ipv6() {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

fn mask(v6: bool) -> &'static str {
    if v6 {
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    } else {
        "255.255.255.255"
    }
}

/// The metadata comment of a frontend's dispatch rule.
pub fn comment(svc: &LbService) -> String {
    let mut flags = String::new();
    if svc.external_local {
        flags.push('e');
    }
    if svc.internal_local {
        flags.push('i');
    }
    if svc
        .backends
        .first()
        .is_some_and(|b| b.state == BackendState::ServingTerminating)
    {
        flags.push('t');
    }
    if flags.is_empty() {
        flags.push('-');
    }
    let aff = svc
        .affinity_timeout_secs
        .map_or_else(|| "-".to_string(), |s| s.to_string());
    let mut c = format!(
        "{} {} {flags} {aff} {}",
        svc.id,
        svc.frontend.kind.as_str(),
        svc.name
    );
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
fn masquerades(svc: &LbService, b: &Backend) -> bool {
    svc.frontend.kind != FrontendKind::ClusterIp && !svc.external_local && !b.node_local
}

/// Every endpoint is masqueraded: the SVC chain marks once, before the split.
fn masquerade_all(svc: &LbService) -> bool {
    !svc.backends.is_empty() && svc.backends.iter().all(|b| masquerades(svc, b))
}

/// Whether endpoint `b` needs a SEP chain: hairpin (on this node), affinity, or a masquerade
/// its siblings do not share.
fn needs_sep(svc: &LbService, b: &Backend, all_masq: bool) -> bool {
    b.node_local || svc.affinity_timeout_secs.is_some() || (masquerades(svc, b) && !all_masq)
}

/// Where a frontend's dispatch rule sends packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target<'a> {
    /// No endpoints: REJECT (filter table).
    Reject,
    /// The only endpoint, DNATed directly.
    Dnat(&'a Backend),
    /// The only endpoint, through its SEP chain.
    Sep(&'a Backend),
    /// The SVC chain.
    Svc,
}

fn target(svc: &LbService) -> Target<'_> {
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
fn table_of(svc: &LbService) -> &'static str {
    if svc.backends.is_empty() { FILTER } else { NAT }
}

fn dnat_to(p: Proto, b: &Backend) -> String {
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

fn sep_rules(svc: &LbService, b: &Backend, all_masq: bool) -> (String, Vec<String>) {
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
fn static_nat() -> Vec<(String, Vec<String>)> {
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
fn jumps() -> Vec<(&'static str, &'static str, String)> {
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
fn tokens(line: &str) -> Vec<String> {
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
fn same_rule(have: &str, want: &str) -> bool {
    have == want || signature(have) == signature(want)
}

fn same(have: &[&str], want: &[String]) -> bool {
    have.len() == want.len() && have.iter().zip(want).all(|(h, w)| same_rule(h, w))
}

// ---------------------------------------------------------------------------------------------
// Reading back (pure).

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

    fn rules(&self, table: &str, chain: &str) -> Option<&[&'a str]> {
        self.tables.get(table)?.get(chain).map(Vec::as_slice)
    }

    fn has(&self, table: &str, chain: &str) -> bool {
        self.rules(table, chain).is_some()
    }

    /// Our chains of `table`, sorted.
    fn ours(&self, table: &str) -> Vec<&'a str> {
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
    table: &'static str,
    /// Its dispatch rule as the kernel holds it (`-A ...`): what a `-D` must name.
    dispatch: String,
    /// Chains of ours that belong to it and exist (referenced or expected).
    chains: BTreeSet<String>,
    /// Its rules differ from what [`Programmed::svc`] renders to.
    pub drifted: bool,
}

impl Programmed {
    /// What a successful apply of `svc` leaves in the kernel.
    fn applied(svc: &LbService) -> Self {
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
    fn observed(&self) -> LbService {
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

type Meta = (u32, FrontendKind, bool, bool, bool, Option<u32>, String);

fn parse_comment(c: &str) -> Option<Meta> {
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

fn value_of<'t, S: AsRef<str>>(t: &'t [S], opt: &str) -> Option<&'t str> {
    t.iter()
        .position(|x| x.as_ref() == opt)
        .and_then(|i| t.get(i + 1))
        .map(AsRef::as_ref)
}

fn parse_dest(d: &str) -> Option<(IpAddr, u16)> {
    let (ip, port) = d.rsplit_once(':')?;
    let ip = ip.trim_start_matches('[').trim_end_matches(']');
    Some((ip.parse().ok()?, port.parse().ok()?))
}

/// The frontend a dispatch rule names, and its jump target: (key, metadata, `-j` target,
/// DNAT destination).
fn parse_dispatch(line: &str, v6: bool) -> Option<(FrontendKey, Meta, String, Option<String>)> {
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
fn follow_sep(saved: &Saved<'_>, sep: &str) -> Option<(IpAddr, u16, bool)> {
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

// ---------------------------------------------------------------------------------------------
// Telling "nothing changed" cheaply.

/// `IPT_SO_GET_INFO` / `IP6T_SO_GET_INFO` (`IPT_BASE_CTL`).
const SO_GET_INFO: libc::c_int = 64;
/// `IPT_SO_GET_ENTRIES` / `IP6T_SO_GET_ENTRIES`.
const SO_GET_ENTRIES: libc::c_int = 65;
/// `sizeof(struct ipt_getinfo)`: name[32], valid_hooks, hook_entry[5], underflow[5],
/// num_entries, size.
const GETINFO_LEN: usize = 84;
/// `sizeof(struct ipt_get_entries)`: name[32], size, then the 8-aligned entries.
const GET_ENTRIES_HDR: usize = 40;
/// `NFT_MSG_GETGEN` and `NFTA_GEN_ID`.
const MSG_GETGEN: u16 = 16;
const GEN_ID: u16 = 1;

/// Byte offsets in `struct ipt_entry` / `struct ip6t_entry`: (`next_offset`, `comefrom`, end of
/// `counters`). `comefrom` and the counters are what the kernel changes without a replace.
fn entry_layout(v6: bool) -> (usize, usize, usize) {
    if v6 { (142, 144, 168) } else { (90, 92, 112) }
}

/// Hashes an x_tables blob (the entries of `IPT_SO_GET_ENTRIES`) without what traffic and the
/// kernel change in place (`comefrom`, packet and byte counters). Pure.
pub fn blob_digest(blob: &[u8], v6: bool, h: &mut impl std::hash::Hasher) {
    let (next_at, comefrom_at, counters_end) = entry_layout(v6);
    let mut off = 0;
    while off < blob.len() {
        let e = &blob[off..];
        let next = e
            .get(next_at..next_at + 2)
            .map_or(0, |b| usize::from(u16::from_ne_bytes([b[0], b[1]])));
        if next < counters_end || next > e.len() {
            // Not an entry as we know it: hash the rest as it is.
            h.write(e);
            return;
        }
        h.write(&e[..comefrom_at]);
        h.write(&e[counters_end..next]);
        off += next;
    }
}

/// A digest of a legacy x_tables table of the calling thread's namespace (rules, not
/// counters), read with `getsockopt` on a raw socket (what `iptables-legacy-save` reads,
/// without formatting it), fed to `h`. A table that does not exist hashes as absent.
fn legacy_table_digest(
    v6: bool,
    table: &str,
    h: &mut impl std::hash::Hasher,
) -> std::io::Result<()> {
    let (domain, level) = if v6 {
        (libc::AF_INET6, libc::IPPROTO_IPV6)
    } else {
        (libc::AF_INET, libc::IPPROTO_IP)
    };
    // SAFETY: plain socket(2); the fd is owned right away.
    let raw = unsafe {
        libc::socket(
            domain,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let get = |opt: libc::c_int, buf: &mut [u8]| -> std::io::Result<()> {
        let mut len = libc::socklen_t::try_from(buf.len()).map_err(std::io::Error::other)?;
        // SAFETY: `buf` is valid for `len` bytes; the kernel writes at most that many.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                level,
                opt,
                buf.as_mut_ptr().cast(),
                &raw mut len,
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    h.write(table.as_bytes());
    for _ in 0..5 {
        let mut info = [0u8; GETINFO_LEN];
        info[..table.len()].copy_from_slice(table.as_bytes());
        match get(SO_GET_INFO, &mut info) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                h.write(b"absent");
                return Ok(());
            }
            r => r?,
        }
        let size = u32::from_ne_bytes([info[80], info[81], info[82], info[83]]);
        let mut buf = vec![0u8; GET_ENTRIES_HDR + size as usize];
        buf[..table.len()].copy_from_slice(table.as_bytes());
        buf[32..36].copy_from_slice(&size.to_ne_bytes());
        match get(SO_GET_ENTRIES, &mut buf) {
            // The table changed size between the two calls.
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
            r => r?,
        }
        // Hook entry points and underflows locate the built-in chains.
        h.write(&info[32..GETINFO_LEN]);
        blob_digest(&buf[GET_ENTRIES_HDR..], v6, h);
        return Ok(());
    }
    Err(std::io::Error::from_raw_os_error(libc::EAGAIN))
}

// ---------------------------------------------------------------------------------------------
// The dataplane.

/// What one family holds, as far as twill knows.
#[derive(Debug, Default, Clone)]
struct Family {
    /// Programmed frontends (as read back or applied).
    frontends: BTreeMap<FrontendKey, Programmed>,
    /// The change token taken before the last full read that found everything in order (see
    /// [`IptLb::change_token`]); cleared by any write of ours. While the kernel reports the same
    /// token, `frontends` is what the kernel holds.
    token: Option<u64>,
}

/// The iptables service dataplane.
#[derive(Debug)]
pub struct IptLb {
    backend: IptBackend,
    families: [Family; 2],
    ct: Option<NfSocket>,
}

impl IptLb {
    /// Opens the dataplane with `backend` (see [`detect_backend`]) in the calling thread's
    /// network namespace: installs the static chains and the jump rules if missing, and reads
    /// the rules back. Never flushes a chain it does not own.
    pub fn open(backend: IptBackend) -> Result<Self, IptError> {
        let mut lb = IptLb {
            backend,
            families: [Family::default(), Family::default()],
            ct: NfSocket::open().ok(),
        };
        lb.read_back()?;
        Ok(lb)
    }

    /// What twill's chains of the calling thread's namespace hold (both families), read
    /// without changing anything (for `twilld get services`); `None` when no backend has
    /// twill's chains.
    pub fn peek() -> Result<Option<(IptBackend, Vec<LbService>)>, IptError> {
        let (backend, _) = detect_backend();
        let lb = IptLb {
            backend,
            families: [Family::default(), Family::default()],
            ct: None,
        };
        let mut all = Vec::new();
        let mut found = false;
        for v6 in [false, true] {
            let text = lb.save(v6)?;
            let saved = Saved::parse(&text);
            found |= saved.has(NAT, SERVICES);
            all.extend(reconstruct(&saved, v6).services());
        }
        Ok(found.then_some((backend, all)))
    }

    /// The backend in use.
    pub fn backend(&self) -> IptBackend {
        self.backend
    }

    fn save(&self, v6: bool) -> Result<String, IptError> {
        let tool = self.backend.tool(v6, "save");
        let mut text = run(&tool, &["-t", NAT], None)?;
        text.push('\n');
        text.push_str(&run(&tool, &["-t", FILTER], None)?);
        Ok(text)
    }

    fn restore(&mut self, v6: bool, input: &str) -> Result<(), IptError> {
        debug!(v6, bytes = input.len(), "iptables-restore");
        // Whatever happens, what we knew of the kernel is no proof any more.
        self.families[usize::from(v6)].token = None;
        run(
            &self.backend.tool(v6, "restore"),
            &["--noflush", "-w", "5"],
            Some(input),
        )
        .map(|_| ())
    }

    /// A token that changes whenever a family's `nat` or `filter` table may have changed: the
    /// nf_tables ruleset generation (nft backend; any commit in the namespace advances it), or
    /// a digest of the two tables' rules without counters (legacy). `None` when it cannot be
    /// had: then every read is a full one.
    fn change_token(&mut self, v6: bool) -> Option<u64> {
        match self.backend {
            IptBackend::Nft => {
                let sock = self.ct.as_mut()?;
                let msgs = sock
                    .get((SUBSYS_NFTABLES << 8) | MSG_GETGEN, 0, |_| {})
                    .ok()?;
                msgs.iter()
                    .find_map(|m| m.attrs().get(GEN_ID).and_then(|a| a.u32_be().ok()))
                    .map(u64::from)
            }
            IptBackend::Legacy => {
                let mut h = std::hash::DefaultHasher::new();
                for table in [NAT, FILTER] {
                    if let Err(e) = legacy_table_digest(v6, table, &mut h) {
                        debug!(v6, table, error = %e, "x_tables digest unavailable");
                        return None;
                    }
                }
                Some(h.finish())
            }
        }
    }

    /// Reads both families back (unless a family's token says nothing changed since its last
    /// full read); repairs static chains, jump rules, dispatch chains and strays.
    fn read_back(&mut self) -> Result<Vec<LbService>, IptError> {
        let mut all = Vec::new();
        for v6 in [false, true] {
            let token = self.change_token(v6);
            let fam = &self.families[usize::from(v6)];
            if token.is_some() && token == fam.token {
                all.extend(fam.frontends.values().map(Programmed::observed));
                continue;
            }
            let text = self.save(v6)?;
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
        let mut removed = 0;
        for v6 in [false, true] {
            let tool = backend.tool(v6, "save");
            let text = format!(
                "{}\n{}",
                run(&tool, &["-t", NAT], None)?,
                run(&tool, &["-t", FILTER], None)?
            );
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
                run(
                    &backend.tool(v6, "restore"),
                    &["--noflush", "-w", "5"],
                    Some(&input),
                )?;
            }
        }
        Ok(removed)
    }
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
        if !plan.stale_backends.is_empty()
            && let Some(sock) = &mut self.ct
        {
            match conntrack::purge_udp(sock, &plan.stale_backends) {
                Ok(n) if n > 0 => {
                    debug!(
                        deleted = n,
                        "deleted UDP conntrack entries of removed backends"
                    );
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "delete UDP conntrack entries of removed backends"),
            }
        }
        Ok(())
    }

    fn observed(&mut self) -> Result<Vec<LbService>, LbError> {
        Ok(self.read_back()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::lb::plan;

    fn be(ip: &str, local: bool) -> Backend {
        Backend {
            ip: ip.parse().unwrap(),
            port: 8080,
            node_local: local,
            state: BackendState::Ready,
        }
    }

    fn svc(id: u32, ip: &str, kind: FrontendKind, backends: Vec<Backend>) -> LbService {
        LbService {
            id,
            name: format!("test/s{id}:http"),
            frontend: Frontend {
                ip: ip.parse().unwrap(),
                port: if kind == FrontendKind::NodePort {
                    30080
                } else {
                    80
                },
                proto: Proto::Tcp,
                kind,
            },
            backends,
            affinity_timeout_secs: None,
            external_local: false,
            internal_local: false,
        }
    }

    /// What `iptables-save -t nat; iptables-save -t filter` prints for `services` programmed
    /// (our chains only; rules grouped by chain as iptables-save groups them).
    fn saved_text(services: &[&LbService]) -> String {
        let mut chains: BTreeMap<(&str, String), Vec<String>> = BTreeMap::new();
        for (c, rules) in static_nat() {
            chains.insert((NAT, c), rules);
        }
        for (t, c) in DISPATCH {
            chains.insert((t, c.to_string()), Vec::new());
        }
        for s in services {
            let line = dispatch_rule(s);
            let chain = line.split(' ').nth(1).unwrap().to_string();
            chains.entry((table_of(s), chain)).or_default().push(line);
            for (c, rules) in frontend_chains(s) {
                chains.insert((NAT, c), rules);
            }
        }
        let mut text = String::new();
        for table in [NAT, FILTER] {
            let _ = writeln!(text, "*{table}");
            let _ = writeln!(text, ":PREROUTING ACCEPT [12:720]");
            for (t, c) in chains.keys() {
                if *t == table {
                    let _ = writeln!(text, ":{c} - [0:0]");
                }
            }
            for (t, chain, rule) in jumps() {
                if t == table {
                    let _ = writeln!(text, "-A {chain} {rule}");
                }
            }
            for ((t, _), rules) in &chains {
                if *t == table {
                    for r in rules {
                        let _ = writeln!(text, "{r}");
                    }
                }
            }
            text.push_str("COMMIT\n");
        }
        text
    }

    /// `text` with `from` replaced by `to` in the first rule of `chain` that holds it.
    fn with_line_edited(text: &str, chain: &str, from: &str, to: &str) -> String {
        let prefix = format!("-A {chain} ");
        let line = text
            .lines()
            .find(|l| l.starts_with(&prefix) && l.contains(from))
            .unwrap();
        text.replacen(line, &line.replacen(from, to, 1), 1)
    }

    fn chain_names(s: &LbService) -> Vec<String> {
        frontend_chains(s).into_iter().map(|(c, _)| c).collect()
    }

    #[test]
    fn mixed_nodeport_keeps_per_endpoint_masquerade_and_even_splits() {
        let s = svc(
            3,
            "0.0.0.0",
            FrontendKind::NodePort,
            vec![
                be("10.0.1.2", true),
                be("10.0.2.2", false),
                be("10.0.3.2", false),
            ],
        );
        let k = s.frontend.key();
        assert_eq!(
            dispatch_rule(&s),
            format!(
                "-A TWILL-NODEPORTS -p tcp -m comment --comment \"3 NodePort - - test/s3:http\" \
                 -m tcp --dport 30080 -j {}",
                svc_chain(&k)
            )
        );
        let chains = frontend_chains(&s);
        assert_eq!(chains.len(), 4);
        let svc_rules = &chains[0].1;
        assert_eq!(svc_rules.len(), 3);
        assert!(svc_rules[0].contains("--probability 0.33333333349"));
        assert!(svc_rules[1].contains("--probability 0.50000000000"));
        assert!(!svc_rules[2].contains("statistic"));
        // The local endpoint: hairpin, no masquerade; the remote ones: masquerade (policy
        // Cluster), no hairpin.
        assert_eq!(
            chains[1].1,
            vec![
                format!("-A {} -s 10.0.1.2/32 -j TWILL-MARK-MASQ", chains[1].0),
                format!(
                    "-A {} -p tcp -j DNAT --to-destination 10.0.1.2:8080",
                    chains[1].0
                ),
            ]
        );
        assert_eq!(
            chains[2].1,
            vec![
                format!("-A {} -j TWILL-MARK-MASQ", chains[2].0),
                format!(
                    "-A {} -p tcp -j DNAT --to-destination 10.0.2.2:8080",
                    chains[2].0
                ),
            ]
        );
        assert!(svc_chain(&k).len() <= 28);
        assert_eq!(probability(1), "1.00000000000");
    }

    #[test]
    fn chains_only_where_something_happens_per_endpoint() {
        // One remote endpoint: the dispatch rule DNATs, no chain.
        let one = svc(
            1,
            "10.96.0.1",
            FrontendKind::ClusterIp,
            vec![be("10.0.2.2", false)],
        );
        assert!(
            dispatch_rule(&one)
                .ends_with("-m tcp --dport 80 -j DNAT --to-destination 10.0.2.2:8080")
        );
        assert!(frontend_chains(&one).is_empty());
        // Ten remote endpoints: one SVC chain of ten DNAT rules.
        let ten: Vec<Backend> = (0..10).map(|i| be(&format!("10.0.2.{i}"), false)).collect();
        let many = svc(2, "10.96.0.2", FrontendKind::ClusterIp, ten.clone());
        let chains = frontend_chains(&many);
        assert_eq!(chains.len(), 1);
        assert_eq!(chains[0].1.len(), 10);
        assert!(
            chains[0]
                .1
                .iter()
                .all(|r| r.contains(" -p tcp ") && r.contains("-j DNAT"))
        );
        // External traffic to remote endpoints only: one mark before the split.
        let np = svc(3, "0.0.0.0", FrontendKind::NodePort, ten);
        let chains = frontend_chains(&np);
        assert_eq!(chains.len(), 1);
        assert_eq!(
            chains[0].1[0],
            format!("-A {} -j TWILL-MARK-MASQ", chains[0].0)
        );
        assert_eq!(chains[0].1.len(), 11);
        // One remote endpoint of a NodePort still needs the mark: an SVC chain.
        let np1 = svc(
            4,
            "0.0.0.0",
            FrontendKind::NodePort,
            vec![be("10.0.2.2", false)],
        );
        assert_eq!(frontend_chains(&np1)[0].1.len(), 2);
        // One local endpoint: straight to its SEP chain (hairpin).
        let local = svc(
            5,
            "10.96.0.5",
            FrontendKind::ClusterIp,
            vec![be("10.0.1.2", true)],
        );
        let k = local.frontend.key();
        let sep = sep_chain(&k, "10.0.1.2".parse().unwrap(), 8080);
        assert!(dispatch_rule(&local).ends_with(&format!("-j {sep}")));
        assert_eq!(chain_names(&local), vec![sep]);
        // Affinity: every endpoint has a SEP chain with `recent --set`, even a single one.
        let mut aff = svc(
            6,
            "10.96.0.6",
            FrontendKind::ClusterIp,
            vec![be("10.0.2.2", false)],
        );
        aff.affinity_timeout_secs = Some(60);
        let chains = frontend_chains(&aff);
        assert_eq!(chains.len(), 2);
        assert!(chains[0].1[0].contains("--rcheck --seconds 60 --reap"));
        assert!(chains[1].1[0].contains("-m recent --set"));
        // Policy Local: no masquerade, hairpin only.
        let mut etp = svc(
            7,
            "192.0.2.7",
            FrontendKind::ExternalIp,
            vec![be("10.0.1.2", true)],
        );
        etp.external_local = true;
        let chains = frontend_chains(&etp);
        assert_eq!(chains.len(), 1);
        assert_eq!(chains[0].1.len(), 2);
        assert!(chains[0].1[0].contains(" -s 10.0.1.2/32 "));
        // No endpoints: REJECT in filter, no chain.
        let none = svc(8, "10.96.0.8", FrontendKind::ClusterIp, vec![]);
        assert_eq!(table_of(&none), FILTER);
        assert!(dispatch_rule(&none).ends_with("-j REJECT --reject-with icmp-port-unreachable"));
        assert!(frontend_chains(&none).is_empty());
    }

    #[test]
    fn signatures_ignore_save_formatting() {
        assert_eq!(
            signature("-A X -j MARK --or-mark 0x4000"),
            signature("-A X -j MARK --set-xmark 0x4000/0x4000")
        );
        assert_eq!(
            signature("-A X -m statistic --mode random --probability 0.3333333333"),
            signature("-A X -m statistic --mode random --probability 0.33333333349")
        );
        assert_ne!(
            signature("-A X -j DNAT --to-destination 10.0.0.1:80"),
            signature("-A X -j DNAT --to-destination 10.0.0.2:80")
        );
        assert_eq!(
            tokens("-A X --comment \"a b\" -j Y"),
            vec!["-A", "X", "--comment", "a b", "-j", "Y"]
        );
        assert!(same_rule(
            "-A X -j MARK --set-xmark 0x4000/0x0",
            "-A X -j MARK --xor-mark 0x4000"
        ));
    }

    /// Every shape of the layout, v4 and v6.
    #[allow(clippy::many_single_char_names)]
    fn zoo() -> Vec<LbService> {
        let mut a = svc(
            1,
            "10.96.0.1",
            FrontendKind::ClusterIp,
            vec![be("10.0.1.2", true), be("10.0.2.2", false)],
        );
        a.affinity_timeout_secs = Some(60);
        let n = svc(
            2,
            "0.0.0.0",
            FrontendKind::NodePort,
            vec![be("10.0.1.2", true)],
        );
        let e = svc(3, "10.96.0.3", FrontendKind::ClusterIp, vec![]);
        let d = svc(
            4,
            "10.96.0.4",
            FrontendKind::ClusterIp,
            vec![be("10.0.2.4", false)],
        );
        let mut t = svc(
            5,
            "198.51.100.5",
            FrontendKind::LoadBalancer,
            vec![be("10.0.2.5", false), be("10.0.3.5", false)],
        );
        for b in &mut t.backends {
            b.state = BackendState::ServingTerminating;
        }
        let mut l = svc(
            6,
            "192.0.2.6",
            FrontendKind::ExternalIp,
            vec![be("10.0.1.6", true)],
        );
        l.external_local = true;
        let mut m = svc(
            7,
            "0.0.0.0",
            FrontendKind::NodePort,
            vec![be("10.0.1.7", true), be("10.0.2.7", false)],
        );
        m.frontend.port = 30082;
        let mut n7 = m.clone();
        n7.frontend.port = 30081;
        n7.id = 8;
        n7.backends.clear();
        let mut v6 = svc(
            9,
            "fd96::9",
            FrontendKind::ClusterIp,
            vec![be("fd00::2", true), be("fd00::3", false)],
        );
        v6.affinity_timeout_secs = Some(10800);
        let v6one = svc(
            10,
            "fd96::10",
            FrontendKind::ClusterIp,
            vec![be("fd00::4", false)],
        );
        vec![a, n, e, d, t, l, m, n7, v6, v6one]
    }

    fn family(services: &[LbService], v6: bool) -> Vec<&LbService> {
        services
            .iter()
            .filter(|s| s.frontend.ip.is_ipv6() == v6)
            .collect()
    }

    fn sorted(mut v: Vec<LbService>) -> Vec<LbService> {
        v.sort_by_key(|s| s.frontend.key());
        v
    }

    #[test]
    fn read_back_round_trips_every_shape() {
        let all = zoo();
        for v6 in [false, true] {
            let want = family(&all, v6);
            let text = saved_text(&want);
            let saved = Saved::parse(&text);
            let found = reconstruct(&saved, v6);
            assert!(found.stray.is_empty() && found.junk.is_empty(), "{found:?}");
            assert_eq!(
                sorted(found.services()),
                sorted(want.iter().map(|s| (*s).clone()).collect())
            );
            // In order: nothing to repair, and a plan against it is empty.
            assert_eq!(repair_input(&saved, &found), "");
            let have = found.frontends;
            for s in &want {
                let p = &have[&s.frontend.key()];
                assert!(!p.drifted);
                assert_eq!(p, &Programmed::applied(s));
            }
        }
    }

    #[test]
    fn read_back_detects_drift_strays_and_junk() {
        let all = zoo();
        let want = family(&all, false);
        let text = saved_text(&want);
        // A changed DNAT target reads back as that endpoint: the plan rewrites the frontend.
        let broken = text.replacen(
            "--to-destination 10.0.2.4:8080",
            "--to-destination 10.0.9.9:8080",
            1,
        );
        let found = reconstruct(&Saved::parse(&broken), false);
        let desired: Vec<LbService> = want.iter().map(|s| (*s).clone()).collect();
        let p = plan(&desired, &found.services());
        assert_eq!(p.upserts.len(), 1);
        assert_eq!(p.upserts[0].id, 4);
        assert_eq!(p.stale_backends.len(), 1);
        // A rule that renders from nothing the rules tell (a changed split) makes the frontend
        // drifted and nothing else.
        let chain = svc_chain(&want[0].frontend.key());
        let broken = with_line_edited(&text, &chain, "--probability 0.5", "--probability 0.9");
        let found = reconstruct(&Saved::parse(&broken), false);
        let drifted: Vec<u32> = found
            .frontends
            .values()
            .filter(|p| p.drifted)
            .map(|p| p.svc.id)
            .collect();
        assert_eq!(drifted, vec![1]);
        assert!(
            found
                .services()
                .iter()
                .any(|s| s.name == "test/s1:http (drifted)")
        );
        // A missing hairpin rule too (the endpoint then reads as remote).
        let sep = sep_chain(&want[1].frontend.key(), "10.0.1.2".parse().unwrap(), 8080);
        let broken = text.replace(&format!("-A {sep} -s 10.0.1.2/32 -j TWILL-MARK-MASQ\n"), "");
        let found = reconstruct(&Saved::parse(&broken), false);
        assert!(found.frontends[&want[1].frontend.key()].drifted);
        // A stray chain, a chain of ours someone else jumps to, a duplicate dispatch rule and
        // a foreign rule in a dispatch chain.
        let dup = dispatch_rule(want[3]);
        let extra = format!(
            "*nat\n:TWILL-SEP-0000000000000000 - [0:0]\n:TWILL-SVC-1111111111111111 - [0:0]\n\
             :FOREIGN - [0:0]\n-A FOREIGN -j TWILL-SVC-1111111111111111\n{dup}\n\
             -A TWILL-SERVICES -d 10.1.1.1/32 -j ACCEPT\nCOMMIT\n"
        );
        let text2 = format!("{text}{extra}");
        let saved = Saved::parse(&text2);
        let found = reconstruct(&saved, false);
        assert_eq!(
            found.stray,
            vec![(NAT, "TWILL-SEP-0000000000000000".to_string())]
        );
        assert_eq!(found.junk, vec![(NAT, SERVICES)]);
        assert!(found.frontends.values().all(|p| !p.drifted));
        let input = repair_input(&saved, &found);
        // TWILL-SERVICES is rewritten with exactly one rule per frontend it holds.
        assert!(input.contains(":TWILL-SERVICES - [0:0]\n"), "{input}");
        assert_eq!(input.matches(&dup).count(), 1, "{input}");
        let in_services = found
            .frontends
            .values()
            .filter(|p| p.table == NAT && p.dispatch.starts_with("-A TWILL-SERVICES "))
            .count();
        assert_eq!(input.matches("\n-A TWILL-SERVICES ").count(), in_services);
        assert!(input.contains("-X TWILL-SEP-0000000000000000\n"));
        assert!(!input.contains("TWILL-SVC-1111111111111111"));
        assert!(!input.contains("*filter"));
    }

    #[test]
    fn repair_restores_static_chains_and_jumps_in_order() {
        let text = "*nat\n:PREROUTING ACCEPT [0:0]\n:TWILL-MARK-MASQ - [0:0]\n\
                    -A PREROUTING -m comment --comment \"twill node ports\" -m addrtype \
                    --dst-type LOCAL -j TWILL-NODEPORTS\n\
                    -A TWILL-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\nCOMMIT\n";
        let saved = Saved::parse(text);
        let found = reconstruct(&saved, false);
        let input = repair_input(&saved, &found);
        for want in [
            ":TWILL-POSTROUTING - [0:0]\n",
            ":TWILL-SERVICES - [0:0]\n",
            ":TWILL-NODEPORTS - [0:0]\n",
            "-D PREROUTING -m comment --comment \"twill node ports\"",
            "-I PREROUTING 1 -m comment --comment \"twill service portals\" -j TWILL-SERVICES\n",
            "-I PREROUTING 2 -m comment --comment \"twill node ports\"",
            "-I POSTROUTING 1 ",
            "*filter\n:TWILL-SERVICES - [0:0]\n",
            "-I FORWARD 1 ",
        ] {
            assert!(input.contains(want), "{want} missing:\n{input}");
        }
        // The static chain in order is left as it is.
        assert!(!input.contains(":TWILL-MARK-MASQ"));
    }

    fn programmed(services: &[&LbService]) -> BTreeMap<FrontendKey, Programmed> {
        services
            .iter()
            .map(|s| (s.frontend.key(), Programmed::applied(s)))
            .collect()
    }

    #[test]
    fn partial_sync_rewrites_only_changed_chains() {
        let a = svc(
            1,
            "10.96.0.1",
            FrontendKind::ClusterIp,
            vec![be("10.0.1.2", true), be("10.0.2.2", false)],
        );
        let b = svc(
            2,
            "10.96.0.2",
            FrontendKind::ClusterIp,
            vec![be("10.0.2.3", false), be("10.0.2.4", false)],
        );
        let have = programmed(&[&a, &b]);
        let k = a.frontend.key();
        // a loses its local endpoint: the SEP chain goes, the dispatch rule now DNATs.
        let mut a2 = a.clone();
        a2.backends.remove(0);
        let p = plan(&[a2.clone(), b.clone()], &[a.clone(), b.clone()]);
        let ups: Vec<&LbService> = p.upserts.iter().map(|s| &**s).collect();
        let input = render_plan(&have, &ups, &[]);
        let sep = sep_chain(&k, "10.0.1.2".parse().unwrap(), 8080);
        let mut gone = [svc_chain(&k), sep.clone()];
        gone.sort();
        assert_eq!(
            input,
            format!(
                "*nat\n:{c0} - [0:0]\n:{c1} - [0:0]\n{del}\n{add}\n-X {c0}\n-X {c1}\nCOMMIT\n",
                c0 = gone[0],
                c1 = gone[1],
                del = dispatch_rule(&a).replacen("-A ", "-D ", 1),
                add = dispatch_rule(&a2),
            )
        );
        // b's endpoint changes: only its SVC chain is rewritten, the dispatch rule stays.
        let mut b2 = b.clone();
        b2.backends[1].port = 9090;
        let input = render_plan(&have, &[&b2], &[]);
        let kb = b.frontend.key();
        assert!(input.starts_with(&format!("*nat\n:{} - [0:0]\n", svc_chain(&kb))));
        assert!(!input.contains("TWILL-SERVICES"));
        assert_eq!(input.lines().count(), 5, "{input}");
        // Losing every endpoint moves the frontend to a REJECT rule in filter.
        let mut gone = b.clone();
        gone.backends.clear();
        let input = render_plan(&have, &[&gone], &[]);
        assert!(input.contains("-D TWILL-SERVICES -d 10.96.0.2/32"));
        assert!(input.contains(&format!("-X {}", svc_chain(&kb))));
        assert!(input.contains("*filter\n-A TWILL-SERVICES -d 10.96.0.2/32"));
        assert!(input.contains("-j REJECT --reject-with icmp-port-unreachable"));
        // Deleting removes the rule and every chain.
        let input = render_plan(&have, &[], &[k]);
        assert!(input.contains(&dispatch_rule(&a).replacen("-A ", "-D ", 1)));
        assert!(input.contains(&format!("-X {sep}")));
        // A new service: its chains, then its dispatch rule.
        let input = render_plan(&BTreeMap::new(), &[&b], &[]);
        let svc_at = input.find(&format!("-A {}", svc_chain(&kb))).unwrap();
        assert!(svc_at < input.find("-A TWILL-SERVICES").unwrap());
    }

    #[test]
    fn drifted_frontend_is_rewritten_from_what_the_kernel_holds() {
        let all = zoo();
        let want = family(&all, false);
        let text = saved_text(&want);
        // Someone edited a's dispatch rule (another comment) and an SVC rule.
        let a = want[0];
        let k = a.frontend.key();
        let broken = with_line_edited(
            &text,
            &svc_chain(&k),
            "--probability 0.5",
            "--probability 0.9",
        )
        .replace(
            "\"1 ClusterIP - 60 test/s1:http\"",
            "\"1 ClusterIP - 60 test/edited\"",
        );
        let found = reconstruct(&Saved::parse(&broken), false);
        let p = &found.frontends[&k];
        assert!(p.drifted);
        assert_eq!(p.svc.name, "test/edited");
        // The plan upserts it; the input deletes the rule as the kernel holds it (a `-D` of
        // anything else would fail the whole restore) and rewrites every chain.
        let pl = plan(std::slice::from_ref(a), &found.services());
        assert_eq!(pl.upserts.len(), 1);
        let input = render_plan(&found.frontends, &[a], &[]);
        assert!(input.contains("-D TWILL-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment \"1 ClusterIP - 60 test/edited\""), "{input}");
        for c in chain_names(a) {
            assert!(input.contains(&format!(":{c} - [0:0]")), "{c}: {input}");
        }
        assert!(input.contains(&dispatch_rule(a)));
        // Applied, the kernel holds exactly what the service renders to.
        let mut after = found.frontends.clone();
        after.insert(k, Programmed::applied(a));
        assert_eq!(after[&k], Programmed::applied(a));
    }

    #[test]
    fn blob_digest_ignores_counters_not_rules() {
        // Two fake ipt_entry records (112-byte header + 8 bytes of target).
        let entry = |dst: u8, pcnt: u64| {
            let mut e = vec![0u8; 120];
            e[4] = dst;
            e[88..90].copy_from_slice(&112u16.to_ne_bytes());
            e[90..92].copy_from_slice(&120u16.to_ne_bytes());
            e[92..96].copy_from_slice(&7u32.to_ne_bytes());
            e[96..104].copy_from_slice(&pcnt.to_ne_bytes());
            e[112] = 0xAB;
            e
        };
        let digest = |blob: &[u8], v6| {
            let mut h = std::hash::DefaultHasher::new();
            blob_digest(blob, v6, &mut h);
            h.finish()
        };
        let a = [entry(1, 0), entry(2, 5)].concat();
        let b = [entry(1, 999), entry(2, 6)].concat();
        let c = [entry(1, 0), entry(3, 5)].concat();
        assert_eq!(digest(&a, false), digest(&b, false));
        assert_ne!(digest(&a, false), digest(&c, false));
        // A target byte changes the digest too.
        let mut d = a.clone();
        d[120 + 112] = 0xAC;
        assert_ne!(digest(&a, false), digest(&d, false));
        // Garbage does not loop or panic.
        let _ = digest(&[0u8; 7], true);
        let _ = digest(&[0xffu8; 300], true);
    }

    #[test]
    fn backend_choice_never_mixes() {
        assert_eq!(
            choose_backend((true, 5), (false, 100), "").0,
            IptBackend::Legacy
        );
        assert_eq!(choose_backend((false, 5), (true, 0), "").0, IptBackend::Nft);
        assert_eq!(
            choose_backend((false, 50), (false, 3), "").0,
            IptBackend::Legacy
        );
        assert_eq!(
            choose_backend((false, 0), (false, 0), "iptables v1.8.9 (nf_tables)").0,
            IptBackend::Nft
        );
        assert_eq!(
            choose_backend((false, 0), (false, 0), "iptables v1.8.9 (legacy)").0,
            IptBackend::Legacy
        );
    }
}
