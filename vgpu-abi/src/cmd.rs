//! Command-stream encoding.
//!
//! A command is a header dword followed by `len` payload dwords, little-endian:
//!
//! | bits   | field                                      |
//! |--------|--------------------------------------------|
//! | 31..29 | client ([`Client`])                        |
//! | 28..22 | opcode (per client, 7 bits)                |
//! | 21..16 | flags (per opcode, 6 bits)                 |
//! | 15..0  | `len`: number of dwords after the header   |
//!
//! Every opcode has a fixed `len` except `MI_LOAD_REGISTER_IMM`. A command whose `len` differs
//! from its opcode's is rejected by the device ([`AuditReason::BadLength`]). MI commands run on
//! every engine; other clients only on their engine ([`Client::engine`]). 64-bit addresses are
//! two dwords, low half first. Addresses are GM addresses translated by the GGTT, or PPGTT
//! virtual addresses when the engine's context has a valid `PPGTT_ROOT`.

use crate::Engine;

/// The client field of a header: which unit a command belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Client {
    /// Memory interface: control flow, fences, registers, interrupts. All engines.
    Mi = 0,
    /// Blitter commands. Blit engine.
    Blt = 1,
    /// Render commands. Render engine.
    Render = 2,
    /// Video commands. Video engine.
    Video = 3,
    /// Compute commands. Compute engine.
    Compute = 4,
}

impl Client {
    /// Decodes the 3-bit client field.
    pub const fn from_bits(b: u32) -> Option<Client> {
        match b {
            0 => Some(Client::Mi),
            1 => Some(Client::Blt),
            2 => Some(Client::Render),
            3 => Some(Client::Video),
            4 => Some(Client::Compute),
            _ => None,
        }
    }

    /// The engine that executes this client's commands (`None` for MI: every engine).
    pub const fn engine(self) -> Option<Engine> {
        match self {
            Client::Mi => None,
            Client::Blt => Some(Engine::Blit),
            Client::Render => Some(Engine::Render),
            Client::Video => Some(Engine::Video),
            Client::Compute => Some(Engine::Compute),
        }
    }
}

/// Builds a header dword.
pub const fn header(client: Client, opcode: u32, flags: u32, len: u32) -> u32 {
    ((client as u32) << 29) | ((opcode & 0x7F) << 22) | ((flags & 0x3F) << 16) | (len & 0xFFFF)
}

/// A decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Raw 3-bit client field.
    pub client: u32,
    /// Opcode.
    pub opcode: u32,
    /// Flags.
    pub flags: u32,
    /// Number of dwords after the header.
    pub len: u32,
}

impl Header {
    /// Splits a header dword into its fields.
    pub const fn parse(dw: u32) -> Header {
        Header {
            client: dw >> 29,
            opcode: (dw >> 22) & 0x7F,
            flags: (dw >> 16) & 0x3F,
            len: dw & 0xFFFF,
        }
    }
}

/// `MI_NOOP`: does nothing. The all-zero dword.
pub const MI_NOOP: u32 = 0x00;
/// `MI_USER_INTERRUPT`: sets `intr_user(engine)` in `INTR_STATUS`.
pub const MI_USER_INTERRUPT: u32 = 0x01;
/// `MI_BATCH_BUFFER_END`: ends the current batch buffer (returns to the caller level).
pub const MI_BATCH_BUFFER_END: u32 = 0x02;
/// `MI_BATCH_BUFFER_START` (len 2: address lo, hi). From the ring: starts a first-level batch.
/// From a first-level batch: with [`BBS_SECOND_LEVEL`] calls a second-level batch that returns
/// on its `MI_BATCH_BUFFER_END`; without it, chains (jumps) to another first-level batch. Not
/// allowed in a second-level batch.
pub const MI_BATCH_BUFFER_START: u32 = 0x03;
/// `MI_STORE_DATA_IMM` (len 3: address lo, hi, value): writes the dword `value` at the 4-byte
/// aligned address and sets the engine's `LAST_FENCE` to `value`. The fence primitive.
pub const MI_STORE_DATA_IMM: u32 = 0x04;
/// `MI_LOAD_REGISTER_IMM` (len 2n, 1 <= n <= [`LRI_MAX_PAIRS`]): pairs of (BAR0 register
/// offset, value). Only whitelisted registers: `SCRATCH0/1`, `PLANE_SURF_LO/HI` (a flip from the
/// command stream), and the `GPRn` of the executing engine.
pub const MI_LOAD_REGISTER_IMM: u32 = 0x05;
/// `MI_STORE_REGISTER_MEM` (len 3: register offset, address lo, hi): stores a register's value.
/// Readable registers: the LRI whitelist plus the executing engine's `RING_HEAD` and `LAST_FENCE`.
pub const MI_STORE_REGISTER_MEM: u32 = 0x06;
/// `MI_SEMAPHORE_WAIT` (len 3: address lo, hi, value): waits until the dword at the address is
/// equal to `value` (or, with [`SEM_GREATER_EQUAL`], unsigned `>=`). The engine serves other
/// vGPUs while this context waits. A wait that outlasts the watchdog resets the context.
pub const MI_SEMAPHORE_WAIT: u32 = 0x07;

