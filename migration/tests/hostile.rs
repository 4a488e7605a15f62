//! Corrupted, truncated, out-of-order, version-mismatched and semantically wrong messages are
//! rejected with clear errors; the destination never resumes a component on bad input, and the
//! source rolls back on a bad destination.

mod common;

use std::io::Write;
use std::thread::{self, JoinHandle};

use common::{Fake, COMPAT};
use vgpu_migration::protocol::{
    Hello, Message, MessageType, PageData, PageRecord, PAGE_SIZE, PAGE_SIZE_U32,
};
use vgpu_migration::transport::{
    frame_bytes, mem_pipe, FrameBuf, Framed, MemPipeConfig, MemStream, TransportError,
};
use vgpu_migration::{
    destination, encode, source, DestinationConfig, DestinationError, DestinationReport, Phase,
    ProtocolError, Snapshot, SourceConfig, SourceError, PROTOCOL_VERSION,
};

const PAGES: usize = 16;

/// Accepts the expected error.
type Check<E> = fn(&E) -> bool;

/// Page `i`'s fill byte in these tests.
fn fill_byte(i: usize) -> u8 {
    u8::try_from(i + 1).unwrap()
}

/// A hand-driven source talking to a real destination in a thread.
struct RawSource {
    link: Framed<MemStream>,
    frame: FrameBuf,
    dest: JoinHandle<(Result<DestinationReport, DestinationError>, Fake)>,
}

fn hello_msg() -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        page_size: PAGE_SIZE_U32,
        memory_size: (PAGES * PAGE_SIZE) as u64,
        state_size_hint: 0,
        compat: COMPAT.to_vec(),
    }
}

impl RawSource {
    fn start(config: DestinationConfig) -> Self {
        let (a, b) = mem_pipe(&MemPipeConfig::default());
        let dest = thread::spawn(move || {
            let mut dst = Fake::destination(PAGES);
            let r = destination::receive(&mut dst, b, config);
            (r, dst)
        });
        RawSource {
            link: Framed::new(a),
            frame: FrameBuf::new(),
            dest,
        }
    }

    /// Started and past a valid hello.
    fn started() -> Self {
        let mut s = Self::start(DestinationConfig::default());
        s.send(&Message::Hello(hello_msg()));
        assert_eq!(s.reply(), Message::HelloAck { version: 1 }.message_type());
        s
    }

    fn send(&mut self, m: &Message<'_>) {
        m.encode(&mut self.frame);
        self.link
            .send(m.message_type() as u16, &mut self.frame)
            .unwrap();
    }

    fn reply(&mut self) -> MessageType {
        let (ty, p) = self.link.recv().unwrap();
        Message::decode(ty, p).unwrap().message_type()
    }

    /// The destination's `Error` text (skipping other replies), or `None` if it closed without.
    /// Closes the source side, waits for the destination, checks it aborted without resuming.
    fn finish(self) -> (DestinationError, Option<String>) {
        let RawSource { mut link, dest, .. } = self;
        link.get_mut().close_write();
        let (r, dst) = dest.join().unwrap();
        let text = error_text(&mut link);
        assert_eq!(dst.aborted, 1, "destination must abort");
        assert_eq!(dst.resumes, 0, "destination must never resume");
        (r.expect_err("destination must fail"), text)
    }
}

/// The destination's `Error` text (skipping other replies), or `None` if it closed without.
fn error_text(link: &mut Framed<MemStream>) -> Option<String> {
    loop {
        let (ty, p) = link.recv().ok()?;
        if let Message::Error { reason } = Message::decode(ty, p).ok()? {
            return Some(reason.to_owned());
        }
    }
}

fn data_page(byte: u8) -> [u8; PAGE_SIZE] {
    [byte; PAGE_SIZE]
}

