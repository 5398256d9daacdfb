//! Where leases live: the `LeaseStore` seam, its etcd implementation and an in-memory fake.
//!
//! The store knows flannel's key layout (`<prefix>/config`, `<prefix>/subnets/<key>`) and nothing
//! about the dataplane. Creation is a transaction that succeeds only if the key is absent, and a
//! reclaim only if the key still has the revision we saw, so two nodes can never hold one subnet.
//! Every key is bound to an etcd lease: a node that vanishes loses its subnet when the TTL runs out.
//!
//! Renewing checks more than the etcd lease: the key must still exist and still hang on the
//! etcd lease we hold ([`StoreError::LeaseLost`] otherwise), so a node whose key was deleted or
//! rewritten by another node learns it at the latest at its next renewal. Listings carry the
//! revision and the cluster id they were read at, so the agent can tell an etcd that lost its
//! data (or was replaced) from one where every node really left. A node that finds its public
//! IP in a lease it cannot prove is its own leaves a short-lived claim under
//! `<prefix>/claims/<lease key>/`, so the node holding the lease learns of the conflict too.

pub mod annotations;
pub mod kube;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, GetResponse, LeaseGrantResponse, PutOptions,
    Txn, TxnOp,
};
use tokio::sync::mpsc;

use crate::overlay::lease::{Lease, LeaseAttrs, LeaseSubnets};
use crate::shared::etcd::EtcdTls;
use crate::shared::etcd::WatchEnd;
use crate::shared::etcd::connect_client;
use crate::shared::etcd::watch_prefix;

/// Errors from the lease store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An etcd call failed.
    #[error("etcd {op} {key}: {source}")]
    Etcd {
        /// The call (`get`, `txn`, `lease grant`, ...).
        op: &'static str,
        /// The key or prefix involved.
        key: String,
        /// The client's error.
        #[source]
        source: etcd_client::Error,
    },
    /// The network config key is absent.
    #[error("network config key {0} not found in etcd")]
    NoConfig(String),
    /// The lease key we hold is gone, or hangs on another etcd lease (another node rewrote it).
    #[error("lease {key} is no longer ours: {reason}")]
    LeaseLost {
        /// The key.
        key: String,
        /// What was found instead.
        reason: String,
        /// Whether another holder rewrote the key (not merely deleted or expired).
        taken: bool,
    },
    /// The watch stream ended or broke; the caller re-lists.
    #[error("lease watch ended: {0}")]
    WatchEnded(String),
    /// The kube subnet manager failed (the Kubernetes API, the node's `podCIDRs`, the network
    /// config file).
    #[error(transparent)]
    Kube(Box<crate::overlay::source::kube::SubnetError>),
    /// The etcd flags or TLS files are bad input.
    #[error(transparent)]
    Client(#[from] crate::shared::etcd::EtcdError),
}

/// A lease as stored, with the store's bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLease {
    /// The lease.
    pub lease: Lease,
    /// Revision of the last change of the key (for compare-and-swap).
    pub mod_revision: i64,
    /// Revision the key was created at (which of two overlapping leases came first).
    pub create_revision: i64,
    /// The etcd lease the key is bound to (0: none).
    pub etcd_lease: i64,
}

/// A lease this node holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLease {
    /// The subnets.
    pub subnets: LeaseSubnets,
    /// The etcd lease id to renew.
    pub etcd_lease: i64,
    /// When it expires unless renewed.
    pub expires: SystemTime,
    /// The store revision of our last write of the key (0: unknown); a listing older than this
    /// cannot show our write yet.
    pub revision: i64,
}

/// Every lease, as of one store revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// The leases.
    pub leases: Vec<StoredLease>,
    /// The store revision the listing was read at.
    pub revision: i64,
    /// The etcd cluster's id (0: not known, e.g. Kubernetes).
    pub cluster_id: u64,
}

