//! MSI delivery to the vCPU: every MSI-X vector of every vGPU has a KVM GSI whose route holds
//! the message address and data from the MSI-X table, and an irqfd bound to that GSI. Whoever
//! raises the vector writes the eventfd (the in-process device's interrupt sink, or vgpud for a
//! vfio-user device) and KVM injects the message into the in-kernel local APIC; the VMM is not
//! on the interrupt path.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use kvm_bindings::{kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQ_ROUTING_MSI};
use kvm_ioctls::VmFd;
use vgpu_device::irq::InterruptSink;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// First GSI used for MSI routes (0–23 are the IOAPIC pins, unused here).
pub const MSI_GSI_BASE: u32 = 24;
/// GSIs reserved per vGPU (5 MSI-X vectors, rounded up).
pub const GSIS_PER_VGPU: u32 = 8;

/// Errors of interrupt routing.
#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    /// An eventfd could not be created.
    #[error("Cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// KVM refused the irqfd.
    #[error("Cannot register an irqfd for GSI {0}")]
    Irqfd(u32, #[source] kvm_ioctls::Error),
    /// KVM refused the routing table.
    #[error("Cannot set the GSI routing table")]
    Routing(#[source] kvm_ioctls::Error),
    /// The routing table could not be built.
    #[error("Cannot build the GSI routing table: {0}")]
    Table(String),
}

/// The VM's MSI routing table.
pub struct MsiRouter {
    vm: Arc<VmFd>,
    routes: Mutex<BTreeMap<u32, (u64, u32)>>,
}

impl MsiRouter {
    /// A router with no routes.
    pub fn new(vm: Arc<VmFd>) -> Self {
        MsiRouter {
            vm,
            routes: Mutex::new(BTreeMap::new()),
        }
    }

    /// Sets the message of `gsi`: address and data as the MSI-X table entry holds them.
    /// Pushes the whole table to KVM only when something changed.
    pub fn set_msi(&self, gsi: u32, address: u64, data: u32) -> Result<(), IrqError> {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        if routes.get(&gsi) == Some(&(address, data)) {
            return Ok(());
        }
        routes.insert(gsi, (address, data));
        let entries: Vec<kvm_irq_routing_entry> = routes
            .iter()
            .map(|(&gsi, &(address, data))| {
                let mut e = kvm_irq_routing_entry {
                    gsi,
                    type_: KVM_IRQ_ROUTING_MSI,
                    ..Default::default()
                };
                e.u.msi.address_lo = u32::try_from(address & 0xFFFF_FFFF).unwrap_or(0);
                e.u.msi.address_hi = u32::try_from(address >> 32).unwrap_or(0);
                e.u.msi.data = data;
                e
            })
            .collect();
        let table =
            KvmIrqRouting::from_entries(&entries).map_err(|e| IrqError::Table(format!("{e:?}")))?;
        self.vm.set_gsi_routing(&table).map_err(IrqError::Routing)
    }

    /// Creates `n` eventfds bound as irqfds to GSIs `gsi_base..gsi_base + n`.
    pub fn irqfds(&self, gsi_base: u32, n: u16) -> Result<Vec<EventFd>, IrqError> {
        (0..u32::from(n))
            .map(|v| {
                let fd = EventFd::new(EFD_NONBLOCK).map_err(IrqError::EventFd)?;
                self.vm
                    .register_irqfd(&fd, gsi_base + v)
                    .map_err(|e| IrqError::Irqfd(gsi_base + v, e))?;
                Ok(fd)
            })
            .collect()
    }
}

/// The in-process vGPU's interrupt sink: vector `v` writes irqfd `v`.
pub struct IrqfdSink {
    fds: Vec<EventFd>,
}

impl IrqfdSink {
    /// A sink over `fds` (one per vector).
    pub fn new(fds: Vec<EventFd>) -> Self {
        IrqfdSink { fds }
    }
}

impl InterruptSink for IrqfdSink {
    fn trigger(&self, vector: u16) {
        if let Some(fd) = self.fds.get(usize::from(vector)) {
            // EAGAIN (counter saturated) still leaves the interrupt pending in KVM.
            if let Err(e) = fd.write(1) {
                tracing::debug!(vector, error = %e, "irqfd write failed");
            }
        }
    }
}
