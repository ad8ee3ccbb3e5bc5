//! Sleep and wake on loopback, against the `duplex-mediator` and `duplex-cloud` binaries:
//! a sleeping relay woken through a substitute (its magic packet over UDP) and carrying
//! its job on its own tunnel; a relay that never wakes (`wake_timeout`); no awake relay on
//! the segment (`no_substitute`); relays of another segment never asked; `Sleep` refused
//! while a tunnel is open (423) or the lease is bad (400), and bad `Lan` / `WakeSent`
//! ending their session; a sleep lease surviving a mediator restart.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use duplex_mediator::http;
use duplex_mediator::sim::client::{connect_control, login, ControlConn};
use duplex_mediator::sim::device::FakeDevice;
use duplex_mediator::sim::RelaySim;
use duplex_mediator::tls::pinned_client_config;
use duplex_tunnel::{MediatorToRelay, RelayToMediator};
use serde_json::{json, Value};

const MAC_A: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x0a];
const MAC_B: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x0b];

fn job(device: &str, seed: u64) -> Value {
    json!({"device_id": device, "pages": 2, "seed": seed, "width": 64, "height": 48,
           "timeout_s": 30})
}

/// A mediator with relays relay-a (pa), relay-b (pb), relay-c (pc), relay-x (px).
fn spec(wake: Option<(u64, u64, u32)>) -> MediatorSpec {
    let mut s = MediatorSpec::new(vec![
        relay("relay-a", &["pa"]),
        relay("relay-b", &["pb"]),
        relay("relay-c", &["pc"]),
        relay("relay-x", &["px"]),
    ]);
    // Raw test clients do not ping.
    s.heartbeat_timeout_ms = 60_000;
    s.wake = wake;
    s
}

/// A substitute on lan-1 sending its magic packets to `wake_to`.
fn substitute(m: &Proc, cloud_pin: [u8; 32], wake_to: std::net::SocketAddr) -> RelaySim {
    sim_relay_with(
        m,
        cloud_pin,
        "relay-a",
        &["pa"],
        Arc::new(FakeDevice::new()),
        |c| {
            c.mac = Some(MAC_A);
            c.segment = Some("lan-1".into());
            c.wake_to = Some(wake_to);
        },
    )
}

/// relay-b on lan-1, asleep after 1 s idle, woken at a UDP port of its own.
fn sleeper(m: &Proc, cloud_pin: [u8; 32], device: Arc<FakeDevice>) -> RelaySim {
    sim_relay_with(m, cloud_pin, "relay-b", &["pb"], device, |c| {
        c.mac = Some(MAC_B);
        c.segment = Some("lan-1".into());
        c.sleep_idle_ms = Some(1000);
        c.wake_listen = Some("127.0.0.1:0".parse().expect("address"));
    })
}

async fn wait_state(api: std::net::SocketAddr, relay: &str, state: &str) {
    wait_for(
        Duration::from_secs(15),
        &format!("{relay} {state}"),
        || async move { relay_status(api, relay).await["state"] == state },
    )
    .await;
}

async fn tunnel_record(api: std::net::SocketAddr, id: u64) -> Value {
    api_get(api, &format!("/v1/tunnels/{id}")).await.body
}

/// `POST /v1/devices/{device}/tunnels` as cloud-1: status and body.
async fn ask(api: std::net::SocketAddr, device: &str) -> (u16, Value) {
    let r = http::request(
        &format!("http://{api}"),
        "POST",
        &format!("/v1/devices/{device}/tunnels"),
        Some(TOKEN),
        Some(&json!({"dial": "127.0.0.1:9"})),
        Duration::from_secs(10),
    )
    .await
    .expect("mediator API");
    (r.status, r.body)
}

async fn connect(m: &Proc) -> ControlConn {
    connect_control(
        m.addr("relays"),
        pinned_client_config(m.pin()).expect("client TLS config"),
    )
    .await
    .expect("connect to the mediator")
}

