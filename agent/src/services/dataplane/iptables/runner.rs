//! The kernel edge of the iptables dataplane ([`IptRunner`]): `iptables-save` and
//! `iptables-restore` of one family, the change token and the UDP conntrack purge.
//!
//! Why it is shaped as it is:
//! - Everything the dataplane does to the kernel crosses this trait, and it crosses it as
//!   text: the `iptables-restore` input of a sync and the `iptables-save` output it reads
//!   back. The rendering and the read-back stay pure ([`super::render`],
//!   [`super::readback`]); [`IptLb`](super::IptLb) only moves text between them and a runner.
//! - [`ToolRunner`] spawns the tools (each child dies with twilld: a killed restore commits
//!   nothing). [`FakeIptables`] is a recording fake that keeps the tables as
//!   `iptables-restore --noflush` would (declared chains are flushed, `-D` of a rule that is not
//!   there, `-X` of a chain still referenced or a restore without `COMMIT` fail the whole
//!   restore, and nothing of it lands), so syncs, restarts and repairs are tested without root;
//!   [`FakeIptables::failing`] fails every restore.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::debug;

use super::{FILTER, IptBackend, IptError, NAT, choose_backend, token};
use crate::services::dataplane::conntrack;
use crate::services::lb::StaleBackend;
use crate::shared::nfnl::{NfSocket, NfnlError, SUBSYS_NFTABLES};

/// The kernel edge of the iptables dataplane, for one backend.
pub trait IptRunner: Send + std::fmt::Debug {
    /// The backend it drives.
    fn backend(&self) -> IptBackend;

    /// `iptables-save -t TABLE` (`ip6tables-save` for `v6`).
    fn save(&mut self, v6: bool, table: &str) -> Result<String, IptError>;

    /// `iptables-restore --noflush -w 5` (`ip6tables-restore` for `v6`) with `input`: all of
    /// it lands or none of it.
    fn restore(&mut self, v6: bool, input: &str) -> Result<(), IptError>;

    /// A token that changes whenever a family's `nat` or `filter` table may have changed;
    /// `None` when it cannot be had (every read is then a full one).
    fn change_token(&mut self, v6: bool) -> Option<u64>;

    /// Deletes the UDP conntrack entries of removed backends; `Ok(None)` when this runner has
    /// no conntrack socket.
    fn purge_udp(&mut self, stale: &[StaleBackend]) -> Result<Option<usize>, NfnlError>;
}

/// `NFT_MSG_GETGEN` and `NFTA_GEN_ID`.
const MSG_GETGEN: u16 = 16;
const GEN_ID: u16 = 1;

/// The real runner: spawns the backend's tools in the calling thread's network namespace.
#[derive(Debug)]
pub struct ToolRunner {
    backend: IptBackend,
    /// The nfnetlink socket for the ruleset generation (nft backend) and conntrack.
    sock: Option<NfSocket>,
}

impl ToolRunner {
    /// A runner for `backend` with a netlink socket (change token, conntrack) if one opens.
    pub fn new(backend: IptBackend) -> Self {
        ToolRunner {
            backend,
            sock: NfSocket::open().ok(),
        }
    }

    /// A runner that only reads and writes rules (no netlink socket).
    pub fn tools_only(backend: IptBackend) -> Self {
        ToolRunner {
            backend,
            sock: None,
        }
    }
}

impl IptRunner for ToolRunner {
    fn backend(&self) -> IptBackend {
        self.backend
    }

    fn save(&mut self, v6: bool, table: &str) -> Result<String, IptError> {
        run(&self.backend.tool(v6, "save"), &["-t", table], None)
    }

    fn restore(&mut self, v6: bool, input: &str) -> Result<(), IptError> {
        run(
            &self.backend.tool(v6, "restore"),
            &["--noflush", "-w", "5"],
            Some(input),
        )
        .map(|_| ())
    }

    fn change_token(&mut self, v6: bool) -> Option<u64> {
        match self.backend {
            IptBackend::Nft => {
                let sock = self.sock.as_mut()?;
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
                    if let Err(e) = token::legacy_table_digest(v6, table, &mut h) {
                        debug!(v6, table, error = %e, "x_tables digest unavailable");
                        return None;
                    }
                }
                Some(std::hash::Hasher::finish(&h))
            }
        }
    }

    fn purge_udp(&mut self, stale: &[StaleBackend]) -> Result<Option<usize>, NfnlError> {
        match &mut self.sock {
            Some(sock) => conntrack::purge_udp(sock, stale).map(Some),
            None => Ok(None),
        }
    }
}

