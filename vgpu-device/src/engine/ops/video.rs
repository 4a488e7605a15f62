//! Video op: `VIDEO_CSC_SCALE`, NV12 <-> XRGB8888 with nearest-neighbour scaling.
//!
//! Destination pixel `(x, y)` samples source pixel `(x * sw / dw, y * sh / dh)` (integer).
//! BT.601 limited range, integer:
//! - NV12 -> XRGB: the sampled pixel's Y and the U, V of the 2x2 chroma block holding it;
//!   `C = Y - 16, D = U - 128, E = V - 128`, `R = clamp((298C + 409E + 128) >> 8)`,
//!   `G = clamp((298C - 100D - 208E + 128) >> 8)`, `B = clamp((298C + 516D + 128) >> 8)`;
//!   stored as bytes B, G, R, 0xFF.
//! - XRGB -> NV12: per destination pixel, from the sampled RGB (the X byte is ignored),
//!   `Y = ((66R + 129G + 25B + 128) >> 8) + 16`, `U = ((-38R - 74G + 112B + 128) >> 8) + 128`,
//!   `V = ((112R - 94G - 18B + 128) >> 8) + 128` (arithmetic shifts); each 2x2 block's chroma is
//!   `(u00 + u01 + u10 + u11 + 2) >> 2` of those per-pixel values (same for V).
//!
//! An NV12 image has even sides and `pitch >= width`; an XRGB image `pitch >= 4 * width`. An
//! empty destination is a no-op; an empty source with a non-empty destination, and source and
//! destination ranges that overlap, are bad parameters. Work is row by row (memory bounded by a
//! few rows); all or nothing: every source and destination row is translated first.

use vgpu_abi::cmd::{self, CSC_NV12_TO_XRGB, CSC_XRGB_TO_NV12};

use super::{addr, split16, usize_of, ExecError, Extent, Image, OpError, OpStats};
use crate::mem::{Access, Mem};

/// Direction of a colour-space conversion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CscMode {
    /// `CSC_NV12_TO_XRGB`.
    Nv12ToXrgb,
    /// `CSC_XRGB_TO_NV12`.
    XrgbToNv12,
}

/// `VIDEO_CSC_SCALE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CscScale {
    mode: CscMode,
    /// Source and destination: width, height, and the image (NV12: Y then UV rows).
    src: (u32, u32, Image),
    dst: (u32, u32, Image),
}

/// Checks one side of a conversion and returns its image.
fn side(lo: u32, hi: u32, pitch: u32, size: u32, nv12: bool) -> Result<(u32, u32, Image), OpError> {
    let (w, h) = split16(size);
    if w > cmd::MAX_DIM || h > cmd::MAX_DIM {
        return Err(OpError::BadParameter("CSC size above MAX_DIM"));
    }
    let img = if nv12 {
        if w % 2 != 0 || h % 2 != 0 {
            return Err(OpError::BadParameter("NV12 size not even"));
        }
        Image::new(addr(lo, hi), pitch, u64::from(w), u64::from(h + h / 2))?
    } else {
        Image::new(addr(lo, hi), pitch, u64::from(w) * 4, u64::from(h))?
    };
    Ok((w, h, img))
}

impl CscScale {
    pub(super) fn decode(p: &[u32; 9]) -> Result<CscScale, OpError> {
        let mode = match p[8] {
            CSC_NV12_TO_XRGB => CscMode::Nv12ToXrgb,
            CSC_XRGB_TO_NV12 => CscMode::XrgbToNv12,
            _ => return Err(OpError::BadParameter("CSC mode")),
        };
        let nv12_src = mode == CscMode::Nv12ToXrgb;
        let src = side(p[0], p[1], p[2], p[3], nv12_src)?;
        let dst = side(p[4], p[5], p[6], p[7], !nv12_src)?;
        if !dst.2.is_empty() && src.2.is_empty() {
            return Err(OpError::BadParameter("CSC from an empty source"));
        }
        if src.2.overlaps(&dst.2) {
            return Err(OpError::BadParameter("CSC source and destination overlap"));
        }
        Ok(CscScale { mode, src, dst })
    }

    pub(super) fn footprint(&self) -> Vec<Extent> {
        if self.dst.2.is_empty() {
            return Vec::new();
        }
        self.src
            .2
            .extent(Access::Read)
            .into_iter()
            .chain(self.dst.2.extent(Access::Write))
            .collect()
    }

    pub(super) fn execute(&self, mem: &mut Mem<'_>) -> Result<OpStats, ExecError> {
        if self.dst.2.is_empty() {
            return Ok(OpStats::default());
        }
        self.src.2.validate(mem, Access::Read)?;
        self.dst.2.validate(mem, Access::Write)?;
        // Source column of each destination column.
        let (sw, dw) = (u64::from(self.src.0), u64::from(self.dst.0));
        let xmap: Vec<usize> = (0..dw).map(|x| usize_of(x * sw / dw)).collect();
        match self.mode {
            CscMode::Nv12ToXrgb => self.nv12_to_xrgb(mem, &xmap),
            CscMode::XrgbToNv12 => self.xrgb_to_nv12(mem, &xmap),
        }
    }

    /// Source row of destination row `y`.
    fn src_row(&self, y: u64) -> u64 {
        y * u64::from(self.src.1) / u64::from(self.dst.1)
    }

