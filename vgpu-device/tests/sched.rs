//! The scheduler with real engine threads: concurrency across engines, watchdog isolation,
//! runtime parameter changes.
#![allow(clippy::cast_possible_truncation, clippy::drop_non_drop)] // Test arithmetic on small known values.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use vgpu_abi::cmd::{enc, AuditReason, BPP_32, ROP_PATCOPY};
use vgpu_abi::{regs, Engine};
use vgpu_device::driver::{Driver, Locked};
use vgpu_device::sched::{Policy, SchedConfig, SchedParams, Scheduler};
use vgpu_device::vgpu::{GttMode, Vgpu};

fn attach(sched: &Scheduler, v: Vgpu, weight: u32) -> (Arc<Mutex<Vgpu>>, Driver<Locked>) {
    sched
        .add_vgpu(
            v.shared().clone(),
            SchedParams {
                weight,
                ..Default::default()
            },
        )
        .unwrap();
    let v = Arc::new(Mutex::new(v));
    let d = Driver::probe(Locked(v.clone())).unwrap();
    (v, d)
}

fn fill(d: &mut Driver<Locked>, off: u64, color: u32, w: u32, h: u32) -> Vec<u32> {
    let gm = d.gm_of_lmem(off);
    enc::color_blt(ROP_PATCOPY, BPP_32, gm, w * 4, w, h, color).to_vec()
}

#[test]
fn test_two_vgpus_on_different_engines_both_complete() {
    let mut phys = phys(128);
    let sched = Scheduler::new(&SchedConfig::default()).unwrap();
    let (_a, mut da) = attach(&sched, vgpu(&mut phys, "mini", GttMode::Shadow), 1);
    let (_b, mut db) = attach(&sched, vgpu(&mut phys, "mini", GttMode::TwoDim), 1);
    let blit = fill(&mut da, 0, 0x1234_5678, 256, 64);
    da.submit(Engine::Blit, &blit).unwrap();
    let gm = db.gm_of_lmem(0);
    let draw = [
        enc::surface_state(gm, 1024, 256, 64, regs::PLANE_FORMAT_XRGB8888).to_vec(),
        enc::fill_rect(0, 0, 256, 64, 0xff00_ff00, false).to_vec(),
    ]
    .concat();
    db.submit(Engine::Render, &draw).unwrap();
    da.wait_idle(Engine::Blit, Duration::from_secs(10)).unwrap();
    db.wait_idle(Engine::Render, Duration::from_secs(10))
        .unwrap();
    let mut px = [0u8; 4];
    da.lmem_read(4 * 255, &mut px);
    assert_eq!(u32::from_le_bytes(px), 0x1234_5678);
    db.lmem_read(1024 * 63, &mut px);
    assert_eq!(u32::from_le_bytes(px), 0xff00_ff00);
    let trace = sched.trace();
    assert!(trace.iter().any(|t| t.engine == "blit" && t.commands > 0));
    assert!(trace.iter().any(|t| t.engine == "render" && t.commands > 0));
}

#[test]
fn test_watchdog_resets_spinning_vgpu_while_neighbour_finishes() {
    let mut phys = phys(128);
    let cfg = SchedConfig {
        watchdog: Duration::from_millis(100),
        ..Default::default()
    };
    let sched = Scheduler::new(&cfg).unwrap();
    let (spin_v, mut spin) = attach(&sched, vgpu(&mut phys, "mini", GttMode::Shadow), 1);
    let (_good_v, mut good) = attach(&sched, vgpu(&mut phys, "mini", GttMode::Shadow), 1);
    // The spinner waits for a semaphore value that never comes.
    let sem = spin.gm_of_lmem(0x1000);
    let mut cmds = enc::semaphore_wait(sem, 0xdead, false).to_vec();
    cmds.extend(enc::store_data_imm(spin.gm_of_lmem(0x2000), 7));
    spin.submit(Engine::Blit, &cmds).unwrap();
    // The neighbour does 20 fills meanwhile on the same engine.
    for i in 0..20u32 {
        let c = fill(&mut good, u64::from(i) * 4096, i, 32, 32);
        good.submit(Engine::Blit, &c).unwrap();
    }
    good.wait_idle(Engine::Blit, Duration::from_secs(10))
        .unwrap();
    for i in 0..20u64 {
        let mut px = [0u8; 4];
        good.lmem_read(i * 4096 + 4 * 31 * 32, &mut px);
        assert_eq!(u32::from_le_bytes(px), i as u32);
    }
    // The spinner is reset by the watchdog.
    let b = regs::engine_base(Engine::Blit);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while spin.read32(b + regs::ERROR_CODE) != AuditReason::Watchdog as u32 {
        assert!(std::time::Instant::now() < deadline, "watchdog never fired");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_ne!(
        spin.read32(regs::INTR_STATUS) & regs::intr_reset(Engine::Blit),
        0
    );
    assert_eq!(spin.read32(b + regs::RING_CTL), 0, "ring disabled");
    let mut fence = [0u8; 4];
    spin.lmem_read(0x2000, &mut fence);
    assert_eq!(fence, [0; 4], "work after the hang never ran");
    assert_eq!(
        spin_v.lock().unwrap().shared().audit.since(0, 10)[0].reason,
        "watchdog"
    );
    // Recovery: re-enable and run.
    spin.forget_rings();
    spin.setup_ring(Engine::Blit).unwrap();
    let c = fill(&mut spin, 0x3000, 0xabcd, 8, 1);
    spin.submit(Engine::Blit, &c).unwrap();
    spin.wait_idle(Engine::Blit, Duration::from_secs(10))
        .unwrap();
}

#[test]
fn test_device_fault_in_engine_resets_only_that_context_engine_serves_on() {
    // A defect in the device model (here: an injected panic in the middle of executing a
    // submission) must cost only the context it hit, not the engine thread every vGPU shares.
    let mut phys = phys(128);
    let sched = Scheduler::new(&SchedConfig::default()).unwrap();
    let (bad_v, mut bad) = attach(&sched, vgpu(&mut phys, "mini", GttMode::Shadow), 1);
    let (_good_v, mut good) = attach(&sched, vgpu(&mut phys, "mini", GttMode::TwoDim), 1);
    bad_v
        .lock()
        .unwrap()
        .shared()
        .engine(Engine::Blit)
        .inject_device_fault();
    let c = fill(&mut bad, 0, 0x5555, 16, 1);
    bad.submit(Engine::Blit, &c).unwrap();
    let c = fill(&mut bad, 0x1000, 0x6666, 16, 1);
    bad.submit(Engine::Blit, &c).unwrap();
    let b = regs::engine_base(Engine::Blit);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while bad.read32(b + regs::ERROR_CODE) != AuditReason::DeviceFault as u32 {
        assert!(std::time::Instant::now() < deadline, "fault never reported");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_ne!(
        bad.read32(regs::INTR_STATUS) & regs::intr_reset(Engine::Blit),
        0
    );
    assert_eq!(bad.read32(b + regs::RING_CTL), 0, "ring disabled");
    let mut px = [0u8; 4];
    bad.lmem_read(0x1000, &mut px);
    assert_eq!(px, [0; 4], "work queued behind the fault was dropped");
    let audit = bad_v.lock().unwrap().shared().audit.since(0, 10);
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].reason, "device_fault");
    // The engine thread survived: the neighbour's work on the same engine runs, bit-exact.
    for i in 0..20u32 {
        let c = fill(&mut good, u64::from(i) * 4096, i + 1, 32, 32);
        good.submit(Engine::Blit, &c).unwrap();
    }
    good.wait_idle(Engine::Blit, Duration::from_secs(10))
        .unwrap();
    for i in 0..20u64 {
        good.lmem_read(i * 4096 + 4 * 31 * 32, &mut px);
        assert_eq!(u32::from_le_bytes(px), i as u32 + 1);
    }
    // And the faulted vGPU recovers like after a watchdog reset.
    bad.forget_rings();
    bad.setup_ring(Engine::Blit).unwrap();
    let c = fill(&mut bad, 0x2000, 0x7777, 16, 1);
    bad.submit(Engine::Blit, &c).unwrap();
    bad.wait_idle(Engine::Blit, Duration::from_secs(10))
        .unwrap();
    bad.lmem_read(0x2000, &mut px);
    assert_eq!(u32::from_le_bytes(px), 0x7777);
}

