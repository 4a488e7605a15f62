//! The daemon's core: the software physical GPU, its scheduler, and the vGPUs it serves, each on
//! its own vfio-user socket. Every control-plane action of the REST API is one method here; the
//! methods block (scrubbing local memory, waiting for engines) and are thread-safe.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use vgpu_abi::Engine;
use vgpu_device::addr::GmAddr;
use vgpu_device::hist::{Histogram, HistogramSnapshot};
use vgpu_device::phys::{profile, profiles, PhysError, PhysGpu, PhysGpuConfig};
use vgpu_device::sched::{SchedConfig, SchedError, SchedParams, Scheduler};
use vgpu_device::vgpu::display::{scanout, DisplayError, Frame};
use vgpu_device::vgpu::{GttMode, Vgpu, VgpuConfig, VgpuError, VgpuShared};
use vgpu_vfio_user::{Backend, Server, ServerStats};

use crate::backend::VgpuBackend;
use crate::model::{
    AuditEventInfo, AuditPage, AuditQuery, EngineInfo, EngineName, EngineSched, EngineStatsInfo,
    GpuInfo, LatencySummary, PolicyName, ProfileInfo, SchedUpdate, TraceEventInfo, TraceExport,
    TraceQuery, VgpuInfo, VgpuSched, VgpuStats,
};

