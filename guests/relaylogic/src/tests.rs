//! Tests of the configuration, the backoff rule and the control session. The harness here
//! is shared with `tests_tunnel.rs`.

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use core::cell::Cell;

use duplex_link::encode;
use duplex_tunnel::*;
use serde::de::DeserializeOwned;

use crate::backoff::{equal_jitter, Backoff};
use crate::config::{parse_config, parse_net};
use crate::*;

pub(crate) const SECRET: [u8; 32] = [0x11; 32];
pub(crate) const MEDIATOR: Endpoint = Endpoint {
    ip: [10, 77, 0, 2],
    port: 7443,
};

pub(crate) fn config() -> RelayConfig {
    RelayConfig {
        relay_id: "relay-1".into(),
        secret: SECRET,
        devices: vec!["mfp-1".into(), "mfp-2".into()],
        mediator: MEDIATOR,
        mediator_pin: [1; 32],
        cloud_pin: [2; 32],
        controller_cid: 4,
        backoff_base_ms: 250,
        backoff_max_ms: 30_000,
        heartbeat_ms: 30_000,
        heartbeat_timeout_ms: 45_000,
        login_timeout_ms: 15_000,
        ..RelayConfig::default()
    }
}

/// A relay under test, with a controllable clock and random source.
pub(crate) struct H {
    pub relay: Relay,
    pub now: u64,
    pub random: Rc<Cell<u64>>,
    /// The session connection, once dialled.
    pub conn: ConnId,
}

impl H {
    pub fn new() -> H {
        let random = Rc::new(Cell::new(0));
        let r = random.clone();
        let relay = Relay::new(config(), Box::new(move || r.get()), 1000);
        H {
            relay,
            now: 1000,
            random,
            conn: 0,
        }
    }

    pub fn tick(&mut self) -> Vec<Action> {
        self.relay.on_tick(self.now);
        self.relay.take_actions()
    }

    pub fn advance(&mut self, ms: u64) -> Vec<Action> {
        self.now += ms;
        self.tick()
    }

    pub fn feed<T: serde::Serialize>(&mut self, conn: ConnId, msg: &T) -> Vec<Action> {
        self.relay.on_data(conn, &encode(msg), self.now);
        self.relay.take_actions()
    }

    /// Dials (the first tick) and returns the session connection.
    pub fn dial(&mut self) -> ConnId {
        let actions = self.tick();
        let conn = actions
            .iter()
            .find_map(|a| match a {
                Action::Dial {
                    conn,
                    endpoint,
                    peer: Peer::Mediator,
                } if *endpoint == MEDIATOR => Some(*conn),
                _ => None,
            })
            .expect("a dial to the mediator");
        if actions.contains(&Action::ControllerConnect) {
            self.relay.on_controller_connected(self.now);
            self.relay.take_actions();
        }
        self.conn = conn;
        conn
    }

    /// Dials and logs in; the session is up with id 7, heartbeat 1000/1500 ms.
    pub fn up(&mut self) -> ConnId {
        let conn = self.dial();
        self.relay.on_connected(conn, self.now);
        self.relay.take_actions();
        self.feed(conn, &MediatorToRelay::Challenge { nonce: [5; 32] });
        self.feed(
            conn,
            &MediatorToRelay::Welcome {
                session_id: 7,
                heartbeat_ms: 1000,
                heartbeat_timeout_ms: 1500,
            },
        );
        assert_eq!(self.relay.session_id(), Some(7));
        conn
    }
}

/// The messages sent on `conn` by `actions`.
pub(crate) fn sent<T: DeserializeOwned>(actions: &[Action], conn: ConnId) -> Vec<T> {
    let mut dec = duplex_link::FrameDecoder::<T>::new();
    for a in actions {
        if let Action::Send { conn: c, bytes } = a {
            if *c == conn {
                dec.push(bytes);
            }
        }
    }
    dec.map(|m| m.expect("a valid frame")).collect()
}

pub(crate) fn logs(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Log(l) => Some(l.clone()),
            _ => None,
        })
        .collect()
}

pub(crate) fn closes(actions: &[Action], conn: ConnId) -> bool {
    actions.contains(&Action::Close { conn })
}

// ---- configuration ----

const HEX_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

fn lookup<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> + 'a {
    move |k| pairs.iter().find(|(key, _)| *key == k).map(|(_, v)| *v)
}

