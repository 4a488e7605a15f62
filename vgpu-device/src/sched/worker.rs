//! The worker thread of one physical engine: picks a context, runs a slice, accounts it,
//! and watches for hung contexts.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use vgpu_abi::cmd::AuditReason;
use vgpu_abi::Engine;

use crate::audit::Violation;
use crate::engine::context::ResetKind;
use crate::engine::exec::{run_slice, SliceEnd, SliceResult};
use crate::engine::translate::Tlb;
use crate::sched::trace::TraceEvent;
use crate::sched::Inner;
use crate::vgpu::shared::VgpuShared;

/// How often a waiting context's semaphore is polled when nothing else runs.
const POLL: Duration = Duration::from_micros(200);
/// Longest sleep of an idle worker (watchdog sweeps and window accounting still happen).
const IDLE_SLEEP: Duration = Duration::from_millis(20);

/// Resets a context the device itself gave up on (`Watchdog`, `DeviceFault`): error state,
/// ring disabled, work dropped, audit event, `intr_reset`.
pub(crate) fn error_reset(v: &VgpuShared, e: Engine, reason: AuditReason, detail: String) {
    let ctx = v.engine(e);
    let viol = Violation {
        addr: ctx.acthd(),
        header: 0,
        reason,
        detail,
    };
    {
        let mut st = ctx.state();
        ctx.set_error(&mut st, reason, 0, ctx.acthd(), true);
    }
    ctx.reset(ResetKind::KeepError);
    v.audit.record(v.id(), e, &viol);
    v.intr.raise(vgpu_abi::regs::intr_reset(e));
}

/// Runs one slice with a failure of the device model (a panic: a host defect) contained to the
/// context that ran: it is reset with `DeviceFault`, the TLB is dropped, and the engine goes on
/// serving everyone else. Without this, one bad command would stop the engine for every vGPU.
fn run_slice_contained(v: &VgpuShared, e: Engine, tlb: &mut Tlb, slice: Duration) -> SliceResult {
    let t0 = Instant::now();
    match std::panic::catch_unwind(AssertUnwindSafe(|| run_slice(v, e, tlb, slice))) {
        Ok(r) => r,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(vgpu = v.id(), engine = e.name(), %what, "device fault, context reset");
            *tlb = Tlb::default();
            error_reset(
                v,
                e,
                AuditReason::DeviceFault,
                format!("device fault: {what}"),
            );
            SliceResult {
                end: SliceEnd::Faulted,
                commands: 0,
                busy: t0.elapsed(),
            }
        }
    }
}

fn end_name(end: SliceEnd) -> &'static str {
    match end {
        SliceEnd::Idle => "idle",
        SliceEnd::Preempted => "preempted",
        SliceEnd::Waiting => "waiting",
        SliceEnd::Stopped => "stopped",
        SliceEnd::Faulted => "faulted",
    }
}

pub(crate) fn run(inner: &Arc<Inner>, e: Engine) {
    let slot = &inner.engines[e.index()];
    let mut tlb = Tlb::default();
    let mut last = Instant::now();
    loop {
        if inner.shutdown.load(Ordering::Acquire) {
            return;
        }
        let watchdog = Duration::from_nanos(inner.watchdog_ns.load(Ordering::Acquire));
        // Pick under the queue lock.
        let picked = {
            let mut q = slot.lock();
            let now = Instant::now();
            q.rq.tick(now - last);
            last = now;
            q.kicked = false;
            let mut runnable = Vec::new();
            let mut waiting_only = Vec::new();
            let mut hung = Vec::new();
            for (id, v) in &q.vgpus {
                if q.paused.contains(id) {
                    // Paused: doorbells still queue, nothing runs, the watchdog does not count.
                    continue;
                }
                let ctx = v.engine(e);
                let st = ctx.state();
                if st.pending.is_empty() {
                    continue;
                }
                match st.wait_since {
                    Some(t) if now.duration_since(t) > watchdog => {
                        hung.push((v.clone(), now.duration_since(t)))
                    }
                    Some(_) => waiting_only.push(*id),
                    None => runnable.push(*id),
                }
            }
            drop(q);
            for (v, waited) in hung {
                tracing::warn!(vgpu = v.id(), engine = e.name(), "watchdog reset");
                let detail = format!("context hung for {} ms", waited.as_millis());
                error_reset(&v, e, AuditReason::Watchdog, detail);
                inner.trace.push(TraceEvent {
                    t_us: micros(inner.start.elapsed()),
                    engine: e.name().into(),
                    vgpu: v.id(),
                    dur_us: 0,
                    commands: 0,
                    why: "watchdog".into(),
                    end: "watchdog".into(),
                });
            }
            let mut q = slot.lock();
            let mut busy: Vec<u32> = runnable.iter().chain(&waiting_only).copied().collect();
            busy.sort_unstable();
            // A vGPU that wakes up starts level with the vGPUs that were already busy — not with
            // others waking at the same moment, whose old virtual times would let the whole
            // group starve the ones that kept running.
            let before = std::mem::take(&mut q.busy);
            for id in &busy {
                if before.binary_search(id).is_err() {
                    q.rq.wake(*id, &before);
                }
            }
            q.busy = busy;
            let pick =
                q.rq.pick(&runnable)
                    .map(|(id, why)| (id, why.name()))
                    .or_else(|| {
                        // Nothing else to run: poll a waiting context (round robin by virtual time).
                        q.rq.pick(&waiting_only).map(|(id, _)| (id, "poll"))
                    });
            match pick.and_then(|(id, why)| q.vgpus.get(&id).cloned().map(|v| (v, why))) {
                Some((v, why)) => {
                    q.running = Some(v.id());
                    Some((v, why, !runnable.is_empty()))
                }
                None => {
                    let sleep = if waiting_only.is_empty() && runnable.is_empty() {
                        IDLE_SLEEP
                    } else {
                        POLL
                    };
                    if !q.kicked {
                        let _ = slot
                            .cv
                            .wait_timeout(q, sleep)
                            .unwrap_or_else(PoisonError::into_inner);
                    }
                    None
                }
            }
        };
        let Some((v, why, _)) = picked else { continue };
        let slice = Duration::from_nanos(inner.slice_ns.load(Ordering::Acquire));
        let pick_reason = if why == crate::sched::queue::Why::Reserve.name() {
            crate::sched::queue::Why::Reserve
        } else {
            crate::sched::queue::Why::Fair
        };
        let slice = slot.lock().rq.budget(v.id(), slice, pick_reason);
        let t = inner.start.elapsed();
        let r = run_slice_contained(&v, e, &mut tlb, slice);
        if r.commands > 0 {
            v.engine(e).stats.slices.observe(r.busy);
        }
        {
            let mut q = slot.lock();
            q.rq.charge(v.id(), r.busy);
            q.running = None;
        }
        slot.cv.notify_all();
        inner.trace.push(TraceEvent {
            t_us: micros(t),
            engine: e.name().into(),
            vgpu: v.id(),
            dur_us: micros(r.busy),
            commands: r.commands,
            why: why.into(),
            end: end_name(r.end).into(),
        });
        if r.end == SliceEnd::Waiting && why == "poll" {
            // Only waiting contexts: don't spin.
            std::thread::sleep(POLL);
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
