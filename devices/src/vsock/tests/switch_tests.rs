//! Partition-to-partition switching: delivery, connection table, spoofing, unknown CIDs,
//! backlogs and their cap, detach and device reset, malformed chains.

use super::*;
use crate::virtio::mmio::reg;
use crate::vsock::packet::{op, HOST_CID, TYPE_STREAM};
use crate::vsock::{ConnState, VsockError, BACKLOG_CAP, CONN_BACKLOG_CAP, CONTROL_SLACK};

fn switch() -> VsockSwitch {
    VsockSwitch::new().expect("switch")
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn request_response_and_rw_are_delivered_byte_exact() {
    let sw = switch();
    let mut a = MockGuest::new(&sw, 3, None);
    let mut b = MockGuest::new(&sw, 4, None);
    a.add_rx(8, 4096);
    // B's RX buffers hold 64 bytes of payload: larger RW packets arrive split.
    b.add_rx(8, (HDR_SIZE + 64) as u32);
    let (ca, sb) = (ep(3, 1000), ep(4, 80));

    let mut req = hdr(ca, sb, op::REQUEST);
    req.buf_alloc = 4096;
    req.fwd_cnt = 17;
    assert!(a.send(req, &[]));
    let got = b.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, req, "header delivered unchanged");
    assert!(b.wakes.load(Ordering::SeqCst) > 0, "B was woken");
    assert_eq!(b.reg_read(reg::INTERRUPT_STATUS) & 1, 1);
    assert!(b.irqfd.read().unwrap() > 0);
    let st = sw.stats();
    assert_eq!(st.connections, 1);
    assert_eq!(st.connection_list[0].state, ConnState::Connecting);

    assert!(b.send(hdr(sb, ca, op::RESPONSE), &[]));
    let got = a.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].0.op, got[0].0.src(), got[0].0.dst()),
        (op::RESPONSE, sb, ca)
    );
    assert_eq!(sw.stats().connection_list[0].state, ConnState::Established);

    let payload = pattern(200);
    assert!(a.send(hdr(ca, sb, op::RW), &payload));
    let got = b.recv();
    let lens: Vec<u32> = got.iter().map(|(h, _)| h.len).collect();
    assert_eq!(lens, vec![64, 64, 64, 8]);
    assert!(got
        .iter()
        .all(|(h, _)| h.op == op::RW && h.src() == ca && h.dst() == sb));
    let joined: Vec<u8> = got.into_iter().flat_map(|(_, d)| d).collect();
    assert_eq!(joined, payload);
    assert_eq!(sw.stats().connection_list[0].bytes_to_server, 200);

    assert!(b.send(hdr(sb, ca, op::SHUTDOWN), &[]));
    assert_eq!(a.recv()[0].0.op, op::SHUTDOWN);
    assert_eq!(sw.stats().connection_list[0].state, ConnState::Closing);
    assert!(a.send(hdr(ca, sb, op::RST), &[]));
    assert_eq!(b.recv()[0].0.op, op::RST);
    let st = sw.stats();
    assert_eq!(st.connections, 0);
    assert_eq!(st.counters.tx_packets, 5);
    assert_eq!(st.counters.rst_sent, 0);
    let json = serde_json::to_value(&st).unwrap();
    assert_eq!(json["counters"]["tx_packets"], 5);
    assert_eq!(json["partitions"][1]["cid"], 4);
}

#[test]
fn only_rw_packets_carry_payload() {
    let sw = switch();
    let mut a = MockGuest::new(&sw, 3, None);
    let mut b = MockGuest::new(&sw, 4, None);
    b.add_rx(4, 4096);
    assert!(a.send(hdr(ep(3, 1), ep(4, 80), op::REQUEST), b"not allowed"));
    let got = b.recv();
    assert_eq!((got[0].0.op, got[0].0.len), (op::REQUEST, 0));
    assert!(got[0].1.is_empty());
}

