//! Migration v2 over `DEVICE_FEATURE` (`MIGRATION`, `MIG_DEVICE_STATE`, DMA logging) and the
//! `MIG_DATA_READ`/`MIG_DATA_WRITE` stream.
//!
//! State machine (version 2 of the kernel's, without the P2P states). Direct arcs:
//! `RUNNING↔STOP`, `RUNNING↔PRE_COPY`, `PRE_COPY→STOP_COPY`, `STOP↔STOP_COPY`, `STOP↔RESUMING`
//! (arcs touching `PRE_COPY` only when the device offers `VFIO_MIGRATION_PRE_COPY`). Any other
//! request walks the shortest path whose interior avoids the saving states (`PRE_COPY`,
//! `STOP_COPY`), calling [`crate::Backend::migration_transition`] once per arc.
//! `STOP_COPY→PRE_COPY` is refused, `ERROR` cannot be requested, and nothing but
//! `DEVICE_RESET` (which returns to `RUNNING`) leaves `ERROR`; a failing arc moves the device to
//! `ERROR`. Migration data flows only in the saving states (read) and in `RESUMING` (write).

use std::collections::VecDeque;

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MASK,
    VFIO_DEVICE_FEATURE_MIGRATION, VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET, VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY,
};
use vm_memory::ByteValued;

use crate::backend::{Backend, MigState};
use crate::connection::{Ctx, Response};
use crate::error::Reject;
use crate::version::PAGE_SIZE;
use crate::wire::{
    read_struct, Feature, LoggingControl, LoggingRange, LoggingReport, MigData, MigDeviceState,
    MigrationFeature,
};

impl MigState {
    /// The state's `VFIO_DEVICE_STATE_*` number.
    pub fn raw(self) -> u32 {
        match self {
            MigState::Error => 0,
            MigState::Stop => 1,
            MigState::Running => 2,
            MigState::StopCopy => 3,
            MigState::Resuming => 4,
            MigState::PreCopy => 6,
        }
    }

    /// The state numbered `raw` (`None` for the P2P states and unknown numbers).
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => MigState::Error,
            1 => MigState::Stop,
            2 => MigState::Running,
            3 => MigState::StopCopy,
            4 => MigState::Resuming,
            6 => MigState::PreCopy,
            _ => return None,
        })
    }

    fn saving(self) -> bool {
        matches!(self, MigState::PreCopy | MigState::StopCopy)
    }
}

/// Device-level migration state; it outlives connections.
#[derive(Debug)]
pub(crate) struct MigrationState {
    /// The current state.
    pub state: MigState,
    /// Whether DMA logging is running.
    pub logging: bool,
}

impl Default for MigrationState {
    fn default() -> Self {
        MigrationState {
            state: MigState::Running,
            logging: false,
        }
    }
}

/// Direct arcs out of `from`.
fn arcs(from: MigState, pre_copy: bool) -> &'static [MigState] {
    use MigState::*;
    match from {
        Running if pre_copy => &[Stop, PreCopy],
        Running => &[Stop],
        Stop => &[Running, StopCopy, Resuming],
        PreCopy if pre_copy => &[Running, StopCopy],
        StopCopy => &[Stop],
        Resuming => &[Stop],
        PreCopy | Error => &[],
    }
}

