//! vGPUs as migration components: the `vgpu-migration` traits implemented for a vGPU served by
//! the daemon, on the source and on the destination side, plus file snapshots.
//!
//! Memory: the vGPU's local memory, page by page. Dirty pages of a pre-copy round are the pages
//! the engines wrote (tracked exactly by the device's dirty log) together with the pages whose
//! content hash changed since they were last sent — CPU writes through the passed-through
//! aperture never trap, so, as gMig does, they are found by hashing every page each round.
//! Device state: `Vgpu::save(false)` (everything but local memory), restored with validation.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vgpu_device::addr::LmemOffset;
use vgpu_device::vgpu::persist::VgpuHeader;
use vgpu_device::vgpu::{GttMode, Vgpu};
use vgpu_migration::{
    LiveMigratable, Migratable, MigrationError, Pausable, Snapshot, Snapshottable,
};

use crate::daemon::{Daemon, VgpuSpec};

const PAGE: usize = 4096;
const PAGE_U64: u64 = 4096;

/// Fewest pages a scanning thread is given (4 MiB): smaller memories are hashed on the
/// calling thread.
const MIN_SCAN_PAGES_PER_THREAD: usize = 1024;
/// Most threads hashing one vGPU's memory: one core hashes at ~18 GB/s (xxh3), a few saturate
/// the memory bandwidth.
const MAX_SCAN_THREADS: usize = 8;

/// xxh3 of pages `first..first + n` of `lmem`. Each page is copied out first: the local
/// memory's accessors only copy, as the guest may be writing it (no reference into the shared
/// mapping is ever made); the 4 KiB buffer stays in the L1 cache.
fn hash_range(
    lmem: &vgpu_device::phys::LmemSlice,
    first: usize,
    n: usize,
) -> Result<Vec<u64>, MigrationError> {
    let mut buf = [0u8; PAGE];
    (first as u64..)
        .take(n)
        .map(|i| {
            lmem.read(LmemOffset(i * PAGE_U64), &mut buf)
                .map_err(|e| err(e.to_string()))?;
            Ok(xxhash_rust::xxh3::xxh3_64(&buf))
        })
        .collect()
}

/// Hashes every page of `lmem`, split into contiguous ranges over up to
/// `available_parallelism()` threads (the calling thread takes the first range).
fn hash_all(lmem: &vgpu_device::phys::LmemSlice) -> Result<Vec<u64>, MigrationError> {
    let pages = usize::try_from(lmem.size() / PAGE_U64).map_err(|_| err("memory size"))?;
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(MAX_SCAN_THREADS)
        .min(pages / MIN_SCAN_PAGES_PER_THREAD)
        .max(1);
    let per = pages.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let helpers: Vec<_> = (per..pages)
            .step_by(per)
            .map(|first| {
                let n = per.min(pages - first);
                let spawned = std::thread::Builder::new()
                    .name("vgpu-dirty-scan".into())
                    .spawn_scoped(s, move || hash_range(lmem, first, n));
                (first, n, spawned.ok())
            })
            .collect();
        let mut hashes = hash_range(lmem, 0, per.min(pages))?;
        hashes.reserve_exact(pages - hashes.len());
        for (first, n, helper) in helpers {
            let part = match helper {
                Some(t) => t
                    .join()
                    .unwrap_or_else(|_| Err(err("dirty-scan thread panicked")))?,
                // No thread to be had: hash that range here after all.
                None => hash_range(lmem, first, n)?,
            };
            hashes.extend(part);
        }
        Ok(hashes)
    })
}

fn err(reason: impl Into<String>) -> MigrationError {
    MigrationError::State {
        component: "vgpu".into(),
        reason: reason.into(),
    }
}

fn lock(v: &Mutex<Vgpu>) -> MutexGuard<'_, Vgpu> {
    v.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where a migration component stands.
enum Side {
    /// Migrating an existing vGPU away.
    Source,
    /// Receiving: the vGPU is created when the source's compatibility record arrives.
    Destination(ReceiveSpec),
}

