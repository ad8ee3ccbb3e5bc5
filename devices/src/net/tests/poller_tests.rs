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
