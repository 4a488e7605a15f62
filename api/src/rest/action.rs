//! Every API request becomes one [`ApiAction`], and [`dispatch`] is the one place that carries
//! actions out against the [`Daemon`] (Firecracker's `parsed_request.rs` → `VmmAction`). The
//! dispatcher blocks (it may scrub local memory or wait for an engine), so the server runs it
//! on the blocking thread pool, never on the async runtime. Its replies are serialized there
//! too.
//!
//! Adding an endpoint is a variant here, an arm in [`dispatch`], a handler and a line in
//! [`super::routes`].

use axum::http::StatusCode;
use serde::Serialize;
use vgpu_device::sched::SchedParams;
use vgpu_device::vgpu::GttMode;

use super::error::ApiError;
use crate::daemon::{Daemon, DaemonError, VgpuSpec};
use crate::metrics::{self, ApiMetrics};
use crate::model::{
    AuditQuery, CreateVgpuRequest, EngineName, EngineUpdate, SchedUpdate, TraceQuery,
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

/// Carries out `action`. Blocking.
pub fn dispatch(d: &Daemon, api: &ApiMetrics, action: ApiAction) -> Result<ApiReply, ApiError> {
    let id = |key: &str| d.resolve(key).map_err(ApiError::from);
    match action {
        ApiAction::GetGpu => ok(&d.gpu_info()),
        ApiAction::ListProfiles => ok(&d.profiles()),
        ApiAction::ListVgpus => ok(&d.list()),
        ApiAction::CreateVgpu(req) => create(d, req),
        ApiAction::GetVgpu(k) => ok(&d.info(id(&k)?)?),
        ApiAction::DeleteVgpu { key, force } => {
            d.remove(id(&key)?, force)?;
            Ok(ApiReply::NoContent)
        }
        ApiAction::PauseVgpu(k) => ok(&d.pause(id(&k)?)?),
        ApiAction::ResumeVgpu(k) => ok(&d.resume(id(&k)?)?),
        ApiAction::ResetVgpu(k) => ok(&d.reset(id(&k)?)?),
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
