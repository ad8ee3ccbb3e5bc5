//! End-to-end: a partition's power-saving sleep (guest ABI `SLEEP`) and Wake-on-LAN, with
//! the `netecho` firmware started with `netecho.sleep=1` (it sleeps right after `READY`),
//! its card on a TAP in a network namespace of the test's own (`common::netns`):
//!
//! - a sleeping partition is `sleeping` in `status`, its vCPU thread uses no CPU, and frames
//!   that are not its magic packet (another MAC, truncated, ordinary) are dropped and
//!   counted; its magic packet wakes it (reason `magic packet`) and it echoes again;
//! - a flood is read at a bounded rate, and a flood of its own magic packets wakes it once;
//! - `wake` wakes it (reason `operator`) and is refused when it does not sleep;
//! - a set taken while it sleeps restores it sleeping, in a new process, and it still wakes.
//!
//! `kvm_tap_*` tests need /dev/kvm, root and /dev/net/tun (`scripts/test` skips them by name
//! without).

mod common;

use std::time::{Duration, Instant};

use common::netns::{require_tap, NetNs, Wire};
use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);
const TAP: &str = "dplxslp0";
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x77, 0x01, 0x0b];
const MAC_STR: &str = "52:54:00:77:01:0b";
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// EtherType of the test's ordinary frames (IEEE local experimental).
const PROTO: u16 = 0x88b5;

fn require() {
    require_kvm();
    require_tap();
}

fn boot(ns: &NetNs, work: &TempDir, extra: &[String]) -> Device {
    let mut p = partition("relay", "relay", "netecho", 32, "netecho.sleep=1");
    p["net"] = json!({"tap": TAP, "mac": MAC_STR});
    let file = work.0.join("device.json");
    let cfg = json!({ "partitions": [p] });
    std::fs::write(&file, serde_json::to_vec_pretty(&cfg).expect("json")).expect("write");
    ns.run(|| Device::boot_file_with(&file, TempDir::new("sleepdev"), extra))
}

/// The magic packet's payload: six 0xFF, then `mac` sixteen times.
fn magic(mac: [u8; 6]) -> Vec<u8> {
    let mut p = vec![0xFF; 6];
    for _ in 0..16 {
        p.extend_from_slice(&mac);
    }
    p
}

/// A raw EtherType 0x0842 frame carrying `payload`, broadcast.
fn raw_wol(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0xFF; 6];
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&0x0842u16.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A broadcast IPv4/UDP frame to port 9 carrying `payload` (header checksum computed; UDP
/// checksum 0, "none", as IPv4 allows).
fn udp_wol(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0xFF; 6];
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[10, 77, 1, 10, 255, 255, 255, 255]);
    let sum = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>();
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&9u16.to_be_bytes());
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// An ordinary frame for the guest (netecho echoes it with the MACs swapped).
fn ordinary(i: u8) -> Vec<u8> {
    let mut f = MAC.to_vec();
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&PROTO.to_be_bytes());
    f.extend((0..100u8).map(|j| j.wrapping_mul(7).wrapping_add(i)));
    f
}

fn counters(dev: &Device) -> Value {
    dev.status_of("relay")["net"]["counters"].clone()
}

