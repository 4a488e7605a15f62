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

// ---------------------------------------------------------------------------------------------
// Snapshot, restore, live migration and the guest-RAM dirty log.
// ---------------------------------------------------------------------------------------------

/// `POST /api/v1/vgpus/{id}/snapshot`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Absolute path of the snapshot file the daemon writes (atomically: a temporary file in
    /// the same directory, synced, then renamed over the path).
    pub path: String,
}

/// What a snapshot wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotResult {
    /// The file.
    #[schema(value_type = String)]
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// How long the vGPU's engines were paused to capture the state, in microseconds.
    pub paused_us: u64,
}

/// `POST /api/v1/vgpus/restore`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// Absolute path of a snapshot file written by `POST /api/v1/vgpus/{id}/snapshot`.
    pub path: String,
    /// Name of the new vGPU (names its socket `<socket-dir>/<name>.sock`; give the snapshot's
    /// vGPU name so that a restored VMM finds the same socket). Default `vgpu<id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// GTT mode of the new vGPU (default: the snapshot's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gtt: Option<GttModeName>,
    /// Leave the vGPU's engines paused after the restore (resume with `POST .../resume` once
    /// the VMM has restored guest RAM and reconnected). Default `false`: resumed at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
}

/// `POST /api/v1/migrations/incoming`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IncomingRequest {
    /// Where to listen: `unix:/absolute/path` or `tcp:HOST:PORT` (port 0 picks one; the reply
    /// says which).
    pub listen: String,
    /// Name of the vGPU the migration creates. Default `vgpu<id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// GTT mode of the new vGPU (default: the source's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gtt: Option<GttModeName>,
    /// Leave the received vGPU's engines paused at the handover instead of resuming them
    /// (resume with `POST /api/v1/vgpus/{id}/resume`). Default `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
}

/// `POST /api/v1/vgpus/{id}/migrate`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The destination daemon's incoming migration: `unix:/absolute/path` or `tcp:HOST:PORT`.
    pub to: String,
    /// Downtime target in milliseconds, 1..=60000 (default 20): pre-copy stops once the
    /// predicted stop-and-copy time is within it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Most pre-copy rounds, 1..=1000 (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rounds: Option<u32>,
    /// Keep the source vGPU (paused) after a successful migration instead of destroying it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_source: Option<bool>,
}

/// Which end of a migration this daemon is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationDirection {
    /// This daemon sends a vGPU away.
    Outgoing,
    /// This daemon receives a vGPU.
    Incoming,
}

/// Where a migration stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    /// Incoming: waiting for the source to connect.
    Listening,
    /// Incoming: connected, receiving (see `received`).
    Receiving,
    /// Outgoing: sending (see `progress`).
    Running,
    /// Done (see `report`, `destination_report`).
    Completed,
    /// Failed (see `error`); the source vGPU runs on, the destination kept nothing.
    Failed,
    /// Cancelled by `DELETE /api/v1/migrations/{mid}`; the source vGPU runs on.
    Cancelled,
}

impl MigrationState {
    /// Whether the migration has ended.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            MigrationState::Completed | MigrationState::Failed | MigrationState::Cancelled
        )
    }
}

impl fmt::Display for MigrationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MigrationState::Listening => "listening",
            MigrationState::Receiving => "receiving",
            MigrationState::Running => "running",
            MigrationState::Completed => "completed",
            MigrationState::Failed => "failed",
            MigrationState::Cancelled => "cancelled",
        })
    }
}

/// Phase of the migration protocol (`docs/migration.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// Version and compatibility check.
    Hello,
    /// Pre-copy of local memory while the vGPU runs (`round` says which).
    PreCopy,
    /// vGPU paused; last dirty pages.
    StopAndCopy,
    /// Device-state transfer.
    DeviceState,
    /// The destination validates and restores.
    Restore,
    /// Handover: the destination resumes.
    Commit,
    /// Done.
    Completed,
}

