//! The snapshot tree: each component saves its state as serialized bytes under its id, with
//! children for sub-components (Cloud Hypervisor's `Snapshot` shape).

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Errors of snapshot trees.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A required component is missing.
    #[error("Snapshot has no component '{0}'")]
    Missing(String),
    /// A state could not be (de)serialized.
    #[error("State of '{id}' does not decode")]
    Codec {
        /// Component id.
        id: String,
        /// Why.
        #[source]
        source: postcard::Error,
    },
    /// The tree is deeper or wider than any vGPU snapshot can be.
    #[error("Snapshot tree too large: {0}")]
    TooLarge(&'static str),
}

/// Most children of one node, and most levels: bounds on what a hostile snapshot can make us
/// walk.
pub const MAX_CHILDREN: usize = 256;
/// Deepest tree accepted.
pub const MAX_DEPTH: usize = 8;

/// One node: a component's serialized state and its children.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Component id.
    pub id: String,
    /// The component's own state (postcard-encoded), if any.
    pub state: Option<Vec<u8>>,
    /// Sub-components by id.
    pub children: BTreeMap<String, Snapshot>,
}

impl Snapshot {
    /// An empty node.
    pub fn new(id: impl Into<String>) -> Self {
        Snapshot {
            id: id.into(),
            state: None,
            children: BTreeMap::new(),
        }
    }

    /// A node holding `state`.
    pub fn with_state<T: Serialize>(
        id: impl Into<String>,
        state: &T,
    ) -> Result<Self, SnapshotError> {
        let id = id.into();
        let bytes = postcard::to_stdvec(state).map_err(|source| SnapshotError::Codec {
            id: id.clone(),
            source,
        })?;
        Ok(Snapshot {
            id,
            state: Some(bytes),
            children: BTreeMap::new(),
        })
    }

    /// Adds a child.
    pub fn add(&mut self, child: Snapshot) {
        self.children.insert(child.id.clone(), child);
    }

    /// The child `id`.
    pub fn child(&self, id: &str) -> Result<&Snapshot, SnapshotError> {
        self.children
            .get(id)
            .ok_or_else(|| SnapshotError::Missing(format!("{}/{id}", self.id)))
    }

    /// Decodes this node's state.
    pub fn state<T: DeserializeOwned>(&self) -> Result<T, SnapshotError> {
        let bytes = self
            .state
            .as_deref()
            .ok_or_else(|| SnapshotError::Missing(format!("{} state", self.id)))?;
        postcard::from_bytes(bytes).map_err(|source| SnapshotError::Codec {
            id: self.id.clone(),
            source,
        })
    }

    /// Decodes the state of child `id`.
    pub fn child_state<T: DeserializeOwned>(&self, id: &str) -> Result<T, SnapshotError> {
        self.child(id)?.state()
    }

    /// Checks the shape bounds (depth, width).
    pub fn check_bounds(&self) -> Result<(), SnapshotError> {
        fn walk(s: &Snapshot, depth: usize) -> Result<(), SnapshotError> {
            if depth > MAX_DEPTH {
                return Err(SnapshotError::TooLarge("too deep"));
            }
            if s.children.len() > MAX_CHILDREN {
                return Err(SnapshotError::TooLarge("too many children"));
            }
            s.children.values().try_for_each(|c| walk(c, depth + 1))
        }
        walk(self, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_snapshot_typed_state_roundtrip_and_missing_child() {
        let mut root = Snapshot::new("vgpu");
        root.add(Snapshot::with_state("regs", &vec![1u32, 2, 3]).unwrap());
        assert_eq!(root.child_state::<Vec<u32>>("regs").unwrap(), vec![1, 2, 3]);
        assert!(matches!(root.child("ggtt"), Err(SnapshotError::Missing(_))));
        assert!(
            root.child("regs").unwrap().state::<Vec<u64>>().is_ok(),
            "postcard varints decode as u64 too"
        );
    }

    #[test]
    fn test_snapshot_bounds_reject_deep_trees() {
        let mut s = Snapshot::new("0");
        for i in 1..=MAX_DEPTH + 1 {
            let mut p = Snapshot::new(i.to_string());
            p.add(s);
            s = p;
        }
        assert!(s.check_bounds().is_err());
    }
}
