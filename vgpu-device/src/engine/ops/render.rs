//! Render ops: `RENDER_SURFACE_STATE`, `RENDER_FILL_RECT` and `RENDER_TRIANGLE`.
//!
//! Surfaces are 32-bit XRGB8888 / ARGB8888 (bytes B, G, R, A/X); a colour `0xAARRGGBB` is stored
//! as those bytes. Draws are clipped to the surface; a zero-sized surface or rectangle draws
//! nothing. Without blending the colour (its alpha byte included) is stored as is. With
//! [`RENDER_BLEND`](vgpu_abi::cmd::RENDER_BLEND), source-over with the colour's alpha `a`, per
//! colour channel `out = (s * a + d * (255 - a) + 127) / 255` and for the alpha byte
//! `out = a + (d * (255 - a) + 127) / 255` (the same on XRGB surfaces).
//!
//! Triangles: with vertices and pixel centres in doubled coordinates (a centre `(x + 0.5,
//! y + 0.5)` is `(2x + 1, 2y + 1)`), the integer edge functions are exact. A pixel is covered if
//! its centre is strictly inside, or on an edge that is a top edge (horizontal, the triangle
//! below it) or a left edge (the triangle to its right); either winding; a zero-area triangle
//! covers nothing. Only the clipped bounding box is scanned, row by row (read the covered span,
//! modify it, write it back). Draws are all or nothing: the clipped box is translated first.

use serde::{Deserialize, Serialize};
use vgpu_abi::cmd::{self, RENDER_BLEND};
use vgpu_abi::regs::{PLANE_FORMAT_ARGB8888, PLANE_FORMAT_XRGB8888};

use super::{addr, split16, usize_of, ExecError, Extent, Image, OpError, OpStats};
use crate::addr::GpuVa;
use crate::mem::{Access, Mem};

/// The render engine's per-context state: saved and restored with the context.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderState {
    /// The render target set by the last `RENDER_SURFACE_STATE`.
    pub surface: Option<Surface>,
}

impl RenderState {
    /// Checks restored (untrusted) state: the surface, if any, must be one `decode` accepts.
    pub fn validate(&self) -> Result<(), OpError> {
        self.surface.as_ref().map_or(Ok(()), Surface::validate)
    }
}

/// A render target (`RENDER_SURFACE_STATE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Surface {
    va: GpuVa,
    pitch: u32,
    width: u32,
    height: u32,
    format: u32,
}

impl Surface {
    /// A surface, checked as `RENDER_SURFACE_STATE` is: XRGB8888 or ARGB8888, sides at most
    /// `MAX_DIM`, `width * 4 <= pitch <= MAX_PITCH`, no address overflow.
    pub fn new(
        va: GpuVa,
        pitch: u32,
        width: u32,
        height: u32,
        format: u32,
    ) -> Result<Self, OpError> {
        if format != PLANE_FORMAT_XRGB8888 && format != PLANE_FORMAT_ARGB8888 {
            return Err(OpError::BadParameter("render surface format"));
        }
        if width > cmd::MAX_DIM || height > cmd::MAX_DIM {
            return Err(OpError::BadParameter("render surface size above MAX_DIM"));
        }
        Image::new(va, pitch, u64::from(width) * 4, u64::from(height))?;
        Ok(Surface {
            va,
            pitch,
            width,
            height,
            format,
        })
    }

    pub(super) fn decode(p: &[u32; 5]) -> Result<Surface, OpError> {
        let (w, h) = split16(p[3]);
        Surface::new(addr(p[0], p[1]), p[2], w, h, p[4])
    }

    /// Checks the surface as [`Surface::new`] does (for restored state).
    pub fn validate(&self) -> Result<(), OpError> {
        Surface::new(self.va, self.pitch, self.width, self.height, self.format).map(|_| ())
    }

    /// Address of pixel (0, 0).
    pub fn va(&self) -> GpuVa {
        self.va
    }
    /// Pitch in bytes.
    pub fn pitch(&self) -> u32 {
        self.pitch
    }
    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }
    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }
    /// `PLANE_FORMAT_*`.
    pub fn format(&self) -> u32 {
        self.format
    }

    /// The pixels `[x0, x1) x [y0, y1)` (inside the surface) as an image.
    fn rect(&self, c: Clip) -> Image {
        let full = Image {
            va: self.va,
            pitch: u64::from(self.pitch),
            row_bytes: u64::from(self.width) * 4,
            rows: u64::from(self.height),
        };
        full.sub(
            u64::from(c.x0) * 4,
            u64::from(c.y0),
            u64::from(c.x1 - c.x0) * 4,
            u64::from(c.y1 - c.y0),
        )
    }
}

/// A clipped, non-empty pixel box `[x0, x1) x [y0, y1)`.
#[derive(Clone, Copy, Debug)]
struct Clip {
    x0: u32,
    y0: u32,
    x1: u32,
    y1: u32,
}

