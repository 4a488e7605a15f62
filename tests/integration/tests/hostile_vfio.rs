//! Hostile vfio-user clients against the real vgpud backend (`api/src/backend.rs`,
//! `api/src/vfio_migration.rs`), not the test backend of `vfio-user/tests`: whole sessions of
//! random interleavings of valid and mutated messages — DMA maps of real memfds, region
//! accesses (registers, GGTT window, MSI-X, aperture, config space), ring set-up and doorbells
//! with random command streams, `SET_IRQS` with eventfds, device resets, migration state
//! changes, `MIG_DATA_READ` and random or mutated envelope streams into `RESUMING` — while a
//! neighbour vGPU of the same daemon works and its results are checked bit for bit.
//!
//! After every session: no panic in the server, guest memory the client never mapped (or
//! mapped read-only) is unchanged, the neighbour made progress, and the hostile vGPU's socket
//! serves a well-behaved client that gets correct results. `FUZZ_CASES` raises the number of
//! sessions (`scripts/fuzz`).
#![allow(clippy::cast_possible_truncation)] // Test arithmetic on small known values.

mod support;

use std::io::Read;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use proptest::prelude::*;
use support::*;
use vgpu_abi::cmd::{enc, BPP_32, KERNEL_SAXPY, ROP_PATCOPY, ROP_SRCCOPY};
use vgpu_abi::gtt::{pte_guest, pte_local, PTE_READ_ONLY};
use vgpu_abi::pci::{GGTT_OFFSET, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET};
use vgpu_abi::{regs, Engine, PAGE_SIZE};
use vgpu_api::daemon::Daemon;
use vgpu_api::model::VgpuInfo;
use vgpu_device::driver::{ring_lmem_offset, Driver, Locked};
use vgpu_device::vgpu::persist::VgpuHeader;
use vgpu_device::vgpu::GttMode;
use vgpu_integration_tests::{daemon, Vmm, RAM_GPA};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Bytes of the client's read-write guest memory; only its first half is ever DMA-mapped.
const RW_BYTES: u64 = 2 << 20;
/// Bytes of the client's read-only guest memory (always mapped with `READ` only).
const RO_BYTES: u64 = 256 << 10;
const RW_FILL: u8 = 0x5A;
const RO_FILL: u8 = 0xC3;

/// The daemon, the hostile vGPU, a working neighbour and a captured migration stream.
struct World {
    daemon: Daemon,
    hostile: VgpuInfo,
    hdr: VgpuHeader,
    victim: VgpuHeader,
    neighbour: Option<Neighbour>,
    /// The hostile vGPU's own migration stream (pre-copy and stop-copy), and its envelopes.
    stream: Vec<u8>,
    envelopes: Vec<std::ops::Range<usize>>,
}

/// Splits a migration stream into its envelopes.
fn envelopes(stream: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 20 <= stream.len() {
        let len = u64::from_le_bytes(stream[at + 12..at + 20].try_into().unwrap()) as usize;
        let end = at + 20 + len + 4;
        out.push(at..end);
        at = end;
    }
    assert_eq!(at, stream.len(), "stream is a sequence of envelopes");
    out
}

impl World {
    fn new() -> World {
        let daemon = daemon(256);
        let victim = daemon
            .create(&spec("mini", GttMode::TwoDim, "victim"))
            .unwrap();
        let hostile = daemon
            .create(&spec("mini", GttMode::Shadow, "hostile"))
            .unwrap();
        let hdr = daemon.vgpu(hostile.id).unwrap().lock().unwrap().header();
        let victim_hdr = daemon.vgpu(victim.id).unwrap().lock().unwrap().header();
        // Give the hostile vGPU some content, then capture its own migration stream.
        {
            let mut d = Driver::probe(Locked(daemon.vgpu(hostile.id).unwrap())).unwrap();
            d.lmem_write(0x1000, &pattern(3 * 4096, 77));
            let c = enc::color_blt(ROP_PATCOPY, BPP_32, d.gm_of_lmem(0x8000), 1024, 256, 4, 9);
            d.submit(Engine::Blit, &c).unwrap();
            d.wait_idle(Engine::Blit, T).unwrap();
        }
        let mut r = Raw::connect(&hostile.socket);
        assert!(!r.set_state(mig::PRE_COPY).failed());
        let mut stream = r.read_stream();
        assert!(!r.set_state(mig::STOP_COPY).failed());
        stream.extend(r.read_stream());
        assert!(!r.set_state(mig::STOP).failed());
        assert!(!r.set_state(mig::RUNNING).failed());
        drop(r);
        let envelopes = envelopes(&stream);
        let neighbour = Some(Neighbour::start(&daemon, victim.id));
        World {
            daemon,
            hostile,
            hdr,
            victim: victim_hdr,
            neighbour,
            stream,
            envelopes,
        }
    }

    fn neighbour(&self) -> &Neighbour {
        self.neighbour.as_ref().expect("neighbour")
    }

    /// The hostile vGPU's server counters.
    fn panics(&self) -> u64 {
        self.daemon.counters().iter().map(|c| c.vfio.panics).sum()
    }

