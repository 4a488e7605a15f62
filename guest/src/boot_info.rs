//! The contract between `vgpu-vmm` and its guest program: the guest-physical memory layout, the
//! boot information block the VMM writes before the first instruction, and the I/O ports the
//! guest reports on.
//!
//! This file is compiled into both sides (the guest includes it as a module, the VMM with
//! `#[path]`), so it has no dependencies and only plain `#[repr(C)]` data.

/// Guest-physical address of the GDT the VMM builds (null, code64, data, TSS descriptors).
pub const GDT_GPA: u64 = 0x1000;
/// Guest-physical address of the boot information block ([`BootInfo`]).
pub const BOOT_INFO_GPA: u64 = 0x7000;
/// Guest-physical address of the identity page tables the VMM builds (PML4, PDPT, PDs).
pub const PAGE_TABLES_GPA: u64 = 0x1_0000;
/// Where the guest image is linked and loaded (1 MiB).
pub const IMAGE_GPA: u64 = 0x10_0000;
/// Highest address the image may occupy (exclusive).
pub const IMAGE_END: u64 = 0x40_0000;
/// Initial stack pointer (the stack grows down towards the image).
pub const STACK_TOP: u64 = 0x80_0000;
/// Start of the guest's scratch RAM: buffers the vGPU reads and writes through GGTT entries.
pub const SCRATCH_GPA: u64 = 0x100_0000;
/// Scratch RAM each vGPU of the VM gets, starting at [`SCRATCH_GPA`].
pub const SCRATCH_PER_VGPU: u64 = 0x40_0000;
/// Most vGPUs the guest drives in one VM.
pub const MAX_VGPUS: usize = 8;
/// Smallest guest RAM the guest program runs in.
pub const MIN_RAM: u64 = SCRATCH_GPA + MAX_VGPUS as u64 * SCRATCH_PER_VGPU;

/// Guest-physical base of the 64-bit MMIO window BARs are assigned from (64 GiB).
pub const MMIO64_BASE: u64 = 0x10_0000_0000;
/// Size of the 64-bit MMIO window (16 GiB); identity-mapped by the VMM's page tables.
pub const MMIO64_SIZE: u64 = 0x4_0000_0000;
/// A page of MMIO whose accesses the VMM completes with an empty handler: the cost of a bare
/// KVM exit to userspace, for the trap-path benchmark. Reads return 0.
pub const NULL_MMIO_GPA: u64 = 0xD000_0000;
/// The local APIC (identity-mapped, emulated in the kernel).
pub const LAPIC_GPA: u64 = 0xFEE0_0000;

/// Debug console: every byte written to this port goes to the VMM's console (like QEMU's
/// `isa-debugcon` on port 0xE9).
pub const CONSOLE_PORT: u16 = 0xE9;
/// Result port: a 32-bit write ends the run with that code ([`RESULT_PASS`] or a failure).
pub const RESULT_PORT: u16 = 0xF4;
/// PCI configuration address port.
pub const PCI_CONFIG_ADDRESS: u16 = 0xCF8;
/// PCI configuration data port (0xCFC..=0xCFF).
pub const PCI_CONFIG_DATA: u16 = 0xCFC;

/// The guest checked everything it was asked to and passes.
pub const RESULT_PASS: u32 = 0x600D;
/// Failure codes: `RESULT_FAIL | step`, where the step says which check failed.
pub const RESULT_FAIL: u32 = 0xBAD0_0000;
/// The guest took CPU exception `RESULT_EXCEPTION | vector`.
pub const RESULT_EXCEPTION: u32 = 0xE000_0000;

/// `BootInfo::magic`: "VGPUBOOT".
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"VGPUBOOT");
/// `BootInfo::version` of this layout.
pub const BOOT_VERSION: u32 = 1;

/// `BootInfo::flags`: submit command streams that the vGPU must reject, and pass only if it
/// does (and a valid stream still runs afterwards).
pub const FLAG_MALICIOUS: u32 = 1 << 0;
/// `BootInfo::flags`: skip the workload and time MMIO accesses instead (trap-path benchmark).
pub const FLAG_BENCH: u32 = 1 << 1;

/// Most timed series the benchmark mode records.
pub const BENCH_SLOTS: usize = 3 + 2 * MAX_VGPUS;

/// The boot information block at [`BOOT_INFO_GPA`]. The VMM fills the inputs; the guest writes
/// the outputs before it reports its result.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// [`BOOT_VERSION`].
    pub version: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Bytes of guest RAM, from guest-physical 0.
    pub ram_size: u64,
    /// TSC frequency in kHz (0: unknown), for timeouts and benchmark figures.
    pub tsc_khz: u64,
    /// Number of vGPUs the VMM attached; the guest fails if it finds a different number.
    pub vgpus: u32,
    /// Accesses per timed series in benchmark mode.
    pub bench_iters: u32,
    /// Output: number of valid entries in `bench_cycles`.
    pub bench_count: u32,
    /// Output: vGPUs the guest drove to completion.
    pub vgpus_done: u32,
    /// Output, benchmark mode: TSC cycles of each series of `bench_iters` accesses, in order:
    /// the loop alone (writes to RAM, no exit), empty-handler MMIO writes, empty-handler MMIO
    /// reads, then for each vGPU a series of `SCRATCH0` writes and one of `SCRATCH0` reads.
    pub bench_cycles: [u64; BENCH_SLOTS],
}
