//! The SQLite [`Store`] (rusqlite, bundled SQLite): WAL journal, `synchronous = NORMAL`,
//! one connection behind a mutex (callers are on tokio's blocking pool). The schema is in
//! `docs/mediator.md#store`; opening a database marks every lease offline (no session
//! survives a restart) and brings a version 1 database to version 2 (the `wake` column,
//! the `sleep_leases` table). Sleep leases are kept: a sleeping relay still sleeps.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use duplex_tunnel::{Ticket, TicketBody};
use rusqlite::{params, Connection, Row};

use super::{
    ErrorInfo, Lease, NewTunnel, SleepLease, Store, StoreError, Transition, TunnelRecord,
    TunnelState, WakeInfo,
};
use crate::util::{mac_string, parse_mac};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS leases (
    relay_id      TEXT PRIMARY KEY,
    devices       TEXT NOT NULL,
    session_id    INTEGER NOT NULL,
    since_ms      INTEGER NOT NULL,
    last_heard_ms INTEGER NOT NULL,
    online        INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tunnels (
    tunnel_id     INTEGER PRIMARY KEY,
    device_id     TEXT NOT NULL,
    relay_id      TEXT NOT NULL,
    cloud         TEXT NOT NULL,
    dial          TEXT NOT NULL,
    state         TEXT NOT NULL,
    created_ms    INTEGER NOT NULL,
    expires_ms    INTEGER NOT NULL,
    offered_ms    INTEGER,
    opened_ms     INTEGER,
    closed_ms     INTEGER,
    error_code    TEXT,
    error_message TEXT,
    ticket_nonce  BLOB,
    ticket_mac    BLOB,
    wake          TEXT
);
CREATE TABLE IF NOT EXISTS sleep_leases (
    relay_id TEXT PRIMARY KEY,
    devices  TEXT NOT NULL,
    mac      TEXT NOT NULL,
    segment  TEXT NOT NULL,
    since_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS tunnels_by_relay ON tunnels (relay_id, state);
CREATE INDEX IF NOT EXISTS tunnels_by_device ON tunnels (device_id, state);
CREATE TABLE IF NOT EXISTS tunnel_jobs (
    tunnel_id INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    job_id    TEXT NOT NULL,
    PRIMARY KEY (tunnel_id, seq)
);
";

/// The schema's version (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 2;

const TUNNEL_COLUMNS: &str = "tunnel_id, device_id, relay_id, cloud, dial, state, created_ms, \
    expires_ms, offered_ms, opened_ms, closed_ms, error_code, error_message, ticket_nonce, ticket_mac, wake";

/// A [`Store`] in an SQLite file.
pub struct SqliteStore(Mutex<Connection>);

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn corrupt(column: &'static str, value: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        column,
        value: value.into(),
    }
}

/// The raw columns of a `tunnels` row, before the checks that can fail.
struct RawTunnel {
    id: i64,
    device_id: String,
    relay_id: String,
    cloud: String,
    dial: String,
    state: String,
    created_ms: i64,
    expires_ms: i64,
    offered_ms: Option<i64>,
    opened_ms: Option<i64>,
    closed_ms: Option<i64>,
    error_code: Option<String>,
    error_message: Option<String>,
    nonce: Option<Vec<u8>>,
    mac: Option<Vec<u8>>,
    wake: Option<String>,
}

impl RawTunnel {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<RawTunnel> {
        Ok(RawTunnel {
            id: r.get(0)?,
            device_id: r.get(1)?,
            relay_id: r.get(2)?,
            cloud: r.get(3)?,
            dial: r.get(4)?,
            state: r.get(5)?,
            created_ms: r.get(6)?,
            expires_ms: r.get(7)?,
            offered_ms: r.get(8)?,
            opened_ms: r.get(9)?,
            closed_ms: r.get(10)?,
            error_code: r.get(11)?,
            error_message: r.get(12)?,
            nonce: r.get(13)?,
            mac: r.get(14)?,
            wake: r.get(15)?,
        })
    }

    fn into_record(self, jobs: Vec<String>) -> Result<TunnelRecord, StoreError> {
        let state = TunnelState::from_name(&self.state)
            .ok_or_else(|| corrupt("state", self.state.clone()))?;
        let dial =
            crate::util::parse_v4(&self.dial).ok_or_else(|| corrupt("dial", self.dial.clone()))?;
        let tunnel_id = to_u64(self.id);
        let ticket = match (self.nonce, self.mac) {
            (Some(nonce), Some(mac)) => Some(Ticket {
                body: TicketBody {
                    tunnel_id,
                    relay_id: self.relay_id.clone(),
                    device_id: self.device_id.clone(),
                    nonce: nonce
                        .as_slice()
                        .try_into()
                        .map_err(|_| corrupt("ticket_nonce", format!("{} bytes", nonce.len())))?,
                    expires_ms: to_u64(self.expires_ms),
                },
                mac: mac
                    .as_slice()
                    .try_into()
                    .map_err(|_| corrupt("ticket_mac", format!("{} bytes", mac.len())))?,
            }),
            _ => None,
        };
        let error = match (self.error_code, self.error_message) {
            (Some(code), message) => Some(ErrorInfo {
                code,
                message: message.unwrap_or_default(),
            }),
            _ => None,
        };
        let wake = match self.wake {
            Some(text) => {
                Some(serde_json::from_str::<WakeInfo>(&text).map_err(|_| corrupt("wake", text))?)
            }
            None => None,
        };
        Ok(TunnelRecord {
            wake,
            tunnel_id,
            device_id: self.device_id,
            relay_id: self.relay_id,
            cloud: self.cloud,
            dial,
            state,
            created_ms: to_u64(self.created_ms),
            expires_ms: to_u64(self.expires_ms),
            offered_ms: self.offered_ms.map(to_u64),
            opened_ms: self.opened_ms.map(to_u64),
            closed_ms: self.closed_ms.map(to_u64),
            jobs,
            error,
            ticket,
        })
    }
}

impl SqliteStore {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open = || -> rusqlite::Result<Connection> {
            let conn = Connection::open(path)?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            conn.busy_timeout(std::time::Duration::from_secs(5))?;
            conn.execute_batch(SCHEMA)?;
            let has_wake: bool = conn.query_row(
                "SELECT COUNT(*) FROM pragma_table_info('tunnels') WHERE name = 'wake'",
                [],
                |r| r.get::<_, i64>(0).map(|n| n > 0),
            )?;
            if !has_wake {
                conn.execute("ALTER TABLE tunnels ADD COLUMN wake TEXT", [])?;
            }
            conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            conn.execute("UPDATE leases SET online = 0 WHERE online != 0", [])?;
            Ok(conn)
        };
        let conn = open().map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(SqliteStore(Mutex::new(conn)))
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn jobs_of(conn: &Connection, id: i64) -> Result<Vec<String>, StoreError> {
        let mut stmt = conn
            .prepare_cached("SELECT job_id FROM tunnel_jobs WHERE tunnel_id = ?1 ORDER BY seq")?;
        let jobs = stmt
            .query_map([id], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(jobs)
    }

    fn select(
        conn: &Connection,
        where_clause: &str,
        args: impl rusqlite::Params,
    ) -> Result<Vec<TunnelRecord>, StoreError> {
        let sql =
            format!("SELECT {TUNNEL_COLUMNS} FROM tunnels WHERE {where_clause} ORDER BY tunnel_id");
        let mut stmt = conn.prepare_cached(&sql)?;
        let raws = stmt
            .query_map(args, RawTunnel::from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        raws.into_iter()
            .map(|raw| {
                let jobs = Self::jobs_of(conn, raw.id)?;
                raw.into_record(jobs)
            })
            .collect()
    }

    fn save(conn: &Connection, rec: &TunnelRecord) -> Result<(), StoreError> {
        let id = to_i64(rec.tunnel_id);
        let wake = match &rec.wake {
            Some(w) => Some(serde_json::to_string(w).map_err(|e| corrupt("wake", e.to_string()))?),
            None => None,
        };
        conn.execute(
            "UPDATE tunnels SET state = ?2, expires_ms = ?3, offered_ms = ?4, opened_ms = ?5,
                 closed_ms = ?6, error_code = ?7, error_message = ?8, ticket_nonce = ?9,
                 ticket_mac = ?10, wake = ?11 WHERE tunnel_id = ?1",
            params![
                id,
                rec.state.name(),
                to_i64(rec.expires_ms),
                rec.offered_ms.map(to_i64),
                rec.opened_ms.map(to_i64),
                rec.closed_ms.map(to_i64),
                rec.error.as_ref().map(|e| e.code.as_str()),
                rec.error.as_ref().map(|e| e.message.as_str()),
                rec.ticket.as_ref().map(|t| t.body.nonce.to_vec()),
                rec.ticket.as_ref().map(|t| t.mac.to_vec()),
                wake,
            ],
        )?;
        conn.execute("DELETE FROM tunnel_jobs WHERE tunnel_id = ?1", [id])?;
        for (seq, job) in rec.jobs.iter().enumerate() {
            conn.execute(
                "INSERT INTO tunnel_jobs (tunnel_id, seq, job_id) VALUES (?1, ?2, ?3)",
                params![id, to_i64(seq as u64), job],
            )?;
        }
        Ok(())
    }
}

impl Store for SqliteStore {
    fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT relay_id, devices, session_id, since_ms, last_heard_ms, online FROM leases ORDER BY relay_id",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(relay_id, devices, session, since, heard, online)| {
                let devices: Vec<String> = serde_json::from_str(&devices)
                    .map_err(|_| corrupt("devices", devices.clone()))?;
                Ok(Lease {
                    relay_id,
                    devices,
                    session_id: to_u64(session),
                    since_ms: to_u64(since),
                    last_heard_ms: to_u64(heard),
                    online: online != 0,
                })
            })
            .collect()
    }

    fn put_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        let devices =
            serde_json::to_string(&lease.devices).map_err(|e| corrupt("devices", e.to_string()))?;
        self.lock().execute(
            "INSERT OR REPLACE INTO leases (relay_id, devices, session_id, since_ms, last_heard_ms, online)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                lease.relay_id,
                devices,
                to_i64(lease.session_id),
                to_i64(lease.since_ms),
                to_i64(lease.last_heard_ms),
                i64::from(lease.online)
            ],
        )?;
        Ok(())
    }

    fn touch_leases(&self, heard: &[(String, u64, u64)]) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE leases SET last_heard_ms = ?3 WHERE relay_id = ?1 AND session_id = ?2",
            )?;
            for (relay, session, at) in heard {
                stmt.execute(params![relay, to_i64(*session), to_i64(*at)])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn end_lease(
        &self,
        relay_id: &str,
        session_id: u64,
        last_heard_ms: u64,
    ) -> Result<(), StoreError> {
        self.lock().execute(
            "UPDATE leases SET online = 0, last_heard_ms = ?3 WHERE relay_id = ?1 AND session_id = ?2",
            params![relay_id, to_i64(session_id), to_i64(last_heard_ms)],
        )?;
        Ok(())
    }

    fn max_session_id(&self) -> Result<u64, StoreError> {
        let max: Option<i64> =
            self.lock()
                .query_row("SELECT MAX(session_id) FROM leases", [], |r| r.get(0))?;
        Ok(max.map_or(0, to_u64))
    }

    fn create_tunnel(&self, new: &NewTunnel) -> Result<TunnelRecord, StoreError> {
        let conn = self.lock();
        conn.execute(
            "INSERT INTO tunnels (device_id, relay_id, cloud, dial, state, created_ms, expires_ms)
             VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?6)",
            params![
                new.device_id,
                new.relay_id,
                new.cloud,
                new.dial.to_string(),
                to_i64(new.created_ms),
                to_i64(new.expires_ms)
            ],
        )?;
        let id = conn.last_insert_rowid();
        Self::select(&conn, "tunnel_id = ?1", [id])?
            .pop()
            .ok_or(StoreError::UnknownTunnel(to_u64(id)))
    }

    fn tunnel(&self, tunnel_id: u64) -> Result<Option<TunnelRecord>, StoreError> {
        let conn = self.lock();
        Ok(Self::select(&conn, "tunnel_id = ?1", [to_i64(tunnel_id)])?.pop())
    }

    fn waiting_for_device(&self, device_id: &str) -> Result<usize, StoreError> {
        let n: i64 = self.lock().query_row(
            "SELECT COUNT(*) FROM tunnels WHERE device_id = ?1 AND state IN ('pending', 'waking', 'offered')",
            [device_id],
            |r| r.get(0),
        )?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    fn busy_for_relay(&self, relay_id: &str) -> Result<usize, StoreError> {
        let n: i64 = self.lock().query_row(
            "SELECT COUNT(*) FROM tunnels WHERE relay_id = ?1
                 AND state IN ('pending', 'waking', 'offered', 'open')",
            [relay_id],
            |r| r.get(0),
        )?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    fn waking(&self) -> Result<Vec<TunnelRecord>, StoreError> {
        let conn = self.lock();
        Self::select(&conn, "state = 'waking'", [])
    }

    fn sleep_leases(&self) -> Result<Vec<SleepLease>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT relay_id, devices, mac, segment, since_ms FROM sleep_leases ORDER BY relay_id",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(relay_id, devices, mac, segment, since)| {
                let devices: Vec<String> = serde_json::from_str(&devices)
                    .map_err(|_| corrupt("sleep_leases.devices", devices.clone()))?;
                let mac = parse_mac(&mac).ok_or_else(|| corrupt("sleep_leases.mac", mac))?;
                Ok(SleepLease {
                    relay_id,
                    devices,
                    mac,
                    segment,
                    since_ms: to_u64(since),
                })
            })
            .collect()
    }

    fn put_sleep_lease(&self, lease: &SleepLease) -> Result<(), StoreError> {
        let devices = serde_json::to_string(&lease.devices)
            .map_err(|e| corrupt("sleep_leases.devices", e.to_string()))?;
        self.lock().execute(
            "INSERT OR REPLACE INTO sleep_leases (relay_id, devices, mac, segment, since_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                lease.relay_id,
                devices,
                mac_string(&lease.mac),
                lease.segment,
                to_i64(lease.since_ms)
            ],
        )?;
        Ok(())
    }

    fn clear_sleep_lease(&self, relay_id: &str) -> Result<bool, StoreError> {
        let n = self
            .lock()
            .execute("DELETE FROM sleep_leases WHERE relay_id = ?1", [relay_id])?;
        Ok(n > 0)
    }

    fn waiting_for_relay(&self, relay_id: &str) -> Result<Vec<TunnelRecord>, StoreError> {
        let conn = self.lock();
        Self::select(
            &conn,
            "relay_id = ?1 AND state IN ('pending', 'offered')",
            [relay_id],
        )
    }

    fn update_tunnel(
        &self,
        tunnel_id: u64,
        relay_id: Option<&str>,
        t: Transition,
    ) -> Result<TunnelRecord, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let mut rec = Self::select(&tx, "tunnel_id = ?1", [to_i64(tunnel_id)])?
            .pop()
            .filter(|r| relay_id.is_none_or(|id| r.relay_id == id))
            .ok_or(StoreError::UnknownTunnel(tunnel_id))?;
        if rec.apply(t)? {
            Self::save(&tx, &rec)?;
        }
        tx.commit()?;
        Ok(rec)
    }

    fn expire_due(&self, now_ms: u64) -> Result<Vec<u64>, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let due = Self::select(
            &tx,
            "state IN ('pending', 'waking', 'offered') AND expires_ms <= ?1",
            [to_i64(now_ms)],
        )?;
        let mut ids = Vec::with_capacity(due.len());
        for mut rec in due {
            if rec.apply(Transition::Expired { at: now_ms })? {
                Self::save(&tx, &rec)?;
                ids.push(rec.tunnel_id);
            }
        }
        tx.commit()?;
        Ok(ids)
    }
}
