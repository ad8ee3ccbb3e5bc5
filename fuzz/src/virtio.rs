//! A hostile virtio-mmio driver run by the fuzz input: register reads and writes, pokes into
//! guest memory, and a few macro steps a real driver takes (initialise the device, set up
//! its queues, make a descriptor chain available, notify) so that the fuzzer reaches the
//! device's queue processing quickly and then bends it. Guest memory holds the descriptor
//! tables, rings and buffers; every byte of it is the fuzzer's.
//!
//! The input is a program: opcode bytes each followed by their operands ([`Op`]). What a
//! device adds on top (a second vsock device, frames arriving from a TAP, ...) is a
//! [`Device::extra`] step.
//!
//! Invariants checked after each step: the identification registers read what they must,
//! and, while the program has only taken a driver's steps (no raw register write, no poke:
//! those may aim the device's writes at the rings the check reads), every used-ring element
//! the device wrote names a descriptor of the queue and a length inside guest memory.

use duplex_devices::virtio::mmio::{reg, MAGIC, VERSION};
use duplex_devices::virtio::Interrupt;
use duplex_devices::GuestMemoryMmap;
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::input::Input;

/// Guest RAM of each fuzzed device: 64 KiB at guest-physical 0.
pub const MEM_SIZE: usize = 64 * 1024;
/// Where the queues' default rings start (queue `i` at `RINGS + i * RING_STRIDE`).
pub const RINGS: u64 = 0x1000;
/// Room for one queue's rings at the largest size (256): descriptors, then avail, then used.
pub const RING_STRIDE: u64 = 0x2000;
/// Buffers of the chains the driver builds go from here to the end of memory.
pub const BUFFERS: u64 = 0x8000;
/// Most steps of one program (bounds the run time of one input).
pub const MAX_STEPS: usize = 256;

/// Virtio's descriptor flags.
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// `VIRTIO_F_VERSION_1`, in the high half of the features.
const VERSION_1_HIGH: u32 = 1;
/// Status bits.
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;

/// Guest memory for one device.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("64 KiB of guest memory")
}

/// An interrupt that goes nowhere (its eventfd only counts).
pub fn interrupt() -> Interrupt {
    Interrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd"),
        Arc::new(|| {}),
    )
}

/// A device as the fuzzed driver sees it.
pub trait Device {
    /// The virtio device ID the window must report.
    fn device_id(&self) -> u32;
    /// How many queues it has.
    fn queues(&self) -> u16;
    /// How many register windows (devices) the program can talk to (vsock has two).
    fn windows(&self) -> u8 {
        1
    }
    /// The window the program talks to from now on (below [`Device::windows`]).
    fn select(&mut self, _which: u8) {}
    /// The selected window's guest memory.
    fn mem(&self) -> &GuestMemoryMmap;
    /// A register read of the selected window.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// A register write of the selected window.
    fn write(&self, offset: u64, data: &[u8]);
    /// A device-specific step, its operands taken from `input`.
    fn extra(&mut self, _input: &mut Input<'_>) {}
    /// The device's own invariants, checked after every step.
    fn check(&self) {}
}

/// What the driver knows of one queue it set up (per selected window).
#[derive(Debug, Clone, Copy, Default)]
struct QueueModel {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    seen_used: u16,
}

/// The driver's side of each window: its queues.
#[derive(Debug, Default)]
struct Driver {
    window: u8,
    /// The program wrote a register or guest memory directly: the used rings may hold
    /// what the driver put there rather than what the device did.
    raw: bool,
    queues: [[QueueModel; 3]; 2],
}

/// The steps of a program; the opcode byte modulo their number picks one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `u16` offset (kept inside the registers unless its top bit is set), `u32` value.
    WriteReg,
    /// `u16` offset.
    ReadReg,
    /// `u16` guest address, length-prefixed bytes.
    Poke,
    /// Reset, negotiate the features of the `u32` (low half; VERSION_1 added unless the
    /// flags byte's bit 7 is set), set up the queues of the flags byte's low bits with
    /// 2^(`u8` % 9) entries at the default addresses, set `DRIVER_OK`.
    Init,
    /// `u8` queue, `u8` descriptor count (1 to 4), then per descriptor `u16` address offset
    /// into the buffers, `u16` length, `u8` flags (bit 0: device-writable, bit 1: no NEXT
    /// link, bit 2: point `next` anywhere), length-prefixed bytes written at the address.
    Chain,
    /// `u8` queue index written to `QueueNotify`.
    Notify,
    /// `u8` window to talk to from now on (modulo the device's windows).
    Select,
    /// The device's own step ([`Device::extra`]).
    Extra,
}

