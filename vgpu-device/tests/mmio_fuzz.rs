//! Guest-access fuzzing: a vGPU driven by arbitrary guest access sequences never panics and
//! never reaches memory outside itself (docs/device-spec.md, sections 1, 2, 3, 5, 7, 8, 10, 11).
//!
//! vGPU A sits between two neighbours B1 and B2 of the same physical GPU (created before and
//! after it, so their local memory and GM ranges touch A's on both sides). A random sequence of
//! config-space, BAR0 (registers, MSI-X, GGTT window), BAR2, ring, doorbell, PPGTT, reset and
//! engine-run operations is applied to A, while a model predicts every GGTT write (section 7.2)
//! and the values every BAR0 read must return. Afterwards:
//!
//! - the neighbours' local memory, GGTT, registers and MSI-X are bit-identical to before;
//! - guest RAM outside A's DMA map, and the read-only part of it, is unchanged;
//! - A's GGTT equals the model's, and `GTT_FAULT_COUNT` counts exactly the dropped writes;
//! - a full reset then gives a working vGPU (a blit and a fence per engine run normally).
//!
//! A second model-free property churns A's DMA map (map, unmap, replace by other memory, make
//! read-only) between GGTT/PPGTT writes and engine work, and checks that no engine writes memory
//! after the VMM took it away. Deterministic tests pin down the documented drop and reject rules.
#![allow(clippy::cast_possible_truncation)] // For tests/common, as in the other test crates.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{driver, pattern, phys, vgpu};
use proptest::prelude::*;
use vgpu_abi::cmd::{self, enc, AuditReason};
use vgpu_abi::gtt::{pte_guest, pte_local, PTE_ADDR_MASK, PTE_LOCAL, PTE_READ_ONLY};
use vgpu_abi::gtt::{PTE_RESERVED_MASK, PTE_VALID};
use vgpu_abi::pci::{GGTT_OFFSET, GGTT_SIZE, GM_SIZE, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET};
use vgpu_abi::pci::{REGS_SIZE, VENDOR_ID};
use vgpu_abi::regs::{self, RING_SIZE_MAX, RING_SIZE_MIN};
use vgpu_abi::{Engine, PAGE_SIZE};
use vgpu_device::addr::{hi32, lo32, GmAddr, Gpa, LmemOffset};
use vgpu_device::dma::DmaMap;
use vgpu_device::driver::ring_lmem_offset;
use vgpu_device::engine::exec::run_until_idle;
use vgpu_device::phys::PhysGpu;
use vgpu_device::vgpu::{display, GttMode, Vgpu};
use vm_device::bus::MmioAddress;
use vm_device::MutDeviceMmio;
use vm_memory::{MmapRegion, VolatileMemory};

// ---------------------------------------------------------------------------------------------
// The world: A between two neighbours, and a guest whose RAM is only partly DMA-mapped.

/// `[base, base + size)` of some address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Range {
    base: u64,
    size: u64,
}

impl Range {
    fn end(self) -> u64 {
        self.base + self.size
    }
    fn contains(self, a: u64) -> bool {
        a >= self.base && a - self.base < self.size
    }
    fn pages(self) -> u64 {
        self.size / PAGE_SIZE
    }
    /// Page `idx` (modulo the size) counted from the start, or from the end with `from_end`.
    fn page(self, from_end: bool, idx: u64) -> u64 {
        let i = idx % self.pages();
        if from_end {
            self.end() - (i + 1) * PAGE_SIZE
        } else {
            self.base + i * PAGE_SIZE
        }
    }
}

/// The partition of a vGPU: mappable GM, hidden GM and local memory.
#[derive(Clone, Copy, Debug)]
struct Layout {
    map: Range,
    hid: Range,
    lmem: u64,
    id: u32,
    max_w: u32,
    max_h: u32,
}

impl Layout {
    fn of(v: &Vgpu) -> Layout {
        let p = v.shared().partition();
        Layout {
            map: Range {
                base: p.mappable.start.raw(),
                size: p.mappable.size,
            },
            hid: Range {
                base: p.hidden.start.raw(),
                size: p.hidden.size,
            },
            lmem: p.lmem.size(),
            id: p.id,
            max_w: p.profile.max_width,
            max_h: p.profile.max_height,
        }
    }
    fn in_partition(&self, gm: u64) -> bool {
        self.map.contains(gm) || self.hid.contains(gm)
    }
    /// Every GM page of the partition, mappable range first.
    fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        let r = |r: Range| (0..r.pages()).map(move |i| r.base + i * PAGE_SIZE);
        r(self.map).chain(r(self.hid))
    }
}

/// Guest RAM of the fuzzed VM: one anonymous mapping of which only two parts are DMA-mapped
/// (one writable, one read-only); the rest must never change.
const GUEST_BYTES: u64 = 512 << 10;
const RW_GPA: u64 = 0x1_0000_0000;
const RW_OFF: u64 = 64 << 10;
const RW_SIZE: u64 = 256 << 10;
const RO_GPA: u64 = 0x1_0010_0000;
const RO_OFF: u64 = 384 << 10;
const RO_SIZE: u64 = 64 << 10;

fn usz(v: u64) -> usize {
    usize::try_from(v).unwrap()
}

fn region_read(r: &MmapRegion, off: u64, buf: &mut [u8]) {
    let n = r.get_slice(usz(off), buf.len()).unwrap().copy_to(buf);
    assert_eq!(n, buf.len());
}

fn region_write(r: &MmapRegion, off: u64, data: &[u8]) {
    r.get_slice(usz(off), data.len()).unwrap().copy_from(data);
}

fn region_bytes(r: &MmapRegion) -> Vec<u8> {
    let mut b = vec![0u8; r.size()];
    region_read(r, 0, &mut b);
    b
}

fn anon(size: u64) -> Arc<MmapRegion> {
    Arc::new(MmapRegion::new(usz(size)).unwrap())
}

struct GuestRam {
    mem: Arc<MmapRegion>,
    initial: Vec<u8>,
}

impl GuestRam {
    fn new(seed: u32) -> Self {
        let mem = anon(GUEST_BYTES);
        let initial = pattern(usz(GUEST_BYTES), seed);
        region_write(&mem, 0, &initial);
        GuestRam { mem, initial }
    }

    fn dma(&self) -> DmaMap {
        DmaMap::new()
            .with_region(Gpa(RW_GPA), RW_SIZE, self.mem.clone(), RW_OFF, true)
            .unwrap()
            .with_region(Gpa(RO_GPA), RO_SIZE, self.mem.clone(), RO_OFF, false)
            .unwrap()
    }

    /// The DMA-mapped guest-physical ranges.
    fn mapped() -> Vec<Range> {
        vec![
            Range {
                base: RW_GPA,
                size: RW_SIZE,
            },
            Range {
                base: RO_GPA,
                size: RO_SIZE,
            },
        ]
    }

    /// What a guest CPU write does: only into the writable DMA-mapped part (the rest is the
    /// memory the device must not touch, and the test does not touch it either).
    fn cpu_write(&self, gpa: u64, data: &[u8]) {
        let rw = Range {
            base: RW_GPA,
            size: RW_SIZE,
        };
        if rw.contains(gpa) && gpa + data.len() as u64 <= rw.end() {
            region_write(&self.mem, RW_OFF + gpa - RW_GPA, data);
        }
    }

    /// Everything outside the writable DMA region is as initialised.
    fn check_untouched(&self) {
        let now = region_bytes(&self.mem);
        let rw = usz(RW_OFF)..usz(RW_OFF + RW_SIZE);
        for (i, (a, b)) in now.iter().zip(&self.initial).enumerate() {
            if !rw.contains(&i) && a != b {
                panic!("guest RAM outside the writable DMA map changed at mapping offset {i:#x}");
            }
        }
    }
}

/// A frozen view of a neighbour, compared after each sequence.
#[derive(PartialEq, Eq)]
struct Snap {
    lmem: Vec<u8>,
    ggtt: Vec<u64>,
    regs: Vec<u32>,
    msix: Vec<u32>,
    bad_accesses: u64,
    audits: u64,
}

fn read32(v: &Vgpu, off: u64) -> u32 {
    let mut b = [0u8; 4];
    v.bar0_read(off, &mut b);
    u32::from_le_bytes(b)
}

fn read64(v: &Vgpu, off: u64) -> u64 {
    let mut b = [0u8; 8];
    v.bar0_read(off, &mut b);
    u64::from_le_bytes(b)
}

fn write32(v: &mut Vgpu, off: u32, val: u32) {
    v.bar0_write(u64::from(off), &val.to_le_bytes());
}

/// Every documented register of BAR0.
fn all_registers() -> Vec<u32> {
    let mut v: Vec<u32> = regs::GLOBAL_REGISTERS.iter().map(|r| r.offset).collect();
    for e in Engine::ALL {
        v.extend(
            regs::ENGINE_REGISTERS
                .iter()
                .map(|r| regs::engine_base(e) + r.offset),
        );
    }
    v
}

fn snap(v: &Vgpu) -> Snap {
    let s = v.shared();
    let mut lmem = vec![0u8; usz(s.lmem().size())];
    s.lmem().read(LmemOffset(0), &mut lmem).unwrap();
    let lay = Layout::of(v);
    let ggtt = lay
        .pages()
        .map(|gm| s.ggtt.read_entry(GmAddr(gm)))
        .collect();
    let regs = all_registers()
        .into_iter()
        .map(|r| read32(v, u64::from(r)))
        .collect();
    let mut msix: Vec<u32> = (0..20)
        .map(|i| read32(v, MSIX_TABLE_OFFSET + 4 * i))
        .collect();
    msix.extend([read32(v, MSIX_PBA_OFFSET), read32(v, MSIX_PBA_OFFSET + 4)]);
    Snap {
        lmem,
        ggtt,
        regs,
        msix,
        bad_accesses: s.bad_accesses(),
        audits: s.audit.total(),
    }
}

fn check_same(name: &str, before: &Snap, now: &Snap) {
    if before == now {
        return;
    }
    if let Some(i) = before.lmem.iter().zip(&now.lmem).position(|(a, b)| a != b) {
        panic!("{name}: local memory changed at offset {i:#x}");
    }
    assert_eq!(before.ggtt, now.ggtt, "{name}: GGTT changed");
    assert_eq!(before.regs, now.regs, "{name}: registers changed");
    assert_eq!(before.msix, now.msix, "{name}: MSI-X changed");
    assert_eq!(
        before.bad_accesses, now.bad_accesses,
        "{name}: bad accesses"
    );
    assert_eq!(before.audits, now.audits, "{name}: audit events");
}

/// Gives a neighbour distinctive state: patterned local memory (its edges in full), remapped
/// hidden GGTT entries, registers, and one completed workload.
fn dress_neighbour(b: &mut Vgpu, seed: u32) {
    let lay = Layout::of(b);
    let edge = pattern(64 << 10, seed);
    b.bar2_write(0, &edge);
    b.bar2_write(lay.lmem - edge.len() as u64, &edge);
    let mut off = 1 << 20;
    while off < lay.lmem {
        b.bar2_write(off, &edge[..4096]);
        off += 1 << 20;
    }
    let mut d = driver(b);
    for i in 0..4 {
        d.map_gm(
            lay.hid.base + i * PAGE_SIZE,
            pte_local(0x8000 + i * PAGE_SIZE),
        );
    }
    d.map_gm(lay.hid.end() - PAGE_SIZE, pte_local(0x5000) | PTE_READ_ONLY);
    d.write32(regs::SCRATCH0, 0xB0B0_0000 | seed);
    d.write32(regs::engine_base(Engine::Compute) + regs::gpr(7), seed);
    let dst = d.gm_of_lmem(0x2_0000);
    let fence = d.gm_of_lmem(0x3_0000);
    let mut cmds = enc::color_blt(cmd::ROP_PATCOPY, cmd::BPP_32, dst, 128, 32, 8, seed).to_vec();
    cmds.extend(enc::store_data_imm(fence, seed));
    cmds.extend(enc::user_interrupt());
    d.submit(Engine::Blit, &cmds).unwrap();
    d.wait_idle(Engine::Blit, Duration::from_secs(10)).unwrap();
}

struct World {
    b1: Vgpu,
    a: Vgpu,
    b2: Vgpu,
    guest: GuestRam,
    lay: Layout,
    _phys: PhysGpu,
}