    /// A well-behaved client attaches to the hostile vGPU's socket (after a device reset, as
    /// a VMM does at boot) and gets bit-exact results.
    fn check_serves_good_client(&self, seed: u32) {
        let mut r = Raw::connect(&self.hostile.socket);
        assert!(!r.call(cmd::DEVICE_RESET, &[]).failed(), "DEVICE_RESET");
        drop(r);
        let mut d = Driver::probe(Vmm::attach(&self.hostile.socket)).expect("probe");
        d.forget_rings();
        let color = 0x0102_0304 ^ seed;
        let c = enc::color_blt(
            ROP_PATCOPY,
            BPP_32,
            d.gm_of_lmem(0x40_0000),
            256,
            64,
            16,
            color,
        );
        d.submit(Engine::Blit, &c).expect("good client submit");
        d.wait_idle(Engine::Blit, T).expect("good client blit");
        let mut got = vec![0u8; 256 * 16];
        d.lmem_read(0x40_0000, &mut got);
        assert!(
            got.chunks_exact(4)
                .all(|c| u32::from_le_bytes(c.try_into().unwrap()) == color),
            "good client's blit on the hostile vGPU's socket is wrong"
        );
        drop(d);
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(n) = self.neighbour.take() {
            if !std::thread::panicking() {
                let rounds = n.finish();
                eprintln!("neighbour completed {rounds} rounds, bit-exact");
            }
        }
        self.daemon.shutdown();
    }
}

// ---------------------------------------------------------------------------------------------
// Session operations.

/// Where a command's address points.
#[derive(Clone, Debug)]
enum Addr {
    /// Own local memory, through the mappable GM range.
    Own(u32),
    /// Own hidden GM page (mapped or not by `Ggtt` operations).
    Hidden(u16),
    /// The neighbour's mappable GM.
    Neighbour(u32),
    /// The neighbour's hidden GM.
    NeighbourHidden(u16),
    /// Anything.
    Any(u64),
}

/// One command of a submission.
#[derive(Clone, Debug)]
enum Cmd {
    Fill { dst: Addr, w: u8, h: u8, color: u32 },
    Copy { dst: Addr, src: Addr, w: u8, h: u8 },
    Fence { at: Addr, v: u32 },
    Irq,
    Noop,
    Saxpy { x: Addr, y: Addr, n: u16 },
    Lri { reg: u32, v: u32 },
    Batch { at: Addr, second: bool },
    Garbage(Vec<u32>),
}

/// A GGTT entry value.
#[derive(Clone, Debug)]
enum Pte {
    /// A page of the read-write guest memory the client may have mapped.
    Guest(u16, bool),
    /// A page of the read-only guest memory.
    GuestRo(u16),
    /// A page of own local memory (in range or not).
    Local(u32),
    /// Anything.
    Any(u64),
}

/// One operation of a hostile session (some expand to several messages).
#[derive(Clone, Debug)]
enum Op {
    Map {
        file_page: u16,
        pages: u8,
        iova_page: u16,
        flags: u32,
    },
    MapRo {
        file_page: u8,
        pages: u8,
        iova_page: u16,
    },
    MapNoFd {
        iova_page: u16,
        pages: u8,
    },
    Unmap {
        iova_page: u16,
        pages: u8,
        flags: u32,
    },
    Ggtt {
        hidden_page: u16,
        neighbour: bool,
        pte: Pte,
    },
    Reg {
        off: u32,
        value: u32,
        wide: bool,
    },
    RegRead {
        off: u64,
        count: u32,
    },
    Msix {
        vector: u8,
        word: u8,
        value: u32,
    },
    Aperture {
        off: u32,
        len: u16,
        byte: u8,
        write: bool,
    },
    Config {
        off: u16,
        value: u32,
        len: u8,
        write: bool,
    },
    Work {
        engine: u8,
        cmds: Vec<Cmd>,
        tail_delta: i8,
    },
    SetIrqs {
        flags: u32,
        index: u32,
        start: u32,
        count: u32,
        fds: u8,
    },
    Reset,
    MigState(u32),
    MigRead(u32),
    Save {
        reads: u8,
    },
    Resume {
        stream: Stream,
        chunk: u32,
        finish: bool,
    },
    Info {
        command: u16,
        argsz: u32,
        index: u32,
    },
    WriteMulti(Vec<u8>),
    Message {
        command: u16,
        flags: u32,
        payload: Vec<u8>,
    },
}

/// A migration stream to push into `RESUMING`.
#[derive(Clone, Debug)]
enum Stream {
    /// The captured stream as it is.
    Valid,
    /// One envelope, its tree mutated and re-encoded with a valid checksum.
    Mutated {
        envelope: usize,
        mutations: Vec<Mutation>,
    },
    /// The captured stream with bytes flipped (checksums then fail).
    Flipped(Vec<(usize, u8)>),
    /// A prefix of the captured stream.
    Prefix(usize),
    /// Random bytes.
    Random(Vec<u8>),
}

/// Byte mutations of one encoded message: (index, xor); the size field is kept.
type Flips = Vec<(usize, u8)>;

/// How a session ends.
#[derive(Clone, Debug)]
enum Tail {
    /// Orderly: the client shuts its side down.
    Close,
    /// A message cut short.
    Truncated(usize),
    /// A header announcing more than the server accepts.
    Oversized,
}

fn addr() -> impl Strategy<Value = Addr> {
    prop_oneof![
        6 => (0u32..(16 << 20)).prop_map(|o| Addr::Own(o & !3)),
        2 => any::<u16>().prop_map(Addr::Hidden),
        1 => any::<u32>().prop_map(|o| Addr::Neighbour(o & !3)),
        1 => any::<u16>().prop_map(Addr::NeighbourHidden),
        1 => any::<u64>().prop_map(Addr::Any),
    ]
}

