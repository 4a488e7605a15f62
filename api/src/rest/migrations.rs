//! Background migrations: each `POST …/migrate` or `POST /api/v1/migrations/incoming` starts
//! one thread that runs the migration (`crate::migrate`) and publishes its state into a shared
//! [`MigrationInfo`], which `GET /api/v1/migrations/{mid}` reads. The registry keeps every
//! running migration and the newest [`HISTORY`] finished ones.
//!
//! While a migration holds a vGPU (the source of an outgoing one, the vGPU an incoming one
//! creates), requests that would change it under the migration (delete, pause, resume, reset,
//! snapshot, a second migration) are refused with 409 `migration_in_progress`
//! ([`Migrations::check_idle`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vgpu_device::vgpu::GttMode;
use vgpu_migration::{
    CancelToken, DestinationConfig, DestinationError, LiveMigratable, Migratable, MigrationError,
    Pausable, Snapshot, Snapshottable, SourceConfig, SourceError,
};

use super::error::{chain, ApiError};
use crate::daemon::{check_name, Daemon};
use crate::migrate::{migrate_to, Endpoint, Listener, MigrateError, ReceiveSpec, VgpuMigration};
use crate::model::{
    ErrorBody, IncomingProgress, IncomingRequest, MigrateRequest, MigrationDirection,
    MigrationInfo, MigrationPhase, MigrationProgress, MigrationReportInfo, MigrationState,
};

/// Finished migrations kept for `GET /api/v1/migrations`.
pub const HISTORY: usize = 32;

/// How often a listening incoming migration checks for cancellation.
const ACCEPT_POLL: Duration = Duration::from_millis(25);

/// Longest wait for migration threads when the server stops (a thread blocked on a silent
/// peer notices the cancellation within the peer timeout, 30 s).
const SHUTDOWN_WAIT: Duration = Duration::from_secs(35);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A migration the registry tracks.
struct Job {
    status: Arc<Mutex<MigrationInfo>>,
    cancel: CancelToken,
    thread: Option<JoinHandle<()>>,
}

/// The daemon's migrations.
#[derive(Default)]
pub struct Migrations {
    jobs: Mutex<BTreeMap<u64, Job>>,
    next_id: Mutex<u64>,
}

/// Parses and checks a migration endpoint (`field` names it in messages).
pub fn parse_endpoint(s: &str, field: &str) -> Result<Endpoint, ApiError> {
    let bad = |why: &str| ApiError::invalid("invalid_value", format!("Bad {field} '{s}': {why}"));
    let e: Endpoint = s
        .parse()
        .map_err(|_| bad("use unix:/absolute/path or tcp:HOST:PORT"))?;
    match &e {
        Endpoint::Unix(p) if !p.is_absolute() => {
            return Err(bad("the socket path must be absolute"))
        }
        Endpoint::Unix(p) if p.file_name().is_none() => return Err(bad("no socket file name")),
        Endpoint::Unix(_) => {}
        Endpoint::Tcp(a) => match a.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
            _ => return Err(bad("expected tcp:HOST:PORT with a port of 0 to 65535")),
        },
    }
    Ok(e)
}

fn endpoint_string(e: &Endpoint) -> String {
    match e {
        Endpoint::Unix(p) => format!("unix:{}", p.display()),
        Endpoint::Tcp(a) => format!("tcp:{a}"),
    }
}

/// Maps a failed migration to the `error` of its [`MigrationInfo`] and its final state.
fn failure(e: &MigrateError) -> (MigrationState, ErrorBody) {
    let cancelled_src = |s: &SourceError| match s {
        SourceError::Cancelled { .. } => true,
        SourceError::Resume { error, .. } => matches!(**error, SourceError::Cancelled { .. }),
        _ => false,
    };
    let (state, code) = match e {
        MigrateError::Source(s) if cancelled_src(s) => (MigrationState::Cancelled, "cancelled"),
        MigrateError::Destination(DestinationError::Cancelled { .. }) => {
            (MigrationState::Cancelled, "cancelled")
        }
        MigrateError::Source(SourceError::Unconfirmed { .. }) => {
            (MigrationState::Failed, "handover_unconfirmed")
        }
        MigrateError::Source(SourceError::Destination { .. }) => {
            (MigrationState::Failed, "destination_failed")
        }
        MigrateError::Source(SourceError::Resume { .. }) => {
            (MigrationState::Failed, "source_resume_failed")
        }
        MigrateError::Io { .. } => (MigrationState::Failed, "io_error"),
        _ => (MigrationState::Failed, "migration_failed"),
    };
    (
        state,
        ErrorBody {
            code: code.into(),
            message: chain(e),
        },
    )
}

