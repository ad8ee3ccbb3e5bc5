//! The control socket server: a Unix socket speaking newline-delimited JSON, one thread
//! per client, every request handed to a [`ControlHandler`].
//!
//! Lines are read with a bound ([`MAX_LINE`]); a longer line is discarded up to its
//! newline and answered with `line_too_long`. Every line, well-formed or not, gets
//! exactly one response line and the connection stays usable.

use crate::lock;
use std::cell::Cell;
use std::collections::HashMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::protocol::{parse_request, ApiError, Command, ErrorCode, Response, MAX_LINE};

/// How often the accept thread checks whether it should stop.
const POLL_INTERVAL_MS: i32 = 50;
/// How long a response write may block on a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`ApiServer::shutdown`] waits for responses being written to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

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

struct Shared {
    handler: Arc<dyn ControlHandler>,
    stopping: AtomicBool,
    /// Clones of the connected clients' streams, to end their reads on shutdown.
    clients: Mutex<HashMap<u64, UnixStream>>,
    /// Requests being handled or answered right now.
    busy: AtomicUsize,
}

thread_local! {
    /// Set while this thread runs a handler, so `shutdown` called from inside a
    /// handler does not wait for itself.
    static IN_HANDLER: Cell<bool> = const { Cell::new(false) };
}

impl ApiServer {
    /// Binds the control socket at `path` (replacing a stale socket file nobody
    /// listens on), makes it mode 0600, and starts accepting clients.
    pub fn bind(
        path: &Path,
        handler: Arc<dyn ControlHandler>,
    ) -> Result<ApiServer, ApiServerError> {
        let io_err = |what| {
            move |source| ApiServerError::Io {
                path: path.to_path_buf(),
                what,
                source,
            }
        };
        remove_stale_socket(path)?;
        let listener = UnixListener::bind(path).map_err(io_err("bind"))?;
        let setup = || -> Result<(u64, u64), ApiServerError> {
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))
                .map_err(io_err("chmod 0600"))?;
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
        });
        let thread_shared = Arc::clone(&shared);
        let accept_thread = thread::Builder::new()
            .name("api-accept".into())
            .spawn(move || accept_loop(listener, thread_shared));
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
        log::info!("control socket listening on {}", path.display());
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

fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    let mut next_id: u64 = 0;
    while !shared.stopping.load(Ordering::SeqCst) {
        if !wait_readable(&listener, POLL_INTERVAL_MS) {
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
        next_id += 1;
        if let Err(e) = start_client(stream, next_id, &shared) {
            log::warn!("control socket: cannot serve client {next_id}: {e}");
        }
    }
}

fn start_client(stream: UnixStream, id: u64, shared: &Arc<Shared>) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    lock(&shared.clients).insert(id, stream.try_clone()?);
    let thread_shared = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name(format!("api-client-{id}"))
        .spawn(move || {
            if let Err(e) = serve_client(stream, &thread_shared) {
                log::debug!("control client {id}: {e}");
            }
            lock(&thread_shared.clients).remove(&id);
        });
    if let Err(e) = spawned {
        lock(&shared.clients).remove(&id);
        return Err(e);
    }
    Ok(())
}

/// What one call to [`read_line`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineRead {
    /// A line (its newline removed, or the last bytes before end of stream).
    Line,
    /// A line longer than [`MAX_LINE`], now discarded up to its newline.
    TooLong,
    /// End of stream, no bytes pending.
    Eof,
}

/// Reads one line into `line` (cleared first), keeping at most [`MAX_LINE`] bytes.
fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>) -> io::Result<LineRead> {
    line.clear();
    let mut too_long = false;
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(match (too_long, line.is_empty()) {
                (true, _) => LineRead::TooLong,
                (false, true) => LineRead::Eof,
                (false, false) => LineRead::Line,
            });
        }
        let newline = buf.iter().position(|&b| b == b'\n');
        let chunk = &buf[..newline.unwrap_or(buf.len())];
        if !too_long {
            if line.len() + chunk.len() > MAX_LINE {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        let used = chunk.len() + usize::from(newline.is_some());
        reader.consume(used);
        if newline.is_some() {
            return Ok(if too_long {
                LineRead::TooLong
            } else {
                LineRead::Line
            });
        }
    }
}

fn serve_client(stream: UnixStream, shared: &Shared) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(16 * 1024, stream);
    let mut line = Vec::with_capacity(1024);
    loop {
        let response = match read_line(&mut reader, &mut line)? {
            LineRead::Eof => return Ok(()),
            LineRead::TooLong => Response::error(
                None,
                ApiError::new(
                    ErrorCode::LineTooLong,
                    format!("request line longer than {MAX_LINE} bytes; discarded"),
                ),
            ),
            LineRead::Line => {
                shared.busy.fetch_add(1, Ordering::SeqCst);
                let response = answer(&line, shared);
                let written = write_response(&mut writer, &response);
                shared.busy.fetch_sub(1, Ordering::SeqCst);
                written?;
                continue;
            }
        };
        write_response(&mut writer, &response)?;
    }
}

fn write_response(writer: &mut UnixStream, response: &Response) -> io::Result<()> {
    let mut text = response.to_line();
    text.push('\n');
    writer.write_all(text.as_bytes())
}

/// The response to one request line.
fn answer(line: &[u8], shared: &Shared) -> Response {
    let (id, parsed) = parse_request(line);
    let outcome = parsed.and_then(|cmd| {
        if shared.stopping.load(Ordering::SeqCst) {
            return Err(ApiError::new(
                ErrorCode::ShuttingDown,
                "the control socket is shutting down",
            ));
        }
        let name = cmd.name();
        IN_HANDLER.with(|f| f.set(true));
        let result = catch_unwind(AssertUnwindSafe(|| shared.handler.handle(cmd)));
        IN_HANDLER.with(|f| f.set(false));
        result.unwrap_or_else(|_| {
            log::error!("control command {name}: handler panicked");
            Err(ApiError::internal(format!(
                "command {name} failed: the monitor panicked"
            )))
        })
    });
    Response::from_result(id, outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::fake::FakeHandler;
    use std::io::Cursor;
    use vmm_sys_util::tempdir::TempDir;

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

    #[test]
    fn read_line_bounds_lines() {
        let mut input = b"ab\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE + 1));
        input.extend_from_slice(b"\ncd\n");
        input.extend(std::iter::repeat_n(b'y', MAX_LINE + 5));
        let mut reader = BufReader::with_capacity(1000, Cursor::new(input));
        let mut line = Vec::new();
        let mut got = Vec::new();
        loop {
            let r = read_line(&mut reader, &mut line).expect("read");
            got.push((r, String::from_utf8_lossy(&line).into_owned()));
            if got.last().is_some_and(|(r, _)| *r == LineRead::Eof) {
                break;
            }
        }
        let expect = [
            (LineRead::Line, "ab"),
            (LineRead::TooLong, ""),
            (LineRead::Line, "cd"),
            (LineRead::TooLong, ""),
            (LineRead::Eof, ""),
        ];
        let got: Vec<(LineRead, &str)> = got.iter().map(|(r, l)| (*r, l.as_str())).collect();
        assert_eq!(got, expect);
    }
}
