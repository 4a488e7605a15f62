//! The executor: runs a context's scanned submissions on an engine for one time slice,
//! preempting at command boundaries.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vgpu_abi::regs;
use vgpu_abi::Engine;

use crate::audit::Violation;
use crate::engine::context::{CmdKind, Mi};
use crate::engine::translate::{ContextTranslate, Tlb};
use crate::mem::{Fault, FaultKind, Mem};
use crate::vgpu::shared::VgpuShared;
use vgpu_abi::cmd::AuditReason;

/// How a slice ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SliceEnd {
    /// No work left.
    Idle,
    /// The budget ran out with work left: preempted at a command boundary.
    Preempted,
    /// The context waits on a semaphore.
    Waiting,
    /// A reset or ring disable asked the executor to stop.
    Stopped,
    /// A command faulted: the context is in the error state.
    Faulted,
}

/// What a slice did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SliceResult {
    /// Why it ended.
    pub end: SliceEnd,
    /// Commands executed.
    pub commands: u64,
    /// Time spent.
    pub busy: Duration,
}

enum Step {
    Next,
    Wait,
}

fn exec_mi(shared: &VgpuShared, engine: Engine, mem: &mut Mem<'_>, mi: &Mi) -> Result<Step, Fault> {
    let ctx = shared.engine(engine);
    match mi {
        Mi::UserInterrupt => shared.intr.raise(regs::intr_user(engine)),
        Mi::StoreDataImm { addr, value } => {
            mem.write_u32(*addr, *value)?;
            ctx.set_last_fence(*value);
        }
        Mi::LoadRegisterImm(pairs) => {
            for &(reg, v) in pairs {
                shared.set_vreg(reg, v);
                if reg == regs::PLANE_SURF_LO {
                    shared.flip();
                }
            }
        }
        Mi::StoreRegisterMem { reg, addr } => {
            let base = regs::engine_base(engine);
            let v = if *reg == base + regs::RING_HEAD {
                ctx.head()
            } else if *reg == base + regs::LAST_FENCE {
                ctx.last_fence()
            } else {
                shared.vreg(*reg)
            };
            mem.write_u32(*addr, v)?;
        }
        Mi::SemaphoreWait {
            addr,
            value,
            greater_equal,
        } => {
            let v = mem.read_u32(*addr)?;
            let ok = if *greater_equal {
                v >= *value
            } else {
                v == *value
            };
            if !ok {
                return Ok(Step::Wait);
            }
        }
    }
    Ok(Step::Next)
}

