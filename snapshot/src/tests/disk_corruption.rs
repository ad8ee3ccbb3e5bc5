//! Damaged disk images are refused with an error that names the set and the file: flipped
//! bytes of the disk file (data and holes), of its pages file and of the manifest's disk
//! entry; truncated and missing files; malformed pages files; manifest edits that break
//! the disk rules; a parent whose disk is missing or of another length.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::disk::{bits, new_disk, put, write_set, P};
use super::*;
use crate::manifest::{self, Manifest};
use crate::{inspect, SnapshotError, MANIFEST_FILE};

/// 259 blocks: the pages file's last byte has bits past the end.
const LEN: u64 = 259 * P;
const DATA: [u64; 3] = [0, 3, 258];

struct Fixture {
    t: TempDir,
    base: PathBuf,
    child: PathBuf,
}

/// A full set with a disk, and an incremental child holding blocks 3 (changed) and 100
/// (new) and 7 (zeroed).
fn fixture(tag: &str) -> Fixture {
    let t = TempDir::new(tag);
    let disk = new_disk(&t.path().join("disk.img"), LEN);
    for b in DATA {
        put(&disk, b, 1);
    }
    put(&disk, 7, 1);
    let mem = two_regions();
    fill(&mem, 0, 1);
    let (base, child) = (t.path().join("base"), t.path().join("child"));
    write_set(&base, None, &mem, &disk, LEN, None);
    put(&disk, 3, 2);
    put(&disk, 100, 2);
    disk.write_all_at(&[0u8; PAGE_SIZE], 7 * P).expect("zero");
    write_set(
        &child,
        Some(&base),
        &mem,
        &disk,
        LEN,
        Some(&bits(LEN, &[3, 100, 7])),
    );
    open_ok(&child).verify().expect("a fresh chain verifies");
    Fixture { t, base, child }
}

/// Asserts `e` is a checksum error of `file` in `dir`, with both in its message.
fn assert_checksum(e: &SnapshotError, dir: &Path, file: &str) {
    let same = |d: &Path| d.canonicalize().ok() == dir.canonicalize().ok();
    assert!(
        matches!(e, SnapshotError::Checksum { dir: d, file: f, .. } if same(d) && f == file),
        "wanted a checksum error of {file} in {}: {e}",
        dir.display()
    );
    let msg = e.to_string();
    let name = dir.file_name().and_then(|n| n.to_str()).expect("name");
    assert!(msg.contains(file) && msg.contains(name), "{msg}");
}

fn restore(dir: &Path, t: &TempDir) -> Result<crate::DiskRestoreStats, SnapshotError> {
    let path = t.path().join("restored.img");
    let _ = std::fs::remove_file(&path);
    open_ok(dir).restore_disk("engine", &new_disk(&path, 0))
}

#[test]
fn flipped_disk_data_bytes_fail_verify() {
    let fx = fixture("dc-data");
    for (dir, blocks) in [(&fx.base, &DATA[..]), (&fx.child, &[3, 100][..])] {
        let path = dir.join("engine.disk");
        for b in blocks {
            for at in (0..P).step_by(37).chain([P - 1]) {
                flip(&path, b * P + at);
                let e = open_ok(&fx.child).verify().expect_err("verify");
                assert_checksum(&e, dir, "engine.disk");
                flip(&path, b * P + at);
            }
        }
    }
    open_ok(&fx.child).verify().expect("all flipped back");
}

#[test]
fn data_written_into_a_disk_hole_fails_verify() {
    for (dir, block) in [(0, 10), (0, 7), (1, 7), (1, 200)] {
        let fx = fixture("dc-hole");
        let dir = if dir == 0 { &fx.base } else { &fx.child };
        let f = OpenOptions::new()
            .write(true)
            .open(dir.join("engine.disk"))
            .expect("open");
        f.write_all_at(b"x", block * P + 9).expect("write");
        let e = open_ok(&fx.child).verify().expect_err("verify");
        assert_checksum(&e, dir, "engine.disk");
    }
}

