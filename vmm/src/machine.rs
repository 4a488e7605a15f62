//! The machine the vCPU exits into: port I/O (PCI config mechanism, debug ports), the MMIO bus
//! (vGPU BAR0s and the empty-handler page, on a `vm_device` `IoManager`), and the BAR mappings
//! that follow the guest's config writes.

use std::sync::{Arc, Mutex, PoisonError};

use kvm_ioctls::VmFd;
use vgpu_abi::pci::BAR0_SIZE;
use vm_device::bus::{MmioAddress, MmioRange};
use vm_device::device_manager::{IoManager, MmioManager};
use vm_device::DeviceMmio;

use crate::boot_info::{MMIO64_BASE, MMIO64_SIZE, NULL_MMIO_GPA};
use crate::devices::debug::{DebugPorts, NullMmio};
use crate::devices::Attached;
use crate::memory::{set_memslot, HostMapping};
use crate::pci::{BarDecode, PciFunction, PciRoot};

/// Errors building the machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// A fixed MMIO range could not be registered.
    #[error("Cannot register MMIO at {0:#x}")]
    Mmio(u64, #[source] vm_device::bus::Error),
}

/// Counts of what the vCPU exited for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitStats {
    /// Port reads and writes.
    pub pio: u64,
    /// MMIO reads and writes that reached a device.
    pub mmio: u64,
    /// MMIO accesses where nothing decodes (reads all-ones, writes dropped).
    pub unhandled_mmio: u64,
}

/// One attached vGPU and where its BARs are mapped now.
struct Slot {
    function: Arc<Mutex<dyn PciFunction>>,
    regs: Arc<dyn DeviceMmio + Send + Sync>,
    aperture: HostMapping,
    memslot: u32,
    mapped: BarDecode,
    label: String,
}

/// Everything the vCPU loop dispatches exits to.
pub struct Machine {
    vm: Arc<VmFd>,
    io: IoManager,
    pci: PciRoot,
    slots: Vec<Slot>,
    debug: DebugPorts,
    null: Arc<NullMmio>,
    stats: ExitStats,
}

/// First memslot used for apertures (slot 0 is RAM).
const FIRST_APERTURE_SLOT: u32 = 1;

impl Machine {
    /// A machine with the host bridge, the debug ports and the empty-handler page.
    pub fn new(vm: Arc<VmFd>, debug: DebugPorts) -> Result<Self, MachineError> {
        let mut io = IoManager::new();
        let null = Arc::new(NullMmio::default());
        let range = MmioRange::new(MmioAddress(NULL_MMIO_GPA), 0x1000)
            .map_err(|e| MachineError::Mmio(NULL_MMIO_GPA, e))?;
        io.register_mmio(range, null.clone())
            .map_err(|e| MachineError::Mmio(NULL_MMIO_GPA, e))?;
        Ok(Machine {
            vm,
            io,
            pci: PciRoot::new(),
            slots: Vec::new(),
            debug,
            null,
            stats: ExitStats::default(),
        })
    }

    /// Puts `dev` on the PCI bus as the next device.
    pub fn attach(&mut self, dev: Attached) {
        let memslot = FIRST_APERTURE_SLOT + u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
        let n = self.pci.add(dev.function.clone());
        tracing::info!(device = n, label = %dev.label, "vGPU attached");
        self.slots.push(Slot {
            function: dev.function,
            regs: dev.regs,
            aperture: dev.aperture,
            memslot,
            mapped: BarDecode::default(),
            label: dev.label,
        });
    }

    /// Exit counts so far.
    pub fn stats(&self) -> ExitStats {
        self.stats
    }

    /// Accesses to the empty-handler page so far.
    pub fn null_accesses(&self) -> u64 {
        self.null.accesses()
    }

    /// The guest's console output.
    pub fn take_console(&mut self) -> String {
        self.debug.take_console()
    }

    /// A port read.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        self.stats.pio += 1;
        if PciRoot::owns(port) {
            self.pci.pio_read(port, data);
        } else {
            data.fill(0xFF);
        }
    }

    /// A port write; returns the guest's result code when it reports one.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) -> Option<u32> {
        self.stats.pio += 1;
        if PciRoot::owns(port) {
            if let Some(dev) = self.pci.pio_write(port, data) {
                self.remap(dev);
            }
            None
        } else if DebugPorts::owns(port) {
            self.debug.write(port, data)
        } else {
            None
        }
    }

    /// An MMIO read.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        if self.io.mmio_read(MmioAddress(addr), data).is_ok() {
            self.stats.mmio += 1;
        } else {
            self.stats.unhandled_mmio += 1;
            data.fill(0xFF);
        }
    }

    /// An MMIO write.
    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        if self.io.mmio_write(MmioAddress(addr), data).is_ok() {
            self.stats.mmio += 1;
        } else {
            self.stats.unhandled_mmio += 1;
        }
    }

    /// Brings the bus in line with where device `dev`'s BARs decode after a config write.
    fn remap(&mut self, dev: usize) {
        let Some(slot) = dev.checked_sub(1).and_then(|i| self.slots.get_mut(i)) else {
            return;
        };
        let want = slot
            .function
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .decode();
        let want = BarDecode {
            regs: want.regs.filter(|a| in_window(*a, BAR0_SIZE)),
            aperture: want.aperture.filter(|a| in_window(*a, slot.aperture.len())),
        };
        if want.regs != slot.mapped.regs {
            if let Some(old) = slot.mapped.regs.take() {
                self.io.deregister_mmio(MmioAddress(old));
            }
            if let Some(new) = want.regs {
                let r = MmioRange::new(MmioAddress(new), BAR0_SIZE)
                    .and_then(|r| self.io.register_mmio(r, slot.regs.clone()));
                match r {
                    Ok(()) => slot.mapped.regs = Some(new),
                    Err(e) => {
                        tracing::warn!(label = %slot.label, addr = new, error = %e, "BAR0 not mapped")
                    }
                }
            }
        }
        if want.aperture != slot.mapped.aperture {
            if let Some(old) = slot.mapped.aperture.take() {
                if let Err(e) = set_memslot(&self.vm, slot.memslot, old, 0, 0) {
                    tracing::warn!(label = %slot.label, error = %e, "aperture not unmapped");
                }
            }
            if let Some(new) = want.aperture {
                let a = &slot.aperture;
                match set_memslot(&self.vm, slot.memslot, new, a.len(), a.host_addr()) {
                    Ok(()) => slot.mapped.aperture = Some(new),
                    Err(e) => {
                        tracing::warn!(label = %slot.label, error = %e, "aperture not mapped")
                    }
                }
            }
        }
        tracing::debug!(label = %slot.label, mapped = ?slot.mapped, "BARs");
    }
}

/// Whether `[addr, addr + size)` lies in the 64-bit MMIO window (BARs elsewhere do not decode).
fn in_window(addr: u64, size: u64) -> bool {
    addr >= MMIO64_BASE
        && addr
            .checked_add(size)
            .is_some_and(|end| end <= MMIO64_BASE + MMIO64_SIZE)
}
