//! A vGPU behind the vfio-user server: regions, IRQs, DMA and reset mapped onto the device.
//!
//! Regions follow the VFIO PCI layout: 0 = BAR0 (registers, MSI-X, GGTT window; every access
//! trapped), 2 = BAR2 (the aperture: the vGPU's slice of the local-memory memfd, one sparse
//! mmap area covering it all; the MSI-X table and PBA are in BAR0, so nothing trapped is ever
//! mapped), 7 = config space; the others are empty. IRQs: MSI-X (index 2) with one eventfd per
//! vector; INTx, MSI, ERR and REQ exist with count 0.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE,
    VFIO_IRQ_INFO_NORESIZE, VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_UNMASK, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_BAR2_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vgpu_abi::pci::{BAR0_SIZE, MSIX_VECTORS};
use vgpu_device::addr::Gpa;
use vgpu_device::dma::DmaMap;
use vgpu_device::hist::Histogram;
use vgpu_device::vgpu::Vgpu;
use vgpu_vfio_user::{Backend, BackendError, DeviceInfo, DmaRegion, IrqInfo, RegionInfo};

use crate::irq::EventFdSink;

/// Size of the config-space region (PCI Express extended config space).
pub const CONFIG_SIZE: u64 = 4096;

/// The vfio-user face of one vGPU.
pub struct VgpuBackend {
    vgpu: Arc<Mutex<Vgpu>>,
    irq: Arc<EventFdSink>,
    dma: DmaMap,
    /// Regions mapped without shared memory: accepted, but unreachable for engines.
    no_shm: Vec<(u64, u64)>,
    /// Time spent handling each trapped region access (the device's share of a trap).
    trap: Arc<Histogram>,
    /// Migration v2 over vfio-user, when the owner can pause the engines.
    mig: Option<crate::vfio_migration::VfioMigration>,
    /// DMA logging: page size the client asked for.
    log_page_size: Option<u64>,
}

impl VgpuBackend {
    /// Serves `vgpu`, delivering MSI-X through eventfds (the client emulates the MSI-X table).
    pub fn new(vgpu: Arc<Mutex<Vgpu>>) -> Self {
        let irq = Arc::new(EventFdSink::default());
        {
            let v = vgpu.lock().unwrap_or_else(PoisonError::into_inner);
            v.set_interrupt_sink(irq.clone());
            v.shared().intr.set_external_msix(true);
        }
        VgpuBackend {
            mig: None,
            log_page_size: None,
            vgpu,
            irq,
            dma: DmaMap::new(),
            no_shm: Vec::new(),
            trap: Arc::default(),
        }
    }

    /// Enables migration v2 over vfio-user; `pause` stops and restarts the vGPU's engines.
    pub fn with_migration(mut self, pause: crate::vfio_migration::PauseHook) -> Self {
        self.mig = Some(crate::vfio_migration::VfioMigration::new(
            self.vgpu.clone(),
            pause,
        ));
        self
    }

    /// The trap-latency histogram: time from the server handing a region access to the
    /// backend until the device has handled it (the vGPU lock wait included).
    pub fn trap_latency(&self) -> &Arc<Histogram> {
        &self.trap
    }

    fn vgpu(&self) -> MutexGuard<'_, Vgpu> {
        self.vgpu.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The eventfd sink (for tests and stats).
    pub fn interrupts(&self) -> &Arc<EventFdSink> {
        &self.irq
    }

    fn read_region(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), BackendError> {
        let v = self.vgpu();
        match index {
            VFIO_PCI_BAR0_REGION_INDEX => v.bar0_read(offset, data),
            VFIO_PCI_BAR2_REGION_INDEX => v.bar2_read(offset, data),
            VFIO_PCI_CONFIG_REGION_INDEX => {
                let off = u16::try_from(offset)
                    .map_err(|_| BackendError::Invalid("config offset".into()))?;
                v.config_read(off, data);
            }
            _ => {
                return Err(BackendError::Invalid(format!(
                    "region {index} has no accesses"
                )))
            }
        }
        Ok(())
    }