/// A change seen by the watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    /// A lease was created or changed.
    Put(StoredLease),
    /// A lease was deleted or expired, at this store revision.
    Delete(LeaseSubnets, i64),
}

/// The lease store seam.
pub trait LeaseStore: Send + Sync + 'static {
    /// The raw network config JSON.
    fn get_config(&self) -> impl Future<Output = Result<String, StoreError>> + Send;
    /// Every lease, with the revision and cluster the list was read at.
    fn list(&self) -> impl Future<Output = Result<Listing, StoreError>> + Send;
    /// Creates the lease if its key is absent. `Ok(None)` when another node got there first.
    fn create(
        &self,
        subnets: LeaseSubnets,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<HeldLease>, StoreError>> + Send;
    /// Rewrites an existing lease (our own, from before a restart) if it still has
    /// `mod_revision`. `Ok(None)` when it changed meanwhile.
    fn reclaim(
        &self,
        old: &StoredLease,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<HeldLease>, StoreError>> + Send;
    /// Renews a held lease; returns the new expiry. [`StoreError::LeaseLost`] when the key is
    /// gone or no longer hangs on our etcd lease.
    fn renew(
        &self,
        held: &HeldLease,
    ) -> impl Future<Output = Result<SystemTime, StoreError>> + Send;
    /// Streams lease changes after `revision` into `tx` until the stream breaks (then returns
    /// the error; the caller re-lists).
    fn watch(
        &self,
        revision: i64,
        tx: mpsc::Sender<Vec<LeaseEvent>>,
    ) -> impl Future<Output = StoreError> + Send;
    /// For stores where something else assigns this node's subnets (Kubernetes'
    /// `node.spec.podCIDRs`): publishes `attrs` for them and returns the lease. `None`, the
    /// default, lets the agent choose a free subnet and [`LeaseStore::create`] it.
    fn acquire_assigned(
        &self,
        cfg: &crate::overlay::config::NetworkConfig,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<HeldLease>, StoreError>> + Send {
        let _ = (cfg, attrs, ttl);
        async { Ok(None) }
    }
    /// Leaves a claim on `lease` (held by another node with our public IP) for `ttl`, so its
    /// holder learns that a node with `attrs` wants it. Stores without claims do nothing.
    fn claim(
        &self,
        lease: &LeaseSubnets,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = (lease, attrs, ttl);
        async { Ok(()) }
    }
    /// The live claims on `lease` (what each claimant published).
    fn claims(
        &self,
        lease: &LeaseSubnets,
    ) -> impl Future<Output = Result<Vec<LeaseAttrs>, StoreError>> + Send {
        let _ = lease;
        async { Ok(Vec::new()) }
    }
}

/// The etcd v3 lease store.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
}

fn etcd(op: &'static str, key: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> StoreError {
    let key = key.into();
    move |source| StoreError::Etcd { op, key, source }
}

impl EtcdStore {
    /// Connects to `endpoints` under `prefix`.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        tls: &EtcdTls,
    ) -> Result<Self, StoreError> {
        Ok(EtcdStore {
            client: connect_client(endpoints, tls).await?,
            prefix: prefix.trim_end_matches('/').to_string(),
        })
    }

    /// Where the network config comes from, for messages: the key.
    pub fn config_location(&self) -> String {
        format!("{}/config", self.prefix)
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    fn key(&self, subnets: &LeaseSubnets) -> String {
        format!("{}{}", self.subnets_prefix(), subnets.key())
    }

    fn claims_prefix(&self, subnets: &LeaseSubnets) -> String {
        format!("{}/claims/{}/", self.prefix, subnets.key())
    }

    fn decode(&self, kv: &etcd_client::KeyValue) -> Option<StoredLease> {
        let key = kv.key_str().ok()?;
        let short = key.strip_prefix(&self.subnets_prefix())?;
        let subnets = match LeaseSubnets::parse_key(short) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring key under subnets/");
                return None;
            }
        };
        let attrs = match LeaseAttrs::parse(key, kv.value()) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring lease");
                return None;
            }
        };
        Some(StoredLease {
            lease: Lease {
                subnets,
                attrs,
                expires: None,
            },
            mod_revision: kv.mod_revision(),
            create_revision: kv.create_revision(),
            etcd_lease: kv.lease(),
        })
    }

    /// A new etcd lease of `ttl`, for writing `key`.
    async fn grant(&self, ttl: Duration, key: &str) -> Result<LeaseGrantResponse, StoreError> {
        let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        self.client
            .clone()
            .lease_grant(ttl_secs, None)
            .await
            .map_err(etcd("lease grant", key))
    }

    /// The key `key`, or with `opts` (a prefix get) the keys under it.
    async fn get(&self, key: &str, opts: Option<GetOptions>) -> Result<GetResponse, StoreError> {
        self.client
            .clone()
            .get(key, opts)
            .await
            .map_err(etcd("get", key))
    }

    /// Puts `attrs` at `key` on a new etcd lease if `cmp` holds: the etcd lease id and the
    /// revision of the write.
    async fn put_if(
        &self,
        key: String,
        cmp: Compare,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        let mut c = self.client.clone();
        let grant = self.grant(ttl, &key).await?;
        let txn = Txn::new().when([cmp]).and_then([TxnOp::put(
            key.clone(),
            attrs.to_json(),
            Some(PutOptions::new().with_lease(grant.id())),
        )]);
        let resp = c.txn(txn).await.map_err(etcd("txn", &key))?;
        if resp.succeeded() {
            let rev = resp
                .header()
                .map_or(0, etcd_client::ResponseHeader::revision);
            Ok(Some((grant.id(), rev)))
        } else {
            let _ = c.lease_revoke(grant.id()).await;
            Ok(None)
        }
    }
}

