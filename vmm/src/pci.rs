//! PCI bus 0 behind configuration mechanism #1: the address port 0xCF8 and the data ports
//! 0xCFC–0xCFF. Device 0 is a host bridge; devices 1.. are the functions the VMM attached.
//! Other buses, functions and devices read all-ones (absent).

use std::sync::{Arc, Mutex, PoisonError};

use crate::boot_info::{PCI_CONFIG_ADDRESS, PCI_CONFIG_DATA};

/// Where a function's BARs decode now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BarDecode {
    /// BAR0 (registers, MSI-X, GGTT window), while memory decoding is on.
    pub regs: Option<u64>,
    /// BAR2 (the aperture), while memory decoding is on.
    pub aperture: Option<u64>,
}

/// A PCI function on the bus: its config space. BAR and MSI-X side effects of config writes
/// are the function's own; the bus asks where BARs decode after each write.
pub trait PciFunction: Send {
    /// Reads config space at `offset` (1, 2 or 4 bytes).
    fn config_read(&mut self, offset: u16, data: &mut [u8]);
    /// Writes config space at `offset` (1, 2 or 4 bytes).
    fn config_write(&mut self, offset: u16, data: &[u8]);
    /// Where BAR0 and BAR2 decode now.
    fn decode(&self) -> BarDecode;
}

/// Host bridge identity (the PCIe host bridge ID QEMU uses).
const HOST_BRIDGE_ID: u32 = 0x0008_1b36;
/// Class code 0x060000 (bridge, host bridge), revision 0.
const HOST_BRIDGE_CLASS: u32 = 0x0600_0000;

/// Config mechanism #1 and the functions of bus 0.
pub struct PciRoot {
    address: u32,
    functions: Vec<Arc<Mutex<dyn PciFunction>>>,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// A bus with only the host bridge.
    pub fn new() -> Self {
        PciRoot {
            address: 0,
            functions: Vec::new(),
        }
    }

    /// Attaches `f` as the next device; returns its device number.
    pub fn add(&mut self, f: Arc<Mutex<dyn PciFunction>>) -> usize {
        self.functions.push(f);
        self.functions.len()
    }

    /// The function at device number `dev` (1..).
    pub fn function(&self, dev: usize) -> Option<&Arc<Mutex<dyn PciFunction>>> {
        self.functions.get(dev.checked_sub(1)?)
    }

    /// Whether `port` belongs to the config mechanism.
    pub fn owns(port: u16) -> bool {
        (PCI_CONFIG_ADDRESS..PCI_CONFIG_ADDRESS + 4).contains(&port)
            || (PCI_CONFIG_DATA..PCI_CONFIG_DATA + 4).contains(&port)
    }

    /// The (device, register offset) the data port at `port` addresses, if enabled and on bus 0
    /// function 0.
    fn target(&self, port: u16, len: usize) -> Option<(usize, u16)> {
        let a = self.address;
        let byte = port.checked_sub(PCI_CONFIG_DATA)?;
        let bus = (a >> 16) & 0xFF;
        let func = (a >> 8) & 0x7;
        if a & 0x8000_0000 == 0 || bus != 0 || func != 0 {
            return None;
        }
        let offset = u16::try_from(a & 0xFC).ok()? + byte;
        if !matches!(len, 1 | 2 | 4) || usize::from(offset) % len != 0 {
            return None;
        }
        Some((usize::try_from((a >> 11) & 0x1F).ok()?, offset))
    }

    /// A port read.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        data.fill(0xFF);
        if port == PCI_CONFIG_ADDRESS && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
            return;
        }
        let Some((dev, offset)) = self.target(port, data.len()) else {
            return;
        };
        if dev == 0 {
            let dw = match offset & !3 {
                0x00 => HOST_BRIDGE_ID,
                0x08 => HOST_BRIDGE_CLASS,
                _ => 0,
            };
            let b = dw.to_le_bytes();
            let at = usize::from(offset & 3);
            data.copy_from_slice(&b[at..at + data.len()]);
        } else if let Some(f) = self.function(dev) {
            f.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .config_read(offset, data);
        }
    }

    /// A port write. Returns the device number whose config space was written.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) -> Option<usize> {
        if port == PCI_CONFIG_ADDRESS {
            if let Ok(b) = <[u8; 4]>::try_from(data) {
                self.address = u32::from_le_bytes(b);
            }
            return None;
        }
        let (dev, offset) = self.target(port, data.len())?;
        let f = self.function(dev)?;
        f.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .config_write(offset, data);
        Some(dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Regs([u8; 256], Vec<(u16, usize)>);

    impl Default for Regs {
        fn default() -> Self {
            Regs([0; 256], Vec::new())
        }
    }

    impl PciFunction for Regs {
        fn config_read(&mut self, offset: u16, data: &mut [u8]) {
            let o = usize::from(offset);
            data.copy_from_slice(&self.0[o..o + data.len()]);
        }
        fn config_write(&mut self, offset: u16, data: &[u8]) {
            let o = usize::from(offset);
            self.0[o..o + data.len()].copy_from_slice(data);
            self.1.push((offset, data.len()));
        }
        fn decode(&self) -> BarDecode {
            BarDecode::default()
        }
    }

    fn read32(bus: &mut PciRoot, dev: u32, off: u32) -> u32 {
        bus.pio_write(0xCF8, &(0x8000_0000 | dev << 11 | off).to_le_bytes());
        let mut b = [0u8; 4];
        bus.pio_read(0xCFC, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn test_pci_root_enumerates_bridge_and_devices() {
        let mut bus = PciRoot::new();
        let f = Arc::new(Mutex::new(Regs::default()));
        f.lock().unwrap().0[0..4].copy_from_slice(&0x6770_1de5u32.to_le_bytes());
        assert_eq!(bus.add(f.clone()), 1);
        assert_eq!(read32(&mut bus, 0, 0), HOST_BRIDGE_ID);
        assert_eq!(read32(&mut bus, 0, 8) >> 8, 0x06_0000);
        assert_eq!(read32(&mut bus, 1, 0), 0x6770_1de5);
        assert_eq!(read32(&mut bus, 2, 0), u32::MAX, "absent device");
    }

    #[test]
    fn test_pci_root_sub_dword_access_and_bad_targets() {
        let mut bus = PciRoot::new();
        let f = Arc::new(Mutex::new(Regs::default()));
        bus.add(f.clone());
        bus.pio_write(0xCF8, &(0x8000_0000u32 | 1 << 11 | 0x40).to_le_bytes());
        assert_eq!(bus.pio_write(0xCFE, &0xBEEFu16.to_le_bytes()), Some(1));
        assert_eq!(f.lock().unwrap().1, vec![(0x42, 2)]);
        let mut b = [0u8; 1];
        bus.pio_read(0xCFF, &mut b);
        assert_eq!(b[0], 0xBE);
        // Unaligned, other bus, disabled: dropped.
        assert_eq!(bus.pio_write(0xCFD, &[1, 2]), None);
        bus.pio_write(0xCF8, &(0x8001_0000u32 | 1 << 11).to_le_bytes());
        assert_eq!(bus.pio_write(0xCFC, &[0; 4]), None);
        bus.pio_write(0xCF8, &(1u32 << 11).to_le_bytes());
        assert_eq!(bus.pio_write(0xCFC, &[0; 4]), None);
    }
}
