//! The BAR0 register map.
//!
//! All registers are 32 bits wide and little-endian. 64-bit quantities are split into `_LO`/`_HI`
//! pairs at consecutive offsets; an aligned 8-byte access to the `_LO` offset reads or writes both
//! halves at once. Accesses of other widths, unaligned accesses and accesses to offsets not listed
//! here read as all-ones and their writes are dropped (and counted by the device).

use crate::Engine;

/// How the guest may access a register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read-only: writes are dropped.
    Ro,
    /// Read-write.
    Rw,
    /// Read, write 1 to clear.
    Rw1c,
    /// Write-only: reads return 0.
    Wo,
}

/// One row of the register table: what a driver needs to know about a register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegInfo {
    /// Name as used in the manual.
    pub name: &'static str,
    /// Byte offset in BAR0.
    pub offset: u32,
    /// Guest access.
    pub access: Access,
    /// Value after reset. `PV_*` registers other than `PV_MAGIC`/`PV_VERSION` hold values of the
    /// vGPU's profile and partition instead (see `docs/device-spec.md`, section 6).
    pub reset: u32,
    /// Whether the register is loadable from a command stream with `MI_LOAD_REGISTER_IMM`.
    pub lri: bool,
}

/// Device identification: reads `"VGPU"` (little-endian bytes `56 47 50 55`).
pub const ID: u32 = 0x0000;
/// Value of [`ID`].
pub const ID_VALUE: u32 = 0x5550_4756;
/// Programming-interface version, [`crate::SPEC_VERSION`].
pub const VERSION: u32 = 0x0004;
/// Capabilities, `CAPS_*` bits.
pub const CAPS: u32 = 0x0008;
/// Per-context PPGTT translation is available.
pub const CAPS_PPGTT: u32 = 1 << 0;
/// A display plane is available.
pub const CAPS_DISPLAY: u32 = 1 << 1;
/// `MI_SEMAPHORE_WAIT` is available.
pub const CAPS_SEMAPHORE: u32 = 1 << 2;
/// Every capability this version implements.
pub const CAPS_VALUE: u32 = CAPS_PPGTT | CAPS_DISPLAY | CAPS_SEMAPHORE;

/// Reset control (write-only, reads 0): [`RESET_DEVICE`] or `RESET_ENGINE(e)` bits. Resets are
/// synchronous: when the write completes the reset is done.
pub const RESET_CTL: u32 = 0x0010;
/// Full vGPU reset: engines, rings, contexts (PPGTT roots, error state), interrupt status and
/// mask, scratch registers, the display plane and the GGTT (mappable range 1:1 onto local memory,
/// hidden range unmapped) return to their reset values; local memory and PCI config space
/// (including MSI-X) are kept.
pub const RESET_DEVICE: u32 = 1 << 0;
/// Reset of one engine: its ring is disabled, pending work dropped, error state cleared.
pub const fn reset_engine(e: Engine) -> u32 {
    1 << (8 + e as u32)
}

/// Scratch register 0: plain storage for the driver, no side effect.
pub const SCRATCH0: u32 = 0x0014;
/// Scratch register 1: plain storage for the driver, no side effect.
pub const SCRATCH1: u32 = 0x0018;

/// Interrupt status, write 1 to clear. Bits: `intr_user(e)`, `intr_error(e)`, `intr_reset(e)`,
/// [`INTR_GTT_FAULT`], [`INTR_FLIP_DONE`].
pub const INTR_STATUS: u32 = 0x0020;
/// Interrupt mask: a set bit masks the corresponding status bit. Reset value: all masked.
pub const INTR_MASK: u32 = 0x0024;
/// `INTR_STATUS & !INTR_MASK`, read-only.
pub const INTR_PENDING: u32 = 0x0028;

/// `MI_USER_INTERRUPT` executed on engine `e`.
pub const fn intr_user(e: Engine) -> u32 {
    1 << (4 * e as u32)
}
/// Engine `e`'s context entered the error state (command rejected by the scanner or a fault).
pub const fn intr_error(e: Engine) -> u32 {
    1 << (4 * e as u32 + 1)
}
/// Engine `e` was reset by the watchdog.
pub const fn intr_reset(e: Engine) -> u32 {
    1 << (4 * e as u32 + 2)
}
/// A GGTT write was dropped (see [`GTT_FAULT_COUNT`]).
pub const INTR_GTT_FAULT: u32 = 1 << 16;
/// The display plane latched a new surface.
pub const INTR_FLIP_DONE: u32 = 1 << 17;
/// Status bits delivered on MSI-X vector [`crate::pci::MSIX_VECTOR_DEVICE`]; engine `e`'s bits
/// (`0xF << 4e`) are delivered on vector `e`.
pub const INTR_DEVICE: u32 = INTR_GTT_FAULT | INTR_FLIP_DONE;

