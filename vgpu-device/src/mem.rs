//! How engines reach memory: an address in an engine context ([`GpuVa`]) is translated page by
//! page by a [`Translate`] implementation (the GTT mode in use) into a [`HostPage`], and [`Mem`]
//! builds byte-level reads, writes and copies on top, splitting at page boundaries. For 2-D
//! work, [`Mem::map_rows`] translates every page under some [`Rows`] once into a [`RowMap`],
//! which then hands out the rows as host spans (pages, or runs of pages the translator says lie
//! back to back in one mapping).
//!
//! The host memory behind a [`HostPage`] is the physical GPU's local memory or guest RAM mapped
//! from the VMM; a translator only hands out pages of mappings it keeps alive, and only for the
//! vGPU it translates for, so every access an engine makes stays inside that vGPU's memory.

use std::marker::PhantomData;
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

    /// Whether [`Translate::joins`] may ever say yes. Engines ask it only then; the default
    /// (no) keeps every access inside one page.
    fn may_join(&self) -> bool {
        false
    }

    /// Whether host page `b`, translated by this translator, directly follows host page `a`
    /// inside one host mapping (one allocation), so that a single access may run from `a` into
    /// `b`. Pages of different mappings that happen to be adjacent must not be joined. The
    /// default says no.
    fn joins(&self, a: HostPage, b: HostPage) -> bool {
        let _ = (a, b);
        false
    }
}

/// A contiguous piece of host memory: inside one page, or inside a run of pages the translator
/// joined (see [`Translate::joins`]).
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

    /// Stores `pattern` over the span, repeated: byte `i` of the span becomes byte `i % 8` of
    /// `pattern.to_le_bytes()`. Plain (vectorisable) stores, no copy from a buffer.
    pub fn store_pattern(&self, pattern: u64) {
        let bytes = pattern.to_le_bytes();
        let word = u64::from_ne_bytes(bytes);
        let words = self.len / 8;
        let p = self.ptr.cast::<u64>();
        for i in 0..words {
            // SAFETY: the span is valid for `len >= 8 * words` bytes; unaligned stores.
            unsafe { p.add(i).write_unaligned(word) }
        }
        // SAFETY: the last `len % 8 < 8` bytes of the span, from a local array.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(8 * words), self.len % 8)
        }
    }

    /// Replaces the span, 8 bytes at a time, by `f` of them: each little-endian word `d`
    /// (a short last word is zero-extended, and only its own bytes are written back) becomes
    /// `f(d)`. Reads and writes in place, in order.
    pub fn update_words(&self, mut f: impl FnMut(u64) -> u64) {
        let words = self.len / 8;
        let p = self.ptr.cast::<u64>();
        for i in 0..words {
            // SAFETY: word `i` lies inside the span; unaligned loads and stores.
            unsafe {
                let d = u64::from_le(p.add(i).read_unaligned());
                p.add(i).write_unaligned(f(d).to_le());
            }
        }
        let tail = self.len % 8;
        if tail > 0 {
            let mut b = [0u8; 8];
            // SAFETY: the last `tail` bytes of the span, to and from a local array.
            unsafe {
                let t = self.ptr.add(8 * words);
                std::ptr::copy_nonoverlapping(t, b.as_mut_ptr(), tail);
                b = f(u64::from_le_bytes(b)).to_le_bytes();
                std::ptr::copy_nonoverlapping(b.as_ptr(), t, tail);
            }
        }
    }

    /// Combines `src` into the span, 8 bytes at a time, in order: each little-endian word `d`
    /// of the span becomes `f(s, d)`, `s` the word at the same offset of `src` (short last
    /// words zero-extended). Covers `min(len)` bytes. Host memory of the two spans may overlap
    /// (two addresses mapping one page): each word is read before it is written.
    pub fn combine_from(&self, src: &HostSpan, mut f: impl FnMut(u64, u64) -> u64) {
        let n = src.len.min(self.len);
        let words = n / 8;
        let (sp, dp) = (src.ptr.cast::<u64>().cast_const(), self.ptr.cast::<u64>());
        for i in 0..words {
            // SAFETY: word `i` lies inside both spans; unaligned loads and stores through raw
            // pointers, which may alias.
            unsafe {
                let s = u64::from_le(sp.add(i).read_unaligned());
                let d = u64::from_le(dp.add(i).read_unaligned());
                dp.add(i).write_unaligned(f(s, d).to_le());
            }
        }
        let tail = n % 8;
        if tail > 0 {
            let (mut sb, mut db) = ([0u8; 8], [0u8; 8]);
            // SAFETY: the last `tail` bytes of both spans, to and from local arrays.
            unsafe {
                let (s, d) = (src.ptr.add(8 * words), self.ptr.add(8 * words));
                std::ptr::copy_nonoverlapping(s, sb.as_mut_ptr(), tail);
                std::ptr::copy_nonoverlapping(d, db.as_mut_ptr(), tail);
                db = f(u64::from_le_bytes(sb), u64::from_le_bytes(db)).to_le_bytes();
                std::ptr::copy_nonoverlapping(db.as_ptr(), d, tail);
            }
        }
    }
}

