//! What a request names and selects: the path's resource, namespace, object and
//! subresource, and the label and field selectors of lists and watches.

use anyhow::Result;
use serde_json::Value;

use super::{Resource, meta_str};

/// What a path names: the resource, the namespace, the object, and whether `/status`.
pub(super) struct Target {
    pub(super) res: Resource,
    pub(super) ns: Option<String>,
    pub(super) name: Option<String>,
    pub(super) status: bool,
}

pub(super) fn parse_path(path: &str) -> Option<Target> {
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
pub(super) enum Req {
    Exists(String),
    NotExists(String),
    Eq(String, String),
    NotEq(String, String),
}

pub(super) fn parse_labels(sel: &str) -> Result<Vec<Req>, String> {
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

pub(super) fn labels_match(reqs: &[Req], obj: &Value) -> bool {
    let labels = obj.get("metadata").and_then(|m| m.get("labels"));
    let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    reqs.iter().all(|r| match r {
        Req::Exists(k) => get(k).is_some(),
        Req::NotExists(k) => get(k).is_none(),
        Req::Eq(k, v) => get(k) == Some(v.as_str()),
        Req::NotEq(k, v) => get(k) != Some(v.as_str()),
    })
}

pub(super) fn parse_fields(sel: &str) -> Result<Vec<(String, bool, String)>, String> {
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

pub(super) fn fields_match(reqs: &[(String, bool, String)], obj: &Value) -> bool {
    reqs.iter().all(|(k, eq, v)| {
        let field = k.strip_prefix("metadata.").unwrap_or(k);
        (meta_str(obj, field) == v) == *eq
    })
}

pub(super) struct Filter {
    pub(super) res: Resource,
    pub(super) ns: Option<String>,
    pub(super) labels: Vec<Req>,
    pub(super) fields: Vec<(String, bool, String)>,
}

impl Filter {
    pub(super) fn matches(&self, obj: &Value) -> bool {
        self.ns
            .as_deref()
            .is_none_or(|ns| meta_str(obj, "namespace") == ns)
            && labels_match(&self.labels, obj)
            && fields_match(&self.fields, obj)
    }
}
