//! The vGPU's view of the global GTT, and its translation in both GTT modes.
//!
//! The guest writes GGTT entries through the BAR0 window. Only entries of GM pages inside the
//! vGPU's partition (mappable and hidden ranges) are kept; every entry is validated when written:
//! reserved bits clear, a local-memory target inside the vGPU's local memory, a guest-physical
//! target inside the VMM's DMA map. Dropped writes are counted and reported.
//!
//! Translation for engines depends on the mode:
//! - [`GttMode::Shadow`] (gVirt): each accepted write is translated at trap time into a shadow
//!   entry holding the host page, so an engine access is one table load.
//! - [`GttMode::TwoDim`] (Demon): only the guest entry is kept; an engine access translates
//!   GM → guest entry → (local memory | guest-physical → DMA map) at run time, with a TLB in the
//!   engine's translator kept coherent by [`Ggtt::generation`].

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use vgpu_abi::gtt::{Pte, PteTarget, PTE_READ_ONLY, PTE_VALID};
use vgpu_abi::PAGE_SIZE;

use crate::addr::{GmAddr, GmRange, Gpa, LmemOffset};
use crate::dma::DmaMap;
use crate::mem::{FaultKind, HostPage};
use crate::phys::LmemSlice;

/// How GM addresses are translated for engines.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum GttMode {
    /// gVirt-style shadow tables, updated on trapped writes.
    #[default]
    Shadow,
    /// Demon-style two-dimensional translation through the guest's own tables.
    TwoDim,
}

impl std::str::FromStr for GttMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "shadow" => Ok(GttMode::Shadow),
            "two-dim" | "2d" => Ok(GttMode::TwoDim),
            _ => Err(format!(
                "unknown GTT mode '{s}' (expected shadow or two-dim)"
            )),
        }
    }
}

/// Why a GGTT write was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GgttError {
    /// The GM page is outside the vGPU's partition.
    #[error("GM page {0} outside the partition")]
    OutOfPartition(GmAddr),
    /// Reserved bits set in the entry.
    #[error("GGTT entry for {0} has reserved bits set")]
    ReservedBits(GmAddr),
    /// The local-memory target is beyond the vGPU's local memory.
    #[error("GGTT entry for {0} points beyond local memory")]
    LocalOutOfRange(GmAddr),
    /// The guest-physical target is not in the DMA map.
    #[error("GGTT entry for {0} points to unmapped guest memory")]
    GuestNotMapped(GmAddr),
}

impl GgttError {
    /// The GM address of the dropped write.
    pub fn addr(&self) -> GmAddr {
        match *self {
            GgttError::OutOfPartition(a)
            | GgttError::ReservedBits(a)
            | GgttError::LocalOutOfRange(a)
            | GgttError::GuestNotMapped(a) => a,
        }
    }
}

/// Shadow entry: host page address | these flags.
const SHADOW_VALID: u64 = 1;
const SHADOW_RO: u64 = 2;

/// The vGPU's GGTT: guest entries of its partition, their shadows, and fault accounting.
pub struct Ggtt {
    mode: GttMode,
    mappable: GmRange,
    hidden: GmRange,
    /// Guest-written entries, mappable pages first, then hidden pages.
    guest: Vec<AtomicU64>,
    /// Shadow mode only: host page address | SHADOW_* flags per entry.
    shadow: Vec<AtomicU64>,
    /// Bumped on every accepted write (TLB coherence in two-dim mode).
    generation: AtomicU64,
    /// Staged low half of a split 32-bit write: (GM page, value).
    staged_lo: Mutex<Option<(u64, u32)>>,
    faults: AtomicU64,
    last_fault: AtomicU64,
}

impl Ggtt {
    /// A GGTT for a partition, every entry invalid.
    pub fn new(mode: GttMode, mappable: GmRange, hidden: GmRange) -> Self {
        let pages = usize::try_from((mappable.size + hidden.size) / PAGE_SIZE).unwrap_or(0);
        let zeros = |n| (0..n).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
        let shadow_pages = if mode == GttMode::Shadow { pages } else { 0 };
        Ggtt {
            mode,
            mappable,
            hidden,
            guest: zeros(pages),
            shadow: zeros(shadow_pages),
            generation: AtomicU64::new(0),
            staged_lo: Mutex::new(None),
            faults: AtomicU64::new(0),
            last_fault: AtomicU64::new(0),
        }
    }

