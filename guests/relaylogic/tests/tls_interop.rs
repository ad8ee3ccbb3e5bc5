//! Interop of the relay's TLS client (embedded-tls 0.19 with the pinned-key verifier,
//! driven by `TlsSession` exactly as the firmware drives it) with a rustls TLS 1.3 server
//! (ECDSA P-256 certificate from rcgen) over loopback TCP:
//!
//! * the right pin: the handshake completes and 100 KiB echo back intact;
//! * a wrong pin: the relay refuses the server before sending any application byte;
//! * the pinned certificate presented by a server that signs with another key: refused,
//!   because `CertificateVerify` does not verify under the pinned key.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::thread;
use std::time::{Duration, Instant};

use common::{certificate, p256_key, server_config, Pump};
use duplex_relay::tls::{certificate_pin, spki_pin};
use rcgen::{KeyPair, PublicKeyData};
use rustls::pki_types::CertificateDer;

/// A rustls TLS 1.3-only server on a loopback port that presents `cert`, signs with
/// `signer`, and echoes `echo_len` bytes to one client. Returns the port and the thread.
fn server(
    cert: CertificateDer<'static>,
    signer: &KeyPair,
    echo_len: usize,
) -> (u16, thread::JoinHandle<Result<(), String>>) {
    let config = server_config(cert, signer);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let handle = thread::spawn(move || {
        let (tcp, _) = listener.accept().map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        let conn = rustls::ServerConnection::new(config).map_err(|e| e.to_string())?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut got = vec![0u8; echo_len];
        tls.read_exact(&mut got).map_err(|e| e.to_string())?;
        tls.write_all(&got).map_err(|e| e.to_string())?;
        tls.conn.send_close_notify();
        tls.flush().map_err(|e| e.to_string())?;
        Ok(())
    });
    (port, handle)
}

/// Runs a relay TLS session to `port` the way the firmware does (non-blocking socket,
/// bytes moved between it and the session, `poll` each turn), sends `payload` and waits
/// for as many bytes back. Returns what came back, or why the session ended.
fn client(port: u16, pin: [u8; 32], payload: &[u8]) -> Result<Vec<u8>, String> {
    let mut pump = Pump::connect(port, pin).map_err(|e| e.to_string())?;
    pump.tls.write(payload);
    let mut back = Vec::new();
    let mut was_open = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        pump.step()?;
        back.extend(pump.tls.take_plaintext());
        was_open |= pump.tls.is_open();
        if back.len() >= payload.len() {
            assert!(was_open, "data before the session was open");
            return Ok(back);
        }
        if let Some(why) = pump.tls.ended() {
            return Err(why.to_string());
        }
        thread::sleep(Duration::from_millis(1));
    }
    Err("timed out".into())
}

#[test]
fn pin_is_the_sha256_of_the_certificates_subject_public_key_info() {
    let key = p256_key();
    let cert = certificate(&key);
    let pin = certificate_pin(&cert).expect("a readable certificate");
    assert_eq!(pin, spki_pin(&key.subject_public_key_info()));
}

#[test]
fn handshake_and_echo_succeed_with_the_right_pin() {
    let key = p256_key();
    let cert = certificate(&key);
    let pin = spki_pin(&key.subject_public_key_info());
    let payload: Vec<u8> = (0..100 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let (port, server) = server(cert, &key, payload.len());
    let back = client(port, pin, &payload);
    let served = server.join().expect("server thread");
    let back = back.unwrap_or_else(|e| panic!("client: {e}; server: {served:?}"));
    assert_eq!(back, payload);
    served.expect("server side");
}

#[test]
fn a_server_with_another_key_is_refused() {
    let key = p256_key();
    let cert = certificate(&key);
    let wrong_pin = spki_pin(&p256_key().subject_public_key_info());
    let (port, server) = server(cert, &key, 1);
    let err = client(port, wrong_pin, b"x").expect_err("must be refused");
    assert!(err.contains("server key does not match the pin"), "{err}");
    assert!(server.join().expect("server thread").is_err());
}

#[test]
fn the_pinned_certificate_without_its_private_key_is_refused() {
    // The server presents the genuine certificate (the pinned key) but holds only another
    // private key, with which it signs CertificateVerify.
    let genuine = p256_key();
    let cert = certificate(&genuine);
    let pin = spki_pin(&genuine.subject_public_key_info());
    let impostor = p256_key();
    let (port, server) = server(cert, &impostor, 1);
    let err = client(port, pin, b"secret").expect_err("must be refused");
    assert!(
        err.contains("CertificateVerify signature does not verify under the pinned key"),
        "{err}"
    );
    assert!(server.join().expect("server thread").is_err());
}