impl From<vgpu_migration::Phase> for MigrationPhase {
    fn from(p: vgpu_migration::Phase) -> Self {
        use vgpu_migration::Phase as P;
        match p {
            P::Hello => MigrationPhase::Hello,
            P::PreCopy { .. } => MigrationPhase::PreCopy,
            P::StopAndCopy => MigrationPhase::StopAndCopy,
            P::DeviceState => MigrationPhase::DeviceState,
            P::Restore => MigrationPhase::Restore,
            P::Commit => MigrationPhase::Commit,
            P::Completed => MigrationPhase::Completed,
        }
    }
}

impl fmt::Display for MigrationPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MigrationPhase::Hello => "hello",
            MigrationPhase::PreCopy => "pre-copy",
            MigrationPhase::StopAndCopy => "stop-and-copy",
            MigrationPhase::DeviceState => "device state",
            MigrationPhase::Restore => "restore",
            MigrationPhase::Commit => "commit",
            MigrationPhase::Completed => "completed",
        })
    }
}

/// Live progress of an outgoing migration (the last sample the source took: after every
/// message of pages and at every phase change).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationProgress {
    /// Current phase.
    pub phase: MigrationPhase,
    /// Pre-copy round (1-based) while `phase` is `pre_copy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u32>,
    /// Bytes written to the connection so far.
    pub bytes_sent: u64,
    /// Estimate of the total the migration will send (grows with dirty rounds).
    pub total_estimate: u64,
    /// Measured transfer rate, bytes per second (0 until measured).
    pub bytes_per_sec: f64,
    /// Downtime predicted at the end of the last round, in microseconds.
    pub predicted_downtime_us: Option<u64>,
    /// Pages left in the current round.
    pub pages_remaining: u64,
    /// Time since the start, in microseconds.
    pub elapsed_us: u64,
}

impl From<&vgpu_migration::Progress> for MigrationProgress {
    fn from(p: &vgpu_migration::Progress) -> Self {
        MigrationProgress {
            phase: p.phase.into(),
            round: match p.phase {
                vgpu_migration::Phase::PreCopy { round } => Some(round),
                _ => None,
            },
            bytes_sent: p.bytes_sent,
            total_estimate: p.total_estimate,
            bytes_per_sec: p.bytes_per_sec,
            predicted_downtime_us: p.predicted_downtime_us,
            pages_remaining: p.pages_remaining,
            elapsed_us: p.elapsed_us,
        }
    }
}

/// Progress of an incoming migration, as far as the destination sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IncomingProgress {
    /// Current phase (`hello`, `pre_copy` — pages of any round, the stop-and-copy round
    /// included —, `restore`, `commit`, `completed`).
    pub phase: MigrationPhase,
    /// Pages written into the new vGPU so far.
    pub pages_received: u64,
    /// Time since the source connected, in microseconds.
    pub elapsed_us: u64,
}

/// Why pre-copy stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StopReasonName {
    /// The predicted downtime was within the target.
    Converged,
    /// The round limit was reached with the prediction above the target.
    RoundLimit,
    /// Overhead, dirty scan and device state alone exceeded the target; pre-copy stopped once
    /// the dirty pages fitted besides them.
    FloorAboveTarget,
}

impl From<vgpu_migration::StopReason> for StopReasonName {
    fn from(r: vgpu_migration::StopReason) -> Self {
        match r {
            vgpu_migration::StopReason::Converged => StopReasonName::Converged,
            vgpu_migration::StopReason::RoundLimit => StopReasonName::RoundLimit,
            vgpu_migration::StopReason::FloorAboveTarget => StopReasonName::FloorAboveTarget,
        }
    }
}

