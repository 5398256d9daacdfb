//! SVG plots of benchmark results, drawn with plotters' SVG backend alone.
//!
//! Three shapes cover what the benchmarks show: grouped bars (a figure per configuration for twill
//! and its baseline side by side, the whiskers spanning the repetitions' min..max), empirical
//! CDFs (a latency distribution per configuration; a CDF shows the median and the tail at once
//! and overlays cleanly, where histograms of unequal sample counts do not), and lines over a
//! logarithmic x axis (a figure against a count spanning decades: connection rate against the
//! number of services installed). Plots are data
//! ([`Plot`]) until [`render`]: benchmarks build them without touching files, and the unit
//! tests render them into a temporary directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;

use super::stats::{median, sorted};

/// A plot to draw into `file` inside the report directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Plot {
    /// File name, e.g. `overlay-throughput.svg`.
    pub file: String,
    /// Caption.
    pub title: String,
    /// What is drawn.
    pub chart: Chart,
}

impl Plot {
    /// `chart` captioned `title`, to be drawn into `file`.
    pub fn new(file: &str, title: impl Into<String>, chart: Chart) -> Plot {
        Plot {
            file: file.into(),
            title: title.into(),
            chart,
        }
    }
}

/// The kinds of chart.
#[derive(Debug, Clone, PartialEq)]
pub enum Chart {
    /// Grouped bars.
    Bars(BarChart),
    /// Empirical cumulative distributions.
    Cdf(CdfChart),
    /// Lines with markers over a logarithmic x axis.
    Lines(LineChart),
}

/// Lines with markers (and min–max whiskers) over a logarithmic x axis; y starts at zero.
#[derive(Debug, Clone, PartialEq)]
pub struct LineChart {
    /// X axis description (with unit).
    pub x_label: String,
    /// Y axis description (with unit).
    pub y_label: String,
    /// One line per series.
    pub series: Vec<Line>,
}

/// One line of a [`LineChart`]: points `(x, bar)`, x positive; a single point draws a marker.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// Legend entry.
    pub name: String,
    /// Points, in x order.
    pub points: Vec<(f64, Bar)>,
}

impl Line {
    /// The points a log x axis can show: x finite and positive, the value finite.
    fn plottable(&self) -> impl Iterator<Item = (f64, Bar)> + Clone + '_ {
        self.points
            .iter()
            .copied()
            .filter(|(x, b)| x.is_finite() && *x > 0.0 && b.value.is_finite())
    }
}

/// Bars for each group (x) and series (colour).
#[derive(Debug, Clone, PartialEq)]
pub struct BarChart {
    /// Y axis description.
    pub y_label: String,
    /// Group labels along x.
    pub groups: Vec<String>,
    /// One bar per group per series.
    pub series: Vec<BarSeries>,
}

/// One colour of bars.
#[derive(Debug, Clone, PartialEq)]
pub struct BarSeries {
    /// Legend entry.
    pub name: String,
    /// Per group: the bar (median) and whisker (min, max), or `None` for no bar.
    pub values: Vec<Option<Bar>>,
}

/// A bar with its whisker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bar {
    /// The bar's height.
    pub value: f64,
    /// Whisker bottom.
    pub low: f64,
    /// Whisker top.
    pub high: f64,
}

impl Bar {
    /// The median of `samples`, whiskers at their extremes; `None` when there is none.
    pub fn of(samples: &[f64]) -> Option<Bar> {
        let s = sorted(samples);
        Some(Bar {
            value: median(samples),
            low: *s.first()?,
            high: *s.last()?,
        })
    }
}

/// Empirical CDFs on a logarithmic x axis.
#[derive(Debug, Clone, PartialEq)]
pub struct CdfChart {
    /// X axis description (with unit).
    pub x_label: String,
    /// `(legend entry, samples)`; samples must be positive.
    pub series: Vec<(String, Vec<f64>)>,
}

const SIZE: (u32, u32) = (960, 540);

/// Colours in series order: twill's first, the baseline's second, then the rest.
fn colour(i: usize) -> RGBColor {
    const COLOURS: [RGBColor; 6] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
    ];
    COLOURS[i % COLOURS.len()]
}