/// The states visited from `from` to `to` (excluding `from`), or `None` when not allowed.
pub(crate) fn path(from: MigState, to: MigState, pre_copy: bool) -> Option<Vec<MigState>> {
    if from == MigState::Error || to == MigState::Error {
        return None;
    }
    if (to == MigState::PreCopy || from == MigState::PreCopy) && !pre_copy {
        return None;
    }
    if from == MigState::StopCopy && to == MigState::PreCopy {
        return None;
    }
    if from == to {
        return Some(Vec::new());
    }
    // Breadth-first search over at most six states; saving states are never passed through.
    let mut prev: [Option<MigState>; 8] = [None; 8];
    let mut queue = VecDeque::from([from]);
    while let Some(s) = queue.pop_front() {
        if s != from && s.saving() {
            continue;
        }
        for &next in arcs(s, pre_copy) {
            let slot = next.raw() as usize;
            if next == from || prev[slot].is_some() {
                continue;
            }
            prev[slot] = Some(s);
            if next == to {
                let mut states = vec![to];
                let mut cur = s;
                while cur != from {
                    states.push(cur);
                    cur = prev[cur.raw() as usize]?;
                }
                states.reverse();
                return Some(states);
            }
            queue.push_back(next);
        }
    }
    None
}

/// What `flags` asks of a feature.
struct Request {
    feature: u32,
    get: bool,
    set: bool,
    probe: bool,
}

/// `DEVICE_FEATURE`.
pub(crate) fn handle_feature(ctx: &Ctx<'_>, payload: &[u8]) -> Result<Response, Reject> {
    let head: Feature =
        read_struct(payload).ok_or_else(|| Reject::inval("DEVICE_FEATURE payload too short"))?;
    let known = VFIO_DEVICE_FEATURE_MASK
        | VFIO_DEVICE_FEATURE_GET
        | VFIO_DEVICE_FEATURE_SET
        | VFIO_DEVICE_FEATURE_PROBE;
    if head.flags & !known != 0 {
        return Err(Reject::inval(format!(
            "DEVICE_FEATURE flags {:#x}",
            head.flags
        )));
    }
    if (head.argsz as usize) < std::mem::size_of::<Feature>() {
        return Err(Reject::inval(format!(
            "DEVICE_FEATURE argsz {}",
            head.argsz
        )));
    }
    let req = Request {
        feature: head.flags & VFIO_DEVICE_FEATURE_MASK,
        get: head.flags & VFIO_DEVICE_FEATURE_GET != 0,
        set: head.flags & VFIO_DEVICE_FEATURE_SET != 0,
        probe: head.flags & VFIO_DEVICE_FEATURE_PROBE != 0,
    };
    let data = &payload[std::mem::size_of::<Feature>()..];
    let mut mig = ctx.shared.migration();
    let mut backend = ctx.shared.backend();
    let migration_flags = backend.migration_flags();
    let migrates = migration_flags & u64::from(VFIO_MIGRATION_STOP_COPY) != 0;
    let (can_get, can_set, supported) = match req.feature {
        VFIO_DEVICE_FEATURE_MIGRATION => (true, false, migrates),
        VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE => (true, true, migrates),
        VFIO_DEVICE_FEATURE_DMA_LOGGING_START | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP => {
            (false, true, backend.dma_logging_supported())
        }
        VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT => (true, false, backend.dma_logging_supported()),
        _ => (false, false, false),
    };
    if !supported {
        return Err(Reject::new(
            libc::ENOTSUP,
            format!("device feature {} not supported", req.feature),
        ));
    }
    if req.probe {
        if (req.get && !can_get) || (req.set && !can_set) {
            return Err(Reject::new(
                libc::ENOTSUP,
                format!("device feature {}: method not supported", req.feature),
            ));
        }
        return Ok(Response::payload(payload.to_vec()));
    }
    if req.get == req.set || (req.get && !can_get) || (req.set && !can_set) {
        return Err(Reject::inval(format!(
            "device feature {}: flags {:#x}",
            req.feature, head.flags
        )));
    }
    let pre_copy = migration_flags & u64::from(VFIO_MIGRATION_PRE_COPY) != 0;
    match req.feature {
        VFIO_DEVICE_FEATURE_MIGRATION => {
            let body = MigrationFeature {
                flags: migration_flags,
            };
            Ok(get_reply(head, body.as_slice())?)
        }
        VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE if req.get => {
            let body = MigDeviceState {
                device_state: mig.state.raw(),
                data_fd: u32::MAX,
            };
            Ok(get_reply(head, body.as_slice())?)
        }
        VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE => {
            let want: MigDeviceState = read_struct(data)
                .ok_or_else(|| Reject::inval("MIG_DEVICE_STATE data too short"))?;
            let target = MigState::from_raw(want.device_state)
                .ok_or_else(|| Reject::inval(format!("device state {}", want.device_state)))?;
            transition(&mut mig.state, target, pre_copy, &mut *backend)?;
            Ok(Response::payload(payload.to_vec()))
        }
        VFIO_DEVICE_FEATURE_DMA_LOGGING_START => {
            logging_start(&mut mig, &mut *backend, data)?;
            Ok(Response::payload(payload.to_vec()))
        }
        VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP => {
            if mig.logging {
                backend.dma_logging_stop()?;
                mig.logging = false;
            }
            Ok(Response::payload(payload.to_vec()))
        }
        _ => logging_report(ctx, &mig, &mut *backend, head, data),
    }
}

