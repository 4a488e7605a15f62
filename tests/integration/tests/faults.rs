//! Fault injection against vgpud (in-process daemons; the crash-and-restart and disk-full
//! cases with a real `vgpud` child process are in `api/tests/crash_restart.rs`):
//!
//! - a vfio-user client disconnects after every message of a bring-up + workload session, and
//!   in the middle of every message: the daemon keeps serving, the device keeps exactly the
//!   state of the messages it fully received, and a reconnecting client gets the same device;
//! - a live migration between two daemons with the real vGPU component is cut after K bytes,
//!   for K across every phase, in both directions: the source runs on intact (or, after
//!   `Commit`, stays paused with the destination running) and the destination keeps nothing;
//! - concurrent snapshots to one path, and stale temporary files, do not break snapshots;
//! - REST clients vanish mid-request (half a request, or no reading of the reply), many
//!   times: the daemon stays healthy and holds no descriptors for them afterwards.
#![allow(clippy::cast_possible_truncation)] // Test arithmetic on small known values.

mod support;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use vgpu_abi::cmd::{enc, BPP_32, ROP_PATCOPY};
use vgpu_abi::gtt::pte_guest;
use vgpu_abi::pci::GGTT_OFFSET;
use vgpu_abi::{regs, Engine, PAGE_SIZE};
use vgpu_api::client::{Client, Method};
use vgpu_api::daemon::Daemon;
use vgpu_api::migrate::{
    migrate_to, snapshot_to_file, Endpoint, Listener, MigrateError, ReceiveSpec,
};
use vgpu_api::rest::{ApiConfig, ApiHandle};
use vgpu_device::driver::{ring_lmem_offset, Driver, Locked};
use vgpu_device::vgpu::persist::VgpuHeader;
use vgpu_device::vgpu::GttMode;
use vgpu_integration_tests::{daemon, temp_path, RAM_GPA};
use vgpu_migration::{SourceConfig, SourceError};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

// ---------------------------------------------------------------------------------------------
// vfio-user client disconnects at every message.

/// What a scripted message changes in the device once the daemon has handled it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Effect {
    None,
    Scratch(u32),
    Aperture(u32),
}

struct Step {
    bytes: Vec<u8>,
    fds: Vec<i32>,
    effect: Effect,
}

const APERTURE_BLOCK: u64 = 0x1000;
const FILL_OFF: u64 = 0x2000;

