//! Plain reference implementations of every op over a flat image of the address space (`m[va]`
//! is the byte at `va`), written from the ABI text as directly as possible and sharing no code
//! with the fast paths. Parameters are the `vgpu_abi::cmd::enc` structs (or plain tuples).

// Test-only code on small, known-range values, written as plain index loops.
#![allow(clippy::cast_possible_truncation, clippy::needless_range_loop)]

use vgpu_abi::cmd::enc::{Copy, Csc, Dispatch};
use vgpu_abi::cmd::{CSC_NV12_TO_XRGB, KERNEL_MATMUL, KERNEL_REDUCE_SUM, KERNEL_SAXPY};

/// A render surface: address, pitch, width, height.
pub type Surf = (usize, usize, usize, usize);

/// ROP3 evaluated one bit at a time.
pub fn rop3_bits(rop: u8, p: u64, s: u64, d: u64) -> u64 {
    let mut r = 0;
    for bit in 0..64 {
        let i = ((p >> bit) & 1) * 4 + ((s >> bit) & 1) * 2 + ((d >> bit) & 1);
        r |= u64::from((rop >> i) & 1) << bit;
    }
    r
}

/// `XY_SRC_COPY_BLT` (or `XY_COLOR_BLT` with `with_src = false`: S = 0).
pub fn blit(m: &mut [u8], c: &Copy, with_src: bool) {
    let bpp = [1usize, 2, 4][c.bpp as usize];
    let (w, h) = (c.width as usize, c.height as usize);
    // The source, copied aside first.
    let mut src = vec![vec![0u8; w * bpp]; h];
    if with_src {
        for (y, row) in src.iter_mut().enumerate() {
            let o = c.src as usize + y * c.src_pitch as usize;
            row.copy_from_slice(&m[o..o + w * bpp]);
        }
    }
    let pat = c.pattern.to_le_bytes();
    for y in 0..h {
        for x in 0..w {
            for j in 0..bpp {
                let o = c.dst as usize + y * c.dst_pitch as usize + x * bpp + j;
                let (p, s, d) = (pat[j], src[y][x * bpp + j], m[o]);
                let mut r = 0u8;
                for bit in 0..8 {
                    let i = ((p >> bit) & 1) * 4 + ((s >> bit) & 1) * 2 + ((d >> bit) & 1);
                    r |= ((c.rop >> i) & 1) << bit;
                }
                m[o] = r;
            }
        }
    }
}

fn put_pixel(m: &mut [u8], o: usize, colour: u32, blend: bool) {
    if !blend {
        m[o..o + 4].copy_from_slice(&colour.to_le_bytes());
        return;
    }
    let a = colour >> 24;
    for ch in 0..3 {
        let s = (colour >> (8 * ch)) & 0xFF;
        let d = u32::from(m[o + ch]);
        m[o + ch] = ((s * a + d * (255 - a) + 127) / 255) as u8;
    }
    let da = u32::from(m[o + 3]);
    m[o + 3] = (a + (da * (255 - a) + 127) / 255) as u8;
}

/// `RENDER_FILL_RECT`: every surface pixel inside the rectangle.
pub fn fill_rect(m: &mut [u8], s: Surf, r: (u32, u32, u32, u32), colour: u32, blend: bool) {
    let (va, pitch, sw, sh) = s;
    let (x, y, w, h) = (r.0 as usize, r.1 as usize, r.2 as usize, r.3 as usize);
    for py in 0..sh {
        for px in 0..sw {
            if px >= x && px < x + w && py >= y && py < y + h {
                put_pixel(m, va + py * pitch + px * 4, colour, blend);
            }
        }
    }
}

/// `RENDER_TRIANGLE`: every surface pixel whose centre is inside, or on a top or left edge,
/// tested in floating point on half-pixel centres (exact at these magnitudes).
pub fn triangle(m: &mut [u8], s: Surf, v: [(u32, u32); 3], colour: u32, blend: bool) {
    let (va, pitch, sw, sh) = s;
    let p = v.map(|(x, y)| (f64::from(x), f64::from(y)));
    let side = |a: (f64, f64), b: (f64, f64), q: (f64, f64)| {
        (b.0 - a.0) * (q.1 - a.1) - (b.1 - a.1) * (q.0 - a.0)
    };
    if side(p[0], p[1], p[2]) == 0.0 {
        return;
    }
    // Top: horizontal with the third vertex below (y grows down). Left: not horizontal, with
    // the third vertex to the right of the edge's line at its height.
    let top_left = |a: (f64, f64), b: (f64, f64), c: (f64, f64)| {
        if a.1 == b.1 {
            c.1 > a.1
        } else {
            c.0 > a.0 + (c.1 - a.1) * (b.0 - a.0) / (b.1 - a.1)
        }
    };
    for py in 0..sh {
        for px in 0..sw {
            let q = (px as f64 + 0.5, py as f64 + 0.5);
            let inside = [(0, 1, 2), (1, 2, 0), (2, 0, 1)].iter().all(|&(i, j, k)| {
                let (sq, sc) = (side(p[i], p[j], q), side(p[i], p[j], p[k]));
                if sq == 0.0 {
                    top_left(p[i], p[j], p[k])
                } else {
                    (sq > 0.0) == (sc > 0.0)
                }
            });
            if inside {
                put_pixel(m, va + py * pitch + px * 4, colour, blend);
            }
        }
    }
}

