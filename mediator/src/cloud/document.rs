//! What a job carries and what its result must be: the document is `document_len`
//! pseudo-random bytes made from the job's seed (so the relay's CRC can be checked
//! without storing it), and the page checksums are the engine's for `(seed, page, width,
//! height)` (`duplex_link::expected_page_checksum`).

use duplex_link::print::{Crc32, SplitMix64};

/// Mixed into the job's seed for the document's generator ("DOCUMENT").
pub const DOCUMENT_MIX: u64 = 0x444F_4355_4D45_4E54;

/// The document of a job, produced in chunks: byte `i` is byte `i % 8` (little-endian) of
/// output `i / 8` of splitmix64 seeded with `seed ^ DOCUMENT_MIX`.
pub struct Document {
    rng: SplitMix64,
    remaining: u64,
    crc: Crc32,
}

impl Document {
    /// The `len` bytes of seed `seed`.
    pub fn new(seed: u64, len: u64) -> Self {
        Document {
            rng: SplitMix64::new(seed ^ DOCUMENT_MIX),
            remaining: len,
            crc: Crc32::new(),
        }
    }

    /// The next chunk of at most `max` bytes (a multiple of 8), `None` at the end.
    pub fn next_chunk(&mut self, max: usize) -> Option<Vec<u8>> {
        if self.remaining == 0 {
            return None;
        }
        let n = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(max & !7)
            .max(1);
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.rng.next().to_le_bytes());
        }
        out.truncate(n);
        self.remaining -= n as u64;
        self.crc.update(&out);
        Some(out)
    }

    /// The CRC-32/ISO-HDLC of every byte produced (call at the end).
    pub fn crc32(self) -> u32 {
        self.crc.finish()
    }
}

/// The CRC of a whole document, without keeping it.
pub fn document_crc32(seed: u64, len: u64) -> u32 {
    let mut doc = Document::new(seed, len);
    while doc.next_chunk(1 << 16).is_some() {}
    doc.crc32()
}

/// The checksums the engine answers for pages `0..pages`.
pub fn expected_checksums(seed: u64, pages: u32, width: u16, height: u16) -> Vec<u32> {
    (0..pages)
        .map(|p| duplex_link::expected_page_checksum(seed, p, width, height))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_do_not_change_the_bytes() {
        let mut a = Document::new(7, 100_001);
        let mut whole = Vec::new();
        while let Some(c) = a.next_chunk(1 << 16) {
            assert!(c.len() <= 1 << 16);
            whole.extend(c);
        }
        assert_eq!(whole.len(), 100_001);
        let crc = a.crc32();
        let mut b = Document::new(7, 100_001);
        let mut small = Vec::new();
        while let Some(c) = b.next_chunk(24) {
            small.extend(c);
        }
        assert_eq!(whole, small);
        let mut c = Crc32::new();
        c.update(&whole);
        assert_eq!(c.finish(), crc);
        assert_eq!(document_crc32(7, 100_001), crc);
        assert_eq!(document_crc32(7, 0), 0);
        assert_ne!(document_crc32(8, 100_001), crc);
    }
}