impl World {
    fn new(mode: GttMode) -> World {
        let mut phys = phys(48);
        let mut b1 = vgpu(&mut phys, "mini", mode);
        let mut a = vgpu(&mut phys, "mini", mode);
        let mut b2 = vgpu(&mut phys, "mini", mode);
        let (l1, la, l2) = (Layout::of(&b1), Layout::of(&a), Layout::of(&b2));
        // A's neighbours touch it on both sides, in local memory and in both halves of GM.
        let base = |v: &Vgpu| v.shared().lmem().host_base().raw();
        assert_eq!(base(&b1) + l1.lmem, base(&a));
        assert_eq!(base(&a) + la.lmem, base(&b2));
        assert_eq!((l1.map.end(), la.map.end()), (la.map.base, l2.map.base));
        assert_eq!((l1.hid.end(), la.hid.end()), (la.hid.base, l2.hid.base));
        let guest = GuestRam::new(0x5eed);
        a.set_dma_map(guest.dma());
        write_tree(&mut a);
        dress_neighbour(&mut b1, 1);
        dress_neighbour(&mut b2, 2);
        World {
            b1,
            a,
            b2,
            guest,
            lay: la,
            _phys: phys,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The model: what section 7.2 says about every GGTT write, and what reads must return.

/// Register offsets where an aligned 8-byte access is allowed: the `_LO` half of a pair.
fn is_lo_register(off: u64) -> bool {
    u32::try_from(off)
        .ok()
        .and_then(regs::lookup)
        .is_some_and(|(info, _)| info.name.ends_with("_LO"))
}

struct Model {
    lay: Layout,
    dma: Vec<Range>,
    /// Entries (by GM page address) that differ from the reset mapping.
    entries: HashMap<u64, u64>,
    staged: Option<(u64, u32)>,
    faults: u64,
    last_fault: u64,
    gtt_intr: bool,
}

impl Model {
    fn new(lay: Layout, dma: Vec<Range>) -> Self {
        Model {
            lay,
            dma,
            entries: HashMap::new(),
            staged: None,
            faults: 0,
            last_fault: 0,
            gtt_intr: false,
        }
    }

    fn reset(&mut self) {
        self.entries.clear();
        self.staged = None;
        self.faults = 0;
        self.last_fault = 0;
        self.gtt_intr = false;
    }

    /// The entry of the GM page at `gm` as a read returns it.
    fn entry(&self, gm: u64) -> u64 {
        if !self.lay.in_partition(gm) {
            return 0;
        }
        if let Some(&e) = self.entries.get(&gm) {
            return e;
        }
        if self.lay.map.contains(gm) {
            pte_local(gm - self.lay.map.base)
        } else {
            0
        }
    }

    fn acceptable(&self, gm: u64, raw: u64) -> bool {
        if !self.lay.in_partition(gm) {
            return false;
        }
        if raw & PTE_VALID == 0 {
            return true;
        }
        if raw & PTE_RESERVED_MASK != 0 {
            return false;
        }
        let addr = raw & PTE_ADDR_MASK;
        if raw & PTE_LOCAL != 0 {
            addr < self.lay.lmem
        } else {
            self.dma.iter().any(|r| r.contains(addr))
        }
    }

    fn commit(&mut self, gm: u64, raw: u64) {
        if self.acceptable(gm, raw) {
            self.entries.insert(gm, raw);
        } else {
            self.faults += 1;
            self.last_fault = gm;
            self.gtt_intr = true;
        }
    }

    /// Applies a BAR0 write of `data` at `off`.
    fn bar0_write(&mut self, off: u64, data: &[u8]) {
        let len = data.len();
        if off < REGS_SIZE {
            if len == 4 && off.is_multiple_of(4) {
                let v = u32::from_le_bytes(data.try_into().unwrap());
                match u32::try_from(off).unwrap() {
                    regs::RESET_CTL if v & regs::RESET_DEVICE != 0 => self.reset(),
                    regs::INTR_STATUS if v & regs::INTR_GTT_FAULT != 0 => self.gtt_intr = false,
                    _ => {}
                }
            }
            // 8-byte writes reach only `_LO`/`_HI` pairs, none of which the model follows.
        } else if (GGTT_OFFSET..GGTT_OFFSET + GGTT_SIZE).contains(&off) {
            let rel = off - GGTT_OFFSET;
            let gm = rel / 8 * PAGE_SIZE;
            match (len, rel % 8) {
                (8, 0) => self.commit(gm, u64::from_le_bytes(data.try_into().unwrap())),
                (4, 0) => self.staged = Some((gm, u32::from_le_bytes(data.try_into().unwrap()))),
                (4, 4) => {
                    let lo = match self.staged {
                        Some((p, lo)) if p == gm => {
                            self.staged = None;
                            lo
                        }
                        _ => lo32(self.entry(gm)),
                    };
                    let hi = u32::from_le_bytes(data.try_into().unwrap());
                    self.commit(gm, u64::from(hi) << 32 | u64::from(lo));
                }
                _ => {}
            }
        }
    }

    /// The value a 4-byte read of register `r` must return, where the manual fixes it.
    fn expected_reg(&self, r: u32) -> Option<u32> {
        let l = &self.lay;
        let pair = |base: u32, v: u64| {
            if r == base {
                Some(lo32(v))
            } else if r == base + 4 {
                Some(hi32(v))
            } else {
                None
            }
        };
        let fixed = match r {
            regs::ID => Some(regs::ID_VALUE),
            regs::VERSION => Some(vgpu_abi::SPEC_VERSION),
            regs::CAPS => Some(regs::CAPS_VALUE),
            regs::RESET_CTL | regs::TLB_INVALIDATE => Some(0),
            regs::GTT_FAULT_COUNT => Some(lo32(self.faults)),
            regs::PV_MAGIC => Some(regs::PV_MAGIC_VALUE),
            regs::PV_VERSION => Some(1),
            regs::PV_VGPU_ID => Some(l.id),
            regs::PV_ENGINE_MASK => Some(vgpu_abi::ALL_ENGINES_MASK),
            regs::PV_MAX_WIDTH => Some(l.max_w),
            regs::PV_MAX_HEIGHT => Some(l.max_h),
            _ => None,
        };
        fixed
            .or_else(|| pair(regs::GTT_FAULT_ADDR_LO, self.last_fault))
            .or_else(|| pair(regs::PV_MAPPABLE_BASE, l.map.base))
            .or_else(|| pair(regs::PV_MAPPABLE_SIZE, l.map.size))
            .or_else(|| pair(regs::PV_HIDDEN_BASE, l.hid.base))
            .or_else(|| pair(regs::PV_HIDDEN_SIZE, l.hid.size))
            .or_else(|| pair(regs::PV_LMEM_SIZE, l.lmem))
            .or_else(|| pair(regs::PV_GM_SIZE, GM_SIZE))
    }

    /// Checks what a BAR0 read of `data.len()` bytes at `off` returned (sections 1, 3, 5, 7.2).
    fn check_bar0_read(&self, off: u64, data: &[u8]) {
        let len = data.len() as u64;
        let ones = data.iter().all(|&b| b == 0xFF);
        let what = || format!("BAR0 read at {off:#x}, {len} bytes: {data:02x?}");
        let dw = |i: usize| u32::from_le_bytes(data[4 * i..4 * i + 4].try_into().unwrap());
        if off < REGS_SIZE {
            let good = (len == 4 && off.is_multiple_of(4))
                || (len == 8 && off.is_multiple_of(8) && is_lo_register(off));
            if !good {
                assert!(ones, "bad access must read all ones: {}", what());
                return;
            }
            for i in 0..usz(len / 4) {
                let r = u32::try_from(off).unwrap() + 4 * u32::try_from(i).unwrap();
                let v = dw(i);
                if regs::lookup(r).is_none() {
                    assert_eq!(v, u32::MAX, "unlisted register: {}", what());
                } else if let Some(exp) = self.expected_reg(r) {
                    assert_eq!(v, exp, "register {r:#x}: {}", what());
                } else if r == regs::INTR_STATUS {
                    assert_eq!(v & regs::INTR_GTT_FAULT != 0, self.gtt_intr, "{}", what());
                }
            }
        } else if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + PAGE_SIZE).contains(&off) {
            let rel = off - MSIX_TABLE_OFFSET;
            let good = matches!(len, 4 | 8) && rel.is_multiple_of(len) && rel + len <= 0x50;
            if !good {
                assert!(ones, "bad MSI-X table access: {}", what());
            } else if rel.is_multiple_of(16) {
                assert_eq!(dw(0) & 3, 0, "message address bits 1..0: {}", what());
            }
        } else if (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + PAGE_SIZE).contains(&off) {
            let rel = off - MSIX_PBA_OFFSET;
            let good = matches!(len, 4 | 8) && rel.is_multiple_of(len) && rel + len <= 8;
            if !good {
                assert!(ones, "bad PBA access: {}", what());
            } else {
                let mut q = [0u8; 8];
                q[usz(rel)..usz(rel + len)].copy_from_slice(data);
                assert_eq!(u64::from_le_bytes(q) & !0x1F, 0, "PBA bits: {}", what());
            }
        } else if (GGTT_OFFSET..GGTT_OFFSET + GGTT_SIZE).contains(&off) {
            let rel = off - GGTT_OFFSET;
            let e = self.entry(rel / 8 * PAGE_SIZE);
            let exp: Option<Vec<u8>> = match (len, rel % 8) {
                (8, 0) => Some(e.to_le_bytes().to_vec()),
                (4, 0) => Some(lo32(e).to_le_bytes().to_vec()),
                (4, 4) => Some(hi32(e).to_le_bytes().to_vec()),
                _ => None,
            };
            match exp {
                Some(x) => assert_eq!(data, &x[..], "GGTT entry: {}", what()),
                None => assert!(ones, "bad GGTT access: {}", what()),
            }
        } else {
            assert!(ones, "reserved BAR0 space: {}", what());
        }
    }
}

/// Checks a config-space read (section 2).
fn check_config_read(off: u16, data: &[u8]) {
    let len = data.len();
    let o = usize::from(off);
    let good = matches!(len, 1 | 2 | 4) && o.is_multiple_of(len) && o + len <= 0x1000;
    if !good {
        assert!(
            data.iter().all(|&b| b == 0xFF),
            "bad config access {off:#x}+{len}"
        );
    } else if o >= 0x100 {
        assert!(
            data.iter().all(|&b| b == 0),
            "extended config space {off:#x}"
        );
    } else if o == 0 && len >= 2 {
        assert_eq!(u16::from_le_bytes([data[0], data[1]]), VENDOR_ID);
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies. Picks are abstract (a page of "A's hidden range, from its end") and resolved
// against the world, so one strategy serves every layout.

/// A GM page.
#[derive(Clone, Debug)]
enum GmPick {
    Own {
        hidden: bool,
        from_end: bool,
        page: u64,
    },
    Neighbour {
        second: bool,
        hidden: bool,
        from_end: bool,
        page: u64,
    },
    Raw(u64),
}

impl GmPick {
    fn resolve(&self, w: &Ctx) -> u64 {
        match *self {
            GmPick::Own {
                hidden,
                from_end,
                page,
            } => {
                let r = if hidden { w.lay.hid } else { w.lay.map };
                r.page(from_end, page)
            }
            GmPick::Neighbour {
                second,
                hidden,
                from_end,
                page,
            } => {
                let n = if second { &w.nb[1] } else { &w.nb[0] };
                let r = if hidden { n.hid } else { n.map };
                r.page(from_end, page)
            }
            GmPick::Raw(v) => v & !(PAGE_SIZE - 1),
        }
    }
}

fn page_index() -> impl Strategy<Value = u64> {
    prop_oneof![3 => 0u64..4, 1 => 0u64..1 << 14]
}

fn gm_pick() -> impl Strategy<Value = GmPick> {
    prop_oneof![
        6 => (any::<bool>(), any::<bool>(), page_index())
            .prop_map(|(hidden, from_end, page)| GmPick::Own { hidden, from_end, page }),
        2 => (any::<bool>(), any::<bool>(), any::<bool>(), page_index()).prop_map(
            |(second, hidden, from_end, page)| GmPick::Neighbour { second, hidden, from_end, page }
        ),
        1 => prop_oneof![Just(0u64), 0..GM_SIZE, any::<u64>()].prop_map(GmPick::Raw),
    ]
}

/// A translation entry value.
#[derive(Clone, Debug)]
enum PtePick {
    Raw(u64),
    Local { from_end: bool, page: u64, ro: bool },
    LocalBeyond(u8),
    GuestRw { page: u64, ro: bool },
    GuestRo { page: u64, ro: bool },
    GuestOutside(u8),
    Reserved(u32),
    NotPresent(u64),
}

impl PtePick {
    fn resolve(&self, lay: &Layout) -> u64 {
        let ro = |r: bool| if r { PTE_READ_ONLY } else { 0 };
        let lmem = Range {
            base: 0,
            size: lay.lmem,
        };
        match *self {
            PtePick::Raw(v) => v,
            PtePick::Local {
                from_end,
                page,
                ro: r,
            } => pte_local(lmem.page(from_end, page)) | ro(r),
            PtePick::LocalBeyond(k) => {
                let off = [
                    lay.lmem,
                    lay.lmem + PAGE_SIZE,
                    2 * lay.lmem,
                    3 * lay.lmem - PAGE_SIZE,
                    PTE_ADDR_MASK,
                ];
                pte_local(off[usize::from(k) % off.len()])
            }
            PtePick::GuestRw { page, ro: r } => {
                pte_guest(RW_GPA + page % (RW_SIZE / PAGE_SIZE) * PAGE_SIZE) | ro(r)
            }
            PtePick::GuestRo { page, ro: r } => {
                pte_guest(RO_GPA + page % (RO_SIZE / PAGE_SIZE) * PAGE_SIZE) | ro(r)
            }
            PtePick::GuestOutside(k) => {
                let gpa = [
                    RW_GPA - PAGE_SIZE,
                    RW_GPA + RW_SIZE,
                    RO_GPA - PAGE_SIZE,
                    RO_GPA + RO_SIZE,
                    0,
                    PTE_ADDR_MASK,
                ];
                pte_guest(gpa[usize::from(k) % gpa.len()])
            }
            PtePick::Reserved(bit) => pte_local(PAGE_SIZE) | 1 << bit,
            PtePick::NotPresent(v) => v & !PTE_VALID,
        }
    }
}

fn reserved_bit() -> impl Strategy<Value = u32> {
    prop_oneof![3u32..12, 48u32..64]
}

fn pte_pick() -> impl Strategy<Value = PtePick> {
    prop_oneof![
        4 => (any::<bool>(), page_index(), any::<bool>())
            .prop_map(|(from_end, page, ro)| PtePick::Local { from_end, page, ro }),
        1 => any::<u8>().prop_map(PtePick::LocalBeyond),
        3 => (0u64..64, any::<bool>()).prop_map(|(page, ro)| PtePick::GuestRw { page, ro }),
        1 => (0u64..16, any::<bool>()).prop_map(|(page, ro)| PtePick::GuestRo { page, ro }),
        1 => any::<u8>().prop_map(PtePick::GuestOutside),
        1 => reserved_bit().prop_map(PtePick::Reserved),
        1 => any::<u64>().prop_map(PtePick::NotPresent),
        1 => prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>()].prop_map(PtePick::Raw),
    ]
}

/// A command address: GM, a PPGTT virtual address of the standard tree, or anything.
#[derive(Clone, Debug)]
enum AddrPick {
    /// GM of a byte of A's local memory through the reset mapping, away from the rings and
    /// the PPGTT tree.
    Local(u64),
    Gm(GmPick, u64),
    Va(u64, u64),
    Raw(u64),
}

impl AddrPick {
    /// The address; `ppgtt`: the command runs with the standard PPGTT tree, and `Local` picks a
    /// virtual address of it instead.
    fn resolve(&self, w: &Ctx, ppgtt: bool) -> u64 {
        match self {
            AddrPick::Local(off) if ppgtt => off % (TREE_PAGES * PAGE_SIZE),
            AddrPick::Local(off) => w.lay.map.base + LOCAL_DATA.base + off % LOCAL_DATA.size,
            AddrPick::Gm(g, off) => g.resolve(w).wrapping_add(*off),
            AddrPick::Va(page, off) => page * PAGE_SIZE + off,
            AddrPick::Raw(v) => *v,
        }
    }
}

fn addr_pick() -> impl Strategy<Value = AddrPick> {
    prop_oneof![
        8 => prop_oneof![0u64..1 << 20, any::<u64>()].prop_map(AddrPick::Local),
        4 => (gm_pick(), prop_oneof![3 => Just(0u64), 2 => 0u64..4096, 1 => 4000u64..4096])
            .prop_map(|(g, o)| AddrPick::Gm(g, o)),
        2 => (0u64..24, prop_oneof![Just(0u64), 0u64..4096]).prop_map(|(p, o)| AddrPick::Va(p, o)),
        1 => any::<u64>().prop_map(AddrPick::Raw),
    ]
}

fn dim() -> impl Strategy<Value = u32> {
    prop_oneof![
        12 => 0u32..40,
        1 => prop_oneof![Just(cmd::MAX_DIM), Just(cmd::MAX_DIM + 1), Just(0xFFFF), 256u32..2048],
    ]
}

/// A pitch: the tight one plus a little, or anything.
#[derive(Clone, Copy, Debug)]
enum Pitch {
    Tight(u32),
    Raw(u32),
}

impl Pitch {
    fn resolve(self, row_bytes: u32) -> u32 {
        match self {
            Pitch::Tight(extra) => row_bytes.saturating_add(extra),
            Pitch::Raw(v) => v,
        }
    }
}

fn pitch() -> impl Strategy<Value = Pitch> {
    prop_oneof![
        6 => (0u32..64).prop_map(Pitch::Tight),
        1 => prop_oneof![Just(0u32), Just(cmd::MAX_PITCH), Just(cmd::MAX_PITCH + 1), any::<u32>()]
            .prop_map(Pitch::Raw),
    ]
}

/// A register for `MI_LOAD_REGISTER_IMM` / `MI_STORE_REGISTER_MEM`.
#[derive(Clone, Debug)]
enum RegPick {
    Scratch(bool),
    PlaneSurf(bool),
    OwnGpr(u32),
    OtherGpr(usize, u32),
    Head,
    Fence,
    Listed(usize),
    Raw(u32),
}

impl RegPick {
    fn resolve(&self, e: Engine) -> u32 {
        let b = regs::engine_base(e);
        match *self {
            RegPick::Scratch(one) => {
                if one {
                    regs::SCRATCH1
                } else {
                    regs::SCRATCH0
                }
            }
            RegPick::PlaneSurf(hi) => {
                if hi {
                    regs::PLANE_SURF_HI
                } else {
                    regs::PLANE_SURF_LO
                }
            }
            RegPick::OwnGpr(n) => b + regs::gpr(n % regs::GPR_COUNT),
            RegPick::OtherGpr(o, n) => {
                regs::engine_base(Engine::ALL[(e.index() + 1 + o % 3) % 4]) + regs::gpr(n % 8)
            }
            RegPick::Head => b + regs::RING_HEAD,
            RegPick::Fence => b + regs::LAST_FENCE,
            RegPick::Listed(i) => {
                let all = all_registers();
                all[i % all.len()]
            }
            RegPick::Raw(v) => v,
        }
    }
}

fn reg_pick() -> impl Strategy<Value = RegPick> {
    prop_oneof![
        2 => any::<bool>().prop_map(RegPick::Scratch),
        1 => any::<bool>().prop_map(RegPick::PlaneSurf),
        3 => (0u32..8).prop_map(RegPick::OwnGpr),
        1 => (0usize..3, 0u32..8).prop_map(|(o, n)| RegPick::OtherGpr(o, n)),
        1 => Just(RegPick::Head),
        1 => Just(RegPick::Fence),
        1 => any::<usize>().prop_map(RegPick::Listed),
        1 => any::<u32>().prop_map(RegPick::Raw),
    ]
}

/// One command of a submission, with random parameters.
#[derive(Clone, Debug)]
enum CmdPick {
    Noop,
    UserInterrupt,
    BatchEnd,
    BatchStart(AddrPick, bool),
    /// `MI_BATCH_BUFFER_START` of batch slot `n` (see [`Op::Batch`]), second level or not.
    BatchSlot(u64, bool),
    StoreData(AddrPick, u32),
    LoadReg(Vec<(RegPick, u32)>),
    StoreReg(RegPick, AddrPick),
    Semaphore(AddrPick, u32, bool),
    ColorBlt {
        rop: u8,
        bpp: u32,
        dst: AddrPick,
        pitch: Pitch,
        size: (u32, u32),
        color: u32,
    },
    CopyBlt {
        rop: u8,
        bpp: u32,
        dst: (AddrPick, Pitch),
        src: (AddrPick, Pitch),
        size: (u32, u32),
        pattern: u32,
    },
    Surface {
        addr: AddrPick,
        pitch: Pitch,
        size: (u32, u32),
        format: u32,
    },
    Fill {
        at: (u32, u32),
        size: (u32, u32),
        argb: u32,
        blend: bool,
    },
    Triangle([(u32, u32); 3], u32, bool),
    Csc {
        src: (AddrPick, Pitch, (u32, u32)),
        dst: (AddrPick, Pitch, (u32, u32)),
        mode: u32,
    },
    Dispatch {
        kernel: u32,
        params: [u32; 3],
        scalar: f32,
        bufs: [AddrPick; 3],
    },
    /// Several commands, one after the other.
    Seq(Vec<CmdPick>),
    Raw(Vec<u32>),
    Header {
        fields: (u32, u32, u32, u32),
        payload: Vec<u32>,
    },
}

fn bpp_bytes(bpp: u32) -> u32 {
    match bpp {
        0 => 1,
        1 => 2,
        _ => 4,
    }
}

impl CmdPick {
    /// The engine that executes the command, for non-MI commands.
    fn engine(&self) -> Option<Engine> {
        match self {
            CmdPick::ColorBlt { .. } | CmdPick::CopyBlt { .. } => Some(Engine::Blit),
            CmdPick::Surface { .. } | CmdPick::Fill { .. } | CmdPick::Triangle(..) => {
                Some(Engine::Render)
            }
            CmdPick::Csc { .. } => Some(Engine::Video),
            CmdPick::Dispatch { .. } => Some(Engine::Compute),
            CmdPick::Seq(v) => v.iter().find_map(CmdPick::engine),
            _ => None,
        }
    }

    fn encode(&self, w: &Ctx, e: Engine, ppgtt: bool) -> Vec<u32> {
        let a = |p: &AddrPick| p.resolve(w, ppgtt);
        match self {
            CmdPick::Noop => enc::noop().to_vec(),
            CmdPick::UserInterrupt => enc::user_interrupt().to_vec(),
            CmdPick::BatchEnd => enc::batch_end().to_vec(),
            CmdPick::BatchStart(p, second) => enc::batch_start(a(p), *second).to_vec(),
            CmdPick::BatchSlot(n, second) => {
                enc::batch_start(batch_slot(w, *n, ppgtt), *second).to_vec()
            }
            CmdPick::StoreData(p, v) => enc::store_data_imm(a(p), *v).to_vec(),
            CmdPick::LoadReg(pairs) => {
                let n = u32::try_from(2 * pairs.len()).unwrap();
                let mut v = vec![cmd::header(
                    cmd::Client::Mi,
                    cmd::MI_LOAD_REGISTER_IMM,
                    0,
                    n,
                )];
                for (r, x) in pairs {
                    v.extend([r.resolve(e), *x]);
                }
                v
            }
            CmdPick::StoreReg(r, p) => enc::store_register_mem(r.resolve(e), a(p)).to_vec(),
            CmdPick::Semaphore(p, v, ge) => enc::semaphore_wait(a(p), *v, *ge).to_vec(),
            CmdPick::ColorBlt {
                rop,
                bpp,
                dst,
                pitch,
                size: (w_, h),
                color,
            } => {
                let p = pitch.resolve(w_.saturating_mul(bpp_bytes(*bpp)));
                enc::color_blt(*rop, *bpp, a(dst), p, *w_, *h, *color).to_vec()
            }
            CmdPick::CopyBlt {
                rop,
                bpp,
                dst,
                src,
                size: (w_, h),
                pattern,
            } => {
                let row = w_.saturating_mul(bpp_bytes(*bpp));
                enc::src_copy_blt(enc::Copy {
                    rop: *rop,
                    bpp: *bpp,
                    dst: a(&dst.0),
                    dst_pitch: dst.1.resolve(row),
                    src: a(&src.0),
                    src_pitch: src.1.resolve(row),
                    width: *w_,
                    height: *h,
                    pattern: *pattern,
                })
                .to_vec()
            }
            CmdPick::Surface {
                addr,
                pitch,
                size: (w_, h),
                format,
            } => enc::surface_state(
                a(addr),
                pitch.resolve(w_.saturating_mul(4)),
                *w_,
                *h,
                *format,
            )
            .to_vec(),
            CmdPick::Fill {
                at,
                size,
                argb,
                blend,
            } => enc::fill_rect(at.0, at.1, size.0, size.1, *argb, *blend).to_vec(),
            CmdPick::Triangle(v, argb, blend) => enc::triangle(*v, *argb, *blend).to_vec(),
            CmdPick::Csc { src, dst, mode } => {
                // Row bytes of the XRGB side (4 per pixel) or of the NV12 Y plane (1 per pixel).
                let row = |s: (u32, u32), xrgb: bool| s.0.saturating_mul(if xrgb { 4 } else { 1 });
                let to_nv12 = *mode == cmd::CSC_XRGB_TO_NV12;
                enc::csc_scale(enc::Csc {
                    src: a(&src.0),
                    src_pitch: src.1.resolve(row(src.2, to_nv12)),
                    src_size: src.2,
                    dst: a(&dst.0),
                    dst_pitch: dst.1.resolve(row(dst.2, !to_nv12)),
                    dst_size: dst.2,
                    mode: *mode,
                })
                .to_vec()
            }
            CmdPick::Dispatch {
                kernel,
                params,
                scalar,
                bufs,
            } => enc::dispatch(enc::Dispatch {
                kernel: *kernel,
                params: *params,
                scalar: *scalar,
                buffers: [a(&bufs[0]), a(&bufs[1]), a(&bufs[2])],
            })
            .to_vec(),
            CmdPick::Seq(v) => v.iter().flat_map(|c| c.encode(w, e, ppgtt)).collect(),
            CmdPick::Raw(v) => v.clone(),
            CmdPick::Header {
                fields: (c, o, f, l),
                payload,
            } => {
                let mut v = vec![c << 29 | (o & 0x7F) << 22 | (f & 0x3F) << 16 | (l & 0xFFFF)];
                v.extend(payload);
                v
            }
        }
    }
}

fn compute_param() -> impl Strategy<Value = u32> {
    prop_oneof![
        8 => 0u32..48,
        1 => prop_oneof![
            Just(1u32 << 20),
            Just(cmd::MAX_ELEMENTS),
            Just(cmd::MAX_ELEMENTS + 1),
            Just(u32::MAX)
        ],
    ]
}

/// A command with parameters inside the limits and addresses in A's memory (GM, or VAs of the
/// standard tree), so that most submissions made of them run.
fn sane_cmd() -> impl Strategy<Value = CmdPick> {
    let local = || (0u64..1 << 20).prop_map(AddrPick::Local);
    let local4 = || (0u64..1 << 18).prop_map(|o| AddrPick::Local(4 * o));
    let small = || 1u32..33;
    let size = move || (small(), small());
    let even = || (1u32..17).prop_map(|x| 2 * x);
    let tight = || (0u32..16).prop_map(Pitch::Tight);
    let reg = || {
        prop_oneof![
            any::<bool>().prop_map(RegPick::Scratch),
            (0u32..8).prop_map(RegPick::OwnGpr),
            any::<bool>().prop_map(RegPick::PlaneSurf)
        ]
    };
    prop_oneof![
        2 => (local4(), any::<u32>()).prop_map(|(p, v)| CmdPick::StoreData(p, v)),
        1 => Just(CmdPick::UserInterrupt),
        1 => prop::collection::vec((reg(), any::<u32>()), 1..4).prop_map(CmdPick::LoadReg),
        1 => (prop_oneof![reg(), Just(RegPick::Head), Just(RegPick::Fence)], local4())
            .prop_map(|(r, p)| CmdPick::StoreReg(r, p)),
        1 => local4().prop_map(|p| CmdPick::Semaphore(p, 0, true)),
        2 => (0..BATCH_SLOTS, prop_oneof![3 => Just(false), 1 => Just(true)])
            .prop_map(|(n, l2)| CmdPick::BatchSlot(n, l2)),
        4 => (any::<u8>(), 0u32..3, local(), tight(), size(), any::<u32>()).prop_map(
            |(rop, bpp, dst, pitch, size, color)| CmdPick::ColorBlt { rop, bpp, dst, pitch, size, color }
        ),
        3 => (any::<u8>(), 0u32..3, (local(), tight()), (local(), tight()), size(), any::<u32>())
            .prop_map(|(rop, bpp, dst, src, size, pattern)| CmdPick::CopyBlt {
                rop, bpp, dst, src, size, pattern
            }),
        // A render target, then draws into it.
        4 => (
            (local(), tight(), (0u32..64, 0u32..64), 0u32..2).prop_map(
                |(addr, pitch, size, format)| CmdPick::Surface { addr, pitch, size, format }
            ),
            prop::collection::vec(prop_oneof![
                2 => ((0u32..48, 0u32..48), size(), any::<u32>(), any::<bool>())
                    .prop_map(|(at, size, argb, blend)| CmdPick::Fill { at, size, argb, blend }),
                1 => (prop::array::uniform3((0u32..64, 0u32..64)), any::<u32>(), any::<bool>())
                    .prop_map(|(v, c, b)| CmdPick::Triangle(v, c, b)),
            ], 0..3)
        )
            .prop_map(|(surface, mut draws)| {
                draws.insert(0, surface);
                CmdPick::Seq(draws)
            }),
        2 => ((local(), tight(), (even(), even())), (local(), tight(), (even(), even())), 0u32..2)
            .prop_map(|(src, dst, mode)| CmdPick::Csc { src, dst, mode }),
        2 => (0u32..3, prop::array::uniform3(0u32..48), any::<f32>(), prop::array::uniform3(local4()))
            .prop_map(|(kernel, params, scalar, bufs)| CmdPick::Dispatch {
                kernel, params, scalar, bufs
            }),
    ]
}

fn cmd_pick() -> impl Strategy<Value = CmdPick> {
    let size = || (dim(), dim());
    let xy = || (0u32..64, 0u32..64);
    let rop = || prop_oneof![Just(cmd::ROP_PATCOPY), Just(cmd::ROP_SRCCOPY), any::<u8>()];
    let bpp = || prop_oneof![3 => 0u32..3, 1 => 0u32..4];
    prop_oneof![
        1 => Just(CmdPick::Noop),
        1 => Just(CmdPick::UserInterrupt),
        1 => Just(CmdPick::BatchEnd),
        1 => (addr_pick(), any::<bool>()).prop_map(|(p, s)| CmdPick::BatchStart(p, s)),
        3 => (addr_pick(), any::<u32>()).prop_map(|(p, v)| CmdPick::StoreData(p, v)),
        2 => prop::collection::vec((reg_pick(), any::<u32>()), 1..4).prop_map(CmdPick::LoadReg),
        1 => (reg_pick(), addr_pick()).prop_map(|(r, p)| CmdPick::StoreReg(r, p)),
        1 => (addr_pick(), 0u32..4, any::<bool>()).prop_map(|(p, v, g)| CmdPick::Semaphore(p, v, g)),
        4 => (rop(), bpp(), addr_pick(), pitch(), size(), any::<u32>()).prop_map(
            |(rop, bpp, dst, pitch, size, color)| CmdPick::ColorBlt { rop, bpp, dst, pitch, size, color }
        ),
        3 => (rop(), bpp(), (addr_pick(), pitch()), (addr_pick(), pitch()), size(), any::<u32>())
            .prop_map(|(rop, bpp, dst, src, size, pattern)| CmdPick::CopyBlt {
                rop, bpp, dst, src, size, pattern
            }),
        2 => (addr_pick(), pitch(), size(), prop_oneof![4 => 0u32..2, 1 => any::<u32>()]).prop_map(
            |(addr, pitch, size, format)| CmdPick::Surface { addr, pitch, size, format }
        ),
        2 => (xy(), size(), any::<u32>(), any::<bool>())
            .prop_map(|(at, size, argb, blend)| CmdPick::Fill { at, size, argb, blend }),
        1 => (prop::array::uniform3(xy()), any::<u32>(), any::<bool>())
            .prop_map(|(v, c, b)| CmdPick::Triangle(v, c, b)),
        2 => (
            (addr_pick(), pitch(), size()),
            (addr_pick(), pitch(), size()),
            prop_oneof![4 => 0u32..2, 1 => any::<u32>()]
        )
            .prop_map(|(src, dst, mode)| CmdPick::Csc { src, dst, mode }),
        2 => (
            prop_oneof![4 => 0u32..3, 1 => any::<u32>()],
            prop::array::uniform3(compute_param()),
            prop_oneof![Just(1.5f32), Just(f32::NAN), any::<f32>()],
            prop::array::uniform3(addr_pick())
        )
            .prop_map(|(kernel, params, scalar, bufs)| CmdPick::Dispatch {
                kernel, params, scalar, bufs
            }),
        1 => prop::collection::vec(any::<u32>(), 1..8).prop_map(CmdPick::Raw),
        1 => ((0u32..8, 0u32..128, 0u32..64, prop_oneof![0u32..16, any::<u32>()]),
              prop::collection::vec(any::<u32>(), 0..12))
            .prop_map(|(fields, payload)| CmdPick::Header { fields, payload }),
    ]
}

/// A BAR0 offset.
#[derive(Clone, Debug)]
enum OffPick {
    Register(usize, u64),
    Unlisted(u64),
    MsixTable(u64),
    Pba(u64),
    Ggtt(GmPick, u64),
    Reserved(u64),
    Beyond(u64),
}

impl OffPick {
    fn resolve(&self, w: &Ctx) -> u64 {
        match self {
            OffPick::Register(i, delta) => {
                let all = all_registers();
                u64::from(all[i % all.len()]) + delta
            }
            OffPick::Unlisted(o) => *o,
            OffPick::MsixTable(o) => MSIX_TABLE_OFFSET + o,
            OffPick::Pba(o) => MSIX_PBA_OFFSET + o,
            OffPick::Ggtt(g, sub) => {
                GGTT_OFFSET.wrapping_add((g.resolve(w) / PAGE_SIZE).wrapping_mul(8)) + sub
            }
            OffPick::Reserved(o) => *o,
            OffPick::Beyond(o) => *o,
        }
    }
}

fn delta() -> impl Strategy<Value = u64> {
    prop_oneof![8 => Just(0u64), 1 => 1u64..8]
}

fn off_pick() -> impl Strategy<Value = OffPick> {
    prop_oneof![
        8 => (any::<usize>(), delta()).prop_map(|(i, d)| OffPick::Register(i, d)),
        1 => (0..REGS_SIZE).prop_map(OffPick::Unlisted),
        1 => prop_oneof![0u64..0x60, 0u64..PAGE_SIZE].prop_map(OffPick::MsixTable),
        1 => prop_oneof![0u64..16, 0u64..PAGE_SIZE].prop_map(OffPick::Pba),
        4 => (gm_pick(), delta()).prop_map(|(g, d)| OffPick::Ggtt(g, d)),
        1 => (MSIX_PBA_OFFSET + PAGE_SIZE..GGTT_OFFSET).prop_map(OffPick::Reserved),
        1 => prop_oneof![GGTT_OFFSET + GGTT_SIZE..GGTT_OFFSET + GGTT_SIZE + 64, any::<u64>()]
            .prop_map(OffPick::Beyond),
    ]
}

fn access_len() -> impl Strategy<Value = usize> {
    prop_oneof![6 => Just(4usize), 3 => Just(8usize), 1 => 0usize..17]
}

/// A value for a BAR0 write.
#[derive(Clone, Debug)]
enum ValPick {
    Raw(u64),
    Pte(PtePick),
}

fn val_pick() -> impl Strategy<Value = ValPick> {
    prop_oneof![
        4 => prop_oneof![
            Just(0u64),
            Just(u64::MAX),
            Just(1u64),
            Just(0xFFFF_FFFF),
            0u64..0x1_0000,
            any::<u64>()
        ]
        .prop_map(ValPick::Raw),
        3 => pte_pick().prop_map(ValPick::Pte),
    ]
}

/// `len` bytes of `v`, repeated as needed.
fn bytes_of(v: u64, len: usize) -> Vec<u8> {
    v.to_le_bytes().iter().copied().cycle().take(len).collect()
}

/// Where a ring goes.
#[derive(Clone, Debug)]
enum RingBase {
    /// Where the reference driver puts it: the top of local memory, through the reset mapping.
    Standard,
    Gm(GmPick),
    Raw(u64),
}

/// The part of A's local memory that commands mostly work on.
const LOCAL_DATA: Range = Range {
    base: 0x40_0000,
    size: 0x80_0000,
};

/// Size of the rings the test sets up like the reference driver (16 KiB).
const RING_BYTES: u32 = 4 * 4096;

/// Where the standard PPGTT tree lives in A's local memory, and the local pages it maps.
const TREE_OFF: u64 = 0x10_0000;
const TREE_DATA_OFF: u64 = 0x20_0000;
/// Number of VA pages of the standard tree mapped by [`Op::PpgttTree`].
const TREE_PAGES: u64 = 24;

/// A PPGTT root value.
#[derive(Clone, Debug)]
enum RootPick {
    Zero,
    Tree(bool),
    GuestTable,
    ReadOnlyTable,
    Reserved(u32),
    Raw(u64),
}

impl RootPick {
    fn resolve(&self) -> u64 {
        match *self {
            RootPick::Zero => 0,
            RootPick::Tree(ro) => pte_local(TREE_OFF) | if ro { PTE_READ_ONLY } else { 0 },
            RootPick::GuestTable => pte_guest(RW_GPA + 0x3000),
            RootPick::ReadOnlyTable => pte_guest(RO_GPA),
            RootPick::Reserved(bit) => pte_local(TREE_OFF) | 1 << bit,
            RootPick::Raw(v) => v,
        }
    }
}

/// Writes the standard PPGTT tree into A's local memory: one table per level at [`TREE_OFF`],
/// VA page `j < TREE_PAGES` mapped onto local page `TREE_DATA_OFF / PAGE_SIZE + j`.
fn write_tree(a: &mut Vgpu) {
    for level in 0..3 {
        let t = TREE_OFF + level * PAGE_SIZE;
        a.bar2_write(t, &pte_local(t + PAGE_SIZE).to_le_bytes());
    }
    let l1 = TREE_OFF + 3 * PAGE_SIZE;
    for j in 0..TREE_PAGES {
        let pte = pte_local(TREE_DATA_OFF + j * PAGE_SIZE);
        a.bar2_write(l1 + 8 * j, &pte.to_le_bytes());
    }
}

/// Batch buffers: slot `n` is one page at local offset `BATCH_OFF + n * 4096` (GM through the
/// reset mapping) and, for PPGTT contexts, at VA page `BATCH_VA_PAGE + n` of the standard tree.
const BATCH_SLOTS: u64 = 8;
const BATCH_OFF: u64 = 0x38_0000;
const BATCH_VA_PAGE: u64 = TREE_PAGES - BATCH_SLOTS;

/// The address of batch slot `n` in GM, or as a VA of the standard tree.
fn batch_slot(w: &Ctx, n: u64, ppgtt: bool) -> u64 {
    let n = n % BATCH_SLOTS;
    if ppgtt {
        (BATCH_VA_PAGE + n) * PAGE_SIZE
    } else {
        w.lay.map.base + BATCH_OFF + n * PAGE_SIZE
    }
}

/// How a written batch ends.
#[derive(Clone, Debug)]
enum BatchTail {
    End,
    Chain(u64),
    Call(u64),
    Nothing,
}

/// One guest operation on vGPU A.
#[derive(Clone, Debug)]
enum Op {
    ConfigRead(u16, usize),
    ConfigWrite(u16, Vec<u8>),
    Bar0Read(OffPick, usize),
    Bar0Write(OffPick, usize, ValPick),
    Ggtt8(GmPick, PtePick),
    Ggtt4(GmPick, bool, PtePick),
    Bar2Read(bool, u64, usize),
    Bar2Write(bool, u64, Vec<u8>),
    Ring(usize, RingBase, u32),
    /// Commands for an engine (`None`: the engine of the first engine-specific command), with
    /// driver-like recovery first (`fix`: re-enable a disabled or failed ring), and the
    /// doorbell (`None`: the end of the commands).
    Submit {
        engine: Option<usize>,
        fix: bool,
        cmds: Vec<CmdPick>,
        tail: Option<u32>,
    },
    Doorbell(usize, u32),
    Reset(u32),
    PpgttRoot(usize, RootPick),
    PpgttTree,
    /// Writes batch slot `n` (both its GM and its PPGTT copy): commands, then how it ends.
    /// Commands of other engines than `engine` are left out.
    Batch(u64, usize, Vec<CmdPick>, BatchTail),
    PpgttMap(u64, PtePick),
    Tlb(u32),
    Run(usize),
    /// An access through the in-process MMIO bus (`MutDeviceMmio`), at the base config space
    /// gives BAR2 (`true`) or BAR0: decoded only while memory space is enabled.
    Bus(bool, OffPick, usize, Option<ValPick>),
    /// The host scans the display plane out.
    Scanout,
    /// Firmware-like BAR assignment (BAR0 and BAR2 bases from a few layouts, overlapping ones
    /// included) and memory-space enable.
    Firmware(u8, bool),
}

fn op() -> impl Strategy<Value = Op> {
    let engine = || 0usize..4;
    prop_oneof![
        2 => (0u16..0x1100, 0usize..9).prop_map(|(o, l)| Op::ConfigRead(o, l)),
        2 => (0u16..0x1100, prop::collection::vec(any::<u8>(), 0..9))
            .prop_map(|(o, d)| Op::ConfigWrite(o, d)),
        8 => (off_pick(), access_len()).prop_map(|(o, l)| Op::Bar0Read(o, l)),
        8 => (off_pick(), access_len(), val_pick()).prop_map(|(o, l, v)| Op::Bar0Write(o, l, v)),
        6 => (gm_pick(), pte_pick()).prop_map(|(g, p)| Op::Ggtt8(g, p)),
        3 => (gm_pick(), any::<bool>(), pte_pick()).prop_map(|(g, h, p)| Op::Ggtt4(g, h, p)),
        2 => (any::<bool>(), prop_oneof![0u64..64, 0u64..1 << 25, any::<u64>()], 0usize..80)
            .prop_map(|(e, o, l)| Op::Bar2Read(e, o, l)),
        2 => (
            any::<bool>(),
            prop_oneof![0u64..64, 0u64..1 << 25, any::<u64>()],
            prop::collection::vec(any::<u8>(), 0..80)
        )
            .prop_map(|(e, o, d)| Op::Bar2Write(e, o, d)),
        3 => (
            engine(),
            prop_oneof![
                6 => Just(RingBase::Standard),
                2 => gm_pick().prop_map(RingBase::Gm),
                1 => any::<u64>().prop_map(RingBase::Raw)
            ],
            prop_oneof![
                6 => Just(4096u32),
                2 => Just(16384u32),
                1 => prop_oneof![Just(0u32), Just(3000u32), Just(RING_SIZE_MAX), Just(1u32 << 21), any::<u32>()]
            ]
        )
            .prop_map(|(e, b, s)| Op::Ring(e, b, s)),
        10 => (
            prop_oneof![9 => Just(None), 1 => engine().prop_map(Some)],
            prop_oneof![9 => Just(true), 1 => Just(false)],
            prop::collection::vec(prop_oneof![4 => sane_cmd(), 1 => cmd_pick()], 1..5),
            prop_oneof![19 => Just(None), 1 => any::<u32>().prop_map(Some)]
        )
            .prop_map(|(engine, fix, cmds, tail)| Op::Submit { engine, fix, cmds, tail }),
        1 => (engine(), prop_oneof![0u32..64, any::<u32>()]).prop_map(|(e, t)| Op::Doorbell(e, t)),
        1 => prop_oneof![
            2 => Just(regs::RESET_DEVICE),
            2 => (0u32..4).prop_map(|e| 0x100 << e),
            1 => any::<u32>()
        ]
        .prop_map(Op::Reset),
        2 => (
            engine(),
            prop_oneof![
                2 => Just(RootPick::Zero),
                4 => any::<bool>().prop_map(RootPick::Tree),
                1 => Just(RootPick::GuestTable),
                1 => Just(RootPick::ReadOnlyTable),
                1 => reserved_bit().prop_map(RootPick::Reserved),
                1 => any::<u64>().prop_map(RootPick::Raw)
            ]
        )
            .prop_map(|(e, r)| Op::PpgttRoot(e, r)),
        1 => Just(Op::PpgttTree),
        3 => (
            0..BATCH_SLOTS,
            engine(),
            prop::collection::vec(prop_oneof![4 => sane_cmd(), 1 => cmd_pick()], 0..4),
            prop_oneof![
                4 => Just(BatchTail::End),
                1 => (0..BATCH_SLOTS).prop_map(BatchTail::Chain),
                1 => (0..BATCH_SLOTS).prop_map(BatchTail::Call),
                1 => Just(BatchTail::Nothing)
            ]
        )
            .prop_map(|(n, e, c, t)| Op::Batch(n, e, c, t)),
        2 => (prop_oneof![0u64..TREE_PAGES, 0u64..512], pte_pick()).prop_map(|(j, p)| Op::PpgttMap(j, p)),
        1 => prop_oneof![Just(0x8000_000Fu32), Just(0x8000_0000), 0u32..16, any::<u32>()].prop_map(Op::Tlb),
        4 => (1usize..40).prop_map(Op::Run),
        2 => (any::<bool>(), off_pick(), access_len(), prop::option::of(val_pick()))
            .prop_map(|(bar2, o, l, v)| Op::Bus(bar2, o, l, v)),
        1 => Just(Op::Scanout),
        1 => (any::<u8>(), prop_oneof![3 => Just(true), 1 => Just(false)])
            .prop_map(|(l, e)| Op::Firmware(l, e)),
    ]
}

fn gtt_mode() -> impl Strategy<Value = GttMode> {
    prop_oneof![Just(GttMode::Shadow), Just(GttMode::TwoDim)]
}

// ---------------------------------------------------------------------------------------------
// Applying operations.

/// What picks resolve against: A's layout and its neighbours'.
struct Ctx {
    lay: Layout,
    nb: [Layout; 2],
}

impl Ctx {
    fn of(w: &World) -> Ctx {
        Ctx {
            lay: w.lay,
            nb: [Layout::of(&w.b1), Layout::of(&w.b2)],
        }
    }
}

/// The fuzzed vGPU, its guest, and the model that follows it.
struct Fuzz<'w> {
    w: &'w mut World,
    m: Model,
    ctx: Ctx,
}

impl Fuzz<'_> {
    fn write(&mut self, off: u64, data: &[u8]) {
        self.m.bar0_write(off, data);
        self.w.a.bar0_write(off, data);
    }

    fn write32(&mut self, off: u32, v: u32) {
        self.write(u64::from(off), &v.to_le_bytes());
    }

    fn read(&self, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0xA5u8; len];
        self.w.a.bar0_read(off, &mut b);
        self.m.check_bar0_read(off, &b);
        b
    }

