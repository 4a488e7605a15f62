//! The VMM's DMA map: which guest-physical ranges the device may reach, and where they live in
//! host memory.
//!
//! The VMM tells the device about guest RAM (vfio-user `DMA_MAP`, or the in-process VMM's
//! `GuestMemoryMmap`). Device accesses to guest-physical addresses are checked against this map
//! and go nowhere else. A map is immutable and shared as `Arc<DmaMap>`: changes build a new map,
//! so an engine that holds a map keeps every region it can reach mapped until it is done.

use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::Arc;

use vgpu_abi::PAGE_SIZE;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

use crate::addr::Gpa;
use crate::mem::HostPage;

/// Errors of DMA map changes.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// Address, size or offset not page aligned, zero size, or overflowing.
    #[error("DMA range {gpa}+{size:#x} is not page aligned or overflows")]
    Misaligned {
        /// Start of the range.
        gpa: Gpa,
        /// Size of the range.
        size: u64,
    },
    /// The range overlaps a mapped range.
    #[error("DMA range {gpa}+{size:#x} overlaps an existing mapping")]
    Overlap {
        /// Start of the range.
        gpa: Gpa,
        /// Size of the range.
        size: u64,
    },
    /// The mapping is smaller than the range needs.
    #[error(
        "Host mapping of {have:#x} bytes is too small for offset {offset:#x} + size {size:#x}"
    )]
    MappingTooSmall {
        /// Bytes available.
        have: u64,
        /// Offset into the mapping.
        offset: u64,
        /// Size requested.
        size: u64,
    },
    /// An unmap named a range that is not exactly one mapped range.
    #[error("No DMA mapping at {gpa}+{size:#x}")]
    NotMapped {
        /// Start of the range.
        gpa: Gpa,
        /// Size of the range.
        size: u64,
    },
}

/// One mapped guest-physical range.
#[derive(Clone, Debug)]
pub struct DmaRegion {
    gpa: Gpa,
    size: u64,
    mapping: Arc<MmapRegion>,
    offset: u64,
    writable: bool,
}

impl DmaRegion {
    /// First guest-physical address.
    pub fn gpa(&self) -> Gpa {
        self.gpa
    }
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Whether the device may write.
    pub fn writable(&self) -> bool {
        self.writable
    }
    /// Whether `other` maps the same guest-physical range onto the same host memory, with the
    /// same access.
    pub fn same_mapping(&self, other: &DmaRegion) -> bool {
        self.gpa == other.gpa
            && self.size == other.size
            && self.offset == other.offset
            && self.writable == other.writable
            && Arc::ptr_eq(&self.mapping, &other.mapping)
    }
}

/// An immutable set of non-overlapping guest-physical ranges.
#[derive(Clone, Debug, Default)]
pub struct DmaMap {
    regions: BTreeMap<u64, DmaRegion>,
}

impl DmaMap {
    /// An empty map: the device can reach no guest RAM.
    pub fn new() -> Self {
        Self::default()
    }

    /// A map of every region of an in-process VMM's guest memory, all writable.
    pub fn from_guest_memory(mem: &GuestMemoryMmap) -> Result<Self, DmaError> {
        let mut map = DmaMap::new();
        for r in mem.iter() {
            let mapping = r.get_mmap();
            map = map.with_region(Gpa(r.start_addr().0), r.len(), mapping, 0, true)?;
        }
        Ok(map)
    }

    /// A new map with `[gpa, gpa + size)` backed by `mapping` at byte `offset`.
    pub fn with_region(
        &self,
        gpa: Gpa,
        size: u64,
        mapping: Arc<MmapRegion>,
        offset: u64,
        writable: bool,
    ) -> Result<Self, DmaError> {
        let end = gpa.raw().checked_add(size);
        if size == 0
            || end.is_none()
            || !gpa.is_page_aligned()
            || !size.is_multiple_of(PAGE_SIZE)
            || !offset.is_multiple_of(PAGE_SIZE)
            || !(mapping.as_ptr() as u64).is_multiple_of(PAGE_SIZE)
        {
            return Err(DmaError::Misaligned { gpa, size });
        }
        let have = mapping.size() as u64;
        if offset.checked_add(size).is_none_or(|e| e > have) {
            return Err(DmaError::MappingTooSmall { have, offset, size });
        }
        if self.overlaps(gpa, size) {
            return Err(DmaError::Overlap { gpa, size });
        }
        let mut next = self.clone();
        next.regions.insert(
            gpa.raw(),
            DmaRegion {
                gpa,
                size,
                mapping,
                offset,
                writable,
            },
        );
        Ok(next)
    }

    /// A new map without the range `[gpa, gpa + size)`, which must be exactly one mapped range.
    pub fn without_region(&self, gpa: Gpa, size: u64) -> Result<Self, DmaError> {
        match self.regions.get(&gpa.raw()) {
            Some(r) if r.size == size => {
                let mut next = self.clone();
                next.regions.remove(&gpa.raw());
                Ok(next)
            }
            _ => Err(DmaError::NotMapped { gpa, size }),
        }
    }

