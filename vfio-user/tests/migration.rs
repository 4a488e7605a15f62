//! Migration v2 over `DEVICE_FEATURE`, the migration data stream and DMA logging, on a raw
//! socket.

#![allow(clippy::cast_possible_truncation)] // Test arithmetic on small known values.

mod common;

use common::*;
use vfio_bindings::bindings::vfio::*;
use vgpu_vfio_user::{MigState, ServerConfig};

const GET: u32 = VFIO_DEVICE_FEATURE_GET;
const SET: u32 = VFIO_DEVICE_FEATURE_SET;
const PROBE: u32 = VFIO_DEVICE_FEATURE_PROBE;

fn feature(argsz: u32, flags: u32, data: &[u8]) -> Vec<u8> {
    B::new().u32(argsz).u32(flags).bytes(data).done()
}

fn get_state(r: &mut Raw) -> u32 {
    let reply = r.cmd(
        FEATURE,
        &feature(16, GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, &[]),
    );
    assert!(!reply.is_error(), "{reply:?}");
    assert_eq!(u32_at(&reply.payload, 0), 16);
    u32_at(&reply.payload, 8)
}

fn set_state(r: &mut Raw, state: u32) -> Msg {
    r.cmd(
        FEATURE,
        &feature(
            16,
            SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            &B::new().u32(state).u32(0).done(),
        ),
    )
}

fn transitions(fx: &Fixture) -> Vec<(MigState, MigState)> {
    fx.calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Transition(a, b) => Some((a, b)),
            _ => None,
        })
        .collect()
}

#[test]
fn test_feature_migration_get_and_probe() {
    let fx = Fixture::new();
    let mut r = fx.raw();
    let reply = r.cmd(
        FEATURE,
        &feature(16, GET | VFIO_DEVICE_FEATURE_MIGRATION, &[]),
    );
    assert!(!reply.is_error());
    assert_eq!(reply.payload.len(), 16);
    assert_eq!(u32_at(&reply.payload, 0), 16, "argsz covers the data");
    assert_eq!(
        u64_at(&reply.payload, 8),
        u64::from(VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY)
    );
    // argsz too small for the data.
    r.expect_errno(
        FEATURE,
        &feature(8, GET | VFIO_DEVICE_FEATURE_MIGRATION, &[]),
        &[],
        libc::EINVAL,
    );
    // Probing echoes the request; unsupported methods fail.
    let probe = feature(8, PROBE | GET | VFIO_DEVICE_FEATURE_MIGRATION, &[]);
    assert_eq!(r.cmd(FEATURE, &probe).payload, probe);
    let probe = feature(
        8,
        PROBE | GET | SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
        &[],
    );
    assert!(!r.cmd(FEATURE, &probe).is_error());
    r.expect_errno(
        FEATURE,
        &feature(8, PROBE | SET | VFIO_DEVICE_FEATURE_MIGRATION, &[]),
        &[],
        libc::ENOTSUP,
    );
    assert!(!r
        .cmd(
            FEATURE,
            &feature(8, PROBE | SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START, &[])
        )
        .is_error());
    r.expect_errno(FEATURE, &feature(8, PROBE | 3, &[]), &[], libc::ENOTSUP);
    // GET and SET together, neither, unknown flag bits, unknown feature.
    for flags in [
        GET | SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
        VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
        GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE | (1 << 20),
        SET | VFIO_DEVICE_FEATURE_MIGRATION,
    ] {
        r.expect_errno(FEATURE, &feature(16, flags, &[0; 8]), &[], libc::EINVAL);
    }
    r.expect_errno(FEATURE, &feature(16, GET | 42, &[]), &[], libc::ENOTSUP);
    r.expect_errno(FEATURE, &[0u8; 4], &[], libc::EINVAL);
}

#[test]
fn test_feature_without_migration_not_supported() {
    let mut backend = TestBackend::new();
    backend.migration_flags = 0;
    backend.logging_supported = false;
    let fx = Fixture::with(backend, ServerConfig::default());
    let mut r = fx.raw();
    for f in [
        GET | VFIO_DEVICE_FEATURE_MIGRATION,
        GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
        PROBE | SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
        GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
    ] {
        r.expect_errno(FEATURE, &feature(64, f, &[0; 24]), &[], libc::ENOTSUP);
    }
}

