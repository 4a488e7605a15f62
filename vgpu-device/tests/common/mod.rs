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
