//! `twilld apply -f`, `twilld delete -f`, `twilld get services`: the standalone source's
//! command line, as a library so it is tested without a binary.
//!
//! Why this shape:
//! - Apply validates everything first: every file is read and every document parsed and
//!   validated; the result is checked against what etcd already holds (a node port, external IP
//!   or cluster IP:port that another Service owns is refused) and against the addresses of the
//!   etcd endpoints it talks to (a Service there would take every node's etcd traffic; the
//!   agents refuse such frontends too, for objects that bypass this check). A bad document means
//!   nothing is written, and the error names the file, the document (kind, namespace/name or its
//!   number) and the field.
//! - Then it writes in transactions of at most `--max-txn-ops` operations (etcd's limit, 128 by
//!   default), so a file of any size applies; it says how many. Each transaction is all or
//!   nothing, the file as a whole is not: if etcd fails half way, the report names the objects
//!   written and the ones not written (a transaction whose answer was lost is checked by reading
//!   back), and the command fails. Writes are idempotent, so running it again completes it.
//! - etcd is retried (connect, reads, writes) until `--etcd-deadline` (15 s by default) when it
//!   is unreachable or slow, rather than failing on the client's first 2 s connect timeout; an
//!   answer that retrying cannot change (a refused request) fails at once.
//! - The etcd flags are the agent's (`--etcd-endpoints`, `--etcd-prefix`, `--etcd-cafile`,
//!   `--etcd-certfile`, `--etcd-keyfile`) with the same defaults, so one prefix serves both.
//! - `get services` reads etcd for what should be, and the node's dataplane for what is: the
//!   FRONTENDS column is what the agent programs on a node (computed by the same pure function
//!   it uses), PROGRAMMED how many of those the dataplane holds with exactly the desired
//!   backends, CONNS the connections it counted (eBPF only). The dataplane is read directly (the
//!   pinned eBPF maps, else the nftables table or the iptables chains of the namespace `get`
//!   runs in), not through the agent, so a node whose agent is down still shows what its kernel
//!   does; `-o wide` lists every frontend with its backends.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Subcommand;
use tokio::time::Instant;

use crate::services::dataplane::ebpf::EbpfLbView;
use crate::services::dataplane::iptables::IptLb;
use crate::services::dataplane::nft::NftLb;
use crate::services::desired::{Desired, NodeIdentity, RefuseReason, Reserved, Snapshot, desired};
use crate::services::lb::{FrontendKey, LbService};
use crate::services::model::{
    EndpointSlice, Kind, Object, ObjectKey, Service, ServiceType, parse_manifest,
};
use crate::services::source::{
    EtcdServiceStore, Listing, MAX_TXN_OPS, ServiceStore, SourceError, url_addresses,
};
use crate::shared::etcd::EtcdArgs;

/// Connects to the etcd the flags name, once they are checked as a whole (bad flags or TLS
/// files are refused with the reason; see `EtcdArgs::check`).
async fn connect(etcd: &EtcdArgs) -> anyhow::Result<EtcdServiceStore> {
    etcd.check().await.context("refusing the etcd flags")?;
    EtcdServiceStore::connect(&etcd.etcd_endpoints, &etcd.etcd_prefix, &etcd.tls())
        .await
        .context("connect to etcd")
}

/// How `apply`, `delete` and `get` talk to etcd, beside the etcd flags.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct EtcdRetry {
    /// Seconds to keep retrying etcd while it is unreachable or slow (connect, reads, writes),
    /// in total.
    #[arg(long, default_value_t = 15, value_name = "SECS")]
    pub etcd_deadline: u64,
}

impl EtcdRetry {
    fn deadline(self) -> Deadline {
        Deadline::after(Duration::from_secs(self.etcd_deadline))
    }
}

/// The most operations `apply` and `delete` put in one transaction.
fn txn_ops(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?} is not a positive number of operations")),
    }
}