fn command() -> impl Strategy<Value = Cmd> {
    prop_oneof![
        4 => (addr(), 1u8..64, 1u8..32, any::<u32>())
            .prop_map(|(dst, w, h, color)| Cmd::Fill { dst, w, h, color }),
        2 => (addr(), addr(), 1u8..64, 1u8..16).prop_map(|(dst, src, w, h)| Cmd::Copy { dst, src, w, h }),
        3 => (addr(), any::<u32>()).prop_map(|(at, v)| Cmd::Fence { at, v }),
        2 => Just(Cmd::Irq),
        1 => Just(Cmd::Noop),
        1 => (addr(), addr(), 0u16..2048).prop_map(|(x, y, n)| Cmd::Saxpy { x, y, n }),
        1 => (prop_oneof![Just(regs::SCRATCH0), Just(regs::INTR_MASK), Just(0x1100u32), any::<u32>()],
              any::<u32>()).prop_map(|(reg, v)| Cmd::Lri { reg, v }),
        1 => (addr(), any::<bool>()).prop_map(|(at, second)| Cmd::Batch { at, second }),
        1 => prop::collection::vec(any::<u32>(), 1..8).prop_map(Cmd::Garbage),
    ]
}

/// Work a well-behaved driver would submit: commands of the engine's own client on its own
/// local memory, a fence and an interrupt, so that many submissions really run.
fn good_work() -> impl Strategy<Value = Op> {
    let own = || (0u32..(12 << 20)).prop_map(|o| Addr::Own(o & !3));
    let blit = prop_oneof![
        (own(), 1u8..64, 1u8..32, any::<u32>()).prop_map(|(dst, w, h, color)| Cmd::Fill {
            dst,
            w,
            h,
            color
        }),
        (own(), own(), 1u8..64, 1u8..16).prop_map(|(dst, src, w, h)| Cmd::Copy { dst, src, w, h }),
    ];
    let compute = (own(), own(), 1u16..1024).prop_map(|(x, y, n)| Cmd::Saxpy { x, y, n });
    let mi = prop_oneof![
        (own(), any::<u32>()).prop_map(|(at, v)| Cmd::Fence { at, v }),
        Just(Cmd::Irq),
        Just(Cmd::Noop),
        any::<u32>().prop_map(|v| Cmd::Lri {
            reg: regs::SCRATCH0,
            v
        }),
    ];
    prop_oneof![
        (prop::collection::vec(prop_oneof![2 => blit, 1 => mi.clone()], 1..6)).prop_map(|cmds| {
            Op::Work {
                engine: Engine::Blit as u8,
                cmds,
                tail_delta: 0,
            }
        }),
        (prop::collection::vec(prop_oneof![2 => compute, 1 => mi.clone()], 1..4)).prop_map(
            |cmds| Op::Work {
                engine: Engine::Compute as u8,
                cmds,
                tail_delta: 0
            }
        ),
        (0u8..4, prop::collection::vec(mi, 1..6)).prop_map(|(engine, cmds)| Op::Work {
            engine,
            cmds,
            tail_delta: 0
        }),
    ]
}

fn pte() -> impl Strategy<Value = Pte> {
    prop_oneof![
        3 => (0u16..1024, any::<bool>()).prop_map(|(p, ro)| Pte::Guest(p, ro)),
        1 => (0u16..64).prop_map(Pte::GuestRo),
        2 => any::<u32>().prop_map(Pte::Local),
        1 => any::<u64>().prop_map(Pte::Any),
    ]
}

