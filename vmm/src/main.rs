//! `duplex`: the monitor's command line. `duplex run` boots a device from its config and
//! serves the control socket; `duplex ctl` talks to a running monitor; `duplex check`
//! validates a config without booting it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use duplex_vmm::api::client::{run_ctl, CtlArgs};
use duplex_vmm::api::server::ApiServer;
use duplex_vmm::config::DeviceConfig;
use duplex_vmm::monitor::Monitor;
use duplex_vmm::sandbox::{self, ThreadKind};

/// Duplex: runs the systems of one device as KVM partitions of one machine.
#[derive(Parser)]
#[command(name = "duplex", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot every partition of a device and serve the control socket.
    Run(RunArgs),
    /// Send one command to a running monitor's control socket.
    Ctl(CtlArgs),
    /// Submit print jobs to the controller and read job and engine status (through the
    /// controller's vsock host bridge).
    Job(duplex_vmm::job::JobArgs),
    /// Manage the controller's document service: accounts, boxes, documents, rights and
    /// scans (through the controller's vsock host bridge; one JSON object per command).
    Box(duplex_vmm::boxcli::BoxArgs),
    /// Inspect, verify or merge snapshot sets.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Validate a device config (JSON syntax, fields, kernels) without booting it.
    Check {
        /// The device config file.
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Print a set's manifest summary as JSON.
    Inspect {
        /// The set's directory.
        dir: PathBuf,
    },
    /// Check every file of a set (and its parents) against its checksum.
    Verify {
        /// The set's directory.
        dir: PathBuf,
    },
    /// Flatten an incremental set and its parents into one full set.
    Merge {
        /// The (child) set.
        dir: PathBuf,
        /// Where the full set goes (written atomically).
        dest: PathBuf,
    },
}

