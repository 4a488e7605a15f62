//! HTTP handlers: each one extracts and checks its inputs, builds one [`ApiAction`] and hands it
//! to the dispatcher. The `#[utoipa::path]` attributes are the OpenAPI document.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use super::action::{ApiAction, ApiReply};
use super::error::ApiError;
use super::AppState;
use crate::metrics::CONTENT_TYPE as METRICS_CONTENT_TYPE;
use crate::model::{
    AuditPage, AuditQuery, CreateVgpuRequest, DeleteQuery, DirtyLogQuery, DirtyLogRequest,
    DirtyLogState, DirtyPages, EngineInfo, EngineName, EngineUpdate, ErrorBody, GpuInfo,
    IncomingRequest, MigrateRequest, MigrationInfo, ProfileInfo, RestoreRequest, SchedUpdate,
    SnapshotRequest, SnapshotResult, TraceExport, TraceQuery, VgpuInfo, VgpuSched, VgpuStats,
};

/// A JSON request body. The body is parsed as JSON whatever its `Content-Type`; malformed JSON
/// is a 400 (`bad_json`), JSON that does not fit the schema (unknown or missing field, wrong
/// type) a 422 (`invalid_body`), a body over the limit a 413.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            let status = r.status();
            let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
                "body_too_large"
            } else {
                "bad_body"
            };
            ApiError::new(status, code, r.body_text())
        })?;
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Data => ApiError::invalid("invalid_body", format!("Invalid body: {e}")),
                Category::Syntax | Category::Eof | Category::Io => {
                    ApiError::bad_request("bad_json", format!("Body is not valid JSON: {e}"))
                }
            }
        })
    }
}

/// A query string; anything that does not fit (unknown parameter, bad number) is a 400
/// (`bad_query`).
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Query::try_from_uri(&parts.uri)
            .map(|Query(q)| ApiQuery(q))
            .map_err(|r| ApiError::bad_request("bad_query", r.body_text()))
    }
}

/// The `{id}` path segment: a vGPU id or name.
pub struct VgpuId(pub String);

/// The `{mid}` path segment: a migration id (checked by the registry: anything else is a 404
/// `migration_not_found`).
pub struct MigrationId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for MigrationId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        raw_param(parts, state, "mid").await.map(MigrationId)
    }
}

/// The `{engine}` path segment; an unknown engine is a 404 (`engine_not_found`).
pub struct EnginePath(pub EngineName);

async fn raw_param<S: Send + Sync>(
    parts: &mut Parts,
    state: &S,
    name: &str,
) -> Result<String, ApiError> {
    let params = axum::extract::RawPathParams::from_request_parts(parts, state)
        .await
        .map_err(|r| ApiError::bad_request("bad_path", r.body_text()))?;
    params
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
        .ok_or_else(|| ApiError::internal(format!("route has no {{{name}}}")))
}

impl<S: Send + Sync> FromRequestParts<S> for VgpuId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        raw_param(parts, state, "id").await.map(VgpuId)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for EnginePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let s = raw_param(parts, state, "engine").await?;
        s.parse()
            .map(EnginePath)
            .map_err(|m: String| ApiError::not_found("engine_not_found", m))
    }
}

impl IntoResponse for ApiReply {
    fn into_response(self) -> Response {
        let typed = |status: StatusCode, ct: &'static str, body: Vec<u8>| {
            let mut r = (status, body).into_response();
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            r
        };
        match self {
            ApiReply::Json(status, body) => typed(status, "application/json", body),
            ApiReply::NoContent => StatusCode::NO_CONTENT.into_response(),
            ApiReply::Png(body) => typed(StatusCode::OK, "image/png", body),
            ApiReply::Metrics(text) => {
                typed(StatusCode::OK, METRICS_CONTENT_TYPE, text.into_bytes())
            }
        }
    }
}

type Reply = Result<ApiReply, ApiError>;

/// The physical GPU and the daemon.
#[utoipa::path(get, path = "/api/v1/gpu", tag = "gpu",
    responses((status = 200, description = "The physical GPU", body = GpuInfo)))]
pub async fn get_gpu(State(st): State<AppState>) -> Reply {
    st.run(ApiAction::GetGpu).await
}

/// Profiles, with the instances of each that still fit.
#[utoipa::path(get, path = "/api/v1/profiles", tag = "gpu",
    responses((status = 200, description = "Profiles", body = [ProfileInfo])))]
