//! End-to-end sharing of documents with the cloud (`docs/shared-data.md`): the real device
//! (engine, controller with its disk, relay) behind the site's firewall, `duplex-mediator`
//! and `duplex-cloud` in the WAN (`tests/common/relay_scene.rs`). Documents are stored with
//! `duplex box`, the box is shared, `duplex-cloud sync` opens a share tunnel through the
//! relay; the controller pairs its accounts with the cloud's users (verified emails, the
//! conflicts kept) and sends the share; cloud users then read exactly what their paired
//! accounts may, a revocation takes effect at the next sync, and an unpaired account's user
//! loses everything.
//!
//! `kvm_netns_*`: needs /dev/kvm and network namespaces; `scripts/test` skips it by name
//! where that is impossible, loudly, and counts it as skipped.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::relay_scene::{http_get, http_get_raw, mediator_bin, Scene, SceneOpts, CLOUD_API};
use common::relaynet::require_netns;

/// Patience for the share scene's steps.
const T_SHARE: std::time::Duration = std::time::Duration::from_secs(60);
use serde_json::{json, Value};

/// Runs `duplex box --as <who> <args>` against the scene's controller: its JSON.
fn dbox(scene: &Scene, who: &str, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_duplex"))
        .arg("box")
        .arg("--vsock")
        .arg(scene.uds())
        .args(["--as", who])
        .args(args)
        .output()
        .expect("run duplex box");
    assert!(
        out.status.success(),
        "duplex box {args:?} as {who}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("duplex box prints JSON")
}

/// `duplex-cloud sync --device mfp-1` in the WAN: its report, which must say `done`.
fn sync(scene: &Scene) -> Value {
    let report = sync_report(scene);
    assert_eq!(report["state"], "done", "{report}\n{}", scene.context());
    report
}

/// `duplex-cloud sync --device mfp-1` in the WAN: its report, whatever its state.
fn sync_report(scene: &Scene) -> Value {
    let out = scene
        .net
        .command("wan", mediator_bin("duplex-cloud"))
        .args(["sync", "--device", "mfp-1", "--server"])
        .arg(format!("http://{CLOUD_API}"))
        .args(["--timeout-s", "60"])
        .stdin(Stdio::null())
        .output()
        .expect("run duplex-cloud sync");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim().lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("sync printed no JSON ({e}): {text} {}", scene.context()))
}

/// What cloud user `token` may list: the ids of the documents.
fn listed(scene: &Scene, token: &str) -> Vec<String> {
    let (status, v) = http_get(&scene.net, CLOUD_API, "/v1/shared/documents", Some(token));
    assert_eq!(status, 200, "{v}");
    let mut ids: Vec<String> = v["documents"]
        .as_array()
        .expect("documents")
        .iter()
        .filter_map(|d| d["id"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    ids
}

/// `GET /v1/shared/documents/{id}` as `token`: status and bytes.
fn read(scene: &Scene, token: &str, id: &str) -> (u16, Vec<u8>) {
    http_get_raw(
        &scene.net,
        CLOUD_API,
        &format!("/v1/shared/documents/{id}"),
        Some(token),
    )
}

fn put(scene: &Scene, dir: &Path, who: &str, name: &str, bytes: &[u8]) -> String {
    let file = dir.join(name);
    std::fs::write(&file, bytes).expect("write");
    let v = dbox(
        scene,
        who,
        &["put", "inbox", &file.display().to_string(), "--name", name],
    );
    v["stored"]["id"].as_str().expect("document id").to_owned()
}

#[test]
fn kvm_netns_a_shared_box_reaches_the_paired_cloud_users_with_the_devices_rights() {
    common::require_kvm();
    require_netns();
    let users = json!([
        {"id": "c-alice", "displayName": "Alice", "token": "alice-token-1",
         "emails": [{"value": "Alice@Example.com", "verified": true}]},
        {"id": "c-bob", "displayName": "Bob", "token": "bob-token-1",
         "emails": [{"value": " bob@example.com", "verified": true}]},
        {"id": "c-carol", "displayName": "Carol", "token": "carol-token-1",
         "emails": [{"value": "carol@example.com", "verified": false}]},
    ]);
    let scene = Scene::up(SceneOpts {
        cloud_users: users,
        controller_disk_mib: Some(64),
        ..SceneOpts::default()
    });
    let dir = common::TempDir::new("share-files");
    for (id, email) in [
        ("alice", "alice@example.com"),
        ("bob", "bob@example.com"),
        ("carol", "carol@example.com"),
    ] {
        dbox(
            &scene,
            "admin",
            &[
                "account",
                "add",
                id,
                "--name",
                id,
                "--email",
                email,
                "--verified",
            ],
        );
    }
    dbox(&scene, "alice", &["create", "inbox", "--name", "Inbox"]);
    let a: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + 3) as u8).collect();
    let b: Vec<u8> = (0..5_000u32).map(|i| (i * 13) as u8).collect();
    let d1 = put(&scene, &dir.0, "alice", "a.bin", &a);
    let d2 = put(&scene, &dir.0, "alice", "b.bin", &b);
    dbox(
        &scene,
        "alice",
        &["grant", &format!("doc:{d2}"), "read", "bob"],
    );
    dbox(&scene, "alice", &["share", "inbox", "--with", "cloud"]);

    let report = sync(&scene);
    assert!(report["users_sent"].as_u64() >= Some(3), "{report}");
    // Pairing: alice and bob on their verified emails (case and blanks do not matter);
    // carol's cloud email is unverified: a conflict, not a pair.
    let conflicts = dbox(&scene, "admin", &["conflicts"]);
    let text = conflicts.to_string();
    assert!(
        text.contains("carol") && text.to_lowercase().contains("unverified"),
        "{text}"
    );
    assert!(!text.contains("\"alice\""), "{text}");

    // The cloud users read what their accounts may: alice (owner) both, bob only d2, carol
    // (not paired) nothing.
    assert_eq!(listed(&scene, "alice-token-1"), {
        let mut v = vec![d1.clone(), d2.clone()];
        v.sort();
        v
    });
    assert_eq!(listed(&scene, "bob-token-1"), vec![d2.clone()]);
    assert!(listed(&scene, "carol-token-1").is_empty());
    assert_eq!(read(&scene, "alice-token-1", &d1), (200, a.clone()));
    assert_eq!(read(&scene, "bob-token-1", &d2), (200, b.clone()));
    assert_eq!(read(&scene, "bob-token-1", &d1).0, 403);

    // A revocation on the device takes effect on the cloud at the next sync.
    dbox(
        &scene,
        "alice",
        &["revoke", &format!("doc:{d2}"), "read", "bob"],
    );
    sync(&scene);
    assert_eq!(read(&scene, "bob-token-1", &d2).0, 403);
    assert!(listed(&scene, "bob-token-1").is_empty());
    // A new document reaches the cloud as a delta.
    let d3 = put(&scene, &dir.0, "alice", "c.bin", b"third");
    sync(&scene);
    assert_eq!(read(&scene, "alice-token-1", &d3), (200, b"third".to_vec()));

    // Unpaired: everything of that account is refused.
    dbox(&scene, "admin", &["unpair", "alice"]);
    sync(&scene);
    for d in [&d1, &d2, &d3] {
        assert_eq!(read(&scene, "alice-token-1", d).0, 403, "{d}");
    }
    assert!(listed(&scene, "alice-token-1").is_empty());
}