    fn read32(&self, off: u32) -> u32 {
        u32::from_le_bytes(self.read(u64::from(off), 4).try_into().unwrap())
    }

    /// A CPU store through GM, as a driver does it: through the aperture for local pages, into
    /// guest RAM for guest pages (only where the guest may write).
    fn cpu_write_gm(&mut self, gm: u64, data: &[u8]) {
        let e = u64::from_le_bytes(
            self.read(GGTT_OFFSET + (gm / PAGE_SIZE) * 8, 8)
                .try_into()
                .unwrap(),
        );
        if e & PTE_VALID == 0 {
            return;
        }
        let addr = (e & PTE_ADDR_MASK) + gm % PAGE_SIZE;
        if e & PTE_LOCAL != 0 {
            self.w.a.bar2_write(addr, data);
        } else {
            self.w.guest.cpu_write(addr, data);
        }
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::ConfigRead(off, len) => {
                let mut b = vec![0xA5u8; *len];
                self.w.a.config_read(*off, &mut b);
                check_config_read(*off, &b);
            }
            Op::ConfigWrite(off, data) => {
                self.w.a.config_write(*off, data);
            }
            Op::Bar0Read(o, len) => {
                self.read(o.resolve(&self.ctx), *len);
            }
            Op::Bar0Write(o, len, v) => {
                let raw = match v {
                    ValPick::Raw(r) => *r,
                    ValPick::Pte(p) => p.resolve(&self.ctx.lay),
                };
                let off = o.resolve(&self.ctx);
                self.write(off, &bytes_of(raw, *len));
            }
            Op::Ggtt8(g, p) => {
                let off = GGTT_OFFSET + g.resolve(&self.ctx) / PAGE_SIZE * 8;
                let v = p.resolve(&self.ctx.lay);
                self.write(off, &v.to_le_bytes());
            }
            Op::Ggtt4(g, high, p) => {
                let off = GGTT_OFFSET + g.resolve(&self.ctx) / PAGE_SIZE * 8;
                let v = p.resolve(&self.ctx.lay);
                if *high {
                    self.write(off + 4, &hi32(v).to_le_bytes());
                } else {
                    self.write(off, &lo32(v).to_le_bytes());
                }
            }
            Op::Bar2Read(from_end, off, len) => {
                let lmem = self.ctx.lay.lmem;
                let off = if *from_end {
                    lmem.wrapping_sub(*off)
                } else {
                    *off
                };
                let mut b = vec![0xA5u8; *len];
                self.w.a.bar2_read(off, &mut b);
                if off.checked_add(*len as u64).is_none_or(|end| end > lmem) {
                    assert!(b.iter().all(|&x| x == 0xFF), "BAR2 read past the aperture");
                }
            }
            Op::Bar2Write(from_end, off, data) => {
                let lmem = self.ctx.lay.lmem;
                let off = if *from_end {
                    lmem.wrapping_sub(*off)
                } else {
                    *off
                };
                self.w.a.bar2_write(off, data);
            }
            Op::Ring(e, base, size) => {
                let eng = Engine::ALL[*e];
                let gm = match base {
                    RingBase::Standard => {
                        self.ctx.lay.map.base + ring_lmem_offset(self.ctx.lay.lmem, eng)
                    }
                    RingBase::Gm(g) => g.resolve(&self.ctx),
                    RingBase::Raw(v) => *v,
                };
                let b = regs::engine_base(eng);
                self.write32(b + regs::RING_CTL, 0);
                self.write32(b + regs::RING_BASE_LO, lo32(gm));
                self.write32(b + regs::RING_BASE_HI, hi32(gm));
                self.write32(b + regs::RING_SIZE, *size);
                self.write32(b + regs::RING_CTL, regs::RING_CTL_ENABLE);
            }
            Op::Submit {
                engine,
                fix,
                cmds,
                tail,
            } => {
                let eng = match engine {
                    Some(e) => Engine::ALL[*e],
                    None => cmds
                        .iter()
                        .find_map(CmdPick::engine)
                        .unwrap_or(Engine::Blit),
                };
                if *fix {
                    self.fix_ring(eng);
                }
                let root = self.read32(regs::engine_base(eng) + regs::PPGTT_ROOT_LO);
                let ppgtt = u64::from(root) & PTE_VALID != 0;
                let dws: Vec<u32> = cmds
                    .iter()
                    .filter(|c| engine.is_some() || c.engine().is_none_or(|x| x == eng))
                    .flat_map(|c| c.encode(&self.ctx, eng, ppgtt))
                    .collect();
                self.submit(eng, &dws, *tail);
            }
            Op::Doorbell(e, tail) => {
                self.write32(regs::engine_base(Engine::ALL[*e]) + regs::RING_TAIL, *tail);
            }
            Op::Reset(v) => self.write32(regs::RESET_CTL, *v),
            Op::PpgttRoot(e, r) => {
                let b = regs::engine_base(Engine::ALL[*e]);
                let v = r.resolve();
                self.write32(b + regs::PPGTT_ROOT_HI, hi32(v));
                self.write32(b + regs::PPGTT_ROOT_LO, lo32(v));
            }
            Op::PpgttTree => write_tree(&mut self.w.a),
            Op::Batch(n, e, cmds, tail) => {
                let e = Engine::ALL[*e];
                for ppgtt in [false, true] {
                    let mut dws: Vec<u32> = cmds
                        .iter()
                        .filter(|c| c.engine().is_none_or(|x| x == e))
                        .flat_map(|c| c.encode(&self.ctx, e, ppgtt))
                        .collect();
                    match tail {
                        BatchTail::End => dws.extend(enc::batch_end()),
                        BatchTail::Chain(m) => {
                            dws.extend(enc::batch_start(batch_slot(&self.ctx, *m, ppgtt), false))
                        }
                        BatchTail::Call(m) => {
                            dws.extend(enc::batch_start(batch_slot(&self.ctx, *m, ppgtt), true));
                            dws.extend(enc::batch_end());
                        }
                        BatchTail::Nothing => {}
                    }
                    let bytes: Vec<u8> = dws.iter().flat_map(|d| d.to_le_bytes()).collect();
                    let at = if ppgtt {
                        TREE_DATA_OFF + (BATCH_VA_PAGE + n) * PAGE_SIZE
                    } else {
                        BATCH_OFF + n * PAGE_SIZE
                    };
                    self.w
                        .a
                        .bar2_write(at, &bytes[..bytes.len().min(usz(PAGE_SIZE))]);
                }
            }
            Op::PpgttMap(j, p) => {
                let v = p.resolve(&self.ctx.lay);
                self.w
                    .a
                    .bar2_write(TREE_OFF + 3 * PAGE_SIZE + 8 * (j % 512), &v.to_le_bytes());
            }
            Op::Tlb(v) => self.write32(regs::TLB_INVALIDATE, *v),
            Op::Bus(bar2, o, len, v) => self.bus(*bar2, o.resolve(&self.ctx), *len, v.as_ref()),
            Op::Firmware(layout, enable) => {
                let bases = [
                    (0xE000_0000u64, 0xC000_0000u64),
                    (0, 0),
                    (0xE000_0000, 0xE000_0000),
                    (0x80_0000_0000, 0x81_0000_0000),
                ];
                let (b0, b2) = bases[usize::from(*layout) % bases.len()];
                for (off, v) in [(0x10u16, b0), (0x18, b2)] {
                    self.w.a.config_write(off, &lo32(v).to_le_bytes());
                    self.w.a.config_write(off + 4, &hi32(v).to_le_bytes());
                }
                let cmd: u16 = if *enable { 0x0406 } else { 0x0400 };
                self.w.a.config_write(0x04, &cmd.to_le_bytes());
            }
            Op::Scanout => {
                let _ = display::scanout(self.w.a.shared());
            }
            Op::Run(n) => {
                run_until_idle(self.w.a.shared(), *n);
            }
        }
    }

    /// An access through the MMIO bus: the device routes it by base address and memory enable.
    fn bus(&mut self, bar2: bool, off: u64, len: usize, v: Option<&ValPick>) {
        let c = self.w.a.config_space();
        let (enabled, bar0) = (c.memory_enabled(), c.bar_address(0));
        let base = c.bar_address(if bar2 { 2 } else { 0 }).unwrap();
        let to_bar0 = enabled && bar0 == Some(base);
        match v {
            Some(v) => {
                let raw = match v {
                    ValPick::Raw(r) => *r,
                    ValPick::Pte(p) => p.resolve(&self.ctx.lay),
                };
                let data = bytes_of(raw, len);
                if to_bar0 {
                    self.m.bar0_write(off, &data);
                }
                self.w.a.mmio_write(MmioAddress(base), off, &data);
            }
            None => {
                let mut b = vec![0xA5u8; len];
                self.w.a.mmio_read(MmioAddress(base), off, &mut b);
                if to_bar0 {
                    self.m.check_bar0_read(off, &b);
                } else if !enabled {
                    assert!(b.iter().all(|&x| x == 0xFF), "memory space disabled");
                }
            }
        }
    }

    /// What a driver does before submitting: a disabled ring is set up where the reference
    /// driver puts it, a ring in the error state is re-enabled.
    fn fix_ring(&mut self, e: Engine) {
        let b = regs::engine_base(e);
        if self.read32(b + regs::RING_CTL) == 0 {
            let gm = self.ctx.lay.map.base + ring_lmem_offset(self.ctx.lay.lmem, e);
            self.write32(b + regs::RING_BASE_LO, lo32(gm));
            self.write32(b + regs::RING_BASE_HI, hi32(gm));
            self.write32(b + regs::RING_SIZE, RING_BYTES);
        } else if self.read32(b + regs::ENGINE_STATUS) & regs::ENGINE_STATUS_ERROR != 0 {
            self.write32(b + regs::RING_CTL, 0);
        } else {
            return;
        }
        self.write32(b + regs::RING_CTL, regs::RING_CTL_ENABLE);
    }

    /// Writes `dws` into engine `e`'s ring where the device says it is, then rings the doorbell
    /// with the end of the commands (or with `tail`).
    fn submit(&mut self, e: Engine, dws: &[u32], tail: Option<u32>) {
        let b = regs::engine_base(e);
        let base = u64::from(self.read32(b + regs::RING_BASE_LO))
            | u64::from(self.read32(b + regs::RING_BASE_HI)) << 32;
        let size = self.read32(b + regs::RING_SIZE);
        let cur = self.read32(b + regs::RING_TAIL);
        let usable = size.is_power_of_two() && (RING_SIZE_MIN..=RING_SIZE_MAX).contains(&size);
        if !usable || cur >= size {
            self.write32(b + regs::RING_TAIL, tail.unwrap_or(0));
            return;
        }
        let n = dws.len().min(usz(u64::from(size / 4 - 1)));
        let size = u64::from(size);
        for (i, dw) in dws[..n].iter().enumerate() {
            let off = (u64::from(cur) + 4 * i as u64) % size;
            self.cpu_write_gm(base.wrapping_add(off), &dw.to_le_bytes());
        }
        let end = u32::try_from((u64::from(cur) + 4 * n as u64) % size).unwrap();
        self.write32(b + regs::RING_TAIL, tail.unwrap_or(end));
    }

    /// A's whole GGTT equals the model's, and the fault registers agree.
    fn check_a(&self) {
        assert_eq!(self.read32(regs::ID), regs::ID_VALUE, "A still answers");
        assert_eq!(self.read32(regs::GTT_FAULT_COUNT), lo32(self.m.faults));
        let s = self.w.a.shared();
        for gm in self.ctx.lay.pages() {
            assert_eq!(
                s.ggtt.read_entry(GmAddr(gm)),
                self.m.entry(gm),
                "A's GGTT entry for GM {gm:#x}"
            );
        }
        self.read32(regs::INTR_STATUS);
        self.read(u64::from(regs::GTT_FAULT_ADDR_LO), 8);
    }
}

