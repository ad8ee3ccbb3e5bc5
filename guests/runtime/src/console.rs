//! The console: the monitor's 16550 UART through its MMIO door at `0xD000_0000`.
//!
//! Ring-3 code cannot use the UART's I/O ports (entering ring 3 clears IOPL here), so
//! everything, including the ring-0 fault handlers, writes the transmit holding register
//! through MMIO. The monitor's UART never backs up, so the line status register is not
//! polled: each byte is exactly one VM exit.

use core::fmt;

/// Guest-physical (= virtual) address of the console UART (register shift 0).
pub const CONSOLE_BASE: usize = 0xD000_0000;

/// A `core::fmt::Write` sink for the console. Zero-sized; any number may exist.
#[derive(Clone, Copy, Debug, Default)]
pub struct Console;

impl Console {
    /// Sends one byte.
    pub fn write_byte(&mut self, byte: u8) {
        // SAFETY: offset 0 of the identity-mapped console MMIO window is the UART's THR;
        // the store only reaches the monitor.
        unsafe { core::ptr::write_volatile(CONSOLE_BASE as *mut u8, byte) }
    }

    /// Sends raw bytes.
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_byte(b);
        }
    }
}

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    // Console::write_str never fails.
    let _ = fmt::Write::write_fmt(&mut Console, args);
}

/// Prints to the console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::_print(format_args!($($arg)*)) };
}

/// Prints a line to the console.
#[macro_export]
macro_rules! println {
    () => { $crate::console::_print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::console::_print(format_args!("{}\n", format_args!($($arg)*))) };
}
