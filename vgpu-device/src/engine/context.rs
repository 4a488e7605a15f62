//! Per-vGPU, per-engine context: the queue of scanned submissions, the engine-visible register
//! state (HEAD, ACTHD, fence, status, error) and the counters.
//!
//! The MMIO path (doorbells, resets) and the engine worker that executes the context share it.
//! The worker holds [`EngineContext::exec`] while it runs a slice and checks
//! [`EngineContext::stop_requested`] between commands, so a reset waits at most one command.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use vgpu_abi::cmd::AuditReason;
use vgpu_abi::regs::{ENGINE_STATUS_ERROR, ENGINE_STATUS_IDLE, ENGINE_STATUS_WAITING};
use vgpu_abi::Engine;

use crate::addr::GpuVa;
use crate::engine::ops::{Op, RenderState, Surface};
use crate::engine::translate::PpgttShadow;
use crate::hist::Histogram;
use std::sync::Arc;

/// An MI command after scanning.
#[derive(Clone, Debug, PartialEq)]
pub enum Mi {
    /// Raise the engine's user interrupt.
    UserInterrupt,
    /// Write `value` at `addr` and set `LAST_FENCE`.
    StoreDataImm {
        /// Target address.
        addr: GpuVa,
        /// Value.
        value: u32,
    },
    /// Load whitelisted registers (BAR0 offset, value).
    LoadRegisterImm(Vec<(u32, u32)>),
    /// Store a readable register at `addr`.
    StoreRegisterMem {
        /// BAR0 register offset.
        reg: u32,
        /// Target address.
        addr: GpuVa,
    },
    /// Wait until the dword at `addr` is `== value` (or `>=` with `greater_equal`).
    SemaphoreWait {
        /// Address polled.
        addr: GpuVa,
        /// Value waited for.
        value: u32,
        /// Compare unsigned `>=` instead of `==`.
        greater_equal: bool,
    },
}

/// What one scanned command does.
#[derive(Clone, Debug, PartialEq)]
pub enum CmdKind {
    /// An MI command.
    Mi(Mi),
    /// A blit, render, video or compute operation.
    Op(Op),
}

/// A scanned command, copied out of guest memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Command {
    /// What to do.
    pub kind: CmdKind,
    /// Where the command was (for `ACTHD` and audit events).
    pub addr: GpuVa,
    /// Its header dword.
    pub header: u32,
    /// The command's dwords as scanned (what a snapshot saves; a restore decodes them again).
    pub raw: Vec<u32>,
    /// Ring offset after the ring-level command this belongs to, once it is complete.
    pub head_after: Option<u32>,
}

/// One doorbell's worth of scanned work.
#[derive(Clone, Debug)]
pub struct Submission {
    /// The commands, batch buffers flattened, in execution order.
    pub cmds: Vec<Command>,
    /// `PPGTT_ROOT` latched at the doorbell (0: GGTT addressing).
    pub ppgtt_root: u64,
    /// The ring tail this submission ends at.
    pub tail: u32,
    /// Shadow mode with a PPGTT: the shadow the submission was validated against (and runs
    /// with: scan once, execute what was scanned).
    pub shadow: Option<Arc<PpgttShadow>>,
    /// When the doorbell that queued it rang (submission latency is measured from here to
    /// the completion of its last command).
    pub doorbell: Instant,
}

/// What kind of reset a context goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetKind {
    /// Full vGPU reset: everything back to creation state.
    Full,
    /// `RESET_CTL` engine reset: keeps `ACTHD` and `LAST_FENCE`.
    Engine,
    /// Watchdog: like an engine reset but the error state reports `Watchdog`.
    Watchdog,
}

/// Counters of one engine context.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Nanoseconds spent executing.
    pub busy_ns: AtomicU64,
    /// Commands executed.
    pub commands: AtomicU64,
    /// Bytes read and written by operations.
    pub bytes: AtomicU64,
    /// Submissions accepted.
    pub submissions: AtomicU64,
    /// Slices that ended with work left (preemptions at command boundaries).
    pub preemptions: AtomicU64,
    /// Resets (guest, host or watchdog).
    pub resets: AtomicU64,
    /// Audit events (rejections and faults).
    pub audits: AtomicU64,
    /// Submission latency: doorbell to the completion of the submission's last command.
    pub latency: Histogram,
    /// Lengths of the scheduler slices that executed commands.
    pub slices: Histogram,
}

/// Mutable state of the context, under [`EngineContext::state`].
#[derive(Debug, Default)]
pub struct CtxState {
    /// Scanned submissions not finished yet; the front one may be partly executed.
    pub pending: VecDeque<Submission>,
    /// Index of the next command of the front submission.
    pub cursor: usize,
    /// Render engine state (current render target).
    pub render: RenderState,
    /// When the front submission started executing (watchdog).
    pub started: Option<Instant>,
    /// When the context started waiting on a semaphore.
    pub wait_since: Option<Instant>,
    /// An executor has taken the front submission out to run it.
    pub running: bool,
}

