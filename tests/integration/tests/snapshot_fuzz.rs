//! Snapshot files are untrusted input. Real snapshots of a busy vGPU (rings enabled, work
//! queued behind a paused scheduler, GGTT entries, display plane, scratch registers, local
//! memory) are mutated — mostly in their tree, re-encoded with a valid checksum so that the
//! mutation reaches the component validation, sometimes in their raw bytes — and fed to
//!
//! - `restore_from_file` on a daemon: either a clean error with nothing created (no vGPU, no
//!   local memory in use) or a restored vGPU that runs a workload bit-exactly; and
//! - `Vgpu::restore` into an existing vGPU: either an error that changed nothing (its own
//!   snapshot is byte-identical before and after) or a restored vGPU that runs a workload.
//!
//! A counting global allocator checks that no restore allocates in proportion to a number
//! read from the file (a huge count or length): peak allocation stays within a bound of the
//! file's own size. `FUZZ_CASES` raises the number of cases (`scripts/fuzz`).
#![allow(clippy::cast_possible_truncation)] // Test arithmetic on small known values.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use support::*;
use vgpu_abi::cmd::{enc, BPP_32, ROP_PATCOPY};
use vgpu_abi::gtt::pte_local;
use vgpu_abi::{regs, Engine, PAGE_SIZE};
use vgpu_api::daemon::Daemon;
use vgpu_api::migrate::{restore_from_file, snapshot_to_file};
use vgpu_device::driver::{Driver, Locked};
use vgpu_device::vgpu::{GttMode, Vgpu};
use vgpu_integration_tests::{daemon, temp_path};
use vgpu_migration::Snapshot;

/// Counts live heap bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is forwarded unchanged.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: the caller's contract is forwarded unchanged.
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: the caller's contract is forwarded unchanged.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            if new >= l.size() {
                let now = LIVE.fetch_add(new - l.size(), Ordering::Relaxed) + new - l.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result and the peak heap growth during it.
