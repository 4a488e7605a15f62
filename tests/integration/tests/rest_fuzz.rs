//! REST request bodies are untrusted input. Every `POST`/`PUT` route of the live route table
//! (`vgpu_api::rest::routes()`, so new routes are covered without touching this file) gets
//! random JSON, random bytes, oversized bodies and mutations of valid bodies (fields dropped,
//! unknown fields added, values of the wrong type or out of range), over the unix socket, with
//! path parameters that exist or not. Invariants:
//!
//! - an answer always comes, within the client's timeout (no hang);
//! - never a 5xx, except 507 `capacity_exhausted` when a (still valid) creation does not fit;
//! - every error is a JSON `{code, message}` with both non-empty;
//! - after the case is cleaned up (migrations it started cancelled, vGPUs it created deleted),
//!   the daemon's capacity (local memory in use, available instances per profile) is exactly
//!   what it was before.
//!
//! File-system fields (`path`, `to`, `listen`) only ever get values inside the test's own
//! directory or harmless invalid ones: this runs as root in CI. `FUZZ_CASES` raises the number
//! of requests (`scripts/fuzz`).
#![allow(clippy::cast_possible_truncation)] // Test arithmetic on small known values.

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use support::*;
use vgpu_api::client::{Client, ClientError, Method};
use vgpu_api::daemon::Daemon;
use vgpu_api::model::{ErrorBody, MigrationInfo, VgpuInfo};
use vgpu_api::rest::{routes, ApiConfig, ApiHandle};
use vgpu_device::vgpu::GttMode;
use vgpu_integration_tests::{daemon, temp_path};

struct Env {
    daemon: Arc<Daemon>,
    api: Option<ApiHandle>,
    client: Client,
    dir: PathBuf,
    base: Vec<u32>,
    capacity: (u64, Vec<(String, u64)>),
}

/// Field names whose values reach the file system or the network.
const PATHY: &[&str] = &["path", "to", "listen"];

