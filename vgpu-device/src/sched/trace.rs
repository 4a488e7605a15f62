//! A bounded scheduler trace: who ran on which engine, when, for how long, and why the slice
//! started and ended. Exported as JSON for offline inspection and replay.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

/// One slice.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TraceEvent {
    /// Microseconds since the scheduler started.
    pub t_us: u64,
    /// Engine name.
    pub engine: String,
    /// vGPU id.
    pub vgpu: u32,
    /// Slice length in microseconds.
    pub dur_us: u64,
    /// Commands executed in the slice.
    pub commands: u64,
    /// Why this vGPU was picked (`reserve`, `fair`, `poll`).
    pub why: String,
    /// How the slice ended (`idle`, `preempted`, `waiting`, `faulted`, `stopped`, `watchdog`).
    pub end: String,
}

/// Ring buffer of the newest events.
#[derive(Debug)]
pub struct Trace {
    events: Mutex<VecDeque<TraceEvent>>,
    capacity: usize,
}

impl Trace {
    /// A trace keeping `capacity` events.
    pub fn new(capacity: usize) -> Self {
        Trace {
            events: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            capacity,
        }
    }

    /// Appends an event, dropping the oldest when full.
    pub fn push(&self, ev: TraceEvent) {
        if self.capacity == 0 {
            return;
        }
        let mut q = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        if q.len() == self.capacity {
            q.pop_front();
        }
        q.push_back(ev);
    }

    /// A copy of the events, oldest first.
    pub fn export(&self) -> Vec<TraceEvent> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }
}
