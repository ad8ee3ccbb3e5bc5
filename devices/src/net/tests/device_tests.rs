//! The card with a hand-written driver: config space and features, malformed chains both
//! ways, oversized frames, a full backend, the RX poll interest, sleep and reset.

use super::driver_tests::fd_readable;
use super::*;
use crate::persist::Suspendable;

#[test]
fn config_space_holds_mac_and_link_up_and_only_mac_and_status_are_offered() {
    let c = Card::new(8);
    assert_eq!(c.reg_read(reg::DEVICE_ID), 1);
    assert_eq!(
        c.device_features(),
        F_MAC | F_STATUS | (1 << VIRTIO_F_VERSION_1),
        "no offloads, no mergeable buffers, no EVENT_IDX or INDIRECT_DESC"
    );
    let mut config = [0xffu8; 12];
    c.mmio.read(0x100, &mut config);
    assert_eq!(config[..6], MAC);
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), STATUS_LINK_UP);
    assert_eq!(config[8..], [0; 4], "nothing beyond the status");
    // Writes to the config space change nothing.
    c.mmio.write(0x100, &[0; 6]);
    assert_eq!(c.mmio.mac(), MAC);
    assert!(!c.mmio.wants_rx_poll(), "not started");
    assert!(matches!(
        NetMmio::new(
            pair(1).unwrap().0,
            [1, 0, 0, 0, 0, 1],
            c.drv.mem.clone(),
            counted_irq().0
        ),
        Err(NetError::BadMac(_))
    ));
}

#[test]
fn malformed_tx_chains_are_returned_empty_and_counted() {
    let mut c = Card::started(8);
    let good = frame(60, 1);
    let hdr = c.put(&NetHdr::default().to_bytes());
    let f = c.put(&good);
    let w = c.alloc(64);
    let offload = NetHdr {
        flags: 1, // NEEDS_CSUM
        ..NetHdr::default()
    };
    let off = c.put(&offload.to_bytes());
    let chains: Vec<Vec<(u64, u32, bool)>> = vec![
        // Shorter than the header.
        vec![(hdr, 5, false)],
        // A header and no Ethernet header.
        vec![(hdr, NET_HDR_LEN as u32, false)],
        // A device-writable descriptor where the device reads.
        vec![(hdr, NET_HDR_LEN as u32, false), (w, 64, true)],
        // Outside guest memory.
        vec![(hdr, NET_HDR_LEN as u32, false), (0xffff_0000, 60, false)],
        // Longer than any frame.
        vec![(hdr, NET_HDR_LEN as u32, false), (f, 70_000, false)],
        // Checksum offload asked for, not negotiated.
        vec![(off, NET_HDR_LEN as u32, false), (f, 60, false)],
    ];
    let n = chains.len();
    for ch in &chains {
        c.push(1, ch);
    }
    // And one good frame after them: the queue goes on.
    c.push(1, &[(hdr, NET_HDR_LEN as u32, false), (f, 60, false)]);
    let irqs = c.irqs();
    c.notify(1);
    let used = c.used(1);
    assert_eq!(used.len(), n + 1, "every chain returned");
    assert!(used.iter().all(|(_, len)| *len == 0));
    assert!(c.irqs() > irqs, "interrupt raised");
    let st = c.mmio.stats();
    assert_eq!(st.malformed_tx, n as u64);
    assert_eq!(st.tx_frames, 1);
    let sent = c.drv.peer.take_sent();
    assert_eq!(sent.len(), 1);
    assert!(sent[0][NET_HDR_LEN..] == good[..]);
}

#[test]
fn malformed_rx_chains_are_returned_empty_and_the_frame_takes_a_good_one() {
    let mut c = Card::started(8);
    let r = c.put(&[0; 64]);
    let w = c.alloc(2048);
    // Device-readable where the device writes; too short for the header; outside memory.
    c.push(0, &[(r, 64, false)]);
    c.push(0, &[(w, 8, true)]);
    c.push(0, &[(0xffff_0000, 2048, true)]);
    // A good chain, split in three descriptors (header, part of the frame, the rest).
    let (a, b, d) = (c.alloc(NET_HDR_LEN as u32), c.alloc(100), c.alloc(2000));
    c.push(
        0,
        &[
            (a, NET_HDR_LEN as u32, true),
            (b, 100, true),
            (d, 2000, true),
        ],
    );
    c.notify(0);
    // The notification only tells the owner's loop, which then calls `process_rx`.
    assert!(c.mmio.wants_rx_poll());
    c.mmio.process_rx();
    assert_eq!(c.recv(), vec![None; 3], "returned at once, no frame taken");
    let f = frame(1514, 4);
    c.drv.peer.inject(&f).unwrap();
    c.mmio.process_rx();
    // Into the good (scattered) chain, byte-exact.
    assert_eq!(c.recv(), vec![Some(f)]);
    let st = c.mmio.stats();
    assert_eq!((st.malformed_rx, st.rx_frames, st.rx_dropped), (3, 1, 0));
}

#[test]
fn oversized_and_runt_frames_are_dropped_and_the_buffer_reused() {
    let mut c = Card::started(8);
    c.add_rx(1, 1526);
    c.drv.peer.inject(&frame(1600, 1)).unwrap();
    c.drv.peer.inject_raw(vec![0; 5]).unwrap();
    c.drv.peer.inject(&frame(1514, 2)).unwrap();
    c.mmio.process_rx();
    let got = c.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].as_deref(), Some(&frame(1514, 2)[..]));
    let st = c.mmio.stats();
    assert_eq!((st.rx_dropped, st.rx_frames, st.malformed_rx), (2, 1, 0));
}

