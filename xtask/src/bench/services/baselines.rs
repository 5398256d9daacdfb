//! The hand-written kernel rules (an nft verdict map, iptables-legacy chains), timed in the same run.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use twill_tests::run;

use super::measure::ms;
use super::objects::filler;
use super::params::{BaselineResult, PORT, Params, VIP_TARGET_PORT};
use super::rig::Bench;
use crate::bench::progress::Progress;
use crate::bench::report::fmt_num;
use crate::cluster::ProxyMode;

/// The measured VIP of the baselines (after every filler, in every order).
pub(crate) const BASELINE_VIP: Ipv4Addr = Ipv4Addr::new(10, 111, 255, 254);

/// An nft table in the shape twill's nftables mode takes: one verdict map keyed on address .
/// protocol . port, a chain per service. Fillers DNAT to their first endpoint.
pub(crate) fn nft_ruleset(n: usize, a: Ipv4Addr) -> String {
    let mut elements = String::new();
    let mut chains = String::new();
    for i in 0..n.saturating_sub(1) {
        let (_, vip, eps) = filler(i);
        let _ = write!(elements, "{vip} . tcp . {PORT} : goto s{i}, ");
        let _ = writeln!(
            chains,
            "  chain s{i} {{\n    meta l4proto tcp dnat to {}:{VIP_TARGET_PORT}\n  }}",
            eps[0]
        );
    }
    let _ = write!(elements, "{BASELINE_VIP} . tcp . {PORT} : goto measured");
    let _ = writeln!(
        chains,
        "  chain measured {{\n    meta l4proto tcp dnat to {a}:{VIP_TARGET_PORT}\n  }}"
    );
    format!(
        "table ip twbench {{\n  map svc {{\n    type ipv4_addr . inet_proto . inet_service : \
         verdict\n    elements = {{ {elements} }}\n  }}\n\
         {chains}  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         ip daddr . meta l4proto . th dport vmap @svc\n  }}\n}}\n"
    )
}

/// kube-proxy's iptables layout, by hand: a services chain with one rule per service (the
/// measured one last) jumping to a per-service chain that DNATs.
pub(crate) fn iptables_ruleset(n: usize, a: Ipv4Addr) -> String {
    let mut out = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :POSTROUTING ACCEPT [0:0]\n:TWB-SERVICES - [0:0]\n",
    );
    let count = n.saturating_sub(1);
    for i in 0..=count {
        let _ = writeln!(out, ":TWB-SVC-{i} - [0:0]");
    }
    out.push_str("-A PREROUTING -j TWB-SERVICES\n");
    for i in 0..count {
        let (_, vip, eps) = filler(i);
        let _ = writeln!(
            out,
            "-A TWB-SERVICES -d {vip}/32 -p tcp -m tcp --dport {PORT} -j TWB-SVC-{i}\n\
             -A TWB-SVC-{i} -p tcp -j DNAT --to-destination {}:{VIP_TARGET_PORT}",
            eps[0]
        );
    }
    let _ = writeln!(
        out,
        "-A TWB-SERVICES -d {BASELINE_VIP}/32 -p tcp -m tcp --dport {PORT} -j TWB-SVC-{count}\n\
         -A TWB-SVC-{count} -p tcp -j DNAT --to-destination {a}:{VIP_TARGET_PORT}"
    );
    out.push_str("COMMIT\n");
    out
}

/// Runs `args` in `ns` with `input` on stdin; the wall time, or an error with stderr.
pub(crate) fn timed_stdin(ns: &str, args: &[&str], input: &str) -> Result<Duration> {
    use std::io::Write as _;
    let what = format!("{} in netns {ns}", args.join(" "));
    let mut child = twill_tests::ns::nsenter(ns, args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {what}"))?;
    let t0 = Instant::now();
    {
        let mut stdin = child.stdin.take().expect("stdin is piped");
        stdin
            .write_all(input.as_bytes())
            .with_context(|| format!("feed {what}"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("wait for {what}"))?;
    let took = t0.elapsed();
    if !out.status.success() {
        // nft quotes every offending line of a 10k-line input: the first few say it all.
        let err = String::from_utf8_lossy(&out.stderr);
        let head: Vec<&str> = err.lines().take(6).collect();
        bail!("{what} failed ({}): {}", out.status, head.join("\n"));
    }
    Ok(took)
}

pub(crate) fn measure_baselines(
    p: &Params,
    bin_dir: Option<PathBuf>,
    progress: &Progress,
) -> Result<BaselineResult> {
    let what = "hand-written rules: rig".to_string();
    progress.working(&what);
    let b = Bench::new(ProxyMode::None, 0, p.rate_secs, bin_dir)?;
    progress.done(&what, &format!("up ({})", b.rig.id()));
    let node = b.rig.node_ns(2);
    let n = p.baseline_services;
    let vip = SocketAddr::from((BASELINE_VIP, PORT));
    let mut res = BaselineResult {
        services: n,
        ..BaselineResult::default()
    };

    let what = format!("nft verdict map, {n} services: load");
    progress.working(&what);
    let took = timed_stdin(&node, &["nft", "-f", "-"], &nft_ruleset(n, b.a_ip()))?;
    res.nft_load_s = took.as_secs_f64();
    progress.done(&what, &format!("nft -f took {} s", fmt_num(res.nft_load_s)));
    for i in 0..5 {
        let one = format!(
            "add chain ip twbench extra{i}\n\
             add rule ip twbench extra{i} meta l4proto tcp dnat to {}:{VIP_TARGET_PORT}\n\
             add element ip twbench svc {{ 10.111.254.{} . tcp . {PORT} : goto extra{i} }}\n",
            b.a_ip(),
            i + 1
        );
        let took = timed_stdin(&node, &["nft", "-f", "-"], &one)?;
        res.nft_add_one_ms.push(ms(took));
    }
    res.nft.services = n;
    b.rates(vip, &mut res.nft, p.runs, progress, "nft by hand")?;
    run(&node, &["nft", "delete", "table", "ip", "twbench"])?;

    let what = format!("iptables-legacy, {n} services: load");
    progress.working(&what);
    let took = timed_stdin(
        &node,
        &["iptables-legacy-restore"],
        &iptables_ruleset(n, b.a_ip()),
    )?;
    res.ipt_load_s = took.as_secs_f64();
    progress.done(
        &what,
        &format!("iptables-legacy-restore took {} s", fmt_num(res.ipt_load_s)),
    );
    res.ipt.services = n;
    b.rates(
        vip,
        &mut res.ipt,
        p.runs,
        progress,
        "iptables-legacy by hand",
    )?;
    run(&node, &["iptables-legacy", "-t", "nat", "-F"])?;
    run(&node, &["iptables-legacy", "-t", "nat", "-X"])?;
    Ok(res)
}
