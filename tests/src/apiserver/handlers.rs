//! The connections: the accept loop, and per request GET of one object, lists, and PATCH
//! of nodes and `nodes/status` (watches go to `watch`).

use std::io::BufReader;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::http::{Request, read_request, respond, status};
use super::query::{Filter, Target, parse_fields, parse_labels, parse_path};
use super::watch::watch;
use super::{Key, Resource, Shared, meta_str, write};

pub(super) fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
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

pub(super) fn serve_conn(stream: TcpStream, shared: &Arc<Shared>) {
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

pub(super) fn not_found(t: &Target, name: &str) -> Value {
    let plural = match t.res {
        Resource::Nodes => "nodes",
        Resource::Services => "services",
        Resource::EndpointSlices => "endpointslices.discovery.k8s.io",
    };
    status(404, "NotFound", &format!("{plural} {name:?} not found"))
}

pub(super) fn key_of(t: &Target, name: &str) -> Key {
    (t.res, t.ns.clone().unwrap_or_default(), name.to_string())
}

pub(super) fn get(shared: &Shared, t: &Target, name: &str) -> Option<Value> {
    shared.lock().objects.get(&key_of(t, name)).cloned()
}

pub(super) fn list(shared: &Shared, f: &Filter) -> Value {
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

pub(super) fn merge(target: &mut Value, patch: &Value) {
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

pub(super) fn has_directive(v: &Value) -> bool {
    match v {
        Value::Object(m) => m
            .iter()
            .any(|(k, v)| k.starts_with('$') || has_directive(v)),
        Value::Array(a) => a.iter().any(has_directive),
        _ => false,
    }
}

pub(super) fn patch(shared: &Shared, t: &Target, name: &str, req: &Request) -> (u16, Value) {
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