#[test]
fn config_parses_every_key_with_defaults() {
    let pairs = [
        ("relay_id", "relay-1"),
        ("secret", HEX_A),
        ("devices", "mfp-1,mfp-2"),
        ("mediator", "10.77.0.2"),
        ("mediator_pin", HEX_A),
        ("cloud_pin", HEX_A),
    ];
    let c = parse_config(lookup(&pairs)).unwrap();
    assert_eq!(c.relay_id, "relay-1");
    assert_eq!(c.secret, [0xaa; 32]);
    assert_eq!(c.devices, vec!["mfp-1".to_string(), "mfp-2".to_string()]);
    assert_eq!(c.mediator, MEDIATOR);
    assert_eq!(c.controller_cid, 4);
    assert_eq!((c.backoff_base_ms, c.backoff_max_ms), (250, 30_000));
    assert_eq!((c.heartbeat_ms, c.heartbeat_timeout_ms), (30_000, 45_000));
    let more = [
        ("relay_id", "relay-1"),
        ("secret", HEX_A),
        ("devices", "mfp-1"),
        ("mediator", "10.77.0.2:9000"),
        ("mediator_pin", HEX_A),
        ("cloud_pin", HEX_A),
        ("controller_cid", "9"),
        ("backoff_base_ms", "10"),
        ("backoff_max_ms", "500"),
    ];
    let c = parse_config(lookup(&more)).unwrap();
    assert_eq!(c.mediator.port, 9000);
    assert_eq!(
        (c.controller_cid, c.backoff_base_ms, c.backoff_max_ms),
        (9, 10, 500)
    );
}

#[test]
fn config_errors_name_every_bad_key() {
    let errors = parse_config(lookup(&[])).unwrap_err();
    let keys: Vec<&str> = errors.iter().map(|e| e.key).collect();
    for k in [
        "relay_id",
        "secret",
        "devices",
        "mediator",
        "mediator_pin",
        "cloud_pin",
    ] {
        assert!(keys.contains(&k), "{k} missing from {keys:?}");
    }
    let bad = [
        ("relay_id", "has space"),
        ("secret", "abc"),
        ("devices", "mfp-1,mfp-1,bad id"),
        ("mediator", "10.77.0:80"),
        ("mediator_pin", "zz"),
        ("cloud_pin", HEX_A),
        ("heartbeat_ms", "5000"),
        ("heartbeat_timeout_ms", "5000"),
        ("backoff_base_ms", "x"),
    ];
    let errors = parse_config(lookup(&bad)).unwrap_err();
    let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    for k in [
        "relay_id=",
        "secret=",
        "devices=: mfp-1 is listed twice",
        "mediator=",
        "mediator_pin=",
        "heartbeat_timeout_ms=",
        "backoff_base_ms=",
    ] {
        assert!(
            text.iter().any(|t| t.starts_with(k) || t.contains(k)),
            "{k} not in {text:?}"
        );
    }
    assert!(!text.iter().any(|t| t.starts_with("cloud_pin=")));
}

#[test]
fn net_config_needs_an_address_with_prefix() {
    let n = parse_net(lookup(&[("ip", "10.77.1.10/24"), ("gw", "10.77.1.1")])).unwrap();
    assert_eq!(
        (n.ip, n.prefix_len, n.gateway),
        ([10, 77, 1, 10], 24, Some([10, 77, 1, 1]))
    );
    assert!(parse_net(lookup(&[("ip", "10.77.1.10")])).is_err());
    assert!(parse_net(lookup(&[("ip", "10.77.1.300/24")])).is_err());
    assert!(parse_net(lookup(&[("ip", "10.77.1.1/33")])).is_err());
    let e = parse_net(lookup(&[("ip", "10.0.0.1/8"), ("gw", "nope")])).unwrap_err();
    assert_eq!(e[0].key, "gw");
    assert_eq!(parse_net(lookup(&[])).unwrap_err()[0].key, "ip");
}

// ---- backoff ----

