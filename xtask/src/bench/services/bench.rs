//! The benchmark: every mode and the baselines, in one run.

use anyhow::{Context as _, Result};

use super::baselines::measure_baselines;
use super::measure::measure_mode;
use super::params::{ModeOutcome, Params};
use super::report::section;
use crate::bench::kit::{Benchmark, Context, selection};
use crate::bench::report::Section;
use crate::cluster::{ProxyMode, check_proxy_mode};

/// The services benchmark.
#[derive(Debug, Clone, Copy)]
pub struct Services;
// ---- the benchmark ------------------------------------------------------------------------

impl Benchmark for Services {
    fn run(&self, ctx: &Context<'_>) -> Result<Section> {
        let modes = selection(
            ctx.opts
                .modes
                .iter()
                .copied()
                .filter(|m| *m != ProxyMode::None),
            "proxy mode",
        )?;
        let p = Params::new(ctx.opts.quick, ctx.opts.reps);
        let progress = ctx.progress;
        let twilld = crate::bench::twilld_path(ctx.opts.bin_dir.as_deref())?;
        let per_mode = 1 + p.steps.len() * (1 + p.runs) + p.reps + 1 + 1 + p.runs;
        // Which modes this twilld knows, before planning: the progress total stays honest.
        let availability: Vec<(ProxyMode, Result<(), String>)> = modes
            .iter()
            .map(|&m| (m, check_proxy_mode(&twilld, m)))
            .collect();
        let measurable = availability.iter().filter(|(_, a)| a.is_ok()).count();
        progress.plan(measurable * per_mode + 3 + 2 * p.runs);
        let mut outcomes = Vec::new();
        let mut notes = Vec::new();
        for (mode, available) in availability {
            if let Err(reason) = available {
                progress.note(&format!("services {mode}: unavailable — {reason}"));
                outcomes.push(ModeOutcome::Unavailable {
                    mode: mode.to_string(),
                    reason,
                });
                continue;
            }
            let r = measure_mode(mode, &p, ctx.opts.bin_dir.clone(), progress)
                .with_context(|| format!("services, proxy mode {mode}"))?;
            if r.steps.iter().any(|s| s.failed > 0) {
                notes.push(format!(
                    "{mode}: {} connection(s) failed during the rate runs (not counted in the \
                     rates)",
                    r.steps.iter().map(|s| s.failed).sum::<u64>()
                ));
            }
            outcomes.push(ModeOutcome::Measured(Box::new(r)));
        }
        let baseline = match measure_baselines(&p, ctx.opts.bin_dir.clone(), progress) {
            Ok(b) => Some(b),
            Err(e) if twill_tests::interrupted() => return Err(e),
            Err(e) => {
                progress.note(&format!("hand-written baselines failed: {e:#}"));
                notes.push(format!("hand-written baselines not measured: {e:#}"));
                None
            }
        };
        Ok(section(&p, &outcomes, baseline.as_ref(), notes))
    }
}
