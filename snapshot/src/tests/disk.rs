//! Disk images: a sparse disk round trips byte-exact with its holes, blocks that are not in
//! the page cache are saved, incremental chains hold only changed blocks and compose on
//! restore, the two passes of a live snapshot, merge and inspect, and the writer's
//! refusals.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use super::*;
use crate::{inspect, merge, sys, DiskEntry, MemoryWriteStats, SnapshotError, PAGE_SIZE};

pub(crate) const P: u64 = PAGE_SIZE as u64;

/// A new sparse disk file of `len` bytes.
pub(crate) fn new_disk(path: &Path, len: u64) -> File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .expect("create disk");
    f.set_len(len).expect("size disk");
    f
}

/// Writes block `b` with a pattern of `seed` (never all zero).
pub(crate) fn put(disk: &File, b: u64, seed: u8) {
    disk.write_all_at(&pattern(b * P, seed), b * P)
        .expect("write block");
}

/// Writes zeros over block `b` (the file system allocates it: data that is zero).
fn put_zero(disk: &File, b: u64) {
    disk.write_all_at(&[0u8; PAGE_SIZE], b * P)
        .expect("write block");
}

fn read_all(f: &File) -> Vec<u8> {
    let mut v = vec![0u8; f.metadata().expect("stat").len() as usize];
    f.read_exact_at(&mut v, 0).expect("read");
    v
}

/// The blocks of a file that lie in its data extents.
pub(crate) fn data_blocks(f: &File) -> Vec<u64> {
    let len = f.metadata().expect("stat").len();
    sys::data_extents(f, 0, len)
        .expect("seek")
        .expect("SEEK_DATA supported")
        .iter()
        .flat_map(|(s, e)| s / P..e.div_ceil(P))
        .collect()
}

/// A dirty bitmap of a disk of `len` bytes with `blocks` set.
pub(crate) fn bits(len: u64, blocks: &[u64]) -> Vec<u64> {
    let mut v = vec![0u64; (len / P).div_ceil(64) as usize];
    for b in blocks {
        v[(b / 64) as usize] |= 1 << (b % 64);
    }
    v
}

/// No dirty page in the two-region memory.
pub(crate) fn clean_memory() -> Vec<Vec<u64>> {
    vec![vec![0; 1024 / 64], vec![0; 512 / 64]]
}

/// Writes a set of partition "engine" (memory and disk) at `dest`, on top of `parent` if
/// given (then `dirty` are the disk blocks written since, and memory is unchanged).
pub(crate) fn write_set(
    dest: &Path,
    parent: Option<&Path>,
    mem: &GuestMemoryMmap,
    disk: &File,
    len: u64,
    dirty: Option<&[u64]>,
) -> MemoryWriteStats {
    let p = parent.map(open_ok);
    let mut w = SetWriter::create(dest, p.as_ref()).expect("create");
    let clean = clean_memory();
    w.write_memory("engine", mem, p.as_ref().map(|_| clean.as_slice()))
        .expect("memory");
    let stats = w.write_disk("engine", disk, len, dirty).expect("disk");
    w.write_state("engine", b"{}").expect("state");
    w.commit(serde_json::json!({}), serde_json::Value::Null)
        .expect("commit");
    stats
}

/// Restores the engine's disk of the set at `dir` into a new file; checks it against `want`.
fn restore_eq(dir: &Path, at: &Path, want: &[u8]) -> (File, crate::DiskRestoreStats) {
    let f = new_disk(at, 0);
    let stats = open_ok(dir).restore_disk("engine", &f).expect("restore");
    let got = read_all(&f);
    assert_eq!(got.len(), want.len(), "{}: restored length", dir.display());
    let bad: Vec<usize> = (0..want.len() / PAGE_SIZE)
        .filter(|&b| {
            got[b * PAGE_SIZE..(b + 1) * PAGE_SIZE] != want[b * PAGE_SIZE..(b + 1) * PAGE_SIZE]
        })
        .collect();
    assert_eq!(bad, Vec::<usize>::new(), "{}: blocks differ", dir.display());
    (f, stats)
}

