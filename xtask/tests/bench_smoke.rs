//! The CI smoke run of the benchmarks and their report: a `--quick` overlay run
//! through twill's VXLAN against the hand-built kernel VXLAN, checking that the report
//! directory is complete and its numbers are sane (no zero, no NaN). Not a timed test: whether
//! the targets are met is for the full runs people read, not for CI.
//!
//! Privileged (namespaces, etcd, twilld from `target/<profile>/`): under CI a non-root run
//! fails. About 30 s.

mod common;

#[test]
fn quick_overlay_run_writes_a_sane_report() {
    let Some(report) = common::quick_run(
        "overlay --backend vxlan --quick",
        &[
            "overlay-throughput.svg",
            "overlay-ping.svg",
            "overlay-lease.svg",
        ],
        &[
            "## Machine",
            "## Reproduce",
            "### Targets",
            "overlay-throughput.svg",
        ],
    ) else {
        return;
    };
    report.require(&[
        "vxlan.twill.tcp1.median",
        "vxlan.kernel.tcp1.median",
        "vxlan.twill.tcp2.median",
        "vxlan.twill.ping_avg.median",
        "vxlan.ratio.tcp1",
        "vxlan.ratio.tcp2",
        "vxlan.lease.add.p99",
        "vxlan.lease.delete.p50",
    ]);
    // A ratio far from 1 means a broken rig (a path through the wrong device), not noise.
    let ratio = report.value("vxlan.ratio.tcp1");
    assert!((0.2..5.0).contains(&ratio), "twill/kernel ratio {ratio}");
    let samples = &report.section["raw"]["configurations"]["vxlan twill"]["tcp1_gbps"];
    assert_eq!(samples.as_array().map(Vec::len), Some(3), "{samples}");
}
