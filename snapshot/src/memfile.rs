//! Memory files and pages files: writing a partition's guest RAM as a sparse, mappable
//! file (resident non-zero pages only, found with `mincore`), the memory-file checksum,
//! and the page-presence bitmap of incremental sets.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use crate::crc::MemCrc;
use crate::manifest::RamRegion;
use crate::sys::{self, PAGE};
use crate::SnapshotError;

/// Magic at the start of a pages file.
pub const PAGES_MAGIC: &[u8; 8] = b"DPXPAGES";
/// Bytes before a pages file's bitmap: the magic and the page count (u64 little-endian).
pub const PAGES_HEADER_LEN: usize = 16;
/// Pages written per `pwrite` at most (1 MiB).
const BATCH_PAGES: usize = 256;
/// Pages whose residency is asked per `mincore` call (128 MiB of guest RAM).
const CHUNK_PAGES: usize = 32 * 1024;

/// What writing one partition's memory did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MemoryWriteStats {
    /// Bytes of page data written (the memory file's non-hole bytes).
    pub bytes_written: u64,
    /// Pages written (non-zero pages that are in the set).
    pub pages_written: u64,
    /// Pages whose content was read (resident, or swapped, or backed by file data; and, for
    /// an incremental set, dirty). Pages never touched are not read.
    pub pages_scanned: u64,
    /// Pages of guest RAM.
    pub pages_total: u64,
    /// Pages the set holds: all of them for a full set, the dirty ones for an incremental set.
    pub pages_present: u64,
    /// Wall time of the write (without fsync, which commit does).
    pub elapsed: Duration,
}

/// One bit per page, bit `i` in word `i / 64` at position `i % 64` (KVM's dirty-log layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBits {
    words: Vec<u64>,
    pages: u64,
}

impl PageBits {
    /// All clear, for `pages` pages.
    pub fn new(pages: u64) -> Self {
        PageBits {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// The number of pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Whether page `i` is set (false past the end).
    pub fn get(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Sets page `i` (ignored past the end).
    pub fn set(&mut self, i: u64) {
        if i < self.pages {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    /// How many pages are set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The pages of `present` not yet in `self`, which gains them: resolving a chain, newest
    /// set first, `self` being the pages a newer set already provides.
    pub fn claim(&mut self, present: &PageBits) -> PageBits {
        let mut mine = PageBits::new(self.pages);
        for (i, (c, p)) in self.words.iter_mut().zip(&present.words).enumerate() {
            mine.words[i] = p & !*c;
            *c |= p;
        }
        mine
    }

    /// All set, for `pages` pages (what a full set holds).
    pub fn all(pages: u64) -> Self {
        let mut b = PageBits::new(pages);
        b.words.fill(u64::MAX);
        if !pages.is_multiple_of(64) {
            if let Some(last) = b.words.last_mut() {
                *last = (1 << (pages % 64)) - 1;
            }
        }
        b
    }

    /// The set pages as byte ranges `(start, end)` of the memory file, runs merged.
    pub fn byte_runs(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = Vec::new();
        for p in (0..self.pages).filter(|&p| self.get(p)) {
            let (s, e) = (p * PAGE as u64, (p + 1) * PAGE as u64);
            match v.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => v.push((s, e)),
            }
        }
        v
    }

    /// The pages file: magic, page count, then the bitmap bytes (page `i` is bit `i % 8` of
    /// byte `i / 8`).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(PAGES_HEADER_LEN + self.pages.div_ceil(8) as usize);
        v.extend_from_slice(PAGES_MAGIC);
        v.extend_from_slice(&self.pages.to_le_bytes());
        for w in &self.words {
            v.extend_from_slice(&w.to_le_bytes());
        }
        v.truncate(PAGES_HEADER_LEN + self.pages.div_ceil(8) as usize);
        v
    }

    /// Reads a pages file that must describe `pages` pages.
    pub fn decode(bytes: &[u8], pages: u64) -> Result<Self, String> {
        if bytes.len() < PAGES_HEADER_LEN || &bytes[..8] != PAGES_MAGIC {
            return Err("does not start with the magic DPXPAGES".into());
        }
        let mut n = [0u8; 8];
        n.copy_from_slice(&bytes[8..16]);
        let n = u64::from_le_bytes(n);
        if n != pages {
            return Err(format!(
                "describes {n} pages, the memory or disk file it goes with has {pages}"
            ));
        }
        let body = &bytes[PAGES_HEADER_LEN..];
        if body.len() as u64 != pages.div_ceil(8) {
            return Err(format!(
                "bitmap is {} bytes, {pages} pages need {}",
                body.len(),
                pages.div_ceil(8)
            ));
        }
        let mut bits = PageBits::new(pages);
        for (i, chunk) in body.chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            bits.words[i] = u64::from_le_bytes(w);
        }
        // Bits past the last page must be clear.
        if !pages.is_multiple_of(64) {
            if let Some(last) = bits.words.last() {
                if last >> (pages % 64) != 0 {
                    return Err("bits are set past the last page".into());
                }
            }
        }
        Ok(bits)
    }
}

/// The result of writing one memory file.
pub(crate) struct Written {
    pub stats: MemoryWriteStats,
    pub crc: MemCrc,
    pub len: u64,
    pub ram: Vec<RamRegion>,
    /// For an incremental set: the pages the set holds.
    pub present: Option<PageBits>,
}

/// Contiguous non-zero pages waiting to be written with one `pwrite`.
struct Batch<'a> {
    file: &'a File,
    path: &'a Path,
    buf: Vec<u8>,
    offset: u64,
    /// Bytes written since writeback was last started.
    unsynced: u64,
}

/// Bytes written between two starts of writeback (`sync_file_range`): the disk works
/// while the copy goes on, so that the commit's fsync has only the tail left to wait for.
const WRITEBACK_EVERY: u64 = 8 << 20;

impl<'a> Batch<'a> {
    fn new(file: &'a File, path: &'a Path) -> Self {
        Batch {
            file,
            path,
            buf: Vec::with_capacity(BATCH_PAGES * PAGE),
            offset: 0,
            unsynced: 0,
        }
    }

