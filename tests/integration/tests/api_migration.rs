//! Snapshot, restore and live migration through vgpud's REST API: two daemons, each with its
//! API on a unix socket (as `tests/api.rs` starts them), a VMM attached through the `vfio_user`
//! Client with the guest driver doing work, and the guest's local memory compared (read through
//! the aperture) with an uninterrupted run. Also cancellation, the guest-RAM dirty log, and
//! the errors of bad requests.
#![allow(clippy::cast_possible_truncation)] // Test arithmetic on small known values.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vgpu_abi::cmd::{enc, BPP_32, ROP_PATCOPY};
use vgpu_abi::{regs, Engine, PAGE_SIZE};
use vgpu_api::client::{Client, ClientError, Method};
use vgpu_api::daemon::Daemon;
use vgpu_api::model::{
    CreateVgpuRequest, ErrorBody, IncomingRequest, MigrateRequest, MigrationDirection,
    MigrationInfo, MigrationPhase, MigrationState, RestoreRequest, VgpuInfo,
};
use vgpu_api::rest::{ApiConfig, ApiHandle};
use vgpu_device::driver::Driver;
use vgpu_integration_tests::workload::{aperture, seed_ram, setup, step};
use vgpu_integration_tests::*;

const T: Duration = Duration::from_secs(30);
const STEPS: u32 = 48;

/// A daemon with its REST API on a unix socket.
struct Env {
    daemon: Arc<Daemon>,
    api: Option<ApiHandle>,
    client: Client,
}

impl Env {
    fn start(lmem_mib: u64) -> Env {
        static N: AtomicU32 = AtomicU32::new(0);
        let daemon = Arc::new(daemon(lmem_mib));
        let socket = temp_path(&format!("apimig-{}.sock", N.fetch_add(1, Ordering::SeqCst)));
        let api = ApiHandle::spawn(daemon.clone(), &ApiConfig::unix(&socket)).unwrap();
        let client = Client::unix(&socket).unwrap();
        Env {
            daemon,
            api: Some(api),
            client,
        }
    }

    fn create(&self, profile: &str, name: &str) -> VgpuInfo {
        self.client
            .create(&CreateVgpuRequest {
                profile: profile.into(),
                name: Some(name.into()),
                gtt: None,
                sched: None,
            })
            .unwrap()
    }

    /// A request that must fail with `status` and `code`; returns the message.
    fn fails(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
        status: u16,
        code: &str,
    ) -> String {
        let r = self
            .client
            .request(method.clone(), path, body.map(|b| b.as_bytes().to_vec()))
            .unwrap();
        let e: ErrorBody = serde_json::from_slice(&r.body)
            .unwrap_or_else(|_| panic!("{method} {path}: not an error body: {:?}", r.body));
        assert_eq!(
            (r.status.as_u16(), e.code.as_str()),
            (status, code),
            "{method} {path} {body:?}: {}",
            e.message
        );
        assert!(!e.message.is_empty());
        e.message
    }

