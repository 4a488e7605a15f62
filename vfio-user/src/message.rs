//! Framing: reading messages (header, bounded payload, file descriptors) through a
//! per-connection buffer, and sending one message with one `sendmsg`.
//!
//! Reading rules ([`FrameReader`]):
//! - While the next header is incomplete, a read asks for as much as the buffer holds, so a
//!   small request (or several pipelined ones) arrives with one `recvmsg`. Once the header is
//!   known, a read asks for exactly the rest of that message, never more.
//! - `message_size` is checked (header ≤ size ≤ the limit) before anything is read for the
//!   payload, so the buffer never holds more than the largest accepted message.
//! - Descriptors belong to the message that holds the last byte of the `recvmsg` that brought
//!   them. Linux delivers an `SCM_RIGHTS` with the first byte of the `sendmsg` that carried it and
//!   ends that read after the `sendmsg`'s bytes (or when the buffer is full), so descriptors a
//!   client sends with a message's bytes are attributed to that message even when the same read
//!   also brought the end of the previous one. Descriptors sent any other way land on some
//!   message deterministically, where at most [`MAX_MSG_FDS`] are kept and the rest are closed
//!   at once.
//! - A read with a deadline keeps what it got when the deadline passes: the next reader goes on
//!   from there.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use libc::{c_void, iovec};
use vm_memory::ByteValued;

use crate::wire::{read_struct, Header, FLAG_ERROR, HEADER_SIZE, TYPE_REPLY};

/// Most file descriptors accepted with one message (`max_msg_fds`).
pub const MAX_MSG_FDS: usize = 16;

/// The kernel's limit of descriptors in one `SCM_RIGHTS` (`SCM_MAX_FD`): a control buffer this
/// large is never truncated, so every descriptor received is seen (and owned, or closed).
const SCM_MAX_FD: u32 = 253;

const _: () = assert!(std::mem::size_of::<RawFd>() == 4);

/// Bytes of control buffer for [`SCM_MAX_FD`] descriptors.
// SAFETY: `CMSG_SPACE` is pure arithmetic on its argument.
const CMSG_BYTES: usize = unsafe { libc::CMSG_SPACE(4 * SCM_MAX_FD) } as usize;

/// A control-message buffer, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_BYTES]);

/// Size of the receive buffer; a larger message gets a buffer of exactly its size, handed over
/// as its frame.
const RECV_BUF: usize = 4096;

/// One received message.
#[derive(Debug)]
pub(crate) struct Message {
    /// The header.
    pub header: Header,
    /// The whole message, header included (`message_size` bytes).
    pub frame: Vec<u8>,
    /// Received descriptors (at most [`MAX_MSG_FDS`]).
    pub fds: Vec<OwnedFd>,
    /// Descriptors beyond [`MAX_MSG_FDS`]; they were closed on arrival.
    pub excess_fds: usize,
}

impl Message {
    /// Everything after the header (`message_size - 16` bytes).
    pub fn payload(&self) -> &[u8] {
        self.frame.get(HEADER_SIZE..).unwrap_or_default()
    }
}

/// Why no message could be read; each one ends the connection.
#[derive(Debug)]
pub(crate) enum FrameError {
    /// The peer closed the connection between messages.
    Eof,
    /// The peer closed the connection inside a message.
    Truncated,
    /// `message_size` is smaller than the header.
    TooSmall(u32),
    /// `message_size` exceeds the largest message accepted.
    TooLarge(u32),
    /// The socket failed.
    Io(io::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Eof => write!(f, "connection closed"),
            FrameError::Truncated => write!(f, "connection closed inside a message"),
            FrameError::TooSmall(n) => write!(f, "message_size {n} is smaller than the header"),
            FrameError::TooLarge(n) => write!(f, "message_size {n} exceeds the limit"),
            FrameError::Io(e) => write!(f, "socket error: {e}"),
        }
    }
}

/// Descriptors received for one message that is not yet complete.
#[derive(Debug)]
struct FdGroup {
    /// Stream offset of the first byte of the message they belong to.
    owner: u64,
    /// Kept descriptors (at most [`MAX_MSG_FDS`]).
    fds: Vec<OwnedFd>,
    /// Descriptors closed because the message already had [`MAX_MSG_FDS`].
    excess: usize,
}

