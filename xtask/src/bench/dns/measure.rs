//! Reading dnsperf: its summary (the rate) and, with `-v`, one line per query (the latencies).

use anyhow::{Context as _, Result};

/// dnsperf's summary of one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Queries sent.
    pub sent: u64,
    /// Queries answered.
    pub completed: u64,
    /// Queries lost (no answer within the timeout).
    pub lost: u64,
    /// Answers per second.
    pub qps: f64,
}

/// The first number after `label` on the line that starts (after spaces) with it.
fn number_after(text: &str, label: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.trim_start().strip_prefix(label)?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The summary of dnsperf's output.
pub fn summary(text: &str) -> Result<Summary> {
    let get = |label: &str| {
        number_after(text, label).with_context(|| format!("dnsperf printed no {label:?}:\n{text}"))
    };
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "dnsperf prints counts as integers"
    )]
    let count = |label: &str| get(label).map(|v| v as u64);
    Ok(Summary {
        sent: count("Queries sent:")?,
        completed: count("Queries completed:")?,
        lost: count("Queries lost:")?,
        qps: get("Queries per second:")?,
    })
}

/// The latencies (seconds) of `dnsperf -v`'s per-query lines (`> NOERROR name A 0.000123`),
/// answered ones only.
pub fn latencies(text: &str) -> Vec<f64> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("> ")?;
            let mut words = rest.split_whitespace();
            let code = words.next()?;
            if code == "T" || code == "TIMEOUT" {
                return None;
            }
            words.last()?.parse::<f64>().ok()
        })
        .collect()
}

/// The `p`-th percentile (0–100) of `samples` (nearest rank); `None` when empty.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a rank within the sample count"
    )]
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    Some(s[rank.clamp(1, s.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "DNS Performance Testing Tool
Version 2.10.0

[Status] Command line: dnsperf -s 198.18.0.2 -p 5353 -d q.txt -l 3
[Status] Sending queries (to 198.18.0.2:5353)
> NOERROR svc-1.default.svc.cluster.local A 0.000145
> NXDOMAIN nope.default.svc.cluster.local A 0.000212
> T svc-3.default.svc.cluster.local A
[Status] Testing complete (time limit)

Statistics:

  Queries sent:         123456
  Queries completed:    123400 (99.95%)
  Queries lost:         56 (0.05%)

  Response codes:       NOERROR 123400 (100.00%)
  Average packet size:  request 49, response 65
  Run time (s):         3.000123
  Queries per second:   41131.654

  Average Latency (s):  0.002389 (min 0.000034, max 0.010427)
  Latency StdDev (s):   0.000821
";

    #[test]
    fn reads_the_summary_and_the_latencies() {
        let s = summary(OUT).unwrap();
        assert_eq!(
            s,
            Summary {
                sent: 123_456,
                completed: 123_400,
                lost: 56,
                qps: 41_131.654
            }
        );
        assert_eq!(latencies(OUT), [0.000_145, 0.000_212]);
        assert!(
            summary("nothing")
                .unwrap_err()
                .to_string()
                .contains("Queries sent")
        );
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
        assert_eq!(percentile(&[], 99.0), None);
    }
}
