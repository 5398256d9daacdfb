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

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Map, Value, json};

use crate::ns::in_netns;
use crate::rig::UNDERLAY_V4;

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
        let key = (
            res,
            if res.namespaced() {
                ns.to_string()
            } else {
                String::new()
            },
            name.to_string(),
        );
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
        let key = (
            res,
            if res.namespaced() {
                ns.to_string()
            } else {
                String::new()
            },
            name.to_string(),
        );
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

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                if let Ok(c) = stream.try_clone() {
                    shared
                        .conns
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(c);
                }
                let s = shared.clone();
                let _ = std::thread::Builder::new()
                    .name("apiserver-conn".into())
                    .spawn(move || serve_conn(stream, &s));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

struct Request {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Request {
    fn param(&self, k: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (pct_decode(k), pct_decode(v))
        })
        .collect();
    Some(Request {
        method,
        path: path.to_string(),
        query,
        headers,
        body,
    })
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code
    })
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        410 => "Gone",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        _ => "Service Unavailable",
    }
}

fn respond(s: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let text = body.to_string();
    write!(
        s,
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
        reason_phrase(code),
        text.len()
    )?;
    s.flush()
}

/// What a path names: the resource, the namespace, the object, and whether `/status`.
struct Target {
    res: Resource,
    ns: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest: &[&str] = match segs.as_slice() {
        ["api", "v1", rest @ ..] | ["apis", "discovery.k8s.io", "v1", rest @ ..] => rest,
        _ => return None,
    };
    let core = segs[0] == "api";
    let (ns, rest) = match rest {
        ["namespaces", ns, rest @ ..] => (Some((*ns).to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some((*n).to_string()), None),
        [p, n, s] => (*p, Some((*n).to_string()), Some(*s)),
        _ => return None,
    };
    let res = match (core, plural) {
        (true, "nodes") if ns.is_none() => Resource::Nodes,
        (true, "services") => Resource::Services,
        (false, "endpointslices") => Resource::EndpointSlices,
        _ => return None,
    };
    if name.is_some() && res.namespaced() && ns.is_none() {
        return None;
    }
    let status = match sub {
        None => false,
        Some("status") => true,
        Some(_) => return None,
    };
    Some(Target {
        res,
        ns,
        name,
        status,
    })
}

/// One requirement of a label selector.
enum Req {
    Exists(String),
    NotExists(String),
    Eq(String, String),
    NotEq(String, String),
}

fn parse_labels(sel: &str) -> Result<Vec<Req>, String> {
    let mut out = Vec::new();
    for part in sel.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if part.contains('(') || part.contains(' ') {
            return Err(format!("unsupported label selector requirement {part:?}"));
        }
        let r = if let Some(k) = part.strip_prefix('!') {
            Req::NotExists(k.to_string())
        } else if let Some((k, v)) = part.split_once("!=") {
            Req::NotEq(k.to_string(), v.to_string())
        } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            Req::Eq(k.to_string(), v.to_string())
        } else {
            Req::Exists(part.to_string())
        };
        out.push(r);
    }
    Ok(out)
}

fn labels_match(reqs: &[Req], obj: &Value) -> bool {
    let labels = obj.get("metadata").and_then(|m| m.get("labels"));
    let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    reqs.iter().all(|r| match r {
        Req::Exists(k) => get(k).is_some(),
        Req::NotExists(k) => get(k).is_none(),
        Req::Eq(k, v) => get(k) == Some(v.as_str()),
        Req::NotEq(k, v) => get(k) != Some(v.as_str()),
    })
}

fn parse_fields(sel: &str) -> Result<Vec<(String, bool, String)>, String> {
    let mut out = Vec::new();
    for part in sel.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, eq, v) = if let Some((k, v)) = part.split_once("!=") {
            (k, false, v)
        } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            (k, true, v)
        } else {
            return Err(format!("invalid field selector {part:?}"));
        };
        if k != "metadata.name" && k != "metadata.namespace" {
            return Err(format!("field label not supported: {k}"));
        }
        out.push((k.to_string(), eq, v.to_string()));
    }
    Ok(out)
}

fn fields_match(reqs: &[(String, bool, String)], obj: &Value) -> bool {
    reqs.iter().all(|(k, eq, v)| {
        let field = k.strip_prefix("metadata.").unwrap_or(k);
        (meta_str(obj, field) == v) == *eq
    })
}

struct Filter {
    res: Resource,
    ns: Option<String>,
    labels: Vec<Req>,
    fields: Vec<(String, bool, String)>,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        self.ns
            .as_deref()
            .is_none_or(|ns| meta_str(obj, "namespace") == ns)
            && labels_match(&self.labels, obj)
            && fields_match(&self.fields, obj)
    }
}

