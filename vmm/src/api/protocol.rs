//! The control protocol's messages: parsing request lines into [`Command`]s, and
//! building response lines (specified in `docs/control-api.md`).
//!
//! A request is one JSON object per line, `{"cmd": "<name>", "id": <any>, ...args}`;
//! a response is `{"ok":true,"id":...,"result":<value>}` or
//! `{"ok":false,"id":...,"error":{"code":"<code>","message":"<text>"}}`, with `id`
//! present exactly when the request carried one.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Longest request line in bytes, not counting its newline (64 KiB).
pub const MAX_LINE: usize = 64 * 1024;
/// Default number of console lines returned by `console`.
pub const DEFAULT_CONSOLE_LINES: usize = 50;
/// Most console lines one `console` request may ask for.
pub const MAX_CONSOLE_LINES: usize = 10_000;

/// A control command, parsed and checked (arguments present and of the right type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Report the state of one partition, or of all.
    Status { partition: Option<String> },
    /// Pause one partition's vCPUs, or all partitions'.
    Pause { partition: Option<String> },
    /// Resume one paused partition, or all paused partitions.
    Resume { partition: Option<String> },
    /// Stop a partition (its VM is torn down; it can be started again).
    Stop { partition: String },
    /// Cold-boot a stopped or crashed partition.
    Start { partition: String },
    /// Shut the whole monitor down.
    Shutdown,
    /// The last `lines` lines of a partition's console.
    Console { partition: String, lines: usize },
    /// Take a coordinated snapshot of every partition into the set directory `dest`;
    /// incremental on top of `parent` when given.
    Snapshot {
        dest: String,
        parent: Option<String>,
    },
    /// Tear every partition down and start all of them from the set `from` (default: the
    /// config's `snapshot.dir`), in this process.
    Reboot { from: Option<String> },
    /// Wake a partition from its power-saving sleep (guest ABI `SLEEP`).
    Wake { partition: String },
}

impl Command {
    /// Every command's name on the wire, in the order of the variants (the commands table
    /// of `docs/control-api.md` lists exactly these; `tests/control_api_doc.rs` checks it).
    pub const NAMES: &'static [&'static str] = &[
        "status", "pause", "resume", "stop", "start", "shutdown", "console", "snapshot", "reboot",
        "wake",
    ];

    /// The command's name on the wire (`"status"`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Command::Status { .. } => "status",
            Command::Pause { .. } => "pause",
            Command::Resume { .. } => "resume",
            Command::Stop { .. } => "stop",
            Command::Start { .. } => "start",
            Command::Shutdown => "shutdown",
            Command::Console { .. } => "console",
            Command::Snapshot { .. } => "snapshot",
            Command::Reboot { .. } => "reboot",
            Command::Wake { .. } => "wake",
        }
    }

    /// The request object for this command (without `id`), as `duplex ctl` sends it.
    pub fn to_request(&self) -> Value {
        let mut obj = Map::new();
        obj.insert("cmd".into(), self.name().into());
        match self {
            Command::Status { partition }
            | Command::Pause { partition }
            | Command::Resume { partition } => {
                if let Some(p) = partition {
                    obj.insert("partition".into(), p.as_str().into());
                }
            }
            Command::Stop { partition }
            | Command::Start { partition }
            | Command::Wake { partition } => {
                obj.insert("partition".into(), partition.as_str().into());
            }
            Command::Shutdown => {}
            Command::Console { partition, lines } => {
                obj.insert("partition".into(), partition.as_str().into());
                obj.insert("lines".into(), (*lines).into());
            }
            Command::Snapshot { dest, parent } => {
                obj.insert("dest".into(), dest.as_str().into());
                if let Some(p) = parent {
                    obj.insert("parent".into(), p.as_str().into());
                }
            }
            Command::Reboot { from } => {
                if let Some(f) = from {
                    obj.insert("from".into(), f.as_str().into());
                }
            }
        }
        Value::Object(obj)
    }
}

