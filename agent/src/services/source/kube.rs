//! The service proxy's Kubernetes source: Services and EndpointSlices from the API server, as
//! [`SourceUpdate`]s for the same loop and model as the etcd source, plus this node's Node for
//! kube-proxy's health semantics.
//!
//! Why this shape:
//! - kube-rs' `watcher` does the informer's work (list in pages, watch from the list's
//!   `resourceVersion` with bookmarks, re-watch when the server closes a watch, re-list on
//!   `410 Gone`, backoff on errors). Each kind's re-list arrives as `Init`, `InitApply`…,
//!   `InitDone`; [`Mirror`] keeps both kinds and sends a [`SourceUpdate::Reset`] with **both**
//!   after any re-list, once each kind has been listed once, and
//!   [`SourceUpdate::Changes`] for events in between. So a broken watch never drops state: the
//!   loop keeps what it has until the re-list is complete, then diffs it, and a change made
//!   while the watch was away lands with the re-list.
//! - What kube-proxy skips is skipped here (`cmd/kube-proxy/app/server.go`): with no
//!   `--service-proxy-name`, objects labelled `service.kubernetes.io/service-proxy-name` are
//!   filtered by the API server with kube-proxy's own label selector; with one, Services
//!   labelled for another proxy are dropped here (the selector cannot say "absent or ours").
//!   EndpointSlices of headless Services (`service.kubernetes.io/headless`) are not watched;
//!   headless and ExternalName Services themselves program no frontend (the model).
//! - Objects go through the model's parser and validation ([`crate::services::model`]), so a
//!   Service means the same from either source; one twill cannot program faithfully (SCTP,
//!   `loadBalancerSourceRanges`) is treated as absent, logged and counted.
//! - EndpointSlices' `endpoints.kubernetes.io/last-change-trigger-time` feeds
//!   `kubeproxy_network_programming_duration_seconds`, counting only changes made after the
//!   source started (as kube-proxy, so a restart does not report the age of the cluster).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::{WatchStreamExt as _, watcher};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::services::desired::NodeIdentity;
use crate::services::healthz::{ProxyHealth, node_eligible};
use crate::services::lb::LbDataplane;
use crate::services::metrics::ServiceMetrics;
use crate::services::model::{
    self, Change, FieldError, Kind, Object, ObjectKey, endpoint_slice_from_json, service_from_json,
};
use crate::services::source::{Listing, SourceUpdate};
use crate::services::sync::{LoopSettings, run_services_with};
use crate::shared::kube::KubeApi;
use crate::shared::metrics::Metrics;

/// The label naming the proxy that should program a Service (kube-proxy skips labelled ones).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The label the EndpointSlice controller puts on slices of headless Services.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// When the change an EndpointSlice reflects was triggered (RFC 3339).
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The label selector of both watches: kube-proxy's, unless this proxy has a name.
pub fn label_selector(proxy_name: &str) -> String {
    if proxy_name.is_empty() {
        format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}")
    } else {
        format!("!{HEADLESS_LABEL}")
    }
}

/// Whether a Service with `labels` is for this proxy: unlabelled, or labelled with our name.
pub fn for_this_proxy(labels: Option<&BTreeMap<String, String>>, proxy_name: &str) -> bool {
    match labels.and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL)) {
        None => true,
        Some(name) => !proxy_name.is_empty() && name == proxy_name,
    }
}

fn to_json<T: serde::Serialize>(o: &T) -> Result<Vec<u8>, FieldError> {
    serde_json::to_vec(o).map_err(|e| FieldError {
        field: String::new(),
        message: format!("does not serialise: {e}"),
    })
}

/// A Service from the API server, in the model (parsed and validated as the etcd source does).
pub fn service_from_k8s(svc: &Service) -> Result<model::Service, FieldError> {
    service_from_json(&to_json(svc)?)
}

/// An EndpointSlice from the API server, in the model.
pub fn endpoint_slice_from_k8s(slice: &EndpointSlice) -> Result<model::EndpointSlice, FieldError> {
    endpoint_slice_from_json(&to_json(slice)?)
}

/// What an API object is to the service loop.
#[derive(Debug, Clone, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "short-lived, moved into the mirror; boxing would cost an allocation per event"
)]
pub enum Converted {
    /// A valid object.
    Valid(Object),
    /// Labelled for another service proxy.
    NotOurs,
    /// Invalid for twill: treated as absent.
    Invalid(FieldError),
}

