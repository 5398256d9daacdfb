//! The standalone service source (objects in etcd), the service loop that drives a dataplane,
//! and its metrics.
//!
//! Why this shape:
//! - Key layout: `<prefix>/services/services/<namespace>/<name>` and
//!   `<prefix>/services/endpointslices/<namespace>/<name>`, each value the object's canonical
//!   JSON ([`Object::to_json`]). One key per object means a `twilld apply` of one object is one
//!   put and a watch event names exactly what changed; namespaces and names are DNS labels (no
//!   `/`), so keys parse back unambiguously. Writes of several objects go in one transaction:
//!   a manifest is applied whole or not at all.
//! - [`ServiceStore`] is the seam (etcd, or [`MemServiceStore`] in tests); the cache task
//!   ([`service_cache`]) lists, then watches from the listed revision, and re-lists with
//!   backoff whenever the watch breaks (compaction, etcd restart), like the lease cache. It sends
//!   **changes**, not whole snapshots: the loop recomputes only the Services a change touches,
//!   which keeps one endpoint change far below the 10 ms budget with 10k services.
//! - An object in etcd that does not parse or validate (written by hand with etcdctl) is
//!   treated as absent, logged once by the loop and counted: the state is always a function of
//!   the valid stored objects, the same after a re-list as live.
//! - A store that suddenly lost everything is not believed at once ([`StoreGuard`]): a fresh or
//!   wiped etcd would otherwise flush every node's services at the same moment. The watch covers
//!   the whole prefix so the network config key's deletion arrives with the objects' (one
//!   revision, when the prefix is wiped), and any change that could empty the store — the config
//!   key written or deleted, the last object deleted — ends the watch so a listing, with the
//!   store's facts ([`StoreFacts`]: cluster id, revision, config key), is what gets judged.
//! - [`run_services`] never blocks on the source: before the first successful list it programs
//!   nothing (and deletes nothing — a restarted agent keeps the pinned state it finds); when
//!   etcd goes away, the dataplane keeps what it has. Each batch of changes is planned against
//!   what was applied for the touched frontends only; the resync timer and any failed apply
//!   plan everything against what the dataplane reports ([`LbDataplane::observed`]), which heals
//!   drift. Dataplane calls are synchronous and run on the blocking pool.

pub mod kube;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use etcd_client::{Client, EventType, GetOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::{Notify, mpsc};

use crate::services::desired::{LbState, NodeIdentity, RefuseReason, Refused, Reserved, Snapshot};
use crate::services::lb::{FrontendKey, LbDataplane, LbPlan, LbService, plan_refs};
use crate::services::model::{
    Change, FieldError, Kind, Object, ObjectKey, endpoint_slice_from_json, service_from_json,
};
use crate::shared::backoff::Backoff;
use crate::shared::etcd::{EtcdTls, WatchEnd, watch_prefix};

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
    /// facts): the service loop judges a listing that lost everything by them ([`StoreGuard`]).
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
    /// judged on a listing ([`StoreGuard`]).
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

// ---------------------------------------------------------------------------------------------
// Key layout.

fn kind_dir(kind: Kind) -> &'static str {
    match kind {
        Kind::Service => "services",
        Kind::EndpointSlice => "endpointslices",
    }
}

/// `<prefix>/services/` (prefix without a trailing `/`).
pub fn services_prefix(prefix: &str) -> String {
    format!("{}/services/", prefix.trim_end_matches('/'))
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

/// The etcd key of an object.
pub fn object_key(prefix: &str, key: &ObjectKey) -> String {
    format!(
        "{}{}/{}/{}",
        services_prefix(prefix),
        kind_dir(key.kind),
        key.namespace,
        key.name
    )
}

/// The object an etcd key names, if it is one of ours.
pub fn parse_object_key(prefix: &str, key: &str) -> Option<ObjectKey> {
    let rest = key.strip_prefix(&services_prefix(prefix))?;
    let mut it = rest.split('/');
    let kind = match it.next()? {
        "services" => Kind::Service,
        "endpointslices" => Kind::EndpointSlice,
        _ => return None,
    };
    let (namespace, name) = (it.next()?, it.next()?);
    if it.next().is_some() || namespace.is_empty() || name.is_empty() {
        return None;
    }
    Some(ObjectKey {
        kind,
        namespace: namespace.into(),
        name: name.into(),
    })
}

/// Decodes a stored value; the object must be the one its key names.
pub fn decode(key: &ObjectKey, value: &[u8]) -> Result<Object, FieldError> {
    let o = match key.kind {
        Kind::Service => Object::Service(service_from_json(value)?),
        Kind::EndpointSlice => Object::EndpointSlice(endpoint_slice_from_json(value)?),
    };
    if o.key() != *key {
        return Err(FieldError {
            field: "metadata".into(),
            message: format!("the value is {}, the key names {key}", o.key()),
        });
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// etcd.

/// The etcd store of Services and EndpointSlices.
#[derive(Clone)]
pub struct EtcdServiceStore {
    client: Client,
    prefix: String,
    /// The most operations one transaction may hold (etcd's `--max-txn-ops`).
    max_txn_ops: usize,
}

fn etcd(
    op: &'static str,
    key: impl Into<String>,
) -> impl FnOnce(etcd_client::Error) -> SourceError {
    let key = key.into();
    move |cause| SourceError::Etcd { op, key, cause }
}

impl EtcdServiceStore {
    /// Uses an existing client (the agent's).
    pub fn new(client: Client, prefix: &str) -> Self {
        EtcdServiceStore {
            client,
            prefix: prefix.trim_end_matches('/').to_string(),
            max_txn_ops: MAX_TXN_OPS,
        }
    }

    /// Sets the most operations one transaction may hold (etcd's `--max-txn-ops`, when the
    /// server was started with another value than its default, [`MAX_TXN_OPS`]).
    #[must_use]
    pub fn with_max_txn_ops(mut self, max: usize) -> Self {
        self.max_txn_ops = max;
        self
    }

    /// Connects to `endpoints` with the agent's client settings.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        tls: &EtcdTls,
    ) -> Result<Self, SourceError> {
        let client = crate::shared::etcd::connect_client(endpoints, tls).await?;
        Ok(Self::new(client, prefix))
    }

    /// The key of an object.
    pub fn key(&self, key: &ObjectKey) -> String {
        object_key(&self.prefix, key)
    }

    fn decode_kv(
        &self,
        kv: &etcd_client::KeyValue,
    ) -> Option<(ObjectKey, Result<Object, FieldError>)> {
        let key = parse_object_key(&self.prefix, kv.key_str().ok()?)?;
        let o = decode(&key, kv.value());
        Some((key, o))
    }
}

impl EtcdServiceStore {
    /// Objects per page of a listing.
    const PAGE: i64 = 1000;

    /// The network config key (`<prefix>/config`).
    fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    /// The end of the services prefix's range (the prefix with its last byte incremented).
    fn services_end(&self) -> Vec<u8> {
        let mut end = services_prefix(&self.prefix).into_bytes();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        end
    }

    /// Reads one page of the listing from `start` (at `revision`, or the current one when 0):
    /// the decoded page (its revision set), where the next one starts, and etcd's cluster id.
    async fn page(
        &self,
        start: Vec<u8>,
        revision: i64,
    ) -> Result<(Listing, Option<Vec<u8>>, u64), SourceError> {
        let prefix = services_prefix(&self.prefix);
        let mut opts = GetOptions::new()
            .with_range(self.services_end())
            .with_limit(Self::PAGE);
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let resp = self
            .client
            .clone()
            .get(start, Some(opts))
            .await
            .map_err(etcd("get", &prefix))?;
        let header = resp.header();
        let mut out = Listing {
            revision: if revision > 0 {
                revision
            } else {
                header.map_or(0, etcd_client::ResponseHeader::revision)
            },
            ..Listing::default()
        };
        for kv in resp.kvs() {
            match self.decode_kv(kv) {
                Some((_, Ok(o))) => out.objects.push(o),
                Some((k, Err(e))) => out.invalid.push((k, e)),
                None => {}
            }
        }
        let next = match resp.kvs().last() {
            Some(kv) if resp.more() => {
                let mut start = kv.key().to_vec();
                start.push(0);
                Some(start)
            }
            _ => None,
        };
        Ok((
            out,
            next,
            header.map_or(0, etcd_client::ResponseHeader::cluster_id),
        ))
    }

    /// The store's facts at `revision`: the network config key's state then.
    async fn facts(&self, revision: i64, cluster_id: u64) -> Result<StoreFacts, SourceError> {
        let key = self.config_key();
        let resp = self
            .client
            .clone()
            .get(
                key.as_str(),
                Some(GetOptions::new().with_revision(revision).with_keys_only()),
            )
            .await
            .map_err(etcd("get", &key))?;
        Ok(StoreFacts {
            cluster_id,
            revision,
            config: resp.kvs().first().map(etcd_client::KeyValue::mod_revision),
        })
    }

    /// How many keys the services prefix holds at `revision`.
    async fn count_at(&self, revision: i64) -> Result<i64, SourceError> {
        let prefix = services_prefix(&self.prefix);
        let resp = self
            .client
            .clone()
            .get(
                prefix.as_str(),
                Some(
                    GetOptions::new()
                        .with_range(self.services_end())
                        .with_count_only()
                        .with_revision(revision),
                ),
            )
            .await
            .map_err(etcd("count", &prefix))?;
        Ok(resp.count())
    }

    /// Sends one decoded watch response on, unless the store changed in a way a listing must
    /// judge (see [`ServiceStore::watch`]).
    async fn forward(
        &self,
        batch: Vec<(i64, Watched)>,
        tx: &mpsc::Sender<SourceUpdate>,
    ) -> Result<(), SourceError> {
        let revision = batch.iter().map(|(r, _)| *r).max().unwrap_or_default();
        let mut changes = Vec::new();
        let mut invalid = Vec::new();
        let mut deletes = false;
        for (_, w) in batch {
            match w {
                Watched::Config { deleted } => {
                    return Err(SourceError::StoreChanged(format!(
                        "the network config key {} was {}",
                        self.config_key(),
                        if deleted { "deleted" } else { "written" }
                    )));
                }
                Watched::Change(c) => {
                    deletes |= matches!(c, Change::Delete(_));
                    changes.push(c);
                }
                Watched::Invalid(k, e) => {
                    changes.push(Change::Delete(k.clone()));
                    invalid.push((k, e));
                }
            }
        }
        if deletes && self.count_at(revision).await? == 0 {
            return Err(SourceError::StoreChanged(format!(
                "no service object is left under {} at revision {revision}",
                services_prefix(&self.prefix)
            )));
        }
        let closed = || SourceError::WatchEnded("receiver gone".into());
        if !changes.is_empty() {
            tx.send(SourceUpdate::Changes(changes))
                .await
                .map_err(|_| closed())?;
        }
        if !invalid.is_empty() {
            tx.send(SourceUpdate::Invalid(invalid))
                .await
                .map_err(|_| closed())?;
        }
        Ok(())
    }
}

/// One event of the etcd watch, decoded.
#[expect(
    clippy::large_enum_variant,
    reason = "short-lived, moved not copied, as `Change`"
)]
enum Watched {
    /// A service object changed.
    Change(Change),
    /// A service object's new value is invalid (treated as a delete).
    Invalid(ObjectKey, FieldError),
    /// The network config key was written or deleted.
    Config {
        /// Deleted (else written).
        deleted: bool,
    },
}

