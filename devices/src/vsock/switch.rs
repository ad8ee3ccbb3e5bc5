//! The switch proper: attached partitions, guest TX processing, routing by CID, delivery
//! into RX queues with per-destination backlogs, and the resets that keep peers from hanging
//! when a partition goes away. Host connections are handled in `hostlink` and `host`.

use crate::GuestMemoryMmap;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;

use super::bridge::Bridge;
use super::packet::{op, Endpoint, Hdr, Pending, HOST_CID, MAX_PKT_DATA, TYPE_STREAM};
use super::restore::PreparedPort;
use super::state::{
    Backlog, ConnKey, ConnState, ConnStats, Connection, PortStats, SwitchState, VsockStats,
};
use super::{
    VsockError, BACKLOG_CAP, CONNECT_TIMEOUT, CONN_BACKLOG_CAP, MAX_CONNS_PER_CID, MIN_GUEST_CID,
    RX_QUEUE, TX_QUEUE,
};
use crate::virtio::{ActivateError, Interrupt};

/// How far packets the switch makes itself may exceed a backlog's cap.
pub(crate) const CONTROL_SLACK: usize = 64 * 1024;

/// The first port handed out to host connections made with `CONNECT`.
pub(crate) const FIRST_HOST_PORT: u32 = 1 << 30;

/// An attached partition.
pub(crate) struct Port {
    pub name: String,
    /// Tells this attachment from an earlier one with the same CID.
    pub attach_id: u64,
    pub mem: GuestMemoryMmap,
    pub irq: Arc<Interrupt>,
    /// The device's queues once the driver started it.
    pub queues: Option<Vec<Queue>>,
    pub uds: Option<PathBuf>,
}

impl Port {
    /// The port's memory, its queue `index` once the driver has made it ready, and its
    /// interrupt.
    fn ready_queue(
        &mut self,
        index: u16,
    ) -> Option<(&GuestMemoryMmap, &mut Queue, &Arc<Interrupt>)> {
        let Port {
            mem, queues, irq, ..
        } = self;
        let queue = queues.as_mut()?.get_mut(usize::from(index))?;
        queue.ready().then_some((&*mem, queue, &*irq))
    }
}

/// Everything behind the switch's mutex.
pub(crate) struct Inner {
    /// Plain data: connections, backlogs, counters.
    pub state: SwitchState,
    pub ports: BTreeMap<u64, Port>,
    pub bridge: Bridge,
    /// Interrupts to raise once the lock is released.
    pub to_notify: Vec<Arc<Interrupt>>,
    pub connect_timeout: Duration,
    next_attach_id: u64,
    /// Restored devices' sides, prepared but not yet put in (see `VsockSwitch::replace`),
    /// by attachment id.
    pub(crate) pending: BTreeMap<u64, super::restore::PreparedPort>,
    /// While positive, nothing is written into guest memory and the host bridge waits
    /// (see [`super::SwitchFreeze`]); notifications are handled when it drops to 0.
    pub frozen: u32,
}

impl Inner {
    pub fn new(bridge: Bridge) -> Self {
        Inner {
            state: SwitchState {
                next_host_port: FIRST_HOST_PORT,
                ..Default::default()
            },
            ports: BTreeMap::new(),
            bridge,
            to_notify: Vec::new(),
            connect_timeout: CONNECT_TIMEOUT,
            next_attach_id: 1,
            pending: BTreeMap::new(),
            frozen: 0,
        }
    }

    /// Attaches a partition that boots cold: connections an earlier run of `cid` left in the
    /// table (after [`Inner::detach_quiet`]) end, and its backlog starts empty.
    pub fn attach(
        &mut self,
        cid: u64,
        name: &str,
        mem: GuestMemoryMmap,
        irq: Arc<Interrupt>,
        uds: Option<PathBuf>,
    ) -> Result<u64, VsockError> {
        self.check_attachable(cid)?;
        self.drop_conns_of(cid);
        self.state.backlogs.insert(cid, Backlog::default());
        let attach_id = self.reserve_attach_id();
        self.insert_port(PreparedPort {
            cid,
            attach_id,
            name: name.to_owned(),
            mem,
            irq,
            uds,
            queues: None,
        })?;
        Ok(attach_id)
    }

