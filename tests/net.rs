//! End-to-end: a partition's virtio-net card backed by a TAP, with the `netecho` firmware,
//! each test in a network namespace of its own (`common::netns`): raw frames sent on the
//! TAP's interface come back byte-exact with their MACs swapped, `status` counts them, a
//! snapshot and reboot in place or a restore in a new process keeps the card (and its
//! counters) working, the device event loop does not spin on a TAP whose frames the guest
//! cannot take, and config mistakes are refused naming the partition and field.
//!
//! `kvm_tap_*` tests need /dev/kvm, root and /dev/net/tun (`scripts/test` skips them by name
//! without); `net_config_*` need neither.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::netns::{require_tap, NetNs, Wire};
use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);
const TAP: &str = "dplxnet0";
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GUEST_MAC_STR: &str = "52:54:00:12:34:56";
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// EtherType of the test's frames (IEEE local experimental).
const PROTO: u16 = 0x88b5;

fn require() {
    require_kvm();
    require_tap();
}

/// The relay partition running netecho with its card on [`TAP`].
fn relay(cmdline: &str) -> Value {
    let mut p = partition("relay", "relay", "netecho", 32, cmdline);
    p["net"] = json!({"tap": TAP, "mac": GUEST_MAC_STR});
    p
}

/// Frame `i`: to the guest from the host, of a length that varies with `i`.
fn frame(i: usize) -> Vec<u8> {
    let len = [60, 64, 128, 777, 1514][i % 5];
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&PROTO.to_be_bytes());
    f.extend((0..len - 14).map(|j| (j as u8).wrapping_mul(31).wrapping_add(i as u8)));
    f
}

/// What netecho sends back for `f`.
fn echoed(f: &[u8]) -> Vec<u8> {
    let mut e = f.to_vec();
    e[..6].copy_from_slice(&f[6..12]);
    e[6..12].copy_from_slice(&f[..6]);
    e
}

/// Sends frames `range` one at a time and checks each echo, byte-exact; returns the bytes.
fn echo_frames(wire: &Wire, range: std::ops::Range<usize>) -> u64 {
    let mut bytes = 0;
    for i in range {
        let f = frame(i);
        wire.send(&f);
        let back = wire
            .recv_matching(T, |g| g.get(6..12) == Some(&GUEST_MAC[..]))
            .unwrap_or_else(|| panic!("frame {i} was not echoed"));
        assert!(back == echoed(&f), "echo of frame {i} differs");
        bytes += f.len() as u64;
    }
    bytes
}

fn counters(dev: &Device) -> Value {
    dev.status_of("relay")["net"]["counters"].clone()
}

fn boot(ns: &NetNs, cfg: &Value) -> Device {
    ns.run(|| Device::boot(cfg))
}

/// Boots `cfg` written in `dir` inside `ns`, with more `duplex run` arguments.
fn boot_file(ns: &NetNs, dir: &Path, cfg: &Value, extra: &[String]) -> Device {
    let file = dir.join("device.json");
    std::fs::write(&file, serde_json::to_vec_pretty(cfg).expect("json")).expect("write");
    ns.run(|| Device::boot_file_with(&file, TempDir::new("netdev"), extra))
}

/// The `/dev/net/tun` fds the monitor holds.
fn tun_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .filter_map(|e| e.ok())
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == Path::new("/dev/net/tun")))
        .count()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn kvm_tap_netecho_echoes_raw_frames_byte_exact() {
    require();
    let ns = NetNs::new();
    let mut dev = boot(&ns, &json!({"partitions": [relay("")]}));
    let line = dev.wait_line("relay", "READY", T);
    assert!(line.contains(&format!("mac={GUEST_MAC_STR}")), "{line}");
    let wire = ns.wire(TAP, PROTO);
    echo_frames(&wire, 0..20);
    dev.wait_line("relay", "netecho: echoed 20", T);
    assert!(dev.shutdown().success());
}

