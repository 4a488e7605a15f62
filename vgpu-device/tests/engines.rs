//! End-to-end engine tests: a guest driver programs a vGPU only through its BARs, and every
//! result is compared bit for bit with the plain reference implementations of the ops, in both
//! GTT modes (shadow and two-dim). Malicious command streams are in `tests/malicious.rs`.

// Test arithmetic on small, known values.
#![allow(clippy::cast_possible_truncation)]

mod common;

/// The plain reference implementations of the ops (`src/engine/ops/reference.rs`, test-only
/// in the library, so included here by path).
#[path = "../src/engine/ops/reference.rs"]
#[allow(dead_code)]
mod reference;

use common::*;
use vgpu_abi::cmd::enc::{self, Copy, Csc, Dispatch};
use vgpu_abi::cmd::*;
use vgpu_abi::gtt::{ppgtt_index, pte_guest, pte_local};
use vgpu_abi::{regs, Engine, PAGE_SIZE};
use vgpu_device::driver::DeviceAccess;
use vgpu_device::vgpu::GttMode;

/// Each test function takes the GTT mode; this makes one `#[test]` per mode of each.
macro_rules! gtt_mode_tests {
    ($($name:ident),* $(,)?) => {
        mod shadow {
            $(#[test] fn $name() { super::$name(super::GttMode::Shadow) })*
        }
        mod two_dim {
            $(#[test] fn $name() { super::$name(super::GttMode::TwoDim) })*
        }
    };
}

gtt_mode_tests!(
    test_blit_rops_and_bpp_between_local_and_guest_ram_match_reference,
    test_blit_overlapping_copies_behave_as_if_copied_aside,
    test_render_fill_blend_and_triangles_read_through_aperture_match_reference,
    test_video_nv12_xrgb_scaled_both_ways_match_reference,
    test_compute_saxpy_reduce_matmul_f32_bit_exact,
    test_mi_batches_called_and_chained_execute_in_order,
    test_mi_fence_and_user_interrupt_raise_msix_once_per_edge,
    test_mi_lri_gpr_and_scratch_stored_back_by_srm,
    test_mi_lri_plane_surf_flips_in_command_order,
    test_ppgtt_guest_tables_leaf_change_after_invalidate_uses_new_page,
    test_ppgtt_local_tables_leaf_change_after_invalidate_uses_new_page,
    test_blit_patcopy_copy_with_unread_source_address_accepted,
    test_ring_command_wrapping_ring_end_executes,
    test_mi_semaphore_wait_released_by_fence_of_other_engine,
);

/// Panics with the first differing offset (the buffers are too large to print).
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        let n = got.iter().zip(want).filter(|(a, b)| a != b).count();
        panic!(
            "{what}: {n} bytes differ, first at {i:#x}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The data window: model offsets, the reference model and workloads.

/// Bytes of each half of the data window.
const WIN: u64 = 0x40000;
/// Guest-physical base of the guest half of the window.
const WIN_GPA: u64 = RAM_GPA + 0x100000;
/// Local-memory offset of batch buffers and PPGTT tables (outside the compared data area).
const BATCH_OFF: u64 = 0x100000;

/// The memory every workload addresses by *model offset*: `[0, WIN)` is local memory from
/// offset 0 (GM through the reset mapping), `[WIN, 2 WIN)` is guest RAM mapped at the start of
/// hidden GM, GM page `i` on guest page `(7 i) mod 64` so that contiguous GM is scattered. The
/// reference implementations run on a flat copy indexed by model offset.
struct Window {
    mb: u64,
    hb: u64,
}

impl Window {
    fn new(d: &mut Drv<'_>) -> Self {
        let w = Window {
            mb: d.pv().mappable_base,
            hb: d.pv().hidden_base,
        };
        for i in 0..WIN / PAGE_SIZE {
            d.map_gm(w.hb + i * PAGE_SIZE, pte_guest(w.gpa(WIN + i * PAGE_SIZE)));
        }
        w
    }

    /// GM address of model offset `m`.
    fn gm(&self, m: u64) -> u64 {
        if m < WIN {
            self.mb + m
        } else {
            self.hb + m - WIN
        }
    }

    /// Guest-physical address of model offset `m` in the guest half.
    fn gpa(&self, m: u64) -> u64 {
        let page = (m - WIN) / PAGE_SIZE;
        WIN_GPA + (page * 7 % (WIN / PAGE_SIZE)) * PAGE_SIZE + m % PAGE_SIZE
    }

    /// Calls `f(model offset, range in data)` for each page-bounded piece of `[m, m + len)`.
    fn pieces(m: u64, len: usize, mut f: impl FnMut(u64, std::ops::Range<usize>)) {
        let mut done = 0usize;
        while done < len {
            let at = m + done as u64;
            let n = ((PAGE_SIZE - at % PAGE_SIZE) as usize).min(len - done);
            f(at, done..done + n);
            done += n;
        }
    }

    fn write(&self, d: &mut Drv<'_>, g: &Guest, m: u64, data: &[u8]) {
        Self::pieces(m, data.len(), |at, r| {
            if at < WIN {
                d.lmem_write(at, &data[r]);
            } else {
                g.write(self.gpa(at), &data[r]);
            }
        });
    }

    fn read(&self, d: &mut Drv<'_>, g: &Guest) -> Vec<u8> {
        let mut b = vec![0u8; 2 * WIN as usize];
        Self::pieces(0, b.len(), |at, r| {
            if at < WIN {
                d.lmem_read(at, &mut b[r]);
            } else {
                g.read(self.gpa(at), &mut b[r]);
            }
        });
        b
    }
}

/// One step of a workload, in model offsets.
#[derive(Clone, Debug)]
enum Work {
    /// The CPU writes bytes (the engines are idle).
    Cpu(u64, Vec<u8>),
    /// `XY_COLOR_BLT` (the source fields are unused).
    Color(Copy),
    /// `XY_SRC_COPY_BLT`.
    Copy(Copy),
    /// `RENDER_SURFACE_STATE`: address, pitch, width, height, format.
    Surface(u64, u32, u32, u32, u32),
    /// `RENDER_FILL_RECT`: (x, y, w, h), colour, blend.
    Rect((u32, u32, u32, u32), u32, bool),
    /// `RENDER_TRIANGLE`.
    Tri([(u32, u32); 3], u32, bool),
    /// `VIDEO_CSC_SCALE`.
    Csc(Csc),
    /// `COMPUTE_DISPATCH`.
    Kernel(Dispatch),
}

impl Work {
    fn engine(&self) -> Option<Engine> {
        match self {
            Work::Cpu(..) => None,
            Work::Color(_) | Work::Copy(_) => Some(Engine::Blit),
            Work::Surface(..) | Work::Rect(..) | Work::Tri(..) => Some(Engine::Render),
            Work::Csc(_) => Some(Engine::Video),
            Work::Kernel(_) => Some(Engine::Compute),
        }
    }

    fn encode(&self, w: &Window) -> Vec<u32> {
        match self {
            Work::Cpu(..) => Vec::new(),
            Work::Color(c) => enc::color_blt(
                c.rop,
                c.bpp,
                w.gm(c.dst),
                c.dst_pitch,
                c.width,
                c.height,
                c.pattern,
            )
            .to_vec(),
            Work::Copy(c) => enc::src_copy_blt(Copy {
                dst: w.gm(c.dst),
                src: w.gm(c.src),
                ..*c
            })
            .to_vec(),
            Work::Surface(a, pitch, sw, sh, f) => {
                enc::surface_state(w.gm(*a), *pitch, *sw, *sh, *f).to_vec()
            }
            Work::Rect((x, y, rw, rh), c, b) => enc::fill_rect(*x, *y, *rw, *rh, *c, *b).to_vec(),
            Work::Tri(v, c, b) => enc::triangle(*v, *c, *b).to_vec(),
            Work::Csc(c) => enc::csc_scale(Csc {
                src: w.gm(c.src),
                dst: w.gm(c.dst),
                ..*c
            })
            .to_vec(),
            Work::Kernel(k) => enc::dispatch(Dispatch {
                buffers: k.buffers.map(|b| w.gm(b)),
                ..*k
            })
            .to_vec(),
        }
    }
}

/// The reference model: the flat window and the render surface.
struct Model {
    m: Vec<u8>,
    surface: Option<reference::Surf>,
}

impl Model {
    fn apply(&mut self, work: &Work) {
        let us = |x: u64| usize::try_from(x).unwrap();
        match work {
            Work::Cpu(at, data) => self.m[us(*at)..us(*at) + data.len()].copy_from_slice(data),
            Work::Color(c) => reference::blit(&mut self.m, c, false),
            Work::Copy(c) => reference::blit(&mut self.m, c, true),
            Work::Surface(a, pitch, sw, sh, _) => {
                self.surface = Some((us(*a), *pitch as usize, *sw as usize, *sh as usize));
            }
            Work::Rect(r, c, b) => {
                reference::fill_rect(&mut self.m, self.surface.unwrap(), *r, *c, *b)
            }
            Work::Tri(v, c, b) => {
                reference::triangle(&mut self.m, self.surface.unwrap(), *v, *c, *b)
            }
            Work::Csc(c) => reference::csc(&mut self.m, c),
            Work::Kernel(k) => reference::dispatch(&mut self.m, k),
        }
    }
}

/// Runs `works` on the vGPU (consecutive steps of one engine form one submission) and on the
/// reference model, then compares the whole window.
fn run_works(d: &mut Drv<'_>, g: &Guest, works: &[Work], what: &str) {
    let w = Window::new(d);
    let init = pattern(2 * WIN as usize, 0x5EED);
    w.write(d, g, 0, &init);
    let mut model = Model {
        m: init,
        surface: None,
    };
    let mut batch: Option<(Engine, Vec<u32>)> = None;
    let flush = |d: &mut Drv<'_>, b: &mut Option<(Engine, Vec<u32>)>| {
        if let Some((e, cmds)) = b.take() {
            run(d, e, &cmds);
        }
    };
    for work in works {
        model.apply(work);
        match (work.engine(), &mut batch) {
            (None, _) => {
                flush(d, &mut batch);
                if let Work::Cpu(at, data) = work {
                    w.write(d, g, *at, data);
                }
            }
            (Some(e), Some((be, cmds))) if *be == e => cmds.extend(work.encode(&w)),
            (Some(e), _) => {
                flush(d, &mut batch);
                batch = Some((e, work.encode(&w)));
            }
        }
    }
    flush(d, &mut batch);
    assert_same(&w.read(d, g), &model.m, what);
}

const L: u64 = 0;
const G: u64 = WIN;

/// A blit: ROP, bpp code, (source, pitch), (destination, pitch), (width, height), pattern.
type Blt = (u8, u32, (u64, u32), (u64, u32), (u32, u32), u32);

fn blt((rop, bpp, (src, src_pitch), (dst, dst_pitch), (width, height), pattern): Blt) -> Copy {
    Copy {
        rop,
        bpp,
        dst,
        dst_pitch,
        src,
        src_pitch,
        width,
        height,
        pattern,
    }
}

/// Blits in `[0, 0x10000)` of both halves: every bpp, named and arbitrary ROPs, in both
/// directions between local memory and (scattered) guest RAM, rows crossing pages.
#[rustfmt::skip]
fn blit_works() -> Vec<Work> {
    let fills: [Blt; 5] = [
        (ROP_PATCOPY,   BPP_32, (0, 0), (L + 0x100, 512),  (100, 20), 0x00FF_8040),
        (ROP_PATINVERT, BPP_16, (0, 0), (G + 0xF00, 300),  (120, 30), 0x1234_ABCD),
        (ROP_DSTINVERT, BPP_8,  (0, 0), (G + 0x4001, 4113), (333, 3), 0),
        (ROP_WHITENESS, BPP_16, (0, 0), (L + 0xB000, 64),   (8, 8),   0),
        (ROP_BLACKNESS, BPP_32, (0, 0), (G + 0xF000, 64),   (16, 4),  0),
    ];
    let copies: [Blt; 6] = [
        (ROP_SRCCOPY,   BPP_32, (L + 0x3000, 640), (G + 0x7000, 1000), (150, 8),  0),
        (ROP_SRCINVERT, BPP_8,  (G + 0x9003, 257), (L + 0x5000, 300),  (255, 33), 0),
        (ROP_SRCAND,    BPP_16, (L + 0x8000, 200), (G + 0xC000, 256),  (100, 12), 0),
        (0xB8,          BPP_32, (G + 0xD000, 400), (L + 0x9000, 400),  (90, 10),  0x0F0F_00FF),
        (ROP_SRCPAINT,  BPP_8,  (L + 0xA000, 64),  (G + 0xE000, 64),   (64, 16),  0),
        (0x1D,          BPP_16, (G + 0xE800, 96),  (L + 0xA800, 80),   (40, 9),   0xC3A5),
    ];
    let fills = fills.map(|b| Work::Color(blt(b)));
    let copies = copies.map(|b| Work::Copy(blt(b)));
    // Interleaved, so later blits read what earlier ones wrote.
    fills.into_iter().zip(copies).flat_map(|(f, c)| [f, c]).collect()
}

/// Overlapping copies in `[0x10000, 0x18000)`: same pitch in both directions, different
/// pitches, and across scattered guest pages.
#[rustfmt::skip]
fn overlap_works() -> Vec<Work> {
    let copies: [Blt; 5] = [
        (ROP_SRCCOPY,   BPP_32, (L + 0x10000, 512),  (L + 0x10608, 512),  (64, 16),  0),
        (ROP_SRCCOPY,   BPP_32, (L + 0x13400, 512),  (L + 0x13000, 512),  (64, 16),  0),
        (ROP_SRCINVERT, BPP_32, (L + 0x15000, 400),  (L + 0x15064, 300),  (60, 20),  0),
        (ROP_SRCCOPY,   BPP_32, (G + 0x10000, 4096), (G + 0x1100C, 4096), (100, 6),  0),
        (ROP_SRCCOPY,   BPP_8,  (G + 0x16010, 33),   (G + 0x16000, 33),   (30, 40),  0),
    ];
    copies.map(|b| Work::Copy(blt(b))).to_vec()
}

/// Render in `[0x18000, 0x28000)`: a local surface (fills, blends, triangles of both windings,
/// clipping), a second submission drawing into the kept surface, and an ARGB surface in guest
/// RAM.
#[rustfmt::skip]
fn render_works() -> Vec<Work> {
    vec![
        Work::Surface(L + 0x18000, 512, 120, 90, regs::PLANE_FORMAT_XRGB8888),
        Work::Rect((10, 10, 50, 30), 0x80FF_0000, false),
        Work::Rect((30, 20, 200, 100), 0x7F00_FF80, true),
        Work::Tri([(5, 5), (100, 20), (40, 85)], 0xFF33_6699, false),
        Work::Tri([(110, 80), (60, 2), (2, 60)], 0x40FF_FFFF, true),
        Work::Tri([(90, 10), (300, 50), (70, 89)], 0xC000_80FF, true),
        Work::Cpu(L + 0x27000, vec![0; 4]), // splits the submission: the surface is kept
        Work::Rect((0, 80, 120, 10), 0x0102_0304, false),
        Work::Tri([(0, 0), (119, 0), (0, 89)], 0x2080_4000, true),
        Work::Surface(G + 0x18000, 256, 64, 16, regs::PLANE_FORMAT_ARGB8888),
        Work::Rect((3, 2, 40, 12), 0x99AB_CDEF, true),
        Work::Tri([(0, 15), (63, 15), (32, 0)], 0x55FF_0000, false),
    ]
}

/// Video in `[0x28000, 0x38000)`: NV12 to XRGB up- and downscaled, XRGB to NV12 scaled and
/// not, local and guest buffers.
#[rustfmt::skip]
fn video_works() -> Vec<Work> {
    let csc = |(src, src_pitch, src_size), (dst, dst_pitch, dst_size), mode| {
        Work::Csc(Csc { src, src_pitch, src_size, dst, dst_pitch, dst_size, mode })
    };
    vec![
        csc((L + 0x28000, 80, (64, 48)), (G + 0x28000, 420, (100, 70)), CSC_NV12_TO_XRGB),
        csc((L + 0x28000, 80, (64, 48)), (L + 0x2A000, 128, (30, 20)), CSC_NV12_TO_XRGB),
        csc((L + 0x2C000, 256, (64, 48)), (G + 0x30000, 48, (40, 30)), CSC_XRGB_TO_NV12),
        csc((G + 0x31000, 256, (32, 16)), (L + 0x30000, 32, (32, 16)), CSC_XRGB_TO_NV12),
    ]
}

/// `n` finite f32 values with mixed exponents, some subnormal, as bytes.
fn floats(n: usize, seed: u32) -> Vec<u8> {
    let raw = pattern(4 * n, seed);
    raw.chunks_exact(4)
        .enumerate()
        .flat_map(|(i, b)| {
            let bits = u32::from_le_bytes(b.try_into().unwrap());
            let exp = if i % 17 == 0 { 0 } else { 110 + bits % 30 };
            ((bits & 0x807F_FFFF) | exp << 23).to_le_bytes()
        })
        .collect()
}

/// Compute in `[0x38000, 0x3E000)`: saxpy (separate buffers and in place), reduce, matmul
/// (and one with K = 0).
#[rustfmt::skip]
fn compute_works() -> Vec<Work> {
    let k = |kernel, params, scalar, buffers| {
        Work::Kernel(Dispatch { kernel, params, scalar, buffers })
    };
    vec![
        Work::Cpu(L + 0x38000, floats(1000, 1)),
        Work::Cpu(G + 0x38000, floats(1000, 2)),
        Work::Cpu(L + 0x39000, floats(256, 3)),
        Work::Cpu(L + 0x3B000, floats(13 * 17, 4)),
        Work::Cpu(G + 0x3B000, floats(17 * 11, 5)),
        k(KERNEL_SAXPY, [1000, 0, 0], 1.75, [L + 0x38000, G + 0x38000, 0]),
        k(KERNEL_SAXPY, [256, 0, 0], -0.3, [L + 0x39000, L + 0x39000, 0]),
        k(KERNEL_REDUCE_SUM, [2000, 0, 0], 0.0, [G + 0x39000, 0, L + 0x3A000]),
        k(KERNEL_MATMUL, [13, 17, 11], 0.0, [L + 0x3B000, G + 0x3B000, L + 0x3C000]),
        k(KERNEL_MATMUL, [3, 0, 4], 0.0, [0, 0, G + 0x3D000]),
    ]
}

fn test_blit_rops_and_bpp_between_local_and_guest_ram_match_reference(mode: GttMode) {
    let mut r = rig(mode);
    run_works(&mut driver(&mut r.v), &r.g, &blit_works(), "blit");
}

fn test_blit_overlapping_copies_behave_as_if_copied_aside(mode: GttMode) {
    let mut r = rig(mode);
    run_works(&mut driver(&mut r.v), &r.g, &overlap_works(), "overlap");
}

fn test_render_fill_blend_and_triangles_read_through_aperture_match_reference(mode: GttMode) {
    let mut r = rig(mode);
    run_works(&mut driver(&mut r.v), &r.g, &render_works(), "render");
}

fn test_video_nv12_xrgb_scaled_both_ways_match_reference(mode: GttMode) {
    let mut r = rig(mode);
    run_works(&mut driver(&mut r.v), &r.g, &video_works(), "video");
}

fn test_compute_saxpy_reduce_matmul_f32_bit_exact(mode: GttMode) {
    let mut r = rig(mode);
    run_works(&mut driver(&mut r.v), &r.g, &compute_works(), "compute");
}

// ---------------------------------------------------------------------------------------------
// MI commands.

/// A first-level batch calls a second-level one and chains to another first-level batch. Each
/// stage stores `LAST_FENCE` (the previous stage's fence) before writing its own, so the slots
/// prove the execution order.
fn scenario_batches(d: &mut Drv<'_>, g: &Guest) {
    let f = fresh_fences(d, g);
    let e = Engine::Blit;
    let last = d.read32(ereg(e, regs::LAST_FENCE));
    let stage = |k: u32| {
        let k64 = u64::from(k);
        cat(&[
            &enc::store_register_mem(ereg(e, regs::LAST_FENCE), slot(f, k64).0),
            &enc::store_data_imm(slot(f, 16 + k64).0, k),
        ])
    };
    let b1 = d.gm_of_lmem(BATCH_OFF);
    let (b2, b3) = (b1 + 0x1000, b1 + 0x2000);
    let blt = enc::color_blt(
        ROP_PATCOPY,
        BPP_32,
        d.gm_of_lmem(0x3F000),
        64,
        16,
        4,
        0xA5A5_5A5A,
    );
    let batches = [
        (
            b1,
            cat(&[
                &stage(2),
                &enc::batch_start(b2, true),
                &stage(4),
                &enc::batch_start(b3, false),
            ]),
        ),
        (b2, cat(&[&stage(3), &blt, &enc::batch_end()])),
        (b3, cat(&[&stage(5), &enc::batch_end()])),
    ];
    for (gm, dws) in &batches {
        d.lmem_write(gm - d.pv().mappable_base, &dw_bytes(dws));
    }
    let ring = cat(&[
        &stage(1),
        &enc::batch_start(b1, false),
        &stage(6),
        &enc::user_interrupt(),
    ]);
    d.write32(regs::INTR_STATUS, regs::intr_user(e));
    let (start, ring_gm) = ring_pos(d, e);
    run(d, e, &ring);

    assert_eq!(g.read_u32(slot(f, 1).1), last);
    for k in 2..=6 {
        assert_eq!(
            g.read_u32(slot(f, k).1),
            k as u32 - 1,
            "stage {k} ran after stage {}",
            k - 1
        );
        assert_eq!(g.read_u32(slot(f, 16 + k).1), k as u32);
    }
    assert_eq!(d.read32(ereg(e, regs::LAST_FENCE)), 6);
    assert_ne!(d.read32(regs::INTR_STATUS) & regs::intr_user(e), 0);
    let mut px = vec![0u8; 256];
    d.lmem_read(0x3F000, &mut px);
    assert!(px
        .chunks_exact(4)
        .all(|p| p == 0xA5A5_5A5Au32.to_le_bytes()));
    let end = (start + 4 * ring.len() as u32) % 0x4000;
    assert_eq!(d.read32(ereg(e, regs::RING_HEAD)), end);
    let acthd = ring_gm + u64::from((end + 0x4000 - 4) % 0x4000);
    assert_eq!(
        d.read64(ereg(e, regs::ACTHD_LO)),
        acthd,
        "ACTHD: the user interrupt"
    );
}

fn test_mi_batches_called_and_chained_execute_in_order(mode: GttMode) {
    let mut r = rig(mode);
    scenario_batches(&mut driver(&mut r.v), &r.g);
}

fn test_mi_fence_and_user_interrupt_raise_msix_once_per_edge(mode: GttMode) {
    let mut r = rig(mode);
    let sink = enable_msix(&mut r.v);
    let mut d = driver(&mut r.v);
    let f = fresh_fences(&mut d, &r.g);
    let user = regs::intr_user(Engine::Blit);
    run(
        &mut d,
        Engine::Blit,
        &cat(&[&enc::store_data_imm(f, 0xC0FFEE), &enc::user_interrupt()]),
    );
    assert_eq!(r.g.read_u32(FENCE_GPA), 0xC0FFEE);
    assert_eq!(d.read32(ereg(Engine::Blit, regs::LAST_FENCE)), 0xC0FFEE);
    assert_eq!(d.read32(regs::INTR_STATUS), user);
    assert_eq!([0, 1, 2, 3, 4].map(|v| sink.count(v)), [0, 1, 0, 0, 0]);

    run(&mut d, Engine::Blit, &enc::user_interrupt());
    assert_eq!(sink.count(1), 1, "bit still set: no new edge");
    d.write32(regs::INTR_STATUS, user);
    assert_eq!(d.read32(regs::INTR_STATUS), 0);
    run(
        &mut d,
        Engine::Blit,
        &cat(&[&enc::store_data_imm(f + 4, 2), &enc::user_interrupt()]),
    );
    assert_eq!(sink.count(1), 2, "cleared, then raised again");
    assert_eq!(r.g.read_u32(FENCE_GPA + 4), 2);

    run(&mut d, Engine::Compute, &enc::user_interrupt());
    assert_eq!(sink.count(3), 1, "compute interrupts on vector 3");
    assert_eq!(
        d.read32(regs::INTR_STATUS),
        user | regs::intr_user(Engine::Compute)
    );
}

/// Every engine loads its own GPR and `SCRATCH1` with one LRI and stores them, and its
/// `RING_HEAD`, back with `MI_STORE_REGISTER_MEM`.
fn scenario_lri_srm(d: &mut Drv<'_>, g: &Guest) {
    let f = fresh_fences(d, g);
    for e in Engine::ALL {
        let i = e.index() as u64;
        let (gpr, val) = (ereg(e, regs::gpr(3)), 0xABC0_0000 | e.index() as u32);
        let cmds = cat(&[
            &lri(&[(gpr, val), (regs::SCRATCH1, 0x5C00 + e.index() as u32)]),
            &enc::store_register_mem(gpr, slot(f, 32 + i).0),
            &enc::store_register_mem(regs::SCRATCH1, slot(f, 36 + i).0),
            &enc::store_register_mem(ereg(e, regs::RING_HEAD), slot(f, 40 + i).0),
        ]);
        let (start, _) = ring_pos(d, e);
        run(d, e, &cmds);
        assert_eq!(g.read_u32(slot(f, 32 + i).1), val, "{e:?} GPR3");
        assert_eq!(g.read_u32(slot(f, 36 + i).1), 0x5C00 + e.index() as u32);
        assert_eq!(
            g.read_u32(slot(f, 40 + i).1),
            (start + 4 * 13) % 0x4000,
            "{e:?} RING_HEAD at the SRM"
        );
        assert_eq!(d.read32(gpr), val, "the CPU reads the loaded GPR");
    }
    assert_eq!(d.read32(regs::SCRATCH1), 0x5C03);
}

fn test_mi_lri_gpr_and_scratch_stored_back_by_srm(mode: GttMode) {
    let mut r = rig(mode);
    scenario_lri_srm(&mut driver(&mut r.v), &r.g);
}

fn test_mi_lri_plane_surf_flips_in_command_order(mode: GttMode) {
    let mut r = rig(mode);
    let mut d = driver(&mut r.v);
    let f = fresh_fences(&mut d, &r.g);
    let (s1, s2) = (d.gm_of_lmem(0x20000), d.gm_of_lmem(0x30000));
    let cmds = cat(&[
        &lri(&[(regs::PLANE_SURF_HI, 0), (regs::PLANE_SURF_LO, s1 as u32)]),
        &enc::store_register_mem(regs::PLANE_SURF_LO, f),
        &lri(&[(regs::PLANE_SURF_LO, s2 as u32)]),
    ]);
    assert_eq!(d.read32(regs::PLANE_FLIP_COUNT), 0);
    run(&mut d, Engine::Render, &cmds);
    assert_eq!(
        d.read32(regs::PLANE_FLIP_COUNT),
        2,
        "one flip per PLANE_SURF_LO write"
    );
    assert_eq!(
        r.g.read_u32(FENCE_GPA),
        s1 as u32,
        "SRM saw the first flip only"
    );
    assert_eq!(d.read64(regs::PLANE_SURF_LO), s2);
    assert_ne!(d.read32(regs::INTR_STATUS) & regs::INTR_FLIP_DONE, 0);
}

// ---------------------------------------------------------------------------------------------
// PPGTT.

/// Where the PPGTT tables live.
#[derive(Clone, Copy, Debug)]
enum Tables {
    Guest,
    Local,
}

/// A VA with a different index at every level.
const VA: u64 = (0x0FE << 39) | (0x1AB << 30) | (0x0CD << 21) | (0x010 << 12);
const PPGTT_SRC_LMEM: u64 = 0xE0000;
const PPGTT_DST_GPA: u64 = RAM_GPA + 0x300000;
const PPGTT_FENCE_GPA: u64 = RAM_GPA + 0x310000;

/// The blit of the PPGTT scenario, for a source page: `SRCCOPY` of 64x12 pixels from VA page 1
/// (pitch 256) to VA page 2 + 0x100 (pitch 512), rows 8.. on VA page 3.
fn ppgtt_expected(src: &[u8], dst: &mut [u8]) {
    for y in 0..12 {
        dst[0x100 + 512 * y..0x100 + 512 * y + 256].copy_from_slice(&src[256 * y..256 * y + 256]);
    }
}

/// Builds a 4-level PPGTT, runs a blit from a batch through it, then points a leaf at another
/// page, invalidates, and checks the second run used the new page.
fn scenario_ppgtt(d: &mut Drv<'_>, g: &Guest, tables: Tables) {
    let e = Engine::Blit;
    let table = |lvl: u64| match tables {
        Tables::Guest => RAM_GPA + 0x200000 + lvl * PAGE_SIZE,
        Tables::Local => BATCH_OFF + 0x10000 + lvl * PAGE_SIZE,
    };
    let pte = |a| match tables {
        Tables::Guest => pte_guest(a),
        Tables::Local => pte_local(a),
    };
    let put = |d: &mut Drv<'_>, t: u64, i: u64, v: u64| match tables {
        Tables::Guest => g.write(t + 8 * i, &v.to_le_bytes()),
        Tables::Local => d.lmem_write(t + 8 * i, &v.to_le_bytes()),
    };
    for lvl in 1..=4 {
        match tables {
            Tables::Guest => g.write(table(lvl), &[0; PAGE_SIZE as usize]),
            Tables::Local => d.lmem_write(table(lvl), &[0; PAGE_SIZE as usize]),
        }
    }
    for lvl in 2..=4 {
        put(
            d,
            table(lvl),
            ppgtt_index(VA, lvl as u32),
            pte(table(lvl - 1)),
        );
    }
    let (l1, i1) = (table(1), ppgtt_index(VA, 1));
    let batch_lmem = BATCH_OFF + 0x8000;
    put(d, l1, i1, pte_local(batch_lmem));
    put(d, l1, i1 + 1, pte_local(PPGTT_SRC_LMEM));
    put(d, l1, i1 + 2, pte_guest(PPGTT_DST_GPA));
    put(d, l1, i1 + 3, pte_guest(PPGTT_DST_GPA + PAGE_SIZE));
    put(d, l1, i1 + 4, pte_guest(PPGTT_FENCE_GPA));
    g.write(PPGTT_DST_GPA, &[0; 3 * PAGE_SIZE as usize]);
    d.set_ppgtt_root(e, pte(table(4)));

    let page = |i: u64| VA + i * PAGE_SIZE;
    let mut expect = vec![0u8; 2 * PAGE_SIZE as usize];
    for run_no in 1..=2u32 {
        let src = pattern(PAGE_SIZE as usize, 10 + run_no);
        d.lmem_write(PPGTT_SRC_LMEM, &src);
        let copy = blt((
            ROP_SRCCOPY,
            BPP_32,
            (page(1), 256),
            (page(2) + 0x100, 512),
            (64, 12),
            0,
        ));
        let batch = cat(&[
            &enc::src_copy_blt(copy),
            &enc::store_data_imm(page(4), run_no),
            &enc::batch_end(),
        ]);
        d.lmem_write(batch_lmem, &dw_bytes(&batch));
        run(d, e, &enc::batch_start(VA, false));
        assert_eq!(g.read_u32(PPGTT_FENCE_GPA), run_no);
        let old_second = expect[PAGE_SIZE as usize..].to_vec();
        ppgtt_expected(&src, &mut expect);
        let got = g.bytes(PPGTT_DST_GPA, 2 * PAGE_SIZE as usize);
        if run_no == 1 {
            assert_same(&got, &expect, "first PPGTT run");
            // Point VA page 3 at another guest page and invalidate.
            put(d, l1, i1 + 3, pte_guest(PPGTT_DST_GPA + 2 * PAGE_SIZE));
            d.write32(regs::TLB_INVALIDATE, e.mask_bit());
        } else {
            let (first, second) = expect.split_at(PAGE_SIZE as usize);
            assert_same(&got[..PAGE_SIZE as usize], first, "page 2 after the change");
            assert_same(
                &got[PAGE_SIZE as usize..],
                &old_second,
                "old page 3 untouched",
            );
            let new = g.bytes(PPGTT_DST_GPA + 2 * PAGE_SIZE, PAGE_SIZE as usize);
            assert_same(&new, second, "new page 3");
        }
    }
    d.set_ppgtt_root(e, 0);
}

fn test_ppgtt_guest_tables_leaf_change_after_invalidate_uses_new_page(mode: GttMode) {
    let mut r = rig(mode);
    scenario_ppgtt(&mut driver(&mut r.v), &r.g, Tables::Guest);
}

fn test_ppgtt_local_tables_leaf_change_after_invalidate_uses_new_page(mode: GttMode) {
    let mut r = rig(mode);
    scenario_ppgtt(&mut driver(&mut r.v), &r.g, Tables::Local);
}

// ---------------------------------------------------------------------------------------------
// Rings, semaphores, unread sources.

/// A copy blit whose ROP ignores the source may carry any source address (section 8.6).
fn test_blit_patcopy_copy_with_unread_source_address_accepted(mode: GttMode) {
    let mut r = rig(mode);
    let mut d = driver(&mut r.v);
    let outside = d.pv().hidden_base + d.pv().hidden_size;
    let dst = (d.gm_of_lmem(0x3000), 256);
    let fill = blt((
        ROP_PATCOPY,
        BPP_32,
        (outside, 256),
        dst,
        (16, 4),
        0x5A5A_A5A5,
    ));
    let invert = blt((ROP_DSTINVERT, BPP_32, (outside, 256), dst, (16, 2), 0));
    run(
        &mut d,
        Engine::Blit,
        &cat(&[&enc::src_copy_blt(fill), &enc::src_copy_blt(invert)]),
    );
    let mut px = vec![0u8; 4 * 256];
    d.lmem_read(0x3000, &mut px);
    for (y, row) in px.chunks_exact(256).enumerate() {
        let want: u32 = if y < 2 { !0x5A5A_A5A5 } else { 0x5A5A_A5A5 };
        assert!(
            row[..64].chunks_exact(4).all(|p| p == want.to_le_bytes()),
            "row {y}"
        );
    }
}

/// A command that wraps around the end of the ring executes (section 8.2).
fn test_ring_command_wrapping_ring_end_executes(mode: GttMode) {
    let mut r = rig(mode);
    let mut d = driver(&mut r.v);
    let e = Engine::Blit;
    run(&mut d, e, &vec![0u32; (0x4000 - 8) / 4]); // MI_NOOPs up to 8 bytes before the end
    let f = fresh_fences(&mut d, &r.g);
    let fill = enc::color_blt(
        ROP_PATCOPY,
        BPP_32,
        d.gm_of_lmem(0x2000),
        64,
        16,
        4,
        0x0BAD_CAFE,
    );
    let (start, ring_gm) = ring_pos(&mut d, e);
    assert_eq!(start, 0x4000 - 8);
    run(&mut d, e, &cat(&[&fill, &enc::store_data_imm(f, 7)]));
    assert_eq!(r.g.read_u32(FENCE_GPA), 7);
    assert_eq!(d.read32(ereg(e, regs::RING_HEAD)), 36);
    assert_eq!(
        d.read64(ereg(e, regs::ACTHD_LO)),
        ring_gm + 20,
        "ACTHD: the fence"
    );
    let mut px = vec![0u8; 4 * 64];
    d.lmem_read(0x2000, &mut px);
    assert!(px
        .chunks_exact(4)
        .all(|p| p == 0x0BAD_CAFEu32.to_le_bytes()));
}

/// `MI_SEMAPHORE_WAIT` (>=) on the blit engine waits, with `WAITING` set, until a fence of the
/// compute engine satisfies it.
fn test_mi_semaphore_wait_released_by_fence_of_other_engine(mode: GttMode) {
    let mut r = rig(mode);
    let mut d = driver(&mut r.v);
    let f = fresh_fences(&mut d, &r.g);
    let status = |d: &mut Drv<'_>| d.read32(ereg(Engine::Blit, regs::ENGINE_STATUS));
    let wait = cat(&[
        &enc::semaphore_wait(f, 5, true),
        &enc::store_data_imm(f + 4, 1),
    ]);
    d.submit(Engine::Blit, &wait).unwrap();
    for value in [3, 6] {
        d.device().progress();
        assert_ne!(
            status(&mut d) & regs::ENGINE_STATUS_WAITING,
            0,
            "waiting for 5"
        );
        assert_eq!(r.g.read_u32(FENCE_GPA + 4), 0);
        run(&mut d, Engine::Compute, &enc::store_data_imm(f, value));
    }
    d.wait_idle(Engine::Blit, IDLE_TIMEOUT).unwrap();
    assert_eq!(r.g.read_u32(FENCE_GPA + 4), 1);
    assert_eq!(status(&mut d), regs::ENGINE_STATUS_IDLE);
}

// ---------------------------------------------------------------------------------------------
// Shadow and two-dim agree.

/// Every workload, in one vGPU; returns the data part of local memory and all of guest RAM.
fn everything(d: &mut Drv<'_>, g: &Guest) -> (Vec<u8>, Vec<u8>) {
    for (works, what) in [
        (blit_works(), "blit"),
        (overlap_works(), "overlap"),
        (render_works(), "render"),
        (video_works(), "video"),
        (compute_works(), "compute"),
    ] {
        run_works(d, g, &works, what);
    }
    scenario_batches(d, g);
    scenario_lri_srm(d, g);
    scenario_ppgtt(d, g, Tables::Guest);
    scenario_ppgtt(d, g, Tables::Local);
    // Below BATCH_OFF local memory holds only data (batches and tables hold GM addresses,
    // which differ between partitions).
    let mut lmem = vec![0u8; BATCH_OFF as usize];
    d.lmem_read(0, &mut lmem);
    (lmem, g.bytes(RAM_GPA, RAM_SIZE as usize))
}

#[test]
fn test_workloads_shadow_and_two_dim_produce_identical_bytes() {
    let mut phys = phys(64);
    let mut out = Vec::new();
    for mode in [GttMode::Shadow, GttMode::TwoDim] {
        let g = Guest::new();
        let mut v = vgpu(&mut phys, "mini", mode);
        v.set_dma_map(g.dma());
        out.push(everything(&mut driver(&mut v), &g));
    }
    assert_same(&out[0].0, &out[1].0, "local memory, shadow vs two-dim");
    assert_same(&out[0].1, &out[1].1, "guest RAM, shadow vs two-dim");
}