/// The read side of one connection: a buffer of received bytes and the descriptors that came
/// with them (see the module documentation for the rules).
///
/// Invariants: `start` is the first byte of a message; `start <= end <= buf.len()`; the buffer
/// holds at most one incomplete message (the last); every descriptor group belongs to a message
/// with bytes in `[start, end)`, one group per message, in stream order.
#[derive(Debug, Default)]
pub(crate) struct FrameReader {
    buf: Vec<u8>,
    /// First unconsumed byte.
    start: usize,
    /// End of the received bytes.
    end: usize,
    /// Stream offset of `buf[0]`.
    base: u64,
    /// Descriptors of messages not yet complete (at most two groups: see `attach`).
    groups: Vec<FdGroup>,
}

impl FrameReader {
    /// Reads the next message, waiting as long as it takes; `max_size` bounds `message_size`
    /// (header included).
    pub fn read(&mut self, stream: &UnixStream, max_size: u32) -> Result<Message, FrameError> {
        loop {
            if let Some(msg) = self.next(stream, max_size, None)? {
                return Ok(msg);
            }
        }
    }

    /// [`FrameReader::read`], waiting for the socket only until `deadline`: `Ok(None)` when it
    /// passed before a whole message was there (what arrived stays buffered).
    pub fn read_until(
        &mut self,
        stream: &UnixStream,
        max_size: u32,
        deadline: Instant,
    ) -> Result<Option<Message>, FrameError> {
        self.next(stream, max_size, Some(deadline))
    }

    fn next(
        &mut self,
        stream: &UnixStream,
        max_size: u32,
        deadline: Option<Instant>,
    ) -> Result<Option<Message>, FrameError> {
        loop {
            let avail = self.end - self.start;
            let want = match read_struct::<Header>(&self.buf[self.start..self.end]) {
                Some(header) => {
                    if (header.message_size as usize) < HEADER_SIZE {
                        return Err(FrameError::TooSmall(header.message_size));
                    }
                    if header.message_size > max_size {
                        return Err(FrameError::TooLarge(header.message_size));
                    }
                    // Bounded by `max_size` above.
                    let size = header.message_size as usize;
                    if avail >= size {
                        return Ok(Some(self.take(header, size)));
                    }
                    // Exactly the rest of this message.
                    self.reserve(size);
                    size - avail
                }
                None => {
                    // The header is incomplete: as much as fits.
                    self.reserve(HEADER_SIZE);
                    self.buf.len() - self.end
                }
            };
            if let Some(deadline) = deadline {
                if !readable_by(stream, deadline) {
                    return Ok(None);
                }
            }
            let mut fds = Vec::new();
            let n = recv_into(stream, &mut self.buf[self.end..self.end + want], &mut fds)
                .map_err(FrameError::Io)?;
            if n == 0 {
                return Err(if avail == 0 {
                    FrameError::Eof
                } else {
                    FrameError::Truncated
                });
            }
            self.end += n;
            if !fds.is_empty() {
                self.attach(fds);
            }
        }
    }