#[test]
fn backoff_doubles_to_the_cap_with_equal_jitter() {
    let mut b = Backoff::new(250, 30_000);
    let mut ceilings = Vec::new();
    for n in 0..12 {
        let c = b.ceiling_ms();
        ceilings.push(c);
        for r in [0, 1, 12345, u64::MAX / 2, u64::MAX] {
            let d = equal_jitter(c, r);
            assert!(
                d >= c / 2 && d < c,
                "attempt {n}: {d} not in [{}, {c})",
                c / 2
            );
        }
        b.next_delay_ms(n);
    }
    assert_eq!(
        &ceilings[..8],
        &[250, 500, 1000, 2000, 4000, 8000, 16_000, 30_000]
    );
    assert!(ceilings[8..].iter().all(|&c| c == 30_000));
    // Forever: no overflow, still capped.
    for _ in 0..200 {
        assert!(b.next_delay_ms(u64::MAX) < 30_000);
    }
    b.reset();
    assert_eq!((b.attempt(), b.ceiling_ms()), (0, 250));
    assert_eq!(b.evicted_delay_ms(), 30_000);
    assert_eq!(b.attempt(), 1);
}

#[test]
fn jitter_is_spread_over_the_upper_half() {
    let (lo, hi) = (0..1000u64)
        .map(|r| equal_jitter(1000, r.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
        .fold((u64::MAX, 0), |(lo, hi), d| (lo.min(d), hi.max(d)));
    assert!(lo < 520 && hi > 980, "spread {lo}..{hi}");
}

// ---- control session ----

#[test]
fn first_tick_dials_the_mediator_and_the_controller() {
    let mut h = H::new();
    let actions = h.tick();
    assert!(actions.contains(&Action::ControllerConnect));
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Dial { endpoint, peer: Peer::Mediator, .. } if *endpoint == MEDIATOR
    )));
}

#[test]
fn login_is_hello_then_proof_of_the_challenge() {
    let mut h = H::new();
    let conn = h.dial();
    h.relay.on_connected(conn, h.now);
    let hello: Vec<RelayToMediator> = sent(&h.relay.take_actions(), conn);
    assert_eq!(
        hello,
        vec![RelayToMediator::Hello {
            version: PROTOCOL_VERSION,
            relay_id: "relay-1".into()
        }]
    );
    let actions = h.feed(conn, &MediatorToRelay::Challenge { nonce: [9; 32] });
    let login: Vec<RelayToMediator> = sent(&actions, conn);
    assert_eq!(
        login,
        vec![RelayToMediator::Login {
            proof: login_proof(&SECRET, "relay-1", &[9; 32]),
            devices: vec!["mfp-1".into(), "mfp-2".into()],
        }]
    );
    let actions = h.feed(
        conn,
        &MediatorToRelay::Welcome {
            session_id: 42,
            heartbeat_ms: 1000,
            heartbeat_timeout_ms: 1500,
        },
    );
    assert!(logs(&actions).contains(&"session up id=42".to_string()));
    assert_eq!(h.relay.session_id(), Some(42));
}

#[test]
fn heartbeat_pings_every_interval_and_times_out_on_silence() {
    let mut h = H::new();
    let conn = h.up();
    assert_eq!(h.relay.next_deadline(), Some(h.now + 1000));
    let a = h.advance(1000);
    assert_eq!(
        sent::<RelayToMediator>(&a, conn),
        vec![RelayToMediator::Ping { seq: 1 }]
    );
    h.feed(conn, &MediatorToRelay::Pong { seq: 1 });
    let a = h.advance(1000);
    assert_eq!(
        sent::<RelayToMediator>(&a, conn),
        vec![RelayToMediator::Ping { seq: 2 }]
    );
    // Silence: 1500 ms after the last frame (the Pong) the session is dead.
    let a = h.advance(499);
    assert!(!closes(&a, conn));
    let a = h.advance(1);
    assert!(closes(&a, conn), "{a:?}");
    assert!(logs(&a)[0].starts_with("session down: heartbeat timeout: nothing heard for 1500 ms"));
    assert_eq!(h.relay.session_id(), None);
}

#[test]
fn any_frame_counts_as_heard() {
    let mut h = H::new();
    let conn = h.up();
    for _ in 0..5 {
        h.advance(1000);
        h.feed(conn, &MediatorToRelay::Pong { seq: 99 });
    }
    assert_eq!(h.relay.session_id(), Some(7));
}

