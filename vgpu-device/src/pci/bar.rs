//! A 64-bit memory BAR as software programs it: size probing and address decoding.
//!
//! The register holds the written value masked to the BAR's size alignment, so writing all-ones
//! and reading back yields the size mask (with the type bits in the low dword), as on hardware.
//!
//! The BAR also tracks the address it *decodes at* (the last one reported to the bus). A dword
//! write of `0xFFFF_FFFF` is a size probe: while either dword holds a probe, the decoded address
//! does not follow the register, so a save / probe / restore sequence reports no move. Any other
//! write that changes the register's 64-bit address reports a move immediately, even if only one
//! half has been written yet: a guest that rewrites both halves (with memory decode off, as it
//! should) sees two moves, the first to a mixed address.

use super::{hi32, lo32, PciError};
use vgpu_abi::PAGE_SIZE;

/// Type bits of a 64-bit memory BAR's low dword (bits 2:1 = `0b10`, bit 0 = memory).
pub const BAR_TYPE_MEM64: u32 = 0b0100;
/// Prefetchable bit of a memory BAR's low dword.
pub const BAR_PREFETCHABLE: u32 = 0b1000;
/// Bits of a memory BAR's low dword that are type information, not address.
const BAR_INFO_BITS: u32 = 0xF;

/// A 64-bit memory BAR: the pair of config dwords and the address it decodes at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MemBar64 {
    /// BAR index of the low dword (for errors).
    bar: usize,
    /// Size in bytes: a power of two, at least 4 KiB.
    size: u64,
    /// Whether the BAR reports itself prefetchable.
    prefetchable: bool,
    /// Register contents, masked to the size alignment; may hold a size probe.
    reg: u64,
    /// Address the BAR decodes at: the register value when no probe is pending.
    addr: u64,
    /// Whether the low / high dword holds a size probe.
    probing: [bool; 2],
}

impl MemBar64 {
    /// A BAR of `size` bytes at address 0.
    pub(super) fn new(bar: usize, size: u64, prefetchable: bool) -> Result<Self, PciError> {
        if !size.is_power_of_two() || size < PAGE_SIZE {
            return Err(PciError::InvalidBarSize { bar, size });
        }
        Ok(Self {
            bar,
            size,
            prefetchable,
            reg: 0,
            addr: 0,
            probing: [false; 2],
        })
    }

    /// Size in bytes.
    pub(super) fn size(&self) -> u64 {
        self.size
    }

    /// Address the BAR decodes at.
    pub(super) fn address(&self) -> u64 {
        self.addr
    }

    fn info_bits(&self) -> u32 {
        if self.prefetchable {
            BAR_TYPE_MEM64 | BAR_PREFETCHABLE
        } else {
            BAR_TYPE_MEM64
        }
    }

    /// Reads the low (`high == false`) or high dword.
    pub(super) fn read(&self, high: bool) -> u32 {
        if high {
            hi32(self.reg)
        } else {
            lo32(self.reg) | self.info_bits()
        }
    }

    /// Writes the low or high dword; returns `(old, new)` when the decoded address changed.
    pub(super) fn write(&mut self, high: bool, value: u32) -> Option<(u64, u64)> {
        let v = u64::from(value);
        let raw = if high {
            (self.reg & 0xFFFF_FFFF) | (v << 32)
        } else {
            (self.reg & !0xFFFF_FFFF) | (v & !u64::from(BAR_INFO_BITS))
        };
        self.reg = raw & !(self.size - 1);
        self.probing[usize::from(high)] = value == u32::MAX;
        if self.probing.contains(&true) || self.reg == self.addr {
            return None;
        }
        let old = self.addr;
        self.addr = self.reg;
        Some((old, self.addr))
    }

    /// Sets the decoded address from a snapshot; rejects an address not aligned to the size.
    pub(super) fn restore(&mut self, addr: u64) -> Result<(), PciError> {
        if addr & (self.size - 1) != 0 {
            return Err(PciError::UnalignedBarAddress {
                bar: self.bar,
                addr,
                size: self.size,
            });
        }
        self.reg = addr;
        self.addr = addr;
        self.probing = [false; 2];
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_bar_new_bad_size_rejected() {
        for size in [0, 1, 2048, 3 << 20, u64::MAX] {
            assert_eq!(
                MemBar64::new(2, size, true),
                Err(PciError::InvalidBarSize { bar: 2, size })
            );
        }
        assert!(MemBar64::new(2, PAGE_SIZE, true).is_ok());
        assert!(MemBar64::new(2, 1 << 63, true).is_ok());
    }

    #[test]
    fn test_bar_probe_large_bar_low_dword_only_type_bits() {
        let mut bar = MemBar64::new(2, 8 << 30, true).unwrap();
        assert_eq!(bar.write(false, u32::MAX), None);
        assert_eq!(bar.write(true, u32::MAX), None);
        assert_eq!(bar.read(false), BAR_TYPE_MEM64 | BAR_PREFETCHABLE);
        assert_eq!(bar.read(true), 0xFFFF_FFFE);
        assert_eq!(bar.address(), 0);
    }

    #[test]
    fn test_bar_write_while_other_half_probing_defers_move() {
        let mut bar = MemBar64::new(0, 32 << 20, false).unwrap();
        assert_eq!(bar.write(true, u32::MAX), None);
        assert_eq!(
            bar.write(false, 0xE000_0000),
            None,
            "high dword still probing"
        );
        assert_eq!(bar.write(true, 1), Some((0, 0x1_E000_0000)));
        assert_eq!(bar.address(), 0x1_E000_0000);
    }

    #[test]
    fn test_bar_write_unaligned_address_masked() {
        let mut bar = MemBar64::new(0, 32 << 20, false).unwrap();
        assert_eq!(bar.write(false, 0xE123_4567), Some((0, 0xE000_0000)));
        assert_eq!(bar.read(false), 0xE000_0000 | BAR_TYPE_MEM64);
    }

    #[test]
    fn test_bar_restore_unaligned_rejected() {
        let mut bar = MemBar64::new(0, 32 << 20, false).unwrap();
        assert!(bar.restore(0x1000).is_err());
        assert!(bar.restore(0xC200_0000).is_ok());
        assert_eq!(bar.read(false), 0xC200_0000 | BAR_TYPE_MEM64);
    }
}
