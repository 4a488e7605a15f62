//! The command scanner (XenGT / GVT-g `cmd_parser`): every ring submission and every batch
//! buffer it reaches is parsed at the doorbell, before anything executes. Each command is
//! decoded, checked against the engine, the register whitelist and the vGPU's address space
//! (every byte range it will touch must translate), and copied into a [`Submission`]: the engine
//! later executes the copy, so guest changes after the doorbell cannot smuggle in unchecked
//! commands. A violation rejects the whole submission with a [`Violation`].

use std::collections::HashSet;
use std::sync::Arc;

use vgpu_abi::cmd::{self, AuditReason, Client, Header};
use vgpu_abi::gtt::{PTE_READ_ONLY, PTE_VALID};
use vgpu_abi::regs;
use vgpu_abi::Engine;

use crate::addr::{GmAddr, GpuVa};
use crate::audit::Violation;
use crate::engine::context::{CmdKind, Command, Mi, Submission};
use crate::engine::ops::{self, Op, Surface};
use crate::engine::translate::{ContextTranslate, GgttTranslate, PpgttShadow, Tlb};
use crate::mem::{Access, Fault, FaultKind, Mem};
use crate::vgpu::ggtt::{translate_pte, GttMode};
use crate::vgpu::shared::VgpuShared;

/// The part of a ring one doorbell submits.
#[derive(Clone, Copy, Debug)]
pub struct RingWindow {
    /// GM address of the ring.
    pub base: GmAddr,
    /// Ring size in bytes (validated at enable).
    pub size: u32,
    /// Offset where the submission starts.
    pub start: u32,
    /// Offset where it ends (the new tail).
    pub end: u32,
}

/// Whether `reg` may be loaded by `MI_LOAD_REGISTER_IMM` on `engine`.
pub fn lri_allowed(engine: Engine, reg: u32) -> bool {
    let base = regs::engine_base(engine);
    matches!(
        reg,
        regs::SCRATCH0 | regs::SCRATCH1 | regs::PLANE_SURF_LO | regs::PLANE_SURF_HI
    ) || (reg >= base + regs::gpr(0)
        && reg < base + regs::gpr(regs::GPR_COUNT)
        && reg.is_multiple_of(4))
}

/// Whether `reg` may be stored by `MI_STORE_REGISTER_MEM` on `engine`.
pub fn srm_allowed(engine: Engine, reg: u32) -> bool {
    let base = regs::engine_base(engine);
    lri_allowed(engine, reg) || reg == base + regs::RING_HEAD || reg == base + regs::LAST_FENCE
}

fn violation(addr: u64, header: u32, reason: AuditReason, detail: impl Into<String>) -> Violation {
    Violation {
        addr,
        header,
        reason,
        detail: detail.into(),
    }
}

fn fault_violation(addr: u64, header: u32, f: Fault) -> Violation {
    let reason = match f.kind {
        FaultKind::ReadOnly => AuditReason::ReadOnlyWrite,
        _ => AuditReason::AddressOutOfRange,
    };
    violation(addr, header, reason, format!("{f}"))
}

/// Where the scanner is reading commands from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    Ring,
    First,
    Second,
}

struct Scan<'m, 'a> {
    engine: Engine,
    mem: Mem<'m>,
    cmds: Vec<Command>,
    batches: HashSet<u64>,
    surface: Option<Surface>,
    _marker: std::marker::PhantomData<&'a ()>,
}

