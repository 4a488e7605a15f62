//! Device description and control: `DEVICE_GET_INFO`, `DEVICE_GET_REGION_INFO`,
//! `DEVICE_GET_REGION_IO_FDS`, `DEVICE_GET_IRQ_INFO`, `DEVICE_SET_IRQS`, `DEVICE_RESET`.

use std::fs::File;
use std::mem::size_of;
use std::os::fd::{BorrowedFd, OwnedFd};

use vfio_bindings::bindings::vfio::{
    vfio_info_cap_header, vfio_region_info, vfio_region_sparse_mmap_area, VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_INFO_MASKABLE, VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_TYPE_MASK, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_BOOL,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_DATA_TYPE_MASK,
    VFIO_REGION_INFO_CAP_SPARSE_MMAP, VFIO_REGION_INFO_FLAG_CAPS, VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vm_memory::ByteValued;

use crate::backend::MigState;
use crate::connection::{Ctx, Response};
use crate::error::Reject;
use crate::wire::{
    read_struct, wire_size, CapHeader, DeviceInfo, IrqInfo, IrqSet, RegionInfo, RegionIoFds,
    SparseArea, SparseMmap,
};

/// `VFIO_REGION_INFO_CAP_SPARSE_MMAP` as the capability header's `u16` id.
const SPARSE_MMAP_CAP_ID: u16 = 1;
const _: () = assert!(SPARSE_MMAP_CAP_ID as u32 == VFIO_REGION_INFO_CAP_SPARSE_MMAP);

/// `DEVICE_GET_INFO`.
pub(crate) fn handle_get_info(ctx: &Ctx<'_>, payload: &[u8]) -> Result<Response, Reject> {
    let req: DeviceInfo =
        read_struct(payload).ok_or_else(|| Reject::inval("DEVICE_GET_INFO payload too short"))?;
    if (req.argsz as usize) < size_of::<DeviceInfo>() {
        return Err(Reject::inval(format!(
            "DEVICE_GET_INFO argsz {}",
            req.argsz
        )));
    }
    let info = ctx.shared.backend().device_info();
    let reply = DeviceInfo {
        argsz: wire_size::<DeviceInfo>(),
        flags: info.flags,
        num_regions: info.num_regions,
        num_irqs: info.num_irqs,
    };
    Ok(Response::payload(reply.as_slice().to_vec()))
}

/// `DEVICE_GET_REGION_INFO`, with the sparse-mmap capability and the region's file descriptor
/// when everything fits in the client's `argsz`; otherwise the fixed part alone with the `argsz`
/// needed (no `CAPS` flag and no descriptor, so the client asks again).
pub(crate) fn handle_get_region_info(ctx: &Ctx<'_>, payload: &[u8]) -> Result<Response, Reject> {
    let req: RegionInfo = read_struct(payload)
        .ok_or_else(|| Reject::inval("DEVICE_GET_REGION_INFO payload too short"))?;
    let fixed = size_of::<vfio_region_info>();
    if (req.0.argsz as usize) < fixed {
        return Err(Reject::inval(format!(
            "DEVICE_GET_REGION_INFO argsz {}",
            req.0.argsz
        )));
    }
    let index = req.0.index;
    let (region, fd) = {
        let backend = ctx.shared.backend();
        if index >= backend.device_info().num_regions {
            return Err(Reject::inval(format!("region {index} does not exist")));
        }
        let region = backend.region_info(index);
        // Duplicate the backend's descriptor while it is guaranteed open (under the lock).
        let fd = match region.mmap {
            Some((raw, _)) if region.flags & VFIO_REGION_INFO_FLAG_MMAP != 0 => {
                if raw < 0 {
                    return Err(Reject::new(libc::EIO, format!("region {index}: bad fd")));
                }
                // SAFETY: the backend guarantees `raw` is an open descriptor it owns for as
                // long as its lock is held, and we only duplicate it here.
                let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
                let owned = borrowed.try_clone_to_owned().map_err(|e| {
                    Reject::new(
                        e.raw_os_error().unwrap_or(libc::EIO),
                        format!("region {index}: cannot duplicate its fd"),
                    )
                })?;
                Some(owned)
            }
            _ => None,
        };
        (region, fd)
    };
    let mut flags = region.flags
        & (VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE | VFIO_REGION_INFO_FLAG_MMAP);
    let mut mmap_offset = 0;
    if fd.is_none() {
        if flags & VFIO_REGION_INFO_FLAG_MMAP != 0 {
            tracing::warn!(
                index,
                "Backend region is MMAP without a file; not offering mmap"
            );
        }
        flags &= !VFIO_REGION_INFO_FLAG_MMAP;
    } else if let Some((_, off)) = region.mmap {
        mmap_offset = off;
    }
    let areas: Vec<(u64, u64)> = if fd.is_some() {
        region
            .sparse_areas
            .iter()
            .copied()
            .filter(|&(off, len)| {
                let ok = len > 0 && off.checked_add(len).is_some_and(|end| end <= region.size);
                if !ok {
                    tracing::warn!(index, off, len, "Dropping sparse area outside the region");
                }
                ok
            })
            .collect()
    } else {
        Vec::new()
    };
    let caps = sparse_cap(&areas);
    let full = fixed + caps.len();
    let full_argsz = u32::try_from(full).map_err(|_| Reject::new(libc::EIO, "too many areas"))?;
    let fits = req.0.argsz as usize >= full;
    let mut info = vfio_region_info {
        argsz: full_argsz,
        flags,
        index,
        cap_offset: 0,
        size: region.size,
        offset: mmap_offset,
    };
    if !fits {
        // `vfio_user::Client` and QEMU both ask again with the `argsz` given here.
        return Ok(Response::payload(RegionInfo(info).as_slice().to_vec()));
    }
    if !caps.is_empty() {
        info.flags |= VFIO_REGION_INFO_FLAG_CAPS;
        info.cap_offset = wire_size::<vfio_region_info>();
    }
    let mut out = Vec::with_capacity(full);
    out.extend_from_slice(RegionInfo(info).as_slice());
    out.extend_from_slice(&caps);
    Ok(Response {
        payload: out,
        fds: fd.into_iter().collect(),
    })
}

/// The sparse-mmap capability for `areas` (empty when there are none).
fn sparse_cap(areas: &[(u64, u64)]) -> Vec<u8> {
    if areas.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(16 + areas.len() * 16);
    let header = CapHeader(vfio_info_cap_header {
        id: SPARSE_MMAP_CAP_ID,
        version: 1,
        next: 0,
    });
    out.extend_from_slice(header.as_slice());
    let sparse = SparseMmap {
        nr_areas: u32::try_from(areas.len()).unwrap_or(u32::MAX),
        reserved: 0,
    };
    out.extend_from_slice(sparse.as_slice());
    for &(offset, size) in areas {
        out.extend_from_slice(SparseArea(vfio_region_sparse_mmap_area { offset, size }).as_slice());
    }
    out
}

/// `DEVICE_GET_REGION_IO_FDS`: supported, with no sub-regions and no descriptors.
pub(crate) fn handle_get_region_io_fds(ctx: &Ctx<'_>, payload: &[u8]) -> Result<Response, Reject> {
    let req: RegionIoFds = read_struct(payload)
        .ok_or_else(|| Reject::inval("DEVICE_GET_REGION_IO_FDS payload too short"))?;
    if (req.argsz as usize) < size_of::<RegionIoFds>() || req.flags != 0 {
        return Err(Reject::inval(format!(
            "DEVICE_GET_REGION_IO_FDS argsz {} flags {:#x}",
            req.argsz, req.flags
        )));
    }
    if req.index >= ctx.shared.backend().device_info().num_regions {
        return Err(Reject::inval(format!(
            "region {} does not exist",
            req.index
        )));
    }
    let reply = RegionIoFds {
        argsz: wire_size::<RegionIoFds>(),
        flags: 0,
        index: req.index,
        count: 0,
    };
    Ok(Response::payload(reply.as_slice().to_vec()))
}

/// `DEVICE_GET_IRQ_INFO`.
pub(crate) fn handle_get_irq_info(ctx: &Ctx<'_>, payload: &[u8]) -> Result<Response, Reject> {
    let req: IrqInfo = read_struct(payload)
        .ok_or_else(|| Reject::inval("DEVICE_GET_IRQ_INFO payload too short"))?;
    if (req.0.argsz as usize) < size_of::<IrqInfo>() {
        return Err(Reject::inval(format!(
            "DEVICE_GET_IRQ_INFO argsz {}",
            req.0.argsz
        )));
    }
    let index = req.0.index;
    let info = {
        let backend = ctx.shared.backend();
        if index >= backend.device_info().num_irqs {
            return Err(Reject::inval(format!("IRQ index {index} does not exist")));
        }
        backend.irq_info(index)
    };
    let mut reply = IrqInfo::default();
    reply.0.argsz = wire_size::<IrqInfo>();
    reply.0.flags = info.flags;
    reply.0.index = index;
    reply.0.count = info.count;
    Ok(Response::payload(reply.as_slice().to_vec()))
}

/// `DEVICE_SET_IRQS`.
///
/// Exactly one data type and one action. `DATA_EVENTFD` takes one descriptor per vector, or
/// none at all to de-assign the vectors (QEMU sends runs of invalid descriptors that way; they
/// reach the backend as `None`). `DATA_BOOL` is applied as one `DATA_NONE` call per vector whose
/// byte is set. `start = count = 0` with `DATA_NONE | ACTION_TRIGGER` disables the whole index.
pub(crate) fn handle_set_irqs(
    ctx: &Ctx<'_>,
    payload: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<Response, Reject> {
    let req: IrqSet =
        read_struct(payload).ok_or_else(|| Reject::inval("DEVICE_SET_IRQS payload too short"))?;
    if (req.argsz as usize) < size_of::<IrqSet>() {
        return Err(Reject::inval(format!(
            "DEVICE_SET_IRQS argsz {}",
            req.argsz
        )));
    }
    let data_type = req.flags & VFIO_IRQ_SET_DATA_TYPE_MASK;
    let action = req.flags & VFIO_IRQ_SET_ACTION_TYPE_MASK;
    if req.flags & !(VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK) != 0
        || data_type.count_ones() != 1
        || action.count_ones() != 1
    {
        return Err(Reject::inval(format!(
            "DEVICE_SET_IRQS flags {:#x}",
            req.flags
        )));
    }
    if data_type != VFIO_IRQ_SET_DATA_EVENTFD && !fds.is_empty() {
        return Err(Reject::inval(format!(
            "DEVICE_SET_IRQS: {} fds without DATA_EVENTFD",
            fds.len()
        )));
    }
    let mut backend = ctx.shared.backend();
    if req.index >= backend.device_info().num_irqs {
        return Err(Reject::inval(format!(
            "IRQ index {} does not exist",
            req.index
        )));
    }
    let info = backend.irq_info(req.index);
    if req.count == 0 {
        if req.start != 0
            || data_type != VFIO_IRQ_SET_DATA_NONE
            || action != VFIO_IRQ_SET_ACTION_TRIGGER
        {
            return Err(Reject::inval("DEVICE_SET_IRQS with count 0"));
        }
        backend.set_irqs(req.index, action, 0, 0, Vec::new())?;
        return Ok(Response::empty());
    }
    if req
        .start
        .checked_add(req.count)
        .is_none_or(|end| end > info.count)
    {
        return Err(Reject::inval(format!(
            "DEVICE_SET_IRQS vectors {}+{} outside the index's {}",
            req.start, req.count, info.count
        )));
    }
    if matches!(
        action,
        VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK
    ) && info.flags & VFIO_IRQ_INFO_MASKABLE == 0
    {
        return Err(Reject::inval(format!(
            "IRQ index {} is not maskable",
            req.index
        )));
    }
    match data_type {
        VFIO_IRQ_SET_DATA_NONE => {
            backend.set_irqs(req.index, action, req.start, req.count, Vec::new())?;
        }
        VFIO_IRQ_SET_DATA_BOOL => {
            let bools = payload
                .get(size_of::<IrqSet>()..size_of::<IrqSet>() + req.count as usize)
                .ok_or_else(|| Reject::inval("DEVICE_SET_IRQS: missing DATA_BOOL bytes"))?;
            for (i, &b) in (req.start..).zip(bools) {
                if b != 0 {
                    backend.set_irqs(req.index, action, i, 1, Vec::new())?;
                }
            }
        }
        _ => {
            if info.flags & VFIO_IRQ_INFO_EVENTFD == 0 {
                return Err(Reject::inval(format!(
                    "IRQ index {} does not take eventfds",
                    req.index
                )));
            }
            let files: Vec<Option<File>> = if fds.is_empty() {
                // Bounded by the index's vector count (checked above).
                (0..req.count).map(|_| None).collect()
            } else if fds.len() == req.count as usize {
                fds.into_iter().map(|fd| Some(File::from(fd))).collect()
            } else {
                return Err(Reject::inval(format!(
                    "DEVICE_SET_IRQS: {} fds for {} vectors",
                    fds.len(),
                    req.count
                )));
            };
            backend.set_irqs(req.index, action, req.start, req.count, files)?;
        }
    }
    Ok(Response::empty())
}

/// `DEVICE_RESET`: resets the device; the migration state returns to `RUNNING`.
pub(crate) fn handle_reset(ctx: &Ctx<'_>) -> Result<Response, Reject> {
    let mut mig = ctx.shared.migration();
    ctx.shared.backend().reset()?;
    mig.state = MigState::Running;
    Ok(Response::empty())
}
