//! The report section (pure: unit tested on made-up samples).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::params::{
    ADD_RATIO_TARGET, Batches, CNI_VERSION, CONCURRENT_P99_TARGET_MS, Params, Plugin,
    REFERENCE_DIR, Results, Samples,
};
use crate::bench::plot::{CdfChart, Plot};
use crate::bench::report::{Check, Metric, Section, Table, fmt_num};
use crate::bench::stats::{Summary, mean, median};

/// A count as a float (counts here are far below 2^52).
pub(crate) fn n_f64(n: usize) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "counts are far below 2^52")]
    let f = n as f64;
    f
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(crate) fn metric(metrics: &mut Vec<Metric>, name: String, unit: &str, value: f64) {
    metrics.push(Metric {
        name,
        unit: unit.into(),
        value,
    });
}

/// `path` and its modification time, so a stale binary shows in the report.
pub(crate) fn describe_binary(path: &Path) -> String {
    let built = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or_else(
            || "unknown".to_string(),
            |d| crate::bench::machine::rfc3339(d.as_secs()),
        );
    format!("{} (modified {built})", path.display())
}

/// The report section (pure: unit tested on made-up samples).
pub(crate) fn section(res: &Results, p: Params, twill: &Path) -> Section {
    let mut metrics = Vec::new();
    let mut checks = Vec::new();
    let mut notes = Vec::new();
    let empty = Samples::default();
    let seq = |pl: Plugin| res.sequential.get(&pl).unwrap_or(&empty);

    let ref_add = Summary::of(&seq(Plugin::Reference).add_ms);
    let ref_del = Summary::of(&seq(Plugin::Reference).del_ms);
    let mut one = Table {
        title: format!(
            "One pod at a time: {} pods × {} repetitions per plugin, interleaved; ms",
            p.pods, p.reps
        ),
        header: [
            "plugin",
            "ADD p50",
            "ADD p99",
            "DEL p50",
            "DEL p99",
            "ADD p50 / ref",
            "DEL p50 / ref",
            "CPU per ADD",
            "CPU per DEL",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    for pl in Plugin::SEQUENTIAL {
        let add = Summary::of(&seq(pl).add_ms);
        let del = Summary::of(&seq(pl).del_ms);
        let key = pl.key();
        metric(&mut metrics, format!("cni.{key}.add.p50"), "ms", add.p50);
        metric(&mut metrics, format!("cni.{key}.add.p99"), "ms", add.p99);
        metric(&mut metrics, format!("cni.{key}.del.p50"), "ms", del.p50);
        metric(&mut metrics, format!("cni.{key}.del.p99"), "ms", del.p99);
        let (ra, rd) = (add.p50 / ref_add.p50, del.p50 / ref_del.p50);
        if matches!(pl, Plugin::Twill | Plugin::Routed) {
            metric(
                &mut metrics,
                format!("cni.ratio.{key}.add.p50"),
                "ratio",
                ra,
            );
            metric(
                &mut metrics,
                format!("cni.ratio.{key}.del.p50"),
                "ratio",
                rd,
            );
        }
        one.rows.push(vec![
            pl.label().into(),
            fmt_num(add.p50),
            fmt_num(add.p99),
            fmt_num(del.p50),
            fmt_num(del.p99),
            format!("{ra:.2}"),
            format!("{rd:.2}"),
            fmt_num(mean(&seq(pl).add_cpu_ms)),
            fmt_num(mean(&seq(pl).del_cpu_ms)),
        ]);
    }
    let twill_add = Summary::of(&seq(Plugin::Twill).add_ms);
    checks.push(Check::at_most(
        "ADD p50 twill-cni / reference",
        twill_add.p50 / ref_add.p50,
        ADD_RATIO_TARGET,
        "",
    ));

    let mut conc = Table {
        title: format!(
            "{} concurrent ADDs, then {} DELs ({} batches each); ms",
            p.concurrency, p.concurrency, p.reps
        ),
        header: [
            "plugin",
            "ADD p50",
            "ADD p99",
            "ADD max",
            "all ADDs done",
            "CPU per ADD",
            "DEL p50",
            "DEL p99",
            "all DELs done",
            "CPU per DEL",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    let none = Batches::default();
    for pl in Plugin::CONCURRENT {
        let b = res.concurrent.get(&pl).unwrap_or(&none);
        let add = Summary::of(&b.add_ms);
        let del = Summary::of(&b.del_ms);
        let (span_add, span_del) = (median(&b.add_makespan_ms), median(&b.del_makespan_ms));
        let per_call = |total: &[f64]| median(total) / n_f64(p.concurrency);
        let key = pl.key();
        metric(
            &mut metrics,
            format!("cni.{key}.concurrent.add.p50"),
            "ms",
            add.p50,
        );
        metric(
            &mut metrics,
            format!("cni.{key}.concurrent.add.p99"),
            "ms",
            add.p99,
        );
        metric(
            &mut metrics,
            format!("cni.{key}.concurrent.add.makespan"),
            "ms",
            span_add,
        );
        metric(
            &mut metrics,
            format!("cni.{key}.concurrent.del.p99"),
            "ms",
            del.p99,
        );
        conc.rows.push(vec![
            pl.label().into(),
            fmt_num(add.p50),
            fmt_num(add.p99),
            fmt_num(add.max),
            fmt_num(span_add),
            fmt_num(per_call(&b.add_cpu_ms)),
            fmt_num(del.p50),
            fmt_num(del.p99),
            fmt_num(span_del),
            fmt_num(per_call(&b.del_cpu_ms)),
        ]);
        if pl.is_cni() {
            metric(
                &mut metrics,
                format!("cni.{key}.concurrent.add.cpu_per_call"),
                "ms",
                per_call(&b.add_cpu_ms),
            );
        }
    }
    let twill_conc = res
        .concurrent
        .get(&Plugin::Twill)
        .map_or(f64::NAN, |b| Summary::of(&b.add_ms).p99);
    checks.push(Check::at_most(
        format!("{} concurrent ADDs p99, twill-cni", p.concurrency),
        twill_conc,
        CONCURRENT_P99_TARGET_MS,
        "ms",
    ));
    if twill_conc > CONCURRENT_P99_TARGET_MS
        && let Some(b) = res.concurrent.get(&Plugin::Twill)
    {
        // Work conservation: by time t the CPUs have done at most cpus × t of work, and the
        // 99th of 100 calls to finish needs 99 calls' worth.
        let cpu = median(&b.add_cpu_ms) / n_f64(p.concurrency);
        let cpus = n_f64(p.cpus);
        let floor = res
            .concurrent
            .get(&Plugin::Floor)
            .map_or(f64::NAN, |f| Summary::of(&f.add_ms).p99);
        notes.push(format!(
            "Concurrent target: a batch of {n} twill-cni ADDs used {} ms of CPU per ADD (process \
             start included, median of the batches); on {} CPU(s) the 99th of {n} calls \
             started together cannot finish before ≈ 0.99 × {n} × {} / {} = {} ms. A p99 of \
             {CONCURRENT_P99_TARGET_MS} ms needs ≤ {} ms of CPU per ADD here. For scale, \
             {n} concurrent /bin/true: p99 {} ms.",
            fmt_num(cpu),
            p.cpus,
            fmt_num(cpu),
            p.cpus,
            fmt_num(0.99 * n_f64(p.concurrency) * cpu / cpus),
            fmt_num(CONCURRENT_P99_TARGET_MS * cpus / (0.99 * n_f64(p.concurrency))),
            fmt_num(floor),
            n = p.concurrency,
        ));
    }
    notes.push(format!("twill-cni: {}", describe_binary(twill)));
    notes.push(format!(
        "reference: {} (containernetworking-plugins)",
        describe_binary(&Path::new(REFERENCE_DIR).join("bridge"))
    ));

    let mut plots = Vec::new();
    let series: Vec<(String, Vec<f64>)> = Plugin::SEQUENTIAL
        .iter()
        .map(|&pl| (format!("{} ADD", pl.label()), seq(pl).add_ms.clone()))
        .chain(
            [Plugin::Twill, Plugin::Reference]
                .iter()
                .map(|&pl| (format!("{} DEL", pl.label()), seq(pl).del_ms.clone())),
        )
        .filter(|(_, v)| !v.is_empty())
        .collect();
    if !series.is_empty() {
        plots.push(Plot::Cdf(CdfChart {
            file: "cni-latency.svg".into(),
            title: "CNI call latency, one pod at a time (exec to exit)".into(),
            x_label: "latency, ms (log scale)".into(),
            series,
        }));
    }
    let series: Vec<(String, Vec<f64>)> = Plugin::CONCURRENT
        .iter()
        .filter_map(|pl| {
            let b = res.concurrent.get(pl)?;
            (!b.add_ms.is_empty()).then(|| (pl.label().to_string(), b.add_ms.clone()))
        })
        .collect();
    if !series.is_empty() {
        plots.push(Plot::Cdf(CdfChart {
            file: "cni-concurrent.svg".into(),
            title: format!("{} concurrent ADDs: per-call latency", p.concurrency),
            x_label: "latency, ms (log scale)".into(),
            series,
        }));
    }

    let about = format!(
        "The plugins are exec'ed as a runtime on the node execs them — `CNI_*` environment, \
         the {CNI_VERSION} network config on stdin (DEL with the ADD's `prevResult`) — by a \
         thread inside a rig node's namespace; a call is timed from spawn to the plugin's exit, \
         process start included. twill-cni in bridge mode (its default) and in routed mode \
         against the reference `bridge` (`isGateway`) + `host-local` from Debian's \
         containernetworking-plugins, each on its own bridge and subnet; `/bin/true` exec'ed \
         the same way is the floor. One pod at a time: per pod one ADD of each (the first one \
         rotating), then the DELs; {} pods × {} repetitions after one untimed ADD/DEL per \
         plugin. Concurrent: {} threads released at once each run an ADD on a pod of its own, \
         then {} DELs; the batches of twill, the reference and `/bin/true` take turns. \
         \"All done\" is from the first spawn to the last exit (median of the batches).",
        p.pods, p.reps, p.concurrency, p.concurrency
    );

    Section {
        name: "cni".into(),
        title: "CNI: twill-cni ADD/DEL vs the reference bridge + host-local".into(),
        about,
        metrics,
        tables: vec![one, conc],
        checks,
        notes,
        plot_files: Vec::new(),
        plots,
        raw: serde_json::json!({
            "params": p,
            "sequential": res.sequential,
            "concurrent": res.concurrent,
            "generated_unix_s": SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }),
    }
}
