//! Isolation under a hostile neighbour on the same engines, with the real scheduler threads:
//! the parts of the threat matrix that `malicious.rs` (every audit rule, one at a time) and
//! `mmio_fuzz.rs` (random guest accesses, neighbours compared afterwards) do not cover.
//!
//! - **Fair share**: a hostile vGPU keeps the blit engine busy with valid work while hammering
//!   doorbells with rejected streams, bad tails, engine resets and full device resets. With
//!   equal weights the victim, running bit-checked work, must get at least 40 % of the engine
//!   by the scheduler's own accounting (`Scheduler::shares`).
//! - **MSI-X abuse**: a hostile vGPU rewrites its MSI-X table, masks and unmasks vectors and
//!   the function, writes the PBA and raises interrupt storms; the victim's interrupts arrive
//!   exactly once per completion.
//! - **Ring head/tail games**: tails that wrap, rewind over executed commands, equal `HEAD`,
//!   or move while the engine runs: the hostile vGPU only ever executes scanned commands of
//!   its own ring, and the victim is unaffected.
#![allow(clippy::cast_possible_truncation)] // Test arithmetic on small known values.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use vgpu_abi::cmd::{enc, BPP_32, ROP_PATCOPY};
use vgpu_abi::{pci, regs, Engine};
use vgpu_device::driver::{Driver, Locked, RING_BYTES};
use vgpu_device::sched::{SchedConfig, SchedParams, Scheduler};
use vgpu_device::vgpu::{GttMode, Vgpu};

const T: Duration = Duration::from_secs(20);

fn attach(sched: &Scheduler, v: Vgpu) -> (Arc<Mutex<Vgpu>>, Driver<Locked>) {
    sched
        .add_vgpu(
            v.shared().clone(),
            SchedParams {
                weight: 1,
                ..Default::default()
            },
        )
        .unwrap();
    let v = Arc::new(Mutex::new(v));
    let d = Driver::probe(Locked(v.clone())).unwrap();
    (v, d)
}

/// Busy nanoseconds of vGPU `id` on `engine`, from the scheduler's accounting.
fn busy(sched: &Scheduler, id: u32, engine: Engine) -> u64 {
    sched
        .shares()
        .iter()
        .find(|s| s.vgpu == id && s.engine == engine.name())
        .map_or(0, |s| s.busy_ns)
}

/// A fill of `rows` rows of 4 KiB at local offset `off`.
fn big_fill(d: &Driver<Locked>, off: u64, rows: u32, color: u32) -> Vec<u32> {
    enc::color_blt(
        ROP_PATCOPY,
        BPP_32,
        d.gm_of_lmem(off),
        4096,
        1024,
        rows,
        color,
    )
    .to_vec()
}

/// The victim's loop until `stop`: rounds of four fills and a fence, two rounds in flight
/// (round r fills buffer set r % 2), so the victim always has work queued even while its own
/// thread is descheduled; each round's fills are checked bit for bit (a sample of rows).
fn victim_loop(mut d: Driver<Locked>, stop: Arc<AtomicBool>, rounds: Arc<AtomicU64>) {
    const FENCE: u64 = 0x200_0000;
    let color = |r: u32, k: u64| 0x0101_0101u32.wrapping_mul(r) ^ k as u32;
    let base = |r: u32| u64::from(r % 2) * (8 << 20);
    let mut round = 0u32;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let mut cmds = Vec::new();
        for k in 0..4u64 {
            cmds.extend(big_fill(
                &d,
                base(round) + k * (2 << 20),
                512,
                color(round, k),
            ));
        }
        cmds.extend(enc::store_data_imm(d.gm_of_lmem(FENCE), round));
        d.submit(Engine::Blit, &cmds).expect("victim submit");
        if round == 1 {
            continue;
        }
        // Check the previous round while this one is queued.
        let prev = round - 1;
        let t0 = Instant::now();
        loop {
            let mut f = [0u8; 4];
            d.lmem_read(FENCE, &mut f);
            if u32::from_le_bytes(f) >= prev {
                break;
            }
            let status = d.read32(regs::engine_base(Engine::Blit) + regs::ENGINE_STATUS);
            assert_eq!(status & regs::ENGINE_STATUS_ERROR, 0, "victim engine error");
            assert!(t0.elapsed() < T, "victim round {prev} did not complete");
            std::thread::sleep(Duration::from_micros(100));
        }
        for k in 0..4u64 {
            for row in [0u64, 255, 511] {
                let mut b = vec![0u8; 4096];
                d.lmem_read(base(prev) + k * (2 << 20) + row * 4096, &mut b);
                assert!(
                    b.chunks_exact(4)
                        .all(|c| u32::from_le_bytes(c.try_into().unwrap()) == color(prev, k)),
                    "victim round {prev}: fill {k} row {row} differs"
                );
            }
        }
        rounds.fetch_add(1, Ordering::Relaxed);
    }
    d.wait_idle(Engine::Blit, T).expect("victim's last round");
}

