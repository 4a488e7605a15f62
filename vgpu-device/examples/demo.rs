//! The embedded-default demo: one software physical GPU, a scheduler, and several vGPUs of
//! different profiles and GTT modes, each driven by its own guest-driver thread through its
//! BARs only. One tenant is hostile. Prints what every vGPU got done and checks every result.
//!
//! Run: `cargo run --release -p vgpu-device --example demo`

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vgpu_abi::cmd::{enc, BPP_32, KERNEL_SAXPY, ROP_PATCOPY, ROP_SRCCOPY};
use vgpu_abi::{regs, Engine};
use vgpu_device::driver::{Driver, DriverError, Locked};
use vgpu_device::phys::{profile, profiles, PhysGpu, PhysGpuConfig};
use vgpu_device::sched::{SchedConfig, SchedParams, Scheduler};
use vgpu_device::vgpu::{GttMode, Vgpu, VgpuConfig};

const ROUNDS: u32 = 200;
const W: u32 = 256;
const H: u32 = 256;

/// A tenant's workload on the blit engine: fill, copy, verify.
fn blit_tenant(d: &mut Driver<Locked>, seed: u32) -> Result<String, DriverError> {
    let (src, dst) = (0u64, 1 << 20);
    for i in 0..ROUNDS {
        let color = seed.wrapping_mul(0x9E37_79B9) ^ i;
        let fill = enc::color_blt(ROP_PATCOPY, BPP_32, d.gm_of_lmem(src), W * 4, W, H, color);
        let copy = enc::src_copy_blt(enc::Copy {
            rop: ROP_SRCCOPY,
            bpp: BPP_32,
            dst: d.gm_of_lmem(dst),
            dst_pitch: W * 4,
            src: d.gm_of_lmem(src),
            src_pitch: W * 4,
            width: W,
            height: H,
            pattern: 0,
        });
        let fence = enc::store_data_imm(d.gm_of_lmem(0x200_000), i + 1);
        d.submit(Engine::Blit, &[fill.as_slice(), &copy, &fence].concat())?;
        d.wait_idle(Engine::Blit, Duration::from_secs(10))?;
        let mut px = [0u8; 4];
        d.lmem_read(dst + u64::from(W * H * 4 - 4), &mut px);
        assert_eq!(u32::from_le_bytes(px), color, "blit result");
    }
    Ok(format!("{ROUNDS} fill+copy rounds of {W}x{H}, verified"))
}

/// A tenant on the render engine: a frame with a rectangle and a triangle, then a flip.
fn render_tenant(d: &mut Driver<Locked>) -> Result<String, DriverError> {
    let fb = d.gm_of_lmem(0);
    let mut frames = 0;
    for i in 0..ROUNDS {
        let cmds = [
            enc::surface_state(fb, W * 4, W, H, regs::PLANE_FORMAT_XRGB8888).to_vec(),
            enc::fill_rect(0, 0, W, H, 0xff10_1010, false).to_vec(),
            enc::triangle([(10 + i % 50, 10), (240, 40), (60, 230)], 0x80ff_8000, true).to_vec(),
            enc::load_register_imm(regs::PLANE_SURF_LO, (fb & 0xFFFF_FFFF) as u32).to_vec(),
        ]
        .concat();
        d.submit(Engine::Render, &cmds)?;
        d.wait_idle(Engine::Render, Duration::from_secs(10))?;
        frames += 1;
    }
    Ok(format!(
        "{frames} frames drawn and flipped ({} flips seen)",
        d.read32(regs::PLANE_FLIP_COUNT)
    ))
}

/// A tenant on the compute engine: saxpy over 64 Ki floats, checked on the host.
fn compute_tenant(d: &mut Driver<Locked>) -> Result<String, DriverError> {
    let n = 65536u32;
    let x: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
    let y: Vec<f32> = (0..n).map(|i| 1.0 - i as f32).collect();
    let bytes = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
    d.lmem_write(0, &bytes(&x));
    d.lmem_write(1 << 20, &bytes(&y));
    let cmd = enc::dispatch(enc::Dispatch {
        kernel: KERNEL_SAXPY,
        params: [n, 0, 0],
        scalar: 3.0,
        buffers: [d.gm_of_lmem(0), d.gm_of_lmem(1 << 20), 0],
    });
    d.submit(Engine::Compute, &cmd)?;
    d.wait_idle(Engine::Compute, Duration::from_secs(10))?;
    let mut out = vec![0u8; n as usize * 4];
    d.lmem_read(1 << 20, &mut out);
    for (i, c) in out.chunks_exact(4).enumerate() {
        let want = 3.0f32 * x[i] + y[i];
        assert_eq!(
            f32::from_le_bytes([c[0], c[1], c[2], c[3]]).to_bits(),
            want.to_bits(),
            "saxpy[{i}]"
        );
    }
    Ok(format!("saxpy over {n} floats, bit-exact"))
}

