//! The deterministic guest workload the migration tests run across a snapshot, restore or live
//! migration: every step writes through the aperture, blits from guest RAM and fills, into
//! places that depend only on the step number, so an interrupted run can be compared bit for
//! bit with an uninterrupted one.

use vgpu_abi::cmd::{enc, BPP_32, ROP_PATCOPY, ROP_SRCCOPY};
use vgpu_abi::gtt::pte_guest;
use vgpu_abi::{Engine, PAGE_SIZE};
use vgpu_device::driver::Driver;

use crate::{Mapping, Vmm, RAM_GPA};

/// Bytes of local memory the workload touches (what [`aperture`] reads back).
pub const FOOTPRINT: usize = 0x400_0000;

/// Fills 64 pages of guest RAM with deterministic source data.
pub fn seed_ram(ram: &Mapping) {
    for p in 0..64u64 {
        let page: Vec<u8> = (0..PAGE_SIZE)
            .map(|i| ((i * 7 + p * 13) % 251).to_le_bytes()[0])
            .collect();
        ram.write(p * PAGE_SIZE, &page);
    }
}

/// Maps 64 hidden GM pages onto guest RAM and sets the blit ring up.
pub fn setup(d: &mut Driver<Vmm>) {
    let h = d.pv().hidden_base;
    for p in 0..64u64 {
        d.map_gm(h + p * PAGE_SIZE, pte_guest(RAM_GPA + p * PAGE_SIZE));
    }
    d.setup_ring(Engine::Blit).unwrap();
}

/// One step of the workload: a CPU write through the aperture, a blit from guest RAM and a
/// fill, all into places that depend only on `i`.
pub fn step(d: &mut Driver<Vmm>, i: u32) {
    let cpu: Vec<u8> = (0..PAGE_SIZE)
        .map(|b| (b ^ u64::from(i.wrapping_mul(31))).to_le_bytes()[0])
        .collect();
    d.lmem_write(0x200_0000 + u64::from(i) * PAGE_SIZE, &cpu);
    let src_gm = d.pv().hidden_base + u64::from(i % 64) * PAGE_SIZE;
    let copy = enc::src_copy_blt(enc::Copy {
        rop: ROP_SRCCOPY,
        bpp: BPP_32,
        dst: d.gm_of_lmem(0x100_0000 + u64::from(i) * PAGE_SIZE),
        dst_pitch: 256,
        src: src_gm,
        src_pitch: 256,
        width: 64,
        height: 16,
        pattern: 0,
    });
    let fill = enc::color_blt(
        ROP_PATCOPY,
        BPP_32,
        d.gm_of_lmem(0x300_0000 + u64::from(i) * 0x2000),
        512,
        128,
        16,
        0x0101_0101 * i,
    );
    d.submit(Engine::Blit, &[copy.as_slice(), &fill].concat())
        .unwrap();
}

/// The guest's local memory the workload touches, read through the aperture.
pub fn aperture(d: &mut Driver<Vmm>) -> Vec<u8> {
    let mut b = vec![0u8; FOOTPRINT];
    d.lmem_read(0, &mut b);
    b
}