#[test]
fn a_guest_that_does_not_drain_rx_cannot_grow_its_backlog_without_bound() {
    let sw = switch();
    let mut a = MockGuest::new(&sw, 3, None);
    // Each REQUEST to a CID nobody has earns an RST, which A never takes.
    let n = (BACKLOG_CAP + CONTROL_SLACK) / HDR_SIZE + 100;
    a.send_many(hdr(ep(3, 1), ep(99, 80), op::REQUEST), n);
    let st = sw.stats();
    assert_eq!(st.counters.unknown_cid, n as u64);
    assert!(st.counters.backlog_drops >= 100);
    assert!(st.backlog_bytes <= BACKLOG_CAP + CONTROL_SLACK);
}

#[test]
fn spoofed_source_cid_is_dropped_and_counted() {
    let sw = switch();
    let mut a = MockGuest::new(&sw, 3, None);
    let mut b = MockGuest::new(&sw, 4, None);
    let mut c = MockGuest::new(&sw, 5, None);
    for g in [&mut a, &mut b, &mut c] {
        g.add_rx(4, 4096);
    }
    // A claims to be C.
    assert!(a.send(hdr(ep(5, 1), ep(4, 80), op::REQUEST), &[]));
    assert!(b.recv().is_empty());
    assert!(a.recv().is_empty());
    assert!(c.recv().is_empty());
    let st = sw.stats();
    assert_eq!(st.counters.spoofed, 1);
    assert_eq!(st.connections, 0);
}

#[test]
fn unknown_cid_request_gets_rst_other_packets_are_dropped() {
    let sw = switch();
    let mut a = MockGuest::new(&sw, 3, None);
    a.add_rx(4, 4096);
    assert!(a.send(hdr(ep(3, 1), ep(9, 80), op::REQUEST), &[]));
    let got = a.recv();
    assert_eq!(got.len(), 1);
    let rst = got[0].0;
    assert_eq!(
        (rst.op, rst.src(), rst.dst()),
        (op::RST, ep(9, 80), ep(3, 1))
    );
    assert_eq!(rst.type_, TYPE_STREAM);
    assert!(a.send(hdr(ep(3, 1), ep(9, 80), op::RW), b"lost"));
    assert!(a.recv().is_empty());
    // Another socket type (seqpacket) is not offered: REQUEST refused.
    let mut seq = hdr(ep(3, 2), ep(3, 80), op::REQUEST);
    seq.type_ = 2;
    assert!(a.send(seq, &[]));
    assert_eq!(a.recv()[0].0.op, op::RST);
    let st = sw.stats();
    assert_eq!(st.counters.unknown_cid, 2);
    assert_eq!(st.counters.unsupported, 1);
    assert_eq!(st.counters.rst_sent, 2);
    assert_eq!(st.connections, 0);
}

#[test]
fn backlog_waits_for_rx_buffers_then_drains() {
    let sw = switch();
    let mut a = MockGuest::new(&sw, 3, None);
    let mut b = MockGuest::new(&sw, 4, None);
    a.add_rx(4, 4096);
    // No RX buffers yet: with an empty backlog the device asks not to be notified.
    assert_eq!(b.used_flags(0), 1, "NO_NOTIFY while nothing waits");
    let payload = pattern(1000);
    assert!(a.send(hdr(ep(3, 7), ep(4, 80), op::REQUEST), &[]));
    assert!(a.send(hdr(ep(3, 7), ep(4, 80), op::RW), &payload));
    let st = sw.stats();
    let p = st.partitions.iter().find(|p| p.cid == 4).unwrap();
    assert_eq!(p.backlog_packets, 2);
    assert_eq!(p.backlog_bytes, 2 * HDR_SIZE + 1000);
    assert_eq!(
        b.used_flags(0),
        0,
        "notifications wanted while packets wait"
    );
    assert_eq!(b.wakes.load(Ordering::SeqCst), 0);

    b.add_rx(4, 4096);
    let got = b.recv();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].0.op, op::REQUEST);
    assert_eq!(got[1].0.op, op::RW);
    assert_eq!(got[1].1, payload);
    assert_eq!(sw.stats().backlog_bytes, 0);
    assert_eq!(b.used_flags(0), 1);
    assert!(b.wakes.load(Ordering::SeqCst) > 0);
}

