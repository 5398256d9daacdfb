//! The benchmark: set up every configuration, measure, report.

use anyhow::{Context as _, Result, ensure};

use super::lease::lease_latency;
use super::measure::measure;
use super::params::{LEASE_P99_TARGET_MS, Params, Plane, Test};
use super::report::section;
use super::setup::{DEFAULT_SUBNETS, Setup, kernel_setup, skip_reason, twill_setup};
use crate::bench::kit::{Benchmark, Context, selection};
use crate::bench::report::{Check, Section, fmt_num};
use crate::bench::stats::Summary;
use crate::cluster::Backend;

/// The overlay benchmark.
#[derive(Debug, Clone, Copy)]
pub struct Overlay;

impl Benchmark for Overlay {
    fn run(&self, ctx: &Context<'_>) -> Result<Section> {
        let backends = selection(ctx.opts.backends.iter().copied(), "backend")?;
        let p = Params::new(ctx.opts.quick, ctx.opts.reps);
        let progress = ctx.progress;
        let mut notes = Vec::new();

        // Twill's rigs first: the kernel's copy their subnets.
        let need_kernel_vxlan =
            backends.contains(&Backend::Vxlan) || backends.contains(&Backend::Udp);
        let need_kernel_hostgw = backends.contains(&Backend::HostGw);
        // The whole plan up front (a skipped udp takes its share back): rigs, measurements,
        // lease runs.
        let rigs =
            backends.len() + usize::from(need_kernel_vxlan) + usize::from(need_kernel_hostgw);
        progress.plan(rigs + p.reps * Test::ALL.len() * rigs + backends.len());
        let mut setups: Vec<Setup> = Vec::new();
        for &b in &backends {
            let what = format!("rig {b} twill");
            progress.working(&what);
            match twill_setup(b, ctx.opts.bin_dir.clone()) {
                Ok(s) => {
                    progress.done(&what, &format!("up ({})", s.rig.id()));
                    setups.push(s);
                }
                Err(e) if b == Backend::Udp && !twill_tests::interrupted() => {
                    let why = skip_reason(&format!("{e:#}"));
                    progress.done(&what, "skipped (twilld refused udp)");
                    progress.unplan(p.reps * Test::ALL.len() + 1);
                    notes.push(format!(
                        "udp: skipped — twilld did not bring the udp backend up: {why}"
                    ));
                }
                Err(e) => return Err(e.context(format!("bring up the {b} twill rig"))),
            }
        }
        let twill_subnets = |b: Backend| {
            setups
                .iter()
                .find(|s| s.backend == b && s.plane == Plane::Twill)
                .map(|s| s.subnets)
        };
        let udp_up = twill_subnets(Backend::Udp).is_some();
        let mut kernels = Vec::new();
        if backends.contains(&Backend::Vxlan) || udp_up {
            let subnets = twill_subnets(Backend::Vxlan)
                .or_else(|| twill_subnets(Backend::Udp))
                .unwrap_or(DEFAULT_SUBNETS);
            kernels.push((Backend::Vxlan, subnets));
        } else if need_kernel_vxlan {
            progress.unplan(1 + p.reps * Test::ALL.len());
        }
        if need_kernel_hostgw {
            let subnets = twill_subnets(Backend::HostGw).unwrap_or(DEFAULT_SUBNETS);
            kernels.push((Backend::HostGw, subnets));
        }
        for (b, subnets) in kernels {
            let what = format!("rig {b} kernel");
            progress.working(&what);
            let s = kernel_setup(b, subnets)
                .with_context(|| format!("bring up the hand-built {b} rig"))?;
            progress.done(&what, &format!("up ({})", s.rig.id()));
            setups.push(s);
        }
        ensure!(
            setups.iter().any(|s| s.plane == Plane::Twill),
            "no twill rig came up"
        );

        let samples = measure(&setups, p, progress, &mut notes)?;

        let mut leases = Vec::new();
        let mut lease_failures = Vec::new();
        let twill: Vec<&Setup> = setups.iter().filter(|s| s.plane == Plane::Twill).collect();
        for s in twill {
            let what = format!("lease→programmed {}", s.backend);
            if s.backend == Backend::Udp {
                progress.done(&what, "not measurable (no per-peer kernel state)");
                notes.push(
                    "udp: lease-to-programmed not measured — the udp backend keeps its peers in \
                     twilld's own routing table (the kernel has one route for the whole Network \
                     into flannel0), so there is no per-peer kernel entry to time"
                        .into(),
                );
                continue;
            }
            let l = match lease_latency(s, p.leases, progress, &what) {
                Ok(l) => l,
                Err(e) if twill_tests::interrupted() => return Err(e),
                Err(e) => {
                    // The throughput figures are still worth a report; the NaN check below
                    // fails the run once it is written.
                    progress.done(&what, &format!("FAILED: {e:#}"));
                    notes.push(format!("{}: lease-to-programmed failed: {e:#}", s.backend));
                    lease_failures.push(s.backend);
                    continue;
                }
            };
            let add = Summary::of(&l.add_ms);
            progress.done(
                &what,
                &format!(
                    "add p50 {} ms p99 {} ms, delete p50 {} ms",
                    fmt_num(add.p50),
                    fmt_num(add.p99),
                    fmt_num(Summary::of(&l.del_ms).p50)
                ),
            );
            leases.push(l);
        }

        let labels: Vec<(String, Backend, Plane)> = setups
            .iter()
            .map(|s| (s.label(), s.backend, s.plane))
            .collect();
        drop(setups);
        let mut section = section(&labels, &samples, &leases, p, notes);
        for b in lease_failures {
            section.checks.push(Check {
                what: format!("{b} lease→programmed p99 (measurement failed)"),
                value: f64::NAN,
                target: format!("<= {LEASE_P99_TARGET_MS} ms"),
                pass: false,
            });
        }
        Ok(section)
    }
}
