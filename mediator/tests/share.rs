//! The cloud side of shared documents on loopback: the `duplex-mediator` and `duplex-cloud`
//! binaries and a fake relay driven by hand (a control session logged in to the mediator,
//! the tunnel dialled to the cloud) playing the device's controller: it asks for the
//! cloud's users page by page, sends a share's snapshot, its documents' bytes and deltas,
//! and says `Done`. After each step the cloud's users read the shared documents through
//! the cloud's API: what their paired accounts may read, 403 after a revocation or an
//! unpair. Revisions are applied once, gaps refused, and both survive a cloud restart.

mod common;

use std::time::Duration;

use common::*;
use duplex_docs::{
    document_crc32, error_code, Change, CloudToDevice, DeviceToCloud, DocBox, Document, Grant,
    Pair, Role, ShareState, SyncReply, SyncRequest,
};
use duplex_mediator::sim::client::{connect_control, dial, login, ControlConn, TunnelConn};
use duplex_mediator::tls::pinned_client_config;
use duplex_tunnel::{CloudToRelay, MediatorToRelay, RelayToCloud, RelayToMediator};
use serde_json::{json, Value};

const DEVICE: &str = "dev-1";
const ALICE: &str = "tok-alice-0001";
const BOB: &str = "tok-bob-000002";

/// The cloud's users: alice and bob have tokens; five in all (pages of two).
fn cloud_extra(dir: &TempDir) -> Value {
    let user = |id: &str, token: Option<&str>| {
        let mut u = json!({
            "id": id,
            "userName": id,
            "emails": [{"value": format!("{id}@example.com"), "verified": true}],
        });
        if let Some(t) = token {
            u["token"] = json!(t);
        }
        u
    };
    json!({
        "users": [user("alice", Some(ALICE)), user("bob", Some(BOB)), user("carol", None),
                  user("dave", None), user("erin", None)],
        "share_db": dir.path("cloud-share.db"),
    })
}

struct Scene {
    dir: TempDir,
    mediator: Proc,
    cloud: Proc,
    ctl: ControlConn,
}

async fn scene(tag: &str) -> Scene {
    let dir = TempDir::new(tag);
    let mut spec = MediatorSpec::new(vec![relay("r1", &[DEVICE])]);
    (spec.heartbeat_ms, spec.heartbeat_timeout_ms) = (20_000, 60_000);
    let mediator = start_mediator(&dir, &spec);
    let cloud = start_cloud_with(&dir, mediator.addr("api"), cloud_extra(&dir));
    let to_mediator = pinned_client_config(mediator.pin()).expect("client config");
    let mut ctl = connect_control(mediator.addr("relays"), to_mediator)
        .await
        .expect("control session");
    let welcome = login(&mut ctl, "r1", &SECRET, &[DEVICE.to_string()])
        .await
        .expect("login");
    assert!(
        matches!(welcome, MediatorToRelay::Welcome { .. }),
        "{welcome:?}"
    );
    Scene {
        dir,
        mediator,
        cloud,
        ctl,
    }
}

/// Takes the next tunnel request, dials the cloud and expects `DialOk` then `SyncOpen`.
async fn accept_sync(ctl: &mut ControlConn, cloud: &Proc) -> TunnelConn {
    let (id, ticket) = loop {
        match ctl
            .recv_within(Duration::from_secs(10))
            .await
            .expect("the control session")
        {
            MediatorToRelay::TunnelRequest {
                tunnel_id,
                ticket,
                device_id,
                ..
            } => {
                assert_eq!(device_id, DEVICE);
                break (tunnel_id, ticket);
            }
            MediatorToRelay::Pong { .. } => {}
            other => panic!("expected a TunnelRequest, got {other:?}"),
        }
    };
    let to_cloud = pinned_client_config(cloud.pin()).expect("client config");
    let (ok, mut conn) = dial(cloud.addr("tunnels"), to_cloud, &ticket)
        .await
        .expect("dial");
    assert_eq!(ok, CloudToRelay::DialOk { tunnel_id: id });
    ctl.send(&RelayToMediator::TunnelAccepted { tunnel_id: id })
        .await
        .expect("TunnelAccepted");
    let open = conn
        .recv_within(Duration::from_secs(10))
        .await
        .expect("SyncOpen");
    assert_eq!(
        open,
        CloudToRelay::SyncOpen {
            device_id: DEVICE.into()
        }
    );
    conn
}

