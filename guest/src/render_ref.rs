//! Reference rendering in the guest: what `RENDER_FILL_RECT` and `RENDER_TRIANGLE` must produce
//! (docs/device-spec.md section 8.7), computed on the CPU to check the render engine
//! bit-exactly. Triangle coverage uses integer edge functions on doubled coordinates, so pixel
//! centres (x + 1/2) are exact.

/// A 32-bpp image in guest memory.
pub struct Image {
    /// Address of pixel (0, 0).
    pub base: u64,
    /// Bytes per row.
    pub pitch: u32,
    /// Width in pixels.
    pub w: u32,
    /// Height in pixels.
    pub h: u32,
}

impl Image {
    fn ptr(&self, x: u32, y: u32) -> *mut u32 {
        (self.base + u64::from(y) * u64::from(self.pitch) + 4 * u64::from(x)) as *mut u32
    }

    /// Reads pixel (x, y).
    pub fn get(&self, x: u32, y: u32) -> u32 {
        // SAFETY: callers keep (x, y) inside the image, which lies in memory this program owns
        // (guest RAM or the aperture).
        unsafe { core::ptr::read_volatile(self.ptr(x, y)) }
    }

    /// Writes pixel (x, y).
    pub fn set(&self, x: u32, y: u32, v: u32) {
        // SAFETY: as `get`.
        unsafe { core::ptr::write_volatile(self.ptr(x, y), v) }
    }

    fn put(&self, x: u32, y: u32, colour: u32, blend: bool) {
        let v = if blend {
            blend_pixel(self.get(x, y), colour)
        } else {
            colour
        };
        self.set(x, y, v);
    }

    /// `RENDER_FILL_RECT` of `[x, x + w) × [y, y + h)`, clipped.
    pub fn fill_rect(&self, r: (u32, u32, u32, u32), colour: u32, blend: bool) {
        for py in r.1..(r.1 + r.3).min(self.h) {
            for px in r.0..(r.0 + r.2).min(self.w) {
                self.put(px, py, colour, blend);
            }
        }
    }

    /// `RENDER_TRIANGLE`: pixels whose centre is inside, or on a top or left edge.
    pub fn triangle(&self, v: [(u32, u32); 3], colour: u32, blend: bool) {
        let p = v.map(|(x, y)| (2 * i64::from(x), 2 * i64::from(y)));
        if side(p[0], p[1], p[2]) == 0 {
            return;
        }
        // Only the bounding box can be covered.
        let x_end = v.iter().map(|p| p.0).max().unwrap_or(0).min(self.w);
        let y_end = v.iter().map(|p| p.1).max().unwrap_or(0).min(self.h);
        let x0 = v.iter().map(|p| p.0).min().unwrap_or(0);
        let y0 = v.iter().map(|p| p.1).min().unwrap_or(0);
        for py in y0..y_end {
            for px in x0..x_end {
                let q = (2 * i64::from(px) + 1, 2 * i64::from(py) + 1);
                let inside = [(0, 1, 2), (1, 2, 0), (2, 0, 1)].iter().all(|&(i, j, k)| {
                    let (sq, sc) = (side(p[i], p[j], q), side(p[i], p[j], p[k]));
                    if sq == 0 {
                        top_left(p[i], p[j], p[k])
                    } else {
                        (sq > 0) == (sc > 0)
                    }
                });
                if inside {
                    self.put(px, py, colour, blend);
                }
            }
        }
    }
}

fn side(a: (i64, i64), b: (i64, i64), q: (i64, i64)) -> i64 {
    (b.0 - a.0) * (q.1 - a.1) - (b.1 - a.1) * (q.0 - a.0)
}

/// Edge a→b is a top edge (horizontal, third vertex c below) or a left edge (c to the right of
/// the edge's line at c's height).
fn top_left(a: (i64, i64), b: (i64, i64), c: (i64, i64)) -> bool {
    let dy = b.1 - a.1;
    if dy == 0 {
        return c.1 > a.1;
    }
    let lhs = (c.0 - a.0) * dy;
    let rhs = (c.1 - a.1) * (b.0 - a.0);
    if dy > 0 {
        lhs > rhs
    } else {
        lhs < rhs
    }
}

/// Source-over blending of `colour` (0xAARRGGBB) onto `dst` (section 8.7).
pub fn blend_pixel(dst: u32, colour: u32) -> u32 {
    let a = colour >> 24;
    let mut out = 0;
    for ch in 0..3 {
        let s = (colour >> (8 * ch)) & 0xFF;
        let d = (dst >> (8 * ch)) & 0xFF;
        out |= ((s * a + d * (255 - a) + 127) / 255) << (8 * ch);
    }
    let da = dst >> 24;
    out | (a + (da * (255 - a) + 127) / 255) << 24
}
