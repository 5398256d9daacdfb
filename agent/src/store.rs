//! Where leases live: the `LeaseStore` seam, its etcd implementation and an in-memory fake.
//!
//! The store knows flannel's key layout (`<prefix>/config`, `<prefix>/subnets/<key>`) and nothing
//! about the dataplane. Creation is a transaction that succeeds only if the key is absent, and a
//! reclaim only if the key still has the revision we saw, so two nodes can never hold one subnet.
//! Every key is bound to an etcd lease: a node that vanishes loses its subnet when the TTL runs out.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::mpsc;

use crate::lease::{Lease, LeaseAttrs, LeaseSubnets};

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
    /// A TLS file could not be read.
    #[error("read {path}: {source}")]
    TlsFile {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The watch stream ended or broke; the caller re-lists.
    #[error("lease watch ended: {0}")]
    WatchEnded(String),
    /// The kube subnet manager failed (the Kubernetes API, the node's `podCIDRs`, the network
    /// config file).
    #[error(transparent)]
    Kube(Box<crate::kube::subnet::SubnetError>),
}

/// A lease as stored, with the store's bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLease {
    /// The lease.
    pub lease: Lease,
    /// Revision of the last change of the key (for compare-and-swap).
    pub mod_revision: i64,
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
}

/// A change seen by the watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    /// A lease was created or changed.
    Put(StoredLease),
    /// A lease was deleted or expired.
    Delete(LeaseSubnets),
}

/// The lease store seam.
pub trait LeaseStore: Send + Sync + 'static {
    /// The raw network config JSON.
    fn get_config(&self) -> impl Future<Output = Result<String, StoreError>> + Send;
    /// Every lease, and the revision the list was read at.
    fn list(&self) -> impl Future<Output = Result<(Vec<StoredLease>, i64), StoreError>> + Send;
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
    /// Renews a held lease; returns the new expiry.
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
        cfg: &crate::config::NetworkConfig,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<HeldLease>, StoreError>> + Send {
        let _ = (cfg, attrs, ttl);
        async { Ok(None) }
    }
}

/// TLS material for etcd (flannel's `--etcd-cafile/--etcd-certfile/--etcd-keyfile`).
#[derive(Debug, Clone, Default)]
pub struct EtcdTls {
    /// CA bundle.
    pub ca_file: Option<String>,
    /// Client certificate.
    pub cert_file: Option<String>,
    /// Client key.
    pub key_file: Option<String>,
}

/// flannel's etcd flags, shared by the agent and by `twilld apply/get/delete`, so one prefix
/// serves both.
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated.
    #[arg(long, default_value = "http://127.0.0.1:2379", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// etcd key prefix holding `config`, `subnets/` and `services/`.
    #[arg(long, default_value = "/coreos.com/network")]
    pub etcd_prefix: String,
    /// CA bundle for etcd TLS.
    #[arg(long)]
    pub etcd_cafile: Option<String>,
    /// Client certificate for etcd mTLS.
    #[arg(long)]
    pub etcd_certfile: Option<String>,
    /// Client key for etcd mTLS.
    #[arg(long)]
    pub etcd_keyfile: Option<String>,
}

impl EtcdArgs {
    /// The TLS material the flags name.
    pub fn tls(&self) -> EtcdTls {
        EtcdTls {
            ca_file: self.etcd_cafile.clone(),
            cert_file: self.etcd_certfile.clone(),
            key_file: self.etcd_keyfile.clone(),
        }
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

fn read_file(path: &str) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|source| StoreError::TlsFile {
        path: path.to_string(),
        source,
    })
}

