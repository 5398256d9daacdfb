//! Parsing: YAML/JSON manifests and stored JSON values into typed objects, with the path of
//! the field in every error.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::types::{EndpointSlice, Service};
use super::{FieldError, ManifestError, Object, ObjectKey, bad};

// Parsing.

/// Parses one object of `kind` from a JSON value, with field paths in errors; not validated.
pub(super) fn typed<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        bad(
            if path == "." { String::new() } else { path },
            e.into_inner().to_string(),
        )
    })
}

pub(super) fn describe(index: &str, v: &serde_json::Value) -> String {
    let kind = v.get("kind").and_then(serde_json::Value::as_str);
    let meta = v.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(serde_json::Value::as_str);
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(serde_json::Value::as_str)
        .unwrap_or("default");
    match (kind, name) {
        (Some(k), Some(n)) => format!("{index} ({k} {ns}/{n})"),
        (Some(k), None) => format!("{index} ({k})"),
        _ => index.to_string(),
    }
}

pub(super) fn object_from_value(
    index: &str,
    v: serde_json::Value,
    out: &mut Vec<(String, Object)>,
) -> Result<(), ManifestError> {
    let who = describe(index, &v);
    let invalid = |error: FieldError| ManifestError::Invalid {
        object: who.clone(),
        error,
    };
    if !v.is_object() {
        return Err(invalid(bad(
            "",
            "not an object (want a Service or an EndpointSlice)",
        )));
    }
    let api = v
        .get("apiVersion")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_string();
    let kind = v
        .get("kind")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_string();
    if kind.is_empty() {
        return Err(invalid(bad("kind", "missing")));
    }
    if api.is_empty() {
        return Err(invalid(bad("apiVersion", "missing")));
    }
    let mut obj = match (api.as_str(), kind.as_str()) {
        ("v1", "Service") => Object::Service(typed(v).map_err(invalid)?),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            Object::EndpointSlice(typed(v).map_err(invalid)?)
        }
        (_, k) if k == "List" || k.ends_with("List") => {
            let items = match v.get("items") {
                Some(serde_json::Value::Array(items)) => items.clone(),
                Some(serde_json::Value::Null) | None => Vec::new(),
                Some(_) => return Err(invalid(bad("items", "not a list"))),
            };
            for (i, item) in items.into_iter().enumerate() {
                object_from_value(&format!("{index} items[{i}]"), item, out)?;
            }
            return Ok(());
        }
        (_, "Service") => {
            return Err(invalid(bad(
                "apiVersion",
                format!("{api} is not supported for kind Service (want v1)"),
            )));
        }
        (_, "EndpointSlice") => {
            return Err(invalid(bad(
                "apiVersion",
                format!("{api} is not supported for kind EndpointSlice (want discovery.k8s.io/v1)"),
            )));
        }
        (_, "Endpoints") => {
            return Err(invalid(bad(
                "kind",
                "Endpoints is not supported; write a discovery.k8s.io/v1 EndpointSlice",
            )));
        }
        (_, k) => {
            return Err(invalid(bad(
                "kind",
                format!(
                    "{k} is not supported (want v1 Service or discovery.k8s.io/v1 EndpointSlice)"
                ),
            )));
        }
    };
    obj.validate().map_err(invalid)?;
    out.push((who, obj));
    Ok(())
}

/// Parses a manifest: YAML (several `---`-separated documents) or JSON (one or more values), as
/// `kubectl get -o yaml|json` prints them, `List`s included. All or nothing: the first invalid
/// document fails the whole manifest, naming the document and the field. Two documents for the
/// same object are refused (which one should win is a guess).
pub fn parse_manifest(text: &str) -> Result<Vec<Object>, ManifestError> {
    let mut values = Vec::new();
    if text.trim_start().starts_with('{') {
        for (i, v) in serde_json::Deserializer::from_str(text)
            .into_iter::<serde_json::Value>()
            .enumerate()
        {
            values.push(v.map_err(|e| ManifestError::Syntax {
                index: i + 1,
                message: e.to_string(),
            })?);
        }
    } else {
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            values.push(serde_json::Value::deserialize(doc).map_err(|e| {
                ManifestError::Syntax {
                    index: i + 1,
                    message: e.to_string(),
                }
            })?);
        }
    }
    let mut out = Vec::new();
    for (i, v) in values.into_iter().enumerate() {
        if v.is_null() {
            continue; // an empty document (`---` at the start or the end)
        }
        object_from_value(&format!("document {}", i + 1), v, &mut out)?;
    }
    let mut seen: BTreeMap<ObjectKey, String> = BTreeMap::new();
    for (who, obj) in &out {
        if let Some(first) = seen.insert(obj.key(), who.clone()) {
            return Err(ManifestError::Invalid {
                object: who.clone(),
                error: bad(
                    "metadata.name",
                    format!("{} is also defined by {first}", obj.key()),
                ),
            });
        }
    }
    Ok(out.into_iter().map(|(_, o)| o).collect())
}

/// Parses a stored Service (canonical JSON) and validates it.
pub fn service_from_json(bytes: &[u8]) -> Result<Service, FieldError> {
    stored_from_json(bytes, Service::validate)
}

/// Parses a stored EndpointSlice (canonical JSON) and validates it.
pub fn endpoint_slice_from_json(bytes: &[u8]) -> Result<EndpointSlice, FieldError> {
    stored_from_json(bytes, EndpointSlice::validate)
}

/// Parses a stored object (canonical JSON) and checks it with `validate`.
fn stored_from_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    validate: impl FnOnce(&mut T) -> Result<(), FieldError>,
) -> Result<T, FieldError> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| bad("", format!("not JSON: {e}")))?;
    let mut o: T = typed(v)?;
    validate(&mut o)?;
    Ok(o)
}