/// Engine context of one vGPU.
#[derive(Debug)]
pub struct EngineContext {
    engine: Engine,
    state: Mutex<CtxState>,
    exec: Mutex<()>,
    stop: AtomicBool,
    head: AtomicU32,
    acthd: AtomicU64,
    last_fence: AtomicU32,
    status: AtomicU32,
    error_code: AtomicU32,
    error_header: AtomicU32,
    error_addr: AtomicU64,
    /// Bumped whenever cached PPGTT translations must be dropped.
    ppgtt_generation: AtomicU64,
    ring_enabled: AtomicBool,
    /// Render surface as of the last scanned submission (the scanner checks draws against it).
    scan_surface: Mutex<Option<Surface>>,
    /// Shadow of the context's PPGTT (shadow mode), shared by scanner and executor.
    shadow: Mutex<Option<Arc<PpgttShadow>>>,
    /// Ring offset where the last accepted submission ended.
    submitted: AtomicU32,
    /// Counters.
    pub stats: EngineStats,
}

impl EngineContext {
    /// An idle context.
    pub fn new(engine: Engine) -> Self {
        EngineContext {
            engine,
            state: Mutex::new(CtxState::default()),
            exec: Mutex::new(()),
            stop: AtomicBool::new(false),
            head: AtomicU32::new(0),
            acthd: AtomicU64::new(0),
            last_fence: AtomicU32::new(0),
            status: AtomicU32::new(ENGINE_STATUS_IDLE),
            error_code: AtomicU32::new(0),
            error_header: AtomicU32::new(0),
            error_addr: AtomicU64::new(0),
            ppgtt_generation: AtomicU64::new(0),
            ring_enabled: AtomicBool::new(false),
            scan_surface: Mutex::new(None),
            shadow: Mutex::new(None),
            submitted: AtomicU32::new(0),
            stats: EngineStats::default(),
        }
    }

