//! Memory-file checksums: the CRC-32 of a memory file's non-zero pages, each fed with its
//! file offset, in file order (see `docs/snapshot-format.md`), computed per 1 MiB chunk and
//! combined; and the whole-file CRC-32 of small files.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::sys::{self, PAGE};

/// Bytes of memory file per CRC chunk: the file's CRC is computed per chunk and the chunks
/// combined in order (`crc32fast::Hasher::combine`), which gives the same value as one pass
/// over the file, lets a second pass recompute only the chunks it rewrote, and lets
/// verification use every core.
const CRC_CHUNK: u64 = 1 << 20;

/// The CRC state of a memory file, per chunk (pages are fed in file order within a chunk).
#[derive(Debug, Clone, Default)]
pub(crate) struct MemCrc {
    chunks: BTreeMap<u64, crc32fast::Hasher>,
}

impl MemCrc {
    pub fn new() -> Self {
        MemCrc::default()
    }

    /// Adds one page at `offset` (zero pages must not be fed).
    pub fn page(&mut self, offset: u64, page: &[u8]) {
        let h = self.chunks.entry(offset / CRC_CHUNK).or_default();
        h.update(&offset.to_le_bytes());
        h.update(page);
    }

    /// The chunk holding file offset `offset`.
    pub fn chunk_of(offset: u64) -> u64 {
        offset / CRC_CHUNK
    }

    /// Computes chunk `chunk` again from `file` (of length `len`), e.g. after pages in it
    /// were written again.
    pub fn recompute(&mut self, file: &File, len: u64, chunk: u64) -> io::Result<()> {
        let start = chunk * CRC_CHUNK;
        let end = (start + CRC_CHUNK).min(len);
        let mut buf = vec![0u8; (end.saturating_sub(start)) as usize];
        let h = chunk_crc(file, start, end, &mut buf)?.0;
        self.chunks.insert(chunk, h);
        Ok(())
    }

    /// The file's CRC.
    pub fn finish(&self) -> u32 {
        let mut all = crc32fast::Hasher::new();
        for h in self.chunks.values() {
            all.combine(h);
        }
        all.finalize()
    }
}

/// The CRC (hasher) of the non-zero pages in `[start, end)` of `file`, reading it into
/// `buf`; and the bytes read. Holes read as zeros, which are skipped.
fn chunk_crc(
    file: &File,
    start: u64,
    end: u64,
    buf: &mut Vec<u8>,
) -> io::Result<(crc32fast::Hasher, u64)> {
    let n = end.saturating_sub(start) as usize;
    buf.resize(n, 0);
    file.read_exact_at(&mut buf[..n], start)?;
    let mut h = crc32fast::Hasher::new();
    for (i, page) in buf[..n].chunks(PAGE).enumerate() {
        if !sys::is_zero(page) {
            h.update(&(start + (i * PAGE) as u64).to_le_bytes());
            h.update(page);
        }
    }
    Ok((h, n as u64))
}

/// Computes a memory file's checksum from its data extents (every byte if the file system
/// cannot tell holes), skipping zero pages, a chunk at a time on every core. Returns the
/// CRC and the bytes read.
pub(crate) fn checksum(file: &File, len: u64) -> io::Result<(u32, u64)> {
    let extents = sys::page_extents(file, 0, len)?;
    sys::prefetch(file, &extents);
    // The chunks that hold data, with the data ranges inside each.
    let mut chunks: Vec<(u64, Vec<(u64, u64)>)> = Vec::new();
    for (s, e) in extents {
        let mut pos = s;
        while pos < e {
            let c = pos / CRC_CHUNK;
            let end = e.min((c + 1) * CRC_CHUNK);
            match chunks.last_mut() {
                Some((last, ranges)) if *last == c => ranges.push((pos, end)),
                _ => chunks.push((c, vec![(pos, end)])),
            }
            pos = end;
        }
    }
    let workers = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, 8)
        .min(chunks.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    // Read through a mapping: no copy out of the page cache.
    let map = sys::FileMap::new(file, len)?;
    let work = || -> io::Result<Vec<(usize, crc32fast::Hasher, u64)>> {
        let mut out = Vec::new();
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some((_, ranges)) = chunks.get(i) else {
                return Ok(out);
            };
            let mut h = crc32fast::Hasher::new();
            let mut read = 0;
            for &(s, e) in ranges {
                let bytes = map.slice(s, e);
                for (k, page) in bytes.chunks(PAGE).enumerate() {
                    if !sys::is_zero(page) {
                        h.update(&(s + (k * PAGE) as u64).to_le_bytes());
                        h.update(page);
                    }
                }
                read += bytes.len() as u64;
            }
            out.push((i, h, read));
        }
    };
    let results: Vec<io::Result<Vec<(usize, crc32fast::Hasher, u64)>>> = if workers <= 1 {
        vec![work()]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers).map(|_| scope.spawn(work)).collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(io::Error::other("a checksum thread panicked")))
                })
                .collect()
        })
    };
    if map.truncated() {
        // Pages past the new end were read as zeros (see `guard`), not as the file's.
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the file was truncated while it was read",
        ));
    }
    let mut parts: Vec<Option<(crc32fast::Hasher, u64)>> = vec![None; chunks.len()];
    for r in results {
        for (i, h, n) in r? {
            parts[i] = Some((h, n));
        }
    }
    let mut all = crc32fast::Hasher::new();
    let mut read = 0;
    for (h, n) in parts.into_iter().flatten() {
        all.combine(&h);
        read += n;
    }
    Ok((all.finalize(), read))
}

/// CRC-32 of a whole (small) file, with its length.
pub(crate) fn whole_file_crc(file: &File) -> io::Result<(u32, u64)> {
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    loop {
        let n = file.read_at(&mut buf, pos)?;
        if n == 0 {
            return Ok((h.finalize(), pos));
        }
        h.update(&buf[..n]);
        pos += n as u64;
    }
}