pub async fn list_profiles(State(st): State<AppState>) -> Reply {
    st.run(ApiAction::ListProfiles).await
}

/// Lists the vGPUs.
#[utoipa::path(get, path = "/api/v1/vgpus", tag = "vgpus",
    responses((status = 200, description = "vGPUs", body = [VgpuInfo])))]
pub async fn list_vgpus(State(st): State<AppState>) -> Reply {
    st.run(ApiAction::ListVgpus).await
}

/// Creates a vGPU and serves it on a vfio-user socket.
#[utoipa::path(post, path = "/api/v1/vgpus", tag = "vgpus",
    request_body = CreateVgpuRequest,
    responses(
        (status = 201, description = "Created; `socket` is what the VMM attaches to", body = VgpuInfo),
        (status = 400, description = "Body is not JSON", body = ErrorBody),
        (status = 409, description = "Name taken, or reserves over 100 %", body = ErrorBody),
        (status = 422, description = "Unknown field or profile, bad name or value", body = ErrorBody),
        (status = 507, description = "The profile does not fit any more", body = ErrorBody)))]
pub async fn create_vgpu(
    State(st): State<AppState>,
    ApiJson(req): ApiJson<CreateVgpuRequest>,
) -> Reply {
    st.run(ApiAction::CreateVgpu(req)).await
}

/// One vGPU.
#[utoipa::path(get, path = "/api/v1/vgpus/{id}", tag = "vgpus",
    params(("id" = String, Path, description = "vGPU id or name")),
    responses(
        (status = 200, description = "The vGPU", body = VgpuInfo),
        (status = 404, description = "No such vGPU", body = ErrorBody)))]
pub async fn get_vgpu(State(st): State<AppState>, VgpuId(id): VgpuId) -> Reply {
    st.run(ApiAction::GetVgpu(id)).await
}

/// Deletes a vGPU: stops serving it and scrubs its memory. Refused with 409 while a VMM is
/// attached, unless `force=true`, which disconnects the VMM first.
#[utoipa::path(delete, path = "/api/v1/vgpus/{id}", tag = "vgpus",
    params(("id" = String, Path, description = "vGPU id or name"), DeleteQuery),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such vGPU", body = ErrorBody),
        (status = 409, description = "A VMM is attached (use force=true)", body = ErrorBody)))]
pub async fn delete_vgpu(
    State(st): State<AppState>,
    VgpuId(id): VgpuId,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> Reply {
    st.run(ApiAction::DeleteVgpu {
        key: id,
        force: q.force.unwrap_or(false),
    })
    .await
}

/// Pauses a vGPU: the scheduler stops running its work; doorbells still queue. Idempotent.
#[utoipa::path(post, path = "/api/v1/vgpus/{id}/pause", tag = "vgpus",
    params(("id" = String, Path, description = "vGPU id or name")),
    responses(
        (status = 200, description = "Paused", body = VgpuInfo),
        (status = 404, description = "No such vGPU", body = ErrorBody)))]
pub async fn pause_vgpu(State(st): State<AppState>, VgpuId(id): VgpuId) -> Reply {
    st.run(ApiAction::PauseVgpu(id)).await
}

/// Resumes a paused vGPU. Idempotent.
#[utoipa::path(post, path = "/api/v1/vgpus/{id}/resume", tag = "vgpus",
    params(("id" = String, Path, description = "vGPU id or name")),
    responses(
        (status = 200, description = "Running", body = VgpuInfo),
        (status = 404, description = "No such vGPU", body = ErrorBody)))]
pub async fn resume_vgpu(State(st): State<AppState>, VgpuId(id): VgpuId) -> Reply {
    st.run(ApiAction::ResumeVgpu(id)).await
}

/// Full device reset: registers, engines, queued work, GGTT and display plane back to their
/// creation state; config space, MSI-X and local memory kept; a VMM stays attached.
#[utoipa::path(post, path = "/api/v1/vgpus/{id}/reset", tag = "vgpus",
    params(("id" = String, Path, description = "vGPU id or name")),
    responses(
        (status = 200, description = "Reset", body = VgpuInfo),
        (status = 404, description = "No such vGPU", body = ErrorBody)))]
pub async fn reset_vgpu(State(st): State<AppState>, VgpuId(id): VgpuId) -> Reply {
    st.run(ApiAction::ResetVgpu(id)).await
}

