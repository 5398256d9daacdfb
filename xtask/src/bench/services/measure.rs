//! One proxy mode measured: connection rates per step, full syncs, one change.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use twill_tests::bench_support::LineMonitor;
use twill_tests::metrics::sample;
use twill_tests::ns::in_netns;
use twill_tests::rig::ETCD_PREFIX;
use twill_tests::wait_for;

use super::objects::{
    etcd, filler_entries, measured, one_endpoint_entries, service_json, service_key, slice_json,
    slice_key,
};
use super::params::{
    CHANGE_DEADLINE, ModeResult, NAMESPACE, ONE_ENDPOINT_PREFIX, PORT, Params, Step,
};
use super::rig::{Bench, proxy_args};
use crate::bench::progress::Progress;
use crate::bench::report::fmt_num;
use crate::bench::stats::Summary;
use crate::cluster::Backend;
use crate::cluster::{METRICS_ADDR, ProxyMode, pod_command};

pub(crate) fn measure_mode(
    mode: ProxyMode,
    p: &Params,
    bin_dir: Option<PathBuf>,
    progress: &Progress,
) -> Result<ModeResult> {
    let what = format!("{mode}: rig");
    progress.working(&what);
    // A fresh node per full sync: two shapes per repetition.
    let b = Bench::new(mode, 2 * p.reps, p.rate_secs, bin_dir)?;
    progress.done(&what, &format!("up ({})", b.rig.id()));
    let mut res = ModeResult {
        mode: mode.to_string(),
        ..ModeResult::default()
    };
    let etcd = etcd();
    let underlay = b.rig.underlay_ns();
    let mut fillers = 0;
    let mut last_vip: Option<(String, SocketAddr)> = None;
    for (k, &n) in p.steps.iter().enumerate() {
        let label = format!("{mode} {n} svc");
        let what = format!("{label}: install");
        progress.working(&what);
        let want_fillers = n.saturating_sub(1);
        let (mname, mvip) = measured(k);
        let t0 = Instant::now();
        let kvs = filler_entries(fillers, want_fillers.max(fillers));
        let a_ip = b.a_ip();
        in_netns(&underlay, || {
            etcd.put_many(&kvs, 128, |done| {
                if done % 2048 < 128 {
                    progress.working(&format!("{what}: {done}/{} objects written", kvs.len()));
                }
            })?;
            // The measured service last (its VIP freed first), its endpoint the backend `a`.
            if let Some((previous, _)) = &last_vip {
                etcd.delete_prefix(&service_key(previous))?;
                etcd.delete_prefix(&slice_key(previous))?;
            }
            etcd.txn_put(&[
                (service_key(&mname), service_json(&mname, mvip)),
                (slice_key(&mname), slice_json(&mname, &[a_ip])),
            ])
        })?;
        fillers = want_fillers.max(fillers);
        let done = b.wait_programmed(2, n, progress, &what)?;
        let vip = SocketAddr::from((mvip, PORT));
        wait_for(Duration::from_secs(30), || b.rate(&[vip], 0.05).ok())
            .with_context(|| format!("the measured service {vip} does not answer"))?;
        progress.done(
            &what,
            &format!(
                "{n} services programmed {:.2} s after the first write",
                (done - t0).as_secs_f64()
            ),
        );
        let mut step = Step {
            services: n,
            programmed_s: (k > 0).then(|| (done - t0).as_secs_f64()),
            ..Step::default()
        };
        if n == p.sync_step
            && let Err(e) = full_syncs(&b, n, p.reps, &mut res, progress)
        {
            if twill_tests::interrupted() {
                return Err(e);
            }
            progress.note(&format!("{mode}: full sync not measured: {e:#}"));
            res.full_sync_error = Some(format!("{e:#}"));
        }
        b.rates(vip, &mut step, p.runs, progress, &label)?;
        res.steps.push(step);
        last_vip = Some((mname, vip));
    }
    let (mname, vip) = last_vip.context("no step")?;
    one_change(&b, &mname, vip, p.changes, &mut res, progress)?;

    // Back to the measured service alone.
    let left = 1;
    let what = format!("{mode}: delete the fillers");
    progress.working(&what);
    in_netns(&underlay, || {
        // Every filler's Service and EndpointSlice ("f-<n>", "f-<n>-1").
        etcd.delete_prefix(&service_key("f-"))?;
        etcd.delete_prefix(&format!(
            "{ETCD_PREFIX}/services/endpointslices/{NAMESPACE}/f-"
        ))
    })?;
    b.wait_programmed_at_most(2, left, progress, &what)?;
    progress.done(&what, &format!("{left} services left"));
    let mut after = Step {
        services: left,
        ..Step::default()
    };
    b.rates(
        vip,
        &mut after,
        p.runs,
        progress,
        &format!("{mode} {left} svc (fillers deleted)"),
    )?;
    res.after = Some(after);
    Ok(res)
}

