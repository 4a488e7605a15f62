//! Translators from engine-context addresses to host pages, for both GTT modes.
//!
//! - [`GgttTranslate`]: GM addresses through the vGPU's GGTT (rings, display, contexts without a
//!   PPGTT).
//! - [`ContextTranslate`]: a submission's addresses: GGTT, or the context's PPGTT when its root is
//!   valid. In shadow mode the PPGTT is walked and validated once into a [`PpgttShadow`] (gVirt);
//!   in two-dim mode each miss walks the guest tables and translates every table and page
//!   through the second dimension (local memory or the DMA map), cached in a small [`Tlb`]
//!   (Demon).

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::Arc;

use vgpu_abi::gtt::{
    ppgtt_index, PPGTT_ENTRIES, PPGTT_LEVELS, PPGTT_VA_BITS, PTE_READ_ONLY, PTE_VALID,
};
use vgpu_abi::PAGE_SIZE;

use crate::addr::{GmAddr, GpuVa};
use crate::dma::DmaMap;
use crate::mem::{Access, Fault, FaultKind, HostPage, Translate};
use crate::vgpu::ggtt::{translate_pte, GttMode};
use crate::vgpu::shared::VgpuShared;

/// GM addressing through the GGTT.
pub struct GgttTranslate<'a> {
    shared: &'a VgpuShared,
    dma: &'a DmaMap,
}

impl<'a> GgttTranslate<'a> {
    /// Translates through `shared`'s GGTT with guest RAM from `dma`.
    pub fn new(shared: &'a VgpuShared, dma: &'a DmaMap) -> Self {
        GgttTranslate { shared, dma }
    }
}

impl Translate for GgttTranslate<'_> {
    fn translate(&mut self, va: GpuVa, access: Access) -> Result<HostPage, Fault> {
        let write = access == Access::Write;
        let hp = self
            .shared
            .ggtt
            .translate(GmAddr(va.raw()), write, self.shared.lmem(), self.dma)
            .map_err(|kind| Fault { va, kind })?;
        if write {
            self.shared.dirty.note_write(hp, self.dma);
        }
        Ok(hp)
    }

    fn may_join(&self) -> bool {
        true
    }

    /// Adjacent pages of the vGPU's local memory (one mapping); guest RAM is never joined.
    fn joins(&self, a: HostPage, b: HostPage) -> bool {
        self.shared.lmem().joins(a, b)
    }
}

/// Most leaf pages one PPGTT shadow may hold, and most tables a walk may visit: a guest cannot
/// make the mediator allocate or walk without bound.
pub const SHADOW_MAX_PAGES: usize = 1 << 20;
/// Most page tables a shadow walk visits.
pub const SHADOW_MAX_TABLES: usize = 1 << 14;

/// Shadow entry flags (host page address | flags).
const SH_VALID: u64 = 1;
const SH_RO: u64 = 2;

/// A validated copy of a guest PPGTT: VA page → host page. Holds the DMA map it was built
/// against, so every page it names stays mapped while it lives.
#[derive(Debug)]
pub struct PpgttShadow {
    root: u64,
    generation: u64,
    map: HashMap<u64, u64>,
    _dma: Arc<DmaMap>,
}

/// Why a PPGTT could not be shadowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShadowError {
    /// A table pointer does not translate.
    #[error("PPGTT table not reachable: {0}")]
    Table(FaultKind),
    /// The tree has more tables or pages than the mediator shadows.
    #[error("PPGTT too large to shadow")]
    TooLarge,
}

impl PpgttShadow {
    /// Walks the whole tree under `root` (a `PPGTT_ROOT` value with `PTE_VALID`) and shadows
    /// every valid leaf. Invalid leaves are left out (they fault on use); a bad table pointer
    /// fails the whole shadow.
    pub fn build(
        shared: &VgpuShared,
        dma: Arc<DmaMap>,
        root: u64,
        generation: u64,
    ) -> Result<Self, ShadowError> {
        let mut map = HashMap::new();
        let mut tables = 0usize;
        let ro = root & PTE_READ_ONLY != 0;
        walk(
            shared,
            &dma,
            root,
            PPGTT_LEVELS,
            0,
            ro,
            &mut tables,
            &mut map,
        )?;
        Ok(PpgttShadow {
            root,
            generation,
            map,
            _dma: dma,
        })
    }

    /// Whether the shadow is still valid for `root` at `generation`.
    pub fn matches(&self, root: u64, generation: u64) -> bool {
        self.root == root && self.generation == generation
    }

    /// Number of shadowed pages.
    pub fn pages(&self) -> usize {
        self.map.len()
    }

