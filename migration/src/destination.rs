//! The destination end of a live migration. It writes pages into the component as they come,
//! buffers the device state (bounded), restores it only once everything has arrived and been
//! checked, and resumes only after the source's `Commit`. On any failure it tells the source
//! (if the link still works) and calls the component's `abort()`: a half-received component
//! is never resumed.
//!
//! ```text
//! AwaitHello ──Hello ok──▶ Pages(r) ⟲ Pages(r), RoundEnd(r)/RoundAck(r)
//!                          │ DeviceState(offset 0)
//!                          ▼
//!                        State ⟲ DeviceState(next offset)
//!                          │ Complete (state complete, final round counted)
//!                          ▼
//!                        restore ──/Restored──▶ AwaitCommit ──Commit──▶ resume ──/Resumed──▶ Done
//! any state: Abort, bad message, component error, cut connection ──▶ /Error (if possible), abort()
//! ```

use std::io::{Read, Write};
use std::time::Instant;

use crate::envelope::EnvelopeError;
use crate::protocol::{
    Hello, Message, MessageType, PageData, ProtocolError, PAGE_SIZE, PAGE_SIZE_U32,
};
use crate::report::{error_chain, micros, CancelToken, DestinationReport, Phase};
use crate::transport::{FrameBuf, Framed, TransportError};
use crate::{LiveMigratable, MigrationError};

/// How the destination receives.
#[derive(Clone, Debug)]
pub struct DestinationConfig {
    /// Largest device-state envelope accepted (default 64 MiB); the buffer grows with the
    /// chunks that arrive, never beyond this.
    pub max_device_state: u64,
    /// Cancels the migration when set (checked between messages).
    pub cancel: CancelToken,
}

impl Default for DestinationConfig {
    fn default() -> Self {
        DestinationConfig {
            max_device_state: 64 << 20,
            cancel: CancelToken::new(),
        }
    }
}

/// Why receiving a migration failed. The component has been `abort()`ed.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    /// The connection failed.
    #[error("Connection failed during {phase}")]
    Transport {
        /// Where.
        phase: Phase,
        /// Why.
        #[source]
        source: TransportError,
    },
    /// The source sent something invalid.
    #[error("Protocol error during {phase}")]
    Protocol {
        /// Where.
        phase: Phase,
        /// Why.
        #[source]
        source: ProtocolError,
    },
    /// This destination cannot receive this migration.
    #[error("Incompatible migration: {0}")]
    Incompatible(String),
    /// The device-state envelope is invalid.
    #[error("Device state rejected")]
    State(#[source] EnvelopeError),
    /// The component failed.
    #[error("Destination component failed during {phase}")]
    Component {
        /// Where.
        phase: Phase,
        /// Why.
        #[source]
        source: MigrationError,
    },
    /// The source abandoned the migration.
    #[error("Source aborted the migration during {phase}: {reason}")]
    Aborted {
        /// Where.
        phase: Phase,
        /// The source's reason.
        reason: String,
    },
    /// Cancelled by the owner.
    #[error("Migration cancelled during {phase}")]
    Cancelled {
        /// Where.
        phase: Phase,
    },
    /// The owner refused the migration after reading its hello.
    #[error("Migration rejected: {0}")]
    Rejected(String),
}

impl DestinationError {
    /// Whether the source should be told (the link still works and it does not know yet).
    fn tell_source(&self) -> bool {
        match self {
            DestinationError::Transport { source, .. } => !matches!(
                source,
                TransportError::Io(_) | TransportError::Closed | TransportError::Truncated { .. }
            ),
            DestinationError::Aborted { .. } => false,
            _ => true,
        }
    }
}

/// An incoming migration whose hello has been read and checked for version: the owner looks
/// at [`Incoming::hello`] (e.g. to create the component from the compatibility record), then
/// calls [`Incoming::receive`] or [`Incoming::reject`].
#[derive(Debug)]
pub struct Incoming<S> {
    link: Framed<S>,
    hello: Hello,
    cfg: DestinationConfig,
    frame: FrameBuf,
    start: Instant,
}

/// Receives a migration into `component`: [`Incoming::accept`] then [`Incoming::receive`].
/// On error the component has been `abort()`ed.
pub fn receive<C, S>(
    component: &mut C,
    stream: S,
    config: DestinationConfig,
) -> Result<DestinationReport, DestinationError>
where
    C: LiveMigratable + ?Sized,
    S: Read + Write,
{
    match Incoming::accept(stream, config) {
        Ok(incoming) => incoming.receive(component),
        Err(e) => {
            component.abort();
            Err(e)
        }
    }
}

