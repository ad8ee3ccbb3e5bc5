//! Interop with virtio-drivers 0.13, the driver the reference guests use: its `VirtIOBlk`
//! runs on the host against the device through the virtio-mmio window, over a disk file in
//! a temporary directory.

use std::sync::Arc;

use virtio_drivers::device::blk::{VirtIOBlk, SECTOR_SIZE as DRV_SECTOR};

use super::hal::{guest_memory, DiskWindow, TestHal, Window};
use super::*;

type Driver = VirtIOBlk<TestHal, DiskWindow<DiskFile>>;

/// A device over the file at `path` (created with `size` bytes if missing) on this thread's
/// guest memory, started by virtio-drivers.
fn start(path: &std::path::Path, size: u64) -> (Arc<BlkMmio<DiskFile>>, Driver) {
    let file = DiskFile::open(path, Some(size)).unwrap();
    let (irq, _) = counted_irq();
    let mmio = Arc::new(BlkMmio::new(file, "duplex-controller", guest_memory(), irq).unwrap());
    let blk = Driver::new(Window(mmio.clone())).expect("driver starts");
    (mmio, blk)
}

#[test]
fn driver_writes_reads_back_flushes_and_reads_the_id_over_a_file() {
    let dir = temp_dir("driver");
    let path = dir.join("controller.img");
    let (mmio, mut blk) = start(&path, 4 << 20);
    assert_eq!(DRV_SECTOR as u64, SECTOR_SIZE);
    assert_eq!(blk.capacity(), (4 << 20) / 512);
    assert!(!blk.readonly());
    let mut id = [0u8; ID_LEN];
    let n = blk.device_id(&mut id).expect("GET_ID");
    assert_eq!(&id[..n], b"duplex-controller");

    let cases = [(0usize, 512usize, 1u8), (9, 4096, 2), (8000, 3 * 512, 3)];
    for &(sector, len, seed) in &cases {
        blk.write_blocks(sector, &pattern(len, seed))
            .expect("write");
    }
    blk.flush().expect("flush");
    for &(sector, len, seed) in &cases {
        let mut buf = vec![0u8; len];
        blk.read_blocks(sector, &mut buf).expect("read");
        assert!(buf == pattern(len, seed), "sector {sector}, byte-exact");
    }
    // A read past the end is an I/O error for the driver, and the device goes on.
    let mut buf = [0u8; 512];
    assert_eq!(
        blk.read_blocks(((4 << 20) / 512) as usize, &mut buf),
        Err(virtio_drivers::Error::IoError)
    );
    blk.read_blocks(0, &mut buf).expect("read after the error");
    assert!(buf[..] == pattern(512, 1)[..]);

    let st = mmio.stats();
    assert_eq!(
        (st.writes, st.reads, st.flushes, st.io_errors),
        (3, 4, 1, 1)
    );
    assert_eq!(st.malformed + st.unsupported + st.backend_errors, 0);
    // The blocks the driver wrote: sector 0 (block 0), sectors 9-16 (blocks 1-2),
    // sectors 8000-8002 (block 1000).
    assert_eq!(
        DirtyBlocks::block_numbers(&mmio.take_dirty_blocks()),
        vec![0, 1, 2, 1000]
    );
    drop(blk);
    drop(mmio);

    // What was written is in the file: a new device over it (another run) reads it back.
    let (_mmio, mut blk) = start(&path, 1 << 20);
    assert_eq!(blk.capacity(), (4 << 20) / 512, "the file kept its size");
    let mut buf = vec![0u8; 4096];
    blk.read_blocks(9, &mut buf).expect("read");
    assert!(buf == pattern(4096, 2));
    let _ = std::fs::remove_dir_all(&dir);
}
