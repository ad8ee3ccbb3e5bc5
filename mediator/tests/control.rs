//! The mediator's control sessions, against the `duplex-mediator` binary on loopback:
//! login refusals (and their log lines), eviction by a newer login, bad frames closing
//! only their connection, the heartbeat timeout, and the command line.

mod common;

use std::time::Duration;

use common::*;
use duplex_mediator::sim::client::{connect_control, login, ControlConn};
use duplex_mediator::sim::device::FakeDevice;
use duplex_mediator::tls::pinned_client_config;
use duplex_mediator::wire::WireError;
use duplex_tunnel::{MediatorToRelay, RelayToMediator};

async fn connect(m: &Proc) -> ControlConn {
    connect_control(
        m.addr("relays"),
        pinned_client_config(m.pin()).expect("client TLS config"),
    )
    .await
    .expect("connect to the mediator")
}

async fn logged_in(m: &Proc, id: &str, devices: &[&str]) -> (ControlConn, u64) {
    let mut c = connect(m).await;
    let devices: Vec<String> = devices.iter().map(|d| d.to_string()).collect();
    match login(&mut c, id, &SECRET, &devices)
        .await
        .expect("login exchange")
    {
        MediatorToRelay::Welcome { session_id, .. } => (c, session_id),
        other => panic!("login of {id}: {other:?}"),
    }
}

/// The connection ends (EOF or reset) within 5 s, after any frames listed.
async fn assert_closed(c: &mut ControlConn) {
    match c.recv_within(Duration::from_secs(5)).await {
        Err(WireError::Closed | WireError::Truncated | WireError::Io(_)) => {}
        other => panic!("expected the server to close, got {other:?}"),
    }
}