/// Sends `bytes` as a `Share` frame and returns the cloud's answer.
async fn ask_raw(conn: &mut TunnelConn, bytes: Vec<u8>) -> CloudToDevice {
    conn.send(&RelayToCloud::Share { bytes })
        .await
        .expect("send");
    match conn
        .recv_within(Duration::from_secs(10))
        .await
        .expect("answer")
    {
        CloudToRelay::Share { bytes } => {
            duplex_link::decode_body::<CloudToDevice>(&bytes).expect("a CloudToDevice")
        }
        other => panic!("expected a Share answer, got {other:?}"),
    }
}

async fn ask(conn: &mut TunnelConn, msg: &DeviceToCloud) -> CloudToDevice {
    let frame = duplex_link::try_encode(msg).expect("encode");
    ask_raw(conn, frame[duplex_link::HEADER_LEN..].to_vec()).await
}

async fn sync(conn: &mut TunnelConn, req: SyncRequest) -> SyncReply {
    match ask(conn, &DeviceToCloud::Sync(req)).await {
        CloudToDevice::Sync(r) => r,
        other => panic!("expected a Sync answer, got {other:?}"),
    }
}

/// Says `Done` and expects the cloud's `Close`, answered `Closed`.
async fn done(mut conn: TunnelConn) {
    let frame = duplex_link::try_encode(&DeviceToCloud::Done).expect("encode");
    conn.send(&RelayToCloud::Share {
        bytes: frame[duplex_link::HEADER_LEN..].to_vec(),
    })
    .await
    .expect("send Done");
    let close = conn
        .recv_within(Duration::from_secs(10))
        .await
        .expect("Close");
    assert_eq!(close, CloudToRelay::Close);
    conn.send(&RelayToCloud::Closed { jobs: 0 })
        .await
        .expect("Closed");
}

fn ack(rev: u64, need: &[&str]) -> SyncReply {
    SyncReply::Ack {
        share_id: "share-1".into(),
        revision: rev,
        need_data: need.iter().map(|s| s.to_string()).collect(),
    }
}

fn doc(id: &str, name: &str, bytes: &[u8]) -> Document {
    Document {
        id: id.into(),
        box_id: "box-1".into(),
        name: name.into(),
        len: bytes.len() as u64,
        crc32: document_crc32(bytes),
        created_by: "acc-a".into(),
    }
}

/// Revision 1: box-1 with d1 ("hello", readable by acc-a through the box) and d2
/// ("world!", readable by acc-a and, on the document, acc-b); alice ↔ acc-a, bob ↔ acc-b.
fn snapshot() -> SyncRequest {
    let pair = |a: &str, u: &str| Pair {
        account: a.into(),
        cloud_user: u.into(),
    };
    SyncRequest::Snapshot {
        share_id: "share-1".into(),
        revision: 1,
        state: ShareState {
            doc_box: DocBox {
                id: "box-1".into(),
                name: "Reports".into(),
            },
            pairs: vec![pair("acc-a", "alice"), pair("acc-b", "bob")],
            documents: vec![
                doc("d1", "hello.txt", b"hello"),
                doc("d2", "world.txt", b"world!"),
            ],
            grants: vec![
                Grant::on_box("box-1", Role::Read, "acc-a"),
                Grant::on_doc("d2", Role::Read, "acc-b"),
            ],
        },
    }
}

fn delta(rev: u64, changes: Vec<Change>) -> SyncRequest {
    SyncRequest::Delta {
        share_id: "share-1".into(),
        revision: rev,
        changes,
    }
}

/// Revision 2: the bytes of d1 (in two chunks) and d2.
fn data_delta() -> SyncRequest {
    let data = |id: &str, offset: u64, bytes: &[u8]| Change::DocumentData {
        doc_id: id.into(),
        offset,
        bytes: bytes.to_vec(),
    };
    delta(
        2,
        vec![
            data("d1", 0, b"hel"),
            data("d1", 3, b"lo"),
            data("d2", 0, b"world!"),
        ],
    )
}

fn revoke_bob() -> Change {
    Change::Revoked {
        grant: Grant::on_doc("d2", Role::Read, "acc-b"),
    }
}

