//! A partition's network card over an in-memory link ([`duplex_devices::net::pair`]),
//! driven by a hostile driver ([`crate::virtio`]); the device step injects a frame (any
//! bytes, header included) from the far end and lets the card move it into the RX queue.
//!
//! Invariants: besides the driver's, every frame the card sends to the link is a header and
//! at most [`MAX_FRAME_LEN`] bytes of frame.

use duplex_devices::net::{pair, NetMmio, PairBackend, PairPeer, MAX_FRAME_LEN, NET_HDR_LEN};
use duplex_devices::GuestMemoryMmap;
use std::cell::Cell;

use crate::input::Input;
use crate::virtio::{self, guest_memory, interrupt, Device};

/// The card's address.
pub const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// Frames the link holds before refusing more.
pub const LINK_CAPACITY: usize = 64;

/// A card and the far end of its link.
pub struct NetCard {
    card: NetMmio<PairBackend>,
    peer: PairPeer,
    mem: GuestMemoryMmap,
    sent: Cell<usize>,
}

impl NetCard {
    /// A new card.
    pub fn new() -> Self {
        let (backend, peer) = pair(LINK_CAPACITY).expect("an in-memory link");
        let mem = guest_memory();
        let card = NetMmio::new(backend, MAC, mem.clone(), interrupt()).expect("a network card");
        NetCard {
            card,
            peer,
            mem,
            sent: Cell::new(0),
        }
    }
}

impl Default for NetCard {
    fn default() -> Self {
        Self::new()
    }
}

impl Device for NetCard {
    fn device_id(&self) -> u32 {
        duplex_devices::net::DEVICE_ID
    }

    fn queues(&self) -> u16 {
        2
    }

    fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    fn read(&self, offset: u64, data: &mut [u8]) {
        self.card.read(offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.card.write(offset, data);
    }

    fn extra(&mut self, input: &mut Input<'_>) {
        let bytes = input.chunk().to_vec();
        let _ = self.peer.inject_raw(bytes);
        self.card.process_rx();
    }

    fn check(&self) {
        let sent = self.peer.take_sent();
        self.sent.set(self.sent.get() + sent.len());
        for frame in sent {
            assert!(
                frame.len() >= NET_HDR_LEN && frame.len() <= NET_HDR_LEN + MAX_FRAME_LEN,
                "the card sent {} bytes",
                frame.len()
            );
        }
    }
}

impl NetCard {
    /// Frames the card has sent to the link so far.
    pub fn frames_sent(&self) -> usize {
        self.sent.get()
    }
}

/// Runs one fuzz input against a fresh card.
pub fn run(data: &[u8]) {
    let mut card = NetCard::new();
    virtio::run(&mut card, data);
}