    /// The translation mode.
    pub fn mode(&self) -> GttMode {
        self.mode
    }

    /// The partition's mappable range.
    pub fn mappable(&self) -> GmRange {
        self.mappable
    }

    /// The partition's hidden range.
    pub fn hidden(&self) -> GmRange {
        self.hidden
    }

    /// Index of the entry for `gm`, if inside the partition.
    fn index(&self, gm: GmAddr) -> Option<usize> {
        let i = if self.mappable.contains(gm) {
            (gm.raw() - self.mappable.start.raw()) / PAGE_SIZE
        } else if self.hidden.contains(gm) {
            (self.mappable.size + gm.raw() - self.hidden.start.raw()) / PAGE_SIZE
        } else {
            return None;
        };
        usize::try_from(i).ok()
    }

    /// Whether `gm` lies in the partition.
    pub fn in_partition(&self, gm: GmAddr) -> bool {
        self.index(gm).is_some()
    }

    /// The guest entry for `gm` (0 outside the partition).
    pub fn read_entry(&self, gm: GmAddr) -> u64 {
        self.index(gm)
            .map_or(0, |i| self.guest[i].load(Ordering::Acquire))
    }

    /// Number of dropped writes since reset.
    pub fn fault_count(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }

    /// GM address of the last dropped write.
    pub fn last_fault(&self) -> GmAddr {
        GmAddr(self.last_fault.load(Ordering::Relaxed))
    }

