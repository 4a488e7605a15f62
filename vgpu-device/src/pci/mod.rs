//! PCI function of the vGPU: config space and MSI-X.
//!
//! Transport-free and driven through `&mut self`; locking is the caller's job.
//!
//! - [`ConfigSpace`] models the function's PCIe configuration space: the type-0 header with two
//!   64-bit memory BARs, and the MSI-X, PCI Express and vendor-specific capabilities laid out as
//!   [`vgpu_abi::pci`] says. A config write does not act on any bus: it returns its effects as
//!   intents ([`ConfigWriteResult`]: BAR moves, memory/bus-master enable, MSI-X control) for the
//!   host to apply.
//! - [`Msix`] holds the MSI-X table and pending-bit array that live in BAR0 and raises vectors
//!   through an injected [`InterruptSink`](crate::irq::InterruptSink).
//!
//! How a host wires them together:
//! - config-space accesses go to [`ConfigSpace::read`] / [`ConfigSpace::write`]; the host moves
//!   BAR mappings as `bar_moves` says, and passes `msix` to [`Msix::control_changed`];
//! - BAR0 accesses in the MSI-X table / PBA pages go to [`Msix::table_read`],
//!   [`Msix::table_write`] and [`Msix::pba_read`], with offsets relative to the table / PBA;
//! - the device raises a vector with [`Msix::trigger`], passing
//!   [`ConfigSpace::msix_enabled`] and [`ConfigSpace::msix_function_masked`].
//!
//! Snapshots: [`ConfigSpaceState`] and [`MsixState`] hold the guest-writable state; their
//! `from_state` constructors validate it, since a snapshot is untrusted input.

mod bar;
pub mod caps;
pub mod config;
pub mod msix;
#[cfg(test)]
mod proptests;

use std::sync::atomic::{AtomicU64, Ordering};

pub use bar::{BAR_PREFETCHABLE, BAR_TYPE_MEM64};
pub use config::{BarMove, ConfigSpace, ConfigSpaceState, ConfigWriteResult};
pub use msix::{Msix, MsixControl, MsixEntry, MsixState};

/// Errors of the PCI function: construction with a bad geometry and restore of a bad snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PciError {
    /// A BAR size is not a power of two of at least 4 KiB.
    #[error("BAR{bar} size {size:#x} is not a power of two of at least 4 KiB")]
    InvalidBarSize {
        /// BAR index.
        bar: usize,
        /// Rejected size.
        size: u64,
    },
    /// A snapshot's BAR address is not aligned to the BAR size.
    #[error("BAR{bar} address {addr:#x} is not aligned to its size {size:#x}")]
    UnalignedBarAddress {
        /// BAR index.
        bar: usize,
        /// Rejected address.
        addr: u64,
        /// Size of the BAR.
        size: u64,
    },
    /// A snapshot was taken with a different BAR size than this device has.
    #[error("BAR{bar} size {snapshot:#x} in snapshot differs from device size {device:#x}")]
    BarSizeMismatch {
        /// BAR index.
        bar: usize,
        /// Size recorded in the snapshot.
        snapshot: u64,
        /// Size of this device's BAR.
        device: u64,
    },
    /// A snapshot sets bits a guest cannot set in a register.
    #[error("Read-only bits set in {register}: {value:#x}")]
    ReadOnlyBits {
        /// Name of the register.
        register: &'static str,
        /// Rejected value.
        value: u64,
    },
    /// A snapshot's MSI-X table or PBA has the wrong number of entries.
    #[error("MSI-X {what} has {got} entries, expected {expected}")]
    MsixSizeMismatch {
        /// `"table"` or `"PBA"`.
        what: &'static str,
        /// Entries in the snapshot.
        got: usize,
        /// Entries this device has.
        expected: usize,
    },
}

/// Counts a dropped guest access and logs it, rate-limited to the 1st, 2nd, 4th, 8th... one.
fn record_bad_access(counter: &AtomicU64, what: &'static str, offset: u64, len: usize) {
    let count = counter.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
    if count.is_power_of_two() {
        tracing::warn!(what, offset, len, count, "Bad PCI access dropped");
    }
}

/// The low dword of `v`.
#[allow(clippy::cast_possible_truncation)] // Truncation to the low 32 bits is the intent.
const fn lo32(v: u64) -> u32 {
    v as u32
}

/// The high dword of `v`.
#[allow(clippy::cast_possible_truncation)] // `v >> 32` always fits in 32 bits.
const fn hi32(v: u64) -> u32 {
    (v >> 32) as u32
}

/// The low half of `v`.
#[allow(clippy::cast_possible_truncation)] // Truncation to the low 16 bits is the intent.
const fn lo16(v: u32) -> u16 {
    v as u16
}

/// The high half of `v`.
#[allow(clippy::cast_possible_truncation)] // `v >> 16` always fits in 16 bits.
const fn hi16(v: u32) -> u16 {
    (v >> 16) as u16
}