impl Scan<'_, '_> {
    /// Checks one command whose dwords are `dws` (header first) at `addr`: decodes it, checks
    /// that it is allowed at this level, and that every byte range it touches translates.
    fn command(&mut self, level: Level, addr: u64, dws: &[u32]) -> Result<Flow, Violation> {
        let hdr = dws[0];
        let v = |reason, detail: &str| violation(addr, hdr, reason, detail);
        match decode(self.engine, dws).map_err(|(r, d)| v(r, &d))? {
            Decoded::Noop => Ok(Flow::Next),
            Decoded::End if level == Level::Ring => {
                Err(v(AuditReason::BadParameter, "batch end in the ring"))
            }
            Decoded::End => Ok(Flow::End),
            Decoded::Batch { target, second } => match (level, second) {
                (Level::Ring, true) => Err(v(
                    AuditReason::BadParameter,
                    "second-level batch from the ring",
                )),
                (Level::Ring, false) => Ok(Flow::Call(target, Level::First)),
                (Level::First, true) => Ok(Flow::Call(target, Level::Second)),
                (Level::First, false) => Ok(Flow::Chain(target)),
                (Level::Second, _) => Err(v(
                    AuditReason::BatchNesting,
                    "batch start in a second-level batch",
                )),
            },
            Decoded::Exec(kind) => {
                match &kind {
                    CmdKind::Op(op) => {
                        let extents = op
                            .footprint(self.surface.as_ref())
                            .map_err(|e| v(e.audit_reason(), &e.to_string()))?;
                        for x in extents {
                            self.check(x.va, x.len, x.access, addr, hdr)?;
                        }
                        if let Op::SurfaceState(s) = op {
                            self.surface = Some(*s);
                        }
                    }
                    CmdKind::Mi(Mi::StoreDataImm { addr: a, .. })
                    | CmdKind::Mi(Mi::StoreRegisterMem { addr: a, .. }) => {
                        self.check(*a, 4, Access::Write, addr, hdr)?;
                    }
                    CmdKind::Mi(Mi::SemaphoreWait { addr: a, .. }) => {
                        self.check(*a, 4, Access::Read, addr, hdr)?;
                    }
                    CmdKind::Mi(Mi::UserInterrupt | Mi::LoadRegisterImm(_)) => {}
                }
                self.cmds.push(Command {
                    kind,
                    addr: GpuVa(addr),
                    header: hdr,
                    head_after: None,
                    raw: dws.to_vec(),
                });
                Ok(Flow::Next)
            }
        }
    }

    fn check(
        &mut self,
        va: GpuVa,
        len: u64,
        access: Access,
        addr: u64,
        hdr: u32,
    ) -> Result<(), Violation> {
        self.mem
            .spans(va, len, access, |_, _| {})
            .map_err(|f| fault_violation(addr, hdr, f))
    }

