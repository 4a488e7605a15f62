//! How many vGPUs one vgpud serves, and what running them all at once costs, in one run:
//!
//! - admission: `mini` vGPUs are created on one `Daemon` (the default software GPU: 4 GiB of
//!   local memory, at most 64 vGPUs) until admission refuses; each is attached with the
//!   `vfio_user` Client (the code Cloud Hypervisor runs), as a VMM would;
//! - throughput: for N = 1, 2, 4, ... up to the number admitted, N guest-driver threads, one per
//!   vGPU, each submit the same fixed blit workload in a loop for a fixed window: one submission =
//!   four 1 MiB `XY_SRC_COPY_BLT` copies (512x512, 32 bpp) from four source to four destination
//!   buffers of the vGPU's local memory, then `MI_USER_INTERRUPT`; the guest sleeps on the blit
//!   engine's MSI-X eventfd, clears `INTR_STATUS` and submits again (one submission in flight
//!   per guest, as a synchronous driver). Reported per N: completed bytes per second of every
//!   vGPU, their sum, the sum relative to N = 1, fairness (slowest / fastest vGPU and Jain's
//!   index), the blit engine's busy time from the scheduler, and — side by side in the same
//!   round — a host thread copying the same bytes over the same footprint (N x 8 MiB, 1 MiB
//!   memcpys) so that cache effects of a growing working set show up in the baseline too.
//!
//! Every vGPU's destination buffers are compared with its sources after the run (nothing about
//! speed is asserted). The N values are run in rounds of alternating order (ascending,
//! descending, ...); figures are medians over rounds.
//!
//! `cargo bench -p vgpu-integration-tests --bench scale [-- --quick] [--json PATH]`
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)] // Reporting arithmetic.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use vgpu_abi::cmd::{enc, BPP_32, ROP_SRCCOPY};
use vgpu_abi::{regs, Engine};
use vgpu_api::daemon::{Daemon, DaemonConfig, VgpuSpec};
use vgpu_device::driver::Driver;
use vgpu_device::phys::PhysGpuConfig;
use vgpu_device::sched::SchedConfig;
use vgpu_device::vgpu::GttMode;
use vgpu_integration_tests::Vmm;

const MIB: u64 = 1 << 20;
/// Copies per submission, each `COPY_W x COPY_H` at 32 bpp (1 MiB).
const COPIES: u64 = 4;
const COPY_W: u32 = 512;
const COPY_H: u32 = 512;
const COPY_BYTES: u64 = COPY_W as u64 * COPY_H as u64 * 4;
/// Source `k` at `k` MiB, destination `k` at `8 + k` MiB of the vGPU's 16 MiB local memory
/// (the rings live in the top 64 KiB).
const SRC_LMEM: u64 = 0;
const DST_LMEM: u64 = 8 * MIB;
/// Bytes of local memory one vGPU's workload touches per submission (sources + destinations).
const FOOTPRINT: u64 = 2 * COPIES * COPY_BYTES;
/// gScale's reported number of VMs sharing one GPU.
const GSCALE_VMS: f64 = 15.0;
const T: Duration = Duration::from_secs(30);

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Deterministic bytes, different per vGPU.
fn pattern(len: u64, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len as usize);
    while (out.len() as u64) < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len as usize);
    out
}

/// The commands of one submission.
fn workload(d: &Driver<Vmm>) -> Vec<u32> {
    let mut cmds = Vec::new();
    for k in 0..COPIES {
        cmds.extend(enc::src_copy_blt(enc::Copy {
            rop: ROP_SRCCOPY,
            bpp: BPP_32,
            dst: d.gm_of_lmem(DST_LMEM + k * MIB),
            dst_pitch: COPY_W * 4,
            src: d.gm_of_lmem(SRC_LMEM + k * MIB),
            src_pitch: COPY_W * 4,
            width: COPY_W,
            height: COPY_H,
            pattern: 0,
        }));
    }
    cmds.extend(enc::user_interrupt());
    cmds
}

/// Blocks on MSI-X vector `v`'s eventfd until it fires; false on timeout.
fn wait_irq(vmm: &Vmm, v: usize, timeout: Duration) -> bool {
    let fd = vmm.irqs[v].as_raw_fd();
    let deadline = Instant::now() + timeout;
    loop {
        if vmm.irqs[v].read().is_ok() {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut p, 1, ms) };
    }
}

/// A guest: its driver and the commands it submits.
struct Guest {
    d: Driver<Vmm>,
    cmds: Vec<u32>,
}