#[test]
fn test_fair_share_victim_keeps_40_percent_under_reset_storm_and_rejected_doorbells() {
    let mut phys = phys(256);
    let sched = Scheduler::new(&SchedConfig::default()).unwrap();
    let (va, victim) = attach(&sched, vgpu(&mut phys, "small", GttMode::Shadow));
    let (vh, mut hostile) = attach(&sched, vgpu(&mut phys, "small", GttMode::TwoDim));
    let victim_id = va.lock().unwrap().shared().id();
    let hostile_id = vh.lock().unwrap().shared().id();
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let vt = {
        let (s, r) = (stop.clone(), rounds.clone());
        std::thread::spawn(move || victim_loop(victim, s, r))
    };
    let ht = {
        let s = stop.clone();
        std::thread::spawn(move || {
            let b = regs::engine_base(Engine::Blit);
            let mut storms = 0u64;
            while !s.load(Ordering::Relaxed) {
                storms += 1;
                // Valid heavy work, to compete for the engine...
                let mut cmds = Vec::new();
                for k in 0..4u64 {
                    cmds.extend(big_fill(
                        &hostile,
                        k * (2 << 20),
                        512,
                        0xBAD0_0000 | k as u32,
                    ));
                }
                let _ = hostile.submit(Engine::Blit, &cmds);
                // ...then a stream the scanner rejects, bad tails, and resets mid-work.
                let _ = hostile.submit(Engine::Blit, &[0xEEAD_0003, 1, 2, 3]);
                hostile.write32(b + regs::RING_TAIL, 0x4_0000);
                hostile.write32(b + regs::RING_TAIL, 3);
                hostile.write32(regs::RESET_CTL, regs::reset_engine(Engine::Blit));
                if storms.is_multiple_of(8) {
                    hostile.write32(regs::RESET_CTL, regs::RESET_DEVICE);
                    hostile.write32(regs::INTR_MASK, 0);
                }
                hostile.forget_rings();
                if hostile.setup_ring(Engine::Blit).is_err() {
                    hostile.write32(regs::RESET_CTL, regs::reset_engine(Engine::Blit));
                }
                // Greedy between storms: keep heavy work queued for a while.
                let _ = hostile.submit(Engine::Blit, &cmds);
                let _ = hostile.submit(Engine::Blit, &cmds);
                std::thread::sleep(Duration::from_millis(2));
            }
            storms
        })
    };
    // Warm up, then measure a window of the scheduler's accounting.
    let t0 = Instant::now();
    while rounds.load(Ordering::Relaxed) < 3 {
        assert!(t0.elapsed() < T, "victim made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (v0, h0) = (
        busy(&sched, victim_id, Engine::Blit),
        busy(&sched, hostile_id, Engine::Blit),
    );
    let r0 = rounds.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1500));
    let (v1, h1) = (
        busy(&sched, victim_id, Engine::Blit),
        busy(&sched, hostile_id, Engine::Blit),
    );
    let r1 = rounds.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    vt.join().expect("victim results stayed bit-exact");
    let storms = ht.join().unwrap();
    let (dv, dh) = (v1 - v0, h1 - h0);
    let share = dv as f64 / (dv + dh).max(1) as f64;
    println!(
        "victim {:.1} ms, hostile {:.1} ms of blit time: victim share {:.1} %, {} victim rounds, {storms} hostile storms",
        dv as f64 / 1e6,
        dh as f64 / 1e6,
        share * 100.0,
        r1 - r0
    );
    assert!(r1 > r0, "the victim completed work in the window");
    assert!(dh > 0, "the hostile vGPU competed for the engine");
    assert!(
        share >= 0.40,
        "victim got {:.1} % of the blit engine",
        share * 100.0
    );
    let audits = vh.lock().unwrap().shared().audit.total();
    assert!(
        audits >= storms / 2,
        "the hostile streams were refused ({audits} audits)"
    );
    assert_eq!(
        va.lock().unwrap().shared().audit.total(),
        0,
        "nothing refused for the victim"
    );
}