/// Flag of `MI_BATCH_BUFFER_START`: call a second-level batch.
pub const BBS_SECOND_LEVEL: u32 = 1 << 0;
/// Flag of `MI_SEMAPHORE_WAIT`: wait for `>=` instead of `==`.
pub const SEM_GREATER_EQUAL: u32 = 1 << 0;
/// Most register pairs in one `MI_LOAD_REGISTER_IMM`.
pub const LRI_MAX_PAIRS: u32 = 32;

/// `XY_COLOR_BLT` (len 6): dw1 = ROP (bits 7..0) | bpp code (bits 9..8), dw2 = destination pitch
/// in bytes, dw3/dw4 = destination address, dw5 = width (15..0) | height (31..16) in pixels,
/// dw6 = colour (the pattern). Fills a rectangle: `D = rop(P = colour, S = 0, D)`.
pub const XY_COLOR_BLT: u32 = 0x01;
/// `XY_SRC_COPY_BLT` (len 9): dw1..dw5 as `XY_COLOR_BLT`, dw6 = source pitch, dw7/dw8 = source
/// address, dw9 = pattern colour. `D = rop(P, S, D)` over the rectangle; overlapping source and
/// destination behave as if the source were first copied aside.
pub const XY_SRC_COPY_BLT: u32 = 0x02;
/// Bits-per-pixel code 0: 8 bpp.
pub const BPP_8: u32 = 0;
/// Bits-per-pixel code 1: 16 bpp.
pub const BPP_16: u32 = 1;
/// Bits-per-pixel code 2: 32 bpp.
pub const BPP_32: u32 = 2;
/// ROP3 `SRCCOPY`: D = S.
pub const ROP_SRCCOPY: u8 = 0xCC;
/// ROP3 `PATCOPY`: D = P.
pub const ROP_PATCOPY: u8 = 0xF0;
/// ROP3 `SRCINVERT`: D = S ^ D.
pub const ROP_SRCINVERT: u8 = 0x66;
/// ROP3 `SRCAND`: D = S & D.
pub const ROP_SRCAND: u8 = 0x88;
/// ROP3 `SRCPAINT`: D = S | D.
pub const ROP_SRCPAINT: u8 = 0xEE;
/// ROP3 `DSTINVERT`: D = !D.
pub const ROP_DSTINVERT: u8 = 0x55;
/// ROP3 `PATINVERT`: D = P ^ D.
pub const ROP_PATINVERT: u8 = 0x5A;
/// ROP3 `BLACKNESS`: D = 0.
pub const ROP_BLACKNESS: u8 = 0x00;
/// ROP3 `WHITENESS`: D = all ones.
pub const ROP_WHITENESS: u8 = 0xFF;

