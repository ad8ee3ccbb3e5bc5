//! The switch proper ([`Inner`], everything behind the switch's lock): it owns the
//! connection table, the router and the host bridge, routes each packet a partition sends
//! by what the table says (forward within the backlog caps, or RST), and does what spans
//! them: attach and detach, device resets, the resets that keep peers from hanging, restores
//! and the freeze.

use crate::GuestMemoryMmap;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::Queue;

use super::bridge::Bridge;
use super::hostevents::HostEvents;
use super::hostlink::HostEndpoint;
use super::limits::{
    UdsConfig, VsockError, BACKLOG_CAP, CONNECT_TIMEOUT, CONN_BACKLOG_CAP, RX_QUEUE,
    SOURCE_BACKLOG_CAP, TX_QUEUE,
};
use super::packet::{op, Endpoint, Hdr, Pending, HOST_CID, TYPE_STREAM};
use super::router::{PreparedPort, Router};
use super::state::{ConnStats, SwitchState, VsockCounters, VsockStats};
use super::table::{ConnTable, Refusal, Verdict};
use super::validate::{guest_cid, validate};
use crate::virtio::mmio::QueueSnapshot;
use crate::virtio::{ActivateError, Interrupt};

/// Everything behind the switch's mutex.
pub(crate) struct Inner {
    table: ConnTable,
    router: Router,
    bridge: Bridge,
    counters: VsockCounters,
    connect_timeout: Duration,
}

impl Inner {
    pub fn new(bridge: Bridge) -> Self {
        Inner {
            table: ConnTable::new(),
            router: Router::default(),
            bridge,
            counters: VsockCounters::default(),
            connect_timeout: CONNECT_TIMEOUT,
        }
    }

