//! vGPUs served by vgpud over vfio-user, attached with the `vfio_user` crate's client (the one
//! Cloud Hypervisor uses), the way Cloud Hypervisor attaches a `--user-device`:
//!
//! - the function is reset (`DEVICE_RESET`) when the VM starts;
//! - guest RAM is DMA-mapped by fd (the memfd), so the device reads and writes it directly;
//! - the aperture (BAR2) is the region's sparse mmap area, mapped here and given to KVM as a
//!   memslot: CPU accesses never reach the VMM or the daemon;
//! - config space and BAR0 accesses are forwarded as `REGION_READ`/`REGION_WRITE`, except the
//!   MSI-X table and PBA pages, which the VMM emulates (vgpud runs the vGPU in external MSI-X
//!   mode);
//! - each MSI-X vector is an eventfd handed to the daemon with `SET_IRQS` and registered as a
//!   KVM irqfd whose GSI route holds the table entry's message; masking (vector, function, MSI-X
//!   disabled) becomes `SET_IRQS` `MASK`/`UNMASK`, and the daemon keeps masked vectors pending.
//!
//! A dead connection never stops the VM: reads then return all-ones and writes are dropped.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_BAR2_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
};
use vfio_user::Client;
use vgpu_abi::pci::{CAP_MSIX_OFFSET, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, MSIX_VECTORS};
use vgpu_device::irq::NoInterrupts;
use vgpu_device::pci::Msix;
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;
use vmm_sys_util::eventfd::EventFd;

use super::Attached;
use crate::irq::{IrqError, MsiRouter};
use crate::memory::{GuestRam, HostMapping, MemoryError};
use crate::pci::{BarDecode, PciFunction};

/// Errors attaching to vgpud.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The socket did not answer.
    #[error("Cannot connect to {0}")]
    Connect(String, #[source] vfio_user::Error),
    /// A vfio-user request failed.
    #[error("vfio-user {0} failed")]
    Request(&'static str, #[source] vfio_user::Error),
    /// The device does not look like a vGPU.
    #[error("Not a vGPU: {0}")]
    NotVgpu(String),
    /// Interrupt wiring failed.
    #[error("Interrupts")]
    Irq(#[from] IrqError),
    /// The aperture could not be mapped.
    #[error("Aperture")]
    Memory(#[from] MemoryError),
}

const MSIX_PAGE: u64 = 0x1000;
const COMMAND_MEMORY: u16 = 1 << 1;
const MSIX_CTL_ENABLE: u16 = 1 << 15;
const MSIX_CTL_FUNCTION_MASK: u16 = 1 << 14;

/// A vGPU behind a vfio-user socket.
pub struct RemoteVgpu {
    client: Client,
    broken: bool,
    /// The VMM's MSI-X table (vgpud does not see it).
    msix: Msix,
    msix_control: u16,
    /// Mask state last sent to the daemon, per vector.
    masked: [bool; MSIX_VECTORS as usize],
    router: Arc<MsiRouter>,
    gsi_base: u32,
    /// The irqfds handed to the daemon (kept open for the VM's life).
    _irqfds: Vec<EventFd>,
    command: u16,
    bars: [u64; 2],
}

/// Connects to the vGPU at `socket`, maps guest RAM for DMA, maps the aperture and wires
/// MSI-X to irqfds on GSIs `gsi_base..`.
pub fn attach(
    socket: &Path,
    ram: &GuestRam,
    router: &Arc<MsiRouter>,
    gsi_base: u32,
) -> Result<Attached, RemoteError> {
    let mut client =
        Client::new(socket).map_err(|e| RemoteError::Connect(socket.display().to_string(), e))?;
    let mut id = [0u8; 4];
    client
        .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut id)
        .map_err(|e| RemoteError::Request("config read", e))?;
    let (vendor, device) = (
        u16::from_le_bytes([id[0], id[1]]),
        u16::from_le_bytes([id[2], id[3]]),
    );
    if (vendor, device) != (vgpu_abi::pci::VENDOR_ID, vgpu_abi::pci::DEVICE_ID) {
        return Err(RemoteError::NotVgpu(format!("{vendor:04x}:{device:04x}")));
    }
    let bar2 = client
        .region(VFIO_PCI_BAR2_REGION_INDEX)
        .ok_or_else(|| RemoteError::NotVgpu("no BAR2 region".into()))?;
    let (Some(fo), [area]) = (bar2.file_offset.as_ref(), bar2.sparse_areas.as_slice()) else {
        return Err(RemoteError::NotVgpu(
            "BAR2 is not one mappable sparse area".into(),
        ));
    };
    if area.offset != 0 || area.size != bar2.size {
        return Err(RemoteError::NotVgpu("BAR2 is not mappable whole".into()));
    }
    let aperture = HostMapping::new(fo.file().as_raw_fd(), fo.start(), area.size)?;
    client
        .dma_map(0, 0, ram.size(), ram.fd())
        .map_err(|e| RemoteError::Request("DMA_MAP", e))?;
    let irqfds = router.irqfds(gsi_base, MSIX_VECTORS)?;
    let fds: Vec<i32> = irqfds.iter().map(AsRawFd::as_raw_fd).collect();
    client
        .set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            u32::from(MSIX_VECTORS),
            &fds,
        )
        .map_err(|e| RemoteError::Request("SET_IRQS", e))?;
    // Out of reset every vector is masked in the table and MSI-X is disabled.
    client
        .set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK,
            0,
            u32::from(MSIX_VECTORS),
            &[],
        )
        .map_err(|e| RemoteError::Request("SET_IRQS", e))?;
    let label = format!("vfio-user {}", socket.display());
    let mut dev = RemoteVgpu {
        client,
        broken: false,
        msix: Msix::new(),
        msix_control: 0,
        masked: [true; MSIX_VECTORS as usize],
        router: router.clone(),
        gsi_base,
        _irqfds: irqfds,
        command: 0,
        bars: [0; 2],
    };
    dev.refresh();
    let dev = Arc::new(Mutex::new(dev));
    Ok(Attached {
        function: dev.clone(),
        regs: dev,
        aperture,
        label,
    })
}