/// A hostile tenant: tries to blit into another tenant's GM range.
fn hostile_tenant(d: &mut Driver<Locked>, victim_gm: u64) -> Result<String, DriverError> {
    let attack = enc::color_blt(ROP_PATCOPY, BPP_32, victim_gm, W * 4, W, H, 0xdead_beef);
    match d.submit(Engine::Blit, &attack) {
        Err(DriverError::EngineError { code, .. }) => Ok(format!(
            "attack rejected by the command scanner (audit reason {code})"
        )),
        other => panic!("attack was not rejected: {other:?}"),
    }
}

fn main() {
    let mut phys = PhysGpu::new(PhysGpuConfig::default()).expect("software GPU");
    println!(
        "software physical GPU: {} MiB local memory",
        phys.config().lmem_size >> 20
    );
    println!("profiles:");
    for p in profiles() {
        println!(
            "  {:<8} lmem {:>5} MiB  hidden GM {:>5} MiB  weight {}  max {}x{}  available {}",
            p.name,
            p.lmem_size >> 20,
            p.hidden_gm_size >> 20,
            p.default_weight,
            p.max_width,
            p.max_height,
            phys.available_instances(p)
        );
    }
    let sched = Scheduler::new(&SchedConfig::default()).expect("scheduler");
    let tenants = [
        ("small", GttMode::Shadow),
        ("small", GttMode::TwoDim),
        ("medium", GttMode::Shadow),
        ("compute", GttMode::TwoDim),
        ("mini", GttMode::Shadow),
    ];
    let mut vgpus = Vec::new();
    for (name, mode) in tenants {
        let p = profile(name).expect("profile");
        let part = phys.create_partition(p).expect("admission");
        let v = Vgpu::new(
            part,
            &VgpuConfig {
                gtt_mode: mode,
                ..Default::default()
            },
        )
        .expect("vgpu");
        sched
            .add_vgpu(
                v.shared().clone(),
                SchedParams {
                    weight: p.default_weight,
                    ..Default::default()
                },
            )
            .expect("schedule");
        vgpus.push((name, mode, Arc::new(Mutex::new(v))));
    }
    let victim_gm = vgpus[0]
        .2
        .lock()
        .expect("lock")
        .shared()
        .partition()
        .mappable
        .start
        .raw();
    let t0 = Instant::now();
    let handles: Vec<_> = vgpus
        .iter()
        .enumerate()
        .map(|(i, (name, mode, v))| {
            let v = v.clone();
            let (name, mode) = (*name, *mode);
            std::thread::spawn(move || {
                let mut d = Driver::probe(Locked(v)).expect("probe");
                let r = match i {
                    0 | 1 => blit_tenant(&mut d, u32::try_from(i).unwrap_or(0)),
                    2 => render_tenant(&mut d),
                    3 => compute_tenant(&mut d),
                    _ => hostile_tenant(&mut d, victim_gm),
                };
                (i, name, mode, r.expect("tenant failed"))
            })
        })
        .collect();
    let mut results: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("tenant thread"))
        .collect();
    results.sort_by_key(|r| r.0);
    let elapsed = t0.elapsed();
    println!("\n{:<4} {:<8} {:<8} result", "vgpu", "profile", "gtt");
    for (i, name, mode, r) in &results {
        println!(
            "{:<4} {:<8} {:<8} {r}",
            vgpus[*i].2.lock().expect("lock").id(),
            name,
            format!("{mode:?}")
        );
    }
    println!(
        "\nper-engine accounting ({:.2} s wall):",
        elapsed.as_secs_f64()
    );
    println!(
        "{:<4} {:<8} {:>9} {:>12} {:>10} {:>7}",
        "vgpu", "engine", "commands", "bytes", "busy ms", "audits"
    );
    for (_, _, v) in &vgpus {
        let v = v.lock().expect("lock");
        for e in Engine::ALL {
            let s = &v.shared().engine(e).stats;
            let cmds = s.commands.load(std::sync::atomic::Ordering::Relaxed);
            let audits = s.audits.load(std::sync::atomic::Ordering::Relaxed);
            if cmds + audits == 0 {
                continue;
            }
            println!(
                "{:<4} {:<8} {:>9} {:>12} {:>10.1} {:>7}",
                v.id(),
                e.name(),
                cmds,
                s.bytes.load(std::sync::atomic::Ordering::Relaxed),
                s.busy_ns.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6,
                audits
            );
        }
    }
    let hostile = vgpus[4].2.lock().expect("lock");
    for ev in hostile.shared().audit.since(0, 10) {
        println!(
            "audit: vgpu {} engine {} addr {:#x} reason {} ({})",
            ev.vgpu, ev.engine, ev.addr, ev.reason, ev.detail
        );
    }
    println!("\nall tenants verified; the hostile tenant was contained");
}
