//! Snapshot, restore and live migration of a vGPU, measured side by side in one run:
//! - live migration of a `medium` vGPU (256 MiB local memory, every page non-zero) between two
//!   vgpud `Daemon`s in this process over a unix socket, while a guest driver (the `vfio_user`
//!   Client) runs an idle, a low-rate (paced engine blits + CPU aperture writes) or a
//!   high-rate (CPU writes as fast as it can + engine fills) workload; the destination's local
//!   memory is compared with the paused source's, byte for byte, after every migration;
//! - where the time goes: one dirty scan of the migration component vs a memcpy of the same
//!   local memory, and the first pre-copy round vs a raw unix-socket copy of the same bytes;
//! - `snapshot_to_file` vs writing + `sync_all` of as many bytes to the same directory, and
//!   `restore_from_file` vs `std::fs::read` of a file of that size (both files cache-warm),
//!   with the parts (save, envelope encode/decode, restore) timed separately.
//!
//! `cargo bench -p vgpu-integration-tests --bench migration [-- [--quick] [--json PATH] [migrate] [scan] [snapshot]]`
//! (sections: all unless some are named; `--quick`: a `small` 64 MiB vGPU and fewer repetitions).
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)] // Reporting arithmetic.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vgpu_abi::cmd::{enc, BPP_32, ROP_PATCOPY, ROP_SRCCOPY};
use vgpu_abi::Engine;
use vgpu_api::daemon::{Daemon, VgpuSpec};
use vgpu_api::migrate::{
    migrate_to, restore_from_file, snapshot_to_file, Endpoint, Listener, ReceiveSpec, VgpuMigration,
};
use vgpu_device::driver::Driver;
use vgpu_device::vgpu::GttMode;
use vgpu_integration_tests::{daemon, temp_path, Mapping, Vmm};
use vgpu_migration::{Migratable, MigrationReport, Phase, SourceConfig, StopReason};

const PAGE: u64 = 4096;
const MIB: f64 = 1024.0 * 1024.0;
/// The downtime goal of issue 7 and gMig's reported average downtime.
const GOAL_MS: f64 = 20.0;
const GMIG_MS: f64 = 119.0;

struct Cfg {
    quick: bool,
    profile: &'static str,
    lmem: u64,
    /// Migrations per dirty rate.
    mig_reps: usize,
    /// Snapshot/restore repetitions.
    snap_reps: usize,
    /// Dirty-scan repetitions.
    scan_reps: usize,
    /// High rate: bytes the CPU rewrites in a loop (engine fills cover another quarter of it).
    hot: u64,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Deterministic incompressible bytes (xorshift64*), no zero page in practice.
fn random_bytes(len: u64, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len as usize);
    while (out.len() as u64) < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len as usize);
    out
}

/// Whether two mappings hold the same `len` bytes.
fn identical(a: &Mapping, b: &Mapping, len: u64) -> bool {
    const CHUNK: u64 = 4 << 20;
    let (mut x, mut y) = (vec![0u8; CHUNK as usize], vec![0u8; CHUNK as usize]);
    (0..len.div_ceil(CHUNK)).all(|i| {
        let n = CHUNK.min(len - i * CHUNK) as usize;
        a.read(i * CHUNK, &mut x[..n]);
        b.read(i * CHUNK, &mut y[..n]);
        x[..n] == y[..n]
    })
}

