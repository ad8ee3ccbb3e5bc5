//! The flash adapter: ekv's [`ekv::flash::Flash`] (pages erased to `0x00`, written once)
//! over a [`BlockDevice`] of 512-byte sectors, with a small cache; and the superblock in
//! sector 0.
//!
//! * ekv page `p` is the byte range `BASE + p * PAGE_SIZE ..` of the disk; the first
//!   [`BASE`] bytes hold the superblock (sector 0) and are otherwise unused.
//! * **Erase** writes `PAGE_SIZE` zero bytes (one request). ekv is configured with an erase
//!   value of `0x00`, so a blank (sparse, all-zero) disk already reads as erased. The
//!   adapter remembers the last erased lines it does not cache, so writing into the page
//!   does not read it back.
//! * **Write** changes only the bytes ekv names, but a disk writes whole sectors: the
//!   adapter updates its cached copy of the sectors and later writes the sectors the range
//!   covers. The other bytes of those sectors are written back unchanged, so a write torn
//!   anywhere leaves each byte either as it was or as it was meant to be, never anything
//!   else (ekv's rule that a write must not disturb bytes beside it holds as long as the
//!   disk does not invent data in a torn sector, which a file or a real disk does not).
//! * **Appends are merged.** ekv writes in pieces of a few bytes to 4 KiB, and each device
//!   request is a VM exit in the guest. A write that starts where the previous one ended,
//!   in the same page, joins the *pending run*: held in the cache, sent as one request
//!   before anything that must follow it — a write anywhere else (backwards, with a gap, or
//!   in another page), an erase, the eviction of one of its lines, a flush, or dropping the
//!   adapter. Reads of it are served from the cache. So the device sees ekv's writes in
//!   ekv's order, except that the writes of one run share a request, whose sectors a crash
//!   may leave in any combination. That is safe because ekv writes each byte once after an
//!   erase and makes data valid with a later write at a *lower* address: a chunk's header
//!   (magic, length, CRC) lies before its data and is written after it, so the run with
//!   the data is sent before it; and the next chunk's data starts after a gap left for its
//!   own header, so the header stays alone in its run. A run is thus a header alone or (part of) one chunk's data
//!   (at most 4 KiB), worthless until that chunk's header lands in a later request. A
//!   crash before a run is sent loses all of it, like a crash before its first write.
//! * ekv's chunk header (8 bytes) is valid once its magic is there, so a header that
//!   straddles two sectors is sent on its own, later sector first: a crash between the two
//!   leaves it invisible rather than half written.
//! * **Reads** go through a cache of [`CACHE_LINES`] lines of [`LINE`] bytes (least recently
//!   used out): ekv reads small headers one at a time. A chunk-sized read, or a miss just
//!   after a miss on the line before, also reads the rest of the page's lines that are not
//!   cached, in the same request.
//! * The caller flushes ([`Disk::flush`]) to send the pending run and make every write
//!   durable.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;

use ekv::config::PAGE_SIZE;
use ekv::flash::{Flash, PageID};

use crate::error::{BlockError, DiskError, StoreError};
use crate::{BlockDevice, SECTOR_SIZE};

/// Bytes per cache line (8 sectors); pages and [`BASE`] are whole lines.
pub const LINE: usize = 4096;
/// Lines in the read cache (256 KiB).
pub const CACHE_LINES: usize = 64;
/// Disk bytes before ekv's page 0: the superblock's line.
pub const BASE: u64 = LINE as u64;
/// Most pages the store uses (ekv's page IDs are `u16`, with `0xFFFF` meaning none).
pub const MAX_PAGES: usize = if ekv::config::MAX_PAGE_COUNT < 0xFFFF {
    ekv::config::MAX_PAGE_COUNT
} else {
    0xFFFF
};
/// Writes up to this size are headers: across a sector boundary, sent alone, last sector
/// first (see `do_write`).
const SMALL_WRITE: usize = 64;
/// Fewest pages the store accepts (ekv keeps a dozen free for compaction).
pub const MIN_PAGES: usize = 24;

const _: () = assert!(PAGE_SIZE.is_multiple_of(LINE) && LINE.is_multiple_of(SECTOR_SIZE));

/// Device request counters since the store was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Read requests.
    pub reads: u64,
    /// Write requests (erases included).
    pub writes: u64,
    /// Flush requests.
    pub flushes: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written (erases included).
    pub bytes_written: u64,
}

struct Line {
    /// Line number on the disk (byte offset / [`LINE`]).
    index: u64,
    data: Box<[u8]>,
    last_use: u64,
}

