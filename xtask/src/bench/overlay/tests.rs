//! Unit tests of the schedule, the parsers and the report.

use std::collections::BTreeMap;

use super::iperf::{parse_iperf_run, stat_ticks};
use super::lease::{FakeLease, unlabel};
use super::measure::{paired_ratio, schedule};
use super::params::{LeaseSamples, Params, Plane, Samples};
use super::report::section;
use super::setup::skip_reason;
use crate::cluster::Backend;

#[test]
fn fake_leases_are_flannel_json_and_know_their_entries() {
    let l = FakeLease::new(Backend::Vxlan, 3, 17);
    assert_eq!(l.key, "/coreos.com/network/subnets/10.244.17.0-24");
    let v: serde_json::Value = serde_json::from_str(&l.value).unwrap();
    assert_eq!(v["PublicIP"], "198.18.0.33");
    assert_eq!(v["BackendData"]["VtepMAC"], "0e:74:77:00:11:01");
    assert_eq!(v["BackendData"]["VNI"], 1);
    assert_eq!(l.added.len(), 3);
    assert!(
        l.added
            .contains(&"0e:74:77:00:11:01 dev flannel.1 dst 198.18.0.33 ".to_string())
    );
    let h = FakeLease::new(Backend::HostGw, 0, 5);
    assert_eq!(
        h.value,
        r#"{"PublicIP":"198.18.0.30","BackendType":"host-gw"}"#
    );
    assert_eq!(h.added, ["10.244.5.0/24 "]);
    assert_eq!(h.deleted, ["Deleted 10.244.5.0/24 "]);
}

#[test]
fn finds_why_udp_was_refused() {
    let e = "no subnet file /x/n1/subnet.env: twilld on node 1 exited (1); \
             its log ends:\n==== twill-rig: starting twilld\nError: Backend.Type \"udp\" is \
             not available\n   31: _start";
    assert_eq!(
        skip_reason(e),
        "Error: Backend.Type \"udp\" is not available"
    );
    assert_eq!(skip_reason("boom\nmore"), "boom");
}

#[test]
fn waits_for_monitor_lines() {
    assert_eq!(unlabel("[ROUTE]10.244.5.0/24 via x"), "10.244.5.0/24 via x");
    assert_eq!(
        unlabel("10.244.5.0 dev flannel.1"),
        "10.244.5.0 dev flannel.1"
    );
}

#[test]
fn twill_runs_next_to_its_baseline() {
    use Backend::{HostGw, Udp, Vxlan};
    use Plane::{Kernel, Twill};
    let keys = [
        (Vxlan, Twill),
        (HostGw, Twill),
        (Udp, Twill),
        (Vxlan, Kernel),
        (HostGw, Kernel),
    ];
    assert_eq!(schedule(&keys, 0), [0, 3, 2, 1, 4]);
    assert_eq!(schedule(&keys, 1), [4, 1, 2, 3, 0]);
    assert_eq!(schedule(&keys, 2), [0, 3, 2, 1, 4]);
    assert_eq!(schedule(&keys[..1], 1), [0]);
    assert!((paired_ratio(&[9.0, 5.0, 10.0], &[10.0, 5.0, 8.0]) - 1.0).abs() < 1e-9);
}

#[test]
fn parses_iperf_json() {
    let ok = br#"{"end":{"sum_received":{"bits_per_second":9.5e9}}}"#;
    assert!((parse_iperf_run(ok, 0.0).unwrap().gbps - 9.5).abs() < 1e-9);
    let busy = br#"{"error":"the server is busy running a test. try again later"}"#;
    assert!(
        parse_iperf_run(busy, 0.0)
            .unwrap_err()
            .to_string()
            .contains("busy")
    );
    assert!(parse_iperf_run(b"", 0.0).is_err());
    // 5 GB in 4 s; client 50 % and server 25 % of a CPU (3 CPU-s) and the agents' 2 CPU-s:
    // 1 CPU-s per GB.
    let full = br#"{"end":{"sum_received":{"bits_per_second":1e10,"bytes":5e9,"seconds":4},
        "cpu_utilization_percent":{"host_total":50,"remote_total":25}}}"#;
    let r = parse_iperf_run(full, 2.0).unwrap();
    assert!((r.cpu_s_per_gb - 1.0).abs() < 1e-9, "{r:?}");
}

#[test]
fn reads_cpu_ticks_from_proc_stat() {
    let line = "4479 (udp worker) S 1 4479 4479 0 -1 4194560 1 0 0 0 150 27 0 0 20 0 5 0";
    assert_eq!(stat_ticks(line), Some(177));
    assert_eq!(stat_ticks("garbage"), None);
    // Our own process: some CPU time, read the same way.
    let me = std::fs::read_to_string("/proc/self/stat").unwrap();
    assert!(stat_ticks(&me).is_some());
}

#[test]
fn section_pairs_twill_with_its_baseline() {
    let setups = vec![
        ("vxlan twill".to_string(), Backend::Vxlan, Plane::Twill),
        ("udp twill".to_string(), Backend::Udp, Plane::Twill),
        ("vxlan kernel".to_string(), Backend::Vxlan, Plane::Kernel),
    ];
    let s = |g: f64| Samples {
        tcp1_gbps: vec![g, g * 1.1, g * 0.9],
        tcp2_gbps: vec![g * 2.0; 3],
        tcp1_cpu_s_per_gb: vec![10.0 / g; 3],
        tcp2_cpu_s_per_gb: vec![f64::NAN, 5.0 / g, 5.0 / g],
        ping_avg_ms: vec![0.05; 3],
        ping_p99_ms: vec![0.1; 3],
        ping_lost: 0,
        rtts_ms: vec![0.05, 0.06],
    };
    let samples: BTreeMap<String, Samples> = [
        ("vxlan twill".to_string(), s(9.8)),
        ("udp twill".to_string(), s(7.5)),
        ("vxlan kernel".to_string(), s(10.0)),
    ]
    .into();
    let leases = vec![LeaseSamples {
        backend: "vxlan".into(),
        add_ms: vec![3.0, 4.0, 50.0],
        del_ms: vec![2.0, 2.5],
        add_timeouts: 0,
        del_timeouts: 0,
    }];
    let sec = section(&setups, &samples, &leases, Params::new(true, 3), Vec::new());
    let ratio = |name: &str| sec.metrics.iter().find(|m| m.name == name).unwrap().value;
    assert!((ratio("vxlan.ratio.tcp1") - 0.98).abs() < 1e-9);
    assert!((ratio("udp.ratio.tcp1") - 0.75).abs() < 1e-9);
    assert!(sec.checks.iter().all(|c| c.pass), "{:?}", sec.checks);
    assert!((ratio("udp.ratio.tcp1_cpu") - 10.0 / 7.5 / 1.0).abs() < 1e-9);
    assert!((ratio("udp.tcp2.cpu_s_per_gb.kernel") - 0.5).abs() < 1e-9);
    assert_eq!(sec.tables[1].rows.len(), 4, "CPU cost per pair and test");
    assert_eq!(sec.tables[2].rows.len(), 12, "per repetition");
    assert_eq!(sec.tables[2].rows[0][2], "1");
    assert_eq!(sec.tables[0].rows.len(), 4);
    assert!(sec.tables[0].rows[2][3].ends_with("(VXLAN)"));
    assert_eq!(sec.plots.len(), 3);
    assert!(
        sec.metrics
            .iter()
            .all(|m| m.value.is_finite() && m.value > 0.0)
    );
}