#[test]
fn kvm_tap_status_counts_the_frames_both_ways() {
    require();
    let ns = NetNs::new();
    let dev = boot(&ns, &json!({"partitions": [relay("")]}));
    dev.wait_line("relay", "READY", T);
    let wire = ns.wire(TAP, PROTO);
    let bytes = echo_frames(&wire, 0..12);
    let s = dev.status_of("relay");
    assert_eq!(s["net"]["tap"], TAP);
    assert_eq!(s["net"]["mac"], GUEST_MAC_STR);
    let c = &s["net"]["counters"];
    assert_eq!(c["rx_frames"], 12, "{c}");
    assert_eq!(c["tx_frames"], 12, "{c}");
    assert_eq!(c["rx_bytes"], bytes, "{c}");
    assert_eq!(c["tx_bytes"], bytes, "{c}");
    for zero in [
        "rx_dropped",
        "tx_dropped",
        "malformed_rx",
        "malformed_tx",
        "backend_errors",
    ] {
        assert_eq!(c[zero], 0, "{zero}: {c}");
    }
    assert_eq!(s["bad_accesses"]["net"], 0);
    let top = dev.ok(json!({"cmd": "status"}));
    assert_eq!(top["event_loop"]["subscribers"], 1, "one card: {top}");
}

#[test]
fn kvm_tap_a_snapshot_and_reboot_keeps_the_card_and_its_counters() {
    require();
    let ns = NetNs::new();
    let work = TempDir::new("netsnap");
    let dev = boot(&ns, &json!({"partitions": [relay("")]}));
    dev.wait_line("relay", "READY", T);
    let wire = ns.wire(TAP, PROTO);
    let first = echo_frames(&wire, 0..5);
    let pid = dev.pid();
    // The partition's TAP and the run's duplicate.
    assert_eq!(tun_fds(pid), 2);

    let (mut frames, mut bytes) = (5u64, first);
    for round in 1..=2u64 {
        let set = work.0.join(format!("set{round}"));
        dev.ok(json!({"cmd": "snapshot", "dest": set}));
        let r = dev.ok(json!({"cmd": "reboot", "from": set}));
        assert!(r["set_id"].is_string(), "{r}");
        dev.wait_state("relay", "running", T);
        let s = dev.status_of("relay");
        assert_eq!(s["boots"], round + 1);
        // The counters came back from the set.
        let c = &s["net"]["counters"];
        assert_eq!(
            (c["rx_frames"].as_u64(), c["tx_frames"].as_u64()),
            (Some(frames), Some(frames)),
            "{c}"
        );
        assert_eq!(c["rx_bytes"].as_u64(), Some(bytes), "{c}");
        // The TAP stayed: the same interface, the same wire socket, and the card echoes.
        let start = frames as usize;
        bytes += echo_frames(&wire, start..start + 5);
        frames += 5;
        let c = counters(&dev);
        assert_eq!(c["rx_frames"].as_u64(), Some(frames), "{c}");
        assert_eq!(c["tx_bytes"].as_u64(), Some(bytes), "{c}");
        // The old run's card left the loop and closed its TAP duplicate.
        wait_for("the old card to leave the loop", || {
            dev.ok(json!({"cmd": "status"}))["event_loop"]["subscribers"] == 1
        });
        wait_for("the old TAP duplicate to close", || tun_fds(pid) == 2);
    }
}

