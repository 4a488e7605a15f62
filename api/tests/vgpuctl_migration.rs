//! `vgpuctl snapshot`, `restore`, `receive`, `migrate` and `migrations` against two in-process
//! vgpuds (daemon + REST API on unix sockets in temporary directories).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{temp_dir, vgpuctl, vgpuctl_ok};
use vgpu_api::client::Client;
use vgpu_api::daemon::{Daemon, DaemonConfig};
use vgpu_api::model::MigrationState;
use vgpu_api::rest::{ApiConfig, ApiHandle};
use vgpu_device::driver::{Driver, Locked};
use vgpu_device::phys::PhysGpuConfig;
use vgpu_device::sched::SchedConfig;

struct Env {
    daemon: Arc<Daemon>,
    api: Option<ApiHandle>,
    dir: PathBuf,
}

impl Env {
    fn new() -> Env {
        let dir = temp_dir("env");
        let daemon = Arc::new(
            Daemon::new(DaemonConfig {
                gpu: PhysGpuConfig {
                    lmem_size: 128 << 20,
                    max_vgpus: 8,
                },
                sched: SchedConfig::default(),
                socket_dir: dir.join("s"),
            })
            .unwrap(),
        );
        let api = ApiHandle::spawn(daemon.clone(), &ApiConfig::unix(dir.join("api.sock"))).unwrap();
        Env {
            daemon,
            api: Some(api),
            dir,
        }
    }

    fn socket(&self) -> &Path {
        self.api.as_ref().unwrap().socket()
    }

    fn cmd(&self, args: &[&str]) -> Command {
        vgpuctl(self.socket(), &self.dir, args)
    }

