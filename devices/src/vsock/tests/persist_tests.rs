//! Snapshots of partitions on the switch, with mock guests: a [`Rig`] (the switch and its
//! partitions, as a monitor holds them) implements [`Persist`] so that the common
//! `persist_round_trip!` test drives it; plus the freeze, the quiet detach and the
//! validation of saved states.

use serde::{Deserialize, Serialize};

use super::*;
use crate::virtio::mmio::reg;
use crate::vsock::packet::op;
use crate::vsock::state::{Connection, HostLink, HostOrigin};
use crate::vsock::{ConnState, SwitchFreeze, SwitchState};

/// Partitions on one switch; their guest memory is the mock guests'.
pub(super) struct Rig {
    pub sw: VsockSwitch,
    pub guests: Vec<MockGuest>,
    pub uds: Vec<Option<PathBuf>>,
}

/// A snapshot of a [`Rig`]: the switch and every device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct RigState {
    pub switch: SwitchState,
    pub devices: Vec<VsockMmioState>,
}

/// What a [`Rig`] restore needs: the switch to restore into, the guests (memory and driver
/// as restored, devices detached) and whether host sockets are kept (same process).
pub(super) struct RigArgs {
    pub switch: VsockSwitch,
    pub keep_host_sockets: bool,
    pub guests: Vec<MockGuest>,
    pub uds: Vec<Option<PathBuf>>,
    /// Held through the restore, dropped (thawed) at its end.
    pub freeze: Option<SwitchFreeze>,
}

impl Persist for Rig {
    type State = RigState;
    type ConstructorArgs = RigArgs;
    type Error = VsockError;

    /// As the monitor does: frozen while the switch and the devices are saved.
    fn save(&self) -> Result<RigState, VsockError> {
        let _frozen = self.sw.freeze();
        Ok(RigState {
            switch: self.sw.save_state(),
            devices: self.guests.iter().map(MockGuest::save).collect(),
        })
    }

    fn restore(args: RigArgs, state: &RigState) -> Result<Self, VsockError> {
        args.switch
            .restore_state(&state.switch, args.keep_host_sockets)?;
        let mut guests = args.guests;
        for ((g, s), uds) in guests.iter_mut().zip(&state.devices).zip(&args.uds) {
            g.restore_on(&args.switch, s, uds.clone())?;
        }
        drop(args.freeze);
        Ok(Rig {
            sw: args.switch,
            guests,
            uds: args.uds,
        })
    }
}

impl Rig {
    /// Partitions with these CIDs (and `uds`), drivers started.
    pub fn new(parts: &[(u64, Option<PathBuf>)]) -> Self {
        let sw = VsockSwitch::new().unwrap();
        let guests = parts
            .iter()
            .map(|(cid, uds)| MockGuest::new(&sw, *cid, uds.clone()))
            .collect();
        Rig {
            sw,
            guests,
            uds: parts.iter().map(|(_, u)| u.clone()).collect(),
        }
    }

    /// Restore arguments for a new process: the guests move to a new switch; this rig's
    /// switch is left with nothing (dropping it is the old process ending).
    pub fn new_process_args(&mut self) -> RigArgs {
        for g in &self.guests {
            self.sw.detach_quiet(g.cid);
        }
        RigArgs {
            switch: VsockSwitch::new().unwrap(),
            keep_host_sockets: false,
            guests: std::mem::take(&mut self.guests),
            uds: self.uds.clone(),
            freeze: None,
        }
    }

    /// Restore arguments for an in-process reboot: frozen, every partition detached
    /// quietly, the same switch.
    pub fn in_process_args(&mut self) -> RigArgs {
        let freeze = self.sw.freeze();
        for g in &self.guests {
            self.sw.detach_quiet(g.cid);
        }
        RigArgs {
            switch: self.sw.clone(),
            keep_host_sockets: true,
            guests: std::mem::take(&mut self.guests),
            uds: self.uds.clone(),
            freeze: Some(freeze),
        }
    }
}

/// Client 3:1000 of A, server 4:80 of B.
const CA: Endpoint = Endpoint { cid: 3, port: 1000 };
const SB: Endpoint = Endpoint { cid: 4, port: 80 };

/// RW payloads `src` → `dst` among `got`, joined.
fn payload(got: &[(Hdr, Vec<u8>)], src: Endpoint, dst: Endpoint) -> Vec<u8> {
    got.iter()
        .filter(|(h, _)| h.op == op::RW && h.src() == src && h.dst() == dst)
        .flat_map(|(_, d)| d.clone())
        .collect()
}

