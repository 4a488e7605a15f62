//! Interrupt status, mask and MSI-X delivery of one vGPU. Shared between the MMIO path and the
//! engine workers that raise interrupts.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use vgpu_abi::pci::MSIX_VECTOR_DEVICE;
use vgpu_abi::regs::INTR_DEVICE;
use vgpu_abi::Engine;

use crate::irq::{InterruptSink, NoInterrupts};
use crate::pci::{Msix, MsixControl};

struct Delivery {
    msix: Msix,
    control: MsixControl,
    sink: Arc<dyn InterruptSink>,
    /// The VMM emulates the MSI-X table itself (vfio-user clients do): vectors go straight to
    /// the sink, which applies the VMM's masking.
    external: bool,
}

/// `INTR_STATUS`, `INTR_MASK` and the MSI-X function behind them.
pub struct Interrupts {
    status: AtomicU32,
    mask: AtomicU32,
    delivery: Mutex<Delivery>,
}

impl Default for Interrupts {
    fn default() -> Self {
        Interrupts {
            status: AtomicU32::new(0),
            mask: AtomicU32::new(u32::MAX),
            delivery: Mutex::new(Delivery {
                msix: Msix::new(),
                control: MsixControl::default(),
                sink: Arc::new(NoInterrupts),
                external: false,
            }),
        }
    }
}

/// The MSI-X vectors that status bits `bits` are delivered on, as a bit set over vectors.
fn vectors_of(bits: u32) -> u32 {
    let mut v = 0;
    for e in Engine::ALL {
        if bits & (0xF << (4 * e as u32)) != 0 {
            v |= 1 << e.index();
        }
    }
    if bits & INTR_DEVICE != 0 {
        v |= 1 << MSIX_VECTOR_DEVICE;
    }
    v
}

impl Interrupts {
    fn delivery(&self) -> std::sync::MutexGuard<'_, Delivery> {
        // A panic while holding this lock cannot leave MSI-X state half-updated in a way that
        // matters more than losing interrupts; keep serving.
        self.delivery.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets status bits; raises the vectors of bits that became set and are unmasked.
    pub fn raise(&self, bits: u32) {
        let old = self.status.fetch_or(bits, Ordering::AcqRel);
        let fresh = bits & !old & !self.mask.load(Ordering::Acquire);
        self.deliver(vectors_of(fresh));
    }

    fn deliver(&self, vectors: u32) {
        if vectors == 0 {
            return;
        }
        let mut d = self.delivery();
        let Delivery {
            msix,
            control,
            sink,
            external,
        } = &mut *d;
        for v in 0..16u16 {
            if vectors & (1 << v) == 0 {
                continue;
            }
            if *external {
                sink.trigger(v);
            } else {
                msix.trigger(v, control.enabled, control.function_masked, sink.as_ref());
            }
        }
    }

    /// `INTR_STATUS` value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// `INTR_MASK` value.
    pub fn mask(&self) -> u32 {
        self.mask.load(Ordering::Acquire)
    }