/// A `GET` reply: the feature header with `argsz` covering `body`, then `body`.
fn get_reply(head: Feature, body: &[u8]) -> Result<Response, Reject> {
    let size = std::mem::size_of::<Feature>() + body.len();
    if (head.argsz as usize) < size {
        return Err(Reject::inval(format!(
            "DEVICE_FEATURE argsz {} < {size}",
            head.argsz
        )));
    }
    let reply_head = Feature {
        argsz: u32::try_from(size).map_err(|_| Reject::inval("reply too large"))?,
        flags: head.flags,
    };
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(reply_head.as_slice());
    out.extend_from_slice(body);
    Ok(Response::payload(out))
}

/// Walks from `*state` to `target` arc by arc.
fn transition(
    state: &mut MigState,
    target: MigState,
    pre_copy: bool,
    backend: &mut dyn Backend,
) -> Result<(), Reject> {
    let steps = path(*state, target, pre_copy).ok_or_else(|| {
        Reject::inval(format!(
            "migration state {:?} -> {target:?} not allowed",
            *state
        ))
    })?;
    for next in steps {
        if let Err(e) = backend.migration_transition(*state, next) {
            tracing::warn!("Migration arc {:?} -> {next:?} failed: {e}", *state);
            *state = MigState::Error;
            return Err(e.into());
        }
        *state = next;
    }
    Ok(())
}

/// Validates a DMA-logging page size: a power of two of at least 4 KiB.
fn check_page_size(page_size: u64) -> Result<(), Reject> {
    if page_size < PAGE_SIZE || !page_size.is_power_of_two() {
        return Err(Reject::inval(format!(
            "DMA logging page size {page_size:#x}"
        )));
    }
    Ok(())
}

/// `DMA_LOGGING_START`.
fn logging_start(
    mig: &mut MigrationState,
    backend: &mut dyn Backend,
    data: &[u8],
) -> Result<(), Reject> {
    let control: LoggingControl =
        read_struct(data).ok_or_else(|| Reject::inval("DMA_LOGGING_START data too short"))?;
    check_page_size(control.page_size)?;
    let head = std::mem::size_of::<LoggingControl>();
    let entry = std::mem::size_of::<LoggingRange>();
    let need = (control.num_ranges as usize)
        .checked_mul(entry)
        .and_then(|n| n.checked_add(head))
        .ok_or_else(|| Reject::inval("DMA_LOGGING_START range count overflows"))?;
    if data.len() < need {
        return Err(Reject::inval(format!(
            "DMA_LOGGING_START announces {} ranges, carries {} bytes",
            control.num_ranges,
            data.len()
        )));
    }
    if mig.logging {
        return Err(Reject::new(libc::EBUSY, "DMA logging already started"));
    }
    // `num_ranges` is bounded by the message size checked above.
    let mut ranges = Vec::with_capacity(control.num_ranges as usize);
    for raw in data[head..need].chunks_exact(entry) {
        let r: LoggingRange =
            read_struct(raw).ok_or_else(|| Reject::inval("DMA_LOGGING_START range"))?;
        if r.length == 0
            || !r.iova.is_multiple_of(control.page_size)
            || !r.length.is_multiple_of(control.page_size)
            || r.iova.checked_add(r.length).is_none()
        {
            return Err(Reject::inval(format!(
                "DMA logging range {:#x}+{:#x}",
                r.iova, r.length
            )));
        }
        ranges.push((r.iova, r.length));
    }
    ranges.sort_unstable();
    if ranges.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
        return Err(Reject::inval("DMA logging ranges overlap"));
    }
    backend.dma_logging_start(control.page_size, &ranges)?;
    mig.logging = true;
    Ok(())
}

