//! The physical GPU model: local memory, GM partitioning, profiles and admission.
//!
//! A [`PhysGpu`] owns the GPU's local memory ([`LocalMemory`], a memfd) and the two halves of
//! the graphics-memory (GM) address space. Each vGPU gets a [`Partition`] sized by a
//! [`Profile`]: a slice of local memory (its BAR2 aperture), an equally sized range of mappable
//! GM and a range of hidden GM, as in XenGT's GGTT partitioning.

pub mod alloc;
pub mod gpu;
pub mod lmem;
pub mod profile;
#[cfg(test)]
mod proptests;

use std::fmt;

pub use alloc::{AllocError, RangeAllocator};
pub use gpu::{Partition, PartitionInfo, PhysGpu, PhysGpuConfig};
pub use lmem::{LmemSlice, LocalMemory};
pub use profile::{profile, profiles, Profile};

/// A resource a partition is carved from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    /// Local memory (VRAM).
    LocalMemory,
    /// Mappable (low) graphics memory.
    MappableGm,
    /// Hidden (high) graphics memory.
    HiddenGm,
    /// vGPU instance ids.
    InstanceIds,
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resource::LocalMemory => "local memory",
            Resource::MappableGm => "mappable GM",
            Resource::HiddenGm => "hidden GM",
            Resource::InstanceIds => "instance ids",
        })
    }
}

/// Errors of the physical GPU model.
#[derive(Debug, thiserror::Error)]
pub enum PhysError {
    /// The memfd backing local memory could not be created or sized.
    #[error("Cannot create local memory")]
    CreateMemory(#[source] std::io::Error),
    /// Local memory could not be mapped into the daemon.
    #[error("Cannot map local memory")]
    MapMemory(#[source] std::io::Error),
    /// A configuration value is unusable.
    #[error("Invalid configuration: {0}")]
    InvalidConfig(&'static str),
    /// A profile is unusable.
    #[error("Invalid profile {profile}: {reason}")]
    InvalidProfile {
        /// The profile's name.
        profile: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An access falls (partly) outside local memory or a slice of it.
    #[error("Access out of range: offset {offset:#x}, length {len:#x}")]
    OutOfRange {
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: u64,
    },
    /// Not enough of a resource is left for a partition.
    #[error("Out of {resource} for profile {profile}")]
    Exhausted {
        /// What ran out.
        resource: Resource,
        /// The profile asked for.
        profile: &'static str,
    },
    /// A partition released to a GPU that did not create it.
    #[error("Partition {0} does not belong to this GPU")]
    ForeignPartition(u32),
    /// An allocator rejected a range.
    #[error("Allocator error")]
    Alloc(#[from] AllocError),
}
