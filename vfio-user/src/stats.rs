//! Counters of what the server saw, for tests, metrics and rate-limited logs.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of the server's counters (since it started).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections served (version negotiation not required).
    pub connections: u64,
    /// Connections refused because a client was already being served.
    pub refused: u64,
    /// Messages received (commands and replies).
    pub messages: u64,
    /// Error replies sent (plus errors not sent because of `NO_REPLY`).
    pub errors: u64,
    /// Region reads answered with all-ones and writes dropped (bad index, out of bounds,
    /// backend failure).
    pub bad_accesses: u64,
    /// Connections closed for a framing error (truncated, undersized or oversized message).
    pub framing_errors: u64,
    /// File descriptors received where none belonged, or beyond the limit; all were closed.
    pub stray_fds: u64,
    /// Replies from the client that matched no request of ours.
    pub unexpected_replies: u64,
    /// Panics caught in a connection thread (a backend bug; the server keeps listening).
    pub panics: u64,
}

/// The live counters.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub connections: AtomicU64,
    pub refused: AtomicU64,
    pub messages: AtomicU64,
    pub errors: AtomicU64,
    pub bad_accesses: AtomicU64,
    pub framing_errors: AtomicU64,
    pub stray_fds: AtomicU64,
    pub unexpected_replies: AtomicU64,
    pub panics: AtomicU64,
}

/// Adds `n` to `counter` and says whether this event should be logged: the first 16, then each
/// power of two (a bad guest cannot flood the log).
pub(crate) fn bump(counter: &AtomicU64, n: u64) -> bool {
    let before = counter.fetch_add(n, Ordering::Relaxed);
    let now = before.saturating_add(n);
    now <= 16 || now.is_power_of_two()
}

impl Stats {
    /// A snapshot.
    pub fn snapshot(&self) -> ServerStats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ServerStats {
            connections: r(&self.connections),
            refused: r(&self.refused),
            messages: r(&self.messages),
            errors: r(&self.errors),
            bad_accesses: r(&self.bad_accesses),
            framing_errors: r(&self.framing_errors),
            stray_fds: r(&self.stray_fds),
            unexpected_replies: r(&self.unexpected_replies),
            panics: r(&self.panics),
        }
    }
}