fn spec(profile: &str, name: &str) -> VgpuSpec {
    VgpuSpec {
        profile: profile.into(),
        gtt: GttMode::TwoDim,
        name: Some(name.into()),
        weight: None,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rate {
    Idle,
    Low,
    High,
}

impl Rate {
    fn name(self) -> &'static str {
        match self {
            Rate::Idle => "idle",
            Rate::Low => "low",
            Rate::High => "high",
        }
    }
}

/// What the guest did.
#[derive(Default)]
struct GuestStats {
    /// Bytes written (CPU through the aperture + engine blits), and over how long.
    bytes: u64,
    secs: f64,
    /// Latency of each submission (ring write + doorbell + error check: 3 trapped accesses),
    /// before and during the migration, in microseconds.
    before_us: Vec<f64>,
    during_us: Vec<f64>,
}

/// Flags between the migration and the guest thread.
struct Flags {
    migrating: AtomicBool,
    stop: AtomicBool,
    stopped: AtomicBool,
}

/// The guest driver's workload until `stop`; then it drains its engine (a driver quiescing, so
/// that the state at pause is final) and reports.
fn guest(d: &mut Driver<Vmm>, rate: Rate, cfg: &Cfg, f: &Flags) -> GuestStats {
    let mut st = GuestStats::default();
    let t0 = Instant::now();
    let record = |st: &mut GuestStats, t: Instant| {
        let us = t.elapsed().as_secs_f64() * 1e6;
        if f.migrating.load(Ordering::Acquire) {
            st.during_us.push(us);
        } else {
            st.before_us.push(us);
        }
    };
    match rate {
        Rate::Idle => {
            while !f.stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        Rate::Low => {
            // Every 4 ms: 4 KiB written by the CPU, a 4 KiB fill and a 4 KiB copy by the blitter
            // (~3 MiB/s), each step on fresh pages of three regions.
            let period = Duration::from_millis(4);
            let region = cfg.lmem / 8;
            let (cpu, fill, copy) = (0, region, 2 * region);
            let mut page = vec![0u8; PAGE as usize];
            let mut next = Instant::now();
            let mut k = 0u64;
            while !f.stop.load(Ordering::Acquire) {
                let off = (k * PAGE) % region;
                for (i, w) in page.chunks_exact_mut(8).enumerate() {
                    w.copy_from_slice(
                        &(k.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64 | 1).to_le_bytes(),
                    );
                }
                let t = Instant::now();
                d.lmem_write(cpu + off, &page);
                let f1 = enc::color_blt(
                    ROP_PATCOPY,
                    BPP_32,
                    d.gm_of_lmem(fill + off),
                    4096,
                    1024,
                    1,
                    (k as u32).wrapping_mul(0x9e37_79b9) | 1,
                );
                let c1 = enc::src_copy_blt(enc::Copy {
                    rop: ROP_SRCCOPY,
                    bpp: BPP_32,
                    dst: d.gm_of_lmem(copy + off),
                    dst_pitch: 4096,
                    src: d.gm_of_lmem(cpu + off),
                    src_pitch: 4096,
                    width: 1024,
                    height: 1,
                    pattern: 0,
                });
                d.submit(Engine::Blit, &[f1.as_slice(), &c1].concat())
                    .expect("submit");
                record(&mut st, t);
                st.bytes += 3 * PAGE;
                k += 1;
                next += period;
                let now = Instant::now();
                match next.checked_duration_since(now) {
                    Some(wait) => std::thread::sleep(wait),
                    None => next = now,
                }
            }
        }
        Rate::High => {
            // The CPU rewrites `hot` bytes in 64 KiB stores as fast as it can, a new value every
            // pass; after every 1 MiB it submits a 256 KiB engine fill of the next block of
            // another `hot / 4` bytes.
            const CHUNK: u64 = 64 << 10;
            const BLOCK: u64 = 256 << 10;
            let mut buf = vec![0u8; CHUNK as usize];
            let (mut pass, mut fills) = (0u64, 0u64);
            'outer: while !f.stop.load(Ordering::Acquire) {
                buf.fill((pass % 255) as u8 + 1);
                for c in 0..cfg.hot / CHUNK {
                    if f.stop.load(Ordering::Acquire) {
                        break 'outer;
                    }
                    d.lmem_write(c * CHUNK, &buf);
                    st.bytes += CHUNK;
                    if c % 16 == 15 {
                        let at = cfg.hot + (fills % (cfg.hot / 4 / BLOCK)) * BLOCK;
                        let t = Instant::now();
                        let f1 = enc::color_blt(
                            ROP_PATCOPY,
                            BPP_32,
                            d.gm_of_lmem(at),
                            4096,
                            1024,
                            (BLOCK / 4096) as u32,
                            (fills as u32).wrapping_mul(0x9e37_79b9) | 1,
                        );
                        d.submit(Engine::Blit, &f1).expect("submit");
                        record(&mut st, t);
                        st.bytes += BLOCK;
                        fills += 1;
                    }
                }
                pass += 1;
            }
        }
    }
    st.secs = t0.elapsed().as_secs_f64();
    d.wait_idle(Engine::Blit, Duration::from_secs(30))
        .expect("idle");
    f.stopped.store(true, Ordering::Release);
    st
}

/// One live migration and what was measured around it.
struct MigRun {
    rate: Rate,
    report: MigrationReport,
    guest: GuestStats,
    /// Dirtied bytes per second from the report: the pre-copy rounds' dirty counts over the time
    /// from the first page message to the last scan.
    dirty_rate: f64,
    /// Time the guest took to stop and drain after the stop-and-copy began (before the
    /// device pause; not in the report's downtime).
    stop_wait_ms: f64,
    identical: bool,
}

fn migrate_once(
    src: &Daemon,
    dst: &Daemon,
    cfg: &Cfg,
    data: &[u8],
    rate: Rate,
    n: usize,
) -> MigRun {
    let info = src.create(&spec(cfg.profile, "mig")).expect("source vGPU");
    let vmm = Vmm::attach(&info.socket);
    vmm.aperture.write(0, data);
    let mut d = Driver::probe(vmm).expect("probe");
    d.setup_ring(Engine::Blit).expect("ring");
    let flags = Flags {
        migrating: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        stopped: AtomicBool::new(false),
    };
    let sock = temp_path(&format!("mig-{n}.sock"));
    let _ = std::fs::remove_file(&sock);
    let listener = Listener::bind(&Endpoint::Unix(sock.clone())).expect("listen");
    let (mut t_first, mut t_stop, mut stop_wait) = (None, None, Duration::ZERO);

    let (report, moved, d, guest_stats) = std::thread::scope(|s| {
        let g = s.spawn(|| {
            let st = guest(&mut d, rate, cfg, &flags);
            (d, st)
        });
        let receiver = s.spawn(|| {
            listener.receive(
                dst,
                ReceiveSpec {
                    name: Some("mig".into()),
                    ..ReceiveSpec::default()
                },
            )
        });
        // Let the guest settle into its rate, and measure its submissions undisturbed.
        std::thread::sleep(Duration::from_millis(300));
        flags.migrating.store(true, Ordering::Release);
        let report = migrate_to(
            src,
            info.id,
            &Endpoint::Unix(sock.clone()),
            &SourceConfig::default(),
            &mut |p| {
                if p.phase == (Phase::PreCopy { round: 1 })
                    && p.pages_remaining > 0
                    && t_first.is_none()
                {
                    t_first = Some(p.elapsed_us);
                }
                if p.phase == Phase::StopAndCopy && t_stop.is_none() {
                    // The VMM pauses the vCPUs before the device's stop-and-copy.
                    t_stop = Some(p.elapsed_us);
                    let t = Instant::now();
                    flags.stop.store(true, Ordering::Release);
                    while !flags.stopped.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    stop_wait = t.elapsed();
                }
            },
        )
        .unwrap_or_else(|e| panic!("{}", vgpu_migration::report::error_chain(&e)));
        let (moved, _) = receiver
            .join()
            .expect("receiver")
            .unwrap_or_else(|e| panic!("{}", vgpu_migration::report::error_chain(&e)));
        let (d, st) = g.join().expect("guest");
        (report, moved, d, st)
    });
    let mut d = d;
    assert!(src.scheduler().is_paused(info.id), "source stays paused");
    assert!(!dst.scheduler().is_paused(moved.id), "destination runs");
    // The source is paused and its guest stopped: its local memory is the state at pause.
    let there = Vmm::attach(&moved.socket);
    let same = identical(&d.device().aperture, &there.aperture, cfg.lmem);
    drop(there.detach());
    drop(d);
    src.destroy(info.id).expect("destroy source");
    dst.destroy(moved.id).expect("destroy destination");

    let precopy = &report.rounds[..report.rounds.len() - 1];
    let dirtied: u64 = precopy.iter().map(|r| r.dirty_after).sum();
    let window = t_stop.unwrap_or(0).saturating_sub(t_first.unwrap_or(0)) as f64 / 1e6;
    let dirty_rate = if window > 0.0 {
        (dirtied * PAGE) as f64 / window
    } else {
        0.0
    };
    MigRun {
        rate,
        report,
        guest: guest_stats,
        dirty_rate,
        stop_wait_ms: ms(stop_wait),
        identical: same,
    }
}

/// Seconds to copy `bytes` over a unix-socket pair in 1 MiB writes, the receiver copying into
/// `lmem` bytes of a memfd mapping (as pages are written into local memory, wrapping around):
/// pre-touched, or `fresh` (never touched, as a new vGPU's local memory). The receiver is set up
/// before the clock starts.
fn raw_link(bytes: u64, lmem: u64, fresh: bool) -> f64 {
    let (mut a, mut b) = UnixStream::pair().expect("pair");
    let rx = std::thread::spawn(move || {
        let dst = Mapping::memfd(lmem as usize);
        if !fresh {
            let ones = vec![1u8; 1 << 20];
            for i in 0..lmem >> 20 {
                dst.write(i << 20, &ones);
            }
        }
        let mut buf = vec![1u8; 1 << 20];
        b.write_all(&[0]).expect("ready");
        let (mut got, mut at) = (0u64, 0u64);
        while got < bytes {
            let n = b.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            let end = (at + n as u64).min(lmem);
            dst.write(at, &buf[..(end - at) as usize]);
            at = if end == lmem { 0 } else { end };
            got += n as u64;
        }
        b.write_all(&[1]).expect("ack");
    });
    let src = random_bytes(1 << 20, 7);
    let mut ack = [0u8; 1];
    a.read_exact(&mut ack).expect("ready");
    let t = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(1 << 20) as usize;
        a.write_all(&src[..n]).expect("write");
        left -= n as u64;
    }
    a.read_exact(&mut ack).expect("ack");
    let secs = t.elapsed().as_secs_f64();
    let _ = rx.join();
    secs
}

