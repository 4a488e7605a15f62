//! Every API request becomes one [`ApiAction`], and [`dispatch`] is the one place that carries
//! actions out against the [`Daemon`] (Firecracker's `parsed_request.rs` → `VmmAction`). The
//! dispatcher blocks (it may scrub local memory or wait for an engine), so the server runs it
//! on the blocking thread pool, never on the async runtime. Its replies are serialized there
//! too.
//!
//! Adding an endpoint is a variant here, an arm in [`dispatch`], a handler and a line in
//! [`super::routes`].

use std::path::PathBuf;
use std::sync::{Arc, PoisonError};

use axum::http::StatusCode;
use serde::Serialize;
use vgpu_device::sched::SchedParams;
use vgpu_device::vgpu::{GttMode, VgpuShared};

use super::error::ApiError;
use super::migrations::Migrations;
use crate::daemon::{Daemon, DaemonError, VgpuSpec};
use crate::metrics::{self, ApiMetrics};
use crate::migrate::{restore_from_file_with, snapshot_to_file, MigrateError};
use crate::model::{
    AuditQuery, CreateVgpuRequest, DirtyLogQuery, DirtyLogRequest, DirtyLogState, DirtyPages,
    EngineName, EngineUpdate, IncomingRequest, MigrateRequest, RestoreRequest, SchedUpdate,
    SnapshotRequest, SnapshotResult, TraceQuery,
};

/// A vGPU named in a path: its decimal id or its name.
pub type VgpuKey = String;

/// One request, parsed.
#[derive(Clone, Debug, PartialEq)]
pub enum ApiAction {
    /// `GET /api/v1/gpu`.
    GetGpu,
    /// `GET /api/v1/profiles`.
    ListProfiles,
    /// `GET /api/v1/vgpus`.
    ListVgpus,
    /// `POST /api/v1/vgpus`.
    CreateVgpu(CreateVgpuRequest),
    /// `GET /api/v1/vgpus/{id}`.
    GetVgpu(VgpuKey),
    /// `DELETE /api/v1/vgpus/{id}`.
    DeleteVgpu {
        /// Which.
        key: VgpuKey,
        /// Disconnect an attached VMM first.
        force: bool,
    },
    /// `POST /api/v1/vgpus/{id}/pause`.
    PauseVgpu(VgpuKey),
    /// `POST /api/v1/vgpus/{id}/resume`.
    ResumeVgpu(VgpuKey),
    /// `POST /api/v1/vgpus/{id}/reset`.
    ResetVgpu(VgpuKey),
    /// `GET /api/v1/vgpus/{id}/sched`.
    GetSched(VgpuKey),
    /// `PUT /api/v1/vgpus/{id}/sched`.
    PutSched(VgpuKey, SchedUpdate),
    /// `GET /api/v1/vgpus/{id}/stats`.
    GetStats(VgpuKey),
    /// `GET /api/v1/stats`.
    ListStats,
    /// `GET /api/v1/vgpus/{id}/audit`.
    GetAudit(VgpuKey, AuditQuery),
    /// `GET /api/v1/vgpus/{id}/display`.
    GetDisplay(VgpuKey),
    /// `GET /api/v1/engines`.
    ListEngines,
    /// `PUT /api/v1/engines/{engine}`.
    PutEngine(EngineName, EngineUpdate),
    /// `GET /api/v1/scheduler/trace`.
    GetTrace(TraceQuery),
    /// `GET /metrics`.
    Metrics,
    /// `POST /api/v1/vgpus/{id}/snapshot`.
    SnapshotVgpu(VgpuKey, SnapshotRequest),
    /// `POST /api/v1/vgpus/restore`.
    RestoreVgpu(RestoreRequest),
    /// `POST /api/v1/vgpus/{id}/migrate`.
    MigrateVgpu(VgpuKey, MigrateRequest),
    /// `POST /api/v1/migrations/incoming`.
    StartIncoming(IncomingRequest),
    /// `GET /api/v1/migrations`.
    ListMigrations,
    /// `GET /api/v1/migrations/{mid}`.
    GetMigration(String),
    /// `DELETE /api/v1/migrations/{mid}`.
    CancelMigration(String),
    /// `POST /api/v1/vgpus/{id}/dirty-log`.
    SetDirtyLog(VgpuKey, DirtyLogRequest),
    /// `GET /api/v1/vgpus/{id}/dirty-log`.
    TakeDirtyLog(VgpuKey, DirtyLogQuery),
}

