//! The guest's reporting devices: the debug console (port 0xE9), the result port (0xF4), and a
//! page of MMIO with an empty handler (the trap-path benchmark's baseline).

use std::sync::atomic::{AtomicU64, Ordering};

use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::DeviceMmio;

use crate::boot_info::{CONSOLE_PORT, RESULT_PORT};

/// Longest console line kept before it is cut.
const MAX_LINE: usize = 4096;
/// Most console bytes kept per run (a chatty or hostile guest cannot exhaust memory).
const MAX_CONSOLE: usize = 1 << 20;

/// Console and result port.
pub struct DebugPorts {
    name: String,
    echo: bool,
    line: Vec<u8>,
    console: String,
}

impl DebugPorts {
    /// Ports of VM `name`; with `echo`, console lines are printed as they complete.
    pub fn new(name: &str, echo: bool) -> Self {
        DebugPorts {
            name: name.into(),
            echo,
            line: Vec::new(),
            console: String::new(),
        }
    }

    /// Whether `port` is one of these ports.
    pub fn owns(port: u16) -> bool {
        port == CONSOLE_PORT || port == RESULT_PORT
    }

    /// A port write; returns the result code when the guest reports one.
    pub fn write(&mut self, port: u16, data: &[u8]) -> Option<u32> {
        match port {
            CONSOLE_PORT => {
                for &b in data {
                    if b == b'\n' || self.line.len() >= MAX_LINE {
                        self.flush();
                    }
                    if b != b'\n' {
                        self.line.push(b);
                    }
                }
                None
            }
            RESULT_PORT => <[u8; 4]>::try_from(data).ok().map(u32::from_le_bytes),
            _ => None,
        }
    }

    fn flush(&mut self) {
        let text = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        if self.echo {
            println!("[{}] {}", self.name, text);
        }
        if self.console.len() + text.len() < MAX_CONSOLE {
            self.console.push_str(&text);
            self.console.push('\n');
        }
    }

    /// Everything the guest printed (a last unterminated line included).
    pub fn take_console(&mut self) -> String {
        if !self.line.is_empty() {
            self.flush();
        }
        std::mem::take(&mut self.console)
    }
}

/// MMIO that completes every access without doing anything; reads return 0.
#[derive(Debug, Default)]
pub struct NullMmio {
    accesses: AtomicU64,
}

impl NullMmio {
    /// Accesses so far.
    pub fn accesses(&self) -> u64 {
        self.accesses.load(Ordering::Relaxed)
    }
}

impl DeviceMmio for NullMmio {
    fn mmio_read(&self, _base: MmioAddress, _offset: MmioAddressOffset, data: &mut [u8]) {
        self.accesses.fetch_add(1, Ordering::Relaxed);
        data.fill(0);
    }

    fn mmio_write(&self, _base: MmioAddress, _offset: MmioAddressOffset, _data: &[u8]) {
        self.accesses.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_debug_ports_collect_lines_and_result() {
        let mut d = DebugPorts::new("t", false);
        assert_eq!(d.write(CONSOLE_PORT, b"hel"), None);
        assert_eq!(d.write(CONSOLE_PORT, b"lo\nwor"), None);
        assert_eq!(d.write(RESULT_PORT, &0x600Du32.to_le_bytes()), Some(0x600D));
        assert_eq!(d.write(RESULT_PORT, &[1, 2]), None, "short write ignored");
        assert_eq!(d.take_console(), "hello\nwor\n");
    }

    #[test]
    fn test_debug_ports_long_line_is_cut() {
        let mut d = DebugPorts::new("t", false);
        d.write(CONSOLE_PORT, &vec![b'x'; MAX_LINE + 10]);
        let c = d.take_console();
        assert_eq!(c.lines().count(), 2);
    }
}