#[test]
fn test_msix_abuse_and_interrupt_storm_victim_interrupts_exact() {
    let mut phys = phys(128);
    let sched = Scheduler::new(&SchedConfig::default()).unwrap();
    let mut v_victim = vgpu(&mut phys, "mini", GttMode::Shadow);
    let mut v_hostile = vgpu(&mut phys, "mini", GttMode::TwoDim);
    let victim_irqs = enable_msix(&mut v_victim);
    let hostile_irqs = enable_msix(&mut v_hostile);
    let (va, mut victim) = attach(&sched, v_victim);
    let (vh, mut hostile) = attach(&sched, v_hostile);
    let stop = Arc::new(AtomicBool::new(false));
    let storms = Arc::new(AtomicU64::new(0));
    let ht = {
        let (s, n) = (stop.clone(), storms.clone());
        let vh = vh.clone();
        std::thread::spawn(move || {
            let storm = [enc::user_interrupt(); 64].concat();
            let mut i = 0u32;
            while !s.load(Ordering::Relaxed) {
                i = i.wrapping_add(1);
                n.fetch_add(1, Ordering::Relaxed);
                // Table rewrites (address, data, control), odd sizes, the PBA, the function
                // mask and MSI-X enable toggled through config space.
                {
                    let mut v = vh.lock().unwrap();
                    let vec = u64::from(i % 8);
                    let e = pci::MSIX_TABLE_OFFSET + 16 * vec;
                    v.bar0_write(e, &i.to_le_bytes());
                    v.bar0_write(e + 8, &[0xAB]);
                    v.bar0_write(e + 12, &(i & 1).to_le_bytes());
                    v.bar0_write(e + 2, &0xFFFFu16.to_le_bytes());
                    v.bar0_write(pci::MSIX_PBA_OFFSET, &u64::MAX.to_le_bytes());
                    v.bar0_write(pci::MSIX_TABLE_OFFSET + 0x1000 - 4, &i.to_le_bytes());
                    let ctl = match i % 4 {
                        0 => 1u16 << 15,
                        1 => 1 << 15 | 1 << 14,
                        2 => 0,
                        _ => 0xFFFF,
                    };
                    v.config_write(u16::from(pci::CAP_MSIX_OFFSET) + 2, &ctl.to_le_bytes());
                    if i.is_multiple_of(2) {
                        // Every other storm with a sane set-up, so that some are delivered.
                        let e = pci::MSIX_TABLE_OFFSET + 16 * Engine::Blit.index() as u64;
                        v.bar0_write(e, &0xFEE0_0000u32.to_le_bytes());
                        v.bar0_write(e + 12, &0u32.to_le_bytes());
                        let on = 1u16 << 15;
                        v.config_write(u16::from(pci::CAP_MSIX_OFFSET) + 2, &on.to_le_bytes());
                    }
                }
                let mask = if i.is_multiple_of(4) {
                    i.rotate_left(i % 32)
                } else {
                    0
                };
                hostile.write32(regs::INTR_MASK, mask);
                let _ = hostile.submit(Engine::Blit, &storm);
                let _ = hostile.wait_idle(Engine::Blit, T);
                hostile.write32(regs::INTR_STATUS, u32::MAX);
                if i.is_multiple_of(16) {
                    hostile.write32(regs::RESET_CTL, regs::RESET_DEVICE);
                    hostile.forget_rings();
                }
            }
        })
    };
    let vec = Engine::Blit.index() as u16;
    let mut last = victim_irqs.count(vec);
    let mut round = 0u32;
    while round < 200 || storms.load(Ordering::Relaxed) < 300 {
        round += 1;
        assert!(round < 1_000_000, "the hostile thread made no progress");
        let fill = enc::color_blt(
            ROP_PATCOPY,
            BPP_32,
            victim.gm_of_lmem(0x10_0000),
            256,
            64,
            8,
            round,
        );
        victim
            .submit(
                Engine::Blit,
                &[fill.as_slice(), &enc::user_interrupt()].concat(),
            )
            .unwrap();
        victim.wait_idle(Engine::Blit, T).unwrap();
        let t0 = Instant::now();
        while victim_irqs.count(vec) == last {
            assert!(t0.elapsed() < T, "victim round {round}: interrupt lost");
            std::thread::sleep(Duration::from_micros(50));
        }
        assert_eq!(
            victim_irqs.count(vec),
            last + 1,
            "victim round {round}: one interrupt"
        );
        last += 1;
        assert_eq!(
            victim.read32(regs::INTR_STATUS),
            regs::intr_user(Engine::Blit),
            "victim round {round}: only its own status"
        );
        victim.write32(regs::INTR_STATUS, regs::intr_user(Engine::Blit));
        let mut px = [0u8; 4];
        victim.lmem_read(0x10_0000 + 256 * 7 + 252, &mut px);
        assert_eq!(u32::from_le_bytes(px), round, "victim round {round}: fill");
    }
    stop.store(true, Ordering::Relaxed);
    ht.join().unwrap();
    let other: u64 = (0..pci::MSIX_VECTORS)
        .filter(|&v| v != vec)
        .map(|v| victim_irqs.count(v))
        .sum();
    assert_eq!(other, 0, "the victim got no interrupts it did not cause");
    let storm: u64 = (0..pci::MSIX_VECTORS).map(|v| hostile_irqs.count(v)).sum();
    println!(
        "hostile vGPU: {} storms, {storm} interrupts; the victim got exactly its {round}",
        storms.load(Ordering::Relaxed)
    );
    assert!(
        storm > 0,
        "the hostile vGPU's interrupts were delivered too"
    );
    drop((va, vh));
}