/// What the dispatcher works with: the daemon, the API's own metrics and the migrations
/// running in the background.
pub struct ApiContext {
    /// The daemon.
    pub daemon: Arc<Daemon>,
    /// Request counters and latencies.
    pub metrics: ApiMetrics,
    /// Outgoing and incoming migrations.
    pub migrations: Migrations,
}

/// What an action produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiReply {
    /// A JSON body (already serialized).
    Json(StatusCode, Vec<u8>),
    /// 204.
    NoContent,
    /// A PNG image.
    Png(Vec<u8>),
    /// The Prometheus text format.
    Metrics(String),
}

fn json(status: StatusCode, v: &impl Serialize) -> Result<ApiReply, ApiError> {
    serde_json::to_vec(v)
        .map(|b| ApiReply::Json(status, b))
        .map_err(|e| ApiError::internal(format!("Cannot serialize the reply: {e}")))
}

fn ok(v: &impl Serialize) -> Result<ApiReply, ApiError> {
    json(StatusCode::OK, v)
}

/// Encodes an RGBA8 frame as PNG.
pub fn encode_png(width: u32, height: u32, rgba: &[u8]) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgba);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Fast);
        let mut w = enc.write_header()?;
        w.write_image_data(rgba)?;
        w.finish()?;
    }
    Ok(out)
}

fn create(d: &Daemon, req: CreateVgpuRequest) -> Result<ApiReply, ApiError> {
    let spec = VgpuSpec {
        profile: req.profile.clone(),
        gtt: req.gtt.map_or(GttMode::Shadow, GttMode::from),
        name: req.name.clone(),
        weight: None,
    };
    let sched = match req.sched {
        None => None,
        Some(s) => {
            let p = vgpu_device::phys::profile(&req.profile)
                .ok_or_else(|| DaemonError::UnknownProfile(req.profile.clone()))?;
            Some(SchedParams {
                weight: s.weight.unwrap_or(p.default_weight),
                reserve_pct: s.reserve_pct.unwrap_or(0),
                cap_pct: s.cap_pct.unwrap_or(100),
            })
        }
    };
    let info = d.create_with(&spec, sched)?;
    json(StatusCode::CREATED, &info)
}

/// Bytes per page of the guest-RAM dirty log.
const DIRTY_PAGE: u64 = 4096;

/// Most pages one `GET …/dirty-log` returns.
pub const DIRTY_MAX_PAGES: usize = 1 << 20;

/// The log is taken in windows of this many bytes (at most 256 Ki pages each), so a reply
/// never exceeds [`DIRTY_MAX_PAGES`] and nothing taken is dropped.
const DIRTY_WINDOW: u64 = 1 << 30;

/// Most windows one request scans (64 TiB of guest-physical space).
const DIRTY_MAX_WINDOWS: u32 = 1 << 16;

/// An absolute path that names a file (not a directory). `field` names it in messages.
fn file_path(s: &str, field: &str) -> Result<PathBuf, ApiError> {
    let bad = |why: &str| ApiError::invalid("invalid_value", format!("Bad {field} '{s}': {why}"));
    let p = PathBuf::from(s);
    if !p.is_absolute() {
        return Err(bad(
            "the path must be absolute (vgpud does not share the client's working directory)",
        ));
    }
    if s.ends_with('/') || p.file_name().is_none() {
        return Err(bad("the path names no file"));
    }
    if p.is_dir() {
        return Err(bad("it is a directory"));
    }
    Ok(p)
}

fn shared_of(d: &Daemon, id: u32) -> Result<Arc<VgpuShared>, ApiError> {
    let v = d.vgpu(id).ok_or(DaemonError::UnknownVgpu(id))?;
    let shared = v
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .shared()
        .clone();
    Ok(shared)
}

fn set_dirty_log(d: &Daemon, id: u32, enabled: bool) -> Result<DirtyLogState, ApiError> {
    let shared = shared_of(d, id)?;
    match (enabled, shared.dirty.gpa_active()) {
        // Already on: keep what is logged (starting clears the log).
        (true, true) => {}
        (true, false) => shared.dirty.start_gpa(),
        (false, _) => shared.dirty.stop_gpa(),
    }
    tracing::info!(id, enabled, "guest-RAM dirty log");
    Ok(DirtyLogState {
        enabled: shared.dirty.gpa_active(),
    })
}