impl RemoteVgpu {
    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) {
        if self.broken {
            data.fill(0xFF);
        } else if let Err(e) = self.client.region_read(region, offset, data) {
            self.fail(e);
            data.fill(0xFF);
        }
    }

    fn write(&mut self, region: u32, offset: u64, data: &[u8]) {
        if !self.broken {
            if let Err(e) = self.client.region_write(region, offset, data) {
                self.fail(e);
            }
        }
    }

    fn fail(&mut self, e: vfio_user::Error) {
        tracing::error!(error = %e, "vfio-user connection lost: the vGPU is gone");
        self.broken = true;
    }

    fn config16(&mut self, offset: u64) -> u16 {
        let mut b = [0u8; 2];
        self.read(VFIO_PCI_CONFIG_REGION_INDEX, offset, &mut b);
        u16::from_le_bytes(b)
    }

    fn bar(&mut self, offset: u64) -> u64 {
        let mut b = [0u8; 8];
        self.read(VFIO_PCI_CONFIG_REGION_INDEX, offset, &mut b[..4]);
        let mut hi = [0u8; 4];
        self.read(VFIO_PCI_CONFIG_REGION_INDEX, offset + 4, &mut hi);
        b[4..].copy_from_slice(&hi);
        u64::from_le_bytes(b) & !0xF
    }

    /// Re-reads what the bus and the interrupt wiring depend on from the device's config
    /// space: the command register, the BAR addresses and MSI-X control.
    fn refresh(&mut self) {
        self.command = self.config16(0x04);
        self.bars = [self.bar(0x10), self.bar(0x18)];
        let control = self.config16(u64::from(CAP_MSIX_OFFSET) + 2);
        if control != self.msix_control {
            self.msix_control = control;
            for v in 0..MSIX_VECTORS {
                self.sync_vector(v);
            }
        }
    }

    /// Routes vector `v` as the table says and tells the daemon whether it is masked.
    fn sync_vector(&mut self, v: u16) {
        let Some(e) = self.msix.entry(v) else { return };
        let gsi = self.gsi_base + u32::from(v);
        if let Err(err) = self.router.set_msi(gsi, e.address(), e.data) {
            tracing::warn!(vector = v, error = %err, "cannot route MSI-X vector");
        }
        let masked = e.masked()
            || self.msix_control & MSIX_CTL_ENABLE == 0
            || self.msix_control & MSIX_CTL_FUNCTION_MASK != 0;
        let i = usize::from(v);
        if self.masked.get(i) == Some(&masked) || self.broken {
            return;
        }
        let action = if masked {
            VFIO_IRQ_SET_ACTION_MASK
        } else {
            VFIO_IRQ_SET_ACTION_UNMASK
        };
        let r = self.client.set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_NONE | action,
            u32::from(v),
            1,
            &[],
        );
        match r {
            Ok(()) => {
                if let Some(m) = self.masked.get_mut(i) {
                    *m = masked;
                }
            }
            Err(e) => self.fail(e),
        }
    }
}

fn msix_table(offset: u64) -> Option<u64> {
    offset
        .checked_sub(MSIX_TABLE_OFFSET)
        .filter(|o| *o < MSIX_PAGE)
}

fn msix_pba(offset: u64) -> Option<u64> {
    offset
        .checked_sub(MSIX_PBA_OFFSET)
        .filter(|o| *o < MSIX_PAGE)
}

impl MutDeviceMmio for RemoteVgpu {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        if let Some(o) = msix_table(offset) {
            self.msix.table_read(o, data);
        } else if let Some(o) = msix_pba(offset) {
            // Pending bits of masked vectors live in the daemon; the VMM's view reads 0.
            self.msix.pba_read(o, data);
        } else {
            self.read(VFIO_PCI_BAR0_REGION_INDEX, offset, data);
        }
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if let Some(o) = msix_table(offset) {
            self.msix.table_write(o, data, false, true, &NoInterrupts);
            if let Ok(v) = u16::try_from(o / 16) {
                self.sync_vector(v);
            }
        } else if let Some(o) = msix_pba(offset) {
            self.msix.pba_write(o, data);
        } else {
            self.write(VFIO_PCI_BAR0_REGION_INDEX, offset, data);
        }
    }
}

impl PciFunction for RemoteVgpu {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.read(VFIO_PCI_CONFIG_REGION_INDEX, u64::from(offset), data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.write(VFIO_PCI_CONFIG_REGION_INDEX, u64::from(offset), data);
        let end = offset.saturating_add(u16::try_from(data.len()).unwrap_or(u16::MAX));
        let touches = |start: u16, len: u16| offset < start + len && start < end;
        let msix_ctl = u16::from(CAP_MSIX_OFFSET) + 2;
        if touches(0x04, 2) || touches(0x10, 0x10) || touches(msix_ctl, 2) {
            self.refresh();
        }
    }

    fn decode(&self) -> BarDecode {
        if self.command & COMMAND_MEMORY == 0 || self.broken {
            return BarDecode::default();
        }
        BarDecode {
            regs: Some(self.bars[0]),
            aperture: Some(self.bars[1]),
        }
    }
}
