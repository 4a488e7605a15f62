//! The workload a well-behaved guest runs on each vGPU: blits (fill, copy from guest RAM, raster
//! operation), rendering (fills, blending, a triangle), compute (saxpy, reduce, matmul) and a
//! display flip of a test pattern. Every result is checked bit-exactly against values computed
//! here on the CPU. Sizes are small on purpose: under the nested hypervisor of the CI machines
//! guest instructions run emulated (about a microsecond each), and the point is the device's
//! correctness, which small images check as well as large ones.

use vgpu_abi::cmd::{
    enc, BPP_32, KERNEL_MATMUL, KERNEL_REDUCE_SUM, KERNEL_SAXPY, ROP_PATCOPY, ROP_SRCCOPY,
    ROP_SRCINVERT,
};
use vgpu_abi::pci::MSIX_VECTOR_DEVICE;
use vgpu_abi::{regs, Engine};

use crate::render_ref::Image;
use crate::vgpu::{Vgpu, WAIT_MS};
use crate::{check, cpu, println};

/// Scratch RAM offset of the blit source image.
const SRC_RAM: u64 = 0x1_0000;
/// Scratch RAM offset of the reduce input.
const REDUCE_RAM: u64 = 0x2_0000;
/// Scratch RAM offset of the CPU-side reference image (outside the GM-mapped part).
const REF_RAM: u64 = 0x10_0000;

/// A small xorshift generator for test data.
pub struct Rng(u32);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u32) -> Rng {
        Rng(seed.wrapping_mul(2_654_435_761) | 1)
    }

    /// The next value.
    pub fn next_u32(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }
}

fn lmem_read(v: &Vgpu, off: u64) -> u32 {
    // SAFETY: `off` is inside local memory (checked by the partition-size probe), mapped at
    // BAR2.
    unsafe { core::ptr::read_volatile(v.lmem_ptr::<u32>(off)) }
}

fn lmem_write(v: &Vgpu, off: u64, val: u32) {
    // SAFETY: as `lmem_read`.
    unsafe { core::ptr::write_volatile(v.lmem_ptr::<u32>(off), val) }
}

fn ram_write(addr: u64, val: u32) {
    // SAFETY: `addr` is in this vGPU's scratch RAM, owned by this program.
    unsafe { core::ptr::write_volatile(addr as *mut u32, val) }
}

/// Runs the whole workload on `v`.
pub fn run(v: &mut Vgpu) {
    if v.has(Engine::Blit) {
        blit(v);
    }
    if v.has(Engine::Render) {
        render(v);
    }
    if v.has(Engine::Compute) {
        compute(v);
    }
    display(v);
    println!("vgpu{}: workload checked", v.index);
}

fn blit(v: &mut Vgpu) {
    let (w, h, pitch) = (32u32, 32u32, 128u32);
    let (fill, copy) = (0x1_0000u64, 0x2_0000u64);
    let red = 0x00FF_0000;
    let cmd = enc::color_blt(ROP_PATCOPY, BPP_32, v.lmem_gm(fill), pitch, w, h, red);
    v.run(Engine::Blit, &[&cmd], "blit fill");
    for i in 0..u64::from(w * h) {
        let got = lmem_read(v, fill + 4 * i);
        check!(got == red, 0x201, "fill pixel {} is {:#x}", i, got);
    }

    // A source image in guest RAM, reached through hidden-GM GGTT entries.
    let mut rng = Rng::new(0x5EED + v.index as u32);
    let src = v.scratch() + SRC_RAM;
    for i in 0..u64::from(w * h) {
        ram_write(src + 4 * i, rng.next_u32());
    }
    let src_gm = v.scratch_gm(SRC_RAM);
    let copy_cmd = |rop, dst| {
        enc::src_copy_blt(enc::Copy {
            rop,
            bpp: BPP_32,
            dst,
            dst_pitch: pitch,
            src: src_gm,
            src_pitch: pitch,
            width: w,
            height: h,
            pattern: 0,
        })
    };
    let c = copy_cmd(ROP_SRCCOPY, v.lmem_gm(copy));
    v.run(Engine::Blit, &[&c], "blit copy from guest RAM");
    let x = copy_cmd(ROP_SRCINVERT, v.lmem_gm(fill));
    v.run(Engine::Blit, &[&x], "blit SRCINVERT");
    for i in 0..u64::from(w * h) {
        // SAFETY: scratch RAM owned by this program.
        let s = unsafe { core::ptr::read_volatile((src + 4 * i) as *const u32) };
        let (got_copy, got_xor) = (lmem_read(v, copy + 4 * i), lmem_read(v, fill + 4 * i));
        check!(
            got_copy == s,
            0x202,
            "copy pixel {}: {:#x} != {:#x}",
            i,
            got_copy,
            s
        );
        check!(
            got_xor == s ^ red,
            0x203,
            "SRCINVERT pixel {}: {:#x} != {:#x}",
            i,
            got_xor,
            s ^ red
        );
    }
}

