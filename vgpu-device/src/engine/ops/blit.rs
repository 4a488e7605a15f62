//! Blitter ops: `XY_COLOR_BLT` and `XY_SRC_COPY_BLT`.
//!
//! A pixel is 1, 2 or 4 bytes, little-endian. Each destination pixel becomes `rop3(P, S, D)`,
//! evaluated bitwise: bit `b` of the result is bit `i = P_b * 4 + S_b * 2 + D_b` of the ROP,
//! where `P_b`, `S_b`, `D_b` are bit `b` of the pattern (the colour truncated to the pixel size,
//! the same for every pixel), the source pixel (0 for `XY_COLOR_BLT`) and the destination pixel.
//! The source is read only when the ROP depends on S, the destination only when it depends on D.
//!
//! Overlap (source and destination bounding ranges intersect, ROP depending on S): the result is
//! as if the source rectangle were copied aside first. With equal pitches this is done without a
//! copy, by walking rows in the safe direction (top-down when the destination starts at or
//! before the source, bottom-up otherwise) and reading each source row before writing its
//! destination row; with different pitches the source is copied into a host buffer.
//!
//! Paths, all bit-exact with the definition: ROPs independent of S and D fill rows with one
//! value; `SRCCOPY` copies rows host-to-host with [`Mem::copy`]; every other ROP combines whole
//! rows in `u64` chunks. All or nothing: the whole footprint is translated before any write.

use vgpu_abi::cmd::{self, ROP_SRCCOPY};

use super::{addr, split16, usize_of, ExecError, Extent, Image, OpError, OpStats};
use crate::mem::{Access, Mem};

/// Pixel size of a blit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bpp {
    /// 8 bits per pixel (`BPP_8`).
    B8,
    /// 16 bits per pixel (`BPP_16`).
    B16,
    /// 32 bits per pixel (`BPP_32`).
    B32,
}

impl Bpp {
    /// Decodes a `BPP_*` code.
    pub const fn from_code(code: u32) -> Option<Bpp> {
        match code {
            cmd::BPP_8 => Some(Bpp::B8),
            cmd::BPP_16 => Some(Bpp::B16),
            cmd::BPP_32 => Some(Bpp::B32),
            _ => None,
        }
    }

    /// Bytes per pixel.
    pub const fn bytes(self) -> u32 {
        match self {
            Bpp::B8 => 1,
            Bpp::B16 => 2,
            Bpp::B32 => 4,
        }
    }

    /// `colour` truncated to the pixel size and replicated over a `u64` (8 bytes hold a whole
    /// number of pixels, so every 8-byte chunk of a row sees the same pattern).
    fn replicate(self, colour: u32) -> u64 {
        match self {
            Bpp::B8 => u64::from(colour & 0xFF) * 0x0101_0101_0101_0101,
            Bpp::B16 => u64::from(colour & 0xFFFF) * 0x0001_0001_0001_0001,
            Bpp::B32 => u64::from(colour) * 0x0000_0001_0000_0001,
        }
    }
}

/// Whether a ROP3 depends on the source.
const fn uses_s(rop: u8) -> bool {
    ((rop >> 2) ^ rop) & 0x33 != 0
}

/// Whether a ROP3 depends on the destination.
const fn uses_d(rop: u8) -> bool {
    ((rop >> 1) ^ rop) & 0x55 != 0
}

/// The two-input function whose truth table is the low 4 bits of `t` (bit `S * 2 + D`).
fn rop2(t: u8, s: u64, d: u64) -> u64 {
    match t & 0xF {
        0x0 => 0,
        0x1 => !(s | d),
        0x2 => !s & d,
        0x3 => !s,
        0x4 => s & !d,
        0x5 => !d,
        0x6 => s ^ d,
        0x7 => !(s & d),
        0x8 => s & d,
        0x9 => !(s ^ d),
        0xA => d,
        0xB => !s | d,
        0xC => s,
        0xD => s | !d,
        0xE => s | d,
        _ => !0,
    }
}

/// ROP3 over 64 bits: the high nibble applies where P is 1, the low nibble where P is 0.
fn rop3(rop: u8, p: u64, s: u64, d: u64) -> u64 {
    (p & rop2(rop >> 4, s, d)) | (!p & rop2(rop, s, d))
}

/// What both blits share.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Blit {
    rop: u8,
    bpp: Bpp,
    dst: Image,
    /// The source, for `XY_SRC_COPY_BLT` (S = 0 without one).
    src: Option<Image>,
    pattern: u32,
}

/// `XY_COLOR_BLT`: `D = rop(P = colour, S = 0, D)` over a rectangle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColorBlt(Blit);

/// `XY_SRC_COPY_BLT`: `D = rop(P, S, D)` over a rectangle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SrcCopyBlt(Blit);

