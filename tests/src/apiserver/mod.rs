//! A stand-in Kubernetes API server for the end-to-end tests: no kube-apiserver binary can be
//! installed on the test machines, so this serves what twilld reads and writes of the API the
//! way a 1.33 API server does, over plain HTTP inside the rig's underlay namespace.
//!
//! What it implements, and how faithfully:
//! - Nodes (`/api/v1/nodes`), Services (`/api/v1/services`, `/api/v1/namespaces/NS/services`)
//!   and EndpointSlices (`/apis/discovery.k8s.io/v1/…/endpointslices`): `GET` of one object,
//!   lists with `metadata.resourceVersion` (items without `kind`/`apiVersion`, as a real list
//!   has them), `labelSelector` (`k`, `!k`, `k=v`, `k!=v`) and `fieldSelector`
//!   (`metadata.name`, `metadata.namespace`).
//! - Watches (`?watch=1&resourceVersion=…&allowWatchBookmarks=true&timeoutSeconds=…`): a
//!   chunked stream of `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":…}` lines.
//!   Events come from a log keyed by a global resourceVersion (etcd's revision, as in a real
//!   cluster); an object that starts or stops matching the label selector arrives as ADDED or
//!   DELETED (the watch cache's rule); bookmarks every second; the stream ends after
//!   `timeoutSeconds`. A resourceVersion older than the last [`ApiServer::compact`] gets the
//!   real server's answer: HTTP 200 and one `ERROR` event carrying a `410 Expired` Status.
//! - `PATCH` of nodes and `nodes/status` with `application/merge-patch+json` or
//!   `application/strategic-merge-patch+json` (for the maps twilld patches — annotations — the
//!   two agree; lists are replaced, and `$patch` directives are refused). The status
//!   subresource keeps the old `spec`, the main resource the old `status`, as the real
//!   strategies do; a stale `metadata.resourceVersion` in a patch is a `409 Conflict`.
//! - Faults for the tests: [`ApiServer::break_watches`] cuts every open watch mid-stream (no
//!   final chunk, as a dropped connection), [`ApiServer::compact`] expires every older
//!   resourceVersion, [`ApiServer::set_down`] answers `503` until set back.
//! - Objects written by the tests ([`ApiServer::apply`]) are checked by parsing them into the
//!   `k8s-openapi` 1.33 types first, so a test cannot feed twilld JSON a real server would not
//!   produce.
//!
//! Threads, not async: one thread accepts, one serves each connection (keep-alive for plain
//! requests; a watch holds its connection until it ends).

//!
//! Where things are: this module owns the store (objects, the event log, faults) and the
//! [`ApiServer`] handle; `http` reads requests and writes responses, `query` parses paths and
//! selectors, `handlers` serves a connection (get, list, patch), `watch` streams events.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::ns::in_netns;
use crate::rig::UNDERLAY_V4;

mod handlers;
mod http;
mod query;
#[cfg(test)]
mod tests;
mod watch;

use handlers::accept_loop;

/// The stand-in's port (kube-apiserver's old insecure port: plain HTTP, no auth).
pub const API_PORT: u16 = 8080;

/// The URL twilld is given (`--kube-api-url`) to reach a stand-in on the rig's underlay.
pub fn api_url() -> String {
    format!("http://{UNDERLAY_V4}:{API_PORT}")
}

/// The kinds the stand-in serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    /// `v1 Node` (cluster-scoped).
    Nodes,
    /// `v1 Service`.
    Services,
    /// `discovery.k8s.io/v1 EndpointSlice`.
    EndpointSlices,
}

impl Resource {
    fn kind(self) -> &'static str {
        match self {
            Resource::Nodes => "Node",
            Resource::Services => "Service",
            Resource::EndpointSlices => "EndpointSlice",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Resource::Nodes | Resource::Services => "v1",
            Resource::EndpointSlices => "discovery.k8s.io/v1",
        }
    }

    fn namespaced(self) -> bool {
        self != Resource::Nodes
    }

    /// The store's key of object `name` in namespace `ns` (ignored for a cluster-scoped kind).
    fn key(self, ns: &str, name: &str) -> Key {
        let ns = if self.namespaced() { ns } else { "" };
        (self, ns.to_string(), name.to_string())
    }

    fn from_kind(kind: &str) -> Option<Self> {
        match kind {
            "Node" => Some(Resource::Nodes),
            "Service" => Some(Resource::Services),
            "EndpointSlice" => Some(Resource::EndpointSlices),
            _ => None,
        }
    }

    /// Checks `obj` parses as the `k8s-openapi` type of this kind.
    fn check(self, obj: &Value) -> Result<()> {
        use k8s_openapi::api::core::v1::{Node, Service};
        use k8s_openapi::api::discovery::v1::EndpointSlice;
        let v = obj.clone();
        let r = match self {
            Resource::Nodes => serde_json::from_value::<Node>(v).map(drop),
            Resource::Services => serde_json::from_value::<Service>(v).map(drop),
            Resource::EndpointSlices => serde_json::from_value::<EndpointSlice>(v).map(drop),
        };
        r.with_context(|| format!("not a valid {} for a 1.33 API server", self.kind()))
    }
}

type Key = (Resource, String, String);

struct Event {
    rv: u64,
    res: Resource,
    kind: &'static str,
    object: Value,
    old: Option<Value>,
}

#[derive(Default)]
struct Store {
    rv: u64,
    uids: u64,
    objects: BTreeMap<Key, Value>,
    log: Vec<Event>,
    compacted: u64,
    down: bool,
    generation: u64,
    requests: Vec<String>,
}

