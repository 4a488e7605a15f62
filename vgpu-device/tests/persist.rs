//! Snapshot and restore of a vGPU: round trip, mid-workload restore into another physical GPU
//! giving bit-identical output, and hostile snapshots rejected with nothing changed.
#![allow(clippy::cast_possible_truncation)] // Test arithmetic on small known values.

mod common;

use common::*;
use vgpu_abi::cmd::{enc, BPP_32, ROP_PATCOPY, ROP_SRCCOPY};
use vgpu_abi::gtt::pte_guest;
use vgpu_abi::{regs, Engine, PAGE_SIZE};
use vgpu_device::driver::{DeviceAccess, Driver, Inline};
use vgpu_device::phys::profile;
use vgpu_device::vgpu::{GttMode, Vgpu, VgpuConfig};
use vgpu_migration::{decode, encode, Snapshot, Snapshottable};

fn mutate(v: &mut Vgpu) {
    let mut d = Driver::probe(Inline(v)).unwrap();
    d.write32(regs::SCRATCH0, 0xabcd);
    d.write32(regs::engine_base(Engine::Render) + regs::gpr(2), 9);
    let h = d.pv().hidden_base;
    d.map_gm(h + 3 * PAGE_SIZE, vgpu_abi::gtt::pte_local(0x9000));
    d.lmem_write(0x5000, &[7; 100]);
    d.setup_ring(Engine::Blit).unwrap();
    let fill = enc::color_blt(ROP_PATCOPY, BPP_32, d.gm_of_lmem(0x10000), 64, 16, 16, 0x55);
    // Queue without running: the doorbell scans, nothing executes until progress().
    let dev: &mut Inline = d.device();
    let _ = dev;
    d.submit(Engine::Blit, &fill).unwrap();
}

vgpu_migration::snapshot_roundtrip_test!(
    test_vgpu_snapshot_roundtrip_restores_exact_state,
    {
        let mut phys = phys(64);
        vgpu(&mut phys, "mini", GttMode::Shadow)
    },
    |v: &mut Vgpu| mutate(v)
);

/// The workload: eight submissions, each a fill then a copy into a distinct tile.
fn workload<A: DeviceAccess>(d: &mut Driver<A>, from: u32, to: u32) {
    for i in from..to {
        let tile = 0x10_0000 + u64::from(i) * 0x4000;
        let fill = enc::color_blt(
            ROP_PATCOPY,
            BPP_32,
            d.gm_of_lmem(0x8000),
            256,
            64,
            16,
            0x0101_0101 * (i + 1),
        );
        let copy = enc::src_copy_blt(enc::Copy {
            rop: ROP_SRCCOPY,
            bpp: BPP_32,
            dst: d.gm_of_lmem(tile),
            dst_pitch: 256,
            src: d.gm_of_lmem(0x8000),
            src_pitch: 256,
            width: 64,
            height: 16,
            pattern: 0,
        });
        d.submit(Engine::Blit, &[fill.as_slice(), &copy].concat())
            .unwrap();
    }
}

fn lmem_bytes(v: &mut Vgpu) -> Vec<u8> {
    let mut b = vec![0u8; 4 << 20];
    v.bar2_read(0, &mut b);
    b
}

fn run_case(mode: GttMode) {
    // Reference: uninterrupted run.
    let mut p1 = phys(64);
    let mut reference = vgpu(&mut p1, "mini", mode);
    {
        let mut d = Driver::probe(Inline(&mut reference)).unwrap();
        workload(&mut d, 0, 8);
        d.wait_idle(Engine::Blit, std::time::Duration::from_secs(10))
            .unwrap();
    }
    let want = lmem_bytes(&mut reference);

    // Interrupted run: queue everything, execute some, snapshot mid-workload.
    let mut p2 = phys(64);
    let _pad = vgpu(&mut p2, "mini", mode); // so the source sits at other GM/lmem offsets
    let mut src = vgpu(&mut p2, "mini", mode);
    {
        let mut d = Driver::probe(Inline(&mut src)).unwrap();
        d.setup_ring(Engine::Blit).unwrap();
    }
    // Submit through the device but run only part of it.
    let shared = src.shared().clone();
    {
        let mut d = Driver::probe(NoProgress(&mut src)).unwrap();
        d.setup_ring(Engine::Blit).unwrap();
        workload(&mut d, 0, 8);
    }
    let mut tlb = vgpu_device::engine::translate::Tlb::default();
    for _ in 0..3 {
        vgpu_device::engine::exec::run_slice(
            &shared,
            Engine::Blit,
            &mut tlb,
            std::time::Duration::ZERO,
        );
    }
    assert!(
        shared.engine(Engine::Blit).has_work(),
        "work left at the snapshot"
    );
    let bytes = encode(&src.save(true).unwrap()).unwrap();

    // Restore into a fresh physical GPU at the same GM ranges, finish there.
    let header = src.header();
    let mut p3 = phys(64);
    let part = p3
        .create_partition_at(
            profile("mini").unwrap(),
            header.mappable.start,
            header.hidden.start,
        )
        .unwrap();
    let other_mode = if mode == GttMode::Shadow {
        GttMode::TwoDim
    } else {
        GttMode::Shadow
    };
    let mut dst = Vgpu::new(
        part,
        &VgpuConfig {
            gtt_mode: other_mode,
            ..Default::default()
        },
    )
    .unwrap();
    dst.restore(&decode(&bytes).unwrap()).unwrap();
    vgpu_device::engine::exec::run_until_idle(dst.shared(), 1000);
    assert!(!dst.shared().engine(Engine::Blit).in_error());
    assert_eq!(
        lmem_bytes(&mut dst),
        want,
        "restored run finishes bit-identical ({mode:?} -> {other_mode:?})"
    );
    let b = regs::engine_base(Engine::Blit);
    let mut d = Driver::probe(Inline(&mut dst)).unwrap();
    assert_eq!(
        d.read32(b + regs::RING_HEAD),
        d.read32(b + regs::RING_TAIL),
        "HEAD caught up with TAIL"
    );
}

