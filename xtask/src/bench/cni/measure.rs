//! The warm-up, then per repetition the one-at-a-time phase and the concurrent batches.

use anyhow::{Context as _, Result, bail};
use twill_tests::run;

use super::node::{Node, check_batch};
use super::params::{Cmd, Params, Plugin, Results};
use crate::bench::report::fmt_num;
use crate::bench::stats::{Summary, median};

/// The warm-up, then per repetition the one-at-a-time phase and the concurrent batches.
pub(crate) fn measure(
    node: &Node,
    node_ns: &str,
    p: Params,
    progress: &crate::bench::progress::Progress,
) -> Result<Results> {
    let what = "warm-up ADD/DEL per plugin";
    progress.working(what);
    for plugin in Plugin::SEQUENTIAL {
        let add = node.call(plugin, Cmd::Add, "bench-warmup", 0, None)?;
        node.call(plugin, Cmd::Del, "bench-warmup", 0, add.result.as_ref())?;
    }
    for bridge in ["twb0", "twr0"] {
        run(node_ns, &["ip", "link", "show", "dev", bridge])
            .with_context(|| format!("the plugins did not build {bridge} in the node"))?;
    }
    progress.done(what, "bridges up");

    let mut res = Results::default();
    for rep in 0..p.reps {
        let what = format!("rep {}/{}: {} pods one at a time", rep + 1, p.reps, p.pods);
        progress.working(&what);
        node.sequential(rep, p, &mut res.sequential)?;
        let add_p50 = |pl: Plugin| median(&res.sequential[&pl].add_ms);
        progress.done(
            &what,
            &format!(
                "ADD p50 so far: twill {} ms, reference {} ms, floor {} ms",
                fmt_num(add_p50(Plugin::Twill)),
                fmt_num(add_p50(Plugin::Reference)),
                fmt_num(add_p50(Plugin::Floor))
            ),
        );

        let k = Plugin::CONCURRENT.len();
        for j in 0..k {
            let plugin = Plugin::CONCURRENT[(j + rep) % k];
            let what = format!(
                "rep {}/{}: {} concurrent ADDs then DELs, {}",
                rep + 1,
                p.reps,
                p.concurrency,
                plugin.label()
            );
            progress.working(&what);
            if twill_tests::interrupted() {
                bail!("interrupted");
            }
            let add = node
                .batch(plugin, Cmd::Add, rep, p.concurrency, &[])
                .with_context(|| what.clone())?;
            if plugin.is_cni() {
                check_batch(node_ns, plugin, &add.results)?;
            }
            let del = node
                .batch(plugin, Cmd::Del, rep, p.concurrency, &add.results)
                .with_context(|| what.clone())?;
            let add_sum = Summary::of(&add.latencies_ms);
            progress.done(
                &what,
                &format!(
                    "ADD p50 {} p99 {} ms, all done in {} ms, {} ms CPU; DEL p99 {} ms",
                    fmt_num(add_sum.p50),
                    fmt_num(add_sum.p99),
                    fmt_num(add.makespan_ms),
                    fmt_num(add.cpu_ms),
                    fmt_num(Summary::of(&del.latencies_ms).p99)
                ),
            );
            let b = res.concurrent.entry(plugin).or_default();
            b.add_ms.extend(add.latencies_ms);
            b.del_ms.extend(del.latencies_ms);
            b.add_makespan_ms.push(add.makespan_ms);
            b.del_makespan_ms.push(del.makespan_ms);
            b.add_cpu_ms.push(add.cpu_ms);
            b.del_cpu_ms.push(del.cpu_ms);
        }
    }
    Ok(res)
}
