//! deploy/kube-twill.yml, parsed into the k8s-openapi 1.33 types an API server would accept,
//! and checked against what twilld and twill-cni will do with it: the DaemonSet's arguments
//! parse as twilld's flags, the ConfigMap's net-conf.json as twilld's network config and its
//! conflist as twill-cni's config, and the RBAC rules grant what twilld calls.
//! Unprivileged: runs everywhere.

use std::collections::BTreeMap;

use clap::Parser as _;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::Deserialize as _;
use serde_json::Value;

const MANIFEST: &str = include_str!("../../deploy/kube-twill.yml");

/// Every document of the manifest, by kind, as JSON.
fn documents() -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for doc in serde_yaml_ng::Deserializer::from_str(MANIFEST) {
        let v = Value::deserialize(doc).expect("YAML");
        if v.is_null() {
            continue;
        }
        let kind = v["kind"].as_str().expect("kind").to_string();
        out.entry(kind).or_default().push(v);
    }
    out
}

fn one<T: serde::de::DeserializeOwned + serde::Serialize>(
    docs: &BTreeMap<String, Vec<Value>>,
    kind: &str,
) -> T {
    let list = &docs[kind];
    assert_eq!(list.len(), 1, "one {kind}");
    strict(&list[0]).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

/// Parses `v` as `T` and refuses fields `T` does not know (an API server would drop them with a
/// warning, and a typo such as `hostNetwrok` would silently change the pod).
fn strict<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) -> Result<T, String> {
    let typed: T = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    let round = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let lost = dropped(v, &round, "");
    if lost.is_empty() {
        Ok(typed)
    } else {
        Err(format!("fields unknown to k8s-openapi 1.33: {lost:?}"))
    }
}

/// Paths present in `orig` but not in `round` (what the typed parse dropped).
fn dropped(orig: &Value, round: &Value, path: &str) -> Vec<String> {
    match (orig, round) {
        (Value::Object(a), Value::Object(b)) => a
            .iter()
            .flat_map(|(k, v)| {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    None => vec![p],
                    Some(w) => dropped(v, w, &p),
                }
            })
            .collect(),
        (Value::Array(a), Value::Array(b)) => a
            .iter()
            .zip(b)
            .enumerate()
            .flat_map(|(i, (v, w))| dropped(v, w, &format!("{path}[{i}]")))
            .collect(),
        _ => Vec::new(),
    }
}

#[test]
fn manifest_parses_into_kubernetes_types() {
    let docs = documents();
    let kinds: Vec<&str> = docs.keys().map(String::as_str).collect();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "Namespace",
            "ServiceAccount"
        ]
    );
    let ns: Namespace = one(&docs, "Namespace");
    let sa: ServiceAccount = one(&docs, "ServiceAccount");
    let binding: ClusterRoleBinding = one(&docs, "ClusterRoleBinding");
    let ds: DaemonSet = one(&docs, "DaemonSet");
    let namespace = ns.metadata.name.unwrap();
    assert_eq!(sa.metadata.namespace.as_deref(), Some(namespace.as_str()));
    assert_eq!(ds.metadata.namespace.as_deref(), Some(namespace.as_str()));
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (
            subject.kind.as_str(),
            subject.name.as_str(),
            subject.namespace.as_deref()
        ),
        (
            "ServiceAccount",
            sa.metadata.name.as_deref().unwrap(),
            Some(namespace.as_str())
        )
    );
    assert_eq!(binding.role_ref.name, "twill");

    let spec = ds.spec.unwrap();
    let pod = spec.template.spec.unwrap();
    let labels = spec.template.metadata.unwrap().labels.unwrap();
    for (k, v) in spec.selector.match_labels.unwrap() {
        assert_eq!(labels.get(&k), Some(&v), "selector matches the template");
    }
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert!(
        pod.tolerations
            .unwrap()
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint, as kube-proxy"
    );
    let host_paths: BTreeMap<String, String> = pod
        .volumes
        .unwrap()
        .into_iter()
        .filter_map(|v| Some((v.name, v.host_path?.path)))
        .collect();
    for path in [
        "/sys/fs/bpf",
        "/run",
        "/etc/cni/net.d",
        "/opt/cni/bin",
        "/sys/fs/cgroup",
    ] {
        assert!(
            host_paths.values().any(|p| p == path),
            "hostPath {path}: {host_paths:?}"
        );
    }
    let twilld = &pod.containers[0];
    assert!(
        twilld
            .security_context
            .as_ref()
            .unwrap()
            .privileged
            .unwrap()
    );
    let env: BTreeMap<&str, &str> = twilld
        .env
        .as_ref()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e.name.as_str(),
                e.value_from
                    .as_ref()?
                    .field_ref
                    .as_ref()?
                    .field_path
                    .as_str(),
            ))
        })
        .collect();
    assert_eq!(env.get("NODE_NAME"), Some(&"spec.nodeName"));
    let mounts: Vec<&str> = twilld
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| m.mount_path.as_str())
        .collect();
    for m in ["/sys/fs/bpf", "/run", "/sys/fs/cgroup"] {
        assert!(mounts.contains(&m), "twilld mounts {m}: {mounts:?}");
    }
    let init: Vec<&str> = pod
        .init_containers
        .as_ref()
        .unwrap()
        .iter()
        .flat_map(|c| c.args.iter().flatten().map(String::as_str))
        .collect();
    assert!(init.contains(&"/opt/cni/bin/twill-cni"), "{init:?}");
    assert!(
        init.contains(&"/etc/cni/net.d/10-twill.conflist"),
        "{init:?}"
    );
}

