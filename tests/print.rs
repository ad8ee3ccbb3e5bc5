//! End-to-end: the print pipeline host → controller → engine → host over virtio-vsock,
//! through the real monitor, the real guests and the controller's host bridge.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use duplex_link::{expected_page_checksum, JobState};
use duplex_vmm::job::{JobClient, JobError};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

/// The reference device: engine (CID 3) and controller (CID 4, host bridge).
fn printer() -> (Device, PathBuf) {
    let parts = printer_partitions(Path::new("controller.vsock"));
    let dev = Device::boot(&json!({"device": "printer", "partitions": parts}));
    let uds = dev.dir.0.join("controller.vsock");
    dev.wait_line("engine", "READY", T);
    dev.wait_line("controller", "READY", T);
    (dev, uds)
}

fn check_job(job: &duplex_link::JobInfo, pages: u32, seed: u64, w: u16, h: u16) {
    assert_eq!(job.state, JobState::Done, "{job:?}");
    assert_eq!(job.pages_done, pages);
    let expected: Vec<u32> = (0..pages)
        .map(|p| expected_page_checksum(seed, p, w, h))
        .collect();
    assert_eq!(job.checksums, expected, "checksums of job {}", job.id);
}

#[test]
fn kvm_job_checksums_equal_the_hosts_own_computation() {
    require_kvm();
    let (mut dev, uds) = printer();
    let mut c = JobClient::connect(&uds).expect("connect to the job port");
    let id = c.submit(6, 0xfeed, 256, 256).expect("submit");
    let job = c.wait(id, T).expect("job finishes");
    check_job(&job, 6, 0xfeed, 256, 256);
    // A different seed gives different pages, and the CLI prints the same checksums.
    let id2 = c.submit(2, 0xbeef, 128, 64).expect("submit");
    let job2 = c.wait(id2, T).expect("job finishes");
    check_job(&job2, 2, 0xbeef, 128, 64);
    assert_ne!(job.checksums[..2], job2.checksums[..]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_duplex"))
        .args(["job", "--vsock"])
        .arg(&uds)
        .args(["status", &id.to_string()])
        .output()
        .expect("duplex job status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["state"], "done");
    assert_eq!(v["checksums"], json!(job.checksums));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_duplex"))
        .args(["job", "--vsock"])
        .arg(&uds)
        .args(["submit", "--pages", "3", "--seed", "9", "--wait"])
        .output()
        .expect("duplex job submit");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    let expected: Vec<u32> = (0..3)
        .map(|p| expected_page_checksum(9, p, 256, 256))
        .collect();
    assert_eq!(v["checksums"], json!(expected));
    assert!(dev.shutdown().success());
}

fn submit_many(uds: &Path, n: u32, seed0: u64) -> Vec<(u64, u64)> {
    let mut c = JobClient::connect(uds).expect("connect");
    (0..n)
        .map(|i| {
            let seed = seed0 + u64::from(i);
            (c.submit(1, seed, 64, 64).expect("submit"), seed)
        })
        .collect()
}

#[test]
fn kvm_two_hundred_jobs_from_two_clients_all_complete_once() {
    require_kvm();
    let (mut dev, uds) = printer();
    let (u1, u2) = (uds.clone(), uds.clone());
    let a = std::thread::spawn(move || submit_many(&u1, 100, 1_000));
    let b = std::thread::spawn(move || submit_many(&u2, 100, 2_000));
    let mut submitted = a.join().expect("client a");
    submitted.extend(b.join().expect("client b"));
    let mut ids: Vec<u64> = submitted.iter().map(|(id, _)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 200, "every job got its own id");
    let mut c = JobClient::connect(&uds).expect("connect");
    for (id, seed) in &submitted {
        let job = c.wait(*id, T).expect("finishes");
        check_job(&job, 1, *seed, 64, 64);
    }
    let all = c.jobs(None).expect("all jobs");
    let done = all.iter().filter(|j| j.state == JobState::Done).count();
    assert_eq!(done, 200, "no job lost or duplicated");
    match c
        .call(&duplex_link::HostRequest::EngineStatus)
        .expect("engine")
    {
        duplex_link::HostReply::Engine(info) => assert_eq!(info.pages_printed, 200),
        other => panic!("unexpected {other:?}"),
    }
    assert!(dev.shutdown().success());
}

/// Opens a raw bridge connection and returns the first answer line.
fn raw_connect(uds: &Path, port: u32) -> (String, UnixStream) {
    let mut s = UnixStream::connect(uds).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .expect("write");
    let mut line = String::new();
    BufReader::new(s.try_clone().expect("clone"))
        .read_line(&mut line)
        .expect("answer");
    (line, s)
}

#[test]
fn kvm_malformed_frames_and_unknown_ports_are_refused_and_the_link_keeps_working() {
    require_kvm();
    let (mut dev, uds) = printer();
    let mut good = JobClient::connect(&uds).expect("connect");
    // A frame announcing 4 GiB: an error reply, then the controller closes it.
    let (ok, mut bad) = raw_connect(&uds, duplex_link::JOB_PORT);
    assert!(ok.starts_with("OK "), "{ok}");
    bad.write_all(&u32::MAX.to_le_bytes()).expect("write");
    bad.write_all(b"garbage").expect("write");
    let mut rest = Vec::new();
    let _ = bad.read_to_end(&mut rest);
    let mut dec = duplex_link::FrameDecoder::<duplex_link::HostReply>::new();
    dec.push(&rest);
    match dec.next_message() {
        Some(Ok(duplex_link::HostReply::Error { code, .. })) => {
            assert_eq!(code, duplex_link::error_code::MALFORMED_FRAME)
        }
        other => panic!("expected an error reply, got {other:?} from {rest:?}"),
    }
    // A well-framed body that is not a request.
    let (_, mut bad2) = raw_connect(&uds, duplex_link::JOB_PORT);
    bad2.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff])
        .expect("write");
    let mut rest = Vec::new();
    let _ = bad2.read_to_end(&mut rest);
    assert!(!rest.is_empty(), "an error reply before the close");
    // Nobody listens on port 4242: refused, not hung.
    let (line, _s) = raw_connect(&uds, 4242);
    assert!(line.starts_with("ERR"), "{line:?}");
    // Not a CONNECT line at all.
    let (line, _s) = {
        let mut s = UnixStream::connect(&uds).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s.write_all(b"HELLO there\n").expect("write");
        let mut line = String::new();
        BufReader::new(s.try_clone().expect("clone"))
            .read_line(&mut line)
            .expect("read");
        (line, s)
    };
    assert!(line.starts_with("ERR"), "{line:?}");
    // The connection opened before all this still works.
    let id = good.submit(2, 5, 64, 64).expect("submit after garbage");
    let job = good.wait(id, T).expect("done");
    check_job(&job, 2, 5, 64, 64);
    let err = good.jobs(Some(9_999)).expect_err("unknown job");
    assert!(
        matches!(err, JobError::Controller { code: 404, .. }),
        "{err}"
    );
    assert!(dev.shutdown().success());
}

