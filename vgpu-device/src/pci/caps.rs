//! The read-only image of the config header and the capability list.
//!
//! Chain: `0x34` -> MSI-X ([`CAP_MSIX_OFFSET`]) -> PCI Express v2 ([`CAP_PCIE_OFFSET`]) ->
//! vendor-specific ([`CAP_VENDOR_OFFSET`]) -> end. The guest-writable fields (command, BARs,
//! MSI-X enable / function mask, PCIe device control) are not in the image: `ConfigSpace` keeps
//! them and overlays them on reads.

use vgpu_abi::pci::{
    BAR_REGS, CAP_MSIX_OFFSET, CAP_PCIE_OFFSET, CAP_VENDOR_OFFSET, CLASS_CODE, DEVICE_ID,
    MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, MSIX_VECTORS, REVISION_ID, SUBSYSTEM_ID,
    SUBSYSTEM_VENDOR_ID, VENDOR_ID,
};
use vgpu_abi::regs::{PV_BASE, PV_END};

/// Size of the type-0 header plus capabilities (the PCI-compatible config space).
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Size of the PCI Express config space; bytes beyond [`CONFIG_SPACE_SIZE`] read 0.
pub const PCIE_CONFIG_SPACE_SIZE: usize = 4096;

/// Offset of the capabilities pointer in the header.
pub const CAPABILITIES_POINTER: u16 = 0x34;
/// Status register bit: a capability list is present.
pub const STATUS_CAP_LIST: u16 = 1 << 4;

/// Capability ID of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;
/// Capability ID of PCI Express.
pub const CAP_ID_PCIE: u8 = 0x10;
/// Capability ID of a vendor-specific capability.
pub const CAP_ID_VENDOR: u8 = 0x09;

/// MSI-X message control: MSI-X enable.
pub const MSIX_CTL_ENABLE: u16 = 1 << 15;
/// MSI-X message control: function mask.
pub const MSIX_CTL_FUNCTION_MASK: u16 = 1 << 14;
/// MSI-X message control bits the guest can write.
pub const MSIX_CTL_WRITABLE: u16 = MSIX_CTL_ENABLE | MSIX_CTL_FUNCTION_MASK;
/// MSI-X message control: table size minus one.
pub const MSIX_CTL_TABLE_SIZE: u16 = 0x07FF;
/// Length of the MSI-X capability.
const MSIX_CAP_LEN: u8 = 12;

/// Offset of the device control register in the PCI Express capability.
pub const PCIE_DEVCTL: u8 = 0x08;
/// Device control bits the guest can write (plain storage: the device has no errors to report,
/// no payload limits and no function-level reset, so bit 15 is read-only 0).
pub const PCIE_DEVCTL_WRITABLE: u16 = 0x7FFF;
/// Device control reset value: relaxed ordering, no-snoop, 512-byte max read request.
pub const PCIE_DEVCTL_RESET: u16 = 0x2810;
/// Length of the PCI Express v2 capability of an endpoint.
const PCIE_CAP_LEN: u8 = 0x3C;
/// Capabilities register: version 2, device/port type 0 (PCI Express endpoint).
const PCIE_FLAGS: u16 = 0x0002;
/// Device capabilities: 128-byte max payload, role-based error reporting, no FLR.
const PCIE_DEVCAP: u32 = 1 << 15;
/// Link capabilities and status: 8 GT/s (speed vector bit 2), x16.
const PCIE_LINK: u16 = 3 | (16 << 4);
/// Link capabilities 2: 2.5, 5 and 8 GT/s supported.
const PCIE_LNKCAP2: u32 = 0b1110;

/// Length of the vendor-specific capability.
pub const VENDOR_CAP_LEN: u8 = 16;
/// `cfg_type` of the vendor-specific capability: the PV info block.
pub const VENDOR_CFG_PV_INFO: u8 = 1;

// The capabilities must not overlap and must stay dword aligned (the writable fields are found
// by dword index).
const _: () = assert!(CAP_MSIX_OFFSET & 3 == 0 && CAP_PCIE_OFFSET & 3 == 0);
const _: () = assert!(CAP_VENDOR_OFFSET & 3 == 0 && CAP_MSIX_OFFSET >= 0x40);
const _: () = assert!(CAP_MSIX_OFFSET + MSIX_CAP_LEN <= CAP_PCIE_OFFSET);
const _: () = assert!(CAP_PCIE_OFFSET + PCIE_CAP_LEN <= CAP_VENDOR_OFFSET);
const _: () = assert!(CAP_VENDOR_OFFSET as usize + VENDOR_CAP_LEN as usize <= CONFIG_SPACE_SIZE);
const _: () = assert!(MSIX_TABLE_OFFSET <= u32::MAX as u64 && MSIX_TABLE_OFFSET & 7 == 0);
const _: () = assert!(MSIX_PBA_OFFSET <= u32::MAX as u64 && MSIX_PBA_OFFSET & 7 == 0);
const _: () = assert!(MSIX_VECTORS >= 1 && MSIX_VECTORS <= 2048 && BAR_REGS < 6);

