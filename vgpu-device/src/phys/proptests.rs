//! Property test of admission: over random create/release sequences with mixed profiles,
//! `available_instances` always matches what `create_partition` then does, live partitions never
//! overlap in local memory, mappable GM or hidden GM, and a new tenant never sees stale data.

use std::collections::BTreeSet;

use proptest::prelude::*;
use vgpu_abi::pci::{GM_MAPPABLE_END, GM_SIZE};

use super::*;
use crate::addr::LmemOffset;

const MIB: u64 = 1 << 20;

fn gpu(lmem_mib: u64, max_vgpus: u32) -> PhysGpu {
    PhysGpu::new(PhysGpuConfig {
        lmem_size: lmem_mib * MIB,
        max_vgpus,
    })
    .unwrap()
}

fn exhausted(r: Result<Partition, PhysError>) -> bool {
    matches!(r, Err(PhysError::Exhausted { .. }))
}

#[derive(Clone, Debug)]
enum Op {
    Create(usize),
    Release(usize),
    Probe(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let n = profiles().len();
    prop_oneof![
        4 => (0..n).prop_map(Op::Create),
        2 => any::<usize>().prop_map(Op::Release),
        1 => (0..n).prop_map(Op::Probe),
    ]
}

fn disjoint(mut ranges: Vec<(u64, u64)>) -> bool {
    ranges.sort_unstable();
    ranges.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0)
}

fn check_live(g: &PhysGpu, live: &[Partition]) -> Result<(), TestCaseError> {
    let lm = live
        .iter()
        .map(|p| (p.lmem.host_base().raw(), p.lmem.size()))
        .collect();
    let mg = live
        .iter()
        .map(|p| (p.mappable.start.raw(), p.mappable.size))
        .collect();
    let hg = live
        .iter()
        .map(|p| (p.hidden.start.raw(), p.hidden.size))
        .collect();
    prop_assert!(disjoint(lm) && disjoint(mg) && disjoint(hg));
    for p in live {
        prop_assert!(p.lmem.host_base().raw() + p.lmem.size() <= g.local_memory().size());
        prop_assert!(p.mappable.end() <= GM_MAPPABLE_END);
        prop_assert!(p.hidden.start.raw() >= GM_MAPPABLE_END && p.hidden.end() <= GM_SIZE);
        prop_assert!(p.id < g.config().max_vgpus);
    }
    let ids: BTreeSet<u32> = live.iter().map(|p| p.id).collect();
    prop_assert_eq!(ids.len(), live.len());
    prop_assert_eq!(g.vgpu_count() as usize, live.len());
    prop_assert_eq!(
        g.lmem_used(),
        live.iter().map(|p| p.lmem.size()).sum::<u64>()
    );
    Ok(())
}

/// A new tenant reads zeros at both ends of its slice, then marks them.
fn first_touch(part: &Partition) -> Result<(), TestCaseError> {
    let last = LmemOffset(part.lmem.size() - 1);
    let mut b = [0xFFu8; 1];
    for off in [LmemOffset(0), last] {
        part.lmem.read(off, &mut b).unwrap();
        prop_assert_eq!(b[0], 0, "stale data in partition {}", part.id);
        part.lmem.write(off, &[0xC3]).unwrap();
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn test_admission_random_sequences_exact_and_disjoint(
        lmem_mib in prop_oneof![Just(128u64), Just(1024), Just(2048)],
        max_vgpus in 2u32..=12,
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let mut g = gpu(lmem_mib, max_vgpus);
        let mut live: Vec<Partition> = Vec::new();
        for op in ops {
            match op {
                Op::Create(i) => {
                    let prof = &profiles()[i];
                    let avail = g.available_instances(prof);
                    match g.create_partition(prof) {
                        Ok(part) => {
                            prop_assert!(avail >= 1);
                            first_touch(&part)?;
                            live.push(part);
                        }
                        Err(e) => {
                            prop_assert_eq!(avail, 0, "refused with {} available: {}", avail, e);
                        }
                    }
                }
                Op::Release(i) if !live.is_empty() => {
                    let part = live.swap_remove(i % live.len());
                    g.release(part).unwrap();
                }
                Op::Release(_) => {}
                Op::Probe(i) => {
                    let prof = &profiles()[i];
                    let n = g.available_instances(prof);
                    let mut extra = Vec::new();
                    for _ in 0..n {
                        let part = g.create_partition(prof);
                        prop_assert!(part.is_ok(), "over-commit: {} promised", n);
                        if let Ok(part) = part {
                            extra.push(part);
                        }
                    }
                    prop_assert!(exhausted(g.create_partition(prof)));
                    live.append(&mut extra);
                    check_live(&g, &live)?;
                    let keep = live.len() - usize::try_from(n).unwrap();
                    for part in live.drain(keep..) {
                        g.release(part).unwrap();
                    }
                }
            }
            check_live(&g, &live)?;
        }
    }
}
