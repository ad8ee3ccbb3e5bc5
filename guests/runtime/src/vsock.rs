//! virtio-vsock through the `virtio-drivers` crate: device discovery on the command line,
//! the crate's [`Hal`] for this runtime, and a sleeping wait for vsock events.
//!
//! The monitor appends its virtio-mmio devices to the command line in Linux's syntax,
//! `virtio_mmio.device=<size>@<addr>:<irq>` ([`mmio_devices`]). [`open_vsock`] probes them,
//! initialises the first socket device and wraps it in virtio-drivers'
//! [`VsockConnectionManager`] (connection-oriented: `listen`, `connect`, `send`, `recv`,
//! `poll`, `shutdown`, `force_close`, `update_credit`), the [`Vsock`] type.
//!
//! # Cost model
//!
//! Every access to the device's registers is a VM exit (about 25 µs from ring 3). The
//! driver finds new packets by reading the used ring in guest memory, so polling costs no
//! exit; exits happen on initialisation (a few dozen), on each packet sent (one queue
//! notification; the call then spins until the device has taken the packet), and when a
//! receive buffer is handed back and the device asked to be told. The guest takes no
//! interrupts: [`wait_for_event`] polls, and when there is nothing sleeps with
//! `WAIT_UNTIL`, from which the monitor wakes the vCPU as soon as it puts something in one
//! of this partition's used rings.
//!
//! # Sizes
//!
//! Receive buffers are [`RX_BUFFER_SIZE`] bytes: a 44-byte packet header plus
//! [`MAX_PACKET_DATA`] (64 KiB, the largest packet payload Linux and Firecracker use), so
//! the device can deliver a full-size packet in one buffer. Each connection buffers up to
//! [`DEFAULT_CONNECTION_BUFFER`] received bytes (the credit advertised to the peer) until
//! the firmware `recv`s them; senders should keep payloads at or below
//! [`MAX_PACKET_DATA`] and within the peer's credit ([`PeerCredit`]).
//!
//! # Credit
//!
//! virtio-vsock flow control is credit-based: a sender may have at most the peer's
//! `buf_alloc` bytes that the peer has not yet consumed (`fwd_cnt`) in flight. The
//! connection manager answers credit requests by itself, but sends a credit update
//! otherwise only when the firmware calls `update_credit`, and it does not expose what it
//! knows about the peer's credit. [`PeerCredit`] tracks both directions from the events:
//! how much may be sent now, and when a receiver should advertise freed space.
//!
//! # Memory
//!
//! The runtime identity-maps the first 4 GiB, so guest-physical addresses equal virtual
//! ones: DMA memory (the virtqueues) comes from the heap, page-aligned and zeroed, and
//! buffers are shared with the device by address. Heap, stacks and image are RAM below
//! `0xC000_0000`.

extern crate alloc;

use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub use virtio_drivers::device::socket::{
    DisconnectReason, SocketError, StreamShutdown, VsockAddr, VsockConnectionManager, VsockEvent,
    VsockEventType, VMADDR_CID_HOST,
};
pub use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
pub use virtio_drivers::transport::{DeviceType, Transport};
pub use virtio_drivers::{BufferDirection, Error as VirtioError, Hal, PhysAddr, PAGE_SIZE};

use virtio_drivers::device::socket::VirtIOSocket;

use crate::bootinfo::parse_u64;
use crate::{println, sysctl, time, BootInfo};

/// Size of the virtio-vsock packet header (`struct virtio_vsock_hdr`).
pub const HEADER_SIZE: usize = 44;
/// Largest payload of one packet this runtime sends or expects to receive.
pub const MAX_PACKET_DATA: usize = 64 * 1024;
/// Size of each receive buffer (header plus a full-size payload, one descriptor each).
pub const RX_BUFFER_SIZE: usize = HEADER_SIZE + MAX_PACKET_DATA;
/// Received bytes each connection buffers until `recv` (the credit advertised to peers).
pub const DEFAULT_CONNECTION_BUFFER: u32 = 128 * 1024;
/// How long [`PeerCredit::plan`] waits for news from a peer before it asks for credit.
pub const CREDIT_REQUEST_AFTER_MS: u64 = 2;
/// The smallest packet [`PeerCredit::sendable`] splits a larger send into.
pub const MIN_PARTIAL_SEND: usize = 16 * 1024;
/// Longest single `WAIT_UNTIL` in [`wait_for_event`]: a wake the monitor loses costs at
/// most this much latency instead of the whole wait.
pub const MAX_WAIT_MS: u64 = 1000;
/// The highest guest-physical address (exclusive) device-visible memory may use.
const DMA_LIMIT: u64 = 0xC000_0000;
/// How many empty polls in a row mean "nothing pending": the manager's `poll` also returns
/// `None` after consuming a packet it handled by itself (a credit request, a packet for
/// no connection, a refused connection request), so one `None` does not prove the used
/// ring empty; the receive queue holds 8 buffers.
const EMPTY_POLLS: usize = 9;