fn snapshot_cmd(cmd: &SnapshotCmd) -> Result<serde_json::Value, String> {
    match cmd {
        SnapshotCmd::Inspect { dir } => duplex_snapshot::inspect(dir).map_err(|e| e.to_string()),
        SnapshotCmd::Verify { dir } => {
            let set = duplex_snapshot::SnapshotSet::open(dir).map_err(|e| e.to_string())?;
            let v = set.verify().map_err(|e| e.to_string())?;
            Ok(serde_json::json!({
                "set": dir,
                "set_id": set.manifest.set_id,
                "ok": true,
                "sets": v.sets,
                "files": v.files,
                "bytes_read": v.bytes_read,
                "ms": v.elapsed.as_secs_f64() * 1e3,
            }))
        }
        SnapshotCmd::Merge { dir, dest } => duplex_snapshot::merge(dir, dest)
            .map(|()| serde_json::json!({ "merged": dir, "into": dest }))
            .map_err(|e| e.to_string()),
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// The device config file (JSON; see docs/config.md).
    #[arg(long)]
    config: PathBuf,
    /// The control socket's path (default: `duplex.sock` in the private runtime directory,
    /// `$XDG_RUNTIME_DIR/duplex`, or `/run/duplex` for root, made mode 0700 if missing).
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Shut down by itself after this many seconds (default: run until told to stop).
    #[arg(long)]
    seconds: Option<f64>,
    /// Start every partition from this snapshot set instead of booting cold.
    #[arg(long)]
    restore: Option<PathBuf>,
    /// With --restore: read memory files up front instead of mapping them lazily.
    #[arg(long)]
    eager: bool,
    /// With --restore: what to do when the set fails validation (`cold`: boot cold and
    /// say why in `status`; default: refuse to start).
    #[arg(long, value_parser = ["cold"])]
    fallback: Option<String>,
    /// The KVM device node to open (a node of its own lets an unprivileged monitor use
    /// KVM: docs/security.md).
    #[arg(long, default_value = "/dev/kvm")]
    kvm: PathBuf,
    /// Run WITHOUT the seccomp filters (debugging only; logs a loud warning).
    #[arg(long)]
    no_seccomp: bool,
}

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

/// How long the monitor waits, when it exits, for console lines still queued to be
/// written (a reader that does not read cannot hold the exit longer).
const CONSOLE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Raises the soft open-file limit to the hard one (each control client, bridge
/// connection, TAP and set file is an fd) and logs it.
fn raise_fd_limit() {
    match duplex_devices::health::raise_fd_limit() {
        Ok((old, new)) if old != new => log::info!("open file limit raised from {old} to {new}"),
        Ok((_, new)) => log::info!("open file limit {new}"),
        Err(e) => log::warn!("cannot raise the open file limit: {e}"),
    }
}

/// Makes the private runtime directory (mode 0700) when a partition's vsock bridge socket
/// is to be in it (the examples put them there: `/run/duplex/<name>.vsock` as root), so
/// the guest-initiated `<uds>_<port>` sockets a host program listens on are private too.
fn ensure_runtime_dir_for_bridges(config: &DeviceConfig) -> Result<(), String> {
    use duplex_vmm::rundir;
    // This process's runtime directory, and root's (`/run/duplex`) when running as root
    // with an `XDG_RUNTIME_DIR` that points elsewhere.
    let mut dirs: Vec<PathBuf> = rundir::runtime_dir_path().into_iter().collect();
    if let Ok(root) = rundir::runtime_dir_for(None, 0) {
        // SAFETY: geteuid takes no arguments and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            dirs.push(root);
        }
    }
    for p in &config.partitions {
        let parent = p
            .vsock
            .as_ref()
            .and_then(|v| v.uds.as_deref())
            .and_then(|u| u.parent());
        if let Some(dir) = parent.filter(|d| dirs.iter().any(|r| r == d)) {
            rundir::ensure_private_dir(dir).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

fn run(args: &RunArgs) -> Result<(), String> {
    let t0 = Instant::now();
    // Every thread of the monitor starts under the startup filter (the union of every
    // kind's); each then adds its own (docs/security.md).
    sandbox::init(args.no_seccomp).map_err(|e| e.to_string())?;
    sandbox::enter(ThreadKind::Startup).map_err(|e| e.to_string())?;
    raise_fd_limit();
    let config = DeviceConfig::load(&args.config).map_err(|e| e.to_string())?;
    // Before booting anything: a socket that cannot be placed fails the start at once.
    let api_sock = match &args.api_sock {
        Some(path) => path.clone(),
        None => duplex_vmm::rundir::default_api_sock().map_err(|e| e.to_string())?,
    };
    ensure_runtime_dir_for_bridges(&config)?;
    let monitor = Monitor::with_kvm(&config, &args.kvm).map_err(|e| e.to_string())?;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(sig, on_signal)
            .map_err(|e| format!("installing the handler of signal {sig}: {e}"))?;
    }
    if args.restore.is_some() {
        // The restore's VMs are made while the set is opened and verified.
        monitor.make_shells();
    }
    match &args.restore {
        None => {
            monitor.start_all().map_err(|e| e.to_string())?;
            // A first reboot from a set finds its VMs made.
            monitor.make_shells();
        }
        Some(dir) => {
            let mode = if args.eager {
                duplex_snapshot::LoadMode::Eager
            } else {
                duplex_snapshot::LoadMode::LazyPrefetch
            };
            match monitor.restore_from(dir, mode, duplex_vmm::monitor::ops::Operation::Restore) {
                Ok(v) => log::info!("restored from {}: {v}", dir.display()),
                Err(e) if args.fallback.is_some() => {
                    log::warn!("not restoring: {e}; falling back to a cold boot");
                    monitor.set_fallback(e.to_string());
                    monitor.start_all().map_err(|e| e.to_string())?;
                    monitor.make_shells();
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }
    let handler: Arc<dyn duplex_vmm::api::server::ControlHandler> = monitor.clone();
    let server = ApiServer::bind(&api_sock, handler).map_err(|e| e.to_string())?;
    log::info!(
        "device {} up: {} partition(s) started in {:.1} ms; control socket {}",
        config.device.as_deref().unwrap_or("(unnamed)"),
        config.partitions.len(),
        t0.elapsed().as_secs_f64() * 1000.0,
        api_sock.display()
    );
    // From here on the main thread only waits, then shuts down; it starts no thread.
    sandbox::enter(ThreadKind::Main).map_err(|e| e.to_string())?;
    let deadline = args
        .seconds
        .map(|s| t0 + Duration::from_secs_f64(s.max(0.0)));
    loop {
        if monitor.wait_shutdown(Duration::from_millis(50)) {
            log::info!("shutdown requested over the control socket");
            break;
        }
        if SIGNALLED.load(Ordering::SeqCst) {
            log::info!("signal received; shutting down");
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            log::info!("--seconds elapsed; shutting down");
            break;
        }
    }
    monitor.request_shutdown();
    monitor.stop_all();
    server.shutdown();
    if !duplex_devices::console::flush_all(CONSOLE_FLUSH_TIMEOUT) {
        log::warn!("console output not all written within {CONSOLE_FLUSH_TIMEOUT:?}");
    }
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Cmd::Run(args) => run(args),
        Cmd::Ctl(args) => run_ctl(args)
            .map(|v| println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()))
            .map_err(|e| e.to_string()),
        Cmd::Job(args) => duplex_vmm::job::run_job(args)
            .map(|v| println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()))
            .map_err(|e| e.to_string()),
        Cmd::Box(args) => duplex_vmm::boxcli::run_box(args)
            .map(|v| {
                if !v.is_null() {
                    println!("{}", serde_json::to_string(&v).unwrap_or_default());
                }
            })
            .map_err(|e| e.to_string()),
        Cmd::Snapshot(cmd) => snapshot_cmd(cmd)
            .map(|v| println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())),
        Cmd::Check { config } => DeviceConfig::load(config)
            .map(|c| {
                for p in &c.partitions {
                    let net = p
                        .net
                        .as_ref()
                        .map(|n| format!(", net tap {} mac {}", n.tap, n.mac))
                        .unwrap_or_default();
                    println!(
                        "{}: {} {} MiB, {} vCPU(s), kernel {}{net}",
                        p.name,
                        p.role.as_str(),
                        p.memory_mib,
                        p.vcpus,
                        p.kernel.display()
                    );
                }
                println!("config OK");
            })
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("duplex: {e}");
            ExitCode::FAILURE
        }
    }
}
