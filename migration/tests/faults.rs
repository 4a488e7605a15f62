//! Failure handling: the connection cut at every message boundary and inside every message in
//! both directions, cancellation in every phase, and component failures at either end. After a
//! failure the source runs as before (unpaused, dirty log stopped, memory untouched) and the
//! destination has aborted without ever resuming — except when only the final `Resumed`
//! acknowledgement is lost, where the destination runs and the source stays paused.

mod common;

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::{assert_identical, assert_rolled_back, run_pair, Fail, Fake};
use vgpu_migration::protocol::MessageType;
use vgpu_migration::transport::{
    mem_pipe, CutStream, MemPipeConfig, MemStream, Shutdown, HEADER_LEN,
};
use vgpu_migration::{
    destination, source, CancelToken, DestinationConfig, DestinationError, DestinationReport,
    MigrationReport, Phase, SourceConfig, SourceError,
};

const PAGES: usize = 48;

/// Deterministic migration: 3 pre-copy rounds (the target cannot be met), scripted dirty
/// pages (page 3 is a zero page), several `Pages` messages per round.
fn scripted_source() -> Fake {
    let mut f = Fake::source(PAGES, 5);
    f.script = [vec![1, 2, 3, 40], vec![5], vec![7, 11]]
        .into_iter()
        .collect();
    f
}

fn scripted_config() -> SourceConfig {
    SourceConfig {
        downtime_target: Duration::ZERO,
        max_rounds: 3,
        pages_per_message: 8,
        ..SourceConfig::default()
    }
}

/// Records what passes through a stream's write side.
struct Tap<S> {
    inner: S,
    log: Arc<Mutex<Vec<u8>>>,
}

impl<S: Read> Read for Tap<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl<S: Write> Write for Tap<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.log.lock().unwrap().extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A frame in a recorded stream.
#[derive(Debug, Clone, Copy)]
struct FrameAt {
    start: u64,
    end: u64,
    ty: MessageType,
    round: Option<u32>,
}

fn parse_frames(bytes: &[u8]) -> Vec<FrameAt> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let h = &bytes[pos..pos + HEADER_LEN];
        let ty = MessageType::try_from(u16::from_le_bytes([h[0], h[1]])).unwrap();
        let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        let p = &bytes[pos + HEADER_LEN..pos + HEADER_LEN + len];
        let round = matches!(
            ty,
            MessageType::Pages | MessageType::RoundEnd | MessageType::RoundAck
        )
        .then(|| u32::from_le_bytes([p[0], p[1], p[2], p[3]]));
        let end = pos + HEADER_LEN + len;
        out.push(FrameAt {
            start: pos as u64,
            end: end as u64,
            ty,
            round,
        });
        pos = end;
    }
    out
}

/// The frames each side writes in the scripted migration, from a clean recorded run.
fn record_clean_run() -> (Vec<FrameAt>, Vec<FrameAt>) {
    let (a, b) = mem_pipe(&MemPipeConfig::default());
    let (la, lb) = (Arc::default(), Arc::default());
    let a = Tap {
        inner: a,
        log: Arc::clone(&la),
    };
    let b = Tap {
        inner: b,
        log: Arc::clone(&lb),
    };
    let mut src = scripted_source();
    let (s, d, dst) = run_pair(&mut src, Fake::destination(PAGES), a, b, &scripted_config());
    let report = s.unwrap();
    d.unwrap();
    assert_identical(&src, &dst);
    assert_eq!(report.precopy_rounds, 3);
    assert_eq!(
        report.rounds.iter().map(|r| r.pages).collect::<Vec<_>>(),
        [48, 4, 1, 2]
    );
    let src_frames = parse_frames(&la.lock().unwrap());
    let dst_frames = parse_frames(&lb.lock().unwrap());
    (src_frames, dst_frames)
}

/// Cut points for a frame: at its start, inside its header, at the payload, in the middle and
/// just before its end.
fn cut_points(f: &FrameAt) -> BTreeSet<u64> {
    let hl = HEADER_LEN as u64;
    [
        f.start,
        f.start + 1,
        f.start + hl - 1,
        f.start + hl,
        (f.start + f.end) / 2,
        f.end - 1,
    ]
    .into_iter()
    .filter(|&k| k >= f.start && k < f.end)
    .collect()
}

