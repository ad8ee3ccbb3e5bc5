//! Incremental sets: only dirty pages are written, a chain restores exactly what a full
//! set of the same memory restores, `merge` flattens it, `inspect` describes it, and a
//! broken chain is refused.

use std::os::unix::fs::FileExt;

use vm_memory::GuestMemoryRegion;

use super::*;
use crate::sys;
use crate::{inspect, merge, LoadMode, SnapshotError, PAGE_SIZE};

const P: u64 = PAGE_SIZE as u64;

/// Dirty bitmaps (KVM layout) for the two-region memory.
struct Dirty(Vec<Vec<u64>>);

impl Dirty {
    fn new() -> Dirty {
        Dirty(vec![vec![0; 1024 / 64], vec![0; 512 / 64]])
    }

    fn mark(&mut self, gpa: u64) {
        let (r, p) = if gpa >= HIGH {
            (1, (gpa - HIGH) / P)
        } else {
            (0, gpa / P)
        };
        self.0[r][(p / 64) as usize] |= 1 << (p % 64);
    }
}

fn write_child(
    dest: &std::path::Path,
    parent: &std::path::Path,
    mem: &GuestMemoryMmap,
    dirty: &Dirty,
    state: &[u8],
) -> crate::MemoryWriteStats {
    let p = open_ok(parent);
    let mut w = SetWriter::create(dest, Some(&p)).expect("create");
    let e = w
        .write_memory("engine", mem, None)
        .expect_err("needs dirty");
    assert!(e.to_string().contains("dirty bitmap"), "{e}");
    let stats = w
        .write_memory("engine", mem, Some(&dirty.0))
        .expect("write");
    w.write_state("engine", state).expect("state");
    w.commit(
        serde_json::json!({"cfg": 1}),
        serde_json::json!({"step": "child"}),
    )
    .expect("commit");
    stats
}

#[test]
fn chain_restores_like_a_full_set_and_merge_flattens_it() {
    let t = TempDir::new("inc");
    let (base, child, grand) = (
        t.path().join("base"),
        t.path().join("child"),
        t.path().join("grand"),
    );
    let mem = two_regions();
    for g in [0, P, 2 * P, 300 * P, HIGH, HIGH + P] {
        fill(&mem, g, 1);
    }
    write_full(&base, &[("engine", &mem, b"s0")]);

    // Step 1: change two pages, clear one, touch a new one.
    let mut d = Dirty::new();
    for (g, seed) in [(P, 2), (HIGH + 100 * P, 2), (700 * P, 2)] {
        fill(&mem, g, seed);
        d.mark(g);
    }
    zero_page(&mem, 300 * P);
    d.mark(300 * P);
    let stats = write_child(&child, &base, &mem, &d, b"s1");
    assert_eq!(stats.pages_present, 4);
    assert_eq!(stats.pages_written, 3, "the cleared page is held as a hole");
    // The child's memory file holds only the dirty non-zero pages.
    let f = std::fs::File::open(child.join("engine.mem")).expect("open");
    let ext = sys::data_extents(&f, 0, 6 << 20)
        .expect("seek")
        .expect("supported");
    let data: u64 = ext.iter().map(|(s, e)| e - s).sum();
    assert_eq!(data, 3 * P);

    // Step 2: on top of the child; re-dirty a page the child holds, clear a base page.
    let mut d = Dirty::new();
    fill(&mem, 700 * P, 3);
    d.mark(700 * P);
    zero_page(&mem, HIGH);
    d.mark(HIGH);
    write_child(&grand, &child, &mem, &d, b"s2");

    let full = t.path().join("full");
    write_full(&full, &[("engine", &mem, b"s2")]);
    let full_mem = open_ok(&full)
        .load_memory("engine", LoadMode::Eager)
        .expect("full");
    assert_eq!(diff(&mem, &full_mem), Vec::<u64>::new());

    let g = open_ok(&grand);
    assert_eq!(g.chain().len(), 3);
    let v = g.verify().expect("verify chain");
    assert_eq!(v.sets, 3);
    assert_eq!(g.read_state("engine").expect("state"), b"s2");
    for mode in [LoadMode::Lazy, LoadMode::LazyPrefetch, LoadMode::Eager] {
        let back = g.load_memory("engine", mode).expect("load");
        assert_eq!(diff(&full_mem, &back), Vec::<u64>::new(), "{mode:?}");
    }
    // The middle of the chain restores the memory as it was at step 1.
    let c = open_ok(&child)
        .load_memory("engine", LoadMode::Lazy)
        .expect("child");
    let mut at1 = vec![0u8; PAGE_SIZE];
    c.read_slice(&mut at1, vm_memory::GuestAddress(700 * P))
        .expect("read");
    assert_eq!(at1, pattern(700 * P, 2));

    // Merge into a new full set, then in place over the grandchild.
    let merged = t.path().join("merged");
    merge(&grand, &merged).expect("merge");
    for dir in [&merged, &grand] {
        if dir == &grand {
            merge(&grand, &grand).expect("merge in place");
        }
        let m = open_ok(dir);
        assert!(
            m.manifest.parent.is_none(),
            "{} is a full set",
            dir.display()
        );
        assert!(m.partition("engine").is_some_and(|p| !p.incremental));
        m.verify().expect("verify merged");
        assert_eq!(m.read_state("engine").expect("state"), b"s2");
        assert_eq!(m.manifest.extra, serde_json::json!({"step": "child"}));
        let back = m.load_memory("engine", LoadMode::Lazy).expect("load");
        assert_eq!(diff(&full_mem, &back), Vec::<u64>::new());
        assert!(back.iter().all(|r| r.file_offset().is_some()));
    }
}

