//! virtio-net through the `virtio-drivers` crate: finds the network card on the command
//! line and initialises it (`docs/net.md`).
//!
//! [`open_net`] probes the `virtio_mmio.device=` entries (as [`crate::vsock`] does) and
//! returns the first network card as virtio-drivers' [`VirtIONet`], which posts
//! [`NET_QUEUE_SIZE`] receive buffers of [`NET_BUFFER_LEN`] bytes. Like vsock, it takes no
//! interrupts: firmware polls `can_recv`/`receive` (no exit while the used ring is empty)
//! and sleeps with `WAIT_UNTIL`, from which the monitor wakes the vCPU when it delivers a
//! frame. Sending a frame costs one exit (the queue notification).

extern crate alloc;

pub use virtio_drivers::device::net::{RxBuffer, TxBuffer, VirtIONet};

use virtio_drivers::transport::{DeviceType, Transport};

use crate::vsock::{mmio_devices, probe, MmioTransport, RuntimeHal};
use crate::{println, BootInfo};

/// Descriptors per queue (receive buffers posted at once, frames in flight to send): 64
/// buffers hold 90 KiB of full-size frames, so a TCP receiver drains a good part of its
/// window per turn (and acknowledges it with one frame) instead of 16 frames at a time.
pub const NET_QUEUE_SIZE: usize = 128;
/// Size of each receive buffer: the 12-byte virtio-net header and a 1514-byte frame fit,
/// with the room virtio-drivers' examples use.
pub const NET_BUFFER_LEN: usize = 2048;

/// The runtime's virtio-net driver.
pub type Net = VirtIONet<RuntimeHal, MmioTransport<'static>, NET_QUEUE_SIZE>;

/// Finds the network card on the command line and initialises it.
///
/// `None` when the command line names no network card, or it fails to initialise (the
/// reason is printed).
pub fn open_net(boot: &BootInfo) -> Option<Net> {
    for dev in mmio_devices(boot.cmdline) {
        // SAFETY: the monitor put this window on the command line for this partition, and
        // firmware calls `open_net` once; a window that is not a network card is only
        // probed (its identification registers read) and dropped.
        let transport = match unsafe { probe(&dev) } {
            Ok(t) => t,
            Err(why) => {
                println!("net: virtio-mmio device at {:#x}: {why}", dev.addr);
                continue;
            }
        };
        if transport.device_type() != DeviceType::Network {
            continue;
        }
        match Net::new(transport, NET_BUFFER_LEN) {
            Ok(net) => return Some(net),
            Err(e) => {
                println!("net: device at {:#x} failed to initialise: {e}", dev.addr);
                return None;
            }
        }
    }
    None
}

/// The card's MAC address in the usual `aa:bb:cc:dd:ee:ff` form.
pub fn mac_string(net: &Net) -> alloc::string::String {
    let m = net.mac_address();
    alloc::format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0],
        m[1],
        m[2],
        m[3],
        m[4],
        m[5]
    )
}
