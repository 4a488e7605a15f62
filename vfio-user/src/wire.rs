//! The vfio-user wire format: the message header, command numbers and the `#[repr(C)]` payload
//! structures (host byte order), kernel VFIO structures where the protocol reuses them.
//!
//! Every structure here is plain integers without padding, so any byte pattern is a valid
//! value; [`read_struct`] copies one out of a byte slice (no alignment requirement).

use std::mem::size_of;

use vfio_bindings::bindings::vfio::{
    vfio_info_cap_header, vfio_irq_info, vfio_region_info, vfio_region_sparse_mmap_area,
};
use vm_memory::ByteValued;

/// Size of the message header.
pub const HEADER_SIZE: usize = size_of::<Header>();

/// Flags: the message-type field.
pub const FLAGS_TYPE_MASK: u32 = 0xf;
/// Message type: a command.
pub const TYPE_COMMAND: u32 = 0;
/// Message type: a reply.
pub const TYPE_REPLY: u32 = 1;
/// Flags: the sender wants no reply.
pub const FLAG_NO_REPLY: u32 = 1 << 4;
/// Flags: the reply reports an error (`Header::error` holds the errno).
pub const FLAG_ERROR: u32 = 1 << 5;

/// Command numbers.
pub mod command {
    /// Version and capability negotiation.
    pub const VERSION: u16 = 1;
    /// Map client memory for DMA.
    pub const DMA_MAP: u16 = 2;
    /// Unmap client memory.
    pub const DMA_UNMAP: u16 = 3;
    /// Device flags and counts.
    pub const DEVICE_GET_INFO: u16 = 4;
    /// One region's description.
    pub const DEVICE_GET_REGION_INFO: u16 = 5;
    /// ioeventfd/ioregionfd sub-regions of a region.
    pub const DEVICE_GET_REGION_IO_FDS: u16 = 6;
    /// One IRQ index's description.
    pub const DEVICE_GET_IRQ_INFO: u16 = 7;
    /// Configure interrupts.
    pub const DEVICE_SET_IRQS: u16 = 8;
    /// Read from a region.
    pub const REGION_READ: u16 = 9;
    /// Write to a region.
    pub const REGION_WRITE: u16 = 10;
    /// Server → client: read client memory.
    pub const DMA_READ: u16 = 11;
    /// Server → client: write client memory.
    pub const DMA_WRITE: u16 = 12;
    /// Reset the device.
    pub const DEVICE_RESET: u16 = 13;
    /// Retired (dirty pages of the first migration protocol).
    pub const DIRTY_PAGES: u16 = 14;
    /// Several small region writes in one message.
    pub const REGION_WRITE_MULTI: u16 = 15;
    /// Get/set/probe a device feature (migration, DMA logging).
    pub const DEVICE_FEATURE: u16 = 16;
    /// Read migration data.
    pub const MIG_DATA_READ: u16 = 17;
    /// Write migration data.
    pub const MIG_DATA_WRITE: u16 = 18;
}

/// `DMA_MAP` flag: the device may read.
pub const DMA_MAP_FLAG_READ: u32 = 1;
/// `DMA_MAP` flag: the device may write.
pub const DMA_MAP_FLAG_WRITE: u32 = 2;
/// `DMA_UNMAP` flag of the old protocol (dirty bitmap on unmap); rejected.
pub const DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = 1;
/// `DMA_UNMAP` flag: unmap everything (the kernel's `VFIO_DMA_UNMAP_FLAG_ALL`).
pub const DMA_UNMAP_FLAG_ALL: u32 = 2;

/// The 16-byte header in front of every message.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Chosen by the sender, echoed in the reply.
    pub msg_id: u16,
    /// Command number.
    pub command: u16,
    /// Size of the whole message, header included.
    pub message_size: u32,
    /// Type, `NO_REPLY` and `ERROR` bits.
    pub flags: u32,
    /// errno of an error reply.
    pub error: u32,
}

impl Header {
    /// The message type (`TYPE_COMMAND`, `TYPE_REPLY`, …).
    pub fn msg_type(&self) -> u32 {
        self.flags & FLAGS_TYPE_MASK
    }

    /// Whether the sender asked for no reply.
    pub fn no_reply(&self) -> bool {
        self.flags & FLAG_NO_REPLY != 0
    }
}

