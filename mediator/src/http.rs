//! A minimal HTTP/1.1 client for JSON APIs on plain TCP (`http://host:port`): the cloud
//! server calls the mediator's API with it, `duplex-cloud submit` the cloud's, tests both.
//! One request per connection (`Connection: close`); bodies up to 16 MiB.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response read.
const MAX_RESPONSE: usize = 16 << 20;

/// Why a request failed (not an HTTP error status: those are answers).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("bad URL {0:?}: expected http://host:port")]
    BadUrl(String),
    #[error("cannot reach {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("i/o error talking to {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("no answer from {0} in time")]
    Timeout(String),
    #[error("malformed HTTP response from {addr}: {why}")]
    Malformed { addr: String, why: &'static str },
    #[error("response body is not JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// A response: status and JSON body (`null` when empty).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: serde_json::Value,
}

/// The `host:port` of an `http://host:port[/]` base URL.
pub fn authority(base: &str) -> Result<&str, HttpError> {
    let rest = base
        .strip_prefix("http://")
        .ok_or_else(|| HttpError::BadUrl(base.to_string()))?;
    let auth = rest.trim_end_matches('/');
    if auth.is_empty() || auth.contains('/') || !auth.contains(':') {
        return Err(HttpError::BadUrl(base.to_string()));
    }
    Ok(auth)
}

/// Sends `method path` with an optional bearer token and JSON body; the whole exchange
/// within `limit`.
pub async fn request(
    base: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&serde_json::Value>,
    limit: Duration,
) -> Result<Response, HttpError> {
    let addr = authority(base)?.to_string();
    tokio::time::timeout(limit, exchange(&addr, method, path, bearer, body))
        .await
        .map_err(|_| HttpError::Timeout(addr.clone()))?
}

async fn exchange(
    addr: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&serde_json::Value>,
) -> Result<Response, HttpError> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|source| HttpError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    let io = |source| HttpError::Io {
        addr: addr.to_string(),
        source,
    };
    let payload = match body {
        Some(v) => serde_json::to_vec(v)?,
        None => Vec::new(),
    };
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(token) = bearer {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if body.is_some() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", payload.len()));
    stream.write_all(head.as_bytes()).await.map_err(io)?;
    stream.write_all(&payload).await.map_err(io)?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
        if raw.len() > MAX_RESPONSE {
            return Err(HttpError::Malformed {
                addr: addr.to_string(),
                why: "response over 16 MiB",
            });
        }
    }
    parse_response(&raw).map_err(|why| HttpError::Malformed {
        addr: addr.to_string(),
        why,
    })
}

fn parse_response(raw: &[u8]) -> Result<Response, &'static str> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "headers are not UTF-8")?;
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("no status line")?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or("bad status line")?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    let body = if body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&body).map_err(|_| "body is not JSON")?
    };
    Ok(Response { status, body })
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::new();
    loop {
        let eol = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_text = std::str::from_utf8(&body[..eol]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        body = &body[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(body.get(..size).ok_or("truncated chunk")?);
        body = body.get(size + 2..).ok_or("truncated chunk")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_bodies() {
        let r = parse_response(b"HTTP/1.1 201 Created\r\ncontent-length: 8\r\n\r\n{\"a\":1}\n")
            .unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(r.body["a"], 1);
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"b\r\n4\r\n\":2}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body["b"], 2);
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn authority_needs_http_and_port() {
        assert_eq!(
            authority("http://127.0.0.1:8080/").unwrap(),
            "127.0.0.1:8080"
        );
        assert!(authority("https://x:1").is_err());
        assert!(authority("http://x").is_err());
    }
}
