//! Raw-socket tests for what `vfio_user::Client` cannot send: QEMU's dialect, malformed input,
//! error paths.

#![allow(clippy::cast_possible_truncation)] // Test arithmetic on small known values.

mod common;

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::time::{Duration, Instant};

use common::*;
use vfio_bindings::bindings::vfio::*;
use vgpu_vfio_user::{Error, Server, ServerConfig};

const EVENTFD_TRIGGER: u32 = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;

fn json_of(reply: &Msg) -> serde_json::Value {
    let p = &reply.payload;
    assert_eq!(*p.last().unwrap(), 0, "JSON is NUL-terminated");
    serde_json::from_slice(&p[4..p.len() - 1]).unwrap()
}

/// A pipe; the write end is sent to the server and the read end tells when all copies of the
/// write end are closed.
fn pipe() -> (std::fs::File, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors; the result is checked.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert_eq!(rc, 0);
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe {
        (
            std::os::fd::FromRawFd::from_raw_fd(fds[0]),
            std::os::fd::FromRawFd::from_raw_fd(fds[1]),
        )
    }
}

/// Waits until every copy of the pipe's write end is closed (reads see EOF).
fn wait_pipe_closed(r: &std::fs::File) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut b = [0u8; 1];
        match std::io::Read::read(&mut &*r, &mut b) {
            Ok(0) => return,
            _ => {
                assert!(Instant::now() < deadline, "a received fd was never closed");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

#[test]
fn test_version_qemu_0_0_gets_0_0_and_caps() {
    let fx = Fixture::new();
    let mut r = Raw::connect(fx.path());
    let reply = r.version(
        0,
        0,
        Some(r#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"migration":{"pgsize":4096,"max_bitmap_size":268435456},"write_multiple":true}}"#),
    );
    assert!(!reply.is_error());
    assert_eq!(u16_at(&reply.payload, 0), 0);
    assert_eq!(u16_at(&reply.payload, 2), 0);
    let caps = &json_of(&reply)["capabilities"];
    assert_eq!(caps["max_msg_fds"], 16);
    assert_eq!(caps["max_data_xfer_size"], 1 << 20);
    assert_eq!(caps["max_dma_maps"], 65535);
    assert_eq!(caps["pgsizes"], 4096);
    assert_eq!(caps["migration"]["pgsize"], 4096);
    assert!(caps["migration"]["max_bitmap_size"].as_u64().unwrap() <= 256 << 20);
    assert_eq!(caps["write_multiple"], true);
}

#[test]
fn test_version_client_0_1_gets_0_1_without_write_multiple() {
    let fx = Fixture::new();
    let mut r = Raw::connect(fx.path());
    let reply = r.version(0, 1, Some(r#"{"capabilities":{"max_msg_fds":1}}"#));
    assert_eq!(u16_at(&reply.payload, 2), 1);
    assert!(json_of(&reply)["capabilities"]
        .get("write_multiple")
        .is_none());
    // Higher minors are answered with ours.
    let mut r2 = {
        drop(r);
        fx.wait_for("idle", |f| !f.server().is_connected());
        Raw::connect(fx.path())
    };
    let reply = r2.version(0, 7, None);
    assert_eq!(u16_at(&reply.payload, 2), 1);
}

#[test]
fn test_version_must_come_first_and_only_once() {
    let fx = Fixture::new();
    let mut r = Raw::connect(fx.path());
    r.expect_errno(
        GET_INFO,
        &B::new().u32(16).u32(0).u32(0).u32(0).done(),
        &[],
        libc::EINVAL,
    );
    let reply = r.version(0, 1, None);
    assert!(!reply.is_error());
    let again = r.version(0, 1, None);
    assert!(again.is_error());
    // Malformed JSON is refused without closing the connection.
    let fx2 = Fixture::new();
    let mut r2 = Raw::connect(fx2.path());
    let bad = r2.cmd(VERSION, &B::new().u16(0).u16(1).bytes(b"{nope").done());
    assert!(bad.is_error());
    assert!(!r2.version(0, 1, Some("{}")).is_error());
}

#[test]
fn test_version_other_major_closes_connection() {
    let fx = Fixture::new();
    let mut r = Raw::connect(fx.path());
    r.send(VERSION, 0, &B::new().u16(1).u16(0).done(), &[]);
    r.expect_closed();
    // The server keeps listening.
    drop(r);
    let mut r = fx.raw();
    assert!(!r.read(VFIO_PCI_CONFIG_REGION_INDEX, 0, 4).is_error());
}

#[test]
fn test_get_info_and_irq_info_all_indexes() {
    let fx = Fixture::new();
    let mut r = fx.raw();
    let info = r.cmd(GET_INFO, &B::new().u32(16).u32(0).u32(0).u32(0).done());
    assert_eq!(info.payload.len(), 16);
    assert_eq!(u32_at(&info.payload, 0), 16);
    assert_eq!(
        u32_at(&info.payload, 4),
        VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET
    );
    assert_eq!(u32_at(&info.payload, 8), 9);
    assert_eq!(u32_at(&info.payload, 12), 5);
    r.expect_errno(
        GET_INFO,
        &B::new().u32(8).u32(0).u32(0).u32(0).done(),
        &[],
        libc::EINVAL,
    );
    r.expect_errno(GET_INFO, &B::new().u32(16).done(), &[], libc::EINVAL);
    for index in 0..5 {
        let irq = r.cmd(
            GET_IRQ_INFO,
            &B::new().u32(16).u32(0).u32(index).u32(0).done(),
        );
        assert_eq!(u32_at(&irq.payload, 8), index);
    }
    r.expect_errno(
        GET_IRQ_INFO,
        &B::new().u32(16).u32(0).u32(5).u32(0).done(),
        &[],
        libc::EINVAL,
    );
}

#[test]
fn test_region_info_argsz_handshake_and_fd() {
    let fx = Fixture::new();
    let mut r = fx.raw();
    let req = |argsz: u32, index: u32| {
        B::new()
            .u32(argsz)
            .u32(0)
            .u32(index)
            .u32(0)
            .u64(0)
            .u64(0)
            .done()
    };
    // Too small for the capability: fixed part, the full argsz, no CAPS, no fd.
    let short = r.cmd(GET_REGION_INFO, &req(32, 2));
    assert_eq!(short.payload.len(), 32);
    let full = u32_at(&short.payload, 0);
    assert_eq!(full, 32 + 8 + 8 + 16);
    assert_eq!(u32_at(&short.payload, 4) & VFIO_REGION_INFO_FLAG_CAPS, 0);
    assert!(short.fds.is_empty());
    // Asked again with room: capability at offset 32, relative to the region info.
    let long = r.cmd(GET_REGION_INFO, &req(full, 2));
    let p = &long.payload;
    assert_eq!(p.len(), full as usize);
    assert_eq!(u32_at(p, 0), full);
    let flags = u32_at(p, 4);
    assert_ne!(flags & VFIO_REGION_INFO_FLAG_MMAP, 0);
    assert_ne!(flags & VFIO_REGION_INFO_FLAG_CAPS, 0);
    assert_eq!(u32_at(p, 8), 2);
    assert_eq!(u32_at(p, 12), 32);
    assert_eq!(u64_at(p, 16), BAR2_SIZE);
    assert_eq!(u16_at(p, 32), 1, "sparse mmap id");
    assert_eq!(u16_at(p, 34), 1, "version");
    assert_eq!(u32_at(p, 36), 0, "next");
    assert_eq!(u32_at(p, 40), 1, "nr_areas");
    assert_eq!(u64_at(p, 48), BAR2_SPARSE.0);
    assert_eq!(u64_at(p, 56), BAR2_SPARSE.1);
    assert_eq!(long.fds.len(), 1);
    // The descriptor is the backend's BAR2 memfd.
    let f = std::fs::File::from(long.fds.into_iter().next().unwrap());
    f.write_all_at(b"x", 0x2000).unwrap();
    let rd = r.read(2, 0x2000, 1);
    assert_eq!(&rd.payload[16..], b"x");
    // Plain region: fixed part only.
    let bar0 = r.cmd(GET_REGION_INFO, &req(32, 0));
    assert_eq!(u32_at(&bar0.payload, 0), 32);
    assert_eq!(u64_at(&bar0.payload, 16), BAR0_SIZE);
    assert!(bar0.fds.is_empty());
    r.expect_errno(GET_REGION_INFO, &req(32, 9), &[], libc::EINVAL);
    r.expect_errno(GET_REGION_INFO, &req(16, 0), &[], libc::EINVAL);
}

#[test]
fn test_region_io_fds_supported_but_empty() {
    let fx = Fixture::new();
    let mut r = fx.raw();
    let reply = r.cmd(
        GET_REGION_IO_FDS,
        &B::new().u32(256).u32(0).u32(0).u32(0).done(),
    );
    assert!(!reply.is_error());
    assert_eq!(reply.payload.len(), 16);
    assert_eq!(u32_at(&reply.payload, 0), 16);
    assert_eq!(u32_at(&reply.payload, 8), 0);
    assert_eq!(u32_at(&reply.payload, 12), 0, "no sub-regions");
    assert!(reply.fds.is_empty());
    r.expect_errno(
        GET_REGION_IO_FDS,
        &B::new().u32(256).u32(0).u32(42).u32(0).done(),
        &[],
        libc::EINVAL,
    );
    r.expect_errno(
        GET_REGION_IO_FDS,
        &B::new().u32(256).u32(1).u32(0).u32(0).done(),
        &[],
        libc::EINVAL,
    );
}

#[test]
fn test_posted_writes_get_no_reply_and_apply_in_order() {
    let fx = Fixture::new();
    let mut r = fx.raw();
    for i in 0..8u8 {
        let p = B::new()
            .u64(0x100 + u64::from(i))
            .u32(0)
            .u32(1)
            .bytes(&[i])
            .done();
        r.send(REGION_WRITE, NO_REPLY, &p, &[]);
    }
    // A posted access that fails stays silent too.
    r.send(
        REGION_WRITE,
        NO_REPLY,
        &B::new().u64(0).u32(42).u32(1).bytes(&[1]).done(),
        &[],
    );
    let read = r.read(0, 0x100, 8);
    assert_eq!(&read.payload[16..], &[0, 1, 2, 3, 4, 5, 6, 7]);
}

#[test]
fn test_bad_region_and_out_of_bounds_answer_all_ones() {
    let fx = Fixture::new();
    let mut r = fx.raw();
    for (region, offset, count) in [
        (42u32, 0u64, 4u32),
        (1, 0, 4),
        (0, BAR0_SIZE - 2, 4),
        (0, u64::MAX - 1, 4),
        (7, CONFIG_SIZE, 1),
    ] {
        let reply = r.read(region, offset, count);
        assert!(!reply.is_error(), "no error flag for accesses");
        assert_eq!(u64_at(&reply.payload, 0), offset);
        assert_eq!(u32_at(&reply.payload, 8), region);
        assert_eq!(u32_at(&reply.payload, 12), count);
        assert_eq!(&reply.payload[16..], vec![0xff; count as usize].as_slice());
        let w = r.write(region, offset, &vec![0xaa; count as usize]);
        assert!(!w.is_error());
        assert_eq!(w.payload.len(), 16);
    }
    // A backend failure also reads as all-ones, never as the backend's partial data.
    let reply = r.read(0, BAR0_FAILING, 4);
    assert_eq!(&reply.payload[16..], &[0xff; 4]);
    assert_eq!(fx.server().stats().bad_accesses, 11);
    // Nothing out of bounds reached the backend.
    assert_eq!(fx.calls(), vec![Call::RegionRead(0, BAR0_FAILING, 4)]);
    // Oversized counts are malformed: error reply.
    r.expect_errno(
        REGION_READ,
        &B::new().u64(0).u32(0).u32((1 << 20) + 1).done(),
        &[],
        libc::EINVAL,
    );
    // Data length must match count.
    r.expect_errno(
        REGION_WRITE,
        &B::new().u64(0).u32(0).u32(4).bytes(&[1, 2]).done(),
        &[],
        libc::EINVAL,
    );
}

#[test]
fn test_unknown_commands_consumed_then_connection_works() {
    let fx = Fixture::new();
    let mut r = fx.raw();
    for cmd in [14u16, 99, 0, 0xffff] {
        let payload = vec![0x42u8; 300];
        r.expect_errno(cmd, &payload, &[], libc::ENOTSUP);
        let ok = r.read(VFIO_PCI_CONFIG_REGION_INDEX, 0, 4);
        assert_eq!(
            u32::from_le_bytes(ok.payload[16..20].try_into().unwrap()),
            0x1234_1af4
        );
    }
    // Server-to-client commands sent by the client are refused too.
    r.expect_errno(DMA_READ, &B::new().u64(0).u64(8).done(), &[], libc::EINVAL);
    // A reply-type message matching nothing is dropped silently.
    let bytes = Raw::frame(0x77, DMA_READ, REPLY, &[0u8; 16]);
    r.send_bytes(&bytes);
    assert!(!r.read(0, 0, 4).is_error());
    assert_eq!(fx.server().stats().unexpected_replies, 1);
}

#[test]
fn test_pipelined_messages_each_answered_in_order_with_own_fds() {
    let fx = Fixture::new();
    let mut r = fx.raw();
    // Three commands in one write, an unknown one (with a payload to skip) first; then, without
    // waiting, a SET_IRQS with two eventfds and a read in separate sends. The server may get
    // all of it in one read: every message is still framed on its own, and the descriptors go
    // with SET_IRQS.
    let bytes = [
        Raw::frame(0x10, 99, 0, &[0x42; 300]),
        Raw::frame(
            0x11,
            REGION_WRITE,
            0,
            &B::new().u64(0x20).u32(0).u32(4).bytes(&[1, 2, 3, 4]).done(),
        ),
        Raw::frame(
            0x12,
            REGION_READ,
            0,
            &B::new().u64(0x20).u32(0).u32(4).done(),
        ),
    ]
    .concat();
    r.send_bytes(&bytes);
    let efds: Vec<std::fs::File> = (0..2).map(|_| eventfd()).collect();
    let raw: Vec<RawFd> = efds.iter().map(AsRawFd::as_raw_fd).collect();
    let msix = VFIO_PCI_MSIX_IRQ_INDEX;
    let irqs = r.send(
        SET_IRQS,
        0,
        &set_irqs_payload(EVENTFD_TRIGGER, msix, 0, 2),
        &raw,
    );
    let cfg = r.send(
        REGION_READ,
        0,
        &B::new()
            .u64(0)
            .u32(VFIO_PCI_CONFIG_REGION_INDEX)
            .u32(4)
            .done(),
        &[],
    );
    let replies: Vec<Msg> = (0..5).map(|_| r.recv()).collect();
    let ids: Vec<u16> = replies.iter().map(|m| m.id).collect();
    assert_eq!(ids, vec![0x10, 0x11, 0x12, irqs, cfg]);
    assert!(replies[0].is_error());
    assert_eq!(replies[0].error, libc::ENOTSUP as u32);
    assert_eq!(&replies[2].payload[16..], &[1, 2, 3, 4]);
    assert!(!replies[3].is_error(), "SET_IRQS got its descriptors");
    assert_eq!(u32_at(&replies[4].payload, 16), 0x1234_1af4);
    assert!(fx.calls().contains(&Call::SetIrqs {
        index: msix,
        action: VFIO_IRQ_SET_ACTION_TRIGGER,
        start: 0,
        count: 2,
        fds: vec![true, true],
    }));
    assert!(fx.backend().trigger(1));
    assert_eq!(wait_event(&efds[1]), 1);
    assert_eq!(fx.server().stats().stray_fds, 0);
}

#[test]
fn test_truncated_header_closes_only_that_connection() {
    let fx = Fixture::new();
    let mut r = fx.raw();
    r.send_bytes(&[1, 0, 4, 0, 32, 0]);
    r.s.shutdown(std::net::Shutdown::Write).unwrap();
    r.expect_closed();
    drop(r);
    let mut r = fx.raw();
    assert!(!r.read(0, 0, 4).is_error());
    assert_eq!(fx.server().stats().framing_errors, 1);
    // EOF inside a payload too.
    drop(r);
    let mut r = fx.raw();
    let frame = Raw::frame(5, REGION_WRITE, 0, &B::new().u64(0).u32(0).u32(64).done());
    let mut short = frame.clone();
    short[4..8].copy_from_slice(&(16u32 + 16 + 64).to_ne_bytes());
    r.send_bytes(&short);
    r.s.shutdown(std::net::Shutdown::Write).unwrap();
    r.expect_closed();
    drop(r);
    let mut r = fx.raw();
    assert!(!r.read(0, 0, 4).is_error());
    assert!(fx.server().is_running());
}

#[test]
fn test_oversized_and_undersized_message_size_close_connection() {
    let fx = Fixture::new();
    for size in [64u32 << 20, u32::MAX, 15, 0] {
        let mut r = fx.raw();
        let mut h = Raw::frame(9, REGION_WRITE, 0, &[]);
        h[4..8].copy_from_slice(&size.to_ne_bytes());
        r.send_bytes(&h);
        r.expect_closed();
    }
    assert_eq!(fx.server().stats().framing_errors, 4);
    let mut r = fx.raw();
    assert!(!r.read(0, 0, 4).is_error());
}

#[test]
fn test_too_many_fds_error_and_all_closed() {
    let fx = Fixture::new();
    let mut r = fx.raw();
    let (rd, wr) = pipe();
    let extra: Vec<std::fs::File> = (0..16).map(|_| eventfd()).collect();
    let mut fds: Vec<RawFd> = extra.iter().map(AsRawFd::as_raw_fd).collect();
    fds.push(wr.as_raw_fd());
    let id = r.send(
        GET_INFO,
        0,
        &B::new().u32(16).u32(0).u32(0).u32(0).done(),
        &fds,
    );
    drop(wr);
    let reply = r.recv();
    assert_eq!(reply.id, id);
    assert!(reply.is_error());
    assert_eq!(reply.error, libc::EINVAL as u32);
    wait_pipe_closed(&rd);
    // Stray descriptors on a command that takes none are closed, and the command proceeds.
    let (rd, wr) = pipe();
    let reply = r.cmd_fds(
        REGION_READ,
        &B::new().u64(0).u32(7).u32(4).done(),
        &[wr.as_raw_fd()],
    );
    drop(wr);
    assert!(!reply.is_error());
    wait_pipe_closed(&rd);
    assert!(fx.server().stats().stray_fds >= 18);
}

#[test]
fn test_set_irqs_validation_and_deassign() {
    let fx = Fixture::new();
    let mut r = fx.raw();
    let msix = VFIO_PCI_MSIX_IRQ_INDEX;
    let efds: Vec<std::fs::File> = (0..2).map(|_| eventfd()).collect();
    let raw: Vec<RawFd> = efds.iter().map(AsRawFd::as_raw_fd).collect();
    // Count/fd mismatch: refused, descriptors closed.
    let (rd, wr) = pipe();
    r.expect_errno(
        SET_IRQS,
        &set_irqs_payload(EVENTFD_TRIGGER, msix, 0, 2),
        &[wr.as_raw_fd()],
        libc::EINVAL,
    );
    drop(wr);
    wait_pipe_closed(&rd);
    // Out of range, bad flags, two actions, two data types, unknown index.
    for (flags, index, start, count) in [
        (EVENTFD_TRIGGER, msix, 3, 2),
        (EVENTFD_TRIGGER, msix, u32::MAX, 2),
        (
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER | 0x100,
            msix,
            0,
            1,
        ),
        (
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_ACTION_MASK,
            msix,
            0,
            1,
        ),
        (
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER,
            msix,
            0,
            1,
        ),
        (
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
            5,
            0,
            1,
        ),
        (
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK,
            VFIO_PCI_ERR_IRQ_INDEX,
            0,
            1,
        ),
        (
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            msix,
            1,
            0,
        ),
    ] {
        r.expect_errno(
            SET_IRQS,
            &set_irqs_payload(flags, index, start, count),
            &[],
            libc::EINVAL,
        );
    }
    // DATA_NONE with fds is refused.
    r.expect_errno(
        SET_IRQS,
        &set_irqs_payload(
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
            msix,
            0,
            1,
        ),
        &raw[..1],
        libc::EINVAL,
    );
    assert!(fx.calls().is_empty(), "nothing invalid reached the backend");
    // Valid: two eventfds at vectors 2..4.
    let ok = r.cmd_fds(
        SET_IRQS,
        &set_irqs_payload(EVENTFD_TRIGGER, msix, 2, 2),
        &raw,
    );
    assert!(!ok.is_error());
    assert!(fx.backend().trigger(3));
    assert_eq!(wait_event(&efds[1]), 1);
    // No descriptors with DATA_EVENTFD de-assigns (QEMU's way of sending fd -1).
    let ok = r.cmd(SET_IRQS, &set_irqs_payload(EVENTFD_TRIGGER, msix, 2, 2));
    assert!(!ok.is_error());
    assert!(!fx.backend().trigger(3));
    // DATA_BOOL: one call per set byte.
    let mut p = set_irqs_payload(
        VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_MASK,
        msix,
        0,
        3,
    );
    p[0..4].copy_from_slice(&23u32.to_ne_bytes());
    p.extend_from_slice(&[1, 0, 1]);
    assert!(!r.cmd(SET_IRQS, &p).is_error());
    // Disable everything: start = count = 0, DATA_NONE | TRIGGER.
    let ok = r.cmd(
        SET_IRQS,
        &set_irqs_payload(
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
            msix,
            0,
            0,
        ),
    );
    assert!(!ok.is_error());
    let calls = fx.calls();
    let expect = |index, action, start, count, fds: Vec<bool>| Call::SetIrqs {
        index,
        action,
        start,
        count,
        fds,
    };
    assert_eq!(
        calls,
        vec![
            expect(msix, VFIO_IRQ_SET_ACTION_TRIGGER, 2, 2, vec![true, true]),
            expect(msix, VFIO_IRQ_SET_ACTION_TRIGGER, 2, 2, vec![false, false]),
            expect(msix, VFIO_IRQ_SET_ACTION_MASK, 0, 1, vec![]),
            expect(msix, VFIO_IRQ_SET_ACTION_MASK, 2, 1, vec![]),
            expect(msix, VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0, vec![]),
        ]
    );
}

#[test]
fn test_dma_map_validation() {
    let fx = Fixture::new();
    let mut r = fx.raw();
    let rw = 3;
    let guest = memfd(0x20000);
    let fd = [guest.as_raw_fd()];
    assert!(!r
        .cmd_fds(DMA_MAP, &dma_map_payload(rw, 0, 0x10_0000, 0x10000), &fd)
        .is_error());
    // Overlap, partial or whole, with or without a descriptor.
    r.expect_errno(
        DMA_MAP,
        &dma_map_payload(rw, 0, 0x10_8000, 0x10000),
        &fd,
        libc::EEXIST,
    );
    r.expect_errno(
        DMA_MAP,
        &dma_map_payload(rw, 0, 0x0f_f000, 0x2000),
        &[],
        libc::EEXIST,
    );
    r.expect_errno(
        DMA_MAP,
        &dma_map_payload(rw, 0, 0x10_0000, 0x10000),
        &fd,
        libc::EEXIST,
    );
    // Misaligned address, size, file offset; empty; overflowing; bad flags.
    for (flags, offset, iova, size) in [
        (rw, 0, 0x20_0800, 0x1000),
        (rw, 0, 0x20_0000, 0x800),
        (rw, 0x800, 0x20_0000, 0x1000),
        (rw, 0, 0x20_0000, 0),
        (rw, 0, u64::MAX - 0xfff, 0x2000),
        (0, 0, 0x20_0000, 0x1000),
        (4 | rw, 0, 0x20_0000, 0x1000),
    ] {
        r.expect_errno(
            DMA_MAP,
            &dma_map_payload(flags, offset, iova, size),
            &fd,
            libc::EINVAL,
        );
    }
    // A file too short for the range would SIGBUS the server: refused.
    r.expect_errno(
        DMA_MAP,
        &dma_map_payload(rw, 0x10000, 0x40_0000, 0x20000),
        &fd,
        libc::EINVAL,
    );
    // Two descriptors.
    r.expect_errno(
        DMA_MAP,
        &dma_map_payload(rw, 0, 0x40_0000, 0x1000),
        &[guest.as_raw_fd(), guest.as_raw_fd()],
        libc::EINVAL,
    );
    // No descriptor: accepted, reachable only through messages.
    assert!(!r
        .cmd(DMA_MAP, &dma_map_payload(1, 0, 0x30_0000, 0x1000))
        .is_error());
    assert_eq!(
        fx.calls(),
        vec![
            Call::DmaMap {
                iova: 0x10_0000,
                size: 0x10000,
                mapped: true,
                readable: true,
                writable: true
            },
            Call::DmaMap {
                iova: 0x30_0000,
                size: 0x1000,
                mapped: false,
                readable: true,
                writable: false
            },
        ]
    );
}

#[test]
fn test_dma_map_limit_enforced() {
    let fx = Fixture::with(
        TestBackend::new(),
        ServerConfig {
            max_dma_maps: 2,
            ..ServerConfig::default()
        },
    );
    let mut r = fx.raw();
    assert!(!r
        .cmd(DMA_MAP, &dma_map_payload(3, 0, 0x1000, 0x1000))
        .is_error());
    assert!(!r
        .cmd(DMA_MAP, &dma_map_payload(3, 0, 0x2000, 0x1000))
        .is_error());
    r.expect_errno(
        DMA_MAP,
        &dma_map_payload(3, 0, 0x3000, 0x1000),
        &[],
        libc::ENOSPC,
    );
}

#[test]
fn test_dma_unmap_exact_unknown_and_all() {
    let fx = Fixture::new();
    let mut r = fx.raw();
    for iova in [0x1000u64, 0x10000, 0x20000] {
        assert!(!r
            .cmd(DMA_MAP, &dma_map_payload(3, 0, iova, 0x1000))
            .is_error());
    }
    r.expect_errno(
        DMA_UNMAP,
        &dma_unmap_payload(0, 0x5000, 0x1000),
        &[],
        libc::ENOENT,
    );
    r.expect_errno(
        DMA_UNMAP,
        &dma_unmap_payload(0, 0x1000, 0x2000),
        &[],
        libc::ENOENT,
    );
    r.expect_errno(
        DMA_UNMAP,
        &dma_unmap_payload(1, 0x1000, 0x1000),
        &[],
        libc::ENOTSUP,
    );
    r.expect_errno(
        DMA_UNMAP,
        &dma_unmap_payload(8, 0x1000, 0x1000),
        &[],
        libc::EINVAL,
    );
    r.expect_errno(
        DMA_UNMAP,
        &dma_unmap_payload(2, 0x1000, 0x1000),
        &[],
        libc::EINVAL,
    );
    // The reply repeats the request (the vfio_user client reads it whole).
    let req = dma_unmap_payload(0, 0x1000, 0x1000);
    let reply = r.cmd(DMA_UNMAP, &req);
    assert!(!reply.is_error());
    assert_eq!(reply.payload, req);
    fx.clear_calls();
    let all = dma_unmap_payload(2, 0, 0);
    let reply = r.cmd(DMA_UNMAP, &all);
    assert_eq!(reply.payload, all);
    // In address order.
    assert_eq!(
        fx.calls(),
        vec![
            Call::DmaUnmap(0x10000, 0x1000),
            Call::DmaUnmap(0x20000, 0x1000)
        ]
    );
    assert!(fx.backend().dma.is_empty());
    // Everything can be mapped again.
    assert!(!r
        .cmd(DMA_MAP, &dma_map_payload(3, 0, 0x10000, 0x1000))
        .is_error());
}

#[test]
fn test_dma_handle_uses_messages_without_fd() {
    let fx = Fixture::new();
    let mut r = Raw::connect(fx.path());
    // A small max_data_xfer_size forces chunking.
    r.version(
        0,
        0,
        Some(r#"{"capabilities":{"max_data_xfer_size":4096}}"#),
    );
    assert!(!r
        .cmd(DMA_MAP, &dma_map_payload(3, 0, 0x10000, 0x4000))
        .is_error());
    let dma = fx.server().dma();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 6000];
        dma.read(0x10100, &mut buf).map(|()| buf)
    });
    // Serve the two DMA_READ requests like a client would.
    let mut memory = vec![0u8; 0x4000];
    for (i, b) in memory.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    for expect in [4096u64, 6000 - 4096] {
        let req = r.recv();
        assert_eq!(req.command, DMA_READ);
        assert_eq!(req.flags & 0xf, 0, "a command");
        let addr = u64_at(&req.payload, 0);
        let count = u64_at(&req.payload, 8);
        assert_eq!(count, expect);
        let off = (addr - 0x10000) as usize;
        let reply = B::new()
            .u64(addr)
            .u64(count)
            .bytes(&memory[off..off + count as usize])
            .done();
        r.send_bytes(&Raw::frame(req.id, DMA_READ, REPLY, &reply));
    }
    let got = reader.join().unwrap().unwrap();
    assert_eq!(got, memory[0x100..0x100 + 6000]);

    // DMA_WRITE carries the data at payload offset 16.
    let dma = fx.server().dma();
    let writer = std::thread::spawn(move || dma.write(0x10200, b"hello"));
    let req = r.recv();
    assert_eq!(req.command, DMA_WRITE);
    assert_eq!(u64_at(&req.payload, 0), 0x10200);
    assert_eq!(u64_at(&req.payload, 8), 5);
    assert_eq!(&req.payload[16..], b"hello");
    r.send_bytes(&Raw::frame(
        req.id,
        DMA_WRITE,
        REPLY,
        &B::new().u64(0x10200).u32(5).done(),
    ));
    writer.join().unwrap().unwrap();

    // A client error reply becomes an error; commands still flow meanwhile.
    let dma = fx.server().dma();
    let failing = std::thread::spawn(move || {
        let mut b = [0u8; 4];
        dma.read(0x10000, &mut b)
    });
    let req = r.recv();
    let mut err = Raw::frame(req.id, DMA_READ, REPLY | ERROR, &[]);
    err[12..16].copy_from_slice(&(libc::EFAULT as u32).to_ne_bytes());
    r.send_bytes(&err);
    assert!(
        matches!(failing.join().unwrap(), Err(Error::DmaRejected(e)) if e == libc::EFAULT as u32)
    );
    // Unmapped and write-protected ranges never reach the client.
    let dma = fx.server().dma();
    let mut b = [0u8; 4];
    assert!(matches!(
        dma.read(0x20000, &mut b),
        Err(Error::DmaNotMapped { .. })
    ));
    assert!(!r
        .cmd(DMA_MAP, &dma_map_payload(1, 0, 0x40000, 0x1000))
        .is_error());
    assert!(matches!(
        dma.write(0x40000, &b),
        Err(Error::DmaPermission { .. })
    ));
    assert!(!r.read(0, 0, 4).is_error());
}

#[test]
fn test_dma_handle_times_out_and_not_connected() {
    let fx = Fixture::with(
        TestBackend::new(),
        ServerConfig {
            dma_timeout: Duration::from_millis(300),
            ..ServerConfig::default()
        },
    );
    let dma = fx.server().dma();
    let mut b = [0u8; 4];
    assert!(matches!(dma.read(0, &mut b), Err(Error::NotConnected)));
    let mut r = fx.raw();
    assert!(!r
        .cmd(DMA_MAP, &dma_map_payload(3, 0, 0x10000, 0x1000))
        .is_error());
    assert!(matches!(dma.read(0x10000, &mut b), Err(Error::DmaTimeout)));
    // The late reply is dropped; the connection keeps working.
    let req = r.recv();
    r.send_bytes(&Raw::frame(
        req.id,
        DMA_READ,
        REPLY,
        &B::new().u64(0x10000).u64(4).u32(0).done(),
    ));
    assert!(!r.read(0, 0, 4).is_error());
    assert_eq!(fx.server().stats().unexpected_replies, 1);
}

#[test]
fn test_dma_request_not_held_past_timeout_by_partial_message() {
    let fx = Fixture::with(
        TestBackend::new(),
        ServerConfig {
            dma_timeout: Duration::from_millis(300),
            ..ServerConfig::default()
        },
    );
    let mut r = Raw::connect(fx.path());
    r.version(0, 0, None);
    assert!(!r
        .cmd(DMA_MAP, &dma_map_payload(3, 0, 0x10000, 0x1000))
        .is_error());
    assert!(!r
        .write(0, BAR0_DMA_ADDR, &0x10000u64.to_ne_bytes())
        .is_error());
    // The doorbell makes the connection thread request a DMA_READ and read the socket itself
    // while it waits for the reply; the client answers with half a message instead.
    let bell = r.send(
        REGION_WRITE,
        0,
        &B::new().u64(BAR0_DOORBELL).u32(0).u32(4).u32(1).done(),
        &[],
    );
    assert_eq!(r.recv().command, DMA_READ);
    let next = Raw::frame(
        0x55,
        REGION_READ,
        0,
        &B::new()
            .u64(0)
            .u32(VFIO_PCI_CONFIG_REGION_INDEX)
            .u32(4)
            .done(),
    );
    r.send_bytes(&next[..10]);
    // The request times out (the doorbell write is answered as a failed access) instead of
    // waiting for the rest of that message...
    let t0 = Instant::now();
    let reply = r.recv();
    assert_eq!(reply.id, bell);
    assert!(!reply.is_error());
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(fx.server().stats().bad_accesses, 1);
    // ...and the half message was kept: its rest completes it.
    r.send_bytes(&next[10..]);
    let reply = r.recv();
    assert_eq!(reply.id, 0x55);
    assert_eq!(u32_at(&reply.payload, 16), 0x1234_1af4);
    assert_eq!(fx.server().stats().framing_errors, 0);
}

#[test]
fn test_write_multi_when_negotiated() {
    let fx = Fixture::new();
    let mut r = Raw::connect(fx.path());
    r.version(0, 0, Some(r#"{"capabilities":{"write_multiple":true}}"#));
    let one = |offset: u64, region: u32, data: &[u8]| {
        let mut d = [0u8; 8];
        d[..data.len()].copy_from_slice(data);
        B::new()
            .u64(offset)
            .u32(region)
            .u32(data.len() as u32)
            .bytes(&d)
            .done()
    };
    let mut p = B::new().u64(3).done();
    p.extend(one(0x10, 0, &[1, 2, 3, 4]));
    p.extend(one(0x20, 42, &[9]));
    p.extend(one(0x18, 0, &[5, 6, 7, 8, 9, 10, 11, 12]));
    // As QEMU sends it: posted.
    r.send(WRITE_MULTI, NO_REPLY, &p, &[]);
    let rd = r.read(0, 0x10, 16);
    assert_eq!(&rd.payload[16..20], &[1, 2, 3, 4]);
    assert_eq!(&rd.payload[24..32], &[5, 6, 7, 8, 9, 10, 11, 12]);
    // With a reply: the number of writes completed.
    let reply = r.cmd(WRITE_MULTI, &p);
    assert_eq!(u64_at(&reply.payload, 0), 2);
    // Malformed: count does not match the payload; a write wider than 8 bytes fails alone.
    let mut bad = B::new().u64(4).done();
    bad.extend(one(0, 0, &[1]));
    r.expect_errno(WRITE_MULTI, &bad, &[], libc::EINVAL);
    let mut wide = B::new().u64(1).done();
    wide.extend(B::new().u64(0).u32(0).u32(9).u64(0).done());
    assert_eq!(u64_at(&r.cmd(WRITE_MULTI, &wide).payload, 0), 0);

    // Not negotiated: refused.
    let fx = Fixture::new();
    let mut r = fx.raw();
    r.expect_errno(WRITE_MULTI, &p, &[], libc::ENOTSUP);
}

#[test]
fn test_reset_reaches_backend() {
    let fx = Fixture::new();
    let mut r = fx.raw();
    let reply = r.cmd(RESET, &[]);
    assert!(!reply.is_error());
    assert_eq!(reply.size, 16);
    assert_eq!(fx.calls(), vec![Call::Reset]);
}

#[test]
fn test_socket_file_mode_stale_and_live() {
    let sock = TempSock::new();
    // A stale socket file (nobody listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock.path).unwrap());
    assert!(sock.path.exists());
    let backend = TestBackend::shared();
    let server = Server::start_with(&sock.path, backend.clone(), ServerConfig::default()).unwrap();
    let mode = std::fs::metadata(&sock.path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // A live one is not touched.
    assert!(matches!(
        Server::start_with(&sock.path, backend.clone(), ServerConfig::default()),
        Err(Error::SocketInUse(_))
    ));
    server.shutdown();
    assert!(!sock.path.exists());
    // Nor is a regular file.
    std::fs::File::create(&sock.path)
        .unwrap()
        .write_all(b"data")
        .unwrap();
    assert!(matches!(
        Server::start_with(&sock.path, backend, ServerConfig::default()),
        Err(Error::NotASocket(_))
    ));
    assert!(sock.path.exists());
}

#[test]
fn test_shutdown_disconnects_client() {
    let mut fx = Fixture::new();
    let mut r = fx.raw();
    assert!(!r
        .cmd(DMA_MAP, &dma_map_payload(3, 0, 0x1000, 0x1000))
        .is_error());
    fx.server.take().unwrap().shutdown();
    r.expect_closed();
    assert!(!fx.path().exists());
    let calls = fx.calls();
    assert!(calls.contains(&Call::DmaUnmap(0x1000, 0x1000)));
    assert_eq!(calls.last(), Some(&Call::Disconnected));
}
