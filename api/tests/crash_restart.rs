//! A real `vgpud` process: killed with SIGKILL and restarted with its vGPUs restored from their
//! last snapshots (taken through `vgpuctl`, restored through `vgpuctl`), and snapshots that do
//! not fit the file system (the daemon runs with `RLIMIT_FSIZE`, which works unprivileged and
//! as root): refused with 507 while the previous snapshot survives intact.
#![allow(clippy::cast_possible_truncation)] // Test arithmetic on small known values.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{temp_dir, vgpuctl, vgpuctl_ok};
use vfio_bindings::bindings::vfio::{VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_BAR2_REGION_INDEX};
use vfio_user::Client;
use vgpu_abi::regs;

const T: Duration = Duration::from_secs(30);

/// A `vgpud` child process with its sockets in `dir`.
struct Vgpud {
    child: Child,
    dir: PathBuf,
}

impl Vgpud {
    /// Starts vgpud; `fsize` limits the size of files it may write (`RLIMIT_FSIZE`).
    fn start(dir: &Path, fsize: Option<u64>) -> Vgpud {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vgpud"));
        cmd.arg("--socket-dir")
            .arg(dir.join("s"))
            .arg("--api-socket")
            .arg(dir.join("api.sock"))
            .args(["--lmem-mib", "256"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if fsize.is_some() {
            // SAFETY: only an async-signal-safe call between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    // Writes past the file-size limit then fail with EFBIG instead of killing
                    // the daemon.
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn vgpud");
        let d = Vgpud {
            child,
            dir: dir.to_path_buf(),
        };
        let t0 = Instant::now();
        while !d.ctl(&["ls"]).status.success() {
            assert!(t0.elapsed() < T, "vgpud did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(limit) = fsize {
            // After start-up: the limit also caps the size its local-memory memfd may grow to.
            let r = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: prlimit on our own child with a valid struct; no old value wanted.
            let rc = unsafe {
                libc::prlimit(
                    d.child.id() as i32,
                    libc::RLIMIT_FSIZE,
                    &r,
                    std::ptr::null_mut(),
                )
            };
            assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
        }
        d
    }

    fn ctl(&self, args: &[&str]) -> Output {
        vgpuctl(&self.dir.join("api.sock"), &self.dir, args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        vgpuctl_ok(&self.dir.join("api.sock"), &self.dir, args).0
    }

    fn kill(mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        self.child.wait().unwrap();
    }
}

impl Drop for Vgpud {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A VMM's view of a vGPU: the vfio-user client, retrying while the socket comes up.
fn attach(socket: &Path) -> Client {
    let t0 = Instant::now();
    loop {
        match Client::new(socket) {
            Ok(c) => return c,
            Err(e) => {
                assert!(t0.elapsed() < T, "attach {}: {e}", socket.display());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn read32(c: &mut Client, off: u32) -> u32 {
    let mut b = [0u8; 4];
    c.region_read(VFIO_PCI_BAR0_REGION_INDEX, u64::from(off), &mut b)
        .unwrap();
    u32::from_le_bytes(b)
}

fn write32(c: &mut Client, off: u32, v: u32) {
    c.region_write(VFIO_PCI_BAR0_REGION_INDEX, u64::from(off), &v.to_le_bytes())
        .unwrap();
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Writes a register, a GGTT entry and `len` bytes of local memory.
fn put_state(c: &mut Client, seed: u8, len: usize) {
    write32(c, regs::SCRATCH0, 0x5eed_0000 | u32::from(seed));
    let data = pattern(len, seed);
    for (i, chunk) in data.chunks(512 << 10).enumerate() {
        c.region_write(VFIO_PCI_BAR2_REGION_INDEX, (i * (512 << 10)) as u64, chunk)
            .unwrap();
    }
}

fn check_state(c: &mut Client, seed: u8, len: usize) {
    assert_eq!(
        read32(c, regs::SCRATCH0),
        0x5eed_0000 | u32::from(seed),
        "SCRATCH0"
    );
    let want = pattern(len, seed);
    let mut got = vec![0u8; len];
    for (i, chunk) in got.chunks_mut(512 << 10).enumerate() {
        c.region_read(VFIO_PCI_BAR2_REGION_INDEX, (i * (512 << 10)) as u64, chunk)
            .unwrap();
    }
    assert!(got == want, "local memory differs");
}

#[test]
fn test_vgpud_sigkill_restart_restores_vgpus_from_last_snapshot() {
    let dir = temp_dir("crash");
    let d = Vgpud::start(&dir, None);
    let mut sockets = Vec::new();
    for (name, profile) in [("vm1", "mini"), ("vm2", "small")] {
        sockets.push(PathBuf::from(
            d.ok(&["create", "--profile", profile, "--name", name])
                .trim(),
        ));
    }
    // Each VM writes state, then its vGPU is paused and snapshotted (as before a VM snapshot).
    for (i, s) in sockets.iter().enumerate() {
        let mut c = attach(s);
        put_state(&mut c, i as u8 + 1, 1 << 20);
        c.shutdown().unwrap();
    }
    for name in ["vm1", "vm2"] {
        d.ok(&["pause", name]);
        let snap = dir.join(format!("{name}.vgpu"));
        d.ok(&["snapshot", name, snap.to_str().unwrap()]);
        d.ok(&["resume", name]);
    }
    // State written after the last snapshot is lost with the crash.
    let mut c = attach(&sockets[0]);
    put_state(&mut c, 99, 4096);
    drop(c);
    d.kill();
    // The sockets of the killed daemon are still on disk: the new one replaces them.
    assert!(sockets[0].exists() && dir.join("api.sock").exists());
    let d = Vgpud::start(&dir, None);
    assert!(
        d.ok(&["ls"]).lines().count() <= 1,
        "a fresh daemon has no vGPUs"
    );
    for name in ["vm2", "vm1"] {
        let snap = dir.join(format!("{name}.vgpu"));
        let out = d.ok(&["restore", snap.to_str().unwrap(), "--name", name]);
        assert!(
            out.contains(&format!("{name}.sock")),
            "restore prints the socket: {out}"
        );
    }
    for (i, s) in sockets.iter().enumerate() {
        let mut c = attach(s);
        check_state(&mut c, i as u8 + 1, 1 << 20);
        assert_eq!(
            read32(&mut c, regs::PV_MAGIC),
            regs::PV_MAGIC_VALUE,
            "the restored vGPU is a working device"
        );
        c.shutdown().unwrap();
    }
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn test_snapshot_on_full_disk_refused_507_old_snapshot_survives() {
    let dir = temp_dir("fsize");
    // Room for a snapshot of a nearly empty vGPU, not for one with 4 MiB of data.
    let d = Vgpud::start(&dir, Some(2 << 20));
    let sock = PathBuf::from(
        d.ok(&["create", "--profile", "mini", "--name", "vm"])
            .trim(),
    );
    let mut c = attach(&sock);
    put_state(&mut c, 7, 64 << 10);
    let snap = dir.join("vm.vgpu");
    d.ok(&["snapshot", "vm", snap.to_str().unwrap()]);
    let good = std::fs::read(&snap).unwrap();
    put_state(&mut c, 8, 4 << 20);
    let o = d.ctl(&["--json", "snapshot", "vm", snap.to_str().unwrap()]);
    assert!(
        !o.status.success(),
        "a snapshot larger than the file-size limit succeeded"
    );
    let err = String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout);
    assert!(
        err.contains("507") || err.contains("insufficient_storage"),
        "{err}"
    );
    assert!(
        std::fs::read(&snap).unwrap() == good,
        "the previous snapshot changed"
    );
    let tmp: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(tmp.is_empty(), "temporary files left: {tmp:?}");
    // The daemon is fine and the vGPU runs on with its current state.
    check_state(&mut c, 8, 4 << 20);
    c.shutdown().unwrap();
    d.ok(&["ls"]);
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}
