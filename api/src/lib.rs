//! `vgpud`: the daemon that owns the software physical GPU and serves each vGPU to a VMM over
//! vfio-user; later also its REST API and the `vgpuctl` CLI.

pub mod backend;
pub mod daemon;
pub mod irq;