impl<S: Read + Write> Incoming<S> {
    /// Reads the source's hello. A wrong version, magic or first message is answered with an
    /// `Error` to the source and returned.
    pub fn accept(stream: S, config: DestinationConfig) -> Result<Self, DestinationError> {
        let start = Instant::now();
        let mut link = Framed::new(stream);
        let mut frame = FrameBuf::new();
        let hello = match read_hello(&mut link) {
            Ok(h) => h,
            Err(e) => {
                if e.tell_source() {
                    send_error(&mut link, &mut frame, &e);
                }
                return Err(e);
            }
        };
        tracing::info!(
            version = hello.version,
            memory = hello.memory_size,
            "incoming migration"
        );
        Ok(Incoming {
            link,
            hello,
            cfg: config,
            frame,
            start,
        })
    }

    /// The source's hello.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Refuses the migration: the source gets `reason` and resumes.
    pub fn reject(mut self, reason: &str) -> DestinationError {
        let e = DestinationError::Rejected(reason.to_owned());
        send_error(&mut self.link, &mut self.frame, &e);
        e
    }

    /// Receives the migration into `component` and resumes it. On error, the source has been
    /// told (if the link still works) and the component has been `abort()`ed; it was not
    /// resumed. Set a read timeout on sockets: a silent source otherwise blocks here.
    pub fn receive<C: LiveMigratable + ?Sized>(
        mut self,
        component: &mut C,
    ) -> Result<DestinationReport, DestinationError> {
        let mut report = DestinationReport {
            protocol_version: self.hello.version,
            ..DestinationReport::default()
        };
        match self.run(component, &mut report) {
            Ok(()) => {
                report.bytes_received = self.link.bytes_received();
                report.total_time_us = micros(self.start.elapsed());
                Ok(report)
            }
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "incoming migration failed");
                if e.tell_source() {
                    send_error(&mut self.link, &mut self.frame, &e);
                }
                component.abort();
                Err(e)
            }
        }
    }

    fn run<C: LiveMigratable + ?Sized>(
        &mut self,
        c: &mut C,
        report: &mut DestinationReport,
    ) -> Result<(), DestinationError> {
        let h = &self.hello;
        if h.page_size != PAGE_SIZE_U32 {
            return Err(DestinationError::Incompatible(format!(
                "page size {} (this build uses {PAGE_SIZE})",
                h.page_size
            )));
        }
        if !h.memory_size.is_multiple_of(PAGE_SIZE as u64) {
            return Err(DestinationError::Incompatible(format!(
                "memory size {} is not a multiple of the page size",
                h.memory_size
            )));
        }
        c.accept_compat(&h.compat, h.memory_size)
            .map_err(|e| DestinationError::Incompatible(error_chain(&e)))?;
        if c.memory_size() != h.memory_size {
            return Err(DestinationError::Incompatible(format!(
                "memory size {} (source) vs {} (destination)",
                h.memory_size,
                c.memory_size()
            )));
        }
        let page_count = h.memory_size / PAGE_SIZE as u64;
        let version = h.version;
        self.send(Phase::Hello, &Message::HelloAck { version })?;

        let state = self.receive_memory(c, page_count, report)?;

        let phase = Phase::Restore;
        let snapshot = crate::decode(&state).map_err(DestinationError::State)?;
        drop(state);
        c.restore(&snapshot)
            .map_err(|source| DestinationError::Component { phase, source })?;
        self.send(phase, &Message::Restored)?;

        let phase = Phase::Commit;
        match self.recv(phase)? {
            Message::Commit => {}
            Message::Abort { reason } => {
                return Err(DestinationError::Aborted {
                    phase,
                    reason: reason.to_owned(),
                })
            }
            other => return Err(unexpected(phase, &other, "Commit")),
        }
        c.resume()
            .map_err(|source| DestinationError::Component { phase, source })?;
        // Running now: nothing below may fail the migration.
        report.ack_delivered = self.send(phase, &Message::Resumed).is_ok();
        if !report.ack_delivered {
            tracing::warn!("resumed, but the acknowledgement did not reach the source");
        }
        Ok(())
    }

    /// Pre-copy and stop-and-copy pages, then the device state up to `Complete`; returns the
    /// device-state envelope.
    fn receive_memory<C: LiveMigratable + ?Sized>(
        &mut self,
        c: &mut C,
        page_count: u64,
        report: &mut DestinationReport,
    ) -> Result<Vec<u8>, DestinationError> {
        let mut round = 1u32;
        let mut in_round = 0u64;
        let mut state: Vec<u8> = Vec::new();
        let mut state_total: Option<u64> = None;
        let max_state = self.cfg.max_device_state;
        loop {
            let phase = match state_total {
                None => Phase::PreCopy { round },
                Some(_) => Phase::DeviceState,
            };
            if self.cfg.cancel.is_cancelled() {
                return Err(DestinationError::Cancelled { phase });
            }
            let invalid = |reason: String| DestinationError::Protocol {
                phase,
                source: ProtocolError::Invalid(reason),
            };
            match self.recv(phase)? {
                Message::Pages { round: r, pages } if state_total.is_none() => {
                    if r != round {
                        return Err(invalid(format!("pages of round {r} during round {round}")));
                    }
                    for p in pages {
                        if p.index >= page_count {
                            return Err(invalid(format!(
                                "page {} beyond {page_count} pages",
                                p.index
                            )));
                        }
                        let written = match p.data {
                            PageData::Zero => {
                                report.zero_pages += 1;
                                c.write_zero_page(p.index)
                            }
                            PageData::Bytes(b) => c.write_page(p.index, b),
                        };
                        written.map_err(|source| DestinationError::Component { phase, source })?;
                        in_round += 1;
                        report.pages += 1;
                    }
                }
                Message::RoundEnd { round: r, pages } if state_total.is_none() => {
                    if r != round || pages != in_round {
                        return Err(invalid(format!(
                            "end of round {r} with {pages} pages, received round {round} with {in_round}"
                        )));
                    }
                    self.send(phase, &Message::RoundAck { round, pages })?;
                    report.rounds += 1;
                    round = round.saturating_add(1);
                    in_round = 0;
                }
                Message::DeviceState {
                    total,
                    offset,
                    data,
                } => {
                    let expected_total = *state_total.get_or_insert(total);
                    if total > max_state {
                        return Err(invalid(format!(
                            "device state of {total} bytes exceeds the limit of {max_state}"
                        )));
                    }
                    if total != expected_total || offset != state.len() as u64 {
                        return Err(invalid(format!(
                            "device-state chunk at {offset} of {total}, expected {} of {expected_total}",
                            state.len()
                        )));
                    }
                    state.extend_from_slice(data);
                }
                Message::Complete { round: r, pages } if state_total.is_some() => {
                    let total = state_total.unwrap_or(0);
                    if state.len() as u64 != total || r != round || pages != in_round {
                        return Err(invalid(format!(
                            "complete with round {r}, {pages} pages; received round {round}, {in_round} pages, {} of {total} state bytes",
                            state.len()
                        )));
                    }
                    report.rounds += 1;
                    report.device_state_bytes = total;
                    return Ok(state);
                }
                Message::Abort { reason } => {
                    return Err(DestinationError::Aborted {
                        phase,
                        reason: reason.to_owned(),
                    })
                }
                other => {
                    let expected = if state_total.is_some() {
                        "DeviceState or Complete"
                    } else {
                        "Pages, RoundEnd or DeviceState"
                    };
                    return Err(unexpected(phase, &other, expected));
                }
            }
        }
    }

    fn recv(&mut self, phase: Phase) -> Result<Message<'_>, DestinationError> {
        let (ty, payload) = self
            .link
            .recv()
            .map_err(|source| DestinationError::Transport { phase, source })?;
        Message::decode(ty, payload).map_err(|source| DestinationError::Protocol { phase, source })
    }

    fn send(&mut self, phase: Phase, m: &Message<'_>) -> Result<(), DestinationError> {
        m.encode(&mut self.frame);
        self.link
            .send(m.message_type() as u16, &mut self.frame)
            .map_err(|source| DestinationError::Transport { phase, source })
    }
}

fn read_hello<S: Read + Write>(link: &mut Framed<S>) -> Result<Hello, DestinationError> {
    let phase = Phase::Hello;
    let (ty, payload) = link
        .recv()
        .map_err(|source| DestinationError::Transport { phase, source })?;
    match Message::decode(ty, payload) {
        Ok(Message::Hello(h)) => Ok(h),
        Ok(Message::Abort { reason }) => Err(DestinationError::Aborted {
            phase,
            reason: reason.to_owned(),
        }),
        Ok(other) => Err(unexpected(phase, &other, "Hello")),
        Err(source) => Err(DestinationError::Protocol { phase, source }),
    }
}

fn unexpected(phase: Phase, m: &Message<'_>, expected: &'static str) -> DestinationError {
    DestinationError::Protocol {
        phase,
        source: ProtocolError::Unexpected {
            found: m.message_type(),
            expected,
        },
    }
}

/// Best effort: the source may already be gone.
fn send_error<S: Read + Write>(link: &mut Framed<S>, frame: &mut FrameBuf, e: &DestinationError) {
    let reason = error_chain(e);
    Message::Error { reason: &reason }.encode(frame);
    let _ = link.send(MessageType::Error as u16, frame);
}
