//! Full sets: byte-exact round trips (lazy and eager) across two regions with a gap,
//! holes for untouched and zero pages, untouched memory left unread, snapshots of a lazily
//! restored guest, and the writer's refusals.

use std::os::unix::fs::{FileExt, MetadataExt};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::*;
use crate::sys;
use crate::{LoadMode, SnapshotError, PAGE_SIZE};

const P: u64 = PAGE_SIZE as u64;

/// Pages written with data (guest addresses), and pages touched but left zero.
const DATA: [u64; 7] = [0, P, 2 * P, 100 * P, 1023 * P, HIGH, HIGH + 5 * P];
const ZEROED: [u64; 2] = [50 * P, HIGH + 10 * P];

fn sample() -> GuestMemoryMmap {
    let mem = two_regions();
    for (i, g) in DATA.iter().enumerate() {
        fill(&mem, *g, i as u8);
    }
    for g in ZEROED {
        zero_page(&mem, g);
    }
    mem
}

/// File offset of a guest address in the two-region layout.
fn file_off(gpa: u64) -> u64 {
    if gpa >= HIGH {
        (4 << 20) + gpa - HIGH
    } else {
        gpa
    }
}

#[test]
fn full_set_round_trips_byte_exact_lazy_and_eager() {
    let t = TempDir::new("rt");
    let dest = t.path().join("set");
    let mem = sample();
    let state = br#"{"version":1,"vcpus":[{"rip":4096}]}"#;
    write_full(&dest, &[("engine", &mem, state)]);

    let set = open_ok(&dest);
    let v = set.verify().expect("verify");
    assert_eq!((v.sets, v.files), (1, 3));
    assert_eq!(set.read_state("engine").expect("state"), state.to_vec());
    let e = set.partition("engine").expect("entry");
    assert_eq!(
        e.ram,
        vec![
            crate::RamRegion {
                gpa: 0,
                len: 4 << 20
            },
            crate::RamRegion {
                gpa: HIGH,
                len: 2 << 20
            }
        ]
    );
    assert_eq!(e.memory_bytes_written, DATA.len() as u64 * P);
    assert!(!e.incremental);

    for mode in [LoadMode::Lazy, LoadMode::LazyPrefetch, LoadMode::Eager] {
        let back = set.load_memory("engine", mode).expect("load");
        let layout: Vec<(u64, u64)> = back.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(layout, vec![(0, 4 << 20), (HIGH, 2 << 20)], "{mode:?}");
        assert_eq!(
            diff(&mem, &back),
            Vec::<u64>::new(),
            "{mode:?}: pages differ"
        );
        let lazy = back.iter().all(|r| r.file_offset().is_some());
        assert_eq!(lazy, mode != LoadMode::Eager, "{mode:?}: mapping kind");
    }
}

#[test]
fn untouched_and_zero_pages_are_holes_and_untouched_memory_is_not_read() {
    let t = TempDir::new("holes");
    let dest = t.path().join("set");
    let mem = sample();
    let mut w = SetWriter::create(&dest, None).expect("create");
    let stats = w.write_memory("engine", &mem, None).expect("write");
    w.write_state("engine", b"{}").expect("state");
    w.commit(serde_json::Value::Null, serde_json::Value::Null)
        .expect("commit");

    assert_eq!(stats.pages_total, 1536);
    assert_eq!(stats.pages_written, DATA.len() as u64);
    assert_eq!(stats.bytes_written, DATA.len() as u64 * P);
    // Only touched pages are read (THP may make whole 2 MiB huge pages resident).
    assert!(
        stats.pages_scanned >= (DATA.len() + ZEROED.len()) as u64 && stats.pages_scanned < 1536,
        "scanned {} pages",
        stats.pages_scanned
    );
    // Writing did not fault in the untouched pages 200..1000 of region 0.
    let r0 = mem.find_region(GuestAddress(0)).expect("region 0");
    let host = r0
        .get_host_address(MemoryRegionAddress(200 * P))
        .expect("host") as usize;
    let mut res = Vec::new();
    sys::resident(host, 800, &mut res).expect("mincore");
    assert!(res.iter().all(|b| b & 1 == 0), "untouched pages were read");

    let path = dest.join("engine.mem");
    let f = std::fs::File::open(&path).expect("open mem");
    let md = f.metadata().expect("stat");
    assert_eq!(md.len(), 6 << 20, "file length is the RAM size");
    assert!(
        md.blocks() * 512 <= (DATA.len() as u64 + 1) * P,
        "{} bytes allocated for {} data pages",
        md.blocks() * 512,
        DATA.len()
    );
    let ext = sys::data_extents(&f, 0, md.len())
        .expect("seek")
        .expect("SEEK_DATA supported");
    let mut data_pages: Vec<u64> = ext
        .iter()
        .flat_map(|(s, e)| (s / P..e.div_ceil(P)).map(|p| p * P))
        .collect();
    data_pages.sort_unstable();
    let mut want: Vec<u64> = DATA.iter().map(|g| file_off(*g)).collect();
    want.sort_unstable();
    assert_eq!(
        data_pages, want,
        "data extents are exactly the non-zero pages"
    );
    // And the data is at the right offsets.
    let mut page = vec![0u8; PAGE_SIZE];
    f.read_exact_at(&mut page, file_off(HIGH + 5 * P))
        .expect("read");
    assert_eq!(page, pattern(HIGH + 5 * P, 6));
}

