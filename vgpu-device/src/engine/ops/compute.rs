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
//! a kernel does not use are ignored. All or nothing: every buffer is translated before the
//! first write.
//!
//! Guest memory is shared with the guest, which may write it at any time, so the kernels never
//! compute on it in place: operands are copied into host buffers in bulk (one copy per page,
//! through [`Mem`]), computed there, and results copied back the same way. The buffers are
//! bounded whatever the sizes: `saxpy` and `reduce` stream [`STAGE`] elements at a time;
//! `matmul` works on tiles of at most [`CHUNK`] elements of A, of B and of C.

use vgpu_abi::cmd::{self, KERNEL_MATMUL, KERNEL_REDUCE_SUM, KERNEL_SAXPY};
use vgpu_abi::PAGE_SIZE;

use super::{addr, usize_of, ExecError, Extent, Image, OpError, OpStats};
use crate::addr::GpuVa;
use crate::mem::{Access, Fault, HostSpan, Mem};

/// Elements per `matmul` tile (of A, of B, and of accumulated C).
const CHUNK: u64 = 16 * 1024;
/// Most columns of a `matmul` tile.
const TILE_COLS: u64 = 1024;
/// Elements per staging buffer of `saxpy` and `reduce`: one page of dwords. Whole-page copies
/// are the host's fastest, and the buffers stay in the first-level cache (measured: half or
/// twice this size is markedly slower).
const STAGE: u64 = PAGE_SIZE / 4;

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
fn stored(v: f32) -> u32 {
    if v.is_nan() {
        CANONICAL_NAN
    } else {
        v.to_bits()
    }
}

/// The quiet NaN stored for every NaN result.
pub const CANONICAL_NAN: u32 = 0x7FC0_0000;

/// The bytes of `words`.
fn bytes(words: &[u32]) -> &[u8] {
    // SAFETY: `u32` has no padding bytes and `u8` no alignment requirement; the view covers
    // exactly the slice's memory and borrows it for as long as the slice.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), std::mem::size_of_val(words)) }
}

/// The bytes of `words`, writable.
fn bytes_mut(words: &mut [u32]) -> &mut [u8] {
    let len = std::mem::size_of_val(words);
    // SAFETY: as in `bytes`; moreover every byte pattern is a valid `u32`, and the view
    // borrows the slice mutably, so nothing else sees it while it is written.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), len) }
}

/// Reads `out.len()` little-endian dwords at `va`: one bulk copy per page from guest memory
/// straight into `out` (no element-by-element access to shared memory), then a byte-order
/// fix-up that compiles to nothing on little-endian hosts.
fn read_words(mem: &mut Mem<'_>, va: GpuVa, out: &mut [u32]) -> Result<(), Fault> {
    mem.read(va, bytes_mut(out))?;
    out.iter_mut().for_each(|w| *w = u32::from_le(*w));
    Ok(())
}

/// Writes `words` as little-endian dwords at `va` (one bulk copy per page); `words` is left in
/// little-endian order.
fn write_words(mem: &mut Mem<'_>, va: GpuVa, words: &mut [u32]) -> Result<(), Fault> {
    words.iter_mut().for_each(|w| *w = w.to_le());
    mem.write(va, bytes(words))
}

/// Reads `buf.len()` little-endian dwords at `va` into `buf`, lets `f` update them and writes
/// them back, reading and writing each page through one write translation (collected in
/// `spans`, reused between calls). Bulk copies per page, as [`read_words`].
fn update_words(
    mem: &mut Mem<'_>,
    va: GpuVa,
    buf: &mut [u32],
    spans: &mut Vec<(usize, HostSpan)>,
    f: impl FnOnce(&mut [u32]),
) -> Result<(), Fault> {
    spans.clear();
    let len = std::mem::size_of_val(buf) as u64;
    mem.spans(va, len, Access::Write, |off, span| spans.push((off, span)))?;
    let raw = bytes_mut(buf);
    for (off, span) in spans.iter() {
        span.read_into(&mut raw[*off..*off + span.len()]);
    }
    buf.iter_mut().for_each(|w| *w = u32::from_le(*w));
    f(buf);
    buf.iter_mut().for_each(|w| *w = w.to_le());
    let raw = bytes(buf);
    for (off, span) in spans.iter() {
        span.write_from(&raw[*off..*off + span.len()]);
    }
    Ok(())
}

/// Element ranges `(start, count)` covering `0..n` in order, at most [`STAGE`] elements each;
/// the first is cut short so that the others start less than 4 bytes before a page boundary
/// of `va`, which makes each staged copy one page-sized copy (plus at most 3 bytes).
fn stages(va: GpuVa, n: u64) -> impl Iterator<Item = (u64, u64)> {
    let head = (PAGE_SIZE - va.page_offset()) % PAGE_SIZE / 4;
    let mut i0 = 0;
    std::iter::from_fn(move || {
        let cap = if i0 == 0 && head > 0 { head } else { STAGE };
        let len = (n - i0).min(cap);
        let range = (i0, len);
        i0 += len;
        (len > 0).then_some(range)
    })
}

