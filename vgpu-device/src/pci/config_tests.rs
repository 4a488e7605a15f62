use super::*;
use crate::pci::bar::{BAR_PREFETCHABLE, BAR_TYPE_MEM64};
use crate::pci::caps::{
    CAP_ID_MSIX, CAP_ID_PCIE, CAP_ID_VENDOR, MSIX_CTL_TABLE_SIZE, VENDOR_CAP_LEN,
    VENDOR_CFG_PV_INFO,
};
use vgpu_abi::pci::{
    CAP_VENDOR_OFFSET, CLASS_CODE, DEVICE_ID, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, MSIX_VECTORS,
    REVISION_ID, SUBSYSTEM_ID, SUBSYSTEM_VENDOR_ID, VENDOR_ID,
};
use vgpu_abi::regs::{PV_BASE, PV_END};

const LMEM: u64 = 256 << 20;

pub(crate) fn read32(cs: &ConfigSpace, off: u16) -> u32 {
    let mut b = [0u8; 4];
    cs.read(off, &mut b);
    u32::from_le_bytes(b)
}

pub(crate) fn read16(cs: &ConfigSpace, off: u16) -> u16 {
    let mut b = [0u8; 2];
    cs.read(off, &mut b);
    u16::from_le_bytes(b)
}

pub(crate) fn read8(cs: &ConfigSpace, off: u16) -> u8 {
    let mut b = [0u8; 1];
    cs.read(off, &mut b);
    b[0]
}

fn write32(cs: &mut ConfigSpace, off: u16, v: u32) -> ConfigWriteResult {
    cs.write(off, &v.to_le_bytes())
}

fn write16(cs: &mut ConfigSpace, off: u16, v: u16) -> ConfigWriteResult {
    cs.write(off, &v.to_le_bytes())
}

/// Sizes BAR `i` as a VMM / guest does: save, write all-ones, read back, restore.
fn probe_dword(cs: &mut ConfigSpace, i: u16) -> u32 {
    let off = 0x10 + 4 * i;
    let saved = read32(cs, off);
    assert!(
        write32(cs, off, u32::MAX).is_empty(),
        "a size probe moves nothing"
    );
    let mask = read32(cs, off);
    assert!(
        write32(cs, off, saved).is_empty(),
        "restoring after a probe moves nothing"
    );
    assert_eq!(read32(cs, off), saved);
    mask
}

/// Walks the capability list from 0x34; returns (offset, id) pairs.
pub(crate) fn cap_walk(cs: &ConfigSpace) -> Vec<(u8, u8)> {
    let mut caps = Vec::new();
    let mut ptr = read8(cs, 0x34);
    while ptr != 0 && caps.len() < 48 {
        caps.push((ptr, read8(cs, ptr.into())));
        ptr = read8(cs, u16::from(ptr) + 1);
    }
    caps
}

#[test]
fn test_bar_sizing_vmm_probe_gets_sizes_and_types() {
    let mut cs = ConfigSpace::new(LMEM).unwrap();
    // Give the BARs addresses first, as firmware would, so the probe must restore them.
    write32(&mut cs, 0x10, 0xC000_0000);
    write32(&mut cs, 0x18, 0x8000_0000);
    write32(&mut cs, 0x1C, 0x4);
    let masks: Vec<u32> = (0..6).map(|i| probe_dword(&mut cs, i)).collect();

    let lo0 = masks[0];
    assert_eq!(
        lo0 & 0xF,
        BAR_TYPE_MEM64,
        "BAR0: 64-bit, non-prefetchable memory"
    );
    let size0 = !((u64::from(masks[1]) << 32) | u64::from(lo0 & !0xF)) + 1;
    assert_eq!(size0, BAR0_SIZE);
    assert_eq!(size0, 32 << 20);

    let lo2 = masks[2];
    assert_eq!(
        lo2 & 0xF,
        BAR_TYPE_MEM64 | BAR_PREFETCHABLE,
        "BAR2: 64-bit prefetchable"
    );
    let size2 = !((u64::from(masks[3]) << 32) | u64::from(lo2 & !0xF)) + 1;
    assert_eq!(size2, LMEM);

    assert_eq!(masks[4], 0, "BAR4 unused");
    assert_eq!(masks[5], 0, "BAR5 unused");
    assert_eq!(read32(&cs, 0x30), 0, "no expansion ROM");
    assert_eq!(cs.bar_address(BAR_REGS), Some(0xC000_0000));
    assert_eq!(cs.bar_address(BAR_APERTURE), Some(0x4_8000_0000));
    assert_eq!(cs.bar_size(BAR_REGS), Some(BAR0_SIZE));
    assert_eq!(cs.bar_size(BAR_APERTURE), Some(LMEM));
    assert_eq!(cs.bar_size(4), None);
    assert_eq!(cs.bar_address(1), None);
}

