//! Snapshots of the transport: registers and queue setup survive save → JSON → restore
//! without activating the device again; invalid saved states are refused.

use super::*;
use crate::persist::Persist;
use crate::virtio::INT_USED_RING;

fn fake_transport() -> MmioTransport<FakeDevice> {
    transport().0
}

fn args_like(t: &MmioTransport<FakeDevice>) -> (MmioArgs<FakeDevice>, Arc<Mutex<Log>>) {
    let log = Arc::new(Mutex::new(Log::default()));
    let args = MmioArgs {
        device: FakeDevice {
            log: log.clone(),
            sizes: vec![256, 256, 256],
        },
        mem: t.mem.clone(),
        irq: Arc::new(Interrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            Arc::new(|| {}),
        )),
    };
    (args, log)
}

/// Started with three queues, queue 1 and the high feature bank selected, an interrupt
/// pending.
fn started(t: &mut MmioTransport<FakeDevice>) {
    negotiate(t, 1, 1);
    for i in 0..3 {
        setup_queue(t, i, 8 << i, 0x1_0000 * (u64::from(i) + 1));
    }
    w(t, reg::STATUS, STARTED);
    assert!(t.is_active());
    w(t, reg::QUEUE_SEL, 1);
    w(t, reg::DEVICE_FEATURES_SEL, 1);
    t.irq.trigger();
}

crate::persist_round_trip!(
    transport_round_trip,
    MmioTransport<FakeDevice>,
    make: fake_transport,
    mutate: started,
    args: |t: &mut MmioTransport<FakeDevice>| args_like(t).0,
    check: |mut original: MmioTransport<FakeDevice>, mut restored: MmioTransport<FakeDevice>| {
        for off in [
            reg::STATUS,
            reg::QUEUE_READY,
            reg::QUEUE_NUM_MAX,
            reg::DEVICE_FEATURES,
            reg::INTERRUPT_STATUS,
            reg::CONFIG_GENERATION,
        ] {
            assert_eq!(r(&mut restored, off), r(&mut original, off), "register {off:#x}");
        }
        assert_eq!(r(&mut restored, reg::STATUS), STARTED);
        assert_eq!(r(&mut restored, reg::DEVICE_FEATURES), 1, "high bank selected");
        assert_eq!(r(&mut restored, reg::INTERRUPT_STATUS), INT_USED_RING);
        assert!(restored.is_active());
        let q = restored.save_state().queues;
        assert_eq!((q[2].size, q[2].ready), (32, true));
        assert_eq!(
            (q[2].desc_table, q[2].avail_ring, q[2].used_ring),
            (0x3_0000, 0x3_1000, 0x3_2000)
        );
        assert_eq!(restored.save_state().acked_features, 1 | (1 << 32));
        // The device was not activated again, but it gets notifications.
        let log = restored.device().log.clone();
        w(&mut restored, reg::QUEUE_NOTIFY, 2);
        assert!(log.lock().unwrap().activated.is_empty());
        assert_eq!(log.lock().unwrap().notified, vec![2]);
        // The setup of a started device stays locked; a reset reaches the device.
        w(&mut restored, reg::QUEUE_NUM, 4);
        assert_eq!(restored.save_state().queues[1].size, 16);
        w(&mut restored, reg::STATUS, 0);
        assert_eq!(log.lock().unwrap().resets, 1);
        assert!(!restored.is_active());
    },
);

/// `started`'s state with `edit` applied, restored.
fn restore_edited(edit: impl FnOnce(&mut MmioState)) -> Result<(), MmioError> {
    let mut t = fake_transport();
    started(&mut t);
    let mut state = t.save().expect("save");
    edit(&mut state);
    MmioTransport::restore(args_like(&t).0, &state).map(|_| ())
}

#[test]
fn invalid_saved_states_are_refused() {
    assert!(restore_edited(|_| {}).is_ok());
    assert!(matches!(
        restore_edited(|s| {
            s.queues.pop();
        }),
        Err(MmioError::QueueCount {
            saved: 2,
            device: 3
        })
    ));
    // Rings outside the 1 MiB of guest memory, on a started device.
    assert!(matches!(
        restore_edited(|s| s.queues[0].used_ring = 0x4000_0000),
        Err(MmioError::BadQueueState { index: 0, .. })
    ));
    assert!(matches!(
        restore_edited(|s| s.queues[1].size = 12),
        Err(MmioError::BadQueueState { index: 1, .. })
    ));
    assert!(matches!(
        restore_edited(|s| s.queues[1].size = 512),
        Err(MmioError::BadQueueState { index: 1, .. })
    ));
    assert!(matches!(
        restore_edited(|s| s.queues[2].max_size = 1024),
        Err(MmioError::BadQueueState { index: 2, .. })
    ));
    assert!(matches!(
        restore_edited(|s| s.queues[0].desc_table = 0x1_0001),
        Err(MmioError::BadQueueState { index: 0, .. })
    ));
    assert!(matches!(
        restore_edited(|s| s.status &= !VIRTIO_CONFIG_S_DRIVER_OK),
        Err(MmioError::Inconsistent(_))
    ));
    assert!(matches!(
        restore_edited(|s| s.acked_features |= 1 << 40),
        Err(MmioError::Inconsistent(_))
    ));
    assert!(matches!(
        restore_edited(|s| s.interrupt_status = 0x80),
        Err(MmioError::Inconsistent(_))
    ));
    // A device that was not started may hold rings anywhere (they are checked at start).
    assert!(restore_edited(|s| {
        s.active = false;
        s.status &= !VIRTIO_CONFIG_S_DRIVER_OK;
        s.queues[0].used_ring = 0x4000_0000;
    })
    .is_ok());
}
