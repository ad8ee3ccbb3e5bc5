//! Every kind of damage is refused with an error that names the set and the file:
//! flipped bytes (manifest, state, memory page, memory hole), truncation, a wrong format
//! version, missing files and a missing partition.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::*;
use crate::manifest;
use crate::{LoadMode, SnapshotError, FORMAT_VERSION, MANIFEST_FILE, PAGE_SIZE};

struct Fixture {
    _t: TempDir,
    dest: PathBuf,
}

fn fixture(tag: &str) -> Fixture {
    let t = TempDir::new(tag);
    let dest = t.path().join("set");
    let engine = two_regions();
    fill(&engine, 0, 1);
    fill(&engine, HIGH, 2);
    let controller = two_regions();
    fill(&controller, 8 * PAGE_SIZE as u64, 3);
    write_full(
        &dest,
        &[
            ("engine", &engine, br#"{"v":1}"#),
            ("controller", &controller, br#"{"v":2}"#),
        ],
    );
    open_ok(&dest).verify().expect("a fresh set verifies");
    Fixture { _t: t, dest }
}

fn checksum_file(e: &SnapshotError) -> Option<&str> {
    match e {
        SnapshotError::Checksum { file, .. } => Some(file),
        _ => None,
    }
}

#[test]
fn flipped_manifest_byte_is_refused_at_open() {
    let fx = fixture("c-manifest");
    let path = fx.dest.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).expect("read");
    // A byte that keeps the JSON valid: a digit of created_unix_ms.
    let at = text.find("\"created_unix_ms\": ").expect("field") + 20;
    flip(&path, at as u64);
    let e = SnapshotSet::open(&fx.dest).expect_err("open");
    assert_eq!(checksum_file(&e), Some(MANIFEST_FILE), "{e}");
    assert!(
        e.to_string().contains(&fx.dest.display().to_string()),
        "{e}"
    );
}

#[test]
fn flipped_state_byte_fails_verify_and_read_state() {
    let fx = fixture("c-state");
    flip(&fx.dest.join("controller.state"), 2);
    let set = open_ok(&fx.dest);
    let e = set.verify().expect_err("verify");
    assert_eq!(checksum_file(&e), Some("controller.state"), "{e}");
    let e = set.read_state("controller").expect_err("read_state");
    assert_eq!(checksum_file(&e), Some("controller.state"), "{e}");
    assert_eq!(
        set.read_state("engine").expect("other state"),
        br#"{"v":1}"#
    );
}

#[test]
fn flipped_memory_data_byte_fails_verify() {
    let fx = fixture("c-mem");
    flip(&fx.dest.join("engine.mem"), 1234);
    let e = open_ok(&fx.dest).verify().expect_err("verify");
    assert_eq!(checksum_file(&e), Some("engine.mem"), "{e}");
    assert!(e.to_string().contains("engine.mem"), "{e}");
}

#[test]
fn data_written_into_a_hole_fails_verify() {
    let fx = fixture("c-hole");
    let f = OpenOptions::new()
        .write(true)
        .open(fx.dest.join("engine.mem"))
        .expect("open");
    f.write_all_at(b"x", 100 * PAGE_SIZE as u64 + 7)
        .expect("write");
    let e = open_ok(&fx.dest).verify().expect_err("verify");
    assert_eq!(checksum_file(&e), Some("engine.mem"), "{e}");
}

#[test]
fn truncated_memory_file_is_refused_at_open() {
    let fx = fixture("c-trunc");
    let path = fx.dest.join("engine.mem");
    let f = OpenOptions::new().write(true).open(&path).expect("open");
    f.set_len((6 << 20) - PAGE_SIZE as u64).expect("truncate");
    match SnapshotSet::open(&fx.dest).expect_err("open") {
        SnapshotError::Truncated {
            file,
            expected,
            found,
            ..
        } => {
            assert_eq!(file, "engine.mem");
            assert_eq!(expected, 6 << 20);
            assert_eq!(found, (6 << 20) - PAGE_SIZE as u64);
        }
        e => panic!("wrong error: {e}"),
    }
}

#[test]
fn wrong_format_version_is_refused() {
    let fx = fixture("c-version");
    let path = fx.dest.join(MANIFEST_FILE);
    // A properly sealed manifest of another version.
    let mut m = open_ok(&fx.dest).manifest.clone();
    m.format_version = FORMAT_VERSION + 1;
    std::fs::write(&path, manifest::seal(&m).expect("seal")).expect("write");
    match SnapshotSet::open(&fx.dest).expect_err("open") {
        SnapshotError::Version {
            found, expected, ..
        } => assert_eq!((found, expected), (4, 3)),
        e => panic!("wrong error: {e}"),
    }
    // A version 1 set (before device state files): refused, with what to do.
    m.format_version = 1;
    std::fs::write(&path, manifest::seal(&m).expect("seal")).expect("write");
    let e = SnapshotSet::open(&fx.dest).expect_err("open");
    assert!(matches!(e, SnapshotError::Version { found: 1, .. }), "{e}");
    assert!(e.to_string().contains("take a new snapshot"), "{e}");
    // A future manifest that does not even have this version's seal.
    std::fs::write(&path, br#"{"format_version": 7, "layout": "new"}"#).expect("write");
    let e = SnapshotSet::open(&fx.dest).expect_err("open");
    assert!(matches!(e, SnapshotError::Version { found: 7, .. }), "{e}");
    assert!(e.to_string().contains("format_version 7"), "{e}");
}

#[test]
fn missing_files_are_named() {
    let fx = fixture("c-missing");
    std::fs::remove_file(fx.dest.join("controller.state")).expect("rm");
    match SnapshotSet::open(&fx.dest).expect_err("open") {
        SnapshotError::Missing { file, .. } => assert_eq!(file, "controller.state"),
        e => panic!("wrong error: {e}"),
    }
    std::fs::remove_file(fx.dest.join(MANIFEST_FILE)).expect("rm");
    match SnapshotSet::open(&fx.dest).expect_err("open") {
        SnapshotError::Missing { file, .. } => assert_eq!(file, MANIFEST_FILE),
        e => panic!("wrong error: {e}"),
    }
    let e = SnapshotSet::open(&fx.dest.join("nowhere")).expect_err("open");
    assert!(e.to_string().contains("nowhere"), "{e}");
}

#[test]
fn missing_partition_is_named() {
    let fx = fixture("c-nopart");
    let set = open_ok(&fx.dest);
    for e in [
        set.load_memory("relay", LoadMode::Lazy).expect_err("load"),
        set.read_state("relay").map(|_| ()).expect_err("state"),
    ] {
        match &e {
            SnapshotError::NoPartition { name, dir } => {
                assert_eq!(name, "relay");
                assert_eq!(dir, &fx.dest);
            }
            e => panic!("wrong error: {e}"),
        }
    }
}

#[test]
fn manifest_listing_an_unknown_file_is_refused() {
    let fx = fixture("c-extra");
    let path = fx.dest.join(MANIFEST_FILE);
    let mut m = open_ok(&fx.dest).manifest.clone();
    m.files
        .insert("stray".into(), crate::FileEntry { len: 0, crc32: 0 });
    std::fs::write(&path, manifest::seal(&m).expect("seal")).expect("write");
    let e = SnapshotSet::open(&fx.dest).expect_err("open");
    assert!(matches!(e, SnapshotError::Manifest { .. }), "{e}");
    assert!(e.to_string().contains("\"stray\""), "{e}");
}