#[test]
fn daemonset_args_and_configs_are_what_twill_reads() {
    let docs = documents();
    let ds: DaemonSet = one(&docs, "DaemonSet");
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let c = &pod.containers[0];
    let mut argv = vec!["twilld".to_string()];
    argv.extend(c.args.clone().unwrap());
    let opts = twill_agent::daemon::Options::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("DaemonSet args are not twilld flags: {e}"));
    assert!(opts.kube_subnet_mgr);
    assert_eq!(
        opts.proxy_mode,
        twill_agent::services::dataplane::ProxyMode::Ebpf
    );
    assert!(opts.services_from_kubernetes());
    assert_eq!(opts.healthz_bind_address, "0.0.0.0:10256");
    // The probes hit the health server twilld opens.
    let probe = c
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.path.as_deref(), Some("/livez"));
    assert_eq!(
        serde_json::to_value(&probe.port).unwrap(),
        serde_json::json!(10256)
    );

    let cm: ConfigMap = one(&docs, "ConfigMap");
    let data = cm.data.unwrap();
    // net-conf.json, at the path the DaemonSet passes, parses as twilld's network config.
    let mount = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == "twill-cfg")
        .unwrap();
    assert_eq!(
        opts.net_config_path,
        std::path::Path::new(&mount.mount_path).join("net-conf.json")
    );
    let cfg = twill_agent::overlay::config::NetworkConfig::parse(&data["net-conf.json"]).unwrap();
    assert_eq!(cfg.network.unwrap().to_string(), "10.244.0.0/16");
    // The conflist: each plugin's config as the runtime hands it to the plugin.
    let conflist: Value = serde_json::from_str(&data["cni-conf.json"]).unwrap();
    let plugins = conflist["plugins"].as_array().unwrap();
    assert_eq!(plugins[0]["type"], "twill-cni");
    let mut first = plugins[0].clone();
    first["cniVersion"] = conflist["cniVersion"].clone();
    first["name"] = conflist["name"].clone();
    let conf = twill_cni::config::load_conf(first.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("twill-cni refuses the conflist: {e:?}"));
    assert_eq!(conf.name, "twill");
}

/// The calls twilld makes (the requests the stand-in API server sees in tests/tests/kube.rs)
/// against the ClusterRole: every one must be granted, and nothing else that writes.
#[test]
fn cluster_role_grants_what_twilld_calls() {
    let docs = documents();
    let role: ClusterRole = one(&docs, "ClusterRole");
    let rules = role.rules.unwrap();
    let allowed = |group: &str, resource: &str, verb: &str| {
        rules.iter().any(|r| {
            r.api_groups.iter().flatten().any(|g| g == group)
                && r.resources.iter().flatten().any(|x| x == resource)
                && r.verbs.iter().any(|v| v == verb)
        })
    };
    for (group, resource, verb) in [
        ("", "nodes", "get"),
        ("", "nodes", "list"),
        ("", "nodes", "watch"),
        ("", "nodes/status", "patch"),
        ("", "services", "list"),
        ("", "services", "watch"),
        ("discovery.k8s.io", "endpointslices", "list"),
        ("discovery.k8s.io", "endpointslices", "watch"),
    ] {
        assert!(
            allowed(group, resource, verb),
            "{verb} {group}/{resource} not granted"
        );
    }
    // Least privilege: nothing that writes but the status patch.
    for r in &rules {
        for v in &r.verbs {
            assert!(
                ["get", "list", "watch"].contains(&v.as_str())
                    || (v == "patch" && r.resources.iter().flatten().all(|x| x == "nodes/status")),
                "unexpected verb {v} on {:?}",
                r.resources
            );
        }
    }
}