impl ServiceStore for EtcdServiceStore {
    async fn list(&self) -> Result<Listing, SourceError> {
        let mut start = services_prefix(&self.prefix).into_bytes();
        let mut out = Listing::default();
        loop {
            let (page, next, cluster_id) = self.page(start, out.revision).await?;
            out.revision = page.revision;
            out.objects.extend(page.objects);
            out.invalid.extend(page.invalid);
            let Some(n) = next else {
                out.facts = Some(self.facts(out.revision, cluster_id).await?);
                return Ok(out);
            };
            start = n;
        }
    }

    async fn list_paged(&self, pages: &mpsc::Sender<SourceUpdate>) -> Result<Listing, SourceError> {
        let mut start = services_prefix(&self.prefix).into_bytes();
        let mut revision = 0;
        loop {
            let (mut page, next, cluster_id) = self.page(start, revision).await?;
            revision = page.revision;
            let Some(n) = next else {
                page.facts = Some(self.facts(revision, cluster_id).await?);
                return Ok(page);
            };
            start = n;
            if pages.send(SourceUpdate::Page(page)).await.is_err() {
                return Err(SourceError::WatchEnded("receiver gone".into()));
            }
        }
    }

    async fn watch(&self, revision: i64, tx: mpsc::Sender<SourceUpdate>) -> SourceError {
        // The whole prefix, so the config key's events arrive in the same stream, ordered with
        // the services' (a wipe deletes both at one revision). Leases' events are dropped.
        let root = format!("{}/", self.prefix);
        let config_key = self.config_key();
        let (itx, mut irx) = mpsc::channel(64);
        let watch = watch_prefix(&self.client, &root, revision, &itx, |ev| {
            let kv = ev.kv()?;
            let key_str = kv.key_str().ok()?;
            let deleted = ev.event_type() == EventType::Delete;
            if key_str == config_key {
                return Some((kv.mod_revision(), Watched::Config { deleted }));
            }
            let key = parse_object_key(&self.prefix, key_str)?;
            let w = if deleted {
                Watched::Change(Change::Delete(key))
            } else {
                match decode(&key, kv.value()) {
                    Ok(o) => Watched::Change(Change::Put(o)),
                    Err(e) => Watched::Invalid(key, e),
                }
            };
            Some((kv.mod_revision(), w))
        });
        tokio::pin!(watch);
        loop {
            tokio::select! {
                end = &mut watch => {
                    return match end {
                        WatchEnd::Etcd(e) => etcd("watch", &root)(e),
                        WatchEnd::Ended(why) => SourceError::WatchEnded(why),
                    };
                }
                batch = irx.recv() => {
                    let Some(batch) = batch else {
                        return SourceError::WatchEnded("watch channel closed".into());
                    };
                    if let Err(e) = self.forward(batch, &tx).await {
                        return e;
                    }
                }
            }
        }
    }

    async fn put_all(&self, objects: &[Object]) -> Result<(), SourceError> {
        if objects.len() > self.max_txn_ops {
            return Err(SourceError::TooMany {
                count: objects.len(),
                max: self.max_txn_ops,
            });
        }
        let ops: Vec<TxnOp> = objects
            .iter()
            .map(|o| TxnOp::put(self.key(&o.key()), o.to_json(), None))
            .collect();
        let what = services_prefix(&self.prefix);
        self.client
            .clone()
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(etcd("txn", what))?;
        Ok(())
    }

    async fn delete_all(&self, keys: &[ObjectKey]) -> Result<Vec<bool>, SourceError> {
        if keys.len() > self.max_txn_ops {
            return Err(SourceError::TooMany {
                count: keys.len(),
                max: self.max_txn_ops,
            });
        }
        let ops: Vec<TxnOp> = keys
            .iter()
            .map(|k| TxnOp::delete(self.key(k), None))
            .collect();
        let what = services_prefix(&self.prefix);
        let resp = self
            .client
            .clone()
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(etcd("txn", what))?;
        Ok(resp
            .op_responses()
            .iter()
            .map(|r| matches!(r, TxnOpResponse::Delete(d) if d.deleted() > 0))
            .collect())
    }
}

// ---------------------------------------------------------------------------------------------
// In-memory fake.

/// What the in-memory store's log records, in revision order.
#[derive(Debug, Clone)]
#[expect(clippy::large_enum_variant, reason = "a test fake")]
enum MemEvent {
    Change(Change),
    Invalid(ObjectKey, FieldError),
    Config { deleted: bool },
}

struct MemInner {
    objects: BTreeMap<ObjectKey, Object>,
    invalid: BTreeMap<ObjectKey, FieldError>,
    log: Vec<(i64, MemEvent)>,
    revision: i64,
    cluster_id: u64,
    /// The network config key's modification revision; `None`: absent.
    config: Option<i64>,
    down: bool,
    generation: u64,
    /// Writes left before writes start failing, and whether a failing write is applied anyway
    /// (an answer lost after the commit); `None`: writes succeed.
    write_failures: Option<(usize, bool)>,
}

impl Default for MemInner {
    fn default() -> Self {
        MemInner {
            objects: BTreeMap::new(),
            invalid: BTreeMap::new(),
            log: Vec::new(),
            revision: 1,
            cluster_id: 1,
            config: Some(1),
            down: false,
            generation: 0,
            write_failures: None,
        }
    }
}

impl MemInner {
    fn bump(&mut self) -> i64 {
        self.revision += 1;
        self.revision
    }

    /// Whether the next write fails (see [`MemServiceStore::fail_writes`]): `Some(applied)`.
    fn write_fails(&mut self) -> Option<bool> {
        match &mut self.write_failures {
            Some((0, applied)) => Some(*applied),
            Some((n, _)) => {
                *n -= 1;
                None
            }
            None => None,
        }
    }
}

/// In-memory store for tests: same semantics (revisions, all-or-nothing writes, watches that
/// can be broken, a network config key present from the start, a cluster id).
#[derive(Clone, Default)]
pub struct MemServiceStore {
    inner: Arc<Mutex<MemInner>>,
    notify: Arc<Notify>,
}

impl MemServiceStore {
    /// An empty store (with its network config key).
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        self.inner.lock().expect("mem service store lock")
    }

    /// Makes every call fail (and breaks watches) until set back.
    pub fn set_down(&self, down: bool) {
        let mut g = self.lock();
        g.down = down;
        g.generation += 1;
        drop(g);
        self.notify.notify_waiters();
    }

    /// Breaks running watches (as a compaction would); they must re-list.
    pub fn break_watches(&self) {
        self.lock().generation += 1;
        self.notify.notify_waiters();
    }

    /// Stores an invalid value under `key` (as a hand-written etcdctl put would).
    pub fn put_invalid(&self, key: ObjectKey, error: FieldError) {
        let mut g = self.lock();
        let rev = g.bump();
        g.objects.remove(&key);
        g.invalid.insert(key.clone(), error.clone());
        g.log.push((rev, MemEvent::Invalid(key, error)));
        drop(g);
        self.notify.notify_waiters();
    }

    /// Writes (`true`) or deletes the network config key.
    pub fn set_config(&self, present: bool) {
        let mut g = self.lock();
        let rev = g.bump();
        g.config = present.then_some(rev);
        g.log.push((rev, MemEvent::Config { deleted: !present }));
        drop(g);
        self.notify.notify_waiters();
    }

    /// Deletes everything, the config key included, at one revision (`etcdctl del --prefix`).
    pub fn wipe(&self) {
        let mut g = self.lock();
        let rev = g.bump();
        let keys: Vec<ObjectKey> = g.objects.keys().chain(g.invalid.keys()).cloned().collect();
        g.objects.clear();
        g.invalid.clear();
        for k in keys {
            g.log.push((rev, MemEvent::Change(Change::Delete(k))));
        }
        if g.config.take().is_some() {
            g.log.push((rev, MemEvent::Config { deleted: true }));
        }
        drop(g);
        self.notify.notify_waiters();
    }

    /// Replaces the store with a fresh, empty etcd cluster (a new cluster id, revisions from 1,
    /// the config key written at revision 1 if `with_config`); running watches break.
    pub fn replace_cluster(&self, with_config: bool) {
        let mut g = self.lock();
        let cluster_id = g.cluster_id + 1;
        let generation = g.generation + 1;
        *g = MemInner {
            cluster_id,
            generation,
            config: with_config.then_some(1),
            ..MemInner::default()
        };
        drop(g);
        self.notify.notify_waiters();
    }

    /// Lets `after` more writes (`put_all`, `delete_all`) succeed, then makes every later one
    /// fail with [`SourceError::Unavailable`]; with `applied`, a failing write is applied
    /// anyway (its answer lost after the commit).
    pub fn fail_writes(&self, after: usize, applied: bool) {
        self.lock().write_failures = Some((after, applied));
    }

    /// Every valid object.
    pub fn objects(&self) -> Vec<Object> {
        self.lock().objects.values().cloned().collect()
    }
}

