//! The router: the attached partitions' queues in guest memory and their backlogs. It
//! takes packets out of TX queues (within a work budget per pass), and moves backlogged
//! packets into RX queues as buffers allow. It knows nothing of connections: the switch
//! (`switch.rs`) decides what goes where, the router carries it.

use crate::GuestMemoryMmap;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;

use super::backlog::{DestBacklog, FlowKey};
use super::limits::{UdsConfig, RX_QUEUE, TX_BUDGET_BYTES, TX_BUDGET_CHAINS, TX_QUEUE};
use super::packet::{Pending, MAX_PKT_DATA};
use super::state::{Backlog, PortStats, VsockCounters};
use crate::virtio::mmio::QueueSnapshot;
use crate::virtio::Interrupt;

/// A partition's side of the switch, built before it is attached (a cold attach, or a
/// restored device prepared before the restore commits: see `VsockSwitch::replace`).
pub(crate) struct PreparedPort {
    cid: u64,
    attach_id: u64,
    name: String,
    mem: GuestMemoryMmap,
    irq: Arc<Interrupt>,
    uds: UdsConfig,
    queues: Option<Vec<Queue>>,
}

impl std::fmt::Debug for PreparedPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedPort")
            .field("cid", &self.cid)
            .field("attach_id", &self.attach_id)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl PreparedPort {
    pub fn new(
        (cid, attach_id): (u64, u64),
        name: &str,
        mem: GuestMemoryMmap,
        irq: Arc<Interrupt>,
        uds: UdsConfig,
        queues: Option<Vec<Queue>>,
    ) -> Self {
        PreparedPort {
            cid,
            attach_id,
            name: name.to_owned(),
            mem,
            irq,
            uds,
            queues,
        }
    }

    pub fn cid(&self) -> u64 {
        self.cid
    }

    pub fn uds(&self) -> &UdsConfig {
        &self.uds
    }
}

/// The router: ports, backlogs and prepared ports.
#[derive(Default)]
pub(crate) struct Router {
    /// Attached partitions (a port is a [`PreparedPort`] put in).
    ports: BTreeMap<u64, PreparedPort>,
    /// Backlog per destination CID (present for every attached CID, and between a
    /// restored state and its partitions' attachment).
    backlogs: BTreeMap<u64, DestBacklog>,
    /// Restored devices' sides, prepared but not yet put in, by attachment id.
    pending: BTreeMap<u64, PreparedPort>,
    /// Interrupts to raise once the switch's lock is released.
    to_notify: Vec<Arc<Interrupt>>,
    /// Partitions whose TX queue still had chains when a pass ran out of budget.
    tx_left: BTreeSet<u64>,
    next_attach_id: u64,
    /// While positive nothing is written into guest memory.
    frozen: u32,
}

impl Router {
    /// A new attachment id.
    pub fn reserve_attach_id(&mut self) -> u64 {
        self.next_attach_id += 1;
        self.next_attach_id
    }

    pub fn is_attached(&self, cid: u64) -> bool {
        self.ports.contains_key(&cid)
    }

    /// Whether `cid` is attachment `attach_id`.
    pub fn is_attachment(&self, cid: u64, attach_id: u64) -> bool {
        self.ports
            .get(&cid)
            .is_some_and(|p| p.attach_id == attach_id)
    }

    pub fn attached(&self) -> Vec<u64> {
        self.ports.keys().copied().collect()
    }

    pub fn uds_of(&self, cid: u64) -> Option<&UdsConfig> {
        self.ports.get(&cid).map(|p| &p.uds)
    }

    /// Puts a port in (its backlog is created if missing).
    pub fn add_port(&mut self, port: PreparedPort) {
        log::info!("vsock: {} attached as CID {}", port.name, port.cid);
        self.backlogs.entry(port.cid).or_default();
        self.tx_left.remove(&port.cid);
        self.ports.insert(port.cid, port);
    }

    /// Takes a port out, with its backlog; returns its name.
    pub fn remove_port(&mut self, cid: u64) -> Option<String> {
        self.backlogs.remove(&cid);
        self.tx_left.remove(&cid);
        self.ports.remove(&cid).map(|p| p.name)
    }

