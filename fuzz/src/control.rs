//! The control request parser (`duplex_vmm::api::parse_request`): whatever a local client
//! sends on one line, the parser answers without panicking, with a response line that is one
//! line of JSON, bounded by the request's size, echoing the request's `id`; a line it accepts
//! round-trips through `Command::to_request`.

use duplex_vmm::api::{parse_request, Response};
use serde_json::{json, Value};

/// A response line may be this many times the request's length, plus [`RESPONSE_SLACK`]:
/// messages quote parts of the request, and JSON escapes a control byte in 6 bytes.
pub const RESPONSE_FACTOR: usize = 8;
/// Room for the fixed text of a response.
pub const RESPONSE_SLACK: usize = 1024;

/// Parses `line` as the control server does and checks the invariants (panics if one fails).
pub fn check_line(line: &[u8]) {
    let (id, parsed) = parse_request(line);
    let response = Response::from_result(
        id.clone(),
        parsed.clone().map(|cmd| json!({ "cmd": cmd.name() })),
    );
    let text = response.to_line();
    assert!(!text.contains('\n'), "a response is one line: {text:?}");
    assert!(
        text.len() <= RESPONSE_FACTOR * line.len() + RESPONSE_SLACK,
        "response of {} bytes for a request of {}",
        text.len(),
        line.len()
    );
    let back: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => panic!("the response line is not JSON ({e}): {text:?}"),
    };
    assert_eq!(back.get("ok"), Some(&Value::Bool(parsed.is_ok())), "{text}");
    assert_eq!(back.get("id"), id.as_ref(), "the id is echoed: {text}");
    if let Ok(cmd) = parsed {
        // What `duplex ctl` sends for the command parses back to it, with the same id.
        let mut request = cmd.to_request();
        if let (Some(obj), Some(id)) = (request.as_object_mut(), id.clone()) {
            obj.insert("id".into(), id);
        }
        let (id2, again) = parse_request(request.to_string().as_bytes());
        assert_eq!(again.as_ref(), Ok(&cmd), "round trip of {request}");
        assert_eq!(id2, id, "round trip of the id in {request}");
    }
}
