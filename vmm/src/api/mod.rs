//! The control socket: newline-delimited JSON over a Unix socket (see
//! `docs/control-api.md`), its server, and the `duplex ctl` client.
//!
//! [`protocol`] defines requests, commands and responses; [`server`] serves them to a
//! [`ControlHandler`] (the monitor), at most [`MAX_CLIENTS`] clients at once, each served
//! by `conn` (bounded lines, an idle timeout); [`client`] is `duplex ctl` and a small
//! [`ApiClient`] for programs and tests. The default socket is in the private runtime
//! directory ([`crate::rundir`]).

pub mod client;
mod conn;
pub mod protocol;
pub mod server;

pub use client::{run_ctl, ApiClient, CtlArgs, CtlCommand, CtlError};
pub use protocol::{parse_request, ApiError, Command, ErrorCode, Response};
pub use server::{
    ApiServer, ApiServerError, ApiServerOptions, ApiServerStats, ControlHandler, IDLE_TIMEOUT,
    MAX_CLIENTS,
};

/// A stand-in monitor for the API tests: partitions "engine" and "controller".
#[cfg(test)]
pub(crate) mod fake {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use serde_json::{json, Value};

    use crate::api::{ApiError, Command, ControlHandler};

    /// Knows "engine" and "controller" (both running); `start` of "boom" panics.
    pub(crate) struct FakeHandler {
        states: Mutex<BTreeMap<String, &'static str>>,
    }

    impl FakeHandler {
        pub(crate) fn new() -> FakeHandler {
            let states =
                [("engine", "running"), ("controller", "running")].map(|(n, s)| (n.to_string(), s));
            FakeHandler {
                states: Mutex::new(BTreeMap::from(states)),
            }
        }
    }

