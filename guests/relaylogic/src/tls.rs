//! TLS 1.3 client sessions with a pinned server key, on embedded-tls 0.19, driven without
//! blocking.
//!
//! # Pinning
//!
//! There is no CA. A server is accepted only if
//!
//! 1. SHA-256 of its leaf certificate's DER `SubjectPublicKeyInfo` equals the pin
//!    ([`spki_pin`]; `duplex-mediator pin --cert FILE` prints the same 64 hex digits), and
//! 2. its `CertificateVerify` is an ECDSA P-256 / SHA-256 signature, under that key, of the
//!    handshake transcript up to its `Certificate` (RFC 8446 §4.4.3), so only the holder of
//!    the private key passes — a server replaying the pinned certificate does not; and
//! 3. both happened: embedded-tls skips verification of messages a server leaves out, so
//!    after the handshake the session checks that the verifier saw a valid signature
//!    ([`PinnedVerifier::verified`]) before any application data is sent.
//!
//! Certificate validity dates, names and the issuer's signature are not checked: the pin
//! names the key itself.
//!
//! # Driving it
//!
//! embedded-tls is written for async I/O. A [`TlsSession`] owns one boxed future that runs
//! the handshake and then the record layer both ways; its transport is a pair of byte
//! queues ([`TlsSession::push_ciphertext`], [`TlsSession::drain_ciphertext`]) that the
//! firmware moves to and from a TCP socket, and its application side another pair
//! ([`TlsSession::write`], [`TlsSession::take_plaintext`]). [`TlsSession::poll`] polls the
//! future with a no-op waker: reads from an empty queue return `Pending`, writes always
//! complete, so one poll runs until every byte available has been processed. Nothing ever
//! needs waking; the firmware polls each session whenever its loop turns.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::convert::Infallible;
use core::future::{poll_fn, Future};
use core::pin::{pin, Pin};
use core::task::{Context, Poll, Waker};

use embedded_io_async::{Read, Write};
use embedded_tls::{
    Aes128GcmSha256, CertificateRef, CertificateVerifyRef, CryptoProvider, CryptoRngCore,
    SignatureScheme, TlsConfig, TlsConnection, TlsContext, TlsError, TlsVerifier,
};
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use sha2::{Digest, Sha256};

pub use duplex_tunnel::{certificate_pin, spki_pin};

/// Size of the TLS read buffer: the largest TLS 1.3 record a server may send (16 640 bytes).
pub const READ_BUFFER: usize = 16_640;
/// Size of the TLS write buffer: embedded-tls fills records up to the buffer less
/// [`embedded_tls::TLS_RECORD_OVERHEAD`], so this makes records of at most 2^14 plaintext
/// bytes, the protocol's limit (a server refuses larger ones).
pub const WRITE_BUFFER: usize = 16_384 + embedded_tls::TLS_RECORD_OVERHEAD;
/// Application bytes read from the TLS layer at a time: a whole record's worth.
const READ_CHUNK: usize = 16_384;
/// [`TlsSession::ended`] after [`TlsSession::close`].
pub const CLOSED_BY_US: &str = "TLS: closed by the relay";

/// The message a TLS 1.3 server signs in `CertificateVerify` (RFC 8446 §4.4.3).
fn certificate_verify_message(transcript_hash: &[u8]) -> Vec<u8> {
    let mut msg = vec![0x20u8; 64];
    msg.extend_from_slice(b"TLS 1.3, server CertificateVerify\x00");
    msg.extend_from_slice(transcript_hash);
    msg
}

/// Accepts a server only with the pinned key (see the module documentation).
pub struct PinnedVerifier {
    pin: [u8; 32],
    /// The server's key, once its certificate matched the pin.
    key: Option<VerifyingKey>,
    /// The transcript hash through the server's `Certificate`.
    transcript: Option<Sha256>,
    verified: bool,
    /// Why the server was refused (for the log).
    failure: Option<&'static str>,
}

impl PinnedVerifier {
    /// A verifier for the key whose `SubjectPublicKeyInfo` hashes to `pin`.
    pub fn new(pin: [u8; 32]) -> Self {
        PinnedVerifier {
            pin,
            key: None,
            transcript: None,
            verified: false,
            failure: None,
        }
    }

