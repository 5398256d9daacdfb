//! The iptables service dataplane ([`IptLb`]): kube-proxy's chain layout, applied with one
//! `iptables-restore --noflush` per family and sync.
//!
//! Layout (table `nat` unless noted; `x` = a hash of the frontend, `y` = of frontend + endpoint):
//! ```text
//! PREROUTING, OUTPUT   -j TWILL-SERVICES ; -m addrtype --dst-type LOCAL -j TWILL-NODEPORTS
//! POSTROUTING          -j TWILL-POSTROUTING
//! TWILL-SERVICES       -d VIP -p tcp --dport 80 -j TWILL-SVC-x          one per frontend
//! TWILL-NODEPORTS      -p tcp --dport 30080 -j TWILL-SVC-x              one per NodePort
//! TWILL-SVC-x          [-m recent --rcheck --seconds T --reap --name TWILL-SEP-y -j TWILL-SEP-y]
//!                      -m statistic --mode random --probability 1/(n-k) -j TWILL-SEP-y ...
//! TWILL-SEP-y          -s EP -j TWILL-MARK-MASQ                          hairpin
//!                      [-j TWILL-MARK-MASQ]      external, ETP Cluster, endpoint on another node
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
//! - **One `iptables-restore --noflush` per family per sync, and partial syncs.** Declaring a
//!   chain in a `--noflush` restore flushes it, so a sync declares exactly the chains it rewrites
//!   (the changed frontends' SVC and SEP chains) and edits the dispatch chains rule by rule
//!   (`-D` of the old rule, `-A` of the new one); nothing else is touched, and every change of a
//!   sync lands in one table commit. Built-in chains only get our jump rules, inserted once.
//! - **Never mix backends.** The backend (legacy or nft) is chosen once, at open: the one that
//!   already holds `TWILL-` chains (a restart), else the one holding more rules (the node's
//!   other software), else the one `iptables --version` names; v4 and v6 use the same one.
//!   iptables-nft-restore is ~30x slower than legacy at 10k services (measured here), so the
//!   choice shows in the log.
//! - **Read back from `iptables-save`**: the frontend's id, kind, name and flags are the comment
//!   of its dispatch rule, the endpoints are the SEP chains' DNAT targets; every chain is
//!   compared (rule by rule, on the fields that matter, so iptables-save's normalisations do
//!   not count) with what would be rendered, and a difference marks the frontend drifted so the
//!   next plan rewrites it. A restart therefore rewrites nothing that still matches.
//! - UDP conntrack entries of removed backends are deleted after each apply
//!   ([`super::conntrack`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};

use tracing::{debug, info, warn};

use super::conntrack;
use super::lb::{
    Backend, BackendState, Frontend, FrontendKey, FrontendKind, LbDataplane, LbError, LbPlan,
    LbService, Proto,
};
use super::nfnl::NfSocket;

