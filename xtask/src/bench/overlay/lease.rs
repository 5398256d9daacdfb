//! Lease-to-programmed latency: fake peers' leases written to etcd, the nodes' kernel watched.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use twill_tests::bench_support::{EtcdHttp, LineMonitor};
use twill_tests::ns::in_netns;
use twill_tests::rig::{ETCD_PREFIX, UNDERLAY_V4};

use super::params::{LEASE_DEADLINE, LeaseSamples};
use super::setup::Setup;
use crate::bench::stats::ms;
use crate::cluster::Backend;

/// Watches, in namespace `ns`, the kernel entries a peer's lease on `backend` programs: its
/// route, and on VXLAN also its neighbour and FDB entry.
pub(crate) fn peer_monitor(ns: &str, backend: Backend) -> Result<LineMonitor> {
    let route: &[&str] = &["ip", "-4", "monitor", "route"];
    let neigh: &[&str] = &["ip", "-4", "monitor", "neigh"];
    let fdb: &[&str] = &["bridge", "monitor", "fdb"];
    let commands: Vec<&[&str]> = if backend == Backend::Vxlan {
        vec![route, neigh, fdb]
    } else {
        vec![route]
    };
    LineMonitor::spawn_many(ns, &commands)
}

/// A fake peer's lease.
#[derive(Debug, Clone)]
pub(crate) struct FakeLease {
    pub(crate) key: String,
    pub(crate) value: String,
    /// Line prefixes of the monitors' notifications that mean "programmed".
    pub(crate) added: Vec<String>,
    /// ... and "removed".
    pub(crate) deleted: Vec<String>,
}

impl FakeLease {
    /// Peer `i` (public IP `198.18.0.(30+i)`) holding `10.244.<k>.0/24`.
    pub(crate) fn new(backend: Backend, i: usize, k: u8) -> Self {
        let public = Ipv4Addr::new(
            198,
            18,
            0,
            30 + u8::try_from(i).expect("at most 200 leases"),
        );
        let net = Ipv4Addr::new(10, 244, k, 0);
        let route = format!("{net}/24 ");
        let mut added = vec![route.clone()];
        let value = if backend == Backend::Vxlan {
            let mac = format!("0e:74:77:00:{k:02x}:01");
            added.push(format!("{net} dev flannel.1 "));
            added.push(format!("{mac} dev flannel.1 dst {public} "));
            format!(
                r#"{{"PublicIP":"{public}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
            )
        } else {
            format!(r#"{{"PublicIP":"{public}","BackendType":"{backend}"}}"#)
        };
        FakeLease {
            key: format!("{ETCD_PREFIX}/subnets/{net}-24"),
            value,
            added,
            deleted: vec![format!("Deleted {route}")],
        }
    }
}

/// Strips `ip monitor`'s optional `[ROUTE]`-style labels.
pub(crate) fn unlabel(line: &str) -> &str {
    let mut l = line.trim_start();
    while l.starts_with('[') {
        match l.find(']') {
            Some(i) => l = l[i + 1..].trim_start(),
            None => break,
        }
    }
    l
}

/// Waits until a line starting with each of `prefixes` has been seen; the time of the last one,
/// or `None` at `deadline`.
pub(crate) fn wait_lines(
    monitor: &LineMonitor,
    prefixes: &[String],
    deadline: Instant,
) -> Result<Option<Instant>> {
    let mut missing: Vec<&String> = prefixes.iter().collect();
    let mut last = None;
    while !missing.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let Some((at, line)) = monitor.next_line(left)? else {
            return Ok(None);
        };
        let line = unlabel(&line);
        let before = missing.len();
        missing.retain(|p| !line.starts_with(p.as_str()));
        if missing.len() < before {
            last = Some(at);
        }
    }
    Ok(last)
}

/// Writes `n` fake leases one at a time, each waited for, then deletes them one at a time.
pub(crate) fn lease_latency(
    s: &Setup,
    n: usize,
    progress: &crate::bench::progress::Progress,
    what: &str,
) -> Result<LeaseSamples> {
    let taken: Vec<u8> = s.subnets.iter().map(|(net, _)| net.octets()[2]).collect();
    // One warm-up lease first, not counted.
    let ks: Vec<u8> = (1..=254u8)
        .filter(|k| !taken.contains(k))
        .take(n + 1)
        .collect();
    ensure!(ks.len() == n + 1, "not enough free subnets for {n} leases");
    let leases: Vec<FakeLease> = ks
        .iter()
        .enumerate()
        .map(|(i, &k)| FakeLease::new(s.backend, i, k))
        .collect();
    let monitor = peer_monitor(&s.rig.node_ns(1), s.backend)?;
    // The monitors subscribe within milliseconds; the warm-up lease proves they did.
    std::thread::sleep(Duration::from_millis(200));
    let etcd = EtcdHttp {
        addr: SocketAddr::from((UNDERLAY_V4, 2379)),
    };
    let backend = s.backend;
    in_netns(&s.rig.underlay_ns(), move || {
        let mut out = LeaseSamples {
            backend: backend.to_string(),
            ..LeaseSamples::default()
        };
        for (i, lease) in leases.iter().enumerate() {
            if i % 10 == 0 {
                progress.working(&format!("{what}: add {i}/{n}"));
            }
            monitor.drain();
            let t0 = Instant::now();
            etcd.put(&lease.key, &lease.value)?;
            let done = wait_lines(&monitor, &lease.added, t0 + LEASE_DEADLINE)?;
            if i == 0 {
                ensure!(
                    done.is_some(),
                    "the warm-up lease {} was not programmed within {LEASE_DEADLINE:?}",
                    lease.key
                );
                continue;
            }
            record(&mut out.add_ms, &mut out.add_timeouts, done.map(|t| t - t0));
        }
        for (i, lease) in leases.iter().enumerate() {
            if i % 10 == 0 {
                progress.working(&format!("{what}: delete {i}/{n}"));
            }
            monitor.drain();
            let t0 = Instant::now();
            etcd.delete(&lease.key)?;
            let done = wait_lines(&monitor, &lease.deleted, t0 + LEASE_DEADLINE)?;
            if i == 0 {
                continue;
            }
            record(&mut out.del_ms, &mut out.del_timeouts, done.map(|t| t - t0));
        }
        Ok(out)
    })
}

/// Records one lease's time to programmed (`None`: not within [`LEASE_DEADLINE`], counted as the
/// deadline and as a timeout).
fn record(samples_ms: &mut Vec<f64>, timeouts: &mut usize, took: Option<Duration>) {
    if took.is_none() {
        *timeouts += 1;
    }
    samples_ms.push(ms(took.unwrap_or(LEASE_DEADLINE)));
}
