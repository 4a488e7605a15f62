//! The source end of a live migration: hello, pre-copy rounds under convergence control,
//! stop-and-copy, handover. On any failure before the destination has taken over, the source
//! component is left as it was: dirty logging stopped, resumed if it had been paused.
//!
//! ```text
//! Hello ─▶ PreCopy(1) ─▶ PreCopy(2..) ─▶ StopAndCopy ─▶ DeviceState ─▶ Restore ─▶ Commit ─▶ Completed
//!   │ failure, cancel, or destination Error before Commit was written:
//!   └─▶ Abort sent (if the link still works), dirty log stopped, component resumed → Err
//!   after Commit: destination Error → resumed, Err; lost connection → stays paused, Unconfirmed
//! ```

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::convergence::{Convergence, StopReason};
use crate::protocol::{
    Hello, Message, MessageType, PagesWriter, ProtocolError, MAX_COMPAT_LEN, MAX_PAGES_PER_MESSAGE,
    PAGE_SIZE, PAGE_SIZE_U32, PROTOCOL_VERSION, STATE_CHUNK,
};
use crate::report::{
    error_chain, micros, CancelToken, DowntimeBreakdown, MigrationReport, Phase, Progress,
    RoundReport,
};
use crate::transport::{FrameBuf, Framed, TransportError};
use crate::{LiveMigratable, MigrationError};

/// How the source migrates.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// Stop pre-copy once the predicted downtime is at most this (default 20 ms).
    pub downtime_target: Duration,
    /// Most pre-copy rounds before stop-and-copy regardless (default 30, at least 1).
    pub max_rounds: u32,
    /// Fixed stop-and-copy cost besides the transfer: pause, snapshot, restore, resume and two
    /// round trips (default 2 ms).
    pub overhead_estimate: Duration,
    /// Pages per `Pages` message, 1 to [`MAX_PAGES_PER_MESSAGE`] (default 256: 1 MiB).
    pub pages_per_message: usize,
    /// Cancels the migration when set.
    pub cancel: CancelToken,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            downtime_target: Duration::from_millis(20),
            max_rounds: 30,
            overhead_estimate: Duration::from_millis(2),
            pages_per_message: 256,
            cancel: CancelToken::new(),
        }
    }
}

/// Why a migration failed. Except for [`SourceError::Unconfirmed`] and
/// [`SourceError::Resume`], the source component is running again, with dirty logging stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The configuration or the component's memory size cannot be migrated.
    #[error("Invalid migration setup: {0}")]
    Config(String),
    /// Cancelled by the owner.
    #[error("Migration cancelled during {phase}")]
    Cancelled {
        /// Where.
        phase: Phase,
    },
    /// The connection failed.
    #[error("Connection failed during {phase}")]
    Transport {
        /// Where.
        phase: Phase,
        /// Why.
        #[source]
        source: TransportError,
    },
    /// The destination sent something invalid.
    #[error("Protocol error during {phase}")]
    Protocol {
        /// Where.
        phase: Phase,
        /// Why.
        #[source]
        source: ProtocolError,
    },
    /// The destination failed and discarded the migration.
    #[error("Destination failed during {phase}: {reason}")]
    Destination {
        /// Where (the source's phase).
        phase: Phase,
        /// The destination's error text.
        reason: String,
    },
    /// The source component failed.
    #[error("Source component failed during {phase}")]
    Component {
        /// Where.
        phase: Phase,
        /// Why.
        #[source]
        source: MigrationError,
    },
    /// The connection failed after `Commit` was sent: the destination may be running. The
    /// source stays paused; the owners must find out whether the destination runs before
    /// resuming or destroying the source.
    #[error("Handover unconfirmed: the destination may be running; the source stays paused")]
    Unconfirmed {
        /// The failure after `Commit`.
        #[source]
        source: Box<SourceError>,
    },
    /// The migration failed and the paused source component could not be resumed.
    #[error("Resuming the source failed after: {error}")]
    Resume {
        /// The migration failure.
        error: Box<SourceError>,
        /// The resume failure.
        #[source]
        source: MigrationError,
    },
}

impl SourceError {
    /// The phase that failed.
    pub fn phase(&self) -> Phase {
        match self {
            SourceError::Config(_) => Phase::Hello,
            SourceError::Cancelled { phase }
            | SourceError::Transport { phase, .. }
            | SourceError::Protocol { phase, .. }
            | SourceError::Destination { phase, .. }
            | SourceError::Component { phase, .. } => *phase,
            SourceError::Unconfirmed { .. } => Phase::Commit,
            SourceError::Resume { error, .. } => error.phase(),
        }
    }
}

