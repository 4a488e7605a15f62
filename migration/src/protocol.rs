//! The live-migration wire protocol, version [`PROTOCOL_VERSION`]: message types and payload
//! layouts. `docs/migration.md` has the state machines and the message table.
//!
//! ```text
//! source                                   destination
//!   Hello(version, compat, memory size) ──▶  accept_compat
//!                                       ◀──  HelloAck(version)   | Error
//!   repeat for round r = 1, 2, ...:
//!     Pages(r, ...)* ; RoundEnd(r, n)  ──▶  write_page / write_zero_page
//!                                       ◀──  RoundAck(r, n)      | Error
//!   pause; Pages(final)* ;
//!   DeviceState(chunk)+ ; Complete     ──▶  decode envelope, restore
//!                                       ◀──  Restored            | Error
//!   Commit                             ──▶  resume
//!                                       ◀──  Resumed             | Error
//!   Abort (at any point before Commit) ──▶  abort
//! ```
//!
//! All integers are little-endian. Versioning: the destination accepts
//! [`MIN_PROTOCOL_VERSION`]`..=`[`PROTOCOL_VERSION`]; the layouts of the frame header, of the
//! start of `Hello` (magic, version), of `Abort` and of `Error` are frozen so that any two
//! versions can tell each other that they disagree (a source that fails before its hello sends
//! `Abort` first). Any other change to a payload bumps the version.
//! Decoding checks every length and field of a payload exactly once, here; the state machines
//! only check meaning (ranges, order).

use std::fmt;

mod codec;

pub use codec::{is_zero, PagesWriter};

/// The protocol version this build sends.
pub const PROTOCOL_VERSION: u32 = 1;
/// The oldest version this build's destination accepts.
pub const MIN_PROTOCOL_VERSION: u32 = 1;
/// First bytes of a `Hello` payload.
pub const HELLO_MAGIC: [u8; 8] = *b"VGPUMIGR";
/// Size of a memory page.
pub const PAGE_SIZE: usize = 4096;
/// [`PAGE_SIZE`] as the `u32` of the `Hello` message.
pub const PAGE_SIZE_U32: u32 = 4096;
const _: () = assert!(PAGE_SIZE_U32 as usize == PAGE_SIZE);
/// Most pages in one `Pages` message (4 MiB of data, well under the frame limit).
pub const MAX_PAGES_PER_MESSAGE: usize = 1024;
/// Largest compatibility record.
pub const MAX_COMPAT_LEN: usize = 64 << 10;
/// Longest reason text in `Abort` / `Error` (longer ones are cut when sent).
pub const MAX_REASON_LEN: usize = 4096;
/// Device state is sent in chunks of at most this many bytes.
pub const STATE_CHUNK: usize = 1 << 20;

/// Why a message was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The frame type is not a known message.
    #[error("Unknown message type {0}")]
    UnknownType(u16),
    /// The payload does not have the layout of its type.
    #[error("Malformed {ty} message: {reason}")]
    Malformed {
        /// Message type.
        ty: MessageType,
        /// What is wrong.
        reason: &'static str,
    },
    /// The first message is not a vGPU migration hello.
    #[error("Not a vGPU migration stream (bad hello magic)")]
    BadMagic,
    /// The peer speaks a version this build does not.
    #[error(
        "Migration protocol version {found} is not supported (this build speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION})"
    )]
    Version {
        /// The peer's version.
        found: u32,
    },
    /// A valid message arrived in a state that does not expect it.
    #[error("Unexpected {found} message, expected {expected}")]
    Unexpected {
        /// What arrived.
        found: MessageType,
        /// What the state machine waits for.
        expected: &'static str,
    },
    /// A message's content contradicts the migration (page out of range, counts that do not
    /// match, state larger than allowed).
    #[error("Invalid message: {0}")]
    Invalid(String),
}

/// Message types (the frame header's type field).
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageType {
    /// Source → destination, first message: version and compatibility record.
    Hello = 1,
    /// Destination → source: compatible, proceed.
    HelloAck = 2,
    /// Source → destination: a batch of pages of one round.
    Pages = 3,
    /// Source → destination: end of a pre-copy round.
    RoundEnd = 4,
    /// Destination → source: all pages of the round are written.
    RoundAck = 5,
    /// Source → destination: a chunk of the device-state envelope.
    DeviceState = 6,
    /// Source → destination: everything is sent; restore.
    Complete = 7,
    /// Destination → source: restored and validated, still paused.
    Restored = 8,
    /// Source → destination: resume now; the source will not.
    Commit = 9,
    /// Destination → source: running.
    Resumed = 10,
    /// Source → destination: migration abandoned; discard everything.
    Abort = 11,
    /// Destination → source: failed; the destination discarded everything.
    Error = 12,
}