/// Bytes of the disk written into the cache but not yet sent to the device: a run of
/// contiguous appends within one page.
#[derive(Clone, Copy)]
struct Pending {
    start: u64,
    end: u64,
}

/// Most lines one write of ekv touches (a page's length, not aligned to a line): the cache
/// holds them all at once, so loading one line of a write never evicts another.
const LINES_PER_WRITE: usize = PAGE_SIZE / LINE + 1;
const _: () = assert!(2 * LINES_PER_WRITE <= CACHE_LINES);
/// Most lines one read request brings in (the rest of the page at most).
const READ_AHEAD: usize = PAGE_SIZE / LINE;
/// A read this long is chunk data (ekv's chunks are up to 4 KiB), read on.
const LARGE_READ: usize = 1024;
/// Erased lines remembered (so as not to read them back), four pages' worth.
const ZERO_LINES: usize = 4 * PAGE_SIZE / LINE;

/// ekv's flash over a block device (see the module's doc).
pub struct Disk<D: BlockDevice> {
    dev: D,
    pages: usize,
    lines: Vec<Line>,
    clock: u64,
    zeros: Vec<u8>,
    /// Where a pending run spanning lines is gathered to be sent as one request.
    gather: Vec<u8>,
    /// Where a read-ahead lands before it is copied into the cache (not `gather`: making
    /// room for its lines may send the pending run).
    ahead: Vec<u8>,
    pending: Option<Pending>,
    /// Lines known to be all zeros on the disk (erased since) and not in the cache,
    /// oldest first.
    zero_lines: Vec<u64>,
    /// The last line a read missed (read-ahead starts on the next miss after it).
    last_miss: Option<u64>,
    stats: DiskStats,
}

impl<D: BlockDevice> Disk<D> {
    /// Wraps `dev`, presenting `pages` ekv pages (the caller checked the disk has them).
    pub fn new(dev: D, pages: usize) -> Self {
        Disk {
            dev,
            pages,
            lines: Vec::with_capacity(CACHE_LINES),
            clock: 0,
            zeros: vec![0; PAGE_SIZE],
            gather: vec![0; PAGE_SIZE],
            ahead: vec![0; READ_AHEAD * LINE],
            pending: None,
            zero_lines: Vec::with_capacity(ZERO_LINES),
            last_miss: None,
            stats: DiskStats::default(),
        }
    }

    /// The counters since [`Disk::new`].
    pub fn stats(&self) -> DiskStats {
        self.stats
    }

