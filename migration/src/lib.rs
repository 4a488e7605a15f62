//! Snapshot, restore and live migration of vGPU state.
//!
//! - [`Pausable`], [`Snapshottable`], [`Migratable`]: the component traits (the shape of Cloud
//!   Hypervisor's `vm-migration`, with no default that silently saves nothing).
//! - [`Snapshot`]: a tree of component states keyed by id.
//! - [`envelope`]: the on-disk / on-wire framing: magic, format version, payload, checksum.
//!   Restores treat every byte as untrusted. [`bytes`]: byte vectors as serde byte strings.
//! - Live migration between two daemons, generic over a [`LiveMigratable`] component:
//!   [`source::migrate`] and [`destination::Incoming`] run the two ends of the versioned
//!   [`protocol`] over any byte stream ([`transport`]); [`convergence`] decides when pre-copy
//!   stops. `docs/migration.md` documents the state machines.

pub mod bytes;
pub mod convergence;
pub mod destination;
pub mod envelope;
pub mod protocol;
pub mod report;
pub mod snapshot;
pub mod source;
pub mod transport;

pub use destination::{receive, DestinationConfig, DestinationError, Incoming};
pub use envelope::{decode, encode, encode_to, EnvelopeError, FORMAT_VERSION, MAGIC};
pub use protocol::{Hello, ProtocolError, PAGE_SIZE, PROTOCOL_VERSION};
pub use report::{
    CancelToken, DestinationReport, DowntimeBreakdown, MigrationReport, Phase, Progress,
    RoundReport, StopReason,
};
pub use snapshot::{Snapshot, SnapshotError};
pub use source::{migrate, SourceConfig, SourceError};
pub use transport::{TransportError, MAX_PAYLOAD};

/// Errors of component operations.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The snapshot or stream is malformed or does not fit this component.
    #[error("Invalid state for {component}: {reason}")]
    Invalid {
        /// Component id.
        component: String,
        /// What is wrong.
        reason: String,
    },
    /// The component cannot do this now (e.g. not paused).
    #[error("{component}: {reason}")]
    State {
        /// Component id.
        component: String,
        /// Why not.
        reason: String,
    },
    /// Snapshot tree or envelope error.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Envelope error.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
}

/// A component that can stop and restart its activity. Pausing waits until the component is
/// quiescent (engines at a command boundary); a paused component's state does not change.
pub trait Pausable {
    /// Stops activity; returns when quiescent.
    fn pause(&mut self) -> Result<(), MigrationError>;
    /// Restarts activity.
    fn resume(&mut self) -> Result<(), MigrationError>;
}

/// A component whose state can be saved into a [`Snapshot`] and restored from one. `restore`
/// validates everything: a snapshot is untrusted input.
pub trait Snapshottable {
    /// The component's id in the snapshot tree.
    fn id(&self) -> String;
    /// Saves the state (the component should be paused).
    fn snapshot(&mut self) -> Result<Snapshot, MigrationError>;
    /// Replaces the state with a saved one, after validating it.
    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), MigrationError>;
}

/// A component that can be live-migrated: pre-copy of its memory with dirty tracking, then
/// stop-and-copy of the rest.
pub trait Migratable: Pausable + Snapshottable {
    /// Size of the component's memory in bytes (a multiple of the page size).
    fn memory_size(&self) -> u64;
    /// Starts tracking pages written from now on (all pages count as dirty at the start).
    fn start_dirty_log(&mut self) -> Result<(), MigrationError>;
    /// Stops tracking.
    fn stop_dirty_log(&mut self) -> Result<(), MigrationError>;
    /// Pages (indexes of 4 KiB pages) written since the last call (or since the start).
    fn dirty_pages(&mut self) -> Result<Vec<u64>, MigrationError>;
    /// Reads page `index` into `buf` (4 KiB).
    fn read_page(&self, index: u64, buf: &mut [u8]) -> Result<(), MigrationError>;
    /// Writes page `index` from `buf` (4 KiB) on the destination.
    fn write_page(&mut self, index: u64, buf: &[u8]) -> Result<(), MigrationError>;
}

/// What the live-migration protocol needs from a component beyond [`Migratable`]. Both ends use
/// the same component type: the source calls [`compat`](Self::compat) and
/// [`state_size_hint`](Self::state_size_hint), the destination
/// [`accept_compat`](Self::accept_compat), [`write_zero_page`](Self::write_zero_page) and
/// [`abort`](Self::abort). No method has a default: each answer matters.
///
/// How the protocol uses [`Migratable`]: the source calls `start_dirty_log`, then
/// `dirty_pages` once and ignores the answer (whether or not it lists every page), then reads
/// every page (round 1); each later `dirty_pages` answer is a round. Pages may repeat or come
/// in any order; an index beyond the memory fails the migration. The source calls
/// `stop_dirty_log` once the component is paused (or on failure), and `resume` if the
/// migration fails before the destination took over. The destination calls `write_page` /
/// `write_zero_page` while the source keeps running, then `restore` and, only after the source
/// committed, `resume`.
pub trait LiveMigratable: Migratable {
    /// Source: the compatibility record sent to the destination, opaque to the protocol (e.g.
    /// device revision, profile, GTT mode, snapshot format version); at most
    /// [`protocol::MAX_COMPAT_LEN`] bytes.
    fn compat(&self) -> Result<Vec<u8>, MigrationError>;
    /// Source: an estimate of the size of the encoded device state (the envelope of
    /// `snapshot()`), for the downtime prediction. Need not be exact.
    fn state_size_hint(&self) -> u64;
    /// Destination: decides whether a migration with this compatibility record and memory size
    /// can be received into this component, and prepares it (e.g. sizes its memory). After
    /// `Ok`, `memory_size()` must equal `memory_size`. An `Err` refuses the migration; its text
    /// is sent to the source.
    fn accept_compat(&mut self, compat: &[u8], memory_size: u64) -> Result<(), MigrationError>;
    /// Destination: page `index` must read as all zero (the protocol sends zero pages as a
    /// marker). The component may punch a hole instead of writing.
    fn write_zero_page(&mut self, index: u64) -> Result<(), MigrationError>;
    /// Destination: the migration failed after the component was handed to the protocol;
    /// discard everything received (the component is paused and will not be resumed by the
    /// protocol). Called at most once, never after `resume`; the owner may then free the
    /// component.
    fn abort(&mut self);
}

/// Generates the round-trip test of a [`Snapshottable`] component: snapshot → mutate → restore →
/// snapshot equal. `$make` builds a component, `$mutate` changes its state.
#[macro_export]
macro_rules! snapshot_roundtrip_test {
    ($name:ident, $make:expr, $mutate:expr) => {
        #[test]
        fn $name() {
            use $crate::Snapshottable as _;
            let mut c = $make;
            let before = c.snapshot().expect("snapshot");
            let bytes = $crate::encode(&before).expect("encode");
            #[allow(clippy::redundant_closure_call)]
            ($mutate)(&mut c);
            let changed = c.snapshot().expect("snapshot after mutation");
            assert_ne!(
                changed, before,
                "the mutation must change the state the snapshot sees"
            );
            let decoded = $crate::decode(&bytes).expect("decode");
            c.restore(&decoded).expect("restore");
            let after = c.snapshot().expect("snapshot after restore");
            assert_eq!(
                after, before,
                "restore must give back exactly the saved state"
            );
        }
    };
}
