//! Client memory: the DMA map (`DMA_MAP`/`DMA_UNMAP`) and the [`DmaHandle`] through which the
//! device owner reads and writes client memory — directly through the mapping when the client
//! passed a file descriptor, with `DMA_READ`/`DMA_WRITE` messages when it did not.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::sync::{Arc, Mutex, PoisonError};

use vm_memory::{ByteValued, FileOffset, MmapRegion, VolatileMemory};

use crate::backend::DmaRegion;
use crate::connection::{Ctx, Link, Response};
use crate::error::{Error, Reject};
use crate::version::PAGE_SIZE;
use crate::wire::{
    command, read_struct, DmaAccess, DmaMap as DmaMapWire, DmaUnmap, DMA_MAP_FLAG_READ,
    DMA_MAP_FLAG_WRITE, DMA_UNMAP_FLAG_ALL, DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, FLAG_ERROR,
};

/// Layout of `DMA_READ`/`DMA_WRITE` payloads.
///
/// The spec has `u64 address, u64 count` and the data at payload offset 16. QEMU's client
/// (`VFIOUserDMARW`, through at least 10.1) declares `u64 offset, u32 count, char data[]`, so it
/// reads and writes the data at payload offset 12 (the message size is the same). Requests are
/// byte-identical for counts below 4 GiB; only where the data sits differs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DmaRwLayout {
    /// The spec's layout (libvfio-user).
    #[default]
    Spec,
    /// QEMU's layout.
    Qemu,
}

impl DmaRwLayout {
    fn data_offset(self) -> usize {
        match self {
            DmaRwLayout::Spec => 16,
            DmaRwLayout::Qemu => 12,
        }
    }
}

/// One mapping of client memory.
#[derive(Clone, Debug)]
pub(crate) struct DmaEntry {
    /// Size in bytes.
    pub size: u64,
    /// The server's mapping of the client's file (`None`: reachable through messages only).
    pub mapping: Option<Arc<MmapRegion>>,
    /// The device may read.
    pub readable: bool,
    /// The device may write.
    pub writable: bool,
}

/// The client's DMA mappings, keyed by start address; entries never overlap.
#[derive(Debug, Default)]
pub(crate) struct DmaMap {
    entries: BTreeMap<u64, DmaEntry>,
}

/// A piece of a DMA access that lies inside one mapping.
struct Piece {
    iova: u64,
    len: usize,
    offset: u64,
    mapping: Option<Arc<MmapRegion>>,
}

impl DmaMap {
    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether `[iova, end)` overlaps a mapping.
    fn overlaps(&self, iova: u64, end: u64) -> bool {
        if let Some((&start, e)) = self.entries.range(..end).next_back() {
            // `start < end`; overlap when that mapping reaches past `iova`.
            return start.saturating_add(e.size) > iova;
        }
        false
    }

    /// Removes and returns every mapping.
    pub fn take_all(&mut self) -> Vec<(u64, DmaEntry)> {
        std::mem::take(&mut self.entries).into_iter().collect()
    }

    /// Splits `[iova, iova + len)` into pieces inside mappings that allow `write`/read.
    fn pieces(&self, iova: u64, len: usize, write: bool) -> Result<Vec<Piece>, Error> {
        let not_mapped = || Error::DmaNotMapped { iova, len };
        let end = iova
            .checked_add(u64::try_from(len).map_err(|_| not_mapped())?)
            .ok_or_else(not_mapped)?;
        let mut pieces = Vec::new();
        let mut cur = iova;
        while cur < end {
            let (&start, e) = self
                .entries
                .range(..=cur)
                .next_back()
                .ok_or_else(not_mapped)?;
            let entry_end = start.saturating_add(e.size);
            if entry_end <= cur {
                return Err(not_mapped());
            }
            if (write && !e.writable) || (!write && !e.readable) {
                return Err(Error::DmaPermission {
                    iova,
                    len,
                    access: if write { "writable" } else { "readable" },
                });
            }
            let piece_end = entry_end.min(end);
            pieces.push(Piece {
                iova: cur,
                len: usize::try_from(piece_end - cur).map_err(|_| not_mapped())?,
                offset: cur - start,
                mapping: e.mapping.clone(),
            });
            cur = piece_end;
        }
        Ok(pieces)
    }
}

