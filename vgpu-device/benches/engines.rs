//! Engine, GTT-mode and scheduler benchmarks of the software GPU.
//!
//! ```sh
//! cargo bench -p vgpu-device --bench engines -- [--quick] [--json PATH] [blit] [compute] [media] [sched]
//! ```
//!
//! Every figure is a ratio of two things measured side by side in the same run (interleaved
//! repetitions, medians), never an absolute number compared with a constant: the machines are
//! small and noisy. `--quick` shrinks sizes and repetitions (a CI smoke test, under 20 s); the
//! default full mode takes a few minutes on 2 cores. Section names select sections (default:
//! all). `--json PATH` writes the tables as JSON.
//!
//! - `blit`: blit copy and fill throughput through the GGTT in both GTT modes, engine only
//!   (`run_slice` on the scanned submission) and the whole submit -> idle path, against host
//!   `copy_from_slice` / `fill` of the same bytes (and a memcpy inside local memory itself).
//! - `compute`: the `saxpy`, `reduce` and `matmul` kernels through the compute engine in both
//!   GTT modes (engine only, and submit -> idle) against the same loops run natively on the
//!   host over the same inputs in host `Vec`s; results compared bit-exact.
//! - `media`: a GTT-update-heavy transcoding loop (remap PPGTT leaves, `TLB_INVALIDATE`,
//!   `VIDEO_CSC_SCALE` through the PPGTT) in a shadow and a two-dim vGPU, outputs checked
//!   bit-exact against a host reference; and the same frames without remaps.
//! - `sched`: delivered engine-time shares against the policy's targets with 2..64 busy vGPUs,
//!   and the speed-up of two vGPUs on different engines over the same work serialised.

// Reporting code converts counts and nanoseconds to f64 and back; all values are far below
// 2^52, so the float/int casts lose nothing that matters for a figure.
#![allow(clippy::cast_possible_truncation)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vgpu_abi::cmd::{
    enc, BPP_32, CSC_NV12_TO_XRGB, KERNEL_MATMUL, KERNEL_REDUCE_SUM, KERNEL_SAXPY, ROP_PATCOPY,
    ROP_SRCCOPY,
};
use vgpu_abi::gtt::{ppgtt_index, pte_guest, pte_local, PTE_ADDR_MASK, PTE_VALID};
use vgpu_abi::{regs, Engine, PAGE_SIZE};
use vgpu_device::addr::{Gpa, LmemOffset};
use vgpu_device::dma::DmaMap;
use vgpu_device::driver::{DeviceAccess, Driver};
use vgpu_device::engine::exec::{run_slice, run_until_idle, SliceEnd};
use vgpu_device::engine::translate::Tlb;
use vgpu_device::phys::{profile, PhysGpu, PhysGpuConfig};
use vgpu_device::sched::{Policy, SchedConfig, SchedParams, Scheduler};
use vgpu_device::vgpu::{GttMode, Vgpu, VgpuConfig, VgpuShared};
use vm_memory::MmapRegion;

const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Options, statistics, tables, JSON.

struct Opts {
    quick: bool,
    json: Option<String>,
    sections: Vec<String>,
}

impl Opts {
    fn parse() -> Opts {
        let mut o = Opts {
            quick: false,
            json: None,
            sections: Vec::new(),
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--quick" => o.quick = true,
                "--json" => o.json = args.next(),
                "blit" | "compute" | "media" | "sched" => o.sections.push(a),
                // `cargo bench` passes `--bench`; ignore it and any other harness flag.
                _ => {}
            }
        }
        o
    }

    fn wants(&self, s: &str) -> bool {
        self.sections.is_empty() || self.sections.iter().any(|x| x == s)
    }

    /// `quick` or `full`.
    fn pick<T>(&self, quick: T, full: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// A minimal JSON value (the workspace has no JSON serializer among this crate's dependencies).
enum J {
    N(f64),
    S(String),
    B(bool),
    A(Vec<J>),
    O(Vec<(String, J)>),
}

impl J {
    fn obj(pairs: Vec<(&str, J)>) -> J {
        J::O(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }

    fn write(&self, out: &mut String, indent: usize) {
        let pad = "  ".repeat(indent + 1);
        match self {
            J::N(x) if x.is_finite() => {
                let _ = write!(out, "{x}");
            }
            J::N(_) => out.push_str("null"),
            J::S(s) => {
                out.push('"');
                for c in s.chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        '\n' => out.push_str("\\n"),
                        c if (c as u32) < 0x20 => {
                            let _ = write!(out, "\\u{:04x}", c as u32);
                        }
                        c => out.push(c),
                    }
                }
                out.push('"');
            }
            J::B(b) => out.push_str(if *b { "true" } else { "false" }),
            J::A(v) => {
                out.push('[');
                for (i, x) in v.iter().enumerate() {
                    out.push_str(if i == 0 { "\n" } else { ",\n" });
                    out.push_str(&pad);
                    x.write(out, indent + 1);
                }
                if !v.is_empty() {
                    out.push('\n');
                    out.push_str(&"  ".repeat(indent));
                }
                out.push(']');
            }
            J::O(v) => {
                out.push('{');
                for (i, (k, x)) in v.iter().enumerate() {
                    out.push_str(if i == 0 { "\n" } else { ",\n" });
                    out.push_str(&pad);
                    J::S(k.clone()).write(out, indent + 1);
                    out.push_str(": ");
                    x.write(out, indent + 1);
                }
                if !v.is_empty() {
                    out.push('\n');
                    out.push_str(&"  ".repeat(indent));
                }
                out.push('}');
            }
        }
    }
}

impl From<f64> for J {
    fn from(x: f64) -> J {
        J::N(x)
    }
}
impl From<u64> for J {
    fn from(x: u64) -> J {
        J::N(x as f64)
    }
}
impl From<usize> for J {
    fn from(x: usize) -> J {
        J::N(x as f64)
    }
}
impl From<u32> for J {
    fn from(x: u32) -> J {
        J::N(f64::from(x))
    }
}
impl From<&str> for J {
    fn from(x: &str) -> J {
        J::S(x.to_string())
    }
}
impl From<String> for J {
    fn from(x: String) -> J {
        J::S(x)
    }
}
impl From<bool> for J {
    fn from(x: bool) -> J {
        J::B(x)
    }
}

/// Prints a table with right-aligned columns (the first left-aligned).
fn table(title: &str, headers: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    println!("\n{title}");
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i == 0 {
                let _ = write!(s, "{c:<width$}", width = w[0]);
            } else {
                let _ = write!(s, "  {c:>width$}", width = w[i]);
            }
        }
        println!("{}", s.trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    println!(
        "{}",
        "-".repeat(w.iter().sum::<usize>() + 2 * (w.len() - 1))
    );
    for r in rows {
        line(r.clone());
    }
}

// ---------------------------------------------------------------------------------------------
// Device plumbing.

/// The benchmark's transport: the driver owns the vGPU. `inline`: `progress` runs the engines in
/// the calling thread (no scheduler); otherwise a scheduler runs them and `progress` sleeps.
struct Own {
    v: Vgpu,
    inline: bool,
    poll: Duration,
}

impl DeviceAccess for Own {
    fn bar0_read(&mut self, offset: u64, data: &mut [u8]) {
        self.v.bar0_read(offset, data);
    }
    fn bar0_write(&mut self, offset: u64, data: &[u8]) {
        self.v.bar0_write(offset, data);
    }
    fn bar2_read(&mut self, offset: u64, data: &mut [u8]) {
        self.v.bar2_read(offset, data);
    }
    fn bar2_write(&mut self, offset: u64, data: &[u8]) {
        self.v.bar2_write(offset, data);
    }
    fn progress(&mut self) {
        if self.inline {
            run_until_idle(self.v.shared(), 1000);
        } else {
            std::thread::sleep(self.poll);
        }
    }
}

fn phys(lmem: u64) -> PhysGpu {
    PhysGpu::new(PhysGpuConfig {
        lmem_size: lmem,
        max_vgpus: 64,
    })
    .expect("software GPU")
}

