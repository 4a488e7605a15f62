//! The GPU's local memory (VRAM): a sparse memfd mapped once into the daemon, and
//! [`LmemSlice`], one vGPU's exclusive part of it.
//!
//! The memfd stays open so the VMM can map a vGPU's slice as its BAR2 aperture; the daemon's
//! mapping and the VMM's mapping share the same pages.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::Arc;

use vgpu_abi::PAGE_SIZE;

use super::PhysError;
use crate::addr::{HostLmemOffset, LmemOffset};
use crate::mem::HostPage;

/// `PAGE_SIZE` as a `usize`.
// 4096 fits every `usize`.
#[allow(clippy::cast_possible_truncation)]
const PAGE_BYTES: usize = PAGE_SIZE as usize;

/// The physical GPU's local memory: a memfd of `size` bytes, mapped shared into the daemon.
#[derive(Debug)]
pub struct LocalMemory {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    /// Size in bytes; fits `usize` (checked at creation).
    len: usize,
}

// SAFETY: the mapping is plain shared memory that lives as long as the value; every access goes
// through raw copies that tolerate concurrent writers (the guest may write the same pages
// through its aperture at any time), so sharing the pointer between threads is sound.
unsafe impl Send for LocalMemory {}
// SAFETY: as for `Send`; no method hands out references into the mapping.
unsafe impl Sync for LocalMemory {}