fn take_dirty_log(d: &Daemon, id: u32, q: DirtyLogQuery) -> Result<DirtyPages, ApiError> {
    if !q.gpa.is_multiple_of(DIRTY_PAGE) || !q.len.is_multiple_of(DIRTY_PAGE) {
        return Err(ApiError::invalid(
            "invalid_value",
            format!(
                "gpa {:#x} and len {:#x} must be multiples of {DIRTY_PAGE}",
                q.gpa, q.len
            ),
        ));
    }
    let end = q.gpa.checked_add(q.len).ok_or_else(|| {
        ApiError::invalid("invalid_value", "gpa + len is beyond the address space")
    })?;
    let shared = shared_of(d, id)?;
    if !shared.dirty.gpa_active() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "dirty_log_disabled",
            format!(
                "vGPU {id} does not log guest-RAM writes; enable it with POST \
                 /api/v1/vgpus/{id}/dirty-log {{\"enabled\":true}}"
            ),
        ));
    }
    let window_pages = usize::try_from(DIRTY_WINDOW / DIRTY_PAGE).unwrap_or(usize::MAX);
    let mut pages = Vec::new();
    let mut at = q.gpa;
    let mut windows = 0;
    while at < end
        && windows < DIRTY_MAX_WINDOWS
        && pages.len().saturating_add(window_pages) <= DIRTY_MAX_PAGES
    {
        let len = DIRTY_WINDOW.min(end - at);
        pages.extend(shared.dirty.take_gpa(at, len));
        at += len;
        windows += 1;
    }
    let more = at < end;
    Ok(DirtyPages {
        page_size: DIRTY_PAGE,
        pages,
        more,
        next_gpa: more.then_some(at),
    })
}

/// Maps a snapshot or restore failure.
fn migrate_error(e: MigrateError) -> ApiError {
    use vgpu_device::phys::{PhysError, Resource};
    let msg = super::error::chain(&e);
    match e {
        MigrateError::UnknownVgpu(_) => ApiError::not_found("vgpu_not_found", msg),
        MigrateError::Io { source, .. } => {
            use std::io::ErrorKind as K;
            match source.kind() {
                // A path the daemon cannot use is the request's fault, not the daemon's.
                K::NotFound
                | K::NotADirectory
                | K::IsADirectory
                | K::InvalidInput
                | K::PermissionDenied
                | K::ReadOnlyFilesystem => ApiError::invalid("invalid_value", msg),
                K::StorageFull | K::QuotaExceeded | K::FileTooLarge => ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "insufficient_storage",
                    format!("{msg} (any previous file at that path is intact)"),
                ),
                _ => {
                    tracing::error!(error = %msg, "snapshot I/O failed");
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "io_error", msg)
                }
            }
        }
        MigrateError::Snapshot(_) => ApiError::invalid("invalid_snapshot", msg),
        MigrateError::Daemon(DaemonError::Phys(PhysError::Exhausted {
            resource: Resource::MappableGm | Resource::HiddenGm,
            ..
        })) => ApiError::new(
            StatusCode::CONFLICT,
            "gm_range_taken",
            format!(
                "{msg} (the snapshot's graphics-memory ranges are not free on this daemon: \
                 another vGPU uses them)"
            ),
        ),
        MigrateError::Daemon(d) => ApiError {
            message: msg,
            ..ApiError::from(d)
        },
        MigrateError::Endpoint(_) => ApiError::invalid("invalid_value", msg),
        MigrateError::Source(_) | MigrateError::Destination(_) => ApiError::internal(msg),
    }
}

