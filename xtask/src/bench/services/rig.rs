//! The rig of one proxy mode: backends on node 1, the client and the measured twilld on node 2.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use twill_tests::bench_support::output_within;
use twill_tests::metrics::sample;
use twill_tests::ns::http_get;
use twill_tests::{Pod, Rig, RigOptions, wait_for};

use super::params::{
    DIRECT_PORT, PROGRAM_TIMEOUT, RUN_SLACK, RateRun, Step, TargetRun, VIP_TARGET_PORT,
};
use crate::bench::progress::Progress;
use crate::bench::report::fmt_num;
use crate::bench::stats::median;
use crate::cluster::Backend;
use crate::cluster::{METRICS_ADDR, ProxyMode, pod_command};

/// twilld's proxy flags for `mode` on `node`. iptables runs on the legacy backend, the one its
/// target is for (`--iptables-backend auto` would take iptables-nft here, what
/// `iptables --version` names on Debian).
pub(crate) fn proxy_args(rig: &Rig, node: usize, mode: ProxyMode) -> Result<Vec<String>> {
    let mut args = rig.proxy_args(node, &mode.to_string())?;
    if mode == ProxyMode::Iptables {
        args.extend(["--iptables-backend".to_string(), "legacy".to_string()]);
    }
    Ok(args)
}

/// A mode's rig: backends on node 1, the client and the proxy on node 2.
pub(crate) struct Bench {
    pub(crate) rig: Rig,
    pub(crate) mode: ProxyMode,
    pub(crate) client: Pod,
    pub(crate) a: Pod,
    pub(crate) b: Pod,
    pub(crate) probe: String,
    pub(crate) rate_secs: f64,
}