/// `RENDER_SURFACE_STATE` (len 5): dw1/dw2 = render-target address, dw3 = pitch in bytes,
/// dw4 = width | height << 16, dw5 = format (`PLANE_FORMAT_XRGB8888` or `_ARGB8888`). Part of
/// the engine context: later render commands draw into this surface.
pub const RENDER_SURFACE_STATE: u32 = 0x01;
/// `RENDER_FILL_RECT` (len 3): dw1 = x | y << 16, dw2 = width | height << 16, dw3 = ARGB colour.
/// Clipped to the surface. With [`RENDER_BLEND`], source-over blending with the colour's alpha.
pub const RENDER_FILL_RECT: u32 = 0x02;
/// `RENDER_TRIANGLE` (len 4): dw1..dw3 = vertices x | y << 16 (unsigned pixels), dw4 = colour.
/// Covers the pixels whose centre lies inside the triangle or on a top or left edge (either
/// winding). Clipped to the surface. [`RENDER_BLEND`] as for rectangles.
pub const RENDER_TRIANGLE: u32 = 0x03;
/// Flag of render draw commands: blend source-over.
pub const RENDER_BLEND: u32 = 1 << 0;

/// `VIDEO_CSC_SCALE` (len 9): dw1/dw2 = source address, dw3 = source pitch, dw4 = source width |
/// height << 16, dw5/dw6 = destination address, dw7 = destination pitch, dw8 = destination width
/// | height << 16, dw9 = mode ([`CSC_NV12_TO_XRGB`] or [`CSC_XRGB_TO_NV12`]). Converts colour
/// space (BT.601 limited range, integer) and scales (nearest neighbour). An NV12 image is a Y
/// plane (`pitch * height` bytes) followed directly by an interleaved UV plane of `height / 2`
/// rows at the same pitch; its width and height must be even.
pub const VIDEO_CSC_SCALE: u32 = 0x01;
/// CSC mode: NV12 source, XRGB8888 destination.
pub const CSC_NV12_TO_XRGB: u32 = 0;
/// CSC mode: XRGB8888 source, NV12 destination.
pub const CSC_XRGB_TO_NV12: u32 = 1;

/// `COMPUTE_DISPATCH` (len 11): dw1 = kernel (`KERNEL_*`), dw2..dw4 = parameters p0..p2,
/// dw5 = scalar (f32 bits), dw6/dw7 = buffer A, dw8/dw9 = buffer B, dw10/dw11 = buffer C.
pub const COMPUTE_DISPATCH: u32 = 0x01;
/// Kernel `saxpy`: `B[i] = scalar * A[i] + B[i]` for `i < p0`, f32, multiply then add (no FMA).
pub const KERNEL_SAXPY: u32 = 0;
/// Kernel `reduce`: the u64 at C = wrapping sum of the u32 `A[i]`, `i < p0`.
pub const KERNEL_REDUCE_SUM: u32 = 1;
/// Kernel `matmul`: `C[m][n] = sum_k A[m][k] * B[k][n]`, f32 row-major, M = p0, K = p1, N = p2,
/// accumulated from 0.0 in ascending k, multiply then add.
pub const KERNEL_MATMUL: u32 = 2;

/// Largest blit / render / video rectangle side in pixels.
pub const MAX_DIM: u32 = 16384;
/// Largest pitch in bytes.
pub const MAX_PITCH: u32 = 256 * 1024;
/// Largest element count of `saxpy` and `reduce`.
pub const MAX_ELEMENTS: u32 = 1 << 24;
/// Largest `M * K * N` of `matmul`.
pub const MAX_MATMUL_OPS: u64 = 1 << 28;
/// Largest batch buffer, in bytes, from its start to its `MI_BATCH_BUFFER_END`.
pub const MAX_BATCH_BYTES: u32 = 256 * 1024;
/// Most batch buffers one ring submission may reach (first and second level together).
pub const MAX_BATCHES_PER_SUBMISSION: u32 = 64;

/// The fixed payload length of a command, or `None` for unknown commands and variable ones.
pub const fn fixed_len(client: Client, opcode: u32) -> Option<u32> {
    match (client, opcode) {
        (Client::Mi, MI_NOOP | MI_USER_INTERRUPT | MI_BATCH_BUFFER_END) => Some(0),
        (Client::Mi, MI_BATCH_BUFFER_START) => Some(2),
        (Client::Mi, MI_STORE_DATA_IMM | MI_STORE_REGISTER_MEM | MI_SEMAPHORE_WAIT) => Some(3),
        (Client::Blt, XY_COLOR_BLT) => Some(6),
        (Client::Blt, XY_SRC_COPY_BLT) => Some(9),
        (Client::Render, RENDER_SURFACE_STATE) => Some(5),
        (Client::Render, RENDER_FILL_RECT) => Some(3),
        (Client::Render, RENDER_TRIANGLE) => Some(4),
        (Client::Video, VIDEO_CSC_SCALE) => Some(9),
        (Client::Compute, COMPUTE_DISPATCH) => Some(11),
        _ => None,
    }
}

