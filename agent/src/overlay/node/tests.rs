//! Tests of the node loop's pieces on the in-memory store: acquiring, renewing and losing a
//! lease, validating and reporting peers, the subnet file's facts.

use super::*;
use crate::overlay::lease::LEASE_TTL;
use crate::overlay::node::acquire::{Acquired, acquire};
use crate::overlay::node::identity::node_identity;
use crate::overlay::source::{MemStore, StoredLease};
use crate::shared::testutil::{TempDir, assert_samples};

const CFG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

/// A node's attributes: its public IP, identity `id-<ip>`.
fn attrs(ip: &str) -> LeaseAttrs {
    LeaseAttrs {
        public_ip: Some(ip.parse().unwrap()),
        public_ipv6: None,
        backend_type: "vxlan".into(),
        backend_data: Some(serde_json::json!({"VNI":1,"VtepMAC":"0e:00:00:00:00:01"})),
        backend_v6_data: None,
        node_id: Some(format!("id-{ip}")),
    }
}

/// The in-memory store holding the network config `json`, and that config.
fn store_with(json: &str) -> (MemStore, NetworkConfig) {
    (MemStore::new(json), NetworkConfig::parse(json).unwrap())
}

/// Another node's attributes with the public IP `ip` (shared with a node of [`attrs`]) and
/// identity `id`.
fn same_ip_as(ip: &str, id: Option<&str>) -> LeaseAttrs {
    LeaseAttrs {
        node_id: id.map(String::from),
        ..attrs(ip)
    }
}

/// A snapshot of `leases` read at `revision` of the first store.
fn snapshot(leases: Vec<StoredLease>, revision: i64) -> Snapshot {
    Snapshot {
        leases,
        revision,
        epoch: 0,
    }
}

async fn held(store: &MemStore, cfg: &NetworkConfig, a: &LeaseAttrs) -> HeldLease {
    held_from(store, cfg, a, None).await
}

/// Acquires a lease for `a`, asking for `prev` back; panics on a conflict.
async fn held_from(
    store: &MemStore,
    cfg: &NetworkConfig,
    a: &LeaseAttrs,
    prev: Option<LeaseSubnets>,
) -> HeldLease {
    match acquire(store, cfg, a, prev).await.unwrap() {
        Acquired::Held(h) => h,
        Acquired::Conflict(c) => panic!("conflict with {c:?}"),
    }
}

#[tokio::test]
async fn restart_gets_the_same_subnet_back() {
    let (store, cfg) = store_with(CFG);
    let a = held(&store, &cfg, &attrs("198.18.0.11")).await;
    let b = held(&store, &cfg, &attrs("198.18.0.12")).await;
    assert_ne!(a.subnets, b.subnets);
    // Restart of node a (new VTEP MAC even): same subnet, new etcd lease, one key.
    let mut a2_attrs = attrs("198.18.0.11");
    a2_attrs.backend_data = Some(serde_json::json!({"VNI":1,"VtepMAC":"0e:00:00:00:00:09"}));
    let a2 = held(&store, &cfg, &a2_attrs).await;
    assert_eq!(a2.subnets, a.subnets);
    assert_ne!(a2.etcd_lease, a.etcd_lease);
    assert_eq!(store.leases().len(), 2);
    let stored = store
        .leases()
        .into_iter()
        .find(|l| l.lease.subnets == a.subnets)
        .unwrap();
    assert_eq!(stored.lease.attrs, a2_attrs);
}

#[tokio::test]
async fn a_live_holder_with_our_public_ip_is_not_taken_over() {
    let (store, cfg) = store_with(CFG);
    let first = attrs("198.18.0.11");
    let a = held(&store, &cfg, &first).await;
    let before = store.leases();
    // A second node started with the same --public-ip: another identity, no subnet file.
    let mut second = same_ip_as("198.18.0.11", Some("id-second"));
    second.backend_data = Some(serde_json::json!({"VNI":1,"VtepMAC":"0e:00:00:00:00:99"}));
    let elsewhere = LeaseSubnets::parse_key("10.244.250.0-24").unwrap();
    for previous in [None, Some(elsewhere)] {
        match acquire(&store, &cfg, &second, previous).await.unwrap() {
            Acquired::Conflict(c) => {
                assert_eq!(c.lease.subnets, a.subnets);
                assert_eq!(c.lease.attrs.node_id, first.node_id);
            }
            Acquired::Held(h) => panic!("took {h:?} over"),
        }
    }
    assert_eq!(store.leases(), before, "the holder's lease was touched");
    // The holder renews as before.
    store.renew(&a).await.unwrap();
}

