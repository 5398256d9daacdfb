//! The CI smoke run of `cargo xtask bench services` (issues 4, 5 and 7): a `--quick` run over
//! every proxy mode (100 services instead of 30k, short runs) plus the hand-written nft and
//! iptables-legacy baselines, checking that the report is written and its figures are sane: every
//! metric finite and positive, the ones that matter present for eBPF, and a mode twilld does not
//! accept reported "unavailable" with a reason — never as a zero. Not a timed test: whether the
//! targets are met is for the full runs people read.
//!
//! Privileged (namespaces, etcd, twilld, twill-cni and twill-probe from `target/<profile>/`):
//! under CI a non-root run fails. About 10 s per mode.

use std::path::PathBuf;

use twill_tests::require_root;
use xtask::bench::{self, BenchOptions, Which};
use xtask::cluster::ProxyMode;

/// A fresh directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("xtask-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn quick_services_run_writes_a_sane_report() {
    if !require_root() {
        return;
    }
    let out = TempDir::new("bench-services-smoke");
    let opts = BenchOptions {
        which: Which::Services,
        modes: ProxyMode::SERVICE_MODES.to_vec(),
        quick: true,
        reps: 1,
        out_dir: Some(out.0.clone()),
        command: "cargo xtask bench services --mode all --quick --reps 1".into(),
        ..BenchOptions::default()
    };
    let outcome = bench::run(&opts).expect("bench services --quick");
    assert_eq!(outcome.dir, out.0);

    for f in [
        "report.md",
        "results.json",
        "services-rate.svg",
        "services-connect-latency.svg",
        "services-one-change.svg",
        "services-full-sync.svg",
    ] {
        let path = out.0.join(f);
        let len = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .len();
        assert!(len > 100, "{} is nearly empty", path.display());
    }
    let md = std::fs::read_to_string(out.0.join("report.md")).unwrap();
    for needle in [
        "## Services",
        "### Targets",
        "nft verdict map (by hand)",
        "iptables-legacy (by hand)",
        "services-rate.svg",
    ] {
        assert!(md.contains(needle), "report.md lacks {needle:?}:\n{md}");
    }

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.0.join("results.json")).unwrap()).unwrap();
    let section = &json["sections"][0];
    assert_eq!(section["name"], "services");
    let metrics = section["metrics"].as_array().expect("metrics");
    for m in metrics {
        let v = m["value"].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v > 0.0, "insane figure {m}");
    }
    let value = |name: &str| -> f64 {
        metrics
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no metric {name} in {metrics:?}"))["value"]
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    for name in [
        "services.ebpf.vip_rate.1",
        "services.ebpf.vip_rate.100",
        "services.ebpf.direct_rate.100",
        "services.ebpf.vip_over_direct.100",
        "services.ebpf.scale_ratio",
        "services.ebpf.full_sync",
        "services.ebpf.change.agent.p99",
        "services.ebpf.change.e2e.p99",
        "services.nft_by_hand.vip_rate.100",
        "services.iptables_legacy_by_hand.vip_rate.100",
        "services.nft_by_hand.load",
    ] {
        let v = value(name);
        assert!(v.is_finite() && v > 0.0, "{name} = {v}");
    }
    // A VIP that goes through a working dataplane costs about what the pod IP does: a ratio far
    // from 1 means a broken path (a timeout per connection), not noise.
    let ratio = value("services.ebpf.vip_over_direct.100");
    assert!((0.2..5.0).contains(&ratio), "ebpf VIP/direct {ratio}");
    // The agent's sync of one change cannot take longer than the change took to reach traffic.
    assert!(value("services.ebpf.change.agent.p50") <= value("services.ebpf.change.e2e.p50"));

    // Every mode is either measured or said to be unavailable, with twilld's reason.
    let notes: Vec<&str> = section["notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str())
        .collect();
    for mode in ["ebpf", "nftables", "iptables"] {
        let measured = metrics
            .iter()
            .any(|m| m["name"] == format!("services.{mode}.vip_rate.100").as_str());
        let unavailable = notes
            .iter()
            .any(|n| n.starts_with(&format!("{mode}: unavailable")) && n.contains("--proxy-mode"));
        assert!(
            measured != unavailable,
            "{mode}: measured {measured}, unavailable {unavailable}; notes {notes:?}"
        );
    }
    let raw = &section["raw"]["modes"][0];
    assert_eq!(raw["mode"], "ebpf");
    assert_eq!(raw["steps"].as_array().map(Vec::len), Some(3));
}