/// The white SVG canvas a plot is drawn on.
type Canvas<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// Draws `plot` into `dir`; the path written.
pub fn render(plot: &Plot, dir: &Path) -> Result<PathBuf> {
    let path = dir.join(&plot.file);
    {
        let root = SVGBackend::new(&path, SIZE).into_drawing_area();
        root.fill(&WHITE)
            .map_err(err)
            .and_then(|()| match &plot.chart {
                Chart::Bars(b) => draw_bars(&plot.title, b, &root),
                Chart::Cdf(c) => draw_cdf(&plot.title, c, &root),
                Chart::Lines(l) => draw_lines(&plot.title, l, &root),
            })
            .and_then(|()| root.present().map_err(err))
            .with_context(|| format!("draw {}", path.display()))?;
    }
    Ok(path)
}

/// plotters' errors are generic over the backend's; keep their text.
fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("{e}")
}

/// A log axis's range: from the least to the greatest of `values` (finite and positive), widened
/// by the factor `pad` either way (by 2 around a single value), or `fallback` without values.
fn log_range(
    values: impl Iterator<Item = f64> + Clone,
    pad: f64,
    fallback: (f64, f64),
) -> (f64, f64) {
    let lo = values.clone().fold(f64::INFINITY, f64::min);
    let hi = values.fold(0.0_f64, f64::max);
    let (mut lo, hi) = if lo.is_finite() && hi > lo {
        (lo / pad, hi * pad)
    } else if lo.is_finite() {
        (lo / 2.0, lo * 2.0)
    } else {
        fallback
    };
    // plotters labels a log axis from the first power of ten inside the range: make sure there
    // is one.
    if 10f64.powf(lo.log10().ceil()) > hi {
        lo = 10f64.powf(lo.log10().floor());
    }
    (lo, hi)
}

/// The series' legend, boxed, at `at`.
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    ctx: &mut ChartContext<'a, DB, CT>,
    at: SeriesLabelPosition,
) -> Result<()> {
    ctx.configure_series_labels()
        .position(at)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(err)
}

/// What every chart starts from: its caption, the margin and the axes' label areas
/// (`y_label_area` wide on the left).
fn frame<'a, 'b>(
    root: &'a Canvas<'b>,
    title: &str,
    y_label_area: u32,
) -> ChartBuilder<'a, 'b, SVGBackend<'b>> {
    let mut builder = ChartBuilder::on(root);
    builder
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(y_label_area);
    builder
}

fn draw_bars(title: &str, chart: &BarChart, root: &Canvas<'_>) -> Result<()> {
    let top = chart
        .series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .map(|b| b.high.max(b.value))
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    let y_max = if top > 0.0 { top * 1.15 } else { 1.0 };
    #[expect(clippy::cast_precision_loss, reason = "a handful of groups and series")]
    let (groups, nseries) = (chart.groups.len() as f64, chart.series.len().max(1) as f64);
    // Groups sit at integers 0..n, so that plotters puts one x label at each.
    let mut ctx = frame(root, title, 70)
        .build_cartesian_2d(-0.5..(groups - 0.5), 0.0..y_max)
        .map_err(err)?;
    let labels = chart.groups.clone();
    ctx.configure_mesh()
        .disable_x_mesh()
        .x_labels(chart.groups.len().max(1))
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "checked non-negative and integral"
                )]
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_label_style(("sans-serif", 13))
        .y_desc(&chart.y_label)
        .y_label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;

    let width = 0.8 / nseries;
    for (si, series) in chart.series.iter().enumerate() {
        let c = colour(si);
        #[expect(clippy::cast_precision_loss, reason = "a handful of series")]
        let offset = -0.4 + width * (si as f64);
        let bars: Vec<(f64, Bar)> = series
            .values
            .iter()
            .enumerate()
            .filter_map(|(gi, b)| {
                #[expect(clippy::cast_precision_loss, reason = "a handful of groups")]
                let x = gi as f64 + offset;
                b.filter(|b| b.value.is_finite()).map(|b| (x, b))
            })
            .collect();
        ctx.draw_series(bars.iter().map(|(x, b)| {
            Rectangle::new(
                [(*x + width * 0.05, 0.0), (*x + width * 0.95, b.value)],
                c.filled(),
            )
        }))
        .map_err(err)?
        .label(series.name.clone())
        .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], c.filled()));
        // Whiskers: min..max of the repetitions.
        let cap = width * 0.15;
        ctx.draw_series(bars.iter().flat_map(|(x, b)| {
            let mid = x + width / 2.0;
            [
                PathElement::new(vec![(mid, b.low), (mid, b.high)], BLACK.stroke_width(1)),
                PathElement::new(
                    vec![(mid - cap, b.low), (mid + cap, b.low)],
                    BLACK.stroke_width(1),
                ),
                PathElement::new(
                    vec![(mid - cap, b.high), (mid + cap, b.high)],
                    BLACK.stroke_width(1),
                ),
            ]
        }))
        .map_err(err)?;
    }
    draw_legend(&mut ctx, SeriesLabelPosition::UpperRight)
}