/// A raw session of `id`, logged in, that sent `Lan` for `segment` if given.
async fn raw(m: &Proc, id: &str, device: &str, segment: Option<&str>) -> ControlConn {
    let mut c = connect(m).await;
    let welcome = login(&mut c, id, &SECRET, &[device.to_string()])
        .await
        .expect("login");
    assert!(
        matches!(welcome, MediatorToRelay::Welcome { .. }),
        "{welcome:?}"
    );
    if let Some(segment) = segment {
        c.send(&RelayToMediator::Lan {
            segment: segment.into(),
            mac: MAC_A,
        })
        .await
        .expect("send Lan");
    }
    c
}

/// Sends `Sleep` and returns the answer.
async fn ask_sleep(c: &mut ControlConn, device: &str, segment: &str) -> MediatorToRelay {
    c.send(&RelayToMediator::Sleep {
        devices: vec![device.into()],
        mac: MAC_B,
        segment: segment.into(),
    })
    .await
    .expect("send Sleep");
    c.recv_within(Duration::from_secs(5))
        .await
        .expect("Sleep answered")
}

/// A raw relay that asks to sleep, is granted it and closes its session.
async fn raw_sleeper(m: &Proc, id: &str, device: &str, segment: &str) {
    let mut c = raw(m, id, device, Some(segment)).await;
    assert_eq!(
        ask_sleep(&mut c, device, segment).await,
        MediatorToRelay::SleepGranted
    );
    let _ = c.send(&RelayToMediator::Bye).await;
    wait_state(m.addr("api"), id, "sleeping").await;
}

