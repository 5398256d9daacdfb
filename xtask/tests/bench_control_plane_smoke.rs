//! The CI smoke run of `cargo xtask bench control-plane`: a `--quick` run (50 nodes'
//! leases and 100 services × 10 endpoints into one twilld, two repetitions), checking that the
//! report is written and its figures are sane, and that twilld really programmed every peer and
//! every service, on the VXLAN backend with the eBPF proxy (as the full benchmark).
//!
//! Privileged: under CI a non-root run fails. About 10 s.

mod common;

#[test]
fn quick_control_plane_run_writes_a_sane_report() {
    let Some(report) = common::quick_run(
        "control-plane --backend vxlan --quick --reps 2",
        &["control-plane-lease.svg"],
        &[
            "## Control plane",
            "### Targets",
            "VmHWM",
            "Cilium",
            // The reproduce line keeps the backend.
            "cargo xtask bench control-plane --backend vxlan --quick --reps 2",
        ],
    ) else {
        return;
    };
    report.require(&[
        "control_plane.programmed",
        "control_plane.overlay_programmed",
        "control_plane.services_programmed",
        "control_plane.vm_hwm",
        "control_plane.lease.add.p99",
    ]);
    let reps = report.section["raw"]["repetitions"]
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