/// A driver owning a new vGPU of `profile`, its engines run inline.
fn new_driver(phys: &mut PhysGpu, name: &str, mode: GttMode) -> (Driver<Own>, Arc<VgpuShared>) {
    let part = phys
        .create_partition(profile(name).expect("profile"))
        .expect("admission");
    let v = Vgpu::new(
        part,
        &VgpuConfig {
            gtt_mode: mode,
            ..Default::default()
        },
    )
    .expect("vgpu");
    let shared = v.shared().clone();
    let d = Driver::probe(Own {
        v,
        inline: true,
        poll: Duration::from_micros(100),
    })
    .expect("probe");
    (d, shared)
}

fn mode_name(m: GttMode) -> &'static str {
    match m {
        GttMode::Shadow => "shadow",
        GttMode::TwoDim => "two-dim",
    }
}

/// Deterministic pseudo-random bytes.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

// ---------------------------------------------------------------------------------------------
// (a) Blit throughput.

/// One engine-only execution of `cmds` (already known to be one command) on engine `e`: the
/// doorbell and scan happen in `submit`, outside the timed region; the slice runs on the
/// caller's engine TLB.
fn engine_only(d: &mut Driver<Own>, s: &VgpuShared, tlb: &mut Tlb, e: Engine, cmds: &[u32]) -> f64 {
    d.submit(e, cmds).expect("submit");
    let t0 = Instant::now();
    let r = run_slice(s, e, tlb, Duration::from_secs(60));
    let dt = secs(t0.elapsed());
    assert!(
        r.end == SliceEnd::Idle && r.commands == 1,
        "{} command did not complete: {r:?}",
        e.name()
    );
    dt
}

/// Submit (ring write, doorbell, scan) on engine `e` through to idle.
fn full_path(d: &mut Driver<Own>, e: Engine, cmds: &[u32]) -> f64 {
    let t0 = Instant::now();
    d.submit(e, cmds).expect("submit");
    d.wait_idle(e, WAIT).expect("idle");
    secs(t0.elapsed())
}

/// Bytes to read to evict the last-level cache: twice its size (from sysfs), 64..768 MiB.
fn evict_bytes() -> u64 {
    let llc = (0..8)
        .filter_map(|i| {
            let s = std::fs::read_to_string(format!(
                "/sys/devices/system/cpu/cpu0/cache/index{i}/size"
            ))
            .ok()?;
            let s = s.trim();
            let (num, mul) = match s.strip_suffix('K') {
                Some(n) => (n, 1024),
                None => match s.strip_suffix('M') {
                    Some(n) => (n, MIB),
                    None => (s, 1),
                },
            };
            num.parse::<u64>().ok().map(|n| n * mul)
        })
        .max()
        .unwrap_or(32 * MIB);
    (2 * llc).clamp(64 * MIB, 768 * MIB)
}

struct BlitRig {
    mode: GttMode,
    d: Driver<Own>,
    s: Arc<VgpuShared>,
    tlb: Tlb,
}

fn bench_blit(o: &Opts, out: &mut Vec<(String, J)>) {
    // (name, width, height) at 32 bpp, dense pitch.
    let cases: &[(&str, u32, u32)] = &[("16 MiB", 4096, 1024), ("1 MiB", 512, 512)];
    let (src_off, dst_off) = (0u64, 32 * MIB);
    // memcpy inside local memory itself (same memfd pages as the engine uses).
    let (lsrc_off, ldst_off) = (64 * MIB, 96 * MIB);
    let mut phys = phys(1 << 30);
    let mut rigs: Vec<BlitRig> = [GttMode::Shadow, GttMode::TwoDim]
        .into_iter()
        .map(|mode| {
            let (d, s) = new_driver(&mut phys, "medium", mode);
            BlitRig {
                mode,
                d,
                s,
                tlb: Tlb::default(),
            }
        })
        .collect();
    let lbase = rigs[0]
        .s
        .lmem()
        .page(LmemOffset(0))
        .expect("lmem page")
        .as_ptr();

    let mut rows = Vec::new();
    let mut jrows = Vec::new();
    for &(name, w, h) in cases {
        let bytes = u64::from(w) * u64::from(h) * 4;
        let n = usize::try_from(bytes).expect("size");
        let iters: usize = o.pick(
            if bytes >= 8 * MIB { 5 } else { 21 },
            if bytes >= 8 * MIB { 31 } else { 201 },
        );
        let src = pattern(n, 7);
        let mut hdst = vec![0u8; n];
        let hsrc = src.clone();
        hdst.copy_from_slice(&hsrc);
        // SAFETY: `lbase` is the start of the shadow vGPU's local-memory slice (256 MiB, one
        // contiguous range of the memfd mapping, alive as long as `rigs`); the two ranges of
        // `n` <= 16 MiB bytes at 64 and 96 MiB lie inside it, do not overlap, and no engine
        // touches them.
        let (lsrc, ldst) = unsafe {
            (
                lbase.add(usize::try_from(lsrc_off).expect("off")),
                lbase.add(usize::try_from(ldst_off).expect("off")),
            )
        };
        // SAFETY: as above; touch both ranges so the timed copies do not fault pages in.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), lsrc, n);
            std::ptr::write_bytes(ldst, 0, n);
        }
        let pitch = w * 4;
        let mut cmds = Vec::new();
        for r in &mut rigs {
            r.d.lmem_write(src_off, &src);
            r.d.lmem_write(dst_off, &vec![0u8; n]);
            let gm = |off| r.d.gm_of_lmem(off);
            let copy = enc::src_copy_blt(enc::Copy {
                rop: ROP_SRCCOPY,
                bpp: BPP_32,
                dst: gm(dst_off),
                dst_pitch: pitch,
                src: gm(src_off),
                src_pitch: pitch,
                width: w,
                height: h,
                pattern: 0,
            })
            .to_vec();
            let fill_u =
                enc::color_blt(ROP_PATCOPY, BPP_32, gm(dst_off), pitch, w, h, 0x5A5A_5A5A).to_vec();
            let fill_p =
                enc::color_blt(ROP_PATCOPY, BPP_32, gm(dst_off), pitch, w, h, 0x1234_5678).to_vec();
            // Warm up and verify each operation once.
            full_path(&mut r.d, Engine::Blit, &copy);
            let mut back = vec![0u8; n];
            r.d.lmem_read(dst_off, &mut back);
            assert!(back == src, "{} copy result differs", mode_name(r.mode));
            full_path(&mut r.d, Engine::Blit, &fill_p);
            r.d.lmem_read(dst_off, &mut back);
            assert!(
                back.chunks_exact(4)
                    .all(|p| p == 0x1234_5678u32.to_le_bytes()),
                "pattern fill result"
            );
            full_path(&mut r.d, Engine::Blit, &fill_u);
            r.d.lmem_read(dst_off, &mut back);
            assert!(back.iter().all(|&b| b == 0x5A), "fill result");
            cmds.push([copy, fill_u, fill_p]);
        }

        // What each measurement runs.
        #[derive(Clone, Copy)]
        enum P {
            HostCopy,
            LmemCopy,
            Memset,
            Fill32,
            /// (rig, command: 0 copy, 1 fill, 2 fill32), engine only.
            Engine(usize, usize),
            /// (rig, command), submit -> idle.
            Full(usize, usize),
        }
        let mut plan: Vec<(&str, String, P)> = vec![
            ("copy", "host copy_from_slice".into(), P::HostCopy),
            ("copy", "host memcpy in lmem".into(), P::LmemCopy),
            ("fill", "host memset".into(), P::Memset),
            ("fill32", "host u32 fill".into(), P::Fill32),
        ];
        for (i, r) in rigs.iter().enumerate() {
            let m = mode_name(r.mode);
            plan.push(("copy", format!("{m} engine"), P::Engine(i, 0)));
            plan.push(("copy", format!("{m} submit->idle"), P::Full(i, 0)));
            plan.push(("fill", format!("{m} engine"), P::Engine(i, 1)));
            plan.push(("fill", format!("{m} submit->idle"), P::Full(i, 1)));
            plan.push(("fill32", format!("{m} engine"), P::Engine(i, 2)));
        }
        let run = |p: P, rigs: &mut [BlitRig], hdst: &mut Vec<u8>| -> f64 {
            let t0 = Instant::now();
            match p {
                P::HostCopy => hdst.copy_from_slice(&hsrc),
                // SAFETY: see above: disjoint ranges of `n` bytes inside local memory.
                P::LmemCopy => unsafe { std::ptr::copy_nonoverlapping(lsrc, ldst, n) },
                P::Memset => hdst.fill(0x5A),
                P::Fill32 => {
                    // SAFETY: any bytes are valid u32s; `align_to_mut` handles the alignment.
                    let (head, words, tail) = unsafe { hdst.align_to_mut::<u32>() };
                    head.fill(0x78);
                    words.fill(0x1234_5678);
                    tail.fill(0x78);
                }
                P::Engine(i, c) => {
                    let r = &mut rigs[i];
                    return engine_only(&mut r.d, &r.s, &mut r.tlb, Engine::Blit, &cmds[i][c]);
                }
                P::Full(i, c) => return full_path(&mut rigs[i].d, Engine::Blit, &cmds[i][c]),
            }
            std::hint::black_box(&mut *hdst);
            secs(t0.elapsed())
        };
        // Large surfaces are measured cache-cold (reading twice the last-level cache evicts it
        // before every run), small ones cache-warm (the same run once, untimed, just before).
        let cold = bytes >= 8 * MIB;
        let scratch = if cold {
            pattern(usize::try_from(evict_bytes()).expect("size"), 3)
        } else {
            Vec::new()
        };
        let evict = || {
            let sum = scratch
                .iter()
                .step_by(64)
                .fold(0u64, |a, &b| a.wrapping_add(u64::from(b)));
            std::hint::black_box(sum);
        };
        // Interleaved repetitions. Keys: (op, path).
        let mut t: BTreeMap<(&str, String), Vec<f64>> = BTreeMap::new();
        for _ in 0..iters {
            for (op, path, p) in &plan {
                if cold {
                    evict();
                } else {
                    run(*p, &mut rigs, &mut hdst);
                }
                let v = run(*p, &mut rigs, &mut hdst);
                t.entry((op, path.clone())).or_default().push(v);
            }
        }
        let gbs = |s: f64| bytes as f64 / s / 1e9;
        for op in ["copy", "fill", "fill32"] {
            let base_key = match op {
                "copy" => "host copy_from_slice",
                "fill" => "host memset",
                _ => "host u32 fill",
            };
            let base = median(&t[&(op, base_key.to_string())]);
            for ((o2, path), v) in &t {
                if *o2 != op {
                    continue;
                }
                let m = median(v);
                let ratio = base / m;
                rows.push(vec![
                    format!("{op} {name}{}", if cold { " cold" } else { " warm" }),
                    path.clone(),
                    format!("{:.1}", m * 1e6),
                    format!("{:.2}", gbs(m)),
                    format!("{ratio:.2}x"),
                ]);
                jrows.push(J::obj(vec![
                    ("op", op.into()),
                    ("size", name.into()),
                    ("cache", if cold { "cold" } else { "warm" }.into()),
                    ("bytes", bytes.into()),
                    ("path", path.clone().into()),
                    ("median_us", (m * 1e6).into()),
                    ("gb_per_s", gbs(m).into()),
                    ("ratio_vs_host", ratio.into()),
                    ("iterations", iters.into()),
                ]));
            }
        }
    }
    table(
        "(a) Blit throughput through the GGTT (32 bpp, dense pitch; copy = XY_SRC_COPY_BLT \
         SRCCOPY, fill = XY_COLOR_BLT PATCOPY of a one-byte colour, fill32 = of a 32-bit colour; \
         ratio = host median / path median, target engine >= 0.8x)",
        &["operation", "path", "median us", "GB/s", "vs host"],
        &rows,
    );
    out.push(("blit".into(), J::A(jrows)));
}

