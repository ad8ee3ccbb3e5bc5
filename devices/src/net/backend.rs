//! The other end of a network card: [`NetBackend`] (one frame at a time, with its
//! `virtio_net_hdr_v1`, and an fd to poll), and [`pair`], an in-memory backend whose far end
//! ([`PairPeer`]) a test (or a monitor test without TAP) drives.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use super::NET_HDR_LEN;

/// Where a network card's frames go and come from.
pub trait NetBackend: Send {
    /// Sends one frame preceded by its header. `WouldBlock` when the backend cannot take
    /// it now (the device drops it, as a NIC whose wire is busy).
    fn send(&mut self, hdr: &[u8; NET_HDR_LEN], frame: &[u8]) -> io::Result<()>;
    /// Receives one frame, header first, into `buf`; returns its length. `WouldBlock`
    /// when none waits. A frame longer than `buf` is cut.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// An fd that polls readable while a frame waits.
    fn raw_fd(&self) -> RawFd;
}

/// Frames queued each way, and an eventfd (semaphore) readable while frames wait for the
/// device.
#[derive(Debug)]
struct Shared {
    to_device: Mutex<VecDeque<Vec<u8>>>,
    from_device: Mutex<VecDeque<Vec<u8>>>,
    readable: EventFd,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The device's end of an in-memory link (see [`pair`]).
#[derive(Debug, Clone)]
pub struct PairBackend {
    shared: Arc<Shared>,
    capacity: usize,
}

/// The far end of an in-memory link: injects frames for the device and takes those it sent.
#[derive(Debug, Clone)]
pub struct PairPeer {
    shared: Arc<Shared>,
}

/// An in-memory link: the device's [`PairBackend`] holds at most `capacity` sent frames
/// that the [`PairPeer`] has not taken (more are refused with `WouldBlock`).
pub fn pair(capacity: usize) -> io::Result<(PairBackend, PairPeer)> {
    let shared = Arc::new(Shared {
        to_device: Mutex::new(VecDeque::new()),
        from_device: Mutex::new(VecDeque::new()),
        readable: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_SEMAPHORE)?,
    });
    Ok((
        PairBackend {
            shared: shared.clone(),
            capacity,
        },
        PairPeer { shared },
    ))
}

impl PairPeer {
    /// Queues `frame` for the device with an empty header (as a TAP without offloads gives).
    pub fn inject(&self, frame: &[u8]) -> io::Result<()> {
        let mut bytes = vec![0u8; NET_HDR_LEN];
        bytes.extend_from_slice(frame);
        self.inject_raw(bytes)
    }

    /// Queues `bytes` (header and frame, or anything) for the device as one read.
    pub fn inject_raw(&self, bytes: Vec<u8>) -> io::Result<()> {
        lock(&self.shared.to_device).push_back(bytes);
        self.shared.readable.write(1)
    }

    /// Frames queued for the device that it has not read.
    pub fn pending(&self) -> usize {
        lock(&self.shared.to_device).len()
    }

    /// Takes what the device sent: each frame with its header.
    pub fn take_sent(&self) -> Vec<Vec<u8>> {
        lock(&self.shared.from_device).drain(..).collect()
    }
}

impl NetBackend for PairBackend {
    fn send(&mut self, hdr: &[u8; NET_HDR_LEN], frame: &[u8]) -> io::Result<()> {
        let mut q = lock(&self.shared.from_device);
        if q.len() >= self.capacity {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut bytes = Vec::with_capacity(NET_HDR_LEN + frame.len());
        bytes.extend_from_slice(hdr);
        bytes.extend_from_slice(frame);
        q.push_back(bytes);
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(bytes) = lock(&self.shared.to_device).pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        // One frame fewer: the semaphore counts down by one.
        let _ = self.shared.readable.read();
        let n = bytes.len().min(buf.len());
        buf[..n].copy_from_slice(&bytes[..n]);
        Ok(n)
    }

    fn raw_fd(&self) -> RawFd {
        self.shared.readable.as_raw_fd()
    }
}
