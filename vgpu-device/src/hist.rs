//! A fixed-bucket latency histogram made of atomics: cheap enough for the doorbell, slice and
//! trap paths (one bucket search over 20 bounds and three relaxed adds), read by metrics
//! exporters as a [`HistogramSnapshot`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets in nanoseconds (1 µs to 2.5 s, roughly ×2.5 apart); one more
/// bucket above the last bound counts everything larger (`+Inf`).
pub const BOUNDS_NS: [u64; 20] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
];

/// Number of buckets, the `+Inf` one included.
pub const BUCKETS: usize = BOUNDS_NS.len() + 1;

/// A histogram of durations.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
}

/// A copy of a histogram's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Observations per bucket (not cumulative); the last bucket is `+Inf`.
    pub counts: [u64; BUCKETS],
    /// Sum of all observations in nanoseconds (saturating).
    pub sum_ns: u64,
}

impl HistogramSnapshot {
    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Adds `other`'s observations to these.
    pub fn merge(&mut self, other: &HistogramSnapshot) {
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a += b;
        }
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
    }

    /// The bucket bound below which `q` (0..=1) of the observations lie, in nanoseconds
    /// (`None` when empty; `u64::MAX` when the quantile falls in `+Inf`).
    pub fn quantile_ns(&self, q: f64) -> Option<u64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        // The rank of the quantile, rounded up, within 1..=n (so the cast cannot truncate).
        #[allow(clippy::cast_possible_truncation)]
        let rank = ((n as f64) * q.clamp(0.0, 1.0)).ceil().clamp(1.0, n as f64) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(BOUNDS_NS.get(i).copied().unwrap_or(u64::MAX));
            }
        }
        Some(u64::MAX)
    }
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NS.partition_point(|&b| b < ns);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        // Saturation after ~584 years of summed latency is not a concern; wrapping would be.
        let _ = self
            .sum_ns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some(s.saturating_add(ns))
            });
    }

    /// A copy of the counters (not atomic as a whole: a concurrent observation may be counted
    /// in its bucket but not yet in the sum).
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut s = HistogramSnapshot {
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
            ..Default::default()
        };
        for (d, c) in s.counts.iter_mut().zip(&self.counts) {
            *d = c.load(Ordering::Relaxed);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_histogram_observe_buckets_by_upper_bound() {
        let h = Histogram::default();
        h.observe(Duration::from_nanos(1_000)); // le 1 µs
        h.observe(Duration::from_nanos(1_001)); // le 2.5 µs
        h.observe(Duration::from_secs(10)); // +Inf
        let s = h.snapshot();
        assert_eq!(s.counts[0], 1);
        assert_eq!(s.counts[1], 1);
        assert_eq!(s.counts[BUCKETS - 1], 1);
        assert_eq!(s.count(), 3);
        assert_eq!(s.sum_ns, 10_000_002_001);
    }

    #[test]
    fn test_histogram_quantile_returns_bucket_bound() {
        let h = Histogram::default();
        for _ in 0..99 {
            h.observe(Duration::from_micros(3));
        }
        h.observe(Duration::from_millis(3));
        let s = h.snapshot();
        assert_eq!(s.quantile_ns(0.5), Some(5_000));
        assert_eq!(s.quantile_ns(0.99), Some(5_000));
        assert_eq!(s.quantile_ns(1.0), Some(5_000_000));
        assert_eq!(HistogramSnapshot::default().quantile_ns(0.5), None);
    }
}