impl Guest {
    /// One synchronous submission: ring + doorbell, sleep until the user interrupt, clear it.
    fn step(&mut self) {
        self.d.submit(Engine::Blit, &self.cmds).expect("submit");
        assert!(
            wait_irq(self.d.device(), Engine::Blit.index(), T),
            "no blit interrupt within {T:?}"
        );
        self.d
            .write32(regs::INTR_STATUS, regs::intr_user(Engine::Blit));
    }
}

/// What one N saw in one round.
struct Sample {
    /// Completed bytes per second of each vGPU.
    per_vgpu: Vec<f64>,
    /// Blit-engine busy time over the window (sum over vGPUs / wall).
    engine_busy: f64,
    /// Host memcpy of the same footprint, bytes per second (one thread).
    host: f64,
}

/// Slowest over fastest vGPU, and Jain's fairness index (1 = all equal, 1/n = one takes all).
fn fairness(per: &[f64]) -> (f64, f64) {
    let lo = per.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = per.iter().copied().fold(0.0, f64::max);
    let sum: f64 = per.iter().sum();
    let sq: f64 = per.iter().map(|v| v * v).sum();
    let jain = if sq > 0.0 {
        sum * sum / (per.len() as f64 * sq)
    } else {
        0.0
    };
    (if hi > 0.0 { lo / hi } else { 0.0 }, jain)
}

/// The blit engine's busy nanoseconds of each vGPU in `ids`.
fn busy(daemon: &Daemon, ids: &[u32]) -> u64 {
    daemon
        .scheduler()
        .shares()
        .iter()
        .filter(|s| s.engine == Engine::Blit.name() && ids.contains(&s.vgpu))
        .map(|s| s.busy_ns)
        .sum()
}

/// Gives the vGPUs `ids` equal scheduler history: each is removed from the scheduler and added
/// again with its parameters, as a fresh vGPU (virtual time at the queue's minimum). Called
/// between runs, with every guest idle.
fn reset_history(daemon: &Daemon, ids: &[u32]) {
    let sched = daemon.scheduler();
    let shares = sched.shares();
    for &id in ids {
        let params = shares
            .iter()
            .find(|s| s.vgpu == id)
            .map(|s| s.params)
            .expect("scheduled vGPU");
        let v = daemon.vgpu(id).expect("vGPU");
        let shared = v.lock().expect("vGPU lock").shared().clone();
        sched.remove_vgpu(id).expect("remove");
        sched.add_vgpu(shared, params).expect("add");
    }
}

/// N guests run their loop for `window` (after a warm-up of a quarter of it).
fn run_n(daemon: &Daemon, guests: &mut [Guest], ids: &[u32], window: Duration) -> Sample {
    let n = guests.len();
    let stop = AtomicBool::new(false);
    let go = Barrier::new(n + 1);
    let warm = window / 4;
    let (per_vgpu, engine_busy) = std::thread::scope(|s| {
        let handles: Vec<_> = guests
            .iter_mut()
            .map(|g| {
                let (stop, go) = (&stop, &go);
                s.spawn(move || {
                    let mut done = Vec::new();
                    go.wait();
                    while !stop.load(Ordering::Acquire) {
                        g.step();
                        done.push(Instant::now());
                    }
                    done
                })
            })
            .collect();
        go.wait();
        std::thread::sleep(warm);
        let b0 = busy(daemon, ids);
        let w0 = Instant::now();
        std::thread::sleep(window);
        let w1 = Instant::now();
        let b1 = busy(daemon, ids);
        stop.store(true, Ordering::Release);
        let secs = (w1 - w0).as_secs_f64();
        let per: Vec<f64> = handles
            .into_iter()
            .map(|h| {
                let done = h.join().expect("guest thread");
                let k = done.iter().filter(|&&t| t > w0 && t <= w1).count();
                (k as u64 * COPIES * COPY_BYTES) as f64 / secs
            })
            .collect();
        (per, (b1 - b0) as f64 / 1e9 / secs)
    });
    Sample {
        per_vgpu,
        engine_busy,
        host: host_copy(n as u64, window.min(Duration::from_millis(500))),
    }
}

