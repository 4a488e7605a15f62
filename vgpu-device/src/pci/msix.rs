//! The MSI-X table and pending-bit array (PBA) of the vGPU, both in BAR0.
//!
//! The table has [`MSIX_VECTORS`] entries of 16 bytes (message address low / high, message data,
//! vector control with the mask bit 0); at reset every vector is masked. Table accesses are
//! 4-byte or 8-byte, naturally aligned, inside the table; PBA accesses likewise inside the PBA,
//! which is read-only. Any other access reads all-ones, drops its write and is counted in
//! [`Msix::bad_accesses`].
//!
//! MSI-X enable and function mask live in config space; the caller passes them in. A vector
//! raised while it cannot be delivered sets its pending bit; the pending vector is delivered
//! (and its bit cleared) as soon as it becomes deliverable: when its mask bit is cleared or when
//! [`Msix::control_changed`] reports MSI-X enabled and the function unmasked.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use vgpu_abi::pci::MSIX_VECTORS;

use super::{record_bad_access, PciError};
use crate::irq::InterruptSink;

/// Vector control: the vector is masked.
pub const MSIX_ENTRY_MASKED: u32 = 1;
/// Size of one table entry in bytes.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Size of the table in bytes.
pub const MSIX_TABLE_SIZE: u64 = MSIX_VECTORS as u64 * MSIX_ENTRY_SIZE;
/// Size of the PBA in bytes (one bit per vector, in 64-bit words).
pub const MSIX_PBA_SIZE: u64 = (MSIX_VECTORS as u64).div_ceil(64) * 8;

const VECTORS: usize = MSIX_VECTORS as usize;
const PBA_WORDS: usize = VECTORS.div_ceil(64);

/// MSI-X enable and function mask, as config space holds them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsixControl {
    /// MSI-X enable.
    pub enabled: bool,
    /// Function mask: no vector is delivered while set.
    pub function_masked: bool,
}

/// One MSI-X table entry, as the guest sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    /// Message address, low half (bits 1:0 read 0).
    pub addr_lo: u32,
    /// Message address, high half.
    pub addr_hi: u32,
    /// Message data.
    pub data: u32,
    /// Vector control: [`MSIX_ENTRY_MASKED`]; other bits read 0.
    pub control: u32,
}

impl MsixEntry {
    const RESET: Self = Self {
        addr_lo: 0,
        addr_hi: 0,
        data: 0,
        control: MSIX_ENTRY_MASKED,
    };

    /// The 64-bit message address.
    pub fn address(&self) -> u64 {
        (u64::from(self.addr_hi) << 32) | u64::from(self.addr_lo)
    }

    /// Whether the vector is masked.
    pub fn masked(&self) -> bool {
        self.control & MSIX_ENTRY_MASKED != 0
    }

    fn dword(&self, index: usize) -> u32 {
        match index {
            0 => self.addr_lo,
            1 => self.addr_hi,
            2 => self.data,
            _ => self.control,
        }
    }
}

/// Guest-visible MSI-X state, for snapshots. Saved: table and PBA. Not saved: the counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// The table, [`MSIX_VECTORS`] entries.
    pub table: Vec<MsixEntry>,
    /// The pending bits, vector `v` at bit `v % 64` of word `v / 64`.
    pub pba: Vec<u64>,
}

/// The MSI-X table and PBA of one vGPU function.
#[derive(Debug)]
pub struct Msix {
    table: [MsixEntry; VECTORS],
    pba: [u64; PBA_WORDS],
    bad_accesses: AtomicU64,
    ignored_vectors: u64,
}

impl Default for Msix {
    fn default() -> Self {
        Self::new()
    }
}

impl Msix {
    /// The reset state: every vector masked, nothing pending.
    pub fn new() -> Self {
        Self {
            table: [MsixEntry::RESET; VECTORS],
            pba: [0; PBA_WORDS],
            bad_accesses: AtomicU64::new(0),
            ignored_vectors: 0,
        }
    }