fn draw_cdf(title: &str, chart: &CdfChart, root: &Canvas<'_>) -> Result<()> {
    let all = || {
        chart
            .series
            .iter()
            .flat_map(|(_, s)| s.iter().copied())
            .filter(|v| v.is_finite() && *v > 0.0)
    };
    let (lo, hi) = log_range(all(), 1.2, (0.01, 1.0));
    let mut ctx = frame(root, title, 60)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)
        .map_err(err)?;
    ctx.configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc("fraction of samples ≤ x")
        .x_label_formatter(&|x| log_label(*x))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    for (i, (name, samples)) in chart.series.iter().enumerate() {
        let c = colour(i);
        let points = cdf_points(samples);
        ctx.draw_series(LineSeries::new(points, c.stroke_width(2)))
            .map_err(err)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    draw_legend(&mut ctx, SeriesLabelPosition::LowerRight)
}

fn draw_lines(title: &str, chart: &LineChart, root: &Canvas<'_>) -> Result<()> {
    let points = || chart.series.iter().flat_map(Line::plottable);
    let (x_lo, x_hi) = log_range(points().map(|(x, _)| x), 1.5, (1.0, 10.0));
    let y_top = points()
        .map(|(_, b)| b.high.max(b.value))
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    let y_max = if y_top > 0.0 { y_top * 1.15 } else { 1.0 };
    let mut ctx = frame(root, title, 70)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), 0.0..y_max)
        .map_err(err)?;
    ctx.configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .x_label_formatter(&|x| log_label(*x))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    for (i, series) in chart.series.iter().enumerate() {
        let c = colour(i);
        let pts: Vec<(f64, Bar)> = series.plottable().collect();
        ctx.draw_series(LineSeries::new(
            pts.iter().map(|(x, b)| (*x, b.value)),
            c.stroke_width(2),
        ))
        .map_err(err)?
        .label(series.name.clone())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        ctx.draw_series(
            pts.iter()
                .map(|(x, b)| Circle::new((*x, b.value), 4, c.filled())),
        )
        .map_err(err)?;
        ctx.draw_series(
            pts.iter()
                .filter(|(_, b)| b.high > b.low)
                .map(|(x, b)| PathElement::new(vec![(*x, b.low), (*x, b.high)], c.stroke_width(1))),
        )
        .map_err(err)?;
    }
    draw_legend(&mut ctx, SeriesLabelPosition::LowerLeft)
}

/// At most this many steps per CDF line: beyond it a line is drawn through evenly spaced ranks
/// (the smallest and largest samples always included), which no eye can tell from every step
/// but keeps an SVG of 10k samples small.
const CDF_MAX_STEPS: usize = 800;

/// The step line of the empirical CDF of `samples` (finite, positive ones), as `(x, fraction)`.
fn cdf_points(samples: &[f64]) -> Vec<(f64, f64)> {
    let sorted: Vec<f64> = super::stats::sorted(samples)
        .into_iter()
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let n = sorted.len();
    if n == 0 {
        return Vec::new();
    }
    let ranks: Vec<usize> = if n <= CDF_MAX_STEPS {
        (0..n).collect()
    } else {
        let mut r: Vec<usize> = (0..CDF_MAX_STEPS)
            .map(|i| i * (n - 1) / (CDF_MAX_STEPS - 1))
            .collect();
        r.dedup();
        r
    };
    #[expect(clippy::cast_precision_loss, reason = "sample counts far below 2^52")]
    let total = n as f64;
    let mut points = Vec::with_capacity(2 * ranks.len());
    let mut below = 0.0;
    for k in ranks {
        #[expect(clippy::cast_precision_loss, reason = "sample counts far below 2^52")]
        let at = (k + 1) as f64 / total;
        // A step: up at each (kept) sample.
        points.push((sorted[k], below));
        points.push((sorted[k], at));
        below = at;
    }
    points
}