/// The packet mark bit asking `TWILL-POSTROUTING` to masquerade (kube-proxy's bit).
pub const MASQ_MARK: u32 = 0x4000;
const SERVICES: &str = "TWILL-SERVICES";
const NODEPORTS: &str = "TWILL-NODEPORTS";
const POSTROUTING: &str = "TWILL-POSTROUTING";
const MARK_MASQ: &str = "TWILL-MARK-MASQ";
const PREFIX: &str = "TWILL-";

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
    if let Some(text) = input {
        let mut stdin = child.stdin.take().expect("piped");
        stdin
            .write_all(text.as_bytes())
            .map_err(|source| IptError::Spawn {
                tool: tool.into(),
                source,
            })?;
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
// Rendering (pure).

fn fnv(data: &str) -> u64 {
    data.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The SVC chain of a frontend.
pub fn svc_chain(key: &FrontendKey) -> String {
    format!("TWILL-SVC-{:016X}", fnv(&key.to_string()))
}

/// The SEP chain of one endpoint of a frontend.
pub fn sep_chain(key: &FrontendKey, ip: IpAddr, port: u16) -> String {
    format!("TWILL-SEP-{:016X}", fnv(&format!("{key} {ip} {port}")))
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

fn masquerades(svc: &LbService, b: &Backend) -> bool {
    svc.frontend.kind != FrontendKind::ClusterIp && !svc.external_local && !b.node_local
}

/// The dispatch rule of a frontend (nat `TWILL-SERVICES`/`TWILL-NODEPORTS`, or filter
/// `TWILL-SERVICES` with REJECT when it has no endpoints), as `-A ...` arguments.
pub fn dispatch_rule(svc: &LbService) -> String {
    let k = svc.frontend.key();
    let np = svc.frontend.kind == FrontendKind::NodePort;
    let mut r = String::from("-A ");
    r.push_str(if np && !svc.backends.is_empty() {
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
    if np && svc.backends.is_empty() {
        r.push_str(" -m addrtype --dst-type LOCAL");
    }
    let _ = write!(r, " -m {p} --dport {}", k.port, p = proto(k.proto));
    if svc.backends.is_empty() {
        let _ = write!(
            r,
            " -j REJECT --reject-with {}",
            if k.ip.is_ipv6() {
                "icmp6-port-unreachable"
            } else {
                "icmp-port-unreachable"
            }
        );
    } else {
        let _ = write!(r, " -j {}", svc_chain(&k));
    }
    r
}

/// The chains of a frontend with endpoints and their rules: (chain, `-A` lines).
pub fn frontend_chains(svc: &LbService) -> Vec<(String, Vec<String>)> {
    let k = svc.frontend.key();
    let n = svc.backends.len();
    if n == 0 {
        return Vec::new();
    }
    let svc_name = svc_chain(&k);
    let mask = if k.ip.is_ipv6() {
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    } else {
        "255.255.255.255"
    };
    let mut rules = Vec::new();
    let mut out = Vec::new();
    if let Some(secs) = svc.affinity_timeout_secs {
        for b in &svc.backends {
            let sep = sep_chain(&k, b.ip, b.port);
            rules.push(format!(
                "-A {svc_name} -m comment --comment \"{}\" -m recent --rcheck --seconds {secs} \
                 --reap --name {sep} --mask {mask} --rsource -j {sep}",
                dest(b.ip, b.port)
            ));
        }
    }
    for (i, b) in svc.backends.iter().enumerate() {
        let sep = sep_chain(&k, b.ip, b.port);
        let stat = if i + 1 < n {
            format!(
                " -m statistic --mode random --probability {}",
                probability(n - i)
            )
        } else {
            String::new()
        };
        rules.push(format!(
            "-A {svc_name} -m comment --comment \"{}\"{stat} -j {sep}",
            dest(b.ip, b.port)
        ));
        let mut sep_rules = vec![format!("-A {sep} -s {} -j {MARK_MASQ}", host(b.ip))];
        if masquerades(svc, b) {
            sep_rules.push(format!("-A {sep} -j {MARK_MASQ}"));
        }
        if svc.affinity_timeout_secs.is_some() {
            sep_rules.push(format!(
                "-A {sep} -m recent --set --name {sep} --mask {mask} --rsource"
            ));
        }
        sep_rules.push(format!(
            "-A {sep} -p {p} -m comment --comment \"{}\" -m {p} -j DNAT --to-destination {}",
            if b.node_local { "local" } else { "remote" },
            dest(b.ip, b.port),
            p = proto(k.proto)
        ));
        out.push((sep, sep_rules));
    }
    out.insert(0, (svc_name, rules));
    out
}

/// The static chains (nat and filter) and the jump rules into built-in chains.
fn static_nat() -> Vec<(String, Vec<String>)> {
    vec![
        (
            MARK_MASQ.into(),
            vec![format!("-A {MARK_MASQ} -j MARK --or-mark {MASQ_MARK:#x}")],
        ),
        (
            POSTROUTING.into(),
            vec![
                format!(
                    "-A {POSTROUTING} -m mark ! --mark {MASQ_MARK:#x}/{MASQ_MARK:#x} -j RETURN"
                ),
                format!("-A {POSTROUTING} -j MARK --xor-mark {MASQ_MARK:#x}"),
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
            "nat",
            chain,
            format!("-m comment --comment \"twill service portals\" -j {SERVICES}"),
        ));
        out.push((
            "nat",
            chain,
            format!(
                "-m comment --comment \"twill node ports\" -m addrtype --dst-type LOCAL -j {NODEPORTS}"
            ),
        ));
    }
    out.push((
        "nat",
        "POSTROUTING",
        format!("-m comment --comment \"twill masquerade\" -j {POSTROUTING}"),
    ));
    for chain in ["INPUT", "FORWARD", "OUTPUT"] {
        out.push((
            "filter",
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

// ---------------------------------------------------------------------------------------------
// Reading back (pure).

/// One family's `iptables-save` output, parsed: chains by table, rules by table and chain.
#[derive(Debug, Default, Clone)]
pub struct Saved {
    chains: BTreeMap<(String, String), Vec<String>>,
}

impl Saved {
    /// Parses `iptables-save` output.
    pub fn parse(text: &str) -> Saved {
        let mut s = Saved::default();
        let mut table = String::new();
        for line in text.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = t.to_string();
            } else if let Some(c) = line.strip_prefix(':') {
                let name = c.split_whitespace().next().unwrap_or_default();
                s.chains.entry((table.clone(), name.into())).or_default();
            } else if line.starts_with("-A ") {
                let chain = line.split_whitespace().nth(1).unwrap_or_default();
                s.chains
                    .entry((table.clone(), chain.into()))
                    .or_default()
                    .push(line.to_string());
            }
        }
        s
    }

    fn rules(&self, table: &str, chain: &str) -> Option<&Vec<String>> {
        self.chains.get(&(table.to_string(), chain.to_string()))
    }

    fn ours(&self, table: &str) -> impl Iterator<Item = &str> {
        self.chains
            .keys()
            .filter(move |(t, c)| t == table && c.starts_with(PREFIX))
            .map(|(_, c)| c.as_str())
    }
}

fn same(a: &[String], b: &[String]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| signature(x) == signature(y))
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

fn value_of(t: &[String], opt: &str) -> Option<String> {
    t.iter()
        .position(|x| x == opt)
        .and_then(|i| t.get(i + 1).cloned())
}

fn parse_dest(d: &str) -> Option<(IpAddr, u16)> {
    let (ip, port) = d.rsplit_once(':')?;
    let ip = ip.trim_start_matches('[').trim_end_matches(']');
    Some((ip.parse().ok()?, port.parse().ok()?))
}

/// Rebuilds the services one family's rules hold (drifted ones get a ` (drifted)` name suffix)
/// and lists chains of ours that belong to no frontend.
pub fn reconstruct(saved: &Saved, v6: bool) -> (Vec<LbService>, Vec<String>) {
    let mut services = Vec::new();
    let mut used: BTreeSet<String> = [SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ]
        .into_iter()
        .map(String::from)
        .collect();
    let dispatch = [("nat", SERVICES), ("nat", NODEPORTS), ("filter", SERVICES)];
    for (table, chain) in dispatch {
        for line in saved.rules(table, chain).into_iter().flatten() {
            let t = tokens(line);
            let Some(c) = value_of(&t, "--comment") else {
                continue;
            };
            let Some((id, kind, el, il, term, aff, name)) = parse_comment(&c) else {
                continue;
            };
            let Some(port) = value_of(&t, "--dport").and_then(|p| p.parse().ok()) else {
                continue;
            };
            let proto = match value_of(&t, "-p").as_deref() {
                Some("tcp") => Proto::Tcp,
                Some("udp") => Proto::Udp,
                _ => continue,
            };
            let ip = match value_of(&t, "-d") {
                Some(d) => match d.split('/').next().and_then(|a| a.parse().ok()) {
                    Some(ip) => ip,
                    None => continue,
                },
                None => Frontend::any_addr(v6),
            };
            let key = FrontendKey { ip, port, proto };
            let state = if term {
                BackendState::ServingTerminating
            } else {
                BackendState::Ready
            };
            let mut backends = Vec::new();
            if table == "nat" {
                let svc_name = svc_chain(&key);
                used.insert(svc_name.clone());
                for r in saved.rules("nat", &svc_name).into_iter().flatten() {
                    let rt = tokens(r);
                    if rt.iter().any(|x| x == "--rcheck") {
                        continue;
                    }
                    let Some((bip, bport)) =
                        value_of(&rt, "--comment").and_then(|d| parse_dest(&d))
                    else {
                        continue;
                    };
                    let sep = sep_chain(&key, bip, bport);
                    used.insert(sep.clone());
                    let local = saved
                        .rules("nat", &sep)
                        .into_iter()
                        .flatten()
                        .any(|l| value_of(&tokens(l), "--comment").as_deref() == Some("local"));
                    backends.push(Backend {
                        ip: bip,
                        port: bport,
                        node_local: local,
                        state,
                    });
                }
            }
            let mut svc = LbService {
                id,
                name,
                frontend: Frontend {
                    ip,
                    port,
                    proto,
                    kind,
                },
                backends,
                affinity_timeout_secs: aff,
                external_local: el,
                internal_local: il,
            };
            let faithful = same(std::slice::from_ref(line), &[dispatch_rule(&svc)])
                && frontend_chains(&svc)
                    .iter()
                    .all(|(c, rules)| saved.rules("nat", c).is_some_and(|have| same(have, rules)));
            if !faithful {
                svc.name.push_str(" (drifted)");
            }
            services.push(svc);
        }
    }
    let stray = saved
        .ours("nat")
        .filter(|c| !used.contains(*c))
        .map(String::from)
        .collect();
    (services, stray)
}

// ---------------------------------------------------------------------------------------------
// The dataplane.

/// What one family holds, as far as twill knows.
#[derive(Debug, Default, Clone)]
struct Family {
    /// Programmed frontends (as read back or applied).
    frontends: BTreeMap<FrontendKey, LbService>,
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
            let saved = lb.save(v6)?;
            found |= saved.rules("nat", SERVICES).is_some();
            all.extend(reconstruct(&saved, v6).0);
        }
        Ok(found.then_some((backend, all)))
    }

    /// The backend in use.
    pub fn backend(&self) -> IptBackend {
        self.backend
    }

    fn save(&self, v6: bool) -> Result<Saved, IptError> {
        let tool = self.backend.tool(v6, "save");
        let nat = run(&tool, &["-t", "nat"], None)?;
        let filter = run(&tool, &["-t", "filter"], None)?;
        Ok(Saved::parse(&format!("{nat}\n{filter}")))
    }

    fn restore(&self, v6: bool, input: &str) -> Result<(), IptError> {
        debug!(v6, bytes = input.len(), "iptables-restore");
        run(
            &self.backend.tool(v6, "restore"),
            &["--noflush", "-w", "5"],
            Some(input),
        )
        .map(|_| ())
    }

    /// Reads both families back; repairs static chains, jump rules and strays.
    fn read_back(&mut self) -> Result<Vec<LbService>, IptError> {
        let mut all = Vec::new();
        for v6 in [false, true] {
            let saved = self.save(v6)?;
            let (services, stray) = reconstruct(&saved, v6);
            let mut nat = String::new();
            let mut filter = String::new();
            for (chain, rules) in static_nat() {
                if saved
                    .rules("nat", &chain)
                    .is_none_or(|have| !same(have, &rules))
                {
                    let _ = writeln!(nat, ":{chain} - [0:0]");
                    for r in rules {
                        let _ = writeln!(nat, "{r}");
                    }
                }
            }
            for (table, chain) in [("nat", SERVICES), ("nat", NODEPORTS), ("filter", SERVICES)] {
                if saved.rules(table, chain).is_none() {
                    let out = if table == "nat" {
                        &mut nat
                    } else {
                        &mut filter
                    };
                    let _ = writeln!(out, ":{chain} - [0:0]");
                }
            }
            // Our jumps go first in each built-in chain, in order; if one is missing, the
            // present ones are removed and all are inserted again (one commit, no gap).
            let mut groups: BTreeMap<(&str, &str), Vec<String>> = BTreeMap::new();
            for (table, chain, rule) in jumps() {
                groups.entry((table, chain)).or_default().push(rule);
            }
            for ((table, chain), rules) in groups {
                let present = |rule: &str| {
                    let want = format!("-A {chain} {rule}");
                    saved
                        .rules(table, chain)
                        .is_some_and(|have| have.iter().any(|h| signature(h) == signature(&want)))
                };
                if rules.iter().all(|r| present(r)) {
                    continue;
                }
                let out = if table == "nat" {
                    &mut nat
                } else {
                    &mut filter
                };
                for r in rules.iter().filter(|r| present(r)) {
                    let _ = writeln!(out, "-D {chain} {r}");
                }
                for (i, r) in rules.iter().enumerate() {
                    let _ = writeln!(out, "-I {chain} {} {r}", i + 1);
                }
            }
            for c in &stray {
                let _ = writeln!(nat, ":{c} - [0:0]");
            }
            for c in &stray {
                let _ = writeln!(nat, "-X {c}");
            }
            let mut input = String::new();
            for (table, body) in [("nat", &nat), ("filter", &filter)] {
                if !body.is_empty() {
                    let _ = write!(input, "*{table}\n{body}COMMIT\n");
                }
            }
            if !input.is_empty() {
                info!(v6, stray = stray.len(), "repairing iptables chains");
                self.restore(v6, &input)?;
            }
            let fam = &mut self.families[usize::from(v6)];
            fam.frontends = services
                .iter()
                .map(|s| (s.frontend.key(), s.clone()))
                .collect();
            all.extend(services);
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
            let saved = Saved::parse(&format!(
                "{}\n{}",
                run(&tool, &["-t", "nat"], None)?,
                run(&tool, &["-t", "filter"], None)?
            ));
            let mut input = String::new();
            for table in ["nat", "filter"] {
                let ours: Vec<&str> = saved.ours(table).collect();
                if ours.is_empty() {
                    continue;
                }
                let _ = writeln!(input, "*{table}");
                for (t, chain, rule) in jumps() {
                    if t == table
                        && saved.rules(t, chain).is_some_and(|have| {
                            have.iter()
                                .any(|h| signature(h) == signature(&format!("-A {chain} {rule}")))
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

/// The `iptables-restore` input for one family that applies a plan's part of that family.
pub fn render_plan(
    have: &BTreeMap<FrontendKey, LbService>,
    upserts: &[&LbService],
    deletes: &[FrontendKey],
) -> String {
    let mut nat_decl = Vec::new();
    let mut nat_rules = Vec::new();
    let mut nat_delete_chains = BTreeSet::new();
    let mut filter_rules = Vec::new();
    let dispatch = |old: Option<&LbService>,
                    new: Option<&LbService>,
                    nat_rules: &mut Vec<String>,
                    filter_rules: &mut Vec<String>| {
        let old_rule = old.map(dispatch_rule);
        let new_rule = new.map(dispatch_rule);
        if old_rule == new_rule {
            return;
        }
        for (rule, svc, del) in [(old_rule, old, true), (new_rule, new, false)] {
            let (Some(rule), Some(svc)) = (rule, svc) else {
                continue;
            };
            let line = if del {
                rule.replacen("-A ", "-D ", 1)
            } else {
                rule
            };
            if svc.backends.is_empty() {
                filter_rules.push(line);
            } else {
                nat_rules.push(line);
            }
        }
    };
    let chains_of = |svc: Option<&LbService>| -> BTreeMap<String, Vec<String>> {
        svc.map(frontend_chains)
            .unwrap_or_default()
            .into_iter()
            .collect()
    };
    for key in deletes {
        let old = have.get(key);
        dispatch(old, None, &mut nat_rules, &mut filter_rules);
        for c in chains_of(old).into_keys() {
            nat_decl.push(c.clone());
            nat_delete_chains.insert(c);
        }
    }
    for new in upserts {
        let old = have.get(&new.frontend.key());
        dispatch(old, Some(new), &mut nat_rules, &mut filter_rules);
        let old_chains = chains_of(old);
        let new_chains = chains_of(Some(new));
        for (c, rules) in &new_chains {
            if old_chains.get(c) != Some(rules) {
                nat_decl.push(c.clone());
                nat_rules.extend(rules.iter().cloned());
            }
        }
        for c in old_chains.keys() {
            if !new_chains.contains_key(c) {
                nat_decl.push(c.clone());
                nat_delete_chains.insert(c.clone());
            }
        }
    }
    let mut out = String::new();
    if !nat_decl.is_empty() || !nat_rules.is_empty() {
        out.push_str("*nat\n");
        for c in &nat_decl {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        // Deletions of dispatch rules first, then additions, then chain removals.
        for r in nat_rules.iter().filter(|r| r.starts_with("-D ")) {
            let _ = writeln!(out, "{r}");
        }
        for r in nat_rules.iter().filter(|r| r.starts_with("-A ")) {
            let _ = writeln!(out, "{r}");
        }
        for c in &nat_delete_chains {
            let _ = writeln!(out, "-X {c}");
        }
        out.push_str("COMMIT\n");
    }
    if !filter_rules.is_empty() {
        out.push_str("*filter\n");
        for r in filter_rules.iter().filter(|r| r.starts_with("-D ")) {
            let _ = writeln!(out, "{r}");
        }
        for r in filter_rules.iter().filter(|r| r.starts_with("-A ")) {
            let _ = writeln!(out, "{r}");
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
                fam.frontends.insert(s.frontend.key(), s.clone());
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

    /// What iptables-save prints for rules we wrote (its normalisations applied).
    fn as_saved(rules: &[String]) -> Vec<String> {
        rules
            .iter()
            .map(|r| {
                r.replace("--or-mark 0x4000", "--set-xmark 0x4000/0x4000")
                    .replace("--comment \"local\"", "--comment local")
            })
            .collect()
    }

    #[test]
    fn kube_proxy_layout_with_even_splits() {
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
        assert_eq!(
            dispatch_rule(&s),
            format!(
                "-A TWILL-NODEPORTS -p tcp -m comment --comment \"3 NodePort - - test/s3:http\" \
                 -m tcp --dport 30080 -j {}",
                svc_chain(&s.frontend.key())
            )
        );
        let chains = frontend_chains(&s);
        assert_eq!(chains.len(), 4);
        let svc_rules = &chains[0].1;
        assert!(svc_rules[0].contains("--probability 0.33333333349"));
        assert!(svc_rules[1].contains("--probability 0.50000000000"));
        assert!(!svc_rules[2].contains("statistic"));
        // The local endpoint is not masqueraded; the remote ones are (ETP Cluster).
        assert_eq!(chains[1].1.len(), 2);
        assert_eq!(chains[2].1.len(), 3);
        assert!(chains[2].1[1].ends_with("-j TWILL-MARK-MASQ"));
        assert!(chains[1].1[1].ends_with("-j DNAT --to-destination 10.0.1.2:8080"));
        assert!(svc_chain(&s.frontend.key()).len() <= 28);
        assert_eq!(probability(1), "1.00000000000");
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
    }

    #[test]
    fn read_back_round_trips_and_detects_drift() {
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
        let mut text = String::from("*nat\n");
        for s in [&a, &n] {
            text.push_str(&dispatch_rule(s));
            text.push('\n');
            for (c, rules) in frontend_chains(s) {
                let _ = writeln!(text, ":{c} - [0:0]");
                for r in as_saved(&rules) {
                    let _ = writeln!(text, "{r}");
                }
            }
        }
        let _ = write!(text, "COMMIT\n*filter\n{}\nCOMMIT\n", dispatch_rule(&e));
        let (got, stray) = reconstruct(&Saved::parse(&text), false);
        assert!(stray.is_empty(), "{stray:?}");
        let mut want = vec![a.clone(), n.clone(), e.clone()];
        want.sort_by_key(|s| s.frontend.key());
        let mut got = got;
        got.sort_by_key(|s| s.frontend.key());
        assert_eq!(got, want);
        // A changed DNAT target makes the frontend drifted; a stray chain is reported.
        let broken = text.replacen(
            "--to-destination 10.0.2.2:8080",
            "--to-destination 10.0.9.9:8080",
            1,
        ) + "*nat\n:TWILL-SEP-0000000000000000 - [0:0]\nCOMMIT\n";
        let (got, stray) = reconstruct(&Saved::parse(&broken), false);
        assert!(got.iter().any(|s| s.name.ends_with("(drifted)")));
        assert_eq!(stray, vec!["TWILL-SEP-0000000000000000".to_string()]);
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
            vec![be("10.0.1.3", true)],
        );
        let have: BTreeMap<FrontendKey, LbService> = [&a, &b]
            .into_iter()
            .map(|s| (s.frontend.key(), s.clone()))
            .collect();
        let mut a2 = a.clone();
        a2.backends.pop();
        let p = plan(&[a2.clone(), b.clone()], &[a.clone(), b.clone()]);
        let ups: Vec<&LbService> = p.upserts.iter().collect();
        let input = render_plan(&have, &ups, &[]);
        let k = a.frontend.key();
        assert!(input.contains(&format!(":{} - [0:0]", svc_chain(&k))));
        assert!(input.contains(&format!(
            "-X {}",
            sep_chain(&k, "10.0.2.2".parse().unwrap(), 8080)
        )));
        assert!(!input.contains(&svc_chain(&b.frontend.key())));
        // The dispatch rule did not change, so TWILL-SERVICES is not touched.
        assert!(!input.contains("-A TWILL-SERVICES") && !input.contains("-D TWILL-SERVICES"));
        // Losing every endpoint moves the frontend to a REJECT rule in filter.
        let mut gone = a.clone();
        gone.backends.clear();
        let input = render_plan(&have, &[&gone], &[]);
        assert!(input.contains("-D TWILL-SERVICES -d 10.96.0.1/32"));
        assert!(input.contains("*filter\n-A TWILL-SERVICES -d 10.96.0.1/32"));
        assert!(input.contains("-j REJECT --reject-with icmp-port-unreachable"));
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