    /// Sends the pending writes, then makes every write so far durable.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        self.send().map_err(StoreError::device("write"))?;
        self.stats.flushes += 1;
        self.dev.flush().map_err(StoreError::device("flush"))
    }

    /// The device (for the superblock). Call [`Disk::flush`] first: writes still pending
    /// in the adapter are not on it.
    pub fn device(&mut self) -> &mut D {
        &mut self.dev
    }

    fn range(&self, p: usize, offset: usize, len: usize) -> Result<u64, BlockError> {
        if p >= self.pages || offset > PAGE_SIZE || len > PAGE_SIZE - offset {
            return Err(BlockError::OutOfRange {
                sector: (BASE + (p * PAGE_SIZE + offset) as u64) / SECTOR_SIZE as u64,
                count: len.div_ceil(SECTOR_SIZE) as u64,
            });
        }
        Ok(BASE + (p * PAGE_SIZE + offset) as u64)
    }

    /// Sends the pending run, if any: the sectors it covers, from the cache, in one
    /// request. Those lines are cached (a line of the run is never evicted before it is
    /// sent) and hold exactly what the run's writes left (any other write sends the run
    /// first).
    fn send(&mut self) -> Result<(), BlockError> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let sector = p.start / SECTOR_SIZE as u64;
        let from = sector * SECTOR_SIZE as u64;
        let to = p.end.div_ceil(SECTOR_SIZE as u64) * SECTOR_SIZE as u64;
        let len = (to - from) as usize;
        let first_line = from / LINE as u64;
        let last_line = (to - 1) / LINE as u64;
        let mut missing = false;
        let result = if first_line == last_line {
            match self.lines.iter().find(|l| l.index == first_line) {
                Some(l) => {
                    let within = (from % LINE as u64) as usize;
                    self.dev.write(sector, &l.data[within..within + len])
                }
                None => {
                    missing = true;
                    Ok(())
                }
            }
        } else {
            let mut at = from;
            while at < to {
                let index = at / LINE as u64;
                let within = (at % LINE as u64) as usize;
                let n = (LINE - within).min((to - at) as usize);
                let done = (at - from) as usize;
                match self.lines.iter().find(|l| l.index == index) {
                    Some(l) => {
                        self.gather[done..done + n].copy_from_slice(&l.data[within..within + n])
                    }
                    None => missing = true,
                }
                at += n as u64;
            }
            if missing {
                Ok(())
            } else {
                self.dev.write(sector, &self.gather[..len])
            }
        };
        if missing || result.is_err() {
            // The disk may or may not hold the new bytes: forget the lines.
            self.forget(first_line, last_line);
        }
        if missing {
            return Err(BlockError::Io("the adapter lost a pending write"));
        }
        result?;
        self.stats.writes += 1;
        self.stats.bytes_written += len as u64;
        Ok(())
    }

    /// The cache slot of line `index`, read from the device if it is not cached (a line
    /// of the pending run is sent before it is evicted).
    fn line(&mut self, index: u64) -> Result<usize, BlockError> {
        self.clock += 1;
        if let Some(i) = self.lines.iter().position(|l| l.index == index) {
            self.lines[i].last_use = self.clock;
            return Ok(i);
        }
        let slot = self.victim()?;
        let line = &mut self.lines[slot];
        if let Some(z) = self.zero_lines.iter().position(|&z| z == index) {
            self.zero_lines.remove(z);
            line.data.fill(0);
        } else {
            self.dev
                .read(index * (LINE / SECTOR_SIZE) as u64, &mut line.data)?;
            self.stats.reads += 1;
            self.stats.bytes_read += LINE as u64;
        }
        line.index = index;
        line.last_use = self.clock;
        Ok(slot)
    }

    /// A free cache slot: a new one, or the least recently used line's (sending the
    /// pending run first if that line is part of it). Its index is `u64::MAX`.
    fn victim(&mut self) -> Result<usize, BlockError> {
        let slot = if self.lines.len() < CACHE_LINES {
            self.lines.push(Line {
                index: u64::MAX,
                data: vec![0; LINE].into_boxed_slice(),
                last_use: 0,
            });
            self.lines.len() - 1
        } else {
            let mut oldest = 0;
            for (i, l) in self.lines.iter().enumerate() {
                if l.last_use < self.lines[oldest].last_use {
                    oldest = i;
                }
            }
            let victim = self.lines[oldest].index;
            if let Some(p) = self.pending {
                if (p.start / LINE as u64..=(p.end - 1) / LINE as u64).contains(&victim) {
                    self.send()?;
                }
            }
            oldest
        };
        self.lines[slot].index = u64::MAX;
        Ok(slot)
    }

    /// Like [`Disk::line`], for a read: a miss in a `large` (chunk-sized) read, or right
    /// after a miss on the line before (ekv reading on through a page), also reads the
    /// following lines of the page that are neither cached nor known erased, in the same
    /// request.
    fn line_ahead(&mut self, index: u64, large: bool) -> Result<usize, BlockError> {
        let on = large || self.last_miss.is_some_and(|m| m + 1 == index);
        let cached = |d: &Self, i: u64| d.lines.iter().any(|l| l.index == i);
        if !on || cached(self, index) || self.zero_lines.contains(&index) {
            if !cached(self, index) {
                self.last_miss = Some(index);
            }
            return self.line(index);
        }
        let page_start = (index * LINE as u64 - BASE) / PAGE_SIZE as u64 * PAGE_SIZE as u64 + BASE;
        let page_end_line = (page_start + PAGE_SIZE as u64) / LINE as u64;
        let mut count = 1;
        while index + count < page_end_line
            && (count as usize) < READ_AHEAD
            && !cached(self, index + count)
            && !self.zero_lines.contains(&(index + count))
        {
            count += 1;
        }
        self.last_miss = Some(index + count - 1);
        if count == 1 {
            return self.line(index);
        }
        let len = count as usize * LINE;
        self.dev
            .read(index * (LINE / SECTOR_SIZE) as u64, &mut self.ahead[..len])?;
        self.stats.reads += 1;
        self.stats.bytes_read += len as u64;
        // Install the later lines first, so the one asked for is the most recent.
        let mut first = 0;
        for i in (0..count).rev() {
            self.clock += 1;
            let slot = self.victim()?;
            let at = i as usize * LINE;
            let line = &mut self.lines[slot];
            line.data.copy_from_slice(&self.ahead[at..at + LINE]);
            line.index = index + i;
            line.last_use = self.clock;
            first = slot;
        }
        Ok(first)
    }

    /// Reads `data.len()` bytes at `offset` in page `page`.
    pub(crate) fn do_read(
        &mut self,
        page: usize,
        offset: usize,
        data: &mut [u8],
    ) -> Result<(), BlockError> {
        let mut at = self.range(page, offset, data.len())?;
        let mut done = 0;
        while done < data.len() {
            let slot = self.line_ahead(at / LINE as u64, data.len() >= LARGE_READ)?;
            let within = (at % LINE as u64) as usize;
            let n = (LINE - within).min(data.len() - done);
            data[done..done + n].copy_from_slice(&self.lines[slot].data[within..within + n]);
            done += n;
            at += n as u64;
        }
        Ok(())
    }

    /// Writes `data` at `offset` in page `page`.
    pub(crate) fn do_write(
        &mut self,
        page: usize,
        offset: usize,
        data: &[u8],
    ) -> Result<(), BlockError> {
        let start = self.range(page, offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let end = start + data.len() as u64;
        let sector = SECTOR_SIZE as u64;
        // A small write is a header whose first bytes make it valid (ekv's chunk header:
        // magic, length, CRC): across a sector boundary it is sent on its own, later sector
        // first, so a cut between them leaves the header invisible, not torn.
        let header = data.len() <= SMALL_WRITE && start / sector != (end - 1) / sector;
        // An append starts where the pending run ends, in the same page.
        let page_of = |at: u64| (at - BASE) / PAGE_SIZE as u64;
        let appends = !header
            && self
                .pending
                .is_some_and(|p| p.end == start && page_of(p.start) == page_of(start));
        if !appends {
            // Everything before this write reaches the device before it.
            self.send()?;
        }
        // Load every line first (which may send the pending run, if a line of it is the
        // oldest), then change them: they all stay cached (`LINES_PER_WRITE`).
        let first_line = start / LINE as u64;
        let last_line = (end - 1) / LINE as u64;
        for index in first_line..=last_line {
            self.line(index)?;
        }
        let mut at = start;
        while at < end {
            let index = at / LINE as u64;
            let within = (at % LINE as u64) as usize;
            let n = (LINE - within).min((end - at) as usize);
            let done = (at - start) as usize;
            let Some(line) = self.lines.iter_mut().find(|l| l.index == index) else {
                self.forget(first_line, last_line);
                return Err(BlockError::Io("a cache line of a write was evicted"));
            };
            line.data[within..within + n].copy_from_slice(&data[done..done + n]);
            at += n as u64;
        }
        if header {
            let later = (end - 1) / sector;
            for s in [later, later - 1] {
                let index = s * sector / LINE as u64;
                let within = (s * sector % LINE as u64) as usize;
                let result = match self.lines.iter().find(|l| l.index == index) {
                    Some(line) => self.dev.write(s, &line.data[within..within + SECTOR_SIZE]),
                    None => Err(BlockError::Io("a cache line of a write was evicted")),
                };
                if let Err(e) = result {
                    // The disk may or may not hold the new bytes: forget the lines.
                    self.forget(first_line, last_line);
                    return Err(e);
                }
                self.stats.writes += 1;
                self.stats.bytes_written += sector;
            }
            return Ok(());
        }
        self.pending = Some(match self.pending {
            // Extend the run (still pending: loading the lines did not send it).
            Some(p) if appends && p.end == start => Pending {
                start: p.start,
                end,
            },
            _ => Pending { start, end },
        });
        Ok(())
    }

    /// Drops lines `first..=last` from the cache (their bytes on the disk are unknown).
    fn forget(&mut self, first: u64, last: u64) {
        for l in &mut self.lines {
            if (first..=last).contains(&l.index) {
                l.index = u64::MAX;
            }
        }
    }

    /// Erases page `page` (zeros).
    pub(crate) fn do_erase(&mut self, page: usize) -> Result<(), BlockError> {
        let start = self.range(page, 0, PAGE_SIZE)?;
        // The pending run reaches the device before the erase.
        self.send()?;
        let first_line = start / LINE as u64;
        let end_line = first_line + (PAGE_SIZE / LINE) as u64;
        let result = self.dev.write(start / SECTOR_SIZE as u64, &self.zeros);
        self.zero_lines
            .retain(|z| !(first_line..end_line).contains(z));
        let mut cached = [false; PAGE_SIZE / LINE];
        for line in &mut self.lines {
            if (first_line..end_line).contains(&line.index) {
                match result {
                    Ok(()) => {
                        line.data.fill(0);
                        cached[(line.index - first_line) as usize] = true;
                    }
                    Err(_) => line.index = u64::MAX,
                }
            }
        }
        result?;
        self.stats.writes += 1;
        self.stats.bytes_written += PAGE_SIZE as u64;
        for (i, _) in cached.iter().enumerate().filter(|(_, &c)| !c) {
            if self.zero_lines.len() == ZERO_LINES {
                self.zero_lines.remove(0);
            }
            self.zero_lines.push(first_line + i as u64);
        }
        Ok(())
    }
}