impl Clip {
    /// `[x0, x1) x [y0, y1)` clipped to the surface, or `None` when empty.
    fn new(s: &Surface, x0: u32, y0: u32, x1: u32, y1: u32) -> Option<Clip> {
        let c = Clip {
            x0,
            y0,
            x1: x1.min(s.width),
            y1: y1.min(s.height),
        };
        (c.x0 < c.x1 && c.y0 < c.y1).then_some(c)
    }
}

/// `RENDER_FILL_RECT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FillRect {
    x: u32,
    y: u32,
    width: u32,
    height: u32,
    colour: u32,
    blend: bool,
}

impl FillRect {
    pub(super) fn decode(flags: u32, p: &[u32; 3]) -> Result<FillRect, OpError> {
        let ((x, y), (width, height)) = (split16(p[0]), split16(p[1]));
        if width > cmd::MAX_DIM || height > cmd::MAX_DIM {
            return Err(OpError::BadParameter("rectangle size above MAX_DIM"));
        }
        Ok(FillRect {
            x,
            y,
            width,
            height,
            colour: p[2],
            blend: flags & RENDER_BLEND != 0,
        })
    }

    fn clip(&self, s: &Surface) -> Option<Clip> {
        Clip::new(s, self.x, self.y, self.x + self.width, self.y + self.height)
    }

    pub(super) fn footprint(&self, s: &Surface) -> Vec<Extent> {
        self.clip(s)
            .map_or_else(Vec::new, |c| draw_extents(s.rect(c), self.blend))
    }

    pub(super) fn execute(&self, mem: &mut Mem<'_>, s: &Surface) -> Result<OpStats, ExecError> {
        let Some(c) = self.clip(s) else {
            return Ok(OpStats::default());
        };
        let img = s.rect(c);
        img.validate(mem, Access::Write)?;
        let px = Pixel::new(self.colour);
        let mut row: Vec<u8> = px
            .bytes
            .iter()
            .copied()
            .cycle()
            .take(usize_of(img.row_bytes))
            .collect();
        let mut stats = OpStats::default();
        for r in 0..img.rows {
            if self.blend {
                mem.read(img.row(r), &mut row)?;
                stats.bytes_read += img.row_bytes;
                row.chunks_exact_mut(4).for_each(|d| px.blend(d));
            }
            mem.write(img.row(r), &row)?;
            stats.bytes_written += img.row_bytes;
        }
        Ok(stats)
    }
}

/// The extents of a draw over `img`: written, and read too when blending.
fn draw_extents(img: Image, blend: bool) -> Vec<Extent> {
    let read = if blend {
        img.extent(Access::Read)
    } else {
        None
    };
    read.into_iter().chain(img.extent(Access::Write)).collect()
}

/// A draw colour, prepared for blending.
struct Pixel {
    /// B, G, R, A.
    bytes: [u8; 4],
    /// `s * a + 127` per colour channel.
    premul: [u32; 3],
    a: u32,
}

impl Pixel {
    fn new(colour: u32) -> Pixel {
        let bytes = colour.to_le_bytes();
        let a = u32::from(bytes[3]);
        let premul = [0, 1, 2].map(|i| u32::from(bytes[i]) * a + 127);
        Pixel { bytes, premul, a }
    }

    /// Source-over onto the 4-byte pixel `d`.
    fn blend(&self, d: &mut [u8]) {
        let inv = 255 - self.a;
        for (c, pm) in d.iter_mut().zip(self.premul) {
            *c = u8::try_from((pm + u32::from(*c) * inv) / 255).unwrap_or(u8::MAX);
        }
        if let Some(da) = d.get_mut(3) {
            *da = u8::try_from(self.a + (u32::from(*da) * inv + 127) / 255).unwrap_or(u8::MAX);
        }
    }
}

/// `RENDER_TRIANGLE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Triangle {
    v: [(u32, u32); 3],
    colour: u32,
    blend: bool,
}

/// An edge function `e(X, Y) = a * X + b * Y + c` over doubled coordinates; a centre is on the
/// covered side when `e + bias > 0` (`bias` 1 on top-left edges, so `e >= 0` there).
#[derive(Clone, Copy, Debug)]
struct Edge {
    a: i64,
    b: i64,
    c: i64,
    bias: i64,
}

impl Edge {
    /// The edge from `p` to `q` of a triangle with positive area (`e > 0` inside).
    fn new(p: (i64, i64), q: (i64, i64)) -> Edge {
        let (dx, dy) = (q.0 - p.0, q.1 - p.1);
        // With y down and positive area, the interior is below a rightward horizontal edge
        // (top) and to the right of an upward edge (left).
        let top_left = (dy == 0 && dx > 0) || dy < 0;
        Edge {
            a: -dy,
            b: dx,
            c: dy * p.0 - dx * p.1,
            bias: i64::from(top_left),
        }
    }

    fn eval(&self, x: i64, y: i64) -> i64 {
        self.a * x + self.b * y + self.c + self.bias
    }
}

impl Triangle {
    pub(super) fn decode(flags: u32, p: &[u32; 4]) -> Result<Triangle, OpError> {
        let v = [split16(p[0]), split16(p[1]), split16(p[2])];
        Ok(Triangle {
            v,
            colour: p[3],
            blend: flags & RENDER_BLEND != 0,
        })
    }