async fn ping(c: &mut ControlConn, seq: u64) {
    c.send(&RelayToMediator::Ping { seq })
        .await
        .expect("send Ping");
    assert_eq!(
        c.recv_within(Duration::from_secs(5)).await.expect("Pong"),
        MediatorToRelay::Pong { seq }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_refusals_are_answered_and_logged() {
    let dir = TempDir::new("login");
    let m = start_mediator(&dir, &MediatorSpec::new(vec![relay("r1", &["d1", "d2"])]));

    // Wrong secret: 401, logged with the relay id, the reason and the peer.
    let mut c = connect(&m).await;
    let answer = login(&mut c, "r1", &[0x22; 32], &[]).await.unwrap();
    assert!(
        matches!(answer, MediatorToRelay::Refused { code: 401, .. }),
        "{answer:?}"
    );
    assert_closed(&mut c).await;
    wait_for_log(
        &m,
        "login refused: relay r1: wrong login proof from 127.0.0.1:",
    )
    .await;

    // Unknown relay: the same answer.
    let mut c = connect(&m).await;
    let answer = login(&mut c, "ghost", &SECRET, &[]).await.unwrap();
    assert!(
        matches!(answer, MediatorToRelay::Refused { code: 401, .. }),
        "{answer:?}"
    );
    assert_closed(&mut c).await;
    wait_for_log(
        &m,
        "login refused: relay ghost: unknown relay from 127.0.0.1:",
    )
    .await;

    // A device not listed for the relay: 403.
    let mut c = connect(&m).await;
    let answer = login(&mut c, "r1", &SECRET, &["d1".into(), "d9".into()])
        .await
        .unwrap();
    match answer {
        MediatorToRelay::Refused { code: 403, message } => {
            assert!(message.contains("d9"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_closed(&mut c).await;

    // Another protocol version: 426; Login before Hello: 400.
    let mut c = connect(&m).await;
    c.send(&RelayToMediator::Hello {
        version: 2,
        relay_id: "r1".into(),
    })
    .await
    .unwrap();
    assert!(matches!(
        c.recv().await.unwrap(),
        MediatorToRelay::Refused { code: 426, .. }
    ));
    let mut c = connect(&m).await;
    c.send(&RelayToMediator::Login {
        proof: [0; 32],
        devices: vec![],
    })
    .await
    .unwrap();
    assert!(matches!(
        c.recv().await.unwrap(),
        MediatorToRelay::Refused { code: 400, .. }
    ));

    // The right secret still logs in, and the relay is online with what it announced.
    let (mut ok, session) = logged_in(&m, "r1", &["d2"]).await;
    ping(&mut ok, 1).await;
    let st = relay_status(m.addr("api"), "r1").await;
    assert_eq!(st["online"], true);
    assert_eq!(st["session_id"], session);
    assert_eq!(st["devices"], serde_json::json!(["d2"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_login_evicts_the_first() {
    let dir = TempDir::new("evict");
    let m = start_mediator(&dir, &MediatorSpec::new(vec![relay("r1", &["d1"])]));
    let (mut first, s1) = logged_in(&m, "r1", &["d1"]).await;
    ping(&mut first, 1).await;
    let (mut second, s2) = logged_in(&m, "r1", &["d1"]).await;
    assert_ne!(s1, s2);
    match first.recv_within(Duration::from_secs(5)).await.unwrap() {
        MediatorToRelay::Evicted { message } => assert!(message.contains("r1"), "{message}"),
        other => panic!("expected Evicted, got {other:?}"),
    }
    assert_closed(&mut first).await;
    ping(&mut second, 1).await;
    let st = relay_status(m.addr("api"), "r1").await;
    assert_eq!(
        (st["online"].clone(), st["session_id"].clone()),
        (true.into(), s2.into())
    );
    wait_for_log(&m, &format!("relay r1 session {s1} ended: evicted")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_their_connection() {
    let dir = TempDir::new("frames");
    let relays = vec![relay("r1", &[]), relay("r2", &[]), relay("r3", &[])];
    let m = start_mediator(&dir, &MediatorSpec::new(relays));
    let (mut good, _) = logged_in(&m, "r2", &[]).await;

    // A frame that is no message, after login: Error 400, closed.
    let (mut a, _) = logged_in(&m, "r1", &[]).await;
    a.send_raw(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).await.unwrap();
    assert!(matches!(
        a.recv().await.unwrap(),
        MediatorToRelay::Error { code: 400, .. }
    ));
    assert_closed(&mut a).await;

    // A length prefix over 16 KiB, after login: Error 413, closed.
    let (mut b, _) = logged_in(&m, "r3", &[]).await;
    b.send_raw(&(16 * 1024 + 1u32).to_le_bytes()).await.unwrap();
    assert!(matches!(
        b.recv().await.unwrap(),
        MediatorToRelay::Error { code: 413, .. }
    ));
    assert_closed(&mut b).await;

    // Before login: Refused 413 and Refused 400.
    let mut c = connect(&m).await;
    c.send_raw(&(1u32 << 20).to_le_bytes()).await.unwrap();
    assert!(matches!(
        c.recv().await.unwrap(),
        MediatorToRelay::Refused { code: 413, .. }
    ));
    let mut c = connect(&m).await;
    c.send_raw(&[1, 0, 0, 0, 0x7f]).await.unwrap();
    assert!(matches!(
        c.recv().await.unwrap(),
        MediatorToRelay::Refused { code: 400, .. }
    ));

    // The other session is untouched: heartbeats answered, still online.
    for seq in 1..=3 {
        ping(&mut good, seq).await;
    }
    let st = relay_status(m.addr("api"), "r2").await;
    assert_eq!(st["online"], true);
    assert_eq!(relay_status(m.addr("api"), "r1").await["online"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_session_is_closed_after_the_heartbeat_timeout() {
    let dir = TempDir::new("heartbeat");
    let mut spec = MediatorSpec::new(vec![relay("quiet", &[]), relay("chatty", &["d1"])]);
    spec.heartbeat_ms = 200;
    spec.heartbeat_timeout_ms = 600;
    let m = start_mediator(&dir, &spec);
    let chatty = sim_relay(
        &m,
        [0; 32],
        "chatty",
        &["d1"],
        std::sync::Arc::new(FakeDevice::new()),
    );
    wait_for(Duration::from_secs(10), "chatty online", || {
        let up = chatty.online();
        async move { up }
    })
    .await;
    let (mut quiet, _) = logged_in(&m, "quiet", &[]).await;
    let api = m.addr("api");
    assert_eq!(relay_status(api, "quiet").await["online"], true);
    let start = std::time::Instant::now();
    match quiet.recv_within(Duration::from_secs(5)).await.unwrap() {
        MediatorToRelay::Error { code: 408, .. } => {}
        other => panic!("expected Error 408, got {other:?}"),
    }
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(500),
        "closed too early: {waited:?}"
    );
    assert_closed(&mut quiet).await;
    let st = relay_status(api, "quiet").await;
    assert_eq!(st["online"], false, "{st}");
    assert!(st["last_heard_ms"].as_u64().is_some());
    // The relay that pings stays online through several timeouts' worth of time.
    assert!(chatty.online());
    assert_eq!(relay_status(api, "chatty").await["online"], true);
    assert!(chatty.stats.pongs.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    assert_eq!(
        chatty
            .stats
            .welcomes
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    wait_for_log(&m, "relay quiet session").await;
    assert!(m.log_text().contains("heartbeat timeout"));
    chatty.kill().await;
}

#[test]
fn command_line_keygen_pin_and_config_errors() {
    let dir = TempDir::new("cli");
    let bin = env!("CARGO_BIN_EXE_duplex-mediator");
    let out = std::process::Command::new(bin)
        .args(["keygen", "--out", s(&dir.path("k")), "--name", "127.0.0.1"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    let pin = printed.trim().strip_prefix("pin ").unwrap().to_string();
    assert_eq!(pin.len(), 64);
    let out = std::process::Command::new(bin)
        .args(["pin", "--cert", s(&dir.path("k/cert.pem"))])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("pin {pin}")
    );

    // A heartbeat timeout not above the interval: refused, naming the field.
    let cfg = dir.path("bad.json");
    std::fs::write(
        &cfg,
        r#"{"cert":"k/cert.pem","key":"k/key.pem","heartbeat_ms":1000,"heartbeat_timeout_ms":900}"#,
    )
    .unwrap();
    let out = std::process::Command::new(bin)
        .args(["serve", "--config", s(&cfg)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("heartbeat_timeout_ms"), "{err}");
    let out = std::process::Command::new(bin)
        .args(["pin", "--cert", s(&cfg)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr).unwrap().contains("bad.json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_sim_binary_holds_sessions() {
    let dir = TempDir::new("simbin");
    let relays = (0..5).map(|i| relay(&format!("sim-{i}"), &[])).collect();
    let m = start_mediator(&dir, &MediatorSpec::new(relays));
    let (addr, pin) = (
        m.addr("relays").to_string(),
        duplex_mediator::util::hex(&m.pin()),
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_duplex-relay-sim"))
            .args([
                "--mediator",
                &addr,
                "--mediator-pin",
                &pin,
                "--secret",
                &duplex_mediator::util::hex(&SECRET),
            ])
            .args([
                "--sessions",
                "5",
                "--relay-prefix",
                "sim-",
                "--seconds",
                "3",
            ])
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["online"], 5, "{last}");
    assert!(last["pongs"].as_u64().unwrap() >= 5, "{last}");
}
