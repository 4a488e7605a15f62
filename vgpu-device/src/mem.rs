//! How engines reach memory: an address in an engine context ([`GpuVa`]) is translated page by
//! page by a [`Translate`] implementation (the GTT mode in use) into a [`HostPage`], and [`Mem`]
//! builds byte-level reads, writes and copies on top, splitting at page boundaries.
//!
//! The host memory behind a [`HostPage`] is the physical GPU's local memory or guest RAM mapped
//! from the VMM; a translator only hands out pages of mappings it keeps alive, and only for the
//! vGPU it translates for, so every access an engine makes stays inside that vGPU's memory.

use std::ptr::NonNull;

use vgpu_abi::PAGE_SIZE;

use crate::addr::GpuVa;

/// Whether an access reads or writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The engine reads.
    Read,
    /// The engine writes.
    Write,
}

/// Why a translation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FaultKind {
    /// The GM address lies outside the vGPU's partition.
    #[error("Address outside the vGPU's partition")]
    OutOfPartition,
    /// No valid translation entry maps the page.
    #[error("Page not mapped")]
    NotMapped,
    /// A translation entry has reserved bits set.
    #[error("Translation entry has reserved bits set")]
    BadEntry,
    /// The entry points outside the vGPU's local memory or outside guest RAM the VMM mapped.
    #[error("Translation target outside the vGPU's memory")]
    BadTarget,
    /// A write through a read-only entry.
    #[error("Write through a read-only entry")]
    ReadOnly,
    /// The access wraps around the end of the address space.
    #[error("Address overflow")]
    Overflow,
}

/// A failed translation: where and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("GPU fault at {va}: {kind}")]
pub struct Fault {
    /// The address that did not translate.
    pub va: GpuVa,
    /// Why.
    pub kind: FaultKind,
}

/// One 4 KiB page of host memory an engine may access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostPage {
    ptr: NonNull<u8>,
}

// SAFETY: a HostPage is a plain address of shared memory; all accesses through it are raw
// volatile-style copies done by `Mem`, which tolerates concurrent guest access.
unsafe impl Send for HostPage {}

impl HostPage {
    /// Wraps the address of a host page.
    ///
    /// # Safety
    /// `ptr` must be page aligned and valid for reads and writes of `PAGE_SIZE` bytes for as long
    /// as the translator that returns it is borrowed.
    pub unsafe fn new(ptr: NonNull<u8>) -> Self {
        HostPage { ptr }
    }

    /// The page's address.
    pub fn as_ptr(self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

/// A translation from an engine context's addresses to host pages.
pub trait Translate {
    /// The host page holding `va` (whose page offset is ignored), checked for `access`.
    /// Implementations record pages translated for writing as dirty.
    fn translate(&mut self, va: GpuVa, access: Access) -> Result<HostPage, Fault>;
}

/// A contiguous piece of host memory inside one page.
#[derive(Clone, Copy, Debug)]
pub struct HostSpan {
    ptr: *mut u8,
    len: usize,
}

impl HostSpan {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the span is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Copies the span into `dst` (which must be `len` bytes).
    pub fn read_into(&self, dst: &mut [u8]) {
        let n = dst.len().min(self.len);
        // SAFETY: the span is valid for `len` bytes (see `Mem`), `dst` for `n <= len` bytes;
        // guest memory and a host buffer never overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr, dst.as_mut_ptr(), n) }
    }
    /// Copies `src` (at most `len` bytes) into the span.
    pub fn write_from(&self, src: &[u8]) {
        let n = src.len().min(self.len);
        // SAFETY: as in `read_into`.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr, n) }
    }
    /// Fills the span with `byte`.
    pub fn fill(&self, byte: u8) {
        // SAFETY: the span is valid for `len` bytes.
        unsafe { std::ptr::write_bytes(self.ptr, byte, self.len) }
    }
    /// Copies `min(len)` bytes from `src` to `self`; the spans may overlap.
    pub fn copy_from_span(&self, src: &HostSpan) {
        let n = src.len.min(self.len);
        // SAFETY: both spans are valid for at least `n` bytes; `copy` allows overlap.
        unsafe { std::ptr::copy(src.ptr, self.ptr, n) }
    }
}

/// Byte-level access to an engine context's memory through a translator. Keeps the last
/// translation of each kind, so sequential accesses translate once per page.
pub struct Mem<'a> {
    t: &'a mut dyn Translate,
    last_read: Option<(u64, HostPage)>,
    last_write: Option<(u64, HostPage)>,
    /// Pages of the range being accessed, translated before any byte is touched (two lists,
    /// for the two ranges of a copy; the allocations are reused).
    pages: [Vec<HostPage>; 2],
}

impl<'a> Mem<'a> {
    /// Accesses memory through `t`.
    pub fn new(t: &'a mut dyn Translate) -> Self {
        Mem {
            t,
            last_read: None,
            last_write: None,
            pages: [Vec::new(), Vec::new()],
        }
    }