pub(crate) fn run(tool: &str, args: &[&str], input: Option<&str>) -> Result<String, IptError> {
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

/// One table of the fake: chains in the order `iptables-save` prints them (built-in chains
/// first, then twill's and others' by name), each with its rules as `-A CHAIN ...` lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct FakeTable {
    builtin: Vec<(String, Vec<String>)>,
    user: BTreeMap<String, Vec<String>>,
}

impl FakeTable {
    fn new(table: &str) -> Self {
        let builtin: &[&str] = match table {
            "nat" => &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
            "filter" => &["INPUT", "FORWARD", "OUTPUT"],
            _ => &[],
        };
        FakeTable {
            builtin: builtin
                .iter()
                .map(|c| ((*c).to_string(), Vec::new()))
                .collect(),
            user: BTreeMap::new(),
        }
    }

    fn chain(&mut self, name: &str) -> Option<&mut Vec<String>> {
        match self.builtin.iter_mut().find(|(n, _)| n == name) {
            Some((_, rules)) => Some(rules),
            None => self.user.get_mut(name),
        }
    }

    fn is_builtin(&self, name: &str) -> bool {
        self.builtin.iter().any(|(n, _)| n == name)
    }

    fn referenced(&self, name: &str) -> bool {
        let (jump, goto) = (format!(" -j {name}"), format!(" -g {name}"));
        self.builtin
            .iter()
            .map(|(_, r)| r)
            .chain(self.user.values())
            .flatten()
            .any(|r| r.ends_with(&jump) || r.contains(&format!("{jump} ")) || r.contains(&goto))
    }

    fn save(&self, table: &str) -> String {
        let mut out = format!("# Generated by the fake iptables-save\n*{table}\n");
        for (c, _) in &self.builtin {
            let _ = writeln!(out, ":{c} ACCEPT [0:0]");
        }
        for c in self.user.keys() {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        for rule in self
            .builtin
            .iter()
            .map(|(_, r)| r)
            .chain(self.user.values())
            .flatten()
        {
            let _ = writeln!(out, "{rule}");
        }
        out.push_str("COMMIT\n");
        out
    }
}

/// What the fake holds and what it was given.
#[derive(Debug, Default)]
pub struct FakeIptState {
    /// Tables by family (`[v4, v6]`) and name.
    tables: [BTreeMap<String, FakeTable>; 2],
    /// Every restore input, in order, with its family (`true`: v6); failed ones too.
    pub restores: Vec<(bool, String)>,
    /// How many `iptables-save` runs there were.
    pub saves: usize,
    /// Committed restores per family: the change token.
    generation: [u64; 2],
    /// Every restore fails (and changes nothing).
    pub fail_restores: bool,
}

impl FakeIptState {
    /// What `iptables-save -t TABLE` prints for a family.
    pub fn saved(&self, v6: bool, table: &str) -> String {
        self.tables[usize::from(v6)]
            .get(table)
            .cloned()
            .unwrap_or_else(|| FakeTable::new(table))
            .save(table)
    }

    /// The rules of one chain (`-A CHAIN ...` lines), `None` if the chain does not exist.
    pub fn rules(&self, v6: bool, table: &str, chain: &str) -> Option<Vec<String>> {
        let mut t = self.tables[usize::from(v6)].get(table)?.clone();
        t.chain(chain).cloned()
    }

    /// Replaces one rule's text wherever it is (someone else editing our chains).
    pub fn edit_rule(&mut self, v6: bool, from: &str, to: &str) -> bool {
        let mut hit = false;
        for t in self.tables[usize::from(v6)].values_mut() {
            for rules in t
                .builtin
                .iter_mut()
                .map(|(_, r)| r)
                .chain(t.user.values_mut())
            {
                for r in rules.iter_mut().filter(|r| r.as_str() == from) {
                    to.clone_into(r);
                    hit = true;
                }
            }
        }
        self.generation[usize::from(v6)] += u64::from(hit);
        hit
    }

