//! PCI configuration mechanism #1 (ports 0xCF8/0xCFC), enumeration of bus 0, BAR sizing and
//! assignment, and the capability list.

use crate::boot_info::{PCI_CONFIG_ADDRESS, PCI_CONFIG_DATA};
use crate::cpu;

/// A function on bus 0.
#[derive(Clone, Copy, Debug)]
pub struct Function {
    /// Device number (0–31).
    pub dev: u8,
}

impl Function {
    fn address(self, offset: u8) -> u32 {
        0x8000_0000 | u32::from(self.dev) << 11 | u32::from(offset & 0xFC)
    }

    /// Reads the config dword at `offset` (rounded down to a dword).
    pub fn read32(self, offset: u8) -> u32 {
        cpu::outl(PCI_CONFIG_ADDRESS, self.address(offset));
        cpu::inl(PCI_CONFIG_DATA)
    }

    /// Writes the config dword at `offset`.
    pub fn write32(self, offset: u8, v: u32) {
        cpu::outl(PCI_CONFIG_ADDRESS, self.address(offset));
        cpu::outl(PCI_CONFIG_DATA, v);
    }

    /// Reads the 16-bit field at `offset` (2-byte aligned).
    pub fn read16(self, offset: u8) -> u16 {
        let dw = self.read32(offset);
        (dw >> (8 * u32::from(offset & 2)) & 0xFFFF) as u16
    }

    /// Vendor and device ID.
    pub fn ids(self) -> (u16, u16) {
        let v = self.read32(0);
        ((v & 0xFFFF) as u16, (v >> 16) as u16)
    }

    /// The offset of capability `id`, walking the list from 0x34.
    pub fn find_capability(self, id: u8) -> Option<u8> {
        let mut ptr = (self.read32(0x34) & 0xFC) as u8;
        let mut hops = 0;
        while ptr != 0 && hops < 48 {
            let hdr = self.read32(ptr);
            if (hdr & 0xFF) as u8 == id {
                return Some(ptr);
            }
            ptr = ((hdr >> 8) & 0xFC) as u8;
            hops += 1;
        }
        None
    }

    /// Sizes the 64-bit memory BAR at `bar` (index 0–5) the usual way: write all ones to both
    /// halves, read back, restore. Returns (size, flag bits 3..0). Memory decoding must be off.
    pub fn size_bar64(self, bar: u8) -> (u64, u32) {
        let off = 0x10 + 4 * bar;
        let (lo, hi) = (self.read32(off), self.read32(off + 4));
        self.write32(off, u32::MAX);
        self.write32(off + 4, u32::MAX);
        let mask = u64::from(self.read32(off + 4)) << 32 | u64::from(self.read32(off) & !0xF);
        self.write32(off, lo);
        self.write32(off + 4, hi);
        ((!mask).wrapping_add(1), lo & 0xF)
    }

    /// Programs the 64-bit memory BAR at `bar` with `addr`.
    pub fn set_bar64(self, bar: u8, addr: u64) {
        let off = 0x10 + 4 * bar;
        let flags = self.read32(off) & 0xF;
        self.write32(off, (addr & 0xFFFF_FFF0) as u32 | flags);
        self.write32(off + 4, (addr >> 32) as u32);
    }

    /// The address programmed in the 64-bit memory BAR at `bar`.
    pub fn bar64(self, bar: u8) -> u64 {
        let off = 0x10 + 4 * bar;
        u64::from(self.read32(off + 4)) << 32 | u64::from(self.read32(off) & !0xF)
    }
}

/// Calls `f` for every present function on bus 0 (single-function devices).
pub fn for_each_device(mut f: impl FnMut(Function)) {
    for dev in 0..32 {
        let func = Function { dev };
        if func.ids().0 != 0xFFFF {
            f(func);
        }
    }
}
