//! Snapshots of the disk device: the common `persist_round_trip!` test (a device saved in
//! the middle of use, its disk kept as it was at the cut), and the validation of saved
//! states against the disk.

use super::*;
use crate::persist::{Persist, Suspendable};

/// What a [`Disk`] restore needs: the device's restore arguments and its driver as it was.
pub(in crate::blk) struct DiskArgs {
    pub blk: BlkMmioArgs<MemDisk>,
    pub drv: Driver,
}

impl Persist for Disk {
    type State = BlkMmioState;
    type ConstructorArgs = DiskArgs;
    type Error = BlkError;

    fn save(&self) -> Result<BlkMmioState, BlkError> {
        self.mmio.save()
    }

    fn restore(args: DiskArgs, state: &BlkMmioState) -> Result<Self, BlkError> {
        Ok(Disk {
            mmio: Arc::new(BlkMmio::restore(args.blk, state)?),
            drv: args.drv,
        })
    }
}

/// Restore arguments as the snapshot code would give them: the original is asleep (as at
/// a cut), its disk is copied (the saved disk), a new interrupt. The original is left
/// behind and may go on writing its own disk.
fn from_cut(d: &mut Disk) -> DiskArgs {
    d.mmio.sleep().unwrap();
    let copy = MemDisk::new(DISK_LEN);
    copy.fill(0, &d.drv.backend.contents());
    let (irq, wakes) = counted_irq();
    let mut drv = d.drv.clone();
    drv.wakes = wakes;
    drv.backend = copy.clone();
    DiskArgs {
        blk: BlkMmioArgs {
            backend: copy,
            id: ID.to_owned(),
            mem: d.drv.mem.clone(),
            irq,
        },
        drv,
    }
}

/// Writes, reads and a flush; dirty blocks left untaken.
fn in_use(d: &mut Disk) {
    d.init(F_FLUSH | F_BLK_SIZE);
    d.write(0, &pattern(4096, 1), 2);
    d.write(100, &pattern(512, 2), 1);
    assert_eq!(d.read(0, 4096, 1).data, pattern(4096, 1));
    d.bare(req::FLUSH, 0);
    d.bare(77, 0);
}

crate::persist_round_trip!(
    blk_round_trip,
    Disk,
    make: Disk::new,
    mutate: in_use,
    args: from_cut,
    check: |mut original: Disk, mut restored: Disk| {
        assert_eq!(restored.reg_read(reg::STATUS) & 0x4f, 0xf, "started, as saved");
        assert_eq!(restored.mmio.capacity(), (DISK_LEN / 512) as u64);
        let st = restored.mmio.stats();
        assert_eq!((st.writes, st.reads, st.flushes, st.unsupported), (2, 1, 1, 1));
        // The original goes on after the cut, on its own disk: the restored one does not
        // see it.
        original.mmio.wake();
        original.write(0, &[0xaa; 512], 1);
        // The restored device reads what was on the disk at the cut, writes where its queue
        // was, and marks only what it wrote since.
        assert_eq!(restored.read(0, 4096, 1).data, pattern(4096, 1));
        assert_eq!(restored.read(100, 512, 1).data, pattern(512, 2));
        assert_eq!(restored.write(8, &[3; 512], 1).status, status::OK);
        assert_eq!(restored.read(8, 512, 1).data, vec![3; 512]);
        assert_eq!(
            DirtyBlocks::block_numbers(&restored.mmio.take_dirty_blocks()),
            vec![1],
            "a clean bitmap at the restore"
        );
        assert_eq!(restored.bare(req::FLUSH, 0).status, status::OK);
        assert_eq!(restored.drv.backend.flushes(), 1);
        let st = restored.mmio.stats();
        assert_eq!((st.writes, st.reads, st.flushes), (3, 4, 2));
        assert!(restored.irqs() > 0, "the new interrupt is raised");
    },
);

#[test]
fn a_device_that_was_not_started_comes_back_not_started_and_starts_later() {
    let d = Disk::new();
    let state = d.mmio.save().unwrap();
    assert!(!state.transport.active && state.device_queues.is_none());
    let args = BlkMmioArgs {
        backend: d.drv.backend.clone(),
        id: ID.to_owned(),
        mem: d.drv.mem.clone(),
        irq: counted_irq().0,
    };
    let mut r = Disk {
        mmio: Arc::new(BlkMmio::restore(args, &state).unwrap()),
        drv: d.drv.clone(),
    };
    r.init(F_FLUSH);
    assert_eq!(r.write(0, &[1; 512], 1).status, status::OK);
    assert_eq!(r.mmio.stats().writes, 1);
}

#[test]
fn restore_refuses_another_disk_size_another_id_and_inconsistent_queues() {
    let mut d = Disk::started();
    d.write(0, &[1; 512], 1);
    let state = d.mmio.save().unwrap();
    let args = |d: &Disk, backend: MemDisk, id: &str| BlkMmioArgs {
        backend,
        id: id.to_owned(),
        mem: d.drv.mem.clone(),
        irq: counted_irq().0,
    };
    let err = BlkMmio::restore(args(&d, MemDisk::new(DISK_LEN * 2), ID), &state).unwrap_err();
    assert!(
        matches!(
            err,
            BlkError::CapacityMismatch {
                saved: 2048,
                disk: 4096
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("2048 sectors"), "{err}");
    assert!(matches!(
        BlkMmio::restore(args(&d, d.drv.backend.clone(), "other"), &state),
        Err(BlkError::InvalidState(_))
    ));
    let mut no_queue = state.clone();
    no_queue.device_queues = None;
    assert!(BlkMmio::restore(args(&d, d.drv.backend.clone(), ID), &no_queue).is_err());
    let mut two = state.clone();
    if let Some(q) = two.device_queues.as_mut() {
        q.push(q[0]);
    }
    assert!(BlkMmio::restore(args(&d, d.drv.backend.clone(), ID), &two).is_err());
    let mut outside = state.clone();
    if let Some(q) = outside.device_queues.as_mut() {
        q[0].used_ring = 1 << 40;
    }
    assert!(matches!(
        BlkMmio::restore(args(&d, d.drv.backend.clone(), ID), &outside),
        Err(BlkError::Mmio(_))
    ));
    // The good state still restores, and the device works.
    d.mmio = Arc::new(BlkMmio::restore(args(&d, d.drv.backend.clone(), ID), &state).unwrap());
    assert_eq!(d.read(0, 512, 1).data, vec![1; 512]);
}

#[test]
fn a_notification_that_waited_at_the_save_is_served_by_the_restored_device() {
    let mut d = Disk::started();
    d.mmio.sleep().unwrap();
    let chain = d.write_chain(8, &[6; 512], 1);
    d.push(&chain);
    d.notify();
    let state = d.mmio.save().unwrap();
    assert!(state.notify_waiting);
    let state = crate::persist::json_round_trip(&state).unwrap();
    let args = BlkMmioArgs {
        backend: d.drv.backend.clone(),
        id: ID.to_owned(),
        mem: d.drv.mem.clone(),
        irq: counted_irq().0,
    };
    let mut r = Disk {
        mmio: Arc::new(BlkMmio::restore(args, &state).unwrap()),
        drv: d.drv.clone(),
    };
    assert_eq!(r.used().len(), 1, "served at the restore");
    assert_eq!(r.mmio.stats().writes, 1);
    assert!(r.drv.backend.contents()[4096..4608] == [6; 512]);
    assert!(!r.mmio.save().unwrap().notify_waiting);
}
