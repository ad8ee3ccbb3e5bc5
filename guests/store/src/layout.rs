//! How the store's items are laid out as ekv records: key namespaces, head records
//! (a value inline, or a descriptor of its chunks), chunk records and the counters record.
//!
//! | ekv key | value |
//! | --- | --- |
//! | `00` ++ key | head: `00` ++ value (≤ [`INLINE_MAX`] bytes), or `01` ++ total length (u64 LE) ++ chunk length (u32 LE) ++ chunk count (u32 LE) |
//! | `01` ++ key length (u8) ++ key ++ chunk index (u32 BE) | the chunk's bytes ([`CHUNK_LEN`], the last one shorter) |
//! | `02 73` (`"\x02s"`) | counters: items, value bytes, key bytes (u64 LE each) |
//!
//! Heads sort by user key (so [`crate::Store::keys`] is one range read of namespace `00`);
//! chunk keys are length-prefixed, so no user key's chunks can collide with another's.

use alloc::vec::Vec;

use crate::error::StoreError;
use crate::{MAX_KEY_LEN, MAX_VALUE_LEN};

/// Namespace of head records.
pub const HEAD: u8 = 0x00;
/// Namespace of chunk records.
pub const CHUNK: u8 = 0x01;
/// The counters record's key.
pub const COUNTERS_KEY: &[u8] = b"\x02s";

/// Largest value stored inside its head record; longer ones are chunked.
pub const INLINE_MAX: usize = 4096;
/// Bytes per chunk of a chunked value (ekv's largest record value).
pub const CHUNK_LEN: usize = ekv::config::MAX_VALUE_SIZE;
/// Largest head record.
pub const HEAD_MAX: usize = 1 + INLINE_MAX;

const TAG_INLINE: u8 = 0;
const TAG_CHUNKED: u8 = 1;
const DESCRIPTOR_LEN: usize = 17;

const _: () = assert!(1 + 1 + MAX_KEY_LEN + 4 <= ekv::config::MAX_KEY_SIZE);
const _: () = assert!(HEAD_MAX <= ekv::config::MAX_VALUE_SIZE && INLINE_MAX < CHUNK_LEN);

/// The head record's key for `key`.
pub fn head_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(HEAD);
    k.extend_from_slice(key);
    k
}

/// The key of chunk `index` of `key`'s value.
pub fn chunk_key(key: &[u8], index: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + key.len() + 4);
    k.push(CHUNK);
    k.push(key.len() as u8);
    k.extend_from_slice(key);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// The first key after every head key that starts with `prefix` (the end of a range).
pub fn head_prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = head_key(prefix);
    while let Some(last) = end.pop() {
        if last != 0xFF {
            end.push(last + 1);
            return end;
        }
    }
    // Unreachable: the namespace byte (00) is never 0xFF.
    alloc::vec![HEAD + 1]
}

/// A decoded head record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head<'a> {
    /// The value itself.
    Inline(&'a [u8]),
    /// The value is in `count` chunk records of `chunk_len` bytes (the last one shorter).
    Chunked {
        /// The value's length.
        total: u64,
        /// Bytes per chunk.
        chunk_len: u32,
        /// Chunk records.
        count: u32,
    },
}

impl Head<'_> {
    /// The value's length.
    pub fn value_len(&self) -> u64 {
        match self {
            Head::Inline(v) => v.len() as u64,
            Head::Chunked { total, .. } => *total,
        }
    }

    /// Chunk records the value has.
    pub fn chunks(&self) -> u32 {
        match self {
            Head::Inline(_) => 0,
            Head::Chunked { count, .. } => *count,
        }
    }
}

/// The head record for a value of `value.len()` bytes, and how many chunks follow.
pub fn encode_head(value: &[u8]) -> (Vec<u8>, u32) {
    if value.len() <= INLINE_MAX {
        let mut h = Vec::with_capacity(1 + value.len());
        h.push(TAG_INLINE);
        h.extend_from_slice(value);
        return (h, 0);
    }
    let count = value.len().div_ceil(CHUNK_LEN) as u32;
    let mut h = Vec::with_capacity(DESCRIPTOR_LEN);
    h.push(TAG_CHUNKED);
    h.extend_from_slice(&(value.len() as u64).to_le_bytes());
    h.extend_from_slice(&(CHUNK_LEN as u32).to_le_bytes());
    h.extend_from_slice(&count.to_le_bytes());
    (h, count)
}

/// Decodes a head record, checking that a descriptor is self-consistent.
pub fn decode_head(h: &[u8]) -> Result<Head<'_>, StoreError> {
    match h.split_first() {
        Some((&TAG_INLINE, value)) if value.len() <= INLINE_MAX => Ok(Head::Inline(value)),
        Some((&TAG_CHUNKED, d)) if d.len() == DESCRIPTOR_LEN - 1 => {
            let total = u64::from_le_bytes(d[..8].try_into().unwrap_or_default());
            let chunk_len = u32::from_le_bytes(d[8..12].try_into().unwrap_or_default());
            let count = u32::from_le_bytes(d[12..16].try_into().unwrap_or_default());
            let ok = chunk_len > 0
                && chunk_len as usize <= CHUNK_LEN
                && total > INLINE_MAX as u64
                && total <= MAX_VALUE_LEN as u64
                && u64::from(count) == total.div_ceil(u64::from(chunk_len));
            if !ok {
                return Err(StoreError::Corrupted("a chunked value's descriptor"));
            }
            Ok(Head::Chunked {
                total,
                chunk_len,
                count,
            })
        }
        _ => Err(StoreError::Corrupted("an item's head record")),
    }
}

/// The store's counters, kept in the counters record and updated in every transaction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Items (keys).
    pub items: u64,
    /// Bytes of all values.
    pub value_bytes: u64,
    /// Bytes of all keys.
    pub key_bytes: u64,
}

impl Counters {
    /// The counters record.
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0; 24];
        b[..8].copy_from_slice(&self.items.to_le_bytes());
        b[8..16].copy_from_slice(&self.value_bytes.to_le_bytes());
        b[16..].copy_from_slice(&self.key_bytes.to_le_bytes());
        b
    }

    /// Decodes the counters record.
    pub fn decode(b: &[u8]) -> Result<Counters, StoreError> {
        if b.len() != 24 {
            return Err(StoreError::Corrupted("the counters record"));
        }
        let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        Ok(Counters {
            items: word(0),
            value_bytes: word(8),
            key_bytes: word(16),
        })
    }

    /// Takes out an item of `key_len` and `value_len` bytes (saturating: counters of a
    /// damaged store must not panic).
    pub fn remove(&mut self, key_len: usize, value_len: u64) {
        self.items = self.items.saturating_sub(1);
        self.key_bytes = self.key_bytes.saturating_sub(key_len as u64);
        self.value_bytes = self.value_bytes.saturating_sub(value_len);
    }

    /// Adds an item of `key_len` and `value_len` bytes.
    pub fn add(&mut self, key_len: usize, value_len: u64) {
        self.items = self.items.saturating_add(1);
        self.key_bytes = self.key_bytes.saturating_add(key_len as u64);
        self.value_bytes = self.value_bytes.saturating_add(value_len);
    }
}
