//! Migration v2 over vfio-user (DEVICE_FEATURE states, MIG_DATA_READ/WRITE) between two vgpud
//! instances, and DMA logging of device writes to guest RAM, driven with raw protocol messages
//! (the `vfio_user` Client has no migration support, like Cloud Hypervisor).
#![allow(clippy::cast_possible_truncation)] // Test arithmetic on small known values.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vgpu_abi::cmd::{enc, BPP_32, ROP_PATCOPY};
use vgpu_abi::gtt::pte_guest;
use vgpu_abi::{regs, Engine, PAGE_SIZE};
use vgpu_api::daemon::VgpuSpec;
use vgpu_device::driver::Driver;
use vgpu_device::vgpu::GttMode;
use vgpu_integration_tests::*;

const T: Duration = Duration::from_secs(10);
const ERROR: u32 = 1 << 5;
const FEATURE_MIG_STATE: u32 = 2;
const FEATURE_LOG_START: u32 = 6;
const FEATURE_LOG_REPORT: u32 = 8;
const GET: u32 = 1 << 16;
const SET: u32 = 1 << 17;
const STOP: u32 = 1;
const RUNNING: u32 = 2;
const STOP_COPY: u32 = 3;
const RESUMING: u32 = 4;
const PRE_COPY: u32 = 6;

struct Raw {
    s: UnixStream,
    id: u16,
}