    fn nv12_to_xrgb(&self, mem: &mut Mem<'_>, xmap: &[usize]) -> Result<OpStats, ExecError> {
        let (src, dst) = (self.src.2, self.dst.2);
        let sh = u64::from(self.src.1);
        let rb = usize_of(src.row_bytes);
        let (mut yrow, mut uvrow) = (vec![0u8; rb], vec![0u8; rb]);
        let mut out = vec![0u8; usize_of(dst.row_bytes)];
        let (mut cur_y, mut cur_uv) = (None, None);
        let mut stats = OpStats::default();
        for y in 0..dst.rows {
            let sy = self.src_row(y);
            if cur_y != Some(sy) {
                mem.read(src.row(sy), &mut yrow)?;
                stats.bytes_read += src.row_bytes;
                cur_y = Some(sy);
            }
            if cur_uv != Some(sy / 2) {
                mem.read(src.row(sh + sy / 2), &mut uvrow)?;
                stats.bytes_read += src.row_bytes;
                cur_uv = Some(sy / 2);
            }
            for (o, &sx) in out.chunks_exact_mut(4).zip(xmap) {
                let cx = sx & !1;
                let (yv, u, v) = (yrow.get(sx), uvrow.get(cx), uvrow.get(cx + 1));
                let [r, g, b] = yuv_to_rgb(
                    i32::from(yv.copied().unwrap_or(0)),
                    i32::from(u.copied().unwrap_or(0)),
                    i32::from(v.copied().unwrap_or(0)),
                );
                o.copy_from_slice(&[b, g, r, 0xFF]);
            }
            mem.write(dst.row(y), &out)?;
            stats.bytes_written += dst.row_bytes;
        }
        Ok(stats)
    }

    fn xrgb_to_nv12(&self, mem: &mut Mem<'_>, xmap: &[usize]) -> Result<OpStats, ExecError> {
        let (src, dst) = (self.src.2, self.dst.2);
        let dh = u64::from(self.dst.1);
        let dw = xmap.len();
        let mut srow = vec![0u8; usize_of(src.row_bytes)];
        let mut cur = None;
        // Two luma rows, and the per-pixel U and V of both rows.
        let mut ys = [vec![0u8; dw], vec![0u8; dw]];
        let mut us = [vec![0i32; dw], vec![0i32; dw]];
        let mut vs = [vec![0i32; dw], vec![0i32; dw]];
        let mut uv = vec![0u8; dw];
        let mut stats = OpStats::default();
        for by in 0..dh / 2 {
            for k in 0..2 {
                let sy = self.src_row(2 * by + k as u64);
                if cur != Some(sy) {
                    mem.read(src.row(sy), &mut srow)?;
                    stats.bytes_read += src.row_bytes;
                    cur = Some(sy);
                }
                for (x, &sx) in xmap.iter().enumerate() {
                    let p = srow.get(sx * 4..sx * 4 + 3).unwrap_or(&[0, 0, 0]);
                    (ys[k][x], us[k][x], vs[k][x]) = rgb_to_yuv(p[2], p[1], p[0]);
                }
            }
            for (bx, pair) in uv.chunks_exact_mut(2).enumerate() {
                let (x0, x1) = (2 * bx, 2 * bx + 1);
                let avg =
                    |c: &[Vec<i32>; 2]| clamp((c[0][x0] + c[0][x1] + c[1][x0] + c[1][x1] + 2) >> 2);
                pair.copy_from_slice(&[avg(&us), avg(&vs)]);
            }
            for (k, row) in ys.iter().enumerate() {
                mem.write(dst.row(2 * by + k as u64), row)?;
            }
            mem.write(dst.row(dh + by), &uv)?;
            stats.bytes_written += 3 * dst.row_bytes;
        }
        Ok(stats)
    }
}

/// `v` clamped to a byte.
fn clamp(v: i32) -> u8 {
    u8::try_from(v.clamp(0, 255)).unwrap_or(0)
}

/// BT.601 limited-range R, G, B to Y and the per-pixel U, V (before 2x2 averaging).
fn rgb_to_yuv(r: u8, g: u8, b: u8) -> (u8, i32, i32) {
    let (r, g, b) = (i32::from(r), i32::from(g), i32::from(b));
    (
        clamp(((66 * r + 129 * g + 25 * b + 128) >> 8) + 16),
        ((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128,
        ((112 * r - 94 * g - 18 * b + 128) >> 8) + 128,
    )
}

/// BT.601 limited-range YUV to R, G, B.
fn yuv_to_rgb(y: i32, u: i32, v: i32) -> [u8; 3] {
    let (c, d, e) = (y - 16, u - 128, v - 128);
    [
        clamp((298 * c + 409 * e + 128) >> 8),
        clamp((298 * c - 100 * d - 208 * e + 128) >> 8),
        clamp((298 * c + 516 * d + 128) >> 8),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_bt601_known_values() {
        assert_eq!(yuv_to_rgb(16, 128, 128), [0, 0, 0]);
        assert_eq!(yuv_to_rgb(235, 128, 128), [255, 255, 255]);
        assert_eq!(yuv_to_rgb(81, 90, 240), [255, 0, 0]);
        // U of pure red: (-9690 + 128) >> 8 is -38 with an arithmetic shift (not -37).
        assert_eq!(rgb_to_yuv(255, 0, 0), (82, 90, 240));
        assert_eq!(rgb_to_yuv(0, 0, 0), (16, 128, 128));
        assert_eq!(rgb_to_yuv(255, 255, 255), (235, 128, 128));
    }
}
