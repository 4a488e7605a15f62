//! `vgpuctl`: the command line of vgpud's REST API.
//!
//! ```sh
//! vgpuctl profiles
//! SOCK=$(vgpuctl create --profile small --name vm1)   # prints the vfio-user socket
//! vgpuctl ls
//! vgpuctl top
//! vgpuctl display vm1 --out frame.png
//! vgpuctl snapshot vm1 /var/lib/vgpu/vm1.vgpu
//! vgpuctl restore /var/lib/vgpu/vm1.vgpu --name vm1
//! vgpuctl receive --listen tcp:0.0.0.0:7000 --name vm1     # on the destination
//! vgpuctl migrate vm1 --to tcp:dst:7000                    # on the source
//! vgpuctl rm vm1
//! ```

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser, Subcommand};
use clap_complete::Shell;
use indicatif::{ProgressBar, ProgressStyle};
use vgpu_api::client::{Client, Endpoint};
use vgpu_api::model::{
    AuditQuery, CreateVgpuRequest, EngineName, GttModeName, IncomingRequest, MigrateRequest,
    MigrationDirection, MigrationInfo, MigrationPhase, MigrationState, PolicyName, RestoreRequest,
    SchedParamsBody, SchedUpdate, TraceQuery, VgpuStats,
};
use vgpu_api::rest::default_socket;

