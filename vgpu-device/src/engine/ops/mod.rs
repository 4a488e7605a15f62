//! Engine command execution: the non-MI commands, on real bytes.
//!
//! [`decode`] turns a header and its payload into an [`Op`], validating every parameter against
//! the limits of [`vgpu_abi::cmd`]: a decoded op has in-range, non-overflowing extents.
//! [`Op::footprint`] lists the bounding byte ranges an op reads and writes (for the command
//! scanner) and [`Op::execute`] runs it through a [`Mem`]. The MI commands are not ops: the
//! engine executor handles them.
//!
//! Choices the ABI leaves open, common to all ops (per-op ones are in each module):
//! - Zero-sized rectangles, images and element counts are valid and touch no memory, except a
//!   `reduce` of 0 elements (stores 0) and a `matmul` with `K = 0` (stores a zero matrix).
//! - Reserved payload bits, unknown flags and dwords a kernel does not use are ignored.
//! - A pitch must be at least the row size in bytes (width times bytes per pixel) even for a
//!   single row, and at most `MAX_PITCH`.
//! - Every op is all-or-nothing with respect to translation faults: it translates every byte it
//!   will read or write (row by row) before its first write, so a fault leaves memory untouched.
//! - Overlap: blits follow the ABI (as if the source were copied aside). Where the ABI is silent
//!   (CSC source/destination, compute inputs/outputs), partial overlap is rejected as a bad
//!   parameter; `saxpy` in place (A == B) is allowed. Overlap is judged on GPU addresses.

mod blit;
mod compute;
mod render;
mod video;

#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_errors;

pub use blit::{Bpp, ColorBlt, SrcCopyBlt};
pub use compute::{Dispatch, Kernel, CANONICAL_NAN};
pub use render::{FillRect, RenderState, Surface, Triangle};
pub use video::{CscMode, CscScale};

use vgpu_abi::cmd::{self, AuditReason, Client, Header};
use vgpu_abi::Engine;

use crate::addr::GpuVa;
use crate::mem::{Access, Fault, FaultKind, Mem};

/// Why a command could not be decoded into an [`Op`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// Unknown client or opcode (MI commands included: they are not ops).
    #[error("Unknown command: client {client}, opcode {opcode:#x}")]
    UnknownOpcode {
        /// Raw client field.
        client: u32,
        /// Opcode.
        opcode: u32,
    },
    /// The header's `len` or the payload length differs from the opcode's fixed length.
    #[error("Bad command length {len}, expected {expected}")]
    BadLength {
        /// The offending length (the header's, or the payload's when the header is right).
        len: u32,
        /// The opcode's fixed length.
        expected: u32,
    },
    /// A size, count, format, address or overlap parameter is out of range.
    #[error("Bad parameter: {0}")]
    BadParameter(&'static str),
}

impl OpError {
    /// The audit reason reported for this error.
    pub const fn audit_reason(&self) -> AuditReason {
        match self {
            OpError::UnknownOpcode { .. } => AuditReason::UnknownOpcode,
            OpError::BadLength { .. } => AuditReason::BadLength,
            OpError::BadParameter(_) => AuditReason::BadParameter,
        }
    }
}

/// Why executing an [`Op`] failed. Every op fails before its first write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExecError {
    /// An address did not translate.
    #[error("Memory fault")]
    Fault(#[from] Fault),
    /// A render draw without a render surface (none set, or an invalid restored one).
    #[error("No valid render surface")]
    NoSurface,
    /// The host could not allocate the copy of an overlapping blit source.
    #[error("Out of memory for an overlapping blit source")]
    OutOfMemory,
}

impl ExecError {
    /// The audit reason reported for this error.
    pub const fn audit_reason(&self) -> AuditReason {
        match self {
            ExecError::Fault(Fault {
                kind: FaultKind::ReadOnly,
                ..
            }) => AuditReason::ReadOnlyWrite,
            ExecError::Fault(_) => AuditReason::AddressOutOfRange,
            ExecError::NoSurface | ExecError::OutOfMemory => AuditReason::BadParameter,
        }
    }
}

/// A byte range an op reads or writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// First byte.
    pub va: GpuVa,
    /// Length in bytes (never 0 in a footprint).
    pub len: u64,
    /// Read or write.
    pub access: Access,
}

/// Bytes an op moved from and to memory (translation-only validation not counted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpStats {
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
}

