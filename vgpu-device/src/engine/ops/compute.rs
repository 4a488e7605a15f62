//! Compute op: `COMPUTE_DISPATCH` of the fixed kernels.
//!
//! Elements are little-endian and need no alignment. Kernels:
//! - `saxpy`: `B[i] = scalar * A[i] + B[i]` for `i < p0 <= MAX_ELEMENTS`, f32, a rounded
//!   multiply then a rounded add (never a fused multiply-add). `p0 = 0` is a no-op. A and B must
//!   be the same buffer or disjoint.
//! - `reduce`: the u64 at C = wrapping sum of the u32 `A[i]`, `i < p0 <= MAX_ELEMENTS`; `p0 = 0`
//!   stores 0. A is read completely before C is written, so they may overlap.
//! - `matmul`: `C[m][n] = sum_k A[m][k] * B[k][n]`, f32 row-major, M = p0, K = p1, N = p2,
//!   accumulated from 0.0 in ascending k with a rounded multiply then a rounded add. The size
//!   limit is `M * max(K, 1) * N <= MAX_MATMUL_OPS` (so `K = 0`, which stores zeros, is bounded
//!   too); `M = 0` or `N = 0` is a no-op. C must not overlap A or B.
//!
//! A NaN result is stored as the canonical quiet NaN `0x7FC0_0000` (IEEE 754 and Rust leave NaN
//! payloads open; every other result is bit-exact by IEEE 754 rounding). Parameters and buffers
//! a kernel does not use are ignored. Work is done in chunks of at most
//! [`CHUNK`] elements, so host memory stays bounded whatever the sizes. All or nothing: every
//! buffer is translated before the first write.

use vgpu_abi::cmd::{self, KERNEL_MATMUL, KERNEL_REDUCE_SUM, KERNEL_SAXPY};

use super::{addr, usize_of, ExecError, Extent, Image, OpError, OpStats};
use crate::mem::{Access, Mem};

/// Elements per chunk.
const CHUNK: u64 = 16 * 1024;

/// A kernel and its arguments.
#[derive(Clone, Debug, PartialEq)]
pub enum Kernel {
    /// `saxpy` over `n` elements: `y = a * x + y`.
    Saxpy {
        /// Element count.
        n: u32,
        /// The scalar.
        a: f32,
    },
    /// `reduce` of `n` elements.
    ReduceSum {
        /// Element count.
        n: u32,
    },
    /// `matmul` of an `m x k` by a `k x n` matrix.
    Matmul {
        /// Rows of A and C.
        m: u32,
        /// Columns of A, rows of B.
        k: u32,
        /// Columns of B and C.
        n: u32,
    },
}

/// `COMPUTE_DISPATCH`.
#[derive(Clone, Debug, PartialEq)]
pub struct Dispatch {
    kernel: Kernel,
    /// Buffers A, B, C as the kernel uses them (each a one-row image; unused ones empty).
    bufs: [Image; 3],
}

/// A one-row image of `bytes` bytes at the buffer address `(lo, hi)`.
fn buffer(lo: u32, hi: u32, bytes: u64) -> Result<Image, OpError> {
    let (pitch, rows) = if bytes == 0 { (0, 0) } else { (bytes, 1) };
    let img = Image {
        va: addr(lo, hi),
        pitch,
        row_bytes: bytes,
        rows,
    };
    img.va
        .checked_add(bytes)
        .ok_or(OpError::BadParameter("buffer address overflow"))?;
    Ok(img)
}