/// The runtime's virtio-vsock connection manager.
pub type Vsock = VsockConnectionManager<RuntimeHal, MmioTransport<'static>, RX_BUFFER_SIZE>;

/// The [`Hal`] for this runtime: identity-mapped memory, DMA from the heap.
#[derive(Clone, Copy, Debug)]
pub struct RuntimeHal;

fn dma_layout(pages: usize) -> Option<Layout> {
    Layout::from_size_align(pages.checked_mul(PAGE_SIZE)?, PAGE_SIZE).ok()
}

// SAFETY: `dma_alloc` returns fresh, zeroed, page-aligned heap memory that nothing else
// references until `dma_dealloc`; the heap is identity-mapped RAM below the MMIO hole, so
// its virtual address is the physical address the device uses. `share` hands out the
// identity address of memory the caller keeps valid; nothing needs copying back.
unsafe impl Hal for RuntimeHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let Some(layout) = dma_layout(pages).filter(|l| l.size() > 0) else {
            return (0, NonNull::dangling());
        };
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { alloc::alloc::alloc_zeroed(layout) };
        match NonNull::new(ptr) {
            Some(p) => {
                debug_assert!((p.as_ptr() as u64) + (layout.size() as u64) <= DMA_LIMIT);
                (p.as_ptr() as PhysAddr, p)
            }
            // Physical address 0 tells virtio-drivers the allocation failed.
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let Some(layout) = dma_layout(pages) else {
            return -1;
        };
        // SAFETY: per the trait's contract `vaddr` came from `dma_alloc` with the same
        // `pages`, hence from `alloc_zeroed` with this layout, and is not yet freed.
        unsafe { alloc::alloc::dealloc(vaddr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        // Identity mapping (the first 4 GiB; the MMIO window is in the uncached last GiB).
        NonNull::new(paddr as *mut u8).expect("MMIO at physical address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        let addr = buffer.as_ptr().cast::<u8>() as PhysAddr;
        debug_assert!(addr + (buffer.len() as u64) <= DMA_LIMIT);
        addr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// One `virtio_mmio.device=<size>@<addr>:<irq>[:<id>]` entry of the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    /// Guest-physical base address of the register window.
    pub addr: u64,
    /// Size of the register window in bytes.
    pub size: u64,
    /// The interrupt line (unused: the runtime takes no interrupts).
    pub irq: u32,
}

/// Parses a Linux `memparse` number: decimal, or hex with `0x`, with an optional
/// `K`/`M`/`G`/`T` suffix (binary multiples). An unprefixed value that is not decimal is
/// read as hex.
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        b't' | b'T' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let value = parse_u64(digits).or_else(|| u64::from_str_radix(digits, 16).ok())?;
    value.checked_mul(1u64 << shift)
}

/// Parses the value of one `virtio_mmio.device=` entry: `<size>@<addr>:<irq>[:<id>]`.
pub fn parse_mmio_device(value: &str) -> Option<MmioDevice> {
    let (size, rest) = value.split_once('@')?;
    let mut parts = rest.split(':');
    let addr = parse_size(parts.next()?)?;
    let irq = parts.next()?.parse().ok()?;
    Some(MmioDevice {
        addr,
        size: parse_size(size)?,
        irq,
    })
}

/// The virtio-mmio devices on the command line, in order (malformed entries are skipped).
pub fn mmio_devices(cmdline: &str) -> impl Iterator<Item = MmioDevice> + '_ {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.strip_prefix("virtio_mmio.device="))
        .filter_map(parse_mmio_device)
}

/// Opens the virtio-mmio transport of `dev` (reads its magic, version and device ID).
///
/// # Safety
///
/// `dev` must describe a virtio-mmio register window the monitor emulates, used by
/// nothing else for the rest of the run.
pub unsafe fn probe(dev: &MmioDevice) -> Result<MmioTransport<'static>, &'static str> {
    if dev.addr == 0
        || !dev.addr.is_multiple_of(4096)
        || dev.addr.saturating_add(dev.size) > 1 << 32
    {
        return Err("register window outside the identity map or misaligned");
    }
    let size = usize::try_from(dev.size).map_err(|_| "register window too large")?;
    let header = NonNull::new(dev.addr as *mut VirtIOHeader).ok_or("null register window")?;
    // SAFETY: per this function's contract the window is device MMIO owned by the caller
    // for the rest of the run; it is identity-mapped (checked above) and page-aligned.
    unsafe { MmioTransport::new(header, size) }.map_err(|e| match e {
        virtio_drivers::transport::mmio::MmioError::BadMagic(_) => "bad magic",
        virtio_drivers::transport::mmio::MmioError::UnsupportedVersion(_) => "unsupported version",
        virtio_drivers::transport::mmio::MmioError::InvalidDeviceID(_) => "no device (ID 0)",
        virtio_drivers::transport::mmio::MmioError::MmioRegionTooSmall => "window too small",
    })
}

/// Finds the vsock device on the command line and initialises it, with
/// [`DEFAULT_CONNECTION_BUFFER`] bytes of receive buffer per connection.
///
/// `None` when the command line names no socket device, or it fails to initialise (the
/// reason is printed).
pub fn open_vsock(boot: &BootInfo) -> Option<Vsock> {
    open_vsock_with(boot, DEFAULT_CONNECTION_BUFFER)
}

/// [`open_vsock`] with `connection_buffer` bytes of receive buffer (advertised credit) per
/// connection.
pub fn open_vsock_with(boot: &BootInfo, connection_buffer: u32) -> Option<Vsock> {
    for dev in mmio_devices(boot.cmdline) {
        // SAFETY: the monitor put this window on the command line for this partition, and
        // the runtime opens each device at most once per call; firmware calls `open_vsock`
        // once.
        let transport = match unsafe { probe(&dev) } {
            Ok(t) => t,
            Err(why) => {
                println!("vsock: virtio-mmio device at {:#x}: {why}", dev.addr);
                continue;
            }
        };
        if transport.device_type() != DeviceType::Socket {
            continue;
        }
        match VirtIOSocket::<RuntimeHal, _, RX_BUFFER_SIZE>::new(transport) {
            Ok(driver) => {
                return Some(VsockConnectionManager::new_with_capacity(
                    driver,
                    connection_buffer,
                ))
            }
            Err(e) => {
                println!("vsock: device at {:#x} failed to initialise: {e}", dev.addr);
                return None;
            }
        }
    }
    None
}

/// This partition's vsock context ID.
pub fn local_cid(vsock: &Vsock) -> u64 {
    vsock.guest_cid()
}

/// Waits for the next vsock event until the TSC reaches `deadline_tsc`.
///
/// Polls; when nothing is pending, sleeps with `WAIT_UNTIL` (the monitor wakes the vCPU
/// early when it puts something in this partition's used rings) and polls again. Returns
/// `None` at the deadline. An error from the driver (a malformed packet, or one that
/// overran the credit) is printed and the wait goes on; [`try_wait_for_event`] returns it.
pub fn wait_for_event(vsock: &mut Vsock, deadline_tsc: u64) -> Option<VsockEvent> {
    loop {
        match try_wait_for_event(vsock, deadline_tsc) {
            Ok(event) => return event,
            Err(e) => println!("vsock: {e}"),
        }
    }
}

/// [`wait_for_event`], returning the driver's errors instead of printing them.
pub fn try_wait_for_event(
    vsock: &mut Vsock,
    deadline_tsc: u64,
) -> Result<Option<VsockEvent>, VirtioError> {
    let cap = time::ns_to_ticks(MAX_WAIT_MS * 1_000_000);
    let spin_until = time::rdtsc().saturating_add(time::ns_to_ticks(SPIN_NS.load(Relaxed)));
    loop {
        if let Some(event) = poll(vsock)? {
            return Ok(Some(event));
        }
        let now = time::rdtsc();
        if now >= deadline_tsc {
            return Ok(None);
        }
        if now < spin_until {
            core::hint::spin_loop();
            continue;
        }
        sysctl::wait_until(deadline_tsc.min(now.saturating_add(cap)));
    }
}

/// Default of [`set_spin_ns`]: measured here, polling 50 µs before sleeping takes a 64-byte
/// partition-to-partition round trip from ~136 µs to ~82 µs; an idle partition pays it
/// once per wake (a heartbeat: 0.005% of a core).
pub const DEFAULT_SPIN_NS: u64 = 50_000;

static SPIN_NS: AtomicU64 = AtomicU64::new(DEFAULT_SPIN_NS);

/// Makes [`wait_for_event`] poll for up to `ns` nanoseconds (ring 3, no exits) before it
/// sleeps: an answer that comes within that time is seen without a sleep and a wake.
pub fn set_spin_ns(ns: u64) {
    SPIN_NS.store(ns, Relaxed);
}

/// Polls until an event, or until the receive queue is certainly drained (no exit when it
/// is empty). Unlike the manager's `poll`, `Ok(None)` means nothing is pending.
pub fn poll(vsock: &mut Vsock) -> Result<Option<VsockEvent>, VirtioError> {
    for _ in 0..EMPTY_POLLS {
        if let Some(event) = vsock.poll()? {
            return Ok(Some(event));
        }
    }
    Ok(None)
}

/// Flow-control bookkeeping for one connection, fed from its events.
///
/// Sending: [`PeerCredit::plan`] says how much of a payload to send now, or to wait for
/// the peer's next credit update, or (after a quiet spell) to ask for one; call
/// [`PeerCredit::sent`] after each successful `send`.
/// Receiving: call [`PeerCredit::consumed`] after each `recv`; when it returns true, call
/// `update_credit` (and [`PeerCredit::advertised`]) so the peer learns about the freed
/// space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerCredit {
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    rx_consumed: u32,
    rx_advertised: u32,
    buffer: u32,
    /// TSC of the last news about the peer's credit, or of the last credit request.
    last_news: u64,
}