#[test]
fn backlog_cap_resets_the_connection_that_exceeds_it() {
    let sw = switch();
    let mut a = MockGuest::new(&sw, 3, None);
    let mut b = MockGuest::new(&sw, 4, None);
    b.recycle = false;
    a.add_rx(4, 4096);
    let (ca, sb) = (ep(3, 1), ep(4, 80));
    assert!(a.send(hdr(ca, sb, op::REQUEST), &[]));
    let chunk = pattern(64 * 1024);
    let per = HDR_SIZE + chunk.len();
    let fit = (CONN_BACKLOG_CAP - HDR_SIZE) / per;
    for _ in 0..fit {
        assert!(a.send(hdr(ca, sb, op::RW), &chunk));
    }
    assert_eq!(sw.stats().backlog_bytes, HDR_SIZE + fit * per);
    assert!(a.recv().is_empty());
    // One more does not fit: the connection is reset on both sides.
    assert!(a.send(hdr(ca, sb, op::RW), &chunk));
    let got = a.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].0.op, got[0].0.src(), got[0].0.dst()),
        (op::RST, sb, ca)
    );
    let st = sw.stats();
    assert_eq!(st.counters.backlog_overflows, 1);
    assert_eq!(st.connections, 0);
    let p = st.partitions.iter().find(|p| p.cid == 4).unwrap();
    assert_eq!(
        (p.backlog_packets, p.backlog_bytes),
        (1, HDR_SIZE),
        "only the RST is left"
    );
    b.add_rx(2, 4096);
    let got = b.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].0.op, got[0].0.src(), got[0].0.dst()),
        (op::RST, ca, sb)
    );
}

#[test]
fn detach_resets_peers_and_the_cid_can_attach_again() {
    let sw = switch();
    let mut a = MockGuest::new(&sw, 3, None);
    let mut b = MockGuest::new(&sw, 4, None);
    let mut c = MockGuest::new(&sw, 5, None);
    for g in [&mut a, &mut b, &mut c] {
        g.add_rx(8, 4096);
    }
    assert!(a.send(hdr(ep(3, 1000), ep(4, 80), op::REQUEST), &[]));
    assert!(b.send(hdr(ep(4, 80), ep(3, 1000), op::RESPONSE), &[]));
    assert!(c.send(hdr(ep(5, 2000), ep(4, 81), op::REQUEST), &[]));
    // A connection between A and C is not B's business.
    assert!(a.send(hdr(ep(3, 1001), ep(5, 90), op::REQUEST), &[]));
    a.recv();
    c.recv();
    assert_eq!(sw.stats().connections, 3);

    sw.detach(4);
    let got = a.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].0.op, got[0].0.src(), got[0].0.dst()),
        (op::RST, ep(4, 80), ep(3, 1000))
    );
    let got = c.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].0.op, got[0].0.src(), got[0].0.dst()),
        (op::RST, ep(4, 81), ep(5, 2000))
    );
    let st = sw.stats();
    assert_eq!(st.connections, 1);
    assert_eq!(st.partitions.len(), 2);
    // The detached window is dead: its TX is not processed.
    assert!(!b.send(hdr(ep(4, 80), ep(3, 1000), op::RW), b"late"));
    assert!(a.recv().is_empty());

    assert!(matches!(
        sw.attach(3, "dup", a.mem.clone(), irq(), None),
        Err(VsockError::DuplicateCid(3))
    ));
    for cid in [0, 1, HOST_CID, u64::from(u32::MAX)] {
        assert!(matches!(
            sw.attach(cid, "bad", a.mem.clone(), irq(), None),
            Err(VsockError::ReservedCid(_))
        ));
    }
    let mut b2 = MockGuest::new(&sw, 4, None);
    b2.add_rx(4, 4096);
    assert!(a.send(hdr(ep(3, 1002), ep(4, 80), op::REQUEST), &[]));
    assert_eq!(b2.recv()[0].0.op, op::REQUEST);
}

