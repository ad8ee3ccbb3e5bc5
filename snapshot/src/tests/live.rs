//! The two passes of a live snapshot: memory written while it still changes, then the pages
//! changed since written again; the set holds memory as at the second pass, checksums hold,
//! and device-wide state files are sealed like the others.

use super::*;
use crate::{LoadMode, SnapshotError, PAGE_SIZE};

const P: u64 = PAGE_SIZE as u64;

/// Dirty bitmaps (KVM layout) for the two-region memory.
fn bits(pages: &[u64]) -> Vec<Vec<u64>> {
    let mut d = vec![vec![0u64; 1024 / 64], vec![0u64; 512 / 64]];
    for &gpa in pages {
        let (r, p) = if gpa >= HIGH {
            (1, (gpa - HIGH) / P)
        } else {
            (0, gpa / P)
        };
        d[r][(p / 64) as usize] |= 1 << (p % 64);
    }
    d
}

#[test]
fn second_pass_gives_the_memory_of_the_pause() {
    let t = TempDir::new("live");
    let mem = two_regions();
    for gpa in [0, 5 * P, 9 * P, HIGH, HIGH + 3 * P] {
        fill(&mem, gpa, 1);
    }
    let dest = t.path().join("set");
    let mut w = SetWriter::create(&dest, None).expect("create");
    w.write_memory("engine", &mem, None).expect("first pass");
    // The guest goes on: it rewrites a page, writes a new one, zeroes one.
    fill(&mem, 5 * P, 2);
    fill(&mem, 77 * P, 3);
    zero_page(&mem, HIGH);
    let changed = bits(&[5 * P, 77 * P, HIGH]);
    let stats = w
        .update_memory("engine", &mem, &changed)
        .expect("second pass");
    assert_eq!(stats.pages_scanned, 3);
    assert_eq!(
        stats.pages_written, 2,
        "the zeroed page is not counted as data"
    );
    w.write_state("engine", b"{}").expect("state");
    w.write_device_state("vsock", b"{\"conns\":[]}")
        .expect("device state");
    w.commit(serde_json::json!({}), serde_json::Value::Null)
        .expect("commit");

    let set = open_ok(&dest);
    set.verify().expect("the recomputed checksum holds");
    let back = set.load_memory("engine", LoadMode::Eager).expect("load");
    assert_eq!(diff(&mem, &back), Vec::<u64>::new());
    assert_eq!(
        set.read_device_state("vsock").expect("read"),
        Some(b"{\"conns\":[]}".to_vec())
    );
    assert_eq!(set.read_device_state("net").expect("read"), None);
}

#[test]
fn a_page_missed_by_the_second_pass_is_caught_by_nothing_but_content() {
    // The guard of the monitor's bookkeeping: a page changed after the first pass but not
    // in the delta keeps its first-pass value (so the dirty bits must be complete).
    let t = TempDir::new("live-miss");
    let mem = two_regions();
    fill(&mem, 4 * P, 1);
    let dest = t.path().join("set");
    let mut w = SetWriter::create(&dest, None).expect("create");
    w.write_memory("engine", &mem, None).expect("first pass");
    fill(&mem, 4 * P, 9);
    w.update_memory("engine", &mem, &bits(&[]))
        .expect("empty second pass");
    w.write_state("engine", b"{}").expect("state");
    w.commit(serde_json::json!({}), serde_json::Value::Null)
        .expect("commit");
    let back = open_ok(&dest)
        .load_memory("engine", LoadMode::Eager)
        .expect("load");
    assert_eq!(diff(&mem, &back), vec![4 * P]);
}

#[test]
fn incremental_second_pass_adds_its_pages_to_the_set() {
    let t = TempDir::new("live-inc");
    let mem = two_regions();
    fill(&mem, 0, 1);
    fill(&mem, 8 * P, 1);
    let parent = t.path().join("parent");
    write_full(&parent, &[("engine", &mem, b"{}")]);
    fill(&mem, 8 * P, 2);
    let p = open_ok(&parent);
    let child = t.path().join("child");
    let mut w = SetWriter::create(&child, Some(&p)).expect("create");
    w.write_memory("engine", &mem, Some(&bits(&[8 * P])))
        .expect("first pass");
    fill(&mem, 12 * P, 3);
    fill(&mem, HIGH + P, 4);
    w.update_memory("engine", &mem, &bits(&[12 * P, HIGH + P]))
        .expect("second pass");
    w.write_state("engine", b"{}").expect("state");
    w.commit(serde_json::json!({}), serde_json::Value::Null)
        .expect("commit");
    let set = open_ok(&child);
    set.verify().expect("verify");
    let present = set
        .present_pages("engine")
        .expect("pages")
        .expect("incremental");
    assert_eq!(present.count(), 3);
    let back = set.load_memory("engine", LoadMode::Eager).expect("load");
    assert_eq!(diff(&mem, &back), Vec::<u64>::new());
}

