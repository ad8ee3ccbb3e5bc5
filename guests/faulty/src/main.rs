//! The `faulty` test firmware: a banner `duplex faulty: cmdline="..."`, two heartbeats
//! (`faulty heartbeat N`, 100 ms apart unless `heartbeat_ms=N`), then the ending the command
//! line asks for with `fault=`:
//!
//! | `fault=` | what happens | monitor sees |
//! |---|---|---|
//! | `pf` (default) | ring-3 write above the 4 GiB identity map | fault report, vector 14 |
//! | `ud` | `ud2` | fault report, vector 6 |
//! | `gp` | ring-3 read of a non-canonical address | fault report, vector 13 |
//! | `triple` | ring-0 hook: zero-limit IDT, then an exception | triple fault (shutdown) |
//! | `panic` | a Rust panic | `PANIC` register |
//! | `exit:N` | clean power-off | `POWER_OFF` with status N |
//! | `reboot` | reboot request | `REBOOT` register |

#![no_std]
#![no_main]

use duplex_runtime::heartbeat::{self, Heartbeat};
use duplex_runtime::{bootinfo, println, BootInfo};

duplex_runtime::entry!(main);

/// The first address the runtime's page tables do not map.
const UNMAPPED: u64 = 0x1_0000_0000;
/// A non-canonical address: any access raises #GP.
const NON_CANONICAL: u64 = 0x8000_0000_0000_0000;

fn main(boot: &BootInfo) -> ! {
    println!("duplex faulty: cmdline=\"{}\"", boot.cmdline);
    let mut beats = Heartbeat::new("faulty", heartbeat::period_ms(boot, 100));
    beats.beat();
    beats.beat();
    let fault = boot.arg("fault").unwrap_or("pf");
    println!("faulty: fault={fault}");
    match fault {
        "pf" => {
            // SAFETY: deliberately invalid: nothing is mapped at 4 GiB, so this write
            // page-faults, and the fault handler never returns here.
            unsafe { core::ptr::write_volatile(UNMAPPED as *mut u64, 0xdead_beef) };
        }
        "ud" => {
            // SAFETY: `ud2` raises #UD; the fault handler never returns here.
            unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
        }
        "gp" => {
            // SAFETY: deliberately invalid: the address is non-canonical, so this read
            // raises #GP, and the fault handler never returns here.
            unsafe { core::ptr::read_volatile(NON_CANONICAL as *const u64) };
        }
        "triple" => duplex_runtime::triple_fault(),
        "panic" => panic!("faulty: panic requested on the command line"),
        "reboot" => duplex_runtime::reboot(),
        other => match other.strip_prefix("exit:").map(bootinfo::parse_u64) {
            Some(Some(status)) => match u32::try_from(status) {
                Ok(status) => duplex_runtime::power_off(status),
                Err(_) => panic!("faulty: exit status {status} does not fit in 32 bits"),
            },
            Some(None) => panic!("faulty: bad exit status in fault={other}"),
            None => panic!("faulty: unknown fault={other}"),
        },
    }
    panic!("faulty: fault={fault} did not fault");
}