/// A decoded non-MI command.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// `XY_COLOR_BLT`.
    ColorBlt(ColorBlt),
    /// `XY_SRC_COPY_BLT`.
    SrcCopyBlt(SrcCopyBlt),
    /// `RENDER_SURFACE_STATE`.
    SurfaceState(Surface),
    /// `RENDER_FILL_RECT`.
    FillRect(FillRect),
    /// `RENDER_TRIANGLE`.
    Triangle(Triangle),
    /// `VIDEO_CSC_SCALE`.
    CscScale(CscScale),
    /// `COMPUTE_DISPATCH`.
    Dispatch(Dispatch),
}

/// Decodes a non-MI command. `payload` is the `header.len` dwords after the header.
pub fn decode(header: Header, payload: &[u32]) -> Result<Op, OpError> {
    let unknown = OpError::UnknownOpcode {
        client: header.client,
        opcode: header.opcode,
    };
    let client = Client::from_bits(header.client).ok_or(unknown)?;
    if client == Client::Mi {
        return Err(unknown);
    }
    let expected = cmd::fixed_len(client, header.opcode).ok_or(unknown)?;
    if header.len != expected {
        return Err(OpError::BadLength {
            len: header.len,
            expected,
        });
    }
    let p = payload;
    match (client, header.opcode) {
        (Client::Blt, cmd::XY_COLOR_BLT) => ColorBlt::decode(dwords(p)?).map(Op::ColorBlt),
        (Client::Blt, cmd::XY_SRC_COPY_BLT) => SrcCopyBlt::decode(dwords(p)?).map(Op::SrcCopyBlt),
        (Client::Render, cmd::RENDER_SURFACE_STATE) => {
            Surface::decode(dwords(p)?).map(Op::SurfaceState)
        }
        (Client::Render, cmd::RENDER_FILL_RECT) => {
            FillRect::decode(header.flags, dwords(p)?).map(Op::FillRect)
        }
        (Client::Render, cmd::RENDER_TRIANGLE) => {
            Triangle::decode(header.flags, dwords(p)?).map(Op::Triangle)
        }
        (Client::Video, cmd::VIDEO_CSC_SCALE) => CscScale::decode(dwords(p)?).map(Op::CscScale),
        (Client::Compute, cmd::COMPUTE_DISPATCH) => Dispatch::decode(dwords(p)?).map(Op::Dispatch),
        _ => Err(unknown),
    }
}

/// The payload as a fixed-size array, or `BadLength`.
fn dwords<const N: usize>(p: &[u32]) -> Result<&[u32; N], OpError> {
    p.try_into().map_err(|_| OpError::BadLength {
        len: u32::try_from(p.len()).unwrap_or(u32::MAX),
        expected: u32::try_from(N).unwrap_or(u32::MAX),
    })
}

impl Op {
    /// The engine that executes this op.
    pub const fn engine(&self) -> Engine {
        match self {
            Op::ColorBlt(_) | Op::SrcCopyBlt(_) => Engine::Blit,
            Op::SurfaceState(_) | Op::FillRect(_) | Op::Triangle(_) => Engine::Render,
            Op::CscScale(_) => Engine::Video,
            Op::Dispatch(_) => Engine::Compute,
        }
    }

    /// The bounding byte ranges the op reads and writes, given the render surface in effect
    /// when it runs (used by draws only). Empty for ops that touch no memory. A draw without a
    /// valid render surface is a `BadParameter` error.
    pub fn footprint(&self, render_surface: Option<&Surface>) -> Result<Vec<Extent>, OpError> {
        let surface = || {
            render_surface
                .filter(|s| s.validate().is_ok())
                .ok_or(OpError::BadParameter("draw without a render surface"))
        };
        Ok(match self {
            Op::ColorBlt(b) => b.footprint(),
            Op::SrcCopyBlt(b) => b.footprint(),
            Op::SurfaceState(_) => Vec::new(),
            Op::FillRect(f) => f.footprint(surface()?),
            Op::Triangle(t) => t.footprint(surface()?),
            Op::CscScale(c) => c.footprint(),
            Op::Dispatch(d) => d.footprint(),
        })
    }