impl Migrations {
    /// Refuses (409 `migration_in_progress`) if a running migration holds vGPU `id`.
    pub fn check_idle(&self, id: u32) -> Result<(), ApiError> {
        Self::idle_in(&lock(&self.jobs), id)
    }

    fn idle_in(jobs: &BTreeMap<u64, Job>, id: u32) -> Result<(), ApiError> {
        for (mid, j) in jobs.iter() {
            let s = lock(&j.status);
            if !s.state.is_finished() && s.vgpu == Some(id) {
                return Err(ApiError::new(
                    axum::http::StatusCode::CONFLICT,
                    "migration_in_progress",
                    format!(
                        "vGPU {id} is being migrated (migration {mid}, {}); wait for it or cancel \
                         it with DELETE /api/v1/migrations/{mid}",
                        s.state
                    ),
                ));
            }
        }
        Ok(())
    }

    /// All migrations, oldest first.
    pub fn list(&self) -> Vec<MigrationInfo> {
        lock(&self.jobs)
            .values()
            .map(|j| lock(&j.status).clone())
            .collect()
    }

    fn not_found(mid: &str) -> ApiError {
        ApiError::not_found("migration_not_found", format!("No migration {mid}"))
    }

    fn key(mid: &str) -> Result<u64, ApiError> {
        mid.parse().map_err(|_| Self::not_found(mid))
    }

    /// One migration.
    pub fn get(&self, mid: &str) -> Result<MigrationInfo, ApiError> {
        let id = Self::key(mid)?;
        lock(&self.jobs)
            .get(&id)
            .map(|j| lock(&j.status).clone())
            .ok_or_else(|| Self::not_found(mid))
    }

