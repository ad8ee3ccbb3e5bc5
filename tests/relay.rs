//! End-to-end tests of the relay: its network (scripts/relay-net), the relay partition,
//! the mediation server and the cloud server (docs/tunnel-protocol.md, docs/relay.md).
//!
//! Tests named `netns_*` build network namespaces (root, `/dev/net/tun`, `ip`, `nft`);
//! `kvm_netns_*` also boot partitions. `scripts/test` skips them by name where that is
//! impossible, loudly, and counts them as skipped.
//!
//! The `kvm_netns_*` tests play the relay scene of `tests/common/relay_scene.rs`, each in
//! namespaces of its own: the real device (engine, controller and relay partitions under
//! KVM, the monitor in the LAN behind the firewall), `duplex-mediator` and `duplex-cloud` in
//! the WAN, and `duplex-cloud submit` for jobs. They check a job through a tunnel that
//! closes after it; jobs through a relay restart and a mediator crash, each printed once;
//! a relay with a wrong secret (and one announcing a device not its own) refused, logged
//! and backing off; and a snapshot set taken mid-job, restored in a new monitor, after
//! which the relay logs in again and the job is printed exactly once.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use common::relay_scene::{assert_done, Scene, SceneOpts, DEVICE_ID, T};
use common::relaynet::{
    can_connect, in_netns, listen_in, require_netns, RelayNet, LAN_HOST_IP, MEDIATOR_IP,
};
use serde_json::{json, Value};

#[test]
fn netns_the_firewall_lets_the_lan_out_and_keeps_the_wan_out() {
    require_netns();
    let net = RelayNet::up(1);
    // The LAN reaches the WAN, and the answer comes back (an established connection).
    let wan_addr: SocketAddr = format!("{MEDIATOR_IP}:7443").parse().unwrap();
    let wan = listen_in(&net.ns("wan"), wan_addr);
    let server = std::thread::spawn(move || {
        let (mut c, _) = wan.accept().unwrap();
        c.write_all(b"hello lan").unwrap();
    });
    let got = in_netns(&net.ns("host"), move || {
        let mut s = std::net::TcpStream::connect_timeout(&wan_addr, Duration::from_secs(3))
            .expect("the LAN reaches the WAN");
        let mut buf = String::new();
        s.read_to_string(&mut buf).unwrap();
        buf
    });
    server.join().unwrap();
    assert_eq!(got, "hello lan");
    // The WAN has a route to the LAN, but the firewall drops its connections.
    let lan_addr: SocketAddr = format!("{LAN_HOST_IP}:7000").parse().unwrap();
    let _lan = listen_in(&net.ns("host"), lan_addr);
    assert!(
        !can_connect(&net.ns("wan"), lan_addr, Duration::from_secs(1)),
        "a connection from the WAN into the LAN got through"
    );
    let rules = net.sh("lan", "nft list table inet duplex_fw");
    let dropped: u64 = rules
        .split("counter packets ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the drop rule's counter");
    assert!(dropped >= 1, "the firewall counted no drop: {rules}");
    // The namespaces go away with the network.
    let ns = net.ns("lan");
    drop(net);
    assert!(!std::path::Path::new(&format!("/run/netns/{ns}")).exists());
}