/// TLB / translation-cache invalidation (write-only): a mask of engines whose cached PPGTT
/// translations are dropped; bit 31 drops cached GGTT translations too.
pub const TLB_INVALIDATE: u32 = 0x0030;
/// Bit of [`TLB_INVALIDATE`] that invalidates cached GGTT translations.
pub const TLB_INVALIDATE_GGTT: u32 = 1 << 31;
/// Number of GGTT writes dropped since reset (outside the partition, reserved bits set, or a
/// target outside the vGPU's memory).
pub const GTT_FAULT_COUNT: u32 = 0x0034;
/// GM address of the most recently dropped GGTT write, low half.
pub const GTT_FAULT_ADDR_LO: u32 = 0x0038;
/// GM address of the most recently dropped GGTT write, high half.
pub const GTT_FAULT_ADDR_HI: u32 = 0x003C;

/// Start of the paravirtual information block (read-only). It tells the driver which part of GM
/// it owns (the "balloon" of XenGT): GGTT entries outside its ranges are dropped.
pub const PV_BASE: u32 = 0x0100;
/// PV magic, [`PV_MAGIC_VALUE`].
pub const PV_MAGIC: u32 = 0x0100;
/// `"VPVI"` in little-endian bytes.
pub const PV_MAGIC_VALUE: u32 = 0x4956_5056;
/// PV block version: 1.
pub const PV_VERSION: u32 = 0x0104;
/// Instance number of this vGPU on its physical GPU.
pub const PV_VGPU_ID: u32 = 0x0108;
/// Engines present (`Engine::mask_bit`).
pub const PV_ENGINE_MASK: u32 = 0x010C;
/// Base of the mappable GM range, low half (the high half follows at +4; same for all 64-bit PV fields).
pub const PV_MAPPABLE_BASE: u32 = 0x0110;
/// Size of the mappable GM range in bytes (64-bit).
pub const PV_MAPPABLE_SIZE: u32 = 0x0118;
/// Base of the hidden GM range (64-bit).
pub const PV_HIDDEN_BASE: u32 = 0x0120;
/// Size of the hidden GM range in bytes (64-bit).
pub const PV_HIDDEN_SIZE: u32 = 0x0128;
/// Size of local memory (and of the BAR2 aperture) in bytes (64-bit).
pub const PV_LMEM_SIZE: u32 = 0x0130;
/// Largest display plane width in pixels.
pub const PV_MAX_WIDTH: u32 = 0x0138;
/// Largest display plane height in pixels.
pub const PV_MAX_HEIGHT: u32 = 0x013C;
/// Size of the whole GM address space in bytes (64-bit).
pub const PV_GM_SIZE: u32 = 0x0140;
/// End of the PV block (exclusive).
pub const PV_END: u32 = 0x0148;

/// Base of engine `e`'s register block: `0x1000 + 0x100 * e`.
pub const fn engine_base(e: Engine) -> u32 {
    0x1000 + 0x100 * e as u32
}
/// Size of an engine register block.
pub const ENGINE_BLOCK_SIZE: u32 = 0x100;

