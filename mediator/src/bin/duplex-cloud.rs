//! `duplex-cloud`: the reference cloud print service of the Duplex tunnel protocol.
//!
//! * `serve --config FILE`: accepts relays' dial-backs, asks the mediator for tunnels,
//!   sends jobs; prints `pin <hex>` and `listening tunnels=<addr> api=<addr>`.
//! * `submit --device ID --pages N --seed S [...]`: asks a running `serve` to print a job
//!   and prints one JSON object (the job's report); exits 0 only if the job is done with
//!   the expected checksums.
//! * `sync --device ID [--timeout-s N]`: asks a running `serve` to sync the device's shared
//!   documents now (a tunnel, `SyncOpen`, the device's share messages answered until its
//!   `Done`) and prints one JSON object (the sync's report); exits 0 only if it is done.
//!
//! `docs/mediator.md#duplex-cloud` has the configuration and the API.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use duplex_mediator::cloud::jobs::{JobReport, JobState};
use duplex_mediator::cloud::sync::{SyncReport, SyncState};
use duplex_mediator::cloud::{self, config::CloudConfig};
use serde_json::json;

#[derive(Parser)]
#[command(name = "duplex-cloud", about = "Duplex reference cloud print service")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the service.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Submit a print job to a running service and print its report as JSON.
    Submit {
        #[arg(long)]
        device: String,
        #[arg(long)]
        pages: u32,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        width: Option<u16>,
        #[arg(long)]
        height: Option<u16>,
        /// Bytes of (pseudo-random, from the seed) document the job carries.
        #[arg(long, default_value_t = 0)]
        document_bytes: u64,
        /// The job id (the idempotency key); a random `job-<hex>` if not given.
        #[arg(long)]
        job_id: Option<String>,
        #[arg(long, default_value = "http://127.0.0.1:9080")]
        server: String,
        #[arg(long, default_value_t = 60)]
        timeout_s: u64,
    },
    /// Sync a device's shared documents through a running service; print the report.
    Sync {
        #[arg(long)]
        device: String,
        #[arg(long, default_value = "http://127.0.0.1:9080")]
        server: String,
        #[arg(long, default_value_t = 60)]
        timeout_s: u64,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("duplex-cloud: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.cmd {
        Cmd::Serve { config } => match rt.block_on(serve(config)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("duplex-cloud: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Submit {
            device,
            pages,
            seed,
            width,
            height,
            document_bytes,
            job_id,
            server,
            timeout_s,
        } => {
            let body = json!({
                "device_id": device, "pages": pages, "seed": seed, "width": width, "height": height,
                "document_bytes": document_bytes, "job_id": job_id, "timeout_s": timeout_s,
            });
            rt.block_on(submit(&server, body, device, timeout_s))
        }
        Cmd::Sync {
            device,
            server,
            timeout_s,
        } => rt.block_on(sync(&server, device, timeout_s)),
    }
}

async fn serve(path: PathBuf) -> Result<(), String> {
    let cfg = CloudConfig::load(&path).map_err(|e| e.to_string())?;
    if let Err(e) = duplex_mediator::util::raise_nofile_limit() {
        log::warn!("cannot raise the open files limit: {e}");
    }
    let running = cloud::start(cfg).await.map_err(|e| e.to_string())?;
    println!("pin {}", running.pin);
    println!(
        "listening tunnels={} api={}",
        running.tunnel_addr, running.api_addr
    );
    log::info!(
        "accepting tunnels on {} (relays dial {}), API on {}",
        running.tunnel_addr,
        running.cloud.dial_addr,
        running.api_addr
    );
    duplex_mediator::util::wait_for_signal().await;
    Ok(())
}

async fn submit(server: &str, body: serde_json::Value, device: String, timeout_s: u64) -> ExitCode {
    let limit = Duration::from_secs(timeout_s + 30);
    let job_id = body["job_id"].as_str().unwrap_or("").to_string();
    let failed = |error: String| {
        let mut r = JobReport::new(JobState::Failed, &job_id, &device);
        r.error = Some(error);
        r
    };
    let report =
        match duplex_mediator::http::request(server, "POST", "/v1/jobs", None, Some(&body), limit)
            .await
        {
            Ok(r) if r.status == 200 => serde_json::from_value::<JobReport>(r.body)
                .unwrap_or_else(|e| failed(format!("the server's report is malformed: {e}"))),
            Ok(r) => failed(format!("server answered {}: {}", r.status, r.body)),
            Err(e) => failed(e.to_string()),
        };
    match serde_json::to_string(&report) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("duplex-cloud: cannot print the report: {e}"),
    }
    if report.state == JobState::Done && report.checksums_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn sync(server: &str, device: String, timeout_s: u64) -> ExitCode {
    let limit = Duration::from_secs(timeout_s + 30);
    let body = json!({ "timeout_s": timeout_s });
    let path = format!("/v1/devices/{device}/sync");
    let report =
        match duplex_mediator::http::request(server, "POST", &path, None, Some(&body), limit).await
        {
            Ok(r) if r.status == 200 => serde_json::from_value::<SyncReport>(r.body)
                .unwrap_or_else(|e| {
                    SyncReport::failed(&device, format!("the server's report is malformed: {e}"))
                }),
            Ok(r) => {
                SyncReport::failed(&device, format!("server answered {}: {}", r.status, r.body))
            }
            Err(e) => SyncReport::failed(&device, e.to_string()),
        };
    match serde_json::to_string(&report) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("duplex-cloud: cannot print the report: {e}"),
    }
    if report.state == SyncState::Done {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