    /// Whether the server proved it holds the pinned key (a valid `CertificateVerify`).
    pub fn verified(&self) -> bool {
        self.verified
    }

    /// Why the server was refused, if it was.
    pub fn failure(&self) -> Option<&'static str> {
        self.failure
    }

    fn refuse(&mut self, why: &'static str, err: TlsError) -> Result<(), TlsError> {
        self.failure = Some(why);
        self.verified = false;
        Err(err)
    }
}

impl TlsVerifier<Aes128GcmSha256> for PinnedVerifier {
    fn set_hostname_verification(&mut self, _hostname: &str) -> Result<(), TlsError> {
        Ok(()) // the pin names the key; no names are checked
    }

    fn verify_certificate(
        &mut self,
        transcript: &Sha256,
        cert: CertificateRef,
    ) -> Result<(), TlsError> {
        let Some(embedded_tls::CertificateEntryRef::X509(der)) = cert.entries.first() else {
            return self.refuse("no X.509 certificate", TlsError::InvalidCertificate);
        };
        let Some(spki) = duplex_tunnel::certificate_spki(der) else {
            return self.refuse("unreadable certificate", TlsError::InvalidCertificate);
        };
        if spki_pin(&spki) != self.pin {
            return self.refuse(
                "server key does not match the pin",
                TlsError::InvalidCertificate,
            );
        }
        let Ok(key) = VerifyingKey::from_public_key_der(&spki) else {
            return self.refuse(
                "pinned key is not ECDSA P-256",
                TlsError::InvalidCertificate,
            );
        };
        self.key = Some(key);
        self.transcript = Some(transcript.clone());
        Ok(())
    }

    fn verify_signature(&mut self, verify: CertificateVerifyRef) -> Result<(), TlsError> {
        let (Some(key), Some(transcript)) = (self.key.take(), self.transcript.take()) else {
            return self.refuse(
                "CertificateVerify before Certificate",
                TlsError::InvalidSignature,
            );
        };
        if verify.signature_scheme != SignatureScheme::EcdsaSecp256r1Sha256 {
            return self.refuse(
                "CertificateVerify not ECDSA P-256/SHA-256",
                TlsError::InvalidSignatureScheme,
            );
        }
        let Ok(signature) = Signature::from_der(verify.signature) else {
            return self.refuse(
                "malformed CertificateVerify signature",
                TlsError::InvalidSignature,
            );
        };
        let msg = certificate_verify_message(&transcript.finalize());
        if key.verify(&msg, &signature).is_err() {
            return self.refuse(
                "CertificateVerify signature does not verify under the pinned key",
                TlsError::InvalidSignature,
            );
        }
        self.verified = true;
        Ok(())
    }
}

/// embedded-tls's crypto provider: the RNG and the [`PinnedVerifier`].
pub struct PinnedProvider<R> {
    rng: R,
    /// The verifier (inspect it after the handshake).
    pub verifier: PinnedVerifier,
}

impl<R: CryptoRngCore> PinnedProvider<R> {
    /// A provider pinning `pin`, drawing randomness from `rng`.
    pub fn new(pin: [u8; 32], rng: R) -> Self {
        PinnedProvider {
            rng,
            verifier: PinnedVerifier::new(pin),
        }
    }
}

impl<R: CryptoRngCore> CryptoProvider for PinnedProvider<R> {
    type CipherSuite = Aes128GcmSha256;
    type Signature = p256::ecdsa::DerSignature;

    fn rng(&mut self) -> impl CryptoRngCore {
        &mut self.rng
    }

    fn verifier(&mut self) -> Result<&mut impl TlsVerifier<Aes128GcmSha256>, TlsError> {
        Ok(&mut self.verifier)
    }
}

/// The byte queues between a session's future and its owner.
#[derive(Default)]
struct Pipes {
    /// From the network, not yet read by TLS.
    cipher_in: VecDeque<u8>,
    /// The peer closed its side (TCP FIN).
    eof: bool,
    /// From TLS, for the network.
    cipher_out: Vec<u8>,
    /// Application bytes to encrypt.
    plain_out: Vec<u8>,
    /// Decrypted application bytes.
    plain_in: Vec<u8>,
    /// The handshake is done and the key verified.
    open: bool,
    /// The owner closes the session: `close_notify` after the queued bytes.
    closing: bool,
}

