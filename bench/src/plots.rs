//! SVG plots of the results (plotters' SVG backend: text is written as SVG text, so no font is
//! needed to render them here). Log axes are drawn as linear axes over log10 of the values,
//! labelled with the values.

// Pixel coordinates come from f64 figures of a few hundred at most; the casts lose nothing.
#![allow(clippy::cast_possible_truncation)]

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;

use crate::figures::{data, migration_rows, num, rows};

const W: u32 = 900;
const H: u32 = 520;
const COLOURS: [RGBColor; 7] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(127, 127, 127),
];

type PlotResult = Result<(), Box<dyn std::error::Error>>;
/// Draws one plot from the benches' data into a directory; `None` without data.
type Draw = fn(&Value, &Path) -> Option<PlotResult>;

/// An axis: its label, whether it is logarithmic, and (log axes) where its ticks go.
struct Axis<'a> {
    desc: &'a str,
    log: bool,
    ticks: &'a [f64],
}

/// Ticks of a log axis of vGPU counts.
const POW2: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
/// Ticks of other log axes: 1-2-5.
const DECADES: [f64; 19] = [
    0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 1e3, 2e3, 5e3, 1e4,
    2e4, 5e4,
];
/// Reference-line colours: dark grey, red, green.
const REF_COLOURS: [RGBColor; 3] = [
    RGBColor(60, 60, 60),
    RGBColor(200, 30, 30),
    RGBColor(20, 140, 20),
];

impl Axis<'_> {
    fn map(&self, v: f64) -> f64 {
        if self.log {
            v.max(1e-12).log10()
        } else {
            v
        }
    }

    fn label(&self, v: f64) -> String {
        let x = if self.log { 10f64.powf(v) } else { v };
        label(x)
    }

    /// The range covering `vals` (and `extra`), with a margin.
    fn range(&self, vals: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
        let m: Vec<f64> = vals
            .filter(|v| v.is_finite())
            .map(|v| self.map(v))
            .collect();
        let lo = m.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = m.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if !lo.is_finite() || !hi.is_finite() {
            return 0.0..1.0;
        }
        if self.log {
            (lo - 0.15)..(hi + 0.15)
        } else {
            let span = (hi - lo.min(0.0)).max(1e-9);
            lo.min(0.0)..(hi + 0.08 * span)
        }
    }
}