#[test]
fn test_ring_tail_wrap_rewind_and_moves_while_running_stay_inside_own_ring() {
    let mut phys = phys(128);
    let sched = Scheduler::new(&SchedConfig::default()).unwrap();
    let (va, mut victim) = attach(&sched, vgpu(&mut phys, "mini", GttMode::Shadow));
    let (vh, mut hostile) = attach(&sched, vgpu(&mut phys, "mini", GttMode::Shadow));
    let victim_before = {
        let mut b = vec![0u8; 1 << 20];
        victim.lmem_write(0x20_0000, &pattern(1 << 20, 9));
        victim.lmem_read(0x20_0000, &mut b);
        b
    };
    let b = regs::engine_base(Engine::Blit);
    hostile.setup_ring(Engine::Blit).unwrap();
    let ring_off = vgpu_device::driver::ring_lmem_offset(hostile.pv().lmem_size, Engine::Blit);
    let fence_gm = hostile.gm_of_lmem(0x30_0000);
    let fence = |v: u32| enc::store_data_imm(fence_gm, v);
    let read_fence = |d: &mut Driver<Locked>| {
        let mut f = [0u8; 4];
        d.lmem_read(0x30_0000, &mut f);
        u32::from_le_bytes(f)
    };
    // 1. A submission that wraps: 8 bytes before the end of the ring, then from offset 0.
    let cmd = [enc::noop().as_slice(), &fence(1)].concat();
    let start = RING_BYTES - 8;
    let bytes = dw_bytes(&cmd);
    hostile.write32(b + regs::RING_CTL, 0);
    hostile.write32(b + regs::RING_SIZE, RING_BYTES);
    hostile.write32(b + regs::RING_CTL, regs::RING_CTL_ENABLE);
    // Move HEAD to `start` with a run of no-ops.
    hostile.lmem_write(ring_off, &vec![0u8; start as usize]);
    hostile.write32(b + regs::RING_TAIL, start);
    hostile.wait_idle(Engine::Blit, T).unwrap();
    hostile.lmem_write(ring_off + u64::from(start), &bytes[..8]);
    hostile.lmem_write(ring_off, &bytes[8..]);
    let tail = (bytes.len() - 8) as u32;
    hostile.write32(b + regs::RING_TAIL, tail);
    hostile.wait_idle(Engine::Blit, T).unwrap();
    assert_eq!(read_fence(&mut hostile), 1, "the wrapped submission ran");
    assert_eq!(hostile.read32(b + regs::RING_HEAD), tail);
    // 2. TAIL == HEAD: nothing to do.
    hostile.write32(b + regs::RING_TAIL, tail);
    hostile.wait_idle(Engine::Blit, T).unwrap();
    assert_eq!(read_fence(&mut hostile), 1);
    // 3. TAIL rewound behind HEAD: the whole ring but one dword is submitted — stale commands
    // and zeros. The stale fence runs again (its value is 1), nothing outside the vGPU moves.
    hostile.write32(b + regs::RING_TAIL, tail - 4);
    let _ = hostile.wait_idle(Engine::Blit, T);
    // 4. TAIL moved repeatedly while a long submission runs: each write is a doorbell, scanned.
    hostile.write32(regs::RESET_CTL, regs::reset_engine(Engine::Blit));
    hostile.forget_rings();
    for i in 0..50u32 {
        let big = enc::color_blt(
            ROP_PATCOPY,
            BPP_32,
            hostile.gm_of_lmem(0),
            4096,
            1024,
            256,
            i,
        );
        let _ = hostile.submit(Engine::Blit, &[big.as_slice(), &fence(100 + i)].concat());
        let head = hostile.read32(b + regs::RING_HEAD);
        hostile.write32(b + regs::RING_TAIL, head.wrapping_add(i * 4) % RING_BYTES);
        hostile.write32(b + regs::RING_TAIL, head);
        if hostile.read32(b + regs::ENGINE_STATUS) & regs::ENGINE_STATUS_ERROR != 0 {
            hostile.write32(regs::RESET_CTL, regs::reset_engine(Engine::Blit));
            hostile.forget_rings();
        }
    }
    // The victim works and its memory is intact.
    let c = enc::color_blt(
        ROP_PATCOPY,
        BPP_32,
        victim.gm_of_lmem(0x10_0000),
        256,
        64,
        8,
        0x77,
    );
    victim.submit(Engine::Blit, &c).unwrap();
    victim.wait_idle(Engine::Blit, T).unwrap();
    let mut now = vec![0u8; 1 << 20];
    victim.lmem_read(0x20_0000, &mut now);
    assert!(now == victim_before, "victim memory changed");
    // And the hostile vGPU recovers after an engine reset.
    hostile.write32(regs::RESET_CTL, regs::reset_engine(Engine::Blit));
    hostile.forget_rings();
    hostile.submit(Engine::Blit, &fence(0xD0E)).unwrap();
    hostile.wait_idle(Engine::Blit, T).unwrap();
    assert_eq!(read_fence(&mut hostile), 0xD0E);
    drop((va, vh));
}
