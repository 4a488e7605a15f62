//! Ops against the reference implementations, through scattered pages.

#![allow(clippy::cast_possible_truncation)] // Test-only: small, known-range values.

use proptest::prelude::*;
use vgpu_abi::cmd::enc::{self, Copy, Csc};
use vgpu_abi::cmd::{self, Header};
use vgpu_abi::PAGE_SIZE;

use super::reference::{self, Surf};
use super::*;
use crate::mem::BufferTranslate;

/// Pages of the test address space (not a multiple of 7: scrambled).
const PAGES: usize = 64;
pub(super) const MEM: usize = PAGES * PAGE_SIZE as usize;

pub(super) fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect()
}

pub(super) fn op(dws: &[u32]) -> Op {
    decode(Header::parse(dws[0]), &dws[1..]).expect("valid command")
}

/// How the test address space lies in host memory.
#[derive(Clone, Copy, Debug)]
pub(super) enum Layout {
    /// No two consecutive pages back to back ([`BufferTranslate::scrambled`]).
    Scrambled,
    /// Runs of 1-3 pages back to back, joined into longer spans ([`BufferTranslate::in_runs`]).
    Runs,
}

/// Both layouts.
const LAYOUTS: [Layout; 2] = [Layout::Scrambled, Layout::Runs];

/// Runs the commands in order over `init` (through scrambled pages, with `unmapped` pages
/// removed and `read_only` ones protected); returns the last result and the memory after
/// (unmapped pages read back as zero). Checks that every changed byte lies in a write extent.
pub(super) fn run_with(
    cmds: &[&[u32]],
    init: &[u8],
    unmapped: &[usize],
    read_only: &[usize],
) -> (Result<OpStats, ExecError>, Vec<u8>) {
    run_in(Layout::Scrambled, cmds, init, unmapped, read_only)
}

/// [`run_with`] over the given layout.
pub(super) fn run_in(
    layout: Layout,
    cmds: &[&[u32]],
    init: &[u8],
    unmapped: &[usize],
    read_only: &[usize],
) -> (Result<OpStats, ExecError>, Vec<u8>) {
    let mut t = match layout {
        Layout::Scrambled => BufferTranslate::scrambled(PAGES),
        Layout::Runs => BufferTranslate::in_runs(PAGES),
    };
    Mem::new(&mut t).write(GpuVa(0), init).unwrap();
    unmapped.iter().for_each(|&p| t.unmap(p));
    read_only.iter().for_each(|&p| t.set_read_only(p));
    let mut m = Mem::new(&mut t);
    let mut render = RenderState::default();
    let mut res = Ok(OpStats::default());
    let mut writes = Vec::new();
    for dws in cmds {
        let o = op(dws);
        if let Ok(fp) = o.footprint(render.surface.as_ref()) {
            writes.extend(fp.into_iter().filter(|e| e.access == Access::Write));
        }
        res = o.execute(&mut m, &mut render);
    }
    let mut out = vec![0u8; MEM];
    for (p, chunk) in out.chunks_mut(PAGE_SIZE as usize).enumerate() {
        if !unmapped.contains(&p) {
            m.read(GpuVa(p as u64 * PAGE_SIZE), chunk).unwrap();
        }
    }
    for (i, (a, b)) in init.iter().zip(&out).enumerate() {
        // Unmapped pages read back as zero without having changed.
        if a != b && !unmapped.contains(&(i / PAGE_SIZE as usize)) {
            let i = i as u64;
            assert!(
                writes
                    .iter()
                    .any(|e| e.va.raw() <= i && i < e.va.raw() + e.len),
                "byte {i:#x} changed outside the footprint"
            );
        }
    }
    (res, out)
}

fn run(cmds: &[&[u32]], init: &[u8]) -> Vec<u8> {
    let (res, out) = run_with(cmds, init, &[], &[]);
    res.expect("op ran");
    out
}

