//! The vGPU's PCIe configuration space.
//!
//! 256 bytes of type-0 header and capabilities ([`super::caps`]) followed by the PCIe extended
//! space, which reads 0 and drops writes (no extended capabilities: a walk from `0x100` ends at
//! once). Accesses are 1, 2 or 4 bytes, naturally aligned, below `0x1000`; any other access reads
//! all-ones, drops its write and is counted in [`ConfigSpace::bad_accesses`].
//!
//! Guest-writable state: BAR0 and BAR2 addresses, command bits 1, 2 and 10, MSI-X enable and
//! function mask, PCIe device control. Everything else is read-only; the status register has no
//! write-1-to-clear bits, so a write is a read-modify-write of the containing dword.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use vgpu_abi::pci::{BAR0_SIZE, BAR_APERTURE, BAR_REGS, CAP_MSIX_OFFSET, CAP_PCIE_OFFSET};

use super::bar::MemBar64;
use super::caps::{
    self, CONFIG_SPACE_SIZE, MSIX_CTL_ENABLE, MSIX_CTL_FUNCTION_MASK, MSIX_CTL_WRITABLE,
    PCIE_CONFIG_SPACE_SIZE, PCIE_DEVCTL, PCIE_DEVCTL_RESET, PCIE_DEVCTL_WRITABLE,
};
use super::{hi16, lo16, record_bad_access, MsixControl, PciError};

/// Command register: memory-space enable.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus-master enable.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: INTx disable.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Command register bits the guest can write.
pub const COMMAND_WRITABLE: u16 = COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;

/// Config offsets of the command register and of the first and last BAR.
const OFF_COMMAND: usize = 0x04;
const OFF_BAR0: usize = 0x10;
const OFF_BAR5: usize = 0x24;
const REG_COMMAND: usize = OFF_COMMAND / 4;
const REG_BAR0: usize = OFF_BAR0 / 4;
const REG_BAR5: usize = OFF_BAR5 / 4;
const REG_MSIX: usize = CAP_MSIX_OFFSET as usize / 4;
const REG_PCIE_DEVCTL: usize = (CAP_PCIE_OFFSET as usize + PCIE_DEVCTL as usize) / 4;

/// A BAR whose decoded address changed: the bus should move its mapping from `old` to `new`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMove {
    /// BAR index ([`BAR_REGS`] or [`BAR_APERTURE`]).
    pub bar: usize,
    /// Previous base address.
    pub old: u64,
    /// New base address.
    pub new: u64,
}

/// What a config write changed, for the bus to apply. A field is set only when the write changed
/// the value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigWriteResult {
    /// BARs whose decoded address changed (a 64-bit BAR is reported on each dword write that
    /// changes its address; size probes are not reported, see the `bar` module docs).
    pub bar_moves: Vec<BarMove>,
    /// New memory-space enable.
    pub memory_enable: Option<bool>,
    /// New bus-master enable.
    pub bus_master: Option<bool>,
    /// New MSI-X control; pass it to [`super::Msix::control_changed`].
    pub msix: Option<MsixControl>,
}

impl ConfigWriteResult {
    /// Whether the write changed nothing the bus must act on.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Guest-writable config state, for snapshots. Saved: everything a guest can write. Rebuilt on
/// restore: the read-only image, and the BAR registers from the addresses (a size probe in
/// progress is not saved; the BAR reads its address after restore). Not saved: the
/// bad-access counter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSpaceState {
    /// Base address of BAR0 (aligned to [`BAR0_SIZE`]).
    pub bar0_address: u64,
    /// Base address of BAR2 (aligned to `bar2_size`).
    pub bar2_address: u64,
    /// Size of BAR2; must equal the size of the device restored into.
    pub bar2_size: u64,
    /// Command register ([`COMMAND_WRITABLE`] bits only).
    pub command: u16,
    /// MSI-X message control ([`MSIX_CTL_WRITABLE`] bits only).
    pub msix_control: u16,
    /// PCIe device control ([`PCIE_DEVCTL_WRITABLE`] bits only).
    pub pcie_device_control: u16,
}

/// The config space of one vGPU function.
#[derive(Debug)]
pub struct ConfigSpace {
    /// Read-only header and capabilities; writable fields are zero here.
    image: [u32; CONFIG_SPACE_SIZE / 4],
    /// BAR0 (registers) and BAR2 (aperture).
    bars: [MemBar64; 2],
    command: u16,
    msix_control: u16,
    pcie_devctl: u16,
    bad_accesses: AtomicU64,
}