/// Why the device rejected a command or faulted a context. Reported in `ERROR_CODE` and in
/// audit events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum AuditReason {
    /// Unknown client or opcode.
    UnknownOpcode = 1,
    /// `len` does not match the opcode, or the command runs past the end of its buffer.
    BadLength = 2,
    /// An address does not resolve inside the vGPU's partition, PPGTT or memory.
    AddressOutOfRange = 3,
    /// `MI_LOAD_REGISTER_IMM` / `MI_STORE_REGISTER_MEM` on a register not whitelisted.
    ForbiddenRegister = 4,
    /// A batch buffer chain or call reaches a batch already in the submission.
    BatchLoop = 5,
    /// A batch has no `MI_BATCH_BUFFER_END` within `MAX_BATCH_BYTES`, or the submission reaches
    /// more than `MAX_BATCHES_PER_SUBMISSION` batches.
    BatchTooLong = 6,
    /// `MI_BATCH_BUFFER_START` inside a second-level batch.
    BatchNesting = 7,
    /// A size, count, format or alignment parameter is out of range.
    BadParameter = 8,
    /// `RING_TAIL` outside the ring or unaligned, or the ring enabled with a bad base or size.
    BadRing = 9,
    /// An engine write through a read-only translation.
    ReadOnlyWrite = 10,
    /// A non-MI command on an engine that does not execute its client.
    WrongEngine = 11,
    /// The watchdog found the context running or waiting too long and reset it.
    Watchdog = 12,
    /// The device failed internally while executing this context's work (a host-side defect,
    /// not a guest error) and reset the context; other contexts and vGPUs are unaffected.
    DeviceFault = 13,
}

impl AuditReason {
    /// Decodes an `ERROR_CODE` value.
    pub const fn from_code(c: u32) -> Option<AuditReason> {
        use AuditReason::*;
        Some(match c {
            1 => UnknownOpcode,
            2 => BadLength,
            3 => AddressOutOfRange,
            4 => ForbiddenRegister,
            5 => BatchLoop,
            6 => BatchTooLong,
            7 => BatchNesting,
            8 => BadParameter,
            9 => BadRing,
            10 => ReadOnlyWrite,
            11 => WrongEngine,
            12 => Watchdog,
            13 => DeviceFault,
            _ => return None,
        })
    }

    /// Short snake-case name used in logs and the API.
    pub const fn name(self) -> &'static str {
        use AuditReason::*;
        match self {
            UnknownOpcode => "unknown_opcode",
            BadLength => "bad_length",
            AddressOutOfRange => "address_out_of_range",
            ForbiddenRegister => "forbidden_register",
            BatchLoop => "batch_loop",
            BatchTooLong => "batch_too_long",
            BatchNesting => "batch_nesting",
            BadParameter => "bad_parameter",
            BadRing => "bad_ring",
            ReadOnlyWrite => "read_only_write",
            WrongEngine => "wrong_engine",
            Watchdog => "watchdog",
            DeviceFault => "device_fault",
        }
    }
}

/// Encoders for drivers and tests: each returns the command's dwords.
pub mod enc {
    use super::*;

    const fn lo(a: u64) -> u32 {
        (a & 0xFFFF_FFFF) as u32
    }
    const fn hi(a: u64) -> u32 {
        (a >> 32) as u32
    }
    const fn wh(w: u32, h: u32) -> u32 {
        (w & 0xFFFF) | (h << 16)
    }