/// One thread copying `n` vGPUs' footprints (`COPIES` 1 MiB memcpys each, round robin) for at
/// least `min`: bytes per second.
fn host_copy(n: u64, min: Duration) -> f64 {
    let len = (n * COPIES * COPY_BYTES) as usize;
    let src = pattern(len as u64, 3);
    let mut dst = vec![0u8; len];
    dst.copy_from_slice(&src);
    let piece = COPY_BYTES as usize;
    let t0 = Instant::now();
    let mut bytes = 0u64;
    while t0.elapsed() < min {
        for (d, s) in dst.chunks_exact_mut(piece).zip(src.chunks_exact(piece)) {
            d.copy_from_slice(s);
        }
        std::hint::black_box(&mut dst);
        bytes += len as u64;
    }
    bytes as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let window = Duration::from_millis(if quick { 300 } else { 1500 });
    let rounds = if quick { 1 } else { 3 };
    let t_start = Instant::now();

    // (1) Admission: create until refused, on the default software GPU.
    let gpu = PhysGpuConfig::default();
    let daemon = Daemon::new(DaemonConfig {
        gpu,
        sched: SchedConfig::default(),
        socket_dir: std::env::temp_dir().join(format!("vgpu-scale-{}", std::process::id())),
    })
    .expect("daemon");
    let mut infos = Vec::new();
    let mut create_ms = Vec::new();
    let refusal = loop {
        let t = Instant::now();
        match daemon.create(&VgpuSpec {
            profile: "mini".into(),
            gtt: GttMode::Shadow,
            name: Some(format!("scale{}", infos.len())),
            weight: None,
        }) {
            Ok(info) => {
                create_ms.push(t.elapsed().as_secs_f64() * 1e3);
                infos.push(info);
            }
            Err(e) => {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(": ");
                    msg.push_str(&s.to_string());
                    src = s.source();
                }
                break msg;
            }
        }
        assert!(infos.len() <= 4096, "admission never refused");
    };
    let admitted = infos.len();
    println!(
        "scale: {admitted} mini vGPUs admitted on a {} MiB / {}-vGPU software GPU, then refused: {refusal}",
        gpu.lmem_size >> 20,
        gpu.max_vgpus
    );

    // Attach every vGPU (a VMM each) and give it its sources.
    let mut attach_ms = Vec::new();
    let mut guests: Vec<Guest> = infos
        .iter()
        .enumerate()
        .map(|(i, info)| {
            let t = Instant::now();
            let vmm = Vmm::attach(&info.socket);
            let mut d = Driver::probe(vmm).expect("probe");
            attach_ms.push(t.elapsed().as_secs_f64() * 1e3);
            d.device()
                .aperture
                .write(SRC_LMEM, &pattern(COPIES * COPY_BYTES, i as u64 + 1));
            d.setup_ring(Engine::Blit).expect("ring");
            let cmds = workload(&d);
            let mut g = Guest { d, cmds };
            g.step();
            g
        })
        .collect();
    let ids: Vec<u32> = infos.iter().map(|i| i.id).collect();

    // (2) N guests at once, rounds of alternating order.
    let mut ns: Vec<usize> = std::iter::successors(Some(1usize), |&n| Some(n * 2))
        .take_while(|&n| n <= admitted)
        .collect();
    if ns.last() != Some(&admitted) && admitted > 0 {
        ns.push(admitted);
    }
    let mut samples: Vec<Vec<Sample>> = ns.iter().map(|_| Vec::new()).collect();
    for r in 0..rounds {
        let order: Vec<usize> = if r % 2 == 0 {
            (0..ns.len()).collect()
        } else {
            (0..ns.len()).rev().collect()
        };
        for i in order {
            let n = ns[i];
            reset_history(&daemon, &ids[..n]);
            samples[i].push(run_n(&daemon, &mut guests[..n], &ids[..n], window));
        }
    }

    // (3) The same, without the reset: the first half of the vGPUs run alone for a window, then
    // all of them run. The second half's virtual time did not advance while they were idle.
    let half = admitted / 2;
    let history = if half > 0 {
        reset_history(&daemon, &ids);
        run_n(&daemon, &mut guests[..half], &ids[..half], window);
        Some(run_n(&daemon, &mut guests, &ids, window))
    } else {
        None
    };

    // Every destination holds its source.
    let mut all_correct = true;
    for (i, g) in guests.iter_mut().enumerate() {
        let want = pattern(COPIES * COPY_BYTES, i as u64 + 1);
        let mut got = vec![0u8; want.len()];
        g.d.device().aperture.read(DST_LMEM, &mut got);
        all_correct &= got == want;
    }

    // Report.
    let agg1 = median(
        &samples[0]
            .iter()
            .map(|s| s.per_vgpu.iter().sum::<f64>())
            .collect::<Vec<_>>(),
    );
    let host1 = median(&samples[0].iter().map(|s| s.host).collect::<Vec<_>>());
    println!(
        "\nscale: N guests each submitting {COPIES} x 1 MiB blit copies + user interrupt in a loop, {:.1} s windows, {rounds} round(s) of alternating order, medians ({} mode)",
        window.as_secs_f64(),
        if quick { "quick" } else { "full" }
    );
    println!("| vGPUs | aggregate GB/s | vs N=1 | per-vGPU GB/s (median) | slowest / fastest | Jain | blit engine busy | host memcpy same footprint GB/s | aggregate / host | host vs N=1 |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for (i, &n) in ns.iter().enumerate() {
        let s = &samples[i];
        let agg = median(
            &s.iter()
                .map(|x| x.per_vgpu.iter().sum())
                .collect::<Vec<f64>>(),
        );
        let per = median(&s.iter().map(|x| median(&x.per_vgpu)).collect::<Vec<_>>());
        let fair = median(
            &s.iter()
                .map(|x| fairness(&x.per_vgpu).0)
                .collect::<Vec<_>>(),
        );
        let jain = median(
            &s.iter()
                .map(|x| fairness(&x.per_vgpu).1)
                .collect::<Vec<_>>(),
        );
        let eb = median(&s.iter().map(|x| x.engine_busy).collect::<Vec<_>>());
        let host = median(&s.iter().map(|x| x.host).collect::<Vec<_>>());
        // Paired per round: aggregate over the host copy of the same round.
        let vs_host = median(
            &s.iter()
                .map(|x| x.per_vgpu.iter().sum::<f64>() / x.host)
                .collect::<Vec<_>>(),
        );
        println!(
            "| {n} | {:.2} | {:.2}x | {:.3} | {fair:.2} | {jain:.3} | {:.0}% | {:.2} | {vs_host:.2}x | {:.2}x |",
            agg / 1e9,
            agg / agg1,
            per / 1e9,
            eb * 100.0,
            host / 1e9,
            host / host1
        );
        rows.push(serde_json::json!({
            "vgpus": n,
            "aggregate_bytes_per_s": agg,
            "aggregate_vs_n1": agg / agg1,
            "per_vgpu_bytes_per_s_median": per,
            "per_vgpu_bytes_per_s": s.iter().map(|x| x.per_vgpu.clone()).collect::<Vec<_>>(),
            "slowest_over_fastest": fair,
            "jain_index": jain,
            "blit_engine_busy": eb,
            "host_memcpy_bytes_per_s": host,
            "aggregate_vs_host_memcpy": vs_host,
            "host_vs_n1": host / host1,
            "footprint_bytes": n as u64 * FOOTPRINT,
        }));
    }
    let history_json = history.as_ref().map(|h| {
        let (fair, jain) = fairness(&h.per_vgpu);
        let agg: f64 = h.per_vgpu.iter().sum();
        let first: f64 = h.per_vgpu[..half].iter().sum();
        let starved = h.per_vgpu.iter().filter(|&&v| v == 0.0).count();
        println!(
            "\nwithout the history reset: {half} vGPUs ran one window, then all {admitted}: aggregate {:.2} GB/s, the {half} that had run got {:.1}% of it, {starved} vGPUs completed nothing, slowest / fastest {fair:.2}, Jain {jain:.3}",
            agg / 1e9,
            first / agg * 100.0
        );
        serde_json::json!({
            "vgpus": admitted,
            "ran_before": half,
            "aggregate_bytes_per_s": agg,
            "share_of_those_that_ran_before": first / agg,
            "vgpus_with_no_completion": starved,
            "slowest_over_fastest": fair,
            "jain_index": jain,
            "per_vgpu_bytes_per_s": h.per_vgpu,
        })
    });
    println!(
        "\nadmitted {admitted} vGPUs ({:.1}x gScale's {GSCALE_VMS} VMs; target 64); create median {:.2} ms, attach median {:.2} ms; all destinations correct: {}",
        admitted as f64 / GSCALE_VMS,
        median(&create_ms),
        median(&attach_ms),
        if all_correct { "yes" } else { "NO" }
    );
    println!("total bench time {:.1} s", t_start.elapsed().as_secs_f64());

    if let Some(path) = json {
        let j = serde_json::json!({
            "mode": if quick { "quick" } else { "full" },
            "profile": "mini",
            "gpu_lmem_bytes": gpu.lmem_size,
            "gpu_max_vgpus": gpu.max_vgpus,
            "admitted": admitted,
            "refusal": refusal,
            "admitted_vs_gscale": admitted as f64 / GSCALE_VMS,
            "create_ms_median": median(&create_ms),
            "attach_ms_median": median(&attach_ms),
            "window_s": window.as_secs_f64(),
            "rounds": rounds,
            "copies_per_submission": COPIES,
            "copy_bytes": COPY_BYTES,
            "all_correct": all_correct,
            "runs": rows,
            "without_history_reset": history_json,
        });
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&j).expect("json") + "\n",
        )
        .expect("write json");
    }
    drop(guests);
    daemon.shutdown();
    let _ = std::fs::remove_dir_all(daemon.socket_dir());
    assert!(all_correct, "a vGPU's destination differs from its source");
}