#[test]
fn test_params_and_policy_change_at_runtime() {
    let mut phys = phys(64);
    let sched = Scheduler::new(&SchedConfig::default()).unwrap();
    let v = vgpu(&mut phys, "mini", GttMode::Shadow);
    let id = v.id();
    sched
        .add_vgpu(v.shared().clone(), SchedParams::default())
        .unwrap();
    assert!(
        sched
            .add_vgpu(v.shared().clone(), SchedParams::default())
            .is_err(),
        "duplicate"
    );
    sched
        .set_params(
            id,
            Some(Engine::Blit),
            SchedParams {
                weight: 7,
                reserve_pct: 10,
                cap_pct: 50,
            },
        )
        .unwrap();
    sched.set_policy(Engine::Blit, Policy::FixedShare);
    assert_eq!(sched.policy(Engine::Blit), Policy::FixedShare);
    let s = sched.shares();
    assert!(s.iter().any(|x| x.engine == "blit" && x.params.weight == 7));
    assert!(sched
        .set_params(
            id,
            None,
            SchedParams {
                weight: 0,
                ..Default::default()
            }
        )
        .is_err());
    assert!(sched.set_params(99, None, SchedParams::default()).is_err());
    assert!(sched.set_slice(Duration::from_millis(11)).is_err());
    sched.set_slice(Duration::from_millis(5)).unwrap();
    sched.remove_vgpu(id).unwrap();
    let p = v
        .into_partition()
        .ok()
        .expect("no engine holds the vGPU after removal");
    phys.release(p).unwrap();
}

#[test]
fn test_pause_queues_doorbells_and_resume_runs_them() {
    let mut phys = phys(128);
    let sched = Scheduler::new(&SchedConfig::default()).unwrap();
    let (v, mut d) = attach(&sched, vgpu(&mut phys, "mini", GttMode::Shadow), 1);
    let id = v.lock().unwrap().id();
    sched.pause(id).unwrap();
    sched.pause(id).unwrap(); // Idempotent.
    assert!(sched.is_paused(id));
    let blit = fill(&mut d, 0, 0x0bad_cafe, 64, 16);
    d.submit(Engine::Blit, &blit).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let shared = v.lock().unwrap().shared().clone();
    let stats = &shared.engine(Engine::Blit).stats;
    assert_eq!(stats.submissions.load(Ordering::Relaxed), 1, "queued");
    assert_eq!(stats.commands.load(Ordering::Relaxed), 0, "not run");
    sched.resume(id).unwrap();
    assert!(!sched.is_paused(id));
    d.wait_idle(Engine::Blit, Duration::from_secs(10)).unwrap();
    let mut px = [0u8; 4];
    d.lmem_read(4 * 63, &mut px);
    assert_eq!(u32::from_le_bytes(px), 0x0bad_cafe);
    let st = stats;
    assert_eq!(
        st.latency.snapshot().count(),
        1,
        "one submission latency observed"
    );
    assert!(st.slices.snapshot().count() >= 1, "slice length observed");
    assert!(sched.pause(9999).is_err());
}
