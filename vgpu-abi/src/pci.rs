//! PCI identity and BAR layout.

/// PCI vendor ID. `0x1de5` is not assigned to this project by the PCI-SIG; the device is a
/// software model and the pair (vendor, device) below only needs to be unique to its drivers.
pub const VENDOR_ID: u16 = 0x1de5;
/// PCI device ID.
pub const DEVICE_ID: u16 = 0x6770;
/// Subsystem vendor ID.
pub const SUBSYSTEM_VENDOR_ID: u16 = VENDOR_ID;
/// Subsystem ID.
pub const SUBSYSTEM_ID: u16 = 0x0001;
/// Revision ID.
pub const REVISION_ID: u8 = 0x01;
/// Class code: display controller (0x03), other (0x80), programming interface 0.
pub const CLASS_CODE: u32 = 0x03_80_00;

/// Index of the register BAR (64-bit, non-prefetchable memory; BAR0+BAR1 in config space).
pub const BAR_REGS: usize = 0;
/// Index of the aperture BAR (64-bit, prefetchable memory; BAR2+BAR3 in config space).
pub const BAR_APERTURE: usize = 2;

/// Size of BAR0: 32 MiB (registers, MSI-X, GGTT window).
pub const BAR0_SIZE: u64 = 32 << 20;
/// Offset of the register file in BAR0; it spans [`REGS_SIZE`] bytes.
pub const REGS_OFFSET: u64 = 0;
/// Size of the register file.
pub const REGS_SIZE: u64 = 0x1_0000;
/// Offset of the MSI-X table in BAR0 (its own 4 KiB page).
pub const MSIX_TABLE_OFFSET: u64 = 0x1_0000;
/// Offset of the MSI-X pending-bit array in BAR0 (its own 4 KiB page).
pub const MSIX_PBA_OFFSET: u64 = 0x1_1000;
/// Offset of the GGTT window in BAR0: entry `i` (8 bytes) maps GM page `i`.
pub const GGTT_OFFSET: u64 = 16 << 20;
/// Size of the GGTT window: 2 Mi entries of 8 bytes, covering [`GM_SIZE`].
pub const GGTT_SIZE: u64 = 16 << 20;
/// Size of the graphics-memory (GM) address space every vGPU sees: 8 GiB.
pub const GM_SIZE: u64 = (GGTT_SIZE / 8) * crate::PAGE_SIZE;
/// GM addresses below this bound are the mappable (low) half of GM, the rest is hidden GM.
pub const GM_MAPPABLE_END: u64 = GM_SIZE / 2;

/// Number of MSI-X vectors: one per engine (user interrupt, error, watchdog reset of that engine),
/// plus one for device events (GTT faults, display flips).
pub const MSIX_VECTORS: u16 = 5;
/// MSI-X vector raised for device-level events (see [`crate::regs::INTR_DEVICE`]).
pub const MSIX_VECTOR_DEVICE: u16 = 4;

/// Offset of the MSI-X capability in config space.
pub const CAP_MSIX_OFFSET: u8 = 0x40;
/// Offset of the PCI Express capability in config space.
pub const CAP_PCIE_OFFSET: u8 = 0x50;
/// Offset of the vendor-specific capability (points at the PV info block) in config space.
pub const CAP_VENDOR_OFFSET: u8 = 0x90;