/// Ring base GM address, low half (4 KiB aligned). Writes are dropped while the ring is enabled.
pub const RING_BASE_LO: u32 = 0x00;
/// Ring base GM address, high half.
pub const RING_BASE_HI: u32 = 0x04;
/// Ring size in bytes: a power of two from 4 KiB to 1 MiB. Writes dropped while enabled.
pub const RING_SIZE: u32 = 0x08;
/// Ring control: [`RING_CTL_ENABLE`].
pub const RING_CTL: u32 = 0x0C;
/// Enables the ring. Enabling resets HEAD and TAIL to 0 and clears the error state; enabling
/// with a bad base or size puts the engine into the error state instead.
pub const RING_CTL_ENABLE: u32 = 1 << 0;
/// Ring head: byte offset of the next command the engine fetches (read-only).
pub const RING_HEAD: u32 = 0x10;
/// Ring tail: byte offset one past the last command the driver submitted, dword aligned. A write
/// is the doorbell: the commands from the previous TAIL to the new one (wrapping) are scanned and
/// queued as one submission.
pub const RING_TAIL: u32 = 0x14;
/// GM (or PPGTT) address of the command the engine executed last, low half (read-only).
pub const ACTHD_LO: u32 = 0x18;
/// High half of [`ACTHD_LO`].
pub const ACTHD_HI: u32 = 0x1C;
/// Value written by the last completed `MI_STORE_DATA_IMM` (read-only).
pub const LAST_FENCE: u32 = 0x20;
/// Engine status: `ENGINE_STATUS_*` bits (read-only).
pub const ENGINE_STATUS: u32 = 0x24;
/// No work queued or running.
pub const ENGINE_STATUS_IDLE: u32 = 1 << 0;
/// The context is in the error state: submissions are ignored until the ring is re-enabled or
/// the engine is reset.
pub const ENGINE_STATUS_ERROR: u32 = 1 << 1;
/// The engine waits on an `MI_SEMAPHORE_WAIT`.
pub const ENGINE_STATUS_WAITING: u32 = 1 << 2;
/// PPGTT root of the context, low half: [`crate::gtt::PTE_VALID`] enables PPGTT translation,
/// [`crate::gtt::PTE_LOCAL`] says the root table is in local memory, bits 12.. hold its address.
/// Latched at each doorbell.
pub const PPGTT_ROOT_LO: u32 = 0x28;
/// High half of [`PPGTT_ROOT_LO`].
pub const PPGTT_ROOT_HI: u32 = 0x2C;
/// Reason code of the last rejected command ([`crate::cmd::AuditReason`]), 0 if none (read-only).
pub const ERROR_CODE: u32 = 0x30;
/// Header dword of the last rejected command (read-only).
pub const ERROR_HEADER: u32 = 0x34;
/// Address of the last rejected command, low half (read-only).
pub const ERROR_ADDR_LO: u32 = 0x38;
/// High half of [`ERROR_ADDR_LO`].
pub const ERROR_ADDR_HI: u32 = 0x3C;
/// General-purpose register `n` (0..8) of the engine: plain storage, loadable with
/// `MI_LOAD_REGISTER_IMM` and storable with `MI_STORE_REGISTER_MEM`.
pub const fn gpr(n: u32) -> u32 {
    0x40 + 4 * n
}
/// Number of general-purpose registers per engine.
pub const GPR_COUNT: u32 = 8;

/// Display plane control: [`PLANE_CTL_ENABLE`].
pub const PLANE_CTL: u32 = 0x2000;
/// Enables scan-out of the plane.
pub const PLANE_CTL_ENABLE: u32 = 1 << 0;
/// Pixel format of the plane: `PLANE_FORMAT_*`.
pub const PLANE_FORMAT: u32 = 0x2004;
/// 32-bit pixels, bytes B, G, R, X.
pub const PLANE_FORMAT_XRGB8888: u32 = 0;
/// 32-bit pixels, bytes B, G, R, A.
pub const PLANE_FORMAT_ARGB8888: u32 = 1;
/// 16-bit pixels, 5-6-5 bits R, G, B (B in the low bits).
pub const PLANE_FORMAT_RGB565: u32 = 2;
/// Surface GM address, low half (4 KiB aligned). A write latches the surface (a "flip"): write
/// the high half first.
pub const PLANE_SURF_LO: u32 = 0x2008;
/// Surface GM address, high half.
pub const PLANE_SURF_HI: u32 = 0x200C;
/// Plane width in pixels.
pub const PLANE_WIDTH: u32 = 0x2010;
/// Plane height in pixels.
pub const PLANE_HEIGHT: u32 = 0x2014;
/// Plane stride in bytes.
pub const PLANE_STRIDE: u32 = 0x2018;
/// Number of flips since reset (read-only).
pub const PLANE_FLIP_COUNT: u32 = 0x201C;

const fn r(name: &'static str, offset: u32, access: Access, reset: u32, lri: bool) -> RegInfo {
    RegInfo {
        name,
        offset,
        access,
        reset,
        lri,
    }
}

