//! The debug console (port 0xE9) and the result port.

use core::fmt;

use crate::boot_info::{CONSOLE_PORT, RESULT_EXCEPTION, RESULT_FAIL, RESULT_PORT};
use crate::cpu;

/// Writes formatted text to the VMM's console.
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            cpu::outb(CONSOLE_PORT, b);
        }
        Ok(())
    }
}

/// Prints to the debug console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::console::Console, format_args!($($arg)*));
    }};
}

/// Prints a line to the debug console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        $crate::print!($($arg)*);
        $crate::print!("\n");
    }};
}

/// Reports `code` to the VMM, which ends the run; never returns.
pub fn report(code: u32) -> ! {
    cpu::outl(RESULT_PORT, code);
    cpu::halt_forever()
}

/// Reports failure of check `step` after printing why.
pub fn fail(step: u32, why: fmt::Arguments<'_>) -> ! {
    println!("FAIL (step {:#x}): {}", step, why);
    report(RESULT_FAIL | step)
}

/// Called from the exception stub: reports CPU exception `vector` (never returns).
#[no_mangle]
pub extern "C" fn guest_exception(vector: u64, rip: u64) -> ! {
    println!("CPU exception {} at rip {:#x}", vector, rip);
    report(RESULT_EXCEPTION | u32::try_from(vector & 0xFF).unwrap_or(0xFF))
}
