//! Unit tests of the wake state machine: the substitute choice, when a wake resends or
//! gives up, and the whole flow (request, `WakeRelay`, login, timeout, no substitute)
//! on a [`Mediator`] over the in-memory store with fake sessions.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use duplex_tunnel::MediatorToRelay;
use tokio::sync::mpsc;

use super::*;
use crate::server::config::Config;
use crate::server::wake_flow;
use crate::server::{Command, Mediator, SessionSlot};
use crate::store::memory::MemoryStore;
use crate::store::{NewTunnel, SleepLease, Store, Transition, TunnelRecord, TunnelState};

const KEY: &str = "0101010101010101010101010101010101010101010101010101010101010101";
const MAC_B: [u8; 6] = [0x52, 0x54, 0x00, 0, 0, 0x0b];

fn lease(relay: &str, segment: &str) -> SleepLease {
    SleepLease {
        relay_id: relay.into(),
        devices: vec![format!("d-{relay}")],
        mac: MAC_B,
        segment: segment.into(),
        since_ms: 1,
    }
}

fn lan(segment: &str) -> Lan {
    Lan {
        session_id: 1,
        segment: segment.into(),
        mac: [2, 0, 0, 0, 0, 1],
    }
}

#[test]
fn substitute_is_an_active_relay_on_the_segment_fewest_wakes_then_lowest_id() {
    let mut book = WakeBook::new(vec![lease("b", "lan-1")]);
    for (id, seg) in [("c", "lan-1"), ("a", "lan-1"), ("x", "lan-2")] {
        book.lans.insert(id.into(), lan(seg));
    }
    let none = HashSet::new();
    let all = |_: &str| true;
    assert_eq!(
        book.choose_substitute("b", "lan-1", None, &none, all),
        Some("a".into())
    );
    // A wake in flight through a: c has fewer.
    let mut w = Wake::new(&lease("z", "lan-1"), 0, 1000);
    w.info.substitute = Some("a".into());
    book.wakes.insert("z".into(), w);
    assert_eq!(
        book.choose_substitute("b", "lan-1", None, &none, all),
        Some("c".into())
    );
    // The current substitute is kept while it qualifies.
    assert_eq!(
        book.choose_substitute("b", "lan-1", Some("a"), &none, all),
        Some("a".into())
    );
    // One that failed this wake, or is not active, or sleeps itself, is not asked.
    let failed: HashSet<String> = ["c".to_string()].into();
    assert_eq!(
        book.choose_substitute("b", "lan-1", Some("c"), &failed, all),
        Some("a".into())
    );
    assert_eq!(
        book.choose_substitute("b", "lan-1", None, &none, |id| id != "a" && id != "c"),
        None
    );
    book.leases.insert("a".into(), lease("a", "lan-1"));
    assert_eq!(
        book.choose_substitute("b", "lan-1", None, &none, all),
        Some("c".into())
    );
    // Another segment's relay never is; nor the sleeping relay itself.
    assert_eq!(
        book.choose_substitute("b", "lan-2", None, &none, all),
        Some("x".into())
    );
    assert_eq!(book.choose_substitute("x", "lan-2", None, &none, all), None);
    assert_eq!(book.choose_substitute("b", "lan-9", None, &none, all), None);
}

#[test]
fn a_wake_resends_every_retry_up_to_the_attempts_then_times_out() {
    let mut w = Wake::new(&lease("b", "lan-1"), 1000, 15_000);
    assert_eq!(w.info.deadline_ms, 16_000);
    assert_eq!(w.due(1000, 3), Due::Send);
    w.info.attempts = 1;
    w.next_send_ms = 4000;
    assert_eq!(w.due(3999, 3), Due::Wait);
    assert_eq!(w.due(4000, 3), Due::Send);
    w.info.attempts = 3;
    assert_eq!(w.due(15_999, 3), Due::Wait);
    assert_eq!(w.due(16_000, 3), Due::Timeout);
    w.sent_to = vec![(1, "a".into()), (2, "a".into()), (3, "c".into())];
    assert_eq!(
        timeout_error(&w, 15_000).message,
        "relay b did not wake within 15000 ms (3 wake requests through a, c)"
    );
    assert_eq!(
        no_substitute_error("relay-b", "lan-1").message,
        "relay relay-b is asleep and no awake relay on segment lan-1 can wake it"
    );
}

// The flow on a mediator over the memory store, with fake sessions.

struct Hub {
    m: Arc<Mediator>,
    store: Arc<MemoryStore>,
}

fn hub(extra: &str) -> Hub {
    let text = format!(
        r#"{{"cert":"c","key":"k",{extra}
            "clouds":[{{"name":"c1","token":"secret-token","ticket_key":"{KEY}"}}],
            "relays":[{{"id":"a","secret":"{KEY}","devices":["d-a"]}},
                      {{"id":"b","secret":"{KEY}","devices":["d-b"]}},
                      {{"id":"c","secret":"{KEY}","devices":["d-c"]}},
                      {{"id":"x","secret":"{KEY}","devices":["d-x"]}}]}}"#
    );
    let cfg = Config::parse(&text, Path::new("/")).unwrap();
    let store = Arc::new(MemoryStore::new());
    let m = Arc::new(Mediator::new(cfg, store.clone()).unwrap());
    Hub { m, store }
}