#[test]
fn device_reset_by_the_guest_resets_its_connections() {
    let sw = switch();
    let mut a = MockGuest::new(&sw, 3, None);
    let mut b = MockGuest::new(&sw, 4, None);
    a.add_rx(4, 4096);
    b.add_rx(4, 4096);
    assert!(a.send(hdr(ep(3, 1000), ep(4, 80), op::REQUEST), &[]));
    assert!(b.send(hdr(ep(4, 80), ep(3, 1000), op::RESPONSE), &[]));
    a.recv();
    b.reg_write(reg::STATUS, 0);
    let got = a.recv();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0.op, got[0].0.src()), (op::RST, ep(4, 80)));
    let st = sw.stats();
    assert_eq!(st.connections, 0);
    assert!(!st.partitions.iter().find(|p| p.cid == 4).unwrap().active);
    // Packets to the reset device wait until its driver starts again.
    assert!(a.send(hdr(ep(3, 1001), ep(4, 80), op::REQUEST), &[]));
    assert_eq!(sw.stats().backlog_bytes, HDR_SIZE);
}

#[test]
fn malformed_tx_chains_are_dropped_and_counted() {
    let sw = switch();
    let mut a = MockGuest::new(&sw, 3, None);
    let mut b = MockGuest::new(&sw, 4, None);
    b.add_rx(4, 4096);
    let good = hdr(ep(3, 1), ep(4, 80), op::REQUEST);
    let ha = a.alloc(HDR_SIZE as u32);
    a.mem
        .write_slice(&good.to_bytes(), GuestAddress(ha))
        .unwrap();
    let mut long = good;
    long.op = op::RW;
    long.len = 100;
    let la = a.alloc(HDR_SIZE as u32);
    a.mem
        .write_slice(&long.to_bytes(), GuestAddress(la))
        .unwrap();
    let mut huge = long;
    huge.len = 70_000;
    let hu = a.alloc(HDR_SIZE as u32);
    a.mem
        .write_slice(&huge.to_bytes(), GuestAddress(hu))
        .unwrap();
    let big = a.alloc(70_000);
    let beyond = 0x4000_0000_0000u64;

    let bad: Vec<Vec<(u64, u32, u16)>> = vec![
        vec![(ha, 20, 0)],                                // header descriptor too short
        vec![(ha, HDR_SIZE as u32, WRITE)],               // write-only TX descriptor
        vec![(beyond, HDR_SIZE as u32, 0)],               // header outside guest memory
        vec![(la, HDR_SIZE as u32, 0)],                   // payload announced, no descriptor
        vec![(la, HDR_SIZE as u32, 0), (beyond, 100, 0)], // payload outside memory
        vec![(la, HDR_SIZE as u32, 0), (ha, 100, WRITE)], // write-only payload
        vec![(hu, HDR_SIZE as u32, 0), (big, 70_000, 0)], // payload over 64 KiB
        vec![(u64::MAX - 10, HDR_SIZE as u32, 0)],        // address wraps
    ];
    for (i, chain) in bad.iter().enumerate() {
        assert_eq!(a.send_chain(chain), 1, "chain {i} returned to the guest");
    }
    assert!(b.recv().is_empty());
    let st = sw.stats();
    assert_eq!(st.counters.malformed_tx, bad.len() as u64);
    assert_eq!(st.counters.tx_packets, 0);

    // The device still works.
    assert!(a.send(good, &[]));
    assert_eq!(b.recv()[0].0, good);

    // A guest that jumps its available index is counted, not followed.
    let avail = a.qs[1].avail();
    let idx = avail.idx().load();
    avail.idx().store(idx.wrapping_add(1000));
    a.notify(1);
    assert_eq!(sw.stats().counters.malformed_tx, bad.len() as u64 + 1);
}

