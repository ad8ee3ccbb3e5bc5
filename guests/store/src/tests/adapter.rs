//! The flash adapter on its own: which device requests ekv's writes become (appends merged
//! into one pending run, sent in order), and that reads, evictions and flushes see them.

use std::cell::RefCell;
use std::rc::Rc;
use std::vec;
use std::vec::Vec;

use ekv::config::PAGE_SIZE;

use super::{LogDisk, Logged, MemDisk, Rng};
use crate::disk::{Disk, BASE, CACHE_LINES, LINE};
use crate::SECTOR_SIZE;

struct Rig {
    disk: Disk<LogDisk>,
    mem: MemDisk,
    log: Rc<RefCell<Vec<Logged>>>,
}

fn rig() -> Rig {
    let mem = MemDisk::new(4);
    let log = Rc::new(RefCell::new(Vec::new()));
    let dev = LogDisk {
        disk: mem.clone(),
        step: Rc::new(RefCell::new(0)),
        log: log.clone(),
    };
    Rig {
        disk: Disk::new(dev, 100),
        mem,
        log,
    }
}

/// Byte offset on the disk of `offset` in page `p`.
fn at(p: usize, offset: usize) -> usize {
    BASE as usize + p * PAGE_SIZE + offset
}

impl Rig {
    fn write(&mut self, p: usize, offset: usize, data: &[u8]) {
        self.disk.do_write(p, offset, data).unwrap();
    }
    fn read(&mut self, p: usize, offset: usize, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.disk.do_read(p, offset, &mut buf).unwrap();
        buf
    }
    fn erase(&mut self, p: usize) {
        self.disk.do_erase(p).unwrap();
    }
    /// The requests so far: (first sector, sectors).
    fn requests(&self) -> Vec<(u64, usize)> {
        let log = self.log.borrow();
        log.iter()
            .map(|w| (w.sector, w.data.len() / SECTOR_SIZE))
            .collect()
    }
    fn on_disk(&self, from: usize, len: usize) -> Vec<u8> {
        self.mem.bytes.borrow()[from..from + len].to_vec()
    }
}

fn sector(byte: usize) -> u64 {
    (byte / SECTOR_SIZE) as u64
}

#[test]
fn appends_are_one_request_sent_before_a_write_elsewhere() {
    let mut r = rig();
    let mut rng = Rng(5);
    r.erase(3);
    assert_eq!(r.requests(), [(sector(at(3, 0)), PAGE_SIZE / SECTOR_SIZE)]);
    // A chunk's data in three appends (as ekv writes it): nothing reaches the device.
    let (a, b, c) = (rng.bytes(4), rng.bytes(4000), rng.bytes(92));
    r.write(3, 20, &a);
    r.write(3, 24, &b);
    r.write(3, 4024, &c);
    assert_eq!(r.requests().len(), 1);
    assert!(r.on_disk(at(3, 20), 4096).iter().all(|&x| x == 0));
    // Reads of the run are served from it, without sending it.
    let mut want = a.clone();
    want.extend_from_slice(&b);
    want.extend_from_slice(&c);
    assert_eq!(r.read(3, 20, 4096), want);
    assert_eq!(r.requests().len(), 1);
    // The chunk's header, before the run: the run goes first, as one request; the header
    // is pending until the next write elsewhere or the flush.
    let h = rng.bytes(8);
    r.write(3, 12, &h);
    assert_eq!(r.requests()[1..], [(sector(at(3, 0)), 9)]);
    assert_eq!(r.on_disk(at(3, 20), 4096), want);
    assert_eq!(r.on_disk(at(3, 12), 8), [0; 8]);
    r.disk.flush().unwrap();
    assert_eq!(r.requests()[2..], [(sector(at(3, 0)), 1)]);
    assert_eq!(r.on_disk(at(3, 12), 8), h);
}

#[test]
fn a_header_across_sectors_goes_alone_later_sector_first() {
    let mut r = rig();
    r.erase(2);
    r.write(2, 516, &[7; 400]);
    // 8 bytes at 508: sectors 0 and 1 of the page.
    r.write(2, 508, &[9; 8]);
    let s = sector(at(2, 0));
    assert_eq!(r.requests()[1..], [(s + 1, 1), (s + 1, 1), (s, 1)]);
    // A header never starts a run: the next append is a request of its own.
    r.write(2, 916, &[1; 4]);
    r.write(2, 920, &[2; 4]);
    assert_eq!(r.requests().len(), 4);
    r.disk.flush().unwrap();
    assert_eq!(r.requests()[4..], [(s + 1, 1)]);
    assert_eq!(r.on_disk(at(2, 508), 8), [9; 8]);
    assert_eq!(r.on_disk(at(2, 916), 8), [1, 1, 1, 1, 2, 2, 2, 2]);
}

#[test]
fn runs_stop_at_a_gap_an_erase_a_page_end_and_a_flush() {
    let mut r = rig();
    r.erase(4);
    r.erase(5);
    // A gap (ekv's next chunk header) ends a run.
    r.write(4, 100, &[1; 8]);
    r.write(4, 116, &[2; 8]);
    let s = sector(at(4, 0));
    assert_eq!(r.requests()[2..], [(s, 1)]);
    // An erase sends the run first.
    r.erase(6);
    assert_eq!(r.requests()[3..], [(s, 1), (sector(at(6, 0)), 64)]);
    // The end of a page does not continue into the next one.
    r.write(4, PAGE_SIZE - 8, &[3; 8]);
    r.write(5, 0, &[4; 8]);
    assert_eq!(r.requests()[5..], [(sector(at(5, 0)) - 1, 1)]);
    r.disk.flush().unwrap();
    assert_eq!(r.requests()[6..], [(sector(at(5, 0)), 1)]);
    r.disk.flush().unwrap();
    assert_eq!(r.requests().len(), 7, "nothing left to send");
    assert_eq!(r.on_disk(at(4, 100), 24), [[1; 8], [0; 8], [2; 8]].concat());
}

#[test]
fn evicting_a_line_of_the_run_sends_it_first() {
    let mut r = rig();
    r.erase(1);
    let data = Rng(6).bytes(6000);
    r.write(1, 20, &data);
    assert_eq!(r.requests().len(), 1);
    // Read enough other lines to push the run's lines out of the cache.
    for p in 10..10 + CACHE_LINES * LINE / PAGE_SIZE + 2 {
        for line in 0..PAGE_SIZE / LINE {
            r.read(p, line * LINE, 4);
        }
    }
    assert_eq!(r.requests()[1..], [(sector(at(1, 0)), 12)]);
    assert_eq!(r.on_disk(at(1, 20), 6000), data);
    assert_eq!(r.read(1, 20, 6000), data);
}

#[test]
fn erased_lines_are_not_read_back_and_reads_read_ahead() {
    let mut r = rig();
    let reads = |r: &Rig| r.disk.stats().reads;
    r.erase(7);
    // Writing into the erased page needs no read of it.
    r.write(7, 20, &[5; 9000]);
    assert_eq!(reads(&r), 0);
    r.disk.flush().unwrap();
    // Chunk-sized reads through a page not cached: the rest of the page in one request.
    for p in 20..20 + CACHE_LINES * LINE / PAGE_SIZE + 1 {
        for line in 0..PAGE_SIZE / LINE {
            r.read(p, line * LINE, 4);
        }
    }
    let before = reads(&r);
    for i in 0..7 {
        let got = r.read(7, 20 + i * 1024, 1024);
        assert!(got.iter().all(|&x| x == 5));
    }
    assert_eq!(reads(&r) - before, 1);
}
