//! One client connection, served by one thread that reads each message and executes it inline
//! (a thread hop per message costs more than the socket round trip itself on nested hosts).
//!
//! Server-to-client requests (`DMA_READ`/`DMA_WRITE`) complicate reading: their replies arrive
//! on the same socket, and the thread waiting for one may hold a lock the connection thread
//! needs (or be the connection thread itself, inside a backend method). So reading is a role,
//! not a thread: whoever needs the next message and finds nobody reading becomes the reader
//! for one message, and borrows the connection's read buffer ([`FrameReader`]) for that time.
//! Replies go to their waiters; commands read by a waiting requester are queued for the
//! connection thread, which executes queued commands before reading more. No thread ever waits
//! for the backend while it is the reader.
//!
//! The hot path (one small command, one reply) costs two system calls: one `recvmsg` brings the
//! whole request, one `sendmsg` carries the whole reply; the read-state condition variable is
//! signalled only when a thread waits on it.
//!
//! When the connection ends, the client's DMA mappings are dropped (the backend is told with
//! `dma_unmap`), DMA logging is stopped, and [`crate::Backend::disconnected`] is called; the
//! device state stays.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{
    Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
};
use std::time::{Duration, Instant};

use crate::dma::{DmaMap, DmaRwLayout};
use crate::error::{Error, Reject};
use crate::message::{self, FrameError, FrameReader, Message};
use crate::server::Shared;
use crate::stats::{bump, Stats};
use crate::version::{self, Negotiated};
use crate::wire::{command, Header, HEADER_SIZE, TYPE_COMMAND, TYPE_REPLY};
use crate::{access, device, dma, migration};

/// Commands a waiting requester may read ahead of the connection thread (bounds memory held
/// for a pipelining client while a DMA request waits).
const MAX_QUEUED: usize = 64;
/// Server-to-client requests waiting for replies at once.
const MAX_PENDING: usize = 64;

/// What a command handler answers.
#[derive(Debug)]
pub(crate) struct Response {
    /// The reply payload (after the header).
    pub payload: Vec<u8>,
    /// Descriptors sent with the reply.
    pub fds: Vec<OwnedFd>,
}

impl Response {
    /// A reply without payload.
    pub fn empty() -> Self {
        Response::payload(Vec::new())
    }

    /// A reply carrying `payload`.
    pub fn payload(payload: Vec<u8>) -> Self {
        Response {
            payload,
            fds: Vec::new(),
        }
    }
}

/// What command handlers see.
pub(crate) struct Ctx<'a> {
    /// Device-level state.
    pub shared: &'a Shared,
    /// This connection.
    pub link: &'a Link,
    /// The agreed session parameters.
    pub negotiated: Negotiated,
}

/// Server-to-client requests waiting for replies.
#[derive(Debug, Default)]
struct Pending {
    next_id: u16,
    waiters: HashMap<u16, SyncSender<Message>>,
    closed: bool,
}

/// Who reads the socket, and what was read for the connection thread.
#[derive(Debug, Default)]
struct ReadState {
    /// A thread is reading a message now (it has taken `frames`).
    reading: bool,
    /// The socket's read buffer and framing state, lent to the reader while it reads.
    frames: FrameReader,
    /// Threads waiting on `read_cv` (it is notified only when some are: a notification is a
    /// system call even when nobody waits).
    waiting: usize,
    /// Commands read by requesters, oldest first.
    queue: VecDeque<Message>,
    /// The connection is over (EOF, framing error, socket error, or closed by the server).
    closed: bool,
}

/// A connection, shared by its thread and [`crate::DmaHandle`]s.
#[derive(Debug)]
pub(crate) struct Link {
    writer: Mutex<UnixStream>,
    reader: UnixStream,
    read: Mutex<ReadState>,
    read_cv: Condvar,
    pending: Mutex<Pending>,
    dma: RwLock<DmaMap>,
    /// The client's `max_data_xfer_size`; 0 until `VERSION` is agreed.
    client_max_xfer: AtomicU32,
    server_max_xfer: u32,
    max_message: u32,
    layout: DmaRwLayout,
    timeout: Duration,
    stats: Arc<Stats>,
}

impl Link {
    fn new(writer: UnixStream, reader: UnixStream, shared: &Shared) -> Self {
        Link {
            writer: Mutex::new(writer),
            reader,
            read: Mutex::default(),
            read_cv: Condvar::new(),
            pending: Mutex::default(),
            dma: RwLock::default(),
            client_max_xfer: AtomicU32::new(0),
            server_max_xfer: shared.config.max_data_xfer_size,
            max_message: shared.max_message_size(),
            layout: shared.config.dma_rw_layout,
            timeout: shared.config.dma_timeout,
            stats: shared.stats.clone(),
        }
    }