/// `DMA_LOGGING_REPORT`: the request data followed by the bitmap.
fn logging_report(
    ctx: &Ctx<'_>,
    mig: &MigrationState,
    backend: &mut dyn Backend,
    head: Feature,
    data: &[u8],
) -> Result<Response, Reject> {
    let req: LoggingReport =
        read_struct(data).ok_or_else(|| Reject::inval("DMA_LOGGING_REPORT data too short"))?;
    if !mig.logging {
        return Err(Reject::inval("DMA logging not started"));
    }
    check_page_size(req.page_size)?;
    if req.length == 0 || req.iova.checked_add(req.length).is_none() {
        return Err(Reject::inval(format!(
            "DMA logging report {:#x}+{:#x}",
            req.iova, req.length
        )));
    }
    let pages = req.length.div_ceil(req.page_size);
    let words = pages.div_ceil(64);
    let bytes = words.saturating_mul(8);
    let cfg = &ctx.shared.config;
    let limit = cfg.max_bitmap_size.min(u64::from(cfg.max_data_xfer_size));
    if bytes > limit {
        return Err(Reject::new(
            libc::E2BIG,
            format!("DMA logging bitmap of {bytes} bytes exceeds {limit}"),
        ));
    }
    let words = usize::try_from(words).map_err(|_| Reject::new(libc::E2BIG, "bitmap"))?;
    // Bounded by `limit` above.
    let mut bitmap = vec![0u64; words];
    backend.dma_logging_report(req.iova, req.length, req.page_size, &mut bitmap)?;
    let tail = pages % 64;
    if tail != 0 {
        if let Some(last) = bitmap.last_mut() {
            *last &= (1u64 << tail) - 1;
        }
    }
    let mut body = Vec::with_capacity(std::mem::size_of::<LoggingReport>() + words * 8);
    body.extend_from_slice(req.as_slice());
    for w in &bitmap {
        body.extend_from_slice(&w.to_ne_bytes());
    }
    get_reply(head, &body)
}

/// `MIG_DATA_READ`: allowed in `PRE_COPY` and `STOP_COPY`.
pub(crate) fn handle_data_read(ctx: &Ctx<'_>, payload: &[u8]) -> Result<Response, Reject> {
    let req: MigData =
        read_struct(payload).ok_or_else(|| Reject::inval("MIG_DATA_READ payload too short"))?;
    if req.size > ctx.shared.config.max_data_xfer_size {
        return Err(Reject::inval(format!(
            "MIG_DATA_READ of {} bytes",
            req.size
        )));
    }
    let head = std::mem::size_of::<MigData>();
    if (req.argsz as usize) < head + req.size as usize {
        return Err(Reject::inval(format!(
            "MIG_DATA_READ argsz {} for {} bytes",
            req.argsz, req.size
        )));
    }
    let mig = ctx.shared.migration();
    if !mig.state.saving() {
        return Err(Reject::inval(format!(
            "MIG_DATA_READ in state {:?}",
            mig.state
        )));
    }
    let data = ctx.shared.backend().migration_read(req.size as usize)?;
    if data.len() > req.size as usize {
        return Err(Reject::new(
            libc::EIO,
            "backend returned more migration data than asked",
        ));
    }
    let size = u32::try_from(data.len()).map_err(|_| Reject::new(libc::EIO, "size"))?;
    let reply = MigData {
        argsz: u32::try_from(head + data.len()).map_err(|_| Reject::new(libc::EIO, "size"))?,
        size,
    };
    let mut out = Vec::with_capacity(head + data.len());
    out.extend_from_slice(reply.as_slice());
    out.extend_from_slice(&data);
    Ok(Response::payload(out))
}

