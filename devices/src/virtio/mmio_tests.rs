//! Tests of the virtio-mmio transport's register behaviour with a recording fake device.

use crate::GuestMemoryMmap;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueState};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::*;

#[derive(Debug, Default)]
struct Log {
    activated: Vec<(Vec<QueueState>, u64)>,
    notified: Vec<u16>,
    resets: usize,
}

#[derive(Debug)]
struct FakeDevice {
    log: Arc<Mutex<Log>>,
    sizes: Vec<u16>,
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        19
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn features(&self) -> u64 {
        1 // one device-specific feature bit
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = 0x1122_3344_5566_7788u64.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| config.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        _irq: Arc<Interrupt>,
        acked: u64,
    ) -> Result<(), ActivateError> {
        let states = queues.iter().map(|q| q.state()).collect();
        self.log.lock().unwrap().activated.push((states, acked));
        Ok(())
    }
    fn queue_notify(&mut self, index: u16) {
        self.log.lock().unwrap().notified.push(index);
    }
    fn reset(&mut self) {
        self.log.lock().unwrap().resets += 1;
    }
}

fn transport() -> (MmioTransport<FakeDevice>, Arc<Mutex<Log>>, Arc<Interrupt>) {
    let log = Arc::new(Mutex::new(Log::default()));
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let irq = Arc::new(Interrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        Arc::new(|| {}),
    ));
    let dev = FakeDevice {
        log: log.clone(),
        sizes: vec![256, 256, 256],
    };
    (MmioTransport::new(dev, mem, irq.clone()).unwrap(), log, irq)
}

fn r(t: &mut MmioTransport<FakeDevice>, off: u64) -> u32 {
    let mut d = [0u8; 4];
    t.read(off, &mut d);
    u32::from_le_bytes(d)
}