    /// Translates every page of `[va, va + len)` for `access` into `out` (cleared first), in
    /// order; fails on the first page that does not translate. Returns the end address.
    fn translate_range(
        &mut self,
        va: GpuVa,
        len: u64,
        access: Access,
        out: &mut Vec<HostPage>,
    ) -> Result<u64, Fault> {
        out.clear();
        let end = va.raw().checked_add(len).ok_or(Fault {
            va,
            kind: FaultKind::Overflow,
        })?;
        let mut a = va.raw();
        while a < end {
            out.push(self.page(a, access)?);
            a = (a / PAGE_SIZE + 1) * PAGE_SIZE;
        }
        Ok(end)
    }

    fn page(&mut self, va: u64, access: Access) -> Result<HostPage, Fault> {
        let page = va / PAGE_SIZE;
        let slot = match access {
            Access::Read => &mut self.last_read,
            Access::Write => &mut self.last_write,
        };
        if let Some((p, hp)) = *slot {
            if p == page {
                return Ok(hp);
            }
        }
        let hp = self.t.translate(GpuVa(page * PAGE_SIZE), access)?;
        match access {
            Access::Read => self.last_read = Some((page, hp)),
            Access::Write => {
                self.last_write = Some((page, hp));
                // A page translated for writing is readable too.
                self.last_read = Some((page, hp));
            }
        }
        Ok(hp)
    }

    /// Calls `f(offset, span)` for each page-bounded piece of `[va, va + len)`, in order;
    /// `offset` is the piece's distance from `va`. Translates every page before `f` sees any,
    /// so a fault leaves memory untouched; each page is translated once.
    pub fn spans(
        &mut self,
        va: GpuVa,
        len: u64,
        access: Access,
        mut f: impl FnMut(usize, HostSpan),
    ) -> Result<(), Fault> {
        if len == 0 {
            return Ok(());
        }
        let off = va.raw() % PAGE_SIZE;
        if len <= PAGE_SIZE - off {
            // Inside one page (rows, dwords): one translation, no page list.
            let hp = self.page(va.raw(), access)?;
            // Page offsets and lengths are below PAGE_SIZE, so the casts cannot truncate.
            #[allow(clippy::cast_possible_truncation)]
            let span = HostSpan {
                // SAFETY: `hp` is valid for PAGE_SIZE bytes and `off + len <= PAGE_SIZE`.
                ptr: unsafe { hp.as_ptr().add(off as usize) },
                len: len as usize,
            };
            f(0, span);
            return Ok(());
        }
        // Validate first: all or nothing.
        let mut pages = std::mem::take(&mut self.pages[0]);
        let res = self.translate_range(va, len, access, &mut pages);
        if let Ok(end) = res {
            let mut a = va.raw();
            for hp in &pages {
                let off = a % PAGE_SIZE;
                let n = (PAGE_SIZE - off).min(end - a);
                // Page offsets and lengths are below PAGE_SIZE, so the casts cannot truncate.
                #[allow(clippy::cast_possible_truncation)]
                let span = HostSpan {
                    // SAFETY: `hp` is valid for PAGE_SIZE bytes and `off + n <= PAGE_SIZE`.
                    ptr: unsafe { hp.as_ptr().add(off as usize) },
                    len: n as usize,
                };
                #[allow(clippy::cast_possible_truncation)]
                f((a - va.raw()) as usize, span);
                a += n;
            }
        }
        self.pages[0] = pages;
        res.map(|_| ())
    }

