//! The versioned envelope around a snapshot tree, on disk and on the wire:
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `VGPUSNAP` |
//! | 4 | format version (LE u32) |
//! | 8 | payload length (LE u64) |
//! | n | payload: the postcard-encoded [`Snapshot`] tree |
//! | 4 | CRC-32 (IEEE) of everything before it (LE u32) |
//!
//! Decoding checks magic, version, exact length and checksum before parsing the payload, bounds
//! the tree's shape after, and never allocates more than the input's own size.

use crate::snapshot::{Snapshot, SnapshotError};

/// The magic bytes.
pub const MAGIC: [u8; 8] = *b"VGPUSNAP";
/// The format version this build writes and reads. Readers accept exactly this version; added
/// fields use `#[serde(default)]` within a version.
pub const FORMAT_VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 8;

/// Why an envelope was rejected.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// Shorter than header and checksum.
    #[error("Snapshot truncated: {0} bytes")]
    Truncated(usize),
    /// Not a vGPU snapshot.
    #[error("Not a vGPU snapshot (bad magic)")]
    BadMagic,
    /// Written by another format version.
    #[error("Snapshot format version {found}, this build reads version {FORMAT_VERSION}")]
    Version {
        /// The version in the file.
        found: u32,
    },
    /// The declared payload length does not match the data.
    #[error("Snapshot length mismatch: header says {declared} payload bytes, file has {actual}")]
    Length {
        /// Declared.
        declared: u64,
        /// Present.
        actual: u64,
    },
    /// Corrupted.
    #[error("Snapshot checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// Stored CRC.
        stored: u32,
        /// Computed CRC.
        computed: u32,
    },
    /// The payload does not decode into a snapshot tree.
    #[error("Snapshot payload does not decode")]
    Payload(#[source] postcard::Error),
    /// The tree is malformed.
    #[error(transparent)]
    Tree(#[from] SnapshotError),
}

/// Encodes a snapshot tree into an envelope.
pub fn encode(s: &Snapshot) -> Result<Vec<u8>, EnvelopeError> {
    let payload = postcard::to_stdvec(s).map_err(EnvelopeError::Payload)?;
    let mut out = Vec::with_capacity(HEADER + payload.len() + 4);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Decodes and validates an envelope.
pub fn decode(bytes: &[u8]) -> Result<Snapshot, EnvelopeError> {
    if bytes.len() < HEADER + 4 {
        return Err(EnvelopeError::Truncated(bytes.len()));
    }
    if bytes[..8] != MAGIC {
        return Err(EnvelopeError::BadMagic);
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != FORMAT_VERSION {
        return Err(EnvelopeError::Version { found: version });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[12..20]);
    let declared = u64::from_le_bytes(len);
    let actual = (bytes.len() - HEADER - 4) as u64;
    if declared != actual {
        return Err(EnvelopeError::Length { declared, actual });
    }
    let body = &bytes[..bytes.len() - 4];
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&bytes[bytes.len() - 4..]);
    let stored = u32::from_le_bytes(crc);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(EnvelopeError::Checksum { stored, computed });
    }
    let s: Snapshot = postcard::from_bytes(&body[HEADER..]).map_err(EnvelopeError::Payload)?;
    s.check_bounds()?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        let mut s = Snapshot::new("vgpu");
        s.add(Snapshot::with_state("regs", &(0..100u32).collect::<Vec<_>>()).unwrap());
        s
    }

    #[test]
    fn test_envelope_roundtrip() {
        let s = sample();
        assert_eq!(decode(&encode(&s).unwrap()).unwrap(), s);
    }

    #[test]
    fn test_envelope_rejects_corruption_truncation_and_version() {
        let bytes = encode(&sample()).unwrap();
        let mut bad = bytes.clone();
        bad[30] ^= 1;
        assert!(matches!(decode(&bad), Err(EnvelopeError::Checksum { .. })));
        assert!(matches!(
            decode(&bytes[..bytes.len() - 1]),
            Err(EnvelopeError::Length { .. })
        ));
        assert!(matches!(
            decode(&bytes[..10]),
            Err(EnvelopeError::Truncated(10))
        ));
        let mut v2 = bytes.clone();
        v2[8] = 2;
        assert!(matches!(
            decode(&v2),
            Err(EnvelopeError::Version { found: 2 })
        ));
        let mut m = bytes;
        m[0] = b'X';
        assert!(matches!(decode(&m), Err(EnvelopeError::BadMagic)));
    }

    proptest::proptest! {
        #[test]
        fn test_envelope_decode_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = decode(&data);
        }

        #[test]
        fn test_envelope_payload_garbage_with_valid_frame_rejected(payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC);
            out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            out.extend_from_slice(&payload);
            let crc = crc32fast::hash(&out);
            out.extend_from_slice(&crc.to_le_bytes());
            let _ = decode(&out);
        }
    }
}
