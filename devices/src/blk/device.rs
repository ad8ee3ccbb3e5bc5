//! The virtio-blk device behind the transport ([`Blk`]): requests served on the guest's
//! notification, dirty-block marking, counters, and the state a snapshot takes.
//!
//! Guest input is never trusted: a chain of the wrong shape is answered `IOERR` (or, when
//! no status byte can be written, returned with length 0) and counted; a request beyond
//! the disk or of a length that is not a whole number of sectors is answered `IOERR`; an
//! unknown type `UNSUPP`. Nothing the guest writes makes the device panic.

use crate::GuestMemoryMmap;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::chain::{for_chunks, parse, split, ChainError, Layout, Request};
use super::dirty::DirtyBlocks;
use super::{
    id_ok, req, status, BlkBackend, BlkError, BlkStats, BLK_SIZE, CONFIG_BLK_SIZE_OFFSET,
    CONFIG_LEN, DEVICE_ID, F_BLK_SIZE, F_FLUSH, ID_LEN, QUEUE_SIZE, REQUEST_QUEUE, SECTOR_SIZE,
};
use crate::virtio::{ActivateError, Interrupt, VirtioDevice};

const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Data moves between guest memory and the backend through a buffer of this size.
const CHUNK: usize = 64 * 1024;

/// The started device's resources.
#[derive(Debug)]
pub(super) struct Active {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    pub irq: Arc<Interrupt>,
    /// The driver negotiated `FLUSH`: writes may stay in the host's page cache until it
    /// asks. Without it the device is write-through (a flush after every write).
    pub writeback: bool,
}

/// How a request ends: the status byte, the bytes written into the guest's buffers before
/// it (the used length is this + 1).
struct Answer {
    status: u8,
    written: u64,
}

impl Answer {
    const OK: Answer = Answer {
        status: status::OK,
        written: 0,
    };
    const IOERR: Answer = Answer {
        status: status::IOERR,
        written: 0,
    };
}

/// A virtio-blk device over backend `B`.
#[derive(Debug)]
pub struct Blk<B> {
    backend: B,
    id: String,
    /// In sectors.
    capacity: u64,
    active: Option<Active>,
    stats: BlkStats,
    dirty: DirtyBlocks,
    /// A used ring was written: the owner raises the interrupt ([`take_irq`](Self::take_irq)).
    irq_pending: bool,
    /// Asleep (nested count): nothing touches guest memory or the disk; notifications wait.
    asleep: u32,
    /// The guest notified while asleep.
    notify_waiting: bool,
    /// Scratch buffer for data on its way.
    buf: Vec<u8>,
}

impl<B: BlkBackend> Blk<B> {
    /// A device over `backend` whose `GET_ID` answers `id`, not started.
    pub fn new(backend: B, id: &str) -> Result<Self, BlkError> {
        if !id_ok(id) {
            return Err(BlkError::BadId(id.to_owned()));
        }
        let len = backend.disk_len();
        if len == 0 || !len.is_multiple_of(SECTOR_SIZE) {
            return Err(BlkError::BadDiskLen(len));
        }
        Ok(Blk {
            backend,
            id: id.to_owned(),
            capacity: len / SECTOR_SIZE,
            active: None,
            stats: BlkStats::default(),
            dirty: DirtyBlocks::new(len),
            irq_pending: false,
            asleep: 0,
            notify_waiting: false,
            buf: vec![0; CHUNK],
        })
    }

    /// A restored device: started with `active` (its live queue) or not, counters as saved.
    pub(super) fn restored(
        backend: B,
        id: &str,
        stats: BlkStats,
        active: Option<Active>,
    ) -> Result<Self, BlkError> {
        let mut blk = Blk::new(backend, id)?;
        blk.stats = stats;
        blk.active = active;
        Ok(blk)
    }

