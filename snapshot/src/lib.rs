//! Duplex snapshot sets: one consistent snapshot of all partitions of a device, saved
//! together in one directory (the format is specified in `docs/snapshot-format.md`).
//!
//! - [`SetWriter`] writes a set: per partition a sparse, mappable memory file (only
//!   resident non-zero pages are written, found with `mincore`; for an incremental set only
//!   the dirty pages, with a page-presence bitmap) and an opaque state file, and optionally
//!   a disk image (the partition's virtio-blk backing file: its blocks that hold data, or for
//!   an incremental set the blocks written since the parent); `commit` seals the manifest,
//!   fsyncs, and puts the set in place atomically.
//! - [`SnapshotSet`] opens and validates a set (and its parent chain), verifies checksums,
//!   reads states and restores guest memory lazily ([`LoadMode::Lazy`], private file
//!   mappings) or eagerly ([`LoadMode::Eager`]), and restores disks
//!   ([`SnapshotSet::restore_disk`]).
//! - [`merge`] flattens an incremental chain into a full set; [`inspect`] summarises a set.
//!
//! ```no_run
//! # use duplex_snapshot::*;
//! # fn f(mem: &vm_memory::GuestMemoryMmap) -> Result<(), SnapshotError> {
//! let mut w = SetWriter::create("/var/lib/duplex/boot".as_ref(), None)?;
//! w.write_memory("engine", mem, None)?;
//! w.write_state("engine", br#"{"version":1}"#)?;
//! w.commit(serde_json::json!({"partitions": []}), serde_json::Value::Null)?;
//!
//! let set = SnapshotSet::open("/var/lib/duplex/boot".as_ref())?;
//! set.verify()?;
//! let mem = set.load_memory("engine", LoadMode::Lazy)?;
//! # Ok(()) }
//! ```

mod crc;
mod disk;
mod error;
pub mod guard;
mod load;
pub mod manifest;
mod memfile;
mod merge;
mod place;
mod set;
mod sys;
mod writer;

pub use disk::DiskRestoreStats;
pub use error::SnapshotError;
pub use guard::MemoryGuard;
pub use load::LoadMode;
pub use manifest::{
    DiskEntry, FileEntry, Manifest, ParentRef, PartitionEntry, RamRegion, FORMAT_VERSION,
    MANIFEST_FILE, MIN_FORMAT_VERSION,
};
pub use memfile::{MemoryWriteStats, PageBits};
pub use merge::{inspect, merge};
pub use set::{SnapshotSet, VerifyStats};
pub use writer::{CommitStats, SetWriter};

/// The page size of memory files and bitmaps.
pub const PAGE_SIZE: usize = sys::PAGE;

#[cfg(test)]
mod tests;