/// A and B connected, bytes both ways, then B without RX buffers and a packet from A
/// waiting in B's backlog.
fn connected_with_backlog(rig: &mut Rig) {
    let [a, b] = &mut rig.guests[..] else {
        panic!("two guests")
    };
    a.add_rx(8, 4096);
    b.recycle = false;
    b.add_rx(2, 4096);
    assert!(a.send(hdr(CA, SB, op::REQUEST), &[]));
    assert!(b.send(hdr(SB, CA, op::RESPONSE), &[]));
    assert_eq!(a.recv()[0].0.op, op::RESPONSE);
    assert!(a.send(hdr(CA, SB, op::RW), b"hello"));
    assert!(b.send(hdr(SB, CA, op::RW), b"world"));
    assert_eq!(payload(&a.recv(), SB, CA), b"world");
    let got = b.recv();
    assert_eq!((got[0].0.op, got.len()), (op::REQUEST, 2));
    assert_eq!(payload(&got, CA, SB), b"hello");
    // B has no RX buffer left: this one waits in the switch.
    let mut h = hdr(CA, SB, op::RW);
    h.fwd_cnt = 5;
    assert!(a.send(h, b"queued at the cut"));
    assert!(b.recv().is_empty());
    let st = rig.sw.stats();
    assert_eq!(st.partitions[1].backlog_packets, 1);
}

/// After a restore: the backlog packet arrives once, then bytes flow both ways on the same
/// connection, whose table entry goes on counting.
fn carries_on(rig: &mut Rig) {
    let [a, b] = &mut rig.guests[..] else {
        panic!("two guests")
    };
    for g in [&*a, &*b] {
        assert_eq!(g.reg_read(reg::STATUS) & 0x4f, 0xf, "started, as saved");
        for q in 0..3 {
            g.reg_write(reg::QUEUE_SEL, q);
            assert_eq!(g.reg_read(reg::QUEUE_READY), 1, "queue {q} ready");
        }
        g.reg_write(reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(g.reg_read(reg::DEVICE_FEATURES), 1);
    }
    b.recycle = true;
    b.add_rx(4, 4096);
    let got = b.recv();
    assert_eq!(got.len(), 1, "the queued packet, once: {got:?}");
    assert_eq!(got[0].0.fwd_cnt, 5, "header as the sender wrote it");
    assert_eq!(payload(&got, CA, SB), b"queued at the cut");
    b.notify(0);
    assert!(b.recv().is_empty(), "not delivered twice");
    assert!(b.send(hdr(SB, CA, op::RW), b"after"));
    assert_eq!(payload(&a.recv(), SB, CA), b"after");
    assert!(a.send(hdr(CA, SB, op::RW), b"more"));
    assert_eq!(payload(&b.recv(), CA, SB), b"more");
    let st = rig.sw.stats();
    assert_eq!(st.connections, 1);
    let c = &st.connection_list[0];
    assert_eq!(c.state, ConnState::Established);
    assert_eq!((c.bytes_to_server, c.bytes_to_client), (5 + 17 + 4, 5 + 5));
    assert_eq!(st.backlog_bytes, 0);
}

fn two_partitions() -> Rig {
    Rig::new(&[(3, None), (4, None)])
}

crate::persist_round_trip!(
    partitions_round_trip_in_a_new_process,
    Rig,
    make: two_partitions,
    mutate: connected_with_backlog,
    args: Rig::new_process_args,
    check: |original: Rig, mut restored: Rig| {
        // The old process is gone.
        drop(original);
        carries_on(&mut restored);
    },
);

crate::persist_round_trip!(
    partitions_round_trip_in_process,
    Rig,
    make: two_partitions,
    mutate: connected_with_backlog,
    args: Rig::in_process_args,
    check: |_original: Rig, mut restored: Rig| carries_on(&mut restored),
);

#[test]
fn restored_device_that_was_not_started_starts_later() {
    let sw = VsockSwitch::new().unwrap();
    let mut a = MockGuest::new(&sw, 3, None);
    let mut b = MockGuest::attach(&sw, 4, None);
    // A REQUEST waits for B, whose driver has not started.
    a.add_rx(4, 4096);
    assert!(a.send(hdr(CA, SB, op::REQUEST), &[]));
    let state = (sw.save_state(), a.save(), b.save());
    assert!(!state.2.transport.active && state.2.device_queues.is_none());
    let json = serde_json::to_string(&state).unwrap();
    let (set, sa, sb): (SwitchState, VsockMmioState, VsockMmioState) =
        serde_json::from_str(&json).unwrap();
    sw.detach_quiet(3);
    sw.detach_quiet(4);
    let sw2 = VsockSwitch::new().unwrap();
    sw2.restore_state(&set, false).unwrap();
    a.restore_on(&sw2, &sa, None).unwrap();
    b.restore_on(&sw2, &sb, None).unwrap();
    drop(sw);
    b.init();
    b.add_rx(4, 4096);
    let got = b.recv();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0.op, got[0].0.src()), (op::REQUEST, CA));
}