/// Starts a fresh twilld on each extra node in turn and times its first full sync: `reps` times
/// of the `n` services as they are, then `reps` times of the same `n` services with one endpoint
/// each, under [`ONE_ENDPOINT_PREFIX`] (with a copy of the network config, so the fresh twilld
/// is a node of that prefix's cluster of one).
pub(crate) fn full_syncs(
    b: &Bench,
    n: usize,
    reps: usize,
    res: &mut ModeResult,
    progress: &Progress,
) -> Result<()> {
    for r in 0..reps {
        let what = format!("{} full sync of {n} services, rep {}/{reps}", b.mode, r + 1);
        let (sum, start, m) = fresh_full_sync(b, 3 + r, n, &[], progress, &what)?;
        res.full_sync_s.push(sum);
        res.start_to_programmed_s.push(start);
        res.full_sync_frontends = sample(&m, "twill_services_frontends").unwrap_or(f64::NAN);
        res.full_sync_backends = sample(&m, "twill_services_backends").unwrap_or(f64::NAN);
    }

    let what = format!("{}: write {n} services × 1 endpoint", b.mode);
    progress.working(&what);
    let mut kvs = one_endpoint_entries(ONE_ENDPOINT_PREFIX, n);
    kvs.push((
        format!("{ONE_ENDPOINT_PREFIX}/config"),
        Backend::HostGw.network_config(),
    ));
    let etcd = etcd();
    in_netns(&b.rig.underlay_ns(), || etcd.put_many(&kvs, 128, |_| {}))?;
    progress.done(&what, &format!("{} objects", kvs.len()));
    for r in 0..reps {
        let what = format!(
            "{} full sync of {n} services × 1 endpoint, rep {}/{reps}",
            b.mode,
            r + 1
        );
        let (sum, start, _) = fresh_full_sync(
            b,
            3 + reps + r,
            n,
            &["--etcd-prefix", ONE_ENDPOINT_PREFIX],
            progress,
            &what,
        )?;
        res.full_sync_one_s.push(sum);
        res.start_to_programmed_one_s.push(start);
    }
    Ok(())
}

