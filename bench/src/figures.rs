//! The headline figures: one row per claim, each a ratio (or count) measured in this run against
//! its same-run baseline, with the target or the published anchor it is read against.

use serde_json::{json, Value};

/// How a figure stands against its target or anchor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Meets the target.
    OnTarget,
    /// Misses the target, or is behind the anchor.
    Behind,
    /// Reported for context; no target.
    Info,
    /// The bench did not run (or was skipped).
    NotMeasured,
}

impl Verdict {
    /// The word in tables.
    pub fn word(self) -> &'static str {
        match self {
            Verdict::OnTarget => "on target",
            Verdict::Behind => "behind",
            Verdict::Info => "info",
            Verdict::NotMeasured => "not measured",
        }
    }
}

/// One headline figure.
#[derive(Clone, Debug)]
pub struct Figure {
    /// Stable key.
    pub id: &'static str,
    /// Area (a section of docs/benchmarks.md).
    pub section: &'static str,
    /// What is measured.
    pub what: String,
    /// The measured value as shown.
    pub measured: String,
    /// The key number (a ratio, a count, milliseconds), if measured.
    pub value: Option<f64>,
    /// The same-run baseline it is a ratio to.
    pub baseline: String,
    /// The target or published anchor.
    pub target: String,
    /// Verdict.
    pub verdict: Verdict,
}

impl Figure {
    /// As JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "section": self.section,
            "what": self.what,
            "measured": self.measured,
            "value": self.value,
            "baseline": self.baseline,
            "target": self.target,
            "verdict": self.verdict.word(),
        })
    }
}

/// A bench's data, if it ran.
pub fn data<'a>(benches: &'a Value, name: &str) -> Option<&'a Value> {
    let b = benches.get(name)?;
    if b.get("status").and_then(Value::as_str) != Some("ok") {
        return None;
    }
    let d = b.get("data")?;
    if d.is_null() || d.get("skipped").and_then(Value::as_bool) == Some(true) {
        return None;
    }
    Some(d)
}

/// A number at a JSON pointer.
pub fn num(v: &Value, ptr: &str) -> Option<f64> {
    v.pointer(ptr).and_then(Value::as_f64)
}

/// Rows of an array at `key`.
pub fn rows<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// The per-dirty-rate rows of a migration bench: `migration` as an array, or (the newer
/// layout) `migration.summary`.
pub fn migration_rows(d: &Value) -> &[Value] {
    match d.get("migration") {
        Some(Value::Array(a)) => a,
        Some(m) => rows(m, "summary"),
        None => &[],
    }
}

fn s(v: &Value, key: &str) -> String {
    v.get(key).and_then(Value::as_str).unwrap_or("").to_string()
}

