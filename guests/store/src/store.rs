//! [`Store`]: open (format or mount), get, put, put_many, remove, keys, stats — each one
//! ekv transaction, driven to completion by [`block_on`].

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use core::future::Future;
use core::ops::Bound;
use core::pin::pin;
use core::task::{Context, Poll, Waker};

use ekv::config::PAGE_SIZE;
use embassy_sync::blocking_mutex::raw::NoopRawMutex;

use crate::disk::{pages_for, Disk, DiskStats, Superblock};
use crate::error::StoreError;
use crate::layout::{self, chunk_key, decode_head, encode_head, head_key, Counters, Head};
use crate::{BlockDevice, MAX_KEY_LEN, MAX_VALUE_LEN, SECTOR_SIZE};

/// Polls before [`block_on`] gives up on a future that keeps returning `Pending`.
const MAX_POLLS: usize = 16;
/// ekv's wear-levelling seed (where page allocation starts); a disk does not wear, any
/// value does.
const SEED: u32 = 0x9E37_79B9;

/// Runs an ekv future to completion. ekv only waits on its own locks, which are free
/// while the store is used from one place, so the first poll finishes; a future that
/// keeps pending is an [`StoreError::Internal`] error instead of a hang.
fn block_on<F: Future>(fut: F) -> Result<F::Output, StoreError> {
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..MAX_POLLS {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return Ok(v);
        }
    }
    Err(StoreError::Internal("an ekv operation did not complete"))
}

/// What the store holds and has done (see [`Store::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Items (keys).
    pub items: u64,
    /// Bytes of all values.
    pub value_bytes: u64,
    /// Bytes of all keys.
    pub key_bytes: u64,
    /// Size of ekv's area of the disk.
    pub capacity_bytes: u64,
    /// Room left for new values, estimated: capacity less the live keys and values, the
    /// records' overhead and ekv's reserve for compaction. Space of overwritten and removed
    /// values comes back as ekv compacts; the real limit shows as [`StoreError::Full`].
    pub free_bytes: u64,
    /// Device requests since the store was opened.
    pub disk: DiskStats,
}

/// One ekv record of a transaction: written with these bytes, or deleted.
enum Rec<'a> {
    Owned(Vec<u8>),
    Borrowed(&'a [u8]),
    Delete,
}

/// The durable key-value store (see the crate's doc).
pub struct Store<D: BlockDevice> {
    db: ekv::Database<Disk<D>, NoopRawMutex>,
    counters: Counters,
    pages: usize,
    head: Vec<u8>,
}

impl<D: BlockDevice> Store<D> {
    /// Opens the store on `dev`: formats a blank disk (sector 0 all zeros), mounts an
    /// existing store (recovering from a crash), refuses anything else.
    pub fn open(mut dev: D) -> Result<Self, StoreError> {
        let sectors = dev.sectors();
        let fit = pages_for(sectors)?;
        let mut s0 = [0u8; SECTOR_SIZE];
        dev.read(0, &mut s0).map_err(StoreError::device("read"))?;
        let found = Superblock::decode(&s0)?;
        let pages = match found {
            Some(sb) if sb.pages as usize > fit || (sb.pages as usize) < crate::disk::MIN_PAGES => {
                return Err(StoreError::Corrupted(
                    "the superblock's page count does not fit the disk",
                ))
            }
            Some(sb) => sb.pages as usize,
            None => fit,
        };
        let mut config = ekv::Config::default();
        config.random_seed = SEED;
        let db = ekv::Database::new(Disk::new(dev, pages), config);
        if found.is_none() {
            block_on(db.format())??;
            let sb = Superblock {
                pages: pages as u32,
            };
            block_on(async {
                let mut disk = db.lock_flash().await;
                disk.flush()?;
                disk.device()
                    .write(0, &sb.encode())
                    .map_err(StoreError::device("write"))?;
                disk.flush()
            })??;
        }
        block_on(db.mount())??;
        let mut store = Store {
            db,
            counters: Counters::default(),
            pages,
            head: vec![0; layout::HEAD_MAX],
        };
        store.counters = store.read_counters()?;
        Ok(store)
    }

    fn read_counters(&mut self) -> Result<Counters, StoreError> {
        let db = &self.db;
        let mut buf = [0u8; 32];
        block_on(async {
            let rtx = db.read_transaction().await;
            match rtx.read(layout::COUNTERS_KEY, &mut buf).await {
                Ok(n) => Counters::decode(&buf[..n]),
                Err(ekv::ReadError::KeyNotFound) => Ok(Counters::default()),
                Err(ekv::ReadError::BufferTooSmall) => {
                    Err(StoreError::Corrupted("the counters record"))
                }
                Err(e) => Err(e.into()),
            }
        })?
    }

