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

mod get;
mod write;

pub use self::get::{
    DataplaneReading, ProgrammedFrontend, frontends_table, read_dataplane, services_table,
};
pub use self::write::{
    Deadline, PartialWrite, WriteReport, apply, check_conflicts, check_reserved, delete,
    external_ip_notes, with_retry,
};

use crate::services::desired::{NodeIdentity, Reserved, Snapshot, desired};
use crate::services::model::{Object, ObjectKey, parse_manifest};
use crate::services::source::ServiceStore;
use crate::services::source::etcd::EtcdServiceStore;
use crate::services::source::{MAX_TXN_OPS, url_addresses};
use crate::shared::etcd::EtcdArgs;
use anyhow::{Context as _, bail};
use clap::Subcommand;
use std::collections::BTreeMap;
use std::io::Read as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

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

/// What `apply` and `delete` take: the manifests, the transaction size and etcd.
#[derive(Debug, Clone, clap::Args)]
pub struct WriteArgs {
    /// Manifest file (`-` for stdin); repeatable.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    /// Operations per etcd transaction: etcd's `--max-txn-ops` (128 unless changed).
    #[arg(long, default_value_t = MAX_TXN_OPS, value_parser = txn_ops)]
    pub max_txn_ops: usize,
    /// Retrying etcd.
    #[command(flatten)]
    pub retry: EtcdRetry,
    /// etcd flags.
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

impl WriteArgs {
    /// The store the objects are written to, in transactions of at most `--max-txn-ops`.
    async fn store(&self) -> anyhow::Result<EtcdServiceStore> {
        Ok(connect(&self.etcd)
            .await?
            .with_max_txn_ops(self.max_txn_ops))
    }
}

/// The service subcommands of `twilld`.
#[derive(Debug, Clone, Subcommand)]
pub enum ServiceCmd {
    /// Create or replace Services and EndpointSlices from YAML/JSON manifests (nothing written
    /// unless every object is valid; written in transactions of at most `--max-txn-ops`).
    Apply {
        /// The manifests, the transaction size and etcd.
        #[command(flatten)]
        write: WriteArgs,
    },
    /// Delete the objects named in manifests (in transactions of at most `--max-txn-ops`).
    Delete {
        /// The manifests, the transaction size and etcd.
        #[command(flatten)]
        write: WriteArgs,
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

/// Runs a subcommand, printing its report to stdout (and what it did or noted to stderr).
pub async fn run(cmd: ServiceCmd) -> anyhow::Result<()> {
    match cmd {
        ServiceCmd::Apply { write } => {
            let objects = load_manifests(&write.files)?;
            let reserved: BTreeMap<IpAddr, Reserved> = url_addresses(&write.etcd.etcd_endpoints)
                .await
                .into_iter()
                .map(|ip| (ip, Reserved::Etcd))
                .collect();
            check_reserved(&objects, &reserved)
                .context("refusing the whole apply; nothing was written")?;
            let store = write.store().await?;
            let report = apply(&store, &objects, write.max_txn_ops, write.retry.deadline()).await?;
            for line in &report.lines {
                println!("{line}");
            }
            for note in external_ip_notes(&objects) {
                eprintln!("{note}");
            }
            eprintln!("{}", report.summary("write", write.max_txn_ops));
        }
        ServiceCmd::Delete { write } => {
            let objects = load_manifests(&write.files)?;
            let store = write.store().await?;
            let report =
                delete(&store, &objects, write.max_txn_ops, write.retry.deadline()).await?;
            for line in &report.lines {
                println!("{line}");
            }
            eprintln!("{}", report.summary("delete", write.max_txn_ops));
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
            let d = desired(
                &Snapshot::from_objects(listing.objects.iter().cloned()),
                &node,
            );
            let table = if output.as_deref() == Some("wide") {
                frontends_table(&d, dp.as_ref())
            } else {
                services_table(&listing.objects, &d, dp.as_ref())
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
mod tests;
