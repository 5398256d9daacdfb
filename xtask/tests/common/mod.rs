//! What every benchmark smoke test does: run one benchmark `--quick` into a temporary report
//! directory, check the files are there and not empty, that `report.md` has its sections, and
//! that every headline figure in `results.json` is finite and positive. Each test then checks
//! what is particular to its benchmark.

use std::path::PathBuf;

use clap::Parser;
use twill_tests::require_root;
use xtask::bench::{self, cli::BenchArgs, kit::BenchOptions};

/// `cargo xtask bench`'s command line.
#[derive(Parser)]
struct BenchCommand {
    #[command(flatten)]
    args: BenchArgs,
}

/// The smoke run of `cargo xtask bench <args>` (a `--quick` one, with the options it gives, and
/// the command line the report shows) into a fresh directory named after the benchmark, checked
/// as [`Report::run`] checks. `None` when the test cannot run here (not root, outside CI).
pub fn quick_run(args: &str, files: &[&str], needles: &[&str]) -> Option<Report> {
    if !require_root() {
        return None;
    }
    let words = std::iter::once("bench").chain(args.split_whitespace());
    let args = BenchCommand::try_parse_from(words)
        .unwrap_or_else(|e| panic!("bench {args}: {e}"))
        .args;
    assert!(args.quick, "a smoke run is --quick: {}", args.command());
    let name = args.which.as_str();
    Some(Report::run(
        &format!("bench-{name}-smoke"),
        args.options(None),
        files,
        needles,
        name,
    ))
}

/// A fresh directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("xtask-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A benchmark's report, checked for the basics.
pub struct Report {
    /// The report directory, removed when the report is dropped.
    _dir: TempDir,
    /// The benchmark's section of `results.json`.
    pub section: serde_json::Value,
}

impl Report {
    /// Runs `opts` into a fresh directory named after `tag`, then checks that `files` exist and
    /// are not nearly empty, that `report.md` contains `needles`, that the first section of
    /// `results.json` is `section`, and that every metric in it is finite and positive.
    pub fn run(
        tag: &str,
        opts: BenchOptions,
        files: &[&str],
        needles: &[&str],
        section: &str,
    ) -> Report {
        let dir = TempDir::new(tag);
        let opts = BenchOptions {
            out_dir: Some(dir.0.clone()),
            ..opts
        };
        let outcome = bench::run(&opts).unwrap_or_else(|e| panic!("{}: {e:#}", opts.command));
        assert_eq!(outcome.dir, dir.0);
        for f in ["report.md", "results.json"].iter().chain(files) {
            let path = dir.0.join(f);
            let len = std::fs::metadata(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .len();
            assert!(len > 100, "{} is nearly empty", path.display());
        }
        let md = std::fs::read_to_string(dir.0.join("report.md")).unwrap();
        for needle in needles {
            assert!(md.contains(needle), "report.md lacks {needle:?}:\n{md}");
        }
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.0.join("results.json")).unwrap()).unwrap();
        let first = json["sections"][0].clone();
        assert_eq!(first["name"], section);
        let report = Report {
            _dir: dir,
            section: first,
        };
        for m in report.metrics() {
            let v = m["value"].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite() && v > 0.0, "insane figure {m}");
        }
        report
    }

    /// The section's headline metrics.
    pub fn metrics(&self) -> &Vec<serde_json::Value> {
        self.section["metrics"].as_array().expect("metrics")
    }

    /// The value of metric `name` (NaN when it is not a number); panics when it is missing.
    pub fn value(&self, name: &str) -> f64 {
        let metrics = self.metrics();
        metrics
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no metric {name} in {metrics:?}"))["value"]
            .as_f64()
            .unwrap_or(f64::NAN)
    }

    /// Checks that every metric of `names` is present, finite and positive.
    pub fn require(&self, names: &[&str]) {
        for name in names {
            let v = self.value(name);
            assert!(v.is_finite() && v > 0.0, "{name} = {v}");
        }
    }
}