impl Dispatch {
    /// The kernel.
    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    pub(super) fn decode(p: &[u32; 11]) -> Result<Dispatch, OpError> {
        let [kernel, p0, p1, p2, scalar, alo, ahi, blo, bhi, clo, chi] = *p;
        let too_many = OpError::BadParameter("kernel size above the limit");
        let overlap = OpError::BadParameter("kernel buffers overlap");
        match kernel {
            KERNEL_SAXPY => {
                if p0 > cmd::MAX_ELEMENTS {
                    return Err(too_many);
                }
                let bytes = u64::from(p0) * 4;
                let (a, b) = (buffer(alo, ahi, bytes)?, buffer(blo, bhi, bytes)?);
                if a.overlaps(&b) && a.va != b.va {
                    return Err(overlap);
                }
                let kernel = Kernel::Saxpy {
                    n: p0,
                    a: f32::from_bits(scalar),
                };
                Ok(Dispatch {
                    kernel,
                    bufs: [a, b, buffer(clo, chi, 0)?],
                })
            }
            KERNEL_REDUCE_SUM => {
                if p0 > cmd::MAX_ELEMENTS {
                    return Err(too_many);
                }
                let a = buffer(alo, ahi, u64::from(p0) * 4)?;
                let c = buffer(clo, chi, 8)?;
                Ok(Dispatch {
                    kernel: Kernel::ReduceSum { n: p0 },
                    bufs: [a, buffer(blo, bhi, 0)?, c],
                })
            }
            KERNEL_MATMUL => {
                let (m, k, n) = (u64::from(p0), u64::from(p1), u64::from(p2));
                let ops = m.checked_mul(k.max(1)).and_then(|v| v.checked_mul(n));
                if ops.is_none_or(|v| v > cmd::MAX_MATMUL_OPS) {
                    return Err(too_many);
                }
                let (mut ab, mut bb) = (m * k * 4, k * n * 4);
                if m == 0 || n == 0 {
                    (ab, bb) = (0, 0);
                }
                let (a, b) = (buffer(alo, ahi, ab)?, buffer(blo, bhi, bb)?);
                let c = buffer(clo, chi, m * n * 4)?;
                if c.overlaps(&a) || c.overlaps(&b) {
                    return Err(overlap);
                }
                Ok(Dispatch {
                    kernel: Kernel::Matmul {
                        m: p0,
                        k: p1,
                        n: p2,
                    },
                    bufs: [a, b, c],
                })
            }
            _ => Err(OpError::BadParameter("unknown kernel")),
        }
    }

    pub(super) fn footprint(&self) -> Vec<Extent> {
        let [a, b, c] = self.bufs;
        let mut v: Vec<Extent> = Vec::new();
        v.extend(a.extent(Access::Read));
        v.extend(b.extent(Access::Read));
        if let Kernel::Saxpy { .. } = self.kernel {
            v.extend(b.extent(Access::Write));
        }
        v.extend(c.extent(Access::Write));
        v
    }

    pub(super) fn execute(&self, mem: &mut Mem<'_>) -> Result<OpStats, ExecError> {
        let [a, b, c] = self.bufs;
        a.validate(mem, Access::Read)?;
        match self.kernel {
            Kernel::Saxpy { .. } => b.validate(mem, Access::Write)?,
            _ => b.validate(mem, Access::Read)?,
        }
        c.validate(mem, Access::Write)?;
        match self.kernel {
            Kernel::Saxpy { n, a: s } => saxpy(mem, a, b, u64::from(n), s),
            Kernel::ReduceSum { n } => reduce(mem, a, c, u64::from(n)),
            Kernel::Matmul { m, k, n } => matmul(mem, [a, b, c], [m, k, n].map(u64::from)),
        }
    }
}

/// The bits stored for an f32 result: NaNs canonical.
fn stored(v: f32) -> [u8; 4] {
    let bits = if v.is_nan() {
        CANONICAL_NAN
    } else {
        v.to_bits()
    };
    bits.to_le_bytes()
}

/// The quiet NaN stored for every NaN result.
pub const CANONICAL_NAN: u32 = 0x7FC0_0000;

fn f32s(bytes: &[u8], out: &mut Vec<f32>) {
    out.clear();
    out.extend(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    );
}

