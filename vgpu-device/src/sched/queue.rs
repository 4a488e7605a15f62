//! The run queue of one physical engine and its picking policy. Pure bookkeeping: the worker
//! tells it which entries are runnable and how long a slice ran; it answers who runs next.

use std::time::Duration;

/// Scheduling policy of an engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Work-conserving weighted fair sharing: idle capacity goes to whoever has work.
    #[default]
    BestEffort,
    /// Work-conserving equal sharing: weights are ignored.
    EqualShare,
    /// Each vGPU gets its reserved share first and never more than its cap, even if the
    /// engine idles (non-work-conserving).
    FixedShare,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "best-effort" => Ok(Policy::BestEffort),
            "equal-share" => Ok(Policy::EqualShare),
            "fixed-share" => Ok(Policy::FixedShare),
            _ => Err(format!(
                "unknown policy '{s}' (expected best-effort, equal-share or fixed-share)"
            )),
        }
    }
}

/// Per-vGPU scheduling parameters on one engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedParams {
    /// Relative weight, 1..=100 (best-effort).
    pub weight: u32,
    /// Reserved share in percent, 0..=100 (fixed-share).
    pub reserve_pct: u32,
    /// Cap in percent, 1..=100 (fixed-share).
    pub cap_pct: u32,
}

impl Default for SchedParams {
    fn default() -> Self {
        SchedParams {
            weight: 1,
            reserve_pct: 0,
            cap_pct: 100,
        }
    }
}

/// Invalid scheduling parameters.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParamsError {
    /// Weight outside 1..=100.
    #[error("Weight {0} outside 1..=100")]
    Weight(u32),
    /// Reserve above 100 % or above the cap.
    #[error("Reserve {reserve}% must be at most the cap {cap}% and 100%")]
    Reserve {
        /// Reserve.
        reserve: u32,
        /// Cap.
        cap: u32,
    },
    /// Cap outside 1..=100.
    #[error("Cap {0}% outside 1..=100")]
    Cap(u32),
    /// The reserves of all vGPUs on the engine would exceed 100 %.
    #[error("Reserves on engine {engine} would total {total}% (> 100%)")]
    OverReserved {
        /// Engine name.
        engine: &'static str,
        /// Total.
        total: u32,
    },
}

impl SchedParams {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), ParamsError> {
        if !(1..=100).contains(&self.weight) {
            return Err(ParamsError::Weight(self.weight));
        }
        if !(1..=100).contains(&self.cap_pct) {
            return Err(ParamsError::Cap(self.cap_pct));
        }
        if self.reserve_pct > self.cap_pct {
            return Err(ParamsError::Reserve {
                reserve: self.reserve_pct,
                cap: self.cap_pct,
            });
        }
        Ok(())
    }
}

/// Accounting window of fixed-share reserves and caps.
pub const WINDOW: Duration = Duration::from_millis(100);

/// One vGPU on the engine.
#[derive(Clone, Debug)]
pub struct Entry {
    /// vGPU id.
    pub id: u32,
    /// Parameters.
    pub params: SchedParams,
    /// Weighted virtual time: busy ns × 1000 / weight.
    pub vtime: u128,
    /// Busy time in the current window.
    pub window_ns: u64,
    /// Busy time in total.
    pub total_ns: u64,
}

/// The run queue.
#[derive(Debug, Default)]
pub struct RunQueue {
    /// Policy.
    pub policy: Policy,
    /// Entries.
    pub entries: Vec<Entry>,
    /// Time into the current window.
    window_elapsed: Duration,
}

/// Why an entry was picked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// Below its fixed-share reserve.
    Reserve,
    /// Smallest weighted virtual time.
    Fair,
}

impl Why {
    /// Name for the trace.
    pub fn name(self) -> &'static str {
        match self {
            Why::Reserve => "reserve",
            Why::Fair => "fair",
        }
    }
}

impl RunQueue {
    /// Adds a vGPU. Its virtual time starts at the smallest current one, so it neither starves
    /// others nor waits behind them.
    pub fn add(&mut self, id: u32, params: SchedParams) {
        let vtime = self.entries.iter().map(|e| e.vtime).min().unwrap_or(0);
        self.entries.retain(|e| e.id != id);
        self.entries.push(Entry {
            id,
            params,
            vtime,
            window_ns: 0,
            total_ns: 0,
        });
    }

    /// Removes a vGPU.
    pub fn remove(&mut self, id: u32) {
        self.entries.retain(|e| e.id != id);
    }

    fn weight(&self, e: &Entry) -> u128 {
        match self.policy {
            Policy::EqualShare => 1,
            _ => u128::from(e.params.weight.max(1)),
        }
    }