    /// Whether `cid` may be attached now.
    pub(crate) fn check_attachable(&self, cid: u64) -> Result<(), VsockError> {
        if !(MIN_GUEST_CID..u64::from(u32::MAX)).contains(&cid) {
            return Err(VsockError::ReservedCid(cid));
        }
        if self.ports.contains_key(&cid) {
            return Err(VsockError::DuplicateCid(cid));
        }
        Ok(())
    }

    /// Binds the port's listener (if it has a `uds`) and adds the port. Its backlog must
    /// exist.
    pub(crate) fn insert_port(&mut self, port: PreparedPort) -> Result<(), VsockError> {
        if let Some(path) = &port.uds {
            self.bridge.bind(port.cid, path)?;
        }
        self.insert_bound_port(port);
        Ok(())
    }

    /// A new attachment id (an attachment not in the table yet, see `PreparedPort`).
    pub(crate) fn reserve_attach_id(&mut self) -> u64 {
        let attach_id = self.next_attach_id;
        self.next_attach_id += 1;
        attach_id
    }

    /// Adds a port whose listener (if any) is bound.
    pub(crate) fn insert_bound_port(&mut self, port: PreparedPort) {
        let PreparedPort {
            cid,
            attach_id,
            name,
            mem,
            irq,
            uds,
            queues,
        } = port;
        log::info!("vsock: {name} attached as CID {cid}");
        self.ports.insert(
            cid,
            Port {
                name,
                attach_id,
                mem,
                irq,
                queues,
                uds,
            },
        );
    }

    /// Detaches `cid`: its peers get RSTs, its host sockets and listener are closed, its
    /// backlog is dropped. Also ends what [`Inner::detach_quiet`] left of `cid`.
    pub fn detach(&mut self, cid: u64) {
        let port = self.ports.remove(&cid);
        self.drop_conns_of(cid);
        self.state.backlogs.remove(&cid);
        self.bridge.unbind(cid);
        if let Some(port) = port {
            log::info!("vsock: {} (CID {cid}) detached", port.name);
        }
    }

    /// Detaches `cid` only if it is still attachment `attach_id` (a run that ends after a
    /// restore replaced it leaves the new attachment alone).
    pub fn detach_attachment(&mut self, cid: u64, attach_id: u64) {
        // A device prepared for a restore that did not commit: drop its side (it holds the
        // partition's memory and interrupt).
        self.pending.remove(&attach_id);
        if self
            .ports
            .get(&cid)
            .is_some_and(|p| p.attach_id == attach_id)
        {
            self.detach(cid);
        }
    }

    /// The port of `cid` if it is the attachment `attach_id`.
    pub(crate) fn port_mut(&mut self, cid: u64, attach_id: u64) -> Option<&mut Port> {
        self.ports
            .get_mut(&cid)
            .filter(|p| p.attach_id == attach_id)
    }

    pub fn activate(
        &mut self,
        cid: u64,
        attach_id: u64,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let Some(port) = self.port_mut(cid, attach_id) else {
            return Err(ActivateError::Device(format!("CID {cid} is detached")));
        };
        port.mem = mem;
        port.irq = irq;
        port.queues = Some(queues);
        self.drain_rx(cid);
        Ok(())
    }

    /// The guest reset its device: its connections end (peers get an RST), queued packets
    /// for it are dropped.
    pub fn reset_device(&mut self, cid: u64, attach_id: u64) {
        let Some(port) = self.port_mut(cid, attach_id) else {
            return;
        };
        if port.queues.take().is_none() {
            return;
        }
        self.drop_conns_of(cid);
        if let Some(b) = self.state.backlogs.get_mut(&cid) {
            b.clear();
        }
    }

