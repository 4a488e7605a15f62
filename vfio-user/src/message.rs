//! Framing: reading one message (header, bounded payload, file descriptors) and sending one.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use libc::{c_void, iovec};
use vm_memory::ByteValued;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::wire::{read_struct, Header, FLAG_ERROR, HEADER_SIZE, TYPE_REPLY};

/// Most file descriptors accepted with one message (`max_msg_fds`).
pub const MAX_MSG_FDS: usize = 16;

/// The kernel's limit of descriptors in one `SCM_RIGHTS` (`SCM_MAX_FD`): a receive buffer this
/// large is never truncated, so the byte count of every `recvmsg` stays known.
const SCM_MAX_FD: usize = 253;

/// One received message.
#[derive(Debug)]
pub(crate) struct Message {
    /// The header.
    pub header: Header,
    /// Everything after the header (`message_size - 16` bytes).
    pub payload: Vec<u8>,
    /// Received descriptors (at most [`MAX_MSG_FDS`]).
    pub fds: Vec<OwnedFd>,
    /// Descriptors beyond [`MAX_MSG_FDS`]; they were closed on arrival.
    pub excess_fds: usize,
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

/// Reads one message; `max_size` bounds `message_size` (header included).
pub(crate) fn read_message(stream: &UnixStream, max_size: u32) -> Result<Message, FrameError> {
    let mut fds = Vec::new();
    let mut excess_fds = 0;
    let mut raw = [0u8; HEADER_SIZE];
    let mut got = 0;
    while got < HEADER_SIZE {
        let n = recv_some(stream, &mut raw[got..], &mut fds, &mut excess_fds)
            .map_err(FrameError::Io)?;
        if n == 0 {
            return Err(if got == 0 {
                FrameError::Eof
            } else {
                FrameError::Truncated
            });
        }
        got += n;
    }
    let header: Header = read_struct(&raw).ok_or(FrameError::Truncated)?;
    if (header.message_size as usize) < HEADER_SIZE {
        return Err(FrameError::TooSmall(header.message_size));
    }
    if header.message_size > max_size {
        return Err(FrameError::TooLarge(header.message_size));
    }
    // Bounded by `max_size` above.
    let mut payload = vec![0u8; header.message_size as usize - HEADER_SIZE];
    let mut got = 0;
    while got < payload.len() {
        let n = recv_some(stream, &mut payload[got..], &mut fds, &mut excess_fds)
            .map_err(FrameError::Io)?;
        if n == 0 {
            return Err(FrameError::Truncated);
        }
        got += n;
    }
    Ok(Message {
        header,
        payload,
        fds,
        excess_fds,
    })
}

/// One `recvmsg` into `buf`, keeping up to [`MAX_MSG_FDS`] descriptors and closing the rest.
fn recv_some(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    excess: &mut usize,
) -> io::Result<usize> {
    let mut raw_fds = [-1 as RawFd; SCM_MAX_FD];
    let mut iov = [iovec {
        iov_base: buf.as_mut_ptr().cast::<c_void>(),
        iov_len: buf.len(),
    }];
    loop {
        // SAFETY: the iovec describes `buf`, which is exclusively borrowed for this call, and
        // any byte pattern is valid for `u8`.
        let res = unsafe { stream.recv_with_fds(&mut iov, &mut raw_fds) };
        match res {
            Ok((n, nfds)) => {
                for &fd in raw_fds.iter().take(nfds) {
                    // SAFETY: `recvmsg` just installed this descriptor in our table; nothing
                    // else owns it.
                    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                    if fds.len() < MAX_MSG_FDS {
                        fds.push(owned);
                    } else {
                        *excess += 1;
                        drop(owned);
                    }
                }
                return Ok(n);
            }
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        }
    }
}

/// Sends `bytes` as one message with `fds` attached to its first byte.
pub(crate) fn send_all(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut sent = 0;
    let mut fds = fds;
    while sent < bytes.len() {
        match stream.send_with_fds(&[&bytes[sent..]], fds) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                sent += n;
                fds = &[];
            }
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        }
    }
    Ok(())
}

/// Builds a message: the header (with `message_size` filled in) followed by `payload`.
pub(crate) fn build(mut header: Header, payload: &[u8]) -> Vec<u8> {
    let total = HEADER_SIZE + payload.len();
    header.message_size = u32::try_from(total).unwrap_or(u32::MAX);
    let mut bytes = Vec::with_capacity(total);
    bytes.extend_from_slice(header.as_slice());
    bytes.extend_from_slice(payload);
    bytes
}

/// The header of a reply to `request`.
pub(crate) fn reply_header(request: &Header) -> Header {
    Header {
        msg_id: request.msg_id,
        command: request.command,
        message_size: 0,
        flags: TYPE_REPLY,
        error: 0,
    }
}

/// An error reply to `request`: the header alone, with `ERROR` and `errno`.
pub(crate) fn error_reply(request: &Header, errno: i32) -> Vec<u8> {
    let mut header = reply_header(request);
    header.flags |= FLAG_ERROR;
    header.error = u32::try_from(errno).unwrap_or(libc::EINVAL.unsigned_abs());
    build(header, &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn header(size: u32) -> Header {
        Header {
            msg_id: 7,
            command: 4,
            message_size: size,
            flags: 0,
            error: 0,
        }
    }

    #[test]
    fn test_read_message_split_writes_reassembled() {
        let (a, b) = UnixStream::pair().unwrap();
        let msg = build(header(0), &[1, 2, 3, 4]);
        (&a).write_all(&msg[..5]).unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            (&a).write_all(&msg[5..]).unwrap();
            a
        });
        let m = read_message(&b, 1024).unwrap();
        assert_eq!(m.header.msg_id, 7);
        assert_eq!(m.payload, vec![1, 2, 3, 4]);
        drop(t.join().unwrap());
    }

    #[test]
    fn test_read_message_oversized_rejected() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(header(4096).as_slice()).unwrap();
        assert!(matches!(
            read_message(&b, 1024),
            Err(FrameError::TooLarge(4096))
        ));
    }

    #[test]
    fn test_read_message_eof_mid_header_truncated() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&[1, 2, 3]).unwrap();
        drop(a);
        assert!(matches!(read_message(&b, 1024), Err(FrameError::Truncated)));
    }

    #[test]
    fn test_read_message_too_many_fds_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        let files: Vec<std::fs::File> = (0..20)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let raw: Vec<RawFd> = files.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        let msg = build(header(0), &[]);
        send_all(&a, &msg, &raw).unwrap();
        let m = read_message(&b, 1024).unwrap();
        assert_eq!(m.fds.len(), MAX_MSG_FDS);
        assert_eq!(m.excess_fds, 4);
    }
}