struct Summary {
    rate: Rate,
    rounds: f64,
    stop: String,
    sent_mib: f64,
    total_ms: f64,
    predicted_ms: f64,
    downtime_ms: Vec<f64>,
    guest_mib_s: f64,
    dirty_mib_s: f64,
    stop_wait_ms: f64,
    identical: bool,
    breakdown: [f64; 6],
    /// The stop-and-copy's `dirty_pages()` alone (part of `breakdown[0]`).
    final_scan_ms: f64,
    doorbell_before: (f64, f64, f64),
    doorbell_during: (f64, f64, f64),
}

fn summarize(runs: &[&MigRun]) -> Summary {
    let m = |f: &dyn Fn(&MigRun) -> f64| median(&runs.iter().map(|r| f(r)).collect::<Vec<_>>());
    let mut reasons: Vec<String> = Vec::new();
    for r in runs {
        let s = match r.report.stop_reason {
            StopReason::Converged => "converged",
            StopReason::RoundLimit => "round limit",
            StopReason::FloorAboveTarget => "floor above target",
        };
        if !reasons.iter().any(|x| x == s) {
            reasons.push(s.into());
        }
    }
    let lat = |mut v: Vec<f64>| {
        if v.is_empty() {
            return (0.0, 0.0, 0.0);
        }
        v.sort_by(f64::total_cmp);
        let p99 = v[(v.len() * 99 / 100).min(v.len() - 1)];
        (v[v.len() / 2], p99, v[v.len() - 1])
    };
    let all = |f: &dyn Fn(&GuestStats) -> &Vec<f64>| -> Vec<f64> {
        runs.iter()
            .flat_map(|r| f(&r.guest).iter().copied())
            .collect()
    };
    let b = |f: &dyn Fn(&vgpu_migration::DowntimeBreakdown) -> u64| {
        m(&|r: &MigRun| f(&r.report.downtime_breakdown) as f64 / 1e3)
    };
    Summary {
        rate: runs[0].rate,
        rounds: m(&|r| f64::from(r.report.precopy_rounds)),
        stop: reasons.join("/"),
        sent_mib: m(&|r| r.report.bytes_sent as f64 / MIB),
        total_ms: m(&|r| r.report.total_time_us as f64 / 1e3),
        predicted_ms: m(&|r| r.report.predicted_downtime_us as f64 / 1e3),
        downtime_ms: runs
            .iter()
            .map(|r| r.report.downtime_us as f64 / 1e3)
            .collect(),
        guest_mib_s: m(&|r| {
            if r.guest.secs > 0.0 {
                r.guest.bytes as f64 / r.guest.secs / MIB
            } else {
                0.0
            }
        }),
        dirty_mib_s: m(&|r| r.dirty_rate / MIB),
        stop_wait_ms: m(&|r| r.stop_wait_ms),
        identical: runs.iter().all(|r| r.identical),
        breakdown: [
            b(&|x| x.pause_us),
            b(&|x| x.final_pages_us),
            b(&|x| x.snapshot_us),
            b(&|x| x.state_transfer_us),
            b(&|x| x.restore_us),
            b(&|x| x.resume_us),
        ],
        final_scan_ms: m(&|r| r.report.rounds.last().map_or(0, |x| x.scan_us) as f64 / 1e3),
        doorbell_before: lat(all(&|g| &g.before_us)),
        doorbell_during: lat(all(&|g| &g.during_us)),
    }
}