#[test]
fn malformed_rx_buffers_are_returned_empty_and_skipped() {
    let sw = switch();
    let mut a = MockGuest::new(&sw, 3, None);
    let mut b = MockGuest::new(&sw, 4, None);
    b.recycle = false;
    // A connection first: packets of unknown connections are not forwarded.
    b.add_rx(1, 4096);
    assert!(a.send(hdr(ep(3, 1), ep(4, 80), op::REQUEST), &[]));
    assert_eq!(b.recv().len(), 1);
    let ok = b.alloc(4096);
    let ro = b.alloc(4096);
    b.push_chain(0, &[(ro, 4096, 0)]); // read-only: unusable for RX
    b.push_chain(0, &[(0x4000_0000_0000, 4096, WRITE)]); // outside guest memory
    b.push_chain(0, &[(ok, HDR_SIZE as u32, WRITE)]); // no room for payload
    b.push_chain(0, &[(ok, 4096, WRITE)]);
    b.notify(0);
    assert!(a.send(hdr(ep(3, 1), ep(4, 80), op::RW), b"payload"));
    let got = b.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, b"payload");
    assert_eq!(b.empty_rx, 3);
    assert_eq!(sw.stats().counters.malformed_rx, 3);
}

#[test]
fn many_connections_within_their_credit_are_not_reset() {
    let sw = switch();
    let mut a = MockGuest::new(&sw, 3, None);
    let mut b = MockGuest::new(&sw, 4, None);
    b.recycle = false;
    a.add_rx(4, 4096);
    let chunk = pattern(64 * 1024);
    // Four connections, each with 512 KiB waiting: 2 MiB in B's backlog in all, more
    // than one connection may hold, but every connection is within its own cap.
    for port in 1..=4u32 {
        let (ca, sb) = (ep(3, port), ep(4, 80));
        assert!(a.send(hdr(ca, sb, op::REQUEST), &[]));
        for _ in 0..8 {
            assert!(a.send(hdr(ca, sb, op::RW), &chunk));
        }
    }
    let st = sw.stats();
    assert_eq!(st.counters.backlog_overflows, 0);
    assert!(st.backlog_bytes > CONN_BACKLOG_CAP, "{}", st.backlog_bytes);
    assert!(a.recv().is_empty(), "no RST for the senders");
}

/// A panic in the middle of an update must not leave a half-updated table in use: the
/// next operation finds every connection reset (the peer got an RST), counts the panic, and
/// new connections work.
#[test]
fn a_panic_under_the_switch_lock_resets_instead_of_reusing_the_table() {
    let sw = switch();
    let mut a = MockGuest::new(&sw, 3, None);
    let mut b = MockGuest::new(&sw, 4, None);
    a.add_rx(8, 4096);
    b.add_rx(8, 4096);
    let (ca, sb) = (ep(3, 1000), ep(4, 80));
    assert!(a.send(hdr(ca, sb, op::REQUEST), &[]));
    assert_eq!(b.recv().len(), 1);
    assert!(b.send(hdr(sb, ca, op::RESPONSE), &[]));
    assert_eq!(a.recv().len(), 1);
    assert_eq!(sw.stats().connections, 1);

    // Half an update: the connection table is emptied, then the update panics.
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        sw.with(|inner| {
            let _ = inner.stats();
            panic!("injected panic under the switch lock");
        })
    }));
    assert!(caught.is_err());

    let st = sw.stats();
    assert_eq!(st.counters.panics_recovered, 1, "the panic is counted");
    assert_eq!(st.connections, 0, "the half-updated table is not reused");
    // Both sides were told their connection is gone.
    let got_a = a.recv();
    let got_b = b.recv();
    assert!(got_a.iter().any(|(h, _)| h.op == op::RST && h.src() == sb));
    assert!(got_b.iter().any(|(h, _)| h.op == op::RST && h.src() == ca));
    // The switch works again.
    assert!(a.send(hdr(ep(3, 1001), sb, op::REQUEST), &[]));
    assert_eq!(b.recv().len(), 1);
    assert_eq!(sw.stats().connections, 1);
}
