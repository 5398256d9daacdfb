//! iperf3 runs and the CPU they cost (the agents' and the kernel's).

use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use twill_tests::{Rig, exec_timeout};

use super::setup::Setup;

/// What one iperf3 run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct IperfRun {
    /// The received rate.
    pub(crate) gbps: f64,
    /// CPU time spent per GB received, in seconds: iperf3's client and server (their own
    /// accounting, user + system) plus every twilld of the rig (from /proc). The kernel's
    /// forwarding work (softirqs) is charged to the process it runs in, so this is the whole
    /// path's cost, wherever it ran: for the hand-built rigs all of it sits in the two iperf3
    /// processes, for twill's udp backend most of it in the agents. Work that lands in an
    /// interrupt of an unrelated process is not counted, for either.
    pub(crate) cpu_s_per_gb: f64,
}

/// A TCP iperf3 run from the client pod to the server pod. One retry: the server can still be
/// wrapping up the previous test.
pub(crate) fn iperf(s: &Setup, streams: u32, secs: u32) -> Result<IperfRun> {
    let addr = s.server_ip.to_string();
    let t = secs.to_string();
    let p = streams.to_string();
    let args = ["iperf3", "-c", &addr, "-t", &t, "-P", &p, "-J"];
    let mut last = None;
    for attempt in 0..2 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        let before = agents_cpu_s(&s.rig);
        let out = exec_timeout(
            &s.client.ns,
            &args,
            Duration::from_secs(u64::from(secs) + 30),
        )?;
        let agents = agents_cpu_s(&s.rig) - before;
        match parse_iperf_run(&out.stdout, agents) {
            Ok(r) => return Ok(r),
            Err(e) => last = Some(e.context(format!("iperf3 exited {}", out.status))),
        }
    }
    Err(last.expect("two attempts"))
}

/// The rate and the CPU cost of an iperf3 run (its JSON), with `agents_s` CPU-seconds spent by
/// the agents meanwhile.
pub(crate) fn parse_iperf_run(stdout: &[u8], agents_s: f64) -> Result<IperfRun> {
    let report: serde_json::Value =
        serde_json::from_slice(stdout).context("iperf3 printed no JSON")?;
    if let Some(err) = report.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {err}");
    }
    let sum = &report["end"]["sum_received"];
    let bps = sum["bits_per_second"]
        .as_f64()
        .context("no end.sum_received.bits_per_second in iperf3's report")?;
    ensure!(bps > 0.0, "iperf3 received nothing");
    let bytes = sum["bytes"].as_f64().unwrap_or(0.0);
    let secs = sum["seconds"].as_f64().unwrap_or(0.0);
    let cpu = &report["end"]["cpu_utilization_percent"];
    let pct =
        cpu["host_total"].as_f64().unwrap_or(0.0) + cpu["remote_total"].as_f64().unwrap_or(0.0);
    let cpu_s = pct / 100.0 * secs + agents_s.max(0.0);
    Ok(IperfRun {
        gbps: bps / 1e9,
        cpu_s_per_gb: if bytes > 0.0 {
            cpu_s / (bytes / 1e9)
        } else {
            f64::NAN
        },
    })
}

/// CPU time (user + system, seconds) of every twilld of `rig` so far: the processes whose
/// command line names twilld and the rig's directory. 0 for the hand-built rigs.
pub(crate) fn agents_cpu_s(rig: &Rig) -> f64 {
    let dir = rig.temp_dir().display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut ticks = 0u64;
    for e in entries.flatten() {
        let path = e.path();
        let Ok(cmdline) = std::fs::read(path.join("cmdline")) else {
            continue;
        };
        let mut args = cmdline.split(|b| *b == 0).map(String::from_utf8_lossy);
        let is_twilld = args
            .next()
            .is_some_and(|a| a.rsplit('/').next() == Some("twilld"));
        if !is_twilld || !args.any(|a| a.contains(&dir)) {
            continue;
        }
        if let Ok(stat) = std::fs::read_to_string(path.join("stat")) {
            ticks += stat_ticks(&stat).unwrap_or(0);
        }
    }
    #[expect(clippy::cast_precision_loss, reason = "clock ticks of a benchmark")]
    let secs = ticks as f64 / clock_ticks_per_s();
    secs
}

/// utime + stime (clock ticks) from a `/proc/<pid>/stat` line.
pub(crate) fn stat_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis,
    // where field 3 (state) is index 0, utime (14) index 11, stime (15) index 12.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// The kernel's clock ticks per second for /proc times (`getconf CLK_TCK`; USER_HZ is 100 on
/// every Linux this runs on, the fallback).
pub(crate) fn clock_ticks_per_s() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}