/// MSI-X table offset register: offset in BAR0 with the BIR in bits 2:0.
#[allow(clippy::cast_possible_truncation)] // Checked by the assertions above.
pub const MSIX_TABLE_OFFSET_BIR: u32 = MSIX_TABLE_OFFSET as u32 | BAR_REGS as u32;
/// MSI-X PBA offset register: offset in BAR0 with the BIR in bits 2:0.
#[allow(clippy::cast_possible_truncation)] // Checked by the assertions above.
pub const MSIX_PBA_OFFSET_BIR: u32 = MSIX_PBA_OFFSET as u32 | BAR_REGS as u32;
/// BAR index as a byte, for the vendor capability.
#[allow(clippy::cast_possible_truncation)] // Checked by the assertions above.
const BAR_REGS_U8: u8 = BAR_REGS as u8;

/// Builds the 256-byte image of the header and capabilities, with the writable fields zero.
pub(super) fn image() -> [u32; CONFIG_SPACE_SIZE / 4] {
    let mut b = [0u8; CONFIG_SPACE_SIZE];
    put16(&mut b, 0x00, VENDOR_ID);
    put16(&mut b, 0x02, DEVICE_ID);
    put16(&mut b, 0x06, STATUS_CAP_LIST);
    put32(&mut b, 0x08, (CLASS_CODE << 8) | u32::from(REVISION_ID));
    // 0x0C: cache line, latency timer, header type 0 (single function), BIST: all 0.
    // 0x10..0x28: BARs (overlaid). 0x30: no expansion ROM.
    put16(&mut b, 0x2C, SUBSYSTEM_VENDOR_ID);
    put16(&mut b, 0x2E, SUBSYSTEM_ID);
    put8(&mut b, CAPABILITIES_POINTER.into(), CAP_MSIX_OFFSET);
    // 0x3C: interrupt line 0, interrupt pin 0 (no INTx).

    let msix = usize::from(CAP_MSIX_OFFSET);
    put8(&mut b, msix, CAP_ID_MSIX);
    put8(&mut b, msix + 1, CAP_PCIE_OFFSET);
    put16(&mut b, msix + 2, (MSIX_VECTORS - 1) & MSIX_CTL_TABLE_SIZE);
    put32(&mut b, msix + 4, MSIX_TABLE_OFFSET_BIR);
    put32(&mut b, msix + 8, MSIX_PBA_OFFSET_BIR);

    let pcie = usize::from(CAP_PCIE_OFFSET);
    put8(&mut b, pcie, CAP_ID_PCIE);
    put8(&mut b, pcie + 1, CAP_VENDOR_OFFSET);
    put16(&mut b, pcie + 0x02, PCIE_FLAGS);
    put32(&mut b, pcie + 0x04, PCIE_DEVCAP);
    // +0x08 device control (overlaid), +0x0A device status 0.
    put32(&mut b, pcie + 0x0C, u32::from(PCIE_LINK));
    // +0x10 link control 0.
    put16(&mut b, pcie + 0x12, PCIE_LINK);
    // +0x14..+0x24 slot and root registers: not an endpoint's. +0x24 device caps 2: 0.
    put32(&mut b, pcie + 0x2C, PCIE_LNKCAP2);
    put16(&mut b, pcie + 0x30, PCIE_LINK & 0xF); // Link control 2: target link speed.
    put16(&mut b, pcie + 0x32, 0);

    // Laid out like `struct virtio_pci_cap`: vndr, next, len, cfg_type, bar, id, pad[2],
    // offset, length.
    let vendor = usize::from(CAP_VENDOR_OFFSET);
    put8(&mut b, vendor, CAP_ID_VENDOR);
    put8(&mut b, vendor + 1, 0);
    put8(&mut b, vendor + 2, VENDOR_CAP_LEN);
    put8(&mut b, vendor + 3, VENDOR_CFG_PV_INFO);
    put8(&mut b, vendor + 4, BAR_REGS_U8);
    put32(&mut b, vendor + 8, PV_BASE);
    put32(&mut b, vendor + 12, PV_END - PV_BASE);

    let mut dwords = [0u32; CONFIG_SPACE_SIZE / 4];
    for (dw, bytes) in dwords.iter_mut().zip(b.chunks_exact(4)) {
        let mut le = [0u8; 4];
        le.copy_from_slice(bytes);
        *dw = u32::from_le_bytes(le);
    }
    dwords
}

fn put(b: &mut [u8], off: usize, bytes: &[u8]) {
    if let Some(dst) = b.get_mut(off..off + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

fn put8(b: &mut [u8], off: usize, v: u8) {
    put(b, off, &[v]);
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    put(b, off, &v.to_le_bytes());
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    put(b, off, &v.to_le_bytes());
}