/// A transport that never runs the engines (submissions stay queued).
struct NoProgress<'a>(&'a mut Vgpu);

impl DeviceAccess for NoProgress<'_> {
    fn bar0_read(&mut self, o: u64, d: &mut [u8]) {
        self.0.bar0_read(o, d)
    }
    fn bar0_write(&mut self, o: u64, d: &[u8]) {
        self.0.bar0_write(o, d)
    }
    fn bar2_read(&mut self, o: u64, d: &mut [u8]) {
        self.0.bar2_read(o, d)
    }
    fn bar2_write(&mut self, o: u64, d: &[u8]) {
        self.0.bar2_write(o, d)
    }
    fn progress(&mut self) {}
}

#[test]
fn test_restore_mid_workload_gives_bit_identical_output_shadow() {
    run_case(GttMode::Shadow);
}

#[test]
fn test_restore_mid_workload_gives_bit_identical_output_two_dim() {
    run_case(GttMode::TwoDim);
}

fn saved(v: &mut Vgpu) -> Snapshot {
    v.save(false).unwrap()
}

fn set_child<T: serde::Serialize>(s: &mut Snapshot, id: &str, state: &T) {
    s.add(Snapshot::with_state(id, state).unwrap());
}

#[test]
fn test_hostile_snapshots_rejected_without_change() {
    let mut phys = phys(128);
    let mut v = vgpu(&mut phys, "mini", GttMode::Shadow);
    mutate(&mut v);
    let good = saved(&mut v);
    let before = encode(&saved(&mut v)).unwrap();

    // A forbidden command smuggled into a queued submission.
    let mut s = good.clone();
    let mut eng: vgpu_device::engine::context::EngineState = s.child_state("engine.blit").unwrap();
    assert!(!eng.pending.is_empty());
    eng.pending[0].cmds[0].raw =
        enc::load_register_imm(regs::engine_base(Engine::Blit) + regs::RING_BASE_LO, 0).to_vec();
    set_child(&mut s, "engine.blit", &eng);
    let err = v.restore(&s).unwrap_err().to_string();
    assert!(err.contains("forbidden_register"), "{err}");

    // A GGTT of the wrong size, an entry with reserved bits, an entry beyond local memory.
    #[derive(serde::Serialize, serde::Deserialize)]
    struct G {
        entries: Vec<u64>,
        faults: u64,
        last_fault: u64,
    }
    let g: G = good.child_state("ggtt").unwrap();
    for bad in [
        G {
            entries: g.entries[1..].to_vec(),
            faults: 0,
            last_fault: 0,
        },
        G {
            entries: {
                let mut e = g.entries.clone();
                e[5] = pte_guest(0x1000) | 1 << 9;
                e
            },
            faults: 0,
            last_fault: 0,
        },
        G {
            entries: {
                let mut e = g.entries.clone();
                e[5] = vgpu_abi::gtt::pte_local(1 << 30);
                e
            },
            faults: 0,
            last_fault: 0,
        },
    ] {
        let mut s = good.clone();
        set_child(&mut s, "ggtt", &bad);
        assert!(v.restore(&s).is_err());
    }

    // A register file of the wrong size; a missing component; another profile.
    let mut s = good.clone();
    set_child(&mut s, "regs", &vec![0u32; 10]);
    assert!(v.restore(&s).is_err());
    let mut s = good.clone();
    s.children.remove("msix");
    assert!(v.restore(&s).unwrap_err().to_string().contains("msix"));
    let mut other = vgpu(&mut phys, "small", GttMode::Shadow);
    let e = other.restore(&good).unwrap_err().to_string();
    assert!(e.contains("profile"), "{e}");

    // Ring offsets outside the ring, a cursor past the submission.
    let mut s = good.clone();
    let mut eng: vgpu_device::engine::context::EngineState = s.child_state("engine.blit").unwrap();
    eng.cursor = 1000;
    set_child(&mut s, "engine.blit", &eng);
    assert!(v.restore(&s).is_err());

    // Nothing changed by the failed attempts.
    assert_eq!(encode(&saved(&mut v)).unwrap(), before);
    // And the good snapshot still restores.
    v.restore(&good).unwrap();
    let _ = v.snapshot().unwrap();
}
