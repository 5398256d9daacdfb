//! The CI smoke run of the benchmarks (issue: rig and benchmark report): a `--quick` overlay run
//! through twill's VXLAN against the hand-built kernel VXLAN, checking that the report
//! directory is complete and its numbers are sane (no zero, no NaN). Not a timed test: whether
//! the targets are met is for the full runs people read, not for CI.
//!
//! Privileged (namespaces, etcd, twilld from `target/<profile>/`): under CI a non-root run
//! fails. About 30 s.

use std::path::PathBuf;

use twill_tests::require_root;
use xtask::bench::{self, Backend, BenchOptions, Which};

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
fn quick_overlay_run_writes_a_sane_report() {
    if !require_root() {
        return;
    }
    let out = TempDir::new("bench-smoke");
    let opts = BenchOptions {
        which: Which::Overlay,
        backends: vec![Backend::Vxlan],
        quick: true,
        reps: 3,
        out_dir: Some(out.0.clone()),
        bin_dir: None,
        command: "cargo xtask bench overlay --backend vxlan --quick".into(),
        ..BenchOptions::default()
    };
    let outcome = bench::run(&opts).expect("bench overlay --quick");
    assert_eq!(outcome.dir, out.0);

    // The files are there.
    for f in [
        "report.md",
        "results.json",
        "overlay-throughput.svg",
        "overlay-ping.svg",
        "overlay-lease.svg",
    ] {
        let path = out.0.join(f);
        let len = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .len();
        assert!(len > 100, "{} is nearly empty", path.display());
    }
    let md = std::fs::read_to_string(out.0.join("report.md")).unwrap();
    for needle in [
        "## Machine",
        "## Reproduce",
        "### Targets",
        "overlay-throughput.svg",
    ] {
        assert!(md.contains(needle), "report.md lacks {needle:?}:\n{md}");
    }

    // results.json: every headline figure is finite and positive, and the ones that matter
    // are present.
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.0.join("results.json")).unwrap()).unwrap();
    let section = &json["sections"][0];
    assert_eq!(section["name"], "overlay");
    let metrics = section["metrics"].as_array().expect("metrics");
    let value = |name: &str| -> f64 {
        metrics
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no metric {name} in {metrics:?}"))["value"]
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    for m in metrics {
        let v = m["value"].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v > 0.0, "insane figure {m}");
    }
    for name in [
        "vxlan.twill.tcp1.median",
        "vxlan.kernel.tcp1.median",
        "vxlan.twill.tcp2.median",
        "vxlan.twill.ping_avg.median",
        "vxlan.ratio.tcp1",
        "vxlan.ratio.tcp2",
        "vxlan.lease.add.p99",
        "vxlan.lease.delete.p50",
    ] {
        let v = value(name);
        assert!(v.is_finite() && v > 0.0, "{name} = {v}");
    }
    // A ratio far from 1 means a broken rig (a path through the wrong device), not noise.
    let ratio = value("vxlan.ratio.tcp1");
    assert!((0.2..5.0).contains(&ratio), "twill/kernel ratio {ratio}");
    let samples = &section["raw"]["configurations"]["vxlan twill"]["tcp1_gbps"];
    assert_eq!(samples.as_array().map(Vec::len), Some(3), "{samples}");
}
