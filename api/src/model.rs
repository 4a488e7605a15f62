//! The API's data model: request bodies, query strings and response bodies. The daemon returns
//! these, the REST server serializes them (and documents them in the OpenAPI document), and the
//! client (`vgpuctl`) deserializes them.
//!
//! Requests are strict (`deny_unknown_fields`: a misspelt field is an error, never ignored);
//! responses are open (clients ignore fields they do not know, so fields can be added).

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use vgpu_abi::Engine;
use vgpu_device::sched::Policy;
use vgpu_device::vgpu::GttMode;

/// An engine of the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EngineName {
    /// 2-D/3-D rendering.
    Render,
    /// Blitter.
    Blit,
    /// Media (colour-space conversion, scaling).
    Video,
    /// Compute kernels.
    Compute,
}

impl From<Engine> for EngineName {
    fn from(e: Engine) -> Self {
        match e {
            Engine::Render => EngineName::Render,
            Engine::Blit => EngineName::Blit,
            Engine::Video => EngineName::Video,
            Engine::Compute => EngineName::Compute,
        }
    }
}

impl From<EngineName> for Engine {
    fn from(e: EngineName) -> Self {
        match e {
            EngineName::Render => Engine::Render,
            EngineName::Blit => Engine::Blit,
            EngineName::Video => Engine::Video,
            EngineName::Compute => Engine::Compute,
        }
    }
}

impl std::str::FromStr for EngineName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Engine::ALL
            .into_iter()
            .find(|e| e.name() == s)
            .map(EngineName::from)
            .ok_or_else(|| {
                format!("unknown engine '{s}' (expected render, blit, video or compute)")
            })
    }
}

impl fmt::Display for EngineName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Engine::from(*self).name())
    }
}

/// GTT virtualization mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum GttModeName {
    /// gVirt-style shadow tables.
    #[default]
    Shadow,
    /// Demon-style two-dimensional translation.
    TwoDim,
}

impl From<GttMode> for GttModeName {
    fn from(m: GttMode) -> Self {
        match m {
            GttMode::Shadow => GttModeName::Shadow,
            GttMode::TwoDim => GttModeName::TwoDim,
        }
    }
}

impl From<GttModeName> for GttMode {
    fn from(m: GttModeName) -> Self {
        match m {
            GttModeName::Shadow => GttMode::Shadow,
            GttModeName::TwoDim => GttMode::TwoDim,
        }
    }
}

impl fmt::Display for GttModeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GttModeName::Shadow => "shadow",
            GttModeName::TwoDim => "two-dim",
        })
    }
}

/// Scheduling policy of an engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyName {
    /// Work-conserving weighted fair sharing.
    BestEffort,
    /// Work-conserving equal sharing (weights ignored).
    EqualShare,
    /// Reserves first, never above the cap, even if the engine idles.
    FixedShare,
}

impl From<Policy> for PolicyName {
    fn from(p: Policy) -> Self {
        match p {
            Policy::BestEffort => PolicyName::BestEffort,
            Policy::EqualShare => PolicyName::EqualShare,
            Policy::FixedShare => PolicyName::FixedShare,
        }
    }
}

impl From<PolicyName> for Policy {
    fn from(p: PolicyName) -> Self {
        match p {
            PolicyName::BestEffort => Policy::BestEffort,
            PolicyName::EqualShare => Policy::EqualShare,
            PolicyName::FixedShare => Policy::FixedShare,
        }
    }
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyName::BestEffort => "best-effort",
            PolicyName::EqualShare => "equal-share",
            PolicyName::FixedShare => "fixed-share",
        })
    }
}

/// The error body of every 4xx and 5xx response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `not_found`, `capacity_exhausted`.
    pub code: String,
    /// Human-readable explanation (the whole cause chain).
    pub message: String,
}

/// The physical GPU and the daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GpuInfo {
    /// Daemon version.
    pub version: String,
    /// Local memory of the physical GPU in bytes.
    pub lmem_bytes: u64,
    /// Local memory held by vGPUs, in bytes.
    pub lmem_used_bytes: u64,
    /// Most vGPUs at once.
    pub max_vgpus: u32,
    /// vGPUs now.
    pub vgpus: u32,
}