/// `VERSION` payload before the JSON capabilities.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Version {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
}

/// `DMA_MAP` payload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmaMap {
    /// Size of this structure.
    pub argsz: u32,
    /// `DMA_MAP_FLAG_*`.
    pub flags: u32,
    /// Offset into the file descriptor sent with the message.
    pub offset: u64,
    /// DMA (guest-physical) address.
    pub address: u64,
    /// Size in bytes.
    pub size: u64,
}

/// `DMA_UNMAP` payload, and its reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmaUnmap {
    /// Largest reply payload the client accepts.
    pub argsz: u32,
    /// 0 or `DMA_UNMAP_FLAG_ALL`.
    pub flags: u32,
    /// DMA address of the mapping.
    pub address: u64,
    /// Size of the mapping.
    pub size: u64,
}

/// `DEVICE_GET_INFO` payload (request and reply).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Request: largest reply payload; reply: size of the full reply payload.
    pub argsz: u32,
    /// `VFIO_DEVICE_FLAGS_*`.
    pub flags: u32,
    /// Number of regions.
    pub num_regions: u32,
    /// Number of IRQ indexes.
    pub num_irqs: u32,
}

/// `DEVICE_GET_REGION_INFO` payload: the kernel's `struct vfio_region_info`.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RegionInfo(pub vfio_region_info);

/// The kernel's `struct vfio_info_cap_header` in front of each region capability.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CapHeader(pub vfio_info_cap_header);

/// The fixed part of the sparse-mmap capability after its [`CapHeader`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SparseMmap {
    /// Number of areas that follow.
    pub nr_areas: u32,
    /// Zero.
    pub reserved: u32,
}

/// One sparse-mmap area: the kernel's `struct vfio_region_sparse_mmap_area`.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SparseArea(pub vfio_region_sparse_mmap_area);

/// `DEVICE_GET_REGION_IO_FDS` payload (request and reply without sub-regions).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionIoFds {
    /// Largest reply payload / size of the full reply payload.
    pub argsz: u32,
    /// Zero.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Number of sub-regions that follow.
    pub count: u32,
}

/// `DEVICE_GET_IRQ_INFO` payload: the kernel's `struct vfio_irq_info`.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IrqInfo(pub vfio_irq_info);

/// `DEVICE_SET_IRQS` payload before the optional data (the kernel's `struct vfio_irq_set`
/// without its flexible array).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqSet {
    /// Size of the payload including data.
    pub argsz: u32,
    /// One `VFIO_IRQ_SET_DATA_*` and one `VFIO_IRQ_SET_ACTION_*` bit.
    pub flags: u32,
    /// IRQ index.
    pub index: u32,
    /// First vector.
    pub start: u32,
    /// Number of vectors.
    pub count: u32,
}

/// `REGION_READ`/`REGION_WRITE` payload before the data.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionAccess {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Number of bytes.
    pub count: u32,
}

/// `REGION_WRITE_MULTI` payload header (and its reply).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteMulti {
    /// Number of writes that follow (reply: number completed).
    pub wr_cnt: u64,
}

/// One write of `REGION_WRITE_MULTI`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteOne {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Number of bytes (≤ 8).
    pub count: u32,
    /// The bytes.
    pub data: [u8; 8],
}

/// `DMA_READ`/`DMA_WRITE` payload before the data, as the spec defines it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmaAccess {
    /// DMA address.
    pub address: u64,
    /// Number of bytes.
    pub count: u64,
}

/// `DEVICE_FEATURE` payload before the feature data (`struct vfio_device_feature`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Feature {
    /// Largest reply payload / size of the full reply payload.
    pub argsz: u32,
    /// Feature index (bits 0–15), `GET`, `SET`, `PROBE`.
    pub flags: u32,
}

/// Data of `VFIO_DEVICE_FEATURE_MIGRATION`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigrationFeature {
    /// `VFIO_MIGRATION_*`.
    pub flags: u64,
}

/// Data of `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigDeviceState {
    /// `VFIO_DEVICE_STATE_*`.
    pub device_state: u32,
    /// Unused in vfio-user.
    pub data_fd: u32,
}