/// Snapshot/restore figures, each a list over the repetitions, in milliseconds.
#[derive(Default)]
struct SnapTimes {
    snapshot: Vec<f64>,
    snapshot_paused: Vec<f64>,
    write_sync: Vec<f64>,
    restore: Vec<f64>,
    read: Vec<f64>,
    save: Vec<f64>,
    encode: Vec<f64>,
    decode: Vec<f64>,
    vgpu_restore: Vec<f64>,
    memcpy: Vec<f64>,
    memcpy_fresh: Vec<f64>,
    file_bytes: u64,
    restored_identical: bool,
}

fn write_sync(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::File::create(path).expect("create");
    f.write_all(bytes).expect("write");
    f.sync_all().expect("sync");
}

fn snapshot_section(cfg: &Cfg, data: &[u8]) -> SnapTimes {
    let sd = daemon(2 * (cfg.lmem >> 20));
    let rd = daemon(2 * (cfg.lmem >> 20));
    let info = sd.create(&spec(cfg.profile, "snap")).expect("vGPU");
    let vmm = Vmm::attach(&info.socket);
    vmm.aperture.write(0, data);
    let snap_path = temp_path("bench.vgpu");
    let base_path = temp_path("bench-baseline.bin");
    let mut t = SnapTimes::default();

    // One untimed snapshot: the file size, and a correctness check of a restore.
    let first = snapshot_to_file(&sd, info.id, &snap_path).expect("snapshot");
    t.file_bytes = first.bytes;
    let baseline = random_bytes(first.bytes, 11);
    write_sync(&base_path, &baseline);
    let r = restore_from_file(&rd, &snap_path, Some("restored".into()), None).expect("restore");
    let there = Vmm::attach(&r.socket);
    t.restored_identical = identical(&vmm.aperture, &there.aperture, cfg.lmem);
    drop(there.detach());
    rd.destroy(r.id).expect("destroy");

    for rep in 0..cfg.snap_reps {
        let mut ours = || {
            let t0 = Instant::now();
            let s = snapshot_to_file(&sd, info.id, &snap_path).expect("snapshot");
            t.snapshot.push(ms(t0.elapsed()));
            t.snapshot_paused.push(s.paused_us as f64 / 1e3);
        };
        let theirs = || {
            let t0 = Instant::now();
            write_sync(&base_path, &baseline);
            ms(t0.elapsed())
        };
        if rep % 2 == 0 {
            ours();
            let x = theirs();
            t.write_sync.push(x);
        } else {
            let x = theirs();
            t.write_sync.push(x);
            ours();
        }
    }
    // Both files cache-warm: each read once.
    drop(std::fs::read(&snap_path).expect("read"));
    drop(std::fs::read(&base_path).expect("read"));
    for rep in 0..cfg.snap_reps {
        let mut ours = || {
            let t0 = Instant::now();
            let r =
                restore_from_file(&rd, &snap_path, Some("restored".into()), None).expect("restore");
            t.restore.push(ms(t0.elapsed()));
            rd.destroy(r.id).expect("destroy");
        };
        let theirs = || {
            let t0 = Instant::now();
            let b = std::fs::read(&base_path).expect("read");
            let x = ms(t0.elapsed());
            assert_eq!(b.len() as u64, t.file_bytes);
            x
        };
        if rep % 2 == 0 {
            ours();
            let x = theirs();
            t.read.push(x);
        } else {
            let x = theirs();
            t.read.push(x);
            ours();
        }
    }

    // The parts, on the same vGPU: save (paused), envelope encode, decode, restore into a
    // paused vGPU at the same ranges; a memcpy of the local memory for scale.
    let v = sd.vgpu(info.id).expect("vGPU");
    let target = restore_from_file(&rd, &snap_path, Some("target".into()), None).expect("restore");
    rd.scheduler().pause(target.id).expect("pause");
    let tv = rd.vgpu(target.id).expect("vGPU");
    let mut copy = vec![1u8; cfg.lmem as usize]; // Pre-touched.
    for _ in 0..cfg.snap_reps {
        sd.scheduler().pause(info.id).expect("pause");
        let t0 = Instant::now();
        let snap = v.lock().expect("lock").save(true).expect("save");
        t.save.push(ms(t0.elapsed()));
        sd.scheduler().resume(info.id).expect("resume");
        let t0 = Instant::now();
        let bytes = vgpu_migration::encode(&snap).expect("encode");
        t.encode.push(ms(t0.elapsed()));
        drop(snap);
        let t0 = Instant::now();
        let snap = vgpu_migration::decode(&bytes).expect("decode");
        t.decode.push(ms(t0.elapsed()));
        drop(bytes);
        let t0 = Instant::now();
        tv.lock().expect("lock").restore(&snap).expect("restore");
        t.vgpu_restore.push(ms(t0.elapsed()));
        drop(snap);
        let t0 = Instant::now();
        vmm.aperture.read(0, &mut copy);
        t.memcpy.push(ms(t0.elapsed()));
        let t0 = Instant::now();
        let mut fresh = vec![0u8; cfg.lmem as usize];
        vmm.aperture.read(0, &mut fresh);
        t.memcpy_fresh.push(ms(t0.elapsed()));
        drop(fresh);
    }
    // The daemon frees a vGPU once the last reference to it is gone.
    drop((v, tv));
    rd.destroy(target.id).expect("destroy");
    drop(vmm.detach());
    sd.destroy(info.id).expect("destroy");
    let _ = std::fs::remove_file(&snap_path);
    let _ = std::fs::remove_file(&base_path);
    t
}

