//! The manifest's own rules: the seal, file names, lengths, caps and parent paths.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::manifest::*;

fn sample() -> Manifest {
    let mut files = BTreeMap::new();
    files.insert(
        "a.mem".into(),
        FileEntry {
            len: 8192,
            crc32: 1,
        },
    );
    files.insert("a.state".into(), FileEntry { len: 3, crc32: 2 });
    Manifest {
        format_version: FORMAT_VERSION,
        set_id: "00ff".into(),
        created_unix_ms: 5,
        device_config: serde_json::json!({"k": [1, 2.5, "x"]}),
        partitions: vec![PartitionEntry {
            name: "a".into(),
            memory_file: "a.mem".into(),
            state_file: "a.state".into(),
            pages_file: None,
            ram: vec![RamRegion { gpa: 0, len: 8192 }],
            memory_bytes_written: 4096,
            incremental: false,
            disk: None,
        }],
        parent: None,
        files,
        device_states: BTreeMap::new(),
        extra: Value::Null,
    }
}

#[test]
fn seal_round_trips_and_is_json() {
    let m = sample();
    let bytes = seal(&m).expect("seal");
    let v: Value = serde_json::from_slice(&bytes).expect("still JSON");
    assert!(v["manifest_crc32"].as_str().is_some_and(|s| s.len() == 8));
    assert_eq!(unseal(Path::new("d"), &bytes).expect("unseal"), m);
}

#[test]
fn any_flipped_byte_is_refused() {
    let bytes = seal(&sample()).expect("seal");
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x01;
        assert!(
            unseal(Path::new("d"), &b).is_err(),
            "flipping byte {i} ({:?}) went unnoticed",
            bytes[i] as char
        );
    }
}

/// `sample` with a disk image: format version 3.
fn sample_with_disk() -> Manifest {
    let mut m = sample();
    m.format_version = FORMAT_VERSION;
    m.partitions[0].disk = Some(DiskEntry {
        file: "a.disk".into(),
        pages_file: None,
        len: 3 * 4096,
        bytes_written: 4096,
        incremental: false,
    });
    m.files.insert(
        "a.disk".into(),
        FileEntry {
            len: 3 * 4096,
            crc32: 7,
        },
    );
    m
}

#[test]
fn a_disk_entry_round_trips_and_any_flipped_byte_is_refused() {
    let m = sample_with_disk();
    let bytes = seal(&m).expect("seal");
    assert_eq!(unseal(Path::new("d"), &bytes).expect("unseal"), m);
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x01;
        assert!(
            unseal(Path::new("d"), &b).is_err(),
            "flipping byte {i} ({:?}) went unnoticed",
            bytes[i] as char
        );
    }
    // Without a disk, the `disk` member is not written (version 2 readers see no change).
    let plain = seal(&sample()).expect("seal");
    assert!(!String::from_utf8_lossy(&plain).contains("disk"));
}

#[test]
fn disk_file_length_must_match_the_disk() {
    let mut m = sample_with_disk();
    if let Some(d) = m.partitions[0].disk.as_mut() {
        d.len = 2 * 4096;
    }
    let e = validate(Path::new("d"), &m).expect_err("len");
    assert!(
        e.to_string()
            .contains("files[\"a.disk\"].len is 12288, must be 8192 for this disk length"),
        "{e}"
    );
}

#[test]
fn path_traversal_in_file_names_is_refused() {
    let mut m = sample();
    m.partitions[0].memory_file = "../../etc/passwd".into();
    let e = validate(Path::new("d"), &m).expect_err("traversal");
    assert!(e.to_string().contains("memory_file"), "{e}");
    let mut m = sample();
    m.partitions[0].name = "../x".into();
    assert!(validate(Path::new("d"), &m).is_err());
}

#[test]
fn memory_file_length_must_match_ram() {
    let mut m = sample();
    m.partitions[0].ram[0].len = 4096;
    let e = validate(Path::new("d"), &m).expect_err("len");
    assert!(e.to_string().contains("files[\"a.mem\"].len"), "{e}");
}