impl Env {
    fn start() -> Env {
        let daemon = Arc::new(daemon(512));
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = temp_path(&format!("rest-fuzz-{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let a = daemon.create(&spec("mini", GttMode::Shadow, "fz")).unwrap();
        let b = daemon
            .create(&spec("small", GttMode::TwoDim, "fz2"))
            .unwrap();
        let socket = dir.join("api.sock");
        let api = ApiHandle::spawn(daemon.clone(), &ApiConfig::unix(&socket)).unwrap();
        let client = Client::unix(&socket).unwrap().with_timeout(T);
        // A FIFO: restoring from it must neither hang nor read forever.
        let fifo = std::ffi::CString::new(dir.join("fifo").to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let mut env = Env {
            daemon,
            api: Some(api),
            client,
            dir,
            base: vec![a.id, b.id],
            capacity: (0, Vec::new()),
        };
        env.capacity = env.capacity();
        env
    }

    fn capacity(&self) -> (u64, Vec<(String, u64)>) {
        let gpu = self.client.gpu().expect("GET /api/v1/gpu");
        let profiles = self.client.profiles().expect("GET /api/v1/profiles");
        (
            gpu.lmem_used_bytes,
            profiles
                .into_iter()
                .map(|p| (p.name, p.available))
                .collect(),
        )
    }

    /// Strings for file-system and network fields: inside our directory, or harmless.
    fn safe_strings(&self) -> Vec<String> {
        let d = self.dir.display();
        vec![
            format!("{d}/snap.vgpu"),
            format!("{d}/snap.vgpu"),
            format!("{d}/missing/dir/x.vgpu"),
            format!("{d}/fifo"),
            format!("{d}"),
            format!("{d}/"),
            format!("unix:{d}/mig.sock"),
            format!("unix:{d}/none.sock"),
            "tcp:127.0.0.1:1".into(),
            "tcp:127.0.0.1:0".into(),
            "tcp:no-such-host.invalid:9".into(),
            "tcp:127.0.0.1:99999".into(),
            "unix:".into(),
            "unix:relative.sock".into(),
            "relative.vgpu".into(),
            "/".into(),
            String::new(),
            format!("{d}/\u{0}x"),
            "x".repeat(5000),
        ]
    }

    /// Valid bodies of a route, with safe strings in file-system fields.
    fn templates(&self, path: &str) -> Vec<Value> {
        let d = self.dir.display();
        if path == "/api/v1/vgpus" {
            vec![
                json!({"profile": "mini", "name": "fzx", "gtt": "two-dim",
                       "sched": {"weight": 2, "reserve_pct": 0, "cap_pct": 100}}),
                json!({"profile": "small"}),
            ]
        } else if path.ends_with("/sched") {
            vec![
                json!({"weight": 3}),
                json!({"engine": "blit", "reserve_pct": 10, "cap_pct": 50}),
            ]
        } else if path.starts_with("/api/v1/engines/") {
            vec![
                json!({"policy": "fixed-share"}),
                json!({"policy": "best-effort"}),
            ]
        } else if path.ends_with("/snapshot") {
            vec![json!({"path": format!("{d}/snap.vgpu")})]
        } else if path.ends_with("/restore") {
            vec![
                json!({"path": format!("{d}/snap.vgpu"), "name": "rst", "gtt": "shadow",
                        "paused": true}),
            ]
        } else if path.ends_with("/migrate") {
            vec![
                json!({"to": format!("unix:{d}/mig.sock"), "downtime_ms": 20,
                        "max_rounds": 2, "keep_source": true}),
            ]
        } else if path.ends_with("/incoming") {
            vec![
                json!({"listen": format!("unix:{d}/mig.sock"), "name": "inc",
                        "gtt": "shadow", "paused": true}),
            ]
        } else if path.ends_with("/dirty-log") {
            vec![json!({"enabled": true}), json!({"enabled": false})]
        } else {
            vec![json!({}), Value::Null]
        }
    }

    /// Replaces any string in a file-system field by a safe one.
    fn sanitize(&self, v: &mut Value) {
        let safe = self.safe_strings();
        if let Value::Object(m) = v {
            for k in PATHY {
                if let Some(Value::String(s)) = m.get_mut(*k) {
                    if !safe.contains(s) {
                        *s = safe[s.len() % safe.len()].clone();
                    }
                }
            }
        }
    }

    /// Ends whatever a case started: migrations cancelled, extra vGPUs deleted, base vGPUs
    /// resumed; then the capacity must be what it was.
    fn clean_up(&self) {
        wait_until(T, "migrations to end", || {
            let list: Vec<MigrationInfo> =
                serde_json::from_slice(&self.get_raw("/api/v1/migrations")).unwrap();
            let mut running = false;
            for m in list.iter().filter(|m| !m.state.is_finished()) {
                running = true;
                if !m.cancel_requested {
                    let _ = self.client.request(
                        Method::DELETE,
                        &format!("/api/v1/migrations/{}", m.id),
                        None,
                    );
                }
            }
            !running
        });
        let vgpus: Vec<VgpuInfo> = serde_json::from_slice(&self.get_raw("/api/v1/vgpus")).unwrap();
        for v in vgpus.iter().filter(|v| !self.base.contains(&v.id)) {
            let r = self
                .client
                .request(
                    Method::DELETE,
                    &format!("/api/v1/vgpus/{}?force=true", v.id),
                    None,
                )
                .expect("DELETE");
            assert_eq!(r.status.as_u16(), 204, "cleaning up vGPU {}", v.id);
        }
        for id in &self.base {
            let r = self
                .client
                .request(Method::POST, &format!("/api/v1/vgpus/{id}/resume"), None)
                .expect("resume");
            assert_eq!(r.status.as_u16(), 200);
        }
        let _ = std::fs::remove_file(self.dir.join("mig.sock"));
        assert_eq!(self.capacity(), self.capacity, "capacity changed");
    }

    fn get_raw(&self, path: &str) -> Vec<u8> {
        let r = self.client.request(Method::GET, path, None).expect(path);
        assert_eq!(r.status.as_u16(), 200, "GET {path}");
        r.body.to_vec()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(a) = self.api.take() {
            let _ = a.shutdown();
        }
        self.daemon.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Random JSON; object keys never spell a real field (those start lower-case).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,24}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[A-Z][a-z0-9_]{0,6}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A value to put into a field of a valid body.
fn field_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        Just(json!(true)),
        Just(json!(-1)),
        Just(json!(0)),
        Just(json!(1)),
        Just(json!(101)),
        Just(json!(u64::MAX)),
        Just(json!(1e300)),
        Just(json!(-0.5)),
        Just(json!("")),
        Just(json!("mini")),
        Just(json!("large")),
        Just(json!("two-dim")),
        Just(json!("blit")),
        Just(json!("equal-share")),
        Just(json!("fz")),
        Just(json!("a b/c")),
        Just(json!([])),
        Just(json!({})),
        Just(json!({"weight": 0})),
        (0usize..64).prop_map(|i| json!(format!("string{i}"))),
        json_value(),
    ]
}

#[derive(Clone, Debug)]
enum FieldMut {
    Remove(usize),
    Set(usize, Value),
    Unknown(String, Value),
}

#[derive(Clone, Debug)]
enum Body {
    Json(Value),
    Bytes(Vec<u8>),
    Mutated {
        template: usize,
        muts: Vec<FieldMut>,
    },
    Valid(usize),
    None,
    Huge(usize),
}

fn body() -> impl Strategy<Value = Body> {
    let fmut = prop_oneof![
        any::<usize>().prop_map(FieldMut::Remove),
        (any::<usize>(), field_value()).prop_map(|(i, v)| FieldMut::Set(i, v)),
        ("[a-z_]{1,10}", field_value()).prop_map(|(k, v)| FieldMut::Unknown(k, v)),
    ];
    prop_oneof![
        3 => json_value().prop_map(Body::Json),
        1 => prop::collection::vec(any::<u8>(), 0..128).prop_map(Body::Bytes),
        6 => (any::<usize>(), prop::collection::vec(fmut, 1..4))
            .prop_map(|(template, muts)| Body::Mutated { template, muts }),
        1 => any::<usize>().prop_map(Body::Valid),
        1 => Just(Body::None),
        1 => prop_oneof![Just(64 * 1024 + 1), Just(1 << 20)].prop_map(Body::Huge),
    ]
}

/// Path parameters: existing, missing and malformed.
fn param() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just("fz".to_string()),
        2 => Just("fz2".to_string()),
        1 => Just("0".to_string()),
        1 => Just("4294967296".to_string()),
        1 => Just("no-such-vgpu".to_string()),
        1 => Just("blit".to_string()),
        1 => Just("-1".to_string()),
        1 => Just("%25%00".to_string()),
        1 => "[a-z0-9]{60,80}",
    ]
}

