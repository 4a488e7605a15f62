//! Helpers shared by the tests that run the `vgpuctl` (and `vgpud`) binaries.
#![allow(dead_code)] // Each test binary uses a different subset.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// A fresh, empty directory under the system temp dir, unique per process and call.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "vgpu-api-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `vgpuctl --socket SOCKET ARGS…`, run in `cwd`.
pub fn vgpuctl(socket: &Path, cwd: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vgpuctl"));
    c.arg("--socket").arg(socket).args(args).current_dir(cwd);
    c
}

/// Runs `vgpuctl`, asserts it succeeded, and returns (stdout, stderr).
pub fn vgpuctl_ok(socket: &Path, cwd: &Path, args: &[&str]) -> (String, String) {
    let o: Output = vgpuctl(socket, cwd, args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "vgpuctl {args:?} failed: {err}");
    (String::from_utf8(o.stdout).unwrap(), err)
}