impl LeaseStore for EtcdStore {
    async fn get_config(&self) -> Result<String, StoreError> {
        let key = self.config_location();
        let resp = self.get(&key, None).await?;
        let kv = resp.kvs().first().ok_or(StoreError::NoConfig(key))?;
        Ok(String::from_utf8_lossy(kv.value()).into_owned())
    }

    async fn list(&self) -> Result<Listing, StoreError> {
        let prefix = self.subnets_prefix();
        let resp = self
            .get(&prefix, Some(GetOptions::new().with_prefix()))
            .await?;
        let header = resp.header();
        Ok(Listing {
            leases: resp.kvs().iter().filter_map(|kv| self.decode(kv)).collect(),
            revision: header.map_or(0, etcd_client::ResponseHeader::revision),
            cluster_id: header.map_or(0, etcd_client::ResponseHeader::cluster_id),
        })
    }

    async fn create(
        &self,
        subnets: LeaseSubnets,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<HeldLease>, StoreError> {
        let key = self.key(&subnets);
        let cmp = Compare::create_revision(key.as_str(), CompareOp::Equal, 0);
        Ok(self
            .put_if(key, cmp, attrs, ttl)
            .await?
            .map(|(id, revision)| HeldLease {
                subnets,
                etcd_lease: id,
                expires: SystemTime::now() + ttl,
                revision,
            }))
    }

    async fn reclaim(
        &self,
        old: &StoredLease,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<HeldLease>, StoreError> {
        let key = self.key(&old.lease.subnets);
        let cmp = Compare::mod_revision(key.as_str(), CompareOp::Equal, old.mod_revision);
        let got = self.put_if(key, cmp, attrs, ttl).await?;
        if got.is_some() && old.etcd_lease != 0 {
            // The key now hangs on the new etcd lease; the old one holds nothing of ours.
            let _ = self.client.clone().lease_revoke(old.etcd_lease).await;
        }
        Ok(got.map(|(id, revision)| HeldLease {
            subnets: old.lease.subnets,
            etcd_lease: id,
            expires: SystemTime::now() + ttl,
            revision,
        }))
    }

    async fn renew(&self, held: &HeldLease) -> Result<SystemTime, StoreError> {
        let key = self.key(&held.subnets);
        let (mut keeper, mut stream) = self
            .client
            .clone()
            .lease_keep_alive(held.etcd_lease)
            .await
            .map_err(etcd("lease keep-alive", &key))?;
        keeper
            .keep_alive()
            .await
            .map_err(etcd("lease keep-alive", &key))?;
        let resp = stream
            .message()
            .await
            .map_err(etcd("lease keep-alive", &key))?;
        let ttl = match resp {
            Some(r) if r.ttl() > 0 => r.ttl(),
            _ => {
                return Err(StoreError::LeaseLost {
                    key,
                    reason: format!(
                        "its etcd lease {:x} expired or was revoked",
                        held.etcd_lease
                    ),
                    taken: false,
                });
            }
        };
        // The etcd lease lives on, but is the key still on it? Someone may have deleted the key
        // or rewritten it on an etcd lease of their own.
        let got = self.get(&key, None).await?;
        match got.kvs().first() {
            None => Err(StoreError::LeaseLost {
                key,
                reason: "the key was deleted".into(),
                taken: false,
            }),
            Some(kv) if kv.lease() != held.etcd_lease => Err(StoreError::LeaseLost {
                taken: true,
                reason: format!(
                    "the key was rewritten on etcd lease {:x} (ours is {:x}): {}",
                    kv.lease(),
                    held.etcd_lease,
                    String::from_utf8_lossy(kv.value())
                ),
                key,
            }),
            Some(_) => {
                Ok(SystemTime::now() + Duration::from_secs(u64::try_from(ttl).unwrap_or_default()))
            }
        }
    }

    async fn watch(&self, revision: i64, tx: mpsc::Sender<Vec<LeaseEvent>>) -> StoreError {
        let prefix = self.subnets_prefix();
        let end = watch_prefix(&self.client, &prefix, revision, &tx, |ev| {
            let kv = ev.kv()?;
            match ev.event_type() {
                EventType::Put => self.decode(kv).map(LeaseEvent::Put),
                EventType::Delete => {
                    let short = kv.key_str().ok()?.strip_prefix(&prefix)?;
                    LeaseSubnets::parse_key(short)
                        .ok()
                        .map(|s| LeaseEvent::Delete(s, kv.mod_revision()))
                }
            }
        })
        .await;
        match end {
            WatchEnd::Etcd(e) => etcd("watch", &prefix)(e),
            WatchEnd::Ended(why) => StoreError::WatchEnded(why),
        }
    }

    async fn claim(
        &self,
        lease: &LeaseSubnets,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let id = attrs.node_id.clone().unwrap_or_default();
        let key = format!("{}{id}", self.claims_prefix(lease));
        let mut c = self.client.clone();
        let grant = self.grant(ttl, &key).await?;
        c.put(
            key.as_str(),
            attrs.to_json(),
            Some(PutOptions::new().with_lease(grant.id())),
        )
        .await
        .map_err(etcd("put", &key))?;
        Ok(())
    }

    async fn claims(&self, lease: &LeaseSubnets) -> Result<Vec<LeaseAttrs>, StoreError> {
        let prefix = self.claims_prefix(lease);
        let resp = self
            .get(&prefix, Some(GetOptions::new().with_prefix()))
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| LeaseAttrs::parse(kv.key_str().unwrap_or(""), kv.value()).ok())
            .collect())
    }
}