const OPS: [Op; 8] = [
    Op::WriteReg,
    Op::ReadReg,
    Op::Poke,
    Op::Init,
    Op::Chain,
    Op::Notify,
    Op::Select,
    Op::Extra,
];

/// Runs the program `data` against `dev`.
pub fn run(dev: &mut impl Device, data: &[u8]) {
    let mut input = Input::new(data);
    let mut driver = Driver::default();
    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        let op = OPS[usize::from(input.u8()) % OPS.len()];
        step(dev, &mut driver, op, &mut input);
        check_identity(dev);
        check_used(dev, &mut driver);
        dev.check();
    }
}

fn write_reg(dev: &impl Device, offset: u64, value: u32) {
    dev.write(offset, &value.to_le_bytes());
}

fn step(dev: &mut impl Device, driver: &mut Driver, op: Op, input: &mut Input<'_>) {
    match op {
        Op::WriteReg => {
            let raw = input.u16();
            let offset = if raw & 0x8000 != 0 {
                u64::from(raw & 0x1fff)
            } else {
                u64::from(raw & 0xfc)
            };
            let value = input.u32();
            driver.raw = true;
            dev.write(offset, &value.to_le_bytes());
            if offset == reg::STATUS && value == 0 {
                driver.queues[usize::from(driver.window)] = Default::default();
            }
        }
        Op::ReadReg => {
            let offset = u64::from(input.u16() & 0x1fff);
            let mut data = [0u8; 4];
            dev.read(offset, &mut data);
        }
        Op::Poke => {
            let addr = u64::from(input.u16());
            let bytes = input.chunk();
            let room = (MEM_SIZE as u64 - addr) as usize;
            driver.raw = true;
            let _ = dev
                .mem()
                .write_slice(&bytes[..bytes.len().min(room)], GuestAddress(addr));
        }
        Op::Init => init(dev, driver, input),
        Op::Chain => chain(dev, driver, input),
        Op::Notify => write_reg(dev, reg::QUEUE_NOTIFY, u32::from(input.u8() % 4)),
        Op::Select => {
            driver.window = input.u8() % dev.windows().clamp(1, 2);
            dev.select(driver.window);
        }
        Op::Extra => dev.extra(input),
    }
}

