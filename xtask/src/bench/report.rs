//! The report every benchmark run leaves behind: the data model, its three renderings (a
//! terminal table, `report.md`, `results.json`) and the sanity check CI runs on it.
//!
//! Why it is shaped as it is:
//! - A benchmark returns a [`Section`]: headline [`Metric`]s (what the sanity check and the
//!   smoke test look at), [`Table`]s of preformatted cells (rendered twice, for the terminal and
//!   for Markdown), [`Check`]s against the targets, free-form notes (a skipped backend
//!   says why), plot data, and its raw samples as JSON. New benchmarks plug in by producing one
//!   more section; nothing here knows what "overlay" means. A benchmark fills its section in as
//!   it goes ([`Section::new`], [`Section::metric`], [`Section::cdf`], [`Table::new`]), so the
//!   three benchmarks share one way of naming a figure and adding a plot.
//! - Rendering is pure (strings in, strings out) so it is unit tested without root.
//! - `results.json` carries every sample, not just medians, so figures can be recomputed and runs
//!   compared later without re-running anything.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::plot::{CdfChart, Chart, Plot};

/// Version of the `results.json` layout.
pub const SCHEMA: u32 = 1;

/// One benchmark run: the machine, how to reproduce it, and a section per benchmark.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// [`SCHEMA`].
    pub schema: u32,
    /// When the run started, UTC, RFC 3339.
    pub started_utc: String,
    /// How long the run took, in seconds.
    pub duration_s: f64,
    /// The command that reproduces the run.
    pub command: String,
    /// The options as given.
    pub options: serde_json::Value,
    /// What it ran on.
    pub machine: Machine,
    /// One per benchmark, in the order run.
    pub sections: Vec<Section>,
}

/// Facts about the machine that matter when reading the figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    /// `uname -r`.
    pub kernel: String,
    /// The CPU model from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// CPUs available to this process.
    pub cpus: usize,
    /// Total memory in MiB.
    pub memory_mib: u64,
    /// The 1/5/15-minute load averages when the run started (other users of the machine).
    pub load_avg: [f64; 3],
    /// `iperf3 --version`'s first line.
    pub iperf3: String,
    /// `etcd --version`'s first line.
    pub etcd: String,
    /// The twilld binary measured.
    pub twilld: String,
    /// `git describe`-like commit of the checkout (`+dirty` when modified).
    pub git: String,
}

/// What one benchmark produced.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Section {
    /// The benchmark's command-line name (`overlay`).
    pub name: String,
    /// A heading.
    pub title: String,
    /// What it measures and how, as Markdown.
    pub about: String,
    /// Headline figures; every one must be finite and positive.
    pub metrics: Vec<Metric>,
    /// Tables, cells preformatted.
    pub tables: Vec<Table>,
    /// Targets, met or not.
    pub checks: Vec<Check>,
    /// Anything a reader must know (a skipped backend and why).
    pub notes: Vec<String>,
    /// SVG files written for this section (file names inside the report directory).
    pub plot_files: Vec<String>,
    /// Plot data, turned into `plot_files` by the runner.
    #[serde(skip)]
    pub plots: Vec<Plot>,
    /// Raw samples, benchmark-specific.
    pub raw: serde_json::Value,
}

impl Section {
    /// An empty section of benchmark `name` under the heading `title`, to be filled in.
    pub fn new(name: &str, title: impl Into<String>) -> Self {
        Section {
            name: name.into(),
            title: title.into(),
            ..Section::default()
        }
    }

    /// Adds the headline figure `name` = `value` `unit`.
    pub fn metric(&mut self, name: impl Into<String>, unit: &str, value: f64) {
        self.metrics.push(Metric::new(name, unit, value));
    }

    /// Adds a CDF plot of `series` (named samples), unless there is no series.
    pub fn cdf(
        &mut self,
        file: &str,
        title: impl Into<String>,
        x_label: &str,
        series: Vec<(String, Vec<f64>)>,
    ) {
        if !series.is_empty() {
            self.plots.push(Plot::new(
                file,
                title,
                Chart::Cdf(CdfChart {
                    x_label: x_label.into(),
                    series,
                }),
            ));
        }
    }
}