impl Hub {
    /// An active session of `relay` on `segment`: its commands come out of the receiver.
    async fn active(&self, relay: &str, segment: &str) -> mpsc::UnboundedReceiver<Command> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.m.sessions().insert(
            relay.into(),
            SessionSlot {
                session_id: 7,
                devices: vec![format!("d-{relay}")],
                since_ms: 0,
                last_heard_ms: Arc::new(AtomicU64::new(0)),
                tx,
            },
        );
        wake_flow::on_lan(&self.m, relay, 7, segment.into(), [2, 0, 0, 0, 0, 1]).await;
        rx
    }

    async fn request(&self, device: &str) -> TunnelRecord {
        let relay = device.trim_start_matches("d-");
        let rec = self
            .store
            .create_tunnel(&NewTunnel {
                device_id: device.into(),
                relay_id: relay.into(),
                cloud: "c1".into(),
                dial: "127.0.0.1:9443".parse().unwrap(),
                created_ms: 1,
                expires_ms: u64::MAX / 2,
            })
            .unwrap();
        wake_flow::route(&self.m, rec).await
    }

    async fn sleep_b(&self) {
        let answer =
            wake_flow::sleep(&self.m, "b", vec!["d-b".into()], MAC_B, "lan-1".into()).await;
        assert_eq!(answer, MediatorToRelay::SleepGranted);
    }

    async fn state(&self, relay: &str) -> &'static str {
        let active = self.m.sessions().contains_key(relay);
        self.m.book.lock().await.state(relay, active)
    }
}

/// The `WakeRelay`s waiting in `rx`: (wake id, relay, tunnel).
fn wake_relays(rx: &mut mpsc::UnboundedReceiver<Command>) -> Vec<(u64, String, u64)> {
    let mut out = Vec::new();
    while let Ok(cmd) = rx.try_recv() {
        if let Command::Send(msg) = cmd {
            if let MediatorToRelay::WakeRelay {
                wake_id,
                relay_id,
                mac,
                tunnel_id,
                ..
            } = *msg
            {
                assert_eq!(mac, MAC_B);
                out.push((wake_id, relay_id, tunnel_id));
            }
        }
    }
    out
}

#[tokio::test]
async fn a_sleeping_relays_requests_share_one_wake_and_go_to_it_when_it_logs_in() {
    let h = hub("");
    let mut a = h.active("a", "lan-1").await;
    let mut x = h.active("x", "lan-2").await;
    h.sleep_b().await;
    assert_eq!(h.state("b").await, "sleeping");
    assert_eq!(
        h.store.sleep_leases().unwrap(),
        vec![{
            let mut l = lease("b", "lan-1");
            l.since_ms = h.store.sleep_leases().unwrap()[0].since_ms;
            l
        }]
    );

    let r1 = h.request("d-b").await;
    assert_eq!(r1.state, TunnelState::Waking);
    let w = r1.wake.clone().unwrap();
    assert_eq!(
        (
            w.relay_id.as_str(),
            w.substitute.as_deref(),
            w.segment.as_str(),
            w.attempts
        ),
        ("b", Some("a"), "lan-1", 1)
    );
    assert_eq!(h.state("b").await, "waking");
    let sent = wake_relays(&mut a);
    assert_eq!(sent.len(), 1);
    assert_eq!((sent[0].1.as_str(), sent[0].2), ("b", r1.tunnel_id));
    assert!(
        wake_relays(&mut x).is_empty(),
        "another segment's relay is not asked"
    );

    let r2 = h.request("d-b").await;
    assert_eq!(
        (r2.state, r2.wake.unwrap().attempts),
        (TunnelState::Waking, 1)
    );
    assert!(wake_relays(&mut a).is_empty(), "one wake for both requests");

    wake_flow::wake_sent(&h.m, "a", sent[0].0, true, 0, "").await;
    let rec = h.store.tunnel(r1.tunnel_id).unwrap().unwrap();
    assert!(rec.wake.unwrap().sent_ms.is_some());

    wake_flow::on_login(&h.m, "b").await;
    for id in [r1.tunnel_id, r2.tunnel_id] {
        let rec = h.store.tunnel(id).unwrap().unwrap();
        assert_eq!(
            rec.state,
            TunnelState::Pending,
            "offered by b's session next"
        );
        let w = rec.wake.unwrap();
        assert!(w.woken_ms.is_some() && w.substitute.as_deref() == Some("a"));
    }
    assert!(h.store.sleep_leases().unwrap().is_empty(), "lease cleared");
    assert_eq!(h.state("b").await, "offline", "no session in this test");
    let last = h.m.book.lock().await.relay_json("b", false)["last_wake"].clone();
    assert_eq!(last["outcome"], "woken");
}

