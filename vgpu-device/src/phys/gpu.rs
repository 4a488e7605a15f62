//! The physical GPU: carves partitions for vGPUs out of local memory and graphics memory, and
//! answers admission questions exactly.

use std::collections::BTreeSet;
use std::sync::Arc;

use vgpu_abi::pci::{GM_MAPPABLE_END, GM_SIZE};

use super::alloc::RangeAllocator;
use super::lmem::{LmemSlice, LocalMemory};
use super::profile::Profile;
use super::{PhysError, Resource};
use crate::addr::{GmAddr, GmRange, HostLmemOffset};

/// How the physical GPU is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PhysGpuConfig {
    /// Local memory in bytes: a non-zero multiple of the page size, at most the mappable GM
    /// size (each vGPU's local memory is mapped 1:1 by its mappable GM range).
    pub lmem_size: u64,
    /// Most vGPUs at a time; instance ids are `0..max_vgpus`.
    pub max_vgpus: u32,
}

impl Default for PhysGpuConfig {
    fn default() -> Self {
        PhysGpuConfig {
            lmem_size: 4 << 30,
            max_vgpus: 64,
        }
    }
}

/// The share of the physical GPU one vGPU owns. Not `Clone`: give it back with
/// [`PhysGpu::release`] (a partition dropped instead stays allocated).
#[derive(Debug)]
pub struct Partition {
    /// Instance id, unique among live partitions of the GPU.
    pub id: u32,
    /// The profile it was created with.
    pub profile: &'static Profile,
    /// Its local memory (BAR2 aperture).
    pub lmem: LmemSlice,
    /// Its mappable GM range, `profile.lmem_size` bytes.
    pub mappable: GmRange,
    /// Its hidden GM range, `profile.hidden_gm_size` bytes.
    pub hidden: GmRange,
}

impl Partition {
    /// A serializable description of the partition.
    pub fn info(&self) -> PartitionInfo {
        PartitionInfo {
            id: self.id,
            profile: self.profile.name.to_string(),
            lmem_base: self.lmem.host_base(),
            lmem_size: self.lmem.size(),
            mappable: self.mappable,
            hidden: self.hidden,
        }
    }
}

/// Where a partition lies, for snapshots and the API.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartitionInfo {
    /// Instance id.
    pub id: u32,
    /// Profile name.
    pub profile: String,
    /// Start of the local memory slice in the GPU's local memory.
    pub lmem_base: HostLmemOffset,
    /// Size of the local memory slice.
    pub lmem_size: u64,
    /// Mappable GM range.
    pub mappable: GmRange,
    /// Hidden GM range.
    pub hidden: GmRange,
}

/// The physical GPU the vGPUs are carved from.
#[derive(Debug)]
pub struct PhysGpu {
    config: PhysGpuConfig,
    lmem: Arc<LocalMemory>,
    lmem_alloc: RangeAllocator,
    mappable_alloc: RangeAllocator,
    hidden_alloc: RangeAllocator,
    /// Ids of live partitions.
    ids: BTreeSet<u32>,
}

/// Returns `[start, start + size)` to `alloc` while undoing a half-made partition; it was
/// allocated a moment ago, so the free cannot fail.
fn undo(alloc: &mut RangeAllocator, start: u64, size: u64) {
    if let Err(e) = alloc.free(start, size) {
        tracing::error!(error = %e, "rollback of a partition allocation failed");
    }
}

impl PhysGpu {
    /// Builds the GPU: creates its local memory and empty allocators.
    pub fn new(config: PhysGpuConfig) -> Result<Self, PhysError> {
        if config.max_vgpus == 0 {
            return Err(PhysError::InvalidConfig("max_vgpus must be at least 1"));
        }
        if config.lmem_size > GM_MAPPABLE_END {
            return Err(PhysError::InvalidConfig(
                "local memory larger than mappable GM",
            ));
        }
        let lmem = Arc::new(LocalMemory::new(config.lmem_size)?);
        Ok(PhysGpu {
            config,
            lmem_alloc: RangeAllocator::new(0, lmem.size())?,
            lmem,
            mappable_alloc: RangeAllocator::new(0, GM_MAPPABLE_END)?,
            hidden_alloc: RangeAllocator::new(GM_MAPPABLE_END, GM_SIZE)?,
            ids: BTreeSet::new(),
        })
    }