// ---------------------------------------------------------------------------------------------
// (a2) Compute kernels against the same loops run natively.

/// Local-memory layout of the compute section (a `compute` vGPU has 256 MiB).
const CX_LMEM: u64 = 0;
const CY_LMEM: u64 = 32 * MIB;
const CR_LMEM: u64 = 64 * MIB;
const CRC_LMEM: u64 = 160 * MIB;
const CMA_LMEM: u64 = 176 * MIB;
const CMB_LMEM: u64 = 184 * MIB;
const CMC_LMEM: u64 = 192 * MIB;
const SAXPY_A: f32 = -1.5;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The host's `saxpy`: a rounded multiply, then a rounded add (Rust never fuses them).
fn native_saxpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        let prod = a * x;
        *y += prod;
    }
}

/// The host's `reduce`: wrapping u64 sum of u32 elements.
fn native_reduce(x: &[u32]) -> u64 {
    x.iter().fold(0u64, |s, &v| s.wrapping_add(u64::from(v)))
}

/// The host's `matmul`, row by row with the sum over k ascending (the order the kernel
/// specifies), into `c`.
fn native_matmul(a: &[f32], b: &[f32], c: &mut [f32], n: usize) {
    for (arow, crow) in a.chunks_exact(n).zip(c.chunks_exact_mut(n)) {
        crow.fill(0.0);
        for (&av, brow) in arow.iter().zip(b.chunks_exact(n)) {
            for (s, &bv) in crow.iter_mut().zip(brow) {
                let prod = av * bv;
                *s += prod;
            }
        }
    }
}

