//! smoltcp's [`Device`] over the runtime's virtio-net driver (virtio-drivers' `VirtIONet`),
//! in the shape of virtio-drivers' `examples/x86_64/src/tcp.rs`.
//!
//! Both tokens of a receive need the driver (the receive token gives its buffer back, the
//! transmit token sends), so the driver sits in a `RefCell` the tokens borrow in turn.
//! Sending waits for the card to take the frame (the monitor's virtio-net sends inline on
//! the queue notification: one VM exit per frame).
//!
//! Receive buffers go back to the card in batches: a consumed frame's buffer waits in
//! `spent` until the card has no frame left to give (or [`RECYCLE_BATCH`] wait), then all
//! are given back at once. Giving one back notifies the card only while the card has run
//! dry (the monitor then stops asking until it runs dry again), so a batch costs one exit,
//! where buffers given back one by one between the card's refills cost one each.

use core::cell::RefCell;

use alloc::vec::Vec;

use duplex_runtime::net::{Net, RxBuffer, NET_QUEUE_SIZE};
use duplex_runtime::println;
use duplex_runtime::time::raw_tsc;
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;

use crate::profile::{since, CardTicks};

/// The largest Ethernet frame without its FCS (1500-byte MTU + 14-byte header).
pub const ETHERNET_FRAME: usize = 1514;
/// Spent receive buffers kept before they all go back to the card.
pub const RECYCLE_BATCH: usize = NET_QUEUE_SIZE / 2;

/// The network card, as smoltcp sees it.
pub struct NetDevice {
    card: Card,
}

/// What the tokens share.
struct Card {
    net: RefCell<Net>,
    /// Buffers of consumed frames, not yet given back.
    spent: RefCell<Vec<RxBuffer>>,
    /// Time spent sending and giving receive buffers back ([`crate::profile`]).
    ticks: CardTicks,
}

impl Card {
    /// Gives every spent buffer back to the card.
    fn recycle(&self) {
        let mut spent = self.spent.borrow_mut();
        if spent.is_empty() {
            return;
        }
        let t0 = raw_tsc();
        let mut net = self.net.borrow_mut();
        for rx in spent.drain(..) {
            if let Err(e) = net.recycle_rx_buffer(rx) {
                println!("relay: recycling a receive buffer: {e}");
            }
        }
        let t = &self.ticks;
        t.rx_refill.set(t.rx_refill.get() + since(t0));
    }
}

impl NetDevice {
    pub fn new(net: Net) -> Self {
        NetDevice {
            card: Card {
                net: RefCell::new(net),
                spent: RefCell::new(Vec::with_capacity(NET_QUEUE_SIZE)),
                ticks: CardTicks::new(),
            },
        }
    }

    /// Time spent sending and refilling.
    pub fn ticks(&self) -> &CardTicks {
        &self.card.ticks
    }

    /// The card's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.card.net.borrow().mac_address()
    }

    /// Whether a received frame is waiting (no VM exit: the used ring is in guest memory).
    pub fn has_frame(&self) -> bool {
        self.card.net.borrow().can_recv()
    }
}

impl Device for NetDevice {
    type RxToken<'a> = NetRxToken<'a>;
    type TxToken<'a> = NetTxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(NetRxToken<'_>, NetTxToken<'_>)> {
        let rx = {
            if !self.card.net.borrow().can_recv() {
                // The card has nothing more: the spent buffers go back now, in one batch.
                self.card.recycle();
                return None;
            }
            let got = self.card.net.borrow_mut().receive();
            match got {
                Ok(rx) => rx,
                Err(e) => {
                    println!("relay: net receive: {e}");
                    self.card.recycle();
                    return None;
                }
            }
        };
        Some((
            NetRxToken {
                card: &self.card,
                rx: Some(rx),
            },
            NetTxToken { card: &self.card },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<NetTxToken<'_>> {
        self.card
            .net
            .borrow()
            .can_send()
            .then_some(NetTxToken { card: &self.card })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = ETHERNET_FRAME;
        caps.max_burst_size = None;
        caps
    }
}

/// A received frame; its buffer is spent when consumed (or dropped), and goes back to the
/// card with the next batch.
pub struct NetRxToken<'a> {
    card: &'a Card,
    rx: Option<RxBuffer>,
}

impl RxToken for NetRxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        match self.rx.as_ref() {
            Some(rx) => f(rx.packet()),
            None => f(&[]),
        }
        // `drop` spends the buffer.
    }
}

impl Drop for NetRxToken<'_> {
    fn drop(&mut self) {
        if let Some(rx) = self.rx.take() {
            let t = &self.card.ticks;
            t.rx_frames.set(t.rx_frames.get() + 1);
            let full = {
                let mut spent = self.card.spent.borrow_mut();
                spent.push(rx);
                spent.len() >= RECYCLE_BATCH
            };
            if full {
                self.card.recycle();
            }
        }
    }
}

/// Room for one frame to send.
pub struct NetTxToken<'a> {
    card: &'a Card,
}

impl TxToken for NetTxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut net = self.card.net.borrow_mut();
        let mut tx = net.new_tx_buffer(len);
        let result = f(tx.packet_mut());
        let t0 = raw_tsc();
        if let Err(e) = net.send(tx) {
            println!("relay: net send: {e}");
        }
        let t = &self.card.ticks;
        t.tx.set(t.tx.get() + since(t0));
        t.tx_frames.set(t.tx_frames.get() + 1);
        result
    }
}