/// `MIG_DATA_READ`/`MIG_DATA_WRITE` payload before the data.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigData {
    /// Largest reply payload / size of the full reply payload.
    pub argsz: u32,
    /// Bytes requested or carried.
    pub size: u32,
}

/// Data of `DMA_LOGGING_START` before the ranges.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoggingControl {
    /// Tracking granularity.
    pub page_size: u64,
    /// Number of ranges that follow (0: everything).
    pub num_ranges: u32,
    /// Zero.
    pub reserved: u32,
}

/// One range of `DMA_LOGGING_START`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoggingRange {
    /// Start.
    pub iova: u64,
    /// Length.
    pub length: u64,
}

/// Data of `DMA_LOGGING_REPORT` (the reply appends the bitmap).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoggingReport {
    /// Start.
    pub iova: u64,
    /// Length.
    pub length: u64,
    /// Granularity of the bitmap.
    pub page_size: u64,
}

// SAFETY (for every impl below): each type is `#[repr(C)]` (or a transparent wrapper of a
// bindgen `#[repr(C)]` struct) made only of integers and integer arrays, laid out without
// padding, so every byte pattern is a valid value.
macro_rules! byte_valued {
    ($($t:ty),* $(,)?) => {
        $(
            // SAFETY: see above.
            unsafe impl ByteValued for $t {}
        )*
    };
}

byte_valued!(
    Header,
    Version,
    DmaMap,
    DmaUnmap,
    DeviceInfo,
    RegionInfo,
    CapHeader,
    SparseMmap,
    SparseArea,
    RegionIoFds,
    IrqInfo,
    IrqSet,
    RegionAccess,
    WriteMulti,
    WriteOne,
    DmaAccess,
    Feature,
    MigrationFeature,
    MigDeviceState,
    MigData,
    LoggingControl,
    LoggingRange,
    LoggingReport,
);

/// `size_of::<T>()` as a wire `u32` (every wire structure is far below 4 GiB).
pub fn wire_size<T>() -> u32 {
    u32::try_from(size_of::<T>()).unwrap_or(u32::MAX)
}

/// Copies a `T` out of the start of `bytes`; `None` when `bytes` is too short.
pub fn read_struct<T: ByteValued + Default>(bytes: &[u8]) -> Option<T> {
    let mut value = T::default();
    let dst = value.as_mut_slice();
    dst.copy_from_slice(bytes.get(..dst.len())?);
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_wire_sizes_match_spec() {
        assert_eq!(size_of::<Header>(), 16);
        assert_eq!(size_of::<Version>(), 4);
        assert_eq!(size_of::<DmaMap>(), 32);
        assert_eq!(size_of::<DmaUnmap>(), 24);
        assert_eq!(size_of::<DeviceInfo>(), 16);
        assert_eq!(size_of::<RegionInfo>(), 32);
        assert_eq!(size_of::<CapHeader>(), 8);
        assert_eq!(size_of::<SparseMmap>(), 8);
        assert_eq!(size_of::<SparseArea>(), 16);
        assert_eq!(size_of::<RegionIoFds>(), 16);
        assert_eq!(size_of::<IrqInfo>(), 16);
        assert_eq!(size_of::<IrqSet>(), 20);
        assert_eq!(size_of::<RegionAccess>(), 16);
        assert_eq!(size_of::<WriteMulti>(), 8);
        assert_eq!(size_of::<WriteOne>(), 24);
        assert_eq!(size_of::<DmaAccess>(), 16);
        assert_eq!(size_of::<Feature>(), 8);
        assert_eq!(size_of::<MigrationFeature>(), 8);
        assert_eq!(size_of::<MigDeviceState>(), 8);
        assert_eq!(size_of::<MigData>(), 8);
        assert_eq!(size_of::<LoggingControl>(), 16);
        assert_eq!(size_of::<LoggingRange>(), 16);
        assert_eq!(size_of::<LoggingReport>(), 24);
    }

    #[test]
    fn test_read_struct_short_input_none() {
        assert!(read_struct::<Header>(&[0u8; 15]).is_none());
        let h = read_struct::<Header>(&[1, 0, 2, 0, 16, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9]);
        assert_eq!(
            h,
            Some(Header {
                msg_id: 1,
                command: 2,
                message_size: 16,
                flags: 1,
                error: 0
            })
        );
    }
}