    /// The edges in positive winding, or `None` for a zero-area triangle.
    fn edges(&self) -> Option<[Edge; 3]> {
        let [p0, p1, p2] = self.v.map(|(x, y)| (2 * i64::from(x), 2 * i64::from(y)));
        let area = (p1.0 - p0.0) * (p2.1 - p0.1) - (p1.1 - p0.1) * (p2.0 - p0.0);
        match area {
            0 => None,
            a if a > 0 => Some([Edge::new(p0, p1), Edge::new(p1, p2), Edge::new(p2, p0)]),
            _ => Some([Edge::new(p0, p2), Edge::new(p2, p1), Edge::new(p1, p0)]),
        }
    }

    /// The bounding box of the centres that can be covered, clipped; `None` if empty.
    fn clip(&self, s: &Surface) -> Option<Clip> {
        self.edges()?;
        let xs = self.v.map(|v| v.0);
        let ys = self.v.map(|v| v.1);
        let (x0, x1) = (xs.iter().min()?, xs.iter().max()?);
        let (y0, y1) = (ys.iter().min()?, ys.iter().max()?);
        // Centre x + 0.5 in [x0, x1] means x in [x0, x1).
        Clip::new(s, *x0, *y0, *x1, *y1)
    }

    pub(super) fn footprint(&self, s: &Surface) -> Vec<Extent> {
        self.clip(s)
            .map_or_else(Vec::new, |c| draw_extents(s.rect(c), self.blend))
    }

    pub(super) fn execute(&self, mem: &mut Mem<'_>, s: &Surface) -> Result<OpStats, ExecError> {
        let (Some(c), Some(edges)) = (self.clip(s), self.edges()) else {
            return Ok(OpStats::default());
        };
        let img = s.rect(c);
        img.validate(mem, Access::Write)?;
        let px = Pixel::new(self.colour);
        let width = usize_of(u64::from(c.x1 - c.x0));
        let mut covered = vec![false; width];
        let mut row = vec![0u8; width * 4];
        let mut stats = OpStats::default();
        for (r, y) in (c.y0..c.y1).enumerate() {
            let cy = 2 * i64::from(y) + 1;
            for (i, x) in (c.x0..c.x1).enumerate() {
                let cx = 2 * i64::from(x) + 1;
                covered[i] = edges.iter().all(|e| e.eval(cx, cy) > 0);
            }
            let (Some(first), Some(last)) = (
                covered.iter().position(|&b| b),
                covered.iter().rposition(|&b| b),
            ) else {
                continue;
            };
            let span = &mut row[first * 4..(last + 1) * 4];
            let va = img.row(r as u64).add(first as u64 * 4);
            // A convex shape covers one run per row, so without blending nothing needs reading;
            // read anyway if the run had a hole, to keep the uncovered pixels.
            let whole = covered[first..=last].iter().all(|&b| b);
            if self.blend || !whole {
                mem.read(va, span)?;
                stats.bytes_read += span.len() as u64;
            }
            for (d, _) in span
                .chunks_exact_mut(4)
                .zip(&covered[first..=last])
                .filter(|(_, c)| **c)
            {
                if self.blend {
                    px.blend(d);
                } else {
                    d.copy_from_slice(&px.bytes);
                }
            }
            mem.write(va, span)?;
            stats.bytes_written += span.len() as u64;
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_blend_extremes_and_rounding() {
        let mut d = [10u8, 20, 30, 40];
        Pixel::new(0x00FF_FFFF).blend(&mut d);
        assert_eq!(d, [10, 20, 30, 40], "alpha 0 keeps the destination");
        Pixel::new(0xFF01_0203).blend(&mut d);
        assert_eq!(d, [3, 2, 1, 255], "alpha 255 replaces it");
        let mut d = [0u8, 255, 100, 0];
        Pixel::new(0x80FF_0000).blend(&mut d);
        // a = 128: (0*128 + 0*127 + 127)/255 = 0; (0 + 255*127 + 127)/255 = 127;
        // (255*128 + 100*127 + 127)/255 = 178; alpha 128 + (0 + 127)/255 = 128.
        assert_eq!(d, [0, 127, 178, 128]);
    }

    #[test]
    fn test_surface_restore_validation_rejects_bad_state() {
        let good = Surface::new(GpuVa(0x1000), 64, 16, 4, PLANE_FORMAT_ARGB8888).unwrap();
        assert!(RenderState {
            surface: Some(good)
        }
        .validate()
        .is_ok());
        let bad = Surface { pitch: 8, ..good };
        assert!(RenderState { surface: Some(bad) }.validate().is_err());
        let bad = Surface {
            va: GpuVa(u64::MAX - 8),
            ..good
        };
        assert!(bad.validate().is_err());
        assert!(
            Surface::new(GpuVa(0), 64, 16, 4, 2).is_err(),
            "RGB565 is not a render target"
        );
    }
}