fn serve_conn(stream: TcpStream, shared: &Arc<Shared>) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut out = stream;
    while let Some(req) = read_request(&mut reader) {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let line = if req.query.is_empty() {
            format!("{} {}", req.method, req.path)
        } else {
            let q: Vec<String> = req.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{} {}?{}", req.method, req.path, q.join("&"))
        };
        let down = {
            let mut st = shared.lock();
            st.requests.push(line);
            st.down
        };
        if down {
            let _ = respond(
                &mut out,
                503,
                &status(503, "ServiceUnavailable", "the stand-in API server is down"),
            );
            continue;
        }
        let Some(t) = parse_path(&req.path) else {
            let _ = respond(
                &mut out,
                404,
                &status(
                    404,
                    "NotFound",
                    &format!(
                        "the server could not find the requested resource ({})",
                        req.path
                    ),
                ),
            );
            continue;
        };
        let res = match (req.method.as_str(), &t.name) {
            ("GET", None) => {
                let filter = match (
                    parse_labels(req.param("labelSelector").unwrap_or_default()),
                    parse_fields(req.param("fieldSelector").unwrap_or_default()),
                ) {
                    (Ok(labels), Ok(fields)) => Filter {
                        res: t.res,
                        ns: t.ns.clone(),
                        labels,
                        fields,
                    },
                    (Err(e), _) | (_, Err(e)) => {
                        let _ = respond(&mut out, 400, &status(400, "BadRequest", &e));
                        continue;
                    }
                };
                if matches!(req.param("watch"), Some("true" | "1")) {
                    watch(shared, out, &req, &filter);
                    return;
                }
                respond(&mut out, 200, &list(shared, &filter))
            }
            ("GET", Some(name)) => match get(shared, &t, name) {
                Some(obj) => respond(&mut out, 200, &obj),
                None => respond(&mut out, 404, &not_found(&t, name)),
            },
            ("PATCH", Some(name)) => {
                let (code, body) = patch(shared, &t, name, &req);
                respond(&mut out, code, &body)
            }
            _ => respond(
                &mut out,
                405,
                &status(
                    405,
                    "MethodNotAllowed",
                    &format!("{} is not supported by the stand-in", req.method),
                ),
            ),
        };
        if res.is_err() {
            return;
        }
    }
}

fn not_found(t: &Target, name: &str) -> Value {
    let plural = match t.res {
        Resource::Nodes => "nodes",
        Resource::Services => "services",
        Resource::EndpointSlices => "endpointslices.discovery.k8s.io",
    };
    status(404, "NotFound", &format!("{plural} {name:?} not found"))
}

fn key_of(t: &Target, name: &str) -> Key {
    (t.res, t.ns.clone().unwrap_or_default(), name.to_string())
}

fn get(shared: &Shared, t: &Target, name: &str) -> Option<Value> {
    shared.lock().objects.get(&key_of(t, name)).cloned()
}

fn list(shared: &Shared, f: &Filter) -> Value {
    let st = shared.lock();
    let items: Vec<Value> = st
        .objects
        .iter()
        .filter(|((res, _, _), obj)| *res == f.res && f.matches(obj))
        .map(|(_, obj)| {
            let mut o = obj.clone();
            if let Some(m) = o.as_object_mut() {
                m.remove("kind");
                m.remove("apiVersion");
            }
            o
        })
        .collect();
    json!({
        "kind": format!("{}List", f.res.kind()),
        "apiVersion": f.res.api_version(),
        "metadata": {"resourceVersion": st.rv.to_string()},
        "items": items
    })
}

fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn has_directive(v: &Value) -> bool {
    match v {
        Value::Object(m) => m
            .iter()
            .any(|(k, v)| k.starts_with('$') || has_directive(v)),
        Value::Array(a) => a.iter().any(has_directive),
        _ => false,
    }
}