    /// Applies an `iptables-restore --noflush` input to one family: all of it or, on the first
    /// bad line, nothing.
    fn apply(&mut self, v6: bool, input: &str) -> Result<(), String> {
        let mut tables = self.tables[usize::from(v6)].clone();
        let mut open: Option<(String, FakeTable)> = None;
        for (n, line) in input.lines().enumerate() {
            let bad = |why: &str| format!("line {}: {why}: {line}", n + 1);
            let line = line.trim_end();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('*') {
                if open.is_some() {
                    return Err(bad("table without COMMIT before"));
                }
                let t = tables
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| FakeTable::new(name));
                open = Some((name.to_string(), t));
                continue;
            }
            if line == "COMMIT" {
                let (name, t) = open.take().ok_or_else(|| bad("COMMIT without a table"))?;
                tables.insert(name, t);
                continue;
            }
            let (_, t) = open.as_mut().ok_or_else(|| bad("a line outside a table"))?;
            if let Some(decl) = line.strip_prefix(':') {
                let chain = decl.split(' ').next().unwrap_or_default();
                if !t.is_builtin(chain) {
                    // Declaring a chain in a --noflush restore creates or flushes it.
                    t.user.insert(chain.to_string(), Vec::new());
                }
                continue;
            }
            let mut words = line.splitn(3, ' ');
            let (op, chain, rest) = (
                words.next().unwrap_or_default(),
                words.next().unwrap_or_default(),
                words.next().unwrap_or_default(),
            );
            match op {
                "-A" => t
                    .chain(chain)
                    .ok_or_else(|| bad("no such chain"))?
                    .push(format!("-A {chain} {rest}")),
                "-D" => {
                    let want = format!("-A {chain} {rest}");
                    let rules = t.chain(chain).ok_or_else(|| bad("no such chain"))?;
                    let at = rules
                        .iter()
                        .position(|r| *r == want)
                        .ok_or_else(|| bad("no such rule"))?;
                    rules.remove(at);
                }
                "-I" => {
                    let (pos, rule) = rest.split_once(' ').ok_or_else(|| bad("no position"))?;
                    let pos: usize = pos.parse().map_err(|_| bad("bad position"))?;
                    let rules = t.chain(chain).ok_or_else(|| bad("no such chain"))?;
                    if pos == 0 || pos > rules.len() + 1 {
                        return Err(bad("position out of range"));
                    }
                    rules.insert(pos - 1, format!("-A {chain} {rule}"));
                }
                "-X" => {
                    if t.is_builtin(chain) || !t.user.get(chain).is_some_and(Vec::is_empty) {
                        return Err(bad("not an empty user chain"));
                    }
                    t.user.remove(chain);
                    if t.referenced(chain) {
                        return Err(bad("chain still referenced"));
                    }
                }
                _ => return Err(bad("unknown command")),
            }
        }
        if open.is_some() {
            return Err("input ends without COMMIT".into());
        }
        self.tables[usize::from(v6)] = tables;
        self.generation[usize::from(v6)] += 1;
        Ok(())
    }
}

/// A recording fake runner that keeps the tables as `iptables-restore --noflush` would. Clones
/// share their state, so a test keeps one to look at what the dataplane did.
#[derive(Debug, Clone, Default)]
pub struct FakeIptables {
    state: Arc<Mutex<FakeIptState>>,
}

impl FakeIptables {
    /// An empty fake (a node without rules).
    pub fn new() -> Self {
        FakeIptables::default()
    }

    /// A fake whose every restore fails and changes nothing.
    pub fn failing() -> Self {
        let f = FakeIptables::default();
        f.state().fail_restores = true;
        f
    }

    /// Its state.
    pub fn state(&self) -> MutexGuard<'_, FakeIptState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl IptRunner for FakeIptables {
    fn backend(&self) -> IptBackend {
        IptBackend::Legacy
    }

    fn save(&mut self, v6: bool, table: &str) -> Result<String, IptError> {
        let mut s = self.state();
        s.saves += 1;
        Ok(s.saved(v6, table))
    }

    fn restore(&mut self, v6: bool, input: &str) -> Result<(), IptError> {
        let mut s = self.state();
        s.restores.push((v6, input.to_string()));
        let tool = IptBackend::Legacy.tool(v6, "restore");
        if s.fail_restores {
            return Err(IptError::Failed {
                tool,
                status: "exit status: 1".into(),
                stderr: "fake: restore refused".into(),
            });
        }
        s.apply(v6, input).map_err(|stderr| IptError::Failed {
            tool,
            status: "exit status: 2".into(),
            stderr,
        })
    }

    fn change_token(&mut self, v6: bool) -> Option<u64> {
        Some(self.state().generation[usize::from(v6)])
    }

    fn purge_udp(&mut self, _stale: &[StaleBackend]) -> Result<Option<usize>, NfnlError> {
        Ok(None)
    }
}