/// Migrates `component` over `stream` (connected to a destination running
/// [`crate::destination::Incoming`]). `progress` is called after every message of pages and
/// at every phase change. On success the component is left paused with dirty logging stopped:
/// the owner destroys it. Set read/write timeouts on sockets: a silent destination otherwise
/// blocks the source (cancellation is checked between messages, not inside a blocked read).
pub fn migrate<C, S>(
    component: &mut C,
    stream: S,
    config: &SourceConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, SourceError>
where
    C: LiveMigratable + ?Sized,
    S: Read + Write,
{
    if config.pages_per_message == 0 || config.pages_per_message > MAX_PAGES_PER_MESSAGE {
        return Err(SourceError::Config(format!(
            "pages_per_message must be 1..={MAX_PAGES_PER_MESSAGE}"
        )));
    }
    let mut run = Run {
        conv: Convergence::new(
            config.downtime_target,
            config.max_rounds,
            config.overhead_estimate,
        ),
        c: component,
        link: Framed::new(stream),
        cfg: config,
        progress,
        frame: FrameBuf::new(),
        phase: Phase::Hello,
        start: Instant::now(),
        page_count: 0,
        state_hint: 0,
        paused: false,
        logging: false,
        committed: false,
        predicted: None,
        pages_remaining: 0,
        rounds: Vec::new(),
    };
    match run.run() {
        Ok(report) => Ok(report),
        Err(e) => Err(run.rollback(e)),
    }
}

/// A reply from the destination.
enum Reply {
    HelloAck(u32),
    RoundAck(u32, u64),
    Restored,
    Resumed,
}

struct Run<'a, C: ?Sized, S> {
    c: &'a mut C,
    link: Framed<S>,
    cfg: &'a SourceConfig,
    progress: &'a mut dyn FnMut(&Progress),
    frame: FrameBuf,
    phase: Phase,
    start: Instant,
    page_count: u64,
    state_hint: u64,
    paused: bool,
    logging: bool,
    committed: bool,
    conv: Convergence,
    predicted: Option<Duration>,
    pages_remaining: u64,
    rounds: Vec<RoundReport>,
}

