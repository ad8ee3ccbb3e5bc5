//! Tests of sleep and wake: the `segment=` and `sleep_idle_ms=` keys, `Lan` after
//! `Welcome`, the idle clock and the sleep lease, `SleepGranted` / `SleepRefused`, waking,
//! and the substitute's `WakeRelay` → magic packet → `WakeSent`.

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use core::cell::Cell;

use duplex_link::{HostReply, HostRequest};
use duplex_tunnel::*;

use crate::config::parse_config;
use crate::tests::{closes, config, logs, sent, H, MEDIATOR};
use crate::tests_tunnel::{data, job, open_tunnel, request};
use crate::*;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const OTHER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
const IDLE: u64 = 5_000;

/// The test configuration with a segment, a MAC and `sleep_idle_ms=5000`.
fn sleepy_config() -> RelayConfig {
    RelayConfig {
        segment: Some("lan-1".into()),
        mac: Some(MAC),
        sleep_idle_ms: Some(IDLE),
        ..config()
    }
}

fn with(cfg: RelayConfig) -> H {
    let random = Rc::new(Cell::new(0));
    let r = random.clone();
    H {
        relay: Relay::new(cfg, Box::new(move || r.get()), 1000),
        now: 1000,
        random,
        conn: 0,
    }
}

/// A relay that may sleep, with its session up.
fn sleepy() -> H {
    let mut h = with(sleepy_config());
    h.up();
    h
}

fn lease() -> RelayToMediator {
    RelayToMediator::Sleep {
        devices: vec!["mfp-1".into(), "mfp-2".into()],
        mac: MAC,
        segment: "lan-1".into(),
    }
}

/// Dials and logs in; returns the actions of the `Welcome`.
fn login(h: &mut H, session_id: u64) -> Vec<Action> {
    let conn = h.dial();
    h.relay.on_connected(conn, h.now);
    let a = h.relay.take_actions();
    assert!(matches!(
        sent::<RelayToMediator>(&a, conn)[..],
        [RelayToMediator::Hello { .. }]
    ));
    h.feed(conn, &MediatorToRelay::Challenge { nonce: [5; 32] });
    h.feed(
        conn,
        &MediatorToRelay::Welcome {
            session_id,
            heartbeat_ms: 1000,
            heartbeat_timeout_ms: 1500,
        },
    )
}

/// Answers the pings among `a` (appending what that did to it).
fn answer(h: &mut H, a: &mut Vec<Action>) {
    let pings: Vec<u64> = sent::<RelayToMediator>(a, h.conn)
        .into_iter()
        .filter_map(|m| match m {
            RelayToMediator::Ping { seq } => Some(seq),
            _ => None,
        })
        .collect();
    for seq in pings {
        let conn = h.conn;
        a.extend(h.feed(conn, &MediatorToRelay::Pong { seq }));
    }
}

/// Lets `ms` pass in steps of 500 ms, answering every ping; returns every action.
fn pass(h: &mut H, ms: u64) -> Vec<Action> {
    let mut all = Vec::new();
    let mut left = ms;
    while left > 0 {
        let step = left.min(500);
        left -= step;
        let mut a = h.advance(step);
        answer(h, &mut a);
        all.extend(a);
    }
    all
}

/// One more millisecond (pings answered).
fn step(h: &mut H) -> Vec<Action> {
    let mut a = h.advance(1);
    answer(h, &mut a);
    a
}

fn sleeps(actions: &[Action], conn: ConnId) -> usize {
    sent::<RelayToMediator>(actions, conn)
        .iter()
        .filter(|m| matches!(m, RelayToMediator::Sleep { .. }))
        .count()
}

/// Lets the idle period pass; the relay asks to sleep.
fn ask(h: &mut H) {
    let a = pass(h, IDLE);
    assert_eq!(sleeps(&a, h.conn), 1);
}

fn wake_relay(wake_id: u64, mac: [u8; 6]) -> MediatorToRelay {
    MediatorToRelay::WakeRelay {
        wake_id,
        relay_id: "relay-2".into(),
        mac,
        device_id: "mfp-9".into(),
        tunnel_id: 77,
    }
}

