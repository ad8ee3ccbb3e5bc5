//! `duplex-relay-sim`: a simulated relay on the host, for testing the mediator and a cloud
//! server without KVM (`docs/mediator.md#duplex-relay-sim`).
//!
//! * Normal mode: one relay with a fake device serving tunnel requests end to end; with
//!   `--mac`, `--segment` and `--sleep-idle-ms` it sleeps when idle and wakes on the magic
//!   packet for its MAC at `--wake-listen`; with `--segment` it wakes others as a
//!   substitute, sending magic packets to `--wake-to`.
//! * `--sessions N`: N bare sessions (`<prefix><i>`) with heartbeats, for load; prints a
//!   JSON line of counters every 5 s.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use duplex_mediator::sim::{self, device::FakeDevice, load, SimConfig};
use duplex_tunnel::parse_key;

#[derive(Parser)]
#[command(
    name = "duplex-relay-sim",
    about = "A simulated Duplex relay (host side, for tests and load)"
)]
struct Cli {
    /// The mediator's relay port.
    #[arg(long)]
    mediator: SocketAddr,
    /// The mediator's pin (64 hex digits).
    #[arg(long)]
    mediator_pin: String,
    /// The relay's secret (64 hex digits).
    #[arg(long)]
    secret: String,
    /// The relay id (normal mode).
    #[arg(long, default_value = "relay-sim")]
    relay_id: String,
    /// A device this relay serves (repeat for more).
    #[arg(long = "device")]
    devices: Vec<String>,
    /// The cloud servers' pin (normal mode).
    #[arg(long)]
    cloud_pin: Option<String>,
    /// Reconnect backoff, first wait and cap.
    #[arg(long, default_value_t = 250)]
    backoff_base_ms: u64,
    #[arg(long, default_value_t = 30_000)]
    backoff_max_ms: u64,
    /// The card's MAC, `52:54:00:12:34:56` (to sleep and be woken).
    #[arg(long)]
    mac: Option<String>,
    /// The LAN segment (to sleep, and to wake other relays as a substitute).
    #[arg(long)]
    segment: Option<String>,
    /// Ask to sleep after this long without tunnel work.
    #[arg(long)]
    sleep_idle_ms: Option<u64>,
    /// UDP address watched while asleep: the magic packet for --mac wakes the relay.
    #[arg(long)]
    wake_listen: Option<SocketAddr>,
    /// Where magic packets go when this relay wakes another (default 255.255.255.255:9).
    #[arg(long)]
    wake_to: Option<SocketAddr>,
    /// Load mode: this many sessions, relay ids `<relay-prefix><i>`.
    #[arg(long)]
    sessions: Option<usize>,
    #[arg(long, default_value = "load-")]
    relay_prefix: String,
    /// Logins under way at once (load mode).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Stop after this many seconds (default: run until killed).
    #[arg(long)]
    seconds: Option<u64>,
}

fn key(name: &str, hex: &str) -> Result<[u8; 32], String> {
    parse_key(hex).ok_or_else(|| format!("--{name}: expected 64 hex digits"))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("duplex-relay-sim: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("duplex-relay-sim: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let mediator_pin = key("mediator-pin", &cli.mediator_pin)?;
    let secret = key("secret", &cli.secret)?;
    let _ = duplex_mediator::util::raise_nofile_limit();
    let until = async {
        match cli.seconds {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => duplex_mediator::util::wait_for_signal().await,
        }
    };
    if let Some(n) = cli.sessions {
        let load = load::start(load::LoadConfig {
            mediator: cli.mediator,
            mediator_pin,
            relay_prefix: cli.relay_prefix.clone(),
            secret,
            sessions: n,
            concurrency: cli.concurrency,
        })
        .map_err(|e| e.to_string())?;
        let stats = load.stats.clone();
        let line = || {
            serde_json::json!({
                "online": stats.online.load(Ordering::Relaxed),
                "logins": stats.logins.load(Ordering::Relaxed),
                "pings": stats.pings.load(Ordering::Relaxed),
                "pongs": stats.pongs.load(Ordering::Relaxed),
                "failures": stats.failures.load(Ordering::Relaxed),
            })
        };
        let report = async {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.tick().await;
            loop {
                tick.tick().await;
                println!("{}", line());
            }
        };
        tokio::select! {
            _ = until => {}
            _ = report => {}
        }
        println!("{}", line());
        load.stop().await;
        return Ok(());
    }
    let cloud_pin = key(
        "cloud-pin",
        cli.cloud_pin
            .as_deref()
            .ok_or("--cloud-pin is needed without --sessions")?,
    )?;
    let devices: Vec<&str> = cli.devices.iter().map(String::as_str).collect();
    let mut cfg = SimConfig::new(
        cli.mediator,
        mediator_pin,
        cloud_pin,
        &cli.relay_id,
        secret,
        &devices,
    );
    cfg.backoff_base_ms = cli.backoff_base_ms;
    cfg.backoff_max_ms = cli.backoff_max_ms;
    cfg.mac = match cli.mac.as_deref() {
        Some(m) => Some(
            duplex_mediator::util::parse_mac(m)
                .ok_or_else(|| format!("--mac: {m:?} is not a MAC like 52:54:00:12:34:56"))?,
        ),
        None => None,
    };
    if let Some(seg) = cli.segment.as_deref() {
        if !duplex_tunnel::valid_id(seg) {
            return Err(format!("--segment: {seg:?}: 1-64 of A-Z a-z 0-9 - _ . : @"));
        }
    }
    cfg.segment = cli.segment.clone();
    cfg.sleep_idle_ms = cli.sleep_idle_ms;
    cfg.wake_listen = cli.wake_listen;
    cfg.wake_to = cli.wake_to;
    let relay =
        sim::RelaySim::spawn(cfg, Arc::new(FakeDevice::new())).map_err(|e| e.to_string())?;
    if let Some(addr) = relay.wake_addr {
        println!("wake-listen {addr}");
    }
    until.await;
    let st = &relay.stats;
    println!(
        "{}",
        serde_json::json!({
            "prints": relay.device.prints(),
            "welcomes": st.welcomes.load(Ordering::Relaxed),
            "sleeps": st.sleeps.load(Ordering::Relaxed),
            "wakes": st.wakes.load(Ordering::Relaxed),
            "magic_sent": st.magic_sent.load(Ordering::Relaxed),
            "magic_dropped": st.magic_dropped.load(Ordering::Relaxed),
        })
    );
    relay.kill().await;
    Ok(())
}