/// Runs `engine`'s context of `shared` for up to `budget` (at least one command if any is
/// runnable). `tlb` is the physical engine's TLB (two-dim mode).
pub fn run_slice(
    shared: &VgpuShared,
    engine: Engine,
    tlb: &mut Tlb,
    budget: Duration,
) -> SliceResult {
    let t0 = Instant::now();
    let ctx = shared.engine(engine);
    let _exec = ctx.exec_lock();
    let mut commands = 0u64;
    let finish = |end, commands| {
        let busy = t0.elapsed();
        ctx.stats.busy_ns.fetch_add(
            u64::try_from(busy.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        ctx.stats.commands.fetch_add(commands, Ordering::Relaxed);
        if end == SliceEnd::Preempted {
            ctx.stats.preemptions.fetch_add(1, Ordering::Relaxed);
        }
        SliceResult {
            end,
            commands,
            busy,
        }
    };
    let dma = shared.dma();
    loop {
        // Take the front submission out of the queue while it runs.
        let (sub, mut cursor, mut render) = {
            let mut st = ctx.state();
            let Some(sub) = st.pending.pop_front() else {
                st.running = false;
                ctx.update_status(&st);
                return finish(SliceEnd::Idle, commands);
            };
            st.running = true;
            if st.started.is_none() {
                st.started = Some(Instant::now());
            }
            (sub, st.cursor, std::mem::take(&mut st.render))
        };
        tlb.switch_to((
            shared.id(),
            sub.ppgtt_root,
            ctx.ppgtt_generation(),
            shared.ggtt.generation(),
        ));
        if ctx.take_injected_fault() {
            panic!("fault injected into vGPU {} {}", shared.id(), engine.name());
        }
        // A PPGTT shadow that went stale since the scan (`TLB_INVALIDATE`, a `PPGTT_ROOT` write,
        // a DMA-map change) is not used: the engine translates again (sections 7.4 and 7.5).
        let shadow = sub
            .shadow
            .as_deref()
            .filter(|s| s.matches(sub.ppgtt_root, ctx.ppgtt_generation()));
        let mut t = ContextTranslate::new(shared, &dma, sub.ppgtt_root, shadow, tlb);
        let mut mem = Mem::new(&mut t);
        let mut end = None;
        let mut bytes = 0u64;
        while cursor < sub.cmds.len() {
            if ctx.stop_requested() {
                end = Some(SliceEnd::Stopped);
                break;
            }
            if commands > 0 && t0.elapsed() >= budget {
                end = Some(SliceEnd::Preempted);
                break;
            }
            let c = &sub.cmds[cursor];
            let res = match &c.kind {
                CmdKind::Mi(mi) => exec_mi(shared, engine, &mut mem, mi).map_err(|f| {
                    let reason = if f.kind == FaultKind::ReadOnly {
                        AuditReason::ReadOnlyWrite
                    } else {
                        AuditReason::AddressOutOfRange
                    };
                    (f.to_string(), reason)
                }),
                CmdKind::Op(op) => op
                    .execute(&mut mem, &mut render)
                    .map(|s| {
                        bytes += s.bytes_read + s.bytes_written;
                        Step::Next
                    })
                    .map_err(|e| (e.to_string(), e.audit_reason())),
            };
            match res {
                Ok(Step::Next) => {
                    ctx.set_acthd(c.addr.raw());
                    if let Some(h) = c.head_after {
                        ctx.set_head(h);
                    }
                    cursor += 1;
                    commands += 1;
                    ctx.state().wait_since = None;
                }
                Ok(Step::Wait) => {
                    ctx.set_acthd(c.addr.raw());
                    let mut st = ctx.state();
                    st.wait_since.get_or_insert_with(Instant::now);
                    end = Some(SliceEnd::Waiting);
                    break;
                }
                Err((detail, reason)) => {
                    let v = Violation {
                        addr: c.addr.raw(),
                        header: c.header,
                        reason,
                        detail,
                    };
                    ctx.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
                    {
                        let mut st = ctx.state();
                        st.running = false;
                        st.render = render;
                    }
                    shared.fail_context(engine, &v, true);
                    return finish(SliceEnd::Faulted, commands);
                }
            }
        }
        ctx.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
        let mut st = ctx.state();
        st.render = render;
        match end {
            None => {
                // Submission complete.
                ctx.stats.latency.observe(sub.doorbell.elapsed());
                ctx.set_head(sub.tail);
                st.cursor = 0;
                st.started = None;
                st.running = false;
                ctx.update_status(&st);
                if t0.elapsed() >= budget {
                    let end = if st.pending.is_empty() {
                        SliceEnd::Idle
                    } else {
                        SliceEnd::Preempted
                    };
                    drop(st);
                    return finish(end, commands);
                }
            }
            Some(end) => {
                st.pending.push_front(sub);
                st.cursor = cursor;
                st.running = false;
                ctx.update_status(&st);
                drop(st);
                return finish(end, commands);
            }
        }
    }
}

/// Runs every engine of `shared` in the calling thread until all are idle or only waiting
/// (`max_slices` bounds the work). For tests and single-threaded embedding.
pub fn run_until_idle(shared: &VgpuShared, max_slices: usize) -> bool {
    let mut tlb = Tlb::default();
    for _ in 0..max_slices {
        let mut progress = false;
        for e in Engine::ALL {
            if shared.engine(e).has_work() {
                let r = run_slice(shared, e, &mut tlb, Duration::from_millis(10));
                progress |= r.commands > 0 || r.end == SliceEnd::Faulted;
            }
        }
        if !progress {
            return Engine::ALL.iter().all(|e| !shared.engine(*e).has_work());
        }
    }
    false
}
