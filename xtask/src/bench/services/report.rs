//! The report section: tables, checks against the targets, plots.

use super::params::{
    BaselineResult, CHANGE_DEADLINE, EBPF_CHANGE_P99_TARGET_MS, EBPF_FULL_SYNC_TARGET_S,
    EBPF_SCALE_TARGET, EBPF_VIP_DIRECT_TARGET, ENDPOINTS, IPT_FULL_SYNC_TARGET_S, ModeOutcome,
    NFT_CHANGE_P99_TARGET_MS, NFT_SCALE_TARGET, PORT, Params, Step,
};
use crate::bench::plot::{Bar, BarChart, BarSeries, Chart, Line, LineChart, Plot};
use crate::bench::report::{Check, Section, Table, fmt_num};
use crate::bench::stats::{Summary, median};

/// The "as measured" cell: median VIP and pod-IP rates, stalls included.
pub(crate) fn measured_cell(step: &Step) -> String {
    format!(
        "{} / {}",
        fmt_num(median(&step.vip_measured)),
        fmt_num(median(&step.direct_measured))
    )
}

/// The VIP's and the pod IP's connection rates of `key` (a mode, or a hand-written baseline) at
/// `services` services.
fn rate_metrics(sec: &mut Section, key: &str, services: usize, vip: f64, direct: f64) {
    sec.metric(format!("services.{key}.vip_rate.{services}"), "conn/s", vip);
    sec.metric(
        format!("services.{key}.direct_rate.{services}"),
        "conn/s",
        direct,
    );
}

/// Median of the per-repetition VIP/direct ratios.
pub(crate) fn paired(step: &Step) -> f64 {
    let r: Vec<f64> = step
        .vip
        .iter()
        .zip(&step.direct)
        .map(|(v, d)| v / d)
        .collect();
    median(&r)
}