fn stream() -> impl Strategy<Value = Stream> {
    prop_oneof![
        2 => Just(Stream::Valid),
        5 => (any::<usize>(), prop::collection::vec(mutation(), 1..4))
            .prop_map(|(envelope, mutations)| Stream::Mutated { envelope, mutations }),
        1 => prop::collection::vec((any::<usize>(), 1u8..=255), 1..4).prop_map(Stream::Flipped),
        1 => any::<usize>().prop_map(Stream::Prefix),
        1 => prop::collection::vec(any::<u8>(), 0..256).prop_map(Stream::Random),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let reg = prop_oneof![
        prop::sample::select(vec![
            regs::RESET_CTL,
            regs::SCRATCH0,
            regs::INTR_STATUS,
            regs::INTR_MASK,
            regs::TLB_INVALIDATE,
            regs::GTT_FAULT_COUNT,
            regs::PV_MAPPABLE_BASE,
            regs::PLANE_CTL,
            regs::PLANE_SURF_LO,
            regs::PLANE_WIDTH,
        ]),
        (
            0u32..4,
            prop::sample::select(vec![
                regs::RING_BASE_LO,
                regs::RING_SIZE,
                regs::RING_CTL,
                regs::RING_HEAD,
                regs::RING_TAIL,
                regs::PPGTT_ROOT_LO,
                regs::PPGTT_ROOT_HI,
                regs::ERROR_CODE,
            ])
        )
            .prop_map(|(e, r)| 0x1000 + e * 0x100 + r),
        any::<u32>().prop_map(|o| o % (32 << 20)),
    ];
    prop_oneof![
        3 => (0u16..256, 1u8..64, 0u16..1024, prop_oneof![Just(3u32), Just(1), Just(2), any::<u32>()])
            .prop_map(|(file_page, pages, iova_page, flags)| Op::Map { file_page, pages, iova_page, flags }),
        1 => (0u8..64, 1u8..64, 1024u16..2048)
            .prop_map(|(file_page, pages, iova_page)| Op::MapRo { file_page, pages, iova_page }),
        1 => (0u16..2048, 1u8..64).prop_map(|(iova_page, pages)| Op::MapNoFd { iova_page, pages }),
        2 => (0u16..2048, 0u8..64, prop_oneof![Just(0u32), Just(2), any::<u32>()])
            .prop_map(|(iova_page, pages, flags)| Op::Unmap { iova_page, pages, flags }),
        4 => (any::<u16>(), prop::bool::weighted(0.1), pte())
            .prop_map(|(hidden_page, neighbour, pte)| Op::Ggtt { hidden_page, neighbour, pte }),
        3 => (reg, any::<u32>(), prop::bool::weighted(0.2))
            .prop_map(|(off, value, wide)| Op::Reg { off, value, wide }),
        1 => (any::<u64>(), prop_oneof![Just(4u32), Just(8), 0u32..64, any::<u32>()])
            .prop_map(|(off, count)| Op::RegRead { off: off % (40 << 20), count }),
        1 => (0u8..8, 0u8..5, any::<u32>()).prop_map(|(vector, word, value)| Op::Msix { vector, word, value }),
        1 => (any::<u32>(), 0u16..512, any::<u8>(), any::<bool>())
            .prop_map(|(off, len, byte, write)| Op::Aperture { off: off % (17 << 20), len, byte, write }),
        1 => (0u16..0x1100, any::<u32>(), 0u8..9, any::<bool>())
            .prop_map(|(off, value, len, write)| Op::Config { off, value, len, write }),
        3 => (0u8..4, prop::collection::vec(command(), 1..6), -8i8..8)
            .prop_map(|(engine, cmds, tail_delta)| Op::Work { engine, cmds, tail_delta }),
        4 => good_work(),
        2 => (prop_oneof![Just(0x24u32), Just(0x21), Just(0x22), Just(0x28), any::<u32>()],
              prop_oneof![Just(2u32), 0u32..6, any::<u32>()], 0u32..6, 0u32..7, 0u8..6)
            .prop_map(|(flags, index, start, count, fds)| Op::SetIrqs { flags, index, start, count, fds }),
        1 => Just(Op::Reset),
        2 => prop_oneof![Just(mig::STOP), Just(mig::RUNNING), Just(mig::STOP_COPY),
                         Just(mig::RESUMING), Just(mig::PRE_COPY), any::<u32>()].prop_map(Op::MigState),
        1 => prop_oneof![Just(4096u32), Just(1 << 20), any::<u32>()].prop_map(Op::MigRead),
        1 => (1u8..4).prop_map(|reads| Op::Save { reads }),
        3 => (stream(), prop_oneof![Just(1u32 << 20), 1u32..70_000], any::<bool>())
            .prop_map(|(stream, chunk, finish)| Op::Resume { stream, chunk, finish }),
        1 => (prop::sample::select(vec![4u16, 5, 7]), prop_oneof![Just(32u32), any::<u32>()], 0u32..12)
            .prop_map(|(command, argsz, index)| Op::Info { command, argsz, index }),
        1 => prop::collection::vec(any::<u8>(), 0..96).prop_map(Op::WriteMulti),
        1 => (0u16..24, prop_oneof![Just(0u32), Just(NO_REPLY), any::<u32>()],
              prop::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(command, flags, payload)| Op::Message { command, flags, payload }),
    ]
}

/// A session: operations (each possibly mutated), and how it ends.
fn session() -> impl Strategy<Value = (Vec<(Op, Option<Flips>)>, Tail)> {
    let flips = prop::collection::vec((any::<usize>(), 1u8..=255), 1..4);
    (
        prop::collection::vec((op(), prop::option::weighted(0.15, flips)), 1..28),
        prop_oneof![
            8 => Just(Tail::Close),
            1 => any::<usize>().prop_map(Tail::Truncated),
            1 => Just(Tail::Oversized),
        ],
    )
}

// ---------------------------------------------------------------------------------------------
// Encoding operations into messages.

/// Everything a session's messages refer to: the client's memory and eventfds.
struct Client {
    rw: std::fs::File,
    ro: std::fs::File,
    irqs: Vec<EventFd>,
}

impl Client {
    fn new() -> Client {
        Client {
            rw: memfd(RW_BYTES, RW_FILL),
            ro: memfd(RO_BYTES, RO_FILL),
            irqs: (0..5)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect(),
        }
    }

    /// Guest memory the device must not have written: the never-mapped half of the
    /// read-write memfd and all of the read-only one.
    fn check_untouched(&self) {
        let rw = file_bytes(&self.rw);
        let half = (RW_BYTES / 2) as usize;
        if let Some(i) = rw[half..].iter().position(|&b| b != RW_FILL) {
            panic!(
                "guest memory never DMA-mapped was written at {:#x}",
                half + i
            );
        }
        if let Some(i) = file_bytes(&self.ro).iter().position(|&b| b != RO_FILL) {
            panic!("guest memory mapped read-only was written at {i:#x}");
        }
    }
}

/// One message to send, with its descriptors.
struct Msg {
    bytes: Vec<u8>,
    fds: Vec<RawFd>,
}

fn msg(command: u16, payload: &[u8]) -> Msg {
    Msg {
        bytes: frame(0, command, 0, payload),
        fds: Vec::new(),
    }
}

fn reg_write(off: u64, data: &[u8]) -> Msg {
    msg(
        cmd::REGION_WRITE,
        &region_access(0, off, data.len() as u32, data),
    )
}

fn reg32(off: u32, v: u32) -> Msg {
    reg_write(u64::from(off), &v.to_le_bytes())
}

impl World {
    fn gm(&self, a: &Addr) -> u64 {
        match *a {
            Addr::Own(o) => self.hdr.mappable.start.raw() + u64::from(o) % self.hdr.lmem_size,
            Addr::Hidden(p) => self.hdr.hidden.start.raw() + u64::from(p) * PAGE_SIZE,
            Addr::Neighbour(o) => {
                self.victim.mappable.start.raw() + u64::from(o) % self.victim.mappable.size
            }
            Addr::NeighbourHidden(p) => self.victim.hidden.start.raw() + u64::from(p) * PAGE_SIZE,
            Addr::Any(a) => a,
        }
    }

    fn dwords(&self, c: &Cmd) -> Vec<u32> {
        match c {
            Cmd::Fill { dst, w, h, color } => {
                let (w, h) = (u32::from(*w), u32::from(*h));
                enc::color_blt(ROP_PATCOPY, BPP_32, self.gm(dst), w * 4, w, h, *color).to_vec()
            }
            Cmd::Copy { dst, src, w, h } => {
                let (w, h) = (u32::from(*w), u32::from(*h));
                enc::src_copy_blt(enc::Copy {
                    rop: ROP_SRCCOPY,
                    bpp: BPP_32,
                    dst: self.gm(dst),
                    dst_pitch: w * 4,
                    src: self.gm(src),
                    src_pitch: w * 4,
                    width: w,
                    height: h,
                    pattern: 0,
                })
                .to_vec()
            }
            Cmd::Fence { at, v } => enc::store_data_imm(self.gm(at) & !3, *v).to_vec(),
            Cmd::Irq => enc::user_interrupt().to_vec(),
            Cmd::Noop => enc::noop().to_vec(),
            Cmd::Saxpy { x, y, n } => enc::dispatch(enc::Dispatch {
                kernel: KERNEL_SAXPY,
                params: [u32::from(*n), 0, 0],
                scalar: 1.5,
                buffers: [self.gm(x), self.gm(y), 0],
            })
            .to_vec(),
            Cmd::Lri { reg, v } => enc::load_register_imm(*reg, *v).to_vec(),
            Cmd::Batch { at, second } => enc::batch_start(self.gm(at), *second).to_vec(),
            Cmd::Garbage(d) => d.clone(),
        }
    }

    /// A stream for `RESUMING`.
    fn stream_bytes(&self, s: &Stream) -> Vec<u8> {
        match s {
            Stream::Valid => self.stream.clone(),
            Stream::Mutated {
                envelope,
                mutations,
            } => {
                let r = self.envelopes[envelope % self.envelopes.len()].clone();
                let mut snap = vgpu_migration::decode(&self.stream[r.clone()]).unwrap();
                for m in mutations {
                    mutate(&mut snap, m);
                }
                let mut out = self.stream[..r.start].to_vec();
                out.extend(vgpu_migration::encode(&snap).unwrap());
                out.extend_from_slice(&self.stream[r.end..]);
                out
            }
            Stream::Flipped(f) => {
                let mut out = self.stream.clone();
                for (i, x) in f {
                    let n = out.len();
                    out[i % n] ^= x;
                }
                out
            }
            Stream::Prefix(n) => self.stream[..n % self.stream.len()].to_vec(),
            Stream::Random(b) => b.clone(),
        }
    }

    fn encode(&self, op: &Op, c: &Client) -> Vec<Msg> {
        let page = |p: u64| RAM_GPA + p * PAGE_SIZE;
        match op {
            Op::Map {
                file_page,
                pages,
                iova_page,
                flags,
            } => {
                // Windows only inside the first half of the read-write memfd.
                let half = RW_BYTES / 2 / PAGE_SIZE;
                let first = u64::from(*file_page) % half;
                let n = u64::from(*pages).min(half - first).max(1);
                let p = dma_map_payload(
                    *flags,
                    first * PAGE_SIZE,
                    page(u64::from(*iova_page)),
                    n * PAGE_SIZE,
                );
                vec![Msg {
                    bytes: frame(0, cmd::DMA_MAP, 0, &p),
                    fds: vec![c.rw.as_raw_fd()],
                }]
            }
            Op::MapRo {
                file_page,
                pages,
                iova_page,
            } => {
                let total = RO_BYTES / PAGE_SIZE;
                let first = u64::from(*file_page) % total;
                let n = u64::from(*pages).min(total - first).max(1);
                let p = dma_map_payload(
                    1,
                    first * PAGE_SIZE,
                    page(u64::from(*iova_page)),
                    n * PAGE_SIZE,
                );
                vec![Msg {
                    bytes: frame(0, cmd::DMA_MAP, 0, &p),
                    fds: vec![c.ro.as_raw_fd()],
                }]
            }
            Op::MapNoFd { iova_page, pages } => {
                let p = dma_map_payload(
                    3,
                    0,
                    page(u64::from(*iova_page)),
                    u64::from(*pages) * PAGE_SIZE,
                );
                vec![msg(cmd::DMA_MAP, &p)]
            }
            Op::Unmap {
                iova_page,
                pages,
                flags,
            } => {
                let p = dma_unmap_payload(
                    *flags,
                    page(u64::from(*iova_page)),
                    u64::from(*pages) * PAGE_SIZE,
                );
                vec![msg(cmd::DMA_UNMAP, &p)]
            }
            Op::Ggtt {
                hidden_page,
                neighbour,
                pte,
            } => {
                let base = if *neighbour { &self.victim } else { &self.hdr };
                let gm = base.hidden.start.raw() + u64::from(*hidden_page) * PAGE_SIZE;
                let v = match *pte {
                    Pte::Guest(p, ro) => {
                        pte_guest(page(u64::from(p))) | if ro { PTE_READ_ONLY } else { 0 }
                    }
                    Pte::GuestRo(p) => pte_guest(page(1024 + u64::from(p))),
                    Pte::Local(o) => pte_local(u64::from(o) * PAGE_SIZE % (32 << 20)),
                    Pte::Any(v) => v,
                };
                vec![
                    reg_write(GGTT_OFFSET + gm / PAGE_SIZE * 8, &v.to_le_bytes()),
                    reg32(regs::TLB_INVALIDATE, regs::TLB_INVALIDATE_GGTT),
                ]
            }
            Op::Reg { off, value, wide } => {
                if *wide {
                    let v = u64::from(*value) | u64::from(*value) << 32;
                    vec![reg_write(u64::from(*off), &v.to_le_bytes())]
                } else {
                    vec![reg32(*off, *value)]
                }
            }
            Op::RegRead { off, count } => {
                vec![msg(cmd::REGION_READ, &region_access(0, *off, *count, &[]))]
            }
            Op::Msix {
                vector,
                word,
                value,
            } => {
                let off = if *word == 4 {
                    MSIX_PBA_OFFSET
                } else {
                    MSIX_TABLE_OFFSET + u64::from(*vector) * 16 + u64::from(*word) * 4
                };
                vec![reg_write(off, &value.to_le_bytes())]
            }
            Op::Aperture {
                off,
                len,
                byte,
                write,
            } => {
                let p = if *write {
                    region_access(
                        2,
                        u64::from(*off),
                        u32::from(*len),
                        &vec![*byte; usize::from(*len)],
                    )
                } else {
                    region_access(2, u64::from(*off), u32::from(*len), &[])
                };
                vec![msg(
                    if *write {
                        cmd::REGION_WRITE
                    } else {
                        cmd::REGION_READ
                    },
                    &p,
                )]
            }
            Op::Config {
                off,
                value,
                len,
                write,
            } => {
                let n = u32::from(*len);
                let data: Vec<u8> = value
                    .to_le_bytes()
                    .iter()
                    .cycle()
                    .take(*len as usize)
                    .copied()
                    .collect();
                let p = if *write {
                    region_access(7, u64::from(*off), n, &data)
                } else {
                    region_access(7, u64::from(*off), n, &[])
                };
                vec![msg(
                    if *write {
                        cmd::REGION_WRITE
                    } else {
                        cmd::REGION_READ
                    },
                    &p,
                )]
            }
            Op::Work {
                engine,
                cmds,
                tail_delta,
            } => {
                let e = Engine::ALL[usize::from(*engine) % 4];
                let ring = ring_lmem_offset(self.hdr.lmem_size, e);
                let gm = self.hdr.mappable.start.raw() + ring;
                let b = regs::engine_base(e);
                let mut dws: Vec<u32> = cmds.iter().flat_map(|c| self.dwords(c)).collect();
                dws.truncate(1000);
                let bytes: Vec<u8> = dws.iter().flat_map(|d| d.to_le_bytes()).collect();
                let tail = (bytes.len() as i64 + i64::from(*tail_delta)).max(0) as u32;
                vec![
                    reg32(regs::RESET_CTL, regs::reset_engine(e)),
                    reg32(b + regs::RING_BASE_LO, gm as u32),
                    reg32(b + regs::RING_BASE_HI, (gm >> 32) as u32),
                    reg32(b + regs::RING_SIZE, 4096),
                    reg32(b + regs::RING_CTL, regs::RING_CTL_ENABLE),
                    msg(
                        cmd::REGION_WRITE,
                        &region_access(2, ring, bytes.len() as u32, &bytes),
                    ),
                    reg32(b + regs::RING_TAIL, tail),
                ]
            }
            Op::SetIrqs {
                flags,
                index,
                start,
                count,
                fds,
            } => {
                let fds: Vec<RawFd> = c
                    .irqs
                    .iter()
                    .take(usize::from(*fds))
                    .map(AsRawFd::as_raw_fd)
                    .collect();
                let extra = if flags & 0x2 != 0 {
                    vec![1u8; *count as usize % 8]
                } else {
                    Vec::new()
                };
                vec![Msg {
                    bytes: frame(
                        0,
                        cmd::DEVICE_SET_IRQS,
                        0,
                        &set_irqs_payload(*flags, *index, *start, *count, &extra),
                    ),
                    fds,
                }]
            }
            Op::Reset => vec![msg(cmd::DEVICE_RESET, &[])],
            Op::MigState(s) => {
                let mut p = 16u32.to_ne_bytes().to_vec();
                p.extend_from_slice(&(mig::FEATURE_MIG_STATE | mig::SET).to_ne_bytes());
                p.extend_from_slice(&s.to_ne_bytes());
                p.extend_from_slice(&u32::MAX.to_ne_bytes());
                vec![msg(cmd::DEVICE_FEATURE, &p)]
            }
            Op::MigRead(n) => vec![msg(
                cmd::MIG_DATA_READ,
                &mig_data(n.saturating_add(8), *n, &[]),
            )],
            Op::Save { reads } => {
                let mut v = vec![self.encode(&Op::MigState(mig::PRE_COPY), c).remove(0)];
                let read = || msg(cmd::MIG_DATA_READ, &mig_data(8 + (1 << 20), 1 << 20, &[]));
                v.extend((0..*reads).map(|_| read()));
                v.push(self.encode(&Op::MigState(mig::STOP_COPY), c).remove(0));
                v.extend((0..*reads).map(|_| read()));
                v.push(self.encode(&Op::MigState(mig::STOP), c).remove(0));
                v.push(self.encode(&Op::MigState(mig::RUNNING), c).remove(0));
                v
            }
            Op::Resume {
                stream,
                chunk,
                finish,
            } => {
                let data = self.stream_bytes(stream);
                let mut v = vec![
                    self.encode(&Op::MigState(mig::STOP), c).remove(0),
                    self.encode(&Op::MigState(mig::RESUMING), c).remove(0),
                ];
                for part in data.chunks((*chunk as usize).clamp(1, 1 << 20)) {
                    let n = part.len() as u32;
                    v.push(msg(cmd::MIG_DATA_WRITE, &mig_data(8 + n, n, part)));
                }
                if *finish {
                    v.push(self.encode(&Op::MigState(mig::STOP), c).remove(0));
                    v.push(self.encode(&Op::MigState(mig::RUNNING), c).remove(0));
                }
                v
            }
            Op::Info {
                command,
                argsz,
                index,
            } => {
                let mut p = argsz.to_ne_bytes().to_vec();
                p.extend_from_slice(&0u32.to_ne_bytes());
                p.extend_from_slice(&index.to_ne_bytes());
                p.extend_from_slice(&[0u8; 20]);
                vec![msg(*command, &p)]
            }
            Op::WriteMulti(b) => vec![msg(cmd::REGION_WRITE_MULTI, b)],
            Op::Message {
                command,
                flags,
                payload,
            } => vec![Msg {
                bytes: frame(0, *command, *flags, payload),
                fds: Vec::new(),
            }],
        }
    }

    /// Runs one hostile session and checks the invariants afterwards.
    fn session(&self, reset_first: bool, ops: &[(Op, Option<Flips>)], tail: &Tail) {
        let client = Client::new();
        let mut raw = Raw::connect(&self.hostile.socket);
        if reset_first {
            // As a VMM at boot; otherwise the session starts wherever the last one left off.
            assert!(!raw.call(cmd::DEVICE_RESET, &[]).failed(), "DEVICE_RESET");
        }
        // Drain replies concurrently: large reads must not block the server.
        let mut reader = raw.s.try_clone().unwrap();
        let drain = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        });
        let mut alive = true;
        'ops: for (op, flips) in ops {
            for mut m in self.encode(op, &client) {
                let id = raw.next_id();
                m.bytes[0..2].copy_from_slice(&id.to_ne_bytes());
                if let Some(f) = flips {
                    for (i, x) in f {
                        let i = i % m.bytes.len();
                        if !(4..8).contains(&i) {
                            m.bytes[i] ^= x;
                        }
                    }
                }
                if !raw.send_bytes(&m.bytes, &m.fds) {
                    alive = false;
                    break 'ops;
                }
            }
        }
        if alive {
            match tail {
                Tail::Close => {}
                Tail::Truncated(n) => {
                    let m = frame(
                        raw.next_id(),
                        cmd::REGION_WRITE,
                        0,
                        &region_access(0, 0x14, 4, &[1, 2, 3, 4]),
                    );
                    let _ = raw.send_bytes(&m[..n % m.len()], &[]);
                }
                Tail::Oversized => {
                    let mut m = frame(raw.next_id(), cmd::MIG_DATA_WRITE, 0, &[]);
                    m[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
                    let _ = raw.send_bytes(&m, &[]);
                }
            }
        }
        let _ = raw.s.shutdown(Shutdown::Write);
        match drain.join().unwrap() {
            Ok(()) => {}
            Err(e) => panic!("server neither answered nor closed the session: {e}"),
        }
        drop(raw);
        assert_eq!(self.panics(), 0, "a connection thread panicked");
        client.check_untouched();
        self.neighbour().wait_progress(1, "after a hostile session");
    }
}

