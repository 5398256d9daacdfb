//! The CI smoke run of `cargo xtask bench cni`: a `--quick`, single-repetition run of
//! twill-cni against the reference bridge + host-local, checking that the report is complete and
//! its figures are sane (finite, positive, the ones that matter present). Not a timed test:
//! whether the targets are met is for the full runs people read, not for CI.
//!
//! Privileged (namespaces, veths, bridges); needs `twilld` and `twill-cni` in `target/<profile>/`
//! (`cargo build --workspace --bins`, which `cargo xtask test` does) and Debian's
//! containernetworking-plugins. Under CI a non-root run fails. About 15 s.

mod common;

#[test]
fn quick_cni_run_writes_a_sane_report() {
    let Some(report) = common::quick_run(
        "cni --quick --reps 1",
        &["cni-latency.svg", "cni-concurrent.svg"],
        &["## CNI", "### Targets", "reference bridge + host-local"],
    ) else {
        return;
    };
    report.require(&[
        "cni.twill.add.p50",
        "cni.twill.add.p99",
        "cni.twill.del.p50",
        "cni.reference.add.p50",
        "cni.reference.del.p50",
        "cni.exec_floor.add.p50",
        "cni.ratio.twill.add.p50",
        "cni.twill.concurrent.add.p99",
        "cni.reference.concurrent.add.p99",
    ]);
    // A plugin cannot be faster than exec'ing /bin/true: if it is, the timing is broken.
    assert!(
        report.value("cni.twill.add.p50") > report.value("cni.exec_floor.add.p50"),
        "twill ADD faster than the exec floor"
    );
    let samples = &report.section["raw"]["sequential"]["twill"]["add_ms"];
    assert_eq!(samples.as_array().map(Vec::len), Some(10), "{samples}");
    let batch = &report.section["raw"]["concurrent"]["twill"]["add_ms"];
    assert_eq!(batch.as_array().map(Vec::len), Some(100), "{batch}");
}
