//! The control socket's client: `duplex ctl [--api-sock PATH] <command> [args]`, and
//! [`ApiClient`], a connection that sends request lines and reads response lines.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::protocol::{Command, DEFAULT_CONSOLE_LINES};
use crate::rundir::{self, RunDirError};
/// Largest response line the client accepts (console output can be long).
pub const MAX_RESPONSE: u64 = 64 << 20;
/// How long `duplex ctl` waits for the monitor's answer.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(60);

/// `duplex ctl`: send one command to a running monitor and print its result.
#[derive(Debug, Clone, clap::Args)]
pub struct CtlArgs {
    /// The monitor's control socket (default: `duplex.sock` in the runtime directory,
    /// `$XDG_RUNTIME_DIR/duplex`, or `/run/duplex` for root).
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// The command to send.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// A `duplex ctl` command.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum CtlCommand {
    /// Show the state of all partitions, or of one.
    Status {
        /// Only this partition.
        partition: Option<String>,
    },
    /// Pause one partition, or all.
    Pause {
        /// Only this partition.
        partition: Option<String>,
    },
    /// Resume one paused partition, or all paused partitions.
    Resume {
        /// Only this partition.
        partition: Option<String>,
    },
    /// Stop a partition.
    Stop {
        /// The partition.
        partition: String,
    },
    /// Cold-boot a stopped or crashed partition.
    Start {
        /// The partition.
        partition: String,
    },
    /// Wake a partition from its power-saving sleep.
    Wake {
        /// The partition.
        partition: String,
    },
    /// Shut the monitor down.
    Shutdown,
    /// Show the last lines of a partition's console.
    Console {
        /// The partition.
        partition: String,
        /// How many lines (0 to 10000).
        #[arg(long, default_value_t = DEFAULT_CONSOLE_LINES)]
        lines: usize,
    },
    /// Take a coordinated snapshot of every partition into a set directory.
    Snapshot {
        /// The set's directory (written atomically; an existing set there is replaced).
        dest: String,
        /// Write only the pages changed since this set (the last one this device took or
        /// was restored from).
        #[arg(long)]
        parent: Option<String>,
    },
    /// Tear every partition down and start all of them from a snapshot set.
    Reboot {
        /// The set (default: the config's `snapshot.dir`).
        #[arg(long)]
        from: Option<String>,
    },
    /// Send one raw request line, as written (for testing the protocol).
    Raw {
        /// The request line, e.g. '{"cmd":"status","id":1}'.
        json: String,
    },
}

impl CtlCommand {
    /// The protocol command, or `None` for `raw`.
    pub fn command(&self) -> Option<Command> {
        let partition = |p: &Option<String>| p.clone();
        Some(match self {
            CtlCommand::Status { partition: p } => Command::Status {
                partition: partition(p),
            },
            CtlCommand::Pause { partition: p } => Command::Pause {
                partition: partition(p),
            },
            CtlCommand::Resume { partition: p } => Command::Resume {
                partition: partition(p),
            },
            CtlCommand::Stop { partition } => Command::Stop {
                partition: partition.clone(),
            },
            CtlCommand::Start { partition } => Command::Start {
                partition: partition.clone(),
            },
            CtlCommand::Wake { partition } => Command::Wake {
                partition: partition.clone(),
            },
            CtlCommand::Shutdown => Command::Shutdown,
            CtlCommand::Console { partition, lines } => Command::Console {
                partition: partition.clone(),
                lines: *lines,
            },
            // The monitor runs elsewhere: relative paths are the caller's, made absolute here.
            CtlCommand::Snapshot { dest, parent } => Command::Snapshot {
                dest: absolute(dest),
                parent: parent.as_deref().map(absolute),
            },
            CtlCommand::Reboot { from } => Command::Reboot {
                from: from.as_deref().map(absolute),
            },
            CtlCommand::Raw { .. } => return None,
        })
    }

    /// The request line to send (without its newline).
    pub fn request_line(&self) -> Result<String, CtlError> {
        match (self, self.command()) {
            (_, Some(cmd)) => Ok(cmd.to_request().to_string()),
            (CtlCommand::Raw { json }, None) if !json.contains('\n') => Ok(json.clone()),
            _ => Err(CtlError::RawNewline),
        }
    }
}

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Nothing accepts connections on the socket path.
    #[error("cannot connect to the control socket {path}: {source} (is `duplex run` running?)")]
    Connect { path: PathBuf, source: io::Error },
    /// Sending the request or reading the response failed (including a timeout).
    #[error("control socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// The monitor closed the connection without a (complete) response.
    #[error("control socket {path}: the monitor closed the connection without answering")]
    Closed { path: PathBuf },
    /// The response is not a protocol response.
    #[error("control socket {path}: malformed response: {message}")]
    BadResponse { path: PathBuf, message: String },
    /// The monitor answered with an error.
    #[error("{code}: {message}")]
    Api { code: String, message: String },
    /// A raw request must be a single line.
    #[error("a raw request must be a single line (it contains a newline)")]
    RawNewline,
    /// No `--api-sock` and no usable runtime directory to find the default socket in.
    #[error(transparent)]
    RunDir(#[from] RunDirError),
}