/// `DMA_MAP`.
pub(crate) fn handle_map(
    ctx: &Ctx<'_>,
    payload: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<Response, Reject> {
    let req: DmaMapWire =
        read_struct(payload).ok_or_else(|| Reject::inval("DMA_MAP payload too short"))?;
    if (req.argsz as usize) < std::mem::size_of::<DmaMapWire>() {
        return Err(Reject::inval(format!("DMA_MAP argsz {}", req.argsz)));
    }
    let rw = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
    if req.flags & !rw != 0 || req.flags & rw == 0 {
        return Err(Reject::inval(format!("DMA_MAP flags {:#x}", req.flags)));
    }
    if req.size == 0
        || !req.address.is_multiple_of(PAGE_SIZE)
        || !req.size.is_multiple_of(PAGE_SIZE)
    {
        return Err(Reject::inval(format!(
            "DMA_MAP {:#x}+{:#x} is empty or not 4 KiB aligned",
            req.address, req.size
        )));
    }
    let end = req
        .address
        .checked_add(req.size)
        .ok_or_else(|| Reject::inval("DMA_MAP range overflows"))?;
    if fds.len() > 1 {
        return Err(Reject::inval(format!("DMA_MAP with {} fds", fds.len())));
    }
    {
        let map = ctx.link.dma_map();
        if map.len() >= ctx.shared.config.max_dma_maps as usize {
            return Err(Reject::new(libc::ENOSPC, "max_dma_maps reached"));
        }
        if map.overlaps(req.address, end) {
            return Err(Reject::new(
                libc::EEXIST,
                format!(
                    "DMA_MAP {:#x}+{:#x} overlaps a mapping",
                    req.address, req.size
                ),
            ));
        }
    }
    let readable = req.flags & DMA_MAP_FLAG_READ != 0;
    let writable = req.flags & DMA_MAP_FLAG_WRITE != 0;
    let mapping = match fds.into_iter().next() {
        Some(fd) => Some(Arc::new(map_fd(
            fd, req.offset, req.size, readable, writable,
        )?)),
        None => None,
    };
    let region = DmaRegion {
        iova: req.address,
        size: req.size,
        mapping: mapping.clone(),
        readable,
        writable,
    };
    {
        let mut backend = ctx.shared.backend();
        backend.dma_map(region)?;
        ctx.link.dma_map_mut().entries.insert(
            req.address,
            DmaEntry {
                size: req.size,
                mapping,
                readable,
                writable,
            },
        );
    }
    Ok(Response::empty())
}

/// Maps `size` bytes of the client's file at `offset` with the protection the flags allow.
fn map_fd(
    fd: OwnedFd,
    offset: u64,
    size: u64,
    readable: bool,
    writable: bool,
) -> Result<MmapRegion, Reject> {
    if !offset.is_multiple_of(PAGE_SIZE) {
        return Err(Reject::inval(format!(
            "DMA_MAP file offset {offset:#x} unaligned"
        )));
    }
    let file_end = offset
        .checked_add(size)
        .filter(|&e| i64::try_from(e).is_ok())
        .ok_or_else(|| Reject::inval("DMA_MAP file range overflows"))?;
    let len = usize::try_from(size).map_err(|_| Reject::inval("DMA_MAP size too large"))?;
    let file = File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| Reject::new(e.raw_os_error().unwrap_or(libc::EBADF), "DMA_MAP fstat"))?;
    let ft = meta.file_type();
    if ft.is_dir() || ft.is_fifo() || ft.is_socket() {
        return Err(Reject::inval("DMA_MAP fd is not mappable memory"));
    }
    // Touching a shared mapping past the end of its file raises SIGBUS: refuse short files.
    if ft.is_file() && meta.len() < file_end {
        return Err(Reject::inval(format!(
            "DMA_MAP file range ends at {file_end:#x}, past the file's {:#x} bytes",
            meta.len()
        )));
    }
    let mut prot = 0;
    if readable {
        prot |= libc::PROT_READ;
    }
    if writable {
        prot |= libc::PROT_WRITE;
    }
    MmapRegion::build(
        Some(FileOffset::new(file, offset)),
        len,
        prot,
        libc::MAP_SHARED | libc::MAP_NORESERVE,
    )
    .map_err(|e| {
        let errno = match &e {
            vm_memory::mmap::MmapRegionError::Mmap(io) => io.raw_os_error().unwrap_or(libc::EINVAL),
            _ => libc::EINVAL,
        };
        Reject::new(errno, format!("DMA_MAP mmap: {e}"))
    })
}

