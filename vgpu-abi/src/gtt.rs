//! Graphics translation table formats: GGTT entries and PPGTT tables.
//!
//! Both use the same 64-bit little-endian entry:
//!
//! | bits   | field                                                                   |
//! |--------|-------------------------------------------------------------------------|
//! | 0      | [`PTE_VALID`]                                                            |
//! | 1      | [`PTE_LOCAL`]: address is a local-memory (BAR2) offset, else guest-physical |
//! | 2      | [`PTE_READ_ONLY`]: engine writes through this entry fault                |
//! | 3..=11 | reserved, must be 0                                                      |
//! | 12..=47| page address ([`PTE_ADDR_MASK`])                                         |
//! | 48..=63| reserved, must be 0                                                      |

/// The entry maps a page.
pub const PTE_VALID: u64 = 1 << 0;
/// The page is in the vGPU's local memory; the address is an offset into the BAR2 aperture.
/// Without this bit the address is a guest-physical address of guest RAM.
pub const PTE_LOCAL: u64 = 1 << 1;
/// Engine writes through this entry fault (the context enters the error state).
pub const PTE_READ_ONLY: u64 = 1 << 2;
/// Bits holding the page address.
pub const PTE_ADDR_MASK: u64 = 0x0000_FFFF_FFFF_F000;
/// Bits that must be zero in a valid entry.
pub const PTE_RESERVED_MASK: u64 = !(PTE_ADDR_MASK | PTE_VALID | PTE_LOCAL | PTE_READ_ONLY);

/// Where a translation entry points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PteTarget {
    /// Offset of a page in the vGPU's local memory.
    Local(u64),
    /// Guest-physical address of a page of guest RAM.
    GuestPhys(u64),
}

/// A decoded translation entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pte {
    /// The page the entry points to.
    pub target: PteTarget,
    /// Engine writes fault.
    pub read_only: bool,
}

/// Why a raw entry does not decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PteError {
    /// [`PTE_VALID`] is clear.
    NotPresent,
    /// A reserved bit is set.
    ReservedBits,
}

impl Pte {
    /// Decodes a raw entry.
    pub const fn decode(raw: u64) -> Result<Pte, PteError> {
        if raw & PTE_VALID == 0 {
            return Err(PteError::NotPresent);
        }
        if raw & PTE_RESERVED_MASK != 0 {
            return Err(PteError::ReservedBits);
        }
        let addr = raw & PTE_ADDR_MASK;
        let target = if raw & PTE_LOCAL != 0 {
            PteTarget::Local(addr)
        } else {
            PteTarget::GuestPhys(addr)
        };
        Ok(Pte {
            target,
            read_only: raw & PTE_READ_ONLY != 0,
        })
    }

    /// Encodes the entry (with [`PTE_VALID`] set). `addr` is truncated to its page.
    pub const fn encode(self) -> u64 {
        let (addr, local) = match self.target {
            PteTarget::Local(a) => (a, PTE_LOCAL),
            PteTarget::GuestPhys(a) => (a, 0),
        };
        let ro = if self.read_only { PTE_READ_ONLY } else { 0 };
        (addr & PTE_ADDR_MASK) | local | ro | PTE_VALID
    }
}

/// A valid, writable entry for local-memory offset `off`.
pub const fn pte_local(off: u64) -> u64 {
    Pte {
        target: PteTarget::Local(off),
        read_only: false,
    }
    .encode()
}

/// A valid, writable entry for guest-physical address `gpa`.
pub const fn pte_guest(gpa: u64) -> u64 {
    Pte {
        target: PteTarget::GuestPhys(gpa),
        read_only: false,
    }
    .encode()
}

/// Number of PPGTT levels. Level 4 is the root, level 1 maps pages.
pub const PPGTT_LEVELS: u32 = 4;
/// Entries per PPGTT table (one 4 KiB page of 8-byte entries).
pub const PPGTT_ENTRIES: u64 = 512;
/// Width of a PPGTT virtual address in bits.
pub const PPGTT_VA_BITS: u32 = 48;

/// Index into the level-`level` table (1..=4) for virtual address `va`.
pub const fn ppgtt_index(va: u64, level: u32) -> u64 {
    (va >> (crate::PAGE_SHIFT + 9 * (level - 1))) & (PPGTT_ENTRIES - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_pte_roundtrip_local_and_guest() {
        let p = Pte {
            target: PteTarget::Local(0x1234_5000),
            read_only: true,
        };
        assert_eq!(Pte::decode(p.encode()), Ok(p));
        assert_eq!(
            Pte::decode(pte_guest(0x8000)).unwrap().target,
            PteTarget::GuestPhys(0x8000)
        );
    }

    #[test]
    fn test_pte_decode_rejects_reserved_and_invalid() {
        assert_eq!(
            Pte::decode(pte_guest(0x8000) | 1 << 5),
            Err(PteError::ReservedBits)
        );
        assert_eq!(
            Pte::decode(pte_guest(0x8000) | 1 << 60),
            Err(PteError::ReservedBits)
        );
        assert_eq!(Pte::decode(0x8000), Err(PteError::NotPresent));
    }

    #[test]
    fn test_ppgtt_index_levels() {
        let va = (3 << 39) | (5 << 30) | (7 << 21) | (9 << 12) | 0x123;
        assert_eq!(ppgtt_index(va, 4), 3);
        assert_eq!(ppgtt_index(va, 3), 5);
        assert_eq!(ppgtt_index(va, 2), 7);
        assert_eq!(ppgtt_index(va, 1), 9);
    }
}