/// One connection to the control socket.
pub struct ApiClient {
    path: PathBuf,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl ApiClient {
    /// Connects to the control socket at `path`.
    pub fn connect(path: &Path) -> Result<ApiClient, CtlError> {
        let stream = UnixStream::connect(path).map_err(|source| CtlError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let reader = stream.try_clone().map_err(|source| CtlError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(ApiClient {
            path: path.to_path_buf(),
            writer: stream,
            reader: BufReader::new(reader),
        })
    }

    /// Limits how long a request may wait to be sent and answered (`None`: forever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), CtlError> {
        self.writer
            .set_read_timeout(timeout)
            .and_then(|()| self.writer.set_write_timeout(timeout))
            .map_err(|source| self.io(source))
    }

    /// Sends `request` as one line and returns the whole response object.
    pub fn request(&mut self, request: &Value) -> Result<Value, CtlError> {
        self.request_line(&request.to_string())
    }

    /// Sends `line` as written (a newline is appended) and returns the whole
    /// response object.
    pub fn request_line(&mut self, line: &str) -> Result<Value, CtlError> {
        if line.contains('\n') {
            return Err(CtlError::RawNewline);
        }
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        self.writer
            .write_all(&bytes)
            .map_err(|source| self.io(source))?;
        self.read_response()
    }

    /// Runs `cmd` and returns its result, or the monitor's error as [`CtlError::Api`].
    pub fn call(&mut self, cmd: &Command) -> Result<Value, CtlError> {
        let response = self.request(&cmd.to_request())?;
        self.result_of(response)
    }

    /// Reads one response line.
    pub fn read_response(&mut self) -> Result<Value, CtlError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_RESPONSE)
            .read_until(b'\n', &mut line)
            .map_err(|source| self.io(source))?;
        if n == 0 || line.last() != Some(&b'\n') {
            return Err(CtlError::Closed {
                path: self.path.clone(),
            });
        }
        let value: Value = serde_json::from_slice(&line).map_err(|e| self.bad(e.to_string()))?;
        if !value.get("ok").is_some_and(Value::is_boolean) {
            return Err(self.bad(format!("no \"ok\" field in {value}")));
        }
        Ok(value)
    }

    /// The `result` of a response, or its `error` as [`CtlError::Api`].
    pub fn result_of(&self, mut response: Value) -> Result<Value, CtlError> {
        if response["ok"] == Value::Bool(true) {
            return Ok(response
                .get_mut("result")
                .map(Value::take)
                .unwrap_or(Value::Null));
        }
        let error = &response["error"];
        match (error["code"].as_str(), error["message"].as_str()) {
            (Some(code), Some(message)) => Err(CtlError::Api {
                code: code.to_string(),
                message: message.to_string(),
            }),
            _ => Err(self.bad(format!(
                "error response without code and message: {response}"
            ))),
        }
    }

    fn io(&self, source: io::Error) -> CtlError {
        CtlError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn bad(&self, message: String) -> CtlError {
        CtlError::BadResponse {
            path: self.path.clone(),
            message,
        }
    }
}

/// `path` made absolute against the current directory (unchanged if that fails).
fn absolute(path: &str) -> String {
    std::path::absolute(path)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| path.to_owned())
}

