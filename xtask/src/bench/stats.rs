//! Order statistics for benchmark samples.
//!
//! Medians of repetitions rather than means: on a shared two-core machine one repetition in
//! three is regularly hit by someone else's build, and a median ignores it where a mean would
//! not. Percentiles use the nearest-rank definition (the value of an actual sample, never an
//! interpolation), which is what "p99 of 200 lease writes" means to a reader.

use std::time::Duration;

use serde::Serialize;

/// The median of `samples` (mean of the middle two for an even count); NaN when empty.
pub fn median(samples: &[f64]) -> f64 {
    let sorted = sorted(samples);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => f64::midpoint(sorted[n / 2 - 1], sorted[n / 2]),
    }
}

/// The nearest-rank `p`-th percentile (0 < p ≤ 100) of `samples`; NaN when empty.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    let sorted = sorted(samples);
    if sorted.is_empty() {
        return f64::NAN;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a rank between 1 and the sample count, far below 2^52"
    )]
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// `d` in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The arithmetic mean; NaN when empty.
pub fn mean(samples: &[f64]) -> f64 {
    #[expect(
        clippy::cast_precision_loss,
        reason = "sample counts are far below 2^52"
    )]
    let n = samples.len() as f64;
    samples.iter().sum::<f64>() / n
}

/// A copy sorted ascending (NaNs last).
pub fn sorted(samples: &[f64]) -> Vec<f64> {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

/// The usual summary of a latency distribution, in the samples' unit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Smallest.
    pub min: f64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Summary {
    /// The summary of `samples` (NaNs throughout when empty).
    pub fn of(samples: &[f64]) -> Self {
        let s = sorted(samples);
        Summary {
            n: s.len(),
            min: s.first().copied().unwrap_or(f64::NAN),
            mean: mean(&s),
            p50: percentile(&s, 50.0),
            p99: percentile(&s, 99.0),
            max: s.last().copied().unwrap_or(f64::NAN),
        }
    }
}

#[cfg(test)]
#[expect(clippy::float_cmp, reason = "percentiles are exact sample values")]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        // 20 samples: p99 is the largest.
        let w: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&w, 99.0), 20.0);
        let s = Summary::of(&[2.0, 1.0, 3.0]);
        assert_eq!((s.n, s.min, s.p50, s.max, s.mean), (3, 1.0, 2.0, 3.0, 2.0));
    }
}