    fn lookup(&self, va: u64, write: bool) -> Result<HostPage, FaultKind> {
        let e = *self
            .map
            .get(&(va / PAGE_SIZE))
            .ok_or(FaultKind::NotMapped)?;
        if write && e & SH_RO != 0 {
            return Err(FaultKind::ReadOnly);
        }
        page_from_bits(e)
    }
}

fn page_from_bits(e: u64) -> Result<HostPage, FaultKind> {
    let addr = usize::try_from(e & !(PAGE_SIZE - 1)).map_err(|_| FaultKind::BadTarget)?;
    let ptr = NonNull::new(addr as *mut u8).ok_or(FaultKind::BadTarget)?;
    // SAFETY: the bits come from a `HostPage` of the vGPU's local memory (alive as long as the
    // partition) or of a DMA map the shadow holds an `Arc` of.
    Ok(unsafe { HostPage::new(ptr) })
}

fn read_entry(page: HostPage, index: u64) -> u64 {
    let mut b = [0u8; 8];
    let off = usize::try_from(index % PPGTT_ENTRIES * 8).unwrap_or(0);
    // SAFETY: `page` is valid for PAGE_SIZE bytes and `off + 8 <= 512 * 8 = PAGE_SIZE`.
    // Guest memory may change concurrently; we read a snapshot.
    unsafe { std::ptr::copy_nonoverlapping(page.as_ptr().add(off), b.as_mut_ptr(), 8) };
    u64::from_le_bytes(b)
}

#[allow(clippy::too_many_arguments)]
fn walk(
    shared: &VgpuShared,
    dma: &DmaMap,
    table_pte: u64,
    level: u32,
    va_base: u64,
    ro: bool,
    tables: &mut usize,
    map: &mut HashMap<u64, u64>,
) -> Result<(), ShadowError> {
    *tables += 1;
    if *tables > SHADOW_MAX_TABLES {
        return Err(ShadowError::TooLarge);
    }
    let table = translate_pte(table_pte & !PTE_READ_ONLY, false, shared.lmem(), dma)
        .map_err(ShadowError::Table)?;
    let shift = vgpu_abi::PAGE_SHIFT + 9 * (level - 1);
    for i in 0..PPGTT_ENTRIES {
        let e = read_entry(table, i);
        if e & PTE_VALID == 0 {
            continue;
        }
        let va = va_base | (i << shift);
        let ro = ro || e & PTE_READ_ONLY != 0;
        if level > 1 {
            walk(shared, dma, e, level - 1, va, ro, tables, map)?;
            continue;
        }
        // A leaf: shadow it if its target is acceptable; otherwise leave it out (faults on use).
        if let Ok(page) = translate_pte(e & !PTE_READ_ONLY, false, shared.lmem(), dma) {
            let writable =
                !ro && translate_pte(e & !PTE_READ_ONLY, true, shared.lmem(), dma).is_ok();
            if map.len() >= SHADOW_MAX_PAGES {
                return Err(ShadowError::TooLarge);
            }
            map.insert(
                va / PAGE_SIZE,
                page.as_ptr() as u64 | SH_VALID | if writable { 0 } else { SH_RO },
            );
        }
    }
    Ok(())
}

/// Walks the guest PPGTT for one VA (two-dim mode): each table and the final page are
/// translated through the second dimension.
pub fn walk_one(
    shared: &VgpuShared,
    dma: &DmaMap,
    root: u64,
    va: u64,
    write: bool,
) -> Result<HostPage, FaultKind> {
    if va >> PPGTT_VA_BITS != 0 {
        return Err(FaultKind::OutOfPartition);
    }
    let mut entry = root;
    let mut ro = root & PTE_READ_ONLY != 0;
    for level in (1..=PPGTT_LEVELS).rev() {
        let table = translate_pte(entry & !PTE_READ_ONLY, false, shared.lmem(), dma)?;
        entry = read_entry(table, ppgtt_index(va, level));
        if entry & PTE_VALID == 0 {
            return Err(FaultKind::NotMapped);
        }
        ro |= entry & PTE_READ_ONLY != 0;
    }
    if write && ro {
        return Err(FaultKind::ReadOnly);
    }
    translate_pte(entry & !PTE_READ_ONLY, write, shared.lmem(), dma)
}

/// Entries of the two-dim TLB.
pub const TLB_ENTRIES: usize = 64;

