//! smoltcp's [`Device`] over the runtime's virtio-net driver (virtio-drivers' `VirtIONet`),
//! in the shape of virtio-drivers' `examples/x86_64/src/tcp.rs`.
//!
//! Both tokens of a receive need the driver (the receive token gives its buffer back, the
//! transmit token sends), so the driver sits in a `RefCell` the tokens borrow in turn.
//! Sending waits for the card to take the frame (the monitor's virtio-net sends inline on
//! the queue notification: one VM exit per frame).

use core::cell::RefCell;

use duplex_runtime::net::{Net, RxBuffer};
use duplex_runtime::println;
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;

/// The largest Ethernet frame without its FCS (1500-byte MTU + 14-byte header).
pub const ETHERNET_FRAME: usize = 1514;

/// The network card, as smoltcp sees it.
pub struct NetDevice {
    net: RefCell<Net>,
}

impl NetDevice {
    pub fn new(net: Net) -> Self {
        NetDevice {
            net: RefCell::new(net),
        }
    }

    /// The card's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.net.borrow().mac_address()
    }

    /// Whether a received frame is waiting (no VM exit: the used ring is in guest memory).
    pub fn has_frame(&self) -> bool {
        self.net.borrow().can_recv()
    }
}

impl Device for NetDevice {
    type RxToken<'a> = NetRxToken<'a>;
    type TxToken<'a> = NetTxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(NetRxToken<'_>, NetTxToken<'_>)> {
        let rx = {
            let mut net = self.net.borrow_mut();
            if !net.can_recv() {
                return None;
            }
            match net.receive() {
                Ok(rx) => rx,
                Err(e) => {
                    println!("relay: net receive: {e}");
                    return None;
                }
            }
        };
        Some((
            NetRxToken {
                net: &self.net,
                rx: Some(rx),
            },
            NetTxToken { net: &self.net },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<NetTxToken<'_>> {
        self.net
            .borrow()
            .can_send()
            .then_some(NetTxToken { net: &self.net })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = ETHERNET_FRAME;
        caps.max_burst_size = None;
        caps
    }
}

/// A received frame; its buffer goes back to the card when consumed (or dropped).
pub struct NetRxToken<'a> {
    net: &'a RefCell<Net>,
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
        // `drop` recycles the buffer.
    }
}

impl Drop for NetRxToken<'_> {
    fn drop(&mut self) {
        if let Some(rx) = self.rx.take() {
            if let Err(e) = self.net.borrow_mut().recycle_rx_buffer(rx) {
                println!("relay: recycling a receive buffer: {e}");
            }
        }
    }
}

/// Room for one frame to send.
pub struct NetTxToken<'a> {
    net: &'a RefCell<Net>,
}

impl TxToken for NetTxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut net = self.net.borrow_mut();
        let mut tx = net.new_tx_buffer(len);
        let result = f(tx.packet_mut());
        if let Err(e) = net.send(tx) {
            println!("relay: net send: {e}");
        }
        result
    }
}
