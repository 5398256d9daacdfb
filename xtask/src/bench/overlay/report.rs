//! The report section: tables, targets, plots, raw samples.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::measure::{baseline_of, paired_ratio};
use super::params::{
    LEASE_DEADLINE, LEASE_P99_TARGET_MS, LeaseSamples, Params, Plane, Samples, Test, target,
};
use crate::bench::plot::{Bar, BarChart, BarSeries, Chart, Plot};
use crate::bench::report::{Check, Section, Table, fmt_num};
use crate::bench::stats::{Summary, median, ms, sorted};
use crate::cluster::Backend;

/// "9.81 [9.5–10.1]": the median and the repetitions' range.
pub(crate) fn med_range(v: &[f64]) -> String {
    let s = sorted(v);
    match (s.first(), s.last()) {
        (Some(lo), Some(hi)) if s.len() > 1 => {
            format!("{} [{}–{}]", fmt_num(median(v)), fmt_num(*lo), fmt_num(*hi))
        }
        _ => fmt_num(median(v)),
    }
}

/// The report section: tables, targets, plots, raw samples.
pub(crate) fn section(
    setups: &[(String, Backend, Plane)],
    samples: &BTreeMap<String, Samples>,
    leases: &[LeaseSamples],
    p: Params,
    notes: Vec<String>,
) -> Section {
    let mut sec = Section::new(
        "overlay",
        "Overlay: pod-to-pod throughput and latency, lease-to-programmed",
    );
    sec.notes = notes;
    for (label, ..) in setups {
        let Some(s) = samples.get(label) else {
            continue;
        };
        let key = label.replace(' ', ".");
        for (name, unit, v) in [
            ("tcp1", "Gbit/s", &s.tcp1_gbps),
            ("tcp2", "Gbit/s", &s.tcp2_gbps),
            ("ping_avg", "ms", &s.ping_avg_ms),
            ("ping_p99", "ms", &s.ping_p99_ms),
        ] {
            sec.metric(format!("{key}.{name}.median"), unit, median(v));
        }
        if s.ping_lost > 0 {
            sec.notes
                .push(format!("{label}: {} ping(s) lost", s.ping_lost));
        }
    }

    // Pairs: each twill configuration with its kernel baseline (udp's is kernel VXLAN).
    let mut tput = Table::new(
        "Pod-to-pod TCP throughput, Gbit/s (median [min–max] of the repetitions)",
        &[
            "backend",
            "test",
            "twill",
            "kernel baseline",
            "twill/kernel",
            "target",
        ],
    );
    let mut lat = Table::new(
        format!(
            "Pod-to-pod ping RTT, ms ({} pings {} ms apart per repetition; median of the \
             repetitions' mean and p99)",
            p.ping_count, p.ping_interval_ms
        ),
        &[
            "backend",
            "twill avg",
            "kernel avg",
            "twill p99",
            "kernel p99",
            "avg twill/kernel",
        ],
    );
    let mut cpu = Table::new(
        "CPU cost per GB moved, CPU-seconds (iperf3 client + server + twilld on both \
         nodes; the kernel's forwarding work counts where it runs; median [min–max] of \
         the repetitions)",
        &[
            "backend",
            "test",
            "twill",
            "kernel baseline",
            "twill/kernel",
        ],
    );
    let mut reps = Table::new(
        "Per repetition: throughput (Gbit/s) and CPU cost (CPU-s/GB), twill next to its \
         baseline",
        &[
            "backend",
            "test",
            "rep",
            "twill Gbit/s",
            "kernel Gbit/s",
            "ratio",
            "twill CPU-s/GB",
            "kernel CPU-s/GB",
        ],
    );
    let mut groups = Vec::new();
    let mut twill_bars = Vec::new();
    let mut kernel_bars = Vec::new();
    for (label, backend, plane) in setups {
        if *plane != Plane::Twill {
            continue;
        }
        let base_backend = baseline_of(*backend);
        let base_label = format!("{base_backend} kernel");
        let (Some(t), Some(k)) = (samples.get(label), samples.get(&base_label)) else {
            continue;
        };
        let base_name = if *backend == Backend::Udp {
            "kernel VXLAN".to_string()
        } else {
            "kernel".to_string()
        };
        for (test, tv, kv, tc, kc) in [
            (
                Test::Tcp1,
                &t.tcp1_gbps,
                &k.tcp1_gbps,
                &t.tcp1_cpu_s_per_gb,
                &k.tcp1_cpu_s_per_gb,
            ),
            (
                Test::Tcp2,
                &t.tcp2_gbps,
                &k.tcp2_gbps,
                &t.tcp2_cpu_s_per_gb,
                &k.tcp2_cpu_s_per_gb,
            ),
        ] {
            let short = if test == Test::Tcp1 { "tcp1" } else { "tcp2" };
            let tc: Vec<f64> = tc.iter().copied().filter(|v| v.is_finite()).collect();
            let kc: Vec<f64> = kc.iter().copied().filter(|v| v.is_finite()).collect();
            if !tc.is_empty() && !kc.is_empty() {
                let cost = paired_ratio(&tc, &kc);
                for (name, unit, v) in [
                    ("cpu_s_per_gb.twill", "CPU-s/GB", median(&tc)),
                    ("cpu_s_per_gb.kernel", "CPU-s/GB", median(&kc)),
                ] {
                    sec.metric(format!("{backend}.{short}.{name}"), unit, v);
                }
                sec.metric(format!("{backend}.ratio.{short}_cpu"), "ratio", cost);
                cpu.rows.push(vec![
                    backend.to_string(),
                    test.label().into(),
                    med_range(&tc),
                    med_range(&kc),
                    format!("{cost:.3}"),
                ]);
            }
            let cell =
                |v: &Vec<f64>, i: usize| v.get(i).map_or_else(|| "-".into(), |x| fmt_num(*x));
            let (tca, kca) = if test == Test::Tcp1 {
                (&t.tcp1_cpu_s_per_gb, &k.tcp1_cpu_s_per_gb)
            } else {
                (&t.tcp2_cpu_s_per_gb, &k.tcp2_cpu_s_per_gb)
            };
            for (i, (a, b)) in tv.iter().zip(kv.iter()).enumerate() {
                reps.rows.push(vec![
                    backend.to_string(),
                    test.label().into(),
                    (i + 1).to_string(),
                    fmt_num(*a),
                    fmt_num(*b),
                    format!("{:.3}", a / b),
                    cell(tca, i),
                    cell(kca, i),
                ]);
            }
            let ratio = paired_ratio(tv, kv);
            let what = format!("{backend} {} twill/{base_name}", test.label());
            sec.metric(format!("{backend}.ratio.{short}"), "ratio", ratio);
            sec.checks
                .push(Check::at_least(what, ratio, target(*backend)));
            tput.rows.push(vec![
                backend.to_string(),
                test.label().into(),
                med_range(tv),
                if *backend == Backend::Udp {
                    format!("{} (VXLAN)", med_range(kv))
                } else {
                    med_range(kv)
                },
                format!("{ratio:.3}"),
                format!(">= {}", target(*backend)),
            ]);
            let streams = if test == Test::Tcp1 { 1 } else { 2 };
            groups.push(format!("{backend} -P{streams}: {ratio:.3}"));
            twill_bars.push(Bar::of(tv));
            kernel_bars.push(Bar::of(kv));
        }
        let ratio = paired_ratio(&t.ping_avg_ms, &k.ping_avg_ms);
        sec.metric(format!("{backend}.ratio.ping_avg"), "ratio", ratio);
        lat.rows.push(vec![
            if *backend == Backend::Udp {
                "udp (kernel: VXLAN)".to_string()
            } else {
                backend.to_string()
            },
            fmt_num(median(&t.ping_avg_ms)),
            fmt_num(median(&k.ping_avg_ms)),
            fmt_num(median(&t.ping_p99_ms)),
            fmt_num(median(&k.ping_p99_ms)),
            format!("{ratio:.3}"),
        ]);
    }

    let mut lease_table = Table::new(
        format!(
            "Lease written in etcd → programmed on node 1, ms ({} leases one at a time)",
            p.leases
        ),
        &[
            "backend",
            "add p50",
            "add p99",
            "add max",
            "delete p50",
            "delete p99",
            "delete max",
            "timeouts",
        ],
    );
    for l in leases {
        let add = Summary::of(&l.add_ms);
        let del = Summary::of(&l.del_ms);
        for (name, v) in [
            ("add.p50", add.p50),
            ("add.p99", add.p99),
            ("add.max", add.max),
            ("delete.p50", del.p50),
            ("delete.p99", del.p99),
        ] {
            sec.metric(format!("{}.lease.{name}", l.backend), "ms", v);
        }
        sec.checks.push(Check::at_most(
            format!("{} lease→programmed p99", l.backend),
            add.p99,
            LEASE_P99_TARGET_MS,
            "ms",
        ));
        lease_table.rows.push(vec![
            l.backend.clone(),
            fmt_num(add.p50),
            fmt_num(add.p99),
            fmt_num(add.max),
            fmt_num(del.p50),
            fmt_num(del.p99),
            fmt_num(del.max),
            format!("{} / {}", l.add_timeouts, l.del_timeouts),
        ]);
        if l.add_timeouts + l.del_timeouts > 0 {
            sec.notes.push(format!(
                "{}: {} add and {} delete timeouts (> {LEASE_DEADLINE:?}), counted as {} ms",
                l.backend,
                l.add_timeouts,
                l.del_timeouts,
                ms(LEASE_DEADLINE)
            ));
        }
    }

    if !groups.is_empty() {
        sec.plots.push(Plot::new(
            "overlay-throughput.svg",
            "Pod-to-pod TCP throughput (iperf3 -P1/-P2; labels: twill/kernel ratio)",
            Chart::Bars(BarChart {
                y_label: "Gbit/s (median; whiskers: min–max of repetitions)".into(),
                groups,
                series: vec![
                    BarSeries {
                        name: "twill".into(),
                        values: twill_bars,
                    },
                    BarSeries {
                        name: if setups.iter().any(|(_, b, _)| *b == Backend::Udp) {
                            "kernel baseline (udp: kernel VXLAN)".into()
                        } else {
                            "kernel baseline".into()
                        },
                        values: kernel_bars,
                    },
                ],
            }),
        ));
    }
    let rtt_series: Vec<(String, Vec<f64>)> = setups
        .iter()
        .filter_map(|(label, ..)| Some((label.clone(), samples.get(label)?.rtts_ms.clone())))
        .collect();
    sec.cdf(
        "overlay-ping.svg",
        "Pod-to-pod ping RTT distribution",
        "RTT, ms (log scale)",
        rtt_series,
    );
    let mut lease_series = Vec::new();
    for l in leases {
        lease_series.push((format!("{} add", l.backend), l.add_ms.clone()));
        lease_series.push((format!("{} delete", l.backend), l.del_ms.clone()));
    }
    sec.cdf(
        "overlay-lease.svg",
        "Lease written in etcd → node programmed",
        "latency, ms (log scale)",
        lease_series,
    );

    let mut about = String::new();
    let _ = write!(
        about,
        "Two nodes with a pod each, per configuration: twill (etcd, `twilld` on both nodes) and \
         the same rig built by hand — flannel's VXLAN recipe (`flannel.1`, a route, a permanent \
         neighbour and an FDB entry per peer) or host-gw's `ip route add <peer subnet> via \
         <peer node>` — with the same subnets, MTU and pod layout. Per repetition ({} in all), \
         each test runs on every configuration back to back: `iperf3 -c <pod> -t {}` with 1 \
         and 2 streams, then `ping -c {} -i 0.{:03}`, twill next to its baseline. Figures are \
         medians of the repetitions; a ratio is the median of the repetitions' paired ratios \
         (twill over the baseline measured right next to it). udp is compared with kernel VXLAN.\n\n\
         Lease-to-programmed: with `twilld` running, {} fake peer leases (flannel's JSON) are \
         written one at a time through etcd's HTTP gateway; the clock stops when `ip monitor` / \
         `bridge monitor` in node 1 has reported the route (and, for VXLAN, the neighbour and \
         FDB entry). Then the leases are deleted one at a time, timed to the route's removal.",
        p.reps, p.iperf_secs, p.ping_count, p.ping_interval_ms, p.leases
    );

    Section {
        about,
        tables: [tput, cpu, reps, lat, lease_table]
            .into_iter()
            .filter(|t| !t.rows.is_empty())
            .collect(),
        raw: serde_json::json!({
            "params": p,
            "configurations": samples,
            "leases": leases,
        }),
        ..sec
    }
}