fn f(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn missing(id: &'static str, section: &'static str, what: &str, target: &str) -> Figure {
    Figure {
        id,
        section,
        what: what.to_string(),
        measured: "—".into(),
        value: None,
        baseline: String::new(),
        target: target.to_string(),
        verdict: Verdict::NotMeasured,
    }
}

/// Blit ratio of `path` for (op, size) from the engines bench.
fn blit_ratio(blit: &[Value], op: &str, size: &str, path: &str) -> Option<f64> {
    blit.iter()
        .find(|r| s(r, "op") == op && s(r, "size") == size && s(r, "path") == path)
        .and_then(|r| f(r, "ratio_vs_host"))
}

fn blit_figs(benches: &Value, out: &mut Vec<Figure>) {
    let cases = [
        (
            "blit_copy_cold",
            "copy",
            "16 MiB",
            "Blit copy 16 MiB, cache-cold",
            "host `copy_from_slice`",
        ),
        (
            "blit_fill_cold",
            "fill",
            "16 MiB",
            "Blit fill 16 MiB (1-byte colour), cache-cold",
            "host `fill` (memset)",
        ),
        (
            "blit_fill32_cold",
            "fill32",
            "16 MiB",
            "Blit fill 16 MiB (32-bit colour), cache-cold",
            "host `u32` fill",
        ),
        (
            "blit_copy_warm",
            "copy",
            "1 MiB",
            "Blit copy 1 MiB, cache-warm",
            "host `copy_from_slice`",
        ),
        (
            "blit_fill_warm",
            "fill",
            "1 MiB",
            "Blit fill 1 MiB, cache-warm",
            "host `fill` (memset)",
        ),
    ];
    let blit = data(benches, "engines").map_or(&[][..], |d| rows(d, "blit"));
    for (id, op, size, what, base) in cases {
        let what = format!("{what}: engine, shadow / two-dim");
        let (a, b) = (
            blit_ratio(blit, op, size, "shadow engine"),
            blit_ratio(blit, op, size, "two-dim engine"),
        );
        let (Some(a), Some(b)) = (a, b) else {
            out.push(missing(id, "blit", &what, ">= 0.8x"));
            continue;
        };
        let lo = a.min(b);
        out.push(Figure {
            id,
            section: "blit",
            what,
            measured: format!("{a:.2}x / {b:.2}x"),
            value: Some(lo),
            baseline: format!("{base}, same bytes, same run"),
            target: ">= 0.8x".into(),
            verdict: if lo >= 0.8 {
                Verdict::OnTarget
            } else {
                Verdict::Behind
            },
        });
    }
}

fn compute_figs(benches: &Value, out: &mut Vec<Figure>) {
    let what = "Compute kernels saxpy / reduce / matmul: engine (shadow)";
    let Some(c) = data(benches, "engines").map(|d| rows(d, "compute")) else {
        out.push(missing("compute_vs_native", "compute", what, "none set"));
        return;
    };
    let get = |k: &str| {
        c.iter()
            .find(|r| s(r, "kernel") == k && s(r, "path") == "shadow engine")
            .and_then(|r| f(r, "ratio_vs_native"))
    };
    let (Some(a), Some(b), Some(m)) = (get("saxpy"), get("reduce"), get("matmul")) else {
        out.push(missing("compute_vs_native", "compute", what, "none set"));
        return;
    };
    let lo = a.min(b).min(m);
    out.push(Figure {
        id: "compute_vs_native",
        section: "compute",
        what: what.into(),
        measured: format!("{a:.2}x / {b:.2}x / {m:.2}x"),
        value: Some(lo),
        baseline: "the same loop natively on the host, same inputs, same run".into(),
        target: "none set (blits: >= 0.8x)".into(),
        verdict: if lo >= 0.8 {
            Verdict::OnTarget
        } else {
            Verdict::Behind
        },
    });
}

fn media_figs(benches: &Value, out: &mut Vec<Figure>) {
    let what_r = "GTT two-dim / shadow, PPGTT remapped every frame (largest PPGTT)";
    let what_n = "GTT two-dim / shadow, no remaps (cost of the second dimension)";
    let Some(m) = data(benches, "engines").map(|d| rows(d, "media")) else {
        out.push(missing("gtt_remap", "GTT", what_r, "Demon: up to 19.73x"));
        out.push(missing("gtt_no_remap", "GTT", what_n, "~1.0x"));
        return;
    };
    let remap: Vec<&Value> = m
        .iter()
        .filter(|r| s(r, "workload") == "remap every frame")
        .collect();
    let best = remap.iter().max_by(|a, b| {
        f(a, "mapped_pages")
            .unwrap_or(0.0)
            .total_cmp(&f(b, "mapped_pages").unwrap_or(0.0))
    });
    match best.and_then(|r| Some((f(r, "ratio_two_dim_over_shadow")?, f(r, "mapped_pages")?))) {
        Some((ratio, pages)) => out.push(Figure {
            id: "gtt_remap",
            section: "GTT",
            what: format!("{what_r}: {pages:.0} pages"),
            measured: format!("{ratio:.2}x"),
            value: Some(ratio),
            baseline: "shadow mode, same frames, same run".into(),
            target: "Demon: up to 19.73x".into(),
            verdict: if ratio >= 19.73 {
                Verdict::OnTarget
            } else {
                Verdict::Behind
            },
        }),
        None => out.push(missing("gtt_remap", "GTT", what_r, "Demon: up to 19.73x")),
    }
    let nr: Vec<f64> = m
        .iter()
        .filter(|r| s(r, "workload") == "no remaps")
        .filter_map(|r| f(r, "ratio_two_dim_over_shadow"))
        .collect();
    if nr.is_empty() {
        out.push(missing("gtt_no_remap", "GTT", what_n, "~1.0x"));
    } else {
        let lo = nr.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = nr.iter().copied().fold(0.0, f64::max);
        out.push(Figure {
            id: "gtt_no_remap",
            section: "GTT",
            what: what_n.into(),
            measured: if nr.len() > 1 {
                format!("{lo:.2}-{hi:.2}x")
            } else {
                format!("{lo:.2}x")
            },
            value: Some(lo),
            baseline: "shadow mode, same frames, same run".into(),
            target: ">= 0.95x (no measurable cost)".into(),
            verdict: if lo >= 0.95 {
                Verdict::OnTarget
            } else {
                Verdict::Behind
            },
        });
    }
}

fn sched_figs(benches: &Value, out: &mut Vec<Figure>) {
    let sched = data(benches, "engines").map_or(&[][..], |d| rows(d, "sched"));
    for (id, policy) in [
        ("share_best_effort", "best-effort"),
        ("share_equal", "equal-share"),
        ("share_fixed", "fixed-share"),
    ] {
        let rs: Vec<(f64, f64)> = sched
            .iter()
            .filter(|r| s(r, "policy") == policy)
            .filter_map(|r| Some((f(r, "vgpus")?, f(r, "max_abs_error_pp")?)))
            .collect();
        let what = format!("Scheduler share error, {policy}, max over vGPUs");
        if rs.is_empty() {
            out.push(missing(id, "sched", &what, "<= 2 pp"));
            continue;
        }
        let worst = rs.iter().map(|r| r.1).fold(0.0, f64::max);
        let ns: Vec<String> = rs.iter().map(|r| format!("{:.0}", r.0)).collect();
        out.push(Figure {
            id,
            section: "sched",
            what: format!("{what} ({} vGPUs)", ns.join("/")),
            measured: format!(
                "{} pp",
                rs.iter()
                    .map(|r| format!("{:.2}", r.1))
                    .collect::<Vec<_>>()
                    .join(" / ")
            ),
            value: Some(worst),
            baseline: "the policy's target share of the measured engine time".into(),
            target: "<= 2 pp".into(),
            verdict: if worst <= 2.0 {
                Verdict::OnTarget
            } else {
                Verdict::Behind
            },
        });
    }
    let what = "Two vGPUs on different engines (compute || video) vs serialised";
    match sched
        .iter()
        .find(|r| s(r, "case") == "engine concurrency")
        .and_then(|r| {
            Some((
                f(r, "speedup_different_engines")?,
                f(r, "ideal_speedup")?,
                f(r, "host_two_threads_speedup")?,
                f(r, "speedup_same_engine")?,
            ))
        }) {
        Some((par, ideal, host, same)) => out.push(Figure {
            id: "engine_concurrency",
            section: "sched",
            what: what.into(),
            measured: format!(
                "{par:.2}x (ideal {ideal:.2}x; host 2 threads {host:.2}x; same engine {same:.2}x)"
            ),
            value: Some(par),
            baseline: "the same work serialised, same run".into(),
            target: "Demon: +13.73 % (3D) / +17.09 % (2D) over gVirt, i.e. >= 1.14x".into(),
            verdict: if par >= 1.1373 {
                Verdict::OnTarget
            } else {
                Verdict::Behind
            },
        }),
        None => out.push(missing("engine_concurrency", "sched", what, ">= 1.14x")),
    }
}

fn trap_figs(benches: &Value, out: &mut Vec<Figure>) {
    let what = "vfio-user REGION_READ of a register vs bare unix-socket ping-pong";
    match data(benches, "vfio_user").and_then(|d| {
        Some((
            num(d, "/region_read_ratio")?,
            num(d, "/region_read_ns")?,
            num(d, "/ping_pong_ns")?,
            num(d, "/ping_pong_framed_ns")?,
        ))
    }) {
        Some((r, ours, bare, framed)) => out.push(Figure {
            id: "region_read",
            section: "vfio-user",
            what: what.into(),
            measured: format!(
                "{r:.2}x ({:.1} vs {:.1} us; framed ping-pong {:.2}x)",
                ours / 1e3,
                bare / 1e3,
                framed / bare
            ),
            value: Some(r),
            baseline: "ping-pong of the same bytes between two threads, same run".into(),
            target: "<= 1.3x".into(),
            verdict: if r <= 1.3 {
                Verdict::OnTarget
            } else {
                Verdict::Behind
            },
        }),
        None => out.push(missing("region_read", "vfio-user", what, "<= 1.3x")),
    }
    let what = "Doorbell submissions (scan + execute) vs plain register writes";
    match data(benches, "vfio_user")
        .and_then(|d| Some((num(d, "/doorbells_per_s")?, num(d, "/plain_writes_per_s")?)))
    {
        Some((db, plain)) => out.push(Figure {
            id: "doorbell",
            section: "vfio-user",
            what: what.into(),
            measured: format!("{:.2}x ({db:.0}/s vs {plain:.0}/s)", db / plain),
            value: Some(db / plain),
            baseline: "REGION_WRITE of a scratch register, same run".into(),
            target: "—".into(),
            verdict: Verdict::Info,
        }),
        None => out.push(missing("doorbell", "vfio-user", what, "—")),
    }
    let skip_note = benches
        .pointer("/trap_path/data/reason")
        .and_then(Value::as_str)
        .map(|r| format!("skipped: {r}"));
    let trap = data(benches, "trap_path");
    let series = |k: &str, field: &str| trap.and_then(|d| num(d, &format!("/series/{k}/{field}")));
    let what = "Bare KVM exit to an empty MMIO handler (net guest cycles, write / read)";
    match (
        series("bare_write", "net_cycles"),
        series("bare_read", "net_cycles"),
    ) {
        (Some(w), Some(r)) => out.push(Figure {
            id: "kvm_exit",
            section: "KVM",
            what: what.into(),
            measured: format!("{w:.0} / {r:.0} cycles"),
            value: Some(w.min(r)),
            baseline: "the guest loop alone, subtracted".into(),
            target: "VPIO: O(1000) cycles per exit (bare-metal KVM)".into(),
            verdict: if w.min(r) <= 3000.0 {
                Verdict::OnTarget
            } else {
                Verdict::Behind
            },
        }),
        _ => {
            let mut m = missing("kvm_exit", "KVM", what, "VPIO: O(1000) cycles");
            if let Some(n) = &skip_note {
                m.measured.clone_from(n);
            }
            out.push(m);
        }
    }
    let what = "In-process vGPU register access vs bare KVM exit (write / read)";
    match (
        series("in_process_write", "vs_bare_exit"),
        series("in_process_read", "vs_bare_exit"),
    ) {
        (Some(w), Some(r)) => out.push(Figure {
            id: "in_process_vs_exit",
            section: "KVM",
            what: what.into(),
            measured: format!("{w:.2}x / {r:.2}x"),
            value: Some(w.max(r)),
            baseline: "bare exit, same direction, same VM, same run".into(),
            target: "<= 1.2x (device model cost << exit, as VPIO argues)".into(),
            verdict: if w.max(r) <= 1.2 {
                Verdict::OnTarget
            } else {
                Verdict::Behind
            },
        }),
        _ => out.push(missing("in_process_vs_exit", "KVM", what, "<= 1.2x")),
    }
    let what = "vfio-user vGPU register access vs bare KVM exit (write / read)";
    match (
        series("vfio_user_write", "vs_bare_exit"),
        series("vfio_user_read", "vs_bare_exit"),
    ) {
        (Some(w), Some(r)) => out.push(Figure {
            id: "vfio_user_vs_exit",
            section: "KVM",
            what: what.into(),
            measured: format!("{w:.2}x / {r:.2}x"),
            value: Some(w.max(r)),
            baseline: "bare exit, same direction, same VM, same run".into(),
            target: "— (two context switches per access)".into(),
            verdict: Verdict::Info,
        }),
        _ => out.push(missing("vfio_user_vs_exit", "KVM", what, "—")),
    }
}

fn scale_figs(benches: &Value, out: &mut Vec<Figure>) {
    let d = data(benches, "scale");
    let what = "mini vGPUs admitted on one vgpud (default 4 GiB software GPU)";
    match d.and_then(|d| Some((num(d, "/admitted")?, d.get("refusal")?.as_str()?))) {
        Some((n, why)) => out.push(Figure {
            id: "scale_admitted",
            section: "scale",
            what: what.into(),
            measured: format!("{n:.0}, then refused: {why}"),
            value: Some(n),
            baseline: "—".into(),
            target: "64 (gScale: 15 VMs)".into(),
            verdict: if n >= 64.0 {
                Verdict::OnTarget
            } else {
                Verdict::Behind
            },
        }),
        None => out.push(missing(
            "scale_admitted",
            "scale",
            what,
            "64 (gScale: 15 VMs)",
        )),
    }
    let runs = d.map_or(&[][..], |d| rows(d, "runs"));
    let last = runs.last();
    let what = "Aggregate blit throughput with every admitted vGPU busy";
    match last.and_then(|r| {
        Some((
            f(r, "vgpus")?,
            f(r, "aggregate_vs_n1")?,
            f(r, "aggregate_vs_host_memcpy")?,
            f(r, "host_vs_n1")?,
            f(r, "blit_engine_busy")?,
        ))
    }) {
        Some((n, vs1, vs_host, host1, busy)) => out.push(Figure {
            id: "scale_aggregate",
            section: "scale",
            what: format!("{what} ({n:.0} vGPUs)"),
            measured: format!(
                "{vs_host:.2}x of host memcpy over the same footprint; {vs1:.2}x of N=1 (host \
                 memcpy itself: {host1:.2}x); engine busy {:.0} %",
                busy * 100.0
            ),
            value: Some(vs_host),
            baseline: "one host thread copying the same bytes over the same footprint, same round"
                .into(),
            target: ">= 0.8x of host memcpy (the engine is one thread, as the memcpy)".into(),
            verdict: if vs_host >= 0.8 {
                Verdict::OnTarget
            } else {
                Verdict::Behind
            },
        }),
        None => out.push(missing("scale_aggregate", "scale", what, ">= 0.8x")),
    }
    let what = "Fairness among busy vGPUs (Jain index; slowest / fastest)";
    match last.and_then(|r| {
        Some((
            f(r, "vgpus")?,
            f(r, "jain_index")?,
            f(r, "slowest_over_fastest")?,
        ))
    }) {
        Some((n, jain, lohi)) => out.push(Figure {
            id: "scale_fairness",
            section: "scale",
            what: format!("{what}, {n:.0} vGPUs, equal scheduler history"),
            measured: format!("{jain:.3}; {lohi:.2}"),
            value: Some(jain),
            baseline: "1.0 = all equal".into(),
            target: "Jain >= 0.9".into(),
            verdict: if jain >= 0.9 {
                Verdict::OnTarget
            } else {
                Verdict::Behind
            },
        }),
        None => out.push(missing("scale_fairness", "scale", what, "Jain >= 0.9")),
    }
    let what = "Fairness when idle vGPUs start next to busy ones (no history reset)";
    match d.and_then(|d| d.get("without_history_reset")).and_then(|h| {
        Some((
            f(h, "vgpus")?,
            f(h, "ran_before")?,
            f(h, "share_of_those_that_ran_before")?,
            f(h, "vgpus_with_no_completion")?,
            f(h, "jain_index")?,
        ))
    }) {
        Some((n, before, share, starved, jain)) => out.push(Figure {
            id: "scale_wake_fairness",
            section: "scale",
            what: format!("{what}: {before:.0} ran a window, then all {n:.0}"),
            measured: format!(
                "the {before:.0} got {:.1} % of the engine; {starved:.0} vGPUs starved; Jain {jain:.3}",
                share * 100.0
            ),
            value: Some(jain),
            baseline: "their fair share: 50 %".into(),
            target: "Jain >= 0.9".into(),
            verdict: if jain >= 0.9 {
                Verdict::OnTarget
            } else {
                Verdict::Behind
            },
        }),
        None => out.push(missing("scale_wake_fairness", "scale", what, "Jain >= 0.9")),
    }
}

fn migration_figs(benches: &Value, out: &mut Vec<Figure>) {
    for (id_low, id_high, id_snap, name) in [
        (
            "downtime_low_64",
            "downtime_high_64",
            "snapshot_64",
            "migration_64",
        ),
        (
            "downtime_low_256",
            "downtime_high_256",
            "snapshot_256",
            "migration_256",
        ),
    ] {
        let d = data(benches, name);
        let mib = d.and_then(|d| num(d, "/lmem_bytes")).map_or_else(
            || name.trim_start_matches("migration_").to_string(),
            |b| format!("{:.0}", b / 1048576.0),
        );
        let mig = d.map_or(&[][..], migration_rows);
        let by = |g: &str| mig.iter().find(|r| s(r, "guest") == g);
        let downtime = |r: &Value| -> Option<f64> {
            let mut v: Vec<f64> = r
                .get("downtime_ms")?
                .as_array()?
                .iter()
                .filter_map(Value::as_f64)
                .collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied()
        };
        let what = format!("Migration downtime, {mib} MiB vGPU, low dirty rate");
        match by("low")
            .and_then(|r| Some((downtime(r)?, f(r, "dirty_bytes_per_s")?, f(r, "total_ms")?)))
        {
            Some((dt, rate, total)) => out.push(Figure {
                id: id_low,
                section: "migration",
                what,
                measured: format!(
                    "{dt:.1} ms at {:.1} MiB/s dirtied (total {total:.0} ms); {:.2}x gMig",
                    rate / 1048576.0,
                    dt / 119.0
                ),
                value: Some(dt),
                baseline: "—".into(),
                target: "<= 20 ms (gMig: 119 ms average)".into(),
                verdict: if dt <= 20.0 {
                    Verdict::OnTarget
                } else {
                    Verdict::Behind
                },
            }),
            None => out.push(missing(id_low, "migration", &what, "<= 20 ms")),
        }
        let what = format!("Migration downtime, {mib} MiB vGPU, high dirty rate");
        match by("high").and_then(|r| {
            Some((
                downtime(r)?,
                f(r, "dirty_bytes_per_s")?,
                f(r, "total_ms")?,
                s(r, "stop_reason"),
            ))
        }) {
            Some((dt, rate, total, why)) => out.push(Figure {
                id: id_high,
                section: "migration",
                what,
                measured: format!(
                    "{dt:.1} ms at {:.0} MiB/s dirtied ({why}; total {total:.0} ms); {:.2}x gMig",
                    rate / 1048576.0,
                    dt / 119.0
                ),
                value: Some(dt),
                baseline: "—".into(),
                target: "gMig: 119 ms average".into(),
                verdict: if dt <= 119.0 {
                    Verdict::OnTarget
                } else {
                    Verdict::Behind
                },
            }),
            None => out.push(missing(id_high, "migration", &what, "gMig: 119 ms")),
        }
        let what =
            format!("Snapshot / restore of a {mib} MiB vGPU vs plain file write+sync / read");
        match d.and_then(|d| {
            Some((
                num(d, "/snapshot/snapshot_vs_write")?,
                num(d, "/snapshot/restore_vs_read")?,
            ))
        }) {
            Some((w, r)) => out.push(Figure {
                id: id_snap,
                section: "migration",
                what,
                measured: format!("{w:.2}x / {r:.2}x the time"),
                value: Some(w.max(r)),
                baseline: "write + sync_all / read of as many bytes, same directory, same run"
                    .into(),
                target: "—".into(),
                verdict: Verdict::Info,
            }),
            None => out.push(missing(id_snap, "migration", &what, "—")),
        }
    }
}

fn api_figs(benches: &Value, out: &mut Vec<Figure>) {
    let what = "REST API under load: 50 clients (with vGPU churn) vs 1";
    let runs = data(benches, "api_load").map_or(&[][..], |d| rows(d, "runs"));
    let one = runs.iter().find(|r| f(r, "clients") == Some(1.0));
    let many = runs.iter().find(|r| f(r, "clients") == Some(50.0));
    match many {
        Some(m) => {
            let errors = f(m, "errors").unwrap_or(f64::NAN)
                + one.and_then(|o| f(o, "errors")).unwrap_or(0.0);
            let tput = one
                .and_then(|o| Some(f(m, "requests_per_s")? / f(o, "requests_per_s")?))
                .map_or(String::new(), |x| {
                    format!("; {x:.2}x the throughput of 1 client")
                });
            out.push(Figure {
                id: "api_load",
                section: "API",
                what: what.into(),
                measured: format!(
                    "{errors:.0} errors; {:.0} req/s, p99 {:.1} ms{tput}",
                    f(m, "requests_per_s").unwrap_or(f64::NAN),
                    f(m, "p99_ms").unwrap_or(f64::NAN)
                ),
                value: Some(errors),
                baseline: "one client, same request mix (full run only)".into(),
                target: "0 errors, nothing leaked".into(),
                verdict: if errors == 0.0 {
                    Verdict::OnTarget
                } else {
                    Verdict::Behind
                },
            });
        }
        None => out.push(missing("api_load", "API", what, "0 errors")),
    }
}

/// Every headline figure, in document order.
pub fn all(benches: &Value) -> Vec<Figure> {
    let mut out = Vec::new();
    blit_figs(benches, &mut out);
    compute_figs(benches, &mut out);
    media_figs(benches, &mut out);
    sched_figs(benches, &mut out);
    trap_figs(benches, &mut out);
    api_figs(benches, &mut out);
    scale_figs(benches, &mut out);
    migration_figs(benches, &mut out);
    out
}