    /// The DMA map, for reading.
    pub fn dma_map(&self) -> RwLockReadGuard<'_, DmaMap> {
        self.dma.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The DMA map, for changing.
    pub fn dma_map_mut(&self) -> RwLockWriteGuard<'_, DmaMap> {
        self.dma.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The client's `max_data_xfer_size` (0 before `VERSION`).
    pub fn client_max_xfer(&self) -> u32 {
        self.client_max_xfer.load(Ordering::Acquire)
    }

    /// Largest data chunk of one `DMA_READ`/`DMA_WRITE`.
    pub fn chunk_size(&self) -> usize {
        let n = self.client_max_xfer().min(self.server_max_xfer).max(1);
        usize::try_from(n).unwrap_or(usize::MAX)
    }

    /// The `DMA_READ`/`DMA_WRITE` layout.
    pub fn layout(&self) -> DmaRwLayout {
        self.layout
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_state(&self) -> MutexGuard<'_, ReadState> {
        self.read.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends one message (`header` with its `message_size` filled in, then `payload`) with one
    /// `sendmsg`.
    pub fn send(&self, header: Header, payload: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
        let writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        message::send_message(&writer, header, payload, fds)
    }

    /// Wakes the threads waiting on `read_cv`, if any.
    fn notify_readers(&self, st: &ReadState) {
        if st.waiting > 0 {
            self.read_cv.notify_all();
        }
    }

    /// Files a message just read (under the read-state lock): replies go to their waiters,
    /// commands are returned, errors close the connection.
    fn absorb(&self, st: &mut ReadState, res: Result<Message, FrameError>) -> Option<Message> {
        match res {
            Ok(msg) => {
                self.stats.messages.fetch_add(1, Ordering::Relaxed);
                if msg.header.msg_type() != TYPE_REPLY {
                    return Some(msg);
                }
                let waiter = self.pending().waiters.remove(&msg.header.msg_id);
                let delivered = waiter.is_some_and(|tx| tx.try_send(msg).is_ok());
                if !delivered && bump(&self.stats.unexpected_replies, 1) {
                    tracing::warn!("Reply from the client matches no request");
                }
                None
            }
            Err(e) => {
                match &e {
                    FrameError::Eof => {}
                    FrameError::Io(err) => tracing::debug!("Client socket: {err}"),
                    _ => {
                        if bump(&self.stats.framing_errors, 1) {
                            tracing::warn!("Closing the connection: {e}");
                        }
                    }
                }
                st.closed = true;
                None
            }
        }
    }

    /// The next command for the connection thread (queued ones first); `None` once the
    /// connection is over.
    fn next_command(&self) -> Option<Message> {
        let mut st = self.read_state();
        loop {
            if let Some(msg) = st.queue.pop_front() {
                // A requester may wait for room in the queue to read on.
                self.notify_readers(&st);
                return Some(msg);
            }
            if st.closed {
                return None;
            }
            if st.reading {
                st.waiting += 1;
                st = self
                    .read_cv
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner);
                st.waiting -= 1;
                continue;
            }
            st.reading = true;
            let mut frames = std::mem::take(&mut st.frames);
            drop(st);
            let res = frames.read(&self.reader, self.max_message);
            st = self.read_state();
            st.frames = frames;
            st.reading = false;
            let cmd = self.absorb(&mut st, res);
            self.notify_readers(&st);
            if cmd.is_some() {
                return cmd;
            }
        }
    }

    /// Sends a server-to-client command and waits for its reply, reading the socket itself
    /// whenever nobody else does.
    pub fn request(&self, cmd: u16, payload: &[u8]) -> Result<Message, Error> {
        let (tx, rx) = mpsc::sync_channel(1);
        let id = {
            let mut p = self.pending();
            if p.closed {
                return Err(Error::NotConnected);
            }
            if p.waiters.len() >= MAX_PENDING {
                return Err(Error::DmaBusy);
            }
            let mut id = p.next_id;
            while p.waiters.contains_key(&id) {
                id = id.wrapping_add(1);
            }
            p.next_id = id.wrapping_add(1);
            p.waiters.insert(id, tx);
            id
        };
        let header = Header {
            msg_id: id,
            command: cmd,
            message_size: 0,
            flags: TYPE_COMMAND,
            error: 0,
        };
        if let Err(e) = self.send(header, payload, &[]) {
            self.pending().waiters.remove(&id);
            return Err(Error::Send(e));
        }
        let res = self.wait_reply(&rx);
        if res.is_err() {
            self.pending().waiters.remove(&id);
        }
        res
    }

