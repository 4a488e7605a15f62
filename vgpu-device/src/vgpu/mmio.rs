//! BAR0 and BAR2 accesses: the register file (by policy), the MSI-X pages, the GGTT window and
//! the aperture; and `vm_device::MutDeviceMmio` for in-process embedding.

use vgpu_abi::cmd::AuditReason;
use vgpu_abi::pci::{GGTT_OFFSET, GGTT_SIZE, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, REGS_SIZE};
use vgpu_abi::regs::{self, RING_CTL_ENABLE, RING_SIZE_MAX, RING_SIZE_MIN};
use vgpu_abi::{Engine, PAGE_SIZE};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;

use crate::addr::{lo32, GmAddr, GmRange, LmemOffset};
use crate::audit::Violation;
use crate::engine::context::ResetKind;
use crate::engine::scanner::{self, RingWindow};
use crate::vgpu::policy::{policy, Policy};
use crate::vgpu::Vgpu;

const MSIX_PAGE: u64 = 0x1000;

fn le_u32(data: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(data.try_into().ok()?))
}

fn le_u64(data: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(data.try_into().ok()?))
}

impl Vgpu {
    /// Reads BAR0 at `offset`. Bad accesses read all-ones.
    pub fn bar0_read(&self, offset: u64, data: &mut [u8]) {
        let len = data.len() as u64;
        if offset < REGS_SIZE {
            match (len, offset % len.max(1)) {
                (4, 0) => {
                    let v = self.reg_read(lo32(offset));
                    data.copy_from_slice(&v.to_le_bytes());
                }
                (8, 0) if is_pair_lo(lo32(offset)) => {
                    let lo = self.reg_read(lo32(offset));
                    let hi = self.reg_read(lo32(offset) + 4);
                    data.copy_from_slice(&(u64::from(hi) << 32 | u64::from(lo)).to_le_bytes());
                }
                _ => self.bad_read(data),
            }
        } else if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + MSIX_PAGE).contains(&offset) {
            self.shared
                .intr
                .with_msix(|m, _, _| m.table_read(offset - MSIX_TABLE_OFFSET, data));
        } else if (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + MSIX_PAGE).contains(&offset) {
            self.shared
                .intr
                .with_msix(|m, _, _| m.pba_read(offset - MSIX_PBA_OFFSET, data));
        } else if (GGTT_OFFSET..GGTT_OFFSET + GGTT_SIZE).contains(&offset) {
            let rel = offset - GGTT_OFFSET;
            let entry = self.shared.ggtt.read_entry(GmAddr(rel / 8 * PAGE_SIZE));
            match (len, rel % 8) {
                (8, 0) => data.copy_from_slice(&entry.to_le_bytes()),
                (4, 0) => data.copy_from_slice(&lo32(entry).to_le_bytes()),
                (4, 4) => data.copy_from_slice(&crate::addr::hi32(entry).to_le_bytes()),
                _ => self.bad_read(data),
            }
        } else {
            self.bad_read(data);
        }
    }

    /// Writes BAR0 at `offset`. Bad accesses are dropped and counted.
    pub fn bar0_write(&mut self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        if offset < REGS_SIZE {
            match (len, offset % len.max(1)) {
                (4, 0) => {
                    if let Some(v) = le_u32(data) {
                        self.reg_write(lo32(offset), v);
                    }
                }
                (8, 0) if is_pair_lo(lo32(offset)) => {
                    if let Some(v) = le_u64(data) {
                        // High half first, so a 64-bit write of PLANE_SURF flips once, with the
                        // new address.
                        self.reg_write(lo32(offset) + 4, crate::addr::hi32(v));
                        self.reg_write(lo32(offset), lo32(v));
                    }
                }
                _ => self.shared.count_bad_access(),
            }
        } else if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + MSIX_PAGE).contains(&offset) {
            self.shared.intr.with_msix(|m, c, sink| {
                m.table_write(
                    offset - MSIX_TABLE_OFFSET,
                    data,
                    c.enabled,
                    c.function_masked,
                    sink,
                )
            });
        } else if (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + MSIX_PAGE).contains(&offset) {
            self.shared
                .intr
                .with_msix(|m, _, _| m.pba_write(offset - MSIX_PBA_OFFSET, data));
        } else if (GGTT_OFFSET..GGTT_OFFSET + GGTT_SIZE).contains(&offset) {
            self.ggtt_write(offset - GGTT_OFFSET, data);
        } else {
            self.shared.count_bad_access();
        }
    }

    fn bad_read(&self, data: &mut [u8]) {
        data.fill(0xFF);
        self.shared.count_bad_access();
    }

    fn ggtt_write(&mut self, rel: u64, data: &[u8]) {
        let gm = GmAddr(rel / 8 * PAGE_SIZE);
        let s = &self.shared;
        let dma = s.dma();
        let res = match (data.len(), rel % 8) {
            (8, 0) => le_u64(data).map(|v| s.ggtt.write_entry(gm, v, s.lmem(), &dma)),
            (4, off @ (0 | 4)) => {
                le_u32(data).map(|v| s.ggtt.write_half(gm, off == 4, v, s.lmem(), &dma))
            }
            _ => None,
        };
        match res {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                if s.ggtt.fault_count().is_power_of_two() {
                    tracing::warn!(vgpu = s.id(), error = %e, faults = s.ggtt.fault_count(), "GGTT write dropped");
                }
                s.intr.raise(regs::INTR_GTT_FAULT);
            }
            None => s.count_bad_access(),
        }
    }

    /// Reads a register dword at `offset` (dword aligned, inside the register file).
    fn reg_read(&self, offset: u32) -> u32 {
        let s = &self.shared;
        match policy(offset) {
            Policy::Ignored => {
                s.count_bad_access();
                u32::MAX
            }
            Policy::PassThrough => s.vreg(offset),
            Policy::ReadOnly | Policy::Trap => {
                if let Some((e, rel)) = engine_reg(offset) {
                    let ctx = s.engine(e);
                    return match rel {
                        regs::RING_HEAD => ctx.head(),
                        regs::ACTHD_LO => lo32(ctx.acthd()),
                        regs::ACTHD_HI => crate::addr::hi32(ctx.acthd()),
                        regs::LAST_FENCE => ctx.last_fence(),
                        regs::ENGINE_STATUS => ctx.status(),
                        regs::ERROR_CODE => ctx.error().0,
                        regs::ERROR_HEADER => ctx.error().1,
                        regs::ERROR_ADDR_LO => lo32(ctx.error().2),
                        regs::ERROR_ADDR_HI => crate::addr::hi32(ctx.error().2),
                        regs::RING_CTL => u32::from(ctx.ring_enabled()),
                        _ => s.vreg(offset),
                    };
                }
                match offset {
                    regs::RESET_CTL | regs::TLB_INVALIDATE => 0,
                    regs::INTR_STATUS => s.intr.status(),
                    regs::INTR_MASK => s.intr.mask(),
                    regs::INTR_PENDING => s.intr.status() & !s.intr.mask(),
                    regs::GTT_FAULT_COUNT => lo32(s.ggtt.fault_count()),
                    regs::GTT_FAULT_ADDR_LO => lo32(s.ggtt.last_fault().raw()),
                    regs::GTT_FAULT_ADDR_HI => crate::addr::hi32(s.ggtt.last_fault().raw()),
                    regs::PLANE_FLIP_COUNT => s.flip_count(),
                    _ => s.vreg(offset),
                }
            }
        }
    }

    /// Writes a register dword at `offset` (dword aligned, inside the register file).
    fn reg_write(&mut self, offset: u32, v: u32) {
        let s = &self.shared;
        match policy(offset) {
            Policy::Ignored | Policy::ReadOnly => s.count_bad_access(),
            Policy::PassThrough => s.set_vreg(offset, v),
            Policy::Trap => {
                if let Some((e, rel)) = engine_reg(offset) {
                    self.engine_reg_write(e, rel, offset, v);
                    return;
                }
                match offset {
                    regs::RESET_CTL => self.reset_ctl(v),
                    regs::INTR_STATUS => s.intr.clear(v),
                    regs::INTR_MASK => s.intr.set_mask(v),
                    regs::TLB_INVALIDATE => {
                        for e in Engine::ALL {
                            if v & e.mask_bit() != 0 {
                                s.engine(e).invalidate_ppgtt();
                            }
                        }
                        if v & regs::TLB_INVALIDATE_GGTT != 0 {
                            s.ggtt.bump_generation();
                        }
                    }
                    regs::PLANE_SURF_LO => {
                        s.set_vreg(offset, v);
                        s.flip();
                    }
                    _ => s.set_vreg(offset, v),
                }
            }
        }
    }

    fn reset_ctl(&mut self, v: u32) {
        if v & regs::RESET_DEVICE != 0 {
            self.reset_device();
            return;
        }
        for e in Engine::ALL {
            if v & regs::reset_engine(e) != 0 {
                self.shared.engine(e).reset(ResetKind::Engine);
                self.shared
                    .set_vreg(regs::engine_base(e) + regs::RING_TAIL, 0);
            }
        }
    }

    fn engine_reg_write(&mut self, e: Engine, rel: u32, offset: u32, v: u32) {
        let s = &self.shared;
        let ctx = s.engine(e);
        if !s.has_engine(e) {
            // The profile has no such engine: its block is inert.
            s.count_bad_access();
            return;
        }
        match rel {
            regs::RING_BASE_LO | regs::RING_BASE_HI | regs::RING_SIZE => {
                if ctx.ring_enabled() {
                    s.count_bad_access();
                } else {
                    s.set_vreg(offset, v);
                }
            }
            regs::RING_CTL => {
                let want = v & RING_CTL_ENABLE != 0;
                if want && !ctx.ring_enabled() {
                    self.enable_ring(e);
                } else if !want && ctx.ring_enabled() {
                    ctx.set_ring_enabled(false);
                    ctx.drop_queued();
                }
            }
            regs::RING_TAIL => self.doorbell(e, v),
            regs::PPGTT_ROOT_LO | regs::PPGTT_ROOT_HI => {
                s.set_vreg(offset, v);
                ctx.invalidate_ppgtt();
            }
            _ => s.set_vreg(offset, v),
        }
    }

    fn ring_regs(&self, e: Engine) -> (u64, u32) {
        let b = regs::engine_base(e);
        let base = u64::from(self.shared.vreg(b + regs::RING_BASE_HI)) << 32
            | u64::from(self.shared.vreg(b + regs::RING_BASE_LO));
        (base, self.shared.vreg(b + regs::RING_SIZE))
    }

    fn enable_ring(&mut self, e: Engine) {
        let s = &self.shared;
        let (base, size) = self.ring_regs(e);
        let size_ok = size.is_power_of_two() && (RING_SIZE_MIN..=RING_SIZE_MAX).contains(&size);
        let inside = |r: GmRange| {
            r.contains(GmAddr(base))
                && base
                    .checked_add(u64::from(size))
                    .is_some_and(|end| end <= r.end())
        };
        let ggtt = &s.ggtt;
        if size_ok && base % PAGE_SIZE == 0 && (inside(ggtt.mappable()) || inside(ggtt.hidden())) {
            let ctx = s.engine(e);
            ctx.clear_error();
            ctx.set_ring_enabled(true);
            s.set_vreg(regs::engine_base(e) + regs::RING_TAIL, 0);
        } else {
            let v = Violation {
                addr: base,
                header: 0,
                reason: AuditReason::BadRing,
                detail: format!("ring enable with base {base:#x} size {size:#x}"),
            };
            s.fail_context(e, &v, false);
        }
    }

    fn doorbell(&mut self, e: Engine, tail: u32) {
        let s = &self.shared;
        let ctx = s.engine(e);
        if !ctx.ring_enabled() || ctx.in_error() {
            return;
        }
        let (base, size) = self.ring_regs(e);
        if !tail.is_multiple_of(4) || tail >= size {
            let v = Violation {
                addr: u64::from(tail),
                header: 0,
                reason: AuditReason::BadRing,
                detail: format!("RING_TAIL {tail:#x} for a ring of {size:#x} bytes"),
            };
            s.fail_context(e, &v, false);
            return;
        }
        s.set_vreg(regs::engine_base(e) + regs::RING_TAIL, tail);
        let start = ctx.submitted();
        if start == tail {
            return;
        }
        let b = regs::engine_base(e);
        let root = u64::from(s.vreg(b + regs::PPGTT_ROOT_HI)) << 32
            | u64::from(s.vreg(b + regs::PPGTT_ROOT_LO));
        let window = RingWindow {
            base: GmAddr(base),
            size,
            start,
            end: tail,
        };
        match scanner::scan(s, e, window, root) {
            Ok(sub) => {
                ctx.set_submitted(tail);
                ctx.push(sub);
                s.notify(e);
            }
            Err(v) => s.fail_context(e, &v, false),
        }
    }

    /// Reads the aperture (BAR2) at `offset`, for transports that do not map it. Out-of-range
    /// reads return all-ones.
    pub fn bar2_read(&self, offset: u64, data: &mut [u8]) {
        if self.shared.lmem().read(LmemOffset(offset), data).is_err() {
            self.bad_read(data);
        }
    }

    /// Writes the aperture (BAR2) at `offset`. Out-of-range writes are dropped.
    pub fn bar2_write(&mut self, offset: u64, data: &[u8]) {
        if self.shared.lmem().write(LmemOffset(offset), data).is_err() {
            self.shared.count_bad_access();
        }
    }
}