/// How a destination creates the vGPU it receives.
#[derive(Debug, Clone, Default)]
pub struct ReceiveSpec {
    /// Name for the new vGPU.
    pub name: Option<String>,
    /// GTT mode for the new vGPU (default: the source's).
    pub gtt: Option<GttMode>,
    /// Leave the received vGPU's engines paused at the commit: work it had queued may read
    /// guest RAM, which exists only once the VM has reconnected. The caller resumes it
    /// (`Scheduler::resume`, `POST /api/v1/vgpus/{id}/resume`) after that.
    pub paused: bool,
}

/// A vGPU of `daemon` as a live-migration component.
pub struct VgpuMigration<'a> {
    daemon: &'a Daemon,
    side: Side,
    id: Option<u32>,
    vgpu: Option<Arc<Mutex<Vgpu>>>,
    /// xxh3 of every page as it was when last read for sending (source, while dirty logging).
    /// Updated by `read_page`, so a page changed A -> B -> A after B was sent is still dirty.
    hashes: std::cell::RefCell<Vec<u64>>,
    paused_by_us: bool,
}

impl<'a> VgpuMigration<'a> {
    /// The source side for vGPU `id`.
    pub fn source(daemon: &'a Daemon, id: u32) -> Result<Self, MigrationError> {
        let vgpu = daemon
            .vgpu(id)
            .ok_or_else(|| err(format!("no vGPU {id}")))?;
        Ok(VgpuMigration {
            daemon,
            side: Side::Source,
            id: Some(id),
            vgpu: Some(vgpu),
            hashes: std::cell::RefCell::new(Vec::new()),
            paused_by_us: false,
        })
    }

    /// The destination side: creates the vGPU `incoming` describes when the migration is
    /// accepted.
    pub fn destination(daemon: &'a Daemon, incoming: ReceiveSpec) -> Self {
        VgpuMigration {
            daemon,
            side: Side::Destination(incoming),
            id: None,
            vgpu: None,
            hashes: std::cell::RefCell::new(Vec::new()),
            paused_by_us: false,
        }
    }

    /// The vGPU id (on the destination: once accepted).
    pub fn id(&self) -> Option<u32> {
        self.id
    }

    fn vgpu(&self) -> Result<&Arc<Mutex<Vgpu>>, MigrationError> {
        self.vgpu.as_ref().ok_or_else(|| err("no vGPU yet"))
    }

    fn id_or_err(&self) -> Result<u32, MigrationError> {
        self.id.ok_or_else(|| err("no vGPU yet"))
    }

    fn hash_pages(&self) -> Result<Vec<u64>, MigrationError> {
        // Hash through the shared half, without the device lock: the guest's register traps
        // (doorbells included) must not wait for a scan of the whole memory.
        let shared = lock(self.vgpu()?).shared().clone();
        hash_all(shared.lmem())
    }
}

impl Pausable for VgpuMigration<'_> {
    fn pause(&mut self) -> Result<(), MigrationError> {
        let id = self.id_or_err()?;
        if !self.daemon.scheduler().is_paused(id) {
            self.daemon
                .scheduler()
                .pause(id)
                .map_err(|e| err(e.to_string()))?;
            self.paused_by_us = true;
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), MigrationError> {
        let id = self.id_or_err()?;
        let resume = match self.side {
            // The source resumes only what it paused itself.
            Side::Source => std::mem::take(&mut self.paused_by_us),
            Side::Destination(ref incoming) => !incoming.paused,
        };
        if resume {
            self.daemon
                .scheduler()
                .resume(id)
                .map_err(|e| err(e.to_string()))?;
        }
        Ok(())
    }
}

impl Snapshottable for VgpuMigration<'_> {
    fn id(&self) -> String {
        "vgpu".into()
    }

    fn snapshot(&mut self) -> Result<Snapshot, MigrationError> {
        lock(self.vgpu()?).save(false)
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), MigrationError> {
        lock(self.vgpu()?).restore(snapshot)
    }
}