/// The machine-readable kind of an error response (serialized in snake_case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The line is not JSON.
    ParseError,
    /// Valid JSON but not a valid request: not an object, `cmd` missing or not a
    /// string, an argument missing, unknown, of the wrong type or out of range.
    InvalidRequest,
    /// `cmd` names no command.
    UnknownCommand,
    /// No partition has the given name.
    UnknownPartition,
    /// The command does not apply in the partition's current state.
    InvalidState,
    /// The line was longer than [`MAX_LINE`] bytes; it was discarded.
    LineTooLong,
    /// The line is not valid UTF-8.
    NotUtf8,
    /// The monitor failed to carry out a valid command.
    InternalError,
    /// The monitor is shutting down and takes no more commands.
    ShuttingDown,
    /// The engine (asked through the controller) refused to reach a safe point; nothing
    /// was written and every partition keeps running.
    SnapshotDenied,
    /// Taking or writing the snapshot failed; partitions were resumed, no set was written.
    SnapshotFailed,
    /// The snapshot set cannot be restored (checksum, version, truncated, config mismatch,
    /// missing partition); nothing was torn down.
    InvalidSnapshot,
    /// Another device operation (snapshot, restore, reboot, pause, resume, start, stop) is
    /// running; `details` names it and its phase. Nothing was done.
    Busy,
    /// The set is valid, but building the new partitions or switching to them failed;
    /// `details.step` names the step. The old device runs on as it was.
    RestoreFailed,
    /// The control socket serves its cap of clients already; the connection is closed.
    TooManyClients,
}

impl ErrorCode {
    /// Every error code, in the order of the variants (the error codes table of
    /// `docs/control-api.md` lists exactly these; `tests/control_api_doc.rs` checks it).
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::ParseError,
        ErrorCode::InvalidRequest,
        ErrorCode::UnknownCommand,
        ErrorCode::UnknownPartition,
        ErrorCode::InvalidState,
        ErrorCode::LineTooLong,
        ErrorCode::NotUtf8,
        ErrorCode::InternalError,
        ErrorCode::ShuttingDown,
        ErrorCode::SnapshotDenied,
        ErrorCode::SnapshotFailed,
        ErrorCode::InvalidSnapshot,
        ErrorCode::Busy,
        ErrorCode::RestoreFailed,
        ErrorCode::TooManyClients,
    ];

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::ParseError => "parse_error",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnknownCommand => "unknown_command",
            ErrorCode::UnknownPartition => "unknown_partition",
            ErrorCode::InvalidState => "invalid_state",
            ErrorCode::LineTooLong => "line_too_long",
            ErrorCode::NotUtf8 => "not_utf8",
            ErrorCode::InternalError => "internal_error",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::SnapshotDenied => "snapshot_denied",
            ErrorCode::SnapshotFailed => "snapshot_failed",
            ErrorCode::InvalidSnapshot => "invalid_snapshot",
            ErrorCode::Busy => "busy",
            ErrorCode::RestoreFailed => "restore_failed",
            ErrorCode::TooManyClients => "too_many_clients",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed request: its code and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// What exactly went wrong, for people.
    pub message: String,
    /// Machine-readable particulars, for some codes (`busy`: the running operation and
    /// its phase; `restore_failed`: the step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

impl ApiError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            details: None,
        }
    }

    /// The error with machine-readable `details`.
    pub fn with_details(mut self, details: Value) -> ApiError {
        self.details = Some(details);
        self
    }

    /// `unknown_partition` for `name`.
    pub fn unknown_partition(name: &str) -> ApiError {
        ApiError::new(
            ErrorCode::UnknownPartition,
            format!("no partition named \"{name}\""),
        )
    }

    /// `invalid_state` with `message`.
    pub fn invalid_state(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::InvalidState, message)
    }

    /// `internal_error` with `message`.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::InternalError, message)
    }
}

/// One response line's content. Serializes with `ok` first, `id` only when present.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Response {
    /// Whether the command succeeded.
    pub ok: bool,
    /// The request's `id`, echoed back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    /// The command's result (success only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// What went wrong (failure only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

