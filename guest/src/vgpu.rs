//! The vGPU driver: probe, BAR assignment, identification, MSI-X, GGTT, rings and submission,
//! following the bring-up sequence of `docs/device-spec.md` section 12.

use vgpu_abi::cmd::enc;
use vgpu_abi::gtt::pte_guest;
use vgpu_abi::pci::{BAR0_SIZE, GGTT_OFFSET, MSIX_VECTORS};
use vgpu_abi::{pci as abi_pci, regs, Engine, PAGE_SIZE};

use crate::boot_info::{SCRATCH_GPA, SCRATCH_PER_VGPU};
use crate::cpu::{self, MSI_BASE};
use crate::pci::Function;
use crate::{check, fail};

/// Pages of each vGPU's scratch RAM mapped into the start of its hidden GM range.
pub const SCRATCH_GM_PAGES: u64 = 256;
/// Bytes of each engine's ring (in local memory, at `RING_LMEM + e * RING_BYTES`).
pub const RING_BYTES: u32 = 4096;
/// Local-memory offset of the rings.
pub const RING_LMEM: u64 = 0;
/// Timeout of one wait, in milliseconds.
pub const WAIT_MS: u64 = 10_000;

/// The PV information block.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pv {
    /// `PV_VGPU_ID`.
    pub vgpu_id: u32,
    /// `PV_ENGINE_MASK`.
    pub engine_mask: u32,
    /// `PV_MAPPABLE_BASE`.
    pub mappable_base: u64,
    /// `PV_MAPPABLE_SIZE`.
    pub mappable_size: u64,
    /// `PV_HIDDEN_BASE`.
    pub hidden_base: u64,
    /// `PV_HIDDEN_SIZE`.
    pub hidden_size: u64,
    /// `PV_LMEM_SIZE`.
    pub lmem_size: u64,
    /// `PV_MAX_WIDTH`.
    pub max_width: u32,
    /// `PV_MAX_HEIGHT`.
    pub max_height: u32,
}

/// One vGPU the guest drives.
pub struct Vgpu {
    /// Position among the vGPUs of this VM (selects MSI vectors and scratch RAM).
    pub index: usize,
    /// Its PCI function.
    pub pci: Function,
    /// Guest-physical address of BAR0.
    pub regs: u64,
    /// Guest-physical address of BAR2 (the aperture).
    pub aperture: u64,
    /// What the PV block says.
    pub pv: Pv,
    tails: [u32; Engine::COUNT],
    fence_seq: u32,
}

/// Assigns the BARs of `f` from `*next` (a cursor in the VMM's 64-bit MMIO window): sizes them
/// with decoding off, aligns each to its size, programs it, then enables memory decoding and
/// bus mastering. Returns (BAR0, BAR2) addresses.
pub fn assign_bars(f: Function, next: &mut u64, end: u64) -> (u64, u64) {
    f.write32(0x04, 0);
    let mut addrs = [0u64; 2];
    for (slot, bar) in [abi_pci::BAR_REGS, abi_pci::BAR_APERTURE]
        .iter()
        .enumerate()
    {
        let bar = *bar as u8;
        let (size, flags) = f.size_bar64(bar);
        check!(
            size.is_power_of_two() && flags & 0x6 == 0x4,
            0x101,
            "BAR{} is not a 64-bit memory BAR (size {:#x}, flags {:#x})",
            bar,
            size,
            flags
        );
        let base = (*next + size - 1) & !(size - 1);
        check!(
            base + size <= end,
            0x102,
            "BAR{} of {:#x} bytes does not fit the MMIO window",
            bar,
            size
        );
        f.set_bar64(bar, base);
        check!(
            f.bar64(bar) == base,
            0x103,
            "BAR{} reads {:#x} after programming {:#x}",
            bar,
            f.bar64(bar),
            base
        );
        check!(
            bar != 0 || size == BAR0_SIZE,
            0x104,
            "BAR0 is {:#x} bytes",
            size
        );
        *next = base + size;
        addrs[slot] = base;
    }
    // Memory space, bus master, INTx disable (section 12 step 2).
    f.write32(0x04, 0x0406);
    (addrs[0], addrs[1])
}