#[test]
fn test_fuzz_vfio_user_sessions_on_vgpud_keep_neighbour_bit_exact() {
    let w = World::new();
    let n = std::cell::Cell::new(0u32);
    // Engine counters are part of the device state a valid stream restores, so sum the growth
    // of each session.
    let totals = |w: &World| {
        let c = w.daemon.counters();
        let h = c.iter().find(|c| c.info.id == w.hostile.id).unwrap();
        let sum = |f: fn(&vgpu_api::daemon::EngineCounters) -> u64| {
            h.engines.iter().map(f).fold(0u64, u64::saturating_add)
        };
        (sum(|e| e.commands), sum(|e| e.audits))
    };
    let ran = std::cell::Cell::new((0u64, 0u64));
    let strategy = (any::<bool>(), session());
    run_prop(
        "vfio_user_session",
        cases(24),
        strategy,
        |(reset_first, (ops, tail))| {
            let before = totals(&w);
            w.session(reset_first, &ops, &tail);
            let after = totals(&w);
            let (c, a) = ran.get();
            ran.set((
                c.saturating_add(after.0.saturating_sub(before.0)),
                a.saturating_add(after.1.saturating_sub(before.1)),
            ));
            n.set(n.get() + 1);
            if n.get().is_multiple_of(8) {
                w.check_serves_good_client(n.get());
            }
        },
    );
    w.check_serves_good_client(0);
    let c = w.daemon.counters();
    let hostile = c.iter().find(|c| c.info.id == w.hostile.id).unwrap();
    let (commands, audits) = ran.get();
    eprintln!(
        "hostile vGPU: {:?}; {commands} commands executed, {audits} submissions refused, {} bad accesses",
        hostile.vfio, hostile.bad_accesses
    );
    assert!(
        hostile.vfio.messages > 100,
        "sessions went deep: {:?}",
        hostile.vfio
    );
    assert!(
        hostile.vfio.errors > 10,
        "many messages refused: {:?}",
        hostile.vfio
    );
    assert!(
        commands > 0 && audits > 0,
        "command streams both ran and were refused"
    );
}

