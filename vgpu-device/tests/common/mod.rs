//! Shared setup for the device integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use vgpu_device::addr::Gpa;
use vgpu_device::dma::DmaMap;
use vgpu_device::driver::{Driver, Inline};
use vgpu_device::phys::{profile, PhysGpu, PhysGpuConfig};
use vgpu_device::vgpu::{GttMode, Vgpu, VgpuConfig};
use vm_memory::MmapRegion;

/// Guest-physical base of the test guest RAM.
pub const RAM_GPA: u64 = 0x1_0000_0000;
/// Size of the test guest RAM.
pub const RAM_SIZE: u64 = 8 << 20;

pub fn phys(lmem_mib: u64) -> PhysGpu {
    PhysGpu::new(PhysGpuConfig {
        lmem_size: lmem_mib << 20,
        max_vgpus: 64,
    })
    .unwrap()
}

pub struct Guest {
    pub ram: Arc<MmapRegion>,
}

impl Guest {
    pub fn new() -> Self {
        Guest {
            ram: Arc::new(MmapRegion::new(RAM_SIZE as usize).unwrap()),
        }
    }
    pub fn dma(&self) -> DmaMap {
        DmaMap::new()
            .with_region(Gpa(RAM_GPA), RAM_SIZE, self.ram.clone(), 0, true)
            .unwrap()
    }
    pub fn write(&self, gpa: u64, data: &[u8]) {
        let off = (gpa - RAM_GPA) as usize;
        assert!(off + data.len() <= RAM_SIZE as usize);
        // SAFETY: bounds checked above; tests are single-threaded with respect to this memory.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ram.as_ptr().add(off), data.len())
        }
    }
    pub fn read(&self, gpa: u64, data: &mut [u8]) {
        let off = (gpa - RAM_GPA) as usize;
        assert!(off + data.len() <= RAM_SIZE as usize);
        // SAFETY: as above.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ram.as_ptr().add(off), data.as_mut_ptr(), data.len())
        }
    }
}

pub fn vgpu(phys: &mut PhysGpu, name: &str, mode: GttMode) -> Vgpu {
    let p = phys.create_partition(profile(name).unwrap()).unwrap();
    Vgpu::new(
        p,
        &VgpuConfig {
            gtt_mode: mode,
            ..Default::default()
        },
    )
    .unwrap()
}

pub fn driver(v: &mut Vgpu) -> Driver<Inline<'_>> {
    Driver::probe(Inline(v)).unwrap()
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Helpers of the engine tests (tests/engines.rs, tests/malicious.rs).

use std::hash::{Hash, Hasher};
use std::time::Duration;

use vgpu_abi::cmd::{self, Client};
use vgpu_abi::gtt::pte_guest;
use vgpu_abi::{pci, regs, Engine, PAGE_SIZE};
use vgpu_device::irq::CountingInterrupts;

/// The guest driver of the in-process tests.
pub type Drv<'a> = Driver<Inline<'a>>;

/// How long a test waits for an engine to go idle.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// Guest-physical page of fences (dword slots), mapped at [`FENCE_GM_OFF`] in hidden GM.
pub const FENCE_GPA: u64 = RAM_GPA + 0x10000;
/// Offset of the fence page from the start of the hidden GM range.
pub const FENCE_GM_OFF: u64 = 0x80000;

impl Guest {
    /// Reads the dword at `gpa`.
    pub fn read_u32(&self, gpa: u64) -> u32 {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b);
        u32::from_le_bytes(b)
    }
    /// Reads `len` bytes at `gpa`.
    pub fn bytes(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.read(gpa, &mut b);
        b
    }
}

/// The commands `parts` one after another.
pub fn cat(parts: &[&[u32]]) -> Vec<u32> {
    parts.concat()
}

/// Little-endian bytes of dwords.
pub fn dw_bytes(dws: &[u32]) -> Vec<u8> {
    dws.iter().flat_map(|d| d.to_le_bytes()).collect()
}

/// BAR0 offset of engine `e`'s register `rel`.
pub fn ereg(e: Engine, rel: u32) -> u32 {
    regs::engine_base(e) + rel
}

