//! `vgpu-bench`: the collecting half of `scripts/bench`. The script runs every benchmark of the
//! project, each writing its own JSON (or, for the API load test, a log) into a raw directory,
//! and records one line per run in `runs.tsv`; this program then
//!
//! - `report`: reads them all and writes `results.json` (every bench's data plus a list of
//!   headline figures, each a ratio measured side by side with its baseline in the same run,
//!   with its target or published anchor and a verdict), `results.md` (the same as tables) and
//!   SVG plots (no fonts needed: text is left to the SVG viewer);
//! - `check FILE`: parses a `results.json` and checks its shape (used by the script and CI).
//!
//! ```sh
//! vgpu-bench report --raw DIR --out DIR --mode quick|full --command 'scripts/bench ...'
//! vgpu-bench check DIR/results.json
//! ```

mod figures;
mod markdown;
mod plots;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::{json, Map, Value};

/// One bench run as `scripts/bench` recorded it.
#[derive(Clone, Debug)]
pub struct Run {
    /// Bench name (`engines`, `vfio_user`, ...).
    pub name: String,
    /// `ok`, `failed`, `skipped`, `absent` or `timeout`.
    pub status: String,
    /// Wall-clock seconds of the run.
    pub seconds: f64,
    /// 1-minute load average before and after.
    pub load_before: f64,
    /// 1-minute load average after.
    pub load_after: f64,
    /// Why it was skipped, or what ran.
    pub note: String,
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: vgpu-bench report --raw DIR --out DIR --mode quick|full [--command TEXT]\n       \
         vgpu-bench check FILE"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("report") => {
            let mut raw = None;
            let mut out = None;
            let mut mode = "full".to_string();
            let mut command = String::new();
            let mut it = args.iter().skip(1);
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--raw" => raw = it.next().map(PathBuf::from),
                    "--out" => out = it.next().map(PathBuf::from),
                    "--mode" => mode = it.next().cloned().unwrap_or_default(),
                    "--command" => command = it.next().cloned().unwrap_or_default(),
                    _ => return usage(),
                }
            }
            let (Some(raw), Some(out)) = (raw, out) else {
                return usage();
            };
            match report(&raw, &out, &mode, &command) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vgpu-bench report: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some("check") => {
            let Some(file) = args.get(1) else {
                return usage();
            };
            match check(Path::new(file)) {
                Ok(n) => {
                    println!("{file}: valid JSON, {n} figures");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{file}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => usage(),
    }
}

/// Reads `runs.tsv`: name, status, seconds, load before, load after, note.
fn read_runs(raw: &Path) -> Result<Vec<Run>, String> {
    let path = raw.join("runs.tsv");
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
    let num = |s: Option<&str>| s.and_then(|x| x.trim().parse::<f64>().ok()).unwrap_or(0.0);
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut f = l.split('\t');
            Run {
                name: f.next().unwrap_or_default().to_string(),
                status: f.next().unwrap_or_default().to_string(),
                seconds: num(f.next()),
                load_before: num(f.next()),
                load_after: num(f.next()),
                note: f.next().unwrap_or_default().to_string(),
            }
        })
        .collect())
}

/// The output of a command, trimmed; empty on failure.
fn output_of(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// What the machine is.
fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .map_or(String::new(), |s| s.trim().to_string())
    };
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|x| x.parse::<u64>().ok())
        .unwrap_or(0);
    let l3 = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cache/index3/size")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map_or(0, std::num::NonZeroUsize::get),
        "cpu_model": field("model name"),
        "cpu_family": field("cpu family"),
        "cpu_model_number": field("model\t"),
        "l3": l3,
        "mem_kib": mem_kib,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        "rustc": output_of("rustc", &["-V"]),
        "kvm": Path::new("/dev/kvm").exists(),
    })
}

/// The commit and whether the working tree had changes (read-only git queries).
fn source() -> Value {
    let commit = output_of("git", &["rev-parse", "--short", "HEAD"]);
    let changed = output_of("git", &["status", "--porcelain", "--untracked-files=no"])
        .lines()
        .count();
    json!({ "commit": commit, "changed_tracked_files": changed })
}