impl ServiceStore for MemServiceStore {
    async fn list(&self) -> Result<Listing, SourceError> {
        let g = self.lock();
        if g.down {
            return Err(SourceError::Unavailable);
        }
        Ok(Listing {
            objects: g.objects.values().cloned().collect(),
            invalid: g
                .invalid
                .iter()
                .map(|(k, e)| (k.clone(), e.clone()))
                .collect(),
            revision: g.revision,
            facts: Some(StoreFacts {
                cluster_id: g.cluster_id,
                revision: g.revision,
                config: g.config,
            }),
        })
    }

    async fn watch(&self, revision: i64, tx: mpsc::Sender<SourceUpdate>) -> SourceError {
        let (mut seen, generation) = {
            let g = self.lock();
            if g.down {
                return SourceError::Unavailable;
            }
            (revision, g.generation)
        };
        loop {
            let notified = self.notify.notified();
            let (changes, invalid) = {
                let g = self.lock();
                if g.generation != generation {
                    return SourceError::WatchEnded("broken by the test".into());
                }
                let mut changes = Vec::new();
                let mut invalid = Vec::new();
                for (_, ev) in g.log.iter().filter(|(r, _)| *r > seen) {
                    match ev {
                        MemEvent::Config { deleted } => {
                            return SourceError::StoreChanged(format!(
                                "the network config key was {}",
                                if *deleted { "deleted" } else { "written" }
                            ));
                        }
                        MemEvent::Change(c) => changes.push(c.clone()),
                        MemEvent::Invalid(k, e) => {
                            changes.push(Change::Delete(k.clone()));
                            invalid.push((k.clone(), e.clone()));
                        }
                    }
                }
                let deletes = changes.iter().any(|c| matches!(c, Change::Delete(_)));
                if deletes && g.objects.is_empty() && g.invalid.is_empty() {
                    return SourceError::StoreChanged("no service object is left".into());
                }
                seen = g.revision;
                (changes, invalid)
            };
            if !changes.is_empty() && tx.send(SourceUpdate::Changes(changes)).await.is_err() {
                return SourceError::WatchEnded("receiver gone".into());
            }
            if !invalid.is_empty() && tx.send(SourceUpdate::Invalid(invalid)).await.is_err() {
                return SourceError::WatchEnded("receiver gone".into());
            }
            notified.await;
        }
    }

    async fn put_all(&self, objects: &[Object]) -> Result<(), SourceError> {
        let mut g = self.lock();
        if g.down {
            return Err(SourceError::Unavailable);
        }
        let fail = g.write_fails();
        if fail == Some(false) {
            return Err(SourceError::Unavailable);
        }
        let rev = g.bump();
        for o in objects {
            g.invalid.remove(&o.key());
            g.objects.insert(o.key(), o.clone());
            g.log.push((rev, MemEvent::Change(Change::Put(o.clone()))));
        }
        drop(g);
        self.notify.notify_waiters();
        if fail == Some(true) {
            return Err(SourceError::Unavailable);
        }
        Ok(())
    }

    async fn delete_all(&self, keys: &[ObjectKey]) -> Result<Vec<bool>, SourceError> {
        let mut g = self.lock();
        if g.down {
            return Err(SourceError::Unavailable);
        }
        let fail = g.write_fails();
        if fail == Some(false) {
            return Err(SourceError::Unavailable);
        }
        let rev = g.bump();
        let mut out = Vec::new();
        for k in keys {
            let existed = g.objects.remove(k).is_some() | g.invalid.remove(k).is_some();
            out.push(existed);
            g.log
                .push((rev, MemEvent::Change(Change::Delete(k.clone()))));
        }
        drop(g);
        self.notify.notify_waiters();
        if fail == Some(true) {
            return Err(SourceError::Unavailable);
        }
        Ok(out)
    }
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

// ---------------------------------------------------------------------------------------------
// The guard against a store that lost everything.

/// What the loop does with a listing ([`StoreGuard::judge`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Act on it.
    Act,
    /// Act on it: the store that was suspect is confirmed (its config key was written again,
    /// or it holds objects).
    Confirmed,
    /// Keep the dataplane as it is and wait: the listing lost everything and the store looks
    /// new or wiped. `first`: the store just became suspect (warn and count once).
    Hold {
        /// Why, for the log.
        reasons: Vec<String>,
        /// The store just became suspect.
        first: bool,
    },
}

/// Judges listings that lost everything, so a fresh or wiped etcd does not flush every node's
/// services at once.
///
/// A listing is suspect when it is empty while the node holds services (in its state or its
/// dataplane) and the store looks new or wiped: the network config key is absent, etcd's cluster
/// id changed, or the revision went backwards. A suspect listing (and every change after it) is
/// held; the dataplane keeps what it has. The store is confirmed, and the next listing acted
/// on, once its config key exists and was written after the suspect listing was read (an
/// operator's deliberate step), or once it holds objects again. An empty listing with the
/// config key present, the same cluster and a revision that only moved forward is an ordinary
/// deletion of everything: acted on at once. Listings without facts (the Kubernetes source)
/// are always acted on.
#[derive(Debug, Clone, Default)]
pub struct StoreGuard {
    /// The facts of the last listing acted on.
    last: Option<StoreFacts>,
    /// The listing held back while the store is suspect.
    suspect: Option<StoreFacts>,
}

impl StoreGuard {
    /// While suspect: the facts of the listing that made it so.
    pub fn suspect(&self) -> Option<StoreFacts> {
        self.suspect
    }

    /// Objects arrived in the suspect store (watched after its empty listing): confirms it if
    /// its network config key exists (a store in use again); else it stays suspect.
    pub fn objects_arrived(&mut self) -> bool {
        match self.suspect {
            Some(s) if s.config.is_some() => {
                self.suspect = None;
                self.last = Some(s);
                true
            }
            _ => false,
        }
    }

    /// What to do with a listing with `facts`; `empty`: it holds no object (valid or not);
    /// `have_state`: the node holds services (known objects or programmed frontends).
    pub fn judge(&mut self, facts: Option<StoreFacts>, empty: bool, have_state: bool) -> Verdict {
        let Some(f) = facts else {
            return Verdict::Act;
        };
        if let Some(s) = self.suspect {
            let rewritten = f.cluster_id == s.cluster_id
                && f.revision >= s.revision
                && f.config.is_some_and(|c| c > s.revision);
            if rewritten || (!empty && f.config.is_some()) {
                self.suspect = None;
                self.last = Some(f);
                return Verdict::Confirmed;
            }
            if f.cluster_id != s.cluster_id || f.revision < s.revision {
                self.suspect = Some(f); // another new store: its config must be written anew
            }
            return Verdict::Hold {
                reasons: Self::reasons(self.last, f),
                first: false,
            };
        }
        if !empty || !have_state {
            self.last = Some(f);
            return Verdict::Act;
        }
        let reasons = Self::reasons(self.last, f);
        if reasons.is_empty() {
            self.last = Some(f);
            return Verdict::Act;
        }
        self.suspect = Some(f);
        Verdict::Hold {
            reasons,
            first: true,
        }
    }

