//! Encoding and decoding of message payloads: the only place that knows their byte layout.

use super::{
    Hello, Message, MessageType, PageData, PageRecord, ProtocolError, HELLO_MAGIC, MAX_COMPAT_LEN,
    MAX_PAGES_PER_MESSAGE, MAX_REASON_LEN, MIN_PROTOCOL_VERSION, PAGE_SIZE, PROTOCOL_VERSION,
};
use crate::transport::FrameBuf;

const KIND_ZERO: u8 = 0;
const KIND_DATA: u8 = 1;

impl Message<'_> {
    /// Writes the payload into `out` (cleared first). Texts longer than [`MAX_REASON_LEN`]
    /// are cut; the sender is responsible for the other bounds.
    pub fn encode(&self, out: &mut FrameBuf) {
        out.clear();
        match self {
            Message::Hello(h) => {
                out.put(&HELLO_MAGIC);
                out.put_u32(h.version);
                out.put_u32(h.page_size);
                out.put_u64(h.memory_size);
                out.put_u64(h.state_size_hint);
                out.put_u32(u32::try_from(h.compat.len()).unwrap_or(u32::MAX));
                out.put(&h.compat);
            }
            Message::HelloAck { version } => out.put_u32(*version),
            Message::Pages { round, pages } => {
                out.put_u32(*round);
                out.put_u32(u32::try_from(pages.len()).unwrap_or(u32::MAX));
                for p in pages {
                    out.put_u64(p.index);
                    match p.data {
                        PageData::Zero => out.put_u8(KIND_ZERO),
                        PageData::Bytes(b) => {
                            out.put_u8(KIND_DATA);
                            out.put(b);
                        }
                    }
                }
            }
            Message::RoundEnd { round, pages }
            | Message::RoundAck { round, pages }
            | Message::Complete { round, pages } => {
                out.put_u32(*round);
                out.put_u64(*pages);
            }
            Message::DeviceState {
                total,
                offset,
                data,
            } => {
                out.put_u64(*total);
                out.put_u64(*offset);
                out.put(data);
            }
            Message::Restored | Message::Commit | Message::Resumed => {}
            Message::Abort { reason } | Message::Error { reason } => {
                out.put(truncate_utf8(reason, MAX_REASON_LEN).as_bytes());
            }
        }
    }
}

impl<'a> Message<'a> {
    /// Parses and validates the payload of a frame of type `ty`.
    pub fn decode(ty: u16, payload: &'a [u8]) -> Result<Self, ProtocolError> {
        let ty = MessageType::try_from(ty)?;
        let mut c = Cursor {
            ty,
            buf: payload,
            pos: 0,
        };
        let msg = match ty {
            MessageType::Hello => {
                if c.take(8)? != HELLO_MAGIC {
                    return Err(ProtocolError::BadMagic);
                }
                let version = c.u32()?;
                if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
                    return Err(ProtocolError::Version { found: version });
                }
                let page_size = c.u32()?;
                let memory_size = c.u64()?;
                let state_size_hint = c.u64()?;
                let len = c.len_u32(MAX_COMPAT_LEN, "compatibility record too long")?;
                Message::Hello(Hello {
                    version,
                    page_size,
                    memory_size,
                    state_size_hint,
                    compat: c.take(len)?.to_vec(),
                })
            }
            MessageType::HelloAck => Message::HelloAck { version: c.u32()? },
            MessageType::Pages => {
                let round = c.u32()?;
                let n = c.len_u32(MAX_PAGES_PER_MESSAGE, "too many pages")?;
                if n == 0 {
                    return Err(c.malformed("no pages"));
                }
                // Each record takes at least 9 bytes: never reserve more than the payload holds.
                let mut pages = Vec::with_capacity(n.min(c.remaining() / 9));
                for _ in 0..n {
                    let index = c.u64()?;
                    let data = match c.u8()? {
                        KIND_ZERO => PageData::Zero,
                        KIND_DATA => PageData::Bytes(c.take(PAGE_SIZE)?),
                        _ => return Err(c.malformed("unknown page kind")),
                    };
                    pages.push(PageRecord { index, data });
                }
                Message::Pages { round, pages }
            }
            MessageType::RoundEnd | MessageType::RoundAck | MessageType::Complete => {
                let round = c.u32()?;
                let pages = c.u64()?;
                match ty {
                    MessageType::RoundEnd => Message::RoundEnd { round, pages },
                    MessageType::RoundAck => Message::RoundAck { round, pages },
                    _ => Message::Complete { round, pages },
                }
            }
            MessageType::DeviceState => {
                let total = c.u64()?;
                let offset = c.u64()?;
                let data = c.rest();
                let end = offset.checked_add(data.len() as u64);
                if data.is_empty() || end.is_none_or(|e| e > total) {
                    return Err(c.malformed("chunk empty or beyond the total"));
                }
                Message::DeviceState {
                    total,
                    offset,
                    data,
                }
            }
            MessageType::Restored => Message::Restored,
            MessageType::Commit => Message::Commit,
            MessageType::Resumed => Message::Resumed,
            MessageType::Abort | MessageType::Error => {
                let text = c.rest();
                if text.len() > MAX_REASON_LEN {
                    return Err(c.malformed("reason too long"));
                }
                let reason =
                    std::str::from_utf8(text).map_err(|_| c.malformed("reason is not UTF-8"))?;
                if ty == MessageType::Abort {
                    Message::Abort { reason }
                } else {
                    Message::Error { reason }
                }
            }
        };
        c.finish()?;
        Ok(msg)
    }
}