    /// Asks migration `mid` to stop; returns it as it is now (it ends as `cancelled` shortly,
    /// or `completed` if the handover had begun).
    pub fn cancel(&self, mid: &str) -> Result<MigrationInfo, ApiError> {
        let id = Self::key(mid)?;
        let jobs = lock(&self.jobs);
        let j = jobs.get(&id).ok_or_else(|| Self::not_found(mid))?;
        let mut s = lock(&j.status);
        if s.state.is_finished() {
            return Err(ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "migration_finished",
                format!("Migration {id} has already ended ({})", s.state),
            ));
        }
        j.cancel.cancel();
        s.cancel_requested = true;
        tracing::info!(migration = id, "migration cancel requested");
        Ok(s.clone())
    }

    /// Registers the job `make` starts — after checking, under the same lock, that no running
    /// migration holds vGPU `holds` — and drops the oldest finished jobs beyond [`HISTORY`].
    fn insert(
        &self,
        holds: Option<u32>,
        make: impl FnOnce(u64) -> Result<Job, ApiError>,
    ) -> Result<u64, ApiError> {
        let mut jobs = lock(&self.jobs);
        if let Some(vgpu) = holds {
            Self::idle_in(&jobs, vgpu)?;
        }
        let id = {
            let mut n = lock(&self.next_id);
            *n += 1;
            *n
        };
        // The worker never takes the registry lock, so starting it under the lock is safe.
        let job = make(id)?;
        jobs.insert(id, job);
        let finished: Vec<u64> = jobs
            .iter()
            .filter(|(_, j)| lock(&j.status).state.is_finished())
            .map(|(k, _)| *k)
            .collect();
        for k in finished.iter().take(finished.len().saturating_sub(HISTORY)) {
            if let Some(mut j) = jobs.remove(k) {
                if let Some(t) = j.thread.take() {
                    // Finished: the thread has published its last state and is returning.
                    let _ = t.join();
                }
            }
        }
        Ok(id)
    }

    fn status(&self, id: u64) -> Result<MigrationInfo, ApiError> {
        self.get(&id.to_string())
    }

    /// Starts migrating vGPU `vgpu` (already resolved) as `req` says.
    pub fn start_outgoing(
        &self,
        daemon: &Arc<Daemon>,
        vgpu: u32,
        req: MigrateRequest,
    ) -> Result<MigrationInfo, ApiError> {
        let to = parse_endpoint(&req.to, "to")?;
        let downtime_ms = req.downtime_ms.unwrap_or(20);
        if !(1..=60_000).contains(&downtime_ms) {
            return Err(ApiError::invalid(
                "invalid_value",
                format!("downtime_ms {downtime_ms} is not in 1..=60000"),
            ));
        }
        let max_rounds = req.max_rounds.unwrap_or(30);
        if !(1..=1000).contains(&max_rounds) {
            return Err(ApiError::invalid(
                "invalid_value",
                format!("max_rounds {max_rounds} is not in 1..=1000"),
            ));
        }
        let keep_source = req.keep_source.unwrap_or(false);
        let name = daemon.info(vgpu)?.name;
        let cancel = CancelToken::new();
        let config = SourceConfig {
            downtime_target: Duration::from_millis(downtime_ms),
            max_rounds,
            cancel: cancel.clone(),
            ..SourceConfig::default()
        };
        let id = self.insert(Some(vgpu), |id| {
            let status = Arc::new(Mutex::new(MigrationInfo {
                id,
                direction: MigrationDirection::Outgoing,
                state: MigrationState::Running,
                endpoint: endpoint_string(&to),
                vgpu: Some(vgpu),
                vgpu_name: Some(name.clone()),
                started_ms: now_ms(),
                finished_ms: None,
                cancel_requested: false,
                progress: None,
                received: None,
                report: None,
                source_destroyed: None,
                destination_report: None,
                result: None,
                error: None,
            }));
            let (d, st) = (daemon.clone(), status.clone());
            let thread = std::thread::Builder::new()
                .name(format!("migrate-{id}"))
                .spawn(move || run_outgoing(&d, vgpu, &to, &config, keep_source, &st))
                .map_err(|e| {
                    ApiError::internal(format!("Cannot start the migration thread: {e}"))
                })?;
            Ok(Job {
                status,
                cancel,
                thread: Some(thread),
            })
        })?;
        tracing::info!(migration = id, vgpu, to = %req.to, "outgoing migration started");
        self.status(id)
    }

    /// Binds `req.listen` and accepts one migration in the background.
    pub fn start_incoming(
        &self,
        daemon: &Arc<Daemon>,
        req: IncomingRequest,
    ) -> Result<MigrationInfo, ApiError> {
        let at = parse_endpoint(&req.listen, "listen")?;
        if let Some(n) = &req.name {
            check_name(n)?;
            if daemon.resolve(n).is_ok() {
                return Err(crate::daemon::DaemonError::NameTaken(n.clone()).into());
            }
        }
        let listener = Listener::bind(&at).map_err(listen_error)?;
        let endpoint = match (&at, listener.local_addr()) {
            (Endpoint::Tcp(_), Some(a)) => format!("tcp:{a}"),
            _ => endpoint_string(&at),
        };
        let cancel = CancelToken::new();
        let gtt = req.gtt.map(GttMode::from);
        let paused = req.paused.unwrap_or(false);
        let name = req.name.clone();
        let id = self.insert(None, |id| {
            let status = Arc::new(Mutex::new(MigrationInfo {
                id,
                direction: MigrationDirection::Incoming,
                state: MigrationState::Listening,
                endpoint: endpoint.clone(),
                vgpu: None,
                vgpu_name: name.clone(),
                started_ms: now_ms(),
                finished_ms: None,
                cancel_requested: false,
                progress: None,
                received: None,
                report: None,
                source_destroyed: None,
                destination_report: None,
                result: None,
                error: None,
            }));
            let (d, st, c) = (daemon.clone(), status.clone(), cancel.clone());
            let job = IncomingJob {
                incoming: ReceiveSpec { name, gtt, paused },
                cancel: c,
            };
            let thread = std::thread::Builder::new()
                .name(format!("receive-{id}"))
                .spawn(move || run_incoming(&d, listener, &job, &st))
                .map_err(|e| {
                    ApiError::internal(format!("Cannot start the migration thread: {e}"))
                })?;
            Ok(Job {
                status,
                cancel,
                thread: Some(thread),
            })
        })?;
        tracing::info!(migration = id, listen = %endpoint, "incoming migration listening");
        self.status(id)
    }

    /// Cancels every running migration and waits (bounded) for their threads.
    pub fn shutdown(&self) {
        let threads: Vec<JoinHandle<()>> = {
            let mut jobs = lock(&self.jobs);
            jobs.values_mut()
                .filter_map(|j| {
                    j.cancel.cancel();
                    j.thread.take()
                })
                .collect()
        };
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        for t in threads {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::warn!("a migration thread did not stop in time");
            }
        }
    }
}

