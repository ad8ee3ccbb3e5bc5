//! Guest input the device must survive: chains of the wrong shape (direction, too short,
//! no status byte, outside guest memory), a broken ring; and the device's life: sleep and
//! wake, reset, a full queue served in one notification.

use super::*;
use crate::persist::Suspendable;

#[test]
fn malformed_chains_answer_ioerr_or_come_back_empty_and_are_counted() {
    let mut d = Disk::started();
    let h_in = d.put(&hdr(req::IN, 0));
    let h_out = d.put(&hdr(req::OUT, 0));
    let h_flush = d.put(&hdr(req::FLUSH, 0));
    let data = d.put(&[5; 512]);
    let w = d.alloc(512);
    let outside = (MEM_SIZE as u64) + 0x1000;
    // Chains answered IOERR at their status byte (used length 1).
    let ioerr: Vec<(&str, Chain)> = vec![
        ("header too short", vec![(h_in, 8, false), (w, 1, true)]),
        ("no header at all", vec![(w, 513, true)]),
        (
            "readable after writable",
            vec![
                (h_in, 16, false),
                (w, 512, true),
                (data, 16, false),
                (w + 512, 1, true),
            ],
        ),
        (
            "IN with readable data",
            vec![(h_in, 16, false), (data, 512, false), (w, 1, true)],
        ),
        (
            "OUT with writable data",
            vec![(h_out, 16, false), (w, 513, true)],
        ),
        (
            "FLUSH with data",
            vec![(h_flush, 16, false), (data, 512, false), (w, 1, true)],
        ),
        (
            "OUT data outside memory",
            vec![(h_out, 16, false), (outside, 512, false), (w, 1, true)],
        ),
        (
            "IN data outside memory",
            vec![(h_in, 16, false), (outside, 512, true), (w, 1, true)],
        ),
        (
            "header outside memory",
            vec![(outside, 16, false), (w, 1, true)],
        ),
        (
            "data wrapping the address space",
            vec![
                (h_out, 16, false),
                (u64::MAX - 100, 512, false),
                (w, 1, true),
            ],
        ),
    ];
    for (what, chain) in &ioerr {
        let r = d.submit(chain);
        assert_eq!((r.status, r.used), (status::IOERR, 1), "{what}");
    }
    // Chains with no status byte that can be written: returned with length 0.
    let empty: Vec<(&str, Chain)> = vec![
        (
            "no writable byte",
            vec![(h_out, 16, false), (data, 512, false)],
        ),
        (
            "status outside memory",
            vec![(h_in, 16, false), (outside, 1, true)],
        ),
        (
            "status past the end of the address space",
            vec![(h_in, 16, false), (u64::MAX, 1, true)],
        ),
        (
            "zero-length writable descriptor",
            vec![(h_in, 16, false), (w, 0, true)],
        ),
    ];
    for (what, chain) in &empty {
        d.push(chain);
        d.notify();
        let used = d.used();
        assert_eq!(used.len(), 1, "{what}: returned");
        assert_eq!(used[0].1, 0, "{what}: length 0");
    }
    let st = d.mmio.stats();
    assert_eq!(st.malformed, (ioerr.len() + empty.len()) as u64);
    assert_eq!(
        (st.io_errors, st.reads, st.writes, st.flushes),
        (0, 0, 0, 0)
    );
    assert!(
        d.drv.backend.contents().iter().all(|&b| b == 0),
        "nothing written to the disk"
    );
    // The queue goes on.
    assert_eq!(d.write(0, &[9; 512], 1).status, status::OK);
    assert_eq!(d.read(0, 512, 1).data, vec![9; 512]);
}

#[test]
fn a_broken_ring_is_counted_and_never_panics() {
    let mut d = Disk::started();
    // A descriptor whose `next` points outside the table: the chain ends there (virtio-queue
    // stops), so the request has no status byte.
    let h = d.put(&hdr(req::IN, 0));
    d.push(&[(h, 16, false)]);
    let raw_flags = (virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16).to_le_bytes();
    d.drv
        .mem
        .write_slice(&raw_flags, GuestAddress(QBASE + 12))
        .unwrap();
    d.drv
        .mem
        .write_obj(999u16, GuestAddress(QBASE + 14))
        .unwrap();
    d.notify();
    assert_eq!(d.used()[0].1, 0);
    // An available index far ahead of what the queue can hold.
    d.drv
        .mem
        .write_obj(1000u16, GuestAddress(QBASE + 0x1000 + 2))
        .unwrap();
    d.notify();
    assert_eq!(d.mmio.stats().malformed, 2);
    // The device is still alive: a reset and a new start serve requests again.
    let mut fresh = Disk {
        mmio: d.mmio.clone(),
        drv: Disk::new().drv,
    };
    fresh.drv.mem = d.drv.mem.clone();
    fresh.drv.backend = d.drv.backend.clone();
    fresh.drv.wakes = d.drv.wakes.clone();
    fresh.init(F_FLUSH);
    assert_eq!(fresh.write(3, &[4; 512], 1).status, status::OK);
}

