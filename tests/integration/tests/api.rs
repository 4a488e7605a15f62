//! vgpud's REST API end to end: the daemon and its API in-process on a unix socket, a real HTTP
//! client (hyper, `vgpu_api::client`), and the `vfio_user` Client (what Cloud Hypervisor runs)
//! attached to the vGPUs the API creates, with guest work through the driver model. Every test
//! ends by checking that capacity (available instances, local memory in use) is back where it
//! started.
#![allow(clippy::cast_possible_truncation)] // Test arithmetic on small known values.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio_bindings::bindings::vfio::VFIO_PCI_BAR0_REGION_INDEX;
use vgpu_abi::cmd::{enc, BPP_32, ROP_PATCOPY, ROP_SRCCOPY};
use vgpu_abi::{regs, Engine};
use vgpu_api::client::{AsyncClient, Client, ClientError, Endpoint, Method};
use vgpu_api::daemon::Daemon;
use vgpu_api::model::{CreateVgpuRequest, ErrorBody, GttModeName, SchedParamsBody, VgpuInfo};
use vgpu_api::rest::{ApiConfig, ApiHandle};
use vgpu_device::driver::{Driver, DriverError};
use vgpu_integration_tests::*;

const T: Duration = Duration::from_secs(10);

struct Env {
    daemon: Arc<Daemon>,
    api: Option<ApiHandle>,
    client: Client,
    socket: PathBuf,
}

impl Env {
    fn start(lmem_mib: u64) -> Env {
        static N: AtomicU32 = AtomicU32::new(0);
        let daemon = Arc::new(daemon(lmem_mib));
        let socket = temp_path(&format!("api-{}.sock", N.fetch_add(1, Ordering::SeqCst)));
        let api = ApiHandle::spawn(daemon.clone(), &ApiConfig::unix(&socket)).unwrap();
        let client = Client::unix(&socket).unwrap();
        Env {
            daemon,
            api: Some(api),
            client,
            socket,
        }
    }

    /// Local memory in use and available instances per profile.
    fn capacity(&self) -> (u64, Vec<(String, u64)>) {
        let gpu = self.client.gpu().unwrap();
        let profiles = self.client.profiles().unwrap();
        (
            gpu.lmem_used_bytes,
            profiles
                .into_iter()
                .map(|p| (p.name, p.available))
                .collect(),
        )
    }

    /// A raw request: (status, body).
    fn raw(&self, method: Method, path: &str, body: Option<&str>) -> (u16, Vec<u8>) {
        let r = self
            .client
            .request(method, path, body.map(|b| b.as_bytes().to_vec()))
            .unwrap();
        (r.status.as_u16(), r.body.to_vec())
    }

