//! `cargo xtask bench dns`: twilld's DNS server against dnsmasq serving the same names.
//!
//! Why it is shaped as it is:
//! - One rig node: the real etcd and twilld (`--dns-listen` on the node's address), N ClusterIP
//!   Services applied with `twilld apply`; dnsmasq in the same namespace, on another port,
//!   serving the same names from a hosts file (`--addn-hosts`, nothing forwarded, no logging),
//!   the reference a user would otherwise run. Both answer from memory with a 5 s TTL.
//! - dnsperf in the node's namespace sends one query file (every Service name, type A) to
//!   each server in turn, repetition by repetition, so machine drift hits both alike:
//!   first as fast as it can (`-q` queries outstanding: the server's rate), then at one fixed
//!   rate for both (`-Q`, `-v`: every query's latency, for p50/p99 at the same load).
//! - Generator and servers share the machine's two cores: the absolute rate is the generator's
//!   as much as the server's, so the ratio is the figure to quote (see bench/mod.rs).

pub mod measure;

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use twill_tests::bench_support::output_within;
use twill_tests::metrics::{sample, scrape};
use twill_tests::{Rig, RigOptions, nsenter, wait_for};

use self::measure::{Summary, latencies, percentile, summary};
use super::kit::{Benchmark, Context};
use super::report::{Check, Metric, Section, Table, fmt_num};
use super::stats::median;
use crate::cluster::{Backend, METRICS_ADDR};

/// `bench dns`.
pub struct Dns;

/// twilld's DNS port on the node's address.
const TWILL_PORT: u16 = 5353;
/// dnsmasq's port on the node's address.
const DNSMASQ_PORT: u16 = 5354;

/// The run's sizes.
#[derive(Debug, Clone, Copy)]
struct Params {
    services: usize,
    rate_secs: u32,
    latency_secs: u32,
    /// The fixed load of the latency runs, queries/s.
    latency_qps: u32,
    /// Queries outstanding in the rate runs.
    outstanding: u32,
}

impl Params {
    fn new(quick: bool) -> Self {
        if quick {
            Params {
                services: 200,
                rate_secs: 3,
                latency_secs: 2,
                latency_qps: 2000,
                outstanding: 100,
            }
        } else {
            Params {
                services: 1000,
                rate_secs: 10,
                latency_secs: 5,
                latency_qps: 5000,
                outstanding: 100,
            }
        }
    }
}

/// A server under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    Twill,
    Dnsmasq,
}

impl Server {
    const BOTH: [Server; 2] = [Server::Twill, Server::Dnsmasq];

    fn name(self) -> &'static str {
        match self {
            Server::Twill => "twilld",
            Server::Dnsmasq => "dnsmasq",
        }
    }

    fn addr(self) -> SocketAddr {
        let port = match self {
            Server::Twill => TWILL_PORT,
            Server::Dnsmasq => DNSMASQ_PORT,
        };
        (Rig::node_ip(1), port).into()
    }
}

/// One repetition of one server.
#[derive(Debug, Clone, Copy)]
struct Sample {
    rate: Summary,
    p50_ms: f64,
    p99_ms: f64,
    latency_lost: u64,
}

/// `svc-<i>` in `default` with ClusterIP 10.96.<i / 250>.<i % 250 + 1>.
fn cluster_ip(i: usize) -> Ipv4Addr {
    #[expect(clippy::cast_possible_truncation, reason = "i < 62500")]
    Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn fqdn(i: usize) -> String {
    format!("svc-{i}.default.svc.cluster.local")
}

fn manifest(n: usize) -> String {
    let mut m = String::new();
    for i in 0..n {
        let _ = write!(
            m,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}}}\nspec: {{clusterIP: {}, ports: [{{name: http, port: 80}}]}}\n",
            cluster_ip(i)
        );
    }
    m
}

fn hosts(n: usize) -> String {
    (0..n).fold(String::new(), |mut s, i| {
        let _ = writeln!(s, "{} {}", cluster_ip(i), fqdn(i));
        s
    })
}

fn queries(n: usize) -> String {
    (0..n).fold(String::new(), |mut s, i| {
        let _ = writeln!(s, "{} A", fqdn(i));
        s
    })
}

fn write(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, text).with_context(|| format!("write {}", p.display()))?;
    Ok(p)
}