/// Decodes dw1..dw5 (ROP and bpp, pitch, address, size): ROP, bpp, destination, width, height.
fn decode_dst(p: &[u32]) -> Result<(u8, Bpp, Image, u32, u32), OpError> {
    let [dw1, pitch, lo, hi, size, ..] = *p else {
        return Err(OpError::BadParameter("short blit"));
    };
    let rop = dw1.to_le_bytes()[0];
    let bpp = Bpp::from_code((dw1 >> 8) & 3).ok_or(OpError::BadParameter("blit bpp code"))?;
    let (w, h) = split16(size);
    if w > cmd::MAX_DIM || h > cmd::MAX_DIM {
        return Err(OpError::BadParameter("blit size above MAX_DIM"));
    }
    let row_bytes = u64::from(w) * u64::from(bpp.bytes());
    let dst = Image::new(addr(lo, hi), pitch, row_bytes, u64::from(h))?;
    Ok((rop, bpp, dst, w, h))
}

impl ColorBlt {
    /// Decodes the 6 payload dwords.
    pub(super) fn decode(p: &[u32; 6]) -> Result<ColorBlt, OpError> {
        let (rop, bpp, dst, _, _) = decode_dst(p)?;
        Ok(ColorBlt(Blit {
            rop,
            bpp,
            dst,
            src: None,
            pattern: p[5],
        }))
    }

    pub(super) fn footprint(&self) -> Vec<Extent> {
        self.0.footprint()
    }

    pub(super) fn execute(&self, mem: &mut Mem<'_>) -> Result<OpStats, ExecError> {
        self.0.execute(mem)
    }
}

impl SrcCopyBlt {
    /// Decodes the 9 payload dwords.
    pub(super) fn decode(p: &[u32; 9]) -> Result<SrcCopyBlt, OpError> {
        let (rop, bpp, dst, _, _) = decode_dst(p)?;
        let src = Image::new(addr(p[6], p[7]), p[5], dst.row_bytes, dst.rows)?;
        Ok(SrcCopyBlt(Blit {
            rop,
            bpp,
            dst,
            src: Some(src),
            pattern: p[8],
        }))
    }

    pub(super) fn footprint(&self) -> Vec<Extent> {
        self.0.footprint()
    }

    pub(super) fn execute(&self, mem: &mut Mem<'_>) -> Result<OpStats, ExecError> {
        self.0.execute(mem)
    }
}

/// Where source rows come from.
enum SrcRows {
    /// S = 0.
    Zero,
    /// Read from memory when needed.
    Mem(Image),
    /// A copy taken before any write (overlap with different pitches): rows of `row_bytes`.
    Aside(Vec<u8>),
}

impl Blit {
    /// The source when the ROP reads it.
    fn read_src(&self) -> Option<Image> {
        self.src.filter(|s| uses_s(self.rop) && !s.is_empty())
    }

    fn footprint(&self) -> Vec<Extent> {
        let mut v = Vec::new();
        if self.dst.is_empty() {
            return v;
        }
        v.extend(self.read_src().and_then(|s| s.extent(Access::Read)));
        if uses_d(self.rop) {
            v.extend(self.dst.extent(Access::Read));
        }
        v.extend(self.dst.extent(Access::Write));
        v
    }

    fn execute(&self, mem: &mut Mem<'_>) -> Result<OpStats, ExecError> {
        let dst = self.dst;
        if dst.is_empty() {
            return Ok(OpStats::default());
        }
        let src = self.read_src();
        if let Some(s) = src {
            s.validate(mem, Access::Read)?;
        }
        // A page translated for writing is readable too.
        dst.validate(mem, Access::Write)?;
        let pat = self.bpp.replicate(self.pattern);
        if src.is_none() && !uses_d(self.rop) {
            return fill(mem, dst, rop3(self.rop, pat, 0, 0));
        }
        let overlap = src.is_some_and(|s| s.overlaps(&dst));
        // Bottom-up only for an equal-pitch overlap with the destination after the source.
        let backwards = overlap && src.is_some_and(|s| s.pitch == dst.pitch && dst.va > s.va);
        let mut stats = OpStats::default();
        let rows = match src {
            None => SrcRows::Zero,
            Some(s) if overlap && s.pitch != dst.pitch => {
                let mut buf = Vec::new();
                let n = usize_of(s.rows * s.row_bytes);
                buf.try_reserve_exact(n)
                    .map_err(|_| ExecError::OutOfMemory)?;
                buf.resize(n, 0);
                for (r, chunk) in (0..s.rows).zip(buf.chunks_exact_mut(usize_of(s.row_bytes))) {
                    mem.read(s.row(r), chunk)?;
                }
                stats.bytes_read += s.rows * s.row_bytes;
                SrcRows::Aside(buf)
            }
            Some(s) => SrcRows::Mem(s),
        };
        if let SrcRows::Mem(s) = rows {
            // Row copies are safe when no source row overlaps its own destination row (rows are
            // walked in the safe direction above).
            let apart = s.va.raw().abs_diff(dst.va.raw()) >= dst.row_bytes;
            if self.rop == ROP_SRCCOPY && (!overlap || apart) {
                return copy(mem, dst, s, overlap, backwards);
            }
        }
        self.combine_rows(mem, &rows, pat, backwards, stats)
    }