fn saxpy(mem: &mut Mem<'_>, x: Image, y: Image, n: u64, s: f32) -> Result<OpStats, ExecError> {
    let same = x.va == y.va;
    let (mut xb, mut yb) = (
        vec![0u8; usize_of(CHUNK * 4)],
        vec![0u8; usize_of(CHUNK * 4)],
    );
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    let mut stats = OpStats::default();
    for i0 in (0..n).step_by(usize_of(CHUNK)) {
        let bytes = (n - i0).min(CHUNK) * 4;
        let len = usize_of(bytes);
        mem.read(y.va.add(i0 * 4), &mut yb[..len])?;
        f32s(&yb[..len], &mut ys);
        if same {
            xs.clone_from(&ys);
            stats.bytes_read += bytes;
        } else {
            mem.read(x.va.add(i0 * 4), &mut xb[..len])?;
            f32s(&xb[..len], &mut xs);
            stats.bytes_read += 2 * bytes;
        }
        for ((out, &xv), &yv) in yb.chunks_exact_mut(4).zip(&xs).zip(&ys) {
            let prod = s * xv;
            out.copy_from_slice(&stored(prod + yv));
        }
        mem.write(y.va.add(i0 * 4), &yb[..len])?;
        stats.bytes_written += bytes;
    }
    Ok(stats)
}

fn reduce(mem: &mut Mem<'_>, a: Image, c: Image, n: u64) -> Result<OpStats, ExecError> {
    let mut buf = vec![0u8; usize_of(CHUNK * 4)];
    let mut sum = 0u64;
    for i0 in (0..n).step_by(usize_of(CHUNK)) {
        let len = usize_of((n - i0).min(CHUNK) * 4);
        mem.read(a.va.add(i0 * 4), &mut buf[..len])?;
        for e in buf[..len].chunks_exact(4) {
            sum = sum.wrapping_add(u64::from(u32::from_le_bytes([e[0], e[1], e[2], e[3]])));
        }
    }
    mem.write(c.va, &sum.to_le_bytes())?;
    Ok(OpStats {
        bytes_read: n * 4,
        bytes_written: 8,
    })
}

/// Row by row of C, in column blocks of at most `CHUNK`; for each block, A's row and B's rows
/// are streamed in chunks of `CHUNK` elements (B's rows in one read when a block spans all N).
fn matmul(mem: &mut Mem<'_>, bufs: [Image; 3], dims: [u64; 3]) -> Result<OpStats, ExecError> {
    let ([a, b, c], [m, k, n]) = (bufs, dims);
    let nc_max = n.min(CHUNK);
    let kc_max = (CHUNK / nc_max.max(1)).max(1);
    let mut bytes = vec![0u8; usize_of(CHUNK * 4)];
    let (mut arow, mut bblk) = (Vec::new(), Vec::new());
    let mut acc = Vec::new();
    let mut stats = OpStats::default();
    for mi in 0..m {
        for n0 in (0..n).step_by(usize_of(CHUNK)) {
            let nc = (n - n0).min(CHUNK);
            acc.clear();
            acc.resize(usize_of(nc), 0.0f32);
            for k0 in (0..k).step_by(usize_of(kc_max)) {
                let kc = (k - k0).min(kc_max);
                let len = usize_of(kc * 4);
                mem.read(a.va.add((mi * k + k0) * 4), &mut bytes[..len])?;
                f32s(&bytes[..len], &mut arow);
                let blen = usize_of(kc * nc * 4);
                if nc == n {
                    mem.read(b.va.add(k0 * n * 4), &mut bytes[..blen])?;
                } else {
                    let row = usize_of(nc * 4);
                    for (kk, dst) in (k0..k0 + kc).zip(bytes[..blen].chunks_exact_mut(row)) {
                        mem.read(b.va.add((kk * n + n0) * 4), dst)?;
                    }
                }
                f32s(&bytes[..blen], &mut bblk);
                stats.bytes_read += (kc + kc * nc) * 4;
                for (&av, brow) in arow.iter().zip(bblk.chunks_exact(usize_of(nc))) {
                    for (s, &bv) in acc.iter_mut().zip(brow) {
                        let prod = av * bv;
                        *s += prod;
                    }
                }
            }
            let out = &mut bytes[..usize_of(nc * 4)];
            for (o, v) in out.chunks_exact_mut(4).zip(&acc) {
                o.copy_from_slice(&stored(*v));
            }
            mem.write(c.va.add((mi * n + n0) * 4), out)?;
            stats.bytes_written += nc * 4;
        }
    }
    Ok(stats)
}
