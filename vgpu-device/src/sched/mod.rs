//! The per-engine scheduler: one worker thread per physical engine, each with its own run queue,
//! so different vGPUs use different engines at the same time (Demon's per-engine address
//! spaces). Slices of 1–10 ms, preemption at command boundaries, a watchdog that resets only the
//! hung context, and a bounded trace.

pub mod queue;
pub mod trace;
mod worker;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vgpu_abi::Engine;

use crate::vgpu::shared::{VgpuShared, WorkNotify};

pub use queue::{ParamsError, Policy, SchedParams};
pub use trace::TraceEvent;

/// Errors of scheduler requests.
#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    /// Bad parameters.
    #[error(transparent)]
    Params(#[from] ParamsError),
    /// Slice length outside 1–10 ms.
    #[error("Slice {0:?} outside 1..=10 ms")]
    Slice(Duration),
    /// No such vGPU on the scheduler.
    #[error("vGPU {0} is not scheduled")]
    UnknownVgpu(u32),
    /// The vGPU is already scheduled.
    #[error("vGPU {0} is already scheduled")]
    Duplicate(u32),
    /// A worker thread could not be started.
    #[error("Cannot start engine worker")]
    Spawn(#[source] std::io::Error),
}

/// Scheduler settings.
#[derive(Clone, Debug)]
pub struct SchedConfig {
    /// Time slice, 1–10 ms.
    pub slice: Duration,
    /// A context waiting (or running one command) longer than this is reset.
    pub watchdog: Duration,
    /// Trace events kept.
    pub trace_capacity: usize,
}

impl Default for SchedConfig {
    fn default() -> Self {
        SchedConfig {
            slice: Duration::from_millis(2),
            watchdog: Duration::from_secs(2),
            trace_capacity: 4096,
        }
    }
}

/// The run queue of one engine and its vGPUs.
struct EngineQueue {
    rq: queue::RunQueue,
    vgpus: HashMap<u32, Arc<VgpuShared>>,
    /// The vGPU whose slice is executing.
    running: Option<u32>,
    /// Work was signalled since the worker last looked.
    kicked: bool,
    /// vGPUs that had work at the last pick (to detect wake-ups).
    busy: Vec<u32>,
    /// Paused vGPUs: their contexts are not picked (doorbells still queue work).
    paused: HashSet<u32>,
}

struct EngineSlot {
    q: Mutex<EngineQueue>,
    cv: Condvar,
}

impl EngineSlot {
    fn lock(&self) -> MutexGuard<'_, EngineQueue> {
        self.q.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub(crate) struct Inner {
    engines: [EngineSlot; Engine::COUNT],
    trace: trace::Trace,
    start: Instant,
    slice_ns: AtomicU64,
    watchdog_ns: AtomicU64,
    shutdown: AtomicBool,
}

impl WorkNotify for Inner {
    fn work_ready(&self, _vgpu: u32, engine: Engine) {
        let slot = &self.engines[engine.index()];
        slot.lock().kicked = true;
        slot.cv.notify_all();
    }
}

/// The scheduler of one physical GPU.
pub struct Scheduler {
    inner: Arc<Inner>,
    workers: Vec<JoinHandle<()>>,
}

/// Delivered engine time of one vGPU on one engine.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ShareInfo {
    /// vGPU id.
    pub vgpu: u32,
    /// Engine name.
    pub engine: &'static str,
    /// Parameters.
    pub params: SchedParams,
    /// Busy nanoseconds since the vGPU joined the engine.
    pub busy_ns: u64,
}

impl Scheduler {
    /// Starts one worker per engine.
    pub fn new(cfg: &SchedConfig) -> Result<Self, SchedError> {
        check_slice(cfg.slice)?;
        let inner = Arc::new(Inner {
            engines: Engine::ALL.map(|_| EngineSlot {
                q: Mutex::new(EngineQueue {
                    rq: queue::RunQueue::default(),
                    vgpus: HashMap::new(),
                    running: None,
                    kicked: false,
                    busy: Vec::new(),
                    paused: HashSet::new(),
                }),
                cv: Condvar::new(),
            }),
            trace: trace::Trace::new(cfg.trace_capacity),
            start: Instant::now(),
            slice_ns: AtomicU64::new(u64::try_from(cfg.slice.as_nanos()).unwrap_or(u64::MAX)),
            watchdog_ns: AtomicU64::new(u64::try_from(cfg.watchdog.as_nanos()).unwrap_or(u64::MAX)),
            shutdown: AtomicBool::new(false),
        });
        let mut workers = Vec::new();
        for e in Engine::ALL {
            let inner = inner.clone();
            let h = std::thread::Builder::new()
                .name(format!("vgpu-{}", e.name()))
                .spawn(move || worker::run(&inner, e))
                .map_err(SchedError::Spawn)?;
            workers.push(h);
        }
        Ok(Scheduler { inner, workers })
    }

    /// Schedules a vGPU on every engine its profile has, with `params` on each.
    pub fn add_vgpu(&self, v: Arc<VgpuShared>, params: SchedParams) -> Result<(), SchedError> {
        params.validate()?;
        let id = v.id();
        for e in Engine::ALL.into_iter().filter(|e| v.has_engine(*e)) {
            let q = self.inner.engines[e.index()].lock();
            if q.vgpus.contains_key(&id) {
                return Err(SchedError::Duplicate(id));
            }
            check_reserve(&q.rq, e, id, params)?;
        }
        for e in Engine::ALL.into_iter().filter(|e| v.has_engine(*e)) {
            let mut q = self.inner.engines[e.index()].lock();
            q.rq.add(id, params);
            q.vgpus.insert(id, v.clone());
        }
        let notify: Arc<dyn WorkNotify> = self.inner.clone();
        v.set_notify(Some(notify));
        for e in Engine::ALL {
            self.inner.work_ready(id, e);
        }
        Ok(())
    }

    /// Stops scheduling a vGPU; returns when no engine executes it any more.
    pub fn remove_vgpu(&self, id: u32) -> Result<(), SchedError> {
        let mut found = false;
        for slot in &self.inner.engines {
            let mut q = slot.lock();
            found |= q.vgpus.remove(&id).is_some();
            q.rq.remove(id);
            q.paused.remove(&id);
            while q.running == Some(id) {
                q = slot.cv.wait(q).unwrap_or_else(PoisonError::into_inner);
            }
        }
        if found {
            Ok(())
        } else {
            Err(SchedError::UnknownVgpu(id))
        }
    }

    /// Pauses a vGPU: its contexts are no longer picked on any engine (doorbells still scan
    /// and queue work); returns when no engine executes it any more. Idempotent.
    pub fn pause(&self, id: u32) -> Result<(), SchedError> {
        let mut found = false;
        for slot in &self.inner.engines {
            let mut q = slot.lock();
            if !q.vgpus.contains_key(&id) {
                continue;
            }
            found = true;
            q.paused.insert(id);
            while q.running == Some(id) {
                q = slot.cv.wait(q).unwrap_or_else(PoisonError::into_inner);
            }
        }
        if found {
            Ok(())
        } else {
            Err(SchedError::UnknownVgpu(id))
        }
    }

    /// Resumes a paused vGPU (idempotent). A context that waited on a semaphore while paused
    /// has its watchdog clock restarted, so the pause does not count as a hang.
    pub fn resume(&self, id: u32) -> Result<(), SchedError> {
        let mut found = false;
        for (i, slot) in self.inner.engines.iter().enumerate() {
            let mut q = slot.lock();
            let Some(v) = q.vgpus.get(&id).cloned() else {
                continue;
            };
            found = true;
            if q.paused.remove(&id) {
                if let Some(e) = Engine::from_index(i) {
                    let mut st = v.engine(e).state();
                    if st.wait_since.is_some() {
                        st.wait_since = Some(Instant::now());
                    }
                }
                q.kicked = true;
                slot.cv.notify_all();
            }
        }
        if found {
            Ok(())
        } else {
            Err(SchedError::UnknownVgpu(id))
        }
    }

    /// Whether a vGPU is paused (`false` for unknown ids).
    pub fn is_paused(&self, id: u32) -> bool {
        self.inner
            .engines
            .iter()
            .any(|slot| slot.lock().paused.contains(&id))
    }

    /// Changes a vGPU's parameters on one engine, or on all of its engines.
    pub fn set_params(
        &self,
        id: u32,
        engine: Option<Engine>,
        params: SchedParams,
    ) -> Result<(), SchedError> {
        params.validate()?;
        let mut found = false;
        let engines: Vec<Engine> = engine.map_or(Engine::ALL.to_vec(), |e| vec![e]);
        for &e in &engines {
            let q = self.inner.engines[e.index()].lock();
            if q.vgpus.contains_key(&id) {
                check_reserve(&q.rq, e, id, params)?;
            }
        }
        for e in engines {
            let mut q = self.inner.engines[e.index()].lock();
            if let Some(entry) = q.rq.entries.iter_mut().find(|x| x.id == id) {
                entry.params = params;
                found = true;
            }
        }
        if found {
            Ok(())
        } else {
            Err(SchedError::UnknownVgpu(id))
        }
    }

    /// Changes the policy of an engine.
    pub fn set_policy(&self, engine: Engine, policy: Policy) {
        self.inner.engines[engine.index()].lock().rq.policy = policy;
    }

    /// The policy of an engine.
    pub fn policy(&self, engine: Engine) -> Policy {
        self.inner.engines[engine.index()].lock().rq.policy
    }

    /// Changes the slice length (1–10 ms).
    pub fn set_slice(&self, slice: Duration) -> Result<(), SchedError> {
        check_slice(slice)?;
        self.inner.slice_ns.store(
            u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Release,
        );
        Ok(())
    }

    /// Changes the watchdog limit.
    pub fn set_watchdog(&self, limit: Duration) {
        self.inner.watchdog_ns.store(
            u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Release,
        );
    }

    /// Delivered time per vGPU and engine.
    pub fn shares(&self) -> Vec<ShareInfo> {
        let mut out = Vec::new();
        for e in Engine::ALL {
            let q = self.inner.engines[e.index()].lock();
            for x in &q.rq.entries {
                out.push(ShareInfo {
                    vgpu: x.id,
                    engine: e.name(),
                    params: x.params,
                    busy_ns: x.total_ns,
                });
            }
        }
        out
    }

    /// The trace, oldest first.
    pub fn trace(&self) -> Vec<TraceEvent> {
        self.inner.trace.export()
    }
}

fn check_slice(slice: Duration) -> Result<(), SchedError> {
    if slice < Duration::from_millis(1) || slice > Duration::from_millis(10) {
        return Err(SchedError::Slice(slice));
    }
    Ok(())
}

fn check_reserve(
    rq: &queue::RunQueue,
    e: Engine,
    id: u32,
    p: SchedParams,
) -> Result<(), SchedError> {
    let total = rq.reserved_pct(id) + p.reserve_pct;
    if total > 100 {
        return Err(ParamsError::OverReserved {
            engine: e.name(),
            total,
        }
        .into());
    }
    Ok(())
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.inner.shutdown.store(true, Ordering::Release);
        for slot in &self.inner.engines {
            let _q = slot.lock();
            slot.cv.notify_all();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}