    /// The disk's size in sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The ID string.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The counters.
    pub fn stats(&self) -> BlkStats {
        self.stats
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub(super) fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    pub(super) fn dirty_mut(&mut self) -> &mut DirtyBlocks {
        &mut self.dirty
    }

    pub(super) fn active(&self) -> Option<&Active> {
        self.active.as_ref()
    }

    pub(super) fn notify_waiting(&self) -> bool {
        self.notify_waiting
    }

    /// The interrupt to raise, if a used ring was written since the last call. The owner
    /// raises it after releasing its lock.
    pub fn take_irq(&mut self) -> Option<Arc<Interrupt>> {
        if !std::mem::take(&mut self.irq_pending) {
            return None;
        }
        self.active.as_ref().map(|a| a.irq.clone())
    }

    /// Stops touching guest memory and the disk until the matching [`wake`](Self::wake)
    /// (nested).
    pub fn sleep(&mut self) {
        self.asleep += 1;
    }

    /// One sleep fewer; at the last, requests notified meanwhile are served.
    pub fn wake(&mut self) {
        self.asleep = self.asleep.saturating_sub(1);
        if self.asleep == 0 && std::mem::take(&mut self.notify_waiting) {
            self.process_queue();
        }
    }

    /// Serves the requests in the queue: at most twice the queue's size per call (another
    /// vCPU may keep adding; its own notification serves what this call left).
    pub fn process_queue(&mut self) {
        if self.asleep > 0 {
            self.notify_waiting = true;
            return;
        }
        let Some(active) = &self.active else {
            return;
        };
        let budget = usize::from(active.queue.size()) * 2;
        let mem = active.mem.clone();
        for _ in 0..budget {
            let Some(active) = &mut self.active else {
                return;
            };
            let chain = match active.queue.iter(&mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    log::debug!("blk: request queue: {e}");
                    self.stats.malformed += 1;
                    return;
                }
            };
            let Some(chain) = chain else {
                return;
            };
            let head = chain.head_index();
            let layout = parse(&mem, chain);
            let used = match layout {
                Layout::Ok(request) => {
                    let answer = self.serve(&mem, &request);
                    self.answer(&mem, request.status, &answer)
                }
                Layout::Bad(at, e) => {
                    log::debug!("blk: malformed request: {e}");
                    self.stats.malformed += 1;
                    self.answer(&mem, at, &Answer::IOERR)
                }
                Layout::Unanswerable(e) => {
                    log::debug!("blk: malformed request, not answered: {e}");
                    self.stats.malformed += 1;
                    0
                }
            };
            let Some(active) = &mut self.active else {
                return;
            };
            match active.queue.add_used(&mem, head, used) {
                Ok(()) => self.irq_pending = true,
                Err(_) => self.stats.malformed += 1,
            }
        }
    }

    /// Writes the status byte; the used length.
    fn answer(&mut self, mem: &GuestMemoryMmap, at: GuestAddress, answer: &Answer) -> u32 {
        if mem.write_obj(answer.status, at).is_err() {
            // Checked inside memory when the chain was read: cannot happen.
            self.stats.malformed += 1;
            return 0;
        }
        u32::try_from(answer.written.saturating_add(1)).unwrap_or(u32::MAX)
    }

    /// Runs one well-formed request.
    fn serve(&mut self, mem: &GuestMemoryMmap, r: &Request) -> Answer {
        let shape = match r.hdr.type_ {
            req::IN | req::GET_ID => r.out_len == 0,
            req::OUT => r.in_len == 0,
            req::FLUSH => r.in_len == 0 && r.out_len == 0,
            _ => {
                log::debug!("blk: unsupported request type {}", r.hdr.type_);
                self.stats.unsupported += 1;
                return Answer {
                    status: status::UNSUPP,
                    written: 0,
                };
            }
        };
        if !shape {
            log::debug!("blk: request {}: {}", r.hdr.type_, ChainError::Direction);
            self.stats.malformed += 1;
            return Answer::IOERR;
        }
        match r.hdr.type_ {
            req::IN => self.read(mem, r),
            req::OUT => self.write(mem, r),
            req::FLUSH => self.flush(),
            _ => self.get_id(mem, r),
        }
    }

    /// The byte offset of a request's data, if it lies inside the disk and is a whole
    /// number of sectors; counts the `IOERR` otherwise.
    fn data_range(&mut self, sector: u64, len: u64) -> Option<u64> {
        let disk_len = self.capacity * SECTOR_SIZE;
        let offset = sector
            .checked_mul(SECTOR_SIZE)
            .filter(|o| o.checked_add(len).is_some_and(|end| end <= disk_len));
        if offset.is_none() || !len.is_multiple_of(SECTOR_SIZE) {
            log::debug!(
                "blk: request for {len} bytes at sector {sector}: out of range or misaligned"
            );
            self.stats.io_errors += 1;
            return None;
        }
        offset
    }

