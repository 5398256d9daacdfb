//! The in-memory service store: the etcd store's semantics (revisions, all-or-nothing writes,
//! watches that can be broken, a network config key, a cluster id) without etcd, so the service
//! loop and `twilld apply` are tested without a server. It can be told to be down, to fail
//! writes, and to hold invalid values, which is what the loop's error paths need.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc};

use crate::services::model::{Change, FieldError, Object, ObjectKey};
use crate::services::source::{Listing, ServiceStore, SourceError, SourceUpdate, StoreFacts};

// In-memory fake.

/// What the in-memory store's log records, in revision order.
#[derive(Debug, Clone)]
#[expect(clippy::large_enum_variant, reason = "a test fake")]
enum MemEvent {
    Change(Change),
    Invalid(ObjectKey, FieldError),
    Config { deleted: bool },
}

pub(crate) struct MemInner {
    pub(crate) objects: BTreeMap<ObjectKey, Object>,
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
    /// Listings asked for, refused ones included.
    lists: u64,
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
            lists: 0,
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

    /// One write at a new revision, `f` doing it, failing as the store is told to: refused
    /// while down or when the write is to fail before it is done; done, watchers told, and
    /// an error returned when it is to fail after.
    fn write<T>(&self, f: impl FnOnce(&mut MemInner, i64) -> T) -> Result<T, SourceError> {
        let mut g = self.lock();
        if g.down {
            return Err(SourceError::Unavailable);
        }
        let fail = g.write_fails();
        if fail == Some(false) {
            return Err(SourceError::Unavailable);
        }
        let rev = g.bump();
        let out = f(&mut g, rev);
        drop(g);
        self.notify.notify_waiters();
        if fail == Some(true) {
            return Err(SourceError::Unavailable);
        }
        Ok(out)
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        self.inner.lock().expect("mem service store lock")
    }

    /// Listings asked for so far, refused ones included: what a test waits on to know that a
    /// source has tried (and, while the store is down, failed) to list.
    pub fn lists(&self) -> u64 {
        self.lock().lists
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
        let mut g = self.lock();
        g.lists += 1;
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
        self.write(|g, rev| {
            for o in objects {
                g.invalid.remove(&o.key());
                g.objects.insert(o.key(), o.clone());
                g.log.push((rev, MemEvent::Change(Change::Put(o.clone()))));
            }
        })
    }

    async fn delete_all(&self, keys: &[ObjectKey]) -> Result<Vec<bool>, SourceError> {
        self.write(|g, rev| {
            let mut out = Vec::new();
            for k in keys {
                let existed = g.objects.remove(k).is_some() | g.invalid.remove(k).is_some();
                out.push(existed);
                g.log
                    .push((rev, MemEvent::Change(Change::Delete(k.clone()))));
            }
            out
        })
    }
}
