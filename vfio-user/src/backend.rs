//! What the server asks of a device. The server owns the protocol (framing, validation, version
//! negotiation, DMA bookkeeping, the migration state machine, DMA-logging bitmaps); the backend
//! owns the device. Every value the client sent has been validated before a backend method is
//! called: indexes are in range, accesses lie inside their region, sizes fit the negotiated
//! limits, file descriptors are present where required.

use std::fs::File;
use std::os::fd::RawFd;
use std::sync::Arc;

use vm_memory::MmapRegion;

/// Errors a backend reports; they become error replies (errno) or, for accesses from clients
/// that cannot take error replies, all-ones data.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The request is invalid for the device (EINVAL).
    #[error("Invalid request: {0}")]
    Invalid(String),
    /// The device cannot do this (ENOTSUP).
    #[error("Not supported: {0}")]
    NotSupported(String),
    /// The device is busy (EBUSY).
    #[error("Device busy: {0}")]
    Busy(String),
    /// Any other failure (EIO).
    #[error("I/O error: {0}")]
    Io(String),
}

impl BackendError {
    /// The errno sent to the client.
    pub fn errno(&self) -> i32 {
        match self {
            BackendError::Invalid(_) => libc::EINVAL,
            BackendError::NotSupported(_) => libc::ENOTSUP,
            BackendError::Busy(_) => libc::EBUSY,
            BackendError::Io(_) => libc::EIO,
        }
    }
}

/// `DEVICE_GET_INFO`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `VFIO_DEVICE_FLAGS_*` (PCI, RESET).
    pub flags: u32,
    /// Number of regions (≥ 9 for PCI: BARs 0–5, ROM, config, VGA).
    pub num_regions: u32,
    /// Number of IRQ indexes (5 for PCI: INTx, MSI, MSI-X, ERR, REQ).
    pub num_irqs: u32,
}

/// One region of the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// Size in bytes (0: the region does not exist).
    pub size: u64,
    /// `VFIO_REGION_INFO_FLAG_{READ,WRITE,MMAP}`; the server adds `CAPS` when there are sparse
    /// areas.
    pub flags: u32,
    /// For mappable regions: the file the client mmaps, and the offset of the region in it.
    pub mmap: Option<(RawFd, u64)>,
    /// Mappable areas (offset, size) relative to the region start; empty with `mmap` means the
    /// whole region is mappable.
    pub sparse_areas: Vec<(u64, u64)>,
}

/// One IRQ index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqInfo {
    /// `VFIO_IRQ_INFO_*` flags.
    pub flags: u32,
    /// Number of vectors (0: the index exists but has none, e.g. INTx of an MSI-X-only device).
    pub count: u32,
}

/// A guest RAM range the client mapped for DMA.
#[derive(Clone, Debug)]
pub struct DmaRegion {
    /// Guest-physical (IOVA) start.
    pub iova: u64,
    /// Size in bytes.
    pub size: u64,
    /// The server's mapping of the client's file at the requested offset; `None` for clients
    /// without shared memory (their memory is reachable only through `DMA_READ`/`DMA_WRITE`).
    pub mapping: Option<Arc<MmapRegion>>,
    /// The device may read.
    pub readable: bool,
    /// The device may write.
    pub writable: bool,
}

/// `VFIO_DEVICE_STATE_*` of migration v2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MigState {
    /// Error (0).
    Error,
    /// Stopped (1).
    Stop,
    /// Running (2).
    Running,
    /// Stopped, saving the final state (3).
    StopCopy,
    /// Stopped, loading state (4).
    Resuming,
    /// Running, saving state ahead of stop-copy (6).
    PreCopy,
}

