//! One control connection: lines read with a bound ([`MAX_LINE`]) and an idle deadline,
//! each answered by the [`ControlHandler`](super::ControlHandler) with exactly one
//! response line.
//!
//! A longer line is discarded up to its newline and answered with `line_too_long`; the
//! connection stays usable. A connection that has not completed a line within the idle
//! timeout since it connected or since its last response is closed.

use std::cell::Cell;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::protocol::{parse_request, ApiError, ErrorCode, Response, MAX_LINE};
use super::server::Shared;

thread_local! {
    /// Set while this thread runs a handler, so `shutdown` called from inside a
    /// handler does not wait for itself.
    pub(super) static IN_HANDLER: Cell<bool> = const { Cell::new(false) };
}

/// What one call to [`read_line`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LineRead {
    /// A line (its newline removed, or the last bytes before end of stream).
    Line,
    /// A line longer than [`MAX_LINE`], now discarded up to its newline.
    TooLong,
    /// End of stream, no bytes pending.
    Eof,
}

/// Reads one line into `line` (cleared first), keeping at most [`MAX_LINE`] bytes.
pub(super) fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>) -> io::Result<LineRead> {
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

/// Reads from a client's stream until a deadline: each read waits at most until then,
/// and one past it fails with `TimedOut` (however the bytes trickle in).
struct DeadlineReader<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        match (&mut &*self.stream).read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::ErrorKind::TimedOut.into()),
            other => other,
        }
    }
}

/// How a served connection ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Ended {
    /// The client closed it.
    Closed,
    /// No complete line within the idle timeout.
    Idle,
}

/// Serves one client until it closes, goes idle, or fails.
pub(super) fn serve_client(
    stream: &UnixStream,
    shared: &Shared,
    idle_timeout: Duration,
) -> io::Result<Ended> {
    let mut writer = stream;
    let mut reader = BufReader::with_capacity(
        16 * 1024,
        DeadlineReader {
            stream,
            deadline: Instant::now() + idle_timeout,
        },
    );
    let mut line = Vec::with_capacity(1024);
    loop {
        let read = match read_line(&mut reader, &mut line) {
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return Ok(Ended::Idle),
            other => other?,
        };
        let response = match read {
            LineRead::Eof => return Ok(Ended::Closed),
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
                reader.get_mut().deadline = Instant::now() + idle_timeout;
                continue;
            }
        };
        write_response(&mut writer, &response)?;
        reader.get_mut().deadline = Instant::now() + idle_timeout;
    }
}

pub(super) fn write_response(writer: &mut &UnixStream, response: &Response) -> io::Result<()> {
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
    use std::io::Cursor;

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