/// A small direct-mapped TLB of one physical engine (two-dim mode). Flushed when the engine
/// switches to another vGPU (the second-level root switch of Demon) and when the guest
/// invalidates.
#[derive(Debug)]
pub struct Tlb {
    owner: Option<(u32, u64, u64, u64)>,
    slots: [Option<(u64, u64, bool)>; TLB_ENTRIES],
    /// Lookups that hit.
    pub hits: u64,
    /// Lookups that walked.
    pub misses: u64,
    /// Flushes.
    pub flushes: u64,
}

impl Default for Tlb {
    fn default() -> Self {
        Tlb {
            owner: None,
            slots: [None; TLB_ENTRIES],
            hits: 0,
            misses: 0,
            flushes: 0,
        }
    }
}

impl Tlb {
    /// Makes the TLB belong to (vGPU, root, PPGTT generation, GGTT generation); flushes if any
    /// differs.
    pub fn switch_to(&mut self, owner: (u32, u64, u64, u64)) {
        if self.owner != Some(owner) {
            self.slots = [None; TLB_ENTRIES];
            self.owner = Some(owner);
            self.flushes += 1;
        }
    }

    fn lookup(&mut self, page: u64, write: bool) -> Option<u64> {
        #[allow(clippy::cast_possible_truncation)] // Reduced modulo TLB_ENTRIES.
        let slot = (page % TLB_ENTRIES as u64) as usize;
        match self.slots[slot] {
            Some((p, host, writable)) if p == page && (writable || !write) => {
                self.hits += 1;
                Some(host)
            }
            _ => None,
        }
    }

    fn insert(&mut self, page: u64, host: u64, writable: bool) {
        self.misses += 1;
        #[allow(clippy::cast_possible_truncation)] // Reduced modulo TLB_ENTRIES.
        let slot = (page % TLB_ENTRIES as u64) as usize;
        self.slots[slot] = Some((page, host, writable));
    }
}

/// The translation state a submission executes with.
pub struct ContextTranslate<'a> {
    shared: &'a VgpuShared,
    dma: &'a DmaMap,
    root: u64,
    shadow: Option<&'a PpgttShadow>,
    tlb: &'a mut Tlb,
}

impl<'a> ContextTranslate<'a> {
    /// Translates for a submission with PPGTT root `root` (0: GGTT). In shadow mode a PPGTT
    /// submission uses `shadow`, built for `root` and still current; without one it walks the
    /// guest tables for each page, as two-dim mode does.
    pub fn new(
        shared: &'a VgpuShared,
        dma: &'a DmaMap,
        root: u64,
        shadow: Option<&'a PpgttShadow>,
        tlb: &'a mut Tlb,
    ) -> Self {
        ContextTranslate {
            shared,
            dma,
            root,
            shadow,
            tlb,
        }
    }
}

impl Translate for ContextTranslate<'_> {
    fn translate(&mut self, va: GpuVa, access: Access) -> Result<HostPage, Fault> {
        let hp = self.translate_page(va, access)?;
        if access == Access::Write {
            self.shared.dirty.note_write(hp, self.dma);
        }
        Ok(hp)
    }

    fn may_join(&self) -> bool {
        true
    }

    /// Adjacent pages of the vGPU's local memory (one mapping); guest RAM is never joined.
    fn joins(&self, a: HostPage, b: HostPage) -> bool {
        self.shared.lmem().joins(a, b)
    }
}

impl ContextTranslate<'_> {
    fn translate_page(&mut self, va: GpuVa, access: Access) -> Result<HostPage, Fault> {
        let write = access == Access::Write;
        let fault = |kind| Fault { va, kind };
        let ppgtt = self.root & PTE_VALID != 0;
        match self.shared.ggtt.mode() {
            GttMode::Shadow if ppgtt => match self.shadow {
                Some(shadow) => shadow.lookup(va.raw(), write).map_err(fault),
                // No current shadow: walk the guest tables against the current DMA map.
                None => walk_one(self.shared, self.dma, self.root, va.raw(), write).map_err(fault),
            },
            GttMode::Shadow => self
                .shared
                .ggtt
                .translate(GmAddr(va.raw()), write, self.shared.lmem(), self.dma)
                .map_err(fault),
            GttMode::TwoDim => {
                let page = va.page();
                if let Some(h) = self.tlb.lookup(page, write) {
                    return page_from_bits(h).map_err(fault);
                }
                let hp = if ppgtt {
                    walk_one(self.shared, self.dma, self.root, va.raw(), write)
                } else {
                    self.shared.ggtt.translate(
                        GmAddr(va.raw()),
                        write,
                        self.shared.lmem(),
                        self.dma,
                    )
                }
                .map_err(fault)?;
                self.tlb.insert(page, hp.as_ptr() as u64, write);
                Ok(hp)
            }
        }
    }
}
