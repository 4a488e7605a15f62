//! The listening socket: one client at a time per device, served by its own threads.
//!
//! Threads: an acceptor (polls the listening socket and a wake-up eventfd), and one thread per
//! connection that reads and executes its commands (see `connection.rs`). A client connecting while another
//! is being served is refused (accepted and closed at once) — unless the served client has
//! already hung up, in which case the newcomer waits (up to
//! [`ServerConfig::reconnect_wait`]) for that connection's cleanup and is then served: Cloud
//! Hypervisor reconnects immediately on restore.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::Backend;
use crate::connection::{self, Link};
use crate::dma::{DmaHandle, DmaRwLayout};
use crate::error::Error;
use crate::migration::MigrationState;
use crate::stats::{bump, ServerStats, Stats};
use crate::wire::HEADER_SIZE;

/// Server limits and behaviour; [`Default`] gives the values the spec's clients expect.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Largest data count of one region access, DMA or migration-data message, both ways
    /// (`max_data_xfer_size`, 1 MiB).
    pub max_data_xfer_size: u32,
    /// Most DMA mappings at once (`max_dma_maps`, 65535).
    pub max_dma_maps: u32,
    /// Largest DMA-logging bitmap of one report, in bytes (`migration.max_bitmap_size`,
    /// 1 MiB; a report is also bounded by `max_data_xfer_size`; QEMU refuses servers that
    /// announce more than 256 MiB).
    pub max_bitmap_size: u64,
    /// Payload layout of `DMA_READ`/`DMA_WRITE` (see [`DmaRwLayout`]).
    pub dma_rw_layout: DmaRwLayout,
    /// How long a [`DmaHandle`] waits for the client's reply to `DMA_READ`/`DMA_WRITE` (5 s).
    pub dma_timeout: Duration,
    /// How long a connecting client waits for the cleanup of a client that hung up (10 s).
    pub reconnect_wait: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_data_xfer_size: 1 << 20,
            max_dma_maps: 65535,
            max_bitmap_size: 1 << 20,
            dma_rw_layout: DmaRwLayout::Spec,
            dma_timeout: Duration::from_secs(5),
            reconnect_wait: Duration::from_secs(10),
        }
    }
}

/// State of one device, shared by the server's threads; it outlives connections.
pub(crate) struct Shared {
    backend: Arc<Mutex<dyn Backend>>,
    /// The configuration.
    pub config: ServerConfig,
    /// Counters.
    pub stats: Arc<Stats>,
    migration: Mutex<MigrationState>,
    link: Arc<Mutex<Option<Arc<Link>>>>,
    /// The served client's socket (a clone), while one is served.
    client: Mutex<Option<UnixStream>>,
    client_gone: Condvar,
    stopping: AtomicBool,
}

