//! End-to-end: virtio-vsock between partitions and from the host, with the vsockecho
//! firmware: byte-exact echo through the host bridge, partition-to-partition transfer,
//! and credit flow control bounding what the monitor buffers for a slow host reader.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(60);
/// What the bridge advertises per host connection (docs/vsock.md).
const HOST_BUF_ALLOC: u64 = 256 << 10;

fn echo_server(name: &str, cid: u64, extra: &str) -> serde_json::Value {
    let mut p = partition(name, "other", "vsockecho", 32, extra);
    p["vsock"] = json!({"cid": cid, "uds": format!("{name}.vsock")});
    p
}

fn bridge(uds: &Path, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(uds).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .expect("write");
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        s.read_exact(&mut byte).expect("answer");
        line.push(byte[0]);
    }
    assert!(
        line.starts_with(b"OK "),
        "{}",
        String::from_utf8_lossy(&line)
    );
    s
}

#[test]
fn kvm_host_echo_is_byte_exact() {
    require_kvm();
    let mut dev = Device::boot(&json!({"partitions": [echo_server("echo", 3, "")]}));
    dev.wait_line("echo", "READY", T);
    let uds = dev.dir.0.join("echo.vsock");
    let mut s = bridge(&uds, 7);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut reader = s.try_clone().expect("clone");
    let expect = data.len();
    let t = std::thread::spawn(move || {
        let mut back = vec![0u8; expect];
        reader.read_exact(&mut back).expect("echoed bytes");
        back
    });
    s.write_all(&data).expect("send");
    let back = t.join().expect("reader");
    assert!(back == data, "echo differs");
    assert!(dev.shutdown().success());
}

#[test]
fn kvm_partition_to_partition_transfer_arrives_whole() {
    require_kvm();
    let bytes = 8u64 << 20;
    let client = partition(
        "client",
        "other",
        "vsockecho",
        32,
        &format!("connect=3:9:source bytes={bytes}"),
    );
    let mut client = client;
    client["vsock"] = json!({"cid": 4});
    let mut dev = Device::boot(&json!({"partitions": [echo_server("server", 3, ""), client]}));
    let line = dev.wait_line("server", "vsockecho discard", T);
    assert_eq!(line, format!("vsockecho discard {bytes}"), "{line}");
    let sent = dev.wait_line("client", "vsockecho sent", T);
    assert!(
        sent.starts_with(&format!("vsockecho sent {bytes} in ")),
        "{sent}"
    );
    let st = dev.ok(json!({"cmd": "status"}));
    assert!(st["vsock"]["counters"].is_object(), "{st}");
    assert!(dev.shutdown().success());
}

#[test]
fn kvm_slow_host_reader_keeps_monitor_buffering_bounded() {
    require_kvm();
    let total = 16u64 << 20;
    let mut dev = Device::boot(&json!({"partitions": [
        echo_server("src", 3, &format!("source_bytes={total}"))
    ]}));
    dev.wait_line("src", "READY", T);
    let uds = dev.dir.0.join("src.vsock");
    let mut s = bridge(&uds, 19);
    // Don't read for a while: the guest keeps trying to send 16 MiB.
    let mut peak = 0u64;
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let st = dev.ok(json!({"cmd": "status"}));
        let buffered = st["vsock"]["host_buffered_bytes"]
            .as_u64()
            .expect("host_buffered_bytes")
            + st["vsock"]["backlog_bytes"]
                .as_u64()
                .expect("backlog_bytes");
        peak = peak.max(buffered);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(peak > 0, "the guest did send");
    assert!(
        peak <= HOST_BUF_ALLOC,
        "monitor buffered {peak} bytes for a reader that reads nothing"
    );
    // Now read everything: every byte arrives.
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = s.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    assert_eq!(got, total);
    assert!(dev.shutdown().success());
}

#[test]
fn kvm_stopped_peer_resets_host_connections_and_returns_on_start() {
    require_kvm();
    let mut dev = Device::boot(&json!({"partitions": [echo_server("echo", 3, "")]}));
    dev.wait_line("echo", "READY", T);
    let uds = dev.dir.0.join("echo.vsock");
    let mut s = bridge(&uds, 7);
    s.write_all(b"ping").expect("write");
    let mut four = [0u8; 4];
    s.read_exact(&mut four).expect("echo");
    assert_eq!(&four, b"ping");
    dev.ok(json!({"cmd": "stop", "partition": "echo"}));
    let t0 = Instant::now();
    let r = s.read(&mut four);
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    // The bridge socket is gone with the partition, and comes back with it.
    assert!(
        !uds.exists(),
        "bridge socket removed while the partition is down"
    );
    dev.ok(json!({"cmd": "start", "partition": "echo"}));
    dev.wait_state("echo", "running", T);
    let deadline = Instant::now() + T;
    while dev
        .console("echo")
        .iter()
        .filter(|l| l.contains("READY"))
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "no second READY");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut s = bridge(&uds, 7);
    s.write_all(b"pong").expect("write");
    s.read_exact(&mut four).expect("echo after restart");
    assert_eq!(&four, b"pong");
    assert!(dev.shutdown().success());
}