    /// The configuration the GPU was built with.
    pub fn config(&self) -> &PhysGpuConfig {
        &self.config
    }

    /// The GPU's local memory.
    pub fn local_memory(&self) -> &Arc<LocalMemory> {
        &self.lmem
    }

    /// Bytes of local memory held by live partitions.
    pub fn lmem_used(&self) -> u64 {
        self.lmem_alloc.used_bytes()
    }

    /// Number of live partitions.
    pub fn vgpu_count(&self) -> u32 {
        // At most `max_vgpus` ids are ever live.
        u32::try_from(self.ids.len()).unwrap_or(u32::MAX)
    }

    fn ids_left(&self) -> u32 {
        self.config.max_vgpus.saturating_sub(self.vgpu_count())
    }

    /// Carves a partition for `profile`: local memory, mappable and hidden GM, and the lowest
    /// free instance id. All or nothing: on error nothing stays allocated.
    pub fn create_partition(&mut self, profile: &'static Profile) -> Result<Partition, PhysError> {
        self.create_partition_placed(profile, None)
    }

    /// Carves a partition whose GM ranges start exactly at `mappable` and `hidden` (a vGPU
    /// restored or migrated from elsewhere: its guest uses the physical GM numbering). Fails
    /// with `Exhausted` when those ranges are taken.
    pub fn create_partition_at(
        &mut self,
        profile: &'static Profile,
        mappable: GmAddr,
        hidden: GmAddr,
    ) -> Result<Partition, PhysError> {
        self.create_partition_placed(profile, Some((mappable, hidden)))
    }

    fn create_partition_placed(
        &mut self,
        profile: &'static Profile,
        at: Option<(GmAddr, GmAddr)>,
    ) -> Result<Partition, PhysError> {
        profile.validate()?;
        let exhausted = |resource| PhysError::Exhausted {
            resource,
            profile: profile.name,
        };
        let size = profile.lmem_size;
        let hidden_size = profile.hidden_gm_size;
        let id = (0..self.config.max_vgpus)
            .find(|i| !self.ids.contains(i))
            .ok_or_else(|| exhausted(Resource::InstanceIds))?;
        let lbase = self
            .lmem_alloc
            .alloc(size)
            .ok_or_else(|| exhausted(Resource::LocalMemory))?;
        let mbase = match at {
            Some((m, _)) => self.mappable_alloc.alloc_at(m.raw(), size),
            None => self.mappable_alloc.alloc(size),
        };
        let Some(mbase) = mbase else {
            undo(&mut self.lmem_alloc, lbase, size);
            return Err(exhausted(Resource::MappableGm));
        };
        let hbase = match at {
            Some((_, h)) => self.hidden_alloc.alloc_at(h.raw(), hidden_size),
            None => self.hidden_alloc.alloc(hidden_size),
        };
        let Some(hbase) = hbase else {
            undo(&mut self.lmem_alloc, lbase, size);
            undo(&mut self.mappable_alloc, mbase, size);
            return Err(exhausted(Resource::HiddenGm));
        };
        let Some(lmem) = LmemSlice::new(self.lmem.clone(), HostLmemOffset(lbase), size) else {
            // Unreachable: the allocator only hands out page-aligned ranges of local memory.
            undo(&mut self.lmem_alloc, lbase, size);
            undo(&mut self.mappable_alloc, mbase, size);
            undo(&mut self.hidden_alloc, hbase, hidden_size);
            return Err(PhysError::OutOfRange {
                offset: lbase,
                len: size,
            });
        };
        self.ids.insert(id);
        let p = Partition {
            id,
            profile,
            lmem,
            mappable: GmRange {
                start: GmAddr(mbase),
                size,
            },
            hidden: GmRange {
                start: GmAddr(hbase),
                size: hidden_size,
            },
        };
        tracing::debug!(
            id,
            profile = profile.name,
            lmem_base = lbase,
            "partition created"
        );
        Ok(p)
    }