    fn reasons(last: Option<StoreFacts>, f: StoreFacts) -> Vec<String> {
        let mut out = Vec::new();
        if f.config.is_none() {
            out.push("the network config key is absent".to_string());
        }
        if let Some(l) = last {
            if l.cluster_id != f.cluster_id {
                out.push(format!(
                    "the etcd cluster id changed from {:x} to {:x}",
                    l.cluster_id, f.cluster_id
                ));
            } else if f.revision < l.revision {
                out.push(format!(
                    "the store's revision went backwards from {} to {}",
                    l.revision, f.revision
                ));
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics.

/// Upper bounds of the sync duration histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// `kubeproxy_sync_proxy_rules_duration_seconds`' buckets (kube-proxy's: 1 ms doubling 15 times).
const KUBE_PROXY_SYNC_BUCKETS: [f64; 15] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192, 16.384,
];

/// `kubeproxy_network_programming_duration_seconds`' buckets (kube-proxy's: 0.25 s, 0.5 s, each
/// second to 59 s, every 5 s to 115 s, every 30 s to 5 min).
fn network_programming_buckets() -> Vec<f64> {
    let mut b = vec![0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    b
}

/// A Prometheus histogram whose bounds are given at each call (they are constants).
#[derive(Default)]
struct Hist {
    buckets: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Hist {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        self.buckets.resize(bounds.len(), 0);
        for (i, b) in bounds.iter().enumerate() {
            if v <= *b {
                self.buckets[i] += 1;
            }
        }
        self.count += 1;
        self.sum += v;
    }

    fn render(&self, o: &mut String, name: &str, help: &str, bounds: &[f64]) {
        let _ = writeln!(o, "# HELP {name} {help}");
        let _ = writeln!(o, "# TYPE {name} histogram");
        for (i, b) in bounds.iter().enumerate() {
            let n = self.buckets.get(i).copied().unwrap_or_default();
            let _ = writeln!(o, "{name}_bucket{{le=\"{b}\"}} {n}");
        }
        let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(o, "{name}_sum {}", self.sum);
        let _ = writeln!(o, "{name}_count {}", self.count);
    }
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The kube-proxy-compatible part of the service loop's state: what kube-proxy exports under
/// the same names, and what its `/healthz` and `/livez` are computed from.
#[derive(Default)]
struct KubeProxyState {
    sync: Hist,
    full: Hist,
    partial: Hist,
    network_programming: Hist,
    /// The last successful sync.
    last_synced: Option<SystemTime>,
    /// The oldest update received and not yet synced (kube-proxy's `oldestPendingQueued`).
    oldest_queued: Option<SystemTime>,
    /// The newest update received.
    last_queued: Option<SystemTime>,
    service_changes: u64,
    endpoint_changes: u64,
    service_pending: u64,
    endpoint_pending: u64,
    /// Trigger times of changes received and not yet synced.
    triggers: Vec<SystemTime>,
}

#[derive(Default)]
struct MetricsInner {
    kube_proxy: KubeProxyState,
    mode: &'static str,
    reason: String,
    syncs: BTreeMap<(&'static str, &'static str), u64>,
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
    frontends: usize,
    backends: usize,
    conflicts: usize,
    invalid_objects: usize,
    /// Frontends refused, by reason label.
    refused: BTreeMap<&'static str, usize>,
    /// Listings held back right now (the store looks new or wiped).
    store_suspect: bool,
    /// Times the store became suspect.
    suspect_listings: u64,
    last_ops: usize,
    last_error: Option<String>,
}

/// The service loop's state as exported (Prometheus text, appended to `/metrics` by the agent).
#[derive(Default)]
pub struct ServiceMetrics {
    inner: Mutex<MetricsInner>,
}

impl ServiceMetrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, MetricsInner> {
        self.inner.lock().expect("service metrics lock")
    }

    fn observe(&self, kind: &'static str, ok: bool, took: Duration, ops: usize) {
        let mut g = self.lock();
        *g.syncs
            .entry((kind, if ok { "ok" } else { "error" }))
            .or_default() += 1;
        let s = took.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                g.buckets[i] += 1;
            }
        }
        g.count += 1;
        g.sum += s;
        if ok {
            g.last_ops = ops;
        }
        let kp = &mut g.kube_proxy;
        kp.sync.observe(&KUBE_PROXY_SYNC_BUCKETS, s);
        if kind == "full" {
            kp.full.observe(&KUBE_PROXY_SYNC_BUCKETS, s);
        } else {
            kp.partial.observe(&KUBE_PROXY_SYNC_BUCKETS, s);
        }
        if ok {
            let now = SystemTime::now();
            kp.last_synced = Some(now);
            kp.oldest_queued = None;
            kp.service_pending = 0;
            kp.endpoint_pending = 0;
            let bounds = network_programming_buckets();
            for t in std::mem::take(&mut kp.triggers) {
                let took = now.duration_since(t).unwrap_or_default();
                kp.network_programming.observe(&bounds, took.as_secs_f64());
            }
        }
    }

    /// Records updates received from the source and not yet synced: `services` and
    /// `endpoints` objects changed (kube-proxy's `QueuedUpdate`, and its change counters).
    pub(crate) fn queued(&self, services: u64, endpoints: u64) {
        let now = SystemTime::now();
        let mut g = self.lock();
        let kp = &mut g.kube_proxy;
        kp.oldest_queued.get_or_insert(now);
        kp.last_queued = Some(now);
        kp.service_changes += services;
        kp.endpoint_changes += endpoints;
        kp.service_pending += services;
        kp.endpoint_pending += endpoints;
    }

    /// What kube-proxy's health server decides on: the oldest update received and not yet
    /// synced, and the last successful sync (`None`: none yet).
    pub fn proxy_health_times(&self) -> (Option<SystemTime>, Option<SystemTime>) {
        let g = self.lock();
        (g.kube_proxy.oldest_queued, g.kube_proxy.last_synced)
    }

    /// Why the dataplane was chosen (`requested`, or `auto`'s reason), a label of
    /// `twill_services_dataplane_info`.
    pub fn set_dataplane_reason(&self, reason: &str) {
        self.lock().reason = reason.replace(['"', '\\', '\n'], " ");
    }

    /// The last error, if the last sync failed.
    pub fn last_error(&self) -> Option<String> {
        self.lock().last_error.clone()
    }

    /// Number of successful syncs (full + partial).
    pub fn ok_syncs(&self) -> u64 {
        self.lock()
            .syncs
            .iter()
            .filter(|((_, r), _)| *r == "ok")
            .map(|(_, n)| n)
            .sum()
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let g = self.lock();
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# HELP twill_services_dataplane_info The service proxy mode."
        );
        let _ = writeln!(o, "# TYPE twill_services_dataplane_info gauge");
        let _ = writeln!(
            o,
            "twill_services_dataplane_info{{mode=\"{}\",reason=\"{}\"}} 1",
            g.mode, g.reason
        );
        let _ = writeln!(
            o,
            "# HELP twill_services_syncs_total Service dataplane syncs."
        );
        let _ = writeln!(o, "# TYPE twill_services_syncs_total counter");
        for ((kind, result), n) in &g.syncs {
            let _ = writeln!(
                o,
                "twill_services_syncs_total{{kind=\"{kind}\",result=\"{result}\"}} {n}"
            );
        }
        let _ = writeln!(
            o,
            "# HELP twill_services_sync_duration_seconds Time to plan and apply one sync."
        );
        let _ = writeln!(o, "# TYPE twill_services_sync_duration_seconds histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                o,
                "twill_services_sync_duration_seconds_bucket{{le=\"{b}\"}} {}",
                g.buckets[i]
            );
        }
        let _ = writeln!(
            o,
            "twill_services_sync_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            g.count
        );
        let _ = writeln!(o, "twill_services_sync_duration_seconds_sum {}", g.sum);
        let _ = writeln!(o, "twill_services_sync_duration_seconds_count {}", g.count);
        for (name, help, v) in [
            (
                "frontends",
                "Frontends programmed (one per address, port, protocol).",
                g.frontends,
            ),
            (
                "backends",
                "Backends programmed, summed over frontends.",
                g.backends,
            ),
            (
                "conflicts",
                "Frontends claimed by more than one Service.",
                g.conflicts,
            ),
            (
                "invalid_objects",
                "Objects in the store that failed validation (ignored).",
                g.invalid_objects,
            ),
            (
                "last_sync_ops",
                "Upserts and deletes in the last successful sync.",
                g.last_ops,
            ),
            (
                "store_suspect",
                "1 while listings are held back because the store looks new or wiped.",
                usize::from(g.store_suspect),
            ),
        ] {
            let _ = writeln!(o, "# HELP twill_services_{name} {help}");
            let _ = writeln!(o, "# TYPE twill_services_{name} gauge");
            let _ = writeln!(o, "twill_services_{name} {v}");
        }
        let _ = writeln!(
            o,
            "# HELP twill_services_refused_frontends Frontends asked for and not programmed, by reason."
        );
        let _ = writeln!(o, "# TYPE twill_services_refused_frontends gauge");
        for reason in REFUSE_REASONS {
            let n = g.refused.get(reason.as_str()).copied().unwrap_or_default();
            let _ = writeln!(
                o,
                "twill_services_refused_frontends{{reason=\"{}\"}} {n}",
                reason.as_str()
            );
        }
        let _ = writeln!(
            o,
            "# HELP twill_services_suspect_listings_total Times a listing that lost everything was held back (new or wiped store)."
        );
        let _ = writeln!(o, "# TYPE twill_services_suspect_listings_total counter");
        let _ = writeln!(
            o,
            "twill_services_suspect_listings_total {}",
            g.suspect_listings
        );
        render_kube_proxy(&mut o, &g.kube_proxy);
        o
    }
}