    /// A request that must fail with `status` and `code`.
    fn fails(&self, method: Method, path: &str, body: Option<&str>, status: u16, code: &str) {
        let (s, b) = self.raw(method.clone(), path, body);
        let e: ErrorBody = serde_json::from_slice(&b)
            .unwrap_or_else(|_| panic!("{method} {path}: not an error body: {b:?}"));
        assert_eq!(
            (s, e.code.as_str()),
            (status, code),
            "{method} {path} {body:?}: {}",
            e.message
        );
        assert!(!e.message.is_empty());
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

    fn wait_connected(&self, key: &str, want: bool) {
        let t0 = Instant::now();
        while self.client.vgpu(key).unwrap().connected != want {
            assert!(t0.elapsed() < T, "{key}: connected never became {want}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(a) = self.api.take() {
            a.shutdown().unwrap();
        }
        assert!(!self.socket.exists(), "API socket removed at shutdown");
        self.daemon.shutdown();
    }
}

fn api_err(e: ClientError) -> (u16, String) {
    match e {
        ClientError::Api { status, code, .. } => (status, code),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// A 32-bpp fill of `w`x`h` at local-memory offset `off`, copied to `off + 1 MiB`, then a fence.
fn blit_work(d: &mut Driver<Vmm>, color: u32, w: u32, h: u32) -> Result<(), DriverError> {
    let (src, dst) = (0u64, 1u64 << 20);
    let fill = enc::color_blt(ROP_PATCOPY, BPP_32, d.gm_of_lmem(src), w * 4, w, h, color);
    let copy = enc::src_copy_blt(enc::Copy {
        rop: ROP_SRCCOPY,
        bpp: BPP_32,
        dst: d.gm_of_lmem(dst),
        dst_pitch: w * 4,
        src: d.gm_of_lmem(src),
        src_pitch: w * 4,
        width: w,
        height: h,
        pattern: 0,
    });
    let fence = enc::store_data_imm(d.gm_of_lmem(0x20_0000), color);
    d.submit(Engine::Blit, &[fill.as_slice(), &copy, &fence].concat())?;
    d.wait_idle(Engine::Blit, T)
}

fn lmem_u32(d: &mut Driver<Vmm>, off: u64) -> u32 {
    let mut b = [0u8; 4];
    d.lmem_read(off, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn test_api_create_attach_work_stats_delete_frees_capacity() {
    let env = Env::start(512);
    let base = env.capacity();
    let info = env
        .client
        .create(&CreateVgpuRequest {
            profile: "small".into(),
            name: Some("vm1".into()),
            gtt: Some(GttModeName::TwoDim),
            sched: Some(SchedParamsBody {
                weight: Some(3),
                ..Default::default()
            }),
        })
        .unwrap();
    assert_eq!((info.name.as_str(), info.gtt), ("vm1", GttModeName::TwoDim));
    assert!(info.socket.exists());
    let (used, avail) = env.capacity();
    assert_eq!(used, base.0 + (64 << 20));
    let small = |a: &[(String, u64)]| a.iter().find(|(n, _)| n == "small").unwrap().1;
    assert_eq!(small(&avail), small(&base.1) - 1);
    assert_eq!(
        env.client.list().unwrap(),
        vec![VgpuInfo { ..info.clone() }]
    );

    // A VMM attaches through the socket the API returned and runs work.
    let mut d = Driver::probe(Vmm::attach(&info.socket)).unwrap();
    env.wait_connected("vm1", true);
    for i in 0..5u32 {
        blit_work(&mut d, 0x1000_0000 + i, 256, 64).unwrap();
    }
    assert_eq!(lmem_u32(&mut d, (1 << 20) + 4 * 255), 0x1000_0004, "copied");
    let s = env.client.stats("vm1").unwrap();
    let blit = s
        .engines
        .iter()
        .find(|e| e.engine.to_string() == "blit")
        .unwrap();
    assert!(blit.commands >= 15, "{blit:?}");
    assert!(blit.bytes >= 5 * 2 * 256 * 64 * 4, "{blit:?}");
    assert_eq!(blit.submissions, 5);
    assert!(blit.busy_ns > 0);
    assert_eq!(blit.submission_latency.count, 5);
    assert!(blit.slice.count >= 1);
    // At least one RING_TAIL write and one ENGINE_STATUS read per submission are trapped.
    assert!(
        s.trap_latency.count >= 2 * blit.submissions,
        "every register access is timed: {s:?}"
    );
    assert!(s.connected);
    let sched = env.client.sched("vm1").unwrap();
    assert!(sched.engines.iter().all(|e| e.weight == 3), "{sched:?}");
    let m = env.client.metrics().unwrap();
    let line = m
        .lines()
        .find(|l| {
            l.starts_with("vgpu_engine_commands_total{vgpu=\"0\",name=\"vm1\",engine=\"blit\"}")
        })
        .expect("per-engine counter");
    assert!(line.ends_with(&format!(" {}", blit.commands)), "{line}");
    assert!(m.contains(
        "vgpu_submission_latency_seconds_count{vgpu=\"0\",name=\"vm1\",engine=\"blit\"} 5"
    ));
    assert!(m.contains("vgpu_trap_latency_seconds_bucket{vgpu=\"0\",name=\"vm1\",le=\"+Inf\"}"));
    assert!(m.contains("vgpu_connected{vgpu=\"0\",name=\"vm1\"} 1"));

    // Deleting an attached vGPU is refused and changes nothing.
    assert_eq!(
        api_err(env.client.delete("vm1", false).unwrap_err()),
        (409, "vgpu_attached".into())
    );
    assert!(env.client.vgpu("vm1").is_ok());
    blit_work(&mut d, 0xabcd, 16, 16).unwrap();

    // Detached, it deletes; a second delete is a 404; capacity is back.
    drop(d);
    env.wait_connected("vm1", false);
    env.client.delete("vm1", false).unwrap();
    assert!(!info.socket.exists(), "vfio-user socket removed");
    assert_eq!(api_err(env.client.delete("vm1", false).unwrap_err()).0, 404);
    assert_eq!(env.capacity(), base);
}

#[test]
fn test_api_bad_requests_get_clear_4xx_and_leak_nothing() {
    let env = Env::start(256);
    let base = env.capacity();
    let post = |body: &str, status, code| {
        env.fails(Method::POST, "/api/v1/vgpus", Some(body), status, code)
    };
    post("{\"profile\":", 400, "bad_json");
    post("", 400, "bad_json");
    post("profile=small", 400, "bad_json");
    post(
        "{\"profile\":\"small\",\"colour\":\"red\"}",
        422,
        "invalid_body",
    );
    post("{\"profile\":5}", 422, "invalid_body");
    post("{}", 422, "invalid_body");
    post("{\"profile\":\"huge\"}", 422, "unknown_profile");
    post(
        "{\"profile\":\"small\",\"name\":\"../x\"}",
        422,
        "invalid_value",
    );
    post(
        "{\"profile\":\"small\",\"name\":\"42\"}",
        422,
        "invalid_value",
    );
    post(
        "{\"profile\":\"small\",\"sched\":{\"weight\":0}}",
        422,
        "invalid_value",
    );
    post(
        "{\"profile\":\"small\",\"sched\":{\"weight\":1,\"shares\":3}}",
        422,
        "invalid_body",
    );
    post(
        "{\"profile\":\"small\",\"gtt\":\"3d\"}",
        422,
        "invalid_body",
    );
    let big = format!("{{\"profile\":\"{}\"}}", "x".repeat(100_000));
    post(&big, 413, "body_too_large");
    // Unknown ids and routes.
    for (m, p) in [
        (Method::GET, "/api/v1/vgpus/42"),
        (Method::GET, "/api/v1/vgpus/ghost"),
        (Method::DELETE, "/api/v1/vgpus/42"),
        (Method::POST, "/api/v1/vgpus/42/pause"),
        (Method::POST, "/api/v1/vgpus/42/reset"),
        (Method::GET, "/api/v1/vgpus/42/stats"),
        (Method::GET, "/api/v1/vgpus/42/audit"),
        (Method::GET, "/api/v1/vgpus/42/display"),
        (Method::GET, "/api/v1/vgpus/42/sched"),
    ] {
        env.fails(m, p, None, 404, "vgpu_not_found");
    }
    env.fails(
        Method::PUT,
        "/api/v1/vgpus/42/sched",
        Some("{\"weight\":2}"),
        404,
        "vgpu_not_found",
    );
    env.fails(
        Method::PUT,
        "/api/v1/engines/gpu",
        Some("{\"policy\":\"best-effort\"}"),
        404,
        "engine_not_found",
    );
    env.fails(
        Method::PUT,
        "/api/v1/engines/blit",
        Some("{\"policy\":\"fair\"}"),
        422,
        "invalid_body",
    );
    env.fails(Method::GET, "/api/v2/vgpus", None, 404, "no_route");
    env.fails(
        Method::PATCH,
        "/api/v1/vgpus",
        None,
        405,
        "method_not_allowed",
    );
    env.fails(
        Method::GET,
        "/api/v1/scheduler/trace?vgpu=x",
        None,
        400,
        "bad_query",
    );
    env.fails(
        Method::DELETE,
        "/api/v1/vgpus/1?force=maybe",
        None,
        400,
        "bad_query",
    );

    // Over-commit: exactly as many as `available` said, then 507.
    let n = base.1.iter().find(|(p, _)| p == "small").unwrap().1;
    assert_eq!(n, 4, "256 MiB of local memory holds four 64 MiB vGPUs");
    let made: Vec<VgpuInfo> = (0..n)
        .map(|i| env.create("small", &format!("s{i}")))
        .collect();
    post("{\"profile\":\"small\"}", 507, "capacity_exhausted");
    post("{\"profile\":\"mini\"}", 507, "capacity_exhausted");
    env.fails(
        Method::POST,
        "/api/v1/vgpus",
        Some("{\"profile\":\"small\",\"name\":\"s0\"}"),
        409,
        "name_taken",
    );
    assert!(env
        .client
        .profiles()
        .unwrap()
        .iter()
        .all(|p| p.available == 0));

    // Reserves over 100 % on an engine: 409, and the refused vGPU keeps its parameters.
    env.client
        .set_policy(
            "blit".parse().unwrap(),
            vgpu_api::model::PolicyName::FixedShare,
        )
        .unwrap();
    let put =
        |k: &str, body: &str| env.raw(Method::PUT, &format!("/api/v1/vgpus/{k}/sched"), Some(body));
    assert_eq!(put("s0", "{\"engine\":\"blit\",\"reserve_pct\":60}").0, 200);
    assert_eq!(
        put("s0", "{\"engine\":\"blit\",\"reserve_pct\":60}").0,
        200,
        "idempotent"
    );
    env.fails(
        Method::PUT,
        "/api/v1/vgpus/s1/sched",
        Some("{\"reserve_pct\":60}"),
        409,
        "over_reserved",
    );
    env.fails(
        Method::PUT,
        "/api/v1/vgpus/s1/sched",
        Some("{\"cap_pct\":0}"),
        422,
        "invalid_value",
    );
    env.fails(
        Method::PUT,
        "/api/v1/vgpus/s1/sched",
        Some("{\"weight\":\"heavy\"}"),
        422,
        "invalid_body",
    );
    let s1 = env.client.sched("s1").unwrap();
    assert!(
        s1.engines
            .iter()
            .all(|e| e.reserve_pct == 0 && e.cap_pct == 100),
        "{s1:?}"
    );

    // Deleting a busy (attached) vGPU: 409 without force; with force the VMM is cut off.
    let mut vmm = Vmm::attach(&made[0].socket);
    env.wait_connected("s0", true);
    env.fails(
        Method::DELETE,
        "/api/v1/vgpus/s0",
        None,
        409,
        "vgpu_attached",
    );
    assert_eq!(
        env.raw(Method::DELETE, "/api/v1/vgpus/s0?force=true", None)
            .0,
        204
    );
    let mut b = [0u8; 4];
    assert!(
        vmm.client
            .region_read(VFIO_PCI_BAR0_REGION_INDEX, 0, &mut b)
            .is_err(),
        "the client was disconnected"
    );
    drop(vmm);
    for v in &made[1..] {
        env.client.delete(&v.id.to_string(), false).unwrap();
    }
    assert!(env.client.list().unwrap().is_empty());
    assert_eq!(env.capacity(), base, "nothing leaked");
}

#[test]
fn test_api_pause_resume_reset_audit_and_trace() {
    let env = Env::start(128);
    let base = env.capacity();
    let info = env.create("mini", "p");
    let mut d = Driver::probe(Vmm::attach(&info.socket)).unwrap();

    // Paused: the doorbell queues, nothing runs; resumed: it runs.
    assert!(env.client.pause("p").unwrap().paused);
    assert!(env.client.pause("p").unwrap().paused, "idempotent");
    let fill = enc::color_blt(
        ROP_PATCOPY,
        BPP_32,
        d.gm_of_lmem(0),
        256,
        64,
        64,
        0x5151_5151,
    );
    d.submit(Engine::Blit, &fill).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let blit = |env: &Env| {
        env.client
            .stats("p")
            .unwrap()
            .engines
            .into_iter()
            .find(|e| e.engine.to_string() == "blit")
            .unwrap()
    };
    assert_eq!((blit(&env).submissions, blit(&env).commands), (1, 0));
    let st = d.read32(regs::engine_base(Engine::Blit) + regs::ENGINE_STATUS);
    assert_eq!(
        st & regs::ENGINE_STATUS_IDLE,
        0,
        "work pending while paused"
    );
    assert!(!env.client.resume("p").unwrap().paused);
    d.wait_idle(Engine::Blit, T).unwrap();
    assert_eq!(blit(&env).commands, 1);
    assert_eq!(lmem_u32(&mut d, 4 * 63), 0x5151_5151);

    // A hostile blit outside the partition: rejected, recorded, pageable and filterable.
    let attack = enc::color_blt(ROP_PATCOPY, BPP_32, 0xF_0000_0000, 256, 64, 64, 1);
    assert!(matches!(
        d.submit(Engine::Blit, &attack),
        Err(DriverError::EngineError { .. })
    ));
    let page = env.client.audit("p", &Default::default()).unwrap();
    assert_eq!(page.events.len(), 1, "{page:?}");
    assert_eq!(page.total, 1);
    let ev = &page.events[0];
    assert_eq!((ev.seq, ev.engine.to_string().as_str()), (1, "blit"));
    let reason = ev.reason.clone();
    let q = |s: &str| {
        let (st, b) = env.raw(Method::GET, &format!("/api/v1/vgpus/p/audit?{s}"), None);
        assert_eq!(st, 200, "{s}");
        serde_json::from_slice::<vgpu_api::model::AuditPage>(&b).unwrap()
    };
    assert_eq!(q(&format!("engine=blit&reason={reason}")).events.len(), 1);
    assert_eq!(q("engine=render").events.len(), 0);
    assert_eq!(q("reason=batch_loop").events.len(), 0);
    assert_eq!(q(&format!("after={}", page.next_after)).events.len(), 0);
    env.fails(
        Method::GET,
        "/api/v1/vgpus/p/audit?limit=0",
        None,
        422,
        "invalid_value",
    );
    assert_eq!(env.client.stats("p").unwrap().audit_events, 1);

    // Host reset clears the engine error; the guest sets its ring up again and works on.
    env.client.reset("p").unwrap();
    let st = d.read32(regs::engine_base(Engine::Blit) + regs::ENGINE_STATUS);
    assert_eq!(
        st & regs::ENGINE_STATUS_ERROR,
        0,
        "error cleared by the reset"
    );
    d.forget_rings();
    d.write32(regs::INTR_MASK, 0);
    blit_work(&mut d, 0x7777, 32, 8).unwrap();

    // The trace has this vGPU's slices and filters by vGPU and engine.
    let t = env.client.trace(&vgpu_api::model::TraceQuery {
        engine: Some("blit".parse().unwrap()),
        vgpu: Some(info.id),
    });
    let t = t.unwrap();
    assert!(!t.events.is_empty());
    assert!(t
        .events
        .iter()
        .all(|e| e.vgpu == info.id && e.engine == "blit"));

    // Forced delete while attached.
    env.client.delete("p", true).unwrap();
    drop(d);
    assert_eq!(env.capacity(), base);
}

/// What a load run saw.
#[derive(Debug)]
struct LoadReport {
    requests: u64,
    errors: u64,
    lifecycles: u64,
    guest_submissions: u64,
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
    per_s: f64,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} requests ({:.0}/s), {} errors, latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
             {} create+delete cycles; {} guest blit submissions meanwhile",
            self.requests,
            self.per_s,
            self.errors,
            self.p50_us as f64 / 1000.0,
            self.p99_us as f64 / 1000.0,
            self.max_us as f64 / 1000.0,
            self.lifecycles,
            self.guest_submissions
        )
    }
}

/// `clients` concurrent API clients for `secs` seconds while two attached vGPUs run blits; with
/// `churn`, client 0 creates and deletes a vGPU in a loop instead of reading.
fn load(clients: usize, secs: f64, churn: bool) -> LoadReport {
    let env = Env::start(512);
    let base = env.capacity();
    let stop = Arc::new(AtomicBool::new(false));
    let submitted = Arc::new(AtomicU64::new(0));
    let mut guests = Vec::new();
    let mut ids = Vec::new();
    for i in 0..2u32 {
        let info = env.create("mini", &format!("busy{i}"));
        ids.push(info.id);
        let mut d = Driver::probe(Vmm::attach(&info.socket)).unwrap();
        let (stop, submitted) = (stop.clone(), submitted.clone());
        guests.push(std::thread::spawn(move || {
            let mut k = 0u32;
            while !stop.load(Ordering::Relaxed) {
                blit_work(&mut d, 0x100 + k, 128, 64).unwrap();
                submitted.fetch_add(1, Ordering::Relaxed);
                k += 1;
            }
        }));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = AsyncClient::new(Endpoint::Unix(env.socket.clone()));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    let results: Vec<(Vec<u64>, u64, u64)> = rt.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..clients {
            let client = client.clone();
            let ids = ids.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let (mut errors, mut lifecycles) = (0u64, 0u64);
                let mut k = c;
                while Instant::now() < deadline {
                    let id = ids[k % ids.len()];
                    let t = Instant::now();
                    let ok = if churn && c == 0 {
                        // Lifecycle churn: create, read, delete.
                        let body = b"{\"profile\":\"mini\",\"name\":\"churn\"}".to_vec();
                        let a = client
                            .request(Method::POST, "/api/v1/vgpus", Some(body))
                            .await;
                        let b = client
                            .request(Method::DELETE, "/api/v1/vgpus/churn", None)
                            .await;
                        lifecycles += 1;
                        matches!((a, b), (Ok(a), Ok(b)) if a.status == 201 && b.status == 204)
                    } else {
                        let (m, p, body): (Method, String, Option<&str>) = match k % 8 {
                            0 => (Method::GET, "/api/v1/vgpus".into(), None),
                            1 => (Method::GET, "/api/v1/stats".into(), None),
                            2 => (Method::GET, format!("/api/v1/vgpus/{id}/stats"), None),
                            3 => (Method::GET, "/metrics".into(), None),
                            4 => (Method::GET, "/api/v1/profiles".into(), None),
                            5 => (
                                Method::PUT,
                                format!("/api/v1/vgpus/{id}/sched"),
                                Some("{\"weight\":2}"),
                            ),
                            6 => (
                                Method::GET,
                                format!("/api/v1/vgpus/{id}/audit?limit=10"),
                                None,
                            ),
                            _ => (Method::GET, "/api/v1/gpu".into(), None),
                        };
                        let r = client
                            .request(m, &p, body.map(|b| b.as_bytes().to_vec()))
                            .await;
                        matches!(r, Ok(r) if r.status.is_success())
                    };
                    lat.push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
                    if !ok {
                        errors += 1;
                    }
                    k += 1;
                }
                (lat, errors, lifecycles)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for g in guests {
        g.join().unwrap();
    }
    let mut lat: Vec<u64> = results.iter().flat_map(|r| r.0.iter().copied()).collect();
    lat.sort_unstable();
    let pct = |q: f64| lat[((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1];
    let report = LoadReport {
        requests: lat.len() as u64,
        errors: results.iter().map(|r| r.1).sum(),
        lifecycles: results.iter().map(|r| r.2).sum(),
        guest_submissions: submitted.load(Ordering::Relaxed),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        max_us: *lat.last().unwrap(),
        per_s: lat.len() as f64 / elapsed,
    };
    // Guests detached: delete their vGPUs; nothing leaked by the churn either.
    for id in ids {
        let key = id.to_string();
        env.wait_connected(&key, false);
        env.client.delete(&key, false).unwrap();
    }
    assert_eq!(env.capacity(), base, "nothing leaked under load");
    report
}

#[test]
fn test_api_load_50_clients_2s_no_errors() {
    let r = load(50, 2.0, true);
    println!("API load, 50 clients, 2 s: {r}");
    assert_eq!(r.errors, 0, "{r:?}");
    assert!(
        r.requests > 50 && r.lifecycles > 0 && r.guest_submissions > 0,
        "{r:?}"
    );
}

/// The benchmark run recorded in docs/benchmarks.md:
/// `cargo test --release -p vgpu-integration-tests --test api -- --ignored --nocapture`.
#[test]
#[ignore = "10 s load run for docs/benchmarks.md"]
fn test_api_load_50_clients_10s_no_errors() {
    // Baseline in the same run: one client, the same request mix, no churn.
    let one = load(1, 5.0, false);
    println!("API load, 1 client, 5 s: {one}");
    let r = load(50, 10.0, true);
    println!("API load, 50 clients, 10 s: {r}");
    println!(
        "50 clients vs 1: throughput {:.2}x, p99 {:.1}x",
        r.per_s / one.per_s,
        r.p99_us as f64 / one.p99_us as f64
    );
    assert_eq!(one.errors + r.errors, 0, "{one:?} {r:?}");
}
