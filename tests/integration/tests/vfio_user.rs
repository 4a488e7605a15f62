//! vgpud served over vfio-user, driven by the `vfio_user` Client (what Cloud Hypervisor runs)
//! playing the VMM and a guest driver: bring-up, real work checked bit-exact, MSI-X through
//! eventfds, two vGPUs at once, reconnect, and hostile clients that must not disturb others.
#![allow(clippy::cast_possible_truncation)] // Test arithmetic on small known values.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vgpu_abi::cmd::{enc, BPP_32, KERNEL_SAXPY, ROP_SRCCOPY};
use vgpu_abi::gtt::pte_guest;
use vgpu_abi::{regs, Engine, PAGE_SIZE};
use vgpu_api::daemon::VgpuSpec;
use vgpu_device::driver::Driver;
use vgpu_device::vgpu::GttMode;
use vgpu_integration_tests::*;

const T: Duration = Duration::from_secs(10);

fn spec(profile: &str, gtt: GttMode, name: &str) -> VgpuSpec {
    VgpuSpec {
        profile: profile.into(),
        gtt,
        name: Some(name.into()),
        weight: None,
    }
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// Copies a 256x64 32-bpp image from guest RAM (through hidden-GM GGTT entries) into local
/// memory with the blitter, raises a user interrupt, and checks the bytes and the MSI-X eventfd.
fn blit_from_guest_ram(d: &mut Driver<Vmm>, seed: u32) {
    let (w, h) = (256u32, 64u32);
    let bytes = (w * h * 4) as usize;
    let src = pattern(bytes, seed);
    let ram_off = 0x10_0000u64;
    d.device().ram.write(ram_off, &src);
    // Map the guest pages into hidden GM.
    let gm = d.pv().hidden_base;
    for p in 0..(bytes as u64).div_ceil(PAGE_SIZE) {
        d.map_gm(
            gm + p * PAGE_SIZE,
            pte_guest(RAM_GPA + ram_off + p * PAGE_SIZE),
        );
    }
    assert_eq!(
        d.read32(regs::GTT_FAULT_COUNT),
        0,
        "every GGTT entry accepted"
    );
    let dst_off = 0x20_0000u64;
    let copy = enc::src_copy_blt(enc::Copy {
        rop: ROP_SRCCOPY,
        bpp: BPP_32,
        dst: d.gm_of_lmem(dst_off),
        dst_pitch: w * 4,
        src: gm,
        src_pitch: w * 4,
        width: w,
        height: h,
        pattern: 0,
    });
    let irq = enc::user_interrupt();
    d.submit(Engine::Blit, &[copy.as_slice(), &irq].concat())
        .unwrap();
    let n = d
        .device()
        .wait_irq(Engine::Blit.index(), T)
        .expect("MSI-X vector of the blit engine");
    assert!(n >= 1);
    d.wait_idle(Engine::Blit, T).unwrap();
    let mut got = vec![0u8; bytes];
    d.lmem_read(dst_off, &mut got);
    assert!(got == src, "blit result differs");
    d.write32(regs::INTR_STATUS, regs::intr_user(Engine::Blit));
}

/// saxpy on the compute engine with data in local memory, written through the aperture mmap.
fn saxpy(d: &mut Driver<Vmm>) {
    let n = 4096u32;
    let x: Vec<f32> = (0..n).map(|i| i as f32 * 0.25 - 3.0).collect();
    let y: Vec<f32> = (0..n).map(|i| 7.5 - i as f32).collect();
    let b = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
    d.lmem_write(0x40_0000, &b(&x));
    d.lmem_write(0x50_0000, &b(&y));
    let cmd = enc::dispatch(enc::Dispatch {
        kernel: KERNEL_SAXPY,
        params: [n, 0, 0],
        scalar: -1.5,
        buffers: [d.gm_of_lmem(0x40_0000), d.gm_of_lmem(0x50_0000), 0],
    });
    let fence_gm = d.gm_of_lmem(0x60_0000);
    d.submit(
        Engine::Compute,
        &[cmd.as_slice(), &enc::store_data_imm(fence_gm, 0xfeed)].concat(),
    )
    .unwrap();
    d.wait_idle(Engine::Compute, T).unwrap();
    let mut out = vec![0u8; n as usize * 4];
    d.lmem_read(0x50_0000, &mut out);
    for (i, c) in out.chunks_exact(4).enumerate() {
        let want = -1.5f32 * x[i] + y[i];
        assert_eq!(
            f32::from_le_bytes([c[0], c[1], c[2], c[3]]).to_bits(),
            want.to_bits(),
            "saxpy[{i}]"
        );
    }
    assert_eq!(
        d.read32(regs::engine_base(Engine::Compute) + regs::LAST_FENCE),
        0xfeed
    );
}

#[test]
fn test_full_bringup_through_client_runs_blit_and_compute_bit_exact() {
    let daemon = daemon(512);
    let info = daemon.create(&spec("small", GttMode::Shadow, "a")).unwrap();
    let vmm = Vmm::attach(&info.socket);
    let bar0 = vmm.client.region(0).unwrap();
    assert_eq!(bar0.size, vgpu_abi::pci::BAR0_SIZE);
    assert!(bar0.file_offset.is_none(), "BAR0 is trapped, never mapped");
    assert_eq!(vmm.client.region(2).unwrap().size, 64 << 20);
    let mut d = Driver::probe(vmm).unwrap();
    assert_eq!(d.pv().lmem_size, 64 << 20);
    blit_from_guest_ram(&mut d, 1);
    saxpy(&mut d);
}

#[test]
fn test_two_vgpus_on_one_daemon_work_concurrently_in_both_modes() {
    let daemon = daemon(512);
    let a = daemon.create(&spec("small", GttMode::Shadow, "a")).unwrap();
    let b = daemon
        .create(&spec("compute", GttMode::TwoDim, "b"))
        .unwrap();
    let ta = std::thread::spawn(move || {
        let mut d = Driver::probe(Vmm::attach(&a.socket)).unwrap();
        for i in 0..10 {
            blit_from_guest_ram(&mut d, i);
        }
    });
    let tb = std::thread::spawn(move || {
        let mut d = Driver::probe(Vmm::attach(&b.socket)).unwrap();
        for i in 0..10 {
            blit_from_guest_ram(&mut d, 100 + i);
            saxpy(&mut d);
        }
    });
    ta.join().unwrap();
    tb.join().unwrap();
}

#[test]
fn test_disconnect_and_reconnect_keeps_device_state() {
    let daemon = daemon(256);
    let info = daemon.create(&spec("mini", GttMode::TwoDim, "r")).unwrap();
    let mut d = Driver::probe(Vmm::attach(&info.socket)).unwrap();
    d.write32(regs::SCRATCH0, 0x1234_5678);
    d.lmem_write(0x1000, b"kept across reconnects");
    let hidden = d.pv().hidden_base + (16 << 20);
    d.map_gm(hidden, vgpu_abi::gtt::pte_local(0x1000));
    blit_from_guest_ram(&mut d, 5);
    let vmm = d.device();
    vmm.client.shutdown().unwrap();
    drop(d);
    // Cloud Hypervisor reconnects to the same socket on restore.
    let mut d = Driver::probe(Vmm::attach(&info.socket)).unwrap();
    assert_eq!(d.read32(regs::SCRATCH0), 0x1234_5678);
    let mut b = [0u8; 22];
    d.lmem_read(0x1000, &mut b);
    assert_eq!(&b, b"kept across reconnects");
    assert_eq!(d.gm_entry(hidden), vgpu_abi::gtt::pte_local(0x1000));
    // The new connection works (its fresh guest RAM mapping replaces the old one).
    d.forget_rings();
    blit_from_guest_ram(&mut d, 6);
}

fn header(id: u16, cmd: u16, size: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..2].copy_from_slice(&id.to_ne_bytes());
    h[2..4].copy_from_slice(&cmd.to_ne_bytes());
    h[4..8].copy_from_slice(&size.to_ne_bytes());
    h
}