impl Vgpu {
    /// Identifies the device behind assigned BARs and reads its PV block.
    pub fn probe(index: usize, pci: Function, regs_base: u64, aperture: u64) -> Vgpu {
        let mut v = Vgpu {
            index,
            pci,
            regs: regs_base,
            aperture,
            pv: Pv::default(),
            tails: [0; Engine::COUNT],
            fence_seq: 0,
        };
        check!(
            v.read32(regs::ID) == regs::ID_VALUE,
            0x110,
            "ID reads {:#x}",
            v.read32(regs::ID)
        );
        check!(
            v.read32(regs::VERSION) >> 16 == 1,
            0x111,
            "unsupported VERSION {:#x}",
            v.read32(regs::VERSION)
        );
        check!(
            v.read32(regs::PV_MAGIC) == regs::PV_MAGIC_VALUE && v.read32(regs::PV_VERSION) == 1,
            0x112,
            "bad PV block"
        );
        v.pv = Pv {
            vgpu_id: v.read32(regs::PV_VGPU_ID),
            engine_mask: v.read32(regs::PV_ENGINE_MASK),
            mappable_base: v.read64(regs::PV_MAPPABLE_BASE),
            mappable_size: v.read64(regs::PV_MAPPABLE_SIZE),
            hidden_base: v.read64(regs::PV_HIDDEN_BASE),
            hidden_size: v.read64(regs::PV_HIDDEN_SIZE),
            lmem_size: v.read64(regs::PV_LMEM_SIZE),
            max_width: v.read32(regs::PV_MAX_WIDTH),
            max_height: v.read32(regs::PV_MAX_HEIGHT),
        };
        check!(
            v.pv.hidden_size >= SCRATCH_GM_PAGES * PAGE_SIZE && v.pv.lmem_size >= 8 << 20,
            0x113,
            "partition too small: {:?}",
            v.pv
        );
        v
    }

    /// Reads the register at BAR0 offset `off`.
    pub fn read32(&self, off: u32) -> u32 {
        // SAFETY: BAR0 is identity-mapped MMIO that the VMM traps; aligned 4-byte access.
        unsafe { core::ptr::read_volatile((self.regs + u64::from(off)) as *const u32) }
    }

    /// Writes the register at BAR0 offset `off`.
    pub fn write32(&self, off: u32, v: u32) {
        // SAFETY: as `read32`.
        unsafe { core::ptr::write_volatile((self.regs + u64::from(off)) as *mut u32, v) }
    }

    /// Reads a 64-bit `_LO`/`_HI` pair with one 8-byte access.
    pub fn read64(&self, off: u32) -> u64 {
        // SAFETY: as `read32`; 8-byte aligned access at a `_LO` offset.
        unsafe { core::ptr::read_volatile((self.regs + u64::from(off)) as *const u64) }
    }

    /// Writes GGTT entry for GM address `gm` with one 8-byte access.
    pub fn map_gm(&self, gm: u64, pte: u64) {
        let off = GGTT_OFFSET + gm / PAGE_SIZE * 8;
        // SAFETY: the GGTT window is part of BAR0 (trapped MMIO); aligned 8-byte access.
        unsafe { core::ptr::write_volatile((self.regs + off) as *mut u64, pte) }
    }

    /// Reads the GGTT entry of GM address `gm`.
    pub fn gm_entry(&self, gm: u64) -> u64 {
        let off = GGTT_OFFSET + gm / PAGE_SIZE * 8;
        // SAFETY: as `map_gm`.
        unsafe { core::ptr::read_volatile((self.regs + off) as *const u64) }
    }

    /// Whether the profile has `e`.
    pub fn has(&self, e: Engine) -> bool {
        self.pv.engine_mask & e.mask_bit() != 0
    }

    /// MSI vector (IDT) of device vector `v`.
    pub fn vector(&self, v: u16) -> u8 {
        MSI_BASE + 8 * self.index as u8 + v as u8
    }

    /// IDT vector of engine `e`'s MSI-X vector.
    pub fn engine_vector(&self, e: Engine) -> u8 {
        self.vector(e.index() as u16)
    }

    /// Guest-physical address of this vGPU's scratch RAM.
    pub fn scratch(&self) -> u64 {
        SCRATCH_GPA + self.index as u64 * SCRATCH_PER_VGPU
    }

    /// GM address of scratch RAM offset `off` (mapped at the start of the hidden range).
    pub fn scratch_gm(&self, off: u64) -> u64 {
        self.pv.hidden_base + off
    }