fn key(kind: Kind, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectKey {
    ObjectKey {
        kind,
        namespace: meta
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into()),
        name: meta.name.clone().unwrap_or_default(),
    }
}

/// A Service's key and what it is for this proxy.
pub fn convert_service(svc: &Service, proxy_name: &str) -> (ObjectKey, Converted) {
    let k = key(Kind::Service, &svc.metadata);
    if !for_this_proxy(svc.metadata.labels.as_ref(), proxy_name) {
        return (k, Converted::NotOurs);
    }
    let c = match service_from_k8s(svc) {
        Ok(s) => Converted::Valid(Object::Service(s)),
        Err(e) => Converted::Invalid(e),
    };
    (k, c)
}

/// An EndpointSlice's key, what it is, and its trigger time.
pub fn convert_slice(slice: &EndpointSlice) -> (ObjectKey, Converted, Option<SystemTime>) {
    let k = key(Kind::EndpointSlice, &slice.metadata);
    let c = match endpoint_slice_from_k8s(slice) {
        Ok(s) => Converted::Valid(Object::EndpointSlice(s)),
        Err(e) => Converted::Invalid(e),
    };
    let trigger = slice
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
        .and_then(|t| t.parse::<Timestamp>().ok())
        .map(SystemTime::from);
    (k, c, trigger)
}

/// A watcher event, converted.
#[derive(Debug, Clone, PartialEq)]
pub enum Ev {
    /// A (re-)list starts.
    Init,
    /// An object of the list.
    InitApply(ObjectKey, Converted),
    /// The list is complete.
    InitDone,
    /// An object was added or changed (with its trigger time, for EndpointSlices).
    Apply(ObjectKey, Converted, Option<SystemTime>),
    /// An object was deleted.
    Delete(ObjectKey),
}

#[derive(Default)]
struct KindState {
    live: BTreeMap<ObjectKey, Object>,
    invalid: BTreeMap<ObjectKey, FieldError>,
    listing: Option<(BTreeMap<ObjectKey, Object>, BTreeMap<ObjectKey, FieldError>)>,
    synced: bool,
}

/// Both kinds as last listed and watched; turns watcher events into [`SourceUpdate`]s.
pub struct Mirror {
    services: KindState,
    slices: KindState,
    started: SystemTime,
}

impl Mirror {
    /// An empty mirror; trigger times before `started` are not reported.
    pub fn new(started: SystemTime) -> Self {
        Mirror {
            services: KindState::default(),
            slices: KindState::default(),
            started,
        }
    }

    fn synced(&self) -> bool {
        self.services.synced && self.slices.synced
    }

    /// Everything, as one listing.
    pub fn listing(&self) -> Listing {
        let both = [&self.services, &self.slices];
        Listing {
            objects: both.iter().flat_map(|s| s.live.values().cloned()).collect(),
            invalid: both
                .iter()
                .flat_map(|s| s.invalid.iter().map(|(k, e)| (k.clone(), e.clone())))
                .collect(),
            revision: 0,
            facts: None,
        }
    }

    /// Applies one event of `kind`; what to send to the loop.
    pub fn handle(&mut self, kind: Kind, ev: Ev) -> Vec<SourceUpdate> {
        let started = self.started;
        let st = match kind {
            Kind::Service => &mut self.services,
            Kind::EndpointSlice => &mut self.slices,
        };
        let mut out = Vec::new();
        let mut change = None;
        let mut refused = None;
        let mut trigger_time = None;
        match ev {
            Ev::Init => st.listing = Some(Default::default()),
            Ev::InitApply(k, c) => {
                // Invalid ones are logged (once) by the service loop, from the listing.
                let (live, invalid) = st.listing.get_or_insert_with(Default::default);
                match c {
                    Converted::Valid(o) => {
                        live.insert(k, o);
                    }
                    Converted::Invalid(e) => {
                        invalid.insert(k, e);
                    }
                    Converted::NotOurs => {}
                }
            }
            Ev::InitDone => {
                let (live, invalid) = st.listing.take().unwrap_or_default();
                st.live = live;
                st.invalid = invalid;
                st.synced = true;
                if self.synced() {
                    out.push(SourceUpdate::Reset(self.listing()));
                }
                return out;
            }
            Ev::Apply(k, c, trigger) => {
                match c {
                    Converted::Valid(o) => {
                        st.invalid.remove(&k);
                        st.live.insert(k, o.clone());
                        change = Some(Change::Put(o));
                    }
                    Converted::Invalid(e) => {
                        st.invalid.insert(k.clone(), e.clone());
                        refused = Some((k.clone(), e));
                        change = st.live.remove(&k).map(|_| Change::Delete(k));
                    }
                    Converted::NotOurs => {
                        st.invalid.remove(&k);
                        change = st.live.remove(&k).map(|_| Change::Delete(k));
                    }
                }
                trigger_time = trigger.filter(|t| *t > started);
            }
            Ev::Delete(k) => {
                st.invalid.remove(&k);
                change = st.live.remove(&k).map(|_| Change::Delete(k));
            }
        }
        // Before both kinds are listed, the first Reset carries everything.
        if !self.synced() {
            return out;
        }
        if let Some(c) = change {
            out.push(SourceUpdate::Changes(vec![c]));
            if let Some(t) = trigger_time {
                out.push(SourceUpdate::Triggers(vec![t]));
            }
        }
        if let Some(r) = refused {
            out.push(SourceUpdate::Invalid(vec![r]));
        }
        out
    }
}