    /// Restores the table and PBA from a snapshot, validating them.
    pub fn from_state(state: &MsixState) -> Result<Self, PciError> {
        let mut msix = Self::new();
        if state.table.len() != VECTORS {
            return Err(size_mismatch("table", state.table.len(), VECTORS));
        }
        if state.pba.len() != PBA_WORDS {
            return Err(size_mismatch("PBA", state.pba.len(), PBA_WORDS));
        }
        for (dst, src) in msix.table.iter_mut().zip(&state.table) {
            if src.addr_lo & 3 != 0 {
                return Err(read_only("MSI-X message address", src.addr_lo));
            }
            if src.control & !MSIX_ENTRY_MASKED != 0 {
                return Err(read_only("MSI-X vector control", src.control));
            }
            *dst = *src;
        }
        for (word, (dst, src)) in msix.pba.iter_mut().zip(&state.pba).enumerate() {
            let first = word * 64;
            let valid = if VECTORS - first >= 64 {
                u64::MAX
            } else {
                (1 << (VECTORS - first)) - 1
            };
            if src & !valid != 0 {
                return Err(PciError::ReadOnlyBits {
                    register: "MSI-X PBA",
                    value: *src,
                });
            }
            *dst = *src;
        }
        Ok(msix)
    }

    /// The table and PBA, for a snapshot.
    pub fn state(&self) -> MsixState {
        MsixState {
            table: self.table.to_vec(),
            pba: self.pba.to_vec(),
        }
    }

    /// Table entry `vector`, if it exists (for a host that programs interrupt routes).
    pub fn entry(&self, vector: u16) -> Option<MsixEntry> {
        self.table.get(usize::from(vector)).copied()
    }

    /// Whether `vector`'s pending bit is set.
    pub fn pending(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        self.pba
            .get(v / 64)
            .is_some_and(|w| w & (1 << (v % 64)) != 0)
    }

    /// Number of bad table / PBA accesses since creation.
    pub fn bad_accesses(&self) -> u64 {
        self.bad_accesses.load(Ordering::Relaxed)
    }

    /// Number of [`Msix::trigger`] calls for vectors the table does not have.
    pub fn ignored_vectors(&self) -> u64 {
        self.ignored_vectors
    }

