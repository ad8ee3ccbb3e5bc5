//! One suite of store tests run against both stores, and a reopen of the SQLite one
//! (with a sleep lease and a wake), and a version 1 database brought to version 2.

use std::path::PathBuf;

use duplex_tunnel::{Ticket, TicketBody};

use super::memory::MemoryStore;
use super::sqlite::SqliteStore;
use super::*;

fn new_tunnel(device: &str, relay: &str, created: u64) -> NewTunnel {
    NewTunnel {
        device_id: device.into(),
        relay_id: relay.into(),
        cloud: "c1".into(),
        dial: "127.0.0.1:9443".parse().unwrap(),
        created_ms: created,
        expires_ms: created + 1000,
    }
}

fn ticket(rec: &TunnelRecord, expires_ms: u64) -> Ticket {
    Ticket::sign(
        &[7; 32],
        TicketBody {
            tunnel_id: rec.tunnel_id,
            relay_id: rec.relay_id.clone(),
            device_id: rec.device_id.clone(),
            nonce: [3; 16],
            expires_ms,
        },
    )
}

fn temp_db() -> PathBuf {
    std::env::temp_dir().join(format!("duplex-store-{}.db", crate::util::random_u64()))
}

fn suite(s: &dyn Store) {
    // Leases.
    let lease = Lease {
        relay_id: "r1".into(),
        devices: vec!["d1".into(), "d2".into()],
        session_id: 5,
        since_ms: 100,
        last_heard_ms: 100,
        online: true,
    };
    s.put_lease(&lease).unwrap();
    assert_eq!(s.max_session_id().unwrap(), 5);
    s.touch_leases(&[("r1".into(), 5, 150), ("r1".into(), 4, 999)])
        .unwrap();
    assert_eq!(s.leases().unwrap()[0].last_heard_ms, 150);
    s.end_lease("r1", 4, 160).unwrap();
    assert!(
        s.leases().unwrap()[0].online,
        "another session's end leaves the lease"
    );
    s.end_lease("r1", 5, 170).unwrap();
    let l = &s.leases().unwrap()[0];
    assert!(!l.online);
    assert_eq!((l.last_heard_ms, &l.devices), (170, &lease.devices));

    // Tunnels: ids rise, state changes follow the rules.
    let a = s.create_tunnel(&new_tunnel("d1", "r1", 1000)).unwrap();
    let b = s.create_tunnel(&new_tunnel("d1", "r1", 1001)).unwrap();
    let c = s.create_tunnel(&new_tunnel("d3", "r2", 1002)).unwrap();
    assert!(a.tunnel_id < b.tunnel_id && b.tunnel_id < c.tunnel_id);
    assert_eq!(a.state, TunnelState::Pending);
    assert_eq!(s.waiting_for_device("d1").unwrap(), 2);
    assert_eq!(s.waiting_for_relay("r1").unwrap().len(), 2);

    let t = ticket(&a, 5000);
    let rec = s
        .update_tunnel(
            a.tunnel_id,
            Some("r1"),
            Transition::Offered {
                at: 1100,
                ticket: t.clone(),
            },
        )
        .unwrap();
    assert_eq!(
        (rec.state, rec.expires_ms, rec.offered_ms),
        (TunnelState::Offered, 5000, Some(1100))
    );
    assert_eq!(s.tunnel(a.tunnel_id).unwrap().unwrap().ticket, Some(t));
    assert!(matches!(
        s.update_tunnel(a.tunnel_id, Some("r2"), Transition::Opened { at: 1 }),
        Err(StoreError::UnknownTunnel(_))
    ));
    s.update_tunnel(a.tunnel_id, Some("r1"), Transition::Opened { at: 1200 })
        .unwrap();
    let jobs = vec!["job-1".to_string(), "job-2".to_string()];
    let rec = s
        .update_tunnel(
            a.tunnel_id,
            Some("r1"),
            Transition::Closed {
                at: 1300,
                jobs: jobs.clone(),
            },
        )
        .unwrap();
    assert_eq!(
        (rec.state, rec.closed_ms),
        (TunnelState::Closed, Some(1300))
    );
    assert_eq!(s.tunnel(a.tunnel_id).unwrap().unwrap().jobs, jobs);
    assert!(s
        .update_tunnel(a.tunnel_id, None, Transition::Opened { at: 1 })
        .is_err());

    let rec = s
        .update_tunnel(
            c.tunnel_id,
            None,
            Transition::Failed {
                at: 1400,
                code: 504,
                message: "no route".into(),
            },
        )
        .unwrap();
    assert_eq!(rec.state, TunnelState::Failed);
    assert_eq!(rec.error.as_ref().unwrap().code, "dial_failed");

    // b expires at 2001.
    assert_eq!(s.expire_due(2000).unwrap(), Vec::<u64>::new());
    assert_eq!(s.expire_due(2001).unwrap(), vec![b.tunnel_id]);
    let rec = s.tunnel(b.tunnel_id).unwrap().unwrap();
    assert_eq!(rec.state, TunnelState::Expired);
    assert_eq!(rec.error.unwrap().code, "expired");
    assert_eq!(s.waiting_for_device("d1").unwrap(), 0);
    assert!(s.tunnel(999).unwrap().is_none());
}