/// In-memory store for unit tests: same semantics (create-if-absent, compare mod revision), plus
/// what an etcd can go through (down, wiped, replaced by a fresh cluster).
#[derive(Clone, Default)]
pub struct MemStore {
    inner: Arc<Mutex<MemInner>>,
    /// Wakes watches when the store is replaced (their stream breaks, as etcd's would).
    replaced: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct MemInner {
    config: Option<String>,
    revision: i64,
    cluster_id: u64,
    next_lease: i64,
    leases: BTreeMap<String, StoredLease>,
    claims: BTreeMap<String, BTreeMap<String, LeaseAttrs>>,
    /// Every change so far, by revision, for watches that start behind (as etcd keeps them).
    history: Vec<(i64, Vec<LeaseEvent>)>,
    watchers: Vec<mpsc::Sender<Vec<LeaseEvent>>>,
    down: bool,
}

impl MemInner {
    fn send(&mut self, batch: Vec<LeaseEvent>) {
        if batch.is_empty() {
            return;
        }
        self.watchers.retain(|w| w.try_send(batch.clone()).is_ok());
        self.history.push((self.revision, batch));
    }
}

impl MemStore {
    /// A store holding `config`.
    pub fn new(config: &str) -> Self {
        let s = MemStore::default();
        {
            let mut g = s.inner.lock().unwrap();
            g.config = Some(config.to_string());
            g.cluster_id = 1;
        }
        s
    }

