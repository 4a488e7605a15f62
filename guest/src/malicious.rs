//! The hostile guest: attacks its own vGPU and passes only if every attack is refused with the
//! reason the manual gives, and the context works again after recovery.

use vgpu_abi::cmd::{enc, AuditReason, BPP_32, ROP_PATCOPY, XY_COLOR_BLT};
use vgpu_abi::gtt::pte_guest;
use vgpu_abi::pci::{GM_MAPPABLE_END, GM_SIZE, MSIX_VECTOR_DEVICE};
use vgpu_abi::{regs, Engine};

use crate::vgpu::{Vgpu, WAIT_MS};
use crate::{check, cpu, fail, println};

/// Bytes the hostile blit covers (64 rows of 256 bytes).
const SPAN: u64 = 64 * 256;

/// A GM range of SPAN bytes that lies entirely outside the vGPU's partition.
fn outside(v: &Vgpu) -> u64 {
    let p = v.pv;
    let mappable_end = p.mappable_base + p.mappable_size;
    let hidden_end = p.hidden_base + p.hidden_size;
    if mappable_end + SPAN <= GM_MAPPABLE_END {
        mappable_end
    } else if p.mappable_base >= SPAN {
        p.mappable_base - SPAN
    } else if hidden_end + SPAN <= GM_SIZE {
        hidden_end
    } else if p.hidden_base >= GM_MAPPABLE_END + SPAN {
        p.hidden_base - SPAN
    } else {
        fail!(0x300, "the partition covers all of GM")
    }
}

/// Waits for the error interrupt of engine `e` and checks the error registers.
fn expect_error(v: &Vgpu, e: Engine, seen: u64, reason: AuditReason, header: u32, what: &str) {
    let b = regs::engine_base(e);
    check!(
        cpu::wait_irq(v.engine_vector(e), seen, WAIT_MS),
        0x310,
        "{}: no error interrupt (INTR_STATUS {:#x})",
        what,
        v.read32(regs::INTR_STATUS)
    );
    let status = v.read32(regs::INTR_STATUS);
    let code = v.read32(b + regs::ERROR_CODE);
    check!(
        status & regs::intr_error(e) != 0
            && v.read32(b + regs::ENGINE_STATUS) & regs::ENGINE_STATUS_ERROR != 0,
        0x311,
        "{}: INTR_STATUS {:#x}, ENGINE_STATUS {:#x}",
        what,
        status,
        v.read32(b + regs::ENGINE_STATUS)
    );
    check!(
        code == reason as u32 && v.read32(b + regs::ERROR_HEADER) == header,
        0x312,
        "{}: ERROR_CODE {} header {:#x}, expected {} ({}) header {:#x}",
        what,
        code,
        v.read32(b + regs::ERROR_HEADER),
        reason as u32,
        reason.name(),
        header
    );
    v.write32(regs::INTR_STATUS, regs::intr_error(e));
    println!(
        "vgpu{}: {} refused: {} at {:#x}",
        v.index,
        what,
        reason.name(),
        v.read64(b + regs::ERROR_ADDR_LO)
    );
}

/// Runs the attacks on `v`.
pub fn run(v: &mut Vgpu) {
    check!(v.has(Engine::Blit), 0x301, "profile without a blit engine");
    let target = outside(v);

    // 1. A GGTT write outside the partition: dropped, counted, GTT-fault interrupt.
    let faults = v.read32(regs::GTT_FAULT_COUNT);
    let dev_vec = v.vector(MSIX_VECTOR_DEVICE);
    let seen = cpu::irq_count(dev_vec);
    v.map_gm(target, pte_guest(v.scratch()));
    check!(
        cpu::wait_irq(dev_vec, seen, WAIT_MS),
        0x320,
        "no GTT-fault interrupt"
    );
    let fault_addr = v.read64(regs::GTT_FAULT_ADDR_LO);
    check!(
        v.read32(regs::GTT_FAULT_COUNT) == faults + 1
            && fault_addr == target
            && v.gm_entry(target) == 0
            && v.read32(regs::INTR_STATUS) & regs::INTR_GTT_FAULT != 0,
        0x321,
        "GGTT write outside the partition: fault count {}, address {:#x}, entry {:#x}",
        v.read32(regs::GTT_FAULT_COUNT),
        fault_addr,
        v.gm_entry(target)
    );
    v.write32(regs::INTR_STATUS, regs::INTR_GTT_FAULT);
    println!("vgpu{}: GGTT write at GM {:#x} dropped", v.index, target);

    // 2. A blit into GM outside the partition: the scanner rejects the whole submission.
    let e = Engine::Blit;
    let b = regs::engine_base(e);
    let head = v.read32(b + regs::RING_HEAD);
    let seen = cpu::irq_count(v.engine_vector(e));
    let fill = enc::color_blt(ROP_PATCOPY, BPP_32, target, 256, 64, 64, 0xDEAD_BEEF);
    v.submit(e, &[&fill, &enc::user_interrupt()]);
    let header = vgpu_abi::cmd::header(vgpu_abi::cmd::Client::Blt, XY_COLOR_BLT, 0, 6);
    expect_error(
        v,
        e,
        seen,
        AuditReason::AddressOutOfRange,
        header,
        "blit outside the partition",
    );
    check!(
        v.read32(b + regs::RING_HEAD) == head,
        0x330,
        "RING_HEAD moved past a rejected submission"
    );

    // 3. A register load outside the whitelist (the reset register).
    v.enable_ring(e);
    let seen = cpu::irq_count(v.engine_vector(e));
    let lri = enc::load_register_imm(regs::RESET_CTL, regs::RESET_DEVICE);
    v.submit(e, &[&lri]);
    expect_error(
        v,
        e,
        seen,
        AuditReason::ForbiddenRegister,
        lri[0],
        "LRI of RESET_CTL",
    );

    // 4. Recovery: re-enable the ring; real work runs again.
    v.enable_ring(e);
    let off = 0x1_0000u64;
    let colour = 0x0012_3456;
    let fill = enc::color_blt(ROP_PATCOPY, BPP_32, v.lmem_gm(off), 128, 32, 32, colour);
    v.run(e, &[&fill], "fill after recovery");
    for i in 0..32 * 32u64 {
        // SAFETY: local memory through the aperture, inside the partition.
        let got = unsafe { core::ptr::read_volatile(v.lmem_ptr::<u32>(off + 4 * i)) };
        check!(
            got == colour,
            0x340,
            "pixel {} after recovery: {:#x}",
            i,
            got
        );
    }
    println!("vgpu{}: every attack refused, context recovered", v.index);
}