/// Rows of bytes in an engine context's address space: `count` rows of `len` bytes, the first
/// at `va`, each `pitch` bytes after the previous one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rows {
    /// First byte of the first row.
    pub va: GpuVa,
    /// Distance between the starts of two rows, in bytes.
    pub pitch: u64,
    /// Bytes per row.
    pub len: u64,
    /// Number of rows.
    pub count: u64,
}

impl Rows {
    /// Whether the rows cover no byte.
    pub fn is_empty(&self) -> bool {
        self.count == 0 || self.len == 0
    }

    /// The same bytes as one row when the rows are back to back (`pitch == len`).
    pub fn coalesced(self) -> Rows {
        match self.len.checked_mul(self.count) {
            Some(len) if self.pitch == self.len && self.count > 1 => Rows {
                va: self.va,
                pitch: len,
                len,
                count: 1,
            },
            _ => self,
        }
    }
}

/// The host pages under some [`Rows`], each translated once for one access by
/// [`Mem::map_rows`] before any byte was touched. Rows are then accessed as [`HostSpan`]s
/// (pieces inside one page, or one run of joined pages) without translating again. A map made
/// for reading is never written through: its writing methods do nothing.
#[derive(Debug)]
pub struct RowMap<'a> {
    rows: Rows,
    access: Access,
    /// The pages the rows touch, in address order, each once.
    pages: Vec<HostPage>,
    /// Page number of `pages[0]` when the pages are one run of consecutive page numbers
    /// (`row_first` empty): rows less than a page apart, or a single row.
    first_page: u64,
    /// Otherwise (rows a page or more apart share no page): the index in `pages` of each
    /// row's first page.
    row_first: Vec<usize>,
    /// For each page, how many pages from it on (itself included) form one run of
    /// consecutive addresses that the translator joined into one host range; empty when no
    /// page joins the next (every run is one page).
    runs: Vec<u32>,
    /// The pages stay valid while the translator is borrowed.
    _t: PhantomData<&'a ()>,
}

