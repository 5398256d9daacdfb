//! Watches: a chunked stream of the event log from a resourceVersion on, filtered by the
//! watch's selectors, with bookmarks, a timeout, and the faults a test can inject.

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::http::{Request, chunk, status};
use super::query::Filter;
use super::{Event, Shared};

/// Serves a watch until it times out (clean end), is cut ([`ApiServer::break_watches`],
/// [`ApiServer::set_down`], shutdown) or the client goes away.
pub(super) fn watch(shared: &Shared, mut out: TcpStream, req: &Request, f: &Filter) {
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
pub(super) fn watch_event(e: &Event, f: &Filter) -> Option<Value> {
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