impl TryFrom<u16> for MessageType {
    type Error = ProtocolError;

    fn try_from(v: u16) -> Result<Self, ProtocolError> {
        use MessageType as T;
        Ok(match v {
            1 => T::Hello,
            2 => T::HelloAck,
            3 => T::Pages,
            4 => T::RoundEnd,
            5 => T::RoundAck,
            6 => T::DeviceState,
            7 => T::Complete,
            8 => T::Restored,
            9 => T::Commit,
            10 => T::Resumed,
            11 => T::Abort,
            12 => T::Error,
            _ => return Err(ProtocolError::UnknownType(v)),
        })
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The source's opening message: what is being migrated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The source's protocol version.
    pub version: u32,
    /// Page size (must be [`PAGE_SIZE`]).
    pub page_size: u32,
    /// Component memory size in bytes.
    pub memory_size: u64,
    /// The source's estimate of the device-state size.
    pub state_size_hint: u64,
    /// The component's opaque compatibility record (at most [`MAX_COMPAT_LEN`] bytes).
    pub compat: Vec<u8>,
}

/// The content of one page in a `Pages` message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageData<'a> {
    /// All zero (sent as a marker, no data).
    Zero,
    /// [`PAGE_SIZE`] bytes.
    Bytes(&'a [u8]),
}

/// One page in a `Pages` message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRecord<'a> {
    /// Page index.
    pub index: u64,
    /// Content.
    pub data: PageData<'a>,
}

/// A decoded message; page data and texts borrow the received frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// See [`MessageType::Hello`].
    Hello(Hello),
    /// See [`MessageType::HelloAck`].
    HelloAck {
        /// The version both sides use.
        version: u32,
    },
    /// See [`MessageType::Pages`].
    Pages {
        /// Round (1-based; the stop-and-copy pages carry the round after the last pre-copy
        /// round).
        round: u32,
        /// 1 to [`MAX_PAGES_PER_MESSAGE`] pages.
        pages: Vec<PageRecord<'a>>,
    },
    /// See [`MessageType::RoundEnd`].
    RoundEnd {
        /// Round.
        round: u32,
        /// Pages sent in this round.
        pages: u64,
    },
    /// See [`MessageType::RoundAck`].
    RoundAck {
        /// Round.
        round: u32,
        /// Pages written in this round.
        pages: u64,
    },
    /// See [`MessageType::DeviceState`].
    DeviceState {
        /// Size of the whole envelope.
        total: u64,
        /// Where this chunk starts.
        offset: u64,
        /// The chunk (not empty).
        data: &'a [u8],
    },
    /// See [`MessageType::Complete`].
    Complete {
        /// The stop-and-copy round.
        round: u32,
        /// Pages sent in it.
        pages: u64,
    },
    /// See [`MessageType::Restored`].
    Restored,
    /// See [`MessageType::Commit`].
    Commit,
    /// See [`MessageType::Resumed`].
    Resumed,
    /// See [`MessageType::Abort`].
    Abort {
        /// Why (UTF-8).
        reason: &'a str,
    },
    /// See [`MessageType::Error`].
    Error {
        /// Why (UTF-8).
        reason: &'a str,
    },
}

impl Message<'_> {
    /// The message's type.
    pub fn message_type(&self) -> MessageType {
        use MessageType as T;
        match self {
            Message::Hello(_) => T::Hello,
            Message::HelloAck { .. } => T::HelloAck,
            Message::Pages { .. } => T::Pages,
            Message::RoundEnd { .. } => T::RoundEnd,
            Message::RoundAck { .. } => T::RoundAck,
            Message::DeviceState { .. } => T::DeviceState,
            Message::Complete { .. } => T::Complete,
            Message::Restored => T::Restored,
            Message::Commit => T::Commit,
            Message::Resumed => T::Resumed,
            Message::Abort { .. } => T::Abort,
            Message::Error { .. } => T::Error,
        }
    }
}
