//! Frames over an async byte stream: the tunnel protocol's framing
//! (`duplex_tunnel::FrameDecoder` with a connection's limit) on a tokio stream, TLS or not.

use std::time::Duration;

use duplex_tunnel::{try_encode, FrameDecoder, FrameError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed by the peer")]
    Closed,
    #[error("connection closed by the peer without TLS close_notify")]
    Truncated,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes is over the connection's limit")]
    TooLarge(u32),
    #[error("frame is not a valid message of the expected type")]
    Malformed,
    #[error("message cannot be encoded")]
    Encode,
    #[error("timed out")]
    Timeout,
}

impl WireError {
    /// The protocol error code to send before closing, for errors the peer caused.
    pub fn code(&self) -> Option<u16> {
        match self {
            WireError::TooLarge(_) => Some(duplex_tunnel::error_code::FRAME_TOO_LARGE),
            WireError::Malformed => Some(duplex_tunnel::error_code::MALFORMED),
            _ => None,
        }
    }
}

/// A stream that reads messages of type `In` and writes any message.
pub struct Framed<S, In> {
    io: S,
    dec: FrameDecoder<In>,
    buf: Box<[u8]>,
}

impl<S: AsyncRead + AsyncWrite + Unpin, In: DeserializeOwned> Framed<S, In> {
    /// Frames `io` with a decoder (its limit) and a read buffer of `read_buf` bytes.
    pub fn new(io: S, dec: FrameDecoder<In>, read_buf: usize) -> Self {
        Framed {
            io,
            dec,
            buf: vec![0u8; read_buf.max(64)].into_boxed_slice(),
        }
    }

    /// The next message. Cancel-safe: bytes read stay in the decoder.
    pub async fn recv(&mut self) -> Result<In, WireError> {
        loop {
            match self.dec.next_message() {
                Some(Ok(msg)) => return Ok(msg),
                Some(Err(FrameError::TooLong(n))) => return Err(WireError::TooLarge(n)),
                Some(Err(_)) => return Err(WireError::Malformed),
                None => {}
            }
            let n = match self.io.read(&mut self.buf).await {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(WireError::Truncated)
                }
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return Err(WireError::Closed);
            }
            self.dec.push(&self.buf[..n]);
        }
    }

    /// [`Framed::recv`] within `limit`.
    pub async fn recv_within(&mut self, limit: Duration) -> Result<In, WireError> {
        tokio::time::timeout(limit, self.recv())
            .await
            .map_err(|_| WireError::Timeout)?
    }

    /// Writes one message and flushes it.
    pub async fn send<M: Serialize>(&mut self, msg: &M) -> Result<(), WireError> {
        let frame = try_encode(msg).map_err(|_| WireError::Encode)?;
        self.send_raw(&frame).await
    }

    /// Writes bytes as they are (tests use it to send broken frames).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        self.io.write_all(bytes).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// [`Framed::send`] within `limit`.
    pub async fn send_within<M: Serialize>(
        &mut self,
        msg: &M,
        limit: Duration,
    ) -> Result<(), WireError> {
        tokio::time::timeout(limit, self.send(msg))
            .await
            .map_err(|_| WireError::Timeout)?
    }

    /// Closes the write side (TLS `close_notify`, then FIN), waiting at most `limit`.
    pub async fn shutdown(&mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.io.shutdown()).await;
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.io
    }
}