/// `DMA_UNMAP`; the reply repeats the request (the `vfio_user` client reads it back whole).
pub(crate) fn handle_unmap(ctx: &Ctx<'_>, payload: &[u8]) -> Result<Response, Reject> {
    let req: DmaUnmap =
        read_struct(payload).ok_or_else(|| Reject::inval("DMA_UNMAP payload too short"))?;
    if (req.argsz as usize) < std::mem::size_of::<DmaUnmap>() {
        return Err(Reject::inval(format!("DMA_UNMAP argsz {}", req.argsz)));
    }
    if req.flags & DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0 {
        return Err(Reject::new(
            libc::ENOTSUP,
            "DMA_UNMAP dirty bitmaps are not part of this protocol version",
        ));
    }
    if req.flags & !DMA_UNMAP_FLAG_ALL != 0 {
        return Err(Reject::inval(format!("DMA_UNMAP flags {:#x}", req.flags)));
    }
    if req.flags & DMA_UNMAP_FLAG_ALL != 0 {
        if req.address != 0 || req.size != 0 {
            return Err(Reject::inval("DMA_UNMAP all with a range"));
        }
        let entries = ctx.link.dma_map_mut().take_all();
        let mut backend = ctx.shared.backend();
        let mut failed = None;
        for (iova, e) in entries {
            if let Err(err) = backend.dma_unmap(iova, e.size) {
                tracing::warn!(iova, size = e.size, "Backend failed to unmap DMA: {err}");
                failed = Some(err);
            }
        }
        if let Some(err) = failed {
            return Err(err.into());
        }
    } else {
        let entry = {
            let mut map = ctx.link.dma_map_mut();
            match map.entries.get(&req.address) {
                Some(e) if e.size == req.size => map.entries.remove(&req.address),
                _ => None,
            }
        };
        if entry.is_none() {
            return Err(Reject::new(
                libc::ENOENT,
                format!(
                    "DMA_UNMAP {:#x}+{:#x} matches no mapping",
                    req.address, req.size
                ),
            ));
        }
        // The server's reference goes before the backend's; the mapping is gone once both are.
        drop(entry);
        ctx.shared.backend().dma_unmap(req.address, req.size)?;
    }
    Ok(Response::payload(req.as_slice().to_vec()))
}

/// Reads and writes client memory for the device.
///
/// Ranges that the client mapped with a file descriptor are copied directly; ranges mapped
/// without one go through `DMA_READ`/`DMA_WRITE` messages (split at the client's
/// `max_data_xfer_size`) that wait for the client's reply up to
/// [`crate::ServerConfig::dma_timeout`]. Callable from any thread, including from inside a
/// [`crate::Backend`] method and while holding the backend's lock: a waiting caller reads the
/// socket itself whenever the connection thread is not reading, so the reply is never stuck
/// behind a command waiting for that lock.
#[derive(Clone, Debug)]
pub struct DmaHandle {
    pub(crate) slot: Arc<Mutex<Option<Arc<Link>>>>,
}

impl DmaHandle {
    fn link(&self) -> Result<Arc<Link>, Error> {
        let link = self
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(Error::NotConnected)?;
        if link.client_max_xfer() == 0 {
            return Err(Error::NotConnected);
        }
        Ok(link)
    }

    /// Reads `buf.len()` bytes of client memory at `iova`.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), Error> {
        let link = self.link()?;
        let pieces = link.dma_map().pieces(iova, buf.len(), false)?;
        let mut done = 0;
        for p in pieces {
            let chunk = &mut buf[done..done + p.len];
            match &p.mapping {
                Some(m) => {
                    let offset = usize::try_from(p.offset).map_err(|_| Error::DmaBadReply)?;
                    let slice = m
                        .get_slice(offset, p.len)
                        .map_err(|_| Error::DmaNotMapped {
                            iova: p.iova,
                            len: p.len,
                        })?;
                    slice.copy_to(chunk);
                }
                None => read_msg(&link, p.iova, chunk)?,
            }
            done += p.len;
        }
        Ok(())
    }

    /// Writes `data` to client memory at `iova`.
    pub fn write(&self, iova: u64, data: &[u8]) -> Result<(), Error> {
        let link = self.link()?;
        let pieces = link.dma_map().pieces(iova, data.len(), true)?;
        let mut done = 0;
        for p in pieces {
            let chunk = &data[done..done + p.len];
            match &p.mapping {
                Some(m) => {
                    let offset = usize::try_from(p.offset).map_err(|_| Error::DmaBadReply)?;
                    let slice = m
                        .get_slice(offset, p.len)
                        .map_err(|_| Error::DmaNotMapped {
                            iova: p.iova,
                            len: p.len,
                        })?;
                    slice.copy_from(chunk);
                }
                None => write_msg(&link, p.iova, chunk)?,
            }
            done += p.len;
        }
        Ok(())
    }
}

