//! The report section (pure: unit tested on made-up samples).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use super::params::{
    ADD_RATIO_TARGET, Batches, CNI_VERSION, CONCURRENT_P99_TARGET_MS, Params, Plugin,
    REFERENCE_DIR, Results, Samples,
};
use crate::bench::report::{Check, Section, Table, fmt_num};
use crate::bench::stats::{Summary, mean, median};

/// A count as a float (counts here are far below 2^52).
pub(crate) fn n_f64(n: usize) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "counts are far below 2^52")]
    let f = n as f64;
    f
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
    let mut sec = Section::new(
        "cni",
        "CNI: twill-cni ADD/DEL vs the reference bridge + host-local",
    );
    let empty = Samples::default();
    let seq = |pl: Plugin| res.sequential.get(&pl).unwrap_or(&empty);

    let ref_add = Summary::of(&seq(Plugin::Reference).add_ms);
    let ref_del = Summary::of(&seq(Plugin::Reference).del_ms);
    let mut one = Table::new(
        format!(
            "One pod at a time: {} pods × {} repetitions per plugin, interleaved; ms",
            p.pods, p.reps
        ),
        &[
            "plugin",
            "ADD p50",
            "ADD p99",
            "DEL p50",
            "DEL p99",
            "ADD p50 / ref",
            "DEL p50 / ref",
            "CPU per ADD",
            "CPU per DEL",
        ],
    );
    for pl in Plugin::SEQUENTIAL {
        let add = Summary::of(&seq(pl).add_ms);
        let del = Summary::of(&seq(pl).del_ms);
        let key = pl.key();
        sec.metric(format!("cni.{key}.add.p50"), "ms", add.p50);
        sec.metric(format!("cni.{key}.add.p99"), "ms", add.p99);
        sec.metric(format!("cni.{key}.del.p50"), "ms", del.p50);
        sec.metric(format!("cni.{key}.del.p99"), "ms", del.p99);
        let (ra, rd) = (add.p50 / ref_add.p50, del.p50 / ref_del.p50);
        if matches!(pl, Plugin::Twill | Plugin::Routed) {
            sec.metric(format!("cni.ratio.{key}.add.p50"), "ratio", ra);
            sec.metric(format!("cni.ratio.{key}.del.p50"), "ratio", rd);
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
    sec.checks.push(Check::at_most(
        "ADD p50 twill-cni / reference",
        twill_add.p50 / ref_add.p50,
        ADD_RATIO_TARGET,
        "",
    ));

    let mut conc = Table::new(
        format!(
            "{} concurrent ADDs, then {} DELs ({} batches each); ms",
            p.concurrency, p.concurrency, p.reps
        ),
        &[
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
        ],
    );
    let none = Batches::default();
    for pl in Plugin::CONCURRENT {
        let b = res.concurrent.get(&pl).unwrap_or(&none);
        let add = Summary::of(&b.add_ms);
        let del = Summary::of(&b.del_ms);
        let (span_add, span_del) = (median(&b.add_makespan_ms), median(&b.del_makespan_ms));
        let per_call = |total: &[f64]| median(total) / n_f64(p.concurrency);
        let key = pl.key();
        sec.metric(format!("cni.{key}.concurrent.add.p50"), "ms", add.p50);
        sec.metric(format!("cni.{key}.concurrent.add.p99"), "ms", add.p99);
        sec.metric(format!("cni.{key}.concurrent.add.makespan"), "ms", span_add);
        sec.metric(format!("cni.{key}.concurrent.del.p99"), "ms", del.p99);
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
            sec.metric(
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
    sec.checks.push(Check::at_most(
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
        sec.notes.push(format!(
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
    sec.notes
        .push(format!("twill-cni: {}", describe_binary(twill)));
    sec.notes.push(format!(
        "reference: {} (containernetworking-plugins)",
        describe_binary(&Path::new(REFERENCE_DIR).join("bridge"))
    ));

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
    sec.cdf(
        "cni-latency.svg",
        "CNI call latency, one pod at a time (exec to exit)",
        "latency, ms (log scale)",
        series,
    );
    let series: Vec<(String, Vec<f64>)> = Plugin::CONCURRENT
        .iter()
        .filter_map(|pl| {
            let b = res.concurrent.get(pl)?;
            (!b.add_ms.is_empty()).then(|| (pl.label().to_string(), b.add_ms.clone()))
        })
        .collect();
    sec.cdf(
        "cni-concurrent.svg",
        format!("{} concurrent ADDs: per-call latency", p.concurrency),
        "latency, ms (log scale)",
        series,
    );

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
        about,
        tables: vec![one, conc],
        raw: serde_json::json!({
            "params": p,
            "sequential": res.sequential,
            "concurrent": res.concurrent,
            "generated_unix_s": SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }),
        ..sec
    }
}
