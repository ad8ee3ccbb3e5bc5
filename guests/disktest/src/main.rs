//! The `disktest` test firmware: the monitor's tests of the virtio-blk disk and of disks in
//! snapshot sets use it.
//!
//! The disk holds a header in its first 4 KiB block (`DXDISK01`, the boot count, the number
//! of data blocks written) and data block `i` (1-based, 4 KiB each) filled with
//! [`pattern`]`(i)`. At each boot it reads the header, counts the boot, checks every data
//! block the header lists and prints
//!
//! ```text
//! disktest: boot <B> blocks <N> verified
//! ```
//!
//! (or `disktest: CORRUPT block <i>`), then writes the next data blocks one at a time — the
//! block, a flush, the header, a flush — printing `disktest: wrote <N>` after each, until
//! `disktest.blocks=<M>` (default 64) are written; then it idles. The count is also kept in
//! memory, so a snapshot carries it: when the guest notices a restore (its time bias
//! changed, `docs/guest-abi.md`) it checks that the disk holds exactly what memory says —
//! blocks 1..=N intact and block N+1 never written — and prints
//! `disktest: restored blocks <N> verified` (or `disktest: MISMATCH ...`).
//! `disktest.delay_ms=<D>` (default 20) paces the writes; `disktest.burst=<K>` (default 1)
//! writes K blocks before each flush (the benchmark fills a disk that way).

#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use duplex_runtime::blk::{open_blk, Blk};
use duplex_runtime::time::{self, rdtsc};
use duplex_runtime::{println, sysctl, BootInfo};

duplex_runtime::entry!(main);

const BLOCK: usize = 4096;
const SECTORS_PER_BLOCK: u64 = (BLOCK / 512) as u64;
const MAGIC: &[u8; 8] = b"DXDISK01";

/// Data blocks written, as far as this run knows (in guest memory: a snapshot carries it).
static WRITTEN: AtomicU64 = AtomicU64::new(0);
/// The last block of the burst being written (0: none): a cut may fall between its writes.
static IN_FLIGHT: AtomicU64 = AtomicU64::new(0);

/// The contents of data block `i`.
fn pattern(i: u64, buf: &mut [u8; BLOCK]) {
    for (j, b) in buf.iter_mut().enumerate() {
        *b = (i.wrapping_mul(31) as u8) ^ ((j as u8).wrapping_mul(7)) ^ ((i >> 8) as u8);
    }
}

fn read_block(disk: &mut Blk, i: u64, buf: &mut [u8; BLOCK]) -> bool {
    disk.read(i * SECTORS_PER_BLOCK, buf).is_ok()
}

fn write_block(disk: &mut Blk, i: u64, buf: &[u8; BLOCK]) -> bool {
    disk.write(i * SECTORS_PER_BLOCK, buf).is_ok() && disk.flush().is_ok()
}

/// Writes data blocks `first..first + n` (one flush at the end).
fn write_blocks(disk: &mut Blk, first: u64, n: u64, buf: &mut [u8; BLOCK]) -> bool {
    for i in first..first + n {
        pattern(i, buf);
        if disk.write(i * SECTORS_PER_BLOCK, buf).is_err() {
            return false;
        }
    }
    disk.flush().is_ok()
}

/// `(boots, written)` from the header, or `(0, 0)` on a blank disk.
fn read_header(disk: &mut Blk, buf: &mut [u8; BLOCK]) -> (u64, u64) {
    if !read_block(disk, 0, buf) || &buf[..8] != MAGIC {
        return (0, 0);
    }
    let word = |o: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&buf[o..o + 8]);
        u64::from_le_bytes(w)
    };
    (word(8), word(16))
}

fn write_header(disk: &mut Blk, boots: u64, written: u64) -> bool {
    let mut buf = [0u8; BLOCK];
    buf[..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&boots.to_le_bytes());
    buf[16..24].copy_from_slice(&written.to_le_bytes());
    write_block(disk, 0, &buf)
}

/// The first data block in 1..=n that does not hold its pattern.
fn first_bad(disk: &mut Blk, n: u64) -> Option<u64> {
    let (mut got, mut want) = ([0u8; BLOCK], [0u8; BLOCK]);
    (1..=n).find(|&i| {
        pattern(i, &mut want);
        !read_block(disk, i, &mut got) || got != want
    })
}

fn main(boot: &BootInfo) -> ! {
    let Some(mut disk) = open_blk(boot) else {
        println!("disktest: no disk");
        sysctl::power_off(1);
    };
    let limit = boot
        .arg("disktest.blocks")
        .and_then(|v| v.parse().ok())
        .unwrap_or(64u64);
    let delay_ms = boot
        .arg("disktest.delay_ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(20u64);
    let burst = boot
        .arg("disktest.burst")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1u64)
        .max(1);
    let mut buf = [0u8; BLOCK];
    let (boots, written) = read_header(&mut disk, &mut buf);
    let boots = boots + 1;
    if !write_header(&mut disk, boots, written) {
        println!("disktest: cannot write the header");
        sysctl::power_off(2);
    }
    match first_bad(&mut disk, written) {
        None => println!("disktest: boot {boots} blocks {written} verified"),
        Some(i) => println!("disktest: CORRUPT block {i} of {written}"),
    }
    WRITTEN.store(written, Relaxed);
    let mut bias = time::bias();
    let pause = time::ns_to_ticks(delay_ms * 1_000_000);
    loop {
        if time::bias() != bias {
            bias = time::bias();
            let n = WRITTEN.load(Relaxed);
            // Blocks being written at the cut may or may not be on the disk; the one after
            // them must not be.
            let blank = match IN_FLIGHT.load(Relaxed) {
                0 => n + 1,
                last => last + 1,
            };
            let mut got = [0u8; BLOCK];
            let next_blank = read_block(&mut disk, blank, &mut got) && got.iter().all(|&b| b == 0);
            match (first_bad(&mut disk, n), next_blank) {
                (None, true) => println!("disktest: restored blocks {n} verified"),
                (bad, _) => println!(
                    "disktest: MISMATCH after restore: {n} blocks in memory, bad block {bad:?}, block {blank} blank {next_blank}"
                ),
            }
        }
        let n = WRITTEN.load(Relaxed);
        if n < limit {
            let k = burst.min(limit - n);
            let last = n + k;
            IN_FLIGHT.store(last, Relaxed);
            if !write_blocks(&mut disk, n + 1, k, &mut buf) || !write_header(&mut disk, boots, last)
            {
                println!("disktest: write of blocks {}..={last} failed", n + 1);
                sysctl::power_off(3);
            }
            WRITTEN.store(last, Relaxed);
            IN_FLIGHT.store(0, Relaxed);
            println!("disktest: wrote {last}");
        }
        sysctl::wait_until(rdtsc().saturating_add(pause));
    }
}