/// Scheduling parameters of a vGPU on each of its engines.
#[utoipa::path(get, path = "/api/v1/vgpus/{id}/sched", tag = "scheduler",
    params(("id" = String, Path, description = "vGPU id or name")),
    responses(
        (status = 200, description = "Per-engine parameters", body = VgpuSched),
        (status = 404, description = "No such vGPU", body = ErrorBody)))]
pub async fn get_sched(State(st): State<AppState>, VgpuId(id): VgpuId) -> Reply {
    st.run(ApiAction::GetSched(id)).await
}

/// Changes a vGPU's weight, reserve or cap on one engine or all (fields left out keep their
/// value; idempotent; all engines or none).
#[utoipa::path(put, path = "/api/v1/vgpus/{id}/sched", tag = "scheduler",
    params(("id" = String, Path, description = "vGPU id or name")),
    request_body = SchedUpdate,
    responses(
        (status = 200, description = "The parameters now", body = VgpuSched),
        (status = 404, description = "No such vGPU", body = ErrorBody),
        (status = 409, description = "Reserves on an engine would exceed 100 %", body = ErrorBody),
        (status = 422, description = "Out of range, or the vGPU lacks the engine", body = ErrorBody)))]
pub async fn put_sched(
    State(st): State<AppState>,
    VgpuId(id): VgpuId,
    ApiJson(upd): ApiJson<SchedUpdate>,
) -> Reply {
    st.run(ApiAction::PutSched(id, upd)).await
}

/// Counters of a vGPU per engine.
#[utoipa::path(get, path = "/api/v1/vgpus/{id}/stats", tag = "stats",
    params(("id" = String, Path, description = "vGPU id or name")),
    responses(
        (status = 200, description = "Counters", body = VgpuStats),
        (status = 404, description = "No such vGPU", body = ErrorBody)))]
pub async fn get_stats(State(st): State<AppState>, VgpuId(id): VgpuId) -> Reply {
    st.run(ApiAction::GetStats(id)).await
}

/// Counters of every vGPU (what `vgpuctl top` shows).
#[utoipa::path(get, path = "/api/v1/stats", tag = "stats",
    responses((status = 200, description = "Counters", body = [VgpuStats])))]
pub async fn list_stats(State(st): State<AppState>) -> Reply {
    st.run(ApiAction::ListStats).await
}

/// Audit events of a vGPU, oldest first, paged with `after`/`limit`.
#[utoipa::path(get, path = "/api/v1/vgpus/{id}/audit", tag = "stats",
    params(("id" = String, Path, description = "vGPU id or name"), AuditQuery),
    responses(
        (status = 200, description = "A page of events", body = AuditPage),
        (status = 400, description = "Bad query", body = ErrorBody),
        (status = 404, description = "No such vGPU", body = ErrorBody)))]
pub async fn get_audit(
    State(st): State<AppState>,
    VgpuId(id): VgpuId,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Reply {
    st.run(ApiAction::GetAudit(id, q)).await
}

/// The vGPU's display plane as a PNG (RGBA8).
#[utoipa::path(get, path = "/api/v1/vgpus/{id}/display", tag = "vgpus",
    params(("id" = String, Path, description = "vGPU id or name")),
    responses(
        (status = 200, description = "The frame", content_type = "image/png"),
        (status = 404, description = "No such vGPU", body = ErrorBody),
        (status = 409, description = "Plane disabled, invalid or unmapped", body = ErrorBody)))]
pub async fn get_display(State(st): State<AppState>, VgpuId(id): VgpuId) -> Reply {
    st.run(ApiAction::GetDisplay(id)).await
}

/// The engines and their scheduling policies.
#[utoipa::path(get, path = "/api/v1/engines", tag = "scheduler",
    responses((status = 200, description = "Engines", body = [EngineInfo])))]
pub async fn list_engines(State(st): State<AppState>) -> Reply {
    st.run(ApiAction::ListEngines).await
}

/// Sets an engine's scheduling policy (idempotent).
#[utoipa::path(put, path = "/api/v1/engines/{engine}", tag = "scheduler",
    params(("engine" = EngineName, Path, description = "Engine")),
    request_body = EngineUpdate,
    responses(
        (status = 200, description = "The engine now", body = EngineInfo),
        (status = 404, description = "No such engine", body = ErrorBody),
        (status = 422, description = "Unknown policy or field", body = ErrorBody)))]
