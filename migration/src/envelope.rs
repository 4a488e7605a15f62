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
//!
//! Encoding sizes the payload first (postcard's size pass: byte strings count by their length),
//! then writes header, payload and checksum in one pass, computing the CRC on the way: into
//! one exactly sized buffer ([`encode`]) or straight into a writer ([`encode_to`], e.g. a
//! snapshot file, with no copy of the whole envelope in memory).

use std::io::Write;

use postcard::ser_flavors::Flavor;

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
    /// Writing the envelope failed.
    #[error("Writing the snapshot failed")]
    Io(#[source] std::io::Error),
}

/// Encodes a snapshot tree into an envelope.
pub fn encode(s: &Snapshot) -> Result<Vec<u8>, EnvelopeError> {
    let payload = payload_size(s)?;
    let mut out = Vec::with_capacity(HEADER + payload + 4);
    write_envelope(s, payload, &mut out)?;
    Ok(out)
}

/// Writes the envelope of `s` into `w` as it is encoded: the same bytes as [`encode`], without
/// holding them in memory. Small pieces are gathered into 64 KiB writes; large byte strings go
/// to `w` directly. Returns the bytes written. On error `w` holds a partial envelope.
pub fn encode_to<W: Write + ?Sized>(s: &Snapshot, w: &mut W) -> Result<u64, EnvelopeError> {
    let payload = payload_size(s)?;
    write_envelope(s, payload, w)
}

/// The payload's exact size (postcard's size pass: byte strings count by their length).
fn payload_size(s: &Snapshot) -> Result<usize, EnvelopeError> {
    postcard::serialize_with_flavor(s, postcard::ser_flavors::Size::default())
        .map_err(EnvelopeError::Payload)
}

fn write_envelope<W: Write + ?Sized>(
    s: &Snapshot,
    payload: usize,
    w: &mut W,
) -> Result<u64, EnvelopeError> {
    let mut sink = Sink {
        w,
        buf: Vec::with_capacity(SINK_BUF),
        crc: crc32fast::Hasher::new(),
        written: 0,
        err: None,
    };
    let mut header = [0u8; HEADER];
    header[..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[12..].copy_from_slice(&(payload as u64).to_le_bytes());
    sink.put(&header).map_err(EnvelopeError::Io)?;
    if let Err(e) = postcard::serialize_with_flavor::<Snapshot, _, ()>(s, &mut sink) {
        return Err(match sink.err.take() {
            Some(io) => EnvelopeError::Io(io),
            None => EnvelopeError::Payload(e),
        });
    }
    sink.flush().map_err(EnvelopeError::Io)?;
    let actual = sink.written - HEADER as u64;
    if actual != payload as u64 {
        // Cannot happen for an immutable tree; never write a header that lies.
        return Err(EnvelopeError::Length {
            declared: payload as u64,
            actual,
        });
    }
    let crc = sink.crc.clone().finalize();
    sink.w
        .write_all(&crc.to_le_bytes())
        .map_err(EnvelopeError::Io)?;
    Ok(sink.written + 4)
}

/// Gathering buffer of [`Sink`]; pieces at least this large bypass it.
const SINK_BUF: usize = 64 * 1024;

/// A postcard output that checksums and writes what it is given, in large pieces.
struct Sink<'a, W: ?Sized> {
    w: &'a mut W,
    buf: Vec<u8>,
    crc: crc32fast::Hasher,
    /// Bytes handed to `put` so far.
    written: u64,
    /// The write error behind a failed serialization (postcard's error cannot carry it).
    err: Option<std::io::Error>,
}

impl<W: Write + ?Sized> Sink<'_, W> {
    fn put(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.written += data.len() as u64;
        if self.buf.len() + data.len() <= SINK_BUF {
            self.buf.extend_from_slice(data);
            return Ok(());
        }
        self.flush()?;
        if data.len() < SINK_BUF {
            self.buf.extend_from_slice(data);
            return Ok(());
        }
        self.crc.update(data);
        self.w.write_all(data)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.crc.update(&self.buf);
        let r = self.w.write_all(&self.buf);
        self.buf.clear();
        r
    }

    fn fail(&mut self, r: std::io::Result<()>) -> postcard::Result<()> {
        r.map_err(|e| {
            self.err = Some(e);
            postcard::Error::SerializeBufferFull
        })
    }
}

impl<W: Write + ?Sized> Flavor for &mut Sink<'_, W> {
    type Output = ();

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        let r = self.put(&[data]);
        self.fail(r)
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        let r = self.put(data);
        self.fail(r)
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
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

    /// A tree with a large state (byte string) and small ones around it.
    fn large() -> Snapshot {
        let mut s = sample();
        let big: Vec<u8> = (0..300_000u32).map(|i| i.to_le_bytes()[0] ^ 0x5A).collect();
        s.add(Snapshot::with_state("lmem", &crate::bytes::Bytes(&big)).unwrap());
        s.add(Snapshot::with_state("small", &7u8).unwrap());
        s
    }

    #[test]
    fn test_envelope_encode_to_writer_same_bytes_as_encode() {
        for s in [Snapshot::new("empty"), sample(), large()] {
            let bytes = encode(&s).unwrap();
            let mut w = Vec::new();
            assert_eq!(encode_to(&s, &mut w).unwrap(), bytes.len() as u64);
            assert_eq!(w, bytes);
            assert_eq!(decode(&bytes).unwrap(), s);
        }
    }

    #[test]
    fn test_envelope_matches_old_encoding() {
        // The envelope as written before the single-pass encoder: payload, then header and CRC
        // around a copy of it.
        let s = large();
        let payload = postcard::to_stdvec(&s).unwrap();
        let mut old = Vec::new();
        old.extend_from_slice(&MAGIC);
        old.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        old.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        old.extend_from_slice(&payload);
        let crc = crc32fast::hash(&old);
        old.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(encode(&s).unwrap(), old);
    }

    #[test]
    fn test_envelope_encode_to_failing_writer_reports_io() {
        /// Accepts `left` bytes, then fails.
        struct Full {
            left: usize,
        }
        impl Write for Full {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                if self.left == 0 {
                    return Err(std::io::Error::other("disk full"));
                }
                let n = b.len().min(self.left);
                self.left -= n;
                Ok(n)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let s = large();
        let total = encode(&s).unwrap().len();
        for left in [0, 10, HEADER + 5, SINK_BUF, total - 4, total - 1] {
            let r = encode_to(&s, &mut Full { left });
            assert!(matches!(r, Err(EnvelopeError::Io(_))), "{left}: {r:?}");
        }
        assert!(encode_to(&s, &mut Full { left: total }).is_ok());
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