/// kube-proxy's metrics, under its names, where twill's meaning is the same: a "sync" is one
/// plan-and-apply of the service loop (partial: the frontends a change touched; full: everything,
/// against what the dataplane reports).
fn render_kube_proxy(o: &mut String, kp: &KubeProxyState) {
    kp.sync.render(
        o,
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "SyncProxyRules latency in seconds",
        &KUBE_PROXY_SYNC_BUCKETS,
    );
    kp.full.render(
        o,
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "SyncProxyRules latency in seconds for full resyncs",
        &KUBE_PROXY_SYNC_BUCKETS,
    );
    kp.partial.render(
        o,
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
        "SyncProxyRules latency in seconds for partial resyncs",
        &KUBE_PROXY_SYNC_BUCKETS,
    );
    kp.network_programming.render(
        o,
        "kubeproxy_network_programming_duration_seconds",
        "In Cluster Network Programming Latency in seconds",
        &network_programming_buckets(),
    );
    for (name, help, kind, v) in [
        (
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            "gauge",
            kp.last_synced.map_or(0.0, unix_secs),
        ),
        (
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            "gauge",
            kp.last_queued.map_or(0.0, unix_secs),
        ),
    ] {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
    for (name, help, kind, v) in [
        (
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "Cumulative proxy rules Service changes",
            "counter",
            kp.service_changes,
        ),
        (
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "Cumulative proxy rules Endpoint changes",
            "counter",
            kp.endpoint_changes,
        ),
        (
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            "gauge",
            kp.service_pending,
        ),
        (
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            "gauge",
            kp.endpoint_pending,
        ),
    ] {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
}

impl ServiceMetrics {
    /// Adds the trigger times of changes just received (observed after the next good sync).
    fn add_triggers(&self, t: Vec<SystemTime>) {
        self.lock().kube_proxy.triggers.extend(t);
    }
}

/// Every reason a frontend is refused, in the order `/metrics` lists them.
const REFUSE_REASONS: [RefuseReason; 4] = [
    RefuseReason::Reserved(Reserved::Node),
    RefuseReason::Reserved(Reserved::Etcd),
    RefuseReason::Reserved(Reserved::ApiServer),
    RefuseReason::ExternalIpNotAllowed,
];

// ---------------------------------------------------------------------------------------------
// The loop.

/// Reads the node's own addresses.
pub type OwnAddresses = Arc<dyn Fn() -> Vec<IpAddr> + Send + Sync>;

/// How the service loop runs, beyond its source, node and dataplane.
#[derive(Clone)]
pub struct LoopSettings {
    /// Period of the full resync against what the dataplane reports.
    pub resync: Duration,
    /// Reads the node's own addresses, which no frontend may take ([`Reserved::Node`]): called
    /// when the loop starts and before every full resync, since addresses come and go (a pod
    /// bridge's gateway address appears with the first pod). `None`: the node's reserved
    /// addresses are the ones it was given.
    pub own_addresses: Option<OwnAddresses>,
}

impl From<Duration> for LoopSettings {
    fn from(resync: Duration) -> Self {
        LoopSettings {
            resync,
            own_addresses: None,
        }
    }
}

/// Runs a synchronous dataplane call on the blocking pool.
async fn on_dataplane<D: LbDataplane, T: Send + 'static>(
    dp: &mut Option<D>,
    f: impl FnOnce(&mut D) -> T + Send + 'static,
) -> anyhow::Result<T> {
    let mut d = dp.take().context("dataplane lost by an earlier panic")?;
    let (d, out) = tokio::task::spawn_blocking(move || {
        let out = f(&mut d);
        (d, out)
    })
    .await
    .context("dataplane call panicked")?;
    *dp = Some(d);
    Ok(out)
}

struct Loop<D: LbDataplane> {
    dp: Option<D>,
    state: LbState,
    /// What the dataplane holds, as far as we know (shared with `state` once applied).
    applied: BTreeMap<FrontendKey, Arc<LbService>>,
    /// The next sync must re-read the dataplane and plan everything.
    need_full: bool,
    metrics: Arc<ServiceMetrics>,
    conflicts: usize,
    /// A sync has succeeded since the loop started.
    synced_once: bool,
    /// Refused frontends already logged.
    refused: BTreeSet<Refused>,
    /// Objects known to be invalid, with the error already logged for each.
    invalid: BTreeMap<ObjectKey, String>,
    guard: StoreGuard,
    own_addresses: Option<OwnAddresses>,
}

impl<D: LbDataplane> Loop<D> {
    /// Re-reads the node's own addresses; returns the frontends that may have changed.
    fn refresh_own_addresses(&mut self) -> BTreeSet<FrontendKey> {
        let Some(read) = &self.own_addresses else {
            return BTreeSet::new();
        };
        let mut node = self.state.node().clone();
        node.set_own_addresses(read());
        self.state.set_node(node)
    }

    /// Replaces the known invalid objects (after a listing), logging the new ones.
    fn set_invalid(&mut self, invalid: Vec<(ObjectKey, FieldError)>) {
        let old = std::mem::take(&mut self.invalid);
        for (k, e) in invalid {
            let e = e.to_string();
            if old.get(&k) != Some(&e) {
                tracing::warn!(object = %k, error = %e, "invalid object in the store; treating it as absent");
            }
            self.invalid.insert(k, e);
        }
        self.metrics.lock().invalid_objects = self.invalid.len();
    }

    /// Records objects found invalid by a watch, logging the new ones.
    fn add_invalid(&mut self, invalid: Vec<(ObjectKey, FieldError)>) {
        for (k, e) in invalid {
            let e = e.to_string();
            if self.invalid.get(&k) != Some(&e) {
                tracing::warn!(object = %k, error = %e, "invalid object in the store; treating it as absent");
            }
            self.invalid.insert(k, e);
        }
        self.metrics.lock().invalid_objects = self.invalid.len();
    }

    /// Forgets the invalid objects `changes` replace or delete.
    fn changed(&mut self, changes: &[Change]) {
        if self.invalid.is_empty() {
            return;
        }
        for c in changes {
            match c {
                Change::Put(o) => self.invalid.remove(&o.key()),
                Change::Delete(k) => self.invalid.remove(k),
            };
        }
        self.metrics.lock().invalid_objects = self.invalid.len();
    }

    /// Logs the refused frontends not logged yet and exports how many there are.
    fn report_refused(&mut self) {
        let now: BTreeSet<Refused> = self.state.refused().cloned().collect();
        if now == self.refused {
            return;
        }
        for r in now.difference(&self.refused) {
            tracing::warn!(refused = %r, "frontend not programmed");
        }
        let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
        for r in &now {
            *counts.entry(r.reason.as_str()).or_default() += 1;
        }
        self.metrics.lock().refused = counts;
        self.refused = now;
    }

    async fn apply(&mut self, plan: LbPlan) -> anyhow::Result<Result<(), String>> {
        if plan.is_empty() {
            return Ok(Ok(()));
        }
        on_dataplane(&mut self.dp, move |d| {
            d.apply(&plan).map_err(|e| e.to_string())
        })
        .await
    }

    fn after(&mut self, kind: &'static str, start: Instant, ops: usize, res: &Result<(), String>) {
        let took = start.elapsed();
        self.metrics.observe(kind, res.is_ok(), took, ops);
        {
            let mut g = self.metrics.lock();
            g.frontends = self.applied.len();
            g.backends = self.applied.values().map(|s| s.backends.len()).sum();
            g.last_error = res.as_ref().err().cloned();
        }
        match res {
            Ok(()) => {
                self.state.ids_mut().commit();
                if !self.synced_once {
                    // Logged even when nothing changed: after a restart, `ops` says how much of
                    // what the previous run programmed had to be rewritten (nothing, normally).
                    self.synced_once = true;
                    tracing::info!(
                        kind,
                        ops,
                        ?took,
                        frontends = self.applied.len(),
                        "first service sync since start"
                    );
                }
                if ops > 0 {
                    tracing::info!(
                        kind,
                        ops,
                        ?took,
                        frontends = self.applied.len(),
                        "service dataplane synced"
                    );
                }
            }
            Err(e) => {
                self.need_full = true;
                tracing::warn!(kind, error = %e, "service dataplane sync failed; will re-read it and retry");
            }
        }
        self.report_refused();
        let conflicts = self.state.conflicts();
        if conflicts.len() != self.conflicts {
            for c in &conflicts {
                tracing::warn!(conflict = %c, "two services claim one frontend; the first by namespace/name keeps it");
            }
            self.conflicts = conflicts.len();
            self.metrics.lock().conflicts = conflicts.len();
        }
    }

    /// Plans everything against what the dataplane reports.
    async fn full(&mut self) -> anyhow::Result<()> {
        let start = Instant::now();
        match on_dataplane(&mut self.dp, |d| d.observed().map_err(|e| e.to_string())).await? {
            Ok(obs) => {
                self.state.seed(&obs);
                self.applied = obs
                    .into_iter()
                    .map(|s| (s.frontend.key(), Arc::new(s)))
                    .collect();
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the service dataplane back failed; planning against what was applied");
            }
        }
        let desired = self.state.desired_shared();
        let p = plan_refs(desired.iter(), self.applied.values().map(|s| &**s));
        let ops = p.len();
        let res = self.apply(p).await?;
        if res.is_ok() {
            self.applied = desired.into_iter().map(|s| (s.frontend.key(), s)).collect();
            self.need_full = false;
        }
        self.after("full", start, ops, &res);
        // A full sync's copies (the read-back, the plan) are gone: hand their pages back.
        crate::shared::memory::trim();
        Ok(())
    }

    /// Plans the touched frontends only.
    async fn partial(&mut self, dirty: &BTreeSet<FrontendKey>) -> anyhow::Result<()> {
        let start = Instant::now();
        let desired: Vec<Arc<LbService>> = dirty
            .iter()
            .filter_map(|k| self.state.get_shared(k))
            .collect();
        let p = plan_refs(
            desired.iter(),
            dirty
                .iter()
                .filter_map(|k| self.applied.get(k))
                .map(|s| &**s),
        );
        let ops = p.len();
        let res = self.apply(p).await?;
        if res.is_ok() {
            for k in dirty {
                self.applied.remove(k);
            }
            self.applied
                .extend(desired.into_iter().map(|s| (s.frontend.key(), s)));
        }
        self.after("partial", start, ops, &res);
        Ok(())
    }
}

/// Drives `dataplane` from `store` until the task is aborted: applies a plan on every change
/// and a full, read-back-based plan every `settings.resync` (and after any failure). Returns
/// only if the dataplane panicked or the source task died.
///
/// The agent calls it once, spawned, after it knows the node's name and addresses:
/// `tokio::spawn(run_services(EtcdServiceStore::new(client, &prefix), node, dp, resync, metrics))`.
pub async fn run_services<S: ServiceStore, D: LbDataplane>(
    store: S,
    node: NodeIdentity,
    dataplane: D,
    settings: impl Into<LoopSettings> + Send,
    metrics: Arc<ServiceMetrics>,
) -> anyhow::Result<()> {
    run_services_with(
        |tx| service_cache(store, tx),
        node,
        dataplane,
        settings,
        metrics,
    )
    .await
}

/// [`run_services`] fed by any source: `source` gets the sender of the loop's channel and
/// returns the task that lists and watches (the etcd cache, [`service_cache`], or the Kubernetes
/// watchers in [`crate::services::source::kube`]). The task is spawned, and aborted when the loop ends.
/// A source sends a [`SourceUpdate::Reset`] after every (re-)list and
/// [`SourceUpdate::Changes`] in between; it never needs to stop.
pub async fn run_services_with<F, Fut, D>(
    source: F,
    node: NodeIdentity,
    dataplane: D,
    settings: impl Into<LoopSettings> + Send,
    metrics: Arc<ServiceMetrics>,
) -> anyhow::Result<()>
where
    F: FnOnce(mpsc::Sender<SourceUpdate>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
    D: LbDataplane,
{
    let settings = settings.into();
    metrics.lock().mode = dataplane.mode();
    let mut lp = Loop {
        dp: Some(dataplane),
        state: LbState::new(node),
        applied: BTreeMap::new(),
        need_full: true,
        metrics,
        conflicts: 0,
        synced_once: false,
        refused: BTreeSet::new(),
        invalid: BTreeMap::new(),
        guard: StoreGuard::default(),
        own_addresses: settings.own_addresses,
    };
    lp.refresh_own_addresses();
    // Re-derive the ids the dataplane already uses before anything is computed.
    match on_dataplane(&mut lp.dp, |d| d.observed().map_err(|e| e.to_string())).await? {
        Ok(obs) => {
            tracing::info!(frontends = obs.len(), "service dataplane read back");
            lp.state.seed(&obs);
            lp.applied = obs
                .into_iter()
                .map(|s| (s.frontend.key(), Arc::new(s)))
                .collect();
        }
        Err(e) => tracing::warn!(error = %e, "reading the service dataplane back failed"),
    }
    let (tx, mut rx) = mpsc::channel(64);
    let cache = tokio::spawn(source(tx));
    let _guard = AbortOnDrop(cache);
    let mut have_snapshot = false;
    // While the store is suspect (see StoreGuard): what it holds, from its held (empty)
    // listing and the changes since.
    let mut held: Option<Snapshot> = None;
    // A listing arriving page by page: its revision, what is kept of it, its invalid objects.
    let mut staged: Option<(i64, Snapshot, Vec<Invalid>)> = None;
    let mut tick = tokio::time::interval(settings.resync.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut backoff = Backoff::new();
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let retry = async move {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            up = rx.recv() => {
                let Some(up) = up else { anyhow::bail!("service source task stopped") };
                let mut dirty = BTreeSet::new();
                let mut only_pages = true;
                let mut pending = vec![up];
                while let Ok(more) = rx.try_recv() {
                    pending.push(more);
                }
                for up in pending {
                    only_pages &= matches!(up, SourceUpdate::Page(_));
                    match up {
                        SourceUpdate::Page(l) => {
                            let (svcs, eps) = count_kinds(l.objects.iter().map(Object::key));
                            lp.metrics.queued(svcs, eps);
                            let st = match staged.take() {
                                Some(st) if st.0 == l.revision => st,
                                _ => (l.revision, Snapshot::default(), Vec::new()),
                            };
                            let (_, snap, invalid) = staged.insert(st);
                            invalid.extend(l.invalid);
                            for o in l.objects {
                                snap.put(o);
                            }
                        }
                        SourceUpdate::Reset(l) => {
                            let (mut snap, mut invalid) = match staged.take() {
                                Some((rev, snap, inv)) if rev == l.revision => (snap, inv),
                                _ => (Snapshot::default(), Vec::new()),
                            };
                            let empty = l.objects.is_empty()
                                && l.invalid.is_empty()
                                && invalid.is_empty()
                                && snap.services().is_empty()
                                && snap.slice_count() == 0;
                            let snapshot = lp.state.snapshot();
                            let have_state = !snapshot.services().is_empty()
                                || snapshot.slice_count() > 0
                                || !lp.applied.is_empty();
                            match lp.guard.judge(l.facts, empty, have_state) {
                                Verdict::Act => {}
                                Verdict::Confirmed => {
                                    tracing::warn!("the service store is confirmed (its network config key was written again, or it holds objects); acting on its listing");
                                    lp.metrics.lock().store_suspect = false;
                                    held = None;
                                }
                                Verdict::Hold { reasons, first } => {
                                    if first {
                                        tracing::warn!(
                                            reasons = %reasons.join("; "),
                                            frontends = lp.applied.len(),
                                            "the service store lost everything and looks new or wiped: keeping the dataplane as it is until its network config key is written again (then an empty store is a deletion of everything)"
                                        );
                                        let mut g = lp.metrics.lock();
                                        g.store_suspect = true;
                                        g.suspect_listings += 1;
                                    }
                                    held = Some(snap);
                                    continue;
                                }
                            }
                            have_snapshot = true;
                            invalid.extend(l.invalid);
                            lp.set_invalid(invalid);
                            let (svcs, eps) = count_kinds(l.objects.iter().map(Object::key));
                            lp.metrics.queued(svcs, eps);
                            for o in l.objects {
                                snap.put(o);
                            }
                            dirty.extend(lp.state.replace(snap));
                        }
                        SourceUpdate::Changes(c) => {
                            if let Some(h) = held.as_mut() {
                                // Held with the listing (see StoreGuard), until the store is
                                // confirmed by objects arriving in it.
                                for change in c {
                                    match change {
                                        Change::Put(o) => { h.put(o); }
                                        Change::Delete(k) => { h.remove(&k); }
                                    }
                                }
                                if (!h.services().is_empty() || h.slice_count() > 0)
                                    && lp.guard.objects_arrived()
                                {
                                    tracing::warn!("objects arrived in the suspect service store, whose network config key exists: acting on it");
                                    lp.metrics.lock().store_suspect = false;
                                    have_snapshot = true;
                                    lp.set_invalid(Vec::new());
                                    let snap = held.take().unwrap_or_default();
                                    dirty.extend(lp.state.replace(snap));
                                }
                                continue;
                            }
                            let (svcs, eps) = count_kinds(c.iter().map(|c| match c {
                                Change::Put(o) => o.key(),
                                Change::Delete(k) => k.clone(),
                            }));
                            lp.metrics.queued(svcs, eps);
                            lp.changed(&c);
                            dirty.extend(lp.state.change(c));
                        }
                        SourceUpdate::Invalid(i) => {
                            if held.is_none() {
                                lp.add_invalid(i);
                            }
                        }
                        SourceUpdate::Triggers(t) => lp.metrics.add_triggers(t),
                    }
                }
                if !have_snapshot || only_pages {
                    continue;
                }
                if lp.need_full { lp.full().await?; } else { lp.partial(&dirty).await?; }
            }
            _ = tick.tick() => {
                if have_snapshot {
                    lp.refresh_own_addresses();
                    lp.full().await?;
                }
            }
            () = retry => {
                retry_at = None;
                if have_snapshot && lp.need_full { lp.full().await?; }
            }
        }
        if lp.need_full && have_snapshot {
            if retry_at.is_none() {
                retry_at = Some(tokio::time::Instant::now() + backoff.next_delay());
            }
        } else {
            backoff = Backoff::new();
        }
    }
}

/// An invalid stored object and why.
type Invalid = (ObjectKey, FieldError);

/// How many of `keys` are Services and how many EndpointSlices.
fn count_kinds(keys: impl Iterator<Item = ObjectKey>) -> (u64, u64) {
    keys.fold((0, 0), |(s, e), k| match k.kind {
        Kind::Service => (s + 1, e),
        Kind::EndpointSlice => (s, e + 1),
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::lb::FakeLbDataplane;
    use crate::services::model::parse_manifest;

    const WEB: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: api}
spec:
  clusterIP: 10.96.0.11
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.5]}, {addresses: [10.244.2.5]}]
ports: [{port: 8080}]
";

    fn objs(y: &str) -> Vec<Object> {
        parse_manifest(y).unwrap()
    }

    fn node() -> NodeIdentity {
        NodeIdentity {
            name: "node-1".into(),
            ..NodeIdentity::default()
        }
    }

    async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..300 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for: {what}");
    }

    fn backends_of(dp: &FakeLbDataplane, port: u16) -> Vec<String> {
        dp.services()
            .iter()
            .find(|s| s.frontend.port == port)
            .map(|s| s.backends.iter().map(|b| b.ip.to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn key_layout_round_trips() {
        let k = ObjectKey {
            kind: Kind::EndpointSlice,
            namespace: "shop".into(),
            name: "web-x7k2p".into(),
        };
        let key = object_key("/coreos.com/network/", &k);
        assert_eq!(
            key,
            "/coreos.com/network/services/endpointslices/shop/web-x7k2p"
        );
        assert_eq!(parse_object_key("/coreos.com/network", &key), Some(k));
        assert_eq!(
            parse_object_key(
                "/coreos.com/network",
                "/coreos.com/network/services/pods/a/b"
            ),
            None
        );
        assert_eq!(
            parse_object_key(
                "/coreos.com/network",
                "/coreos.com/network/services/services/a/b/c"
            ),
            None
        );
        assert_eq!(
            parse_object_key("/coreos.com/network", "/coreos.com/network/subnets/x"),
            None
        );
        // A value must be the object its key names.
        let o = &objs(WEB)[0];
        let wrong = ObjectKey {
            kind: Kind::Service,
            namespace: "default".into(),
            name: "other".into(),
        };
        let e = decode(&wrong, o.to_json().as_bytes()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "metadata: the value is Service default/web, the key names Service default/other"
        );
        assert!(
            decode(&wrong, b"{not json")
                .unwrap_err()
                .to_string()
                .starts_with(": not JSON")
        );
    }

    #[tokio::test]
    async fn loop_programs_changes_incrementally() {
        let store = MemServiceStore::new();
        store.put_all(&objs(WEB)).await.unwrap();
        let dp = FakeLbDataplane::new();
        let metrics = Arc::new(ServiceMetrics::default());
        let task = tokio::spawn(run_services(
            store.clone(),
            node(),
            dp.clone(),
            Duration::from_hours(1),
            metrics.clone(),
        ));
        eventually("first sync", || dp.services().len() == 3).await;
        assert_eq!(backends_of(&dp, 30080), vec!["10.244.1.5", "10.244.2.5"]);
        assert!(backends_of(&dp, 80).is_empty() || backends_of(&dp, 80).len() == 2);
        dp.take_plans();
        // One endpoint removed: one plan touching web's two frontends only, with the stale one.
        let changed = WEB.replace(", {addresses: [10.244.2.5]}", "");
        store.put_all(&objs(&changed)[2..]).await.unwrap();
        eventually("endpoint removal", || {
            backends_of(&dp, 30080) == vec!["10.244.1.5"]
        })
        .await;
        let plans = dp.take_plans();
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].upserts.len(), 2);
        assert!(plans[0].upserts.iter().all(|s| s.name == "default/web"));
        assert_eq!(plans[0].stale_backends.len(), 2);
        assert!(
            plans[0]
                .stale_backends
                .iter()
                .all(|b| b.ip.to_string() == "10.244.2.5")
        );
        // Service deleted: its frontends go, ids stay stable for the others.
        let api_id = dp
            .services()
            .iter()
            .find(|s| s.name == "default/api")
            .unwrap()
            .id;
        store.delete_all(&[objs(WEB)[0].key()]).await.unwrap();
        // The loop records a sync in its metrics just after the dataplane holds it.
        eventually("service deletion", || {
            dp.services().len() == 1 && metrics.render().contains("twill_services_frontends 1\n")
        })
        .await;
        assert_eq!(dp.services()[0].id, api_id);
        assert!(
            metrics
                .render()
                .contains("twill_services_dataplane_info{mode=\"fake\",reason=\"\"} 1")
        );
        task.abort();
    }

    #[tokio::test]
    async fn nothing_is_touched_before_the_first_list_and_restart_replans_nothing() {
        // A first agent programs the dataplane.
        let store = MemServiceStore::new();
        store.put_all(&objs(WEB)).await.unwrap();
        let dp = FakeLbDataplane::new();
        let m = Arc::new(ServiceMetrics::default());
        let task = tokio::spawn(run_services(
            store.clone(),
            node(),
            dp.clone(),
            Duration::from_hours(1),
            m,
        ));
        eventually("first sync", || dp.services().len() == 3).await;
        task.abort();
        let before = dp.services();
        // The agent restarts while etcd is down: the dataplane keeps everything.
        let programmed = FakeLbDataplane::with_services(before.clone());
        store.set_down(true);
        let m = Arc::new(ServiceMetrics::default());
        let task = tokio::spawn(run_services(
            store.clone(),
            node(),
            programmed.clone(),
            Duration::from_hours(1),
            m.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(programmed.services(), before);
        assert_eq!(programmed.state().apply_calls, 0);
        // etcd is back: same ids derived, nothing to change.
        store.set_down(false);
        eventually("sync after etcd is back", || m.ok_syncs() > 0).await;
        assert_eq!(programmed.services(), before);
        assert_eq!(
            programmed.state().apply_calls,
            0,
            "{:?}",
            programmed.state().plans
        );
        task.abort();
    }

    #[tokio::test]
    async fn broken_watch_relists_and_failed_apply_heals() {
        let store = MemServiceStore::new();
        store.put_all(&objs(WEB)).await.unwrap();
        let dp = FakeLbDataplane::new();
        let m = Arc::new(ServiceMetrics::default());
        let task = tokio::spawn(run_services(
            store.clone(),
            node(),
            dp.clone(),
            Duration::from_hours(1),
            m.clone(),
        ));
        eventually("first sync", || dp.services().len() == 3).await;
        // Watch broken while etcd is down and an object is deleted meanwhile: re-list catches it.
        store.set_down(true);
        {
            let mut g = store.lock();
            let k = objs(WEB)[1].key();
            g.objects.remove(&k);
        }
        store.set_down(false);
        eventually("re-list after broken watch", || dp.services().len() == 2).await;
        // The next apply fails: the loop re-reads the dataplane and retries the full plan.
        dp.tamper(|s| s.fail_next_apply = Some("map full".into()));
        store.delete_all(&[objs(WEB)[2].key()]).await.unwrap();
        // The dataplane holds the retried plan a moment before the loop records the success.
        eventually("retry after a failed apply", || {
            dp.services().iter().all(|s| s.backends.is_empty())
                && dp.state().apply_calls >= 3
                && m.last_error().is_none()
        })
        .await;
        assert!(m.render().contains("result=\"error\"} 1"), "{}", m.render());
        // Drift: someone removes a frontend behind our back; the resync timer does not run in
        // this test (1 h), but a change to another service must not resurrect it.
        task.abort();
    }

    #[tokio::test]
    async fn resync_heals_drift_and_invalid_objects_are_absent() {
        let store = MemServiceStore::new();
        store.put_all(&objs(WEB)).await.unwrap();
        store.put_invalid(
            ObjectKey {
                kind: Kind::Service,
                namespace: "default".into(),
                name: "broken".into(),
            },
            FieldError {
                field: "spec.ports[0].port".into(),
                message: "0 is not a valid port (1-65535)".into(),
            },
        );
        let dp = FakeLbDataplane::new();
        let m = Arc::new(ServiceMetrics::default());
        let task = tokio::spawn(run_services(
            store.clone(),
            node(),
            dp.clone(),
            Duration::from_millis(200),
            m.clone(),
        ));
        eventually("first sync", || dp.services().len() == 3).await;
        assert!(m.render().contains("twill_services_invalid_objects 1"));
        let victim = dp.services()[0].frontend.key();
        dp.tamper(|s| {
            s.services.remove(&victim);
        });
        eventually("resync heals", || dp.services().len() == 3).await;
        task.abort();
    }

    #[tokio::test]
    async fn etcd_store_refuses_oversized_transactions() {
        // No server needed: the check happens before dialling.
        let client = Client::connect(
            ["http://127.0.0.1:9"],
            Some(
                etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_millis(10)),
            ),
        )
        .await;
        if let Ok(client) = client {
            let s = EtcdServiceStore::new(client, "/p");
            let many = vec![objs(WEB)[0].clone(); MAX_TXN_OPS + 1];
            let e = s.clone().put_all(&many).await.unwrap_err();
            assert!(
                e.to_string()
                    .starts_with("129 operations in one transaction"),
                "{e}"
            );
            // A server with a higher --max-txn-ops: the request is sent (and fails to connect).
            let e = s.with_max_txn_ops(200).put_all(&many).await.unwrap_err();
            assert!(!matches!(e, SourceError::TooMany { .. }), "{e}");
        }
    }

    #[tokio::test]
    async fn kube_proxy_metrics_and_health_times() {
        let dp = FakeLbDataplane::new();
        let m = Arc::new(ServiceMetrics::default());
        assert_eq!(m.proxy_health_times(), (None, None));
        let trigger = SystemTime::now() - Duration::from_millis(1500);
        let objects = objs(WEB);
        let slice = objects[2].clone();
        let task = tokio::spawn(run_services_with(
            move |tx| async move {
                let listing = Listing {
                    objects,
                    ..Listing::default()
                };
                let _ = tx.send(SourceUpdate::Reset(listing)).await;
                let _ = tx
                    .send(SourceUpdate::Changes(vec![Change::Put(slice)]))
                    .await;
                let _ = tx.send(SourceUpdate::Triggers(vec![trigger])).await;
                std::future::pending::<()>().await;
            },
            node(),
            dp.clone(),
            Duration::from_hours(1),
            m.clone(),
        ));
        eventually("the trigger observed", || {
            m.render()
                .contains("kubeproxy_network_programming_duration_seconds_count 1\n")
        })
        .await;
        let r = m.render();
        // 1.5 s from trigger to programmed: above 1 s, within 2 s.
        assert!(
            r.contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"1\"} 0\n"),
            "{r}"
        );
        assert!(
            r.contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"2\"} 1\n"),
            "{r}"
        );
        assert!(
            r.contains("kubeproxy_sync_proxy_rules_service_changes_total 2\n"),
            "{r}"
        );
        assert!(
            r.contains("kubeproxy_sync_proxy_rules_endpoint_changes_total 2\n"),
            "{r}"
        );
        assert!(
            r.contains("kubeproxy_sync_proxy_rules_endpoint_changes_pending 0\n"),
            "{r}"
        );
        assert!(
            !r.contains("kubeproxy_sync_proxy_rules_duration_seconds_count 0\n"),
            "{r}"
        );
        assert!(
            !r.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds 0\n"),
            "{r}"
        );
        let (pending, last) = m.proxy_health_times();
        assert_eq!(pending, None, "everything received was synced");
        assert!(last.is_some());
        task.abort();
    }

    #[tokio::test]
    async fn a_listing_in_pages_counts_only_once_its_reset_completes_it() {
        let dp = FakeLbDataplane::new();
        let m = Arc::new(ServiceMetrics::default());
        let o = objs(WEB);
        let (web, api, slice) = (o[0].clone(), o[1].clone(), o[2].clone());
        let page = |objects, revision| {
            SourceUpdate::Page(Listing {
                objects,
                invalid: Vec::new(),
                revision,
                facts: None,
            })
        };
        let task = tokio::spawn(run_services_with(
            move |tx| async move {
                // A list that broke after its first page (revision 5: `api` only), then a whole
                // one at revision 6 in two parts, one invalid object in its last part.
                let _ = tx.send(page(vec![api], 5)).await;
                let _ = tx.send(page(vec![web], 6)).await;
                let last = Listing {
                    objects: vec![slice],
                    invalid: vec![(
                        ObjectKey {
                            kind: Kind::Service,
                            namespace: "default".into(),
                            name: "bad".into(),
                        },
                        FieldError {
                            field: "spec".into(),
                            message: "bad".into(),
                        },
                    )],
                    revision: 6,
                    facts: None,
                };
                let _ = tx.send(SourceUpdate::Reset(last)).await;
                std::future::pending::<()>().await;
            },
            node(),
            dp.clone(),
            Duration::from_hours(1),
            m.clone(),
        ));
        eventually("the listing programmed", || m.ok_syncs() > 0).await;
        // Pages alone program nothing; the first sync has the whole revision-6 listing and
        // nothing of the abandoned one.
        assert_eq!(dp.state().apply_calls, 1);
        let names: BTreeSet<String> = dp.services().iter().map(|s| s.name.clone()).collect();
        assert_eq!(names, BTreeSet::from(["default/web".to_string()]));
        assert_eq!(backends_of(&dp, 30080), vec!["10.244.1.5", "10.244.2.5"]);
        assert!(m.render().contains("twill_services_invalid_objects 1\n"));
        task.abort();
    }

    fn facts(cluster_id: u64, revision: i64, config: Option<i64>) -> StoreFacts {
        StoreFacts {
            cluster_id,
            revision,
            config,
        }
    }

    fn hold(first: bool, reason: &str) -> Verdict {
        Verdict::Hold {
            reasons: vec![reason.to_string()],
            first,
        }
    }

    /// Every way a listing can lose everything, and what confirms the store again.
    #[test]
    fn store_guard_holds_listings_that_lost_everything() {
        let absent = "the network config key is absent";
        let mut g = StoreGuard::default();
        assert_eq!(
            g.judge(Some(facts(1, 10, Some(2))), false, false),
            Verdict::Act
        );
        // Everything deleted with the config key present: an ordinary deletion.
        assert_eq!(
            g.judge(Some(facts(1, 12, Some(2))), true, true),
            Verdict::Act
        );
        // Nothing held on this node: nothing to lose.
        assert_eq!(g.judge(Some(facts(1, 13, None)), true, false), Verdict::Act);
        // The config key gone while the node holds services: held, reported once.
        assert_eq!(
            g.judge(Some(facts(1, 20, None)), true, true),
            hold(true, absent)
        );
        assert_eq!(
            g.judge(Some(facts(1, 21, None)), true, true),
            hold(false, absent)
        );
        // Objects without a config key: still held.
        assert_eq!(
            g.judge(Some(facts(1, 22, None)), false, true),
            hold(false, absent)
        );
        // The config key written again: the (empty) listing is a real deletion.
        assert_eq!(
            g.judge(Some(facts(1, 23, Some(23))), true, true),
            Verdict::Confirmed
        );
        assert_eq!(g.suspect(), None);
        // Another cluster: held even though its config key exists, until it is written anew.
        let moved = "the etcd cluster id changed from 1 to 7";
        assert_eq!(
            g.judge(Some(facts(7, 3, Some(1))), true, true),
            hold(true, moved)
        );
        assert_eq!(
            g.judge(Some(facts(7, 4, Some(1))), true, true),
            hold(false, moved)
        );
        assert_eq!(
            g.judge(Some(facts(7, 5, Some(5))), true, true),
            Verdict::Confirmed
        );
        // The revision went backwards in one cluster (a restored snapshot) and nothing is left:
        // held; services applied to it confirm it.
        assert_eq!(
            g.judge(Some(facts(7, 2, Some(1))), true, true),
            hold(true, "the store's revision went backwards from 5 to 2")
        );
        assert_eq!(
            g.judge(Some(facts(7, 3, Some(1))), false, true),
            Verdict::Confirmed
        );
        // Objects watched into a suspect store confirm it only if its config key exists.
        assert!(matches!(
            g.judge(Some(facts(8, 1, Some(1))), true, true),
            Verdict::Hold { first: true, .. }
        ));
        assert!(g.objects_arrived());
        assert!(matches!(
            g.judge(Some(facts(9, 1, None)), true, true),
            Verdict::Hold { first: true, .. }
        ));
        assert!(!g.objects_arrived());
        // A source without facts (Kubernetes) is always acted on.
        assert_eq!(StoreGuard::default().judge(None, true, true), Verdict::Act);
    }

    fn start(
        store: &MemServiceStore,
        dp: &FakeLbDataplane,
        resync: Duration,
    ) -> (
        tokio::task::JoinHandle<anyhow::Result<()>>,
        Arc<ServiceMetrics>,
    ) {
        let m = Arc::new(ServiceMetrics::default());
        let settings = LoopSettings::from(resync);
        let task = tokio::spawn(run_services(
            store.clone(),
            node(),
            dp.clone(),
            settings,
            m.clone(),
        ));
        (task, m)
    }

    fn metric(m: &ServiceMetrics, line: &str) -> bool {
        m.render().lines().any(|l| l == line)
    }

    /// A wiped store (everything under the prefix deleted at once, the config key too) does
    /// not flush the dataplane; once the config key is written again the empty store is a
    /// deletion of everything and acted on. With the config key present, deleting every
    /// object works at once.
    #[tokio::test]
    async fn a_wiped_store_keeps_the_dataplane_until_its_config_is_written_again() {
        let store = MemServiceStore::new();
        store.put_all(&objs(WEB)).await.unwrap();
        let dp = FakeLbDataplane::new();
        let (task, m) = start(&store, &dp, Duration::from_millis(200));
        eventually("first sync", || dp.services().len() == 3).await;
        let before = dp.services();
        store.wipe();
        eventually("the wiped store held", || {
            metric(&m, "twill_services_store_suspect 1")
        })
        .await;
        // Re-lists and resyncs (every 200 ms) change nothing.
        store.break_watches();
        let syncs = m.ok_syncs();
        eventually("two resyncs", || m.ok_syncs() >= syncs + 2).await;
        assert_eq!(dp.services(), before);
        assert!(
            metric(&m, "twill_services_suspect_listings_total 1"),
            "{}",
            m.render()
        );
        // Objects written without a config key: still held.
        store.put_all(&objs(WEB)[1..2]).await.unwrap();
        let syncs = m.ok_syncs();
        eventually("a resync", || m.ok_syncs() > syncs).await;
        assert_eq!(dp.services(), before);
        // The config key written again: acted on (only `api` is left in the store).
        store.set_config(true);
        eventually("the deletion acted on", || dp.services().len() == 1).await;
        assert!(metric(&m, "twill_services_store_suspect 0"));
        // With the config key present, deleting everything is an ordinary deletion.
        store.put_all(&objs(WEB)).await.unwrap();
        eventually("re-applied", || dp.services().len() == 3).await;
        let keys: Vec<ObjectKey> = objs(WEB).iter().map(Object::key).collect();
        store.delete_all(&keys).await.unwrap();
        eventually("everything deleted", || dp.services().is_empty()).await;
        assert!(metric(&m, "twill_services_suspect_listings_total 1"));
        task.abort();
    }

    /// An agent restarted against a new, empty etcd (another cluster, no config key) keeps
    /// what its predecessor programmed; objects applied to the new store are held until its
    /// config key exists, then the new store is what counts.
    #[tokio::test]
    async fn a_new_store_keeps_the_dataplane_of_a_restarted_agent() {
        let old = MemServiceStore::new();
        old.put_all(&objs(WEB)).await.unwrap();
        let dp = FakeLbDataplane::new();
        let (task, _) = start(&old, &dp, Duration::from_hours(1));
        eventually("first sync", || dp.services().len() == 3).await;
        task.abort();
        let programmed = FakeLbDataplane::with_services(dp.services());
        let fresh = MemServiceStore::new();
        fresh.replace_cluster(false);
        let (task, m) = start(&fresh, &programmed, Duration::from_hours(1));
        // Held from its first listing: nothing is applied (nothing can be, until a listing is
        // acted on).
        eventually("held", || metric(&m, "twill_services_store_suspect 1")).await;
        assert_eq!(programmed.state().apply_calls, 0);
        assert_eq!(programmed.services().len(), 3);
        // The operator writes the config key: the new (empty) store is what counts.
        fresh.set_config(true);
        eventually("the new store acted on", || {
            programmed.services().is_empty()
        })
        .await;
        fresh.put_all(&objs(WEB)[1..2]).await.unwrap();
        eventually("and its objects", || {
            programmed.services().len() == 1 && programmed.services()[0].name == "default/api"
        })
        .await;
        task.abort();
        // A new cluster with its config key already written: objects watched into it confirm it.
        let other = MemServiceStore::new();
        let dp = FakeLbDataplane::new();
        let (task, m) = start(&other, &dp, Duration::from_hours(1));
        other.put_all(&objs(WEB)).await.unwrap();
        eventually("first sync", || dp.services().len() == 3).await;
        other.replace_cluster(true);
        eventually("held", || metric(&m, "twill_services_store_suspect 1")).await;
        assert_eq!(dp.services().len(), 3);
        other.put_all(&objs(WEB)[1..2]).await.unwrap();
        eventually("confirmed by its objects", || dp.services().len() == 1).await;
        assert!(metric(&m, "twill_services_store_suspect 0"));
        task.abort();
    }

    /// Invalid values arriving by the watch are treated as absent, logged once and counted
    /// like the ones a listing finds; a valid value clears them.
    #[tokio::test]
    async fn invalid_objects_from_the_watch_are_counted() {
        let store = MemServiceStore::new();
        store.put_all(&objs(WEB)).await.unwrap();
        let dp = FakeLbDataplane::new();
        let (task, m) = start(&store, &dp, Duration::from_hours(1));
        eventually("first sync", || dp.services().len() == 3).await;
        let api = objs(WEB)[1].key();
        store.put_invalid(
            api.clone(),
            FieldError {
                field: "spec.clusterIP".into(),
                message: "127.0.0.1 may not be in the loopback range".into(),
            },
        );
        eventually("the invalid object absent and counted", || {
            dp.services().len() == 2 && metric(&m, "twill_services_invalid_objects 1")
        })
        .await;
        store.put_all(&objs(WEB)[1..2]).await.unwrap();
        eventually("valid again", || {
            dp.services().len() == 3 && metric(&m, "twill_services_invalid_objects 0")
        })
        .await;
        task.abort();
    }

    /// Frontends on the node's own addresses are refused, reported and counted, and follow
    /// the addresses as they change (read again at every full resync).
    #[tokio::test]
    async fn frontends_on_the_nodes_own_addresses_are_refused() {
        let y = "apiVersion: v1\nkind: Service\nmetadata: {name: grab}\nspec:\n  clusterIP: 10.96.0.20\n  externalIPs: [198.18.0.11]\n  ports: [{port: 22}]\n";
        let store = MemServiceStore::new();
        store.put_all(&objs(y)).await.unwrap();
        let own = Arc::new(Mutex::new(vec!["198.18.0.11".parse::<IpAddr>().unwrap()]));
        let read = own.clone();
        let settings = LoopSettings {
            resync: Duration::from_millis(200),
            own_addresses: Some(Arc::new(move || read.lock().unwrap().clone())),
        };
        let dp = FakeLbDataplane::new();
        let m = Arc::new(ServiceMetrics::default());
        let mut node = node();
        node.allowed_external_ips = None;
        let task = tokio::spawn(run_services(
            store.clone(),
            node,
            dp.clone(),
            settings,
            m.clone(),
        ));
        eventually("first sync", || !dp.services().is_empty()).await;
        let ips = || {
            dp.services()
                .iter()
                .map(|s| s.frontend.ip.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(ips(), vec!["10.96.0.20"]);
        eventually("the refusal counted", || {
            metric(
                &m,
                "twill_services_refused_frontends{reason=\"node address\"} 1",
            )
        })
        .await;
        *own.lock().unwrap() = vec!["198.18.0.12".parse().unwrap()];
        eventually("the address is no longer the node's", || {
            ips().len() == 2
                && metric(
                    &m,
                    "twill_services_refused_frontends{reason=\"node address\"} 0",
                )
        })
        .await;
        task.abort();
    }

    #[tokio::test]
    async fn a_failing_dataplane_leaves_updates_pending() {
        let store = MemServiceStore::new();
        store.put_all(&objs(WEB)).await.unwrap();
        let dp = FakeLbDataplane::new();
        dp.tamper(|s| s.fail_next_apply = Some("map full".into()));
        let m = Arc::new(ServiceMetrics::default());
        let task = tokio::spawn(run_services(
            store,
            node(),
            dp.clone(),
            Duration::from_hours(1),
            m.clone(),
        ));
        eventually("the failed sync", || dp.state().apply_calls >= 1).await;
        // Between the failure and the retry the update is pending; the health server turns
        // 503 if that lasts (see kube::healthz).
        // (The retry waits 100 ms of backoff; this runs within 10 ms of the failure.)
        assert!(dp.services().is_empty());
        assert!(m.proxy_health_times().0.is_some());
        eventually("the retry, recorded", || {
            dp.services().len() == 3 && m.proxy_health_times().0.is_none()
        })
        .await;
        task.abort();
    }
}
