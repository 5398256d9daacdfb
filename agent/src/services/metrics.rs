//! The service loop's metrics: twill's own (`twill_services_*`) and kube-proxy's, under
//! kube-proxy's names and buckets where the meaning is the same, rendered as Prometheus text
//! (appended to `/metrics` by the agent) and read by the kube-proxy health server.
//!
//! Why this shape: the loop records into one [`ServiceMetrics`] behind a mutex (one lock per
//! sync, never held across an await); the histograms are the agent's one [`Histogram`] type (why
//! not a metrics library: `shared::metrics`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::services::desired::{RefuseReason, Reserved};
use crate::shared::metrics::Histogram;

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

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The kube-proxy-compatible part of the service loop's state: what kube-proxy exports under
/// the same names, and what its `/healthz` and `/livez` are computed from.
#[derive(Default)]
pub(super) struct KubeProxyState {
    sync: Histogram,
    full: Histogram,
    partial: Histogram,
    network_programming: Histogram,
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
pub(super) struct MetricsInner {
    pub(super) kube_proxy: KubeProxyState,
    pub(super) mode: &'static str,
    pub(super) reason: String,
    pub(super) syncs: BTreeMap<(&'static str, &'static str), u64>,
    pub(super) duration: Histogram,
    pub(super) frontends: usize,
    pub(super) backends: usize,
    pub(super) conflicts: usize,
    pub(super) invalid_objects: usize,
    /// Frontends refused, by reason label.
    pub(super) refused: BTreeMap<&'static str, usize>,
    /// Listings held back right now (the store looks new or wiped).
    pub(super) store_suspect: bool,
    /// Times the store became suspect.
    pub(super) suspect_listings: u64,
    pub(super) last_ops: usize,
    pub(super) last_error: Option<String>,
}

/// The service loop's state as exported (Prometheus text, appended to `/metrics` by the agent).
#[derive(Default)]
pub struct ServiceMetrics {
    inner: Mutex<MetricsInner>,
}

impl ServiceMetrics {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, MetricsInner> {
        self.inner.lock().expect("service metrics lock")
    }

    pub(super) fn observe(&self, kind: &'static str, ok: bool, took: Duration, ops: usize) {
        let mut g = self.lock();
        *g.syncs
            .entry((kind, if ok { "ok" } else { "error" }))
            .or_default() += 1;
        let s = took.as_secs_f64();
        g.duration.observe(&BUCKETS, s);
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
        g.duration.render(
            &mut o,
            "twill_services_sync_duration_seconds",
            "Time to plan and apply one sync.",
            &BUCKETS,
        );
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
    pub(super) fn add_triggers(&self, t: Vec<SystemTime>) {
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