    fn wait_reply(&self, rx: &Receiver<Message>) -> Result<Message, Error> {
        let deadline = Instant::now() + self.timeout;
        let mut st = self.read_state();
        loop {
            if let Ok(reply) = rx.try_recv() {
                return Ok(reply);
            }
            if st.closed {
                return Err(Error::NotConnected);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::DmaTimeout);
            }
            if st.reading || st.queue.len() >= MAX_QUEUED {
                // Someone else reads (and will route our reply), or the connection thread
                // must drain its queue first.
                st.waiting += 1;
                st = self
                    .read_cv
                    .wait_timeout(st, deadline - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                st.waiting -= 1;
                continue;
            }
            st.reading = true;
            let mut frames = std::mem::take(&mut st.frames);
            drop(st);
            // Waits for the socket only until the deadline; a partial message stays buffered
            // for the next reader.
            let res = frames.read_until(&self.reader, self.max_message, deadline);
            st = self.read_state();
            st.frames = frames;
            st.reading = false;
            if let Some(res) = res.transpose() {
                if let Some(cmd) = self.absorb(&mut st, res) {
                    st.queue.push_back(cmd);
                }
            }
            self.notify_readers(&st);
        }
    }

    /// Ends the connection for everyone: waiting requests fail, the connection thread stops
    /// after the queued commands.
    fn close(&self) {
        {
            let mut p = self.pending();
            p.closed = true;
            p.waiters.clear();
        }
        self.read_state().closed = true;
        self.read_cv.notify_all();
    }
}

/// Serves one accepted connection until it ends, then cleans up after it.
pub(crate) fn run(shared: Arc<Shared>, stream: UnixStream) {
    let served = catch_unwind(AssertUnwindSafe(|| serve(&shared, &stream)));
    if served.is_err() {
        bump(&shared.stats.panics, 1);
        tracing::error!("vfio-user connection thread panicked");
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    if catch_unwind(AssertUnwindSafe(|| cleanup(&shared))).is_err() {
        bump(&shared.stats.panics, 1);
        tracing::error!("vfio-user connection cleanup panicked");
    }
    shared.connection_ended();
}

/// Reads and executes commands until the connection ends.
fn serve(shared: &Arc<Shared>, stream: &UnixStream) {
    let (writer, reader) = match (stream.try_clone(), stream.try_clone()) {
        (Ok(w), Ok(r)) => (w, r),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("Cannot clone the client socket: {e}");
            return;
        }
    };
    let link = Arc::new(Link::new(writer, reader, shared));
    shared.set_link(Some(link.clone()));
    let mut session = Session {
        shared,
        link: &link,
        stream,
        negotiated: None,
    };
    // Guarantee the close even if a handler panics: requesters must not wait for a dead link.
    struct CloseOnDrop<'a>(&'a Link);
    impl Drop for CloseOnDrop<'_> {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let _close = CloseOnDrop(&link);
    while let Some(msg) = link.next_command() {
        session.handle(msg);
    }
}

/// Drops the client's mappings, stops DMA logging and tells the backend the client left.
fn cleanup(shared: &Shared) {
    let Some(link) = shared.set_link(None) else {
        return;
    };
    link.close();
    let entries = link.dma_map_mut().take_all();
    let mut mig = shared.migration();
    let mut backend = shared.backend();
    for (iova, entry) in entries {
        let size = entry.size;
        drop(entry);
        if let Err(e) = backend.dma_unmap(iova, size) {
            tracing::warn!(iova, "Backend failed to unmap DMA on disconnect: {e}");
        }
    }
    if mig.logging {
        if let Err(e) = backend.dma_logging_stop() {
            tracing::warn!("Backend failed to stop DMA logging on disconnect: {e}");
        }
        mig.logging = false;
    }
    backend.disconnected();
}

/// The connection thread's state.
struct Session<'a> {
    shared: &'a Shared,
    link: &'a Link,
    stream: &'a UnixStream,
    negotiated: Option<Negotiated>,
}