#[test]
fn kvm_tap_a_set_with_a_card_restores_in_a_new_process() {
    require();
    let ns = NetNs::new();
    let work = TempDir::new("netrestore");
    let cfg = json!({"partitions": [relay("")]});
    let mut dev = boot_file(&ns, &work.0, &cfg, &[]);
    dev.wait_line("relay", "READY", T);
    let wire = ns.wire(TAP, PROTO);
    let first = echo_frames(&wire, 0..7);
    let set = work.0.join("set");
    dev.ok(json!({"cmd": "snapshot", "dest": set}));
    assert!(dev.shutdown().success());
    drop(wire);

    // Into a config without the card: refused, naming the partition.
    let bare = json!({"partitions": [partition("relay", "relay", "netecho", 32, "")]});
    let bare_file = work.0.join("bare.json");
    std::fs::write(&bare_file, serde_json::to_vec(&bare).expect("json")).expect("write");
    let out = ns.run(|| {
        Command::new(env!("CARGO_BIN_EXE_duplex"))
            .args(["run", "--config"])
            .arg(&bare_file)
            .arg("--api-sock")
            .arg(work.0.join("bare.sock"))
            .arg("--restore")
            .arg(&set)
            .output()
            .expect("duplex run")
    });
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("partition relay: the set has a network card, the config none"),
        "{err}"
    );

    // A new process opens the TAP afresh (a new interface: set up again) and goes on.
    let extra = vec!["--restore".to_string(), set.display().to_string()];
    let mut dev = boot_file(&ns, &work.0, &cfg, &extra);
    let st = dev.ok(json!({"cmd": "status"}));
    assert!(st["restored_from"]["set_id"].is_string(), "{st}");
    let c = counters(&dev);
    assert_eq!(
        (c["rx_frames"].clone(), c["rx_bytes"].clone()),
        (json!(7), json!(first))
    );
    let wire = ns.wire(TAP, PROTO);
    let more = echo_frames(&wire, 7..14);
    let c = counters(&dev);
    assert_eq!(c["tx_frames"], 14, "{c}");
    assert_eq!(c["tx_bytes"], first + more, "{c}");
    dev.wait_line("relay", "netecho: echoed 14", T);
    assert!(dev.shutdown().success());
}

/// The device event loop's thread: CPU time (clock ticks) and wake-ups over `d`.
fn loop_cost(dev: &Device, d: Duration) -> (u64, u64) {
    let before = dev.ok(json!({"cmd": "status"}))["event_loop"].clone();
    let tid = before["tid"].as_i64().expect("loop tid");
    let cpu = || thread_ticks(dev.pid(), &tid.to_string());
    let c0 = cpu();
    std::thread::sleep(d);
    let c1 = cpu();
    let after = dev.ok(json!({"cmd": "status"}))["event_loop"].clone();
    let wakeups =
        after["wakeups"].as_u64().expect("wakeups") - before["wakeups"].as_u64().expect("wakeups");
    (c1 - c0, wakeups)
}

#[test]
fn kvm_tap_the_device_loop_does_not_spin() {
    require();
    // A guest that posted its buffers, idle after traffic.
    let ns = NetNs::new();
    let dev = boot(&ns, &json!({"partitions": [relay("")]}));
    dev.wait_line("relay", "READY", T);
    let wire = ns.wire(TAP, PROTO);
    echo_frames(&wire, 0..10);
    let (ticks, wakeups) = loop_cost(&dev, Duration::from_secs(2));
    assert!(ticks <= 5, "idle loop used {ticks} ticks in 2 s");
    assert!(wakeups <= 5, "idle loop woke {wakeups} times in 2 s");
    drop(dev);

    // A card never started (no buffers) with frames waiting in its TAP: still quiet.
    let ns = NetNs::new();
    let dev = boot(&ns, &json!({"partitions": [relay("netecho.card=off")]}));
    dev.wait_line("relay", "card left alone READY", T);
    let wire = ns.wire(TAP, PROTO);
    for i in 0..20 {
        wire.send(&frame(i));
    }
    let (ticks, wakeups) = loop_cost(&dev, Duration::from_secs(2));
    assert!(
        ticks <= 5,
        "loop used {ticks} ticks in 2 s on a card without buffers"
    );
    assert!(
        wakeups <= 5,
        "loop woke {wakeups} times in 2 s on a card without buffers"
    );
    let c = counters(&dev);
    assert_eq!(c["rx_frames"], 0, "{c}");
    assert!(
        wire.recv_matching(Duration::from_millis(200), |g| g.get(6..12)
            == Some(&GUEST_MAC[..]))
            .is_none(),
        "nothing echoed"
    );
}