/// The ids of the documents `token`'s user may read (`GET /v1/shared/documents`).
async fn listed(cloud: &Proc, token: &str) -> Vec<String> {
    let (status, body) = raw_http(
        cloud.addr("api"),
        "GET",
        "/v1/shared/documents",
        Some(token),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).expect("JSON");
    let mut ids: Vec<String> = v["documents"]
        .as_array()
        .expect("documents")
        .iter()
        .map(|d| {
            assert_eq!(d["available"], true, "{d}");
            d["id"].as_str().expect("id").to_string()
        })
        .collect();
    ids.sort();
    ids
}

/// `GET /v1/shared/documents/{id}`: status and body.
async fn read(cloud: &Proc, token: Option<&str>, id: &str) -> (u16, Vec<u8>) {
    raw_http(
        cloud.addr("api"),
        "GET",
        &format!("/v1/shared/documents/{id}"),
        token,
    )
    .await
}

/// Expects a 403 `forbidden` with a message.
async fn forbidden(cloud: &Proc, token: &str, id: &str) {
    let (status, body) = read(cloud, Some(token), id).await;
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(v["error"]["code"], "forbidden", "{v}");
    assert!(
        !v["error"]["message"].as_str().unwrap_or("").is_empty(),
        "{v}"
    );
}