impl ConfigSpace {
    /// A config space in its reset state, with a BAR2 of `bar2_size` bytes (the vGPU's local
    /// memory; a power of two, at least 4 KiB).
    pub fn new(bar2_size: u64) -> Result<Self, PciError> {
        Ok(Self {
            image: caps::image(),
            bars: [
                MemBar64::new(BAR_REGS, BAR0_SIZE, false)?,
                MemBar64::new(BAR_APERTURE, bar2_size, true)?,
            ],
            command: 0,
            msix_control: 0,
            pcie_devctl: PCIE_DEVCTL_RESET,
            bad_accesses: AtomicU64::new(0),
        })
    }

    /// Restores a config space with a BAR2 of `bar2_size` bytes from a snapshot, validating it.
    pub fn from_state(bar2_size: u64, state: &ConfigSpaceState) -> Result<Self, PciError> {
        let mut cs = Self::new(bar2_size)?;
        if state.bar2_size != bar2_size {
            return Err(PciError::BarSizeMismatch {
                bar: BAR_APERTURE,
                snapshot: state.bar2_size,
                device: bar2_size,
            });
        }
        check_bits("command", state.command, COMMAND_WRITABLE)?;
        check_bits("MSI-X control", state.msix_control, MSIX_CTL_WRITABLE)?;
        check_bits(
            "PCIe device control",
            state.pcie_device_control,
            PCIE_DEVCTL_WRITABLE,
        )?;
        let [bar0, bar2] = &mut cs.bars;
        bar0.restore(state.bar0_address)?;
        bar2.restore(state.bar2_address)?;
        cs.command = state.command;
        cs.msix_control = state.msix_control;
        cs.pcie_devctl = state.pcie_device_control;
        Ok(cs)
    }

    /// The guest-writable state, for a snapshot.
    pub fn state(&self) -> ConfigSpaceState {
        let [bar0, bar2] = &self.bars;
        ConfigSpaceState {
            bar0_address: bar0.address(),
            bar2_address: bar2.address(),
            bar2_size: bar2.size(),
            command: self.command,
            msix_control: self.msix_control,
            pcie_device_control: self.pcie_devctl,
        }
    }

