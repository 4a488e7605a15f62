//! `vgpud`: the daemon that owns the software physical GPU and serves each vGPU to a VMM over
//! vfio-user, its REST API ([`rest`], with [`metrics`]) and the client `vgpuctl` uses
//! ([`client`]).

pub mod backend;
pub mod client;
pub mod daemon;
pub mod irq;
pub mod metrics;
pub mod migrate;
pub mod model;
pub mod rest;
pub mod vfio_migration;