impl Response {
    /// A success response carrying `result`.
    pub fn ok(id: Option<Value>, result: Value) -> Response {
        Response {
            ok: true,
            id,
            result: Some(result),
            error: None,
        }
    }

    /// A failure response carrying `error`.
    pub fn error(id: Option<Value>, error: ApiError) -> Response {
        Response {
            ok: false,
            id,
            result: None,
            error: Some(error),
        }
    }

    /// The response for the outcome of a request.
    pub fn from_result(id: Option<Value>, outcome: Result<Value, ApiError>) -> Response {
        match outcome {
            Ok(result) => Response::ok(id, result),
            Err(error) => Response::error(id, error),
        }
    }

    /// The response as one JSON line, without the newline.
    pub fn to_line(&self) -> String {
        match serde_json::to_string(self) {
            Ok(line) => line,
            // Only reachable if a handler's result cannot be serialized (e.g. a map
            // with non-string keys, impossible for a `Value`); answer anyway.
            Err(e) => format!(
                r#"{{"ok":false,"error":{{"code":"internal_error","message":{}}}}}"#,
                Value::from(format!("cannot serialize response: {e}"))
            ),
        }
    }
}

/// Parses one request line (without its newline). Returns the request's `id` (when the
/// line is a JSON object with one) and the command or the error to answer with.
pub fn parse_request(line: &[u8]) -> (Option<Value>, Result<Command, ApiError>) {
    let text = match std::str::from_utf8(line) {
        Ok(text) => text,
        Err(e) => {
            let message = format!("request is not valid UTF-8: {e}");
            return (None, Err(ApiError::new(ErrorCode::NotUtf8, message)));
        }
    };
    let value: Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(e) => {
            let message = format!("request is not JSON: {e}");
            return (None, Err(ApiError::new(ErrorCode::ParseError, message)));
        }
    };
    let Value::Object(mut obj) = value else {
        let message = format!("request must be a JSON object, not {}", kind(&value));
        return (None, Err(invalid(message)));
    };
    let id = obj.remove("id");
    (id, parse_command(obj))
}

fn parse_command(mut obj: Map<String, Value>) -> Result<Command, ApiError> {
    let name = match obj.remove("cmd") {
        Some(Value::String(name)) => name,
        Some(other) => {
            return Err(invalid(format!(
                "\"cmd\" must be a string, not {}",
                kind(&other)
            )))
        }
        None => return Err(invalid("missing \"cmd\"")),
    };
    let allowed: &[&str] = match name.as_str() {
        "status" | "pause" | "resume" | "stop" | "start" | "wake" => &["partition"],
        "shutdown" => &[],
        "console" => &["partition", "lines"],
        "snapshot" => &["dest", "parent"],
        "reboot" => &["from"],
        _ => {
            return Err(ApiError::new(
                ErrorCode::UnknownCommand,
                format!(
                    "unknown command \"{name}\" (commands: {})",
                    Command::NAMES.join(", ")
                ),
            ))
        }
    };
    if let Some(extra) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(invalid(format!(
            "unknown argument \"{extra}\" for command \"{name}\""
        )));
    }
    let partition = optional_string(&obj, "partition")?;
    let required = |partition: Option<String>| {
        partition
            .ok_or_else(|| invalid(format!("command \"{name}\" needs a \"partition\" argument")))
    };
    Ok(match name.as_str() {
        "status" => Command::Status { partition },
        "pause" => Command::Pause { partition },
        "resume" => Command::Resume { partition },
        "stop" => Command::Stop {
            partition: required(partition)?,
        },
        "start" => Command::Start {
            partition: required(partition)?,
        },
        "wake" => Command::Wake {
            partition: required(partition)?,
        },
        "shutdown" => Command::Shutdown,
        "snapshot" => Command::Snapshot {
            dest: optional_string(&obj, "dest")?.ok_or_else(|| {
                invalid("command \"snapshot\" needs a \"dest\" argument (a directory)")
            })?,
            parent: optional_string(&obj, "parent")?,
        },
        "reboot" => Command::Reboot {
            from: optional_string(&obj, "from")?,
        },
        _ => Command::Console {
            partition: required(partition)?,
            lines: console_lines(&obj)?,
        },
    })
}

