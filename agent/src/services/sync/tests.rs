//! Tests of the service loop, on the in-memory store and the recording dataplane.

use std::sync::Mutex;
use std::time::SystemTime;

use crate::services::lb::FakeLbDataplane;
use crate::services::metrics::ServiceMetrics;
use crate::services::source::ServiceStore;
use crate::services::source::mem::MemServiceStore;
use crate::services::source::{Listing, SourceUpdate};
use crate::services::sync::Arc;
use crate::services::sync::BTreeSet;
use crate::services::sync::Change;
use crate::services::sync::Duration;
use crate::services::sync::FieldError;
use crate::services::sync::IpAddr;
use crate::services::sync::Kind;
use crate::services::sync::LoopSettings;
use crate::services::sync::Object;
use crate::services::sync::ObjectKey;
use crate::services::sync::run_services;
use crate::services::sync::run_services_with;
use crate::services::testutil::{WEB, backends_of, eventually, node, objs};

#[tokio::test]
async fn loop_programs_changes_incrementally() {
    let store = web_store().await;
    let dp = FakeLbDataplane::new();
    let (task, metrics) = start(&store, &dp, Duration::from_hours(1));
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
    let store = web_store().await;
    let dp = FakeLbDataplane::new();
    let (task, _) = start(&store, &dp, Duration::from_hours(1));
    eventually("first sync", || dp.services().len() == 3).await;
    task.abort();
    let before = dp.services();
    // The agent restarts while etcd is down: the dataplane keeps everything.
    let programmed = FakeLbDataplane::with_services(before.clone());
    store.set_down(true);
    let (task, m) = start(&store, &programmed, Duration::from_hours(1));
    // Its source keeps failing to list: once it has asked twice (a refusal and a retry after
    // backoff), the loop has been running with nothing listed, and must have touched nothing.
    eventually("a refused listing and its retry", || store.lists() >= 2).await;
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
    let store = web_store().await;
    let dp = FakeLbDataplane::new();
    let (task, m) = start(&store, &dp, Duration::from_hours(1));
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
    let store = web_store().await;
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
    let (task, m) = start(&store, &dp, Duration::from_millis(200));
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

/// A store holding [`WEB`].
async fn web_store() -> MemServiceStore {
    let store = MemServiceStore::new();
    store.put_all(&objs(WEB)).await.unwrap();
    store
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
    let store = web_store().await;
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
    let store = web_store().await;
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
    let store = web_store().await;
    let dp = FakeLbDataplane::new();
    dp.tamper(|s| s.fail_next_apply = Some("map full".into()));
    let (task, m) = start(&store, &dp, Duration::from_hours(1));
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
