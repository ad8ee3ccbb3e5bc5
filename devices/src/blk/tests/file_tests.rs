//! The file backend on its own: a missing file created sparse, an existing one kept at its
//! size, the errors (naming the path) for what cannot be a disk, reads, writes and flush
//! through the file, and the file handed to the snapshot code.

use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};

use super::*;

#[test]
fn a_missing_file_is_created_sparse_and_an_existing_one_keeps_its_size() {
    let dir = temp_dir("create");
    let path = dir.join("disk.img");
    let mut disk = DiskFile::open(&path, Some(64 << 20)).unwrap();
    assert_eq!(disk.disk_len(), 64 << 20);
    assert_eq!(disk.path(), path.as_path());
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "sparse: {} blocks",
        meta.blocks()
    );
    disk.write_at(&[7; 512], 4096).unwrap();
    disk.flush().unwrap();
    drop(disk);
    // Opened again with another size: the file keeps its size and contents.
    let mut disk = DiskFile::open(&path, Some(1 << 20)).unwrap();
    assert_eq!(disk.disk_len(), 64 << 20);
    let mut b = [0u8; 512];
    disk.read_at(&mut b, 4096).unwrap();
    assert_eq!(b, [7; 512]);
    // And without a size.
    assert_eq!(DiskFile::open(&path, None).unwrap().disk_len(), 64 << 20);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn what_cannot_be_a_disk_is_refused_with_the_path_named() {
    let dir = temp_dir("refuse");
    let named = |e: DiskError, p: &std::path::Path| {
        let msg = e.to_string();
        assert!(msg.contains(&*p.to_string_lossy()), "{msg}");
        e
    };
    let missing = dir.join("missing.img");
    let e = named(DiskFile::open(&missing, None).unwrap_err(), &missing);
    assert!(matches!(e, DiskError::Missing { .. }));
    assert!(!missing.exists());
    for size in [0, 1000] {
        let e = named(DiskFile::open(&missing, Some(size)).unwrap_err(), &missing);
        assert!(matches!(e, DiskError::BadSize { len, .. } if len == size));
        assert!(!missing.exists(), "nothing created for a bad size");
    }
    let odd = dir.join("odd.img");
    std::fs::write(&odd, [0u8; 700]).unwrap();
    let e = named(DiskFile::open(&odd, Some(4096)).unwrap_err(), &odd);
    assert!(matches!(e, DiskError::BadSize { len: 700, .. }));
    let empty = dir.join("empty.img");
    std::fs::write(&empty, []).unwrap();
    let e = named(DiskFile::open(&empty, None).unwrap_err(), &empty);
    assert!(matches!(e, DiskError::BadSize { len: 0, .. }));
    let e = named(DiskFile::open(&dir, None).unwrap_err(), &dir);
    assert!(matches!(
        e,
        DiskError::NotRegular { .. } | DiskError::Open { .. }
    ));
    let nowhere = dir.join("no-such-dir").join("disk.img");
    let e = named(DiskFile::open(&nowhere, Some(4096)).unwrap_err(), &nowhere);
    assert!(matches!(e, DiskError::Open { .. }));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_device_over_a_file_writes_it_and_hands_it_to_the_snapshot_code() {
    let dir = temp_dir("device");
    let path = dir.join("disk.img");
    let file = DiskFile::open(&path, Some(DISK_LEN as u64)).unwrap();
    let mut d = Disk::new().with_backend(file);
    d.init(F_FLUSH | F_BLK_SIZE);
    let data = pattern(8192, 5);
    assert_eq!(d.write(24, &data, 3).status, status::OK);
    assert_eq!(d.bare(req::FLUSH, 0).status, status::OK);
    let mut on_disk = vec![0u8; 8192];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut on_disk, 24 * 512)
        .unwrap();
    assert!(on_disk == data, "in the file");
    assert_eq!(d.read(24, 8192, 2).data, data);
    // The snapshot code's view: dirty blocks 3 and 4, read from a duplicate of the file.
    let dirty = DirtyBlocks::block_numbers(&d.mmio.take_dirty_blocks());
    assert_eq!(dirty, vec![3, 4]);
    let mut f = d.mmio.backend_file().unwrap().expect("a file-backed disk");
    let mut all = Vec::new();
    f.read_to_end(&mut all).unwrap();
    assert_eq!(all.len(), DISK_LEN);
    assert!(all[3 * 4096..5 * 4096] == data[..]);
    let mut block = vec![0u8; 4096];
    d.mmio.read_disk_at(4 * 4096, &mut block).unwrap();
    assert!(block[..] == data[4096..]);
    let _ = std::fs::remove_dir_all(&dir);
}
