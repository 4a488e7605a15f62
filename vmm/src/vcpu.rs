//! The vCPU run loop: `KVM_RUN`, then dispatch the exit to the machine, until the guest
//! reports, crashes, or the VMM stops it.

use std::sync::atomic::{AtomicBool, Ordering};

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::machine::Machine;

/// Errors of the run loop itself (not of the guest).
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// `KVM_RUN` failed.
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
}

/// How the loop ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuEnd {
    /// The guest wrote this code to the result port.
    Reported(u32),
    /// The guest stopped in a way it did not report (triple fault, failed entry, `hlt` with
    /// interrupts off, ...).
    Crashed(String),
    /// The stop flag was set (timeout).
    Stopped,
}

/// Runs `vcpu` until the guest reports or crashes, or `stop` is set (and the thread kicked).
pub fn run(
    vcpu: &mut VcpuFd,
    machine: &mut Machine,
    stop: &AtomicBool,
) -> Result<VcpuEnd, VcpuError> {
    loop {
        if stop.load(Ordering::Acquire) {
            return Ok(VcpuEnd::Stopped);
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                if let Some(code) = machine.pio_write(port, data) {
                    return Ok(VcpuEnd::Reported(code));
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => machine.pio_read(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => machine.mmio_read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => machine.mmio_write(addr, data),
            Ok(VcpuExit::Hlt) => return Ok(VcpuEnd::Crashed("the guest halted".into())),
            Ok(VcpuExit::Shutdown) => {
                return Ok(VcpuEnd::Crashed("triple fault (shutdown)".into()))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Ok(VcpuEnd::Crashed(format!(
                    "VM entry failed: reason {reason:#x} on CPU {cpu}"
                )))
            }
            Ok(VcpuExit::InternalError) => {
                return Ok(VcpuEnd::Crashed("KVM internal error".into()))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return Ok(VcpuEnd::Crashed(format!("system event {kind}")))
            }
            Ok(other) => return Ok(VcpuEnd::Crashed(format!("unexpected exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(VcpuError::Run(e)),
        }
    }
}