#[test]
fn test_config_new_bad_bar2_size_rejected() {
    for size in [0, 4095, 3 << 20, (1 << 40) + 4096] {
        assert_eq!(
            ConfigSpace::new(size).unwrap_err(),
            PciError::InvalidBarSize {
                bar: BAR_APERTURE,
                size
            }
        );
    }
}

#[test]
fn test_header_ids_match_abi() {
    let cs = ConfigSpace::new(LMEM).unwrap();
    assert_eq!(read16(&cs, 0x00), VENDOR_ID);
    assert_eq!(read16(&cs, 0x02), DEVICE_ID);
    assert_eq!(read8(&cs, 0x08), REVISION_ID);
    assert_eq!(read32(&cs, 0x08) >> 8, CLASS_CODE);
    assert_eq!(read8(&cs, 0x0E), 0, "header type 0, single function");
    assert_eq!(read16(&cs, 0x2C), SUBSYSTEM_VENDOR_ID);
    assert_eq!(read16(&cs, 0x2E), SUBSYSTEM_ID);
    assert_eq!(read8(&cs, 0x3D), 0, "no INTx pin");
    assert_eq!(read16(&cs, 0x06), caps::STATUS_CAP_LIST);
}

#[test]
fn test_cap_walk_from_0x34_finds_msix_pcie_vendor_and_ends() {
    let cs = ConfigSpace::new(LMEM).unwrap();
    assert_eq!(
        cap_walk(&cs),
        vec![
            (CAP_MSIX_OFFSET, CAP_ID_MSIX),
            (CAP_PCIE_OFFSET, CAP_ID_PCIE),
            (CAP_VENDOR_OFFSET, CAP_ID_VENDOR)
        ]
    );
    // Extended capability walk ends at once.
    assert_eq!(read32(&cs, 0x100), 0);
    assert_eq!(read32(&cs, 0xFFC), 0);
}

#[test]
fn test_cap_msix_fields_decode_to_abi_constants() {
    let cs = ConfigSpace::new(LMEM).unwrap();
    let msix = u16::from(CAP_MSIX_OFFSET);
    assert_eq!(
        (read16(&cs, msix + 2) & MSIX_CTL_TABLE_SIZE) + 1,
        MSIX_VECTORS
    );
    let table = read32(&cs, msix + 4);
    assert_eq!(table & 7, 0, "table BIR is BAR0");
    assert_eq!(u64::from(table & !7), MSIX_TABLE_OFFSET);
    let pba = read32(&cs, msix + 8);
    assert_eq!(pba & 7, 0, "PBA BIR is BAR0");
    assert_eq!(u64::from(pba & !7), MSIX_PBA_OFFSET);
}

#[test]
fn test_cap_pcie_and_vendor_fields_plausible() {
    let cs = ConfigSpace::new(LMEM).unwrap();
    let pcie = u16::from(CAP_PCIE_OFFSET);
    let flags = read16(&cs, pcie + 2);
    assert_eq!(flags & 0xF, 2, "capability version 2");
    assert_eq!((flags >> 4) & 0xF, 0, "PCI Express endpoint");
    assert_eq!(read16(&cs, pcie + 8), PCIE_DEVCTL_RESET);
    assert_ne!(read32(&cs, pcie + 0x0C), 0, "link capabilities present");

    let vendor = u16::from(CAP_VENDOR_OFFSET);
    assert_eq!(read8(&cs, vendor + 2), VENDOR_CAP_LEN);
    assert_eq!(read8(&cs, vendor + 3), VENDOR_CFG_PV_INFO);
    assert_eq!(usize::from(read8(&cs, vendor + 4)), BAR_REGS);
    assert_eq!(read32(&cs, vendor + 8), PV_BASE);
    assert_eq!(read32(&cs, vendor + 12), PV_END - PV_BASE);
}

