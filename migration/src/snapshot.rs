//! The snapshot tree: each component saves its state as serialized bytes under its id, with
//! children for sub-components (Cloud Hypervisor's `Snapshot` shape).

use std::collections::BTreeMap;

use serde::de::{DeserializeOwned, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::bytes::ByteBuf;

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
///
/// Deserializing checks [`MAX_DEPTH`] and [`MAX_CHILDREN`] while it descends, so a hostile
/// payload nesting nodes millions deep is rejected instead of overflowing the stack.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// Component id.
    pub id: String,
    /// The component's own state (postcard-encoded), if any. A byte string on the wire (the
    /// same postcard bytes as a sequence of `u8`, copied at once rather than byte by byte).
    #[serde(with = "crate::bytes::option")]
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
        Self::with_state_capacity(id, state, 0)
    }

    /// [`Snapshot::with_state`] serialized into a buffer of `capacity` bytes: a large state
    /// whose size is known (or bounded) is written without regrowing its buffer.
    pub fn with_state_capacity<T: Serialize>(
        id: impl Into<String>,
        state: &T,
        capacity: usize,
    ) -> Result<Self, SnapshotError> {
        let id = id.into();
        let bytes = postcard::to_io(state, Vec::with_capacity(capacity)).map_err(|source| {
            SnapshotError::Codec {
                id: id.clone(),
                source,
            }
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
        self.state_ref()
    }

    /// Decodes this node's state into a type that may borrow from it (e.g. `&[u8]` fields:
    /// large byte strings decoded without a copy).
    pub fn state_ref<'a, T: Deserialize<'a>>(&'a self) -> Result<T, SnapshotError> {
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

const FIELDS: &[&str] = &["id", "state", "children"];

impl<'de> Deserialize<'de> for Snapshot {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        NodeSeed { depth: 0 }.deserialize(d)
    }
}

/// Deserializes one node at `depth` (the root is 0).
#[derive(Clone, Copy)]
struct NodeSeed {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for NodeSeed {
    type Value = Snapshot;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Snapshot, D::Error> {
        if self.depth > MAX_DEPTH {
            return Err(serde::de::Error::custom("snapshot tree too deep"));
        }
        d.deserialize_struct("Snapshot", FIELDS, self)
    }
}

impl<'de> Visitor<'de> for NodeSeed {
    type Value = Snapshot;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a snapshot node")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Snapshot, A::Error> {
        let missing = |i| serde::de::Error::invalid_length(i, &"3 fields");
        let id = seq.next_element()?.ok_or_else(|| missing(0))?;
        let state: Option<ByteBuf> = seq.next_element()?.ok_or_else(|| missing(1))?;
        let children = seq
            .next_element_seed(ChildrenSeed(self.depth + 1))?
            .ok_or_else(|| missing(2))?;
        Ok(Snapshot {
            id,
            state: state.map(|b| b.0),
            children,
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Snapshot, A::Error> {
        let mut node = Snapshot::default();
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "id" => node.id = map.next_value()?,
                "state" => node.state = map.next_value::<Option<ByteBuf>>()?.map(|b| b.0),
                "children" => node.children = map.next_value_seed(ChildrenSeed(self.depth + 1))?,
                other => return Err(serde::de::Error::unknown_field(other, FIELDS)),
            }
        }
        Ok(node)
    }
}

/// Deserializes the children of a node; they sit at depth `.0`.
struct ChildrenSeed(usize);

impl<'de> DeserializeSeed<'de> for ChildrenSeed {
    type Value = BTreeMap<String, Snapshot>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ChildrenSeed {
    type Value = BTreeMap<String, Snapshot>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a map of snapshot nodes")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut children = BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            if children.len() == MAX_CHILDREN {
                return Err(serde::de::Error::custom(
                    "snapshot node has too many children",
                ));
            }
            let child = map.next_value_seed(NodeSeed { depth: self.0 })?;
            children.insert(key, child);
        }
        Ok(children)
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

    /// Payload bytes (postcard) of a chain of nodes `depth` deep: id "", no state, one child.
    fn chain(depth: usize) -> Vec<u8> {
        let mut p = Vec::with_capacity(depth * 4 + 3);
        for _ in 0..depth {
            p.extend_from_slice(&[0, 0, 1, 0]);
        }
        p.extend_from_slice(&[0, 0, 0]);
        p
    }

    #[test]
    fn test_snapshot_decode_million_levels_deep_rejected_without_stack_overflow() {
        // Before the bounded deserializer this aborted the process (stack overflow), e.g. a
        // vfio-user client's MIG_DATA_WRITE into a RESUMING vGPU killing vgpud.
        let r = postcard::from_bytes::<Snapshot>(&chain(1_000_000));
        assert!(r.is_err(), "a tree deeper than MAX_DEPTH decodes");
        let ok: Snapshot = postcard::from_bytes(&chain(MAX_DEPTH)).unwrap();
        assert!(ok.check_bounds().is_ok());
        assert!(postcard::from_bytes::<Snapshot>(&chain(MAX_DEPTH + 1)).is_err());
    }

    #[test]
    fn test_snapshot_decode_too_many_children_rejected() {
        let mut wide = Snapshot::new("root");
        for i in 0..=MAX_CHILDREN {
            wide.add(Snapshot::new(i.to_string()));
        }
        let bytes = postcard::to_stdvec(&wide).unwrap();
        assert!(postcard::from_bytes::<Snapshot>(&bytes).is_err());
        wide.children.pop_first();
        let bytes = postcard::to_stdvec(&wide).unwrap();
        assert_eq!(postcard::from_bytes::<Snapshot>(&bytes).unwrap(), wide);
    }

    /// `Snapshot` as it was encoded before its state became a byte string.
    #[derive(Serialize)]
    struct OldSnapshot {
        id: String,
        state: Option<Vec<u8>>,
        children: BTreeMap<String, OldSnapshot>,
    }

    fn old(s: &Snapshot) -> OldSnapshot {
        OldSnapshot {
            id: s.id.clone(),
            state: s.state.clone(),
            children: s
                .children
                .iter()
                .map(|(k, c)| (k.clone(), old(c)))
                .collect(),
        }
    }

    #[test]
    fn test_snapshot_state_bytes_decode_from_old_u8_sequence_encoding() {
        let mut root = Snapshot::new("vgpu");
        root.add(Snapshot::with_state("regs", &vec![1u32, 2, 300]).unwrap());
        let big: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        root.add(Snapshot::with_state("lmem", &crate::bytes::Bytes(&big)).unwrap());
        root.add(Snapshot::new("empty"));
        let old_bytes = postcard::to_stdvec(&old(&root)).unwrap();
        assert_eq!(postcard::to_stdvec(&root).unwrap(), old_bytes);
        assert_eq!(postcard::from_bytes::<Snapshot>(&old_bytes).unwrap(), root);
        // A node state written as a `Vec<u8>` sequence reads as a borrowed byte string.
        let lmem = root.child("lmem").unwrap();
        assert_eq!(lmem.state::<Vec<u8>>().unwrap(), big);
        assert_eq!(lmem.state_ref::<&[u8]>().unwrap(), &big[..]);
    }

    #[test]
    fn test_snapshot_json_roundtrip_with_bounded_deserializer() {
        let mut root = Snapshot::new("vgpu");
        root.add(Snapshot::with_state("regs", &vec![1u32, 2]).unwrap());
        let json = serde_json::to_string(&root).unwrap();
        assert_eq!(serde_json::from_str::<Snapshot>(&json).unwrap(), root);
    }
}