fn render(v: &mut Vgpu) {
    let (w, h, pitch) = (64u32, 48u32, 512u32);
    let surf = 0x4_0000u64;
    let bg = 0xFF20_3040;
    let (rect, rect_colour) = ((8, 4, 32, 24), 0x80C0_8010);
    let (tri, tri_colour) = ([(5, 45), (60, 35), (30, 2)], 0x6000_FF00);
    let (tri2, tri2_colour) = ([(0, 0), (20, 0), (0, 20)], 0xFF0000FF);
    let cmds: [&[u32]; 5] = [
        &enc::surface_state(v.lmem_gm(surf), pitch, w, h, 0),
        &enc::fill_rect(0, 0, w, h, bg, false),
        &enc::fill_rect(rect.0, rect.1, rect.2, rect.3, rect_colour, true),
        &enc::triangle(tri, tri_colour, true),
        &enc::triangle(tri2, tri2_colour, false),
    ];
    v.run(Engine::Render, &cmds, "render");
    let reference = Image {
        base: v.scratch() + REF_RAM,
        pitch,
        w,
        h,
    };
    reference.fill_rect((0, 0, w, h), bg, false);
    reference.fill_rect(rect, rect_colour, true);
    reference.triangle(tri, tri_colour, true);
    reference.triangle(tri2, tri2_colour, false);
    let got = Image {
        base: v.aperture + surf,
        pitch,
        w,
        h,
    };
    let mut covered = 0;
    for y in 0..h {
        for x in 0..w {
            let (g, r) = (got.get(x, y), reference.get(x, y));
            check!(
                g == r,
                0x210,
                "render pixel ({}, {}): {:#x}, expected {:#x}",
                x,
                y,
                g,
                r
            );
            covered += u32::from(r != bg);
        }
    }
    check!(covered > 500, 0x211, "only {} pixels drawn", covered);
}

fn f32_at(v: &Vgpu, off: u64) -> f32 {
    f32::from_bits(lmem_read(v, off))
}

fn compute(v: &mut Vgpu) {
    // saxpy: B = s * A + B, A and B in local memory written through the aperture.
    let n = 128u32;
    let (a, b) = (0x8_0000u64, 0x8_1000u64);
    let s = -1.75f32;
    let xs = |i: u32| i as f32 * 0.37 - 11.0;
    let ys = |i: u32| 100.0 - i as f32 * 1.3;
    for i in 0..n {
        lmem_write(v, a + 4 * u64::from(i), xs(i).to_bits());
        lmem_write(v, b + 4 * u64::from(i), ys(i).to_bits());
    }
    let saxpy = enc::dispatch(enc::Dispatch {
        kernel: KERNEL_SAXPY,
        params: [n, 0, 0],
        scalar: s,
        buffers: [v.lmem_gm(a), v.lmem_gm(b), 0],
    });
    v.run(Engine::Compute, &[&saxpy], "saxpy");
    for i in 0..n {
        let want = s * xs(i) + ys(i);
        let got = f32_at(v, b + 4 * u64::from(i));
        check!(
            got.to_bits() == want.to_bits(),
            0x220,
            "saxpy[{}] = {:#x}, expected {:#x}",
            i,
            got.to_bits(),
            want.to_bits()
        );
    }

    // reduce: the sum of u32s in guest RAM (through hidden GM) into a u64 in local memory.
    let count = 1024u32;
    let mut rng = Rng::new(0xC0FFEE + v.index as u32);
    let mut want = 0u64;
    for i in 0..count {
        let x = rng.next_u32();
        want = want.wrapping_add(u64::from(x));
        ram_write(v.scratch() + REDUCE_RAM + 4 * u64::from(i), x);
    }
    let out = 0x8_2000u64;
    let reduce = enc::dispatch(enc::Dispatch {
        kernel: KERNEL_REDUCE_SUM,
        params: [count, 0, 0],
        scalar: 0.0,
        buffers: [v.scratch_gm(REDUCE_RAM), 0, v.lmem_gm(out)],
    });
    v.run(Engine::Compute, &[&reduce], "reduce");
    let got = u64::from(lmem_read(v, out)) | u64::from(lmem_read(v, out + 4)) << 32;
    check!(
        got == want,
        0x221,
        "reduce = {:#x}, expected {:#x}",
        got,
        want
    );

    // matmul: C (M x N) = A (M x K) * B (K x N), f32, row-major.
    let (m, k, nn) = (4u32, 8u32, 4u32);
    let (ma, mb, mc) = (0x9_0000u64, 0x9_1000u64, 0x9_2000u64);
    let av = |r: u32, c: u32| (r * 3 + c) as f32 * 0.125 - 2.0;
    let bv = |r: u32, c: u32| 1.5 - (r * 5 + c * 7) as f32 * 0.0625;
    for r in 0..m {
        for c in 0..k {
            lmem_write(v, ma + 4 * u64::from(r * k + c), av(r, c).to_bits());
        }
    }
    for r in 0..k {
        for c in 0..nn {
            lmem_write(v, mb + 4 * u64::from(r * nn + c), bv(r, c).to_bits());
        }
    }
    let matmul = enc::dispatch(enc::Dispatch {
        kernel: KERNEL_MATMUL,
        params: [m, k, nn],
        scalar: 0.0,
        buffers: [v.lmem_gm(ma), v.lmem_gm(mb), v.lmem_gm(mc)],
    });
    v.run(Engine::Compute, &[&matmul], "matmul");
    for r in 0..m {
        for c in 0..nn {
            let mut acc = 0.0f32;
            for i in 0..k {
                acc += av(r, i) * bv(i, c);
            }
            let got = f32_at(v, mc + 4 * u64::from(r * nn + c));
            check!(
                got.to_bits() == acc.to_bits(),
                0x222,
                "matmul C[{}][{}] = {:#x}, expected {:#x}",
                r,
                c,
                got.to_bits(),
                acc.to_bits()
            );
        }
    }
}