impl LocalMemory {
    /// Creates `size` bytes of zeroed local memory (a multiple of the page size). The memfd is
    /// sparse: pages cost host memory only once touched.
    pub fn new(size: u64) -> Result<Self, PhysError> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
            return Err(PhysError::InvalidConfig(
                "local memory size must be a non-zero multiple of the page size",
            ));
        }
        let len = usize::try_from(size)
            .map_err(|_| PhysError::InvalidConfig("local memory size too large"))?;
        let flen = libc::off_t::try_from(size)
            .map_err(|_| PhysError::InvalidConfig("local memory size too large"))?;
        // SAFETY: the name is a valid NUL-terminated string; the flags are valid.
        let raw = unsafe { libc::memfd_create(c"vgpu-lmem".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(PhysError::CreateMemory(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a freshly created fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: `fd` is a valid memfd; ftruncate has no memory-safety requirements.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), flen) } < 0 {
            return Err(PhysError::CreateMemory(io::Error::last_os_error()));
        }
        // SAFETY: a fresh shared mapping of `len` bytes of a file that is `len` bytes long; the
        // kernel picks the address, so no existing mapping is replaced.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(PhysError::MapMemory(io::Error::last_os_error()));
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| PhysError::MapMemory(io::Error::other("null mapping")))?;
        Ok(LocalMemory { fd, ptr, len })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.len as u64
    }

    /// The memfd, to map (parts of) local memory elsewhere, e.g. as a vGPU's BAR2 aperture.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The raw memfd.
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// `[offset, offset + len)` as a byte index into the mapping, if it lies inside.
    fn range(&self, offset: HostLmemOffset, len: usize) -> Result<usize, PhysError> {
        let start = usize::try_from(offset.raw()).ok();
        match start.and_then(|s| Some((s, s.checked_add(len)?))) {
            Some((start, end)) if end <= self.len => Ok(start),
            _ => Err(PhysError::OutOfRange {
                offset: offset.raw(),
                len: len as u64,
            }),
        }
    }

    /// Copies `buf.len()` bytes at `offset` into `buf`.
    pub fn read(&self, offset: HostLmemOffset, buf: &mut [u8]) -> Result<(), PhysError> {
        let start = self.range(offset, buf.len())?;
        // SAFETY: `[start, start + buf.len())` lies inside the mapping (checked above), which
        // never overlaps a Rust-owned buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(start), buf.as_mut_ptr(), buf.len())
        }
        Ok(())
    }

    /// Copies `buf` to `offset`.
    pub fn write(&self, offset: HostLmemOffset, buf: &[u8]) -> Result<(), PhysError> {
        let start = self.range(offset, buf.len())?;
        // SAFETY: as in `read`.
        unsafe {
            std::ptr::copy_nonoverlapping(buf.as_ptr(), self.ptr.as_ptr().add(start), buf.len())
        }
        Ok(())
    }

    /// Writes `bufs` back to back from `offset` through the memfd (`pwritev`) rather than the
    /// mapping: filling memory that was never touched (after a scrub, say) this way lets the
    /// kernel allocate its pages without a page fault each — about twice as fast for a restore.
    /// Falls back to copying through the mapping if the file write fails.
    pub fn write_vectored(&self, offset: HostLmemOffset, bufs: &[&[u8]]) -> Result<(), PhysError> {
        /// iovecs per `pwritev` (the kernel takes up to `IOV_MAX`, 1024).
        const BATCH: usize = 256;
        let total = bufs
            .iter()
            .try_fold(0usize, |t, b| t.checked_add(b.len()))
            .ok_or(PhysError::OutOfRange {
                offset: offset.raw(),
                len: u64::MAX,
            })?;
        let mut pos = self.range(offset, total)?;
        // The parts not yet written: `bufs[next..]`, the first of them from byte `skip`.
        let (mut next, mut skip) = (0, 0);
        while next < bufs.len() {
            let mut iov = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; BATCH];
            let mut n = 0;
            for (k, b) in bufs[next..].iter().take(BATCH).enumerate() {
                let b = if k == 0 { &b[skip..] } else { b };
                iov[n] = libc::iovec {
                    iov_base: b.as_ptr().cast_mut().cast(),
                    iov_len: b.len(),
                };
                n += 1;
            }
            #[allow(clippy::cast_possible_truncation)] // n <= BATCH = 256.
            let count = n as libc::c_int;
            let written = match libc::off_t::try_from(pos) {
                // SAFETY: `iov[..n]` describes live, readable byte slices of `bufs` (the kernel
                // only reads them); the file range lies inside the memfd (checked above).
                Ok(at) => unsafe { libc::pwritev(self.fd.as_raw_fd(), iov.as_ptr(), count, at) },
                Err(_) => -1,
            };
            let written = usize::try_from(written).ok();
            if written.is_none() && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
            {
                continue;
            }
            // Nothing written (an error, or a write that makes no progress): copy the rest
            // through the mapping.
            let Some(mut written) = written.filter(|&w| w > 0) else {
                for (k, b) in bufs[next..].iter().enumerate() {
                    let b = if k == 0 { &b[skip..] } else { b };
                    // SAFETY: inside the checked range, as in `write`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            b.as_ptr(),
                            self.ptr.as_ptr().add(pos),
                            b.len(),
                        )
                    }
                    pos += b.len();
                }
                return Ok(());
            };
            pos += written;
            // Advance over what was written (possibly a partial write).
            while next < bufs.len() && written >= bufs[next].len() - skip {
                written -= bufs[next].len() - skip;
                next += 1;
                skip = 0;
            }
            skip += written;
        }
        Ok(())
    }

    /// The page holding `offset` (its offset inside the page is ignored), or `None` outside
    /// local memory. The page stays valid while `self` is borrowed.
    pub fn page(&self, offset: HostLmemOffset) -> Option<HostPage> {
        let base = offset.page_base();
        let start = self.range(base, PAGE_BYTES).ok()?;
        // SAFETY: `start` is inside the mapping, whose base is non-null.
        let ptr = unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(start)) };
        // SAFETY: the mapping is page aligned and `start` is a multiple of the page size, so the
        // page is aligned and `[start, start + PAGE_SIZE)` is inside the mapping, which lives
        // as long as `self`.
        Some(unsafe { HostPage::new(ptr) })
    }

    /// Zeroes `[offset, offset + len)`. Punches a hole in the memfd (the host gets the pages
    /// back and they read as zeros through every mapping); falls back to writing zeros.
    pub fn scrub(&self, offset: HostLmemOffset, len: u64) -> Result<(), PhysError> {
        let n = usize::try_from(len).map_err(|_| PhysError::OutOfRange {
            offset: offset.raw(),
            len,
        })?;
        let start = self.range(offset, n)?;
        if n == 0 {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let punched = match (libc::off_t::try_from(start), libc::off_t::try_from(n)) {
            // SAFETY: fallocate on our own memfd, inside its size; no memory is touched.
            (Ok(o), Ok(l)) => 0 == unsafe { libc::fallocate(self.fd.as_raw_fd(), mode, o, l) },
            _ => false,
        };
        if !punched {
            tracing::warn!(
                offset = offset.raw(),
                len,
                "hole punch failed, zeroing local memory by writing"
            );
            self.zero_by_writing(start, n);
        }
        Ok(())
    }

    /// Writes zeros to `[start, start + n)`, a range checked by the caller.
    fn zero_by_writing(&self, start: usize, n: usize) {
        // SAFETY: the caller checked that the range lies inside the mapping.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(start), 0, n) }
    }
}

