//! MSI-X delivery to a vfio-user client: one eventfd per vector, set with `SET_IRQS`. The client
//! emulates the MSI-X table; it masks and unmasks vectors with `SET_IRQS` `ACTION_MASK` /
//! `ACTION_UNMASK`, and the device keeps a pending bit for masked vectors.

use std::fs::File;
use std::io::Write;
use std::sync::{Mutex, PoisonError};

use vgpu_abi::pci::MSIX_VECTORS;
use vgpu_device::irq::InterruptSink;

const N: usize = MSIX_VECTORS as usize;

#[derive(Default)]
struct Vectors {
    fds: [Option<File>; N],
    masked: [bool; N],
    pending: [bool; N],
    delivered: [u64; N],
}

/// Eventfds of the MSI-X vectors of one vGPU.
#[derive(Default)]
pub struct EventFdSink {
    v: Mutex<Vectors>,
}

impl EventFdSink {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vectors> {
        self.v.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Assigns (or with `None`, removes) the eventfds of vectors `start..start + fds.len()`.
    pub fn set_fds(&self, start: usize, fds: Vec<Option<File>>) {
        let mut v = self.lock();
        for (i, fd) in fds.into_iter().enumerate() {
            if let Some(slot) = v.fds.get_mut(start + i) {
                *slot = fd;
            }
        }
    }

    /// Removes every eventfd (MSI-X disabled, or the client went away).
    pub fn clear(&self) {
        *self.lock() = Vectors::default();
    }

    /// Masks or unmasks vectors `start..start + count`; unmasking delivers pending ones.
    pub fn set_masked(&self, start: usize, count: usize, masked: bool) {
        let mut v = self.lock();
        for i in start..(start + count).min(N) {
            v.masked[i] = masked;
            if !masked && v.pending[i] {
                v.pending[i] = false;
                Self::signal(&mut v, i);
            }
        }
    }

    /// Vectors delivered so far, per vector.
    pub fn delivered(&self) -> [u64; N] {
        self.lock().delivered
    }

    fn signal(v: &mut Vectors, i: usize) {
        if let Some(f) = v.fds[i].as_mut() {
            // An eventfd write of 1 increments its counter; EAGAIN (counter full) still means
            // the client has an event pending, which is all MSI-X needs.
            if let Err(e) = f.write_all(&1u64.to_ne_bytes()) {
                tracing::debug!(vector = i, error = %e, "eventfd write failed");
            }
            v.delivered[i] += 1;
        }
    }
}

impl InterruptSink for EventFdSink {
    fn trigger(&self, vector: u16) {
        let i = usize::from(vector);
        let mut v = self.lock();
        if i >= N {
            return;
        }
        if v.masked[i] {
            v.pending[i] = true;
        } else {
            Self::signal(&mut v, i);
        }
    }
}
