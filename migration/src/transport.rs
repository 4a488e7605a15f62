//! Message framing over any byte stream (`Read + Write`: TCP, unix sockets, the in-memory
//! [`mem_pipe`]).
//!
//! Every message is one frame, written with a single `write_all`:
//!
//! | bytes | field |
//! |---|---|
//! | 2 | message type (LE u16, see [`crate::protocol::MessageType`]) |
//! | 2 | flags, must be 0 |
//! | 4 | payload length (LE u32, at most [`MAX_PAYLOAD`]) |
//! | 4 | sequence number (LE u32, 0 for the first frame in each direction, then +1) |
//! | 4 | CRC-32 (IEEE) of the 12 header bytes before it and of the payload |
//! | n | payload |
//!
//! The receiver checks flags, length, sequence and checksum before anyone looks at the
//! payload, and never holds more than one payload of at most [`MAX_PAYLOAD`] bytes.

mod cut;
mod mem;

pub use cut::{CutStream, Shutdown};
pub use mem::{mem_pipe, MemPipeConfig, MemStream};

use std::io::{self, Read, Write};

/// Size of the frame header.
pub const HEADER_LEN: usize = 16;
/// Largest payload of one frame (8 MiB). Longer declared lengths are rejected before anything
/// is allocated.
pub const MAX_PAYLOAD: usize = 8 << 20;

/// Why a frame could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The stream failed.
    #[error("Connection I/O error")]
    Io(#[source] io::Error),
    /// The peer closed the connection between frames.
    #[error("Connection closed by peer")]
    Closed,
    /// The peer closed the connection inside a frame.
    #[error("Connection closed inside a frame ({got} of {expected} bytes)")]
    Truncated {
        /// Bytes the frame part needed.
        expected: usize,
        /// Bytes that arrived.
        got: usize,
    },
    /// The declared payload is longer than [`MAX_PAYLOAD`].
    #[error("Frame payload of {0} bytes exceeds the maximum of {MAX_PAYLOAD}")]
    TooLarge(u64),
    /// Reserved header bits are set.
    #[error("Frame header has unknown flags {0:#06x}")]
    Flags(u16),
    /// A frame was lost, repeated or reordered.
    #[error("Frame sequence number {found}, expected {expected}")]
    Sequence {
        /// The next number in this direction.
        expected: u32,
        /// The number in the frame.
        found: u32,
    },
    /// The frame was corrupted.
    #[error("Frame checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// CRC in the header.
        stored: u32,
        /// CRC of what arrived.
        computed: u32,
    },
}

/// A frame being built: header space followed by the payload. Encoders append to the payload;
/// [`Framed::send`] fills the header in place, so a frame is one contiguous write.
#[derive(Debug)]
pub struct FrameBuf {
    buf: Vec<u8>,
}

impl Default for FrameBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameBuf {
    /// An empty frame.
    pub fn new() -> Self {
        FrameBuf {
            buf: vec![0; HEADER_LEN],
        }
    }

    /// Empties the payload (keeps the allocation).
    pub fn clear(&mut self) {
        self.buf.truncate(HEADER_LEN);
    }

    /// The payload so far.
    pub fn payload(&self) -> &[u8] {
        &self.buf[HEADER_LEN..]
    }

    /// Payload length.
    pub fn payload_len(&self) -> usize {
        self.buf.len() - HEADER_LEN
    }

    /// Appends bytes.
    pub fn put(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Appends a byte.
    pub fn put_u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    /// Appends a LE u32.
    pub fn put_u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }

    /// Appends a LE u64.
    pub fn put_u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }

    /// Appends `n` zero bytes and returns them for filling in place.
    pub fn put_zeroed(&mut self, n: usize) -> &mut [u8] {
        let start = self.buf.len();
        self.buf.resize(start + n, 0);
        &mut self.buf[start..]
    }

    /// Cuts the payload back to `len` bytes (no-op if shorter).
    pub fn truncate_payload(&mut self, len: usize) {
        self.buf.truncate(HEADER_LEN + len);
    }

    /// Overwrites payload bytes at `offset` (which must lie inside the payload).
    pub fn patch(&mut self, offset: usize, bytes: &[u8]) {
        let start = HEADER_LEN + offset;
        if let Some(dst) = self.buf.get_mut(start..start + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }
}

/// Builds the header of a frame.
fn header(ty: u16, len: u32, seq: u32, payload: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..2].copy_from_slice(&ty.to_le_bytes());
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h[8..12].copy_from_slice(&seq.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[..12]);
    crc.update(payload);
    h[12..16].copy_from_slice(&crc.finalize().to_le_bytes());
    h
}

/// The bytes of one complete frame: for tests and tools that need to write frames by hand
/// (e.g. with a wrong sequence number). Payloads longer than [`MAX_PAYLOAD`] are cut.
pub fn frame_bytes(ty: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let payload = &payload[..payload.len().min(MAX_PAYLOAD)];
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut out = header(ty, len, seq, payload).to_vec();
    out.extend_from_slice(payload);
    out
}

/// A byte stream carrying frames, with per-direction sequence numbers and byte counters.
#[derive(Debug)]
pub struct Framed<S> {
    stream: S,
    send_seq: u32,
    recv_seq: u32,
    rbuf: Vec<u8>,
    bytes_sent: u64,
    bytes_received: u64,
}

impl<S: Read + Write> Framed<S> {
    /// Wraps a connected stream.
    pub fn new(stream: S) -> Self {
        Framed {
            stream,
            send_seq: 0,
            recv_seq: 0,
            rbuf: Vec::new(),
            bytes_sent: 0,
            bytes_received: 0,
        }
    }

