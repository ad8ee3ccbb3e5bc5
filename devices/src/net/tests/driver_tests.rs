//! Interop with virtio-drivers 0.13, the driver the relay guest uses: its `VirtIONet` runs
//! on the host against the card through the virtio-mmio window, with an in-memory backend.

use std::sync::Arc;

use virtio_drivers::device::net::VirtIONet;
use zerocopy::IntoBytes;

use super::hal::{guest_memory, CardWindow, TestHal, Window};
use super::*;

/// RX buffer size the driver posts (as the relay will).
const BUF_LEN: usize = 2048;

type Driver<const N: usize> = VirtIONet<TestHal, CardWindow<PairBackend>, N>;

/// A card on this thread's guest memory, started by virtio-drivers with `N` RX buffers.
fn start<const N: usize>() -> (Arc<NetMmio<PairBackend>>, PairPeer, Driver<N>) {
    let (backend, peer) = pair(64).unwrap();
    let (irq, _) = counted_irq();
    let mmio = Arc::new(NetMmio::new(backend, MAC, guest_memory(), irq).unwrap());
    let net = Driver::<N>::new(Window(mmio.clone()), BUF_LEN).expect("driver starts");
    (mmio, peer, net)
}

#[test]
fn driver_reads_the_mac_and_its_frames_reach_the_backend_byte_exact() {
    let (mmio, peer, mut net) = start::<16>();
    assert_eq!(net.mac_address(), MAC);
    assert!(mmio.wants_rx_poll(), "the driver posted its RX buffers");
    for (len, seed) in [(60, 1), (1514, 2), (14, 3)] {
        let f = frame(len, seed);
        let mut tx = net.new_tx_buffer(f.len());
        tx.packet_mut().copy_from_slice(&f);
        net.send(tx).expect("send");
        let sent = peer.take_sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0][..NET_HDR_LEN], [0u8; NET_HDR_LEN], "empty header");
        assert!(
            sent[0][NET_HDR_LEN..] == f[..],
            "frame of {len} bytes, byte-exact"
        );
    }
    let st = mmio.stats();
    assert_eq!((st.tx_frames, st.tx_bytes), (3, 60 + 1514 + 14));
    assert_eq!(st.malformed_tx + st.malformed_rx + st.tx_dropped, 0);
}

#[test]
fn driver_receives_an_injected_frame_byte_exact() {
    let (mmio, peer, mut net) = start::<16>();
    assert!(matches!(
        net.receive(),
        Err(virtio_drivers::Error::NotReady)
    ));
    let frames: Vec<Vec<u8>> = [(1514, 9), (60, 10)]
        .iter()
        .map(|&(l, s)| frame(l, s))
        .collect();
    for f in &frames {
        peer.inject(f).unwrap();
    }
    assert!(
        fd_readable(mmio.backend_fd()),
        "the backend fd says a frame waits"
    );
    mmio.process_rx();
    assert!(!fd_readable(mmio.backend_fd()), "both frames were taken");
    for f in &frames {
        let rx = net.receive().expect("a frame arrived");
        assert!(rx.packet() == &f[..], "byte-exact, {} bytes", f.len());
        assert_eq!(rx.header().as_bytes(), &NetHdr::RX.to_bytes()[..]);
        net.recycle_rx_buffer(rx).unwrap();
    }
    let st = mmio.stats();
    assert_eq!((st.rx_frames, st.rx_bytes), (2, 1514 + 60));
    assert!(mmio.wants_rx_poll());
}

#[test]
fn frame_without_rx_buffer_waits_in_the_backend_until_buffers_come() {
    let (mmio, peer, mut net) = start::<2>();
    for seed in 0..3 {
        peer.inject(&frame(100, seed)).unwrap();
    }
    mmio.process_rx();
    assert_eq!(peer.pending(), 1, "the third frame stays in the backend");
    assert!(
        !mmio.wants_rx_poll(),
        "no RX buffer: the fd is not to be polled"
    );
    assert!(fd_readable(mmio.backend_fd()));
    // The owner would not call it now; if it does, nothing moves.
    mmio.process_rx();
    assert_eq!(peer.pending(), 1);

    let first = net.receive().unwrap();
    assert!(first.packet() == &frame(100, 0)[..]);
    // Recycling the buffer notifies the device, which tells the owner's loop; the loop's
    // `process_rx` delivers the waiting frame.
    net.recycle_rx_buffer(first).unwrap();
    assert!(mmio.wants_rx_poll());
    assert!(fd_readable(mmio.rx_poll_fd()), "the loop is told");
    mmio.process_rx();
    assert_eq!(peer.pending(), 0);
    let second = net.receive().unwrap();
    let third = net.receive().unwrap();
    assert!(second.packet() == &frame(100, 1)[..]);
    assert!(
        third.packet() == &frame(100, 2)[..],
        "delivered once buffers came"
    );
    assert!(!mmio.wants_rx_poll());
    net.recycle_rx_buffer(second).unwrap();
    assert!(mmio.wants_rx_poll(), "a buffer again");
    assert_eq!(mmio.stats().rx_frames, 3);
    assert_eq!(mmio.stats().rx_dropped, 0);
}

/// Whether `fd` polls readable now.
pub(super) fn fd_readable(fd: std::os::unix::io::RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd that lives through the call; timeout 0.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n == 1 && pfd.revents & libc::POLLIN != 0
}