/// Mutated and random migration streams pushed into `RESUMING`: each is either refused
/// (and the vGPU cannot leave `RESUMING` into a half-restored `RUNNING` state without the
/// client starting over) or fully applied, and then the vGPU still works. The neighbour's
/// results stay bit-exact throughout.
#[test]
fn test_fuzz_migration_streams_into_resuming_refused_or_restored_working() {
    let w = World::new();
    let strategy = (stream(), prop_oneof![Just(1u32 << 20), 1u32..100_000]);
    let accepted = std::cell::Cell::new(0u32);
    run_prop("mig_data_stream", cases(32), strategy, |(s, chunk)| {
        let data = w.stream_bytes(&s);
        let mut r = Raw::connect(&w.hostile.socket);
        assert!(!r.call(cmd::DEVICE_RESET, &[]).failed());
        assert!(!r.set_state(mig::STOP).failed());
        assert!(!r.set_state(mig::RESUMING).failed());
        let written = r.write_stream(&data, chunk as usize);
        let left = r.set_state(mig::STOP);
        if written.is_ok() && !left.failed() {
            // Accepted: the stream restored a complete device state; it must work.
            assert!(!r.set_state(mig::RUNNING).failed(), "STOP -> RUNNING");
            drop(r);
            let mut d = Driver::probe(Locked(w.daemon.vgpu(w.hostile.id).unwrap())).unwrap();
            d.write32(regs::RESET_CTL, regs::RESET_DEVICE);
            d.forget_rings();
            let c = enc::color_blt(
                ROP_PATCOPY,
                BPP_32,
                d.gm_of_lmem(0x20_0000),
                256,
                64,
                4,
                0x77,
            );
            d.submit(Engine::Blit, &c)
                .expect("restored vGPU takes work");
            d.wait_idle(Engine::Blit, T)
                .expect("restored vGPU runs work");
            let mut px = [0u8; 4];
            d.lmem_read(0x20_0000 + 256 * 3 + 252, &mut px);
            assert_eq!(u32::from_le_bytes(px), 0x77, "restored vGPU's blit");
            accepted.set(accepted.get() + 1);
        } else {
            assert!(
                written.is_err() || left.failed(),
                "an incomplete stream must not leave RESUMING"
            );
            drop(r);
        }
        assert_eq!(w.panics(), 0);
        w.neighbour().wait_progress(1, "after a migration stream");
    });
    eprintln!(
        "{} streams restored a working vGPU, the others were refused",
        accepted.get()
    );
    assert!(
        accepted.get() > 0,
        "the valid stream (or a harmless mutation) is accepted"
    );
}