/// The source's phase while it writes (source frames) or waits for (destination frames) `f`.
fn phase_of(f: &FrameAt, last_round: u32) -> Phase {
    match f.ty {
        MessageType::Hello | MessageType::HelloAck => Phase::Hello,
        MessageType::Pages if f.round == Some(last_round + 1) => Phase::StopAndCopy,
        MessageType::Pages | MessageType::RoundEnd | MessageType::RoundAck => Phase::PreCopy {
            round: f.round.unwrap(),
        },
        MessageType::DeviceState | MessageType::Complete => Phase::DeviceState,
        MessageType::Restored => Phase::Restore,
        MessageType::Commit | MessageType::Resumed => Phase::Commit,
        other => panic!("unexpected {other:?} in a clean run"),
    }
}

#[test]
fn test_cut_source_side_at_every_message_rolls_back() {
    let (src_frames, dst_frames) = record_clean_run();
    let types: BTreeSet<u16> = src_frames
        .iter()
        .chain(&dst_frames)
        .map(|f| f.ty as u16)
        .collect();
    assert_eq!(
        types,
        (1..=10).collect(),
        "the clean run must contain every message type but Abort and Error"
    );
    let total = src_frames.last().unwrap().end;
    let mut runs = 0;
    for f in &src_frames {
        let expect_phase = phase_of(f, 3);
        for k in cut_points(f) {
            let (a, b) = mem_pipe(&MemPipeConfig::default());
            let mut src = scripted_source();
            let before = src.memory();
            let (s, d, dst) = run_pair(
                &mut src,
                Fake::destination(PAGES),
                CutStream::new(a, k),
                b,
                &scripted_config(),
            );
            let e = s.expect_err("cut source must fail");
            assert!(
                matches!(e, SourceError::Transport { .. }),
                "cut at {k} in {:?}: {e:?}",
                f.ty
            );
            assert_eq!(e.phase(), expect_phase, "cut at {k} in {:?}", f.ty);
            assert!(
                matches!(d, Err(DestinationError::Transport { .. })),
                "cut at {k}: destination {d:?}"
            );
            assert_rolled_back(&src, &before, &dst);
            runs += 1;
        }
    }
    eprintln!("source-side sweep: {runs} cut points");
    assert!(runs > 60, "{runs} cut points");
    // A budget of exactly the whole stream never cuts.
    let (a, b) = mem_pipe(&MemPipeConfig::default());
    let mut src = scripted_source();
    let (s, d, dst) = run_pair(
        &mut src,
        Fake::destination(PAGES),
        CutStream::new(a, total),
        b,
        &scripted_config(),
    );
    s.unwrap();
    d.unwrap();
    assert_identical(&src, &dst);
}

/// Both results, both components, and the source memory before the migration.
type Outcome = (
    Result<MigrationReport, SourceError>,
    Result<DestinationReport, DestinationError>,
    Fake,
    Fake,
    Vec<u8>,
);

/// Runs the scripted migration with the destination's writes cut after `k` bytes.
fn run_dest_cut<S>(a: S, b: S, k: u64) -> Outcome
where
    S: Read + Write + Shutdown + Send + 'static,
{
    let mut src = scripted_source();
    let before = src.memory();
    let (s, d, dst) = run_pair(
        &mut src,
        Fake::destination(PAGES),
        a,
        CutStream::new(b, k),
        &scripted_config(),
    );
    (s, d, src, dst, before)
}

fn check_dest_cut(f: &FrameAt, k: u64, out: Outcome) {
    let (s, d, src, dst, before) = out;
    let e = s.expect_err("cut destination must fail the source");
    if f.ty == MessageType::Resumed {
        // The destination runs; the source cannot know and must not run too.
        let report = d.expect("destination resumed");
        assert!(!report.ack_delivered);
        assert!(dst.resumes == 1 && dst.aborted == 0 && dst.restored);
        assert!(matches!(e, SourceError::Unconfirmed { .. }), "{e:?}");
        assert!(src.is_paused() && !src.is_logging() && src.resumes == 0);
        assert_eq!(src.memory(), dst.memory(), "the running copy is complete");
    } else {
        assert_eq!(e.phase(), phase_of(f, 3), "cut at {k} in {:?}: {e:?}", f.ty);
        assert!(
            matches!(e, SourceError::Transport { .. }),
            "cut at {k} in {:?}: {e:?}",
            f.ty
        );
        assert!(
            matches!(d, Err(DestinationError::Transport { .. })),
            "{d:?}"
        );
        assert_rolled_back(&src, &before, &dst);
    }
}