/// The bring-up and workload of a driver, as raw messages, for iteration `v`.
fn script(hdr: &VgpuHeader, ram: &std::fs::File, irqs: &[EventFd], v: u32) -> Vec<Step> {
    let m = |command: u16, payload: Vec<u8>| Step {
        bytes: frame(0, command, 0, &payload),
        fds: Vec::new(),
        effect: Effect::None,
    };
    let w32 = |off: u32, val: u32| {
        m(
            cmd::REGION_WRITE,
            region_access(0, u64::from(off), 4, &val.to_le_bytes()),
        )
    };
    let info = |command: u16, index: u32| {
        let mut p = 32u32.to_ne_bytes().to_vec();
        p.extend_from_slice(&0u32.to_ne_bytes());
        p.extend_from_slice(&index.to_ne_bytes());
        p.extend_from_slice(&[0u8; 20]);
        m(command, p)
    };
    let e = Engine::Blit;
    let b = regs::engine_base(e);
    let ring = ring_lmem_offset(hdr.lmem_size, e);
    let ring_gm = hdr.mappable.start.raw() + ring;
    let hidden = hdr.hidden.start.raw();
    let cmds: Vec<u8> = [
        enc::color_blt(
            ROP_PATCOPY,
            BPP_32,
            hdr.mappable.start.raw() + FILL_OFF,
            256,
            64,
            4,
            v,
        )
        .as_slice(),
        &enc::store_data_imm(hidden, v),
        &enc::user_interrupt(),
    ]
    .concat()
    .iter()
    .flat_map(|d| d.to_le_bytes())
    .collect();
    let mut s = vec![
        m(
            cmd::DEVICE_GET_INFO,
            [32u32, 0, 0, 0]
                .iter()
                .flat_map(|x| x.to_ne_bytes())
                .collect(),
        ),
        info(cmd::DEVICE_GET_REGION_INFO, 0),
        info(cmd::DEVICE_GET_REGION_INFO, 2),
        info(cmd::DEVICE_GET_REGION_INFO, 7),
        info(cmd::DEVICE_GET_IRQ_INFO, 2),
        Step {
            bytes: frame(0, cmd::DMA_MAP, 0, &dma_map_payload(3, 0, RAM_GPA, 1 << 20)),
            fds: vec![ram.as_raw_fd()],
            effect: Effect::None,
        },
        m(
            cmd::REGION_WRITE,
            region_access(7, 4, 2, &0x0406u16.to_le_bytes()),
        ),
        Step {
            bytes: frame(
                0,
                cmd::DEVICE_SET_IRQS,
                0,
                &set_irqs_payload(0x24, 2, 0, 5, &[]),
            ),
            fds: irqs.iter().map(AsRawFd::as_raw_fd).collect(),
            effect: Effect::None,
        },
        Step {
            effect: Effect::Scratch(v),
            ..w32(regs::SCRATCH0, v)
        },
        Step {
            effect: Effect::Aperture(v),
            ..m(
                cmd::REGION_WRITE,
                region_access(2, APERTURE_BLOCK, 4096, &pattern(4096, v)),
            )
        },
        w32(regs::INTR_MASK, 0),
        m(
            cmd::REGION_WRITE,
            region_access(
                0,
                GGTT_OFFSET + hidden / PAGE_SIZE * 8,
                8,
                &pte_guest(RAM_GPA).to_le_bytes(),
            ),
        ),
        w32(regs::RESET_CTL, regs::reset_engine(e)),
        w32(b + regs::RING_BASE_LO, ring_gm as u32),
        w32(b + regs::RING_BASE_HI, (ring_gm >> 32) as u32),
        w32(b + regs::RING_SIZE, 4096),
        w32(b + regs::RING_CTL, regs::RING_CTL_ENABLE),
        m(
            cmd::REGION_WRITE,
            region_access(2, ring, cmds.len() as u32, &cmds),
        ),
        w32(b + regs::RING_TAIL, cmds.len() as u32),
        m(
            cmd::REGION_READ,
            region_access(0, u64::from(b + regs::ENGINE_STATUS), 4, &[]),
        ),
        m(
            cmd::REGION_READ,
            region_access(0, u64::from(regs::SCRATCH0), 4, &[]),
        ),
    ];
    s.push(m(cmd::DMA_UNMAP, dma_unmap_payload(0, RAM_GPA, 1 << 20)));
    s
}

fn read_u32(r: &mut Raw, region: u32, off: u64) -> u32 {
    let rep = r.region_read(region, off, 4);
    assert!(!rep.failed(), "read {region}:{off:#x}");
    u32::from_ne_bytes(rep.payload[16..20].try_into().unwrap())
}

