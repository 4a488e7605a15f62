//! The vGPU as a guest driver sees it: PCI function, registers, PV info, GGTT window, resets,
//! isolation between vGPUs.
#![allow(clippy::cast_possible_truncation, clippy::drop_non_drop)] // Test arithmetic on small known values.

mod common;

use common::*;
use vgpu_abi::gtt::{pte_guest, pte_local, PTE_VALID};
use vgpu_abi::{pci, regs, Engine, PAGE_SIZE};
use vgpu_device::driver::DeviceAccess;
use vgpu_device::vgpu::GttMode;
use vm_device::bus::MmioAddress;
use vm_device::MutDeviceMmio;

fn cfg_read32(v: &vgpu_device::vgpu::Vgpu, off: u16) -> u32 {
    let mut b = [0u8; 4];
    v.config_read(off, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn test_bar_sizing_like_a_vmm_gives_documented_sizes() {
    let mut phys = phys(256);
    for (name, lmem) in [("mini", 16u64 << 20), ("small", 64 << 20)] {
        let mut v = vgpu(&mut phys, name, GttMode::Shadow);
        let mut sizes = Vec::new();
        let mut bar = 0u16;
        while bar < 6 {
            let off = 0x10 + 4 * bar;
            let orig = cfg_read32(&v, off);
            v.config_write(off, &u32::MAX.to_le_bytes());
            let lo = cfg_read32(&v, off);
            v.config_write(off, &orig.to_le_bytes());
            if lo == 0 {
                sizes.push(0u64);
                bar += 1;
                continue;
            }
            let is64 = (lo >> 1) & 3 == 2;
            let mut mask = u64::from(lo & !0xF);
            if is64 {
                let orig_hi = cfg_read32(&v, off + 4);
                v.config_write(off + 4, &u32::MAX.to_le_bytes());
                mask |= u64::from(cfg_read32(&v, off + 4)) << 32;
                v.config_write(off + 4, &orig_hi.to_le_bytes());
            } else {
                mask |= 0xFFFF_FFFF_0000_0000;
            }
            sizes.push(!mask + 1);
            bar += if is64 { 2 } else { 1 };
        }
        assert_eq!(sizes, vec![pci::BAR0_SIZE, lmem, 0, 0], "profile {name}");
        assert_eq!(
            cfg_read32(&v, 0x10) & 0xF,
            0x4,
            "BAR0: 64-bit, non-prefetchable memory"
        );
        assert_eq!(
            cfg_read32(&v, 0x18) & 0xF,
            0xC,
            "BAR2: 64-bit, prefetchable memory"
        );
        assert_eq!(cfg_read32(&v, 0) & 0xFFFF, u32::from(pci::VENDOR_ID));
        assert_eq!(cfg_read32(&v, 8) >> 8, pci::CLASS_CODE);
    }
}

#[test]
fn test_probe_reads_identity_and_pv_block_of_partition() {
    let mut phys = phys(256);
    let _first = vgpu(&mut phys, "mini", GttMode::Shadow);
    let mut v = vgpu(&mut phys, "small", GttMode::Shadow);
    let part = v.shared().partition().info();
    let mut d = driver(&mut v);
    assert_eq!(d.read32(regs::VERSION), vgpu_abi::SPEC_VERSION);
    assert_eq!(d.read32(regs::CAPS), regs::CAPS_VALUE);
    let pv = d.pv();
    assert_eq!(pv.vgpu_id, part.id);
    assert_eq!(pv.mappable_base, part.mappable.start.raw());
    assert_eq!(pv.mappable_size, 64 << 20);
    assert_eq!(pv.hidden_base, part.hidden.start.raw());
    assert_eq!(pv.hidden_size, 192 << 20);
    assert_eq!(pv.lmem_size, 64 << 20);
    assert!(pv.hidden_base >= pci::GM_MAPPABLE_END);
    assert_eq!(d.read64(regs::PV_GM_SIZE), pci::GM_SIZE);
    assert_eq!(d.read32(regs::PV_MAGIC), regs::PV_MAGIC_VALUE);
}

#[test]
fn test_register_policies_passthrough_readonly_and_ignored() {
    let mut phys = phys(64);
    let mut v = vgpu(&mut phys, "mini", GttMode::Shadow);
    let mut d = driver(&mut v);
    d.write32(regs::SCRATCH0, 0xdead_beef);
    assert_eq!(d.read32(regs::SCRATCH0), 0xdead_beef);
    d.write32(regs::ID, 0);
    assert_eq!(
        d.read32(regs::ID),
        regs::ID_VALUE,
        "read-only register ignores writes"
    );
    d.write32(regs::PV_LMEM_SIZE, 1);
    assert_eq!(d.read64(regs::PV_LMEM_SIZE), 16 << 20);
    assert_eq!(d.read32(0x0ff0), u32::MAX, "unlisted offset reads all-ones");
    let mut b = [0u8; 2];
    d.device().bar0_read(u64::from(regs::SCRATCH0), &mut b);
    assert_eq!(b, [0xFF, 0xFF], "sub-dword access reads all-ones");
    let gpr = regs::engine_base(Engine::Compute) + regs::gpr(5);
    d.write32(gpr, 77);
    assert_eq!(d.read32(gpr), 77);
    drop(d);
    assert!(v.shared().bad_accesses() >= 3);
}

#[test]
fn test_ggtt_writes_outside_partition_are_dropped_counted_and_signalled() {
    let mut phys = phys(256);
    let mut a = vgpu(&mut phys, "mini", GttMode::Shadow);
    let b = vgpu(&mut phys, "mini", GttMode::Shadow);
    let b_gm = b.shared().partition().mappable.start.raw();
    let mut d = driver(&mut a);
    let before = d.gm_entry(d.pv().mappable_base);
    assert_eq!(
        before,
        pte_local(0),
        "reset mapping: mappable GM 1:1 onto local memory"
    );
    d.map_gm(b_gm, pte_local(0));
    assert_eq!(d.read32(regs::GTT_FAULT_COUNT), 1);
    assert_eq!(d.read64(regs::GTT_FAULT_ADDR_LO), b_gm);
    assert_ne!(d.read32(regs::INTR_STATUS) & regs::INTR_GTT_FAULT, 0);
    assert_eq!(d.gm_entry(b_gm), 0, "entries outside the partition read 0");
    // Local target beyond local memory, and reserved bits, are dropped too.
    let hidden = d.pv().hidden_base;
    d.map_gm(hidden, pte_local(16 << 20));
    d.map_gm(hidden, pte_local(0) | 1 << 7);
    assert_eq!(d.read32(regs::GTT_FAULT_COUNT), 3);
    assert_eq!(d.gm_entry(hidden), 0);
    drop(d);
    assert_eq!(
        b.shared().ggtt.read_entry(vgpu_device::addr::GmAddr(b_gm)),
        pte_local(0),
        "neighbour untouched"
    );
}

#[test]
fn test_ggtt_guest_memory_targets_checked_against_dma_map() {
    let mut phys = phys(64);
    let guest = Guest::new();
    let mut v = vgpu(&mut phys, "mini", GttMode::TwoDim);
    v.set_dma_map(guest.dma());
    let mut d = driver(&mut v);
    let hidden = d.pv().hidden_base;
    d.map_gm(hidden, pte_guest(RAM_GPA + 0x3000));
    assert_eq!(d.gm_entry(hidden), pte_guest(RAM_GPA + 0x3000));
    d.map_gm(hidden + PAGE_SIZE, pte_guest(RAM_GPA + RAM_SIZE));
    d.map_gm(hidden + PAGE_SIZE, pte_guest(0x1000));
    assert_eq!(d.read32(regs::GTT_FAULT_COUNT), 2);
    assert_eq!(d.gm_entry(hidden + PAGE_SIZE), 0);
    // Invalid entries are stored as written (they map nothing).
    d.map_gm(hidden + 2 * PAGE_SIZE, 0x1230);
    assert_eq!(d.gm_entry(hidden + 2 * PAGE_SIZE), 0x1230);
    assert_eq!(d.read32(regs::GTT_FAULT_COUNT), 2);
}

#[test]
fn test_ggtt_split_writes_commit_on_high_half() {
    let mut phys = phys(64);
    let mut v = vgpu(&mut phys, "mini", GttMode::Shadow);
    let mut d = driver(&mut v);
    let gm = d.pv().hidden_base + 5 * PAGE_SIZE;
    let e = pte_local(0x7000);
    let off = pci::GGTT_OFFSET + gm / PAGE_SIZE * 8;
    d.device()
        .bar0_write(off, &((e & 0xFFFF_FFFF) as u32).to_le_bytes());
    assert_eq!(d.gm_entry(gm), 0, "low half alone is only staged");
    d.device()
        .bar0_write(off + 4, &((e >> 32) as u32).to_le_bytes());
    assert_eq!(d.gm_entry(gm), e);
    assert_eq!(e & PTE_VALID, 1);
}

#[test]
fn test_device_reset_restores_registers_and_ggtt_keeps_lmem() {
    let mut phys = phys(64);
    let mut v = vgpu(&mut phys, "mini", GttMode::Shadow);
    let mut d = driver(&mut v);
    d.write32(regs::SCRATCH1, 5);
    d.lmem_write(0x100, &[1, 2, 3]);
    let m = d.pv().mappable_base;
    d.map_gm(m, pte_local(0x5000));
    d.write32(regs::RESET_CTL, regs::RESET_DEVICE);
    assert_eq!(d.read32(regs::SCRATCH1), 0);
    assert_eq!(d.read32(regs::INTR_MASK), u32::MAX);
    assert_eq!(d.gm_entry(m), pte_local(0));
    let mut b = [0u8; 3];
    d.lmem_read(0x100, &mut b);
    assert_eq!(b, [1, 2, 3]);
}

#[test]
fn test_mut_device_mmio_routes_by_bar_base_and_memory_enable() {
    let mut phys = phys(64);
    let mut v = vgpu(&mut phys, "mini", GttMode::Shadow);
    v.config_write(0x10, &0xe000_0000u32.to_le_bytes());
    v.config_write(0x14, &0u32.to_le_bytes());
    v.config_write(0x18, &0xc000_0000u32.to_le_bytes());
    v.config_write(0x1c, &0u32.to_le_bytes());
    let mut b = [0u8; 4];
    v.mmio_read(MmioAddress(0xe000_0000), u64::from(regs::ID), &mut b);
    assert_eq!(b, [0xFF; 4], "memory decoding disabled");
    let res = v.config_write(0x04, &0x6u16.to_le_bytes());
    assert_eq!(res.memory_enable, Some(true));
    v.mmio_read(MmioAddress(0xe000_0000), u64::from(regs::ID), &mut b);
    assert_eq!(u32::from_le_bytes(b), regs::ID_VALUE);
    v.mmio_write(MmioAddress(0xc000_0000), 0x40, &[9, 8, 7, 6]);
    v.mmio_read(MmioAddress(0xc000_0000), 0x40, &mut b);
    assert_eq!(b, [9, 8, 7, 6]);
    v.mmio_read(MmioAddress(0xd000_0000), 0, &mut b);
    assert_eq!(b, [0xFF; 4], "not a BAR of this device");
}

#[test]
fn test_released_memory_is_scrubbed_before_next_tenant() {
    let mut phys = phys(32);
    let mut a = vgpu(&mut phys, "mini", GttMode::Shadow);
    let secret = pattern(16 << 10, 7);
    a.bar2_write(0, &secret);
    a.bar2_write((16 << 20) - 4096, &secret[..4096]);
    let base_a = a.shared().lmem().host_base();
    let p = a.into_partition().ok().unwrap();
    phys.release(p).unwrap();
    let mut b = vgpu(&mut phys, "mini", GttMode::Shadow);
    assert_eq!(b.shared().lmem().host_base(), base_a, "same slice reused");
    let mut got = vec![0xAAu8; 16 << 10];
    b.bar2_read(0, &mut got);
    assert!(got.iter().all(|&x| x == 0), "new tenant sees zeros");
    b.bar2_read((16 << 20) - 4096, &mut got[..4096]);
    assert!(got[..4096].iter().all(|&x| x == 0));
    let _ = &mut b;
}
