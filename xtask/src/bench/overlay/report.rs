//! The report section: tables, targets, plots, raw samples.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use super::measure::{baseline_of, paired_ratio};
use super::params::{
    LEASE_DEADLINE, LEASE_P99_TARGET_MS, LeaseSamples, Params, Plane, Samples, Test, target,
};
use crate::bench::plot::{Bar, BarChart, BarSeries, CdfChart, Plot};
use crate::bench::report::{Check, Metric, Section, Table, fmt_num};
use crate::bench::stats::{Summary, median, sorted};
use crate::cluster::Backend;

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

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

pub(crate) fn bar(v: &[f64]) -> Option<Bar> {
    let s = sorted(v);
    Some(Bar {
        value: median(v),
        low: *s.first()?,
        high: *s.last()?,
    })
}

/// The report section: tables, targets, plots, raw samples.
pub(crate) fn section(
    setups: &[(String, Backend, Plane)],
    samples: &BTreeMap<String, Samples>,
    leases: &[LeaseSamples],
    p: Params,
    mut notes: Vec<String>,
) -> Section {
    let mut metrics = Vec::new();
    let mut checks = Vec::new();
    let metric = |metrics: &mut Vec<Metric>, name: String, unit: &str, value: f64| {
        metrics.push(Metric {
            name,
            unit: unit.into(),
            value,
        });
    };
    for (label, ..) in setups {
        let Some(s) = samples.get(label) else {
            continue;
        };
        let key = label.replace(' ', ".");
        metric(
            &mut metrics,
            format!("{key}.tcp1.median"),
            "Gbit/s",
            median(&s.tcp1_gbps),
        );
        metric(
            &mut metrics,
            format!("{key}.tcp2.median"),
            "Gbit/s",
            median(&s.tcp2_gbps),
        );
        metric(
            &mut metrics,
            format!("{key}.ping_avg.median"),
            "ms",
            median(&s.ping_avg_ms),
        );
        metric(
            &mut metrics,
            format!("{key}.ping_p99.median"),
            "ms",
            median(&s.ping_p99_ms),
        );
        if s.ping_lost > 0 {
            notes.push(format!("{label}: {} ping(s) lost", s.ping_lost));
        }
    }

    // Pairs: each twill configuration with its kernel baseline (udp's is kernel VXLAN).
    let mut tput = Table {
        title: "Pod-to-pod TCP throughput, Gbit/s (median [min–max] of the repetitions)".into(),
        header: [
            "backend",
            "test",
            "twill",
            "kernel baseline",
            "twill/kernel",
            "target",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    let mut lat = Table {
        title: format!(
            "Pod-to-pod ping RTT, ms ({} pings {} ms apart per repetition; median of the \
             repetitions' mean and p99)",
            p.ping_count, p.ping_interval_ms
        ),
        header: [
            "backend",
            "twill avg",
            "kernel avg",
            "twill p99",
            "kernel p99",
            "avg twill/kernel",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    let mut cpu = Table {
        title: "CPU cost per GB moved, CPU-seconds (iperf3 client + server + twilld on both \
                nodes; the kernel's forwarding work counts where it runs; median [min–max] of \
                the repetitions)"
            .into(),
        header: [
            "backend",
            "test",
            "twill",
            "kernel baseline",
            "twill/kernel",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    let mut reps = Table {
        title: "Per repetition: throughput (Gbit/s) and CPU cost (CPU-s/GB), twill next to its \
                baseline"
            .into(),
        header: [
            "backend",
            "test",
            "rep",
            "twill Gbit/s",
            "kernel Gbit/s",
            "ratio",
            "twill CPU-s/GB",
            "kernel CPU-s/GB",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
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
                metric(
                    &mut metrics,
                    format!("{backend}.{short}.cpu_s_per_gb.twill"),
                    "CPU-s/GB",
                    median(&tc),
                );
                metric(
                    &mut metrics,
                    format!("{backend}.{short}.cpu_s_per_gb.kernel"),
                    "CPU-s/GB",
                    median(&kc),
                );
                metric(
                    &mut metrics,
                    format!("{backend}.ratio.{short}_cpu"),
                    "ratio",
                    cost,
                );
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
            metric(
                &mut metrics,
                format!(
                    "{backend}.ratio.{}",
                    if test == Test::Tcp1 { "tcp1" } else { "tcp2" }
                ),
                "ratio",
                ratio,
            );
            checks.push(Check::at_least(what, ratio, target(*backend)));
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
            twill_bars.push(bar(tv));
            kernel_bars.push(bar(kv));
        }
        let ratio = paired_ratio(&t.ping_avg_ms, &k.ping_avg_ms);
        metric(
            &mut metrics,
            format!("{backend}.ratio.ping_avg"),
            "ratio",
            ratio,
        );
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

    let mut lease_table = Table {
        title: format!(
            "Lease written in etcd → programmed on node 1, ms ({} leases one at a time)",
            p.leases
        ),
        header: [
            "backend",
            "add p50",
            "add p99",
            "add max",
            "delete p50",
            "delete p99",
            "delete max",
            "timeouts",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
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
            metric(&mut metrics, format!("{}.lease.{name}", l.backend), "ms", v);
        }
        checks.push(Check::at_most(
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
            notes.push(format!(
                "{}: {} add and {} delete timeouts (> {LEASE_DEADLINE:?}), counted as {} ms",
                l.backend,
                l.add_timeouts,
                l.del_timeouts,
                ms(LEASE_DEADLINE)
            ));
        }
    }

    let mut plots = Vec::new();
    if !groups.is_empty() {
        plots.push(Plot::Bars(BarChart {
            file: "overlay-throughput.svg".into(),
            title: "Pod-to-pod TCP throughput (iperf3 -P1/-P2; labels: twill/kernel ratio)".into(),
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
        }));
    }
    let rtt_series: Vec<(String, Vec<f64>)> = setups
        .iter()
        .filter_map(|(label, ..)| Some((label.clone(), samples.get(label)?.rtts_ms.clone())))
        .collect();
    if !rtt_series.is_empty() {
        plots.push(Plot::Cdf(CdfChart {
            file: "overlay-ping.svg".into(),
            title: "Pod-to-pod ping RTT distribution".into(),
            x_label: "RTT, ms (log scale)".into(),
            series: rtt_series,
        }));
    }
    if !leases.is_empty() {
        let mut series = Vec::new();
        for l in leases {
            series.push((format!("{} add", l.backend), l.add_ms.clone()));
            series.push((format!("{} delete", l.backend), l.del_ms.clone()));
        }
        plots.push(Plot::Cdf(CdfChart {
            file: "overlay-lease.svg".into(),
            title: "Lease written in etcd → node programmed".into(),
            x_label: "latency, ms (log scale)".into(),
            series,
        }));
    }

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
        name: "overlay".into(),
        title: "Overlay: pod-to-pod throughput and latency, lease-to-programmed".into(),
        about,
        metrics,
        tables: [tput, cpu, reps, lat, lease_table]
            .into_iter()
            .filter(|t| !t.rows.is_empty())
            .collect(),
        checks,
        notes,
        plot_files: Vec::new(),
        plots,
        raw: serde_json::json!({
            "params": p,
            "configurations": samples,
            "leases": leases,
        }),
    }
}