/// One dirty scan of the migration component on an idle vGPU (`start_dirty_log` hashes every
/// page; `dirty_pages` takes the engine log and hashes every page again, as after every pre-copy
/// round and, with the vGPU paused, in the stop-and-copy) vs a memcpy of the same local memory.
/// Returns (memcpy, start_dirty_log, dirty_pages) times in ms.
fn scan_section(cfg: &Cfg, data: &[u8]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let sd = daemon(2 * (cfg.lmem >> 20));
    let info = sd.create(&spec(cfg.profile, "scan")).expect("vGPU");
    let vmm = Vmm::attach(&info.socket);
    vmm.aperture.write(0, data);
    let mut copy = vec![1u8; cfg.lmem as usize]; // Pre-touched.
    let (mut memcpy, mut start, mut scan) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..cfg.scan_reps {
        let t0 = Instant::now();
        vmm.aperture.read(0, &mut copy);
        memcpy.push(ms(t0.elapsed()));
        let mut c = VgpuMigration::source(&sd, info.id).expect("component");
        let t0 = Instant::now();
        c.start_dirty_log().expect("dirty log");
        start.push(ms(t0.elapsed()));
        let t0 = Instant::now();
        let dirty = c.dirty_pages().expect("dirty pages");
        scan.push(ms(t0.elapsed()));
        assert!(dirty.is_empty(), "idle vGPU has no dirty pages");
        c.stop_dirty_log().expect("stop");
    }
    drop(vmm.detach());
    sd.destroy(info.id).expect("destroy");
    (memcpy, start, scan)
}

fn gbs(bytes: f64, ms: f64) -> f64 {
    bytes / (ms / 1e3) / 1e9
}

