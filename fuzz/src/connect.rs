//! The host bridge's `CONNECT <port>` line (`duplex_devices::vsock::parse_connect`): any
//! bytes a host program sends before its newline are answered with a port or nothing,
//! never a panic, and a port is only found in a line that says exactly that port.

/// Parses `line` as the bridge does and checks the invariants (panics if one fails).
pub fn check_line(line: &[u8]) {
    let parsed = duplex_devices::vsock::parse_connect(line);
    let text = std::str::from_utf8(line).ok();
    let body = text.map(|t| t.strip_suffix('\r').unwrap_or(t));
    let digits = body.and_then(|b| b.strip_prefix("CONNECT "));
    if let Some(port) = parsed {
        let digits = match digits {
            Some(d) => d,
            None => panic!("port {port} from a line that is not CONNECT: {line:?}"),
        };
        assert!(
            !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()),
            "port {port} from {line:?}"
        );
        let trimmed = digits.trim_start_matches('0');
        let expect = if trimmed.is_empty() { "0" } else { trimmed };
        assert_eq!(expect, port.to_string(), "port {port} from {line:?}");
    } else if let Some(d) = digits {
        // Refused: then it is not a plain decimal that fits in 32 bits.
        let fits =
            !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()) && d.parse::<u32>().is_ok();
        assert!(!fits, "a valid CONNECT line was refused: {line:?}");
    }
    // What a host program sends for a port parses back to it.
    if let Some(port) = parsed {
        let again = duplex_devices::vsock::parse_connect(format!("CONNECT {port}").as_bytes());
        assert_eq!(again, Some(port));
    }
}