impl Drop for LocalMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; no `HostPage` outlives the
        // borrow of `self` it came from, so nothing uses it afterwards.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// One vGPU's exclusive part `[host_base, host_base + size)` of local memory. Every lookup
/// takes a vGPU-relative [`LmemOffset`] and cannot leave the slice. Not `Clone`: a partition
/// has exactly one owner.
#[derive(Debug)]
pub struct LmemSlice {
    mem: Arc<LocalMemory>,
    base: HostLmemOffset,
    size: u64,
}

impl LmemSlice {
    /// The slice `[base, base + size)` of `mem`, or `None` if it does not fit or is unaligned.
    /// Only the physical GPU creates slices, so slices never alias.
    pub(crate) fn new(mem: Arc<LocalMemory>, base: HostLmemOffset, size: u64) -> Option<Self> {
        let end = base.raw().checked_add(size)?;
        if !base.is_page_aligned() || !size.is_multiple_of(PAGE_SIZE) || end > mem.size() {
            return None;
        }
        Some(LmemSlice { mem, base, size })
    }

    /// Size in bytes (also the size of the vGPU's BAR2 aperture).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where the slice starts in local memory (the memfd offset to map the aperture from).
    pub fn host_base(&self) -> HostLmemOffset {
        self.base
    }

    /// The memfd of the whole local memory, to map the slice (`size()` bytes at
    /// `host_base()`) into a VMM as the vGPU's BAR2 aperture.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.mem.fd()
    }

    /// The local memory the slice is part of.
    pub(crate) fn memory(&self) -> &Arc<LocalMemory> {
        &self.mem
    }

    /// The host offset of `offset`, if it lies inside the slice.
    pub fn host_offset(&self, offset: LmemOffset) -> Option<HostLmemOffset> {
        (offset.raw() < self.size).then(|| self.base.add(offset.raw()))
    }

    /// The host offset of `[offset, offset + len)`, if the whole range lies inside the slice.
    fn host_range(&self, offset: LmemOffset, len: u64) -> Result<HostLmemOffset, PhysError> {
        match offset.raw().checked_add(len) {
            Some(end) if end <= self.size => Ok(self.base.add(offset.raw())),
            _ => Err(PhysError::OutOfRange {
                offset: offset.raw(),
                len,
            }),
        }
    }

    /// Whether host page `b` directly follows host page `a` with both inside this slice: the
    /// slice is one mapping, so a single access may run from `a` into `b`
    /// ([`crate::mem::Translate::joins`]).
    pub fn joins(&self, a: HostPage, b: HostPage) -> bool {
        let (Some(first), Ok(len)) = (self.page(LmemOffset(0)), usize::try_from(self.size)) else {
            return false;
        };
        let lo = first.as_ptr() as usize;
        let (a, b) = (a.as_ptr() as usize, b.as_ptr() as usize);
        // `b > a >= lo`; its page must end inside the slice.
        a >= lo && a.checked_add(PAGE_BYTES) == Some(b) && b - lo + PAGE_BYTES <= len
    }

    /// The page holding `offset` (page offset ignored), or `None` outside the slice.
    pub fn page(&self, offset: LmemOffset) -> Option<HostPage> {
        self.mem.page(self.host_offset(offset)?)
    }

    /// Copies `buf.len()` bytes at `offset` into `buf`.
    pub fn read(&self, offset: LmemOffset, buf: &mut [u8]) -> Result<(), PhysError> {
        self.mem
            .read(self.host_range(offset, buf.len() as u64)?, buf)
    }

    /// Copies `buf` to `offset`.
    pub fn write(&self, offset: LmemOffset, buf: &[u8]) -> Result<(), PhysError> {
        self.mem
            .write(self.host_range(offset, buf.len() as u64)?, buf)
    }

    /// Writes `bufs` back to back from `offset` through the memfd
    /// ([`LocalMemory::write_vectored`]).
    pub fn write_vectored(&self, offset: LmemOffset, bufs: &[&[u8]]) -> Result<(), PhysError> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        self.mem.write_vectored(self.host_range(offset, len)?, bufs)
    }

    /// Zeroes the whole slice.
    pub fn scrub(&self) -> Result<(), PhysError> {
        self.mem.scrub(self.base, self.size)
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::unix::fs::{FileExt, MetadataExt};

    use super::*;

    const MIB: u64 = 1 << 20;

    fn pread(mem: &LocalMemory, offset: u64, len: usize) -> Vec<u8> {
        let f = File::from(mem.fd().try_clone_to_owned().unwrap());
        let mut buf = vec![0xEE; len];
        f.read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    #[test]
    fn test_lmem_new_fresh_reads_zero_and_sizes_fd() {
        let m = LocalMemory::new(64 * MIB).unwrap();
        assert_eq!(m.size(), 64 * MIB);
        let f = File::from(m.fd().try_clone_to_owned().unwrap());
        assert_eq!(f.metadata().unwrap().len(), 64 * MIB);
        let mut b = [0xFFu8; 16];
        m.read(HostLmemOffset(64 * MIB - 16), &mut b).unwrap();
        assert_eq!(b, [0; 16]);
        assert!(m.as_raw_fd() >= 0);
        assert!(LocalMemory::new(0).is_err());
        assert!(LocalMemory::new(PAGE_SIZE + 1).is_err());
    }

    #[test]
    fn test_lmem_write_visible_through_fd_and_page() {
        let m = LocalMemory::new(4 * MIB).unwrap();
        m.write(HostLmemOffset(PAGE_SIZE + 10), b"hello").unwrap();
        assert_eq!(pread(&m, PAGE_SIZE + 10, 5), b"hello");
        let p = m.page(HostLmemOffset(PAGE_SIZE + 123)).unwrap();
        assert!((p.as_ptr() as usize).is_multiple_of(PAGE_BYTES));
        // SAFETY: the page is valid for PAGE_SIZE bytes while `m` is borrowed.
        let byte = unsafe { *p.as_ptr().add(10) };
        assert_eq!(byte, b'h');
    }

    #[test]
    fn test_lmem_out_of_range_errors_not_panics() {
        let m = LocalMemory::new(MIB).unwrap();
        let mut b = [0u8; 8];
        assert!(m.read(HostLmemOffset(MIB - 4), &mut b).is_err());
        assert!(m.write(HostLmemOffset(u64::MAX - 2), &b).is_err());
        assert!(
            m.read(HostLmemOffset(MIB), &mut []).is_ok(),
            "empty access at the end is fine"
        );
        assert!(m.page(HostLmemOffset(MIB)).is_none());
        assert!(m.page(HostLmemOffset(u64::MAX)).is_none());
        assert!(m.page(HostLmemOffset(MIB - 1)).is_some());
        assert!(m
            .scrub(HostLmemOffset(MIB - PAGE_SIZE), 2 * PAGE_SIZE)
            .is_err());
        assert!(m.scrub(HostLmemOffset(8), u64::MAX).is_err());
    }

    #[test]
    fn test_lmem_scrub_reads_zero_through_mapping_and_fd() {
        let m = LocalMemory::new(8 * MIB).unwrap();
        let pattern = vec![0xA5u8; 3 * PAGE_BYTES];
        m.write(HostLmemOffset(PAGE_SIZE), &pattern).unwrap();
        m.write(HostLmemOffset(5 * PAGE_SIZE), &pattern).unwrap();
        let blocks = |m: &LocalMemory| {
            let f = File::from(m.fd().try_clone_to_owned().unwrap());
            f.metadata().unwrap().blocks()
        };
        let before = blocks(&m);
        // Unaligned range: partial pages at both ends are zeroed too.
        m.scrub(HostLmemOffset(PAGE_SIZE + 100), 2 * PAGE_SIZE)
            .unwrap();
        // Checked before reading: a read fault on a shmem hole allocates the page again.
        assert!(blocks(&m) < before, "the hole punch gave a page back");
        let mut back = vec![0xEEu8; 3 * PAGE_BYTES];
        m.read(HostLmemOffset(PAGE_SIZE), &mut back).unwrap();
        assert!(back[..100].iter().all(|&b| b == 0xA5));
        assert!(back[100..100 + 2 * PAGE_BYTES].iter().all(|&b| b == 0));
        assert!(back[100 + 2 * PAGE_BYTES..].iter().all(|&b| b == 0xA5));
        let via_fd = pread(&m, PAGE_SIZE, 3 * PAGE_BYTES);
        assert_eq!(via_fd, back);
        // Fallback path.
        m.zero_by_writing(5 * PAGE_BYTES, 3 * PAGE_BYTES);
        assert!(pread(&m, 5 * PAGE_SIZE, 3 * PAGE_BYTES)
            .iter()
            .all(|&b| b == 0));
    }

    #[test]
    fn test_slice_access_confined_to_range() {
        let m = Arc::new(LocalMemory::new(4 * MIB).unwrap());
        let s = LmemSlice::new(m.clone(), HostLmemOffset(MIB), MIB).unwrap();
        assert_eq!((s.host_base(), s.size()), (HostLmemOffset(MIB), MIB));
        assert_eq!(s.fd().as_raw_fd(), m.as_raw_fd());
        s.write(LmemOffset(0), b"abc").unwrap();
        let mut b = [0u8; 3];
        m.read(HostLmemOffset(MIB), &mut b).unwrap();
        assert_eq!(&b, b"abc");
        assert_eq!(
            s.host_offset(LmemOffset(MIB - 1)),
            Some(HostLmemOffset(2 * MIB - 1))
        );
        assert_eq!(s.host_offset(LmemOffset(MIB)), None);
        assert_eq!(s.host_offset(LmemOffset(u64::MAX)), None);
        assert!(s.page(LmemOffset(MIB)).is_none());
        assert!(s.page(LmemOffset(u64::MAX)).is_none());
        assert_eq!(
            s.page(LmemOffset(0)).unwrap(),
            m.page(HostLmemOffset(MIB)).unwrap()
        );
        assert!(s.read(LmemOffset(MIB - 2), &mut b).is_err());
        assert!(s.write(LmemOffset(u64::MAX), &b).is_err());
        assert!(s.write(LmemOffset(MIB - 3), &b).is_ok());
        s.scrub().unwrap();
        m.read(HostLmemOffset(MIB), &mut b).unwrap();
        assert_eq!(b, [0; 3]);
    }

    #[test]
    fn test_write_vectored_lands_like_write_across_batches() {
        let m = Arc::new(LocalMemory::new(4 * MIB).unwrap());
        let s = LmemSlice::new(m.clone(), HostLmemOffset(MIB), 2 * MIB).unwrap();
        // 300 pieces of odd sizes (more than one pwritev batch), one of them empty.
        let data: Vec<Vec<u8>> = (0..300u32)
            .map(|i| {
                let len = if i == 7 {
                    0
                } else {
                    1 + (i as usize * 37) % 5000
                };
                (0..len)
                    .map(|k| (i as usize + k).to_le_bytes()[0])
                    .collect()
            })
            .collect();
        let bufs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        let want: Vec<u8> = data.concat();
        s.write_vectored(LmemOffset(123), &bufs).unwrap();
        let mut got = vec![0u8; want.len()];
        s.read(LmemOffset(123), &mut got).unwrap();
        assert!(
            got == want,
            "written through the fd, read through the mapping"
        );
        let mut before = [1u8; 123];
        s.read(LmemOffset(0), &mut before).unwrap();
        assert_eq!(before, [0; 123], "nothing before the offset");
        // Out of range: refused, nothing written.
        let big = vec![9u8; 4096];
        let e = s.write_vectored(LmemOffset(2 * MIB - 4096), &[&big, &big]);
        assert!(e.is_err());
        assert_eq!(pread(&m, 3 * MIB - 4096, 1), vec![0]);
        assert!(s.write_vectored(LmemOffset(u64::MAX), &[&big]).is_err());
    }

    #[test]
    fn test_slice_joins_only_adjacent_pages_inside_itself() {
        let m = Arc::new(LocalMemory::new(4 * MIB).unwrap());
        let s = LmemSlice::new(m.clone(), HostLmemOffset(MIB), MIB).unwrap();
        let page = |o: u64| m.page(HostLmemOffset(o)).unwrap();
        let last = 2 * MIB - PAGE_SIZE;
        assert!(s.joins(page(MIB), page(MIB + PAGE_SIZE)));
        assert!(s.joins(page(last - PAGE_SIZE), page(last)));
        assert!(!s.joins(page(last), page(2 * MIB)), "into the next slice");
        assert!(
            !s.joins(page(MIB - PAGE_SIZE), page(MIB)),
            "from the previous slice"
        );
        assert!(!s.joins(page(MIB + PAGE_SIZE), page(MIB)), "backwards");
        assert!(
            !s.joins(page(MIB), page(MIB + 2 * PAGE_SIZE)),
            "a page apart"
        );
        assert!(!s.joins(page(MIB), page(MIB)));
    }

    #[test]
    fn test_slice_new_outside_memory_rejected() {
        let m = Arc::new(LocalMemory::new(MIB).unwrap());
        assert!(LmemSlice::new(m.clone(), HostLmemOffset(0), 2 * MIB).is_none());
        assert!(LmemSlice::new(m.clone(), HostLmemOffset(1), PAGE_SIZE).is_none());
        assert!(LmemSlice::new(m.clone(), HostLmemOffset(u64::MAX - 4095), PAGE_SIZE).is_none());
        assert!(LmemSlice::new(m, HostLmemOffset(0), MIB).is_some());
    }
}