/// The next `WakeRelay` on `c` within `limit`, or `None`.
async fn next_wake(c: &mut ControlConn, limit: Duration) -> Option<MediatorToRelay> {
    match c.recv_within(limit).await {
        Ok(msg @ MediatorToRelay::WakeRelay { .. }) => Some(msg),
        Ok(other) => panic!("expected WakeRelay, got {other:?}"),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_relay_is_woken_through_a_substitute_and_carries_its_job() {
    let dir = TempDir::new("wake");
    let m = start_mediator(&dir, &spec(None));
    let api = m.addr("api");
    let cloud = start_cloud(&dir, api);
    let dev_b = Arc::new(FakeDevice::new());
    let b = sleeper(&m, cloud.pin(), dev_b.clone());
    let b_wake = b.wake_addr.expect("b's wake socket");
    let dev_a = Arc::new(FakeDevice::new());
    let a = sim_relay_with(&m, cloud.pin(), "relay-a", &["pa"], dev_a.clone(), |c| {
        c.mac = Some(MAC_A);
        c.segment = Some("lan-1".into());
        c.wake_to = Some(b_wake);
    });

    // B goes idle, asks to sleep, is granted, closes its session: sleeping, lease shown.
    wait_state(api, "relay-b", "sleeping").await;
    wait_for(Duration::from_secs(5), "b asleep", || {
        let asleep = b.asleep();
        async move { asleep }
    })
    .await;
    let st = relay_status(api, "relay-b").await;
    assert_eq!(st["online"], false, "{st}");
    assert_eq!(st["lease"]["mac"], "52:54:00:00:00:0b", "{st}");
    assert_eq!(st["lease"]["segment"], "lan-1", "{st}");
    assert_eq!(st["lease"]["devices"], json!(["pb"]), "{st}");
    assert_eq!(st["segment"], "lan-1", "{st}");
    wait_state(api, "relay-a", "active").await;
    assert_eq!(relay_status(api, "relay-a").await["segment"], "lan-1");
    wait_for_log(&m, "relay relay-b is asleep").await;
    let welcomes_asleep = b.stats.welcomes.load(Ordering::SeqCst);

    // A job for B's device: A is asked, sends the magic packet to B's socket, B wakes,
    // logs in and carries the job on its own tunnel.
    let report = submit(&cloud, job("pb", 5)).await;
    assert_eq!(report["state"], "done", "{report}");
    assert_eq!(report["checksums_ok"], true, "{report}");
    assert_eq!(report["wake"]["substitute"], "relay-a", "{report}");
    assert_eq!(report["tunnel_error"], Value::Null, "{report}");
    let id = report["tunnel_id"].as_u64().expect("tunnel id");
    assert!(a.stats.wake_requests.load(Ordering::SeqCst) >= 1);
    assert!(a.stats.magic_sent.load(Ordering::SeqCst) >= 1);
    assert_eq!(
        b.stats.wakes.load(Ordering::SeqCst),
        1,
        "woken by the magic packet"
    );
    assert!(b.stats.welcomes.load(Ordering::SeqCst) > welcomes_asleep);
    assert_eq!(
        b.stats.dials_asleep.load(Ordering::SeqCst),
        0,
        "no TCP while asleep"
    );
    wait_for(Duration::from_secs(10), "tunnel closed", || async move {
        tunnel_record(api, id).await["state"] == "closed"
    })
    .await;
    let rec = tunnel_record(api, id).await;
    assert_eq!(rec["relay_id"], "relay-b", "{rec}");
    assert_eq!(rec["jobs"], json!([report["job_id"]]), "{rec}");
    let w = &rec["wake"];
    assert_eq!(
        (&w["relay_id"], &w["substitute"], &w["segment"]),
        (&json!("relay-b"), &json!("relay-a"), &json!("lan-1")),
        "{rec}"
    );
    assert!(w["attempts"].as_u64().unwrap_or(0) >= 1, "{rec}");
    for k in ["requested_ms", "sent_ms", "woken_ms", "deadline_ms"] {
        assert!(w[k].is_u64(), "{k}: {rec}");
    }
    assert_eq!(
        (dev_b.prints(), dev_a.prints()),
        (1, 0),
        "printed once, by B"
    );
    let st = relay_status(api, "relay-b").await;
    assert_eq!(st["last_wake"]["outcome"], "woken", "{st}");
    assert!(m
        .log_text()
        .contains("sent the magic packet for relay relay-b"));
    a.kill().await;
    b.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_never_wakes_fails_its_requests_with_wake_timeout() {
    let dir = TempDir::new("wake-timeout");
    let m = start_mediator(&dir, &spec(Some((2000, 500, 3))));
    let api = m.addr("api");
    let cloud = start_cloud(&dir, api);
    let b = sleeper(&m, cloud.pin(), Arc::new(FakeDevice::new()));
    let b_wake = b.wake_addr.expect("b's wake socket");
    let a = substitute(&m, cloud.pin(), b_wake);
    wait_state(api, "relay-b", "sleeping").await;
    // B dies in its sleep: the server still thinks it sleeps.
    b.kill().await;

    let start = Instant::now();
    let report = submit(&cloud, job("pb", 6)).await;
    let took = start.elapsed();
    assert_eq!(report["state"], "failed", "{report}");
    assert_eq!(report["tunnel_error"]["code"], "wake_timeout", "{report}");
    assert_eq!(
        report["tunnel_error"]["message"],
        "relay relay-b did not wake within 2000 ms (3 wake requests through relay-a)",
        "{report}"
    );
    assert_eq!(report["wake"]["substitute"], "relay-a", "{report}");
    assert!(
        report["error"]
            .as_str()
            .is_some_and(|e| e.contains("wake_timeout")),
        "{report}"
    );
    assert!(took >= Duration::from_millis(1900), "{took:?}");
    assert!(took < Duration::from_millis(2000 + 4000), "{took:?}");
    assert_eq!(a.stats.wake_requests.load(Ordering::SeqCst), 3);
    let st = relay_status(api, "relay-b").await;
    assert_eq!(st["state"], "sleeping", "asleep again: {st}");
    assert_eq!(st["last_wake"]["outcome"], "wake_timeout", "{st}");

    // A keeps working.
    let ok = submit(&cloud, job("pa", 7)).await;
    assert_eq!(ok["state"], "done", "{ok}");
    assert_eq!(ok["wake"], Value::Null, "{ok}");
    a.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_awake_relay_on_the_segment_the_request_fails_at_once_no_substitute() {
    let dir = TempDir::new("wake-nosub");
    let m = start_mediator(&dir, &spec(None));
    let api = m.addr("api");
    let cloud = start_cloud(&dir, api);
    // Both relays of lan-1 asleep.
    raw_sleeper(&m, "relay-a", "pa", "lan-1").await;
    raw_sleeper(&m, "relay-b", "pb", "lan-1").await;

    let (status, rec) = ask(api, "pb").await;
    assert_eq!(status, 201, "{rec}");
    assert_eq!(rec["state"], "failed", "{rec}");
    assert_eq!(rec["error"]["code"], "no_substitute", "{rec}");
    assert_eq!(
        rec["error"]["message"],
        "relay relay-b is asleep and no awake relay on segment lan-1 can wake it"
    );
    assert_eq!(rec["wake"]["substitute"], Value::Null, "{rec}");

    // `duplex-cloud submit` prints it as one JSON object and fails at once.
    let server = format!("http://{}", cloud.addr("api"));
    let start = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_duplex-cloud"))
            .args(["submit", "--device", "pb", "--pages", "1", "--seed", "3"])
            .args(["--server", &server, "--timeout-s", "30"])
            .output()
    })
    .await
    .expect("join")
    .expect("run duplex-cloud submit");
    assert!(!out.status.success());
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    let stdout = String::from_utf8(out.stdout).expect("UTF-8");
    let last: Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("JSON");
    assert_eq!(last["state"], "failed", "{last}");
    assert_eq!(last["tunnel_error"]["code"], "no_substitute", "{last}");
    assert!(
        last["error"]
            .as_str()
            .is_some_and(|e| e.contains("no awake relay on segment lan-1")),
        "{last}"
    );
    let st = relay_status(api, "relay-b").await;
    assert_eq!(
        (&st["state"], &st["last_wake"]["outcome"]),
        (&json!("sleeping"), &json!("no_substitute")),
        "{st}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_on_another_segment_is_never_asked() {
    let dir = TempDir::new("wake-segment");
    let m = start_mediator(&dir, &spec(Some((1500, 500, 3))));
    let api = m.addr("api");
    let mut x = raw(&m, "relay-x", "px", Some("lan-2")).await;
    let mut c = raw(&m, "relay-c", "pc", Some("lan-1")).await;
    raw_sleeper(&m, "relay-b", "pb", "lan-1").await;
    wait_state(api, "relay-c", "active").await;

    let (status, rec) = ask(api, "pb").await;
    assert_eq!(status, 201);
    assert_eq!(rec["state"], "waking", "{rec}");
    assert_eq!(rec["wake"]["substitute"], "relay-c", "{rec}");
    let id = rec["tunnel_id"].as_u64().expect("tunnel id");
    let st = relay_status(api, "relay-b").await;
    assert_eq!(
        (&st["state"], &st["wake"]["substitute"]),
        (&json!("waking"), &json!("relay-c")),
        "{st}"
    );
    let Some(MediatorToRelay::WakeRelay {
        wake_id,
        relay_id,
        mac,
        device_id,
        tunnel_id,
    }) = next_wake(&mut c, Duration::from_secs(5)).await
    else {
        panic!("relay-c was not asked")
    };
    assert_eq!(
        (relay_id.as_str(), mac, device_id.as_str(), tunnel_id),
        ("relay-b", MAC_B, "pb", id)
    );
    c.send(&RelayToMediator::WakeSent {
        wake_id,
        sent: true,
        code: 0,
        message: String::new(),
    })
    .await
    .expect("send WakeSent");
    // relay-c leaves: the retries find no one on lan-1, and relay-x is never asked.
    c.send(&RelayToMediator::Bye).await.expect("send Bye");
    assert!(next_wake(&mut x, Duration::from_millis(2500))
        .await
        .is_none());
    let rec = tunnel_record(api, id).await;
    assert_eq!(rec["error"]["code"], "wake_timeout", "{rec}");
    assert_eq!(
        rec["error"]["message"],
        "relay relay-b did not wake within 1500 ms (1 wake request through relay-c)"
    );
    // With only relay-x awake, a new request fails at once.
    let (_, rec) = ask(api, "pb").await;
    assert_eq!(rec["error"]["code"], "no_substitute", "{rec}");
    assert!(next_wake(&mut x, Duration::from_millis(300))
        .await
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleep_is_refused_while_a_tunnel_is_open_and_bad_reports_end_the_session() {
    let dir = TempDir::new("wake-refused");
    let m = start_mediator(&dir, &spec(None));
    let api = m.addr("api");
    let mut b = raw(&m, "relay-b", "pb", Some("lan-1")).await;
    let (_, rec) = ask(api, "pb").await;
    let id = rec["tunnel_id"].as_u64().expect("tunnel id");
    match b
        .recv_within(Duration::from_secs(5))
        .await
        .expect("request")
    {
        MediatorToRelay::TunnelRequest { tunnel_id, .. } => assert_eq!(tunnel_id, id),
        other => panic!("expected TunnelRequest, got {other:?}"),
    }
    b.send(&RelayToMediator::TunnelAccepted { tunnel_id: id })
        .await
        .expect("send TunnelAccepted");
    let answer = ask_sleep(&mut b, "pb", "lan-1").await;
    assert_eq!(
        answer,
        MediatorToRelay::SleepRefused {
            code: 423,
            message: "1 tunnel request is pending, offered or open for relay relay-b".into()
        }
    );
    assert_eq!(relay_status(api, "relay-b").await["state"], "active");
    // A bad lease: 400, the session goes on.
    for (device, segment) in [("pa", "lan-1"), ("pb", "no spaces")] {
        match ask_sleep(&mut b, device, segment).await {
            MediatorToRelay::SleepRefused { code: 400, .. } => {}
            other => panic!("{device} {segment:?}: {other:?}"),
        }
    }
    b.send(&RelayToMediator::TunnelClosed {
        tunnel_id: id,
        jobs: vec![],
    })
    .await
    .expect("send TunnelClosed");
    assert_eq!(
        ask_sleep(&mut b, "pb", "lan-1").await,
        MediatorToRelay::SleepGranted
    );
    wait_for_log(&m, "relay relay-b may not sleep: 423").await;
    wait_for_log(&m, "relay relay-b may sleep").await;

    // A WakeSent nobody asked for: Error 404, closed.
    let mut a = raw(&m, "relay-a", "pa", Some("lan-1")).await;
    a.send(&RelayToMediator::WakeSent {
        wake_id: 99,
        sent: true,
        code: 0,
        message: String::new(),
    })
    .await
    .expect("send WakeSent");
    match a.recv_within(Duration::from_secs(5)).await {
        Ok(MediatorToRelay::Error { code: 404, .. }) => {}
        other => panic!("expected Error 404, got {other:?}"),
    }
    // A Lan with an invalid segment: Error 400, closed.
    let mut c = raw(&m, "relay-c", "pc", None).await;
    c.send(&RelayToMediator::Lan {
        segment: "two words".into(),
        mac: MAC_A,
    })
    .await
    .expect("send Lan");
    match c.recv_within(Duration::from_secs(5)).await {
        Ok(MediatorToRelay::Error { code: 400, .. }) => {}
        other => panic!("expected Error 400, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleep_lease_survives_a_mediator_restart() {
    let dir = TempDir::new("wake-restart");
    let s = spec(None);
    let mut m = start_mediator(&dir, &s);
    let api = m.addr("api");
    let cloud = start_cloud(&dir, api);
    let dev_b = Arc::new(FakeDevice::new());
    let b = sleeper(&m, cloud.pin(), dev_b.clone());
    let b_wake = b.wake_addr.expect("b's wake socket");
    wait_state(api, "relay-b", "sleeping").await;

    let relay_addr = m.addr("relays");
    m.kill();
    let mut s2 = spec(None);
    s2.relay_listen = Some(relay_addr);
    s2.api_listen = Some(api);
    let m = start_mediator(&dir, &s2);
    let st = relay_status(api, "relay-b").await;
    assert_eq!(st["state"], "sleeping", "the lease survived: {st}");
    assert_eq!(st["lease"]["mac"], "52:54:00:00:00:0b", "{st}");
    assert!(b.asleep(), "b slept through the restart");

    // A substitute logs in to the new server; the job wakes B through it.
    let a = substitute(&m, cloud.pin(), b_wake);
    wait_state(api, "relay-a", "active").await;
    wait_for(Duration::from_secs(5), "relay-a's Lan", || async move {
        relay_status(api, "relay-a").await["segment"] == "lan-1"
    })
    .await;
    let report = submit(&cloud, job("pb", 8)).await;
    assert_eq!(report["state"], "done", "{report}");
    assert_eq!(report["wake"]["substitute"], "relay-a", "{report}");
    assert_eq!(dev_b.prints(), 1);
    a.kill().await;
    b.kill().await;
}
