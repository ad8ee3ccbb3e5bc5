//! The card on the device event loop ([`NetPoller`]): frames the backend holds reach the
//! guest's buffers without anyone calling `process_rx`, the backend's fd is watched only
//! while the guest has buffers (a backend full of frames and a guest without buffers do not
//! make the loop spin), and a refill on "the vCPU thread" makes the loop look again (and
//! move the frames: nothing moves on the vCPU thread).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::*;
use crate::event_loop::EventLoop;
use crate::persist::Suspendable;

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The loop's wake-ups over `d`.
fn wakeups_over(el: &EventLoop, d: Duration) -> u64 {
    let before = el.stats().wakeups;
    std::thread::sleep(d);
    el.stats().wakeups - before
}

#[test]
fn the_loop_delivers_frames_and_does_not_spin_without_buffers() {
    let el = EventLoop::start("net-poller-test").unwrap();
    let mut c = Card::started(8);
    let poller = NetPoller::new(c.mmio.clone());
    let polls = poller.polls();
    let key = el.add(Box::new(poller)).unwrap();
    wait_for("the subscriber", || el.stats().subscribers == 1);

    // Frames wait in the backend, the guest has no buffer: the fd is readable all along,
    // yet the loop sleeps.
    for seed in 0..3 {
        c.drv.peer.inject(&frame(100, seed)).unwrap();
    }
    assert!(
        wakeups_over(&el, Duration::from_millis(200)) <= 2,
        "the loop spins on a backend the guest has no buffer for"
    );
    assert_eq!(polls.load(Ordering::Relaxed), 0);
    assert_eq!(c.drv.peer.pending(), 3, "nothing read without a buffer");

    // Two buffers: the notification tells the loop, which delivers two frames; the third
    // waits, the card out of buffers again, and the loop stays idle.
    c.add_rx(2, 2048);
    wait_for("the loop's delivery", || c.mmio.stats().rx_frames == 2);
    assert_eq!(c.recv(), vec![Some(frame(100, 0)), Some(frame(100, 1))]);
    assert!(wakeups_over(&el, Duration::from_millis(200)) <= 2);

    // Buffers and an empty backend: the loop watches the fd, and a new frame arrives in the
    // guest with nobody but the loop calling into the card.
    c.add_rx(4, 2048);
    wait_for("the loop's delivery", || c.mmio.stats().rx_frames == 3);
    assert_eq!(c.recv(), vec![Some(frame(100, 2))]);
    assert!(c.mmio.wants_rx_poll());
    c.drv.peer.inject(&frame(200, 9)).unwrap();
    wait_for("the loop's delivery", || c.mmio.stats().rx_frames == 4);
    assert_eq!(c.recv(), vec![Some(frame(200, 9))]);
    assert!(polls.load(Ordering::Relaxed) >= 1);
    assert!(wakeups_over(&el, Duration::from_millis(200)) <= 2, "idle");

    // Asleep (a cut): frames wait; woken, they are delivered.
    c.mmio.sleep().unwrap();
    c.drv.peer.inject(&frame(64, 7)).unwrap();
    assert!(wakeups_over(&el, Duration::from_millis(100)) <= 3);
    assert_eq!(c.mmio.stats().rx_frames, 4);
    c.mmio.wake();
    assert_eq!(c.recv(), vec![Some(frame(64, 7))]);
    c.drv.peer.inject(&frame(64, 8)).unwrap();
    wait_for("delivery after the wake", || c.mmio.stats().rx_frames == 6);

    // Removed: the card is no longer served by the loop.
    el.remove(key);
    wait_for("the removal", || el.stats().subscribers == 0);
    c.drv.peer.inject(&frame(64, 9)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(c.mmio.stats().rx_frames, 6);
}

/// A raw EtherType 0x0842 Wake-on-LAN frame for `mac`.
fn magic_frame(mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0xFF; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&crate::net::wol::ETHERTYPE_WOL.to_be_bytes());
    f.extend_from_slice(&[0xFF; 6]);
    for _ in 0..16 {
        f.extend_from_slice(&mac);
    }
    f
}

#[test]
fn a_sleeping_card_wakes_once_on_its_magic_packet_and_bounds_a_flood() {
    let el = EventLoop::start("net-watch-test").unwrap();
    let mut c = Card::started(8);
    let poller = NetPoller::new(c.mmio.clone());
    let polls = poller.polls();
    let _key = el.add(Box::new(poller)).unwrap();
    wait_for("the subscriber", || el.stats().subscribers == 1);

    // A flood of magic packets for another MAC, an ordinary frame, a truncated magic
    // packet, all waiting before the partition sleeps (so that every batch is full): read
    // and dropped in batches of 64, none reaches the guest's buffers.
    let mut other = MAC;
    other[5] ^= 1;
    let flood = 640;
    for _ in 0..flood {
        c.drv.peer.inject(&magic_frame(other)).unwrap();
    }
    c.drv.peer.inject(&frame(100, 1)).unwrap();
    let mut short = magic_frame(MAC);
    short.truncate(short.len() - 1);
    c.drv.peer.inject(&short).unwrap();
    // No RX buffers yet: the frames wait in the backend.
    assert_eq!(c.drv.peer.pending(), flood as usize + 2);
    let woken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let w = woken.clone();
    let started = Instant::now();
    c.mmio.watch_for_magic(Box::new(move || {
        w.fetch_add(1, Ordering::SeqCst);
    }));
    wait_for("the flood drained", || c.drv.peer.pending() == 0);
    let took = started.elapsed();
    let stats = c.mmio.stats();
    assert_eq!((stats.asleep_dropped, stats.rx_frames), (flood + 2, 0));
    assert_eq!(woken.load(Ordering::SeqCst), 0);
    // Ten full batches, each followed by a 10 ms pause: the loop did not read as fast as
    // it could (bounded CPU), and called the card about once per batch.
    assert!(
        took >= crate::net::wol::WATCH_PAUSE * 9,
        "drained {flood} frames in {took:?}: no pause between batches"
    );
    assert!(polls.load(Ordering::Relaxed) <= 2 * (flood / 64 + 2));

    // The guest posts buffers while it sleeps: nothing is delivered. Then the magic packet
    // wakes once and is consumed; the next one goes to the guest as an ordinary frame.
    c.add_rx(8, 2048);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(c.mmio.stats().rx_frames, 0);
    c.drv.peer.inject(&magic_frame(MAC)).unwrap();
    wait_for("the wake", || woken.load(Ordering::SeqCst) == 1);
    assert!(!c.mmio.watching());
    c.drv.peer.inject(&magic_frame(MAC)).unwrap();
    wait_for("delivery after the wake", || c.mmio.stats().rx_frames == 1);
    assert_eq!(c.recv(), vec![Some(magic_frame(MAC))]);
    assert_eq!(woken.load(Ordering::SeqCst), 1, "woken once");
    assert_eq!(c.mmio.stats().wake_packets, 1);
}