#[test]
fn update_before_write_and_bad_device_state_names_are_refused() {
    let t = TempDir::new("live-usage");
    let mem = two_regions();
    let mut w = SetWriter::create(&t.path().join("set"), None).expect("create");
    let e = w
        .update_memory("engine", &mem, &bits(&[]))
        .expect_err("nothing written yet");
    assert!(matches!(e, SnapshotError::Usage { .. }), "{e}");
    assert!(w.write_device_state("../x", b"{}").is_err());
    w.write_device_state("vsock", b"{}").expect("first");
    assert!(w.write_device_state("vsock", b"{}").is_err(), "twice");
}

/// A reserved address range (PROT_NONE), unmapped when dropped.
struct Reserved(usize, usize);

impl Reserved {
    fn new(len: usize) -> Reserved {
        // SAFETY: a new private reservation chosen by the kernel.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Reserved(p as usize, len)
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        // SAFETY: the range this value reserved; the memory mapped into it is dropped first.
        unsafe {
            libc::munmap(self.0 as *mut libc::c_void, self.1);
        }
    }
}

#[test]
fn memory_loads_into_reserved_ranges_lazily_and_eagerly() {
    let t = TempDir::new("live-into");
    let mem = two_regions();
    for gpa in [0, 7 * P, HIGH, HIGH + 9 * P] {
        fill(&mem, gpa, 5);
    }
    let dest = t.path().join("set");
    write_full(&dest, &[("engine", &mem, b"{}")]);
    let set = open_ok(&dest);
    for mode in [LoadMode::Lazy, LoadMode::Eager] {
        let (low, high) = (Reserved::new(4 << 20), Reserved::new(2 << 20));
        // SAFETY: both ranges are this test's, of the regions' lengths, and the memory is
        // dropped before them.
        let back = unsafe {
            set.load_memory_into::<()>("engine", mode, &[low.0, high.0])
                .expect("load into")
        };
        assert_eq!(diff(&mem, &back), Vec::<u64>::new(), "{mode:?}");
        let host = |i: usize| {
            back.iter()
                .nth(i)
                .and_then(|r| r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok())
                .map(|p| p as usize)
        };
        assert_eq!((host(0), host(1)), (Some(low.0), Some(high.0)));
        drop(back);
    }
    // SAFETY: refused before anything is mapped (one address for two regions).
    let e = unsafe { set.load_memory_into::<()>("engine", LoadMode::Lazy, &[0x1000]) };
    assert!(e.is_err(), "one address for two regions is refused");
}

#[test]
fn merge_keeps_the_newest_device_states() {
    let t = TempDir::new("live-merge");
    let mem = two_regions();
    fill(&mem, 0, 1);
    let parent = t.path().join("parent");
    let mut w = SetWriter::create(&parent, None).expect("create");
    w.write_memory("engine", &mem, None).expect("memory");
    w.write_state("engine", b"{}").expect("state");
    w.write_device_state("vsock", b"old").expect("device state");
    w.commit(serde_json::json!({}), serde_json::Value::Null)
        .expect("commit");
    fill(&mem, P, 2);
    let child = t.path().join("child");
    let p = open_ok(&parent);
    let mut w = SetWriter::create(&child, Some(&p)).expect("create");
    w.write_memory("engine", &mem, Some(&bits(&[P])))
        .expect("memory");
    w.write_state("engine", b"{}").expect("state");
    w.write_device_state("vsock", b"new").expect("device state");
    w.commit(serde_json::json!({}), serde_json::Value::Null)
        .expect("commit");
    let merged = t.path().join("merged");
    crate::merge(&child, &merged).expect("merge");
    let m = open_ok(&merged);
    m.verify().expect("verify");
    assert_eq!(
        m.read_device_state("vsock").expect("read"),
        Some(b"new".to_vec())
    );
    let back = m.load_memory("engine", LoadMode::Eager).expect("load");
    assert_eq!(diff(&mem, &back), Vec::<u64>::new());
}