/// A headline figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// Dotted name, e.g. `vxlan.twill.tcp1.median`.
    pub name: String,
    /// Unit, e.g. `Gbit/s`, `ms`, `ratio`.
    pub unit: String,
    /// The value.
    pub value: f64,
}

impl Metric {
    /// The figure `name` = `value` `unit`.
    pub fn new(name: impl Into<String>, unit: &str, value: f64) -> Self {
        Metric {
            name: name.into(),
            unit: unit.into(),
            value,
        }
    }
}

/// A table with preformatted cells.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    /// A caption.
    pub title: String,
    /// Column headings.
    pub header: Vec<String>,
    /// Rows (each as long as the header).
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with its caption and column headings, no rows yet.
    pub fn new(title: impl Into<String>, header: &[&str]) -> Self {
        Table {
            title: title.into(),
            header: header.iter().map(|h| (*h).to_string()).collect(),
            rows: Vec::new(),
        }
    }
}

/// A target the benchmark is held to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// What is compared, e.g. `vxlan TCP 1 stream twill/kernel`.
    pub what: String,
    /// The measured value.
    pub value: f64,
    /// The target, as text (`>= 0.97`).
    pub target: String,
    /// Whether it was met.
    pub pass: bool,
}

impl Check {
    /// A check that `value >= min`.
    pub fn at_least(what: impl Into<String>, value: f64, min: f64) -> Self {
        Check {
            what: what.into(),
            value,
            target: format!(">= {min}"),
            pass: value >= min,
        }
    }

    /// A check that `value <= max`.
    pub fn at_most(what: impl Into<String>, value: f64, max: f64, unit: &str) -> Self {
        Check {
            what: what.into(),
            value,
            target: format!("<= {max} {unit}").trim_end().to_string(),
            pass: value <= max,
        }
    }

    /// The measured value as a report prints it, and the verdict: `met` or `missed`.
    fn shown<'a>(&self, met: &'a str, missed: &'a str) -> (String, &'a str) {
        (fmt_num(self.value), if self.pass { met } else { missed })
    }
}

impl Report {
    /// Why the numbers are not sane, one line each: a metric that is NaN, infinite, zero or
    /// negative, or a section with neither metrics nor a note explaining their absence.
    pub fn sanity_errors(&self) -> Vec<String> {
        let mut errors = Vec::new();
        for s in &self.sections {
            if s.metrics.is_empty() && s.notes.is_empty() {
                errors.push(format!("{}: no figures and no note saying why", s.name));
            }
            for m in &s.metrics {
                if !m.value.is_finite() || m.value <= 0.0 {
                    errors.push(format!("{}: {} = {} {}", s.name, m.name, m.value, m.unit));
                }
            }
            for c in &s.checks {
                if !c.value.is_finite() {
                    errors.push(format!("{}: check {} is {}", s.name, c.what, c.value));
                }
            }
        }
        errors
    }

    /// The terminal rendering: every section's tables, checks and notes.
    pub fn to_terminal(&self) -> String {
        let mut out = String::new();
        for s in &self.sections {
            let _ = writeln!(out, "== {} ==", s.title);
            for t in &s.tables {
                let _ = writeln!(out, "{}:", t.title);
                out.push_str(&text_table(t));
                out.push('\n');
            }
            if !s.checks.is_empty() {
                out.push_str("targets:\n");
                for c in &s.checks {
                    let (value, verdict) = c.shown("ok", "MISSED");
                    let _ = writeln!(
                        out,
                        "  [{verdict}] {}: {value} (target {})",
                        c.what, c.target
                    );
                }
            }
            for n in &s.notes {
                let _ = writeln!(out, "note: {n}");
            }
            out.push('\n');
        }
        out
    }

