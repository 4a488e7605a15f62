//! The `vgpuctl` binary against an in-process vgpud (daemon + REST API on a unix socket in a
//! temporary directory), and the API's TCP listener with its bearer token.
#![allow(clippy::cast_possible_truncation)] // Test arithmetic on small known values.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use common::{temp_dir, vgpuctl, vgpuctl_ok};
use vgpu_abi::cmd::enc;
use vgpu_abi::{regs, Engine};
use vgpu_api::client::{Client, ClientError, Endpoint};
use vgpu_api::daemon::{Daemon, DaemonConfig};
use vgpu_api::rest::{ApiConfig, ApiHandle, ApiServer, ServeError};
use vgpu_device::driver::{Driver, Locked};
use vgpu_device::phys::PhysGpuConfig;
use vgpu_device::sched::SchedConfig;

struct Env {
    daemon: Arc<Daemon>,
    api: Option<ApiHandle>,
    dir: PathBuf,
}

impl Env {
    fn new(cfg: impl FnOnce(&Path) -> ApiConfig) -> Env {
        let dir = temp_dir("env");
        let daemon = Arc::new(
            Daemon::new(DaemonConfig {
                gpu: PhysGpuConfig {
                    lmem_size: 256 << 20,
                    max_vgpus: 16,
                },
                sched: SchedConfig::default(),
                socket_dir: dir.join("s"),
            })
            .unwrap(),
        );
        let api = ApiHandle::spawn(daemon.clone(), &cfg(&dir)).unwrap();
        Env {
            daemon,
            api: Some(api),
            dir,
        }
    }

    fn unix() -> Env {
        Env::new(|d| ApiConfig::unix(d.join("api.sock")))
    }

    fn socket(&self) -> &Path {
        self.api.as_ref().unwrap().socket()
    }

    fn ctl(&self, args: &[&str]) -> Output {
        vgpuctl(self.socket(), &self.dir, args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        vgpuctl_ok(self.socket(), &self.dir, args).0
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
fn test_vgpuctl_display_writes_png_of_guest_frame() {
    let env = Env::unix();
    let socket = env.ok(&["create", "--profile", "mini", "--name", "disp"]);
    assert!(socket.trim().ends_with("disp.sock"), "{socket}");
    let id = env.daemon.resolve("disp").unwrap();
    // Nothing shown yet: a clear 409.
    let o = env.ctl(&["display", "disp", "--out", "/dev/null"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("Display plane disabled") && err.contains("409"),
        "{err}"
    );
    // The guest draws a 64x48 frame: dark background, one red and one blue rectangle, then
    // programs the plane and flips to it.
    let (w, h) = (64u32, 48u32);
    {
        let mut d = Driver::probe(Locked(env.daemon.vgpu(id).unwrap())).unwrap();
        let fb = d.gm_of_lmem(0);
        let cmds = [
            enc::surface_state(fb, w * 4, w, h, regs::PLANE_FORMAT_XRGB8888).to_vec(),
            enc::fill_rect(0, 0, w, h, 0xff10_2030, false).to_vec(),
            enc::fill_rect(4, 4, 8, 8, 0xffff_0000, false).to_vec(),
            enc::fill_rect(40, 30, 10, 10, 0xff00_00ff, false).to_vec(),
        ]
        .concat();
        d.submit(Engine::Render, &cmds).unwrap();
        d.wait_idle(Engine::Render, Duration::from_secs(10))
            .unwrap();
        d.write32(regs::PLANE_FORMAT, regs::PLANE_FORMAT_XRGB8888);
        d.write32(regs::PLANE_WIDTH, w);
        d.write32(regs::PLANE_HEIGHT, h);
        d.write32(regs::PLANE_STRIDE, w * 4);
        d.write32(regs::PLANE_SURF_HI, (fb >> 32) as u32);
        d.write32(regs::PLANE_SURF_LO, fb as u32);
        d.write32(regs::PLANE_CTL, regs::PLANE_CTL_ENABLE);
    }
    let out = env.dir.join("frame.png");
    env.ok(&["display", "disp", "--out", out.to_str().unwrap()]);
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&out).unwrap()));
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (w, h));
    assert_eq!(info.color_type, png::ColorType::Rgba);
    let px = |x: u32, y: u32| {
        let i = ((y * w + x) * 4) as usize;
        [buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]
    };
    assert_eq!(px(0, 0), [0x10, 0x20, 0x30, 0xff], "background");
    assert_eq!(px(63, 47), [0x10, 0x20, 0x30, 0xff], "background corner");
    assert_eq!(px(4, 4), [0xff, 0, 0, 0xff], "red square");
    assert_eq!(px(11, 11), [0xff, 0, 0, 0xff], "red square corner");
    assert_eq!(px(12, 12), [0x10, 0x20, 0x30, 0xff], "just outside red");
    assert_eq!(px(45, 35), [0, 0, 0xff, 0xff], "blue square");
    env.ok(&["rm", "disp"]);
}

