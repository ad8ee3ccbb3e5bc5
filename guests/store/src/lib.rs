//! `duplex-store`: the controller partition's durable key-value store (accounts, boxes,
//! documents, rights) on its virtio-blk disk (`docs/shared-data.md`).
//!
//! [`Store`] keeps byte keys (up to [`MAX_KEY_LEN`]) and values (up to [`MAX_VALUE_LEN`])
//! on a [`BlockDevice`] of 512-byte sectors. It is built on **ekv** 1.0 (an LSM tree for
//! raw NOR flash, by the Embassy project): ekv gives power-fail-safe, atomic multi-key
//! write transactions, keys in order with range reads, and returns `Corrupted` instead of
//! panicking on a damaged image. `docs/decisions.md` says why ekv rather than
//! sequential-storage.
//!
//! # Guarantees
//!
//! * A [`Store::put`], [`Store::put_many`] or [`Store::remove`] that returned `Ok` is on the
//!   disk (the device was flushed) and survives a crash.
//! * One call is one ekv transaction: after a crash at any point it is there whole or not at
//!   all, including a value split into chunks and every item of a `put_many`.
//! * Assumed of the device: writes reach the disk in the order they complete, and a torn
//!   write leaves each byte old or new (true when the monitor is killed or the guest
//!   crashes; after a host power cut, only if the host keeps unflushed writes in order).
//!
//! # Layout
//!
//! * Sector 0: the superblock (signature `DPXSTORE`, format version, the compile-time
//!   configuration, page count, CRC-32), see [`disk::Superblock`]. Sectors 1–7 unused.
//! * From byte 4096: ekv's pages of 32 KiB, at most 65 535 of them (2 GiB; a larger disk
//!   is used up to that size). ekv is built with `erase-value-0`, so erased flash is
//!   `0x00`: a blank sparse disk already reads as erased and needs no inverted mapping; an
//!   erase writes a page of zeros. [`disk`] explains the adapter.
//! * ekv's records: heads, chunks and counters, see [`layout`]. Values up to 4 KiB sit in
//!   their head record; longer ones are split into 64 KiB chunks written in the same
//!   transaction as their head.
//!
//! # Opening
//!
//! [`Store::open`] formats a disk whose sector 0 is all zeros (ekv format, flush, then the
//! superblock, flush: a crash before the superblock is written leaves a blank disk, which
//! is formatted again). A disk whose sector 0 is something else is refused
//! ([`StoreError::NotAStore`], nothing is written); one of another format version or
//! configuration gives [`StoreError::Incompatible`]. Otherwise ekv mounts, recovering from
//! an interrupted transaction by ignoring it.
//!
//! # Costs
//!
//! Each write call erases at least one page (ekv starts a new file per transaction: batch
//! small writes with `put_many`), appends its records, commits, and flushes once. A value
//! of `n` bytes costs about `2n` bytes of writes (erase, then data) plus compaction later.
//! The adapter sends ekv's appends as one request per 4 KiB chunk plus one per chunk
//! header: a 64 KiB document costs about 40 device writes, about 240 with compactions
//! averaged in (about 1 MiB), and about 100 reads (ekv looks the key up in every file).
//! Opening reads the header of every page (one 4 KiB read each). ekv's futures are polled
//! to completion at once: the device is synchronous, nothing ever waits.

#![no_std]

extern crate alloc;

#[cfg(test)]
extern crate std;

pub mod disk;
mod error;
pub mod layout;
mod store;
#[cfg(test)]
mod tests;

pub use disk::DiskStats;
pub use error::{BlockError, DiskError, StoreError};
pub use store::{Store, StoreStats};

/// Bytes per sector of a [`BlockDevice`].
pub const SECTOR_SIZE: usize = 512;
/// Longest key.
pub const MAX_KEY_LEN: usize = 64;
/// Longest value (64 MiB).
pub const MAX_VALUE_LEN: usize = 64 << 20;

/// A disk of 512-byte sectors.
///
/// `read` and `write` take whole sectors (`buf.len()` a non-zero multiple of
/// [`SECTOR_SIZE`]); a write is durable once a later `flush` returned `Ok`.
pub trait BlockDevice {
    /// The disk's size in sectors.
    fn sectors(&self) -> u64;
    /// Reads sectors `sector..` into `buf`.
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlockError>;
    /// Writes `buf` to sectors `sector..`.
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlockError>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> Result<(), BlockError>;
}

impl<T: BlockDevice + ?Sized> BlockDevice for &mut T {
    fn sectors(&self) -> u64 {
        T::sectors(self)
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        T::read(self, sector, buf)
    }
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlockError> {
        T::write(self, sector, buf)
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        T::flush(self)
    }
}
