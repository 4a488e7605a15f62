//! Convergence control of pre-copy: measure the transfer bandwidth, predict the stop-and-copy
//! time, and decide when to stop pre-copying.
//!
//! predicted downtime = overhead + last dirty scan + (dirty pages × page size + device state) / bandwidth
//!
//! The bandwidth is the throughput of all pre-copy rounds together (bytes on the wire divided
//! by the rounds' wall time, each round including its acknowledgement, so a slow destination
//! counts). The last dirty scan is the measured time of the component's latest `dirty_pages()`:
//! the stop-and-copy repeats that call after the pause, and for a component that has to scan
//! its memory to find dirty pages it is most of the downtime.
//!
//! Pre-copy stops when the prediction is within the downtime target, or after the round limit.
//! It also stops when the part no round can lower — overhead, scan and device state — misses
//! the target by itself and the dirty pages left would fit the target without the scan (the
//! criterion used before the scan was counted): more rounds would cost a scan each and could
//! not reach the target.

use std::time::Duration;

use serde::Serialize;

use crate::protocol::PAGE_SIZE;

/// Why pre-copy stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The predicted downtime was within the target.
    Converged,
    /// The part of the downtime no round lowers (overhead, the dirty scan, the device state)
    /// was above the target by itself, and the dirty pages left fit the target besides it:
    /// more rounds could not help. The prediction (and the downtime) exceed the target.
    FloorAboveTarget,
    /// The round limit was reached with the prediction still above the target: the dirty rate
    /// is too high for the link, and the downtime will exceed the target.
    RoundLimit,
}

/// The decision after a round.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    /// Predicted stop-and-copy time if pre-copy stopped now.
    pub predicted: Duration,
    /// `Some` to stop pre-copy now.
    pub stop: Option<StopReason>,
}

/// Convergence parameters and the bandwidth measurement.
#[derive(Clone, Debug)]
pub struct Convergence {
    target: Duration,
    max_rounds: u32,
    overhead: Duration,
    bytes: u64,
    time: Duration,
    scan: Duration,
}

/// Shortest time a measurement is taken to span, so that a tiny round cannot claim an
/// unbounded rate.
const MIN_MEASURED: Duration = Duration::from_micros(1);

impl Convergence {
    /// `target`: downtime target; `max_rounds`: most pre-copy rounds (≥ 1); `overhead`: fixed
    /// cost of the stop-and-copy besides the transfer (pause, snapshot, restore, resume, round
    /// trips).
    pub fn new(target: Duration, max_rounds: u32, overhead: Duration) -> Self {
        Convergence {
            target,
            max_rounds: max_rounds.max(1),
            overhead,
            bytes: 0,
            time: Duration::ZERO,
            scan: Duration::ZERO,
        }
    }

    /// Records how long the latest `dirty_pages()` took: the stop-and-copy will repeat it.
    pub fn record_scan(&mut self, elapsed: Duration) {
        self.scan = elapsed;
    }

    /// Adds a round's transfer to the measurement.
    pub fn record(&mut self, bytes: u64, elapsed: Duration) {
        self.bytes = self.bytes.saturating_add(bytes);
        self.time += elapsed;
    }

    /// Measured bandwidth in bytes per second (`None` before any transfer).
    pub fn bandwidth(&self) -> Option<f64> {
        (self.bytes > 0).then(|| self.bytes as f64 / self.time.max(MIN_MEASURED).as_secs_f64())
    }

    /// Predicted stop-and-copy time for `dirty_pages` pages and `state_bytes` of device state,
    /// the last recorded dirty scan included.
    pub fn predict(&self, dirty_pages: u64, state_bytes: u64) -> Duration {
        let bytes = dirty_pages
            .saturating_mul(PAGE_SIZE as u64)
            .saturating_add(state_bytes);
        let transfer = match self.bandwidth() {
            Some(bw) => Duration::try_from_secs_f64(bytes as f64 / bw).unwrap_or(Duration::MAX),
            None if bytes == 0 => Duration::ZERO,
            None => Duration::MAX,
        };
        self.overhead
            .saturating_add(self.scan)
            .saturating_add(transfer)
    }