/// Runs `ops` on a fresh world, lets the engines finish, checks A against the model, runs
/// `then` (more checks on A), and finally checks that the neighbours and the guest RAM outside
/// the DMA map did not change.
fn fuzz(mode: GttMode, ops: &[Op], then: impl FnOnce(&mut Fuzz<'_>)) {
    let mut w = World::new(mode);
    let (s1, s2) = (snap(&w.b1), snap(&w.b2));
    let ctx = Ctx::of(&w);
    let mut f = Fuzz {
        m: Model::new(w.lay, GuestRam::mapped()),
        w: &mut w,
        ctx,
    };
    for op in ops {
        f.apply(op);
    }
    run_until_idle(f.w.a.shared(), 200);
    f.check_a();
    then(&mut f);
    check_same("B1", &s1, &snap(&w.b1));
    check_same("B2", &s2, &snap(&w.b2));
    w.guest.check_untouched();
}

/// Full reset, then a normal workload on every engine: a blit fill into local memory and a
/// fence; everything as the manual says.
fn reset_and_recover(f: &mut Fuzz<'_>) {
    f.write32(regs::RESET_CTL, regs::RESET_DEVICE);
    f.check_a();
    assert_eq!(f.m.faults, 0);
    for e in Engine::ALL {
        let b = regs::engine_base(e);
        assert_eq!(f.read32(b + regs::ENGINE_STATUS), regs::ENGINE_STATUS_IDLE);
        assert_eq!(f.read32(b + regs::RING_CTL), 0);
        assert_eq!(f.read32(b + regs::PPGTT_ROOT_LO), 0);
    }
    assert_eq!(f.read32(regs::INTR_STATUS), 0);
    assert_eq!(f.read32(regs::INTR_MASK), u32::MAX);
    assert_eq!(f.read32(regs::PLANE_FLIP_COUNT), 0);

    let dst_off = 0x4_0000;
    let fence_off = 0x3_F000;
    f.w.a.bar2_write(dst_off, &pattern(64 * 64 * 4, 9));
    let mut d = driver(&mut f.w.a);
    let dst = d.gm_of_lmem(dst_off);
    for e in Engine::ALL {
        let mut cmds = Vec::new();
        if e == Engine::Blit {
            cmds.extend(enc::color_blt(
                cmd::ROP_PATCOPY,
                cmd::BPP_32,
                dst,
                256,
                64,
                64,
                0x00C0_FFEE,
            ));
        }
        let fence = d.gm_of_lmem(fence_off + 4 * e.index() as u64);
        cmds.extend(enc::store_data_imm(fence, 0xF0 + e as u32));
        cmds.extend(enc::user_interrupt());
        d.submit(e, &cmds).unwrap();
        d.wait_idle(e, Duration::from_secs(10)).unwrap();
        assert_eq!(
            d.read32(regs::engine_base(e) + regs::LAST_FENCE),
            0xF0 + e as u32
        );
        assert_ne!(d.read32(regs::INTR_STATUS) & regs::intr_user(e), 0);
    }
    let mut px = vec![0u8; 64 * 64 * 4];
    d.lmem_read(dst_off, &mut px);
    assert!(
        px.chunks_exact(4)
            .all(|p| p == 0x00C0_FFEEu32.to_le_bytes()),
        "blit after reset filled the rectangle"
    );
    let mut fences = [0u8; 16];
    d.lmem_read(fence_off, &mut fences);
    let want: Vec<u8> = (0..4u32).flat_map(|e| (0xF0 + e).to_le_bytes()).collect();
    assert_eq!(&fences[..], &want[..]);
}

/// The configuration of the properties: `cases` cases (`MMIO_FUZZ_CASES` overrides it, for
/// longer runs), no failure files (failures found are kept as deterministic tests below).
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("MMIO_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        max_shrink_iters: 4000,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(128))]

    /// Arbitrary access sequences never panic, never change the neighbours or guest RAM outside
    /// the DMA map, and the GGTT and its fault count follow section 7.2 exactly.
    #[test]
    fn prop_access_sequences_stay_inside_the_vgpu(
        mode in gtt_mode(),
        ops in prop::collection::vec(op(), 1..200),
    ) {
        fuzz(mode, &ops, |_| {});
    }
}

proptest! {
    #![proptest_config(config(48))]

    /// After any sequence, a device reset gives a vGPU that runs a normal workload.
    #[test]
    fn prop_device_reset_after_any_sequence_recovers(
        mode in gtt_mode(),
        ops in prop::collection::vec(op(), 1..150),
    ) {
        fuzz(mode, &ops, reset_and_recover);
    }
}

// ---------------------------------------------------------------------------------------------
// DMA-map churn: the VMM maps, unmaps and replaces guest RAM while the guest keeps GGTT and PPGTT
// entries pointing there and keeps engines busy. Memory the VMM took away (or made read-only)
// must never be written by an engine again.

/// Slots of guest RAM the VMM maps and unmaps: slot `i` is `CHURN_BYTES` at `churn_gpa(i)`.
const CHURN_SLOTS: usize = 4;
const CHURN_BYTES: u64 = 32 << 10;

fn churn_gpa(slot: usize) -> u64 {
    0x2_0000_0000 + (slot as u64) * (1 << 20)
}

/// Where a GGTT or PPGTT entry of the churn test points.
#[derive(Clone, Copy, Debug)]
enum Target {
    Guest(usize, u64),
    Local(u64),
    Nothing,
}

impl Target {
    fn pte(self) -> u64 {
        match self {
            Target::Guest(slot, page) => pte_guest(
                churn_gpa(slot % CHURN_SLOTS) + page % (CHURN_BYTES / PAGE_SIZE) * PAGE_SIZE,
            ),
            Target::Local(page) => pte_local(LOCAL_DATA.base + page * PAGE_SIZE),
            Target::Nothing => 0,
        }
    }
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        6 => (0..CHURN_SLOTS, 0u64..8).prop_map(|(s, p)| Target::Guest(s, p)),
        1 => (0u64..8).prop_map(Target::Local),
        1 => Just(Target::Nothing),
    ]
}