fn lookup<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> + 'a {
    move |k| pairs.iter().find(|(key, _)| *key == k).map(|(_, v)| *v)
}

const HEX_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

fn parse_with(extra: &[(&'static str, &'static str)]) -> Result<RelayConfig, Vec<ConfigError>> {
    let mut pairs = vec![
        ("relay_id", "relay-1"),
        ("secret", HEX_A),
        ("devices", "mfp-1"),
        ("mediator", "10.77.0.2"),
        ("mediator_pin", HEX_A),
        ("cloud_pin", HEX_A),
    ];
    pairs.extend_from_slice(extra);
    parse_config(lookup(&pairs))
}

#[test]
fn config_reads_segment_and_sleep_idle_ms() {
    let c = parse_with(&[]).unwrap();
    assert_eq!((c.segment, c.sleep_idle_ms, c.mac), (None, None, None));
    let c = parse_with(&[("segment", "lan-1"), ("sleep_idle_ms", "5000")]).unwrap();
    assert_eq!(c.segment.as_deref(), Some("lan-1"));
    assert_eq!((c.sleep_idle_ms, c.mac), (Some(5000), None));
    let c = parse_with(&[("sleep_idle_ms", "0")]).unwrap();
    assert_eq!(c.sleep_idle_ms, None);
    for (key, value) in [
        ("segment", "has space"),
        ("segment", ""),
        ("sleep_idle_ms", "999"),
        ("sleep_idle_ms", "soon"),
        ("sleep_idle_ms", "-1"),
    ] {
        let e = parse_with(&[(key, value)]).unwrap_err();
        assert_eq!(e.len(), 1, "{key}={value}: {e:?}");
        assert_eq!(e[0].key, key);
    }
    // The default configuration is constructible and sleeps never.
    let d = RelayConfig::default();
    assert_eq!((d.segment, d.sleep_idle_ms, d.mac), (None, None, None));
}

#[test]
fn lan_is_sent_after_each_welcome_only_with_mac_and_segment() {
    let lan = RelayToMediator::Lan {
        segment: "lan-1".into(),
        mac: MAC,
    };
    let mut h = with(sleepy_config());
    let a = login(&mut h, 7);
    assert_eq!(sent::<RelayToMediator>(&a, h.conn), vec![lan.clone()]);
    // Again after the next login.
    let old = h.conn;
    h.relay.on_closed(old, "gone", h.now);
    h.relay.take_actions();
    h.now += 60_000;
    let a = login(&mut h, 8);
    assert_ne!(h.conn, old);
    assert_eq!(sent::<RelayToMediator>(&a, h.conn), vec![lan]);
    for cfg in [
        RelayConfig {
            mac: None,
            ..sleepy_config()
        },
        RelayConfig {
            segment: None,
            ..sleepy_config()
        },
    ] {
        let mut h = with(cfg);
        let a = login(&mut h, 7);
        assert!(sent::<RelayToMediator>(&a, h.conn).is_empty());
    }
}

#[test]
fn an_idle_relay_asks_to_sleep_with_its_lease_once() {
    let mut h = sleepy();
    let up = h.now;
    assert_eq!(
        h.relay.next_deadline(),
        Some(up + 1000),
        "the heartbeat first"
    );
    let a = pass(&mut h, IDLE - 1);
    assert_eq!(sleeps(&a, h.conn), 0);
    assert_eq!(h.relay.next_deadline(), Some(up + IDLE));
    let a = step(&mut h);
    let asked: Vec<RelayToMediator> = sent::<RelayToMediator>(&a, h.conn)
        .into_iter()
        .filter(|m| !matches!(m, RelayToMediator::Ping { .. }))
        .collect();
    assert_eq!(asked, vec![lease()]);
    // Waiting for the answer: not asked again, the session goes on.
    let a = pass(&mut h, 4 * IDLE);
    assert_eq!(sleeps(&a, h.conn), 0);
    assert!(!h.relay.is_sleeping());
    assert_eq!(h.relay.session_id(), Some(7));
}