impl RowMap<'_> {
    /// The rows mapped.
    pub fn rows(&self) -> Rows {
        self.rows
    }

    /// Where row `r` starts: its address and the index of its first page in `pages`.
    /// `None` when `r` is not a row.
    fn row_start(&self, r: u64) -> Option<(u64, usize)> {
        if r >= self.rows.count || self.rows.len == 0 {
            return None;
        }
        // No overflow: `Mem::map_rows` checked the end of the last row.
        let a = self.rows.va.raw() + r * self.rows.pitch;
        let idx = if self.row_first.is_empty() {
            usize::try_from(a / PAGE_SIZE - self.first_page).ok()?
        } else {
            *self.row_first.get(usize::try_from(r).ok()?)?
        };
        Some((a, idx))
    }

    /// Fills `runs` from `t`'s answers: a page joins the next one when both hold consecutive
    /// addresses of the same row run and `t` puts the second right after the first in one host
    /// mapping.
    fn join_runs(&mut self, t: &dyn Translate) {
        let n = self.pages.len();
        let mut runs = vec![1u32; n];
        let mut any = false;
        // Row runs: the whole list, or each row's pages.
        let mut bounds: Vec<usize> = self.row_first.clone();
        bounds.push(n);
        let starts = if self.row_first.is_empty() { 0 } else { 1 };
        let mut lo = 0;
        for &hi in &bounds[starts..] {
            for i in (lo..hi.saturating_sub(1)).rev() {
                let (a, b) = (self.pages[i], self.pages[i + 1]);
                if a.as_ptr().wrapping_add(PAGE) == b.as_ptr() && t.joins(a, b) {
                    runs[i] = runs[i + 1].saturating_add(1);
                    any = true;
                }
            }
            lo = hi;
        }
        if any {
            self.runs = runs;
        }
    }

    /// Length of the piece at `a` (in page `idx`): to the end of its run of joined pages, at
    /// most `max`.
    fn piece(&self, idx: usize, a: u64, max: u64) -> u64 {
        let pages = self.runs.get(idx).map_or(1, |&r| u64::from(r));
        (pages * PAGE_SIZE - a % PAGE_SIZE).min(max)
    }

    /// The span of `n` bytes at `a` in page `idx`; `n` at most [`RowMap::piece`].
    fn span(&self, idx: usize, a: u64, n: u64) -> Option<HostSpan> {
        let hp = self.pages.get(idx)?;
        // Page offsets and piece lengths (at most a run of pages of one mapping) fit a usize.
        #[allow(clippy::cast_possible_truncation)]
        Some(HostSpan {
            // SAFETY: `hp` starts a run of pages that the translator placed back to back in one
            // host mapping, valid for `PAGE_SIZE` bytes each, and `a % PAGE_SIZE + n` stays
            // inside the run.
            ptr: unsafe { hp.as_ptr().add((a % PAGE_SIZE) as usize) },
            len: n as usize,
        })
    }

    /// Pages crossed by a piece of `n` bytes at `a`.
    fn pages_crossed(a: u64, n: u64) -> usize {
        usize::try_from((a % PAGE_SIZE + n) / PAGE_SIZE).unwrap_or(usize::MAX)
    }

    /// Calls `f(offset, span)` for each piece of row `r` (inside one page or one run of joined
    /// pages), in order; `offset` is the piece's distance from the row's start. Nothing when
    /// `r` is not a row.
    fn each_span(&self, r: u64, mut f: impl FnMut(usize, HostSpan)) {
        let Some((start, mut idx)) = self.row_start(r) else {
            return;
        };
        let end = start + self.rows.len;
        let mut a = start;
        while a < end {
            let n = self.piece(idx, a, end - a);
            let Some(span) = self.span(idx, a, n) else {
                return;
            };
            // Row offsets are below `len`, a host buffer's size or a bounded image row.
            #[allow(clippy::cast_possible_truncation)]
            f((a - start) as usize, span);
            idx = idx.saturating_add(Self::pages_crossed(a, n));
            a += n;
        }
    }

    /// Calls `f(offset, span)` for each piece of row `r`, to read it.
    pub fn read_spans(&self, r: u64, f: impl FnMut(usize, HostSpan)) {
        self.each_span(r, f);
    }

    /// Calls `f(offset, span)` for each piece of row `r`, to write it (and read it). Nothing
    /// when the map was made for reading.
    pub fn write_spans(&self, r: u64, f: impl FnMut(usize, HostSpan)) {
        if self.access == Access::Write {
            self.each_span(r, f);
        }
    }

    /// Copies row `r` into `buf` (at most `len` bytes).
    pub fn read_row(&self, r: u64, buf: &mut [u8]) {
        self.read_spans(r, |off, s| {
            if let Some(b) = buf.get_mut(off..off + s.len()) {
                s.read_into(b);
            }
        });
    }

    /// Copies `buf` (at most `len` bytes) into row `r`. Nothing when the map was made for
    /// reading.
    pub fn write_row(&self, r: u64, buf: &[u8]) {
        self.write_spans(r, |off, s| {
            if let Some(b) = buf.get(off..off + s.len()) {
                s.write_from(b);
            }
        });
    }

    /// Calls `f(offset, dst, src)` for the pieces of row `r` of this map (to write) and of
    /// row `r` of `src` (to read), in order, each piece inside one page or run of joined pages
    /// of both (`dst` and `src` of equal length). Covers the shorter of the two rows. Nothing when this map was
    /// made for reading or `r` is not a row of both.
    pub fn write_pairs(
        &self,
        r: u64,
        src: &RowMap<'_>,
        mut f: impl FnMut(usize, HostSpan, HostSpan),
    ) {
        if self.access != Access::Write {
            return;
        }
        let (Some((d0, mut di)), Some((s0, mut si))) = (self.row_start(r), src.row_start(r)) else {
            return;
        };
        let len = self.rows.len.min(src.rows.len);
        let mut done = 0u64;
        while done < len {
            let (d, s) = (d0 + done, s0 + done);
            let n = self
                .piece(di, d, len - done)
                .min(src.piece(si, s, len - done));
            let (Some(ds), Some(ss)) = (self.span(di, d, n), src.span(si, s, n)) else {
                return;
            };
            // Row offsets are below `len`, a bounded image row.
            #[allow(clippy::cast_possible_truncation)]
            f(done as usize, ds, ss);
            done += n;
            di = di.saturating_add(Self::pages_crossed(d, n));
            si = si.saturating_add(Self::pages_crossed(s, n));
        }
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

    /// Translates every page the rows touch, once each, for `access`, in address order (pages
    /// between rows a page or more apart are not translated); fails on the first page that does
    /// not translate, before any byte is touched. The map then reads and writes the rows
    /// without translating again.
    pub fn map_rows(&mut self, rows: Rows, access: Access) -> Result<RowMap<'a>, Fault> {
        let mut map = RowMap {
            rows,
            access,
            pages: Vec::new(),
            first_page: 0,
            row_first: Vec::new(),
            runs: Vec::new(),
            _t: PhantomData,
        };
        if rows.is_empty() {
            return Ok(map);
        }
        let overflow = Fault {
            va: rows.va,
            kind: FaultKind::Overflow,
        };
        // The last byte of the last row; every row address below it is then computed safely.
        let last = (rows.count - 1)
            .checked_mul(rows.pitch)
            .and_then(|o| o.checked_add(rows.len - 1))
            .and_then(|o| rows.va.raw().checked_add(o))
            .ok_or(overflow)?;
        if rows.count == 1 || rows.pitch < rows.len.saturating_add(PAGE_SIZE) {
            // Less than a page between rows: every page from the first to the last is touched.
            map.first_page = rows.va.raw() / PAGE_SIZE;
            // Reserved up front (up to a bound: the rest grows as pages translate).
            let n = last / PAGE_SIZE - map.first_page + 1;
            map.pages
                .reserve(usize::try_from(n.min(MAX_RESERVE)).unwrap_or(0));
            for page in map.first_page..=last / PAGE_SIZE {
                map.pages
                    .push(self.t.translate(GpuVa(page * PAGE_SIZE), access)?);
            }
        } else {
            // Rows a page or more apart: each has its own pages.
            let n = rows.count.saturating_mul(rows.len / PAGE_SIZE + 2);
            map.pages
                .reserve(usize::try_from(n.min(MAX_RESERVE)).unwrap_or(0));
            map.row_first
                .reserve(usize::try_from(rows.count.min(MAX_RESERVE)).unwrap_or(0));
            for r in 0..rows.count {
                map.row_first.push(map.pages.len());
                let a = rows.va.raw() + r * rows.pitch;
                for page in a / PAGE_SIZE..=(a + rows.len - 1) / PAGE_SIZE {
                    map.pages
                        .push(self.t.translate(GpuVa(page * PAGE_SIZE), access)?);
                }
            }
        }
        if self.t.may_join() {
            map.join_runs(&*self.t);
        }
        Ok(map)
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

/// Most page-list entries [`Mem::map_rows`] reserves before translating (a list of a larger
/// footprint grows as its pages translate).
const MAX_RESERVE: u64 = 1 << 16;

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

    /// `pages` pages cut into runs of 3, 1 and 2 pages (repeating): the pages of a run are back to
    /// back in the buffer (and joinable), consecutive runs are not (they are laid out in
    /// reverse order).
    pub fn in_runs(pages: usize) -> Self {
        let mut map = vec![None; pages];
        let mut start = 0;
        let mut end = pages;
        for len in [3, 1, 2].into_iter().cycle() {
            if start >= pages {
                break;
            }
            let len = len.min(pages - start);
            end -= len;
            for k in 0..len {
                map[start + k] = Some(end + k);
            }
            start += len;
        }
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

    fn may_join(&self) -> bool {
        true
    }

    /// Pages back to back in the one buffer.
    fn joins(&self, a: HostPage, b: HostPage) -> bool {
        let base = self.buf.as_ptr() as usize;
        let (a, b) = (a.as_ptr() as usize, b.as_ptr() as usize);
        a >= base && b == a + PAGE && b + PAGE <= base + self.buf.len()
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // Test-only: small, known-range values.
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

    fn rows(va: u64, pitch: u64, len: u64, count: u64) -> Rows {
        Rows {
            va: GpuVa(va),
            pitch,
            len,
            count,
        }
    }

    /// The lengths of the pieces `read_spans` gives for row `r`.
    fn piece_lens(map: &RowMap<'_>, r: u64) -> Vec<usize> {
        let mut v = Vec::new();
        map.read_spans(r, |_, s| v.push(s.len()));
        v
    }

    #[test]
    fn test_map_rows_far_apart_translates_only_their_pages() {
        let mut t = BufferTranslate::scrambled(16);
        // Rows at 100, 100 + 3 pages, 100 + 6 pages: pages 0, 3 and 6 only.
        for p in [1, 2, 4, 5, 7] {
            t.unmap(p);
        }
        let mut m = Mem::new(&mut t);
        let map = m
            .map_rows(rows(100, 3 * PAGE_SIZE, 200, 3), Access::Write)
            .unwrap();
        for r in 0..3 {
            map.write_row(r, &[r as u8 + 1; 200]);
        }
        for r in 0..3u64 {
            let mut b = [0u8; 200];
            m.read(GpuVa(100 + r * 3 * PAGE_SIZE), &mut b).unwrap();
            assert_eq!(b, [r as u8 + 1; 200]);
        }
        // A row straddling into an unmapped page faults, at that page, before any write.
        let e = m
            .map_rows(rows(4000, 3 * PAGE_SIZE, 200, 3), Access::Write)
            .unwrap_err();
        assert_eq!(e.va, GpuVa(PAGE_SIZE));
        assert_eq!(e.kind, FaultKind::NotMapped);
    }

    #[test]
    fn test_map_rows_faults_at_first_bad_page_and_overflow() {
        let mut t = BufferTranslate::scrambled(16);
        t.unmap(5);
        t.set_read_only(9);
        let mut m = Mem::new(&mut t);
        // Rows less than a page apart: every page from 3 to 6 is translated, in order.
        let e = m
            .map_rows(rows(3 * PAGE_SIZE + 10, 5000, 4000, 3), Access::Read)
            .unwrap_err();
        assert_eq!((e.va, e.kind), (GpuVa(5 * PAGE_SIZE), FaultKind::NotMapped));
        // A read-only page maps for reading, not for writing.
        assert!(m
            .map_rows(rows(9 * PAGE_SIZE, 0, 8, 1), Access::Read)
            .is_ok());
        let e = m
            .map_rows(rows(8 * PAGE_SIZE, 2048, 2048, 4), Access::Write)
            .unwrap_err();
        assert_eq!((e.va, e.kind), (GpuVa(9 * PAGE_SIZE), FaultKind::ReadOnly));
        let e = m
            .map_rows(rows(u64::MAX - 100, 64, 64, 2), Access::Read)
            .unwrap_err();
        assert_eq!(e.kind, FaultKind::Overflow);
        // Empty rows touch nothing, wherever they are.
        assert!(m.map_rows(rows(u64::MAX, 64, 0, 2), Access::Write).is_ok());
        assert!(m
            .map_rows(rows(5 * PAGE_SIZE, 64, 64, 0), Access::Write)
            .is_ok());
    }

    #[test]
    fn test_row_map_for_reading_is_never_written() {
        let mut t = BufferTranslate::scrambled(4);
        let mut m = Mem::new(&mut t);
        m.write(GpuVa(0), &[7; 5000]).unwrap();
        let map = m.map_rows(rows(0, 5000, 5000, 1), Access::Read).unwrap();
        map.write_row(0, &[1; 5000]);
        map.write_spans(0, |_, s| s.fill(2));
        let dst = m.map_rows(rows(0, 5000, 5000, 1), Access::Read).unwrap();
        dst.write_pairs(0, &map, |_, d, s| d.copy_from_span(&s));
        let mut b = vec![0; 5000];
        map.read_row(0, &mut b);
        assert!(b.iter().all(|&x| x == 7));
    }

    #[test]
    fn test_row_map_pieces_follow_joined_runs_only() {
        // Runs of 3, 1, 2, 3, 1, 2 pages back to back in the buffer.
        let mut t = BufferTranslate::in_runs(12);
        let mut m = Mem::new(&mut t);
        let map = m
            .map_rows(rows(0, 12 * PAGE_SIZE, 12 * PAGE_SIZE, 1), Access::Write)
            .unwrap();
        let p = PAGE_SIZE as usize;
        assert_eq!(piece_lens(&map, 0), [3 * p, p, 2 * p, 3 * p, p, 2 * p]);
        // Far-apart rows, each in its own pages: 1-3 (end of run 0-2, then 3), 6-8 (one run).
        let far = |va, len| rows(va, 5 * PAGE_SIZE, len, 2);
        let map = m
            .map_rows(far(PAGE_SIZE + 5, 2 * PAGE_SIZE), Access::Read)
            .unwrap();
        assert_eq!(piece_lens(&map, 0), [2 * p - 5, 5]);
        assert_eq!(piece_lens(&map, 1), [2 * p]);
        // Rows on pages 2-3 and 7-8: no join across runs (2, 3), whole run 6-8 joined.
        let map = m
            .map_rows(far(2 * PAGE_SIZE, 2 * PAGE_SIZE), Access::Read)
            .unwrap();
        assert_eq!(piece_lens(&map, 0), [p, p]);
        assert_eq!(piece_lens(&map, 1), [2 * p]);
        // Rows less than a page apart, sharing pages 2-5: split at 2|3 and 3|4, not 4|5.
        let near = rows(2 * PAGE_SIZE + 100, PAGE_SIZE + 1, PAGE_SIZE, 3);
        let map = m.map_rows(near, Access::Read).unwrap();
        assert_eq!(piece_lens(&map, 0), [p - 100, 100]);
        assert_eq!(piece_lens(&map, 1), [p - 101, 101]);
        assert_eq!(piece_lens(&map, 2), [p]);
        // Scattered pages never join.
        let mut t = BufferTranslate::scrambled(12);
        let mut m = Mem::new(&mut t);
        let map = m
            .map_rows(rows(10, PAGE_SIZE, PAGE_SIZE, 3), Access::Read)
            .unwrap();
        assert_eq!(piece_lens(&map, 2), [p - 10, 10]);
        assert!(map.runs.is_empty());
    }

    #[test]
    fn test_row_map_pairs_and_span_kernels_across_pages_match_bytewise() {
        for layout in [BufferTranslate::scrambled(20), BufferTranslate::in_runs(20)] {
            let mut t = layout;
            let mut m = Mem::new(&mut t);
            let data: Vec<u8> = (0..20 * PAGE).map(|i| (i * 7 % 253) as u8).collect();
            m.write(GpuVa(0), &data).unwrap();
            // Source and destination rows at different page offsets: pieces split at both.
            let (src, dst) = (rows(1000, 9000, 7001, 2), rows(40_000, 8200, 7001, 2));
            let smap = m.map_rows(src, Access::Read).unwrap();
            let dmap = m.map_rows(dst, Access::Write).unwrap();
            let mut want = data.clone();
            for r in 0..2u64 {
                let (s0, d0) = (1000 + 9000 * r as usize, 40_000 + 8200 * r as usize);
                let mut seen = 0;
                dmap.write_pairs(r, &smap, |off, d, s| {
                    assert_eq!((off, d.len()), (seen, s.len()));
                    seen += d.len();
                    d.combine_from(&s, |s, d| s ^ d.rotate_left(8));
                });
                assert_eq!(seen, 7001);
                for i in (0..7001).step_by(8) {
                    let n = (7001 - i).min(8);
                    let mut sb = [0u8; 8];
                    let mut db = [0u8; 8];
                    sb[..n].copy_from_slice(&data[s0 + i..s0 + i + n]);
                    db[..n].copy_from_slice(&want[d0 + i..d0 + i + n]);
                    let v = u64::from_le_bytes(sb) ^ u64::from_le_bytes(db).rotate_left(8);
                    want[d0 + i..d0 + i + n].copy_from_slice(&v.to_le_bytes()[..n]);
                }
            }
            // A pattern and an in-place update over a row of 3 pages and a bit, from offset 5.
            let fill = m
                .map_rows(rows(20_005, 13_000, 13_000, 1), Access::Write)
                .unwrap();
            fill.write_spans(0, |off, s| {
                s.store_pattern(0x0102_0304_0506_0708u64.rotate_right(8 * (off % 8) as u32));
                s.update_words(|d| !d);
            });
            for i in 0..13_000 {
                want[20_005 + i] = !(8 - (i % 8) as u8);
            }
            let mut got = vec![0; 20 * PAGE];
            m.read(GpuVa(0), &mut got).unwrap();
            assert!(got == want);
        }
    }
}