#[test]
fn every_flipped_diskpages_byte_fails_verify_restore_and_inspect() {
    let fx = fixture("dc-pages");
    let path = fx.child.join("engine.diskpages");
    let len = std::fs::metadata(&path).expect("stat").len();
    assert_eq!(len, 16 + 33);
    for at in 0..len {
        flip(&path, at);
        let set = open_ok(&fx.child);
        assert_checksum(
            &set.verify().expect_err("verify"),
            &fx.child,
            "engine.diskpages",
        );
        assert_checksum(
            &restore(&fx.child, &fx.t).expect_err("restore"),
            &fx.child,
            "engine.diskpages",
        );
        assert!(inspect(&fx.child).is_err(), "inspect reads the pages file");
        flip(&path, at);
    }
    restore(&fx.child, &fx.t).expect("restores once flipped back");
}

/// Replaces the child's disk pages file with `bytes`, sealing its checksum into the manifest.
fn replace_pages(fx: &Fixture, bytes: &[u8]) {
    std::fs::write(fx.child.join("engine.diskpages"), bytes).expect("write");
    let mut m = open_ok(&fx.child).manifest.clone();
    let e = m.files.get_mut("engine.diskpages").expect("listed");
    e.crc32 = crc32fast::hash(bytes);
    reseal(&fx.child, &m);
}

fn reseal(dir: &Path, m: &Manifest) {
    std::fs::write(dir.join(MANIFEST_FILE), manifest::seal(m).expect("seal")).expect("write");
}

#[test]
fn malformed_diskpages_are_refused_on_restore() {
    let fx = fixture("dc-pages-bad");
    let good = std::fs::read(fx.child.join("engine.diskpages")).expect("read");
    let mut past = good.clone();
    *past.last_mut().expect("byte") |= 0x80; // block 263 of 259
    let mut magic = good.clone();
    magic[0] = b'X';
    let mut count = good.clone();
    count[8..16].copy_from_slice(&200u64.to_le_bytes());
    for (bytes, needle) in [
        (past, "past the last page"),
        (magic, "magic"),
        (count, "describes 200 pages"),
    ] {
        replace_pages(&fx, &bytes);
        open_ok(&fx.child).verify().expect("the checksums hold");
        match restore(&fx.child, &fx.t).expect_err("restore") {
            SnapshotError::Corrupt { file, message, .. } => {
                assert_eq!(file, "engine.diskpages");
                assert!(message.contains(needle), "{message}");
            }
            e => panic!("wrong error: {e}"),
        }
    }
}

#[test]
fn truncated_or_missing_disk_files_are_refused_at_open() {
    let fx = fixture("dc-trunc");
    let path = fx.base.join("engine.disk");
    let f = OpenOptions::new().write(true).open(&path).expect("open");
    for len in [LEN - P, LEN + 1] {
        f.set_len(len).expect("resize");
        match SnapshotSet::open(&fx.base).expect_err("open") {
            SnapshotError::Truncated {
                file,
                expected,
                found,
                ..
            } => assert_eq!((file.as_str(), expected, found), ("engine.disk", LEN, len)),
            e => panic!("wrong error: {e}"),
        }
        let e = SnapshotSet::open(&fx.child).expect_err("the child's parent");
        assert!(
            matches!(e, SnapshotError::Parent { .. }) && e.to_string().contains("engine.disk"),
            "{e}"
        );
    }
    f.set_len(LEN).expect("resize");
    for name in ["engine.diskpages", "engine.disk"] {
        std::fs::remove_file(fx.child.join(name)).expect("rm");
        match SnapshotSet::open(&fx.child).expect_err("open") {
            SnapshotError::Missing { file, .. } => assert_eq!(file, name),
            e => panic!("wrong error: {e}"),
        }
    }
}

