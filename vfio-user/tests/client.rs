//! Bring-up through the real `vfio_user::Client` (what Cloud Hypervisor runs).

#![allow(clippy::cast_possible_truncation)] // Test arithmetic on small known values.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use common::*;
use vfio_bindings::bindings::vfio::*;
use vfio_user::Client;
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

#[test]
fn test_client_full_bring_up_works() {
    let fx = Fixture::new();
    let mut client = Client::new(fx.path()).expect("client connects");

    // Regions: all nine, BAR2 with its sparse area and a descriptor.
    for index in 0..VFIO_PCI_NUM_REGIONS {
        assert!(client.region(index).is_some(), "region {index}");
    }
    let bar0 = client.region(VFIO_PCI_BAR0_REGION_INDEX).unwrap();
    assert_eq!(bar0.size, BAR0_SIZE);
    assert!(bar0.file_offset.is_none());
    let cfg = client.region(VFIO_PCI_CONFIG_REGION_INDEX).unwrap();
    assert_eq!(cfg.size, CONFIG_SIZE);
    let bar2 = client.region(VFIO_PCI_BAR2_REGION_INDEX).unwrap();
    assert_eq!(bar2.size, BAR2_SIZE);
    assert_ne!(bar2.flags & VFIO_REGION_INFO_FLAG_MMAP, 0);
    assert_ne!(bar2.flags & VFIO_REGION_INFO_FLAG_CAPS, 0);
    assert_eq!(bar2.sparse_areas.len(), 1);
    assert_eq!(bar2.sparse_areas[0].offset, BAR2_SPARSE.0);
    assert_eq!(bar2.sparse_areas[0].size, BAR2_SPARSE.1);
    // The RESET flag is truthful; this client reads it inverted.
    assert!(!client.resettable());

    // Map the sparse area through the descriptor and see writes through region reads.
    let fo = bar2.file_offset.as_ref().expect("BAR2 fd");
    let file = fo.file().try_clone().unwrap();
    let mmap_offset = fo.start() + bar2.sparse_areas[0].offset;
    let map = MmapRegion::<()>::build(
        Some(FileOffset::new(file, mmap_offset)),
        BAR2_SPARSE.1 as usize,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    )
    .unwrap();
    map.get_slice(0x10, 4)
        .unwrap()
        .copy_from(&[0xdeu8, 0xad, 0xbe, 0xef]);
    let mut got = [0u8; 4];
    client
        .region_read(VFIO_PCI_BAR2_REGION_INDEX, BAR2_SPARSE.0 + 0x10, &mut got)
        .unwrap();
    assert_eq!(got, [0xde, 0xad, 0xbe, 0xef]);

    // IRQ info for every index.
    let counts: Vec<u32> = (0..VFIO_PCI_NUM_IRQS)
        .map(|i| client.get_irq_info(i).unwrap().count)
        .collect();
    assert_eq!(counts, vec![0, 0, MSIX_VECTORS, 1, 1]);
    let msix = client.get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX).unwrap();
    assert_eq!(msix.index, VFIO_PCI_MSIX_IRQ_INDEX);
    assert_ne!(msix.flags & VFIO_IRQ_INFO_EVENTFD, 0);

    // MSI-X eventfds; the backend triggers vector 2.
    let efds: Vec<std::fs::File> = (0..MSIX_VECTORS).map(|_| eventfd()).collect();
    let raw: Vec<i32> = efds.iter().map(AsRawFd::as_raw_fd).collect();
    client
        .set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            MSIX_VECTORS,
            &raw,
        )
        .unwrap();
    assert!(fx.backend().trigger(2));
    assert_eq!(wait_event(&efds[2]), 1);

    // DMA map a memfd; the backend reads guest memory through the mapping.
    let guest = memfd(0x20000);
    guest.write_all_at(b"guest bytes", 0x1000 + 0x80).unwrap();
    client
        .dma_map(0x1000, 0x8000_0000, 0x10000, guest.as_raw_fd())
        .unwrap();
    let mut seen = [0u8; 11];
    assert!(fx.backend().dma_read(0x8000_0080, &mut seen));
    assert_eq!(&seen, b"guest bytes");
    // And through the server's DMA handle, which also writes.
    let dma = fx.server().dma();
    let mut via_handle = [0u8; 11];
    dma.read(0x8000_0080, &mut via_handle).unwrap();
    assert_eq!(&via_handle, b"guest bytes");
    dma.write(0x8000_0100, b"from device").unwrap();
    let mut back = [0u8; 11];
    guest.read_exact_at(&mut back, 0x1000 + 0x100).unwrap();
    assert_eq!(&back, b"from device");
    client.dma_unmap(0x8000_0000, 0x10000).unwrap();
    assert!(fx.backend().dma.is_empty());
    assert!(dma.read(0x8000_0080, &mut via_handle).is_err());

    // Register and config accesses.
    client
        .region_write(VFIO_PCI_BAR0_REGION_INDEX, 0x40, &[1, 2, 3, 4])
        .unwrap();
    let mut reg = [0u8; 4];
    client
        .region_read(VFIO_PCI_BAR0_REGION_INDEX, 0x40, &mut reg)
        .unwrap();
    assert_eq!(reg, [1, 2, 3, 4]);
    let mut id = [0u8; 4];
    client
        .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut id)
        .unwrap();
    assert_eq!(u32::from_le_bytes(id), 0x1234_1af4);

    // A failing read still answers with data (all-ones) and the stream stays in step.
    let mut bad = [0u8; 4];
    client
        .region_read(VFIO_PCI_BAR0_REGION_INDEX, BAR0_FAILING, &mut bad)
        .unwrap();
    assert_eq!(bad, [0xff; 4]);
    client
        .region_read(VFIO_PCI_BAR0_REGION_INDEX, 0x40, &mut reg)
        .unwrap();
    assert_eq!(reg, [1, 2, 3, 4]);
    assert_eq!(fx.server().stats().bad_accesses, 1);

    client.reset().unwrap();
    assert!(fx.calls().contains(&Call::Reset));

    client.shutdown().unwrap();
    drop(client);
    fx.wait_for("disconnect", |f| f.calls().contains(&Call::Disconnected));
    assert_eq!(fx.server().stats().panics, 0);
    assert_eq!(fx.server().stats().errors, 0);
}

