//! `/metrics`: the daemon's counters in the Prometheus text exposition format (version 0.0.4),
//! written by hand from atomics and fixed-bucket histograms (no registry, no locks on the hot
//! paths).
//!
//! Per vGPU and engine (labels `vgpu`, `name`, `engine`): busy seconds, commands, bytes,
//! submissions, preemptions, resets, audit events (counters), utilisation (gauge), submission
//! latency and slice length (histograms). Per vGPU: trap latency (histogram), vfio-user
//! messages, audit events, bad accesses, connected and paused (gauges). Daemon: local memory,
//! vGPU count, available instances per profile, API requests by status and their latency.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use vgpu_device::hist::{Histogram, HistogramSnapshot, BOUNDS_NS};

use crate::daemon::{Daemon, VgpuCounters};

/// The content type of the exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Counters of the API server itself.
#[derive(Debug, Default)]
pub struct ApiMetrics {
    /// Responses by status class: 2xx, 3xx, 4xx, 5xx.
    pub responses: [AtomicU64; 4],
    /// Request handling time (from routing to the response head).
    pub latency: Histogram,
}

impl ApiMetrics {
    /// Records one response.
    pub fn record(&self, status: u16, took: Duration) {
        let class = usize::from(status / 100).clamp(2, 5) - 2;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
        self.latency.observe(took);
    }
}

/// Escapes a label value (`\`, `"` and newlines).
fn esc(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

struct Out(String);

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, v: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {v}");
        } else {
            let _ = writeln!(self.0, "{name}{{{labels}}} {v}");
        }
    }

    fn histogram(&mut self, name: &str, labels: &str, h: &HistogramSnapshot) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0u64;
        for (i, c) in h.counts.iter().enumerate() {
            cum += c;
            let le = BOUNDS_NS
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |ns| secs(*ns));
            let _ = writeln!(self.0, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cum}");
        }
        self.sample(&format!("{name}_sum"), labels, secs(h.sum_ns));
        self.sample(&format!("{name}_count"), labels, cum);
    }
}

/// Nanoseconds as seconds, without float noise for the bucket bounds.
fn secs(ns: u64) -> String {
    let s = ns / 1_000_000_000;
    let frac = ns % 1_000_000_000;
    if frac == 0 {
        return s.to_string();
    }
    let f = format!("{frac:09}");
    format!("{s}.{}", f.trim_end_matches('0'))
}

type EngineField = fn(&crate::daemon::EngineCounters) -> String;
type VgpuField = fn(&VgpuCounters) -> u64;