fn optional_string(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, ApiError> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(invalid(format!(
            "\"{key}\" must be a string, not {}",
            kind(other)
        ))),
    }
}

fn console_lines(obj: &Map<String, Value>) -> Result<usize, ApiError> {
    let Some(value) = obj.get("lines") else {
        return Ok(DEFAULT_CONSOLE_LINES);
    };
    match value.as_u64() {
        Some(n) if n <= MAX_CONSOLE_LINES as u64 => Ok(n as usize),
        _ => Err(invalid(format!(
            "\"lines\" must be an integer from 0 to {MAX_CONSOLE_LINES}, not {value}"
        ))),
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest, message)
}

/// A JSON value's kind, for error messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn valid_requests_parse_to_commands() {
        let cases: &[(&str, Command)] = &[
            (r#"{"cmd":"status"}"#, Command::Status { partition: None }),
            (
                r#"{"cmd":"pause","partition":"engine"}"#,
                Command::Pause {
                    partition: Some("engine".into()),
                },
            ),
            (r#" {"cmd":"resume"} "#, Command::Resume { partition: None }),
            (
                r#"{"partition":"c","cmd":"stop"}"#,
                Command::Stop {
                    partition: "c".into(),
                },
            ),
            (
                r#"{"cmd":"start","partition":"c"}"#,
                Command::Start {
                    partition: "c".into(),
                },
            ),
            ("{\"cmd\":\"shutdown\"}\r", Command::Shutdown),
            (
                r#"{"cmd":"console","partition":"e"}"#,
                Command::Console {
                    partition: "e".into(),
                    lines: DEFAULT_CONSOLE_LINES,
                },
            ),
            (
                r#"{"cmd":"console","partition":"e","lines":10000}"#,
                Command::Console {
                    partition: "e".into(),
                    lines: 10000,
                },
            ),
        ];
        for (line, expected) in cases {
            let (id, cmd) = parse_request(line.as_bytes());
            assert_eq!(id, None, "{line}");
            let cmd = cmd.unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(&cmd, expected, "{line}");
            // What `duplex ctl` would send for it parses back to the same command.
            let again = parse_request(cmd.to_request().to_string().as_bytes()).1;
            assert_eq!(again.as_ref(), Ok(expected), "{line}");
        }
    }

    #[test]
    fn ids_are_returned_even_for_bad_commands() {
        let (id, cmd) = parse_request(br#"{"cmd":"fly","id":{"n":[1,2]}}"#);
        assert_eq!(id, Some(json!({"n": [1, 2]})));
        assert_eq!(cmd.map_err(|e| e.code), Err(ErrorCode::UnknownCommand));
        let (id, cmd) = parse_request(br#"{"cmd":"status","id":null}"#);
        assert_eq!((id, cmd.is_ok()), (Some(Value::Null), true));
    }

    #[test]
    fn responses_serialize_as_specified() {
        let ok = Response::ok(Some(json!(7)), json!({"partitions": []})).to_line();
        assert_eq!(ok, r#"{"ok":true,"id":7,"result":{"partitions":[]}}"#);
        let err = Response::error(None, ApiError::unknown_partition("x")).to_line();
        assert_eq!(
            err,
            r#"{"ok":false,"error":{"code":"unknown_partition","message":"no partition named \"x\""}}"#
        );
        let all = [
            (ErrorCode::ParseError, "parse_error"),
            (ErrorCode::InvalidRequest, "invalid_request"),
            (ErrorCode::UnknownCommand, "unknown_command"),
            (ErrorCode::UnknownPartition, "unknown_partition"),
            (ErrorCode::InvalidState, "invalid_state"),
            (ErrorCode::LineTooLong, "line_too_long"),
            (ErrorCode::NotUtf8, "not_utf8"),
            (ErrorCode::InternalError, "internal_error"),
            (ErrorCode::ShuttingDown, "shutting_down"),
        ];
        for (code, text) in all {
            assert_eq!(code.as_str(), text);
            assert_eq!(json!(code), json!(text));
        }
    }

    /// Where each code is in [`ErrorCode::ALL`]. No wildcard arm: a new variant does not
    /// compile until it has its place here (and then in `ALL`).
    fn error_code_position(code: ErrorCode) -> usize {
        match code {
            ErrorCode::ParseError => 0,
            ErrorCode::InvalidRequest => 1,
            ErrorCode::UnknownCommand => 2,
            ErrorCode::UnknownPartition => 3,
            ErrorCode::InvalidState => 4,
            ErrorCode::LineTooLong => 5,
            ErrorCode::NotUtf8 => 6,
            ErrorCode::InternalError => 7,
            ErrorCode::ShuttingDown => 8,
            ErrorCode::SnapshotDenied => 9,
            ErrorCode::SnapshotFailed => 10,
            ErrorCode::InvalidSnapshot => 11,
            ErrorCode::Busy => 12,
            ErrorCode::RestoreFailed => 13,
            ErrorCode::TooManyClients => 14,
        }
    }

    /// The names inside backticks in `text` (serde's list of an enum's variants).
    fn backticked(text: &str) -> Vec<&str> {
        text.split('`').skip(1).step_by(2).collect()
    }

    #[test]
    fn error_code_all_lists_every_variant_once() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(
                error_code_position(*code),
                i,
                "{code} is out of place in ALL"
            );
            assert_eq!(json!(code), json!(code.as_str()), "{code}");
        }
        // Every variant, as serde knows them: an unknown name is refused with the list.
        let refused = serde_json::from_value::<ErrorCode>(json!("no_such_code"))
            .expect_err("not a code")
            .to_string();
        let (_, expected) = refused.split_once("expected").expect("variant list");
        let variants = backticked(expected);
        let listed: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(variants, listed, "ErrorCode::ALL against the variants");
    }

    /// Where each command is in [`Command::NAMES`]. No wildcard arm: a new variant does
    /// not compile until it has its place here (and then in `NAMES`).
    fn command_position(cmd: &Command) -> usize {
        match cmd {
            Command::Status { .. } => 0,
            Command::Pause { .. } => 1,
            Command::Resume { .. } => 2,
            Command::Stop { .. } => 3,
            Command::Start { .. } => 4,
            Command::Shutdown => 5,
            Command::Console { .. } => 6,
            Command::Snapshot { .. } => 7,
            Command::Reboot { .. } => 8,
            Command::Wake { .. } => 9,
        }
    }

    #[test]
    fn command_names_lists_every_command_once() {
        let p = || "p".to_string();
        let one_of_each = [
            Command::Status { partition: None },
            Command::Pause { partition: None },
            Command::Resume { partition: None },
            Command::Stop { partition: p() },
            Command::Start { partition: p() },
            Command::Shutdown,
            Command::Console {
                partition: p(),
                lines: 1,
            },
            Command::Snapshot {
                dest: p(),
                parent: None,
            },
            Command::Reboot { from: None },
            Command::Wake { partition: p() },
        ];
        assert_eq!(one_of_each.len(), Command::NAMES.len());
        for cmd in &one_of_each {
            let i = command_position(cmd);
            assert_eq!(Command::NAMES.get(i), Some(&cmd.name()), "{cmd:?}");
            // What `duplex ctl` sends for it parses back to it.
            let line = cmd.to_request().to_string();
            assert_eq!(parse_request(line.as_bytes()).1.as_ref(), Ok(cmd), "{line}");
        }
        // The parser knows every listed name, and no other.
        for name in Command::NAMES {
            let (_, parsed) = parse_request(json!({ "cmd": name }).to_string().as_bytes());
            let code = parsed.err().map(|e| e.code);
            assert_ne!(code, Some(ErrorCode::UnknownCommand), "{name}");
        }
        let (_, parsed) = parse_request(br#"{"cmd":"no-such-command"}"#);
        assert_eq!(parsed.map_err(|e| e.code), Err(ErrorCode::UnknownCommand));
    }
}
