//! `cargo xtask bench`: twill measured against the kernel's own baseline, in one run, with a
//! report.
//!
//! Why it is shaped as it is:
//! - Every benchmark is a [`Benchmark`]: it gets a [`Context`] (options, progress display, the
//!   twilld binary) and returns a [`report::Section`]. The runner owns everything around it:
//!   machine facts, the report directory, plots, the terminal table, `results.json` and the
//!   sanity check. A benchmark plugs in as one module and one line in [`benchmark`].
//! - Benchmarks are not timed tests (STYLE.md): a missed target is reported, not a failure. A run
//!   fails only when it could not measure (a rig that does not come up, a tool that errors) or
//!   when its numbers are not sane (zero, NaN) — what the CI smoke run checks.
//! - Twill and its baseline run in the same invocation, interleaved repetition by repetition,
//!   and only their ratio is quoted: on a shared two-core machine absolute figures drift by tens
//!   of percent between runs, a ratio of neighbours in time much less.

pub mod cli;
pub mod cni;
pub mod control_plane;
pub mod dns;
pub mod kit;
pub mod machine;
pub mod overlay;
pub mod plot;
pub mod progress;
pub mod report;
pub mod services;
pub mod stats;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use self::kit::{BenchOptions, Benchmark, Context, Which};
use self::progress::Progress;
use self::report::{Report, SCHEMA, Section};

/// The benchmark behind `which`, or why it does not exist yet.
pub fn benchmark(which: Which) -> Result<Box<dyn Benchmark>, &'static str> {
    match which {
        Which::Overlay => Ok(Box::new(overlay::Overlay)),
        Which::Services => Ok(Box::new(services::Services)),
        Which::Cni => Ok(Box::new(cni::Cni)),
        Which::ControlPlane => Ok(Box::new(control_plane::ControlPlane)),
        Which::Dns => Ok(Box::new(dns::Dns)),
        Which::All => Err("`all` is not a single benchmark"),
    }
}

/// The outcome of [`run`].
#[derive(Debug)]
pub struct Outcome {
    /// The report directory.
    pub dir: PathBuf,
    /// The report.
    pub report: Report,
}

/// Runs the benchmark(s), writes the report directory (`report.md`, SVG plots, `results.json`)
/// and prints the tables. An error if nothing could be measured, a benchmark failed, or the
/// numbers are not sane; the report is written first whenever there is one.
pub fn run(opts: &BenchOptions) -> Result<Outcome> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the benchmarks build network namespaces and need root");
    }
    if opts.reps == 0 {
        bail!("--reps must be at least 1");
    }
    if opts.which != Which::All
        && let Err(why) = benchmark(opts.which)
    {
        bail!(
            "`bench {}` is not available yet: {why}",
            opts.which.as_str()
        );
    }
    let started = machine::now_secs();
    let clock = Instant::now();
    let dir = opts.out_dir.clone().unwrap_or_else(|| {
        crate::util::workspace_root()
            .join("bench-report")
            .join(machine::compact(started))
    });
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;

    let twilld = twilld_path(opts.bin_dir.as_deref())?;
    let machine = machine::facts(&twilld);
    let progress = Progress::new();
    let ctx = Context {
        opts,
        progress: &progress,
    };

    let wanted: Vec<Which> = if opts.which == Which::All {
        Which::EACH.to_vec()
    } else {
        vec![opts.which]
    };
    let mut sections = Vec::new();
    let mut failures = Vec::new();
    for which in wanted {
        let bench = match benchmark(which) {
            Ok(b) => b,
            Err(why) if opts.which == Which::All => {
                progress.note(&format!("bench {}: skipped: {why}", which.as_str()));
                sections.push(Section {
                    name: which.as_str().into(),
                    title: format!("{} (not measured)", which.as_str()),
                    notes: vec![format!("skipped: {why}")],
                    ..Section::default()
                });
                continue;
            }
            Err(why) => bail!("`bench {}` is not available yet: {why}", which.as_str()),
        };
        match bench.run(&ctx) {
            Ok(section) => sections.push(section),
            Err(e) if twill_tests::interrupted() => return Err(e),
            Err(e) => {
                progress.note(&format!("bench {} failed: {e:#}", which.as_str()));
                failures.push(format!("{}: {e:#}", which.as_str()));
            }
        }
    }

    for section in &mut sections {
        for plot in &section.plots {
            plot::render(plot, &dir)?;
            section.plot_files.push(plot.file.clone());
        }
    }
    let report = Report {
        schema: SCHEMA,
        started_utc: machine::rfc3339(started),
        duration_s: clock.elapsed().as_secs_f64(),
        command: opts.command.clone(),
        options: serde_json::to_value(opts)?,
        machine,
        sections,
    };
    write_report(&report, &dir)?;
    print!("\n{}", report.to_terminal());
    println!("report: {}", dir.join("report.md").display());

    if !failures.is_empty() {
        bail!("benchmark(s) failed:\n{}", failures.join("\n"));
    }
    let insane = report.sanity_errors();
    if !insane.is_empty() {
        bail!("the figures are not sane:\n{}", insane.join("\n"));
    }
    Ok(Outcome { dir, report })
}

/// Writes `report.md` and `results.json` into `dir`.
pub fn write_report(report: &Report, dir: &Path) -> Result<()> {
    let md = dir.join("report.md");
    std::fs::write(&md, report.to_markdown()).with_context(|| format!("write {}", md.display()))?;
    let json = dir.join("results.json");
    let text = serde_json::to_string_pretty(report)?;
    std::fs::write(&json, text + "\n").with_context(|| format!("write {}", json.display()))
}

/// The twilld binary the rigs will run (checked to exist, so a missing build fails up front).
pub(crate) fn twilld_path(bin_dir: Option<&Path>) -> Result<PathBuf> {
    let dir = match (bin_dir, std::env::var_os("TWILL_BIN_DIR")) {
        (Some(d), _) => d.to_path_buf(),
        (None, Some(d)) => PathBuf::from(d),
        (None, None) => {
            let exe = std::env::current_exe().context("locate the running executable")?;
            let dir = exe.parent().context("executable has no directory")?;
            if dir.file_name().is_some_and(|n| n == "deps") {
                dir.parent().context("deps has no parent")?.to_path_buf()
            } else {
                dir.to_path_buf()
            }
        }
    };
    let path = dir.join("twilld");
    if !path.is_file() {
        bail!(
            "twilld not found at {}: build it (cargo build --release -p twill-agent --bin twilld)",
            path.display()
        );
    }
    Ok(path)
}