#[tokio::test]
async fn no_substitute_fails_at_once_and_a_wake_times_out_after_its_attempts() {
    let h = hub(r#""wake_timeout_ms":400,"wake_retry_ms":100,"wake_attempts":2,"#);
    let _x = h.active("x", "lan-2").await;
    h.sleep_b().await;
    let rec = h.request("d-b").await;
    assert_eq!(rec.state, TunnelState::Failed);
    let e = rec.error.unwrap();
    assert_eq!(e.code, "no_substitute");
    assert_eq!(
        e.message,
        "relay b is asleep and no awake relay on segment lan-1 can wake it"
    );
    assert_eq!(h.state("b").await, "sleeping");

    let mut a = h.active("a", "lan-1").await;
    let rec = h.request("d-b").await;
    assert_eq!(rec.state, TunnelState::Waking);
    let start = std::time::Instant::now();
    while h.state("b").await == "waking" {
        assert!(start.elapsed().as_millis() < 3000, "the wake never ended");
        wake_flow::sweep_once(&h.m).await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        start.elapsed().as_millis() >= 300,
        "ended before its deadline"
    );
    assert_eq!(wake_relays(&mut a).len(), 2, "wake_attempts WakeRelays");
    let rec = h.store.tunnel(rec.tunnel_id).unwrap().unwrap();
    assert_eq!(rec.state, TunnelState::Failed);
    let e = rec.error.unwrap();
    assert_eq!(e.code, "wake_timeout");
    assert_eq!(
        e.message,
        "relay b did not wake within 400 ms (2 wake requests through a)"
    );
    assert_eq!(
        h.state("b").await,
        "sleeping",
        "asleep again; a later request retries"
    );
}

#[tokio::test]
async fn a_substitute_that_cannot_send_is_replaced() {
    let h = hub(r#""wake_timeout_ms":5000,"wake_retry_ms":1000,"wake_attempts":3,"#);
    let mut a = h.active("a", "lan-1").await;
    let mut c = h.active("c", "lan-1").await;
    h.sleep_b().await;
    let rec = h.request("d-b").await;
    let first = wake_relays(&mut a);
    assert_eq!(first.len(), 1);
    wake_flow::wake_sent(&h.m, "a", first[0].0, false, 502, "network down").await;
    wake_flow::sweep_once(&h.m).await;
    let second = wake_relays(&mut c);
    assert_eq!(second.len(), 1, "c asked at once after a could not");
    assert_ne!(second[0].0, first[0].0, "a fresh wake id");
    let w = h
        .store
        .tunnel(rec.tunnel_id)
        .unwrap()
        .unwrap()
        .wake
        .unwrap();
    assert_eq!((w.substitute.as_deref(), w.attempts), (Some("c"), 2));
}

#[tokio::test]
async fn sleep_is_refused_while_tunnels_wait_and_for_a_bad_lease() {
    let h = hub("");
    let _b = h.active("b", "lan-1").await;
    let rec = h.request("d-b").await;
    assert_eq!(rec.state, TunnelState::Pending);
    let answer = wake_flow::sleep(&h.m, "b", vec!["d-b".into()], MAC_B, "lan-1".into()).await;
    let MediatorToRelay::SleepRefused { code, message } = answer else {
        panic!("{answer:?}")
    };
    assert_eq!(code, 423);
    assert!(
        message.starts_with("1 tunnel request is pending"),
        "{message}"
    );
    for (devices, segment) in [(vec!["d-a".to_string()], "lan-1"), (vec![], "bad segment")] {
        let answer = wake_flow::sleep(&h.m, "c", devices, MAC_B, segment.into()).await;
        assert!(
            matches!(answer, MediatorToRelay::SleepRefused { code: 400, .. }),
            "{answer:?}"
        );
    }
    assert!(h.store.sleep_leases().unwrap().is_empty());
}

#[tokio::test]
async fn waking_requests_found_at_start_get_a_fresh_wake() {
    let store = Arc::new(MemoryStore::new());
    store.put_sleep_lease(&lease("b", "lan-1")).unwrap();
    let rec = store
        .create_tunnel(&NewTunnel {
            device_id: "d-b".into(),
            relay_id: "b".into(),
            cloud: "c1".into(),
            dial: "127.0.0.1:9443".parse().unwrap(),
            created_ms: 1,
            expires_ms: u64::MAX / 2,
        })
        .unwrap();
    let old = Wake::new(&lease("b", "lan-1"), 1, 10);
    store
        .update_tunnel(rec.tunnel_id, None, Transition::Waking { wake: old.info })
        .unwrap();
    let h = Hub {
        m: Arc::new(Mediator::new(hub("").m.cfg.clone(), store.clone()).unwrap()),
        store,
    };
    assert_eq!(h.state("b").await, "sleeping", "the lease survived");
    let mut a = h.active("a", "lan-1").await;
    wake_flow::sweep_once(&h.m).await;
    assert_eq!(h.state("b").await, "waking");
    assert_eq!(wake_relays(&mut a).len(), 1);
}
