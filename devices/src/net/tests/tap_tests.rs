//! A real TAP, in a network namespace the test makes for itself: a thread unshares its
//! network namespace (`unshare(CLONE_NEWNET)` changes only the calling thread), creates the
//! TAP there and runs virtio-drivers' `VirtIONet` against a card over it; a raw packet
//! socket on the same interface is the wire. No address is used anywhere, and the
//! namespace, the TAP and the socket go away with the thread.
//!
//! It needs root and `/dev/net/tun`; without them it fails with a message starting
//! `SKIPPED-BY-ENVIRONMENT` (it never passes without having run).

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_drivers::device::net::VirtIONet;

use super::hal::{guest_memory, CardWindow, TestHal, Window};
use super::*;
use crate::net::wire::Wire;

const TAP_NAME: &str = "dplxtap0";
/// EtherTypes (IEEE local experimental) of the test's frames, one per direction.
const TO_WIRE: u16 = 0x88b5;
const TO_GUEST: u16 = 0x88b6;

fn skipped(what: &str) -> ! {
    panic!("SKIPPED-BY-ENVIRONMENT: {what} (the TAP test needs root and /dev/net/tun)")
}

/// Waits up to `timeout` for `fd` to be readable.
fn wait_readable(fd: i32, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd that lives through the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    n == 1 && pfd.revents & libc::POLLIN != 0
}

/// An Ethernet frame `dst` ← `src` of EtherType `proto` with a 100-byte pattern.
fn eth(dst: [u8; 6], src: [u8; 6], proto: u16, seed: u8) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&proto.to_be_bytes());
    f.extend((0..100u8).map(|i| i.wrapping_mul(13).wrapping_add(seed)));
    f
}

fn in_namespace() {
    // SAFETY: unshare() takes no pointers; CLONE_NEWNET moves only this thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        skipped(&format!(
            "unshare(CLONE_NEWNET): {}",
            io::Error::last_os_error()
        ));
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        skipped("/dev/net/tun is missing");
    }
    let mut tap = match Tap::open(TAP_NAME) {
        Ok(t) => t,
        Err(e) => skipped(&e.to_string()),
    };
    assert_eq!(tap.name(), TAP_NAME);
    let mut buf = [0u8; 64];
    assert_eq!(
        tap.recv(&mut buf).map_err(|e| e.kind()),
        Err(io::ErrorKind::WouldBlock),
        "non-blocking"
    );
    let wire = Wire::open(TAP_NAME, TO_WIRE).expect("the wire side of the TAP");

    let (irq, wakes) = counted_irq();
    let mmio = Arc::new(NetMmio::new(tap, MAC, guest_memory(), irq).unwrap());
    let mut net =
        VirtIONet::<TestHal, CardWindow<Tap>, 16>::new(Window(mmio.clone()), 2048).expect("driver");
    assert_eq!(net.mac_address(), MAC);

    // Guest to wire: the frame, byte-exact (the 12-byte header was taken as one).
    let out = eth([0xff; 6], MAC, TO_WIRE, 1);
    let mut tx = net.new_tx_buffer(out.len());
    tx.packet_mut().copy_from_slice(&out);
    net.send(tx).expect("send");
    let got = wire
        .recv_matching(Duration::from_secs(5), |_| true)
        .expect("recv(AF_PACKET)");
    assert!(
        got.as_deref() == Some(&out[..]),
        "guest frame on the wire, byte-exact"
    );

    // Wire to guest; the kernel's own frames (IPv6 neighbour discovery...) may come first.
    let inbound = eth(MAC, [0x02, 0, 0, 0, 0, 7], TO_GUEST, 2);
    wire.send(&inbound).expect("send(AF_PACKET)");
    let end = Instant::now() + Duration::from_secs(5);
    let mut received = None;
    while received.is_none() && Instant::now() < end {
        assert!(mmio.wants_rx_poll(), "RX buffers are posted");
        if !wait_readable(mmio.backend_fd(), Duration::from_millis(100)) {
            continue;
        }
        mmio.process_rx();
        while let Ok(rx) = net.receive() {
            if rx.packet().get(12..14) == Some(&TO_GUEST.to_be_bytes()[..]) {
                received = Some(rx.packet().to_vec());
            }
            net.recycle_rx_buffer(rx).unwrap();
        }
    }
    assert_eq!(
        received,
        Some(inbound),
        "wire frame in the guest, byte-exact"
    );
    let st = mmio.stats();
    assert_eq!(st.tx_frames, 1);
    assert!(st.rx_frames >= 1);
    assert_eq!(st.malformed_rx + st.malformed_tx + st.backend_errors, 0);
    assert!(wakes.load(std::sync::atomic::Ordering::SeqCst) > 0);
}

#[test]
fn tap_frames_cross_a_tap_in_a_namespace_of_the_test() {
    let t = std::thread::Builder::new()
        .name("tap-netns".into())
        .spawn(in_namespace)
        .unwrap();
    if let Err(panic) = t.join() {
        std::panic::resume_unwind(panic);
    }
}
