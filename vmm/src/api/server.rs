//! The control socket server: a Unix socket speaking newline-delimited JSON, a thread per
//! client up to a cap, every request handed to a [`ControlHandler`].
//!
//! The socket is bound private (its file created with its mode, see
//! `duplex_devices::umask`). At most [`ApiServerOptions::max_clients`] clients are served
//! at once: one more is answered one `too_many_clients` error line and closed, by the
//! accept thread, with no thread of its own. A client that completes no line within
//! [`ApiServerOptions::idle_timeout`] is closed. Lines are read and answered in
//! [`super::conn`]. The accept loop is a supervised service (`api-accept` in the service
//! health): a panic in it restarts it.

use crate::lock;
use std::cell::Cell;
use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use duplex_devices::health::{self, Restart};
use duplex_devices::umask;
use serde::Serialize;
use serde_json::Value;

use super::conn::{serve_client, Ended, IN_HANDLER};
use super::protocol::{ApiError, Command, ErrorCode, Response};

/// How often the accept thread checks whether it should stop.
const POLL_INTERVAL_MS: i32 = 50;
/// How long a response write may block on a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`ApiServer::shutdown`] waits for responses being written to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// The most clients served at once by default (each has a thread and one fd).
pub const MAX_CLIENTS: usize = 64;
/// How long a client may take to complete a line, by default, before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The control socket file's mode by default.
pub const SOCKET_MODE: u32 = 0o600;
/// How many panics of the accept loop are survived (each restarts it).
pub const ACCEPT_RESTARTS: u32 = 10;

/// Carries out control commands; implemented by the monitor.
pub trait ControlHandler: Send + Sync + 'static {
    /// Runs one parsed command and returns its result, or the error to answer with.
    /// Called concurrently from the clients' threads.
    fn handle(&self, cmd: Command) -> Result<Value, ApiError>;
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// A live process is already listening on the socket path.
    #[error("control socket {path}: another process is listening on it")]
    InUse { path: PathBuf },
    /// Something other than a socket exists at the path; it is left alone.
    #[error("control socket {path}: exists and is not a socket (not removing it)")]
    NotASocket { path: PathBuf },
    /// A system call on the socket failed.
    #[error("control socket {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    /// The accept thread could not be started.
    #[error("control socket {path}: cannot start the accept thread: {source}")]
    Thread { path: PathBuf, source: io::Error },
}

/// How the control socket serves its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiServerOptions {
    /// The most clients served at once; more are refused with `too_many_clients`.
    pub max_clients: usize,
    /// A client that completes no line for this long is closed.
    pub idle_timeout: Duration,
    /// The socket file's mode (set before the socket listens).
    pub mode: u32,
}

impl Default for ApiServerOptions {
    fn default() -> Self {
        ApiServerOptions {
            max_clients: MAX_CLIENTS,
            idle_timeout: IDLE_TIMEOUT,
            mode: SOCKET_MODE,
        }
    }
}

/// The control socket's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ApiServerStats {
    /// Clients connected now.
    pub clients: usize,
    /// The cap on clients.
    pub max_clients: usize,
    /// Clients refused with `too_many_clients` since the start.
    pub refused_clients: u64,
    /// Clients closed for completing no line within the idle timeout.
    pub idle_closed: u64,
}

/// The running control socket. Dropping it (or [`ApiServer::shutdown`]) stops
/// accepting, removes the socket file and ends the client connections.
pub struct ApiServer {
    path: PathBuf,
    /// Device and inode of the socket file we created, so that we never remove a
    /// socket some other process bound at the same path later.
    file_id: (u64, u64),
    shared: Arc<Shared>,
    accept_thread: Mutex<Option<JoinHandle<()>>>,
}

/// What the accept thread, the client threads and the server share.
pub(super) struct Shared {
    pub(super) handler: Arc<dyn ControlHandler>,
    pub(super) stopping: AtomicBool,
    /// The connected clients' streams, to end their reads on shutdown.
    clients: Mutex<HashMap<u64, Arc<UnixStream>>>,
    /// Requests being handled or answered right now.
    pub(super) busy: AtomicUsize,
    options: ApiServerOptions,
    refused: AtomicU64,
    idle_closed: AtomicU64,
    /// Tests: how many times the accept loop panics before it accepts.
    #[cfg(test)]
    panic_accepts: AtomicUsize,
}