    /// The engine.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// Locks the queue state.
    pub fn state(&self) -> MutexGuard<'_, CtxState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Held by whoever executes commands of this context.
    pub fn exec_lock(&self) -> MutexGuard<'_, ()> {
        self.exec.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the executor should stop at the next command boundary.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// `RING_HEAD`.
    pub fn head(&self) -> u32 {
        self.head.load(Ordering::Acquire)
    }
    /// Sets `RING_HEAD`.
    pub fn set_head(&self, v: u32) {
        self.head.store(v, Ordering::Release)
    }
    /// `ACTHD`.
    pub fn acthd(&self) -> u64 {
        self.acthd.load(Ordering::Acquire)
    }
    /// Sets `ACTHD`.
    pub fn set_acthd(&self, v: u64) {
        self.acthd.store(v, Ordering::Release)
    }
    /// `LAST_FENCE`.
    pub fn last_fence(&self) -> u32 {
        self.last_fence.load(Ordering::Acquire)
    }
    /// Sets `LAST_FENCE`.
    pub fn set_last_fence(&self, v: u32) {
        self.last_fence.store(v, Ordering::Release)
    }
    /// `ENGINE_STATUS`.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }
    /// Whether the context is in the error state.
    pub fn in_error(&self) -> bool {
        self.status() & ENGINE_STATUS_ERROR != 0
    }
    /// `ERROR_CODE`, `ERROR_HEADER`, `ERROR_ADDR`.
    pub fn error(&self) -> (u32, u32, u64) {
        (
            self.error_code.load(Ordering::Acquire),
            self.error_header.load(Ordering::Acquire),
            self.error_addr.load(Ordering::Acquire),
        )
    }
    /// The PPGTT translation-cache generation.
    pub fn ppgtt_generation(&self) -> u64 {
        self.ppgtt_generation.load(Ordering::Acquire)
    }
    /// Drops cached PPGTT translations (TLB invalidate, new root).
    pub fn invalidate_ppgtt(&self) {
        self.ppgtt_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Recomputes `ENGINE_STATUS` from the queue (error is sticky until cleared).
    pub fn update_status(&self, st: &CtxState) {
        let mut s = self.status() & ENGINE_STATUS_ERROR;
        if st.pending.is_empty() && !st.running {
            s |= ENGINE_STATUS_IDLE;
        }
        if st.wait_since.is_some() {
            s |= ENGINE_STATUS_WAITING;
        }
        self.status.store(s, Ordering::Release);
    }

    /// Whether `RING_CTL_ENABLE` is set.
    pub fn ring_enabled(&self) -> bool {
        self.ring_enabled.load(Ordering::Acquire)
    }
    /// Sets or clears `RING_CTL_ENABLE`; enabling starts both ring offsets at 0.
    pub fn set_ring_enabled(&self, en: bool) {
        if en {
            self.submitted.store(0, Ordering::Release);
            self.head.store(0, Ordering::Release);
        }
        self.ring_enabled.store(en, Ordering::Release);
    }
    /// Ring offset where the last accepted submission ended.
    pub fn submitted(&self) -> u32 {
        self.submitted.load(Ordering::Acquire)
    }
    /// Records where the last accepted submission ended.
    pub fn set_submitted(&self, v: u32) {
        self.submitted.store(v, Ordering::Release)
    }

    /// Drops queued work that has not started (ring disabled); the command in flight completes.
    pub fn drop_queued(&self) {
        self.stop.store(true, Ordering::Release);
        let _exec = self.exec_lock();
        let mut st = self.state();
        st.pending.clear();
        st.cursor = 0;
        st.started = None;
        st.wait_since = None;
        self.update_status(&st);
        self.stop.store(false, Ordering::Release);
    }

    /// Enters the error state with `reason`. `drop_queued`: also drop queued work (a fault
    /// during execution); a rejected doorbell leaves earlier submissions to run.
    pub fn set_error(
        &self,
        st: &mut CtxState,
        reason: AuditReason,
        header: u32,
        addr: u64,
        drop_queued: bool,
    ) {
        self.error_code.store(reason as u32, Ordering::Release);
        self.error_header.store(header, Ordering::Release);
        self.error_addr.store(addr, Ordering::Release);
        self.status.fetch_or(ENGINE_STATUS_ERROR, Ordering::AcqRel);
        self.stats.audits.fetch_add(1, Ordering::Relaxed);
        if drop_queued {
            st.pending.clear();
            st.cursor = 0;
            st.started = None;
            st.wait_since = None;
        }
        self.update_status(st);
    }

    /// Clears the error state and error registers (ring re-enabled).
    pub fn clear_error(&self) {
        self.error_code.store(0, Ordering::Release);
        self.error_header.store(0, Ordering::Release);
        self.error_addr.store(0, Ordering::Release);
        self.status
            .fetch_and(!ENGINE_STATUS_ERROR, Ordering::AcqRel);
    }

    /// Stops execution (waiting for the command in flight), drops all work and returns the
    /// context to the reset state of `kind` (see `docs/device-spec.md`, section 11).
    pub fn reset(&self, kind: ResetKind) {
        self.stop.store(true, Ordering::Release);
        let _exec = self.exec_lock();
        let mut st = self.state();
        *st = CtxState::default();
        self.head.store(0, Ordering::Release);
        self.submitted.store(0, Ordering::Release);
        self.ring_enabled.store(false, Ordering::Release);
        *self
            .scan_surface
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        *self.shadow.lock().unwrap_or_else(PoisonError::into_inner) = None;
        if kind == ResetKind::Full {
            self.acthd.store(0, Ordering::Release);
            self.last_fence.store(0, Ordering::Release);
        }
        if kind == ResetKind::Watchdog {
            self.update_status(&st);
        } else {
            self.error_code.store(0, Ordering::Release);
            self.error_header.store(0, Ordering::Release);
            self.error_addr.store(0, Ordering::Release);
            self.status.store(ENGINE_STATUS_IDLE, Ordering::Release);
        }
        self.invalidate_ppgtt();
        if kind != ResetKind::Full {
            self.stats.resets.fetch_add(1, Ordering::Relaxed);
        }
        self.stop.store(false, Ordering::Release);
    }

    /// The render surface the next scanned submission starts with.
    pub fn scan_surface(&self) -> Option<Surface> {
        *self
            .scan_surface
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
    /// Records the render surface at the end of an accepted submission.
    pub fn set_scan_surface(&self, s: Option<Surface>) {
        *self
            .scan_surface
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = s;
    }
    /// The cached PPGTT shadow.
    pub fn shadow(&self) -> Option<Arc<PpgttShadow>> {
        self.shadow
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
    /// Caches a PPGTT shadow.
    pub fn set_shadow(&self, s: Option<Arc<PpgttShadow>>) {
        *self.shadow.lock().unwrap_or_else(PoisonError::into_inner) = s;
    }

    /// Queues a scanned submission.
    pub fn push(&self, sub: Submission) {
        let mut st = self.state();
        st.pending.push_back(sub);
        self.stats.submissions.fetch_add(1, Ordering::Relaxed);
        self.update_status(&st);
    }

    /// Whether there is work queued.
    pub fn has_work(&self) -> bool {
        !self.state().pending.is_empty()
    }
}
