//! Newtypes for the address spaces the device deals with. A bare `u64` never crosses a module
//! boundary as an address: each space has its own type, and arithmetic on guest-given values is
//! checked.

use vgpu_abi::PAGE_SIZE;

macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw value.
            pub const fn raw(self) -> u64 {
                self.0
            }
            /// `self + off`, or `None` on overflow.
            pub const fn checked_add(self, off: u64) -> Option<Self> {
                match self.0.checked_add(off) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }
            /// `self + off`; callers use it only where the sum is known not to overflow.
            pub const fn add(self, off: u64) -> Self {
                Self(self.0.wrapping_add(off))
            }
            /// The page number (`addr / PAGE_SIZE`).
            pub const fn page(self) -> u64 {
                self.0 / PAGE_SIZE
            }
            /// The offset inside the page.
            pub const fn page_offset(self) -> u64 {
                self.0 % PAGE_SIZE
            }
            /// The start of the page.
            pub const fn page_base(self) -> Self {
                Self(self.0 & !(PAGE_SIZE - 1))
            }
            /// Whether the address is page aligned.
            pub const fn is_page_aligned(self) -> bool {
                self.0 % PAGE_SIZE == 0
            }
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

address_type!(
    /// A guest-physical address: the VMM's DMA address space (guest RAM).
    Gpa
);
address_type!(
    /// A graphics-memory (GM) address: the global GTT's address space. A vGPU uses the same GM
    /// numbering as the physical GPU (XenGT "ballooning"), restricted to its partition.
    GmAddr
);
address_type!(
    /// An offset inside one vGPU's local memory, i.e. inside its BAR2 aperture.
    LmemOffset
);
address_type!(
    /// An offset inside the physical GPU's whole local memory (the memfd).
    HostLmemOffset
);
address_type!(
    /// An address as an engine context sees it: a GM address, or a PPGTT virtual address when the
    /// context has a PPGTT.
    GpuVa
);

/// A byte offset inside BAR0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegOffset(pub u32);

/// A half-open range `[start, start + size)` of graphics memory.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct GmRange {
    /// First address.
    pub start: GmAddr,
    /// Size in bytes.
    pub size: u64,
}

impl GmRange {
    /// Whether `addr` lies in the range.
    pub const fn contains(&self, addr: GmAddr) -> bool {
        addr.0 >= self.start.0 && addr.0 - self.start.0 < self.size
    }
    /// One past the last address.
    pub const fn end(&self) -> u64 {
        self.start.0 + self.size
    }
}

/// The low 32 bits of `v`.
#[allow(clippy::cast_possible_truncation)] // Masked to 32 bits first.
pub const fn lo32(v: u64) -> u32 {
    (v & 0xFFFF_FFFF) as u32
}

/// The high 32 bits of `v`.
#[allow(clippy::cast_possible_truncation)] // Shifted down to 32 bits first.
pub const fn hi32(v: u64) -> u32 {
    (v >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_address_page_helpers() {
        let a = GmAddr(0x1_2345);
        assert_eq!(a.page(), 0x12);
        assert_eq!(a.page_offset(), 0x345);
        assert_eq!(a.page_base(), GmAddr(0x1_2000));
        assert!(!a.is_page_aligned());
        assert_eq!(GmAddr(u64::MAX).checked_add(1), None);
    }

    #[test]
    fn test_gm_range_contains_is_half_open() {
        let r = GmRange {
            start: GmAddr(0x1000),
            size: 0x2000,
        };
        assert!(r.contains(GmAddr(0x1000)));
        assert!(r.contains(GmAddr(0x2fff)));
        assert!(!r.contains(GmAddr(0x3000)));
        assert!(!r.contains(GmAddr(0xfff)));
    }
}
