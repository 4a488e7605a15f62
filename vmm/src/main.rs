//! `vgpu-vmm`: runs the bare-metal guest driver in a KVM VM with vGPUs, in-process or from
//! vgpud. Exits 0 only when the guest reports that it passed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vgpu_vmm::config::GuestMode;
use vgpu_vmm::{VgpuAttach, VmConfig};

/// Run a VM whose guest program drives vGPUs and checks their results.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// A vGPU: `profile=NAME[,gtt=shadow|two-dim]` (embedded in this process) or
    /// `socket=PATH` (served by vgpud over vfio-user). Repeat for several vGPUs.
    #[arg(long = "vgpu", value_name = "SPEC")]
    vgpus: Vec<VgpuAttach>,
    /// Guest ELF image (default: the built-in guest driver).
    #[arg(long, value_name = "PATH")]
    guest: Option<PathBuf>,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 64)]
    memory_mib: u64,
    /// Fail if the guest has not reported after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
    /// Make the guest submit command streams the vGPU must reject (it passes if they are).
    #[arg(long, conflicts_with = "bench")]
    malicious: bool,
    /// Time MMIO accesses instead of running the workload: this many per series.
    #[arg(long, value_name = "N")]
    bench: Option<u32>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mode = match (args.malicious, args.bench) {
        (true, _) => GuestMode::Malicious,
        (false, Some(n)) => GuestMode::Bench(n),
        (false, None) => GuestMode::Workload,
    };
    let cfg = VmConfig {
        name: "guest".into(),
        memory_mib: args.memory_mib,
        vgpus: args.vgpus,
        guest: args.guest,
        mode,
        timeout: Duration::from_secs(args.timeout_s),
        echo_console: true,
    };
    match vgpu_vmm::run(&cfg) {
        Ok(o) => {
            eprintln!(
                "vgpu-vmm: guest {:?} after {:.3} s ({} PIO, {} MMIO, {} unhandled MMIO exits)",
                o.status,
                o.elapsed.as_secs_f64(),
                o.exits.pio,
                o.exits.mmio,
                o.exits.unhandled_mmio
            );
            if o.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            let mut msg = format!("vgpu-vmm: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("{msg}");
            ExitCode::from(2)
        }
    }
}
