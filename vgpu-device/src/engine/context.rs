//! Per-vGPU, per-engine context: the queue of scanned submissions, the engine-visible register
//! state (HEAD, ACTHD, fence, status, error) and the counters.
//!
//! The MMIO path (doorbells, resets) and the engine worker that executes the context share it.
//! The worker holds [`EngineContext::exec_lock`] while it runs a slice and checks
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
    /// After an error the device itself detected (watchdog, device fault): like an engine
    /// reset, but the error state set just before is kept for the driver to read.
    KeepError,
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
    /// Fault injection: the next submission this context executes fails inside the engine.
    injected_fault: AtomicBool,
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
            injected_fault: AtomicBool::new(false),
            stats: EngineStats::default(),
        }
    }

    /// Fault injection for tests: the next submission this context executes makes the engine
    /// fail (panic) in the middle of executing it, as a defect in the device model would. The
    /// scheduler contains that to this context (audit reason `DeviceFault`).
    #[doc(hidden)]
    pub fn inject_device_fault(&self) {
        self.injected_fault.store(true, Ordering::Release);
    }

    /// Whether a fault was injected; clears it.
    pub(crate) fn take_injected_fault(&self) -> bool {
        // A plain load first: no write to a shared cache line on every submission.
        self.injected_fault.load(Ordering::Relaxed)
            && self.injected_fault.swap(false, Ordering::AcqRel)
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
        if kind == ResetKind::KeepError {
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

/// The saved state of one engine context (see `crate::vgpu::persist`). Saved: ring state, the
/// engine-visible registers, the error state, the render state, the queued submissions as the
/// raw dwords that were scanned (with the executed prefix of the front one skipped by
/// `cursor`), and the counters. Rebuilt on restore: decoded commands (decoded and checked again
/// from the raw dwords), PPGTT shadows and TLBs (rebuilt on use), wait and watchdog clocks.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EngineState {
    /// `RING_CTL_ENABLE`.
    pub ring_enabled: bool,
    /// Ring offset where the last accepted submission ended.
    pub submitted: u32,
    /// `RING_HEAD`.
    pub head: u32,
    /// `ACTHD`.
    pub acthd: u64,
    /// `LAST_FENCE`.
    pub last_fence: u32,
    /// `ENGINE_STATUS` (its error bit).
    pub status: u32,
    /// `ERROR_CODE`, `ERROR_HEADER`, `ERROR_ADDR`.
    pub error: (u32, u32, u64),
    /// Render target of the executing context.
    pub render: RenderState,
    /// Render target as of the last scanned submission.
    pub scan_surface: Option<Surface>,
    /// Queued submissions.
    pub pending: Vec<SubmissionState>,
    /// Next command of the front submission.
    pub cursor: u64,
    /// The context was waiting on a semaphore.
    pub waiting: bool,
    /// Counters: busy ns, commands, bytes, submissions, preemptions, resets, audits.
    pub stats: [u64; 7],
}

/// A queued submission, saved.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SubmissionState {
    /// The scanned commands.
    pub cmds: Vec<CommandState>,
    /// `PPGTT_ROOT` latched at the doorbell.
    pub ppgtt_root: u64,
    /// Ring tail the submission ends at.
    pub tail: u32,
}

/// A scanned command, saved as its raw dwords.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CommandState {
    /// Header and payload dwords.
    pub raw: Vec<u32>,
    /// Address of the command.
    pub addr: u64,
    /// Ring offset after its ring-level command.
    pub head_after: Option<u32>,
}

/// Why a saved engine state does not restore.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("Engine {engine} state invalid: {reason}")]
pub struct EngineStateError {
    /// Engine name.
    pub engine: &'static str,
    /// What is wrong.
    pub reason: String,
}

impl EngineContext {
    /// Saves the context. The caller has quiesced the engines (no slice in progress).
    pub fn save(&self) -> EngineState {
        let st = self.state();
        let s = &self.stats;
        let ld = |a: &AtomicU64| a.load(Ordering::Acquire);
        EngineState {
            ring_enabled: self.ring_enabled(),
            submitted: self.submitted(),
            head: self.head(),
            acthd: self.acthd(),
            last_fence: self.last_fence(),
            status: self.status(),
            error: self.error(),
            render: st.render.clone(),
            scan_surface: self.scan_surface(),
            pending: st
                .pending
                .iter()
                .map(|sub| SubmissionState {
                    cmds: sub
                        .cmds
                        .iter()
                        .map(|c| CommandState {
                            raw: c.raw.clone(),
                            addr: c.addr.raw(),
                            head_after: c.head_after,
                        })
                        .collect(),
                    ppgtt_root: sub.ppgtt_root,
                    tail: sub.tail,
                })
                .collect(),
            cursor: st.cursor as u64,
            waiting: st.wait_since.is_some(),
            stats: [
                ld(&s.busy_ns),
                ld(&s.commands),
                ld(&s.bytes),
                ld(&s.submissions),
                ld(&s.preemptions),
                ld(&s.resets),
                ld(&s.audits),
            ],
        }
    }