    /// Makes every call fail (etcd away) or succeed again.
    pub fn set_down(&self, down: bool) {
        self.inner.lock().unwrap().down = down;
    }

    /// Writes (`Some`) or deletes (`None`) the network config key.
    pub fn set_config(&self, config: Option<&str>) {
        let mut g = self.inner.lock().unwrap();
        g.revision += 1;
        g.config = config.map(str::to_string);
    }

    /// Inserts a lease as another node would.
    pub fn insert(&self, lease: Lease) {
        let mut g = self.inner.lock().unwrap();
        g.revision += 1;
        let key = lease.subnets.key();
        let create_revision = g.leases.get(&key).map_or(g.revision, |l| l.create_revision);
        let stored = StoredLease {
            lease,
            mod_revision: g.revision,
            create_revision,
            etcd_lease: 0,
        };
        g.leases.insert(key, stored.clone());
        g.send(vec![LeaseEvent::Put(stored)]);
    }

    /// Deletes a lease as an admin (or expiry) would.
    pub fn remove(&self, subnets: &LeaseSubnets) {
        let mut g = self.inner.lock().unwrap();
        g.revision += 1;
        let rev = g.revision;
        if g.leases.remove(&subnets.key()).is_some() {
            g.send(vec![LeaseEvent::Delete(*subnets, rev)]);
        }
    }

    /// `etcdctl del --prefix <prefix>`: every lease and the config key go in one revision.
    pub fn wipe(&self) {
        let mut g = self.inner.lock().unwrap();
        g.revision += 1;
        let rev = g.revision;
        let gone: Vec<LeaseEvent> = std::mem::take(&mut g.leases)
            .into_values()
            .map(|l| LeaseEvent::Delete(l.lease.subnets, rev))
            .collect();
        g.config = None;
        g.claims.clear();
        g.send(gone);
    }

    /// The store is replaced by a fresh cluster (another cluster id, revisions from the start)
    /// holding `config` and no lease: running watches break, as they would on a new etcd.
    pub fn replace_with_fresh(&self, config: Option<&str>) {
        {
            let mut g = self.inner.lock().unwrap();
            g.revision = 1;
            g.cluster_id += 1;
            g.leases.clear();
            g.claims.clear();
            g.history.clear();
            g.watchers.clear();
            g.config = config.map(str::to_string);
        }
        self.replaced.notify_waiters();
    }

    /// A snapshot of every lease.
    pub fn leases(&self) -> Vec<StoredLease> {
        self.inner
            .lock()
            .unwrap()
            .leases
            .values()
            .cloned()
            .collect()
    }

    fn check(&self) -> Result<std::sync::MutexGuard<'_, MemInner>, StoreError> {
        let g = self.inner.lock().unwrap();
        if g.down {
            return Err(StoreError::WatchEnded("store is down".into()));
        }
        Ok(g)
    }

