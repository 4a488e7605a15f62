//! The part of a vGPU that engine workers share with the MMIO path.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use vgpu_abi::Engine;

use crate::audit::{AuditLog, Violation};
use crate::dma::DmaMap;
use crate::engine::context::EngineContext;
use crate::phys::{LmemSlice, Partition, Profile};
use crate::vgpu::dirty::DirtyLog;
use crate::vgpu::ggtt::Ggtt;
use crate::vgpu::intr::Interrupts;
use crate::vgpu::policy::REG_DWORDS;

/// Told when a vGPU has new work on an engine (the scheduler implements it).
pub trait WorkNotify: Send + Sync {
    /// vGPU `vgpu` queued work on `engine`.
    fn work_ready(&self, vgpu: u32, engine: Engine);
}

/// Engine-visible state of one vGPU.
pub struct VgpuShared {
    partition: Partition,
    /// The GGTT of the partition.
    pub ggtt: Ggtt,
    dma: RwLock<Arc<DmaMap>>,
    /// Interrupt status, mask and MSI-X.
    pub intr: Interrupts,
    vregs: Box<[AtomicU32]>,
    /// Engine contexts, indexed by `Engine::index`.
    pub engines: [EngineContext; Engine::COUNT],
    /// Audit events.
    pub audit: AuditLog,
    /// Pages the engines wrote.
    pub dirty: DirtyLog,
    flip_count: AtomicU32,
    bad_accesses: AtomicU64,
    notify: Mutex<Option<Arc<dyn WorkNotify>>>,
}

impl VgpuShared {
    pub(crate) fn new(partition: Partition, ggtt: Ggtt, audit_capacity: usize) -> Self {
        let base = partition
            .lmem
            .page(crate::addr::LmemOffset(0))
            .map_or(0, |p| p.as_ptr() as usize);
        let dirty = DirtyLog::new(base, partition.lmem.size());
        VgpuShared {
            dirty,
            partition,
            ggtt,
            dma: RwLock::new(Arc::new(DmaMap::new())),
            intr: Interrupts::default(),
            vregs: (0..REG_DWORDS).map(|_| AtomicU32::new(0)).collect(),
            engines: Engine::ALL.map(EngineContext::new),
            audit: AuditLog::new(audit_capacity),
            flip_count: AtomicU32::new(0),
            bad_accesses: AtomicU64::new(0),
            notify: Mutex::new(None),
        }
    }

    pub(crate) fn into_partition(self) -> Partition {
        self.partition
    }

    /// Instance id on the physical GPU.
    pub fn id(&self) -> u32 {
        self.partition.id
    }

    /// The profile the vGPU was created with.
    pub fn profile(&self) -> &'static Profile {
        self.partition.profile
    }

    /// The vGPU's partition.
    pub fn partition(&self) -> &Partition {
        &self.partition
    }

    /// The vGPU's local memory.
    pub fn lmem(&self) -> &LmemSlice {
        &self.partition.lmem
    }

    /// The context of `engine`.
    pub fn engine(&self, engine: Engine) -> &EngineContext {
        &self.engines[engine.index()]
    }

    /// Whether the profile gives the vGPU `engine`.
    pub fn has_engine(&self, engine: Engine) -> bool {
        self.partition.profile.engine_mask & engine.mask_bit() != 0
    }

    /// The current DMA map. Engines hold the returned map while they use pages from it.
    pub fn dma(&self) -> Arc<DmaMap> {
        self.dma
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Publishes a new DMA map. Shadow GGTT entries into regions that are gone, or now backed by
    /// other memory or with other access, are dropped first, so no engine pairs a stale shadow
    /// with a map that no longer keeps it alive (or writes memory the VMM made read-only).
    pub fn set_dma(&self, map: Arc<DmaMap>) {
        let old = self.dma();
        for r in old.regions() {
            let still = map.region(r.gpa()).is_some_and(|n| n.same_mapping(r));
            if !still {
                self.ggtt.forget_guest_range(r.gpa(), r.size());
            }
        }
        for e in &self.engines {
            e.invalidate_ppgtt();
        }
        // Entries restored before the VMM mapped guest RAM get their shadows now.
        self.ggtt.refresh_guest_shadows(self.lmem(), &map);
        *self.dma.write().unwrap_or_else(PoisonError::into_inner) = map;
        // A slice that started with the old map may still use its pages: wait for it to end,
        // so that when this returns (and the VMM unmaps) no engine touches the old memory.
        for e in &self.engines {
            drop(e.exec_lock());
        }
    }

    /// Reads a virtual register (BAR0 offset, dword aligned, inside the register file).
    pub fn vreg(&self, offset: u32) -> u32 {
        self.vregs
            .get((offset / 4) as usize)
            .map_or(u32::MAX, |r| r.load(Ordering::Acquire))
    }

    /// The whole virtual register file (for snapshots).
    pub fn vregs(&self) -> Vec<u32> {
        self.vregs
            .iter()
            .map(|r| r.load(Ordering::Acquire))
            .collect()
    }

    /// Writes a virtual register.
    pub fn set_vreg(&self, offset: u32, v: u32) {
        if let Some(r) = self.vregs.get((offset / 4) as usize) {
            r.store(v, Ordering::Release);
        }
    }

    /// Latches the plane surface (a flip): counts it and raises `INTR_FLIP_DONE`.
    pub fn flip(&self) {
        self.flip_count.fetch_add(1, Ordering::AcqRel);
        self.intr.raise(vgpu_abi::regs::INTR_FLIP_DONE);
    }

    /// `PLANE_FLIP_COUNT`.
    pub fn flip_count(&self) -> u32 {
        self.flip_count.load(Ordering::Acquire)
    }

    pub(crate) fn reset_flip_count(&self) {
        self.flip_count.store(0, Ordering::Release);
    }

    pub(crate) fn set_flip_count(&self, v: u32) {
        self.flip_count.store(v, Ordering::Release);
    }

    /// Counts a dropped or malformed guest access.
    pub fn count_bad_access(&self) {
        self.bad_accesses.fetch_add(1, Ordering::Relaxed);
    }

    /// Malformed or dropped guest register accesses since creation.
    pub fn bad_accesses(&self) -> u64 {
        self.bad_accesses.load(Ordering::Relaxed)
    }

    /// Installs the scheduler's notifier.
    pub fn set_notify(&self, n: Option<Arc<dyn WorkNotify>>) {
        *self.notify.lock().unwrap_or_else(PoisonError::into_inner) = n;
    }

    /// Tells the scheduler `engine` has work.
    pub fn notify(&self, engine: Engine) {
        let n = self
            .notify
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(n) = n {
            n.work_ready(self.id(), engine);
        }
    }

    /// Puts `engine`'s context into the error state for `v`, records the audit event and raises
    /// the engine's error interrupt. `drop_queued` as in `EngineContext::set_error`.
    pub fn fail_context(&self, engine: Engine, v: &Violation, drop_queued: bool) {
        let ctx = self.engine(engine);
        {
            let mut st = ctx.state();
            ctx.set_error(&mut st, v.reason, v.header, v.addr, drop_queued);
        }
        self.audit.record(self.id(), engine, v);
        self.intr.raise(vgpu_abi::regs::intr_error(engine));
    }
}
