//! One VM from start to finish: KVM, memory, devices, the guest image and boot information, the
//! vCPU thread with its timeout, and the outcome.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use vm_memory::{ByteValued, Bytes, GuestAddress};

use crate::boot_info::{
    BootInfo, BOOT_INFO_GPA, BOOT_MAGIC, BOOT_VERSION, FLAG_BENCH, FLAG_MALICIOUS, MAX_VGPUS,
    MIN_RAM, RESULT_EXCEPTION, RESULT_FAIL, RESULT_PASS,
};
use crate::config::{GuestMode, VgpuAttach, VmConfig};
use crate::devices::debug::DebugPorts;
use crate::devices::local::{LocalError, LocalGpu};
use crate::devices::remote::{self, RemoteError};
use crate::elf::{self, ElfError};
use crate::guest::{self, GuestError};
use crate::irq::{MsiRouter, GSIS_PER_VGPU, MSI_GSI_BASE};
use crate::kick::{self, KickError};
use crate::machine::{ExitStats, Machine, MachineError};
use crate::memory::{GuestRam, MemoryError};
use crate::vcpu::{self, VcpuEnd, VcpuError};
use crate::x86::{self, BootError};

// SAFETY: `BootInfo` is `repr(C)` and made of integers only, laid out without padding (u64,
// u32, u32, u64, u64, four u32, then an array of u64), so every byte pattern is a valid value.
unsafe impl ByteValued for BootInfo {}

