//! Where the service loop's objects come from: the [`ServiceStore`] seam, the types every source
//! shares ([`Listing`], [`SourceUpdate`]) and the cache task that turns a store into updates.
//!
//! - [`etcd`]: the standalone source, objects under `<prefix>/services/` (`twilld apply -f`).
//! - [`mem`]: the in-memory store with the same semantics, for tests.
//! - [`kube`]: Services and EndpointSlices from the Kubernetes API server.
//!
//! Why this shape:
//! - [`ServiceStore`] is the seam (etcd, or [`mem::MemServiceStore`] in tests); the cache task
//!   ([`service_cache`]) lists, then watches from the listed revision, and re-lists with
//!   backoff whenever the watch breaks (compaction, etcd restart), like the lease cache. It sends
//!   **changes**, not whole snapshots: the loop recomputes only the Services a change touches,
//!   which keeps one endpoint change far below the 10 ms budget with 10k services.
//! - An object in the store that does not parse or validate (written by hand with etcdctl) is
//!   treated as absent, logged once by the loop and counted: the state is always a function of
//!   the valid stored objects, the same after a re-list as live.
//! - A source never touches the dataplane: what it lists and watches goes to the service loop
//!   ([`crate::services::sync`]) as [`SourceUpdate`]s on one channel.

pub mod etcd;
pub mod kube;
pub mod mem;

use std::future::Future;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use crate::services::model::{Change, FieldError, Object, ObjectKey};
use crate::shared::backoff::Backoff;

/// At most this many objects per transaction (etcd's default `--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;

/// Errors of the service source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// An etcd call failed. (The client's error is in the message, not chained as a source:
    /// it is the last link anyway, and `{:#}` would print it twice.)
    #[error("etcd {op} {key}: {cause}")]
    Etcd {
        /// The call (`get`, `txn`, `watch`, `connect`).
        op: &'static str,
        /// The key or prefix.
        key: String,
        /// The client's error (with the gRPC status and the OS error).
        cause: etcd_client::Error,
    },
    /// Connecting to etcd failed (or its TLS files could not be read).
    #[error(transparent)]
    Connect(#[from] crate::shared::etcd::EtcdError),
    /// Too many operations for one transaction (callers split their writes).
    #[error("{count} operations in one transaction; etcd takes at most {max} (its --max-txn-ops)")]
    TooMany {
        /// Objects asked for.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The watch stream ended or broke; the caller re-lists.
    #[error("service watch ended: {0}")]
    WatchEnded(String),
    /// The store changed in a way a listing must judge (the network config key was written or
    /// deleted, the last object was deleted); the caller re-lists.
    #[error("{0}; re-listing")]
    StoreChanged(String),
    /// The store is unreachable (the in-memory fake, when told so).
    #[error("service store unavailable")]
    Unavailable,
}

/// Everything stored, as read at one revision.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Valid objects.
    pub objects: Vec<Object>,
    /// Objects whose stored values are invalid, with the reason (treated as absent).
    pub invalid: Vec<(ObjectKey, FieldError)>,
    /// The revision the list was read at.
    pub revision: i64,
    /// What the listing says about the store itself (etcd; `None` for sources without such
    /// facts): the service loop judges a listing that lost everything by them ([`StoreGuard`](crate::services::sync::guard::StoreGuard)).
    pub facts: Option<StoreFacts>,
}

/// Facts about the store a listing was read from, beside its objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreFacts {
    /// etcd's cluster id (a wiped and re-created etcd has a new one).
    pub cluster_id: u64,
    /// The revision the listing was read at.
    pub revision: i64,
    /// The network config key's (`<prefix>/config`) last modification revision; `None`: the
    /// key is absent.
    pub config: Option<i64>,
}

/// The service store seam.
pub trait ServiceStore: Clone + Send + Sync + 'static {
    /// Every object, and the revision.
    fn list(&self) -> impl Future<Output = Result<Listing, SourceError>> + Send;
    /// [`list`](Self::list), handing every page but the last to `pages` as it is read
    /// ([`SourceUpdate::Page`]) so that a large store is never held whole as parsed objects;
    /// returns the last page, which completes the listing. The default lists everything at
    /// once.
    fn list_paged(
        &self,
        pages: &mpsc::Sender<SourceUpdate>,
    ) -> impl Future<Output = Result<Listing, SourceError>> + Send {
        let _ = pages;
        self.list()
    }
    /// Streams what changes after `revision` into `tx` ([`SourceUpdate::Changes`], and
    /// [`SourceUpdate::Invalid`] for values that do not validate, which the changes already
    /// delete) until the stream breaks, then returns the error; the caller re-lists. It also
    /// returns ([`SourceError::StoreChanged`]) instead of sending changes when the network
    /// config key is written or deleted, or when a batch deletes the last object: those are
    /// judged on a listing ([`StoreGuard`](crate::services::sync::guard::StoreGuard)).
    fn watch(
        &self,
        revision: i64,
        tx: mpsc::Sender<SourceUpdate>,
    ) -> impl Future<Output = SourceError> + Send;
    /// Writes every object in one transaction.
    fn put_all(&self, objects: &[Object]) -> impl Future<Output = Result<(), SourceError>> + Send;
    /// Deletes every key in one transaction; returns which existed.
    fn delete_all(
        &self,
        keys: &[ObjectKey],
    ) -> impl Future<Output = Result<Vec<bool>, SourceError>> + Send;
}