/// Staged a page at a time: x is copied in (unless in place), then y is copied in, updated in
/// the buffer and copied back.
fn saxpy(mem: &mut Mem<'_>, x: Image, y: Image, n: u64, s: f32) -> Result<OpStats, ExecError> {
    let same = x.va == y.va;
    let stage = usize_of(STAGE.min(n));
    let (mut xb, mut yb) = (vec![0u32; if same { 0 } else { stage }], vec![0u32; stage]);
    let mut spans = Vec::with_capacity(2);
    let mut stats = OpStats::default();
    for (i0, len) in stages(y.va, n) {
        let ys = &mut yb[..usize_of(len)];
        if same {
            update_words(mem, y.va.add(i0 * 4), ys, &mut spans, |ys| {
                for v in ys {
                    let yv = f32::from_bits(*v);
                    let prod = s * yv;
                    *v = stored(prod + yv);
                }
            })?;
            stats.bytes_read += len * 4;
        } else {
            let xs = &mut xb[..ys.len()];
            read_words(mem, x.va.add(i0 * 4), xs)?;
            update_words(mem, y.va.add(i0 * 4), ys, &mut spans, |ys| {
                for (v, &xv) in ys.iter_mut().zip(xs.iter()) {
                    let prod = s * f32::from_bits(xv);
                    *v = stored(prod + f32::from_bits(*v));
                }
            })?;
            stats.bytes_read += 2 * len * 4;
        }
        stats.bytes_written += len * 4;
    }
    Ok(stats)
}

/// Staged a page at a time.
fn reduce(mem: &mut Mem<'_>, a: Image, c: Image, n: u64) -> Result<OpStats, ExecError> {
    let mut buf = vec![0u32; usize_of(STAGE.min(n))];
    let mut sum = 0u64;
    for (i0, len) in stages(a.va, n) {
        let words = &mut buf[..usize_of(len)];
        read_words(mem, a.va.add(i0 * 4), words)?;
        sum = words.iter().fold(sum, |s, &v| s.wrapping_add(u64::from(v)));
    }
    mem.write(c.va, &sum.to_le_bytes())?;
    Ok(OpStats {
        bytes_read: n * 4,
        bytes_written: 8,
    })
}

/// Tile sizes of a `matmul` (rows of A and C, columns of A and rows of B, columns of B and
/// C): the A tile, the B tile and the accumulators hold at most [`CHUNK`] elements each. At
/// most [`TILE_COLS`] columns, so that a tile has several rows even when N is large.
fn tiles(m: u64, k: u64, n: u64) -> [u64; 3] {
    let nc = n.clamp(1, TILE_COLS);
    let kc = k.min(CHUNK / nc).max(1);
    let mb = m.min(CHUNK / nc.max(kc)).max(1);
    [mb, kc, nc]
}

/// Reads rows of `cols` dwords into `out` (`out.len() / cols` rows), row `r` at
/// `va + r * pitch` bytes; one bulk read when the rows are back to back.
fn read_rows(
    mem: &mut Mem<'_>,
    va: GpuVa,
    pitch: u64,
    cols: u64,
    out: &mut [u32],
) -> Result<(), Fault> {
    if pitch == cols * 4 {
        return read_words(mem, va, out);
    }
    for (r, dst) in (0u64..).zip(out.chunks_exact_mut(usize_of(cols))) {
        read_words(mem, va.add(r * pitch), dst)?;
    }
    Ok(())
}

/// Writes rows of `cols` dwords from `words` (`words.len() / cols` rows), row `r` at
/// `va + r * pitch` bytes; one bulk write when the rows are back to back.
fn write_rows(
    mem: &mut Mem<'_>,
    va: GpuVa,
    pitch: u64,
    cols: u64,
    words: &mut [u32],
) -> Result<(), Fault> {
    if pitch == cols * 4 {
        return write_words(mem, va, words);
    }
    for (r, src) in (0u64..).zip(words.chunks_exact_mut(usize_of(cols))) {
        write_words(mem, va.add(r * pitch), src)?;
    }
    Ok(())
}

