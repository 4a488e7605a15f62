//! A vfio-user protocol server (spec: QEMU `docs/interop/vfio-user.rst`).
//!
//! Transport only: it listens on a unix socket, frames and validates every message, passes file
//! descriptors, negotiates the version and limits, keeps the DMA map, runs the migration v2
//! state machine and the DMA-logging bitmaps, and calls a [`Backend`] for everything that is the
//! device's business. Unknown commands get an error reply after their payload is consumed;
//! a client that disconnects leaves the device as it was, and a reconnecting client (Cloud
//! Hypervisor does so on restore) gets the same device.

pub mod backend;

pub use backend::{Backend, BackendError, DeviceInfo, DmaRegion, IrqInfo, MigState, RegionInfo};
