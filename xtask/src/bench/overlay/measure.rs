//! The repetitions: every configuration back to back, per test, paired.

use std::collections::BTreeMap;

use anyhow::Result;
use twill_tests::bench_support::ping_rtts;

use super::iperf::iperf;
use super::params::{PING_INTERVAL, Params, Plane, Samples, Test};
use super::setup::Setup;
use crate::bench::report::fmt_num;
use crate::bench::stats::{median, percentile};
use crate::cluster::Backend;

/// The repetitions: per repetition, per test, every configuration back to back.
///
/// A failure is an error, except on udp (a backend still being written): that configuration is
/// dropped from the run with a note, and the others go on.
pub(crate) fn measure(
    setups: &[Setup],
    p: Params,
    progress: &crate::bench::progress::Progress,
    notes: &mut Vec<String>,
) -> Result<BTreeMap<String, Samples>> {
    let keys: Vec<(Backend, Plane)> = setups.iter().map(|s| (s.backend, s.plane)).collect();
    let mut out: BTreeMap<String, Samples> = BTreeMap::new();
    let mut dropped: Vec<String> = Vec::new();
    for rep in 0..p.reps {
        let order = schedule(&keys, rep);
        for (t, test) in Test::ALL.into_iter().enumerate() {
            for &k in &order {
                let s = &setups[k];
                if dropped.contains(&s.label()) {
                    continue;
                }
                let what = format!("rep {}/{} {} {}", rep + 1, p.reps, s.label(), test.label());
                progress.working(&what);
                let entry = out.entry(s.label()).or_default();
                match measure_one(s, test, p, entry) {
                    Ok(outcome) => progress.done(&what, &outcome),
                    Err(e) if s.backend == Backend::Udp && !twill_tests::interrupted() => {
                        progress.done(&what, &format!("FAILED, udp dropped from the run: {e:#}"));
                        notes.push(format!("udp: dropped — {what} failed: {e:#}"));
                        // This test's other steps and every later repetition of this setup.
                        progress.unplan((p.reps - rep) * Test::ALL.len() - t - 1);
                        dropped.push(s.label());
                        out.remove(&s.label());
                    }
                    Err(e) => return Err(e.context(what)),
                }
            }
        }
    }
    Ok(out)
}

/// The kernel configuration `backend` is compared with (udp has no kernel twin: VXLAN).
pub(crate) fn baseline_of(backend: Backend) -> Backend {
    match backend {
        Backend::Udp => Backend::Vxlan,
        other => other,
    }
}

/// The order of the configurations `keys` in repetition `rep`: grouped by baseline with the
/// kernel one in the middle (`vxlan twill, vxlan kernel, udp twill`), so every twill
/// configuration sits next to its baseline; each group reversed in odd repetitions, the groups
/// rotated. Indices into `keys`.
pub(crate) fn schedule(keys: &[(Backend, Plane)], rep: usize) -> Vec<usize> {
    let mut groups: BTreeMap<Backend, Vec<usize>> = BTreeMap::new();
    for (i, (b, _)) in keys.iter().enumerate() {
        groups.entry(baseline_of(*b)).or_default().push(i);
    }
    let mut groups: Vec<Vec<usize>> = groups
        .into_values()
        .map(|mut g| {
            g.sort_by_key(|&i| match keys[i] {
                (Backend::Udp, _) => 2,
                (_, Plane::Kernel) => 1,
                (_, Plane::Twill) => 0,
            });
            if rep % 2 == 1 {
                g.reverse();
            }
            g
        })
        .collect();
    if !groups.is_empty() {
        let r = rep % groups.len();
        groups.rotate_left(r);
    }
    groups.concat()
}

/// Per repetition, twill's figure over the baseline's measured next to it; the median of those.
pub(crate) fn paired_ratio(twill: &[f64], kernel: &[f64]) -> f64 {
    let ratios: Vec<f64> = twill.iter().zip(kernel).map(|(t, k)| t / k).collect();
    median(&ratios)
}

/// One test on one configuration, recorded into `entry`; the outcome as text.
pub(crate) fn measure_one(s: &Setup, test: Test, p: Params, entry: &mut Samples) -> Result<String> {
    match test {
        Test::Tcp1 | Test::Tcp2 => {
            let streams = if test == Test::Tcp1 { 1 } else { 2 };
            let run = iperf(s, streams, p.iperf_secs)?;
            let (rates, costs) = if streams == 1 {
                (&mut entry.tcp1_gbps, &mut entry.tcp1_cpu_s_per_gb)
            } else {
                (&mut entry.tcp2_gbps, &mut entry.tcp2_cpu_s_per_gb)
            };
            rates.push(run.gbps);
            costs.push(run.cpu_s_per_gb);
            Ok(format!(
                "{} Gbit/s, {} CPU-s/GB",
                fmt_num(run.gbps),
                fmt_num(run.cpu_s_per_gb)
            ))
        }
        Test::Ping => {
            let rtts = ping_rtts(&s.client.ns, s.server_ip, p.ping_count, PING_INTERVAL)?;
            let avg = crate::bench::stats::mean(&rtts);
            let p99 = percentile(&rtts, 99.0);
            let got = u32::try_from(rtts.len()).unwrap_or(u32::MAX);
            entry.ping_lost += p.ping_count.saturating_sub(got);
            entry.ping_avg_ms.push(avg);
            entry.ping_p99_ms.push(p99);
            entry.rtts_ms.extend(rtts);
            Ok(format!("avg {} ms, p99 {} ms", fmt_num(avg), fmt_num(p99)))
        }
    }
}
