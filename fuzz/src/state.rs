//! A set's state files as untrusted input: what the monitor deserialises from
//! `<partition>.state` ([`PartitionState`]) and `vsock.devstate` ([`SwitchState`]), and the
//! device restores that take the devices' parts of it and must refuse what is not valid
//! (`Persist::restore`: sysctl, network card, disk, vsock device and switch) and the check
//! that a switch state names only configured CIDs (`check_cids`). A restored
//! device is then poked as a guest would: each queue notified, a frame offered.
//!
//! The first byte picks the parser (modulo [`KINDS`]); the rest is the JSON. Checks: nothing
//! panics; what parses serialises and parses back to the same JSON.

use duplex_devices::blk::{BlkMmio, BlkMmioArgs, MemDisk};
use duplex_devices::net::{pair, NetMmio, NetMmioArgs};
use duplex_devices::persist::Persist;
use duplex_devices::sysctl::Sysctl;
use duplex_devices::virtio::mmio::reg;
use duplex_devices::vsock::{SwitchState, VsockMmio, VsockMmioArgs, VsockSwitch};
use duplex_vmm::monitor::restore::check_cids;
use duplex_vmm::partition::snapshot::{DevicesState, PartitionState};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

use crate::virtio::{guest_memory, interrupt};

/// How many parsers the first byte chooses from.
pub const KINDS: u8 = 3;
/// Largest disk the harness makes for a restored disk device (bytes).
pub const MAX_DISK: u64 = 1 << 20;

/// Parses `bytes` as `T`; if it parses, checks that it serialises and parses back to the
/// same JSON.
fn parse<T: Serialize + DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    let state: T = serde_json::from_slice(bytes).ok()?;
    let json = match serde_json::to_value(&state) {
        Ok(v) => v,
        Err(e) => panic!("a parsed state does not serialise: {e}"),
    };
    let again: T = match serde_json::from_value(json.clone()) {
        Ok(s) => s,
        Err(e) => panic!("a serialised state does not parse back: {e}: {json}"),
    };
    let json2: Value = serde_json::to_value(&again).unwrap_or(Value::Null);
    assert_eq!(json, json2, "the state changed through JSON");
    Some(state)
}

/// Runs one input (see the module docs).
pub fn check_state(data: &[u8]) {
    let Some((&kind, json)) = data.split_first() else {
        return;
    };
    match kind % KINDS {
        0 => {
            if let Some(state) = parse::<PartitionState>(json) {
                restore_devices(&state.devices);
            }
        }
        1 => {
            if let Some(devices) = parse::<DevicesState>(json) {
                restore_devices(&devices);
            }
        }
        _ => {
            if let Some(state) = parse::<SwitchState>(json) {
                let config = crate::snapshot::config();
                let _ = check_cids(Path::new("/nonexistent/set"), &state, config);
                restore_switch(&state);
            }
        }
    }
}

/// Writes `QueueNotify` for each queue index a device may have, and reads the status.
fn notify_all(write: impl Fn(u64, &[u8]), read: impl Fn(u64, &mut [u8])) {
    for q in 0u32..3 {
        write(reg::QUEUE_NOTIFY, &q.to_le_bytes());
    }
    let mut status = [0u8; 4];
    read(reg::STATUS, &mut status);
}

/// Restores each device of `devices` into fresh resources and pokes it.
pub fn restore_devices(devices: &DevicesState) {
    let _ = Sysctl::restore((), &devices.sysctl);
    if let Some(net) = &devices.net {
        let (backend, peer) = pair(16).expect("an in-memory link");
        let args = NetMmioArgs {
            backend,
            mac: net.mac,
            mem: guest_memory(),
            irq: interrupt(),
        };
        if let Ok(card) = NetMmio::restore(args, net) {
            notify_all(|o, d| card.write(o, d), |o, d| card.read(o, d));
            let _ = peer.inject(&[0xff; 64]);
            card.process_rx();
            let _ = card.save();
        }
    }
    if let Some(blk) = &devices.blk {
        let len = blk.capacity.saturating_mul(512);
        if len > 0 && len <= MAX_DISK {
            let args = BlkMmioArgs {
                backend: MemDisk::new(len as usize),
                id: blk.id.clone(),
                mem: guest_memory(),
                irq: interrupt(),
            };
            if let Ok(dev) = BlkMmio::restore(args, blk) {
                notify_all(|o, d| dev.write(o, d), |o, d| dev.read(o, d));
                let _ = dev.save();
            }
        }
    }
    if let Some(vsock) = &devices.vsock {
        let switch = VsockSwitch::new().expect("a vsock switch");
        let args = VsockMmioArgs {
            switch: switch.clone(),
            cid: vsock.cid,
            name: "restored".into(),
            mem: guest_memory(),
            irq: interrupt(),
            uds: None,
            uds_mode: None,
        };
        if let Ok(dev) = VsockMmio::restore(args, vsock) {
            notify_all(|o, d| dev.write(o, d), |o, d| dev.read(o, d));
            let _ = dev.save();
            switch.detach(vsock.cid);
        }
    }
}

/// Restores a switch state into a fresh switch, attaches the partitions it names (CIDs 3
/// and 4, if it names them) and notifies their queues, so that restored backlogs and
/// connections meet guests.
pub fn restore_switch(state: &SwitchState) {
    let switch = VsockSwitch::new().expect("a vsock switch");
    if switch.restore_state(state, false).is_err() {
        return;
    }
    let mut attached = Vec::new();
    for cid in [3u64, 4] {
        if let Ok(dev) = switch.attach(cid, "p", guest_memory(), interrupt(), None) {
            notify_all(|o, d| dev.write(o, d), |o, d| dev.read(o, d));
            attached.push((cid, dev));
        }
    }
    let _ = switch.stats();
    let _ = switch.save_state();
    for (cid, _) in attached {
        switch.detach(cid);
    }
}
