//! End to end on loopback: the `duplex-mediator` and `duplex-cloud` binaries and a
//! simulated relay with a fake device. Jobs print with the right checksums, tunnels close
//! and are not reused, documents arrive whole, tickets are checked, and requests survive a
//! mediator restart, a relay outage and a tunnel lost mid-job (its connection broken, or
//! forgotten by a relay restored from a snapshot), printing exactly once.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use duplex_mediator::cloud::document::document_crc32;
use duplex_mediator::cloud::document::expected_checksums;
use duplex_mediator::sim::client::{connect_control, dial, login, ControlConn};
use duplex_mediator::sim::device::FakeDevice;
use duplex_mediator::tls::pinned_client_config;
use duplex_tunnel::{
    CloudToRelay, JobOutcome, MediatorToRelay, RelayToCloud, RelayToMediator, Ticket, TicketBody,
};
use serde_json::{json, Value};

fn job(device: &str, pages: u32, seed: u64) -> Value {
    json!({"device_id": device, "pages": pages, "seed": seed, "width": 64, "height": 48})
}

fn assert_done(r: &Value) {
    assert_eq!(r["state"], "done", "{r}");
    assert_eq!(r["checksums_ok"], true, "{r}");
}

struct Scene {
    dir: TempDir,
    mediator: Proc,
    cloud: Proc,
}

fn scene(tag: &str, relays: Vec<Value>) -> Scene {
    let dir = TempDir::new(tag);
    let mediator = start_mediator(&dir, &MediatorSpec::new(relays));
    let cloud = start_cloud(&dir, mediator.addr("api"));
    Scene {
        dir,
        mediator,
        cloud,
    }
}

async fn wait_online(api: std::net::SocketAddr, relay: &str, online: bool) {
    wait_for(
        Duration::from_secs(10),
        &format!("{relay} online={online}"),
        || async move { relay_status(api, relay).await["online"] == online },
    )
    .await;
}