#[test]
fn test_state_transitions_direct_and_multi_step() {
    let fx = Fixture::new();
    let mut r = fx.raw();
    use MigState::*;
    assert_eq!(get_state(&mut r), 2, "starts RUNNING");
    // RUNNING -> STOP_COPY walks through STOP.
    let req = B::new().u32(3).u32(0).done();
    let reply = set_state(&mut r, 3);
    assert!(!reply.is_error());
    assert_eq!(&reply.payload[8..], &req[..], "SET echoes the request");
    assert_eq!(get_state(&mut r), 3);
    assert_eq!(transitions(&fx), vec![(Running, Stop), (Stop, StopCopy)]);
    // STOP_COPY -> PRE_COPY is forbidden; so are ERROR, the P2P states and unknown ones.
    for bad in [6, 0, 5, 7, 99] {
        assert_eq!(
            set_state(&mut r, bad).error,
            libc::EINVAL as u32,
            "state {bad}"
        );
    }
    assert_eq!(get_state(&mut r), 3, "a refused request changes nothing");
    fx.clear_calls();
    // STOP_COPY -> RESUMING: STOP, RESUMING.
    assert!(!set_state(&mut r, 4).is_error());
    assert_eq!(transitions(&fx), vec![(StopCopy, Stop), (Stop, Resuming)]);
    fx.clear_calls();
    // RESUMING -> PRE_COPY: STOP, RUNNING, PRE_COPY.
    assert!(!set_state(&mut r, 6).is_error());
    assert_eq!(
        transitions(&fx),
        vec![(Resuming, Stop), (Stop, Running), (Running, PreCopy)]
    );
    fx.clear_calls();
    // PRE_COPY -> STOP avoids STOP_COPY: RUNNING, STOP.
    assert!(!set_state(&mut r, 1).is_error());
    assert_eq!(transitions(&fx), vec![(PreCopy, Running), (Running, Stop)]);
    fx.clear_calls();
    // Same state: nothing to do.
    assert!(!set_state(&mut r, 1).is_error());
    assert!(transitions(&fx).is_empty());
    // Truncated SET data.
    r.expect_errno(
        FEATURE,
        &feature(16, SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, &[1, 0]),
        &[],
        libc::EINVAL,
    );
}

#[test]
fn test_state_without_pre_copy_refuses_it() {
    let mut backend = TestBackend::new();
    backend.migration_flags = u64::from(VFIO_MIGRATION_STOP_COPY);
    let fx = Fixture::with(backend, ServerConfig::default());
    let mut r = fx.raw();
    assert_eq!(set_state(&mut r, 6).error, libc::EINVAL as u32);
    assert!(!set_state(&mut r, 3).is_error());
}

#[test]
fn test_failing_arc_enters_error_until_reset() {
    let mut backend = TestBackend::new();
    backend.fail_arcs = vec![(MigState::Stop, MigState::StopCopy)];
    let fx = Fixture::with(backend, ServerConfig::default());
    let mut r = fx.raw();
    let reply = set_state(&mut r, 3);
    assert!(reply.is_error());
    assert_eq!(reply.error, libc::EIO as u32);
    assert_eq!(get_state(&mut r), 0, "ERROR");
    // Nothing but reset leaves ERROR.
    assert!(set_state(&mut r, 2).is_error());
    assert!(!r.cmd(RESET, &[]).is_error());
    assert_eq!(get_state(&mut r), 2);
}

