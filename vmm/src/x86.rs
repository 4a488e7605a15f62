//! Starting the vCPU directly in 64-bit long mode: GDT, identity page tables, control registers,
//! EFER, CPUID, and the entry registers.

use kvm_bindings::{kvm_msr_entry, kvm_segment, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot_info::{GDT_GPA, MMIO64_BASE, MMIO64_SIZE, PAGE_TABLES_GPA, STACK_TOP};

/// Errors setting up the vCPU.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Writing the boot structures into guest memory failed.
    #[error("Cannot write boot structures into guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
    /// The MSR list could not be built.
    #[error("Cannot build the MSR list")]
    Msrs,
    /// A vCPU ioctl failed.
    #[error("Cannot {what} the vCPU")]
    Vcpu {
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// `IA32_MTRR_DEF_TYPE`: MTRRs enabled, default type write-back. Out of reset MTRRs are
/// disabled, which makes all memory uncachable; under nested KVM that costs ~10 µs per access.
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE_WB: u64 = 1 << 11 | 6;

const PDE_PRESENT_RW: u64 = 0x3;
const PDE_HUGE: u64 = 0x80;
const GIB: u64 = 1 << 30;
/// 2-MiB pages per page directory.
const PD_ENTRIES: u64 = 512;

/// GDT descriptors: null, 64-bit code, data, TSS (the layout Firecracker uses).
const GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Bits `shift..shift + width` of `e`.
fn bits(e: u64, shift: u32, width: u32) -> u8 {
    u8::try_from(e >> shift & ((1 << width) - 1)).unwrap_or(0)
}

/// The KVM segment register for GDT descriptor `index`.
fn segment(index: u16) -> kvm_segment {
    let e = GDT[usize::from(index)];
    let g = bits(e, 55, 1);
    let limit = u32::try_from((e >> 32) & 0xf_0000 | e & 0xffff).unwrap_or(0);
    kvm_segment {
        base: (e >> 16) & 0xff_ffff | (e >> 32) & 0xff00_0000,
        limit: if g == 1 { limit << 12 | 0xfff } else { limit },
        selector: index * 8,
        type_: bits(e, 40, 4),
        present: bits(e, 47, 1),
        dpl: bits(e, 45, 2),
        db: bits(e, 54, 1),
        s: bits(e, 44, 1),
        l: bits(e, 53, 1),
        g,
        avl: bits(e, 52, 1),
        unusable: 1 - bits(e, 47, 1),
        padding: 0,
    }
}

/// Writes the GDT and identity page tables: the low 4 GiB (RAM, the 32-bit hole with the
/// empty-handler page and the local APIC) and the 64-bit MMIO window, with 2-MiB pages.
/// Returns the CR3 value.
pub fn write_tables(mem: &GuestMemoryMmap) -> Result<u64, BootError> {
    for (i, d) in GDT.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_GPA + 8 * i as u64))
            .map_err(BootError::Memory)?;
    }
    let pml4 = PAGE_TABLES_GPA;
    let pdpt = pml4 + 0x1000;
    let first_pd = pdpt + 0x1000;
    mem.write_obj(pdpt | PDE_PRESENT_RW, GuestAddress(pml4))
        .map_err(BootError::Memory)?;
    // PDPT entries (1 GiB each) that get a page directory: 0..4 GiB and the MMIO window.
    let gibs = (0..4).chain(MMIO64_BASE / GIB..(MMIO64_BASE + MMIO64_SIZE) / GIB);
    for (n, gib) in gibs.enumerate() {
        let pd = first_pd + 0x1000 * n as u64;
        mem.write_obj(pd | PDE_PRESENT_RW, GuestAddress(pdpt + 8 * gib))
            .map_err(BootError::Memory)?;
        let entries: Vec<u8> = (0..PD_ENTRIES)
            .flat_map(|j| ((gib * GIB + (j << 21)) | PDE_PRESENT_RW | PDE_HUGE).to_le_bytes())
            .collect();
        mem.write_slice(&entries, GuestAddress(pd))
            .map_err(BootError::Memory)?;
    }
    Ok(pml4)
}

/// Puts the vCPU in 64-bit mode at `entry` with the stack at `STACK_TOP`.
pub fn setup_vcpu(kvm: &Kvm, vcpu: &VcpuFd, cr3: u64, entry: u64) -> Result<(), BootError> {
    let err = |what| move |source| BootError::Vcpu { what, source };
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(err("get CPUID for"))?;
    vcpu.set_cpuid2(&cpuid).map_err(err("set CPUID of"))?;

    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_MTRR_DEF_TYPE,
        data: MTRR_ENABLE_WB,
        ..Default::default()
    }])
    .map_err(|_| BootError::Msrs)?;
    vcpu.set_msrs(&msrs).map_err(err("set MSRs of"))?;

    let mut sregs = vcpu.get_sregs().map_err(err("get sregs of"))?;
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = u16::try_from(GDT.len() * 8 - 1).unwrap_or(u16::MAX);
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = segment(1);
    let data = segment(2);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(3);
    // Caching on (CD and NW clear), protected mode with paging.
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
    sregs.cr3 = cr3;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(err("set sregs of"))?;

    let mut regs = vcpu.get_regs().map_err(err("get registers of"))?;
    regs.rflags = 0x2;
    regs.rip = entry;
    // At a function's entry RSP + 8 is 16-byte aligned (as if `call` had pushed a return
    // address).
    regs.rsp = STACK_TOP - 8;
    regs.rbp = 0;
    vcpu.set_regs(&regs).map_err(err("set registers of"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_gdt_segments_decode_as_long_mode() {
        let cs = segment(1);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment(2);
        assert_eq!((ds.db, ds.type_, ds.selector), (1, 0x3, 0x10));
        let tr = segment(3);
        assert_eq!((tr.type_, tr.s, tr.selector), (0xb, 0, 0x18));
        assert_eq!(segment(0).unusable, 1);
    }

    #[test]
    fn test_page_tables_identity_map_low_and_window() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let cr3 = write_tables(&mem).unwrap();
        let walk = |va: u64| -> u64 {
            let pml4e: u64 = mem
                .read_obj(GuestAddress(cr3 + 8 * (va >> 39 & 511)))
                .unwrap();
            let pdpte: u64 = mem
                .read_obj(GuestAddress((pml4e & !0xfff) + 8 * (va >> 30 & 511)))
                .unwrap();
            let pde: u64 = mem
                .read_obj(GuestAddress((pdpte & !0xfff) + 8 * (va >> 21 & 511)))
                .unwrap();
            assert_eq!(pde & 0x81, 0x81, "huge and present at {va:#x}");
            (pde & !0x1f_ffff & !(1 << 63)) | (va & 0x1f_ffff)
        };
        for va in [
            0x10_0000,
            0xFEE0_00B0,
            MMIO64_BASE + 0x123_4567,
            MMIO64_BASE + MMIO64_SIZE - 8,
        ] {
            assert_eq!(walk(va), va);
        }
    }
}