#[test]
fn test_command_write_changes_bits_reports_intents() {
    let mut cs = ConfigSpace::new(LMEM).unwrap();
    let r = write16(&mut cs, 0x04, 0xFFFF);
    assert_eq!(r.memory_enable, Some(true));
    assert_eq!(r.bus_master, Some(true));
    assert_eq!(
        read16(&cs, 0x04),
        COMMAND_WRITABLE,
        "only bits 1, 2, 10 stick"
    );
    assert!(cs.memory_enabled() && cs.bus_master_enabled());

    assert!(
        write16(&mut cs, 0x04, 0xFFFF).is_empty(),
        "no change, no intent"
    );
    let r = cs.write(0x04, &[COMMAND_BUS_MASTER.to_le_bytes()[0]]);
    assert_eq!((r.memory_enable, r.bus_master), (Some(false), None));
    assert_eq!(read16(&cs, 0x04), COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE);
}

#[test]
fn test_status_write_ignored_cap_bit_stays() {
    let mut cs = ConfigSpace::new(LMEM).unwrap();
    write16(&mut cs, 0x06, 0xFFFF);
    write32(&mut cs, 0x04, 0);
    assert_eq!(read16(&cs, 0x06), caps::STATUS_CAP_LIST);
}

#[test]
fn test_bar_write_new_address_reports_move_per_dword() {
    let mut cs = ConfigSpace::new(LMEM).unwrap();
    let r = write32(&mut cs, 0x10, 0xE000_0000);
    assert_eq!(
        r.bar_moves,
        vec![BarMove {
            bar: BAR_REGS,
            old: 0,
            new: 0xE000_0000
        }]
    );
    let r = write32(&mut cs, 0x14, 0x1);
    assert_eq!(
        r.bar_moves,
        vec![BarMove {
            bar: BAR_REGS,
            old: 0xE000_0000,
            new: 0x1_E000_0000
        }]
    );
    assert!(
        write32(&mut cs, 0x14, 0x1).bar_moves.is_empty(),
        "same address"
    );
    let r = write32(&mut cs, 0x18, 0x1000_0000);
    assert_eq!(
        r.bar_moves,
        vec![BarMove {
            bar: BAR_APERTURE,
            old: 0,
            new: 0x1000_0000
        }]
    );
    assert_eq!(cs.bar_address(BAR_REGS), Some(0x1_E000_0000));
    assert!(
        write32(&mut cs, 0x20, 0xF000_0000).is_empty(),
        "BAR4 unused"
    );
    assert_eq!(read32(&cs, 0x20), 0);
}

#[test]
fn test_read_only_fields_write_ignored() {
    let mut cs = ConfigSpace::new(LMEM).unwrap();
    for off in (0x00..0x04).chain(0x08..0x10).chain(0x28..0x40) {
        cs.write(off, &[0x5A]);
    }
    write32(&mut cs, 0x00, 0);
    write32(&mut cs, 0x08, 0);
    write32(&mut cs, 0x0C, 0xFFFF_FFFF);
    assert_eq!(read16(&cs, 0x00), VENDOR_ID);
    assert_eq!(read16(&cs, 0x02), DEVICE_ID);
    assert_eq!(read32(&cs, 0x08) >> 8, CLASS_CODE);
    assert_eq!(read8(&cs, 0x0E), 0);
    assert_eq!(read8(&cs, 0x34), CAP_MSIX_OFFSET);
    assert_eq!(read32(&cs, 0x30), 0);
    assert_eq!(read32(&cs, 0x3C), 0);
}

#[test]
fn test_msix_control_write_only_enable_and_mask_stick() {
    let mut cs = ConfigSpace::new(LMEM).unwrap();
    let msix = u16::from(CAP_MSIX_OFFSET);
    let r = write16(&mut cs, msix + 2, 0xFFFF);
    assert_eq!(
        r.msix,
        Some(MsixControl {
            enabled: true,
            function_masked: true
        })
    );
    assert_eq!(
        read16(&cs, msix + 2),
        MSIX_CTL_WRITABLE | (MSIX_VECTORS - 1)
    );
    assert_eq!(read8(&cs, msix), CAP_ID_MSIX, "ID survives");
    let r = cs.write(msix + 3, &[0x80]);
    assert_eq!(
        r.msix,
        Some(MsixControl {
            enabled: true,
            function_masked: false
        })
    );
    assert!(cs.msix_enabled() && !cs.msix_function_masked());
    assert!(cs.write(msix + 3, &[0x80]).is_empty());
    write32(&mut cs, msix + 4, 0);
    assert_eq!(
        u64::from(read32(&cs, msix + 4)),
        MSIX_TABLE_OFFSET,
        "table offset read-only"
    );
}

