//! One virtual GPU: the PCI function a VM sees.
//!
//! [`Vgpu`] is the device a transport drives with `&mut self` calls: config space, BAR0 (registers,
//! MSI-X, GGTT window) and BAR2 (the aperture, for transports that cannot map it). Engine work
//! and interrupts go through [`VgpuShared`], which the engine workers share.

pub mod dirty;
pub mod display;
pub mod ggtt;
pub mod intr;
mod mmio;
pub mod persist;
pub mod policy;
pub mod shared;

use std::sync::Arc;

use vgpu_abi::regs;
use vgpu_abi::Engine;

use crate::addr::{hi32, lo32};
use crate::dma::DmaMap;
use crate::engine::context::ResetKind;
use crate::irq::InterruptSink;
use crate::pci::{ConfigSpace, ConfigWriteResult, PciError};
use crate::phys::Partition;

pub use ggtt::GttMode;
pub use shared::{VgpuShared, WorkNotify};

/// Errors creating or tearing down a vGPU.
#[derive(Debug, thiserror::Error)]
pub enum VgpuError {
    /// The PCI function could not be built for the partition.
    #[error("Cannot build the PCI function")]
    Pci(#[source] PciError),
    /// The vGPU is still referenced (an engine is executing its work).
    #[error("vGPU {0} is still in use")]
    Busy(u32),
}

/// Settings of a vGPU that are not part of its profile.
#[derive(Clone, Debug)]
pub struct VgpuConfig {
    /// GTT virtualization mode.
    pub gtt_mode: GttMode,
    /// Audit events kept.
    pub audit_capacity: usize,
}

impl Default for VgpuConfig {
    fn default() -> Self {
        VgpuConfig {
            gtt_mode: GttMode::Shadow,
            audit_capacity: 1024,
        }
    }
}

/// A virtual GPU.
pub struct Vgpu {
    shared: Arc<VgpuShared>,
    config: ConfigSpace,
}

impl Vgpu {
    /// Creates the vGPU of `partition`, in its reset state.
    pub fn new(partition: Partition, cfg: &VgpuConfig) -> Result<Self, VgpuError> {
        let config = ConfigSpace::new(partition.lmem.size()).map_err(VgpuError::Pci)?;
        let ggtt = ggtt::Ggtt::new(cfg.gtt_mode, partition.mappable, partition.hidden);
        let shared = Arc::new(VgpuShared::new(partition, ggtt, cfg.audit_capacity));
        let mut v = Vgpu { shared, config };
        v.reset_device();
        Ok(v)
    }

    /// The engine-visible half.
    pub fn shared(&self) -> &Arc<VgpuShared> {
        &self.shared
    }

    /// Instance id.
    pub fn id(&self) -> u32 {
        self.shared.id()
    }

    /// Tears the vGPU down and returns its partition (for `PhysGpu::release`, which scrubs it).
    /// Fails while an engine worker still holds the vGPU.
    pub fn into_partition(self) -> Result<Partition, Box<(Self, VgpuError)>> {
        let id = self.id();
        self.shared.set_notify(None);
        for e in Engine::ALL {
            self.shared.engine(e).reset(ResetKind::Full);
        }
        let Vgpu { shared, config } = self;
        match Arc::try_unwrap(shared) {
            Ok(s) => Ok(s.into_partition()),
            Err(shared) => Err(Box::new((Vgpu { shared, config }, VgpuError::Busy(id)))),
        }
    }

    /// Attaches the sink MSI-X messages are delivered to.
    pub fn set_interrupt_sink(&self, sink: Arc<dyn InterruptSink>) {
        self.shared.intr.set_sink(sink);
    }

    /// Replaces the DMA map (the VMM mapped or unmapped guest RAM).
    pub fn set_dma_map(&self, map: DmaMap) {
        self.shared.set_dma(Arc::new(map));
    }

    /// The PCI configuration space.
    pub fn config_space(&self) -> &ConfigSpace {
        &self.config
    }

    /// Reads config space.
    pub fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    /// Writes config space. MSI-X control changes are applied; BAR moves and command-register
    /// changes are returned for the bus to apply.
    pub fn config_write(&mut self, offset: u16, data: &[u8]) -> ConfigWriteResult {
        let res = self.config.write(offset, data);
        if let Some(c) = res.msix {
            self.shared.intr.set_control(c);
        }
        res
    }

    /// Full vGPU reset (`RESET_CTL` bit 0 and the creation state). PCI config space and MSI-X
    /// are kept; local memory is kept.
    pub fn reset_device(&mut self) {
        let s = &self.shared;
        for e in Engine::ALL {
            s.engine(e).reset(ResetKind::Full);
        }
        for r in regs::GLOBAL_REGISTERS {
            s.set_vreg(r.offset, r.reset);
        }
        for e in Engine::ALL {
            for r in regs::ENGINE_REGISTERS {
                s.set_vreg(regs::engine_base(e) + r.offset, r.reset);
            }
        }
        self.write_pv_block();
        s.intr.clear(u32::MAX);
        s.intr.set_mask(u32::MAX);
        s.ggtt.reset(s.lmem());
        s.reset_flip_count();
        display::reset(s);
    }

    /// PCI function-level reset (vfio-user `DEVICE_RESET`): config space, MSI-X and the device.
    pub fn function_reset(&mut self) -> Result<(), VgpuError> {
        self.config = ConfigSpace::new(self.shared.lmem().size()).map_err(VgpuError::Pci)?;
        self.shared.intr.reset();
        self.reset_device();
        Ok(())
    }

    pub(crate) fn set_config(&mut self, config: ConfigSpace) {
        self.config = config;
    }

    pub(crate) fn write_pv_block(&self) {
        let s = &self.shared;
        let p = s.partition();
        let set64 = |off: u32, v: u64| {
            s.set_vreg(off, lo32(v));
            s.set_vreg(off + 4, hi32(v));
        };
        s.set_vreg(regs::PV_VGPU_ID, p.id);
        s.set_vreg(regs::PV_ENGINE_MASK, p.profile.engine_mask);
        set64(regs::PV_MAPPABLE_BASE, p.mappable.start.raw());
        set64(regs::PV_MAPPABLE_SIZE, p.mappable.size);
        set64(regs::PV_HIDDEN_BASE, p.hidden.start.raw());
        set64(regs::PV_HIDDEN_SIZE, p.hidden.size);
        set64(regs::PV_LMEM_SIZE, p.lmem.size());
        s.set_vreg(regs::PV_MAX_WIDTH, p.profile.max_width);
        s.set_vreg(regs::PV_MAX_HEIGHT, p.profile.max_height);
        set64(regs::PV_GM_SIZE, vgpu_abi::pci::GM_SIZE);
    }
}
