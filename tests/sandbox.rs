//! The seccomp sandbox and the unprivileged monitor (issue 11, item 6; docs/security.md).
//!
//! - A vCPU thread that makes a forbidden system call (the test-only
//!   `DUPLEX_FAULTS=vcpu.forbidden-syscall`, feature `fault-injection`) kills the monitor
//!   with one clear line; with `--no-seccomp` the same monitor runs on.
//! - `duplex run` as uid 65534, with no capabilities and no groups, over a KVM node of its
//!   own (`--kvm`), runs the printer: a job completes and `status` answers.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use duplex_link::{expected_page_checksum, JobState};
use duplex_vmm::job::JobClient;
use serde_json::json;

const T: Duration = Duration::from_secs(60);
const NOBODY: u32 = 65534;

fn require_faults() {
    require_kvm();
    #[cfg(not(feature = "fault-injection"))]
    panic!(
        "SKIPPED-BY-BUILD: this test needs `--features duplex-vmm/fault-injection` \
         (scripts/test builds with it)"
    );
}

fn engine_only(dir: &Path) -> std::path::PathBuf {
    let engine = partition(
        "engine",
        "engine",
        "engine",
        96,
        "calib_mib=16 heartbeat_ms=100",
    );
    let cfg = dir.join("device.json");
    let config = json!({"device": "sandboxed", "partitions": [engine]});
    std::fs::write(&cfg, serde_json::to_vec_pretty(&config).expect("json")).expect("write");
    cfg
}

#[test]
fn kvm_a_forbidden_syscall_on_a_vcpu_thread_kills_the_monitor_with_a_clear_message() {
    require_faults();
    let dir = TempDir::new("sandbox-trap");
    let cfg = engine_only(&dir.0);
    let mut child = Command::new(env!("CARGO_BIN_EXE_duplex"))
        .env("DUPLEX_FAULTS", "vcpu.forbidden-syscall")
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .arg("--api-sock")
        .arg(dir.0.join("api.sock"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn duplex");
    let mut pipe = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = pipe.read_to_string(&mut s);
        s
    });
    // It must die, soon: a vCPU exits at once (console output).
    let deadline = Instant::now() + T;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = reader.join().unwrap_or_default();
            panic!("the monitor ran on after a forbidden syscall; stderr: {stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = reader.join().expect("stderr reader");
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "the monitor must die of the filter's SIGSYS; {status:?}; stderr: {stderr}"
    );
    let line = stderr
        .lines()
        .find(|l| l.starts_with("duplex: seccomp: thread "))
        .unwrap_or_else(|| panic!("no seccomp line in stderr: {stderr}"));
    assert!(
        line.starts_with("duplex: seccomp: thread engine-vcpu0 tid "),
        "{line}"
    );
    assert!(
        line.ends_with(&format!(
            "(vcpu) made forbidden syscall {} (getppid); stopping the monitor",
            libc::SYS_getppid
        )),
        "{line}"
    );
    assert_eq!(
        stderr.matches("duplex: seccomp:").count(),
        1,
        "one line: {stderr}"
    );
    // Dead: no thread of it, so no partition, runs on.
    assert!(!Path::new(&format!("/proc/{}", child.id())).exists());

    // The same monitor without its filters runs on (the hook is the only difference).
    let dir = TempDir::new("sandbox-off");
    let cfg = engine_only(&dir.0);
    let env = [("DUPLEX_FAULTS", "vcpu.forbidden-syscall")];
    let mut dev = Device::boot_file_env(&cfg, dir, &["--no-seccomp".into()], &env);
    dev.wait_heartbeat("engine", 3, T);
    let st = dev.ok(json!({"cmd": "status"}));
    assert_eq!(st["seccomp"], false, "{st}");
    assert_eq!(st["partitions"][0]["state"], "running", "{st}");
    assert!(
        dev.stderr_lines()
            .iter()
            .any(|l| l.contains("seccomp is OFF (--no-seccomp)")),
        "{:?}",
        dev.stderr_lines()
    );
    assert!(dev.shutdown().success());
}

fn chown(path: &Path, mode: u32) {
    std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).expect("chown");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The `Uid:`, `Gid:`, `Groups:` and `CapEff:` lines of a process.
fn credentials(pid: u32) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .filter(|l| {
            ["Uid:", "Gid:", "Groups:", "CapEff:", "CapPrm:"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn kvm_the_printer_runs_unprivileged_over_its_own_kvm_node() {
    require_kvm();
    // SAFETY: geteuid takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "SKIPPED-BY-ENVIRONMENT: this test makes a KVM node and drops to uid {NOBODY}: it \
             needs root"
        );
    }
    let dir = TempDir::new("sandbox-nobody");
    let d = dir.0.clone();
    chown(&d, 0o700);
    // A KVM node of its own (char 10:232), owned by the unprivileged user.
    let kvm = d.join("kvm");
    let c = std::ffi::CString::new(kvm.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: `c` is a valid NUL-terminated path; makedev/mknod take plain values.
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(10, 232)) };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        kvm.display(),
        std::io::Error::last_os_error()
    );
    chown(&kvm, 0o600);
    // Its guest images, its runtime directory, its config: all inside its directory.
    let mut parts = printer_partitions(Path::new("controller.vsock"));
    for p in &mut parts {
        let src = std::path::PathBuf::from(p["kernel"].as_str().expect("kernel"));
        let dst = d.join(src.file_name().expect("file name"));
        std::fs::copy(&src, &dst).expect("copy guest");
        chown(&dst, 0o400);
        p["kernel"] = json!(dst);
    }
    let run = d.join("run");
    std::fs::create_dir(&run).expect("runtime dir");
    chown(&run, 0o700);
    let cfg = d.join("device.json");
    let config = json!({"device": "printer", "partitions": parts});
    std::fs::write(&cfg, serde_json::to_vec_pretty(&config).expect("json")).expect("write");
    chown(&cfg, 0o400);

    let prefix: Vec<String> = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
    ]
    .map(String::from)
    .to_vec();
    let extra = ["--kvm".to_owned(), kvm.display().to_string()];
    let env = [("XDG_RUNTIME_DIR", run.to_str().expect("utf-8"))];
    let mut dev = Device::boot_file_prefixed(&prefix, &cfg, dir, &extra, &env);
    let creds = credentials(dev.pid());
    for want in [
        "Uid: 65534 65534 65534 65534",
        "Gid: 65534 65534 65534 65534",
        "Groups:",
        "CapEff: 0000000000000000",
        "CapPrm: 0000000000000000",
    ] {
        assert!(creds.iter().any(|l| l == want), "{want:?} not in {creds:?}");
    }
    dev.wait_line("engine", "READY", T);
    dev.wait_line("controller", "READY", T);
    let mut c = JobClient::connect(&d.join("controller.vsock")).expect("connect to the job port");
    let id = c.submit(3, 0x5eed, 128, 128).expect("submit");
    let job = c.wait(id, T).expect("the job finishes");
    assert_eq!(job.state, JobState::Done, "{job:?}");
    let expected: Vec<u32> = (0..3)
        .map(|p| expected_page_checksum(0x5eed, p, 128, 128))
        .collect();
    assert_eq!(job.checksums, expected, "{job:?}");
    let st = dev.ok(json!({"cmd": "status"}));
    assert_eq!(st["seccomp"], true, "{st}");
    for p in st["partitions"].as_array().expect("partitions") {
        assert_eq!(p["state"], "running", "{st}");
    }
    assert!(dev.shutdown().success(), "{:?}", dev.stderr_lines());
}