/// A number as a tick label.
fn label(x: f64) -> String {
    if x.abs() >= 1e4 && x % 1000.0 == 0.0 {
        format!("{:.0}k", x / 1000.0)
    } else if x.abs() >= 100.0 || x == x.round() {
        format!("{x:.0}")
    } else if x.abs() >= 1.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// A line chart of `series` (name, points), with horizontal reference lines (value, label).
fn line_chart(
    path: &Path,
    title: &str,
    x: &Axis<'_>,
    y: &Axis<'_>,
    series: &[(String, Vec<(f64, f64)>)],
    refs: &[(f64, String)],
    legend: SeriesLabelPosition,
) -> PlotResult {
    let root = SVGBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE)?;
    let xr = x.range(series.iter().flat_map(|s| s.1.iter().map(|p| p.0)));
    let yr = y.range(
        series
            .iter()
            .flat_map(|s| s.1.iter().map(|p| p.1))
            .chain(refs.iter().map(|r| r.0)),
    );
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(xr.clone(), yr)?;
    let yr = c.y_range();
    let xf = |v: &f64| x.label(*v);
    let yf = |v: &f64| y.label(*v);
    let mut mesh = c.configure_mesh();
    mesh.x_desc(x.desc)
        .y_desc(y.desc)
        .x_label_formatter(&xf)
        .y_label_formatter(&yf);
    // Log axes: no automatic labels or grid (they would fall on round logarithms); ticks at
    // round values are drawn below instead.
    if x.log {
        mesh.x_labels(0).disable_x_mesh();
    }
    if y.log {
        mesh.y_labels(0).disable_y_mesh();
    }
    mesh.draw()?;
    let grid = ShapeStyle::from(&BLACK.mix(0.15)).stroke_width(1);
    let tick_style = TextStyle::from(("sans-serif", 12).into_font());
    if x.log {
        for &t in x.ticks.iter().filter(|t| xr.contains(&x.map(**t))) {
            let tx = x.map(t);
            c.draw_series(LineSeries::new(vec![(tx, yr.start), (tx, yr.end)], grid))?;
            let (px, py) = c.backend_coord(&(tx, yr.start));
            root.draw(&Text::new(
                label(t),
                (px, py + 6),
                tick_style.pos(Pos::new(HPos::Center, VPos::Top)),
            ))?;
        }
    }
    if y.log {
        for &t in y.ticks.iter().filter(|t| yr.contains(&y.map(**t))) {
            let ty = y.map(t);
            c.draw_series(LineSeries::new(vec![(xr.start, ty), (xr.end, ty)], grid))?;
            let (px, py) = c.backend_coord(&(xr.start, ty));
            root.draw(&Text::new(
                label(t),
                (px - 6, py),
                tick_style.pos(Pos::new(HPos::Right, VPos::Center)),
            ))?;
        }
    }
    for (i, (v, label)) in refs.iter().enumerate() {
        let col = REF_COLOURS[i % REF_COLOURS.len()];
        let yv = y.map(*v);
        c.draw_series(LineSeries::new(
            vec![(xr.start, yv), (xr.end, yv)],
            ShapeStyle::from(&col).stroke_width(1),
        ))?
        .label(label.clone())
        .legend(move |(a, b)| PathElement::new(vec![(a, b), (a + 20, b)], col));
    }
    for (i, (name, pts)) in series.iter().enumerate() {
        let col = COLOURS[i % COLOURS.len()];
        let pts: Vec<(f64, f64)> = pts
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|p| (x.map(p.0), y.map(p.1)))
            .collect();
        c.draw_series(LineSeries::new(
            pts.clone(),
            ShapeStyle::from(&col).stroke_width(2),
        ))?
        .label(name.clone())
        .legend(move |(a, b)| {
            PathElement::new(
                vec![(a, b), (a + 20, b)],
                ShapeStyle::from(&col).stroke_width(2),
            )
        });
        c.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, col.filled())))?;
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(legend)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Grouped vertical bars: `groups` (group label, [(series, value)]), series coloured
/// consistently; an optional horizontal reference line.
fn bar_chart(
    path: &Path,
    title: &str,
    y_desc: &str,
    groups: &[(String, Vec<(String, f64)>)],
    reference: Option<(f64, String)>,
) -> PlotResult {
    let mut names: Vec<String> = Vec::new();
    for (_, bars) in groups {
        for (n, _) in bars {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    let top = groups
        .iter()
        .flat_map(|g| g.1.iter().map(|b| b.1))
        .chain(reference.iter().map(|r| r.0))
        .fold(0.0, f64::max)
        * 1.4;
    let root = SVGBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = groups.len().max(1) as f64;
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(65)
        .build_cartesian_2d(0.0..n, 0.0..top.max(1e-9))?;
    c.configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .y_desc(y_desc)
        .y_label_formatter(&|v| label(*v))
        .draw()?;
    let k = names.len().max(1) as f64;
    for (si, name) in names.iter().enumerate() {
        let col = COLOURS[si % COLOURS.len()];
        let rects: Vec<Rectangle<(f64, f64)>> = groups
            .iter()
            .enumerate()
            .filter_map(|(gi, (_, bars))| {
                let v = bars.iter().find(|b| &b.0 == name)?.1;
                let x0 = gi as f64 + 0.1 + 0.8 * si as f64 / k;
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + 0.8 / k * 0.9, v)],
                    col.filled(),
                ))
            })
            .collect();
        c.draw_series(rects)?
            .label(name.clone())
            .legend(move |(a, b)| Rectangle::new([(a, b - 5), (a + 14, b + 5)], col.filled()));
    }
    if let Some((v, label)) = &reference {
        c.draw_series(LineSeries::new(
            vec![(0.0, *v), (n, *v)],
            ShapeStyle::from(&BLACK).stroke_width(1),
        ))?
        .label(label.clone())
        .legend(|(a, b)| PathElement::new(vec![(a, b), (a + 20, b)], BLACK));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    let style =
        TextStyle::from(("sans-serif", 13).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for (gi, (label, _)) in groups.iter().enumerate() {
        let (px, py) = c.backend_coord(&(gi as f64 + 0.5, 0.0));
        let style = style.clone();
        root.draw(&Text::new(label.clone(), (px, py + 8), style))?;
    }
    root.present()?;
    Ok(())
}

fn s(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or("").to_string()
}

fn f(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

fn blit(b: &Value, out: &Path) -> Option<PlotResult> {
    let e = data(b, "engines")?;
    let blit = rows(e, "blit");
    if blit.is_empty() {
        return None;
    }
    let mut groups: Vec<(String, Vec<(String, f64)>)> = Vec::new();
    for r in blit {
        let g = format!("{} {} {}", s(r, "op"), s(r, "size"), s(r, "cache"));
        let path = s(r, "path");
        let series = if path.starts_with("host") {
            if path == "host memcpy in lmem" {
                continue;
            }
            "host (memcpy / memset / u32 fill)".to_string()
        } else {
            path
        };
        match groups.iter_mut().find(|x| x.0 == g) {
            Some(x) => x.1.push((series, f(r, "gb_per_s"))),
            None => groups.push((g, vec![(series, f(r, "gb_per_s"))])),
        }
    }
    Some(bar_chart(
        &out.join("blit.svg"),
        "Blit GB/s through the GGTT vs the host doing the same",
        "GB/s",
        &groups,
        None,
    ))
}

fn compute(b: &Value, out: &Path) -> Option<PlotResult> {
    let e = data(b, "engines")?;
    let rs = rows(e, "compute");
    if rs.is_empty() {
        return None;
    }
    let mut groups: Vec<(String, Vec<(String, f64)>)> = Vec::new();
    for r in rs {
        let g = format!("{} {}", s(r, "kernel"), s(r, "size"));
        let path = s(r, "path");
        if path.starts_with("native") {
            continue;
        }
        match groups.iter_mut().find(|x| x.0 == g) {
            Some(x) => x.1.push((path, f(r, "ratio_vs_native"))),
            None => groups.push((g, vec![(path, f(r, "ratio_vs_native"))])),
        }
    }
    Some(bar_chart(
        &out.join("compute.svg"),
        "Compute kernels: engine speed relative to the same loop on the host",
        "x native (higher is better)",
        &groups,
        Some((1.0, "native = 1.0x".into())),
    ))
}

fn gtt(b: &Value, out: &Path) -> Option<PlotResult> {
    let m = rows(data(b, "engines")?, "media");
    if m.is_empty() {
        return None;
    }
    let series: Vec<(String, Vec<(f64, f64)>)> = ["remap every frame", "no remaps"]
        .iter()
        .map(|w| {
            (
                format!("two-dim / shadow, {w}"),
                m.iter()
                    .filter(|r| s(r, "workload") == *w)
                    .map(|r| (f(r, "mapped_pages"), f(r, "ratio_two_dim_over_shadow")))
                    .collect(),
            )
        })
        .collect();
    Some(line_chart(
        &out.join("gtt.svg"),
        "Two-dim over shadow GTT on NV12 transcoding vs PPGTT size",
        &Axis {
            desc: "PPGTT pages mapped (log)",
            log: true,
            ticks: &DECADES,
        },
        &Axis {
            desc: "two-dim fps / shadow fps (log)",
            log: true,
            ticks: &DECADES,
        },
        &series,
        &[(1.0, "1.0x".into()), (19.73, "Demon: up to 19.73x".into())],
        SeriesLabelPosition::UpperLeft,
    ))
}

fn sched(b: &Value, out: &Path) -> Option<PlotResult> {
    let rs = rows(data(b, "engines")?, "sched");
    let series: Vec<(String, Vec<(f64, f64)>)> = ["best-effort", "equal-share", "fixed-share"]
        .iter()
        .map(|p| {
            (
                (*p).to_string(),
                rs.iter()
                    .filter(|r| s(r, "policy") == *p)
                    .map(|r| (f(r, "vgpus"), f(r, "max_abs_error_pp")))
                    .collect(),
            )
        })
        .filter(|s: &(String, Vec<(f64, f64)>)| !s.1.is_empty())
        .collect();
    if series.is_empty() {
        return None;
    }
    Some(line_chart(
        &out.join("sched.svg"),
        "Scheduler: worst share error vs number of busy vGPUs (blit engine)",
        &Axis {
            desc: "busy vGPUs (log)",
            log: true,
            ticks: &POW2,
        },
        &Axis {
            desc: "max |delivered - target| share, percentage points",
            log: false,
            ticks: &[],
        },
        &series,
        &[(2.0, "target <= 2 pp".into())],
        SeriesLabelPosition::UpperLeft,
    ))
}

fn scale(b: &Value, out: &Path) -> Option<PlotResult> {
    let rs = rows(data(b, "scale")?, "runs");
    if rs.is_empty() {
        return None;
    }
    let pick = |k: &str| -> Vec<(f64, f64)> {
        rs.iter().map(|r| (f(r, "vgpus"), f(r, k) / 1e9)).collect()
    };
    let series = vec![
        (
            "aggregate of all vGPUs".to_string(),
            pick("aggregate_bytes_per_s"),
        ),
        (
            "host memcpy, same footprint (1 thread)".to_string(),
            pick("host_memcpy_bytes_per_s"),
        ),
        (
            "per vGPU (median)".to_string(),
            pick("per_vgpu_bytes_per_s_median"),
        ),
    ];
    Some(line_chart(
        &out.join("scale.svg"),
        "Scale: blit throughput with N mini vGPUs busy on one vgpud",
        &Axis {
            desc: "busy vGPUs (log)",
            log: true,
            ticks: &POW2,
        },
        &Axis {
            desc: "GB/s copied (log)",
            log: true,
            ticks: &DECADES,
        },
        &series,
        &[],
        SeriesLabelPosition::LowerLeft,
    ))
}

fn migration(b: &Value, out: &Path) -> Option<PlotResult> {
    let mut series = Vec::new();
    for name in ["migration_64", "migration_256"] {
        let Some(d) = data(b, name) else { continue };
        let mib = num(d, "/lmem_bytes").unwrap_or(0.0) / 1048576.0;
        let pts: Vec<(f64, f64)> = migration_rows(d)
            .iter()
            .filter_map(|r| {
                let mut v: Vec<f64> = r
                    .get("downtime_ms")?
                    .as_array()?
                    .iter()
                    .filter_map(Value::as_f64)
                    .collect();
                v.sort_by(f64::total_cmp);
                Some((f(r, "dirty_bytes_per_s") / 1048576.0, *v.get(v.len() / 2)?))
            })
            .collect();
        series.push((format!("{mib:.0} MiB vGPU"), pts));
    }
    if series.is_empty() {
        return None;
    }
    Some(line_chart(
        &out.join("migration.svg"),
        "Live migration downtime vs the guest's dirty rate",
        &Axis {
            desc: "dirtied MiB/s during pre-copy (guest idle, low, high)",
            log: false,
            ticks: &[],
        },
        &Axis {
            desc: "downtime, ms (median of runs)",
            log: false,
            ticks: &[],
        },
        &series,
        &[
            (20.0, "goal <= 20 ms".into()),
            (119.0, "gMig: 119 ms average".into()),
        ],
        SeriesLabelPosition::UpperRight,
    ))
}

fn trap(b: &Value, out: &Path) -> Option<PlotResult> {
    let t = data(b, "trap_path")?;
    let g = |k: &str| num(t, &format!("/series/{k}/net_cycles")).unwrap_or(f64::NAN);
    let groups = vec![
        (
            "write".to_string(),
            vec![
                ("bare KVM exit".to_string(), g("bare_write")),
                ("in-process vGPU".to_string(), g("in_process_write")),
                ("vfio-user vGPU".to_string(), g("vfio_user_write")),
            ],
        ),
        (
            "read".to_string(),
            vec![
                ("bare KVM exit".to_string(), g("bare_read")),
                ("in-process vGPU".to_string(), g("in_process_read")),
                ("vfio-user vGPU".to_string(), g("vfio_user_read")),
            ],
        ),
    ];
    Some(bar_chart(
        &out.join("trap.svg"),
        "Guest register access: net guest cycles per access",
        "cycles",
        &groups,
        Some((1000.0, "VPIO: O(1000)-cycle exits".into())),
    ))
}

/// Draws every plot it has data for; returns (file name, title) of those written.
pub fn all(results: &Value, out: &Path) -> Vec<(String, String)> {
    let b = &results["benches"];
    let mut done = Vec::new();
    let plots: [(&str, &str, Draw); 7] = [
        ("blit.svg", "blit GB/s vs host memcpy/memset", blit),
        ("compute.svg", "compute kernels vs native", compute),
        ("gtt.svg", "two-dim / shadow ratio vs PPGTT pages", gtt),
        ("sched.svg", "share error vs number of vGPUs", sched),
        ("scale.svg", "scale: throughput vs number of vGPUs", scale),
        (
            "migration.svg",
            "migration downtime vs dirty rate",
            migration,
        ),
        ("trap.svg", "trap path: cycles per register access", trap),
    ];
    for (file, title, draw) in plots {
        match draw(b, out) {
            Some(Ok(())) => done.push((file.to_string(), title.to_string())),
            Some(Err(e)) => eprintln!("plot {file}: {e}"),
            None => {}
        }
    }
    done
}