/// The addresses of the hosts `urls` name (`http://198.18.0.1:2379`, `https://etcd:2379`,
/// `[fd00::1]:2379`): literal addresses as they are, names resolved (each within 2 s; a name
/// that does not resolve is logged and skipped). What no frontend may take ([`Reserved`]).
pub async fn url_addresses(urls: &[String]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for url in urls {
        let authority = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
        let authority = authority.split(['/', '?']).next().unwrap_or_default();
        let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
        let host = if let Some(rest) = authority.strip_prefix('[') {
            rest.split_once(']').map_or(rest, |(h, _)| h)
        } else {
            authority.split(':').next().unwrap_or_default()
        };
        if host.is_empty() {
            continue;
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            out.push(ip);
            continue;
        }
        let lookup = tokio::net::lookup_host((host, 0));
        match tokio::time::timeout(Duration::from_secs(2), lookup).await {
            Ok(Ok(addrs)) => out.extend(addrs.map(|a| a.ip())),
            Ok(Err(e)) => tracing::warn!(%url, error = %e, "resolve the host of an endpoint"),
            Err(_) => tracing::warn!(%url, "resolve the host of an endpoint: no answer within 2 s"),
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

// ---------------------------------------------------------------------------------------------
// Cache.

/// What the cache task reports.
#[derive(Debug, Clone)]
pub enum SourceUpdate {
    /// A fresh list: replace everything.
    Reset(Listing),
    /// One page of a list in progress, read at `revision` ([`ServiceStore::list_paged`]): the
    /// loop keeps what it needs of its objects and drops them, until the `Reset` of the same
    /// revision completes the listing. A page or a `Reset` of another revision starts over (a
    /// list that failed half way is simply read again).
    Page(Listing),
    /// Changes since the last update.
    Changes(Vec<Change>),
    /// Objects whose new values are invalid (sent after the changes that delete them): logged
    /// once and counted by the loop.
    Invalid(Vec<(ObjectKey, FieldError)>),
    /// When the changes sent just before were triggered (the Kubernetes source reads
    /// EndpointSlices' `endpoints.kubernetes.io/last-change-trigger-time`): observed as
    /// `kubeproxy_network_programming_duration_seconds` once a sync has applied them. Sent after
    /// its changes on the same channel, so the loop never counts a change it has not applied.
    Triggers(Vec<SystemTime>),
}

/// A listing in progress, arriving as [`SourceUpdate::Page`]s of one revision: what its pages
/// gathered so far (`T`: whatever the reader keeps of them).
#[derive(Debug)]
pub struct Paging<T>(Option<(i64, T)>);

impl<T> Default for Paging<T> {
    fn default() -> Self {
        Paging(None)
    }
}

impl<T: Default> Paging<T> {
    /// Where a page read at `revision` goes: the listing in progress if it is of that
    /// revision, else a fresh one (a list that failed half way is read again).
    pub fn page(&mut self, revision: i64) -> &mut T {
        if self.0.as_ref().is_none_or(|(r, _)| *r != revision) {
            self.0 = Some((revision, T::default()));
        }
        let (_, gathered) = self.0.get_or_insert_with(|| (revision, T::default()));
        gathered
    }

    /// Ends the listing read at `revision` (its [`SourceUpdate::Reset`]): what its pages
    /// gathered, nothing if they were of another revision.
    pub fn finish(&mut self, revision: i64) -> T {
        match self.0.take() {
            Some((r, gathered)) if r == revision => gathered,
            _ => T::default(),
        }
    }
}

/// Lists, then watches from the listed revision, forwarding updates; re-lists with backoff
/// whenever the watch breaks or the store changed in a way a listing must judge. Runs until
/// `out` is closed.
pub async fn service_cache<S: ServiceStore>(store: S, out: mpsc::Sender<SourceUpdate>) {
    let mut backoff = Backoff::new();
    loop {
        let listing = match store.list_paged(&out).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "listing services failed; keeping the dataplane as it is");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        backoff = Backoff::new();
        let rev = listing.revision;
        if out.send(SourceUpdate::Reset(listing)).await.is_err() {
            return;
        }
        let (tx, mut rx) = mpsc::channel(256);
        let w = store.clone();
        let mut watch_task = tokio::spawn(async move { w.watch(rev, tx).await });
        loop {
            tokio::select! {
                up = rx.recv() => {
                    let Some(up) = up else { break };
                    if out.send(up).await.is_err() {
                        watch_task.abort();
                        return;
                    }
                }
                res = &mut watch_task => {
                    match res.unwrap_or_else(|j| SourceError::WatchEnded(j.to_string())) {
                        e @ SourceError::StoreChanged(_) => tracing::warn!(reason = %e, "service store changed"),
                        e => tracing::warn!(error = %e, "service watch broke; re-listing"),
                    }
                    // What the watch sent before it ended (a listing supersedes it anyway).
                    while let Ok(up) = rx.try_recv() {
                        if out.send(up).await.is_err() {
                            return;
                        }
                    }
                    break;
                }
            }
        }
        watch_task.abort();
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