/// One pre-copy round, or the stop-and-copy round (the last one of a report).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RoundInfo {
    /// 1-based round.
    pub round: u32,
    /// Pages sent.
    pub pages: u64,
    /// Of which all-zero (sent as markers).
    pub zero_pages: u64,
    /// Bytes written, framing included.
    pub bytes: u64,
    /// Wall time, acknowledgement included, in microseconds.
    pub duration_us: u64,
    /// Pages dirty at the end of the round (0 for the stop-and-copy round).
    pub dirty_after: u64,
    /// Time of the dirty-page scan that ended the round, microseconds; for the stop-and-copy
    /// round, the scan after the pause (part of `downtime_breakdown.pause_us`).
    #[serde(default)]
    pub scan_us: u64,
    /// Downtime predicted at the end of the round, microseconds (0 for the stop-and-copy round).
    pub predicted_downtime_us: u64,
}

/// Where the measured downtime went, in microseconds, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DowntimeBreakdownInfo {
    /// Pausing the engines and the last dirty-page scan.
    pub pause_us: u64,
    /// Sending the last dirty pages.
    pub final_pages_us: u64,
    /// Capturing and encoding the device state.
    pub snapshot_us: u64,
    /// Sending the device state.
    pub state_transfer_us: u64,
    /// The destination's decode and restore.
    pub restore_us: u64,
    /// The destination's resume and a round trip.
    pub resume_us: u64,
}

/// The source's report of a completed migration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationReportInfo {
    /// Protocol version used.
    pub protocol_version: u32,
    /// The vGPU's local memory in bytes.
    pub memory_bytes: u64,
    /// Pre-copy rounds run (the stop-and-copy round not counted).
    pub precopy_rounds: u32,
    /// Why pre-copy stopped.
    pub stop_reason: StopReasonName,
    /// Every round, the stop-and-copy round last.
    pub rounds: Vec<RoundInfo>,
    /// Dirty pages sent while paused.
    pub final_pages: u64,
    /// Size of the device-state envelope in bytes.
    pub device_state_bytes: u64,
    /// The downtime target in microseconds.
    pub downtime_target_us: u64,
    /// Downtime predicted when pre-copy stopped, in microseconds.
    pub predicted_downtime_us: u64,
    /// Measured downtime: from the source's pause to the destination's resume acknowledged.
    pub downtime_us: u64,
    /// Where the downtime went.
    pub downtime_breakdown: DowntimeBreakdownInfo,
    /// Time from the start to the end, in microseconds.
    pub total_time_us: u64,
    /// Bytes written, framing included.
    pub bytes_sent: u64,
    /// Pages sent over all rounds.
    pub pages_sent: u64,
    /// Of which all-zero.
    pub zero_pages_sent: u64,
    /// The bandwidth the prediction used, bytes per second.
    pub bandwidth_bytes_per_sec: f64,
}

impl From<&vgpu_migration::MigrationReport> for MigrationReportInfo {
    fn from(r: &vgpu_migration::MigrationReport) -> Self {
        let b = &r.downtime_breakdown;
        MigrationReportInfo {
            protocol_version: r.protocol_version,
            memory_bytes: r.memory_bytes,
            precopy_rounds: r.precopy_rounds,
            stop_reason: r.stop_reason.into(),
            rounds: r
                .rounds
                .iter()
                .map(|x| RoundInfo {
                    round: x.round,
                    pages: x.pages,
                    zero_pages: x.zero_pages,
                    bytes: x.bytes,
                    duration_us: x.duration_us,
                    dirty_after: x.dirty_after,
                    scan_us: x.scan_us,
                    predicted_downtime_us: x.predicted_downtime_us,
                })
                .collect(),
            final_pages: r.final_pages,
            device_state_bytes: r.device_state_bytes,
            downtime_target_us: r.downtime_target_us,
            predicted_downtime_us: r.predicted_downtime_us,
            downtime_us: r.downtime_us,
            downtime_breakdown: DowntimeBreakdownInfo {
                pause_us: b.pause_us,
                final_pages_us: b.final_pages_us,
                snapshot_us: b.snapshot_us,
                state_transfer_us: b.state_transfer_us,
                restore_us: b.restore_us,
                resume_us: b.resume_us,
            },
            total_time_us: r.total_time_us,
            bytes_sent: r.bytes_sent,
            pages_sent: r.pages_sent,
            zero_pages_sent: r.zero_pages_sent,
            bandwidth_bytes_per_sec: r.bandwidth_bytes_per_sec,
        }
    }
}