impl<D: BlockDevice> Drop for Disk<D> {
    /// Sends the pending writes (not flushed: they were not acknowledged).
    fn drop(&mut self) {
        let _ = self.send();
    }
}

impl<D: BlockDevice> Flash for Disk<D> {
    type Error = DiskError;

    fn page_count(&self) -> usize {
        self.pages
    }

    async fn erase(&mut self, page_id: PageID) -> Result<(), DiskError> {
        self.do_erase(page_id.index())
            .map_err(|error| DiskError { op: "erase", error })
    }

    async fn read(
        &mut self,
        page_id: PageID,
        offset: usize,
        data: &mut [u8],
    ) -> Result<(), DiskError> {
        self.do_read(page_id.index(), offset, data)
            .map_err(|error| DiskError { op: "read", error })
    }

    async fn write(
        &mut self,
        page_id: PageID,
        offset: usize,
        data: &[u8],
    ) -> Result<(), DiskError> {
        self.do_write(page_id.index(), offset, data)
            .map_err(|error| DiskError { op: "write", error })
    }
}

/// Signature at the start of sector 0.
pub const MAGIC: [u8; 8] = *b"DPXSTORE";
/// Format version of the store's layout (superblock, key namespaces, head records).
pub const VERSION: u32 = 1;
const SUPER_LEN: usize = 44;