/// `duplex ctl`: connects, sends the command as one line, reads one line, and returns
/// the result (an `ok:false` answer becomes [`CtlError::Api`] with its code).
pub fn run_ctl(args: &CtlArgs) -> Result<Value, CtlError> {
    let line = args.command.request_line()?;
    let sock = match &args.api_sock {
        Some(path) => path.clone(),
        None => rundir::client_api_sock()?,
    };
    let mut client = ApiClient::connect(&sock)?;
    client.set_timeout(Some(CTL_TIMEOUT))?;
    let response = client.request_line(&line)?;
    client.result_of(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{fake::FakeHandler, ApiServer};
    use clap::Parser;
    use serde_json::json;
    use std::sync::Arc;
    use vmm_sys_util::tempdir::TempDir;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        ctl: CtlArgs,
    }

    fn parse(args: &[&str]) -> Result<CtlArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("ctl").chain(args.iter().copied())).map(|c| c.ctl)
    }

    #[test]
    fn relative_set_paths_are_made_absolute_for_the_monitor() {
        let args = parse(&["snapshot", "sets/a", "--parent", "/abs/p"]).expect("parse");
        let Some(Command::Snapshot { dest, parent }) = args.command.command() else {
            panic!("not a snapshot")
        };
        let cwd = std::env::current_dir().expect("cwd");
        assert_eq!(dest, cwd.join("sets/a").display().to_string());
        assert_eq!(parent.as_deref(), Some("/abs/p"));
    }

    #[test]
    fn command_line_parses_to_requests() {
        let args = parse(&["status"]).expect("status");
        assert_eq!(args.api_sock, None, "the default is found at run time");
        assert_eq!(
            args.command.request_line().expect("line"),
            r#"{"cmd":"status"}"#
        );
        let args = parse(&[
            "--api-sock",
            "/run/x.sock",
            "console",
            "engine",
            "--lines",
            "7",
        ])
        .expect("console");
        assert_eq!(args.api_sock, Some(PathBuf::from("/run/x.sock")));
        let request: Value =
            serde_json::from_str(&args.command.request_line().expect("line")).expect("json");
        assert_eq!(
            request,
            json!({"cmd": "console", "partition": "engine", "lines": 7})
        );
        let default_lines = parse(&["console", "engine"]).expect("console");
        assert!(matches!(
            default_lines.command,
            CtlCommand::Console { lines: 50, .. }
        ));
        let pause = parse(&["pause", "controller"]).expect("pause").command;
        assert_eq!(
            pause.command(),
            Some(Command::Pause {
                partition: Some("controller".into())
            })
        );
        assert!(parse(&["stop"]).is_err(), "stop needs a partition");
        assert!(parse(&["start"]).is_err(), "start needs a partition");
        assert!(parse(&["console", "e", "--lines", "-1"]).is_err());
        assert!(parse(&["frobnicate"]).is_err());
        let raw = parse(&["raw", "{\"cmd\":\"x\"}\n{}"]).expect("raw").command;
        assert!(matches!(raw.request_line(), Err(CtlError::RawNewline)));
    }

    #[test]
    fn run_ctl_returns_results_and_maps_errors() {
        let dir = TempDir::new().expect("temp dir");
        let sock = dir.as_path().join("api.sock");
        let _server = ApiServer::bind(&sock, Arc::new(FakeHandler::new())).expect("bind");
        let ctl = |args: &[&str]| {
            let mut full = vec!["--api-sock", sock.to_str().expect("utf-8 path")];
            full.extend_from_slice(args);
            run_ctl(&parse(&full).expect("args"))
        };
        let status = ctl(&["status", "engine"]).expect("status");
        assert_eq!(
            status["partitions"][0],
            json!({"name": "engine", "state": "running"})
        );
        assert_eq!(
            ctl(&["stop", "engine"]).expect("stop"),
            json!({"partitions": ["engine"]})
        );
        match ctl(&["resume", "engine"]) {
            Err(CtlError::Api { code, message }) => {
                assert_eq!(code, "invalid_state");
                assert!(message.contains("stopped"), "{message}");
            }
            other => panic!("expected invalid_state, got {other:?}"),
        }
        match ctl(&["start", "printer"]) {
            Err(CtlError::Api { code, .. }) => assert_eq!(code, "unknown_partition"),
            other => panic!("expected unknown_partition, got {other:?}"),
        }
        match ctl(&["raw", "{nope"]) {
            Err(e @ CtlError::Api { .. }) => assert!(e.to_string().starts_with("parse_error: ")),
            other => panic!("expected parse_error, got {other:?}"),
        }
        let raw = ctl(&["raw", r#"{"cmd":"console","partition":"engine","lines":1}"#]);
        assert_eq!(raw.expect("raw")["lines"], json!(["line 0"]));
        let missing = dir.as_path().join("none.sock");
        let err = run_ctl(
            &parse(&["--api-sock", missing.to_str().expect("path"), "shutdown"]).expect("args"),
        );
        match err {
            Err(e @ CtlError::Connect { .. }) => assert!(e.to_string().contains("none.sock")),
            other => panic!("expected a connect error, got {other:?}"),
        }
    }

    #[test]
    fn api_client_keeps_one_connection_for_many_requests() {
        let dir = TempDir::new().expect("temp dir");
        let sock = dir.as_path().join("api.sock");
        let server = ApiServer::bind(&sock, Arc::new(FakeHandler::new())).expect("bind");
        let mut client = ApiClient::connect(&sock).expect("connect");
        client
            .set_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        for i in 0..3 {
            let response = client
                .request(&json!({"cmd": "status", "id": i}))
                .expect("status");
            assert_eq!(
                (&response["ok"], &response["id"]),
                (&json!(true), &json!(i))
            );
        }
        let paused = client
            .call(&Command::Pause { partition: None })
            .expect("pause");
        assert_eq!(paused, json!({"partitions": ["controller", "engine"]}));
        let whole = client.request_line("[]").expect("response");
        assert_eq!(whole["error"]["code"], json!("invalid_request"));
        server.shutdown();
        assert!(matches!(
            client.request_line("{}"),
            Err(CtlError::Closed { .. } | CtlError::Io { .. })
        ));
    }
}
