//! The vGPU device model.
//!
//! Transport-free: the device is driven through `&mut self` methods (config space, BAR0 MMIO,
//! aperture info) and reaches the outside world only through injected traits
//! ([`irq::InterruptSink`] for MSI-X, the VMM's DMA map for guest RAM). The same device runs under
//! the vfio-user server, in-process in a KVM VMM (through `vm_device::MutDeviceMmio`) and in unit
//! tests. The guest-visible contract is the `vgpu-abi` crate and `docs/device-spec.md`.

pub mod addr;
pub mod audit;
pub mod dma;
pub mod driver;
pub mod engine;
pub mod hist;
pub mod irq;
pub mod mem;
pub mod pci;
pub mod phys;
pub mod sched;
pub mod vgpu;