impl Shared {
    /// The backend, locked (a poisoned lock is taken over: the backend decides its own state).
    pub fn backend(&self) -> MutexGuard<'_, dyn Backend + 'static> {
        self.backend.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Migration state, locked. Lock order: migration state before backend.
    pub fn migration(&self) -> MutexGuard<'_, MigrationState> {
        self.migration
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Installs (or clears) the current connection's link; returns the previous one.
    pub fn set_link(&self, link: Option<Arc<Link>>) -> Option<Arc<Link>> {
        std::mem::replace(
            &mut *self.link.lock().unwrap_or_else(PoisonError::into_inner),
            link,
        )
    }

    /// Largest `message_size` accepted; a message claiming more closes the connection.
    pub fn max_message_size(&self) -> u32 {
        // Header, the largest fixed part (region access / DMA access), the data, and room for
        // capability JSON or many DMA-logging ranges.
        let fixed = u32::try_from(HEADER_SIZE + 16 + 4096).unwrap_or(u32::MAX);
        self.config.max_data_xfer_size.saturating_add(fixed)
    }

    fn client(&self) -> MutexGuard<'_, Option<UnixStream>> {
        self.client.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called by a connection thread after its cleanup.
    pub fn connection_ended(&self) {
        *self.client() = None;
        self.client_gone.notify_all();
    }

    /// Whether a new client may be served now; waits for a hung-up client's cleanup.
    fn wait_idle(&self) -> bool {
        let mut client = self.client();
        match client.as_ref() {
            None => return true,
            Some(s) if !hung_up(s) => return false,
            Some(_) => {}
        }
        let deadline = Instant::now() + self.config.reconnect_wait;
        while client.is_some() {
            let now = Instant::now();
            if now >= deadline || self.stopping.load(Ordering::Acquire) {
                return false;
            }
            let wait = (deadline - now).min(Duration::from_millis(100));
            client = self
                .client_gone
                .wait_timeout(client, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

/// Whether the peer of `stream` has hung up.
fn hung_up(stream: &UnixStream) -> bool {
    let mut pfd = [libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    }];
    // SAFETY: `pfd` is a valid array of one pollfd for the duration of the call.
    let n = unsafe { libc::poll(pfd.as_mut_ptr(), 1, 0) };
    n > 0 && pfd[0].revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0
}

/// Waits until `listener` or `wake` is readable; returns whether the listener is.
fn wait_readable(listener: RawFd, wake: RawFd) -> io::Result<bool> {
    let mut pfd = [
        libc::pollfd {
            fd: listener,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `pfd` is a valid array of two pollfds for the duration of the call.
    let n = unsafe { libc::poll(pfd.as_mut_ptr(), 2, -1) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pfd[0].revents != 0)
}

/// A vfio-user server for one device, listening on a unix socket.
///
/// The backend is shared as `Arc<Mutex<dyn Backend>>`: the owner keeps its own (typed) `Arc`
/// to inspect or drive the device, and the server locks it for each command. The server
/// never holds the lock while waiting for the client.
pub struct Server {
    shared: Arc<Shared>,
    path: PathBuf,
    socket_id: (u64, u64),
    wake: Arc<EventFd>,
    acceptor: Option<JoinHandle<()>>,
}

impl Server {
    /// Listens on `path` (mode 0600) and serves `backend` from a background thread, with the
    /// default [`ServerConfig`].
    ///
    /// A socket file left at `path` by a dead server is removed; a live one is an error, and so
    /// is any other kind of file.
    pub fn start(
        path: impl AsRef<Path>,
        backend: Arc<Mutex<dyn Backend>>,
    ) -> Result<Server, Error> {
        Server::start_with(path, backend, ServerConfig::default())
    }

    /// [`Server::start`] with explicit limits and behaviour.
    pub fn start_with(
        path: impl AsRef<Path>,
        backend: Arc<Mutex<dyn Backend>>,
        config: ServerConfig,
    ) -> Result<Server, Error> {
        let path = path.as_ref().to_path_buf();
        let listen_err = |source| Error::Listen {
            path: path.clone(),
            source,
        };
        remove_stale(&path)?;
        let listener = UnixListener::bind(&path).map_err(listen_err)?;
        let meta = fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
            .and_then(|()| fs::metadata(&path))
            .and_then(|m| listener.set_nonblocking(true).map(|()| m));
        let meta = match meta {
            Ok(m) => m,
            Err(e) => {
                let _ = fs::remove_file(&path);
                return Err(listen_err(e));
            }
        };
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(listen_err)?);
        let shared = Arc::new(Shared {
            backend,
            config,
            stats: Arc::default(),
            migration: Mutex::default(),
            link: Arc::default(),
            client: Mutex::new(None),
            client_gone: Condvar::new(),
            stopping: AtomicBool::new(false),
        });
        let acceptor = {
            let shared = shared.clone();
            let wake = wake.clone();
            std::thread::Builder::new()
                .name("vfio-user-accept".into())
                .spawn(move || accept_loop(&shared, &listener, &wake))
        };
        let acceptor = match acceptor {
            Ok(a) => a,
            Err(e) => {
                let _ = fs::remove_file(&path);
                return Err(Error::Thread(e));
            }
        };
        Ok(Server {
            shared,
            path,
            socket_id: (meta.dev(), meta.ino()),
            wake,
            acceptor: Some(acceptor),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle for reading and writing the client's memory.
    pub fn dma(&self) -> DmaHandle {
        DmaHandle {
            slot: self.shared.link.clone(),
        }
    }

    /// Whether a client is being served.
    pub fn is_connected(&self) -> bool {
        self.shared.client().is_some()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ServerStats {
        self.shared.stats.snapshot()
    }

    /// Whether the server is still accepting clients (its acceptor thread is alive).
    pub fn is_running(&self) -> bool {
        self.acceptor.as_ref().is_some_and(|a| !a.is_finished())
    }

    /// Disconnects the client (the backend sees `disconnected()`), stops listening and removes
    /// the socket file.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::Release);
        if let Err(e) = self.wake.write(1) {
            tracing::error!("Cannot wake the vfio-user acceptor: {e}");
        }
        if acceptor.join().is_err() {
            bump(&self.shared.stats.panics, 1);
        }
        // Remove the socket only if it is still ours (not a successor's at the same path).
        if let Ok(m) = fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.socket_id {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("path", &self.path)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

/// Removes a socket file nobody listens on; refuses live sockets and other files.
fn remove_stale(path: &Path) -> Result<(), Error> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Error::Listen {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(Error::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(Error::SocketInUse(path.to_path_buf())),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            fs::remove_file(path).map_err(|source| Error::Listen {
                path: path.to_path_buf(),
                source,
            })
        }
        Err(source) => Err(Error::Listen {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The acceptor thread.
fn accept_loop(shared: &Arc<Shared>, listener: &UnixListener, wake: &EventFd) {
    let mut worker: Option<JoinHandle<()>> = None;
    while !shared.stopping.load(Ordering::Acquire) {
        match wait_readable(listener.as_raw_fd(), wake.as_raw_fd()) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("poll on the vfio-user socket: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        if shared.stopping.load(Ordering::Acquire) {
            break;
        }
        match listener.accept() {
            Ok((stream, _)) => admit(shared, stream, &mut worker),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                // E.g. out of descriptors: back off instead of spinning.
                tracing::error!("accept on the vfio-user socket: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    if let Some(s) = shared.client().as_ref() {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    if let Some(w) = worker.take() {
        if w.join().is_err() {
            bump(&shared.stats.panics, 1);
        }
    }
}

/// Serves `stream` if no other client is being served; otherwise closes it.
fn admit(shared: &Arc<Shared>, stream: UnixStream, worker: &mut Option<JoinHandle<()>>) {
    let refuse = |why: &str| {
        if bump(&shared.stats.refused, 1) {
            tracing::warn!("Refusing a vfio-user client: {why}");
        }
    };
    if stream.set_nonblocking(false).is_err() {
        return refuse("cannot set up its socket");
    }
    if !shared.wait_idle() {
        return refuse("another client is being served");
    }
    if let Some(w) = worker.take() {
        if w.join().is_err() {
            bump(&shared.stats.panics, 1);
        }
    }
    let Ok(clone) = stream.try_clone() else {
        return refuse("cannot clone its socket");
    };
    *shared.client() = Some(clone);
    shared.stats.connections.fetch_add(1, Ordering::Relaxed);
    let spawned = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("vfio-user-conn".into())
            .spawn(move || connection::run(shared, stream))
    };
    match spawned {
        Ok(h) => *worker = Some(h),
        Err(e) => {
            tracing::error!("Cannot start a vfio-user connection thread: {e}");
            shared.connection_ended();
        }
    }
}
