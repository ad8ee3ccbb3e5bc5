//! Disk images: a partition's disk (the backing file of its virtio-blk device) in a set,
//! as it was at the cut. Writing maps the disk file read-only so that the memory-file
//! writer scans it like a file-backed RAM region (see `writer/image.rs`); restoring
//! composes the chain's disk files, each block from the newest set that holds it, into a
//! sparse file.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use serde::Serialize;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::manifest::DiskEntry;
use crate::memfile::PageBits;
use crate::set::open_checked;
use crate::sys::{self, PAGE};
use crate::{SnapshotError, SnapshotSet};

/// What `restore_disk` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DiskRestoreStats {
    /// The disk's length (the destination's length now).
    pub len: u64,
    /// Bytes of block data written to the destination (the rest are holes).
    pub bytes_written: u64,
    /// Sets of the chain whose disk file was read.
    pub sets: usize,
    /// Wall time, the final `fdatasync` included.
    pub elapsed: Duration,
}

/// `file` (`len` bytes) as guest memory of one region at address 0: a read-only shared
/// mapping with the file as its `FileOffset`, so that `memfile::write` reads its data extents
/// (and its resident pages), whether or not they are in the page cache. The file must not
/// be truncated while the mapping is used (the caller checked its length; a disk does not
/// shrink).
pub(crate) fn map(file: &File, len: u64) -> io::Result<GuestMemoryMmap> {
    let size = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    let region = MmapRegionBuilder::new(size)
        .with_file_offset(FileOffset::new(file.try_clone()?, 0))
        .with_mmap_prot(libc::PROT_READ)
        .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
        .build()
        .map_err(io::Error::other)?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| io::Error::other("the disk mapping overflows"))?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(io::Error::other)
}

/// The ranges that lie in both `a` and `b` (each sorted, not overlapping).
fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let (s, e) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if s < e {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

impl SnapshotSet {
    /// The partition's disk in this set (its length, whether incremental), if it has one.
    pub fn disk(&self, partition: &str) -> Option<&DiskEntry> {
        self.partition(partition).and_then(|p| p.disk.as_ref())
    }

    /// The blocks of a partition's disk this (incremental) set holds; `None` for a full set,
    /// which holds them all, or a partition without a disk.
    pub fn present_disk_blocks(&self, partition: &str) -> Result<Option<PageBits>, SnapshotError> {
        match &self.partition_or_err(partition)?.disk {
            Some(d) => self.present_bits(d.pages_file.as_deref(), d.len),
            None => Ok(None),
        }
    }

    fn disk_err(&self, partition: &str, message: String) -> SnapshotError {
        SnapshotError::Disk {
            dir: self.dir.clone(),
            partition: partition.to_string(),
            message,
        }
    }

    /// Writes the partition's disk as it was at the cut into `dest`: truncated, then resized
    /// to the disk's length, then each block that holds data written from the newest set of
    /// the chain that holds it (blocks zero or absent everywhere stay holes), then
    /// `fdatasync`ed. Checks lengths and the pages files' checksums, not the disk files'
    /// (call [`verify`](Self::verify) first). Returns bytes written.
    pub fn restore_disk(
        &self,
        partition: &str,
        dest: &File,
    ) -> Result<DiskRestoreStats, SnapshotError> {
        self.restore_disk_into(partition, dest, true)
    }

    /// As [`restore_disk`](Self::restore_disk); `sync`: whether to `fdatasync` `dest`.
    pub(crate) fn restore_disk_into(
        &self,
        partition: &str,
        dest: &File,
        sync: bool,
    ) -> Result<DiskRestoreStats, SnapshotError> {
        let started = Instant::now();
        let chain = self.chain();
        let mut disks = Vec::with_capacity(chain.len());
        for set in &chain {
            match &set.partition_or_err(partition)?.disk {
                Some(d) => disks.push(d),
                None => return Err(set.disk_err(partition, "the set has no disk for it".into())),
            }
        }
        let len = disks[0].len;
        let blocks = len / PAGE as u64;
        let dest_err = |op: &str, e: io::Error| {
            self.disk_err(partition, format!("{op} the destination file: {e}"))
        };
        dest.set_len(0).map_err(|e| dest_err("truncating", e))?;
        dest.set_len(len).map_err(|e| dest_err("resizing", e))?;
        let mut stats = DiskRestoreStats {
            len,
            ..Default::default()
        };
        // Newest set first: each claims the blocks it holds that no newer set holds.
        let mut claimed = PageBits::new(blocks);
        let mut buf = vec![0u8; 256 * PAGE];
        for (set, d) in chain.iter().zip(&disks) {
            let present = set
                .present_bits(d.pages_file.as_deref(), len)?
                .unwrap_or_else(|| PageBits::all(blocks));
            let mine = claimed.claim(&present);
            let file = open_checked(&set.dir, &d.file, len)?;
            let path = set.dir.join(&d.file);
            let extents = sys::page_extents(&file, 0, len)
                .map_err(|e| SnapshotError::io(&path, "finding data extents of", e))?;
            let ranges = intersect(&mine.byte_runs(), &extents);
            sys::prefetch(&file, &ranges);
            for (s, e) in ranges {
                let mut pos = s;
                while pos < e {
                    let n = ((e - pos) as usize).min(buf.len());
                    file.read_exact_at(&mut buf[..n], pos)
                        .map_err(|err| SnapshotError::io(&path, "reading", err))?;
                    stats.bytes_written += write_nonzero(dest, &buf[..n], pos)
                        .map_err(|err| dest_err("writing", err))?;
                    pos += n as u64;
                }
            }
            stats.sets += 1;
        }
        if sync {
            dest.sync_data().map_err(|e| dest_err("fdatasync of", e))?;
        }
        stats.elapsed = started.elapsed();
        Ok(stats)
    }
}

/// Writes the non-zero pages of `buf` at `off + their offset` in `dest` (runs of them with
/// one `pwrite`), leaving the zero ones alone; returns the bytes written.
fn write_nonzero(dest: &File, buf: &[u8], off: u64) -> io::Result<u64> {
    let mut written = 0;
    let mut run: Option<usize> = None;
    let pages = buf.len().div_ceil(PAGE);
    for i in 0..=pages {
        let data = i < pages && !sys::is_zero(&buf[i * PAGE..((i + 1) * PAGE).min(buf.len())]);
        match (data, run) {
            (true, None) => run = Some(i),
            (false, Some(first)) => {
                let bytes = &buf[first * PAGE..(i * PAGE).min(buf.len())];
                dest.write_all_at(bytes, off + (first * PAGE) as u64)?;
                written += bytes.len() as u64;
                run = None;
            }
            _ => {}
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intersect_keeps_only_common_ranges() {
        let a = [(0, 10), (20, 30), (40, 50)];
        let b = [(5, 25), (28, 45)];
        assert_eq!(
            intersect(&a, &b),
            vec![(5, 10), (20, 25), (28, 30), (40, 45)]
        );
        assert_eq!(intersect(&a, &[]), vec![]);
    }

    #[test]
    fn claims_resolve_newest_first() {
        let mut claimed = PageBits::new(70);
        let mut newer = PageBits::new(70);
        newer.set(3);
        newer.set(69);
        let mine = claimed.claim(&newer);
        assert_eq!((mine.count(), claimed.count()), (2, 2));
        let all = PageBits::all(70);
        assert_eq!(all.count(), 70);
        let rest = claimed.claim(&all);
        assert_eq!(rest.count(), 68);
        assert!(!rest.get(3) && !rest.get(69) && rest.get(4));
        assert_eq!(claimed, PageBits::all(70));
    }
}