    /// GM address of local-memory offset `off` (through the reset mapping).
    pub fn lmem_gm(&self, off: u64) -> u64 {
        self.pv.mappable_base + off
    }

    /// CPU pointer to local-memory offset `off` through the aperture.
    pub fn lmem_ptr<T>(&self, off: u64) -> *mut T {
        (self.aperture + off) as *mut T
    }

    /// Resets the vGPU, programs MSI-X, unmasks its interrupts, maps scratch RAM into hidden
    /// GM and enables the rings of its engines.
    pub fn bring_up(&mut self) {
        self.write32(regs::RESET_CTL, regs::RESET_DEVICE);
        self.setup_msix();
        let mut unmask = regs::INTR_DEVICE;
        for e in Engine::ALL {
            if self.has(e) {
                unmask |= 0xF << (4 * e.index());
            }
        }
        self.write32(regs::INTR_MASK, !unmask);
        self.map_scratch();
        for e in Engine::ALL {
            if self.has(e) {
                self.enable_ring(e);
            }
        }
    }

    fn setup_msix(&self) {
        let Some(cap) = self.pci.find_capability(0x11) else {
            fail!(0x120, "no MSI-X capability");
        };
        let control = self.pci.read16(cap + 2);
        let table = self.pci.read32(cap + 4);
        check!(
            table & 7 == 0 && u32::from(control & 0x7FF) + 1 == u32::from(MSIX_VECTORS),
            0x121,
            "MSI-X table in BIR {} with {} vectors",
            table & 7,
            (control & 0x7FF) + 1
        );
        let table = u64::from(table & !7);
        for v in 0..MSIX_VECTORS {
            let e = self.regs + table + 16 * u64::from(v);
            // SAFETY: the MSI-X table is in BAR0 (trapped MMIO); aligned dword accesses.
            unsafe {
                core::ptr::write_volatile(e as *mut u32, crate::boot_info::LAPIC_GPA as u32);
                core::ptr::write_volatile((e + 4) as *mut u32, 0);
                core::ptr::write_volatile((e + 8) as *mut u32, u32::from(self.vector(v)));
                core::ptr::write_volatile((e + 12) as *mut u32, 0);
            }
        }
        // MSI-X Enable (bit 15 of message control), Function Mask clear.
        let dw = self.pci.read32(cap);
        self.pci.write32(cap, (dw | 1 << 31) & !(1 << 30));
        check!(
            self.pci.read16(cap + 2) & 0xC000 == 0x8000,
            0x122,
            "MSI-X enable did not stick"
        );
    }

    fn map_scratch(&self) {
        let faults = self.read32(regs::GTT_FAULT_COUNT);
        for p in 0..SCRATCH_GM_PAGES {
            self.map_gm(
                self.scratch_gm(p * PAGE_SIZE),
                pte_guest(self.scratch() + p * PAGE_SIZE),
            );
        }
        check!(
            self.read32(regs::GTT_FAULT_COUNT) == faults,
            0x130,
            "GGTT writes of own scratch RAM were dropped"
        );
        let want = pte_guest(self.scratch());
        check!(
            self.gm_entry(self.scratch_gm(0)) == want,
            0x131,
            "GGTT entry reads {:#x}, wrote {:#x}",
            self.gm_entry(self.scratch_gm(0)),
            want
        );
        self.write32(regs::TLB_INVALIDATE, regs::TLB_INVALIDATE_GGTT);
    }

    /// (Re-)enables engine `e`'s ring at its place in local memory.
    pub fn enable_ring(&mut self, e: Engine) {
        let b = regs::engine_base(e);
        let gm = self.lmem_gm(RING_LMEM + e.index() as u64 * u64::from(RING_BYTES));
        self.write32(b + regs::RING_CTL, 0);
        self.write32(b + regs::RING_BASE_LO, gm as u32);
        self.write32(b + regs::RING_BASE_HI, (gm >> 32) as u32);
        self.write32(b + regs::RING_SIZE, RING_BYTES);
        self.write32(b + regs::RING_CTL, regs::RING_CTL_ENABLE);
        let st = self.read32(b + regs::ENGINE_STATUS);
        check!(
            st & regs::ENGINE_STATUS_ERROR == 0,
            0x140,
            "{} ring enable failed: status {:#x} code {}",
            e.name(),
            st,
            self.read32(b + regs::ERROR_CODE)
        );
        self.tails[e.index()] = 0;
    }