/// Colour bars and a box drawn by the blitter into a surface, scanned out with a flip.
fn display(v: &mut Vgpu) {
    let (w, h, pitch) = (128u32, 64u32, 512u32);
    let surf = 0x10_0000u64;
    let bars = [0x00FF_0000u32, 0x0000_FF00, 0x0000_00FF, 0x00FF_FFFF];
    let bar_w = w / bars.len() as u32;
    if v.has(Engine::Blit) {
        let mut cmds = [[0u32; 7]; 5];
        for (i, c) in bars.iter().enumerate() {
            let x = u64::from(bar_w) * i as u64;
            cmds[i] = enc::color_blt(
                ROP_PATCOPY,
                BPP_32,
                v.lmem_gm(surf + 4 * x),
                pitch,
                bar_w,
                h,
                *c,
            );
        }
        // A black box in the middle.
        let (bx, by) = (w / 2 - 8, h / 2 - 8);
        cmds[4] = enc::color_blt(
            ROP_PATCOPY,
            BPP_32,
            v.lmem_gm(surf + u64::from(by * pitch + 4 * bx)),
            pitch,
            16,
            16,
            0,
        );
        let parts: [&[u32]; 5] = [&cmds[0], &cmds[1], &cmds[2], &cmds[3], &cmds[4]];
        v.run(Engine::Blit, &parts, "test pattern");
        for y in 0..h {
            for x in 0..w {
                let in_box = (bx..bx + 16).contains(&x) && (by..by + 16).contains(&y);
                let want = if in_box {
                    0
                } else {
                    bars[(x / bar_w) as usize]
                };
                let got = lmem_read(v, surf + u64::from(y * pitch + 4 * x));
                check!(
                    got == want,
                    0x230,
                    "pattern pixel ({}, {}): {:#x}, expected {:#x}",
                    x,
                    y,
                    got,
                    want
                );
            }
        }
    }
    check!(
        w <= v.pv.max_width && h <= v.pv.max_height,
        0x233,
        "display larger than {}x{}",
        v.pv.max_width,
        v.pv.max_height
    );
    let gm = v.lmem_gm(surf);
    v.write32(regs::PLANE_FORMAT, regs::PLANE_FORMAT_XRGB8888);
    v.write32(regs::PLANE_WIDTH, w);
    v.write32(regs::PLANE_HEIGHT, h);
    v.write32(regs::PLANE_STRIDE, pitch);
    v.write32(regs::PLANE_CTL, regs::PLANE_CTL_ENABLE);
    let flips = v.read32(regs::PLANE_FLIP_COUNT);
    let vec = v.vector(MSIX_VECTOR_DEVICE);
    let seen = cpu::irq_count(vec);
    v.write32(regs::PLANE_SURF_HI, (gm >> 32) as u32);
    v.write32(regs::PLANE_SURF_LO, gm as u32);
    check!(
        cpu::wait_irq(vec, seen, WAIT_MS),
        0x231,
        "no flip-done interrupt (INTR_STATUS {:#x})",
        v.read32(regs::INTR_STATUS)
    );
    let status = v.read32(regs::INTR_STATUS);
    check!(
        status & regs::INTR_FLIP_DONE != 0 && v.read32(regs::PLANE_FLIP_COUNT) == flips + 1,
        0x232,
        "flip: INTR_STATUS {:#x}, flip count {}",
        status,
        v.read32(regs::PLANE_FLIP_COUNT)
    );
    v.write32(regs::INTR_STATUS, regs::INTR_FLIP_DONE);
}