    /// `report.md`.
    pub fn to_markdown(&self) -> String {
        let m = &self.machine;
        let mut out = String::new();
        let _ = write!(
            out,
            "# twill benchmark report\n\n\
             Started {} (UTC), took {:.0} s. Raw samples: [`results.json`](results.json).\n\n\
             ## Machine\n\n\
             | | |\n|---|---|\n\
             | kernel | {} |\n\
             | CPU | {} × {} |\n\
             | memory | {} MiB |\n\
             | load average at start (1/5/15 min) | {:.2} / {:.2} / {:.2} |\n\
             | iperf3 | {} |\n\
             | etcd | {} |\n\
             | twilld | {} |\n\
             | commit | {} |\n\n\
             The machine is shared and small: sender and receiver of every test share its CPUs \
             with each other and with whatever else runs. Compare ratios measured in one run \
             (twill and its baseline are interleaved, repetition by repetition), never absolute \
             figures across runs.\n\n\
             ## Reproduce\n\n\
             ```sh\ncargo xtask setup        # once: packages, toolchains\n{}\n```\n\n",
            self.started_utc,
            self.duration_s,
            m.kernel,
            m.cpus,
            m.cpu_model,
            m.memory_mib,
            m.load_avg[0],
            m.load_avg[1],
            m.load_avg[2],
            m.iperf3,
            m.etcd,
            m.twilld,
            m.git,
            self.command,
        );
        for s in &self.sections {
            let _ = write!(out, "## {}\n\n{}\n\n", s.title, s.about.trim());
            for t in &s.tables {
                let _ = write!(out, "### {}\n\n{}\n", t.title, markdown_table(t));
            }
            if !s.checks.is_empty() {
                out.push_str("### Targets\n\n| | measured | target | |\n|---|---|---|---|\n");
                for c in &s.checks {
                    let (value, verdict) = c.shown("met", "**missed**");
                    let _ = writeln!(out, "| {} | {value} | {} | {verdict} |", c.what, c.target);
                }
                out.push('\n');
            }
            for f in &s.plot_files {
                let _ = write!(out, "![{f}]({f})\n\n");
            }
            if !s.notes.is_empty() {
                out.push_str("Notes:\n\n");
                for n in &s.notes {
                    let _ = writeln!(out, "- {n}");
                }
                out.push('\n');
            }
        }
        out
    }
}

