//! `vgpu-vmm`: a small KVM VMM that runs a bare-metal guest driver against vGPUs.
//!
//! It is not a general-purpose VMM. It builds exactly what the guest program needs:
//!
//! - guest RAM from a memfd (shared, so vgpud can map it for DMA), registered as KVM memslot 0;
//! - one vCPU started directly in 64-bit mode ([`x86`]: GDT, identity page tables, control
//!   registers, CPUID) with the in-kernel local APIC;
//! - a PCI host bridge on bus 0 reached through ports 0xCF8/0xCFC ([`pci`]); device 0 is the
//!   bridge, devices 1.. are vGPUs;
//! - the vGPUs ([`devices`]): embedded in-process (a [`vgpu_device`] vGPU driven through
//!   `vm_device::MutDeviceMmio` and its config-space methods, over an in-process physical GPU
//!   and scheduler), or attached to vgpud over vfio-user (the `vfio_user` crate's client, guest
//!   RAM DMA-mapped by fd, the MSI-X table emulated in the VMM as Cloud Hypervisor does);
//! - MSI-X delivered to the vCPU through irqfds and KVM GSI routes built from the MSI-X table
//!   ([`irq`]);
//! - a debug console (port 0xE9), a result port (0xF4) and an empty-handler MMIO page for the
//!   trap-path benchmark ([`devices::debug`]).
//!
//! BARs are assigned by the guest, as an OS would: it sizes them and programs addresses from
//! the 64-bit MMIO window announced in the boot information block. The VMM follows every config
//! write: BAR0 (registers, MSI-X, GGTT window) is registered on the MMIO bus at its address while
//! memory decoding is on; BAR2 (the aperture) becomes a KVM memslot backed by the vGPU's local
//! memory, so CPU accesses to it never exit. BARs outside the window do not decode.
//!
//! [`run`] runs one VM to completion and reports what the guest said.

#[path = "../../guest/src/boot_info.rs"]
pub mod boot_info;
pub mod config;
pub mod devices;
pub mod elf;
pub mod guest;
pub mod irq;
pub mod kick;
pub mod machine;
pub mod memory;
pub mod pci;
pub mod vcpu;
pub mod vm;
pub mod x86;

pub use config::{VgpuAttach, VmConfig};
pub use vm::{kvm_available, run, GuestStatus, Outcome, VmmError};