/// Global and display registers, in offset order.
pub const GLOBAL_REGISTERS: &[RegInfo] = &[
    r("ID", ID, Access::Ro, ID_VALUE, false),
    r("VERSION", VERSION, Access::Ro, crate::SPEC_VERSION, false),
    r("CAPS", CAPS, Access::Ro, CAPS_VALUE, false),
    r("RESET_CTL", RESET_CTL, Access::Wo, 0, false),
    r("SCRATCH0", SCRATCH0, Access::Rw, 0, true),
    r("SCRATCH1", SCRATCH1, Access::Rw, 0, true),
    r("INTR_STATUS", INTR_STATUS, Access::Rw1c, 0, false),
    r("INTR_MASK", INTR_MASK, Access::Rw, 0xFFFF_FFFF, false),
    r("INTR_PENDING", INTR_PENDING, Access::Ro, 0, false),
    r("TLB_INVALIDATE", TLB_INVALIDATE, Access::Wo, 0, false),
    r("GTT_FAULT_COUNT", GTT_FAULT_COUNT, Access::Ro, 0, false),
    r("GTT_FAULT_ADDR_LO", GTT_FAULT_ADDR_LO, Access::Ro, 0, false),
    r("GTT_FAULT_ADDR_HI", GTT_FAULT_ADDR_HI, Access::Ro, 0, false),
    r("PV_MAGIC", PV_MAGIC, Access::Ro, PV_MAGIC_VALUE, false),
    r("PV_VERSION", PV_VERSION, Access::Ro, 1, false),
    r("PV_VGPU_ID", PV_VGPU_ID, Access::Ro, 0, false),
    r("PV_ENGINE_MASK", PV_ENGINE_MASK, Access::Ro, 0, false),
    r(
        "PV_MAPPABLE_BASE_LO",
        PV_MAPPABLE_BASE,
        Access::Ro,
        0,
        false,
    ),
    r(
        "PV_MAPPABLE_BASE_HI",
        PV_MAPPABLE_BASE + 4,
        Access::Ro,
        0,
        false,
    ),
    r(
        "PV_MAPPABLE_SIZE_LO",
        PV_MAPPABLE_SIZE,
        Access::Ro,
        0,
        false,
    ),
    r(
        "PV_MAPPABLE_SIZE_HI",
        PV_MAPPABLE_SIZE + 4,
        Access::Ro,
        0,
        false,
    ),
    r("PV_HIDDEN_BASE_LO", PV_HIDDEN_BASE, Access::Ro, 0, false),
    r(
        "PV_HIDDEN_BASE_HI",
        PV_HIDDEN_BASE + 4,
        Access::Ro,
        0,
        false,
    ),
    r("PV_HIDDEN_SIZE_LO", PV_HIDDEN_SIZE, Access::Ro, 0, false),
    r(
        "PV_HIDDEN_SIZE_HI",
        PV_HIDDEN_SIZE + 4,
        Access::Ro,
        0,
        false,
    ),
    r("PV_LMEM_SIZE_LO", PV_LMEM_SIZE, Access::Ro, 0, false),
    r("PV_LMEM_SIZE_HI", PV_LMEM_SIZE + 4, Access::Ro, 0, false),
    r("PV_MAX_WIDTH", PV_MAX_WIDTH, Access::Ro, 0, false),
    r("PV_MAX_HEIGHT", PV_MAX_HEIGHT, Access::Ro, 0, false),
    r("PV_GM_SIZE_LO", PV_GM_SIZE, Access::Ro, 0, false),
    r("PV_GM_SIZE_HI", PV_GM_SIZE + 4, Access::Ro, 0, false),
    r("PLANE_CTL", PLANE_CTL, Access::Rw, 0, false),
    r("PLANE_FORMAT", PLANE_FORMAT, Access::Rw, 0, false),
    r("PLANE_SURF_LO", PLANE_SURF_LO, Access::Rw, 0, true),
    r("PLANE_SURF_HI", PLANE_SURF_HI, Access::Rw, 0, true),
    r("PLANE_WIDTH", PLANE_WIDTH, Access::Rw, 0, false),
    r("PLANE_HEIGHT", PLANE_HEIGHT, Access::Rw, 0, false),
    r("PLANE_STRIDE", PLANE_STRIDE, Access::Rw, 0, false),
    r("PLANE_FLIP_COUNT", PLANE_FLIP_COUNT, Access::Ro, 0, false),
];