    pub fn notify(&mut self, cid: u64, attach_id: u64, queue: u16) {
        // While frozen, the queues are handled at the thaw.
        if self.frozen > 0 || self.port_mut(cid, attach_id).is_none() {
            return;
        }
        match queue {
            RX_QUEUE => self.drain_rx(cid),
            TX_QUEUE => self.process_tx(cid),
            _ => {}
        }
    }

    /// Takes every packet from `cid`'s TX queue and routes it.
    pub(crate) fn process_tx(&mut self, cid: u64) {
        if self.frozen > 0 {
            return;
        }
        let mut packets = Vec::new();
        {
            let Some(port) = self.ports.get_mut(&cid) else {
                return;
            };
            let counters = &mut self.state.counters;
            let Some((mem, tx, irq)) = port.ready_queue(TX_QUEUE) else {
                return;
            };
            let mut used = false;
            // Bounded: another vCPU of the guest may keep adding chains.
            for _ in 0..usize::from(tx.size()) * 2 {
                let chain = match tx.iter(mem) {
                    Ok(mut it) => it.next(),
                    Err(e) => {
                        log::debug!("vsock: CID {cid} TX queue: {e}");
                        counters.malformed_tx += 1;
                        None
                    }
                };
                let Some(mut chain) = chain else {
                    break;
                };
                let head = chain.head_index();
                match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA)
                    .map_err(|e| e.to_string())
                    .and_then(|p| Pending::from_tx(&p).map_err(|e| e.to_string()))
                {
                    Ok(p) => packets.push(p),
                    Err(e) => {
                        log::debug!("vsock: CID {cid}: malformed TX chain: {e}");
                        counters.malformed_tx += 1;
                    }
                }
                if tx.add_used(mem, head, 0).is_err() {
                    counters.malformed_tx += 1;
                } else {
                    used = true;
                }
            }
            counters.tx_packets += packets.len() as u64;
            if used {
                self.to_notify.push(irq.clone());
            }
        }
        for p in packets {
            self.route(cid, p);
        }
    }

    /// Routes one packet sent by partition `from`.
    fn route(&mut self, from: u64, p: Pending) {
        let h = p.hdr;
        if h.src_cid != from {
            self.state.counters.spoofed += 1;
            return;
        }
        if h.type_ != TYPE_STREAM || !(op::REQUEST..=op::CREDIT_REQUEST).contains(&h.op) {
            self.state.counters.unsupported += 1;
            if h.op == op::REQUEST {
                self.rst_reply(&h);
            }
            return;
        }
        if h.dst_cid == HOST_CID {
            self.guest_to_host(p);
            return;
        }
        if !self.ports.contains_key(&h.dst_cid) {
            self.state.counters.unknown_cid += 1;
            if h.op == op::REQUEST {
                self.rst_reply(&h);
            }
            return;
        }
        if !self.track(&h) {
            self.rst_reply(&h);
            return;
        }
        self.forward(p);
    }

    /// Updates the connection table for a partition-to-partition packet; false when a
    /// REQUEST is refused (too many connections).
    fn track(&mut self, h: &Hdr) -> bool {
        let (src, dst) = (h.src(), h.dst());
        match h.op {
            op::REQUEST => {
                if let Some(stale) = self.state.find(src, dst) {
                    self.state.conns.remove(&stale);
                }
                if self.state.conns_of(src.cid) >= MAX_CONNS_PER_CID
                    || self.state.conns_of(dst.cid) >= MAX_CONNS_PER_CID
                {
                    return false;
                }
                self.state
                    .conns
                    .insert((src, dst), Connection::new(src, dst, None));
            }
            op::RESPONSE => {
                if let Some(c) = self.state.conns.get_mut(&(dst, src)) {
                    if c.state == ConnState::Connecting {
                        c.state = ConnState::Established;
                    }
                }
            }
            op::RST => {
                if let Some(key) = self.state.find(src, dst) {
                    self.state.conns.remove(&key);
                }
            }
            op::SHUTDOWN => {
                if let Some(key) = self.state.find(src, dst) {
                    if let Some(c) = self.state.conns.get_mut(&key) {
                        c.state = ConnState::Closing;
                    }
                }
            }
            op::RW => {
                if let Some(key) = self.state.find(src, dst) {
                    if let Some(c) = self.state.conns.get_mut(&key) {
                        let n = u64::from(h.len);
                        if key.0 == src {
                            c.bytes_to_server += n;
                        } else {
                            c.bytes_to_client += n;
                        }
                    }
                }
            }
            _ => {}
        }
        true
    }

    /// Queues a partition-to-partition packet for its destination, within the backlog
    /// caps (per connection and per destination).
    fn forward(&mut self, p: Pending) {
        let dst = p.hdr.dst_cid;
        let (src_ep, dst_ep) = (p.hdr.src(), p.hdr.dst());
        let (queued, conn_queued) = self.state.backlogs.get(&dst).map_or((0, 0), |b| {
            let conn = b
                .packets
                .iter()
                .filter(|q| q.hdr.src() == src_ep && q.hdr.dst() == dst_ep)
                .map(Pending::cost)
                .sum::<usize>();
            (b.bytes, conn)
        });
        if conn_queued + p.cost() > CONN_BACKLOG_CAP || queued + p.cost() > BACKLOG_CAP {
            self.overflow(&p.hdr);
            return;
        }
        self.deliver(dst, p);
    }

    /// The destination's backlog is full: the connection is reset on both sides and its
    /// queued packets are dropped.
    fn overflow(&mut self, h: &Hdr) {
        let (src, dst) = (h.src(), h.dst());
        log::warn!(
            "vsock: backlog of CID {} is full: resetting {src} -> {dst}",
            dst.cid
        );
        self.state.counters.backlog_overflows += 1;
        if let Some(key) = self.state.find(src, dst) {
            self.state.conns.remove(&key);
        }
        if let Some(b) = self.state.backlogs.get_mut(&dst.cid) {
            b.purge(|p| p.hdr.src() == src && p.hdr.dst() == dst);
        }
        self.send_rst(src, dst);
        self.send_rst(dst, src);
    }

    /// Sends an RST from `from` to `to` (if `to` is an attached partition).
    pub(crate) fn send_rst(&mut self, from: Endpoint, to: Endpoint) {
        if !self.ports.contains_key(&to.cid) {
            return;
        }
        self.state.counters.rst_sent += 1;
        self.deliver(
            to.cid,
            Pending::new(Hdr::new(from, to, op::RST), Vec::new()),
        );
    }

    /// Answers a packet with an RST to its sender.
    pub(crate) fn rst_reply(&mut self, h: &Hdr) {
        self.send_rst(h.dst(), h.src());
    }

    /// Appends a packet to `dst`'s backlog and delivers what fits into its RX queue. Guest
    /// data is held to [`BACKLOG_CAP`] by `forward` and host data by the bridge; packets the
    /// switch makes itself (RSTs, credit updates) may exceed it by [`CONTROL_SLACK`], beyond
    /// which they are dropped and counted (the guest is not draining its RX queue).
    pub(crate) fn deliver(&mut self, dst: u64, p: Pending) {
        let Some(b) = self.state.backlogs.get_mut(&dst) else {
            return;
        };
        if b.bytes + p.cost() > BACKLOG_CAP + CONTROL_SLACK {
            self.state.counters.backlog_drops += 1;
            return;
        }
        b.push(p);
        self.drain_rx(dst);
    }

    /// Moves `cid`'s backlog into its RX queue as far as buffers allow. While packets wait,
    /// the guest is asked to notify when it adds RX buffers; otherwise it is asked not to.
    pub(crate) fn drain_rx(&mut self, cid: u64) {
        if self.frozen > 0 {
            return;
        }
        let (Some(port), Some(backlog)) =
            (self.ports.get_mut(&cid), self.state.backlogs.get_mut(&cid))
        else {
            return;
        };
        let counters = &mut self.state.counters;
        let Some((mem, rx, irq)) = port.ready_queue(RX_QUEUE) else {
            return;
        };
        let mut used = false;
        // Re-enabling notifications finds late buffers; bounded in case the ring misbehaves.
        for _ in 0..4 {
            while !backlog.packets.is_empty() {
                let chain = match rx.iter(mem) {
                    Ok(mut it) => it.next(),
                    Err(e) => {
                        log::debug!("vsock: CID {cid} RX queue: {e}");
                        counters.malformed_rx += 1;
                        break;
                    }
                };
                let Some(mut chain) = chain else {
                    break;
                };
                let head = chain.head_index();
                let mut used_len = 0;
                match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                    Ok(mut pkt) => match backlog.packets.front().map(|p| p.write_into(&mut pkt)) {
                        Some(Ok((len, payload))) => {
                            used_len = len;
                            backlog.advance_front(payload);
                            counters.rx_packets += 1;
                        }
                        Some(Err(e)) => {
                            log::debug!("vsock: CID {cid}: RX buffer: {e}");
                            counters.malformed_rx += 1;
                        }
                        None => {}
                    },
                    Err(e) => {
                        log::debug!("vsock: CID {cid}: malformed RX chain: {e}");
                        counters.malformed_rx += 1;
                    }
                }
                if rx.add_used(mem, head, used_len).is_err() {
                    counters.malformed_rx += 1;
                } else {
                    used = true;
                }
            }
            if backlog.packets.is_empty() {
                let _ = rx.disable_notification(mem);
                break;
            }
            // Buffers may have been added between the last look and re-enabling.
            match rx.enable_notification(mem) {
                Ok(true) if rx.iter(mem).is_ok() => continue,
                _ => break,
            }
        }
        if used {
            self.to_notify.push(irq.clone());
            // Room in the backlog may let host connections read again.
            self.refresh_host_interest(cid);
        }
    }

    /// Ends every connection `cid` takes part in: partition peers get an RST from `cid`'s
    /// endpoint, host sockets are closed.
    pub(crate) fn drop_conns_of(&mut self, cid: u64) {
        let keys: Vec<ConnKey> = self
            .state
            .conns
            .iter()
            .filter(|(_, c)| c.involves(cid))
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            let Some(conn) = self.state.conns.remove(&key) else {
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
    pub(crate) fn reset_after_panic(&mut self) {
        log::error!("vsock: an update of the switch panicked; resetting every connection");
        self.to_notify.clear();
        for b in self.state.backlogs.values_mut() {
            b.clear();
        }
        let conns = std::mem::take(&mut self.state.conns);
        for conn in conns.values() {
            if let Some(link) = &conn.host {
                self.bridge.close(link.token, None);
            }
            for (me, peer) in [(conn.client, conn.server), (conn.server, conn.client)] {
                if peer.cid != HOST_CID && me.cid != peer.cid {
                    self.send_rst(me, peer);
                }
            }
        }
        for token in self.bridge.tokens_of(None) {
            self.bridge.close(token, None);
        }
        self.state.counters.panics_recovered += 1;
    }

    pub fn stats(&self) -> VsockStats {
        let partitions: Vec<PortStats> = self
            .ports
            .iter()
            .map(|(&cid, p)| {
                let b = self.state.backlogs.get(&cid);
                PortStats {
                    cid,
                    name: p.name.clone(),
                    active: p.queues.is_some(),
                    uds: p.uds.clone(),
                    backlog_bytes: b.map_or(0, |b| b.bytes),
                    backlog_packets: b.map_or(0, |b| b.packets.len()),
                }
            })
            .collect();
        let connection_list: Vec<ConnStats> = self
            .state
            .conns
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
            counters: self.state.counters.clone(),
        }
    }
}