#[test]
fn test_client_disconnect_at_every_message_daemon_serves_on_state_kept() {
    let d = daemon(128);
    let victim = d.create(&spec("mini", GttMode::Shadow, "victim")).unwrap();
    let info = d.create(&spec("mini", GttMode::TwoDim, "vm")).unwrap();
    let hdr = d.vgpu(info.id).unwrap().lock().unwrap().header();
    let neighbour = Neighbour::start(&d, victim.id);
    let ram = memfd(1 << 20, 0);
    let irqs: Vec<EventFd> = (0..5)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let steps = script(&hdr, &ram, &irqs, 0).len();
    // The model of what the device holds: the last scratch value and aperture block written
    // by a message the daemon handled completely.
    let (mut scratch, mut block) = (0u32, vec![0u8; 4096]);
    let mut iteration = 0u32;
    for cut in 0..=steps {
        for half in [false, true] {
            if half && cut == steps {
                continue;
            }
            iteration += 1;
            let v = 0x1000 + iteration;
            let s = script(&hdr, &ram, &irqs, v);
            let mut r = Raw::connect(&info.socket);
            for step in &s[..cut] {
                let mut bytes = step.bytes.clone();
                let id = r.next_id();
                bytes[0..2].copy_from_slice(&id.to_ne_bytes());
                assert!(r.send_bytes(&bytes, &step.fds), "step {cut}: send");
                let rep = r
                    .recv()
                    .unwrap_or_else(|| panic!("no reply before the cut at {cut}"));
                assert!(
                    !rep.failed(),
                    "cut {cut}: a scripted message failed: {rep:?}"
                );
                match step.effect {
                    Effect::Scratch(x) => scratch = x,
                    Effect::Aperture(x) => block = pattern(4096, x),
                    Effect::None => {}
                }
            }
            if half {
                // The next message only half written, then gone: it must have no effect.
                let b = &s[cut].bytes;
                let _ = r.send_bytes(&b[..b.len() / 2], &[]);
            }
            drop(r);
            wait_until(T, "the daemon to notice the disconnect", || {
                !d.info(info.id).unwrap().connected
            });
            // A reconnecting client finds the same device with exactly that state.
            let mut r = Raw::connect(&info.socket);
            assert_eq!(
                read_u32(&mut r, 0, u64::from(regs::PV_VGPU_ID)),
                info.id,
                "same device"
            );
            assert_eq!(
                read_u32(&mut r, 0, u64::from(regs::SCRATCH0)),
                scratch,
                "cut {cut} half {half}: SCRATCH0"
            );
            let rep = r.region_read(2, APERTURE_BLOCK, 4096);
            assert!(
                rep.payload[16..] == block[..],
                "cut {cut} half {half}: aperture contents"
            );
            drop(r);
            neighbour.wait_progress(1, "after a client vanished");
        }
    }
    // The whole script once more, to the end: the workload runs and its results are right.
    let v = 0xF00D;
    let s = script(&hdr, &ram, &irqs, v);
    let mut r = Raw::connect(&info.socket);
    for step in &s[..s.len() - 1] {
        let mut bytes = step.bytes.clone();
        let id = r.next_id();
        bytes[0..2].copy_from_slice(&id.to_ne_bytes());
        assert!(r.send_bytes(&bytes, &step.fds));
        assert!(!r.recv().expect("reply").failed());
    }
    let b = regs::engine_base(Engine::Blit);
    wait_until(T, "the blit to finish", || {
        read_u32(&mut r, 0, u64::from(b + regs::ENGINE_STATUS)) & regs::ENGINE_STATUS_IDLE != 0
    });
    assert_eq!(
        read_u32(&mut r, 0, u64::from(b + regs::ENGINE_STATUS)) & regs::ENGINE_STATUS_ERROR,
        0
    );
    assert_eq!(read_u32(&mut r, 2, FILL_OFF + 256 * 3 + 252), v, "fill");
    let mut fence = [0u8; 4];
    std::os::unix::fs::FileExt::read_exact_at(&ram, &mut fence, 0).unwrap();
    assert_eq!(u32::from_le_bytes(fence), v, "fence in guest RAM");
    assert!(
        irqs[Engine::Blit.index()].read().is_ok(),
        "MSI-X eventfd of the blit engine fired"
    );
    drop(r);
    let rounds = neighbour.finish();
    println!("{iteration} cut sessions; the neighbour completed {rounds} rounds bit-exact");
    d.shutdown();
}

// ---------------------------------------------------------------------------------------------
// Migration cut at every phase, real vGPU component, real daemons.

/// Forwards one connection from `listen` to `to`, cutting both sockets once `cut_s2d` bytes
/// went source-to-destination or `cut_d2s` bytes went back. Returns the bytes moved each way.
fn proxy(
    listen: UnixListener,
    to: PathBuf,
    cut_s2d: u64,
    cut_d2s: u64,
) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        let (src, _) = listen.accept().unwrap();
        let dst = UnixStream::connect(&to).unwrap();
        let pump =
            |mut a: UnixStream, mut b: UnixStream, budget: u64, other: (UnixStream, UnixStream)| {
                std::thread::spawn(move || {
                    let mut moved = 0u64;
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let want = buf.len().min((budget - moved) as usize);
                        if want == 0 {
                            break;
                        }
                        match a.read(&mut buf[..want]) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if b.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                                moved += n as u64;
                            }
                        }
                    }
                    for s in [&a, &b, &other.0, &other.1] {
                        let _ = s.shutdown(std::net::Shutdown::Both);
                    }
                    moved
                })
            };
        let s2d = pump(
            src.try_clone().unwrap(),
            dst.try_clone().unwrap(),
            cut_s2d,
            (src.try_clone().unwrap(), dst.try_clone().unwrap()),
        );
        let d2s = pump(
            dst.try_clone().unwrap(),
            src.try_clone().unwrap(),
            cut_d2s,
            (src, dst),
        );
        (s2d.join().unwrap(), d2s.join().unwrap())
    })
}