#[test]
fn no_sleep_while_a_tunnel_is_open_and_the_clock_restarts_at_its_close() {
    let mut h = sleepy();
    let t = open_tunnel(&mut h, 5, "mfp-1");
    let a = pass(&mut h, 4 * IDLE);
    assert_eq!(sleeps(&a, h.conn), 0);
    // The close comes between ticks: the clock restarts at it, not at the last tick.
    h.now += 250;
    let a = h.feed(t, &CloudToRelay::Close);
    assert!(closes(&a, t));
    let closed = h.now;
    let a = pass(&mut h, IDLE - 1);
    assert_eq!(sleeps(&a, h.conn), 0);
    assert_eq!(h.relay.next_deadline(), Some(closed + IDLE));
    assert_eq!(sleeps(&step(&mut h), h.conn), 1);
}

#[test]
fn no_sleep_while_a_controller_request_is_in_flight() {
    let mut h = sleepy();
    let t = open_tunnel(&mut h, 5, "mfp-1");
    h.feed(t, &job("j-1", "mfp-1", 2));
    let a = h.feed(t, &data("j-1", b"hi"));
    assert!(a.iter().any(|a| matches!(
        a,
        Action::ControllerSend(HostRequest::SubmitKeyedJob { .. })
    )));
    // The tunnel goes; the submit is still at the controller.
    h.relay.on_closed(t, "reset", h.now);
    h.relay.take_actions();
    assert_eq!(h.relay.tunnel_count(), 0);
    let a = pass(&mut h, 3 * IDLE);
    assert_eq!(sleeps(&a, h.conn), 0);
    // Its answer (dropped: the tunnel is gone) restarts the idle clock.
    h.relay.on_controller_reply(
        HostReply::KeyedJobAccepted {
            id: 3,
            duplicate: false,
        },
        h.now,
    );
    h.relay.take_actions();
    let a = pass(&mut h, IDLE - 1);
    assert_eq!(sleeps(&a, h.conn), 0);
    assert_eq!(sleeps(&step(&mut h), h.conn), 1);
}

#[test]
fn sleep_granted_closes_the_session_and_sleeps_without_timers() {
    let mut h = sleepy();
    ask(&mut h);
    let conn = h.conn;
    let a = h.feed(conn, &MediatorToRelay::SleepGranted);
    let log = Action::Log("going to sleep (lease granted)".into());
    let at = |x: &Action| a.iter().position(|y| y == x);
    let (l, c, s) = (
        at(&log).expect("the log line"),
        at(&Action::Close { conn }).expect("the session closed"),
        at(&Action::Sleep).expect("Sleep"),
    );
    assert!(l < s && c < s, "{a:?}");
    assert!(h.relay.is_sleeping());
    assert_eq!(h.relay.session_id(), None);
    assert_eq!(h.relay.next_deadline(), None);
    // No dial, ping or controller work while asleep, even when the controller link drops.
    h.relay.on_controller_closed(h.now);
    h.relay.take_actions();
    assert_eq!(h.relay.next_deadline(), None);
    for _ in 0..100 {
        assert_eq!(h.advance(36_000), vec![]);
    }
    // Late frames of the old session are ignored.
    h.relay
        .on_data(conn, &duplex_link::encode(&request(5, "mfp-1")), h.now);
    h.relay.on_closed(conn, "gone", h.now);
    assert_eq!(h.relay.take_actions(), vec![]);
    assert!(h.relay.is_sleeping());
}

#[test]
fn sleep_refused_stays_up_and_asks_again_after_another_idle_period() {
    let mut h = sleepy();
    ask(&mut h);
    pass(&mut h, 1000);
    let conn = h.conn;
    let a = h.feed(
        conn,
        &MediatorToRelay::SleepRefused {
            code: error_code::SLEEP_DEFERRED,
            message: "tunnels waiting".into(),
        },
    );
    assert!(logs(&a).iter().any(|l| l.starts_with("sleep refused: 423")));
    assert!(!a.contains(&Action::Sleep) && !closes(&a, conn));
    let refused = h.now;
    assert_eq!(h.relay.session_id(), Some(7));
    let a = pass(&mut h, IDLE - 1);
    assert_eq!(sleeps(&a, conn), 0);
    assert!(sent::<RelayToMediator>(&a, conn)
        .iter()
        .any(|m| matches!(m, RelayToMediator::Ping { .. })));
    assert_eq!(h.relay.next_deadline(), Some(refused + IDLE));
    assert_eq!(sleeps(&step(&mut h), conn), 1);
}