/// Builds a `Pages` payload in place: each page is read straight into the frame and replaced by
/// a zero marker if it turns out all zero.
#[derive(Debug)]
pub struct PagesWriter {
    count: usize,
}

impl PagesWriter {
    /// Starts a `Pages` payload for `round` in `out`.
    pub fn begin(out: &mut FrameBuf, round: u32) -> Self {
        out.clear();
        out.put_u32(round);
        out.put_u32(0);
        PagesWriter { count: 0 }
    }

    /// Appends page `index`, letting `fill` write its [`PAGE_SIZE`] bytes. Returns whether the
    /// page was all zero (and so sent as a marker).
    pub fn push<E>(
        &mut self,
        out: &mut FrameBuf,
        index: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<bool, E> {
        out.put_u64(index);
        let kind_at = out.payload_len();
        out.put_u8(KIND_DATA);
        let data = out.put_zeroed(PAGE_SIZE);
        fill(data)?;
        let zero = is_zero(data);
        if zero {
            out.truncate_payload(kind_at);
            out.put_u8(KIND_ZERO);
        }
        self.count += 1;
        Ok(zero)
    }

    /// Pages appended so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Writes the page count into the payload.
    pub fn finish(self, out: &mut FrameBuf) {
        let n = u32::try_from(self.count).unwrap_or(u32::MAX);
        out.patch(4, &n.to_le_bytes());
    }
}

/// Whether a page is all zero (8 bytes at a time, stopping at the first non-zero word).
pub fn is_zero(page: &[u8]) -> bool {
    let mut words = page.chunks_exact(8);
    let zero_words = words
        .by_ref()
        .all(|w| u64::from_ne_bytes(w.try_into().unwrap_or([1; 8])) == 0);
    zero_words && words.remainder().iter().all(|&b| b == 0)
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Bounds-checked reading of a payload.
struct Cursor<'a> {
    ty: MessageType,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn malformed(&self, reason: &'static str) -> ProtocolError {
        ProtocolError::Malformed {
            ty: self.ty,
            reason,
        }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.remaining() < n {
            return Err(self.malformed("payload too short"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A u32 count or length, at most `max`.
    fn len_u32(&mut self, max: usize, what: &'static str) -> Result<usize, ProtocolError> {
        let v = self.u32()?;
        usize::try_from(v)
            .ok()
            .filter(|&v| v <= max)
            .ok_or_else(|| self.malformed(what))
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    fn finish(&self) -> Result<(), ProtocolError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(self.malformed("trailing bytes"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(m: &Message<'_>) {
        let mut f = FrameBuf::new();
        m.encode(&mut f);
        let ty = m.message_type() as u16;
        assert_eq!(&Message::decode(ty, f.payload()).unwrap(), m);
        if !f.payload().is_empty() {
            let short = &f.payload()[..f.payload_len() - 1];
            assert!(
                Message::decode(ty, short).is_err()
                    || matches!(
                        m,
                        Message::Abort { .. } | Message::Error { .. } | Message::DeviceState { .. }
                    ),
                "{m:?} accepted a truncated payload"
            );
        }
        let mut long = f.payload().to_vec();
        long.push(0);
        if !matches!(
            m,
            Message::Abort { .. } | Message::Error { .. } | Message::DeviceState { .. }
        ) {
            assert!(
                matches!(
                    Message::decode(ty, &long),
                    Err(ProtocolError::Malformed { .. })
                ),
                "{m:?} accepted trailing bytes"
            );
        }
    }

    #[test]
    fn test_protocol_every_message_roundtrips_and_rejects_bad_lengths() {
        let page = [7u8; PAGE_SIZE];
        let msgs = [
            Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                page_size: 4096,
                memory_size: 1 << 20,
                state_size_hint: 300,
                compat: b"profile=small".to_vec(),
            }),
            Message::HelloAck { version: 1 },
            Message::Pages {
                round: 2,
                pages: vec![
                    PageRecord {
                        index: 3,
                        data: PageData::Zero,
                    },
                    PageRecord {
                        index: 9,
                        data: PageData::Bytes(&page),
                    },
                ],
            },
            Message::RoundEnd { round: 1, pages: 5 },
            Message::RoundAck { round: 1, pages: 5 },
            Message::DeviceState {
                total: 10,
                offset: 4,
                data: b"abc",
            },
            Message::Complete { round: 4, pages: 0 },
            Message::Restored,
            Message::Commit,
            Message::Resumed,
            Message::Abort {
                reason: "cancelled",
            },
            Message::Error { reason: "nope ✗" },
        ];
        for m in &msgs {
            roundtrip(m);
        }
    }

    #[test]
    fn test_protocol_unknown_type_bad_magic_and_version_rejected() {
        assert!(matches!(
            Message::decode(0, &[]),
            Err(ProtocolError::UnknownType(0))
        ));
        assert!(matches!(
            Message::decode(99, &[]),
            Err(ProtocolError::UnknownType(99))
        ));
        let mut f = FrameBuf::new();
        Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            page_size: 4096,
            memory_size: 0,
            state_size_hint: 0,
            compat: vec![],
        })
        .encode(&mut f);
        let mut v2 = f.payload().to_vec();
        v2[8..12].copy_from_slice(&2u32.to_le_bytes());
        let e = Message::decode(1, &v2).unwrap_err();
        assert!(matches!(e, ProtocolError::Version { found: 2 }));
        assert!(e.to_string().contains("version 2 is not supported"));
        let mut bad = f.payload().to_vec();
        bad[0] = b'X';
        assert!(matches!(
            Message::decode(1, &bad),
            Err(ProtocolError::BadMagic)
        ));
    }

    #[test]
    fn test_protocol_pages_and_state_bounds_rejected() {
        let mut f = FrameBuf::new();
        f.put_u32(1);
        f.put_u32(u32::try_from(MAX_PAGES_PER_MESSAGE + 1).unwrap());
        assert!(Message::decode(3, f.payload()).is_err());
        f.clear();
        f.put_u32(1);
        f.put_u32(0);
        assert!(Message::decode(3, f.payload()).is_err(), "empty batch");
        f.clear();
        f.put_u32(1);
        f.put_u32(1);
        f.put_u64(0);
        f.put_u8(2);
        assert!(Message::decode(3, f.payload()).is_err(), "unknown kind");
        f.clear();
        f.put_u64(4);
        f.put_u64(2);
        f.put(b"abc");
        assert!(Message::decode(6, f.payload()).is_err(), "chunk past total");
        f.clear();
        f.put_u64(u64::MAX);
        f.put_u64(u64::MAX);
        f.put(b"a");
        assert!(Message::decode(6, f.payload()).is_err(), "offset overflow");
        assert!(Message::decode(12, &[0xff, 0xfe]).is_err(), "not UTF-8");
    }

    #[test]
    fn test_pages_writer_marks_zero_pages() {
        let mut f = FrameBuf::new();
        let mut w = PagesWriter::begin(&mut f, 3);
        assert!(w
            .push(&mut f, 5, |b: &mut [u8]| -> Result<(), ()> {
                b.fill(0);
                Ok(())
            })
            .unwrap());
        assert!(!w
            .push(&mut f, 6, |b: &mut [u8]| -> Result<(), ()> {
                b[PAGE_SIZE - 1] = 1;
                Ok(())
            })
            .unwrap());
        assert!(w.push(&mut f, 7, |_| Err("read failed")).is_err());
        let mut w2 = PagesWriter::begin(&mut f, 3);
        w2.push(&mut f, 5, |_: &mut [u8]| -> Result<(), ()> { Ok(()) })
            .unwrap();
        assert_eq!(w2.count(), 1);
        w2.finish(&mut f);
        assert_eq!(f.payload_len(), 4 + 4 + 9, "zero page costs 9 bytes");
        let Message::Pages { round, pages } = Message::decode(3, f.payload()).unwrap() else {
            panic!("not pages")
        };
        assert_eq!(round, 3);
        assert_eq!(
            pages,
            vec![PageRecord {
                index: 5,
                data: PageData::Zero
            }]
        );
    }

    #[test]
    fn test_truncate_utf8_respects_char_boundaries() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("abc", 10), "abc");
    }
}