/// Registers of one engine block, offsets relative to [`engine_base`].
pub const ENGINE_REGISTERS: &[RegInfo] = &[
    r("RING_BASE_LO", RING_BASE_LO, Access::Rw, 0, false),
    r("RING_BASE_HI", RING_BASE_HI, Access::Rw, 0, false),
    r("RING_SIZE", RING_SIZE, Access::Rw, 0, false),
    r("RING_CTL", RING_CTL, Access::Rw, 0, false),
    r("RING_HEAD", RING_HEAD, Access::Ro, 0, false),
    r("RING_TAIL", RING_TAIL, Access::Rw, 0, false),
    r("ACTHD_LO", ACTHD_LO, Access::Ro, 0, false),
    r("ACTHD_HI", ACTHD_HI, Access::Ro, 0, false),
    r("LAST_FENCE", LAST_FENCE, Access::Ro, 0, false),
    r(
        "ENGINE_STATUS",
        ENGINE_STATUS,
        Access::Ro,
        ENGINE_STATUS_IDLE,
        false,
    ),
    r("PPGTT_ROOT_LO", PPGTT_ROOT_LO, Access::Rw, 0, false),
    r("PPGTT_ROOT_HI", PPGTT_ROOT_HI, Access::Rw, 0, false),
    r("ERROR_CODE", ERROR_CODE, Access::Ro, 0, false),
    r("ERROR_HEADER", ERROR_HEADER, Access::Ro, 0, false),
    r("ERROR_ADDR_LO", ERROR_ADDR_LO, Access::Ro, 0, false),
    r("ERROR_ADDR_HI", ERROR_ADDR_HI, Access::Ro, 0, false),
    r("GPR0", gpr(0), Access::Rw, 0, true),
    r("GPR1", gpr(1), Access::Rw, 0, true),
    r("GPR2", gpr(2), Access::Rw, 0, true),
    r("GPR3", gpr(3), Access::Rw, 0, true),
    r("GPR4", gpr(4), Access::Rw, 0, true),
    r("GPR5", gpr(5), Access::Rw, 0, true),
    r("GPR6", gpr(6), Access::Rw, 0, true),
    r("GPR7", gpr(7), Access::Rw, 0, true),
];

/// Smallest ring size in bytes.
pub const RING_SIZE_MIN: u32 = 4096;
/// Largest ring size in bytes.
pub const RING_SIZE_MAX: u32 = 1 << 20;

/// Looks up the register at BAR0 offset `offset`: its table row and, for engine registers, the engine.
pub fn lookup(offset: u32) -> Option<(RegInfo, Option<Engine>)> {
    if let Some(info) = GLOBAL_REGISTERS.iter().find(|r| r.offset == offset) {
        return Some((*info, None));
    }
    let block = offset.checked_sub(0x1000)? / ENGINE_BLOCK_SIZE;
    let engine = Engine::from_index(block as usize)?;
    let rel = offset - engine_base(engine);
    ENGINE_REGISTERS
        .iter()
        .find(|r| r.offset == rel)
        .map(|info| (*info, Some(engine)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_lookup_engine_register_finds_engine() {
        let (info, e) = lookup(engine_base(Engine::Video) + RING_TAIL).unwrap();
        assert_eq!(info.name, "RING_TAIL");
        assert_eq!(e, Some(Engine::Video));
        assert!(lookup(0x1400).is_none(), "no fifth engine block");
        assert!(lookup(0x0002).is_none(), "unaligned offset");
    }

    #[test]
    fn test_register_offsets_unique_and_aligned() {
        for (i, a) in GLOBAL_REGISTERS.iter().enumerate() {
            assert_eq!(a.offset % 4, 0, "{}", a.name);
            assert!(
                a.offset < 0x1000 || a.offset >= 0x2000,
                "{} collides with engine blocks",
                a.name
            );
            for b in &GLOBAL_REGISTERS[i + 1..] {
                assert_ne!(a.offset, b.offset, "{} vs {}", a.name, b.name);
            }
        }
        for (i, a) in ENGINE_REGISTERS.iter().enumerate() {
            assert!(a.offset < ENGINE_BLOCK_SIZE);
            for b in &ENGINE_REGISTERS[i + 1..] {
                assert_ne!(a.offset, b.offset, "{} vs {}", a.name, b.name);
            }
        }
    }
}