#[test]
fn kvm_tap_a_tap_that_cannot_be_opened_fails_the_start_naming_the_partition() {
    require();
    let ns = NetNs::new();
    let work = TempDir::new("netbad");
    let mut p = relay("");
    // `lo` exists in every namespace and is no TAP: TUNSETIFF refuses it.
    p["net"]["tap"] = json!("lo");
    let file = work.0.join("device.json");
    std::fs::write(
        &file,
        serde_json::to_vec(&json!({"partitions": [p]})).expect("json"),
    )
    .expect("write");
    let out = ns.run(|| {
        Command::new(env!("CARGO_BIN_EXE_duplex"))
            .args(["run", "--config"])
            .arg(&file)
            .arg("--api-sock")
            .arg(work.0.join("api.sock"))
            .output()
            .expect("duplex run")
    });
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("partition relay: network card: tap lo: TUNSETIFF"),
        "{err}"
    );
}

/// `duplex check` of a config whose relay has `net` = `net`: its stderr, or its stdout.
fn check_config(net: Value, second: Option<Value>) -> Result<String, String> {
    let work = TempDir::new("netcfg");
    let mut p = partition("relay", "relay", "netecho", 32, "");
    p["net"] = net;
    let mut parts = vec![p];
    parts.extend(second);
    let file = work.0.join("device.json");
    std::fs::write(
        &file,
        serde_json::to_vec(&json!({"partitions": parts})).expect("json"),
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_duplex"))
        .arg("check")
        .arg("--config")
        .arg(&file)
        .output()
        .expect("duplex check");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(text(&out.stderr))
    }
}

#[test]
fn net_config_mistakes_are_refused_naming_partition_and_field() {
    let ok =
        check_config(json!({"tap": "dplx0", "mac": GUEST_MAC_STR}), None).expect("a good card");
    assert!(ok.contains("net tap dplx0 mac 52:54:00:12:34:56"), "{ok}");
    let cases = [
        (json!({"tap": "dplx0"}), "missing field `mac`"),
        (json!({"mac": GUEST_MAC_STR}), "missing field `tap`"),
        (
            json!({"tap": "", "mac": GUEST_MAC_STR}),
            "partition \"relay\": net.tap",
        ),
        (
            json!({"tap": "way-too-long-name", "mac": GUEST_MAC_STR}),
            "net.tap",
        ),
        (
            json!({"tap": "dplx0", "mac": "52:54:00:12:34"}),
            "partition \"relay\": net.mac",
        ),
        (
            json!({"tap": "dplx0", "mac": "33:33:00:00:00:01"}),
            "not a unicast",
        ),
        (
            json!({"tap": "dplx0", "mac": "00:00:00:00:00:00"}),
            "not a unicast",
        ),
    ];
    for (net, words) in cases {
        let err = check_config(net.clone(), None).expect_err(&net.to_string());
        assert!(err.contains(words), "{net}: {words:?} not in {err}");
    }
    let mut twin = partition("relay2", "relay", "netecho", 32, "");
    twin["net"] = json!({"tap": "dplx0", "mac": "52:54:00:00:00:02"});
    let err = check_config(
        json!({"tap": "dplx0", "mac": GUEST_MAC_STR}),
        Some(twin.clone()),
    )
    .expect_err("shared tap");
    assert!(
        err.contains("partition \"relay2\": net.tap") && err.contains("is used by another"),
        "{err}"
    );
    twin["net"] = json!({"tap": "dplx1", "mac": GUEST_MAC_STR});
    let err = check_config(json!({"tap": "dplx0", "mac": GUEST_MAC_STR}), Some(twin))
        .expect_err("shared mac");
    assert!(
        err.contains("partition \"relay2\": net.mac") && err.contains("is used by another"),
        "{err}"
    );
}