    /// Replaces the context with a saved one, decoding and checking every saved command again
    /// (a snapshot is untrusted: commands that would not pass the scanner are rejected, and
    /// addresses are checked again when they execute). `ring_size` bounds the ring offsets.
    pub fn restore(&self, s: &EngineState, ring_size: u32) -> Result<(), EngineStateError> {
        let bad = |reason: String| EngineStateError {
            engine: self.engine.name(),
            reason,
        };
        let limit = ring_size.max(1);
        if s.ring_enabled
            && (s.submitted >= limit || s.head >= limit || !s.submitted.is_multiple_of(4))
        {
            return Err(bad(format!(
                "ring offsets {}/{} outside a ring of {ring_size}",
                s.head, s.submitted
            )));
        }
        if s.status
            & !(vgpu_abi::regs::ENGINE_STATUS_ERROR | ENGINE_STATUS_IDLE | ENGINE_STATUS_WAITING)
            != 0
        {
            return Err(bad(format!("status {:#x}", s.status)));
        }
        if s.error.0 != 0 && AuditReason::from_code(s.error.0).is_none() {
            return Err(bad(format!("error code {}", s.error.0)));
        }
        s.render
            .validate()
            .map_err(|e| bad(format!("render state: {e}")))?;
        if let Some(surf) = &s.scan_surface {
            surf.validate()
                .map_err(|e| bad(format!("scan surface: {e}")))?;
        }
        const MAX_PENDING: usize = 4096;
        if s.pending.len() > MAX_PENDING {
            return Err(bad(format!("{} queued submissions", s.pending.len())));
        }
        let mut pending = VecDeque::with_capacity(s.pending.len());
        for sub in &s.pending {
            if sub.tail >= limit {
                return Err(bad(format!(
                    "submission tail {} outside the ring",
                    sub.tail
                )));
            }
            let mut cmds = Vec::with_capacity(sub.cmds.len());
            for c in &sub.cmds {
                let kind = match crate::engine::scanner::decode(self.engine, &c.raw) {
                    Ok(crate::engine::scanner::Decoded::Exec(kind)) => kind,
                    Ok(other) => {
                        return Err(bad(format!(
                            "saved command at {:#x} is not executable: {other:?}",
                            c.addr
                        )))
                    }
                    Err((reason, detail)) => {
                        return Err(bad(format!(
                            "saved command at {:#x}: {} ({detail})",
                            c.addr,
                            reason.name()
                        )))
                    }
                };
                if c.head_after.is_some_and(|h| h >= limit) {
                    return Err(bad("head offset outside the ring".into()));
                }
                cmds.push(Command {
                    kind,
                    addr: GpuVa(c.addr),
                    header: c.raw.first().copied().unwrap_or(0),
                    head_after: c.head_after,
                    raw: c.raw.clone(),
                });
            }
            pending.push_back(Submission {
                cmds,
                ppgtt_root: sub.ppgtt_root,
                tail: sub.tail,
                shadow: None,
                doorbell: Instant::now(),
            });
        }
        let cursor = usize::try_from(s.cursor).map_err(|_| bad("cursor".into()))?;
        if cursor > pending.front().map_or(0, |f| f.cmds.len()) {
            return Err(bad(format!("cursor {cursor} past the front submission")));
        }
        let _exec = self.exec_lock();
        let mut st = self.state();
        *st = CtxState {
            pending,
            cursor,
            render: s.render.clone(),
            started: None,
            wait_since: s.waiting.then(Instant::now),
            running: false,
        };
        self.ring_enabled.store(s.ring_enabled, Ordering::Release);
        self.submitted.store(s.submitted, Ordering::Release);
        self.head.store(s.head, Ordering::Release);
        self.acthd.store(s.acthd, Ordering::Release);
        self.last_fence.store(s.last_fence, Ordering::Release);
        self.status.store(s.status, Ordering::Release);
        self.error_code.store(s.error.0, Ordering::Release);
        self.error_header.store(s.error.1, Ordering::Release);
        self.error_addr.store(s.error.2, Ordering::Release);
        self.update_status(&st);
        drop(st);
        self.set_scan_surface(s.scan_surface);
        self.set_shadow(None);
        self.invalidate_ppgtt();
        let stats = &self.stats;
        for (a, v) in [
            &stats.busy_ns,
            &stats.commands,
            &stats.bytes,
            &stats.submissions,
            &stats.preemptions,
            &stats.resets,
            &stats.audits,
        ]
        .into_iter()
        .zip(s.stats)
        {
            a.store(v, Ordering::Release);
        }
        Ok(())
    }
}