/// Number of hidden GM pages (GGTT) and VA pages (PPGTT) the churn test maps.
const CHURN_PAGES: u64 = 8;

#[derive(Clone, Debug)]
enum ChurnOp {
    /// The VMM maps slot `i` again (writable or read-only) with the memory it had.
    Map(usize, bool),
    /// The VMM unmaps slot `i`.
    Unmap(usize),
    /// The VMM replaces slot `i` by other memory at the same guest-physical range, in one change.
    Replace(usize, bool),
    /// GGTT entry of hidden page `j`.
    Ggtt(u64, Target),
    /// Level-1 PPGTT entry of VA page `j`, then (optionally) `TLB_INVALIDATE` of the engines.
    Ppgtt(u64, Target, bool),
    /// A blit fill through the GGTT (hidden page `j`, offset, width, height); `run`: engines
    /// run right after the doorbell.
    Blit {
        at: (u64, u64),
        size: (u32, u32),
        color: u32,
        run: bool,
    },
    /// A fence write through the PPGTT (video engine).
    Fence {
        at: (u64, u64),
        value: u32,
        run: bool,
    },
    /// A `saxpy` through the PPGTT (compute engine): `n` elements from VA page `a` to page `b`.
    Saxpy {
        a: u64,
        b: u64,
        n: u32,
        run: bool,
    },
    Tlb(u32),
    Run,
}