#[test]
fn kvm_stopping_the_controller_resets_host_connections() {
    require_kvm();
    let (mut dev, uds) = printer();
    let (ok, mut s) = raw_connect(&uds, duplex_link::JOB_PORT);
    assert!(ok.starts_with("OK "), "{ok}");
    dev.ok(json!({"cmd": "stop", "partition": "controller"}));
    let mut buf = [0u8; 16];
    let t0 = std::time::Instant::now();
    let r = s.read(&mut buf);
    assert!(matches!(r, Ok(0) | Err(_)), "the host sees a reset: {r:?}");
    assert!(t0.elapsed() < Duration::from_secs(10), "not a hang");
    assert!(dev.shutdown().success());
}

#[test]
fn kvm_engine_crash_mid_job_fails_the_job_and_the_controller_carries_on() {
    require_kvm();
    let (mut dev, uds) = printer();
    let mut c = JobClient::connect(&uds).expect("connect");
    let big = c.submit(5_000, 77, 256, 256).expect("submit");
    // Wait until the job is really at the engine.
    let deadline = std::time::Instant::now() + T;
    loop {
        let job = c.jobs(Some(big)).expect("status").remove(0);
        if job.pages_done >= 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job never started: {job:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    match c
        .call(&duplex_link::HostRequest::InjectCrash)
        .expect("inject")
    {
        duplex_link::HostReply::Engine(_) => {}
        other => panic!("unexpected {other:?}"),
    }
    // A real guest fault: the engine partition is crashed with #UD.
    let st = dev.wait_state("engine", "crashed", T);
    assert_eq!(st["crash"]["vector"], 6, "{st}");
    let job = c.wait(big, T).expect("the job ends");
    assert_eq!(job.state, JobState::Failed, "{job:?}");
    assert!(
        job.error.as_deref().unwrap_or("").contains("reset"),
        "{job:?}"
    );
    assert!(job.pages_done < 5_000);
    let expected: Vec<u32> = (0..job.pages_done)
        .map(|p| expected_page_checksum(77, p, 256, 256))
        .collect();
    assert_eq!(
        job.checksums, expected,
        "pages printed before the crash are right"
    );
    // The controller is up and takes new jobs; they wait for the engine.
    assert_eq!(dev.status_of("controller")["state"], "running");
    let next = c
        .submit(3, 78, 128, 128)
        .expect("submit while the engine is down");
    assert_eq!(
        c.jobs(Some(next)).expect("status")[0].state,
        JobState::Queued
    );
    dev.ok(json!({"cmd": "start", "partition": "engine"}));
    let job = c.wait(next, T).expect("done after the engine restarts");
    check_job(&job, 3, 78, 128, 128);
    assert!(dev.shutdown().success());
}