/// A log axis label: 1, 2 and 5 times a power of ten, without trailing zeros; nothing for the
/// other grid lines (plotters puts one at every integer multiple, too dense to read).
fn log_label(x: f64) -> String {
    if !(x.is_finite() && x > 0.0) {
        return String::new();
    }
    let decade = 10f64.powf(x.log10().floor());
    let mantissa = (x / decade).round();
    if ![1.0, 2.0, 5.0].contains(&mantissa) || ((x / decade) - mantissa).abs() > 1e-6 {
        return String::new();
    }
    let text = format!("{x:.6}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdf_lines_are_steps_and_stay_small() {
        assert_eq!(
            cdf_points(&[2.0, 1.0, f64::NAN, 0.0]),
            [(1.0, 0.0), (1.0, 0.5), (2.0, 0.5), (2.0, 1.0)]
        );
        let many: Vec<f64> = (1..=10_000).map(f64::from).collect();
        let p = cdf_points(&many);
        assert!(p.len() <= 2 * CDF_MAX_STEPS, "{}", p.len());
        assert_eq!(p.first(), Some(&(1.0, 0.0)));
        assert_eq!(p.last(), Some(&(10_000.0, 1.0)));
        assert!(p.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    }

    #[test]
    fn log_axis_labels() {
        // 1-2-5 steps are labelled, everything between them is not.
        for (x, want) in [
            (0.1, "0.1"),
            (2.0, "2"),
            (50.0, "50"),
            (3.0, ""),
            (0.02, "0.02"),
        ] {
            assert_eq!(log_label(x), want, "log_label({x})");
        }
    }

    #[test]
    fn renders_both_kinds_as_svg() {
        let dir = std::env::temp_dir().join(format!("xtask-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bars = Plot::new(
            "bars.svg",
            "Throughput",
            Chart::Bars(BarChart {
                y_label: "Gbit/s".into(),
                groups: vec!["vxlan 1 stream".into(), "host-gw 1 stream".into()],
                series: vec![
                    BarSeries {
                        name: "twill".into(),
                        values: vec![
                            Some(Bar {
                                value: 9.0,
                                low: 8.5,
                                high: 9.5,
                            }),
                            None,
                        ],
                    },
                    BarSeries {
                        name: "kernel".into(),
                        values: vec![
                            Some(Bar {
                                value: 10.0,
                                low: 9.0,
                                high: 11.0,
                            }),
                            Some(Bar {
                                value: 14.0,
                                low: 14.0,
                                high: 14.0,
                            }),
                        ],
                    },
                ],
            }),
        );
        let cdf = Plot::new(
            "cdf.svg",
            "Latency",
            Chart::Cdf(CdfChart {
                x_label: "ms".into(),
                series: vec![
                    ("twill".into(), vec![0.05, 0.06, 0.07, 0.5]),
                    ("kernel".into(), vec![0.04, 0.05]),
                ],
            }),
        );
        let lines = Plot::new(
            "lines.svg",
            "Rate",
            Chart::Lines(LineChart {
                x_label: "services".into(),
                y_label: "conn/s".into(),
                series: vec![
                    Line {
                        name: "twill".into(),
                        points: vec![
                            (
                                1.0,
                                Bar {
                                    value: 8000.0,
                                    low: 7900.0,
                                    high: 8100.0,
                                },
                            ),
                            (
                                30_000.0,
                                Bar {
                                    value: 7900.0,
                                    low: 7900.0,
                                    high: 7900.0,
                                },
                            ),
                        ],
                    },
                    Line {
                        name: "kernel".into(),
                        points: vec![(
                            10_000.0,
                            Bar {
                                value: 5000.0,
                                low: 5000.0,
                                high: 5000.0,
                            },
                        )],
                    },
                ],
            }),
        );
        for plot in [bars, cdf, lines] {
            let path = render(&plot, &dir).unwrap();
            let svg = std::fs::read_to_string(&path).unwrap();
            assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
            assert!(
                svg.contains("twill") && svg.contains("kernel"),
                "legend missing"
            );
        }
        let bars_svg = std::fs::read_to_string(dir.join("bars.svg")).unwrap();
        assert!(bars_svg.contains("vxlan 1 stream"), "group label missing");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
