//! vGPUs embedded in the VMM process: a software physical GPU and its scheduler live here, and
//! each vGPU is driven through `vm_device::MutDeviceMmio` (BAR0) and its config-space methods.
//! MSI-X goes through the device's own MSI-X table: the device masks and delivers, the sink
//! writes irqfds, and the VMM keeps the GSI routes in step with the table.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use vgpu_abi::pci::{BAR_APERTURE, BAR_REGS, MSIX_TABLE_OFFSET, MSIX_VECTORS};
use vgpu_device::dma::{DmaError, DmaMap};
use vgpu_device::phys::{profile, PhysError, PhysGpu, PhysGpuConfig};
use vgpu_device::sched::{SchedConfig, SchedError, SchedParams, Scheduler};
use vgpu_device::vgpu::{GttMode, Vgpu, VgpuConfig, VgpuError};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;

use super::Attached;
use crate::irq::{IrqError, IrqfdSink, MsiRouter};
use crate::memory::{GuestRam, HostMapping, MemoryError};
use crate::pci::{BarDecode, PciFunction};

/// Errors creating in-process vGPUs.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// No such profile.
    #[error("Unknown vGPU profile '{0}'")]
    UnknownProfile(String),
    /// The physical GPU refused.
    #[error("Physical GPU")]
    Phys(#[from] PhysError),
    /// The device model refused.
    #[error("vGPU")]
    Vgpu(#[from] VgpuError),
    /// The scheduler refused.
    #[error("Scheduler")]
    Sched(#[from] SchedError),
    /// Guest RAM could not be mapped for DMA.
    #[error("DMA map")]
    Dma(#[from] DmaError),
    /// Interrupt wiring failed.
    #[error("Interrupts")]
    Irq(#[from] IrqError),
    /// The aperture could not be mapped.
    #[error("Aperture")]
    Memory(#[from] MemoryError),
}

/// The in-process physical GPU and scheduler shared by the VM's in-process vGPUs.
pub struct LocalGpu {
    phys: PhysGpu,
    sched: Scheduler,
    ids: Vec<u32>,
}

impl LocalGpu {
    /// A software GPU with the default (sparse) local memory and a scheduler.
    pub fn new() -> Result<Self, LocalError> {
        Ok(LocalGpu {
            phys: PhysGpu::new(PhysGpuConfig::default())?,
            sched: Scheduler::new(&SchedConfig::default())?,
            ids: Vec::new(),
        })
    }

    /// Creates a vGPU of `profile` in `gtt` mode that can reach all of `ram`, raising its MSI-X
    /// vectors on GSIs `gsi_base..`.
    pub fn attach(
        &mut self,
        profile_name: &str,
        gtt: GttMode,
        ram: &GuestRam,
        router: &Arc<MsiRouter>,
        gsi_base: u32,
    ) -> Result<Attached, LocalError> {
        let p =
            profile(profile_name).ok_or_else(|| LocalError::UnknownProfile(profile_name.into()))?;
        let part = self.phys.create_partition(p)?;
        let vgpu = Vgpu::new(
            part,
            &VgpuConfig {
                gtt_mode: gtt,
                ..Default::default()
            },
        )?;
        vgpu.set_dma_map(DmaMap::from_guest_memory(ram.mem())?);
        let fds = router.irqfds(gsi_base, MSIX_VECTORS)?;
        vgpu.set_interrupt_sink(Arc::new(IrqfdSink::new(fds)));
        let lmem = vgpu.shared().lmem();
        let aperture =
            HostMapping::new(lmem.fd().as_raw_fd(), lmem.host_base().raw(), lmem.size())?;
        self.sched.add_vgpu(
            vgpu.shared().clone(),
            SchedParams {
                weight: p.default_weight,
                ..Default::default()
            },
        )?;
        self.ids.push(vgpu.id());
        let dev = Arc::new(Mutex::new(LocalVgpu {
            vgpu,
            router: router.clone(),
            gsi_base,
        }));
        Ok(Attached {
            function: dev.clone(),
            regs: dev,
            aperture,
            label: format!("in-process {}/{}", p.name, gtt_name(gtt)),
        })
    }
}

fn gtt_name(g: GttMode) -> &'static str {
    match g {
        GttMode::Shadow => "shadow",
        GttMode::TwoDim => "two-dim",
    }
}

impl Drop for LocalGpu {
    fn drop(&mut self) {
        // Stop the engines from using the vGPUs before they go away with the machine.
        for id in self.ids.drain(..) {
            if let Err(e) = self.sched.remove_vgpu(id) {
                tracing::warn!(id, error = %e, "cannot remove vGPU from the scheduler");
            }
        }
    }
}

/// One in-process vGPU on the VM's buses.
pub struct LocalVgpu {
    vgpu: Vgpu,
    router: Arc<MsiRouter>,
    gsi_base: u32,
}

impl LocalVgpu {
    /// Copies the MSI-X table's messages into the GSI routes.
    fn sync_routes(&self) {
        let entries: Vec<_> = self
            .vgpu
            .shared()
            .intr
            .with_msix(|m, _, _| (0..MSIX_VECTORS).filter_map(|v| m.entry(v)).collect());
        for (v, e) in (0u32..).zip(entries) {
            if let Err(err) = self.router.set_msi(self.gsi_base + v, e.address(), e.data) {
                tracing::warn!(vector = v, error = %err, "cannot route MSI-X vector");
            }
        }
    }

    fn is_bar0(&self, base: MmioAddress) -> bool {
        self.vgpu.config_space().bar_address(BAR_REGS) == Some(base.0)
    }
}

impl MutDeviceMmio for LocalVgpu {
    fn mmio_read(&mut self, base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        MutDeviceMmio::mmio_read(&mut self.vgpu, base, offset, data);
    }

    fn mmio_write(&mut self, base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        MutDeviceMmio::mmio_write(&mut self.vgpu, base, offset, data);
        let table = MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + 16 * u64::from(MSIX_VECTORS);
        if table.contains(&offset) && self.is_bar0(base) {
            self.sync_routes();
        }
    }
}

impl PciFunction for LocalVgpu {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.vgpu.config_read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        // MSI-X control changes are applied by the device itself; BAR moves and memory enable
        // are picked up through `decode`.
        let _ = self.vgpu.config_write(offset, data);
    }

    fn decode(&self) -> BarDecode {
        let c = self.vgpu.config_space();
        if !c.memory_enabled() {
            return BarDecode::default();
        }
        BarDecode {
            regs: c.bar_address(BAR_REGS),
            aperture: c.bar_address(BAR_APERTURE),
        }
    }
}