    fn host(&mut self) -> HostEndpoint<'_> {
        HostEndpoint::new(
            &mut self.table,
            &mut self.router,
            &mut self.bridge,
            &mut self.counters,
            self.connect_timeout,
        )
    }

    fn events(&mut self) -> HostEvents<'_> {
        HostEvents::new(self.host())
    }

    /// The bridge, for the device event loop's subscriber.
    pub fn bridge_mut(&mut self) -> &mut Bridge {
        &mut self.bridge
    }

    pub fn frozen(&self) -> bool {
        self.router.frozen()
    }

    /// Interrupts to raise once the lock is released.
    pub fn take_notify(&mut self) -> Vec<Arc<Interrupt>> {
        self.router.take_notify()
    }

    #[cfg(test)]
    pub fn set_connect_timeout(&mut self, timeout: Duration) {
        self.connect_timeout = timeout;
    }

    #[cfg(test)]
    pub fn pending_len(&self) -> usize {
        self.router.pending_len()
    }

    /// Attaches a partition that boots cold: connections an earlier run of `cid` left in the
    /// table (after [`Inner::detach_quiet`]) end, and its backlog starts empty.
    pub fn attach(
        &mut self,
        cid: u64,
        name: &str,
        mem: GuestMemoryMmap,
        irq: Arc<Interrupt>,
        uds: UdsConfig,
    ) -> Result<u64, VsockError> {
        self.check_attachable(cid)?;
        let attach_id = self.router.reserve_attach_id();
        let port = PreparedPort::new((cid, attach_id), name, mem, irq, uds, None);
        self.bind_for(&port)?;
        self.drop_conns_of(cid);
        self.router.remove_port(cid);
        self.router.add_port(port);
        Ok(attach_id)
    }

    /// Whether `cid` may be attached now.
    pub fn check_attachable(&self, cid: u64) -> Result<(), VsockError> {
        if !guest_cid(cid) {
            return Err(VsockError::ReservedCid(cid));
        }
        if self.router.is_attached(cid) {
            return Err(VsockError::DuplicateCid(cid));
        }
        Ok(())
    }

    /// Binds the port's listener, if it has a `uds`.
    fn bind_for(&mut self, port: &PreparedPort) -> Result<(), VsockError> {
        match &port.uds().path {
            Some(path) => self.bridge.bind(port.cid(), path, port.uds().mode()),
            None => Ok(()),
        }
    }

    /// A new attachment id (an attachment not in the table yet).
    pub fn reserve_attach_id(&mut self) -> u64 {
        self.router.reserve_attach_id()
    }

    /// A restored device's side, until [`Inner::replace`] or [`Inner::attach_prepared`].
    pub fn add_pending(&mut self, port: PreparedPort) {
        self.router.add_pending(port);
    }

    /// Puts a prepared side in alone (no other partition attached may change): its
    /// listener is bound, its backlog (from a restored state) kept and delivered.
    pub fn attach_prepared(&mut self, attach_id: u64) -> Result<(), VsockError> {
        let Some(port) = self.router.take_pending(attach_id) else {
            return Err(VsockError::InvalidState(
                "the device was not prepared".into(),
            ));
        };
        let cid = port.cid();
        self.check_attachable(cid)?;
        self.bind_for(&port)?;
        self.router.add_port(port);
        // Packets queued at the cut (and RSTs of dropped host links) go in as RX buffers
        // allow; host connections may read again.
        self.host().drain(cid);
        self.host().refresh_host_interest(cid);
        Ok(())
    }

    /// Detaches `cid`: its peers get RSTs, its host sockets and listener are closed, its
    /// backlog is dropped. Also ends what [`Inner::detach_quiet`] left of `cid`.
    pub fn detach(&mut self, cid: u64) {
        let name = self.router.remove_port(cid);
        self.drop_conns_of(cid);
        self.bridge.unbind(cid);
        if let Some(name) = name {
            log::info!("vsock: {name} (CID {cid}) detached");
        }
    }

    /// Detaches `cid` only if it is still attachment `attach_id` (a run that ends after a
    /// restore replaced it leaves the new attachment alone); drops a prepared side.
    pub fn detach_attachment(&mut self, cid: u64, attach_id: u64) {
        self.router.take_pending(attach_id);
        if self.router.is_attachment(cid, attach_id) {
            self.detach(cid);
        }
    }

    pub fn activate(
        &mut self,
        cid: u64,
        attach_id: u64,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        if !self.router.activate(cid, attach_id, mem, queues, irq) {
            return Err(ActivateError::Device(format!("CID {cid} is detached")));
        }
        self.host().drain(cid);
        Ok(())
    }

    /// The guest reset its device: its connections end (peers get an RST), queued packets
    /// for it are dropped.
    pub fn reset_device(&mut self, cid: u64, attach_id: u64) {
        if self.router.reset(cid, attach_id) {
            self.drop_conns_of(cid);
        }
    }

    pub fn notify(&mut self, cid: u64, attach_id: u64, queue: u16) {
        // While frozen, the queues are handled at the thaw.
        if self.router.frozen() || !self.router.is_attachment(cid, attach_id) {
            return;
        }
        match queue {
            RX_QUEUE => self.host().drain(cid),
            TX_QUEUE => self.process_tx(cid),
            _ => {}
        }
    }

    /// One pass over `cid`'s TX queue (within its budget); what is left is taken by the
    /// device event loop ([`Inner::run_tx_left`]).
    fn process_tx(&mut self, cid: u64) {
        for p in self.router.take_tx(cid, &mut self.counters) {
            self.route(cid, p);
        }
        if self.router.has_tx_left() {
            self.bridge.kick_now();
        }
    }

    /// On the loop: one pass over each TX queue a pass left chains in.
    pub fn run_tx_left(&mut self) {
        if self.router.frozen() {
            return;
        }
        for cid in self.router.take_tx_left() {
            self.process_tx(cid);
        }
    }

    /// Routes one packet sent by partition `from`.
    fn route(&mut self, from: u64, p: Pending) {
        let h = p.hdr;
        if h.src_cid != from {
            self.counters.spoofed += 1;
            return;
        }
        if h.type_ != TYPE_STREAM || !(op::REQUEST..=op::CREDIT_REQUEST).contains(&h.op) {
            self.counters.unsupported += 1;
            if h.op == op::REQUEST {
                self.host().rst_reply(&h);
            }
            return;
        }
        if h.dst_cid == HOST_CID {
            self.host().guest_to_host(p);
            return;
        }
        if !self.router.is_attached(h.dst_cid) {
            self.counters.unknown_cid += 1;
            if h.op == op::REQUEST {
                self.host().rst_reply(&h);
            }
            return;
        }
        match self.table.on_packet(&h) {
            Verdict::Forward => self.forward(p),
            Verdict::Drop => self.counters.rst_unknown += 1,
            Verdict::Refuse(why) => {
                match why {
                    Refusal::UnknownConnection => self.counters.rst_unknown += 1,
                    Refusal::TooMany => self.counters.conn_limit += 1,
                }
                self.host().rst_reply(&h);
            }
        }
    }

    /// Queues a partition-to-partition packet for its destination, within the backlog
    /// caps (per connection, per source partition, per destination), all kept as counts.
    fn forward(&mut self, p: Pending) {
        let dst = p.hdr.dst_cid;
        let flow = (p.hdr.src(), p.hdr.dst());
        let cost = p.cost();
        let over = self.router.flow_bytes(dst, &flow) + cost > CONN_BACKLOG_CAP
            || self.router.source_bytes(dst, p.hdr.src_cid) + cost > SOURCE_BACKLOG_CAP
            || self.router.backlog_bytes(dst).unwrap_or(0) + cost > BACKLOG_CAP;
        if over {
            self.overflow(&p.hdr);
            return;
        }
        if self.router.enqueue(dst, p, usize::MAX) {
            self.host().drain(dst);
        }
    }

    /// The destination's backlog is full: the connection is reset on both sides and its
    /// queued packets (that flow only) are dropped.
    fn overflow(&mut self, h: &Hdr) {
        let (src, dst) = (h.src(), h.dst());
        log::warn!(
            "vsock: backlog of CID {} is full: resetting {src} -> {dst}",
            dst.cid
        );
        self.counters.backlog_overflows += 1;
        if let Some(key) = self.table.find(src, dst) {
            self.table.remove(&key);
        }
        self.router.purge_flow(dst.cid, &(src, dst));
        self.send_rst(src, dst);
        self.send_rst(dst, src);
    }

    /// Sends an RST from `from` to `to` (if `to` is an attached partition).
    fn send_rst(&mut self, from: Endpoint, to: Endpoint) {
        self.host().rst_reply(&Hdr::new(to, from, op::RST));
    }

    /// Ends every connection `cid` takes part in: partition peers get an RST from `cid`'s
    /// endpoint, host sockets are closed.
    fn drop_conns_of(&mut self, cid: u64) {
        for key in self.table.keys_of(cid) {
            let Some(conn) = self.table.remove(&key) else {
                continue;
            };
            if let Some(link) = &conn.host {
                self.bridge.close(link.token, None);
                continue;
            }
            for (me, peer) in [(conn.client, conn.server), (conn.server, conn.client)] {
                if me.cid == cid && peer.cid != cid {
                    self.send_rst(me, peer);
                }
            }
        }
    }

    /// After a panic under the lock: every connection ends (partition peers get an RST,
    /// host sockets are closed), every backlog is emptied; ports and queues stay.
    pub fn reset_after_panic(&mut self) {
        log::error!("vsock: an update of the switch panicked; resetting every connection");
        self.router.take_notify();
        self.router.clear_backlogs();
        for conn in self.table.take_all().values() {
            if let Some(link) = &conn.host {
                self.bridge.close(link.token, None);
            }
            for (me, peer) in [(conn.client, conn.server), (conn.server, conn.client)] {
                if peer.cid != HOST_CID && me.cid != peer.cid {
                    self.send_rst(me, peer);
                }
            }
        }
        for token in self.bridge.all_tokens() {
            self.bridge.close(token, None);
        }
        self.counters.panics_recovered += 1;
    }

    pub fn stats(&self) -> VsockStats {
        let partitions = self.router.port_stats();
        let connection_list: Vec<ConnStats> = self
            .table
            .values()
            .map(|c| ConnStats {
                client: c.client,
                server: c.server,
                state: c.state,
                bytes_to_server: c.bytes_to_server,
                bytes_to_client: c.bytes_to_client,
                host_buffered: c.host.as_ref().map(|l| l.to_host.len()),
            })
            .collect();
        VsockStats {
            backlog_bytes: partitions.iter().map(|p| p.backlog_bytes).sum(),
            host_buffered_bytes: connection_list.iter().filter_map(|c| c.host_buffered).sum(),
            connections: connection_list.len(),
            partitions,
            connection_list,
            counters: self.counters.clone(),
        }
    }

    /// An event of the loop for a listener or host socket (`token`).
    pub fn on_event(&mut self, token: u64, events: u32) {
        self.events().on_event(token, events);
    }

    /// Deadlines of host sockets and listeners (see [`HostEvents::check_timeouts`]).
    pub fn check_timeouts(&mut self) -> Option<Duration> {
        self.events().check_timeouts()
    }

    /// The switch's state as saved.
    pub fn save_state(&self) -> SwitchState {
        SwitchState {
            conns: self.table.saved(),
            backlogs: self.router.saved_backlogs(),
            counters: self.counters.clone(),
            next_host_port: self.table.next_host_port(),
        }
    }

    /// Removes `cid` for a restore: no RST is sent (its peers are being replaced too).
    /// Its partition connections and backlog are dropped, its listener closed; its host
    /// connections stay, with their sockets, for [`Inner::restore_state`] to keep or reset
    /// (a later [`Inner::detach`] or cold [`Inner::attach`] of `cid` ends them).
    pub fn detach_quiet(&mut self, cid: u64) {
        self.bridge.unbind_listener(cid);
        self.remove_for_restore(cid);
    }

    /// [`Inner::detach_quiet`] but for the listener, which the caller handles.
    fn remove_for_restore(&mut self, cid: u64) {
        let name = self.router.remove_port(cid);
        for key in self.table.keys_of(cid) {
            if self.table.get(&key).is_some_and(|c| c.host.is_none()) {
                self.table.remove(&key);
            }
        }
        self.events().close_lines_of(cid);
        if let Some(name) = name {
            log::info!("vsock: {name} (CID {cid}) detached for a restore");
        }
    }

    /// Puts a saved state back (see `VsockSwitch::restore_state`).
    pub fn restore_state(
        &mut self,
        set: &SwitchState,
        keep_host_sockets: bool,
    ) -> Result<(), VsockError> {
        validate(set).map_err(VsockError::InvalidState)?;
        if let Some(&cid) = self.router.attached().first() {
            return Err(VsockError::Attached(cid));
        }
        self.apply_state(set, keep_host_sockets);
        Ok(())
    }

    /// Replaces every attached partition and the whole table in one step (see
    /// `VsockSwitch::replace`): everything that can fail is checked or done first, so that on
    /// an error nothing has changed.
    pub fn replace(
        &mut self,
        set: &SwitchState,
        attach_ids: &[u64],
        keep_host_sockets: bool,
    ) -> Result<(), VsockError> {
        validate(set).map_err(VsockError::InvalidState)?;
        let mut wanted: BTreeMap<u64, UdsConfig> = BTreeMap::new();
        for id in attach_ids {
            let Some(p) = self.router.pending(*id) else {
                return Err(VsockError::InvalidState(format!(
                    "device attachment {id} was not prepared (or was dropped)"
                )));
            };
            if !guest_cid(p.cid()) {
                return Err(VsockError::ReservedCid(p.cid()));
            }
            if wanted.insert(p.cid(), p.uds().clone()).is_some() {
                return Err(VsockError::DuplicateCid(p.cid()));
            }
        }
        if let Some(cid) = set.backlogs.keys().find(|c| !wanted.contains_key(c)) {
            return Err(VsockError::InvalidState(format!(
                "the state has a backlog for CID {cid}, which no restored partition has"
            )));
        }
        // Listeners: one already open for the same CID and path is kept (an in-place reboot
        // never closes its host sockets' listener); the others are bound now.
        let mut bound: Vec<(u64, PathBuf)> = Vec::new();
        for (&cid, uds) in &wanted {
            let Some(path) = &uds.path else { continue };
            if self.bridge.listens(cid, path) {
                continue;
            }
            if let Err(e) = self.bridge.bind(cid, path, uds.mode()) {
                for (cid, path) in bound {
                    self.bridge.close_listener(cid, &path);
                }
                return Err(e);
            }
            bound.push((cid, path.clone()));
        }
        // Nothing below fails.
        self.bridge.retain_listeners(|cid, path| {
            wanted
                .get(&cid)
                .is_some_and(|u| u.path.as_deref() == Some(path))
        });
        for cid in self.router.attached() {
            self.remove_for_restore(cid);
        }
        self.apply_state(set, keep_host_sockets);
        for id in attach_ids {
            if let Some(port) = self.router.take_pending(*id) {
                self.router.add_port(port);
            }
        }
        let cids: BTreeSet<u64> = wanted.into_keys().collect();
        for cid in cids {
            self.host().drain(cid);
            self.host().refresh_host_interest(cid);
        }
        Ok(())
    }

    /// The state part of a restore, once it is validated and no partition is attached.
    fn apply_state(&mut self, set: &SwitchState, keep_host_sockets: bool) {
        let live = self.table.saved();
        self.table = ConnTable::from_saved(&set.conns, set.next_host_port);
        self.router.set_backlogs(&set.backlogs);
        self.counters = set.counters.clone();
        self.events().restore_links(&live, keep_host_sockets);
    }

    /// The live queues of `cid`'s device (attachment `attach_id`), if it is started.
    pub fn queue_snapshots(&self, cid: u64, attach_id: u64) -> Option<Vec<QueueSnapshot>> {
        self.router.queue_snapshots(cid, attach_id)
    }

    pub fn freeze(&mut self) {
        self.router.freeze();
    }

    /// One freeze fewer; at the last, does what waited: TX chains and RX deliveries of
    /// every partition, and host sockets' events.
    pub fn thaw(&mut self) {
        if !self.router.thaw() {
            return;
        }
        for cid in self.router.attached() {
            self.process_tx(cid);
            self.host().drain(cid);
        }
        for token in self.bridge.all_tokens() {
            self.host().update_interest(token);
        }
        // Sockets and listeners the loop took out while frozen go back in.
        self.bridge.touch_all();
    }
}
