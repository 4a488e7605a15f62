//! CPU plumbing: port I/O, the TSC, the IDT with counting interrupt handlers, and the local APIC
//! (MSI-X messages arrive there; its timer wakes `hlt` so waits can time out).

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

use crate::boot_info::LAPIC_GPA;

/// Vector of the local APIC timer (periodic, ~1 ms), which only wakes `hlt`.
pub const TIMER_VECTOR: u8 = 0x30;
/// First vector used for MSI-X messages: vGPU `i` vector `v` arrives on `MSI_BASE + 8 i + v`.
pub const MSI_BASE: u8 = 0x40;
const SPURIOUS_VECTOR: u32 = 0xFF;

const LAPIC_EOI: u64 = 0xB0;
const LAPIC_SVR: u64 = 0xF0;
const LAPIC_TPR: u64 = 0x80;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_TIMER_INIT: u64 = 0x380;
const LAPIC_TIMER_DIV: u64 = 0x3E0;

/// Interrupts taken, per vector (incremented by the handlers).
#[no_mangle]
pub static IRQ_COUNTS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];

// One 16-byte stub per vector: save RAX, load the vector number, go to the common handler.
// Exceptions (vectors < 32) report themselves and stop; interrupts count, EOI and return.
global_asm!(
    ".p2align 4",
    ".global vgpu_irq_stubs",
    "vgpu_irq_stubs:",
    ".set vgpu_vec, 0",
    ".rept 256",
    ".p2align 4",
    "push rax",
    "mov eax, vgpu_vec",
    "jmp vgpu_irq_common",
    ".set vgpu_vec, vgpu_vec + 1",
    ".endr",
    "vgpu_irq_common:",
    "cmp eax, 32",
    "jb 2f",
    "push rcx",
    "lea rcx, [rip + {counts}]",
    "lock inc qword ptr [rcx + rax * 8]",
    "mov rcx, {eoi}",
    "mov dword ptr [rcx], 0",
    "pop rcx",
    "pop rax",
    "iretq",
    // Exception: RDI = vector, RSI = faulting RIP (past the error code, if the vector has one).
    "2:",
    "mov edi, eax",
    "mov ecx, 0x60227D00",
    "bt ecx, eax",
    "jc 3f",
    "mov rsi, [rsp + 8]",
    "jmp 4f",
    "3:",
    "mov rsi, [rsp + 16]",
    "4:",
    "and rsp, -16",
    "call {exception}",
    "ud2",
    counts = sym IRQ_COUNTS,
    eoi = const LAPIC_GPA + LAPIC_EOI,
    exception = sym crate::console::guest_exception,
);

extern "C" {
    static vgpu_irq_stubs: u8;
}

#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct IdtEntry {
    offset_lo: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_hi: u32,
    zero: u32,
}

#[repr(C, align(4096))]
struct Idt([IdtEntry; 256]);

static mut IDT: Idt = Idt([IdtEntry {
    offset_lo: 0,
    selector: 0,
    ist: 0,
    type_attr: 0,
    offset_mid: 0,
    offset_hi: 0,
    zero: 0,
}; 256]);

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// Writes byte `v` to `port`.
pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O to the VMM's debug and PCI ports has no memory effects.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

/// Writes dword `v` to `port`.
pub fn outl(port: u16, v: u32) {
    // SAFETY: as `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a dword from `port`.
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as `outb`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// The time-stamp counter, ordered after earlier loads (`lfence; rdtsc`).
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads the TSC; no memory effects.
    unsafe {
        asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    u64::from(hi) << 32 | u64::from(lo)
}

/// Stops the CPU for good (interrupts off).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: `cli; hlt` only stops this CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

fn lapic_write(reg: u64, v: u32) {
    // SAFETY: the local APIC page is identity-mapped by the VMM's page tables and emulated by
    // KVM; its registers are 32-bit and 16-byte aligned.
    unsafe { core::ptr::write_volatile((LAPIC_GPA + reg) as *mut u32, v) }
}

/// Installs the IDT, enables the local APIC with a ~1 ms periodic timer, and enables
/// interrupts.
pub fn init_interrupts() {
    // Only the address of the stub table (a label defined above) is taken.
    let stubs = core::ptr::addr_of!(vgpu_irq_stubs) as u64;
    // SAFETY: single CPU, interrupts are still off: nothing else touches the IDT.
    let idt = unsafe { &mut *core::ptr::addr_of_mut!(IDT) };
    for (i, e) in idt.0.iter_mut().enumerate() {
        let handler = stubs + 16 * i as u64;
        *e = IdtEntry {
            offset_lo: (handler & 0xFFFF) as u16,
            selector: 0x08,
            ist: 0,
            type_attr: 0x8E,
            offset_mid: ((handler >> 16) & 0xFFFF) as u16,
            offset_hi: (handler >> 32) as u32,
            zero: 0,
        };
    }
    let ptr = DescriptorPointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: idt as *const Idt as u64,
    };
    // SAFETY: the IDT is a static that lives forever and holds valid gates.
    unsafe { asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack, preserves_flags)) }
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR);
    lapic_write(LAPIC_TIMER_DIV, 0xB);
    lapic_write(LAPIC_LVT_TIMER, u32::from(TIMER_VECTOR) | 1 << 17);
    // KVM's APIC timer runs at 1 GHz: one tick per millisecond.
    lapic_write(LAPIC_TIMER_INIT, 1_000_000);
    // SAFETY: the IDT and the APIC are ready.
    unsafe { asm!("sti", options(nostack)) }
}

/// Interrupts taken on `vector` so far.
pub fn irq_count(vector: u8) -> u64 {
    IRQ_COUNTS[usize::from(vector)].load(Ordering::SeqCst)
}

/// Milliseconds as TSC ticks.
pub fn ms_to_tsc(ms: u64) -> u64 {
    let khz = crate::boot_info().tsc_khz;
    ms.saturating_mul(if khz == 0 { 3_000_000 } else { khz })
}

/// Sleeps (`hlt`) until `vector` has been taken more than `seen` times; false on timeout.
pub fn wait_irq(vector: u8, seen: u64, timeout_ms: u64) -> bool {
    wait_until(timeout_ms, || irq_count(vector) > seen)
}

/// Evaluates `f` with interrupts off until it returns true, sleeping (`hlt`) in between;
/// false on timeout. An interrupt that makes `f` true cannot slip in between the test and the
/// sleep (`sti; hlt` opens the interrupt window only at the `hlt`), and the APIC timer bounds
/// every sleep.
pub fn wait_until(timeout_ms: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = rdtsc().saturating_add(ms_to_tsc(timeout_ms));
    loop {
        // SAFETY: masks interrupts on this CPU only.
        unsafe { asm!("cli", options(nostack)) }
        let done = f();
        if done || rdtsc() > deadline {
            // SAFETY: unmasks interrupts again.
            unsafe { asm!("sti", options(nostack)) }
            return done;
        }
        // SAFETY: sleeps until the next interrupt (the APIC timer at the latest).
        unsafe { asm!("sti", "hlt", options(nostack)) }
    }
}

/// Stops the APIC timer (the benchmark times loops without its interrupts).
pub fn stop_timer() {
    lapic_write(LAPIC_TIMER_INIT, 0);
}
