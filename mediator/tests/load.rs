//! Scale: N simulated relays hold logged-in sessions with 1 s heartbeats against one
//! `duplex-mediator` process; all must show online, and the mediator's memory (RSS from
//! `/proc/<pid>/status`) and CPU (`/proc/<pid>/stat`) are reported.
//!
//! N is 10,000 by default, the figure (about 15 s in a debug build: `ring` and `rustls`
//! are optimised in debug builds too, see the root Cargo.toml); `DUPLEX_MEDIATOR_SESSIONS=N`
//! sets another.
//! `DUPLEX_MEDIATOR_LOAD_JSON=FILE` writes the numbers as JSON.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use duplex_mediator::sim::load::{self, LoadConfig};
use serde_json::json;

/// `VmRSS` and `VmHWM` of `pid`, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .expect("a field of /proc status")
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// User + system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').expect("command in /proc stat") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the command.
    fields[11].parse::<u64>().expect("CPU ticks") + fields[12].parse::<u64>().expect("CPU ticks")
}

fn clock_ticks_per_s() -> u64 {
    // SAFETY: sysconf has no memory effects; _SC_CLK_TCK is always valid.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).unwrap_or(100)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_sessions_stay_online() {
    let n: usize = std::env::var("DUPLEX_MEDIATOR_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    duplex_mediator::util::raise_nofile_limit().unwrap();
    let dir = TempDir::new("load");
    let relays = (0..n).map(|i| relay(&format!("load-{i}"), &[])).collect();
    let mut spec = MediatorSpec::new(relays);
    spec.heartbeat_ms = 1000;
    // Generous: a starved machine (CI, parallel builds) must not time sessions out; the
    // heartbeats still flow every second.
    spec.heartbeat_timeout_ms = 30_000;
    let m = start_mediator(&dir, &spec);
    let pid = m.pid();
    let (idle_rss, _) = memory_kib(pid);
    let api = m.addr("api");

    let started = Instant::now();
    let load = load::start(LoadConfig {
        mediator: m.addr("relays"),
        mediator_pin: m.pin(),
        relay_prefix: "load-".into(),
        secret: SECRET,
        sessions: n,
        concurrency: 64,
    })
    .unwrap();
    let limit = Duration::from_secs(60 + n as u64 / 50);
    wait_for(limit, "all sessions online", || async move {
        let r = api_get(api, "/v1/readyz").await;
        r.body["relays_online"].as_u64() == Some(n as u64)
    })
    .await;
    let ramp = started.elapsed();

    // Steady state: heartbeats only, for 5 s.
    let window = Duration::from_secs(5);
    let (cpu0, pongs0, t0) = (
        cpu_ticks(pid),
        load.stats.pongs.load(Ordering::Relaxed),
        Instant::now(),
    );
    tokio::time::sleep(window).await;
    let (cpu1, pongs1, secs) = (
        cpu_ticks(pid),
        load.stats.pongs.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64(),
    );
    let cpu_pct = (cpu1 - cpu0) as f64 / clock_ticks_per_s() as f64 / secs * 100.0;
    let (rss, hwm) = memory_kib(pid);

    // Every relay online in /v1/relays, none lost, heartbeats answered.
    let relays = api_get(api, "/v1/relays").await;
    let online = relays.body["relays"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["online"] == true)
        .count();
    assert_eq!(online, n);
    assert_eq!(load.stats.online.load(Ordering::Relaxed), n);
    assert_eq!(
        load.stats.logins.load(Ordering::Relaxed),
        n as u64,
        "no session was lost and redone"
    );
    let pong_rate = (pongs1 - pongs0) as f64 / secs;
    assert!(
        pong_rate > n as f64 * 0.5,
        "{pong_rate:.0} pongs/s for {n} sessions at 1/s"
    );

    let per_session = (rss.saturating_sub(idle_rss)) as f64 * 1024.0 / n as f64;
    let report = json!({
        "sessions": n,
        "ramp_s": ramp.as_secs_f64(),
        "rss_kib": rss, "rss_peak_kib": hwm, "rss_idle_kib": idle_rss,
        "bytes_per_session": per_session.round(),
        "cpu_percent_steady": (cpu_pct * 10.0).round() / 10.0,
        "pongs_per_s": pong_rate.round(),
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
    });
    println!("mediator load: {report}");
    if let Ok(path) = std::env::var("DUPLEX_MEDIATOR_LOAD_JSON") {
        std::fs::write(path, report.to_string()).unwrap();
    }
    // A generous bound: sessions must stay small (no big buffers per session).
    assert!(
        per_session < 64.0 * 1024.0,
        "{per_session:.0} bytes per session"
    );
    load.stop().await;
}
