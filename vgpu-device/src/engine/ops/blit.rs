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
//! All or nothing: every page of the footprint is translated once, into a [`RowMap`], before
//! any write (entries removed after the scan fault here); the rows are then processed page
//! span by page span without translating again. Paths, all bit-exact with the definition:
//! ROPs independent of S and D store the pattern straight into the destination spans; other
//! ROPs without S update the destination in place, 8 bytes at a time; with S, `SRCCOPY` copies
//! span to span and other ROPs combine span to span, unless a source row overlaps its own
//! destination row (then through row buffers). Back-to-back rows (pitch = row size) are
//! processed as one row when the order of rows does not matter.

use vgpu_abi::cmd::{self, ROP_SRCCOPY};

use super::{addr, split16, usize_of, ExecError, Extent, Image, OpError, OpStats};
use crate::mem::{Access, Mem, RowMap, Rows};

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

/// A ROP3 with its pattern bound, as one mask per minterm of (S, D): where the source bit is
/// `s` and the destination bit `d`, the result bit is that of mask `s * 2 + d`, itself the ROP's
/// bit `4 + s * 2 + d` where the pattern bit is 1 and bit `s * 2 + d` where it is 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PatRop([u64; 4]);

impl PatRop {
    /// `rop` with the 8-byte pattern `p` (bytes in memory order, little-endian).
    fn new(rop: u8, p: u64) -> PatRop {
        // All ones where bit `i` of the ROP is set.
        let all = |i: usize| 0u64.wrapping_sub(u64::from((rop >> i) & 1));
        PatRop(std::array::from_fn(|i| (p & all(4 + i)) | (!p & all(i))))
    }

    /// The same for memory starting `off` bytes into a row (the pattern repeats every 8 bytes
    /// from the row's start): the masks rotated by `off % 8` bytes.
    fn at(self, off: usize) -> PatRop {
        let bits = u32::try_from(off % 8).unwrap_or(0) * 8;
        PatRop(self.0.map(|m| m.rotate_right(bits)))
    }

    /// The result for 64 bits of S and D.
    #[inline(always)]
    fn apply(&self, s: u64, d: u64) -> u64 {
        let [m0, m1, m2, m3] = self.0;
        (m0 & !s & !d) | (m1 & !s & d) | (m2 & s & !d) | (m3 & s & d)
    }
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

/// The rows of an image.
fn rows_of(img: &Image) -> Rows {
    Rows {
        va: img.va,
        pitch: img.pitch,
        len: img.row_bytes,
        count: img.rows,
    }
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
        let total = dst.rows * dst.row_bytes;
        let rop = PatRop::new(self.rop, self.bpp.replicate(self.pattern));
        let read_d = uses_d(self.rop);
        let Some(src) = self.read_src() else {
            // Back-to-back rows as one: rows are whole pixels, so the pattern runs on.
            // A page translated for writing is readable too.
            let dmap = mem.map_rows(rows_of(&dst).coalesced(), Access::Write)?;
            if read_d {
                update(&dmap, rop);
            } else {
                fill(&dmap, rop.apply(0, 0));
            }
            return Ok(OpStats {
                bytes_read: if read_d { total } else { 0 },
                bytes_written: total,
            });
        };
        let overlap = src.overlaps(&dst);
        let same_pitch = src.pitch == dst.pitch;
        let (srows, drows) = (rows_of(&src), rows_of(&dst));
        let (srows, drows) = if !overlap && src.pitch == src.row_bytes && dst.pitch == dst.row_bytes
        {
            (srows.coalesced(), drows.coalesced())
        } else {
            (srows, drows)
        };
        let smap = mem.map_rows(srows, Access::Read)?;
        let dmap = mem.map_rows(drows, Access::Write)?;
        // Bottom-up only for an equal-pitch overlap with the destination after the source.
        let backwards = overlap && same_pitch && dst.va > src.va;
        let stats = OpStats {
            bytes_read: total + if read_d { total } else { 0 },
            bytes_written: total,
        };
        // Span-to-span is safe when no source row overlaps its own destination row (rows are
        // walked in the safe direction).
        let apart = src.va.raw().abs_diff(dst.va.raw()) >= dst.row_bytes;
        if !overlap || (same_pitch && apart) {
            self.combine_spans(&dmap, &smap, rop, backwards);
            return Ok(stats);
        }
        let rows = if same_pitch {
            SrcRows::Map(&smap)
        } else {
            // Copy the source aside before any write.
            let mut buf = Vec::new();
            let n = usize_of(total);
            buf.try_reserve_exact(n)
                .map_err(|_| ExecError::OutOfMemory)?;
            buf.resize(n, 0);
            for (r, chunk) in (0..src.rows).zip(buf.chunks_exact_mut(usize_of(src.row_bytes))) {
                smap.read_row(r, chunk);
            }
            SrcRows::Aside(buf)
        };
        self.combine_rows(&dmap, &rows, rop, backwards);
        Ok(stats)
    }