fn bench_compute(o: &Opts, out: &mut Vec<(String, J)>) {
    let n_saxpy: u32 = o.pick(1 << 20, 1 << 22);
    let n_reduce: u32 = o.pick(1 << 22, 1 << 24);
    let mm: u32 = o.pick(128, 256);
    let iters: usize = o.pick(3, 15);
    let mut phys = phys(1 << 30);
    let mut rigs: Vec<BlitRig> = [GttMode::Shadow, GttMode::TwoDim]
        .into_iter()
        .map(|mode| {
            let (d, s) = new_driver(&mut phys, "compute", mode);
            BlitRig {
                mode,
                d,
                s,
                tlb: Tlb::default(),
            }
        })
        .collect();
    // Inputs: the same values on the host and in every vGPU.
    let xs: Vec<f32> = (0..n_saxpy)
        .map(|i| (i % 1000) as f32 * 0.25 - 100.0)
        .collect();
    let ys0: Vec<f32> = (0..n_saxpy).map(|i| (i % 777) as f32 * 0.5).collect();
    let rs: Vec<u32> = (0..n_reduce)
        .map(|i| i.wrapping_mul(2_654_435_761))
        .collect();
    let mmn = mm as usize;
    let ma: Vec<f32> = (0..mmn * mmn)
        .map(|i| (i % 97) as f32 * 0.01 - 0.3)
        .collect();
    let mb: Vec<f32> = (0..mmn * mmn)
        .map(|i| (i % 89) as f32 * 0.02 - 0.7)
        .collect();
    let mut ys = ys0.clone();
    let mut mc = vec![0f32; mmn * mmn];
    let mut cmds: Vec<[Vec<u32>; 3]> = Vec::new();
    let mut identical = true;
    // Host results of one application, for the check.
    let mut want_y = ys0.clone();
    native_saxpy(SAXPY_A, &xs, &mut want_y);
    let want_sum = native_reduce(&rs);
    native_matmul(&ma, &mb, &mut mc, mmn);
    let want_c = mc.clone();
    for r in &mut rigs {
        let d = &mut r.d;
        d.lmem_write(CX_LMEM, &f32_bytes(&xs));
        d.lmem_write(CY_LMEM, &f32_bytes(&ys0));
        d.lmem_write(CR_LMEM, &u32_bytes(&rs));
        d.lmem_write(CMA_LMEM, &f32_bytes(&ma));
        d.lmem_write(CMB_LMEM, &f32_bytes(&mb));
        let gm = |off| d.gm_of_lmem(off);
        let saxpy = enc::dispatch(enc::Dispatch {
            kernel: KERNEL_SAXPY,
            params: [n_saxpy, 0, 0],
            scalar: SAXPY_A,
            buffers: [gm(CX_LMEM), gm(CY_LMEM), 0],
        })
        .to_vec();
        let reduce = enc::dispatch(enc::Dispatch {
            kernel: KERNEL_REDUCE_SUM,
            params: [n_reduce, 0, 0],
            scalar: 0.0,
            buffers: [gm(CR_LMEM), 0, gm(CRC_LMEM)],
        })
        .to_vec();
        let matmul = enc::dispatch(enc::Dispatch {
            kernel: KERNEL_MATMUL,
            params: [mm, mm, mm],
            scalar: 0.0,
            buffers: [gm(CMA_LMEM), gm(CMB_LMEM), gm(CMC_LMEM)],
        })
        .to_vec();
        // One application of each, compared bit-exact with the host's.
        for c in [&saxpy, &reduce, &matmul] {
            full_path(d, Engine::Compute, c);
        }
        let mut yb = vec![0u8; n_saxpy as usize * 4];
        d.lmem_read(CY_LMEM, &mut yb);
        identical &= yb == f32_bytes(&want_y);
        let mut sb = [0u8; 8];
        d.lmem_read(CRC_LMEM, &mut sb);
        identical &= u64::from_le_bytes(sb) == want_sum;
        let mut cb = vec![0u8; mmn * mmn * 4];
        d.lmem_read(CMC_LMEM, &mut cb);
        identical &= cb == f32_bytes(&want_c);
        cmds.push([saxpy, reduce, matmul]);
    }
    assert!(identical, "compute results differ from the host's");

    #[derive(Clone, Copy)]
    enum P {
        Native(usize),
        /// (rig, kernel), engine only.
        Engine(usize, usize),
        /// (rig, kernel), submit -> idle.
        Full(usize, usize),
    }
    let kernels = ["saxpy", "reduce", "matmul"];
    let mut plan: Vec<(usize, String, P)> = Vec::new();
    for k in 0..3 {
        plan.push((k, "native host loop".into(), P::Native(k)));
        for (i, r) in rigs.iter().enumerate() {
            let m = mode_name(r.mode);
            plan.push((k, format!("{m} engine"), P::Engine(i, k)));
            plan.push((k, format!("{m} submit->idle"), P::Full(i, k)));
        }
    }
    let mut t: BTreeMap<(usize, String), Vec<f64>> = BTreeMap::new();
    for _ in 0..iters {
        for (k, path, p) in &plan {
            let v = match *p {
                P::Native(k) => {
                    let t0 = Instant::now();
                    match k {
                        0 => native_saxpy(SAXPY_A, &xs, &mut ys),
                        1 => {
                            std::hint::black_box(native_reduce(std::hint::black_box(&rs)));
                        }
                        _ => native_matmul(&ma, &mb, &mut mc, mmn),
                    }
                    std::hint::black_box((&mut ys, &mut mc));
                    secs(t0.elapsed())
                }
                P::Engine(i, k) => {
                    let r = &mut rigs[i];
                    engine_only(&mut r.d, &r.s, &mut r.tlb, Engine::Compute, &cmds[i][k])
                }
                P::Full(i, k) => full_path(&mut rigs[i].d, Engine::Compute, &cmds[i][k]),
            };
            t.entry((*k, path.clone())).or_default().push(v);
        }
    }
    let mut rows = Vec::new();
    let mut jrows = Vec::new();
    for (k, name) in kernels.iter().enumerate() {
        let (size, work, unit) = match k {
            0 => (
                format!("{} M elements", n_saxpy >> 20),
                12.0 * f64::from(n_saxpy) / 1e9,
                "GB/s",
            ),
            1 => (
                format!("{} M elements", n_reduce >> 20),
                4.0 * f64::from(n_reduce) / 1e9,
                "GB/s",
            ),
            _ => (
                format!("{mm}x{mm}x{mm}"),
                2.0 * f64::from(mm).powi(3) / 1e9,
                "GFLOP/s",
            ),
        };
        let base = median(&t[&(k, "native host loop".to_string())]);
        for ((k2, path), v) in &t {
            if *k2 != k {
                continue;
            }
            let m = median(v);
            let ratio = base / m;
            rows.push(vec![
                format!("{name} {size}"),
                path.clone(),
                format!("{:.1}", m * 1e6),
                format!("{:.2} {unit}", work / m),
                format!("{ratio:.2}x"),
            ]);
            jrows.push(J::obj(vec![
                ("kernel", (*name).into()),
                ("size", size.clone().into()),
                ("path", path.clone().into()),
                ("median_us", (m * 1e6).into()),
                ("rate", (work / m).into()),
                ("unit", unit.into()),
                ("ratio_vs_native", ratio.into()),
                ("iterations", iters.into()),
                ("identical", identical.into()),
            ]));
        }
    }
    table(
        "(a2) Compute kernels through the compute engine vs the same loop natively on the host \
         (same inputs; saxpy GB/s counts 12 bytes per element, reduce 4, matmul 2 flops per \
         multiply-add; ratio = native median / path median; results bit-identical: yes)",
        &["kernel", "path", "median us", "rate", "vs native"],
        &rows,
    );
    out.push(("compute".into(), J::A(jrows)));
}

// ---------------------------------------------------------------------------------------------
// (b) GTT-update-heavy media transcoding.

const RAM_GPA: u64 = 0x1_0000_0000;
const RAM_SIZE: u64 = 8 * MIB;
const SRC_W: u32 = 640;
const SRC_H: u32 = 360;
const DST_W: u32 = 320;
const DST_H: u32 = 180;
/// Pages of one NV12 source frame (640 x 540 bytes) and of one XRGB output (320 x 180 x 4).
const SRC_PAGES: u64 = (SRC_W as u64 * (SRC_H as u64 * 3 / 2)).div_ceil(PAGE_SIZE);
const DST_PAGES: u64 = (DST_W as u64 * DST_H as u64 * 4).div_ceil(PAGE_SIZE);
const WIN_PAGES: u64 = SRC_PAGES + DST_PAGES;
/// Frame buffer sets the guest rotates through.
const SETS: u64 = 8;
/// PPGTT VA of the window the remapping guest points at a new set every frame.
const REMAP_VA: u64 = 0x10_0000_0000;
/// PPGTT VA of set `j`'s permanently mapped window (no remaps), 2 MiB apart.
const STATIC_VA: u64 = 0x20_0000_0000;
/// PPGTT VA of the guest's other buffers.
const FILLER_VA: u64 = 0x40_0000_0000;
/// Local memory of the frame sets, and of the pool the other buffers map (reused cyclically).
const SETS_LMEM: u64 = 0;
const FILLER_LMEM: u64 = 16 * MIB;
const FILLER_POOL_PAGES: u64 = 4096;

fn set_lmem(j: u64) -> u64 {
    SETS_LMEM + j * WIN_PAGES * PAGE_SIZE
}

/// A guest's PPGTT in its RAM, built and edited by the guest (plain memory writes: the device
/// never traps them).
struct Ppgtt {
    ram: Arc<MmapRegion>,
    next: u64,
    root: u64,
    tables: usize,
}

impl Ppgtt {
    fn new(ram: Arc<MmapRegion>) -> Ppgtt {
        let mut p = Ppgtt {
            ram,
            next: RAM_GPA,
            root: 0,
            tables: 0,
        };
        p.root = p.alloc();
        p
    }

    fn ptr(&self, gpa: u64) -> *mut u8 {
        let off = gpa - RAM_GPA;
        assert!(off + 8 <= RAM_SIZE, "outside guest RAM");
        // SAFETY: `off + 8 <= RAM_SIZE`, the size of the mapping.
        unsafe { self.ram.as_ptr().add(usize::try_from(off).expect("offset")) }
    }

    fn write(&self, gpa: u64, v: u64) {
        // SAFETY: `ptr` checked the 8 bytes lie inside guest RAM; the device only reads them.
        unsafe { std::ptr::write_unaligned(self.ptr(gpa).cast::<u64>(), v.to_le()) }
    }

    fn read(&self, gpa: u64) -> u64 {
        // SAFETY: as in `write`.
        u64::from_le(unsafe { std::ptr::read_unaligned(self.ptr(gpa).cast::<u64>()) })
    }

    /// A zeroed table page.
    fn alloc(&mut self) -> u64 {
        let t = self.next;
        self.next += PAGE_SIZE;
        assert!(self.next <= RAM_GPA + RAM_SIZE, "guest RAM full");
        for i in 0..512 {
            self.write(t + 8 * i, 0);
        }
        self.tables += 1;
        t
    }

    /// GPA of the level-1 entry of `va`, creating tables on the way.
    fn leaf_slot(&mut self, va: u64) -> u64 {
        let mut table = self.root;
        for level in (2..=4).rev() {
            let slot = table + 8 * ppgtt_index(va, level);
            let e = self.read(slot);
            table = if e & PTE_VALID == 0 {
                let t = self.alloc();
                self.write(slot, pte_guest(t));
                t
            } else {
                e & PTE_ADDR_MASK
            };
        }
        table + 8 * ppgtt_index(va, 1)
    }