fn pages_msg(round: u32, idx: &[u64], page: &[u8; PAGE_SIZE]) -> Vec<PageRecord<'static>> {
    let leaked: &'static [u8] = Box::leak(Box::new(*page));
    idx.iter()
        .map(|&index| PageRecord {
            index,
            data: PageData::Bytes(leaked),
        })
        .chain(std::iter::once(PageRecord {
            index: u64::from(round) + 100,
            data: PageData::Zero,
        }))
        .take(idx.len())
        .collect()
}

#[test]
fn test_hostile_version_mismatch_answered_with_clear_error() {
    let mut s = RawSource::start(DestinationConfig::default());
    let mut h = hello_msg();
    h.version = 99;
    let mut f = FrameBuf::new();
    Message::Hello(h.clone()).encode(&mut f);
    // Encode with version 1 then patch, as a future source would write it.
    let mut payload = f.payload().to_vec();
    payload[8..12].copy_from_slice(&99u32.to_le_bytes());
    s.link
        .get_mut()
        .write_all(&frame_bytes(MessageType::Hello as u16, 0, &payload))
        .unwrap();
    let (e, text) = s.finish();
    assert!(matches!(
        e,
        DestinationError::Protocol {
            phase: Phase::Hello,
            source: ProtocolError::Version { found: 99 }
        }
    ));
    let text = text.expect("source told");
    assert!(text.contains("version 99 is not supported"), "{text}");
}

#[test]
fn test_hostile_bad_first_messages_rejected() {
    let cases: Vec<(Vec<u8>, Check<DestinationError>)> = vec![
        (
            frame_bytes(MessageType::Hello as u16, 0, b"NOTMAGIC\x01\0\0\0"),
            |e| {
                matches!(
                    e,
                    DestinationError::Protocol {
                        source: ProtocolError::BadMagic,
                        ..
                    }
                )
            },
        ),
        (
            {
                let mut f = FrameBuf::new();
                Message::RoundEnd { round: 1, pages: 0 }.encode(&mut f);
                frame_bytes(MessageType::RoundEnd as u16, 0, f.payload())
            },
            |e| {
                matches!(
                    e,
                    DestinationError::Protocol {
                        source: ProtocolError::Unexpected { .. },
                        ..
                    }
                )
            },
        ),
        (frame_bytes(77, 0, b""), |e| {
            matches!(
                e,
                DestinationError::Protocol {
                    source: ProtocolError::UnknownType(77),
                    ..
                }
            )
        }),
        (b"GET / HTTP/1.1\r\n\r\n".to_vec(), |e| {
            matches!(e, DestinationError::Transport { .. })
        }),
        (Vec::new(), |e| {
            matches!(
                e,
                DestinationError::Transport {
                    source: TransportError::Closed,
                    ..
                }
            )
        }),
    ];
    for (i, (bytes, ok)) in cases.into_iter().enumerate() {
        let mut s = RawSource::start(DestinationConfig::default());
        s.link.get_mut().write_all(&bytes).unwrap();
        let (e, _) = s.finish();
        assert!(ok(&e), "case {i}: {e:?}");
    }
}

#[test]
fn test_hostile_incompatible_hello_fields_rejected() {
    for patch in [
        (|h: &mut Hello| h.page_size = 8192) as fn(&mut Hello),
        |h| h.memory_size = 4097,
        |h| h.memory_size = (PAGES * PAGE_SIZE * 2) as u64,
        |h| h.compat = b"other gpu".to_vec(),
    ] {
        let mut s = RawSource::start(DestinationConfig::default());
        let mut h = hello_msg();
        patch(&mut h);
        s.send(&Message::Hello(h));
        let (e, text) = s.finish();
        assert!(matches!(e, DestinationError::Incompatible(_)), "{e:?}");
        assert!(text.unwrap().starts_with("Incompatible migration"));
    }
}