/// Converts a watcher event with `f` (key and conversion of one object).
fn convert_event<K>(
    ev: watcher::Event<K>,
    convert: impl Fn(&K) -> (ObjectKey, Converted, Option<SystemTime>),
) -> Ev {
    match ev {
        watcher::Event::Init => Ev::Init,
        watcher::Event::InitApply(obj) => {
            let (key, what, _) = convert(&obj);
            Ev::InitApply(key, what)
        }
        watcher::Event::InitDone => Ev::InitDone,
        watcher::Event::Apply(obj) => {
            let (key, what, trigger) = convert(&obj);
            Ev::Apply(key, what, trigger)
        }
        watcher::Event::Delete(obj) => Ev::Delete(convert(&obj).0),
    }
}

/// Runs the source until `out` closes: watches Services, EndpointSlices and the Node named
/// `node_name` (for `health`'s node eligibility) and sends updates into `out`.
pub async fn run_source(
    client: kube::Client,
    node_name: String,
    proxy_name: String,
    health: Option<Arc<ProxyHealth>>,
    out: mpsc::Sender<SourceUpdate>,
) {
    let selector = label_selector(&proxy_name);
    let cfg = watcher::Config::default().labels(&selector);
    let services = watcher(Api::<Service>::all(client.clone()), cfg.clone()).default_backoff();
    let slices = watcher(Api::<EndpointSlice>::all(client.clone()), cfg).default_backoff();
    let nodes = watcher(
        Api::<Node>::all(client),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
    )
    .default_backoff();
    let (mut services, mut slices, mut nodes) =
        (Box::pin(services), Box::pin(slices), Box::pin(nodes));
    let mut mirror = Mirror::new(SystemTime::now());
    tracing::info!(selector = %selector, node = %node_name, "watching Services and EndpointSlices");
    loop {
        let updates = tokio::select! {
            Some(ev) = services.next() => match ev {
                Ok(ev) => mirror.handle(Kind::Service, convert_event(ev, |s| {
                    let (k, c) = convert_service(s, &proxy_name);
                    (k, c, None)
                })),
                Err(e) => { tracing::warn!(error = %e, "watching Services; retrying"); continue; }
            },
            Some(ev) = slices.next() => match ev {
                Ok(ev) => mirror.handle(Kind::EndpointSlice, convert_event(ev, convert_slice)),
                Err(e) => { tracing::warn!(error = %e, "watching EndpointSlices; retrying"); continue; }
            },
            Some(ev) = nodes.next() => {
                match ev {
                    Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => {
                        if let Some(h) = &health {
                            h.set_node_eligible(node_eligible(&n));
                        }
                    }
                    Ok(watcher::Event::Delete(_)) => {
                        if let Some(h) = &health {
                            h.set_node_eligible(false);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, node = %node_name, "watching the node; retrying"),
                }
                continue;
            }
            else => return,
        };
        for u in updates {
            if out.send(u).await.is_err() {
                return;
            }
        }
    }
}

/// The address of `--healthz-bind-address`: `ip:port`, or an IP alone (port 10256), as
/// kube-proxy accepts it.
pub fn healthz_addr(text: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(a);
    }
    let ip: IpAddr = text
        .parse()
        .map_err(|_| anyhow::anyhow!("--healthz-bind-address {text:?} is not an address:port"))?;
    Ok(SocketAddr::new(ip, 10256))
}