pub async fn put_engine(
    State(st): State<AppState>,
    EnginePath(e): EnginePath,
    ApiJson(upd): ApiJson<EngineUpdate>,
) -> Reply {
    st.run(ApiAction::PutEngine(e, upd)).await
}

/// The scheduler trace (bounded, newest slices), as JSON.
#[utoipa::path(get, path = "/api/v1/scheduler/trace", tag = "scheduler",
    params(TraceQuery),
    responses(
        (status = 200, description = "Slices, oldest first", body = TraceExport),
        (status = 400, description = "Bad query", body = ErrorBody)))]
pub async fn get_trace(State(st): State<AppState>, ApiQuery(q): ApiQuery<TraceQuery>) -> Reply {
    st.run(ApiAction::GetTrace(q)).await
}

/// Prometheus metrics (text exposition format 0.0.4).
#[utoipa::path(get, path = "/metrics", tag = "stats",
    responses((status = 200, description = "Metrics", content_type = "text/plain", body = String)))]
pub async fn metrics(State(st): State<AppState>) -> Reply {
    st.run(ApiAction::Metrics).await
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "gpu",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
pub async fn openapi() -> Reply {
    Ok(ApiReply::Json(
        StatusCode::OK,
        super::openapi::document_json().to_vec(),
    ))
}

/// Saves the vGPU (device state and local memory) into a file the daemon writes, atomically.
/// The engines are paused while the state is captured and resumed afterwards if they were
/// running (pause the vGPU first to keep them stopped, e.g. around a VM snapshot).
#[utoipa::path(post, path = "/api/v1/vgpus/{id}/snapshot", tag = "migration",
    params(("id" = String, Path, description = "vGPU id or name")),
    request_body = SnapshotRequest,
    responses(
        (status = 200, description = "Written", body = SnapshotResult),
        (status = 404, description = "No such vGPU", body = ErrorBody),
        (status = 409, description = "The vGPU is being migrated", body = ErrorBody),
        (status = 422, description = "Relative path, a directory, or no such directory", body = ErrorBody),
        (status = 500, description = "Writing failed (the OS error is in the message)", body = ErrorBody)))]
pub async fn snapshot_vgpu(
    State(st): State<AppState>,
    VgpuId(id): VgpuId,
    ApiJson(req): ApiJson<SnapshotRequest>,
) -> Reply {
    st.run(ApiAction::SnapshotVgpu(id, req)).await
}

/// Creates a vGPU from a snapshot file: its profile, at its graphics-memory ranges, with its
/// state validated and restored; then resumed (unless `paused`).
#[utoipa::path(post, path = "/api/v1/vgpus/restore", tag = "migration",
    request_body = RestoreRequest,
    responses(
        (status = 201, description = "Restored; `socket` is what the VMM attaches to", body = VgpuInfo),
        (status = 409, description = "Name taken, or the snapshot's GM ranges are in use", body = ErrorBody),
        (status = 422, description = "Bad path, or the snapshot is corrupt or does not fit", body = ErrorBody),
        (status = 507, description = "The snapshot's profile does not fit any more", body = ErrorBody)))]
pub async fn restore_vgpu(
    State(st): State<AppState>,
    ApiJson(req): ApiJson<RestoreRequest>,
) -> Reply {
    st.run(ApiAction::RestoreVgpu(req)).await
}

/// Live-migrates the vGPU to another daemon's incoming migration, in the background: poll
/// `GET /api/v1/migrations/{mid}`. On success the source vGPU is destroyed (unless
/// `keep_source`); on failure or cancellation it runs on.
#[utoipa::path(post, path = "/api/v1/vgpus/{id}/migrate", tag = "migration",
    params(("id" = String, Path, description = "vGPU id or name")),
    request_body = MigrateRequest,
    responses(
        (status = 202, description = "Started", body = MigrationInfo),
        (status = 404, description = "No such vGPU", body = ErrorBody),
        (status = 409, description = "The vGPU is already being migrated", body = ErrorBody),
        (status = 422, description = "Bad endpoint or value", body = ErrorBody)))]
pub async fn migrate_vgpu(
    State(st): State<AppState>,
    VgpuId(id): VgpuId,
    ApiJson(req): ApiJson<MigrateRequest>,
) -> Reply {
    st.run(ApiAction::MigrateVgpu(id, req)).await
}

