//! The switch side of snapshots: validating a saved [`SwitchState`], putting it back (with
//! the two host-socket cases: same process or new process), detaching partitions quietly
//! before a restore, attaching restored partitions with their live queues, and the freeze
//! that keeps guest memory still while a cut is taken. The public API is in `persist`.

use crate::GuestMemoryMmap;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use virtio_queue::Queue;

use super::bridge::Phase;
use super::host::{ERR_UNAVAILABLE, MAX_CONNECT_LINE};
use super::packet::{op, Pending, HOST_CID, MAX_PKT_DATA, TYPE_STREAM};
use super::state::{ConnKey, HostOrigin, SwitchState};
use super::switch::{Inner, CONTROL_SLACK, FIRST_HOST_PORT};
use super::{VsockError, BACKLOG_CAP, HOST_BUF_ALLOC, MAX_CONNS_PER_CID, MIN_GUEST_CID};

/// A restored partition's side of the switch, built before anything live changes and put
/// in by `VsockSwitch::replace` (its attachment id is reserved, so its device already
/// knows it; until then the device's notifications are ignored).
pub(crate) struct PreparedPort {
    pub(crate) cid: u64,
    pub(crate) attach_id: u64,
    pub(crate) name: String,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) irq: Arc<Interrupt>,
    pub(crate) uds: Option<PathBuf>,
    pub(crate) queues: Option<Vec<Queue>>,
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
use crate::virtio::mmio::QueueSnapshot;
use crate::virtio::Interrupt;

/// Whether `cid` can be a partition's.
fn guest_cid(cid: u64) -> bool {
    (MIN_GUEST_CID..u64::from(u32::MAX)).contains(&cid)
}

/// Checks a saved switch state: every packet and connection is one the switch could have
/// made, within its caps. Returns what is wrong.
pub(crate) fn validate(set: &SwitchState) -> Result<(), String> {
    for (&cid, backlog) in &set.backlogs {
        if !guest_cid(cid) {
            return Err(format!("backlog of reserved CID {cid}"));
        }
        let mut bytes = 0usize;
        for p in &backlog.packets {
            validate_packet(cid, p)?;
            bytes += p.cost();
        }
        if bytes > BACKLOG_CAP + CONTROL_SLACK {
            return Err(format!(
                "backlog of CID {cid} holds {bytes} bytes, over its cap"
            ));
        }
    }
    let mut per_cid: BTreeMap<u64, usize> = BTreeMap::new();
    for (key, c) in &set.conns {
        let name = format!("connection {} -> {}", c.client, c.server);
        if *key != (c.client, c.server) {
            return Err(format!("{name}: key does not match"));
        }
        let hosts = [c.client, c.server]
            .iter()
            .filter(|e| e.cid == HOST_CID)
            .count();
        for side in [c.client, c.server] {
            if side.cid == HOST_CID {
                continue;
            }
            if !set.backlogs.contains_key(&side.cid) {
                return Err(format!("{name}: CID {} was not attached", side.cid));
            }
            let n = per_cid.entry(side.cid).or_default();
            *n += 1;
            if *n > MAX_CONNS_PER_CID {
                return Err(format!("CID {} has too many connections", side.cid));
            }
        }
        match (hosts, &c.host) {
            (0, None) => {}
            (1, Some(link)) => {
                let origin_ok = match link.origin {
                    HostOrigin::Connect => c.client.cid == HOST_CID,
                    HostOrigin::Guest => c.server.cid == HOST_CID,
                };
                if !origin_ok {
                    return Err(format!("{name}: host side does not match its origin"));
                }
                if link.buf_alloc == 0 || link.buf_alloc > HOST_BUF_ALLOC {
                    return Err(format!("{name}: host buffer of {} bytes", link.buf_alloc));
                }
                if link.to_host.len() > link.buf_alloc as usize {
                    return Err(format!("{name}: more bytes for the host than its buffer"));
                }
                if link.early_data.len() > MAX_CONNECT_LINE {
                    return Err(format!("{name}: too much early host data"));
                }
            }
            _ => return Err(format!("{name}: host link does not match its endpoints")),
        }
    }
    if set.next_host_port < FIRST_HOST_PORT {
        return Err(format!("next host port {} is too low", set.next_host_port));
    }
    Ok(())
}

/// A queued packet is one the switch could have queued for `cid`.
fn validate_packet(cid: u64, p: &Pending) -> Result<(), String> {
    let h = &p.hdr;
    let what = format!(
        "packet {} -> {} op {} in CID {cid}'s backlog",
        h.src(),
        h.dst(),
        h.op
    );
    let ok = h.dst_cid == cid
        && h.type_ == TYPE_STREAM
        && (op::REQUEST..=op::CREDIT_REQUEST).contains(&h.op)
        && p.data.len() <= MAX_PKT_DATA as usize
        && h.len as usize == p.data.len()
        && (p.data.is_empty() || h.op == op::RW)
        && (p.sent < p.data.len() || (p.sent == 0 && p.data.is_empty()));
    if ok {
        Ok(())
    } else {
        Err(format!("{what} is not valid"))
    }
}

