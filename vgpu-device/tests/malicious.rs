//! Malicious command streams (section 9 of the manual). Each attack runs in vGPU A while its
//! neighbour B, on the same physical GPU, has a known blit workload executed before and queued
//! across the attack. For every attack, in both GTT modes: A's engine enters the error state
//! with the right `ERROR_CODE` (and, where the manual pins them, `ERROR_HEADER`/`ERROR_ADDR`),
//! one audit event is recorded, nothing of the rejected submission ran (a fence placed before
//! the bad command stays unwritten), B's memory is untouched and its results are bit-exact,
//! and A works again after its ring is re-enabled.

// Test arithmetic on small, known values.
#![allow(clippy::cast_possible_truncation)]

mod common;

use common::*;
use vgpu_abi::cmd::{enc, header, AuditReason, Client};
use vgpu_abi::cmd::{BPP_32, BPP_8, ROP_PATCOPY, ROP_SRCCOPY, ROP_SRCINVERT};
use vgpu_abi::gtt::{pte_guest, pte_local, PTE_READ_ONLY};
use vgpu_abi::{cmd, regs, Engine, PAGE_SIZE};
use vgpu_device::driver::{ring_lmem_offset, DeviceAccess, PvInfo};
use vgpu_device::vgpu::GttMode;

/// What an attack knows and where its commands land.
struct Ctx {
    a: PvInfo,
    b: PvInfo,
    /// GM address of A's fence page.
    fence: u64,
    /// GM address of the first attack command in A's ring (after the fence command).
    at: u64,
}

/// The attack commands (after the fence) and the error registers the manual pins for them.
struct Bad {
    cmds: Vec<u32>,
    header: Option<u32>,
    addr: Option<u64>,
}

impl Bad {
    /// The first command is the offender.
    fn first(c: &Ctx, cmds: &[u32]) -> Bad {
        Bad {
            header: Some(cmds[0]),
            addr: Some(c.at),
            cmds: cmds.to_vec(),
        }
    }
}