#[test]
fn test_hostile_frame_corruption_sequence_and_size_rejected() {
    let pages_payload = {
        let page = data_page(1);
        let mut f = FrameBuf::new();
        Message::Pages {
            round: 1,
            pages: pages_msg(1, &[0], &page),
        }
        .encode(&mut f);
        f.payload().to_vec()
    };
    let corrupt = {
        let mut b = frame_bytes(MessageType::Pages as u16, 1, &pages_payload);
        b[100] ^= 0x10;
        b
    };
    let oversized = {
        let mut b = frame_bytes(MessageType::Pages as u16, 1, b"");
        b[4..8].copy_from_slice(&(64u32 << 20).to_le_bytes());
        b
    };
    let truncated = frame_bytes(MessageType::Pages as u16, 1, &pages_payload)[..1000].to_vec();
    let cases: Vec<(Vec<u8>, Check<TransportError>, bool)> = vec![
        (
            corrupt,
            |e| matches!(e, TransportError::Checksum { .. }),
            true,
        ),
        (
            frame_bytes(MessageType::Pages as u16, 5, &pages_payload),
            |e| {
                matches!(
                    e,
                    TransportError::Sequence {
                        expected: 1,
                        found: 5
                    }
                )
            },
            true,
        ),
        (
            oversized,
            |e| matches!(e, TransportError::TooLarge(_)),
            true,
        ),
        (
            truncated,
            |e| matches!(e, TransportError::Truncated { .. }),
            false,
        ),
    ];
    for (i, (bytes, ok, told)) in cases.into_iter().enumerate() {
        let mut s = RawSource::started();
        s.link.get_mut().write_all(&bytes).unwrap();
        let (e, text) = s.finish();
        match &e {
            DestinationError::Transport { phase, source } => {
                assert_eq!(*phase, Phase::PreCopy { round: 1 });
                assert!(ok(source), "case {i}: {source:?}");
            }
            other => panic!("case {i}: {other:?}"),
        }
        assert_eq!(text.is_some(), told, "case {i}: {text:?}");
    }
}