/// The superblock: what a store on this disk was formatted with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// ekv pages in use.
    pub pages: u32,
}

fn crc32(bytes: &[u8]) -> u32 {
    crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC).checksum(bytes)
}

/// The fixed fields, in order after the magic: version, page size, ekv's key and value
/// limits, the store's chunk size and inline limit, the base offset.
fn fixed_fields() -> [u32; 7] {
    [
        VERSION,
        PAGE_SIZE as u32,
        ekv::config::MAX_KEY_SIZE as u32,
        ekv::config::MAX_VALUE_SIZE as u32,
        crate::layout::CHUNK_LEN as u32,
        crate::layout::INLINE_MAX as u32,
        BASE as u32,
    ]
}

impl Superblock {
    /// Sector 0 for this superblock.
    pub fn encode(&self) -> [u8; SECTOR_SIZE] {
        let mut s = [0u8; SECTOR_SIZE];
        s[..8].copy_from_slice(&MAGIC);
        for (i, v) in fixed_fields().iter().enumerate() {
            s[8 + 4 * i..12 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        s[36..40].copy_from_slice(&self.pages.to_le_bytes());
        let crc = crc32(&s[..40]);
        s[40..SUPER_LEN].copy_from_slice(&crc.to_le_bytes());
        s
    }

    /// Reads sector 0: `Ok(None)` for a blank disk (all zeros).
    pub fn decode(s: &[u8; SECTOR_SIZE]) -> Result<Option<Superblock>, StoreError> {
        if s.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        if s[..8] != MAGIC {
            return Err(StoreError::NotAStore);
        }
        let word = |at: usize| u32::from_le_bytes([s[at], s[at + 1], s[at + 2], s[at + 3]]);
        if word(40) != crc32(&s[..40]) || s[SUPER_LEN..].iter().any(|&b| b != 0) {
            return Err(StoreError::Corrupted("the superblock (sector 0)"));
        }
        if word(8) != VERSION {
            return Err(StoreError::Incompatible("format version"));
        }
        for (i, v) in fixed_fields().iter().enumerate() {
            if word(8 + 4 * i) != *v {
                return Err(StoreError::Incompatible(
                    "page size, key or value limits, or chunk size",
                ));
            }
        }
        Ok(Some(Superblock { pages: word(36) }))
    }
}

/// How many pages fit a disk of `sectors` sectors (at most [`MAX_PAGES`]).
pub fn pages_for(sectors: u64) -> Result<usize, StoreError> {
    let min = (BASE + (MIN_PAGES * PAGE_SIZE) as u64) / SECTOR_SIZE as u64;
    let bytes = sectors.saturating_mul(SECTOR_SIZE as u64);
    if sectors < min {
        return Err(StoreError::TooSmall { sectors, min });
    }
    let pages = (bytes - BASE) / PAGE_SIZE as u64;
    Ok(pages.min(MAX_PAGES as u64) as usize)
}
