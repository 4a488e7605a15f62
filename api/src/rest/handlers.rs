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
    AuditPage, AuditQuery, CreateVgpuRequest, DeleteQuery, EngineInfo, EngineName, EngineUpdate,
    ErrorBody, GpuInfo, ProfileInfo, SchedUpdate, TraceExport, TraceQuery, VgpuInfo, VgpuSched,
    VgpuStats,
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
