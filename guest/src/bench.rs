//! Trap-path timing: the TSC around N MMIO accesses that each exit to the VMM.

use core::ptr::{read_volatile, write_volatile};

use vgpu_abi::regs;

use crate::boot_info::{BootInfo, NULL_MMIO_GPA};
use crate::vgpu::Vgpu;
use crate::{check, cpu, println};

/// Chunks each series is timed in; the median chunk is kept, so a preemption of the vCPU or of
/// the device's thread on a shared host spoils one chunk, not the figure.
pub const CHUNKS: u32 = 16;

/// Times `n` calls of `f` (after `n / CHUNKS` warm-up calls) in `CHUNKS` chunks; returns the
/// median chunk's cycles scaled to `n` calls. `n` should be a multiple of `CHUNKS`.
fn timed(n: u32, mut f: impl FnMut(u32)) -> u64 {
    let chunk = (n / CHUNKS).max(1);
    for i in 0..chunk {
        f(i);
    }
    let mut t = [0u64; CHUNKS as usize];
    for (c, slot) in (0u32..).zip(t.iter_mut()) {
        let t0 = cpu::rdtsc();
        for i in 0..chunk {
            f(c * chunk + i);
        }
        *slot = cpu::rdtsc() - t0;
    }
    t.sort_unstable();
    t[t.len() / 2] * u64::from(n) / u64::from(chunk)
}

/// Times the bare loop (writes to RAM), empty-handler MMIO writes and reads, then `SCRATCH0`
/// writes and reads of every vGPU.
pub fn run(boot: &mut BootInfo, vgpus: &[Option<Vgpu>]) {
    cpu::stop_timer();
    let n = boot.bench_iters.max(1);
    let mut slot = 0;
    let ram = crate::boot_info::SCRATCH_GPA as *mut u32;
    // SAFETY: scratch RAM owned by this program.
    boot.bench_cycles[slot] = timed(n, |i| unsafe { write_volatile(ram, i) });
    slot += 1;
    let null = NULL_MMIO_GPA as *mut u32;
    // SAFETY: the VMM's empty-handler MMIO page, identity-mapped.
    boot.bench_cycles[slot] = timed(n, |i| unsafe { write_volatile(null, i) });
    let mut sum = 0u32;
    boot.bench_cycles[slot + 1] = timed(n, |_| {
        // SAFETY: as above.
        sum = sum.wrapping_add(unsafe { read_volatile(null) })
    });
    slot += 2;
    for v in vgpus.iter().flatten() {
        let reg = (v.regs + u64::from(regs::SCRATCH0)) as *mut u32;
        // SAFETY: BAR0 register, trapped by the VMM.
        boot.bench_cycles[slot] = timed(n, |i| unsafe { write_volatile(reg, i) });
        let mut sum = 0u32;
        boot.bench_cycles[slot + 1] = timed(n, |_| {
            // SAFETY: as above.
            sum = sum.wrapping_add(unsafe { read_volatile(reg) })
        });
        let last = CHUNKS * (n / CHUNKS).max(1) - 1;
        check!(
            v.read32(regs::SCRATCH0) == last,
            0x400,
            "SCRATCH0 reads {:#x} after the write series",
            v.read32(regs::SCRATCH0)
        );
        slot += 2;
    }
    boot.bench_count = slot as u32;
    for (i, c) in boot.bench_cycles[..slot].iter().enumerate() {
        println!("bench series {}: {} cycles per access", i, c / u64::from(n));
    }
}