    /// Reads the table at `offset` bytes from its start. A bad access fills `data` with `0xFF`.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        let Some(off) = self.check_access("MSI-X table", offset, data.len(), MSIX_TABLE_SIZE)
        else {
            data.fill(0xFF);
            return;
        };
        let entry = self.table.get(off / 16).copied().unwrap_or_default();
        let first = (off % 16) / 4;
        let lo = entry.dword(first).to_le_bytes();
        let hi = entry.dword(first + 1).to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = if i < 4 { lo[i] } else { hi[i - 4] };
        }
    }

    /// Writes the table at `offset` bytes from its start. Clearing a vector's mask bit delivers
    /// it if it is pending and `enabled && !function_masked`. A bad access is dropped.
    pub fn table_write(
        &mut self,
        offset: u64,
        data: &[u8],
        enabled: bool,
        function_masked: bool,
        sink: &dyn InterruptSink,
    ) {
        let Some(off) = self.check_access("MSI-X table", offset, data.len(), MSIX_TABLE_SIZE)
        else {
            return;
        };
        let Some(vector) = u16::try_from(off / 16).ok().filter(|v| *v < MSIX_VECTORS) else {
            return;
        };
        let first = (off % 16) / 4;
        for (i, chunk) in data.chunks_exact(4).enumerate() {
            let mut le = [0u8; 4];
            le.copy_from_slice(chunk);
            self.write_dword(vector, first + i, u32::from_le_bytes(le));
        }
        self.deliver_if_ready(vector, enabled, function_masked, sink);
    }

    /// Reads the PBA at `offset` bytes from its start. A bad access fills `data` with `0xFF`.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        let Some(off) = self.check_access("MSI-X PBA", offset, data.len(), MSIX_PBA_SIZE) else {
            data.fill(0xFF);
            return;
        };
        let word = self.pba.get(off / 8).copied().unwrap_or(0);
        let bytes = word.to_le_bytes();
        let start = off % 8;
        if let Some(src) = bytes.get(start..start + data.len()) {
            data.copy_from_slice(src);
        }
    }

    /// A write to the PBA, which is read-only: dropped and counted as a bad access.
    pub fn pba_write(&self, offset: u64, data: &[u8]) {
        record_bad_access(&self.bad_accesses, "MSI-X PBA write", offset, data.len());
    }

    /// Raises `vector`: delivers it through `sink` if MSI-X is `enabled`, the function is not
    /// masked and the vector is not masked; otherwise sets its pending bit. Vectors the table does
    /// not have are ignored and counted.
    pub fn trigger(
        &mut self,
        vector: u16,
        enabled: bool,
        function_masked: bool,
        sink: &dyn InterruptSink,
    ) {
        if vector >= MSIX_VECTORS {
            self.ignored_vectors = self.ignored_vectors.wrapping_add(1);
            tracing::debug!(vector, "MSI-X vector out of range ignored");
            return;
        }
        self.set_pending(vector, true);
        self.deliver_if_ready(vector, enabled, function_masked, sink);
    }

    /// Applies a new MSI-X enable / function mask: when both allow delivery, every pending
    /// unmasked vector is delivered and its pending bit cleared.
    pub fn control_changed(
        &mut self,
        enabled: bool,
        function_masked: bool,
        sink: &dyn InterruptSink,
    ) {
        for vector in 0..MSIX_VECTORS {
            self.deliver_if_ready(vector, enabled, function_masked, sink);
        }
    }

    fn deliver_if_ready(
        &mut self,
        vector: u16,
        enabled: bool,
        function_masked: bool,
        sink: &dyn InterruptSink,
    ) {
        let unmasked = matches!(self.entry(vector), Some(e) if !e.masked());
        if !enabled || function_masked || !unmasked || !self.pending(vector) {
            return;
        }
        self.set_pending(vector, false);
        sink.trigger(vector);
    }

    fn set_pending(&mut self, vector: u16, pending: bool) {
        let v = usize::from(vector);
        if let Some(word) = self.pba.get_mut(v / 64) {
            if pending {
                *word |= 1 << (v % 64);
            } else {
                *word &= !(1 << (v % 64));
            }
        }
    }

    fn write_dword(&mut self, vector: u16, index: usize, value: u32) {
        let Some(entry) = self.table.get_mut(usize::from(vector)) else {
            return;
        };
        match index {
            0 => entry.addr_lo = value & !3,
            1 => entry.addr_hi = value,
            2 => entry.data = value,
            _ => entry.control = value & MSIX_ENTRY_MASKED,
        }
    }

    /// Validates a 4- or 8-byte naturally aligned access inside `[0, limit)`.
    fn check_access(
        &self,
        what: &'static str,
        offset: u64,
        len: usize,
        limit: u64,
    ) -> Option<usize> {
        let end = match len {
            4 if offset & 3 == 0 => offset.checked_add(4),
            8 if offset & 7 == 0 => offset.checked_add(8),
            _ => None,
        };
        match end {
            Some(end) if end <= limit => usize::try_from(offset).ok(),
            _ => {
                record_bad_access(&self.bad_accesses, what, offset, len);
                None
            }
        }
    }
}

fn size_mismatch(what: &'static str, got: usize, expected: usize) -> PciError {
    PciError::MsixSizeMismatch {
        what,
        got,
        expected,
    }
}

fn read_only(register: &'static str, value: u32) -> PciError {
    PciError::ReadOnlyBits {
        register,
        value: value.into(),
    }
}

#[cfg(test)]
#[path = "msix_tests.rs"]
mod tests;
