//! `vgpu-guest`: a bare-metal guest driver for the vGPU, run by `vgpu-vmm`.
//!
//! The VMM enters [`_start`] in 64-bit mode with identity paging, a stack and a boot
//! information block (`boot_info.rs`). The program then behaves like a small OS driver: it
//! installs an IDT and enables the local APIC, enumerates PCI bus 0 through ports 0xCF8/0xCFC,
//! sizes and assigns the BARs of every vGPU (vendor 0x1de5, device 0x6770) from the VMM's
//! 64-bit MMIO window, enables memory decoding, bus mastering and MSI-X, reads the PV block,
//! maps scratch RAM into hidden GM, builds rings in local memory, submits blit, render and
//! compute work and a display flip, sleeps on MSI-X interrupts, checks every result
//! bit-exactly against values it computes itself, and reports on the result port.
//!
//! With `FLAG_MALICIOUS` it instead attacks its vGPU (a GGTT write and a blit outside its
//! partition, a forbidden register load) and passes only if the device refuses each attack with
//! the right audit reason and the context works again afterwards. With `FLAG_BENCH` it times
//! MMIO accesses (the trap path) and leaves the figures in the boot information block.
#![no_std]
#![no_main]
// Bare-metal code: MMIO addresses, register values and small indices are converted with `as`
// where the values are known to fit (addresses below 2^48, engine and vector indices < 256).
#![allow(clippy::cast_possible_truncation)]

mod bench;
#[path = "boot_info.rs"]
pub mod boot_info;
mod console;
mod cpu;
mod malicious;
mod pci;
mod render_ref;
mod vgpu;
mod work;

use boot_info::{BootInfo, BOOT_INFO_GPA, BOOT_MAGIC, BOOT_VERSION, MAX_VGPUS, MIN_RAM};

/// Fails with `step` and a message unless `cond` holds.
#[macro_export]
macro_rules! check {
    ($cond:expr, $step:expr, $($arg:tt)*) => {
        if !$cond {
            $crate::console::fail($step, format_args!($($arg)*));
        }
    };
}

/// Fails with `step` and a message.
#[macro_export]
macro_rules! fail {
    ($step:expr, $($arg:tt)*) => {
        $crate::console::fail($step, format_args!($($arg)*))
    };
}

/// The boot information block the VMM wrote.
pub fn boot_info() -> BootInfo {
    // SAFETY: the VMM places a `BootInfo` at BOOT_INFO_GPA, in RAM reserved for it.
    unsafe { core::ptr::read_volatile(BOOT_INFO_GPA as *const BootInfo) }
}

/// Writes the output fields back into the boot information block.
fn store_boot_info(b: &BootInfo) {
    // SAFETY: as in `boot_info`; nothing else writes the block while the guest runs.
    unsafe { core::ptr::write_volatile(BOOT_INFO_GPA as *mut BootInfo, *b) }
}

/// Entry point: the VMM starts the vCPU here, in 64-bit mode with interrupts off.
#[no_mangle]
#[link_section = ".text._start"]
pub extern "C" fn _start() -> ! {
    cpu::init_interrupts();
    let mut boot = boot_info();
    check!(
        boot.magic == BOOT_MAGIC && boot.version == BOOT_VERSION,
        0x001,
        "no boot information block (magic {:#x}, version {})",
        boot.magic,
        boot.version
    );
    check!(
        boot.ram_size >= MIN_RAM,
        0x002,
        "{} bytes of RAM, need {}",
        boot.ram_size,
        MIN_RAM
    );
    println!(
        "vgpu-guest: {} MiB RAM, TSC {} kHz, flags {:#x}, expecting {} vGPU(s)",
        boot.ram_size >> 20,
        boot.tsc_khz,
        boot.flags,
        boot.vgpus
    );

    let mut found: [Option<pci::Function>; MAX_VGPUS] = [None; MAX_VGPUS];
    let mut n = 0;
    pci::for_each_device(|f| {
        let (vendor, device) = f.ids();
        let class = f.read32(0x08) >> 8;
        println!(
            "pci 00:{:02x}.0 {:04x}:{:04x} class {:06x}",
            f.dev, vendor, device, class
        );
        if (vendor, device) == (vgpu_abi::pci::VENDOR_ID, vgpu_abi::pci::DEVICE_ID)
            && class == vgpu_abi::pci::CLASS_CODE
            && n < found.len()
        {
            found[n] = Some(f);
            n += 1;
        }
    });
    check!(
        n == boot.vgpus as usize,
        0x003,
        "found {} vGPU(s), the VMM attached {}",
        n,
        boot.vgpus
    );

    let mut next = boot_info::MMIO64_BASE;
    let end = boot_info::MMIO64_BASE + boot_info::MMIO64_SIZE;
    let mut vgpus: [Option<vgpu::Vgpu>; MAX_VGPUS] = [const { None }; MAX_VGPUS];
    for (i, f) in found.iter().take(n).enumerate() {
        let Some(f) = *f else { continue };
        let (regs, aperture) = vgpu::assign_bars(f, &mut next, end);
        let mut v = vgpu::Vgpu::probe(i, f, regs, aperture);
        println!(
            "vgpu{} (00:{:02x}.0): BAR0 {:#x} BAR2 {:#x}, id {}, engines {:#x}, lmem {} MiB, \
             mappable GM {:#x}+{:#x}, hidden GM {:#x}+{:#x}",
            i,
            f.dev,
            regs,
            aperture,
            v.pv.vgpu_id,
            v.pv.engine_mask,
            v.pv.lmem_size >> 20,
            v.pv.mappable_base,
            v.pv.mappable_size,
            v.pv.hidden_base,
            v.pv.hidden_size
        );
        v.bring_up();
        vgpus[i] = Some(v);
    }

    if boot.flags & boot_info::FLAG_BENCH != 0 {
        bench::run(&mut boot, &vgpus[..n]);
    } else {
        for v in vgpus.iter_mut().take(n).flatten() {
            if boot.flags & boot_info::FLAG_MALICIOUS != 0 {
                malicious::run(v);
            } else {
                work::run(v);
            }
            boot.vgpus_done += 1;
        }
    }
    store_boot_info(&boot);
    println!("vgpu-guest: PASS ({} vGPU(s))", n);
    console::report(boot_info::RESULT_PASS)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("panic: {}", info);
    console::report(boot_info::RESULT_FAIL | 0xFFFF)
}