/// Starts a fresh twilld on `node` (with `extra` flags), waits until it has programmed `n`
/// frontends, stops it. Its first sync (agent's histogram), s; start → programmed, s; its last
/// metrics.
pub(crate) fn fresh_full_sync(
    b: &Bench,
    node: usize,
    n: usize,
    extra: &[&str],
    progress: &Progress,
    what: &str,
) -> Result<(f64, f64, String)> {
    progress.working(what);
    let mut args = vec![
        "--metrics-addr".to_string(),
        METRICS_ADDR.to_string(),
        "--resync-interval".to_string(),
        "3600".to_string(),
    ];
    args.extend(proxy_args(&b.rig, node, b.mode)?);
    args.extend(extra.iter().map(ToString::to_string));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let t0 = Instant::now();
    b.rig.start_twilld(node, &args)?;
    let done = b.wait_programmed(node, n, progress, what)?;
    let m = wait_for(Duration::from_secs(10), || {
        let m = b.metrics(node).ok()?;
        let full = sample(&m, r#"twill_services_syncs_total{kind="full",result="ok"}"#)?;
        (full >= 1.0).then_some(m)
    })
    .context("no full sync in the metrics")?;
    let count =
        sample(&m, "twill_services_sync_duration_seconds_count").context("no sync histogram")?;
    let sum =
        sample(&m, "twill_services_sync_duration_seconds_sum").context("no sync histogram")?;
    ensure!(
        (count - 1.0).abs() < f64::EPSILON,
        "expected the fresh twilld's first sync alone, found {count} syncs"
    );
    let start = (done - t0).as_secs_f64();
    progress.done(
        what,
        &format!(
            "{} ms (agent), {} s from start to programmed",
            fmt_num(sum * 1000.0),
            fmt_num(start)
        ),
    );
    // Its CPU and memory are not part of the rest of the run.
    b.rig
        .kill_twilld(node, nix::sys::signal::Signal::SIGTERM)
        .with_context(|| format!("stop twilld on node {node}"))?;
    Ok((sum, start, m))
}

/// Swaps the measured service's endpoint between `a` and `b`, timing each change at the agent
/// and end to end.
pub(crate) fn one_change(
    b: &Bench,
    name: &str,
    vip: SocketAddr,
    changes: usize,
    res: &mut ModeResult,
    progress: &Progress,
) -> Result<()> {
    let what = format!(
        "{} one endpoint change with {} services",
        b.mode,
        res.steps.last().map_or(0, |s| s.services)
    );
    progress.working(&what);
    let target = vip.to_string();
    let cmd = pod_command(
        &b.rig,
        &b.client,
        b.mode,
        &[
            &b.probe,
            "follow",
            &target,
            "--interval-us",
            "200",
            "--secs",
            "600",
        ],
    )?;
    let follow = LineMonitor::from_command(cmd, &format!("twill-probe follow {target}"))?;
    let first = wait_for(Duration::from_secs(10), || {
        follow.next_line(Duration::from_millis(100)).ok().flatten()
    })
    .context("twill-probe follow printed nothing")?;
    ensure!(
        first.1 == "a",
        "the follower's first answer is {:?}, not a",
        first.1
    );
    let etcd = etcd();
    let key = slice_key(name);
    let (a_ip, b_ip) = (b.a_ip(), b.b_ip());
    for i in 0..changes {
        if twill_tests::interrupted() {
            bail!("interrupted");
        }
        let (to_name, to_ip) = if i % 2 == 0 { ("b", b_ip) } else { ("a", a_ip) };
        let before = b.metrics(2)?;
        let count0 = sample(&before, "twill_services_sync_duration_seconds_count")
            .context("no sync histogram")?;
        let sum0 = sample(&before, "twill_services_sync_duration_seconds_sum")
            .context("no sync histogram")?;
        follow.drain();
        let value = slice_json(name, &[to_ip]);
        let t0 = Instant::now();
        in_netns(&b.rig.underlay_ns(), || etcd.put(&key, &value))?;
        let deadline = t0 + CHANGE_DEADLINE;
        let mut seen = None;
        while seen.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match follow.next_line(left)? {
                Some((at, line)) if line == to_name => seen = Some(at),
                Some((_, line)) if line.starts_with('!') => res.change_glitches += 1,
                Some(_) => {}
                None => break,
            }
        }
        match seen {
            Some(at) => res.change_e2e_ms.push(ms(at - t0)),
            None => res.change_lost += 1,
        }
        // The agent's own account of the change: the one sync it caused.
        let after = wait_for(Duration::from_secs(2), || {
            let m = b.metrics(2).ok()?;
            let c = sample(&m, "twill_services_sync_duration_seconds_count")?;
            (c > count0).then_some(m)
        });
        if let Ok(m) = after {
            let count =
                sample(&m, "twill_services_sync_duration_seconds_count").unwrap_or(f64::NAN);
            let sum = sample(&m, "twill_services_sync_duration_seconds_sum").unwrap_or(f64::NAN);
            if (count - count0 - 1.0).abs() < f64::EPSILON {
                res.change_agent_ms.push((sum - sum0) * 1000.0);
            }
        }
        if i % 5 == 0 {
            progress.working(&format!("{what}: {}/{changes}", i + 1));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(follow);
    ensure!(
        !res.change_e2e_ms.is_empty(),
        "no endpoint change reached the client within {CHANGE_DEADLINE:?}"
    );
    let e2e = Summary::of(&res.change_e2e_ms);
    let agent = Summary::of(&res.change_agent_ms);
    progress.done(
        &what,
        &format!(
            "agent p50 {} ms p99 {} ms; end to end p50 {} ms p99 {} ms; {} lost",
            fmt_num(agent.p50),
            fmt_num(agent.p99),
            fmt_num(e2e.p50),
            fmt_num(e2e.p99),
            res.change_lost
        ),
    );
    Ok(())
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