#[expect(clippy::cast_precision_loss, reason = "service counts far below 2^52")]
pub(crate) fn section(
    p: &Params,
    outcomes: &[ModeOutcome],
    baseline: Option<&BaselineResult>,
    notes: Vec<String>,
) -> Section {
    let mut sec = Section::new(
        "services",
        "Services: connection rate vs number of services, sync and one-change latency",
    );
    sec.notes = notes;
    let mut rates = Table::new(
        format!(
            "Fresh TCP connections/s, one at a time from a pod on another node ({} runs of {} s \
             per step, VIP and pod IP taken in turn; rates at the median connection latency, \
             medians of the runs)",
            p.runs, p.rate_secs
        ),
        &[
            "mode",
            "services",
            "VIP conn/s",
            "pod IP conn/s",
            "VIP/pod IP",
            "VIP/pod IP vs 1 service",
            "as measured, stalls included: VIP / pod IP conn/s",
            "written → programmed",
        ],
    );
    let mut syncs = Table::new(
        format!(
            "Programming: full sync of {} services × {ENDPOINTS} endpoints (and × 1) by a fresh \
             twilld, one endpoint change with {} services installed",
            p.sync_step,
            p.steps.last().copied().unwrap_or(0)
        ),
        &[
            "mode",
            "full sync (agent)",
            "start → programmed",
            "full sync × 1 endpoint (agent)",
            "start → programmed × 1",
            "one change p50 / p99 (agent)",
            "one change p50 / p99 (etcd write → traffic)",
            "lost",
        ],
    );
    let mut lines = Vec::new();
    let mut lat_series = Vec::new();
    let mut change_series = Vec::new();
    let mut sync_groups = Vec::new();
    let mut sync_bars = Vec::new();
    let first_step = p.steps.first().copied().unwrap_or(1);
    let last_step = p.steps.last().copied().unwrap_or(1);
    for o in outcomes {
        let r = match o {
            ModeOutcome::Unavailable { mode, reason } => {
                rates.rows.push(vec![
                    mode.clone(),
                    "-".into(),
                    "unavailable".into(),
                    "unavailable".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ]);
                syncs.rows.push(vec![
                    mode.clone(),
                    "unavailable".into(),
                    "unavailable".into(),
                    "unavailable".into(),
                    "unavailable".into(),
                    "-".into(),
                ]);
                sec.notes
                    .push(format!("{mode}: unavailable (not measured) — {reason}"));
                continue;
            }
            ModeOutcome::Measured(r) => r,
        };
        let mode = r.mode.as_str();
        let base_rate = r.steps.first().map_or(f64::NAN, |s| median(&s.vip));
        let base_ratio = r.steps.first().map_or(f64::NAN, paired);
        let mut vip_line = Vec::new();
        let mut direct_line = Vec::new();
        for s in &r.steps {
            let vip = median(&s.vip);
            let direct = median(&s.direct);
            let ratio = paired(s);
            let scale_rel = ratio / base_ratio;
            let n = s.services;
            rate_metrics(&mut sec, mode, n, vip, direct);
            let measured = median(&s.vip_measured);
            sec.metric(
                format!("services.{mode}.vip_rate_measured.{n}"),
                "conn/s",
                measured,
            );
            sec.metric(
                format!("services.{mode}.vip_over_direct.{n}"),
                "ratio",
                ratio,
            );
            rates.rows.push(vec![
                mode.to_string(),
                s.services.to_string(),
                fmt_num(vip),
                fmt_num(direct),
                format!("{ratio:.3}"),
                format!("{scale_rel:.3}"),
                measured_cell(s),
                s.programmed_s
                    .map_or_else(|| "-".into(), |t| format!("{} s", fmt_num(t))),
            ]);
            vip_line.extend(Bar::of(&s.vip).map(|b| (s.services as f64, b)));
            direct_line.extend(Bar::of(&s.direct).map(|b| (s.services as f64, b)));
            if s.services == last_step {
                lat_series.push((
                    format!("{mode} VIP, {} svc", s.services),
                    s.vip_lat_us.clone(),
                ));
                lat_series.push((format!("{mode} direct"), s.direct_lat_us.clone()));
            }
        }
        if let Some(a) = &r.after {
            let ratio = paired(a);
            sec.metric(
                format!("services.{mode}.vip_over_direct.fillers_deleted"),
                "ratio",
                ratio,
            );
            rates.rows.push(vec![
                mode.to_string(),
                format!("{} (fillers deleted)", a.services),
                fmt_num(median(&a.vip)),
                fmt_num(median(&a.direct)),
                format!("{ratio:.3}"),
                format!("{:.3}", ratio / base_ratio),
                measured_cell(a),
                "-".into(),
            ]);
        }
        lines.push(Line {
            name: format!("{mode}: VIP"),
            points: vip_line,
        });
        lines.push(Line {
            name: format!("{mode}: direct pod IP"),
            points: direct_line,
        });
        let last = r.steps.last();
        // The VIP's rate at the last step over its rate at the first, each taken relative to the
        // pod IP's measured alongside: steps are minutes apart, and this machine's load moves
        // more than that in minutes. (The raw ratio is in the table and the metrics.)
        let vip_direct = last.map_or(f64::NAN, paired);
        let scale = vip_direct / base_ratio;
        let scale_raw = last.map_or(f64::NAN, |s| median(&s.vip)) / base_rate;
        sec.metric(format!("services.{mode}.scale_ratio"), "ratio", scale);
        sec.metric(
            format!("services.{mode}.scale_ratio_raw"),
            "ratio",
            scale_raw,
        );
        let full = median(&r.full_sync_s);
        let start = median(&r.start_to_programmed_s);
        let full_one = median(&r.full_sync_one_s);
        let start_one = median(&r.start_to_programmed_one_s);
        if let Some(e) = &r.full_sync_error {
            sec.notes.push(format!(
                "{mode}: full sync of {} services not measured: {e}",
                p.sync_step
            ));
        } else {
            for (name, v) in [
                ("full_sync", full),
                ("start_to_programmed", start),
                ("full_sync_one_endpoint", full_one),
                ("start_to_programmed_one_endpoint", start_one),
            ] {
                sec.metric(format!("services.{mode}.{name}"), "s", v);
            }
        }
        let agent = Summary::of(&r.change_agent_ms);
        let e2e = Summary::of(&r.change_e2e_ms);
        for (name, v) in [
            ("agent.p50", agent.p50),
            ("agent.p99", agent.p99),
            ("e2e.p50", e2e.p50),
            ("e2e.p99", e2e.p99),
        ] {
            sec.metric(format!("services.{mode}.change.{name}"), "ms", v);
        }
        let failed = |v: f64, text: String| {
            if v.is_finite() {
                text
            } else {
                "FAILED (see notes)".to_string()
            }
        };
        syncs.rows.push(vec![
            mode.to_string(),
            failed(full, format!("{} ms", fmt_num(full * 1000.0))),
            failed(start, format!("{} s", fmt_num(start))),
            failed(full_one, format!("{} ms", fmt_num(full_one * 1000.0))),
            failed(start_one, format!("{} s", fmt_num(start_one))),
            format!("{} / {} ms", fmt_num(agent.p50), fmt_num(agent.p99)),
            format!("{} / {} ms", fmt_num(e2e.p50), fmt_num(e2e.p99)),
            format!("{}", r.change_lost),
        ]);
        if r.change_lost > 0 || r.change_glitches > 0 {
            sec.notes.push(format!(
                "{mode}: {} endpoint change(s) not seen by the client within {CHANGE_DEADLINE:?}, \
                 {} failed connection(s) of the follower while endpoints changed",
                r.change_lost, r.change_glitches
            ));
        }
        if r.change_agent_ms.len() < r.change_e2e_ms.len() {
            sec.notes.push(format!(
                "{mode}: {} of {} changes had no single matching sync in the agent's histogram \
                 (two changes coalesced, or a sync came from elsewhere): left out of the agent \
                 figures",
                r.change_e2e_ms.len() - r.change_agent_ms.len(),
                r.change_e2e_ms.len()
            ));
        }
        change_series.push((format!("{mode} agent"), r.change_agent_ms.clone()));
        change_series.push((format!("{mode} etcd → traffic"), r.change_e2e_ms.clone()));
        if !r.full_sync_s.is_empty() {
            sync_groups.push(format!("twill {mode}"));
            sync_bars.push(Bar::of(&r.full_sync_s));
        }
        let scale_what = format!(
            "{mode}: VIP rate at {last_step} / at {first_step} services (each relative to the pod \
             IP's alongside)"
        );
        let change_what = format!("{mode}: one endpoint change p99 (agent), {last_step} services");
        match mode {
            "ebpf" => {
                sec.checks
                    .push(Check::at_least(scale_what, scale, EBPF_SCALE_TARGET));
                sec.checks.push(Check::at_least(
                    format!("ebpf: VIP / direct pod IP rate, {last_step} services"),
                    vip_direct,
                    EBPF_VIP_DIRECT_TARGET,
                ));
                sec.checks.push(Check::at_most(
                    format!("ebpf: full sync of {} services × {ENDPOINTS}", p.sync_step),
                    full,
                    EBPF_FULL_SYNC_TARGET_S,
                    "s",
                ));
                sec.checks.push(Check::at_most(
                    change_what,
                    agent.p99,
                    EBPF_CHANGE_P99_TARGET_MS,
                    "ms",
                ));
            }
            "nftables" => {
                sec.checks
                    .push(Check::at_least(scale_what, scale, NFT_SCALE_TARGET));
                sec.checks.push(Check::at_most(
                    change_what,
                    agent.p99,
                    NFT_CHANGE_P99_TARGET_MS,
                    "ms",
                ));
            }
            // The shape of the hand-written iptables-legacy-restore baseline: one endpoint.
            "iptables" => sec.checks.push(Check::at_most(
                format!(
                    "iptables: full sync of {} services × 1 endpoint (target is for the legacy \
                     backend)",
                    p.sync_step
                ),
                full_one,
                IPT_FULL_SYNC_TARGET_S,
                "s",
            )),
            _ => {}
        }
    }
    if let Some(bl) = baseline {
        for (label, key, step, load) in [
            (
                "nft verdict map (by hand)",
                "nft_by_hand",
                &bl.nft,
                bl.nft_load_s,
            ),
            (
                "iptables-legacy (by hand)",
                "iptables_legacy_by_hand",
                &bl.ipt,
                bl.ipt_load_s,
            ),
        ] {
            let vip = median(&step.vip);
            let direct = median(&step.direct);
            rate_metrics(&mut sec, key, bl.services, vip, direct);
            sec.metric(format!("services.{key}.load"), "s", load);
            rates.rows.push(vec![
                label.into(),
                bl.services.to_string(),
                fmt_num(vip),
                fmt_num(direct),
                format!("{:.3}", paired(step)),
                "-".into(),
                measured_cell(step),
                format!("{} s (load)", fmt_num(load)),
            ]);
            lines.push(Line {
                name: format!("{label}: VIP"),
                points: Bar::of(&step.vip)
                    .map(|b| (bl.services as f64, b))
                    .into_iter()
                    .collect(),
            });
            lat_series.push((
                format!("{label} VIP, {} svc", bl.services),
                step.vip_lat_us.clone(),
            ));
        }
        sec.notes.push(format!(
            "iptables (by hand, and twill's iptables mode): the first packet of *every* new \
             connection through node 2 walks the nat table's services chain, direct ones \
             included, so a VIP/direct ratio near 1 there does not mean the {} rules are free — \
             compare its direct rate with the other rows' instead",
            bl.services
        ));
        let add_one = Summary::of(&bl.nft_add_one_ms);
        sec.metric("services.nft_by_hand.add_one.p50", "ms", add_one.p50);
        syncs.rows.push(vec![
            format!("nft -f by hand ({} services × 1 endpoint)", bl.services),
            format!("{} ms", fmt_num(bl.nft_load_s * 1000.0)),
            "-".into(),
            format!("{} ms (nft -f adding one)", fmt_num(add_one.p50)),
            "-".into(),
            "-".into(),
        ]);
        syncs.rows.push(vec![
            format!(
                "iptables-legacy-restore by hand ({} services × 1 endpoint)",
                bl.services
            ),
            format!("{} ms", fmt_num(bl.ipt_load_s * 1000.0)),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
        ]);
        sync_groups.push(format!("nft -f by hand ({}×1)", bl.services));
        sync_bars.push(Bar::of(&[bl.nft_load_s]));
        sync_groups.push(format!("iptables-legacy-restore ({}×1)", bl.services));
        sync_bars.push(Bar::of(&[bl.ipt_load_s]));
    }

    if lines.iter().any(|l| !l.points.is_empty()) {
        sec.plots.push(Plot::new(
            "services-rate.svg",
            "Fresh connections/s vs services installed (median; whiskers: min–max)",
            Chart::Lines(LineChart {
                x_label: "services installed (log scale)".into(),
                y_label: "connections/s".into(),
                series: lines,
            }),
        ));
    }
    sec.cdf(
        "services-connect-latency.svg",
        "Connection latency (connect to the server's close), largest step",
        "µs (log scale)",
        lat_series,
    );
    if change_series.iter().any(|(_, v)| !v.is_empty()) {
        sec.cdf(
            "services-one-change.svg",
            format!("One endpoint change with {last_step} services"),
            "ms (log scale)",
            change_series,
        );
    }
    if sync_bars.iter().any(Option::is_some) {
        sec.plots.push(Plot::new(
            "services-full-sync.svg",
            format!("Full sync: twill ({} services × {ENDPOINTS} endpoints) and hand-written rule loads", p.sync_step),
            Chart::Bars(BarChart {
            y_label: "seconds".into(),
            groups: sync_groups,
            series: vec![BarSeries {
                name: "full sync / load".into(),
                values: sync_bars,
            }],
        }),
        ));
    }

    let about = format!(
        "Per proxy mode a rig of its own: node 1 hosts two backend pods (`a`, `b`, made by \
         twill-cni, each a `twill-probe serve` answering its name on :8080 and :8081), node 2 the \
         client pod and the only twilld with a service proxy (`--resync-interval 3600`; iptables \
         on its legacy backend, `--iptables-backend legacy`). Services \
         are ClusterIP, port {PORT} → 8080; fillers have {ENDPOINTS} endpoints each (addresses \
         nothing answers on) and are written straight into etcd in 128-object transactions; at \
         each step a new measured service (endpoint `a`) is created last, with the name that \
         sorts last and the highest VIP, so even a linear dataplane meets it after all others; \
         the previous step's measured service is deleted first and the new one takes its VIP \
         (through DNAT, one backend reached through two VIPs from reused source ports has SYNs \
         refused by PAWS on the backend's TIME_WAIT sockets, ~10 ms each: Linux derives TCP \
         timestamp offsets from the destination address). \
         The client is `twill-probe rate`: fresh TCP connections one at a time (the server \
         closes first), run in the client pod and — for eBPF — in node 2's cgroup, where the \
         socket-level load balancer is attached. It takes the VIP (→ a:8080) and the pod IP \
         (→ a:8081; another port, so the server's TIME_WAIT sockets never see both) in turn, \
         connection by connection, so both meet the same background load. An address's rate in \
         a run is taken at the run's median connection latency (1 / p50): on this shared \
         two-core machine, scheduler stalls of tens of milliseconds land on random connections \
         and swing a mean by 2× from one run to the next, a median barely; the rates as \
         measured (connections over the time spent on them, stalls included) are in the last \
         column. {} runs of {} s per step after a short warm-up; figures are medians of the \
         runs, VIP/pod IP the median of the runs' ratios. \
         \"VIP/direct vs 1 service\" (the ratio the scale targets are checked on) is that \
         ratio at a step over the same at 1 service: the steps are minutes apart, and on this \
         machine the load moves the absolute rates by tens of percent in minutes, while the pod \
         IP's path does not depend on the number of services (except with iptables, see the \
         notes). The raw \"VIP rate vs 1 service\" is given too.\n\n\
         Full sync: at {} services a fresh twilld starts on an extra node (one per repetition); \
         its first sync's duration is read from its own `twill_services_sync_duration_seconds` \
         (plan + apply), and the time from its start until `/metrics` reports every frontend \
         programmed is given too; then again on other fresh nodes with the same services at one \
         endpoint each (a second etcd prefix), the shape of the hand-written baselines. One \
         change: with {} services installed, the measured service's \
         only endpoint is swapped between `a` and `b` {} times through etcd; the agent figure is \
         the one sync it caused (histogram sum before and after), the end-to-end figure runs \
         from just before the etcd write until `twill-probe follow` (a connection every 200 µs \
         from the client) is answered by the new backend.\n\n\
         Hand-written baselines (ENVIRONMENT.md), in a rig without any twill proxy: {} services \
         as an nft verdict map (`ip daddr . meta l4proto . th dport vmap`, a chain per service) \
         and as iptables-legacy chains (one rule per service in a services chain, the measured \
         one last), each loaded with one `nft -f` / `iptables-legacy-restore` into node 2 and \
         measured like the modes. Node namespaces set `nf_conntrack_tcp_timeout_time_wait` to \
         10 s, for every mode and baseline alike (at thousands of connections a second the \
         default 120 s fills the machine-wide table).",
        p.runs, p.rate_secs, p.sync_step, last_step, p.changes, p.baseline_services
    );
    Section {
        about,
        tables: vec![rates, syncs],
        raw: serde_json::json!({
            "params": p,
            "modes": outcomes,
            "baseline": baseline,
        }),
        ..sec
    }
}
