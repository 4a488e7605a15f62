//! The reference VMM end to end: a KVM VM whose bare-metal guest driver enumerates PCI, assigns
//! BARs, enables MSI-X, programs GGTT and rings, runs blit, render and compute work and a
//! display flip, and checks every result bit-exactly — against a vGPU embedded in the VMM and
//! against vgpud over vfio-user, in both GTT modes; two VMs on one vgpud at once; and a hostile
//! guest whose attacks are refused while its neighbour's work runs.
//!
//! Every test needs /dev/kvm and the built-in guest (target `x86_64-unknown-none`); without
//! them it prints why and returns.

use std::time::Duration;

use vgpu_api::daemon::{Daemon, VgpuSpec};
use vgpu_device::vgpu::GttMode;
use vgpu_integration_tests::{daemon, temp_path};
use vgpu_vmm::config::GuestMode;
use vgpu_vmm::{GuestStatus, Outcome, VgpuAttach, VmConfig};

/// Whether the VM tests can run here; prints the reason when not.
fn can_run(test: &str) -> bool {
    if let Err(why) = vgpu_vmm::kvm_available() {
        eprintln!("SKIP {test}: {why}");
        return false;
    }
    if vgpu_vmm::guest::builtin().is_none() {
        eprintln!(
            "SKIP {test}: the built-in guest was not built (rustup target add x86_64-unknown-none)"
        );
        return false;
    }
    true
}

fn vm(name: &str, vgpus: Vec<VgpuAttach>, mode: GuestMode) -> VmConfig {
    VmConfig {
        name: name.into(),
        vgpus,
        mode,
        timeout: Duration::from_secs(60),
        ..Default::default()
    }
}

fn in_process(profile: &str, gtt: GttMode) -> VgpuAttach {
    VgpuAttach::InProcess {
        profile: profile.into(),
        gtt,
    }
}

/// Creates a vGPU on `d` and returns (its id, the attach spec for its socket).
fn served(d: &Daemon, profile: &str, gtt: GttMode, name: &str) -> (u32, VgpuAttach) {
    let info = d
        .create(&VgpuSpec {
            profile: profile.into(),
            gtt,
            name: Some(name.into()),
            weight: None,
        })
        .expect("create vGPU");
    (info.id, VgpuAttach::Socket(info.socket))
}

fn run(cfg: &VmConfig) -> Outcome {
    vgpu_vmm::run(cfg).unwrap_or_else(|e| panic!("VM {} did not run: {e:?}", cfg.name))
}

#[track_caller]
fn assert_pass(o: &Outcome, what: &str) {
    assert!(
        o.passed(),
        "{what}: guest {:?}\n--- guest console ---\n{}",
        o.status,
        o.console
    );
}

/// The audit reasons recorded for vGPU `id` of `d`.
fn audit_reasons(d: &Daemon, id: u32) -> Vec<&'static str> {
    let v = d.vgpu(id).expect("vGPU");
    let v = v.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    v.shared()
        .audit
        .since(0, 64)
        .into_iter()
        .map(|e| e.reason)
        .collect()
}

#[test]
fn test_vmm_in_process_vgpu_both_gtt_modes_pass() {
    if !can_run("test_vmm_in_process_vgpu_both_gtt_modes_pass") {
        return;
    }
    for gtt in [GttMode::Shadow, GttMode::TwoDim] {
        let o = run(&vm(
            "inproc",
            vec![in_process("small", gtt)],
            GuestMode::Workload,
        ));
        assert_pass(&o, &format!("in-process {gtt:?}"));
        assert_eq!(o.boot_info.vgpus_done, 1);
        assert!(o.console.contains("workload checked"), "{}", o.console);
        assert_eq!(o.exits.unhandled_mmio, 0, "every MMIO access decoded");
    }
}

#[test]
fn test_vmm_vgpud_vgpu_both_gtt_modes_pass() {
    if !can_run("test_vmm_vgpud_vgpu_both_gtt_modes_pass") {
        return;
    }
    let d = daemon(512);
    let (_, shadow) = served(&d, "small", GttMode::Shadow, "e2e-shadow");
    let (_, two_dim) = served(&d, "mini", GttMode::TwoDim, "e2e-2d");
    // The shadow vGPU twice: the second VM finds it reset, whatever the first left behind.
    let specs = [
        ("shadow", shadow.clone()),
        ("two-dim", two_dim),
        ("shadow, second VM", shadow),
    ];
    for (what, spec) in specs {
        let o = run(&vm("vfio", vec![spec], GuestMode::Workload));
        assert_pass(&o, &format!("vgpud {what}"));
        assert_eq!(o.boot_info.vgpus_done, 1);
    }
}

#[test]
fn test_vmm_mixed_vgpus_in_one_vm_pass() {
    if !can_run("test_vmm_mixed_vgpus_in_one_vm_pass") {
        return;
    }
    let d = daemon(256);
    let (_, remote) = served(&d, "mini", GttMode::Shadow, "e2e-mixed");
    let o = run(&vm(
        "mixed",
        vec![in_process("mini", GttMode::TwoDim), remote],
        GuestMode::Workload,
    ));
    assert_pass(&o, "in-process + vgpud");
    assert_eq!(o.boot_info.vgpus_done, 2);
}