fn peak_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let r = f();
    (r, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

/// The busy source vGPU's snapshot and the places a restored copy is checked.
struct Source {
    bytes: Vec<u8>,
    tree: Snapshot,
}

/// Fence of the queued blit submission.
const FENCE: u64 = 0x30_0000;

/// A mini vGPU with state everywhere, work queued behind a paused scheduler, saved to a file.
fn busy_snapshot() -> Source {
    let d0 = daemon(64);
    let info = d0.create(&spec("mini", GttMode::Shadow, "busy")).unwrap();
    let vgpu = d0.vgpu(info.id).unwrap();
    {
        let mut d = Driver::probe(Locked(vgpu.clone())).unwrap();
        d.lmem_write(0x1_0000, &pattern(5 * 4096, 3));
        for p in 0..16u64 {
            d.map_gm(
                d.pv().hidden_base + p * PAGE_SIZE,
                pte_local(0x8_0000 + p * PAGE_SIZE),
            );
        }
        d.write32(regs::SCRATCH0, 0xfeed_f00d);
        d.write32(regs::PLANE_SURF_LO, d.gm_of_lmem(0) as u32);
        d.write32(regs::PLANE_WIDTH, 64);
        d.write32(regs::PLANE_HEIGHT, 64);
        d.write32(regs::PLANE_STRIDE, 256);
        d.write32(regs::PLANE_CTL, regs::PLANE_CTL_ENABLE);
        d.setup_ring(Engine::Blit).unwrap();
        d.setup_ring(Engine::Compute).unwrap();
        d0.scheduler().pause(info.id).unwrap();
        // Queued, not run: restored and then executed by the restored vGPU.
        let fill = enc::color_blt(
            ROP_PATCOPY,
            BPP_32,
            d.gm_of_lmem(0x20_0000),
            256,
            64,
            16,
            0xabcd,
        );
        let fence = enc::store_data_imm(d.gm_of_lmem(FENCE), 0x600d);
        d.submit(Engine::Blit, &[fill.as_slice(), &fence].concat())
            .unwrap();
        d.submit(
            Engine::Compute,
            &enc::store_data_imm(d.gm_of_lmem(FENCE + 64), 7),
        )
        .unwrap();
    }
    drop(vgpu);
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = temp_path(&format!("busy-{}.vgpu", N.fetch_add(1, Ordering::Relaxed)));
    snapshot_to_file(&d0, info.id, &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    d0.shutdown();
    let tree = vgpu_migration::decode(&bytes).unwrap();
    Source { bytes, tree }
}

/// A mutated snapshot file.
#[derive(Clone, Debug)]
enum Input {
    Tree(Vec<Mutation>),
    Bytes(Vec<(usize, u8)>),
    Truncated(usize),
    Appended(Vec<u8>),
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        8 => prop::collection::vec(mutation(), 1..5).prop_map(Input::Tree),
        1 => prop::collection::vec((any::<usize>(), 1u8..=255), 1..6).prop_map(Input::Bytes),
        1 => any::<usize>().prop_map(Input::Truncated),
        1 => prop::collection::vec(any::<u8>(), 1..64).prop_map(Input::Appended),
    ]
}

impl Source {
    fn make(&self, i: &Input) -> Vec<u8> {
        match i {
            Input::Tree(ms) => {
                let mut t = self.tree.clone();
                for m in ms {
                    mutate(&mut t, m);
                }
                vgpu_migration::encode(&t).unwrap()
            }
            Input::Bytes(f) => {
                let mut b = self.bytes.clone();
                for (at, x) in f {
                    let n = b.len();
                    b[at % n] ^= x;
                }
                b
            }
            Input::Truncated(n) => self.bytes[..n % self.bytes.len()].to_vec(),
            Input::Appended(x) => [self.bytes.as_slice(), x].concat(),
        }
    }
}

/// Resets the vGPU as a rebooting guest would (a restored guest may legitimately have
/// remapped its own GGTT), runs a fill and checks it bit for bit.
fn workload(vgpu: Arc<Mutex<Vgpu>>, color: u32) {
    let mut d = Driver::probe(Locked(vgpu)).expect("restored vGPU probes");
    d.write32(regs::RESET_CTL, regs::RESET_DEVICE);
    d.write32(regs::INTR_MASK, 0);
    d.forget_rings();
    let c = enc::color_blt(
        ROP_PATCOPY,
        BPP_32,
        d.gm_of_lmem(0x40_0000),
        256,
        64,
        8,
        color,
    );
    d.submit(Engine::Blit, &c)
        .expect("restored vGPU takes work");
    d.wait_idle(Engine::Blit, T)
        .expect("restored vGPU runs work");
    let mut got = vec![0u8; 256 * 8];
    d.lmem_read(0x40_0000, &mut got);
    assert!(
        got.chunks_exact(4)
            .all(|c| u32::from_le_bytes(c.try_into().unwrap()) == color),
        "restored vGPU's blit is wrong"
    );
}

/// Waits until the vGPU's engines are idle or stopped on an error.
fn settle(vgpu: &Arc<Mutex<Vgpu>>) {
    let mut d = Driver::probe(Locked(vgpu.clone())).unwrap();
    wait_until(T, "restored engines to settle", || {
        Engine::ALL.iter().all(|&e| {
            let s = d.read32(regs::engine_base(e) + regs::ENGINE_STATUS);
            s & (regs::ENGINE_STATUS_IDLE | regs::ENGINE_STATUS_ERROR) != 0
        })
    });
}

/// Peak allocation a restore may reach: the file read, its decoded tree, the local-memory
/// pages, the new vGPU's structures — a few times the file plus a constant, never a number
/// read from the file.
fn alloc_bound(file: usize) -> usize {
    6 * file + (48 << 20)
}

fn restore_file(d: &Daemon, path: &Path, bytes: &[u8], n: u32) -> Option<u32> {
    std::fs::write(path, bytes).unwrap();
    let (r, peak) = peak_during(|| restore_from_file(d, path, Some(format!("r{n}")), None));
    assert!(
        peak <= alloc_bound(bytes.len()),
        "restore of a {}-byte file allocated {peak} bytes",
        bytes.len()
    );
    match r {
        Ok(info) => Some(info.id),
        Err(_) => {
            assert!(d.list().is_empty(), "a refused restore created a vGPU");
            assert_eq!(
                d.gpu_info().lmem_used_bytes,
                0,
                "a refused restore kept memory"
            );
            None
        }
    }
}

#[test]
fn test_valid_busy_snapshot_restores_and_runs_queued_work() {
    let src = busy_snapshot();
    let d = daemon(64);
    let path = temp_path("valid.vgpu");
    let id = restore_file(&d, &path, &src.bytes, 0).expect("the valid snapshot restores");
    let v = d.vgpu(id).unwrap();
    let mut drv = Driver::probe(Locked(v.clone())).unwrap();
    wait_until(T, "the queued work to run", || {
        let mut f = [0u8; 4];
        drv.lmem_read(FENCE, &mut f);
        u32::from_le_bytes(f) == 0x600d
    });
    assert_eq!(drv.read32(regs::SCRATCH0), 0xfeed_f00d);
    let mut px = [0u8; 4];
    drv.lmem_read(0x20_0000 + 256 * 15 + 252, &mut px);
    assert_eq!(
        u32::from_le_bytes(px),
        0xabcd,
        "queued blit ran after the restore"
    );
    drop(drv);
    workload(v, 0x1234_5678);
    let _ = std::fs::remove_file(path);
    d.shutdown();
}

#[test]
fn test_fuzz_mutated_snapshot_files_refused_cleanly_or_restore_working() {
    let src = busy_snapshot();
    let d = daemon(64);
    let path = temp_path("fuzz.vgpu");
    let restored = std::cell::Cell::new(0u32);
    let n = std::cell::Cell::new(0u32);
    run_prop("snapshot_file", cases(48), input(), |i| {
        n.set(n.get() + 1);
        let bytes = src.make(&i);
        if let Some(id) = restore_file(&d, &path, &bytes, n.get()) {
            let v = d.vgpu(id).unwrap();
            settle(&v);
            workload(v, n.get());
            d.destroy(id).unwrap();
            assert_eq!(
                d.gpu_info().lmem_used_bytes,
                0,
                "destroy frees the restored vGPU"
            );
            restored.set(restored.get() + 1);
        }
    });
    eprintln!(
        "{} of {} mutated files restored a working vGPU",
        restored.get(),
        n.get()
    );
    let _ = std::fs::remove_file(path);
    d.shutdown();
}

#[test]
fn test_fuzz_mutated_snapshots_into_existing_vgpu_change_nothing_or_work() {
    let src = busy_snapshot();
    let d = daemon(64);
    let path = temp_path("target.vgpu");
    let id = restore_file(&d, &path, &src.bytes, 0).unwrap();
    let _ = std::fs::remove_file(path);
    let vgpu = d.vgpu(id).unwrap();
    settle(&vgpu);
    d.scheduler().pause(id).unwrap();
    let state = |v: &Arc<Mutex<Vgpu>>| {
        vgpu_migration::encode(&v.lock().unwrap().save(true).unwrap()).unwrap()
    };
    let restored = std::cell::Cell::new(0u32);
    run_prop(
        "snapshot_tree_restore",
        cases(64),
        prop::collection::vec(mutation(), 1..5),
        |ms| {
            let mut t = src.tree.clone();
            for m in &ms {
                mutate(&mut t, m);
            }
            // Through the envelope, as a file or a migration stream would arrive.
            let Ok(t) = vgpu_migration::decode(&vgpu_migration::encode(&t).unwrap()) else {
                return;
            };
            let before = state(&vgpu);
            let (r, peak) = peak_during(|| vgpu.lock().unwrap().restore(&t));
            assert!(
                peak <= alloc_bound(src.bytes.len()),
                "restore allocated {peak} bytes"
            );
            match r {
                Err(_) => assert!(state(&vgpu) == before, "a refused restore changed the vGPU"),
                Ok(()) => {
                    d.scheduler().resume(id).unwrap();
                    settle(&vgpu);
                    workload(vgpu.clone(), 0x0f0f_0f0f);
                    d.scheduler().pause(id).unwrap();
                    vgpu.lock()
                        .unwrap()
                        .restore(&src.tree)
                        .expect("the original restores again");
                    restored.set(restored.get() + 1);
                }
            }
        },
    );
    eprintln!(
        "{} mutated trees were accepted by Vgpu::restore",
        restored.get()
    );
    drop(vgpu);
    d.shutdown();
}