impl Env {
    fn make_body(&self, path: &str, b: &Body) -> Option<Vec<u8>> {
        let valid = self.templates(path);
        let v = match b {
            Body::Json(v) => v.clone(),
            Body::Bytes(b) => return Some(b.clone()),
            Body::None => return None,
            Body::Huge(n) => return Some(vec![b' '; *n]),
            Body::Valid(i) => valid[i % valid.len()].clone(),
            Body::Mutated { template, muts } => {
                let mut v = valid[template % valid.len()].clone();
                for m in muts {
                    let Value::Object(o) = &mut v else { break };
                    let keys: Vec<String> = o.keys().cloned().collect();
                    match m {
                        FieldMut::Remove(i) if !keys.is_empty() => {
                            o.remove(&keys[i % keys.len()]);
                        }
                        FieldMut::Set(i, x) if !keys.is_empty() => {
                            o.insert(keys[i % keys.len()].clone(), x.clone());
                        }
                        FieldMut::Unknown(k, x) => {
                            o.insert(k.clone(), x.clone());
                        }
                        _ => {}
                    }
                }
                v
            }
        };
        let mut v = v;
        self.sanitize(&mut v);
        Some(serde_json::to_vec(&v).unwrap())
    }

    /// One request; checks the answer.
    fn hit(&self, method: &Method, path: &str, body: Option<Vec<u8>>) {
        let oversized = body.as_ref().is_some_and(|b| b.len() > 64 * 1024);
        let r = match self.client.request(method.clone(), path, body) {
            Ok(r) => r,
            // The client refuses to build some malformed URIs: nothing was sent.
            Err(ClientError::Request(_)) => return,
            // The daemon answers an oversized body with 413 as soon as it sees the length and
            // closes; a client still writing the body may see the reset instead of the answer.
            Err(ClientError::Http(_)) if oversized => return,
            Err(e) => panic!("{method} {path}: no answer: {e}"),
        };
        let status = r.status.as_u16();
        if (200..300).contains(&status) {
            return;
        }
        let e: ErrorBody = serde_json::from_slice(&r.body).unwrap_or_else(|_| {
            panic!(
                "{method} {path}: {status} without an error body: {:?}",
                String::from_utf8_lossy(&r.body)
            )
        });
        assert!(
            !e.code.is_empty() && !e.message.is_empty(),
            "{method} {path}: empty error"
        );
        let allowed_5xx = status == 507 && e.code == "capacity_exhausted";
        assert!(
            (400..500).contains(&status) || allowed_5xx,
            "{method} {path}: {status} {}: {}",
            e.code,
            e.message
        );
    }
}