impl Session<'_> {
    /// Executes one command and replies (unless `NO_REPLY`).
    fn handle(&mut self, msg: Message) {
        let Message {
            header,
            frame,
            fds,
            excess_fds,
        } = msg;
        let payload = frame.get(HEADER_SIZE..).unwrap_or_default();
        // Descriptors a command does not take are closed before its reply goes out.
        let total_fds = fds.len() + excess_fds;
        let result = match (self.negotiated, header.msg_type(), header.command) {
            _ if excess_fds > 0 => {
                drop(fds);
                bump(&self.shared.stats.stray_fds, total_fds as u64);
                Err(Reject::inval(format!(
                    "{total_fds} fds with one message (at most {})",
                    message::MAX_MSG_FDS
                )))
            }
            (Some(negotiated), TYPE_COMMAND, cmd) if cmd != command::VERSION => {
                let ctx = Ctx {
                    shared: self.shared,
                    link: self.link,
                    negotiated,
                };
                dispatch(&ctx, cmd, payload, fds)
            }
            (negotiated, msg_type, cmd) => {
                if !fds.is_empty() {
                    bump(&self.shared.stats.stray_fds, total_fds as u64);
                }
                drop(fds);
                if msg_type != TYPE_COMMAND {
                    Err(Reject::inval(format!("message type {msg_type}")))
                } else if cmd == command::VERSION {
                    self.version(payload)
                } else {
                    debug_assert!(negotiated.is_none());
                    Err(Reject::inval("the first message must be VERSION"))
                }
            }
        };
        let (reply, resp) = match result {
            Ok(Some(resp)) => (message::reply_header(&header), resp),
            Ok(None) => return,
            Err(reject) => {
                if bump(&self.shared.stats.errors, 1) {
                    tracing::warn!(
                        command = header.command,
                        errno = reject.errno,
                        "Rejected: {}",
                        reject.reason
                    );
                }
                (
                    message::error_header(&header, reject.errno),
                    Response::empty(),
                )
            }
        };
        if header.no_reply() {
            return;
        }
        let raw: Vec<RawFd> = resp.fds.iter().map(AsRawFd::as_raw_fd).collect();
        if let Err(e) = self.link.send(reply, &resp.payload, &raw) {
            tracing::debug!("Cannot reply to the client: {e}");
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// `VERSION`: `Ok(None)` means the connection was closed.
    fn version(&mut self, payload: &[u8]) -> Result<Option<Response>, Reject> {
        if self.negotiated.is_some() {
            return Err(Reject::inval("VERSION was already negotiated"));
        }
        match version::negotiate(payload, &self.shared.config)? {
            version::Outcome::Accept(reply, negotiated) => {
                self.negotiated = Some(negotiated);
                self.link
                    .client_max_xfer
                    .store(negotiated.client_max_data_xfer, Ordering::Release);
                Ok(Some(Response::payload(reply)))
            }
            version::Outcome::Close(major) => {
                tracing::warn!("Client speaks vfio-user major {major}; closing");
                let _ = self.stream.shutdown(std::net::Shutdown::Both);
                Ok(None)
            }
        }
    }
}

/// Routes a command (after `VERSION`) to its handler.
fn dispatch(
    ctx: &Ctx<'_>,
    cmd: u16,
    payload: &[u8],
    mut fds: Vec<OwnedFd>,
) -> Result<Option<Response>, Reject> {
    let takes_fds = matches!(cmd, command::DMA_MAP | command::DEVICE_SET_IRQS);
    if !takes_fds && !fds.is_empty() {
        bump(&ctx.shared.stats.stray_fds, fds.len() as u64);
        fds.clear();
    }
    let resp = match cmd {
        command::DMA_MAP => dma::handle_map(ctx, payload, fds),
        command::DMA_UNMAP => dma::handle_unmap(ctx, payload),
        command::DEVICE_GET_INFO => device::handle_get_info(ctx, payload),
        command::DEVICE_GET_REGION_INFO => device::handle_get_region_info(ctx, payload),
        command::DEVICE_GET_REGION_IO_FDS => device::handle_get_region_io_fds(ctx, payload),
        command::DEVICE_GET_IRQ_INFO => device::handle_get_irq_info(ctx, payload),
        command::DEVICE_SET_IRQS => device::handle_set_irqs(ctx, payload, fds),
        command::REGION_READ => access::handle_read(ctx, payload),
        command::REGION_WRITE => access::handle_write(ctx, payload),
        command::REGION_WRITE_MULTI => access::handle_write_multi(ctx, payload),
        command::DEVICE_RESET => device::handle_reset(ctx),
        command::DEVICE_FEATURE => migration::handle_feature(ctx, payload),
        command::MIG_DATA_READ => migration::handle_data_read(ctx, payload),
        command::MIG_DATA_WRITE => migration::handle_data_write(ctx, payload),
        command::DMA_READ | command::DMA_WRITE => Err(Reject::inval(format!(
            "command {cmd} goes from server to client"
        ))),
        _ => Err(Reject::new(
            libc::ENOTSUP,
            format!("unknown or retired command {cmd}"),
        )),
    }?;
    Ok(Some(resp))
}