// ---------------------------------------------------------------------------------------------
// Regressions found by the fuzzers and the threat review.

fn pipe() -> (std::fs::File, std::fs::File) {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for two descriptors; the result is checked.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fresh descriptors owned by nobody else.
    unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    }
}

/// Regression: vgpud accepted any descriptor as an MSI-X "eventfd" and wrote to it on the
/// shared engine thread, so a client that passed a full pipe stalled every vGPU on that
/// engine. Now only eventfds are accepted (and made non-blocking).
#[test]
fn test_set_irqs_with_full_pipe_refused_and_neighbour_keeps_running() {
    let daemon = daemon(256);
    let victim = daemon
        .create(&spec("mini", GttMode::Shadow, "victim"))
        .unwrap();
    let hostile = daemon
        .create(&spec("mini", GttMode::Shadow, "hostile"))
        .unwrap();
    let neighbour = Neighbour::start(&daemon, victim.id);
    let (_rd, wr) = pipe();
    // SAFETY: F_GETPIPE_SZ on our own pipe.
    let cap = unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_GETPIPE_SZ) };
    assert!(cap > 0);
    std::io::Write::write_all(&mut &wr, &vec![0u8; cap as usize]).unwrap();
    let mut r = Raw::connect(&hostile.socket);
    let fds = [wr.as_raw_fd(); 5];
    let rep = r
        .try_call(
            cmd::DEVICE_SET_IRQS,
            &set_irqs_payload(0x24, 2, 0, 5, &[]),
            &fds,
        )
        .expect("reply");
    assert!(rep.failed(), "a pipe is not an eventfd");
    // The hostile guest raises user interrupts on the engines the neighbour uses.
    let mut d = Driver::probe(Locked(daemon.vgpu(hostile.id).unwrap())).unwrap();
    for e in [Engine::Blit, Engine::Compute] {
        d.submit(e, &enc::user_interrupt()).unwrap();
        d.wait_idle(e, T).unwrap();
    }
    drop(d);
    neighbour.wait_progress(3, "after the hostile vGPU's interrupts");
    neighbour.finish();
    drop(r);
    daemon.shutdown();
}