/// Why a listener could not be bound.
fn listen_error(e: MigrateError) -> ApiError {
    let msg = chain(&e);
    match &e {
        MigrateError::Io { source, .. } => match source.kind() {
            std::io::ErrorKind::AddrInUse => {
                ApiError::new(axum::http::StatusCode::CONFLICT, "endpoint_in_use", msg)
            }
            std::io::ErrorKind::NotFound
            | std::io::ErrorKind::AddrNotAvailable
            | std::io::ErrorKind::InvalidInput
            | std::io::ErrorKind::NotADirectory => ApiError::invalid("invalid_value", msg),
            _ => ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "io_error",
                msg,
            ),
        },
        _ => ApiError::invalid("invalid_value", msg),
    }
}

fn finish(status: &Mutex<MigrationInfo>, result: Result<(), MigrateError>) {
    let mut s = lock(status);
    match result {
        Ok(()) => s.state = MigrationState::Completed,
        Err(e) => {
            let (state, body) = failure(&e);
            tracing::warn!(migration = s.id, error = %body.message, "migration ended: {state}");
            s.state = state;
            s.error = Some(body);
        }
    }
    s.finished_ms = Some(now_ms());
}

fn run_outgoing(
    daemon: &Daemon,
    vgpu: u32,
    to: &Endpoint,
    config: &SourceConfig,
    keep_source: bool,
    status: &Mutex<MigrationInfo>,
) {
    let mut progress = |p: &vgpu_migration::Progress| {
        lock(status).progress = Some(MigrationProgress::from(p));
    };
    let result = migrate_to(daemon, vgpu, to, config, &mut progress).map(|report| {
        let destroyed = !keep_source && {
            // The vGPU now runs on the destination; this copy is paused and stale.
            match daemon.destroy(vgpu) {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(vgpu, error = %chain(&e), "cannot destroy the migrated source");
                    false
                }
            }
        };
        let mut s = lock(status);
        s.report = Some(MigrationReportInfo::from(&report));
        s.source_destroyed = Some(destroyed);
    });
    finish(status, result);
}

/// What an incoming migration was asked for.
struct IncomingJob {
    incoming: ReceiveSpec,
    cancel: CancelToken,
}

fn run_incoming(
    daemon: &Daemon,
    listener: Listener,
    job: &IncomingJob,
    status: &Mutex<MigrationInfo>,
) {
    let stream = match listener.accept_cancellable(&job.cancel, ACCEPT_POLL) {
        Ok(Some(s)) => s,
        Ok(None) => {
            let mut s = lock(status);
            s.state = MigrationState::Cancelled;
            s.error = Some(ErrorBody {
                code: "cancelled".into(),
                message: "Migration cancelled while listening".into(),
            });
            s.finished_ms = Some(now_ms());
            return;
        }
        Err(e) => return finish(status, Err(e)),
    };
    // One migration per request: stop listening (a unix socket file is removed).
    drop(listener);
    let start = Instant::now();
    {
        let mut s = lock(status);
        s.state = MigrationState::Receiving;
        s.received = Some(IncomingProgress {
            phase: MigrationPhase::Hello,
            pages_received: 0,
            elapsed_us: 0,
        });
    }
    let mut c = Observed {
        daemon,
        inner: VgpuMigration::destination(daemon, job.incoming.clone()),
        status,
        start,
        pages: 0,
    };
    let cfg = DestinationConfig {
        cancel: job.cancel.clone(),
        ..DestinationConfig::default()
    };
    let result = vgpu_migration::receive(&mut c, stream, cfg)
        .map_err(MigrateError::Destination)
        .and_then(|report| {
            let id = c.inner.id().ok_or(MigrateError::UnknownVgpu(u32::MAX))?;
            let info = daemon.info(id).map_err(MigrateError::Daemon)?;
            let mut s = lock(status);
            s.destination_report = Some((&report).into());
            s.vgpu_name = Some(info.name.clone());
            s.result = Some(info);
            Ok(())
        });
    finish(status, result);
}