#[test]
fn test_vgpuctl_commands_list_show_schedule_and_remove() {
    let env = Env::unix();
    let sock = env.ok(&[
        "create", "-p", "mini", "-n", "a", "--gtt", "two-dim", "--weight", "5",
    ]);
    assert!(sock.trim().ends_with("a.sock"));
    let ls = env.ok(&["ls"]);
    assert!(
        ls.contains("a ") && ls.contains("two-dim") && ls.contains("16 MiB"),
        "{ls}"
    );
    let json: serde_json::Value = serde_json::from_str(&env.ok(&["--json", "ls"])).unwrap();
    assert_eq!(json[0]["name"], "a");
    let profiles = env.ok(&["profiles"]);
    assert!(
        profiles.contains("mini") && profiles.contains("AVAILABLE"),
        "{profiles}"
    );
    let set = env.ok(&[
        "set-sched",
        "a",
        "--engine",
        "blit",
        "--reserve",
        "20",
        "--cap",
        "50",
    ]);
    assert!(
        set.contains("reserve  20%") && set.contains("cap  50%"),
        "{set}"
    );
    let show = env.ok(&["show", "a"]);
    assert!(show.contains("two-dim") && show.contains("blit"), "{show}");
    let pol = env.ok(&["policy", "blit", "fixed-share"]);
    assert!(pol.contains("fixed-share"), "{pol}");
    let top = env.ok(&["top", "--once", "--interval", "0.1"]);
    assert!(
        top.contains("RENDER") && top.lines().any(|l| l.contains(" a ")),
        "{top}"
    );
    let audit = env.ok(&["audit", "a"]);
    assert!(audit.contains("SEQ"), "{audit}");
    let trace: serde_json::Value = serde_json::from_str(&env.ok(&["trace"])).unwrap();
    assert!(trace["events"].is_array());
    assert!(env
        .ok(&["metrics"])
        .contains("vgpu_engine_commands_total{vgpu="));
    env.ok(&["pause", "a"]);
    assert!(env.ok(&["ls"]).contains("yes"), "paused shows");
    env.ok(&["resume", "a"]);
    env.ok(&["reset", "a"]);
    // Errors: clear message, non-zero exit.
    let o = env.ctl(&["set-sched", "a", "--weight", "0"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Weight 0"),
        "{o:?}"
    );
    let o = env.ctl(&["rm", "nope"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("No vGPU named 'nope'"));
    env.ok(&["rm", "a"]);
    assert_eq!(env.daemon.list().len(), 0);
    let comp = env.ok(&["completions", "bash"]);
    assert!(comp.contains("_vgpuctl()"), "bash completion function");
}

#[test]
fn test_vgpuctl_without_daemon_explains_how_to_start_it() {
    let o = Command::new(env!("CARGO_BIN_EXE_vgpuctl"))
        .args(["--socket", "/nonexistent/dir/vgpud.sock", "ls"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("vgpud is not running (no socket at /nonexistent/dir/vgpud.sock)")
            && err.contains("start it with"),
        "{err}"
    );
}

#[test]
fn test_api_tcp_requires_bearer_token_and_loopback() {
    let token = "0123456789abcdef-test-token";
    let env = Env::new(|d| ApiConfig {
        tcp: Some("127.0.0.1:0".parse().unwrap()),
        token: Some(token.into()),
        ..ApiConfig::unix(d.join("api.sock"))
    });
    let addr = env.api.as_ref().unwrap().tcp_addr().unwrap();
    let good = Client::new(Endpoint::Tcp {
        addr,
        token: token.into(),
    })
    .unwrap();
    assert_eq!(good.gpu().unwrap().vgpus, 0);
    let bad = Client::new(Endpoint::Tcp {
        addr,
        token: "wrong-token-wrong-token".into(),
    })
    .unwrap();
    match bad.gpu() {
        Err(ClientError::Api {
            status: 401, code, ..
        }) => assert_eq!(code, "unauthorized"),
        other => panic!("expected 401, got {other:?}"),
    }
    // The unix socket needs no token.
    assert!(Client::unix(env.socket()).unwrap().gpu().is_ok());
    // Refusals at start.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = temp_dir("refuse");
    rt.block_on(async {
        let cfg = ApiConfig {
            tcp: Some("0.0.0.0:0".parse().unwrap()),
            token: Some(token.into()),
            ..ApiConfig::unix(dir.join("a.sock"))
        };
        let e = ApiServer::bind(env.daemon.clone(), &cfg).err().unwrap();
        assert!(matches!(e, ServeError::NotLoopback(_)), "{e}");
        let cfg = ApiConfig {
            tcp: Some("127.0.0.1:0".parse().unwrap()),
            token: None,
            ..ApiConfig::unix(dir.join("b.sock"))
        };
        let e = ApiServer::bind(env.daemon.clone(), &cfg).err().unwrap();
        assert!(matches!(e, ServeError::TokenRequired), "{e}");
        // A live socket is not taken over.
        let e = ApiServer::bind(env.daemon.clone(), &ApiConfig::unix(env.socket()))
            .err()
            .unwrap();
        assert!(matches!(e, ServeError::InUse(_)), "{e}");
    });
    let _ = std::fs::remove_dir_all(&dir);
    // The socket is private to its owner.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(env.socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}
