//! The etcd store of Services and EndpointSlices (the standalone source).
//!
//! Why this shape:
//! - Key layout: `<prefix>/services/services/<namespace>/<name>` and
//!   `<prefix>/services/endpointslices/<namespace>/<name>`, each value the object's canonical
//!   JSON ([`Object::to_json`]). One key per object means a `twilld apply` of one object is one
//!   put and a watch event names exactly what changed; namespaces and names are DNS labels (no
//!   `/`), so keys parse back unambiguously. Writes of several objects go in one transaction:
//!   a manifest is applied whole or not at all.
//! - The watch covers the whole prefix so the network config key's deletion arrives with the
//!   objects' (one revision, when the prefix is wiped), and any change that could empty the
//!   store — the config key written or deleted, the last object deleted — ends the watch so a
//!   listing, with the store's facts ([`StoreFacts`]: cluster id, revision, config key), is what
//!   the loop's guard judges ([`crate::services::sync::guard`]).

use etcd_client::{Client, EventType, GetOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::mpsc;

use crate::services::model::{
    Change, FieldError, Kind, Object, ObjectKey, endpoint_slice_from_json, service_from_json,
};
use crate::services::source::{
    Listing, MAX_TXN_OPS, ServiceStore, SourceError, SourceUpdate, StoreFacts,
};
use crate::shared::etcd::{EtcdTls, WatchEnd, watch_prefix};

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

    /// Refuses a transaction of `count` operations, more than one may hold.
    fn within_txn_limit(&self, count: usize) -> Result<(), SourceError> {
        if count > self.max_txn_ops {
            return Err(SourceError::TooMany {
                count,
                max: self.max_txn_ops,
            });
        }
        Ok(())
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
        self.within_txn_limit(objects.len())?;
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
        self.within_txn_limit(keys.len())?;
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::services::testutil::{WEB, objs};

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
}