fn patch(shared: &Shared, t: &Target, name: &str, req: &Request) -> (u16, Value) {
    let ctype = req.headers.get("content-type").map_or("", String::as_str);
    let ctype = ctype.split(';').next().unwrap_or_default().trim();
    if !matches!(
        ctype,
        "application/merge-patch+json" | "application/strategic-merge-patch+json"
    ) {
        return (
            415,
            status(
                415,
                "UnsupportedMediaType",
                &format!(
                    "the body of the request was in an unknown format ({ctype:?}); the stand-in accepts merge and strategic-merge patches"
                ),
            ),
        );
    }
    let body: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => {
            return (
                400,
                status(400, "BadRequest", &format!("invalid JSON patch: {e}")),
            );
        }
    };
    if has_directive(&body) {
        return (
            422,
            status(
                422,
                "Invalid",
                "strategic-merge directives ($patch, $retainKeys, ...) are not supported by the stand-in",
            ),
        );
    }
    let mut st = shared.lock();
    let key = key_of(t, name);
    let Some(old) = st.objects.get(&key).cloned() else {
        return (404, not_found(t, name));
    };
    if let Some(want) = body
        .get("metadata")
        .and_then(|m| m.get("resourceVersion"))
        .and_then(Value::as_str)
        && want != meta_str(&old, "resourceVersion")
    {
        return (
            409,
            status(
                409,
                "Conflict",
                &format!(
                    "Operation cannot be fulfilled on {} {name:?}: the object has been modified; please apply your changes to the latest version and try again",
                    t.res.kind()
                ),
            ),
        );
    }
    let mut new = old.clone();
    merge(&mut new, &body);
    // The status subresource changes metadata and status, the main resource metadata and spec.
    let keep = if t.status { "spec" } else { "status" };
    match old.get(keep) {
        Some(v) => new[keep] = v.clone(),
        None => {
            if let Some(m) = new.as_object_mut() {
                m.remove(keep);
            }
        }
    }
    new["metadata"]["uid"] = old["metadata"]["uid"].clone();
    new["metadata"]["name"] = old["metadata"]["name"].clone();
    if let Err(e) = t.res.check(&new) {
        return (422, status(422, "Invalid", &format!("{e:#}")));
    }
    (200, write(&mut st, shared, key, new, Some(old)))
}

fn chunk(s: &mut TcpStream, line: &Value) -> std::io::Result<()> {
    let text = format!("{line}\n");
    write!(s, "{:x}\r\n{text}\r\n", text.len())?;
    s.flush()
}