/// The transport embedded-tls sees: the queues.
#[derive(Clone)]
struct Io(Rc<RefCell<Pipes>>);

impl embedded_io::ErrorType for Io {
    type Error = Infallible;
}

impl Read for Io {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, Infallible> {
        poll_fn(|_| {
            let mut p = self.0.borrow_mut();
            if !p.cipher_in.is_empty() {
                // Slice copies, not a byte at a time: every byte of a tunnel passes here.
                let (a, b) = p.cipher_in.as_slices();
                let n1 = buf.len().min(a.len());
                buf[..n1].copy_from_slice(&a[..n1]);
                let n2 = (buf.len() - n1).min(b.len());
                buf[n1..n1 + n2].copy_from_slice(&b[..n2]);
                p.cipher_in.drain(..n1 + n2);
                Poll::Ready(Ok(n1 + n2))
            } else if p.eof {
                Poll::Ready(Ok(0))
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

impl Write for Io {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, Infallible> {
        self.0.borrow_mut().cipher_out.extend_from_slice(buf);
        Ok(buf.len())
    }

    async fn flush(&mut self) -> Result<(), Infallible> {
        Ok(())
    }
}

/// Says why a session ended, preferring the verifier's reason.
fn describe(e: TlsError, verifier: Option<&PinnedVerifier>) -> String {
    if let Some(why) = verifier.and_then(|v| v.failure()) {
        return format!("TLS: {why}");
    }
    match e {
        TlsError::ConnectionClosed => "TLS: closed by the peer (close_notify)".into(),
        TlsError::IoError => "TLS: the peer closed the connection".into(),
        TlsError::HandshakeAborted(level, desc) => {
            format!("TLS: the server aborted the handshake ({level:?} {desc:?})")
        }
        other => format!("TLS: {other:?}"),
    }
}

/// The whole life of a session: handshake, key check, then records both ways until
/// either side ends.
async fn run<R: CryptoRngCore>(io: Io, pin: [u8; 32], rng: R) -> String {
    let mut read_buf = vec![0u8; READ_BUFFER];
    let mut write_buf = vec![0u8; WRITE_BUFFER];
    let config = TlsConfig::new();
    let mut provider = PinnedProvider::new(pin, rng);
    let mut tls: TlsConnection<'_, Io, Aes128GcmSha256> =
        TlsConnection::new(io.clone(), &mut read_buf, &mut write_buf);
    if let Err(e) = tls.open(TlsContext::new(&config, &mut provider)).await {
        return describe(e, Some(&provider.verifier));
    }
    if !provider.verifier.verified() {
        return "TLS: the server did not prove it holds the pinned key".to_string();
    }
    io.0.borrow_mut().open = true;
    let close = {
        let (mut reader, mut writer) = tls.split();
        let read_loop = async {
            let mut chunk = vec![0u8; READ_CHUNK];
            loop {
                match reader.read(&mut chunk).await {
                    Ok(0) => return Some("TLS: the peer closed the connection".to_string()),
                    Ok(n) => io.0.borrow_mut().plain_in.extend_from_slice(&chunk[..n]),
                    Err(e) => return Some(describe(e, None)),
                }
            }
        };
        let write_loop = async {
            loop {
                let next = poll_fn(|_| {
                    let mut p = io.0.borrow_mut();
                    if !p.plain_out.is_empty() {
                        Poll::Ready(Some(core::mem::take(&mut p.plain_out)))
                    } else if p.closing {
                        Poll::Ready(None)
                    } else {
                        Poll::Pending
                    }
                })
                .await;
                // `None`: everything queued is out and the owner closes the session.
                let data = next?;
                if let Err(e) = writer.write_all(&data).await {
                    return Some(describe(e, None));
                }
                if let Err(e) = writer.flush().await {
                    return Some(describe(e, None));
                }
            }
        };
        let mut read_loop = pin!(read_loop);
        let mut write_loop = pin!(write_loop);
        poll_fn(|cx| {
            // Writes first: what the application queued goes out even if the peer then
            // closes.
            if let Poll::Ready(why) = write_loop.as_mut().poll(cx) {
                return Poll::Ready(why);
            }
            read_loop.as_mut().poll(cx)
        })
        .await
    };
    match close {
        Some(why) => why,
        // The halves are gone; the whole connection sends `close_notify`.
        None => match tls.close().await {
            Ok(_) => CLOSED_BY_US.to_string(),
            Err((_, e)) => describe(e, None),
        },
    }
}

/// A TLS 1.3 client session with a pinned server key (see the module documentation).
pub struct TlsSession {
    pipes: Rc<RefCell<Pipes>>,
    task: Option<Pin<Box<dyn Future<Output = String>>>>,
    ended: Option<String>,
}

impl TlsSession {
    /// A client session that will accept only the server key pinned by `pin`, with `rng`
    /// for its key shares and random values. Call [`TlsSession::poll`] to start the
    /// handshake.
    pub fn client<R: CryptoRngCore + 'static>(pin: [u8; 32], rng: R) -> Self {
        let pipes = Rc::new(RefCell::new(Pipes::default()));
        let task: Pin<Box<dyn Future<Output = String>>> =
            Box::pin(run(Io(pipes.clone()), pin, rng));
        TlsSession {
            pipes,
            task: Some(task),
            ended: None,
        }
    }

    /// Bytes received from the network.
    pub fn push_ciphertext(&mut self, bytes: &[u8]) {
        self.pipes.borrow_mut().cipher_in.extend(bytes);
    }

    /// The peer closed its side of the connection.
    pub fn peer_closed(&mut self) {
        self.pipes.borrow_mut().eof = true;
    }

    /// Hands the bytes waiting for the network to `send`, which returns how many it took.
    pub fn drain_ciphertext(&mut self, send: impl FnOnce(&[u8]) -> usize) {
        let mut p = self.pipes.borrow_mut();
        let n = send(&p.cipher_out).min(p.cipher_out.len());
        p.cipher_out.drain(..n);
    }

    /// Bytes waiting for the network.
    pub fn ciphertext_pending(&self) -> usize {
        self.pipes.borrow().cipher_out.len()
    }

    /// Queues application bytes (sent once the session is open, in order).
    pub fn write(&mut self, bytes: &[u8]) {
        if self.ended.is_none() {
            self.pipes.borrow_mut().plain_out.extend_from_slice(bytes);
        }
    }

    /// Application bytes queued and not yet encrypted.
    pub fn plaintext_pending(&self) -> usize {
        self.pipes.borrow().plain_out.len()
    }

    /// Takes the application bytes received so far.
    pub fn take_plaintext(&mut self) -> Vec<u8> {
        core::mem::take(&mut self.pipes.borrow_mut().plain_in)
    }

    /// Runs the session as far as the bytes at hand allow.
    pub fn poll(&mut self) {
        let Some(task) = self.task.as_mut() else {
            return;
        };
        let mut cx = Context::from_waker(Waker::noop());
        if let Poll::Ready(why) = task.as_mut().poll(&mut cx) {
            self.task = None;
            self.ended = Some(why);
        }
    }

    /// Closes the session: the bytes queued go out, then `close_notify`; then the session
    /// has ended ([`CLOSED_BY_US`]) and only its last ciphertext remains to be sent. A
    /// session still in its handshake ends at once.
    pub fn close(&mut self) {
        if self.ended.is_some() {
            return;
        }
        let open = {
            let mut p = self.pipes.borrow_mut();
            p.closing = true;
            p.open
        };
        if !open {
            self.task = None;
            self.ended = Some(CLOSED_BY_US.to_string());
        } else {
            self.poll();
        }
    }

    /// Whether the handshake is done and the server proved the pinned key.
    pub fn is_open(&self) -> bool {
        self.pipes.borrow().open && self.ended.is_none()
    }

    /// Why the session ended, once it has.
    pub fn ended(&self) -> Option<&str> {
        self.ended.as_deref()
    }
}
