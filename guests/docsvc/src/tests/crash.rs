//! Crash atomicity: a document put through a disk that stops persisting at the N-th write,
//! for every N, reopens as either the whole document or nothing, with everything stored
//! before intact.

use std::vec::Vec;

use duplex_docs::{document_crc32, ADMIN};

use super::{bytes, fresh, MemDisk};
use crate::{DocService, DATA_CHUNK};

fn read_all(s: &mut DocService<MemDisk>, id: &str) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let (_, b) = s
            .get(ADMIN, id, out.len() as u64, DATA_CHUNK as u32)
            .expect("get");
        if b.is_empty() {
            return out;
        }
        out.extend_from_slice(&b);
    }
}

#[test]
fn a_crash_at_any_write_of_a_put_leaves_the_whole_document_or_nothing() {
    let (mut s, disk) = fresh(2);
    s.create_box(ADMIN, "b", "B").expect("box");
    let first = bytes(1, 5_000);
    s.put_document(ADMIN, "b", "first", &first).expect("first");
    let base = disk.crash_image();
    let second = bytes(2, 40_000);
    // How many writes the put makes.
    let writes = {
        let disk = MemDisk::from_image(base.clone());
        let mut s = DocService::open(disk.clone()).expect("open");
        let before = *disk.writes.borrow();
        s.put_document(ADMIN, "b", "second", &second).expect("put");
        let after = *disk.writes.borrow();
        after - before
    };
    assert!(writes > 4, "{writes} writes");
    std::println!("the put makes {writes} writes");
    let (mut whole, mut absent) = (0, 0);
    for n in 0..=writes {
        let disk = MemDisk::from_image(base.clone());
        let mut s = DocService::open(disk.clone()).expect("open");
        *disk.budget.borrow_mut() = Some(n);
        let acked = s.put_document(ADMIN, "b", "second", &second).is_ok();
        let mut s = DocService::open(MemDisk::from_image(disk.crash_image()))
            .unwrap_or_else(|e| panic!("reopen after a crash at write {n}: {e}"));
        assert_eq!(read_all(&mut s, "d1"), first, "crash at write {n}");
        match s.document(ADMIN, "d2") {
            Ok(d) => {
                assert_eq!(d.crc32, document_crc32(&second));
                assert_eq!(read_all(&mut s, "d2"), second, "crash at write {n}");
                whole += 1;
            }
            Err(e) => {
                assert_eq!(e.code(), 404, "{e}");
                assert!(n < writes, "all {writes} writes persisted, yet no document");
                assert_eq!(s.stats().documents, 1);
                absent += 1;
            }
        }
        if n == writes {
            assert!(acked);
        }
        // The next document gets a fresh number either way, and stores.
        let d = s.put_document(ADMIN, "b", "third", b"3").expect("after");
        assert!(d.id == "d2" || d.id == "d3", "{}", d.id);
    }
    assert!(whole > 0 && absent > 0, "whole {whole}, absent {absent}");
}