    /// Reads `data.len()` bytes at `offset`. A bad access fills `data` with `0xFF`.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        let Some(off) = self.check_access(offset, data.len()) else {
            data.fill(0xFF);
            return;
        };
        let value = if off < CONFIG_SPACE_SIZE {
            self.read_dword(off / 4)
        } else {
            0
        };
        let start = off % 4;
        if let Some(src) = value.to_le_bytes().get(start..start + data.len()) {
            data.copy_from_slice(src);
        }
    }

    /// Writes `data` at `offset` and returns what changed. A bad access is dropped.
    pub fn write(&mut self, offset: u16, data: &[u8]) -> ConfigWriteResult {
        let mut result = ConfigWriteResult::default();
        let Some(off) = self.check_access(offset, data.len()) else {
            return result;
        };
        if off >= CONFIG_SPACE_SIZE {
            return result; // Extended config space: nothing there.
        }
        let reg = off / 4;
        let mut bytes = self.read_dword(reg).to_le_bytes();
        let start = off % 4;
        if let Some(dst) = bytes.get_mut(start..start + data.len()) {
            dst.copy_from_slice(data);
        }
        self.write_dword(reg, u32::from_le_bytes(bytes), &mut result);
        result
    }

    /// Number of bad (unaligned, wrong-sized or out-of-range) accesses since creation.
    pub fn bad_accesses(&self) -> u64 {
        self.bad_accesses.load(Ordering::Relaxed)
    }

    /// Base address BAR `bar` decodes at: `Some` for BAR0 and BAR2, `None` for other indices.
    pub fn bar_address(&self, bar: usize) -> Option<u64> {
        self.bar(bar).map(MemBar64::address)
    }

    /// Size of BAR `bar`: `Some` for BAR0 and BAR2, `None` for other indices.
    pub fn bar_size(&self, bar: usize) -> Option<u64> {
        self.bar(bar).map(MemBar64::size)
    }

    /// Whether memory-space decoding is enabled.
    pub fn memory_enabled(&self) -> bool {
        self.command & COMMAND_MEMORY != 0
    }

    /// Whether the function may master DMA.
    pub fn bus_master_enabled(&self) -> bool {
        self.command & COMMAND_BUS_MASTER != 0
    }

    /// Whether MSI-X is enabled.
    pub fn msix_enabled(&self) -> bool {
        self.msix_control & MSIX_CTL_ENABLE != 0
    }

    /// Whether the MSI-X function mask is set.
    pub fn msix_function_masked(&self) -> bool {
        self.msix_control & MSIX_CTL_FUNCTION_MASK != 0
    }

    /// MSI-X enable and function mask together.
    pub fn msix_control(&self) -> MsixControl {
        MsixControl {
            enabled: self.msix_enabled(),
            function_masked: self.msix_function_masked(),
        }
    }

    fn bar(&self, bar: usize) -> Option<&MemBar64> {
        match bar {
            BAR_REGS => self.bars.first(),
            BAR_APERTURE => self.bars.get(1),
            _ => None,
        }
    }

    /// Validates an access; returns the offset as `usize`, or counts a bad access.
    fn check_access(&self, offset: u16, len: usize) -> Option<usize> {
        let off = usize::from(offset);
        let aligned = matches!(len, 1 | 2 | 4) && off % len == 0;
        if aligned && off + len <= PCIE_CONFIG_SPACE_SIZE {
            return Some(off);
        }
        record_bad_access(&self.bad_accesses, "config", u64::from(offset), len);
        None
    }

    /// Maps a BAR dword index (0..6) to the BAR it belongs to and whether it is the high half.
    fn bar_slot(index: usize) -> Option<(usize, bool)> {
        match index {
            0..=3 => Some((index / 2, index % 2 == 1)),
            _ => None, // BAR4 / BAR5: unused.
        }
    }

    fn read_dword(&self, reg: usize) -> u32 {
        let fixed = self.image.get(reg).copied().unwrap_or(0);
        match reg {
            REG_COMMAND => fixed | u32::from(self.command),
            REG_BAR0..=REG_BAR5 => Self::bar_slot(reg - REG_BAR0)
                .and_then(|(i, high)| self.bars.get(i).map(|b| b.read(high)))
                .unwrap_or(0),
            REG_MSIX => fixed | (u32::from(self.msix_control) << 16),
            REG_PCIE_DEVCTL => fixed | u32::from(self.pcie_devctl),
            _ => fixed,
        }
    }

    fn write_dword(&mut self, reg: usize, value: u32, result: &mut ConfigWriteResult) {
        match reg {
            REG_COMMAND => {
                let old = self.command;
                self.command = lo16(value) & COMMAND_WRITABLE;
                let changed = old ^ self.command;
                if changed & COMMAND_MEMORY != 0 {
                    result.memory_enable = Some(self.memory_enabled());
                }
                if changed & COMMAND_BUS_MASTER != 0 {
                    result.bus_master = Some(self.bus_master_enabled());
                }
            }
            REG_BAR0..=REG_BAR5 => {
                let Some((i, high)) = Self::bar_slot(reg - REG_BAR0) else {
                    return;
                };
                let bar = if i == 0 { BAR_REGS } else { BAR_APERTURE };
                if let Some((old, new)) = self.bars.get_mut(i).and_then(|b| b.write(high, value)) {
                    result.bar_moves.push(BarMove { bar, old, new });
                }
            }
            REG_MSIX => {
                let old = self.msix_control;
                self.msix_control = hi16(value) & MSIX_CTL_WRITABLE;
                if old != self.msix_control {
                    result.msix = Some(self.msix_control());
                }
            }
            REG_PCIE_DEVCTL => self.pcie_devctl = lo16(value) & PCIE_DEVCTL_WRITABLE,
            _ => {} // Read-only.
        }
    }
}

/// Rejects `value` if it has bits outside `writable`.
fn check_bits(register: &'static str, value: u16, writable: u16) -> Result<(), PciError> {
    if value & !writable != 0 {
        return Err(PciError::ReadOnlyBits {
            register,
            value: value.into(),
        });
    }
    Ok(())
}

#[cfg(test)]
#[path = "config_tests.rs"]
pub(super) mod tests;