    /// Scans a batch buffer starting at `start` (and whatever it chains to). `from` is the
    /// address and header of the `MI_BATCH_BUFFER_START` that reached it, which a loop or too
    /// many batches are reported at.
    fn batch(
        &mut self,
        mut start: GpuVa,
        level: Level,
        mut from: (u64, u32),
    ) -> Result<(), Violation> {
        loop {
            if !self.batches.insert(start.raw()) {
                return Err(violation(
                    from.0,
                    from.1,
                    AuditReason::BatchLoop,
                    format!("batch {start} reached twice"),
                ));
            }
            if self.batches.len() > cmd::MAX_BATCHES_PER_SUBMISSION as usize {
                return Err(violation(
                    from.0,
                    from.1,
                    AuditReason::BatchTooLong,
                    "too many batch buffers",
                ));
            }
            let limit = start.raw().checked_add(u64::from(cmd::MAX_BATCH_BYTES));
            let mut pos = start.raw();
            let next = loop {
                if limit.is_none_or(|l| pos >= l) {
                    return Err(violation(
                        start.raw(),
                        0,
                        AuditReason::BatchTooLong,
                        "no batch end within the limit",
                    ));
                }
                let hdr = self
                    .mem
                    .read_u32(GpuVa(pos))
                    .map_err(|f| fault_violation(pos, 0, f))?;
                let len = Header::parse(hdr).len;
                let bytes = 4 * (u64::from(len) + 1);
                let end = pos
                    .checked_add(bytes)
                    .filter(|e| limit.is_some_and(|l| *e <= l));
                let Some(end) = end else {
                    return Err(violation(
                        pos,
                        hdr,
                        AuditReason::BadLength,
                        "command runs past the batch limit",
                    ));
                };
                let mut dws = vec![0u32; len as usize + 1];
                let mut bytes_buf = vec![0u8; dws.len() * 4];
                // Dwords that cannot be read: header 0 and the address that did not translate
                // (section 8.9).
                self.mem
                    .read(GpuVa(pos), &mut bytes_buf)
                    .map_err(|f| fault_violation(f.va.raw().max(pos), 0, f))?;
                for (d, b) in dws.iter_mut().zip(bytes_buf.chunks_exact(4)) {
                    *d = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
                match self.command(level, pos, &dws)? {
                    Flow::Next => pos = end,
                    Flow::End => break None,
                    Flow::Call(target, lvl) => {
                        self.batch(target, lvl, (pos, hdr))?;
                        pos = end;
                    }
                    Flow::Chain(target) => break Some((target, pos, hdr)),
                }
            };
            match next {
                None => return Ok(()),
                Some((target, pos, hdr)) => {
                    // The chaining BBS is the one that reaches the next batch.
                    from = (pos, hdr);
                    start = target;
                }
            }
        }
    }
}

/// A command decoded and checked on its own, without touching memory.
#[derive(Debug)]
pub enum Decoded {
    /// Something the engine executes.
    Exec(CmdKind),
    /// `MI_NOOP`.
    Noop,
    /// `MI_BATCH_BUFFER_END`.
    End,
    /// `MI_BATCH_BUFFER_START`.
    Batch {
        /// The batch address.
        target: GpuVa,
        /// `BBS_SECOND_LEVEL`.
        second: bool,
    },
}

/// Decodes one command (`dws`: header and payload) for `engine`: client, opcode, length,
/// parameters, the register whitelists and address alignment. Memory is not touched: the
/// scanner checks addresses afterwards, and restored submissions are checked again on use.
pub fn decode(engine: Engine, dws: &[u32]) -> Result<Decoded, (AuditReason, String)> {
    let Some(&hdr) = dws.first() else {
        return Err((AuditReason::BadLength, "empty command".into()));
    };
    let h = Header::parse(hdr);
    let v = |reason, detail: &str| Err((reason, detail.to_string()));
    if dws.len() != h.len as usize + 1 {
        return v(
            AuditReason::BadLength,
            "command dwords do not match its length",
        );
    }
    let Some(client) = Client::from_bits(h.client) else {
        return v(AuditReason::UnknownOpcode, "unknown client");
    };
    if client != Client::Mi {
        if client.engine() != Some(engine) {
            return v(AuditReason::WrongEngine, "command for another engine");
        }
        return ops::decode(h, &dws[1..])
            .map(|op| Decoded::Exec(CmdKind::Op(op)))
            .map_err(|e| (e.audit_reason(), e.to_string()));
    }
    match h.opcode {
        cmd::MI_LOAD_REGISTER_IMM => {}
        op => match cmd::fixed_len(Client::Mi, op) {
            None => return v(AuditReason::UnknownOpcode, "unknown MI opcode"),
            Some(e) if e != h.len => {
                return v(AuditReason::BadLength, "length does not match opcode")
            }
            Some(_) => {}
        },
    }
    let a64 = |i: usize| GpuVa(u64::from(dws[i]) | u64::from(dws[i + 1]) << 32);
    let aligned = |va: GpuVa| {
        if va.raw().is_multiple_of(4) {
            Ok(va)
        } else {
            Err((
                AuditReason::BadParameter,
                "address not dword aligned".to_string(),
            ))
        }
    };
    Ok(match h.opcode {
        cmd::MI_NOOP => Decoded::Noop,
        cmd::MI_USER_INTERRUPT => Decoded::Exec(CmdKind::Mi(Mi::UserInterrupt)),
        cmd::MI_BATCH_BUFFER_END => Decoded::End,
        cmd::MI_BATCH_BUFFER_START => Decoded::Batch {
            target: aligned(a64(1))?,
            second: h.flags & cmd::BBS_SECOND_LEVEL != 0,
        },
        cmd::MI_STORE_DATA_IMM => Decoded::Exec(CmdKind::Mi(Mi::StoreDataImm {
            addr: aligned(a64(1))?,
            value: dws[3],
        })),
        cmd::MI_LOAD_REGISTER_IMM => {
            if h.len == 0 || !h.len.is_multiple_of(2) || h.len > 2 * cmd::LRI_MAX_PAIRS {
                return v(AuditReason::BadLength, "bad register-pair count");
            }
            let mut pairs = Vec::with_capacity(dws.len() / 2);
            for p in dws[1..].chunks_exact(2) {
                if !lri_allowed(engine, p[0]) {
                    return v(
                        AuditReason::ForbiddenRegister,
                        &format!("register {:#x} not loadable", p[0]),
                    );
                }
                pairs.push((p[0], p[1]));
            }
            Decoded::Exec(CmdKind::Mi(Mi::LoadRegisterImm(pairs)))
        }
        cmd::MI_STORE_REGISTER_MEM => {
            if !srm_allowed(engine, dws[1]) {
                return v(
                    AuditReason::ForbiddenRegister,
                    &format!("register {:#x} not storable", dws[1]),
                );
            }
            Decoded::Exec(CmdKind::Mi(Mi::StoreRegisterMem {
                reg: dws[1],
                addr: aligned(a64(2))?,
            }))
        }
        cmd::MI_SEMAPHORE_WAIT => Decoded::Exec(CmdKind::Mi(Mi::SemaphoreWait {
            addr: aligned(a64(1))?,
            value: dws[3],
            greater_equal: h.flags & cmd::SEM_GREATER_EQUAL != 0,
        })),
        _ => return v(AuditReason::UnknownOpcode, "unknown MI opcode"),
    })
}

enum Flow {
    Next,
    End,
    Call(GpuVa, Level),
    Chain(GpuVa),
}

/// Scans the ring window of `engine` with PPGTT root `root` (0 or invalid: GGTT addressing).
pub fn scan(
    shared: &VgpuShared,
    engine: Engine,
    w: RingWindow,
    root: u64,
) -> Result<Submission, Violation> {
    let doorbell = std::time::Instant::now();
    let dma = shared.dma();
    let ctx = shared.engine(engine);
    // Read the ring window (always GM).
    let size = u64::from(w.size);
    let len = (u64::from(w.end) + size - u64::from(w.start)) % size;
    let mut ring = vec![0u8; usize::try_from(len).unwrap_or(0)];
    {
        let mut gt = GgttTranslate::new(shared, &dma);
        let mut m = Mem::new(&mut gt);
        let first = (size - u64::from(w.start)).min(len);
        let (a, b) = ring.split_at_mut(usize::try_from(first).unwrap_or(0));
        let at = w.base.raw() + u64::from(w.start);
        m.read(GpuVa(at), a)
            .map_err(|f| fault_violation(f.va.raw().max(at), 0, f))?;
        m.read(GpuVa(w.base.raw()), b)
            .map_err(|f| fault_violation(f.va.raw(), 0, f))?;
    }
    let dws: Vec<u32> = ring
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();

    // The address space of the submission. A valid root must itself be acceptable, whatever
    // the commands access (section 8.4); in two-dim mode nothing else would look at it here.
    let ppgtt = root & PTE_VALID != 0;
    if ppgtt {
        translate_pte(root & !PTE_READ_ONLY, false, shared.lmem(), &dma).map_err(|kind| {
            violation(
                w.base.raw() + u64::from(w.start),
                0,
                AuditReason::AddressOutOfRange,
                format!("PPGTT_ROOT {root:#x}: {kind}"),
            )
        })?;
    }
    let shadow = if ppgtt && shared.ggtt.mode() == GttMode::Shadow {
        let gen = ctx.ppgtt_generation();
        match ctx.shadow().filter(|s| s.matches(root, gen)) {
            Some(s) => Some(s),
            None => {
                let s = PpgttShadow::build(shared, dma.clone(), root, gen).map_err(|e| {
                    violation(
                        w.base.raw() + u64::from(w.start),
                        0,
                        AuditReason::AddressOutOfRange,
                        e.to_string(),
                    )
                })?;
                let s = Arc::new(s);
                ctx.set_shadow(Some(s.clone()));
                Some(s)
            }
        }
    } else {
        None
    };
    let mut tlb = Tlb::default();
    let mut t = ContextTranslate::new(shared, &dma, root, shadow.as_deref(), &mut tlb);
    let mut scan = Scan {
        engine,
        mem: Mem::new(&mut t),
        cmds: Vec::new(),
        batches: HashSet::new(),
        surface: ctx.scan_surface(),
        _marker: std::marker::PhantomData,
    };
    let mut pos = 0usize;
    while pos < dws.len() {
        let off = (u64::from(w.start) + 4 * pos as u64) % size;
        let addr = w.base.raw() + off;
        let hdr = dws[pos];
        let n = Header::parse(hdr).len as usize + 1;
        let Some(cmd_dws) = dws.get(pos..pos + n) else {
            return Err(violation(
                addr,
                hdr,
                AuditReason::BadLength,
                "command runs past RING_TAIL",
            ));
        };
        match scan.command(Level::Ring, addr, cmd_dws)? {
            Flow::Next => {}
            Flow::Call(target, lvl) => scan.batch(target, lvl, (addr, hdr))?,
            Flow::End | Flow::Chain(_) => {
                return Err(violation(
                    addr,
                    hdr,
                    AuditReason::BadParameter,
                    "invalid in the ring",
                ));
            }
        }
        pos += n;
        let head_after = u32::try_from((u64::from(w.start) + 4 * pos as u64) % size).unwrap_or(0);
        if let Some(last) = scan.cmds.last_mut() {
            last.head_after = Some(head_after);
        }
    }
    ctx.set_scan_surface(scan.surface);
    Ok(Submission {
        cmds: scan.cmds,
        ppgtt_root: if ppgtt { root } else { 0 },
        tail: w.end,
        shadow,
        doorbell,
    })
}