    /// A vGPU that was idle gets its virtual time raised to the smallest of the busy ones, so
    /// idle time is not banked as credit (work-conserving fairness).
    pub fn wake(&mut self, id: u32, busy: &[u32]) {
        let floor = self
            .entries
            .iter()
            .filter(|e| busy.contains(&e.id) && e.id != id)
            .map(|e| e.vtime)
            .min();
        if let (Some(floor), Some(e)) = (floor, self.entries.iter_mut().find(|e| e.id == id)) {
            e.vtime = e.vtime.max(floor);
        }
    }

    /// Picks among `runnable` ids. `None` when nothing may run now (fixed-share caps).
    pub fn pick(&self, runnable: &[u32]) -> Option<(u32, Why)> {
        let cands = self.entries.iter().filter(|e| runnable.contains(&e.id));
        match self.policy {
            Policy::BestEffort | Policy::EqualShare => {
                cands.min_by_key(|e| e.vtime).map(|e| (e.id, Why::Fair))
            }
            Policy::FixedShare => {
                let win = WINDOW.as_nanos();
                let cands: Vec<&Entry> = cands
                    .filter(|e| u128::from(e.window_ns) * 100 < win * u128::from(e.params.cap_pct))
                    .collect();
                // Below reserve first, the furthest below first.
                let below = cands
                    .iter()
                    .filter(|e| {
                        u128::from(e.window_ns) * 100 < win * u128::from(e.params.reserve_pct)
                    })
                    .min_by_key(|e| {
                        u128::from(e.window_ns) * 10_000 / u128::from(e.params.reserve_pct.max(1))
                    });
                if let Some(e) = below {
                    return Some((e.id, Why::Reserve));
                }
                cands
                    .into_iter()
                    .min_by_key(|e| e.vtime)
                    .map(|e| (e.id, Why::Fair))
            }
        }
    }

    /// How long `id` may run now: the slice, shortened under fixed-share so a slice never
    /// carries a vGPU past its cap (or, when it was picked for its reserve, past its reserve)
    /// within the window.
    pub fn budget(&self, id: u32, slice: Duration, why: Why) -> Duration {
        if self.policy != Policy::FixedShare {
            return slice;
        }
        let Some(e) = self.entries.iter().find(|e| e.id == id) else {
            return slice;
        };
        // Picked to make up its reserve: run only up to the reserve; otherwise up to the cap.
        let pct = match why {
            Why::Reserve => e.params.reserve_pct,
            Why::Fair => e.params.cap_pct,
        };
        let cap_ns = WINDOW.as_nanos() * u128::from(pct) / 100;
        let left = cap_ns.saturating_sub(u128::from(e.window_ns));
        slice.min(Duration::from_nanos(
            u64::try_from(left).unwrap_or(u64::MAX),
        ))
    }

    /// Accounts a slice of `busy` to `id`.
    pub fn charge(&mut self, id: u32, busy: Duration) {
        let ns = u64::try_from(busy.as_nanos()).unwrap_or(u64::MAX);
        let w = self
            .entries
            .iter()
            .find(|e| e.id == id)
            .map(|e| self.weight(e))
            .unwrap_or(1);
        if let Some(e) = self.entries.iter_mut().find(|e| e.id == id) {
            e.vtime += u128::from(ns) * 1000 / w;
            e.window_ns = e.window_ns.saturating_add(ns);
            e.total_ns = e.total_ns.saturating_add(ns);
        }
    }

    /// Advances the accounting window by `dt` of wall time; starts a new window when it is full.
    pub fn tick(&mut self, dt: Duration) {
        self.window_elapsed += dt;
        if self.window_elapsed >= WINDOW {
            self.window_elapsed = Duration::ZERO;
            for e in &mut self.entries {
                e.window_ns = 0;
            }
        }
    }

