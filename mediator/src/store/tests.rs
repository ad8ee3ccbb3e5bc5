//! One suite of store tests run against both stores, and a reopen of the SQLite one.

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

#[test]
fn memory_store_follows_the_rules() {
    suite(&MemoryStore::new());
}

#[test]
fn sqlite_store_follows_the_rules() {
    let path = temp_db();
    suite(&SqliteStore::open(&path).unwrap());
    std::fs::remove_file(&path).ok();
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
