//! The full trap path of a guest register access, measured from inside a KVM guest in one run:
//! guest MMIO access → KVM exit → VMM → device → reply → guest, for
//!
//! - a bare KVM exit to an empty MMIO handler in the VMM (the baseline),
//! - a vGPU embedded in the VMM (`vm_device::MutDeviceMmio` on the register file),
//! - a vGPU served by vgpud over vfio-user (`REGION_WRITE`/`REGION_READ` on a unix socket),
//!
//! plus the guest loop alone (writes to RAM, no exit) so the loop's own cost can be subtracted.
//! The guest program times each series with the TSC (`lfence; rdtsc` around each of 16 chunks of
//! N/16 accesses of one register, `SCRATCH0`, after N/16 warm-up accesses) and keeps the median
//! chunk, so a preemption of the vCPU or vgpud thread on a shared host does not dominate;
//! cycles are TSC cycles, converted to time with the TSC frequency KVM reports
//! (`KVM_GET_TSC_KHZ`).
//!
//! `cargo bench -p vgpu-integration-tests --bench trap_path [-- --quick] [--json PATH]`
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)] // Reporting arithmetic.

use std::time::Duration;

use vgpu_api::daemon::VgpuSpec;
use vgpu_device::vgpu::GttMode;
use vgpu_integration_tests::daemon;
use vgpu_vmm::config::GuestMode;
use vgpu_vmm::{VgpuAttach, VmConfig};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let skip = |why: String| {
        println!("trap_path: SKIP: {why}");
        if let Some(path) = &json {
            let j = serde_json::json!({ "skipped": true, "reason": why });
            std::fs::write(path, j.to_string() + "\n").expect("write json");
        }
    };
    if let Err(why) = vgpu_vmm::kvm_available() {
        return skip(why);
    }
    if vgpu_vmm::guest::builtin().is_none() {
        return skip(
            "the built-in guest was not built (rustup target add x86_64-unknown-none)".into(),
        );
    }
    let iters: u32 = if quick { 2_000 } else { 20_000 };
    let d = daemon(256);
    let info = d
        .create(&VgpuSpec {
            profile: "mini".into(),
            gtt: GttMode::Shadow,
            name: Some("trap-path".into()),
            weight: None,
        })
        .expect("create vGPU");
    let cfg = VmConfig {
        name: "trap-path".into(),
        vgpus: vec![
            VgpuAttach::InProcess {
                profile: "mini".into(),
                gtt: GttMode::Shadow,
            },
            VgpuAttach::Socket(info.socket),
        ],
        mode: GuestMode::Bench(iters),
        timeout: Duration::from_secs(300),
        ..Default::default()
    };
    let o = vgpu_vmm::run(&cfg).expect("run the VM");
    assert!(o.passed(), "guest {:?}\n{}", o.status, o.console);
    let b = &o.boot_info;
    assert_eq!(b.bench_count, 7, "loop, 3 x (write, read)");
    // Writes and reads, each a warm-up chunk plus 16 chunks of iters / 16.
    assert_eq!(
        o.null_accesses,
        2 * u64::from(iters / 16) * 17,
        "every empty-handler access exited to the VMM"
    );
    let khz = b.tsc_khz.max(1) as f64;
    let per = |i: usize| b.bench_cycles[i] as f64 / f64::from(iters);
    let loop_only = per(0);
    println!(
        "trap path, {iters} accesses per series (median of 16 chunks), TSC {:.3} GHz{}",
        khz / 1e6,
        if quick { " (--quick)" } else { "" }
    );
    println!(
        "{:<42} {:>11} {:>8} {:>12} {:>13}",
        "path", "cycles/acc", "us/acc", "net of loop", "x bare exit"
    );
    // Net cycles (loop subtracted), and the ratio to the bare exit of the same direction.
    let row = |name: &str, i: usize, bare: usize| {
        let net = per(i) - loop_only;
        println!(
            "{:<42} {:>11.0} {:>8.2} {:>12.0} {:>13.2}",
            name,
            per(i),
            per(i) / khz * 1000.0,
            net,
            net / (per(bare) - loop_only)
        );
    };
    println!(
        "{:<42} {:>11.0} {:>8.2} {:>12} {:>13}",
        "guest loop alone (RAM write, no exit)",
        loop_only,
        loop_only / khz * 1000.0,
        "-",
        "-"
    );
    row("bare KVM exit, empty MMIO handler, write", 1, 1);
    row("bare KVM exit, empty MMIO handler, read", 2, 2);
    row("in-process vGPU, SCRATCH0 write", 3, 1);
    row("in-process vGPU, SCRATCH0 read", 4, 2);
    row("vfio-user vGPU (vgpud), SCRATCH0 write", 5, 1);
    row("vfio-user vGPU (vgpud), SCRATCH0 read", 6, 2);
    if let Some(path) = &json {
        let names = [
            "loop",
            "bare_write",
            "bare_read",
            "in_process_write",
            "in_process_read",
            "vfio_user_write",
            "vfio_user_read",
        ];
        let series: serde_json::Map<String, serde_json::Value> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let bare = if i == 0 { 0 } else { 2 - i % 2 };
                let net = per(i) - loop_only;
                let v = serde_json::json!({
                    "cycles": per(i),
                    "us": per(i) / khz * 1000.0,
                    "net_cycles": if i == 0 { 0.0 } else { net },
                    "vs_bare_exit": if i == 0 { 1.0 } else { net / (per(bare) - loop_only) },
                });
                ((*n).to_string(), v)
            })
            .collect();
        let j = serde_json::json!({
            "skipped": false,
            "mode": if quick { "quick" } else { "full" },
            "accesses_per_series": iters,
            "tsc_khz": b.tsc_khz,
            "series": series,
        });
        std::fs::write(path, serde_json::to_string_pretty(&j).expect("json") + "\n")
            .expect("write json");
    }
    for i in 1..7 {
        assert!(
            per(i) > loop_only,
            "series {i} cannot be cheaper than the loop alone"
        );
    }
}