#[test]
fn test_client_reconnect_keeps_device_state() {
    let fx = Fixture::new();
    let guest = memfd(0x10000);
    {
        let mut client = Client::new(fx.path()).unwrap();
        client
            .region_write(VFIO_PCI_BAR0_REGION_INDEX, 0x80, &[9, 8, 7, 6])
            .unwrap();
        client
            .region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0x10, &[0, 0, 0, 0xfe])
            .unwrap();
        client
            .dma_map(0, 0x1_0000_0000, 0x10000, guest.as_raw_fd())
            .unwrap();
        client.shutdown().unwrap();
    }
    // Reconnect at once, as Cloud Hypervisor does on restore.
    let mut client = Client::new(fx.path()).unwrap();
    let mut reg = [0u8; 4];
    client
        .region_read(VFIO_PCI_BAR0_REGION_INDEX, 0x80, &mut reg)
        .unwrap();
    assert_eq!(reg, [9, 8, 7, 6]);
    client
        .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0x10, &mut reg)
        .unwrap();
    assert_eq!(reg, [0, 0, 0, 0xfe]);
    let calls = fx.calls();
    // The first client's mapping was released before the device was told it left.
    let unmap = calls
        .iter()
        .position(|c| *c == Call::DmaUnmap(0x1_0000_0000, 0x10000))
        .expect("unmapped on disconnect");
    let gone = calls
        .iter()
        .position(|c| *c == Call::Disconnected)
        .expect("disconnected");
    assert!(unmap < gone);
    assert!(fx.backend().dma.is_empty());
    let stats = fx.server().stats();
    assert_eq!(stats.connections, 2);
    assert_eq!(stats.refused, 0);
    client.shutdown().unwrap();
}

#[test]
fn test_client_second_concurrent_client_refused() {
    let fx = Fixture::new();
    let mut first = Client::new(fx.path()).unwrap();
    // The second client is accepted and closed at once: its negotiation fails cleanly.
    assert!(Client::new(fx.path()).is_err());
    assert_eq!(fx.server().stats().refused, 1);
    let mut reg = [0u8; 4];
    first
        .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut reg)
        .unwrap();
    assert_eq!(u32::from_le_bytes(reg), 0x1234_1af4);
    first.shutdown().unwrap();
}
