//! The interrupt line of a vGPU, injected by whoever hosts the device.

/// Delivers MSI-X vectors of one vGPU. vfio-user writes the client's eventfd; an in-process VMM
/// writes an irqfd; tests count. The device has already applied MSI-X enable, function mask and
/// vector mask when it calls [`InterruptSink::trigger`].
pub trait InterruptSink: Send + Sync {
    /// Raises MSI-X vector `vector`.
    fn trigger(&self, vector: u16);
}

/// An [`InterruptSink`] that drops every interrupt (a vGPU not attached to a VMM yet).
#[derive(Debug, Default)]
pub struct NoInterrupts;

impl InterruptSink for NoInterrupts {
    fn trigger(&self, _vector: u16) {}
}

/// An [`InterruptSink`] that counts interrupts per vector, for tests and the demo.
#[derive(Debug, Default)]
pub struct CountingInterrupts {
    counts: [std::sync::atomic::AtomicU64; vgpu_abi::pci::MSIX_VECTORS as usize],
}

impl CountingInterrupts {
    /// Number of times `vector` was raised.
    pub fn count(&self, vector: u16) -> u64 {
        self.counts
            .get(usize::from(vector))
            .map_or(0, |c| c.load(std::sync::atomic::Ordering::SeqCst))
    }
}

impl InterruptSink for CountingInterrupts {
    fn trigger(&self, vector: u16) {
        if let Some(c) = self.counts.get(usize::from(vector)) {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}
