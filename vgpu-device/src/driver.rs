//! A host-side model of a guest driver: programs a vGPU only through its BARs, exactly as a
//! guest would (see `docs/device-spec.md`, section 12). Tests, the demo and the benchmarks use
//! it; transports provide [`DeviceAccess`] (the device in-process, or a vfio-user client).

use std::time::{Duration, Instant};

use vgpu_abi::regs::{self, ENGINE_STATUS_ERROR, ENGINE_STATUS_IDLE};
use vgpu_abi::{pci, Engine, PAGE_SIZE};

use crate::addr::{hi32, lo32};

/// How the driver reaches the device.
pub trait DeviceAccess {
    /// Reads BAR0.
    fn bar0_read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes BAR0.
    fn bar0_write(&mut self, offset: u64, data: &[u8]);
    /// Reads the aperture.
    fn bar2_read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes the aperture.
    fn bar2_write(&mut self, offset: u64, data: &[u8]);
    /// Gives the device a chance to make progress (runs engines inline, or just yields).
    fn progress(&mut self);
}

/// Errors a driver sees.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// `ID` did not read `"VGPU"`.
    #[error("Not a vGPU: ID reads {0:#x}")]
    NotVgpu(u32),
    /// The engine entered the error state.
    #[error("Engine {engine} error: code {code} at {addr:#x}")]
    EngineError {
        /// Engine name.
        engine: &'static str,
        /// `ERROR_CODE`.
        code: u32,
        /// `ERROR_ADDR`.
        addr: u64,
    },
    /// The engine did not become idle in time.
    #[error("Engine {0} timed out")]
    Timeout(&'static str),
    /// The ring has no room for the commands.
    #[error("Commands of {0} bytes do not fit the ring")]
    RingFull(usize),
}

/// The PV information block, as read by the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PvInfo {
    /// vGPU id.
    pub vgpu_id: u32,
    /// Engine mask.
    pub engine_mask: u32,
    /// Mappable GM base.
    pub mappable_base: u64,
    /// Mappable GM size.
    pub mappable_size: u64,
    /// Hidden GM base.
    pub hidden_base: u64,
    /// Hidden GM size.
    pub hidden_size: u64,
    /// Local memory size.
    pub lmem_size: u64,
}

/// Ring bookkeeping of the driver.
#[derive(Clone, Copy, Debug, Default)]
struct RingInfo {
    lmem_off: u64,
    size: u32,
    tail: u32,
}

/// A minimal guest driver.
pub struct Driver<A: DeviceAccess> {
    dev: A,
    pv: PvInfo,
    rings: [Option<RingInfo>; Engine::COUNT],
}

/// Size of each ring [`Driver::setup_ring`] sets up.
pub const RING_BYTES: u32 = 16 * 1024;

/// Local-memory offset reserved by [`Driver::setup_ring`] for engine `e`'s ring (the top of
/// local memory, 16 KiB per engine).
pub fn ring_lmem_offset(lmem_size: u64, e: Engine) -> u64 {
    lmem_size - (Engine::COUNT as u64 - e as u64) * 4 * PAGE_SIZE
}

impl<A: DeviceAccess> Driver<A> {
    /// Probes the device: checks `ID`, reads the PV block, unmasks every interrupt.
    pub fn probe(mut dev: A) -> Result<Self, DriverError> {
        let mut b = [0u8; 4];
        dev.bar0_read(u64::from(regs::ID), &mut b);
        let id = u32::from_le_bytes(b);
        if id != regs::ID_VALUE {
            return Err(DriverError::NotVgpu(id));
        }
        let mut d = Driver {
            dev,
            pv: PvInfo {
                vgpu_id: 0,
                engine_mask: 0,
                mappable_base: 0,
                mappable_size: 0,
                hidden_base: 0,
                hidden_size: 0,
                lmem_size: 0,
            },
            rings: [None; Engine::COUNT],
        };
        d.pv = PvInfo {
            vgpu_id: d.read32(regs::PV_VGPU_ID),
            engine_mask: d.read32(regs::PV_ENGINE_MASK),
            mappable_base: d.read64(regs::PV_MAPPABLE_BASE),
            mappable_size: d.read64(regs::PV_MAPPABLE_SIZE),
            hidden_base: d.read64(regs::PV_HIDDEN_BASE),
            hidden_size: d.read64(regs::PV_HIDDEN_SIZE),
            lmem_size: d.read64(regs::PV_LMEM_SIZE),
        };
        d.write32(regs::INTR_MASK, 0);
        Ok(d)
    }

