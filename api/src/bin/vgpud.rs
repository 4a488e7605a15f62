//! `vgpud`: owns the software physical GPU and serves vGPUs to VMMs over vfio-user.
//!
//! ```sh
//! vgpud --vgpu profile=small,name=vm1 --vgpu profile=compute,gtt=two-dim
//! cloud-hypervisor ... --memory size=1G,shared=on --user-device socket=/run/vgpu/vm1.sock
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use vgpu_api::daemon::{Daemon, DaemonConfig, VgpuSpec};
use vgpu_device::phys::{profiles, PhysGpuConfig};
use vgpu_device::sched::SchedConfig;

/// Serve mediated vGPUs of a software GPU over vfio-user.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Create a vGPU at start: profile=NAME[,gtt=shadow|two-dim][,name=NAME][,weight=N]. Repeatable.
    #[arg(long = "vgpu", value_name = "SPEC")]
    vgpus: Vec<String>,
    /// Directory of the vfio-user sockets [default: $XDG_RUNTIME_DIR/vgpu, else /run/vgpu].
    #[arg(long)]
    socket_dir: Option<PathBuf>,
    /// Local memory of the software GPU in MiB (a sparse memfd; at most 4096).
    #[arg(long, default_value_t = 4096)]
    lmem_mib: u64,
    /// Most vGPUs at once.
    #[arg(long, default_value_t = 64)]
    max_vgpus: u32,
    /// Scheduler time slice in milliseconds (1-10).
    #[arg(long, default_value_t = 2)]
    slice_ms: u64,
    /// Watchdog limit in milliseconds: a context waiting longer is reset.
    #[arg(long, default_value_t = 2000)]
    watchdog_ms: u64,
    /// List the profiles and exit.
    #[arg(long)]
    list_profiles: bool,
}

fn default_socket_dir() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR").map_or_else(
        || PathBuf::from("/run/vgpu"),
        |d| PathBuf::from(d).join("vgpu"),
    )
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.list_profiles {
        for p in profiles() {
            println!("{:<8} {}", p.name, p.description);
        }
        return Ok(());
    }
    let specs: Vec<VgpuSpec> = args
        .vgpus
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let cfg = DaemonConfig {
        gpu: PhysGpuConfig {
            lmem_size: args.lmem_mib << 20,
            max_vgpus: args.max_vgpus,
        },
        sched: SchedConfig {
            slice: Duration::from_millis(args.slice_ms),
            watchdog: Duration::from_millis(args.watchdog_ms),
            ..Default::default()
        },
        socket_dir: args.socket_dir.unwrap_or_else(default_socket_dir),
    };
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("installing signal handlers")?;
    let daemon = Daemon::new(cfg).context("starting the software GPU")?;
    for spec in &specs {
        let info = daemon
            .create(spec)
            .with_context(|| format!("creating vGPU {spec:?}"))?;
        println!("{} {} {}", info.id, info.name, info.socket.display());
    }
    tracing::info!(dir = %daemon.socket_dir().display(), vgpus = specs.len(), "vgpud ready");
    if let Some(sig) = signals.forever().next() {
        tracing::info!(signal = sig, "shutting down");
    }
    daemon.shutdown();
    Ok(())
}