    impl ControlHandler for FakeHandler {
        fn handle(&self, cmd: Command) -> Result<Value, ApiError> {
            if cmd
                == (Command::Start {
                    partition: "boom".into(),
                })
            {
                panic!("boom");
            }
            let mut states = self.states.lock().expect("fake lock");
            let selected: Vec<String> = match &cmd {
                Command::Status { partition: Some(p) }
                | Command::Pause { partition: Some(p) }
                | Command::Resume { partition: Some(p) }
                | Command::Stop { partition: p }
                | Command::Start { partition: p }
                | Command::Wake { partition: p }
                | Command::Console { partition: p, .. } => {
                    if !states.contains_key(p) {
                        return Err(ApiError::unknown_partition(p));
                    }
                    vec![p.clone()]
                }
                _ => states.keys().cloned().collect(),
            };
            let one = selected.len() == 1;
            let mut change = |from: &[&str], to: &'static str| {
                let mut affected = Vec::new();
                for name in &selected {
                    let state = states.get_mut(name).expect("selected");
                    if from.contains(state) {
                        *state = to;
                        affected.push(name.clone());
                    } else if one {
                        return Err(ApiError::invalid_state(format!("{name} is {state}")));
                    }
                }
                Ok(json!({ "partitions": affected }))
            };
            match cmd {
                Command::Pause { .. } => change(&["running"], "paused"),
                Command::Resume { .. } => change(&["paused"], "running"),
                Command::Stop { .. } => change(&["running", "paused"], "stopped"),
                Command::Start { .. } => change(&["stopped", "crashed"], "running"),
                Command::Wake { .. } => change(&["sleeping"], "running"),
                Command::Shutdown => Ok(json!({ "shutting_down": true })),
                Command::Console { partition, lines } => {
                    let lines: Vec<String> =
                        (0..lines.min(3)).map(|i| format!("line {i}")).collect();
                    Ok(json!({ "partition": partition, "lines": lines }))
                }
                Command::Snapshot { dest, .. } => Ok(json!({ "set": dest })),
                Command::Reboot { from } => Ok(json!({ "set": from })),
                Command::Status { .. } => {
                    let list: Vec<Value> = selected
                        .iter()
                        .map(|n| json!({ "name": n, "state": states[n] }))
                        .collect();
                    Ok(json!({ "partitions": list }))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeHandler;
    use super::protocol::MAX_LINE;
    use super::*;
    use serde_json::{json, Value};
    use std::io::{BufRead, BufReader, Write};
    use std::net::Shutdown;
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::time::Duration;
    use vmm_sys_util::tempdir::TempDir;

    struct Conn {
        stream: UnixStream,
        reader: BufReader<UnixStream>,
    }

    impl Conn {
        fn open(path: &Path) -> Conn {
            let stream = UnixStream::connect(path).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let reader = BufReader::new(stream.try_clone().expect("clone"));
            Conn { stream, reader }
        }

        fn send(&mut self, bytes: &[u8]) -> Value {
            let mut line = bytes.to_vec();
            line.push(b'\n');
            self.stream.write_all(&line).expect("write");
            self.recv()
        }

        fn recv(&mut self) -> Value {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("read response");
            assert!(n > 0 && line.ends_with('\n'), "no response line: {line:?}");
            serde_json::from_str(&line).expect("response is JSON")
        }
    }

    fn code(response: &Value) -> &str {
        response["error"]["code"].as_str().unwrap_or("<none>")
    }

    fn start_server() -> (TempDir, PathBuf, ApiServer) {
        let dir = TempDir::new().expect("temp dir");
        let path = dir.as_path().join("api.sock");
        let server = ApiServer::bind(&path, Arc::new(FakeHandler::new())).expect("bind");
        (dir, path, server)
    }

    #[test]
    fn malformed_lines_each_get_their_error_and_the_connection_survives() {
        let (_dir, path, _server) = start_server();
        let mut conn = Conn::open(&path);
        let cases: &[(&str, &str)] = &[
            ("not json", "parse_error"),
            (r#"{"cmd":"#, "parse_error"),
            ("", "parse_error"),
            (r#"{"cmd":"status"} x"#, "parse_error"),
            (r#"{"cmd":"status"}{"cmd":"status"}"#, "parse_error"),
            ("[1,2]", "invalid_request"),
            (r#""status""#, "invalid_request"),
            ("42", "invalid_request"),
            ("null", "invalid_request"),
            ("{}", "invalid_request"),
            (r#"{"id":1}"#, "invalid_request"),
            (r#"{"cmd":5}"#, "invalid_request"),
            (r#"{"cmd":null}"#, "invalid_request"),
            (r#"{"cmd":"reboot-now"}"#, "unknown_command"),
            (r#"{"cmd":"snapshot"}"#, "invalid_request"),
            (r#"{"cmd":"snapshot","dest":5}"#, "invalid_request"),
            (r#"{"cmd":"reboot","from":["a"]}"#, "invalid_request"),
            (r#"{"cmd":"STATUS"}"#, "unknown_command"),
            (r#"{"cmd":"status","partition":7}"#, "invalid_request"),
            (r#"{"cmd":"status","bogus":1}"#, "invalid_request"),
            (r#"{"cmd":"stop"}"#, "invalid_request"),
            (r#"{"cmd":"start","partition":null}"#, "invalid_request"),
            (r#"{"cmd":"console","lines":5}"#, "invalid_request"),
            (
                r#"{"cmd":"console","partition":"engine","lines":-1}"#,
                "invalid_request",
            ),
            (
                r#"{"cmd":"console","partition":"engine","lines":10001}"#,
                "invalid_request",
            ),
            (
                r#"{"cmd":"console","partition":"engine","lines":2.5}"#,
                "invalid_request",
            ),
            (
                r#"{"cmd":"console","partition":"engine","lines":"5"}"#,
                "invalid_request",
            ),
            (
                r#"{"cmd":"shutdown","partition":"engine"}"#,
                "invalid_request",
            ),
            (
                r#"{"cmd":"stop","partition":"printer"}"#,
                "unknown_partition",
            ),
            (r#"{"cmd":"pause","partition":""}"#, "unknown_partition"),
            (r#"{"cmd":"resume","partition":"engine"}"#, "invalid_state"),
            (
                r#"{"cmd":"start","partition":"controller"}"#,
                "invalid_state",
            ),
            (r#"{"cmd":"start","partition":"boom"}"#, "internal_error"),
        ];
        for (line, expected) in cases {
            let response = conn.send(line.as_bytes());
            assert_eq!(response["ok"], json!(false), "{line}: {response}");
            assert_eq!(code(&response), *expected, "{line}: {response}");
            let message = response["error"]["message"].as_str().unwrap_or("");
            assert!(!message.is_empty(), "{line}: empty message");
            let id_sent = line.contains("\"id\"");
            assert_eq!(response.get("id").is_some(), id_sent, "{line}: {response}");
        }
        let status = conn.send(br#"{"cmd":"status"}"#);
        assert_eq!(status["ok"], json!(true), "{status}");
        assert_eq!(
            status["result"]["partitions"][0]["name"],
            json!("controller")
        );
        assert_eq!(status["result"]["partitions"][1]["state"], json!("running"));
    }

    #[test]
    fn a_too_long_line_is_discarded_and_the_next_request_works() {
        let (_dir, path, _server) = start_server();
        let mut conn = Conn::open(&path);
        let mut long = br#"{"cmd":"status","pad":""#.to_vec();
        long.resize(70 * 1024, b'a');
        long.extend_from_slice(br#""}"#);
        let response = conn.send(&long);
        assert_eq!(code(&response), "line_too_long", "{response}");
        // Exactly MAX_LINE bytes is still accepted (whitespace-padded valid request).
        let mut exact = br#"{"cmd":"status"}"#.to_vec();
        exact.resize(MAX_LINE, b' ');
        assert_eq!(conn.send(&exact)["ok"], json!(true));
        exact.push(b' ');
        assert_eq!(code(&conn.send(&exact)), "line_too_long");
        let response = conn.send(br#"{"cmd":"console","partition":"engine","lines":2,"id":9}"#);
        assert_eq!(response["result"]["lines"], json!(["line 0", "line 1"]));
        assert_eq!(response["id"], json!(9));
    }

    #[test]
    fn invalid_utf8_is_refused() {
        let (_dir, path, _server) = start_server();
        let mut conn = Conn::open(&path);
        let response = conn.send(b"{\"cmd\":\"st\xff\xfeatus\"}");
        assert_eq!(code(&response), "not_utf8", "{response}");
        assert_eq!(code(&conn.send(b"\xc3")), "not_utf8");
        assert_eq!(conn.send(br#"{"cmd":"status"}"#)["ok"], json!(true));
    }

    #[test]
    fn ids_are_echoed_back() {
        let (_dir, path, _server) = start_server();
        let mut conn = Conn::open(&path);
        for id in [
            json!(17),
            json!("req-a"),
            json!({"n": [1, {"x": null}]}),
            json!(null),
        ] {
            let ok = conn.send(json!({"cmd": "status", "id": id}).to_string().as_bytes());
            assert_eq!((&ok["ok"], &ok["id"]), (&json!(true), &id), "{ok}");
            assert!(ok.as_object().is_some_and(|o| o.contains_key("id")));
            let bad = conn.send(json!({"cmd": "fly", "id": id}).to_string().as_bytes());
            assert_eq!((code(&bad), &bad["id"]), ("unknown_command", &id), "{bad}");
        }
        let no_id = conn.send(br#"{"cmd":"status"}"#);
        assert!(no_id.as_object().is_some_and(|o| !o.contains_key("id")));
    }

    #[test]
    fn two_clients_are_served_at_once() {
        let (_dir, path, _server) = start_server();
        let mut a = Conn::open(&path);
        let mut b = Conn::open(&path);
        let pause = a.send(br#"{"cmd":"pause","partition":"engine","id":"a1"}"#);
        assert_eq!(pause["result"], json!({"partitions": ["engine"]}));
        let status = b.send(br#"{"cmd":"status","partition":"engine","id":"b1"}"#);
        assert_eq!(status["result"]["partitions"][0]["state"], json!("paused"));
        assert_eq!(status["id"], json!("b1"));
        // Both send before either reads; each gets its own answer.
        a.stream
            .write_all(b"{\"cmd\":\"resume\",\"partition\":\"engine\",\"id\":\"a2\"}\n")
            .expect("write");
        b.stream
            .write_all(b"{\"cmd\":\"pause\",\"partition\":\"controller\",\"id\":\"b2\"}\n")
            .expect("write");
        let (ra, rb) = (a.recv(), b.recv());
        assert_eq!((&ra["id"], &rb["id"]), (&json!("a2"), &json!("b2")));
        assert_eq!(ra["result"], json!({"partitions": ["engine"]}), "{ra}");
        assert_eq!(rb["result"], json!({"partitions": ["controller"]}), "{rb}");
        let again = b.send(br#"{"cmd":"resume","partition":"engine"}"#);
        assert_eq!(code(&again), "invalid_state", "{again}");
    }

    #[test]
    fn last_line_without_newline_is_answered() {
        let (_dir, path, _server) = start_server();
        let mut conn = Conn::open(&path);
        conn.stream
            .write_all(br#"{"cmd":"status","id":1}"#)
            .expect("write");
        conn.stream.shutdown(Shutdown::Write).expect("shutdown");
        assert_eq!(conn.recv()["id"], json!(1));
    }
}