/// A number with about three significant digits.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Columns padded to their widest cell, two spaces apart, the header underlined.
pub fn text_table(t: &Table) -> String {
    let cols = t.header.len();
    let mut widths: Vec<usize> = t.header.iter().map(|h| h.chars().count()).collect();
    for row in &t.rows {
        for (i, cell) in row.iter().enumerate().take(cols) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| -> String {
        let mut s = String::from("  ");
        for (i, w) in widths.iter().enumerate() {
            let cell = cells.get(i).map_or("", String::as_str);
            let pad = w - cell.chars().count().min(*w);
            s.push_str(cell);
            if i + 1 < cols {
                s.push_str(&" ".repeat(pad + 2));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(&t.header);
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    out.push_str(&line(&rule));
    for row in &t.rows {
        out.push_str(&line(row));
    }
    out
}

/// A GitHub-flavoured Markdown table (`|` in cells escaped).
pub fn markdown_table(t: &Table) -> String {
    let esc = |s: &str| s.replace('|', "\\|");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| {} |",
        t.header
            .iter()
            .map(|h| esc(h))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(out, "|{}", "---|".repeat(t.header.len()));
    for row in &t.rows {
        let _ = writeln!(
            out,
            "| {} |",
            row.iter().map(|c| esc(c)).collect::<Vec<_>>().join(" | ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample_report() -> Report {
        Report {
            schema: SCHEMA,
            started_utc: "2026-01-02T03:04:05Z".into(),
            duration_s: 42.0,
            command: "cargo xtask bench overlay --backend vxlan".into(),
            options: serde_json::json!({"quick": false}),
            machine: Machine {
                kernel: "6.18.0".into(),
                cpu_model: "Test CPU".into(),
                cpus: 2,
                memory_mib: 24_000,
                load_avg: [1.0, 2.0, 3.0],
                iperf3: "iperf 3.12".into(),
                etcd: "etcd Version: 3.4.23".into(),
                twilld: "target/release/twilld".into(),
                git: "abc1234".into(),
            },
            sections: vec![Section {
                name: "overlay".into(),
                title: "Overlay".into(),
                about: "Pod to pod.".into(),
                metrics: vec![Metric {
                    name: "vxlan.ratio.tcp1".into(),
                    unit: "ratio".into(),
                    value: 0.98,
                }],
                tables: vec![Table {
                    title: "Throughput".into(),
                    header: vec!["backend".into(), "twill".into(), "kernel".into()],
                    rows: vec![vec!["vxlan".into(), "9.80 Gbit/s".into(), "10.0".into()]],
                }],
                checks: vec![
                    Check::at_least("vxlan TCP 1 stream", 0.98, 0.97),
                    Check::at_most("lease p99", 150.0, 100.0, "ms"),
                ],
                notes: vec!["udp skipped: twilld refused it".into()],
                plot_files: vec!["overlay-throughput.svg".into()],
                plots: Vec::new(),
                raw: serde_json::json!({"samples": [1.0, 2.0]}),
            }],
        }
    }

    #[test]
    fn markdown_has_machine_reproduce_tables_targets_plots_notes() {
        let md = sample_report().to_markdown();
        for needle in [
            "| kernel | 6.18.0 |",
            "| CPU | 2 × Test CPU |",
            "cargo xtask bench overlay --backend vxlan",
            "## Overlay",
            "| backend | twill | kernel |\n|---|---|---|\n| vxlan | 9.80 Gbit/s | 10.0 |",
            "| vxlan TCP 1 stream | 0.980 | >= 0.97 | met |",
            "| lease p99 | 150 | <= 100 ms | **missed** |",
            "![overlay-throughput.svg](overlay-throughput.svg)",
            "- udp skipped: twilld refused it",
        ] {
            assert!(md.contains(needle), "missing {needle:?} in\n{md}");
        }
    }

    #[test]
    fn terminal_table_aligns_columns() {
        let t = Table {
            title: "t".into(),
            header: vec!["a".into(), "bbb".into()],
            rows: vec![vec!["long cell".into(), "x".into()]],
        };
        assert_eq!(
            text_table(&t),
            "  a          bbb\n  ---------  ---\n  long cell  x\n"
        );
        let term = sample_report().to_terminal();
        for needle in [
            "[ok] vxlan TCP 1 stream: 0.980 (target >= 0.97)",
            "[MISSED] lease p99: 150 (target <= 100 ms)",
        ] {
            assert!(term.contains(needle), "missing {needle:?} in\n{term}");
        }
    }

    #[test]
    fn sanity_check_rejects_zero_nan_and_empty_sections() {
        let mut r = sample_report();
        assert!(r.sanity_errors().is_empty());
        r.sections[0].metrics.push(Metric {
            name: "zero".into(),
            unit: "ms".into(),
            value: 0.0,
        });
        r.sections[0].metrics.push(Metric {
            name: "nan".into(),
            unit: "ms".into(),
            value: f64::NAN,
        });
        r.sections.push(Section {
            name: "empty".into(),
            ..Section::default()
        });
        let errors = r.sanity_errors();
        assert_eq!(errors.len(), 3, "{errors:?}");
    }

    #[test]
    fn json_round_trips_without_plot_data() {
        let r = sample_report();
        let text = serde_json::to_string(&r).unwrap();
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back.sections[0].metrics, r.sections[0].metrics);
        assert!(!text.contains("\"plots\""));
    }

    #[test]
    fn numbers_keep_three_digits() {
        for (v, want) in [
            (123.4, "123"),
            (12.34, "12.3"),
            (1.234, "1.23"),
            (0.01234, "0.012"),
        ] {
            assert_eq!(fmt_num(v), want, "fmt_num({v})");
        }
    }
}