    /// The PV block.
    pub fn pv(&self) -> PvInfo {
        self.pv
    }

    /// The transport.
    pub fn device(&mut self) -> &mut A {
        &mut self.dev
    }

    /// Reads a register.
    pub fn read32(&mut self, off: u32) -> u32 {
        let mut b = [0u8; 4];
        self.dev.bar0_read(u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    /// Reads a 64-bit register pair.
    pub fn read64(&mut self, off: u32) -> u64 {
        u64::from(self.read32(off)) | u64::from(self.read32(off + 4)) << 32
    }

    /// Writes a register.
    pub fn write32(&mut self, off: u32, v: u32) {
        self.dev.bar0_write(u64::from(off), &v.to_le_bytes());
    }

    /// Writes a GGTT entry for GM page `gm`.
    pub fn map_gm(&mut self, gm: u64, pte: u64) {
        self.dev
            .bar0_write(pci::GGTT_OFFSET + gm / PAGE_SIZE * 8, &pte.to_le_bytes());
    }

    /// Reads a GGTT entry.
    pub fn gm_entry(&mut self, gm: u64) -> u64 {
        let mut b = [0u8; 8];
        self.dev
            .bar0_read(pci::GGTT_OFFSET + gm / PAGE_SIZE * 8, &mut b);
        u64::from_le_bytes(b)
    }

    /// GM address of local-memory offset `off` through the reset mapping.
    pub fn gm_of_lmem(&self, off: u64) -> u64 {
        self.pv.mappable_base + off
    }

    /// Writes local memory through the aperture.
    pub fn lmem_write(&mut self, off: u64, data: &[u8]) {
        self.dev.bar2_write(off, data);
    }

    /// Reads local memory through the aperture.
    pub fn lmem_read(&mut self, off: u64, data: &mut [u8]) {
        self.dev.bar2_read(off, data);
    }

    /// Sets up and enables engine `e`'s 16 KiB ring at the top of local memory.
    pub fn setup_ring(&mut self, e: Engine) -> Result<(), DriverError> {
        let off = ring_lmem_offset(self.pv.lmem_size, e);
        let size = RING_BYTES;
        let gm = self.gm_of_lmem(off);
        let b = regs::engine_base(e);
        self.write32(b + regs::RING_CTL, 0);
        self.write32(b + regs::RING_BASE_LO, lo32(gm));
        self.write32(b + regs::RING_BASE_HI, hi32(gm));
        self.write32(b + regs::RING_SIZE, size);
        self.write32(b + regs::RING_CTL, regs::RING_CTL_ENABLE);
        self.check(e)?;
        self.rings[e.index()] = Some(RingInfo {
            lmem_off: off,
            size,
            tail: 0,
        });
        Ok(())
    }

    /// Sets engine `e`'s PPGTT root register (0: GGTT addressing).
    pub fn set_ppgtt_root(&mut self, e: Engine, root: u64) {
        let b = regs::engine_base(e);
        self.write32(b + regs::PPGTT_ROOT_HI, hi32(root));
        self.write32(b + regs::PPGTT_ROOT_LO, lo32(root));
    }

    fn check(&mut self, e: Engine) -> Result<(), DriverError> {
        let b = regs::engine_base(e);
        if self.read32(b + regs::ENGINE_STATUS) & ENGINE_STATUS_ERROR != 0 {
            return Err(DriverError::EngineError {
                engine: e.name(),
                code: self.read32(b + regs::ERROR_CODE),
                addr: self.read64(b + regs::ERROR_ADDR_LO),
            });
        }
        Ok(())
    }

    /// Copies `cmds` into engine `e`'s ring (wrapping) and rings the doorbell.
    pub fn submit(&mut self, e: Engine, cmds: &[u32]) -> Result<(), DriverError> {
        let Some(mut r) = self.rings[e.index()] else {
            self.setup_ring(e)?;
            return self.submit(e, cmds);
        };
        let bytes: Vec<u8> = cmds.iter().flat_map(|d| d.to_le_bytes()).collect();
        if bytes.len() >= r.size as usize {
            return Err(DriverError::RingFull(bytes.len()));
        }
        // Wait for room: HEAD must not be overtaken.
        let free = |head: u32, tail: u32| (head + r.size - tail - 4) % r.size;
        let t0 = Instant::now();
        loop {
            let head = self.read32(regs::engine_base(e) + regs::RING_HEAD);
            if free(head, r.tail) as usize >= bytes.len() {
                break;
            }
            self.check(e)?;
            if t0.elapsed() > Duration::from_secs(10) {
                return Err(DriverError::Timeout(e.name()));
            }
            self.dev.progress();
        }
        let first = (r.size - r.tail).min(u32::try_from(bytes.len()).unwrap_or(u32::MAX)) as usize;
        self.dev
            .bar2_write(r.lmem_off + u64::from(r.tail), &bytes[..first]);
        if first < bytes.len() {
            self.dev.bar2_write(r.lmem_off, &bytes[first..]);
        }
        r.tail = (r.tail + u32::try_from(bytes.len()).unwrap_or(0)) % r.size;
        self.rings[e.index()] = Some(r);
        self.write32(regs::engine_base(e) + regs::RING_TAIL, r.tail);
        self.check(e)
    }

    /// Waits until engine `e` is idle; fails if it enters the error state.
    pub fn wait_idle(&mut self, e: Engine, timeout: Duration) -> Result<(), DriverError> {
        let t0 = Instant::now();
        loop {
            self.check(e)?;
            if self.read32(regs::engine_base(e) + regs::ENGINE_STATUS) & ENGINE_STATUS_IDLE != 0 {
                return Ok(());
            }
            if t0.elapsed() > timeout {
                return Err(DriverError::Timeout(e.name()));
            }
            self.dev.progress();
        }
    }

    /// Swaps the transport (a VM that reconnected to its device elsewhere); returns the old one.
    pub fn replace_device(&mut self, dev: A) -> A {
        std::mem::replace(&mut self.dev, dev)
    }

    /// Takes over the rings the device has enabled (a driver attaching to a restored device):
    /// ring position and size from the registers, `RING_TAIL` as the next write position.
    pub fn adopt_rings(&mut self) {
        for e in Engine::ALL {
            let b = regs::engine_base(e);
            if self.read32(b + regs::RING_CTL) & regs::RING_CTL_ENABLE == 0 {
                self.rings[e.index()] = None;
                continue;
            }
            let base = self.read64(b + regs::RING_BASE_LO);
            let lmem_off = base.wrapping_sub(self.pv.mappable_base);
            self.rings[e.index()] = Some(RingInfo {
                lmem_off,
                size: self.read32(b + regs::RING_SIZE),
                tail: self.read32(b + regs::RING_TAIL),
            });
        }
    }

    /// Forgets the driver's ring state (after a reset the device did).
    pub fn forget_rings(&mut self) {
        self.rings = [None; Engine::COUNT];
    }
}

/// [`DeviceAccess`] straight into an in-process [`crate::vgpu::Vgpu`]; `progress` runs the
/// engines inline until idle.
pub struct Inline<'a>(pub &'a mut crate::vgpu::Vgpu);

impl DeviceAccess for Inline<'_> {
    fn bar0_read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.bar0_read(offset, data);
    }
    fn bar0_write(&mut self, offset: u64, data: &[u8]) {
        self.0.bar0_write(offset, data);
    }
    fn bar2_read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.bar2_read(offset, data);
    }
    fn bar2_write(&mut self, offset: u64, data: &[u8]) {
        self.0.bar2_write(offset, data);
    }
    fn progress(&mut self) {
        crate::engine::exec::run_until_idle(self.0.shared(), 1000);
    }
}

/// [`DeviceAccess`] to a vGPU behind a mutex whose engines a [`crate::sched::Scheduler`] runs;
/// `progress` just yields for a moment.
#[derive(Clone)]
pub struct Locked(pub std::sync::Arc<std::sync::Mutex<crate::vgpu::Vgpu>>);

impl Locked {
    fn dev(&self) -> std::sync::MutexGuard<'_, crate::vgpu::Vgpu> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl DeviceAccess for Locked {
    fn bar0_read(&mut self, offset: u64, data: &mut [u8]) {
        self.dev().bar0_read(offset, data);
    }
    fn bar0_write(&mut self, offset: u64, data: &[u8]) {
        self.dev().bar0_write(offset, data);
    }
    fn bar2_read(&mut self, offset: u64, data: &mut [u8]) {
        self.dev().bar2_read(offset, data);
    }
    fn bar2_write(&mut self, offset: u64, data: &[u8]) {
        self.dev().bar2_write(offset, data);
    }
    fn progress(&mut self) {
        std::thread::sleep(Duration::from_micros(100));
    }
}