#[test]
fn a_notification_serves_a_full_queue_and_raises_one_interrupt() {
    let mut d = Disk::started();
    for i in 0..QSIZE / 2 {
        // Two descriptors each: header with data, status.
        let mut out = hdr(req::OUT, u64::from(i)).to_vec();
        out.extend_from_slice(&[i as u8; 512]);
        let o = d.put(&out);
        let s = d.alloc(1);
        d.push(&[(o, out.len() as u32, false), (s, 1, true)]);
    }
    let irqs = d.irqs();
    d.notify();
    let used = d.used();
    assert_eq!(
        used.len(),
        usize::from(QSIZE / 2),
        "all served in one notification"
    );
    assert!(used.iter().all(|(_, len)| *len == 1));
    assert_eq!(d.irqs() - irqs, 1, "one interrupt for the batch");
    assert_eq!(d.mmio.stats().writes, u64::from(QSIZE / 2));
    let disk = d.drv.backend.contents();
    assert!((0..usize::from(QSIZE / 2)).all(|i| disk[i * 512..(i + 1) * 512] == [i as u8; 512]));
}

#[test]
fn asleep_the_device_touches_nothing_and_serves_what_waited_when_woken() {
    let mut d = Disk::started();
    d.mmio.sleep().unwrap();
    let data = pattern(4096, 9);
    for (sector, pieces) in [(16, 2), (24, 1)] {
        let chain = d.write_chain(sector, &data, pieces);
        d.push(&chain);
        d.notify();
    }
    let used_before: u16 = d
        .drv
        .mem
        .read_obj(GuestAddress(QBASE + 0x2000 + 2))
        .unwrap();
    assert_eq!(used_before, 0, "no used entry while asleep");
    assert!(
        d.drv.backend.contents().iter().all(|&b| b == 0),
        "the disk is untouched"
    );
    assert_eq!(d.mmio.stats(), BlkStats::default());
    let irqs = d.irqs();
    // Nested: the first wake is not the last.
    d.mmio.sleep().unwrap();
    d.mmio.wake();
    assert_eq!(d.mmio.stats().writes, 0, "still asleep");
    d.mmio.wake();
    assert_eq!(d.used().len(), 2, "both requests, at the wake");
    assert!(d.irqs() > irqs, "and their interrupt");
    let disk = d.drv.backend.contents();
    assert!(disk[16 * 512..24 * 512] == data[..], "the first write");
    assert!(disk[24 * 512..32 * 512] == data[..], "the second write");
    assert_eq!(d.mmio.stats().writes, 2);
    assert_eq!(
        DirtyBlocks::block_numbers(&d.mmio.take_dirty_blocks()),
        vec![2, 3]
    );
}

#[test]
fn a_reset_forgets_a_notification_that_waited_and_the_restarted_device_works() {
    let mut d = Disk::started();
    d.mmio.sleep().unwrap();
    let chain = d.write_chain(0, &[1; 512], 1);
    d.push(&chain);
    d.notify();
    d.reg_write(reg::STATUS, 0);
    d.mmio.wake();
    assert_eq!(d.mmio.stats().writes, 0, "the reset dropped the queue");
    assert!(d.drv.backend.contents().iter().all(|&b| b == 0));
    // Notifications before the driver starts the device are ignored.
    d.notify();
    let mut fresh = Disk {
        mmio: d.mmio.clone(),
        drv: Disk::new().drv,
    };
    fresh.drv.mem = d.drv.mem.clone();
    fresh.drv.backend = d.drv.backend.clone();
    fresh.init(F_FLUSH | F_BLK_SIZE);
    assert_eq!(fresh.write(0, &[2; 512], 1).status, status::OK);
    assert_eq!(fresh.read(0, 512, 1).data, vec![2; 512]);
}
