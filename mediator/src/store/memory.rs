//! The in-memory [`Store`]: for unit tests (and `"db": null` in a mediator's
//! configuration); nothing survives the process.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use super::{
    Lease, NewTunnel, SleepLease, Store, StoreError, Transition, TunnelRecord, TunnelState,
};

#[derive(Default)]
struct Inner {
    leases: BTreeMap<String, Lease>,
    sleep: BTreeMap<String, SleepLease>,
    tunnels: BTreeMap<u64, TunnelRecord>,
    max_session: u64,
}

/// A [`Store`] in a mutex.
#[derive(Default)]
pub struct MemoryStore(Mutex<Inner>);

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data: go on with it.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Store for MemoryStore {
    fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        Ok(self.lock().leases.values().cloned().collect())
    }

    fn put_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        let mut g = self.lock();
        g.max_session = g.max_session.max(lease.session_id);
        g.leases.insert(lease.relay_id.clone(), lease.clone());
        Ok(())
    }

    fn touch_leases(&self, heard: &[(String, u64, u64)]) -> Result<(), StoreError> {
        let mut g = self.lock();
        for (relay, session, at) in heard {
            if let Some(l) = g.leases.get_mut(relay) {
                if l.session_id == *session {
                    l.last_heard_ms = *at;
                }
            }
        }
        Ok(())
    }

    fn end_lease(
        &self,
        relay_id: &str,
        session_id: u64,
        last_heard_ms: u64,
    ) -> Result<(), StoreError> {
        if let Some(l) = self.lock().leases.get_mut(relay_id) {
            if l.session_id == session_id {
                l.online = false;
                l.last_heard_ms = last_heard_ms;
            }
        }
        Ok(())
    }

    fn max_session_id(&self) -> Result<u64, StoreError> {
        Ok(self.lock().max_session)
    }

    fn create_tunnel(&self, new: &NewTunnel) -> Result<TunnelRecord, StoreError> {
        let mut g = self.lock();
        let tunnel_id = g.tunnels.keys().next_back().map_or(1, |k| k + 1);
        let rec = TunnelRecord {
            tunnel_id,
            device_id: new.device_id.clone(),
            relay_id: new.relay_id.clone(),
            cloud: new.cloud.clone(),
            dial: new.dial,
            state: TunnelState::Pending,
            created_ms: new.created_ms,
            expires_ms: new.expires_ms,
            offered_ms: None,
            opened_ms: None,
            closed_ms: None,
            jobs: Vec::new(),
            error: None,
            ticket: None,
            wake: None,
        };
        g.tunnels.insert(tunnel_id, rec.clone());
        Ok(rec)
    }

    fn tunnel(&self, tunnel_id: u64) -> Result<Option<TunnelRecord>, StoreError> {
        Ok(self.lock().tunnels.get(&tunnel_id).cloned())
    }

    fn waiting_for_device(&self, device_id: &str) -> Result<usize, StoreError> {
        Ok(self
            .lock()
            .tunnels
            .values()
            .filter(|r| r.device_id == device_id && r.state.is_unfinished())
            .count())
    }

    fn busy_for_relay(&self, relay_id: &str) -> Result<usize, StoreError> {
        Ok(self
            .lock()
            .tunnels
            .values()
            .filter(|r| {
                r.relay_id == relay_id && (r.state.is_unfinished() || r.state == TunnelState::Open)
            })
            .count())
    }

    fn waking(&self) -> Result<Vec<TunnelRecord>, StoreError> {
        Ok(self
            .lock()
            .tunnels
            .values()
            .filter(|r| r.state == TunnelState::Waking)
            .cloned()
            .collect())
    }

    fn sleep_leases(&self) -> Result<Vec<SleepLease>, StoreError> {
        Ok(self.lock().sleep.values().cloned().collect())
    }

    fn put_sleep_lease(&self, lease: &SleepLease) -> Result<(), StoreError> {
        self.lock()
            .sleep
            .insert(lease.relay_id.clone(), lease.clone());
        Ok(())
    }

    fn clear_sleep_lease(&self, relay_id: &str) -> Result<bool, StoreError> {
        Ok(self.lock().sleep.remove(relay_id).is_some())
    }

    fn waiting_for_relay(&self, relay_id: &str) -> Result<Vec<TunnelRecord>, StoreError> {
        Ok(self
            .lock()
            .tunnels
            .values()
            .filter(|r| r.relay_id == relay_id && r.state.is_waiting())
            .cloned()
            .collect())
    }

    fn update_tunnel(
        &self,
        tunnel_id: u64,
        relay_id: Option<&str>,
        t: Transition,
    ) -> Result<TunnelRecord, StoreError> {
        let mut g = self.lock();
        let rec = g
            .tunnels
            .get_mut(&tunnel_id)
            .filter(|r| relay_id.is_none_or(|id| r.relay_id == id))
            .ok_or(StoreError::UnknownTunnel(tunnel_id))?;
        rec.apply(t)?;
        Ok(rec.clone())
    }

    fn expire_due(&self, now_ms: u64) -> Result<Vec<u64>, StoreError> {
        let mut g = self.lock();
        let mut done = Vec::new();
        for rec in g.tunnels.values_mut() {
            if rec.state.is_unfinished() && rec.expires_ms <= now_ms {
                rec.apply(Transition::Expired { at: now_ms })?;
                done.push(rec.tunnel_id);
            }
        }
        Ok(done)
    }
}