    /// The generic path: per row, read S and D, combine in `u64` chunks, write D.
    fn combine_rows(
        &self,
        mem: &mut Mem<'_>,
        src: &SrcRows,
        pat: u64,
        backwards: bool,
        mut stats: OpStats,
    ) -> Result<OpStats, ExecError> {
        let dst = self.dst;
        let rb = usize_of(dst.row_bytes);
        // Padded to whole u64 chunks; the padding is never written back.
        let padded = rb.div_ceil(8) * 8;
        let mut sbuf = vec![0u8; padded];
        let mut dbuf = vec![0u8; padded];
        let read_d = uses_d(self.rop);
        for i in 0..dst.rows {
            let r = if backwards { dst.rows - 1 - i } else { i };
            match src {
                SrcRows::Zero => {}
                SrcRows::Mem(s) => {
                    mem.read(s.row(r), &mut sbuf[..rb])?;
                    stats.bytes_read += dst.row_bytes;
                }
                SrcRows::Aside(buf) => {
                    let off = usize_of(r) * rb;
                    if let Some(row) = buf.get(off..off + rb) {
                        sbuf[..rb].copy_from_slice(row);
                    }
                }
            }
            if read_d {
                mem.read(dst.row(r), &mut dbuf[..rb])?;
                stats.bytes_read += dst.row_bytes;
            }
            if self.rop == ROP_SRCCOPY {
                dbuf.copy_from_slice(&sbuf);
            } else {
                for (d, s) in dbuf.chunks_exact_mut(8).zip(sbuf.chunks_exact(8)) {
                    let (mut dv, mut sv) = ([0u8; 8], [0u8; 8]);
                    dv.copy_from_slice(d);
                    sv.copy_from_slice(s);
                    let v = rop3(
                        self.rop,
                        pat,
                        u64::from_le_bytes(sv),
                        u64::from_le_bytes(dv),
                    );
                    d.copy_from_slice(&v.to_le_bytes());
                }
            }
            mem.write(dst.row(r), &dbuf[..rb])?;
            stats.bytes_written += dst.row_bytes;
        }
        Ok(stats)
    }
}

/// Fills every row of `dst` with the replicated 8-byte `value`.
fn fill(mem: &mut Mem<'_>, dst: Image, value: u64) -> Result<OpStats, ExecError> {
    let bytes = value.to_le_bytes();
    let uniform = bytes.iter().all(|&b| b == bytes[0]);
    let row: Vec<u8> = if uniform {
        Vec::new()
    } else {
        bytes
            .iter()
            .copied()
            .cycle()
            .take(usize_of(dst.row_bytes))
            .collect()
    };
    for r in 0..dst.rows {
        if uniform {
            mem.fill(dst.row(r), dst.row_bytes, bytes[0])?;
        } else {
            mem.write(dst.row(r), &row)?;
        }
    }
    Ok(OpStats {
        bytes_read: 0,
        bytes_written: dst.rows * dst.row_bytes,
    })
}

/// `SRCCOPY`: host-to-host row copies, in the given direction (one copy when both images are
/// dense and do not overlap).
fn copy(
    mem: &mut Mem<'_>,
    dst: Image,
    src: Image,
    overlap: bool,
    backwards: bool,
) -> Result<OpStats, ExecError> {
    let total = dst.rows * dst.row_bytes;
    if !overlap && dst.pitch == dst.row_bytes && src.pitch == src.row_bytes {
        mem.copy(dst.va, src.va, total)?;
    } else {
        for i in 0..dst.rows {
            let r = if backwards { dst.rows - 1 - i } else { i };
            mem.copy(dst.row(r), src.row(r), dst.row_bytes)?;
        }
    }
    Ok(OpStats {
        bytes_read: total,
        bytes_written: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ops::reference;

    #[test]
    fn test_rop3_matches_bitwise_definition_for_all_rops() {
        let (p, s, d) = (
            0xF0F0_CCCC_AAAA_1234u64,
            0xFF00_F0F0_CCCC_5678,
            0xAAAA_FF00_F0F0_9ABC,
        );
        for rop in 0..=255u8 {
            let want = reference::rop3_bits(rop, p, s, d);
            assert_eq!(rop3(rop, p, s, d), want, "rop {rop:#x}");
            assert_eq!(
                uses_s(rop),
                (0..8).any(|i| (rop >> i) & 1 != (rop >> (i ^ 2)) & 1)
            );
            assert_eq!(
                uses_d(rop),
                (0..8).any(|i| (rop >> i) & 1 != (rop >> (i ^ 1)) & 1)
            );
        }
    }

    #[test]
    fn test_replicate_truncates_to_bpp() {
        assert_eq!(Bpp::B8.replicate(0x1234_5678), 0x7878_7878_7878_7878);
        assert_eq!(Bpp::B16.replicate(0x1234_5678), 0x5678_5678_5678_5678);
        assert_eq!(Bpp::B32.replicate(0x1234_5678), 0x1234_5678_1234_5678);
    }
}