/// Blocks of `content` that are not all zero.
fn nonzero_blocks(content: &[u8]) -> Vec<u64> {
    (0..content.len() / PAGE_SIZE)
        .filter(|&b| !sys::is_zero(&content[b * PAGE_SIZE..(b + 1) * PAGE_SIZE]))
        .map(|b| b as u64)
        .collect()
}

const LEN: u64 = 64 << 20;
const LAST: u64 = LEN / P - 1;

#[test]
fn full_set_round_trips_a_sparse_disk_and_keeps_holes() {
    let t = TempDir::new("disk-rt");
    let disk = new_disk(&t.path().join("disk.img"), LEN);
    for (i, b) in [0, 1, 2, 100, 5000, LAST].into_iter().enumerate() {
        put(&disk, b, i as u8);
    }
    put_zero(&disk, 50); // allocated, but zero: a hole in the set
    disk.write_all_at(b"partial!!!", 7000 * P + 123)
        .expect("partial block");
    let want = read_all(&disk);
    let blocks = vec![0, 1, 2, 100, 5000, 7000, LAST];
    assert_eq!(nonzero_blocks(&want), blocks);

    let dest = t.path().join("set");
    let mem = two_regions();
    fill(&mem, 0, 1);
    let stats = write_set(&dest, None, &mem, &disk, LEN, None);
    assert_eq!(stats.pages_total, LEN / P);
    assert_eq!(stats.pages_written, 7);
    assert_eq!(stats.bytes_written, 7 * P);
    assert!(
        stats.pages_scanned >= 8 && stats.pages_scanned < 64,
        "only the data extents are read: {} blocks read",
        stats.pages_scanned
    );

    let set = open_ok(&dest);
    assert_eq!(set.manifest.format_version, crate::FORMAT_VERSION);
    assert_eq!(
        set.disk("engine"),
        Some(&DiskEntry {
            file: "engine.disk".into(),
            pages_file: None,
            len: LEN,
            bytes_written: 7 * P,
            incremental: false,
        })
    );
    let v = set.verify().expect("verify");
    assert_eq!(v.files, 4, "manifest, memory, state, disk");
    let in_set = File::open(dest.join("engine.disk")).expect("open");
    assert_eq!(in_set.metadata().expect("stat").len(), LEN);
    assert_eq!(
        data_blocks(&in_set),
        blocks,
        "the set's disk file holds the data blocks only"
    );

    let (restored, rs) = restore_eq(&dest, &t.path().join("restored.img"), &want);
    assert_eq!((rs.len, rs.bytes_written, rs.sets), (LEN, 7 * P, 1));
    assert_eq!(data_blocks(&restored), blocks, "holes stay holes");
    let allocated = restored.metadata().expect("stat").blocks() * 512;
    assert!(
        allocated <= 16 * P,
        "{allocated} bytes allocated for 7 blocks"
    );

    // Over a file with other data, longer than the disk: truncated first.
    let path = t.path().join("dirty.img");
    let old = new_disk(&path, LEN + 8 * P);
    for b in [3, 50, LAST + 4] {
        put(&old, b, 9);
    }
    set.restore_disk("engine", &old).expect("restore over");
    assert_eq!(read_all(&old), want);
    assert_eq!(data_blocks(&old), blocks);
}

