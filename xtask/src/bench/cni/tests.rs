//! Unit tests of the configs, the parsers and the report.

use std::collections::HashSet;
use std::path::Path;

use serde_json::{Value, json};
use twill_facts::SubnetFacts;

use super::node::{SUBNET_FILES, configs, stdin_for};
use super::params::{Batches, Params, Plugin, Results, Samples};
use super::report::{n_f64, section};
use crate::bench::report::fmt_num;

#[test]
fn configs_name_their_own_bridges_subnets_and_state() {
    let c = configs(Path::new("/x"));
    assert_eq!(c[&Plugin::Twill]["type"], "twill-cni");
    assert_eq!(c[&Plugin::Twill]["subnetFile"], "/x/subnet-bridge.env");
    assert_eq!(c[&Plugin::Routed]["mode"], "routed");
    assert_eq!(c[&Plugin::Reference]["ipam"]["type"], "host-local");
    assert_eq!(c[&Plugin::Reference]["ipam"]["dataDir"], "/x/ipam-ref");
    let names: HashSet<&str> = c.values().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(
        names.len(),
        3,
        "each network has its own name (and IPAM directory)"
    );
    assert_ne!(c[&Plugin::Twill]["bridge"], c[&Plugin::Reference]["bridge"]);
    for (name, text) in SUBNET_FILES {
        assert!(SubnetFacts::parse(text).is_ok(), "{name}");
    }
}

#[test]
fn del_carries_the_add_result_as_prev_result() {
    let c = json!({"cniVersion": "0.4.0", "name": "n", "type": "t"});
    let plain: Value = serde_json::from_slice(&stdin_for(&c, None)).unwrap();
    assert_eq!(plain, c);
    let prev = json!({"ips": [{"address": "10.97.1.2/24"}]});
    let del: Value = serde_json::from_slice(&stdin_for(&c, Some(&prev))).unwrap();
    assert_eq!(del["prevResult"], prev);
    assert_eq!(del["name"], "n");
}

fn made_up() -> Results {
    let mut res = Results::default();
    for (pl, add, del) in [
        (Plugin::Twill, 6.0, 20.0),
        (Plugin::Routed, 7.0, 22.0),
        (Plugin::Reference, 12.0, 30.0),
        (Plugin::Floor, 3.0, 3.0),
    ] {
        res.sequential.insert(
            pl,
            Samples {
                add_ms: vec![add, add, add + 2.0],
                del_ms: vec![del, del + 1.0],
                add_cpu_ms: vec![0.0, 10.0, 0.0],
                del_cpu_ms: vec![10.0, 10.0],
            },
        );
    }
    for (pl, add) in [
        (Plugin::Twill, 30.0),
        (Plugin::Reference, 60.0),
        (Plugin::Floor, 25.0),
    ] {
        res.concurrent.insert(
            pl,
            Batches {
                add_ms: vec![add; 10],
                del_ms: vec![add * 2.0; 10],
                add_makespan_ms: vec![add * 3.0],
                del_makespan_ms: vec![add * 4.0],
                add_cpu_ms: vec![add * 10.0],
                del_cpu_ms: vec![add * 20.0],
            },
        );
    }
    res
}

#[test]
fn section_has_sane_metrics_ratios_and_checks() {
    let p = Params::new(true, 1);
    let s = section(&made_up(), p, Path::new("/nonexistent/twill-cni"));
    let value = |name: &str| {
        s.metrics
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
            .value
    };
    assert!((value("cni.ratio.twill.add.p50") - 0.5).abs() < 1e-9);
    assert!((value("cni.twill.concurrent.add.p99") - 30.0).abs() < 1e-9);
    assert!((value("cni.exec_floor.add.p50") - 3.0).abs() < 1e-9);
    assert!(
        s.metrics
            .iter()
            .all(|m| m.value.is_finite() && m.value > 0.0)
    );
    assert_eq!(s.checks.len(), 2);
    assert!(s.checks[0].pass, "0.5 meets <= 0.5");
    assert!(!s.checks[1].pass, "30 ms misses <= 20 ms");
    // 10 calls of 3 ms CPU each: the 99th cannot finish before 0.99 × 100 × 3 / cpus.
    let bound = fmt_num(0.99 * 100.0 * 3.0 / n_f64(p.cpus));
    assert!(
        s.notes
            .iter()
            .any(|n| n.contains("Concurrent target") && n.contains(&format!("= {bound} ms"))),
        "{:?}",
        s.notes
    );
    assert!((value("cni.twill.concurrent.add.cpu_per_call") - 3.0).abs() < 1e-9);
    assert_eq!(s.tables[0].rows.len(), 4);
    assert_eq!(s.tables[1].rows.len(), 3);
    assert_eq!(s.plots.len(), 2);
}

#[test]
fn quick_is_smaller_but_keeps_the_target_concurrency() {
    let q = Params::new(true, 3);
    let f = Params::new(false, 3);
    assert!(q.pods < f.pods);
    assert_eq!(q.concurrency, 100);
    assert_eq!(f.concurrency, 100);
}