    /// Copies `parts` into engine `e`'s ring and rings the doorbell. The caller waits for the
    /// previous submission first, so the ring always has room.
    pub fn submit(&mut self, e: Engine, parts: &[&[u32]]) {
        let ring = RING_LMEM + e.index() as u64 * u64::from(RING_BYTES);
        let mut tail = self.tails[e.index()];
        let total: usize = parts.iter().map(|p| p.len()).sum();
        check!(
            total * 4 < RING_BYTES as usize,
            0x150,
            "{} dwords do not fit the ring",
            total
        );
        for dw in parts.iter().flat_map(|p| p.iter()) {
            // SAFETY: the ring lies in local memory, mapped into the guest at BAR2 (RAM-like,
            // never trapped); `tail` stays below RING_BYTES.
            unsafe { core::ptr::write_volatile(self.lmem_ptr::<u32>(ring + u64::from(tail)), *dw) }
            tail = (tail + 4) % RING_BYTES;
        }
        // Make the commands globally visible before the doorbell (spec section 4).
        // SAFETY: a store fence.
        unsafe { core::arch::asm!("sfence", options(nostack, preserves_flags)) }
        self.tails[e.index()] = tail;
        self.write32(regs::engine_base(e) + regs::RING_TAIL, tail);
    }

    /// The next fence value.
    pub fn next_fence(&mut self) -> u32 {
        self.fence_seq += 1;
        self.fence_seq
    }

    /// Submits `cmds` on `e` followed by a fence store (to scratch RAM dword `e`) and a user
    /// interrupt; sleeps until the engine's MSI-X vector fires, then checks that the user
    /// interrupt (not an error) was raised, that the fence landed in guest RAM and in
    /// `LAST_FENCE`, and that the engine is idle.
    pub fn run(&mut self, e: Engine, cmds: &[&[u32]], what: &str) {
        let fence = self.next_fence();
        let fence_off = 4 * e.index() as u64;
        let vec = self.engine_vector(e);
        let seen = cpu::irq_count(vec);
        let sdi = enc::store_data_imm(self.scratch_gm(fence_off), fence);
        let ui = enc::user_interrupt();
        let mut parts: [&[u32]; 8] = [&[]; 8];
        check!(cmds.len() <= 6, 0x151, "too many parts");
        parts[..cmds.len()].copy_from_slice(cmds);
        parts[cmds.len()] = &sdi;
        parts[cmds.len() + 1] = &ui;
        self.submit(e, &parts[..cmds.len() + 2]);
        let b = regs::engine_base(e);
        check!(
            cpu::wait_irq(vec, seen, WAIT_MS),
            0x152,
            "{}: no MSI-X interrupt on vector {:#x} (INTR_STATUS {:#x}, status {:#x}, code {})",
            what,
            vec,
            self.read32(regs::INTR_STATUS),
            self.read32(b + regs::ENGINE_STATUS),
            self.read32(b + regs::ERROR_CODE)
        );
        let status = self.read32(regs::INTR_STATUS);
        check!(
            status & regs::intr_user(e) != 0 && status & regs::intr_error(e) == 0,
            0x153,
            "{}: INTR_STATUS {:#x}, error code {} at {:#x}",
            what,
            status,
            self.read32(b + regs::ERROR_CODE),
            self.read64(b + regs::ERROR_ADDR_LO)
        );
        self.write32(regs::INTR_STATUS, regs::intr_user(e));
        check!(
            cpu::wait_until(WAIT_MS, || self.read32(b + regs::ENGINE_STATUS)
                & regs::ENGINE_STATUS_IDLE
                != 0),
            0x154,
            "{}: engine not idle",
            what
        );
        // SAFETY: scratch RAM is ordinary guest RAM owned by this program.
        let got = unsafe { core::ptr::read_volatile((self.scratch() + fence_off) as *const u32) };
        check!(
            got == fence && self.read32(b + regs::LAST_FENCE) == fence,
            0x155,
            "{}: fence reads {} (LAST_FENCE {}), expected {}",
            what,
            got,
            self.read32(b + regs::LAST_FENCE),
            fence
        );
        check!(
            self.read32(b + regs::RING_HEAD) == self.tails[e.index()],
            0x156,
            "{}: RING_HEAD {:#x} != tail {:#x}",
            what,
            self.read32(b + regs::RING_HEAD),
            self.tails[e.index()]
        );
    }
}