fn init(dev: &impl Device, driver: &mut Driver, input: &mut Input<'_>) {
    let features = input.u32();
    let flags = input.u8();
    let size = 1u16 << (input.u8() % 9);
    write_reg(dev, reg::STATUS, 0);
    write_reg(dev, reg::STATUS, ACKNOWLEDGE);
    write_reg(dev, reg::STATUS, ACKNOWLEDGE | DRIVER);
    write_reg(dev, reg::DRIVER_FEATURES_SEL, 0);
    write_reg(dev, reg::DRIVER_FEATURES, features);
    write_reg(dev, reg::DRIVER_FEATURES_SEL, 1);
    let high = if flags & 0x80 == 0 { VERSION_1_HIGH } else { 0 };
    write_reg(dev, reg::DRIVER_FEATURES, high);
    write_reg(dev, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    let models = &mut driver.queues[usize::from(driver.window)];
    *models = Default::default();
    for q in 0..dev.queues().min(3) {
        if flags & (1 << q) == 0 {
            continue;
        }
        let base = RINGS + u64::from(q) * RING_STRIDE;
        let m = QueueModel {
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x1400,
            ..QueueModel::default()
        };
        write_reg(dev, reg::QUEUE_SEL, u32::from(q));
        write_reg(dev, reg::QUEUE_NUM, u32::from(size));
        write_reg(dev, reg::QUEUE_DESC_LOW, m.desc as u32);
        write_reg(dev, reg::QUEUE_DESC_HIGH, 0);
        write_reg(dev, reg::QUEUE_DRIVER_LOW, m.avail as u32);
        write_reg(dev, reg::QUEUE_DRIVER_HIGH, 0);
        write_reg(dev, reg::QUEUE_DEVICE_LOW, m.used as u32);
        write_reg(dev, reg::QUEUE_DEVICE_HIGH, 0);
        // Rings start empty.
        let _ = dev.mem().write_obj(0u32, GuestAddress(m.avail));
        let _ = dev.mem().write_obj(0u32, GuestAddress(m.used));
        write_reg(dev, reg::QUEUE_READY, 1);
        models[usize::from(q)] = m;
    }
    write_reg(
        dev,
        reg::STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
}

fn chain(dev: &impl Device, driver: &mut Driver, input: &mut Input<'_>) {
    let q = usize::from(input.u8() % 3);
    let n = 1 + input.u8() % 4;
    let m = &mut driver.queues[usize::from(driver.window)][q];
    let mem = dev.mem();
    let size = m.size.max(1);
    let head = m.next_desc % size;
    for k in 0..n {
        let slot = (head + u16::from(k)) % size;
        let addr = BUFFERS + u64::from(input.u16()) % (MEM_SIZE as u64 - BUFFERS);
        let len = u32::from(input.u16());
        let f = input.u8();
        let bytes = input.chunk();
        let room = (MEM_SIZE as u64 - addr) as usize;
        let _ = mem.write_slice(&bytes[..bytes.len().min(room)], GuestAddress(addr));
        let last = k + 1 == n || f & 2 != 0;
        let mut flags = if f & 1 != 0 { F_WRITE } else { 0 };
        if !last {
            flags |= F_NEXT;
        }
        let next = if f & 4 != 0 {
            u16::from(f >> 3)
        } else {
            (slot + 1) % size
        };
        let at = m.desc + u64::from(slot) * 16;
        let _ = mem.write_obj(addr, GuestAddress(at));
        let _ = mem.write_obj(len, GuestAddress(at + 8));
        let _ = mem.write_obj(flags, GuestAddress(at + 12));
        let _ = mem.write_obj(next, GuestAddress(at + 14));
        if last {
            break;
        }
    }
    m.next_desc = head.wrapping_add(u16::from(n)) % size;
    let ring_at = m.avail + 4 + u64::from(m.avail_idx % size) * 2;
    let _ = mem.write_obj(head, GuestAddress(ring_at));
    m.avail_idx = m.avail_idx.wrapping_add(1);
    let _ = mem.write_obj(m.avail_idx, GuestAddress(m.avail + 2));
}

/// The identification registers never change, whatever the driver did.
fn check_identity(dev: &impl Device) {
    let read = |offset| {
        let mut data = [0u8; 4];
        dev.read(offset, &mut data);
        u32::from_le_bytes(data)
    };
    assert_eq!(read(reg::MAGIC_VALUE), MAGIC, "MagicValue");
    assert_eq!(read(reg::VERSION), VERSION, "Version");
    assert_eq!(read(reg::DEVICE_ID), dev.device_id(), "DeviceID");
}

/// Every used element the device added since the last look names a descriptor of the queue
/// and a written length that fits in guest memory.
fn check_used(dev: &impl Device, driver: &mut Driver) {
    if driver.raw {
        return;
    }
    let mem = dev.mem();
    for m in driver.queues[usize::from(driver.window)].iter_mut() {
        if m.size == 0 {
            continue;
        }
        let Ok(idx) = mem.read_obj::<u16>(GuestAddress(m.used + 2)) else {
            continue;
        };
        let new = idx.wrapping_sub(m.seen_used).min(m.size);
        for k in 0..new {
            let slot = m.seen_used.wrapping_add(k) % m.size;
            let at = m.used + 4 + u64::from(slot) * 8;
            let (Ok(id), Ok(len)) = (
                mem.read_obj::<u32>(GuestAddress(at)),
                mem.read_obj::<u32>(GuestAddress(at + 4)),
            ) else {
                continue;
            };
            assert!(
                id < u32::from(m.size),
                "used element {id} is not a descriptor of a queue of {}",
                m.size
            );
            assert!(
                len as usize <= MEM_SIZE,
                "used element claims {len} bytes written"
            );
        }
        m.seen_used = idx;
    }
}
