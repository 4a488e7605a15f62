//! Soak: many vGPUs on one daemon (in-process, with its REST API) running mixed work for a
//! long time — blit, render, video and compute, each result checked bit for bit; VMs that
//! attach over vfio-user, work and detach again and again; and hostile tenants (rejected
//! streams, resets, GGTT and MSI-X junk) — while the API is polled like `vgpuctl top`.
//!
//! Every few seconds it samples RSS (anonymous memory, the leak indicator: local memory is a
//! shared memfd that legitimately fills up as guests touch it), open descriptors, audit events
//! and engine resets, and prints a table; at the end a summary. It fails if a well-behaved
//! tenant saw a wrong result or an error, if anonymous RSS grew by more than `SOAK_RSS_MIB`
//! (default 48) or descriptors by more than 16 between the first sample after warm-up and the
//! end.
//!
//! `SOAK_SECS` (default 60) and `SOAK_VGPUS` (default 16) size it; `scripts/soak --minutes N
//! --vgpus 64` runs it long, in release mode. Ignored by default: CI runs it as its own step.
#![allow(clippy::cast_possible_truncation)] // Test arithmetic on small known values.

mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use vgpu_abi::cmd::{enc, BPP_32, CSC_NV12_TO_XRGB, KERNEL_SAXPY, ROP_PATCOPY};
use vgpu_abi::{pci, regs, Engine};
use vgpu_api::client::Client;
use vgpu_api::daemon::Daemon;
use vgpu_api::rest::{ApiConfig, ApiHandle};
use vgpu_device::driver::{DeviceAccess, Driver, Locked};
use vgpu_device::vgpu::GttMode;
use vgpu_integration_tests::{daemon, temp_path, Vmm};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one tenant does.
#[derive(Clone, Copy, Debug)]
enum Role {
    Blit,
    Render,
    Video,
    Compute,
    /// Attaches over vfio-user, works, detaches, again and again.
    Vmm,
    Hostile,
}

fn role(i: usize) -> Role {
    match i % 8 {
        7 => Role::Hostile,
        6 => Role::Vmm,
        k => [Role::Blit, Role::Render, Role::Video, Role::Compute][k % 4],
    }
}

/// Counters the tenants update.
#[derive(Default)]
struct Stats {
    rounds: AtomicU64,
    failures: AtomicU64,
    attaches: AtomicU64,
    hostile: AtomicU64,
}

fn read_lmem<A: DeviceAccess>(d: &mut Driver<A>, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    d.lmem_read(off, &mut b);
    b
}

/// One round of good work of `role`; returns the bytes that must be the same every round
/// (or checks exact values itself).
fn good_round<A: DeviceAccess>(
    d: &mut Driver<A>,
    role: Role,
    round: u32,
) -> Result<Vec<u8>, String> {
    let err = |e| format!("{role:?} round {round}: {e}");
    match role {
        Role::Blit | Role::Vmm => {
            let color = round.wrapping_mul(0x9E37_79B9);
            let c = enc::color_blt(
                ROP_PATCOPY,
                BPP_32,
                d.gm_of_lmem(0x10_0000),
                1024,
                256,
                16,
                color,
            );
            d.submit(Engine::Blit, &c).map_err(err)?;
            d.wait_idle(Engine::Blit, T).map_err(err)?;
            let got = read_lmem(d, 0x10_0000, 1024 * 16);
            if got
                .chunks_exact(4)
                .any(|c| u32::from_le_bytes(c.try_into().unwrap()) != color)
            {
                return Err(format!("{role:?} round {round}: fill differs"));
            }
            Ok(Vec::new())
        }
        Role::Render => {
            let gm = d.gm_of_lmem(0x20_0000);
            let cmds = [
                enc::surface_state(gm, 512, 128, 64, regs::PLANE_FORMAT_XRGB8888).as_slice(),
                &enc::fill_rect(0, 0, 128, 64, 0xFF10_2030, false),
                &enc::triangle([(3, 2), (120, 9), (40, 60)], 0x80C0_4020, true),
            ]
            .concat();
            d.submit(Engine::Render, &cmds).map_err(err)?;
            d.wait_idle(Engine::Render, T).map_err(err)?;
            Ok(read_lmem(d, 0x20_0000, 512 * 64))
        }
        Role::Video => {
            if round == 1 {
                d.lmem_write(0x30_0000, &pattern(64 * 48 * 3 / 2, 5));
            }
            let c = enc::csc_scale(enc::Csc {
                src: d.gm_of_lmem(0x30_0000),
                src_pitch: 64,
                src_size: (64, 48),
                dst: d.gm_of_lmem(0x31_0000),
                dst_pitch: 400,
                dst_size: (100, 70),
                mode: CSC_NV12_TO_XRGB,
            });
            d.submit(Engine::Video, &c).map_err(err)?;
            d.wait_idle(Engine::Video, T).map_err(err)?;
            Ok(read_lmem(d, 0x31_0000, 400 * 70))
        }
        Role::Compute => {
            let n = 1024u32;
            let x: Vec<u8> = (0..n)
                .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
                .collect();
            let y: Vec<u8> = (0..n)
                .flat_map(|i| (1.0 - i as f32).to_le_bytes())
                .collect();
            d.lmem_write(0x40_0000, &x);
            d.lmem_write(0x41_0000, &y);
            let c = enc::dispatch(enc::Dispatch {
                kernel: KERNEL_SAXPY,
                params: [n, 0, 0],
                scalar: 3.0,
                buffers: [d.gm_of_lmem(0x40_0000), d.gm_of_lmem(0x41_0000), 0],
            });
            d.submit(Engine::Compute, &c).map_err(err)?;
            d.wait_idle(Engine::Compute, T).map_err(err)?;
            Ok(read_lmem(d, 0x41_0000, n as usize * 4))
        }
        Role::Hostile => unreachable!(),
    }
}