/// Starts dnsmasq in node 1's namespace serving `hosts_file`, recorded with the rig's processes.
fn start_dnsmasq(rig: &Rig, hosts_file: &Path) -> Result<Child> {
    let addr = Server::Dnsmasq.addr();
    let args = [
        "dnsmasq".to_string(),
        "--keep-in-foreground".into(),
        "--conf-file=/dev/null".into(),
        "--no-hosts".into(),
        format!("--addn-hosts={}", hosts_file.display()),
        "--no-resolv".into(),
        "--no-poll".into(),
        "--bind-interfaces".into(),
        format!("--listen-address={}", addr.ip()),
        format!("--port={}", addr.port()),
        "--local-ttl=5".into(),
        "--user=root".into(),
        "--pid-file=".into(),
    ];
    let child = nsenter(&rig.node_ns(1), &args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start dnsmasq (`cargo xtask setup` installs it)")?;
    rig.guard().record_process(&child, "dnsmasq")?;
    Ok(child)
}

/// Runs dnsperf in node 1's namespace against `server` with `extra` flags; its stdout.
fn dnsperf(
    rig: &Rig,
    server: Server,
    query_file: &Path,
    secs: u32,
    extra: &[String],
) -> Result<String> {
    let addr = server.addr();
    let mut args = vec![
        "dnsperf".to_string(),
        "-s".into(),
        addr.ip().to_string(),
        "-p".into(),
        addr.port().to_string(),
        "-d".into(),
        query_file.display().to_string(),
        "-l".into(),
        secs.to_string(),
        "-t".into(),
        "1".into(),
    ];
    args.extend(extra.iter().cloned());
    let what = format!("dnsperf against {}", server.name());
    let out = output_within(
        nsenter(&rig.node_ns(1), &args),
        Duration::from_secs(u64::from(secs) + 30),
        &what,
    )?;
    ensure!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `server` answers the last Service's name with its address (one dnsperf query).
fn answers(rig: &Rig, server: Server, dir: &Path, n: usize) -> bool {
    let Ok(file) = write(dir, "probe.txt", &format!("{} A\n", fqdn(n - 1))) else {
        return false;
    };
    dnsperf(rig, server, &file, 2, &["-n".into(), "1".into()])
        .ok()
        .and_then(|o| summary(&o).ok())
        .is_some_and(|s| s.completed == 1 && s.sent == 1)
}

fn measure_once(rig: &Rig, server: Server, file: &Path, p: Params) -> Result<Sample> {
    let rate_out = dnsperf(
        rig,
        server,
        file,
        p.rate_secs,
        &[
            "-q".into(),
            p.outstanding.to_string(),
            "-c".into(),
            "2".into(),
        ],
    )?;
    let rate = summary(&rate_out)?;
    let lat_out = dnsperf(
        rig,
        server,
        file,
        p.latency_secs,
        &["-Q".into(), p.latency_qps.to_string(), "-v".into()],
    )?;
    let lat = latencies(&lat_out);
    let s = summary(&lat_out)?;
    let p50 = percentile(&lat, 50.0).context("no latency sample")?;
    let p99 = percentile(&lat, 99.0).context("no latency sample")?;
    Ok(Sample {
        rate,
        p50_ms: p50 * 1000.0,
        p99_ms: p99 * 1000.0,
        latency_lost: s.lost,
    })
}

impl Benchmark for Dns {
    fn run(&self, ctx: &Context<'_>) -> Result<Section> {
        let p = Params::new(ctx.opts.quick);
        let progress = ctx.progress;
        progress.note(&format!("bench dns: rig with {} services", p.services));
        let rig = Rig::with_options(RigOptions {
            nodes: 1,
            bin_dir: ctx.opts.bin_dir.clone(),
            ..RigOptions::default()
        })?;
        rig.put_network_config(&Backend::HostGw.network_config())?;
        let dns = Server::Twill.addr().to_string();
        rig.start_twilld(
            1,
            &[
                "--metrics-addr",
                METRICS_ADDR,
                "--dns-listen",
                &dns,
                // Nothing is forwarded in this benchmark; an address in the rig that answers
                // nothing, never the machine's resolver.
                "--dns-upstream",
                &SocketAddr::new(IpAddr::V4(Rig::node_ip(1)), 5399).to_string(),
            ],
        )?;
        rig.wait_subnet_file(1, Duration::from_secs(30))?;
        rig.apply_manifest(&manifest(p.services))?;
        let dir = rig.temp_dir().to_path_buf();
        let hosts_file = write(&dir, "hosts", &hosts(p.services))?;
        let query_file = write(&dir, "queries.txt", &queries(p.services))?;
        let _dnsmasq = start_dnsmasq(&rig, &hosts_file)?;
        for server in Server::BOTH {
            wait_for(Duration::from_secs(30), || {
                answers(&rig, server, &dir, p.services).then_some(())
            })
            .with_context(|| format!("{} does not answer the Services' names", server.name()))?;
        }
        let names = sample(
            &scrape(&rig.node_ns(1), METRICS_ADDR.parse()?),
            "twill_dns_zone_names",
        );
        let mut samples: Vec<(Server, Sample)> = Vec::new();
        for rep in 0..ctx.opts.reps {
            for server in Server::BOTH {
                progress.note(&format!(
                    "bench dns: {} rep {}/{}",
                    server.name(),
                    rep + 1,
                    ctx.opts.reps
                ));
                samples.push((server, measure_once(&rig, server, &query_file, p)?));
            }
        }
        Ok(section(p, &samples, names))
    }
}

fn section(p: Params, samples: &[(Server, Sample)], names: Option<f64>) -> Section {
    let of = |server: Server, f: fn(&Sample) -> f64| -> f64 {
        median(
            &samples
                .iter()
                .filter(|(s, _)| *s == server)
                .map(|(_, x)| f(x))
                .collect::<Vec<_>>(),
        )
    };
    let mut sec = Section::new("dns", "DNS: twilld vs dnsmasq");
    sec.about = format!(
        "{} ClusterIP Services (one A name each) in twilld's zone (etcd → twilld's service \
         source), and the same names in a hosts file for dnsmasq, on one rig node. dnsperf in \
         the node's namespace replays one query file against each server in turn: as fast as \
         it can ({} queries outstanding, {} s) for the rate, then at {} queries/s for {} s with \
         every query's latency (p50, p99). Medians of the repetitions; the generator shares the \
         two cores with the server, so quote the ratio.",
        p.services, p.outstanding, p.rate_secs, p.latency_qps, p.latency_secs
    );
    let twill_qps = of(Server::Twill, |s| s.rate.qps);
    let dnsmasq_qps = of(Server::Dnsmasq, |s| s.rate.qps);
    let twill_p99 = of(Server::Twill, |s| s.p99_ms);
    let ratio = if dnsmasq_qps > 0.0 {
        twill_qps / dnsmasq_qps
    } else {
        0.0
    };
    sec.metrics = vec![
        Metric::new("twilld queries/s", "q/s", twill_qps),
        Metric::new("dnsmasq queries/s", "q/s", dnsmasq_qps),
        Metric::new("twilld / dnsmasq rate", "x", ratio),
        Metric::new("twilld p99 latency", "ms", twill_p99),
        Metric::new(
            "dnsmasq p99 latency",
            "ms",
            of(Server::Dnsmasq, |s| s.p99_ms),
        ),
    ];
    let mut t = Table::new(
        "Per server (medians)",
        &[
            "server",
            "queries/s",
            "lost (rate run)",
            "p50 ms",
            "p99 ms",
            "lost (latency run)",
        ],
    );
    for server in Server::BOTH {
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let lost = of(server, |s| s.rate.lost as f64);
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let lat_lost = of(server, |s| s.latency_lost as f64);
        t.rows.push(vec![
            server.name().into(),
            fmt_num(of(server, |s| s.rate.qps)),
            fmt_num(lost),
            format!("{:.3}", of(server, |s| s.p50_ms)),
            format!("{:.3}", of(server, |s| s.p99_ms)),
            fmt_num(lat_lost),
        ]);
    }
    sec.tables.push(t);
    sec.checks = vec![
        Check::at_least("twilld rate ≥ 1.0× dnsmasq's", ratio, 1.0),
        Check::at_most("twilld p99 latency", twill_p99, 1.0, "ms"),
    ];
    if let Some(n) = names {
        sec.notes.push(format!("twilld's zone held {n} names"));
    }
    sec.raw = serde_json::json!(
        samples
            .iter()
            .map(|(s, x)| serde_json::json!({
                "server": s.name(),
                "qps": x.rate.qps,
                "sent": x.rate.sent,
                "completed": x.rate.completed,
                "lost": x.rate.lost,
                "p50_ms": x.p50_ms,
                "p99_ms": x.p99_ms,
                "latency_lost": x.latency_lost,
            }))
            .collect::<Vec<_>>()
    );
    sec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_addresses_and_files_agree() {
        assert_eq!(cluster_ip(0), Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(cluster_ip(250), Ipv4Addr::new(10, 96, 1, 1));
        let h = hosts(2);
        assert_eq!(
            h,
            "10.96.0.1 svc-0.default.svc.cluster.local\n10.96.0.2 svc-1.default.svc.cluster.local\n"
        );
        assert_eq!(queries(1), "svc-0.default.svc.cluster.local A\n");
        assert_eq!(manifest(3).matches("kind: Service").count(), 3);
    }
}
