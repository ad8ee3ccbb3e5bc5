//! End-to-end tests of the substitute relay (docs/relay.md "Sleep and wake",
//! docs/tunnel-protocol.md, docs/guest-abi.md "Sleep and wake"): two relay partitions on one
//! LAN (`tests/common/site.rs`), relay-b going to sleep when idle, a cloud job for its device
//! waking it through relay-a's magic packet, and what happens when nobody can wake it.
//!
//! All tests are `kvm_netns_*`: they need /dev/kvm and network namespaces (root,
//! `/dev/net/tun`, `ip`, `nft`); `scripts/test` skips them by name where that is impossible,
//! loudly, and counts them as skipped.

mod common;

use std::time::{Duration, Instant};

use common::relay_scene::{assert_done, wait_for, T};
use common::relaynet::require_netns;
use common::site::{Site, SiteOpts, A, B};
use common::{require_kvm, TempDir};
use serde_json::{json, Value};

fn require() {
    require_kvm();
    require_netns();
}

/// The engine's `pages_printed`, through the controller's job port.
fn engine_pages(site: &Site) -> u64 {
    let uds = site.dev().dir.0.join("controller.vsock");
    let mut c = duplex_vmm::job::JobClient::connect(&uds).expect("the controller's job port");
    match c
        .call(&duplex_link::HostRequest::EngineStatus)
        .expect("engine status")
    {
        duplex_link::HostReply::Engine(info) => info.pages_printed,
        other => panic!("unexpected reply {other:?}"),
    }
}

/// Sends `count` UDP broadcasts of `payload` to port 9 from the LAN host.
fn broadcast_from_lan_host(site: &Site, payload: &[u8], count: u32) {
    let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
    site.net.sh(
        "host",
        &format!(
            "python3 -c \"import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
             s.setsockopt(socket.SOL_SOCKET,socket.SO_BROADCAST,1)\n\
             p=bytes.fromhex('{hex}')\nfor _ in range({count}): s.sendto(p,('10.77.1.255',9))\""
        ),
    );
}

/// The magic packet for `mac`: six 0xFF, then `mac` sixteen times.
fn magic_packet(mac: [u8; 6]) -> Vec<u8> {
    let mut p = vec![0xFF; 6];
    for _ in 0..16 {
        p.extend_from_slice(&mac);
    }
    p
}

fn mac_bytes(mac: &str) -> [u8; 6] {
    let mut out = [0u8; 6];
    for (o, part) in out.iter_mut().zip(mac.split(':')) {
        *o = u8::from_str_radix(part, 16).expect("mac");
    }
    out
}

#[test]
fn kvm_netns_a_job_for_a_sleeping_relay_wakes_it_through_the_substitute() {
    require();
    let mut site = Site::up(SiteOpts::default());
    let asleep = site.wait_asleep(&B, 1);
    assert!(asleep["sleep"]["sleeping_since_ms"].is_u64(), "{asleep}");
    let lease = site.relay_record(B.id);
    assert_eq!(lease["lease"]["mac"], B.mac, "{lease}");
    assert_eq!(lease["lease"]["segment"], "lan-1", "{lease}");
    assert_eq!(site.relay_record(A.id)["state"], "active");

    let report = site.submit(
        B.device,
        &[
            "--pages", "3", "--seed", "5", "--width", "128", "--height", "128",
        ],
        90,
    );
    assert_done(&report, 3, 5, 128, 128);
    assert_eq!(report["duplicate"], false, "{report}");
    let tid = report["tunnel_id"].as_u64().expect("tunnel id");
    let record = site.mediator_tunnel(tid);
    assert_eq!(
        record["relay_id"], B.id,
        "B's own tunnel carried it: {record}"
    );
    assert_eq!(record["wake"]["substitute"], A.id, "{record}");
    assert_eq!(report["wake"]["substitute"], A.id, "{report}");
    assert!(record["wake"]["woken_ms"].is_u64(), "{record}");
    site.wait_console(A.id, &format!("relay: sent magic packet for {}", B.mac), T);
    site.wait_console(B.id, "woken (magic packet)", T);
    let status = site.dev().status_of(B.id);
    assert_eq!(status["sleep"]["wake_reason"], "magic packet", "{status}");
    assert_eq!(status["sleep"]["wakes"], 1, "{status}");
    assert_eq!(status["net"]["counters"]["wake_packets"], 1, "{status}");
    // Printed exactly once: the engine printed the job's three pages, no more.
    assert_eq!(engine_pages(&site), 3);
    // Idle again, B goes back to sleep; another job wakes it again.
    site.wait_asleep(&B, 2);
    let again = site.submit(
        B.device,
        &[
            "--pages", "2", "--seed", "6", "--width", "128", "--height", "128",
        ],
        90,
    );
    assert_done(&again, 2, 6, 128, 128);
    assert_eq!(site.dev().status_of(B.id)["sleep"]["wakes"], 2);
}