/// A hostile round: rejected streams, bad tails, GGTT junk, MSI-X junk, resets.
fn hostile_round(d: &mut Driver<Locked>, round: u32) {
    let e = Engine::ALL[round as usize % 4];
    let b = regs::engine_base(e);
    let _ = d.submit(e, &[0xEEAD_0003, round, 2, 3]);
    d.write32(b + regs::RING_TAIL, round | 3);
    let neighbour_gm = d.pv().mappable_base + d.pv().mappable_size + 0x1000;
    let _ = d.submit(e, &enc::store_data_imm(neighbour_gm, round));
    d.map_gm(
        d.pv().hidden_base + u64::from(round % 64) * 4096,
        u64::from(round) << 12 | 3,
    );
    d.write32(regs::RESET_CTL, regs::reset_engine(e));
    d.device().bar0_write(
        pci::MSIX_TABLE_OFFSET + u64::from(round % 80),
        &round.to_le_bytes(),
    );
    if round.is_multiple_of(16) {
        d.write32(regs::RESET_CTL, regs::RESET_DEVICE);
        d.write32(regs::INTR_MASK, 0);
    }
    d.forget_rings();
}

fn tenant(
    daemon: Arc<Daemon>,
    id: u32,
    socket: PathBuf,
    role: Role,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
) {
    let vgpu = daemon.vgpu(id).expect("vGPU");
    let mut round = 0u32;
    let mut reference: Option<Vec<u8>> = None;
    let fail = |msg: String| {
        eprintln!("FAILURE vGPU {id}: {msg}");
        stats.failures.fetch_add(1, Ordering::Relaxed);
    };
    let mut d = Driver::probe(Locked(vgpu.clone())).expect("probe");
    while !stop.load(Ordering::Relaxed) {
        round = round.wrapping_add(1);
        match role {
            Role::Hostile => {
                hostile_round(&mut d, round);
                stats.hostile.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(3));
            }
            Role::Vmm => {
                // A VM session: attach (DMA map, eventfds), a few rounds, detach.
                let mut v = match Driver::probe(Vmm::attach(&socket)) {
                    Ok(v) => v,
                    Err(e) => {
                        fail(format!("attach: {e}"));
                        continue;
                    }
                };
                v.forget_rings();
                for k in 0..4 {
                    if let Err(e) = good_round(&mut v, role, round.wrapping_mul(8) + k) {
                        fail(e);
                    }
                }
                drop(v);
                stats.attaches.fetch_add(1, Ordering::Relaxed);
                stats.rounds.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                match good_round(&mut d, role, round) {
                    Ok(out) => match &reference {
                        None => reference = Some(out),
                        Some(r) if *r != out => fail(format!(
                            "{role:?} round {round}: output differs from round 1"
                        )),
                        Some(_) => {}
                    },
                    Err(e) => {
                        fail(e);
                        d.write32(regs::RESET_CTL, regs::RESET_DEVICE);
                        d.write32(regs::INTR_MASK, 0);
                        d.forget_rings();
                    }
                }
                stats.rounds.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// (VmRSS, RssAnon) in KiB and open descriptors of this process.
fn proc_sample() -> (u64, u64, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count);
    (field("VmRSS:"), field("RssAnon:"), fds)
}

#[test]
#[ignore = "long: run by .ci/run as its own step and by scripts/soak"]
fn test_soak_mixed_and_hostile_tenants_flat_rss_and_fds_no_errors() {
    let secs = env_u64("SOAK_SECS", 60);
    let n = env_u64("SOAK_VGPUS", 16) as usize;
    let every = env_u64("SOAK_SAMPLE_SECS", 5).max(1);
    let rss_limit_mib = env_u64("SOAK_RSS_MIB", 48);
    let d = Arc::new(daemon(((n as u64) * 16 + 64).clamp(512, 4096)));
    let dir = temp_path("soak");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let api_sock = dir.join("api.sock");
    let api = ApiHandle::spawn(d.clone(), &ApiConfig::unix(&api_sock)).unwrap();
    let client = Client::unix(&api_sock).unwrap().with_timeout(T);
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Stats::default());
    let mut threads = Vec::new();
    let mut roles = [0usize; 6];
    for i in 0..n {
        let r = role(i);
        roles[r as usize] += 1;
        let gtt = if i.is_multiple_of(2) {
            GttMode::Shadow
        } else {
            GttMode::TwoDim
        };
        let info = d.create(&spec("mini", gtt, &format!("soak{i}"))).unwrap();
        let (dd, st, s) = (d.clone(), stop.clone(), stats.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("tenant-{i}"))
                .spawn(move || tenant(dd, info.id, info.socket, r, st, s))
                .unwrap(),
        );
    }
    println!(
        "soak: {n} vGPUs (blit {}, render {}, video {}, compute {}, vfio-user VMs {}, hostile {}) for {secs} s",
        roles[0], roles[1], roles[2], roles[3], roles[4], roles[5]
    );
    println!("| t (s) | VmRSS MiB | RssAnon MiB | fds | rounds | VM attaches | hostile rounds | audit events | engine resets | failures |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let t0 = Instant::now();
    let mut samples: Vec<(u64, u64, u64, usize)> = Vec::new();
    let mut next = 0;
    loop {
        // Poll the API like `vgpuctl top` does, all the time.
        let stats_api = client.request(vgpu_api::client::Method::GET, "/api/v1/stats", None);
        assert!(
            stats_api.is_ok_and(|r| r.status.as_u16() == 200),
            "API /stats"
        );
        let el = t0.elapsed().as_secs();
        if el >= next {
            let (rss, anon, fds) = proc_sample();
            let c = d.counters();
            let audits: u64 = c.iter().map(|v| v.audit_events).sum();
            let resets: u64 = c
                .iter()
                .flat_map(|v| v.engines.iter().map(|e| e.resets))
                .sum();
            println!(
                "| {el} | {} | {} | {fds} | {} | {} | {} | {audits} | {resets} | {} |",
                rss / 1024,
                anon / 1024,
                stats.rounds.load(Ordering::Relaxed),
                stats.attaches.load(Ordering::Relaxed),
                stats.hostile.load(Ordering::Relaxed),
                stats.failures.load(Ordering::Relaxed),
            );
            samples.push((el, rss, anon, fds));
            next += every;
        }
        if el >= secs {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("tenant thread");
    }
    let (rss, anon, fds) = proc_sample();
    samples.push((t0.elapsed().as_secs(), rss, anon, fds));
    // Warm-up: the first quarter (every tenant has allocated its buffers and rings).
    let warm = samples
        .iter()
        .find(|s| s.0 >= secs / 4)
        .copied()
        .unwrap_or(samples[0]);
    let last = *samples.last().unwrap();
    let max_fds = samples.iter().map(|s| s.3).max().unwrap();
    println!(
        "summary: {} rounds, {} VM attaches, {} hostile rounds, {} failures; VmRSS {} -> {} MiB, \
         RssAnon {} -> {} MiB (after warm-up at {} s), fds {} -> {} (max {max_fds})",
        stats.rounds.load(Ordering::Relaxed),
        stats.attaches.load(Ordering::Relaxed),
        stats.hostile.load(Ordering::Relaxed),
        stats.failures.load(Ordering::Relaxed),
        warm.1 / 1024,
        last.1 / 1024,
        warm.2 / 1024,
        last.2 / 1024,
        warm.0,
        warm.3,
        last.3,
    );
    assert_eq!(
        stats.failures.load(Ordering::Relaxed),
        0,
        "well-behaved tenants saw errors"
    );
    assert!(
        stats.rounds.load(Ordering::Relaxed) > n as u64,
        "tenants made progress"
    );
    assert!(
        last.2 <= warm.2 + rss_limit_mib * 1024,
        "anonymous RSS grew from {} to {} KiB",
        warm.2,
        last.2
    );
    assert!(
        last.3 <= warm.3 + 16,
        "descriptors grew from {} to {}",
        warm.3,
        last.3
    );
    let panics: u64 = d.counters().iter().map(|c| c.vfio.panics).sum();
    assert_eq!(panics, 0);
    api.shutdown().unwrap();
    d.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