/// `MI_LOAD_REGISTER_IMM` with several (register, value) pairs.
pub fn lri(pairs: &[(u32, u32)]) -> Vec<u32> {
    let n = u32::try_from(2 * pairs.len()).unwrap();
    let mut v = vec![cmd::header(Client::Mi, cmd::MI_LOAD_REGISTER_IMM, 0, n)];
    for &(r, x) in pairs {
        v.extend([r, x]);
    }
    v
}

/// Submits `cmds` to engine `e` and waits until the engine is idle; panics on any error.
pub fn run(d: &mut Drv<'_>, e: Engine, cmds: &[u32]) {
    d.submit(e, cmds).unwrap();
    d.wait_idle(e, IDLE_TIMEOUT).unwrap();
}

/// A 64-bit digest of `b`.
pub fn digest(b: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

/// The whole local memory of the driver's vGPU, read through the aperture.
pub fn lmem_all(d: &mut Drv<'_>) -> Vec<u8> {
    let mut b = vec![0u8; usize::try_from(d.pv().lmem_size).unwrap()];
    d.lmem_read(0, &mut b);
    b
}

/// Maps `pages` GM pages from `gm` onto consecutive guest pages from `gpa`.
pub fn map_guest(d: &mut Drv<'_>, gm: u64, gpa: u64, pages: u64) {
    for i in 0..pages {
        d.map_gm(gm + i * PAGE_SIZE, pte_guest(gpa + i * PAGE_SIZE));
    }
}

/// Maps the fence page (guest RAM at [`FENCE_GPA`]) into hidden GM and returns its GM address.
pub fn map_fence(d: &mut Drv<'_>) -> u64 {
    let gm = d.pv().hidden_base + FENCE_GM_OFF;
    map_guest(d, gm, FENCE_GPA, 1);
    gm
}

/// Enables MSI-X like a guest (bus master and memory space, MSI-X Enable in the message
/// control at capability offset 0x40 + 2, every vector unmasked in the table at BAR0 0x10000)
/// and attaches a counting sink.
pub fn enable_msix(v: &mut Vgpu) -> Arc<CountingInterrupts> {
    let sink = Arc::new(CountingInterrupts::default());
    v.set_interrupt_sink(sink.clone());
    v.config_write(0x04, &0x0406u16.to_le_bytes());
    v.config_write(
        u16::from(pci::CAP_MSIX_OFFSET) + 2,
        &(1u16 << 15).to_le_bytes(),
    );
    for vec in 0..u64::from(pci::MSIX_VECTORS) {
        let entry = pci::MSIX_TABLE_OFFSET + 16 * vec;
        v.bar0_write(entry, &0xFEE0_0000u32.to_le_bytes());
        v.bar0_write(entry + 4, &0u32.to_le_bytes());
        v.bar0_write(
            entry + 8,
            &(0x40 + u32::try_from(vec).unwrap()).to_le_bytes(),
        );
        v.bar0_write(entry + 12, &0u32.to_le_bytes());
    }
    sink
}

/// A mini vGPU with its own guest RAM (DMA-mapped).
pub struct Rig {
    pub phys: PhysGpu,
    pub v: Vgpu,
    pub g: Guest,
}

pub fn rig(mode: GttMode) -> Rig {
    let mut phys = phys(64);
    let g = Guest::new();
    let v = vgpu(&mut phys, "mini", mode);
    v.set_dma_map(g.dma());
    Rig { phys, v, g }
}

/// Dword slot `k` of the fence page: (GM address, guest-physical address).
pub fn slot(fence_gm: u64, k: u64) -> (u64, u64) {
    (fence_gm + 4 * k, FENCE_GPA + 4 * k)
}

/// Maps the fence page, clears it and returns its GM address.
pub fn fresh_fences(d: &mut Drv<'_>, g: &Guest) -> u64 {
    g.write(FENCE_GPA, &vec![0; usize::try_from(PAGE_SIZE).unwrap()]);
    map_fence(d)
}

/// Ring offset of engine `e`'s next submission, and the ring's GM address.
pub fn ring_pos(d: &mut Drv<'_>, e: Engine) -> (u32, u64) {
    let gm = d.gm_of_lmem(vgpu_device::driver::ring_lmem_offset(d.pv().lmem_size, e));
    (d.read32(regs::engine_base(e) + regs::RING_TAIL), gm)
}
