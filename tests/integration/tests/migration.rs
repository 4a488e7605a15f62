//! Snapshot/restore and live migration of vGPUs between two vgpud instances (two `Daemon`s in
//! one process), with a VMM attached through the `vfio_user` Client and a guest driver running
//! work across the move. Results are compared bit for bit with an uninterrupted run.
#![allow(clippy::cast_possible_truncation)] // Test arithmetic on small known values.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vgpu_abi::{regs, Engine, PAGE_SIZE};
use vgpu_api::daemon::VgpuSpec;
use vgpu_api::migrate::{
    migrate_to, restore_from_file, snapshot_to_file, Endpoint, Listener, ReceiveSpec,
};
use vgpu_device::driver::Driver;
use vgpu_device::vgpu::GttMode;
use vgpu_integration_tests::workload::{aperture, seed_ram, setup, step};
use vgpu_integration_tests::*;
use vgpu_migration::{Phase, SourceConfig};

const T: Duration = Duration::from_secs(20);
const STEPS: u32 = 96;

fn spec(gtt: GttMode, name: &str) -> VgpuSpec {
    VgpuSpec {
        profile: "small".into(),
        gtt,
        name: Some(name.into()),
        weight: None,
    }
}

/// The reference: the whole workload on one vGPU, no interruption.
fn reference() -> Vec<u8> {
    let daemon = daemon(256);
    let info = daemon.create(&spec(GttMode::Shadow, "ref")).unwrap();
    let mut d = Driver::probe(Vmm::attach(&info.socket)).unwrap();
    seed_ram(&d.device().ram);
    setup(&mut d);
    for i in 0..STEPS {
        step(&mut d, i);
    }
    d.wait_idle(Engine::Blit, T).unwrap();
    aperture(&mut d)
}