impl<C: LiveMigratable + ?Sized, S: Read + Write> Run<'_, C, S> {
    fn run(&mut self) -> Result<MigrationReport, SourceError> {
        self.hello()?;

        // Pre-copy. The first dirty set is dropped: round 1 reads every page after it.
        self.set_phase(Phase::PreCopy { round: 1 });
        self.c.start_dirty_log().map_err(self.component())?;
        self.logging = true;
        self.c.dirty_pages().map_err(self.component())?;
        let mut round = 1;
        self.round(round, &mut (0..self.page_count), self.page_count)?;
        let (mut dirty, stop_reason, predicted) = loop {
            let (dirty, scan) = self.dirty_pages()?;
            let n = dirty.len() as u64;
            // The stop-and-copy repeats this scan while paused: it is part of the prediction.
            self.conv.record_scan(scan);
            let d = self.conv.decide(round, n, self.state_hint);
            self.predicted = Some(d.predicted);
            if let Some(last) = self.rounds.last_mut() {
                last.dirty_after = n;
                last.scan_us = micros(scan);
                last.predicted_downtime_us = micros(d.predicted);
            }
            tracing::debug!(round, dirty = n, predicted = ?d.predicted, "pre-copy round done");
            if let Some(reason) = d.stop {
                break (dirty, reason, d.predicted);
            }
            round += 1;
            self.set_phase(Phase::PreCopy { round });
            self.round(round, &mut dirty.into_iter(), n)?;
        };

        // Stop-and-copy.
        self.set_phase(Phase::StopAndCopy);
        self.check_cancel()?;
        let mut lap = Lap::start();
        self.c.pause().map_err(self.component())?;
        self.paused = true;
        let (last, final_scan) = self.dirty_pages()?;
        dirty.extend(last);
        dirty.sort_unstable();
        dirty.dedup();
        self.c.stop_dirty_log().map_err(self.component())?;
        self.logging = false;
        let mut times = DowntimeBreakdown {
            pause_us: lap.next(),
            ..DowntimeBreakdown::default()
        };
        let final_round = round + 1;
        let bytes0 = self.link.bytes_sent();
        let n = dirty.len() as u64;
        let zero = self.send_pages(final_round, &mut dirty.into_iter(), n)?;
        times.final_pages_us = lap.next();
        let final_bytes = self.link.bytes_sent() - bytes0;

        self.set_phase(Phase::DeviceState);
        let snapshot = self.c.snapshot().map_err(self.component())?;
        let state = crate::encode(&snapshot)
            .map_err(MigrationError::from)
            .map_err(self.component())?;
        times.snapshot_us = lap.next();
        let total = state.len() as u64;
        for (i, chunk) in state.chunks(STATE_CHUNK).enumerate() {
            self.check_cancel()?;
            let offset = (i * STATE_CHUNK) as u64;
            self.send(&Message::DeviceState {
                total,
                offset,
                data: chunk,
            })?;
        }
        self.check_cancel()?;
        self.send(&Message::Complete {
            round: final_round,
            pages: n,
        })?;
        times.state_transfer_us = lap.next();

        self.set_phase(Phase::Restore);
        self.expect_reply(|r| matches!(r, Reply::Restored), "Restored")?;
        times.restore_us = lap.next();
        self.set_phase(Phase::Commit);
        self.check_cancel()?;
        self.send(&Message::Commit)?;
        self.committed = true;
        self.expect_reply(|r| matches!(r, Reply::Resumed), "Resumed")?;
        times.resume_us = lap.next();
        let downtime = lap.total();
        self.rounds.push(RoundReport {
            round: final_round,
            pages: n,
            zero_pages: zero,
            bytes: final_bytes,
            duration_us: times.final_pages_us,
            dirty_after: 0,
            scan_us: micros(final_scan),
            predicted_downtime_us: 0,
        });
        self.set_phase(Phase::Completed);
        tracing::info!(?downtime, ?predicted, ?stop_reason, "migration completed");
        Ok(self.report(stop_reason, predicted, downtime, times, total))
    }

    fn hello(&mut self) -> Result<(), SourceError> {
        self.check_cancel()?;
        let memory_size = self.c.memory_size();
        if !memory_size.is_multiple_of(PAGE_SIZE as u64) {
            return Err(SourceError::Config(format!(
                "memory size {memory_size} is not a multiple of {PAGE_SIZE}"
            )));
        }
        self.page_count = memory_size / PAGE_SIZE as u64;
        self.state_hint = self.c.state_size_hint();
        let compat = self.c.compat().map_err(self.component())?;
        if compat.len() > MAX_COMPAT_LEN {
            return Err(SourceError::Config(format!(
                "compatibility record of {} bytes exceeds {MAX_COMPAT_LEN}",
                compat.len()
            )));
        }
        self.emit();
        self.send(&Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            page_size: PAGE_SIZE_U32,
            memory_size,
            state_size_hint: self.state_hint,
            compat,
        }))?;
        match self.reply("HelloAck")? {
            Reply::HelloAck(PROTOCOL_VERSION) => Ok(()),
            Reply::HelloAck(found) => Err(self.protocol(ProtocolError::Version { found })),
            _ => Err(self.unexpected("HelloAck")),
        }
    }

    /// One pre-copy round: the pages, `RoundEnd`, and the acknowledgement.
    fn round(
        &mut self,
        round: u32,
        pages: &mut dyn Iterator<Item = u64>,
        n: u64,
    ) -> Result<(), SourceError> {
        let t = Instant::now();
        let bytes0 = self.link.bytes_sent();
        let zero = self.send_pages(round, pages, n)?;
        self.send(&Message::RoundEnd { round, pages: n })?;
        match self.reply("RoundAck")? {
            Reply::RoundAck(r, p) if r == round && p == n => {}
            Reply::RoundAck(r, p) => {
                return Err(self.protocol(ProtocolError::Invalid(format!(
                    "acknowledged round {r} with {p} pages, sent round {round} with {n}"
                ))))
            }
            _ => return Err(self.unexpected("RoundAck")),
        }
        let bytes = self.link.bytes_sent() - bytes0;
        let elapsed = t.elapsed();
        // Bandwidth in pages processed, not wire bytes: a zero page costs a 9-byte marker on the
        // wire but a whole page of reading, and the prediction multiplies dirty *pages* by it.
        // Counting wire bytes made a mostly-zero memory look like a slow link, so an idle
        // component never converged.
        self.conv
            .record(bytes.max(n.saturating_mul(PAGE_SIZE as u64)), elapsed);
        self.rounds.push(RoundReport {
            round,
            pages: n,
            zero_pages: zero,
            bytes,
            duration_us: micros(elapsed),
            dirty_after: 0,
            scan_us: 0,
            predicted_downtime_us: 0,
        });
        Ok(())
    }

    /// Sends `n` pages in `Pages` messages; returns how many were zero.
    fn send_pages(
        &mut self,
        round: u32,
        pages: &mut dyn Iterator<Item = u64>,
        n: u64,
    ) -> Result<u64, SourceError> {
        self.pages_remaining = n;
        let mut zero = 0;
        let mut batch: Option<PagesWriter> = None;
        for index in pages {
            self.check_cancel()?;
            let w = batch.get_or_insert_with(|| PagesWriter::begin(&mut self.frame, round));
            let c = &*self.c;
            let is_zero = w
                .push(&mut self.frame, index, |buf| c.read_page(index, buf))
                .map_err(self.component())?;
            zero += u64::from(is_zero);
            self.pages_remaining = self.pages_remaining.saturating_sub(1);
            if w.count() == self.cfg.pages_per_message {
                self.flush_pages(batch.take())?;
            }
        }
        self.flush_pages(batch).map(|()| zero)
    }

    fn flush_pages(&mut self, batch: Option<PagesWriter>) -> Result<(), SourceError> {
        let Some(w) = batch else { return Ok(()) };
        w.finish(&mut self.frame);
        let r = self.link.send(MessageType::Pages as u16, &mut self.frame);
        r.map_err(|e| self.transport(e))?;
        self.emit();
        Ok(())
    }

    /// The component's dirty pages, sorted, without duplicates, all in range, and how long the
    /// component took to find them.
    fn dirty_pages(&mut self) -> Result<(Vec<u64>, Duration), SourceError> {
        let t = Instant::now();
        let mut d = self.c.dirty_pages().map_err(self.component())?;
        let scan = t.elapsed();
        d.sort_unstable();
        d.dedup();
        match d.last() {
            Some(&last) if last >= self.page_count => {
                Err(self.component()(MigrationError::Invalid {
                    component: self.c.id(),
                    reason: format!("dirty page {last} beyond {} pages", self.page_count),
                }))
            }
            _ => Ok((d, scan)),
        }
    }

    fn send(&mut self, m: &Message<'_>) -> Result<(), SourceError> {
        m.encode(&mut self.frame);
        let r = self.link.send(m.message_type() as u16, &mut self.frame);
        r.map_err(|e| self.transport(e))
    }

    /// Maps a send failure; if the destination hung up, its `Error` explaining why may be
    /// waiting to be read.
    fn transport(&mut self, e: TransportError) -> SourceError {
        use std::io::ErrorKind as K;
        if let TransportError::Io(io) = &e {
            if matches!(
                io.kind(),
                K::BrokenPipe | K::ConnectionReset | K::ConnectionAborted
            ) {
                if let Ok((ty, payload)) = self.link.recv() {
                    if let Ok(Message::Error { reason }) = Message::decode(ty, payload) {
                        return SourceError::Destination {
                            phase: self.phase,
                            reason: reason.to_owned(),
                        };
                    }
                }
            }
        }
        SourceError::Transport {
            phase: self.phase,
            source: e,
        }
    }

    fn reply(&mut self, expected: &'static str) -> Result<Reply, SourceError> {
        let phase = self.phase;
        let (ty, payload) = self
            .link
            .recv()
            .map_err(|source| SourceError::Transport { phase, source })?;
        let msg = Message::decode(ty, payload)
            .map_err(|source| SourceError::Protocol { phase, source })?;
        Ok(match msg {
            Message::HelloAck { version } => Reply::HelloAck(version),
            Message::RoundAck { round, pages } => Reply::RoundAck(round, pages),
            Message::Restored => Reply::Restored,
            Message::Resumed => Reply::Resumed,
            Message::Error { reason } => {
                return Err(SourceError::Destination {
                    phase,
                    reason: reason.to_owned(),
                })
            }
            other => {
                return Err(SourceError::Protocol {
                    phase,
                    source: ProtocolError::Unexpected {
                        found: other.message_type(),
                        expected,
                    },
                })
            }
        })
    }

    fn expect_reply(
        &mut self,
        ok: fn(&Reply) -> bool,
        name: &'static str,
    ) -> Result<(), SourceError> {
        if ok(&self.reply(name)?) {
            Ok(())
        } else {
            Err(self.unexpected(name))
        }
    }

    fn check_cancel(&self) -> Result<(), SourceError> {
        if self.cfg.cancel.is_cancelled() {
            return Err(SourceError::Cancelled { phase: self.phase });
        }
        Ok(())
    }

    fn component(&self) -> impl Fn(MigrationError) -> SourceError {
        let phase = self.phase;
        move |source| SourceError::Component { phase, source }
    }

    fn protocol(&self, source: ProtocolError) -> SourceError {
        SourceError::Protocol {
            phase: self.phase,
            source,
        }
    }

    fn unexpected(&self, expected: &'static str) -> SourceError {
        self.protocol(ProtocolError::Invalid(format!(
            "reply other than {expected}"
        )))
    }

    fn set_phase(&mut self, phase: Phase) {
        tracing::debug!(%phase, "migration source phase");
        self.phase = phase;
        self.emit();
    }

    fn emit(&mut self) {
        let sent = self.link.bytes_sent();
        let p = Progress {
            phase: self.phase,
            bytes_sent: sent,
            total_estimate: sent
                .saturating_add(self.pages_remaining.saturating_mul(PAGE_SIZE as u64))
                .saturating_add(self.state_hint),
            bytes_per_sec: self.conv.bandwidth().unwrap_or(0.0),
            predicted_downtime_us: self.predicted.map(micros),
            pages_remaining: self.pages_remaining,
            elapsed_us: micros(self.start.elapsed()),
        };
        (self.progress)(&p);
    }

    fn report(
        &self,
        stop_reason: StopReason,
        predicted: Duration,
        downtime: Duration,
        downtime_breakdown: DowntimeBreakdown,
        state_bytes: u64,
    ) -> MigrationReport {
        MigrationReport {
            protocol_version: PROTOCOL_VERSION,
            memory_bytes: self.page_count * PAGE_SIZE as u64,
            precopy_rounds: u32::try_from(self.rounds.len().saturating_sub(1)).unwrap_or(u32::MAX),
            stop_reason,
            final_pages: self.rounds.last().map_or(0, |r| r.pages),
            device_state_bytes: state_bytes,
            downtime_target_us: micros(self.cfg.downtime_target),
            predicted_downtime_us: micros(predicted),
            downtime_us: micros(downtime),
            downtime_breakdown,
            total_time_us: micros(self.start.elapsed()),
            bytes_sent: self.link.bytes_sent(),
            pages_sent: self.rounds.iter().map(|r| r.pages).sum(),
            zero_pages_sent: self.rounds.iter().map(|r| r.zero_pages).sum(),
            bandwidth_bytes_per_sec: self.conv.bandwidth().unwrap_or(0.0),
            rounds: self.rounds.clone(),
        }
    }

    /// Leaves the source as it was before the migration (see [`SourceError`]).
    fn rollback(&mut self, err: SourceError) -> SourceError {
        tracing::warn!(error = %error_chain(&err), "migration failed");
        if self.committed && !matches!(err, SourceError::Destination { .. }) {
            // The destination may have resumed: never run two copies.
            self.stop_logging();
            return SourceError::Unconfirmed {
                source: Box::new(err),
            };
        }
        if matches!(
            err,
            SourceError::Cancelled { .. }
                | SourceError::Component { .. }
                | SourceError::Protocol { .. }
                | SourceError::Config(_)
        ) {
            let reason = error_chain(&err);
            // Best effort: the destination also aborts when the connection closes.
            let _ = self.send(&Message::Abort { reason: &reason });
        }
        self.stop_logging();
        if self.paused {
            if let Err(source) = self.c.resume() {
                return SourceError::Resume {
                    error: Box::new(err),
                    source,
                };
            }
            self.paused = false;
        }
        err
    }

    fn stop_logging(&mut self) {
        if self.logging {
            self.logging = false;
            if let Err(e) = self.c.stop_dirty_log() {
                tracing::warn!(error = %error_chain(&e), "stopping the dirty log failed");
            }
        }
    }
}

/// Consecutive intervals from one start.
struct Lap {
    start: Instant,
    last: Instant,
}

impl Lap {
    fn start() -> Self {
        let now = Instant::now();
        Lap {
            start: now,
            last: now,
        }
    }

    /// Microseconds since the previous call (or the start).
    fn next(&mut self) -> u64 {
        let now = Instant::now();
        let d = now - self.last;
        self.last = now;
        micros(d)
    }

    fn total(&self) -> Duration {
        self.start.elapsed()
    }
}