/// The destination's report of a received migration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DestinationReportInfo {
    /// Protocol version used.
    pub protocol_version: u32,
    /// Rounds in which pages arrived (the stop-and-copy round included).
    pub rounds: u32,
    /// Pages written.
    pub pages: u64,
    /// Of which zero markers.
    pub zero_pages: u64,
    /// Size of the device-state envelope in bytes.
    pub device_state_bytes: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Time from the hello to the resume, in microseconds.
    pub total_time_us: u64,
    /// Whether the final acknowledgement reached the source (if not, the source stays paused
    /// and reports the handover as unconfirmed: destroy it).
    pub ack_delivered: bool,
}

impl From<&vgpu_migration::DestinationReport> for DestinationReportInfo {
    fn from(r: &vgpu_migration::DestinationReport) -> Self {
        DestinationReportInfo {
            protocol_version: r.protocol_version,
            rounds: r.rounds,
            pages: r.pages,
            zero_pages: r.zero_pages,
            device_state_bytes: r.device_state_bytes,
            bytes_received: r.bytes_received,
            total_time_us: r.total_time_us,
            ack_delivered: r.ack_delivered,
        }
    }
}

/// A migration, outgoing or incoming, running or finished.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationInfo {
    /// Migration id (this daemon's; unrelated to the peer's).
    pub id: u64,
    /// Which end this daemon is.
    pub direction: MigrationDirection,
    /// Where it stands.
    pub state: MigrationState,
    /// Outgoing: the destination (`to`); incoming: the address listened on (with the port
    /// picked for `tcp:HOST:0`).
    pub endpoint: String,
    /// Outgoing: the source vGPU; incoming: the new vGPU, once created (at the hello).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vgpu: Option<u32>,
    /// That vGPU's name (incoming: the requested name, if any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vgpu_name: Option<String>,
    /// Milliseconds since the UNIX epoch when the request was accepted.
    pub started_ms: u64,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// A `DELETE` asked to cancel it (it ends as `cancelled`, or `completed` if the handover
    /// was already under way).
    pub cancel_requested: bool,
    /// Outgoing: the last progress sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<MigrationProgress>,
    /// Incoming: what has arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received: Option<IncomingProgress>,
    /// Outgoing, completed: the source's report (predicted vs measured downtime, rounds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<MigrationReportInfo>,
    /// Outgoing, completed: whether the source vGPU was destroyed (`keep_source` leaves it,
    /// paused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_destroyed: Option<bool>,
    /// Incoming, completed: the destination's report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_report: Option<DestinationReportInfo>,
    /// Incoming, completed: the new vGPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<VgpuInfo>,
    /// Failed or cancelled: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// `POST /api/v1/vgpus/{id}/dirty-log`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DirtyLogRequest {
    /// Start (`true`, clearing the log) or stop (`false`, discarding it) logging the guest-RAM
    /// pages the vGPU's engines write.
    pub enabled: bool,
}

/// Whether the guest-RAM dirty log is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DirtyLogState {
    /// Logging on.
    pub enabled: bool,
}

/// `GET /api/v1/vgpus/{id}/dirty-log` query.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DirtyLogQuery {
    /// First guest-physical address of the range (4 KiB aligned).
    pub gpa: u64,
    /// Length of the range in bytes (4 KiB aligned).
    pub len: u64,
}

/// Guest pages the vGPU's engines wrote, taken from the log (a page is reported once, then
/// forgotten until written again).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DirtyPages {
    /// Bytes per page (4096).
    pub page_size: u64,
    /// Guest page numbers (guest-physical address / `page_size`), ascending.
    pub pages: Vec<u64>,
    /// The range was not covered completely (the reply is bounded): ask again from `next_gpa`.
    pub more: bool,
    /// Where the next request continues when `more` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_gpa: Option<u64>,
}