/// A vGPU profile and how many more instances of it fit now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProfileInfo {
    /// Name (`mini`, `small`, ...).
    pub name: String,
    /// One line for listings.
    pub description: String,
    /// Local memory (and aperture) per instance, in bytes.
    pub lmem_bytes: u64,
    /// Hidden graphics memory per instance, in bytes.
    pub hidden_gm_bytes: u64,
    /// Default scheduling weight.
    pub default_weight: u32,
    /// Largest display width.
    pub max_width: u32,
    /// Largest display height.
    pub max_height: u32,
    /// Engines an instance has.
    pub engines: Vec<EngineName>,
    /// Instances that can still be created (exact: creation never over-commits).
    pub available: u64,
}

/// Per-vGPU scheduling parameters. In a create request every field is optional (defaults:
/// the profile's weight, reserve 0 %, cap 100 %).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SchedParamsBody {
    /// Relative weight, 1..=100 (best-effort policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Reserved share in percent, 0..=100 (fixed-share policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserve_pct: Option<u32>,
    /// Cap in percent, 1..=100 (fixed-share policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap_pct: Option<u32>,
}

/// `POST /api/v1/vgpus`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVgpuRequest {
    /// Profile name (see `GET /api/v1/profiles`).
    pub profile: String,
    /// Name: letters, digits, `-` and `_`; also names the vfio-user socket. Default `vgpu<id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// GTT virtualization mode (default `shadow`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gtt: Option<GttModeName>,
    /// Scheduling parameters on every engine of the vGPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sched: Option<SchedParamsBody>,
}

/// A vGPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VgpuInfo {
    /// Instance id.
    pub id: u32,
    /// Name.
    pub name: String,
    /// Profile name.
    pub profile: String,
    /// GTT mode.
    pub gtt: GttModeName,
    /// The vfio-user socket a VMM attaches to.
    #[schema(value_type = String)]
    pub socket: PathBuf,
    /// Whether a VMM is attached.
    pub connected: bool,
    /// Whether the scheduler is holding its work (`POST .../pause`).
    pub paused: bool,
    /// Local memory (aperture) in bytes.
    pub lmem_bytes: u64,
}

/// `DELETE /api/v1/vgpus/{id}` query.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Delete even with a VMM attached: the client is disconnected first.
    #[serde(default)]
    pub force: Option<bool>,
}

/// `PUT /api/v1/vgpus/{id}/sched`: fields left out keep their current value, so the request
/// is idempotent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SchedUpdate {
    /// Only this engine (default: every engine of the vGPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineName>,
    /// Relative weight, 1..=100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Reserved share in percent, 0..=100; reserves on an engine total at most 100 %.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserve_pct: Option<u32>,
    /// Cap in percent, 1..=100, at least the reserve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap_pct: Option<u32>,
}

/// Scheduling of a vGPU on one engine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EngineSched {
    /// Engine.
    pub engine: EngineName,
    /// The engine's policy.
    pub policy: PolicyName,
    /// Weight.
    pub weight: u32,
    /// Reserve in percent.
    pub reserve_pct: u32,
    /// Cap in percent.
    pub cap_pct: u32,
    /// Engine time delivered since the vGPU was created, in nanoseconds.
    pub busy_ns: u64,
}

/// Scheduling of a vGPU on all of its engines.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VgpuSched {
    /// vGPU id.
    pub id: u32,
    /// One entry per engine of the vGPU's profile.
    pub engines: Vec<EngineSched>,
}

/// An engine of the physical GPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EngineInfo {
    /// Engine.
    pub engine: EngineName,
    /// Scheduling policy.
    pub policy: PolicyName,
    /// vGPUs scheduled on it.
    pub vgpus: u32,
}

/// `PUT /api/v1/engines/{engine}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EngineUpdate {
    /// New policy.
    pub policy: PolicyName,
}

/// A latency distribution, summarised (bucket bounds, see `/metrics` for the buckets).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LatencySummary {
    /// Observations.
    pub count: u64,
    /// Mean in microseconds (0 when empty).
    pub mean_us: f64,
    /// Upper bound of the bucket holding the median, in microseconds.
    pub p50_us: Option<f64>,
    /// Upper bound of the bucket holding the 99th percentile, in microseconds.
    pub p99_us: Option<f64>,
}

