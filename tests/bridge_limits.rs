//! End-to-end: 10 000 host connections to a partition's vsock bridge socket, in waves of
//! 500 held open at once: `CONNECT` to the controller's job port, to a port nobody listens
//! on, and connections that never send their line. Throughout, the monitor answers
//! `status`, its fds stay under the bridge's documented cap (`MAX_HOST_SOCKS_PER_CID`
//! host sockets per partition), it starts no thread per connection, and afterwards a job
//! prints with the right checksums.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use duplex_devices::vsock::MAX_HOST_SOCKS_PER_CID;
use duplex_link::{expected_page_checksum, JobState};
use duplex_vmm::job::JobClient;
use serde_json::json;

const WAVES: usize = 20;
const WAVE: usize = 500;

fn count(pid: u32, what: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/{what}"))
        .map(|d| d.count())
        .unwrap_or_else(|e| panic!("/proc/{pid}/{what}: {e}"))
}

#[test]
fn kvm_ten_thousand_bridge_connections_leave_the_monitor_answering_and_bounded() {
    require_kvm();
    let _ = duplex_devices::health::raise_fd_limit();
    let dir = TempDir::new("bridge-limits");
    let uds = dir.0.join("controller.vsock");
    let cfg = json!({"device": "printer", "partitions": printer_partitions(&uds)});
    let file = dir.0.join("device.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&cfg).expect("json")).expect("write");
    let mut dev = Device::boot_file(&file, TempDir::new("bridge-limits-run"));
    dev.wait_line("engine", "READY", Duration::from_secs(60));
    dev.wait_line("controller", "READY", Duration::from_secs(60));
    let pid = dev.pid();
    let (fds0, threads0) = (count(pid, "fd"), count(pid, "task"));

    // `status` all along, from its own thread.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let sock = dev.sock.clone();
    let poller = {
        let (stop, answered) = (stop.clone(), answered.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut c = Conn::new(&sock);
                let r = c.request(&json!({"cmd": "status"}));
                assert_eq!(r["ok"], true, "{r}");
                answered.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let (mut ok, mut busy, mut refused, mut silent) = (0usize, 0usize, 0usize, 0usize);
    let (mut max_fds, mut max_threads) = (0, 0);
    for wave in 0..WAVES {
        let before = answered.load(Ordering::Relaxed);
        let conns: Vec<(usize, UnixStream)> = (0..WAVE)
            .map(|i| {
                let s = UnixStream::connect(&uds).expect("connect to the bridge");
                s.set_read_timeout(Some(Duration::from_secs(15)))
                    .expect("timeout");
                let mut w: &UnixStream = &s;
                let _ = match i % 3 {
                    0 => w.write_all(b"CONNECT 1024\n"),
                    1 => w.write_all(b"CONNECT 9999\n"),
                    _ => Ok(()),
                };
                (i % 3, s)
            })
            .collect();
        max_fds = max_fds.max(count(pid, "fd"));
        max_threads = max_threads.max(count(pid, "task"));
        for (kind, s) in &conns {
            if *kind == 2 {
                silent += 1;
                continue;
            }
            let mut line = String::new();
            let _ = BufReader::new(s).read_line(&mut line);
            match line.trim_end() {
                l if l.starts_with("OK ") => ok += 1,
                "ERR busy" => busy += 1,
                l if l.starts_with("ERR") || l.is_empty() => refused += 1,
                other => panic!("wave {wave}: unexpected answer {other:?}"),
            }
        }
        drop(conns);
        // The monitor kept answering while the wave was held.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while answered.load(Ordering::Relaxed) <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "no status during wave {wave}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    stop.store(true, Ordering::Relaxed);
    poller.join().expect("status poller");
    eprintln!(
        "ok {ok}, busy {busy}, refused {refused}, silent {silent}; fds {fds0} -> {max_fds}, \
         threads {threads0} -> {max_threads}"
    );
    assert_eq!(ok + busy + refused + silent, WAVES * WAVE);
    assert!(ok > 0, "some CONNECT 1024 were accepted");
    assert!(
        busy > 0,
        "the per-partition cap was reached and answered `ERR busy`"
    );
    // The bridge holds at most MAX_HOST_SOCKS_PER_CID of this partition's host sockets;
    // a few more fds for the status connections and the ones being refused.
    assert!(
        max_fds <= fds0 + MAX_HOST_SOCKS_PER_CID + 32,
        "{max_fds} fds (from {fds0}), cap {MAX_HOST_SOCKS_PER_CID}"
    );
    // No thread per connection: the bridge lives on the device event loop.
    assert!(
        max_threads <= threads0 + 4,
        "{max_threads} threads (from {threads0})"
    );

    // The device still prints, right.
    let mut c = JobClient::connect(&uds).expect("connect after the waves");
    let id = c.submit(5, 0xb1d9, 64, 64).expect("submit");
    let job = c.wait(id, Duration::from_secs(60)).expect("job");
    assert_eq!(job.state, JobState::Done, "{job:?}");
    let expected: Vec<u32> = (0..5)
        .map(|p| expected_page_checksum(0xb1d9, p, 64, 64))
        .collect();
    assert_eq!(job.checksums, expected);
    let st = dev.ok(json!({"cmd": "status"}));
    let v = &st["vsock"]["counters"];
    assert!(v["host_busy"].as_u64().unwrap_or(0) > 0, "{v}");
    for p in st["partitions"].as_array().expect("partitions") {
        assert_eq!(p["state"], "running", "{p}");
    }
    assert!(dev.shutdown().success());
}