fn churn_op() -> impl Strategy<Value = ChurnOp> {
    let slot = || 0..CHURN_SLOTS;
    let page = || 0..CHURN_PAGES;
    prop_oneof![
        2 => (slot(), prop_oneof![3 => Just(true), 1 => Just(false)]).prop_map(|(i, w)| ChurnOp::Map(i, w)),
        3 => slot().prop_map(ChurnOp::Unmap),
        2 => (slot(), prop_oneof![3 => Just(true), 1 => Just(false)]).prop_map(|(i, w)| ChurnOp::Replace(i, w)),
        4 => (page(), target()).prop_map(|(j, t)| ChurnOp::Ggtt(j, t)),
        3 => (page(), target(), prop_oneof![3 => Just(true), 1 => Just(false)])
            .prop_map(|(j, t, i)| ChurnOp::Ppgtt(j, t, i)),
        5 => ((page(), 0u64..4096), (1u32..128, 1u32..4), any::<u32>(), any::<bool>())
            .prop_map(|(at, size, color, run)| ChurnOp::Blit { at, size, color, run }),
        4 => ((page(), (0u64..1024).prop_map(|o| 4 * o)), any::<u32>(), any::<bool>())
            .prop_map(|(at, value, run)| ChurnOp::Fence { at, value, run }),
        2 => (page(), page(), 1u32..2048, any::<bool>())
            .prop_map(|(a, b, n, run)| ChurnOp::Saxpy { a, b, n, run }),
        1 => prop_oneof![Just(0x8000_000Fu32), Just(0x8000_0000), Just(0xC)].prop_map(ChurnOp::Tlb),
        3 => Just(ChurnOp::Run),
    ]
}

