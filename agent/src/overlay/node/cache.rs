//! The lease cache: every lease, from a listing and the watch, published as snapshots; a wiped store is held.

use crate::overlay::source::{LeaseEvent, LeaseStore, StoreError, StoredLease};
use crate::shared::backoff::Backoff;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// The lease cache's view of the store: every lease, as of a store revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Every lease (ours included).
    pub leases: Vec<StoredLease>,
    /// The highest store revision the snapshot reflects.
    pub revision: i64,
    /// Which store the revision counts in: bumped whenever the store turns out to be another
    /// one (another etcd cluster id, or its revision went backwards), so a revision is never
    /// compared with one of another store.
    pub epoch: u64,
}

/// What the lease cache remembers of the store it last saw, to tell a store that lost its data
/// (or was replaced by a fresh one) from one where the nodes really left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StoreSeen {
    revision: i64,
    cluster_id: u64,
    had_leases: bool,
}

/// Whether the network config can be read (the key is there): the proof that an empty listing
/// is a cluster without leases, not a store that lost everything.
pub(crate) async fn config_present<S: LeaseStore>(store: &S) -> bool {
    store.get_config().await.is_ok()
}

/// Waits, polling with backoff, until the network config can be read again.
pub(crate) async fn hold_until_config<S: LeaseStore>(store: &S, why: &str) {
    tracing::warn!(
        "{why}, and the network config key is gone: etcd looks wiped or replaced; keeping the \
         overlay as it is until the config key is back"
    );
    let mut backoff = Backoff::new();
    loop {
        tokio::time::sleep(backoff.next_delay().min(Duration::from_secs(2))).await;
        if config_present(store).await {
            tracing::info!("the network config key is back; acting on the lease listing again");
            return;
        }
    }
}

pub(crate) fn apply_events(
    cache: &mut BTreeMap<String, StoredLease>,
    revision: &mut i64,
    batch: Vec<LeaseEvent>,
) {
    for ev in batch {
        match ev {
            LeaseEvent::Put(l) => {
                *revision = (*revision).max(l.mod_revision);
                cache.insert(l.lease.subnets.key(), l);
            }
            LeaseEvent::Delete(s, rev) => {
                *revision = (*revision).max(rev);
                cache.remove(&s.key());
            }
        }
    }
}

/// Keeps a cache of every lease, fed by list + watch, and publishes snapshots. Re-lists whenever
/// the watch breaks (compaction, etcd restart), with backoff; never gives up. A listing (or a
/// watch batch) that empties a cache that held leases is published only while the network
/// config key is there; otherwise the cache holds the last snapshot until the key is back.
pub async fn lease_cache<S: LeaseStore + Clone>(
    store: S,
    out: watch::Sender<Option<Arc<Snapshot>>>,
) {
    let mut backoff = Backoff::new();
    let mut seen = StoreSeen::default();
    let mut epoch = 0;
    loop {
        let listing = match store.list().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "listing leases failed; keeping the dataplane as it is");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        let other_cluster = seen.cluster_id != 0
            && listing.cluster_id != 0
            && listing.cluster_id != seen.cluster_id;
        if other_cluster || listing.revision < seen.revision {
            epoch += 1;
        }
        if other_cluster {
            tracing::warn!(
                before = format!("{:x}", seen.cluster_id),
                now = format!("{:x}", listing.cluster_id),
                "the lease store is another etcd cluster than before"
            );
        } else if listing.revision < seen.revision {
            tracing::warn!(
                before = seen.revision,
                now = listing.revision,
                "the lease store's revision went backwards (etcd restored or replaced)"
            );
        }
        // Remember the store as it is now (a hold below must not count it as new again).
        seen.revision = listing.revision;
        seen.cluster_id = listing.cluster_id;
        if listing.leases.is_empty() && seen.had_leases && !config_present(&store).await {
            hold_until_config(&store, "every lease is gone from the listing").await;
            continue;
        }
        backoff = Backoff::new();
        seen = StoreSeen {
            revision: listing.revision,
            cluster_id: listing.cluster_id,
            had_leases: !listing.leases.is_empty(),
        };
        let mut revision = listing.revision;
        let mut cache: BTreeMap<String, StoredLease> = listing
            .leases
            .into_iter()
            .map(|l| (l.lease.subnets.key(), l))
            .collect();
        let publish = |cache: &BTreeMap<String, StoredLease>, revision: i64| {
            let _ = out.send(Some(Arc::new(Snapshot {
                leases: cache.values().cloned().collect(),
                revision,
                epoch,
            })));
        };
        publish(&cache, revision);
        let (tx, mut rx) = mpsc::channel(256);
        let w = store.clone();
        let mut watch_task = tokio::spawn(async move { w.watch(listing.revision, tx).await });
        let mut suspect = false;
        loop {
            let had = !cache.is_empty();
            let broke = tokio::select! {
                batch = rx.recv() => {
                    let Some(batch) = batch else { break };
                    apply_events(&mut cache, &mut revision, batch);
                    false
                }
                res = &mut watch_task => {
                    let e = res.unwrap_or_else(|j| StoreError::WatchEnded(j.to_string()));
                    tracing::warn!(error = %e, "lease watch broke; re-listing");
                    // Drain what arrived before the break.
                    while let Ok(batch) = rx.try_recv() {
                        apply_events(&mut cache, &mut revision, batch);
                    }
                    true
                }
            };
            seen.revision = revision;
            if had && cache.is_empty() && !config_present(&store).await {
                suspect = true;
                break;
            }
            seen.had_leases = !cache.is_empty();
            publish(&cache, revision);
            if broke {
                break;
            }
        }
        watch_task.abort();
        if suspect {
            hold_until_config(&store, "every lease was deleted").await;
            continue;
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