/// Dials etcd with twill's client settings (2 s connect, 5 s request timeouts, keep-alives) and
/// the (m)TLS material of flannel's `--etcd-*file` flags. Shared by every etcd user in the agent.
pub async fn connect_client(endpoints: &[String], tls: &EtcdTls) -> Result<Client, StoreError> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
        .with_keep_alive_while_idle(true);
    if tls.ca_file.is_some() || tls.cert_file.is_some() {
        let mut t = TlsOptions::new();
        if let Some(ca) = &tls.ca_file {
            t = t.ca_certificate(Certificate::from_pem(read_file(ca)?));
        }
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            t = t.identity(Identity::from_pem(read_file(cert)?, read_file(key)?));
        }
        opts = opts.with_tls(t);
    }
    Client::connect(endpoints, Some(opts))
        .await
        .map_err(etcd("connect", endpoints.join(",")))
}

/// Why [`watch_prefix`] returned.
#[derive(Debug)]
pub enum WatchEnd {
    /// The watch call or stream failed.
    Etcd(etcd_client::Error),
    /// The stream ended, was canceled or compacted, or the receiver went away.
    Ended(String),
}

/// Watches every key under `prefix` after `revision` (with progress notifications), decodes each
/// event with `decode` and sends each response's changes as one batch into `tx`, until the stream
/// breaks; the caller then re-lists. Shared by the lease store and the service source.
pub async fn watch_prefix<T>(
    client: &Client,
    prefix: &str,
    revision: i64,
    tx: &mpsc::Sender<Vec<T>>,
    mut decode: impl FnMut(&etcd_client::Event) -> Option<T>,
) -> WatchEnd {
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1)
        .with_progress_notify();
    let mut stream = match client.clone().watch(prefix, Some(opts)).await {
        Ok(s) => s,
        Err(e) => return WatchEnd::Etcd(e),
    };
    loop {
        match stream.message().await {
            Ok(Some(resp)) => {
                if resp.canceled() || resp.compact_revision() > 0 {
                    return WatchEnd::Ended(format!(
                        "canceled ({}), compacted at {}",
                        resp.cancel_reason(),
                        resp.compact_revision()
                    ));
                }
                let batch: Vec<T> = resp.events().iter().filter_map(&mut decode).collect();
                if !batch.is_empty() && tx.send(batch).await.is_err() {
                    return WatchEnd::Ended("receiver gone".into());
                }
            }
            Ok(None) => return WatchEnd::Ended("stream closed".into()),
            Err(e) => return WatchEnd::Etcd(e),
        }
    }
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

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    fn key(&self, subnets: &LeaseSubnets) -> String {
        format!("{}{}", self.subnets_prefix(), subnets.key())
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
            etcd_lease: kv.lease(),
        })
    }

    async fn put_if(
        &self,
        key: String,
        cmp: Compare,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<i64>, StoreError> {
        let mut c = self.client.clone();
        let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let grant = c
            .lease_grant(ttl_secs, None)
            .await
            .map_err(etcd("lease grant", &key))?;
        let txn = Txn::new().when([cmp]).and_then([TxnOp::put(
            key.clone(),
            attrs.to_json(),
            Some(PutOptions::new().with_lease(grant.id())),
        )]);
        let resp = c.txn(txn).await.map_err(etcd("txn", &key))?;
        if resp.succeeded() {
            Ok(Some(grant.id()))
        } else {
            let _ = c.lease_revoke(grant.id()).await;
            Ok(None)
        }
    }
}

impl LeaseStore for EtcdStore {
    async fn get_config(&self) -> Result<String, StoreError> {
        let key = format!("{}/config", self.prefix);
        let resp = self
            .client
            .clone()
            .get(key.as_str(), None)
            .await
            .map_err(etcd("get", &key))?;
        let kv = resp.kvs().first().ok_or(StoreError::NoConfig(key))?;
        Ok(String::from_utf8_lossy(kv.value()).into_owned())
    }

