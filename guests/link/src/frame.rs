//! Framing: a frame is a `u32` little-endian length followed by that many bytes, the
//! postcard encoding of one message. See `docs/link-protocol.md`.

use alloc::vec::Vec;
use core::fmt;
use core::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest frame body (the bytes after the length prefix): 1 MiB.
pub const MAX_FRAME: usize = 1 << 20;

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Why bytes could not be turned into a message (or a message into a frame).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix announces more than [`MAX_FRAME`] bytes. The stream cannot be
    /// resynchronised after this: a [`FrameDecoder`] reports it once, then ignores all
    /// further bytes and yields nothing more.
    TooLong(u32),
    /// The frame's bytes are not the postcard encoding of a message of the expected type
    /// (including a message followed by extra bytes inside the frame). The bad frame is
    /// skipped; the decoder goes on with the next one.
    Decode,
    /// A message could not be encoded (only with [`try_encode`]: never for the protocol's
    /// own message types, which always serialize).
    Encode,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLong(n) => {
                write!(f, "frame of {n} bytes is longer than the limit")
            }
            FrameError::Decode => write!(f, "frame is not a valid message"),
            FrameError::Encode => write!(f, "message cannot be encoded"),
        }
    }
}

/// Encodes `msg` as one frame (length prefix + postcard bytes), checking the size limit.
pub fn try_encode<T: Serialize + ?Sized>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&[0; HEADER_LEN]);
    let mut out = postcard::to_extend(msg, out).map_err(|_| FrameError::Encode)?;
    let body = out.len() - HEADER_LEN;
    if body > MAX_FRAME {
        return Err(FrameError::TooLong(u32::try_from(body).unwrap_or(u32::MAX)));
    }
    // body <= MAX_FRAME, so it fits a u32.
    out[..HEADER_LEN].copy_from_slice(&(body as u32).to_le_bytes());
    Ok(out)
}

/// Encodes `msg` as one frame (length prefix + postcard bytes).
///
/// # Panics
///
/// If the encoding is longer than [`MAX_FRAME`] (a `Print` raster or a reply that large is
/// never produced: the controller bounds page sizes and status replies) or cannot be
/// encoded. Use [`try_encode`] for messages of unbounded size.
pub fn encode<T: Serialize + ?Sized>(msg: &T) -> Vec<u8> {
    match try_encode(msg) {
        Ok(frame) => frame,
        Err(e) => panic!("duplex-link: cannot encode a message: {e}"),
    }
}

/// Decodes one frame body (without the length prefix) as a `T`; extra bytes are an error.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    match postcard::take_from_bytes::<T>(body) {
        Ok((msg, [])) => Ok(msg),
        _ => Err(FrameError::Decode),
    }
}

/// Turns a byte stream, delivered in chunks of any size, into messages of type `T`.
///
/// ```
/// use duplex_link::{encode, FrameDecoder, ToEngine};
///
/// let mut dec = FrameDecoder::<ToEngine>::new();
/// let bytes = encode(&ToEngine::Status);
/// dec.push(&bytes[..2]);
/// assert!(dec.next_message().is_none());
/// dec.push(&bytes[2..]);
/// assert_eq!(dec.next_message(), Some(Ok(ToEngine::Status)));
/// ```
#[derive(Debug)]
pub struct FrameDecoder<T> {
    buf: Vec<u8>,
    /// Bytes of `buf` before this were consumed.
    start: usize,
    /// A [`FrameError::TooLong`] seen: the stream is lost.
    failed: bool,
    /// Largest body accepted ([`MAX_FRAME`] unless set by [`FrameDecoder::with_limit`]).
    limit: usize,
    _msg: PhantomData<fn() -> T>,
}

impl<T> Default for FrameDecoder<T> {
    fn default() -> Self {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            failed: false,
            limit: MAX_FRAME,
            _msg: PhantomData,
        }
    }
}

impl<T: DeserializeOwned> FrameDecoder<T> {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty decoder that takes frames of at most `limit` body bytes (capped at
    /// [`MAX_FRAME`]); a longer one is [`FrameError::TooLong`].
    pub fn with_limit(limit: usize) -> Self {
        FrameDecoder {
            limit: limit.min(MAX_FRAME),
            ..Self::default()
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed {
            return;
        }
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start >= 4096 && self.start * 2 >= self.buf.len() {
            // Drop consumed bytes now and then, so a stream of small frames stays O(n).
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet returned as messages.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Whether the stream is lost (an over-long frame was announced).
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// The next complete message: `None` if more bytes are needed, `Some(Err(_))` for a
    /// malformed frame (see [`FrameError`] for what happens after each kind).
    pub fn next_message(&mut self) -> Option<Result<T, FrameError>> {
        if self.failed {
            return None;
        }
        let avail = &self.buf[self.start..];
        let header: [u8; HEADER_LEN] = avail.get(..HEADER_LEN)?.try_into().ok()?;
        let len = u32::from_le_bytes(header);
        if len as usize > self.limit {
            self.failed = true;
            self.buf = Vec::new();
            self.start = 0;
            return Some(Err(FrameError::TooLong(len)));
        }
        let end = HEADER_LEN + len as usize;
        let body = avail.get(HEADER_LEN..end)?;
        let msg = decode_body(body);
        self.start += end;
        Some(msg)
    }
}

impl<T: DeserializeOwned> Iterator for FrameDecoder<T> {
    type Item = Result<T, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_message()
    }
}