/// Regression: a snapshot tree nested a million levels deep in a `MIG_DATA_WRITE` overflowed
/// the daemon's stack while decoding (an abort of vgpud and every vGPU in it).
#[test]
fn test_mig_data_write_of_deeply_nested_tree_refused_daemon_serves_on() {
    let daemon = daemon(256);
    let victim = daemon
        .create(&spec("mini", GttMode::Shadow, "victim"))
        .unwrap();
    let hostile = daemon
        .create(&spec("mini", GttMode::Shadow, "hostile"))
        .unwrap();
    let neighbour = Neighbour::start(&daemon, victim.id);
    let mut payload = Vec::new();
    for _ in 0..1_000_000 {
        payload.extend_from_slice(&[0, 0, 1, 0]);
    }
    payload.extend_from_slice(&[0, 0, 0]);
    let mut env = vgpu_migration::MAGIC.to_vec();
    env.extend_from_slice(&vgpu_migration::FORMAT_VERSION.to_le_bytes());
    env.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    env.extend_from_slice(&payload);
    let crc = crc32(&env);
    env.extend_from_slice(&crc.to_le_bytes());
    let mut r = Raw::connect(&hostile.socket);
    assert!(!r.set_state(mig::STOP).failed());
    assert!(!r.set_state(mig::RESUMING).failed());
    assert!(
        r.write_stream(&env, 1 << 20).is_err(),
        "a tree deeper than any vGPU's refused"
    );
    assert!(
        r.set_state(mig::STOP).failed(),
        "a refused stream cannot leave RESUMING"
    );
    assert!(!r.call(cmd::DEVICE_RESET, &[]).failed());
    drop(r);
    neighbour.wait_progress(2, "after the deep tree");
    neighbour.finish();
    daemon.shutdown();
}

/// CRC-32 (IEEE), as the envelope uses.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn test_envelope_split_of_captured_stream_covers_it() {
    // The fuzzers mutate envelope by envelope: the split must be exact.
    let w = World::new();
    assert!(w.envelopes.len() >= 2, "pre-copy and stop-copy envelopes");
    for r in &w.envelopes {
        vgpu_migration::decode(&w.stream[r.clone()]).expect("each envelope decodes");
    }
}