#[test]
fn kvm_netns_a_stopped_sleeper_fails_the_request_within_the_wake_deadline() {
    require();
    let opts = SiteOpts::default();
    let deadline = Duration::from_millis(opts.wake_timeout_ms);
    let mut site = Site::up(opts);
    site.wait_asleep(&B, 1);
    site.dev().ok(json!({"cmd": "stop", "partition": B.id}));

    let start = Instant::now();
    let report = site.submit(
        B.device,
        &[
            "--pages", "2", "--seed", "3", "--width", "128", "--height", "128",
        ],
        60,
    );
    let took = start.elapsed();
    assert_eq!(report["state"], "failed", "{report}");
    let err = &report["tunnel_error"];
    assert_eq!(err["code"], "wake_timeout", "{report}");
    assert!(
        err["message"].as_str().is_some_and(|m| m.contains(B.id)),
        "{report}"
    );
    assert!(
        took < deadline + Duration::from_secs(10),
        "failed after {took:?}, the deadline is {deadline:?}"
    );
    let record = site.mediator_tunnel(err["tunnel_id"].as_u64().expect("tunnel id"));
    assert_eq!(record["state"], "failed", "{record}");
    assert_eq!(record["error"]["code"], "wake_timeout", "{record}");
    assert_eq!(record["wake"]["substitute"], A.id, "{record}");
    assert_eq!(record["wake"]["attempts"], 3, "bounded retries: {record}");
    assert_eq!(
        site.console(A.id, "relay: sent magic packet").len(),
        3,
        "one magic packet per attempt"
    );
    // A and the device keep working.
    let report = site.submit(
        A.device,
        &[
            "--pages", "2", "--seed", "4", "--width", "128", "--height", "128",
        ],
        90,
    );
    assert_done(&report, 2, 4, 128, 128);
    assert_eq!(
        site.mediator_tunnel(report["tunnel_id"].as_u64().unwrap())["relay_id"],
        A.id
    );
}

#[test]
fn kvm_netns_with_both_relays_asleep_nobody_can_wake_and_the_request_fails_at_once() {
    require();
    let mut site = Site::up(SiteOpts {
        a_sleep_idle_ms: Some(2_000),
        ..SiteOpts::default()
    });
    site.wait_asleep(&A, 1);
    site.wait_asleep(&B, 1);
    let start = Instant::now();
    let report = site.submit(
        B.device,
        &[
            "--pages", "1", "--seed", "1", "--width", "128", "--height", "128",
        ],
        60,
    );
    assert_eq!(report["state"], "failed", "{report}");
    assert_eq!(report["tunnel_error"]["code"], "no_substitute", "{report}");
    let message = report["tunnel_error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains(B.id) && message.contains("lan-1"),
        "{report}"
    );
    assert!(start.elapsed() < Duration::from_secs(15), "not at once");
    for r in [&A, &B] {
        assert_eq!(site.dev().status_of(r.id)["state"], "sleeping");
    }
    // The operator can still wake one; then it is a substitute again.
    site.dev().ok(json!({"cmd": "wake", "partition": A.id}));
    site.wait_console(A.id, "woken (operator)", T);
    wait_for(
        T,
        "relay-a active",
        || site.context(),
        || (site.relay_record(A.id)["state"] == "active").then_some(()),
    );
}

#[test]
fn kvm_netns_only_the_sleepers_own_magic_packet_wakes_it_and_a_flood_wakes_it_once() {
    require();
    let site = Site::up(SiteOpts::default());
    site.wait_asleep(&B, 1);
    let mut other = mac_bytes(B.mac);
    other[5] ^= 0x40;
    let own = magic_packet(mac_bytes(B.mac));
    broadcast_from_lan_host(&site, &magic_packet(other), 20);
    broadcast_from_lan_host(&site, &own[..own.len() - 1], 20);
    wait_for(
        T,
        "the frames dropped",
        || site.context(),
        || {
            let c = &site.dev().status_of(B.id)["net"]["counters"];
            (c["asleep_dropped"].as_u64()? >= 40).then_some(())
        },
    );
    std::thread::sleep(Duration::from_millis(300));
    let s = site.dev().status_of(B.id);
    assert_eq!(s["state"], "sleeping", "{s}");
    assert_eq!(s["sleep"]["wakes"], 0, "{s}");

    broadcast_from_lan_host(&site, &own, 2_000);
    site.wait_console(B.id, "woken (magic packet)", T);
    site.wait_console_count(B.id, "session up", 2, T);
    let s: Value = site.dev().status_of(B.id);
    assert_eq!(s["sleep"]["wakes"], 1, "one wake for the flood: {s}");
    assert_eq!(s["net"]["counters"]["wake_packets"], 1, "{s}");
}

#[test]
fn kvm_netns_a_set_taken_while_the_sleeper_sleeps_restores_it_asleep_and_it_still_wakes() {
    require();
    let mut site = Site::up(SiteOpts::default());
    let since = site.wait_asleep(&B, 1)["sleep"]["sleeping_since_ms"].clone();
    let a_session = site.relay_record(A.id)["session_id"].clone();
    let work = TempDir::new("relays-set");
    let set = work.0.join("set");
    site.dev().ok(json!({"cmd": "snapshot", "dest": set}));
    if let Some(mut d) = site.device.take() {
        d.kill();
    }
    site.device = Some(site.boot(Some(&set)));
    let s = site.dev().wait_state(B.id, "sleeping", T);
    assert_eq!(s["sleep"]["sleeping_since_ms"], since, "{s}");
    // A logs in again after its restore (a new session); B stays asleep.
    site.wait_console(A.id, "session up", T);
    wait_for(
        T,
        "relay-a's new session",
        || site.context(),
        || {
            let r = site.relay_record(A.id);
            (r["state"] == "active" && r["session_id"] != a_session).then_some(())
        },
    );
    assert_eq!(site.dev().status_of(B.id)["state"], "sleeping");

    let report = site.submit(
        B.device,
        &[
            "--pages", "2", "--seed", "9", "--width", "128", "--height", "128",
        ],
        90,
    );
    assert_done(&report, 2, 9, 128, 128);
    let record = site.mediator_tunnel(report["tunnel_id"].as_u64().expect("tunnel id"));
    assert_eq!(record["relay_id"], B.id, "{record}");
    assert_eq!(record["wake"]["substitute"], A.id, "{record}");
    site.wait_console(B.id, "woken (magic packet)", T);
}