    /// `MI_NOOP`.
    pub const fn noop() -> [u32; 1] {
        [header(Client::Mi, MI_NOOP, 0, 0)]
    }
    /// `MI_USER_INTERRUPT`.
    pub const fn user_interrupt() -> [u32; 1] {
        [header(Client::Mi, MI_USER_INTERRUPT, 0, 0)]
    }
    /// `MI_BATCH_BUFFER_END`.
    pub const fn batch_end() -> [u32; 1] {
        [header(Client::Mi, MI_BATCH_BUFFER_END, 0, 0)]
    }
    /// `MI_BATCH_BUFFER_START`.
    pub const fn batch_start(addr: u64, second_level: bool) -> [u32; 3] {
        let f = if second_level { BBS_SECOND_LEVEL } else { 0 };
        [
            header(Client::Mi, MI_BATCH_BUFFER_START, f, 2),
            lo(addr),
            hi(addr),
        ]
    }
    /// `MI_STORE_DATA_IMM`.
    pub const fn store_data_imm(addr: u64, value: u32) -> [u32; 4] {
        [
            header(Client::Mi, MI_STORE_DATA_IMM, 0, 3),
            lo(addr),
            hi(addr),
            value,
        ]
    }
    /// `MI_LOAD_REGISTER_IMM` with one register.
    pub const fn load_register_imm(reg: u32, value: u32) -> [u32; 3] {
        [header(Client::Mi, MI_LOAD_REGISTER_IMM, 0, 2), reg, value]
    }
    /// `MI_STORE_REGISTER_MEM`.
    pub const fn store_register_mem(reg: u32, addr: u64) -> [u32; 4] {
        [
            header(Client::Mi, MI_STORE_REGISTER_MEM, 0, 3),
            reg,
            lo(addr),
            hi(addr),
        ]
    }
    /// `MI_SEMAPHORE_WAIT`.
    pub const fn semaphore_wait(addr: u64, value: u32, greater_equal: bool) -> [u32; 4] {
        let f = if greater_equal { SEM_GREATER_EQUAL } else { 0 };
        [
            header(Client::Mi, MI_SEMAPHORE_WAIT, f, 3),
            lo(addr),
            hi(addr),
            value,
        ]
    }
    /// `XY_COLOR_BLT`.
    pub const fn color_blt(
        rop: u8,
        bpp: u32,
        dst: u64,
        pitch: u32,
        w: u32,
        h: u32,
        color: u32,
    ) -> [u32; 7] {
        [
            header(Client::Blt, XY_COLOR_BLT, 0, 6),
            rop as u32 | (bpp << 8),
            pitch,
            lo(dst),
            hi(dst),
            wh(w, h),
            color,
        ]
    }
    /// Geometry of one `XY_SRC_COPY_BLT`.
    #[derive(Clone, Copy, Debug)]
    pub struct Copy {
        /// ROP3 code.
        pub rop: u8,
        /// `BPP_*` code.
        pub bpp: u32,
        /// Destination address.
        pub dst: u64,
        /// Destination pitch in bytes.
        pub dst_pitch: u32,
        /// Source address.
        pub src: u64,
        /// Source pitch in bytes.
        pub src_pitch: u32,
        /// Width in pixels.
        pub width: u32,
        /// Height in pixels.
        pub height: u32,
        /// Pattern colour.
        pub pattern: u32,
    }
    /// `XY_SRC_COPY_BLT`.
    pub const fn src_copy_blt(c: Copy) -> [u32; 10] {
        [
            header(Client::Blt, XY_SRC_COPY_BLT, 0, 9),
            c.rop as u32 | (c.bpp << 8),
            c.dst_pitch,
            lo(c.dst),
            hi(c.dst),
            wh(c.width, c.height),
            c.src_pitch,
            lo(c.src),
            hi(c.src),
            c.pattern,
        ]
    }
    /// `RENDER_SURFACE_STATE`.
    pub const fn surface_state(addr: u64, pitch: u32, w: u32, h: u32, format: u32) -> [u32; 6] {
        [
            header(Client::Render, RENDER_SURFACE_STATE, 0, 5),
            lo(addr),
            hi(addr),
            pitch,
            wh(w, h),
            format,
        ]
    }
    /// `RENDER_FILL_RECT`.
    pub const fn fill_rect(x: u32, y: u32, w: u32, h: u32, argb: u32, blend: bool) -> [u32; 4] {
        let f = if blend { RENDER_BLEND } else { 0 };
        [
            header(Client::Render, RENDER_FILL_RECT, f, 3),
            wh(x, y),
            wh(w, h),
            argb,
        ]
    }
    /// `RENDER_TRIANGLE`.
    pub const fn triangle(v: [(u32, u32); 3], argb: u32, blend: bool) -> [u32; 5] {
        let f = if blend { RENDER_BLEND } else { 0 };
        [
            header(Client::Render, RENDER_TRIANGLE, f, 4),
            wh(v[0].0, v[0].1),
            wh(v[1].0, v[1].1),
            wh(v[2].0, v[2].1),
            argb,
        ]
    }
    /// Geometry of one `VIDEO_CSC_SCALE`.
    #[derive(Clone, Copy, Debug)]
    pub struct Csc {
        /// Source address.
        pub src: u64,
        /// Source pitch in bytes.
        pub src_pitch: u32,
        /// Source width and height.
        pub src_size: (u32, u32),
        /// Destination address.
        pub dst: u64,
        /// Destination pitch in bytes.
        pub dst_pitch: u32,
        /// Destination width and height.
        pub dst_size: (u32, u32),
        /// `CSC_*` mode.
        pub mode: u32,
    }
    /// `VIDEO_CSC_SCALE`.
    pub const fn csc_scale(c: Csc) -> [u32; 10] {
        [
            header(Client::Video, VIDEO_CSC_SCALE, 0, 9),
            lo(c.src),
            hi(c.src),
            c.src_pitch,
            wh(c.src_size.0, c.src_size.1),
            lo(c.dst),
            hi(c.dst),
            c.dst_pitch,
            wh(c.dst_size.0, c.dst_size.1),
            c.mode,
        ]
    }
    /// Arguments of one `COMPUTE_DISPATCH`.
    #[derive(Clone, Copy, Debug)]
    pub struct Dispatch {
        /// `KERNEL_*`.
        pub kernel: u32,
        /// Parameters p0..p2.
        pub params: [u32; 3],
        /// Scalar argument.
        pub scalar: f32,
        /// Buffers A, B, C.
        pub buffers: [u64; 3],
    }
    /// `COMPUTE_DISPATCH`.
    pub fn dispatch(d: Dispatch) -> [u32; 12] {
        [
            header(Client::Compute, COMPUTE_DISPATCH, 0, 11),
            d.kernel,
            d.params[0],
            d.params[1],
            d.params[2],
            d.scalar.to_bits(),
            lo(d.buffers[0]),
            hi(d.buffers[0]),
            lo(d.buffers[1]),
            hi(d.buffers[1]),
            lo(d.buffers[2]),
            hi(d.buffers[2]),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_header_roundtrip_fields() {
        let dw = header(Client::Video, VIDEO_CSC_SCALE, 0x15, 9);
        let h = Header::parse(dw);
        assert_eq!(
            (h.client, h.opcode, h.flags, h.len),
            (3, VIDEO_CSC_SCALE, 0x15, 9)
        );
        assert_eq!(enc::noop()[0], 0, "MI_NOOP is the zero dword");
    }

    #[test]
    fn test_encoders_match_fixed_len() {
        let cases: [(&[u32], Client, u32); 5] = [
            (&enc::store_data_imm(0, 0), Client::Mi, MI_STORE_DATA_IMM),
            (
                &enc::color_blt(0, 0, 0, 0, 0, 0, 0),
                Client::Blt,
                XY_COLOR_BLT,
            ),
            (
                &enc::triangle([(0, 0); 3], 0, false),
                Client::Render,
                RENDER_TRIANGLE,
            ),
            (
                &enc::surface_state(0, 0, 0, 0, 0),
                Client::Render,
                RENDER_SURFACE_STATE,
            ),
            (
                &enc::batch_start(0, false),
                Client::Mi,
                MI_BATCH_BUFFER_START,
            ),
        ];
        for (dws, c, op) in cases {
            let h = Header::parse(dws[0]);
            assert_eq!(Some(h.len), fixed_len(c, op));
            assert_eq!(u32::try_from(dws.len()).unwrap(), h.len + 1);
        }
    }

    #[test]
    fn test_audit_reason_codes_roundtrip() {
        for c in 1..=13 {
            assert_eq!(AuditReason::from_code(c).unwrap() as u32, c);
        }
        assert!(AuditReason::from_code(0).is_none());
        assert!(AuditReason::from_code(14).is_none());
    }
}