#[test]
fn test_mig_data_only_in_right_states() {
    let fx = Fixture::new();
    let mut r = fx.raw();
    let read =
        |r: &mut Raw, size: u32| r.cmd(MIG_DATA_READ, &B::new().u32(8 + size).u32(size).done());
    // RUNNING: neither direction.
    assert_eq!(read(&mut r, 16).error, libc::EINVAL as u32);
    r.expect_errno(
        MIG_DATA_WRITE,
        &B::new().u32(8).u32(3).bytes(&[1, 2, 3]).done(),
        &[],
        libc::EINVAL,
    );
    // PRE_COPY reads; a short read ends the stream.
    assert!(!set_state(&mut r, 6).is_error());
    let first = read(&mut r, 64);
    assert_eq!(u32_at(&first.payload, 0), 8 + 64);
    assert_eq!(u32_at(&first.payload, 4), 64);
    assert_eq!(
        &first.payload[8..],
        (0..64u8).collect::<Vec<_>>().as_slice()
    );
    assert!(!set_state(&mut r, 3).is_error());
    let rest = read(&mut r, 64);
    assert_eq!(u32_at(&rest.payload, 4), 36);
    assert_eq!(rest.payload.len(), 8 + 36);
    // argsz smaller than the data asked for; size beyond max_data_xfer_size.
    r.expect_errno(
        MIG_DATA_READ,
        &B::new().u32(8).u32(16).done(),
        &[],
        libc::EINVAL,
    );
    r.expect_errno(
        MIG_DATA_READ,
        &B::new().u32(u32::MAX).u32((1 << 20) + 1).done(),
        &[],
        libc::EINVAL,
    );
    // Writes only while RESUMING, with the payload matching `size`.
    r.expect_errno(
        MIG_DATA_WRITE,
        &B::new().u32(8).u32(3).bytes(&[1, 2, 3]).done(),
        &[],
        libc::EINVAL,
    );
    assert!(!set_state(&mut r, 4).is_error());
    r.expect_errno(
        MIG_DATA_READ,
        &B::new().u32(72).u32(64).done(),
        &[],
        libc::EINVAL,
    );
    let ok = r.cmd(
        MIG_DATA_WRITE,
        &B::new().u32(8).u32(3).bytes(&[1, 2, 3]).done(),
    );
    assert!(!ok.is_error());
    assert_eq!(ok.size, 16, "no reply payload");
    r.expect_errno(
        MIG_DATA_WRITE,
        &B::new().u32(8).u32(4).bytes(&[1, 2, 3]).done(),
        &[],
        libc::EINVAL,
    );
    assert_eq!(fx.backend().mig_in, vec![1, 2, 3]);
}

fn logging_start(page_size: u64, ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut data = B::new().u64(page_size).u32(ranges.len() as u32).u32(0);
    for &(iova, len) in ranges {
        data = data.u64(iova).u64(len);
    }
    feature(8, SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START, &data.done())
}

fn logging_report(argsz: u32, iova: u64, length: u64, page_size: u64) -> Vec<u8> {
    feature(
        argsz,
        GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
        &B::new().u64(iova).u64(length).u64(page_size).done(),
    )
}