#[test]
fn while_frozen_nothing_reaches_guest_memory_and_the_thaw_catches_up() {
    let sw = VsockSwitch::new().unwrap();
    let mut a = MockGuest::new(&sw, 3, None);
    let mut b = MockGuest::new(&sw, 4, None);
    a.add_rx(4, 4096);
    b.add_rx(4, 4096);
    let frozen = sw.freeze();
    let nested = sw.freeze();
    let before = (a.image(), b.image());
    // A's notification waits: its TX chain stays available, nothing is routed.
    assert!(!a.send(hdr(CA, SB, op::REQUEST), &[]));
    assert_eq!(sw.stats().counters.tx_packets, 0);
    drop(nested);
    assert!(b.recv().is_empty(), "still frozen");
    assert!(
        before.1.mem == b.image().mem,
        "B's memory untouched while frozen"
    );
    assert!(
        before.0.mem[..0x2_0000] == a.image().mem[..0x2_0000],
        "A's rings untouched while frozen"
    );
    drop(frozen);
    // The thaw took A's chain and delivered it, once.
    assert_eq!(sw.stats().counters.tx_packets, 1);
    let got = b.recv();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0.op, got[0].0.src()), (op::REQUEST, CA));
    b.notify(0);
    assert!(b.recv().is_empty());
}

#[test]
fn detach_quiet_sends_no_reset() {
    let sw = VsockSwitch::new().unwrap();
    let mut a = MockGuest::new(&sw, 3, None);
    let mut b = MockGuest::new(&sw, 4, None);
    a.add_rx(4, 4096);
    b.add_rx(4, 4096);
    assert!(a.send(hdr(CA, SB, op::REQUEST), &[]));
    assert!(b.send(hdr(SB, CA, op::RESPONSE), &[]));
    b.recv();
    sw.detach_quiet(3);
    assert!(b.recv().is_empty(), "no RST for B");
    let st = sw.stats();
    assert_eq!((st.connections, st.counters.rst_sent), (0, 0));
    // A cold attach of CID 3 is possible again.
    let _a2 = MockGuest::new(&sw, 3, None);
}