/// Sends an ordinary frame and waits for its echo.
fn echoes(wire: &Wire, i: u8) {
    let f = ordinary(i);
    wire.send(&f);
    let back = wire
        .recv_matching(T, |g| g.get(6..12) == Some(&MAC[..]))
        .expect("an echo");
    assert_eq!(&back[..6], &HOST_MAC, "echoed back to the host");
    assert_eq!(&back[14..], &f[14..]);
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn kvm_tap_a_sleeping_partition_uses_no_cpu_and_only_its_magic_packet_wakes_it() {
    require();
    let ns = NetNs::new();
    let work = TempDir::new("sleep1");
    let mut dev = boot(&ns, &work, &[]);
    dev.wait_line("relay", "netecho: asleep", T);
    let s = dev.wait_state("relay", "sleeping", T);
    assert!(s["sleep"]["sleeping_since_ms"].as_u64().is_some(), "{s}");
    assert_eq!(s["sleep"]["wakes"], 0, "{s}");
    let wire = ns.wire(TAP, PROTO);

    // No CPU while asleep: the vCPU thread waits in the monitor with no timer.
    let vcpu = thread_named(dev.pid(), "relay-vcpu0");
    let before = thread_ticks(dev.pid(), &vcpu);
    let exits = dev.status_of("relay")["exits"]["total"].as_u64();
    std::thread::sleep(Duration::from_secs(2));
    let used = thread_ticks(dev.pid(), &vcpu) - before;
    assert!(used <= 1, "a sleeping vCPU used {used} ticks in 2 s");
    assert_eq!(dev.status_of("relay")["exits"]["total"].as_u64(), exits);

    // Another MAC's magic packet (both forms), a truncated one of its own, an ordinary
    // frame: dropped and counted; it sleeps on.
    let mut other = MAC;
    other[5] ^= 0x10;
    let good = magic(MAC);
    for f in [
        raw_wol(&magic(other)),
        udp_wol(&magic(other)),
        raw_wol(&good[..good.len() - 1]),
        udp_wol(&good[6..]),
        ordinary(1),
    ] {
        wire.send(&f);
    }
    wait_for("the frames dropped", || {
        counters(&dev)["asleep_dropped"] == 5
    });
    std::thread::sleep(Duration::from_millis(200));
    let s = dev.status_of("relay");
    assert_eq!(s["state"], "sleeping", "{s}");
    assert_eq!(s["net"]["counters"]["wake_packets"], 0);
    assert_eq!(
        s["net"]["counters"]["rx_frames"], 0,
        "nothing reached the guest"
    );

    // Its own magic packet, as a UDP broadcast: it wakes, and echoes as before.
    wire.send(&udp_wol(&good));
    dev.wait_line("relay", "netecho: woken reason=1", T);
    let s = dev.wait_state("relay", "running", T);
    assert_eq!(s["sleep"]["wake_reason"], "magic packet", "{s}");
    assert_eq!(s["sleep"]["sleeping_since_ms"], Value::Null);
    assert_eq!(
        (s["sleep"]["wakes"].clone(), s["sleep"]["sleeps"].clone()),
        (json!(1), json!(1))
    );
    assert_eq!(s["net"]["counters"]["wake_packets"], 1);
    echoes(&wire, 2);
    assert!(dev.shutdown().success());
}

#[test]
fn kvm_tap_a_flood_is_read_at_a_bounded_rate_and_its_own_magic_packets_wake_it_once() {
    require();
    let ns = NetNs::new();
    let work = TempDir::new("sleep2");
    let mut dev = boot(&ns, &work, &[]);
    dev.wait_line("relay", "netecho: asleep", T);
    dev.wait_state("relay", "sleeping", T);
    let wire = ns.wire(TAP, PROTO);

    // 20 000 magic packets for another MAC as fast as the test can send them: the card reads
    // 64 frames per 10 ms at most (the kernel drops what does not fit the TAP's queue).
    let mut other = MAC;
    other[0] ^= 0x02;
    let flood = raw_wol(&magic(other));
    let start = Instant::now();
    for _ in 0..20_000 {
        wire.send(&flood);
    }
    std::thread::sleep(Duration::from_millis(300));
    let elapsed_ms = start.elapsed().as_millis() as u64;
    let read = counters(&dev)["asleep_dropped"].as_u64().expect("count");
    assert!(read > 0, "the card reads its TAP while asleep");
    assert!(
        read <= 64 * (elapsed_ms / 10 + 2),
        "{read} frames read in {elapsed_ms} ms: faster than 64 per 10 ms"
    );
    assert_eq!(dev.status_of("relay")["state"], "sleeping");

    // Its own magic packets, many: one wake, the rest reach the guest as ordinary frames.
    let own = raw_wol(&magic(MAC));
    for _ in 0..500 {
        wire.send(&own);
    }
    dev.wait_line("relay", "netecho: woken reason=1", T);
    let s = dev.wait_state("relay", "running", T);
    assert_eq!(s["sleep"]["wakes"], 1, "{s}");
    assert_eq!(s["net"]["counters"]["wake_packets"], 1, "{s}");
    echoes(&wire, 3);
    assert!(dev.shutdown().success());
}

#[test]
fn kvm_tap_wake_wakes_a_sleeping_partition_and_is_refused_when_it_is_awake() {
    require();
    let ns = NetNs::new();
    let work = TempDir::new("sleep3");
    let mut dev = boot(&ns, &work, &[]);
    dev.wait_line("relay", "netecho: asleep", T);
    dev.wait_state("relay", "sleeping", T);
    // Pause and resume while it sleeps: it goes on sleeping.
    dev.ok(json!({"cmd": "pause", "partition": "relay"}));
    assert_eq!(dev.status_of("relay")["state"], "paused");
    dev.ok(json!({"cmd": "resume"}));
    dev.wait_state("relay", "sleeping", T);

    let r = dev.ok(json!({"cmd": "wake", "partition": "relay"}));
    assert_eq!(r["partitions"], json!(["relay"]));
    dev.wait_line("relay", "netecho: woken reason=2", T);
    let s = dev.wait_state("relay", "running", T);
    assert_eq!(s["sleep"]["wake_reason"], "operator", "{s}");
    let again = dev.request(json!({"cmd": "wake", "partition": "relay"}));
    assert_eq!(again["error"]["code"], "invalid_state", "{again}");
    assert!(
        again["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("relay is running, cannot wake")),
        "{again}"
    );
    let none = dev.request(json!({"cmd": "wake", "partition": "nobody"}));
    assert_eq!(none["error"]["code"], "unknown_partition", "{none}");
    assert!(dev.shutdown().success());
}

#[test]
fn kvm_tap_a_set_taken_while_asleep_restores_asleep_and_still_wakes() {
    require();
    let ns = NetNs::new();
    let work = TempDir::new("sleep4");
    let mut dev = boot(&ns, &work, &[]);
    dev.wait_line("relay", "netecho: asleep", T);
    let since = dev.wait_state("relay", "sleeping", T)["sleep"]["sleeping_since_ms"].clone();
    let set = work.0.join("set");
    dev.ok(json!({"cmd": "snapshot", "dest": set}));
    // Still asleep after the cut.
    let s = dev.wait_state("relay", "sleeping", T);
    assert_eq!(s["sleep"]["sleeping_since_ms"], since);
    assert!(dev.shutdown().success());

    let extra = vec!["--restore".to_string(), set.display().to_string()];
    let dev = boot(&ns, &work, &extra);
    let s = dev.wait_state("relay", "sleeping", T);
    assert_eq!(s["sleep"]["sleeping_since_ms"], since, "{s}");
    assert!(!dev
        .console("relay")
        .iter()
        .any(|l| l.contains("netecho: woken")));
    let wire = ns.wire(TAP, PROTO);
    wire.send(&raw_wol(&magic(MAC)));
    dev.wait_line("relay", "netecho: woken reason=1", T);
    dev.wait_state("relay", "running", T);
    echoes(&wire, 4);
}