    /// Reads `buf.len()` bytes at `va`.
    pub fn read(&mut self, va: GpuVa, buf: &mut [u8]) -> Result<(), Fault> {
        self.spans(va, buf.len() as u64, Access::Read, |off, s| {
            s.read_into(&mut buf[off..off + s.len()])
        })
    }

    /// Writes `buf` at `va`.
    pub fn write(&mut self, va: GpuVa, buf: &[u8]) -> Result<(), Fault> {
        self.spans(va, buf.len() as u64, Access::Write, |off, s| {
            s.write_from(&buf[off..off + s.len()])
        })
    }

    /// Fills `len` bytes at `va` with `byte`.
    pub fn fill(&mut self, va: GpuVa, len: u64, byte: u8) -> Result<(), Fault> {
        self.spans(va, len, Access::Write, |_, s| s.fill(byte))
    }

    /// Reads a little-endian dword.
    pub fn read_u32(&mut self, va: GpuVa) -> Result<u32, Fault> {
        let mut b = [0u8; 4];
        self.read(va, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Writes a little-endian dword.
    pub fn write_u32(&mut self, va: GpuVa, v: u32) -> Result<(), Fault> {
        self.write(va, &v.to_le_bytes())
    }

    /// Reads a little-endian qword.
    pub fn read_u64(&mut self, va: GpuVa) -> Result<u64, Fault> {
        let mut b = [0u8; 8];
        self.read(va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Copies `len` bytes from `src` to `dst` host-to-host, without a bounce buffer. The ranges
    /// must not overlap (callers that allow overlap copy through a buffer instead).
    pub fn copy(&mut self, dst: GpuVa, src: GpuVa, len: u64) -> Result<(), Fault> {
        if len == 0 {
            return Ok(());
        }
        // Validate both ranges before touching anything; each page is translated once.
        let [mut sp, mut dp] = std::mem::take(&mut self.pages);
        let res = self
            .translate_range(src, len, Access::Read, &mut sp)
            .and_then(|_| self.translate_range(dst, len, Access::Write, &mut dp));
        if res.is_ok() {
            let (s0, d0) = (src.raw() / PAGE_SIZE, dst.raw() / PAGE_SIZE);
            let mut done = 0u64;
            while done < len {
                let s = src.raw() + done;
                let d = dst.raw() + done;
                let n = (PAGE_SIZE - s % PAGE_SIZE)
                    .min(PAGE_SIZE - d % PAGE_SIZE)
                    .min(len - done);
                // Page indexes are below the number of pages translated, offsets and `n` below
                // PAGE_SIZE, so the casts cannot truncate.
                #[allow(clippy::cast_possible_truncation)]
                let (spg, dpg) = (
                    sp[(s / PAGE_SIZE - s0) as usize],
                    dp[(d / PAGE_SIZE - d0) as usize],
                );
                // SAFETY: both pages are valid for PAGE_SIZE bytes; offsets + n stay inside them.
                // The caller guarantees non-overlap; `copy` tolerates overlap anyway.
                #[allow(clippy::cast_possible_truncation)]
                unsafe {
                    std::ptr::copy(
                        spg.as_ptr().add((s % PAGE_SIZE) as usize),
                        dpg.as_ptr().add((d % PAGE_SIZE) as usize),
                        n as usize,
                    );
                }
                done += n;
            }
        }
        self.pages = [sp, dp];
        res.map(|_| ())
    }
}

/// `PAGE_SIZE` as a `usize`.
const PAGE: usize = 4096;

/// A translator over a plain host buffer, for tests and reference runs: page `i` of the address
/// space maps to page `map[i]` of the buffer (so contiguous addresses are scattered in memory,
/// as they are behind a real GTT). Unmapped pages fault.
#[derive(Debug)]
pub struct BufferTranslate {
    buf: Vec<u8>,
    map: Vec<Option<usize>>,
    read_only: Vec<bool>,
}

impl BufferTranslate {
    /// `pages` pages, page `i` mapped to buffer page `(i * 7 + 3) % pages` when `pages` is not a
    /// multiple of 7 (a fixed scramble), else identity.
    pub fn scrambled(pages: usize) -> Self {
        let map = (0..pages)
            .map(|i| {
                Some(if !pages.is_multiple_of(7) {
                    (i * 7 + 3) % pages
                } else {
                    i
                })
            })
            .collect();
        BufferTranslate {
            buf: vec![0; pages * PAGE],
            map,
            read_only: vec![false; pages],
        }
    }

    /// Removes the mapping of page `i`.
    pub fn unmap(&mut self, i: usize) {
        if let Some(m) = self.map.get_mut(i) {
            *m = None;
        }
    }

    /// Makes page `i` read-only.
    pub fn set_read_only(&mut self, i: usize) {
        if let Some(r) = self.read_only.get_mut(i) {
            *r = true;
        }
    }
}

impl Translate for BufferTranslate {
    fn translate(&mut self, va: GpuVa, access: Access) -> Result<HostPage, Fault> {
        let i = usize::try_from(va.page()).map_err(|_| Fault {
            va,
            kind: FaultKind::NotMapped,
        })?;
        let p = self.map.get(i).copied().flatten().ok_or(Fault {
            va,
            kind: FaultKind::NotMapped,
        })?;
        if access == Access::Write && self.read_only[i] {
            return Err(Fault {
                va,
                kind: FaultKind::ReadOnly,
            });
        }
        let off = p * PAGE;
        // SAFETY: `off + PAGE_SIZE <= buf.len()`; the buffer lives as long as `self`, which the
        // caller borrows mutably while it uses the page.
        let ptr = unsafe { NonNull::new_unchecked(self.buf.as_mut_ptr().add(off)) };
        // SAFETY: the pointer is valid for PAGE_SIZE bytes while `self` is borrowed, and pages
        // are PAGE_SIZE-aligned relative to the buffer start (alignment of the host address is
        // not relied upon).
        Ok(unsafe { HostPage::new(ptr) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_mem_write_read_across_pages() {
        let mut t = BufferTranslate::scrambled(4);
        let mut m = Mem::new(&mut t);
        let data: Vec<u8> = (0..6000u32).map(|i| (i * 31 % 251) as u8).collect();
        m.write(GpuVa(1000), &data).unwrap();
        let mut back = vec![0; 6000];
        m.read(GpuVa(1000), &mut back).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn test_mem_fault_leaves_memory_untouched() {
        let mut t = BufferTranslate::scrambled(4);
        t.unmap(2);
        let mut m = Mem::new(&mut t);
        let err = m.write(GpuVa(4000), &[0xAA; 5000]).unwrap_err();
        assert_eq!(err.kind, FaultKind::NotMapped);
        assert_eq!(err.va, GpuVa(2 * PAGE_SIZE));
        assert_eq!(
            m.read_u32(GpuVa(4000)).unwrap(),
            0,
            "nothing written before the fault"
        );
    }

    #[test]
    fn test_mem_copy_and_read_only() {
        let mut t = BufferTranslate::scrambled(4);
        t.set_read_only(3);
        let mut m = Mem::new(&mut t);
        m.write(GpuVa(100), &[1, 2, 3, 4, 5]).unwrap();
        m.copy(GpuVa(4090), GpuVa(100), 5).unwrap();
        let mut b = [0; 5];
        m.read(GpuVa(4090), &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4, 5]);
        let e = m.copy(GpuVa(3 * PAGE_SIZE), GpuVa(100), 5).unwrap_err();
        assert_eq!(e.kind, FaultKind::ReadOnly);
        assert!(m.read_u32(GpuVa(u64::MAX - 1)).is_err());
    }
}