fn sleep_lease() -> SleepLease {
    SleepLease {
        relay_id: "r5".into(),
        devices: vec!["d5".into()],
        mac: [0x52, 0x54, 0, 1, 2, 3],
        segment: "lan-1".into(),
        since_ms: 77,
    }
}

fn wake_info(attempts: u32) -> WakeInfo {
    WakeInfo {
        relay_id: "r5".into(),
        substitute: Some("r6".into()),
        segment: "lan-1".into(),
        attempts,
        requested_ms: 10,
        sent_ms: None,
        woken_ms: None,
        deadline_ms: 15_010,
    }
}

/// Sleep leases, and the wake transitions: waking, woken, failed.
fn sleep_suite(s: &dyn Store) {
    assert!(s.sleep_leases().unwrap().is_empty());
    s.put_sleep_lease(&sleep_lease()).unwrap();
    assert_eq!(s.sleep_leases().unwrap(), vec![sleep_lease()]);

    let a = s.create_tunnel(&new_tunnel("d5", "r5", 1000)).unwrap();
    let b = s.create_tunnel(&new_tunnel("d5", "r5", 1001)).unwrap();
    assert_eq!(s.busy_for_relay("r5").unwrap(), 2);
    for id in [a.tunnel_id, b.tunnel_id] {
        let rec = s
            .update_tunnel(id, None, Transition::Waking { wake: wake_info(1) })
            .unwrap();
        assert_eq!(
            (rec.state, rec.wake),
            (TunnelState::Waking, Some(wake_info(1)))
        );
    }
    assert_eq!(
        s.waiting_for_device("d5").unwrap(),
        2,
        "waking counts as waiting"
    );
    assert!(
        s.waiting_for_relay("r5").unwrap().is_empty(),
        "not offered while waking"
    );
    assert_eq!(s.waking().unwrap().len(), 2);
    assert!(matches!(
        s.update_tunnel(
            a.tunnel_id,
            None,
            Transition::Offered {
                at: 1,
                ticket: ticket(&a, 9)
            }
        ),
        Err(StoreError::BadTransition { .. })
    ));

    let rec = s
        .update_tunnel(a.tunnel_id, None, Transition::Woken { at: 1500 })
        .unwrap();
    assert_eq!(rec.state, TunnelState::Pending);
    assert_eq!(rec.wake.as_ref().unwrap().woken_ms, Some(1500));
    assert_eq!(s.tunnel(a.tunnel_id).unwrap().unwrap(), rec);

    let error = ErrorInfo {
        code: "wake_timeout".into(),
        message: "relay r5 did not wake".into(),
    };
    let rec = s
        .update_tunnel(
            b.tunnel_id,
            None,
            Transition::WakeFailed {
                at: 1600,
                error: error.clone(),
                wake: wake_info(3),
            },
        )
        .unwrap();
    assert_eq!(
        (rec.state, rec.error.clone()),
        (TunnelState::Failed, Some(error))
    );
    assert_eq!(
        s.tunnel(b.tunnel_id).unwrap().unwrap().wake,
        Some(wake_info(3))
    );
    assert_eq!(s.busy_for_relay("r5").unwrap(), 1, "a is pending again");

    assert!(s.clear_sleep_lease("r5").unwrap());
    assert!(!s.clear_sleep_lease("r5").unwrap());
    assert!(s.sleep_leases().unwrap().is_empty());
}