/// The destination vGPU component with its progress published into the migration's status.
struct Observed<'a> {
    daemon: &'a Daemon,
    inner: VgpuMigration<'a>,
    status: &'a Mutex<MigrationInfo>,
    start: Instant,
    pages: u64,
}

impl Observed<'_> {
    fn phase(&mut self, phase: MigrationPhase) {
        let mut s = lock(self.status);
        s.received = Some(IncomingProgress {
            phase,
            pages_received: self.pages,
            elapsed_us: micros(self.start.elapsed()),
        });
    }

    fn page(&mut self) {
        self.pages += 1;
        // Published every 256 pages (1 MiB), like the source's samples.
        if self.pages.is_multiple_of(256) {
            self.phase(MigrationPhase::PreCopy);
        }
    }
}

impl Pausable for Observed<'_> {
    fn pause(&mut self) -> Result<(), MigrationError> {
        self.inner.pause()
    }

    fn resume(&mut self) -> Result<(), MigrationError> {
        self.phase(MigrationPhase::Commit);
        let r = self.inner.resume();
        self.phase(MigrationPhase::Completed);
        r
    }
}

impl Snapshottable for Observed<'_> {
    fn id(&self) -> String {
        Snapshottable::id(&self.inner)
    }

    fn snapshot(&mut self) -> Result<Snapshot, MigrationError> {
        self.inner.snapshot()
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), MigrationError> {
        self.phase(MigrationPhase::Restore);
        self.inner.restore(snapshot)
    }
}

impl Migratable for Observed<'_> {
    fn memory_size(&self) -> u64 {
        self.inner.memory_size()
    }

    fn start_dirty_log(&mut self) -> Result<(), MigrationError> {
        self.inner.start_dirty_log()
    }

    fn stop_dirty_log(&mut self) -> Result<(), MigrationError> {
        self.inner.stop_dirty_log()
    }

    fn dirty_pages(&mut self) -> Result<Vec<u64>, MigrationError> {
        self.inner.dirty_pages()
    }

    fn read_page(&self, index: u64, buf: &mut [u8]) -> Result<(), MigrationError> {
        self.inner.read_page(index, buf)
    }

    fn write_page(&mut self, index: u64, buf: &[u8]) -> Result<(), MigrationError> {
        self.page();
        self.inner.write_page(index, buf)
    }
}

impl LiveMigratable for Observed<'_> {
    fn compat(&self) -> Result<Vec<u8>, MigrationError> {
        self.inner.compat()
    }

    fn state_size_hint(&self) -> u64 {
        self.inner.state_size_hint()
    }

    fn accept_compat(&mut self, compat: &[u8], memory_size: u64) -> Result<(), MigrationError> {
        self.inner.accept_compat(compat, memory_size)?;
        if let Some(id) = self.inner.id() {
            let name = self.daemon.info(id).ok().map(|i| i.name);
            let mut s = lock(self.status);
            s.vgpu = Some(id);
            s.vgpu_name = name;
        }
        self.phase(MigrationPhase::PreCopy);
        Ok(())
    }

    fn write_zero_page(&mut self, index: u64) -> Result<(), MigrationError> {
        self.page();
        self.inner.write_zero_page(index)
    }

    fn abort(&mut self) {
        self.inner.abort();
        lock(self.status).vgpu = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_endpoint_accepts_absolute_unix_and_host_port() {
        assert_eq!(
            parse_endpoint("unix:/run/m.sock", "to").unwrap(),
            Endpoint::Unix("/run/m.sock".into())
        );
        assert_eq!(
            parse_endpoint("tcp:127.0.0.1:0", "to").unwrap(),
            Endpoint::Tcp("127.0.0.1:0".into())
        );
        assert!(parse_endpoint("tcp:[::1]:7000", "to").is_ok());
        assert!(parse_endpoint("tcp:dst.example:7000", "to").is_ok());
    }

    #[test]
    fn test_parse_endpoint_rejects_relative_missing_port_and_scheme() {
        for bad in [
            "unix:rel.sock",
            "unix:",
            "tcp:127.0.0.1",
            "tcp::7000",
            "tcp:host:99999",
            "http://x",
            "/run/m.sock",
        ] {
            let e = parse_endpoint(bad, "to").unwrap_err();
            assert_eq!((e.status.as_u16(), e.code), (422, "invalid_value"), "{bad}");
            assert!(e.message.contains(bad), "{}", e.message);
        }
    }
}