fn migration_section(cfg: &Cfg, data: &[u8], t_start: Instant) -> (serde_json::Value, bool) {
    let lmem_mib = cfg.lmem >> 20;
    let src = daemon(2 * lmem_mib);
    let dst = daemon(2 * lmem_mib);
    let mut runs = Vec::new();
    let (mut raw, mut raw_fresh) = (Vec::new(), Vec::new());
    for _ in 0..cfg.mig_reps {
        for rate in [Rate::Idle, Rate::Low, Rate::High] {
            eprintln!(
                "migrating, {} guest ({:.1} s)",
                rate.name(),
                t_start.elapsed().as_secs_f64()
            );
            runs.push(migrate_once(&src, &dst, cfg, data, rate, runs.len()));
        }
        let idle = &runs[runs.len() - 3].report;
        raw.push(raw_link(idle.rounds[0].bytes, cfg.lmem, false));
        raw_fresh.push(raw_link(idle.rounds[0].bytes, cfg.lmem, true));
    }
    let sums: Vec<Summary> = [Rate::Idle, Rate::Low, Rate::High]
        .iter()
        .map(|&rate| summarize(&runs.iter().filter(|r| r.rate == rate).collect::<Vec<_>>()))
        .collect();
    let round1: Vec<f64> = runs
        .iter()
        .filter(|r| r.rate == Rate::Idle)
        .map(|r| r.report.rounds[0].duration_us as f64 / 1e6)
        .collect();
    let round1_bytes = runs[0].report.rounds[0].bytes;
    // Pre-copy rounds after the first (the destination's memory already touched), all high-rate
    // runs: bytes and seconds.
    let (later_b, later_s) = runs
        .iter()
        .filter(|r| r.rate == Rate::High)
        .flat_map(|r| {
            let n = r.report.rounds.len();
            r.report.rounds[1..n - 1].iter()
        })
        .fold((0u64, 0.0f64), |(b, s), x| {
            (b + x.bytes, s + x.duration_us as f64 / 1e6)
        });

    println!(
        "Live migration of a {} vGPU ({} MiB local memory, every page non-zero), two Daemons in one process over a unix socket, SourceConfig::default() (target 20 ms, at most 30 rounds); {} run(s) per dirty rate, interleaved, medians ({} mode)",
        cfg.profile,
        lmem_mib,
        cfg.mig_reps,
        if cfg.quick { "quick" } else { "full" }
    );
    println!("| guest | guest writes MiB/s | dirtied MiB/s (report) | pre-copy rounds | stop reason | sent MiB | total ms | predicted downtime ms | downtime ms (runs) | downtime / 20 ms goal | downtime / gMig 119 ms | dst == src at pause |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for s in &sums {
        let dt = median(&s.downtime_ms);
        println!(
            "| {} | {:.1} | {:.1} | {:.0} | {} | {:.0} | {:.0} | {:.1} | **{:.1}** ({}) | {:.2}x | {:.2}x | {} |",
            s.rate.name(),
            s.guest_mib_s,
            s.dirty_mib_s,
            s.rounds,
            s.stop,
            s.sent_mib,
            s.total_ms,
            s.predicted_ms,
            dt,
            s.downtime_ms
                .iter()
                .map(|x| format!("{x:.1}"))
                .collect::<Vec<_>>()
                .join(", "),
            dt / GOAL_MS,
            dt / GMIG_MS,
            if s.identical { "yes" } else { "**NO**" }
        );
    }
    println!();
    println!("Downtime breakdown (medians, ms) and the guest's submissions (latency median / p99 / max, us)");
    println!("| guest | pause + last dirty scan (scan alone) | last pages | device-state save + encode | state transfer | destination decode + restore | commit + resume | guest stop + drain (not in downtime) | submit before migration | submit during pre-copy |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for s in &sums {
        let b = s.breakdown;
        println!(
            "| {} | {:.1} ({:.1}) | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} / {:.0} |",
            s.rate.name(),
            b[0],
            s.final_scan_ms,
            b[1],
            b[2],
            b[3],
            b[4],
            b[5],
            s.stop_wait_ms,
            s.doorbell_before.0,
            s.doorbell_before.1,
            s.doorbell_before.2,
            s.doorbell_during.0,
            s.doorbell_during.1,
            s.doorbell_during.2
        );
    }
    println!();
    let raw_s = median(&raw);
    let fresh_s = median(&raw_fresh);
    let r1 = median(&round1);
    let b1 = round1_bytes as f64;
    println!("The link: pre-copy throughput vs a raw unix-socket copy of the same bytes (1 MiB writes; medians)");
    println!("| transfer | ms | GB/s | time vs raw |");
    println!("|---|---|---|---|");
    println!(
        "| raw copy of round 1's {:.0} MiB into pre-touched memory | {:.1} | {:.2} | 1.00x |",
        b1 / MIB,
        raw_s * 1e3,
        b1 / raw_s / 1e9
    );
    println!(
        "| raw copy into fresh memfd pages (as a new vGPU's local memory) | {:.1} | {:.2} | {:.2}x |",
        fresh_s * 1e3,
        b1 / fresh_s / 1e9,
        fresh_s / raw_s
    );
    println!(
        "| pre-copy round 1, idle guest (every page into the new vGPU, acknowledged) | {:.1} | {:.2} | {:.2}x |",
        r1 * 1e3,
        b1 / r1 / 1e9,
        r1 / raw_s
    );
    let later = if later_s > 0.0 {
        later_b as f64 / later_s
    } else {
        0.0
    };
    if later > 0.0 {
        println!(
            "| pre-copy rounds 2.., high-rate guest (pages already touched; {:.0} MiB in all), scaled to round 1's bytes | {:.1} | {:.2} | {:.2}x |",
            later_b as f64 / MIB,
            b1 / later * 1e3,
            later / 1e9,
            b1 / later / raw_s
        );
    }
    println!();

    let ok = sums.iter().all(|s| s.identical);
    let j = serde_json::json!({
        "summary": sums.iter().map(|s| serde_json::json!({
            "guest": s.rate.name(),
            "guest_write_bytes_per_s": s.guest_mib_s * MIB,
            "dirty_bytes_per_s": s.dirty_mib_s * MIB,
            "precopy_rounds": s.rounds,
            "stop_reason": s.stop,
            "bytes_sent": s.sent_mib * MIB,
            "total_ms": s.total_ms,
            "predicted_downtime_ms": s.predicted_ms,
            "downtime_ms": s.downtime_ms,
            "downtime_vs_goal": median(&s.downtime_ms) / GOAL_MS,
            "downtime_vs_gmig": median(&s.downtime_ms) / GMIG_MS,
            "breakdown_ms": {
                "pause_and_last_scan": s.breakdown[0],
                "last_scan": s.final_scan_ms,
                "final_pages": s.breakdown[1],
                "snapshot": s.breakdown[2],
                "state_transfer": s.breakdown[3],
                "restore": s.breakdown[4],
                "resume": s.breakdown[5],
            },
            "guest_stop_ms": s.stop_wait_ms,
            "submit_us_before_p50_p99_max": [s.doorbell_before.0, s.doorbell_before.1, s.doorbell_before.2],
            "submit_us_during_p50_p99_max": [s.doorbell_during.0, s.doorbell_during.1, s.doorbell_during.2],
            "identical": s.identical,
        })).collect::<Vec<_>>(),
        "link": {
            "round1_bytes": round1_bytes,
            "raw_ms": raw_s * 1e3,
            "raw_fresh_ms": fresh_s * 1e3,
            "round1_ms": r1 * 1e3,
            "later_rounds_bytes_per_s": later,
        },
        "reports": runs.iter().map(|r| serde_json::json!({
            "guest": r.rate.name(),
            "dirty_bytes_per_s": r.dirty_rate,
            "report": r.report,
        })).collect::<Vec<_>>(),
    });
    (j, ok)
}