/// A named change to a saved state.
type Edit<S> = (&'static str, Box<dyn Fn(&mut S)>);

/// A valid saved state with one connection and one queued packet.
fn valid_set() -> SwitchState {
    let mut s = SwitchState {
        next_host_port: 1 << 30,
        ..Default::default()
    };
    s.backlogs.entry(3).or_default();
    s.backlogs
        .entry(4)
        .or_default()
        .push(crate::vsock::packet::Pending::new(
            hdr(CA, SB, op::RW),
            b"x".to_vec(),
        ));
    let c = Connection::new(CA, SB, None);
    s.conns.insert((CA, SB), c);
    s
}

#[test]
fn invalid_switch_states_are_refused_and_change_nothing() {
    let sw = VsockSwitch::new().unwrap();
    sw.restore_state(&valid_set(), false).expect("valid");
    let bad: Vec<Edit<SwitchState>> = vec![
        (
            "reserved CID",
            Box::new(|s| {
                s.backlogs.entry(2).or_default();
            }),
        ),
        (
            "misrouted packet",
            Box::new(|s| {
                let p = s.backlogs.get_mut(&4).unwrap().packets.front_mut().unwrap();
                p.hdr.dst_cid = 3;
            }),
        ),
        (
            "length mismatch",
            Box::new(|s| {
                s.backlogs.get_mut(&4).unwrap().packets[0].hdr.len = 9;
            }),
        ),
        (
            "oversized payload",
            Box::new(|s| {
                let p = &mut s.backlogs.get_mut(&4).unwrap().packets[0];
                p.data = vec![0; 64 * 1024 + 1];
                p.hdr.len = p.data.len() as u32;
            }),
        ),
        (
            "payload on a REQUEST",
            Box::new(|s| {
                s.backlogs.get_mut(&4).unwrap().packets[0].hdr.op = op::REQUEST;
            }),
        ),
        (
            "sent beyond the payload",
            Box::new(|s| {
                s.backlogs.get_mut(&4).unwrap().packets[0].sent = 1;
            }),
        ),
        (
            "unattached CID",
            Box::new(|s| {
                let c = Connection::new(CA, ep(9, 1), None);
                s.conns.insert((c.client, c.server), c);
            }),
        ),
        (
            "host link between partitions",
            Box::new(|s| {
                s.conns.get_mut(&(CA, SB)).unwrap().host =
                    Some(HostLink::new(1, HostOrigin::Guest, 1024));
            }),
        ),
        (
            "host connection without link",
            Box::new(|s| {
                let c = Connection::new(ep(2, 1 << 30), SB, None);
                s.conns.insert((c.client, c.server), c);
            }),
        ),
        (
            "host buffer over its size",
            Box::new(|s| {
                let mut link = HostLink::new(1, HostOrigin::Connect, 16);
                link.to_host.extend([0u8; 17]);
                let c = Connection::new(ep(2, 1 << 30), SB, Some(link));
                s.conns.insert((c.client, c.server), c);
            }),
        ),
        ("low host port", Box::new(|s| s.next_host_port = 5)),
    ];
    for (what, edit) in bad {
        let mut s = valid_set();
        edit(&mut s);
        let sw = VsockSwitch::new().unwrap();
        let before = sw.save_state();
        assert!(
            matches!(
                sw.restore_state(&s, false),
                Err(VsockError::InvalidState(_))
            ),
            "{what} is refused"
        );
        assert_eq!(sw.save_state(), before, "{what}: nothing changed");
    }
}

#[test]
fn the_switch_is_restored_only_with_no_partition_attached() {
    let sw = VsockSwitch::new().unwrap();
    let _a = MockGuest::new(&sw, 3, None);
    assert!(matches!(
        sw.restore_state(&valid_set(), false),
        Err(VsockError::Attached(3))
    ));
}

#[test]
fn invalid_device_states_are_refused_and_attach_nothing() {
    let sw = VsockSwitch::new().unwrap();
    let mut a = MockGuest::new(&sw, 3, None);
    let saved = a.save();
    sw.detach_quiet(3);
    let edits: Vec<Edit<VsockMmioState>> = vec![
        ("other CID", Box::new(|s| s.cid = 5)),
        (
            "queues of a stopped device",
            Box::new(|s| s.transport.active = false),
        ),
        (
            "no queues for a started device",
            Box::new(|s| s.device_queues = None),
        ),
        (
            "two queues",
            Box::new(|s| {
                s.device_queues.as_mut().unwrap().pop();
            }),
        ),
        (
            "rings outside memory",
            Box::new(|s| {
                s.device_queues.as_mut().unwrap()[1].avail_ring = 1 << 40;
            }),
        ),
        (
            "transport rings outside memory",
            Box::new(|s| {
                s.transport.queues[0].desc_table = 1 << 40;
            }),
        ),
        (
            "bigger queue",
            Box::new(|s| {
                s.device_queues.as_mut().unwrap()[0].max_size = 1024;
            }),
        ),
    ];
    for (what, edit) in edits {
        let mut s = saved.clone();
        edit(&mut s);
        assert!(a.restore_on(&sw, &s, None).is_err(), "{what} is refused");
        assert!(sw.stats().partitions.is_empty(), "{what}: nothing attached");
    }
    a.restore_on(&sw, &saved, None)
        .expect("the saved state itself");
    assert_eq!(sw.stats().partitions.len(), 1);
}

/// A device prepared for a restore that never commits leaves nothing in the switch once
/// dropped; `replace` refuses a device that is not prepared (any more).
#[test]
fn a_prepared_device_that_is_dropped_leaves_nothing_behind() {
    let sw = VsockSwitch::new().unwrap();
    let a = MockGuest::new(&sw, 3, None);
    let saved = a.save();
    let state = sw.save_state();
    let (irq, _, _) = super::counted_irq();
    let prepared = sw
        .prepare_restored(3, "p3", a.mem.clone(), irq, None, &saved)
        .expect("prepare");
    assert_eq!(sw.with(|i| i.pending_len()), 1);
    sw.detach_device(&prepared);
    assert_eq!(
        sw.with(|i| i.pending_len()),
        0,
        "the prepared side is dropped"
    );
    let e = sw
        .replace(&state, &[&prepared], false)
        .expect_err("not prepared any more");
    assert!(e.to_string().contains("not prepared"), "{e}");
    // The live partition was not touched.
    assert_eq!(sw.stats().partitions.len(), 1);
}