    /// Executes the op. `render` is the render engine's context state (set by `SurfaceState`,
    /// used by draws). On error nothing has been written.
    pub fn execute(
        &self,
        mem: &mut Mem<'_>,
        render: &mut RenderState,
    ) -> Result<OpStats, ExecError> {
        let surface = |r: &RenderState| {
            r.surface
                .filter(|s| s.validate().is_ok())
                .ok_or(ExecError::NoSurface)
        };
        match self {
            Op::ColorBlt(b) => b.execute(mem),
            Op::SrcCopyBlt(b) => b.execute(mem),
            Op::SurfaceState(s) => {
                render.surface = Some(*s);
                Ok(OpStats::default())
            }
            Op::FillRect(f) => f.execute(mem, &surface(render)?),
            Op::Triangle(t) => t.execute(mem, &surface(render)?),
            Op::CscScale(c) => c.execute(mem),
            Op::Dispatch(d) => d.execute(mem),
        }
    }
}

/// A 64-bit address from its two dwords.
fn addr(lo: u32, hi: u32) -> GpuVa {
    GpuVa(u64::from(lo) | (u64::from(hi) << 32))
}

/// Splits a `low16 | high16 << 16` dword.
const fn split16(dw: u32) -> (u32, u32) {
    (dw & 0xFFFF, dw >> 16)
}

/// A 2-D byte image in memory: `rows` rows of `row_bytes` bytes, `pitch` bytes apart. Built only
/// by [`Image::new`], which checks the pitch and that the bounding range does not overflow, so
/// every row address below `rows` is computed without overflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Image {
    va: GpuVa,
    pitch: u64,
    row_bytes: u64,
    rows: u64,
}

impl Image {
    /// Checks `row_bytes <= pitch <= MAX_PITCH` and that the bounding range fits the address
    /// space. `rows` is at most `1.5 * MAX_DIM` for every caller.
    fn new(va: GpuVa, pitch: u32, row_bytes: u64, rows: u64) -> Result<Image, OpError> {
        if pitch > cmd::MAX_PITCH {
            return Err(OpError::BadParameter("pitch above MAX_PITCH"));
        }
        if u64::from(pitch) < row_bytes {
            return Err(OpError::BadParameter("pitch below the row size"));
        }
        let img = Image {
            va,
            pitch: u64::from(pitch),
            row_bytes,
            rows,
        };
        let len = img
            .checked_len()
            .ok_or(OpError::BadParameter("image size overflow"))?;
        va.checked_add(len)
            .ok_or(OpError::BadParameter("address overflow"))?;
        Ok(img)
    }

    fn checked_len(&self) -> Option<u64> {
        if self.is_empty() {
            return Some(0);
        }
        (self.rows - 1)
            .checked_mul(self.pitch)?
            .checked_add(self.row_bytes)
    }

    /// Bounding length in bytes (0 when empty).
    fn len(&self) -> u64 {
        self.checked_len().unwrap_or(0)
    }

    fn is_empty(&self) -> bool {
        self.rows == 0 || self.row_bytes == 0
    }

    /// Address of row `r` (`r < rows`: no overflow, checked by `new`).
    fn row(&self, r: u64) -> GpuVa {
        self.va.add(r * self.pitch)
    }

    /// The sub-image of `rows` rows from row `y`, `row_bytes` bytes from byte `x` of each row.
    /// Callers keep it inside `self`.
    fn sub(&self, x: u64, y: u64, row_bytes: u64, rows: u64) -> Image {
        Image {
            va: self.row(y).add(x),
            pitch: self.pitch,
            row_bytes,
            rows,
        }
    }

    /// The bounding extent, if the image is not empty.
    fn extent(&self, access: Access) -> Option<Extent> {
        (!self.is_empty()).then_some(Extent {
            va: self.va,
            len: self.len(),
            access,
        })
    }

    /// Whether the bounding ranges of two non-empty images intersect.
    fn overlaps(&self, other: &Image) -> bool {
        !self.is_empty()
            && !other.is_empty()
            && self.va.raw() < other.va.raw() + other.len()
            && other.va.raw() < self.va.raw() + self.len()
    }

    /// Translates every byte of every row for `access`, touching nothing.
    fn validate(&self, mem: &mut Mem<'_>, access: Access) -> Result<(), Fault> {
        if self.row_bytes == 0 {
            return Ok(());
        }
        for r in 0..self.rows {
            mem.spans(self.row(r), self.row_bytes, access, |_, _| {})?;
        }
        Ok(())
    }
}

/// `usize` from a length already bounded by the ABI limits (a few GiB at most).
fn usize_of(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}