    /// Gives a partition back. Its local memory is scrubbed before it returns to the allocator,
    /// so the next tenant reads zeros.
    pub fn release(&mut self, p: Partition) -> Result<(), PhysError> {
        if !Arc::ptr_eq(p.lmem.memory(), &self.lmem) || !self.ids.contains(&p.id) {
            return Err(PhysError::ForeignPartition(p.id));
        }
        // If scrubbing fails the memory stays allocated: better leaked than leaked to a tenant.
        p.lmem.scrub()?;
        let results = [
            self.lmem_alloc
                .free(p.lmem.host_base().raw(), p.lmem.size()),
            self.mappable_alloc
                .free(p.mappable.start.raw(), p.mappable.size),
            self.hidden_alloc.free(p.hidden.start.raw(), p.hidden.size),
        ];
        self.ids.remove(&p.id);
        tracing::debug!(id = p.id, profile = p.profile.name, "partition released");
        results
            .into_iter()
            .collect::<Result<(), _>>()
            .map_err(PhysError::from)
    }

    /// How many more partitions of `profile` [`PhysGpu::create_partition`] would create in a
    /// row: exact, never an over-commit.
    pub fn available_instances(&self, profile: &Profile) -> u64 {
        if profile.validate().is_err() {
            return 0;
        }
        [
            self.lmem_alloc.count_fit(profile.lmem_size),
            self.mappable_alloc.count_fit(profile.lmem_size),
            self.hidden_alloc.count_fit(profile.hidden_gm_size),
            u64::from(self.ids_left()),
        ]
        .into_iter()
        .min()
        .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::LmemOffset;
    use crate::phys::profile::profile;

    const MIB: u64 = 1 << 20;

    fn gpu(lmem_mib: u64, max_vgpus: u32) -> PhysGpu {
        PhysGpu::new(PhysGpuConfig {
            lmem_size: lmem_mib * MIB,
            max_vgpus,
        })
        .unwrap()
    }

    fn p(name: &str) -> &'static Profile {
        profile(name).unwrap()
    }

    fn exhausted(r: Result<Partition, PhysError>) -> Option<Resource> {
        match r {
            Err(PhysError::Exhausted { resource, .. }) => Some(resource),
            _ => None,
        }
    }

    #[test]
    fn test_create_partition_placement_sequential() {
        let mut g = gpu(256, 8);
        let a = g.create_partition(p("mini")).unwrap();
        let b = g.create_partition(p("small")).unwrap();
        assert_eq!((a.id, b.id), (0, 1));
        assert_eq!(a.lmem.host_base(), HostLmemOffset(0));
        assert_eq!(b.lmem.host_base(), HostLmemOffset(16 * MIB));
        assert_eq!(
            a.mappable,
            GmRange {
                start: GmAddr(0),
                size: 16 * MIB
            }
        );
        assert_eq!(
            b.mappable,
            GmRange {
                start: GmAddr(16 * MIB),
                size: 64 * MIB
            }
        );
        assert_eq!(
            a.hidden,
            GmRange {
                start: GmAddr(GM_MAPPABLE_END),
                size: 48 * MIB
            }
        );
        assert_eq!(b.hidden.start, GmAddr(GM_MAPPABLE_END + 48 * MIB));
        assert_eq!((g.lmem_used(), g.vgpu_count()), (80 * MIB, 2));
        let info = b.info();
        assert_eq!(
            (info.id, info.profile.as_str(), info.lmem_size),
            (1, "small", 64 * MIB)
        );
        g.release(a).unwrap();
        let c = g.create_partition(p("mini")).unwrap();
        assert_eq!(
            (c.id, c.lmem.host_base()),
            (0, HostLmemOffset(0)),
            "lowest id and hole reused"
        );
    }

    #[test]
    fn test_create_partition_out_of_lmem_reports_and_rolls_back() {
        let mut g = gpu(64, 8);
        assert_eq!(g.available_instances(p("large")), 0);
        assert_eq!(
            exhausted(g.create_partition(p("large"))),
            Some(Resource::LocalMemory)
        );
        let m = g.create_partition(p("small")).unwrap();
        assert_eq!(
            m.mappable.start,
            GmAddr(0),
            "nothing left behind by the failed create"
        );
        assert_eq!(m.hidden.start, GmAddr(GM_MAPPABLE_END));
    }

