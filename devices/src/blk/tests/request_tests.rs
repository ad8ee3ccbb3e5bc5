//! Requests with a hand-written driver: config space and features, writes read back
//! byte-exact whatever the framing, flush, `GET_ID`, requests answered `IOERR` or `UNSUPP`,
//! a failing backend, write-through without `FLUSH`, and the dirty blocks.

use super::*;

#[test]
fn config_space_holds_capacity_and_blk_size_and_only_flush_and_blk_size_are_offered() {
    let d = Disk::new();
    assert_eq!(d.reg_read(reg::DEVICE_ID), 2);
    assert_eq!(
        d.device_features(),
        F_FLUSH | F_BLK_SIZE | (1 << VIRTIO_F_VERSION_1),
        "no RO, no EVENT_IDX or INDIRECT_DESC, no write-cache toggle"
    );
    d.reg_write(reg::QUEUE_SEL, 0);
    assert_eq!(d.reg_read(reg::QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
    d.reg_write(reg::QUEUE_SEL, 1);
    assert_eq!(d.reg_read(reg::QUEUE_NUM_MAX), 0, "one queue only");
    let mut config = [0xffu8; 32];
    d.mmio.read(0x100, &mut config);
    assert_eq!(
        u64::from_le_bytes(config[..8].try_into().unwrap()),
        (DISK_LEN / 512) as u64
    );
    assert_eq!(config[8..20], [0; 12], "size_max, seg_max, geometry: none");
    assert_eq!(u32::from_le_bytes(config[20..24].try_into().unwrap()), 512);
    assert_eq!(config[24..], [0; 8], "nothing beyond blk_size");
    // Byte-wise reads of capacity's high half (a driver reading the u64 in two u32).
    let mut high = [0xffu8; 4];
    d.mmio.read(0x104, &mut high);
    assert_eq!(high, [0; 4]);
    // Writes to the config space change nothing.
    d.mmio.write(0x100, &[1; 8]);
    assert_eq!(d.mmio.capacity(), (DISK_LEN / 512) as u64);
    assert_eq!(
        (d.mmio.disk_len(), d.mmio.id()),
        (DISK_LEN as u64, ID.to_owned())
    );
}

#[test]
fn new_refuses_bad_ids_and_disk_sizes() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let make =
        |len: usize, id: &str| BlkMmio::new(MemDisk::new(len), id, mem.clone(), counted_irq().0);
    assert!(matches!(make(4096, ""), Err(BlkError::BadId(_))));
    assert!(matches!(
        make(4096, "a-name-longer-than-20"),
        Err(BlkError::BadId(_))
    ));
    assert!(matches!(make(4096, "tab\there"), Err(BlkError::BadId(_))));
    assert!(matches!(make(0, ID), Err(BlkError::BadDiskLen(0))));
    assert!(matches!(make(1000, ID), Err(BlkError::BadDiskLen(1000))));
    assert!(make(512, "exactly-20-chars-id!").is_ok());
}

#[test]
fn writes_read_back_byte_exact_at_several_sectors_and_framings() {
    let mut d = Disk::started();
    let last = (DISK_LEN / 512) as u64 - 8;
    let cases: [(u64, usize, usize); 5] = [
        (0, 512, 1),
        (1, 4096, 3),
        (77, 512 * 9, 4),
        (last, 4096, 2),
        (1000, 64 * 1024 + 512, 1), // more than the device's bounce buffer
    ];
    for (i, &(sector, len, pieces)) in cases.iter().enumerate() {
        let data = pattern(len, i as u8 + 1);
        let w = d.write(sector, &data, pieces);
        assert_eq!((w.status, w.used), (status::OK, 1), "write at {sector}");
        let at = sector as usize * 512;
        assert!(
            d.drv.backend.contents()[at..at + len] == data[..],
            "on the disk"
        );
        // Read back with another framing.
        let r = d.read(sector, len, pieces + 1);
        assert_eq!((r.status, r.used), (status::OK, len as u32 + 1));
        assert!(r.data == data, "read back byte-exact at sector {sector}");
    }
    // Untouched sectors read as zeros.
    assert_eq!(d.read(500, 512, 1).data, vec![0; 512]);
    let st = d.mmio.stats();
    let bytes: u64 = cases.iter().map(|c| c.1 as u64).sum();
    assert_eq!((st.writes, st.bytes_written), (5, bytes));
    assert_eq!((st.reads, st.bytes_read), (6, bytes + 512));
    assert_eq!(st.io_errors + st.malformed + st.unsupported, 0);
    assert!(d.irqs() >= 11, "an interrupt per notified request");
}

#[test]
fn header_data_and_status_may_share_descriptors() {
    let mut d = Disk::started();
    let data = pattern(1024, 7);
    // OUT: header and data in one device-readable descriptor.
    let mut out = hdr(req::OUT, 4).to_vec();
    out.extend_from_slice(&data);
    let o = d.put(&out);
    let s = d.alloc(1);
    let w = d.submit(&[(o, out.len() as u32, false), (s, 1, true)]);
    assert_eq!((w.status, w.used), (status::OK, 1));
    // IN: the header split over two descriptors, data and status in one writable one.
    let h = d.put(&hdr(req::IN, 4));
    let buf = d.alloc(1025);
    let r = d.submit(&[(h, 5, false), (h + 5, 11, false), (buf, 1025, true)]);
    assert_eq!((r.status, r.used), (status::OK, 1025));
    assert!(r.data == data);
}

#[test]
fn flush_calls_the_backends_flush_and_writes_become_durable() {
    let mut d = Disk::started();
    let data = pattern(512, 3);
    assert_eq!(d.write(8, &data, 1).status, status::OK);
    assert_eq!(d.drv.backend.flushes(), 0, "a write alone does not flush");
    assert_eq!(d.drv.backend.durable()[4096..4608], [0; 512][..]);
    let f = d.bare(req::FLUSH, 12345);
    assert_eq!(
        (f.status, f.used),
        (status::OK, 1),
        "the sector of a flush is ignored"
    );
    assert_eq!(d.drv.backend.flushes(), 1);
    assert!(d.drv.backend.durable()[4096..4608] == data[..]);
    assert_eq!(d.mmio.stats().flushes, 1);
}

#[test]
fn without_flush_negotiated_the_device_writes_through() {
    let mut d = Disk::new();
    d.init(F_BLK_SIZE);
    let data = pattern(512, 4);
    assert_eq!(d.write(0, &data, 1).status, status::OK);
    assert_eq!(d.drv.backend.flushes(), 1, "each write is flushed");
    assert!(d.drv.backend.durable()[..512] == data[..]);
}

#[test]
fn get_id_answers_the_id_nul_padded_and_cut_to_the_buffer() {
    let mut d = Disk::started();
    let h = d.put(&hdr(req::GET_ID, 0));
    let buf = d.alloc(ID_LEN as u32);
    let s = d.alloc(1);
    let r = d.submit(&[(h, 16, false), (buf, ID_LEN as u32, true), (s, 1, true)]);
    let mut want = ID.as_bytes().to_vec();
    want.resize(ID_LEN, 0);
    assert_eq!((r.status, r.used, r.data), (status::OK, 21, want));
    // A shorter buffer gets the start; a longer one 20 bytes and the rest untouched.
    let short = d.alloc(6);
    let r = d.submit(&[(h, 16, false), (short, 7, true)]);
    assert_eq!(
        (r.status, r.used, r.data),
        (status::OK, 7, b"duplex".to_vec())
    );
    let long = d.alloc(33);
    let r = d.submit(&[(h, 16, false), (long, 33, true)]);
    assert_eq!((r.status, r.used), (status::OK, 21));
    assert_eq!(r.data[..16], *ID.as_bytes());
    assert_eq!(r.data[20..], [0xee; 12], "beyond 20 bytes: not written");
}

#[test]
fn out_of_range_misaligned_and_unsupported_requests_get_their_status_and_are_counted() {
    let mut d = Disk::started();
    let sectors = (DISK_LEN / 512) as u64;
    let ioerr = [
        d.write(sectors, &[1; 512], 1),      // just past the end
        d.write(sectors - 1, &[1; 1024], 1), // straddles the end
        d.read(u64::MAX / 256, 512, 1),      // sector * 512 overflows
        d.read(0, 100, 1),                   // not a whole sector
        d.write(0, &[1; 513], 2),            // not a whole sector
    ];
    for r in &ioerr {
        assert_eq!((r.status, r.used), (status::IOERR, 1), "{r:?}");
    }
    assert!(
        d.drv.backend.contents().iter().all(|&b| b == 0),
        "nothing written"
    );
    for type_ in [2, 3, 11, 13, 0xffff_ffff] {
        let r = d.bare(type_, 0);
        assert_eq!((r.status, r.used), (status::UNSUPP, 1), "type {type_}");
    }
    // The last sector itself is fine.
    assert_eq!(d.write(sectors - 1, &[2; 512], 1).status, status::OK);
    let st = d.mmio.stats();
    assert_eq!((st.io_errors, st.unsupported, st.malformed), (5, 5, 0));
    assert_eq!(
        st.backend_errors, 0,
        "refused by the device, not by the backend"
    );
    assert_eq!((st.writes, st.reads), (1, 0));
    assert_eq!(
        d.mmio
            .take_dirty_blocks()
            .iter()
            .map(|w| w.count_ones())
            .sum::<u32>(),
        1
    );
}

#[test]
fn a_failing_backend_answers_ioerr_and_is_counted() {
    let mut d = Disk::started();
    d.drv.backend.set_failing(true);
    assert_eq!(d.write(0, &[1; 512], 1).status, status::IOERR);
    let r = d.read(0, 512, 1);
    assert_eq!((r.status, r.used), (status::IOERR, 1), "nothing was read");
    assert_eq!(d.bare(req::FLUSH, 0).status, status::IOERR);
    let st = d.mmio.stats();
    assert_eq!((st.io_errors, st.backend_errors), (3, 3));
    assert_eq!(st.writes + st.reads + st.flushes, 0);
    d.drv.backend.set_failing(false);
    assert_eq!(d.write(0, &[1; 512], 1).status, status::OK, "works again");
}

#[test]
fn dirty_blocks_are_exactly_the_written_4k_blocks_and_take_clears_them() {
    let mut d = Disk::started();
    let words = (DISK_LEN as u64 / DIRTY_BLOCK_SIZE).div_ceil(64) as usize;
    assert_eq!(d.mmio.take_dirty_blocks(), vec![0; words], "clean at start");
    // Sector 1 (inside block 0), sectors 7-8 (straddling blocks 0 and 1), a whole block 5,
    // a partial write in block 200 and the last sector of the disk (block 255).
    d.write(1, &[1; 512], 1);
    d.write(7, &[1; 1024], 1);
    d.write(40, &[1; 4096], 1);
    d.write(200 * 8 + 3, &[1; 512], 1);
    d.write((DISK_LEN / 512) as u64 - 1, &[1; 512], 1);
    // Reads, flushes and failed requests mark nothing.
    d.read(100 * 8, 4096, 1);
    d.bare(req::FLUSH, 0);
    d.write(u64::MAX, &[1; 512], 1);
    let taken = d.mmio.take_dirty_blocks();
    assert_eq!(taken.len(), words);
    assert_eq!(DirtyBlocks::block_numbers(&taken), vec![0, 1, 5, 200, 255]);
    assert_eq!(taken[0], 0b10_0011, "bit i % 64 of word i / 64");
    assert_eq!(d.mmio.take_dirty_blocks(), vec![0; words], "taken: clean");
    d.write(16, &[1; 512], 1);
    d.mmio.clear_dirty_blocks();
    assert_eq!(d.mmio.take_dirty_blocks(), vec![0; words], "cleared");
    // The snapshot code reads the blocks through the device.
    let mut block = vec![0u8; 4096];
    d.mmio.read_disk_at(4096 * 5, &mut block).unwrap();
    assert_eq!(block, vec![1; 4096]);
    assert!(d
        .mmio
        .read_disk_at(DISK_LEN as u64 - 10, &mut block)
        .is_err());
    assert!(
        d.mmio.backend_file().unwrap().is_none(),
        "an in-memory disk has no file"
    );
}