#[test]
fn test_vmm_two_vms_share_vgpud_concurrently() {
    if !can_run("test_vmm_two_vms_share_vgpud_concurrently") {
        return;
    }
    let d = daemon(512);
    let (_, a) = served(&d, "small", GttMode::Shadow, "e2e-vm-a");
    let (_, b) = served(&d, "small", GttMode::TwoDim, "e2e-vm-b");
    let (oa, ob) = std::thread::scope(|s| {
        let ta = s.spawn(|| run(&vm("vm-a", vec![a], GuestMode::Workload)));
        let tb = s.spawn(|| run(&vm("vm-b", vec![b], GuestMode::Workload)));
        (
            ta.join().expect("VM a thread"),
            tb.join().expect("VM b thread"),
        )
    });
    assert_pass(&oa, "VM a");
    assert_pass(&ob, "VM b");
}

#[test]
fn test_vmm_malicious_guest_refused_neighbour_passes() {
    if !can_run("test_vmm_malicious_guest_refused_neighbour_passes") {
        return;
    }
    let d = daemon(512);
    let (bad_id, bad) = served(&d, "small", GttMode::Shadow, "e2e-hostile");
    let (good_id, good) = served(&d, "small", GttMode::TwoDim, "e2e-victim");
    let (ob, og) = std::thread::scope(|s| {
        let tb = s.spawn(|| run(&vm("hostile", vec![bad], GuestMode::Malicious)));
        let tg = s.spawn(|| run(&vm("victim", vec![good], GuestMode::Workload)));
        (tb.join().expect("hostile"), tg.join().expect("victim"))
    });
    // The hostile guest passes only if each attack was refused with the right reason.
    assert_pass(&ob, "hostile guest");
    assert!(
        ob.console.contains("every attack refused"),
        "{}",
        ob.console
    );
    assert_pass(&og, "victim guest");
    let bad_reasons = audit_reasons(&d, bad_id);
    for r in ["address_out_of_range", "forbidden_register"] {
        assert!(bad_reasons.contains(&r), "{r} not audited: {bad_reasons:?}");
    }
    assert_eq!(
        audit_reasons(&d, good_id),
        Vec::<&str>::new(),
        "the victim's vGPU saw no violation"
    );
}

#[test]
fn test_vmm_in_process_malicious_guest_refused() {
    if !can_run("test_vmm_in_process_malicious_guest_refused") {
        return;
    }
    let o = run(&vm(
        "hostile-inproc",
        vec![in_process("mini", GttMode::TwoDim)],
        GuestMode::Malicious,
    ));
    assert_pass(&o, "in-process hostile guest");
}

/// An ELF64 executable with one segment of `code` at 1 MiB.
fn tiny_elf(code: &[u8]) -> Vec<u8> {
    let base = vgpu_vmm::boot_info::IMAGE_GPA;
    let mut b = vec![0u8; 120];
    b[0..4].copy_from_slice(b"\x7fELF");
    b[4] = 2;
    b[5] = 1;
    b[16..18].copy_from_slice(&2u16.to_le_bytes());
    b[18..20].copy_from_slice(&62u16.to_le_bytes());
    b[24..32].copy_from_slice(&base.to_le_bytes());
    b[32..40].copy_from_slice(&64u64.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b[56..58].copy_from_slice(&1u16.to_le_bytes());
    b[64..68].copy_from_slice(&1u32.to_le_bytes());
    b[72..80].copy_from_slice(&120u64.to_le_bytes());
    b[80..88].copy_from_slice(&base.to_le_bytes());
    b[88..96].copy_from_slice(&base.to_le_bytes());
    let len = code.len() as u64;
    b[96..104].copy_from_slice(&len.to_le_bytes());
    b[104..112].copy_from_slice(&len.to_le_bytes());
    b.extend_from_slice(code);
    b
}

#[test]
fn test_vmm_hung_and_crashing_guests_reported() {
    if let Err(why) = vgpu_vmm::kvm_available() {
        eprintln!("SKIP test_vmm_hung_and_crashing_guests_reported: {why}");
        return;
    }
    let path = temp_path("spin.elf");
    // `jmp .`: never reports; the VMM must stop it at the timeout.
    std::fs::write(&path, tiny_elf(&[0xEB, 0xFE])).expect("write image");
    let mut cfg = vm("spin", Vec::new(), GuestMode::Workload);
    cfg.guest = Some(path.clone());
    cfg.timeout = Duration::from_millis(500);
    assert_eq!(run(&cfg).status, GuestStatus::TimedOut);
    // `ud2` with no IDT: a triple fault.
    std::fs::write(&path, tiny_elf(&[0x0F, 0x0B])).expect("write image");
    cfg.timeout = Duration::from_secs(10);
    assert!(matches!(run(&cfg).status, GuestStatus::Crashed(_)));
    // Not an ELF: refused before the VM starts.
    std::fs::write(&path, b"not an image").expect("write image");
    assert!(matches!(
        vgpu_vmm::run(&cfg),
        Err(vgpu_vmm::VmmError::Elf(_))
    ));
    let _ = std::fs::remove_file(&path);
}

#[test]
fn test_vmm_missing_socket_is_an_error() {
    if !can_run("test_vmm_missing_socket_is_an_error") {
        return;
    }
    let cfg = vm(
        "nosock",
        vec![VgpuAttach::Socket(temp_path("no-such.sock"))],
        GuestMode::Workload,
    );
    assert!(matches!(
        vgpu_vmm::run(&cfg),
        Err(vgpu_vmm::VmmError::Remote(0, _))
    ));
}