enum Attack {
    /// Ring commands after a fence; the function prepares memory and builds them.
    Ring(fn(&Ctx, &mut Drv<'_>) -> Bad),
    /// A doorbell with this `RING_TAIL`, after a fence was written into the ring.
    Tail(u32),
}

/// Writes a batch into local memory and returns its GM address.
fn batch(d: &mut Drv<'_>, lmem_off: u64, dws: &[u32]) -> u64 {
    d.lmem_write(lmem_off, &dw_bytes(dws));
    d.gm_of_lmem(lmem_off)
}

const BBS: u32 = header(Client::Mi, cmd::MI_BATCH_BUFFER_START, 0, 2);
const BBS_2ND: u32 = header(
    Client::Mi,
    cmd::MI_BATCH_BUFFER_START,
    cmd::BBS_SECOND_LEVEL,
    2,
);

/// One `#[test]` per GTT mode for each attack (run by [`check`]) and each scenario function.
macro_rules! attacks {
    (
        scenarios { $($fname:ident),* $(,)? }
        attacks { $($name:ident: $engine:ident, $reason:ident, $attack:expr;)* }
    ) => {
        mod shadow {
            use super::*;
            $(#[test] fn $fname() { super::$fname(GttMode::Shadow) })*
            $(#[test] fn $name() {
                check(GttMode::Shadow, Engine::$engine, AuditReason::$reason, $attack)
            })*
        }
        mod two_dim {
            use super::*;
            $(#[test] fn $fname() { super::$fname(GttMode::TwoDim) })*
            $(#[test] fn $name() {
                check(GttMode::TwoDim, Engine::$engine, AuditReason::$reason, $attack)
            })*
        }
    };
}

attacks! {
scenarios {
    test_toctou_ring_and_batch_rewritten_after_doorbell_execute_scanned_copy,
    test_ggtt_entry_removed_after_scan_faults_at_execution_keeping_earlier_effects,
    test_ppgtt_unacceptable_root_rejects_submission_without_memory_access,
    test_ppgtt_read_only_directory_entry_rejects_writes_read_only_write,
    test_ring_enable_with_bad_base_or_size_rejected_bad_ring,
}
attacks {
    test_attack_blit_into_neighbour_gm_rejected_out_of_range: Blit, AddressOutOfRange,
        Attack::Ring(|c, _| Bad::first(c, &enc::color_blt(
            ROP_PATCOPY, BPP_32, c.b.mappable_base + B_DST, 256, 64, 16, 0xDEAD)));
    test_attack_copy_from_neighbour_gm_rejected_out_of_range: Blit, AddressOutOfRange,
        Attack::Ring(|c, _| Bad::first(c, &enc::src_copy_blt(enc::Copy {
            rop: ROP_SRCCOPY, bpp: BPP_32, dst: c.a.mappable_base + 0x1000, dst_pitch: 256,
            src: c.b.mappable_base, src_pitch: 256, width: 64, height: 16, pattern: 0 })));
    test_attack_fence_into_neighbour_hidden_gm_rejected_out_of_range: Compute, AddressOutOfRange,
        Attack::Ring(|c, _| Bad::first(c, &enc::store_data_imm(c.b.hidden_base, 0xBAD)));
    test_attack_blit_to_unmapped_gm_rejected_out_of_range: Blit, AddressOutOfRange,
        Attack::Ring(|c, _| Bad::first(c, &enc::color_blt(
            ROP_PATCOPY, BPP_32, c.a.hidden_base + 0x200000, 256, 64, 16, 0)));
    test_attack_batch_in_unmapped_gm_rejected_with_its_address: Blit, AddressOutOfRange,
        Attack::Ring(|c, _| {
            let gm = c.a.hidden_base + 0x200000;
            Bad { cmds: enc::batch_start(gm, false).to_vec(), header: Some(0), addr: Some(gm) }
        });
    test_attack_batch_command_into_unmapped_page_rejected_with_that_page: Blit, AddressOutOfRange,
        Attack::Ring(|c, d| {
            // The batch's last page is mapped, the next is not; a fence command straddles them.
            let page = c.a.hidden_base + 0x210000;
            d.map_gm(page, pte_local(0x300000));
            d.lmem_write(0x300000 + PAGE_SIZE - 8, &dw_bytes(&[0, enc::store_data_imm(0, 0)[0]]));
            let start = page + PAGE_SIZE - 8;
            Bad { cmds: enc::batch_start(start, false).to_vec(), header: Some(0),
                addr: Some(page + PAGE_SIZE) }
        });
    test_attack_ring_page_unmapped_rejected_with_that_address: Blit, AddressOutOfRange,
        Attack::Ring(|c, d| {
            // The ring's second page loses its GGTT entry; the submission runs into it.
            let page = c.at - 48 + PAGE_SIZE;
            d.map_gm(page, 0);
            d.write32(regs::TLB_INVALIDATE, regs::TLB_INVALIDATE_GGTT);
            Bad { cmds: vec![0; 1020], header: Some(0), addr: Some(page) }
        });
    test_attack_lri_ring_base_rejected_forbidden_register: Blit, ForbiddenRegister,
        Attack::Ring(|c, _| Bad::first(c, &lri(&[(ereg(Engine::Blit, regs::RING_BASE_LO), 0)])));
    test_attack_lri_intr_mask_after_scratch_rejected_forbidden_register: Video, ForbiddenRegister,
        Attack::Ring(|c, _| Bad::first(c, &lri(&[(regs::SCRATCH0, 1), (regs::INTR_MASK, 0)])));
    test_attack_lri_other_engine_gpr_rejected_forbidden_register: Blit, ForbiddenRegister,
        Attack::Ring(|c, _| Bad::first(c, &lri(&[(ereg(Engine::Render, regs::gpr(0)), 1)])));
    test_attack_srm_other_engine_fence_rejected_forbidden_register: Video, ForbiddenRegister,
        Attack::Ring(|c, _| Bad::first(c, &enc::store_register_mem(
            ereg(Engine::Compute, regs::LAST_FENCE), c.fence + 12)));
    test_attack_batch_chained_to_itself_rejected_batch_loop: Blit, BatchLoop,
        Attack::Ring(|_, d| {
            let x = d.gm_of_lmem(0x100000);
            batch(d, 0x100000, &cat(&[&enc::noop(), &enc::batch_start(x, false)]));
            Bad { cmds: enc::batch_start(x, false).to_vec(), header: Some(BBS), addr: Some(x + 4) }
        });
    test_attack_second_level_called_twice_rejected_batch_loop: Render, BatchLoop,
        Attack::Ring(|_, d| {
            let z = batch(d, 0x102000, &enc::batch_end());
            let y = batch(d, 0x101000, &cat(&[
                &enc::batch_start(z, true), &enc::batch_start(z, true), &enc::batch_end()]));
            Bad { cmds: enc::batch_start(y, false).to_vec(), header: Some(BBS_2ND),
                addr: Some(y + 12) }
        });
    test_attack_batch_without_end_rejected_batch_too_long: Blit, BatchTooLong,
        Attack::Ring(|_, d| {
            // Zeroed local memory: MI_NOOPs well past MAX_BATCH_BYTES.
            let gm = d.gm_of_lmem(0x200000);
            Bad { cmds: enc::batch_start(gm, false).to_vec(), header: None, addr: None }
        });
    test_attack_batch_start_in_second_level_rejected_batch_nesting: Blit, BatchNesting,
        Attack::Ring(|_, d| {
            let w = batch(d, 0x103000, &enc::batch_end());
            let z = batch(d, 0x102000, &cat(&[&enc::batch_start(w, false), &enc::batch_end()]));
            let y = batch(d, 0x101000, &cat(&[&enc::batch_start(z, true), &enc::batch_end()]));
            Bad { cmds: enc::batch_start(y, false).to_vec(), header: Some(BBS), addr: Some(z) }
        });
    test_attack_unknown_mi_opcode_rejected_unknown_opcode: Compute, UnknownOpcode,
        Attack::Ring(|c, _| Bad::first(c, &[header(Client::Mi, 0x3F, 0, 0)]));
    test_attack_unknown_blt_opcode_rejected_unknown_opcode: Blit, UnknownOpcode,
        Attack::Ring(|c, _| Bad::first(c, &[header(Client::Blt, 0x7F, 0, 2), 0, 0]));
    test_attack_garbage_dwords_rejected_unknown_opcode: Video, UnknownOpcode,
        // Client 7, len 3 (a huge len would also run past the tail: either reason is allowed).
        Attack::Ring(|c, _| Bad::first(c, &[0xEEAD_0003, 0x0BAD_F00D, u32::MAX, 0x1234_5678]));
    test_attack_fence_with_short_length_rejected_bad_length: Blit, BadLength,
        Attack::Ring(|c, _| Bad::first(c, &[header(Client::Mi, cmd::MI_STORE_DATA_IMM, 0, 2),
            c.fence as u32, (c.fence >> 32) as u32]));
    test_attack_lri_odd_length_rejected_bad_length: Render, BadLength,
        Attack::Ring(|c, _| Bad::first(c, &[header(Client::Mi, cmd::MI_LOAD_REGISTER_IMM, 0, 3),
            regs::SCRATCH0, 1, 0]));
    test_attack_blt_wrong_length_rejected_bad_length: Blit, BadLength,
        Attack::Ring(|c, _| {
            let mut blt = enc::color_blt(ROP_PATCOPY, BPP_32, c.a.mappable_base, 256, 4, 4, 0);
            blt[0] = header(Client::Blt, cmd::XY_COLOR_BLT, 0, 5);
            Bad::first(c, &blt[..6])
        });
    test_attack_command_past_tail_rejected_bad_length: Blit, BadLength,
        Attack::Ring(|c, _| Bad::first(c,
            &enc::color_blt(ROP_PATCOPY, BPP_32, c.a.mappable_base, 256, 4, 4, 0)[..4]));
    test_attack_blt_on_render_engine_rejected_wrong_engine: Render, WrongEngine,
        Attack::Ring(|c, _| Bad::first(c,
            &enc::color_blt(ROP_PATCOPY, BPP_32, c.a.mappable_base, 256, 4, 4, 0)));
    test_attack_dispatch_on_blit_engine_rejected_wrong_engine: Blit, WrongEngine,
        Attack::Ring(|c, _| Bad::first(c, &enc::dispatch(enc::Dispatch {
            kernel: cmd::KERNEL_REDUCE_SUM, params: [0; 3], scalar: 0.0,
            buffers: [0, 0, c.a.mappable_base] })));
    test_attack_second_level_batch_from_ring_rejected_bad_parameter: Blit, BadParameter,
        Attack::Ring(|c, d| {
            let y = batch(d, 0x101000, &enc::batch_end());
            Bad::first(c, &enc::batch_start(y, true))
        });
    test_attack_batch_end_in_ring_rejected_bad_parameter: Compute, BadParameter,
        Attack::Ring(|c, _| Bad::first(c, &enc::batch_end()));
    test_attack_tail_beyond_ring_rejected_bad_ring: Blit, BadRing, Attack::Tail(0x4000);
    test_attack_tail_unaligned_rejected_bad_ring: Video, BadRing, Attack::Tail(34);
    test_attack_blit_through_read_only_pte_rejected_read_only_write: Blit, ReadOnlyWrite,
        Attack::Ring(|c, d| {
            let gm = c.a.hidden_base + 0x220000;
            d.map_gm(gm, pte_guest(RAM_GPA + 0x50000) | PTE_READ_ONLY);
            Bad::first(c, &enc::color_blt(ROP_PATCOPY, BPP_32, gm, 256, 64, 4, 0xBAD))
        });
    test_attack_draw_without_surface_rejected_bad_parameter: Render, BadParameter,
        Attack::Ring(|c, _| Bad::first(c, &enc::fill_rect(0, 0, 4, 4, 0xFF, false)));
    test_attack_unaligned_fence_rejected_bad_parameter: Blit, BadParameter,
        Attack::Ring(|c, _| Bad::first(c, &enc::store_data_imm(c.fence + 2, 1)));
    test_attack_lri_33_pairs_rejected_bad_length: Blit, BadLength,
        Attack::Ring(|c, _| Bad::first(c, &lri(&[(regs::SCRATCH0, 1); 33])));
    test_attack_65_chained_batches_rejected_batch_too_long: Blit, BatchTooLong,
        Attack::Ring(|_, d| {
            // Batch i at 16 i chains to batch i + 1; batch 64, the 65th, ends.
            let base = d.gm_of_lmem(0x100000);
            for i in 0..65 {
                let dws = if i < 64 {
                    enc::batch_start(base + 16 * (i + 1), false).to_vec()
                } else {
                    enc::batch_end().to_vec()
                };
                d.lmem_write(0x100000 + 16 * i, &dw_bytes(&dws));
            }
            Bad { cmds: enc::batch_start(base, false).to_vec(), header: Some(BBS),
                addr: Some(base + 16 * 63) }
        });
    test_attack_ppgtt_root_outside_local_memory_rejected_out_of_range: Blit, AddressOutOfRange,
        Attack::Ring(|c, d| {
            d.set_ppgtt_root(Engine::Blit, pte_local(c.a.lmem_size));
            Bad { cmds: enc::noop().to_vec(), header: None, addr: None }
        });
}
}

// ---------------------------------------------------------------------------------------------
// Scan once, execute the copy.

fn test_toctou_ring_and_batch_rewritten_after_doorbell_execute_scanned_copy(mode: GttMode) {
    let mut r = rig(mode);
    let mut d = driver(&mut r.v);
    let e = Engine::Blit;
    let f = fresh_fences(&mut d, &r.g);
    let batch_gm = d.gm_of_lmem(0x100000);
    let dst = d.gm_of_lmem(0x1000);
    let batch = cat(&[
        &enc::color_blt(ROP_PATCOPY, BPP_32, dst, 256, 64, 4, 0x1122_3344),
        &enc::store_data_imm(f + 8, 2),
        &enc::batch_end(),
    ]);
    d.lmem_write(0x100000, &dw_bytes(&batch));
    let ring = cat(&[
        &enc::store_data_imm(f, 1),
        &enc::batch_start(batch_gm, false),
        &enc::load_register_imm(regs::SCRATCH0, 0x600D),
    ]);
    let (start, _) = ring_pos(&mut d, e);
    d.submit(e, &ring).unwrap();
    assert_eq!(
        d.read32(ereg(e, regs::ENGINE_STATUS)) & regs::ENGINE_STATUS_IDLE,
        0,
        "queued"
    );

    // Same lengths, commands the scanner would have rejected.
    let evil_ring = cat(&[
        &enc::store_data_imm(f, 0xBAD),
        &enc::load_register_imm(ereg(e, regs::RING_BASE_LO), 0),
        &enc::load_register_imm(regs::SCRATCH0, 0xBAD),
    ]);
    let outside = d.pv().hidden_base + d.pv().hidden_size;
    let evil_batch = cat(&[
        &enc::color_blt(ROP_PATCOPY, BPP_32, outside, 256, 64, 4, 0xBAD),
        &enc::store_data_imm(f + 8, 0xBAD),
        &enc::batch_end(),
    ]);
    assert_eq!(
        (evil_ring.len(), evil_batch.len()),
        (ring.len(), batch.len())
    );
    let ring_off = ring_lmem_offset(d.pv().lmem_size, e) + u64::from(start);
    d.lmem_write(ring_off, &dw_bytes(&evil_ring));
    d.lmem_write(0x100000, &dw_bytes(&evil_batch));

    d.wait_idle(e, IDLE_TIMEOUT).unwrap();
    assert_eq!(r.g.read_u32(FENCE_GPA), 1);
    assert_eq!(r.g.read_u32(FENCE_GPA + 8), 2);
    assert_eq!(d.read32(regs::SCRATCH0), 0x600D);
    assert_eq!(d.read32(ereg(e, regs::LAST_FENCE)), 2);
    let mut px = vec![0u8; 256 * 4];
    d.lmem_read(0x1000, &mut px);
    assert!(px
        .chunks_exact(4)
        .all(|p| p == 0x1122_3344u32.to_le_bytes()));
    assert_eq!(d.device().0.shared().audit.total(), 0);
}

/// A GGTT entry removed after the scan (and invalidated) makes the command that uses it fault
/// at execution (section 7.5): the commands before it keep their effects, the rest is dropped,
/// `RING_HEAD` stays at the faulting ring command.
fn test_ggtt_entry_removed_after_scan_faults_at_execution_keeping_earlier_effects(mode: GttMode) {
    let mut r = rig(mode);
    let mut d = driver(&mut r.v);
    let e = Engine::Blit;
    let f = fresh_fences(&mut d, &r.g);
    let target = d.pv().hidden_base + 0x90000;
    map_guest(&mut d, target, RAM_GPA + 0x90000, 1);
    r.g.write(RAM_GPA + 0x90000, &[0x77; PAGE_SIZE as usize]);
    let blt = enc::color_blt(ROP_PATCOPY, BPP_32, target, 256, 64, 4, 0);
    let ring = cat(&[
        &enc::store_data_imm(f, 1),
        &blt,
        &enc::store_data_imm(f + 4, 2),
    ]);
    let (start, ring_gm) = ring_pos(&mut d, e);
    d.submit(e, &ring).unwrap();
    d.map_gm(target, 0);
    d.write32(regs::TLB_INVALIDATE, regs::TLB_INVALIDATE_GGTT);
    assert!(d.wait_idle(e, IDLE_TIMEOUT).is_err());

    assert_eq!(
        d.read32(ereg(e, regs::ERROR_CODE)),
        AuditReason::AddressOutOfRange as u32
    );
    assert_eq!(d.read32(ereg(e, regs::ERROR_HEADER)), blt[0]);
    assert_eq!(
        d.read64(ereg(e, regs::ERROR_ADDR_LO)),
        ring_gm + u64::from(start) + 16
    );
    assert_eq!(d.read32(ereg(e, regs::RING_HEAD)), start + 16);
    assert_eq!(
        r.g.read_u32(FENCE_GPA),
        1,
        "the fence before the fault was written"
    );
    assert_eq!(
        r.g.read_u32(FENCE_GPA + 4),
        0,
        "nothing after the fault ran"
    );
    assert!(r
        .g
        .bytes(RAM_GPA + 0x90000, 4096)
        .iter()
        .all(|&b| b == 0x77));
    assert_ne!(d.read32(regs::INTR_STATUS) & regs::intr_error(e), 0);
    assert_eq!(d.device().0.shared().audit.total(), 1);
}

/// A valid `PPGTT_ROOT` that is not acceptable (outside local memory, reserved bits, guest RAM
/// the VMM did not map) rejects the submission at the doorbell even when no command of it
/// accesses memory (section 8.4).
fn test_ppgtt_unacceptable_root_rejects_submission_without_memory_access(mode: GttMode) {
    let mut r = rig(mode);
    let mut d = driver(&mut r.v);
    let e = Engine::Compute;
    let cmds = cat(&[&lri(&[(regs::SCRATCH0, 5)]), &enc::user_interrupt()]);
    let lmem = d.pv().lmem_size;
    for root in [
        pte_local(lmem),
        pte_local(0x110000) | 1 << 5,
        pte_guest(0x1000),
    ] {
        d.set_ppgtt_root(e, root);
        assert!(d.submit(e, &cmds).is_err(), "root {root:#x} accepted");
        let code = d.read32(ereg(e, regs::ERROR_CODE));
        assert_eq!(
            code,
            AuditReason::AddressOutOfRange as u32,
            "root {root:#x}"
        );
        d.device().progress();
        assert_eq!(d.read32(regs::SCRATCH0), 0, "root {root:#x}: the LRI ran");
        assert_eq!(d.read32(regs::INTR_STATUS) & regs::intr_user(e), 0);
        d.forget_rings(); // the next submission re-enables the ring
    }
    // An acceptable (empty) root: the same commands run.
    d.lmem_write(0x110000, &[0; PAGE_SIZE as usize]);
    d.set_ppgtt_root(e, pte_local(0x110000));
    run(&mut d, e, &cmds);
    assert_eq!(d.read32(regs::SCRATCH0), 5);
}

/// `READ_ONLY` in a PPGTT directory entry makes every page below it read-only for engines:
/// reading through it works, writing is rejected with `ReadOnlyWrite` (section 7.3).
fn test_ppgtt_read_only_directory_entry_rejects_writes_read_only_write(mode: GttMode) {
    let mut r = rig(mode);
    let mut d = driver(&mut r.v);
    let e = Engine::Blit;
    // Tables in local memory: L4, L3, a read-only-pointed L2 and its L1, a writable L2 and L1.
    let t = |i: u64| 0x110000 + i * PAGE_SIZE;
    d.lmem_write(t(0), &[0; 6 * PAGE_SIZE as usize]);
    let put =
        |d: &mut Drv<'_>, table: u64, i: u64, v: u64| d.lmem_write(table + 8 * i, &v.to_le_bytes());
    put(&mut d, t(0), 1, pte_local(t(1)));
    put(&mut d, t(1), 2, pte_local(t(2)) | PTE_READ_ONLY);
    put(&mut d, t(2), 0, pte_local(t(3)));
    put(&mut d, t(3), 0, pte_local(0x50000));
    put(&mut d, t(1), 3, pte_local(t(4)));
    put(&mut d, t(4), 0, pte_local(t(5)));
    put(&mut d, t(5), 0, pte_local(0x51000));
    let (ro_va, rw_va) = ((1 << 39) | (2 << 30), (1 << 39) | (3 << 30));
    let src = pattern(256, 5);
    d.lmem_write(0x50000, &src);
    d.set_ppgtt_root(e, pte_local(t(0)));
    let copy = enc::Copy {
        rop: ROP_SRCCOPY,
        bpp: BPP_32,
        dst: rw_va,
        dst_pitch: 256,
        src: ro_va,
        src_pitch: 256,
        width: 64,
        height: 1,
        pattern: 0,
    };
    run(&mut d, e, &enc::src_copy_blt(copy));
    let mut got = vec![0u8; 256];
    d.lmem_read(0x51000, &mut got);
    assert_eq!(got, src, "read through the read-only entry");

    let bad = [
        enc::color_blt(ROP_PATCOPY, BPP_32, ro_va, 256, 64, 1, 0xBAD).to_vec(),
        enc::src_copy_blt(enc::Copy {
            dst: ro_va + 0x100,
            src: rw_va,
            ..copy
        })
        .to_vec(),
        enc::store_data_imm(ro_va + 0x200, 0xBAD).to_vec(),
    ];
    for cmds in bad {
        assert!(
            d.submit(e, &cmds).is_err(),
            "write through a read-only entry accepted"
        );
        let code = d.read32(ereg(e, regs::ERROR_CODE));
        assert_eq!(code, AuditReason::ReadOnlyWrite as u32);
        d.device().progress();
        d.forget_rings();
    }
    d.lmem_read(0x50000, &mut got);
    assert_eq!(got, src, "the read-only page is unchanged");
}

/// Enabling a ring outside the partition, unaligned, of a bad size or straddling the end of the
/// mappable range fails with `BadRing` (`ERROR_HEADER` 0, `ERROR_ADDR` the base) and leaves it
/// disabled; a good ring then works.
fn test_ring_enable_with_bad_base_or_size_rejected_bad_ring(mode: GttMode) {
    let mut phys = phys(64);
    let mut a = vgpu(&mut phys, "mini", mode);
    let b = vgpu(&mut phys, "mini", mode);
    let b_gm = b.shared().partition().mappable.start.raw();
    let mut d = driver(&mut a);
    let e = Engine::Video;
    let (mb, msize) = (d.pv().mappable_base, d.pv().mappable_size);
    let cases = [
        (b_gm, 0x4000),
        (mb + 0x800, 0x4000),
        (mb, 0x3000),
        (mb, 0x800),
        (mb, 2 << 20),
        (mb + msize - 0x1000, 0x4000),
    ];
    for (base, size) in cases {
        d.write32(ereg(e, regs::RING_CTL), 0);
        d.write32(ereg(e, regs::RING_BASE_LO), base as u32);
        d.write32(ereg(e, regs::RING_BASE_HI), (base >> 32) as u32);
        d.write32(ereg(e, regs::RING_SIZE), size);
        d.write32(ereg(e, regs::RING_CTL), regs::RING_CTL_ENABLE);
        let what = format!("ring {base:#x} size {size:#x}");
        assert_eq!(d.read32(ereg(e, regs::RING_CTL)), 0, "{what}");
        let status = d.read32(ereg(e, regs::ENGINE_STATUS));
        assert_ne!(status & regs::ENGINE_STATUS_ERROR, 0, "{what}");
        let code = d.read32(ereg(e, regs::ERROR_CODE));
        assert_eq!(code, AuditReason::BadRing as u32, "{what}");
        assert_eq!(d.read32(ereg(e, regs::ERROR_HEADER)), 0);
        assert_eq!(d.read64(ereg(e, regs::ERROR_ADDR_LO)), base, "{what}");
    }
    d.setup_ring(e).unwrap();
    let fence = d.gm_of_lmem(0x1000);
    run(&mut d, e, &enc::store_data_imm(fence, 9));
    assert_eq!(d.read32(ereg(e, regs::LAST_FENCE)), 9);
    assert_eq!(b.shared().audit.total(), 0);
}

// ---------------------------------------------------------------------------------------------
// The neighbour's workload.

/// Local-memory offset of B's source (16 rows of 256 bytes) and destination.
const B_SRC: u64 = 0;
const B_DST: u64 = 0x8000;
/// Guest page of B that its hidden GM maps.
const B_GUEST_GPA: u64 = RAM_GPA + 0x20000;
const B_COLOUR: u32 = 0x00C0_FFEE;

/// Fill B_DST, XOR the source into it, copy the source to guest RAM, write a fence.
fn neighbour_cmds(d: &mut Drv<'_>, fence: u64, run_no: u32) -> Vec<u32> {
    let (mb, hb) = (d.pv().mappable_base, d.pv().hidden_base);
    let copy = |rop, bpp, dst, dst_pitch, width, height| enc::Copy {
        rop,
        bpp,
        dst,
        dst_pitch,
        src: mb + B_SRC,
        src_pitch: 256,
        width,
        height,
        pattern: 0,
    };
    cat(&[
        &enc::color_blt(ROP_PATCOPY, BPP_32, mb + B_DST, 256, 64, 16, B_COLOUR),
        &enc::src_copy_blt(copy(ROP_SRCINVERT, BPP_32, mb + B_DST, 256, 64, 16)),
        &enc::src_copy_blt(copy(ROP_SRCCOPY, BPP_8, hb, 128, 100, 8)),
        &enc::store_data_imm(fence, run_no),
    ])
}

/// B's outputs, computed by hand.
fn neighbour_check(d: &mut Drv<'_>, g: &Guest, src: &[u8], run_no: u32) {
    let mut dst = vec![0u8; 16 * 256];
    d.lmem_read(B_DST, &mut dst);
    for (i, (got, s)) in dst.chunks_exact(4).zip(src.chunks_exact(4)).enumerate() {
        let want = u32::from_le_bytes(s.try_into().unwrap()) ^ B_COLOUR;
        assert_eq!(got, want.to_le_bytes(), "B pixel {i}");
    }
    let page = g.bytes(B_GUEST_GPA, PAGE_SIZE as usize);
    for (i, &b) in page.iter().enumerate() {
        let (y, x) = (i / 128, i % 128);
        let want = if y < 8 && x < 100 {
            src[256 * y + x]
        } else {
            0
        };
        assert_eq!(b, want, "B guest byte {i}");
    }
    assert_eq!(g.read_u32(FENCE_GPA), run_no, "B fence");
    let status = d.read32(ereg(Engine::Blit, regs::ENGINE_STATUS));
    assert_eq!(status & regs::ENGINE_STATUS_ERROR, 0);
}

// ---------------------------------------------------------------------------------------------
// The harness.

/// A's fence slots: 0 the warm-up, 1 the fence before the attack, 2 the recovery, 5 a
/// submission queued before the attack.
const FENCE_BEFORE_ATTACK: u32 = 0xF00D;

fn check(mode: GttMode, e: Engine, reason: AuditReason, attack: Attack) {
    let mut phys = phys(64);
    let (ga, gb) = (Guest::new(), Guest::new());
    let mut a = vgpu(&mut phys, "mini", mode);
    a.set_dma_map(ga.dma());
    let mut b = vgpu(&mut phys, "mini", mode);
    b.set_dma_map(gb.dma());

    // B: one run checked, a second one queued across the attack.
    let mut db = driver(&mut b);
    let src = pattern(16 * 256, 0xB);
    db.lmem_write(B_SRC, &src);
    let hb = db.pv().hidden_base;
    map_guest(&mut db, hb, B_GUEST_GPA, 1);
    let b_fence = map_fence(&mut db);
    let cmds = neighbour_cmds(&mut db, b_fence, 1);
    run(&mut db, Engine::Blit, &cmds);
    neighbour_check(&mut db, &gb, &src, 1);
    let cmds = neighbour_cmds(&mut db, b_fence, 2);
    db.submit(Engine::Blit, &cmds).unwrap();
    let b_state = |db: &mut Drv<'_>| {
        (
            digest(&lmem_all(db)),
            digest(&gb.bytes(RAM_GPA, RAM_SIZE as usize)),
        )
    };
    let b_before = b_state(&mut db);

    // A: a good submission executed, another one queued (ring 16..32), then the attack.
    let mut da = driver(&mut a);
    let fence = map_fence(&mut da);
    run(&mut da, e, &enc::store_data_imm(fence, 1));
    da.submit(e, &enc::store_data_imm(fence + 20, 2)).unwrap();
    let ring_off = ring_lmem_offset(da.pv().lmem_size, e);
    let ctx = Ctx {
        a: da.pv(),
        b: db.pv(),
        fence,
        at: da.gm_of_lmem(ring_off) + 48,
    };
    let shared = da.device().0.shared().clone();
    let audits = shared.audit.total();
    let fence_cmd = enc::store_data_imm(fence + 4, FENCE_BEFORE_ATTACK);
    let data_end = ring_lmem_offset(ctx.a.lmem_size, Engine::Render) as usize;
    let (a_data, header, addr) = match attack {
        Attack::Ring(build) => {
            let bad = build(&ctx, &mut da);
            let a_data = digest(&lmem_all(&mut da)[..data_end]);
            let res = da.submit(e, &cat(&[&fence_cmd, &bad.cmds]));
            assert!(res.is_err(), "submission accepted");
            (a_data, bad.header, bad.addr)
        }
        Attack::Tail(tail) => {
            da.lmem_write(ring_off + 32, &dw_bytes(&fence_cmd));
            let a_data = digest(&lmem_all(&mut da)[..data_end]);
            da.write32(ereg(e, regs::RING_TAIL), tail);
            assert_eq!(da.read32(ereg(e, regs::RING_TAIL)), 32, "bad tail stored");
            (a_data, Some(0), Some(u64::from(tail)))
        }
    };
    da.device().progress();

    // A's context is in the error state, with the reason, and nothing of the submission ran;
    // the submission queued before it did (section 8.2).
    assert_eq!(ga.read_u32(FENCE_GPA + 20), 2, "earlier submission dropped");
    let status = da.read32(ereg(e, regs::ENGINE_STATUS));
    assert_ne!(status & regs::ENGINE_STATUS_ERROR, 0, "status {status:#x}");
    let code = da.read32(ereg(e, regs::ERROR_CODE));
    assert_eq!(AuditReason::from_code(code), Some(reason));
    if let Some(h) = header {
        assert_eq!(da.read32(ereg(e, regs::ERROR_HEADER)), h, "ERROR_HEADER");
    }
    if let Some(at) = addr {
        assert_eq!(da.read64(ereg(e, regs::ERROR_ADDR_LO)), at, "ERROR_ADDR");
    }
    let events = shared.audit.since(audits, 10);
    assert_eq!(events.len(), 1, "one audit event: {events:?}");
    assert_eq!(
        (events[0].reason, events[0].engine),
        (reason.name(), e.name())
    );
    assert_eq!(events[0].vgpu, ctx.a.vgpu_id);
    assert_ne!(da.read32(regs::INTR_STATUS) & regs::intr_error(e), 0);
    assert_eq!(
        ga.read_u32(FENCE_GPA + 4),
        0,
        "the fence before the bad command ran"
    );
    assert_eq!(da.read32(ereg(e, regs::LAST_FENCE)), 2);
    assert_eq!(da.read32(regs::SCRATCH0), 0);
    let head = da.read32(ereg(e, regs::RING_HEAD));
    assert_eq!(head, 32, "HEAD at the rejected submission");
    assert_eq!(
        digest(&lmem_all(&mut da)[..data_end]),
        a_data,
        "A's memory changed"
    );

    // B: untouched, and its queued work runs bit-exact.
    assert_eq!(b_state(&mut db), b_before, "B's memory changed");
    db.wait_idle(Engine::Blit, IDLE_TIMEOUT).unwrap();
    neighbour_check(&mut db, &gb, &src, 2);
    assert_eq!(db.device().0.shared().audit.total(), 0);
    for be in Engine::ALL {
        assert_eq!(
            db.read32(ereg(be, regs::ENGINE_STATUS)) & regs::ENGINE_STATUS_ERROR,
            0
        );
    }

    // A: re-enabling the ring clears the error; the engine works again.
    da.write32(ereg(e, regs::RING_CTL), 0);
    da.write32(ereg(e, regs::RING_CTL), regs::RING_CTL_ENABLE);
    assert_eq!(
        da.read32(ereg(e, regs::ENGINE_STATUS)),
        regs::ENGINE_STATUS_IDLE
    );
    assert_eq!(da.read32(ereg(e, regs::ERROR_CODE)), 0);
    assert_eq!(da.read32(ereg(e, regs::RING_HEAD)), 0);
    da.set_ppgtt_root(e, 0);
    da.forget_rings();
    run(&mut da, e, &enc::store_data_imm(fence + 8, 3));
    assert_eq!(ga.read_u32(FENCE_GPA + 8), 3);
    assert_eq!(da.read32(ereg(e, regs::LAST_FENCE)), 3);
}