    fn put(
        g: &mut MemInner,
        subnets: LeaseSubnets,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> HeldLease {
        g.revision += 1;
        g.next_lease += 1;
        let key = subnets.key();
        let create_revision = g.leases.get(&key).map_or(g.revision, |l| l.create_revision);
        let stored = StoredLease {
            lease: Lease {
                subnets,
                attrs: attrs.clone(),
                expires: None,
            },
            mod_revision: g.revision,
            create_revision,
            etcd_lease: g.next_lease,
        };
        g.leases.insert(key, stored.clone());
        g.send(vec![LeaseEvent::Put(stored)]);
        HeldLease {
            subnets,
            etcd_lease: g.next_lease,
            expires: SystemTime::now() + ttl,
            revision: g.revision,
        }
    }
}

impl LeaseStore for MemStore {
    async fn get_config(&self) -> Result<String, StoreError> {
        self.check()?
            .config
            .clone()
            .ok_or_else(|| StoreError::NoConfig("config".into()))
    }

    async fn list(&self) -> Result<Listing, StoreError> {
        let g = self.check()?;
        Ok(Listing {
            leases: g.leases.values().cloned().collect(),
            revision: g.revision,
            cluster_id: g.cluster_id,
        })
    }

    async fn create(
        &self,
        subnets: LeaseSubnets,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<HeldLease>, StoreError> {
        let mut g = self.check()?;
        if g.leases.contains_key(&subnets.key()) {
            return Ok(None);
        }
        Ok(Some(Self::put(&mut g, subnets, attrs, ttl)))
    }

    async fn reclaim(
        &self,
        old: &StoredLease,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<HeldLease>, StoreError> {
        let mut g = self.check()?;
        match g.leases.get(&old.lease.subnets.key()) {
            Some(cur) if cur.mod_revision == old.mod_revision => {
                Ok(Some(Self::put(&mut g, old.lease.subnets, attrs, ttl)))
            }
            _ => Ok(None),
        }
    }

    async fn renew(&self, held: &HeldLease) -> Result<SystemTime, StoreError> {
        let g = self.check()?;
        let key = held.subnets.key();
        match g.leases.get(&key) {
            Some(l) if l.etcd_lease == held.etcd_lease => {
                Ok(SystemTime::now() + Duration::from_hours(24))
            }
            Some(l) => Err(StoreError::LeaseLost {
                key,
                taken: true,
                reason: format!(
                    "the key was rewritten on etcd lease {:x} (ours is {:x})",
                    l.etcd_lease, held.etcd_lease
                ),
            }),
            None => Err(StoreError::LeaseLost {
                key,
                reason: "the key was deleted".into(),
                taken: false,
            }),
        }
    }

    async fn watch(&self, revision: i64, tx: mpsc::Sender<Vec<LeaseEvent>>) -> StoreError {
        let replaced = self.replaced.notified();
        tokio::pin!(replaced);
        replaced.as_mut().enable();
        match self.check() {
            Ok(mut g) => {
                for (_, batch) in g.history.iter().filter(|(rev, _)| *rev > revision) {
                    if tx.try_send(batch.clone()).is_err() {
                        return StoreError::WatchEnded("receiver full or gone".into());
                    }
                }
                g.watchers.push(tx.clone());
            }
            Err(e) => return e,
        }
        tokio::select! {
            () = tx.closed() => StoreError::WatchEnded("receiver gone".into()),
            () = replaced => StoreError::WatchEnded("store replaced".into()),
        }
    }

    async fn claim(
        &self,
        lease: &LeaseSubnets,
        attrs: &LeaseAttrs,
        _ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut g = self.check()?;
        g.claims
            .entry(lease.key())
            .or_default()
            .insert(attrs.node_id.clone().unwrap_or_default(), attrs.clone());
        Ok(())
    }

    async fn claims(&self, lease: &LeaseSubnets) -> Result<Vec<LeaseAttrs>, StoreError> {
        let g = self.check()?;
        Ok(g.claims
            .get(&lease.key())
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default())
    }
}