/// Errors of daemon operations.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// No profile of that name.
    #[error("Unknown profile '{0}'")]
    UnknownProfile(String),
    /// Admission refused or the physical GPU failed.
    #[error("Cannot create the vGPU")]
    Phys(#[from] PhysError),
    /// The device model refused.
    #[error("Cannot build the vGPU")]
    Vgpu(#[from] VgpuError),
    /// The scheduler refused (its message says why).
    #[error(transparent)]
    Sched(#[from] SchedError),
    /// The vfio-user server could not start.
    #[error("Cannot serve the vGPU on {path}")]
    Serve {
        /// Socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: vgpu_vfio_user::Error,
    },
    /// No vGPU with that id.
    #[error("No vGPU {0}")]
    UnknownVgpu(u32),
    /// No vGPU with that name.
    #[error("No vGPU named '{0}'")]
    UnknownName(String),
    /// A vGPU spec string did not parse.
    #[error("Bad vGPU spec '{spec}': {reason}")]
    BadSpec {
        /// The spec.
        spec: String,
        /// Why.
        reason: String,
    },
    /// A vGPU name is malformed.
    #[error("Bad vGPU name '{name}': {reason}")]
    BadName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// The name is taken.
    #[error("A vGPU named '{0}' exists")]
    NameTaken(String),
    /// The socket directory could not be created.
    #[error("Cannot create socket directory {0}")]
    SocketDir(PathBuf, #[source] std::io::Error),
    /// Deleting a vGPU a VMM is attached to, without `force`.
    #[error("vGPU {0} has a VMM attached (delete with force=true to disconnect it first)")]
    Attached(u32),
    /// The vGPU's profile has no such engine.
    #[error("vGPU {id} has no {engine} engine")]
    NoEngine {
        /// vGPU id.
        id: u32,
        /// Engine name.
        engine: &'static str,
    },
    /// The display plane cannot be scanned out.
    #[error("No frame")]
    Display(#[from] DisplayError),
}

/// Daemon settings.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// The physical GPU.
    pub gpu: PhysGpuConfig,
    /// Scheduler settings.
    pub sched: SchedConfig,
    /// Where vfio-user sockets are created.
    pub socket_dir: PathBuf,
}

/// What to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VgpuSpec {
    /// Profile name.
    pub profile: String,
    /// GTT mode.
    pub gtt: GttMode,
    /// Optional name (also names the socket).
    pub name: Option<String>,
    /// Scheduler weight (default: the profile's).
    pub weight: Option<u32>,
}

/// Checks a vGPU name: 1-64 letters, digits, `-` and `_`, not all digits (names and ids share
/// the API's `{id}` path segment), not one of [`RESERVED_NAMES`].
pub fn check_name(name: &str) -> Result<(), DaemonError> {
    let bad = |reason| {
        Err(DaemonError::BadName {
            name: name.into(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 64 {
        return bad("names are 1 to 64 characters long");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return bad("names use letters, digits, '-' and '_'");
    }
    if name.chars().all(|c| c.is_ascii_digit()) {
        return bad("a name of digits only would read as an id");
    }
    if RESERVED_NAMES.contains(&name) {
        return bad("the name is an API path (/api/v1/vgpus/restore)");
    }
    Ok(())
}

/// Names that are API paths under `/api/v1/vgpus/` and so cannot name a vGPU.
pub const RESERVED_NAMES: &[&str] = &["restore"];

impl std::str::FromStr for VgpuSpec {
    type Err = DaemonError;

    /// Parses `profile=NAME[,gtt=shadow|two-dim][,name=NAME][,weight=N]`.
    fn from_str(s: &str) -> Result<Self, DaemonError> {
        let bad = |reason: String| DaemonError::BadSpec {
            spec: s.into(),
            reason,
        };
        let mut spec = VgpuSpec {
            profile: String::new(),
            gtt: GttMode::Shadow,
            name: None,
            weight: None,
        };
        for kv in s.split(',').filter(|x| !x.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(format!("'{kv}' is not key=value")))?;
            match k {
                "profile" => spec.profile = v.into(),
                "gtt" => spec.gtt = v.parse().map_err(bad)?,
                "name" => {
                    if let Err(DaemonError::BadName { reason, .. }) = check_name(v) {
                        return Err(bad(reason.into()));
                    }
                    spec.name = Some(v.into());
                }
                "weight" => {
                    spec.weight = Some(
                        v.parse()
                            .map_err(|_| bad(format!("weight '{v}' is not a number")))?,
                    )
                }
                _ => return Err(bad(format!("unknown key '{k}'"))),
            }
        }
        if spec.profile.is_empty() {
            return Err(bad("profile=NAME is required".into()));
        }
        Ok(spec)
    }
}

/// What does not change while a vGPU is served.
#[derive(Clone, Debug)]
struct Identity {
    id: u32,
    name: String,
    profile: &'static str,
    gtt: GttMode,
    socket: PathBuf,
}

struct Served {
    ident: Identity,
    vgpu: Arc<Mutex<Vgpu>>,
    shared: Arc<VgpuShared>,
    trap: Arc<Histogram>,
    server: Server,
}

/// Raw counters of one vGPU on one engine (for the stats endpoint and `/metrics`).
#[derive(Clone, Debug)]
pub struct EngineCounters {
    /// Engine.
    pub engine: Engine,
    /// Utilisation over the last sampling window, percent.
    pub busy_pct: f64,
    /// Busy nanoseconds.
    pub busy_ns: u64,
    /// Commands executed.
    pub commands: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Submissions accepted.
    pub submissions: u64,
    /// Preemptions.
    pub preemptions: u64,
    /// Resets.
    pub resets: u64,
    /// Audit events.
    pub audits: u64,
    /// Submission latency.
    pub latency: HistogramSnapshot,
    /// Slice lengths.
    pub slices: HistogramSnapshot,
}

/// Raw counters of one vGPU.
#[derive(Clone, Debug)]
pub struct VgpuCounters {
    /// The vGPU.
    pub info: VgpuInfo,
    /// One entry per engine of its profile.
    pub engines: Vec<EngineCounters>,
    /// Time spent handling trapped region accesses.
    pub trap: HistogramSnapshot,
    /// Audit events since creation.
    pub audit_events: u64,
    /// Malformed or dropped guest register accesses.
    pub bad_accesses: u64,
    /// The vfio-user server's counters.
    pub vfio: ServerStats,
}

/// Busy time at the last utilisation sample.
struct UtilSample {
    t: Instant,
    busy_ns: [u64; Engine::COUNT],
    pct: [f64; Engine::COUNT],
}

/// The daemon.
pub struct Daemon {
    cfg: DaemonConfig,
    phys: Mutex<PhysGpu>,
    sched: Arc<Scheduler>,
    vgpus: Mutex<BTreeMap<u32, Served>>,
    util: Mutex<HashMap<u32, UtilSample>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn engines_of(shared: &VgpuShared) -> impl Iterator<Item = Engine> + '_ {
    Engine::ALL.into_iter().filter(|e| shared.has_engine(*e))
}

fn summary(h: &HistogramSnapshot) -> LatencySummary {
    let count = h.count();
    let us = |ns: Option<u64>| ns.filter(|&n| n != u64::MAX).map(|n| n as f64 / 1000.0);
    LatencySummary {
        count,
        mean_us: if count == 0 {
            0.0
        } else {
            h.sum_ns as f64 / count as f64 / 1000.0
        },
        p50_us: us(h.quantile_ns(0.5)),
        p99_us: us(h.quantile_ns(0.99)),
    }
}

/// Most audit events one page returns.
pub const AUDIT_PAGE_MAX: u32 = 1000;

impl Daemon {
    /// Creates the physical GPU and starts the scheduler.
    pub fn new(cfg: DaemonConfig) -> Result<Self, DaemonError> {
        std::fs::create_dir_all(&cfg.socket_dir)
            .map_err(|e| DaemonError::SocketDir(cfg.socket_dir.clone(), e))?;
        let phys = PhysGpu::new(cfg.gpu)?;
        let sched = Arc::new(Scheduler::new(&cfg.sched)?);
        Ok(Daemon {
            cfg,
            phys: Mutex::new(phys),
            sched,
            vgpus: Mutex::new(BTreeMap::new()),
            util: Mutex::new(HashMap::new()),
        })
    }

    /// The socket directory.
    pub fn socket_dir(&self) -> &Path {
        &self.cfg.socket_dir
    }

    /// Creates a vGPU and serves it on `<socket_dir>/<name>.sock`.
    pub fn create(&self, spec: &VgpuSpec) -> Result<VgpuInfo, DaemonError> {
        self.create_with(spec, None)
    }

    /// [`Daemon::create`] with explicit scheduling parameters (`spec.weight` is then ignored).
    pub fn create_with(
        &self,
        spec: &VgpuSpec,
        sched: Option<SchedParams>,
    ) -> Result<VgpuInfo, DaemonError> {
        self.create_placed(spec, sched, None)
    }

    /// Creates a vGPU whose partition starts at the given GM ranges (mappable, hidden) — a vGPU
    /// restored or migrated from elsewhere keeps its guest's GM numbering — and pauses it in the
    /// scheduler before it is served, so nothing runs until it is restored and resumed.
    pub fn create_at(
        &self,
        spec: &VgpuSpec,
        mappable: GmAddr,
        hidden: GmAddr,
    ) -> Result<VgpuInfo, DaemonError> {
        self.create_placed(spec, None, Some((mappable, hidden)))
    }

    fn create_placed(
        &self,
        spec: &VgpuSpec,
        sched: Option<SchedParams>,
        placement: Option<(GmAddr, GmAddr)>,
    ) -> Result<VgpuInfo, DaemonError> {
        let p = profile(&spec.profile)
            .ok_or_else(|| DaemonError::UnknownProfile(spec.profile.clone()))?;
        if let Some(n) = &spec.name {
            check_name(n)?;
        }
        let params = sched.unwrap_or(SchedParams {
            weight: spec.weight.unwrap_or(p.default_weight),
            ..Default::default()
        });
        params.validate().map_err(SchedError::from)?;
        let mut vgpus = lock(&self.vgpus);
        if let Some(n) = &spec.name {
            if vgpus.values().any(|s| &s.ident.name == n) {
                return Err(DaemonError::NameTaken(n.clone()));
            }
        }
        let part = match placement {
            Some((m, h)) => lock(&self.phys).create_partition_at(p, m, h)?,
            None => lock(&self.phys).create_partition(p)?,
        };
        let id = part.id;
        let name = spec.name.clone().unwrap_or_else(|| format!("vgpu{id}"));
        if spec.name.is_none() && vgpus.values().any(|s| s.ident.name == name) {
            // A user took the default name of this id; keep names unique.
            let _ = lock(&self.phys).release(part);
            return Err(DaemonError::NameTaken(name));
        }
        // A failure here would strand the partition (`Vgpu::new` consumes it), but building the
        // PCI function fails only for BAR sizes that profile validation already rules out.
        let vgpu = Vgpu::new(
            part,
            &VgpuConfig {
                gtt_mode: spec.gtt,
                ..Default::default()
            },
        )?;
        let socket = self.cfg.socket_dir.join(format!("{name}.sock"));
        let shared = vgpu.shared().clone();
        let vgpu = Arc::new(Mutex::new(vgpu));
        if let Err(e) = self.sched.add_vgpu(shared.clone(), params) {
            drop(shared);
            self.release(vgpu);
            return Err(e.into());
        }
        if placement.is_some() {
            // Restored state arrives before anything may run.
            let _ = self.sched.pause(id);
        }
        let sched_hook = self.sched.clone();
        let pause: crate::vfio_migration::PauseHook = Arc::new(move |paused: bool| {
            let r = if paused {
                sched_hook.pause(id)
            } else {
                sched_hook.resume(id)
            };
            if let Err(e) = r {
                tracing::warn!(id, error = %e, "pause hook");
            }
        });
        let backend = VgpuBackend::new(vgpu.clone()).with_migration(pause);
        let trap = backend.trap_latency().clone();
        let backend: Arc<Mutex<dyn Backend>> = Arc::new(Mutex::new(backend));
        let server = match Server::start(&socket, backend) {
            Ok(s) => s,
            Err(source) => {
                let _ = self.sched.remove_vgpu(id);
                drop(shared);
                self.release(vgpu);
                return Err(DaemonError::Serve {
                    path: socket,
                    source,
                });
            }
        };
        let ident = Identity {
            id,
            name,
            profile: p.name,
            gtt: spec.gtt,
            socket,
        };
        tracing::info!(id, name = %ident.name, profile = p.name, socket = %ident.socket.display(), "vGPU created");
        let served = Served {
            ident,
            vgpu,
            shared,
            trap,
            server,
        };
        let info = self.info_of(&served);
        vgpus.insert(id, served);
        Ok(info)
    }

    fn info_of(&self, s: &Served) -> VgpuInfo {
        VgpuInfo {
            id: s.ident.id,
            name: s.ident.name.clone(),
            profile: s.ident.profile.into(),
            gtt: s.ident.gtt.into(),
            socket: s.ident.socket.clone(),
            connected: s.server.is_connected(),
            paused: self.sched.is_paused(s.ident.id),
            lmem_bytes: s.shared.lmem().size(),
        }
    }

    /// Returns a vGPU's partition to the physical GPU (scrubbed), waiting for engines and API
    /// readers to let go.
    fn release(&self, vgpu: Arc<Mutex<Vgpu>>) {
        let mut vgpu = vgpu;
        loop {
            match Arc::try_unwrap(vgpu) {
                Ok(m) => {
                    let mut v = m.into_inner().unwrap_or_else(PoisonError::into_inner);
                    loop {
                        match v.into_partition() {
                            Ok(p) => {
                                if let Err(e) = lock(&self.phys).release(p) {
                                    tracing::error!(error = %e, "cannot release partition");
                                }
                                return;
                            }
                            Err(b) => {
                                v = b.0;
                                std::thread::sleep(std::time::Duration::from_millis(1));
                            }
                        }
                    }
                }
                Err(a) => {
                    vgpu = a;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
    }

    /// Stops serving a vGPU and frees it, disconnecting an attached VMM. Its local memory is
    /// scrubbed before reuse.
    pub fn destroy(&self, id: u32) -> Result<(), DaemonError> {
        self.remove(id, true)
    }

    /// Stops serving a vGPU and frees it. Without `force`, a vGPU with a VMM attached is
    /// refused ([`DaemonError::Attached`]) and stays as it was; with `force` the client is
    /// disconnected first (its device disappears under it, like a surprise hot-unplug).
    pub fn remove(&self, id: u32, force: bool) -> Result<(), DaemonError> {
        let served = {
            let mut vgpus = lock(&self.vgpus);
            let s = vgpus.get(&id).ok_or(DaemonError::UnknownVgpu(id))?;
            if !force && s.server.is_connected() {
                return Err(DaemonError::Attached(id));
            }
            vgpus.remove(&id).ok_or(DaemonError::UnknownVgpu(id))?
        };
        let Served {
            ident,
            vgpu,
            shared,
            trap,
            server,
        } = served;
        server.shutdown();
        let _ = self.sched.remove_vgpu(id);
        drop((shared, trap));
        self.release(vgpu);
        lock(&self.util).remove(&id);
        tracing::info!(id, name = %ident.name, force, "vGPU destroyed");
        Ok(())
    }

    /// The served vGPUs.
    pub fn list(&self) -> Vec<VgpuInfo> {
        lock(&self.vgpus)
            .values()
            .map(|s| self.info_of(s))
            .collect()
    }

    /// The id of the vGPU called `key` (a decimal id or a name).
    pub fn resolve(&self, key: &str) -> Result<u32, DaemonError> {
        let vgpus = lock(&self.vgpus);
        if let Ok(id) = key.parse::<u32>() {
            return if vgpus.contains_key(&id) {
                Ok(id)
            } else {
                Err(DaemonError::UnknownVgpu(id))
            };
        }
        vgpus
            .values()
            .find(|s| s.ident.name == key)
            .map(|s| s.ident.id)
            .ok_or_else(|| DaemonError::UnknownName(key.into()))
    }

    /// One vGPU.
    pub fn info(&self, id: u32) -> Result<VgpuInfo, DaemonError> {
        let vgpus = lock(&self.vgpus);
        let s = vgpus.get(&id).ok_or(DaemonError::UnknownVgpu(id))?;
        Ok(self.info_of(s))
    }

    /// The device of vGPU `id`.
    pub fn vgpu(&self, id: u32) -> Option<Arc<Mutex<Vgpu>>> {
        lock(&self.vgpus).get(&id).map(|s| s.vgpu.clone())
    }

    fn shared(&self, id: u32) -> Result<Arc<VgpuShared>, DaemonError> {
        lock(&self.vgpus)
            .get(&id)
            .map(|s| s.shared.clone())
            .ok_or(DaemonError::UnknownVgpu(id))
    }

    /// The scheduler.
    pub fn scheduler(&self) -> &Scheduler {
        &self.sched
    }

    /// Pauses vGPU `id`: its engines stop running its work (doorbells still queue); returns once
    /// no engine executes it. Idempotent.
    pub fn pause(&self, id: u32) -> Result<VgpuInfo, DaemonError> {
        self.info(id)?;
        self.sched.pause(id)?;
        self.info(id)
    }

    /// Resumes vGPU `id`. Idempotent.
    pub fn resume(&self, id: u32) -> Result<VgpuInfo, DaemonError> {
        self.info(id)?;
        self.sched.resume(id)?;
        self.info(id)
    }

    /// Full device reset of vGPU `id` (as the guest's `RESET_CTL` full reset: registers,
    /// engines, queued work, GGTT and display back to creation state; PCI config space, MSI-X
    /// set-up and local memory are kept, so an attached VMM stays attached).
    pub fn reset(&self, id: u32) -> Result<VgpuInfo, DaemonError> {
        let vgpu = self.vgpu(id).ok_or(DaemonError::UnknownVgpu(id))?;
        vgpu.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .reset_device();
        tracing::info!(id, "vGPU reset by the host");
        self.info(id)
    }

    /// The physical GPU.
    pub fn gpu_info(&self) -> GpuInfo {
        let vgpus = u32::try_from(lock(&self.vgpus).len()).unwrap_or(u32::MAX);
        let phys = lock(&self.phys);
        GpuInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            lmem_bytes: phys.config().lmem_size,
            lmem_used_bytes: phys.lmem_used(),
            max_vgpus: phys.config().max_vgpus,
            vgpus,
        }
    }

    /// The profiles, with how many more instances of each fit now.
    pub fn profiles(&self) -> Vec<ProfileInfo> {
        let phys = lock(&self.phys);
        profiles()
            .iter()
            .map(|p| ProfileInfo {
                name: p.name.into(),
                description: p.description.into(),
                lmem_bytes: p.lmem_size,
                hidden_gm_bytes: p.hidden_gm_size,
                default_weight: p.default_weight,
                max_width: p.max_width,
                max_height: p.max_height,
                engines: Engine::ALL
                    .into_iter()
                    .filter(|e| p.has_engine(*e))
                    .map(EngineName::from)
                    .collect(),
                available: phys.available_instances(p),
            })
            .collect()
    }

    /// Scheduling of vGPU `id` on each of its engines.
    pub fn sched(&self, id: u32) -> Result<VgpuSched, DaemonError> {
        self.info(id)?;
        let engines = self
            .sched
            .shares()
            .into_iter()
            .filter(|s| s.vgpu == id)
            .filter_map(|s| {
                let engine: EngineName = s.engine.parse().ok()?;
                Some(EngineSched {
                    engine,
                    policy: self.sched.policy(engine.into()).into(),
                    weight: s.params.weight,
                    reserve_pct: s.params.reserve_pct,
                    cap_pct: s.params.cap_pct,
                    busy_ns: s.busy_ns,
                })
            })
            .collect();
        Ok(VgpuSched { id, engines })
    }

    /// Changes vGPU `id`'s scheduling parameters (fields left out keep their value) on one or
    /// all of its engines: all or nothing.
    pub fn set_sched(&self, id: u32, upd: &SchedUpdate) -> Result<VgpuSched, DaemonError> {
        let shared = self.shared(id)?;
        let targets: Vec<Engine> = match upd.engine {
            Some(e) => {
                let e = Engine::from(e);
                if !shared.has_engine(e) {
                    return Err(DaemonError::NoEngine {
                        id,
                        engine: e.name(),
                    });
                }
                vec![e]
            }
            None => engines_of(&shared).collect(),
        };
        drop(shared);
        let current = self.sched(id)?;
        let merged: Vec<(Engine, SchedParams, SchedParams)> = targets
            .into_iter()
            .filter_map(|e| {
                let c = current
                    .engines
                    .iter()
                    .find(|x| Engine::from(x.engine) == e)?;
                let old = SchedParams {
                    weight: c.weight,
                    reserve_pct: c.reserve_pct,
                    cap_pct: c.cap_pct,
                };
                let new = SchedParams {
                    weight: upd.weight.unwrap_or(old.weight),
                    reserve_pct: upd.reserve_pct.unwrap_or(old.reserve_pct),
                    cap_pct: upd.cap_pct.unwrap_or(old.cap_pct),
                };
                Some((e, old, new))
            })
            .collect();
        for (_, _, new) in &merged {
            new.validate().map_err(SchedError::from)?;
        }
        let same = merged.windows(2).all(|w| w[0].2 == w[1].2);
        if upd.engine.is_none() && same {
            if let Some((_, _, new)) = merged.first() {
                // One call: the scheduler checks every engine before changing any.
                self.sched.set_params(id, None, *new)?;
            }
        } else {
            for (i, (e, _, new)) in merged.iter().enumerate() {
                if let Err(err) = self.sched.set_params(id, Some(*e), *new) {
                    for (e, old, _) in &merged[..i] {
                        let _ = self.sched.set_params(id, Some(*e), *old);
                    }
                    return Err(err.into());
                }
            }
        }
        self.sched(id)
    }

    /// The engines and their policies.
    pub fn engines(&self) -> Vec<EngineInfo> {
        let shares = self.sched.shares();
        Engine::ALL
            .into_iter()
            .map(|e| EngineInfo {
                engine: e.into(),
                policy: self.sched.policy(e).into(),
                vgpus: u32::try_from(shares.iter().filter(|s| s.engine == e.name()).count())
                    .unwrap_or(u32::MAX),
            })
            .collect()
    }

    /// Sets an engine's scheduling policy. Idempotent.
    pub fn set_policy(&self, engine: EngineName, policy: PolicyName) -> EngineInfo {
        self.sched.set_policy(engine.into(), policy.into());
        tracing::info!(engine = %engine, policy = %policy, "engine policy set");
        self.engines()
            .into_iter()
            .find(|x| x.engine == engine)
            .unwrap_or(EngineInfo {
                engine,
                policy,
                vgpus: 0,
            })
    }

    /// Takes a utilisation sample of every vGPU's engines; `busy_pct` is the busy time between
    /// the last two samples. The API server calls this once a second.
    pub fn sample_utilisation(&self) {
        let now = Instant::now();
        let served: Vec<(u32, Arc<VgpuShared>)> = lock(&self.vgpus)
            .iter()
            .map(|(id, s)| (*id, s.shared.clone()))
            .collect();
        let mut util = lock(&self.util);
        util.retain(|id, _| served.iter().any(|(x, _)| x == id));
        for (id, shared) in served {
            let busy = Engine::ALL.map(|e| {
                shared
                    .engine(e)
                    .stats
                    .busy_ns
                    .load(std::sync::atomic::Ordering::Relaxed)
            });
            let s = util.entry(id).or_insert(UtilSample {
                t: now,
                busy_ns: busy,
                pct: [0.0; Engine::COUNT],
            });
            let dt = now.duration_since(s.t).as_nanos() as f64;
            if dt > 0.0 {
                for ((pct, now_ns), then_ns) in s.pct.iter_mut().zip(busy).zip(s.busy_ns) {
                    let d = now_ns.saturating_sub(then_ns) as f64;
                    *pct = (d / dt * 100.0).clamp(0.0, 100.0);
                }
            }
            s.t = now;
            s.busy_ns = busy;
        }
    }

    /// Raw counters of every vGPU.
    pub fn counters(&self) -> Vec<VgpuCounters> {
        let served: Vec<(VgpuInfo, Arc<VgpuShared>, Arc<Histogram>, ServerStats)> =
            lock(&self.vgpus)
                .values()
                .map(|s| {
                    (
                        self.info_of(s),
                        s.shared.clone(),
                        s.trap.clone(),
                        s.server.stats(),
                    )
                })
                .collect();
        let util = lock(&self.util);
        served
            .into_iter()
            .map(|(info, shared, trap, vfio)| {
                let pct = util.get(&info.id).map(|u| u.pct);
                let engines = engines_of(&shared)
                    .map(|e| {
                        let st = &shared.engine(e).stats;
                        let r = |c: &std::sync::atomic::AtomicU64| {
                            c.load(std::sync::atomic::Ordering::Relaxed)
                        };
                        EngineCounters {
                            engine: e,
                            busy_pct: pct.map_or(0.0, |p| p[e.index()]),
                            busy_ns: r(&st.busy_ns),
                            commands: r(&st.commands),
                            bytes: r(&st.bytes),
                            submissions: r(&st.submissions),
                            preemptions: r(&st.preemptions),
                            resets: r(&st.resets),
                            audits: r(&st.audits),
                            latency: st.latency.snapshot(),
                            slices: st.slices.snapshot(),
                        }
                    })
                    .collect();
                VgpuCounters {
                    audit_events: shared.audit.total(),
                    bad_accesses: shared.bad_accesses(),
                    trap: trap.snapshot(),
                    engines,
                    vfio,
                    info,
                }
            })
            .collect()
    }

    fn stats_of(c: &VgpuCounters) -> VgpuStats {
        VgpuStats {
            id: c.info.id,
            name: c.info.name.clone(),
            connected: c.info.connected,
            paused: c.info.paused,
            audit_events: c.audit_events,
            bad_accesses: c.bad_accesses,
            trap_latency: summary(&c.trap),
            engines: c
                .engines
                .iter()
                .map(|e| EngineStatsInfo {
                    engine: e.engine.into(),
                    busy_pct: e.busy_pct,
                    busy_ns: e.busy_ns,
                    commands: e.commands,
                    bytes: e.bytes,
                    submissions: e.submissions,
                    preemptions: e.preemptions,
                    resets: e.resets,
                    audit_events: e.audits,
                    submission_latency: summary(&e.latency),
                    slice: summary(&e.slices),
                })
                .collect(),
        }
    }

    /// Statistics of every vGPU.
    pub fn all_stats(&self) -> Vec<VgpuStats> {
        self.counters().iter().map(Self::stats_of).collect()
    }

    /// Statistics of vGPU `id`.
    pub fn stats(&self, id: u32) -> Result<VgpuStats, DaemonError> {
        self.counters()
            .iter()
            .find(|c| c.info.id == id)
            .map(Self::stats_of)
            .ok_or(DaemonError::UnknownVgpu(id))
    }

    /// A page of vGPU `id`'s audit events.
    pub fn audit(&self, id: u32, q: &AuditQuery) -> Result<AuditPage, DaemonError> {
        let shared = self.shared(id)?;
        let after = q.after.unwrap_or(0);
        let limit = q.limit.unwrap_or(100).clamp(1, AUDIT_PAGE_MAX) as usize;
        let all = shared.audit.since(after, usize::MAX);
        let mut events = Vec::new();
        let mut next_after = after;
        for ev in all {
            if events.len() == limit {
                break;
            }
            next_after = ev.seq;
            let Ok(engine) = ev.engine.parse::<EngineName>() else {
                continue;
            };
            if q.engine.is_some_and(|e| e != engine) {
                continue;
            }
            if q.reason.as_deref().is_some_and(|r| r != ev.reason) {
                continue;
            }
            events.push(AuditEventInfo {
                seq: ev.seq,
                vgpu: ev.vgpu,
                engine,
                addr: ev.addr,
                header: ev.header,
                opcode: ev.opcode,
                reason: ev.reason.into(),
                detail: ev.detail,
                time_ms: ev.time_ms,
            });
        }
        Ok(AuditPage {
            events,
            next_after,
            total: shared.audit.total(),
        })
    }

    /// The scheduler trace, filtered.
    pub fn trace(&self, q: &TraceQuery) -> TraceExport {
        let engine = q.engine.map(|e| Engine::from(e).name());
        TraceExport {
            events: self
                .sched
                .trace()
                .into_iter()
                .filter(|t| engine.is_none_or(|e| t.engine == e))
                .filter(|t| q.vgpu.is_none_or(|v| t.vgpu == v))
                .map(|t| TraceEventInfo {
                    t_us: t.t_us,
                    engine: t.engine,
                    vgpu: t.vgpu,
                    dur_us: t.dur_us,
                    commands: t.commands,
                    why: t.why,
                    end: t.end,
                })
                .collect(),
        }
    }

    /// The frame vGPU `id`'s display plane shows.
    pub fn display(&self, id: u32) -> Result<Frame, DaemonError> {
        let shared = self.shared(id)?;
        Ok(scanout(&shared)?)
    }

    /// Stops every vGPU and removes every socket.
    pub fn shutdown(&self) {
        let ids: Vec<u32> = lock(&self.vgpus).keys().copied().collect();
        for id in ids {
            let _ = self.destroy(id);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_spec_parse_accepts_full_and_rejects_bad() {
        let s: VgpuSpec = "profile=small,gtt=two-dim,name=vm1,weight=3"
            .parse()
            .unwrap();
        assert_eq!(
            s,
            VgpuSpec {
                profile: "small".into(),
                gtt: GttMode::TwoDim,
                name: Some("vm1".into()),
                weight: Some(3)
            }
        );
        assert!("gtt=shadow".parse::<VgpuSpec>().is_err());
        assert!("profile=small,gtt=3d".parse::<VgpuSpec>().is_err());
        assert!("profile=small,name=../x".parse::<VgpuSpec>().is_err());
        assert!("profile=small,name=restore".parse::<VgpuSpec>().is_err());
        assert!("profile=small,color=red".parse::<VgpuSpec>().is_err());
        assert!("profile".parse::<VgpuSpec>().is_err());
    }
}