#[test]
fn test_dma_logging_start_report_stop() {
    let fx = Fixture::new();
    let mut r = fx.raw();
    // Report before start.
    r.expect_errno(
        FEATURE,
        &logging_report(64, 0x10_0000, 0x1_0000, 4096),
        &[],
        libc::EINVAL,
    );
    // Invalid starts: page sizes, unaligned, empty, overflowing and overlapping ranges, a
    // range count the payload does not carry.
    for bad in [
        logging_start(1000, &[(0x10_0000, 0x1_0000)]),
        logging_start(2048, &[(0x10_0000, 0x1_0000)]),
        logging_start(0, &[]),
        logging_start(4096, &[(0x10_0800, 0x1_0000)]),
        logging_start(4096, &[(0x10_0000, 0)]),
        logging_start(4096, &[(!0xfff, 0x2000)]),
        logging_start(4096, &[(0x10_0000, 0x1_0000), (0x10_f000, 0x1000)]),
        {
            let mut p = logging_start(4096, &[(0x10_0000, 0x1_0000)]);
            p[16..20].copy_from_slice(&5u32.to_ne_bytes());
            p
        },
    ] {
        r.expect_errno(FEATURE, &bad, &[], libc::EINVAL);
    }
    assert!(fx.calls().is_empty());
    // Start: ranges reach the backend sorted.
    let start = logging_start(4096, &[(0x20_0000, 0x2000), (0x10_0000, 0x1_0000)]);
    let reply = r.cmd(FEATURE, &start);
    assert!(!reply.is_error());
    assert_eq!(reply.payload, start);
    assert_eq!(
        fx.calls(),
        vec![Call::LogStart(
            4096,
            vec![(0x10_0000, 0x1_0000), (0x20_0000, 0x2000)]
        )]
    );
    r.expect_errno(FEATURE, &start, &[], libc::EBUSY);

    // 16 pages at 4 KiB: one u64 word; pages 0, 3 and 15 dirty.
    fx.backend().dirty = vec![0x10_0000, 0x10_3000, 0x10_f000];
    let reply = r.cmd(
        FEATURE,
        &logging_report(8 + 24 + 8, 0x10_0000, 0x1_0000, 4096),
    );
    assert!(!reply.is_error(), "{reply:?}");
    let p = &reply.payload;
    assert_eq!(p.len(), 8 + 24 + 8);
    assert_eq!(u32_at(p, 0), 8 + 24 + 8);
    assert_eq!(u64_at(p, 8), 0x10_0000);
    assert_eq!(u64_at(p, 16), 0x1_0000);
    assert_eq!(u64_at(p, 24), 4096);
    // Bit 63 set by the backend lies past the 16 pages: cleared.
    assert_eq!(u64_at(p, 32), (1 << 0) | (1 << 3) | (1 << 15));
    // 65 pages of 8 KiB: two words; page 64 is bit 0 of word 1.
    fx.backend().dirty = vec![0x10_0000 + 64 * 8192];
    let reply = r.cmd(FEATURE, &logging_report(64, 0x10_0000, 65 * 8192, 8192));
    let p = &reply.payload;
    assert_eq!(p.len(), 8 + 24 + 16);
    assert_eq!(u64_at(p, 32), 0);
    assert_eq!(u64_at(p, 40), 1);
    // argsz without room for the bitmap; bad page size; empty; bitmap over the limit.
    r.expect_errno(
        FEATURE,
        &logging_report(32, 0x10_0000, 0x1_0000, 4096),
        &[],
        libc::EINVAL,
    );
    r.expect_errno(
        FEATURE,
        &logging_report(64, 0x10_0000, 0x1_0000, 3000),
        &[],
        libc::EINVAL,
    );
    r.expect_errno(
        FEATURE,
        &logging_report(64, 0x10_0000, 0, 4096),
        &[],
        libc::EINVAL,
    );
    r.expect_errno(
        FEATURE,
        &logging_report(u32::MAX, 0, 1 << 40, 4096),
        &[],
        libc::E2BIG,
    );
    r.expect_errno(
        FEATURE,
        &logging_report(u32::MAX, u64::MAX - 4095, 8192, 4096),
        &[],
        libc::EINVAL,
    );
    // Stop; reports are refused again; stopping twice is harmless.
    let stop = feature(8, SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, &[]);
    assert!(!r.cmd(FEATURE, &stop).is_error());
    assert!(!r.cmd(FEATURE, &stop).is_error());
    r.expect_errno(
        FEATURE,
        &logging_report(64, 0x10_0000, 0x1_0000, 4096),
        &[],
        libc::EINVAL,
    );
    assert_eq!(
        fx.calls().iter().filter(|c| **c == Call::LogStop).count(),
        1
    );
    // Everything-logging (no ranges) is allowed.
    assert!(!r.cmd(FEATURE, &logging_start(4096, &[])).is_error());
}

#[test]
fn test_dma_logging_stopped_on_disconnect() {
    let fx = Fixture::new();
    let mut r = fx.raw();
    assert!(!r
        .cmd(FEATURE, &logging_start(4096, &[(0, 0x1000)]))
        .is_error());
    drop(r);
    fx.wait_for("disconnect", |f| f.calls().contains(&Call::Disconnected));
    let calls = fx.calls();
    assert!(calls.contains(&Call::LogStop));
    // A new client can start it again.
    let mut r = fx.raw();
    assert!(!r
        .cmd(FEATURE, &logging_start(4096, &[(0, 0x1000)]))
        .is_error());
}