    pub fn add_pending(&mut self, port: PreparedPort) {
        self.pending.insert(port.attach_id, port);
    }

    pub fn take_pending(&mut self, attach_id: u64) -> Option<PreparedPort> {
        self.pending.remove(&attach_id)
    }

    pub fn pending(&self, attach_id: u64) -> Option<&PreparedPort> {
        self.pending.get(&attach_id)
    }

    #[cfg(test)]
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// The driver started the device.
    pub fn activate(
        &mut self,
        cid: u64,
        attach_id: u64,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: Arc<Interrupt>,
    ) -> bool {
        let Some(port) = self
            .ports
            .get_mut(&cid)
            .filter(|p| p.attach_id == attach_id)
        else {
            return false;
        };
        port.mem = mem;
        port.irq = irq;
        port.queues = Some(queues);
        true
    }

    /// The driver stopped the device: its queues and backlog go. False if it was not
    /// started (or is not attachment `attach_id`).
    pub fn reset(&mut self, cid: u64, attach_id: u64) -> bool {
        let Some(port) = self
            .ports
            .get_mut(&cid)
            .filter(|p| p.attach_id == attach_id)
        else {
            return false;
        };
        if port.queues.take().is_none() {
            return false;
        }
        if let Some(b) = self.backlogs.get_mut(&cid) {
            b.clear();
        }
        self.tx_left.remove(&cid);
        true
    }

    pub fn queue_snapshots(&self, cid: u64, attach_id: u64) -> Option<Vec<QueueSnapshot>> {
        let port = self.ports.get(&cid).filter(|p| p.attach_id == attach_id)?;
        Some(
            port.queues
                .as_ref()?
                .iter()
                .map(QueueSnapshot::of)
                .collect(),
        )
    }

    pub fn freeze(&mut self) {
        self.frozen += 1;
    }

    /// One freeze fewer; true when the last is gone.
    pub fn thaw(&mut self) -> bool {
        self.frozen = self.frozen.saturating_sub(1);
        self.frozen == 0
    }

    pub fn frozen(&self) -> bool {
        self.frozen > 0
    }

    pub fn take_notify(&mut self) -> Vec<Arc<Interrupt>> {
        std::mem::take(&mut self.to_notify)
    }