#[test]
fn test_cut_destination_side_at_every_message_rolls_back_or_stays_paused() {
    let (_, dst_frames) = record_clean_run();
    let kinds: Vec<MessageType> = dst_frames.iter().map(|f| f.ty).collect();
    assert_eq!(
        kinds,
        [
            MessageType::HelloAck,
            MessageType::RoundAck,
            MessageType::RoundAck,
            MessageType::RoundAck,
            MessageType::Restored,
            MessageType::Resumed
        ]
    );
    let mut runs = 0;
    for f in &dst_frames {
        for k in cut_points(f) {
            let (a, b) = mem_pipe(&MemPipeConfig::default());
            check_dest_cut(f, k, run_dest_cut(a, b, k));
            runs += 1;
        }
    }
    eprintln!("destination-side sweep: {runs} cut points");
}

#[test]
fn test_cut_over_unix_socket_both_sides_rolls_back() {
    let (src_frames, dst_frames) = record_clean_run();
    let pair = || {
        let (a, b) = UnixStream::pair().unwrap();
        for s in [&a, &b] {
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        }
        (a, b)
    };
    for f in &src_frames {
        let k = (f.start + f.end) / 2;
        let (a, b) = pair();
        let mut src = scripted_source();
        let before = src.memory();
        let (s, d, dst) = run_pair(
            &mut src,
            Fake::destination(PAGES),
            CutStream::new(a, k),
            b,
            &scripted_config(),
        );
        assert_eq!(s.unwrap_err().phase(), phase_of(f, 3));
        assert!(d.is_err());
        assert_rolled_back(&src, &before, &dst);
    }
    for f in &dst_frames {
        let k = (f.start + f.end) / 2;
        let (a, b) = pair();
        check_dest_cut(f, k, run_dest_cut(a, b, k));
    }
}

/// Runs the scripted migration, cancelling when the source reports `at`.
fn cancel_at(at: Phase) -> Outcome {
    let (a, b) = mem_pipe(&MemPipeConfig::default());
    let mut src = scripted_source();
    let before = src.memory();
    let cancel = CancelToken::new();
    let cfg = SourceConfig {
        cancel: cancel.clone(),
        ..scripted_config()
    };
    if at == Phase::Hello {
        cancel.cancel();
    }
    let t = thread::spawn(move || {
        let mut dst = Fake::destination(PAGES);
        let r = destination::receive(&mut dst, b, DestinationConfig::default());
        (r, dst)
    });
    let s = source::migrate(&mut src, a, &cfg, &mut |p| {
        if p.phase == at {
            cancel.cancel();
        }
    });
    let (d, dst) = t.join().unwrap();
    (s, d, src, dst, before)
}

#[test]
fn test_cancel_in_every_phase_rolls_back() {
    for at in [
        Phase::Hello,
        Phase::PreCopy { round: 1 },
        Phase::PreCopy { round: 2 },
        Phase::PreCopy { round: 3 },
        Phase::StopAndCopy,
        Phase::DeviceState,
        Phase::Restore,
        Phase::Commit,
    ] {
        let (s, d, src, dst, before) = cancel_at(at);
        let e = s.expect_err("cancelled");
        assert!(matches!(e, SourceError::Cancelled { .. }), "{at}: {e:?}");
        if at != Phase::Restore {
            assert_eq!(e.phase(), at, "cancelled in the phase it was requested");
        }
        match d {
            Err(DestinationError::Aborted { reason, .. }) => {
                assert!(reason.contains("cancelled"), "{reason}")
            }
            other => panic!("{at}: destination {other:?}"),
        }
        assert_rolled_back(&src, &before, &dst);
    }
}

