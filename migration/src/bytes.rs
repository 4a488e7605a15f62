//! Byte vectors through serde as byte strings, not as sequences of `u8`.
//!
//! serde hands a plain `Vec<u8>` to the serializer one element at a time; postcard then pushes
//! each byte separately (and deserializes each one through a visitor call). As a byte string
//! the same field is one length and one copy. For postcard both are the same bytes on the wire
//! (varint length, then the raw bytes: a `u8` is one raw byte), so data written either way
//! decodes either way — snapshots written before this change included. Self-describing formats
//! (JSON) write an array of numbers for both, and a sequence is accepted when reading.
//!
//! ```
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Page {
//!     index: u64,
//!     #[serde(with = "vgpu_migration::bytes")]
//!     data: Vec<u8>,
//! }
//! ```
//!
//! To decode without copying, deserialize a `&[u8]` borrowed from the input (postcard hands
//! out borrowed byte strings).

use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Serializes `v` as a byte string (`#[serde(with = "vgpu_migration::bytes")]`).
pub fn serialize<S: Serializer, T: AsRef<[u8]> + ?Sized>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(v.as_ref())
}

/// Deserializes a byte string, or a sequence of bytes from a self-describing format.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    d.deserialize_byte_buf(ByteBufVisitor)
}

/// The same for `Option<Vec<u8>>` (`#[serde(with = "vgpu_migration::bytes::option")]`).
pub mod option {
    use super::{ByteBuf, Bytes};
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes `Some` as a byte string.
    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&Bytes(b)),
            None => s.serialize_none(),
        }
    }

    /// Deserializes an optional byte string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Ok(Option::<ByteBuf>::deserialize(d)?.map(|b| b.0))
    }
}

/// A borrowed byte string, serialized as one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bytes<'a>(pub &'a [u8]);

impl Serialize for Bytes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// An owned byte string, (de)serialized as one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ByteBuf(pub Vec<u8>);

impl Serialize for ByteBuf {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for ByteBuf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize(d).map(ByteBuf)
    }
}

struct ByteBufVisitor;

impl<'de> Visitor<'de> for ByteBufVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(v)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        // The length hint is the input's claim: preallocate no more than a page for it.
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(b) = seq.next_element::<u8>()? {
            v.push(b);
        }
        Ok(v)
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // Test data: bytes cut from small counters on purpose.
mod tests {
    use super::*;

    /// The encoding before byte strings: `Vec<u8>` as a sequence.
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct OldPage {
        index: u64,
        data: Vec<u8>,
        more: Option<Vec<u8>>,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct NewPage {
        index: u64,
        #[serde(with = "crate::bytes")]
        data: Vec<u8>,
        #[serde(with = "crate::bytes::option")]
        more: Option<Vec<u8>>,
    }

    #[derive(Deserialize, Debug, PartialEq)]
    struct BorrowedPage<'a> {
        index: u64,
        data: &'a [u8],
        more: Option<&'a [u8]>,
    }

    fn samples() -> Vec<(OldPage, NewPage)> {
        [0usize, 1, 127, 128, 300, 4096, 70_000]
            .into_iter()
            .enumerate()
            .map(|(i, n)| {
                let data: Vec<u8> = (0..n).map(|j| (j * 7 + i) as u8).collect();
                let more = (i % 2 == 0).then(|| data.iter().rev().copied().collect::<Vec<_>>());
                (
                    OldPage {
                        index: i as u64 * 1000,
                        data: data.clone(),
                        more: more.clone(),
                    },
                    NewPage {
                        index: i as u64 * 1000,
                        data,
                        more,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn test_bytes_postcard_same_wire_format_as_u8_sequence() {
        for (old, new) in samples() {
            let old_bytes = postcard::to_stdvec(&old).unwrap();
            let new_bytes = postcard::to_stdvec(&new).unwrap();
            assert_eq!(old_bytes, new_bytes, "{} bytes", old.data.len());
            // Data written the old way decodes with the new type, and the other way round.
            let decoded: NewPage = postcard::from_bytes(&old_bytes).unwrap();
            assert_eq!(decoded, new);
            let decoded: OldPage = postcard::from_bytes(&new_bytes).unwrap();
            assert_eq!(decoded, old);
            let borrowed: BorrowedPage = postcard::from_bytes(&old_bytes).unwrap();
            assert_eq!(borrowed.data, &old.data[..]);
            assert_eq!(borrowed.more, old.more.as_deref());
        }
    }

    #[test]
    fn test_bytes_json_roundtrip_and_reads_arrays() {
        for (old, new) in samples().into_iter().take(4) {
            let json = serde_json::to_string(&new).unwrap();
            assert_eq!(json, serde_json::to_string(&old).unwrap());
            assert_eq!(serde_json::from_str::<NewPage>(&json).unwrap(), new);
        }
        assert!(
            serde_json::from_str::<NewPage>(r#"{"index":1,"data":[1,256],"more":null}"#).is_err()
        );
    }

    #[test]
    fn test_bytes_truncated_or_oversized_length_rejected() {
        let (_, new) = samples().pop().unwrap();
        let bytes = postcard::to_stdvec(&new).unwrap();
        for cut in [1, 3, 100, bytes.len() - 1] {
            assert!(postcard::from_bytes::<NewPage>(&bytes[..cut]).is_err());
        }
        // A length claiming 2^60 bytes is refused without allocating it.
        let mut huge = vec![0u8];
        let mut n = 1u64 << 60;
        while n >= 0x80 {
            huge.push((n as u8) | 0x80);
            n >>= 7;
        }
        huge.push(n as u8);
        assert!(postcard::from_bytes::<NewPage>(&huge).is_err());
    }
}
