//! kube-proxy's health server (`--healthz-bind-address`, default `0.0.0.0:10256`): `/healthz`
//! and `/livez`, with kube-proxy's semantics, so load balancers, node problem detectors and
//! DaemonSet probes written for kube-proxy work with twill unchanged.
//!
//! Semantics (kube-proxy `pkg/proxy/healthcheck/proxy_health.go`):
//! - the proxy is healthy while no update it received is waiting to be programmed, or while the
//!   oldest such update is younger than the timeout (kube-proxy: twice its sync period; twill:
//!   twice `--resync-interval`). A service dataplane that keeps failing to apply, or a loop that
//!   is stuck, therefore turns both endpoints 503 after the timeout;
//! - `/healthz` is also 503 while the node is not eligible: its Node is being deleted or carries
//!   the cluster autoscaler's `ToBeDeletedByClusterAutoscaler` taint (so cloud load balancers
//!   drain it first); `/livez` ignores the node;
//! - the body is kube-proxy's JSON, times formatted as Go prints a `time.Time` in UTC (without
//!   the monotonic-clock suffix `m=+…` Go appends to the current time):
//!   `{"lastUpdated": "…","currentTime": "…", "nodeEligible": true}` (`/livez` without
//!   `nodeEligible`); when healthy, `lastUpdated` is the current time, as kube-proxy reports it
//!   for compatibility with older releases.
//!
//! The pending/updated times are kept by the service loop ([`ServiceMetrics`]); this module only
//! decides and serves, and counts answers as kube-proxy does (`kubeproxy_proxy_healthz_total`,
//! `kubeproxy_proxy_livez_total` by code).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Node;

use crate::shared::http::Response;
use k8s_openapi::jiff::Timestamp;

use crate::services::metrics::ServiceMetrics;

/// The cluster autoscaler's taint on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Whether a Node may receive traffic: not being deleted and not tainted for deletion.
pub fn node_eligible(node: &Node) -> bool {
    node.metadata.deletion_timestamp.is_none()
        && !node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT))
}

/// kube-proxy's health decision: healthy unless an update has waited `timeout` or longer.
pub fn healthy(oldest_pending: Option<SystemTime>, now: SystemTime, timeout: Duration) -> bool {
    oldest_pending.is_none_or(|t| now.duration_since(t).unwrap_or_default() < timeout)
}

/// A time as Go's `time.Time.String()` prints it in UTC (`2006-01-02 15:04:05.999999999 +0000
/// UTC`); `None` is Go's zero time.
pub fn go_time(t: Option<SystemTime>) -> String {
    let Some(ts) = t.and_then(|t| Timestamp::try_from(t).ok()) else {
        return "0001-01-01 00:00:00 +0000 UTC".to_string();
    };
    ts.strftime("%Y-%m-%d %H:%M:%S%.f +0000 UTC").to_string()
}

/// The health server's state.
pub struct ProxyHealth {
    metrics: Arc<ServiceMetrics>,
    timeout: Duration,
    node_eligible: AtomicBool,
    /// Answers by endpoint (healthz, livez) and code (200, 503).
    answers: [[AtomicU64; 2]; 2],
}

impl ProxyHealth {
    /// Health of the service loop exporting `metrics`, unhealthy after `timeout`.
    pub fn new(metrics: Arc<ServiceMetrics>, timeout: Duration) -> Self {
        ProxyHealth {
            metrics,
            timeout,
            // Eligible while starting, until a Node event says otherwise (as kube-proxy).
            node_eligible: AtomicBool::new(true),
            answers: Default::default(),
        }
    }

    /// Records the node's eligibility (from its Node object).
    pub fn set_node_eligible(&self, eligible: bool) {
        self.node_eligible.store(eligible, Ordering::Relaxed);
    }

    /// Whether the node is eligible.
    pub fn node_eligible(&self) -> bool {
        self.node_eligible.load(Ordering::Relaxed)
    }