    /// Span to span, row by row in the given direction: `SRCCOPY` copies, other ROPs combine
    /// 8 bytes at a time.
    fn combine_spans(&self, dmap: &RowMap<'_>, smap: &RowMap<'_>, rop: PatRop, backwards: bool) {
        let n = dmap.rows().count;
        let read_d = uses_d(self.rop);
        for i in 0..n {
            let r = if backwards { n - 1 - i } else { i };
            if self.rop == ROP_SRCCOPY {
                dmap.write_pairs(r, smap, |_, d, s| d.copy_from_span(&s));
            } else if read_d {
                dmap.write_pairs(r, smap, |off, d, s| {
                    let m = rop.at(off);
                    d.combine_from(&s, |s, d| m.apply(s, d));
                });
            } else {
                dmap.write_pairs(r, smap, |off, d, s| {
                    let m = rop.at(off);
                    d.combine_from(&s, |s, _| m.apply(s, 0));
                });
            }
        }
    }

    /// Through row buffers (a source row overlaps its own destination row, or the source was
    /// copied aside): per row, read S and D, combine in `u64` chunks, write D.
    fn combine_rows(&self, dmap: &RowMap<'_>, src: &SrcRows<'_>, rop: PatRop, backwards: bool) {
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
                SrcRows::Map(m) => m.read_row(r, &mut sbuf[..rb]),
                SrcRows::Aside(buf) => {
                    let off = usize_of(r) * rb;
                    if let Some(row) = buf.get(off..off + rb) {
                        sbuf[..rb].copy_from_slice(row);
                    }
                }
            }
            if read_d {
                dmap.read_row(r, &mut dbuf[..rb]);
            }
            if self.rop == ROP_SRCCOPY {
                dbuf.copy_from_slice(&sbuf);
            } else {
                for (d, s) in dbuf.chunks_exact_mut(8).zip(sbuf.chunks_exact(8)) {
                    let (mut dv, mut sv) = ([0u8; 8], [0u8; 8]);
                    dv.copy_from_slice(d);
                    sv.copy_from_slice(s);
                    let v = rop.apply(u64::from_le_bytes(sv), u64::from_le_bytes(dv));
                    d.copy_from_slice(&v.to_le_bytes());
                }
            }
            dmap.write_row(r, &dbuf[..rb]);
        }
    }
}

/// Where source rows come from when they go through row buffers.
enum SrcRows<'m> {
    /// Read from memory, row by row.
    Map(&'m RowMap<'m>),
    /// A copy taken before any write (overlap with different pitches): rows of `row_bytes`.
    Aside(Vec<u8>),
}

/// Stores the 8-byte `value` (repeating from each row's start) into every row.
fn fill(dmap: &RowMap<'_>, value: u64) {
    let bytes = value.to_le_bytes();
    let uniform = bytes.iter().all(|&b| b == bytes[0]);
    for r in 0..dmap.rows().count {
        dmap.write_spans(r, |off, span| {
            if uniform {
                span.fill(bytes[0]);
            } else {
                let bits = u32::try_from(off % 8).unwrap_or(0) * 8;
                span.store_pattern(value.rotate_right(bits));
            }
        });
    }
}

/// A ROP without S: updates every row in place, 8 bytes at a time.
fn update(dmap: &RowMap<'_>, rop: PatRop) {
    for r in 0..dmap.rows().count {
        dmap.write_spans(r, |off, span| {
            let m = rop.at(off);
            span.update_words(|d| m.apply(0, d));
        });
    }
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
            assert_eq!(PatRop::new(rop, p).apply(s, d), want, "rop {rop:#x}");
            // A piece starting 3 bytes into a row sees the pattern from its byte 3 on.
            let (s3, d3) = (s.rotate_right(24), d.rotate_right(24));
            assert_eq!(
                PatRop::new(rop, p).at(11).apply(s3, d3),
                want.rotate_right(24),
                "rop {rop:#x} at 11"
            );
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
