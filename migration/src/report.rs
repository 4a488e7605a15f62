//! What a migration tells its owner: the phase, live progress for a progress bar, the final
//! reports of both sides, and the cancellation flag.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

pub use crate::convergence::StopReason;

/// Where a migration is (errors name the phase that failed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "phase")]
pub enum Phase {
    /// Version and compatibility check.
    Hello,
    /// Pre-copy of memory while the component runs.
    PreCopy {
        /// 1-based round.
        round: u32,
    },
    /// Component paused; last dirty pages.
    StopAndCopy,
    /// Device-state transfer.
    DeviceState,
    /// Destination validates and restores.
    Restore,
    /// Handover: the destination resumes.
    Commit,
    /// Done.
    Completed,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Hello => f.write_str("hello"),
            Phase::PreCopy { round } => write!(f, "pre-copy round {round}"),
            Phase::StopAndCopy => f.write_str("stop-and-copy"),
            Phase::DeviceState => f.write_str("device-state transfer"),
            Phase::Restore => f.write_str("restore"),
            Phase::Commit => f.write_str("commit"),
            Phase::Completed => f.write_str("completed"),
        }
    }
}

/// A cancellation flag shared between the owner and a running migration; checked between
/// pages and messages. Cancelling after the source has sent `Commit` has no effect.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A fresh, not cancelled, token.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests cancellation.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A progress sample from the source, for a progress bar.
#[derive(Clone, Debug, Serialize)]
pub struct Progress {
    /// Current phase.
    pub phase: Phase,
    /// Bytes written to the connection so far.
    pub bytes_sent: u64,
    /// Estimate of the total bytes the migration will send (grows with dirty rounds).
    pub total_estimate: u64,
    /// Measured transfer rate in bytes per second (0 until measured).
    pub bytes_per_sec: f64,
    /// Downtime predicted at the last round end, in microseconds.
    pub predicted_downtime_us: Option<u64>,
    /// Pages left to send in the current round.
    pub pages_remaining: u64,
    /// Time since the start, in microseconds.
    pub elapsed_us: u64,
}

/// One pre-copy round, or the stop-and-copy round (the last entry).
#[derive(Clone, Debug, Serialize)]
pub struct RoundReport {
    /// 1-based round.
    pub round: u32,
    /// Pages sent (round 1: all pages; later: the dirty pages).
    pub pages: u64,
    /// Of which all-zero (sent as markers).
    pub zero_pages: u64,
    /// Bytes written, framing included.
    pub bytes: u64,
    /// Wall time, acknowledgement included.
    pub duration_us: u64,
    /// Pages found dirty at the end of the round (0 for the stop-and-copy round).
    pub dirty_after: u64,
    /// Time of the `dirty_pages()` call that ended the round; for the stop-and-copy round, the
    /// one after the pause (part of `DowntimeBreakdown::pause_us`). The prediction includes the
    /// latest pre-copy scan.
    pub scan_us: u64,
    /// Downtime predicted at the end of the round (0 for the stop-and-copy round).
    pub predicted_downtime_us: u64,
}

/// The source's account of a successful migration.
#[derive(Clone, Debug, Serialize)]
pub struct MigrationReport {
    /// Protocol version used.
    pub protocol_version: u32,
    /// Component memory size.
    pub memory_bytes: u64,
    /// Pre-copy rounds run (the stop-and-copy round not counted).
    pub precopy_rounds: u32,
    /// Why pre-copy stopped.
    pub stop_reason: StopReason,
    /// Every round, the stop-and-copy round last.
    pub rounds: Vec<RoundReport>,
    /// Dirty pages sent while paused.
    pub final_pages: u64,
    /// Size of the device-state envelope.
    pub device_state_bytes: u64,
    /// The downtime target.
    pub downtime_target_us: u64,
    /// Downtime predicted when pre-copy stopped.
    pub predicted_downtime_us: u64,
    /// Measured downtime: from the source's pause to the destination's `Resumed` arriving.
    pub downtime_us: u64,
    /// Where the downtime went (to calibrate `overhead_estimate`).
    pub downtime_breakdown: DowntimeBreakdown,
    /// Measured time from the start to the end.
    pub total_time_us: u64,
    /// Bytes written, framing included.
    pub bytes_sent: u64,
    /// Pages sent over all rounds.
    pub pages_sent: u64,
    /// Of which all-zero.
    pub zero_pages_sent: u64,
    /// The bandwidth estimate the prediction used, bytes per second.
    pub bandwidth_bytes_per_sec: f64,
}

/// The parts of the measured downtime, in microseconds, in order.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DowntimeBreakdown {
    /// `pause()` and the last `dirty_pages()` (that scan alone: the last round's `scan_us`).
    pub pause_us: u64,
    /// Sending the last dirty pages.
    pub final_pages_us: u64,
    /// `snapshot()` and encoding the envelope.
    pub snapshot_us: u64,
    /// Sending the device state.
    pub state_transfer_us: u64,
    /// From `Complete` sent to `Restored` received: the destination's decode and `restore()`.
    pub restore_us: u64,
    /// From `Commit` sent to `Resumed` received: the destination's `resume()` and a round trip.
    pub resume_us: u64,
}

/// The destination's account of a migration it received.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DestinationReport {
    /// Protocol version used.
    pub protocol_version: u32,
    /// Rounds in which pages arrived (stop-and-copy included).
    pub rounds: u32,
    /// Pages written.
    pub pages: u64,
    /// Of which zero markers.
    pub zero_pages: u64,
    /// Size of the device-state envelope.
    pub device_state_bytes: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Time from the hello to the resume.
    pub total_time_us: u64,
    /// Whether the final `Resumed` acknowledgement was written. If not, the component is
    /// running here but the source cannot know: it stays paused and reports the handover as
    /// unconfirmed, and the owners must destroy the source.
    pub ack_delivered: bool,
}

/// Microseconds, saturating.
pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// An error and all its sources, joined with ": " (what is sent to the peer and logged).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
