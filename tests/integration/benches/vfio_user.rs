//! The trap path over vfio-user, measured side by side in one run:
//! - REGION_READ of a 4-byte register through vgpud vs a bare unix-socket ping-pong carrying the
//!   same bytes (request 32 B, reply 36 B) between two threads, and vs the same ping-pong with
//!   the syscall patterns of a vfio-user exchange;
//! - doorbell throughput: submissions per second through REGION_WRITE of RING_TAIL (each a
//!   scanned, executed one-command submission), vs register writes that do nothing.
//!
//! `cargo bench -p vgpu-integration-tests --bench vfio_user [-- --quick] [--json PATH]`
#![allow(clippy::cast_possible_truncation)] // Reporting arithmetic.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vgpu_abi::cmd::enc;
use vgpu_abi::{regs, Engine};
use vgpu_api::daemon::VgpuSpec;
use vgpu_device::driver::{DeviceAccess, Driver};
use vgpu_device::vgpu::GttMode;
use vgpu_integration_tests::{daemon, Vmm};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Syscall pattern of a ping-pong.
#[derive(Clone, Copy, PartialEq)]
enum Pattern {
    /// One read and one write per side.
    Bare,
    /// The client reads the 32-byte reply, then the 4 data bytes, as the `vfio_user` Client
    /// does; the server reads the request with one read: the floor for any server with this
    /// client.
    ClientFramed,
    /// As `ClientFramed`, and the server reads the 16-byte header, then the payload (a server
    /// that reads exactly one header at a time).
    Framed,
}

/// Round trips of a unix-socket ping-pong with the same message sizes as a REGION_READ of
/// 4 bytes, in `pattern`.
fn ping_pong(iters: u32, pattern: Pattern) -> f64 {
    let (mut a, mut b) = UnixStream::pair().expect("pair");
    let server = std::thread::spawn(move || {
        let mut req = [0u8; 32];
        let reply = [0u8; 36];
        loop {
            let ok = if pattern == Pattern::Framed {
                b.read_exact(&mut req[..16]).is_ok() && b.read_exact(&mut req[16..]).is_ok()
            } else {
                b.read_exact(&mut req).is_ok()
            };
            if !ok || b.write_all(&reply).is_err() {
                break;
            }
        }
    });
    let req = [0u8; 32];
    let mut reply = [0u8; 36];
    let t0 = Instant::now();
    for _ in 0..iters {
        a.write_all(&req).expect("write");
        if pattern != Pattern::Bare {
            a.read_exact(&mut reply[..32]).expect("read");
            a.read_exact(&mut reply[32..]).expect("read");
        } else {
            a.read_exact(&mut reply).expect("read");
        }
    }
    let ns = t0.elapsed().as_nanos() as f64 / f64::from(iters);
    drop(a);
    let _ = server.join();
    ns
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let (iters, rounds) = if quick { (2_000, 3) } else { (20_000, 7) };

    let daemon = daemon(256);
    let info = daemon
        .create(&VgpuSpec {
            profile: "mini".into(),
            gtt: GttMode::Shadow,
            name: Some("bench".into()),
            weight: None,
        })
        .expect("vgpu");
    let mut vmm = Vmm::attach(&info.socket);

    // (1) REGION_READ vs ping-pong, interleaved rounds.
    let mut ours = Vec::new();
    let mut bare = Vec::new();
    let mut client_framed = Vec::new();
    let mut framed = Vec::new();
    let mut b = [0u8; 4];
    for _ in 0..rounds {
        let t0 = Instant::now();
        for _ in 0..iters {
            vmm.bar0_read(u64::from(regs::SCRATCH0), &mut b);
        }
        ours.push(t0.elapsed().as_nanos() as f64 / f64::from(iters));
        bare.push(ping_pong(iters, Pattern::Bare));
        client_framed.push(ping_pong(iters, Pattern::ClientFramed));
        framed.push(ping_pong(iters, Pattern::Framed));
    }
    let (ours, bare, client_framed, framed) = (
        median(ours),
        median(bare),
        median(client_framed),
        median(framed),
    );

    // (2) Doorbells: one-command submissions (store a fence), scanned and executed, vs plain
    // register writes.
    let mut d = Driver::probe(vmm).expect("probe");
    d.setup_ring(Engine::Blit).expect("ring");
    let fence = d.gm_of_lmem(0x1000);
    let n = if quick { 2_000 } else { 20_000 };
    let t0 = Instant::now();
    for i in 0..n {
        d.submit(Engine::Blit, &enc::store_data_imm(fence, i))
            .expect("submit");
    }
    d.wait_idle(Engine::Blit, Duration::from_secs(30))
        .expect("idle");
    let doorbell = f64::from(n) / t0.elapsed().as_secs_f64();
    assert_eq!(
        d.read32(regs::engine_base(Engine::Blit) + regs::LAST_FENCE),
        n - 1
    );
    let t0 = Instant::now();
    for i in 0..n {
        d.write32(regs::SCRATCH1, i);
    }
    let plain = f64::from(n) / t0.elapsed().as_secs_f64();

    println!(
        "vfio-user trap path ({} mode, {} iterations x {} rounds, medians)",
        if quick { "quick" } else { "full" },
        iters,
        rounds
    );
    println!("| measure | value | ratio |");
    println!("|---|---|---|");
    println!(
        "| REGION_READ 4 B through vgpud | {:.1} us | {:.2}x bare |",
        ours / 1e3,
        ours / bare
    );
    println!(
        "| bare unix-socket ping-pong 32/36 B | {:.1} us | 1.00x |",
        bare / 1e3
    );
    println!("| same ping-pong, client reads reply then data (server 1 read, client 2) | {:.1} us | {:.2}x bare; vgpud = {:.2}x this |", client_framed / 1e3, client_framed / bare, ours / client_framed);
    println!("| same ping-pong, 2 reads per side (server reads header, then payload) | {:.1} us | {:.2}x bare; vgpud = {:.2}x this |", framed / 1e3, framed / bare, ours / framed);
    println!("| doorbell submissions (scan + execute + HEAD read-back) | {:.0} /s | {:.2}x plain writes |", doorbell, doorbell / plain);
    println!(
        "| plain register writes (REGION_WRITE) | {:.0} /s | 1.00x |",
        plain
    );
    if let Some(path) = json {
        let s = format!(
            "{{\"region_read_ns\":{ours:.0},\"ping_pong_ns\":{bare:.0},\"ping_pong_framed_ns\":{framed:.0},\"ping_pong_client_framed_ns\":{client_framed:.0},\"region_read_ratio\":{:.3},\"doorbells_per_s\":{doorbell:.0},\"plain_writes_per_s\":{plain:.0}}}\n",
            ours / bare
        );
        std::fs::write(&path, s).expect("write json");
    }
}