    async fn list(&self) -> Result<(Vec<StoredLease>, i64), StoreError> {
        let prefix = self.subnets_prefix();
        let resp = self
            .client
            .clone()
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(etcd("get", &prefix))?;
        let rev = resp
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision);
        Ok((
            resp.kvs().iter().filter_map(|kv| self.decode(kv)).collect(),
            rev,
        ))
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
            .map(|id| HeldLease {
                subnets,
                etcd_lease: id,
                expires: SystemTime::now() + ttl,
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
        Ok(got.map(|id| HeldLease {
            subnets: old.lease.subnets,
            etcd_lease: id,
            expires: SystemTime::now() + ttl,
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
        match resp {
            Some(r) if r.ttl() > 0 => {
                Ok(SystemTime::now()
                    + Duration::from_secs(u64::try_from(r.ttl()).unwrap_or_default()))
            }
            _ => Err(StoreError::Etcd {
                op: "lease keep-alive",
                key,
                source: etcd_client::Error::LeaseKeepAliveError("lease expired".into()),
            }),
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
                    LeaseSubnets::parse_key(short).ok().map(LeaseEvent::Delete)
                }
            }
        })
        .await;
        match end {
            WatchEnd::Etcd(e) => etcd("watch", &prefix)(e),
            WatchEnd::Ended(why) => StoreError::WatchEnded(why),
        }
    }
}

/// In-memory store for unit tests: same semantics (create-if-absent, compare mod revision).
#[derive(Clone, Default)]
pub struct MemStore {
    inner: Arc<Mutex<MemInner>>,
}

#[derive(Default)]
struct MemInner {
    config: Option<String>,
    revision: i64,
    next_lease: i64,
    leases: BTreeMap<String, StoredLease>,
    watchers: Vec<mpsc::Sender<Vec<LeaseEvent>>>,
    down: bool,
}

impl MemStore {
    /// A store holding `config`.
    pub fn new(config: &str) -> Self {
        let s = MemStore::default();
        s.inner.lock().unwrap().config = Some(config.to_string());
        s
    }

    /// Makes every call fail (etcd away) or succeed again.
    pub fn set_down(&self, down: bool) {
        self.inner.lock().unwrap().down = down;
    }

    /// Inserts a lease as another node would.
    pub fn insert(&self, lease: Lease) {
        let mut g = self.inner.lock().unwrap();
        g.revision += 1;
        let stored = StoredLease {
            lease,
            mod_revision: g.revision,
            etcd_lease: 0,
        };
        g.leases.insert(stored.lease.subnets.key(), stored.clone());
        g.watchers
            .retain(|w| w.try_send(vec![LeaseEvent::Put(stored.clone())]).is_ok());
    }

    /// Deletes a lease as an admin (or expiry) would.
    pub fn remove(&self, subnets: &LeaseSubnets) {
        let mut g = self.inner.lock().unwrap();
        g.revision += 1;
        if g.leases.remove(&subnets.key()).is_some() {
            g.watchers
                .retain(|w| w.try_send(vec![LeaseEvent::Delete(*subnets)]).is_ok());
        }
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
        let stored = StoredLease {
            lease: Lease {
                subnets,
                attrs: attrs.clone(),
                expires: None,
            },
            mod_revision: g.revision,
            etcd_lease: g.next_lease,
        };
        g.leases.insert(subnets.key(), stored.clone());
        g.watchers
            .retain(|w| w.try_send(vec![LeaseEvent::Put(stored.clone())]).is_ok());
        HeldLease {
            subnets,
            etcd_lease: g.next_lease,
            expires: SystemTime::now() + ttl,
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

    async fn list(&self) -> Result<(Vec<StoredLease>, i64), StoreError> {
        let g = self.check()?;
        Ok((g.leases.values().cloned().collect(), g.revision))
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
        match g.leases.get(&held.subnets.key()) {
            Some(l) if l.etcd_lease == held.etcd_lease => {
                Ok(SystemTime::now() + Duration::from_hours(24))
            }
            _ => Err(StoreError::WatchEnded("lease gone".into())),
        }
    }

    async fn watch(&self, _revision: i64, tx: mpsc::Sender<Vec<LeaseEvent>>) -> StoreError {
        match self.check() {
            Ok(mut g) => g.watchers.push(tx.clone()),
            Err(e) => return e,
        }
        tx.closed().await;
        StoreError::WatchEnded("receiver gone".into())
    }
}