/// `duplex-cloud submit` arguments: `pages` square pages of `size` pixels from `seed`.
fn job_args(pages: u32, seed: u64, size: u16) -> Vec<String> {
    [
        "--pages".to_string(),
        pages.to_string(),
        "--seed".to_string(),
        seed.to_string(),
        "--width".to_string(),
        size.to_string(),
        "--height".to_string(),
        size.to_string(),
    ]
    .to_vec()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn kvm_netns_a_cloud_job_prints_through_a_tunnel_that_closes_after_it() {
    common::require_kvm();
    require_netns();
    let mut scene = Scene::up(SceneOpts::default());
    let pages_before = scene.engine_pages();
    let mut tunnels = Vec::new();
    let mut total_pages = 0;
    for (pages, seed, size) in [(5u32, 7u64, 256u16), (3, 8, 128)] {
        let report = scene.submit(&strs(&job_args(pages, seed, size)), 60);
        assert_done(&report, pages, seed, size, size);
        assert_eq!(report["duplicate"], false, "{report}");
        assert_eq!(report["tunnels_opened"], 1, "{report}");
        total_pages += u64::from(pages);
        let tid = report["tunnel_id"].as_u64().expect("tunnel id");
        let job = report["job_id"].as_str().expect("job id").to_string();
        assert!(!tunnels.contains(&tid), "tunnel {tid} reused: {report}");
        tunnels.push(tid);
        // Closed after the job: by the cloud (Close answered by Closed), and so recorded at
        // the mediator with the job it carried; the relay says so too.
        scene.wait_tunnel_closed(tid, &job);
        let rec = scene.mediator_tunnel(tid);
        assert_eq!(rec["jobs"], json!([job]), "{rec}");
        assert_eq!(rec["device_id"], DEVICE_ID, "{rec}");
        scene.wait_relay(&format!("tunnel {tid} closed (1 jobs)"), T);
        scene.wait_relay(&format!("job {job} done"), T);
        // The controller printed it once: one job of that many pages, all checksums.
        let device_job = report["device_job"].as_u64().expect("device job");
        let jobs = scene.controller_jobs();
        let j = jobs
            .iter()
            .find(|j| j.id == device_job)
            .unwrap_or_else(|| panic!("device job {device_job} not at the controller: {jobs:?}"));
        assert_eq!((j.pages, j.pages_done), (pages, pages), "{j:?}");
        let want: Vec<u32> = (0..pages)
            .map(|p| duplex_link::expected_page_checksum(seed, p, size, size))
            .collect();
        assert_eq!(j.checksums, want, "the controller's checksums");
    }
    assert_eq!(
        scene.controller_jobs().len(),
        2,
        "two jobs, each printed once"
    );
    assert_eq!(scene.engine_pages(), pages_before + total_pages);
    assert_eq!(scene.mediator_lines("offered to relay").len(), 2);
    // The relay's console (a log file in practice) names its secret nowhere.
    assert!(scene.relay_lines("secret=<redacted>").len() == 1);
    assert!(
        scene.relay_lines(&scene.secret).is_empty(),
        "the relay printed its secret"
    );
}

/// The `next attempt in N ms` delays of the relay's `session down` lines.
fn next_attempt_delays(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| {
            l.split("next attempt in ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// The tunnel id of the mediator's `tunnel N requested by cloud` lines.
fn requested_tunnels(scene: &Scene) -> Vec<u64> {
    scene
        .mediator_lines("requested by cloud")
        .iter()
        .filter_map(|l| {
            l.split("tunnel ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn kvm_netns_a_relay_with_a_wrong_secret_is_refused_and_logged() {
    common::require_kvm();
    require_netns();
    let mut scene = Scene::up(SceneOpts {
        relay_secret: Some(common::relay_scene::random_hex32()),
        ..SceneOpts::default()
    });
    // The mediator refuses every login and says why; the relay shows each refusal.
    let first = scene.wait_mediator("login refused: relay relay-1: wrong login proof", 1, T);
    assert!(first.contains("from 10.77.1.10:"), "{first}");
    scene.wait_relay("session down: refused 401", T);
    // It keeps trying, backing off: watch a 5 s window.
    let start = std::time::Instant::now();
    let at_start = scene
        .mediator_lines("login refused: relay relay-1: wrong login proof")
        .len();
    std::thread::sleep(Duration::from_secs(5));
    let refusals = scene
        .mediator_lines("login refused: relay relay-1: wrong login proof")
        .len();
    let window = start.elapsed();
    assert!(
        refusals >= at_start + 2,
        "the relay stopped retrying: {at_start} then {refusals} refusals\n{}",
        scene.context()
    );
    // With base 250 ms and a 2 s cap, 5 s hold at most about 8 attempts; a relay retrying
    // without backoff would make hundreds.
    assert!(
        refusals - at_start <= 12,
        "{} refusals in {window:?}: no backoff?\n{}",
        refusals - at_start,
        scene.context()
    );
    let downs = scene.relay_lines("session down: refused 401");
    assert!(downs.len() >= 3, "{downs:?}");
    let delays = next_attempt_delays(&downs);
    assert_eq!(delays.len(), downs.len(), "{downs:?}");
    assert!(
        delays
            .iter()
            .all(|d| (1..=common::relay_scene::BACKOFF_MAX_MS).contains(d)),
        "delays within the cap: {delays:?}"
    );
    assert!(
        delays.iter().skip(3).all(|d| *d >= 1000) && delays[0] < 1000,
        "the delays grow to the cap: {delays:?}"
    );
    let attempts = scene.relay_lines("dialing mediator");
    assert!(
        attempts.iter().any(|l| l.contains("(attempt 3)")),
        "attempts counted: {attempts:?}"
    );
    assert!(scene.relay_lines("session up").is_empty());
    // A job for its device does not complete: its tunnel request waits, pending.
    let report = scene.submit(&strs(&job_args(2, 5, 64)), 3);
    assert_eq!(report["state"], "timeout", "{report}");
    assert_eq!(report["tunnels_opened"], 0, "{report}");
    let ids = requested_tunnels(&scene);
    assert!(!ids.is_empty(), "no tunnel requested\n{}", scene.context());
    for id in ids {
        let rec = scene.mediator_tunnel(id);
        assert!(
            rec["state"] == "pending" || rec["state"] == "expired",
            "tunnel {id}: {rec}"
        );
    }
    assert!(scene.controller_jobs().is_empty());
}

#[test]
fn kvm_netns_a_relay_announcing_a_device_not_in_its_registry_entry_is_refused_403() {
    common::require_kvm();
    require_netns();
    let scene = Scene::up(SceneOpts {
        relay_devices: format!("{DEVICE_ID},other-device"),
        ..SceneOpts::default()
    });
    let line = scene.wait_mediator("login refused: relay relay-1: device_not_served", 1, T);
    assert!(line.contains("other-device"), "{line}");
    let down = scene.wait_relay("session down: refused 403", T);
    assert!(down.contains("next attempt in"), "{down}");
    // Refused again on the next attempt: the refusal is not a one-off.
    scene.wait_mediator("login refused: relay relay-1: device_not_served", 2, T);
    assert!(scene.relay_lines("session up").is_empty());
    let (status, relays) = scene.http_get(
        common::relay_scene::MEDIATOR_API,
        "/v1/relays",
        Some(common::relay_scene::TOKEN),
    );
    assert_eq!(status, 200, "{relays}");
    assert!(
        relays["relays"]
            .as_array()
            .is_some_and(|r| r.iter().all(|x| x["online"] != true)),
        "{relays}"
    );
}

/// Jobs' reports: distinct job ids, none a duplicate, every one done and right.
fn assert_each_once(reports: &[(Value, u32, u64, u16)]) {
    let mut ids = std::collections::HashSet::new();
    for (r, pages, seed, size) in reports {
        assert_done(r, *pages, *seed, *size, *size);
        assert_eq!(r["duplicate"], false, "{r}");
        assert!(
            ids.insert(r["job_id"].as_str().expect("job id").to_string()),
            "{r}"
        );
    }
}

#[test]
fn kvm_netns_jobs_submitted_during_relay_and_mediator_outages_complete_exactly_once() {
    common::require_kvm();
    require_netns();
    let mut scene = Scene::up(SceneOpts::default());
    let pages_before = scene.engine_pages();
    let mut reports = Vec::new();
    let r = scene.submit(&strs(&job_args(2, 21, 128)), 60);
    reports.push((r, 2, 21, 128));

    // 1. The relay partition stopped: its session dies (the mediator hears nothing).
    let sessions = scene.relay_lines("session up").len();
    scene.dev().ok(json!({"cmd": "stop", "partition": "relay"}));
    scene.wait_mediator("session 1 ended: heartbeat timeout", 1, T);
    let mut during = scene.submit_bg(&strs(&job_args(3, 22, 128)), 90);
    // The request waits for the relay: the job cannot be done while it is down.
    let id = common::relay_scene::wait_for(
        T,
        "a tunnel request for the job",
        || scene.context(),
        || {
            requested_tunnels(&scene)
                .last()
                .copied()
                .filter(|t| *t >= 2)
        },
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!during.done(), "a job finished with the relay down");
    assert_eq!(scene.mediator_tunnel(id)["state"], "pending");
    scene
        .dev()
        .ok(json!({"cmd": "start", "partition": "relay"}));
    let r = during.wait();
    reports.push((r, 3, 22, 128));
    // The relay came back (a cold boot) and logged in again.
    assert_eq!(scene.dev().status_of("relay")["boots"], 2);
    assert!(scene.relay_lines("session up").len() > sessions);
    scene.wait_mediator("relay relay-1 logged in: session 2", 1, T);

    // 2. The mediator killed (SIGKILL) and restarted on the same database; a job submitted
    // meanwhile waits for it.
    scene.kill_mediator();
    scene.wait_relay("session down: connection lost", T);
    let during = scene.submit_bg(&strs(&job_args(4, 23, 128)), 90);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        scene.log("cloud").contains("mediator unreachable"),
        "the cloud did not meet the outage\n{}",
        scene.context()
    );
    scene.start_mediator();
    let r = during.wait();
    reports.push((r, 4, 23, 128));
    let r = scene.submit(&strs(&job_args(1, 24, 128)), 60);
    reports.push((r, 1, 24, 128));

    assert_each_once(&reports);
    let pages: u64 = reports.iter().map(|(_, p, _, _)| u64::from(*p)).sum();
    assert_eq!(
        scene.engine_pages(),
        pages_before + pages,
        "each job printed once"
    );
    let jobs = scene.controller_jobs();
    assert_eq!(jobs.len(), reports.len(), "{jobs:?}");
    // The restarted mediator kept its records: the tunnels of the first jobs are closed.
    for (r, ..) in &reports {
        let tid = r["tunnel_id"].as_u64().expect("tunnel id");
        scene.wait_tunnel_closed(tid, r["job_id"].as_str().expect("job id"));
    }
}

#[test]
fn kvm_netns_a_set_taken_while_the_session_is_up_restores_and_logs_in_again() {
    common::require_kvm();
    require_netns();
    let mut scene = Scene::up(SceneOpts::default());
    let first = scene.submit(&strs(&job_args(2, 31, 128)), 60);
    assert_done(&first, 2, 31, 128, 128);
    let session = scene.wait_relay("session up id=", T);
    let old_session: u64 = session
        .rsplit("id=")
        .next()
        .and_then(|n| n.trim().parse().ok())
        .expect("session id");
    let pages_before = scene.engine_pages();

    // A long job printing through a tunnel; the device's set is taken in the middle of it.
    let (pages, seed, size) = (600u32, 32u64, 512u16);
    let long = scene.submit_bg(&strs(&job_args(pages, seed, size)), 90);
    let started = common::relay_scene::wait_for(
        T,
        "the long job printing",
        || scene.context(),
        || {
            scene
                .controller_jobs()
                .into_iter()
                .find(|j| j.pages == pages && j.pages_done >= 20)
        },
    );
    let set = scene.work.0.join("set");
    let snap = scene
        .dev()
        .ok(json!({"cmd": "snapshot", "dest": set.display().to_string()}));
    assert_eq!(snap["partitions"], 3, "{snap}");
    // The old monitor is stopped before the job can finish there.
    scene.kill_device();
    let printed_at_cut = snap["quiesce"]["engine_pages_printed"]
        .as_u64()
        .expect("quiesce");
    assert!(
        printed_at_cut < pages_before + u64::from(pages),
        "the job was done before the cut: {snap} {started:?}"
    );

    // A new monitor from the set: the relay notices the restore and logs in again.
    let dev = scene.boot(Some(&set));
    scene.device = Some(dev);
    assert_eq!(
        scene.dev().ok(json!({"cmd": "status"}))["restored_from"]["set"],
        json!(set.display().to_string())
    );
    scene.wait_relay("relay: restored; reconnecting", T);
    let up = scene.wait_relay("session up id=", T);
    assert!(!up.contains(&format!("id={old_session}")), "{up}");
    let console = scene.dev().console("relay");
    let at = |needle: &str| console.iter().position(|l| l.contains(needle));
    assert!(
        at("relay: restored; reconnecting") < at("session up id="),
        "a new session after the restore: {console:?}"
    );
    // The mediator's old session ended: evicted by the new login, or timed out first.
    let ended = scene.wait_mediator(&format!("relay relay-1 session {old_session} ended:"), 1, T);
    assert!(
        ended.contains("evicted by a newer login") || ended.contains("heartbeat timeout"),
        "{ended}"
    );

    // The job in flight at the cut completes once: the cloud sends it again on a new
    // tunnel, the controller knows it (duplicate) and finishes the job restored with it.
    let report = long.wait();
    assert_done(&report, pages, seed, size, size);
    assert_eq!(report["duplicate"], true, "{report}");
    assert!(report["tunnels_opened"].as_u64() >= Some(2), "{report}");
    // The tunnel of the cut: lost for the cloud, reported closed (with the job) by the
    // restored relay to the mediator.
    let job = report["job_id"].as_str().expect("job id");
    let carried: Vec<Value> = scene
        .cloud_tunnels()
        .into_iter()
        .filter(|t| {
            t["jobs"]
                .as_array()
                .is_some_and(|j| j.iter().any(|x| x == job))
        })
        .collect();
    let lost = carried
        .iter()
        .find(|t| t["closed_by"] == "lost")
        .unwrap_or_else(|| panic!("no lost tunnel carried {job}: {carried:?}"));
    let lost_id = lost["tunnel_id"].as_u64().expect("tunnel id");
    assert!(lost_id < report["tunnel_id"].as_u64().expect("tunnel id"));
    let rec = scene.mediator_tunnel(lost_id);
    assert_eq!(rec["state"], "closed", "{rec}");
    assert_eq!(rec["jobs"], json!([job]), "{rec}");
    scene.wait_relay(
        &format!("tunnel {lost_id} closed (1 jobs) by the restore"),
        T,
    );
    scene.wait_tunnel_closed(report["tunnel_id"].as_u64().expect("tunnel id"), job);
    assert_eq!(
        scene.engine_pages(),
        pages_before + u64::from(pages),
        "the long job printed exactly once"
    );
    let jobs = scene.controller_jobs();
    assert_eq!(jobs.len(), 2, "{jobs:?}");

    // And a new job afterwards, on a new tunnel.
    let after = scene.submit(&strs(&job_args(3, 33, 128)), 60);
    assert_done(&after, 3, 33, 128, 128);
    assert_eq!(after["duplicate"], false, "{after}");
    let tids: Vec<u64> = [&first, &report, &after]
        .iter()
        .map(|r| r["tunnel_id"].as_u64().expect("tunnel id"))
        .collect();
    assert!(
        tids[0] < tids[1] && tids[1] < tids[2],
        "new tunnels: {tids:?}"
    );
    assert_eq!(scene.engine_pages(), pages_before + u64::from(pages) + 3);
}
