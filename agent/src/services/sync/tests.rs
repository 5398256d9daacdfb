//! Tests of the service loop, on the in-memory store and the recording dataplane.
//!
//! They run on a paused clock: [`settle`] lets every task run until all of them wait, and
//! [`advance`] moves the clock to fire the loop's timers (the resync, the retry after a failed
//! apply) and the source's (its backoff before a re-list). The loop calls the dataplane on the
//! blocking pool, and tokio does not move a paused clock on its own while a blocking task runs,
//! so a settled loop has finished its sync: what a test asserts after [`settle`] is exact,
//! "nothing applied" included.

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
use crate::services::testutil::{WEB, backends_of, node, objs};

/// A resync period no test reaches.
const NEVER: Duration = Duration::from_hours(1);
/// The resync period of the tests that heal by it.
const RESYNC: Duration = Duration::from_millis(200);
/// The first wait of the source's backoff before a re-list, and of the loop's before it
/// retries a failed apply.
const BACKOFF: Duration = Duration::from_millis(100);

#[tokio::test(start_paused = true)]
async fn loop_programs_changes_incrementally() {
    let (store, dp, task, metrics) = synced(NEVER).await;
    assert_eq!(backends_of(&dp, 30080), vec!["10.244.1.5", "10.244.2.5"]);
    assert!(backends_of(&dp, 80).is_empty() || backends_of(&dp, 80).len() == 2);
    dp.take_plans();
    // One endpoint removed: one plan touching web's two frontends only, with the stale one.
    let changed = WEB.replace(", {addresses: [10.244.2.5]}", "");
    put_settled(&store, &objs(&changed)[2..]).await;
    assert_eq!(backends_of(&dp, 30080), vec!["10.244.1.5"]);
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
    settle().await;
    assert_eq!(dp.services().len(), 1);
    // The loop records a sync in its metrics just after the dataplane holds it.
    assert!(metric(&metrics, "twill_services_frontends 1"));
    assert_eq!(dp.services()[0].id, api_id);
    assert!(
        metrics
            .render()
            .contains("twill_services_dataplane_info{mode=\"fake\",reason=\"\"} 1")
    );
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn nothing_is_touched_before_the_first_list_and_restart_replans_nothing() {
    // A first agent programs the dataplane.
    let (store, dp, task, _) = synced(NEVER).await;
    task.abort();
    let before = dp.services();
    // The agent restarts while etcd is down: the dataplane keeps everything.
    let programmed = FakeLbDataplane::with_services(before.clone());
    store.set_down(true);
    let lists = store.lists();
    let (task, m) = start(&store, &programmed, NEVER);
    // Its source keeps failing to list: once it has asked twice (a refusal and a retry after
    // backoff), the loop has been running with nothing listed, and must have touched nothing.
    settle().await;
    assert_eq!(store.lists(), lists + 1);
    advance(BACKOFF).await;
    assert_eq!(store.lists(), lists + 2);
    assert_eq!(programmed.services(), before);
    assert_eq!(programmed.state().apply_calls, 0);
    // etcd is back: once the source lists (after its doubled backoff), the same ids are
    // derived and there is nothing to change.
    store.set_down(false);
    advance(2 * BACKOFF).await;
    assert!(m.ok_syncs() > 0, "no sync after etcd is back");
    assert_eq!(programmed.services(), before);
    assert_eq!(
        programmed.state().apply_calls,
        0,
        "{:?}",
        programmed.state().plans
    );
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn broken_watch_relists_and_failed_apply_heals() {
    let (store, dp, task, m) = synced(NEVER).await;
    // Watch broken while etcd is down and an object is deleted meanwhile: re-list catches it.
    store.set_down(true);
    {
        let mut g = store.lock();
        let k = objs(WEB)[1].key();
        g.objects.remove(&k);
    }
    store.set_down(false);
    settle().await;
    assert_eq!(
        dp.services().len(),
        3,
        "the deletion seen before the re-list"
    );
    advance(BACKOFF).await;
    assert_eq!(dp.services().len(), 2, "the deletion missed by the re-list");
    // The next apply fails: the loop re-reads the dataplane and retries the full plan.
    dp.tamper(|s| s.fail_next_apply = Some("map full".into()));
    store.delete_all(&[objs(WEB)[2].key()]).await.unwrap();
    settle().await;
    assert_eq!(
        m.last_error().as_deref(),
        Some("dataplane unavailable: map full")
    );
    advance(BACKOFF).await;
    assert!(dp.services().iter().all(|s| s.backends.is_empty()));
    assert!(dp.state().apply_calls >= 3);
    assert_eq!(m.last_error(), None);
    assert!(m.render().contains("result=\"error\"} 1"), "{}", m.render());
    task.abort();
}

#[tokio::test(start_paused = true)]
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
    let (dp, task, m) = synced_on(&store, RESYNC).await;
    assert!(m.render().contains("twill_services_invalid_objects 1"));
    let victim = dp.services()[0].frontend.key();
    dp.tamper(|s| {
        s.services.remove(&victim);
    });
    // Healed by the resync, not before.
    advance(RESYNC * 9 / 10).await;
    assert_eq!(dp.services().len(), 2);
    advance(RESYNC / 10).await;
    assert_eq!(dp.services().len(), 3);
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn kube_proxy_metrics_and_health_times() {
    let trigger = SystemTime::now() - Duration::from_millis(1500);
    let objects = objs(WEB);
    let slice = objects[2].clone();
    let listing = Listing {
        objects,
        ..Listing::default()
    };
    let (dp, task, m) = start_with(vec![
        SourceUpdate::Reset(listing),
        SourceUpdate::Changes(vec![Change::Put(slice)]),
        SourceUpdate::Triggers(vec![trigger]),
    ]);
    // The loop has not run yet.
    assert_eq!(m.proxy_health_times(), (None, None));
    settle().await;
    assert_eq!(dp.services().len(), 3);
    let r = m.render();
    // 1.5 s from trigger to programmed: above 1 s, within 2 s.
    for line in [
        "kubeproxy_network_programming_duration_seconds_count 1",
        "kubeproxy_network_programming_duration_seconds_bucket{le=\"1\"} 0",
        "kubeproxy_network_programming_duration_seconds_bucket{le=\"2\"} 1",
        "kubeproxy_sync_proxy_rules_service_changes_total 2",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total 2",
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending 0",
    ] {
        assert!(metric(&m, line), "{line} missing from {r}");
    }
    for line in [
        "kubeproxy_sync_proxy_rules_duration_seconds_count 0",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds 0",
    ] {
        assert!(!metric(&m, line), "{line} in {r}");
    }
    let (pending, last) = m.proxy_health_times();
    assert_eq!(pending, None, "everything received was synced");
    assert!(last.is_some());
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_listing_in_pages_counts_only_once_its_reset_completes_it() {
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
    // A list that broke after its first page (revision 5: `api` only), then a whole one at
    // revision 6 in two parts, one invalid object in its last part.
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
    let (dp, task, m) = start_with(vec![
        page(vec![api], 5),
        page(vec![web], 6),
        SourceUpdate::Reset(last),
    ]);
    settle().await;
    assert!(m.ok_syncs() > 0, "the listing not programmed");
    // Pages alone program nothing; the first sync has the whole revision-6 listing and
    // nothing of the abandoned one.
    assert_eq!(dp.state().apply_calls, 1);
    let names: BTreeSet<String> = dp.services().iter().map(|s| s.name.clone()).collect();
    assert_eq!(names, BTreeSet::from(["default/web".to_string()]));
    assert_eq!(backends_of(&dp, 30080), vec!["10.244.1.5", "10.244.2.5"]);
    assert!(m.render().contains("twill_services_invalid_objects 1\n"));
    task.abort();
}

/// Lets every task run until each waits for a message or a timer, moving the paused clock by
/// 1 ms (a dataplane call on the blocking pool holds the clock until it returns).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

/// Settles (so that the timers the tasks set in reaction to what the test did are set from
/// now), moves the paused clock by `by`, firing the timers due, and settles again.
async fn advance(by: Duration) {
    settle().await;
    tokio::time::advance(by).await;
    settle().await;
}

type LoopTask = tokio::task::JoinHandle<anyhow::Result<()>>;

fn start(
    store: &MemServiceStore,
    dp: &FakeLbDataplane,
    resync: Duration,
) -> (LoopTask, Arc<ServiceMetrics>) {
    start_on(store, dp, resync.into(), node())
}

fn start_on(
    store: &MemServiceStore,
    dp: &FakeLbDataplane,
    settings: LoopSettings,
    node: crate::services::desired::NodeIdentity,
) -> (LoopTask, Arc<ServiceMetrics>) {
    let m = Arc::new(ServiceMetrics::default());
    let task = tokio::spawn(run_services(
        store.clone(),
        node,
        dp.clone(),
        settings,
        m.clone(),
    ));
    (task, m)
}

/// The loop started on `store` (holding [`WEB`]) and a new recording dataplane, settled: its
/// first sync has programmed the three frontends.
async fn synced_on(
    store: &MemServiceStore,
    resync: Duration,
) -> (FakeLbDataplane, LoopTask, Arc<ServiceMetrics>) {
    let dp = FakeLbDataplane::new();
    let (task, m) = start(store, &dp, resync);
    settle().await;
    assert_eq!(dp.services().len(), 3, "the first sync");
    (dp, task, m)
}

/// [`synced_on`] a new [`web_store`], returned first.
async fn synced(
    resync: Duration,
) -> (
    MemServiceStore,
    FakeLbDataplane,
    LoopTask,
    Arc<ServiceMetrics>,
) {
    let store = web_store().await;
    let (dp, task, m) = synced_on(&store, resync).await;
    (store, dp, task, m)
}

/// The loop started on a new recording dataplane, fed by a source that sends `updates`, then
/// nothing more.
fn start_with(updates: Vec<SourceUpdate>) -> (FakeLbDataplane, LoopTask, Arc<ServiceMetrics>) {
    let dp = FakeLbDataplane::new();
    let m = Arc::new(ServiceMetrics::default());
    let task = tokio::spawn(run_services_with(
        move |tx| async move {
            for up in updates {
                let _ = tx.send(up).await;
            }
            std::future::pending::<()>().await;
        },
        node(),
        dp.clone(),
        NEVER,
        m.clone(),
    ));
    (dp, task, m)
}

/// Writes `objects` to `store` and lets the loop act on them.
async fn put_settled(store: &MemServiceStore, objects: &[Object]) {
    store.put_all(objects).await.unwrap();
    settle().await;
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

/// Successful full syncs (the first one, resyncs, retries).
fn full_syncs(m: &ServiceMetrics) -> u64 {
    let prefix = "twill_services_syncs_total{kind=\"full\",result=\"ok\"} ";
    m.render()
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map_or(0, |n| n.parse().unwrap())
}

/// A wiped store (everything under the prefix deleted at once, the config key too) does
/// not flush the dataplane; once the config key is written again the empty store is a
/// deletion of everything and acted on. With the config key present, deleting every
/// object works at once.
#[tokio::test(start_paused = true)]
async fn a_wiped_store_keeps_the_dataplane_until_its_config_is_written_again() {
    let (store, dp, task, m) = synced(RESYNC).await;
    let before = dp.services();
    store.wipe();
    advance(BACKOFF).await;
    assert!(metric(&m, "twill_services_store_suspect 1"), "not held");
    // Re-lists and resyncs (every 200 ms) change nothing.
    store.break_watches();
    let syncs = full_syncs(&m);
    advance(RESYNC).await;
    advance(RESYNC).await;
    assert_eq!(full_syncs(&m), syncs + 2, "two resyncs");
    assert_eq!(dp.services(), before);
    assert!(
        metric(&m, "twill_services_suspect_listings_total 1"),
        "{}",
        m.render()
    );
    // Objects written without a config key: still held, through a resync.
    store.put_all(&objs(WEB)[1..2]).await.unwrap();
    let syncs = full_syncs(&m);
    advance(RESYNC).await;
    assert_eq!(full_syncs(&m), syncs + 1, "a resync");
    assert_eq!(dp.services(), before);
    // The config key written again: acted on (only `api` is left in the store).
    store.set_config(true);
    advance(BACKOFF).await;
    assert_eq!(dp.services().len(), 1, "the deletion not acted on");
    assert!(metric(&m, "twill_services_store_suspect 0"));
    // With the config key present, deleting everything is an ordinary deletion.
    put_settled(&store, &objs(WEB)).await;
    assert_eq!(dp.services().len(), 3, "not re-applied");
    let keys: Vec<ObjectKey> = objs(WEB).iter().map(Object::key).collect();
    store.delete_all(&keys).await.unwrap();
    // (An empty store is judged by a listing: the source re-lists after its backoff.)
    advance(BACKOFF).await;
    assert!(dp.services().is_empty(), "not everything deleted");
    assert!(metric(&m, "twill_services_suspect_listings_total 1"));
    task.abort();
}

/// An agent restarted against a new, empty etcd (another cluster, no config key) keeps
/// what its predecessor programmed; objects applied to the new store are held until its
/// config key exists, then the new store is what counts.
#[tokio::test(start_paused = true)]
async fn a_new_store_keeps_the_dataplane_of_a_restarted_agent() {
    let (_old, dp, task, _) = synced(NEVER).await;
    task.abort();
    let programmed = FakeLbDataplane::with_services(dp.services());
    let fresh = MemServiceStore::new();
    fresh.replace_cluster(false);
    let (task, m) = start(&fresh, &programmed, NEVER);
    // Held from its first listing: nothing is applied (nothing can be, until a listing is
    // acted on).
    settle().await;
    assert!(metric(&m, "twill_services_store_suspect 1"), "not held");
    assert_eq!(programmed.state().apply_calls, 0);
    assert_eq!(programmed.services().len(), 3);
    // The operator writes the config key: the new (empty) store is what counts.
    fresh.set_config(true);
    advance(BACKOFF).await;
    assert!(
        programmed.services().is_empty(),
        "the new store not acted on"
    );
    put_settled(&fresh, &objs(WEB)[1..2]).await;
    assert_eq!(programmed.services().len(), 1, "its objects not programmed");
    assert_eq!(programmed.services()[0].name, "default/api");
    task.abort();
    // A new cluster with its config key already written: objects watched into it confirm it.
    let other = MemServiceStore::new();
    let dp = FakeLbDataplane::new();
    let (task, m) = start(&other, &dp, NEVER);
    put_settled(&other, &objs(WEB)).await;
    assert_eq!(dp.services().len(), 3, "the first sync");
    other.replace_cluster(true);
    advance(BACKOFF).await;
    assert!(metric(&m, "twill_services_store_suspect 1"), "not held");
    assert_eq!(dp.services().len(), 3);
    put_settled(&other, &objs(WEB)[1..2]).await;
    assert_eq!(dp.services().len(), 1, "not confirmed by its objects");
    assert!(metric(&m, "twill_services_store_suspect 0"));
    task.abort();
}

/// Invalid values arriving by the watch are treated as absent, logged once and counted
/// like the ones a listing finds; a valid value clears them.
#[tokio::test(start_paused = true)]
async fn invalid_objects_from_the_watch_are_counted() {
    let (store, dp, task, m) = synced(NEVER).await;
    let api = objs(WEB)[1].key();
    store.put_invalid(
        api.clone(),
        FieldError {
            field: "spec.clusterIP".into(),
            message: "127.0.0.1 may not be in the loopback range".into(),
        },
    );
    settle().await;
    assert_eq!(dp.services().len(), 2, "the invalid object programmed");
    assert!(metric(&m, "twill_services_invalid_objects 1"));
    put_settled(&store, &objs(WEB)[1..2]).await;
    assert_eq!(dp.services().len(), 3, "the valid object not programmed");
    assert!(metric(&m, "twill_services_invalid_objects 0"));
    task.abort();
}

/// Frontends on the node's own addresses are refused, reported and counted, and follow
/// the addresses as they change (read again at every full resync).
#[tokio::test(start_paused = true)]
async fn frontends_on_the_nodes_own_addresses_are_refused() {
    let y = "apiVersion: v1\nkind: Service\nmetadata: {name: grab}\nspec:\n  clusterIP: 10.96.0.20\n  externalIPs: [198.18.0.11]\n  ports: [{port: 22}]\n";
    let store = MemServiceStore::new();
    store.put_all(&objs(y)).await.unwrap();
    let own = Arc::new(Mutex::new(vec!["198.18.0.11".parse::<IpAddr>().unwrap()]));
    let read = own.clone();
    let settings = LoopSettings {
        resync: RESYNC,
        own_addresses: Some(Arc::new(move || read.lock().unwrap().clone())),
    };
    let dp = FakeLbDataplane::new();
    let mut node = node();
    node.allowed_external_ips = None;
    let (task, m) = start_on(&store, &dp, settings, node);
    settle().await;
    let ips = || {
        dp.services()
            .iter()
            .map(|s| s.frontend.ip.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(ips(), vec!["10.96.0.20"]);
    let refused = |n| format!("twill_services_refused_frontends{{reason=\"node address\"}} {n}");
    assert!(metric(&m, &refused(1)), "the refusal not counted");
    *own.lock().unwrap() = vec!["198.18.0.12".parse().unwrap()];
    advance(RESYNC).await;
    assert_eq!(ips().len(), 2, "the address still taken for the node's");
    assert!(metric(&m, &refused(0)));
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_failing_dataplane_leaves_updates_pending() {
    let store = web_store().await;
    let dp = FakeLbDataplane::new();
    dp.tamper(|s| s.fail_next_apply = Some("map full".into()));
    let (task, m) = start(&store, &dp, NEVER);
    settle().await;
    assert_eq!(dp.state().apply_calls, 1, "the failed sync");
    // Between the failure and the retry (after its backoff) the update is pending; the
    // health server turns 503 if that lasts (see kube::healthz).
    assert!(dp.services().is_empty());
    assert!(m.proxy_health_times().0.is_some());
    advance(BACKOFF).await;
    assert_eq!(dp.services().len(), 3, "no retry");
    assert!(m.proxy_health_times().0.is_none());
    task.abort();
}