    fn write_region(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        let mut v = self.vgpu();
        match index {
            VFIO_PCI_BAR0_REGION_INDEX => v.bar0_write(offset, data),
            VFIO_PCI_BAR2_REGION_INDEX => v.bar2_write(offset, data),
            VFIO_PCI_CONFIG_REGION_INDEX => {
                let off = u16::try_from(offset)
                    .map_err(|_| BackendError::Invalid("config offset".into()))?;
                // BAR moves and command-register changes are the client's to apply on its bus.
                let _ = v.config_write(off, data);
            }
            _ => {
                return Err(BackendError::Invalid(format!(
                    "region {index} has no accesses"
                )))
            }
        }
        Ok(())
    }
}

impl Backend for VgpuBackend {
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            // RESET is truthful; Cloud Hypervisor reads it inverted and so does not reset the
            // device when it (re)connects, which keeps restored state intact.
            flags: VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET,
            num_regions: VFIO_PCI_NUM_REGIONS,
            num_irqs: VFIO_PCI_NUM_IRQS,
        }
    }

    fn region_info(&self, index: u32) -> RegionInfo {
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        let empty = RegionInfo {
            size: 0,
            flags: 0,
            mmap: None,
            sparse_areas: Vec::new(),
        };
        match index {
            VFIO_PCI_BAR0_REGION_INDEX => RegionInfo {
                size: BAR0_SIZE,
                flags: rw,
                mmap: None,
                sparse_areas: Vec::new(),
            },
            VFIO_PCI_BAR2_REGION_INDEX => {
                let v = self.vgpu();
                let lmem = v.shared().lmem();
                RegionInfo {
                    size: lmem.size(),
                    flags: rw | VFIO_REGION_INFO_FLAG_MMAP,
                    mmap: Some((lmem.fd().as_raw_fd(), lmem.host_base().raw())),
                    sparse_areas: vec![(0, lmem.size())],
                }
            }
            VFIO_PCI_CONFIG_REGION_INDEX => RegionInfo {
                size: CONFIG_SIZE,
                flags: rw,
                mmap: None,
                sparse_areas: Vec::new(),
            },
            _ => empty,
        }
    }

    fn irq_info(&self, index: u32) -> IrqInfo {
        if index == VFIO_PCI_MSIX_IRQ_INDEX {
            IrqInfo {
                flags: VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_NORESIZE,
                count: u32::from(MSIX_VECTORS),
            }
        } else {
            IrqInfo {
                flags: VFIO_IRQ_INFO_EVENTFD,
                count: 0,
            }
        }
    }

    fn region_read(
        &mut self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), BackendError> {
        let t0 = Instant::now();
        let r = self.read_region(index, offset, data);
        self.trap.observe(t0.elapsed());
        r
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        let t0 = Instant::now();
        let r = self.write_region(index, offset, data);
        self.trap.observe(t0.elapsed());
        r
    }

    fn set_irqs(
        &mut self,
        index: u32,
        action: u32,
        start: u32,
        count: u32,
        fds: Vec<Option<File>>,
    ) -> Result<(), BackendError> {
        if index != VFIO_PCI_MSIX_IRQ_INDEX {
            return if count == 0 {
                Ok(())
            } else {
                Err(BackendError::Invalid(format!(
                    "IRQ index {index} has no vectors"
                )))
            };
        }
        let (start, count) = (start as usize, count as usize);
        match action {
            VFIO_IRQ_SET_ACTION_TRIGGER if count == 0 => self.irq.clear(),
            VFIO_IRQ_SET_ACTION_TRIGGER if fds.is_empty() => {
                // DATA_NONE trigger: fire the vectors (a loopback test of the client's wiring).
                for vec in start..start + count {
                    vgpu_device::irq::InterruptSink::trigger(
                        self.irq.as_ref(),
                        u16::try_from(vec).unwrap_or(u16::MAX),
                    );
                }
            }
            VFIO_IRQ_SET_ACTION_TRIGGER => {
                for f in fds.iter().flatten() {
                    crate::irq::check_eventfd(f).map_err(BackendError::Invalid)?;
                }
                self.irq.set_fds(start, fds);
            }
            VFIO_IRQ_SET_ACTION_MASK => self.irq.set_masked(start, count, true),
            VFIO_IRQ_SET_ACTION_UNMASK => self.irq.set_masked(start, count, false),
            _ => return Err(BackendError::Invalid(format!("IRQ action {action:#x}"))),
        }
        Ok(())
    }

    fn dma_map(&mut self, region: DmaRegion) -> Result<(), BackendError> {
        let Some(mapping) = region.mapping else {
            tracing::warn!(
                iova = region.iova,
                size = region.size,
                "DMA region without shared memory: the vGPU's engines cannot reach it"
            );
            self.no_shm.push((region.iova, region.size));
            return Ok(());
        };
        let next = self
            .dma
            .with_region(Gpa(region.iova), region.size, mapping, 0, region.writable)
            .map_err(|e| BackendError::Invalid(e.to_string()))?;
        self.vgpu().set_dma_map(next.clone());
        self.dma = next;
        Ok(())
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), BackendError> {
        if let Some(i) = self.no_shm.iter().position(|&r| r == (iova, size)) {
            self.no_shm.remove(i);
            return Ok(());
        }
        let next = self
            .dma
            .without_region(Gpa(iova), size)
            .map_err(|e| BackendError::Invalid(e.to_string()))?;
        self.vgpu().set_dma_map(next.clone());
        self.dma = next;
        Ok(())
    }

    fn reset(&mut self) -> Result<(), BackendError> {
        if let Some(m) = self.mig.as_mut() {
            m.reset();
        }
        self.vgpu()
            .function_reset()
            .map_err(|e| BackendError::Io(e.to_string()))?;
        Ok(())
    }

    fn migration_flags(&self) -> u64 {
        if self.mig.is_some() {
            u64::from(
                vfio_bindings::bindings::vfio::VFIO_MIGRATION_STOP_COPY
                    | vfio_bindings::bindings::vfio::VFIO_MIGRATION_PRE_COPY,
            )
        } else {
            0
        }
    }

    fn migration_transition(
        &mut self,
        from: vgpu_vfio_user::MigState,
        to: vgpu_vfio_user::MigState,
    ) -> Result<(), BackendError> {
        match self.mig.as_mut() {
            Some(m) => m.transition(from, to),
            None => Err(BackendError::NotSupported("migration".into())),
        }
    }

    fn migration_read(&mut self, max: usize) -> Result<Vec<u8>, BackendError> {
        match self.mig.as_mut() {
            Some(m) => m.read(max),
            None => Err(BackendError::NotSupported("migration".into())),
        }
    }

    fn migration_write(&mut self, data: &[u8]) -> Result<(), BackendError> {
        match self.mig.as_mut() {
            Some(m) => m.write(data),
            None => Err(BackendError::NotSupported("migration".into())),
        }
    }

    fn dma_logging_supported(&self) -> bool {
        true
    }

    fn dma_logging_start(
        &mut self,
        page_size: u64,
        ranges: &[(u64, u64)],
    ) -> Result<(), BackendError> {
        let _ = ranges;
        self.log_page_size = Some(page_size);
        self.vgpu().shared().dirty.start_gpa();
        Ok(())
    }

    fn dma_logging_stop(&mut self) -> Result<(), BackendError> {
        self.log_page_size = None;
        self.vgpu().shared().dirty.stop_gpa();
        Ok(())
    }

    fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), BackendError> {
        let pages = self.vgpu().shared().dirty.take_gpa(iova, length);
        for p in pages {
            let gpa = p * 4096;
            // A 4 KiB device page dirties every client page it overlaps.
            let first = gpa.saturating_sub(iova) / page_size;
            let last = (gpa + 4095)
                .saturating_sub(iova)
                .min(length.saturating_sub(1))
                / page_size;
            for bit in first..=last {
                if let Some(w) = usize::try_from(bit / 64)
                    .ok()
                    .and_then(|i| bitmap.get_mut(i))
                {
                    *w |= 1 << (bit % 64);
                }
            }
        }
        Ok(())
    }

    fn disconnected(&mut self) {
        // The client's mappings and eventfds die with its connection; the device state stays.
        self.irq.clear();
        self.dma = DmaMap::new();
        self.no_shm.clear();
        self.vgpu().set_dma_map(DmaMap::new());
    }
}