struct Migration {
    src: Result<vgpu_migration::MigrationReport, MigrateError>,
    dst_ok: bool,
    bytes: (u64, u64),
}

fn migrate_through_proxy(
    src: &Daemon,
    dst: &Arc<Daemon>,
    id: u32,
    cut_s2d: u64,
    cut_d2s: u64,
    n: u32,
) -> Migration {
    let dpath = temp_path(&format!("mig-dst-{n}.sock"));
    let ppath = temp_path(&format!("mig-proxy-{n}.sock"));
    let _ = std::fs::remove_file(&ppath);
    let listener = Listener::bind(&Endpoint::Unix(dpath.clone())).unwrap();
    let receiver = {
        let dst = dst.clone();
        std::thread::spawn(move || {
            listener
                .receive(
                    &dst,
                    ReceiveSpec {
                        name: Some("vm".into()),
                        ..ReceiveSpec::default()
                    },
                )
                .is_ok()
        })
    };
    let p = proxy(UnixListener::bind(&ppath).unwrap(), dpath, cut_s2d, cut_d2s);
    let r = migrate_to(
        src,
        id,
        &Endpoint::Unix(ppath.clone()),
        &SourceConfig::default(),
        &mut |_| {},
    );
    let bytes = p.join().unwrap();
    let dst_ok = receiver.join().unwrap();
    let _ = std::fs::remove_file(ppath);
    Migration {
        src: r,
        dst_ok,
        bytes,
    }
}

/// Puts recognisable content into a vGPU: local memory, a register, a GGTT entry.
fn seed(v: &Daemon, id: u32) {
    let mut d = Driver::probe(Locked(v.vgpu(id).unwrap())).unwrap();
    for k in 0..64u64 {
        d.lmem_write(k * 0x4_0000, &pattern(4096, k as u32));
    }
    d.write32(regs::SCRATCH0, 0xC0FFEE);
    d.map_gm(d.pv().hidden_base, vgpu_abi::gtt::pte_local(0x10_0000));
}

/// The source still holds its content and runs work.
fn check_source(v: &Daemon, id: u32, what: &str) {
    let mut d = Driver::probe(Locked(v.vgpu(id).unwrap())).unwrap();
    for k in (0..64u64).step_by(9) {
        let mut b = vec![0u8; 4096];
        d.lmem_read(k * 0x4_0000, &mut b);
        assert!(
            b == pattern(4096, k as u32),
            "{what}: source memory changed"
        );
    }
    assert_eq!(
        d.read32(regs::SCRATCH0),
        0xC0FFEE,
        "{what}: source register"
    );
    assert_eq!(
        d.gm_entry(d.pv().hidden_base),
        vgpu_abi::gtt::pte_local(0x10_0000)
    );
    d.forget_rings();
    let c = enc::color_blt(
        ROP_PATCOPY,
        BPP_32,
        d.gm_of_lmem(0xF0_0000),
        256,
        64,
        4,
        0x5151,
    );
    d.submit(Engine::Blit, &c)
        .unwrap_or_else(|e| panic!("{what}: source takes work: {e}"));
    d.wait_idle(Engine::Blit, T)
        .unwrap_or_else(|e| panic!("{what}: source runs work: {e}"));
    // Put the memory back as seeded.
    d.lmem_write(0xF0_0000, &vec![0u8; 256 * 4]);
}

