//! The CI smoke run of `cargo xtask bench dns`: a `--quick`, single-repetition run of twilld's
//! DNS server against dnsmasq serving the same names, checking that the report is complete and
//! its figures are sane (finite, positive). Not a timed test: whether the targets are met is for
//! the full runs people read, not for CI.
//!
//! Privileged (a rig node with etcd and twilld); needs `twilld` in `target/<profile>/`
//! (`cargo build --workspace --bins`, which `cargo xtask test` does) and Debian's dnsmasq-base
//! and dnsperf (`cargo xtask setup`). Under CI a non-root run fails. About 30 s.

mod common;

#[test]
fn quick_dns_run_writes_a_sane_report() {
    let Some(report) = common::quick_run(
        "dns --quick --reps 1",
        &[],
        &["## DNS: twilld vs dnsmasq", "### Targets", "zone held"],
    ) else {
        return;
    };
    report.require(&[
        "twilld queries/s",
        "dnsmasq queries/s",
        "twilld / dnsmasq rate",
        "twilld p99 latency",
        "dnsmasq p99 latency",
    ]);
    // Both servers answered the same query file: a rate that is a fraction of the other's
    // means one of them was not answering (queries lost, not served).
    let ratio = report.value("twilld / dnsmasq rate");
    assert!(
        (0.1..10.0).contains(&ratio),
        "twilld / dnsmasq rate {ratio}"
    );
}