#[tokio::test]
async fn a_lost_identity_file_is_made_up_for_by_the_previous_subnet_file() {
    let (store, cfg) = store_with(CFG);
    let before = held(&store, &cfg, &attrs("198.18.0.11")).await;
    // Restarted with a new identity (its file was on a disk that did not survive) but with
    // its subnet file: it gets its lease back; without the file it could not prove it.
    let reborn = same_ip_as("198.18.0.11", Some("id-reborn"));
    assert!(matches!(
        acquire(&store, &cfg, &reborn, None).await.unwrap(),
        Acquired::Conflict(_)
    ));
    match acquire(&store, &cfg, &reborn, Some(before.subnets))
        .await
        .unwrap()
    {
        Acquired::Held(h) => assert_eq!(h.subnets, before.subnets),
        Acquired::Conflict(c) => panic!("{c:?}"),
    }
}

#[tokio::test]
async fn a_lease_without_identity_is_reclaimed_only_with_the_previous_subnet_file() {
    let (store, cfg) = store_with(CFG);
    // Written by flannel (or an older twill) on this node.
    let sn = LeaseSubnets::parse_key("10.244.42.0-24").unwrap();
    let old = same_ip_as("198.18.0.11", None);
    store.insert(Lease {
        subnets: sn,
        attrs: old,
        expires: None,
    });
    let me = attrs("198.18.0.11");
    assert!(matches!(
        acquire(&store, &cfg, &me, None).await.unwrap(),
        Acquired::Conflict(c) if c.lease.subnets == sn
    ));
    match acquire(&store, &cfg, &me, Some(sn)).await.unwrap() {
        Acquired::Held(h) => assert_eq!(h.subnets, sn),
        Acquired::Conflict(c) => panic!("{c:?}"),
    }
    assert_eq!(store.leases()[0].lease.attrs.node_id, me.node_id);
}

#[tokio::test]
async fn previous_subnet_from_file_is_preferred_when_free() {
    let (store, cfg) = store_with(CFG);
    let prev = LeaseSubnets {
        v4: Some("10.244.77.0/24".parse().unwrap()),
        v6: None,
    };
    let a = held_from(&store, &cfg, &attrs("198.18.0.11"), Some(prev)).await;
    assert_eq!(a.subnets, prev);
    // Taken by someone else: another one.
    let b = held_from(&store, &cfg, &attrs("198.18.0.12"), Some(prev)).await;
    assert_ne!(b.subnets, prev);
}

#[tokio::test]
async fn many_nodes_never_share_a_subnet() {
    let (store, cfg) = store_with(r#"{"Network":"10.244.0.0/20","Backend":{"Type":"vxlan"}}"#);
    let mut tasks = Vec::new();
    for i in 0..15 {
        let s = store.clone();
        let c = cfg.clone();
        tasks.push(tokio::spawn(async move {
            held(&s, &c, &attrs(&format!("198.18.0.{}", 10 + i))).await
        }));
    }
    let mut got = std::collections::HashSet::new();
    for t in tasks {
        assert!(got.insert(t.await.unwrap().subnets));
    }
    // 15 subnets between .1 and .15 of a /20 split in /24s: the range is now full.
    let err = acquire(&store, &cfg, &attrs("198.18.0.99"), None)
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("no free IPv4 subnet"),
        "{err:#}"
    );
}

