//! Unit tests of the stand-in's pure parts: paths, selectors, merge patches, watch events.

use super::handlers::{has_directive, merge};
use super::http::pct_decode;
use super::query::{Filter, fields_match, labels_match, parse_fields, parse_labels, parse_path};
use super::watch::watch_event;
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
    let mut v = json!({"metadata": {"annotations": {"a": "1", "b": "2"}}, "spec": {"x": [1, 2]}});
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