/// Manage the vGPUs of a running vgpud.
#[derive(Parser, Debug)]
#[command(version, about, propagate_version = true)]
struct Cli {
    /// vgpud's API socket [default: $VGPUD_SOCKET, else $XDG_RUNTIME_DIR/vgpud.sock, else /run/vgpud.sock].
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Talk to vgpud over loopback TCP instead (needs --token-file).
    #[arg(long, global = true, value_name = "ADDR")]
    tcp: Option<SocketAddr>,
    /// File holding the bearer token for --tcp.
    #[arg(long, global = true, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List the vGPUs.
    #[command(alias = "list")]
    Ls,
    /// Create a vGPU; prints the vfio-user socket to give the VMM.
    Create {
        /// Profile (see `vgpuctl profiles`).
        #[arg(long, short)]
        profile: String,
        /// Name (letters, digits, '-', '_'); names the socket too.
        #[arg(long, short)]
        name: Option<String>,
        /// GTT mode.
        #[arg(long, value_parser = parse_gtt)]
        gtt: Option<GttModeName>,
        /// Scheduling weight 1-100 [default: the profile's].
        #[arg(long)]
        weight: Option<u32>,
        /// Reserved share in percent (fixed-share policy).
        #[arg(long)]
        reserve: Option<u32>,
        /// Cap in percent (fixed-share policy).
        #[arg(long)]
        cap: Option<u32>,
    },
    /// Delete vGPUs (refused while a VMM is attached unless --force).
    #[command(alias = "delete")]
    Rm {
        /// vGPU ids or names.
        #[arg(required = true)]
        vgpus: Vec<String>,
        /// Disconnect an attached VMM first.
        #[arg(long, short)]
        force: bool,
    },
    /// Show one vGPU: identity, scheduling and counters.
    Show {
        /// vGPU id or name.
        vgpu: String,
    },
    /// Change a vGPU's scheduling parameters (left-out values are kept).
    SetSched {
        /// vGPU id or name.
        vgpu: String,
        /// Only this engine [default: all of the vGPU's engines].
        #[arg(long, value_parser = parse_engine)]
        engine: Option<EngineName>,
        /// Weight 1-100.
        #[arg(long)]
        weight: Option<u32>,
        /// Reserve in percent.
        #[arg(long)]
        reserve: Option<u32>,
        /// Cap in percent.
        #[arg(long)]
        cap: Option<u32>,
    },
    /// Show the engines' scheduling policies, or set one.
    Policy {
        /// Engine to change.
        #[arg(value_parser = parse_engine, requires = "policy")]
        engine: Option<EngineName>,
        /// best-effort, equal-share or fixed-share.
        #[arg(value_parser = parse_policy)]
        policy: Option<PolicyName>,
    },
    /// Pause a vGPU (its work queues but does not run).
    Pause {
        /// vGPU id or name.
        vgpu: String,
    },
    /// Resume a paused vGPU.
    Resume {
        /// vGPU id or name.
        vgpu: String,
    },
    /// Full device reset of a vGPU (the VMM stays attached).
    Reset {
        /// vGPU id or name.
        vgpu: String,
    },
    /// Live per-engine utilisation of every vGPU.
    Top {
        /// Print one sample and exit.
        #[arg(long)]
        once: bool,
        /// Sampling interval in seconds.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
    /// Audit events of a vGPU (rejected and faulted commands).
    Audit {
        /// vGPU id or name.
        vgpu: String,
        /// Only events after this sequence number.
        #[arg(long)]
        after: Option<u64>,
        /// Most events.
        #[arg(long)]
        limit: Option<u32>,
        /// Only this engine.
        #[arg(long, value_parser = parse_engine)]
        engine: Option<EngineName>,
        /// Only this reason code (e.g. address_out_of_range).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Save a vGPU's display plane as PNG.
    Display {
        /// vGPU id or name.
        vgpu: String,
        /// Output file.
        #[arg(long, short, default_value = "frame.png")]
        out: PathBuf,
    },
    /// List the profiles and how many more of each fit.
    Profiles,
    /// Export the scheduler trace as JSON.
    Trace {
        /// Only this engine.
        #[arg(long, value_parser = parse_engine)]
        engine: Option<EngineName>,
        /// Only this vGPU id.
        #[arg(long)]
        vgpu: Option<u32>,
        /// Write to a file instead of standard output.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Print the Prometheus metrics.
    Metrics,
    /// Save a vGPU (device state and local memory) to a file that vgpud writes.
    Snapshot {
        /// vGPU id or name.
        vgpu: String,
        /// Snapshot file (made absolute against the current directory).
        path: PathBuf,
    },
    /// Create a vGPU from a snapshot file; prints its vfio-user socket.
    Restore {
        /// Snapshot file (made absolute against the current directory).
        path: PathBuf,
        /// Name of the new vGPU (use the snapshot's name so that the VMM finds the same socket).
        #[arg(long, short)]
        name: Option<String>,
        /// GTT mode [default: the snapshot's].
        #[arg(long, value_parser = parse_gtt)]
        gtt: Option<GttModeName>,
        /// Leave the vGPU's engines paused (`vgpuctl resume` once the VM is restored).
        #[arg(long)]
        paused: bool,
    },
    /// Live-migrate a vGPU to another vgpud (started there with `vgpuctl receive`).
    Migrate {
        /// vGPU id or name.
        vgpu: String,
        /// The destination: unix:/path or tcp:HOST:PORT.
        #[arg(long, value_name = "ENDPOINT")]
        to: String,
        /// Downtime target in milliseconds [default: 20].
        #[arg(long, value_name = "MS")]
        downtime_ms: Option<u64>,
        /// Most pre-copy rounds [default: 30].
        #[arg(long, value_name = "N")]
        max_rounds: Option<u32>,
        /// Keep the source vGPU (paused) after a successful migration.
        #[arg(long)]
        keep_source: bool,
        /// Print the migration id and return instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Receive one live migration into a new vGPU; waits for it and prints its socket.
    Receive {
        /// Where to listen: unix:/path or tcp:HOST:PORT.
        #[arg(long, value_name = "ENDPOINT")]
        listen: String,
        /// Name of the new vGPU (use the source's name so that the VMM finds the same socket).
        #[arg(long, short)]
        name: Option<String>,
        /// GTT mode [default: the source's].
        #[arg(long, value_parser = parse_gtt)]
        gtt: Option<GttModeName>,
        /// Leave the received vGPU's engines paused (`vgpuctl resume` once the VM is here).
        #[arg(long)]
        paused: bool,
        /// Print the migration id once listening and return instead of waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// List migrations (running and recent), or show one.
    Migrations {
        /// Migration id.
        id: Option<u64>,
    },
    /// Cancel a running migration (the source vGPU runs on).
    CancelMigration {
        /// Migration id.
        id: u64,
    },
    /// Print a shell completion script (e.g. `vgpuctl completions bash > /etc/bash_completion.d/vgpuctl`).
    Completions {
        /// Shell.
        shell: Shell,
    },
}

fn parse_engine(s: &str) -> Result<EngineName, String> {
    s.parse()
}

fn parse_gtt(s: &str) -> Result<GttModeName, String> {
    match s {
        "shadow" => Ok(GttModeName::Shadow),
        "two-dim" | "2d" => Ok(GttModeName::TwoDim),
        _ => Err(format!("unknown GTT mode '{s}' (shadow or two-dim)")),
    }
}

fn parse_policy(s: &str) -> Result<PolicyName, String> {
    match s {
        "best-effort" => Ok(PolicyName::BestEffort),
        "equal-share" => Ok(PolicyName::EqualShare),
        "fixed-share" => Ok(PolicyName::FixedShare),
        _ => Err(format!(
            "unknown policy '{s}' (best-effort, equal-share or fixed-share)"
        )),
    }
}

fn mib(b: u64) -> String {
    if b >= 1 << 30 && b.is_multiple_of(1 << 30) {
        format!("{} GiB", b >> 30)
    } else {
        format!("{} MiB", b >> 20)
    }
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn client(cli: &Cli) -> anyhow::Result<Client> {
    let ep = match (&cli.tcp, &cli.token_file) {
        (Some(addr), Some(f)) => {
            let token = std::fs::read_to_string(f)
                .with_context(|| format!("reading the token file {}", f.display()))?;
            Endpoint::Tcp {
                addr: *addr,
                token: token.trim().into(),
            }
        }
        (Some(_), None) => bail!("--tcp needs --token-file"),
        (None, _) => Endpoint::Unix(
            cli.socket
                .clone()
                .or_else(|| std::env::var_os("VGPUD_SOCKET").map(PathBuf::from))
                .unwrap_or_else(default_socket),
        ),
    };
    Ok(Client::new(ep)?)
}

/// One line of `top`.
struct TopRow {
    label: String,
    /// Busy percent per engine.
    engines: Vec<(EngineName, f64)>,
    cmds_per_s: f64,
}

/// Utilisation between two samples of cumulative counters.
fn rates(prev: &[VgpuStats], cur: &[VgpuStats], dt: f64) -> Vec<TopRow> {
    cur.iter()
        .map(|v| {
            let before = prev.iter().find(|p| p.id == v.id);
            let mut cmds = 0.0;
            let engines = v
                .engines
                .iter()
                .map(|e| {
                    let old = before.and_then(|p| p.engines.iter().find(|x| x.engine == e.engine));
                    let (busy0, cmd0) =
                        old.map_or((e.busy_ns, e.commands), |o| (o.busy_ns, o.commands));
                    cmds += e.commands.saturating_sub(cmd0) as f64 / dt;
                    let pct = e.busy_ns.saturating_sub(busy0) as f64 / (dt * 1e9) * 100.0;
                    (e.engine, pct.clamp(0.0, 100.0))
                })
                .collect();
            TopRow {
                label: format!("{:<4} {:<16}", v.id, v.name),
                engines,
                cmds_per_s: cmds,
            }
        })
        .collect()
}

fn top(c: &Client, once: bool, interval: f64) -> anyhow::Result<()> {
    if !(0.05..=3600.0).contains(&interval) {
        bail!("--interval must be between 0.05 and 3600 seconds");
    }
    let tty = std::io::stdout().is_terminal() && !once;
    let mut prev = c.all_stats()?;
    let mut t_prev = Instant::now();
    loop {
        std::thread::sleep(Duration::from_secs_f64(interval));
        let cur = c.all_stats()?;
        let now = Instant::now();
        let dt = now.duration_since(t_prev).as_secs_f64();
        let rows = rates(&prev, &cur, dt);
        let mut out = String::new();
        if tty {
            out.push_str("\x1b[H\x1b[2J");
        }
        out.push_str(&format!(
            "{:<4} {:<16} {:>7} {:>7} {:>7} {:>7} {:>10}\n",
            "ID", "NAME", "RENDER", "BLIT", "VIDEO", "COMPUTE", "CMDS/S"
        ));
        for TopRow {
            label,
            engines,
            cmds_per_s,
        } in &rows
        {
            let cell = |n: EngineName| {
                engines
                    .iter()
                    .find(|(e, _)| *e == n)
                    .map_or_else(|| "-".to_string(), |(_, p)| format!("{p:.1}%"))
            };
            out.push_str(&format!(
                "{label} {:>7} {:>7} {:>7} {:>7} {:>10.0}\n",
                cell(EngineName::Render),
                cell(EngineName::Blit),
                cell(EngineName::Video),
                cell(EngineName::Compute),
                cmds_per_s
            ));
        }
        if rows.is_empty() {
            out.push_str("(no vGPUs)\n");
        }
        let mut so = std::io::stdout().lock();
        so.write_all(out.as_bytes())?;
        so.flush()?;
        if once {
            return Ok(());
        }
        prev = cur;
        t_prev = now;
    }
}

/// Requests that may move gigabytes (snapshot files) get this long.
const LONG_REQUEST: Duration = Duration::from_secs(600);

/// How often a followed migration is polled.
const POLL: Duration = Duration::from_millis(100);

/// `path` made absolute against the current directory (vgpud does not share ours).
fn absolute(path: &Path) -> anyhow::Result<String> {
    let p = std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    p.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not valid UTF-8", p.display()))
}

fn human_bytes(b: u64) -> String {
    human_size(b as f64)
}

fn human_size(b: f64) -> String {
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

fn human_us(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{:.2} s", us as f64 / 1e6)
    } else if us >= 1000 {
        format!("{:.1} ms", us as f64 / 1e3)
    } else {
        format!("{us} us")
    }
}

/// Set on the first Ctrl-C (the caller then cancels and waits); a second one exits at once.
fn interrupted() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let _ = std::thread::Builder::new()
        .name("ctrl-c".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if tokio::signal::ctrl_c().await.is_ok() {
                    f.store(true, Ordering::Release);
                    eprintln!("\nvgpuctl: cancelling (Ctrl-C again to quit without waiting)");
                    if tokio::signal::ctrl_c().await.is_ok() {
                        std::process::exit(130);
                    }
                }
            });
        });
    flag
}

fn phase_text(phase: MigrationPhase, round: Option<u32>) -> String {
    match (phase, round) {
        (MigrationPhase::PreCopy, Some(r)) => format!("pre-copy round {r}"),
        (p, _) => p.to_string(),
    }
}

/// Polls migration `mid` until it ends, showing progress on a TTY (phase changes as lines
/// otherwise); Ctrl-C cancels it. Returns its final state.
fn follow(c: &Client, mid: u64) -> anyhow::Result<MigrationInfo> {
    let stop = interrupted();
    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] [{bar:30.cyan/blue}] {bytes}/{total_bytes} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut last_phase = String::new();
    let mut cancel_sent = false;
    loop {
        if stop.load(Ordering::Acquire) && !cancel_sent {
            match c.cancel_migration(mid) {
                Ok(_) => {}
                // Ended meanwhile: the final state tells how.
                Err(e) => bar.println(format!("vgpuctl: cancel: {e}")),
            }
            cancel_sent = true;
        }
        let m = c.migration(mid)?;
        let (phase, msg) = match (&m.progress, &m.received) {
            (Some(p), _) => {
                bar.set_length(p.total_estimate.max(p.bytes_sent));
                bar.set_position(p.bytes_sent);
                let rate = if p.bytes_per_sec > 0.0 {
                    format!("{}/s", human_size(p.bytes_per_sec))
                } else {
                    "-".into()
                };
                let predicted = p.predicted_downtime_us.map_or("-".into(), human_us);
                let phase = phase_text(p.phase, p.round);
                let msg = format!("{phase} | {rate} | predicted downtime {predicted}");
                (phase, msg)
            }
            (None, Some(r)) => {
                bar.set_length(r.pages_received * 4096);
                bar.set_position(r.pages_received * 4096);
                let phase = r.phase.to_string();
                (
                    phase.clone(),
                    format!("{phase} | {} pages", r.pages_received),
                )
            }
            (None, None) => {
                let s = m.state.to_string();
                (s.clone(), format!("{s} on {}", m.endpoint))
            }
        };
        bar.set_message(msg);
        if !tty && phase != last_phase {
            eprintln!("migration {mid}: {phase}");
        }
        last_phase = phase;
        if m.state.is_finished() {
            bar.finish_and_clear();
            return Ok(m);
        }
        std::thread::sleep(POLL);
    }
}

/// Prints how a finished migration went; an error unless it completed.
fn summarize(m: &MigrationInfo, json: bool) -> anyhow::Result<()> {
    if json {
        print_json(m)?;
    }
    if m.state != MigrationState::Completed {
        let (code, message) = m
            .error
            .as_ref()
            .map_or(("unknown", "no error recorded"), |e| {
                (e.code.as_str(), e.message.as_str())
            });
        let after = match m.direction {
            MigrationDirection::Outgoing => "; the source vGPU runs on",
            MigrationDirection::Incoming => "; nothing was kept here",
        };
        let after = if code == "handover_unconfirmed" {
            "; the source vGPU stays paused: check the destination, then delete or resume it"
        } else {
            after
        };
        bail!("migration {} {}: {message} ({code}){after}", m.id, m.state);
    }
    if json {
        return Ok(());
    }
    let vgpu = m.vgpu_name.clone().unwrap_or_else(|| "?".into());
    match (&m.report, &m.result) {
        (Some(r), _) => {
            println!(
                "migrated vGPU '{vgpu}' to {} in {}",
                m.endpoint,
                human_us(r.total_time_us)
            );
            println!(
                "  downtime   {} (predicted {}, target {})",
                human_us(r.downtime_us),
                human_us(r.predicted_downtime_us),
                human_us(r.downtime_target_us)
            );
            println!(
                "  rounds     {} pre-copy ({}), then stop-and-copy of {} pages",
                r.precopy_rounds,
                match r.stop_reason {
                    vgpu_api::model::StopReasonName::Converged => "converged",
                    vgpu_api::model::StopReasonName::RoundLimit => "round limit reached",
                    vgpu_api::model::StopReasonName::FloorAboveTarget =>
                        "scan and device state alone exceed the target",
                },
                r.final_pages
            );
            println!(
                "  sent       {} ({} pages, {} zero), device state {}",
                human_bytes(r.bytes_sent),
                r.pages_sent,
                r.zero_pages_sent,
                human_bytes(r.device_state_bytes)
            );
            println!(
                "  source     {}",
                if m.source_destroyed == Some(true) {
                    "destroyed"
                } else {
                    "kept (paused)"
                }
            );
        }
        (None, Some(v)) => {
            if let Some(r) = &m.destination_report {
                eprintln!(
                    "received vGPU {} '{}' ({}, {}) in {}: {} pages in {} rounds, {}{}",
                    v.id,
                    v.name,
                    v.profile,
                    v.gtt,
                    human_us(r.total_time_us),
                    r.pages,
                    r.rounds,
                    human_bytes(r.bytes_received),
                    if v.paused { "; engines paused" } else { "" }
                );
            }
            println!("{}", v.socket.display());
        }
        _ => {}
    }
    Ok(())
}

fn print_migrations(list: &[MigrationInfo]) {
    println!(
        "{:<4} {:<9} {:<10} {:<18} {:<28} DETAIL",
        "ID", "DIRECTION", "STATE", "VGPU", "ENDPOINT"
    );
    for m in list {
        let dir = match m.direction {
            MigrationDirection::Outgoing => "outgoing",
            MigrationDirection::Incoming => "incoming",
        };
        let vgpu = match (m.vgpu, &m.vgpu_name) {
            (Some(i), Some(n)) => format!("{i} {n}"),
            (Some(i), None) => i.to_string(),
            (None, Some(n)) => n.clone(),
            (None, None) => "-".into(),
        };
        let detail = if let Some(e) = &m.error {
            e.message.clone()
        } else if let Some(r) = &m.report {
            format!(
                "downtime {} (predicted {}), {} rounds, {}",
                human_us(r.downtime_us),
                human_us(r.predicted_downtime_us),
                r.precopy_rounds,
                human_bytes(r.bytes_sent)
            )
        } else if let Some(p) = &m.progress {
            format!(
                "{}, {} of ~{}",
                phase_text(p.phase, p.round),
                human_bytes(p.bytes_sent),
                human_bytes(p.total_estimate)
            )
        } else if let Some(r) = &m.received {
            format!("{}, {} pages", r.phase, r.pages_received)
        } else {
            String::new()
        };
        println!(
            "{:<4} {:<9} {:<10} {:<18} {:<28} {}",
            m.id,
            dir,
            m.state.to_string(),
            vgpu,
            m.endpoint,
            detail
        );
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Cmd::Completions { shell } = &cli.cmd {
        clap_complete::generate(
            *shell,
            &mut Cli::command(),
            "vgpuctl",
            &mut std::io::stdout(),
        );
        return Ok(());
    }
    let c = client(&cli)?;
    match cli.cmd {
        Cmd::Completions { .. } => unreachable!("handled above"),
        Cmd::Ls => {
            let list = c.list()?;
            if cli.json {
                return print_json(&list);
            }
            println!(
                "{:<4} {:<16} {:<8} {:<8} {:>8} {:<8} {:<6} SOCKET",
                "ID", "NAME", "PROFILE", "GTT", "LMEM", "ATTACHED", "PAUSED"
            );
            for v in list {
                println!(
                    "{:<4} {:<16} {:<8} {:<8} {:>8} {:<8} {:<6} {}",
                    v.id,
                    v.name,
                    v.profile,
                    v.gtt.to_string(),
                    mib(v.lmem_bytes),
                    if v.connected { "yes" } else { "no" },
                    if v.paused { "yes" } else { "no" },
                    v.socket.display()
                );
            }
        }
        Cmd::Create {
            profile,
            name,
            gtt,
            weight,
            reserve,
            cap,
        } => {
            let sched = (weight.is_some() || reserve.is_some() || cap.is_some()).then_some(
                SchedParamsBody {
                    weight,
                    reserve_pct: reserve,
                    cap_pct: cap,
                },
            );
            let v = c.create(&CreateVgpuRequest {
                profile,
                name,
                gtt,
                sched,
            })?;
            if cli.json {
                return print_json(&v);
            }
            eprintln!(
                "created vGPU {} '{}' ({}, {}); attach a VMM to:",
                v.id, v.name, v.profile, v.gtt
            );
            println!("{}", v.socket.display());
        }
        Cmd::Rm { vgpus, force } => {
            let mut failed = 0;
            for k in &vgpus {
                match c.delete(k, force) {
                    Ok(()) => eprintln!("deleted {k}"),
                    Err(e) => {
                        eprintln!("vgpuctl: cannot delete {k}: {e}");
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} of {} deletions failed", vgpus.len());
            }
        }
        Cmd::Show { vgpu } => {
            let info = c.vgpu(&vgpu)?;
            let key = info.id.to_string();
            let sched = c.sched(&key)?;
            let stats = c.stats(&key)?;
            if cli.json {
                return print_json(&serde_json::json!({
                    "vgpu": info, "sched": sched, "stats": stats
                }));
            }
            println!("id         {}", info.id);
            println!("name       {}", info.name);
            println!(
                "profile    {} ({} local memory)",
                info.profile,
                mib(info.lmem_bytes)
            );
            println!("gtt        {}", info.gtt);
            println!("socket     {}", info.socket.display());
            println!("attached   {}", info.connected);
            println!("paused     {}", info.paused);
            println!("audit      {} events", stats.audit_events);
            println!(
                "traps      {} (mean {:.1} us, p99 <= {} us)",
                stats.trap_latency.count,
                stats.trap_latency.mean_us,
                stats
                    .trap_latency
                    .p99_us
                    .map_or("-".into(), |v| format!("{v}"))
            );
            println!();
            println!(
                "{:<8} {:<12} {:>6} {:>7} {:>5} {:>7} {:>12} {:>14} {:>8} {:>6}",
                "ENGINE",
                "POLICY",
                "WEIGHT",
                "RESERVE",
                "CAP",
                "BUSY",
                "COMMANDS",
                "BYTES",
                "PREEMPT",
                "RESETS"
            );
            for e in &stats.engines {
                let s = sched.engines.iter().find(|x| x.engine == e.engine);
                println!(
                    "{:<8} {:<12} {:>6} {:>6}% {:>4}% {:>6.1}% {:>12} {:>14} {:>8} {:>6}",
                    e.engine.to_string(),
                    s.map_or("-".into(), |s| s.policy.to_string()),
                    s.map_or(0, |s| s.weight),
                    s.map_or(0, |s| s.reserve_pct),
                    s.map_or(0, |s| s.cap_pct),
                    e.busy_pct,
                    e.commands,
                    e.bytes,
                    e.preemptions,
                    e.resets
                );
            }
        }
        Cmd::SetSched {
            vgpu,
            engine,
            weight,
            reserve,
            cap,
        } => {
            if weight.is_none() && reserve.is_none() && cap.is_none() {
                bail!("nothing to set: give --weight, --reserve and/or --cap");
            }
            let s = c.set_sched(
                &vgpu,
                &SchedUpdate {
                    engine,
                    weight,
                    reserve_pct: reserve,
                    cap_pct: cap,
                },
            )?;
            if cli.json {
                return print_json(&s);
            }
            for e in s.engines {
                println!(
                    "{:<8} weight {:>3}  reserve {:>3}%  cap {:>3}%  ({})",
                    e.engine.to_string(),
                    e.weight,
                    e.reserve_pct,
                    e.cap_pct,
                    e.policy
                );
            }
        }
        Cmd::Policy { engine, policy } => {
            let list = match (engine, policy) {
                (Some(e), Some(p)) => vec![c.set_policy(e, p)?],
                _ => c.engines()?,
            };
            if cli.json {
                return print_json(&list);
            }
            println!("{:<8} {:<12} VGPUS", "ENGINE", "POLICY");
            for e in list {
                println!(
                    "{:<8} {:<12} {}",
                    e.engine.to_string(),
                    e.policy.to_string(),
                    e.vgpus
                );
            }
        }
        Cmd::Pause { vgpu } => {
            let v = c.pause(&vgpu)?;
            eprintln!("vGPU {} '{}' paused", v.id, v.name);
        }
        Cmd::Resume { vgpu } => {
            let v = c.resume(&vgpu)?;
            eprintln!("vGPU {} '{}' resumed", v.id, v.name);
        }
        Cmd::Reset { vgpu } => {
            let v = c.reset(&vgpu)?;
            eprintln!("vGPU {} '{}' reset", v.id, v.name);
        }
        Cmd::Top { once, interval } => top(&c, once, interval)?,
        Cmd::Audit {
            vgpu,
            after,
            limit,
            engine,
            reason,
        } => {
            let page = c.audit(
                &vgpu,
                &AuditQuery {
                    after,
                    limit,
                    engine,
                    reason,
                },
            )?;
            if cli.json {
                return print_json(&page);
            }
            println!(
                "{:>6} {:<8} {:<24} {:>18} {:>10}  DETAIL",
                "SEQ", "ENGINE", "REASON", "ADDR", "HEADER"
            );
            for e in &page.events {
                println!(
                    "{:>6} {:<8} {:<24} {:>#18x} {:>#10x}  {}",
                    e.seq,
                    e.engine.to_string(),
                    e.reason,
                    e.addr,
                    e.header,
                    e.detail
                );
            }
            eprintln!(
                "{} shown, {} recorded in total; next page: --after {}",
                page.events.len(),
                page.total,
                page.next_after
            );
        }
        Cmd::Display { vgpu, out } => {
            let png = c.display(&vgpu)?;
            std::fs::write(&out, &png).with_context(|| format!("writing {}", out.display()))?;
            eprintln!("wrote {} ({} bytes)", out.display(), png.len());
        }
        Cmd::Profiles => {
            let list = c.profiles()?;
            if cli.json {
                return print_json(&list);
            }
            println!(
                "{:<8} {:>8} {:>10} {:>6} {:>10} {:>9}  ENGINES",
                "PROFILE", "LMEM", "HIDDEN GM", "WEIGHT", "MAX RES", "AVAILABLE"
            );
            for p in list {
                let engines: Vec<String> = p.engines.iter().map(ToString::to_string).collect();
                println!(
                    "{:<8} {:>8} {:>10} {:>6} {:>10} {:>9}  {}",
                    p.name,
                    mib(p.lmem_bytes),
                    mib(p.hidden_gm_bytes),
                    p.default_weight,
                    format!("{}x{}", p.max_width, p.max_height),
                    p.available,
                    engines.join(",")
                );
            }
        }
        Cmd::Trace { engine, vgpu, out } => {
            let t = c.trace(&TraceQuery { engine, vgpu })?;
            let text = serde_json::to_string_pretty(&t)?;
            match out {
                Some(p) => {
                    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
                    eprintln!("wrote {} slices to {}", t.events.len(), p.display());
                }
                None => println!("{text}"),
            }
        }
        Cmd::Metrics => print!("{}", c.metrics()?),
        Cmd::Snapshot { vgpu, path } => {
            let path = absolute(&path)?;
            let s = c.with_timeout(LONG_REQUEST).snapshot(&vgpu, &path)?;
            if cli.json {
                return print_json(&s);
            }
            eprintln!(
                "wrote {} ({}; engines paused {})",
                s.path.display(),
                human_bytes(s.bytes),
                human_us(s.paused_us)
            );
        }
        Cmd::Restore {
            path,
            name,
            gtt,
            paused,
        } => {
            let path = absolute(&path)?;
            let v = c.with_timeout(LONG_REQUEST).restore(&RestoreRequest {
                path,
                name,
                gtt,
                paused: paused.then_some(true),
            })?;
            if cli.json {
                return print_json(&v);
            }
            eprintln!(
                "restored vGPU {} '{}' ({}, {}){}; attach a VMM to:",
                v.id,
                v.name,
                v.profile,
                v.gtt,
                if v.paused { ", engines paused" } else { "" }
            );
            println!("{}", v.socket.display());
        }
        Cmd::Migrate {
            vgpu,
            to,
            downtime_ms,
            max_rounds,
            keep_source,
            no_wait,
        } => {
            let m = c.migrate(
                &vgpu,
                &MigrateRequest {
                    to,
                    downtime_ms,
                    max_rounds,
                    keep_source: keep_source.then_some(true),
                },
            )?;
            if no_wait {
                if cli.json {
                    return print_json(&m);
                }
                println!("{}", m.id);
                return Ok(());
            }
            eprintln!(
                "migration {}: vGPU '{}' to {}",
                m.id,
                m.vgpu_name.as_deref().unwrap_or(&vgpu),
                m.endpoint
            );
            let m = follow(&c, m.id)?;
            summarize(&m, cli.json)?;
        }
        Cmd::Receive {
            listen,
            name,
            gtt,
            paused,
            no_wait,
        } => {
            let m = c.incoming(&IncomingRequest {
                listen,
                name,
                gtt,
                paused: paused.then_some(true),
            })?;
            if no_wait {
                if cli.json {
                    return print_json(&m);
                }
                eprintln!("migration {}: listening on {}", m.id, m.endpoint);
                println!("{}", m.id);
                return Ok(());
            }
            eprintln!("migration {}: listening on {}", m.id, m.endpoint);
            let m = follow(&c, m.id)?;
            summarize(&m, cli.json)?;
        }
        Cmd::Migrations { id } => {
            let list = match id {
                Some(id) => vec![c.migration(id)?],
                None => c.migrations()?,
            };
            if cli.json || id.is_some() {
                return match id {
                    Some(_) => print_json(&list[0]),
                    None => print_json(&list),
                };
            }
            print_migrations(&list);
        }
        Cmd::CancelMigration { id } => {
            c.cancel_migration(id)?;
            let m = follow(&c, id)?;
            eprintln!("migration {id} {}", m.state);
        }
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("vgpuctl: {e:#}");
        std::process::exit(1);
    }
}