#[test]
fn memory_store_follows_the_rules() {
    suite(&MemoryStore::new());
    sleep_suite(&MemoryStore::new());
}

#[test]
fn sqlite_store_follows_the_rules() {
    let path = temp_db();
    suite(&SqliteStore::open(&path).unwrap());
    std::fs::remove_file(&path).ok();
    let path = temp_db();
    sleep_suite(&SqliteStore::open(&path).unwrap());
    std::fs::remove_file(&path).ok();
}

#[test]
fn sqlite_keeps_sleep_leases_and_wakes_across_a_reopen_and_upgrades_version_1() {
    let path = temp_db();
    {
        // A version 1 database: no `wake` column, no `sleep_leases` table.
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE tunnels (tunnel_id INTEGER PRIMARY KEY, device_id TEXT NOT NULL,
                relay_id TEXT NOT NULL, cloud TEXT NOT NULL, dial TEXT NOT NULL,
                state TEXT NOT NULL, created_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL,
                offered_ms INTEGER, opened_ms INTEGER, closed_ms INTEGER, error_code TEXT,
                error_message TEXT, ticket_nonce BLOB, ticket_mac BLOB);
             INSERT INTO tunnels (device_id, relay_id, cloud, dial, state, created_ms, expires_ms)
                VALUES ('d5', 'r5', 'c1', '127.0.0.1:9443', 'pending', 1, 2);
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    {
        let s = SqliteStore::open(&path).unwrap();
        let old = s.tunnel(1).unwrap().unwrap();
        assert_eq!((old.state, old.wake), (TunnelState::Pending, None));
        s.put_sleep_lease(&sleep_lease()).unwrap();
        s.update_tunnel(1, None, Transition::Waking { wake: wake_info(2) })
            .unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(
        s.sleep_leases().unwrap(),
        vec![sleep_lease()],
        "a sleeping relay still sleeps"
    );
    let rec = s.tunnel(1).unwrap().unwrap();
    assert_eq!(
        (rec.state, rec.wake),
        (TunnelState::Waking, Some(wake_info(2)))
    );
    let v: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, 2);
    for ext in ["", "-wal", "-shm"] {
        std::fs::remove_file(format!("{}{ext}", path.display())).ok();
    }
}

#[test]
fn sqlite_store_survives_reopen() {
    let path = temp_db();
    let (id, t) = {
        let s = SqliteStore::open(&path).unwrap();
        s.put_lease(&Lease {
            relay_id: "r9".into(),
            devices: vec!["d9".into()],
            session_id: 42,
            since_ms: 1,
            last_heard_ms: 2,
            online: true,
        })
        .unwrap();
        let rec = s.create_tunnel(&new_tunnel("d9", "r9", 10)).unwrap();
        let t = ticket(&rec, 99_000);
        s.update_tunnel(
            rec.tunnel_id,
            None,
            Transition::Offered {
                at: 20,
                ticket: t.clone(),
            },
        )
        .unwrap();
        (rec.tunnel_id, t)
    };
    let s = SqliteStore::open(&path).unwrap();
    let leases = s.leases().unwrap();
    assert_eq!(leases.len(), 1);
    assert!(!leases[0].online, "a reopened store has no session online");
    assert_eq!(s.max_session_id().unwrap(), 42);
    let waiting = s.waiting_for_relay("r9").unwrap();
    assert_eq!(waiting.len(), 1);
    assert_eq!(waiting[0].tunnel_id, id);
    assert_eq!(waiting[0].ticket.as_ref(), Some(&t));
    let next = s.create_tunnel(&new_tunnel("d9", "r9", 30)).unwrap();
    assert!(next.tunnel_id > id, "tunnel ids are not reused");
    std::fs::remove_file(&path).ok();
    for ext in ["-wal", "-shm"] {
        std::fs::remove_file(format!("{}{ext}", path.display())).ok();
    }
}

#[test]
fn sqlite_open_error_names_the_file() {
    let path = std::path::Path::new("/nonexistent-dir/sub/m.db");
    let e = SqliteStore::open(path).err().unwrap().to_string();
    assert!(e.contains("/nonexistent-dir/sub/m.db"), "{e}");
}
