//! `vgpuctl`: the command line of vgpud's REST API.
//!
//! ```sh
//! vgpuctl profiles
//! SOCK=$(vgpuctl create --profile small --name vm1)   # prints the vfio-user socket
//! vgpuctl ls
//! vgpuctl top
//! vgpuctl display vm1 --out frame.png
//! vgpuctl rm vm1
//! ```

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser, Subcommand};
use clap_complete::Shell;
use vgpu_api::client::{Client, Endpoint};
use vgpu_api::model::{
    AuditQuery, CreateVgpuRequest, EngineName, GttModeName, PolicyName, SchedParamsBody,
    SchedUpdate, TraceQuery, VgpuStats,
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
