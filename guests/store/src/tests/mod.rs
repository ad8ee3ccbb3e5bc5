//! Host tests: block devices in memory, in a file, and logging every write (for the crash
//! tests), plus a small deterministic random generator.

mod adapter;
mod basic;
mod crash;

use std::cell::RefCell;
use std::rc::Rc;
use std::vec;
use std::vec::Vec;

use crate::{BlockDevice, BlockError, SECTOR_SIZE};

/// Checks a request against a disk of `len` bytes; the byte offset.
fn span(len: usize, sector: u64, buf_len: usize) -> Result<usize, BlockError> {
    if buf_len == 0 || !buf_len.is_multiple_of(SECTOR_SIZE) {
        return Err(BlockError::BadLength(buf_len));
    }
    let count = (buf_len / SECTOR_SIZE) as u64;
    let end = sector.checked_add(count);
    if end.is_none_or(|e| e > (len / SECTOR_SIZE) as u64) {
        return Err(BlockError::OutOfRange { sector, count });
    }
    Ok(sector as usize * SECTOR_SIZE)
}

/// A disk in memory whose bytes outlive the store (shared), so a test can reopen them.
#[derive(Clone)]
pub struct MemDisk {
    pub bytes: Rc<RefCell<Vec<u8>>>,
}

impl MemDisk {
    pub fn new(mib: usize) -> Self {
        Self::from_image(vec![0; mib << 20])
    }

    pub fn from_image(image: Vec<u8>) -> Self {
        MemDisk {
            bytes: Rc::new(RefCell::new(image)),
        }
    }

    pub fn image(&self) -> Vec<u8> {
        self.bytes.borrow().clone()
    }
}

impl BlockDevice for MemDisk {
    fn sectors(&self) -> u64 {
        (self.bytes.borrow().len() / SECTOR_SIZE) as u64
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let b = self.bytes.borrow();
        let at = span(b.len(), sector, buf.len())?;
        buf.copy_from_slice(&b[at..at + buf.len()]);
        Ok(())
    }
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlockError> {
        let mut b = self.bytes.borrow_mut();
        let at = span(b.len(), sector, buf.len())?;
        b[at..at + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        Ok(())
    }
}

/// One write a [`LogDisk`] saw, and the workload step that made it.
pub struct Logged {
    pub step: usize,
    pub sector: u64,
    pub data: Vec<u8>,
}

/// A [`MemDisk`] that records every write with the workload step in progress.
pub struct LogDisk {
    pub disk: MemDisk,
    pub step: Rc<RefCell<usize>>,
    pub log: Rc<RefCell<Vec<Logged>>>,
}

impl BlockDevice for LogDisk {
    fn sectors(&self) -> u64 {
        self.disk.sectors()
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.disk.read(sector, buf)
    }
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.disk.write(sector, buf)?;
        self.log.borrow_mut().push(Logged {
            step: *self.step.borrow(),
            sector,
            data: buf.to_vec(),
        });
        Ok(())
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        Ok(())
    }
}

/// A disk in a host file (sparse, like the monitor's backing file).
pub struct FileDisk {
    pub file: std::fs::File,
    pub sectors: u64,
}

impl BlockDevice for FileDisk {
    fn sectors(&self) -> u64 {
        self.sectors
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        use std::os::unix::fs::FileExt;
        span((self.sectors as usize) * SECTOR_SIZE, sector, buf.len())?;
        self.file
            .read_exact_at(buf, sector * SECTOR_SIZE as u64)
            .map_err(|_| BlockError::Io("pread"))
    }
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlockError> {
        use std::os::unix::fs::FileExt;
        span((self.sectors as usize) * SECTOR_SIZE, sector, buf.len())?;
        self.file
            .write_all_at(buf, sector * SECTOR_SIZE as u64)
            .map_err(|_| BlockError::Io("pwrite"))
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        self.file
            .sync_data()
            .map_err(|_| BlockError::Io("fdatasync"))
    }
}

/// xorshift64*: deterministic test randomness.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}