impl Migratable for VgpuMigration<'_> {
    fn memory_size(&self) -> u64 {
        self.vgpu
            .as_ref()
            .map_or(0, |v| lock(v).shared().lmem().size())
    }

    fn start_dirty_log(&mut self) -> Result<(), MigrationError> {
        lock(self.vgpu()?).shared().dirty.start_lmem();
        *self.hashes.borrow_mut() = self.hash_pages()?;
        Ok(())
    }

    fn stop_dirty_log(&mut self) -> Result<(), MigrationError> {
        lock(self.vgpu()?).shared().dirty.stop_lmem();
        self.hashes.borrow_mut().clear();
        Ok(())
    }

    fn dirty_pages(&mut self) -> Result<Vec<u64>, MigrationError> {
        let engine: Vec<u64> = lock(self.vgpu()?).shared().dirty.take_lmem();
        let now = self.hash_pages()?;
        let mut dirty: BTreeSet<u64> = engine.into_iter().collect();
        // Compare with the content last *sent* (recorded by `read_page`); the baseline moves
        // only when a page is read again.
        for (i, (old, new)) in self.hashes.borrow().iter().zip(&now).enumerate() {
            if old != new {
                dirty.insert(i as u64);
            }
        }
        Ok(dirty.into_iter().collect())
    }

    fn read_page(&self, index: u64, buf: &mut [u8]) -> Result<(), MigrationError> {
        let off = index
            .checked_mul(PAGE_U64)
            .ok_or_else(|| err("page index"))?;
        lock(self.vgpu()?)
            .shared()
            .lmem()
            .read(LmemOffset(off), buf)
            .map_err(|e| err(e.to_string()))?;
        let mut hashes = self.hashes.borrow_mut();
        if let Some(h) = usize::try_from(index).ok().and_then(|i| hashes.get_mut(i)) {
            *h = xxhash_rust::xxh3::xxh3_64(buf);
        }
        Ok(())
    }

    fn write_page(&mut self, index: u64, buf: &[u8]) -> Result<(), MigrationError> {
        let off = index
            .checked_mul(PAGE_U64)
            .ok_or_else(|| err("page index"))?;
        lock(self.vgpu()?)
            .shared()
            .lmem()
            .write(LmemOffset(off), buf)
            .map_err(|e| err(e.to_string()))
    }
}

impl LiveMigratable for VgpuMigration<'_> {
    fn compat(&self) -> Result<Vec<u8>, MigrationError> {
        let header = lock(self.vgpu()?).header();
        postcard::to_stdvec(&header).map_err(|e| err(e.to_string()))
    }

    fn state_size_hint(&self) -> u64 {
        // Register file, GGTT entries, engine queues: dominated by the GGTT.
        self.vgpu.as_ref().map_or(0, |v| {
            let v = lock(v);
            let g = v.shared().ggtt.mappable().size + v.shared().ggtt.hidden().size;
            64 * 1024 + g / PAGE_U64 * 8 + 16 * 1024
        })
    }

    fn accept_compat(&mut self, compat: &[u8], memory_size: u64) -> Result<(), MigrationError> {
        let Side::Destination(ReceiveSpec { name, gtt, .. }) = &self.side else {
            return Err(err("not a destination"));
        };
        let header: VgpuHeader =
            postcard::from_bytes(compat).map_err(|e| err(format!("compatibility record: {e}")))?;
        if memory_size != header.lmem_size {
            return Err(err("memory size does not match the profile"));
        }
        let spec = VgpuSpec {
            profile: header.profile.clone(),
            gtt: gtt.unwrap_or(header.gtt_mode),
            name: name.clone(),
            weight: None,
        };
        let info = self
            .daemon
            .create_at(&spec, header.mappable.start, header.hidden.start)
            .map_err(|e| {
                err(format!(
                    "cannot create the vGPU here: {}",
                    vgpu_migration::report::error_chain(&e)
                ))
            })?;
        let vgpu = self
            .daemon
            .vgpu(info.id)
            .ok_or_else(|| err("vGPU vanished"))?;
        // Nothing runs on the destination before the commit; `resume` starts it then (or
        // leaves it paused, as `ReceiveSpec::paused` asks).
        let paused = self.daemon.scheduler().pause(info.id);
        if let Err(e) = paused
            .map_err(|e| err(e.to_string()))
            .and_then(|()| lock(&vgpu).check_compatible(&header))
        {
            let _ = self.daemon.destroy(info.id);
            return Err(e);
        }
        self.id = Some(info.id);
        self.vgpu = Some(vgpu);
        Ok(())
    }

    fn write_zero_page(&mut self, index: u64) -> Result<(), MigrationError> {
        self.write_page(index, &[0u8; PAGE])
    }

    fn abort(&mut self) {
        if let (Side::Destination(_), Some(id)) = (&self.side, self.id.take()) {
            self.vgpu = None;
            if let Err(e) = self.daemon.destroy(id) {
                tracing::error!(id, error = %e, "cannot free the aborted migration's vGPU");
            }
        }
    }
}

