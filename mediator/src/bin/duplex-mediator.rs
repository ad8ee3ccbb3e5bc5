//! `duplex-mediator`: the mediation server of the Duplex tunnel protocol.
//!
//! * `keygen --out DIR [--name NAME]`: a self-signed ECDSA P-256 certificate and key
//!   (`DIR/cert.pem`, `DIR/key.pem`); prints `pin <hex>`.
//! * `pin --cert FILE`: prints the pin of a certificate.
//! * `serve --config FILE`: runs the server; prints `pin <hex>` and
//!   `listening relays=<addr> api=<addr>`, then serves until SIGINT or SIGTERM.
//!
//! `docs/mediator.md` has the configuration and the logs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use duplex_mediator::server::{self, config::Config};

#[derive(Parser)]
#[command(
    name = "duplex-mediator",
    about = "Duplex mediation server: relays' control sessions and the tunnel API"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Make a self-signed ECDSA P-256 certificate and key; print its pin.
    Keygen {
        /// Directory for cert.pem and key.pem (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// The certificate's subject name (DNS name or IP address).
        #[arg(long, default_value = "duplex-mediator")]
        name: String,
    },
    /// Print the pin (SHA-256 of the SubjectPublicKeyInfo) of a PEM certificate.
    Pin {
        #[arg(long)]
        cert: PathBuf,
    },
    /// Run the server.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Keygen { out, name } => duplex_mediator::pin::keygen(&out, &name)
            .map(|pin| println!("pin {pin}"))
            .map_err(|e| e.to_string()),
        Cmd::Pin { cert } => duplex_mediator::pin::pin_of_pem_file(&cert)
            .map(|pin| println!("pin {pin}"))
            .map_err(|e| e.to_string()),
        Cmd::Serve { config } => serve(config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("duplex-mediator: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(path: PathBuf) -> Result<(), String> {
    let cfg = Config::load(&path).map_err(|e| e.to_string())?;
    match duplex_mediator::util::raise_nofile_limit() {
        Ok(n) => log::info!("open files limit: {n}"),
        Err(e) => log::warn!("cannot raise the open files limit: {e}"),
    }
    let rt = tokio::runtime::Runtime::new().map_err(|e| format!("tokio runtime: {e}"))?;
    rt.block_on(async move {
        let running = server::start(cfg).await.map_err(|e| e.to_string())?;
        println!("pin {}", running.pin);
        println!(
            "listening relays={} api={}",
            running.relay_addr, running.api_addr
        );
        log::info!(
            "serving relays on {} and the API on {}",
            running.relay_addr,
            running.api_addr
        );
        duplex_mediator::util::wait_for_signal().await;
        log::info!("stopping");
        Ok(())
    })
}