/// Listens for one incoming migration (the listener is bound when this returns) and receives
/// it in the background into a new vGPU: poll `GET /api/v1/migrations/{mid}`.
#[utoipa::path(post, path = "/api/v1/migrations/incoming", tag = "migration",
    request_body = IncomingRequest,
    responses(
        (status = 202, description = "Listening", body = MigrationInfo),
        (status = 409, description = "Address in use, or the name is taken", body = ErrorBody),
        (status = 422, description = "Bad endpoint or name", body = ErrorBody)))]
pub async fn start_incoming(
    State(st): State<AppState>,
    ApiJson(req): ApiJson<IncomingRequest>,
) -> Reply {
    st.run(ApiAction::StartIncoming(req)).await
}

/// Running migrations and the newest finished ones, oldest first.
#[utoipa::path(get, path = "/api/v1/migrations", tag = "migration",
    responses((status = 200, description = "Migrations", body = [MigrationInfo])))]
pub async fn list_migrations(State(st): State<AppState>) -> Reply {
    st.run(ApiAction::ListMigrations).await
}

/// One migration: its state, live progress and, at the end, its report or error.
#[utoipa::path(get, path = "/api/v1/migrations/{mid}", tag = "migration",
    params(("mid" = u64, Path, description = "Migration id")),
    responses(
        (status = 200, description = "The migration", body = MigrationInfo),
        (status = 404, description = "No such migration", body = ErrorBody)))]
pub async fn get_migration(State(st): State<AppState>, MigrationId(mid): MigrationId) -> Reply {
    st.run(ApiAction::GetMigration(mid)).await
}

/// Cancels a running migration; it ends as `cancelled` (the source vGPU runs on, the
/// destination keeps nothing), or as `completed` if the handover had begun.
#[utoipa::path(delete, path = "/api/v1/migrations/{mid}", tag = "migration",
    params(("mid" = u64, Path, description = "Migration id")),
    responses(
        (status = 202, description = "Cancellation requested", body = MigrationInfo),
        (status = 404, description = "No such migration", body = ErrorBody),
        (status = 409, description = "It has already ended", body = ErrorBody)))]
pub async fn cancel_migration(State(st): State<AppState>, MigrationId(mid): MigrationId) -> Reply {
    st.run(ApiAction::CancelMigration(mid)).await
}

/// Starts or stops logging the guest-RAM pages the vGPU's engines write (for a VMM that merges
/// device writes into its own dirty log while it migrates guest RAM). Starting clears the log;
/// starting it again while on keeps it.
#[utoipa::path(post, path = "/api/v1/vgpus/{id}/dirty-log", tag = "migration",
    params(("id" = String, Path, description = "vGPU id or name")),
    request_body = DirtyLogRequest,
    responses(
        (status = 200, description = "The log's state now", body = DirtyLogState),
        (status = 404, description = "No such vGPU", body = ErrorBody)))]
pub async fn set_dirty_log(
    State(st): State<AppState>,
    VgpuId(id): VgpuId,
    ApiJson(req): ApiJson<DirtyLogRequest>,
) -> Reply {
    st.run(ApiAction::SetDirtyLog(id, req)).await
}

/// Takes the guest pages written in `[gpa, gpa + len)` since they were last taken: each is
/// reported once and forgotten (not idempotent). At most 1 Mi pages per reply; `more` says to
/// continue at `next_gpa`.
#[utoipa::path(get, path = "/api/v1/vgpus/{id}/dirty-log", tag = "migration",
    params(("id" = String, Path, description = "vGPU id or name"), DirtyLogQuery),
    responses(
        (status = 200, description = "Pages taken", body = DirtyPages),
        (status = 400, description = "Missing or bad query", body = ErrorBody),
        (status = 404, description = "No such vGPU", body = ErrorBody),
        (status = 409, description = "The log is off", body = ErrorBody),
        (status = 422, description = "Range not page-aligned or overflowing", body = ErrorBody)))]
pub async fn take_dirty_log(
    State(st): State<AppState>,
    VgpuId(id): VgpuId,
    ApiQuery(q): ApiQuery<DirtyLogQuery>,
) -> Reply {
    st.run(ApiAction::TakeDirtyLog(id, q)).await
}
