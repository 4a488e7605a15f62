//! A vfio-user protocol server (spec: QEMU `docs/interop/vfio-user.rst`).
//!
//! Transport only: it listens on a unix socket, frames and validates every message, passes file
//! descriptors, negotiates the version and limits, keeps the DMA map, runs the migration v2
//! state machine and the DMA-logging bitmaps, and calls a [`Backend`] for everything that is the
//! device's business. Unknown commands get an error reply after their payload is consumed;
//! a client that disconnects leaves the device as it was, and a reconnecting client (Cloud
//! Hypervisor does so on restore) gets the same device.
//!
//! ```no_run
//! use std::sync::{Arc, Mutex};
//! use vgpu_vfio_user::{Backend, Server};
//!
//! fn serve(device: Arc<Mutex<dyn Backend>>) -> Result<(), vgpu_vfio_user::Error> {
//! let server = Server::start("/run/vgpu/0.sock", device)?;
//! let dma = server.dma(); // reads/writes client memory for the device
//! // …
//! server.shutdown();
//! Ok(())
//! }
//! ```
//!
//! The backend is shared as `Arc<Mutex<dyn Backend>>` and locked once per command. One client
//! is served at a time, by one thread that reads and executes its commands in order (no thread
//! hop on the MMIO path); a second concurrent client is closed at once. Server-to-client
//! `DMA_READ`/`DMA_WRITE` go through [`DmaHandle`], usable from any thread.
//!
//! Client compatibility (exercised by the tests): Cloud Hypervisor's `vfio_user::Client`
//! (VERSION 0.1; it never checks the error bit, so region accesses are always answered with
//! data — all-ones for bad ones) and QEMU ≥ 10.1 (VERSION 0.0, posted writes,
//! `REGION_WRITE_MULTI`, fd-less DMA through [`DmaRwLayout::Qemu`]).

mod access;
pub mod backend;
mod connection;
mod device;
mod dma;
mod error;
mod message;
mod migration;
mod server;
mod stats;
mod version;
pub mod wire;

pub use backend::{Backend, BackendError, DeviceInfo, DmaRegion, IrqInfo, MigState, RegionInfo};
pub use dma::{DmaHandle, DmaRwLayout};
pub use error::Error;
pub use message::MAX_MSG_FDS;
pub use server::{Server, ServerConfig};
pub use stats::ServerStats;