/// Starts `POST /v1/devices/dev-1/sync` on the cloud's API; the task answers its report.
fn start_sync(cloud: &Proc) -> tokio::task::JoinHandle<Value> {
    let base = format!("http://{}", cloud.addr("api"));
    tokio::spawn(async move {
        let r = duplex_mediator::http::request(
            &base,
            "POST",
            &format!("/v1/devices/{DEVICE}/sync"),
            None,
            Some(&json!({"timeout_s": 30})),
            Duration::from_secs(60),
        )
        .await
        .expect("cloud API");
        assert_eq!(r.status, 200, "{}", r.body);
        r.body
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_pairs_applies_the_share_and_users_read_what_their_accounts_may() {
    let mut sc = scene("share-sync").await;
    let cloud = &sc.cloud;
    let task = start_sync(cloud);
    let mut conn = accept_sync(&mut sc.ctl, cloud).await;

    // Users, page by page (two at a time), without their tokens.
    let mut ids = Vec::new();
    let mut start = 1;
    let mut pages = 0;
    loop {
        let page = match ask(
            &mut conn,
            &DeviceToCloud::ListUsers {
                start_index: start,
                count: 2,
            },
        )
        .await
        {
            CloudToDevice::Users(p) => p,
            other => panic!("expected Users, got {other:?}"),
        };
        pages += 1;
        assert_eq!((page.total_results, page.start_index), (5, start));
        assert!(page.resources.len() <= 2);
        ids.extend(page.resources.iter().map(|u| u.id.clone()));
        match page.next_start_index() {
            Some(n) => start = n,
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(ids, ["alice", "bob", "carol", "dave", "erin"]);
    let (status, scim) = raw_http(cloud.addr("api"), "GET", "/scim/v2/Users", None).await;
    assert_eq!(status, 200);
    let scim = String::from_utf8(scim).expect("UTF-8");
    assert!(
        scim.contains("alice") && !scim.contains(ALICE) && !scim.contains("token"),
        "{scim}"
    );

    // An undecodable body is answered Error 400; the tunnel goes on.
    match ask_raw(&mut conn, vec![0xff, 0xff, 0xff]).await {
        CloudToDevice::Error { code, .. } => assert_eq!(code, 400),
        other => panic!("expected Error, got {other:?}"),
    }

    // Snapshot: documents known, bytes missing.
    assert_eq!(sync(&mut conn, snapshot()).await, ack(1, &["d1", "d2"]));
    let (status, body) = read(cloud, Some(ALICE), "d1").await;
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));

    // The bytes: alice reads both (the box), bob d2 only.
    assert_eq!(sync(&mut conn, data_delta()).await, ack(2, &[]));
    assert_eq!(listed(cloud, ALICE).await, ["d1", "d2"]);
    assert_eq!(listed(cloud, BOB).await, ["d2"]);
    assert_eq!(
        read(cloud, Some(ALICE), "d1").await,
        (200, b"hello".to_vec())
    );
    assert_eq!(
        read(cloud, Some(BOB), "d2").await,
        (200, b"world!".to_vec())
    );
    forbidden(cloud, BOB, "d1").await;
    assert_eq!(read(cloud, Some(ALICE), "nope").await.0, 404);
    assert_eq!(read(cloud, None, "d1").await.0, 401);
    assert_eq!(read(cloud, Some("tok-nobody-99"), "d1").await.0, 401);
    let (status, _) = raw_http(cloud.addr("api"), "GET", "/v1/shared/documents", None).await;
    assert_eq!(status, 401);

    // Revoked: bob no longer reads d2.
    assert_eq!(
        sync(&mut conn, delta(3, vec![revoke_bob()])).await,
        ack(3, &[])
    );
    forbidden(cloud, BOB, "d2").await;
    assert!(listed(cloud, BOB).await.is_empty());
    assert_eq!(read(cloud, Some(ALICE), "d2").await.0, 200);

    // Revision 3 again, with other changes: acked, not applied.
    let unpair_a = Change::Unpaired {
        account: "acc-a".into(),
    };
    assert_eq!(
        sync(&mut conn, delta(3, vec![unpair_a.clone()])).await,
        ack(3, &[])
    );
    assert_eq!(listed(cloud, ALICE).await, ["d1", "d2"]);
    // A gap is refused, with the cloud's revision.
    match sync(&mut conn, delta(5, vec![unpair_a.clone()])).await {
        SyncReply::Error { code, revision, .. } => {
            assert_eq!((code, revision), (error_code::REVISION_GAP, 3))
        }
        other => panic!("expected a gap, got {other:?}"),
    }
    assert_eq!(read(cloud, Some(ALICE), "d1").await.0, 200);

    // Unpaired: alice reads nothing any more.
    assert_eq!(sync(&mut conn, delta(4, vec![unpair_a])).await, ack(4, &[]));
    forbidden(cloud, ALICE, "d1").await;
    forbidden(cloud, ALICE, "d2").await;
    assert!(listed(cloud, ALICE).await.is_empty());

    done(conn).await;
    let report = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("the sync ends")
        .expect("the sync task");
    assert_eq!(report["state"], "done", "{report}");
    assert_eq!(report["device_id"], DEVICE, "{report}");
    assert_eq!(
        (report["users_sent"].clone(), report["pages"].clone()),
        (json!(5), json!(3)),
        "{report}"
    );
    assert_eq!(
        (report["syncs"].clone(), report["errors"].clone()),
        (json!(6), json!(1)),
        "{report}"
    );
    assert_eq!(
        report["shares"],
        json!([{"share_id": "share-1", "revision": 4}]),
        "{report}"
    );
    let seen = cloud_tunnels(cloud).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["closed_by"], "cloud", "{seen:?}");
    drop(sc.mediator);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_cloud_keeps_its_revisions_and_documents() {
    let mut sc = scene("share-restart").await;
    let task = start_sync(&sc.cloud);
    let mut conn = accept_sync(&mut sc.ctl, &sc.cloud).await;
    assert_eq!(sync(&mut conn, snapshot()).await, ack(1, &["d1", "d2"]));
    assert_eq!(sync(&mut conn, data_delta()).await, ack(2, &[]));
    done(conn).await;
    let report = task.await.expect("the sync task");
    assert_eq!(report["state"], "done", "{report}");

    // Restarted: the documents and rights are there before any sync.
    sc.cloud.kill();
    sc.cloud = start_cloud_with(&sc.dir, sc.mediator.addr("api"), cloud_extra(&sc.dir));
    assert_eq!(
        read(&sc.cloud, Some(ALICE), "d1").await,
        (200, b"hello".to_vec())
    );
    assert_eq!(
        read(&sc.cloud, Some(BOB), "d2").await,
        (200, b"world!".to_vec())
    );
    forbidden(&sc.cloud, BOB, "d1").await;

    // Through the `sync` command this time: one JSON object, exit 0.
    let server = format!("http://{}", sc.cloud.addr("api"));
    let cli = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_duplex-cloud"))
            .args([
                "sync",
                "--device",
                DEVICE,
                "--server",
                &server,
                "--timeout-s",
                "30",
            ])
            .output()
    });
    let mut conn = accept_sync(&mut sc.ctl, &sc.cloud).await;
    // Revision 2 again (other changes): acked, not applied; a gap refused at revision 2.
    assert_eq!(
        sync(&mut conn, delta(2, vec![revoke_bob()])).await,
        ack(2, &[])
    );
    assert_eq!(read(&sc.cloud, Some(BOB), "d2").await.0, 200);
    match sync(&mut conn, delta(4, vec![revoke_bob()])).await {
        SyncReply::Error { code, revision, .. } => {
            assert_eq!((code, revision), (error_code::REVISION_GAP, 2))
        }
        other => panic!("expected a gap, got {other:?}"),
    }
    // The same snapshot again: acked, and no bytes asked for (they were kept).
    let mut again = snapshot();
    if let SyncRequest::Snapshot { revision, .. } = &mut again {
        *revision = 2;
    }
    assert_eq!(sync(&mut conn, again).await, ack(2, &[]));
    // The next revision applies.
    assert_eq!(
        sync(&mut conn, delta(3, vec![revoke_bob()])).await,
        ack(3, &[])
    );
    forbidden(&sc.cloud, BOB, "d2").await;
    done(conn).await;
    let out = cli.await.expect("join").expect("run duplex-cloud sync");
    let stdout = String::from_utf8(out.stdout).expect("UTF-8");
    assert!(out.status.success(), "{stdout}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let report: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(report["state"], "done", "{report}");
    assert_eq!(
        report["shares"],
        json!([{"share_id": "share-1", "revision": 3}]),
        "{report}"
    );

    // And once more after a second restart: revision 3 stays, bob stays refused.
    sc.cloud.kill();
    sc.cloud = start_cloud_with(&sc.dir, sc.mediator.addr("api"), cloud_extra(&sc.dir));
    forbidden(&sc.cloud, BOB, "d2").await;
    assert_eq!(
        read(&sc.cloud, Some(ALICE), "d2").await,
        (200, b"world!".to_vec())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_closed_before_done_fails_the_sync() {
    let mut sc = scene("share-lost").await;
    let task = start_sync(&sc.cloud);
    let mut conn = accept_sync(&mut sc.ctl, &sc.cloud).await;
    assert_eq!(sync(&mut conn, snapshot()).await, ack(1, &["d1", "d2"]));
    conn.send(&RelayToCloud::Closed { jobs: 0 })
        .await
        .expect("Closed");
    let report = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("the sync ends")
        .expect("the sync task");
    assert_eq!(report["state"], "failed", "{report}");
    assert!(
        report["error"]
            .as_str()
            .unwrap_or("")
            .contains("before Done"),
        "{report}"
    );
    // What was acked stays.
    assert_eq!(
        report["shares"],
        json!([{"share_id": "share-1", "revision": 1}]),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_syncs_its_share_devices_periodically() {
    let dir = TempDir::new("share-poll");
    let mut spec = MediatorSpec::new(vec![relay("r1", &[DEVICE])]);
    (spec.heartbeat_ms, spec.heartbeat_timeout_ms) = (20_000, 60_000);
    let mediator = start_mediator(&dir, &spec);
    let to_mediator = pinned_client_config(mediator.pin()).expect("client config");
    let mut ctl = connect_control(mediator.addr("relays"), to_mediator)
        .await
        .expect("control session");
    let welcome = login(&mut ctl, "r1", &SECRET, &[DEVICE.to_string()])
        .await
        .expect("login");
    assert!(matches!(welcome, MediatorToRelay::Welcome { .. }));
    let mut extra = cloud_extra(&dir);
    extra["share_devices"] = json!([DEVICE]);
    extra["share_poll_ms"] = json!(300);
    let cloud = start_cloud_with(&dir, mediator.addr("api"), extra);
    // Nobody asks: the cloud opens a sync tunnel by itself, and again after the period.
    let mut conn = accept_sync(&mut ctl, &cloud).await;
    assert_eq!(sync(&mut conn, snapshot()).await, ack(1, &["d1", "d2"]));
    done(conn).await;
    let mut conn = accept_sync(&mut ctl, &cloud).await;
    assert_eq!(sync(&mut conn, data_delta()).await, ack(2, &[]));
    done(conn).await;
    assert_eq!(
        read(&cloud, Some(ALICE), "d1").await,
        (200, b"hello".to_vec())
    );
}
