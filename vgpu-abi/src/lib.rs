//! The guest-visible contract of the vgpu device, as code.
//!
//! Everything a guest driver needs to program the vGPU lives here: PCI identity and BAR layout
//! ([`pci`]), the BAR0 register map ([`regs`]), the GTT and PPGTT entry formats ([`gtt`]), and the
//! command-stream encoding ([`cmd`]). The device model, the bare-metal guest driver and the tests
//! all use this crate, so the manual (`docs/device-spec.md`), the device and the driver cannot drift
//! apart. The crate is `no_std` and has no dependencies.
#![no_std]

pub mod cmd;
pub mod gtt;
pub mod pci;
pub mod regs;

/// Version of this programming interface, as reported by [`regs::VERSION`]: `major << 16 | minor`.
pub const SPEC_VERSION: u32 = 1 << 16;

/// The page size of every translation table (GGTT, PPGTT) and of local memory: 4 KiB.
pub const PAGE_SIZE: u64 = 4096;
/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u32 = 12;

/// An engine of the vGPU. The discriminant is the engine's index in registers and masks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Engine {
    /// 2-D/3-D rendering: surface fills, alpha blending, triangles.
    Render = 0,
    /// Blitter: rectangle copies and fills with raster operations.
    Blit = 1,
    /// Media: colour-space conversion and scaling (NV12 <-> XRGB8888).
    Video = 2,
    /// Compute: dispatch of a fixed kernel set (saxpy, reduce, matmul).
    Compute = 3,
}

impl Engine {
    /// Number of engines.
    pub const COUNT: usize = 4;
    /// All engines in index order.
    pub const ALL: [Engine; Engine::COUNT] =
        [Engine::Render, Engine::Blit, Engine::Video, Engine::Compute];

    /// The engine with index `i`, if any.
    pub const fn from_index(i: usize) -> Option<Engine> {
        match i {
            0 => Some(Engine::Render),
            1 => Some(Engine::Blit),
            2 => Some(Engine::Video),
            3 => Some(Engine::Compute),
            _ => None,
        }
    }

    /// Index of the engine in registers, masks and MSI-X vectors.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Bit of the engine in an engine mask.
    pub const fn mask_bit(self) -> u32 {
        1 << (self as u32)
    }

    /// Lower-case name, as used in the API and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Engine::Render => "render",
            Engine::Blit => "blit",
            Engine::Video => "video",
            Engine::Compute => "compute",
        }
    }
}

/// Mask with every engine set.
pub const ALL_ENGINES_MASK: u32 = 0xF;