fn w(t: &mut MmioTransport<FakeDevice>, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Sets up queue `i` at the given ring addresses with `size` entries.
fn setup_queue(t: &mut MmioTransport<FakeDevice>, i: u32, size: u32, base: u64) {
    w(t, reg::QUEUE_SEL, i);
    w(t, reg::QUEUE_NUM, size);
    w(t, reg::QUEUE_DESC_LOW, base as u32);
    w(t, reg::QUEUE_DESC_HIGH, 0);
    w(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
    w(t, reg::QUEUE_DRIVER_HIGH, 0);
    w(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
    w(t, reg::QUEUE_DEVICE_HIGH, 0);
    w(t, reg::QUEUE_READY, 1);
}

fn negotiate(t: &mut MmioTransport<FakeDevice>, low: u32, high: u32) -> u32 {
    w(
        t,
        reg::STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    w(t, reg::DRIVER_FEATURES_SEL, 0);
    w(t, reg::DRIVER_FEATURES, low);
    w(t, reg::DRIVER_FEATURES_SEL, 1);
    w(t, reg::DRIVER_FEATURES, high);
    w(
        t,
        reg::STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    r(t, reg::STATUS)
}

const STARTED: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK;

#[test]
fn identity_registers() {
    let (mut t, _, _) = transport();
    assert_eq!(r(&mut t, reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r(&mut t, reg::VERSION), 2);
    assert_eq!(r(&mut t, reg::DEVICE_ID), 19);
    assert_eq!(r(&mut t, reg::VENDOR_ID), VENDOR_ID);
    assert_eq!(r(&mut t, reg::SHM_LEN_LOW), u32::MAX);
    assert_eq!(t.bad_accesses(), 0);
}

#[test]
fn features_offer_version_1_in_bank_1() {
    let (mut t, _, _) = transport();
    w(&mut t, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
    w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(
        r(&mut t, reg::DEVICE_FEATURES),
        1,
        "VIRTIO_F_VERSION_1 is bit 32"
    );
    w(&mut t, reg::DEVICE_FEATURES_SEL, 2);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0);
}

#[test]
fn features_ok_requires_version_1_and_only_offered_bits() {
    let (mut t, _, _) = transport();
    // Without VERSION_1 the device refuses FEATURES_OK.
    assert_eq!(negotiate(&mut t, 1, 0) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    w(&mut t, reg::STATUS, 0);
    // An unoffered bit is refused too.
    assert_eq!(negotiate(&mut t, 1 | 4, 1) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    w(&mut t, reg::STATUS, 0);
    // Offered bits are accepted.
    let s = negotiate(&mut t, 1, 1);
    assert_ne!(s & VIRTIO_CONFIG_S_FEATURES_OK, 0);
}

#[test]
fn queue_setup_and_activation_hand_the_queues_to_the_device() {
    let (mut t, log, _) = transport();
    negotiate(&mut t, 1, 1);
    w(&mut t, reg::QUEUE_SEL, 1);
    assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 256);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    w(&mut t, reg::QUEUE_SEL, 7);
    assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0, "no queue 7");
    for i in 0..3 {
        setup_queue(&mut t, i, 8, 0x1_0000 * (u64::from(i) + 1));
    }
    w(&mut t, reg::QUEUE_SEL, 2);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
    // Notifications before DRIVER_OK are not forwarded.
    w(&mut t, reg::QUEUE_NOTIFY, 1);
    assert!(log.lock().unwrap().notified.is_empty());

    w(&mut t, reg::STATUS, STARTED);
    assert_eq!(r(&mut t, reg::STATUS), STARTED);
    assert!(t.is_active());
    {
        let log = log.lock().unwrap();
        assert_eq!(log.activated.len(), 1);
        let (states, acked) = &log.activated[0];
        assert_eq!(*acked, 1 | (1 << 32));
        assert_eq!(states.len(), 3);
        assert_eq!(states[1].size, 8);
        assert!(states[1].ready);
        assert_eq!(states[1].desc_table, 0x2_0000);
        assert_eq!(states[1].avail_ring, 0x2_1000);
        assert_eq!(states[1].used_ring, 0x2_2000);
    }
    w(&mut t, reg::QUEUE_NOTIFY, 1);
    w(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(log.lock().unwrap().notified, vec![1, 0]);
}

#[test]
fn driver_ok_without_features_ok_or_with_bad_rings_needs_reset() {
    let (mut t, log, _) = transport();
    w(
        &mut t,
        reg::STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    w(
        &mut t,
        reg::STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    assert_ne!(r(&mut t, reg::STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert!(!t.is_active());

    w(&mut t, reg::STATUS, 0);
    negotiate(&mut t, 1, 1);
    // Rings beyond the 1 MiB of guest memory.
    setup_queue(&mut t, 0, 8, 0x4000_0000);
    w(&mut t, reg::STATUS, STARTED);
    assert_ne!(r(&mut t, reg::STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert!(!t.is_active());
    assert!(log.lock().unwrap().activated.is_empty());
}

#[test]
fn status_zero_resets_device_queues_and_interrupts() {
    let (mut t, log, irq) = transport();
    negotiate(&mut t, 1, 1);
    setup_queue(&mut t, 0, 8, 0x1_0000);
    w(&mut t, reg::STATUS, STARTED);
    irq.trigger();
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 1);
    w(&mut t, reg::INTERRUPT_ACK, 1);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
    irq.trigger();

    w(&mut t, reg::STATUS, 0);
    assert_eq!(log.lock().unwrap().resets, 1);
    assert!(!t.is_active());
    assert_eq!(r(&mut t, reg::STATUS), 0);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
    w(&mut t, reg::QUEUE_SEL, 0);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    // After a reset, notifications are not forwarded.
    w(&mut t, reg::QUEUE_NOTIFY, 0);
    assert!(log.lock().unwrap().notified.is_empty());
}

#[test]
fn disabling_a_queue_of_the_running_device_stops_it() {
    let (mut t, log, _) = transport();
    negotiate(&mut t, 1, 1);
    setup_queue(&mut t, 0, 8, 0x1_0000);
    w(&mut t, reg::STATUS, STARTED);
    w(&mut t, reg::QUEUE_SEL, 0);
    w(&mut t, reg::QUEUE_READY, 0);
    // The driver reads back the value it wrote.
    assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    assert_eq!(log.lock().unwrap().resets, 1);
    assert!(!t.is_active());
}

#[test]
fn config_space_reads_any_width_and_bad_accesses_are_counted() {
    let (mut t, _, _) = transport();
    let mut b8 = [0u8; 8];
    t.read(CONFIG_OFFSET, &mut b8);
    assert_eq!(u64::from_le_bytes(b8), 0x1122_3344_5566_7788);
    let mut b4 = [0u8; 4];
    t.read(CONFIG_OFFSET + 4, &mut b4);
    assert_eq!(u32::from_le_bytes(b4), 0x1122_3344);
    let mut b1 = [0u8; 1];
    t.read(CONFIG_OFFSET + 1, &mut b1);
    assert_eq!(b1[0], 0x77);
    t.read(CONFIG_OFFSET + 8, &mut b4);
    assert_eq!(b4, [0; 4]);

    // Misaligned or narrow register accesses, unknown registers, beyond the window.
    let mut b2 = [0xffu8; 2];
    t.read(reg::MAGIC_VALUE, &mut b2);
    assert_eq!(b2, [0, 0]);
    t.read(reg::MAGIC_VALUE + 1, &mut b4);
    t.write(reg::STATUS, &[1u8]);
    w(&mut t, 0x0f0, 1);
    t.read(WINDOW_SIZE, &mut b4);
    assert_eq!(t.bad_accesses(), 5);
    assert_eq!(
        r(&mut t, reg::STATUS),
        0,
        "a 1-byte status write is ignored"
    );
}

#[path = "mmio_persist_tests.rs"]
mod persist_tests;