fn blit_strategy() -> impl Strategy<Value = (Copy, bool)> {
    (
        any::<u8>(),
        0u32..3,
        (0u32..24, 0u32..12),
        (0u32..48, 0u32..48, prop_oneof![Just(0u32), 0u32..5000]),
        (
            0usize..MEM - 80_000,
            -300i64..300,
            any::<bool>(),
            any::<bool>(),
        ),
        any::<u32>(),
        any::<bool>(),
    )
        .prop_map(
            |(rop, bpp, (w, h), (dx, sx, far), (base, delta, near, same), pattern, with_src)| {
                let bytes = w << bpp;
                let dst_pitch = bytes + dx + far;
                let src_pitch = if near && same { dst_pitch } else { bytes + sx };
                let dst = base as u64;
                // Near: an overlapping source around the destination; else anywhere after it.
                let src = if near {
                    (base as i64 + 4096 + delta) as u64
                } else {
                    dst + 70_000
                };
                let dst = if near { dst + 4096 } else { dst };
                let c = Copy {
                    rop,
                    bpp,
                    dst,
                    dst_pitch,
                    src,
                    src_pitch,
                    width: w,
                    height: h,
                    pattern,
                };
                (c, with_src)
            },
        )
}

/// Blits whose rows cross several pages (up to ~10 KB), with dense pitches (rows processed as
/// one), padded ones, and rows a page or more apart (pages between them never touched); the
/// source far away, or overlapping (equal or different pitches, either side).
fn wide_blit_strategy() -> impl Strategy<Value = (Copy, bool)> {
    let pad = prop_oneof![Just(0u32), 0u32..40, 4096u32..9000];
    // Any ROP, or one of the named ones (fills and copies among them).
    let rop = prop_oneof![
        any::<u8>(),
        prop::sample::select(vec![0x00, 0x55, 0x5A, 0x66, 0x88, 0xCC, 0xEE, 0xF0, 0xFF]),
    ];
    (
        (rop, 0u32..3, any::<u32>(), any::<bool>()),
        (0u32..10_400, 1u32..5),
        (pad.clone(), pad),
        (
            12_288u64..90_000,
            prop_oneof![Just(None), (-12_000i64..12_000).prop_map(Some)],
        ),
        any::<bool>(),
    )
        .prop_map(
            |((rop, bpp, pattern, with_src), (bytes, h), (dpad, spad), (dst, near), same)| {
                let w = bytes >> bpp;
                let bytes = w << bpp;
                let dst_pitch = bytes + dpad;
                let src_pitch = if same { dst_pitch } else { bytes + spad };
                // Far: after the destination's footprint; near: around it.
                let src = match near {
                    Some(delta) => (dst as i64 + delta) as u64,
                    None => dst + 4 * u64::from(dst_pitch) + 100,
                };
                let c = Copy {
                    rop,
                    bpp,
                    dst,
                    dst_pitch,
                    src,
                    src_pitch,
                    width: w,
                    height: h,
                    pattern,
                };
                (c, with_src)
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn test_blit_random_matches_reference((c, with_src) in blit_strategy(), seed: u64) {
        check_blit(&c, with_src, &random_bytes(seed, MEM));
    }

    #[test]
    fn test_blit_wide_rows_random_match_reference((c, with_src) in wide_blit_strategy(), seed: u64) {
        check_blit(&c, with_src, &random_bytes(seed, MEM));
    }

    #[test]
    fn test_render_random_matches_reference(
        (sw, sh, extra, fmt) in (0u32..40, 0u32..30, 0u32..4000, 0u32..2),
        base in 0usize..MEM - 200_000,
        rect in (0u32..60, 0u32..60, 0u32..60, 0u32..60),
        v in prop::array::uniform3((prop_oneof![0u32..50, 0u32..65536], prop_oneof![0u32..40, 0u32..65536])),
        degenerate in prop::option::of((0u32..40, 0u32..30, -6i32..6, -6i32..6)),
        (colour, blend, tri) in (any::<u32>(), any::<bool>(), any::<bool>()),
        seed: u64,
    ) {
        let init = random_bytes(seed, MEM);
        let pitch = sw * 4 + extra;
        let mut v = v;
        if let Some((x, y, dx, dy)) = degenerate {
            // Collinear (or coincident) vertices `p`, `p + d`, `p + 2d`, in a random order.
            let at = |k: i32| ((x as i32 + 12 + k * dx) as u32, (y as i32 + 12 + k * dy) as u32);
            v = [at(0), at(1), at(2)];
            v.rotate_left((x % 3) as usize);
        }
        let surf = enc::surface_state(base as u64, pitch, sw, sh, fmt);
        let draw: Vec<u32> = if tri {
            enc::triangle(v, colour, blend).to_vec()
        } else {
            enc::fill_rect(rect.0, rect.1, rect.2, rect.3, colour, blend).to_vec()
        };
        let got = run(&[&surf, &draw], &init);
        let mut want = init.clone();
        let s: Surf = (base, pitch as usize, sw as usize, sh as usize);
        if tri {
            reference::triangle(&mut want, s, v, colour, blend);
        } else {
            reference::fill_rect(&mut want, s, rect, colour, blend);
        }
        prop_assert!(got == want);
    }

    #[test]
    fn test_triangles_sharing_an_edge_never_cover_a_pixel_twice(
        pts in prop::array::uniform4((0u32..40, 0u32..40)),
        flip: (bool, bool),
    ) {
        let [a, b, c, d] = pts.map(|(x, y)| (i64::from(x), i64::from(y)));
        let side = |p: (i64, i64)| (b.0 - a.0) * (p.1 - a.1) - (b.1 - a.1) * (p.0 - a.0);
        prop_assume!(side(c) * side(d) < 0);
        // A black 40x40 surface, then both halves at 50% white: a pixel covered twice would be
        // 192, not 128.
        let black = enc::color_blt(cmd::ROP_BLACKNESS, cmd::BPP_32, 0, 160, 40, 40, 0);
        let surf = enc::surface_state(0, 160, 40, 40, 0);
        let [pa, pb, pc, pd] = pts;
        let t1 = if flip.0 { [pa, pb, pc] } else { [pb, pa, pc] };
        let t2 = if flip.1 { [pa, pb, pd] } else { [pd, pb, pa] };
        let t1 = enc::triangle(t1, 0x80FF_FFFF, true);
        let t2 = enc::triangle(t2, 0x80FF_FFFF, true);
        let out = run(&[&black, &surf, &t1, &t2], &random_bytes(1, MEM));
        prop_assert!(out[..160 * 40].chunks(4).all(|p| p[0] == 0 || p[0] == 128));
    }

    #[test]
    fn test_csc_random_matches_reference(
        nv12_src: bool,
        (sw, sh, dw, dh) in (1u32..24, 1u32..24, 1u32..24, 1u32..24),
        (sx, dx) in (0u32..40, 0u32..40),
        (src, dst) in (0u64..100_000, 130_000u64..150_000),
        seed: u64,
    ) {
        let init = random_bytes(seed, MEM);
        let even = |v: u32| v & !1;
        let (src_size, dst_size, sp, dp) = if nv12_src {
            let (w, h) = (even(sw).max(2), even(sh).max(2));
            ((w, h), (dw, dh), w + sx, dw * 4 + dx)
        } else {
            let (w, h) = (even(dw).max(2), even(dh).max(2));
            ((sw, sh), (w, h), sw * 4 + sx, w + dx)
        };
        let mode = if nv12_src { cmd::CSC_NV12_TO_XRGB } else { cmd::CSC_XRGB_TO_NV12 };
        let c = Csc { src, src_pitch: sp, src_size, dst, dst_pitch: dp, dst_size, mode };
        let got = run(&[&enc::csc_scale(c)], &init);
        let mut want = init.clone();
        reference::csc(&mut want, &c);
        prop_assert!(got == want);
    }

    #[test]
    fn test_compute_random_matches_reference(
        kernel in 0u32..3,
        n in prop_oneof![0u32..100, 0u32..20_000],
        (mm, kk, nn) in (0u32..10, 0u32..10, 0u32..10),
        scalar_bits in prop_oneof![any::<u32>(), (-1000i32..1000).prop_map(|v| (v as f32 / 7.0).to_bits())],
        in_place: bool,
        (a, b, c) in (0u64..10, 90_000u64..90_010, 180_000u64..180_100),
        seed: u64,
    ) {
        let init = random_bytes(seed, MEM);
        let params = if kernel == cmd::KERNEL_MATMUL { [mm, kk, nn] } else { [n, 0, 0] };
        let b = if in_place && kernel == cmd::KERNEL_SAXPY { a } else { b };
        let d = enc::Dispatch { kernel, params, scalar: f32::from_bits(scalar_bits), buffers: [a, b, c] };
        let got = run(&[&enc::dispatch(d)], &init);
        let mut want = init.clone();
        reference::dispatch(&mut want, &d);
        prop_assert!(got == want);
    }
}

#[test]
fn test_matmul_chunk_boundaries_match_reference() {
    // N above one column block; K above one chunk of A's row; both with small other sides.
    for (params, bufs) in [
        ([1, 2, 16_385], [0, 64, 140_000]),
        ([1, 20_000, 1], [0, 100_000, 200_000]),
        ([3, 5_000, 4], [0, 70_000, 200_000]),
    ] {
        let init: Vec<u8> = random_bytes(7, MEM)
            .chunks(4)
            .flat_map(|c| (f32::from(c[0]) / 16.0 - 8.0).to_le_bytes())
            .collect();
        let d = enc::Dispatch {
            kernel: cmd::KERNEL_MATMUL,
            params,
            scalar: 0.0,
            buffers: bufs,
        };
        let got = run(&[&enc::dispatch(d)], &init);
        let mut want = init.clone();
        reference::dispatch(&mut want, &d);
        assert!(got == want, "matmul {params:?}");
    }
}

/// Small exact-ish f32 values from random bytes (sums stay finite and vary in their rounding).
fn small_f32s(seed: u64) -> Vec<u8> {
    random_bytes(seed, MEM)
        .chunks(4)
        .flat_map(|c| (f32::from(c[0]) / 16.0 - 8.0 + f32::from(c[1]) / 4096.0).to_le_bytes())
        .collect()
}

#[test]
fn test_matmul_tiles_and_register_blocks_match_reference() {
    // Several tiles in each dimension, partial register blocks, more rows of B than one packed
    // strip, N above the tile width; unaligned buffers straddling scattered pages. Inputs are
    // small values, then raw random bits (NaNs, infinities, subnormals).
    for (params, bufs) in [
        ([13, 300, 20], [3, 20_001, 50_002]),
        ([5, 3, 1100], [1, 4093, 30_002]),
        ([70, 40, 9], [4094, 20_003, 30_001]),
        ([300, 2, 60], [0, 8190, 10_001]),
        ([3, 900, 20], [5, 12_002, 90_003]),
        ([9, 17, 1031], [0, 1001, 80_000]),
        ([33, 513, 16], [7, 70_001, 110_002]),
    ] {
        for (i, init) in [small_f32s(3), random_bytes(5, MEM)]
            .into_iter()
            .enumerate()
        {
            let d = enc::Dispatch {
                kernel: cmd::KERNEL_MATMUL,
                params,
                scalar: 0.0,
                buffers: bufs,
            };
            let got = run(&[&enc::dispatch(d)], &init);
            let mut want = init.clone();
            reference::dispatch(&mut want, &d);
            assert!(got == want, "matmul {params:?} inputs {i}");
        }
    }
}

#[test]
fn test_saxpy_and_reduce_at_page_offsets_match_reference() {
    // Every page offset class of the staging (aligned, unaligned by 1-3 bytes, a few elements
    // or a partial element before a page boundary), over several scattered pages.
    let offsets = [0u64, 1, 2, 3, 4, 100, 4090, 4092, 4093, 4095];
    let init = small_f32s(9);
    for (&xo, &yo) in offsets.iter().zip(offsets.iter().rev()) {
        for (kernel, bufs) in [
            (cmd::KERNEL_SAXPY, [xo, 40_960 + yo, 0]),
            (cmd::KERNEL_SAXPY, [xo, xo, 0]),
            (cmd::KERNEL_REDUCE_SUM, [xo, 0, 90_000 + yo]),
        ] {
            for n in [1, 1023, 1024, 1025, 5000] {
                let d = enc::Dispatch {
                    kernel,
                    params: [n, 0, 0],
                    scalar: -1.25,
                    buffers: bufs,
                };
                let got = run(&[&enc::dispatch(d)], &init);
                let mut want = init.clone();
                reference::dispatch(&mut want, &d);
                assert!(got == want, "kernel {kernel} {bufs:?} n {n}");
            }
        }
    }
}

#[test]
fn test_matmul_k_zero_stores_zeros_and_reduce_empty_stores_zero() {
    let init = vec![0xAB; MEM];
    let d = enc::Dispatch {
        kernel: cmd::KERNEL_MATMUL,
        params: [2, 0, 3],
        scalar: 0.0,
        buffers: [0, 0, 64],
    };
    let got = run(&[&enc::dispatch(d)], &init);
    assert!(got[64..88].iter().all(|&b| b == 0) && got[88] == 0xAB);
    let d = enc::Dispatch {
        kernel: cmd::KERNEL_REDUCE_SUM,
        params: [0; 3],
        scalar: 0.0,
        buffers: [0, 0, 8],
    };
    let got = run(&[&enc::dispatch(d)], &init);
    assert_eq!(&got[8..16], &[0; 8]);
}

/// Runs one blit in both layouts and compares with the reference.
fn check_blit(c: &Copy, with_src: bool, init: &[u8]) {
    let dws: Vec<u32> = if with_src {
        enc::src_copy_blt(*c).to_vec()
    } else {
        enc::color_blt(
            c.rop,
            c.bpp,
            c.dst,
            c.dst_pitch,
            c.width,
            c.height,
            c.pattern,
        )
        .to_vec()
    };
    let mut want = init.to_vec();
    reference::blit(&mut want, c, with_src);
    for layout in LAYOUTS {
        let (res, got) = run_in(layout, &[&dws], init, &[], &[]);
        res.expect("blit ran");
        assert!(got == want, "{layout:?} {c:?} with_src {with_src}");
    }
}

#[test]
fn test_fills_across_pages_every_bpp_and_phase_match_reference() {
    // Rows of ~9000 bytes starting at every phase of an 8-byte word relative to the page
    // boundaries they cross; dense (one long row), padded, and a page or more apart; ROPs that
    // store the pattern and ROPs that update the destination in place; a colour whose bytes
    // differ and a uniform one.
    let init = random_bytes(21, MEM);
    for bpp in 0..3u32 {
        for rop in [
            cmd::ROP_PATCOPY,
            cmd::ROP_BLACKNESS,
            cmd::ROP_WHITENESS,
            0x0F, // ~P
            cmd::ROP_PATINVERT,
            cmd::ROP_DSTINVERT,
            0xA0, // P & D
            0xFA, // P | D
        ] {
            for (dst, pad) in [
                (4093, 0),
                (8190, 3),
                (12_289, 4099),
                (16_384, 0),
                (20_487, 5),
            ] {
                for pattern in [0x1234_5678, 0x5A5A_5A5A] {
                    let width = 9000 >> bpp;
                    let c = Copy {
                        rop,
                        bpp,
                        dst,
                        dst_pitch: (width << bpp) + pad,
                        src: 0,
                        src_pitch: 0,
                        width,
                        height: 3,
                        pattern,
                    };
                    check_blit(&c, false, &init);
                }
            }
        }
    }
}

#[test]
fn test_every_rop_on_rows_across_pages_matches_reference() {
    // All 256 ROPs at 32 bpp, rows crossing pages at odd offsets: a fill, a copy from far away,
    // an overlapping copy whose rows are apart (span to span, bottom-up), and one whose source
    // row overlaps its destination row (through row buffers).
    let init = random_bytes(23, MEM);
    for rop in 0..=255u8 {
        let c = Copy {
            rop,
            bpp: 2,
            dst: 4093,
            dst_pitch: 5003,
            src: 60_001,
            src_pitch: 5001,
            width: 1210,
            height: 3,
            pattern: 0x8421_F00F,
        };
        check_blit(&c, false, &init);
        check_blit(&c, true, &init);
        // (dst, src, src pitch): overlapping, rows apart (bottom-up, then top-down); a source
        // row overlapping its destination row (equal pitches, then different ones).
        for (dst, src, src_pitch) in [
            (10_000, 5_150, 5003),
            (5_150, 10_000, 5003),
            (6006, 6001, 5003),
            (6006, 6001, 5001),
        ] {
            check_blit(
                &Copy {
                    dst,
                    src,
                    src_pitch,
                    ..c
                },
                true,
                &init,
            );
        }
    }
}

#[test]
fn test_overlapping_scroll_both_directions_matches_reference() {
    let init = random_bytes(11, MEM);
    for (dst, src, dp, sp) in [
        (0x1000, 0x1000 + 3 * 256, 256, 256),
        (0x1000 + 3 * 256, 0x1000, 256, 256),
        (0x1004, 0x1000, 256, 256),
        (0x1000, 0x1008, 300, 256),
    ] {
        let c = Copy {
            rop: cmd::ROP_SRCCOPY,
            bpp: 2,
            dst,
            dst_pitch: dp,
            src,
            src_pitch: sp,
            width: 60,
            height: 40,
            pattern: 0,
        };
        let got = run(&[&enc::src_copy_blt(c)], &init);
        let mut want = init.clone();
        reference::blit(&mut want, &c, true);
        assert!(got == want, "dst {dst:#x} src {src:#x}");
    }
}

/// Throughput of a large `SRCCOPY` (dense, and with padded pitches) against a host `memcpy` of
/// the same size. Run with
/// `cargo test --release -p vgpu-device srccopy_throughput -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark"]
fn test_srccopy_throughput_vs_memcpy() {
    use std::time::Instant;
    fn best(mut f: impl FnMut()) -> f64 {
        (0..5)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    }
    let (w, h) = (4096u32, 4096u32);
    let bytes = (w * h * 4) as usize;
    let (a, mut b) = (vec![1u8; bytes], vec![0u8; bytes]);
    let host = best(|| {
        std::hint::black_box(&mut b).copy_from_slice(std::hint::black_box(&a));
    });
    for pad in [0, 256] {
        let pitch = w * 4 + pad;
        let span = (pitch * h) as usize;
        // A multiple of 7 pages: identity layout, as contiguous as the host buffers.
        let pages = (2 * span / PAGE_SIZE as usize).div_ceil(7) * 7;
        let mut t = BufferTranslate::scrambled(pages);
        let mut m = Mem::new(&mut t);
        let c = Copy {
            rop: cmd::ROP_SRCCOPY,
            bpp: 2,
            dst: span as u64,
            dst_pitch: pitch,
            src: 0,
            src_pitch: pitch,
            width: w,
            height: h,
            pattern: 0,
        };
        let o = op(&enc::src_copy_blt(c));
        let mut r = RenderState::default();
        let blt = best(|| {
            o.execute(&mut m, &mut r).unwrap();
        });
        let gbs = |s: f64| bytes as f64 / s / 1e9;
        println!(
            "SRCCOPY pitch pad {pad}: {:.2} GB/s, memcpy {:.2} GB/s, ratio {:.2}",
            gbs(blt),
            gbs(host),
            host / blt
        );
    }
}

#[test]
fn test_triangle_diagonal_edge_left_included_right_excluded() {
    // Centres on the diagonal are covered only where it is a left edge; the vertical and
    // horizontal edges never pass through a centre.
    let surf = enc::surface_state(0, 64, 16, 8, 0);
    for (v, want) in [
        ([(0, 0), (4, 4), (0, 4)], 6),
        ([(0, 0), (0, 4), (4, 4)], 6),
        ([(4, 0), (4, 4), (0, 4)], 10),
        ([(0, 4), (4, 0), (4, 4)], 10),
    ] {
        let t = enc::triangle(v, 0xFFFF_FFFF, false);
        let out = run(&[&surf, &t], &vec![0u8; MEM]);
        let n = out[..64 * 8].chunks(4).filter(|p| p[0] == 0xFF).count();
        assert_eq!(n, want, "{v:?}");
    }
}