/// Whether `offset` is the `_LO` half of a 64-bit register pair: the only register offsets where
/// an aligned 8-byte access reads or writes both halves (section 1 of the manual; an 8-byte
/// access anywhere else in the register file is a bad access).
fn is_pair_lo(offset: u32) -> bool {
    regs::lookup(offset).is_some_and(|(info, _)| info.name.ends_with("_LO"))
}

/// The engine and block-relative offset of an engine-block register.
fn engine_reg(offset: u32) -> Option<(Engine, u32)> {
    let block = offset.checked_sub(0x1000)? / regs::ENGINE_BLOCK_SIZE;
    let e = Engine::from_index(block as usize)?;
    Some((e, offset - regs::engine_base(e)))
}

/// In-process embedding: the VMM registers the vGPU's BAR0 and BAR2 ranges on its MMIO bus and
/// calls in with the range base. Accesses while memory decoding is disabled, or at a base that
/// is not a BAR of this device, are dropped (reads return all-ones).
impl MutDeviceMmio for Vgpu {
    fn mmio_read(&mut self, base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        let c = self.config_space();
        if !c.memory_enabled() {
            data.fill(0xFF);
        } else if c.bar_address(0) == Some(base.0) {
            self.bar0_read(offset, data);
        } else if c.bar_address(2) == Some(base.0) {
            self.bar2_read(offset, data);
        } else {
            data.fill(0xFF);
            self.shared.count_bad_access();
        }
    }

    fn mmio_write(&mut self, base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        let c = self.config_space();
        if !c.memory_enabled() {
            self.shared.count_bad_access();
        } else if c.bar_address(0) == Some(base.0) {
            self.bar0_write(offset, data);
        } else if c.bar_address(2) == Some(base.0) {
            self.bar2_write(offset, data);
        } else {
            self.shared.count_bad_access();
        }
    }
}
