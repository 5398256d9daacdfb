//! `twilld apply -f` and `twilld delete -f`: checks against what is stored, writes in transactions
//! of at most `--etcd-max-txn-ops` objects, retried while etcd is away within a deadline.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::time::Instant;

use crate::services::desired::{NodeIdentity, RefuseReason, Reserved, Snapshot, desired};
use crate::services::model::{Kind, Object, ObjectKey};
use crate::services::source::{Listing, ServiceStore, SourceError};

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
    pub(super) at: Instant,
    pub(super) total: Duration,
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
pub(super) fn transient(e: &SourceError) -> bool {
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

impl PartialWrite {
    /// What a write of `chunks` (one transaction each) did when transaction `failed` stopped
    /// with `cause`: the transactions before it are done, the ones after it are not, and the
    /// failed one is done if `landed` says so of the store read back after it (its answer may
    /// have been lost after etcd committed it); unknown if even that read fails.
    async fn after_failure<S: ServiceStore, T>(
        store: &S,
        op: &'static str,
        (chunks, failed): (&[&[T]], usize),
        cause: anyhow::Error,
        name: impl Fn(&T) -> String,
        landed: impl FnOnce(Listing, &[T]) -> bool,
    ) -> Self {
        let after = Deadline::after(Duration::from_secs(3));
        let stored = with_retry(after, "read back", || store.list()).await.ok();
        let names = |chunks: &[&[T]]| -> Vec<String> {
            chunks.iter().flat_map(|c| c.iter().map(&name)).collect()
        };
        let mut written = names(&chunks[..failed]);
        let mut not_written = Vec::new();
        let mut unknown = Vec::new();
        let chunk = chunks[failed];
        match stored.map(|l| landed(l, chunk)) {
            Some(true) => written.extend(chunk.iter().map(&name)),
            Some(false) => not_written.extend(chunk.iter().map(&name)),
            None => unknown.extend(chunk.iter().map(&name)),
        }
        not_written.extend(names(&chunks[failed + 1..]));
        PartialWrite {
            op,
            total: chunks.iter().map(|c| c.len()).sum(),
            written,
            not_written,
            unknown,
            cause,
        }
    }
}

pub(super) fn list(v: &[String]) -> String {
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
            let partial = PartialWrite::after_failure(
                store,
                "apply",
                (&chunks, i),
                cause,
                |o| o.key().to_string(),
                |stored, chunk| {
                    let have: BTreeMap<ObjectKey, &Object> =
                        stored.objects.iter().map(|o| (o.key(), o)).collect();
                    chunk.iter().all(|o| have.get(&o.key()) == Some(&o))
                },
            )
            .await;
            return Err(partial.into());
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
                let partial = PartialWrite::after_failure(
                    store,
                    "delete",
                    (&chunks, i),
                    cause,
                    ToString::to_string,
                    |stored, chunk| {
                        let left: std::collections::BTreeSet<ObjectKey> = stored
                            .objects
                            .iter()
                            .map(Object::key)
                            .chain(stored.invalid.into_iter().map(|(k, _)| k))
                            .collect();
                        !chunk.iter().any(|k| left.contains(k))
                    },
                )
                .await;
                return Err(partial.into());
            }
        }
    }
    Ok(WriteReport {
        lines,
        written: deleted,
        transactions: chunks.len(),
    })
}