/// `MIG_DATA_WRITE`: allowed in `RESUMING`.
pub(crate) fn handle_data_write(ctx: &Ctx<'_>, payload: &[u8]) -> Result<Response, Reject> {
    let req: MigData =
        read_struct(payload).ok_or_else(|| Reject::inval("MIG_DATA_WRITE payload too short"))?;
    let head = std::mem::size_of::<MigData>();
    if req.size > ctx.shared.config.max_data_xfer_size || payload.len() != head + req.size as usize
    {
        return Err(Reject::inval(format!(
            "MIG_DATA_WRITE of {} bytes in a {}-byte payload",
            req.size,
            payload.len()
        )));
    }
    let mig = ctx.shared.migration();
    if mig.state != MigState::Resuming {
        return Err(Reject::inval(format!(
            "MIG_DATA_WRITE in state {:?}",
            mig.state
        )));
    }
    ctx.shared.backend().migration_write(&payload[head..])?;
    Ok(Response::empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use MigState::*;

    #[test]
    fn test_path_direct_arcs_single_step() {
        for (a, b) in [
            (Running, Stop),
            (Stop, Running),
            (Running, PreCopy),
            (PreCopy, Running),
            (PreCopy, StopCopy),
            (Stop, StopCopy),
            (StopCopy, Stop),
            (Stop, Resuming),
            (Resuming, Stop),
        ] {
            assert_eq!(path(a, b, true), Some(vec![b]), "{a:?} -> {b:?}");
        }
    }

    #[test]
    fn test_path_multi_step_avoids_saving_interior() {
        assert_eq!(path(Running, StopCopy, true), Some(vec![Stop, StopCopy]));
        assert_eq!(path(Running, Resuming, true), Some(vec![Stop, Resuming]));
        assert_eq!(path(PreCopy, Stop, true), Some(vec![Running, Stop]));
        assert_eq!(
            path(PreCopy, Resuming, true),
            Some(vec![Running, Stop, Resuming])
        );
        assert_eq!(path(StopCopy, Running, true), Some(vec![Stop, Running]));
        assert_eq!(path(Resuming, Running, true), Some(vec![Stop, Running]));
        assert_eq!(
            path(Resuming, PreCopy, true),
            Some(vec![Stop, Running, PreCopy])
        );
        assert_eq!(path(Stop, PreCopy, true), Some(vec![Running, PreCopy]));
        assert_eq!(path(Resuming, StopCopy, true), Some(vec![Stop, StopCopy]));
    }

    #[test]
    fn test_path_invalid_requests_none() {
        assert_eq!(path(StopCopy, PreCopy, true), None);
        assert_eq!(path(Running, Error, true), None);
        assert_eq!(path(Error, Running, true), None);
        assert_eq!(path(Running, PreCopy, false), None);
        assert_eq!(path(Stop, Stop, true), Some(vec![]));
    }

    #[test]
    fn test_state_raw_roundtrip() {
        for s in [Error, Stop, Running, StopCopy, Resuming, PreCopy] {
            assert_eq!(MigState::from_raw(s.raw()), Some(s));
        }
        assert_eq!(MigState::from_raw(5), None);
        assert_eq!(MigState::from_raw(7), None);
        assert_eq!(MigState::from_raw(99), None);
    }
}