    fn flush(&mut self) -> Result<(), SnapshotError> {
        if !self.buf.is_empty() {
            self.file
                .write_all_at(&self.buf, self.offset)
                .map_err(|e| SnapshotError::io(self.path, "writing", e))?;
            self.unsynced += self.buf.len() as u64;
            self.buf.clear();
            if self.unsynced >= WRITEBACK_EVERY {
                sys::start_writeback(self.file);
                self.unsynced = 0;
            }
        }
        Ok(())
    }
}

/// Writes `mem` into `file` (a new, empty file at `path`): a sparse file of the RAM's total
/// length holding every non-zero page that is in the set, at its offset. The pages read are
/// the resident or swapped ones and, for a region mapping a file, those in the file's data
/// extents; for a shared file mapping (a disk image) only those. `dirty`, one bitmap
/// per region, makes the set incremental: only dirty pages are in it.
pub(crate) fn write<B: Bitmap, D: AsRef<[u64]>>(
    path: &Path,
    file: &File,
    mem: &GuestMemoryMmap<B>,
    dirty: Option<&[D]>,
    usage: &dyn Fn(String) -> SnapshotError,
) -> Result<Written, SnapshotError> {
    let started = Instant::now();
    if sys::host_page_size() != PAGE {
        return Err(usage(format!(
            "the host page size is {}, the format needs {PAGE}",
            sys::host_page_size()
        )));
    }
    let mut ram = Vec::new();
    for r in mem.iter() {
        if r.len() % PAGE as u64 != 0 || r.start_addr().0 % PAGE as u64 != 0 {
            return Err(usage(format!(
                "guest RAM region at {:#x} of {:#x} bytes is not page aligned",
                r.start_addr().0,
                r.len()
            )));
        }
        ram.push(RamRegion {
            gpa: r.start_addr().0,
            len: r.len(),
        });
    }
    if let Some(d) = dirty {
        if d.len() != ram.len() {
            return Err(usage(format!(
                "{} dirty bitmaps for {} RAM regions",
                d.len(),
                ram.len()
            )));
        }
        for (i, (bm, r)) in d.iter().zip(&ram).enumerate() {
            let bm = bm.as_ref();
            let need = (r.len / PAGE as u64).div_ceil(64);
            if (bm.len() as u64) < need {
                return Err(usage(format!(
                    "dirty bitmap {i} has {} words, region {i} of {} pages needs {need}",
                    bm.len(),
                    r.len / PAGE as u64
                )));
            }
        }
    }
    // A region restored lazily from an earlier set maps that set's memory file: if the file
    // was cut short, its pages past the end are gone (and touching them would raise SIGBUS,
    // which the guard turns into zero pages for as long as the write runs).
    if let Some(why) = crate::guard::truncated_file(mem) {
        return Err(usage(format!("guest memory cannot be read: {why}")));
    }
    let guard = crate::guard::MemoryGuard::for_memory(mem, None)
        .map_err(|e| usage(format!("guest memory: {e}")))?;
    let len: u64 = ram.iter().map(|r| r.len).sum();
    file.set_len(len)
        .map_err(|e| SnapshotError::io(path, "setting the length of", e))?;

    let total_pages = len / PAGE as u64;
    let mut present = dirty.map(|_| PageBits::new(total_pages));
    let mut stats = MemoryWriteStats {
        pages_total: total_pages,
        ..Default::default()
    };
    let mut crc = MemCrc::new();
    let mut batch = Batch::new(file, path);
    let swap = sys::swap_active();
    let mut res = Vec::new();
    let mut file_base = 0u64;

    for (ri, region) in mem.iter().enumerate() {
        let pages = (region.len() / PAGE as u64) as usize;
        let mem_err =
            |e: vm_memory::GuestMemoryError| usage(format!("region {ri}: host address: {e}"));
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(mem_err)? as usize;
        // A file-backed region (e.g. a lazily restored set, MAP_PRIVATE of a memory file):
        // a page that is not resident can still hold the file's data.
        let backing = match region.file_offset() {
            Some(fo) => Some(
                sys::page_extents(fo.file(), fo.start(), fo.start() + region.len())
                    .map_err(|e| usage(format!("region {ri}: backing file extents: {e}")))?
                    .into_iter()
                    .map(|(s, e)| (s - fo.start(), e - fo.start()))
                    .collect::<Vec<_>>(),
            ),
            None => None,
        };
        // A shared file mapping (a disk image) holds exactly its file's content: the file's
        // data extents are its only pages with data (residency would add the page cache's
        // zero pages of holes).
        let shared = backing.is_some() && region.flags() & libc::MAP_SHARED != 0;
        let mut ext = 0usize;
        let slice = region.as_volatile_slice().map_err(mem_err)?;

        for chunk in (0..pages).step_by(CHUNK_PAGES) {
            let n = CHUNK_PAGES.min(pages - chunk);
            if shared {
                res.clear();
                res.resize(n, 0);
            } else {
                sys::resident(host + chunk * PAGE, n, &mut res)
                    .map_err(|e| usage(format!("region {ri}: mincore: {e}")))?;
            }
            let swapped = if swap && !shared {
                Some(
                    sys::swapped(host + chunk * PAGE, n)
                        .map_err(|e| usage(format!("region {ri}: pagemap: {e}")))?,
                )
            } else {
                None
            };
            for i in 0..n {
                let p = chunk + i;
                let file_page = file_base / PAGE as u64 + p as u64;
                let off = file_page * PAGE as u64;
                if let (Some(d), Some(pr)) = (dirty, present.as_mut()) {
                    if d[ri].as_ref()[p / 64] & (1 << (p % 64)) == 0 {
                        batch.flush()?;
                        continue;
                    }
                    pr.set(file_page);
                }
                let roff = (p * PAGE) as u64;
                let in_backing = backing.as_ref().is_some_and(|b| {
                    while ext < b.len() && b[ext].1 <= roff {
                        ext += 1;
                    }
                    ext < b.len() && b[ext].0 <= roff
                });
                let candidate =
                    res[i] & 1 != 0 || swapped.as_ref().is_some_and(|s| s[i]) || in_backing;
                if !candidate {
                    // Never touched (or dropped): reads as zero. Not read, not written.
                    batch.flush()?;
                    continue;
                }
                stats.pages_scanned += 1;
                let at = batch.buf.len();
                batch.buf.resize(at + PAGE, 0);
                let page = slice
                    .subslice(p * PAGE, PAGE)
                    .map_err(|e| usage(format!("region {ri}: page {p}: {e}")))?;
                page.copy_to(&mut batch.buf[at..]);
                if sys::is_zero(&batch.buf[at..]) {
                    batch.buf.truncate(at);
                    batch.flush()?;
                    continue;
                }
                if at == 0 {
                    batch.offset = off;
                }
                crc.page(off, &batch.buf[at..]);
                stats.pages_written += 1;
                if batch.buf.len() >= BATCH_PAGES * PAGE {
                    batch.flush()?;
                }
            }
        }
        batch.flush()?;
        file_base += region.len();
    }
    batch.flush()?;
    if guard.truncated() {
        return Err(usage(
            "the memory file behind guest memory was truncated while it was read (pages past \
             its end read as zeros)"
                .into(),
        ));
    }
    drop(guard);
    sys::start_writeback(file);
    stats.bytes_written = stats.pages_written * PAGE as u64;
    stats.pages_present = present.as_ref().map_or(total_pages, PageBits::count);
    stats.elapsed = started.elapsed();
    Ok(Written {
        stats,
        crc,
        len,
        ram,
        present,
    })
}

/// Writes again, over a memory file [`write`] made, every page set in `delta` (one bitmap
/// per region, as for `write`): the second pass of a live snapshot, with the partition
/// paused, for the pages its guest or devices wrote since the first pass. Zero pages are
/// written as zeros (the checksum skips them). `present`, for an incremental set, gains the
/// pages. The file's checksum must then be computed again ([`checksum`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn overwrite<B: Bitmap, D: AsRef<[u64]>>(
    path: &Path,
    file: &File,
    mem: &GuestMemoryMmap<B>,
    delta: &[D],
    mut present: Option<&mut PageBits>,
    rewritten: &mut BTreeSet<u64>,
    usage: &dyn Fn(String) -> SnapshotError,
) -> Result<MemoryWriteStats, SnapshotError> {
    let started = Instant::now();
    let regions = mem.iter().count();
    if delta.len() != regions {
        return Err(usage(format!(
            "{} dirty bitmaps for {regions} RAM regions",
            delta.len()
        )));
    }
    let mut stats = MemoryWriteStats::default();
    let mut batch = Batch::new(file, path);
    let mut file_base = 0u64;
    for (ri, (region, bits)) in mem.iter().zip(delta).enumerate() {
        let bits = bits.as_ref();
        let pages = (region.len() / PAGE as u64) as usize;
        stats.pages_total += pages as u64;
        if (bits.len() as u64) < (pages as u64).div_ceil(64) {
            return Err(usage(format!(
                "dirty bitmap {ri} has {} words, region {ri} of {pages} pages needs {}",
                bits.len(),
                pages.div_ceil(64)
            )));
        }
        let mem_err =
            |e: vm_memory::GuestMemoryError| usage(format!("region {ri}: host address: {e}"));
        let slice = region.as_volatile_slice().map_err(mem_err)?;
        let mut next_off = u64::MAX;
        for (w, &word) in bits.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let p = w * 64 + word.trailing_zeros() as usize;
                word &= word - 1;
                if p >= pages {
                    break;
                }
                let file_page = file_base / PAGE as u64 + p as u64;
                let off = file_page * PAGE as u64;
                if let Some(pr) = present.as_deref_mut() {
                    pr.set(file_page);
                }
                rewritten.insert(MemCrc::chunk_of(off));
                if off != next_off || batch.buf.len() >= BATCH_PAGES * PAGE {
                    batch.flush()?;
                    batch.offset = off;
                }
                let at = batch.buf.len();
                batch.buf.resize(at + PAGE, 0);
                let page = slice
                    .subslice(p * PAGE, PAGE)
                    .map_err(|e| usage(format!("region {ri}: page {p}: {e}")))?;
                page.copy_to(&mut batch.buf[at..]);
                stats.pages_scanned += 1;
                if !sys::is_zero(&batch.buf[at..]) {
                    stats.pages_written += 1;
                }
                next_off = off + PAGE as u64;
            }
        }
        batch.flush()?;
        file_base += region.len();
    }
    stats.bytes_written = stats.pages_written * PAGE as u64;
    stats.pages_present = stats.pages_scanned;
    stats.elapsed = started.elapsed();
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_bits_round_trip_through_the_pages_file() {
        let mut b = PageBits::new(130);
        for i in [0, 1, 63, 64, 129] {
            b.set(i);
        }
        b.set(130); // past the end: ignored
        assert_eq!(b.count(), 5);
        let p = PAGE as u64;
        assert_eq!(
            b.byte_runs(),
            vec![(0, 2 * p), (63 * p, 65 * p), (129 * p, 130 * p)]
        );
        let bytes = b.encode();
        assert_eq!(bytes.len(), PAGES_HEADER_LEN + 17);
        assert_eq!(bytes[PAGES_HEADER_LEN], 0b11);
        assert_eq!(bytes[PAGES_HEADER_LEN + 16], 0b10);
        assert_eq!(PageBits::decode(&bytes, 130).expect("decode"), b);
        assert!(PageBits::decode(&bytes, 131).is_err());
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(PageBits::decode(&bad, 130).is_err());
        let mut past = bytes;
        past[PAGES_HEADER_LEN + 16] |= 0x80;
        assert!(PageBits::decode(&past, 130).is_err());
    }
}