/// Errors that keep a VM from running (the guest's own failures are an [`Outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// /dev/kvm cannot be used.
    #[error("KVM is not available")]
    Kvm(#[source] kvm_ioctls::Error),
    /// A KVM VM ioctl failed.
    #[error("Cannot {0}")]
    Vm(&'static str, #[source] kvm_ioctls::Error),
    /// The memory size is out of range.
    #[error("Guest RAM of {0} MiB is outside {min}..=3072 MiB", min = MIN_RAM >> 20)]
    MemorySize(u64),
    /// Too many vGPUs.
    #[error("At most {MAX_VGPUS} vGPUs per VM")]
    TooManyVgpus,
    /// The guest image.
    #[error("Guest image")]
    Guest(#[from] GuestError),
    /// Loading the guest image.
    #[error("Cannot load the guest image")]
    Elf(#[from] ElfError),
    /// Guest memory.
    #[error("Guest memory")]
    Memory(#[from] MemoryError),
    /// vCPU setup.
    #[error("vCPU setup")]
    Boot(#[from] BootError),
    /// Building the machine.
    #[error("Machine")]
    Machine(#[from] MachineError),
    /// An in-process vGPU.
    #[error("In-process vGPU {0}")]
    Local(usize, #[source] LocalError),
    /// A vfio-user vGPU.
    #[error("vfio-user vGPU {0}")]
    Remote(usize, #[source] RemoteError),
    /// The kick signal.
    #[error("Signals")]
    Kick(#[from] KickError),
    /// The vCPU thread.
    #[error("vCPU thread")]
    Thread(#[source] std::io::Error),
    /// The run loop failed.
    #[error("vCPU")]
    Vcpu(#[from] VcpuError),
    /// The vCPU thread panicked.
    #[error("The vCPU thread panicked")]
    Panicked,
}

/// What the guest reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestStatus {
    /// It passed every check.
    Pass,
    /// It failed check `step` (see the console for why).
    Fail(u32),
    /// It took a CPU exception.
    Exception(u32),
    /// It wrote another code to the result port.
    Other(u32),
    /// It stopped without reporting.
    Crashed(String),
    /// It did not report within the timeout.
    TimedOut,
}

/// The result of a run.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// What the guest reported.
    pub status: GuestStatus,
    /// Everything it printed on the debug console.
    pub console: String,
    /// The boot information block as the guest left it (benchmark figures, vGPUs done).
    pub boot_info: BootInfo,
    /// vCPU exits by kind.
    pub exits: ExitStats,
    /// Accesses to the empty-handler MMIO page.
    pub null_accesses: u64,
    /// Wall time of the vCPU run.
    pub elapsed: Duration,
}

impl Outcome {
    /// Whether the guest passed.
    pub fn passed(&self) -> bool {
        self.status == GuestStatus::Pass
    }
}

/// Whether this process can open /dev/kvm and create a VM; the reason if not.
pub fn kvm_available() -> Result<(), String> {
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    kvm.create_vm()
        .map(|_| ())
        .map_err(|e| format!("cannot create a KVM VM: {e}"))
}

fn status_of(code: u32) -> GuestStatus {
    match code {
        RESULT_PASS => GuestStatus::Pass,
        c if c & 0xFFFF_0000 == RESULT_FAIL => GuestStatus::Fail(c & 0xFFFF),
        c if c & 0xFFFF_FF00 == RESULT_EXCEPTION => GuestStatus::Exception(c & 0xFF),
        c => GuestStatus::Other(c),
    }
}

/// Runs the VM described by `cfg` until its guest reports, crashes or times out.
pub fn run(cfg: &VmConfig) -> Result<Outcome, VmmError> {
    let ram_size = cfg.memory_mib.saturating_mul(1 << 20);
    if !(MIN_RAM..=3 << 30).contains(&ram_size) {
        return Err(VmmError::MemorySize(cfg.memory_mib));
    }
    if cfg.vgpus.len() > MAX_VGPUS {
        return Err(VmmError::TooManyVgpus);
    }
    let image = guest::image(cfg.guest.as_deref())?;
    kick::install()?;

    let kvm = Kvm::new().map_err(VmmError::Kvm)?;
    let vm = Arc::new(kvm.create_vm().map_err(VmmError::Kvm)?);
    vm.set_tss_address(0xfffb_d000)
        .map_err(|e| VmmError::Vm("set the TSS address", e))?;
    vm.create_irq_chip()
        .map_err(|e| VmmError::Vm("create the in-kernel interrupt controller", e))?;
    let ram = GuestRam::new(ram_size)?;
    ram.register(&vm, 0)?;
    let entry = elf::load(&image, ram.mem())?;
    let cr3 = x86::write_tables(ram.mem())?;

    let router = Arc::new(MsiRouter::new(vm.clone()));
    let mut machine = Machine::new(vm.clone(), DebugPorts::new(&cfg.name, cfg.echo_console))?;
    // The in-process GPU, if any vGPU is in-process; torn down explicitly at the end.
    let mut local: Option<LocalGpu> = None;
    for (i, spec) in cfg.vgpus.iter().enumerate() {
        let gsi_base = MSI_GSI_BASE + GSIS_PER_VGPU * u32::try_from(i).unwrap_or(0);
        let dev = match spec {
            VgpuAttach::InProcess { profile, gtt } => {
                let gpu = match &mut local {
                    Some(g) => g,
                    None => local.insert(LocalGpu::new().map_err(|e| VmmError::Local(i, e))?),
                };
                gpu.attach(profile, *gtt, &ram, &router, gsi_base)
                    .map_err(|e| VmmError::Local(i, e))?
            }
            VgpuAttach::Socket(path) => {
                remote::attach(path, &ram, &router, gsi_base).map_err(|e| VmmError::Remote(i, e))?
            }
        };
        machine.attach(dev);
    }

    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| VmmError::Vm("create the vCPU", e))?;
    x86::setup_vcpu(&kvm, &vcpu, cr3, entry)?;
    let tsc_khz = vcpu.get_tsc_khz().map_or(0, u64::from);
    let (flags, bench_iters) = match cfg.mode {
        GuestMode::Workload => (0, 0),
        GuestMode::Malicious => (FLAG_MALICIOUS, 0),
        GuestMode::Bench(n) => (FLAG_BENCH, n),
    };
    let boot = BootInfo {
        magic: BOOT_MAGIC,
        version: BOOT_VERSION,
        flags,
        ram_size,
        tsc_khz,
        vgpus: u32::try_from(cfg.vgpus.len()).unwrap_or(u32::MAX),
        bench_iters,
        ..Default::default()
    };
    ram.mem()
        .write_obj(boot, GuestAddress(BOOT_INFO_GPA))
        .map_err(|e| VmmError::Memory(MemoryError::Region(e.to_string())))?;

    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let t0 = Instant::now();
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name(format!("{}-vcpu0", cfg.name))
            .spawn(move || {
                let end = vcpu::run(&mut vcpu, &mut machine, &stop);
                let _ = tx.send(());
                (end, machine, vcpu)
            })
            .map_err(VmmError::Thread)?
    };
    if rx.recv_timeout(cfg.timeout).is_err() {
        stop.store(true, Ordering::Release);
        while rx.recv_timeout(Duration::from_millis(10)).is_err() && !thread.is_finished() {
            kick::kick(&thread);
        }
    }
    let elapsed = t0.elapsed();
    let (end, mut machine, vcpu) = thread.join().map_err(|_| VmmError::Panicked)?;
    let status = match end? {
        VcpuEnd::Reported(code) => status_of(code),
        VcpuEnd::Crashed(why) => GuestStatus::Crashed(why),
        VcpuEnd::Stopped => GuestStatus::TimedOut,
    };
    let boot_info = ram
        .mem()
        .read_obj(GuestAddress(BOOT_INFO_GPA))
        .unwrap_or_default();
    let outcome = Outcome {
        status,
        console: machine.take_console(),
        boot_info,
        exits: machine.stats(),
        null_accesses: machine.null_accesses(),
        elapsed,
    };
    // Tear down: the vCPU and the devices first, then the in-process GPU (which takes its
    // vGPUs off the scheduler), then the VM.
    drop(vcpu);
    drop(machine);
    drop(local);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_status_of_codes() {
        assert_eq!(status_of(RESULT_PASS), GuestStatus::Pass);
        assert_eq!(status_of(RESULT_FAIL | 0x203), GuestStatus::Fail(0x203));
        assert_eq!(status_of(RESULT_EXCEPTION | 14), GuestStatus::Exception(14));
        assert_eq!(status_of(7), GuestStatus::Other(7));
    }

    #[test]
    fn test_boot_info_layout_has_no_padding() {
        let fields = 8 + 4 + 4 + 8 + 8 + 4 * 4 + 8 * crate::boot_info::BENCH_SLOTS;
        assert_eq!(std::mem::size_of::<BootInfo>(), fields);
    }
}