    /// Makes room for `total` bytes from `start` (moving the incomplete message to the front,
    /// or into a buffer of its own size when it does not fit the usual one).
    fn reserve(&mut self, total: usize) {
        if self.start == self.end && self.start > 0 {
            self.base += self.start as u64;
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.start >= total {
            return;
        }
        let avail = self.end - self.start;
        if self.buf.len() >= total && self.buf.len() >= RECV_BUF {
            self.buf.copy_within(self.start..self.end, 0);
        } else {
            let mut grown = vec![0u8; total.max(RECV_BUF)];
            grown[..avail].copy_from_slice(&self.buf[self.start..self.end]);
            self.buf = grown;
        }
        self.base += self.start as u64;
        self.start = 0;
        self.end = avail;
    }

    /// Hands out the complete message of `size` bytes at `start`, with its descriptors.
    fn take(&mut self, header: Header, size: usize) -> Message {
        let owner = self.base + self.start as u64;
        let frame = if self.start == 0 && size == self.buf.len() && size > RECV_BUF {
            // A message that got a buffer of its own: hand the buffer over.
            self.base += size as u64;
            self.end = 0;
            std::mem::take(&mut self.buf)
        } else {
            let frame = self.buf[self.start..self.start + size].to_vec();
            self.start += size;
            frame
        };
        let (fds, excess_fds) = match self.groups.first() {
            Some(g) if g.owner <= owner => {
                let g = self.groups.remove(0);
                debug_assert_eq!(g.owner, owner);
                (g.fds, g.excess)
            }
            _ => (Vec::new(), 0),
        };
        Message {
            header,
            frame,
            fds,
            excess_fds,
        }
    }

    /// Files the descriptors of the read that ended at `end` under the message holding its last
    /// byte. Before a read the buffer holds no complete message, so existing groups all belong
    /// to the message at `start`; the new one belongs to it or to a later one: two groups at most.
    fn attach(&mut self, fds: Vec<OwnedFd>) {
        let owner = self.base + self.owner_of(self.end - 1) as u64;
        if self.groups.last().is_none_or(|g| g.owner != owner) {
            debug_assert!(self.groups.len() < 2);
            self.groups.push(FdGroup {
                owner,
                fds: Vec::new(),
                excess: 0,
            });
        }
        let Some(group) = self.groups.last_mut() else {
            return;
        };
        for fd in fds {
            if group.fds.len() < MAX_MSG_FDS {
                group.fds.push(fd);
            } else {
                group.excess += 1;
                drop(fd);
            }
        }
    }

    /// Buffer offset of the message holding buffer byte `last` (`start <= last < end`), found by
    /// walking the headers from `start`. A malformed header stops the walk: the connection ends
    /// when that message is reached, and its descriptors are closed with it.
    fn owner_of(&self, last: usize) -> usize {
        let mut p = self.start;
        while let Some(h) = read_struct::<Header>(&self.buf[p..self.end]) {
            let size = h.message_size as usize;
            if size < HEADER_SIZE || p + size > last {
                break;
            }
            p += size;
        }
        p
    }
}

/// Whether `stream` becomes readable (or hung up) before `deadline`.
pub(crate) fn readable_by(stream: &UnixStream, deadline: Instant) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
    let mut pfd = [libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: `pfd` is a valid array of one pollfd for the duration of the call.
    let n = unsafe { libc::poll(pfd.as_mut_ptr(), 1, ms) };
    n > 0
}

/// One `recvmsg` into `buf`; every descriptor received is appended to `fds` (owned from here
/// on, close-on-exec).
fn recv_into(stream: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut cmsg = CmsgBuf([0; CMSG_BYTES]);
    let mut iov = iovec {
        iov_base: buf.as_mut_ptr().cast::<c_void>(),
        iov_len: buf.len(),
    };
    loop {
        // SAFETY: all-zero is a valid `msghdr` (null pointers, zero lengths).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.0.as_mut_ptr().cast::<c_void>();
        msg.msg_controllen = CMSG_BYTES as _;
        // SAFETY: `msg` describes `buf` (exclusively borrowed; any byte pattern is a valid `u8`)
        // and `cmsg`, both alive for the call.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: `msg` was filled in by `recvmsg`; `CMSG_FIRSTHDR`/`CMSG_NXTHDR` only return
        // headers that lie inside its `msg_controllen` bytes of `cmsg`, which stays alive.
        let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !c.is_null() {
            // SAFETY: `c` points to a whole, aligned `cmsghdr` inside `cmsg` (see above).
            let (level, kind, len) = unsafe { ((*c).cmsg_level, (*c).cmsg_type, (*c).cmsg_len) };
            if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
                // SAFETY: as above; `CMSG_LEN(0)` is arithmetic.
                let (data, head) = unsafe { (libc::CMSG_DATA(c), libc::CMSG_LEN(0)) };
                #[allow(clippy::unnecessary_cast)] // `cmsg_len` is a `u32` on musl.
                let count = (len as usize).saturating_sub(head as usize) / 4;
                for i in 0..count {
                    // SAFETY: the kernel wrote `count` descriptors after the header, inside
                    // `cmsg`; they may be unaligned.
                    let fd = unsafe { data.cast::<RawFd>().add(i).read_unaligned() };
                    // SAFETY: `recvmsg` just installed this descriptor in our table; nothing
                    // else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
            // SAFETY: `c` is a header of `msg`'s control data (see above).
            c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
        }
        return Ok(usize::try_from(n).unwrap_or(0));
    }
}

/// Sends one message: `parts` back to back with `fds` attached to the first byte.
pub(crate) fn send_all(stream: &UnixStream, parts: &[&[u8]], fds: &[RawFd]) -> io::Result<()> {
    const MAX_PARTS: usize = 4;
    if parts.len() > MAX_PARTS || fds.len() > SCM_MAX_FD as usize {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut cmsg = CmsgBuf([0; CMSG_BYTES]);
    let mut fds = fds;
    let mut sent = 0;
    while sent < total {
        // The parts not yet sent.
        let mut iov = [iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_PARTS];
        let mut n_iov = 0;
        let mut skip = sent;
        for part in parts {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            let rest = &part[skip..];
            skip = 0;
            iov[n_iov] = iovec {
                iov_base: rest.as_ptr().cast_mut().cast::<c_void>(),
                iov_len: rest.len(),
            };
            n_iov += 1;
        }
        // SAFETY: all-zero is a valid `msghdr` (null pointers, zero lengths).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = n_iov as _;
        if !fds.is_empty() {
            // Four bytes per descriptor, at most `SCM_MAX_FD` of them (checked above).
            let bytes = 4 * u32::try_from(fds.len()).unwrap_or(SCM_MAX_FD);
            msg.msg_control = cmsg.0.as_mut_ptr().cast::<c_void>();
            // SAFETY: `CMSG_SPACE` is arithmetic.
            msg.msg_controllen = unsafe { libc::CMSG_SPACE(bytes) } as _;
            // SAFETY: `msg_control` points to `cmsg`, large enough for `SCM_MAX_FD` descriptors
            // and aligned for `cmsghdr`, so the first header and its data lie inside it.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(bytes) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr(),
                    libc::CMSG_DATA(c).cast::<RawFd>(),
                    fds.len(),
                );
            }
        }
        // SAFETY: `msg` describes the unsent parts (borrowed, only read) and `cmsg`, alive for
        // the call.
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        sent += usize::try_from(n).unwrap_or(0);
        fds = &[];
    }
    Ok(())
}

/// The header of a reply to `request` (`message_size` is filled in when sent).
pub(crate) fn reply_header(request: &Header) -> Header {
    Header {
        msg_id: request.msg_id,
        command: request.command,
        message_size: 0,
        flags: TYPE_REPLY,
        error: 0,
    }
}

/// The header of an error reply to `request` (the header alone, with `ERROR` and `errno`).
pub(crate) fn error_header(request: &Header, errno: i32) -> Header {
    let mut header = reply_header(request);
    header.flags |= FLAG_ERROR;
    header.error = u32::try_from(errno).unwrap_or(libc::EINVAL.unsigned_abs());
    header
}

/// Sends `header` (with `message_size` filled in) followed by `payload`, `fds` attached.
pub(crate) fn send_message(
    stream: &UnixStream,
    mut header: Header,
    payload: &[u8],
    fds: &[RawFd],
) -> io::Result<()> {
    header.message_size = u32::try_from(HEADER_SIZE + payload.len())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    send_all(stream, &[header.as_slice(), payload], fds)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // Test data patterns.
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    use proptest::prelude::*;

    fn header(id: u16, size: u32) -> Header {
        Header {
            msg_id: id,
            command: 4,
            message_size: size,
            flags: 0,
            error: 0,
        }
    }

    /// The bytes of message `id` carrying `payload`.
    fn frame(id: u16, payload: &[u8]) -> Vec<u8> {
        let size = u32::try_from(HEADER_SIZE + payload.len()).unwrap();
        [header(id, size).as_slice(), payload].concat()
    }

    /// A memfd whose size identifies it.
    fn tagged_fd(tag: u64) -> File {
        // SAFETY: the name is a valid NUL-terminated string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"vgpu-frame-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just created and is owned by nobody else.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(tag).unwrap();
        f
    }

    fn tags(fds: &[OwnedFd]) -> Vec<u64> {
        fds.iter()
            .map(|fd| {
                File::from(fd.try_clone().unwrap())
                    .metadata()
                    .unwrap()
                    .len()
            })
            .collect()
    }

    fn raw(files: &[File]) -> Vec<RawFd> {
        files.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// Bytes received but not yet handed out.
    fn buffered(r: &FrameReader) -> usize {
        r.end - r.start
    }

    #[test]
    fn test_frame_two_messages_in_one_read_second_served_from_buffer() {
        let (a, b) = UnixStream::pair().unwrap();
        let bytes = [frame(1, &[1, 2, 3, 4]), frame(2, &[5; 16])].concat();
        (&a).write_all(&bytes).unwrap();
        let mut r = FrameReader::default();
        let m = r.read(&b, 1024).unwrap();
        assert_eq!((m.header.msg_id, m.payload()), (1, &[1, 2, 3, 4][..]));
        // One recvmsg brought both: the second is already buffered.
        assert_eq!(buffered(&r), 32);
        drop(a);
        let m = r.read(&b, 1024).unwrap();
        assert_eq!((m.header.msg_id, m.payload()), (2, &[5u8; 16][..]));
        assert!(matches!(r.read(&b, 1024), Err(FrameError::Eof)));
    }

    #[test]
    fn test_frame_split_writes_reassembled() {
        for cut in [5, HEADER_SIZE, HEADER_SIZE + 2] {
            let (a, b) = UnixStream::pair().unwrap();
            let msg = frame(7, &[1, 2, 3, 4]);
            (&a).write_all(&msg[..cut]).unwrap();
            let t = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                (&a).write_all(&msg[cut..]).unwrap();
                a
            });
            let m = FrameReader::default().read(&b, 1024).unwrap();
            assert_eq!(m.header.msg_id, 7);
            assert_eq!(m.payload(), &[1, 2, 3, 4]);
            drop(t.join().unwrap());
        }
    }