fn print_scan(cfg: &Cfg, memcpy: &[f64], start: &[f64], scan: &[f64]) -> serde_json::Value {
    let lm = cfg.lmem as f64;
    let (c, st, sc) = (median(memcpy), median(start), median(scan));
    println!(
        "The dirty scan on an idle {} vGPU ({} MiB; {} interleaved repetitions, medians)",
        cfg.profile,
        cfg.lmem >> 20,
        cfg.scan_reps
    );
    println!("| measure | ms | GB/s | time vs memcpy |");
    println!("|---|---|---|---|");
    println!(
        "| memcpy of the local memory (aperture -> pre-touched buffer) | {:.1} | {:.2} | 1.00x |",
        c,
        gbs(lm, c)
    );
    println!(
        "| `dirty_pages()`: engine log + xxh3 of every page (every pre-copy round; the stop-and-copy, paused) | {:.1} | {:.2} | {:.2}x |",
        sc,
        gbs(lm, sc),
        sc / c
    );
    println!(
        "| `start_dirty_log()`: xxh3 of every page | {:.1} | {:.2} | {:.2}x |",
        st,
        gbs(lm, st),
        st / c
    );
    println!();
    serde_json::json!({ "memcpy_ms": c, "start_dirty_log_ms": st, "dirty_pages_ms": sc })
}