    /// The partitions whose TX queues a pass left chains in (the set is emptied).
    pub fn take_tx_left(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.tx_left).into_iter().collect()
    }

    pub fn has_tx_left(&self) -> bool {
        !self.tx_left.is_empty()
    }

    /// One pass over `cid`'s TX queue: at most [`TX_BUDGET_CHAINS`] chains and about
    /// [`TX_BUDGET_BYTES`] of payload. Returns the packets in order; if chains are left,
    /// `cid` is noted (see [`Router::take_tx_left`]).
    pub fn take_tx(&mut self, cid: u64, counters: &mut VsockCounters) -> Vec<Pending> {
        let mut packets = Vec::new();
        if self.frozen() {
            return packets;
        }
        let Some(port) = self.ports.get_mut(&cid) else {
            return packets;
        };
        let (mem, irq) = (&port.mem, &port.irq);
        let Some(tx) = ready_queue(&mut port.queues, TX_QUEUE) else {
            return packets;
        };
        let (mut used, mut bytes, mut chains) = (false, 0usize, 0usize);
        while chains < TX_BUDGET_CHAINS && bytes < TX_BUDGET_BYTES {
            let chain = match tx.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    // A broken ring is not followed (nor retried before the next notify).
                    log::debug!("vsock: CID {cid} TX queue: {e}");
                    counters.malformed_tx += 1;
                    break;
                }
            };
            let Some(mut chain) = chain else {
                break;
            };
            chains += 1;
            let head = chain.head_index();
            match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA)
                .map_err(|e| e.to_string())
                .and_then(|p| Pending::from_tx(&p).map_err(|e| e.to_string()))
            {
                Ok(p) => {
                    bytes += p.data.len();
                    packets.push(p);
                }
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
        let exhausted = chains >= TX_BUDGET_CHAINS || bytes >= TX_BUDGET_BYTES;
        let more = tx
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != tx.next_avail());
        if exhausted && more {
            counters.tx_deferred += 1;
            self.tx_left.insert(cid);
        }
        counters.tx_packets += packets.len() as u64;
        if used {
            self.to_notify.push(irq.clone());
        }
        packets
    }

    pub fn backlog_bytes(&self, cid: u64) -> Option<usize> {
        self.backlogs.get(&cid).map(DestBacklog::bytes)
    }

    pub fn flow_bytes(&self, cid: u64, key: &FlowKey) -> usize {
        self.backlogs.get(&cid).map_or(0, |b| b.flow_bytes(key))
    }

    pub fn source_bytes(&self, cid: u64, source: u64) -> usize {
        self.backlogs
            .get(&cid)
            .map_or(0, |b| b.source_bytes(source))
    }

    /// Queues `p` for `dst` unless its backlog would exceed `cap` bytes (false: dropped,
    /// or `dst` has no backlog). Nothing is delivered yet (see [`Router::drain_rx`]).
    pub fn enqueue(&mut self, dst: u64, p: Pending, cap: usize) -> bool {
        let Some(b) = self.backlogs.get_mut(&dst) else {
            return false;
        };
        if b.bytes() + p.cost() > cap {
            return false;
        }
        b.push(p);
        true
    }

    pub fn purge_flow(&mut self, dst: u64, key: &FlowKey) {
        if let Some(b) = self.backlogs.get_mut(&dst) {
            b.purge_flow(key);
        }
    }

    pub fn clear_backlogs(&mut self) {
        for b in self.backlogs.values_mut() {
            b.clear();
        }
    }

    /// The backlogs as saved.
    pub fn saved_backlogs(&self) -> BTreeMap<u64, Backlog> {
        self.backlogs
            .iter()
            .map(|(&cid, b)| {
                let backlog = Backlog {
                    packets: b.to_packets(),
                    bytes: b.bytes(),
                };
                (cid, backlog)
            })
            .collect()
    }

    /// Replaces every backlog by saved ones (ports stay as they are).
    pub fn set_backlogs(&mut self, saved: &BTreeMap<u64, Backlog>) {
        self.backlogs = saved
            .iter()
            .map(|(&cid, b)| (cid, DestBacklog::from_packets(&b.packets)))
            .collect();
    }

    /// Moves `cid`'s backlog into its RX queue as far as buffers allow, each buffer to
    /// the next flow in turn (see `backlog.rs`). While packets wait, the guest is asked to
    /// notify when it adds RX buffers; otherwise it is asked not to. True if buffers were
    /// used.
    pub fn drain_rx(&mut self, cid: u64, counters: &mut VsockCounters) -> bool {
        if self.frozen() {
            return false;
        }
        let (Some(port), Some(backlog)) = (self.ports.get_mut(&cid), self.backlogs.get_mut(&cid))
        else {
            return false;
        };
        let (mem, irq) = (&port.mem, &port.irq);
        let Some(rx) = ready_queue(&mut port.queues, RX_QUEUE) else {
            return false;
        };
        let mut used = false;
        // Re-enabling notifications finds late buffers; bounded in case the ring misbehaves.
        for _ in 0..4 {
            while let Some(flow) = backlog.next_flow() {
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
                    Ok(mut pkt) => match backlog.head(&flow).map(|p| p.write_into(&mut pkt)) {
                        Some(Ok((len, payload))) => {
                            used_len = len;
                            backlog.advance(&flow, payload);
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
            if backlog.is_empty() {
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
        }
        used
    }

    /// What `status` shows of each attached partition.
    pub fn port_stats(&self) -> Vec<PortStats> {
        self.ports
            .iter()
            .map(|(&cid, p)| {
                let b = self.backlogs.get(&cid);
                PortStats {
                    cid,
                    name: p.name.clone(),
                    active: p.queues.is_some(),
                    uds: p.uds.path.clone(),
                    backlog_bytes: b.map_or(0, DestBacklog::bytes),
                    backlog_packets: b.map_or(0, DestBacklog::packets),
                }
            })
            .collect()
    }
}

/// Queue `index` of a started device, once the driver made it ready.
fn ready_queue(queues: &mut Option<Vec<Queue>>, index: u16) -> Option<&mut Queue> {
    let queue = queues.as_mut()?.get_mut(usize::from(index))?;
    queue.ready().then_some(queue)
}
