//! Region accesses: `REGION_READ`, `REGION_WRITE`, `REGION_WRITE_MULTI`.
//!
//! An access that names a missing region, leaves its region, lacks the region's read/write
//! permission, or fails in the backend is still answered normally — reads with `count` bytes of
//! all-ones, writes with their usual acknowledgement — and counted in
//! [`crate::ServerStats::bad_accesses`]: the `vfio_user` client (Cloud Hypervisor) never checks
//! the error bit and would lose track of the stream on a header-only error reply. Only malformed
//! messages (short payload, data length not matching `count`, `count` above
//! `max_data_xfer_size`) get error replies.

use std::mem::size_of;

use vfio_bindings::bindings::vfio::{VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE};
use vm_memory::ByteValued;

use crate::backend::{Backend, BackendError};
use crate::connection::{Ctx, Response};
use crate::error::Reject;
use crate::stats::bump;
use crate::wire::{read_struct, RegionAccess, WriteMulti, WriteOne};

/// Checks that `[offset, offset + count)` lies in region `index` and the region allows the
/// access.
fn check(
    backend: &dyn Backend,
    index: u32,
    offset: u64,
    count: u64,
    write: bool,
) -> Result<(), BackendError> {
    if index >= backend.device_info().num_regions {
        return Err(BackendError::Invalid(format!(
            "region {index} does not exist"
        )));
    }
    let info = backend.region_info(index);
    let need = if write {
        VFIO_REGION_INFO_FLAG_WRITE
    } else {
        VFIO_REGION_INFO_FLAG_READ
    };
    if info.flags & need == 0 {
        return Err(BackendError::Invalid(format!(
            "region {index} is not {}",
            if write { "writable" } else { "readable" }
        )));
    }
    if offset.checked_add(count).is_none_or(|end| end > info.size) {
        return Err(BackendError::Invalid(format!(
            "{offset:#x}+{count:#x} outside region {index} of {:#x} bytes",
            info.size
        )));
    }
    Ok(())
}

/// Records a failed access.
fn bad_access(ctx: &Ctx<'_>, what: &str, req: &RegionAccess, e: &BackendError) {
    if bump(&ctx.shared.stats.bad_accesses, 1) {
        tracing::warn!(
            region = req.region,
            offset = req.offset,
            count = req.count,
            "Bad region {what}: {e}"
        );
    }
}

/// `REGION_READ`.
pub(crate) fn handle_read(ctx: &Ctx<'_>, payload: &[u8]) -> Result<Response, Reject> {
    let req: RegionAccess =
        read_struct(payload).ok_or_else(|| Reject::inval("REGION_READ payload too short"))?;
    if req.count > ctx.shared.config.max_data_xfer_size {
        return Err(Reject::inval(format!("REGION_READ of {} bytes", req.count)));
    }
    let head = size_of::<RegionAccess>();
    // Bounded by `max_data_xfer_size` above.
    let mut out = vec![0xffu8; head + req.count as usize];
    out[..head].copy_from_slice(req.as_slice());
    if req.count > 0 {
        let data = &mut out[head..];
        let res = {
            let mut backend = ctx.shared.backend();
            check(
                &*backend,
                req.region,
                req.offset,
                u64::from(req.count),
                false,
            )
            .and_then(|()| backend.region_read(req.region, req.offset, data))
        };
        if let Err(e) = res {
            out[head..].fill(0xff);
            bad_access(ctx, "read", &req, &e);
        }
    }
    Ok(Response::payload(out))
}

/// `REGION_WRITE`.
pub(crate) fn handle_write(ctx: &Ctx<'_>, payload: &[u8]) -> Result<Response, Reject> {
    let req: RegionAccess =
        read_struct(payload).ok_or_else(|| Reject::inval("REGION_WRITE payload too short"))?;
    let head = size_of::<RegionAccess>();
    if req.count > ctx.shared.config.max_data_xfer_size
        || payload.len() - head != req.count as usize
    {
        return Err(Reject::inval(format!(
            "REGION_WRITE of {} bytes carries {}",
            req.count,
            payload.len() - head
        )));
    }
    if req.count > 0 {
        let data = &payload[head..];
        let res = {
            let mut backend = ctx.shared.backend();
            check(
                &*backend,
                req.region,
                req.offset,
                u64::from(req.count),
                true,
            )
            .and_then(|()| backend.region_write(req.region, req.offset, data))
        };
        if let Err(e) = res {
            bad_access(ctx, "write", &req, &e);
        }
    }
    Ok(Response::payload(req.as_slice().to_vec()))
}

/// `REGION_WRITE_MULTI` (only when negotiated): up to 8 bytes per write; the reply counts the
/// writes that succeeded.
pub(crate) fn handle_write_multi(ctx: &Ctx<'_>, payload: &[u8]) -> Result<Response, Reject> {
    if !ctx.negotiated.write_multiple {
        return Err(Reject::new(
            libc::ENOTSUP,
            "REGION_WRITE_MULTI was not negotiated",
        ));
    }
    let head: WriteMulti = read_struct(payload)
        .ok_or_else(|| Reject::inval("REGION_WRITE_MULTI payload too short"))?;
    let body = &payload[size_of::<WriteMulti>()..];
    let one = size_of::<WriteOne>();
    if usize::try_from(head.wr_cnt)
        .ok()
        .and_then(|n| n.checked_mul(one))
        != Some(body.len())
    {
        return Err(Reject::inval(format!(
            "REGION_WRITE_MULTI announces {} writes in {} bytes",
            head.wr_cnt,
            body.len()
        )));
    }
    let mut done = 0u64;
    let mut backend = ctx.shared.backend();
    for raw in body.chunks_exact(one) {
        let Some(w) = read_struct::<WriteOne>(raw) else {
            continue;
        };
        let req = RegionAccess {
            offset: w.offset,
            region: w.region,
            count: w.count,
        };
        let res = if w.count == 0 {
            Ok(())
        } else if w.count as usize > w.data.len() {
            Err(BackendError::Invalid(format!(
                "{} bytes in one multi-write",
                w.count
            )))
        } else {
            check(&*backend, w.region, w.offset, u64::from(w.count), true).and_then(|()| {
                backend.region_write(w.region, w.offset, &w.data[..w.count as usize])
            })
        };
        match res {
            Ok(()) => done += 1,
            Err(e) => bad_access(ctx, "multi-write", &req, &e),
        }
    }
    Ok(Response::payload(
        WriteMulti { wr_cnt: done }.as_slice().to_vec(),
    ))
}