/// Parses one line of the API load test: `API load, 50 clients, 10 s: 91670 requests (9167/s),
/// 0 errors, latency p50 4.90 ms, p99 14.10 ms, max 44.20 ms; 832 create+delete cycles; 44042
/// guest blit submissions meanwhile`.
fn parse_api_line(line: &str) -> Option<Value> {
    let (head, rest) = line.split_once(": ")?;
    let clients: u64 = head
        .split(", ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let secs: f64 = head
        .split(", ")
        .nth(2)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let word_before = |key: &str| -> Option<f64> {
        let i = rest.find(key)?;
        rest[..i]
            .split_whitespace()
            .last()?
            .trim_matches(|c: char| !c.is_ascii_digit() && c != '.')
            .parse()
            .ok()
    };
    let after = |key: &str| -> Option<f64> {
        let i = rest.find(key)? + key.len();
        rest[i..]
            .split_whitespace()
            .next()?
            .trim_matches(|c: char| !c.is_ascii_digit() && c != '.')
            .parse()
            .ok()
    };
    let per_s = rest
        .split_once('(')
        .and_then(|(_, r)| r.split_once("/s)"))
        .and_then(|(n, _)| n.parse::<f64>().ok())?;
    Some(json!({
        "clients": clients,
        "seconds": secs,
        "requests": word_before(" requests")?,
        "requests_per_s": per_s,
        "errors": word_before(" errors")?,
        "p50_ms": after("p50 ")?,
        "p99_ms": after("p99 ")?,
        "max_ms": after("max ")?,
        "create_delete_cycles": word_before(" create+delete").unwrap_or(0.0),
        "guest_submissions": word_before(" guest blit").unwrap_or(0.0),
    }))
}

/// The API load test's log as JSON: one entry per `API load, ...` line.
fn parse_api_log(text: &str) -> Value {
    let runs: Vec<Value> = text
        .lines()
        .filter_map(|l| l.find("API load, ").map(|i| &l[i..]))
        .filter_map(parse_api_line)
        .collect();
    json!({ "runs": runs })
}

fn report(raw: &Path, out: &Path, mode: &str, command: &str) -> Result<(), String> {
    let runs = read_runs(raw)?;
    std::fs::create_dir_all(out).map_err(|e| format!("create {}: {e}", out.display()))?;
    let mut benches = Map::new();
    for r in &runs {
        let mut data = Value::Null;
        if r.status == "ok" || r.status == "skipped" {
            let json_path = raw.join(format!("{}.json", r.name));
            let log_path = raw.join(format!("{}.log", r.name));
            if r.name == "api_load" {
                let text = std::fs::read_to_string(&log_path)
                    .map_err(|e| format!("read {}: {e}", log_path.display()))?;
                data = parse_api_log(&text);
            } else if json_path.exists() {
                let text = std::fs::read_to_string(&json_path)
                    .map_err(|e| format!("read {}: {e}", json_path.display()))?;
                data = serde_json::from_str(&text)
                    .map_err(|e| format!("{} is not valid JSON: {e}", json_path.display()))?;
            }
        }
        benches.insert(
            r.name.clone(),
            json!({
                "status": r.status,
                "seconds": r.seconds,
                "load_before": r.load_before,
                "load_after": r.load_after,
                "note": r.note,
                "data": data,
            }),
        );
    }
    let benches = Value::Object(benches);
    let figs = figures::all(&benches);
    let total: f64 = runs.iter().map(|r| r.seconds).sum();
    let loads: Vec<f64> = runs
        .iter()
        .flat_map(|r| [r.load_before, r.load_after])
        .collect();
    let results = json!({
        "schema": 1,
        "mode": mode,
        "command": command,
        "generated_unix_s": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "source": source(),
        "machine": machine(),
        "load_average_1min": {
            "min": loads.iter().copied().fold(f64::INFINITY, f64::min),
            "max": loads.iter().copied().fold(0.0, f64::max),
        },
        "bench_seconds_total": total,
        "figures": figs.iter().map(figures::Figure::to_json).collect::<Vec<_>>(),
        "benches": benches,
    });
    let text = serde_json::to_string_pretty(&results).map_err(|e| e.to_string())? + "\n";
    let json_path = out.join("results.json");
    std::fs::write(&json_path, text).map_err(|e| format!("write {}: {e}", json_path.display()))?;
    let plots = plots::all(&results, out);
    let md = markdown::render(&results, &figs, &runs, &plots);
    let md_path = out.join("results.md");
    std::fs::write(&md_path, md).map_err(|e| format!("write {}: {e}", md_path.display()))?;
    println!(
        "wrote {}, {} and {} plot(s) in {}",
        json_path.display(),
        md_path.display(),
        plots.len(),
        out.display()
    );
    Ok(())
}

/// Parses `results.json` and checks its shape; returns the number of figures.
fn check(path: &Path) -> Result<usize, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("read: {e}"))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("invalid JSON: {e}"))?;
    let figs = v
        .get("figures")
        .and_then(Value::as_array)
        .ok_or("no figures array")?;
    let benches = v
        .get("benches")
        .and_then(Value::as_object)
        .ok_or("no benches object")?;
    for (name, b) in benches {
        let status = b.get("status").and_then(Value::as_str).unwrap_or("");
        if status == "ok" && b.get("data").is_none_or(Value::is_null) {
            return Err(format!("bench {name} is ok but has no data"));
        }
    }
    for f in figs {
        for key in ["id", "what", "measured", "verdict"] {
            if f.get(key).is_none() {
                return Err(format!("figure without {key}: {f}"));
            }
        }
    }
    Ok(figs.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_lines_parse() {
        let l = "API load, 50 clients, 10 s: 91670 requests (9167/s), 0 errors, latency p50 \
                 4.90 ms, p99 14.10 ms, max 44.20 ms; 832 create+delete cycles; 44042 guest \
                 blit submissions meanwhile";
        let v = parse_api_line(l).expect("parses");
        assert_eq!(v["clients"], 50);
        assert_eq!(v["requests_per_s"], 9167.0);
        assert_eq!(v["errors"], 0.0);
        assert_eq!(v["p99_ms"], 14.1);
        assert_eq!(v["create_delete_cycles"], 832.0);
        let log = format!("noise\n{l}\nAPI load, 1 client, 5 s: 10 requests (2/s), 0 errors, latency p50 0.31 ms, p99 1.91 ms, max 28.00 ms; 0 create+delete cycles; 5 guest blit submissions meanwhile\n");
        assert_eq!(
            parse_api_log(&log)["runs"].as_array().map(Vec::len),
            Some(2)
        );
    }
}