/// Errors of snapshot, restore and migration operations.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// No such vGPU.
    #[error("No vGPU {0}")]
    UnknownVgpu(u32),
    /// File or socket I/O failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The snapshot is unusable.
    #[error("Bad snapshot")]
    Snapshot(#[source] MigrationError),
    /// The daemon refused (admission, naming, ranges taken).
    #[error("Cannot create the vGPU")]
    Daemon(#[source] crate::daemon::DaemonError),
    /// The migration failed; the source keeps running.
    #[error("Migration failed")]
    Source(#[source] vgpu_migration::SourceError),
    /// Receiving failed; nothing was kept.
    #[error("Receiving the migration failed")]
    Destination(#[source] vgpu_migration::DestinationError),
    /// An endpoint string did not parse.
    #[error("Bad endpoint '{0}': use unix:PATH or tcp:HOST:PORT")]
    Endpoint(String),
}

/// Largest snapshot file read: the largest local memory plus state.
pub const MAX_SNAPSHOT_BYTES: u64 = (4 << 30) + (256 << 20);

/// Where a migration connects or listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket path.
    Unix(std::path::PathBuf),
    /// A TCP address.
    Tcp(String),
}

impl std::str::FromStr for Endpoint {
    type Err = MigrateError;
    fn from_str(s: &str) -> Result<Self, MigrateError> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Endpoint::Unix(p.into()));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            return Ok(Endpoint::Tcp(a.into()));
        }
        Err(MigrateError::Endpoint(s.into()))
    }
}

/// What a snapshot wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SnapshotInfo {
    /// The file.
    pub path: std::path::PathBuf,
    /// Its size.
    pub bytes: u64,
    /// Time the vGPU's engines were paused for it, in microseconds.
    pub paused_us: u64,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MigrateError {
    let what = what.into();
    move |source| MigrateError::Io { what, source }
}