/// Carries out `action`. Blocking.
pub fn dispatch(ctx: &ApiContext, action: ApiAction) -> Result<ApiReply, ApiError> {
    let d = &*ctx.daemon;
    let api = &ctx.metrics;
    let id = |key: &str| d.resolve(key).map_err(ApiError::from);
    // A vGPU a migration holds must not change under it.
    let idle = |key: &str| {
        let id = id(key)?;
        ctx.migrations.check_idle(id).map(|()| id)
    };
    match action {
        ApiAction::GetGpu => ok(&d.gpu_info()),
        ApiAction::ListProfiles => ok(&d.profiles()),
        ApiAction::ListVgpus => ok(&d.list()),
        ApiAction::CreateVgpu(req) => create(d, req),
        ApiAction::GetVgpu(k) => ok(&d.info(id(&k)?)?),
        ApiAction::DeleteVgpu { key, force } => {
            d.remove(idle(&key)?, force)?;
            Ok(ApiReply::NoContent)
        }
        ApiAction::PauseVgpu(k) => ok(&d.pause(idle(&k)?)?),
        ApiAction::ResumeVgpu(k) => ok(&d.resume(idle(&k)?)?),
        ApiAction::ResetVgpu(k) => ok(&d.reset(idle(&k)?)?),
        ApiAction::GetSched(k) => ok(&d.sched(id(&k)?)?),
        ApiAction::PutSched(k, upd) => ok(&d.set_sched(id(&k)?, &upd)?),
        ApiAction::GetStats(k) => ok(&d.stats(id(&k)?)?),
        ApiAction::ListStats => ok(&d.all_stats()),
        ApiAction::GetAudit(k, q) => {
            if q.limit == Some(0) {
                return Err(ApiError::invalid(
                    "invalid_value",
                    "limit must be at least 1",
                ));
            }
            ok(&d.audit(id(&k)?, &q)?)
        }
        ApiAction::GetDisplay(k) => {
            let f = d.display(id(&k)?)?;
            let png = encode_png(f.width, f.height, &f.rgba)
                .map_err(|e| ApiError::internal(format!("Cannot encode the frame: {e}")))?;
            Ok(ApiReply::Png(png))
        }
        ApiAction::ListEngines => ok(&d.engines()),
        ApiAction::PutEngine(e, upd) => ok(&d.set_policy(e, upd.policy)),
        ApiAction::GetTrace(q) => ok(&d.trace(&q)),
        ApiAction::Metrics => Ok(ApiReply::Metrics(metrics::render(d, api))),
        ApiAction::SnapshotVgpu(k, req) => {
            let path = file_path(&req.path, "path")?;
            let vid = idle(&k)?;
            let s = snapshot_to_file(d, vid, &path).map_err(|e| match e {
                // Saving or encoding our own state failed: not the client's fault.
                MigrateError::Snapshot(_) => ApiError::internal(super::error::chain(&e)),
                e => migrate_error(e),
            })?;
            tracing::info!(id = vid, path = %s.path.display(), bytes = s.bytes, "vGPU snapshot written");
            ok(&SnapshotResult {
                path: s.path,
                bytes: s.bytes,
                paused_us: s.paused_us,
            })
        }
        ApiAction::RestoreVgpu(req) => {
            let path = file_path(&req.path, "path")?;
            let resume = !req.paused.unwrap_or(false);
            let info =
                restore_from_file_with(d, &path, req.name, req.gtt.map(GttMode::from), resume)
                    .map_err(migrate_error)?;
            tracing::info!(id = info.id, name = %info.name, path = %path.display(), "vGPU restored");
            json(StatusCode::CREATED, &info)
        }
        ApiAction::MigrateVgpu(k, req) => {
            let m = ctx.migrations.start_outgoing(&ctx.daemon, id(&k)?, req)?;
            json(StatusCode::ACCEPTED, &m)
        }
        ApiAction::StartIncoming(req) => {
            let m = ctx.migrations.start_incoming(&ctx.daemon, req)?;
            json(StatusCode::ACCEPTED, &m)
        }
        ApiAction::ListMigrations => ok(&ctx.migrations.list()),
        ApiAction::GetMigration(m) => ok(&ctx.migrations.get(&m)?),
        ApiAction::CancelMigration(m) => json(StatusCode::ACCEPTED, &ctx.migrations.cancel(&m)?),
        ApiAction::SetDirtyLog(k, req) => ok(&set_dirty_log(d, id(&k)?, req.enabled)?),
        ApiAction::TakeDirtyLog(k, q) => ok(&take_dirty_log(d, id(&k)?, q)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_encode_png_round_trips_pixels() {
        let rgba: Vec<u8> = (0..4 * 3 * 2)
            .map(|i| u8::try_from(i * 7).unwrap())
            .collect();
        let png = encode_png(3, 2, &rgba).unwrap();
        let dec = png::Decoder::new(std::io::Cursor::new(png));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (3, 2));
        assert_eq!(&buf[..info.buffer_size()], &rgba[..]);
    }
}