    fn overlaps(&self, gpa: Gpa, size: u64) -> bool {
        let end = gpa.raw().saturating_add(size);
        // The last region starting below `end` is the only candidate that can reach into range.
        self.regions
            .range(..end)
            .next_back()
            .is_some_and(|(_, r)| r.gpa.raw().saturating_add(r.size) > gpa.raw())
    }

    /// The region containing `gpa`.
    pub fn region(&self, gpa: Gpa) -> Option<&DmaRegion> {
        self.regions
            .range(..=gpa.raw())
            .next_back()
            .map(|(_, r)| r)
            .filter(|r| gpa.raw() - r.gpa.raw() < r.size)
    }

    /// Whether the page holding `gpa` is mapped (and writable, if `write`).
    pub fn contains(&self, gpa: Gpa, write: bool) -> bool {
        self.region(gpa).is_some_and(|r| r.writable || !write)
    }

    /// The host page holding `gpa`, if the page is mapped (and writable, if `write`). The page
    /// stays valid while this map (or any map sharing the region) is alive.
    pub fn page(&self, gpa: Gpa, write: bool) -> Option<HostPage> {
        let r = self.region(gpa)?;
        if write && !r.writable {
            return None;
        }
        let off = r.offset + (gpa.page_base().raw() - r.gpa.raw());
        let off = usize::try_from(off).ok()?;
        // SAFETY: `off + PAGE_SIZE <= mapping.size()` because the page lies inside the region
        // and the region inside the mapping (checked in `with_region`).
        let ptr = unsafe { r.mapping.as_ptr().add(off) };
        // SAFETY: the mapping is page aligned (checked) and `off` is a multiple of PAGE_SIZE;
        // the page is valid for PAGE_SIZE bytes while `r.mapping` is alive, i.e. while `self`
        // is borrowed.
        Some(unsafe { HostPage::new(NonNull::new(ptr)?) })
    }

    /// The guest-physical address of host address `host`, if it lies in a mapped region.
    pub fn gpa_of_host(&self, host: usize) -> Option<u64> {
        self.regions.values().find_map(|r| {
            let start =
                (r.mapping.as_ptr() as usize).checked_add(usize::try_from(r.offset).ok()?)?;
            let off = host.checked_sub(start)?;
            (u64::try_from(off).ok()? < r.size).then(|| r.gpa.raw() + off as u64)
        })
    }

    /// All regions, in address order.
    pub fn regions(&self) -> impl Iterator<Item = &DmaRegion> {
        self.regions.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anon(size: usize) -> Arc<MmapRegion> {
        Arc::new(MmapRegion::new(size).unwrap())
    }

    #[test]
    fn test_dma_map_lookup_inside_and_outside() {
        let m = DmaMap::new()
            .with_region(Gpa(0x10_0000), 0x4000, anon(0x4000), 0, true)
            .unwrap();
        assert!(m.contains(Gpa(0x10_0000), true));
        assert!(m.contains(Gpa(0x10_3fff), false));
        assert!(!m.contains(Gpa(0x10_4000), false));
        assert!(!m.contains(Gpa(0xf_ffff), false));
        assert!(m.page(Gpa(0x10_2123), true).is_some());
    }

    #[test]
    fn test_dma_map_rejects_overlap_misalignment_and_short_mapping() {
        let m = DmaMap::new()
            .with_region(Gpa(0x10_0000), 0x4000, anon(0x4000), 0, true)
            .unwrap();
        assert!(matches!(
            m.with_region(Gpa(0x10_3000), 0x2000, anon(0x2000), 0, true),
            Err(DmaError::Overlap { .. })
        ));
        assert!(matches!(
            m.with_region(Gpa(0xf_f000), 0x2000, anon(0x2000), 0, true),
            Err(DmaError::Overlap { .. })
        ));
        assert!(matches!(
            m.with_region(Gpa(0x20_0800), 0x1000, anon(0x2000), 0, true),
            Err(DmaError::Misaligned { .. })
        ));
        assert!(matches!(
            m.with_region(Gpa(0x20_0000), 0x3000, anon(0x2000), 0, true),
            Err(DmaError::MappingTooSmall { .. })
        ));
        assert!(matches!(
            m.with_region(Gpa(u64::MAX - 0xfff), 0x2000, anon(0x2000), 0, true),
            Err(DmaError::Misaligned { .. })
        ));
    }

    #[test]
    fn test_dma_map_read_only_region_refuses_write_pages() {
        let m = DmaMap::new()
            .with_region(Gpa(0), 0x1000, anon(0x1000), 0, false)
            .unwrap();
        assert!(m.page(Gpa(0), false).is_some());
        assert!(m.page(Gpa(0), true).is_none());
    }

    #[test]
    fn test_dma_unmap_requires_exact_range_and_keeps_old_map() {
        let m = DmaMap::new()
            .with_region(Gpa(0x1000), 0x2000, anon(0x2000), 0, true)
            .unwrap();
        assert!(m.without_region(Gpa(0x1000), 0x1000).is_err());
        let n = m.without_region(Gpa(0x1000), 0x2000).unwrap();
        assert!(!n.contains(Gpa(0x1000), false));
        assert!(
            m.contains(Gpa(0x1000), false),
            "old snapshot still maps the region"
        );
    }
}
