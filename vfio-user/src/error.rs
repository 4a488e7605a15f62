//! Errors of the server API, and the rejection a command handler turns into an error reply.

use std::io;
use std::path::PathBuf;

/// Errors returned by [`crate::Server`] and [`crate::DmaHandle`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another server is listening on the socket path.
    #[error("Socket {0} is in use")]
    SocketInUse(PathBuf),
    /// The socket path exists and is not a socket (it is never removed).
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Creating, binding or setting up the listening socket failed.
    #[error("Cannot listen on {path}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A server thread could not be started.
    #[error("Cannot start a server thread")]
    Thread(#[source] io::Error),
    /// No client is connected (or it has not finished version negotiation).
    #[error("No client connected")]
    NotConnected,
    /// The DMA range is not (entirely) covered by the client's DMA mappings.
    #[error("DMA range {iova:#x}+{len:#x} is not mapped")]
    DmaNotMapped {
        /// Start of the range.
        iova: u64,
        /// Length of the range.
        len: usize,
    },
    /// The DMA mapping does not allow this direction.
    #[error("DMA range {iova:#x}+{len:#x} is not {access}")]
    DmaPermission {
        /// Start of the range.
        iova: u64,
        /// Length of the range.
        len: usize,
        /// "readable" or "writable".
        access: &'static str,
    },
    /// Too many server-to-client requests are waiting for replies.
    #[error("Too many DMA requests in flight")]
    DmaBusy,
    /// The client did not answer a `DMA_READ`/`DMA_WRITE` in time.
    #[error("The client did not answer a DMA request in time")]
    DmaTimeout,
    /// The client answered a `DMA_READ`/`DMA_WRITE` with an error.
    #[error("The client failed a DMA request (errno {0})")]
    DmaRejected(u32),
    /// The client's reply to a `DMA_READ`/`DMA_WRITE` does not match the request.
    #[error("Malformed DMA reply from the client")]
    DmaBadReply,
    /// Sending to the client failed.
    #[error("Cannot send to the client")]
    Send(#[source] io::Error),
}

/// A command the server refuses: it becomes an error reply carrying `errno`.
#[derive(Debug)]
pub(crate) struct Reject {
    /// The errno sent to the client.
    pub errno: i32,
    /// Why, for the log.
    pub reason: String,
}

impl Reject {
    /// A rejection with `errno` and a reason for the log.
    pub fn new(errno: i32, reason: impl Into<String>) -> Self {
        Reject {
            errno,
            reason: reason.into(),
        }
    }

    /// `EINVAL`.
    pub fn inval(reason: impl Into<String>) -> Self {
        Reject::new(libc::EINVAL, reason)
    }
}

impl From<crate::BackendError> for Reject {
    fn from(e: crate::BackendError) -> Self {
        Reject::new(e.errno(), e.to_string())
    }
}