/// Guest memory the test created: what it must still contain (`None`: the device may write it).
struct Tracked {
    mem: Arc<MmapRegion>,
    expect: Option<Vec<u8>>,
}

struct Churn {
    a: Vgpu,
    lay: Layout,
    map: DmaMap,
    mems: Vec<Tracked>,
    /// Per slot: the memory index and writability while mapped, or the memory index it had
    /// when it was unmapped.
    mapped: [Option<(usize, bool)>; CHURN_SLOTS],
    parked: [Option<usize>; CHURN_SLOTS],
    tails: [u32; Engine::COUNT],
    seed: u32,
    _phys: PhysGpu,
}

impl Churn {
    fn new(mode: GttMode) -> Churn {
        let mut phys = phys(16);
        let mut a = vgpu(&mut phys, "mini", mode);
        let lay = Layout::of(&a);
        write_tree(&mut a);
        let root = pte_local(TREE_OFF);
        for e in [Engine::Video, Engine::Compute] {
            write32(
                &mut a,
                regs::engine_base(e) + regs::PPGTT_ROOT_HI,
                hi32(root),
            );
            write32(
                &mut a,
                regs::engine_base(e) + regs::PPGTT_ROOT_LO,
                lo32(root),
            );
        }
        let mut c = Churn {
            a,
            lay,
            map: DmaMap::new(),
            mems: Vec::new(),
            mapped: [None; CHURN_SLOTS],
            parked: [None; CHURN_SLOTS],
            tails: [0; Engine::COUNT],
            seed: 100,
            _phys: phys,
        };
        for i in 0..CHURN_SLOTS {
            let t = c.new_mem();
            c.map = c.with(i, t, true);
            c.mapped[i] = Some((t, true));
        }
        c.a.set_dma_map(c.map.clone());
        c
    }

    fn new_mem(&mut self) -> usize {
        let mem = anon(CHURN_BYTES);
        self.seed += 1;
        region_write(&mem, 0, &pattern(usz(CHURN_BYTES), self.seed));
        self.mems.push(Tracked { mem, expect: None });
        self.mems.len() - 1
    }

    fn with(&self, slot: usize, t: usize, writable: bool) -> DmaMap {
        let m = self.mems[t].mem.clone();
        self.map
            .with_region(Gpa(churn_gpa(slot)), CHURN_BYTES, m, 0, writable)
            .unwrap()
    }

    /// Fills memory the device lost with a fresh pattern and freezes it.
    fn freeze(&mut self, t: usize, refill: bool) {
        if refill {
            self.seed += 1;
            region_write(&self.mems[t].mem, 0, &pattern(usz(CHURN_BYTES), self.seed));
        }
        self.mems[t].expect = Some(region_bytes(&self.mems[t].mem));
    }

    fn check_frozen(&self) {
        for (i, t) in self.mems.iter().enumerate() {
            if let Some(x) = &t.expect {
                let now = region_bytes(&t.mem);
                if let Some(at) = now.iter().zip(x).position(|(a, b)| a != b) {
                    panic!("memory {i} was written at offset {at:#x} after the VMM took it away");
                }
            }
        }
    }

    /// Sets up a ring where needed and submits `cmds` to `e`.
    fn submit(&mut self, e: Engine, cmds: &[u32], run: bool) {
        let b = regs::engine_base(e);
        let status = read32(&self.a, u64::from(b + regs::ENGINE_STATUS));
        if read32(&self.a, u64::from(b + regs::RING_CTL)) == 0
            || status & regs::ENGINE_STATUS_ERROR != 0
        {
            let gm = self.lay.map.base + ring_lmem_offset(self.lay.lmem, e);
            write32(&mut self.a, b + regs::RING_CTL, 0);
            write32(&mut self.a, b + regs::RING_BASE_LO, lo32(gm));
            write32(&mut self.a, b + regs::RING_BASE_HI, hi32(gm));
            write32(&mut self.a, b + regs::RING_SIZE, RING_BYTES);
            write32(&mut self.a, b + regs::RING_CTL, regs::RING_CTL_ENABLE);
            self.tails[e.index()] = 0;
        }
        let size = 4 * PAGE_SIZE;
        let ring = ring_lmem_offset(self.lay.lmem, e);
        let mut tail = u64::from(self.tails[e.index()]);
        for dw in cmds {
            self.a.bar2_write(ring + tail, &dw.to_le_bytes());
            tail = (tail + 4) % size;
        }
        self.tails[e.index()] = u32::try_from(tail).unwrap();
        write32(&mut self.a, b + regs::RING_TAIL, self.tails[e.index()]);
        if run {
            self.run();
        }
    }

    fn run(&mut self) {
        run_until_idle(self.a.shared(), 100);
        self.check_frozen();
    }