/// Tiled: C is computed an `mb x nc` tile at a time, accumulated in host memory over tiles of
/// A (`mb x kc`) and B (`kc x nc`) copied in with ascending k, so each B tile serves `mb` rows
/// and every sum still adds its products in ascending k, one rounded multiply and one rounded
/// add at a time.
fn matmul(mem: &mut Mem<'_>, bufs: [Image; 3], dims: [u64; 3]) -> Result<OpStats, ExecError> {
    let ([a, b, c], [m, k, n]) = (bufs, dims);
    let mut stats = OpStats::default();
    if m == 0 || n == 0 {
        return Ok(stats);
    }
    let [mb_max, kc_max, nc_max] = tiles(m, k, n);
    let mut at = vec![0u32; usize_of(mb_max * kc_max)];
    let mut bt = vec![0u32; usize_of(kc_max * nc_max)];
    let mut acc = vec![0f32; usize_of(mb_max * nc_max)];
    let mut ct = vec![0u32; usize_of(mb_max * nc_max)];
    let mut strip = vec![[0f32; NR]; usize_of(kc_max.min(STRIP))];
    for m0 in (0..m).step_by(usize_of(mb_max)) {
        let mb = (m - m0).min(mb_max);
        for n0 in (0..n).step_by(usize_of(nc_max)) {
            let nc = (n - n0).min(nc_max);
            let acc = &mut acc[..usize_of(mb * nc)];
            acc.fill(0.0);
            for k0 in (0..k).step_by(usize_of(kc_max)) {
                let kc = (k - k0).min(kc_max);
                let at = &mut at[..usize_of(mb * kc)];
                read_rows(mem, a.va.add((m0 * k + k0) * 4), k * 4, kc, at)?;
                let bt = &mut bt[..usize_of(kc * nc)];
                read_rows(mem, b.va.add((k0 * n + n0) * 4), n * 4, nc, bt)?;
                stats.bytes_read += (mb * kc + kc * nc) * 4;
                multiply_add_tile(acc, at, bt, usize_of(nc), &mut strip);
            }
            let ct = &mut ct[..acc.len()];
            for (o, &v) in ct.iter_mut().zip(acc.iter()) {
                *o = stored(v);
            }
            write_rows(mem, c.va.add((m0 * n + n0) * 4), n * 4, nc, ct)?;
            stats.bytes_written += mb * nc * 4;
        }
    }
    Ok(stats)
}

/// Rows of C in one register block of [`multiply_add_tile`].
const MR: usize = 4;
/// Columns of C in one register block of [`multiply_add_tile`].
const NR: usize = 8;
/// Most rows of B in one packed strip of [`multiply_add_tile`].
const STRIP: u64 = 256;

/// `acc[r][j] += a[r][kk] * b[kk][j]` for every `kk` of the tile in ascending order, each a
/// rounded multiply then a rounded add: `acc` is `mb x nc`, `a` (f32 bits) `mb x kc`, `b` (f32
/// bits) `kc x nc`, all row-major. `NR` columns of B at a time are packed into `strip` (up to
/// `strip.len()` rows), and blocks of `MR x NR` outputs are kept in registers while they run
/// through it; the order of every sum is unchanged. The edges go one output row at a time.
fn multiply_add_tile(acc: &mut [f32], a: &[u32], b: &[u32], nc: usize, strip: &mut [[f32; NR]]) {
    let mb = acc.len() / nc;
    let kc = b.len() / nc;
    let (full_rows, full_cols) = (mb - mb % MR, nc - nc % NR);
    for j0 in (0..full_cols).step_by(NR) {
        for k0 in (0..kc).step_by(strip.len()) {
            let kn = (kc - k0).min(strip.len());
            let strip = &mut strip[..kn];
            for (dst, brow) in strip.iter_mut().zip(b[k0 * nc..].chunks_exact(nc)) {
                *dst = std::array::from_fn(|l| f32::from_bits(brow[j0 + l]));
            }
            for r0 in (0..full_rows).step_by(MR) {
                let arows: [&[u32]; MR] = std::array::from_fn(|r| &a[(r0 + r) * kc + k0..][..kn]);
                let mut c = [[0f32; NR]; MR];
                for (r, cr) in c.iter_mut().enumerate() {
                    cr.copy_from_slice(&acc[(r0 + r) * nc + j0..][..NR]);
                }
                for (kk, bv) in strip.iter().enumerate() {
                    for (cr, arow) in c.iter_mut().zip(&arows) {
                        let av = f32::from_bits(arow[kk]);
                        for (s, &bl) in cr.iter_mut().zip(bv) {
                            let prod = av * bl;
                            *s += prod;
                        }
                    }
                }
                for (r, cr) in c.iter().enumerate() {
                    acc[(r0 + r) * nc + j0..][..NR].copy_from_slice(cr);
                }
            }
        }
    }
    // The edges: the last `nc % NR` columns of the blocked rows, then the last `mb % MR` rows.
    for r in 0..mb {
        let cols = if r < full_rows { full_cols } else { 0 };
        let crow = &mut acc[r * nc + cols..(r + 1) * nc];
        if crow.is_empty() {
            continue;
        }
        for (&av, brow) in a[r * kc..(r + 1) * kc].iter().zip(b.chunks_exact(nc)) {
            let av = f32::from_bits(av);
            for (s, &bv) in crow.iter_mut().zip(&brow[cols..]) {
                let prod = av * f32::from_bits(bv);
                *s += prod;
            }
        }
    }
}