    fn map(&mut self, va: u64, pte: u64) -> u64 {
        let s = self.leaf_slot(va);
        self.write(s, pte);
        s
    }
}

struct MediaRig {
    mode: GttMode,
    d: Driver<Own>,
    pt: Ppgtt,
    /// Leaf-entry GPAs of the remap window's pages.
    remap_slots: Vec<u64>,
    mapped_pages: u64,
}

impl MediaRig {
    fn new(phys: &mut PhysGpu, mode: GttMode, filler_pages: u64, frames: &[Vec<u8>]) -> MediaRig {
        let (mut d, _) = new_driver(phys, "media", mode);
        let ram = Arc::new(MmapRegion::new(usize::try_from(RAM_SIZE).expect("size")).expect("ram"));
        let dma = DmaMap::new()
            .with_region(Gpa(RAM_GPA), RAM_SIZE, ram.clone(), 0, true)
            .expect("dma map");
        d.device().v.set_dma_map(dma);
        let mut pt = Ppgtt::new(ram);
        let mut mapped = 0;
        for i in 0..filler_pages {
            let off = FILLER_LMEM + (i % FILLER_POOL_PAGES) * PAGE_SIZE;
            pt.map(FILLER_VA + i * PAGE_SIZE, pte_local(off));
            mapped += 1;
        }
        for j in 0..SETS {
            for p in 0..WIN_PAGES {
                pt.map(
                    STATIC_VA + j * 2 * MIB + p * PAGE_SIZE,
                    pte_local(set_lmem(j) + p * PAGE_SIZE),
                );
                mapped += 1;
            }
        }
        let remap_slots = (0..WIN_PAGES)
            .map(|p| {
                pt.map(
                    REMAP_VA + p * PAGE_SIZE,
                    pte_local(set_lmem(0) + p * PAGE_SIZE),
                )
            })
            .collect();
        mapped += WIN_PAGES;
        for (j, f) in frames.iter().enumerate() {
            d.lmem_write(set_lmem(j as u64), f);
        }
        d.setup_ring(Engine::Video).expect("ring");
        d.set_ppgtt_root(Engine::Video, pte_guest(pt.root));
        MediaRig {
            mode,
            d,
            pt,
            remap_slots,
            mapped_pages: mapped,
        }
    }

    /// One frame: (remap the window to set `j` and invalidate, or use set `j`'s own window),
    /// then the conversion, to idle. Returns (doorbell incl. scan, total) seconds.
    fn frame(&mut self, j: u64, remap: bool) -> (f64, f64) {
        let t0 = Instant::now();
        let va = if remap {
            for (p, &slot) in self.remap_slots.iter().enumerate() {
                self.pt
                    .write(slot, pte_local(set_lmem(j) + p as u64 * PAGE_SIZE));
            }
            self.d
                .write32(regs::TLB_INVALIDATE, Engine::Video.mask_bit());
            REMAP_VA
        } else {
            STATIC_VA + j * 2 * MIB
        };
        let cmd = enc::csc_scale(enc::Csc {
            src: va,
            src_pitch: SRC_W,
            src_size: (SRC_W, SRC_H),
            dst: va + SRC_PAGES * PAGE_SIZE,
            dst_pitch: DST_W * 4,
            dst_size: (DST_W, DST_H),
            mode: CSC_NV12_TO_XRGB,
        });
        self.d.submit(Engine::Video, &cmd).expect("submit");
        let t1 = Instant::now();
        self.d.wait_idle(Engine::Video, WAIT).expect("idle");
        (secs(t1 - t0), secs(t0.elapsed()))
    }

    fn clear_outputs(&mut self) {
        let z = vec![0u8; usize::try_from(DST_PAGES * PAGE_SIZE).expect("size")];
        for j in 0..SETS {
            self.d.lmem_write(set_lmem(j) + SRC_PAGES * PAGE_SIZE, &z);
        }
    }

    fn output(&mut self, j: u64) -> Vec<u8> {
        let mut b = vec![0u8; (DST_W * DST_H * 4) as usize];
        self.d
            .lmem_read(set_lmem(j) + SRC_PAGES * PAGE_SIZE, &mut b);
        b
    }
}

/// Host reference of `VIDEO_CSC_SCALE` NV12 -> XRGB (docs/device-spec.md, section 8.8).
fn reference_csc(nv12: &[u8]) -> Vec<u8> {
    let (sw, sh, dw, dh) = (
        SRC_W as usize,
        SRC_H as usize,
        DST_W as usize,
        DST_H as usize,
    );
    let clamp = |x: i32| x.clamp(0, 255) as u8;
    let mut out = Vec::with_capacity(dw * dh * 4);
    for dy in 0..dh {
        let sy = dy * sh / dh;
        for dx in 0..dw {
            let sx = dx * sw / dw;
            let y = i32::from(nv12[sy * sw + sx]);
            let uv = sw * sh + (sy / 2) * sw + 2 * (sx / 2);
            let (u, v) = (i32::from(nv12[uv]), i32::from(nv12[uv + 1]));
            let (c, d, e) = (y - 16, u - 128, v - 128);
            let r = clamp((298 * c + 409 * e + 128) >> 8);
            let g = clamp((298 * c - 100 * d - 208 * e + 128) >> 8);
            let b = clamp((298 * c + 516 * d + 128) >> 8);
            out.extend_from_slice(&[b, g, r, 0xFF]);
        }
    }
    out
}

fn bench_media(o: &Opts, out: &mut Vec<(String, J)>) {
    let fillers: Vec<u64> = o.pick(vec![4096], vec![1024, 4096, 16384, 65536]);
    let rounds: usize = o.pick(3, 9);
    let frames_per_round: u64 = o.pick(8, 32);
    let frame_bytes = usize::try_from(SRC_W * SRC_H * 3 / 2).expect("size");
    let frames: Vec<Vec<u8>> = (0..SETS)
        .map(|j| pattern(frame_bytes, 100 + j as u32))
        .collect();
    let refs: Vec<Vec<u8>> = frames.iter().map(|f| reference_csc(f)).collect();
    let mut rows = Vec::new();
    let mut jrows = Vec::new();
    for &filler in &fillers {
        let mut phys = phys(512 * MIB);
        let mut rigs: Vec<MediaRig> = [GttMode::Shadow, GttMode::TwoDim]
            .into_iter()
            .map(|m| MediaRig::new(&mut phys, m, filler, &frames))
            .collect();
        let mapped = rigs[0].mapped_pages;
        let tables = rigs[0].pt.tables;
        for remap in [true, false] {
            // Verification: every set once, outputs bit-exact with the reference in both modes.
            let mut identical = true;
            for r in &mut rigs {
                r.clear_outputs();
                for j in 0..SETS {
                    r.frame(j, remap);
                }
                for j in 0..SETS {
                    let got = r.output(j);
                    assert!(
                        got == refs[j as usize],
                        "{} output of set {j} differs from the reference",
                        mode_name(r.mode)
                    );
                }
            }
            for j in 0..SETS {
                let (a, b) = (rigs[0].output(j), rigs[1].output(j));
                identical &= fnv(&a) == fnv(&b) && a == b;
            }
            assert!(identical, "modes disagree");
            // Timed rounds, alternating which mode goes first.
            let mut fps: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
            let mut submit: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
            let mut exec: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
            let mut ratios = Vec::new();
            for round in 0..rounds {
                let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
                let mut this = [0.0f64; 2];
                for i in order {
                    let r = &mut rigs[i];
                    let t0 = Instant::now();
                    for f in 0..frames_per_round {
                        let (s, t) = r.frame(f % SETS, remap);
                        submit[i].push(s);
                        exec[i].push(t - s);
                    }
                    this[i] = frames_per_round as f64 / secs(t0.elapsed());
                    fps[i].push(this[i]);
                }
                ratios.push(this[1] / this[0]);
            }
            let (fs, ft) = (median(&fps[0]), median(&fps[1]));
            let ratio = median(&ratios);
            let workload = if remap {
                "remap every frame"
            } else {
                "no remaps"
            };
            rows.push(vec![
                workload.to_string(),
                format!("{mapped}"),
                format!("{fs:.0}"),
                format!("{ft:.0}"),
                format!("{ratio:.2}x"),
                format!(
                    "{:.0} / {:.0}",
                    median(&submit[0]) * 1e6,
                    median(&exec[0]) * 1e6
                ),
                format!(
                    "{:.0} / {:.0}",
                    median(&submit[1]) * 1e6,
                    median(&exec[1]) * 1e6
                ),
                if identical { "yes" } else { "NO" }.to_string(),
            ]);
            jrows.push(J::obj(vec![
                ("workload", workload.into()),
                ("mapped_pages", mapped.into()),
                ("ppgtt_tables", tables.into()),
                ("frames_per_round", frames_per_round.into()),
                ("rounds", rounds.into()),
                ("shadow_fps", fs.into()),
                ("two_dim_fps", ft.into()),
                ("ratio_two_dim_over_shadow", ratio.into()),
                ("shadow_submit_us", (median(&submit[0]) * 1e6).into()),
                ("shadow_exec_us", (median(&exec[0]) * 1e6).into()),
                ("two_dim_submit_us", (median(&submit[1]) * 1e6).into()),
                ("two_dim_exec_us", (median(&exec[1]) * 1e6).into()),
                ("outputs_identical_and_reference_exact", identical.into()),
            ]));
        }
    }
    table(
        &format!(
            "(b) Media transcoding, NV12 {SRC_W}x{SRC_H} -> XRGB {DST_W}x{DST_H} via the PPGTT \
             ({WIN_PAGES}-page frame window; ratio = median per-round two-dim fps / shadow fps)"
        ),
        &[
            "workload",
            "PPGTT pages",
            "shadow f/s",
            "two-dim f/s",
            "two-dim/shadow",
            "shadow us remap+submit / exec",
            "two-dim us remap+submit / exec",
            "identical",
        ],
        &rows,
    );
    out.push(("media".into(), J::A(jrows)));
}