#[test]
fn a_tunnel_request_cancels_a_pending_sleep() {
    let mut h = sleepy();
    ask(&mut h);
    let conn = h.conn;
    let a = h.feed(conn, &request(5, "mfp-1"));
    assert!(logs(&a).iter().any(|l| l.starts_with("sleep given up")));
    assert!(a.iter().any(|a| matches!(
        a,
        Action::Dial {
            peer: Peer::Cloud,
            ..
        }
    )));
    // A grant for the abandoned attempt does not put the relay to sleep.
    let a = h.feed(conn, &MediatorToRelay::SleepGranted);
    assert!(logs(&a)
        .iter()
        .any(|l| l.starts_with("SleepGranted ignored")));
    assert!(!a.contains(&Action::Sleep) && !closes(&a, conn));
    assert!(!h.relay.is_sleeping());
    assert_eq!((h.relay.session_id(), h.relay.tunnel_count()), (Some(7), 1));

    // Likewise for a request that is refused at once (a device it does not serve).
    let mut h = sleepy();
    ask(&mut h);
    let conn = h.conn;
    let a = h.feed(conn, &request(6, "mfp-9"));
    assert!(matches!(
        sent::<RelayToMediator>(&a, conn)[..],
        [RelayToMediator::TunnelFailed { code: 403, .. }]
    ));
    let a = h.feed(conn, &MediatorToRelay::SleepGranted);
    assert!(!a.contains(&Action::Sleep));
    assert!(!h.relay.is_sleeping());
    // It asks again after a full idle period from the request.
    let a = pass(&mut h, IDLE - 500);
    assert_eq!(sleeps(&a, conn), 0);
    assert_eq!(sleeps(&pass(&mut h, 500), conn), 1);
}

#[test]
fn a_woken_relay_dials_at_once_and_logs_in_afresh() {
    let mut h = sleepy();
    ask(&mut h);
    let old = h.conn;
    h.feed(old, &MediatorToRelay::SleepGranted);
    assert!(h.relay.is_sleeping());
    h.now += 3_600_000;
    h.relay.on_woken("magic packet", h.now);
    assert!(!h.relay.is_sleeping());
    assert_eq!(h.relay.next_deadline(), Some(h.now), "dials at once");
    let a = h.relay.take_actions();
    assert!(logs(&a).contains(&"woken (magic packet)".to_string()));
    assert_eq!(h.relay.backoff().attempt(), 0);
    let a = login(&mut h, 9);
    assert_ne!(h.conn, old);
    assert_eq!(h.relay.session_id(), Some(9));
    assert!(matches!(
        sent::<RelayToMediator>(&a, h.conn)[..],
        [RelayToMediator::Lan { .. }]
    ));
    // The request it was woken for comes as an ordinary TunnelRequest.
    let conn = h.conn;
    let a = h.feed(conn, &request(5, "mfp-1"));
    assert!(a.iter().any(|a| matches!(
        a,
        Action::Dial {
            peer: Peer::Cloud,
            ..
        }
    )));
    assert_eq!(h.relay.tunnel_count(), 1);
}

#[test]
fn a_restore_while_asleep_wakes_the_relay_once() {
    let mut h = sleepy();
    ask(&mut h);
    let conn = h.conn;
    h.feed(conn, &MediatorToRelay::SleepGranted);
    h.now += 10_000;
    h.relay.on_restored(h.now);
    assert!(!h.relay.is_sleeping());
    let a = h.tick();
    let dials = a
        .iter()
        .filter(|a| matches!(a, Action::Dial { endpoint, .. } if *endpoint == MEDIATOR))
        .count();
    assert_eq!(dials, 1);
}