#[test]
fn login_times_out() {
    let mut h = H::new();
    let conn = h.dial();
    h.relay.on_connected(conn, h.now);
    h.relay.take_actions();
    let a = h.advance(14_999);
    assert!(!closes(&a, conn));
    let a = h.advance(1);
    assert!(closes(&a, conn));
    assert!(logs(&a)[0].contains("login timed out after 15000 ms (waiting for Challenge)"));
}

#[test]
fn frames_out_of_order_end_the_session() {
    let cases: Vec<(u8, MediatorToRelay)> = vec![
        (0, MediatorToRelay::Pong { seq: 1 }),
        (
            0,
            MediatorToRelay::Welcome {
                session_id: 1,
                heartbeat_ms: 1,
                heartbeat_timeout_ms: 2,
            },
        ),
        (1, MediatorToRelay::Challenge { nonce: [0; 32] }),
        (2, MediatorToRelay::Challenge { nonce: [0; 32] }),
    ];
    for (stage, msg) in cases {
        let mut h = H::new();
        let conn = if stage == 2 { h.up() } else { h.dial() };
        if stage < 2 {
            h.relay.on_connected(conn, h.now);
        }
        if stage == 1 {
            h.feed(conn, &MediatorToRelay::Challenge { nonce: [0; 32] });
        }
        let a = h.feed(conn, &msg);
        assert!(closes(&a, conn), "{msg:?} at stage {stage}");
        assert!(logs(&a)[0].contains("(400)"), "{:?}", logs(&a));
    }
}

#[test]
fn oversized_or_malformed_control_frames_end_only_the_session() {
    for bytes in [
        ((MAX_CONTROL_FRAME + 1) as u32).to_le_bytes().to_vec(),
        vec![1, 0, 0, 0, 0x7f],
    ] {
        let mut h = H::new();
        let conn = h.up();
        let cloud = crate::tests_tunnel::open_tunnel(&mut h, 5, "mfp-1");
        h.relay.on_data(conn, &bytes, h.now);
        let a = h.relay.take_actions();
        assert!(closes(&a, conn));
        assert!(!closes(&a, cloud), "the tunnel must stay open");
        assert_eq!(h.relay.tunnel_count(), 1);
        let why = &logs(&a)[0];
        assert!(why.contains("(413)") || why.contains("(400)"), "{why}");
    }
}

#[test]
fn refused_login_backs_off_exponentially_and_welcome_resets() {
    let mut h = H::new();
    h.random.set(u64::MAX); // the top of each jitter range
    let mut delays = Vec::new();
    for _ in 0..9 {
        let conn = h.dial();
        h.relay.on_connected(conn, h.now);
        h.feed(conn, &MediatorToRelay::Challenge { nonce: [1; 32] });
        let a = h.feed(
            conn,
            &MediatorToRelay::Refused {
                code: 401,
                message: "bad proof".into(),
            },
        );
        assert!(closes(&a, conn));
        assert!(logs(&a)[0].starts_with("session down: refused 401: bad proof"));
        let retry = h.relay.next_deadline().unwrap();
        delays.push(retry - h.now);
        // Nothing happens before the retry time.
        h.now = retry - 1;
        assert!(h.tick().is_empty());
        h.now = retry;
    }
    let ceilings = [250u64, 500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000];
    for (d, c) in delays.iter().zip(ceilings) {
        assert!(*d >= c / 2 && *d < c, "delay {d} for ceiling {c}");
    }
    h.up();
    assert_eq!(h.relay.backoff().attempt(), 0);
}

#[test]
fn every_way_a_session_ends_leads_to_a_new_dial() {
    for end in 0..4 {
        let mut h = H::new();
        let conn = h.up();
        let a = match end {
            0 => {
                h.relay.on_closed(conn, "TCP reset", h.now);
                h.relay.take_actions()
            }
            1 => h.feed(
                conn,
                &MediatorToRelay::Error {
                    code: 408,
                    message: "timeout".into(),
                },
            ),
            2 => h.feed(
                conn,
                &MediatorToRelay::Evicted {
                    message: "newer login".into(),
                },
            ),
            _ => h.advance(1500),
        };
        assert!(
            logs(&a).iter().any(|l| l.starts_with("session down: ")),
            "{a:?}"
        );
        let retry = h.relay.next_deadline().unwrap();
        if end == 2 {
            assert_eq!(retry, h.now + 30_000, "an evicted relay waits the cap");
        } else {
            assert!(retry > h.now && retry <= h.now + 250);
        }
        h.now = retry;
        let old = h.conn;
        assert_ne!(h.dial(), old, "a fresh connection");
    }
}