// ---------------------------------------------------------------------------------------------
// (c) Scheduler.

/// Water-filling: shares `clamp(w_i * l, lo_i, hi_i)` summing to `total` (or every share at its
/// cap when the caps cannot reach it).
fn water_fill(w: &[f64], lo: &[f64], hi: &[f64], total: f64) -> Vec<f64> {
    let at = |l: f64| -> Vec<f64> {
        w.iter()
            .zip(lo.iter().zip(hi))
            .map(|(w, (lo, hi))| (w * l).clamp(*lo, *hi))
            .collect()
    };
    let (mut a, mut b) = (0.0f64, 1e6f64);
    for _ in 0..200 {
        let m = (a + b) / 2.0;
        if at(m).iter().sum::<f64>() < total {
            a = m;
        } else {
            b = m;
        }
    }
    at(b)
}

/// Fill blits (256 x 128 x 32 bpp, 128 KiB each) of the batch every share submission runs.
const BATCH_BLITS: u32 = 1024;
/// Most submissions queued per vGPU (each is 12 bytes of the 16 KiB ring).
const MAX_SUBS: usize = 1300;
const BATCH_LMEM: u64 = MIB;
const BLIT_DST_LMEM: u64 = 2 * MIB;

fn write_batch(d: &mut Driver<Own>) {
    let mut cmds = Vec::new();
    for i in 0..BATCH_BLITS {
        let dst = d.gm_of_lmem(BLIT_DST_LMEM + u64::from(i % 4) * 128 * 1024);
        cmds.extend(enc::color_blt(
            ROP_PATCOPY,
            BPP_32,
            dst,
            1024,
            256,
            128,
            0x0101_0101 * i,
        ));
    }
    cmds.extend(enc::batch_end());
    let bytes: Vec<u8> = cmds.iter().flat_map(|d| d.to_le_bytes()).collect();
    d.lmem_write(BATCH_LMEM, &bytes);
}

fn submit_batch(d: &mut Driver<Own>) {
    let bbs = enc::batch_start(d.gm_of_lmem(BATCH_LMEM), false);
    d.submit(Engine::Blit, &bbs).expect("submit batch");
}

/// One share experiment: `params` per vGPU under `policy` on the blit engine; returns
/// (delivered share of wall time, target share of wall time, utilisation, every vGPU stayed
/// busy).
fn share_run(
    policy: Policy,
    params: &[SchedParams],
    targets: impl Fn(f64) -> Vec<f64>,
    t_batch: f64,
    settle: Duration,
    dur: Duration,
) -> (Vec<f64>, Vec<f64>, f64, bool) {
    let n = params.len();
    let mut phys = phys(2 << 30);
    let mut drivers: Vec<Driver<Own>> = (0..n)
        .map(|_| new_driver(&mut phys, "mini", GttMode::Shadow).0)
        .collect();
    // Queue enough work that no vGPU runs dry: twice its target of the whole run, plus two
    // (`t_batch` is the fastest calibration run, so this errs on the side of more).
    let want = targets(1.0);
    for (d, share) in drivers.iter_mut().zip(&want) {
        write_batch(d);
        let need = share * secs(settle + dur) * 2.0 / t_batch;
        let subs = need.ceil() as usize + 2;
        assert!(subs <= MAX_SUBS, "{subs} submissions do not fit the ring");
        for _ in 0..subs {
            submit_batch(d);
        }
        d.device().inline = false;
    }
    let sched = Scheduler::new(&SchedConfig::default()).expect("scheduler");
    sched.set_policy(Engine::Blit, policy);
    for (d, p) in drivers.iter_mut().zip(params) {
        sched
            .add_vgpu(d.device().v.shared().clone(), *p)
            .expect("add");
    }
    let ids: Vec<u32> = drivers.iter_mut().map(|d| d.device().v.id()).collect();
    let snap = |s: &Scheduler| -> Vec<u64> {
        let sh = s.shares();
        ids.iter()
            .map(|id| {
                sh.iter()
                    .find(|x| x.vgpu == *id && x.engine == Engine::Blit.name())
                    .map_or(0, |x| x.busy_ns)
            })
            .collect()
    };
    std::thread::sleep(settle);
    let s0 = snap(&sched);
    let t0 = Instant::now();
    std::thread::sleep(dur);
    let s1 = snap(&sched);
    let wall = t0.elapsed().as_nanos() as f64;
    let busy_all = drivers
        .iter_mut()
        .all(|d| d.device().v.shared().engine(Engine::Blit).has_work());
    drop(sched);
    let delta: Vec<f64> = s0.iter().zip(&s1).map(|(a, b)| (b - a) as f64).collect();
    let util = delta.iter().sum::<f64>() / wall;
    let got: Vec<f64> = delta.iter().map(|x| x / wall).collect();
    (got, targets(util), util, busy_all)
}