#[test]
fn disk_blocks_not_in_the_page_cache_are_saved() {
    let t = TempDir::new("disk-cold");
    let disk = new_disk(&t.path().join("disk.img"), LEN);
    for b in [0, 1, 2, 3, 4000, LAST] {
        put(&disk, b, 7);
    }
    disk.sync_all().expect("fsync");
    // SAFETY: posix_fadvise on a file descriptor we own; it only drops clean cached pages.
    let r = unsafe { libc::posix_fadvise(disk.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "fadvise");
    let map = crate::disk::map(&disk, LEN).expect("map");
    let host = map
        .get_host_address(vm_memory::GuestAddress(0))
        .expect("host") as usize;
    let mut res = Vec::new();
    sys::resident(host, 5, &mut res).expect("mincore");
    assert!(
        res.iter().all(|b| b & 1 == 0),
        "the test needs blocks 0..5 evicted from the page cache"
    );
    drop(map);

    let dest = t.path().join("set");
    let stats = write_set(&dest, None, &two_regions(), &disk, LEN, None);
    assert_eq!(stats.pages_written, 6);
    open_ok(&dest).verify().expect("verify");
    restore_eq(&dest, &t.path().join("restored.img"), &read_all(&disk));
}

#[test]
fn incremental_chain_holds_only_changed_blocks_and_restores_each_moment() {
    let t = TempDir::new("disk-inc");
    let len = 16 << 20;
    let disk = new_disk(&t.path().join("disk.img"), len);
    let mem = two_regions();
    for b in [0, 1, 2, 100, 101, 4095] {
        put(&disk, b, 1);
    }
    let dirs: Vec<_> = ["base", "child", "grand"]
        .iter()
        .map(|n| t.path().join(n))
        .collect();
    let mut moments = vec![read_all(&disk)];
    write_set(&dirs[0], None, &mem, &disk, len, None);

    // Step 1: one block changed, one new, one zeroed.
    put(&disk, 1, 2);
    put(&disk, 3000, 2);
    put_zero(&disk, 2);
    let s1 = write_set(
        &dirs[1],
        Some(&dirs[0]),
        &mem,
        &disk,
        len,
        Some(&bits(len, &[1, 3000, 2])),
    );
    moments.push(read_all(&disk));
    // Step 2: the new block changed again, a base block zeroed, another one new.
    put(&disk, 3000, 3);
    put_zero(&disk, 100);
    put(&disk, 4000, 3);
    let s2 = write_set(
        &dirs[2],
        Some(&dirs[1]),
        &mem,
        &disk,
        len,
        Some(&bits(len, &[3000, 100, 4000])),
    );
    moments.push(read_all(&disk));

    for (s, dir, held) in [
        (&s1, &dirs[1], vec![1, 3000]),
        (&s2, &dirs[2], vec![3000, 4000]),
    ] {
        assert_eq!(
            (s.pages_present, s.pages_written),
            (3, 2),
            "{}",
            dir.display()
        );
        let set = open_ok(dir);
        let d = set.disk("engine").expect("disk");
        assert!(d.incremental);
        assert_eq!(d.pages_file.as_deref(), Some("engine.diskpages"));
        assert_eq!(
            d.bytes_written,
            2 * P,
            "only changed non-zero blocks are written"
        );
        let f = File::open(dir.join("engine.disk")).expect("open");
        assert_eq!(data_blocks(&f), held);
        let present = set
            .present_disk_blocks("engine")
            .expect("pages")
            .expect("incremental");
        assert_eq!(present.count(), 3);
    }
    let g = open_ok(&dirs[2]);
    assert_eq!(g.verify().expect("verify chain").sets, 3);
    for (i, (dir, want)) in dirs.iter().zip(&moments).enumerate() {
        let (f, stats) = restore_eq(dir, &t.path().join(format!("r{i}.img")), want);
        assert_eq!(stats.sets, i + 1);
        assert_eq!(
            data_blocks(&f),
            nonzero_blocks(want),
            "moment {i}: holes stay holes"
        );
    }
}

#[test]
fn live_second_pass_gives_the_disk_of_the_pause() {
    let t = TempDir::new("disk-live");
    let len = 8 << 20;
    let disk = new_disk(&t.path().join("disk.img"), len);
    for b in [0, 5, 9, 2047] {
        put(&disk, b, 1);
    }
    let mem = two_regions();
    let dest = t.path().join("set");
    let mut w = SetWriter::create(&dest, None).expect("create");
    w.write_memory("engine", &mem, None).expect("memory");
    w.write_disk("engine", &disk, len, None)
        .expect("first pass");
    // The guest goes on: it rewrites a block, writes a new one, zeroes one.
    put(&disk, 5, 2);
    put(&disk, 70, 3);
    put_zero(&disk, 0);
    let stats = w
        .update_disk("engine", &disk, &bits(len, &[5, 70, 0]))
        .expect("second pass");
    assert_eq!((stats.pages_scanned, stats.pages_written), (3, 2));
    w.write_state("engine", b"{}").expect("state");
    w.commit(serde_json::json!({}), serde_json::Value::Null)
        .expect("commit");
    let set = open_ok(&dest);
    set.verify().expect("the recomputed checksum holds");
    // Like memory_bytes_written, bytes_written counts the second pass's writes too.
    assert_eq!(set.disk("engine").map(|d| d.bytes_written), Some(6 * P));
    let want = read_all(&disk);
    let (f, _) = restore_eq(&dest, &t.path().join("r.img"), &want);
    assert_eq!(
        data_blocks(&f),
        vec![5, 9, 70, 2047],
        "the zeroed block is a hole"
    );

    // Incremental: the second pass's blocks join those the set holds.
    let child = t.path().join("child");
    let p = open_ok(&dest);
    let mut w = SetWriter::create(&child, Some(&p)).expect("create");
    w.write_memory("engine", &mem, Some(&clean_memory()))
        .expect("memory");
    put(&disk, 9, 4);
    w.write_disk("engine", &disk, len, Some(&bits(len, &[9])))
        .expect("first pass");
    put(&disk, 12, 5);
    w.update_disk("engine", &disk, &bits(len, &[12]))
        .expect("second pass");
    w.write_state("engine", b"{}").expect("state");
    w.commit(serde_json::json!({}), serde_json::Value::Null)
        .expect("commit");
    let c = open_ok(&child);
    c.verify().expect("verify");
    let present = c
        .present_disk_blocks("engine")
        .expect("pages")
        .expect("inc");
    assert_eq!(present.count(), 2);
    assert!(present.get(9) && present.get(12));
    restore_eq(&child, &t.path().join("rc.img"), &read_all(&disk));
}

#[test]
fn merge_flattens_the_disk_and_inspect_reports_it() {
    let t = TempDir::new("disk-merge");
    let len = 8 << 20;
    let disk = new_disk(&t.path().join("disk.img"), len);
    let mem = two_regions();
    fill(&mem, HIGH, 4);
    for b in [0, 1, 600] {
        put(&disk, b, 1);
    }
    let (base, child) = (t.path().join("base"), t.path().join("child"));
    write_set(&base, None, &mem, &disk, len, None);
    put(&disk, 1, 2);
    put_zero(&disk, 600);
    put(&disk, 1500, 2);
    write_set(
        &child,
        Some(&base),
        &mem,
        &disk,
        len,
        Some(&bits(len, &[1, 600, 1500])),
    );
    let want = read_all(&disk);

    let c = inspect(&child).expect("inspect");
    let d = &c["partitions"][0]["disk"];
    assert_eq!(d["file"], "engine.disk");
    assert_eq!(d["len"], len);
    assert_eq!(d["incremental"], true);
    assert_eq!(d["bytes_written"], 2 * P);
    assert_eq!(d["blocks_present"], 3);
    assert!(d["disk_bytes"].as_u64().is_some_and(|b| b >= 2 * P));
    let b = inspect(&base).expect("inspect");
    assert!(b["partitions"][0]["disk"]["blocks_present"].is_null());

    let merged = t.path().join("merged");
    merge(&child, &merged).expect("merge");
    let m = open_ok(&merged);
    m.verify().expect("verify merged");
    assert!(m.manifest.parent.is_none());
    let d = m.disk("engine").expect("disk");
    assert!(!d.incremental && d.pages_file.is_none());
    assert_eq!(d.bytes_written, 3 * P, "blocks 0, 1 and 1500");
    let (_, rs) = restore_eq(&merged, &t.path().join("r.img"), &want);
    assert_eq!(rs.sets, 1);
    let back = m
        .load_memory("engine", crate::LoadMode::Eager)
        .expect("memory");
    assert_eq!(diff(&mem, &back), Vec::<u64>::new());
    assert_eq!(
        siblings(t.path(), "merged."),
        Vec::<String>::new(),
        "no temporary file or directory left"
    );
    // A set without a disk is still written as version 2 and has no disk.
    let plain = t.path().join("plain");
    write_full(&plain, &[("engine", &mem, b"{}")]);
    let p = open_ok(&plain);
    assert_eq!(p.manifest.format_version, crate::MIN_FORMAT_VERSION);
    assert_eq!(p.disk("engine"), None);
    let e = p.restore_disk("engine", &new_disk(&t.path().join("x.img"), 0));
    assert!(matches!(e, Err(SnapshotError::Disk { .. })), "{e:?}");
}

fn usage_err(r: Result<MemoryWriteStats, SnapshotError>, needle: &str) {
    match r {
        Err(e @ SnapshotError::Usage { .. }) => {
            assert!(e.to_string().contains(needle), "{e} (wanted {needle:?})")
        }
        Err(e) => panic!("not a usage error: {e}"),
        Ok(_) => panic!("accepted; wanted {needle:?}"),
    }
}

#[test]
fn writer_refuses_misuse_of_disks() {
    let t = TempDir::new("disk-usage");
    let len = 4 << 20;
    let disk = new_disk(&t.path().join("disk.img"), len);
    let small = new_disk(&t.path().join("small.img"), len / 2);
    put(&disk, 3, 1);
    let mem = two_regions();
    let mut w = SetWriter::create(&t.path().join("set"), None).expect("create");
    usage_err(
        w.update_disk("engine", &disk, &bits(len, &[])),
        "disk updated before it was written",
    );
    usage_err(
        w.write_disk("engine", &disk, len, Some(&bits(len, &[3]))),
        "no parent",
    );
    usage_err(
        w.write_disk("engine", &disk, len + 1, None),
        "multiple of 4096",
    );
    usage_err(w.write_disk("engine", &disk, 0, None), "multiple of 4096");
    usage_err(
        w.write_disk("engine", &disk, len / 2, None),
        "regular file of 2097152 bytes",
    );
    w.write_disk("engine", &disk, len, None).expect("disk");
    usage_err(
        w.write_disk("engine", &disk, len, None),
        "disk written twice",
    );
    usage_err(
        w.update_disk("engine", &disk, &[0u64; 15]),
        "has 15 words, a disk of 1024 blocks needs 16",
    );
    usage_err(
        w.update_disk("engine", &small, &bits(len, &[])),
        "regular file of 4194304 bytes",
    );
    w.write_state("engine", b"{}").expect("state");
    let e = w
        .commit(serde_json::json!({}), serde_json::Value::Null)
        .expect_err("no memory");
    assert!(e.to_string().contains("memory was not written"), "{e}");

    // Incremental sets: a bitmap is needed, and the parent's disk of the same length.
    let base = t.path().join("base");
    write_set(&base, None, &mem, &disk, len, None);
    let plain = t.path().join("plain");
    write_full(&plain, &[("engine", &mem, b"{}")]);
    let b = open_ok(&base);
    let mut w = SetWriter::create(&t.path().join("child"), Some(&b)).expect("create");
    usage_err(
        w.write_disk("engine", &disk, len, None),
        "dirty bitmap of the disk's blocks",
    );
    usage_err(
        w.write_disk("engine", &disk, len, Some(&[0u64; 3])),
        "has 3 words",
    );
    usage_err(
        w.write_disk("engine", &small, len / 2, Some(&bits(len, &[]))),
        "the parent set's is 4194304",
    );
    usage_err(
        w.write_disk("other", &disk, len, Some(&bits(len, &[]))),
        "the parent set has no disk",
    );
    let pl = open_ok(&plain);
    let mut w = SetWriter::create(&t.path().join("child2"), Some(&pl)).expect("create");
    usage_err(
        w.write_disk("engine", &disk, len, Some(&bits(len, &[]))),
        "the parent set has no disk",
    );
}