#[test]
fn test_live_migration_while_workload_runs_gives_bit_identical_output() {
    let want = reference();
    let src = Arc::new(daemon(256));
    let dst = Arc::new(daemon(256));
    let info = src.create(&spec(GttMode::Shadow, "vm")).unwrap();
    let mut d = Driver::probe(Vmm::attach(&info.socket)).unwrap();
    seed_ram(&d.device().ram);
    setup(&mut d);

    // The "VM" runs the workload until the migration asks it to pause (as the VMM pauses its
    // vCPUs before the device's stop-and-copy).
    let pause = Arc::new(AtomicBool::new(false));
    let paused_at = Arc::new(AtomicU32::new(u32::MAX));
    let vm = {
        let (pause, paused_at) = (pause.clone(), paused_at.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while i < STEPS && !pause.load(Ordering::Acquire) {
                step(&mut d, i);
                i += 1;
                std::thread::sleep(Duration::from_micros(300));
            }
            paused_at.store(i, Ordering::Release);
            d
        })
    };
    std::thread::sleep(Duration::from_millis(5));

    let sock = temp_path("mig.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = Listener::bind(&Endpoint::Unix(sock.clone())).unwrap();
    let receiver = {
        let dst = dst.clone();
        // Received paused: work queued at the stop-and-copy reads guest RAM, which exists on
        // the destination only once the VM has reconnected.
        let incoming = ReceiveSpec {
            name: Some("vm".into()),
            gtt: Some(GttMode::TwoDim),
            paused: true,
        };
        std::thread::spawn(move || listener.receive(&dst, incoming))
    };
    let mut phases = Vec::new();
    let report = migrate_to(
        &src,
        info.id,
        &Endpoint::Unix(sock),
        &SourceConfig::default(),
        &mut |p| {
            if p.phase == Phase::StopAndCopy && !pause.swap(true, Ordering::AcqRel) {
                while paused_at.load(Ordering::Acquire) == u32::MAX {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            phases.push(p.phase);
        },
    )
    .unwrap();
    let (moved, dreport) = receiver.join().unwrap().unwrap();
    assert!(phases.contains(&Phase::StopAndCopy) && phases.contains(&Phase::Commit));
    println!(
        "migration: {} rounds, predicted downtime {} us, actual {} us, {} bytes, destination restore {:?}",
        report.rounds.len(),
        report.predicted_downtime_us,
        report.downtime_us,
        report.bytes_sent,
        dreport
    );
    assert!(
        src.scheduler().is_paused(info.id),
        "source stays paused after handing over"
    );
    assert!(
        dst.scheduler().is_paused(moved.id),
        "destination left paused as asked"
    );

    // The VM reconnects to the destination (as Cloud Hypervisor does after a restore) with the
    // same guest RAM, and finishes the workload there.
    let mut d = vm.join().unwrap();
    let stopped = paused_at.load(Ordering::Acquire);
    let ram = std::mem::replace(&mut d.device().ram, Mapping::memfd(4096));
    drop(
        d.replace_device(Vmm::attach_ram(&moved.socket, ram))
            .detach(),
    );
    dst.scheduler().resume(moved.id).unwrap();
    for i in stopped..STEPS {
        step(&mut d, i);
    }
    d.wait_idle(Engine::Blit, T).unwrap();
    assert_eq!(d.read32(regs::GTT_FAULT_COUNT), 0);
    assert!(
        aperture(&mut d) == want,
        "migrated run differs from the uninterrupted run (stopped at step {stopped})"
    );
    src.destroy(info.id).unwrap();
}

#[test]
fn test_migration_to_failing_destination_leaves_source_running() {
    let src = daemon(256);
    let dst = daemon(256);
    let info = src.create(&spec(GttMode::TwoDim, "vm")).unwrap();
    let mut d = Driver::probe(Vmm::attach(&info.socket)).unwrap();
    seed_ram(&d.device().ram);
    setup(&mut d);
    for i in 0..8 {
        step(&mut d, i);
    }
    d.wait_idle(Engine::Blit, T).unwrap();
    // A destination that hangs up after accepting, and one whose GM ranges are taken.
    let sock = temp_path("mig-cut.sock");
    let _ = std::fs::remove_file(&sock);
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let cutter = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut buf = [0u8; 64];
        let _ = std::io::Read::read(&mut &s, &mut buf);
        drop(s);
    });
    assert!(migrate_to(
        &src,
        info.id,
        &Endpoint::Unix(sock.clone()),
        &SourceConfig::default(),
        &mut |_| {}
    )
    .is_err());
    cutter.join().unwrap();
    let _ = std::fs::remove_file(&sock);
    let _blocker = dst.create(&spec(GttMode::Shadow, "first")).unwrap();
    let l2 = Listener::bind(&Endpoint::Unix(sock.clone())).unwrap();
    let dst = Arc::new(dst);
    let receiver = {
        let dst = dst.clone();
        std::thread::spawn(move || l2.receive(&dst, ReceiveSpec::default()))
    };
    let e = migrate_to(
        &src,
        info.id,
        &Endpoint::Unix(sock),
        &SourceConfig::default(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(receiver.join().unwrap().is_err());
    println!(
        "refused as expected: {}",
        vgpu_migration::report::error_chain(&e)
    );
    assert_eq!(dst.list().len(), 1, "nothing left on the destination");
    // The source runs on.
    assert!(!src.scheduler().is_paused(info.id));
    for i in 8..16 {
        step(&mut d, i);
    }
    d.wait_idle(Engine::Blit, T).unwrap();
}

#[test]
fn test_snapshot_file_restore_on_other_daemon_continues_bit_identical() {
    let want = reference();
    let src = daemon(256);
    let info = src.create(&spec(GttMode::TwoDim, "vm")).unwrap();
    let mut d = Driver::probe(Vmm::attach(&info.socket)).unwrap();
    seed_ram(&d.device().ram);
    setup(&mut d);
    for i in 0..STEPS / 2 {
        step(&mut d, i);
    }
    // Cloud Hypervisor sequence: vm.pause (the driver stops), vGPU snapshot, vm.snapshot.
    let path = temp_path("snap.vgpu");
    let snap = snapshot_to_file(&src, info.id, &path).unwrap();
    assert!(snap.bytes > 0);
    let ram = std::mem::replace(&mut d.device().ram, Mapping::memfd(4096));
    drop(d);
    src.destroy(info.id).unwrap();

    // Corrupted and truncated copies are refused and leave nothing behind.
    let dst = daemon(256);
    let bytes = std::fs::read(&path).unwrap();
    for (name, bad) in [
        ("trunc", bytes[..bytes.len() / 2].to_vec()),
        ("flip", {
            let mut b = bytes.clone();
            b[100] ^= 0x40;
            b
        }),
    ] {
        let p = temp_path(name);
        std::fs::write(&p, bad).unwrap();
        let e = restore_from_file(&dst, &p, Some("x".into()), None).unwrap_err();
        println!("{name}: {}", vgpu_migration::report::error_chain(&e));
        assert!(dst.list().is_empty());
        let _ = std::fs::remove_file(p);
    }
    // Restored paused: its queued work reads guest RAM, which only exists once the VM is back.
    let restored = vgpu_api::migrate::restore_from_file_with(
        &dst,
        &path,
        Some("vm".into()),
        Some(GttMode::Shadow),
        false,
    )
    .unwrap();
    let _ = std::fs::remove_file(&path);
    // The VM reconnects with its RAM; GGTT entries into guest RAM were restored before the
    // VMM mapped it, and get their translations now.
    let mut d = Driver::probe(Vmm::attach_ram(&restored.socket, ram)).unwrap();
    dst.scheduler().resume(restored.id).unwrap();
    d.adopt_rings();
    for i in STEPS / 2..STEPS {
        step(&mut d, i);
    }
    d.wait_idle(Engine::Blit, T).unwrap();
    assert!(
        aperture(&mut d) == want,
        "restored run differs from the uninterrupted run"
    );
}

#[test]
fn test_idle_vgpu_migration_converges_in_one_round() {
    // An idle vGPU has (almost) only zero pages: pre-copy must not mistake its cheap zero-page
    // markers for a slow link and run to the round limit.
    let src = daemon(256);
    let dst = Arc::new(daemon(256));
    let info = src.create(&spec(GttMode::Shadow, "idle")).unwrap();
    let sock = temp_path("mig-idle.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = Listener::bind(&Endpoint::Unix(sock.clone())).unwrap();
    let receiver = {
        let dst = dst.clone();
        std::thread::spawn(move || listener.receive(&dst, ReceiveSpec::default()))
    };
    let report = migrate_to(
        &src,
        info.id,
        &Endpoint::Unix(sock),
        &SourceConfig::default(),
        &mut |_| {},
    )
    .unwrap();
    let (moved, _) = receiver.join().unwrap().unwrap();
    assert!(
        !dst.scheduler().is_paused(moved.id),
        "destination runs after the commit unless asked to stay paused"
    );
    // Converged, or (on a loaded machine whose page scan alone takes longer than the target)
    // stopped because no further round could help: either way after the first round.
    assert!(
        matches!(
            report.stop_reason,
            vgpu_migration::StopReason::Converged | vgpu_migration::StopReason::FloorAboveTarget
        ),
        "{report:?}"
    );
    assert_eq!(report.precopy_rounds, 1);
}

#[test]
fn test_page_changed_back_after_being_sent_is_still_dirty() {
    // A page goes A -> B (B is sent) -> A: the destination holds B, so the page must be dirty
    // again. The hash baseline is what was last sent, not what was last hashed.
    use vgpu_migration::Migratable;
    let src = daemon(256);
    let info = src.create(&spec(GttMode::Shadow, "aba")).unwrap();
    let vgpu = src.vgpu(info.id).unwrap();
    let write = |b: u8| {
        vgpu.lock()
            .unwrap()
            .bar2_write(5 * PAGE_SIZE, &[b; PAGE_SIZE as usize]);
    };
    write(0xA);
    let mut m = vgpu_api::migrate::VgpuMigration::source(&src, info.id).unwrap();
    m.start_dirty_log().unwrap();
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    // Round 1 reads every page; the guest writes B just before page 5 is read...
    for p in 0..m.memory_size() / PAGE_SIZE {
        if p == 5 {
            write(0xB);
        }
        m.read_page(p, &mut buf).unwrap();
        if p == 5 {
            assert_eq!(buf[0], 0xB, "B was sent");
        }
    }
    // ...and A again before the next scan: same hash as when dirty logging started.
    write(0xA);
    assert_eq!(
        m.dirty_pages().unwrap(),
        vec![5],
        "back to A after B was sent: dirty"
    );
    m.read_page(5, &mut buf).unwrap();
    assert!(m.dirty_pages().unwrap().is_empty(), "sent again: clean");
    m.stop_dirty_log().unwrap();
}

#[test]
fn test_parallel_dirty_scan_finds_writes_at_every_range_boundary() {
    // The scan hashes contiguous ranges on several threads: a CPU write on either side of any
    // split (for 1 to 8 threads), and at both ends, must be found, and nothing else.
    use std::collections::BTreeSet;
    use vgpu_migration::Migratable;
    let src = daemon(256);
    let info = src.create(&spec(GttMode::Shadow, "split")).unwrap();
    let vgpu = src.vgpu(info.id).unwrap();
    let mut m = vgpu_api::migrate::VgpuMigration::source(&src, info.id).unwrap();
    let pages = m.memory_size() / PAGE_SIZE;
    m.start_dirty_log().unwrap();
    m.dirty_pages().unwrap();
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    for p in 0..pages {
        m.read_page(p, &mut buf).unwrap();
    }
    assert!(m.dirty_pages().unwrap().is_empty(), "idle after round 1");
    let mut want = BTreeSet::from([0, pages - 1]);
    for threads in 1..=8 {
        let per = pages.div_ceil(threads);
        for first in (per..pages).step_by(per as usize) {
            want.extend([first - 1, first]);
        }
    }
    for &p in &want {
        // One byte at the end of the page: the rest of it stays as it was.
        vgpu.lock()
            .unwrap()
            .bar2_write(p * PAGE_SIZE + PAGE_SIZE - 1, &[0x5A]);
    }
    assert_eq!(
        m.dirty_pages().unwrap(),
        want.iter().copied().collect::<Vec<_>>()
    );
    for &p in &want {
        m.read_page(p, &mut buf).unwrap();
    }
    assert!(m.dirty_pages().unwrap().is_empty(), "all sent: clean");
    m.stop_dirty_log().unwrap();
}