#[test]
fn kvm_netns_a_sync_cut_by_a_relay_restart_loses_nothing_and_applies_nothing_twice() {
    common::require_kvm();
    require_netns();
    let users = json!([
        {"id": "c-alice", "displayName": "Alice", "token": "alice-token-1",
         "emails": [{"value": "alice@example.com", "verified": true}]},
    ]);
    let scene = Scene::up(SceneOpts {
        cloud_users: users,
        controller_disk_mib: Some(64),
        ..SceneOpts::default()
    });
    let dir = common::TempDir::new("share-cut");
    dbox(
        &scene,
        "admin",
        &[
            "account",
            "add",
            "alice",
            "--name",
            "A",
            "--email",
            "alice@example.com",
            "--verified",
        ],
    );
    dbox(&scene, "alice", &["create", "inbox", "--name", "Inbox"]);
    let mut docs = Vec::new();
    for i in 0..24u32 {
        let bytes: Vec<u8> = (0..64 * 1024u32).map(|j| (j * 31 + i) as u8).collect();
        docs.push((
            put(&scene, &dir.0, "alice", &format!("d{i}.bin"), &bytes),
            bytes,
        ));
    }
    dbox(&scene, "alice", &["share", "inbox", "--with", "cloud"]);

    // A sync in the background, cut by a stop of the relay partition once it has begun.
    let wan = scene.net.ns("wan");
    let sync_bin = mediator_bin("duplex-cloud");
    let cut = std::thread::spawn(move || {
        Command::new("ip")
            .args(["netns", "exec", &wan])
            .arg(sync_bin)
            .args(["sync", "--device", "mfp-1", "--server"])
            .arg(format!("http://{CLOUD_API}"))
            .args(["--timeout-s", "30"])
            .output()
            .expect("sync")
    });
    scene.wait_relay("share sync for mfp-1", T_SHARE);
    std::thread::sleep(std::time::Duration::from_millis(300));
    scene.dev().ok(json!({"cmd": "stop", "partition": "relay"}));
    let out = cut.join().expect("sync thread");
    let first: Value = serde_json::from_str(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .lines()
            .last()
            .unwrap_or("{}"),
    )
    .expect("the cut sync's report");
    // 24 documents of 64 KiB take about a second to sync: the stop came in the middle.
    assert_eq!(first["state"], "failed", "the sync was not cut: {first}");
    scene
        .dev()
        .ok(json!({"cmd": "start", "partition": "relay"}));
    scene.wait_relay_count("session up", 2, T_SHARE);

    // The next sync completes the share: every document, byte-exact; the revision goes on
    // from what the cloud acknowledged (nothing applied twice, nothing lost).
    let second = sync(&scene);
    assert_eq!(
        listed(&scene, "alice-token-1").len(),
        docs.len(),
        "{first} {second}"
    );
    for (id, bytes) in &docs {
        assert_eq!(
            &read(&scene, "alice-token-1", id),
            &(200, bytes.clone()),
            "{id}"
        );
    }
    let rev = |r: &Value| r["shares"][0]["revision"].as_u64().unwrap_or(0);
    assert!(rev(&second) >= rev(&first), "{first} {second}");
    // A third sync has nothing new: the same revision.
    let third = sync(&scene);
    assert_eq!(rev(&third), rev(&second), "{third}");
}