impl Inner {
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
        let port = self.ports.remove(&cid);
        self.state
            .conns
            .retain(|_, c| !c.involves(cid) || c.host.is_some());
        self.state.backlogs.remove(&cid);
        for token in self.bridge.tokens_of(cid) {
            if self.bridge.phase(token) == Some(Phase::Line) {
                self.bridge.close(token, Some(ERR_UNAVAILABLE));
            }
        }
        if let Some(port) = port {
            log::info!("vsock: {} (CID {cid}) detached for a restore", port.name);
        }
    }

    /// Puts a saved state back (see `VsockSwitch::restore_state`).
    pub fn restore_state(
        &mut self,
        set: &SwitchState,
        keep_host_sockets: bool,
    ) -> Result<(), VsockError> {
        validate(set).map_err(VsockError::InvalidState)?;
        if let Some(&cid) = self.ports.keys().next() {
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
        if let Some(id) = attach_ids.iter().find(|id| !self.pending.contains_key(id)) {
            return Err(VsockError::InvalidState(format!(
                "device attachment {id} was not prepared (or was dropped)"
            )));
        }
        let ports: Vec<&PreparedPort> = attach_ids
            .iter()
            .filter_map(|id| self.pending.get(id))
            .collect();
        let mut cids = BTreeSet::new();
        for p in &ports {
            if !guest_cid(p.cid) {
                return Err(VsockError::ReservedCid(p.cid));
            }
            if !cids.insert(p.cid) {
                return Err(VsockError::DuplicateCid(p.cid));
            }
        }
        if let Some(cid) = set.backlogs.keys().find(|c| !cids.contains(c)) {
            return Err(VsockError::InvalidState(format!(
                "the state has a backlog for CID {cid}, which no restored partition has"
            )));
        }
        // Listeners: one already open for the same CID and path is kept (an in-place reboot
        // never closes its host sockets' listener); the others are bound now.
        let wanted: BTreeMap<u64, Option<PathBuf>> =
            ports.iter().map(|p| (p.cid, p.uds.clone())).collect();
        let mut bound: Vec<(u64, PathBuf)> = Vec::new();
        for (&cid, uds) in &wanted {
            let Some(path) = uds else { continue };
            if self.bridge.listens(cid, path) {
                continue;
            }
            if let Err(e) = self.bridge.bind(cid, path) {
                for (cid, path) in bound {
                    self.bridge.close_listener(cid, &path);
                }
                return Err(e);
            }
            bound.push((cid, path.to_path_buf()));
        }
        // Nothing below fails.
        let ports: Vec<PreparedPort> = attach_ids
            .iter()
            .filter_map(|id| self.pending.remove(id))
            .collect();
        self.bridge.retain_listeners(|cid, path| {
            wanted.get(&cid).is_some_and(|u| u.as_deref() == Some(path))
        });
        let old: Vec<u64> = self.ports.keys().copied().collect();
        for cid in old {
            self.remove_for_restore(cid);
        }
        self.apply_state(set, keep_host_sockets);
        for p in ports {
            self.state.backlogs.entry(p.cid).or_default();
            self.insert_bound_port(p);
        }
        for cid in cids {
            self.drain_rx(cid);
            self.refresh_host_interest(cid);
        }
        Ok(())
    }

    /// The state part of a restore, once it is validated and no partition is attached.
    fn apply_state(&mut self, set: &SwitchState, keep_host_sockets: bool) {
        let live = std::mem::replace(&mut self.state, set.clone());
        for b in self.state.backlogs.values_mut() {
            b.bytes = b.packets.iter().map(Pending::cost).sum();
        }
        let host_keys: Vec<ConnKey> = self
            .state
            .conns
            .iter()
            .filter(|(_, c)| c.host.is_some())
            .map(|(k, _)| *k)
            .collect();
        let mut kept = BTreeSet::new();
        for key in host_keys {
            let Some(conn) = self.state.conns.get(&key) else {
                continue;
            };
            let Some(token) = conn.host.as_ref().map(|l| l.token) else {
                continue;
            };
            // The socket is kept only if nothing happened on the connection since the cut:
            // otherwise bytes crossed the socket that the restored guests do not know of.
            let unchanged = live.conns.get(&key) == Some(conn)
                && self.bridge.phase(token) == Some(Phase::Linked(key));
            if keep_host_sockets && unchanged {
                kept.insert(token);
                continue;
            }
            log::info!(
                "vsock: host connection {} -> {} is reset by the restore",
                conn.client,
                conn.server
            );
            // RST from the host side, queued for the guest's resume.
            self.send_to_guest(key, op::RST, 0, Vec::new());
            self.state.conns.remove(&key);
        }
        // Sockets gone from the set, opened after the cut, or from another process's set.
        for token in self.bridge.tokens_of(None) {
            if !kept.contains(&token) {
                self.bridge.close(token, None);
            }
        }
        for token in kept {
            self.update_interest(token);
        }
    }

    /// The live queues of `cid`'s device (attachment `attach_id`), if it is started.
    pub fn queue_snapshots(&mut self, cid: u64, attach_id: u64) -> Option<Vec<QueueSnapshot>> {
        let port = self.port_mut(cid, attach_id)?;
        let queues = port.queues.as_ref()?;
        Some(queues.iter().map(QueueSnapshot::of).collect())
    }

    /// One freeze fewer; at the last, does what waited: TX chains and RX deliveries of
    /// every partition, and host sockets' events.
    pub fn thaw(&mut self) {
        self.frozen = self.frozen.saturating_sub(1);
        if self.frozen > 0 {
            return;
        }
        let cids: Vec<u64> = self.ports.keys().copied().collect();
        for cid in cids {
            self.process_tx(cid);
            self.drain_rx(cid);
        }
        for token in self.bridge.tokens_of(None) {
            self.update_interest(token);
        }
        // Sockets and listeners the loop took out while frozen go back in.
        self.bridge.touch_all();
    }
}