#[test]
fn snapshot_of_a_lazily_restored_guest_keeps_pages_only_in_the_file() {
    let t = TempDir::new("relazy");
    let a = t.path().join("a");
    let mem = sample();
    write_full(&a, &[("engine", &mem, b"{}")]);
    let set = open_ok(&a);
    let restored = set.load_memory("engine", LoadMode::Lazy).expect("lazy");
    // The restored guest runs a bit: one page changes, one is cleared (private copies).
    fill(&restored, 100 * P, 77);
    zero_page(&restored, HIGH);
    // Evict the file from the page cache, so that its pages are not resident in the
    // mapping: only the file's data extents tell the writer they hold data.
    let f = std::fs::File::open(a.join("engine.mem")).expect("open");
    // SAFETY: posix_fadvise on a file descriptor we own; it only drops clean cached pages.
    let r = unsafe {
        libc::posix_fadvise(
            std::os::unix::io::AsRawFd::as_raw_fd(&f),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    assert_eq!(r, 0, "fadvise");
    let r0 = restored.find_region(GuestAddress(0)).expect("region 0");
    let host = r0.get_host_address(MemoryRegionAddress(0)).expect("host") as usize;
    let mut res = Vec::new();
    sys::resident(host, 3, &mut res).expect("mincore");
    assert!(
        res.iter().all(|b| b & 1 == 0),
        "the test needs pages 0..3 evicted from the page cache"
    );

    let b = t.path().join("b");
    write_full(&b, &[("engine", &restored, b"{}")]);
    let back = open_ok(&b)
        .load_memory("engine", LoadMode::Eager)
        .expect("eager");
    assert_eq!(diff(&restored, &back), Vec::<u64>::new());
    let e = open_ok(&b);
    assert_eq!(
        e.partition("engine").expect("entry").memory_bytes_written,
        (DATA.len() as u64 - 1) * P
    );
}

#[test]
fn writer_refuses_misuse_and_leaves_no_temp_dir() {
    let t = TempDir::new("usage");
    let dest = t.path().join("set");
    let mem = sample();

    let mut w = SetWriter::create(&dest, None).expect("create");
    let dirty = vec![vec![u64::MAX; 16], vec![u64::MAX; 8]];
    let e = w
        .write_memory("engine", &mem, Some(&dirty))
        .expect_err("dirty");
    assert!(e.to_string().contains("no parent"), "{e}");
    let e = w.write_memory("../etc", &mem, None).expect_err("name");
    assert!(matches!(e, SnapshotError::Usage { .. }), "{e}");
    w.write_memory("engine", &mem, None).expect("write");
    let e = w.write_memory("engine", &mem, None).expect_err("twice");
    assert!(e.to_string().contains("memory written twice"), "{e}");
    let tmp = w.temp_dir().to_path_buf();
    assert!(tmp.is_dir());
    let e = w
        .commit(serde_json::Value::Null, serde_json::Value::Null)
        .expect_err("no state");
    assert!(
        e.to_string().contains("\"engine\"") && e.to_string().contains("state was not written"),
        "{e}"
    );
    assert!(!tmp.exists(), "a failed commit removes its temp dir");
    assert!(!dest.exists(), "nothing appears at dest");
}