/// Sends `msgs` after a valid hello and expects a `ProtocolError` of the kind `ok` accepts.
fn expect_protocol(msgs: &[Message<'_>], ok: fn(&ProtocolError) -> bool) -> String {
    let mut s = RawSource::started();
    for m in msgs {
        s.send(m);
    }
    let (e, text) = s.finish();
    match &e {
        DestinationError::Protocol { source, .. } => assert!(ok(source), "{msgs:?}: {source:?}"),
        other => panic!("{msgs:?}: {other:?}"),
    }
    text.expect("source told")
}

#[test]
fn test_hostile_semantic_violations_rejected() {
    let page = data_page(3);
    let p = |round, idx: &[u64]| Message::Pages {
        round,
        pages: pages_msg(round, idx, &page),
    };
    let invalid = |e: &ProtocolError| matches!(e, ProtocolError::Invalid(_));
    let unexpected = |e: &ProtocolError| matches!(e, ProtocolError::Unexpected { .. });
    let t = expect_protocol(&[p(1, &[PAGES as u64])], invalid);
    assert!(t.contains("beyond 16 pages"), "{t}");
    let t = expect_protocol(&[p(2, &[0])], invalid);
    assert!(t.contains("round 2 during round 1"), "{t}");
    let t = expect_protocol(
        &[p(1, &[0, 1]), Message::RoundEnd { round: 1, pages: 3 }],
        invalid,
    );
    assert!(t.contains("end of round 1 with 3 pages"), "{t}");
    expect_protocol(&[Message::RoundEnd { round: 2, pages: 0 }], invalid);
    let t = expect_protocol(
        &[Message::DeviceState {
            total: 1 << 40,
            offset: 0,
            data: b"x",
        }],
        invalid,
    );
    assert!(t.contains("exceeds the limit"), "{t}");
    expect_protocol(
        &[Message::DeviceState {
            total: 10,
            offset: 3,
            data: b"x",
        }],
        invalid,
    );
    expect_protocol(
        &[
            Message::DeviceState {
                total: 10,
                offset: 0,
                data: b"x",
            },
            Message::DeviceState {
                total: 11,
                offset: 1,
                data: b"x",
            },
        ],
        invalid,
    );
    expect_protocol(
        &[
            Message::DeviceState {
                total: 10,
                offset: 0,
                data: b"x",
            },
            Message::Complete { round: 1, pages: 0 },
        ],
        invalid,
    );
    expect_protocol(
        &[
            Message::DeviceState {
                total: 10,
                offset: 0,
                data: b"x",
            },
            p(1, &[0]),
        ],
        unexpected,
    );
    expect_protocol(&[Message::Commit], unexpected);
    expect_protocol(&[Message::Complete { round: 1, pages: 0 }], unexpected);
    expect_protocol(&[Message::Hello(hello_msg())], unexpected);
    expect_protocol(&[Message::Resumed], unexpected);
}

/// Sends the whole memory of `src_mem` in round 1, then `state` as device state.
fn send_all(s: &mut RawSource, pages: &[u64], state: &[u8]) {
    let mem: Vec<[u8; PAGE_SIZE]> = (0..PAGES).map(|i| data_page(fill_byte(i))).collect();
    let recs: Vec<PageRecord<'_>> = pages
        .iter()
        .map(|&i| PageRecord {
            index: i,
            data: PageData::Bytes(&mem[usize::try_from(i).unwrap()]),
        })
        .collect();
    s.send(&Message::Pages {
        round: 1,
        pages: recs,
    });
    s.send(&Message::RoundEnd {
        round: 1,
        pages: pages.len() as u64,
    });
    assert_eq!(s.reply(), MessageType::RoundAck);
    s.send(&Message::DeviceState {
        total: state.len() as u64,
        offset: 0,
        data: state,
    });
    s.send(&Message::Complete { round: 2, pages: 0 });
}

#[test]
fn test_hostile_corrupt_device_state_never_resumed() {
    let mut s = RawSource::started();
    let all: Vec<u64> = (0..PAGES as u64).collect();
    send_all(&mut s, &all, b"VGPUSNAP garbage that is not an envelope");
    let (e, text) = s.finish();
    assert!(matches!(e, DestinationError::State(_)), "{e:?}");
    assert!(text.unwrap().contains("Device state rejected"));
}

#[test]
fn test_hostile_missing_pages_fail_restore_and_commit_never_comes() {
    // A valid envelope whose memory hash needs every page: leave one page out.
    let mut src = Fake::destination(PAGES);
    {
        let mut g = src.lock();
        for (i, p) in g.mem.chunks_mut(PAGE_SIZE).enumerate() {
            p.fill(fill_byte(i));
        }
    }
    let state = encode(&vgpu_migration::Snapshottable::snapshot(&mut src).unwrap()).unwrap();
    let mut s = RawSource::started();
    let most: Vec<u64> = (0..PAGES as u64 - 1).collect();
    send_all(&mut s, &most, &state);
    let (e, _) = s.finish();
    assert!(
        matches!(
            e,
            DestinationError::Component {
                phase: Phase::Restore,
                ..
            }
        ),
        "{e:?}"
    );

    // With every page, the same state restores; an Abort instead of Commit still discards.
    let mut s = RawSource::started();
    let all: Vec<u64> = (0..PAGES as u64).collect();
    send_all(&mut s, &all, &state);
    assert_eq!(s.reply(), MessageType::Restored);
    s.send(&Message::Abort {
        reason: "owner changed its mind",
    });
    let (e, text) = s.finish();
    assert!(matches!(
        e,
        DestinationError::Aborted { phase: Phase::Commit, ref reason } if reason == "owner changed its mind"
    ));
    assert!(text.is_none(), "no Error answer to an Abort");
}

#[test]
fn test_hostile_snapshot_tree_of_wrong_component_rejected() {
    let state = encode(&Snapshot::with_state("fake", &"not a fake state").unwrap()).unwrap();
    let mut s = RawSource::started();
    let all: Vec<u64> = (0..PAGES as u64).collect();
    send_all(&mut s, &all, &state);
    let (e, _) = s.finish();
    assert!(
        matches!(
            e,
            DestinationError::Component {
                phase: Phase::Restore,
                ..
            }
        ),
        "{e:?}"
    );
}

/// A hand-driven destination: reads the hello, answers with `reply` bytes, then hangs up.
fn source_against(reply: Vec<u8>) -> (SourceError, Fake, Vec<u8>) {
    let (a, b) = mem_pipe(&MemPipeConfig::default());
    let t = thread::spawn(move || {
        let mut link = Framed::new(b);
        let _ = link.recv();
        link.get_mut().write_all(&reply).unwrap();
        // Drain what the source sends until it gives up, then hang up.
        link.get_mut().close_write();
        while link.recv().is_ok() {}
    });
    let mut src = Fake::source(PAGES, 8);
    let before = src.memory();
    let e = source::migrate(&mut src, a, &SourceConfig::default(), &mut |_| {}).unwrap_err();
    t.join().unwrap();
    (e, src, before)
}

#[test]
fn test_hostile_destination_replies_rejected_source_keeps_running() {
    let enc = |m: Message<'_>, seq| {
        let mut f = FrameBuf::new();
        m.encode(&mut f);
        frame_bytes(m.message_type() as u16, seq, f.payload())
    };
    let cases: Vec<(Vec<u8>, Check<SourceError>)> = vec![
        (enc(Message::HelloAck { version: 2 }, 0), |e| {
            matches!(
                e,
                SourceError::Protocol {
                    source: ProtocolError::Version { found: 2 },
                    ..
                }
            )
        }),
        (enc(Message::Resumed, 0), |e| {
            matches!(e, SourceError::Protocol { .. })
        }),
        (
            enc(
                Message::Pages {
                    round: 1,
                    pages: vec![PageRecord {
                        index: 0,
                        data: PageData::Zero,
                    }],
                },
                0,
            ),
            |e| {
                matches!(
                    e,
                    SourceError::Protocol {
                        source: ProtocolError::Unexpected { .. },
                        ..
                    }
                )
            },
        ),
        (frame_bytes(200, 0, b""), |e| {
            matches!(
                e,
                SourceError::Protocol {
                    source: ProtocolError::UnknownType(200),
                    ..
                }
            )
        }),
        (
            {
                let mut b = enc(Message::HelloAck { version: 1 }, 0);
                b[17] ^= 1;
                b
            },
            |e| {
                matches!(
                    e,
                    SourceError::Transport {
                        source: TransportError::Checksum { .. },
                        ..
                    }
                )
            },
        ),
        (
            enc(Message::HelloAck { version: 1 }, 0)[..10].to_vec(),
            |e| {
                matches!(
                    e,
                    SourceError::Transport {
                        source: TransportError::Truncated { .. },
                        ..
                    }
                )
            },
        ),
        (
            [
                enc(Message::HelloAck { version: 1 }, 0),
                enc(
                    Message::RoundAck {
                        round: 7,
                        pages: 16,
                    },
                    1,
                ),
            ]
            .concat(),
            |e| {
                matches!(
                    e,
                    SourceError::Protocol {
                        phase: Phase::PreCopy { round: 1 },
                        source: ProtocolError::Invalid(_)
                    }
                )
            },
        ),
        (
            enc(
                Message::Error {
                    reason: "disk on fire",
                },
                0,
            ),
            |e| matches!(e, SourceError::Destination { reason, .. } if reason == "disk on fire"),
        ),
    ];
    for (i, (reply, ok)) in cases.into_iter().enumerate() {
        let (e, src, before) = source_against(reply);
        assert!(ok(&e), "case {i}: {e:?}");
        assert!(!src.is_paused() && !src.is_logging(), "case {i}");
        assert!(src.memory() == before, "case {i}");
    }
}