/// Saves vGPU `id` (device state and local memory) into `path`, atomically: a temporary file in
/// the same directory is written and synced, then renamed over `path`, so an existing snapshot
/// survives any failure (a full disk included). The engines are paused while the state is
/// captured and resumed afterwards (if they were running).
pub fn snapshot_to_file(
    daemon: &Daemon,
    id: u32,
    path: &std::path::Path,
) -> Result<SnapshotInfo, MigrateError> {
    use std::io::Write as _;
    let vgpu = daemon.vgpu(id).ok_or(MigrateError::UnknownVgpu(id))?;
    let was_paused = daemon.scheduler().is_paused(id);
    let t0 = std::time::Instant::now();
    daemon
        .scheduler()
        .pause(id)
        .map_err(|_| MigrateError::UnknownVgpu(id))?;
    let snap = lock(&vgpu).save(true);
    if !was_paused {
        let _ = daemon.scheduler().resume(id);
    }
    let paused_us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
    let snap = snap.map_err(MigrateError::Snapshot)?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| MigrateError::Endpoint(path.display().to_string()))?;
    // A temporary name of our own: concurrent snapshots to one path, and a stale file left by
    // a killed daemon that had the same pid (a restarted container's PID 1), must not collide.
    // Only a file this call created is ever removed.
    static TMP_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let create_tmp = || -> std::io::Result<(std::path::PathBuf, std::fs::File)> {
        let mut tries = 0;
        loop {
            let tmp = dir.join(format!(
                ".{}.tmp-{}-{}",
                file_name.to_string_lossy(),
                std::process::id(),
                TMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
            {
                Ok(f) => return Ok((tmp, f)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 64 => {
                    tries += 1;
                }
                Err(e) => return Err(e),
            }
        }
    };
    let what = || format!("writing snapshot {}", path.display());
    let (tmp, mut f) = create_tmp().map_err(io(what()))?;
    // The envelope is encoded straight into the file (checksummed on the way), not built in
    // memory first: no second copy of the whole local memory.
    let mut write = || -> Result<u64, MigrateError> {
        let bytes = vgpu_migration::encode_to(&snap, &mut f).map_err(|e| match e {
            vgpu_migration::EnvelopeError::Io(e) => io(what())(e),
            e => MigrateError::Snapshot(e.into()),
        })?;
        f.flush().map_err(io(what()))?;
        let finish = || -> std::io::Result<()> {
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        finish().map_err(io(what()))?;
        Ok(bytes)
    };
    let bytes = match write() {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    Ok(SnapshotInfo {
        path: path.to_path_buf(),
        bytes,
        paused_us,
    })
}

/// Creates a vGPU from a snapshot file: at the snapshot's GM ranges, with its profile, named
/// `name`, restored (everything validated) and then resumed. Nothing is left behind on failure.
pub fn restore_from_file(
    daemon: &Daemon,
    path: &std::path::Path,
    name: Option<String>,
    gtt: Option<GttMode>,
) -> Result<crate::model::VgpuInfo, MigrateError> {
    restore_from_file_with(daemon, path, name, gtt, true)
}

/// [`restore_from_file`], leaving the restored vGPU's engines paused unless `resume` (a VMM
/// that restores guest RAM after the vGPU resumes it once the RAM is back).
pub fn restore_from_file_with(
    daemon: &Daemon,
    path: &std::path::Path,
    name: Option<String>,
    gtt: Option<GttMode>,
    resume: bool,
) -> Result<crate::model::VgpuInfo, MigrateError> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    // Non-blocking open: a FIFO without a writer would otherwise block the request forever.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io(format!("opening snapshot {}", path.display())))?;
    let meta = f.metadata().map_err(io("reading snapshot size"))?;
    if !meta.is_file() {
        // A device or FIFO (e.g. /dev/zero) has no size to check: it would be read until
        // `MAX_SNAPSHOT_BYTES`, gigabytes, before the decoder could refuse it.
        return Err(MigrateError::Snapshot(err(format!(
            "{} is not a regular file",
            path.display()
        ))));
    }
    let len = meta.len();
    if len > MAX_SNAPSHOT_BYTES {
        return Err(MigrateError::Snapshot(err(format!(
            "{len} bytes is larger than any vGPU snapshot"
        ))));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    f.take(MAX_SNAPSHOT_BYTES)
        .read_to_end(&mut bytes)
        .map_err(io(format!("reading snapshot {}", path.display())))?;
    let snap = vgpu_migration::decode(&bytes).map_err(|e| MigrateError::Snapshot(e.into()))?;
    let header: VgpuHeader = snap
        .child_state("header")
        .map_err(|e| MigrateError::Snapshot(e.into()))?;
    let spec = VgpuSpec {
        profile: header.profile.clone(),
        gtt: gtt.unwrap_or(header.gtt_mode),
        name,
        weight: None,
    };
    let info = daemon
        .create_at(&spec, header.mappable.start, header.hidden.start)
        .map_err(MigrateError::Daemon)?;
    let restored = daemon
        .vgpu(info.id)
        .ok_or(MigrateError::UnknownVgpu(info.id))
        .and_then(|v| lock(&v).restore(&snap).map_err(MigrateError::Snapshot));
    if let Err(e) = restored {
        let _ = daemon.destroy(info.id);
        return Err(e);
    }
    if resume {
        let _ = daemon.scheduler().resume(info.id);
    }
    daemon.info(info.id).map_err(MigrateError::Daemon)
}

/// A connected migration stream.
pub enum Stream {
    /// Over a unix socket.
    Unix(std::os::unix::net::UnixStream),
    /// Over TCP.
    Tcp(std::net::TcpStream),
}

impl std::io::Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(b),
            Stream::Tcp(s) => s.read(b),
        }
    }
}

impl std::io::Write for Stream {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(b),
            Stream::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

/// How long a silent peer is waited for.
pub const PEER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Live-migrates vGPU `id` to the daemon listening at `to`. On success the source vGPU stays
/// paused (its state now lives on the destination) — the caller destroys it; on failure it runs
/// on, with nothing lost.
pub fn migrate_to(
    daemon: &Daemon,
    id: u32,
    to: &Endpoint,
    config: &vgpu_migration::SourceConfig,
    progress: &mut dyn FnMut(&vgpu_migration::Progress),
) -> Result<vgpu_migration::MigrationReport, MigrateError> {
    let stream = match to {
        Endpoint::Unix(p) => {
            let s = std::os::unix::net::UnixStream::connect(p)
                .map_err(io(format!("connecting to {}", p.display())))?;
            s.set_read_timeout(Some(PEER_TIMEOUT))
                .map_err(io("socket timeout"))?;
            Stream::Unix(s)
        }
        Endpoint::Tcp(a) => {
            let s = std::net::TcpStream::connect(a).map_err(io(format!("connecting to {a}")))?;
            s.set_read_timeout(Some(PEER_TIMEOUT))
                .map_err(io("socket timeout"))?;
            let _ = s.set_nodelay(true);
            Stream::Tcp(s)
        }
    };
    let mut c = VgpuMigration::source(daemon, id).map_err(|_| MigrateError::UnknownVgpu(id))?;
    vgpu_migration::migrate(&mut c, stream, config, progress).map_err(MigrateError::Source)
}

/// A bound migration listener.
pub enum Listener {
    /// A unix socket (removed when dropped).
    Unix(std::os::unix::net::UnixListener, std::path::PathBuf),
    /// TCP.
    Tcp(std::net::TcpListener),
}

impl Listener {
    /// Binds `at`.
    pub fn bind(at: &Endpoint) -> Result<Self, MigrateError> {
        Ok(match at {
            Endpoint::Unix(p) => Listener::Unix(
                std::os::unix::net::UnixListener::bind(p)
                    .map_err(io(format!("listening on {}", p.display())))?,
                p.clone(),
            ),
            Endpoint::Tcp(a) => Listener::Tcp(
                std::net::TcpListener::bind(a).map_err(io(format!("listening on {a}")))?,
            ),
        })
    }

    /// Accepts one migration and receives it into a new vGPU as `incoming` says.
    pub fn receive(
        &self,
        daemon: &Daemon,
        incoming: ReceiveSpec,
    ) -> Result<(crate::model::VgpuInfo, vgpu_migration::DestinationReport), MigrateError> {
        let stream = match self {
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().map_err(io("accepting a migration"))?;
                s.set_read_timeout(Some(PEER_TIMEOUT))
                    .map_err(io("socket timeout"))?;
                Stream::Unix(s)
            }
            Listener::Tcp(l) => {
                let (s, _) = l.accept().map_err(io("accepting a migration"))?;
                s.set_read_timeout(Some(PEER_TIMEOUT))
                    .map_err(io("socket timeout"))?;
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }
        };
        let mut c = VgpuMigration::destination(daemon, incoming);
        let report =
            vgpu_migration::receive(&mut c, stream, vgpu_migration::DestinationConfig::default())
                .map_err(MigrateError::Destination)?;
        let id = c.id().ok_or(MigrateError::UnknownVgpu(u32::MAX))?;
        Ok((daemon.info(id).map_err(MigrateError::Daemon)?, report))
    }

    /// Waits for one connection like [`Listener::receive`] does (same socket timeouts), but
    /// polls so that `cancel` is noticed within `poll`; `Ok(None)` when cancelled.
    pub fn accept_cancellable(
        &self,
        cancel: &vgpu_migration::CancelToken,
        poll: std::time::Duration,
    ) -> Result<Option<Stream>, MigrateError> {
        let nonblocking = match self {
            Listener::Unix(l, _) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        };
        nonblocking.map_err(io("accepting a migration"))?;
        loop {
            if cancel.is_cancelled() {
                return Ok(None);
            }
            let accepted = match self {
                Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
                Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            };
            match accepted {
                Ok(s) => {
                    let set = match &s {
                        Stream::Unix(u) => u
                            .set_nonblocking(false)
                            .and_then(|()| u.set_read_timeout(Some(PEER_TIMEOUT))),
                        Stream::Tcp(t) => t
                            .set_nonblocking(false)
                            .and_then(|()| t.set_read_timeout(Some(PEER_TIMEOUT)))
                            .map(|()| {
                                let _ = t.set_nodelay(true);
                            }),
                    };
                    set.map_err(io("socket timeout"))?;
                    return Ok(Some(s));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(poll),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io("accepting a migration")(e)),
            }
        }
    }

    /// The local address (TCP), for tests that bind port 0.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}
