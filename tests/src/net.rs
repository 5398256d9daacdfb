//! What tests look at: reachability (`ping`) and the kernel's view of routes, FDB and neighbours
//! as the `ip` and `bridge` tools print them.
//!
//! Text, not parsed structures: the end-to-end tests assert on lines such as
//! `10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink`, which is exactly how a human checks a
//! flannel node, and a failing assertion can print the whole table.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};

use crate::ns::{exec_timeout, run};

/// The outcome of a [`ping`].
#[derive(Debug, Clone, PartialEq)]
pub struct PingStats {
    /// Echo requests sent.
    pub transmitted: u32,
    /// Echo replies received.
    pub received: u32,
    /// Average round-trip time, if any reply came back.
    pub rtt_avg_ms: Option<f64>,
}

impl PingStats {
    /// Whether every request was answered.
    pub fn all_received(&self) -> bool {
        self.transmitted > 0 && self.received == self.transmitted
    }

    /// Parses iputils `ping` output (its summary lines).
    pub fn parse(text: &str) -> Result<Self> {
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .ok_or_else(|| anyhow!("no summary line in ping output {text:?}"))?;
        let number_before = |word: &str| -> Option<u32> {
            let words: Vec<&str> = line.split([' ', ',']).filter(|w| !w.is_empty()).collect();
            let i = words.iter().position(|w| w.starts_with(word))?;
            words.get(i.checked_sub(1)?)?.parse().ok()
        };
        let transmitted =
            number_before("packets").ok_or_else(|| anyhow!("no transmitted count in {line:?}"))?;
        let received =
            number_before("received").ok_or_else(|| anyhow!("no received count in {line:?}"))?;
        // rtt min/avg/max/mdev = 0.030/0.045/0.061/0.012 ms
        let rtt_avg_ms = text
            .lines()
            .find(|l| l.starts_with("rtt") || l.starts_with("round-trip"))
            .and_then(|l| l.split_once('=')?.1.trim().split('/').nth(1)?.parse().ok());
        Ok(PingStats {
            transmitted,
            received,
            rtt_avg_ms,
        })
    }
}

impl fmt::Display for PingStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} received", self.received, self.transmitted)?;
        if let Some(avg) = self.rtt_avg_ms {
            write!(f, ", rtt avg {avg:.3} ms")?;
        }
        Ok(())
    }
}

/// Pings `addr` from namespace `from_ns`: `count` requests 200 ms apart, each answered within 1 s
/// or counted lost (`ping -c N -i 0.2 -W 1`). Returns the statistics whether or not replies came
/// back; an error only when ping could not run or printed no summary.
pub fn ping(from_ns: &str, addr: impl Into<IpAddr>, count: u32) -> Result<PingStats> {
    let addr = addr.into();
    let args = ping_args(addr, count, Duration::from_millis(200), &["-q"]);
    let bound = Duration::from_millis(200 * u64::from(count) + 5_000);
    let out = exec_timeout(from_ns, &args, bound)?;
    let text = String::from_utf8_lossy(&out.stdout);
    PingStats::parse(&text).with_context(|| {
        format!(
            "ping {addr} from netns {from_ns} ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}

/// `ping -n OPTIONS -c COUNT -i INTERVAL -W 1 DST`: numeric output, `count` requests `interval`
/// apart, each answered within 1 s or counted lost; `options` (`-q`, `-O`) go before the rest.
pub(crate) fn ping_args(
    dst: IpAddr,
    count: u32,
    interval: Duration,
    options: &[&str],
) -> Vec<String> {
    let mut args = vec!["ping".to_string(), "-n".to_string()];
    args.extend(options.iter().map(|o| (*o).to_string()));
    args.extend([
        "-c".to_string(),
        count.to_string(),
        "-i".to_string(),
        format!("{:.3}", interval.as_secs_f64()),
        "-W".to_string(),
        "1".to_string(),
        dst.to_string(),
    ]);
    args
}

/// The IPv4 and IPv6 routes of the main table in `ns` (`ip -4 route` then `ip -6 route`).
pub fn routes(ns: &str) -> Result<String> {
    let v4 = run(ns, &["ip", "-4", "route", "show"])?;
    let v6 = run(ns, &["ip", "-6", "route", "show"])?;
    Ok(v4 + &v6)
}

/// The forwarding database of `dev` in `ns` (`bridge fdb show dev DEV`).
pub fn fdb(ns: &str, dev: &str) -> Result<String> {
    run(ns, &["bridge", "fdb", "show", "dev", dev])
}

/// The neighbour entries (ARP and NDP) of `dev` in `ns` (`ip neigh show dev DEV`).
pub fn neigh(ns: &str, dev: &str) -> Result<String> {
    run(ns, &["ip", "neigh", "show", "dev", dev])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_summary() {
        let text = "PING 10.0.0.1 (10.0.0.1) 56(84) bytes of data.\n\n--- 10.0.0.1 ping statistics ---\n3 packets transmitted, 3 received, 0% packet loss, time 404ms\nrtt min/avg/max/mdev = 0.030/0.045/0.061/0.012 ms\n";
        let s = PingStats::parse(text).unwrap();
        assert_eq!((s.transmitted, s.received), (3, 3));
        assert_eq!(s.rtt_avg_ms, Some(0.045));
        assert!(s.all_received());
    }

    #[test]
    fn parses_total_loss() {
        let text = "--- 10.0.0.9 ping statistics ---\n3 packets transmitted, 0 received, +3 errors, 100% packet loss, time 2050ms\n";
        let s = PingStats::parse(text).unwrap();
        assert_eq!((s.transmitted, s.received, s.rtt_avg_ms), (3, 0, None));
        assert!(!s.all_received());
        assert!(PingStats::parse("ping: connect: Network is unreachable\n").is_err());
    }
}