    /// The answer to `path` (`/healthz` or `/livez`) at `now`: code and JSON body.
    pub fn answer(&self, path: &str, now: SystemTime) -> Option<(u16, String)> {
        let livez = match path {
            "/healthz" => false,
            "/livez" => true,
            _ => return None,
        };
        let (oldest, last) = self.metrics.proxy_health_times();
        let eligible = self.node_eligible();
        let ok = healthy(oldest, now, self.timeout) && (livez || eligible);
        let last = if ok { Some(now) } else { last };
        let mut body = format!(
            "{{\"lastUpdated\": \"{}\",\"currentTime\": \"{}\"",
            go_time(last),
            go_time(Some(now))
        );
        if !livez {
            let _ = write!(body, ", \"nodeEligible\": {eligible}");
        }
        body.push('}');
        self.answers[usize::from(livez)][usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
        Some((if ok { 200 } else { 503 }, body))
    }

    /// kube-proxy's counters of health answers, Prometheus text.
    pub fn render(&self) -> String {
        let mut o = String::new();
        for (i, name) in ["healthz", "livez"].iter().enumerate() {
            let metric = format!("kubeproxy_proxy_{name}_total");
            let _ = writeln!(
                o,
                "# HELP {metric} Cumulative proxy {name} HTTP status\n# TYPE {metric} counter"
            );
            for (j, code) in ["200", "503"].iter().enumerate() {
                let n = self.answers[i][j].load(Ordering::Relaxed);
                let _ = writeln!(o, "{metric}{{code=\"{code}\"}} {n}");
            }
        }
        o
    }
}

/// Serves `/healthz` and `/livez` on `addr` until the task is aborted.
pub async fn serve(addr: SocketAddr, health: Arc<ProxyHealth>) -> std::io::Result<()> {
    crate::shared::http::serve(addr, "kube-proxy's /healthz and /livez", move |path| {
        let health = health.clone();
        async move {
            match health.answer(&path, SystemTime::now()) {
                Some((code, body)) => Response::new(code, "application/json", body),
                None => Response::not_found(),
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        // 2025-05-02 09:14:07 UTC.
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_746_177_247 + secs)
    }

    #[test]
    fn go_time_format() {
        assert_eq!(go_time(Some(at(0))), "2025-05-02 09:14:07 +0000 UTC");
        assert_eq!(
            go_time(Some(at(0) + Duration::from_millis(120))),
            "2025-05-02 09:14:07.12 +0000 UTC"
        );
        assert_eq!(go_time(None), "0001-01-01 00:00:00 +0000 UTC");
    }

    #[test]
    fn healthy_until_an_update_waits_too_long() {
        let t = Duration::from_mins(1);
        assert!(healthy(None, at(1000), t), "nothing pending");
        assert!(healthy(Some(at(0)), at(59), t), "pending, not late yet");
        assert!(!healthy(Some(at(0)), at(60), t), "pending for the timeout");
        assert!(healthy(Some(at(10)), at(0), t), "clock went back: not late");
    }

    #[test]
    fn answers_follow_kube_proxy() {
        let m = Arc::new(ServiceMetrics::default());
        let h = ProxyHealth::new(m.clone(), Duration::from_mins(1));
        let now = SystemTime::now();
        // Starting: nothing queued, node eligible: 200, lastUpdated = now.
        let (code, body) = h.answer("/healthz", now).unwrap();
        assert_eq!(code, 200);
        let now_s = go_time(Some(now));
        assert_eq!(
            body,
            format!(
                "{{\"lastUpdated\": \"{now_s}\",\"currentTime\": \"{now_s}\", \"nodeEligible\": true}}"
            )
        );
        assert_eq!(
            h.answer("/livez", now).unwrap().1,
            format!("{{\"lastUpdated\": \"{now_s}\",\"currentTime\": \"{now_s}\"}}")
        );
        assert_eq!(h.answer("/metrics", now), None);
        // An update waits longer than the timeout: both 503, lastUpdated is the real one.
        m.queued(1, 0);
        let late = now + Duration::from_secs(61);
        let (code, body) = h.answer("/healthz", late).unwrap();
        assert_eq!(code, 503);
        assert!(
            body.starts_with("{\"lastUpdated\": \"0001-01-01 00:00:00 +0000 UTC\""),
            "{body}"
        );
        assert_eq!(h.answer("/livez", late).unwrap().0, 503);
        // Not late yet: healthy.
        assert_eq!(
            h.answer("/healthz", now + Duration::from_secs(30))
                .unwrap()
                .0,
            200
        );
        // The node is being deleted: healthz 503, livez still 200.
        h.set_node_eligible(false);
        let (code, body) = h.answer("/healthz", now).unwrap();
        assert_eq!(code, 503);
        assert!(body.ends_with(", \"nodeEligible\": false}"), "{body}");
        assert_eq!(h.answer("/livez", now).unwrap().0, 200);
        let r = h.render();
        for line in [
            "kubeproxy_proxy_healthz_total{code=\"200\"} 2",
            "kubeproxy_proxy_healthz_total{code=\"503\"} 2",
            "kubeproxy_proxy_livez_total{code=\"503\"} 1",
        ] {
            assert!(r.lines().any(|l| l == line), "{line} missing from {r}");
        }
    }

    #[test]
    fn eligibility_from_the_node() {
        let mut n: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1"},
            "spec": {"taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}
        }))
        .unwrap();
        assert!(node_eligible(&n));
        n.spec.as_mut().unwrap().taints.as_mut().unwrap().push(
            serde_json::from_value(
                serde_json::json!({"key": TO_BE_DELETED_TAINT, "value": "1746177247", "effect": "NoSchedule"}),
            )
            .unwrap(),
        );
        assert!(!node_eligible(&n));
        let n: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "deletionTimestamp": "2025-05-02T09:14:07Z"}
        }))
        .unwrap();
        assert!(!node_eligible(&n));
    }
}