    /// The value of `key`, or `None`.
    pub fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        check_key(key)?;
        let db = &self.db;
        let head = &mut self.head;
        block_on(async {
            let rtx = db.read_transaction().await;
            let n = match rtx.read(&head_key(key), head).await {
                Ok(n) => n,
                Err(ekv::ReadError::KeyNotFound) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let (total, chunk_len, count) = match decode_head(&head[..n])? {
                Head::Inline(v) => return Ok(Some(v.to_vec())),
                Head::Chunked {
                    total,
                    chunk_len,
                    count,
                } => (total as usize, chunk_len as usize, count),
            };
            let mut value = Vec::new();
            value
                .try_reserve_exact(total)
                .map_err(|_| StoreError::OutOfMemory(total as u64))?;
            value.resize(total, 0);
            for (i, part) in (0..count).zip(value.chunks_mut(chunk_len)) {
                match rtx.read(&chunk_key(key, i), part).await {
                    Ok(n) if n == part.len() => {}
                    Ok(_) => return Err(StoreError::Corrupted("a value's chunk is short")),
                    Err(ekv::ReadError::KeyNotFound) => {
                        return Err(StoreError::Corrupted("a value's chunk is missing"))
                    }
                    Err(ekv::ReadError::BufferTooSmall) => {
                        return Err(StoreError::Corrupted("a value's chunk is too long"))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(Some(value))
        })?
    }

    /// Stores `value` under `key`; durable when `Ok`.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.put_many(&[(key, Some(value))])
    }

    /// Removes `key` (nothing happens if it is absent); durable when `Ok`.
    pub fn remove(&mut self, key: &[u8]) -> Result<(), StoreError> {
        self.put_many(&[(key, None)])
    }

    /// Stores (`Some`) or removes (`None`) several items in one transaction: after a crash
    /// all of them are done or none. A key given twice takes its last value. Durable when
    /// `Ok`.
    pub fn put_many(&mut self, items: &[(&[u8], Option<&[u8]>)]) -> Result<(), StoreError> {
        let mut wanted: BTreeMap<&[u8], Option<&[u8]>> = BTreeMap::new();
        for &(key, value) in items {
            check_key(key)?;
            if let Some(v) = value {
                if v.len() > MAX_VALUE_LEN {
                    return Err(StoreError::ValueTooLarge(v.len() as u64));
                }
            }
            wanted.insert(key, value);
        }
        let db = &self.db;
        let head = &mut self.head;
        let mut counters = self.counters;
        block_on(async {
            // What each key holds now: its length and chunk count.
            let mut old = Vec::with_capacity(wanted.len());
            {
                let rtx = db.read_transaction().await;
                for key in wanted.keys() {
                    old.push(match rtx.read(&head_key(key), head).await {
                        Ok(n) => {
                            let h = decode_head(&head[..n])?;
                            Some((h.value_len(), h.chunks()))
                        }
                        Err(ekv::ReadError::KeyNotFound) => None,
                        Err(e) => return Err(e.into()),
                    });
                }
            }
            let mut recs: BTreeMap<Vec<u8>, Rec<'_>> = BTreeMap::new();
            for ((key, value), old) in wanted.iter().zip(old) {
                let (old_len, old_chunks) = match old {
                    Some((len, chunks)) => {
                        counters.remove(key.len(), len);
                        (Some(len), chunks)
                    }
                    None => (None, 0),
                };
                let new_chunks = match value {
                    Some(v) => {
                        let (h, count) = encode_head(v);
                        recs.insert(head_key(key), Rec::Owned(h));
                        for (i, part) in (0..count).zip(v.chunks(layout::CHUNK_LEN)) {
                            recs.insert(chunk_key(key, i), Rec::Borrowed(part));
                        }
                        counters.add(key.len(), v.len() as u64);
                        count
                    }
                    None => {
                        if old_len.is_some() {
                            recs.insert(head_key(key), Rec::Delete);
                        }
                        0
                    }
                };
                for i in new_chunks..old_chunks {
                    recs.insert(chunk_key(key, i), Rec::Delete);
                }
            }
            if recs.is_empty() {
                return Ok(());
            }
            recs.insert(
                layout::COUNTERS_KEY.to_vec(),
                Rec::Owned(counters.encode().to_vec()),
            );
            let mut tx = db.write_transaction().await;
            for (k, rec) in &recs {
                match rec {
                    Rec::Owned(v) => tx.write(k, v).await?,
                    Rec::Borrowed(v) => tx.write(k, v).await?,
                    Rec::Delete => tx.delete(k).await?,
                }
            }
            tx.commit().await?;
            db.lock_flash().await.flush()
        })??;
        self.counters = counters;
        Ok(())
    }

    /// The keys that start with `prefix`, in ascending byte order.
    pub fn keys(&mut self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        if prefix.len() > MAX_KEY_LEN {
            return Ok(Vec::new());
        }
        let db = &self.db;
        let head = &mut self.head;
        let start = head_key(prefix);
        let end = layout::head_prefix_end(prefix);
        block_on(async {
            let rtx = db.read_transaction().await;
            let mut cursor = rtx
                .read_range((Bound::Included(&start[..]), Bound::Excluded(&end[..])))
                .await?;
            let mut keys = Vec::new();
            let mut kbuf = [0u8; ekv::config::MAX_KEY_SIZE];
            while let Some((klen, _)) = cursor.next(&mut kbuf, head).await? {
                match kbuf[..klen].split_first() {
                    Some((&layout::HEAD, key)) if key.starts_with(prefix) => {
                        keys.push(key.to_vec())
                    }
                    _ => return Err(StoreError::Corrupted("a key outside its range")),
                }
            }
            Ok(keys)
        })?
    }

    /// The store's counters and an estimate of its free room.
    pub fn stats(&self) -> StoreStats {
        let capacity_bytes = (self.pages * PAGE_SIZE) as u64;
        let c = self.counters;
        // Per record: a few bytes of header, the key with its prefix, and ekv's chunk
        // headers (about 1%); ekv keeps about a dozen pages free for compaction.
        let used = c.value_bytes + c.value_bytes / 64 + c.key_bytes * 2 + c.items * 16;
        let reserve = 16 * PAGE_SIZE as u64;
        let disk = block_on(async { self.db.lock_flash().await.stats() }).unwrap_or_default();
        StoreStats {
            items: c.items,
            value_bytes: c.value_bytes,
            key_bytes: c.key_bytes,
            capacity_bytes,
            free_bytes: capacity_bytes.saturating_sub(used + reserve),
            disk,
        }
    }
}

fn check_key(key: &[u8]) -> Result<(), StoreError> {
    if key.len() > MAX_KEY_LEN {
        return Err(StoreError::KeyTooLong(key.len()));
    }
    Ok(())
}