#[test]
fn test_migration_cut_at_every_phase_real_vgpus_source_survives() {
    let src = daemon(128);
    let dst = Arc::new(daemon(128));
    let info = src.create(&spec("mini", GttMode::Shadow, "vm")).unwrap();
    seed(&src, info.id);
    // An uncut run through the proxy measures the stream; it completes, so move it back.
    let full = migrate_through_proxy(&src, &dst, info.id, u64::MAX, u64::MAX, 0);
    assert!(
        full.src.is_ok() && full.dst_ok,
        "uncut migration: {:?}",
        full.src.err()
    );
    let (total_s2d, total_d2s) = full.bytes;
    src.destroy(info.id).unwrap();
    dst.destroy(dst.list()[0].id).unwrap();
    // The sweep starts from a source with the same content again.
    let info = src.create(&spec("mini", GttMode::Shadow, "vm")).unwrap();
    seed(&src, info.id);
    println!("uncut migration: {total_s2d} bytes source to destination, {total_d2s} back");
    // Cut points: the start, inside the first frame header, early pages, the middle, the
    // device state and the handshake at the end; and cuts of the destination's replies.
    let mut cuts: Vec<(u64, u64)> = [
        0,
        1,
        15,
        16,
        17,
        200,
        5000,
        70_000,
        total_s2d / 4,
        total_s2d / 2,
    ]
    .into_iter()
    .chain((1..=6).map(|k| total_s2d.saturating_sub(k * 4000)))
    .chain([
        total_s2d - 200,
        total_s2d - 40,
        total_s2d - 17,
        total_s2d - 1,
    ])
    .map(|k| (k, u64::MAX))
    .collect();
    cuts.extend((0..total_d2s).step_by(7).map(|k| (u64::MAX, k)));
    cuts.push((u64::MAX, total_d2s - 1));
    let mut unconfirmed = 0;
    for (n, &(s2d, d2s)) in cuts.iter().enumerate() {
        let what = format!("cut after {s2d} bytes out / {d2s} bytes back");
        let m = migrate_through_proxy(&src, &dst, info.id, s2d, d2s, 10 + n as u32);
        match &m.src {
            Ok(_) => panic!("{what}: the migration completed"),
            Err(MigrateError::Source(SourceError::Unconfirmed { .. })) => {
                // The connection broke after `Commit`: the source stays paused, the
                // destination may run. Here it does; the operator keeps it, as documented.
                unconfirmed += 1;
                assert!(
                    src.scheduler().is_paused(info.id),
                    "{what}: source must stay paused"
                );
                assert!(
                    m.dst_ok,
                    "{what}: unconfirmed, and the destination is not running"
                );
                // Restore the set-up for the next cut: back to the source.
                let moved = dst.list()[0].id;
                dst.destroy(moved).unwrap();
                src.scheduler().resume(info.id).unwrap();
            }
            Err(e) => {
                assert!(!m.dst_ok, "{what}: the destination kept the vGPU after {e}");
                assert!(
                    !src.scheduler().is_paused(info.id),
                    "{what}: source left paused after {e}"
                );
            }
        }
        assert!(dst.list().is_empty(), "{what}: destination kept a vGPU");
        assert_eq!(
            dst.gpu_info().lmem_used_bytes,
            0,
            "{what}: destination kept memory"
        );
        check_source(&src, info.id, &what);
    }
    println!("{} cut points, {unconfirmed} after Commit", cuts.len());
    src.shutdown();
    dst.shutdown();
}

// ---------------------------------------------------------------------------------------------
// Snapshot files.

