//! The CI smoke run of `cargo xtask bench control-plane` (issue 7): a `--quick` run (50 nodes'
//! leases and 100 services × 10 endpoints into one twilld, two repetitions), checking that the
//! report is written and its figures are sane, and that twilld really programmed every peer and
//! every service, on the VXLAN backend with the eBPF proxy (as the full benchmark).
//!
//! Privileged: under CI a non-root run fails. About 10 s.

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
fn quick_control_plane_run_writes_a_sane_report() {
    if !require_root() {
        return;
    }
    let out = TempDir::new("bench-control-plane-smoke");
    let opts = BenchOptions {
        which: Which::ControlPlane,
        backends: vec![Backend::Vxlan],
        quick: true,
        reps: 2,
        out_dir: Some(out.0.clone()),
        command: "cargo xtask bench control-plane --backend vxlan --quick --reps 2".into(),
        ..BenchOptions::default()
    };
    let outcome = bench::run(&opts).expect("bench control-plane --quick");
    assert_eq!(outcome.dir, out.0);
    for f in ["report.md", "results.json", "control-plane-lease.svg"] {
        let path = out.0.join(f);
        let len = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .len();
        assert!(len > 100, "{} is nearly empty", path.display());
    }
    let md = std::fs::read_to_string(out.0.join("report.md")).unwrap();
    for needle in ["## Control plane", "### Targets", "VmHWM", "Cilium"] {
        assert!(md.contains(needle), "report.md lacks {needle:?}:\n{md}");
    }

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.0.join("results.json")).unwrap()).unwrap();
    let section = &json["sections"][0];
    assert_eq!(section["name"], "control-plane");
    let metrics = section["metrics"].as_array().expect("metrics");
    for m in metrics {
        let v = m["value"].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v > 0.0, "insane figure {m}");
    }
    for name in [
        "control_plane.programmed",
        "control_plane.overlay_programmed",
        "control_plane.services_programmed",
        "control_plane.vm_hwm",
        "control_plane.lease.add.p99",
    ] {
        assert!(
            metrics.iter().any(|m| m["name"] == name),
            "no metric {name} in {metrics:?}"
        );
    }
    let reps = section["raw"]["repetitions"]
        .as_array()
        .expect("repetitions");
    assert_eq!(reps.len(), 2);
    for r in reps {
        assert_eq!(r["routes"], 49, "{r}");
        assert_eq!(r["frontends"], 100.0, "{r}");
        assert_eq!(r["backends"], 1000.0, "{r}");
        assert_eq!(r["lease_timeouts"], 0, "{r}");
        // Programmed after twilld started, and not before its lease and list round trips.
        let t = r["programmed_s"].as_f64().unwrap();
        assert!(t > 0.001 && t < 60.0, "{r}");
    }
}