    #[test]
    fn test_frame_known_size_read_stops_at_message_end() {
        let (a, b) = UnixStream::pair().unwrap();
        let first = frame(1, &[9; 100]);
        (&a).write_all(&first[..20]).unwrap();
        let mut r = FrameReader::default();
        assert!(r
            .read_until(&b, 1024, Instant::now() + Duration::from_millis(10))
            .unwrap()
            .is_none());
        // The rest of the first message and all of the second in one go: only the first is
        // read, up to its last byte.
        (&a).write_all(&[&first[20..], &frame(2, &[])[..]].concat())
            .unwrap();
        let m = r.read(&b, 1024).unwrap();
        assert_eq!((m.header.msg_id, m.payload().len()), (1, 100));
        assert_eq!(buffered(&r), 0);
        assert_eq!(r.read(&b, 1024).unwrap().header.msg_id, 2);
    }

    #[test]
    fn test_frame_fds_of_second_message_in_same_read_go_to_it() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = [tagged_fd(11), tagged_fd(12)];
        // Two sends, the second with descriptors: Linux returns both in one read, with the
        // descriptors.
        send_all(&a, &[&frame(1, &[0; 8])], &[]).unwrap();
        send_all(&a, &[&frame(2, &[0; 8])], &raw(&f)).unwrap();
        send_all(&a, &[&frame(3, &[])], &[]).unwrap();
        let mut r = FrameReader::default();
        let m1 = r.read(&b, 1024).unwrap();
        // One read brought the first two (it ends after the send that carried descriptors).
        assert_eq!(buffered(&r), 24);
        let m2 = r.read(&b, 1024).unwrap();
        let m3 = r.read(&b, 1024).unwrap();
        assert_eq!(
            [m1.header.msg_id, m2.header.msg_id, m3.header.msg_id],
            [1, 2, 3]
        );
        assert!(m1.fds.is_empty());
        assert_eq!(tags(&m2.fds), vec![11, 12]);
        assert!(m3.fds.is_empty());
    }

    #[test]
    fn test_frame_fds_of_first_message_stay_with_it() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = [tagged_fd(5)];
        send_all(&a, &[&frame(1, &[0; 8])], &raw(&f)).unwrap();
        send_all(&a, &[&frame(2, &[0; 8])], &[]).unwrap();
        let mut r = FrameReader::default();
        let m1 = r.read(&b, 1024).unwrap();
        let m2 = r.read(&b, 1024).unwrap();
        assert_eq!(tags(&m1.fds), vec![5]);
        assert!(m2.fds.is_empty());
    }

    #[test]
    fn test_frame_fds_on_message_arriving_in_pieces_all_kept_up_to_limit() {
        let (a, b) = UnixStream::pair().unwrap();
        let msg = frame(4, &[7; 200]);
        let first: Vec<File> = (0..10).map(tagged_fd).collect();
        let second: Vec<File> = (10..20).map(tagged_fd).collect();
        // The header and part of the payload with 10 descriptors, the rest later with 10 more.
        send_all(&a, &[&msg[..40]], &raw(&first)).unwrap();
        let mut r = FrameReader::default();
        assert!(r
            .read_until(&b, 1024, Instant::now() + Duration::from_millis(10))
            .unwrap()
            .is_none());
        send_all(&a, &[&msg[40..]], &raw(&second)).unwrap();
        send_all(&a, &[&frame(5, &[])], &[]).unwrap();
        let m = r.read(&b, 1024).unwrap();
        assert_eq!(m.header.msg_id, 4);
        assert_eq!(m.payload(), &[7; 200][..]);
        assert_eq!(tags(&m.fds), (0..16).collect::<Vec<_>>());
        assert_eq!(m.excess_fds, 4);
        let next = r.read(&b, 1024).unwrap();
        assert_eq!((next.header.msg_id, next.fds.len()), (5, 0));
    }

    #[test]
    fn test_frame_fds_on_partial_header_attributed_to_that_message() {
        let (a, b) = UnixStream::pair().unwrap();
        let msg = frame(8, &[1; 4]);
        let f = [tagged_fd(3)];
        // A whole message, then 6 bytes of the next with a descriptor, in one read.
        send_all(&a, &[&frame(7, &[])], &[]).unwrap();
        send_all(&a, &[&msg[..6]], &raw(&f)).unwrap();
        let mut r = FrameReader::default();
        let m = r.read(&b, 1024).unwrap();
        assert_eq!((m.header.msg_id, m.fds.len()), (7, 0));
        send_all(&a, &[&msg[6..]], &[]).unwrap();
        let m = r.read(&b, 1024).unwrap();
        assert_eq!(m.header.msg_id, 8);
        assert_eq!(tags(&m.fds), vec![3]);
    }

    #[test]
    fn test_frame_large_message_gets_own_buffer_then_small_again() {
        let (a, b) = UnixStream::pair().unwrap();
        let payload: Vec<u8> = (0..3 * RECV_BUF).map(|i| (i % 251) as u8).collect();
        let big = frame(1, &payload);
        let writer = std::thread::spawn(move || {
            (&a).write_all(&big).unwrap();
            (&a).write_all(&frame(2, &[1])).unwrap();
            a
        });
        let mut r = FrameReader::default();
        let m = r.read(&b, 1 << 20).unwrap();
        assert_eq!(m.payload(), &payload[..]);
        assert_eq!(m.frame.len(), HEADER_SIZE + payload.len());
        // The message's buffer was handed over; the next read starts a small one.
        assert!(r.buf.is_empty());
        let m = r.read(&b, 1 << 20).unwrap();
        assert_eq!((m.header.msg_id, m.payload()), (2, &[1u8][..]));
        assert_eq!(r.buf.len(), RECV_BUF);
        drop(writer.join().unwrap());
    }

    #[test]
    fn test_frame_many_pipelined_messages_cross_buffer_boundaries() {
        let (a, b) = UnixStream::pair().unwrap();
        let msgs: Vec<Vec<u8>> = (0..400u16)
            .map(|i| frame(i, &vec![(i % 256) as u8; usize::from(i % 37)]))
            .collect();
        let all = msgs.concat();
        let writer = std::thread::spawn(move || {
            (&a).write_all(&all).unwrap();
            a
        });
        let mut r = FrameReader::default();
        for i in 0..400u16 {
            let m = r.read(&b, 1024).unwrap();
            assert_eq!(m.header.msg_id, i);
            assert_eq!(m.payload(), &vec![(i % 256) as u8; usize::from(i % 37)][..]);
        }
        drop(writer.join().unwrap());
        assert!(matches!(r.read(&b, 1024), Err(FrameError::Eof)));
    }

    #[test]
    fn test_frame_deadline_keeps_partial_message() {
        let (a, b) = UnixStream::pair().unwrap();
        let msg = frame(3, &[4; 64]);
        let f = [tagged_fd(9)];
        send_all(&a, &[&msg[..10]], &raw(&f)).unwrap();
        let mut r = FrameReader::default();
        let t0 = Instant::now();
        let got = r
            .read_until(&b, 1024, t0 + Duration::from_millis(30))
            .unwrap();
        assert!(got.is_none());
        assert!(t0.elapsed() >= Duration::from_millis(25));
        (&a).write_all(&msg[10..]).unwrap();
        let m = r
            .read_until(&b, 1024, Instant::now() + Duration::from_secs(5))
            .unwrap()
            .unwrap();
        assert_eq!(m.payload(), &[4; 64][..]);
        assert_eq!(tags(&m.fds), vec![9]);
    }

    #[test]
    fn test_frame_oversized_rejected_before_payload() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(header(1, 4096).as_slice()).unwrap();
        assert!(matches!(
            FrameReader::default().read(&b, 1024),
            Err(FrameError::TooLarge(4096))
        ));
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(header(1, 15).as_slice()).unwrap();
        assert!(matches!(
            FrameReader::default().read(&b, 1024),
            Err(FrameError::TooSmall(15))
        ));
    }

    #[test]
    fn test_frame_bad_message_after_good_one_in_same_read() {
        let (a, b) = UnixStream::pair().unwrap();
        let bytes = [frame(1, &[]), header(2, 1 << 30).as_slice().to_vec()].concat();
        (&a).write_all(&bytes).unwrap();
        let mut r = FrameReader::default();
        assert_eq!(r.read(&b, 1024).unwrap().header.msg_id, 1);
        assert!(matches!(r.read(&b, 1024), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn test_frame_eof_mid_header_or_payload_truncated() {
        for cut in [3, HEADER_SIZE + 1] {
            let (a, b) = UnixStream::pair().unwrap();
            (&a).write_all(&frame(1, &[0; 8])[..cut]).unwrap();
            drop(a);
            assert!(matches!(
                FrameReader::default().read(&b, 1024),
                Err(FrameError::Truncated)
            ));
        }
    }

    #[test]
    fn test_frame_too_many_fds_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        let files: Vec<File> = (0..20).map(tagged_fd).collect();
        send_all(&a, &[&frame(1, &[])], &raw(&files)).unwrap();
        let m = FrameReader::default().read(&b, 1024).unwrap();
        assert_eq!(m.fds.len(), MAX_MSG_FDS);
        assert_eq!(m.excess_fds, 4);
    }

    #[test]
    fn test_send_message_parts_and_fds_arrive_as_one() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = [tagged_fd(2)];
        send_message(&a, header(6, 0), &[1, 2, 3], &raw(&f)).unwrap();
        let m = FrameReader::default().read(&b, 1024).unwrap();
        assert_eq!(m.header.message_size, 19);
        assert_eq!(m.payload(), &[1, 2, 3]);
        assert_eq!(tags(&m.fds), vec![2]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Messages of random sizes, each sent in random pieces (never spanning two messages),
        /// some with descriptors on their first piece, written without waiting for the reader:
        /// every message comes out whole, in order, with exactly its own descriptors.
        #[test]
        fn prop_frame_pieces_and_fds_reassembled(
            msgs in prop::collection::vec(
                (0usize..6000, prop::collection::vec(1usize..700, 1..4), 0usize..3),
                1..24,
            )
        ) {
            let (a, b) = UnixStream::pair().unwrap();
            let plan = msgs.clone();
            let writer = std::thread::spawn(move || {
                for (i, (len, cuts, nfds)) in plan.iter().enumerate() {
                    let id = u16::try_from(i).unwrap();
                    let bytes = frame(id, &vec![id as u8; *len]);
                    let files: Vec<File> =
                        (0..*nfds).map(|j| tagged_fd((i * 10 + j) as u64)).collect();
                    let mut at = 0;
                    for (k, cut) in cuts.iter().enumerate() {
                        let end = if k + 1 == cuts.len() {
                            bytes.len()
                        } else {
                            (at + cut).min(bytes.len())
                        };
                        if end > at {
                            let fds = if at == 0 { raw(&files) } else { Vec::new() };
                            send_all(&a, &[&bytes[at..end]], &fds).unwrap();
                        }
                        at = end;
                    }
                }
                a
            });
            let mut r = FrameReader::default();
            for (i, (len, _, nfds)) in msgs.iter().enumerate() {
                let m = r.read(&b, 1 << 20).unwrap();
                prop_assert_eq!(usize::from(m.header.msg_id), i);
                prop_assert_eq!(m.payload(), &vec![i as u8; *len][..]);
                let want: Vec<u64> = (0..*nfds).map(|j| (i * 10 + j) as u64).collect();
                prop_assert_eq!(tags(&m.fds), want);
            }
            drop(writer.join().unwrap());
            prop_assert!(matches!(r.read(&b, 1 << 20), Err(FrameError::Eof)));
        }
    }
}