#[cfg(test)]
thread_local! {
    /// Tests: called right after the socket is bound.
    static AFTER_BIND: Cell<Option<fn(&Path)>> = const { Cell::new(None) };
    /// Tests: the next server's accept loop panics this many times first.
    static PANIC_ACCEPTS: Cell<usize> = const { Cell::new(0) };
}

impl ApiServer {
    /// Binds the control socket at `path` with the default options.
    pub fn bind(
        path: &Path,
        handler: Arc<dyn ControlHandler>,
    ) -> Result<ApiServer, ApiServerError> {
        ApiServer::bind_with(path, handler, ApiServerOptions::default())
    }

    /// Binds the control socket at `path` (replacing a stale socket file nobody
    /// listens on; never a live one or anything else), private from the moment it exists
    /// and with `options.mode`, and starts accepting clients.
    pub fn bind_with(
        path: &Path,
        handler: Arc<dyn ControlHandler>,
        options: ApiServerOptions,
    ) -> Result<ApiServer, ApiServerError> {
        let io_err = |what| {
            move |source| ApiServerError::Io {
                path: path.to_path_buf(),
                what,
                source,
            }
        };
        remove_stale_socket(path)?;
        let listener = umask::bind_unix_listener(path, options.mode).map_err(|e| {
            if e.source.raw_os_error() == Some(libc::EADDRINUSE) {
                // Someone bound the path since we looked: theirs, not ours to remove.
                ApiServerError::InUse {
                    path: path.to_path_buf(),
                }
            } else {
                io_err(e.what)(e.source)
            }
        })?;
        #[cfg(test)]
        AFTER_BIND.with(|hook| hook.get().map(|f| f(path)));
        let setup = || -> Result<(u64, u64), ApiServerError> {
            listener
                .set_nonblocking(true)
                .map_err(io_err("set nonblocking"))?;
            let meta = fs::metadata(path).map_err(io_err("stat"))?;
            Ok((meta.dev(), meta.ino()))
        };
        let file_id = match setup() {
            Ok(id) => id,
            Err(e) => {
                let _ = fs::remove_file(path);
                return Err(e);
            }
        };
        let shared = Arc::new(Shared {
            handler,
            stopping: AtomicBool::new(false),
            clients: Mutex::new(HashMap::new()),
            busy: AtomicUsize::new(0),
            options,
            refused: AtomicU64::new(0),
            idle_closed: AtomicU64::new(0),
            #[cfg(test)]
            panic_accepts: AtomicUsize::new(PANIC_ACCEPTS.with(Cell::get)),
        });
        let thread_shared = Arc::clone(&shared);
        let mut next_id = 0;
        let accept_thread = health::spawn_service_with(
            "api-accept",
            Restart::UpTo(ACCEPT_RESTARTS),
            || crate::sandbox::enter_or_exit(crate::sandbox::ThreadKind::Control),
            move || {
                accept_loop(&listener, &thread_shared, &mut next_id);
                Ok(())
            },
        );
        let accept_thread = match accept_thread {
            Ok(handle) => handle,
            Err(source) => {
                let _ = fs::remove_file(path);
                return Err(ApiServerError::Thread {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        log::info!(
            "control socket listening on {} (at most {} clients, idle timeout {:?})",
            path.display(),
            options.max_clients,
            options.idle_timeout
        );
        Ok(ApiServer {
            path: path.to_path_buf(),
            file_id,
            shared,
            accept_thread: Mutex::new(Some(accept_thread)),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The socket's counters.
    pub fn stats(&self) -> ApiServerStats {
        ApiServerStats {
            clients: lock(&self.shared.clients).len(),
            max_clients: self.shared.options.max_clients,
            refused_clients: self.shared.refused.load(Ordering::Relaxed),
            idle_closed: self.shared.idle_closed.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting, removes the socket file and ends the clients' connections.
    /// Requests still in a handler are answered (waiting up to a second for them);
    /// requests arriving meanwhile get `shutting_down`. Idempotent.
    pub fn shutdown(&self) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        let handle = lock(&self.accept_thread).take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                log::error!("control socket accept thread panicked");
            }
        }
        match fs::symlink_metadata(&self.path) {
            Ok(meta) if (meta.dev(), meta.ino()) == self.file_id => {
                if let Err(e) = fs::remove_file(&self.path) {
                    log::warn!("removing {}: {e}", self.path.display());
                }
            }
            _ => {} // gone already, or replaced by someone else's socket
        }
        for stream in lock(&self.shared.clients).values() {
            let _ = stream.shutdown(Shutdown::Read);
        }
        let own = usize::from(IN_HANDLER.with(Cell::get));
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.shared.busy.load(Ordering::SeqCst) > own && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        log::info!("control socket {} closed", self.path.display());
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Removes a socket file left behind by a monitor that is gone; refuses to touch a
/// live socket or anything that is not a socket.
fn remove_stale_socket(path: &Path) -> Result<(), ApiServerError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ApiServerError::Io {
                path: path.to_path_buf(),
                what: "stat",
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ApiServerError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    if UnixStream::connect(path).is_ok() {
        return Err(ApiServerError::InUse {
            path: path.to_path_buf(),
        });
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ApiServerError::Io {
            path: path.to_path_buf(),
            what: "remove stale socket",
            source,
        }),
    }
}

/// Waits up to `timeout_ms` for the listener to have a pending connection.
fn wait_readable(listener: &UnixListener, timeout_ms: i32) -> bool {
    let mut fds = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `fds` is one valid pollfd and the count passed is 1.
    let n = unsafe { libc::poll(&mut fds, 1, timeout_ms) };
    n > 0
}

fn accept_loop(listener: &UnixListener, shared: &Arc<Shared>, next_id: &mut u64) {
    while !shared.stopping.load(Ordering::SeqCst) {
        #[cfg(test)]
        if shared.panic_accepts.load(Ordering::SeqCst) > 0 {
            shared.panic_accepts.fetch_sub(1, Ordering::SeqCst);
            panic!("injected accept loop panic");
        }
        if !wait_readable(listener, POLL_INTERVAL_MS) {
            continue;
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // E.g. out of file descriptors: wait instead of spinning.
                log::warn!("control socket accept: {e}");
                thread::sleep(Duration::from_millis(POLL_INTERVAL_MS as u64));
                continue;
            }
        };
        if lock(&shared.clients).len() >= shared.options.max_clients {
            refuse(stream, shared);
            continue;
        }
        *next_id += 1;
        if let Err(e) = start_client(stream, *next_id, shared) {
            log::warn!("control socket: cannot serve client {next_id}: {e}");
        }
    }
}

/// Answers a client over the cap with one `too_many_clients` line (if its socket takes
/// it at once) and closes it.
fn refuse(stream: UnixStream, shared: &Shared) {
    let n = shared.refused.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        log::warn!(
            "control socket: {n} client(s) refused so far: {} are connected, the cap",
            shared.options.max_clients
        );
    }
    let response = Response::error(
        None,
        ApiError::new(
            ErrorCode::TooManyClients,
            format!(
                "the control socket serves at most {} clients at once; try again later",
                shared.options.max_clients
            ),
        ),
    );
    let mut line = response.to_line();
    line.push('\n');
    if stream.set_nonblocking(true).is_ok() {
        let _ = (&stream).write_all(line.as_bytes());
    }
}

/// Removes a client from the table when its thread ends, however it ends.
struct ClientSlot<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        lock(&self.shared.clients).remove(&self.id);
    }
}

fn start_client(stream: UnixStream, id: u64, shared: &Arc<Shared>) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let stream = Arc::new(stream);
    lock(&shared.clients).insert(id, Arc::clone(&stream));
    let thread_shared = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name(format!("api-client-{id}"))
        .spawn(move || {
            crate::sandbox::enter_or_exit(crate::sandbox::ThreadKind::Control);
            let shared = &*thread_shared;
            let _slot = ClientSlot { shared, id };
            match serve_client(&stream, shared, shared.options.idle_timeout) {
                Ok(Ended::Closed) => {}
                Ok(Ended::Idle) => {
                    shared.idle_closed.fetch_add(1, Ordering::Relaxed);
                    log::debug!("control client {id}: closed after the idle timeout");
                }
                Err(e) => log::debug!("control client {id}: {e}"),
            }
        });
    if let Err(e) = spawned {
        lock(&shared.clients).remove(&id);
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::fake::FakeHandler;
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::PermissionsExt;
    use vmm_sys_util::tempdir::TempDir;

    #[test]
    fn the_socket_is_private_from_the_moment_it_is_bound() {
        fn check(path: &Path) {
            let mode = fs::symlink_metadata(path)
                .expect("stat")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "mode {:o} right after bind", mode & 0o777);
        }
        AFTER_BIND.with(|h| h.set(Some(check)));
        let (_dir, path, _server) = start_server();
        AFTER_BIND.with(|h| h.set(None));
        let mode = fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn clients_beyond_the_cap_are_refused() {
        let (_dir, path, _server) = start_server();
        let mut held = Vec::new();
        let (mut ok, mut refused) = (0, 0);
        for _ in 0..100 {
            let client = UnixStream::connect(&path).expect("connect");
            client
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let _ = (&client).write_all(b"{\"cmd\":\"status\"}\n");
            let mut line = String::new();
            let _ = BufReader::new(&client).read_line(&mut line);
            if line.starts_with("{\"ok\":true") {
                ok += 1;
            } else if line.contains("\"too_many_clients\"") {
                refused += 1;
            }
            held.push(client);
        }
        assert_eq!((ok, refused), (MAX_CLIENTS, 100 - MAX_CLIENTS));
    }

    #[test]
    fn a_panicking_accept_loop_is_restarted() {
        PANIC_ACCEPTS.with(|p| p.set(1));
        let (_dir, path, _server) = start_server();
        PANIC_ACCEPTS.with(|p| p.set(0));
        let client = UnixStream::connect(&path).expect("connect");
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        (&client)
            .write_all(b"{\"cmd\":\"status\"}\n")
            .expect("write");
        let mut line = String::new();
        let read = BufReader::new(&client).read_line(&mut line);
        assert!(
            matches!(read, Ok(n) if n > 0),
            "no answer after the accept loop panicked: {read:?}"
        );
        assert!(line.starts_with("{\"ok\":true"), "{line}");
        let restarted = health::HealthRegistry::global()
            .snapshot()
            .into_iter()
            .any(|s| {
                s.name == "api-accept"
                    && s.restarts >= 1
                    && s.message.as_deref() == Some("injected accept loop panic")
            });
        assert!(restarted, "the restart shows in the service health");
    }

    fn start_server() -> (TempDir, PathBuf, ApiServer) {
        let dir = TempDir::new().expect("temp dir");
        let path = dir.as_path().join("api.sock");
        let server = ApiServer::bind(&path, Arc::new(FakeHandler::new())).expect("bind");
        (dir, path, server)
    }

    #[test]
    fn socket_is_private_and_stale_files_are_handled() {
        let dir = TempDir::new().expect("temp dir");
        let path = dir.as_path().join("api.sock");
        drop(UnixListener::bind(&path).expect("stale socket")); // leaves the file
        let server = ApiServer::bind(&path, Arc::new(FakeHandler::new())).expect("bind");
        let mode = fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = ApiServer::bind(&path, Arc::new(FakeHandler::new()));
        assert!(matches!(second, Err(ApiServerError::InUse { .. })));
        assert!(
            path.exists(),
            "a refused bind must not remove the live socket"
        );
        assert!(
            UnixStream::connect(&path).is_ok(),
            "the live socket still accepts"
        );
        drop(server);
        let plain = dir.as_path().join("notes");
        fs::write(&plain, "keep me").expect("write");
        let err = ApiServer::bind(&plain, Arc::new(FakeHandler::new())).err();
        assert!(
            matches!(err, Some(ApiServerError::NotASocket { .. })),
            "{err:?}"
        );
        assert_eq!(fs::read_to_string(&plain).expect("read"), "keep me");
    }

    #[test]
    fn shutdown_removes_the_socket_and_ends_clients() {
        let (_dir, path, server) = start_server();
        let client = UnixStream::connect(&path).expect("connect");
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut reader = BufReader::new(client.try_clone().expect("clone"));
        (&client)
            .write_all(b"{\"cmd\":\"shutdown\"}\n")
            .expect("write");
        let mut line = String::new();
        reader.read_line(&mut line).expect("response");
        assert_eq!(line, "{\"ok\":true,\"result\":{\"shutting_down\":true}}\n");
        server.shutdown();
        assert!(!path.exists(), "socket file still there");
        assert!(UnixStream::connect(&path).is_err());
        line.clear();
        assert_eq!(reader.read_line(&mut line).expect("EOF"), 0, "{line}");
        server.shutdown(); // idempotent

        // A server dropped without shutdown() cleans up too.
        let (_dir2, path2, server2) = start_server();
        drop(server2);
        assert!(!path2.exists());
    }
}