/// The service subcommands of `twilld`.
#[derive(Debug, Clone, Subcommand)]
pub enum ServiceCmd {
    /// Create or replace Services and EndpointSlices from YAML/JSON manifests (nothing written
    /// unless every object is valid; written in transactions of at most `--max-txn-ops`).
    Apply {
        /// Manifest file (`-` for stdin); repeatable.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Operations per etcd transaction: etcd's `--max-txn-ops` (128 unless changed).
        #[arg(long, default_value_t = MAX_TXN_OPS, value_parser = txn_ops)]
        max_txn_ops: usize,
        /// Retrying etcd.
        #[command(flatten)]
        retry: EtcdRetry,
        /// etcd flags.
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Delete the objects named in manifests (in transactions of at most `--max-txn-ops`).
    Delete {
        /// Manifest file (`-` for stdin); repeatable.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Operations per etcd transaction: etcd's `--max-txn-ops` (128 unless changed).
        #[arg(long, default_value_t = MAX_TXN_OPS, value_parser = txn_ops)]
        max_txn_ops: usize,
        /// Retrying etcd.
        #[command(flatten)]
        retry: EtcdRetry,
        /// etcd flags.
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Show stored objects.
    Get {
        /// What to show.
        #[arg(value_parser = ["services", "service", "svc"])]
        what: String,
        /// The node name to compute node-local endpoints for (FRONTENDS column).
        #[arg(long, default_value = "")]
        node_name: String,
        /// The node's subnet file: endpoints in its pod subnet are node-local too, as the agent
        /// counts them (ignored when absent).
        #[arg(long, default_value = twill_facts::DEFAULT_SUBNET_FILE)]
        subnet_file: PathBuf,
        /// The agent's pin directory: its eBPF service maps (`<dir>/lb`) are read to show what
        /// the dataplane holds.
        #[arg(long, default_value = "/sys/fs/bpf/twill")]
        bpf_pin_dir: PathBuf,
        /// `wide`: one line per frontend, with its backends and what the dataplane holds.
        #[arg(short = 'o', long = "output", value_parser = ["wide"])]
        output: Option<String>,
        /// The node's `--allowed-external-ips` (external IPs outside them are not programmed;
        /// none by default, as the agent's default with the etcd source).
        #[arg(long, value_delimiter = ',', value_parser = crate::services::proxy::parse_allowed_network)]
        allowed_external_ips: Vec<ipnet::IpNet>,
        /// Retrying etcd.
        #[command(flatten)]
        retry: EtcdRetry,
        /// etcd flags.
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

/// Reads and validates every file; all or nothing. Errors name the file, document and field.
pub fn load_manifests(files: &[PathBuf]) -> anyhow::Result<Vec<Object>> {
    let mut out: Vec<Object> = Vec::new();
    let mut seen: BTreeMap<ObjectKey, String> = BTreeMap::new();
    for f in files {
        let (name, text) = if f.as_os_str() == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("read manifest from stdin")?;
            ("<stdin>".to_string(), s)
        } else {
            let s = std::fs::read_to_string(f)
                .with_context(|| format!("read manifest {}", f.display()))?;
            (f.display().to_string(), s)
        };
        let objs = parse_manifest(&text).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        for o in objs {
            if let Some(first) = seen.insert(o.key(), name.clone()) {
                bail!("{name}: {} is also defined in {first}", o.key());
            }
            out.push(o);
        }
    }
    if out.is_empty() {
        bail!(
            "no objects in {}",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(out)
}

/// Checks that `new` objects, merged over `existing`, claim no frontend twice; names the Service
/// refused and who has the frontend.
pub fn check_conflicts(existing: &[Object], new: &[Object]) -> anyhow::Result<()> {
    let mut merged: BTreeMap<ObjectKey, Object> =
        existing.iter().map(|o| (o.key(), o.clone())).collect();
    for o in new {
        merged.insert(o.key(), o.clone());
    }
    let snap = Snapshot::from_objects(merged.into_values());
    let d = desired(&snap, &NodeIdentity::default());
    let ours: Vec<String> = new
        .iter()
        .filter(|o| o.key().kind == Kind::Service)
        .map(|o| format!("{}/{}", o.key().namespace, o.key().name))
        .collect();
    let involves = |n: &str| {
        ours.iter().any(|o| {
            n == o
                || n.strip_prefix(o.as_str())
                    .is_some_and(|r| r.starts_with(':'))
        })
    };
    let mut msgs = Vec::new();
    for c in &d.conflicts {
        if involves(&c.kept) || involves(&c.refused) {
            let (a, b) = if involves(&c.refused) {
                (&c.refused, &c.kept)
            } else {
                (&c.kept, &c.refused)
            };
            msgs.push(format!(
                "Service {a}: frontend {} is also claimed by {b}",
                c.frontend
            ));
        }
    }
    if !msgs.is_empty() {
        bail!("{}", msgs.join("; "));
    }
    Ok(())
}

/// Refuses Services whose cluster IPs, external IPs or load-balancer IPs are addresses the
/// nodes depend on (`reserved`: the etcd endpoints'), naming the Service, the frontend and why.
pub fn check_reserved(
    objects: &[Object],
    reserved: &BTreeMap<IpAddr, Reserved>,
) -> anyhow::Result<()> {
    if reserved.is_empty() {
        return Ok(());
    }
    let node = NodeIdentity {
        reserved: reserved.clone(),
        ..NodeIdentity::default()
    };
    let d = desired(&Snapshot::from_objects(objects.iter().cloned()), &node);
    let msgs: Vec<String> = d
        .refused
        .iter()
        .filter(|r| matches!(r.reason, RefuseReason::Reserved(_)))
        .map(|r| format!("Service {r}: every node refuses it"))
        .collect();
    if !msgs.is_empty() {
        bail!("{}", msgs.join("; "));
    }
    Ok(())
}

/// A note for each Service with external IPs: nodes program them only inside their
/// `--allowed-external-ips`, which is empty unless given.
pub fn external_ip_notes(objects: &[Object]) -> Vec<String> {
    objects
        .iter()
        .filter_map(|o| match o {
            Object::Service(s) if !s.spec.external_ips.is_empty() => Some(format!(
                "note: Service {}/{} has externalIPs ({}): a node programs them only inside its --allowed-external-ips (none unless given)",
                s.metadata.namespace,
                s.metadata.name,
                s.spec.external_ips.join(", ")
            )),
            _ => None,
        })
        .collect()
}

/// The point in time after which etcd is not retried any more.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: Instant,
    total: Duration,
}

impl Deadline {
    /// `total` from now.
    pub fn after(total: Duration) -> Self {
        Deadline {
            at: Instant::now() + total,
            total,
        }
    }
}

/// Whether retrying can change the outcome: etcd was unreachable, slow or busy, not refusing.
fn transient(e: &SourceError) -> bool {
    match e {
        SourceError::Unavailable => true,
        SourceError::Etcd { cause, .. } => match cause {
            etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
            // Cancelled, Unknown (how transport failures surface), DeadlineExceeded, Aborted,
            // Unavailable.
            etcd_client::Error::GRpcStatus(s) => matches!(i32::from(s.code()), 1 | 2 | 4 | 10 | 14),
            _ => false,
        },
        _ => false,
    }
}

/// Runs `op` until it succeeds, fails for good, or `deadline` passes (each attempt is cut at
/// the deadline too), with backoff from 200 ms to 2 s between attempts.
pub async fn with_retry<T, Fut>(
    deadline: Deadline,
    what: &str,
    mut op: impl FnMut() -> Fut,
) -> anyhow::Result<T>
where
    Fut: Future<Output = Result<T, SourceError>>,
{
    let mut delay = Duration::from_millis(200);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let last = match tokio::time::timeout_at(deadline.at, op()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if !transient(&e) => {
                return Err(anyhow::Error::new(e).context(what.to_string()));
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer".to_string(),
        };
        let now = Instant::now();
        if now + delay >= deadline.at {
            bail!(
                "{what}: etcd did not answer within --etcd-deadline {:?} ({attempts} attempts): {last}",
                deadline.total
            );
        }
        tracing::debug!(what, attempts, error = %last, "etcd not answering; retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// What `apply` and `delete` did: one line per object, and how the writes went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteReport {
    /// `Service default/web created|configured|unchanged|deleted|not found`, in input order.
    pub lines: Vec<String>,
    /// Objects written (or deleted).
    pub written: usize,
    /// Transactions used.
    pub transactions: usize,
}

impl WriteReport {
    /// The summary for stderr: how many objects in how many transactions.
    pub fn summary(&self, verb: &str, max_ops: usize) -> String {
        match self.transactions {
            0 => format!("nothing to {verb}"),
            1 => format!(
                "{} {} in 1 transaction",
                self.written,
                if verb == "write" {
                    "written"
                } else {
                    "deleted"
                }
            ),
            n => format!(
                "{} {} in {n} transactions of at most {max_ops} operations",
                self.written,
                if verb == "write" {
                    "written"
                } else {
                    "deleted"
                }
            ),
        }
    }
}

/// etcd failed half way through a write: what was written and what was not.
#[derive(Debug)]
pub struct PartialWrite {
    /// `apply` or `delete`.
    pub op: &'static str,
    /// Objects asked for.
    pub total: usize,
    /// Done (written or deleted).
    pub written: Vec<String>,
    /// Not done.
    pub not_written: Vec<String>,
    /// Whose transaction's outcome could not be read back.
    pub unknown: Vec<String>,
    /// Why it stopped.
    pub cause: anyhow::Error,
}

impl std::fmt::Display for PartialWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} stopped after {} of {} objects: {:#}\n  done: {}\n  not done: {}",
            self.op,
            self.written.len(),
            self.total,
            self.cause,
            list(&self.written),
            list(&self.not_written)
        )?;
        if !self.unknown.is_empty() {
            write!(
                f,
                "\n  unknown (etcd did not answer; the command is idempotent, run it again): {}",
                list(&self.unknown)
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for PartialWrite {}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// `apply`: validates everything (against what is stored too), then writes what changed in
/// transactions of at most `max_ops` objects. Returns the report lines
/// (`Service default/web created|configured|unchanged`); a failure half way is a
/// [`PartialWrite`].
pub async fn apply<S: ServiceStore>(
    store: &S,
    objects: &[Object],
    max_ops: usize,
    deadline: Deadline,
) -> anyhow::Result<WriteReport> {
    let listing: Listing = with_retry(deadline, "list stored services", || store.list()).await?;
    check_conflicts(&listing.objects, objects)
        .context("refusing the whole apply; nothing was written")?;
    let existing: BTreeMap<ObjectKey, &Object> =
        listing.objects.iter().map(|o| (o.key(), o)).collect();
    let mut lines = Vec::new();
    let mut changed = Vec::new();
    for o in objects {
        let verb = match existing.get(&o.key()) {
            None => "created",
            Some(old) if *old == o => "unchanged",
            Some(_) => "configured",
        };
        if verb != "unchanged" {
            changed.push(o.clone());
        }
        lines.push(format!("{} {verb}", o.key()));
    }
    let chunks: Vec<&[Object]> = changed.chunks(max_ops.max(1)).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let what = format!("write transaction {} of {}", i + 1, chunks.len());
        if let Err(cause) = with_retry(deadline, &what, || store.put_all(chunk)).await {
            // Is the failed transaction in etcd after all (its answer lost)? Read it back.
            let after = Deadline::after(Duration::from_secs(3));
            let stored = with_retry(after, "read back", || store.list()).await.ok();
            let (mut written, mut not_written, mut unknown) = (Vec::new(), Vec::new(), Vec::new());
            for c in &chunks[..i] {
                written.extend(c.iter().map(|o| o.key().to_string()));
            }
            let names = chunk.iter().map(|o| o.key().to_string());
            match stored {
                Some(l) => {
                    let have: BTreeMap<ObjectKey, &Object> =
                        l.objects.iter().map(|o| (o.key(), o)).collect();
                    if chunk.iter().all(|o| have.get(&o.key()) == Some(&o)) {
                        written.extend(names);
                    } else {
                        not_written.extend(names);
                    }
                }
                None => unknown.extend(names),
            }
            for c in &chunks[i + 1..] {
                not_written.extend(c.iter().map(|o| o.key().to_string()));
            }
            return Err(PartialWrite {
                op: "apply",
                total: changed.len(),
                written,
                not_written,
                unknown,
                cause,
            }
            .into());
        }
    }
    Ok(WriteReport {
        lines,
        written: changed.len(),
        transactions: chunks.len(),
    })
}

/// `delete`: deletes every object named, in transactions of at most `max_ops` keys.
pub async fn delete<S: ServiceStore>(
    store: &S,
    objects: &[Object],
    max_ops: usize,
    deadline: Deadline,
) -> anyhow::Result<WriteReport> {
    let keys: Vec<ObjectKey> = objects.iter().map(Object::key).collect();
    let chunks: Vec<&[ObjectKey]> = keys.chunks(max_ops.max(1)).collect();
    let mut lines = Vec::new();
    let mut deleted = 0;
    for (i, chunk) in chunks.iter().enumerate() {
        let what = format!("delete transaction {} of {}", i + 1, chunks.len());
        match with_retry(deadline, &what, || store.delete_all(chunk)).await {
            Ok(existed) => {
                for (k, e) in chunk.iter().zip(existed) {
                    deleted += usize::from(e);
                    lines.push(format!("{k} {}", if e { "deleted" } else { "not found" }));
                }
            }
            Err(cause) => {
                // Are the failed transaction's keys gone after all (its answer lost)? Read back.
                let after = Deadline::after(Duration::from_secs(3));
                let stored = with_retry(after, "read back", || store.list()).await.ok();
                let mut written: Vec<String> = chunks[..i]
                    .iter()
                    .flat_map(|c| c.iter().map(ToString::to_string))
                    .collect();
                let mut not_written = Vec::new();
                let mut unknown = Vec::new();
                let names = chunk.iter().map(ToString::to_string);
                match stored {
                    Some(l) => {
                        let left: std::collections::BTreeSet<ObjectKey> = l
                            .objects
                            .iter()
                            .map(Object::key)
                            .chain(l.invalid.into_iter().map(|(k, _)| k))
                            .collect();
                        if chunk.iter().any(|k| left.contains(k)) {
                            not_written.extend(names);
                        } else {
                            written.extend(names);
                        }
                    }
                    None => unknown.extend(names),
                }
                not_written.extend(
                    chunks[i + 1..]
                        .iter()
                        .flat_map(|c| c.iter().map(ToString::to_string)),
                );
                return Err(PartialWrite {
                    op: "delete",
                    total: keys.len(),
                    written,
                    not_written,
                    unknown,
                    cause,
                }
                .into());
            }
        }
    }
    Ok(WriteReport {
        lines,
        written: deleted,
        transactions: chunks.len(),
    })
}

fn ports_column(s: &Service) -> String {
    let ports: Vec<String> = s
        .spec
        .ports
        .iter()
        .map(|p| match p.node_port() {
            Some(np) => format!("{}:{np}/{}", p.port(), p.proto()),
            None => format!("{}/{}", p.port(), p.proto()),
        })
        .collect();
    if ports.is_empty() {
        "<none>".into()
    } else {
        ports.join(",")
    }
}

/// One frontend as a node's dataplane holds it.
#[derive(Debug, Clone)]
pub struct ProgrammedFrontend {
    /// What is programmed (read back).
    pub service: LbService,
    /// Connections counted, where the dataplane counts them.
    pub conns: Option<u64>,
    /// Packets counted, where the dataplane counts them.
    pub packets: Option<u64>,
}

/// What a node's service dataplane holds, read back for `get services`.
#[derive(Debug, Clone)]
pub struct DataplaneReading {
    /// The proxy mode that programmed it (`ebpf`, `nftables`, `iptables`).
    pub mode: &'static str,
    /// Where it was read (`pinned maps in /sys/fs/bpf/twill/lb`).
    pub location: String,
    /// Programmed frontends.
    pub frontends: BTreeMap<FrontendKey, ProgrammedFrontend>,
}

/// Reads the service dataplane of the node (network namespace) this runs on: the eBPF maps
/// pinned under `<bpf_pin_dir>/lb`, else the nftables table `inet twill`, else twill's iptables
/// chains. `None` when there is none.
pub fn read_dataplane(bpf_pin_dir: &Path) -> anyhow::Result<Option<DataplaneReading>> {
    let dir = bpf_pin_dir.join("lb");
    if !EbpfLbView::exists(&dir) {
        return read_netfilter();
    }
    let view = EbpfLbView::open(&dir)
        .with_context(|| format!("open the eBPF service maps in {}", dir.display()))?;
    let dump = view
        .dump()
        .with_context(|| format!("read the eBPF service maps in {}", dir.display()))?;
    Ok(Some(DataplaneReading {
        mode: "ebpf",
        location: format!("pinned maps in {}", dir.display()),
        frontends: dump
            .into_iter()
            .map(|st| {
                (
                    st.service.frontend.key(),
                    ProgrammedFrontend {
                        conns: Some(st.counts.conns),
                        packets: Some(st.counts.packets),
                        service: st.service,
                    },
                )
            })
            .collect(),
    }))
}

/// The nftables or iptables dataplane, read back (no counters: rules count nothing per
/// frontend).
fn read_netfilter() -> anyhow::Result<Option<DataplaneReading>> {
    let programmed = |services: Vec<LbService>| {
        services
            .into_iter()
            .map(|service| {
                (
                    service.frontend.key(),
                    ProgrammedFrontend {
                        service,
                        conns: None,
                        packets: None,
                    },
                )
            })
            .collect()
    };
    if let Some(services) = NftLb::peek().context("read the nftables table inet twill")? {
        return Ok(Some(DataplaneReading {
            mode: "nftables",
            location: "table inet twill".into(),
            frontends: programmed(services),
        }));
    }
    if let Some((backend, services)) = IptLb::peek().context("read twill's iptables chains")? {
        return Ok(Some(DataplaneReading {
            mode: "iptables",
            location: format!("TWILL-* chains, iptables-{}", backend.as_str()),
            frontends: programmed(services),
        }));
    }
    Ok(None)
}

/// The frontends `desired` holds for the Service `ns/name`.
fn frontends_of<'a>(d: &'a Desired, ns_name: &str) -> Vec<&'a LbService> {
    d.services
        .iter()
        .filter(|l| {
            l.name == ns_name
                || l.name
                    .strip_prefix(ns_name)
                    .is_some_and(|r| r.starts_with(':'))
        })
        .collect()
}

/// Whether the dataplane holds `want` with exactly its backends (addresses and ports).
fn in_sync(want: &LbService, have: &LbService) -> bool {
    let set = |s: &LbService| {
        let mut v: Vec<_> = s.backends.iter().map(|b| (b.ip, b.port)).collect();
        v.sort_unstable();
        v
    };
    set(want) == set(have)
}

fn backends_list(s: &LbService) -> String {
    if s.backends.is_empty() {
        return "<none>".into();
    }
    s.backends
        .iter()
        .map(|b| std::net::SocketAddr::new(b.ip, b.port).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Left-aligned columns separated by three spaces.
fn columns<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                let _ = write!(line, "{c:<w$}   ", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The `get services` table: one row per Service, with what the dataplane (`dp`, when one was
/// found) holds of it.
pub fn services_table(
    objects: &[Object],
    node: &NodeIdentity,
    dp: Option<&DataplaneReading>,
) -> String {
    let snap = Snapshot::from_objects(objects.iter().cloned());
    let d = desired(&snap, node);
    let mut rows = vec![[
        "NAMESPACE/NAME".to_string(),
        "TYPE".into(),
        "CLUSTER-IP".into(),
        "EXTERNAL-IP".into(),
        "PORT(S)".into(),
        "ENDPOINTS".into(),
        "FRONTENDS".into(),
        "PROGRAMMED".into(),
        "CONNS".into(),
    ]];
    // The table shows the objects as written: index them here (the snapshot keeps only what
    // the dataplane needs).
    let mut services: BTreeMap<(String, String), &Service> = BTreeMap::new();
    let mut slices: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for o in objects {
        match o {
            Object::Service(s) => {
                services.insert(s.key(), s);
            }
            Object::EndpointSlice(e) => {
                if let Some(svc) = e.service() {
                    slices.entry(svc).or_default().push(e);
                }
            }
        }
    }
    for (key, s) in services {
        let ty = if s.is_headless() {
            "ClusterIP(headless)".to_string()
        } else {
            format!("{:?}", s.type_())
        };
        let cip = if s.is_headless() {
            "None".to_string()
        } else if s.type_() == ServiceType::ExternalName {
            s.spec.external_name.clone().unwrap_or_default()
        } else {
            s.cluster_ips()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut ext: Vec<String> = s.external_ips().iter().map(ToString::to_string).collect();
        ext.extend(s.lb_ingress_ips().iter().map(ToString::to_string));
        let (mut ready, mut total) = (0, 0);
        for slice in slices.get(&key).into_iter().flatten() {
            for e in &slice.endpoints {
                total += 1;
                if e.ready() {
                    ready += 1;
                }
            }
        }
        let prefix = format!("{}/{}", key.0, key.1);
        let frontends = frontends_of(&d, &prefix);
        let (programmed, conns) = match dp {
            Some(dp) => {
                let have: Vec<&ProgrammedFrontend> = frontends
                    .iter()
                    .filter_map(|f| dp.frontends.get(&f.frontend.key()))
                    .collect();
                let synced = frontends
                    .iter()
                    .filter(|f| {
                        dp.frontends
                            .get(&f.frontend.key())
                            .is_some_and(|p| in_sync(f, &p.service))
                    })
                    .count();
                let conns: Option<u64> = have.iter().map(|p| p.conns).sum();
                (
                    format!("{synced}/{}", frontends.len()),
                    conns.map_or_else(|| "-".into(), |c| c.to_string()),
                )
            }
            None => ("-".into(), "-".into()),
        };
        rows.push([
            prefix,
            ty,
            if cip.is_empty() { "<none>".into() } else { cip },
            if ext.is_empty() {
                "<none>".into()
            } else {
                ext.join(",")
            },
            ports_column(s),
            format!("{ready}/{total}"),
            frontends.len().to_string(),
            programmed,
            conns,
        ]);
    }
    let mut out = columns(&rows);
    for c in &d.conflicts {
        let _ = writeln!(out, "conflict: {c}");
    }
    out.push_str(&dataplane_footer(&d, dp));
    out
}

/// `-o wide`: one row per frontend (desired, then programmed-only), with its backends and what
/// the dataplane holds.
pub fn frontends_table(
    objects: &[Object],
    node: &NodeIdentity,
    dp: Option<&DataplaneReading>,
) -> String {
    let snap = Snapshot::from_objects(objects.iter().cloned());
    let d = desired(&snap, node);
    let mut rows = vec![[
        "FRONTEND".to_string(),
        "KIND".into(),
        "SERVICE".into(),
        "BACKENDS".into(),
        "DATAPLANE".into(),
        "CONNS".into(),
        "PACKETS".into(),
    ]];
    let count = |v: Option<u64>| v.map_or_else(|| "-".into(), |c| c.to_string());
    for want in &d.services {
        let have = dp.and_then(|dp| dp.frontends.get(&want.frontend.key()));
        let state = match (dp, have) {
            (None, _) => "-".to_string(),
            (Some(_), None) => "missing".into(),
            (Some(_), Some(h)) if in_sync(want, &h.service) => "in sync".into(),
            (Some(_), Some(h)) => format!("differs: {}", backends_list(&h.service)),
        };
        rows.push([
            want.frontend.key().to_string(),
            want.frontend.kind.as_str().into(),
            want.name.clone(),
            backends_list(want),
            state,
            count(have.and_then(|h| h.conns)),
            count(have.and_then(|h| h.packets)),
        ]);
    }
    if let Some(dp) = dp {
        let wanted: std::collections::BTreeSet<FrontendKey> =
            d.services.iter().map(|s| s.frontend.key()).collect();
        for (key, have) in &dp.frontends {
            if wanted.contains(key) {
                continue;
            }
            rows.push([
                key.to_string(),
                have.service.frontend.kind.as_str().into(),
                have.service.name.clone(),
                "<not desired>".into(),
                format!("stale: {}", backends_list(&have.service)),
                count(have.conns),
                count(have.packets),
            ]);
        }
    }
    for r in &d.refused {
        rows.push([
            r.frontend.key().to_string(),
            r.frontend.kind.as_str().into(),
            r.service.clone(),
            "<refused>".into(),
            format!("refused: {}", r.reason.as_str()),
            "-".into(),
            "-".into(),
        ]);
    }
    let mut out = columns(&rows);
    out.push_str(&dataplane_footer(&d, dp));
    out
}

fn dataplane_footer(d: &Desired, dp: Option<&DataplaneReading>) -> String {
    match dp {
        None => {
            "(from etcd; no service dataplane found on this node: PROGRAMMED and CONNS unknown)\n"
                .to_string()
        }
        Some(dp) => {
            let synced = d
                .services
                .iter()
                .filter(|w| {
                    dp.frontends
                        .get(&w.frontend.key())
                        .is_some_and(|h| in_sync(w, &h.service))
                })
                .count();
            let stale = dp
                .frontends
                .keys()
                .filter(|k| !d.services.iter().any(|w| w.frontend.key() == **k))
                .count();
            format!(
                "(desired from etcd; dataplane: {} ({}): {synced}/{} frontends in sync, {stale} not desired)\n",
                dp.mode,
                dp.location,
                d.services.len()
            )
        }
    }
}

/// Runs a subcommand, printing its report to stdout (and what it did or noted to stderr).
pub async fn run(cmd: ServiceCmd) -> anyhow::Result<()> {
    match cmd {
        ServiceCmd::Apply {
            files,
            max_txn_ops,
            retry,
            etcd,
        } => {
            let objects = load_manifests(&files)?;
            let reserved: BTreeMap<IpAddr, Reserved> = url_addresses(&etcd.etcd_endpoints)
                .await
                .into_iter()
                .map(|ip| (ip, Reserved::Etcd))
                .collect();
            check_reserved(&objects, &reserved)
                .context("refusing the whole apply; nothing was written")?;
            let store = connect(&etcd).await?.with_max_txn_ops(max_txn_ops);
            let report = apply(&store, &objects, max_txn_ops, retry.deadline()).await?;
            for line in &report.lines {
                println!("{line}");
            }
            for note in external_ip_notes(&objects) {
                eprintln!("{note}");
            }
            eprintln!("{}", report.summary("write", max_txn_ops));
        }
        ServiceCmd::Delete {
            files,
            max_txn_ops,
            retry,
            etcd,
        } => {
            let objects = load_manifests(&files)?;
            let store = connect(&etcd).await?.with_max_txn_ops(max_txn_ops);
            let report = delete(&store, &objects, max_txn_ops, retry.deadline()).await?;
            for line in &report.lines {
                println!("{line}");
            }
            eprintln!("{}", report.summary("delete", max_txn_ops));
        }
        ServiceCmd::Get {
            what: _,
            node_name,
            subnet_file,
            bpf_pin_dir,
            output,
            allowed_external_ips,
            retry,
            etcd,
        } => {
            let store = connect(&etcd).await?;
            let listing =
                with_retry(retry.deadline(), "list stored services", || store.list()).await?;
            let dp = read_dataplane(&bpf_pin_dir)?;
            let node = NodeIdentity {
                name: node_name,
                allowed_external_ips: Some(allowed_external_ips),
                pod_subnets: twill_facts::SubnetFacts::read(&subnet_file)
                    .map(|f| {
                        let v4 = f.subnet_v4().map(ipnet::IpNet::V4);
                        v4.into_iter()
                            .chain(f.subnet_v6().map(ipnet::IpNet::V6))
                            .collect()
                    })
                    .unwrap_or_default(),
                ..NodeIdentity::default()
            };
            let table = if output.as_deref() == Some("wide") {
                frontends_table(&listing.objects, &node, dp.as_ref())
            } else {
                services_table(&listing.objects, &node, dp.as_ref())
            };
            print!("{table}");
            for (key, e) in &listing.invalid {
                println!("invalid (ignored by the agent): {}: {e}", store.key(key));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::source::MemServiceStore;

    const WEB: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  externalIPs: [192.0.2.10]
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}, {name: dns, port: 53, protocol: UDP, nodePort: 30053}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- {addresses: [10.244.1.5]}
- {addresses: [10.244.2.5], conditions: {ready: false}}
ports: [{name: http, port: 8080}]
";

    fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("twill-cli-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn soon() -> Deadline {
        Deadline::after(Duration::from_secs(5))
    }

    async fn apply_lines(store: &MemServiceStore, objs: &[Object]) -> Vec<String> {
        apply(store, objs, MAX_TXN_OPS, soon()).await.unwrap().lines
    }

    async fn delete_lines(store: &MemServiceStore, objs: &[Object]) -> Vec<String> {
        delete(store, objs, MAX_TXN_OPS, soon())
            .await
            .unwrap()
            .lines
    }

    #[tokio::test]
    async fn apply_is_all_or_nothing_and_reports() {
        let dir = tmpdir("apply");
        let good = write(&dir, "good.yaml", WEB);
        let bad = write(
            &dir,
            "bad.yaml",
            &WEB.replace("web, namespace: shop}", "api}")
                .replace("port: 80,", "port: 70000,")
                .replace("web-1", "api-1"),
        );
        let store = MemServiceStore::new();
        let e = load_manifests(&[good.clone(), bad.clone()]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}: document 1 (Service default/api): spec.ports[0].port: 70000 is not a valid port (1-65535)",
                bad.display()
            )
        );
        assert!(store.objects().is_empty());
        let objs = load_manifests(std::slice::from_ref(&good)).unwrap();
        assert_eq!(
            apply_lines(&store, &objs).await,
            vec![
                "Service shop/web created",
                "EndpointSlice shop/web-1 created"
            ]
        );
        assert_eq!(
            apply_lines(&store, &objs).await,
            vec![
                "Service shop/web unchanged",
                "EndpointSlice shop/web-1 unchanged"
            ]
        );
        let objs2 = load_manifests(&[write(
            &dir,
            "v2.yaml",
            &WEB.replace("10.244.1.5", "10.244.1.6"),
        )])
        .unwrap();
        assert_eq!(
            apply_lines(&store, &objs2).await,
            vec![
                "Service shop/web unchanged",
                "EndpointSlice shop/web-1 configured"
            ]
        );
        // Same file twice: refused.
        let e = load_manifests(&[good.clone(), good.clone()]).unwrap_err();
        assert!(
            e.to_string()
                .contains("Service shop/web is also defined in"),
            "{e}"
        );
        // A second service taking web's node port: refused whole, nothing written.
        let clash = WEB
            .replace("name: web, namespace: shop", "name: other, namespace: shop")
            .replace("10.96.0.10", "10.96.0.99")
            .replace("externalIPs: [192.0.2.10]", "externalIPs: []")
            .replace("web-1", "other-1")
            .replace("service-name: web", "service-name: other");
        let objs3 = load_manifests(&[write(&dir, "clash.yaml", &clash)]).unwrap();
        let e = apply(&store, &objs3, MAX_TXN_OPS, soon())
            .await
            .unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "refusing the whole apply; nothing was written: \
             Service shop/other:dns: frontend 0.0.0.0:30053/UDP is also claimed by shop/web:dns; \
             Service shop/other:http: frontend 0.0.0.0:30080/TCP is also claimed by shop/web:http"
        );
        assert_eq!(store.objects().len(), 2);
        // Delete.
        assert_eq!(
            delete_lines(&store, &objs).await,
            vec![
                "Service shop/web deleted",
                "EndpointSlice shop/web-1 deleted"
            ]
        );
        assert_eq!(
            delete_lines(&store, &objs).await[0],
            "Service shop/web not found"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// `n` Services (`svc-0` … ), each with its cluster IP.
    fn many(n: usize) -> Vec<Object> {
        let mut text = String::new();
        for i in 0..n {
            let _ = write!(
                text,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}}}\nspec:\n  clusterIP: 10.96.{}.{}\n  ports: [{{port: 80}}]\n",
                i / 200,
                i % 200 + 1
            );
        }
        parse_manifest(&text).unwrap()
    }

    /// A file bigger than one transaction applies, in transactions of at most the limit, and
    /// says how many; delete takes the same file.
    #[tokio::test]
    async fn apply_and_delete_write_in_transactions_of_at_most_the_limit() {
        let store = MemServiceStore::new();
        let objs = many(300);
        let r = apply(&store, &objs, 128, soon()).await.unwrap();
        assert_eq!((r.written, r.transactions), (300, 3));
        assert_eq!(
            r.summary("write", 128),
            "300 written in 3 transactions of at most 128 operations"
        );
        assert_eq!(r.lines.len(), 300);
        assert_eq!(store.objects().len(), 300);
        // Chunks follow the input order and are never larger than the limit.
        let r = apply(&store, &objs, 128, soon()).await.unwrap();
        assert_eq!((r.written, r.transactions), (0, 0));
        assert_eq!(r.summary("write", 128), "nothing to write");
        let r = apply(&store, &objs[..5], 2, soon()).await.unwrap();
        assert_eq!(r.transactions, 0, "unchanged objects are not written");
        let r = delete(&store, &objs, 128, soon()).await.unwrap();
        assert_eq!((r.written, r.transactions), (300, 3));
        assert_eq!(
            r.summary("delete", 128),
            "300 deleted in 3 transactions of at most 128 operations"
        );
        assert!(store.objects().is_empty());
        let r = apply(&store, &objs[..1], 128, soon()).await.unwrap();
        assert_eq!(r.summary("write", 128), "1 written in 1 transaction");
    }

    /// etcd failing half way: the objects written and not written are named (a transaction
    /// whose answer was lost is read back), and the command fails.
    #[tokio::test]
    async fn apply_reports_which_objects_were_written_when_etcd_fails_half_way() {
        let objs = many(300);
        let name = |i: usize| format!("Service default/svc-{i}");
        let short = || Deadline::after(Duration::from_millis(700));
        // The second transaction fails (and so every later attempt of it).
        let store = MemServiceStore::new();
        store.fail_writes(1, false);
        let e = apply(&store, &objs, 128, short()).await.unwrap_err();
        let p = e.downcast_ref::<PartialWrite>().expect("a partial write");
        assert_eq!(p.written, (0..128).map(name).collect::<Vec<_>>());
        assert_eq!(p.not_written, (128..300).map(name).collect::<Vec<_>>());
        assert!(p.unknown.is_empty());
        assert_eq!(store.objects().len(), 128);
        let text = format!("{e:#}");
        assert!(text.starts_with("apply stopped after 128 of 300 objects: write transaction 2 of 3: etcd did not answer within --etcd-deadline 700ms"), "{text}");
        assert!(text.contains("\n  done: Service default/svc-0, "), "{text}");
        assert!(
            text.contains("\n  not done: Service default/svc-128, "),
            "{text}"
        );
        // The second transaction is committed but its answer lost: read back, it counts as
        // written.
        let store = MemServiceStore::new();
        store.fail_writes(1, true);
        let e = apply(&store, &objs, 128, short()).await.unwrap_err();
        let p = e.downcast_ref::<PartialWrite>().expect("a partial write");
        assert_eq!(p.written.len(), 256);
        assert_eq!(p.not_written, (256..300).map(name).collect::<Vec<_>>());
        // Running it again completes it (writes are idempotent).
        let store2 = store.clone();
        store2.fail_writes(usize::MAX, false);
        let r = apply(&store, &objs, 128, soon()).await.unwrap();
        assert_eq!(r.written, 44);
        assert_eq!(store.objects().len(), 300);
        // Deleting, the same: the first transaction done, the second failing, read back.
        store.fail_writes(1, false);
        let e = delete(&store, &objs, 128, short()).await.unwrap_err();
        let p = e.downcast_ref::<PartialWrite>().expect("a partial write");
        assert_eq!(p.written, (0..128).map(name).collect::<Vec<_>>());
        assert_eq!(p.not_written, (128..300).map(name).collect::<Vec<_>>());
        assert!(
            format!("{e:#}").starts_with(
                "delete stopped after 128 of 300 objects: delete transaction 2 of 3: "
            ),
            "{e:#}"
        );
        assert_eq!(store.objects().len(), 172);
        store.fail_writes(1, true);
        let e = delete(&store, &objs, 128, short()).await.unwrap_err();
        let p = e.downcast_ref::<PartialWrite>().expect("a partial write");
        assert_eq!(
            p.written,
            (0..256).map(name).collect::<Vec<_>>(),
            "the lost answer's deletes happened"
        );
        assert_eq!(p.not_written, (256..300).map(name).collect::<Vec<_>>());
    }

    /// Unreachable etcd is retried until the deadline, then the error says so; an answer that
    /// retrying cannot change fails at once.
    #[tokio::test]
    async fn etcd_is_retried_within_the_deadline_only_when_retrying_can_help() {
        let store = MemServiceStore::new();
        store.set_down(true);
        let start = std::time::Instant::now();
        let e = apply(
            &store,
            &many(1),
            128,
            Deadline::after(Duration::from_secs(1)),
        )
        .await
        .unwrap_err();
        let took = start.elapsed();
        assert!(
            format!("{e:#}").starts_with(
                "list stored services: etcd did not answer within --etcd-deadline 1s ("
            ),
            "{e:#}"
        );
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_secs(3),
            "{took:?}"
        );
        // etcd comes back within the deadline: the command succeeds.
        let back = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            back.set_down(false);
        });
        let r = apply(&store, &many(1), 128, soon()).await.unwrap();
        assert_eq!(r.written, 1);
        // A refusal is not retried.
        let mut attempts = 0;
        let e = with_retry(soon(), "write", || {
            attempts += 1;
            async {
                Err::<(), _>(SourceError::TooMany {
                    count: 200,
                    max: 128,
                })
            }
        })
        .await
        .unwrap_err();
        assert_eq!(attempts, 1);
        assert_eq!(
            format!("{e:#}"),
            "write: 200 operations in one transaction; etcd takes at most 128 (its --max-txn-ops)"
        );
    }

    /// A Service on an etcd endpoint's address is refused at apply time, naming it.
    #[test]
    fn services_on_etcd_addresses_are_refused() {
        let reserved = BTreeMap::from([("198.18.0.1".parse().unwrap(), Reserved::Etcd)]);
        let evil = parse_manifest("apiVersion: v1\nkind: Service\nmetadata: {name: evil}\nspec:\n  clusterIP: 10.96.0.66\n  externalIPs: [198.18.0.1]\n  ports: [{name: etcd, port: 2379}]\n").unwrap();
        let e = check_reserved(&evil, &reserved).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Service default/evil:etcd ExternalIP 198.18.0.1:2379/TCP: 198.18.0.1 is an etcd endpoint's address (--etcd-endpoints): every node refuses it"
        );
        check_reserved(&parse_manifest(WEB).unwrap(), &reserved).unwrap();
        // An external IP is worth a note: nodes program it only where allowed.
        assert_eq!(
            external_ip_notes(&parse_manifest(WEB).unwrap()),
            vec![
                "note: Service shop/web has externalIPs (192.0.2.10): a node programs them only inside its --allowed-external-ips (none unless given)"
            ]
        );
    }

    #[test]
    fn table() {
        let objs = parse_manifest(WEB).unwrap();
        let node = NodeIdentity::default();
        let t = services_table(&objs, &node, None);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "NAMESPACE/NAME   TYPE       CLUSTER-IP   EXTERNAL-IP   PORT(S)                     ENDPOINTS   FRONTENDS   PROGRAMMED   CONNS"
        );
        assert_eq!(
            lines[1],
            "shop/web         NodePort   10.96.0.10   192.0.2.10    80:30080/TCP,53:30053/UDP   1/2         6           -            -"
        );
        assert!(lines[2].contains("no service dataplane found"), "{t}");

        // A dataplane holding two frontends: one as desired, one with a stale backend, plus a
        // frontend nobody wants any more.
        let d = desired(&Snapshot::from_objects(objs.clone()), &node);
        let mut frontends = BTreeMap::new();
        let pick = |f: &str| {
            d.services
                .iter()
                .find(|s| s.frontend.key().to_string() == f)
                .unwrap()
                .clone()
        };
        let mut good = pick("10.96.0.10:80/TCP");
        good.id = 77;
        let mut off = pick("0.0.0.0:30080/TCP");
        off.backends[0].ip = "10.244.9.9".parse().unwrap();
        let mut gone = pick("10.96.0.10:80/TCP");
        gone.frontend.ip = "10.96.0.99".parse().unwrap();
        gone.name = "shop/old:http".into();
        for (svc, conns) in [(good, 5), (off, 2), (gone, 1)] {
            frontends.insert(
                svc.frontend.key(),
                ProgrammedFrontend {
                    service: svc,
                    conns: Some(conns),
                    packets: Some(conns * 10),
                },
            );
        }
        let dp = DataplaneReading {
            mode: "ebpf",
            location: "pinned maps in /x".into(),
            frontends,
        };
        let t = services_table(&objs, &node, Some(&dp));
        let row = t.lines().nth(1).unwrap();
        assert!(row.ends_with("6           1/6          7"), "{t}");
        assert!(
            t.contains("dataplane: ebpf (pinned maps in /x): 1/6 frontends in sync, 1 not desired"),
            "{t}"
        );
        let w = frontends_table(&objs, &node, Some(&dp));
        assert!(!w.contains("refused"), "{w}");
        assert!(w.contains("in sync"), "{w}");
        assert!(w.contains("differs: 10.244.9.9:"), "{w}");
        assert!(w.contains("missing"), "{w}");
        assert!(
            w.contains("10.96.0.99:80/TCP") && w.contains("stale: 10.244.1.5:8080"),
            "{w}"
        );
        // A node that programs no external IP: those frontends are listed as refused, not
        // counted as wanted.
        let strict = NodeIdentity {
            allowed_external_ips: Some(Vec::new()),
            ..NodeIdentity::default()
        };
        let t = services_table(&objs, &strict, None);
        assert!(t.lines().nth(1).unwrap().contains(" 1/2         4 "), "{t}");
        let w = frontends_table(&objs, &strict, None);
        let refused: Vec<&str> = w.lines().filter(|l| l.contains("<refused>")).collect();
        assert_eq!(refused.len(), 2, "{w}");
        assert!(
            refused.iter().all(|l| l.starts_with("192.0.2.10:")
                && l.contains("ExternalIP")
                && l.contains("refused: external IP not allowed")),
            "{w}"
        );
    }
}