#[test]
fn a_full_backend_drops_tx_frames_and_counts_them() {
    let mut c = Card::started(2);
    for seed in 0..3 {
        assert_eq!(c.send(&frame(60, seed)), vec![0], "returned either way");
    }
    let st = c.mmio.stats();
    assert_eq!((st.tx_frames, st.tx_dropped, st.backend_errors), (2, 1, 0));
    assert_eq!(c.drv.peer.take_sent().len(), 2);
    c.send(&frame(60, 9));
    assert_eq!(c.mmio.stats().tx_frames, 3, "room again");
}

#[test]
fn rx_poll_is_wanted_only_while_the_guest_has_rx_buffers() {
    let mut c = Card::started(8);
    assert!(!c.mmio.wants_rx_poll(), "no buffers yet");
    c.drv.peer.inject(&frame(60, 1)).unwrap();
    assert!(fd_readable(c.mmio.backend_fd()));
    c.add_rx(1, 2048);
    // The notification makes the loop poll; its `process_rx` delivers the waiting frame
    // and uses the only buffer.
    assert!(c.mmio.wants_rx_poll());
    c.mmio.process_rx();
    assert_eq!(c.recv().len(), 1);
    assert!(!c.mmio.wants_rx_poll());
    c.add_rx(2, 2048);
    assert!(c.mmio.wants_rx_poll());
    c.mmio.process_rx();
    assert!(!fd_readable(c.mmio.backend_fd()));
    // Driver reset: the device stops, the fd is not to be polled, frames stay queued.
    c.reg_write(reg::STATUS, 0);
    assert!(!c.mmio.wants_rx_poll());
    c.drv.peer.inject(&frame(60, 2)).unwrap();
    c.mmio.process_rx();
    assert_eq!(c.drv.peer.pending(), 1);
}

#[test]
fn asleep_the_card_touches_nothing_and_catches_up_when_woken() {
    let mut c = Card::started(8);
    c.add_rx(2, 2048);
    c.mmio.sleep().unwrap();
    assert!(!c.mmio.wants_rx_poll(), "asleep: the fd is not polled");
    c.drv.peer.inject(&frame(60, 1)).unwrap();
    c.mmio.process_rx();
    assert_eq!(c.send(&frame(60, 2)), Vec::<u32>::new(), "TX waits");
    assert!(c.recv().is_empty());
    assert_eq!(c.mmio.stats(), NetStats::default());
    c.mmio.wake();
    assert_eq!(c.used(1).len(), 1, "the TX chain, at the wake");
    assert_eq!(c.recv(), vec![Some(frame(60, 1))]);
    let st = c.mmio.stats();
    assert_eq!((st.tx_frames, st.rx_frames), (1, 1));
    assert!(c.mmio.wants_rx_poll());
}

#[test]
fn a_refill_notifies_once_per_dry_spell_and_moves_no_frame_on_the_vcpu() {
    let mut c = Card::started(8);
    let flags = |c: &Card| -> u16 { c.drv.mem.read_obj(GuestAddress(QBASE[0] + 0x2000)).unwrap() };
    let no_notify = virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY as u16;
    c.drv.peer.inject(&frame(60, 1)).unwrap();
    let eventfd_reads = |c: &Card| c.mmio.rx_poll_changed.read().unwrap_or(0);
    eventfd_reads(&c);
    // The guest's refill notification: nothing moves on "the vCPU" (this thread); the
    // loop is told, and the guest is asked for no more notifications.
    c.add_rx(1, 2048);
    assert_eq!(c.drv.peer.pending(), 1, "the frame waits for the loop");
    assert!(c.mmio.wants_rx_poll());
    assert_eq!(eventfd_reads(&c), 1, "the loop is told");
    assert_eq!(flags(&c) & no_notify, no_notify, "no more notifications");
    // More buffers while the loop has not run: the flag stays (a real driver would not
    // notify).
    c.add_rx(3, 2048);
    assert_eq!(flags(&c) & no_notify, no_notify);
    c.mmio.process_rx();
    assert_eq!(c.recv().len(), 1);
    assert_eq!(
        flags(&c) & no_notify,
        no_notify,
        "buffers wait: still none wanted"
    );
    // The loop uses every buffer: dry, so the next refill must notify.
    for seed in 2..5 {
        c.drv.peer.inject(&frame(60, seed)).unwrap();
    }
    c.mmio.process_rx();
    assert_eq!(c.recv().len(), 3);
    assert!(!c.mmio.wants_rx_poll());
    assert_eq!(flags(&c) & no_notify, 0, "dry: notify me");
}

#[test]
fn process_rx_moves_a_burst_in_batches() {
    let mut c = Card::started(64);
    c.add_rx(64, 2048);
    for seed in 0..40 {
        c.drv.peer.inject(&frame(100, seed)).unwrap();
    }
    let irqs = c.irqs();
    c.mmio.process_rx();
    let got = c.recv();
    assert_eq!(got.len(), 40, "the whole burst, in batches of RX_BATCH");
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, f)| f.as_deref() == Some(&frame(100, i as u8)[..])));
    assert_eq!(
        c.irqs() - irqs,
        40_usize.div_ceil(RX_BATCH),
        "an interrupt per batch"
    );
}