/// Counters of a vGPU on one engine (since creation, except `busy_pct`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EngineStatsInfo {
    /// Engine.
    pub engine: EngineName,
    /// Utilisation in percent over the daemon's last one-second sampling window.
    pub busy_pct: f64,
    /// Nanoseconds spent executing.
    pub busy_ns: u64,
    /// Commands executed.
    pub commands: u64,
    /// Bytes read and written by operations.
    pub bytes: u64,
    /// Submissions (doorbells) accepted.
    pub submissions: u64,
    /// Slices preempted with work left.
    pub preemptions: u64,
    /// Engine resets (guest, host or watchdog).
    pub resets: u64,
    /// Audit events (rejected or faulted commands).
    pub audit_events: u64,
    /// Submission latency: doorbell to completion.
    pub submission_latency: LatencySummary,
    /// Lengths of the slices that ran commands.
    pub slice: LatencySummary,
}

/// Statistics of a vGPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VgpuStats {
    /// vGPU id.
    pub id: u32,
    /// Name.
    pub name: String,
    /// Whether a VMM is attached.
    pub connected: bool,
    /// Whether the vGPU is paused.
    pub paused: bool,
    /// Audit events recorded since creation.
    pub audit_events: u64,
    /// Malformed or dropped guest register accesses.
    pub bad_accesses: u64,
    /// Time the daemon spent handling each trapped region access from the VMM.
    pub trap_latency: LatencySummary,
    /// One entry per engine of the vGPU's profile.
    pub engines: Vec<EngineStatsInfo>,
}

/// `GET /api/v1/vgpus/{id}/audit` query.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Only events with a sequence number above this (paging cursor: the previous page's
    /// `next_after`). Default 0.
    #[serde(default)]
    pub after: Option<u64>,
    /// Most events returned, 1..=1000 (default 100).
    #[serde(default)]
    pub limit: Option<u32>,
    /// Only events of this engine.
    #[serde(default)]
    pub engine: Option<EngineName>,
    /// Only events with this reason code (e.g. `address_out_of_range`).
    #[serde(default)]
    pub reason: Option<String>,
}

/// One audit event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditEventInfo {
    /// Sequence number within the vGPU, from 1.
    pub seq: u64,
    /// vGPU id.
    pub vgpu: u32,
    /// Engine.
    pub engine: EngineName,
    /// Address of the offending command.
    pub addr: u64,
    /// Its header dword.
    pub header: u32,
    /// Opcode field of the header.
    pub opcode: u32,
    /// Reason code (see `docs/device-spec.md`).
    pub reason: String,
    /// Detail.
    pub detail: String,
    /// Milliseconds since the UNIX epoch.
    pub time_ms: u64,
}

/// A page of audit events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditPage {
    /// Events, oldest first.
    pub events: Vec<AuditEventInfo>,
    /// Cursor for the next page (`after=`): the last sequence number looked at.
    pub next_after: u64,
    /// Events recorded since creation (older ones than the log keeps are gone).
    pub total: u64,
}

/// `GET /api/v1/scheduler/trace` query.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TraceQuery {
    /// Only slices of this engine.
    #[serde(default)]
    pub engine: Option<EngineName>,
    /// Only slices of this vGPU id.
    #[serde(default)]
    pub vgpu: Option<u32>,
}

/// One scheduler slice (the scheduler's trace format, replayable).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TraceEventInfo {
    /// Microseconds since the scheduler started.
    pub t_us: u64,
    /// Engine name.
    pub engine: String,
    /// vGPU id.
    pub vgpu: u32,
    /// Slice length in microseconds.
    pub dur_us: u64,
    /// Commands executed in the slice.
    pub commands: u64,
    /// Why the vGPU was picked (`reserve`, `fair`, `poll`, `watchdog`).
    pub why: String,
    /// How the slice ended (`idle`, `preempted`, `waiting`, `faulted`, `stopped`, `watchdog`).
    pub end: String,
}

/// The scheduler trace, oldest first (bounded: the newest slices).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TraceExport {
    /// Slices.
    pub events: Vec<TraceEventInfo>,
}