fn bench_sched(o: &Opts, out: &mut Vec<(String, J)>) {
    let dur = Duration::from_millis(o.pick(300, 2000));
    let settle = Duration::from_millis(o.pick(50, 100));
    // Calibrate one batch, engines inline.
    let t_batch = {
        let mut p = phys(256 * MIB);
        let (mut d, _) = new_driver(&mut p, "mini", GttMode::Shadow);
        write_batch(&mut d);
        let ts: Vec<f64> = (0..5)
            .map(|_| {
                submit_batch(&mut d);
                let t0 = Instant::now();
                d.wait_idle(Engine::Blit, WAIT).expect("idle");
                secs(t0.elapsed())
            })
            .collect();
        ts.into_iter().fold(f64::INFINITY, f64::min)
    };
    println!(
        "\n(c) calibration: one batch of {BATCH_BLITS} fills of 256x128x32bpp runs {:.2} ms",
        t_batch * 1e3
    );

    let mut rows = Vec::new();
    let mut jrows = Vec::new();
    let mut detail = Vec::new();
    let mut record =
        |name: String,
         policy: &str,
         params: &[SchedParams],
         (got, want, util, busy): (Vec<f64>, Vec<f64>, f64, bool)| {
            let err: Vec<f64> = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs() * 100.0)
                .collect();
            let max = err.iter().copied().fold(0.0, f64::max);
            let mean = err.iter().sum::<f64>() / err.len() as f64;
            if params.len() <= 8 && policy != "best-effort" {
                for (i, p) in params.iter().enumerate() {
                    detail.push(vec![
                        format!("{policy} vGPU {i}"),
                        format!("{}", p.weight),
                        format!("{}%", p.reserve_pct),
                        format!("{}%", p.cap_pct),
                        format!("{:.2}%", want[i] * 100.0),
                        format!("{:.2}%", got[i] * 100.0),
                        format!("{:+.2}", (got[i] - want[i]) * 100.0),
                    ]);
                }
            }
            rows.push(vec![
                name.clone(),
                policy.to_string(),
                format!("{}", params.len()),
                format!("{:.1}%", util * 100.0),
                format!("{max:.2}"),
                format!("{mean:.2}"),
                if busy { "yes" } else { "NO" }.to_string(),
            ]);
            jrows.push(J::obj(vec![
                ("case", name.into()),
                ("policy", policy.into()),
                ("vgpus", params.len().into()),
                ("utilisation", util.into()),
                ("max_abs_error_pp", max.into()),
                ("mean_abs_error_pp", mean.into()),
                ("all_busy_throughout", busy.into()),
                ("delivered", J::A(got.into_iter().map(J::N).collect())),
                ("target", J::A(want.into_iter().map(J::N).collect())),
                (
                    "params",
                    J::A(
                        params
                            .iter()
                            .map(|p| {
                                J::obj(vec![
                                    ("weight", p.weight.into()),
                                    ("reserve_pct", p.reserve_pct.into()),
                                    ("cap_pct", p.cap_pct.into()),
                                ])
                            })
                            .collect(),
                    ),
                ),
            ]));
        };

    // Best-effort: weights 1..4 cycling; target = utilisation * w / sum(w).
    for n in [2usize, 8, 32, 64] {
        let params: Vec<SchedParams> = (0..n)
            .map(|i| SchedParams {
                weight: (i % 4) as u32 + 1,
                ..Default::default()
            })
            .collect();
        let w: Vec<f64> = params.iter().map(|p| f64::from(p.weight)).collect();
        let sum: f64 = w.iter().sum();
        let targets = |u: f64| w.iter().map(|x| u * x / sum).collect::<Vec<_>>();
        let r = share_run(Policy::BestEffort, &params, targets, t_batch, settle, dur);
        record(
            format!("weights 1..4, {n} vGPUs"),
            "best-effort",
            &params,
            r,
        );
    }
    // Equal-share: the same weights are ignored.
    for n in [2usize, 8, 32, 64] {
        let params: Vec<SchedParams> = (0..n)
            .map(|i| SchedParams {
                weight: (i % 4) as u32 + 1,
                ..Default::default()
            })
            .collect();
        let targets = |u: f64| vec![u / n as f64; n];
        let r = share_run(Policy::EqualShare, &params, targets, t_batch, settle, dur);
        record(
            format!("weights 1..4 ignored, {n} vGPUs"),
            "equal-share",
            &params,
            r,
        );
    }
    // Fixed-share: reserves and caps on top of weights. With more than 8 vGPUs the pattern of 8
    // repeats with reserves and caps scaled by 8/N (caps at least 1 %), so reserves stay at 60 %
    // of the engine in total.
    for n in [8usize, 32, 64] {
        let spec = [
            (1, 30, 100),
            (2, 0, 10),
            (3, 0, 100),
            (4, 20, 100),
            (1, 0, 100),
            (2, 0, 5),
            (3, 10, 100),
            (4, 0, 100),
        ];
        let scale = |pct: u32| u32::try_from(pct as usize * 8 / n).expect("percentage");
        let params: Vec<SchedParams> = (0..n)
            .map(|i| {
                let (weight, reserve_pct, cap_pct) = spec[i % 8];
                SchedParams {
                    weight,
                    reserve_pct: scale(reserve_pct),
                    cap_pct: if cap_pct == 100 {
                        100
                    } else {
                        scale(cap_pct).max(1)
                    },
                }
            })
            .collect();
        let w: Vec<f64> = params.iter().map(|p| f64::from(p.weight)).collect();
        let lo: Vec<f64> = params
            .iter()
            .map(|p| f64::from(p.reserve_pct) / 100.0)
            .collect();
        let hi: Vec<f64> = params
            .iter()
            .map(|p| f64::from(p.cap_pct) / 100.0)
            .collect();
        let targets = |u: f64| water_fill(&w, &lo, &hi, u);
        let r = share_run(Policy::FixedShare, &params, targets, t_batch, settle, dur);
        let name = if n == 8 {
            "reserves 30/20/10 %, caps 10/5 %, 8 vGPUs".to_string()
        } else {
            let (r0, r1, r2) = (scale(30), scale(20), scale(10));
            let (c0, c1) = (scale(10).max(1), scale(5).max(1));
            format!(
                "reserves {r0}/{r1}/{r2} %, caps {c0}/{c1} % (x{}), {n} vGPUs",
                n / 8
            )
        };
        record(name, "fixed-share", &params, r);
    }
    table(
        &format!(
            "(c) Scheduler shares on the blit engine, every vGPU kept busy, {:.1} s measured \
             (share = busy time / wall time; error in percentage points, target <= 2)",
            secs(dur)
        ),
        &[
            "case",
            "policy",
            "vGPUs",
            "engine busy",
            "max |err| pp",
            "mean |err| pp",
            "all busy",
        ],
        &rows,
    );
    table(
        "(c) Per-vGPU shares of the equal-share and fixed-share cases (of wall time)",
        &[
            "vGPU",
            "weight",
            "reserve",
            "cap",
            "target",
            "delivered",
            "error pp",
        ],
        &detail,
    );
    let mut shares = jrows;

    // Engine concurrency.
    let conc = bench_concurrency(o);
    shares.push(conc);
    out.push(("sched".into(), J::A(shares)));
}

const MM: u32 = 192;
const MM_A: u64 = 0;
const MM_B: u64 = MIB;
const MM_C: u64 = 2 * MIB;
const CSC_SRC: u64 = 4 * MIB;
const CSC_DST: u64 = 8 * MIB;
const CSC_W: u32 = 1280;
const CSC_H: u32 = 720;

fn matmul_cmd(d: &Driver<Own>) -> Vec<u32> {
    enc::dispatch(enc::Dispatch {
        kernel: KERNEL_MATMUL,
        params: [MM, MM, MM],
        scalar: 0.0,
        buffers: [d.gm_of_lmem(MM_A), d.gm_of_lmem(MM_B), d.gm_of_lmem(MM_C)],
    })
    .to_vec()
}

fn csc_cmd(d: &Driver<Own>) -> Vec<u32> {
    enc::csc_scale(enc::Csc {
        src: d.gm_of_lmem(CSC_SRC),
        src_pitch: CSC_W,
        src_size: (CSC_W, CSC_H),
        dst: d.gm_of_lmem(CSC_DST),
        dst_pitch: CSC_W * 4,
        dst_size: (CSC_W, CSC_H),
        mode: CSC_NV12_TO_XRGB,
    })
    .to_vec()
}

/// Median seconds of `cmd` run inline on `e`.
fn calibrate(d: &mut Driver<Own>, e: Engine, cmd: &[u32]) -> f64 {
    let ts: Vec<f64> = (0..5)
        .map(|_| {
            let t0 = Instant::now();
            d.submit(e, cmd).expect("submit");
            d.wait_idle(e, WAIT).expect("idle");
            secs(t0.elapsed())
        })
        .collect();
    median(&ts)
}

fn repeat(cmd: &[u32], n: usize) -> Vec<u32> {
    cmd.iter().copied().cycle().take(cmd.len() * n).collect()
}

/// Pure CPU work for the host-scaling reference.
fn host_spin(n: u64) -> u64 {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x = x.wrapping_add(i);
    }
    x
}