fn print_snapshot(cfg: &Cfg, snap: &SnapTimes) -> serde_json::Value {
    let m = |v: &[f64]| median(v);
    let file_mib = snap.file_bytes as f64 / MIB;
    let fb = snap.file_bytes as f64;
    println!(
        "Snapshot and restore of a {} vGPU ({} MiB, every page non-zero) to/from {} (file {:.1} MiB; {} interleaved repetitions, medians; both files cache-warm for the reads)",
        cfg.profile,
        cfg.lmem >> 20,
        std::env::temp_dir().display(),
        file_mib,
        cfg.snap_reps
    );
    println!("| operation | ms | GB/s | time vs baseline |");
    println!("|---|---|---|---|");
    println!(
        "| `snapshot_to_file` (vGPU paused {:.0} ms of it) | {:.0} | {:.2} | **{:.2}x** |",
        m(&snap.snapshot_paused),
        m(&snap.snapshot),
        gbs(fb, m(&snap.snapshot)),
        m(&snap.snapshot) / m(&snap.write_sync)
    );
    println!(
        "| baseline: create + write + `sync_all` of {:.1} MiB, same directory | {:.0} | {:.2} | 1.00x |",
        file_mib,
        m(&snap.write_sync),
        gbs(fb, m(&snap.write_sync))
    );
    println!(
        "| `restore_from_file` (read, decode, create, validate, restore, resume) | {:.0} | {:.2} | **{:.2}x** |",
        m(&snap.restore),
        gbs(fb, m(&snap.restore)),
        m(&snap.restore) / m(&snap.read)
    );
    println!(
        "| baseline: `std::fs::read` of {:.1} MiB | {:.0} | {:.2} | 1.00x |",
        file_mib,
        m(&snap.read),
        gbs(fb, m(&snap.read))
    );
    println!(
        "| memcpy of the local memory (aperture -> pre-touched buffer), for scale | {:.0} | {:.2} | |",
        m(&snap.memcpy),
        gbs(cfg.lmem as f64, m(&snap.memcpy))
    );
    println!(
        "| memcpy of the local memory into a fresh buffer (allocation + first touch), for scale | {:.0} | {:.2} | {:.1}x memcpy |",
        m(&snap.memcpy_fresh),
        gbs(cfg.lmem as f64, m(&snap.memcpy_fresh)),
        m(&snap.memcpy_fresh) / m(&snap.memcpy)
    );
    for (name, v) in [
        (
            "part: `Vgpu::save(true)` (paused; every non-zero page copied and serialized)",
            &snap.save,
        ),
        ("part: envelope encode (postcard + CRC-32)", &snap.encode),
        (
            "part: envelope decode (CRC-32 + postcard + bounds)",
            &snap.decode,
        ),
        (
            "part: `Vgpu::restore` into a paused vGPU (decode, validate, scrub, write pages)",
            &snap.vgpu_restore,
        ),
    ] {
        println!(
            "| {} | {:.0} | {:.2} | {:.1}x memcpy |",
            name,
            m(v),
            gbs(fb, m(v)),
            m(v) / m(&snap.memcpy),
        );
    }
    println!(
        "| check: restored local memory == source | {} | | |",
        if snap.restored_identical {
            "yes"
        } else {
            "**NO**"
        }
    );
    println!();
    serde_json::json!({
        "file_bytes": snap.file_bytes,
        "snapshot_ms": m(&snap.snapshot),
        "snapshot_paused_ms": m(&snap.snapshot_paused),
        "write_sync_ms": m(&snap.write_sync),
        "snapshot_vs_write": m(&snap.snapshot) / m(&snap.write_sync),
        "restore_ms": m(&snap.restore),
        "read_ms": m(&snap.read),
        "restore_vs_read": m(&snap.restore) / m(&snap.read),
        "memcpy_ms": m(&snap.memcpy),
        "memcpy_fresh_ms": m(&snap.memcpy_fresh),
        "save_ms": m(&snap.save),
        "encode_ms": m(&snap.encode),
        "decode_ms": m(&snap.decode),
        "vgpu_restore_ms": m(&snap.vgpu_restore),
        "restored_identical": snap.restored_identical,
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .cloned();
    // Sections named on the command line (default: all).
    let named: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with("--") && Some(*a) != json.as_ref())
        .map(String::as_str)
        .collect();
    let want = |s: &str| named.is_empty() || named.contains(&s);
    let cfg = if quick {
        Cfg {
            quick,
            profile: "small",
            lmem: 64 << 20,
            mig_reps: 1,
            snap_reps: 2,
            scan_reps: 3,
            hot: 16 << 20,
        }
    } else {
        Cfg {
            quick,
            profile: "medium",
            lmem: 256 << 20,
            mig_reps: 5,
            snap_reps: 5,
            scan_reps: 7,
            hot: 64 << 20,
        }
    };
    let t_start = Instant::now();
    let data = random_bytes(cfg.lmem, 0x5eed);
    let mut out = serde_json::json!({
        "mode": if cfg.quick { "quick" } else { "full" },
        "profile": cfg.profile,
        "lmem_bytes": cfg.lmem,
    });
    let mut ok = true;
    if want("migrate") {
        let (j, good) = migration_section(&cfg, &data, t_start);
        out["migration"] = j;
        ok &= good;
    }
    if want("scan") {
        let (c, st, sc) = scan_section(&cfg, &data);
        out["scan"] = print_scan(&cfg, &c, &st, &sc);
    }
    if want("snapshot") {
        let snap = snapshot_section(&cfg, &data);
        out["snapshot"] = print_snapshot(&cfg, &snap);
        ok &= snap.restored_identical;
    }
    println!("total bench time {:.1} s", t_start.elapsed().as_secs_f64());
    if let Some(path) = json {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&out).expect("json") + "\n",
        )
        .expect("write json");
    }
    assert!(ok, "a migrated or restored vGPU differs from its source");
}
