//! The CI smoke run of `cargo xtask bench services`: a `--quick` run over
//! every proxy mode (100 services instead of 30k, short runs) plus the hand-written nft and
//! iptables-legacy baselines, checking that the report is written and its figures are sane: every
//! metric finite and positive, and the ones that matter present for every mode. Not a timed
//! test: whether the targets are met is for the full runs people read.
//!
//! Privileged (namespaces, etcd, twilld, twill-cni and twill-probe from `target/<profile>/`):
//! under CI a non-root run fails. About 10 s per mode.

mod common;

#[test]
fn quick_services_run_writes_a_sane_report() {
    let Some(report) = common::quick_run(
        "services --mode all --quick --reps 1",
        &[
            "services-rate.svg",
            "services-connect-latency.svg",
            "services-one-change.svg",
            "services-full-sync.svg",
        ],
        &[
            "## Services",
            "### Targets",
            "nft verdict map (by hand)",
            "iptables-legacy (by hand)",
            "services-rate.svg",
        ],
    ) else {
        return;
    };
    // Every proxy mode is measured, with the figures that matter.
    for mode in ["ebpf", "nftables", "iptables"] {
        report.require(&[
            &format!("services.{mode}.vip_rate.1"),
            &format!("services.{mode}.vip_rate.100"),
            &format!("services.{mode}.direct_rate.100"),
            &format!("services.{mode}.vip_over_direct.100"),
            &format!("services.{mode}.scale_ratio"),
            &format!("services.{mode}.full_sync"),
            &format!("services.{mode}.full_sync_one_endpoint"),
            &format!("services.{mode}.change.agent.p99"),
            &format!("services.{mode}.change.e2e.p99"),
        ]);
        // A VIP that goes through a working dataplane costs about what the pod IP does: a
        // ratio far from 1 means a broken path (a timeout per connection), not noise.
        let ratio = report.value(&format!("services.{mode}.vip_over_direct.100"));
        assert!((0.2..5.0).contains(&ratio), "{mode} VIP/direct {ratio}");
    }
    report.require(&[
        "services.nft_by_hand.vip_rate.100",
        "services.iptables_legacy_by_hand.vip_rate.100",
        "services.nft_by_hand.load",
    ]);
    // eBPF switches traffic in the middle of its sync (the backend set is written first, stale
    // state is purged after): its sync of one change is shorter than the change took to reach
    // traffic. A longer one means work crept onto the update path.
    assert!(
        report.value("services.ebpf.change.agent.p50")
            <= report.value("services.ebpf.change.e2e.p50")
    );
    let raw = &report.section["raw"]["modes"][0];
    assert_eq!(raw["mode"], "ebpf");
    assert_eq!(raw["steps"].as_array().map(Vec::len), Some(3));
}