    fn ctl(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> (String, String) {
        vgpuctl_ok(self.socket(), &self.dir, args)
    }

    fn fails(&self, args: &[&str], needle: &str) {
        let o = self.ctl(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "vgpuctl {args:?}: {err}");
        assert!(err.contains(needle), "vgpuctl {args:?}: {err}");
    }

    /// Writes `pattern` into the first 64 KiB of vGPU `name`'s local memory, as its guest would.
    fn write_lmem(&self, name: &str, pattern: u8) {
        let id = self.daemon.resolve(name).unwrap();
        let mut d = Driver::probe(Locked(self.daemon.vgpu(id).unwrap())).unwrap();
        let data: Vec<u8> = (0..=u8::MAX)
            .cycle()
            .take(0x1_0000)
            .map(|i| i.wrapping_mul(pattern))
            .collect();
        d.lmem_write(0x1000, &data);
    }

    fn read_lmem(&self, name: &str) -> Vec<u8> {
        let id = self.daemon.resolve(name).unwrap();
        let mut d = Driver::probe(Locked(self.daemon.vgpu(id).unwrap())).unwrap();
        let mut b = vec![0u8; 0x1_0000];
        d.lmem_read(0x1000, &mut b);
        b
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(a) = self.api.take() {
            a.shutdown().unwrap();
        }
        self.daemon.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn test_vgpuctl_snapshot_restore_on_other_daemon_keeps_memory() {
    let a = Env::new();
    let b = Env::new();
    a.ok(&["create", "-p", "mini", "-n", "vm1"]);
    a.write_lmem("vm1", 7);
    let want = a.read_lmem("vm1");

    // A relative path is made absolute against vgpuctl's directory.
    let (_, err) = a.ok(&["snapshot", "vm1", "vm1.vgpu"]);
    let file = a.dir.join("vm1.vgpu");
    assert!(
        err.contains(&format!("wrote {}", file.display())) && err.contains("engines paused"),
        "{err}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&a.ok(&["--json", "snapshot", "vm1", "vm1.vgpu"]).0).unwrap();
    assert_eq!(json["bytes"], std::fs::metadata(&file).unwrap().len());

    let file = file.to_str().unwrap();
    let (out, err) = b.ok(&["restore", file, "--name", "vm1", "--paused"]);
    assert!(out.trim().ends_with("/s/vm1.sock"), "{out}");
    assert!(
        err.contains("restored vGPU") && err.contains("engines paused"),
        "{err}"
    );
    assert!(b
        .ok(&["ls"])
        .0
        .lines()
        .any(|l| l.contains("vm1") && l.contains("yes")));
    assert_eq!(b.read_lmem("vm1"), want, "local memory restored");
    b.ok(&["resume", "vm1"]);

    // Errors: clear message, exit status 1.
    a.fails(&["snapshot", "nope", "x.vgpu"], "No vGPU named 'nope'");
    a.fails(
        &["snapshot", "vm1", "/nonexistent-dir/x.vgpu"],
        "No such file or directory",
    );
    b.fails(
        &["restore", file, "--name", "vm1"],
        "A vGPU named 'vm1' exists",
    );
    b.fails(
        &["restore", "/nonexistent.vgpu"],
        "No such file or directory",
    );
    let junk = b.dir.join("junk.vgpu");
    std::fs::write(&junk, b"junk").unwrap();
    b.fails(&["restore", junk.to_str().unwrap()], "invalid_snapshot");
}

#[test]
fn test_vgpuctl_receive_and_migrate_move_the_vgpu() {
    let a = Env::new();
    let b = Env::new();
    a.ok(&["create", "-p", "mini", "-n", "vm1"]);
    a.write_lmem("vm1", 3);
    let want = a.read_lmem("vm1");
    let listen = format!("unix:{}", b.dir.join("mig.sock").display());

    // The destination waits for the migration in the background.
    let receiver = b
        .cmd(&["receive", "--listen", &listen, "--name", "vm1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let bc = Client::unix(b.socket()).unwrap();
    let t0 = Instant::now();
    while !bc
        .migrations()
        .unwrap()
        .iter()
        .any(|m| m.state == MigrationState::Listening)
    {
        assert!(t0.elapsed() < Duration::from_secs(20), "never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (out, err) = a.ok(&["migrate", "vm1", "--to", &listen, "--downtime-ms", "50"]);
    assert!(err.contains("migration 1: vGPU 'vm1'"), "{err}");
    for s in [
        "migrated vGPU 'vm1'",
        "downtime",
        "predicted",
        "pre-copy",
        "sent",
        "destroyed",
    ] {
        assert!(out.contains(s), "{s}: {out}");
    }
    let r = receiver.wait_with_output().unwrap();
    let (rout, rerr) = (
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr),
    );
    assert!(r.status.success(), "{rerr}");
    assert!(rout.trim().ends_with("/s/vm1.sock"), "{rout}");
    assert!(
        rerr.contains("listening on unix:") && rerr.contains("received vGPU"),
        "{rerr}"
    );
    assert!(!a.ok(&["ls"]).0.contains("vm1"), "gone from the source");
    assert_eq!(b.read_lmem("vm1"), want, "local memory moved");
    let list = b.ok(&["migrations"]).0;
    assert!(
        list.contains("incoming") && list.contains("completed"),
        "{list}"
    );
    let list = a.ok(&["migrations"]).0;
    assert!(
        list.contains("outgoing") && list.contains("downtime"),
        "{list}"
    );
    let one: serde_json::Value = serde_json::from_str(&a.ok(&["migrations", "1"]).0).unwrap();
    assert_eq!(one["state"], "completed");

    // Errors.
    b.fails(&["migrate", "vm1", "--to", "nowhere"], "Bad to 'nowhere'");
    b.fails(&["migrations", "7"], "No migration 7");
    b.fails(&["cancel-migration", "1"], "has already ended");
    // A migration to nothing: the source runs on and vgpuctl says so.
    let dead = format!("unix:{}", b.dir.join("dead.sock").display());
    b.fails(
        &["migrate", "vm1", "--to", &dead],
        "the source vGPU runs on",
    );
    assert!(b.ok(&["ls"]).0.contains("vm1"));
}