#[test]
fn every_flipped_byte_of_the_manifest_disk_entry_is_refused() {
    let fx = fixture("dc-manifest");
    let path = fx.child.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).expect("read");
    let start = text.find("\"disk\": {").expect("disk entry");
    let end = start + text[start..].find('}').expect("its end") + 1;
    assert!(text[start..end].contains("engine.diskpages"));
    let entries = text.matches("\"engine.disk").count();
    assert_eq!(entries, 4, "the entry and the files list name both files");
    for at in start..end {
        flip(&path, at as u64);
        let e = SnapshotSet::open(&fx.child).expect_err("open");
        assert_checksum(&e, &fx.child, MANIFEST_FILE);
        flip(&path, at as u64);
    }
    open_ok(&fx.child).verify().expect("flipped back");
}

#[test]
fn manifest_edits_breaking_the_disk_rules_are_refused() {
    let fx = fixture("dc-rules");
    let orig = open_ok(&fx.child).manifest.clone();
    type Edit = fn(&mut Manifest);
    let edits: [(Edit, &str); 10] = [
        (|m| disk(m).len += P, "files[\"engine.disk\"].len"),
        (|m| disk(m).len = 0, "field disk.len 0"),
        (|m| disk(m).len = LEN + 1, "positive multiple of 4096"),
        (|m| disk(m).file = "engine.mem".into(), "field disk.file"),
        (|m| disk(m).pages_file = None, "needs disk.pages_file"),
        (|m| disk(m).incremental = false, "field disk.incremental"),
        (|m| disk(m).bytes_written = LEN + P, "disk.bytes_written"),
        (|m| m.format_version = 2, "needs format_version 3"),
        (|m| m.partitions[0].disk = None, "which no partition uses"),
        (
            |m| {
                m.files.remove("engine.diskpages");
            },
            "engine.diskpages is not listed",
        ),
    ];
    for (edit, needle) in edits {
        let mut m = orig.clone();
        edit(&mut m);
        reseal(&fx.child, &m);
        match SnapshotSet::open(&fx.child).expect_err("open") {
            e @ SnapshotError::Manifest { .. } => assert!(e.to_string().contains(needle), "{e}"),
            e => panic!("{needle}: wrong error: {e}"),
        }
    }
    // A version 3 manifest without disks is fine (the base, its disk dropped)...
    let mut m = open_ok(&fx.base).manifest.clone();
    m.partitions[0].disk = None;
    m.files.remove("engine.disk");
    reseal(&fx.base, &m);
    assert_eq!(open_ok(&fx.base).manifest.format_version, 3);
    // ...but the child's disk then has no parent disk.
    reseal(&fx.child, &orig);
    let e = SnapshotSet::open(&fx.child).expect_err("open");
    assert!(
        matches!(e, SnapshotError::Parent { .. }) && e.to_string().contains("it has none"),
        "{e}"
    );
    // A parent disk of another length.
    let mut m = open_ok(&fx.base).manifest.clone();
    let mut d = orig.partitions[0].disk.clone().expect("disk");
    (d.pages_file, d.incremental, d.len) = (None, false, LEN + P);
    m.partitions[0].disk = Some(d);
    m.files.insert(
        "engine.disk".into(),
        crate::FileEntry {
            len: LEN + P,
            crc32: 0,
        },
    );
    reseal(&fx.base, &m);
    File::options()
        .write(true)
        .open(fx.base.join("engine.disk"))
        .and_then(|f| f.set_len(LEN + P))
        .expect("resize");
    open_ok(&fx.base);
    let e = SnapshotSet::open(&fx.child).expect_err("open");
    assert!(
        matches!(e, SnapshotError::Parent { .. }) && e.to_string().contains("of 1064960 bytes"),
        "{e}"
    );
}

fn disk(m: &mut Manifest) -> &mut crate::DiskEntry {
    m.partitions[0].disk.as_mut().expect("disk")
}