fn bench_concurrency(o: &Opts) -> J {
    let target = o.pick(0.08, 0.3);
    let reps: usize = o.pick(2, 7);
    let mut phys = phys(256 * MIB);
    let (mut a, _) = new_driver(&mut phys, "small", GttMode::TwoDim);
    let (mut b, _) = new_driver(&mut phys, "small", GttMode::TwoDim);
    let floats: Vec<u8> = (0..MM * MM)
        .flat_map(|i| (i as f32 * 0.001).to_le_bytes())
        .collect();
    let nv12 = pattern((CSC_W * CSC_H * 3 / 2) as usize, 5);
    for d in [&mut a, &mut b] {
        d.lmem_write(MM_A, &floats);
        d.lmem_write(MM_B, &floats);
        d.lmem_write(CSC_SRC, &nv12);
    }
    let mm = matmul_cmd(&a);
    let csc = csc_cmd(&b);
    let t_mm = calibrate(&mut a, Engine::Compute, &mm);
    let t_csc = calibrate(&mut b, Engine::Video, &csc);
    let mm_b = matmul_cmd(&b);
    calibrate(&mut b, Engine::Compute, &mm_b);
    let n_mm = ((target / t_mm).round() as usize).clamp(1, 300);
    let n_csc = ((target / t_csc).round() as usize).clamp(1, 300);
    let work_a = repeat(&mm, n_mm);
    let work_b = repeat(&csc, n_csc);
    let work_b_same = repeat(&mm_b, n_mm);
    let sched = Scheduler::new(&SchedConfig::default()).expect("scheduler");
    for d in [&mut a, &mut b] {
        d.device().inline = false;
        d.device().poll = Duration::from_millis(1);
        sched
            .add_vgpu(d.device().v.shared().clone(), SchedParams::default())
            .expect("add");
    }
    // The host's own scaling: two threads of equal CPU work against one thread doing both.
    let spin_n = {
        let t0 = Instant::now();
        std::hint::black_box(host_spin(1 << 24));
        ((target / secs(t0.elapsed())) * f64::from(1u32 << 24)) as u64
    };
    let wait = |d: &mut Driver<Own>, e| d.wait_idle(e, WAIT).expect("idle");
    let (mut ser, mut par, mut same) = (Vec::new(), Vec::new(), Vec::new());
    // The longer of A and B alone: the best a perfectly concurrent run can do.
    let mut alone = Vec::new();
    let (mut hser, mut hpar) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        // Alternate the order of the experiments between repetitions.
        let order: [usize; 4] = if rep % 2 == 0 {
            [0, 1, 2, 3]
        } else {
            [3, 2, 1, 0]
        };
        for step in order {
            match step {
                0 => {
                    let t0 = Instant::now();
                    std::hint::black_box(host_spin(spin_n));
                    std::hint::black_box(host_spin(spin_n + 1));
                    hser.push(secs(t0.elapsed()));
                    let t0 = Instant::now();
                    std::thread::scope(|sc| {
                        let h = sc.spawn(|| std::hint::black_box(host_spin(spin_n)));
                        std::hint::black_box(host_spin(spin_n + 1));
                        h.join().expect("host thread");
                    });
                    hpar.push(secs(t0.elapsed()));
                }
                1 => {
                    // Serialised: A's matmuls, then B's conversions.
                    let t0 = Instant::now();
                    a.submit(Engine::Compute, &work_a).expect("submit");
                    wait(&mut a, Engine::Compute);
                    let t1 = Instant::now();
                    b.submit(Engine::Video, &work_b).expect("submit");
                    wait(&mut b, Engine::Video);
                    ser.push(secs(t0.elapsed()));
                    alone.push(secs(t1 - t0).max(secs(t1.elapsed())));
                }
                2 => {
                    // Concurrent on different engines.
                    let t0 = Instant::now();
                    a.submit(Engine::Compute, &work_a).expect("submit");
                    b.submit(Engine::Video, &work_b).expect("submit");
                    wait(&mut a, Engine::Compute);
                    wait(&mut b, Engine::Video);
                    par.push(secs(t0.elapsed()));
                }
                _ => {
                    // Both on the compute engine (equal matmul work): the engine serialises.
                    let t0 = Instant::now();
                    a.submit(Engine::Compute, &work_a).expect("submit");
                    b.submit(Engine::Compute, &work_b_same).expect("submit");
                    wait(&mut a, Engine::Compute);
                    wait(&mut b, Engine::Compute);
                    same.push(secs(t0.elapsed()));
                }
            }
        }
    }
    // Speed-ups are medians of per-repetition ratios (paired, so slow drifts cancel).
    let ratio = |num: &[f64], den: &[f64]| {
        let r: Vec<f64> = num.iter().zip(den).map(|(n, d)| n / d).collect();
        median(&r)
    };
    let (s_host, s_ideal, s_par, s_same) = (
        ratio(&hser, &hpar),
        ratio(&ser, &alone),
        ratio(&ser, &par),
        ratio(&ser, &same),
    );
    drop(sched);
    let (ms, mp, mq) = (median(&ser), median(&par), median(&same));
    let (hs, hp) = (median(&hser), median(&hpar));
    let rows = vec![
        vec![
            "host: one thread, work X twice".to_string(),
            format!("{:.0}", hs * 1e3),
            "1.00x".to_string(),
        ],
        vec![
            "host: two threads, X || X".to_string(),
            format!("{:.0}", hp * 1e3),
            format!("{s_host:.2}x"),
        ],
        vec![
            "A then B, one after the other".to_string(),
            format!("{:.0}", ms * 1e3),
            "1.00x".to_string(),
        ],
        vec![
            "ideal: the longer of A and B alone".to_string(),
            format!("{:.0}", median(&alone) * 1e3),
            format!("{s_ideal:.2}x"),
        ],
        vec![
            "A (compute) || B (video): different engines".to_string(),
            format!("{:.0}", mp * 1e3),
            format!("{s_par:.2}x"),
        ],
        vec![
            "A (compute) || B' (compute): same engine".to_string(),
            format!("{:.0}", mq * 1e3),
            format!("{s_same:.2}x"),
        ],
    ];
    table(
        &format!(
            "(c) Engine concurrency: A = {n_mm} x matmul {MM}^3 on compute ({:.0} ms), B = {n_csc} \
             x CSC {CSC_W}x{CSC_H} on video ({:.0} ms); median of {reps}; speed-up = median of \
             per-repetition ratios to the serialised run (host rows: to one thread)",
            t_mm * n_mm as f64 * 1e3,
            t_csc * n_csc as f64 * 1e3
        ),
        &["run", "wall ms", "speed-up"],
        &rows,
    );
    J::obj(vec![
        ("case", "engine concurrency".into()),
        ("serialised_ms", (ms * 1e3).into()),
        ("different_engines_ms", (mp * 1e3).into()),
        ("same_engine_ms", (mq * 1e3).into()),
        ("speedup_different_engines", s_par.into()),
        ("speedup_same_engine", s_same.into()),
        ("ideal_speedup", s_ideal.into()),
        ("longer_alone_ms", (median(&alone) * 1e3).into()),
        ("host_two_threads_speedup", s_host.into()),
        ("engine_speedup_over_host_speedup", (s_par / s_host).into()),
        ("matmuls", n_mm.into()),
        ("conversions", n_csc.into()),
        ("repetitions", reps.into()),
    ])
}

// ---------------------------------------------------------------------------------------------

fn machine() -> J {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown", str::trim)
        .to_string();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|x| x.parse::<u64>().ok())
        .unwrap_or(0);
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZeroUsize::get);
    println!(
        "machine: {cpus} CPUs, {model}, {:.1} GiB RAM",
        mem_kib as f64 / (1 << 20) as f64
    );
    J::obj(vec![
        ("cpus", cpus.into()),
        ("cpu_model", model.into()),
        ("mem_kib", mem_kib.into()),
    ])
}

fn main() {
    let o = Opts::parse();
    let t0 = Instant::now();
    println!(
        "vgpu engine benchmarks ({} mode)",
        if o.quick { "quick" } else { "full" }
    );
    let mut out = vec![
        (
            "mode".to_string(),
            J::from(if o.quick { "quick" } else { "full" }),
        ),
        ("machine".to_string(), machine()),
    ];
    if o.wants("blit") {
        bench_blit(&o, &mut out);
    }
    if o.wants("compute") {
        bench_compute(&o, &mut out);
    }
    if o.wants("media") {
        bench_media(&o, &mut out);
    }
    if o.wants("sched") {
        bench_sched(&o, &mut out);
    }
    let total = secs(t0.elapsed());
    println!("\ntotal {total:.1} s");
    out.push(("total_s".to_string(), total.into()));
    if let Some(path) = &o.json {
        let mut s = String::new();
        J::O(out).write(&mut s, 0);
        s.push('\n');
        std::fs::write(path, s).expect("write JSON");
        println!("JSON written to {path}");
    }
}