/// Renders every metric.
pub fn render(daemon: &Daemon, api: &ApiMetrics) -> String {
    let mut o = Out(String::with_capacity(16 * 1024));
    let gpu = daemon.gpu_info();
    o.head(
        "vgpud_lmem_bytes",
        "gauge",
        "Local memory of the physical GPU.",
    );
    o.sample("vgpud_lmem_bytes", "", gpu.lmem_bytes);
    o.head(
        "vgpud_lmem_used_bytes",
        "gauge",
        "Local memory held by vGPUs.",
    );
    o.sample("vgpud_lmem_used_bytes", "", gpu.lmem_used_bytes);
    o.head("vgpud_vgpus", "gauge", "vGPUs served.");
    o.sample("vgpud_vgpus", "", gpu.vgpus);
    o.head(
        "vgpud_profile_available_instances",
        "gauge",
        "vGPUs of each profile that can still be created.",
    );
    for p in daemon.profiles() {
        o.sample(
            "vgpud_profile_available_instances",
            &format!("profile=\"{}\"", esc(&p.name)),
            p.available,
        );
    }
    o.head(
        "vgpud_api_responses_total",
        "counter",
        "API responses by status class.",
    );
    for (i, class) in ["2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
        o.sample(
            "vgpud_api_responses_total",
            &format!("class=\"{class}\""),
            api.responses[i].load(Ordering::Relaxed),
        );
    }
    o.head(
        "vgpud_api_request_duration_seconds",
        "histogram",
        "API request handling time.",
    );
    o.histogram(
        "vgpud_api_request_duration_seconds",
        "",
        &api.latency.snapshot(),
    );

    let vgpus = daemon.counters();
    let vl = |c: &VgpuCounters| format!("vgpu=\"{}\",name=\"{}\"", c.info.id, esc(&c.info.name));
    let per_vgpu: [(&str, &str, &str, VgpuField); 5] = [
        (
            "vgpu_connected",
            "gauge",
            "Whether a VMM is attached.",
            |c| u64::from(c.info.connected),
        ),
        ("vgpu_paused", "gauge", "Whether the vGPU is paused.", |c| {
            u64::from(c.info.paused)
        }),
        (
            "vgpu_audit_events_total",
            "counter",
            "Audit events (rejected or faulted commands, watchdog resets).",
            |c| c.audit_events,
        ),
        (
            "vgpu_bad_accesses_total",
            "counter",
            "Malformed or dropped guest register accesses.",
            |c| c.bad_accesses,
        ),
        (
            "vgpu_vfio_user_messages_total",
            "counter",
            "vfio-user messages received.",
            |c| c.vfio.messages,
        ),
    ];
    for (name, kind, help, f) in per_vgpu {
        o.head(name, kind, help);
        for c in &vgpus {
            o.sample(name, &vl(c), f(c));
        }
    }
    o.head(
        "vgpu_trap_latency_seconds",
        "histogram",
        "Time spent handling one trapped region access from the VMM.",
    );
    for c in &vgpus {
        o.histogram("vgpu_trap_latency_seconds", &vl(c), &c.trap);
    }

    let per_engine: [(&str, &str, &str, EngineField); 8] = [
        (
            "vgpu_engine_busy_seconds_total",
            "counter",
            "Engine time spent executing the vGPU's commands.",
            |e| secs(e.busy_ns),
        ),
        (
            "vgpu_engine_busy_ratio",
            "gauge",
            "Engine utilisation by the vGPU over the last sampling window (0-1).",
            |e| format!("{:.4}", e.busy_pct / 100.0),
        ),
        (
            "vgpu_engine_commands_total",
            "counter",
            "Commands executed.",
            |e| e.commands.to_string(),
        ),
        (
            "vgpu_engine_bytes_total",
            "counter",
            "Bytes read and written by operations.",
            |e| e.bytes.to_string(),
        ),
        (
            "vgpu_engine_submissions_total",
            "counter",
            "Submissions (doorbells) accepted.",
            |e| e.submissions.to_string(),
        ),
        (
            "vgpu_engine_preemptions_total",
            "counter",
            "Slices preempted at a command boundary with work left.",
            |e| e.preemptions.to_string(),
        ),
        (
            "vgpu_engine_resets_total",
            "counter",
            "Engine resets (guest, host or watchdog).",
            |e| e.resets.to_string(),
        ),
        (
            "vgpu_engine_audit_events_total",
            "counter",
            "Audit events on the engine.",
            |e| e.audits.to_string(),
        ),
    ];
    for (name, kind, help, f) in per_engine {
        o.head(name, kind, help);
        for c in &vgpus {
            for e in &c.engines {
                let l = format!("{},engine=\"{}\"", vl(c), e.engine.name());
                o.sample(name, &l, f(e));
            }
        }
    }
    o.head(
        "vgpu_submission_latency_seconds",
        "histogram",
        "Doorbell to completion of the submission's last command.",
    );
    for c in &vgpus {
        for e in &c.engines {
            let l = format!("{},engine=\"{}\"", vl(c), e.engine.name());
            o.histogram("vgpu_submission_latency_seconds", &l, &e.latency);
        }
    }
    o.head(
        "vgpu_slice_seconds",
        "histogram",
        "Length of the scheduler slices that executed commands.",
    );
    for c in &vgpus {
        for e in &c.engines {
            let l = format!("{},engine=\"{}\"", vl(c), e.engine.name());
            o.histogram("vgpu_slice_seconds", &l, &e.slices);
        }
    }
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_secs_formats_exact_decimal() {
        assert_eq!(secs(1_000), "0.000001");
        assert_eq!(secs(2_500_000_000), "2.5");
        assert_eq!(secs(3_000_000_000), "3");
        assert_eq!(secs(0), "0");
    }

    #[test]
    fn test_histogram_rendering_is_cumulative_with_inf() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(1));
        h.observe(Duration::from_secs(100));
        let mut o = Out(String::new());
        o.histogram("x", "a=\"b\"", &h.snapshot());
        let lines: Vec<&str> = o.0.lines().collect();
        assert_eq!(lines[0], "x_bucket{a=\"b\",le=\"0.000001\"} 1");
        assert!(lines.contains(&"x_bucket{a=\"b\",le=\"2.5\"} 1"));
        assert!(lines.contains(&"x_bucket{a=\"b\",le=\"+Inf\"} 2"));
        assert!(lines.contains(&"x_count{a=\"b\"} 2"));
        assert!(lines.contains(&"x_sum{a=\"b\"} 100.000001"));
    }

    #[test]
    fn test_label_escape_quotes_backslashes_newlines() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