#[test]
fn test_cancel_after_commit_is_ignored() {
    let (s, d, src, dst, _) = cancel_at(Phase::Completed);
    s.unwrap();
    d.unwrap();
    assert_identical(&src, &dst);
}

#[test]
fn test_destination_cancel_refuses_and_source_rolls_back() {
    let (a, b) = mem_pipe(&MemPipeConfig::default());
    let mut src = scripted_source();
    let before = src.memory();
    let cancel = CancelToken::new();
    cancel.cancel();
    let t = thread::spawn(move || {
        let mut dst = Fake::destination(PAGES);
        let cfg = DestinationConfig {
            cancel,
            ..DestinationConfig::default()
        };
        let r = destination::receive(&mut dst, b, cfg);
        (r, dst)
    });
    let s = source::migrate(&mut src, a, &scripted_config(), &mut |_| {});
    let (d, dst) = t.join().unwrap();
    assert!(matches!(d, Err(DestinationError::Cancelled { .. })));
    let e = s.unwrap_err();
    assert!(e.to_string().contains("cancelled"), "{e}");
    assert_rolled_back(&src, &before, &dst);
}

#[test]
fn test_source_component_failures_roll_back_with_phase() {
    for (fail, phase) in [
        (Fail::Compat, Phase::Hello),
        (Fail::DirtyPages, Phase::PreCopy { round: 1 }),
        (Fail::ReadPage(9), Phase::PreCopy { round: 1 }),
        (Fail::Pause, Phase::StopAndCopy),
        (Fail::Snapshot, Phase::DeviceState),
    ] {
        let (a, b) = mem_pipe(&MemPipeConfig::default());
        let mut src = scripted_source();
        src.fail = fail;
        let before = src.memory();
        let (s, d, dst) = run_pair(&mut src, Fake::destination(PAGES), a, b, &scripted_config());
        let e = s.unwrap_err();
        assert!(
            matches!(e, SourceError::Component { .. }),
            "{fail:?}: {e:?}"
        );
        assert_eq!(e.phase(), phase, "{fail:?}");
        assert!(
            matches!(d, Err(DestinationError::Aborted { .. })),
            "{fail:?}: {d:?}"
        );
        assert_rolled_back(&src, &before, &dst);
    }
}

#[test]
fn test_destination_component_failures_roll_back_source() {
    for (fail, phase) in [
        (Fail::AcceptCompat, Phase::Hello),
        (Fail::WritePage(17), Phase::PreCopy { round: 1 }),
        (Fail::WriteZeroPage, Phase::PreCopy { round: 1 }),
        (Fail::Restore, Phase::Restore),
        (Fail::Resume, Phase::Commit),
    ] {
        let (a, b) = mem_pipe(&MemPipeConfig::default());
        let mut src = scripted_source();
        let before = src.memory();
        let mut dst = Fake::destination(PAGES);
        dst.fail = fail;
        let (s, d, dst) = run_pair(&mut src, dst, a, b, &scripted_config());
        assert!(d.is_err());
        match s.unwrap_err() {
            SourceError::Destination { phase: p, reason } => {
                assert_eq!(p, phase, "{fail:?}");
                assert!(reason.contains("injected failure"), "{fail:?}: {reason}");
            }
            other => panic!("{fail:?}: {other:?}"),
        }
        assert_rolled_back(&src, &before, &dst);
    }
}

#[test]
fn test_source_resume_failure_is_reported_with_the_cause() {
    let (a, b) = mem_pipe(&MemPipeConfig::default());
    let mut src = scripted_source();
    src.fail = Fail::Resume;
    let mut dst = Fake::destination(PAGES);
    dst.fail = Fail::Restore;
    let (s, d, dst) = run_pair(&mut src, dst, a, b, &scripted_config());
    assert!(d.is_err() && dst.aborted == 1);
    let e = s.unwrap_err();
    match &e {
        SourceError::Resume { error, .. } => {
            assert!(matches!(
                **error,
                SourceError::Destination {
                    phase: Phase::Restore,
                    ..
                }
            ))
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("Resuming the source failed"));
    assert!(src.is_paused() && !src.is_logging());
}

/// The pipe type the sweeps use implements `Shutdown`.
#[allow(dead_code)]
fn _assert_shutdown(s: MemStream) -> impl Shutdown {
    s
}
