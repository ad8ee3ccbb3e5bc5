//! Snapshots of the card: the common `persist_round_trip!` test (a card with traffic both
//! ways and a frame waiting in the backend at the cut), and the validation of saved states.

use super::*;
use crate::persist::{Persist, Suspendable};

/// What a [`Card`] restore needs: the card's restore arguments and its driver as it was.
pub(in crate::net) struct CardArgs {
    pub net: NetMmioArgs<PairBackend>,
    pub drv: Driver,
}

impl Persist for Card {
    type State = NetMmioState;
    type ConstructorArgs = CardArgs;
    type Error = NetError;

    fn save(&self) -> Result<NetMmioState, NetError> {
        self.mmio.save()
    }

    fn restore(args: CardArgs, state: &NetMmioState) -> Result<Self, NetError> {
        Ok(Card {
            mmio: Arc::new(NetMmio::restore(args.net, state)?),
            drv: args.drv,
        })
    }
}

/// Restore arguments in the same process: the same memory and backend (the TAP stays
/// open), a new interrupt; the original is asleep (as at a cut) and left behind.
fn same_process(c: &mut Card) -> CardArgs {
    c.mmio.sleep().unwrap();
    let (irq, wakes) = counted_irq();
    let mut drv = c.drv.clone();
    drv.wakes = wakes;
    CardArgs {
        net: NetMmioArgs {
            backend: c.drv.backend.clone(),
            mac: MAC,
            mem: c.drv.mem.clone(),
            irq,
        },
        drv,
    }
}

/// Restore arguments in a new process: the same guest memory (as restored from the set),
/// a new backend (a TAP opened afresh); the old backend and what waited in it are gone.
fn new_process(c: &mut Card) -> CardArgs {
    let (backend, peer) = pair(8).unwrap();
    let mut args = same_process(c);
    args.net.backend = backend.clone();
    args.drv.backend = backend;
    args.drv.peer = peer;
    args
}

/// Frames both ways; the guest's two RX buffers used, a third frame waiting in the backend.
fn traffic(c: &mut Card) {
    c.init();
    c.send(&frame(60, 1));
    c.send(&frame(1514, 2));
    c.add_rx(2, 2048);
    for seed in 10..13 {
        c.drv.peer.inject(&frame(100, seed)).unwrap();
    }
    c.mmio.process_rx();
    assert_eq!(c.recv().len(), 2);
    assert_eq!(c.drv.peer.pending(), 1);
    assert!(!c.mmio.wants_rx_poll());
}

crate::persist_round_trip!(
    net_card_round_trip,
    Card,
    make: || Card::new(8),
    mutate: traffic,
    args: same_process,
    check: |original: Card, mut restored: Card| {
        drop(original);
        let m = &restored.mmio;
        assert_eq!(restored.reg_read(reg::STATUS) & 0x4f, 0xf, "started, as saved");
        assert_eq!(m.mac(), MAC);
        let st = m.stats();
        assert_eq!((st.tx_frames, st.rx_frames), (2, 2), "counters as saved");
        // The frame that waited in the backend arrives once the guest adds a buffer.
        restored.add_rx(2, 2048);
        restored.mmio.process_rx();
        assert_eq!(restored.recv(), vec![Some(frame(100, 12))]);
        assert!(restored.mmio.wants_rx_poll());
        restored.mmio.process_rx();
        assert!(restored.recv().is_empty(), "not delivered twice");
        // TX goes on where the queue was.
        assert_eq!(restored.send(&frame(60, 3)), vec![0]);
        let sent = restored.drv.peer.take_sent();
        assert!(sent.last().is_some_and(|s| s[NET_HDR_LEN..] == frame(60, 3)[..]));
        let st = restored.mmio.stats();
        assert_eq!((st.tx_frames, st.rx_frames), (3, 3));
        assert!(restored.irqs() > 0, "the new interrupt is raised");
    },
);

crate::persist_round_trip!(
    net_card_round_trip_in_a_new_process,
    Card,
    make: || Card::new(8),
    mutate: traffic,
    args: new_process,
    check: |original: Card, mut restored: Card| {
        // The frame that waited in the old backend is lost with it (docs/net.md).
        assert_eq!(original.drv.peer.pending(), 1);
        drop(original);
        restored.add_rx(2, 2048);
        assert!(restored.recv().is_empty());
        // The new backend carries frames both ways.
        restored.drv.peer.inject(&frame(80, 20)).unwrap();
        restored.mmio.process_rx();
        assert_eq!(restored.recv(), vec![Some(frame(80, 20))]);
        assert_eq!(restored.send(&frame(60, 4)), vec![0]);
        assert_eq!(restored.drv.peer.take_sent().len(), 1);
        let st = restored.mmio.stats();
        assert_eq!((st.tx_frames, st.rx_frames), (3, 3));
    },
);

#[test]
fn a_card_that_was_not_started_comes_back_not_started_and_starts_later() {
    let c = Card::new(8);
    let state = c.mmio.save().unwrap();
    assert!(!state.transport.active && state.device_queues.is_none());
    let (irq, _) = counted_irq();
    let args = NetMmioArgs {
        backend: c.drv.backend.clone(),
        mac: MAC,
        mem: c.drv.mem.clone(),
        irq,
    };
    let mut r = Card {
        mmio: Arc::new(NetMmio::restore(args, &state).unwrap()),
        drv: c.drv.clone(),
    };
    r.init();
    assert_eq!(r.send(&frame(60, 1)), vec![0]);
    assert_eq!(r.mmio.stats().tx_frames, 1);
}

#[test]
fn restore_refuses_another_mac_and_inconsistent_queues() {
    let mut c = Card::started(8);
    let state = c.mmio.save().unwrap();
    let args = |c: &Card, mac| NetMmioArgs {
        backend: c.drv.backend.clone(),
        mac,
        mem: c.drv.mem.clone(),
        irq: counted_irq().0,
    };
    let other = [0x52, 0x54, 0, 0, 0, 9];
    assert!(matches!(
        NetMmio::restore(args(&c, other), &state),
        Err(NetError::InvalidState(_))
    ));
    let mut no_queues = state.clone();
    no_queues.device_queues = None;
    assert!(NetMmio::restore(args(&c, MAC), &no_queues).is_err());
    let mut one_queue = state.clone();
    if let Some(q) = one_queue.device_queues.as_mut() {
        q.pop();
    }
    assert!(NetMmio::restore(args(&c, MAC), &one_queue).is_err());
    let mut outside = state.clone();
    if let Some(q) = outside.device_queues.as_mut() {
        q[0].used_ring = 1 << 40;
    }
    assert!(matches!(
        NetMmio::restore(args(&c, MAC), &outside),
        Err(NetError::Mmio(_))
    ));
    // The good state still restores, and the card works.
    c.mmio = Arc::new(NetMmio::restore(args(&c, MAC), &state).unwrap());
    assert_eq!(c.send(&frame(60, 1)), vec![0]);
}
