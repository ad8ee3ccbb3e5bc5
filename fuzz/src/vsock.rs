//! Two partitions' vsock devices on one switch, driven by a hostile driver ([`crate::virtio`]):
//! window 0 is CID 3, window 1 is CID 4, each with its own guest memory. Packets one guest
//! makes available on its TX queue are parsed by the switch and routed into the other's RX
//! queue or backlog, so every step also exercises the switch's connection table.
//!
//! Invariants: besides the driver's, the switch's backlogs stay under their caps and its
//! table under the connection cap, whatever the guests send.

use duplex_devices::vsock::{VsockMmio, VsockSwitch, BACKLOG_CAP, MAX_CONNS_PER_CID};
use duplex_devices::GuestMemoryMmap;

use crate::input::Input;
use crate::virtio::{self, guest_memory, interrupt, Device};

/// The CIDs of the two partitions.
pub const CIDS: [u64; 2] = [3, 4];

/// A switch with two attached partitions.
pub struct VsockPair {
    switch: VsockSwitch,
    windows: [VsockMmio; 2],
    mems: [GuestMemoryMmap; 2],
    selected: usize,
}

impl VsockPair {
    /// A new switch (with its own bridge loop) and two partitions, no host sockets.
    pub fn new() -> Self {
        let switch = VsockSwitch::new().expect("a vsock switch");
        let mems = [guest_memory(), guest_memory()];
        let attach = |i: usize| {
            switch
                .attach(
                    CIDS[i],
                    &format!("p{i}"),
                    mems[i].clone(),
                    interrupt(),
                    None,
                )
                .expect("attach a partition")
        };
        let windows = [attach(0), attach(1)];
        VsockPair {
            switch,
            windows,
            mems,
            selected: 0,
        }
    }
}

impl Default for VsockPair {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for VsockPair {
    fn drop(&mut self) {
        for cid in CIDS {
            self.switch.detach(cid);
        }
    }
}

impl Device for VsockPair {
    fn device_id(&self) -> u32 {
        duplex_devices::vsock::DEVICE_ID
    }

    fn queues(&self) -> u16 {
        3
    }

    fn windows(&self) -> u8 {
        2
    }

    fn select(&mut self, which: u8) {
        self.selected = usize::from(which % 2);
    }

    fn mem(&self) -> &GuestMemoryMmap {
        &self.mems[self.selected]
    }

    fn read(&self, offset: u64, data: &mut [u8]) {
        self.windows[self.selected].read(offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.windows[self.selected].write(offset, data);
    }

    /// The peer partition crashes: it is detached (its connections are reset) and its
    /// window goes dead; the program goes on against both windows.
    fn extra(&mut self, input: &mut Input<'_>) {
        if input.u8().is_multiple_of(4) {
            self.switch.detach(CIDS[1 - self.selected]);
        }
    }

    fn check(&self) {
        let stats = self.switch.stats();
        for p in &stats.partitions {
            assert!(
                p.backlog_bytes <= BACKLOG_CAP,
                "CID {}: backlog of {} bytes over the cap {BACKLOG_CAP}",
                p.cid,
                p.backlog_bytes
            );
        }
        assert!(
            stats.connections <= 2 * MAX_CONNS_PER_CID,
            "{} connections between two partitions",
            stats.connections
        );
    }
}

/// Runs one fuzz input against a fresh pair.
pub fn run(data: &[u8]) {
    let mut pair = VsockPair::new();
    virtio::run(&mut pair, data);
}

impl VsockPair {
    /// The switch's connections, backlogs and counters.
    pub fn stats(&self) -> duplex_devices::vsock::VsockStats {
        self.switch.stats()
    }
}
