//! Unit tests of the objects, the baselines and the report.

use std::net::Ipv4Addr;

use super::baselines::{iptables_ruleset, nft_ruleset};
use super::objects::{
    filler, filler_entries, measured, service_json, service_key, slice_json, slice_key,
};
use super::params::{ENDPOINTS, ModeOutcome, ModeResult, Params, Step};
use super::report::section;

#[test]
fn objects_parse_as_kubernetes_json() {
    let (name, vip, eps) = filler(29_999);
    assert_eq!(name, "f-29999");
    assert_eq!(vip, Ipv4Addr::new(10, 100, 117, 48));
    assert_eq!(eps.len(), ENDPOINTS);
    assert_eq!(eps[0], Ipv4Addr::new(100, 71, 82, 241));
    let svc: serde_json::Value = serde_json::from_str(&service_json(&name, vip)).unwrap();
    assert_eq!(svc["spec"]["clusterIP"], "10.100.117.48");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 8080);
    let slice: serde_json::Value = serde_json::from_str(&slice_json(&name, &eps)).unwrap();
    assert_eq!(
        slice["metadata"]["labels"]["kubernetes.io/service-name"],
        "f-29999"
    );
    assert_eq!(slice["endpoints"].as_array().unwrap().len(), ENDPOINTS);
    assert_eq!(
        service_key(&name),
        "/coreos.com/network/services/services/bench/f-29999"
    );
    assert_eq!(
        slice_key(&name),
        "/coreos.com/network/services/endpointslices/bench/f-29999-1"
    );
    // The measured services sort after every filler and have the highest VIPs.
    let (m, mvip) = measured(2);
    assert!(m.as_str() > "f-99999");
    assert!(mvip > filler(65_000).1);
    assert_eq!(filler_entries(3, 5).len(), 4);
}

#[test]
fn baseline_rulesets_put_the_measured_service_last() {
    let a = Ipv4Addr::new(10, 244, 1, 2);
    let nft = nft_ruleset(3, a);
    assert!(nft.contains("10.100.0.1 . tcp . 80 : goto s0, 10.100.0.2 . tcp . 80 : goto s1, 10.111.255.254 . tcp . 80 : goto measured"), "{nft}");
    assert!(
        nft.contains("chain measured {\n    meta l4proto tcp dnat to 10.244.1.2:8080\n  }"),
        "{nft}"
    );
    let ipt = iptables_ruleset(3, a);
    let last_rule = ipt
        .lines()
        .rfind(|l| l.starts_with("-A TWB-SERVICES"))
        .unwrap();
    assert!(last_rule.contains("10.111.255.254/32"), "{ipt}");
    assert!(ipt.ends_with("COMMIT\n"));
    assert_eq!(ipt.matches(":TWB-SVC-").count(), 3);
}

#[test]
fn unavailable_modes_are_notes_not_zeros() {
    let p = Params::new(true, 1);
    let step = |services: usize, vip: f64| Step {
        services,
        vip: vec![vip],
        direct: vec![1000.0],
        vip_measured: vec![vip * 0.9],
        direct_measured: vec![900.0],
        vip_lat_us: vec![100.0, 120.0],
        direct_lat_us: vec![90.0],
        failed: 0,
        programmed_s: None,
    };
    let ebpf = ModeResult {
        mode: "ebpf".into(),
        steps: vec![step(1, 1000.0), step(30, 990.0), step(100, 980.0)],
        after: Some(step(3, 1000.0)),
        full_sync_s: vec![0.01],
        start_to_programmed_s: vec![0.2],
        full_sync_frontends: 30.0,
        full_sync_error: None,
        full_sync_backends: 300.0,
        full_sync_one_s: vec![0.005],
        start_to_programmed_one_s: vec![0.1],
        change_agent_ms: vec![0.3, 0.4],
        change_e2e_ms: vec![2.0, 3.0],
        change_lost: 0,
        change_glitches: 0,
    };
    let outcomes = vec![
        ModeOutcome::Measured(Box::new(ebpf)),
        ModeOutcome::Unavailable {
            mode: "nftables".into(),
            reason: "twilld does not support --proxy-mode nftables".into(),
        },
    ];
    let s = section(&p, &outcomes, None, Vec::new());
    assert!(
        s.metrics
            .iter()
            .all(|m| m.value.is_finite() && m.value > 0.0),
        "{:?}",
        s.metrics
    );
    assert!(!s.metrics.iter().any(|m| m.name.contains("nftables")));
    assert!(
        s.notes
            .iter()
            .any(|n| n.starts_with("nftables: unavailable"))
    );
    assert!(
        s.tables[0]
            .rows
            .iter()
            .any(|r| r[0] == "nftables" && r[2] == "unavailable")
    );
    let scale = s
        .metrics
        .iter()
        .find(|m| m.name == "services.ebpf.scale_ratio")
        .unwrap();
    assert!((scale.value - 0.98).abs() < 1e-9);
    assert!(s.checks.iter().all(|c| c.pass), "{:?}", s.checks);
    assert_eq!(s.plots.len(), 4);
}