    /// Polls migration `mid` until it ends.
    fn wait_migration(&self, mid: u64) -> MigrationInfo {
        let t0 = Instant::now();
        loop {
            let m = self.client.migration(mid).unwrap();
            if m.state.is_finished() {
                return m;
            }
            assert!(t0.elapsed() < T, "migration {mid} did not end: {m:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Local memory in use.
    fn lmem_used(&self) -> u64 {
        self.client.gpu().unwrap().lmem_used_bytes
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(a) = self.api.take() {
            a.shutdown().unwrap();
        }
        self.daemon.shutdown();
    }
}

fn api_err(e: ClientError) -> (u16, String, String) {
    match e {
        ClientError::Api {
            status,
            code,
            message,
        } => (status, code, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// The whole workload on one vGPU, no interruption.
fn reference() -> Vec<u8> {
    let env = Env::start(128);
    let info = env.create("small", "ref");
    let mut d = Driver::probe(Vmm::attach(&info.socket)).unwrap();
    seed_ram(&d.device().ram);
    setup(&mut d);
    for i in 0..STEPS {
        step(&mut d, i);
    }
    d.wait_idle(Engine::Blit, T).unwrap();
    aperture(&mut d)
}

/// A guest on a fresh `small` vGPU of `env` named `name`, with `steps` steps done.
fn guest(env: &Env, name: &str, steps: u32) -> (VgpuInfo, Driver<Vmm>) {
    let info = env.create("small", name);
    let mut d = Driver::probe(Vmm::attach(&info.socket)).unwrap();
    seed_ram(&d.device().ram);
    setup(&mut d);
    for i in 0..steps {
        step(&mut d, i);
    }
    d.wait_idle(Engine::Blit, T).unwrap();
    (info, d)
}

#[test]
fn test_api_snapshot_restore_on_other_daemon_keeps_guest_memory() {
    let want = reference();
    let a = Env::start(256);
    let b = Env::start(256);
    let (info, mut d) = guest(&a, "vm", STEPS / 2);
    let before = aperture(&mut d);
    let path = temp_path("apimig-snap.vgpu");
    let _ = std::fs::remove_file(&path);

    // As around a VM snapshot: the VM is paused (the driver stops), the vGPU is paused so
    // that nothing runs between its snapshot and the VM's, and the daemon writes the file.
    assert!(a.client.pause("vm").unwrap().paused);
    let snap = a.client.snapshot("vm", path.to_str().unwrap()).unwrap();
    assert_eq!(snap.path, path);
    assert_eq!(snap.bytes, std::fs::metadata(&path).unwrap().len());
    assert!(
        a.client.vgpu("vm").unwrap().paused,
        "a paused vGPU stays paused"
    );
    let ram = std::mem::replace(&mut d.device().ram, Mapping::memfd(4096));
    drop(d);
    a.client.delete("vm", true).unwrap();
    assert!(a.client.list().unwrap().is_empty());

    // Restored on the other daemon under the same name: the same socket name, paused until
    // the VM's RAM is back.
    let restored = b
        .client
        .restore(&RestoreRequest {
            path: path.to_str().unwrap().into(),
            name: Some("vm".into()),
            gtt: None,
            paused: Some(true),
        })
        .unwrap();
    assert_eq!(
        (restored.name.as_str(), restored.profile.as_str()),
        ("vm", "small")
    );
    assert_eq!(restored.socket.file_name(), info.socket.file_name());
    assert!(restored.paused);
    // The same snapshot again: the name is taken; under another name its GM ranges are.
    let body = |name: &str| {
        format!(
            "{{\"path\":\"{}\",\"name\":\"{name}\"}}",
            path.to_str().unwrap()
        )
    };
    b.fails(
        Method::POST,
        "/api/v1/vgpus/restore",
        Some(&body("vm")),
        409,
        "name_taken",
    );
    b.fails(
        Method::POST,
        "/api/v1/vgpus/restore",
        Some(&body("vm2")),
        409,
        "gm_range_taken",
    );
    assert_eq!(
        b.client.list().unwrap().len(),
        1,
        "refused restores leave nothing"
    );

    let mut d = Driver::probe(Vmm::attach_ram(&restored.socket, ram)).unwrap();
    d.adopt_rings();
    assert!(
        aperture(&mut d) == before,
        "local memory differs after the restore"
    );
    assert!(!b.client.resume("vm").unwrap().paused);
    for i in STEPS / 2..STEPS {
        step(&mut d, i);
    }
    d.wait_idle(Engine::Blit, T).unwrap();
    assert_eq!(d.read32(regs::GTT_FAULT_COUNT), 0);
    assert!(
        aperture(&mut d) == want,
        "restored run differs from the uninterrupted run"
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
fn test_api_live_migration_moves_vgpu_with_queued_work() {
    let want = reference();
    let a = Env::start(256);
    let b = Env::start(256);
    let (info, mut d) = guest(&a, "vm", 0);
    let b_used = b.lmem_used();

    let incoming = b
        .client
        .incoming(&IncomingRequest {
            listen: "tcp:127.0.0.1:0".into(),
            name: Some("vm".into()),
            gtt: None,
            paused: Some(true),
        })
        .unwrap();
    assert_eq!(incoming.state, MigrationState::Listening);
    assert_eq!(incoming.direction, MigrationDirection::Incoming);
    assert!(
        incoming.endpoint.starts_with("tcp:127.0.0.1:") && !incoming.endpoint.ends_with(":0"),
        "the picked port is reported: {}",
        incoming.endpoint
    );

    // The guest queues its whole workload, then stops touching the device (its VM is paused):
    // the engines are still working through the queue while pre-copy runs, and what is left
    // at stop-and-copy moves with the device state.
    for i in 0..STEPS {
        step(&mut d, i);
    }
    let m = a
        .client
        .migrate(
            "vm",
            &MigrateRequest {
                to: incoming.endpoint.clone(),
                downtime_ms: Some(50),
                max_rounds: None,
                keep_source: None,
            },
        )
        .unwrap();
    assert_eq!((m.state, m.vgpu), (MigrationState::Running, Some(info.id)));
    let done = a.wait_migration(m.id);
    assert_eq!(done.state, MigrationState::Completed, "{:?}", done.error);
    let report = done.report.clone().unwrap();
    assert!(
        report.precopy_rounds >= 1 && !report.rounds.is_empty(),
        "{report:?}"
    );
    assert!(report.downtime_us > 0 && report.total_time_us >= report.downtime_us);
    assert_eq!(report.memory_bytes, 64 << 20);
    assert_eq!(done.source_destroyed, Some(true));
    assert_eq!(
        done.progress.map(|p| p.phase),
        Some(MigrationPhase::Completed)
    );
    println!(
        "API migration: {} rounds, predicted downtime {} us, actual {} us, {} bytes",
        report.rounds.len(),
        report.predicted_downtime_us,
        report.downtime_us,
        report.bytes_sent
    );
    // Gone from A (its VMM was cut off with it), on B under the same name, paused.
    assert!(a.client.list().unwrap().is_empty());
    assert_eq!(api_err(a.client.vgpu("vm").unwrap_err()).0, 404);
    let received = b.wait_migration(incoming.id);
    assert_eq!(
        received.state,
        MigrationState::Completed,
        "{:?}",
        received.error
    );
    let moved = received.result.clone().unwrap();
    assert_eq!((moved.name.as_str(), moved.paused), ("vm", true));
    assert_eq!(received.vgpu, Some(moved.id));
    let dr = received.destination_report.unwrap();
    assert!(dr.ack_delivered && dr.pages > 0, "{dr:?}");
    assert_eq!(b.client.list().unwrap(), vec![moved.clone()]);
    assert_eq!(b.lmem_used(), b_used + (64 << 20));

    // The VM reconnects to B with its RAM (as Cloud Hypervisor after its own migration), then
    // the vGPU is resumed and finishes the queued work.
    let ram = std::mem::replace(&mut d.device().ram, Mapping::memfd(4096));
    drop(
        d.replace_device(Vmm::attach_ram(&moved.socket, ram))
            .detach(),
    );
    d.adopt_rings();
    assert!(!b.client.resume("vm").unwrap().paused);
    d.wait_idle(Engine::Blit, T).unwrap();
    assert_eq!(d.read32(regs::GTT_FAULT_COUNT), 0);
    assert!(
        aperture(&mut d) == want,
        "migrated run differs from the uninterrupted run"
    );
    let listed = b.client.migrations().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, incoming.id);
}

#[test]
fn test_api_migration_cancel_keeps_source_running_and_destination_empty() {
    let a = Env::start(256);
    let b = Env::start(256);
    let (_info, mut d) = guest(&a, "vm", 4);
    let b_used = b.lmem_used();

    // Cancelling while listening removes the listener.
    let sock = temp_path("apimig-cancel-listen.sock");
    let _ = std::fs::remove_file(&sock);
    let l = b
        .client
        .incoming(&IncomingRequest {
            listen: format!("unix:{}", sock.display()),
            name: None,
            gtt: None,
            paused: None,
        })
        .unwrap();
    assert!(sock.exists());
    assert!(b.client.cancel_migration(l.id).unwrap().cancel_requested);
    let l = b.wait_migration(l.id);
    assert_eq!(l.state, MigrationState::Cancelled);
    assert!(!sock.exists(), "listener socket removed");
    b.fails(
        Method::DELETE,
        &format!("/api/v1/migrations/{}", l.id),
        None,
        409,
        "migration_finished",
    );

    // A migration that cannot converge (1 ms target, below the fixed 2 ms overhead estimate)
    // runs pre-copy rounds until cancelled.
    let incoming = b
        .client
        .incoming(&IncomingRequest {
            listen: format!("unix:{}", sock.display()),
            name: Some("vm".into()),
            gtt: None,
            paused: None,
        })
        .unwrap();
    let m = a
        .client
        .migrate(
            "vm",
            &MigrateRequest {
                to: incoming.endpoint.clone(),
                downtime_ms: Some(1),
                max_rounds: Some(1000),
                keep_source: None,
            },
        )
        .unwrap();
    // Wait for pre-copy to be under way, with the vGPU created on B.
    let t0 = Instant::now();
    loop {
        let p = a.client.migration(m.id).unwrap();
        if p.progress
            .as_ref()
            .is_some_and(|p| p.round.unwrap_or(0) >= 2)
        {
            break;
        }
        assert!(!p.state.is_finished(), "{p:?}");
        assert!(t0.elapsed() < T, "pre-copy never reached round 2");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        b.client.migration(incoming.id).unwrap().state,
        MigrationState::Receiving
    );
    // While it runs, the source vGPU cannot be changed under it.
    for (method, path, body) in [
        (Method::DELETE, "/api/v1/vgpus/vm?force=true", None),
        (Method::POST, "/api/v1/vgpus/vm/pause", None),
        (Method::POST, "/api/v1/vgpus/vm/reset", None),
        (
            Method::POST,
            "/api/v1/vgpus/vm/snapshot",
            Some("{\"path\":\"/tmp/never.vgpu\"}"),
        ),
        (
            Method::POST,
            "/api/v1/vgpus/vm/migrate",
            Some("{\"to\":\"tcp:127.0.0.1:9\"}"),
        ),
    ] {
        let msg = a.fails(method, path, body, 409, "migration_in_progress");
        assert!(msg.contains(&format!("migration {}", m.id)), "{msg}");
    }
    let c = a.client.cancel_migration(m.id).unwrap();
    assert!(c.cancel_requested);
    let done = a.wait_migration(m.id);
    assert_eq!(done.state, MigrationState::Cancelled, "{done:?}");
    assert_eq!(done.error.as_ref().unwrap().code, "cancelled");
    assert!(done.report.is_none());
    let theirs = b.wait_migration(incoming.id);
    assert_eq!(theirs.state, MigrationState::Failed, "{theirs:?}");
    assert!(
        theirs.error.unwrap().message.contains("aborted"),
        "the destination learns why"
    );

    // The source runs on: listed, running, and the guest's work still completes.
    let v = a.client.vgpu("vm").unwrap();
    assert!(!v.paused && v.connected, "{v:?}");
    for i in 4..12 {
        step(&mut d, i);
    }
    d.wait_idle(Engine::Blit, T).unwrap();
    assert_eq!(d.read32(regs::GTT_FAULT_COUNT), 0);
    // The destination kept nothing.
    assert!(b.client.list().unwrap().is_empty());
    assert_eq!(b.lmem_used(), b_used);
    assert_eq!(b.client.migrations().unwrap().len(), 2);
}

#[test]
fn test_api_migration_to_nowhere_fails_and_source_runs_on() {
    let a = Env::start(128);
    let (_info, mut d) = guest(&a, "vm", 2);
    // A port nothing listens on: bind one, then close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let m = a
        .client
        .migrate(
            "vm",
            &MigrateRequest {
                to: format!("tcp:127.0.0.1:{port}"),
                downtime_ms: None,
                max_rounds: None,
                keep_source: None,
            },
        )
        .unwrap();
    let done = a.wait_migration(m.id);
    assert_eq!(done.state, MigrationState::Failed);
    let e = done.error.unwrap();
    assert_eq!(e.code, "io_error");
    assert!(
        e.message.contains("connecting to 127.0.0.1"),
        "{}",
        e.message
    );
    assert!(!a.client.vgpu("vm").unwrap().paused);
    step(&mut d, 2);
    d.wait_idle(Engine::Blit, T).unwrap();
}

#[test]
fn test_api_dirty_log_reports_guest_pages_engines_write() {
    let a = Env::start(128);
    let (_info, mut d) = guest(&a, "vm", 0);
    let gpn = RAM_GPA / PAGE_SIZE;
    let (ram_gpa, ram_len) = (RAM_GPA, RAM_SIZE as u64);
    let take = |gpa: u64, len: u64| a.client.take_dirty_log("vm", gpa, len).unwrap();
    a.fails(
        Method::GET,
        &format!("/api/v1/vgpus/vm/dirty-log?gpa={ram_gpa}&len={ram_len}"),
        None,
        409,
        "dirty_log_disabled",
    );
    assert!(a.client.set_dirty_log("vm", true).unwrap().enabled);

    // Engine writes into guest RAM: a 256-byte-pitch fill of 32 rows over hidden GM pages
    // 8 and 9, which map guest RAM pages 8 and 9.
    let h = d.pv().hidden_base;
    let fill = enc::color_blt(
        ROP_PATCOPY,
        BPP_32,
        h + 8 * PAGE_SIZE,
        256,
        64,
        32,
        0xdead_beef,
    );
    d.submit(Engine::Blit, &fill).unwrap();
    d.wait_idle(Engine::Blit, T).unwrap();
    let mut px = [0u8; 4];
    d.device().ram.read(9 * PAGE_SIZE + 4, &mut px);
    assert_eq!(
        u32::from_le_bytes(px),
        0xdead_beef,
        "the fill reached guest RAM"
    );
    // Reads of guest RAM and writes to local memory are not logged here.
    step(&mut d, 0);
    d.wait_idle(Engine::Blit, T).unwrap();

    let got = take(ram_gpa, ram_len);
    assert_eq!(got.page_size, 4096);
    assert_eq!(got.pages, vec![gpn + 8, gpn + 9]);
    assert!(!got.more && got.next_gpa.is_none());
    assert!(
        take(ram_gpa, ram_len).pages.is_empty(),
        "taken pages are cleared"
    );

    // A range outside the write, then the rest.
    d.submit(Engine::Blit, &fill).unwrap();
    d.wait_idle(Engine::Blit, T).unwrap();
    assert_eq!(take(ram_gpa, 9 * PAGE_SIZE).pages, vec![gpn + 8]);
    assert_eq!(
        take(ram_gpa + 9 * PAGE_SIZE, PAGE_SIZE).pages,
        vec![gpn + 9]
    );
    // A huge range is covered in bounded steps.
    let all = take(0, 1 << 62);
    assert!(all.more, "{all:?}");
    assert!(all.next_gpa.is_some_and(|n| n > 0 && n < 1 << 62));

    // Bad ranges.
    for (q, status, code) in [
        ("gpa=1&len=4096", 422, "invalid_value"),
        ("gpa=0&len=100", 422, "invalid_value"),
        ("gpa=18446744073709547520&len=8192", 422, "invalid_value"),
        ("gpa=0", 400, "bad_query"),
        ("gpa=0&len=4096&all=1", 400, "bad_query"),
    ] {
        a.fails(
            Method::GET,
            &format!("/api/v1/vgpus/vm/dirty-log?{q}"),
            None,
            status,
            code,
        );
    }
    // Enabling again keeps the log; disabling discards it.
    d.submit(Engine::Blit, &fill).unwrap();
    d.wait_idle(Engine::Blit, T).unwrap();
    assert!(a.client.set_dirty_log("vm", true).unwrap().enabled);
    assert_eq!(take(ram_gpa, ram_len).pages.len(), 2);
    assert!(!a.client.set_dirty_log("vm", false).unwrap().enabled);
    a.fails(
        Method::GET,
        &format!("/api/v1/vgpus/vm/dirty-log?gpa={ram_gpa}&len={ram_len}"),
        None,
        409,
        "dirty_log_disabled",
    );
}

#[test]
fn test_api_migration_bad_requests_get_clear_4xx() {
    let a = Env::start(256);
    let base = a.lmem_used();
    let _info = a.create("mini", "vm");
    let dir = temp_path("apimig-bad");
    std::fs::create_dir_all(&dir).unwrap();
    let good: PathBuf = dir.join("good.vgpu");
    a.client.snapshot("vm", good.to_str().unwrap()).unwrap();
    let post = |path: &str, body: &str, status, code| {
        a.fails(Method::POST, path, Some(body), status, code)
    };

    // Snapshot.
    let snap = "/api/v1/vgpus/vm/snapshot";
    post(
        "/api/v1/vgpus/42/snapshot",
        "{\"path\":\"/tmp/x.vgpu\"}",
        404,
        "vgpu_not_found",
    );
    post(
        "/api/v1/vgpus/ghost/snapshot",
        "{\"path\":\"/tmp/x.vgpu\"}",
        404,
        "vgpu_not_found",
    );
    let m = post(snap, "{\"path\":\"vm1.vgpu\"}", 422, "invalid_value");
    assert!(m.contains("absolute"), "{m}");
    let m = post(
        snap,
        &format!("{{\"path\":\"{}\"}}", dir.display()),
        422,
        "invalid_value",
    );
    assert!(m.contains("directory"), "{m}");
    let m = post(
        snap,
        "{\"path\":\"/nonexistent-dir/x.vgpu\"}",
        422,
        "invalid_value",
    );
    assert!(m.contains("No such file or directory"), "the OS error: {m}");
    post(
        snap,
        "{\"path\":\"/tmp/x\",\"compress\":true}",
        422,
        "invalid_body",
    );
    post(snap, "{}", 422, "invalid_body");
    post(snap, "{\"path\":", 400, "bad_json");

    // Restore: relative, missing, corrupt, truncated, bad name.
    let restore = |body: String, status, code| {
        a.fails(
            Method::POST,
            "/api/v1/vgpus/restore",
            Some(&body),
            status,
            code,
        )
    };
    let rel = restore("{\"path\":\"good.vgpu\"}".into(), 422, "invalid_value");
    assert!(rel.contains("absolute"), "{rel}");
    let missing = dir.join("missing.vgpu");
    let m = restore(
        format!("{{\"path\":\"{}\"}}", missing.display()),
        422,
        "invalid_value",
    );
    assert!(m.contains("No such file"), "{m}");
    let bytes = std::fs::read(&good).unwrap();
    for (name, bad) in [
        ("trunc.vgpu", bytes[..bytes.len() / 2].to_vec()),
        ("flip.vgpu", {
            let mut b = bytes.clone();
            b[100] ^= 0x40;
            b
        }),
        ("junk.vgpu", b"not a snapshot at all".to_vec()),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, bad).unwrap();
        let m = restore(
            format!("{{\"path\":\"{}\",\"name\":\"r\"}}", p.display()),
            422,
            "invalid_snapshot",
        );
        println!("{name}: {m}");
    }
    restore(
        format!("{{\"path\":\"{}\",\"name\":\"../x\"}}", good.display()),
        422,
        "invalid_value",
    );
    restore(
        format!("{{\"path\":\"{}\",\"gtt\":\"3d\"}}", good.display()),
        422,
        "invalid_body",
    );

    // Migration endpoints and values.
    let mig = "/api/v1/vgpus/vm/migrate";
    for to in [
        "http://dst:7000",
        "unix:relative.sock",
        "tcp:127.0.0.1",
        "tcp::7000",
        "",
    ] {
        let m = post(mig, &format!("{{\"to\":\"{to}\"}}"), 422, "invalid_value");
        assert!(m.contains("Bad to"), "{m}");
    }
    post(
        mig,
        "{\"to\":\"tcp:127.0.0.1:9\",\"downtime_ms\":0}",
        422,
        "invalid_value",
    );
    post(
        mig,
        "{\"to\":\"tcp:127.0.0.1:9\",\"max_rounds\":0}",
        422,
        "invalid_value",
    );
    post(
        mig,
        "{\"to\":\"tcp:127.0.0.1:9\",\"rounds\":3}",
        422,
        "invalid_body",
    );
    post(
        "/api/v1/vgpus/42/migrate",
        "{\"to\":\"tcp:127.0.0.1:9\"}",
        404,
        "vgpu_not_found",
    );
    let inc = "/api/v1/migrations/incoming";
    post(inc, "{\"listen\":\"udp:1.2.3.4:5\"}", 422, "invalid_value");
    post(
        inc,
        "{\"listen\":\"tcp:127.0.0.1:0\",\"name\":\"a/b\"}",
        422,
        "invalid_value",
    );
    post(
        inc,
        "{\"listen\":\"tcp:127.0.0.1:0\",\"name\":\"vm\"}",
        409,
        "name_taken",
    );
    // "restore" is a path under /api/v1/vgpus/, so it cannot name a vGPU.
    post(
        "/api/v1/vgpus",
        "{\"profile\":\"mini\",\"name\":\"restore\"}",
        422,
        "invalid_value",
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    post(
        inc,
        &format!("{{\"listen\":\"tcp:127.0.0.1:{port}\"}}"),
        409,
        "endpoint_in_use",
    );
    for p in ["/api/v1/migrations/999", "/api/v1/migrations/abc"] {
        a.fails(Method::GET, p, None, 404, "migration_not_found");
        a.fails(Method::DELETE, p, None, 404, "migration_not_found");
    }
    assert!(a.client.migrations().unwrap().is_empty());
    a.fails(
        Method::POST,
        "/api/v1/vgpus/vm/dirty-log",
        Some("{\"enabled\":\"yes\"}"),
        422,
        "invalid_body",
    );
    // Nothing was created by the refused requests.
    assert_eq!(a.client.list().unwrap().len(), 1);
    a.client.delete("vm", false).unwrap();
    assert_eq!(a.lmem_used(), base);
    let _ = std::fs::remove_dir_all(&dir);
}