fn clamp(v: i64) -> u8 {
    v.clamp(0, 255) as u8
}

/// `VIDEO_CSC_SCALE`.
pub fn csc(m: &mut [u8], c: &Csc) {
    let (sp, dp) = (c.src_pitch as usize, c.dst_pitch as usize);
    let ((sw, sh), (dw, dh)) = (c.src_size, c.dst_size);
    let (sw, sh, dw, dh) = (sw as usize, sh as usize, dw as usize, dh as usize);
    let (src, dst) = (c.src as usize, c.dst as usize);
    if c.mode == CSC_NV12_TO_XRGB {
        for dy in 0..dh {
            for dx in 0..dw {
                let (sx, sy) = (dx * sw / dw, dy * sh / dh);
                let y = i64::from(m[src + sy * sp + sx]);
                let uv = src + sh * sp + (sy / 2) * sp + (sx / 2) * 2;
                let (u, v) = (i64::from(m[uv]), i64::from(m[uv + 1]));
                let (cc, d, e) = (y - 16, u - 128, v - 128);
                let r = clamp((298 * cc + 409 * e + 128) >> 8);
                let g = clamp((298 * cc - 100 * d - 208 * e + 128) >> 8);
                let b = clamp((298 * cc + 516 * d + 128) >> 8);
                let o = dst + dy * dp + dx * 4;
                m[o..o + 4].copy_from_slice(&[b, g, r, 0xFF]);
            }
        }
        return;
    }
    let mut yy = vec![vec![0i64; dw]; dh];
    let mut uu = yy.clone();
    let mut vv = yy.clone();
    for dy in 0..dh {
        for dx in 0..dw {
            let o = src + (dy * sh / dh) * sp + (dx * sw / dw) * 4;
            let (b, g, r) = (i64::from(m[o]), i64::from(m[o + 1]), i64::from(m[o + 2]));
            yy[dy][dx] = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16;
            uu[dy][dx] = ((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128;
            vv[dy][dx] = ((112 * r - 94 * g - 18 * b + 128) >> 8) + 128;
        }
    }
    for dy in 0..dh {
        for dx in 0..dw {
            m[dst + dy * dp + dx] = clamp(yy[dy][dx]);
        }
    }
    for by in 0..dh / 2 {
        for bx in 0..dw / 2 {
            let avg = |c: &Vec<Vec<i64>>| {
                let (y, x) = (2 * by, 2 * bx);
                clamp((c[y][x] + c[y][x + 1] + c[y + 1][x] + c[y + 1][x + 1] + 2) >> 2)
            };
            let o = dst + dh * dp + by * dp + bx * 2;
            m[o] = avg(&uu);
            m[o + 1] = avg(&vv);
        }
    }
}

/// NaN results are stored as the canonical quiet NaN.
fn put_f32(m: &mut [u8], o: usize, v: f32) {
    let bits = if v.is_nan() { 0x7FC0_0000 } else { v.to_bits() };
    m[o..o + 4].copy_from_slice(&bits.to_le_bytes());
}

fn f32_at(m: &[u8], o: usize) -> f32 {
    f32::from_le_bytes(m[o..o + 4].try_into().unwrap())
}

/// `COMPUTE_DISPATCH`.
pub fn dispatch(m: &mut [u8], d: &Dispatch) {
    let [a, b, c] = d.buffers.map(|x| x as usize);
    let [p0, p1, p2] = d.params.map(|x| x as usize);
    match d.kernel {
        KERNEL_SAXPY => {
            let x: Vec<f32> = (0..p0).map(|i| f32_at(m, a + 4 * i)).collect();
            for (i, xv) in x.into_iter().enumerate() {
                let prod = d.scalar * xv;
                let y = prod + f32_at(m, b + 4 * i);
                put_f32(m, b + 4 * i, y);
            }
        }
        KERNEL_REDUCE_SUM => {
            let mut s = 0u64;
            for i in 0..p0 {
                s = s.wrapping_add(u64::from(u32::from_le_bytes(
                    m[a + 4 * i..a + 4 * i + 4].try_into().unwrap(),
                )));
            }
            m[c..c + 8].copy_from_slice(&s.to_le_bytes());
        }
        KERNEL_MATMUL => {
            let (mm, kk, nn) = (p0, p1, p2);
            for i in 0..mm {
                for j in 0..nn {
                    let mut acc = 0.0f32;
                    for k in 0..kk {
                        let prod =
                            f32_at(m, a + 4 * (i * kk + k)) * f32_at(m, b + 4 * (k * nn + j));
                        acc += prod;
                    }
                    put_f32(m, c + 4 * (i * nn + j), acc);
                }
            }
        }
        _ => unreachable!("unknown kernel in a reference run"),
    }
}
