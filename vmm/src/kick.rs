//! Getting a vCPU thread out of `KVM_RUN`: a real-time signal with an empty handler makes the
//! ioctl return `EINTR`, after which the run loop sees its stop flag.

use std::sync::OnceLock;
use std::thread::JoinHandle;

use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// Errors installing the signal handler.
#[derive(Debug, thiserror::Error)]
pub enum KickError {
    /// sigaction failed.
    #[error("Cannot install the vCPU kick signal handler: {0}")]
    Handler(String),
}

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (process-wide, empty) handler once.
pub fn install() -> Result<(), KickError> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        register_signal_handler(kick_signal(), noop_handler).map_err(|e| e.to_string())
    })
    .clone()
    .map_err(KickError::Handler)
}

/// Sends the kick signal to `thread` (no effect once it has exited).
pub fn kick<T>(thread: &JoinHandle<T>) {
    if thread.is_finished() {
        return;
    }
    if let Err(e) = thread.kill(kick_signal()) {
        tracing::debug!(error = %e, "vCPU kick failed");
    }
}