#[test]
fn test_fuzz_rest_bodies_on_every_post_put_route_only_4xx_capacity_kept() {
    let env = Env::start();
    let targets: Vec<(Method, &'static str)> = routes()
        .into_iter()
        .filter(|r| r.method == Method::POST || r.method == Method::PUT)
        .map(|r| (r.method.clone(), r.path))
        .collect();
    assert!(targets.len() >= 8, "POST/PUT routes: {targets:?}");
    let strategy = (any::<prop::sample::Index>(), param(), body());
    run_prop("rest_body", cases(160), strategy, |(route, p, b)| {
        let (method, template) = route.get(&targets);
        let path = template
            .replace("{id}", &p)
            .replace("{engine}", if p == "fz" { "blit" } else { &p })
            .replace("{mid}", &p);
        let body = env.make_body(template, &b);
        env.hit(method, &path, body);
        env.clean_up();
    });
    // Every route once more with each of its valid bodies: they are accepted or refused for
    // a stated reason, and leave nothing behind.
    for (method, template) in &targets {
        for i in 0..env.templates(template).len() {
            let path = template
                .replace("{id}", "fz")
                .replace("{engine}", "blit")
                .replace("{mid}", "0");
            env.hit(method, &path, env.make_body(template, &Body::Valid(i)));
            env.clean_up();
        }
    }
}

/// Regression: restoring "from" a device or FIFO read it to `MAX_SNAPSHOT_BYTES` (4 GiB of
/// `/dev/zero`) or blocked forever on an open FIFO; both are refused at once now.
#[test]
fn test_restore_from_device_or_fifo_refused_quickly() {
    let env = Env::start();
    for path in [
        "/dev/zero".to_string(),
        format!("{}/fifo", env.dir.display()),
    ] {
        let t0 = std::time::Instant::now();
        let r = env
            .client
            .request(
                Method::POST,
                "/api/v1/vgpus/restore",
                Some(serde_json::to_vec(&json!({ "path": path })).unwrap()),
            )
            .expect("an answer");
        assert_eq!(
            r.status.as_u16(),
            422,
            "{path}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{path}: took {:?}",
            t0.elapsed()
        );
    }
    env.clean_up();
}