#[test]
fn inspect_describes_the_chain() {
    let t = TempDir::new("inspect");
    let (base, child) = (t.path().join("base"), t.path().join("child"));
    let mem = two_regions();
    fill(&mem, 0, 1);
    fill(&mem, HIGH, 1);
    let base_id = write_full(&base, &[("engine", &mem, b"0123456789")]);
    let mut d = Dirty::new();
    fill(&mem, 5 * P, 2);
    d.mark(5 * P);
    write_child(&child, &base, &mem, &d, b"st");

    let b = inspect(&base).expect("inspect base");
    assert_eq!(b["set_id"], base_id);
    assert_eq!(b["incremental"], false);
    let p = &b["partitions"][0];
    assert_eq!(p["name"], "engine");
    assert_eq!(p["ram"][1]["gpa"], "0x100000000");
    assert_eq!(p["ram_bytes"], 6 << 20);
    assert_eq!(p["memory_bytes_written"], 2 * P);
    assert_eq!(p["state_bytes"], 10);
    assert!(p["pages_present"].is_null());
    assert_eq!(b["device_config"]["partitions"][0], "engine");

    let c = inspect(&child).expect("inspect child");
    assert_eq!(c["incremental"], true);
    assert_eq!(c["parent"]["set_id"], base_id);
    assert_eq!(c["parent"]["path"], "../base");
    assert_eq!(c["chain"].as_array().map(Vec::len), Some(2));
    assert_eq!(c["partitions"][0]["pages_present"], 1);
    assert_eq!(c["extra"]["step"], "child");
}

#[test]
fn broken_chains_are_refused() {
    let t = TempDir::new("inc-broken");
    let (base, child) = (t.path().join("base"), t.path().join("child"));
    let mem = two_regions();
    fill(&mem, 0, 1);
    write_full(&base, &[("engine", &mem, b"")]);
    let mut d = Dirty::new();
    fill(&mem, P, 2);
    d.mark(P);
    write_child(&child, &base, &mem, &d, b"");

    // A corrupt pages file.
    let pages = child.join("engine.pages");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&pages)
        .expect("open");
    f.write_all_at(&[0xff], 20).expect("write");
    let set = open_ok(&child);
    let e = set.verify().expect_err("verify");
    assert!(
        matches!(&e, SnapshotError::Checksum { file, .. } if file == "engine.pages"),
        "{e}"
    );
    let e = set
        .load_memory("engine", LoadMode::Eager)
        .expect_err("load");
    assert!(matches!(e, SnapshotError::Checksum { .. }), "{e}");
    f.write_all_at(&[0], 20).expect("restore");
    set.verify().expect("verify again");

    // The parent replaced by another set: its id no longer matches.
    let other = two_regions();
    let new_id = write_full(&base, &[("engine", &other, b"")]);
    let e = SnapshotSet::open(&child).expect_err("open");
    assert!(matches!(e, SnapshotError::Parent { .. }), "{e}");
    assert!(e.to_string().contains(&new_id), "{e}");

    // The parent gone.
    std::fs::remove_dir_all(&base).expect("rm");
    let e = SnapshotSet::open(&child).expect_err("open");
    assert!(matches!(e, SnapshotError::Parent { .. }), "{e}");

    // Another RAM layout than the parent's is refused when writing.
    let b2 = t.path().join("b2");
    write_full(&b2, &[("engine", &mem, b"")]);
    let small =
        GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).expect("mem");
    let mut w = SetWriter::create(&t.path().join("c2"), Some(&open_ok(&b2))).expect("create");
    let e = w
        .write_memory("engine", &small, Some(&[vec![0u64; 4]]))
        .expect_err("layout");
    assert!(e.to_string().contains("RAM layout"), "{e}");
    // An incremental set may not replace its own parent.
    let e = SetWriter::create(&b2, Some(&open_ok(&b2)))
        .map(|_| ())
        .expect_err("own parent");
    assert!(e.to_string().contains("parent chain"), "{e}");
}
