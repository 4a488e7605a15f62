//! The display plane: scan-out of the surface the guest flipped to, read through the GGTT.

use vgpu_abi::regs::{self, PLANE_CTL_ENABLE};

use crate::addr::GpuVa;
use crate::engine::translate::GgttTranslate;
use crate::mem::Mem;
use crate::vgpu::shared::VgpuShared;

/// A scanned-out frame, converted to RGBA8 (alpha 255 for XRGB and RGB565).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height * 4` bytes, rows top to bottom, R, G, B, A.
    pub rgba: Vec<u8>,
}

/// Why there is no frame.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DisplayError {
    /// `PLANE_CTL_ENABLE` is clear.
    #[error("Display plane disabled")]
    Disabled,
    /// The plane registers describe no valid surface.
    #[error("Invalid plane configuration: {0}")]
    Invalid(&'static str),
    /// A page of the surface is not mapped.
    #[error("Surface not mapped: {0}")]
    Fault(#[from] crate::mem::Fault),
}

pub(crate) fn reset(s: &VgpuShared) {
    for r in [
        regs::PLANE_CTL,
        regs::PLANE_FORMAT,
        regs::PLANE_SURF_LO,
        regs::PLANE_SURF_HI,
    ] {
        s.set_vreg(r, 0);
    }
}

/// Reads the current plane as the host would scan it out.
pub fn scanout(s: &VgpuShared) -> Result<Frame, DisplayError> {
    if s.vreg(regs::PLANE_CTL) & PLANE_CTL_ENABLE == 0 {
        return Err(DisplayError::Disabled);
    }
    let format = s.vreg(regs::PLANE_FORMAT);
    let bpp: u32 = match format {
        regs::PLANE_FORMAT_XRGB8888 | regs::PLANE_FORMAT_ARGB8888 => 4,
        regs::PLANE_FORMAT_RGB565 => 2,
        _ => return Err(DisplayError::Invalid("format")),
    };
    let surf =
        u64::from(s.vreg(regs::PLANE_SURF_HI)) << 32 | u64::from(s.vreg(regs::PLANE_SURF_LO));
    let (w, h, stride) = (
        s.vreg(regs::PLANE_WIDTH),
        s.vreg(regs::PLANE_HEIGHT),
        s.vreg(regs::PLANE_STRIDE),
    );
    let p = s.profile();
    if surf % vgpu_abi::PAGE_SIZE != 0 {
        return Err(DisplayError::Invalid("surface not 4 KiB aligned"));
    }
    if w == 0 || h == 0 || w > p.max_width || h > p.max_height {
        return Err(DisplayError::Invalid("size"));
    }
    if u64::from(stride) < u64::from(w) * u64::from(bpp) {
        return Err(DisplayError::Invalid("stride"));
    }
    let dma = s.dma();
    let mut t = GgttTranslate::new(s, &dma);
    let mut mem = Mem::new(&mut t);
    let row_bytes = (w * bpp) as usize;
    let mut row = vec![0u8; row_bytes];
    let mut rgba = Vec::with_capacity(w as usize * h as usize * 4);
    for y in 0..u64::from(h) {
        let va = surf
            .checked_add(y * u64::from(stride))
            .ok_or(DisplayError::Invalid("surface wraps"))?;
        mem.read(GpuVa(va), &mut row)?;
        match format {
            regs::PLANE_FORMAT_RGB565 => {
                for px in row.chunks_exact(2) {
                    let v = u16::from_le_bytes([px[0], px[1]]);
                    let (r, g, b) = ((v >> 11) & 0x1F, (v >> 5) & 0x3F, v & 0x1F);
                    // Expand to 8 bits by replicating the high bits.
                    let exp = |c: u16, bits: u32| -> u8 {
                        let c = u32::from(c);
                        let full = (c << (8 - bits)) | (c >> (2 * bits).saturating_sub(8));
                        u8::try_from(full & 0xFF).unwrap_or(0xFF)
                    };
                    rgba.extend_from_slice(&[exp(r, 5), exp(g, 6), exp(b, 5), 0xFF]);
                }
            }
            _ => {
                for px in row.chunks_exact(4) {
                    let a = if format == regs::PLANE_FORMAT_ARGB8888 {
                        px[3]
                    } else {
                        0xFF
                    };
                    rgba.extend_from_slice(&[px[2], px[1], px[0], a]);
                }
            }
        }
    }
    Ok(Frame {
        width: w,
        height: h,
        rgba,
    })
}