/// `DMA_READ` messages for `buf`.
fn read_msg(link: &Link, iova: u64, buf: &mut [u8]) -> Result<(), Error> {
    let step = link.chunk_size();
    let data_off = link.layout().data_offset();
    let mut addr = iova;
    for chunk in buf.chunks_mut(step) {
        let count = u64::try_from(chunk.len()).map_err(|_| Error::DmaBadReply)?;
        let req = DmaAccess {
            address: addr,
            count,
        };
        let reply = link.request(command::DMA_READ, req.as_slice())?;
        if reply.header.flags & FLAG_ERROR != 0 {
            return Err(Error::DmaRejected(reply.header.error));
        }
        let echo: DmaAccess = read_struct(reply.payload()).ok_or(Error::DmaBadReply)?;
        // QEMU's layout carries a 32-bit count; compare what both layouts agree on.
        if echo.address != addr
            || echo.count & 0xffff_ffff != count
            || reply.payload().len() != 16 + chunk.len()
        {
            return Err(Error::DmaBadReply);
        }
        let data = reply
            .payload()
            .get(data_off..data_off + chunk.len())
            .ok_or(Error::DmaBadReply)?;
        chunk.copy_from_slice(data);
        addr += count;
    }
    Ok(())
}

/// `DMA_WRITE` messages for `data`.
fn write_msg(link: &Link, iova: u64, data: &[u8]) -> Result<(), Error> {
    let step = link.chunk_size();
    let data_off = link.layout().data_offset();
    let mut addr = iova;
    for chunk in data.chunks(step) {
        let count = u64::try_from(chunk.len()).map_err(|_| Error::DmaBadReply)?;
        let req = DmaAccess {
            address: addr,
            count,
        };
        let mut payload = vec![0u8; 16 + chunk.len()];
        payload[..16].copy_from_slice(req.as_slice());
        payload[data_off..data_off + chunk.len()].copy_from_slice(chunk);
        let reply = link.request(command::DMA_WRITE, &payload)?;
        if reply.header.flags & FLAG_ERROR != 0 {
            return Err(Error::DmaRejected(reply.header.error));
        }
        let echo_addr: u64 = read_struct(reply.payload()).ok_or(Error::DmaBadReply)?;
        if echo_addr != addr {
            return Err(Error::DmaBadReply);
        }
        addr += count;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(size: u64) -> DmaEntry {
        DmaEntry {
            size,
            mapping: None,
            readable: true,
            writable: false,
        }
    }

    #[test]
    fn test_dma_map_overlap_detection() {
        let mut m = DmaMap::default();
        m.entries.insert(0x1000, entry(0x2000));
        assert!(m.overlaps(0x0, 0x2000));
        assert!(m.overlaps(0x2000, 0x3000));
        assert!(m.overlaps(0x0, u64::MAX));
        assert!(!m.overlaps(0x0, 0x1000));
        assert!(!m.overlaps(0x3000, 0x4000));
    }

    #[test]
    fn test_dma_pieces_span_adjacent_and_check_permissions() {
        let mut m = DmaMap::default();
        m.entries.insert(0x1000, entry(0x1000));
        m.entries.insert(0x2000, entry(0x1000));
        let p = m.pieces(0x1800, 0x1000, false).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].iova, p[0].len, p[0].offset), (0x1800, 0x800, 0x800));
        assert_eq!((p[1].iova, p[1].len, p[1].offset), (0x2000, 0x800, 0));
        assert!(matches!(
            m.pieces(0x1800, 0x1000, true),
            Err(Error::DmaPermission { .. })
        ));
        assert!(matches!(
            m.pieces(0x2800, 0x1000, false),
            Err(Error::DmaNotMapped { .. })
        ));
        assert!(matches!(
            m.pieces(u64::MAX, 2, false),
            Err(Error::DmaNotMapped { .. })
        ));
    }
}