async fn mediator_tunnel(api: std::net::SocketAddr, id: u64) -> Value {
    api_get(api, &format!("/v1/tunnels/{id}")).await.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_print_through_fresh_tunnels_with_whole_documents() {
    let sc = scene("e2e", vec![relay("r1", &["printer-1"])]);
    let api = sc.mediator.addr("api");
    let device = Arc::new(FakeDevice::new());
    let relay_sim = sim_relay(
        &sc.mediator,
        sc.cloud.pin(),
        "r1",
        &["printer-1"],
        device.clone(),
    );
    wait_online(api, "r1", true).await;

    // 1. Through the `submit` command: one JSON object, exit 0.
    let server = format!("http://{}", sc.cloud.addr("api"));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_duplex-cloud"))
            .args([
                "submit",
                "--device",
                "printer-1",
                "--pages",
                "3",
                "--seed",
                "7",
                "--width",
                "64",
                "--height",
                "48",
            ])
            .args(["--server", &server, "--timeout-s", "30"])
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let first: Value = serde_json::from_str(&stdout).unwrap();
    assert_done(&first);
    assert_eq!(first["checksums"].as_array().unwrap().len(), 3);
    assert_eq!(
        (first["tunnels_opened"].clone(), first["duplicate"].clone()),
        (json!(1), json!(false))
    );
    for key in ["tunnel_up", "job", "total"] {
        assert!(first["timings_ms"][key].is_u64(), "{first}");
    }
    let t1 = first["tunnel_id"].as_u64().unwrap();
    let job1 = first["job_id"].as_str().unwrap().to_string();

    // The cloud sees the tunnel closed (it sent Close, the relay answered Closed) and the
    // mediator's record is closed with the job it carried.
    let cloud = &sc.cloud;
    wait_for(
        Duration::from_secs(10),
        "cloud sees tunnel 1 closed",
        || async move {
            cloud_tunnels(cloud)
                .await
                .iter()
                .any(|t| t["tunnel_id"] == t1 && t["closed_by"] == "cloud")
        },
    )
    .await;
    wait_for(
        Duration::from_secs(10),
        "mediator record closed",
        || async move { mediator_tunnel(api, t1).await["state"] == "closed" },
    )
    .await;
    let rec = mediator_tunnel(api, t1).await;
    assert_eq!(rec["jobs"], json!([job1]), "{rec}");
    assert!(
        rec["opened_ms"].is_u64() && rec["closed_ms"].is_u64(),
        "{rec}"
    );

    // 2. The next job gets a new tunnel.
    let second = submit(&sc.cloud, job("printer-1", 1, 8)).await;
    assert_done(&second);
    assert_ne!(second["tunnel_id"].as_u64().unwrap(), t1);

    // 3. A 5 MiB document arrives whole (the relay's CRC is the document's).
    let mut big = job("printer-1", 1, 9);
    big["document_bytes"] = json!(5 << 20);
    let third = submit(&sc.cloud, big).await;
    assert_done(&third);
    assert_eq!(
        third["document_crc32"].as_u64().unwrap(),
        u64::from(document_crc32(9, 5 << 20))
    );

    // 4. The same job id again: the device does not print it twice.
    let mut again = job("printer-1", 3, 7);
    again["job_id"] = json!(job1);
    let fourth = submit(&sc.cloud, again).await;
    assert_done(&fourth);
    assert_eq!(fourth["duplicate"], true);
    assert_eq!(fourth["device_job"], first["device_job"]);
    assert_eq!(device.prints(), 3);

    // 5. An unknown device fails at once with the mediator's answer.
    let bad = submit(&sc.cloud, job("printer-404", 1, 1)).await;
    assert_eq!(bad["state"], "failed");
    assert!(
        bad["error"].as_str().unwrap().contains("unknown_device"),
        "{bad}"
    );
    let _ = &sc.dir;
    relay_sim.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_checks_tickets() {
    let sc = scene("tickets", vec![relay("r1", &["p1"])]);
    let device = Arc::new(FakeDevice::new());
    let relay_sim = sim_relay(&sc.mediator, sc.cloud.pin(), "r1", &["p1"], device);
    wait_online(sc.mediator.addr("api"), "r1", true).await;
    assert_done(&submit(&sc.cloud, job("p1", 1, 3)).await);
    let used = relay_sim.stats.tickets.lock().unwrap()[0].clone();
    let addr = sc.cloud.addr("tunnels");
    let tls = pinned_client_config(sc.cloud.pin()).unwrap();
    let refused = |answer: CloudToRelay| match answer {
        CloudToRelay::DialRefused { code, message } => (code, message),
        other => panic!("expected DialRefused, got {other:?}"),
    };
    let now = duplex_mediator::util::now_ms();

    // Replayed: the ticket worked once.
    let (code, msg) = refused(dial(addr, tls.clone(), &used).await.unwrap().0);
    assert_eq!(code, 412);
    assert!(msg.contains("used before"), "{msg}");

    // Altered: the MAC no longer matches.
    let mut altered = used.clone();
    altered.body.expires_ms += 60_000;
    let (code, msg) = refused(dial(addr, tls.clone(), &altered).await.unwrap().0);
    assert_eq!(code, 412);
    assert!(msg.contains("MAC"), "{msg}");

    // Forged under another key.
    let forged = Ticket::sign(
        &[0x77; 32],
        TicketBody {
            expires_ms: now + 60_000,
            ..used.body.clone()
        },
    );
    assert_eq!(
        refused(dial(addr, tls.clone(), &forged).await.unwrap().0).0,
        412
    );

    // Expired (a good MAC).
    let body = TicketBody {
        tunnel_id: 4242,
        relay_id: "r1".into(),
        device_id: "p1".into(),
        nonce: [9; 16],
        expires_ms: now - 1000,
    };
    let expired = Ticket::sign(&TICKET_KEY, body.clone());
    assert_eq!(
        refused(dial(addr, tls.clone(), &expired).await.unwrap().0).0,
        410
    );

    // Good MAC, in date, but for a tunnel the cloud never asked for.
    let unasked = Ticket::sign(
        &TICKET_KEY,
        TicketBody {
            expires_ms: now + 60_000,
            ..body
        },
    );
    let (code, msg) = refused(dial(addr, tls.clone(), &unasked).await.unwrap().0);
    assert_eq!(code, 412);
    assert!(msg.contains("not asked for"), "{msg}");

    wait_for_log(
        &sc.cloud,
        "dial refused: tunnel 4242 was not asked for (412) from 127.0.0.1:",
    )
    .await;
    relay_sim.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_request_survives_a_mediator_restart() {
    let dir = TempDir::new("restart");
    let spec = MediatorSpec::new(vec![relay("r1", &["p1"])]);
    let mut mediator = start_mediator(&dir, &spec);
    let api = mediator.addr("api");
    let cloud = start_cloud(&dir, api);

    // The relay is offline: the cloud's request waits, pending.
    let mut j = job("p1", 2, 11);
    j["job_id"] = json!("job-restart");
    j["wait"] = json!(false);
    submit_nowait(&cloud, j.clone()).await;
    wait_for(Duration::from_secs(10), "tunnel 1 pending", || async move {
        mediator_tunnel(api, 1).await["state"] == "pending"
    })
    .await;

    // Kill the mediator; start it again on the same ports with the same database.
    let relay_addr = mediator.addr("relays");
    mediator.kill();
    let mut spec2 = MediatorSpec::new(vec![relay("r1", &["p1"])]);
    spec2.relay_listen = Some(relay_addr);
    spec2.api_listen = Some(api);
    let mediator = start_mediator(&dir, &spec2);
    let rec = mediator_tunnel(api, 1).await;
    assert_eq!(rec["state"], "pending", "the request survived: {rec}");

    // The relay logs in: the request is offered, the job completes once, on tunnel 1.
    let device = Arc::new(FakeDevice::new());
    let relay_sim = sim_relay(&mediator, cloud.pin(), "r1", &["p1"], device.clone());
    let cloud_ref = &cloud;
    wait_for(Duration::from_secs(30), "job done", || async move {
        job_state(cloud_ref, "job-restart").await["state"] == "done"
    })
    .await;
    let report = job_state(&cloud, "job-restart").await;
    assert_done(&report);
    assert_eq!(report["tunnel_id"], 1);
    assert_eq!(device.prints(), 1);
    wait_for(
        Duration::from_secs(10),
        "tunnel 1 closed with its job",
        || async move { mediator_tunnel(api, 1).await["jobs"] == json!(["job-restart"]) },
    )
    .await;

    // Restarted again under a logged-in relay: the relay notices, logs in again by itself,
    // and the next job goes through on a new tunnel id.
    let mut mediator = mediator;
    mediator.kill();
    let _mediator = start_mediator(&dir, &spec2);
    let stats = relay_sim.stats.clone();
    wait_for(Duration::from_secs(15), "the relay's second login", || {
        let n = stats.welcomes.load(std::sync::atomic::Ordering::SeqCst);
        async move { n >= 2 }
    })
    .await;
    let next = submit(&cloud, job("p1", 1, 12)).await;
    assert_done(&next);
    assert!(next["tunnel_id"].as_u64().unwrap() > 1, "{next}");
    assert_eq!(device.prints(), 2);
    relay_sim.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_waits_out_a_relay_outage() {
    let sc = scene("outage", vec![relay("r1", &["p1"])]);
    let api = sc.mediator.addr("api");
    let device = Arc::new(FakeDevice::new());
    let first = sim_relay(&sc.mediator, sc.cloud.pin(), "r1", &["p1"], device.clone());
    wait_online(api, "r1", true).await;
    first.kill().await;
    wait_online(api, "r1", false).await;

    let mut j = job("p1", 1, 5);
    j["job_id"] = json!("job-outage");
    submit_nowait(&sc.cloud, j).await;
    wait_for(Duration::from_secs(10), "tunnel pending", || async move {
        mediator_tunnel(api, 1).await["state"] == "pending"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(mediator_tunnel(api, 1).await["state"], "pending");
    assert_eq!(job_state(&sc.cloud, "job-outage").await["state"], "running");

    let second = sim_relay(&sc.mediator, sc.cloud.pin(), "r1", &["p1"], device.clone());
    let cloud = &sc.cloud;
    wait_for(Duration::from_secs(20), "job done", || async move {
        job_state(cloud, "job-outage").await["state"] == "done"
    })
    .await;
    let report = job_state(&sc.cloud, "job-outage").await;
    assert_done(&report);
    assert_eq!(
        (
            report["tunnel_id"].clone(),
            report["tunnels_opened"].clone()
        ),
        (json!(1), json!(1))
    );
    assert_eq!(device.prints(), 1);
    second.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_lost_mid_job_resends_the_same_job_once() {
    let sc = scene("midjob", vec![relay("r1", &["p1"])]);
    let api = sc.mediator.addr("api");
    let device = Arc::new(FakeDevice::with_delay(Duration::from_millis(1500)));
    let first = sim_relay(&sc.mediator, sc.cloud.pin(), "r1", &["p1"], device.clone());
    wait_online(api, "r1", true).await;
    let mut j = job("p1", 2, 21);
    j["job_id"] = json!("job-midway");
    submit_nowait(&sc.cloud, j).await;
    let dev = device.clone();
    wait_for(Duration::from_secs(10), "device took the job", || {
        let taken = dev.device_job("job-midway").is_some();
        async move { taken }
    })
    .await;
    first.kill().await; // the tunnel drops before the result
    let second = sim_relay(&sc.mediator, sc.cloud.pin(), "r1", &["p1"], device.clone());
    let cloud = &sc.cloud;
    wait_for(Duration::from_secs(20), "job done", || async move {
        job_state(cloud, "job-midway").await["state"] == "done"
    })
    .await;
    let report = job_state(&sc.cloud, "job-midway").await;
    assert_done(&report);
    assert_eq!(report["tunnels_opened"], 2, "{report}");
    assert_eq!(report["duplicate"], true, "{report}");
    assert_eq!(device.prints(), 1);
    let lost = cloud_tunnels(&sc.cloud).await;
    assert!(lost.iter().any(|t| t["closed_by"] == "lost"), "{lost:?}");
    second.kill().await;
}

/// The next `TunnelRequest` on a hand-driven control session: its tunnel id and ticket.
async fn next_request(ctl: &mut ControlConn) -> (u64, Ticket) {
    loop {
        match ctl
            .recv_within(Duration::from_secs(10))
            .await
            .expect("the control session")
        {
            MediatorToRelay::TunnelRequest {
                tunnel_id, ticket, ..
            } => return (tunnel_id, ticket),
            MediatorToRelay::Pong { .. } => {}
            other => panic!("expected a TunnelRequest, got {other:?}"),
        }
    }
}

/// A relay restored from a snapshot has forgotten its tunnels' connections: nothing more
/// comes on them, ever, and it reports them closed to the mediator on its next session.
/// The cloud, waiting for a result on such a tunnel, takes the mediator's word: the tunnel
/// is lost, and the job goes again on a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_the_relay_reports_closed_while_its_job_waits_is_lost_and_the_job_resent() {
    let dir = TempDir::new("forgotten");
    let mut spec = MediatorSpec::new(vec![relay("r1", &["p1"])]);
    (spec.heartbeat_ms, spec.heartbeat_timeout_ms) = (10_000, 30_000);
    let mediator = start_mediator(&dir, &spec);
    let cloud = start_cloud(&dir, mediator.addr("api"));
    let to_mediator = pinned_client_config(mediator.pin()).unwrap();
    let to_cloud = pinned_client_config(cloud.pin()).unwrap();
    let mut ctl = connect_control(mediator.addr("relays"), to_mediator)
        .await
        .unwrap();
    let welcome = login(&mut ctl, "r1", &SECRET, &["p1".to_string()])
        .await
        .unwrap();
    assert!(
        matches!(welcome, MediatorToRelay::Welcome { .. }),
        "{welcome:?}"
    );
    let mut j = job("p1", 2, 41);
    j["job_id"] = json!("job-forgotten");
    submit_nowait(&cloud, j).await;
    let mut tunnels = Vec::new();
    for attempt in 0..2 {
        let (id, ticket) = next_request(&mut ctl).await;
        let (ok, mut conn) = dial(cloud.addr("tunnels"), to_cloud.clone(), &ticket)
            .await
            .unwrap();
        assert_eq!(ok, CloudToRelay::DialOk { tunnel_id: id });
        ctl.send(&RelayToMediator::TunnelAccepted { tunnel_id: id })
            .await
            .unwrap();
        match conn.recv_within(Duration::from_secs(10)).await.unwrap() {
            CloudToRelay::Job { job_id, .. } => assert_eq!(job_id, "job-forgotten"),
            other => panic!("expected the job, got {other:?}"),
        }
        conn.send(&RelayToCloud::JobAccepted {
            job_id: "job-forgotten".into(),
            device_job: 1,
            duplicate: attempt == 1,
        })
        .await
        .unwrap();
        if attempt == 0 {
            // Forgotten: not a byte more on it (the connection stays open), reported closed.
            ctl.send(&RelayToMediator::TunnelClosed {
                tunnel_id: id,
                jobs: vec!["job-forgotten".into()],
            })
            .await
            .unwrap();
        } else {
            conn.send(&RelayToCloud::JobResult {
                job_id: "job-forgotten".into(),
                outcome: JobOutcome::Done,
                checksums: expected_checksums(41, 2, 64, 48),
                document_crc32: document_crc32(41, 0),
                error: None,
            })
            .await
            .unwrap();
        }
        tunnels.push((id, conn));
    }
    let c = &cloud;
    wait_for(Duration::from_secs(20), "job done", || async move {
        job_state(c, "job-forgotten").await["state"] == "done"
    })
    .await;
    let report = job_state(&cloud, "job-forgotten").await;
    assert_done(&report);
    assert_eq!(report["tunnels_opened"], 2, "{report}");
    assert_eq!(report["duplicate"], true, "{report}");
    let first = tunnels[0].0;
    let seen = cloud_tunnels(&cloud).await;
    let t = seen
        .iter()
        .find(|t| t["tunnel_id"] == first)
        .expect("first tunnel");
    assert_eq!(t["closed_by"], "lost", "{seen:?}");
    wait_for_log(
        &cloud,
        "the relay reported the tunnel closed before the job's result",
    )
    .await;
}

async fn submit_nowait(cloud: &Proc, mut body: Value) {
    body["wait"] = json!(false);
    let base = format!("http://{}", cloud.addr("api"));
    let r = duplex_mediator::http::request(
        &base,
        "POST",
        "/v1/jobs",
        None,
        Some(&body),
        Duration::from_secs(10),
    )
    .await
    .expect("cloud API");
    assert_eq!(r.status, 202, "{}", r.body);
}

async fn job_state(cloud: &Proc, id: &str) -> Value {
    let base = format!("http://{}", cloud.addr("api"));
    duplex_mediator::http::request(
        &base,
        "GET",
        &format!("/v1/jobs/{id}"),
        None,
        None,
        Duration::from_secs(10),
    )
    .await
    .expect("cloud API")
    .body
}