/// Regression: the temporary file of a snapshot was named after the process id only, so two
/// snapshots to one path at once failed (`File exists`), one removing the other's temporary
/// file, and a stale temporary file left by a killed daemon whose pid came back (a container's
/// PID 1) made every later snapshot to that path fail.
#[test]
fn test_snapshot_concurrent_to_one_path_and_stale_temp_files_succeed() {
    let d = daemon(256);
    let ids: Vec<u32> = (0..4)
        .map(|i| {
            d.create(&spec("mini", GttMode::Shadow, &format!("s{i}")))
                .unwrap()
                .id
        })
        .collect();
    let dir = temp_path("snap-concurrent");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("one.vgpu");
    // What the old naming would collide with.
    std::fs::write(
        dir.join(format!(".one.vgpu.tmp-{}", std::process::id())),
        b"stale",
    )
    .unwrap();
    std::fs::write(
        dir.join(format!(".one.vgpu.tmp-{}-0", std::process::id())),
        b"stale",
    )
    .unwrap();
    std::thread::scope(|s| {
        for &id in &ids {
            let (d, path) = (&d, &path);
            s.spawn(move || {
                for _ in 0..8 {
                    snapshot_to_file(d, id, path).expect("concurrent snapshot");
                }
            });
        }
    });
    let snap = vgpu_migration::decode(&std::fs::read(&path).unwrap()).expect("a complete snapshot");
    assert!(snap.child("header").is_ok());
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "one.vgpu")
        .collect();
    assert_eq!(left.len(), 2, "only the two stale files remain: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
    d.shutdown();
}

// ---------------------------------------------------------------------------------------------
// REST clients that vanish.

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

#[test]
fn test_api_clients_vanishing_mid_request_daemon_stays_healthy() {
    let d = Arc::new(daemon(256));
    let v = d.create(&spec("mini", GttMode::Shadow, "vm")).unwrap();
    let dir = temp_path("vanish");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("api.sock");
    let api = ApiHandle::spawn(d.clone(), &ApiConfig::unix(&socket)).unwrap();
    let client = Client::unix(&socket).unwrap().with_timeout(T);
    let healthy = |what: &str| {
        let t0 = Instant::now();
        let gpu = client
            .gpu()
            .unwrap_or_else(|e| panic!("{what}: the API does not answer: {e}"));
        assert_eq!(gpu.vgpus, 1, "{what}");
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{what}: slow answer {:?}",
            t0.elapsed()
        );
    };
    healthy("at start");
    let base = open_fds();
    let snap = dir.join("vm.vgpu");
    let body = format!("{{\"path\":\"{}\"}}", snap.display());
    let requests: Vec<String> = vec![
        "GET /api/v1/vgpus HTTP/1.1\r\nHost: x\r\n\r\n".into(),
        "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".into(),
        format!(
            "POST /api/v1/vgpus/vm/snapshot HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
        "PUT /api/v1/vgpus/vm/sched HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n{\"weight\":3}".into(),
        "POST /api/v1/vgpus/vm/reset HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".into(),
    ];
    for round in 0..40u32 {
        for r in &requests {
            // Half a request, then gone.
            let mut s = UnixStream::connect(&socket).unwrap();
            let _ = s.write_all(&r.as_bytes()[..r.len() / 2]);
            drop(s);
            // A whole request, closed before the reply is read.
            let mut s = UnixStream::connect(&socket).unwrap();
            let _ = s.write_all(r.as_bytes());
            drop(s);
            // Headers announcing a body that never comes.
            let mut s = UnixStream::connect(&socket).unwrap();
            let _ = s.write_all(
                b"POST /api/v1/vgpus HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro",
            );
            drop(s);
        }
        if round.is_multiple_of(10) {
            healthy("between rounds");
        }
    }
    // Clients that connect and say nothing at all, while others are served.
    let idle: Vec<UnixStream> = (0..64)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    healthy("with 64 idle connections");
    drop(idle);
    // The daemon lets go of every vanished client: descriptors back to where they were.
    wait_until(T, "the API to close vanished connections", || {
        open_fds() <= base + 2
    });
    healthy("at the end");
    // Snapshots whose client vanished still run to the end (the blocking task is not
    // cancelled with the connection): then no temporary file is left and the file is whole.
    wait_until(T, "snapshots of vanished clients to finish", || {
        std::fs::read_dir(&dir)
            .unwrap()
            .all(|e| !e.unwrap().file_name().to_string_lossy().contains(".tmp-"))
    });
    if snap.exists() {
        vgpu_migration::decode(&std::fs::read(&snap).unwrap()).expect("complete snapshot");
    }
    let r = client
        .request(Method::GET, &format!("/api/v1/vgpus/{}", v.id), None)
        .unwrap();
    assert_eq!(r.status.as_u16(), 200);
    api.shutdown().unwrap();
    d.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