/// Waits (real time, bounded) until `f` holds.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_signal_ends_the_wait_for_a_free_subnet() {
    let (store, cfg) = store_with(r#"{"Network":"10.244.0.0/22","Backend":{"Type":"vxlan"}}"#);
    for ip in ["198.18.0.12", "198.18.0.13", "198.18.0.14"] {
        held(&store, &cfg, &attrs(ip)).await;
    }
    let metrics = Arc::new(Metrics::default());
    let (fire, shutdown) = Shutdown::manual();
    let task = {
        let (store, cfg, metrics) = (store.clone(), cfg.clone(), metrics.clone());
        tokio::spawn(async move {
            acquire_until(
                &store,
                &cfg,
                &attrs("198.18.0.11"),
                None,
                &metrics,
                &shutdown,
            )
            .await
        })
    };
    eventually("not ready for want of a subnet", || {
        metrics.health().0 == 503 && metrics.health().1.contains("no free IPv4 subnet")
    })
    .await;
    let start = Instant::now();
    fire.send(true).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("acquire_until did not end on the signal")
        .unwrap();
    assert!(got.is_none());
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_conflict_is_reported_and_claimed_until_the_holder_goes() {
    let (store, cfg) = store_with(CFG);
    let a = held(&store, &cfg, &attrs("198.18.0.11")).await;
    let second = same_ip_as("198.18.0.11", Some("id-second"));
    let metrics = Arc::new(Metrics::default());
    let (_fire, shutdown) = Shutdown::manual();
    let task = {
        let (store, cfg, metrics, second) =
            (store.clone(), cfg.clone(), metrics.clone(), second.clone());
        tokio::spawn(async move {
            acquire_until(&store, &cfg, &second, None, &metrics, &shutdown).await
        })
    };
    eventually("conflict reported", || {
        let (code, text) = metrics.health();
        code == 503
            && text.contains(&a.subnets.key())
            && text.contains("id-198.18.0.11")
            && metrics.render().contains("twill_lease_conflicts 1\n")
    })
    .await;
    // The holder sees the claim.
    let claims = store.claims(&a.subnets).await.unwrap();
    assert_eq!(claims, vec![second.clone()]);
    // The holder's lease goes (it stopped and its TTL ran out): the second gets a lease.
    store.remove(&a.subnets);
    let got = tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_samples(&metrics.render(), &["twill_lease_conflicts 0"]);
    assert_eq!(store.leases()[0].lease.attrs, second);
    assert_eq!(store.leases()[0].lease.subnets, got.subnets);
}

#[tokio::test]
async fn a_lost_or_taken_lease_is_noticed_but_not_from_a_stale_snapshot() {
    let (store, cfg) = store_with(CFG);
    let me = attrs("198.18.0.11");
    let h = held(&store, &cfg, &me).await;
    let snap = |store: &MemStore, revision: i64| snapshot(store.leases(), revision);
    assert_eq!(lease_lost(&snap(&store, h.revision), &h, &me, true), None);
    // Deleted: noticed; but a snapshot from before our write proves nothing.
    let empty = snapshot(Vec::new(), h.revision - 1);
    assert_eq!(lease_lost(&empty, &h, &me, true), None);
    // Unless the snapshot is of another store (an etcd replaced, its revisions anew).
    assert!(matches!(
        lease_lost(&empty, &h, &me, false),
        Some(Loss::Gone(_))
    ));
    store.remove(&h.subnets);
    let gone = lease_lost(&snap(&store, h.revision + 1), &h, &me, true).unwrap();
    assert!(
        matches!(&gone, Loss::Gone(w) if w.contains("deleted")),
        "{gone:?}"
    );
    // Rewritten by another node (an older twill that "reclaimed" it by public IP).
    let h = held(&store, &cfg, &me).await;
    let thief = same_ip_as("198.18.0.11", Some("id-thief"));
    store.insert(Lease {
        subnets: h.subnets,
        attrs: thief,
        expires: None,
    });
    let taken = lease_lost(&snap(&store, h.revision + 1), &h, &me, true).unwrap();
    assert!(
        matches!(&taken, Loss::Taken(w) if w.contains("taken over") && w.contains("id-thief")),
        "{taken:?}"
    );
    // The renewal says so too.
    let err = store.renew(&h).await.unwrap_err();
    assert!(
        matches!(err, StoreError::LeaseLost { taken: true, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn ignored_leases_are_counted_and_the_peers_kept() {
    let (store, cfg) = store_with(CFG);
    let me = attrs("198.18.0.11");
    let h = held(&store, &cfg, &me).await;
    held(&store, &cfg, &attrs("198.18.0.12")).await;
    let bad = same_ip_as("0.0.0.0", None);
    // (10.244.0.0/24 is below SubnetMin: never one the nodes above were given.)
    for key in ["198.18.0.0-25", "8.8.8.0-24", "10.244.0.0-24"] {
        store.insert(Lease {
            subnets: LeaseSubnets::parse_key(key).unwrap(),
            attrs: if key.starts_with("10.") {
                bad.clone()
            } else {
                attrs("198.18.0.13")
            },
            expires: None,
        });
    }
    let metrics = Metrics::default();
    let mut report = LeaseReport::default();
    let snap = snapshot(store.leases(), i64::MAX);
    for _ in 0..2 {
        let peers = usable_peers(&cfg, &snap, &h, &me, &mut report, &metrics);
        assert_eq!(peers.len(), 1, "{peers:?}");
        assert_eq!(peers[0].attrs.public_ip.unwrap().to_string(), "198.18.0.12");
    }
    assert_samples(
        &metrics.render(),
        &[
            "twill_leases_ignored{reason=\"outside_network\"} 2",
            "twill_leases_ignored{reason=\"bad_public_ip\"} 1",
            "twill_leases_ignored{reason=\"wrong_length\"} 0",
        ],
    );
}

#[tokio::test]
async fn an_older_lease_over_ours_is_counted_as_a_conflict() {
    let (store, cfg) = store_with(CFG);
    // Another node's lease, created first, names our subnet in another key (with an IPv6
    // part this IPv4-only cluster ignores); ours comes second.
    let mut other = lease_of("198.18.0.12", 5);
    other.subnets = LeaseSubnets::parse_key("10.244.5.0-24&fd00::-64").unwrap();
    store.insert(other);
    let me = attrs("198.18.0.11");
    let h = store
        .create(
            LeaseSubnets::parse_key("10.244.5.0-24").unwrap(),
            &me,
            LEASE_TTL,
        )
        .await
        .unwrap()
        .unwrap();
    let metrics = Metrics::default();
    let mut report = LeaseReport::default();
    let snap = snapshot(store.leases(), h.revision);
    let peers = usable_peers(&cfg, &snap, &h, &me, &mut report, &metrics);
    assert!(peers.is_empty(), "{peers:?}");
    assert_samples(
        &metrics.render(),
        &[
            "twill_lease_conflicts 1",
            "twill_leases_ignored{reason=\"overlaps_own_subnet\"} 1",
        ],
    );
}

fn lease_of(ip: &str, n: u8) -> Lease {
    Lease {
        subnets: LeaseSubnets::parse_key(&format!("10.244.{n}.0-24")).unwrap(),
        attrs: attrs(ip),
        expires: None,
    }
}

/// The lease cache on `store`: its task and the keys of its latest snapshot.
fn cache_on(
    store: &MemStore,
) -> (
    tokio::task::JoinHandle<()>,
    watch::Receiver<Option<Arc<Snapshot>>>,
) {
    let (tx, rx) = watch::channel(None);
    (tokio::spawn(lease_cache(store.clone(), tx)), rx)
}

/// Waits until the cache publishes a snapshot of `n` leases.
async fn published(rx: &mut watch::Receiver<Option<Arc<Snapshot>>>, n: usize) {
    rx.wait_for(|s| s.as_ref().is_some_and(|s| s.leases.len() == n))
        .await
        .unwrap();
}

/// Waits up to `within` until the cache publishes an empty snapshot; `what` is the failure.
async fn published_empty(
    rx: &mut watch::Receiver<Option<Arc<Snapshot>>>,
    within: Duration,
    what: &str,
) {
    tokio::time::timeout(
        within,
        rx.wait_for(|s| s.as_ref().is_some_and(|s| s.leases.is_empty())),
    )
    .await
    .expect(what)
    .unwrap();
}

fn keys(rx: &watch::Receiver<Option<Arc<Snapshot>>>) -> Vec<String> {
    rx.borrow()
        .as_ref()
        .map(|s| s.leases.iter().map(|l| l.lease.subnets.key()).collect())
        .unwrap_or_default()
}

#[tokio::test(start_paused = true)]
async fn a_wiped_store_is_not_acted_on_until_the_config_is_back() {
    let store = MemStore::new(CFG);
    store.insert(lease_of("198.18.0.11", 1));
    store.insert(lease_of("198.18.0.12", 2));
    let (task, mut rx) = cache_on(&store);
    published(&mut rx, 2).await;
    // etcdctl del --prefix: every lease and the config key at once.
    store.wipe();
    // A minute (of paused time: every task runs until idle first) brings no empty snapshot.
    tokio::time::sleep(Duration::from_mins(1)).await;
    assert_eq!(keys(&rx).len(), 2);
    assert!(!rx.has_changed().unwrap());
    // The config key is back: the empty listing is acted on.
    store.set_config(Some(CFG));
    published_empty(
        &mut rx,
        Duration::from_mins(1),
        "the empty listing was never published",
    )
    .await;
    // Leases deleted one by one, the config in place, are acted on at once.
    store.insert(lease_of("198.18.0.11", 1));
    published(&mut rx, 1).await;
    store.remove(&lease_of("198.18.0.11", 1).subnets);
    published_empty(
        &mut rx,
        Duration::from_secs(1),
        "a real departure was held back",
    )
    .await;
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_fresh_store_is_acted_on_only_with_its_config() {
    let store = MemStore::new(CFG);
    store.insert(lease_of("198.18.0.11", 1));
    let (task, mut rx) = cache_on(&store);
    published(&mut rx, 1).await;
    // Another etcd (revision from the start, another cluster id), empty, no config yet.
    store.replace_with_fresh(None);
    tokio::time::sleep(Duration::from_mins(1)).await;
    assert_eq!(keys(&rx).len(), 1);
    assert_eq!(rx.borrow().as_ref().unwrap().epoch, 0);
    store.set_config(Some(CFG));
    published_empty(
        &mut rx,
        Duration::from_mins(1),
        "the fresh store was never acted on",
    )
    .await;
    // Its revisions count anew: the snapshot says it is another store.
    assert_eq!(rx.borrow().as_ref().unwrap().epoch, 1);
    // A fresh store that comes with its config is acted on at once.
    store.insert(lease_of("198.18.0.11", 1));
    published(&mut rx, 1).await;
    store.replace_with_fresh(Some(CFG));
    published_empty(
        &mut rx,
        Duration::from_mins(1),
        "the fresh store with its config was not acted on",
    )
    .await;
    task.abort();
}

#[test]
fn renewals_never_come_back_to_back() {
    // Whatever the store answers, renewals never come back to back.
    let soon = SystemTime::now() + Duration::from_secs(30);
    assert_eq!(
        renew_delay(soon, Duration::from_hours(1)),
        Duration::from_secs(1)
    );
}

#[test]
fn the_node_identity_is_made_once_and_checked() {
    let dir = TempDir::new("node-id");
    let path = dir.path().join("sub").join("node-id");
    let id = node_identity(&path).unwrap();
    assert_eq!(id.len(), 32);
    assert_eq!(node_identity(&path).unwrap(), id);
    std::fs::write(&path, "not an id!").unwrap();
    let err = format!("{:#}", node_identity(&path).unwrap_err());
    assert!(
        err.contains(&path.display().to_string()) && err.contains("not an id!"),
        "{err}"
    );
}

#[test]
fn facts_carry_gateway_and_mtu() {
    let cfg = NetworkConfig::parse(CFG).unwrap();
    let f = facts(
        &cfg,
        &LeaseSubnets {
            v4: Some("10.244.5.0/24".parse().unwrap()),
            v6: None,
        },
        1450,
        true,
    );
    assert_eq!(
        f.render(),
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
    );
}