#[test]
fn wake_relay_sends_the_magic_packet_and_answers_wake_sent() {
    let mut h = sleepy();
    let (conn, up) = (h.conn, h.now);
    pass(&mut h, 3000);
    let a = h.feed(conn, &wake_relay(9, OTHER_MAC));
    assert_eq!(
        a,
        vec![
            Action::Log("waking relay relay-2 (52:54:00:ab:cd:ef) for tunnel 77 to mfp-9".into()),
            Action::SendMagic {
                wake_id: 9,
                mac: OTHER_MAC
            },
        ]
    );
    h.relay.on_magic_sent(9, Ok(()), h.now);
    let a = h.relay.take_actions();
    assert_eq!(
        sent::<RelayToMediator>(&a, conn),
        vec![RelayToMediator::WakeSent {
            wake_id: 9,
            sent: true,
            code: 0,
            message: String::new()
        }]
    );
    h.feed(conn, &wake_relay(10, OTHER_MAC));
    h.relay.on_magic_sent(10, Err("no route".into()), h.now);
    let a = h.relay.take_actions();
    assert_eq!(
        sent::<RelayToMediator>(&a, conn),
        vec![RelayToMediator::WakeSent {
            wake_id: 10,
            sent: false,
            code: error_code::WAKE_FAILED,
            message: "no route".into()
        }]
    );
    // Nothing else changed: no tunnel, same session, and the idle clock ran on.
    assert_eq!((h.relay.session_id(), h.relay.tunnel_count()), (Some(7), 0));
    assert_eq!(h.relay.next_deadline().map(|d| d <= up + IDLE), Some(true));
    let left = up + IDLE - h.now;
    let a = pass(&mut h, left);
    assert_eq!(sleeps(&a, conn), 1);
}

#[test]
fn a_relay_without_a_segment_or_with_a_bad_mac_does_not_wake() {
    let failed = |wake_id, message: &str| RelayToMediator::WakeSent {
        wake_id,
        sent: false,
        code: error_code::WAKE_FAILED,
        message: message.into(),
    };
    let mut h = H::new();
    let conn = h.up();
    let a = h.feed(conn, &wake_relay(4, OTHER_MAC));
    assert!(!a.iter().any(|a| matches!(a, Action::SendMagic { .. })));
    assert_eq!(
        sent::<RelayToMediator>(&a, conn),
        vec![failed(4, "not on a LAN segment")]
    );
    let mut h = sleepy();
    let conn = h.conn;
    for (id, mac) in [(5, [0xff; 6]), (6, [0; 6]), (7, [0x01, 0, 0x5e, 0, 0, 1])] {
        let a = h.feed(conn, &wake_relay(id, mac));
        assert!(!a.iter().any(|a| matches!(a, Action::SendMagic { .. })));
        assert_eq!(
            sent::<RelayToMediator>(&a, conn),
            vec![failed(id, "not a unicast MAC")]
        );
    }
}

#[test]
fn never_sleeps_without_sleep_idle_ms_a_segment_or_a_mac() {
    for cfg in [
        RelayConfig {
            sleep_idle_ms: None,
            ..sleepy_config()
        },
        RelayConfig {
            mac: None,
            ..sleepy_config()
        },
        RelayConfig {
            segment: None,
            ..sleepy_config()
        },
    ] {
        let noted = cfg.sleep_idle_ms.is_some();
        let mut h = with(cfg);
        let a = login(&mut h, 7);
        assert_eq!(
            logs(&a).iter().any(|l| l.ends_with("never sleeping")),
            noted
        );
        let a = pass(&mut h, 20 * IDLE);
        assert_eq!(sleeps(&a, h.conn), 0);
        // The reason is logged once, not at every login.
        let old = h.conn;
        h.relay.on_closed(old, "gone", h.now);
        h.relay.take_actions();
        h.now += 60_000;
        let a = login(&mut h, 8);
        assert!(!logs(&a).iter().any(|l| l.ends_with("never sleeping")));
    }
}