    /// Changes on every accepted write; translators cache while it stays the same.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Makes translators drop cached GGTT translations (`TLB_INVALIDATE` bit 31).
    pub fn bump_generation(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Writes a whole entry for the page holding `gm`, validating it. A dropped write is
    /// counted and leaves the entry unchanged.
    pub fn write_entry(
        &self,
        gm: GmAddr,
        raw: u64,
        lmem: &LmemSlice,
        dma: &DmaMap,
    ) -> Result<(), GgttError> {
        let gm = gm.page_base();
        let res = self.validate(gm, raw, lmem, dma);
        match res {
            Ok((i, shadow)) => {
                self.guest[i].store(raw, Ordering::Release);
                if let Some(s) = self.shadow.get(i) {
                    s.store(shadow, Ordering::Release);
                }
                self.generation.fetch_add(1, Ordering::AcqRel);
                Ok(())
            }
            Err(e) => {
                self.faults.fetch_add(1, Ordering::Relaxed);
                self.last_fault.store(gm.raw(), Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// A 32-bit write into the GGTT window: the low half is staged, the high half commits.
    pub fn write_half(
        &self,
        gm: GmAddr,
        high: bool,
        value: u32,
        lmem: &LmemSlice,
        dma: &DmaMap,
    ) -> Result<(), GgttError> {
        let page = gm.page();
        let mut staged = self
            .staged_lo
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !high {
            *staged = Some((page, value));
            return Ok(());
        }
        let lo = match *staged {
            Some((p, lo)) if p == page => {
                *staged = None;
                u64::from(lo)
            }
            _ => self.read_entry(gm) & 0xFFFF_FFFF,
        };
        drop(staged);
        self.write_entry(gm, (u64::from(value) << 32) | lo, lmem, dma)
    }

    /// Checks an entry; returns its index and shadow value.
    fn validate(
        &self,
        gm: GmAddr,
        raw: u64,
        lmem: &LmemSlice,
        dma: &DmaMap,
    ) -> Result<(usize, u64), GgttError> {
        let i = self.index(gm).ok_or(GgttError::OutOfPartition(gm))?;
        if raw & PTE_VALID == 0 {
            // An invalid entry maps nothing; its other bits are kept for the guest to read back.
            return Ok((i, 0));
        }
        let pte = Pte::decode(raw).map_err(|_| GgttError::ReservedBits(gm))?;
        let (page, ro) = match pte.target {
            PteTarget::Local(off) => {
                let p = lmem
                    .page(LmemOffset(off))
                    .ok_or(GgttError::LocalOutOfRange(gm))?;
                (p, pte.read_only)
            }
            PteTarget::GuestPhys(gpa) => {
                let region = dma.region(Gpa(gpa)).ok_or(GgttError::GuestNotMapped(gm))?;
                let p = dma
                    .page(Gpa(gpa), false)
                    .ok_or(GgttError::GuestNotMapped(gm))?;
                (p, pte.read_only || !region.writable())
            }
        };
        let flags = SHADOW_VALID | if ro { SHADOW_RO } else { 0 };
        Ok((i, page.as_ptr() as u64 | flags))
    }

    /// Puts every entry into its reset state: mappable pages map 1:1 onto local memory, hidden
    /// pages are invalid. Fault counters are cleared.
    pub fn reset(&self, lmem: &LmemSlice) {
        let mappable_pages = self.mappable.size / PAGE_SIZE;
        for (i, g) in self.guest.iter().enumerate() {
            let i = i as u64;
            let (raw, shadow) = if i < mappable_pages {
                let off = i * PAGE_SIZE;
                let raw = vgpu_abi::gtt::pte_local(off);
                let shadow = lmem
                    .page(LmemOffset(off))
                    .map_or(0, |p| p.as_ptr() as u64 | SHADOW_VALID);
                (raw, shadow)
            } else {
                (0, 0)
            };
            g.store(raw, Ordering::Release);
            if let Some(s) = usize::try_from(i).ok().and_then(|i| self.shadow.get(i)) {
                s.store(shadow, Ordering::Release);
            }
        }
        *self
            .staged_lo
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        self.faults.store(0, Ordering::Relaxed);
        self.last_fault.store(0, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The guest entries of the partition, mappable pages first (for snapshots).
    pub fn entries(&self) -> Vec<u64> {
        self.guest
            .iter()
            .map(|g| g.load(Ordering::Acquire))
            .collect()
    }

    /// Fault counter and last fault address (for snapshots).
    pub fn fault_state(&self) -> (u64, u64) {
        (self.fault_count(), self.last_fault().raw())
    }

    /// Replaces every entry with saved ones (a restore). Each valid entry is checked as a guest
    /// write would be, except that a guest-physical target need not be mapped yet: the VMM
    /// maps guest RAM after the device is restored, and [`Ggtt::refresh_guest_shadows`] builds
    /// those shadows then. A bad entry rejects the whole restore and changes nothing.
    pub fn restore(
        &self,
        entries: &[u64],
        faults: (u64, u64),
        lmem: &LmemSlice,
        dma: &DmaMap,
    ) -> Result<(), GgttError> {
        if entries.len() != self.guest.len() {
            return Err(GgttError::OutOfPartition(GmAddr(
                entries.len() as u64 * PAGE_SIZE,
            )));
        }
        let gm_of = |i: usize| {
            let off = i as u64 * PAGE_SIZE;
            if off < self.mappable.size {
                self.mappable.start.add(off)
            } else {
                self.hidden.start.add(off - self.mappable.size)
            }
        };
        let mut shadows = Vec::with_capacity(entries.len());
        for (i, &raw) in entries.iter().enumerate() {
            let gm = gm_of(i);
            let shadow = match self.validate(gm, raw, lmem, dma) {
                Ok((_, shadow)) => shadow,
                Err(GgttError::GuestNotMapped(_)) => 0,
                Err(e) => return Err(e),
            };
            shadows.push(shadow);
        }
        for (i, &raw) in entries.iter().enumerate() {
            self.guest[i].store(raw, Ordering::Release);
            if let Some(s) = self.shadow.get(i) {
                s.store(shadows[i], Ordering::Release);
            }
        }
        self.faults.store(faults.0, Ordering::Relaxed);
        self.last_fault.store(faults.1, Ordering::Relaxed);
        *self
            .staged_lo
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Builds the missing shadows of guest-physical entries whose pages `dma` now maps (shadow
    /// mode; after a restore the VMM maps guest RAM later).
    pub fn refresh_guest_shadows(&self, lmem: &LmemSlice, dma: &DmaMap) {
        if self.shadow.is_empty() {
            return;
        }
        for (i, g) in self.guest.iter().enumerate() {
            let raw = g.load(Ordering::Acquire);
            if self.shadow[i].load(Ordering::Acquire) != 0 || raw & PTE_VALID == 0 {
                continue;
            }
            if let Ok(Pte {
                target: PteTarget::GuestPhys(gpa),
                read_only,
            }) = Pte::decode(raw)
            {
                if let (Some(region), Some(page)) =
                    (dma.region(Gpa(gpa)), dma.page(Gpa(gpa), false))
                {
                    let ro = read_only || !region.writable();
                    let bits = page.as_ptr() as u64 | SHADOW_VALID | if ro { SHADOW_RO } else { 0 };
                    self.shadow[i].store(bits, Ordering::Release);
                }
            }
        }
        let _ = lmem;
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Drops the shadows of entries that point into `[gpa, gpa + size)` (the VMM unmapped it).
    /// Must run before the new DMA map is published, so no engine can load a stale shadow
    /// together with a map that no longer keeps the memory alive.
    pub fn forget_guest_range(&self, gpa: Gpa, size: u64) {
        let end = gpa.raw().saturating_add(size);
        for (i, g) in self.guest.iter().enumerate() {
            if let Ok(Pte {
                target: PteTarget::GuestPhys(a),
                ..
            }) = Pte::decode(g.load(Ordering::Acquire))
            {
                if a >= gpa.raw() && a < end {
                    if let Some(s) = self.shadow.get(i) {
                        s.store(0, Ordering::Release);
                    }
                }
            }
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Translates the GM page holding `gm` for an engine access.
    ///
    /// In shadow mode this is one load of the shadow entry. In two-dim mode the guest entry is
    /// decoded and its target looked up in local memory or the DMA map.
    pub fn translate(
        &self,
        gm: GmAddr,
        write: bool,
        lmem: &LmemSlice,
        dma: &DmaMap,
    ) -> Result<HostPage, FaultKind> {
        let i = self.index(gm).ok_or(FaultKind::OutOfPartition)?;
        match self.mode {
            GttMode::Shadow => {
                let s = self.shadow[i].load(Ordering::Acquire);
                if s & SHADOW_VALID == 0 {
                    return Err(FaultKind::NotMapped);
                }
                if write && s & SHADOW_RO != 0 {
                    return Err(FaultKind::ReadOnly);
                }
                let addr =
                    usize::try_from(s & !(PAGE_SIZE - 1)).map_err(|_| FaultKind::BadTarget)?;
                let ptr = NonNull::new(addr as *mut u8).ok_or(FaultKind::BadTarget)?;
                // SAFETY: shadow entries only hold host pages handed out by `LmemSlice::page`
                // (alive as long as the partition) or by `DmaMap::page` of a region still in
                // the current DMA map (`forget_guest_range` clears them before a region leaves
                // the map, and the caller holds the map it translates with).
                Ok(unsafe { HostPage::new(ptr) })
            }
            GttMode::TwoDim => {
                let raw = self.guest[i].load(Ordering::Acquire);
                translate_pte(raw, write, lmem, dma)
            }
        }
    }
}

/// Second-dimension translation of one guest entry (GGTT or PPGTT): local memory or the DMA map.
pub fn translate_pte(
    raw: u64,
    write: bool,
    lmem: &LmemSlice,
    dma: &DmaMap,
) -> Result<HostPage, FaultKind> {
    let pte = Pte::decode(raw).map_err(|e| match e {
        vgpu_abi::gtt::PteError::NotPresent => FaultKind::NotMapped,
        vgpu_abi::gtt::PteError::ReservedBits => FaultKind::BadEntry,
    })?;
    if write && pte.read_only {
        return Err(FaultKind::ReadOnly);
    }
    match pte.target {
        PteTarget::Local(off) => lmem.page(LmemOffset(off)).ok_or(FaultKind::BadTarget),
        PteTarget::GuestPhys(gpa) => match dma.page(Gpa(gpa), write) {
            Some(p) => Ok(p),
            None if write && dma.contains(Gpa(gpa), false) => Err(FaultKind::ReadOnly),
            None => Err(FaultKind::BadTarget),
        },
    }
}

/// Whether a raw entry is valid and read-only (used by tests and the PPGTT walker).
pub fn pte_is_read_only(raw: u64) -> bool {
    raw & PTE_VALID != 0 && raw & PTE_READ_ONLY != 0
}
