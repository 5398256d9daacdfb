//! The CI smoke run of `cargo xtask bench cni` (issue 3): a `--quick`, single-repetition run of
//! twill-cni against the reference bridge + host-local, checking that the report is complete and
//! its figures are sane (finite, positive, the ones that matter present). Not a timed test:
//! whether the targets are met is for the full runs people read, not for CI.
//!
//! Privileged (namespaces, veths, bridges); needs `twilld` and `twill-cni` in `target/<profile>/`
//! (`cargo build --workspace --bins`, which `cargo xtask test` does) and Debian's
//! containernetworking-plugins. Under CI a non-root run fails. About 15 s.

use std::path::PathBuf;

use twill_tests::require_root;
use xtask::bench::{self, BenchOptions, Which};

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
fn quick_cni_run_writes_a_sane_report() {
    if !require_root() {
        return;
    }
    let out = TempDir::new("bench-cni-smoke");
    let opts = BenchOptions {
        which: Which::Cni,
        quick: true,
        reps: 1,
        out_dir: Some(out.0.clone()),
        command: "cargo xtask bench cni --quick --reps 1".into(),
        ..BenchOptions::default()
    };
    let outcome = bench::run(&opts).expect("bench cni --quick");
    assert_eq!(outcome.dir, out.0);

    for f in [
        "report.md",
        "results.json",
        "cni-latency.svg",
        "cni-concurrent.svg",
    ] {
        let path = out.0.join(f);
        let len = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .len();
        assert!(len > 100, "{} is nearly empty", path.display());
    }
    let md = std::fs::read_to_string(out.0.join("report.md")).unwrap();
    for needle in ["## CNI", "### Targets", "reference bridge + host-local"] {
        assert!(md.contains(needle), "report.md lacks {needle:?}:\n{md}");
    }

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.0.join("results.json")).unwrap()).unwrap();
    let section = &json["sections"][0];
    assert_eq!(section["name"], "cni");
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
        "cni.twill.add.p50",
        "cni.twill.add.p99",
        "cni.twill.del.p50",
        "cni.reference.add.p50",
        "cni.reference.del.p50",
        "cni.exec_floor.add.p50",
        "cni.ratio.twill.add.p50",
        "cni.twill.concurrent.add.p99",
        "cni.reference.concurrent.add.p99",
    ] {
        let v = value(name);
        assert!(v.is_finite() && v > 0.0, "{name} = {v}");
    }
    // A plugin cannot be faster than exec'ing /bin/true: if it is, the timing is broken.
    assert!(
        value("cni.twill.add.p50") > value("cni.exec_floor.add.p50"),
        "twill ADD faster than the exec floor"
    );
    let samples = &section["raw"]["sequential"]["twill"]["add_ms"];
    assert_eq!(samples.as_array().map(Vec::len), Some(10), "{samples}");
    let batch = &section["raw"]["concurrent"]["twill"]["add_ms"];
    assert_eq!(batch.as_array().map(Vec::len), Some(100), "{batch}");
}
