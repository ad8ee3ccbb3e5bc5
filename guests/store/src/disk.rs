//! The flash adapter: ekv's [`ekv::flash::Flash`] (pages erased to `0x00`, written once)
//! over a [`BlockDevice`] of 512-byte sectors, with a small read cache; and the superblock
//! in sector 0.
//!
//! * ekv page `p` is the byte range `BASE + p * PAGE_SIZE ..` of the disk; the first
//!   [`BASE`] bytes hold the superblock (sector 0) and are otherwise unused.
//! * **Erase** writes `PAGE_SIZE` zero bytes (one request). ekv is configured with an erase
//!   value of `0x00`, so a blank (sparse, all-zero) disk already reads as erased.
//! * **Write** changes only the bytes ekv names, but a disk writes whole sectors: the
//!   adapter updates its cached copy of the sectors and writes the sectors the range
//!   covers. The other bytes of those sectors are written back unchanged, so a write torn
//!   anywhere leaves each byte either as it was or as it was meant to be, never anything
//!   else (ekv's rule that a write must not disturb bytes beside it holds as long as the
//!   disk does not invent data in a torn sector, which a file or a real disk does not).
//!   ekv's chunk header (8 bytes: magic, length, CRC) is valid once its magic is there,
//!   so a header that straddles two sectors is written later sector first: a crash
//!   between the two leaves it invisible rather than half written.
//! * **Reads** go through a cache of [`CACHE_LINES`] lines of [`LINE`] bytes (least recently
//!   used out): ekv reads small headers one at a time.
//! * Writes reach the device in the order ekv makes them; the caller flushes
//!   ([`Disk::flush`]) to make them durable.

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
/// Writes up to this size are headers, written last sector first (see `do_write`).
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

/// ekv's flash over a block device (see the module's doc).
pub struct Disk<D: BlockDevice> {
    dev: D,
    pages: usize,
    lines: Vec<Line>,
    clock: u64,
    zeros: Vec<u8>,
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
            stats: DiskStats::default(),
        }
    }

    /// The counters since [`Disk::new`].
    pub fn stats(&self) -> DiskStats {
        self.stats
    }

    /// Makes every write so far durable.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        self.stats.flushes += 1;
        self.dev.flush().map_err(StoreError::device("flush"))
    }

    /// The device (for the superblock).
    pub fn device(&mut self) -> &mut D {
        &mut self.dev
    }

    fn range(&self, page: PageID, offset: usize, len: usize) -> Result<u64, BlockError> {
        let p = page.index();
        if p >= self.pages || offset > PAGE_SIZE || len > PAGE_SIZE - offset {
            return Err(BlockError::OutOfRange {
                sector: (BASE + (p * PAGE_SIZE + offset) as u64) / SECTOR_SIZE as u64,
                count: len.div_ceil(SECTOR_SIZE) as u64,
            });
        }
        Ok(BASE + (p * PAGE_SIZE + offset) as u64)
    }

    /// The cache slot of line `index`, read from the device if it is not cached.
    fn line(&mut self, index: u64) -> Result<usize, BlockError> {
        self.clock += 1;
        if let Some(i) = self.lines.iter().position(|l| l.index == index) {
            self.lines[i].last_use = self.clock;
            return Ok(i);
        }
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
            oldest
        };
        let line = &mut self.lines[slot];
        line.index = u64::MAX;
        self.dev
            .read(index * (LINE / SECTOR_SIZE) as u64, &mut line.data)?;
        self.stats.reads += 1;
        self.stats.bytes_read += LINE as u64;
        line.index = index;
        line.last_use = self.clock;
        Ok(slot)
    }

    fn do_read(&mut self, page: PageID, offset: usize, data: &mut [u8]) -> Result<(), BlockError> {
        let mut at = self.range(page, offset, data.len())?;
        let mut done = 0;
        while done < data.len() {
            let slot = self.line(at / LINE as u64)?;
            let within = (at % LINE as u64) as usize;
            let n = (LINE - within).min(data.len() - done);
            data[done..done + n].copy_from_slice(&self.lines[slot].data[within..within + n]);
            done += n;
            at += n as u64;
        }
        Ok(())
    }

    fn do_write(&mut self, page: PageID, offset: usize, data: &[u8]) -> Result<(), BlockError> {
        let mut at = self.range(page, offset, data.len())?;
        let mut done = 0;
        while done < data.len() {
            let index = at / LINE as u64;
            let slot = self.line(index)?;
            let within = (at % LINE as u64) as usize;
            let n = (LINE - within).min(data.len() - done);
            let line = &mut self.lines[slot];
            line.data[within..within + n].copy_from_slice(&data[done..done + n]);
            let first = within / SECTOR_SIZE;
            let end = (within + n).div_ceil(SECTOR_SIZE);
            let sector = index * (LINE / SECTOR_SIZE) as u64 + first as u64;
            // A small write is a header whose first bytes make it valid (ekv's chunk
            // header: magic, length, CRC): across a sector boundary, write the later
            // sector first, so a cut between them leaves the header invisible, not torn.
            let pieces: &[(usize, usize)] = if data.len() <= SMALL_WRITE && end - first > 1 {
                &[(first + 1, end), (first, first + 1)]
            } else {
                &[(first, end)]
            };
            for &(a, b) in pieces {
                let bytes = &line.data[a * SECTOR_SIZE..b * SECTOR_SIZE];
                if let Err(e) = self.dev.write(sector + (a - first) as u64, bytes) {
                    // The disk may or may not hold the new bytes: forget the line.
                    line.index = u64::MAX;
                    return Err(e);
                }
                self.stats.writes += 1;
                self.stats.bytes_written += bytes.len() as u64;
            }
            done += n;
            at += n as u64;
        }
        Ok(())
    }

    fn do_erase(&mut self, page: PageID) -> Result<(), BlockError> {
        let start = self.range(page, 0, PAGE_SIZE)?;
        let first_line = start / LINE as u64;
        let end_line = first_line + (PAGE_SIZE / LINE) as u64;
        let result = self.dev.write(start / SECTOR_SIZE as u64, &self.zeros);
        for line in &mut self.lines {
            if (first_line..end_line).contains(&line.index) {
                match result {
                    Ok(()) => line.data.fill(0),
                    Err(_) => line.index = u64::MAX,
                }
            }
        }
        result?;
        self.stats.writes += 1;
        self.stats.bytes_written += PAGE_SIZE as u64;
        Ok(())
    }
}

impl<D: BlockDevice> Flash for Disk<D> {
    type Error = DiskError;

    fn page_count(&self) -> usize {
        self.pages
    }

    async fn erase(&mut self, page_id: PageID) -> Result<(), DiskError> {
        self.do_erase(page_id)
            .map_err(|error| DiskError { op: "erase", error })
    }

    async fn read(
        &mut self,
        page_id: PageID,
        offset: usize,
        data: &mut [u8],
    ) -> Result<(), DiskError> {
        self.do_read(page_id, offset, data)
            .map_err(|error| DiskError { op: "read", error })
    }

    async fn write(
        &mut self,
        page_id: PageID,
        offset: usize,
        data: &[u8],
    ) -> Result<(), DiskError> {
        self.do_write(page_id, offset, data)
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