    fn backend_failed(&mut self, what: &str, e: std::io::Error) {
        log::warn!("blk: disk {what}: {e}");
        self.stats.io_errors += 1;
        self.stats.backend_errors += 1;
    }

    fn read(&mut self, mem: &GuestMemoryMmap, r: &Request) -> Answer {
        let Some(base) = self.data_range(r.hdr.sector, r.in_len) else {
            return Answer::IOERR;
        };
        let Blk { backend, buf, .. } = self;
        let mut written = 0u64;
        let result = for_chunks(&r.inp, buf.len(), |addr, at, n| {
            let chunk = buf.get_mut(..n).unwrap_or_default();
            backend.read_at(chunk, base + at)?;
            mem.write_slice(chunk, addr)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            written += n as u64;
            Ok::<(), std::io::Error>(())
        });
        if let Err(e) = result {
            self.backend_failed("read", e);
            return Answer {
                status: status::IOERR,
                written,
            };
        }
        self.stats.reads += 1;
        self.stats.bytes_read += r.in_len;
        Answer {
            status: status::OK,
            written,
        }
    }

    fn write(&mut self, mem: &GuestMemoryMmap, r: &Request) -> Answer {
        let Some(base) = self.data_range(r.hdr.sector, r.out_len) else {
            return Answer::IOERR;
        };
        // Marked before the first byte goes: a write that fails half-way changed the disk too.
        self.dirty.mark(base, r.out_len);
        let Blk { backend, buf, .. } = self;
        let result = for_chunks(&r.out, buf.len(), |addr, at, n| {
            let chunk = buf.get_mut(..n).unwrap_or_default();
            mem.read_slice(chunk, addr)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            backend.write_at(chunk, base + at)
        });
        let writeback = self.active.as_ref().is_none_or(|a| a.writeback);
        let result = result.and_then(|()| {
            if writeback {
                Ok(())
            } else {
                self.backend.flush()
            }
        });
        if let Err(e) = result {
            self.backend_failed("write", e);
            return Answer::IOERR;
        }
        self.stats.writes += 1;
        self.stats.bytes_written += r.out_len;
        Answer::OK
    }

    fn flush(&mut self) -> Answer {
        if let Err(e) = self.backend.flush() {
            self.backend_failed("flush", e);
            return Answer::IOERR;
        }
        self.stats.flushes += 1;
        Answer::OK
    }

    /// The ID, NUL-padded to 20 bytes, cut to the guest's buffer.
    fn get_id(&mut self, mem: &GuestMemoryMmap, r: &Request) -> Answer {
        let mut id = [0u8; ID_LEN];
        let n = self.id.len().min(ID_LEN);
        id[..n].copy_from_slice(&self.id.as_bytes()[..n]);
        let want = r.in_len.min(ID_LEN as u64);
        let (room, _) = split(&r.inp, want);
        let mut written = 0u64;
        let result = for_chunks(&room, ID_LEN, |addr, at, n| {
            let from = usize::try_from(at).unwrap_or(usize::MAX);
            let Some(src) = from.checked_add(n).and_then(|end| id.get(from..end)) else {
                return Ok(());
            };
            mem.write_slice(src, addr)?;
            written += src.len() as u64;
            Ok::<(), vm_memory::GuestMemoryError>(())
        });
        if result.is_err() {
            self.stats.malformed += 1;
            return Answer::IOERR;
        }
        Answer {
            status: status::OK,
            written,
        }
    }
}

impl<B: BlkBackend> VirtioDevice for Blk<B> {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        F_FLUSH | F_BLK_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_LEN];
        config[..8].copy_from_slice(&self.capacity.to_le_bytes());
        config[CONFIG_BLK_SIZE_OFFSET..].copy_from_slice(&BLK_SIZE.to_le_bytes());
        crate::virtio::read_config_bytes(&config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: Arc<Interrupt>,
        acked_features: u64,
    ) -> Result<(), ActivateError> {
        let Some(queue) = queues.into_iter().next() else {
            return Err(ActivateError::Device("blk: one queue expected".into()));
        };
        if !queue.ready() {
            return Err(ActivateError::BadQueue(REQUEST_QUEUE));
        }
        self.active = Some(Active {
            mem,
            queue,
            irq,
            writeback: acked_features & F_FLUSH != 0,
        });
        self.irq_pending = false;
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        if index == REQUEST_QUEUE {
            self.process_queue();
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.irq_pending = false;
        self.notify_waiting = false;
    }
}