    #[test]
    fn test_create_partition_out_of_hidden_gm_rolls_back() {
        // 5 x 768 MiB of hidden GM fit in 4 GiB; local memory has room for 8.
        let mut g = gpu(2048, 64);
        assert_eq!(g.available_instances(p("compute")), 5);
        let parts: Vec<_> = (0..5)
            .map(|_| g.create_partition(p("compute")).unwrap())
            .collect();
        let used = g.lmem_used();
        assert_eq!(
            exhausted(g.create_partition(p("compute"))),
            Some(Resource::HiddenGm)
        );
        assert_eq!((g.lmem_used(), g.vgpu_count()), (used, 5));
        assert_eq!(
            g.lmem_alloc.count_fit(256 * MIB),
            3,
            "local memory was rolled back"
        );
        assert_eq!(
            g.mappable_alloc.count_fit(256 * MIB),
            11,
            "mappable GM was rolled back"
        );
        for part in parts {
            g.release(part).unwrap();
        }
        assert_eq!(g.lmem_used(), 0);
    }

    #[test]
    fn test_create_partition_out_of_ids_reports() {
        let mut g = gpu(256, 2);
        let _a = g.create_partition(p("mini")).unwrap();
        let _b = g.create_partition(p("mini")).unwrap();
        assert_eq!(g.available_instances(p("mini")), 0);
        assert_eq!(
            exhausted(g.create_partition(p("mini"))),
            Some(Resource::InstanceIds)
        );
        let err = g.create_partition(p("mini")).unwrap_err().to_string();
        assert_eq!(err, "Out of instance ids for profile mini");
    }

    #[test]
    fn test_new_bad_config_rejected() {
        assert!(PhysGpu::new(PhysGpuConfig {
            max_vgpus: 0,
            ..Default::default()
        })
        .is_err());
        assert!(PhysGpu::new(PhysGpuConfig {
            lmem_size: 8 << 30,
            max_vgpus: 4
        })
        .is_err());
        assert!(PhysGpu::new(PhysGpuConfig {
            lmem_size: 12345,
            max_vgpus: 4
        })
        .is_err());
        let g = PhysGpu::new(PhysGpuConfig::default()).unwrap();
        assert_eq!(g.local_memory().size(), 4 << 30);
        assert_eq!(g.available_instances(p("large")), 4);
        assert_eq!(g.available_instances(p("mini")), 64, "capped by max_vgpus");
    }

    #[test]
    fn test_release_scrubs_before_reuse() {
        let mut g = gpu(64, 4);
        let a = g.create_partition(p("small")).unwrap();
        let pattern = vec![0x5Au8; 8192];
        a.lmem.write(LmemOffset(0), &pattern).unwrap();
        a.lmem.write(LmemOffset(64 * MIB - 8192), &pattern).unwrap();
        let base = a.lmem.host_base();
        g.release(a).unwrap();
        let b = g.create_partition(p("small")).unwrap();
        assert_eq!(b.lmem.host_base(), base, "B gets A's slice");
        let mut buf = vec![0xFFu8; 8192];
        for off in [0, 64 * MIB - 8192] {
            b.lmem.read(LmemOffset(off), &mut buf).unwrap();
            assert!(buf.iter().all(|&x| x == 0), "data leaked at {off:#x}");
        }
    }

    #[test]
    fn test_release_foreign_partition_rejected() {
        let mut g1 = gpu(64, 4);
        let mut g2 = gpu(64, 4);
        let a = g1.create_partition(p("mini")).unwrap();
        assert!(matches!(g2.release(a), Err(PhysError::ForeignPartition(0))));
        assert_eq!(g1.vgpu_count(), 1);
    }

    #[test]
    fn test_partition_slice_confined_to_its_range() {
        let mut g = gpu(64, 4);
        let a = g.create_partition(p("mini")).unwrap();
        let b = g.create_partition(p("mini")).unwrap();
        b.lmem.write(LmemOffset(0), &[7; 4]).unwrap();
        let mut buf = [0u8; 4];
        assert!(
            a.lmem.read(LmemOffset(16 * MIB), &mut buf).is_err(),
            "A cannot reach B"
        );
        assert!(a.lmem.write(LmemOffset(16 * MIB - 2), &buf).is_err());
        assert!(a.lmem.page(LmemOffset(16 * MIB)).is_none());
        assert_eq!(a.lmem.host_offset(LmemOffset(u64::MAX)), None);
        assert_ne!(
            a.lmem.page(LmemOffset(16 * MIB - 1)),
            b.lmem.page(LmemOffset(0))
        );
    }
}
