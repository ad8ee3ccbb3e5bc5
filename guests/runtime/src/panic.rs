//! The panic handler: prints `PANIC: <message> at <file>:<line>` and writes the `PANIC`
//! register; the partition becomes `crashed`.

use core::panic::PanicInfo;

use crate::sysctl;

/// The code written to the `PANIC` register.
pub const PANIC_CODE: u32 = 1;

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    match info.location() {
        Some(loc) => crate::println!("PANIC: {} at {}:{}", info.message(), loc.file(), loc.line()),
        None => crate::println!("PANIC: {}", info.message()),
    }
    sysctl::report_panic(PANIC_CODE);
    sysctl::park()
}