/// What to do with a payload, by [`PeerCredit::plan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendPlan {
    /// Send this many bytes (of the payload's start) now.
    Send(usize),
    /// Not enough credit: wait for the peer's next packet.
    Wait,
    /// Not enough credit, and no news from the peer for [`CREDIT_REQUEST_AFTER_MS`]: try
    /// the full `send` anyway; it fails, and makes the manager ask the peer for a credit
    /// update (or succeeds if the manager knows of credit this bookkeeping missed).
    RequestCredit,
}

impl PeerCredit {
    /// Fresh bookkeeping for a connection whose own receive buffer is `buffer` bytes
    /// (the manager's per-connection capacity, e.g. [`DEFAULT_CONNECTION_BUFFER`]).
    pub fn new(buffer: u32) -> Self {
        PeerCredit {
            buffer,
            ..Default::default()
        }
    }

    /// Takes the peer's credit from any event of this connection (every packet carries it).
    pub fn update(&mut self, event: &VsockEvent) {
        self.peer_buf_alloc = event.buffer_status.buffer_allocation;
        self.peer_fwd_cnt = event.buffer_status.forward_count;
        self.last_news = time::rdtsc();
    }

    /// Bytes the peer can take now.
    pub fn free(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// How many of `want` bytes to send now: all of them if the peer has room, else as
    /// many as it has room for if that is a worthwhile packet (at least
    /// [`MIN_PARTIAL_SEND`], or a quarter of the peer's buffer if that is smaller), else 0:
    /// wait for the peer to free more rather than send slivers, which cost an exit each and
    /// tend to keep a transfer in small packets.
    pub fn sendable(&self, want: usize) -> usize {
        let free = self.free() as usize;
        if free >= want {
            return want;
        }
        let worthwhile = MIN_PARTIAL_SEND
            .min(self.peer_buf_alloc as usize / 4)
            .max(1);
        if free >= worthwhile {
            free
        } else {
            0
        }
    }

    /// [`PeerCredit::sendable`] as a plan: [`SendPlan::Send`] when something can go now,
    /// else [`SendPlan::Wait`], or [`SendPlan::RequestCredit`] once the peer has been quiet
    /// for [`CREDIT_REQUEST_AFTER_MS`] (a peer that only answers requests still gets
    /// asked, but a blocked sender does not flood a peer that sends updates by itself
    /// with requests).
    pub fn plan(&mut self, want: usize) -> SendPlan {
        match self.sendable(want) {
            0 if want > 0 => {
                let now = time::rdtsc();
                let quiet = time::ns_to_ticks(CREDIT_REQUEST_AFTER_MS * 1_000_000);
                if now.saturating_sub(self.last_news) >= quiet {
                    self.last_news = now;
                    SendPlan::RequestCredit
                } else {
                    SendPlan::Wait
                }
            }
            n => SendPlan::Send(n),
        }
    }

    /// Bytes sent and not yet consumed by the peer (as far as its last packet said).
    pub fn in_flight(&self) -> u32 {
        self.tx_cnt.wrapping_sub(self.peer_fwd_cnt)
    }

    /// Records `n` bytes sent (a sent packet also advertises this side's credit).
    pub fn sent(&mut self, n: usize) {
        self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
        self.rx_advertised = self.rx_consumed;
    }

    /// Records `n` bytes received and consumed; true when at least a quarter of the receive
    /// buffer has been freed since the peer last heard, so a credit update is due.
    pub fn consumed(&mut self, n: usize) -> bool {
        self.rx_consumed = self.rx_consumed.wrapping_add(n as u32);
        self.rx_consumed.wrapping_sub(self.rx_advertised) >= (self.buffer / 4).max(1)
    }

    /// Records that a credit update was sent.
    pub fn advertised(&mut self) {
        self.rx_advertised = self.rx_consumed;
    }
}