#[test]
fn welcome_with_an_unusable_heartbeat_falls_back_to_the_configuration() {
    let mut h = H::new();
    let conn = h.dial();
    h.relay.on_connected(conn, h.now);
    h.feed(conn, &MediatorToRelay::Challenge { nonce: [5; 32] });
    let a = h.feed(
        conn,
        &MediatorToRelay::Welcome {
            session_id: 3,
            heartbeat_ms: 1000,
            heartbeat_timeout_ms: 1000,
        },
    );
    assert!(logs(&a)[0].contains("using 30000/45000 ms"));
    assert_eq!(h.relay.next_deadline(), Some(h.now + 30_000));
}

#[test]
fn restore_starts_a_fresh_session_and_reports_open_tunnels_closed() {
    let mut h = H::new();
    let conn = h.up();
    let cloud = crate::tests_tunnel::open_tunnel(&mut h, 5, "mfp-1");
    h.relay.on_restored(h.now);
    let a = h.relay.take_actions();
    assert!(
        !a.contains(&Action::ControllerClose),
        "vsock survives a restore"
    );
    assert!(logs(&a)
        .iter()
        .any(|l| l == "session down: restored from a snapshot"));
    assert_eq!((h.relay.session_id(), h.relay.tunnel_count()), (None, 0));
    assert!(
        sent::<RelayToMediator>(&a, conn).is_empty(),
        "nothing goes out on the dead session"
    );
    // Events of the old connections are ignored.
    h.relay.on_data(cloud, &encode(&CloudToRelay::Close), h.now);
    h.relay.on_closed(conn, "gone", h.now);
    assert!(h.relay.take_actions().is_empty());
    // A new session at once, which hears of the tunnel's end right after `Welcome`; a
    // re-offer of the tunnel gets its final report.
    let new = h.dial();
    assert_ne!(new, conn);
    h.relay.on_connected(new, h.now);
    h.feed(new, &MediatorToRelay::Challenge { nonce: [5; 32] });
    let a = h.feed(
        new,
        &MediatorToRelay::Welcome {
            session_id: 2,
            heartbeat_ms: 1000,
            heartbeat_timeout_ms: 1500,
        },
    );
    assert_eq!(
        sent::<RelayToMediator>(&a, new),
        vec![RelayToMediator::TunnelClosed {
            tunnel_id: 5,
            jobs: vec![]
        }]
    );
    let again = MediatorToRelay::TunnelRequest {
        tunnel_id: 5,
        device_id: "mfp-1".into(),
        cloud: crate::tests_tunnel::CLOUD,
        ticket: crate::tests_tunnel::ticket(5, "mfp-1"),
    };
    let a = h.feed(new, &again);
    let closed = RelayToMediator::TunnelClosed {
        tunnel_id: 5,
        jobs: vec![],
    };
    assert_eq!(sent::<RelayToMediator>(&a, new), vec![closed]);
}

#[test]
fn reports_wait_for_the_next_session() {
    let mut h = H::new();
    let conn = h.up();
    let cloud = crate::tests_tunnel::open_tunnel(&mut h, 8, "mfp-2");
    h.relay.on_closed(conn, "reset", h.now);
    h.relay.take_actions();
    // The tunnel ends while there is no session.
    h.relay.on_data(cloud, &encode(&CloudToRelay::Close), h.now);
    let a = h.relay.take_actions();
    assert_eq!(
        sent::<RelayToCloud>(&a, cloud),
        vec![RelayToCloud::Closed { jobs: 0 }]
    );
    h.now = h.relay.next_deadline().unwrap();
    let new = h.dial();
    h.relay.on_connected(new, h.now);
    h.feed(new, &MediatorToRelay::Challenge { nonce: [5; 32] });
    let a = h.feed(
        new,
        &MediatorToRelay::Welcome {
            session_id: 8,
            heartbeat_ms: 1000,
            heartbeat_timeout_ms: 1500,
        },
    );
    assert_eq!(
        sent::<RelayToMediator>(&a, new),
        vec![RelayToMediator::TunnelClosed {
            tunnel_id: 8,
            jobs: vec![]
        }]
    );
}