    /// Write-1-to-clear of `INTR_STATUS`.
    pub fn clear(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Writes `INTR_MASK`; set bits that become unmasked are raised.
    pub fn set_mask(&self, mask: u32) {
        let old = self.mask.swap(mask, Ordering::AcqRel);
        let unmasked = old & !mask & self.status.load(Ordering::Acquire);
        self.deliver(vectors_of(unmasked));
    }

    /// Replaces the sink MSI-X messages go to (a VMM attached or detached).
    pub fn set_sink(&self, sink: Arc<dyn InterruptSink>) {
        self.delivery().sink = sink;
    }

    /// Routes vectors straight to the sink (the VMM emulates the MSI-X table and masking, as
    /// vfio-user clients do) or through the device's own MSI-X table (in-process embedding).
    pub fn set_external_msix(&self, external: bool) {
        self.delivery().external = external;
    }

    /// Applies MSI-X enable / function mask from config space.
    pub fn set_control(&self, control: MsixControl) {
        let mut d = self.delivery();
        d.control = control;
        let Delivery {
            msix,
            control,
            sink,
            ..
        } = &mut *d;
        msix.control_changed(control.enabled, control.function_masked, sink.as_ref());
    }

    /// Runs `f` on the MSI-X table with the current control and sink (BAR0 table accesses).
    pub fn with_msix<R>(
        &self,
        f: impl FnOnce(&mut Msix, MsixControl, &dyn InterruptSink) -> R,
    ) -> R {
        let mut d = self.delivery();
        let Delivery {
            msix,
            control,
            sink,
            ..
        } = &mut *d;
        f(msix, *control, sink.as_ref())
    }

    /// Status, mask, MSI-X table state and whether delivery is external (for snapshots).
    pub fn save(&self) -> (u32, u32, crate::pci::MsixState) {
        let msix = self.delivery().msix.state();
        (self.status(), self.mask(), msix)
    }

    /// Restores status, mask and the MSI-X table (validated by `Msix::from_state`). Raises
    /// nothing: a restored pending interrupt is delivered when the guest unmasks or clears it.
    pub fn restore(
        &self,
        status: u32,
        mask: u32,
        msix: &crate::pci::MsixState,
    ) -> Result<(), crate::pci::PciError> {
        let table = Msix::from_state(msix)?;
        self.delivery().msix = table;
        self.status.store(status, Ordering::Release);
        self.mask.store(mask, Ordering::Release);
        Ok(())
    }

    /// Back to reset: status clear, everything masked, MSI-X table reset.
    pub fn reset(&self) {
        self.status.store(0, Ordering::Release);
        self.mask.store(u32::MAX, Ordering::Release);
        self.delivery().msix = Msix::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::CountingInterrupts;
    use vgpu_abi::regs::{intr_error, intr_user, INTR_FLIP_DONE};

    fn armed() -> (Interrupts, Arc<CountingInterrupts>) {
        let i = Interrupts::default();
        let sink = Arc::new(CountingInterrupts::default());
        i.set_sink(sink.clone());
        i.set_control(MsixControl {
            enabled: true,
            function_masked: false,
        });
        i.with_msix(|m, c, s| {
            for v in 0..5u64 {
                // Unmask each vector: control dword at 16*v + 12.
                m.table_write(
                    16 * v + 12,
                    &0u32.to_le_bytes(),
                    c.enabled,
                    c.function_masked,
                    s,
                );
            }
        });
        (i, sink)
    }

    #[test]
    fn test_intr_masked_bit_not_delivered_until_unmasked() {
        let (i, sink) = armed();
        i.raise(intr_user(Engine::Blit));
        assert_eq!(sink.count(1), 0, "masked by reset value");
        i.set_mask(!intr_user(Engine::Blit));
        assert_eq!(sink.count(1), 1, "unmasking a set bit raises it");
        i.raise(intr_user(Engine::Blit));
        assert_eq!(sink.count(1), 1, "already set: no new edge");
        i.clear(intr_user(Engine::Blit));
        i.raise(intr_user(Engine::Blit));
        assert_eq!(sink.count(1), 2);
    }

    #[test]
    fn test_intr_vectors_per_engine_and_device() {
        let (i, sink) = armed();
        i.set_mask(0);
        i.raise(intr_error(Engine::Compute));
        i.raise(INTR_FLIP_DONE);
        assert_eq!(sink.count(3), 1);
        assert_eq!(sink.count(4), 1);
        assert_eq!(sink.count(0), 0);
    }

    #[test]
    fn test_intr_external_msix_bypasses_device_table() {
        let i = Interrupts::default();
        let sink = Arc::new(CountingInterrupts::default());
        i.set_sink(sink.clone());
        i.set_external_msix(true);
        i.set_mask(0);
        i.raise(intr_user(Engine::Video));
        assert_eq!(sink.count(2), 1, "no MSI-X enable or table unmask needed");
    }
}