#[test]
fn test_pcie_devctl_writable_bits_stored() {
    let mut cs = ConfigSpace::new(LMEM).unwrap();
    let devctl = u16::from(CAP_PCIE_OFFSET) + u16::from(PCIE_DEVCTL);
    assert!(write16(&mut cs, devctl, 0xFFFF).is_empty());
    assert_eq!(read16(&cs, devctl), PCIE_DEVCTL_WRITABLE);
    write32(&mut cs, devctl, 0xFFFF_0000);
    assert_eq!(
        read32(&cs, devctl),
        0,
        "device status read-only, no RW1C bits"
    );
    let devcap = u16::from(CAP_PCIE_OFFSET) + 4;
    let before = read32(&cs, devcap);
    write32(&mut cs, devcap, !before);
    assert_eq!(read32(&cs, devcap), before, "device capabilities read-only");
}

#[test]
fn test_bad_access_reads_ones_drops_write_counts() {
    let mut cs = ConfigSpace::new(LMEM).unwrap();
    let mut b = [0u8; 4];
    cs.read(0x02, &mut b);
    assert_eq!(b, [0xFF; 4], "unaligned dword");
    let mut b3 = [0u8; 3];
    cs.read(0x00, &mut b3);
    assert_eq!(b3, [0xFF; 3], "3-byte access");
    cs.read(0x1000, &mut b);
    assert_eq!(b, [0xFF; 4], "beyond 4 KiB");
    assert!(cs.write(0x05, &[0xFF, 0xFF]).is_empty());
    assert!(cs.write(0x04, &[0xFF; 8]).is_empty());
    assert!(cs.write(0x04, &[]).is_empty());
    assert_eq!(read16(&cs, 0x04), 0);
    assert_eq!(cs.bad_accesses(), 6);
    assert!(
        cs.write(0x200, &[0xFF; 4]).is_empty(),
        "extended space: dropped, not bad"
    );
    assert_eq!(cs.bad_accesses(), 6);
}

#[test]
fn test_state_round_trip_restores_equal() {
    let mut cs = ConfigSpace::new(LMEM).unwrap();
    write32(&mut cs, 0x10, 0xE000_0000);
    write32(&mut cs, 0x1C, 0x2);
    write16(&mut cs, 0x04, COMMAND_MEMORY | COMMAND_BUS_MASTER);
    write16(&mut cs, u16::from(CAP_MSIX_OFFSET) + 2, MSIX_CTL_ENABLE);
    let state = cs.state();
    let restored = ConfigSpace::from_state(LMEM, &state).unwrap();
    assert_eq!(restored.state(), state);
    assert_eq!(restored.bar_address(BAR_APERTURE), Some(0x2_0000_0000));
    assert!(restored.memory_enabled() && restored.msix_enabled());
    for off in (0..0x100).step_by(4) {
        assert_eq!(read32(&restored, off), read32(&cs, off), "offset {off:#x}");
    }
    // Mutate, then restore: the snapshot wins.
    write32(&mut cs, 0x10, 0);
    let again = ConfigSpace::from_state(LMEM, &state).unwrap();
    assert_eq!(again.state(), state);
}

#[test]
fn test_state_bad_values_rejected() {
    let good = ConfigSpace::new(LMEM).unwrap().state();
    let cases = [
        ConfigSpaceState {
            bar0_address: 0x1000,
            ..good.clone()
        },
        ConfigSpaceState {
            bar2_address: LMEM / 2,
            ..good.clone()
        },
        ConfigSpaceState {
            bar2_size: LMEM * 2,
            ..good.clone()
        },
        ConfigSpaceState {
            command: 0x0001,
            ..good.clone()
        },
        ConfigSpaceState {
            msix_control: 0x0004,
            ..good.clone()
        },
        ConfigSpaceState {
            pcie_device_control: 0x8000,
            ..good.clone()
        },
    ];
    for bad in &cases {
        assert!(ConfigSpace::from_state(LMEM, bad).is_err(), "{bad:?}");
    }
    assert!(matches!(
        ConfigSpace::from_state(LMEM, &cases[0]),
        Err(PciError::UnalignedBarAddress { bar: 0, .. })
    ));
    assert!(ConfigSpace::from_state(LMEM, &good).is_ok());
}