    fn apply(&mut self, op: &ChurnOp) {
        match *op {
            ChurnOp::Map(i, writable) => {
                if let (None, Some(t)) = (self.mapped[i], self.parked[i]) {
                    self.map = self.with(i, t, writable);
                    self.a.set_dma_map(self.map.clone());
                    self.mapped[i] = Some((t, writable));
                    self.parked[i] = None;
                    if writable {
                        self.mems[t].expect = None;
                    } else {
                        self.freeze(t, false);
                    }
                }
            }
            ChurnOp::Unmap(i) => {
                if let Some((t, _)) = self.mapped[i] {
                    self.map = self
                        .map
                        .without_region(Gpa(churn_gpa(i)), CHURN_BYTES)
                        .unwrap();
                    self.a.set_dma_map(self.map.clone());
                    self.freeze(t, true);
                    self.mapped[i] = None;
                    self.parked[i] = Some(t);
                }
            }
            ChurnOp::Replace(i, writable) => {
                if let Some((old, _)) = self.mapped[i] {
                    let t = self.new_mem();
                    self.map = self
                        .map
                        .without_region(Gpa(churn_gpa(i)), CHURN_BYTES)
                        .unwrap();
                    self.map = self.with(i, t, writable);
                    self.a.set_dma_map(self.map.clone());
                    self.freeze(old, true);
                    if !writable {
                        self.freeze(t, false);
                    }
                    self.mapped[i] = Some((t, writable));
                }
            }
            ChurnOp::Ggtt(j, t) => {
                let gm = self.lay.hid.base + j * PAGE_SIZE;
                self.a
                    .bar0_write(GGTT_OFFSET + gm / PAGE_SIZE * 8, &t.pte().to_le_bytes());
            }
            ChurnOp::Ppgtt(j, t, invalidate) => {
                let l1 = TREE_OFF + 3 * PAGE_SIZE;
                self.a.bar2_write(l1 + 8 * j, &t.pte().to_le_bytes());
                if invalidate {
                    write32(&mut self.a, regs::TLB_INVALIDATE, 0xF);
                }
            }
            ChurnOp::Blit {
                at: (j, off),
                size: (w, h),
                color,
                run,
            } => {
                let dst = self.lay.hid.base + j * PAGE_SIZE + off;
                let c = enc::color_blt(cmd::ROP_PATCOPY, cmd::BPP_32, dst, 4 * w, w, h, color);
                self.submit(Engine::Blit, &c, run);
            }
            ChurnOp::Fence {
                at: (j, off),
                value,
                run,
            } => {
                let c = enc::store_data_imm(j * PAGE_SIZE + off, value);
                self.submit(Engine::Video, &c, run);
            }
            ChurnOp::Saxpy { a, b, n, run } => {
                let c = enc::dispatch(enc::Dispatch {
                    kernel: cmd::KERNEL_SAXPY,
                    params: [n, 0, 0],
                    scalar: 2.0,
                    buffers: [a * PAGE_SIZE, b * PAGE_SIZE, 0],
                });
                self.submit(Engine::Compute, &c, run);
            }
            ChurnOp::Tlb(v) => write32(&mut self.a, regs::TLB_INVALIDATE, v),
            ChurnOp::Run => self.run(),
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// DMA-map changes interleaved with GGTT/PPGTT writes and engine work never let an engine
    /// write memory after the VMM unmapped it, replaced it, or made it read-only.
    #[test]
    fn prop_dma_map_churn_never_writes_memory_taken_away(
        mode in gtt_mode(),
        ops in prop::collection::vec(churn_op(), 1..160),
    ) {
        let mut c = Churn::new(mode);
        for op in &ops {
            c.apply(op);
        }
        c.run();
        assert_eq!(read32(&c.a, u64::from(regs::ID)), regs::ID_VALUE);
    }
}

// ---------------------------------------------------------------------------------------------
// Deterministic tests: the documented drop and reject rules, and regressions found by the
// properties above.

const MODES: [GttMode; 2] = [GttMode::Shadow, GttMode::TwoDim];

fn ggtt_off(gm: u64) -> u64 {
    GGTT_OFFSET + gm / PAGE_SIZE * 8
}

#[test]
fn test_ggtt_unacceptable_entries_dropped_counted_and_signalled() {
    for mode in MODES {
        let mut w = World::new(mode);
        let (s1, s2) = (snap(&w.b1), snap(&w.b2));
        let lay = w.lay;
        let mut bad = vec![
            pte_local(lay.lmem),
            pte_local(lay.lmem + PAGE_SIZE),
            pte_local(2 * lay.lmem),
            pte_local(PTE_ADDR_MASK),
            pte_guest(RW_GPA - PAGE_SIZE),
            pte_guest(RW_GPA + RW_SIZE),
            pte_guest(RO_GPA - PAGE_SIZE),
            pte_guest(RO_GPA + RO_SIZE),
            pte_guest(0),
        ];
        for bit in (3..12).chain(48..64) {
            bad.push(pte_local(PAGE_SIZE) | 1 << bit);
            bad.push(pte_guest(RW_GPA) | 1 << bit);
        }
        let mut count = 0;
        // A hidden page (unmapped) and a mappable page (reset mapping), 8-byte and split writes.
        for gm in [lay.hid.base + 7 * PAGE_SIZE, lay.map.base + 3 * PAGE_SIZE] {
            for &v in &bad {
                for split in [false, true] {
                    let before = read64(&w.a, ggtt_off(gm));
                    if split {
                        w.a.bar0_write(ggtt_off(gm), &lo32(v).to_le_bytes());
                        w.a.bar0_write(ggtt_off(gm) + 4, &hi32(v).to_le_bytes());
                    } else {
                        w.a.bar0_write(ggtt_off(gm), &v.to_le_bytes());
                    }
                    count += 1;
                    assert_eq!(read64(&w.a, ggtt_off(gm)), before, "{v:#x} dropped");
                    assert_eq!(read32(&w.a, u64::from(regs::GTT_FAULT_COUNT)), count);
                    assert_eq!(read64(&w.a, u64::from(regs::GTT_FAULT_ADDR_LO)), gm);
                    let st = read32(&w.a, u64::from(regs::INTR_STATUS));
                    assert_ne!(st & regs::INTR_GTT_FAULT, 0);
                    write32(&mut w.a, regs::INTR_STATUS, regs::INTR_GTT_FAULT);
                }
            }
        }
        // Outside the partition every value is dropped, 0 included; the neighbours' entries
        // read 0 to A and do not change.
        let outside = [
            w.b1.shared().partition().mappable.end() - PAGE_SIZE,
            w.b2.shared().partition().mappable.start.raw(),
            w.b1.shared().partition().hidden.end() - PAGE_SIZE,
            w.b2.shared().partition().hidden.start.raw(),
            GM_SIZE - PAGE_SIZE,
        ];
        for gm in outside {
            for v in [0, pte_local(0), pte_guest(RW_GPA)] {
                w.a.bar0_write(ggtt_off(gm), &v.to_le_bytes());
                count += 1;
                assert_eq!(read32(&w.a, u64::from(regs::GTT_FAULT_COUNT)), count);
                assert_eq!(read64(&w.a, u64::from(regs::GTT_FAULT_ADDR_LO)), gm);
                assert_eq!(read64(&w.a, ggtt_off(gm)), 0);
            }
        }
        // Acceptable entries at the edges of A's memory are taken and not counted.
        let gm = lay.hid.base;
        for v in [
            pte_local(lay.lmem - PAGE_SIZE),
            pte_guest(RW_GPA + RW_SIZE - PAGE_SIZE),
            pte_guest(RO_GPA) | PTE_READ_ONLY,
            0x1230,
        ] {
            w.a.bar0_write(ggtt_off(gm), &v.to_le_bytes());
            assert_eq!(read64(&w.a, ggtt_off(gm)), v);
        }
        assert_eq!(read32(&w.a, u64::from(regs::GTT_FAULT_COUNT)), count);
        check_same("B1", &s1, &snap(&w.b1));
        check_same("B2", &s2, &snap(&w.b2));
        w.guest.check_untouched();
        // A full reset clears the count.
        write32(&mut w.a, regs::RESET_CTL, regs::RESET_DEVICE);
        assert_eq!(read32(&w.a, u64::from(regs::GTT_FAULT_COUNT)), 0);
    }
}

/// Sets up engine `e`'s ring afresh at the reference driver's place, writes `cmds` at its start
/// and rings the doorbell.
fn submit_fresh(a: &mut Vgpu, e: Engine, cmds: &[u32]) {
    let lay = Layout::of(a);
    let b = regs::engine_base(e);
    let off = ring_lmem_offset(lay.lmem, e);
    let gm = lay.map.base + off;
    write32(a, b + regs::RING_CTL, 0);
    write32(a, b + regs::RING_BASE_LO, lo32(gm));
    write32(a, b + regs::RING_BASE_HI, hi32(gm));
    write32(a, b + regs::RING_SIZE, RING_BYTES);
    write32(a, b + regs::RING_CTL, regs::RING_CTL_ENABLE);
    let bytes: Vec<u8> = cmds.iter().flat_map(|d| d.to_le_bytes()).collect();
    a.bar2_write(off, &bytes);
    write32(a, b + regs::RING_TAIL, u32::try_from(bytes.len()).unwrap());
}

#[test]
fn test_commands_resolving_outside_the_partition_rejected() {
    for mode in MODES {
        let mut w = World::new(mode);
        let (s1, s2) = (snap(&w.b1), snap(&w.b2));
        let lay = w.lay;
        let (n1, n2) = (Layout::of(&w.b1), Layout::of(&w.b2));
        let own = lay.map.base + 0x50_0000;
        let fence = lay.map.base + 0x3_0000;
        let copy = |dst: u64, src: u64| {
            enc::src_copy_blt(enc::Copy {
                rop: cmd::ROP_SRCCOPY,
                bpp: cmd::BPP_32,
                dst,
                dst_pitch: 256,
                src,
                src_pitch: 256,
                width: 64,
                height: 4,
                pattern: 0,
            })
            .to_vec()
        };
        let saxpy = |a: u64, b: u64| {
            enc::dispatch(enc::Dispatch {
                kernel: cmd::KERNEL_SAXPY,
                params: [64, 0, 0],
                scalar: 1.0,
                buffers: [a, b, 0],
            })
            .to_vec()
        };
        let csc = |src: u64, dst: u64| {
            enc::csc_scale(enc::Csc {
                src,
                src_pitch: 64,
                src_size: (64, 16),
                dst,
                dst_pitch: 256,
                dst_size: (64, 16),
                mode: cmd::CSC_NV12_TO_XRGB,
            })
            .to_vec()
        };
        let blt = |dst: u64, h: u32| {
            enc::color_blt(cmd::ROP_PATCOPY, cmd::BPP_32, dst, 256, 64, h, 7).to_vec()
        };
        // (engine, the offending command, whether ERROR_HEADER is its header)
        let cases: Vec<(Engine, Vec<u32>, bool)> = vec![
            (
                Engine::Blit,
                enc::store_data_imm(n1.map.end() - 4, 1).to_vec(),
                true,
            ),
            (
                Engine::Blit,
                enc::store_data_imm(n2.map.base, 1).to_vec(),
                true,
            ),
            (
                Engine::Render,
                enc::store_data_imm(n2.hid.base, 1).to_vec(),
                true,
            ),
            (
                Engine::Video,
                enc::store_data_imm(GM_SIZE, 1).to_vec(),
                true,
            ),
            (
                Engine::Video,
                enc::store_data_imm(u64::MAX - 3, 1).to_vec(),
                true,
            ),
            // The rectangle's last row crosses the end of A's mappable range into B2's.
            (Engine::Blit, blt(lay.map.end() - 3 * 256 - 64, 4), true),
            // An unmapped page of A's own hidden range.
            (Engine::Blit, blt(lay.hid.base + 0x40_0000, 1), true),
            (Engine::Blit, copy(own, n1.hid.base), true),
            (Engine::Blit, copy(n2.map.base, own), true),
            (Engine::Compute, saxpy(own, n2.hid.base + 0x1000), true),
            (Engine::Compute, saxpy(n1.map.end() - 64, own), true),
            (Engine::Video, csc(n1.map.base, own), true),
            (Engine::Video, csc(own, lay.hid.end() - 0x100), true),
            (
                Engine::Compute,
                enc::store_register_mem(regs::SCRATCH0, n1.hid.base).to_vec(),
                true,
            ),
            (
                Engine::Compute,
                enc::semaphore_wait(n2.map.base, 0, true).to_vec(),
                true,
            ),
            // The batch cannot be read: header 0 and the address that did not translate.
            (
                Engine::Render,
                enc::batch_start(n2.map.base, false).to_vec(),
                false,
            ),
            (
                Engine::Render,
                enc::batch_start(lay.hid.base, false).to_vec(),
                false,
            ),
        ];
        for (i, (e, bad, with_header)) in cases.iter().enumerate() {
            let value = 0x1000 + u32::try_from(i).unwrap();
            let mut cmds = enc::store_data_imm(fence, value).to_vec();
            cmds.extend(bad);
            cmds.extend(enc::user_interrupt());
            submit_fresh(&mut w.a, *e, &cmds);
            run_until_idle(w.a.shared(), 100);
            let b = u64::from(regs::engine_base(*e));
            let what = format!("{mode:?} case {i}: {bad:x?}");
            assert_eq!(
                read32(&w.a, b + u64::from(regs::ERROR_CODE)),
                AuditReason::AddressOutOfRange as u32,
                "{what}"
            );
            if *with_header {
                assert_eq!(
                    read32(&w.a, b + u64::from(regs::ERROR_HEADER)),
                    bad[0],
                    "{what}"
                );
            }
            let status = read32(&w.a, b + u64::from(regs::ENGINE_STATUS));
            assert_ne!(status & regs::ENGINE_STATUS_ERROR, 0, "{what}");
            assert_ne!(
                read32(&w.a, u64::from(regs::INTR_STATUS)) & regs::intr_error(*e),
                0
            );
            let mut got = [0u8; 4];
            w.a.bar2_read(fence - lay.map.base, &mut got);
            assert_ne!(u32::from_le_bytes(got), value, "{what}: nothing of it ran");
        }
        // With a PPGTT: a VA with bits 63..48 set, and a leaf pointing outside A's memory
        // (a local offset past its local memory, planted in the table behind the device's back).
        write_tree(&mut w.a);
        w.a.bar2_write(
            TREE_OFF + 3 * PAGE_SIZE + 8 * 30,
            &pte_local(lay.lmem).to_le_bytes(),
        );
        let root = pte_local(TREE_OFF);
        let b = regs::engine_base(Engine::Compute);
        write32(&mut w.a, b + regs::PPGTT_ROOT_HI, hi32(root));
        write32(&mut w.a, b + regs::PPGTT_ROOT_LO, lo32(root));
        for va in [1u64 << 48, 30 * PAGE_SIZE, TREE_PAGES * PAGE_SIZE] {
            let bad = enc::store_data_imm(va, 1);
            submit_fresh(&mut w.a, Engine::Compute, &bad);
            run_until_idle(w.a.shared(), 100);
            let code = read32(&w.a, u64::from(b + regs::ERROR_CODE));
            assert_eq!(code, AuditReason::AddressOutOfRange as u32, "VA {va:#x}");
        }
        check_same("B1", &s1, &snap(&w.b1));
        check_same("B2", &s2, &snap(&w.b2));
        w.guest.check_untouched();
    }
}

/// Regression: an 8-byte register access is only valid at the `_LO` offset of a pair (section
/// 1). The device used to treat every 8-aligned offset as a pair, so an 8-byte write at
/// `RESET_CTL` reset the vGPU and one at `RING_SIZE` enabled the ring.
#[test]
fn test_regression_8_byte_register_access_outside_pairs_is_bad() {
    let mut phys = phys(16);
    let mut a = vgpu(&mut phys, "mini", GttMode::Shadow);
    let lay = Layout::of(&a);
    let mut q = [0u8; 8];
    for off in [0x1240u64, 0x0, 0x10, 0x20, 0x1108, 0x2000, 0x1040] {
        a.bar0_read(off, &mut q);
        assert_eq!(q, [0xFF; 8], "8-byte read at {off:#x}");
    }
    write32(&mut a, regs::SCRATCH0, 5);
    let gm = lay.hid.base;
    a.bar0_write(ggtt_off(gm), &pte_local(0).to_le_bytes());
    a.bar0_write(u64::from(regs::RESET_CTL), &1u64.to_le_bytes());
    assert_eq!(read32(&a, u64::from(regs::SCRATCH0)), 5, "no reset");
    assert_eq!(read64(&a, ggtt_off(gm)), pte_local(0), "no reset");
    let blit = u64::from(regs::engine_base(Engine::Blit));
    write32(
        &mut a,
        regs::engine_base(Engine::Blit) + regs::RING_BASE_LO,
        lo32(lay.map.base),
    );
    a.bar0_write(
        blit + u64::from(regs::RING_SIZE),
        &(1u64 << 32 | 4096).to_le_bytes(),
    );
    assert_eq!(
        read32(&a, blit + u64::from(regs::RING_CTL)),
        0,
        "ring not enabled"
    );
    assert_eq!(read32(&a, blit + u64::from(regs::RING_SIZE)), 0);
    // The pairs themselves work.
    assert_eq!(read64(&a, u64::from(regs::PV_LMEM_SIZE)), lay.lmem);
    a.bar0_write(
        blit + u64::from(regs::RING_BASE_LO),
        &0x1_2345_6000u64.to_le_bytes(),
    );
    assert_eq!(
        read64(&a, blit + u64::from(regs::RING_BASE_LO)),
        0x1_2345_6000
    );
    a.bar0_write(
        u64::from(regs::PLANE_SURF_LO),
        &0x2_0000_1000u64.to_le_bytes(),
    );
    assert_eq!(read32(&a, u64::from(regs::PLANE_FLIP_COUNT)), 1);
}

/// Regression: in shadow mode a submission queued with a PPGTT kept the shadow it was scanned
/// with, so after the VMM replaced (or unmapped) the guest RAM it pointed at, the engine still
/// wrote the old memory.
#[test]
fn test_regression_queued_ppgtt_work_does_not_write_memory_taken_away() {
    // (mode, what the VMM does, the error the saxpy ends with: none when the range is still
    // mapped, to the new memory; a fault when it is gone).
    let unmapped = AuditReason::AddressOutOfRange as u32;
    for (mode, vmm, want) in [
        (GttMode::Shadow, ChurnOp::Replace(2, true), 0),
        (GttMode::Shadow, ChurnOp::Unmap(2), unmapped),
        (GttMode::TwoDim, ChurnOp::Replace(2, true), 0),
        (GttMode::TwoDim, ChurnOp::Unmap(2), unmapped),
    ] {
        let mut c = Churn::new(mode);
        for op in [
            ChurnOp::Ppgtt(1, Target::Guest(2, 0), true),
            ChurnOp::Saxpy {
                a: 3,
                b: 0,
                n: 1112,
                run: false,
            },
            vmm,
            ChurnOp::Run,
        ] {
            c.apply(&op);
        }
        let e = u64::from(regs::engine_base(Engine::Compute));
        let code = read32(&c.a, e + u64::from(regs::ERROR_CODE));
        assert_eq!(code, want, "{mode:?}");
    }
}

/// Regression: in shadow mode a GGTT entry kept its shadow when the VMM replaced the memory
/// behind its guest-physical range (same range, other host memory or read-only) in one map
/// change, so blits wrote the old memory or wrote through a read-only mapping. Now the shadow
/// follows the new map, as two-dim translation does.
#[test]
fn test_regression_ggtt_shadow_follows_dma_remap_of_same_range() {
    for mode in MODES {
        for writable in [true, false] {
            let mut c = Churn::new(mode);
            for op in [
                ChurnOp::Ggtt(0, Target::Guest(0, 0)),
                ChurnOp::Replace(0, writable),
                ChurnOp::Blit {
                    at: (0, 0x100),
                    size: (16, 2),
                    color: 0xDEAD_BEEF,
                    run: true,
                },
            ] {
                c.apply(&op);
            }
            let e = u64::from(regs::engine_base(Engine::Blit));
            let code = read32(&c.a, e + u64::from(regs::ERROR_CODE));
            if writable {
                // Both modes follow the new map: two-dim translates through it, shadow mode
                // rebuilds the entry's shadow when the map changes. The blit lands in the new
                // memory.
                assert_eq!(code, 0, "{mode:?}");
            } else {
                assert_ne!(
                    code, 0,
                    "{mode:?}: the write through a read-only mapping faulted"
                );
            }
        }
    }
}
