//! The disk's dirty blocks ([`DirtyBlocks`]): one bit per 4 KiB block of the disk, set by
//! every write that touches the block (a partial write marks the whole block), in the word
//! layout of KVM's dirty log, so that the snapshot code treats the disk as it treats memory.

use super::DIRTY_BLOCK_SIZE;

/// A bitmap of the disk's 4 KiB blocks written since it was last taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBlocks {
    words: Vec<u64>,
    blocks: u64,
}

impl DirtyBlocks {
    /// A clean bitmap for a disk of `disk_len` bytes (its last block may be partial).
    pub fn new(disk_len: u64) -> Self {
        let blocks = disk_len.div_ceil(DIRTY_BLOCK_SIZE);
        DirtyBlocks {
            words: vec![0; blocks.div_ceil(64) as usize],
            blocks,
        }
    }

    /// The number of blocks tracked.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Marks the blocks that bytes `offset..offset + len` of the disk touch (nothing for
    /// `len` 0; blocks beyond the disk are ignored).
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / DIRTY_BLOCK_SIZE;
        let last = offset.saturating_add(len - 1) / DIRTY_BLOCK_SIZE;
        for block in first..=last.min(self.blocks.saturating_sub(1)) {
            if let Some(word) = self.words.get_mut((block / 64) as usize) {
                *word |= 1 << (block % 64);
            }
        }
    }

    /// Whether block `block` is dirty.
    pub fn is_dirty(&self, block: u64) -> bool {
        self.words
            .get((block / 64) as usize)
            .is_some_and(|w| w & (1 << (block % 64)) != 0)
    }

    /// The bitmap (bit `i % 64` of word `i / 64` for block `i`), cleared.
    pub fn take(&mut self) -> Vec<u64> {
        let clean = vec![0; self.words.len()];
        std::mem::replace(&mut self.words, clean)
    }

    /// Clears the bitmap.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// The dirty blocks' numbers, ascending (of a bitmap [`take`](Self::take) returned).
    pub fn block_numbers(words: &[u64]) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, &w) in words.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let bit = u64::from(w.trailing_zeros());
                out.push(i as u64 * 64 + bit);
                w &= w - 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_every_block_a_range_touches_and_take_clears() {
        // 130 blocks and a partial one: three words.
        let mut d = DirtyBlocks::new(130 * 4096 + 512);
        assert_eq!(d.blocks(), 131);
        d.mark(4095, 2); // blocks 0 and 1
        d.mark(64 * 4096, 512); // block 64
        d.mark(130 * 4096, 512); // the partial last block
        d.mark(10 * 4096, 0); // nothing
        d.mark(u64::MAX - 10, 10); // beyond the disk: ignored
        let words = d.take();
        assert_eq!(words.len(), 3);
        assert_eq!(words, vec![0b11, 1, 1 << 2]);
        assert_eq!(DirtyBlocks::block_numbers(&words), vec![0, 1, 64, 130]);
        assert_eq!(d.take(), vec![0; 3], "taken: clean");
        d.mark(0, 3 * 4096);
        assert!(d.is_dirty(2) && !d.is_dirty(3));
        d.clear();
        assert!(!d.is_dirty(0));
    }
}
