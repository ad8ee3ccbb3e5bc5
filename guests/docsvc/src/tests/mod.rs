//! Host tests: block devices in memory (one that can stop persisting writes, for the crash
//! tests) and helpers.

mod crash;
mod documents;
mod rights;
mod sharing;

use std::cell::RefCell;
use std::rc::Rc;
use std::vec;
use std::vec::Vec;

use duplex_store::{BlockDevice, BlockError, SECTOR_SIZE};

use crate::DocService;

/// A disk in memory. `live` is what the running store sees; `durable` is what survives a
/// crash: every write reaches it while `budget` lasts (`None`: unlimited), none after.
#[derive(Clone)]
pub struct MemDisk {
    pub live: Rc<RefCell<Vec<u8>>>,
    pub durable: Rc<RefCell<Vec<u8>>>,
    pub budget: Rc<RefCell<Option<usize>>>,
    pub writes: Rc<RefCell<usize>>,
}

impl MemDisk {
    pub fn new(mib: usize) -> Self {
        Self::from_image(vec![0; mib << 20])
    }

    pub fn from_image(image: Vec<u8>) -> Self {
        MemDisk {
            live: Rc::new(RefCell::new(image.clone())),
            durable: Rc::new(RefCell::new(image)),
            budget: Rc::new(RefCell::new(None)),
            writes: Rc::new(RefCell::new(0)),
        }
    }

    /// What a crash now leaves on the disk.
    pub fn crash_image(&self) -> Vec<u8> {
        self.durable.borrow().clone()
    }
}

fn span(len: usize, sector: u64, buf_len: usize) -> Result<usize, BlockError> {
    if buf_len == 0 || !buf_len.is_multiple_of(SECTOR_SIZE) {
        return Err(BlockError::BadLength(buf_len));
    }
    let count = (buf_len / SECTOR_SIZE) as u64;
    match sector.checked_add(count) {
        Some(end) if end <= (len / SECTOR_SIZE) as u64 => Ok(sector as usize * SECTOR_SIZE),
        _ => Err(BlockError::OutOfRange { sector, count }),
    }
}

impl BlockDevice for MemDisk {
    fn sectors(&self) -> u64 {
        (self.live.borrow().len() / SECTOR_SIZE) as u64
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let b = self.live.borrow();
        let at = span(b.len(), sector, buf.len())?;
        buf.copy_from_slice(&b[at..at + buf.len()]);
        Ok(())
    }
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlockError> {
        let at = {
            let mut b = self.live.borrow_mut();
            let at = span(b.len(), sector, buf.len())?;
            b[at..at + buf.len()].copy_from_slice(buf);
            at
        };
        *self.writes.borrow_mut() += 1;
        let mut budget = self.budget.borrow_mut();
        let persist = match budget.as_mut() {
            None => true,
            Some(0) => false,
            Some(n) => {
                *n -= 1;
                true
            }
        };
        if persist {
            self.durable.borrow_mut()[at..at + buf.len()].copy_from_slice(buf);
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        Ok(())
    }
}

/// Deterministic bytes.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u8
        })
        .collect()
}

/// A service on a fresh disk of `mib` MiB.
pub fn fresh(mib: usize) -> (DocService<MemDisk>, MemDisk) {
    let disk = MemDisk::new(mib);
    let svc = DocService::open(disk.clone()).expect("open a blank disk");
    (svc, disk)
}

/// An account with a name and no email.
pub fn account(id: &str) -> duplex_docs::Account {
    duplex_docs::Account {
        id: id.into(),
        name: std::format!("User {id}"),
        email: None,
        email_verified: false,
    }
}