/// Serves a watch until it times out (clean end), is cut ([`ApiServer::break_watches`],
/// [`ApiServer::set_down`], shutdown) or the client goes away.
fn watch(shared: &Shared, mut out: TcpStream, req: &Request, f: &Filter) {
    let bookmarks = req.param("allowWatchBookmarks") == Some("true");
    let timeout = req
        .param("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_mins(30), Duration::from_secs);
    let deadline = Instant::now() + timeout;
    let rv_param = req.param("resourceVersion").unwrap_or_default().to_string();
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    if out.write_all(head.as_bytes()).is_err() {
        return;
    }
    let (mut from, generation, initial) = {
        let st = shared.lock();
        let generation = st.generation;
        match rv_param.as_str() {
            "" | "0" => {
                let adds: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|((res, _, _), o)| *res == f.res && f.matches(o))
                    .map(|(_, o)| json!({"type": "ADDED", "object": o}))
                    .collect();
                (st.rv, generation, adds)
            }
            v => match v.parse::<u64>() {
                Ok(rv) if rv >= st.compacted => (rv, generation, Vec::new()),
                Ok(rv) => {
                    let msg = format!("too old resource version: {rv} ({})", st.compacted + 1);
                    drop(st);
                    let _ = chunk(
                        &mut out,
                        &json!({"type": "ERROR", "object": status(410, "Expired", &msg)}),
                    );
                    let _ = out.write_all(b"0\r\n\r\n");
                    return;
                }
                Err(_) => {
                    drop(st);
                    let msg = format!("invalid resourceVersion {v:?}");
                    let _ = chunk(
                        &mut out,
                        &json!({"type": "ERROR", "object": status(400, "BadRequest", &msg)}),
                    );
                    let _ = out.write_all(b"0\r\n\r\n");
                    return;
                }
            },
        }
    };
    for ev in &initial {
        if chunk(&mut out, ev).is_err() {
            return;
        }
    }
    let mut last_bookmark = Instant::now();
    loop {
        let events: Vec<Value> = {
            let mut st = shared.lock();
            if st.generation != generation || shared.stop.load(Ordering::SeqCst) {
                drop(st);
                // Cut: no final chunk, as a dropped connection.
                let _ = out.shutdown(Shutdown::Both);
                return;
            }
            if st.rv == from {
                st = shared
                    .changed
                    .wait_timeout(st, Duration::from_millis(250))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            if st.generation != generation || shared.stop.load(Ordering::SeqCst) {
                drop(st);
                let _ = out.shutdown(Shutdown::Both);
                return;
            }
            let evs = st
                .log
                .iter()
                .filter(|e| e.rv > from && e.res == f.res)
                .filter_map(|e| watch_event(e, f))
                .collect();
            from = st.rv;
            evs
        };
        for ev in &events {
            if chunk(&mut out, ev).is_err() {
                return;
            }
        }
        if bookmarks && last_bookmark.elapsed() >= Duration::from_secs(1) {
            last_bookmark = Instant::now();
            let bm = json!({"type": "BOOKMARK", "object": {
                "kind": f.res.kind(),
                "apiVersion": f.res.api_version(),
                "metadata": {"resourceVersion": from.to_string()}
            }});
            if chunk(&mut out, &bm).is_err() {
                return;
            }
        }
        if Instant::now() >= deadline {
            let _ = out.write_all(b"0\r\n\r\n");
            return;
        }
    }
}

/// The event a watcher with filter `f` sees for a logged change (the watch cache's rule for
/// objects entering or leaving the selection).
fn watch_event(e: &Event, f: &Filter) -> Option<Value> {
    let now = f.matches(&e.object);
    let before = e.old.as_ref().is_some_and(|o| f.matches(o));
    let (kind, obj) = match (e.kind, before, now) {
        ("ADDED", _, true) | ("MODIFIED", false, true) => ("ADDED", e.object.clone()),
        ("MODIFIED", true, true) => ("MODIFIED", e.object.clone()),
        ("MODIFIED", true, false) => {
            let mut o = e.old.clone().unwrap_or_default();
            o["metadata"]["resourceVersion"] = json!(e.rv.to_string());
            ("DELETED", o)
        }
        ("DELETED", true, _) => ("DELETED", e.object.clone()),
        _ => return None,
    };
    Some(json!({"type": kind, "object": obj}))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_selectors() {
        let t = parse_path("/api/v1/nodes/n1/status").unwrap();
        assert_eq!(
            (t.res, t.name.as_deref(), t.status),
            (Resource::Nodes, Some("n1"), true)
        );
        let t = parse_path("/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices").unwrap();
        assert_eq!(
            (t.res, t.ns.as_deref()),
            (Resource::EndpointSlices, Some("shop"))
        );
        assert!(
            parse_path("/api/v1/services/web").is_none(),
            "namespaced object without a namespace"
        );
        assert!(parse_path("/api/v1/pods").is_none());
        assert_eq!(
            pct_decode("%21service.kubernetes.io%2Fheadless%2Cx%3Dy+z"),
            "!service.kubernetes.io/headless,x=y z"
        );
        let reqs = parse_labels("!a,b=c,d!=e,f").unwrap();
        let obj = json!({"metadata": {"labels": {"b": "c", "f": "1"}}});
        assert!(labels_match(&reqs, &obj));
        let obj = json!({"metadata": {"labels": {"a": "1", "b": "c", "f": "1"}}});
        assert!(!labels_match(&reqs, &obj));
        assert!(parse_labels("env in (a,b)").is_err());
        let f = parse_fields("metadata.name=n1").unwrap();
        assert!(fields_match(&f, &json!({"metadata": {"name": "n1"}})));
        assert!(!fields_match(&f, &json!({"metadata": {"name": "n2"}})));
        assert!(parse_fields("spec.nodeName=n1").is_err());
    }

    #[test]
    fn merge_patch_semantics() {
        let mut v =
            json!({"metadata": {"annotations": {"a": "1", "b": "2"}}, "spec": {"x": [1, 2]}});
        merge(
            &mut v,
            &json!({"metadata": {"annotations": {"a": null, "c": "3"}}, "spec": {"x": [3]}}),
        );
        assert_eq!(
            v,
            json!({"metadata": {"annotations": {"b": "2", "c": "3"}}, "spec": {"x": [3]}})
        );
        assert!(has_directive(
            &json!({"spec": {"taints": [{"$patch": "delete"}]}})
        ));
    }

    #[test]
    fn selector_transitions_become_adds_and_deletes() {
        let f = Filter {
            res: Resource::Services,
            ns: None,
            labels: parse_labels("!service.kubernetes.io/service-proxy-name").unwrap(),
            fields: Vec::new(),
        };
        let plain = json!({"metadata": {"name": "web", "resourceVersion": "5"}});
        let labelled = json!({"metadata": {"name": "web", "resourceVersion": "6", "labels": {"service.kubernetes.io/service-proxy-name": "other"}}});
        let ev = |kind, object: &Value, old: Option<&Value>| Event {
            rv: 6,
            res: Resource::Services,
            kind,
            object: object.clone(),
            old: old.cloned(),
        };
        let out = watch_event(&ev("MODIFIED", &labelled, Some(&plain)), &f).unwrap();
        assert_eq!(out["type"], "DELETED");
        assert_eq!(out["object"]["metadata"]["resourceVersion"], "6");
        let out = watch_event(&ev("MODIFIED", &plain, Some(&labelled)), &f).unwrap();
        assert_eq!(out["type"], "ADDED");
        assert!(watch_event(&ev("ADDED", &labelled, None), &f).is_none());
    }

    #[test]
    fn objects_are_checked_against_k8s_openapi() {
        assert!(
            Resource::Nodes
                .check(&node(
                    "n1",
                    Ipv4Addr::new(198, 18, 0, 11),
                    &["10.244.1.0/24"]
                ))
                .is_ok()
        );
        let bad = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"ports": "80"}});
        assert!(Resource::Services.check(&bad).is_err());
    }
}
