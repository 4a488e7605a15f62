//! The server's DMA handle when the client mapped memory without a descriptor: requests and
//! replies interleaved with commands on one socket, from inside a backend method and from a
//! thread that holds the backend's lock.

#![allow(clippy::cast_possible_truncation)] // Test arithmetic on small known values.

mod common;

use std::thread;

use common::*;

const IOVA: u64 = 0x4000_0000;

/// Answers one `DMA_READ` with bytes derived from the address.
fn answer_dma_read(r: &mut Raw) {
    let req = r.recv();
    assert_eq!(req.command, DMA_READ, "{req:?}");
    assert_eq!(req.flags & 0xf, 0);
    let addr = u64_at(&req.payload, 0);
    let count = u64_at(&req.payload, 8);
    let data: Vec<u8> = (0..count).map(|i| (addr + i) as u8).collect();
    let reply = B::new().u64(addr).u64(count).bytes(&data).done();
    r.send_bytes(&Raw::frame(req.id, DMA_READ, REPLY, &reply));
}

fn map_without_fd(r: &mut Raw) {
    assert!(!r
        .cmd(DMA_MAP, &dma_map_payload(3, 0, IOVA, 0x1000))
        .is_error());
}

#[test]
fn test_dma_from_backend_method_on_connection_thread() {
    let fx = Fixture::new();
    let mut r = fx.raw();
    map_without_fd(&mut r);
    assert!(!r
        .write(0, BAR0_DMA_ADDR, &(IOVA + 0x20).to_le_bytes())
        .is_error());
    // The doorbell write makes the backend read client memory while the write is in flight.
    let id = r.send(
        REGION_WRITE,
        0,
        &B::new().u64(BAR0_DOORBELL).u32(0).u32(4).u32(1).done(),
        &[],
    );
    answer_dma_read(&mut r);
    let ack = r.recv();
    assert_eq!(ack.id, id);
    assert!(!ack.is_error());
    let got = r.read(0, BAR0_DMA_DATA, 8);
    let expect: Vec<u8> = (0..8u64).map(|i| (IOVA + 0x20 + i) as u8).collect();
    assert_eq!(&got.payload[16..], expect.as_slice());
    assert_eq!(fx.server().stats().bad_accesses, 0);
}

#[test]
fn test_dma_from_thread_holding_backend_lock() {
    let fx = Fixture::new();
    let mut r = fx.raw();
    map_without_fd(&mut r);
    let dma = fx.server().dma();
    let guard = fx.backend();
    // The client pipelines two reads that need the backend (held here), then answers the DMA
    // request that only this thread's read of the socket can deliver.
    let client = thread::spawn(move || {
        let first = r.send(REGION_READ, 0, &B::new().u64(0).u32(7).u32(4).done(), &[]);
        let second = r.send(REGION_READ, 0, &B::new().u64(4).u32(7).u32(4).done(), &[]);
        answer_dma_read(&mut r);
        let a = r.recv();
        let b = r.recv();
        assert_eq!((a.id, b.id), (first, second), "replies in order");
        assert_eq!(
            u32::from_le_bytes(a.payload[16..20].try_into().unwrap()),
            0x1234_1af4
        );
        r
    });
    let mut buf = [0u8; 16];
    dma.read(IOVA + 0x100, &mut buf).unwrap();
    let expect: Vec<u8> = (0..16u64).map(|i| (IOVA + 0x100 + i) as u8).collect();
    assert_eq!(&buf[..], expect.as_slice());
    drop(guard);
    let mut r = client.join().unwrap();
    assert!(!r.read(0, 0, 4).is_error());
}

#[test]
fn test_dma_concurrent_requests_from_many_threads() {
    let fx = Fixture::new();
    let mut r = fx.raw();
    map_without_fd(&mut r);
    let workers: Vec<_> = (0..4u64)
        .map(|t| {
            let dma = fx.server().dma();
            thread::spawn(move || {
                for k in 0..8u64 {
                    let at = IOVA + t * 0x100 + k * 8;
                    let mut buf = [0u8; 8];
                    dma.read(at, &mut buf).unwrap();
                    let expect: Vec<u8> = (0..8u64).map(|i| (at + i) as u8).collect();
                    assert_eq!(&buf[..], expect.as_slice());
                }
            })
        })
        .collect();
    for _ in 0..32 {
        answer_dma_read(&mut r);
    }
    for w in workers {
        w.join().unwrap();
    }
    assert!(!r.read(0, 0, 4).is_error());
}

#[test]
fn test_dma_client_disconnect_fails_waiters() {
    let fx = Fixture::new();
    let mut r = fx.raw();
    map_without_fd(&mut r);
    let dma = fx.server().dma();
    let waiter = thread::spawn(move || {
        let mut b = [0u8; 4];
        dma.read(IOVA, &mut b)
    });
    let req = r.recv();
    assert_eq!(req.command, DMA_READ);
    drop(r);
    let res = waiter.join().unwrap();
    assert!(
        matches!(res, Err(vgpu_vfio_user::Error::NotConnected)),
        "{res:?}"
    );
}