    /// Decides after pre-copy round `round` (1-based) with `dirty_pages` pages dirty.
    pub fn decide(&self, round: u32, dirty_pages: u64, state_bytes: u64) -> Decision {
        let predicted = self.predict(dirty_pages, state_bytes);
        // No round lowers the scan: if it alone puts the target out of reach, stop once the
        // pages are as few as the target allows without it.
        let floor_misses = self.predict(0, state_bytes) > self.target;
        let pages_fit = predicted.saturating_sub(self.scan) <= self.target;
        let stop = if predicted <= self.target {
            Some(StopReason::Converged)
        } else if floor_misses && pages_fit {
            Some(StopReason::FloorAboveTarget)
        } else if round >= self.max_rounds {
            Some(StopReason::RoundLimit)
        } else {
            None
        };
        Decision { predicted, stop }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn test_convergence_predicts_from_measured_bandwidth() {
        let mut c = Convergence::new(20 * MS, 30, 2 * MS);
        assert_eq!(c.bandwidth(), None);
        // 4096 KiB in 100 ms: 40 MiB/s, i.e. 1 page per ~97.7 µs.
        c.record(4096 * 1024, 100 * MS);
        let p = c.predict(1024, 0);
        assert!(p > 101 * MS && p < 103 * MS, "{p:?}");
        assert_eq!(c.predict(0, 0), 2 * MS);
    }

    #[test]
    fn test_convergence_stops_on_target_or_round_limit() {
        let mut c = Convergence::new(20 * MS, 3, 2 * MS);
        c.record(1 << 20, 10 * MS); // 100 MiB/s-ish: 1 MiB per 10 ms.
        assert_eq!(c.decide(1, 16, 100).stop, Some(StopReason::Converged));
        assert_eq!(c.decide(1, 1024, 100).stop, None, "4 MiB ≈ 40 ms > 20 ms");
        assert_eq!(c.decide(3, 1024, 100).stop, Some(StopReason::RoundLimit));
        let big_state = c.decide(1, 0, 4 << 20);
        assert_eq!(big_state.stop, None, "device state counts too");
    }

    #[test]
    fn test_convergence_prediction_includes_last_scan() {
        let mut c = Convergence::new(20 * MS, 30, 2 * MS);
        c.record(1 << 20, 10 * MS);
        assert_eq!(c.predict(0, 0), 2 * MS);
        c.record_scan(15 * MS);
        assert_eq!(
            c.predict(0, 0),
            17 * MS,
            "the scan is repeated while paused"
        );
        assert_eq!(c.decide(1, 0, 0).stop, Some(StopReason::Converged));
        // 512 pages take ~20 ms: with a 10 ms scan that misses the target, and another round
        // can bring it within (128 pages: ~5 ms).
        c.record_scan(10 * MS);
        let d = c.decide(1, 512, 0);
        assert!(d.predicted > 31 * MS && d.stop.is_none(), "{d:?}");
        assert_eq!(c.decide(1, 128, 0).stop, Some(StopReason::Converged));
        c.record_scan(3 * MS);
        assert_eq!(c.predict(0, 0), 5 * MS, "only the latest scan counts");
    }

    #[test]
    fn test_convergence_scan_above_target_stops_once_pages_fit() {
        let mut c = Convergence::new(20 * MS, 30, 2 * MS);
        c.record(1 << 20, 10 * MS);
        c.record_scan(19 * MS);
        // 2 ms + 19 ms > 20 ms whatever pre-copy does: stop as without the scan, and say so
        // in the prediction.
        let d = c.decide(1, 16, 0);
        assert_eq!(d.stop, Some(StopReason::FloorAboveTarget));
        assert!(d.predicted > 21 * MS, "{d:?}");
        assert_eq!(c.decide(1, 1024, 0).stop, None, "4 MiB ≈ 40 ms: go on");
        assert_eq!(c.decide(30, 1024, 0).stop, Some(StopReason::RoundLimit));
        // The device state counts towards the floor too.
        c.record_scan(15 * MS);
        assert_eq!(c.decide(1, 16, 0).stop, Some(StopReason::Converged));
        assert_eq!(
            c.decide(1, 16, 400 << 10).stop,
            Some(StopReason::FloorAboveTarget)
        );
        assert_eq!(
            c.decide(1, 256, 0).stop,
            None,
            "17 ms + 10 ms: another round may reach 20 ms"
        );
    }

    #[test]
    fn test_convergence_zero_target_never_converges() {
        let mut c = Convergence::new(Duration::ZERO, 2, Duration::from_micros(1));
        c.record(1, MS);
        assert_eq!(c.decide(1, 0, 0).stop, None);
        assert_eq!(c.decide(2, 0, 0).stop, Some(StopReason::RoundLimit));
    }
}