    /// Sum of reserves, excluding `except`.
    pub fn reserved_pct(&self, except: u32) -> u32 {
        self.entries
            .iter()
            .filter(|e| e.id != except)
            .map(|e| e.params.reserve_pct)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates `slices` slices of `slice` with every entry always runnable; returns shares.
    fn simulate(q: &mut RunQueue, slices: usize, slice: Duration) -> Vec<f64> {
        let ids: Vec<u32> = q.entries.iter().map(|e| e.id).collect();
        let mut total = Duration::ZERO;
        for _ in 0..slices {
            if let Some((id, _)) = q.pick(&ids) {
                q.charge(id, slice);
            }
            q.tick(slice);
            total += slice;
        }
        let t = total.as_nanos() as f64;
        q.entries.iter().map(|e| e.total_ns as f64 / t).collect()
    }

    #[test]
    fn test_best_effort_shares_follow_weights() {
        let mut q = RunQueue::default();
        for (i, w) in [1, 2, 3, 4].into_iter().enumerate() {
            q.add(
                u32::try_from(i).unwrap(),
                SchedParams {
                    weight: w,
                    ..Default::default()
                },
            );
        }
        let shares = simulate(&mut q, 10_000, Duration::from_millis(1));
        for (i, s) in shares.iter().enumerate() {
            let want = (i + 1) as f64 / 10.0;
            assert!((s - want).abs() < 0.01, "vgpu {i}: {s} vs {want}");
        }
    }

    #[test]
    fn test_equal_share_ignores_weights() {
        let mut q = RunQueue {
            policy: Policy::EqualShare,
            ..Default::default()
        };
        q.add(
            0,
            SchedParams {
                weight: 9,
                ..Default::default()
            },
        );
        q.add(
            1,
            SchedParams {
                weight: 1,
                ..Default::default()
            },
        );
        let s = simulate(&mut q, 1000, Duration::from_millis(1));
        assert!(
            (s[0] - 0.5).abs() < 0.01 && (s[1] - 0.5).abs() < 0.01,
            "{s:?}"
        );
    }

    #[test]
    fn test_fixed_share_caps_even_when_engine_idles() {
        let mut q = RunQueue {
            policy: Policy::FixedShare,
            ..Default::default()
        };
        q.add(
            0,
            SchedParams {
                weight: 1,
                reserve_pct: 20,
                cap_pct: 30,
            },
        );
        let s = simulate(&mut q, 10_000, Duration::from_millis(1));
        assert!((s[0] - 0.30).abs() < 0.01, "capped at 30%: {s:?}");
    }

    #[test]
    fn test_fixed_share_budget_stops_at_cap() {
        let mut q = RunQueue {
            policy: Policy::FixedShare,
            ..Default::default()
        };
        q.add(
            0,
            SchedParams {
                weight: 1,
                reserve_pct: 0,
                cap_pct: 5,
            },
        );
        let slice = Duration::from_millis(2);
        assert_eq!(q.budget(0, slice, Why::Fair), slice);
        q.charge(0, Duration::from_millis(4));
        assert_eq!(
            q.budget(0, slice, Why::Fair),
            Duration::from_millis(1),
            "5 ms cap in a 100 ms window"
        );
        q.charge(0, Duration::from_millis(1));
        assert_eq!(q.budget(0, slice, Why::Fair), Duration::ZERO);
        assert_eq!(q.pick(&[0]), None);
    }

    #[test]
    fn test_fixed_share_reserve_pick_stops_at_reserve() {
        let mut q = RunQueue {
            policy: Policy::FixedShare,
            ..Default::default()
        };
        q.add(
            0,
            SchedParams {
                weight: 1,
                reserve_pct: 3,
                cap_pct: 100,
            },
        );
        q.charge(0, Duration::from_millis(2));
        let slice = Duration::from_millis(2);
        assert_eq!(
            q.budget(0, slice, Why::Reserve),
            Duration::from_millis(1),
            "3 ms reserve of 100 ms"
        );
        assert_eq!(
            q.budget(0, slice, Why::Fair),
            slice,
            "a fair pick runs a whole slice"
        );
    }

    #[test]
    fn test_fixed_share_reserve_beats_heavier_weight() {
        let mut q = RunQueue {
            policy: Policy::FixedShare,
            ..Default::default()
        };
        q.add(
            0,
            SchedParams {
                weight: 1,
                reserve_pct: 60,
                cap_pct: 100,
            },
        );
        q.add(
            1,
            SchedParams {
                weight: 100,
                reserve_pct: 0,
                cap_pct: 100,
            },
        );
        let s = simulate(&mut q, 10_000, Duration::from_millis(1));
        assert!(s[0] >= 0.59, "reserve honoured: {s:?}");
    }

    #[test]
    fn test_params_validation_rejects_out_of_range() {
        assert!(SchedParams {
            weight: 0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SchedParams {
            weight: 101,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SchedParams {
            weight: 1,
            reserve_pct: 50,
            cap_pct: 40
        }
        .validate()
        .is_err());
        assert!(SchedParams {
            weight: 1,
            reserve_pct: 0,
            cap_pct: 0
        }
        .validate()
        .is_err());
        assert!(SchedParams::default().validate().is_ok());
    }

    #[test]
    fn test_wake_does_not_bank_idle_time() {
        let mut q = RunQueue::default();
        q.add(0, SchedParams::default());
        q.add(1, SchedParams::default());
        for _ in 0..100 {
            q.charge(0, Duration::from_millis(1));
        }
        q.wake(1, &[0]);
        let e1 = q.entries.iter().find(|e| e.id == 1).unwrap().vtime;
        let e0 = q.entries.iter().find(|e| e.id == 0).unwrap().vtime;
        assert_eq!(e1, e0, "woken entry starts level with the busy one");
    }
}