/// The device behind a vfio-user connection.
pub trait Backend: Send {
    /// Device flags and counts.
    fn device_info(&self) -> DeviceInfo;
    /// Region `index` (< `num_regions`).
    fn region_info(&self, index: u32) -> RegionInfo;
    /// IRQ index `index` (< `num_irqs`).
    fn irq_info(&self, index: u32) -> IrqInfo;
    /// Reads `data.len()` bytes at `offset` of region `index`; the range lies inside the region.
    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8])
        -> Result<(), BackendError>;
    /// Writes `data` at `offset` of region `index`; the range lies inside the region.
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), BackendError>;
    /// `SET_IRQS`: `action` is the `VFIO_IRQ_SET_ACTION_*` bit, `fds` holds one eventfd per
    /// vector for `DATA_EVENTFD` (`None`: de-assign — on the wire, a `DATA_EVENTFD` message
    /// without descriptors, which is how QEMU sends fds of -1) and is empty for `DATA_NONE`;
    /// `start + count` lies inside the index. `DATA_BOOL` arrives as one `DATA_NONE` call per
    /// selected vector. `start == count == 0` with `ACTION_TRIGGER` and no fds disables every
    /// vector of the index.
    fn set_irqs(
        &mut self,
        index: u32,
        action: u32,
        start: u32,
        count: u32,
        fds: Vec<Option<File>>,
    ) -> Result<(), BackendError>;
    /// `DMA_MAP`: the range does not overlap a mapped one.
    fn dma_map(&mut self, region: DmaRegion) -> Result<(), BackendError>;
    /// `DMA_UNMAP` of exactly one mapped range (also called for every mapping on unmap-all and
    /// when the client disconnects). Drop the region's mapping before returning.
    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), BackendError>;
    /// `DEVICE_RESET`; on success the server's migration state returns to `Running` (the way
    /// out of `Error`).
    fn reset(&mut self) -> Result<(), BackendError>;

    /// Migration capabilities (`VFIO_MIGRATION_*`); 0 when the device cannot migrate.
    fn migration_flags(&self) -> u64 {
        0
    }
    /// One direct arc of the migration state machine (the server walks multi-step requests arc
    /// by arc and validates them).
    fn migration_transition(&mut self, from: MigState, to: MigState) -> Result<(), BackendError> {
        let _ = (from, to);
        Err(BackendError::NotSupported("migration".into()))
    }
    /// Produces up to `max` bytes of the state stream (in `PreCopy` and `StopCopy`); fewer
    /// bytes than `max` (possibly none) means the end of what is available now.
    fn migration_read(&mut self, max: usize) -> Result<Vec<u8>, BackendError> {
        let _ = max;
        Err(BackendError::NotSupported("migration".into()))
    }
    /// Consumes state-stream bytes (in `Resuming`).
    fn migration_write(&mut self, data: &[u8]) -> Result<(), BackendError> {
        let _ = data;
        Err(BackendError::NotSupported("migration".into()))
    }
    /// Whether the device implements DMA logging (`dma_logging_*`); answers `PROBE` and gates
    /// the `DMA_LOGGING_*` features.
    fn dma_logging_supported(&self) -> bool {
        false
    }
    /// Starts logging device writes to guest RAM in pages of `page_size` over `ranges` (empty:
    /// everything). Ranges are page-aligned, non-empty, sorted and do not overlap.
    fn dma_logging_start(
        &mut self,
        page_size: u64,
        ranges: &[(u64, u64)],
    ) -> Result<(), BackendError> {
        let _ = (page_size, ranges);
        Err(BackendError::NotSupported("DMA logging".into()))
    }
    /// Stops logging.
    fn dma_logging_stop(&mut self) -> Result<(), BackendError> {
        Err(BackendError::NotSupported("DMA logging".into()))
    }
    /// Sets bit n of `bitmap` for each page `iova + n * page_size` the device wrote since the
    /// last report of that page, and forgets those pages. `bitmap` is zeroed and sized
    /// `ceil(pages / 64)` by the server.
    fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), BackendError> {
        let _ = (iova, length, page_size, bitmap);
        Err(BackendError::NotSupported("DMA logging".into()))
    }
    /// The client went away. The server has already unmapped every DMA region (`dma_unmap`) and
    /// stopped DMA logging; drop the client's eventfds here. Device state is kept: a client that
    /// reconnects gets the same device.
    fn disconnected(&mut self) {}
}
