//! Tests of the crate as the monitor uses it, with plain anonymous guest memory
//! (`GuestMemoryMmap::from_ranges`), no KVM: round trips, holes, corruption, atomic
//! replacement, crashes, a full file system, incremental chains and merge, disk images.

mod atomic;
mod corruption;
mod disk;
mod disk_corruption;
mod hostile;
mod incremental;
mod live;
mod manifest_rules;
mod roundtrip;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::{SetWriter, SnapshotSet, PAGE_SIZE};

/// A directory removed when dropped.
pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "duplex-snapshot-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Region 0: 4 MiB at 0; region 1: 2 MiB at 4 GiB (a gap between them, like the MMIO hole).
pub(crate) const HIGH: u64 = 1 << 32;

pub(crate) fn two_regions() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20), (GuestAddress(HIGH), 2 << 20)])
        .expect("guest memory")
}

/// A page of bytes that depends on `gpa` and `seed` and is never all zero.
pub(crate) fn pattern(gpa: u64, seed: u8) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|i| (gpa / PAGE_SIZE as u64).wrapping_mul(31) as u8 ^ (i as u8) ^ seed | 1)
        .collect()
}

pub(crate) fn fill(mem: &GuestMemoryMmap, gpa: u64, seed: u8) {
    mem.write_slice(&pattern(gpa, seed), GuestAddress(gpa))
        .expect("write page");
}

pub(crate) fn zero_page(mem: &GuestMemoryMmap, gpa: u64) {
    mem.write_slice(&[0u8; PAGE_SIZE], GuestAddress(gpa))
        .expect("write page");
}

/// All of a memory's bytes, region by region, with the regions' addresses.
pub(crate) fn contents(mem: &GuestMemoryMmap) -> Vec<(u64, Vec<u8>)> {
    mem.iter()
        .map(|r| {
            let mut v = vec![0u8; r.len() as usize];
            mem.read_slice(&mut v, r.start_addr()).expect("read");
            (r.start_addr().0, v)
        })
        .collect()
}

/// Guest pages, by address, at which two memories differ (empty = equal).
pub(crate) fn diff(a: &GuestMemoryMmap, b: &GuestMemoryMmap) -> Vec<u64> {
    let (ca, cb) = (contents(a), contents(b));
    assert_eq!(
        ca.iter().map(|(g, v)| (*g, v.len())).collect::<Vec<_>>(),
        cb.iter().map(|(g, v)| (*g, v.len())).collect::<Vec<_>>(),
        "the region layouts differ"
    );
    let mut out = Vec::new();
    for ((g, va), (_, vb)) in ca.iter().zip(&cb) {
        for (i, (pa, pb)) in va.chunks(PAGE_SIZE).zip(vb.chunks(PAGE_SIZE)).enumerate() {
            if pa != pb {
                out.push(g + (i * PAGE_SIZE) as u64);
            }
        }
    }
    out
}

/// Writes a full set of the given partitions at `dest`; returns its set id.
pub(crate) fn write_full(dest: &Path, parts: &[(&str, &GuestMemoryMmap, &[u8])]) -> String {
    let mut w = SetWriter::create(dest, None).expect("create");
    for (name, mem, state) in parts {
        w.write_memory(name, mem, None).expect("write memory");
        w.write_state(name, state).expect("write state");
    }
    let id = w.set_id().to_string();
    w.commit(
        serde_json::json!({"partitions": ["engine", "controller"]}),
        serde_json::json!({"pause_us": 12}),
    )
    .expect("commit");
    id
}

pub(crate) fn open_ok(dir: &Path) -> SnapshotSet {
    SnapshotSet::open(dir).unwrap_or_else(|e| panic!("open {}: {e}", dir.display()))
}

/// Flips a bit of the byte at `at` of the file at `path` (twice: the byte is as before).
pub(crate) fn flip(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read");
    b[0] ^= 0x20;
    f.write_all_at(&b, at).expect("write");
}

/// The entries of a directory whose names start with `prefix`.
pub(crate) fn siblings(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.starts_with(prefix))
        .collect()
}