struct Shared {
    store: Mutex<Store>,
    changed: Condvar,
    stop: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running stand-in; dropping it stops it and closes every connection.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    k8s_openapi::jiff::Timestamp::from_second(i64::try_from(secs).unwrap_or_default())
        .map_or_else(|_| String::new(), |t| t.to_string())
}

impl ApiServer {
    /// Starts a stand-in listening on `addr` inside namespace `ns`.
    pub fn start(ns: &str, addr: SocketAddr) -> Result<ApiServer> {
        let listener = in_netns(ns, || {
            TcpListener::bind(addr)
                .with_context(|| format!("bind the stand-in API server to {addr}"))
        })?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let accept = std::thread::Builder::new()
            .name("apiserver-accept".into())
            .spawn(move || accept_loop(&listener, &s))?;
        Ok(ApiServer {
            shared,
            addr,
            accept: Some(accept),
        })
    }

    /// A stand-in on the rig's underlay address ([`api_url`]).
    pub fn start_on_underlay(underlay_ns: &str) -> Result<ApiServer> {
        ApiServer::start(underlay_ns, SocketAddr::from((UNDERLAY_V4, API_PORT)))
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Creates or replaces an object (JSON of a Node, Service or EndpointSlice, as `kubectl`
    /// would send it), as the API server stores it: resourceVersion, uid and creation time set,
    /// namespace defaulted. Returns the stored object.
    pub fn apply(&self, mut obj: Value) -> Result<Value> {
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
        let res =
            Resource::from_kind(kind).ok_or_else(|| anyhow!("kind {kind:?} is not served"))?;
        res.check(&obj)?;
        let name = meta_str(&obj, "name").to_string();
        if name.is_empty() {
            bail!("{kind} without metadata.name");
        }
        let ns = if res.namespaced() {
            let ns = meta_str(&obj, "namespace");
            if ns.is_empty() { "default" } else { ns }.to_string()
        } else {
            String::new()
        };
        if res.namespaced() {
            obj["metadata"]["namespace"] = json!(ns);
        }
        let mut st = self.shared.lock();
        let key = (res, ns, name);
        let old = st.objects.get(&key).cloned();
        if let Some(o) = &old {
            obj["metadata"]["uid"] = o["metadata"]["uid"].clone();
            obj["metadata"]["creationTimestamp"] = o["metadata"]["creationTimestamp"].clone();
        } else {
            st.uids += 1;
            obj["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", st.uids));
            obj["metadata"]["creationTimestamp"] = json!(now_rfc3339());
        }
        Ok(write(&mut st, &self.shared, key, obj, old))
    }

    /// Deletes an object; whether it existed.
    pub fn delete(&self, res: Resource, ns: &str, name: &str) -> bool {
        let mut st = self.shared.lock();
        let key = res.key(ns, name);
        let Some(mut obj) = st.objects.remove(&key) else {
            return false;
        };
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.log.push(Event {
            rv,
            res,
            kind: "DELETED",
            object: obj.clone(),
            old: Some(obj),
        });
        drop(st);
        self.shared.changed.notify_all();
        true
    }

    /// An object as stored.
    pub fn get(&self, res: Resource, ns: &str, name: &str) -> Option<Value> {
        let key = res.key(ns, name);
        self.shared.lock().objects.get(&key).cloned()
    }

    /// Cuts every open watch mid-stream, as a dropped connection or an API server restart does.
    pub fn break_watches(&self) {
        self.shared.lock().generation += 1;
        self.shared.changed.notify_all();
    }

    /// Forgets the history: a watch from any resourceVersion before now gets `410 Expired`.
    pub fn compact(&self) {
        let mut st = self.shared.lock();
        st.compacted = st.rv;
        st.log.clear();
    }

    /// While down, every request gets `503` and open watches are cut.
    pub fn set_down(&self, down: bool) {
        let mut st = self.shared.lock();
        st.down = down;
        if down {
            st.generation += 1;
        }
        drop(st);
        self.shared.changed.notify_all();
    }

    /// The request lines served so far (`GET /api/v1/services?…`).
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// How many list (not watch) requests `res` got.
    pub fn lists(&self, res: Resource) -> usize {
        let path = match res {
            Resource::Nodes => "/nodes",
            Resource::Services => "/services",
            Resource::EndpointSlices => "/endpointslices",
        };
        self.requests()
            .iter()
            .filter(|r| {
                r.starts_with("GET ")
                    && r.split('?').next().is_some_and(|p| p.ends_with(path))
                    && !r.contains("watch=")
            })
            .count()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.break_watches();
        for c in self
            .shared
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            let _ = c.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Stores `obj` under `key` with the next resourceVersion and logs the event.
fn write(st: &mut Store, shared: &Shared, key: Key, mut obj: Value, old: Option<Value>) -> Value {
    st.rv += 1;
    let rv = st.rv;
    let res = key.0;
    obj["kind"] = json!(res.kind());
    obj["apiVersion"] = json!(res.api_version());
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    st.objects.insert(key, obj.clone());
    st.log.push(Event {
        rv,
        res,
        kind: if old.is_some() { "MODIFIED" } else { "ADDED" },
        object: obj.clone(),
        old,
    });
    shared.changed.notify_all();
    obj
}

/// A Node as the kubelet registers it and the node IPAM controller assigns its `podCIDRs`.
pub fn node(name: &str, internal_ip: Ipv4Addr, pod_cidrs: &[&str]) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64"
            },
            "annotations": {
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true"
            }
        },
        "spec": {"podCIDR": pod_cidrs.first().copied().unwrap_or_default(), "podCIDRs": pod_cidrs},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": internal_ip.to_string()},
                {"type": "Hostname", "address": name}
            ],
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "kubelet is posting ready status",
                "lastHeartbeatTime": now_rfc3339(), "lastTransitionTime": now_rfc3339()
            }]
        }
    })
}