impl Bench {
    /// `mode` = `None` builds the baselines' rig: no service proxy anywhere.
    pub(crate) fn new(
        mode: ProxyMode,
        extra_nodes: usize,
        rate_secs: f64,
        bin_dir: Option<PathBuf>,
    ) -> Result<Self> {
        let rig = Rig::with_options(RigOptions {
            nodes: 2 + extra_nodes,
            bin_dir,
            ..RigOptions::default()
        })?;
        rig.put_network_config(&Backend::HostGw.network_config())?;
        let start = |node: usize| -> Result<()> {
            let mut args = vec![
                "--metrics-addr".to_string(),
                METRICS_ADDR.to_string(),
                "--resync-interval".to_string(),
                "3600".to_string(),
            ];
            if node == 2 && mode != ProxyMode::None {
                args.extend(proxy_args(&rig, node, mode)?);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            rig.start_twilld(node, &args)
        };
        start(1)?;
        start(2)?;
        rig.wait_subnet_file(1, Duration::from_secs(30))?;
        rig.wait_subnet_file(2, Duration::from_secs(30))?;
        // Connection-tracking entries of closed connections linger 120 s by default: at
        // thousands of connections a second that fills the (machine-wide) table. The nodes'
        // own timeout, for every mode and baseline alike.
        for node in 1..=2 {
            let _ = twill_tests::ns::sysctl(
                &rig.node_ns(node),
                "net.netfilter.nf_conntrack_tcp_timeout_time_wait",
                "10",
            );
        }
        let a = rig.add_cni_pod(1)?;
        let b = rig.add_cni_pod(1)?;
        let client = rig.add_cni_pod(2)?;
        twill_tests::ns::sysctl(&client.ns, "net.ipv4.ip_local_port_range", "1024 65535")?;
        rig.start_responder(&a, "a", &[VIP_TARGET_PORT, DIRECT_PORT])?;
        rig.start_responder(&b, "b", &[VIP_TARGET_PORT, DIRECT_PORT])?;
        let probe = rig.binary("twill-probe")?.display().to_string();
        let bench = Bench {
            rig,
            mode,
            client,
            a,
            b,
            probe,
            rate_secs,
        };
        let direct = bench.direct();
        wait_for(Duration::from_secs(30), || bench.rate(&[direct], 0.05).ok())
            .with_context(|| format!("the client does not reach {direct}"))?;
        Ok(bench)
    }

    pub(crate) fn a_ip(&self) -> Ipv4Addr {
        self.a.ipv4.expect("CNI pods have IPv4")
    }

    pub(crate) fn b_ip(&self) -> Ipv4Addr {
        self.b.ipv4.expect("CNI pods have IPv4")
    }

    pub(crate) fn direct(&self) -> SocketAddr {
        SocketAddr::from((self.a_ip(), DIRECT_PORT))
    }

    /// One `twill-probe rate` run from the client (in node 2's cgroup with eBPF).
    pub(crate) fn rate(&self, addrs: &[SocketAddr], secs: f64) -> Result<Vec<TargetRun>> {
        let targets: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        let secs_arg = format!("{secs}");
        let mut args: Vec<&str> = vec![&self.probe, "rate"];
        args.extend(targets.iter().map(String::as_str));
        args.extend(["--secs", &secs_arg, "--expect", "a"]);
        let cmd = pod_command(&self.rig, &self.client, self.mode, &args)?;
        let what = format!(
            "twill-probe rate {} in {}",
            targets.join(" "),
            self.client.ns
        );
        let out = output_within(cmd, Duration::from_secs_f64(secs) + RUN_SLACK, &what)?;
        ensure!(
            out.status.success(),
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let run: RateRun = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("{what}: unreadable output"))?;
        for t in &run.targets {
            ensure!(
                t.ok > 0,
                "{what}: no connection to {} succeeded ({} failed: {})",
                t.addr,
                t.failed,
                t.first_error.as_deref().unwrap_or("?")
            );
        }
        Ok(run.targets)
    }

    /// Runs of connections to the VIP and the pod IP taken in turn, into `step` (after a short
    /// warm-up, not counted: the first connections after a change pay for cold caches).
    pub(crate) fn rates(
        &self,
        vip: SocketAddr,
        step: &mut Step,
        runs: usize,
        progress: &Progress,
        label: &str,
    ) -> Result<()> {
        self.rate(&[vip, self.direct()], self.rate_secs.min(0.5))?;
        for run in 0..runs {
            // Which goes first alternates too.
            let (addrs, vip_at) = if run % 2 == 0 {
                ([vip, self.direct()], 0)
            } else {
                ([self.direct(), vip], 1)
            };
            let what = format!("{label} run {}/{runs}", run + 1);
            progress.working(&what);
            let r = self.rate(&addrs, self.rate_secs)?;
            let (v, d) = (&r[vip_at], &r[1 - vip_at]);
            let (v_p50, d_p50) = (1e6 / median(&v.lat_us), 1e6 / median(&d.lat_us));
            progress.done(
                &what,
                &format!(
                    "VIP {} conn/s ({} at p50 latency), direct {} ({}) ({} failed)",
                    fmt_num(v.rate),
                    fmt_num(v_p50),
                    fmt_num(d.rate),
                    fmt_num(d_p50),
                    v.failed + d.failed
                ),
            );
            step.failed += v.failed + d.failed;
            step.vip.push(v_p50);
            step.direct.push(d_p50);
            step.vip_measured.push(v.rate);
            step.direct_measured.push(d.rate);
            step.vip_lat_us.extend(&v.lat_us);
            step.direct_lat_us.extend(&d.lat_us);
        }
        Ok(())
    }

    /// Node `node`'s twilld metrics.
    pub(crate) fn metrics(&self, node: usize) -> Result<String> {
        let addr: SocketAddr = METRICS_ADDR.parse().expect("a socket address");
        let resp = http_get(&self.rig.node_ns(node), addr, "/metrics")?;
        ensure!(
            resp.status == 200,
            "/metrics of node {node}: HTTP {}",
            resp.status
        );
        Ok(resp.body)
    }

    /// Waits until node `node` has at most `frontends` frontends programmed (after deletions).
    pub(crate) fn wait_programmed_at_most(
        &self,
        node: usize,
        frontends: usize,
        progress: &Progress,
        what: &str,
    ) -> Result<()> {
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let want = frontends as f64;
        let start = Instant::now();
        loop {
            let now = self
                .metrics(node)
                .ok()
                .and_then(|m| sample(&m, "twill_services_frontends"))
                .unwrap_or(f64::INFINITY);
            if now <= want {
                return Ok(());
            }
            if twill_tests::interrupted() {
                bail!("interrupted");
            }
            if start.elapsed() > PROGRAM_TIMEOUT {
                bail!("node {node} still has {now} frontends, not {frontends}");
            }
            progress.working(&format!("{what}: {now} frontends"));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until node `node` has programmed at least `frontends` frontends.
    pub(crate) fn wait_programmed(
        &self,
        node: usize,
        frontends: usize,
        progress: &Progress,
        what: &str,
    ) -> Result<Instant> {
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let want = frontends as f64;
        let start = Instant::now();
        let mut last_shown = Instant::now();
        let mut last_checked = Instant::now();
        loop {
            let now = self
                .metrics(node)
                .ok()
                .and_then(|m| sample(&m, "twill_services_frontends"))
                .unwrap_or(0.0);
            if now >= want {
                return Ok(Instant::now());
            }
            if twill_tests::interrupted() {
                bail!("interrupted");
            }
            if start.elapsed() > PROGRAM_TIMEOUT {
                bail!(
                    "node {node} programmed {now} of {frontends} frontends in {PROGRAM_TIMEOUT:?}; \
                     twilld's log ends:\n{}",
                    tail(&self.rig.twilld_log(node), 20)
                );
            }
            if last_shown.elapsed() > Duration::from_millis(500) {
                progress.working(&format!("{what}: {now}/{frontends} frontends"));
                last_shown = Instant::now();
            }
            if last_checked.elapsed() > Duration::from_secs(1) {
                last_checked = Instant::now();
                if !self.rig.twilld_running(node) {
                    bail!(
                        "twilld on node {node} exited; its log ends:\n{}",
                        tail(&self.rig.twilld_log(node), 20)
                    );
                }
                if let Some(why) = crate::util::service_failure(&self.rig.twilld_log(node)) {
                    bail!("node {node} programmed {now} of {frontends} frontends; twilld: {why}");
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub(crate) fn tail(text: &str, n: usize) -> String {
    crate::util::log_tail(text, n)
}