/// A raw connection that has negotiated the version.
fn raw(socket: &std::path::Path) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let json = b"{\"capabilities\":{}}\0";
    let mut msg = header(0, 1, (16 + 4 + json.len()) as u32).to_vec();
    msg.extend_from_slice(&0u16.to_ne_bytes());
    msg.extend_from_slice(&1u16.to_ne_bytes());
    msg.extend_from_slice(json);
    s.write_all(&msg).unwrap();
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    let size = u32::from_ne_bytes(h[4..8].try_into().unwrap()) as usize;
    let mut rest = vec![0u8; size - 16];
    s.read_exact(&mut rest).unwrap();
    s
}

/// Sends a message and returns the reply's flags and error.
fn call(s: &mut UnixStream, msg: &[u8]) -> (u32, u32, Vec<u8>) {
    s.write_all(msg).unwrap();
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    let size = u32::from_ne_bytes(h[4..8].try_into().unwrap()) as usize;
    let mut rest = vec![0u8; size.saturating_sub(16)];
    s.read_exact(&mut rest).unwrap();
    (
        u32::from_ne_bytes(h[8..12].try_into().unwrap()),
        u32::from_ne_bytes(h[12..16].try_into().unwrap()),
        rest,
    )
}

#[test]
fn test_malformed_messages_get_errors_and_daemon_keeps_serving_others() {
    let daemon = daemon(512);
    let a = daemon
        .create(&spec("mini", GttMode::Shadow, "hostile"))
        .unwrap();
    let b = daemon
        .create(&spec("small", GttMode::TwoDim, "good"))
        .unwrap();
    let good = std::thread::spawn(move || {
        let mut d = Driver::probe(Vmm::attach(&b.socket)).unwrap();
        for i in 0..20 {
            blit_from_guest_ram(&mut d, 1000 + i);
        }
    });
    const ERROR: u32 = 1 << 5;
    // Unknown command (retired 14, and 99): error reply after the payload, connection still usable.
    let mut s = raw(&a.socket);
    let mut m = header(1, 14, 24).to_vec();
    m.extend_from_slice(&[0xAB; 8]);
    let (flags, err, _) = call(&mut s, &m);
    assert!(
        flags & ERROR != 0 && err != 0,
        "unknown command gets an error"
    );
    let (flags, _, _) = call(&mut s, &header(2, 99, 16));
    assert!(flags & ERROR != 0);
    // Bad region index and an oversized count on REGION_READ: data-less error handling stays in sync.
    let mut m = header(3, 9, 32).to_vec();
    m.extend_from_slice(&0u64.to_ne_bytes());
    m.extend_from_slice(&77u32.to_ne_bytes());
    m.extend_from_slice(&4u32.to_ne_bytes());
    let (_, _, rest) = call(&mut s, &m);
    assert_eq!(&rest[16..20], &[0xFF; 4], "bad region reads all-ones");
    let mut m = header(4, 9, 32).to_vec();
    m.extend_from_slice(&0u64.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&(64u32 << 20).to_ne_bytes());
    let (flags, _, _) = call(&mut s, &m);
    assert!(flags & ERROR != 0, "oversized count rejected");
    // Still alive: DEVICE_GET_INFO works on the same connection.
    let mut m = header(5, 4, 32).to_vec();
    m.extend_from_slice(&16u32.to_ne_bytes());
    m.extend_from_slice(&[0u8; 12]);
    let (flags, _, rest) = call(&mut s, &m);
    assert_eq!(flags & ERROR, 0);
    assert_eq!(
        u32::from_ne_bytes(rest[8..12].try_into().unwrap()),
        9,
        "nine regions"
    );
    // Too many fds (20 > 16) on SET_IRQS: an error reply, the fds are closed, the connection lives.
    let efds: Vec<vmm_sys_util::eventfd::EventFd> = (0..20)
        .map(|_| vmm_sys_util::eventfd::EventFd::new(0).unwrap())
        .collect();
    let raw_fds: Vec<i32> = efds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
    let mut m = header(6, 8, 36).to_vec();
    for v in [20u32, 4 | 32, 2, 0, 20] {
        m.extend_from_slice(&v.to_ne_bytes());
    }
    vmm_sys_util::sock_ctrl_msg::ScmSocket::send_with_fds(&s, &[&m[..]], &raw_fds).unwrap();
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert!(
        u32::from_ne_bytes(h[8..12].try_into().unwrap()) & ERROR != 0,
        "too many fds rejected"
    );
    let (flags, _, _) = call(&mut s, &header(7, 13, 16));
    assert_eq!(
        flags & ERROR,
        0,
        "DEVICE_RESET still served on the same connection"
    );
    drop(s);
    // Truncated header, then a message claiming a huge size: those connections are closed.
    let mut s = raw(&a.socket);
    s.write_all(&[1, 2, 3]).unwrap();
    drop(s);
    let mut s = raw(&a.socket);
    s.write_all(&header(9, 10, u32::MAX)).unwrap();
    let mut buf = [0u8; 16];
    assert!(
        matches!(s.read(&mut buf), Ok(0) | Err(_)),
        "connection closed"
    );
    drop(s);
    good.join().unwrap();
    // The hostile vGPU's socket still serves a well-behaved client.
    let mut d = Driver::probe(Vmm::attach(&a.socket)).unwrap();
    blit_from_guest_ram(&mut d, 7);
}

#[test]
fn test_destroy_removes_socket_and_frees_capacity() {
    let daemon = daemon(256);
    let info = daemon
        .create(&spec("medium", GttMode::Shadow, "m"))
        .unwrap();
    assert!(info.socket.exists());
    assert!(
        daemon
            .create(&spec("medium", GttMode::Shadow, "m2"))
            .is_err(),
        "256 MiB GPU holds one medium"
    );
    daemon.destroy(info.id).unwrap();
    assert!(!info.socket.exists(), "socket removed");
    let again = daemon
        .create(&spec("medium", GttMode::Shadow, "m3"))
        .unwrap();
    let mut d = Driver::probe(Vmm::attach(&again.socket)).unwrap();
    let mut b = vec![0xAAu8; 4096];
    d.lmem_read(0, &mut b);
    assert!(b.iter().all(|&x| x == 0), "scrubbed");
}
