//! End-to-end migrations of the fake component over an in-memory pipe, a unix socket pair and
//! TCP on 127.0.0.1, with a writer thread dirtying pages during pre-copy.

mod common;

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use common::{assert_identical, run_pair, Fake, Writer};
use vgpu_migration::transport::{mem_pipe, MemPipeConfig};
use vgpu_migration::{
    destination, source, DestinationConfig, DestinationError, Incoming, Phase, Progress,
    SourceConfig, SourceError, PROTOCOL_VERSION,
};

const PAGES: usize = 1024;

fn check_report(r: &vgpu_migration::MigrationReport) {
    assert_eq!(r.protocol_version, PROTOCOL_VERSION);
    assert_eq!(r.memory_bytes, (PAGES * 4096) as u64);
    assert_eq!(r.rounds.len(), r.precopy_rounds as usize + 1);
    assert_eq!(r.rounds[0].pages, PAGES as u64, "round 1 sends every page");
    assert!(r.downtime_us > 0 && r.downtime_us <= r.total_time_us);
    assert!(r.device_state_bytes > 0);
}

/// Migrates with a writer dirtying `rate` pages/s over a connected pair of streams.
fn migrate_with_writer<S>(a: S, b: S, rate: u64)
where
    S: std::io::Read + std::io::Write + Send + 'static,
{
    let mut src = Fake::source(PAGES, 42);
    let writer = Writer::start(src.shared.clone(), rate, 9);
    let cfg = SourceConfig::default();
    let (s, d, dst) = run_pair(&mut src, Fake::destination(PAGES), a, b, &cfg);
    drop(writer);
    let report = s.expect("source");
    let dreport = d.expect("destination");
    assert!(dreport.ack_delivered);
    assert_eq!(dreport.pages, report.pages_sent);
    assert_eq!(dreport.zero_pages, report.zero_pages_sent);
    assert_eq!(dreport.device_state_bytes, report.device_state_bytes);
    assert_eq!(dreport.bytes_received, report.bytes_sent);
    check_report(&report);
    assert_identical(&src, &dst);
    assert!(src.state().writes > 0, "the writer ran");
}

#[test]
fn test_migrate_mem_pipe_with_writer_identical() {
    let (a, b) = mem_pipe(&MemPipeConfig::default());
    migrate_with_writer(a, b, 2000);
}

#[test]
fn test_migrate_unix_socket_pair_with_writer_identical() {
    let (a, b) = UnixStream::pair().unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    }
    migrate_with_writer(a, b, 2000);
}

#[test]
fn test_migrate_tcp_loopback_with_writer_identical() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let a = TcpStream::connect(addr).unwrap();
    let (b, _) = listener.accept().unwrap();
    for s in [&a, &b] {
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    }
    migrate_with_writer(a, b, 2000);
}

#[test]
fn test_migrate_progress_callback_reports_monotonic_bytes_and_phases() {
    let (a, b) = mem_pipe(&MemPipeConfig::default());
    let mut src = Fake::source(PAGES, 1);
    let t = thread::spawn(move || {
        let mut dst = Fake::destination(PAGES);
        destination::receive(&mut dst, b, DestinationConfig::default()).map(|_| dst)
    });
    let cfg = SourceConfig {
        pages_per_message: 64,
        ..SourceConfig::default()
    };
    let mut samples: Vec<Progress> = Vec::new();
    let report = source::migrate(&mut src, a, &cfg, &mut |p| samples.push(p.clone())).unwrap();
    let dst = t.join().unwrap().unwrap();
    assert_identical(&src, &dst);
    assert!(
        samples.len() >= PAGES / 64,
        "one sample per message at least"
    );
    assert!(samples
        .windows(2)
        .all(|w| w[0].bytes_sent <= w[1].bytes_sent));
    let phases: Vec<Phase> = samples.iter().map(|p| p.phase).collect();
    for want in [
        Phase::Hello,
        Phase::PreCopy { round: 1 },
        Phase::StopAndCopy,
        Phase::DeviceState,
        Phase::Restore,
        Phase::Commit,
        Phase::Completed,
    ] {
        assert!(phases.contains(&want), "no progress in {want}");
    }
    let last = samples.last().unwrap();
    assert_eq!(last.bytes_sent, report.bytes_sent);
    assert!(last.predicted_downtime_us.is_some());
    // The report is what the API returns as JSON.
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["stop_reason"], "converged");
    assert!(json["rounds"][0]["pages"].as_u64() == Some(PAGES as u64));
    let p = serde_json::to_value(last).unwrap();
    assert_eq!(p["phase"]["phase"], "completed");
}

#[test]
fn test_destination_owner_reads_hello_then_rejects_source_resumes() {
    let (a, b) = mem_pipe(&MemPipeConfig::default());
    let t = thread::spawn(move || {
        let incoming = Incoming::accept(b, DestinationConfig::default()).unwrap();
        assert_eq!(incoming.hello().compat, common::COMPAT);
        assert_eq!(incoming.hello().memory_size, (PAGES * 4096) as u64);
        incoming.reject("no capacity for profile small")
    });
    let mut src = Fake::source(PAGES, 3);
    let before = src.memory();
    let e = source::migrate(&mut src, a, &SourceConfig::default(), &mut |_| {}).unwrap_err();
    assert!(matches!(t.join().unwrap(), DestinationError::Rejected(_)));
    match &e {
        SourceError::Destination { phase, reason } => {
            assert_eq!(*phase, Phase::Hello);
            assert!(reason.contains("no capacity"), "{reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(!src.is_paused() && !src.is_logging() && src.memory() == before);
}

#[test]
fn test_migrate_incompatible_destination_refuses_at_hello() {
    let (a, b) = mem_pipe(&MemPipeConfig::default());
    let mut dst = Fake::destination(PAGES);
    dst.compat = b"fake-gpu rev 2".to_vec();
    let mut src = Fake::source(PAGES, 3);
    let (s, d, dst) = run_pair(&mut src, dst, a, b, &SourceConfig::default());
    assert!(matches!(d, Err(DestinationError::Incompatible(_))));
    let e = s.unwrap_err();
    assert_eq!(e.phase(), Phase::Hello);
    assert!(
        e.to_string().contains("Incompatible migration"),
        "the source learns why: {e}"
    );
    assert_eq!(dst.aborted, 1);
    assert!(!src.is_paused() && !src.is_logging());
}

#[test]
fn test_migrate_memory_size_mismatch_refused() {
    let (a, b) = mem_pipe(&MemPipeConfig::default());
    let mut src = Fake::source(PAGES, 3);
    let (s, d, _) = run_pair(
        &mut src,
        Fake::destination(PAGES / 2),
        a,
        b,
        &SourceConfig::default(),
    );
    assert!(matches!(d, Err(DestinationError::Incompatible(_))));
    assert!(matches!(
        s,
        Err(SourceError::Destination {
            phase: Phase::Hello,
            ..
        })
    ));
}
