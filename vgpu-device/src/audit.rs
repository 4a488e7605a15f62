//! Audit events: structured records of what the command scanner rejected and which contexts
//! faulted or were reset. Bounded per vGPU; the total count keeps growing.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use vgpu_abi::cmd::AuditReason;
use vgpu_abi::Engine;

/// One audit event.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AuditEvent {
    /// Sequence number within the vGPU, from 1.
    pub seq: u64,
    /// The vGPU instance id.
    pub vgpu: u32,
    /// Engine name.
    pub engine: &'static str,
    /// Address of the offending command (GM or PPGTT address).
    pub addr: u64,
    /// Its header dword.
    pub header: u32,
    /// Opcode field of the header.
    pub opcode: u32,
    /// Reason code name (see `docs/device-spec.md`).
    pub reason: &'static str,
    /// Human-readable detail.
    pub detail: String,
    /// Milliseconds since the UNIX epoch.
    pub time_ms: u64,
}

/// What the scanner or executor reports: where and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Address of the offending command.
    pub addr: u64,
    /// Its header dword (0 if it could not be read).
    pub header: u32,
    /// Why.
    pub reason: AuditReason,
    /// Detail for the log.
    pub detail: String,
}

/// Bounded audit log of one vGPU.
#[derive(Debug)]
pub struct AuditLog {
    events: Mutex<VecDeque<AuditEvent>>,
    total: AtomicU64,
    capacity: usize,
}

impl AuditLog {
    /// A log keeping the newest `capacity` events.
    pub fn new(capacity: usize) -> Self {
        AuditLog {
            events: Mutex::new(VecDeque::new()),
            total: AtomicU64::new(0),
            capacity,
        }
    }

    /// Records a violation on `engine` of vGPU `vgpu`.
    pub fn record(&self, vgpu: u32, engine: Engine, v: &Violation) {
        // The total may come from a snapshot (untrusted): saturate instead of overflowing,
        // which panicked the thread that recorded the event (an engine or a vfio-user
        // connection) in builds with overflow checks, and wrapped the numbering otherwise.
        let prev = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.saturating_add(1))
            })
            .unwrap_or(u64::MAX);
        let seq = prev.saturating_add(1);
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let ev = AuditEvent {
            seq,
            vgpu,
            engine: engine.name(),
            addr: v.addr,
            header: v.header,
            opcode: vgpu_abi::cmd::Header::parse(v.header).opcode,
            reason: v.reason.name(),
            detail: v.detail.clone(),
            time_ms,
        };
        tracing::warn!(vgpu, engine = engine.name(), addr = v.addr, reason = v.reason.name(), detail = %v.detail, "command rejected");
        let mut q = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        if q.len() == self.capacity {
            q.pop_front();
        }
        q.push_back(ev);
    }

    /// Sets the total (a restored vGPU continues its numbering).
    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Release);
    }

    /// Total events recorded since creation.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Acquire)
    }

    /// Events with `seq > after`, oldest first, at most `limit`.
    pub fn since(&self, after: u64, limit: usize) -> Vec<AuditEvent> {
        let q = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        q.iter()
            .filter(|e| e.seq > after)
            .take(limit)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_audit_log_bounded_keeps_newest() {
        let log = AuditLog::new(3);
        for i in 0..5 {
            let v = Violation {
                addr: i,
                header: 0,
                reason: AuditReason::BadLength,
                detail: String::new(),
            };
            log.record(1, Engine::Blit, &v);
        }
        assert_eq!(log.total(), 5);
        let ev = log.since(0, 10);
        assert_eq!(ev.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(log.since(4, 10).len(), 1);
        assert_eq!(ev[0].reason, "bad_length");
    }

    #[test]
    fn test_audit_record_at_restored_maximum_total_saturates_without_panic() {
        let log = AuditLog::new(3);
        log.set_total(u64::MAX - 1);
        let v = Violation {
            addr: 0,
            header: 0,
            reason: AuditReason::BadRing,
            detail: String::new(),
        };
        log.record(1, Engine::Blit, &v);
        log.record(1, Engine::Blit, &v);
        assert_eq!(log.total(), u64::MAX);
        let seqs: Vec<u64> = log.since(0, 10).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![u64::MAX, u64::MAX]);
    }
}