impl Raw {
    fn connect(path: &std::path::Path) -> Self {
        let mut last = None;
        for _ in 0..200 {
            match UnixStream::connect(path) {
                Ok(s) => {
                    s.set_read_timeout(Some(T)).unwrap();
                    let mut r = Raw { s, id: 0 };
                    let json = b"{\"capabilities\":{}}\0";
                    let mut p = 0u16.to_ne_bytes().to_vec();
                    p.extend_from_slice(&1u16.to_ne_bytes());
                    p.extend_from_slice(json);
                    let (flags, _) = r.call(1, &p);
                    if flags & ERROR == 0 {
                        return r;
                    }
                    last = Some("version refused".to_string());
                }
                Err(e) => last = Some(e.to_string()),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("cannot connect: {last:?}");
    }

    fn call(&mut self, cmd: u16, payload: &[u8]) -> (u32, Vec<u8>) {
        self.id = self.id.wrapping_add(1);
        let mut m = Vec::new();
        m.extend_from_slice(&self.id.to_ne_bytes());
        m.extend_from_slice(&cmd.to_ne_bytes());
        m.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        self.s.write_all(&m).unwrap();
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        let size = u32::from_ne_bytes(h[4..8].try_into().unwrap()) as usize;
        let mut rest = vec![0u8; size - 16];
        self.s.read_exact(&mut rest).unwrap();
        (u32::from_ne_bytes(h[8..12].try_into().unwrap()), rest)
    }

    /// `DMA_MAP` of guest RAM, with its fd.
    fn dma_map(&mut self, fd: i32, gpa: u64, size: u64) {
        self.id = self.id.wrapping_add(1);
        let mut m = Vec::new();
        m.extend_from_slice(&self.id.to_ne_bytes());
        m.extend_from_slice(&2u16.to_ne_bytes());
        m.extend_from_slice(&48u32.to_ne_bytes());
        m.extend_from_slice(&[0u8; 8]);
        m.extend_from_slice(&32u32.to_ne_bytes());
        m.extend_from_slice(&3u32.to_ne_bytes());
        m.extend_from_slice(&0u64.to_ne_bytes());
        m.extend_from_slice(&gpa.to_ne_bytes());
        m.extend_from_slice(&size.to_ne_bytes());
        vmm_sys_util::sock_ctrl_msg::ScmSocket::send_with_fds(&self.s, &[&m[..]], &[fd]).unwrap();
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_ne_bytes(h[8..12].try_into().unwrap()) & ERROR,
            0,
            "DMA_MAP"
        );
    }

    fn feature(&mut self, flags: u32, data: &[u8]) -> (u32, Vec<u8>) {
        self.feature_argsz(flags, data, 8 + data.len() as u32)
    }

    /// `argsz` is the largest reply accepted (a report needs room for its bitmap).
    fn feature_argsz(&mut self, flags: u32, data: &[u8], argsz: u32) -> (u32, Vec<u8>) {
        let mut p = argsz.to_ne_bytes().to_vec();
        p.extend_from_slice(&flags.to_ne_bytes());
        p.extend_from_slice(data);
        self.call(16, &p)
    }

    fn set_state(&mut self, state: u32) {
        let mut d = state.to_ne_bytes().to_vec();
        d.extend_from_slice(&u32::MAX.to_ne_bytes());
        let (flags, _) = self.feature(FEATURE_MIG_STATE | SET, &d);
        assert_eq!(flags & ERROR, 0, "transition to {state} refused");
    }

    /// Reads the stream until a short read.
    fn read_all(&mut self, out: &mut Vec<u8>) {
        loop {
            let want = 256 * 1024u32;
            let mut p = (8 + want).to_ne_bytes().to_vec();
            p.extend_from_slice(&want.to_ne_bytes());
            let (flags, rest) = self.call(17, &p);
            assert_eq!(flags & ERROR, 0, "MIG_DATA_READ failed");
            let n = u32::from_ne_bytes(rest[4..8].try_into().unwrap()) as usize;
            out.extend_from_slice(&rest[8..8 + n]);
            if n < want as usize {
                return;
            }
        }
    }

    fn write_all(&mut self, data: &[u8]) {
        for chunk in data.chunks(200 * 1024) {
            let mut p = ((8 + chunk.len()) as u32).to_ne_bytes().to_vec();
            p.extend_from_slice(&(chunk.len() as u32).to_ne_bytes());
            p.extend_from_slice(chunk);
            let (flags, _) = self.call(18, &p);
            assert_eq!(flags & ERROR, 0, "MIG_DATA_WRITE refused");
        }
    }
}

fn spec(name: &str, gtt: GttMode) -> VgpuSpec {
    VgpuSpec {
        profile: "mini".into(),
        gtt,
        name: Some(name.into()),
        weight: None,
    }
}

fn fill(d: &mut Driver<Vmm>, off: u64, color: u32) {
    let c = enc::color_blt(ROP_PATCOPY, BPP_32, d.gm_of_lmem(off), 1024, 256, 8, color);
    d.submit(Engine::Blit, &c).unwrap();
    d.wait_idle(Engine::Blit, T).unwrap();
}

#[test]
fn test_migration_v2_over_vfio_user_moves_the_vgpu() {
    let a = daemon(256);
    let b = daemon(256);
    let src = a.create(&spec("vm", GttMode::Shadow)).unwrap();
    let mut d = Driver::probe(Vmm::attach(&src.socket)).unwrap();
    fill(&mut d, 0x10_0000, 0x1111_1111);
    d.write32(regs::SCRATCH0, 0x5a5a);
    d.lmem_write(0x20_0000, b"written by the CPU through the aperture");
    let ram = std::mem::replace(&mut d.device().ram, Mapping::memfd(4096));
    drop(d);

    // Source: pre-copy while "running", then stop-copy.
    let mut s = Raw::connect(&src.socket);
    let mut stream = Vec::new();
    s.set_state(PRE_COPY);
    s.read_all(&mut stream);
    let precopy = stream.len();
    assert!(precopy > 0, "pre-copy sends the non-zero pages");
    s.set_state(STOP_COPY);
    s.read_all(&mut stream);
    s.set_state(STOP);
    assert!(a.scheduler().is_paused(src.id), "source engines stopped");

    // Destination: a vGPU of the same profile at the same GM ranges receives the stream.
    let hdr = a.vgpu(src.id).unwrap().lock().unwrap().header();
    let dst = b
        .create_at(
            &spec("vm", GttMode::TwoDim),
            hdr.mappable.start,
            hdr.hidden.start,
        )
        .unwrap();
    let mut t = Raw::connect(&dst.socket);
    t.set_state(RESUMING);
    t.write_all(&stream);
    t.set_state(STOP);
    t.set_state(RUNNING);
    drop(t);
    let mut d2 = Driver::probe(Vmm::attach_ram(&dst.socket, ram)).unwrap();
    assert_eq!(d2.read32(regs::SCRATCH0), 0x5a5a);
    let mut px = [0u8; 4];
    d2.lmem_read(0x10_0000 + 1024 * 7 + 4 * 255, &mut px);
    assert_eq!(
        u32::from_le_bytes(px),
        0x1111_1111,
        "engine-written memory moved"
    );
    let mut txt = [0u8; 39];
    d2.lmem_read(0x20_0000, &mut txt);
    assert_eq!(&txt, b"written by the CPU through the aperture");
    d2.adopt_rings();
    fill(&mut d2, 0x30_0000, 0x2222_2222);
    println!(
        "vfio-user migration stream: {} bytes ({} in pre-copy)",
        stream.len(),
        precopy
    );

    // A destination that gets a truncated stream refuses to leave RESUMING.
    let c = a.create(&spec("c", GttMode::Shadow)).unwrap();
    let hdr_c = a.vgpu(c.id).unwrap().lock().unwrap().header();
    let b2 = daemon(256);
    let dst3 = b2
        .create_at(
            &spec("c", GttMode::Shadow),
            hdr_c.mappable.start,
            hdr_c.hidden.start,
        )
        .unwrap();
    let mut t = Raw::connect(&dst3.socket);
    t.set_state(RESUMING);
    t.write_all(&stream[..stream.len() / 2]);
    let mut d = STOP.to_ne_bytes().to_vec();
    d.extend_from_slice(&u32::MAX.to_ne_bytes());
    let (flags, _) = t.feature(FEATURE_MIG_STATE | SET, &d);
    assert_ne!(flags & ERROR, 0, "incomplete stream refused");
}

#[test]
fn test_dma_logging_reports_device_writes_to_guest_ram() {
    let a = daemon(256);
    let v = a.create(&spec("log", GttMode::TwoDim)).unwrap();
    let mut d = Driver::probe(Vmm::attach(&v.socket)).unwrap();
    // Guest pages 16..20 of RAM mapped at hidden GM, then written by the blitter.
    let h = d.pv().hidden_base;
    for p in 0..4u64 {
        d.map_gm(h + p * PAGE_SIZE, pte_guest(RAM_GPA + (16 + p) * PAGE_SIZE));
    }
    d.setup_ring(Engine::Blit).unwrap();
    // Logging is a DEVICE_FEATURE on the same socket: the Client's connection must go first.
    let ram = std::mem::replace(&mut d.device().ram, Mapping::memfd(4096));
    drop(d);
    let mut r = Raw::connect(&v.socket);
    r.dma_map(ram.fd(), RAM_GPA, RAM_SIZE as u64);
    let mut start = 4096u64.to_ne_bytes().to_vec();
    start.extend_from_slice(&1u32.to_ne_bytes());
    start.extend_from_slice(&0u32.to_ne_bytes());
    start.extend_from_slice(&RAM_GPA.to_ne_bytes());
    start.extend_from_slice(&(RAM_SIZE as u64).to_ne_bytes());
    let (flags, _) = r.feature(FEATURE_LOG_START | SET, &start);
    assert_eq!(flags & ERROR, 0, "logging started");
    // Drive a blit through raw region writes is long-winded: use the device directly.
    let vg = a.vgpu(v.id).unwrap();
    {
        let mut dev = vg.lock().unwrap();
        let mut drv = Driver::probe(vgpu_device::driver::Inline(&mut dev)).unwrap();
        drv.adopt_rings();
        let c = enc::color_blt(ROP_PATCOPY, BPP_32, h + PAGE_SIZE, 4096, 256, 2, 7);
        drv.submit(Engine::Blit, &c).unwrap();
        drv.wait_idle(Engine::Blit, T).unwrap();
    }
    let mut rep = RAM_GPA.to_ne_bytes().to_vec();
    rep.extend_from_slice(&(64 * PAGE_SIZE).to_ne_bytes());
    rep.extend_from_slice(&4096u64.to_ne_bytes());
    let (flags, rest) = r.feature_argsz(FEATURE_LOG_REPORT | GET, &rep, 8 + 24 + 8);
    assert_eq!(flags & ERROR, 0, "report");
    let bitmap = u64::from_ne_bytes(rest[8 + 24..8 + 32].try_into().unwrap());
    assert_eq!(
        bitmap,
        1 << 17 | 1 << 18,
        "exactly the guest pages the blit wrote (two rows, one per page)"
    );
    let (_, rest) = r.feature_argsz(FEATURE_LOG_REPORT | GET, &rep, 8 + 24 + 8);
    assert_eq!(
        u64::from_ne_bytes(rest[8 + 24..8 + 32].try_into().unwrap()),
        0,
        "reported pages are cleared"
    );
    drop(ram);
}