    /// Sends `frame` as a message of type `ty` (one write, then flush).
    pub fn send(&mut self, ty: u16, frame: &mut FrameBuf) -> Result<(), TransportError> {
        let plen = frame.payload_len();
        if plen > MAX_PAYLOAD {
            return Err(TransportError::TooLarge(plen as u64));
        }
        let len = u32::try_from(plen).map_err(|_| TransportError::TooLarge(plen as u64))?;
        let h = header(ty, len, self.send_seq, frame.payload());
        frame.buf[..HEADER_LEN].copy_from_slice(&h);
        self.stream
            .write_all(&frame.buf)
            .and_then(|()| self.stream.flush())
            .map_err(TransportError::Io)?;
        self.send_seq = self.send_seq.wrapping_add(1);
        self.bytes_sent += frame.buf.len() as u64;
        Ok(())
    }

    /// Receives one frame: its type and payload, after checking flags, length, sequence number
    /// and checksum. The payload borrows an internal buffer until the next call.
    pub fn recv(&mut self) -> Result<(u16, &[u8]), TransportError> {
        let mut h = [0u8; HEADER_LEN];
        let got = read_full(&mut self.stream, &mut h)?;
        if got == 0 {
            return Err(TransportError::Closed);
        }
        if got < HEADER_LEN {
            return Err(TransportError::Truncated {
                expected: HEADER_LEN,
                got,
            });
        }
        let ty = u16::from_le_bytes([h[0], h[1]]);
        let flags = u16::from_le_bytes([h[2], h[3]]);
        let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let seq = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        let stored = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        if flags != 0 {
            return Err(TransportError::Flags(flags));
        }
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= MAX_PAYLOAD)
            .ok_or(TransportError::TooLarge(u64::from(len)))?;
        if seq != self.recv_seq {
            return Err(TransportError::Sequence {
                expected: self.recv_seq,
                found: seq,
            });
        }
        if self.rbuf.len() < len {
            self.rbuf.resize(len, 0);
        }
        let payload = &mut self.rbuf[..len];
        let got = read_full(&mut self.stream, payload)?;
        if got < len {
            return Err(TransportError::Truncated { expected: len, got });
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&h[..12]);
        crc.update(payload);
        let computed = crc.finalize();
        if computed != stored {
            return Err(TransportError::Checksum { stored, computed });
        }
        self.recv_seq = self.recv_seq.wrapping_add(1);
        self.bytes_received += (HEADER_LEN + len) as u64;
        Ok((ty, &self.rbuf[..len]))
    }

    /// Bytes written so far (headers included).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// Bytes of complete frames received so far.
    pub fn bytes_received(&self) -> u64 {
        self.bytes_received
    }

    /// The stream.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Gives the stream back.
    pub fn into_inner(self) -> S {
        self.stream
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, TransportError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(TransportError::Io(e)),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Framed<MemStream>, Framed<MemStream>) {
        let (a, b) = mem_pipe(&MemPipeConfig::default());
        (Framed::new(a), Framed::new(b))
    }

    #[test]
    fn test_frame_roundtrip_counts_bytes() {
        let (mut a, mut b) = pair();
        let mut f = FrameBuf::new();
        f.put_u32(7);
        f.put(b"abc");
        a.send(3, &mut f).unwrap();
        f.clear();
        a.send(4, &mut f).unwrap();
        let (ty, p) = b.recv().unwrap();
        assert_eq!((ty, p), (3, &[7, 0, 0, 0, b'a', b'b', b'c'][..]));
        let (ty, p) = b.recv().unwrap();
        assert_eq!((ty, p.len()), (4, 0));
        assert_eq!(a.bytes_sent(), 2 * HEADER_LEN as u64 + 7);
        assert_eq!(b.bytes_received(), a.bytes_sent());
    }

    #[test]
    fn test_frame_corrupt_truncated_oversized_and_reordered_rejected() {
        type Check = fn(&TransportError) -> bool;
        let good = frame_bytes(3, 0, b"payload");
        let cases: Vec<(Vec<u8>, Check)> = vec![
            (
                {
                    let mut b = good.clone();
                    b[HEADER_LEN + 2] ^= 0x40;
                    b
                },
                |e| matches!(e, TransportError::Checksum { .. }),
            ),
            (good[..good.len() - 1].to_vec(), |e| {
                matches!(
                    e,
                    TransportError::Truncated {
                        expected: 7,
                        got: 6
                    }
                )
            }),
            (good[..5].to_vec(), |e| {
                matches!(
                    e,
                    TransportError::Truncated {
                        expected: 16,
                        got: 5
                    }
                )
            }),
            (Vec::new(), |e| matches!(e, TransportError::Closed)),
            (frame_bytes(3, 1, b"x"), |e| {
                matches!(
                    e,
                    TransportError::Sequence {
                        expected: 0,
                        found: 1
                    }
                )
            }),
            (
                {
                    let mut b = good.clone();
                    b[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
                    b
                },
                |e| matches!(e, TransportError::TooLarge(0xffff_ffff)),
            ),
            (
                {
                    let mut b = good.clone();
                    b[2] = 1;
                    b
                },
                |e| matches!(e, TransportError::Flags(1)),
            ),
        ];
        for (i, (bytes, ok)) in cases.into_iter().enumerate() {
            let (mut a, mut b) = pair();
            a.get_mut().write_all(&bytes).unwrap();
            a.get_mut().close_write();
            let e = b.recv().unwrap_err();
            assert!(ok(&e), "case {i}: unexpected error {e:?}");
        }
    }
}