/// The Kubernetes service source's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubeSource {
    /// The API server.
    pub api: KubeApi,
    /// This proxy's name (`--service-proxy-name`): Services labelled
    /// `service.kubernetes.io/service-proxy-name` with it are programmed, other labelled ones
    /// skipped.
    pub proxy_name: String,
    /// kube-proxy's health server (`--healthz-bind-address`; empty: off).
    pub healthz_bind_address: String,
}

/// Starts the service loop fed by the Kubernetes API, and kube-proxy's health server unless
/// `healthz_bind_address` is empty. The loop reports to `svc_metrics` (which the caller
/// exports); the health server's counters are added to the agent's `/metrics`.
pub async fn spawn<D: LbDataplane>(
    source: &KubeSource,
    node: NodeIdentity,
    dataplane: D,
    settings: LoopSettings,
    svc_metrics: Arc<ServiceMetrics>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<JoinHandle<()>> {
    let client = source
        .api
        .client()
        .await
        .context("connect the service source to the Kubernetes API")?;
    let resync = settings.resync;
    // kube-proxy's health timeout: twice its sync period.
    let health = Arc::new(ProxyHealth::new(svc_metrics.clone(), 2 * resync));
    let h = health.clone();
    metrics.add_renderer(Box::new(move || h.render()));
    let server = if source.healthz_bind_address.is_empty() {
        None
    } else {
        let addr = healthz_addr(&source.healthz_bind_address)?;
        let h = health.clone();
        Some(tokio::spawn(async move {
            if let Err(e) = crate::services::healthz::serve(addr, h).await {
                tracing::error!(error = %e, %addr, "kube-proxy health server failed");
            }
        }))
    };
    let (node_name, proxy_name) = (node.name.clone(), source.proxy_name.clone());
    Ok(tokio::spawn(async move {
        let res = run_services_with(
            move |tx| run_source(client, node_name, proxy_name, Some(health), tx),
            node,
            dataplane,
            settings,
            svc_metrics,
        )
        .await;
        if let Some(s) = server {
            s.abort();
        }
        if let Err(e) = res {
            tracing::error!(error = format!("{e:#}"), "service loop stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::services::desired::{NodeIdentity, Snapshot, desired};

    /// A Service as a 1.33 API server returns it (every field it sets, managedFields included).
    fn k8s_service() -> Service {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "web",
                "namespace": "shop",
                "uid": "5b7c27e2-8f1c-4b5f-9d2b-0b3a6c0f0a11",
                "resourceVersion": "81724",
                "creationTimestamp": "2025-05-02T09:14:07Z",
                "labels": {"app": "web"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "managedFields": [{
                    "manager": "kubectl-client-side-apply",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": "2025-05-02T09:14:07Z",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:spec": {"f:ports": {}}}
                }]
            },
            "spec": {
                "type": "LoadBalancer",
                "selector": {"app": "web"},
                "clusterIP": "10.96.0.10",
                "clusterIPs": ["10.96.0.10", "fd00:10:96::a"],
                "ipFamilies": ["IPv4", "IPv6"],
                "ipFamilyPolicy": "PreferDualStack",
                "ports": [
                    {"name": "http", "protocol": "TCP", "appProtocol": "http", "port": 80, "targetPort": 8080, "nodePort": 30080},
                    {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": "dns", "nodePort": 30053}
                ],
                "externalIPs": ["198.51.100.7"],
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
                "externalTrafficPolicy": "Local",
                "internalTrafficPolicy": "Cluster",
                "healthCheckNodePort": 31999,
                "allocateLoadBalancerNodePorts": true,
                "loadBalancerClass": "example.com/lb",
                "publishNotReadyAddresses": false,
                "trafficDistribution": "PreferClose"
            },
            "status": {
                "loadBalancer": {"ingress": [
                    {"ip": "203.0.113.9", "ipMode": "VIP", "ports": [{"port": 80, "protocol": "TCP"}]},
                    {"ip": "203.0.113.10", "ipMode": "Proxy"}
                ]},
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2025-05-02T09:14:07Z", "reason": "Ok", "message": ""}]
            }
        }))
        .unwrap()
    }

    /// An EndpointSlice as the EndpointSlice controller writes it.
    fn k8s_slice(trigger: &str) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "web-x7k2p",
                "generateName": "web-",
                "namespace": "shop",
                "uid": "d1e7f0a4-1c1e-4f0e-9f8c-5a0d3b6c7e21",
                "resourceVersion": "81730",
                "generation": 3,
                "creationTimestamp": "2025-05-02T09:14:07Z",
                "labels": {
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                    "kubernetes.io/service-name": "web",
                    "app": "web"
                },
                "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": trigger},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "5b7c27e2-8f1c-4b5f-9d2b-0b3a6c0f0a11", "controller": true, "blockOwnerDeletion": true}]
            },
            "addressType": "IPv4",
            "endpoints": [
                {
                    "addresses": ["10.244.1.5"],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": "n1",
                    "zone": "z1",
                    "hostname": "web-0",
                    "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-0", "uid": "aa0e9a0a-5b5b-4a4a-8c8c-000000000001"},
                    "hints": {"forZones": [{"name": "z1"}]}
                },
                {
                    "addresses": ["10.244.2.5"],
                    "conditions": {"ready": false, "serving": true, "terminating": true},
                    "nodeName": "n2"
                }
            ],
            "ports": [
                {"name": "http", "protocol": "TCP", "port": 8080, "appProtocol": "http"},
                {"name": "dns", "protocol": "UDP", "port": 5353}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn a_real_service_and_slice_convert_whole() {
        let s = service_from_k8s(&k8s_service()).unwrap();
        assert_eq!(s.key(), ("shop".to_string(), "web".to_string()));
        assert_eq!(s.cluster_ips().len(), 2);
        assert_eq!(
            s.external_ips(),
            vec!["198.51.100.7".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(
            s.lb_ingress_ips(),
            vec!["203.0.113.9".parse::<std::net::IpAddr>().unwrap()],
            "ipMode Proxy gets no frontend"
        );
        assert_eq!(s.affinity_timeout_secs(), Some(600));
        assert!(s.external_local());
        let e = endpoint_slice_from_k8s(&k8s_slice("2025-05-02T09:14:07Z")).unwrap();
        assert_eq!(e.endpoints.len(), 2);
        assert_eq!(e.endpoints[1].conditions.terminating, Some(true));
        assert_eq!(e.metadata.labels["kubernetes.io/service-name"], "web");
        // Into the desired state: the same frontends an etcd manifest would give.
        let snap = Snapshot::from_objects([Object::Service(s), Object::EndpointSlice(e)]);
        let node = NodeIdentity {
            name: "n1".into(),
            addresses: vec!["198.18.0.11".parse().unwrap()],
            ..NodeIdentity::default()
        };
        let d = desired(&snap, &node);
        let http: Vec<_> = d
            .services
            .iter()
            .filter(|f| f.frontend.port == 80 && f.frontend.ip.to_string() == "10.96.0.10")
            .collect();
        assert_eq!(http.len(), 1);
        assert_eq!(http[0].backends.len(), 1, "only the ready endpoint");
        assert_eq!(http[0].backends[0].ip.to_string(), "10.244.1.5");
    }

    #[test]
    fn refused_and_foreign_objects() {
        let mut s = k8s_service();
        s.spec.as_mut().unwrap().load_balancer_source_ranges = Some(vec!["10.0.0.0/8".into()]);
        let (k, c) = convert_service(&s, "");
        assert_eq!(k.to_string(), "Service shop/web");
        match c {
            Converted::Invalid(e) => assert_eq!(e.field, "spec.loadBalancerSourceRanges"),
            other => panic!("{other:?}"),
        }
        let mut s = k8s_service();
        s.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(SERVICE_PROXY_NAME_LABEL.into(), "cilium".into());
        assert_eq!(convert_service(&s, "").1, Converted::NotOurs);
        assert_eq!(convert_service(&s, "twill").1, Converted::NotOurs);
        assert!(matches!(
            convert_service(&s, "cilium").1,
            Converted::Valid(_)
        ));
        assert_eq!(
            label_selector(""),
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
        );
        assert_eq!(label_selector("twill"), "!service.kubernetes.io/headless");
        // Headless: valid, no frontends.
        let headless: Service = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"port": 5432}], "selector": {"app": "db"}}
        }))
        .unwrap();
        match convert_service(&headless, "").1 {
            Converted::Valid(Object::Service(s)) => assert!(!s.has_frontends()),
            other => panic!("{other:?}"),
        }
    }

    fn valid(o: Object) -> Converted {
        Converted::Valid(o)
    }

    fn svc_obj() -> (ObjectKey, Object) {
        let (k, c) = convert_service(&k8s_service(), "");
        match c {
            Converted::Valid(o) => (k, o),
            other => panic!("{other:?}"),
        }
    }

    fn slice_obj(trigger: &str) -> (ObjectKey, Object, Option<SystemTime>) {
        let (k, c, t) = convert_slice(&k8s_slice(trigger));
        match c {
            Converted::Valid(o) => (k, o, t),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn mirror_resets_after_both_lists_and_relists_keep_state() {
        let started = SystemTime::UNIX_EPOCH + Duration::from_mins(29_102_950);
        let mut m = Mirror::new(started);
        let (sk, so) = svc_obj();
        let (ek, eo, _) = slice_obj("2025-05-02T09:14:07Z");
        // Services listed first: nothing yet (the slices are not known).
        assert!(m.handle(Kind::Service, Ev::Init).is_empty());
        assert!(
            m.handle(Kind::Service, Ev::InitApply(sk.clone(), valid(so.clone())))
                .is_empty()
        );
        assert!(m.handle(Kind::Service, Ev::InitDone).is_empty());
        // A service event before the slices are listed: folded into the first Reset.
        assert!(
            m.handle(
                Kind::Service,
                Ev::Apply(sk.clone(), valid(so.clone()), None)
            )
            .is_empty()
        );
        m.handle(Kind::EndpointSlice, Ev::Init);
        m.handle(
            Kind::EndpointSlice,
            Ev::InitApply(ek.clone(), valid(eo.clone())),
        );
        let out = m.handle(Kind::EndpointSlice, Ev::InitDone);
        match &out[..] {
            [SourceUpdate::Reset(l)] => assert_eq!(l.objects.len(), 2),
            other => panic!("{other:?}"),
        }
        // A watched change: one Put, and its trigger time (after the source started).
        let (_, eo2, t) = slice_obj("2025-05-02T09:20:00Z");
        let out = m.handle(
            Kind::EndpointSlice,
            Ev::Apply(ek.clone(), valid(eo2.clone()), t),
        );
        assert!(
            matches!(&out[..], [SourceUpdate::Changes(c), SourceUpdate::Triggers(ts)] if c.len() == 1 && ts == &vec![t.unwrap()])
        );
        // A trigger from before the start is not reported.
        let (_, _, old) = slice_obj("2025-05-01T00:00:00Z");
        let out = m.handle(
            Kind::EndpointSlice,
            Ev::Apply(ek.clone(), valid(eo2.clone()), old),
        );
        assert_eq!(out.len(), 1);
        // The slices' watch breaks and re-lists without the slice (deleted meanwhile): the
        // Reset keeps the Service and drops the slice; nothing is sent before the list is whole.
        assert!(m.handle(Kind::EndpointSlice, Ev::Init).is_empty());
        let out = m.handle(Kind::EndpointSlice, Ev::InitDone);
        match &out[..] {
            [SourceUpdate::Reset(l)] => {
                assert_eq!(l.objects.len(), 1);
                assert_eq!(l.objects[0].key(), sk);
            }
            other => panic!("{other:?}"),
        }
        // Relabelled for another proxy: a delete; deleting again sends nothing.
        let out = m.handle(
            Kind::Service,
            Ev::Apply(sk.clone(), Converted::NotOurs, None),
        );
        assert!(
            matches!(&out[..], [SourceUpdate::Changes(c)] if c == &vec![Change::Delete(sk.clone())])
        );
        assert!(m.handle(Kind::Service, Ev::Delete(sk.clone())).is_empty());
        // An invalid object: absent, and listed as invalid.
        let bad = FieldError {
            field: "spec.ports[0].protocol".into(),
            message: "SCTP".into(),
        };
        m.handle(
            Kind::Service,
            Ev::Apply(sk.clone(), valid(so.clone()), None),
        );
        let out = m.handle(
            Kind::Service,
            Ev::Apply(sk.clone(), Converted::Invalid(bad), None),
        );
        assert!(
            matches!(&out[..], [SourceUpdate::Changes(c), SourceUpdate::Invalid(i)]
                if c == &vec![Change::Delete(sk.clone())] && i[0].0 == sk && i[0].1.field == "spec.ports[0].protocol"),
            "{out:?}"
        );
        assert_eq!(m.listing().invalid.len(), 1);
        assert_eq!(m.listing().invalid[0].0.to_string(), "Service shop/web");
    }
}
