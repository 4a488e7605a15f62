//! The devices of the VM: vGPUs (in-process or over vfio-user) and the debug ports.

pub mod debug;
pub mod local;
pub mod remote;

use std::sync::{Arc, Mutex};

use vm_device::DeviceMmio;

use crate::memory::HostMapping;
use crate::pci::PciFunction;

/// A vGPU attached to the VM, as the machine wires it: config space on the PCI bus, BAR0 on the
/// MMIO bus, the aperture as a memslot.
pub struct Attached {
    /// Config space.
    pub function: Arc<Mutex<dyn PciFunction>>,
    /// BAR0 accesses (the bus passes the BAR0 address as the range base).
    pub regs: Arc<dyn DeviceMmio + Send + Sync>,
    /// The aperture's local memory, mapped in the VMM.
    pub aperture: HostMapping,
    /// For logs: "in-process small/shadow", "vfio-user /path".
    pub label: String,
}
