//! Dirty tracking of what the vGPU's engines write: local-memory pages (for pre-copy migration
//! of the vGPU itself) and guest-RAM pages (for the VMM, which must merge device writes into
//! its own dirty log when it migrates the VM). Engine writes are tracked exactly: every page a
//! translator hands out for writing is marked. CPU writes through the passed-through aperture are
//! not seen here; migration finds those by hashing pages.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use vgpu_abi::PAGE_SIZE;

/// `PAGE_SIZE` as a `usize`.
const PAGE: usize = 4096;

use crate::dma::DmaMap;
use crate::mem::HostPage;

/// The dirty logs of one vGPU.
#[derive(Debug)]
pub struct DirtyLog {
    lmem_base: usize,
    lmem_pages: usize,
    lmem_active: AtomicBool,
    lmem: Box<[AtomicU64]>,
    gpa_active: AtomicBool,
    gpa: Mutex<BTreeSet<u64>>,
    /// More than [`MAX_GPA_PAGES`] pages were written: every page counts as dirty until logging
    /// restarts (over-reporting is safe, losing pages is not).
    gpa_overflow: AtomicBool,
    gpa_cap: usize,
}

/// Most guest pages remembered; past that the log reports every page as dirty until logging
/// restarts (bounded memory whatever the guest does, and no page is ever lost).
pub const MAX_GPA_PAGES: usize = 1 << 22;

impl DirtyLog {
    /// Logs for local memory starting at host address `lmem_base`, `lmem_size` bytes.
    pub fn new(lmem_base: usize, lmem_size: u64) -> Self {
        let pages = usize::try_from(lmem_size / PAGE_SIZE).unwrap_or(0);
        DirtyLog {
            lmem_base,
            lmem_pages: pages,
            lmem_active: AtomicBool::new(false),
            lmem: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            gpa_active: AtomicBool::new(false),
            gpa: Mutex::new(BTreeSet::new()),
            gpa_overflow: AtomicBool::new(false),
            gpa_cap: MAX_GPA_PAGES,
        }
    }

    /// Records an engine write to `page` (a page of local memory or of guest RAM in `dma`).
    pub fn note_write(&self, page: HostPage, dma: &DmaMap) {
        let lmem_on = self.lmem_active.load(Ordering::Relaxed);
        let gpa_on = self.gpa_active.load(Ordering::Relaxed);
        if !lmem_on && !gpa_on {
            return;
        }
        let p = page.as_ptr() as usize;
        if let Some(off) = p
            .checked_sub(self.lmem_base)
            .filter(|o| *o / (PAGE) < self.lmem_pages)
        {
            if lmem_on {
                let i = off / PAGE;
                self.lmem[i / 64].fetch_or(1 << (i % 64), Ordering::AcqRel);
            }
            return;
        }
        if gpa_on {
            if let Some(gpa) = dma.gpa_of_host(p) {
                let mut set = self.gpa.lock().unwrap_or_else(PoisonError::into_inner);
                if set.len() < self.gpa_cap {
                    set.insert(gpa / PAGE_SIZE);
                } else {
                    self.gpa_overflow.store(true, Ordering::Release);
                }
            }
        }
    }

    /// Starts logging local-memory writes (clearing the log).
    pub fn start_lmem(&self) {
        for w in self.lmem.iter() {
            w.store(0, Ordering::Release);
        }
        self.lmem_active.store(true, Ordering::Release);
    }

    /// Stops logging local-memory writes.
    pub fn stop_lmem(&self) {
        self.lmem_active.store(false, Ordering::Release);
    }

    /// Local-memory pages written since the last call, and forgets them.
    pub fn take_lmem(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (w, word) in self.lmem.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let b = bits.trailing_zeros();
                out.push((w * 64) as u64 + u64::from(b));
                bits &= bits - 1;
            }
        }
        out
    }

    /// Starts logging guest-RAM writes (clearing the log).
    pub fn start_gpa(&self) {
        self.gpa
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.gpa_overflow.store(false, Ordering::Release);
        self.gpa_active.store(true, Ordering::Release);
    }

    /// Stops logging guest-RAM writes.
    pub fn stop_gpa(&self) {
        self.gpa_active.store(false, Ordering::Release);
        self.gpa
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Whether guest-RAM logging is on.
    pub fn gpa_active(&self) -> bool {
        self.gpa_active.load(Ordering::Acquire)
    }

    /// Whether the log overflowed: [`DirtyLog::take_gpa`] then reports every page.
    pub fn gpa_overflowed(&self) -> bool {
        self.gpa_overflow.load(Ordering::Acquire)
    }

    /// Guest page numbers written inside `[gpa, gpa + len)` since they were last taken; forgets
    /// them. After an overflow every page of the range is reported (the caller bounds `len`).
    pub fn take_gpa(&self, gpa: u64, len: u64) -> Vec<u64> {
        let first = gpa / PAGE_SIZE;
        let end = gpa.saturating_add(len).div_ceil(PAGE_SIZE);
        if self.gpa_overflowed() {
            self.gpa
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|p| *p < first || *p >= end);
            return (first..end).collect();
        }
        let mut set = self.gpa.lock().unwrap_or_else(PoisonError::into_inner);
        let taken: Vec<u64> = set.range(first..end).copied().collect();
        for p in &taken {
            set.remove(p);
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use vm_memory::MmapRegion;

    #[test]
    fn test_gpa_log_overflow_reports_every_page_instead_of_losing_some() {
        let region = Arc::new(MmapRegion::new(16 * 4096).unwrap());
        let dma = DmaMap::new()
            .with_region(
                crate::addr::Gpa(0x10_0000),
                16 * 4096,
                region.clone(),
                0,
                true,
            )
            .unwrap();
        let mut log = DirtyLog::new(0, 0);
        log.gpa_cap = 2;
        log.start_gpa();
        let page = |i: u64| {
            dma.page(crate::addr::Gpa(0x10_0000 + i * 4096), true)
                .unwrap()
        };
        log.note_write(page(1), &dma);
        assert_eq!(log.take_gpa(0x10_0000, 16 * 4096), vec![0x101]);
        for i in [2, 3, 5] {
            log.note_write(page(i), &dma);
        }
        assert!(log.gpa_overflowed());
        let all: Vec<u64> = (0x100..0x110).collect();
        assert_eq!(
            log.take_gpa(0x10_0000, 16 * 4096),
            all,
            "overflow: every page, none lost"
        );
        log.start_gpa();
        assert!(!log.gpa_overflowed());
        assert!(log.take_gpa(0x10_0000, 16 * 4096).is_empty());
    }
}
