//! `vgpud`: owns the software physical GPU, serves vGPUs to VMMs over vfio-user, and the REST
//! API that creates and manages them.
//!
//! ```sh
//! vgpud                                   # API on $XDG_RUNTIME_DIR/vgpud.sock (else /run/vgpud.sock)
//! vgpuctl create --profile small --name vm1
//! cloud-hypervisor ... --memory size=1G,shared=on --user-device socket=/run/vgpu/vm1.sock
//! ```

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use vgpu_api::daemon::{Daemon, DaemonConfig, VgpuSpec};
use vgpu_api::rest::{default_socket, ApiConfig, ApiServer};
use vgpu_device::phys::{profiles, PhysGpuConfig};
use vgpu_device::sched::SchedConfig;

/// Serve mediated vGPUs of a software GPU over vfio-user, managed through a REST API.
// The field docs are clap's help text, where `[...]` means optional, not a link.
#[allow(rustdoc::broken_intra_doc_links)]
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Create a vGPU at start: profile=NAME[,gtt=shadow|two-dim][,name=NAME][,weight=N]. Repeatable.
    #[arg(long = "vgpu", value_name = "SPEC")]
    vgpus: Vec<String>,
    /// Directory of the vfio-user sockets [default: $XDG_RUNTIME_DIR/vgpu, else /run/vgpu].
    #[arg(long)]
    socket_dir: Option<PathBuf>,
    /// The REST API's unix socket (mode 0600) [default: $XDG_RUNTIME_DIR/vgpud.sock, else /run/vgpud.sock].
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Also serve the API on this loopback TCP address (e.g. 127.0.0.1:8470); needs --api-token-file.
    #[arg(long, value_name = "ADDR")]
    api_tcp: Option<SocketAddr>,
    /// File holding the bearer token TCP clients must send (Authorization: Bearer TOKEN).
    #[arg(long, value_name = "PATH")]
    api_token_file: Option<PathBuf>,
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

fn read_token(path: &PathBuf) -> anyhow::Result<String> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(file = %path.display(), "the token file is readable by group or others (chmod 600 it)");
    }
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    let token = token.trim().to_string();
    if token.len() < 16 {
        bail!(
            "the token in {} is shorter than 16 characters",
            path.display()
        );
    }
    Ok(token)
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
    let token = match (&args.api_tcp, &args.api_token_file) {
        (Some(_), None) => {
            bail!("--api-tcp needs --api-token-file (TCP clients must authenticate)")
        }
        (_, Some(f)) => Some(read_token(f)?),
        (None, None) => None,
    };
    let api = ApiConfig {
        socket: args.api_socket.clone().unwrap_or_else(default_socket),
        tcp: args.api_tcp,
        token,
        sample_period: Duration::from_secs(1),
    };
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
    let daemon = Arc::new(Daemon::new(cfg).context("starting the software GPU")?);
    for spec in &specs {
        let info = daemon
            .create(spec)
            .with_context(|| format!("creating vGPU {spec:?}"))?;
        println!("{} {} {}", info.id, info.name, info.socket.display());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("vgpud-api")
        .enable_all()
        .build()
        .context("starting the API runtime")?;
    rt.block_on(async {
        let server = ApiServer::bind(daemon.clone(), &api).context("starting the API")?;
        tracing::info!(
            dir = %daemon.socket_dir().display(),
            api = %server.socket().display(),
            vgpus = specs.len(),
            "vgpud ready"
        );
        server
            .serve(async {
                use tokio::signal::unix::{signal, SignalKind};
                match (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) {
                    (Ok(mut term), Ok(mut int)) => {
                        tokio::select! {
                            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
                        }
                    }
                    _ => {
                        tracing::error!("cannot install signal handlers; stop with SIGKILL");
                        std::future::pending::<()>().await;
                    }
                }
            })
            .await
            .context("serving the API")
    })?;
    daemon.shutdown();
    Ok(())
}
